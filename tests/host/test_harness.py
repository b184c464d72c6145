"""Checks of the Klippy test harness itself (klippy_harness.py,
cura_test_tools.py), mostly without [cura_connection]."""
import json
import os
import time
import urllib.request

import pytest

import kapi
import klippy_harness


def test_ready_without_module(klippy_factory):
    k = klippy_factory(with_module=False)
    assert k.info()["state"] == "ready"
    objects = k.api.call("objects/list")["objects"]
    assert "cura_test_tools" in objects
    assert "cura_connection" not in objects
    assert k.thread_count() >= 1 and k.fd_count() >= 3
    with pytest.raises(kapi.KlippyError, match="Unable to open file"):
        k.gcode("SDCARD_PRINT_FILE FILENAME=missing.gcode")


def test_slow_print_runs_to_complete(klippy_factory):
    k = klippy_factory(with_module=False)
    name = k.write_gcode("slow.gcode", moves=200, sleep_every=20,
                         sleep_s=0.1)
    t0 = time.monotonic()
    k.gcode("SDCARD_PRINT_FILE FILENAME=%s" % (name,))
    assert k.wait_print_state("printing", "complete")["state"] == "printing"
    st = k.wait_print_state("complete", "error", "cancelled")
    assert st["state"] == "complete" and st["filename"] == name
    assert time.monotonic() - t0 >= 0.9    # 10 cooperative 0.1 s sleeps
    assert k.query("virtual_sdcard")["virtual_sdcard"]["progress"] == 1.


def test_sim_move_delay_slows_moves(klippy_factory):
    k = klippy_factory(with_module=False,
                       tools_options={"sim_move_delay": 0.02})
    t0 = time.monotonic()
    k.gcode("\n".join("G1 X%d F6000" % (i,) for i in range(25)))
    assert time.monotonic() - t0 >= 0.45


@pytest.mark.parametrize("firmware", [False, True],
                         ids=["RESTART", "FIRMWARE_RESTART"])
def test_restart_keeps_process(klippy_factory, firmware):
    k = klippy_factory(with_module=False)
    pid = k.pid
    k.restart(firmware=firmware)
    assert k.pid == pid and k.running
    assert k.info()["state"] == "ready"
    # M112 then FIRMWARE_RESTART: shutdown is a state wait_state can see
    k.gcode("M112")
    assert k.wait_state("shutdown")["state"] == "shutdown"
    k.restart(firmware=True)
    assert k.pid == pid and k.query("print_stats")


def test_lateness_probe(klippy_factory, tmp_path):
    k = klippy_factory(with_module=False)
    k.gcode("TEST_LATENESS_RESET")
    time.sleep(0.5)
    st = k.query("cura_test_tools")["cura_test_tools"]
    assert st["lateness_count"] >= 20
    assert 0. <= st["lateness_avg_ms"] <= st["lateness_max_ms"]
    k.gcode("TEST_BLOCK S=0.1")
    time.sleep(0.05)
    st = k.query("cura_test_tools")["cura_test_tools"]
    assert st["lateness_max_ms"] >= 80.
    dump = str(tmp_path / "lateness.jsonl")
    k.gcode("TEST_LATENESS_DUMP FILE=%s" % (dump,))
    with open(dump) as f:
        samples = [json.loads(line) for line in f]
    assert len(samples) >= st["lateness_count"]
    assert max(s["late_ms"] for s in samples) >= 80.


def test_clean_stop_runs_disconnect(klippy_factory):
    k = klippy_factory(with_module=False)
    assert k.stop(clean=True) == 0
    assert "TEST_EXIT" in k.log_text()


def test_config_error_is_reported(klippy_factory):
    k = klippy_factory(with_module=False, wait=False,
                       extra_cfg="[idle_timeout]\nno_such_option: 1\n")
    with pytest.raises(klippy_harness.KlippyNotReady) as e:
        k.wait_ready()
    assert e.value.info["state"] == "error"
    assert "no_such_option" in str(e.value)


module_missing = pytest.mark.skipif(
    not os.path.exists(klippy_harness.MODULE_SOURCES[0]),
    reason="klippy_extras/cura_connection.py not written yet")


@module_missing
def test_module_loads_and_serves(klippy):
    assert klippy.cura_port() > 0
    # no proxies: tests talk to loopback only
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(klippy.base_url() + "/api/v1/system", timeout=10) as r:
        assert r.status == 200
    klippy.restart()
    with opener.open(klippy.base_url() + "/api/v1/system", timeout=10) as r:
        assert r.status == 200


@module_missing
def test_request_count_is_what_klippys_process_answers(klippy, tmp_path):
    """TEST_REQUESTS_* (the serving benchmark's share of requests answered
    in Klippy's process) count what Klippy's request handler dispatches:
    an action (always handed to Klippy's process) is counted, with its id
    as {id}; a plain poll the front answers is not; with front_process:
    False every request is."""
    import httpc
    dump = str(tmp_path / "requests.json")

    def counted(k, *requests):
        k.gcode("TEST_REQUESTS_RESET")
        for method, path in requests:
            # a new connection each: none was handed over before
            httpc.request(k.base_url(), method, path,
                          json_body={"action": "pause"}
                          if method == "PUT" else None)
        k.gcode("TEST_REQUESTS_DUMP FILE=" + dump)
        with open(dump) as f:
            return json.load(f)
    action = ("PUT", httpc.JOBS + "/0123456789abcdef0123/action")
    poll = ("GET", "/cluster-api/v1/printers")
    assert counted(klippy, action, poll, action) == {
        "PUT /cluster-api/v1/print_jobs/{id}/action": 2}
    inproc = klippy_harness.Klippy(klippy.flavor, str(tmp_path / "inproc"),
                                   module_options={"front_process": False})
    try:
        inproc.start()
        inproc.wait_ready()
        assert counted(inproc, poll, action) == {
            "GET /cluster-api/v1/printers": 1,
            "PUT /cluster-api/v1/print_jobs/{id}/action": 1}
    finally:
        inproc.stop()


def test_thread_checks_that_fired_are_found_in_the_log(tmp_path,
                                                        monkeypatch):
    # A check that fires in a thread which only logs its errors (as the
    # disk worker does) is found in klippy.log: klippy_factory fails the
    # test then
    import logging
    import threading
    from _cura_connection import threads
    monkeypatch.setattr(threads, "_reactor_thread", None)
    threads.mark_reactor_thread()
    log_path = str(tmp_path / "klippy.log")
    handler = logging.FileHandler(log_path)
    logging.getLogger().addHandler(handler)

    @threads.reactor_only
    def tick():
        pass

    @threads.never_reactor
    def save():
        pass

    def worker():
        try:
            tick()
        except Exception:
            logging.exception("cura_connection: state writer")
    try:
        t = threading.Thread(target=worker, name="cura_connection writer")
        t.start()
        t.join()
        try:
            save()
        except Exception:
            logging.exception("cura_connection: publishing replies")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    found = klippy_harness.thread_check_failures(log_path)
    assert len(found) == 2, found
    assert "cura_connection writer" in found[0]
    assert "must not run in the reactor" in found[1]
    assert klippy_harness.thread_check_failures(
        str(tmp_path / "none.log")) == []
