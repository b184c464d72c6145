"""The fake Klipper host of the install tests.

install.sh on a fake Klipper host.

Every test lays out a temporary HOME the way KIAUH / MainsailOS do
(~/klipper, ~/klippy-env, ~/printer_data/config, an nginx folder with a
Mainsail site on port 80) and runs install.sh with --dry-run-privileged, so
commands that need root are printed ("would run: ...") and nothing under /etc,
no firewall and no service of this machine is touched. As a safety net,
sudo, systemctl and apt-get on PATH are stubs that record any call; the tests
check that none happened.

What install.sh sees of the system is what each test gives it, never what
this machine has: PATH holds only the basic tools it needs (HOST_TOOLS), the
stubs and, where a test wants them, fake iptables/nginx/...; the sbin folders
are not searched; python3-charon "installed" is a folder unpacked from
Debian's package file (tests/setup_env.sh keeps it in .cache/cura/debs).

The Klippy venv is a real venv (no system site packages), created once per
session; install.sh really pip-installs the requirements into it (from PyPI
the first time) and links libcharon into it.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL_SH = ROOT / "install.sh"
CHARON_DEBS = ROOT / ".cache" / "cura" / "debs"


# The only host commands install.sh (and libcharon.sh, and the fakes) see
HOST_TOOLS = ("bash", "sh", "env", "cat", "mktemp", "rm", "id", "dirname",
              "basename", "git", "ln", "readlink", "mkdir", "grep", "awk",
              "tr", "sed", "cp", "mv", "install", "cmp", "tail", "head",
              "truncate", "touch", "cut", "du", "chmod", "dpkg-deb", "tar")
ORIGIN = "https://example.invalid/cura_connection.git"
MARK = "# cura_connection install.sh"


# A site as KIAUH/MainsailOS install it (sites-available/mainsail, linked
# from sites-enabled): static UI on /, Moonraker behind the regex location.
MAINSAIL_SITE = """\
# /etc/nginx/sites-available/mainsail

server {
    listen 80 default_server;
    # listen [::]:80 default_server;

    access_log {logdir}/mainsail-access.log;
    error_log {logdir}/mainsail-error.log;

    gzip on;
    gzip_types text/plain text/css application/json application/javascript;

    root {home}/mainsail;
    index index.html;
    server_name _;

    client_max_body_size 0;
    proxy_request_buffering off;

    location / {
        try_files $uri $uri/ /index.html;
    }

    location = /index.html {
        add_header Cache-Control "no-store, no-cache, must-revalidate";
    }

    location /websocket {
        proxy_pass http://apiserver/websocket;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $http_host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_read_timeout 86400;
    }

    location ~ ^/(printer|api|access|machine|server)/ {
        proxy_pass http://apiserver$request_uri;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Host $http_host;
        proxy_set_header X-Real-IP $remote_addr;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Scheme $scheme;
        proxy_read_timeout 600;
    }

    location /webcam/ {
        postpone_output 0;
        proxy_buffering off;
        proxy_ignore_headers X-Accel-Buffering;
        access_log off;
        error_log off;
        proxy_pass http://mjpgstreamer1/;
    }
}"""    # deliberately no newline at the end: install/uninstall must keep that
UPSTREAMS_CONF = """\
# /etc/nginx/conf.d/upstreams.conf
upstream apiserver {
    ip_hash;
    server 127.0.0.1:7125;
}

upstream mjpgstreamer1 {
    ip_hash;
    server 127.0.0.1:8080;
}
"""
COMMON_VARS_CONF = """\
# /etc/nginx/conf.d/common_vars.conf
map $http_upgrade $connection_upgrade {
    default upgrade;
    '' close;
}
"""
DEBIAN_NGINX_CONF = """\
user www-data;
worker_processes auto;
pid /run/nginx.pid;
events {
    worker_connections 768;
}
http {
    sendfile on;
    include /etc/nginx/mime.types;
    include /etc/nginx/conf.d/*.conf;
    include /etc/nginx/sites-enabled/*;
}
"""
PRINTER_CFG = """\
[include mainsail.cfg]

[printer]
kinematics: cartesian
max_velocity: 300
max_accel: 3000
"""
MAINSAIL_CFG = """\
[virtual_sdcard]
path: ~/printer_data/gcodes
on_error_gcode: CANCEL_PRINT

[pause_resume]
"""
MOONRAKER_CONF = """\
[server]
host: 0.0.0.0
port: 7125
klippy_uds_address: ~/printer_data/comms/klippy.sock

[authorization]
trusted_clients:
    10.0.0.0/8
    127.0.0.0/8
    192.168.0.0/16

[octoprint_compat]

[history]

[update_manager]
channel: dev
refresh_interval: 168

[update_manager mainsail]
type: web
channel: stable
repo: mainsail-crew/mainsail
path: ~/mainsail
"""


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=test", "-c",
                    "user.email=test@example.invalid", "-c",
                    "init.defaultBranch=main", *args],
                   cwd=cwd, check=True, capture_output=True)


def _make_repo(dest, origin):
    """A cura_connection checkout: install.sh and klippy_extras/ of this
    repo, in a git repository of its own (this repo's git config is never
    touched)."""
    dest.mkdir()
    shutil.copy2(INSTALL_SH, dest / "install.sh")
    shutil.copytree(ROOT / "klippy_extras", dest / "klippy_extras",
                    ignore=shutil.ignore_patterns("__pycache__"))
    module = dest / "klippy_extras" / "cura_connection.py"
    if not module.exists():     # only while the module is being written
        module.write_text("# placeholder for the test\n")
    _git(dest, "init", "-q")
    if origin:
        _git(dest, "remote", "add", "origin", origin)
    return dest


@pytest.fixture(scope="session")
def repo_with_origin(tmp_path_factory):
    return _make_repo(tmp_path_factory.mktemp("src") / "cura_connection",
                      ORIGIN)


@pytest.fixture(scope="session")
def repo_without_origin(tmp_path_factory):
    return _make_repo(tmp_path_factory.mktemp("src") / "cura_connection",
                      None)


@pytest.fixture(scope="session")
def klippy_venv(tmp_path_factory):
    """One real venv for the whole session, like KIAUH's ~/klippy-env."""
    path = tmp_path_factory.mktemp("venv") / "klippy-env"
    python = os.environ.get("KLIPPY_PYTHON") or shutil.which("python3")
    subprocess.run([python, "-m", "venv", str(path)], check=True)
    return path


# apt-get's only unprivileged use: "apt-get download python3-charon" gets
# Debian's real package file (or fails like apt offline, FAKE_APT_OFFLINE=1)
APT_DOWNLOAD_STUB = """\
if [ "$1" = download ] && [ "$2" = python3-charon ]; then
    echo "apt-get $*" >> "$HOME/apt-downloads.log"
    if [ -n "$FAKE_APT_OFFLINE" ]; then
        echo "Err:1 http://deb.debian.org/debian bookworm/main python3-charon"
        echo "  Temporary failure resolving 'deb.debian.org'"
        echo "E: Failed to fetch http://deb.debian.org/debian/pool/main/l/" \
            "python3-charon.deb  Temporary failure resolving" >&2
        exit 100
    fi
    exec cp "$FAKE_CHARON_DEB" .
fi
"""


@pytest.fixture(scope="session")
def stub_bin(tmp_path_factory):
    """sudo/systemctl/apt-get stubs that log every call (there must be
    none: the dry run prints those commands instead), except the download
    of python3-charon, which needs no root."""
    d = tmp_path_factory.mktemp("stubs")
    log = d / "calls.log"
    for name in ("sudo", "systemctl", "apt-get"):
        stub = d / name
        stub.write_text('#!/bin/sh\n%secho "%s $*" >> "%s"\nexit 97\n'
                        % (APT_DOWNLOAD_STUB if name == "apt-get" else "",
                           name, log))
        stub.chmod(0o755)
    return d


@pytest.fixture(scope="session")
def host_tools(tmp_path_factory):
    """A folder with links to HOST_TOOLS: PATH for install.sh without
    whatever else this machine has (iptables, nginx, ss, ...)."""
    d = tmp_path_factory.mktemp("host-tools")
    for name in HOST_TOOLS:
        real = shutil.which(name)
        assert real, "%s (needed by install.sh) is not installed" % (name,)
        (d / name).symlink_to(real)
    return d


@pytest.fixture(scope="session")
def charon_deb():
    """Debian's python3-charon package file (from tests/setup_env.sh)."""
    debs = sorted(CHARON_DEBS.glob("python3-charon_*.deb"))
    assert debs, "no python3-charon .deb in %s: run tests/setup_env.sh" % (
        CHARON_DEBS,)
    return debs[-1]


@pytest.fixture(scope="session")
def debian_charon(tmp_path_factory, charon_deb):
    """libcharon where an installed python3-charon puts it."""
    root = tmp_path_factory.mktemp("python3-charon")
    subprocess.run(["dpkg-deb", "-x", str(charon_deb), str(root)],
                   check=True)
    return root / "usr" / "lib" / "python3" / "dist-packages" / "Charon"


@pytest.fixture(scope="session")
def sandbox(stub_bin, host_tools, charon_deb, debian_charon):
    """What install.sh may see of the system: stubs, basic tools and an
    installed python3-charon."""
    return dict(stub_bin=stub_bin, tools=host_tools, charon_deb=charon_deb,
                charon_dir=debian_charon)


class Host:
    """A temporary HOME laid out like a Klipper host."""

    def __init__(self, home, venv, sandbox, repo):
        self.home = home
        self.repo = repo
        self.stub_bin = sandbox["stub_bin"]
        self.tools = sandbox["tools"]
        self.charon_deb = sandbox["charon_deb"]
        # python3-charon's folder; a missing one: not installed
        self.charon_dir = sandbox["charon_dir"]
        # folders of fake system commands install.sh finds (after the stubs)
        self.visible = []
        self.klipper = home / "klipper"
        self.extras = self.klipper / "klippy" / "extras"
        self.config = home / "printer_data" / "config"
        self.nginx = home / "nginx"
        self.venv = venv
        self.extras.mkdir(parents=True)
        for name in ("__init__.py", "heaters.py", "virtual_sdcard.py",
                     "print_stats.py"):
            (self.extras / name).write_text("# dummy %s\n" % name)
        (self.klipper / "klippy" / "klippy.py").write_text("# dummy\n")
        _git(self.klipper, "init", "-q")
        _git(self.klipper, "add", "-A")
        _git(self.klipper, "commit", "-q", "-m", "klipper")
        self.config.mkdir(parents=True)
        (self.config / "printer.cfg").write_text(PRINTER_CFG)
        (self.config / "mainsail.cfg").write_text(MAINSAIL_CFG)
        (self.config / "moonraker.conf").write_text(MOONRAKER_CONF)
        (home / "klippy-env").symlink_to(venv)
        for sub in ("sites-available", "sites-enabled", "conf.d",
                    "snippets"):
            (self.nginx / sub).mkdir(parents=True)
        (self.nginx / "nginx.conf").write_text(DEBIAN_NGINX_CONF)
        (self.nginx / "conf.d" / "upstreams.conf").write_text(UPSTREAMS_CONF)
        (self.nginx / "conf.d" / "common_vars.conf").write_text(
            COMMON_VARS_CONF)
        (self.nginx / "snippets" / "snakeoil.conf").write_text(
            "ssl_certificate /etc/ssl/certs/ssl-cert-snakeoil.pem;\n")
        self.logdir = home / "nginx-logs"
        self.logdir.mkdir()

    def add_mainsail_site(self, text=None):
        site = self.nginx / "sites-available" / "mainsail"
        site.write_text(text if text is not None else MAINSAIL_SITE.replace(
            "{logdir}", str(self.logdir)).replace("{home}", str(self.home)))
        (self.nginx / "sites-enabled" / "mainsail").symlink_to(
            "../sites-available/mainsail")
        return site

    @property
    def site(self):
        return self.nginx / "sites-available" / "mainsail"

    @property
    def nginx_test(self):
        """How install.sh tests this nginx configuration."""
        return "nginx -t -c %s" % (self.nginx / "nginx.conf")

    @property
    def snippet(self):
        return self.nginx / "snippets" / "cura_connection.conf"

    @property
    def module(self):
        return self.repo / "klippy_extras" / "cura_connection.py"

    @property
    def link(self):
        return self.extras / "cura_connection.py"

    def site_packages(self):
        out = subprocess.run(
            [str(self.venv / "bin" / "python"), "-c",
             "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip()
        return Path(out)

    def env(self, env=None, stubs=None):
        """install.sh's environment: `stubs` replaces the recording stubs
        with a folder of fake system commands (for the non-dry-run
        tests)."""
        full_env = dict(os.environ)
        for var in ("SUDO_USER", "CURA_INSTALL_DRY_RUN", "CHARON_DIR"):
            full_env.pop(var, None)
        # pip keeps using the real user's download cache under the fake HOME
        full_env.setdefault("PIP_CACHE_DIR",
                            os.path.expanduser("~/.cache/pip"))
        full_env["HOME"] = str(self.home)
        full_env["PATH"] = ":".join(
            str(d) for d in [stubs or self.stub_bin] + self.visible
            + [self.tools])
        full_env["CURA_INSTALL_SBIN_DIRS"] = ""
        full_env["CHARON_DIR"] = str(self.charon_dir)
        full_env["FAKE_CHARON_DEB"] = str(self.charon_deb)
        full_env.update(env or {})
        return full_env

    def run(self, *args, dry_flag=True, env=None, check=True, stubs=None):
        """Runs install.sh (see env())."""
        cmd = ["bash", str(self.repo / "install.sh"),
               "--nginx-dir", str(self.nginx)]
        if dry_flag:
            cmd.append("--dry-run-privileged")
        cmd += list(args)
        res = subprocess.run(cmd, env=self.env(env, stubs),
                             capture_output=True, text=True, timeout=600)
        res.output = res.stdout + res.stderr
        if check:
            assert res.returncode == 0, res.output
        stub_log = self.stub_bin / "calls.log"
        assert not stub_log.exists(), \
            "privileged command really run:\n" + stub_log.read_text()
        return res

    def snapshot(self):
        """Everything install.sh may change outside the venv."""
        out = {}
        for root in (self.klipper, self.config, self.nginx):
            for dirpath, dirnames, filenames in os.walk(root):
                if Path(dirpath) == self.klipper:
                    dirnames.remove(".git")
                for name in dirnames + filenames:
                    p = Path(dirpath, name)
                    if p.is_symlink():
                        out[str(p)] = ("link", os.readlink(p))
                    elif p.is_dir():
                        out[str(p)] = ("dir", p.stat().st_mode)
                    else:
                        out[str(p)] = ("file", p.read_bytes(),
                                       p.stat().st_mode)
        exclude = self.klipper / ".git" / "info" / "exclude"
        out[str(exclude)] = exclude.read_bytes() if exclude.exists() \
            else None
        return out


def _clean_venv(h):
    # The venv is shared: leave it without our Charon for the next test.
    link = h.site_packages() / "Charon"
    if link.is_symlink():
        link.unlink()
    shutil.rmtree(h.venv / "share" / "cura_connection", ignore_errors=True)


@pytest.fixture
def host(tmp_path, klippy_venv, sandbox, repo_with_origin):
    h = Host(tmp_path / "home", klippy_venv, sandbox, repo_with_origin)
    yield h
    _clean_venv(h)


def parse_snippet(text):
    """{location spec: body} of an nginx snippet made of location blocks."""
    return {m.group(1).strip(): m.group(2) for m in re.finditer(
        r"^location\s+([^{]+?)\s*\{(.*?)^\}", text, re.M | re.S)}


def would_run(output):
    return [line[len("would run: "):] for line in output.splitlines()
            if line.startswith("would run: ")]
FAKE_IPTABLES = r"""#!/bin/bash
# Fake iptables/ip6tables: the nat PREROUTING chain lives in a file, rules are
# stored the way "iptables -S" prints them (with "-m tcp" after "-p tcp").
name=$(basename "$0")
state="$FAKE_DIR/$name.rules"
touch "$state"
echo "$name $*" >> "$FAKE_DIR/calls.log"
[ "$1" = -t ] && [ "$2" = nat ] || exit 2
op=$3; chain=$4; shift 4
[ "$chain" = PREROUTING ] || exit 1
spec=" $* "
case "$spec" in
    *" -m tcp "*) ;;
    *) spec=${spec/ -p tcp / -p tcp -m tcp } ;;
esac
spec=${spec# }; spec=${spec% }
line="-A PREROUTING${spec:+ $spec}"
case "$op" in
    -S) echo "-P PREROUTING ACCEPT"; cat "$state" ;;
    -C) grep -qxF -- "$line" "$state" ;;
    -A) echo "$line" >> "$state" ;;
    -D) n=$(grep -nxF -- "$line" "$state" | head -1 | cut -d: -f1)
        [ -n "$n" ] || { echo "iptables: Bad rule" >&2; exit 1; }
        sed -i "${n}d" "$state" ;;
    *) exit 2 ;;
esac
"""
FAKE_RECORDER = """#!/bin/sh
echo "$(basename "$0") $*" >> "$FAKE_DIR/calls.log"
exit ${FAKE_EXIT:-0}
"""


@pytest.fixture
def fake_system(tmp_path):
    """Fake iptables, ip6tables, netfilter-persistent, systemctl, apt-get,
    nginx and sudo (which just runs the command): the script's real (not
    dry-run) code paths run, and nothing of this machine is changed."""
    d = tmp_path / "fake-system"
    d.mkdir()
    for name in ("iptables", "ip6tables"):
        (d / name).write_text(FAKE_IPTABLES)
    for name in ("netfilter-persistent", "systemctl"):
        (d / name).write_text(FAKE_RECORDER)
    (d / "apt-get").write_text(FAKE_RECORDER.replace(
        "\n", "\n" + APT_DOWNLOAD_STUB, 1))
    (d / "nginx").write_text(FAKE_RECORDER.replace(
        "${FAKE_EXIT:-0}", "${FAKE_NGINX_EXIT:-0}"))
    (d / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for f in d.iterdir():
        f.chmod(0o755)
    return d


def _calls(fake):
    log = fake / "calls.log"
    return log.read_text().splitlines() if log.exists() else []
