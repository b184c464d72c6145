"""Moonraker 0.11.0 (from PyPI, in .venv/moonraker) on loopback, for the
side-by-side baselines.  Its data path is the Klippy work dir, so its
"gcodes" root is the same virtual_sdcard directory cura_connection uses, and
it talks to the same Klippy through its API socket."""
import json
import os
import socket
import subprocess
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(REPO, ".venv", "moonraker", "bin", "python")

CONFIG = """\
[server]
host: 127.0.0.1
port: {port}
klippy_uds_address: {sock}
max_upload_size: 2048

[authorization]
trusted_clients:
  127.0.0.0/8

[machine]
provider: none
validate_service: False
validate_config: False

[file_manager]
enable_object_processing: False
"""


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Moonraker:
    def __init__(self, data_path, klippy_sock):
        self.data_path = data_path
        self.klippy_sock = klippy_sock
        self.port = free_port()
        self.proc = None
        self.log_path = os.path.join(data_path, "logs", "moonraker.log")

    def version(self):
        return subprocess.check_output(
            [PYTHON, "-c", "import importlib.metadata as m; "
             "print(m.version('moonraker'))"], text=True).strip()

    def start(self, timeout=60.):
        cfg_dir = os.path.join(self.data_path, "config")
        os.makedirs(cfg_dir, exist_ok=True)
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        cfg = os.path.join(cfg_dir, "moonraker.conf")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(port=self.port, sock=self.klippy_sock))
        self.out = open(os.path.join(self.data_path, "logs",
                                     "moonraker.out"), "ab")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "moonraker", "-d", self.data_path, "-c", cfg,
             "-l", self.log_path],
            stdin=subprocess.DEVNULL, stdout=self.out,
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("Moonraker exited (%s); see %s"
                                   % (self.proc.returncode, self.log_path))
            try:
                info = self.get("/server/info")["result"]
                if info.get("klippy_state") == "ready":
                    return info
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("Moonraker not connected to Klippy")
            time.sleep(0.2)

    @property
    def pid(self):
        return self.proc.pid

    def get(self, path):
        with urllib.request.urlopen("http://127.0.0.1:%d%s"
                                    % (self.port, path), timeout=10) as r:
            return json.loads(r.read())

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
