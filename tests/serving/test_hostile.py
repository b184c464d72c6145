"""Hostile input against the real Klippy: every request gets a clear 4xx
JSON answer (or, for a client that stops talking, a closed connection),
nothing is written outside the gcodes folder, no partial file stays, and
Klippy stays ready."""
import gzip
import os
import socket
import time
import uuid

import pytest

import httpc
from httpc import JOBS, jobs
from hostile import (check_gcodes_dir, connect, is_json_error, port_holders,
                     read_reply, read_replies, request_bytes, send, server_pid,
                     thread_count, tree, wait_for)

BOUNDARY = "boundary_.oOo._MjE+Mzk/NDU="
GCODE = b";TIME:60\nG1 X1\nG1 X2\n"
# request_timeout is undocumented: the tests shorten the 60 s to 1 s
OPTIONS = {"request_timeout": 1, "max_upload_size": 4}


def upload_bytes(body, ctype='multipart/form-data; boundary="%s"'
                 % (BOUNDARY,), extra=None):
    headers = {"Content-Type": ctype, "Content-Length": str(len(body))}
    headers.update(extra or {})
    return request_bytes("POST", JOBS + "/", headers, body)


def part(name, data, filename=None, boundary=BOUNDARY):
    disp = 'form-data; name="%s"' % (name,)
    if filename is not None:
        disp += '; filename="%s"' % (filename,)
    return (b"--%s\r\nContent-Disposition: %s\r\n\r\n" % (
        boundary.encode(), disp.encode("utf-8", "surrogateescape"))
        + data + b"\r\n")


def end(boundary=BOUNDARY):
    return b"--%s--\r\n" % (boundary.encode(),)


class Watch:
    """What may change: the gcodes folder, with safe names only."""
    def __init__(self, k):
        self.k = k
        self.outside = self._outside()
        self.parent = set(os.listdir(os.path.dirname(k.workdir)))

    def _outside(self):
        return tree(self.k.workdir, skip=("gcodes", ".cura_connection"))

    def check(self):
        assert self.k.info()["state"] == "ready"
        assert check_gcodes_dir(self.k.gcodes_dir) == []
        # klippy.log and friends change, but no file appears beside them
        assert self._outside() == self.outside
        assert set(os.listdir(os.path.dirname(self.k.workdir))) \
            == self.parent
        assert not [n for n in os.listdir(self.k.gcodes_dir)
                    if n.endswith(".part")]
        # no request ended in an exception
        assert "Traceback" not in self.k.log_text()


def test_hostile_file_names(klippy_factory):
    k = klippy_factory(module_options=OPTIONS)
    base, port = k.base_url(), k.cura_port()
    watch = Watch(k)
    tag = uuid.uuid4().hex[:8]
    names = {
        "../../escape-%s.gcode" % tag: "escape-%s.gcode" % tag,
        "/tmp/abs-%s.gcode" % tag: "abs-%s.gcode" % tag,
        "..\\..\\win-%s.gcode" % tag: "win-%s.gcode" % tag,
        "C:\\Windows\\x-%s.gcode" % tag: "x-%s.gcode" % tag,
        ".hidden.gcode": "hidden.gcode",
        "....gcode": "print.gcode",
        "a\x00b.gcode": "a_b.gcode",
        "ctl\x01\x1b[2J\x7f.gcode": "ctl___2J_.gcode",
        "x;M112\tG28.gcode": "x_M112_G28.gcode",
        "sp ace$(reboot)`id`.gcode": "sp_ace_(reboot)_id_.gcode",
        "\u202eedoc\u200b.gcode": "_edoc_.gcode",
        # within 200 bytes whole, "-<n>" of a taken name included
        "y" * 3000 + ".gcode": "y" * 189 + ".gcode",
        "é" * 300 + ".gcode": "é" * 94 + ".gcode",
    }
    for given, stored in names.items():
        body = part("owner", b"x") + part("file", GCODE, given) + end()
        r = send(port, upload_bytes(body))
        assert r is not None and r.status == 200, (given, r)
        assert r.json()["filename"] == stored, given
        assert os.path.isfile(os.path.join(k.gcodes_dir, stored))
    assert not os.path.exists("/tmp/abs-%s.gcode" % (tag,))
    assert len(jobs(base)) == len(names)
    watch.check()


def test_malformed_uploads(klippy_factory):
    k = klippy_factory(module_options=OPTIONS)
    base, port = k.base_url(), k.cura_port()
    watch = Watch(k)
    good = part("owner", b"x") + part("file", GCODE, "a.gcode") + end()
    two_files = (part("file", GCODE, "a.gcode") + part("file2", GCODE,
                                                       "b.gcode") + end())
    fields = b"".join(part("f%d" % i, b"v") for i in range(40)) + \
        part("file", GCODE, "a.gcode") + end()
    cases = [
        ("no boundary", upload_bytes(good, "multipart/form-data"), 400),
        ("not multipart", upload_bytes(good, "application/json"), 400),
        ("no content type", request_bytes("POST", JOBS + "/", {
            "Content-Length": str(len(good))}, good), 400),
        ("empty boundary", upload_bytes(
            good, 'multipart/form-data; boundary=""'), 400),
        ("boundary too long", upload_bytes(
            good, "multipart/form-data; boundary=" + "b" * 300), 400),
        ("wrong boundary", upload_bytes(
            good, "multipart/form-data; boundary=other"), 400),
        ("garbage body", upload_bytes(os.urandom(5000)), 400),
        ("empty body", upload_bytes(b""), (400, 411)),
        ("no closing boundary", upload_bytes(
            part("file", GCODE, "a.gcode")), 400),
        ("part headers never end", upload_bytes(
            b"--%s\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"a.gcode\"\r\nX-Junk: " % BOUNDARY.encode()
            + b"j" * 3000), 400),
        ("part header too long", upload_bytes(
            b"--%s\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"a.gcode\"\r\nX-Junk: %s\r\n\r\n" % (
                BOUNDARY.encode(), b"j" * 20000) + GCODE + b"\r\n"
            + end()), 400),
        ("no file part", upload_bytes(part("owner", b"x") + end()), 400),
        ("file without name", upload_bytes(
            part("file", GCODE, "") + end()), 415),
        ("two files", upload_bytes(two_files), 400),
        ("forty fields", upload_bytes(fields), 400),
        ("huge field", upload_bytes(part("owner", b"o" * 10000)
                                    + part("file", GCODE, "a.gcode")
                                    + end()), 400),
        ("wrong type", upload_bytes(part("file", b"solid", "a.stl")
                                    + end()), 415),
        ("broken gzip", upload_bytes(part("file", b"\x1f\x8bxx", "a.gcode.gz")
                                     + end()), 400),
        ("truncated gzip", upload_bytes(part(
            "file", gzip.compress("".join(
                "G1 X%d\n" % i for i in range(3000)).encode())[:2000],
            "a.gcode.gz")
            + end()), 400),
        ("not a zip", upload_bytes(part("file", b"PK\x03\x04junk", "a.ufp")
                                   + end()), (400, 415)),
        ("no length", request_bytes("POST", JOBS + "/", {
            "Content-Type": "multipart/form-data; boundary=x"}), 411),
        ("chunked", request_bytes("POST", JOBS + "/", {
            "Content-Type": "multipart/form-data; boundary=x",
            "Transfer-Encoding": "chunked"}, b"0\r\n\r\n"), (400, 411)),
        ("negative length", request_bytes("POST", JOBS + "/", {
            "Content-Type": "multipart/form-data; boundary=x",
            "Content-Length": "-5"}), 400),
        ("text length", request_bytes("POST", JOBS + "/", {
            "Content-Type": "multipart/form-data; boundary=x",
            "Content-Length": "1e3"}), 400),
        # only plain digits (RFC 9110), though int() takes these
        ("length with _", upload_bytes(good, extra={
            "Content-Length": "%d_%s" % (len(good) // 100,
                                         str(len(good))[-2:])}), 400),
        ("length with +", upload_bytes(good, extra={
            "Content-Length": "+%d" % (len(good),)}), 400),
        ("two lengths", upload_bytes(good, extra={
            "Content-Length": "%d\r\nContent-Length: %d" % (
                len(good), len(good) + 1)}), 400),
        ("over max_upload_size", request_bytes("POST", JOBS + "/", {
            "Content-Type": "multipart/form-data; boundary=x",
            "Content-Length": str(5 << 20), "Expect": "100-continue"}), 413),
        ("absurd length", request_bytes("POST", JOBS + "/", {
            "Content-Type": "multipart/form-data; boundary=x",
            "Content-Length": "9" * 40, "Expect": "100-continue"}), 413),
    ]
    for what, data, status in cases:
        statuses = status if isinstance(status, tuple) else (status,)
        r = send(port, data)
        assert is_json_error(r, *statuses), (what, r)
        watch.check()
    assert jobs(base) == []
    assert [n for n in os.listdir(k.gcodes_dir)
            if n != ".thumbs"] == []
    # and the module still takes a good upload
    r = send(port, upload_bytes(good))
    assert r.status == 200, r
    watch.check()


def test_queue_limit(klippy_factory):
    # max_queue jobs may wait; uploads in flight count, and the one past
    # the limit is refused (409) before its body is read or written.
    k = klippy_factory(module_options=dict(OPTIONS, max_queue=2))
    base, port = k.base_url(), k.cura_port()
    watch = Watch(k)

    def send_upload(name):
        return send(port, upload_bytes(part("file", GCODE, name) + end()))

    def names():
        return [j["name"] for j in jobs(base) if j["status"] == "queued"]
    assert send_upload("first.gcode").status == 200
    wait_for(lambda: names() == [], 20, "first job started")
    assert send_upload("q1.gcode").status == 200
    # q2 in flight: the queue is full with it
    big = upload_bytes(part("file", GCODE * 150000, "q2.gcode") + end())
    s = connect(port)
    s.sendall(big[:len(big) // 2])
    wait_for(lambda: [n for n in os.listdir(k.gcodes_dir)
                      if n.endswith(".part")], 5, "q2 in flight")
    r = send_upload("q3.gcode")
    assert is_json_error(r, 409), r
    assert "queue is full" in r.json()["message"]
    assert "max_queue: 2" in r.json()["message"]
    s.sendall(big[len(big) // 2:])
    assert read_reply(s).status == 200
    s.close()
    assert names() == ["q1", "q2"]
    # refused before the body: the client waiting for 100 Continue gets
    # the 409 instead and never sends it
    body = part("file", GCODE, "q4.gcode") + end()
    r = send(port, upload_bytes(b"", extra={
        "Content-Length": str(len(body)), "Expect": "100-continue"}))
    assert is_json_error(r, 409), r
    assert names() == ["q1", "q2"]
    assert not [n for n in os.listdir(k.gcodes_dir)
                if n.startswith(("q3", "q4"))]
    # room again
    q1 = [j["uuid"] for j in jobs(base) if j["name"] == "q1"][0]
    assert httpc.request(base, "DELETE", JOBS + "/" + q1).status == 200
    assert send_upload("q5.gcode").status == 200
    assert names() == ["q2", "q5"]
    watch.check()


def test_truncated_and_stalled_requests(klippy_factory):
    k = klippy_factory(module_options=OPTIONS)
    base, port = k.base_url(), k.cura_port()
    watch = Watch(k)
    httpc.get_json(base, JOBS)
    threads = settled_threads(k.pid)
    # big enough that half of it fills the server's read buffer
    body = part("file", GCODE * 100000, "big.gcode") + end()
    data = upload_bytes(body)
    # client gone mid-upload: temp file removed, no job
    s = connect(port)
    s.sendall(data[:len(data) // 2])
    wait_for(lambda: [n for n in os.listdir(k.gcodes_dir)
                      if n.endswith(".part")], 5, "temp file")
    s.close()
    wait_for(lambda: not [n for n in os.listdir(k.gcodes_dir)
                          if n.endswith(".part")], 5, "temp file removed")
    # client stalls mid-upload: 408 after request_timeout, temp removed
    stalled = []
    for i in range(5):
        s = connect(port)
        s.sendall(data[:len(data) // 3])
        stalled.append(s)
    # ... or stops in the middle of its headers, or sends nothing at all
    for head in (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x",
                 b"POST /cluster-api/v1/print_jobs/ HTTP/1.1\r\n",
                 b"G", b""):
        s = connect(port)
        s.sendall(head)
        stalled.append(s)
    t0 = time.monotonic()
    replies = [read_reply(s) for s in stalled]
    took = time.monotonic() - t0
    assert took < 8, took
    for r in replies[:5]:
        assert is_json_error(r, 408), r
    for r in replies[5:]:
        assert r is None or is_json_error(r, 400, 408), r
    for s in stalled:
        s.close()
    wait_for(lambda: thread_count(k.pid) <= threads, 10,
             "handler threads to end")
    assert jobs(base) == []
    watch.check()


def test_request_line_and_header_abuse(klippy_factory):
    k = klippy_factory(module_options=OPTIONS)
    port = k.cura_port()
    watch = Watch(k)
    long_hdr = b"GET /api/v1/system HTTP/1.1\r\nX-Long: " + b"a" * 70000 \
        + b"\r\n\r\n"
    many_hdrs = b"GET /api/v1/system HTTP/1.1\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n"
    cases = [
        ("garbage line", b"\x00\x01\x02\xff garbage\r\n\r\n", (400,)),
        ("no version", b"GET /\r\n\r\n", (400, 404)),
        ("bad version", b"GET / HTTP/9.9\r\n\r\n", (505,)),
        ("long url", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", (414,)),
        ("long header", long_hdr, (431, 400)),
        ("many headers", many_hdrs, (431,)),
        ("header without colon", b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
         (400, 404)),
        ("unknown method", b"BREW /pot HTTP/1.1\r\n\r\n", (501, 405)),
        ("NUL in path", b"GET /cluster-api/v1/print_jobs/\x00 HTTP/1.1"
         b"\r\n\r\n", (400, 404)),
        ("encoded NUL", b"GET /cluster-api/v1/print_jobs/%00 HTTP/1.1"
         b"\r\n\r\n", (404,)),
        ("control chars", b"GET /a\x01\x1b[2Jb HTTP/1.1\r\n\r\n", (404,)),
        ("traversal", b"GET /cluster-api/v1/print_jobs/../../../etc/passwd "
         b"HTTP/1.1\r\n\r\n", (404,)),
        ("preview traversal", b"GET /cluster-api/v1/print_jobs/..%2f..%2f"
         b"etc/preview_image HTTP/1.1\r\n\r\n", (404,)),
        ("absolute url", b"GET http://evil/etc/passwd HTTP/1.1\r\n\r\n",
         (404,)),
        ("latin-1 header", b"GET /api/v1/system HTTP/1.1\r\nX: \xff\xfe"
         b"\r\n\r\n", (200,)),
    ]
    for what, data, statuses in cases:
        r = send(port, data)
        if statuses == (200,):
            assert r is not None and r.status == 200, (what, r)
        else:
            assert is_json_error(r, *statuses), (what, r)
    watch.check()


def test_action_bodies(klippy_factory):
    k = klippy_factory(module_options=OPTIONS)
    base = k.base_url()
    watch = Watch(k)
    # a queued job (the first one starts printing and holds the plate)
    body, h = httpc.multipart({}, {"file": ("long.gcode", GCODE * 3)})
    first = httpc.request(base, "POST", JOBS + "/", body=body, headers=h)
    body, h = httpc.multipart({}, {"file": ("queued.gcode", GCODE)})
    queued = httpc.request(base, "POST", JOBS + "/", body=body,
                           headers=h).json()["uuid"]
    assert first.status == 200
    action = JOBS + "/%s/action" % (queued,)
    move = JOBS + "/%s/action/move" % (queued,)
    force = JOBS + "/%s" % (queued,)
    cases = [
        ("PUT", action, b"pause", 400),
        ("PUT", action, b"", 400),
        ("PUT", action, b"[]", 400),
        ("PUT", action, b'"pause"', 400),
        ("PUT", action, b'{"action": ["pause"]}', 400),
        ("PUT", action, b'{"action": {"a": 1}}', 400),
        ("PUT", action, b'{"action": 5}', 400),
        ("PUT", action, b'{"action": null}', 400),
        ("PUT", action, b'{"action": "reboot"}', 400),
        ("PUT", action, b"[" * 100000 + b"]" * 100000, 413),
        ("PUT", action, b"[" * 30000, 400),
        ("PUT", action, b'{"action": "\xff\xfe"}', 400),
        ("PUT", action, b'{"action": "pause"}', 409),     # queued job
        ("POST", move, b'{"to_position": "0"}', 400),
        ("POST", move, b'{"to_position": -1}', 400),
        ("POST", move, b'{"to_position": true}', 400),
        ("POST", move, b'{"to_position": 1e308}', 400),
        ("POST", move, b'{"to_position": NaN}', 400),
        ("POST", move, b'{"to_position": 0, "list": "printing"}', 400),
        ("POST", move, b"{}", 400),
        ("PUT", force, b'{"force": "yes"}', 400),
        ("PUT", force, b'{"force": 1}', 400),
        ("PUT", force, b"null", 400),
    ]
    for method, path, data, status in cases:
        r = httpc.request(base, method, path, body=data,
                          headers={"Content-Type": "application/json"})
        assert r.status == status and r.json()["message"], (
            method, path, data[:40], r)
    # a huge position just means "last"
    r = httpc.request(base, "POST", move,
                      json_body={"to_position": 10 ** 30})
    assert r.status == 200, r
    # unknown jobs
    nobody = str(uuid.uuid4())
    for method, path, body in [
            ("GET", JOBS + "/" + nobody, None),
            ("PUT", JOBS + "/%s/action" % nobody, {"action": "abort"}),
            ("POST", JOBS + "/%s/action/move" % nobody, {"to_position": 0}),
            ("PUT", JOBS + "/" + nobody, {"force": True}),
            ("DELETE", JOBS + "/" + nobody, None),
            ("GET", JOBS + "/%s/preview_image" % nobody, None),
            ("GET", JOBS + "/not-a-uuid-zz", None),
            ("DELETE", JOBS + "/" + "f" * 65, None)]:
        r = httpc.request(base, method, path, json_body=body)
        assert r.status == 404 and r.json()["message"], (method, path, r)
    assert [j["uuid"] for j in jobs(base) if j["status"] == "queued"] \
        == [queued]
    watch.check()


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol">
<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<fdmmaterial xmlns="http://www.ultimaker.com/material">&lol4;</fdmmaterial>
"""
XXE = b"""<?xml version="1.0"?>
<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<fdmmaterial xmlns="http://www.ultimaker.com/material"><metadata>
<name><brand>&x;</brand></name></metadata></fdmmaterial>
"""
EXTERNAL_DTD = b"""<?xml version="1.0"?>
<!DOCTYPE m SYSTEM "http://127.0.0.1:1/evil.dtd">
<fdmmaterial xmlns="http://www.ultimaker.com/material"/>
"""
PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE m [<!ENTITY % p SYSTEM "file:///etc/passwd"> %p;]>
<fdmmaterial xmlns="http://www.ultimaker.com/material"/>
"""
MATERIAL = """<?xml version="1.0" encoding="UTF-8"?>
<fdmmaterial xmlns="http://www.ultimaker.com/material" version="1.3">
<metadata><name><brand>Generic</brand><material>PLA</material>
<color>Red</color></name><GUID>%s</GUID><version>3</version>
<color_code>#ff0000</color_code></metadata></fdmmaterial>
"""


def test_material_abuse(klippy_factory):
    k = klippy_factory(module_options=OPTIONS)
    base = k.base_url()
    watch = Watch(k)
    mats = os.path.join(k.data_dir, "materials")

    def post(filename, data, name="file"):
        body, h = httpc.multipart({}, {name: (filename, data)})
        return httpc.request(base, "POST", "/cluster-api/v1/materials/",
                             body=body, headers=h)
    for what, filename, data in [
            ("billion laughs", "a.xml.fdm_material", BILLION_LAUGHS),
            ("external entity", "a.xml.fdm_material", XXE),
            ("external dtd", "a.xml.fdm_material", EXTERNAL_DTD),
            ("parameter entity", "a.xml.fdm_material", PARAMETER_ENTITY),
            ("not xml", "a.xml.fdm_material", b"\x00\xff not xml"),
            ("empty", "a.xml.fdm_material", b""),
            ("wrong root", "a.xml.fdm_material", b"<html/>"),
            ("no guid", "a.xml.fdm_material",
             MATERIAL.replace("<GUID>%s</GUID>", "").encode()),
            ("bad version", "a.xml.fdm_material", (MATERIAL % uuid.uuid4())
             .replace("<version>3", "<version>x").encode()),
            ("wrong name", "a.xml", (MATERIAL % uuid.uuid4()).encode()),
            ("traversal only", "../.xml.fdm_material",
             (MATERIAL % uuid.uuid4()).encode())]:
        r = post(filename, data)
        assert r.status == 400 and r.json()["message"], (what, r)
    r = post("big.xml.fdm_material", b"<a>" + b"x" * (5 << 20) + b"</a>")
    assert r.status == 413, r
    body, h = httpc.multipart({"owner": "x"}, {})
    r = httpc.request(base, "POST", "/cluster-api/v1/materials/", body=body,
                      headers=h)
    assert r.status == 400, r
    assert not os.path.isdir(mats) or os.listdir(mats) == []
    # a traversal name lands inside the materials folder
    guid = str(uuid.uuid4())
    r = post("../../../../evil.xml.fdm_material",
             (MATERIAL % guid).encode())
    assert r.status == 200, r
    assert os.listdir(mats) == ["evil.xml.fdm_material"]
    assert [m["guid"] for m in httpc.get_json(
        base, "/cluster-api/v1/materials")] == [guid]
    watch.check()


def settled_threads(pid):
    # handler threads of closed connections end within moments
    last = None
    while True:
        n = thread_count(pid)
        if n == last:
            return n
        last = n
        time.sleep(0.3)


def test_connection_flood(klippy_factory):
    # 100 connections that send nothing (MAX_CONNECTIONS): Cura's polls
    # are still answered (the oldest idle connection makes room), and the
    # threads stay bounded
    k = klippy_factory(module_options={"request_timeout": 30})
    base, port = k.base_url(), k.cura_port()
    httpc.get_json(base, JOBS)
    server = server_pid(k)     # the front process holds idle connections
    threads = settled_threads(server)
    idle = []
    for i in range(100):
        idle.append(connect(port))
    wait_for(lambda: thread_count(server) >= threads + 100, 10,
             "100 handler threads")
    for i in range(5):
        assert httpc.get_json(base, "/cluster-api/v1/printers")[0][
            "status"] == "idle"
        assert httpc.get_json(base, JOBS) == []
    assert thread_count(server) < threads + 102
    # the oldest ones were closed to make room (EOF, no reply), the
    # newest still wait
    for s in idle[:10]:
        assert read_reply(s) is None
    idle[-1].setblocking(False)
    with pytest.raises(BlockingIOError):
        idle[-1].recv(1)
    for s in idle:
        s.close()
    wait_for(lambda: thread_count(server) <= threads, 10, "threads to end")
    assert k.info()["state"] == "ready"


def test_connection_flood_in_process(klippy_factory):
    # without the front, the 101st connection gets a complete 503
    k = klippy_factory(module_options={"request_timeout": 30,
                                       "front_process": "False"})
    base, port = k.base_url(), k.cura_port()
    httpc.get_json(base, JOBS)
    threads = settled_threads(k.pid)
    idle = [connect(port) for i in range(100)]
    wait_for(lambda: thread_count(k.pid) >= threads + 100, 10,
             "100 handler threads")
    extra = connect(port)
    r = read_reply(extra)
    extra.close()
    assert is_json_error(r, 503), r
    for s in idle:
        s.close()
    wait_for(lambda: thread_count(k.pid) <= threads, 10, "threads to end")
    assert httpc.get_json(base, JOBS) == []


@pytest.mark.parametrize("header", ["Content-Length", "Host"])
def test_duplicate_headers(klippy, header):
    # two conflicting values: refused or one value used, never a crash
    data = (b"PUT %s/%s HTTP/1.1\r\nHost: 127.0.0.1\r\n%s: 2\r\n%s: 30\r\n"
            b"Content-Type: application/json\r\n\r\n{}" % (
                JOBS.encode(), str(uuid.uuid4()).encode(),
                header.encode(), header.encode()))
    if header == "Host":
        data = data.replace(b"\r\n\r\n{}", b"\r\nContent-Length: 2\r\n\r\n{}")
    r = send(klippy.cura_port(), data, timeout=5)
    assert r is None or is_json_error(r, 400, 404, 408), r
    assert klippy.info()["state"] == "ready"
    assert httpc.get_json(klippy.base_url(), JOBS) == []


def queued_job(base):
    # the first upload starts printing and holds the plate; the second
    # stays queued
    for name in ("long", "queued"):
        body, h = httpc.multipart({}, {"file": (name + ".gcode",
                                                GCODE * 3)})
        r = httpc.request(base, "POST", JOBS + "/", body=body, headers=h)
        assert r.status == 200, r
    return r.json()["uuid"]


@pytest.mark.parametrize("data, answers, ending", [
    # a bare-LF head, then a CRLF one in the same write: both, in order
    # (and the connection stays open: no more replies come)
    (b"GET /cluster-api/v1/printers HTTP/1.1\nHost: x\n\n"
     b"GET /api/v1/system HTTP/1.1\r\nHost: x\r\n\r\n", [list, dict],
     "timeout"),
    (b"GET /api/v1/system HTTP/1.1\r\nHost: x\r\n\r\n"
     b"GET /cluster-api/v1/printers HTTP/1.1\nHost: x\n\n"
     b"GET /cluster-api/v1/print_jobs/history HTTP/1.1\n\n",
     [dict, list, list], "timeout"),
    # a bare CR is not a line end: the head goes to http.server, which
    # answers it, and the connection ends with that reply
    (b"GET /api/v1/system HTTP/1.1\r\nHost: x\rX: y\r\n\r\n"
     b"GET /cluster-api/v1/printers HTTP/1.1\r\n\r\n", [dict], "eof"),
    # a request the front hands over is answered and closed: the one
    # behind it is refused (never run), the close is clean
    (b"GET /api/v1/auth/verify HTTP/1.1\n\n"
     b"GET /cluster-api/v1/printers HTTP/1.1\r\n\r\n", [dict], "eof"),
])
def test_pipelined_heads_are_answered_once_each_in_order(
        klippy, data, answers, ending):
    s = connect(klippy.cura_port(), timeout=3)
    s.sendall(data)
    replies, how = read_replies(s, len(answers) + 1)
    s.close()
    assert [r.status for r in replies] == [200] * len(answers), replies
    assert [type(r.json()) for r in replies] == answers, replies
    assert how == ending, (how, replies)


@pytest.mark.parametrize("smuggler", [
    b"GET /cluster-api/v1/printers HTTP/1.1\n\nPOST /cluster-api/v1/"
    b"materials HTTP/1.1\r\nContent-Type: text/plain\r\n"
    b"Content-Length: %d\r\n\r\n",
    b"GET /cluster-api/v1/printers HTTP/1.1\n\nPOST /cluster-api/v1/"
    b"print_jobs/ HTTP/1.1\r\nContent-Type: multipart/form-data; "
    b"boundary=b\r\nContent-Length: %d\r\n\r\n",
    b"GET /cluster-api/v1/printers HTTP/1.1\r\nContent-Length: %d\r\n\r\n",
])
def test_a_body_never_runs_as_a_request(klippy_factory, smuggler):
    k = klippy_factory(module_options=OPTIONS)
    base = k.base_url()
    uuid_ = queued_job(base)
    inner = request_bytes("DELETE", JOBS + "/" + uuid_)
    s = connect(k.cura_port(), timeout=3)
    s.sendall(smuggler % (len(inner),) + inner)
    replies, how = read_replies(s, 3)
    s.close()
    assert replies and replies[0].status == 200, replies
    assert how in ("eof", "timeout"), (how, replies)
    for r in replies[1:]:
        assert is_json_error(r, 400, 413, 415), r
    # (a DELETE reply would say "deleted")
    assert not [r for r in replies if b"deleted" in r.body]
    assert uuid_ in [j["uuid"] for j in jobs(base)]


@pytest.mark.parametrize("data", [
    b"GET /cluster-api/v1/print_jobs HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /cluster-api/v1/printers HTTP/1.0\r\n\r\n",
    b"GET /api/v1/auth/verify HTTP/1.1\r\nConnection: close\r\n\r\n",
])
def test_a_close_with_bytes_behind_it_is_clean(klippy, data):
    # the client reads the whole reply and then the end, not a reset
    behind = b"GET /api/v1/system HTTP/1.1\r\n\r\n" * 200
    s = connect(klippy.cura_port(), timeout=5)
    s.sendall(data + behind)
    replies, how = read_replies(s, 2)
    s.close()
    assert [r.status for r in replies] == [200], replies
    assert replies[0].headers["connection"] == "close"
    assert how == "eof", how


@pytest.mark.parametrize("lengths", [
    b"Content-Length: 0\r\nContent-Length: %d\r\n",
    b"Content-Length: 0\r\ncontent-length: %d\r\n",
], ids=["same case", "other case"])
def test_two_lengths_on_a_read_never_smuggle(klippy_factory, lengths):
    # A read the front answers, with two Content-Lengths: 0 and the
    # length of a body that is a DELETE.  Refused (400, as http.server
    # does: the lengths differ), and the body never runs.
    k = klippy_factory(module_options=OPTIONS)
    base = k.base_url()
    uuid_ = queued_job(base)
    inner = request_bytes("DELETE", JOBS + "/" + uuid_)
    s = connect(k.cura_port(), timeout=3)
    s.sendall(b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x\r\n"
              + lengths % (len(inner),) + b"\r\n" + inner)
    replies, how = read_replies(s, 3)
    s.close()
    assert not [r for r in replies if b"deleted" in r.body], replies
    assert len(replies) == 1 and is_json_error(replies[0], 400), replies
    assert how == "eof", (how, replies)
    assert uuid_ in [j["uuid"] for j in jobs(base)]


@pytest.mark.parametrize("head", [
    b"GET /cluster-api/v1/printers HTTP/1.0\r\n",
    b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x\r\n",
    b"GET /cluster-api/v1/printers HTTP/1.0",
], ids=["request line", "headers", "no line end"])
def test_a_head_ended_by_the_clients_close_is_answered(klippy_factory,
                                                       head):
    # A client that sends its head without the empty line and then
    # closes its side (printf ... | nc): http.server takes the end of
    # the data as the end of the head and answers it, so the module does
    # whichever process reads it.
    k = klippy_factory(module_options=OPTIONS)
    s = connect(k.cura_port(), timeout=5)
    s.sendall(head)
    s.shutdown(socket.SHUT_WR)
    replies, how = read_replies(s, 2)
    s.close()
    assert [r.status for r in replies] == [200], (replies, how)
    assert isinstance(replies[0].json(), list), replies


@pytest.mark.parametrize("stall", [
    # a head longer than the front reads, never finished
    b"GET /cluster-api/v1/printers HTTP/1.1\r\nX-A: " + b"a" * 17000,
    # a handed-over request whose body never comes
    b"PUT " + JOBS.encode() + b"/01234567-89ab-cdef-0123-456789abcdef/"
    b"action HTTP/1.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 30\r\n\r\n{",
], ids=["long head", "handed-over body"])
def test_polls_answered_while_100_slow_requests_wait(klippy_factory,
                                                     stall):
    # Slow clients are idle connections too, whichever process reads
    # them: 100 of them (MAX_CONNECTIONS) never keep Cura's polls out.
    k = klippy_factory(module_options={"request_timeout": 30})
    base, port = k.base_url(), k.cura_port()
    httpc.get_json(base, JOBS)
    slow = []
    try:
        for i in range(100):
            s = connect(port)
            s.sendall(stall)
            slow.append(s)
        # (settle: the front hands most of them over to Klippy's process)
        pids = [server_pid(k), k.pid]
        try:
            wait_for(lambda: port_holders(port, pids).count(k.pid) >= 100,
                     5.)
        except AssertionError:
            pass
        for i in range(3):
            r = httpc.request(base, "GET", "/cluster-api/v1/printers")
            assert r.status == 200, r
            assert r.json()[0]["status"] == "idle"
    finally:
        for s in slow:
            s.close()
    assert k.info()["state"] == "ready"
