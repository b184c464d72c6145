"""The module inside the real Klippy: endpoints, status following Klippy,
prints started outside Cura, restarts and a busy port."""
import socket

import pytest

import httpc
from hostile import assert_config_errors, children, free_port, socket_count
from httpc import printer, wait_for


def test_endpoints_answer_json(klippy_factory):
    k = klippy_factory(extruders=2, module_options={"name": "testprinter"})
    base = k.base_url()
    system = httpc.get_json(base, "/api/v1/system")
    assert system["name"] == "testprinter"
    assert system["hardware"]["typeid"] == 213482
    assert system["firmware"] >= "4.4"
    p = printer(base)
    assert p["friendly_name"] == "testprinter"
    assert p["status"] == "idle"
    assert p["ip_address"] == "127.0.0.1"
    assert p["uuid"] == system["guid"]
    assert [c["extruder_index"] for c in p["configuration"]] == [0, 1]
    assert httpc.get_json(base, "/cluster-api/v1/print_jobs") == []
    assert httpc.get_json(base, "/cluster-api/v1/materials") == []
    # trailing slashes, as Cura sends some paths, are the same endpoints
    assert httpc.get_json(base, "/cluster-api/v1/printers/")[0]["uuid"] \
        == p["uuid"]
    for method, path, status in [
            ("GET", "/cluster-api/v1/print_jobs/%s/preview_image"
             % ("0" * 8,), 404),
            ("GET", "/nothing/here", 404),
            ("DELETE", "/cluster-api/v1/printers", 405),
            ("PUT", "/api/v1/system", 405),
            ("PATCH", "/cluster-api/v1/printers", 405)]:
        r = httpc.request(base, method, path)
        assert r.status == status, (method, path, r)
        assert r.headers["Content-Type"] == "application/json"
        assert r.json()["message"]
    # the port is the one objects/query reports
    assert k.query("cura_connection")["cura_connection"]["port"] \
        == int(base.rsplit(":", 1)[1])


def test_auth_handshake_of_newer_cura(klippy):
    base = klippy.base_url()
    r = httpc.request(base, "POST", "/api/v1/auth/request", json_body={
        "application": "UltiMaker Cura", "user": "user@host"})
    assert r.status == 200
    creds = r.json()
    assert creds["id"] and creds["key"]
    # Cura >= 5.11 then signs every request with HTTP Digest
    digest = ('Digest username="%s", realm="Jedi-API", nonce="abc", '
              'uri="/cluster-api/v1/printers", nc=00000001, '
              'cnonce="0123456789abcdef", qop=auth, response="00", '
              'algorithm="SHA-256"' % (creds["id"],))
    r = httpc.request(base, "GET", "/cluster-api/v1/printers",
                      headers={"Authorization": digest})
    assert r.status == 200 and r.json()[0]["status"] == "idle"
    assert httpc.get_json(base, "/api/v1/auth/check/%s" % (creds["id"],)) \
        == {"message": "authorized"}


def test_status_follows_klippy_shutdown(klippy):
    base = klippy.base_url()
    klippy.gcode("M112")
    p = wait_for(lambda: printer(base)["status"] == "error" and printer(base),
                 what="error status")
    assert p["klipper_state"] == "shutdown"
    klippy.restart(firmware=True)
    wait_for(lambda: printer(klippy.base_url())["status"] == "idle",
             what="idle after FIRMWARE_RESTART")


def test_status_error_when_config_is_wrong(klippy_factory):
    # another section's typo puts Klippy in "error"; Cura still gets answers
    port = free_port()
    k = klippy_factory(module_options={"port": port},
                       extra_cfg="[idle_timeout]\nno_such_option: 1\n",
                       wait=False)
    k.wait_state("error")
    base = "http://127.0.0.1:%d" % (port,)
    p = wait_for(lambda: printer(base)["status"] == "error" and printer(base),
                 what="error status")
    assert "no_such_option" in p["state_message"]


def test_print_started_in_klipper_is_a_job(klippy):
    base = klippy.base_url()
    fname = klippy.write_gcode("from_console.gcode", moves=400,
                               sleep_every=10, sleep_s=0.1,
                               header=";TIME:600\n")
    klippy.gcode("SDCARD_PRINT_FILE FILENAME=%s" % (fname,))
    uuid = printer(base)["uuid"]
    job = wait_for(lambda: [j for j in httpc.get_json(
        base, "/cluster-api/v1/print_jobs") if j["status"] == "printing"],
        what="printing job")[0]
    assert job["name"] == "from_console"
    assert job["printer_uuid"] == uuid and job["assigned_to"] == uuid
    assert job["time_total"] >= 600 - 1 and job["source"] == "klipper"
    assert printer(base)["status"] == "printing"
    klippy.gcode("PAUSE")
    wait_for(lambda: httpc.get_json(base, "/cluster-api/v1/print_jobs")[0][
        "status"] == "paused", what="paused")
    klippy.gcode("CANCEL_PRINT")
    job = wait_for(lambda: [j for j in httpc.get_json(
        base, "/cluster-api/v1/print_jobs")
        if j["status"] == "aborted_wait_cleanup"], what="aborted")[0]
    assert job["printer_uuid"] == uuid
    assert printer(base)["status"] == "idle"
    # the user clears the plate: the job moves to history, unlinked, and
    # leaves Cura's list (Cura then clears its printer card)
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    jobs = wait_for(lambda: [j for j in httpc.get_json(
        base, httpc.HISTORY) if j["status"] == "aborted"],
        what="aborted in history")
    assert "printer_uuid" not in jobs[0]
    assert jobs[0]["printed_on_uuid"] == uuid
    assert httpc.get_json(base, "/cluster-api/v1/print_jobs") == []
    # each job stays readable on its own
    assert httpc.get_json(base, "/cluster-api/v1/print_jobs/%s"
                          % (jobs[0]["uuid"],))["status"] == "aborted"


@pytest.mark.parametrize("firmware", [False, True],
                         ids=["RESTART", "FIRMWARE_RESTART"])
def test_restart_rebinds_and_leaks_nothing(klippy_factory, firmware):
    port = free_port()
    k = klippy_factory(module_options={"port": port})
    base = "http://127.0.0.1:%d" % (port,)
    printer(base)
    threads = sockets = None
    for i in range(10):
        # Cura keeps its connection open between polls
        conn = httpc.connect(base)
        assert httpc.request(conn, "GET", "/cluster-api/v1/printers").status \
            == 200
        k.restart(firmware=firmware)
        assert k.cura_port() == port
        # the old keep-alive connection must not reach the new instance
        with pytest.raises((ConnectionError, OSError,
                            __import__("http.client").client.HTTPException)):
            r = httpc.request(conn, "GET", "/cluster-api/v1/printers")
            raise AssertionError("old connection answered: %r" % (r,))
        conn.close()
        assert printer(base)["status"] == "idle"
        if i == 1:
            threads, sockets = k.thread_count(), socket_count(k.pid)
    # handler threads of closed connections end within moments
    wait_for(lambda: k.thread_count() <= threads, 5., "threads to end")
    # Klippy itself leaks a pipe pair per restart (its serial queue), so
    # count sockets: the module's listening socket and connections.  The
    # baseline may have caught a handler thread whose socket was already
    # closed, so wait for the last one to close too.
    wait_for(lambda: socket_count(k.pid) <= sockets, 5., "sockets to close")
    log = k.log_text()
    assert "Address already in use" not in log
    assert log.count("cura_connection: released port %d" % (port,)) == 10
    # one front process: each restart ended the one before
    assert len(children(k.pid)) == 1


def test_busy_port_is_a_config_error(klippy_factory):
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen(1)
        port = s.getsockname()[1]
        k = klippy_factory(module_options={"port": port}, wait=False)
        info = k.wait_state("error")
        assert "cannot listen" in info["state_message"]
        assert "Address already in use" in info["state_message"]
        # each RESTART while the port stays busy fails the same way and
        # leaves no thread behind (the state writer of the failed load)
        threads = k.thread_count()
        for _ in range(3):
            failed = k.log_text().count("cannot listen")
            k.api.send("gcode/restart", {})     # (taken in any state)
            wait_for(lambda: k.log_text().count("cannot listen") > failed,
                     20., "the next load to fail")
            k.wait_state("error")
        wait_for(lambda: k.thread_count() <= threads, 5.,
                 "no thread left over")


def test_bad_option_values_are_config_errors(klippy_factory):
    assert_config_errors(klippy_factory, [
        ({"port": 70000}, "port"),
        ({"cura_machine": "prusa"}, "cura_machine"),
        ({"address": "not-an-ip"}, "address"),
        ({"max_queue": 0}, "max_queue"), ({"max_queue": 1001}, "max_queue")])
