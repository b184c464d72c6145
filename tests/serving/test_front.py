"""The front process: a child of Klippy answers the reads from published
replies and hands every other request to Klippy's side, unread, with its
connection, which Klippy's side closes with its reply.  These tests follow
the connections to the process that holds them (through /proc), and check
that the child never outlives its Klippy and leaves nothing behind."""
import os
import signal
import socket
import time

import pytest

import gcode_samples
import httpc
from hostile import alive, children, free_port, socket_count
from httpc import JOBS, jobs, printer, upload, wait_for


def front_pid(k):
    found = wait_for(lambda: children(k.pid), 10., "the front process")
    assert len(found) == 1, found
    return found[0]


def server_side_inode(conn):
    # The inode of the server's end of this client connection, from
    # /proc/net/tcp (loopback, IPv4)
    client_port = conn.sock.getsockname()[1]
    server_port = conn.sock.getpeername()[1]
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.split(":")[1], 16) == server_port and \
                    int(remote.split(":")[1], 16) == client_port:
                return fields[9]
    raise AssertionError("no server socket for port %d" % (client_port,))


def holder(conn, pids):
    """Which of pids holds the server's end of conn."""
    inode = server_side_inode(conn)
    for pid in pids:
        for fd in os.listdir("/proc/%d/fd" % (pid,)):
            try:
                if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == \
                        "socket:[%s]" % (inode,):
                    return pid
            except OSError:
                pass
    return None


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def answered_here(k):
    """Requests answered in Klippy's process so far, by handler."""
    return k.query("cura_connection")["cura_connection"]["answered_here"]


def test_reads_stay_in_the_child_other_requests_visit_klippy(klippy):
    base = klippy.base_url()
    front = front_pid(klippy)
    thumb = gcode_samples.png()
    r = upload(base, "part.gcode", gcode_samples.embedded_thumbnail(
        thumb).encode() + gcode_samples.cura_gcode())
    assert r.status == 200, r
    uuid = r.json()["uuid"]
    conn = httpc.connect(base)
    for path in ("/cluster-api/v1/printers", JOBS, JOBS + "/history",
                 "/cluster-api/v1/printers/", JOBS + "?x=1",
                 "/api/v1/system", "/cluster-api/v1/materials",
                 JOBS + "/" + uuid, JOBS + "/%s/preview_image" % (uuid,)):
        r = httpc.request(conn, "GET", path)
        assert r.status == 200, (path, r)
        assert holder(conn, [front, klippy.pid]) == front, path
    assert r.body == thumb and r.headers["Content-Type"] == "image/png"
    r = httpc.request(conn, "GET", JOBS + "/" + uuid)
    assert (r.json()["uuid"], r.json()["name"]) == (uuid, "part")
    r = httpc.request(conn, "GET", JOBS + "/0123-abc")
    assert r.status == 404 and r.json()["status"] == 404, r
    r = httpc.request(conn, "GET", "/print_jobs",
                      headers={"Accept": "text/html"})
    assert r.status == 200 and b"<html" in r.body.lower(), r
    assert holder(conn, [front, klippy.pid]) == front
    assert "get_print_job" not in answered_here(klippy)
    assert "get_system" not in answered_here(klippy)
    # anything else goes to Klippy's side with its connection, unread,
    # and is closed with its reply
    r = httpc.request(conn, "GET", "/api/v1/auth/verify")
    assert r.status == 200 and r.headers["Connection"] == "close", r
    assert answered_here(klippy)["get_auth_verify"] == 1
    conn.close()


@pytest.mark.parametrize("method, path, headers, status", [
    ("HEAD", "/cluster-api/v1/printers", {}, 405),
    ("POST", "/cluster-api/v1/printers", {}, 405),
    ("DELETE", JOBS, {}, 405),
    ("GET", "/cluster-api/v1/printersX", {}, 404),
    ("GET", JOBS, {"Content-Length": "+5"}, 400),
    ("GET", JOBS, {"Transfer-Encoding": "chunked"}, 411),
])
def test_handed_over_requests_get_klippys_answer(klippy, method, path,
                                                 headers, status):
    r = httpc.request(klippy.base_url(), method, path, headers=headers)
    assert r.status == status, r
    if method != "HEAD":
        assert r.json()["status"] == status

@pytest.mark.parametrize("path", ["/?action=stream", "/?action=snapshot",
                                  "/printers/camera?action=stream"])
def test_a_browser_opening_the_camera_gets_the_camera(klippy_factory, path):
    # A browser opened on Cura's camera address asks text/html first: it
    # gets what Klippy's side answers (the camera; without camera_url a
    # 404 that says so), never the page in its place
    for front in ("False", "True"):
        k = klippy_factory(module_options={"front_process": front})
        r = httpc.request(k.base_url(), "GET", path, headers={
            "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert r.status == 404, (front, r)
        assert b"camera_url" in r.body, (front, r)
        k.stop()


@pytest.mark.parametrize("path, status", [
    ("/favicon.ico", 404),      # every browser asks it with the page
    ("/printers/cura_definition.zip", 200),     # the page's download
], ids=["favicon", "definition"])
def test_the_web_pages_other_reads_stay_in_the_child(klippy, path, status):
    base = klippy.base_url()
    front = front_pid(klippy)
    conn = httpc.connect(base)
    r = httpc.request(conn, "GET", "/printers",
                      headers={"Accept": "text/html"})
    assert r.status == 200 and b"<html" in r.body.lower(), r
    r = httpc.request(conn, "GET", path, headers={"Accept": "*/*"})
    assert r.status == status, r
    assert "close" not in r.headers.get("Connection", "").lower(), r
    assert holder(conn, [front, klippy.pid]) == front
    conn.close()
    assert "get_definition_zip" not in answered_here(klippy)


def test_each_client_sees_the_address_it_reached(klippy):
    base = klippy.base_url()
    front_pid(klippy)
    assert printer(base)["ip_address"] == "127.0.0.1"
    for host, ip in (("10.1.2.3:8080", "10.1.2.3"), ("[::1]:80", "::1"),
                     ("printer.local", "127.0.0.1")):
        r = httpc.request(base, "GET", "/cluster-api/v1/printers",
                          headers={"Host": host})
        assert r.json()[0]["ip_address"] == ip, host


def test_a_change_is_in_the_next_poll(klippy_factory):
    # Cura believes /print_jobs right after its request: a 200 to a change
    # is only sent once the front shows it.  (A finished job on the plate:
    # nothing starts by itself.)
    k = klippy_factory(start=False)
    seeded = k.write_queue(3)
    k.start()
    k.wait_ready()
    base = k.base_url()
    front_pid(k)
    for i in range(6):
        r = upload(base, "part%d.gcode" % (i,), gcode_samples.cura_gcode())
        assert r.status == 200, r
        assert r.json()["uuid"] in [j["uuid"] for j in jobs(base)], i
    listed = [j["uuid"] for j in jobs(base) if j["status"] == "queued"]
    assert len(listed) == 9 and listed[:3] == seeded
    r = httpc.request(base, "POST", JOBS + "/%s/action/move" % (listed[-1],),
                      json_body={"to_position": 0, "list": "queued"})
    assert r.status == 200, r
    assert jobs(base)[1]["uuid"] == listed[-1]
    for uuid in listed:
        r = httpc.request(base, "DELETE", JOBS + "/" + uuid)
        assert r.status == 200, r
        assert uuid not in [j["uuid"] for j in jobs(base)]
    r = httpc.request(base, "POST", "/cluster-api/v1/printers/%s/action/"
                      "plate_cleared" % (printer(base)["uuid"],))
    assert r.status == 200, r
    assert jobs(base) == [] and printer(base)["plate_clear"] is True


def test_restart_ends_the_child_and_starts_a_new_one(klippy_factory):
    port = free_port()
    k = klippy_factory(module_options={"port": port})
    base = "http://127.0.0.1:%d" % (port,)
    for firmware in (False, True):
        old = front_pid(k)
        conn = httpc.connect(base)
        assert httpc.request(conn, "GET", JOBS).status == 200
        assert holder(conn, [old, k.pid]) == old
        k.restart(firmware=firmware)
        assert not alive(old)
        new = front_pid(k)
        assert new != old
        with pytest.raises((ConnectionError, OSError,
                            __import__("http.client").client.HTTPException)):
            r = httpc.request(conn, "GET", JOBS)
            raise AssertionError("old connection answered: %r" % (r,))
        conn.close()
        assert printer(base)["status"] == "idle"


def test_no_child_outlives_a_killed_klippy(klippy_factory):
    port = free_port()
    k = klippy_factory(module_options={"port": port})
    front = front_pid(k)
    k.kill9()
    wait_for(lambda: not alive(front), 10., "the front process to end")
    wait_for(lambda: port_free(port), 10., "the port to be free")


def test_a_dead_child_leaves_klippy_serving(klippy):
    base = klippy.base_url()
    front = front_pid(klippy)
    os.kill(front, signal.SIGKILL)
    wait_for(lambda: not alive(front), 10., "the front process to end")
    wait_for(lambda: "answering in Klippy's process" in klippy.log_text(),
             10., "the log line")
    deadline = time.monotonic() + 10.
    while True:
        try:
            assert printer(base)["status"] == "idle"
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert klippy.query("webhooks")["webhooks"]["state"] == "ready"


def test_a_stopped_front_is_ended_and_klippy_answers(klippy):
    # A front that stops (SIGSTOP, a stuck control thread) acknowledges
    # nothing: Klippy's side ends it after FRONT_HANG_LIMIT and answers
    # on the same port itself, with the jobs it had
    base = klippy.base_url()
    assert upload(base, "kept.gcode", b";TIME:5\nG1 X1\n").status == 200
    front = front_pid(klippy)
    os.kill(front, signal.SIGSTOP)
    try:
        wait_for(lambda: "the front process gave no answer" in
                 klippy.log_text(), 30., "the watchdog's log line")
        wait_for(lambda: not alive(front), 10., "the front process to end")
    finally:
        if alive(front):
            os.kill(front, signal.SIGCONT)
    wait_for(lambda: "answering in Klippy's process" in klippy.log_text(),
             10., "the log line")
    got = wait_for(lambda: _jobs_or_none(base), 10., "a reply")
    assert [j["name"] for j in got] == ["kept"]
    assert klippy.query("cura_connection")["cura_connection"][
        "answered_here"].get("get_print_jobs", 0) >= 1
    assert "Traceback" not in klippy.log_text()


def _jobs_or_none(base):
    try:
        return jobs(base)
    except OSError:
        return None


def test_a_killed_front_leaves_nothing_behind(klippy):
    # its partial upload goes, and so do its two socket pairs' ends in
    # Klippy (Klippy listens again instead: one socket)
    base = klippy.base_url()
    front = front_pid(klippy)
    printer(base)
    sockets = socket_count(klippy.pid)
    conn, rest = slow_upload(base, gcode_samples.cura_gcode() * 2000)
    wait_for(lambda: [n for n in os.listdir(klippy.gcodes_dir)
                      if n.endswith(".part")], 5, "the partial upload")
    os.kill(front, signal.SIGKILL)
    wait_for(lambda: "answering in Klippy's process" in klippy.log_text(),
             10., "the log line")
    conn.close()
    wait_for(lambda: not [n for n in os.listdir(klippy.gcodes_dir)
                          if n.startswith(".cura-")], 5,
             "the partial upload to be removed")
    wait_for(lambda: socket_count(klippy.pid) == sockets - 1, 5,
             "the front's sockets to close")
    assert printer(base)["status"] == "idle"
    assert jobs(base) == []


def test_in_process_serving_still_works(klippy_factory):
    k = klippy_factory(module_options={"front_process": "False"})
    base = k.base_url()
    assert children(k.pid) == []
    assert printer(base)["status"] == "idle"
    r = upload(base, "part.gcode", gcode_samples.cura_gcode())
    assert r.status == 200, r
    wait_for(lambda: jobs(base) and jobs(base)[0]["status"] in (
        "printing", "wait_cleanup"), 20., "the job to start")


def slow_upload(base, data, filename="slow.gcode"):
    """An upload whose last bytes wait: (connection, send the rest)."""
    body, headers = httpc.multipart({"owner": "slow"},
                                    {"file": (filename, data)})
    conn = httpc.connect(base)
    conn.putrequest("POST", JOBS + "/")
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(body[:-100])
    return conn, lambda: conn.send(body[-100:])


def test_uploads_are_received_by_the_child(klippy):
    base = klippy.base_url()
    front = front_pid(klippy)
    conn, rest = slow_upload(base, gcode_samples.cura_gcode())
    wait_for(lambda: holder(conn, [front, klippy.pid]) == front, 5.,
             "the child to hold the upload")
    rest()
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, body
    # the front goes on reading a connection only from its socket
    assert r.getheader("Connection") == "close"
    conn.close()
    assert [j["name"] for j in jobs(base)] == ["slow"]
    assert "received slow.gcode from slow" in klippy.log_text()


def test_paired_uploads_are_checked_in_klippy(klippy_factory):
    k = klippy_factory(module_options={"require_pairing": "True"})
    base = k.base_url()
    front = front_pid(k)
    conn, rest = slow_upload(base, gcode_samples.cura_gcode())
    wait_for(lambda: holder(conn, [front, k.pid]) == k.pid, 5.,
             "Klippy to hold the upload")
    rest()
    r = conn.getresponse()
    assert r.status == 403, r.read()     # no credentials
    conn.close()


def test_a_full_queue_refuses_the_childs_upload(klippy_factory):
    # the child counts the queue it was last shown; Klippy's side decides
    k = klippy_factory(start=False, module_options={"max_queue": 3})
    k.write_queue(2)
    k.start()
    k.wait_ready()
    base = k.base_url()
    front_pid(k)
    replies = [upload(base, "p%d.gcode" % (i,), gcode_samples.cura_gcode())
               for i in range(3)]
    assert [r.status for r in replies] == [200, 409, 409], replies
    assert len(jobs(base)) == 4      # the finished one and three queued
    names = sorted(n for n in os.listdir(k.gcodes_dir)
                   if n.startswith("p") and n[1:2].isdigit())
    assert names == ["p0.gcode"]
