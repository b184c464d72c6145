#!/usr/bin/env bash
# Installs (or with --uninstall removes) the cura_connection Klipper extra on a
# Klipper host (Raspberry Pi OS / Debian, KIAUH or MainsailOS layout).
# Run it as the user that runs Klipper; it calls sudo itself for the few steps
# that need root. Running it again is safe: every step checks before it acts.
# See --help for the steps and options.
set -euo pipefail

# Moonraker's update manager reads this line (install_script) to learn which
# Debian packages the extension needs: none. libcharon comes from Debian's
# python3-charon without that package's Qt/D-Bus dependencies
# (klippy_extras/libcharon.sh), and iptables only where nginx does not serve
# port 80.
# shellcheck disable=SC2034
PKGLIST=""

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
MODULE="$REPO/klippy_extras/cura_connection.py"
LIBCHARON_SH="$REPO/klippy_extras/libcharon.sh"
REQUIREMENTS="$REPO/klippy_extras/requirements.txt"
MODULE_REL="klippy/extras/cura_connection.py"   # inside the Klipper checkout
MARK="cura_connection install.sh"               # tags lines we add to shared files
MR_BEGIN="# >>> cura_connection: added by install.sh, removed by install.sh --uninstall >>>"
MR_END="# <<< cura_connection <<<"
RULE_TAG="cura_connection"                      # iptables comment on our rules

KLIPPER_DIR="$HOME/klipper"
KLIPPY_ENV="$HOME/klippy-env"
CONFIG_DIR=""      # --config-dir; else the chosen Klipper instance's
CHARON_DIR="${CHARON_DIR:-/usr/lib/python3/dist-packages/Charon}"
# Where root's tools (nginx, iptables, netfilter-persistent) are looked for
# besides PATH, which lacks the sbin folders for normal users. Tests point it
# at their fake commands.
SBIN_DIRS=${CURA_INSTALL_SBIN_DIRS-/usr/local/sbin:/usr/sbin:/sbin}
NGINX_DIR="/etc/nginx"
PORT=8080
PORT_SET=0
SERVICE=""         # --service; else the chosen Klipper instance's
ALL_INSTANCES=0
DO_PORT80=1
DO_RESTART=1
UNINSTALL=0
DRY_RUN=0
case "${CURA_INSTALL_DRY_RUN:-0}" in 1|yes|true) DRY_RUN=1 ;; esac

usage() {
    cat <<EOF
Usage: install.sh [options]

Installs cura_connection for Klipper:
  1. links klippy_extras/cura_connection.py into <klipper-dir>/klippy/extras/
     (and hides it from git status in the Klipper checkout)
  2. pip-installs klippy_extras/requirements.txt into the Klippy venv
  3. makes libcharon (module Charon, reads UFP files) importable in that venv:
     Debian's python3-charon when it is installed, else only the Charon
     folder of that package, downloaded with apt-get and unpacked into
     <klippy-env>/share/cura_connection (without PyQt5, python3-gi, dbus)
  4. makes Cura's requests to port 80 reach the module: an nginx include with
     the Cura paths when nginx (Mainsail/Fluidd) serves port 80, otherwise an
     iptables REDIRECT 80 -> <port> saved with netfilter-persistent
  5. adds an [update_manager cura_connection] section to moonraker.conf
  6. tells you what to add to printer.cfg (it never edits printer.cfg)
  7. restarts Klipper

Several Klipper instances (KIAUH: ~/printer_data, ~/printer_<n>_data or
~/<name>_data, each with config/printer.cfg and config/moonraker.conf;
services klipper, klipper-<n>, klipper-<name>): steps 1-4 are shared by all
of them (one link, one venv, one port 80 per host); steps 5-7 are for the
instance you choose with --config-dir and/or --service. Without them
install.sh asks on a terminal and stops otherwise, listing the instances.
A --service that does not exist on the host is an error before any change.
There the default --port is the port the instance's [cura_connection] sets,
else one no other instance's [cura_connection] uses (8080, 8081, ...).

Options:
  --klipper-dir DIR      Klipper checkout (default: ~/klipper)
  --klippy-env DIR       Klippy's Python venv (default: ~/klippy-env)
  --config-dir DIR       printer.cfg / moonraker.conf folder of the Klipper
                         instance (default: the only instance's, e.g.
                         ~/printer_data/config; with several: see above)
  --charon-dir DIR       libcharon's package folder of an installed python3-charon
                         (default, or env CHARON_DIR:
                         /usr/lib/python3/dist-packages/Charon)
  --nginx-dir DIR        nginx configuration folder (default: /etc/nginx)
  --port N               port of the module's HTTP server, as set in
                         [cura_connection] (default: 8080; with several
                         instances see above)
  --service NAME         systemd unit of that Klipper instance (default: the
                         one KIAUH names for it: klipper, klipper-2, ...)
  --all-instances        also add (or with --uninstall remove) the
                         [update_manager cura_connection] section in the
                         moonraker.conf of every other instance
  --no-port80            leave port 80 alone (no nginx include, no iptables rule)
  --no-restart           do not restart Klipper at the end
  --uninstall            remove everything this script added (pip packages
                         stay in the venv); with several instances: the
                         chosen instance's moonraker.conf section, and the
                         shared parts (steps 1-4) unless another instance
                         still has [cura_connection]
  --dry-run-privileged   print the commands that need root ("would run: ...")
                         instead of running them, and keep the files it would
                         write as root in a folder it names; the other steps
                         (the choice of instance too) are done. Same as
                         CURA_INSTALL_DRY_RUN=1.
  -h, --help             show this help
EOF
}

say()  { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

need_arg() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "option $1 needs a value (see --help)"; fi; }
while [ $# -gt 0 ]; do
    case "$1" in
        --klipper-dir) need_arg "$@"; KLIPPER_DIR=$2; shift 2 ;;
        --klippy-env)  need_arg "$@"; KLIPPY_ENV=$2; shift 2 ;;
        --config-dir)  need_arg "$@"; CONFIG_DIR=$2; shift 2 ;;
        --charon-dir)  need_arg "$@"; CHARON_DIR=$2; shift 2 ;;
        --nginx-dir)   need_arg "$@"; NGINX_DIR=${2%/}; shift 2 ;;
        --port)        need_arg "$@"; PORT=$2; PORT_SET=1; shift 2 ;;
        --service)     need_arg "$@"; SERVICE=${2%.service}; shift 2 ;;
        --all-instances) ALL_INSTANCES=1; shift ;;
        --no-port80)   DO_PORT80=0; shift ;;
        --no-restart)  DO_RESTART=0; shift ;;
        --uninstall)   UNINSTALL=1; shift ;;
        --dry-run-privileged) DRY_RUN=1; shift ;;
        -h|--help)     usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    die "--port must be a TCP port number, got '$PORT'"
fi
[[ -z "$SERVICE" || "$SERVICE" =~ ^[A-Za-z0-9@._:-]+$ ]] || die "--service: '$SERVICE' is not a systemd unit name"
[ "$PORT" != 80 ] || die "--port 80: Klippy does not run as root, so the module cannot listen on port 80; keep the default 8080 and let install.sh route port 80 to it"
if [ "$(id -u)" -eq 0 ] && [ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ]; then
    die "run install.sh as $SUDO_USER, without sudo: it asks for sudo itself where needed"
fi

TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

# ---------------------------------------------------------------------------
# Privileged commands: the only way this script runs anything as root.
# ---------------------------------------------------------------------------
quote() { local out="" a; for a in "$@"; do out+="${out:+ }$(printf '%q' "$a")"; done; printf '%s' "$out"; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        command -v sudo >/dev/null || die "this step needs root and sudo is not installed: $(quote "$@")"
        sudo "$@"
    fi
}

# priv CMD...: run CMD as root, or print it in a dry run.
priv() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'would run: %s\n' "$(quote "$@")"
        return 0
    fi
    as_root "$@"
}

# priv_check CMD...: a root-only yes/no question (iptables -C). A dry run prints
# it and answers "no", so the command that would follow is printed too.
priv_check() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'would check: %s\n' "$(quote "$@")"
        return 1
    fi
    as_root "$@" >/dev/null 2>&1
}

# System configuration files (under the nginx dir) are changed directly when we
# may write them (root, or a writable non-/etc folder such as a test's), else
# with sudo. A dry run never touches anything under /etc.
can_write() {
    local p=$1
    if [ "$DRY_RUN" = 1 ]; then
        case "$p" in /etc|/etc/*) return 1 ;; esac
    fi
    if [ -e "$p" ]; then [ -w "$p" ]; else [ -w "$(dirname "$p")" ]; fi
}
sys_do() {   # PATH CMD...: run a command that changes PATH
    local p=$1; shift
    if can_write "$p"; then "$@"; else priv "$@"; fi
}
# sys_put SRC DEST: make DEST's content SRC's. An existing DEST keeps its owner
# and mode (cp writes into it); a new one is created 0644. A dry run that may
# not write DEST keeps SRC in DRY_DIR, so the printed command names a file the
# user can read.
DRY_DIR=""
sys_put() {
    local src=$1
    if [ "$DRY_RUN" = 1 ] && ! can_write "$2"; then
        [ -n "$DRY_DIR" ] || DRY_DIR=$(mktemp -d "${TMPDIR:-/tmp}/cura_connection-dry-run.XXXXXX")
        src="$DRY_DIR/$(basename "$2")"
        cp "$1" "$src"
    fi
    if [ -e "$2" ]; then sys_do "$2" cp "$src" "$2"; else sys_do "$2" install -m 0644 "$src" "$2"; fi
}

APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" = 0 ] || return 0
    APT_UPDATED=1
    priv apt-get update -q || warn "apt-get update failed (see above; offline?): going on with the package lists this machine has"
}
apt_install() {
    apt_update
    priv env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" \
        || die "apt-get could not install $* (see its words above). That needs this machine's Debian package mirror: check the network connection (offline?) and run install.sh again"
}

have() {   # have CMD: on PATH, or in an sbin folder a normal user's PATH may lack
    PATH="$PATH${SBIN_DIRS:+:$SBIN_DIRS}" command -v "$1" >/dev/null 2>&1
}

# Keeps a file's "no newline at end" state when a line-based tool rewrote it.
match_final_newline() {   # ORIGINAL REWRITTEN
    if [ -s "$1" ] && [ -n "$(tail -c1 "$1")" ] && [ -s "$2" ] && [ -z "$(tail -c1 "$2")" ]; then
        truncate -s -1 "$2"
    fi
}

# ---------------------------------------------------------------------------
# Klipper instances. KIAUH gives each its data folder and services:
# ~/printer_data (klipper, moonraker), ~/printer_<n>_data (klipper-<n>,
# moonraker-<n>), ~/<name>_data (klipper-<name>, ...). All of them share the
# one Klipper checkout and venv, so the module link, libcharon and port 80
# are the host's; moonraker.conf, printer.cfg and the restart are the
# chosen instance's.
# ---------------------------------------------------------------------------
INST_CONFIGS=()    # config folder of each instance found
INST_SUFFIXES=()   # its unit name suffix: "", -2, -voron
INST_NAMES=()      # its name: printer, printer_2, voron
CHOSEN=""          # index of the chosen instance, when it is one of them
MOONRAKER_CONF=""

tildify() {   # PATH, shown with ~ for HOME
    case "$1" in "$HOME"/*) printf '%s/%s' "~" "${1#"$HOME"/}" ;; *) printf '%s' "$1" ;; esac
}

find_instances() {
    local d name
    for d in "$HOME/printer_data" "$HOME"/*_data; do
        if [ ! -f "$d/config/printer.cfg" ] || [ ! -f "$d/config/moonraker.conf" ]; then continue; fi
        name=$(basename "$d")
        name=${name%_data}
        case "$name" in
            printer)   # listed first, then skipped in the glob
                if [ "${#INST_CONFIGS[@]}" != 0 ]; then continue; fi
                INST_SUFFIXES+=("") ;;
            printer_*[!0-9]*|printer_) INST_SUFFIXES+=("-$name") ;;
            printer_*) INST_SUFFIXES+=("-${name#printer_}") ;;
            *) INST_SUFFIXES+=("-$name") ;;
        esac
        INST_CONFIGS+=("$d/config")
        INST_NAMES+=("$name")
    done
}

same_dir() { [ -d "$1" ] && [ -d "$2" ] && [ "$(cd "$1" && pwd -P)" = "$(cd "$2" && pwd -P)" ]; }

instance_index() {   # config|service VALUE -> index of the instance, if any
    local i
    for i in "${!INST_CONFIGS[@]}"; do
        if [ "$1" = config ] && same_dir "$2" "${INST_CONFIGS[i]}"; then echo "$i"; return 0; fi
        if [ "$1" = service ] && [ "$2" = "klipper${INST_SUFFIXES[i]}" ]; then echo "$i"; return 0; fi
    done
    return 1
}

list_instances() {   # [COMMAND]: one line per instance (as a command line when given)
    local i
    for i in "${!INST_CONFIGS[@]}"; do
        if [ -n "${1:-}" ]; then
            printf '    %s --config-dir %s --service %s\n' "$1" "$(tildify "${INST_CONFIGS[i]}")" "klipper${INST_SUFFIXES[i]}"
        else
            printf '    %d) %s  (services klipper%s, moonraker%s)\n' "$((i + 1))" \
                "$(tildify "${INST_CONFIGS[i]}")" "${INST_SUFFIXES[i]}" "${INST_SUFFIXES[i]}"
        fi
    done
}

ask_instance() {   # VERB: on a terminal, the user picks one
    local n=${#INST_CONFIGS[@]} answer
    say "This host runs $n Klipper instances; the module, its venv packages and port 80 are shared, moonraker.conf and the restart are one instance's:"
    list_instances
    while :; do
        printf '%s for which instance? [1-%d] ' "$1" "$n"
        read -r answer || die "no answer: nothing was changed"
        if [[ "$answer" =~ ^[0-9]+$ ]] && [ "$answer" -ge 1 ] && [ "$answer" -le "$n" ]; then break; fi
        info "type a number from 1 to $n"
    done
    CHOSEN=$((answer - 1))
}

# Fails before any change when the service does not exist. Only a plain
# single-instance host without --service/--config-dir is taken on trust, as
# before (its klipper unit is KIAUH's and MainsailOS's default).
check_service() {
    local units
    if ! have systemctl; then
        warn "systemctl not found: cannot check that the service $SERVICE exists"
        return 0
    fi
    if ! units=$(systemctl list-unit-files --no-legend --no-pager --type=service 2>/dev/null); then
        warn "systemctl could not list the services: cannot check that $SERVICE exists"
        return 0
    fi
    # an instance of a template unit (klipper@a) is listed as its template
    if ! awk -v u="$SERVICE.service" -v t="${SERVICE%%@*}@.service" \
            '$1 == u || (index(u, "@") && $1 == t) { found = 1 } END { exit !found }' <<<"$units"; then
        die "there is no service $SERVICE on this host (Klipper services here: $(awk '$1 ~ /^klipper.*\.service$/ { sub(/\.service$/, "", $1); printf "%s%s", sep, $1; sep = ", " } END { if (!sep) printf "none" }' <<<"$units")); nothing was changed. Name the instance's Klipper service with --service"
    fi
}

choose_instance() {   # VERB (Install|Uninstall)
    local n flags=0 cmd="install.sh"
    [ "$UNINSTALL" = 0 ] || cmd="install.sh --uninstall"
    find_instances
    n=${#INST_CONFIGS[@]}
    if [ -n "$CONFIG_DIR" ] || [ -n "$SERVICE" ]; then flags=1; fi
    CONFIG_DIR=${CONFIG_DIR%/}
    if [ -n "$CONFIG_DIR" ]; then
        CHOSEN=$(instance_index config "$CONFIG_DIR") || CHOSEN=""
        if [ -z "$SERVICE" ] && [ -n "$CHOSEN" ]; then
            SERVICE="klipper${INST_SUFFIXES[CHOSEN]}"
        elif [ -z "$SERVICE" ] && [ "$n" -gt 1 ]; then
            die "$CONFIG_DIR is none of this host's Klipper instances: name its Klipper service too (--service)"
        elif [ -z "$SERVICE" ]; then
            SERVICE=klipper
        elif [ -n "$CHOSEN" ] && [ "$SERVICE" != "klipper${INST_SUFFIXES[CHOSEN]}" ]; then
            warn "KIAUH names the Klipper service of $CONFIG_DIR klipper${INST_SUFFIXES[CHOSEN]}; going on with --service $SERVICE"
        fi
    elif [ -n "$SERVICE" ]; then
        if CHOSEN=$(instance_index service "$SERVICE"); then
            CONFIG_DIR=${INST_CONFIGS[CHOSEN]}
        elif [ "$n" -le 1 ]; then
            CHOSEN=""
            CONFIG_DIR=${INST_CONFIGS[0]:-$HOME/printer_data/config}
        else
            {
                printf 'ERROR: no Klipper instance of this host has the service %s; nothing was changed. The instances:\n' "$SERVICE"
                list_instances "$cmd"
            } >&2
            exit 1
        fi
    elif [ "$n" -gt 1 ]; then
        if [ -t 0 ]; then
            ask_instance "$1"
        else
            {
                printf 'ERROR: this host runs %d Klipper instances; nothing was changed. Choose one:\n' "$n"
                list_instances "$cmd"
                printf '(--config-dir alone or --service alone is enough for these)\n'
            } >&2
            exit 1
        fi
    elif [ "$n" = 1 ]; then
        CHOSEN=0
    else
        CONFIG_DIR="$HOME/printer_data/config"
        SERVICE=klipper
    fi
    if [ -n "$CHOSEN" ]; then
        CONFIG_DIR=${CONFIG_DIR:-${INST_CONFIGS[CHOSEN]}}
        SERVICE=${SERVICE:-klipper${INST_SUFFIXES[CHOSEN]}}
    fi
    MOONRAKER_CONF="$CONFIG_DIR/moonraker.conf"
    if [ "$flags" = 1 ] || [ "$n" -gt 1 ] || [ "$SERVICE" != klipper ]; then
        check_service
    fi
    if [ "$n" -gt 1 ]; then
        say "Klipper instance: $(tildify "$CONFIG_DIR") (service $SERVICE)"
    fi
    if [ "$n" -gt 1 ] && [ "$PORT_SET" = 0 ] && [ "$UNINSTALL" = 0 ]; then
        pick_port
    fi
}

others() {   # indexes of the instances other than the chosen one
    local i
    for i in "${!INST_CONFIGS[@]}"; do
        [ "$i" = "$CHOSEN" ] || echo "$i"
    done
}

section_port() {   # FILE SECTION DEFAULT -> the port: that [SECTION] of FILE sets, else DEFAULT
    awk -v h="[$2]" -v d="$3" '/^\[/ { in_s = (substr($0, 1, length(h)) == h) }
         in_s && /^port[ \t]*[:=]/ { sub(/^port[ \t]*[:=][ \t]*/, ""); sub(/[ \t#;].*/, ""); p = $0 }
         END { print (p ~ /^[0-9]+$/ ? p : d) }' "$1"
}

instance_port() {   # CONFIG_DIR -> the port its [cura_connection] sets (8080 by default); nothing without one
    local f
    f=$(grep -Rls --include='*.cfg' '^\[cura_connection\]' "$1" 2>/dev/null | head -n1) || true
    [ -n "$f" ] || return 0
    section_port "$f" cura_connection 8080
}

# Each instance needs its own port: default --port is the chosen instance's
# own, else the first from 8080 that no other instance's [cura_connection] uses.
pick_port() {
    local own used="" i
    own=$(instance_port "$CONFIG_DIR")
    # "port: 0" (any free port) is one port 80 cannot follow
    if [ -n "$own" ] && [ "$own" -ge 1 ] && [ "$own" -le 65535 ] && [ "$own" != 80 ]; then
        PORT=$own
        return 0
    fi
    for i in $(others); do used+=" $(instance_port "${INST_CONFIGS[i]}")"; done
    PORT=8080
    while [[ " $used " == *" $PORT "* ]]; do PORT=$((PORT + 1)); done
}

# ---------------------------------------------------------------------------
# 1. Module link
# ---------------------------------------------------------------------------
klipper_exclude_file() {   # prints the Klipper checkout's .git/info/exclude, if any
    local p top
    top=$(git -C "$KLIPPER_DIR" rev-parse --show-toplevel 2>/dev/null) || return 1
    [ "$top" = "$(cd "$KLIPPER_DIR" && pwd -P)" ] || return 1
    p=$(git -C "$KLIPPER_DIR" rev-parse --git-path info/exclude) || return 1
    case "$p" in /*) ;; *) p="$KLIPPER_DIR/$p" ;; esac
    printf '%s\n' "$p"
}

install_module() {
    local extras="$KLIPPER_DIR/klippy/extras" link exclude old
    say "Linking the module into Klipper"
    [ -f "$MODULE" ] || die "$MODULE not found: run install.sh from a complete cura_connection checkout"
    [ -d "$extras" ] || die "$extras not found: is Klipper installed in $KLIPPER_DIR? (use --klipper-dir)"
    link="$extras/cura_connection.py"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$MODULE" ]; then
        info "$link already links to $MODULE"
    elif [ -L "$link" ]; then
        old=$(readlink "$link")
        ln -sfn "$MODULE" "$link"
        info "$link now links to $MODULE (was $old)"
    elif [ -e "$link" ]; then
        die "$link exists and is not a link: move it away, then run install.sh again"
    else
        ln -s "$MODULE" "$link"
        info "$link -> $MODULE"
    fi
    # Moonraker flags untracked .py files in the Klipper repo as an anomaly.
    if exclude=$(klipper_exclude_file); then
        if ! grep -qxF "$MODULE_REL" "$exclude" 2>/dev/null; then
            mkdir -p "$(dirname "$exclude")"
            printf '%s\n' "$MODULE_REL" >>"$exclude"
            info "added $MODULE_REL to $exclude (keeps Klipper's git status clean)"
        fi
    fi
}

remove_our_link() {   # link, target it must point at, say-function, note
    if [ -L "$1" ] && [ "$(readlink "$1")" = "$2" ]; then
        rm -f "$1"
        info "removed $1"
    elif [ -e "$1" ] || [ -L "$1" ]; then
        "$3" "$1 is not a link to $2; left alone"
    else
        info "$4"
    fi
}

uninstall_module() {
    local link="$KLIPPER_DIR/klippy/extras/cura_connection.py" exclude
    say "Removing the module link"
    remove_our_link "$link" "$MODULE" warn "no link in $KLIPPER_DIR/klippy/extras"
    if exclude=$(klipper_exclude_file) && grep -qxF "$MODULE_REL" "$exclude" 2>/dev/null; then
        grep -vxF "$MODULE_REL" "$exclude" >"$TMPD/exclude" || true
        match_final_newline "$exclude" "$TMPD/exclude"
        cat "$TMPD/exclude" >"$exclude"
        info "removed $MODULE_REL from $exclude"
    fi
}

# ---------------------------------------------------------------------------
# 2./3. Klippy venv: pip requirements and libcharon
# ---------------------------------------------------------------------------
VENV_PY=""
check_venv() {
    VENV_PY="$KLIPPY_ENV/bin/python"
    [ -x "$VENV_PY" ] || die "$VENV_PY not found: is Klippy's venv at $KLIPPY_ENV? (use --klippy-env)"
    KLIPPY_ENV=$(cd "$KLIPPY_ENV" && pwd)   # absolute, for moonraker.conf
    VENV_PY="$KLIPPY_ENV/bin/python"
    "$VENV_PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 8) else 1)' \
        || die "$KLIPPY_ENV runs $("$VENV_PY" -V 2>&1); cura_connection needs Python 3.8 or newer (rebuild Klippy's venv with Python 3, e.g. with KIAUH)"
}

venv_site() {
    "$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'
}

install_requirements() {
    say "Installing Python requirements into $KLIPPY_ENV"
    "$VENV_PY" -m pip install --disable-pip-version-check -r "$REQUIREMENTS"
}

# libcharon.sh downloads python3-charon (no root needed) when it is not
# installed; stale package lists get one refresh and a second try.
install_charon() {
    local rc=0
    say "Making libcharon importable in $KLIPPY_ENV"
    CHARON_DIR=$CHARON_DIR bash "$LIBCHARON_SH" "$KLIPPY_ENV" || rc=$?
    if [ "$rc" = 2 ] && [ "$DRY_RUN" = 0 ] && [ "$APT_UPDATED" = 0 ]; then
        info "refreshing the package lists, then trying again"
        apt_update
        rc=0
        CHARON_DIR=$CHARON_DIR bash "$LIBCHARON_SH" "$KLIPPY_ENV" || rc=$?
    fi
    [ "$rc" = 0 ] || die "libcharon is not installed (see above), so the module could not read UFP files: run install.sh again once that is solved"
}

uninstall_charon() {
    local link own
    say "Removing the libcharon link from $KLIPPY_ENV"
    if [ ! -x "$KLIPPY_ENV/bin/python" ]; then
        info "no venv at $KLIPPY_ENV"
        return 0
    fi
    VENV_PY="$KLIPPY_ENV/bin/python"
    link="$(venv_site)/Charon"
    own="$(cd "$KLIPPY_ENV" && pwd)/share/cura_connection"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$own/Charon" ]; then
        remove_our_link "$link" "$own/Charon" info ""
    else
        remove_our_link "$link" "$CHARON_DIR" info "no Charon link in the venv"
    fi
    if [ -d "$own" ]; then
        rm -rf "$own"
        info "removed $own (libcharon unpacked by install.sh)"
    fi
    info "pip packages from klippy_extras/requirements.txt stay installed in $KLIPPY_ENV"
    info "(zeroconf, python-multipart, defusedxml; remove them with pip if nothing else needs them)"
}

# ---------------------------------------------------------------------------
# 4. Port 80
# ---------------------------------------------------------------------------
SNIPPET="$NGINX_DIR/snippets/cura_connection.conf"
INCLUDE_LINE="include $SNIPPET; # $MARK"

nginx_site_files() {   # files nginx reads that may hold server blocks
    local f
    for f in "$NGINX_DIR"/sites-enabled/* "$NGINX_DIR"/conf.d/*.conf "$NGINX_DIR"/nginx.conf; do
        if [ -f "$f" ]; then printf '%s\n' "$f"; fi
    done
}

# Prints, for each server block in a file that listens on port 80 and does not
# include our snippet yet, "LISTEN_LINE:CLOSING_LINE": the number of its first
# "listen ... 80" line (for the indentation) and of the line that closes it
# (the include goes right before that). Counts braces with comments stripped;
# "server {" may be split over two lines.
# shellcheck disable=SC2016
NGINX_AWK='
function start_server(d) { in_srv = 1; srv_depth = d; listen80 = 0; marked = 0 }
{
    code = $0; sub(/#.*/, "", code)
    d0 = depth
    opens = gsub(/[{]/, "{", code); closes = gsub(/[}]/, "}", code)
    if (!in_srv) {
        if (pending && code ~ /^[ \t]*[{]/) start_server(d0)
        else if (code ~ /^[ \t]*server[ \t]*[{]/) start_server(d0)
        if (code ~ /^[ \t]*server[ \t]*$/) pending = 1
        else if (code !~ /^[ \t]*$/) pending = 0
    } else {
        if (index($0, mark)) marked = 1
        if (d0 == srv_depth + 1 && !listen80 &&
            code ~ /^[ \t]*listen[ \t]+([^ \t;]*:)?80([ \t;]|$)/) listen80 = NR
    }
    depth = d0 + opens - closes
    if (in_srv && depth <= srv_depth) {
        if (listen80 && !marked) print listen80 ":" NR
        in_srv = 0
    }
}'
nginx_port80_blocks() {   # FILE -> "LISTEN:CLOSE" pairs, space separated
    awk -v mark="$MARK" "$NGINX_AWK" "$1" | tr '\n' ' '
}

nginx_serves_port80() {   # a port-80 server block, or one we already changed
    local f
    while IFS= read -r f; do
        if [ -n "$(nginx_port80_blocks "$f")" ] || grep -qF "$MARK" "$f"; then return 0; fi
    done < <(nginx_site_files)
    return 1
}

write_snippet() {   # DEST
    local loc
    cat >"$1" <<EOF
# Ultimaker Cura's "print over network" requests -> cura_connection (Klipper
# extra) on port $PORT. Written by cura_connection's install.sh, which includes
# this file in the nginx server block listening on port 80; "install.sh
# --uninstall" removes both. "^~" and "=" locations win over Moonraker's
# "location ~ ^/(printer|api|access|machine|server)/" wherever they stand.
EOF
    for loc in "^~ /api/v1/" "^~ /cluster-api/" "= /print_jobs" "^~ /print_jobs/" "= /printers" "^~ /printers/"; do
        cat >>"$1" <<EOF

location $loc {
    proxy_pass http://127.0.0.1:$PORT;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host \$http_host;
    proxy_set_header X-Real-IP \$remote_addr;
    proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto \$scheme;
    proxy_set_header X-Forwarded-Host \$http_host;
    # print jobs arrive in one upload: no size limit, streamed through
    client_max_body_size 0;
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_send_timeout 600s;
    proxy_read_timeout 600s;
}
EOF
    done
}

nginx_test_and_reload() {
    if [ "$DRY_RUN" = 0 ] && ! have nginx; then
        warn "nginx is not installed, so its configuration is neither tested nor reloaded"
        return 0
    fi
    local conf=()
    if [ -f "$NGINX_DIR/nginx.conf" ]; then conf=(-c "$NGINX_DIR/nginx.conf"); fi
    priv nginx -t "${conf[@]}" || return 1
    priv systemctl reload nginx || warn "could not reload nginx: run 'sudo systemctl reload nginx'"
}

# Reports a change to PATH: DONE when it was made, WOULD when a dry run only
# printed the command.
report() {   # PATH DONE WOULD
    if can_write "$1"; then info "$2"; else info "$3"; fi
}

port80_nginx() {
    local f real blocks n=0 snippet_existed=0 pair
    local -a changed=()
    say "nginx serves port 80: routing Cura's paths to port $PORT there"
    write_snippet "$TMPD/snippet.conf"
    if [ -f "$SNIPPET" ] && cmp -s "$TMPD/snippet.conf" "$SNIPPET"; then
        info "$SNIPPET is up to date"
    else
        [ -e "$SNIPPET" ] && snippet_existed=1
        [ -d "$(dirname "$SNIPPET")" ] || sys_do "$(dirname "$SNIPPET")" mkdir -p "$(dirname "$SNIPPET")"
        sys_put "$TMPD/snippet.conf" "$SNIPPET"
        report "$SNIPPET" "wrote $SNIPPET" "would write $SNIPPET with these locations to http://127.0.0.1:$PORT:"
        can_write "$SNIPPET" || sed -n 's/^location \(.*\) {$/      location \1/p' "$TMPD/snippet.conf"
    fi
    while IFS= read -r f; do
        blocks=$(nginx_port80_blocks "$f")
        if [ -z "$blocks" ]; then
            if grep -qF "$MARK" "$f"; then info "$f already includes the snippet"; fi
            continue
        fi
        real=$(readlink -f "$f")   # sites-enabled/x is usually a link to sites-available/x
        n=$((n + 1))
        cp "$real" "$TMPD/orig.$n"
        # the include goes last in each such server block, indented like its "listen"
        awk -v blocks="$blocks" -v inc="$INCLUDE_LINE" '
            BEGIN {
                k = split(blocks, b, " ")
                for (i = 1; i <= k; i++) { split(b[i], lc, ":"); listen[lc[1]] = lc[2] }
            }
            (NR in listen) { match($0, /^[ \t]*/); indent[listen[NR]] = substr($0, 1, RLENGTH) }
            (NR in indent) { print indent[NR] inc }
            { print }
        ' "$real" >"$TMPD/new.$n"
        match_final_newline "$real" "$TMPD/new.$n"
        sys_put "$TMPD/new.$n" "$real"
        changed+=("$TMPD/orig.$n|$real")
        report "$real" "added '$INCLUDE_LINE' to the port-80 server block of $real" \
            "would add '$INCLUDE_LINE' to the port-80 server block of $real"
    done < <(nginx_site_files)
    if ! nginx_test_and_reload; then
        for pair in "${changed[@]}"; do sys_put "${pair%%|*}" "${pair#*|}"; done
        [ "$snippet_existed" = 1 ] || sys_do "$SNIPPET" rm -f "$SNIPPET"
        die "nginx rejected the configuration (see above); its files are restored. Use --no-port80 to skip this step."
    fi
    # A redirect left by an earlier install without nginx would hide the web UI.
    remove_redirects all
}

uninstall_nginx() {
    local f real n=0 touched=0
    say "Removing the nginx include"
    while IFS= read -r f; do
        grep -qF "$MARK" "$f" || continue
        real=$(readlink -f "$f")
        n=$((n + 1))
        grep -vF "$MARK" "$real" >"$TMPD/un.$n" || true
        match_final_newline "$real" "$TMPD/un.$n"
        sys_put "$TMPD/un.$n" "$real"
        report "$real" "removed the include from $real" "would remove the include from $real"
        touched=1
    done < <(nginx_site_files)
    if [ -e "$SNIPPET" ]; then
        sys_do "$SNIPPET" rm -f "$SNIPPET"
        report "$SNIPPET" "removed $SNIPPET" "would remove $SNIPPET"
        touched=1
    fi
    if [ "$touched" = 1 ]; then
        nginx_test_and_reload || warn "nginx -t fails after removing the include: check the nginx configuration"
    else
        info "nothing of cura_connection in $NGINX_DIR"
    fi
}

# Our iptables rule carries a comment, so it is found again without touching
# anyone else's rules.
# (set once the port is known: see choose_instance)
RULE=()
set_rule() { RULE=(-p tcp --dport 80 -m comment --comment "$RULE_TAG" -j REDIRECT --to-ports "$PORT"); }

iptables_cmds() {   # the installed iptables commands
    if have iptables; then echo iptables; fi
    if have ip6tables; then echo ip6tables; fi
}

iptables_save() {
    if have netfilter-persistent || [ "$DRY_RUN" = 1 ]; then
        priv netfilter-persistent save || warn "netfilter-persistent save failed: the change will not survive a reboot"
    else
        warn "netfilter-persistent is not installed: the change will not survive a reboot"
    fi
}

# Deletes our PREROUTING rules: all of them, or (stale) those that redirect to
# a port other than --port.
remove_redirects() {   # all|stale
    local mode=$1 bin line listing removed=0
    local -a words
    for bin in $(iptables_cmds); do
        if [ "$DRY_RUN" = 1 ]; then
            printf 'would run: %s\n' "$(quote "$bin" -t nat -S PREROUTING)"
            if [ "$mode" = all ]; then
                printf 'would run: %s   (for each rule tagged %s)\n' \
                    "$(quote "$bin" -t nat -D PREROUTING "${RULE[@]}")" "$RULE_TAG"
            fi
            continue
        fi
        listing=$(as_root "$bin" -t nat -S PREROUTING 2>/dev/null) || listing=""
        while IFS= read -r line; do
            case "$line" in "-A PREROUTING "*"--comment $RULE_TAG "*) ;; *) continue ;; esac
            if [ "$mode" = stale ] && [[ "$line" == *"--to-ports $PORT" ]]; then continue; fi
            read -ra words <<<"$line"
            words[0]="-D"
            if as_root "$bin" -t nat "${words[@]}"; then
                info "$bin: removed '${line#-A }'"
                removed=1
            fi
        done <<<"$listing"
    done
    if [ "$removed" = 1 ]; then iptables_save; fi
}

port80_iptables() {
    local bin cmds added=0
    say "nginx does not serve port 80: redirecting port 80 to $PORT with iptables"
    if ! have iptables || ! have netfilter-persistent; then
        info "installing iptables and iptables-persistent"
        apt_install iptables iptables-persistent
    fi
    if have ss && [ -n "$(ss -Hltn 'sport = :80' 2>/dev/null)" ]; then
        warn "another program listens on port 80; the redirect hides it from the network"
    fi
    cmds=$(iptables_cmds)
    if [ -z "$cmds" ]; then
        # only in a dry run, where the packages above were not installed
        [ "$DRY_RUN" = 1 ] || die "iptables is missing after installing it"
        cmds="iptables ip6tables"
    fi
    remove_redirects stale
    for bin in $cmds; do
        if priv_check "$bin" -t nat -C PREROUTING "${RULE[@]}"; then
            info "$bin: redirect 80 -> $PORT is already there"
        elif priv "$bin" -t nat -A PREROUTING "${RULE[@]}"; then
            added=1
            [ "$DRY_RUN" = 1 ] || info "$bin: added redirect 80 -> $PORT"
        elif [ "$bin" = ip6tables ]; then
            warn "ip6tables could not add the redirect (no IPv6 nat here?); Cura uses IPv4 anyway"
        else
            die "iptables could not add the redirect"
        fi
    done
    # saving persists the whole current rule set, so only when ours changed
    if [ "$added" = 1 ]; then iptables_save; fi
    info "PREROUTING does not see connections made from this host: test port 80 from another machine"
}

install_port80() {
    if [ "$DO_PORT80" = 0 ]; then
        say "Port 80: skipped (--no-port80); Cura only talks to port 80, so route it to $PORT yourself"
        return 0
    fi
    if [ "${#INST_CONFIGS[@]}" -gt 1 ]; then
        say "Port 80 (one per host) leads to $SERVICE's cura_connection on port $PORT; Cura reaches the other instances at <address>:<their port>"
    fi
    if nginx_serves_port80 && { [ "$DRY_RUN" = 1 ] || have nginx; }; then
        port80_nginx
    else
        port80_iptables
    fi
}

uninstall_port80() {
    if [ "$DO_PORT80" = 0 ]; then
        say "Port 80: skipped (--no-port80)"
        return 0
    fi
    uninstall_nginx
    say "Removing the iptables redirect"
    if [ -z "$(iptables_cmds)" ]; then
        info "iptables is not installed: there is no rule to remove"
    else
        remove_redirects all
    fi
}

# ---------------------------------------------------------------------------
# 5. Moonraker update manager
# ---------------------------------------------------------------------------
# Prints a moonraker.conf without our marked block (and the blank line before it).
moonraker_without_block() {   # CONF
    awk -v begin="$MR_BEGIN" -v end="$MR_END" '
        skip { if ($0 == end) skip = 0; next }
        $0 == begin { skip = 1; held = 0; next }
        { if (held) { print ""; held = 0 } if ($0 == "") { held = 1; next } print }
        END { if (held) print "" }
    ' "$1"
}

# "managed_services: klipper" is each Moonraker's own Klipper unit
# (klipper-2 for moonraker-2): Moonraker maps the name to its instance's.
moonraker_section() {   # ORIGIN
    cat <<EOF
[update_manager cura_connection]
type: git_repo
path: $REPO
origin: $1
primary_branch: main
virtualenv: $KLIPPY_ENV
requirements: klippy_extras/requirements.txt
install_script: install.sh
managed_services: klipper
EOF
}

ORIGIN=""
moonraker_origin() {   # sets ORIGIN; fails (and says why) without one
    if ! ORIGIN=$(git -C "$REPO" remote get-url origin 2>/dev/null) || [ -z "$ORIGIN" ]; then
        info "$REPO has no git remote 'origin', so Moonraker could not update it: skipped"
        info "(clone cura_connection with git and run install.sh again to get updates in Mainsail/Fluidd)"
        return 1
    fi
}

install_moonraker_conf() {   # CONF
    local mconf=$1 new="$TMPD/moonraker.conf"
    if [ ! -f "$mconf" ]; then
        info "no $mconf: skipped"
        return 0
    fi
    if grep -q '^\[update_manager cura_connection\]' "$mconf" && ! grep -qxF "$MR_BEGIN" "$mconf"; then
        info "$mconf already has [update_manager cura_connection] (not written by install.sh): left alone"
        return 0
    fi
    moonraker_without_block "$mconf" >"$new"
    if [ -s "$new" ]; then
        if [ -n "$(tail -c1 "$new")" ]; then printf '\n\n' >>"$new"; else printf '\n' >>"$new"; fi
    fi
    { echo "$MR_BEGIN"; moonraker_section "$ORIGIN"; echo "$MR_END"; } >>"$new"
    if cmp -s "$new" "$mconf"; then
        info "$mconf already has the section"
    else
        cat "$new" >"$mconf"
        info "added to $mconf (restart Moonraker to see it):"
        awk -v b="$MR_BEGIN" -v e="$MR_END" '$0 == b { p = 1 } p { print "      " $0 } $0 == e { p = 0 }' "$mconf"
    fi
}

install_moonraker() {
    local i
    say "Moonraker update manager"
    if [ ! -f "$MOONRAKER_CONF" ]; then
        info "no $MOONRAKER_CONF: skipped"
        return 0
    fi
    moonraker_origin || return 0
    install_moonraker_conf "$MOONRAKER_CONF"
    [ "${#INST_CONFIGS[@]}" -gt 1 ] || return 0
    if [ "$ALL_INSTANCES" = 1 ]; then
        for i in $(others); do install_moonraker_conf "${INST_CONFIGS[i]}/moonraker.conf"; done
        return 0
    fi
    info "the other instances' Moonrakers can offer cura_connection's updates too (each then"
    info "restarts its own Klipper after one): add this section to"
    for i in $(others); do info "  $(tildify "${INST_CONFIGS[i]}/moonraker.conf")"; done
    info "or run install.sh again with --all-instances:"
    moonraker_section "$ORIGIN" | sed 's/^/      /'
}

uninstall_moonraker_conf() {   # CONF
    if [ ! -f "$1" ] || ! grep -qxF "$MR_BEGIN" "$1"; then
        info "no section added by install.sh in $1"
        return 0
    fi
    moonraker_without_block "$1" >"$TMPD/moonraker.conf"
    cat "$TMPD/moonraker.conf" >"$1"
    info "removed [update_manager cura_connection] from $1"
}

uninstall_moonraker() {
    local i conf
    say "Moonraker update manager"
    uninstall_moonraker_conf "$MOONRAKER_CONF"
    for i in $(others); do
        conf="${INST_CONFIGS[i]}/moonraker.conf"
        if [ "$ALL_INSTANCES" = 1 ]; then
            uninstall_moonraker_conf "$conf"
        elif grep -qxF "$MR_BEGIN" "$conf"; then
            info "$conf keeps the section install.sh added (--uninstall --all-instances removes it too)"
        fi
    done
}

# ---------------------------------------------------------------------------
# 6./7. printer.cfg and Klipper restart
# ---------------------------------------------------------------------------
config_has_section() {   # NAME [DIR]: is [NAME] in printer.cfg or a .cfg file next to it?
    local dir=${2:-$CONFIG_DIR}
    [ -d "$dir" ] && grep -Rqs --include='*.cfg' "^\\[$1\\]" "$dir"
}

# The other instances whose [cura_connection] uses PORT, as "klipper-1 ..."
port_taken_by() {
    local i out=""
    for i in $(others); do
        if [ "$(instance_port "${INST_CONFIGS[i]}")" = "$PORT" ]; then out+=" klipper${INST_SUFFIXES[i]}"; fi
    done
    printf '%s' "${out# }"
}

check_printer_cfg() {
    local own taken=""
    say "printer.cfg"
    [ "${#INST_CONFIGS[@]}" -le 1 ] || taken=$(port_taken_by)
    if config_has_section cura_connection; then
        info "[cura_connection] is configured in $CONFIG_DIR"
        own=$(instance_port "$CONFIG_DIR")
        if [ "${#INST_CONFIGS[@]}" -gt 1 ] && [ "$own" != "$PORT" ]; then
            if [ "$own" -ge 1 ] && [ "$own" -le 65535 ] && [ "$own" != 80 ]; then
                warn "its port is $own, but port 80 now leads to $PORT: run install.sh again with --port $own"
            else
                warn "its port is $own, which port 80 cannot lead to: set port: $PORT there"
            fi
        fi
    elif [ "${#INST_CONFIGS[@]}" -gt 1 ]; then
        info "add this to $CONFIG_DIR/printer.cfg to enable the module; each Klipper"
        info "instance on this host needs a port of its own:"
        echo
        echo "    [cura_connection]"
        echo "    port: $PORT"
        echo
    else
        info "add this to $CONFIG_DIR/printer.cfg to enable the module:"
        echo
        echo "    [cura_connection]"
        if [ "$PORT" = 8080 ]; then echo "    #port: 8080"; else echo "    port: $PORT"; fi
        echo
    fi
    if [ -n "$taken" ]; then
        warn "port $PORT is already the [cura_connection] port of $taken: give this instance another one (install.sh --port N and port: N)"
    fi
    if ! config_has_section virtual_sdcard; then
        info "cura_connection stores uploads in the [virtual_sdcard] path; add one, e.g.:"
        echo
        echo "    [virtual_sdcard]"
        echo "    path: $(tildify "$(dirname "$CONFIG_DIR")/gcodes")"
        echo
    fi
}

# The other instances as group members of this one, reached through their
# Moonraker ([server] port:, 7125 by default) on this host. Printed only:
# a group is the user's choice.
group_hint() {
    local i name names=" " line=""
    for i in $(others); do
        if same_dir "${INST_CONFIGS[i]}" "$CONFIG_DIR"; then continue; fi
        # a member's name: letters, digits, - _ . (a letter or digit first)
        name=$(printf '%s' "${INST_NAMES[i]}" | tr -c 'A-Za-z0-9_.-' '_' | sed 's/^[^A-Za-z0-9]*//' | cut -c1-60)
        [ -n "$name" ] || name="printer_$((i + 1))"
        while [[ "$names" == *" $name "* ]]; do name="${name}_$((i + 1))"; done
        names+="$name "
        line+="${line:+, }$name=http://127.0.0.1:$(section_port "${INST_CONFIGS[i]}/moonraker.conf" server 7125)"
    done
    [ -n "$line" ] || return 0
    say "One Cura group (optional)"
    info "for Cura to see this host's other Klipper instances as one group with this one,"
    info "add this line under [cura_connection] in $(tildify "$CONFIG_DIR")/printer.cfg:"
    echo
    echo "    group_printers: $line"
    echo
}

restart_klipper() {
    if [ "$DO_RESTART" = 0 ]; then
        say "Not restarting Klipper (--no-restart): restart it to load the module"
        return 0
    fi
    if [ "$SERVICE" = klipper ]; then say "Restarting Klipper"; else say "Restarting Klipper ($SERVICE)"; fi
    priv systemctl restart "$SERVICE" || warn "could not restart $SERVICE: restart Klipper yourself"
}

# ---------------------------------------------------------------------------
finish() {   # installed|uninstalled
    if [ "$DRY_RUN" = 0 ]; then
        say "cura_connection is $1"
        return 0
    fi
    if [ -n "$DRY_DIR" ]; then
        info "the files the commands above would copy are kept in $DRY_DIR"
    fi
    say "Dry run: cura_connection would be $1 once the 'would run' commands above are run as root (or run install.sh without --dry-run-privileged)"
}

# The other instances that still load the module (the link is theirs too)
configured_others() {
    local i out=""
    for i in $(others); do
        if config_has_section cura_connection "${INST_CONFIGS[i]}"; then out+=" klipper${INST_SUFFIXES[i]}"; fi
    done
    printf '%s' "${out# }"
}

main() {
    local users
    if [ "$DRY_RUN" = 1 ]; then say "Dry run: commands that need root are printed, not run"; fi
    if [ "$UNINSTALL" = 1 ]; then choose_instance Uninstall; else choose_instance Install; fi
    set_rule
    if [ "$UNINSTALL" = 1 ]; then
        users=$(configured_others)
        if [ -n "$users" ]; then
            say "Keeping the module link, libcharon and port 80: $users still load cura_connection"
            info "(remove [cura_connection] there and run install.sh --uninstall for it to remove them)"
        else
            uninstall_module
            uninstall_charon
            uninstall_port80
        fi
        uninstall_moonraker
        if config_has_section cura_connection; then
            warn "[cura_connection] is still in $CONFIG_DIR: remove it, or Klipper will not start without the module"
            [ "$DO_RESTART" = 0 ] || say "Not restarting Klipper until that section is removed"
        else
            restart_klipper
        fi
        finish uninstalled
        return 0
    fi
    install_module
    check_venv
    install_requirements
    install_charon
    install_port80
    install_moonraker
    check_printer_cfg
    group_hint
    restart_klipper
    finish installed
}

main
