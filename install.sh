#!/usr/bin/env bash
# Installs (or with --uninstall removes) the cura_connection Klipper extra on a
# Klipper host (Raspberry Pi OS / Debian, KIAUH or MainsailOS layout).
# Run it as the user that runs Klipper; it calls sudo itself for the few steps
# that need root. Running it again is safe: every step checks before it acts.
# See --help for the steps and options.
set -euo pipefail

# Moonraker's update manager reads this line (install_script) to learn which
# Debian packages the extension needs.
PKGLIST="python3-charon"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
MODULE="$REPO/klippy_extras/cura_connection.py"
REQUIREMENTS="$REPO/klippy_extras/requirements.txt"
MODULE_REL="klippy/extras/cura_connection.py"   # inside the Klipper checkout
MARK="cura_connection install.sh"               # tags lines we add to shared files
MR_BEGIN="# >>> cura_connection: added by install.sh, removed by install.sh --uninstall >>>"
MR_END="# <<< cura_connection <<<"
RULE_TAG="cura_connection"                      # iptables comment on our rules

KLIPPER_DIR="$HOME/klipper"
KLIPPY_ENV="$HOME/klippy-env"
CONFIG_DIR="$HOME/printer_data/config"
CHARON_DIR="${CHARON_DIR:-/usr/lib/python3/dist-packages/Charon}"
NGINX_DIR="/etc/nginx"
PORT=8080
SERVICE="klipper"
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
  3. makes libcharon (Debian package python3-charon) importable in that venv
  4. makes Cura's requests to port 80 reach the module: an nginx include with
     the Cura paths when nginx (Mainsail/Fluidd) serves port 80, otherwise an
     iptables REDIRECT 80 -> <port> saved with netfilter-persistent
  5. adds an [update_manager cura_connection] section to moonraker.conf
  6. tells you what to add to printer.cfg (it never edits printer.cfg)
  7. restarts Klipper

Options:
  --klipper-dir DIR      Klipper checkout (default: ~/klipper)
  --klippy-env DIR       Klippy's Python venv (default: ~/klippy-env)
  --config-dir DIR       printer.cfg / moonraker.conf folder
                         (default: ~/printer_data/config)
  --charon-dir DIR       libcharon's package folder (default, or env CHARON_DIR:
                         /usr/lib/python3/dist-packages/Charon)
  --nginx-dir DIR        nginx configuration folder (default: /etc/nginx)
  --port N               port of the module's HTTP server, as set in
                         [cura_connection] (default: 8080)
  --service NAME         systemd unit of Klipper (default: klipper)
  --no-port80            leave port 80 alone (no nginx include, no iptables rule)
  --no-restart           do not restart Klipper at the end
  --uninstall            remove everything this script added (pip packages
                         stay in the venv)
  --dry-run-privileged   print the commands that need root ("would run: ...")
                         instead of running them; the other steps are done.
                         Same as CURA_INSTALL_DRY_RUN=1.
  -h, --help             show this help
EOF
}

say()  { printf '==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die()  { printf 'ERROR: %s\n' "$*" >&2; exit 1; }

need_arg() { [ $# -ge 2 ] && [ -n "$2" ] || die "option $1 needs a value (see --help)"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --klipper-dir) need_arg "$@"; KLIPPER_DIR=$2; shift 2 ;;
        --klippy-env)  need_arg "$@"; KLIPPY_ENV=$2; shift 2 ;;
        --config-dir)  need_arg "$@"; CONFIG_DIR=$2; shift 2 ;;
        --charon-dir)  need_arg "$@"; CHARON_DIR=$2; shift 2 ;;
        --nginx-dir)   need_arg "$@"; NGINX_DIR=${2%/}; shift 2 ;;
        --port)        need_arg "$@"; PORT=$2; shift 2 ;;
        --service)     need_arg "$@"; SERVICE=$2; shift 2 ;;
        --no-port80)   DO_PORT80=0; shift ;;
        --no-restart)  DO_RESTART=0; shift ;;
        --uninstall)   UNINSTALL=1; shift ;;
        --dry-run-privileged) DRY_RUN=1; shift ;;
        -h|--help)     usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -ge 1 ] && [ "$PORT" -le 65535 ] \
    || die "--port must be a TCP port number, got '$PORT'"
[ "$PORT" != 80 ] || die "--port 80: the module cannot share port 80 with a redirect; pick another port"
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

# priv_output CMD...: a root-only command whose output we read (iptables -S).
priv_output() {
    if [ "$DRY_RUN" = 1 ]; then
        printf 'would run: %s\n' "$(quote "$@")" >&2
        return 0
    fi
    as_root "$@"
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
# and mode (cp writes into it); a new one is created 0644.
sys_put() {
    if [ -e "$2" ]; then sys_do "$2" cp "$1" "$2"; else sys_do "$2" install -m 0644 "$1" "$2"; fi
}

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        priv apt-get update -q || warn "apt-get update failed; trying the install anyway"
        APT_UPDATED=1
    fi
    priv env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

have() {   # have CMD: on PATH, or in an sbin folder a normal user's PATH may lack
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

# Keeps a file's "no newline at end" state when a line-based tool rewrote it.
match_final_newline() {   # ORIGINAL REWRITTEN
    if [ -s "$1" ] && [ -n "$(tail -c1 "$1")" ] && [ -s "$2" ] && [ -z "$(tail -c1 "$2")" ]; then
        truncate -s -1 "$2"
    fi
}

# ---------------------------------------------------------------------------
# 1. Module link
# ---------------------------------------------------------------------------
klipper_exclude_file() {   # prints the Klipper checkout's .git/info/exclude, if any
    local p
    git -C "$KLIPPER_DIR" rev-parse --git-dir >/dev/null 2>&1 || return 1
    p=$(git -C "$KLIPPER_DIR" rev-parse --git-path info/exclude) || return 1
    case "$p" in /*) ;; *) p="$KLIPPER_DIR/$p" ;; esac
    printf '%s\n' "$p"
}

install_module() {
    local extras="$KLIPPER_DIR/klippy/extras" link exclude
    say "Linking the module into Klipper"
    [ -f "$MODULE" ] || die "$MODULE not found: run install.sh from a complete cura_connection checkout"
    [ -d "$extras" ] || die "$extras not found: is Klipper installed in $KLIPPER_DIR? (use --klipper-dir)"
    link="$extras/cura_connection.py"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$MODULE" ]; then
        info "$link already links to $MODULE"
    elif [ -L "$link" ]; then
        ln -sfn "$MODULE" "$link"
        info "$link now links to $MODULE (was $(readlink "$link"))"
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

uninstall_module() {
    local link="$KLIPPER_DIR/klippy/extras/cura_connection.py" exclude
    say "Removing the module link"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$MODULE" ]; then
        rm -f "$link"
        info "removed $link"
    elif [ -e "$link" ] || [ -L "$link" ]; then
        warn "$link is not a link to $MODULE; left alone"
    else
        info "no link in $KLIPPER_DIR/klippy/extras"
    fi
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

install_charon() {
    local site link
    say "Making libcharon importable in $KLIPPY_ENV"
    if [ ! -d "$CHARON_DIR" ]; then
        info "$CHARON_DIR is missing: installing python3-charon"
        apt_install python3-charon
        if [ ! -d "$CHARON_DIR" ]; then
            [ "$DRY_RUN" = 1 ] || die "python3-charon is installed but $CHARON_DIR does not exist (use --charon-dir)"
            warn "dry run: $CHARON_DIR does not exist, so libcharon is not linked"
            return 0
        fi
    fi
    site=$(venv_site)
    link="$site/Charon"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$CHARON_DIR" ]; then
        info "$link already links to $CHARON_DIR"
    elif [ -L "$link" ] || [ ! -e "$link" ]; then
        ln -sfn "$CHARON_DIR" "$link"
        info "$link -> $CHARON_DIR"
    else
        info "$link is a real package, not a link: using it as it is"
    fi
    "$VENV_PY" -c 'import Charon, Charon.VirtualFile' \
        || die "libcharon does not import in $KLIPPY_ENV (see the error above)"
    info "import Charon: ok"
}

uninstall_charon() {
    local link
    say "Removing the libcharon link from $KLIPPY_ENV"
    if [ ! -x "$KLIPPY_ENV/bin/python" ]; then
        info "no venv at $KLIPPY_ENV"
        return 0
    fi
    VENV_PY="$KLIPPY_ENV/bin/python"
    link="$(venv_site)/Charon"
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$CHARON_DIR" ]; then
        rm -f "$link"
        info "removed $link"
    elif [ -e "$link" ] || [ -L "$link" ]; then
        info "$link is not a link to $CHARON_DIR; left alone"
    else
        info "no Charon link in the venv"
    fi
    info "pip packages from klippy_extras/requirements.txt stay installed in $KLIPPY_ENV"
    info "(zeroconf, python-multipart, defusedxml; remove them with pip if nothing else needs them)"
}

# ---------------------------------------------------------------------------
# 4. Port 80
# ---------------------------------------------------------------------------
SNIPPET="$NGINX_DIR/snippets/cura_connection.conf"

nginx_site_files() {   # files nginx reads that may hold server blocks
    local f
    for f in "$NGINX_DIR"/sites-enabled/* "$NGINX_DIR"/conf.d/*.conf "$NGINX_DIR"/nginx.conf; do
        [ -f "$f" ] && printf '%s\n' "$f"
    done
    return 0
}

# Prints, for each server block in FILE that listens on port 80, the number of
# its first "listen ... 80" line, unless the block already has our include.
NGINX_AWK='
function count(s, ch,   n) { n = gsub(ch, "", s); return n }
{
    raw = $0; code = $0; sub(/#.*/, "", code)
    start_depth = depth
    if (!in_srv && (pending || code ~ /^[ \t]*server[ \t]*(\{|$)/)) {
        if (code ~ /\{/) { in_srv = 1; srv_depth = depth; listen80 = 0; marked = 0; pending = 0 }
        else if (code ~ /^[ \t]*server[ \t]*$/) pending = 1
    }
    if (in_srv) {
        if (index(raw, mark)) marked = 1
        if (start_depth == srv_depth + 1 && !listen80 &&
            code ~ /^[ \t]*listen[ \t]+([^ \t;]*:)?80([ \t;]|$)/) listen80 = NR
    }
    depth += count(code, "{") - count(code, "}")
    if (in_srv && depth <= srv_depth && start_depth > srv_depth - (code ~ /\{/ ? 1 : 0)) {
        if (depth <= srv_depth && NR != srv_start) {
            if (listen80 && !marked) print listen80
            in_srv = 0
        }
    }
    if (in_srv && start_depth == srv_depth && code ~ /\{/ && !srv_start_set) { srv_start = NR; srv_start_set = 1 }
    if (!in_srv) srv_start_set = 0
}'

nginx_port80_lines() {   # FILE
    awk -v mark="$MARK" "$NGINX_AWK" "$1"
}

nginx_has_port80_site() {
    local f
    while IFS= read -r f; do
        if [ -n "$(nginx_port80_lines "$f")" ] || grep -qF "$MARK" "$f"; then return 0; fi
    done < <(nginx_site_files)
    return 1
}

write_snippet() {   # DEST
    cat >"$1" <<EOF
# Cura "print over network" requests -> cura_connection (Klipper extra) on
# port $PORT. Written by cura_connection's install.sh, which includes this file
# in the nginx server block that listens on port 80; "install.sh --uninstall"
# removes both. ^~ and = locations win over Moonraker's regex location
# ~ ^/(printer|api|access|machine|server)/ wherever they appear in the block.
location ^~ /api/v1/ {
    include $SNIPPET_PROXY;
}
location ^~ /cluster-api/ {
    include $SNIPPET_PROXY;
}
location = /print_jobs {
    include $SNIPPET_PROXY;
}
location ^~ /print_jobs/ {
    include $SNIPPET_PROXY;
}
location = /printers {
    include $SNIPPET_PROXY;
}
location ^~ /printers/ {
    include $SNIPPET_PROXY;
}
EOF
}
SNIPPET_PROXY="$NGINX_DIR/snippets/cura_connection_proxy.conf"
write_proxy_snippet() {   # DEST
    cat >"$1" <<EOF
# Proxy settings for the locations in cura_connection.conf (install.sh).
proxy_pass http://127.0.0.1:$PORT;
proxy_http_version 1.1;
proxy_set_header Host \$http_host;
proxy_set_header X-Real-IP \$remote_addr;
proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
proxy_set_header X-Forwarded-Proto \$scheme;
proxy_set_header X-Forwarded-Host \$http_host;
proxy_set_header Connection "";
# Print jobs are uploaded in one request: no size limit, streamed to the module
# as they arrive instead of being spooled by nginx first.
client_max_body_size 0;
proxy_request_buffering off;
proxy_buffering off;
proxy_connect_timeout 10s;
proxy_send_timeout 600s;
proxy_read_timeout 600s;
EOF
}

# Puts SRC's content in DEST (a file under the nginx dir) if it differs; shows
# the content when a dry run only prints the write.
put_nginx_file() {   # SRC DEST
    if [ -f "$2" ] && cmp -s "$1" "$2"; then
        info "$2 is up to date"
        return 0
    fi
    sys_do "$(dirname "$2")" mkdir -p "$(dirname "$2")"
    sys_put "$1" "$2"
    if [ "$DRY_RUN" = 1 ] && ! can_write "$2"; then
        sed 's/^/    | /' "$1"
    else
        info "wrote $2"
    fi
}

nginx_reload() {
    if [ "$DRY_RUN" = 0 ] && ! have nginx; then
        warn "nginx is not installed here, so the configuration is not tested or reloaded"
        return 0
    fi
    priv nginx -t || return 1
    priv systemctl reload nginx || warn "could not reload nginx: run 'sudo systemctl reload nginx'"
}

NGINX_CHANGED=()   # "original-backup|file" pairs, to roll back if nginx -t fails
port80_nginx() {
    local f real n lines indent
    say "nginx serves port 80: adding the Cura locations to its site"
    write_snippet "$TMPD/snippet.conf"
    write_proxy_snippet "$TMPD/proxy.conf"
    put_nginx_file "$TMPD/proxy.conf" "$SNIPPET_PROXY"
    put_nginx_file "$TMPD/snippet.conf" "$SNIPPET"
    n=0
    while IFS= read -r f; do
        lines=$(nginx_port80_lines "$f")
        if [ -z "$lines" ]; then
            grep -qF "$MARK" "$f" && info "$f already includes $SNIPPET"
            continue
        fi
        real=$(readlink -f "$f")   # sites-enabled/x is usually a link to sites-available/x
        n=$((n + 1))
        cp "$real" "$TMPD/orig.$n"
        # shellcheck disable=SC2016
        awk -v lines="$lines" -v inc="include $SNIPPET; # $MARK" '
            BEGIN { split(lines, a, "\n"); for (i in a) at[a[i]] = 1 }
            { print }
            (NR in at) { match($0, /^[ \t]*/); print substr($0, 1, RLENGTH) inc }
        ' "$real" >"$TMPD/new.$n"
        match_final_newline "$real" "$TMPD/new.$n"
        sys_put "$TMPD/new.$n" "$real"
        NGINX_CHANGED+=("$TMPD/orig.$n|$real")
        info "added 'include $SNIPPET;' to the port-80 server block in $real"
    done < <(nginx_site_files)
    if ! nginx_reload; then
        local pair
        for pair in "${NGINX_CHANGED[@]}"; do sys_put "${pair%%|*}" "${pair#*|}"; done
        die "nginx rejected the configuration (see above); the site file was restored. Rerun with --no-port80 to skip this step."
    fi
    # An earlier install without nginx may have left our redirect, which would
    # now hide the web UI: drop it.
    iptables_remove_ours quiet
}

nginx_uninstall() {
    local f real n=0 changed=0
    say "Removing the nginx include"
    while IFS= read -r f; do
        grep -qF "$MARK" "$f" || continue
        real=$(readlink -f "$f")
        n=$((n + 1))
        grep -vF "$MARK" "$real" >"$TMPD/un.$n" || true
        match_final_newline "$real" "$TMPD/un.$n"
        sys_put "$TMPD/un.$n" "$real"
        info "removed the cura_connection include from $real"
        changed=1
    done < <(nginx_site_files)
    for f in "$SNIPPET" "$SNIPPET_PROXY"; do
        if [ -e "$f" ]; then
            sys_do "$f" rm -f "$f"
            info "removed $f"
            changed=1
        fi
    done
    if [ "$changed" = 1 ]; then
        nginx_reload || warn "nginx -t failed after removing the include; check the nginx configuration"
    else
        info "nothing of cura_connection in $NGINX_DIR"
    fi
}

iptables_families() {   # the iptables commands to manage rules with
    have iptables && echo iptables
    have ip6tables && echo ip6tables
    return 0
}

RULE=(-p tcp --dport 80 -m comment --comment "$RULE_TAG" -j REDIRECT --to-ports "$PORT")

# Deletes our tagged PREROUTING rules; with "stale" only those whose target port
# is not --port, with "quiet" nothing is printed when there is none.
iptables_remove_ours() {   # MODE: all | stale | quiet
    local mode=$1 bin line removed=0
    local -a words
    for bin in $(iptables_families); do
        while IFS= read -r line; do
            case "$line" in *"--comment $RULE_TAG "*|*"--comment \"$RULE_TAG\""*) ;; *) continue ;; esac
            if [ "$mode" = stale ] && [[ "$line" == *"--to-ports $PORT" ]]; then continue; fi
            read -ra words <<<"$line"
            [ "${words[0]}" = "-A" ] || continue
            words[0]="-D"
            priv "$bin" -t nat "${words[@]}" && removed=1
            info "$bin: removed redirect rule (${line#-A })"
        done < <(priv_output "$bin" -t nat -S PREROUTING 2>&1 >/dev/null | sed -n 's/^/    /p' >&2
                 priv_output "$bin" -t nat -S PREROUTING 2>/dev/null || true)
        if [ "$DRY_RUN" = 1 ] && [ "$mode" = all ]; then
            printf 'would run: %s\n' "$(quote "$bin" -t nat -D PREROUTING "${RULE[@]}")   (each rule tagged $RULE_TAG)"
            removed=1
        fi
    done
    if [ "$removed" = 1 ]; then iptables_save; fi
    return 0
}

iptables_save() {
    if have netfilter-persistent || [ "$DRY_RUN" = 1 ]; then
        priv netfilter-persistent save || warn "netfilter-persistent save failed: the rules will not survive a reboot"
    else
        warn "netfilter-persistent is not installed: the change will not survive a reboot"
    fi
}

port80_iptables() {
    local bin fams
    say "No web server of nginx on port 80: redirecting port 80 to $PORT with iptables"
    if ! have iptables || ! have netfilter-persistent; then
        info "installing iptables and iptables-persistent"
        apt_install iptables iptables-persistent
    fi
    if have ss && ss -Hltn 'sport = :80' 2>/dev/null | grep -q .; then
        warn "something else listens on port 80 here; the redirect hides it from the network"
    fi
    fams=$(iptables_families)
    # In a dry run the packages were not really installed: use both commands.
    [ -n "$fams" ] || { [ "$DRY_RUN" = 1 ] && fams=$'iptables\nip6tables'; }
    [ -n "$fams" ] || die "iptables is not available after installing it"
    iptables_remove_ours stale
    for bin in $fams; do
        if priv_check "$bin" -t nat -C PREROUTING "${RULE[@]}"; then
            info "$bin: redirect 80 -> $PORT already present"
        elif priv "$bin" -t nat -A PREROUTING "${RULE[@]}"; then
            [ "$DRY_RUN" = 1 ] || info "$bin: added redirect 80 -> $PORT"
        elif [ "$bin" = ip6tables ]; then
            warn "ip6tables could not add the redirect (no IPv6 nat?); IPv4 works, and Cura only uses IPv4"
        else
            die "iptables could not add the redirect rule"
        fi
    done
    iptables_save
    info "note: PREROUTING does not see connections from this host itself; test from another machine"
}

install_port80() {
    if [ "$DO_PORT80" = 0 ]; then
        say "Port 80: skipped (--no-port80); Cura must reach the module on port 80 some other way"
        return 0
    fi
    if nginx_has_port80_site && { [ "$DRY_RUN" = 1 ] || have nginx; }; then
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
    nginx_uninstall
    say "Removing the iptables redirect"
    if [ -z "$(iptables_families)" ]; then
        info "iptables is not installed: no rule to remove"
    else
        iptables_remove_ours all
    fi
}

# ---------------------------------------------------------------------------
# 5. Moonraker update manager
# ---------------------------------------------------------------------------
MOONRAKER_CONF="$CONFIG_DIR/moonraker.conf"

# Prints moonraker.conf without our marked block (and the blank line before it).
moonraker_without_block() {
    awk -v begin="$MR_BEGIN" -v end="$MR_END" '
        skip { if ($0 == end) skip = 0; next }
        $0 == begin { skip = 1; held = 0; next }
        { if (held) { print ""; held = 0 } if ($0 == "") { held = 1; next } print }
        END { if (held) print "" }
    ' "$MOONRAKER_CONF"
}

install_moonraker() {
    local origin new
    say "Moonraker update manager"
    if [ ! -f "$MOONRAKER_CONF" ]; then
        info "no $MOONRAKER_CONF: skipped"
        return 0
    fi
    if ! origin=$(git -C "$REPO" remote get-url origin 2>/dev/null) || [ -z "$origin" ]; then
        info "$REPO has no git remote 'origin', so Moonraker could not update it: skipped"
        info "(clone cura_connection with git and run install.sh again to get updates in Mainsail/Fluidd)"
        return 0
    fi
    if grep -q '^\[update_manager cura_connection\]' "$MOONRAKER_CONF" && ! grep -qxF "$MR_BEGIN" "$MOONRAKER_CONF"; then
        info "$MOONRAKER_CONF already has [update_manager cura_connection] (not written by install.sh): left alone"
        return 0
    fi
    new="$TMPD/moonraker.conf"
    moonraker_without_block >"$new"
    if [ -s "$new" ]; then
        if [ -n "$(tail -c1 "$new")" ]; then printf '\n\n' >>"$new"; else printf '\n' >>"$new"; fi
    fi
    cat >>"$new" <<EOF
$MR_BEGIN
[update_manager cura_connection]
type: git_repo
path: $REPO
origin: $origin
primary_branch: main
virtualenv: $KLIPPY_ENV
requirements: klippy_extras/requirements.txt
install_script: install.sh
managed_services: klipper
$MR_END
EOF
    if cmp -s "$new" "$MOONRAKER_CONF"; then
        info "$MOONRAKER_CONF already has the section"
    else
        cat "$new" >"$MOONRAKER_CONF"
        info "added [update_manager cura_connection] to $MOONRAKER_CONF (restart Moonraker to see it)"
    fi
}

uninstall_moonraker() {
    say "Moonraker update manager"
    if [ ! -f "$MOONRAKER_CONF" ] || ! grep -qxF "$MR_BEGIN" "$MOONRAKER_CONF"; then
        info "no section added by install.sh in $MOONRAKER_CONF"
        return 0
    fi
    moonraker_without_block >"$TMPD/moonraker.conf"
    cat "$TMPD/moonraker.conf" >"$MOONRAKER_CONF"
    info "removed [update_manager cura_connection] from $MOONRAKER_CONF"
}

# ---------------------------------------------------------------------------
# 6./7. printer.cfg and Klipper restart
# ---------------------------------------------------------------------------
printer_cfg_has_section() {
    [ -d "$CONFIG_DIR" ] && grep -rqs --include='*.cfg' '^\[cura_connection\]' "$CONFIG_DIR"
}

check_printer_cfg() {
    say "printer.cfg"
    if printer_cfg_has_section; then
        info "[cura_connection] is configured in $CONFIG_DIR"
        return 0
    fi
    info "add this to $CONFIG_DIR/printer.cfg to enable the module:"
    echo
    echo "    [cura_connection]"
    if [ "$PORT" = 8080 ]; then echo "    #port: 8080"; else echo "    port: $PORT"; fi
    echo
}

restart_klipper() {
    if [ "$DO_RESTART" = 0 ]; then
        say "Not restarting Klipper (--no-restart): restart it to load the module"
        return 0
    fi
    say "Restarting Klipper"
    priv systemctl restart "$SERVICE" || warn "could not restart $SERVICE: restart Klipper yourself"
}

# ---------------------------------------------------------------------------
main() {
    [ "$DRY_RUN" = 1 ] && say "Dry run: commands that need root are printed, not run"
    if [ "$UNINSTALL" = 1 ]; then
        uninstall_module
        uninstall_charon
        uninstall_port80
        uninstall_moonraker
        if printer_cfg_has_section; then
            warn "[cura_connection] is still in $CONFIG_DIR: remove it, or Klipper will not start without the module"
            [ "$DO_RESTART" = 0 ] || say "Not restarting Klipper until that section is removed"
        else
            restart_klipper
        fi
        say "cura_connection is uninstalled"
        return 0
    fi
    install_module
    check_venv
    install_requirements
    install_charon
    install_port80
    install_moonraker
    check_printer_cfg
    restart_klipper
    say "cura_connection is installed"
}

main
