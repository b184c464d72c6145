"""A group member as the host reaches it: a real Klippy (the harness's
simulated printer, without cura_connection) and a real Moonraker 0.11.0
(.venv/moonraker) on a free loopback port, talking to that Klippy through
its API socket.  Moonraker's data path is the Klippy's work dir, so its
"gcodes" root is the Klippy's virtual_sdcard folder.

    member = start_member(tmp_path / "voron", flavor)
    member.url, member.gcodes_dir, member.klippy, member.moonraker
    member.stop_moonraker(); member.start_moonraker()   # same port
    member.close()                                      # stops both

Moonraker's temporary upload files go to member.tmp_dir (its TMPDIR), so
a test can see what a broken upload leaves behind.
"""
import json
import os
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import klippy_harness

PYTHON = os.path.join(klippy_harness.VENV_DIR, "moonraker", "bin", "python")

CONFIG = """\
[server]
host: {host}
port: {port}
klippy_uds_address: {sock}
max_upload_size: 2048

[authorization]
trusted_clients:
  {trusted}

[machine]
provider: none
validate_service: False
validate_config: False

[file_manager]
enable_object_processing: False

[webcam {webcam}]
stream_url: {stream_url}
snapshot_url: {snapshot_url}
"""

WEBCAM = "bedcam"
# A trusted_clients range that leaves out loopback: Moonraker asks the
# tests for an API key
UNTRUSTED = "10.255.255.0/24"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Moonraker:
    """The real Moonraker process.  trusted: the [authorization]
    trusted_clients range; one that leaves out 127.0.0.1 makes it ask
    loopback clients for an API key (401 without).  host: the address
    it listens on; exec_prefix: put before its command line (another
    network namespace)."""
    def __init__(self, data_path, klippy_sock, port=None,
                 trusted="127.0.0.0/8", tmp_dir=None, webcam_url=None,
                 host="127.0.0.1", exec_prefix=()):
        self.host = host
        self.exec_prefix = list(exec_prefix)
        self.data_path = str(data_path)
        self.klippy_sock = klippy_sock
        self.port = port or free_port()
        self.trusted = trusted
        self.tmp_dir = tmp_dir
        # (its webcam list: crowsnest's relative URL unless given)
        self.webcam_url = webcam_url
        self.proc = None
        self.out = None
        self.log_path = os.path.join(self.data_path, "logs", "moonraker.log")

    def version(self):
        return subprocess.check_output(
            [PYTHON, "-c", "import importlib.metadata as m; "
             "print(m.version('moonraker'))"], text=True).strip()

    def start(self, timeout=60., wait_klippy=True):
        """Start it; wait until it answers (and, with wait_klippy, until
        its Klippy is ready).  Returns /server/info's result."""
        cfg_dir = os.path.join(self.data_path, "config")
        os.makedirs(cfg_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        cfg = os.path.join(cfg_dir, "moonraker.conf")
        with open(cfg, "w") as f:
            stream = self.webcam_url or "/webcam/?action=stream"
            f.write(CONFIG.format(
                host=self.host, port=self.port, sock=self.klippy_sock,
                trusted=self.trusted, webcam=WEBCAM, stream_url=stream,
                snapshot_url=stream.replace("action=stream",
                                            "action=snapshot")))
        env = dict(os.environ)
        if self.tmp_dir:
            os.makedirs(self.tmp_dir, exist_ok=True)
            env["TMPDIR"] = self.tmp_dir
        self.out = open(os.path.join(self.data_path, "logs",
                                     "moonraker.out"), "ab")
        self.proc = subprocess.Popen(
            self.exec_prefix + [
                PYTHON, "-m", "moonraker", "-d", self.data_path, "-c", cfg,
             "-l", self.log_path],
            stdin=subprocess.DEVNULL, stdout=self.out, env=env,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("Moonraker exited (%s); see %s"
                                   % (self.proc.returncode, self.log_path))
            try:
                info = self.get("/server/info")["result"]
                if not wait_klippy or info.get("klippy_state") == "ready":
                    return info
            except urllib.error.HTTPError:
                if not wait_klippy:     # it answers (401: not trusted)
                    return None
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Moonraker not connected to Klippy")
            time.sleep(0.2)

    @property
    def pid(self):
        return self.proc.pid

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def get(self, path, api_key=None):
        req = urllib.request.Request("http://%s:%d%s"
                                     % (self.host, self.port, path))
        if api_key:
            req.add_header("X-Api-Key", api_key)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def kill9(self):
        if self.running:
            self.proc.kill()
        self.stop()

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()
        self.out.close()
        self.proc = None


class Member:
    """A Klippy and its Moonraker; see the module's docstring."""
    def __init__(self, workdir, flavor, trusted="127.0.0.0/8",
                 webcam_url=None, **klippy_kw):
        workdir = str(workdir)
        self.name = os.path.basename(workdir.rstrip("/"))
        self.klippy = klippy_harness.Klippy(flavor, workdir,
                                            with_module=False, **klippy_kw)
        self.tmp_dir = os.path.join(workdir, "tmp")
        self.moonraker = Moonraker(workdir, self.klippy.sock_path,
                                   trusted=trusted, tmp_dir=self.tmp_dir,
                                   webcam_url=webcam_url)

    @property
    def url(self):
        return "http://%s:%d" % (self.moonraker.host, self.moonraker.port)

    @property
    def gcodes_dir(self):
        return self.klippy.gcodes_dir

    def gcodes(self):
        """The names in the gcodes folder (Moonraker's hidden ones too)."""
        return sorted(os.listdir(self.gcodes_dir))

    def start(self):
        self.klippy.start()
        self.klippy.wait_ready()
        self.start_moonraker()
        return self

    def start_moonraker(self, wait_klippy=None):
        # An untrusted Moonraker cannot be asked whether Klippy is ready
        if wait_klippy is None:
            wait_klippy = self.moonraker.trusted != UNTRUSTED
        return self.moonraker.start(wait_klippy=wait_klippy)

    def stop_moonraker(self, kill=False):
        if kill:
            self.moonraker.kill9()
        else:
            self.moonraker.stop()

    def close(self):
        self.moonraker.stop()
        self.klippy.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def group_printers(members, urls=None):
    """The host's group_printers option for these members (urls: name ->
    another URL for that member, such as a proxy's)."""
    urls = urls or {}
    return ", ".join("%s=%s" % (m.name, urls.get(m.name, m.url))
                     for m in members)


def start_member(workdir, flavor, trusted="127.0.0.0/8", webcam_url=None,
                 **klippy_kw):
    """A started member (Klippy ready, Moonraker connected to it; its
    webcam list names webcam_url).  klippy_kw go to klippy_harness.Klippy
    (extruders=2, ...)."""
    member = Member(workdir, flavor, trusted, webcam_url, **klippy_kw)
    try:
        return member.start()
    except BaseException:
        member.close()
        raise


class BreakingProxy:
    """A loopback TCP relay to a member's Moonraker that breaks an upload
    half way: after cut_after bytes from the client it stops relaying and
    sets .reached; once .release is set (at once unless hold) it closes
    both sides.  proxy.url stands for the member.  By default it relays
    one connection, the one it breaks; with uploads_only it relays every
    connection (polls, websockets) whole and breaks only the first file
    upload (POST /server/files/upload): a whole member behind it."""
    UPLOAD = b"POST /server/files/upload"

    def __init__(self, port, cut_after, hold=False, uploads_only=False):
        self.port = port
        self.cut_after = cut_after
        self.uploads_only = uploads_only
        self.broken = False
        self.reached = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.sockets = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % (self.listener.getsockname()[1],)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:          # closed
                return
            if not self.uploads_only:
                self._serve(client, True)
                return
            threading.Thread(target=self._serve, args=(client, False),
                             daemon=True).start()

    def _serve(self, client, cut):
        try:
            upstream = socket.create_connection(("127.0.0.1", self.port))
        except OSError:
            client.close()
            return
        with self.lock:
            self.sockets += [client, upstream]
        back = threading.Thread(target=self._back, args=(upstream, client),
                                daemon=True)
        back.start()
        sent = 0
        try:
            first = client.recv(65536)
            with self.lock:
                if not cut and not self.broken \
                        and first.startswith(self.UPLOAD):
                    cut = self.broken = True
            while first:
                if cut and sent + len(first) >= self.cut_after:
                    upstream.sendall(first[:self.cut_after - sent])
                    break
                upstream.sendall(first)
                sent += len(first)
                first = client.recv(65536)
        except OSError:
            pass
        if cut:
            self.reached.set()
            self.release.wait()
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        back.join()

    @staticmethod
    def _back(upstream, client):
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    return
                client.sendall(data)
        except OSError:
            return

    def close(self):
        self.release.set()
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.thread.join(10)
