"""Serving under load, which the reactor never notices: a long queue from
an old queue.json is listed whole and stays correct as it changes, and
idle, stalled or slow-reading clients hold nobody up.  How late the
reactor runs is measured by benchmarks/ (never asserted here)."""
import json
import socket

import httpc

JOBS = "/cluster-api/v1/print_jobs"
LONG_QUEUE = 10000


def raw_get(port, path):
    """A GET whose reply is not read (a client that stopped reading)."""
    s = socket.create_connection(("127.0.0.1", port), 10.)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
               % (path,)).encode())
    return s


def test_long_queue_listed_whole_and_kept_current(klippy_factory):
    k = klippy_factory(start=False)
    uuids = k.write_queue(LONG_QUEUE)
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
