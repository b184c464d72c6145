"""Disks for the real-Klippy tests: a Klippy whose gcodes folder is a small
tmpfs in its own mount namespace, filling a disk, and what an upload may
leave behind."""
import os
import shutil

import pytest

import httpc
from httpc import JOBS
import klippy_harness
from hostile import request_bytes


def leftovers(folder, live_pid=None):
    """Partial uploads and half-written files anywhere below folder (but
    for a queue save the live Klippy may be doing at this moment)."""
    own = ".cura-tmp-%s-" % (live_pid,)
    out = []
    for root, dirs, files in os.walk(folder):
        out += [os.path.join(root, f) for f in files
                if (f.endswith(".part") or f.startswith(".cura-"))
                and not f.startswith(own)]
    return out


def start_with_mounts(k, monkeypatch, script):
    """Start Klippy k in its own mount namespace (unshare --mount; needs
    root), after the shell script has run there with $0 = k.workdir."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare for private mounts")
    outer = klippy_harness._die_with_parent

    def in_namespace():
        return ["unshare", "--mount", "--propagation", "private", "--",
                "sh", "-c", script + ' && exec "$@"', k.workdir] + outer()
    monkeypatch.setattr(klippy_harness, "_die_with_parent", in_namespace)
    k.start()
    k.wait_ready()


def tmpfs_gcodes(klippy_factory, monkeypatch, mib, state_inside=False,
                 **kw):
    """A Klippy whose gcodes folder is a tmpfs of mib MiB in its own mount
    namespace; the test reaches the files through k.disk.  state_inside:
    its state folder too (data_path in the gcodes folder)."""
    k = klippy_factory(start=False, **kw)
    if state_inside:
        k.module_options["data_path"] = os.path.join(k.gcodes_dir,
                                                     ".cura_connection")
    start_with_mounts(k, monkeypatch, 'mount -t tmpfs -o size=%dm '
                      'cura-test "$0/gcodes"' % (mib,))
    with open("/proc/%d/mounts" % (k.pid,)) as f:
        assert " %s tmpfs " % (k.gcodes_dir,) in f.read()
    k.disk = "/proc/%d/root%s" % (k.pid, k.gcodes_dir)
    return k


def fill(path, leave=0):
    """Fill the file system of path up to `leave` bytes free."""
    filler = os.path.join(path, "filler")
    chunk = b"\0" * (1 << 20)
    with open(filler, "ab") as f:
        try:
            while True:
                st = os.statvfs(path)
                free = st.f_bavail * st.f_frsize - leave
                if free <= 0:
                    break
                f.write(chunk[:min(len(chunk), free)])
                f.flush()
        except OSError:
            pass
    return filler


def parts_in(folder):
    return [n for n in os.listdir(folder) if n.endswith(".part")]


def gcode_upload(path, filename, mib):
    """The bytes of a POST to path uploading filename: mib MiB of G-code."""
    line = b"G1 X1 Y1\n"
    body, headers = httpc.multipart({"owner": "x"}, {"file": (
        filename, line * ((mib << 20) // len(line)))})
    return request_bytes("POST", path, headers, body)


# An upload to this path is handed to Klippy's side by the front (its
# request line is not the front's upload route) and received there
TO_KLIPPY = JOBS + "//"
