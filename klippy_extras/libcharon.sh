#!/usr/bin/env bash
# Makes libcharon (module "Charon", which reads Cura's UFP files) importable
# in a Python venv. libcharon is not on PyPI; Debian ships it as
# python3-charon, whose dependencies (PyQt5, python3-gi, python3-dbus) only
# serve Charon's D-Bus file service, which cura_connection does not use, and
# weigh hundreds of MB on a Raspberry Pi OS Lite host. So:
#   - python3-charon installed (CHARON_DIR exists): the venv links to it;
#   - otherwise the package file is downloaded (apt-get download, no root)
#     and only its Charon folder is unpacked into VENV/share/cura_connection/,
#     which the venv links to.
# A Charon that is a real folder in the venv is used as it is.
#   libcharon.sh VENV        (env CHARON_DIR: Debian's Charon folder)
# Exit status 2: the download failed (the message says why and what helps).
set -euo pipefail
VENV=${1:?usage: libcharon.sh VENV}
VENV=$(cd "$VENV" && pwd)   # the link must work from anywhere
CHARON_DIR=${CHARON_DIR:-/usr/lib/python3/dist-packages/Charon}
OWN_DIR="$VENV/share/cura_connection"   # our unpacked copy (install.sh --uninstall removes it)
PY="$VENV/bin/python"
work=""
trap 'if [ -n "$work" ]; then rm -rf "$work"; fi' EXIT

info() { printf '    %s\n' "$*"; }
fail() { printf 'ERROR: %s\n' "$1" >&2; exit "${2:-1}"; }

# Downloads python3-charon and unpacks its Charon folder to $OWN_DIR/Charon.
fetch() {
    local version src
    work=$(mktemp -d)
    # run as root, apt downloads as its _apt user
    chmod 755 "$work"
    [ "$(id -u)" != 0 ] || chown _apt "$work" 2>/dev/null || true
    if ! (cd "$work" && apt-get download python3-charon) >"$work/log" 2>&1; then
        sed 's/^/    apt-get: /' "$work/log" >&2
        if grep -qiE "temporary failure resolving|could not resolve|network is unreachable|could not connect|connection (timed out|refused)|no route to host" "$work/log"; then
            fail "could not download Debian's python3-charon: this machine cannot reach its Debian package mirror (offline?). cura_connection needs that package's Charon folder to read UFP files, the format Cura sends. Connect to the internet (or set up apt's proxy) and run this again." 2
        fi
        fail "could not download Debian's python3-charon with apt-get (see its words above). It is in Debian 11 and newer and Raspberry Pi OS; when apt does not know it, refresh the package lists ('sudo apt-get update') and run this again. cura_connection needs it to read UFP files, the format Cura sends." 2
    fi
    dpkg-deb -x "$work"/python3-charon_*.deb "$work/root"
    version=$(dpkg-deb -f "$work"/python3-charon_*.deb Version)
    src="$work/root/usr/lib/python3/dist-packages/Charon"
    [ -f "$src/VirtualFile.py" ] || fail "python3-charon $version has no Charon/VirtualFile.py"
    mkdir -p "$OWN_DIR"
    rm -rf "$OWN_DIR/Charon.new"
    cp -R "$src" "$OWN_DIR/Charon.new"
    rm -rf "$OWN_DIR/Charon"
    mv "$OWN_DIR/Charon.new" "$OWN_DIR/Charon"
    printf '%s\n' "$version" >"$OWN_DIR/python3-charon.version"
    info "unpacked Charon of python3-charon $version ($(du -sk "$OWN_DIR/Charon" | cut -f1) KB) into $OWN_DIR"
}

[ -x "$PY" ] || fail "$PY not found"
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
link="$site/Charon"
if [ -d "$link" ] && [ ! -L "$link" ]; then
    info "$link is a real package, not a link: using it as it is"
else
    if [ -d "$CHARON_DIR" ]; then
        target=$CHARON_DIR
    else
        target="$OWN_DIR/Charon"
        if [ -f "$target/VirtualFile.py" ]; then
            info "using libcharon $(cat "$OWN_DIR/python3-charon.version" 2>/dev/null) unpacked in $OWN_DIR"
        else
            info "python3-charon is not installed: taking only its Charon folder (not its Qt and D-Bus dependencies)"
            fetch
        fi
    fi
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$target" ]; then
        info "$link already links to $target"
    else
        ln -sfn "$target" "$link"
        info "$link -> $target"
    fi
fi
"$PY" -c 'import Charon.VirtualFile, Charon.OpenMode' \
    || fail "libcharon does not import in $VENV (see the error above)"
info "import Charon: ok"
