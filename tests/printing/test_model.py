"""A stateful, model-based test of the job lifecycle: hypothesis drives
uploads, actions, plate clearing, console prints, busy macros,
restarts, kill -9 and damaged state files against the real Klippy, with
Cura 4.13's own client, and checks after every step:

  - Cura's parsed view (its Monitor tab models) matches Klipper's state
    within one status period;
  - a file whose abort was acknowledged (2xx) never prints again;
  - every 2xx action changed the job as asked, every 409 was an action
    that did not apply (or Klipper was busy) and changed nothing;
  - a job Cura shows held (queued on the card, with its configuration
    changes) waits for a material it was not given, and was not forced;
    at most one job points at the printer;
  - Klippy is ready;
  - the saved queue equals the one served, once settled;
  - after any restart (RESTART, FIRMWARE_RESTART, kill -9) the queue and
    every job (its fields as served, its preview bytes) are what was
    served before it, except the job on the printer, which has ended;
  - uploads are real clients' files (real_inputs): UFPs with thumbnails
    and profiles, slicers' G-code with thumbnails, .gcode.gz...;
  - no job and no queued file is lost (except entries of a state file the
    test damaged on purpose, which are kept aside as .bad).

CI runs a bounded, seeded run (MODEL_EXAMPLES x MODEL_STEPS); set
CURA_MODEL_SECONDS=1800 for a long run, e.g.
    CURA_MODEL_SECONDS=1800 ./tests/run.sh tests/printing/test_model.py -s
The step count is printed at the end (-s shows it).
"""
import json
import os
import shutil
import sys
import time

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant,
                                 precondition, rule)

import cura_client
import gcode_samples
import httpc
import klippy_harness
import real_inputs
from httpc import JOBS, all_jobs

SECONDS = float(os.environ.get("CURA_MODEL_SECONDS", "0"))
TRACE = bool(os.environ.get("CURA_MODEL_TRACE"))   # each step on stderr
MODEL_EXAMPLES = 8
MODEL_STEPS = 8
STATUS_PERIOD = 0.5       # the module's SNAPSHOT_INTERVAL
ENDED = ("wait_cleanup", "aborted_wait_cleanup", "failed_wait_cleanup")
ACTIVE = ("pre_print", "printing", "pausing", "paused", "resuming",
          "aborting")
HISTORY = ("finished", "aborted", "failed")
PRINTING = {"printing": ("printing",), "pausing": ("pausing",),
            "paused": ("paused",)}
APPLIES = {"pause": ("printing",), "print": ("paused",),
           "abort": ("pre_print", "printing", "pausing", "paused",
                     "resuming", "aborting")}
BODIES = {
    "short": gcode_samples.moves(20, 10, 0.1),
    "long": gcode_samples.moves(2000, 10, 0.1),
    "m25": gcode_samples.moves(40, 10, 0.1) + "M25\n"
    + gcode_samples.moves(40, 10, 0.1),
    "error": gcode_samples.moves(20, 10, 0.1) + "M104 S5000\n",
}
MATERIALS = {"black": gcode_samples.ULTIMAKER_PLA_BLACK,
             "generic": gcode_samples.GENERIC_PLA}
STEPS = {"steps": 0, "examples": 0}
OUTCOMES = {}     # "pause printing -> 200" -> count, printed at the end


def note(what):
    OUTCOMES[what] = OUTCOMES.get(what, 0) + 1
    if TRACE:
        sys.stderr.write("model: %s\n" % (what,))


def klipper_print(k):
    st_ = k.query("print_stats", "virtual_sdcard", "pause_resume")
    ps = st_["print_stats"]
    active = st_["virtual_sdcard"]["is_active"]
    if active:
        state = "pausing" if st_["pause_resume"]["is_paused"] \
            else "printing"
    else:
        state = ps["state"]
    return state, ps["filename"]


def make_machine(k, workdir):
    data = k.data_dir

    class Lifecycle(RuleBasedStateMachine):
        def __init__(self):
            RuleBasedStateMachine.__init__(self)
            STEPS["examples"] += 1
            # a clean printer for each example (its state folder is not
            # in the G-code folder: both go)
            k.kill9()
            shutil.rmtree(k.gcodes_dir)
            shutil.rmtree(data, ignore_errors=True)
            os.makedirs(k.gcodes_dir)
            k.start()
            k.wait_ready()
            self.addr = "127.0.0.1:%d" % (k.cura_port(),)
            self.base = "http://" + self.addr
            self.api = cura_client.ClusterApi(self.addr)
            self.view = cura_client.MonitorView()
            self.known = {}           # uuid -> file name, jobs not deleted
            self.aborted = set()      # files whose abort was acknowledged
            self.hold_until = 0.
            # uploads are sliced for Ultimaker PLA Black or Generic PLA;
            # one known loaded holds the others
            k.gcode("SET_CURA_MATERIAL GUID=" + MATERIALS["black"])
            self.loaded = "black"
            self.material_of = {}     # uuid -> the material it was sliced for
            self.previews = {}        # uuid -> the preview bytes it shows
            self.forced = set()
            self.n = 0
            self.last_jobs = []       # as served at the last check
            self.pause_sent = set()   # files a pause was sent for

        def jobs(self):
            return all_jobs(self.base)

        def pick(self, i, pred=lambda j: True):
            js = [j for j in self.jobs() if pred(j)]
            return js[i % len(js)] if js else None

        def printing(self):
            """The file Klipper prints, "" for none."""
            state, filename = klipper_print(k)
            return filename if state in PRINTING else ""

        def current(self):
            js = self.jobs()
            return js[0] if js and "printer_uuid" in js[0] else None

        # Rules
        @rule(kind=st.sampled_from(sorted(BODIES)),
              form=st.sampled_from(real_inputs.KEYS),
              material=st.sampled_from(sorted(MATERIALS)))
        def upload(self, kind, form, material):
            # a real client's file (real_inputs): a form whose header
            # names a material is sliced for material, the others for none
            self.n += 1
            sample = real_inputs.make(form, BODIES[kind], MATERIALS[material])
            path = os.path.join(workdir, "%s_%d_%s" % (
                kind, self.n, sample.filename))
            with open(path, "wb") as f:
                f.write(sample.data)
            status, body = cura_client.upload(self.addr, path)
            assert status == 200, body
            reply = json.loads(body)
            self.known[reply["uuid"]] = reply["filename"]
            self.material_of[reply["uuid"]] = material \
                if form in real_inputs.GRIFFIN else None
            self.previews[reply["uuid"]] = sample.preview
            note("upload %s %s" % (kind, form))

        # hypothesis turns whole rules off per example (swarm testing):
        # one rule per action on the printer's job, one on any job
        @precondition(lambda self: self.last_jobs)
        @rule()
        def pause(self):
            self.act("pause", 0, True)

        @precondition(lambda self: self.last_jobs)
        @rule()
        def resume(self):
            self.act("print", 0, True)

        @precondition(lambda self: self.last_jobs)
        @rule()
        def abort(self):
            self.act("abort", 0, True)

        @precondition(lambda self: self.last_jobs)
        @rule(what=st.sampled_from(["pause", "print", "abort"]),
              i=st.integers(0, 9))
        def act_on_any(self, what, i):
            self.act(what, i, False)

        def act(self, what, i, on_current):
            job = self.current() if on_current else self.pick(i)
            if job is None:
                note("%s: no job" % (what,))
                return
            before = job["status"]
            if what == "pause":
                self.pause_sent.add(self.printing())
            send = {"pause": self.api.pause, "print": self.api.resume,
                    "abort": self.api.abort}[what]
            status = send(job["uuid"])
            note("%s %s -> %s" % (what, before, status))
            after = {j["uuid"]: j for j in self.jobs()}.get(job["uuid"])
            if status in (200, 202):
                assert before in APPLIES[what], (what, before)
                if what == "abort":
                    self.aborted.add(job["filename"])
                    assert after["status"] in ENDED + HISTORY, after
                elif what == "pause":
                    assert after["status"] in ("paused", "pausing") + \
                        ENDED, after
                else:
                    assert after["status"] in ("printing", "pausing",
                                               "paused") + ENDED, after
            else:
                assert status == 409, (what, before, status)
                if before in APPLIES[what] and \
                        "printer_uuid" in job and before != "pre_print":
                    # applied but Klipper was busy or moved on: nothing
                    # the module did; the print went its own way
                    return
                assert before not in APPLIES[what] \
                    or "printer_uuid" not in job, (what, before)

        @precondition(lambda self: self.last_jobs)
        @rule(i=st.integers(0, 9), what=st.sampled_from(
            ["move", "delete", "force"]))
        def queue_change(self, i, what):
            job = self.pick(i)
            if job is None:
                note("%s: no job" % (what,))
                return
            send = {"move": self.api.move_to_top, "delete": self.api.delete,
                    "force": self.api.force}[what]
            status = send(job["uuid"])
            note("%s %s -> %s" % (what, job["status"], status))
            queued = job["status"] == "queued"
            if what == "delete":
                deletable = queued or job["status"] in ENDED + HISTORY
                assert (status == 200) == deletable, (job, status)
                if status == 200:
                    self.known.pop(job["uuid"], None)
            elif what == "move":
                assert (status == 200) == queued, (job, status)
            else:
                assert status == 200
                self.forced.add(job["uuid"])

        @rule(which=st.sampled_from(sorted(MATERIALS) + ["empty"]))
        def load_material(self, which):
            # the job's material or none lets it print
            k.gcode("SET_CURA_MATERIAL " + ("GUID=" + MATERIALS[which]
                                            if which in MATERIALS
                                            else "MATERIAL=empty"))
            self.loaded = which
            note("load %s material" % (which,))

        @rule(http=st.booleans())
        def plate_cleared(self, http):
            cur = self.current()
            busy = cur is not None and cur["status"] not in ENDED
            if http:
                r = httpc.request(self.base, "POST",
                                  "/cluster-api/v1/printers/%s/action/"
                                  "plate_cleared" % (
                                      httpc.printer(self.base)["uuid"],))
                ok = r.status == 200
            else:
                try:
                    k.gcode("CURA_BUILD_PLATE_CLEARED")
                    ok = True
                except Exception:
                    ok = False
            note("plate_cleared %s -> %s" % ("busy" if busy else "free", ok))
            if not busy:
                assert ok or time.monotonic() < self.hold_until

        @rule()
        def console_print(self):
            self.n += 1
            name = k.write_gcode("console_%d.gcode" % (self.n,), moves=600)
            if k.query("pause_resume")["pause_resume"]["is_paused"]:
                # Klipper's pause_resume stays paused over a print
                # started from the console (its own state)
                self.pause_sent.add(name)
            try:
                k.gcode("SDCARD_PRINT_FILE FILENAME=" + name)
                note("console print started")
            except Exception as e:
                note("console print refused")
                assert "SD busy" in str(e), e

        @rule(what=st.sampled_from(["PAUSE", "RESUME", "CANCEL_PRINT"]),
              wait=st.sampled_from([0., 0.5, 1.]))
        def console_command(self, what, wait):
            # typed in the console or run by a macro at any moment: also
            # as a print ends, or on the idle printer
            time.sleep(wait)
            if what == "PAUSE":
                self.pause_sent.add(self.printing())
            k.gcode(what)
            note("console %s" % (what,))

        @rule(seconds=st.sampled_from([1, 3]))
        def macro_holds_queue(self, seconds):
            k.api.send("gcode/script",
                       {"script": "TEST_SLEEP S=%d" % (seconds,)})
            self.hold_until = time.monotonic() + seconds + 0.5
            note("macro holds the G-code queue")

        def served(self):
            """Every job as Cura is served it (its JSON, its preview
            bytes) and the queue's order."""
            jobs = {}
            for j in self.jobs():
                r = httpc.request(self.base, "GET", "%s/%s/preview_image"
                                  % (JOBS, j["uuid"]))
                got = httpc.request(self.base, "GET",
                                    "%s/%s" % (JOBS, j["uuid"]))
                if got.status == 200:   # (else deleted meanwhile)
                    jobs[j["uuid"]] = (got.json(), r.body
                                       if r.status == 200 else None)
            order = [j["uuid"] for j in self.jobs()
                     if j["status"] == "queued"]
            for uuid, (job, preview) in jobs.items():
                if uuid in self.previews:
                    assert preview == self.previews[uuid], job
            return jobs, order

        def unchanged_since(self, before, what):
            """After a restart: the queue and every job as served before
            it, except the job on the printer, which the new printer
            object cannot still be printing: it has ended (failed, with
            the restart as its reason, unless it ended just before).  The
            queue head may have started just before the restart: then it
            is that job."""
            jobs_before, order_before = before

            def differences():
                jobs_after, order_after = self.served()
                out = []
                for uuid, (job, preview) in jobs_before.items():
                    got = jobs_after.get(uuid)
                    if got is None:
                        out.append(("lost", job))
                    elif job["status"] in ACTIVE or (
                            order_before and uuid == order_before[0]
                            and got[0]["status"] != "queued"):
                        if got[0]["status"] not in ENDED:
                            out.append(("not ended", job, got[0]))
                    elif got != (job, preview):
                        out.append(("changed", job, got))
                still = [u for u in order_before
                         if u in jobs_after and jobs_after[u][0]["status"]
                         == "queued"]
                if order_after != still:
                    out.append(("order", order_before, order_after))
                return out
            deadline = time.monotonic() + 5.   # a status period or two
            while True:
                diff = differences()
                if not diff or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert not diff, (what, diff)
            note("%s: every job as before" % (what,))

        @rule(firmware=st.booleans())
        def restart(self, firmware):
            time.sleep(max(0., self.hold_until - time.monotonic()))
            before = self.served()
            k.restart(firmware=firmware)
            note("FIRMWARE_RESTART" if firmware else "RESTART")
            self.api = cura_client.ClusterApi(
                "127.0.0.1:%d" % (k.cura_port(),))
            self.addr = "127.0.0.1:%d" % (k.cura_port(),)
            self.base = "http://" + self.addr
            self.unchanged_since(before, "FIRMWARE_RESTART" if firmware
                                 else "RESTART")

        @rule(damage=st.sampled_from(["none", "truncate", "entry"]))
        def kill9_and_start(self, damage):
            time.sleep(1.2)      # the writer saved the last change
            before = self.served()
            k.kill9()
            path = os.path.join(data, "queue.json")
            if damage != "none" and os.path.exists(path):
                text = open(path).read()
                if damage == "truncate":
                    text = text[:len(text) // 2]
                else:
                    saved = json.loads(text)
                    if saved["queue"]:
                        saved["queue"][0]["time_total"] = "soon"
                    text = json.dumps(saved)
                with open(path, "w") as f:
                    f.write(text)
            k.start()
            k.wait_ready()
            note("kill -9, damage %s, start" % (damage,))
            self.addr = "127.0.0.1:%d" % (k.cura_port(),)
            self.base = "http://" + self.addr
            self.api = cura_client.ClusterApi(self.addr)
            if damage != "none" and os.path.exists(path + ".bad"):
                # what was damaged is kept aside, not served
                served = {j["uuid"] for j in self.jobs()}
                self.known = {u: f for u, f in self.known.items()
                              if u in served}
            if damage == "none":
                self.unchanged_since(before, "kill -9")

        # Invariants
        @invariant()
        def count(self):
            STEPS["steps"] += 1

        @invariant()
        def klippy_ready(self):
            assert k.info()["state"] == "ready"

        @invariant()
        def cura_sees_klipper(self):
            for attempt in range(6):
                before = klipper_print(k)
                time.sleep(STATUS_PERIOD + 0.3)
                view = self.view.poll(self.api)
                js = self.jobs()
                if klipper_print(k) == before:
                    break
            else:
                return          # Klipper kept moving: nothing to compare
            state, filename = before
            card = view["printers"][0]
            active = card["active_job"]
            assert card["state"] in ("idle", "printing"), card
            assert len([j for j in js if "printer_uuid" in j
                        or "assigned_to" in j]) <= 1, js
            held = active is not None and active["state"] == "queued"
            if held:
                assert self.loaded in MATERIALS and self.material_of[
                    active["key"]] not in (None, self.loaded) and \
                    active["key"] not in self.forced, active
                assert active["configuration_changes"] and all(
                    c["can_override"] for c in
                    active["configuration_changes"]), active
                note("held job on Cura's card")
            assert not [j for j in view["jobs"] if j["state"] in HISTORY], \
                view["jobs"]
            if state == "pausing":
                # a pause that outlives the file's command was sent for
                # this print, not left over from an earlier one
                assert filename in self.pause_sent, (before, self.pause_sent)
            if state in PRINTING:
                assert active is not None, (before, view)
                assert active["state"] in PRINTING[state], (before, active)
                cur = [j for j in js if "printer_uuid" in j][0]
                assert cur["filename"] == filename, (before, cur)
                assert card["state"] == "printing"
            else:
                # an ended job stays on the card until the plate is
                # cleared, then leaves it (and Cura's list)
                assert active is None or held or active["state"] in ENDED or (
                    active["state"] == "pre_print"
                    and time.monotonic() < self.hold_until + 1), \
                    (before, active)
                if active is not None and active["state"] == \
                        "wait_cleanup":
                    assert active["time_total"] == active["time_elapsed"]

        @invariant()
        def acknowledged_abort_stays_aborted(self):
            state, filename = klipper_print(k)
            assert not (state in PRINTING and filename in self.aborted), \
                (state, filename)

        @invariant()
        def nothing_lost_and_saved(self):
            self.last_jobs = self.jobs()
            served = {j["uuid"]: j for j in self.last_jobs}
            missing = set(self.known) - set(served)
            assert not missing, missing
            for j in served.values():
                if j["status"] == "queued":
                    assert os.path.exists(os.path.join(k.gcodes_dir,
                                                       j["filename"]))
            queued = [j["uuid"] for j in self.jobs()
                      if j["status"] == "queued"]
            path = os.path.join(data, "queue.json")
            deadline = time.monotonic() + 3.
            while True:
                try:
                    with open(path) as f:
                        saved = [j["uuid"] for j in json.load(f)["queue"]]
                except (OSError, ValueError):
                    saved = None
                queued = [j["uuid"] for j in self.jobs()
                          if j["status"] == "queued"]
                if saved == queued or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert saved == queued or (not queued and saved is None)

    return Lifecycle


@pytest.mark.slow
@pytest.mark.one_flavor   # long-running: the first flavor is enough
@pytest.mark.timeout(int(SECONDS) + 600)
def test_lifecycle_model(cura, klippy_factory, flavor, tmp_path):
    k = klippy_factory(module_options={"history_size": 1000})
    machine = make_machine(k, str(tmp_path))
    deadline = time.monotonic() + SECONDS
    runs = 0
    while runs == 0 or time.monotonic() < deadline:
        seeded = settings(max_examples=MODEL_EXAMPLES,
                          stateful_step_count=MODEL_STEPS, deadline=None,
                          database=None, derandomize=runs == 0,
                          # each step runs on the real Klippy: report the
                          # failing steps as found, do not shrink them
                          phases=[Phase.explicit, Phase.generate],
                          suppress_health_check=list(HealthCheck))
        test = machine.TestCase
        test.settings = seeded
        test("runTest").runTest()
        runs += 1
    log = k.log_text()
    assert "Internal error" not in log
    assert klippy_harness.own_tracebacks(log) == []
    print("\nlifecycle model: %d runs, %d examples, %d steps"
          % (runs, STEPS["examples"], STEPS["steps"]))
    for what, n in sorted(OUTCOMES.items(), key=lambda kv: -kv[1]):
        print("  %4d  %s" % (n, what))
