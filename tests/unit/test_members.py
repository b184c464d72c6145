"""A member's Moonraker client on its own, against a small stub HTTP
server on loopback: the URL it accepts, the multipart body of an upload,
how Moonraker's refusals and network trouble are said, that a poll is
bounded by the timeout, and that close() leaves nothing open."""
import email.parser
import hashlib
import http.server
import json
import socket
import threading

import pytest

from _cura_connection.members import (MemberError, MoonrakerMember,
                                      check_remote_name, parse_member_url)


class Stub:
    """Moonraker's shape: routes[(method, path)] = (status, reply dict)
    or a function(handler, body) returning that.  Records requests."""
    def __init__(self):
        self.routes = {}
        self.requests = []
        self.closed = threading.Event()   # a client connection ended
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle(self):
                http.server.BaseHTTPRequestHandler.handle(self)
                stub.closed.set()

            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                stub.requests.append((self.command, self.path,
                                      self.headers, body))
                route = stub.routes.get((self.command, self.path))
                if callable(route):
                    route = route(self, body)
                status, reply = route or (404, {"error": {
                    "code": 404, "message": "Not Found"}})
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            do_GET = do_POST = do_DELETE = answer

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d" % (self.server.server_port,)
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.close()


def ok(result):
    return (200, {"result": result})


def refused(status, message):
    return (status, {"error": {"code": status, "message": message}})


def silent_listener():
    """A loopback socket that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s, "http://127.0.0.1:%d" % (s.getsockname()[1],)


def test_url_must_be_http_with_host_and_port():
    assert parse_member_url("http://192.168.1.23:7125") == ("192.168.1.23",
                                                            7125)
    assert parse_member_url("http://voron.local:7126/") == ("voron.local",
                                                            7126)
    for bad, why in [("https://voron:7125", "not an http:// URL"),
                     ("voron:7125", "not an http:// URL"),
                     ("http://voron", "needs a host and a port"),
                     ("http://:7125", "needs a host and a port"),
                     ("http://voron:99999", "bad port"),
                     ("http://voron:12ab", "bad port"),
                     ("http://voron:7125/printer", "only http://host:port")]:
        with pytest.raises(ValueError, match=why):
            MoonrakerMember("voron", bad)


def test_remote_names_are_plain():
    assert check_remote_name("benchy 2.gcode") == "benchy 2.gcode"
    for bad in ["", ".hidden.gcode", "a/b.gcode", "..", 'a"b.gcode',
                "a\r\nX: y.gcode"]:
        with pytest.raises(ValueError):
            check_remote_name(bad)


def test_upload_is_one_multipart_post_with_the_checksum(stub, tmp_path):
    data = bytes(range(256)) * 5000                # over several chunks
    src = tmp_path / "part.gcode"
    src.write_bytes(data)
    stub.routes[("POST", "/server/files/upload")] = (201, {
        "item": {"path": "benchy.gcode", "root": "gcodes"}})
    member = MoonrakerMember("voron", stub.url, api_key="k3y")
    reply = member.upload(str(src), "benchy.gcode")
    member.close()
    assert reply["item"]["path"] == "benchy.gcode"
    [(method, path, headers, body)] = stub.requests
    assert headers["X-Api-Key"] == "k3y"
    assert int(headers["Content-Length"]) == len(body)
    msg = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + headers["Content-Type"].encode() + b"\r\n\r\n"
        + body)
    parts = {p.get_param("name", header="content-disposition"): p
             for p in msg.get_payload()}
    assert parts["root"].get_payload() == "gcodes"
    assert parts["checksum"].get_payload() == hashlib.sha256(
        data).hexdigest()
    assert parts["file"].get_filename() == "benchy.gcode"
    assert parts["file"].get_payload(decode=True) == data


def test_refusals_carry_moonrakers_message(stub):
    stub.routes[("POST", "/printer/print/start?filename=nope.gcode")] = \
        refused(400, "Unable to open file")
    member = MoonrakerMember("voron", stub.url)
    with pytest.raises(MemberError) as e:
        member.start("nope.gcode")
    assert e.value.message == ("voron refused to start nope.gcode: Unable "
                               "to open file")
    assert e.value.status == 400
    member.close()


def test_a_bare_reason_takes_the_detail_from_the_traceback(stub):
    # Moonraker 0.11's form for a checksum mismatch (the message is only
    # the HTTP reason)
    stub.routes[("POST", "/server/files/upload")] = (422, {"error": {
        "code": 422, "message": "Unprocessable Entity", "traceback":
        "Traceback (most recent call last):\n  ...\ntornado.web.HTTPError: "
        "HTTP 422: Unprocessable Entity (File checksum mismatch: expected "
        "00, calculated 11)\n"}})
    member = MoonrakerMember("voron", stub.url)
    with pytest.raises(MemberError) as e:
        member.upload(__file__, "a.gcode")
    assert e.value.message == ("voron refused the file: File checksum "
                               "mismatch: expected 00, calculated 11")
    assert e.value.status == 422
    member.close()


def test_401_says_what_to_do(stub):
    stub.routes[("GET", "/server/info")] = refused(401, "Unauthorized")
    stub.routes[("POST", "/printer/print/pause")] = refused(401,
                                                           "Unauthorized")
    member = MoonrakerMember("voron", stub.url)
    status = member.poll()
    assert not status["reachable"] and status["klippy_state"] is None
    assert "asks for an API key (401 Unauthorized)" in status["error"]
    keyed = MoonrakerMember("voron", stub.url, api_key="wrong")
    with pytest.raises(MemberError, match=r"refused the API key \(401\)"):
        keyed.pause()
    assert stub.requests[-1][2]["X-Api-Key"] == "wrong"
    member.close()
    keyed.close()


def test_unreachable_member_is_a_status_not_an_exception():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))               # bound, not listening
    url = "http://127.0.0.1:%d" % (s.getsockname()[1],)
    member = MoonrakerMember("voron", url)
    status = member.poll()
    assert status["reachable"] is False
    assert status["error"] == ("voron (%s) is unreachable: connection "
                               "refused" % (url,))
    with pytest.raises(MemberError, match="unreachable: connection refused"):
        member.cancel()
    assert member.webcams() == []
    member.close()
    s.close()


def test_poll_ends_when_the_member_never_answers():
    s, url = silent_listener()
    member = MoonrakerMember("voron", url, timeout=0.5)
    status = member.poll()
    assert not status["reachable"]
    assert status["error"].endswith("is unreachable: no answer in time")
    member.close()
    s.close()


def test_klippy_not_ready_is_reachable_with_its_state(stub):
    stub.routes[("GET", "/server/info")] = ok({
        "klippy_connected": True, "klippy_state": "startup"})
    stub.routes[("GET", "/printer/info")] = ok({
        "state": "startup", "state_message": "Printer is not ready"})
    member = MoonrakerMember("voron", stub.url)
    status = member.poll()
    assert status["reachable"] and status["error"] == ""
    assert status["klippy_state"] == "startup"
    assert status["state_message"] == "Printer is not ready"
    assert status["print_stats"] is None and status["extruders"] == []
    stub.routes[("GET", "/server/info")] = ok({
        "klippy_connected": False, "klippy_state": "disconnected"})
    assert member.poll()["klippy_state"] == "disconnected"
    member.close()


def test_ready_status_reads_every_extruder_in_order(stub):
    stub.routes[("GET", "/server/info")] = ok({
        "klippy_connected": True, "klippy_state": "ready"})
    stub.routes[("GET", "/printer/objects/list")] = ok({"objects": [
        "extruder10", "extruder2", "extruder_stepper x", "extruder",
        "print_stats", "toolhead"]})
    stub.routes[("POST", "/printer/objects/query")] = lambda h, body: ok({
        "status": dict({n: {"temperature": i, "target": 0} for i, n in
                        enumerate(sorted(json.loads(body)["objects"]))},
                       toolhead={"axis_minimum": [0, 1, 2, 3],
                                 "axis_maximum": [9, 8, 7, 6]},
                       webhooks={"state": "ready",
                                 "state_message": "Printer is ready"})})
    member = MoonrakerMember("voron", stub.url)
    status = member.poll()
    member.close()
    asked = json.loads(stub.requests[-1][3])["objects"]
    assert "heater_bed" not in asked and "extruder_stepper x" not in asked
    temps = sorted(n for n in asked)
    assert [e["temperature"] for e in status["extruders"]] == [
        temps.index(n) for n in ("extruder", "extruder2", "extruder10")]
    assert status["heater_bed"] is None
    assert status["axis_minimum"] == [0, 1, 2]
    assert status["axis_maximum"] == [9, 8, 7]
    assert status["state_message"] == "Printer is ready"


def test_webcam_urls_resolve_against_the_members_host(stub):
    stub.routes[("GET", "/server/webcams/list")] = ok({"webcams": [
        {"name": "bed", "enabled": True, "service": "mjpegstreamer",
         "stream_url": "/webcam/?action=stream",
         "snapshot_url": "http://10.0.0.9:8081/snap.jpg"},
        {"name": "off", "enabled": False, "stream_url": "/webcam2/"}]})
    member = MoonrakerMember("voron", stub.url)
    assert member.webcams() == [{
        "name": "bed", "service": "mjpegstreamer",
        "stream_url": "http://127.0.0.1/webcam/?action=stream",
        "snapshot_url": "http://10.0.0.9:8081/snap.jpg"}]
    member.close()


def test_delete_of_a_missing_file_is_no_error(stub):
    # Moonraker 0.11 says 400 "Bad Request" for a missing file
    stub.routes[("DELETE", "/server/files/gcodes/gone%20file.gcode")] = \
        refused(400, "Bad Request")
    member = MoonrakerMember("voron", stub.url)
    member.delete("gone file.gcode")
    stub.routes[("DELETE", "/server/files/gcodes/busy.gcode")] = refused(
        403, "File is loaded, DELETE not permitted")
    with pytest.raises(MemberError, match="DELETE not permitted"):
        member.delete("busy.gcode")
    member.close()


def test_close_leaves_no_connection_open(stub):
    stub.routes[("GET", "/server/info")] = ok({
        "klippy_connected": False, "klippy_state": "disconnected"})
    member = MoonrakerMember("voron", stub.url)
    member.poll()
    assert not stub.closed.is_set()         # kept alive for the next poll
    member.close()
    assert stub.closed.wait(5)
    assert member.poll()["error"] == "voron is closed"


def test_close_breaks_off_a_request_under_way():
    s, url = silent_listener()
    member = MoonrakerMember("voron", url, timeout=60.)
    out = []
    t = threading.Thread(target=lambda: out.append(member.poll()))
    t.start()
    conn, _ = s.accept()
    assert conn.recv(65536).startswith(b"GET /server/info ")
    member.close()                # the poll waits: close does not
    t.join(30)
    assert not t.is_alive()
    assert not out[0]["reachable"] and "voron" in out[0]["error"]
    assert conn.recv(1) == b""             # and the member closed it
    conn.close()
    s.close()
