"""An update by `git pull` keeps a printer working without install.sh.

Moonraker's update manager updates the checkout install.sh linked the
module from (a fast-forward of its git repository) while Klippy runs, then
restarts the Klipper service; install.sh does not run again.  Klippy's
extras/ keeps the one link install.sh made, to the checkout's
klippy_extras/cura_connection.py.  These tests install the last
single-file layout (OLD_LAYOUT) from a clone of this repository, fill it
with what a user has (queued real Cura uploads with their previews, synced
material profiles, a loaded material, an allowed Cura) and pull the commit
under test (this repository's HEAD; uncommitted changes are not pulled)
into the clone.  After the service restart, and over RESTART and
FIRMWARE_RESTART then, Klippy serves all of it unchanged with the front
process running the new package.  A RESTART between the pull and the
service restart keeps the old code (Klippy does not re-import modules):
Cura is still served everything, from Klippy's process.  The clone's
history must reach OLD_LAYOUT (a full clone, not a shallow one).
"""
import contextlib
import os
import subprocess

import pytest

import gcode_samples as gs
import httpc
import klippy_harness
import real_inputs
from hostile import children
from httpc import JOBS

# The last commit where everything was in cura_connection.py (its web page
# in klippy_extras/cura_connection_web.html)
OLD_LAYOUT = "84f80cb"
# What each side's front process runs (its command line)
OLD_FRONT = "cura_connection_front"
NEW_FRONT = "from _cura_connection import front"
# Uploads as Cura sends them: the PETG one first, held for its material
# (PLA is loaded), so none prints and all stay queued
UPLOADS = ("ufp_petg", "ufp_pla", "ufp_two", "cura5_thumbnail",
           "prusaslicer", "gcode_gz")


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


@pytest.fixture
def checkout(tmp_path):
    """A user's checkout: a clone of this repository at OLD_LAYOUT (a
    local clone: no network).  Returns (its folder, the commit to pull)."""
    head = git(klippy_harness.REPO_DIR, "rev-parse", "HEAD")
    old = subprocess.run(["git", "rev-parse", "-q", "--verify",
                          OLD_LAYOUT + "^{commit}"],
                         cwd=klippy_harness.REPO_DIR, capture_output=True)
    assert old.returncode == 0, \
        "this clone's history does not reach %s: fetch it all" % OLD_LAYOUT
    dest = tmp_path / "cura_connection"
    git(tmp_path, "clone", "-q", "--no-checkout", klippy_harness.REPO_DIR,
        str(dest))
    git(dest, "checkout", "-q", "-B", "main", OLD_LAYOUT)
    return dest, head


@contextlib.contextmanager
def linked(flavor, module):
    """install.sh's link: <klippy>/extras/cura_connection.py -> module;
    the harness' own link comes back afterwards."""
    link = os.path.join(klippy_harness.extras_dir(flavor),
                        "cura_connection.py")
    was = os.readlink(link)
    tmp = "%s.%d.tmp" % (link, os.getpid())

    def point(target):
        os.symlink(target, tmp)
        os.replace(tmp, link)
    point(str(module))
    try:
        yield link
    finally:
        point(was)


def front_command(k):
    """The command line of Klippy's one child, the front process."""
    found = httpc.wait_for(lambda: children(k.pid), 10., "the front process")
    assert len(found) == 1, found
    with open("/proc/%d/cmdline" % (found[0],), "rb") as f:
        return f.read().decode().split("\0")


def served(base, uuids):
    """Each job as Cura is served it: (its JSON, its preview's bytes)."""
    return {uuid: (httpc.get_json(base, JOBS + "/" + uuid),
                   httpc.request(base, "GET",
                                 JOBS + "/%s/preview_image" % uuid).body)
            for uuid in uuids}


def what_cura_sees(k, key_id, uuids):
    base = k.base_url()
    return {"jobs": [(j["uuid"], j["name"], j["status"])
                     for j in httpc.jobs(base)],
            "served": served(base, uuids),
            "printer": httpc.printer(base)["configuration"],
            "materials": httpc.get_json(base, "/cluster-api/v1/materials"),
            "pairing": httpc.get_json(base, "/api/v1/auth/check/" + key_id),
            "loaded": k.query("cura_connection")["cura_connection"][
                "materials"]}


def fill(k):
    """What a user has on the old install: synced profiles, PLA loaded, an
    allowed Cura 5, UPLOADS queued.  Returns (pairing id, job uuids)."""
    base = k.base_url()
    r = httpc.request(base, "POST", "/api/v1/auth/request", json_body={
        "application": "UltiMaker Cura 5.11.0", "user": "bob"})
    assert r.status == 200, r
    key_id = r.json()["id"]
    k.gcode("CURA_ALLOW ID=%s" % (key_id,))
    # Cura's material sync, then the operator loads PLA
    for body, headers in (httpc.multipart({}, {"file": real_inputs.profile(
            guid)}) for guid in (gs.GENERIC_PLA, gs.GENERIC_PETG)):
        assert httpc.request(base, "POST", "/cluster-api/v1/materials/",
                             body, headers).status == 200
    k.gcode("SET_CURA_MATERIAL GUID=%s" % (gs.GENERIC_PLA,))
    uuids = []
    for key in UPLOADS:
        sample = real_inputs.sample(key)
        r = httpc.upload(base, sample.filename, sample.data, owner=key)
        assert r.status == 200, (key, r)
        uuids.append(r.json()["uuid"])
    httpc.wait_for(lambda: (k.query("cura_connection")["cura_connection"][
        "held_job"] or {}).get("uuid") == uuids[0], what="the PETG job held")
    return key_id, uuids


def check_filled(seen, uuids):
    # the old install really holds what the tests compare with later
    assert seen["jobs"] == [(u, real_inputs.sample(key).filename.split(".")[0],
                             "queued") for u, key in zip(uuids, UPLOADS)]
    for uuid, key in zip(uuids, UPLOADS):
        assert seen["served"][uuid][1] == real_inputs.sample(key).preview, key
    assert seen["printer"][0]["material"]["guid"] == gs.GENERIC_PLA
    assert {m["guid"] for m in seen["materials"]} >= {gs.GENERIC_PLA,
                                                      gs.GENERIC_PETG}
    assert seen["pairing"]["message"] == "authorized", seen["pairing"]


def answered_here(k):
    return k.query("cura_connection")["cura_connection"]["answered_here"]


def check_new(k, checkout, link, seen, key_id, uuids, what):
    """Klippy runs the pulled code, its front the new package, and Cura is
    shown what it was shown before the pull."""
    assert k.info()["state"] == "ready", what
    assert what_cura_sees(k, key_id, uuids) == seen, what
    cmd = front_command(k)
    assert NEW_FRONT in cmd[2] and cmd[3] == os.path.realpath(
        os.path.join(checkout, "klippy_extras")), (what, cmd)
    # the polls are the front's: none reached Klippy's process
    assert "get_print_jobs" not in answered_here(k), what
    r = httpc.request(k.base_url(), "GET", "/print_jobs",
                      headers={"Accept": "text/html"})
    assert r.status == 200 and b"<html" in r.body.lower(), (what, r)
    assert os.readlink(link) == os.path.join(
        checkout, "klippy_extras", "cura_connection.py"), what
    assert not klippy_harness.own_tracebacks(k.log_text()), what


def pulled(checkout, head, link):
    """`git pull` as the update manager does it, Klippy running."""
    git(checkout, "pull", "-q", "--ff-only", "origin", head)
    assert git(checkout, "rev-parse", "HEAD") == head
    # the link install.sh made now leads to the new, small loader, and the
    # package it loads is beside it
    with open(link) as f:
        assert "def _load_package" in f.read()
    assert os.path.isfile(os.path.join(checkout, "klippy_extras",
                                       "_cura_connection", "__init__.py"))
    assert not os.path.exists(os.path.join(checkout, "klippy_extras",
                                           "cura_connection_web.html"))


def check_clean(k, checkout):
    """Nothing the update left behind: the checkout has no file git does
    not know (but the ignored __pycache__), the state folder no leftover;
    no traceback, in klippy.log or on Klippy's stderr (a front the old
    code boots from the new loader ends quietly)."""
    assert git(checkout, "status", "--porcelain") == ""
    assert not [f for f in os.listdir(k.data_dir)
                if f.endswith((".bad", ".tmp")) or f.startswith(".tmp")]
    with open(k.log_path, errors="replace") as f:
        assert not klippy_harness.own_tracebacks(f.read())
    out = k.output_text()
    assert "Traceback" not in out, out


def start_old(klippy_factory, link):
    k = klippy_factory()
    cmd = front_command(k)
    # the old single file really runs, and boots its front from the link
    with open(link) as f:
        assert "def _load_package" not in f.read()
    assert OLD_FRONT in cmd[2] and cmd[3] == link, cmd
    return k


class Install:
    """The old layout installed from the checkout, running, filled, and
    the checkout pulled to the commit under test (Klippy still running)."""
    def __init__(self, klippy_factory, checkout, head, link):
        self.checkout, self.link = checkout, link
        self.k = start_old(klippy_factory, link)
        self.key_id, self.uuids = fill(self.k)
        self.seen = what_cura_sees(self.k, self.key_id, self.uuids)
        check_filled(self.seen, self.uuids)
        pulled(checkout, head, link)

    def service_restart(self):
        # systemctl restart klipper, as the update manager does: a new
        # Klippy process
        self.k.stop()
        self.k.start()
        self.k.wait_ready()

    def check_new(self, what):
        check_new(self.k, self.checkout, self.link, self.seen, self.key_id,
                  self.uuids, what)


@pytest.fixture
def install(flavor, klippy_factory, checkout):
    checkout, head = checkout
    with linked(flavor, checkout / "klippy_extras" / "cura_connection.py") \
            as link:
        yield Install(klippy_factory, checkout, head, link)


def test_git_pull_then_service_restart(install):
    install.service_restart()
    install.check_new("service restart")
    install.k.restart()
    install.check_new("RESTART")
    install.k.restart(firmware=True)
    install.check_new("FIRMWARE_RESTART")
    check_clean(install.k, install.checkout)


def test_restart_after_git_pull_runs_the_old_code_until_a_new_process(
        install):
    k = install.k
    # The old code reads its web page per request from the file the pull
    # removed: until the service restart, a complete JSON error
    r = httpc.request(k.base_url(), "GET", "/print_jobs",
                      headers={"Accept": "text/html"})
    assert r.status == 500 and r.json()["status"] == 500, r
    assert "cura_connection_web.html" in r.json()["message"]
    # Klippy keeps imported modules over RESTART: the old code stays.  It
    # boots its front from the file the link leads to, now the new loader,
    # whose old entry point ends the child at once, quietly: the old code
    # answers in Klippy's process, as for any front it lost.
    for n, firmware in enumerate((False, True), 1):
        k.restart(firmware=firmware)
        httpc.wait_for(lambda: k.log_text().count(
            "front process ended (0); answering in Klippy's process") == n,
            what="the old code answering in Klippy's process")
        assert not children(k.pid)
        assert k.info()["state"] == "ready"
        assert what_cura_sees(k, install.key_id, install.uuids) \
            == install.seen, firmware
        assert answered_here(k)["get_print_jobs"] == 1, firmware
    # the service restart: the new code, its front, the same jobs
    install.service_restart()
    install.check_new("service restart")
    check_clean(k, install.checkout)


def test_restart_after_a_pull_of_the_package_keeps_the_front_it_loaded(
        klippy_factory, flavor, tmp_path):
    # A Klippy running the package (not the single file) when a git pull
    # changes it: RESTART keeps the package in Klippy's process, so the
    # front it boots must not be the pulled one (it would talk to the old
    # code): it ends at once and Klippy's process answers, with the jobs.
    copy = tmp_path / "checkout"
    subprocess.run(["cp", "-r", os.path.join(klippy_harness.REPO_DIR,
                                             "klippy_extras"), str(copy)],
                   check=True)
    with linked(flavor, copy / "cura_connection.py"):
        k = klippy_factory()
        base = k.base_url()
        assert httpc.upload(base, "kept.gcode", b";TIME:5\nG1 X1\n") \
            .status == 200
        assert NEW_FRONT in " ".join(front_command(k))
        pulled = copy / "_cura_connection" / "frames.py"
        pulled.write_text(pulled.read_text() + "# pulled\n")
        k.restart()
        httpc.wait_for(lambda: "front process ended (0); answering in "
                       "Klippy's process" in k.log_text(),
                       what="the pulled front to end")
        assert not children(k.pid)
        # (listening again in Klippy's process a moment after the log line)
        listed = httpc.wait_for(lambda: jobs_or_none(k.base_url()),
                                what="a reply from Klippy's process")
        assert [j["name"] for j in listed] == ["kept"]
        assert answered_here(k)["get_print_jobs"] >= 1
        assert not klippy_harness.own_tracebacks(k.log_text())


def jobs_or_none(base):
    try:
        return httpc.jobs(base)
    except OSError:
        return None
