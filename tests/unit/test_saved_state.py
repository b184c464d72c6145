"""What the module saves, it reads back unchanged.

A hypothesis state machine builds every saved file through the module's
own code paths from real inputs: uploads (real_inputs: UFPs as Cura's
UFPWriter writes them, slicers' G-code with thumbnails, .gcode.gz...)
received by FileIntake and queued by CuraApi.add_upload, the job
lifecycle against a small Klipper model (fakes.FakeKlipper), prints
Klipper started from sub-folders with Moonraker's thumbnails,
SET_CURA_MATERIAL's entries, Cura 5's pairing requests (AuthStore) and
synced material profiles (MaterialStore, the Debian fdm-materials files).
At each restart every store is saved with its save(), a fresh one loads
the file, and every field must be what it was: nothing dropped, no .bad
file.  The one legitimate change: a job that was printing comes back
failed (the new printer object cannot still be printing it).
"""
import json
import os
import re
import shutil
import tempfile
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant,
                                 precondition, rule)

import gcode_samples
import real_inputs
from fakes import FakeKlipper

from _cura_connection.access import AuthStore  # noqa: E402
from _cura_connection.errors import Conflict  # noqa: E402
from _cura_connection.intake import FileIntake  # noqa: E402
from _cura_connection.jobs import ACTIVE, JobStore  # noqa: E402
from _cura_connection.lifecycle import JobLifecycle  # noqa: E402
from _cura_connection.materials import (  # noqa: E402
    LoadedMaterials, MaterialStore, parse_material_words)
from _cura_connection.names import split_upload_name  # noqa: E402

SAMPLES = real_inputs.samples()
PROFILES = real_inputs.profile_files()
PROFILE_GUIDS = sorted({MaterialStore.parse(data)["guid"]
                        for _, data in PROFILES})
EXTRUDERS = [("extruder", None), ("extruder1", {"material": "PLA"})]
HISTORY = 5
# Names users give their files (Cura sends the project's name)
UPLOAD_STEMS = ["cube", "Würfel (2)", "a b;c", "C:\\Users\\bob\\part",
                "x" * 230, ".hidden", "..", "名前"]
# Prints Klipper started itself (Mainsail, a macro): any folder, any
# name; and the sizes of the thumbnails Moonraker extracted from each
EXTERNAL_FILES = {"klipper_part.gcode": [32, 300],
                  "my prints/Part 1.gcode": [300],
                  "a/b/c/benchy (2).GCODE": [],
                  "üñí/x.g": [32, 400]}


class SavedState(RuleBasedStateMachine):
    def __init__(self):
        RuleBasedStateMachine.__init__(self)
        self.root = tempfile.mkdtemp(prefix="saved-state-")
        self.gcodes = os.path.join(self.root, "gcodes")
        self.data = os.path.join(self.gcodes, ".cura_connection")
        os.makedirs(self.data)
        self.intake = FileIntake(self.gcodes, 1 << 30)
        self.previews = {}      # job uuid -> the preview bytes it must show
        self.restarts = 0
        self.load()

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def load(self):
        """The stores as load_config() makes them, from the files."""
        path = os.path.join
        self.store = JobStore(path(self.data, "queue.json"), HISTORY,
                                 False)
        self.loaded = LoadedMaterials(
            path(self.data, "loaded_materials.json"), EXTRUDERS)
        self.auth = AuthStore(path(self.data, "auth.json"))
        self.materials = MaterialStore(path(self.data, "materials"))
        self.klipper = FakeKlipper()

        def want_metadata(job):
            self.store.set_metadata(job, self.intake.read_metadata(
                job.filename))
        self.life = JobLifecycle(
            self.klipper, self.store, want_metadata,
            lambda job: [] if job.force else self.loaded.changes(
                job.materials))
        self.api = real_inputs.cura_api(
            self.gcodes, self.data, store=self.store, intake=self.intake,
            materials=self.materials, bridge=self.klipper,
            lifecycle=self.life)
        for state in (self.store, self.loaded, self.auth):
            assert not state.dirty or state is self.store, state.path
            assert not os.path.exists(state.path + ".bad"), state.path

    # Real inputs through the module's own paths

    @rule(key=st.sampled_from(real_inputs.KEYS),
          stem=st.sampled_from(UPLOAD_STEMS) | st.just(None),
          owner=st.sampled_from(["", "bob", "Ünïcode user", "x" * 150]))
    def upload(self, key, stem, owner):
        sample = SAMPLES[key]
        filename = sample.filename
        if stem is not None:
            filename = stem + split_upload_name(filename)[1]
        reply = real_inputs.upload(self.api, sample, filename, owner)
        job = self.store.get(reply["uuid"])
        # the real input is read as the printer must read it
        assert job.time_estimate == sample.time_estimate, sample
        assert [m.get("guid") for m in job.materials] == sample.guids
        assert (job.preview is None) == (sample.preview is None), sample
        self.previews[job.uuid] = sample.preview

    @rule(index=st.integers(0, len(PROFILES) - 1),
          other_name=st.none() | st.integers(0, len(PROFILES) - 1),
          newer=st.integers(0, 2))
    def sync_material(self, index, other_name, newer):
        # Cura's material sync: a profile under its own name (or another
        # profile's: a renamed or re-made one), maybe a newer version
        name, data = PROFILES[index]
        if other_name is not None:
            name = PROFILES[other_name][0]
        if newer:
            data = re.sub(rb"<version>(\d+)</version>", lambda m: b"<version>"
                          + str(int(m.group(1)) + newer).encode()
                          + b"</version>", data, count=1)
        self.materials.add(name, data)

    @rule(extruder=st.sampled_from([name for name, _ in EXTRUDERS]),
          guid=st.sampled_from(PROFILE_GUIDS) | st.builds(
              lambda: str(uuid.uuid4()).upper()) | st.none(),
          material=st.sampled_from(["PLA", "PETG", "empty", "None", " ABS "])
          | st.text(max_size=70) | st.none(),
          brand=st.sampled_from(["Generic", "Some Brand"]) | st.none(),
          color=st.sampled_from(["ff8000", "#FF8000", "Black", " Red "])
          | st.none())
    def set_material(self, extruder, guid, material, brand, color):
        # SET_CURA_MATERIAL: what it refuses is not kept
        words = {k: v for k, v in (("GUID", guid), ("MATERIAL", material),
                                   ("BRAND", brand), ("COLOR", color))
                 if v is not None}
        try:
            entry = parse_material_words(words)
        except ValueError:
            return
        self.loaded.set(extruder, entry)

    @rule(application=st.sampled_from(["Cura", "UltiMaker Cura 5.11.0"])
          | st.text(max_size=80),
          user=st.text(max_size=80),
          address=st.sampled_from(["127.0.0.1", "::1", "192.168.1.20",
                                   "fe80::1%eth0"]))
    def pairing_request(self, application, user, address):
        self.auth.request(application, user, address)

    @precondition(lambda self: self.auth.clients)
    @rule(n=st.integers(0, 100), allow=st.booleans())
    def allow_or_remove(self, n, allow):
        ids = sorted(self.auth.clients)
        key_id = ids[n % len(ids)]
        if allow:
            assert self.auth.allow(key_id)
        else:
            assert self.auth.remove(key_id)

    # The lifecycle

    @rule()
    def follow(self):
        self.klipper.follow(self.life)

    @precondition(lambda self: self.klipper.active)
    @rule(state=st.sampled_from(["complete", "cancelled", "error"]),
          duration=st.integers(0, 10 ** 6))
    def print_ends(self, state, duration):
        self.klipper.finish(state, duration)
        self.klipper.follow(self.life)

    @rule()
    def plate_cleared(self):
        try:
            self.life.plate_cleared()
        except Conflict:
            pass
        self.klipper.run_callbacks()

    @precondition(lambda self: self.store.queue)
    @rule(n=st.integers(0, 100), to=st.integers(0, 100),
          what=st.sampled_from(["move", "delete", "force", "unforce"]))
    def change_queue(self, n, to, what):
        job = self.store.queue[n % len(self.store.queue)]
        if what == "move":
            self.store.move(job.uuid, to)
        elif what == "delete":
            self.store.delete(job.uuid)
        else:
            self.store.set_force(job.uuid, what == "force")

    @precondition(lambda self: not self.klipper.active)
    @rule(filename=st.sampled_from(sorted(EXTERNAL_FILES)))
    def external_print(self, filename):
        # Started from Mainsail: the file and the thumbnails Moonraker
        # extracted (<name>-<w>x<h>.png in the .thumbs folder beside it)
        path = os.path.join(self.gcodes, filename)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        sample = SAMPLES["prusaslicer"]
        with open(path, "wb") as f:
            f.write(sample.data)
        stem = os.path.splitext(os.path.basename(filename))[0]
        thumbs = os.path.join(os.path.dirname(path), ".thumbs")
        os.makedirs(thumbs, exist_ok=True)
        images = {}
        for size in EXTERNAL_FILES[filename]:
            image = gcode_samples.qt_image(size, size, (9, size % 256, 90),
                                           "PNG")
            name = "%s-%dx%d.png" % (stem, size, size)
            with open(os.path.join(thumbs, name), "wb") as f:
                f.write(image)
            images[name] = image
        k = self.klipper
        k.filename, k.state, k.active, k.duration = \
            filename, "printing", True, 12.
        k.follow(self.life)
        job = self.store.current
        assert job.filename == filename and job.source == "klipper"
        assert job.time_estimate == sample.time_estimate
        if images:
            # the biggest file Moonraker left
            self.previews[job.uuid] = max(images.values(), key=len)
            assert job.preview is not None
        else:
            self.previews[job.uuid] = None

    # Restarts

    @rule()
    def restart(self):
        """RESTART, FIRMWARE_RESTART, kill -9 + start: what was saved is
        all a new process has."""
        before = self.saved_states()
        for state in (self.store, self.loaded, self.auth):
            state.save()
        self.materials.save()
        self.load()
        self.restarts += 1
        after = self.saved_states()
        cur_before, cur_after = before["queue"]["current"], \
            after["queue"]["current"]
        if cur_before is not None and cur_before["status"] in ACTIVE:
            # (the only field values a restart changes: see the module doc)
            assert cur_after["status"] == "failed_wait_cleanup"
            assert cur_after["message"] == "Interrupted by a Klipper restart"
            assert cur_after["finished_at"] is not None
            for key in ("status", "message", "finished_at"):
                cur_before[key] = cur_after[key]
        assert after == before
        # and what is saved now is what was loaded
        self.store.save()
        assert self.saved_states() == after
        again = JobStore(self.store.path, HISTORY, False)
        assert again.state() == self.store.state() and not again.dirty

    def saved_states(self):
        """Every saved field of every store, and each job's preview bytes
        as Cura is served them."""
        cur, queue, history = self.store.all_jobs()
        return {
            "queue": self.store.state(),
            "previews": {j.uuid: self.intake.read_preview(j.preview)
                         if j.preview else None
                         for j in cur + queue + history},
            "loaded": self.loaded.state(),
            "loaded_status": self.loaded.status_cache,
            "auth": self.auth.state(),
            "materials": self.materials.list()}

    @invariant()
    def previews_are_the_uploads(self):
        cur, queue, history = self.store.all_jobs()
        for job in cur + queue + history:
            want = self.previews[job.uuid]
            got = self.intake.read_preview(job.preview) if job.preview \
                else None
            assert got == want, (job.to_dict(), self.restarts)

    @invariant()
    def nothing_kept_aside(self):
        for name in os.listdir(self.data):
            assert not name.endswith(".bad"), name


SavedState.TestCase.settings = settings(
    max_examples=int(os.environ.get("CURA_SAVED_STATE_EXAMPLES", "25")),
    stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
test_saved_state_round_trips = SavedState.TestCase


GOOD = {"uuid": "1234abcd", "name": "a", "filename": "a.gcode",
        "status": "queued"}
EXTERNAL = dict(GOOD, source="klipper", status="finished",
                filename="my prints/Part 1.gcode")


@pytest.mark.parametrize("job,kept", [
    # the forms the module writes
    (dict(GOOD, preview=".thumbs/a.png"), True),
    (dict(GOOD, preview=".thumbs/a.jpg"), True),
    (dict(GOOD, filename="x" * 200 + "-12.gcode",
          preview=".thumbs/" + "x" * 200 + "-12.png"), True),
    (dict(EXTERNAL, preview="my prints/.thumbs/Part 1-300x300.png"), True),
    (dict(EXTERNAL, filename="a/b/benchy.GCODE",
          preview="a/b/.thumbs/benchy.jpg"), True),
    # hand-edited: escapes, other folders, other files
    (dict(GOOD, preview="../x.png"), False),
    (dict(GOOD, preview="/etc/x.png"), False),
    (dict(GOOD, preview=".thumbs/../../x.png"), False),
    (dict(GOOD, preview=".thumbs//a.png"), False),
    (dict(GOOD, preview="other/.thumbs/a.png"), False),
    (dict(GOOD, preview=".thumbs/a.gcode"), False),
    (dict(GOOD, preview=".thumbs/a\n.png"), False),
    (dict(GOOD, preview="a.png"), False),
    (dict(EXTERNAL, preview=".thumbs/Part 1.png"), False),
    (dict(EXTERNAL, filename="../x.gcode"), False),
    (dict(EXTERNAL, filename="/abs/x.gcode"), False),
    (dict(EXTERNAL, filename="a//x.gcode"), False),
    (dict(EXTERNAL, filename="a/./x.gcode"), False),
    (dict(EXTERNAL, filename="x\n.gcode"), False),
    (dict(EXTERNAL, filename="x.txt"), False),
    # only a file the module received and named is queued or Cura's
    (dict(GOOD, filename="a b.gcode"), False),
    (dict(GOOD, filename="sub/a.gcode"), False),
    (dict(EXTERNAL, source="cura"), False),
    (dict(EXTERNAL, status="queued"), False),
])
def test_saved_paths_are_the_forms_the_module_writes(tmp_path, job, kept):
    path = tmp_path / "queue.json"
    key = "queue" if job["status"] == "queued" else "history"
    data = {key: [job]}
    path.write_text(json.dumps(data))
    s = JobStore(str(path), 5, False)
    jobs = s.queue + s.history
    assert (len(jobs) == 1) == kept
    assert (tmp_path / "queue.json.bad").exists() != kept
    if kept:
        assert {k: getattr(jobs[0], k) for k in job} == job
