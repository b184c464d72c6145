"""Talk to a headless Cura 5 (tests/support/cura5_driver.py) from the tests.

Cura 5 runs on PyQt6 in its own interpreter, ``.venv/cura5`` (made by
tests/setup_env.sh when CURA5_DIR is set); this process has Debian's PyQt5
for the Cura 4.13 leg, and the two never meet in one process.  The source
tree comes from CURA5_DIR (a folder with Cura/, Uranium/ and libCharon/).

    cura = Cura5()                       # starts the driver
    cura.device("127.0.0.1:8080")        # a LocalClusterOutputDevice
    cura.connect()                       # Cura's own connect(): polls, syncs
    state = cura.wait(lambda s: s["printers"])
"""
import json
import os
import subprocess
import time

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(os.path.dirname(SUPPORT_DIR))
PYTHON = os.path.join(REPO_DIR, ".venv", "cura5", "bin", "python")
DRIVER = os.path.join(SUPPORT_DIR, "cura5_driver.py")
# The local material library of the headless Cura: Debian's fdm-materials
# (unpacked for the Cura 4.13 leg by setup_env.sh)
MATERIALS_DIR = os.path.join(REPO_DIR, ".cache", "cura", "root", "usr",
                             "share", "cura", "resources", "materials")


def unavailable():
    """Why the Cura 5 leg cannot run here, or None."""
    root = os.environ.get("CURA5_DIR")
    if not root:
        return ("CURA5_DIR is not set: the Cura 5 leg needs Cura 5 source "
                "trees (see README, Run the tests)")
    if not os.path.isdir(os.path.join(root, "Cura", "plugins",
                                      "UM3NetworkPrinting")):
        return "CURA5_DIR=%s has no Cura/plugins/UM3NetworkPrinting" % (
            root,)
    if not os.path.exists(PYTHON):
        return ".venv/cura5 is missing: run tests/setup_env.sh with " \
            "CURA5_DIR set"
    return None


class Cura5Error(Exception):
    pass


class Cura5:
    def __init__(self):
        self.proc = subprocess.Popen(
            [PYTHON, DRIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, bufsize=1, env=dict(os.environ,
                                           QT_QPA_PLATFORM="offscreen"))
        self._read()   # "ready"

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise Cura5Error("the Cura 5 driver ended (exit %s)"
                             % (self.proc.wait(),))
        reply = json.loads(line)
        if not reply.pop("ok"):
            raise Cura5Error(reply["error"])
        return reply

    def call(self, cmd, **kwargs):
        self.proc.stdin.write(json.dumps(dict(kwargs, cmd=cmd)) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    # shortcuts
    def device(self, address, materials=None, **kwargs):
        """A new device for address; materials: container ids of the local
        material library to use (None: all of Debian's fdm-materials)."""
        return self.call("device", address=address,
                         materials_dir=MATERIALS_DIR, materials=materials,
                         **kwargs)

    def connect(self):
        return self.call("connect")

    def run(self, seconds):
        return self.call("run", seconds=seconds)

    def state(self):
        return self.call("state")

    def replies(self, since=0):
        return self.call("replies", since=since)["replies"]

    def get(self, what, uuid=None):
        return self.call("get", what=what, uuid=uuid)

    def upload(self, path, file_name=None, unique_name=None):
        """unique_name: the printer chosen in Cura's printer-selection
        dialog (None: "Automatic")."""
        return self.call("upload", path=str(path), file_name=file_name,
                         unique_name=unique_name)

    def action(self, kind, uuid):
        return self.call("action", kind=kind, uuid=uuid)["reply"]

    def wait(self, pred, timeout=30., what="Cura 5's state"):
        """Let Cura run until pred(state) is true; returns that state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if pred(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for %s; last: %r"
                                     % (what, state))
            self.run(0.3)
