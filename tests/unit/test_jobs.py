"""The job store on its own: time estimates, what a restart and a damaged
or foreign queue.json leave, queue changes, saves that never encode under
the store's lock, a status that stays small."""
import json
import re
import threading

import pytest

from _cura_connection.errors import Conflict, NotFound
from _cura_connection.jobs import Job, JobStore, estimate_time_total


def test_estimate_time_total():
    assert estimate_time_total(1000, 0, 0.) == 1000
    # halfway after 600 s: half estimate, half observation (1200 s)
    assert estimate_time_total(1000, 600, 0.5) == 1100
    assert estimate_time_total(0, 300, 0.25) == 1200
    # never below what has already elapsed
    assert estimate_time_total(100, 500, 0.) == 501


def test_store_restart_reports_interrupted_job(tmp_path):
    path = str(tmp_path / "queue.json")
    s = JobStore(path, 5, False)
    job = Job(name="a", filename="a.gcode")
    s.add(job)
    s.add(Job(name="b", filename="b.gcode"))
    s.begin_start(job)
    s.save()
    s2 = JobStore(path, 5, False)
    assert s2.current.status == "failed_wait_cleanup"
    assert "restart" in s2.current.message
    assert [j.name for j in s2.queue] == ["b"] and not s2.plate_clear


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_store_damaged_file_is_kept_aside(tmp_path, text):
    path = tmp_path / "queue.json"
    path.write_text(text)
    s = JobStore(str(path), 5, False)
    assert s.queue == [] and (tmp_path / "queue.json.bad").exists()


GOOD = {"uuid": "1234abcd", "name": "a", "filename": "a.gcode",
        "status": "queued"}


@pytest.mark.parametrize("data,kept", [
    ({"queue": 5}, []),
    ({"queue": [GOOD, 5, dict(GOOD, uuid="x y")]}, ["a"]),
    ({"queue": [GOOD, dict(GOOD, filename="../etc/x.gcode", uuid="2")]},
     ["a"]),
    ({"queue": [dict(GOOD, time_total="12"), dict(GOOD, uuid="3")]}, ["a"]),
    ({"queue": [GOOD, GOOD]}, ["a"]),                     # same uuid
    ({"queue": [dict(GOOD, status="printing")]}, []),
    ({"queue": [dict(GOOD, status=["queued"]), dict(GOOD, uuid="4",
                                                   source={})]}, []),
    ({"queue": [GOOD], "history": {"a": 1}, "current": [],
      "plate_clear": "yes"}, ["a"]),
    ({"queue": [dict(GOOD, materials=[{"extruder": 0, "guid": 5}]),
                dict(GOOD, uuid="5", materials=[{"extruder": -1}]),
                dict(GOOD, uuid="6", materials={"0": {}}),
                dict(GOOD, uuid="7", materials=[{"extruder": 0},
                                                {"extruder": 0}]),
                dict(GOOD, uuid="8", materials=[{"extruder": 0, "x": ""}]),
                dict(GOOD, uuid="9", name="b",
                     materials=[{"extruder": 1, "guid": "g"}])]}, ["b"]),
], ids=["queue is a number", "bad entries", "unsafe name", "bad time",
        "twice", "wrong status", "unhashable status", "bad fields",
        "bad materials"])
def test_store_drops_bad_saved_entries(tmp_path, data, kept):
    path = tmp_path / "queue.json"
    path.write_text(json.dumps(data))
    s = JobStore(str(path), 5, False)
    assert [j.name for j in s.queue] == kept
    # the file as it was is kept aside; the next save cleans it
    assert json.loads((tmp_path / "queue.json.bad").read_text()) == data
    assert s.dirty
    s.save()
    again = JobStore(str(path), 5, False)
    assert [j.name for j in again.queue] == kept and not again.dirty


def test_store_move_delete_force(store):
    jobs = [Job(name=n, filename=n + ".gcode") for n in "abc"]
    for j in jobs:
        store.add(j)
    store.move(jobs[2].uuid, 0)
    assert [j.name for j in store.queue] == ["c", "a", "b"]
    store.delete(jobs[0].uuid)
    assert [j.name for j in store.queue] == ["c", "b"]
    store.set_force(jobs[1].uuid, True)
    assert jobs[1].force
    with pytest.raises(NotFound):
        store.move("nope", 0)


def lock_is_free(lock):
    # from another thread: an RLock is always free to its holder
    free = []
    def probe():
        if lock.acquire(blocking=False):
            lock.release()
            free.append(True)
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return bool(free)


def test_store_never_encodes_under_its_lock(tmp_path, monkeypatch):
    """A save (the writer thread) encodes with the store's lock free: a
    change the reactor makes meanwhile goes through, and the file then
    written still reads back as the store is."""
    path = str(tmp_path / "queue.json")
    s = JobStore(path, 5, False)
    jobs = [Job(name="j%d" % i, filename="j%d.gcode" % i)
            for i in range(30)]
    for j in jobs:
        s.add(j)
    s.begin_start(jobs[0])
    s.end(jobs[0], "wait_cleanup")
    s.plate_cleared()
    real_dumps = json.dumps
    seen, changes = [], []
    def dumps(obj, *args, **kwargs):
        seen.append(lock_is_free(s.lock))
        if len(seen) == 5:
            # the reactor starts the next job while the save encodes
            t = threading.Thread(target=lambda: changes.append(
                s.begin_start(jobs[1])))
            t.start()
            t.join(10.)
            assert changes, "the store's lock was held while encoding"
        return real_dumps(obj, *args, **kwargs)
    monkeypatch.setattr(json, "dumps", dumps)
    s.save()
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert seen and all(seen) and changes
    with open(path) as f:
        assert json.load(f) == s.state()
    again = JobStore(path, 5, False)
    # (a job that was printing ends at a restart)
    assert again.current.name == "j1" and [
        (j.to_dict()) for j in again.queue + again.history] == [
            j.to_dict() for j in s.queue + s.history]
    # the next save encodes only what changed since
    seen.clear()
    s.set_force(jobs[5].uuid, True)
    monkeypatch.setattr(json, "dumps", dumps)
    s.save()
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert len(seen) == 1
    with open(path) as f:
        assert json.load(f) == s.state()


def test_status_and_lookups_stay_small(tmp_path):
    """get_status() lists the first queued jobs and counts them all; jobs
    are found by uuid wherever they are, until they leave the store."""
    s = JobStore(str(tmp_path / "q.json"), 2, False)
    jobs = [Job(name="j%d" % i, filename="j%d.gcode" % i)
            for i in range(s.STATUS_JOBS + 5)]
    for j in jobs:
        s.add(j)
    st = s.status_cache
    assert [q["name"] for q in st["queue"]] == \
        ["j%d" % i for i in range(s.STATUS_JOBS)]
    assert st["queue_length"] == len(jobs)
    with pytest.raises(Conflict):
        s.add(Job(name="x", filename="x.gcode"), len(jobs))
    for j in jobs[:4]:
        s.begin_start(j)
        s.end(j, "wait_cleanup")
        assert s.find(j.uuid) is j
        s.plate_cleared()
    # a history of 2: the oldest ended jobs are gone
    assert [s.find(j.uuid) for j in jobs[:4]] == [None, None] + jobs[2:4]
    assert s.take_back(jobs[6]) and not s.take_back(jobs[6])
    assert s.find(jobs[6].uuid) is None
    with pytest.raises(Conflict):
        s.move(jobs[3].uuid, 0)     # in the history, not queued
    s.delete(jobs[3].uuid)
    assert s.find(jobs[3].uuid) is None
    assert s.status_cache["queue_length"] == len(jobs) - 5


def test_finished_at_is_iso_and_old_epochs_convert(tmp_path):
    path = tmp_path / "queue.json"
    path.write_text(json.dumps({"history": [dict(
        GOOD, status="finished", finished_at=1764410400.5)]}))
    s = JobStore(str(path), 5, False)
    assert s.history[0].finished_at == "2025-11-29T10:00:00.000000Z"
    job = Job(name="x", filename="x.gcode")
    s.end(job, "wait_cleanup")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000000Z$",
                    job.finished_at)
    assert len(job.finished_at) == len(job.created_at)
