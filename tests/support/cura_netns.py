"""Run a command inside a private network namespace that only has loopback.

Zeroconf/mDNS tests use this so that no multicast packet ever reaches a real
interface: the namespace has just ``lo``, brought up with multicast enabled
and a route for 224.0.0.0/4, which is all mDNS needs between two sockets on
the same host.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

SUPPORT_DIR = Path(__file__).resolve().parent

# Runs as `sh -c SETUP sh argv...`: set up lo, then exec the command itself.
SETUP = ("set -e; ip link set lo up; ip link set lo multicast on; "
         "ip route add 224.0.0.0/4 dev lo; exec \"$@\"")


def unshare_command():
    """`unshare --net` as root; otherwise also a user namespace in which we
    are root (needs unprivileged user namespaces)."""
    if os.geteuid() == 0:
        return ["unshare", "--net"]
    return ["unshare", "--user", "--map-root-user", "--net"]


def run_in_netns(argv, timeout=60, env=None, cwd=None):
    """Run argv in a fresh loopback-only network namespace.

    Returns the subprocess.CompletedProcess (stdout/stderr captured as text);
    raises subprocess.TimeoutExpired after `timeout` seconds.
    """
    command = unshare_command() + ["sh", "-c", SETUP, "sh"] + [str(a) for a in argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def run_python_in_netns(source, timeout=60, env=None):
    """Run Python source with this interpreter in a fresh namespace, with
    tests/support/ on sys.path (so `import cura_client` works)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SUPPORT_DIR)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return run_in_netns([sys.executable, "-c", source], timeout=timeout, env=env)


def run_probe(source, timeout=120):
    """Run a probe script in a fresh namespace; it prints its findings as
    one line "RESULT <json>", which is returned decoded."""
    proc = run_python_in_netns(source, timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout + proc.stderr
    return json.loads(lines[-1][len("RESULT "):])


@functools.lru_cache(maxsize=None)
def netns_available():
    """True if a loopback-only namespace can be made here (for skipif)."""
    try:
        return run_in_netns(["true"], timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
