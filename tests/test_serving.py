"""Serving under load (issue: the reactor never notices the server): a
long queue from an old queue.json is listed whole and stays correct as it
changes, and idle, stalled or slow-reading clients hold nobody up.  How
late the reactor runs is measured by benchmarks/ (never asserted here)."""
import json
import os
import socket

import httpc

JOBS = "/cluster-api/v1/print_jobs"
LONG_QUEUE = 10000


def seed_queue(k, jobs):
    """queue.json as an old version (before max_queue) or a raised limit
    leaves it: a finished job on the plate and `jobs` queued."""
    data_dir = os.path.join(k.gcodes_dir, ".cura_connection")
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(k.gcodes_dir, "seed.gcode"), "w") as f:
        f.write(";TIME:600\nG1 X1\n")

    def job(i, status):
        return {"uuid": "00000000-0000-4000-8000-%012d" % (i,),
                "name": "job %d" % (i,), "filename": "seed.gcode",
                "owner": "test", "created_at": "2026-11-25T10:00:00.000000Z",
                "status": status, "source": "cura", "time_estimate": 600,
                "time_elapsed": 0, "time_total": 600, "preview": None,
                "started": status != "queued", "force": False,
                "message": "", "finished_at": None}
    with open(os.path.join(data_dir, "queue.json"), "w") as f:
        json.dump({"version": 1, "plate_clear": False,
                   "current": job(0, "wait_cleanup"),
                   "queue": [job(i + 1, "queued") for i in range(jobs)],
                   "history": []}, f)
    return [job(i + 1, "queued")["uuid"] for i in range(jobs)]


def raw_get(port, path):
    """A GET whose reply is not read (a client that stopped reading)."""
    s = socket.create_connection(("127.0.0.1", port), 10.)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
               % (path,)).encode())
    return s


def test_long_queue_listed_whole_and_kept_current(klippy_factory):
    k = klippy_factory(start=False)
    uuids = seed_queue(k, LONG_QUEUE)
    k.start()
    k.wait_ready()
    base, port = k.base_url(), k.cura_port()
    jobs = httpc.get_json(base, JOBS)
    assert [j["uuid"] for j in jobs[1:]] == uuids
    assert jobs[0]["status"] == "wait_cleanup" and jobs[0]["printer_uuid"]
    assert all(j["status"] == "queued" and "printer_uuid" not in j
               for j in jobs[1:])
    # A client that asks for the whole list and never reads it holds
    # nobody up: the others are answered meanwhile.
    stalled = raw_get(port, JOBS)
    try:
        assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["uuid"]
        # Changes show at once in the reused replies
        gone, moved = uuids[10], uuids[500]
        assert httpc.request(base, "DELETE", JOBS + "/" + gone).status \
            == 200
        r = httpc.request(base, "POST", JOBS + "/%s/action/move" % moved,
                          body=json.dumps({"list": "queued", "to_position":
                                           0}).encode(),
                          headers={"Content-Type": "application/json"})
        assert r.status == 200, r.body
        jobs = httpc.get_json(base, JOBS)
        listed = [j["uuid"] for j in jobs[1:]]
        assert gone not in listed and len(listed) == LONG_QUEUE - 1
        assert listed[0] == moved
        assert listed[1:] == [u for u in uuids if u not in (gone, moved)]
        assert httpc.get_json(base, JOBS + "/" + moved)["uuid"] == moved
    finally:
        stalled.close()
    assert k.info()["state"] == "ready"


def test_idle_and_stalled_clients_hold_nobody_up(klippy):
    base, port = klippy.base_url(), klippy.cura_port()
    idle = [socket.create_connection(("127.0.0.1", port), 10.)
            for _ in range(10)]
    # one client stops in the middle of its request line
    half = socket.create_connection(("127.0.0.1", port), 10.)
    half.sendall(b"GET /cluster-api/v1/prin")
    try:
        for _ in range(20):
            assert httpc.get_json(base, "/cluster-api/v1/printers")
            assert httpc.get_json(base, JOBS) == []
    finally:
        for s in idle + [half]:
            s.close()
