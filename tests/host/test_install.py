"""install.sh on a fake Klipper host (support/install_host.py: a
temporary HOME laid out as KIAUH / MainsailOS do, --dry-run-privileged or
fake system commands, a PATH with basic tools only, a real Klippy venv).
Nothing under /etc, no firewall and no service of this machine is touched.
"""
import configparser
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from install_host import (
    Host, INSTALL_SH, MAINSAIL_SITE, MARK, MOONRAKER_CONF,
    ORIGIN, ROOT, _calls, _clean_venv, parse_snippet,
    would_run)

# (the fake host, its fixtures and files: support/install_host.py)
NGINX = ROOT / ".cache" / "nginx" / "root" / "usr" / "sbin" / "nginx"
CURA_LOCATIONS = ["^~ /api/v1/", "^~ /cluster-api/", "= /print_jobs",
                  "^~ /print_jobs/", "= /printers", "^~ /printers/"]


def server_blocks(text):
    """Bodies of the top-level server blocks of a site file."""
    blocks, depth, start, opened = [], 0, None, False
    lines = text.splitlines()
    for i, line in enumerate(lines):
        code = line.split("#", 1)[0]
        if depth == 0 and start is None and re.match(r"\s*server\b", code):
            start, opened = i, False
        depth += code.count("{") - code.count("}")
        opened = opened or "{" in code
        if depth == 0 and start is not None and opened:
            blocks.append("\n".join(lines[start:i + 1]))
            start = None
    return blocks


# ---------------------------------------------------------------------------
# The script itself
# ---------------------------------------------------------------------------

def test_bash_syntax():
    subprocess.run(["bash", "-n", str(INSTALL_SH)], check=True)


def test_shellcheck():
    """install.sh and the other scripts a user runs."""
    assert shutil.which("shellcheck"), \
        "shellcheck is not installed: run tests/setup_env.sh"
    scripts = [INSTALL_SH, ROOT / "klippy_extras" / "libcharon.sh"] + sorted(
        (ROOT / "tests").glob("*.sh"))
    res = subprocess.run(["shellcheck", "--severity=style"]
                         + [str(p) for p in scripts],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_help_lists_every_option():
    res = subprocess.run(["bash", str(INSTALL_SH), "--help"],
                         capture_output=True, text=True, check=True)
    for flag in ("--klipper-dir", "--klippy-env", "--config-dir",
                 "--charon-dir", "--nginx-dir", "--port", "--service",
                 "--no-port80", "--no-restart", "--uninstall",
                 "--dry-run-privileged"):
        assert flag in res.stdout
    res = subprocess.run(["bash", str(INSTALL_SH), "--bogus"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "unknown option: --bogus" in res.stderr
    res = subprocess.run(["bash", str(INSTALL_SH), "--port", "http"],
                         capture_output=True, text=True)
    assert res.returncode != 0 and "--port" in res.stderr


# ---------------------------------------------------------------------------
# Install on a Mainsail host (nginx on port 80)
# ---------------------------------------------------------------------------

@pytest.fixture(params=["bare", "iptables+nginx"])
def seen(request, host, fake_system):
    """Both kinds of host, whatever this machine has: one without iptables
    and nginx, one with them (fake_system's, found after the stubs)."""
    if request.param != "bare":
        host.visible.append(fake_system)
    return request.param


def test_install_with_nginx(host, seen):
    host.add_mainsail_site()
    printer_cfg = (host.config / "printer.cfg").read_bytes()
    res = host.run()

    # 1. the module is linked into Klipper, and Klipper's git stays clean
    assert host.link.is_symlink()
    assert os.readlink(host.link) == str(host.module)
    status = subprocess.run(["git", "status", "--porcelain"],
                            cwd=host.klipper, capture_output=True,
                            text=True, check=True).stdout
    assert status == ""

    # 2./3. requirements and libcharon import in the Klippy venv
    charon = host.site_packages() / "Charon"
    assert charon.is_symlink() and os.readlink(charon) == str(
        host.charon_dir)
    subprocess.run([str(host.venv / "bin" / "python"), "-c",
                    "import zeroconf, python_multipart, defusedxml, websocket,"
                    " Charon, Charon.VirtualFile"], check=True)

    # 4. the port-80 server block includes the snippet ...
    site = host.site.read_text()
    assert host.site.exists() and (host.nginx / "sites-enabled" /
                                   "mainsail").is_symlink()
    include = "include %s; %s" % (host.snippet, MARK)
    assert site.count(include) == 1
    (block,) = server_blocks(site)
    assert include in block
    assert not site.endswith("\n")      # the file's own ending is kept
    # ... and the snippet proxies Cura's paths to the module's port
    locations = parse_snippet(host.snippet.read_text())
    assert sorted(locations) == sorted(CURA_LOCATIONS)
    for spec, body in locations.items():
        assert "proxy_pass http://127.0.0.1:8080;" in body, spec
        for directive in ("client_max_body_size 0;",
                          "proxy_request_buffering off;",
                          "proxy_set_header Host $http_host;",
                          "proxy_set_header X-Forwarded-For "
                          "$proxy_add_x_forwarded_for;",
                          "proxy_set_header X-Forwarded-Proto $scheme;",
                          "proxy_set_header X-Forwarded-Host $http_host;",
                          "proxy_read_timeout 600s;",
                          "proxy_send_timeout 600s;"):
            assert directive in body, (spec, directive)
    # the privileged part is printed, not run; no firewall rule with nginx
    cmds = would_run(res.output)
    assert cmds[:2] == [host.nginx_test, "systemctl reload nginx"]
    tables = [c for c in cmds if "tables" in c]
    if seen == "bare":
        assert tables == []
    else:   # only a redirect of ours, left from before nginx, is dropped
        rule = ("-t nat -D PREROUTING -p tcp --dport 80 -m comment --comment "
                "cura_connection -j REDIRECT --to-ports 8080   (for each "
                "rule tagged cura_connection)")
        assert tables == ["iptables -t nat -S PREROUTING", "iptables " + rule,
                          "ip6tables -t nat -S PREROUTING",
                          "ip6tables " + rule]

    # 5. Moonraker's update manager section, as Moonraker's parser reads it
    conf = configparser.ConfigParser(interpolation=None)
    conf.read(host.config / "moonraker.conf")
    sec = conf["update_manager cura_connection"]
    assert dict(sec) == {
        "type": "git_repo", "path": str(host.repo), "origin": ORIGIN,
        "primary_branch": "main",
        "virtualenv": str(host.home / "klippy-env"),
        "requirements": "klippy_extras/requirements.txt",
        "install_script": "install.sh", "managed_services": "klipper"}
    assert (host.repo / sec["requirements"]).is_file()
    assert conf["update_manager mainsail"]["repo"] == "mainsail-crew/mainsail"
    assert (host.config / "moonraker.conf").read_text().startswith(
        MOONRAKER_CONF)

    # 6. printer.cfg is not edited; the lines to add are shown
    assert (host.config / "printer.cfg").read_bytes() == printer_cfg
    assert "[cura_connection]" in res.stdout
    assert "[virtual_sdcard]" not in res.stdout     # mainsail.cfg has one

    # 7. Klipper is restarted (printed in a dry run)
    assert cmds[-1] == "systemctl restart klipper"
    assert res.stdout.rstrip().splitlines()[-1].startswith(
        "==> Dry run: cura_connection would be installed once")
    assert "is installed" not in res.output


def test_nginx_routes_cura_paths_to_the_module(host, tmp_path):
    """Runs the installed site in a real nginx (on a loopback port instead of
    80) between a fake module and a fake Moonraker: Cura's paths reach the
    module, Moonraker's (including /api/...) still reach Moonraker."""
    nginx = _nginx()
    module_srv, module_seen = _backend("module")
    moonraker_srv, moonraker_seen = _backend("moonraker")
    try:
        host.add_mainsail_site()
        host.run("--port", str(module_srv.server_port))
        run_dir = tmp_path / "nginx-run"
        run_dir.mkdir()
        nginx_port = _free_port()
        site = host.site.read_text().replace(
            "listen 80 default_server;",
            "listen 127.0.0.1:%d default_server;" % nginx_port)
        (run_dir / "site").write_text(site)
        temp = _nginx_temp_paths(run_dir)
        conf = run_dir / "nginx.conf"
        conf.write_text(
            "%s"
            "worker_processes 1;\n"
            "pid %s/nginx.pid;\n"
            "error_log %s/error.log;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            "    access_log off;\n"
            "    %s"
            "    map $http_upgrade $connection_upgrade "
            "{ default upgrade; '' close; }\n"
            "    upstream apiserver { server 127.0.0.1:%d; }\n"
            "    upstream mjpgstreamer1 { server 127.0.0.1:9; }\n"
            "    include %s/site;\n"
            "}\n" % ("user root root;\n" if os.geteuid() == 0 else "",
                     run_dir, run_dir, temp,
                     moonraker_srv.server_port, run_dir))
        base = [nginx, "-p", str(run_dir), "-c", str(conf),
                "-e", str(run_dir / "error.log")]
        check = subprocess.run(base + ["-t"], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(base + ["-g", "daemon off;"],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            _wait_port(nginx_port, proc)
            url = "http://127.0.0.1:%d" % nginx_port
            for path in ("/api/v1/system", "/cluster-api/v1/printers",
                         "/cluster-api/v1/print_jobs/abc/preview_image",
                         "/print_jobs", "/printers", "/printers/x"):
                assert _get(url + path)["server"] == "module", path
            for path in ("/api/version", "/api/files/local", "/server/info",
                         "/printer/objects/list", "/machine/system_info"):
                assert _get(url + path)["server"] == "moonraker", path
            # a print job upload streams through, body intact, headers set
            body = os.urandom(3 << 20)
            req = urllib.request.Request(
                url + "/cluster-api/v1/print_jobs/", data=body,
                method="POST", headers={
                    "Content-Type": "application/octet-stream",
                    "Host": "printer.local"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                got = json.loads(resp.read())
            assert got["server"] == "module"
            assert got["length"] == len(body)
            seen = module_seen[-1]
            assert seen["host"] == "printer.local"
            assert seen["x-forwarded-for"] == "127.0.0.1"
            assert seen["x-forwarded-proto"] == "http"
            assert seen["x-forwarded-host"] == "printer.local"
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        # after uninstall the site parses again, without the include
        host.run("--uninstall")
        site = host.site.read_text().replace(
            "listen 80 default_server;",
            "listen 127.0.0.1:%d default_server;" % nginx_port)
        assert "cura_connection" not in site
        (run_dir / "site").write_text(site)
        check = subprocess.run(base + ["-t"], capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stderr
    finally:
        for srv in (module_srv, moonraker_srv):
            srv.shutdown()
            srv.server_close()
    assert moonraker_seen and module_seen


def _nginx():
    """Debian's nginx binary, unpacked by tests/setup_env.sh (installing
    the package would enable a system service)."""
    assert os.access(NGINX, os.X_OK), \
        "no nginx at %s: run tests/setup_env.sh" % (NGINX,)
    return str(NGINX)


def _nginx_temp_paths(folder):
    # nginx -t creates its temp folders; the defaults are nginx-common's
    return "".join("%s_temp_path %s/%s;\n" % (k, folder, k) for k in (
        "client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port, proc, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "nginx exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("nginx did not listen on %d" % port)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise AssertionError("%s: HTTP %s" % (url, e.code))


def _backend(name):
    """A loopback HTTP server answering {"server": name, ...}."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            if self.headers.get("Transfer-Encoding") == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().strip(), 16)
                    if not size:
                        self.rfile.readline()
                        break
                    data += self.rfile.read(size)
                    self.rfile.readline()
                length = len(data)
            else:
                self.rfile.read(length)
            seen.append({k.lower(): v for k, v in self.headers.items()})
            out = json.dumps({"server": name, "path": self.path,
                              "length": length}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, seen


def test_install_is_idempotent(host):
    host.add_mainsail_site()
    host.run()
    first = host.snapshot()
    res = host.run()
    assert host.snapshot() == first
    text = (host.config / "moonraker.conf").read_text()
    assert text.count("[update_manager cura_connection]") == 1
    assert host.site.read_text().count(MARK) == 1
    assert "already links" in res.output
    assert "is up to date" in res.output
    assert "already has the section" in res.output
    assert "already includes the snippet" in res.output


def test_port_change_updates_snippet_in_place(host):
    host.add_mainsail_site()
    host.run()
    host.run("--port", "8125")
    locations = parse_snippet(host.snippet.read_text())
    assert all("proxy_pass http://127.0.0.1:8125;" in body
               for body in locations.values())
    assert host.site.read_text().count(MARK) == 1


def test_uninstall_restores_everything(host, seen):
    host.add_mainsail_site()
    before = host.snapshot()
    host.run()
    assert host.snapshot() != before
    res = host.run("--uninstall")
    assert host.snapshot() == before      # files byte for byte, links gone
    assert not host.link.exists() and not host.link.is_symlink()
    charon = host.site_packages() / "Charon"
    assert not charon.exists() and not charon.is_symlink()
    assert not host.snippet.exists()
    # pip packages stay, and the script says so
    subprocess.run([str(host.venv / "bin" / "python"), "-c",
                    "import zeroconf"], check=True)
    assert "stay installed" in res.output
    assert [c for c in would_run(res.output)
            if "tables" not in c and "netfilter" not in c] == [
        host.nginx_test, "systemctl reload nginx",
        "systemctl restart klipper"]
    # a second uninstall finds nothing to do and changes nothing
    res = host.run("--uninstall")
    assert host.snapshot() == before
    assert "nothing of cura_connection" in res.output


def test_uninstall_keeps_klipper_stopped_while_configured(host):
    host.add_mainsail_site()
    host.run()
    with open(host.config / "printer.cfg", "a") as f:
        f.write("\n[cura_connection]\n")
    res = host.run("--uninstall")
    assert "[cura_connection] is still in" in res.output
    assert "systemctl restart klipper" not in would_run(res.output)


def test_nginx_site_variants(host):
    """Only server blocks listening on port 80 get the include: not the ones
    on 8080, 81 or 443; "server" and "{" on separate lines work; braces in
    comments are ignored; a sites-enabled file that is not a link is
    edited in place."""
    site = host.nginx / "sites-enabled" / "fluidd"
    text = (
        "# Fluidd { and } in a comment\n"
        "server {\n"
        "\tlisten 8080;\n"
        "\tlocation / { root /srv/a; }\n"
        "}\n"
        "server\n"
        "{\n"
        "\tlisten 0.0.0.0:80;\n"
        "\tlisten [::]:80;\n"
        "\tlocation / {\n"
        "\t\troot /srv/fluidd;  # }\n"
        "\t}\n"
        "}\n"
        "server {\n"
        "    listen 443 ssl;\n"
        "    location / { root /srv/b; }\n"
        "}\n"
        "server { listen 81; }\n")
    site.write_text(text)
    host.run("--no-restart")
    new = site.read_text()
    assert not site.is_symlink()
    blocks = server_blocks(new)
    assert [MARK in b for b in blocks] == [False, True, False, False]
    assert "\n\tinclude %s; %s\n}\nserver {\n    listen 443" % (
        host.snippet, MARK) in new
    host.run("--uninstall", "--no-restart")
    assert site.read_text() == text


def test_nginx_config_parses_with_debian_layout(host, tmp_path):
    """The edited site, included from a Debian-style nginx.conf with
    KIAUH's conf.d files, passes nginx -t."""
    nginx = _nginx()
    host.add_mainsail_site()
    host.run("--no-restart")
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        "pid %s/nginx.pid;\nevents {}\nhttp {\n%s"
        "    include %s/conf.d/*.conf;\n"
        "    include %s/sites-enabled/*;\n}\n"
        % (tmp_path, _nginx_temp_paths(tmp_path), host.nginx, host.nginx))
    res = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf),
                          "-e", str(tmp_path / "error.log")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


# ---------------------------------------------------------------------------
# Without nginx on port 80: iptables
# ---------------------------------------------------------------------------

def test_iptables_redirect_without_nginx_on_port_80(host, seen):
    # nginx here only serves another port: port 80 is free for the redirect
    site = host.add_mainsail_site(MAINSAIL_SITE.replace(
        "listen 80 default_server;", "listen 81 default_server;").replace(
        "{logdir}", str(host.logdir)).replace("{home}", str(host.home)))
    original = site.read_text()
    # the environment variable works like --dry-run-privileged
    res = host.run("--port", "8125", dry_flag=False,
                   env={"CURA_INSTALL_DRY_RUN": "1"})
    cmds = would_run(res.output)
    rule = ("-p tcp --dport 80 -m comment --comment cura_connection "
            "-j REDIRECT --to-ports 8125")
    assert "iptables -t nat -A PREROUTING " + rule in cmds
    assert "ip6tables -t nat -A PREROUTING " + rule in cmds
    assert "netfilter-persistent save" in cmds
    apt = [c for c in cmds if "apt-get" in c]
    if seen == "bare":
        assert apt == ["apt-get update -q",
                       "env DEBIAN_FRONTEND=noninteractive apt-get install "
                       "-y -q --no-install-recommends iptables "
                       "iptables-persistent"]
    else:
        assert apt == []
    # never a flush, never a rules file written directly
    assert [c for c in cmds if re.search(
        r"\s-F\b|--flush|rules\.v[46]|iptables-restore", c)] == []
    assert site.read_text() == original
    assert not host.snippet.exists()
    assert [c for c in cmds if "nginx" in c] == []


def test_no_port80_touches_neither_nginx_nor_iptables(host):
    host.add_mainsail_site()
    original = host.site.read_text()
    res = host.run("--no-port80", "--no-restart")
    assert host.site.read_text() == original
    assert not host.snippet.exists()
    assert would_run(res.output) == []
    assert "--no-port80" in res.output


# ---------------------------------------------------------------------------
# Other situations
# ---------------------------------------------------------------------------

def test_no_origin_skips_update_manager(tmp_path, klippy_venv, sandbox,
                                        repo_without_origin):
    h = Host(tmp_path / "home", klippy_venv, sandbox, repo_without_origin)
    try:
        h.add_mainsail_site()
        res = h.run("--no-restart")
        assert (h.config / "moonraker.conf").read_text() == MOONRAKER_CONF
        assert "no git remote 'origin'" in res.output
        assert os.readlink(h.link) == str(h.module)
    finally:
        _clean_venv(h)


def test_missing_klipper_fails_clearly_and_changes_nothing(host):
    host.add_mainsail_site()
    before = host.snapshot()
    res = host.run("--klipper-dir", str(host.home / "nope"), check=False)
    assert res.returncode != 0
    assert "klippy/extras not found" in res.output
    assert "--klipper-dir" in res.output
    assert host.snapshot() == before


def test_existing_file_in_extras_is_not_overwritten(host):
    host.link.write_text("# someone else's cura_connection\n")
    res = host.run(check=False)
    assert res.returncode != 0 and "is not a link" in res.output
    assert host.link.read_text() == "# someone else's cura_connection\n"


# Runs in the Klippy venv: the module's own UFP reading, with libcharon
READ_UFP = r"""
import importlib.util, json, os, sys
module, ufp, gcodes = sys.argv[1:]
for name in ("PyQt5", "gi", "dbus"):
    try:
        __import__(name)
        sys.exit(name + " is importable in the Klippy venv")
    except ImportError:
        pass
spec = importlib.util.spec_from_file_location("cura_connection", module)
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)     # loads the package beside it
from _cura_connection.intake import FileIntake, Upload
intake = FileIntake(gcodes, 1 << 30)
assert intake.charon is not None, "libcharon did not import"
def as_zip(*args):
    raise AssertionError("read as a plain zip, not with libcharon")
intake._unpack_zip = as_zip
upload = Upload(intake, os.path.getsize(ufp))
upload.tmp_path, upload.filename = ufp, os.path.basename(ufp)
gcode, thumbnail = intake._unpack_ufp(upload)
with open(gcode, "rb") as f:
    print(json.dumps({"gcode": f.read().decode(), "thumbnail": thumbnail.hex(),
                      "charon": os.path.realpath(intake.charon.__file__)}))
"""


@pytest.fixture
def pi_host(tmp_path, sandbox, repo_with_origin):
    """Raspberry Pi OS Lite + MainsailOS: no python3-charon (nor PyQt5,
    python3-gi, dbus), a fresh Klippy venv without system site packages."""
    venv = tmp_path / "venv" / "klippy-env"
    subprocess.run([os.environ.get("KLIPPY_PYTHON") or shutil.which(
        "python3"), "-m", "venv", str(venv)], check=True)
    h = Host(tmp_path / "home", venv, dict(
        sandbox, charon_dir=tmp_path / "no-python3-charon"),
        repo_with_origin)
    h.add_mainsail_site()
    return h


def test_pi_host_reads_ufp_without_pyqt5(pi_host, tmp_path, cura):
    import cura_client
    import gcode_samples
    h = pi_host
    res = h.run("--no-restart")
    # nothing installed with apt: only python3-charon's file downloaded
    assert [c for c in would_run(res.output) if "apt" in c] == []
    assert (h.home / "apt-downloads.log").read_text() == \
        "apt-get download python3-charon\n"
    own = h.home / "klippy-env" / "share" / "cura_connection"
    assert os.readlink(h.site_packages() / "Charon") == str(own / "Charon")
    assert sorted(p.name for p in own.iterdir()) == [
        "Charon", "python3-charon.version"]

    ufp = tmp_path / "benchy.ufp"
    gcode = gcode_samples.cura_gcode(print_time=600, count=40)
    thumbnail = gcode_samples.png()
    cura_client.make_ufp(str(ufp), gcode, thumbnail_png=thumbnail)
    gcodes = tmp_path / "gcodes"
    gcodes.mkdir()
    out = subprocess.run([str(h.venv / "bin" / "python"), "-c", READ_UFP,
                          str(h.module), str(ufp), str(gcodes)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["gcode"].encode() == gcode
    assert bytes.fromhex(got["thumbnail"]) == thumbnail
    assert got["charon"] == str(h.venv / "share" / "cura_connection" /
                                "Charon" / "__init__.py")

    # a second run keeps the unpacked copy; uninstall removes it
    res = h.run("--no-restart")
    assert "using libcharon" in res.output
    assert (h.home / "apt-downloads.log").read_text().count("\n") == 1
    h.run("--uninstall", "--no-restart")
    assert not (h.site_packages() / "Charon").is_symlink()
    assert not own.exists()


def test_pi_host_offline_says_what_is_missing(pi_host, fake_system):
    h = pi_host
    env = {"FAKE_APT_OFFLINE": "1", "FAKE_DIR": str(fake_system)}
    res = h.run("--no-restart", env=env, check=False)
    assert res.returncode != 0
    assert "cannot reach its Debian package mirror (offline?)" in res.stderr
    assert "UFP" in res.stderr
    assert res.stderr.rstrip().splitlines()[-1].startswith(
        "ERROR: libcharon is not installed")
    # for real: the package lists are refreshed once, then it gives up
    res = h.run("--no-restart", dry_flag=False, env=env, check=False,
                stubs=fake_system)
    assert res.returncode != 0
    assert _calls(fake_system) == ["apt-get update -q"]
    assert (h.home / "apt-downloads.log").read_text().count("\n") == 3
    assert "Connect to the internet" in res.stderr
    assert not (h.site_packages() / "Charon").exists()


def test_configured_printer_cfg_needs_no_hint(host):
    with open(host.config / "printer.cfg", "a") as f:
        f.write("\n[cura_connection]\nport: 8080\n")
    (host.config / "mainsail.cfg").write_text("[pause_resume]\n")
    res = host.run("--no-port80", "--no-restart")
    assert "[cura_connection] is configured" in res.output
    assert "[virtual_sdcard]" in res.output      # but that one is missing


def test_refuses_to_run_under_sudo(host):
    if os.geteuid() != 0:
        pytest.skip("needs root to look like 'sudo ./install.sh'")
    res = host.run(env={"SUDO_USER": "pi"}, check=False)
    assert res.returncode != 0 and "without sudo" in res.output
    assert not host.link.exists()


def test_dry_run_leaves_etc_nginx_alone(host):
    """With the default --nginx-dir (/etc/nginx) a dry run only prints what
    it would write there."""
    etc = Path("/etc/nginx")
    sites = list((etc / "sites-enabled").glob("*")) \
        if (etc / "sites-enabled").is_dir() else []
    if not any(re.search(r"^\s*listen\s+(\S*:)?80[\s;]",
                         p.read_text(errors="replace"), re.M)
               for p in sites if p.is_file()):
        pytest.skip("/etc/nginx has no site on port 80 on this machine")

    def tree():
        return {str(p): (p.read_bytes() if p.is_file() else None)
                for p in etc.rglob("*")}
    before = tree()
    cmd = ["bash", str(host.repo / "install.sh"), "--dry-run-privileged",
           "--no-restart"]
    res = subprocess.run(cmd, env=host.env(), capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (host.stub_bin / "calls.log").exists()
    assert tree() == before
    cmds = would_run(res.stdout)
    (put,) = [c for c in cmds
              if c.endswith(" /etc/nginx/snippets/cura_connection.conf")]
    assert "nginx -t -c /etc/nginx/nginx.conf" in cmds
    # what it would write there is kept where the user can read it
    kept = Path(put.split()[-2])
    try:
        assert "location ^~ /cluster-api/ {" in kept.read_text()
        assert "files the commands above would copy are kept in %s" % (
            kept.parent,) in res.stdout
    finally:
        shutil.rmtree(kept.parent)
    assert res.stdout.rstrip().splitlines()[-1].startswith(
        "==> Dry run: cura_connection would be installed once")


# ---------------------------------------------------------------------------
# Without --dry-run-privileged, against fake system commands
# ---------------------------------------------------------------------------


def test_real_iptables_rule_is_added_once_and_removed_exactly(
        host, fake_system):
    others = ("-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
              "-A PREROUTING -p tcp -m tcp --dport 80 -j REDIRECT "
              "--to-ports 8008\n")
    for name in ("iptables", "ip6tables"):
        (fake_system / (name + ".rules")).write_text(others)
    env = {"FAKE_DIR": str(fake_system)}
    ours = ("-A PREROUTING -p tcp -m tcp --dport 80 -m comment --comment "
            "cura_connection -j REDIRECT --to-ports %d")

    host.run("--port", "8125", dry_flag=False, env=env, stubs=fake_system)
    host.run("--port", "8125", dry_flag=False, env=env, stubs=fake_system)
    for name in ("iptables", "ip6tables"):
        assert (fake_system / (name + ".rules")).read_text() == \
            others + ours % 8125 + "\n"
    calls = _calls(fake_system)
    assert calls.count("netfilter-persistent save") == 1    # once: changed
    assert calls.count("systemctl restart klipper") == 2
    assert not any(c.startswith("apt-get") for c in calls)
    assert not any(" -F" in c or "--flush" in c for c in calls)

    # a new --port replaces our rule and leaves the others
    host.run("--port", "8126", "--no-restart", dry_flag=False, env=env,
             stubs=fake_system)
    assert (fake_system / "iptables.rules").read_text() == \
        others + ours % 8126 + "\n"

    # uninstall removes exactly our rule (whatever its port) and saves
    host.run("--uninstall", dry_flag=False, env=env, stubs=fake_system)
    for name in ("iptables", "ip6tables"):
        assert (fake_system / (name + ".rules")).read_text() == others
    assert _calls(fake_system)[-2:] == ["netfilter-persistent save",
                                        "systemctl restart klipper"]


def test_offline_iptables_install_says_what_is_missing(host, fake_system,
                                                       tmp_path):
    # no nginx on port 80 and no iptables: apt must fetch it, and cannot
    bare = tmp_path / "no-iptables"
    bare.mkdir()
    for name in ("sudo", "apt-get", "systemctl"):
        shutil.copy2(fake_system / name, bare / name)
    res = host.run("--no-restart", dry_flag=False, stubs=bare, check=False,
                   env={"FAKE_DIR": str(fake_system), "FAKE_EXIT": "100"})
    assert res.returncode != 0
    assert _calls(fake_system) == [
        "apt-get update -q", "apt-get install -y -q --no-install-recommends "
        "iptables iptables-persistent"]
    assert "apt-get update failed (see above; offline?)" in res.stderr
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith("ERROR: apt-get could not install iptables "
                           "iptables-persistent"), res.stderr
    assert "offline?" in last


def test_real_nginx_rejecting_the_config_restores_the_site(host,
                                                           fake_system):
    host.add_mainsail_site()
    before = host.snapshot()
    env = {"FAKE_DIR": str(fake_system), "FAKE_NGINX_EXIT": "1"}
    res = host.run(dry_flag=False, env=env, stubs=fake_system, check=False)
    assert res.returncode != 0
    assert "nginx rejected the configuration" in res.output
    after = host.snapshot()
    for path in before:      # the nginx folder is as it was
        if path.startswith(str(host.nginx)):
            assert after[path] == before[path], path
    assert not host.snippet.exists()
    calls = _calls(fake_system)
    assert host.nginx_test in calls
    assert "systemctl reload nginx" not in calls

    # with nginx accepting it: tested, reloaded, and no iptables rule
    env["FAKE_NGINX_EXIT"] = "0"
    host.run(dry_flag=False, env=env, stubs=fake_system)
    calls = _calls(fake_system)
    ipt = [c for c in calls if c.split()[0] in ("iptables", "ip6tables")]
    assert [c for c in calls if c not in ipt][-3:] == [
        host.nginx_test, "systemctl reload nginx",
        "systemctl restart klipper"]
    # iptables is only asked for an old redirect of ours to drop
    assert set(ipt) == {
        "iptables -t nat -S PREROUTING", "ip6tables -t nat -S PREROUTING"}
    assert host.site.read_text().count(MARK) == 1
