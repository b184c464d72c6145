"""The Cura API on its own: uploads join the queue in the reactor, and the
job list's reply is reused job by job."""
import json
import threading

import pytest

from fakes import FakeKlipper
import real_inputs

from _cura_connection.api import (
    ROUTES, CuraApi, ReplyCache, Route, check_routes, find_route)
from _cura_connection.bridge import NoCall
from _cura_connection.errors import Conflict, HTTPError, NoSpace
from _cura_connection.jobs import Job, JobStore
from _cura_connection.lifecycle import JobLifecycle


class ReactorThreadKlipper(FakeKlipper):
    """FakeKlipper whose bridge.call() runs the call in a thread of its
    own (the reactor), as KlippyBridge.call does."""
    def call(self, fn, *args):
        out = {}
        def run():
            try:
                out["result"] = fn(NoCall, *args)
            except Exception as e:
                out["error"] = e
        t = threading.Thread(target=run, name="reactor")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["result"]


def test_uploads_join_the_queue_in_the_reactor(tmp_path, monkeypatch):
    """add_upload (an HTTP or control thread) changes the store only
    through the lifecycle, in the reactor: the job, the queue limit, and
    taking the job back when it cannot be saved."""
    from types import SimpleNamespace
    klipper = ReactorThreadKlipper()
    store = JobStore(str(tmp_path / "queue.json"), 5, False)
    store.plate_clear = False       # nothing starts
    changed_in = []
    for name in ("add", "take_back"):
        def wrapped(*args, real=getattr(store, name), name=name):
            changed_in.append((name, threading.current_thread().name))
            return real(*args)
        monkeypatch.setattr(store, name, wrapped)
    removed = []
    lifecycle = JobLifecycle(klipper, store, lambda job: None)
    api = real_inputs.cura_api(
        str(tmp_path), str(tmp_path), max_queue=2, store=store,
        bridge=klipper, lifecycle=lifecycle,
        intake=SimpleNamespace(remove=lambda f, p: removed.append(f)),
        materials=SimpleNamespace(name_job_materials=lambda w, p: []))
    meta = {"time_estimate": 60, "preview": None, "materials": [],
            "material_profiles": {}}
    reply = api.add_upload("a.gcode", "alice", meta, "127.0.0.1")
    assert reply["status"] == "queued" and changed_in == [
        ("add", "reactor")]
    with open(store.path) as f:
        assert [j["filename"] for j in json.load(f)["queue"]] == ["a.gcode"]
    api.add_upload("b.gcode", "alice", meta, "127.0.0.1")
    with pytest.raises(Conflict):
        api.add_upload("c.gcode", "alice", meta, "127.0.0.1")
    assert removed == ["c.gcode"] and len(store.queue) == 2
    store.delete(store.queue[1].uuid)
    store.delete(store.queue[0].uuid)
    store.plate_clear = True

    def no_room():
        # the status timer runs while the HTTP thread saves: the job
        # waits for its save, it does not start
        lifecycle.follow(klipper.publish_now())
        klipper.run_callbacks()
        assert store.current is None and not klipper.scripts
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store, "save", no_room)
    changed_in.clear()
    with pytest.raises(NoSpace):
        api.add_upload("d.gcode", "alice", meta, "127.0.0.1")
    assert changed_in == [("add", "reactor"), ("take_back", "reactor")]
    assert removed == ["c.gcode", "d.gcode"] and store.queue == []
    # saved: it starts at the next tick
    monkeypatch.setattr(store, "save", lambda: None)
    api.add_upload("e.gcode", "alice", meta, "127.0.0.1")
    klipper.follow(lifecycle)
    assert store.current.filename == "e.gcode"
    assert klipper.scripts == ["SDCARD_PRINT_FILE FILENAME=e.gcode"]


class FakeApi:
    """What ReplyCache reads of CuraApi: the configuration and job_json."""
    config = [{"extruder_index": 0, "material": None}]

    def printer_configuration(self, snap):
        return self.config

    def jobs_basis(self):
        return json.dumps(self.config)

    def job_json(self, job, linked):
        d = job.to_dict()
        d["linked"] = linked
        d["configuration"] = self.config
        return d


def test_reply_cache_job_list():
    api = FakeApi()
    cache = ReplyCache(api)
    jobs = [Job(name="j%d" % i, filename="j%d.gcode" % i)
            for i in range(45)]
    head, rest = [("printer-uuid", jobs[0])], jobs[1:]
    pauses = []
    first = cache.job_list(head, rest, lambda: pauses.append(1))
    # the same bytes as encoding the whole list at once, in chunks
    assert b"".join(first) == json.dumps(
        [api.job_json(jobs[0], "printer-uuid")]
        + [api.job_json(j, None) for j in jobs[1:]]).encode()
    assert len(pauses) == 2          # a long list is encoded in steps
    small = ReplyCache(api)
    small.CHUNK = 10
    chunked = small.job_list(head, rest, lambda: None)
    assert len(chunked) == 7 and b"".join(chunked) == b"".join(first)
    # nothing changed: the same chunks again, not joined anew
    assert small.job_list(head, rest, lambda: None) is chunked
    kept = cache.entries[jobs[3].uuid]
    # a job changes: its reply changes, the others are reused as they are
    jobs[5].status = "printing"
    second = json.loads(b"".join(cache.job_list(head, rest, lambda: None)))
    assert second[5]["status"] == "printing"
    assert cache.entries[jobs[3].uuid] is kept
    # so does every job when the configuration changes
    api.config = [{"extruder_index": 0, "material": {"guid": "x"}}]
    third = json.loads(b"".join(cache.job_list(head, rest, lambda: None)))
    assert all(j["configuration"] == api.config for j in third)
    # a job no longer listed is forgotten
    cache.job_list([("printer-uuid", jobs[0])], [jobs[1]], lambda: None)
    assert set(cache.entries) == {jobs[0].uuid, jobs[1].uuid}
    assert b"".join(cache.job_list([], [], lambda: None)) == b"[]"


def test_every_change_checks_control():
    # a new route that changes something must call require_control()
    import inspect
    for r in ROUTES:
        if r.method in ("GET", "HEAD") or r.handler == "post_auth_request":
            continue
        src = inspect.getsource(r.fn)
        assert "req.require_control(" in src, (r.method, r.handler)


# The route table: declared on the handlers, checked at import

def test_every_handler_has_its_route():
    handlers = {r.handler for r in ROUTES}
    named = {n for n in vars(CuraApi) if n.split("_")[0] in (
        "get", "post", "put", "delete") and callable(getattr(CuraApi, n))}
    assert handlers == named


def test_front_answers_reads_only():
    front = {r.handler for r in ROUTES if r.front}
    assert front == {
        "get_system", "get_printers", "get_print_jobs", "get_history",
        "get_print_job", "get_preview_image", "get_materials", "get_page",
        "get_root", "get_definition_zip", "get_definition_file"}
    assert all(r.method == "GET" for r in ROUTES if r.front or r.gated)


def test_find_route():
    r, args = find_route("GET", "/cluster-api/v1/print_jobs/ab-12/")
    assert (r.handler, args) == ("get_print_job", ("ab-12",))
    r, args = find_route("GET", "/cluster-api/v1/print_jobs/history")
    assert r.handler == "get_history"
    with pytest.raises(HTTPError) as e:
        find_route("PATCH", "/cluster-api/v1/print_jobs")
    assert e.value.status == 405 and "GET, POST" in e.value.message
    with pytest.raises(HTTPError) as e:
        find_route("GET", "/nothing")
    assert e.value.status == 404


def test_a_bad_table_is_refused_at_import():
    class Api:
        def get_a(self, req):
            pass

        def post_a(self, req):
            pass
    good = [Route("GET", "/a", Api.get_a, True, True),
            Route("POST", "/a", Api.post_a, False, False)]
    check_routes(good, Api)
    with pytest.raises(AssertionError, match="declared twice"):
        check_routes(good + [Route("GET", "/a", Api.get_a, False, False)],
                     Api)
    with pytest.raises(AssertionError):     # the front answers reads only
        check_routes([Route("POST", "/a", Api.post_a, True, False)], Api)
    with pytest.raises(AssertionError):     # no such handler
        check_routes([Route("GET", "/b", lambda self, req: None, False,
                            False)], Api)
