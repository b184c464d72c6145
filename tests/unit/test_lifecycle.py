"""The job lifecycle against a small model of Klipper (fakes.FakeKlipper):
starts come from Klipper's answer, every action takes effect or is
refused with its reason and changes nothing, ended prints show what they
reached, a job waits for its material until forced or loaded."""
import json

import pytest

from fakes import FakeKlipper

from _cura_connection.bridge import NoCall, ReactorCall
from _cura_connection.errors import Conflict, NotFound
from _cura_connection.jobs import ENDED, Job, JobStore
from _cura_connection.lifecycle import JobLifecycle
from _cura_connection.materials import LoadedMaterials


# A job's material that the printer has not loaded
PETG = {"extruder": 0, "guid": "1cbfaeb3-1906-4b26-b2e7-6f777a8c197a",
        "brand": "Generic", "material": "PETG", "color": "Generic",
        "name": "PETG"}


@pytest.fixture
def klipper():
    return FakeKlipper()


@pytest.fixture
def life(store, klipper):
    return JobLifecycle(klipper, store, lambda job: None)


def two_jobs(store):
    a = Job(name="a", filename="a.gcode")
    b = Job(name="b", filename="b.gcode")
    store.add(a)
    store.add(b)
    return a, b


def test_lifecycle_queue(store, klipper, life, tmp_path):
    a, b = two_jobs(store)
    life.follow(klipper.publish_now())
    # handed to Klipper, which has not answered yet
    assert a.status == "pre_print" and store.current is a
    klipper.run_callbacks()
    assert klipper.scripts == ["SDCARD_PRINT_FILE FILENAME=a.gcode"]
    assert a.status == "printing"
    klipper.duration = 60.
    klipper.follow(life)
    assert a.time_elapsed == 60 and a.time_total > 60
    klipper.finish("complete", 115.4)
    klipper.follow(life)
    # a completed job took exactly its time (Cura 4.13 shows it as done)
    assert (a.status, a.time_elapsed, a.time_total) == \
        ("wait_cleanup", 115, 115)
    assert not store.plate_clear and b.status == "queued"
    klipper.follow(life)
    assert b.status == "queued"       # waits for the plate
    life.plate_cleared()
    klipper.run_callbacks()
    assert a.status == "finished" and store.history == [a]
    assert b.status == "printing"
    store.save()
    data = json.load(open(tmp_path / "queue.json"))
    assert [j["name"] for j in data["history"]] == ["a"]


def test_lifecycle_abort_during_start_cancels_it(store, klipper, life):
    a, b = two_jobs(store)
    life.follow(klipper.publish_now())
    assert a.status == "pre_print"
    assert life.act(NoCall, a.uuid, "abort") == \
        (200, "aborted_wait_cleanup")
    klipper.run_callbacks()           # the start's turn comes: nothing
    klipper.follow(life)
    assert klipper.scripts == [] and not klipper.active
    assert a.status == "aborted_wait_cleanup" and b.status == "queued"


def test_lifecycle_refused_start_goes_back_to_the_queue(store, klipper,
                                                        life):
    a, b = two_jobs(store)
    life.follow(klipper.publish_now())
    # a console print starts before the start gets the G-code queue
    klipper.filename, klipper.state, klipper.active = \
        "console.gcode", "printing", True
    klipper.run_callbacks()
    assert [j.name for j in store.queue] == ["a", "b"]
    assert a.status == "queued" and not a.started and a not in store.history
    klipper.follow(life)
    assert store.current.owner == "Klipper" and \
        store.current.filename == "console.gcode"


def test_lifecycle_failed_start(store, klipper, life):
    a = Job(name="a", filename="a.gcode")
    store.add(a)
    klipper.run_script_from_command = lambda script: (_ for _ in ()).throw(
        Exception("Unable to open file"))
    klipper.follow(life)
    assert a.status == "failed_wait_cleanup" and "Unable" in a.message
    assert store.plate_clear       # nothing was printed


@pytest.mark.parametrize("pause", ["PAUSE", "M25"])
def test_lifecycle_resume_and_abort_whatever_paused(store, klipper, life,
                                                    pause):
    a = Job(name="a", filename="a.gcode")
    store.add(a)
    klipper.follow(life)
    klipper.duration = 6.
    klipper.run_script_from_command(pause)   # the file or a macro
    klipper.follow(life)
    assert a.status == "paused" and a.time_elapsed == 6
    assert life.act(NoCall, a.uuid, "print") == (200, "printing")
    assert klipper.scripts[-1] == ("RESUME" if pause == "PAUSE" else "M24")
    assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
    assert klipper.scripts[-1] == "PAUSE"
    klipper.run_script_from_command(pause)
    klipper.paused_for = 12.
    assert life.act(NoCall, a.uuid, "abort") == \
        (200, "aborted_wait_cleanup")
    assert not klipper.active and klipper.state in ("cancelled", "standby")
    assert a.time_elapsed == 6 and a.time_total > 6


def test_lifecycle_refuses_what_does_not_apply(store, klipper, life):
    a, b = two_jobs(store)
    klipper.follow(life)
    for job, action in [(a, "print"), (b, "pause"), (b, "abort")]:
        with pytest.raises(Conflict):
            life.act(NoCall, job.uuid, action)
    with pytest.raises(NotFound):
        life.act(NoCall, "0000", "pause")
    # a withdrawn call (its HTTP request timed out) changes nothing
    call = ReactorCall()
    assert call.withdraw()
    assert life.act(call, a.uuid, "pause") is None
    assert a.status == "printing" and klipper.active
    with pytest.raises(Conflict):
        life.plate_cleared()


def printing_job(store, klipper, life, name="a"):
    job = Job(name=name, filename=name + ".gcode")
    store.add(job)
    klipper.follow(life)
    assert job.status == "printing"
    del klipper.scripts[:]
    return job


def refused(life, job, action, *words):
    """act() answers 409 with a reason naming words."""
    with pytest.raises(Conflict) as e:
        life.act(NoCall, job.uuid, action)
    for word in words:
        assert word in e.value.message, e.value.message
    assert "nothing was done" in e.value.message
    assert job.action is None
    return e.value.message


def test_actions_decide_on_klippers_state_at_that_moment(store, klipper,
                                                         life):
    # Each race: the job list (followed up to 0.5 s ago) says
    # one thing, Klipper has moved on when the action is carried out.
    # The action is refused, says why and sends Klipper nothing.
    a = printing_job(store, klipper, life)
    klipper.finish("complete", 30.)     # the print ends; not followed yet
    refused(life, a, "pause", "ended", "wait_cleanup")
    assert klipper.scripts == [] and not klipper.is_paused
    assert (a.status, a.time_total, a.time_elapsed) == \
        ("wait_cleanup", 30, 30)
    refused(life, a, "abort", "ended")
    refused(life, a, "print", "ended")
    assert klipper.scripts == [] and a.status == "wait_cleanup"
    life.plate_cleared()
    b = printing_job(store, klipper, life, "b")
    klipper.run_script_from_command("PAUSE")        # from the console
    refused(life, b, "pause", "it is paused")
    klipper.run_script_from_command("RESUME")       # from the console
    refused(life, b, "print", "it is printing")
    assert klipper.scripts == ["PAUSE", "RESUME"]   # only the console's
    klipper.kstate = "shutdown"                     # M112
    refused(life, b, "abort", "Klipper is shutdown")
    assert b.status == "failed_wait_cleanup" and b.action is None
    assert klipper.scripts == ["PAUSE", "RESUME"]


@pytest.mark.parametrize("action", ["pause", "abort"])
def test_actions_wait_for_a_file_read_to_its_end(store, klipper, life,
                                                 action):
    # Klipper (upstream) reads the file in a worker thread: with the
    # G-code mutex held, the file may still be about to find its end.
    # PAUSE or CANCEL_PRINT then would meet a print completing under it.
    a = printing_job(store, klipper, life)
    klipper.progress = 1.
    klipper.on_pause = [lambda: klipper.finish("complete")]
    refused(life, a, action, "ended", "wait_cleanup")
    assert klipper.scripts == [] and a.status == "wait_cleanup"


def test_resume_after_a_console_cancel(store, klipper, life):
    a = printing_job(store, klipper, life)
    assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
    klipper.run_script_from_command("CANCEL_PRINT")     # not followed yet
    del klipper.scripts[:]
    refused(life, a, "print", "ended", "aborted_wait_cleanup")
    assert klipper.scripts == [] and klipper.state == "cancelled"


def test_abort_of_a_print_the_console_replaced(store, klipper, life):
    a = printing_job(store, klipper, life)
    assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
    # the console starts another file over the paused one
    klipper.run_script_from_command("SDCARD_PRINT_FILE FILENAME=c.gcode")
    del klipper.scripts[:]
    refused(life, a, "abort", "not on the printer")
    assert klipper.scripts == [] and klipper.filename == "c.gcode"
    assert klipper.active and store.history == [a]
    assert a.status == "aborted" and "c.gcode" in a.message
    assert store.current.filename == "c.gcode"


def test_queue_changes_and_plate_clear_see_the_print_end(store, klipper,
                                                         life):
    a = printing_job(store, klipper, life)
    b = Job(name="b", filename="b.gcode")
    store.add(b)
    klipper.finish("complete", 10.)     # not followed yet
    life.plate_cleared()                # the job has ended: not refused
    klipper.run_callbacks()
    assert a.status == "finished" and store.current is b
    klipper.finish("complete", 10.)
    life.change(NoCall, store.delete, b.uuid)     # ended: deletable
    assert store.current is None and store.history[0] is b
    assert b.status == "finished"


def test_a_pause_of_no_print_is_cleared_before_the_next_start(store,
                                                              klipper, life):
    # PAUSE typed in the console as the print ended pauses the idle
    # printer (Klipper's own PAUSE): the next print must not inherit it
    a = printing_job(store, klipper, life)
    b = Job(name="b", filename="b.gcode")
    store.add(b)
    klipper.finish("complete")
    klipper.run_script_from_command("PAUSE")
    klipper.follow(life)
    assert klipper.is_paused and a.status == "wait_cleanup"
    life.plate_cleared()
    klipper.run_callbacks()
    assert klipper.scripts[-2:] == ["CLEAR_PAUSE",
                                    "SDCARD_PRINT_FILE FILENAME=b.gcode"]
    assert b.status == "printing" and not klipper.is_paused
    assert life.act(NoCall, b.uuid, "pause") == (200, "paused")
    assert life.act(NoCall, b.uuid, "print") == (200, "printing")


def test_a_pause_whose_print_fails_first_leaves_no_pause(store, klipper,
                                                         life):
    a = printing_job(store, klipper, life)
    run = klipper.run_script_from_command
    def pause_then_fail(script):
        # PAUSE waits for the file's current command, which fails
        run(script)
        if script == "PAUSE":
            klipper.is_paused, klipper.active = True, True
            klipper.run_script_from_command = run
            klipper.finish("error")
    klipper.run_script_from_command = pause_then_fail
    refused_msg = None
    with pytest.raises(Conflict) as e:
        life.act(NoCall, a.uuid, "pause")
    refused_msg = e.value.message
    assert "failed_wait_cleanup" in refused_msg
    assert not klipper.is_paused and klipper.scripts[-1] == "CLEAR_PAUSE"
    assert a.status == "failed_wait_cleanup" and a.action is None


@pytest.mark.parametrize("how", ["abort", "console cancel", "error",
                                 "paused abort", "shutdown"])
def test_an_ended_print_shows_the_progress_it_reached(store, klipper, life,
                                                      how):
    # Cura draws time_elapsed / time_total: 5 % reached shows 5 %
    a = printing_job(store, klipper, life)
    a.time_estimate = 3600
    klipper.duration, klipper.progress = 100., 0.05
    klipper.follow(life)
    if how == "abort":
        assert life.act(NoCall, a.uuid, "abort")[0] == 200
    elif how == "console cancel":
        klipper.run_script_from_command("CANCEL_PRINT")
    elif how == "error":
        klipper.finish("error")
    elif how == "paused abort":
        assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
        klipper.paused_for = 500.
        assert life.act(NoCall, a.uuid, "abort")[0] == 200
    else:
        klipper.kstate = "shutdown"
    klipper.follow(life)
    assert a.status in ("aborted_wait_cleanup", "failed_wait_cleanup")
    assert (a.time_elapsed, a.time_total) == (100, 2000)
    life.plate_cleared()
    assert a.status in ("aborted", "failed") and store.history[0] is a
    assert (a.time_elapsed, a.time_total) == (100, 2000)


def test_lifecycle_end_states(store, klipper, life):
    for state, expected in [("cancelled", "aborted_wait_cleanup"),
                            ("error", "failed_wait_cleanup"),
                            ("standby", "aborted_wait_cleanup")]:
        job = Job(name=state, filename=state + ".gcode")
        store.add(job)
        klipper.follow(life)
        assert job.status == "printing"
        klipper.finish(state)
        klipper.follow(life)
        assert job.status == expected
        life.plate_cleared()
        assert job.status == ENDED[expected]
    job = Job(name="s", filename="s.gcode")
    store.add(job)
    klipper.follow(life)
    klipper.kstate = "shutdown"
    klipper.follow(life)
    assert job.status == "failed_wait_cleanup" and job.message == "msg"
    life.plate_cleared()
    assert [j.name for j in store.history] == ["s", "standby", "error"]


def test_lifecycle_external_print(store, klipper, life):
    seen = []
    life.want_metadata = seen.append
    klipper.run_script_from_command("SDCARD_PRINT_FILE FILENAME=m.gcode")
    store.add(Job(name="q", filename="q.gcode"))
    klipper.follow(life)
    cur = store.current
    assert (cur.name, cur.owner, cur.status) == ("m", "Klipper", "printing")
    assert seen == [cur] and store.queue[0].status == "queued"


def test_auto_start_next(tmp_path, klipper):
    store = JobStore(str(tmp_path / "q.json"), 5, True)
    life = JobLifecycle(klipper, store, lambda job: None)
    a, b = two_jobs(store)
    klipper.follow(life)
    klipper.finish()
    klipper.follow(life)
    assert a.status == "finished" and b.status == "printing"


def test_lifecycle_holds_a_job_until_forced_or_loaded(tmp_path, klipper):
    loaded = LoadedMaterials(str(tmp_path / "loaded.json"),
                                [("extruder", {"material": "PLA"})])
    def changes(job):
        return [] if job.force else loaded.changes(job.materials)
    for auto_start_next in (False, True):
        store = JobStore(str(tmp_path / "q.json"), 5, auto_start_next)
        life = JobLifecycle(klipper, store, lambda job: None, changes)
        done = Job(name="done", filename="done.gcode")
        store.add(done)
        klipper.follow(life)
        klipper.finish()
        klipper.follow(life)
        if not auto_start_next:
            life.plate_cleared()
        a = Job(name="a", filename="a.gcode", materials=[PETG])
        b = Job(name="b", filename="b.gcode", materials=[PETG])
        store.add(a)
        store.add(b)
        klipper.follow(life)
        klipper.follow(life)
        # held: not started, and the job Cura's card shows (alone)
        assert a.status == "queued" and store.held is a
        assert klipper.filename == "done.gcode"
        assert store.printer_jobs() == ([(store.host_uuid, a)], [done, b]
                                        if store.current else [b])
        assert store.status_cache["held_job"]["name"] == "a"
        life.change(NoCall, store.set_force, a.uuid, True)
        klipper.run_callbacks()
        assert a.status == "printing" \
            and store.printer_jobs()[0] == [(store.host_uuid, a)]
        klipper.finish()
        klipper.follow(life)
        life.plate_cleared()
        klipper.follow(life)
        assert b.status == "queued" and store.held is b
        loaded.set("extruder", {"material": "PETG"})
        klipper.follow(life)
        assert b.status == "printing" and store.held is None
        klipper.finish()
        klipper.follow(life)
        life.plate_cleared()
        loaded.set("extruder", {"material": "PLA"})
