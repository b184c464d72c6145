"""The job lifecycle in the real Klippy: every action takes effect or says
why not, starts come from Klipper's answer, and what Cura shows is what
happened: an abort during a start or right after the plate is cleared
never prints, a pause the file made is resumed and aborted, replies carry
the real status, a finished print is not shown aborted, a refused start
goes back to the queue, an action behind a busy G-code queue is refused,
and damaged state files do not stop Klippy."""
import json
import os
import time

import pytest

import cura_client
import gcode_samples
import httpc
import real_inputs
from httpc import jobs, upload
from job_actions import action, by_name, hold_gcode_queue, job, wait_job

# real slicers' files (real_inputs), thumbnails and all
LONG = real_inputs.make("orcaslicer", gcode_samples.moves(
    3000, 10, 0.1)).data                                   # ~30 s
SHORT = real_inputs.make("prusaslicer", gcode_samples.moves(
    20, 10, 0.1)).data                                     # ~0.2 s


def print_stats(k):
    return k.query("print_stats")["print_stats"]


def with_m25(pauses=1):
    # what Cura's "Pause at height" (BQ method) and other slicers write
    part = gcode_samples.moves(30, 10, 0.1)
    return (part + "M25\n") * pauses + part


def done_and_queued(base):
    """A finished job on the plate and a long job x queued: x's uuid."""
    assert upload(base, "done.gcode", SHORT).status == 200
    wait_job(base, "done", lambda j: j["status"] == "wait_cleanup")
    assert upload(base, "x.gcode", LONG).status == 200
    return job(base, "x")["uuid"]


def test_abort_during_start_cancels_the_start(klippy):
    base = klippy.base_url()
    uuid = done_and_queued(base)
    # the start waits behind a macro: the job stays pre_print
    hold_gcode_queue(klippy, 3)
    r = httpc.request(base, "POST", "/cluster-api/v1/printers/%s/action/"
                      "plate_cleared" % (httpc.printer(base)["uuid"],),
                      json_body={})
    assert r.status == 200, r
    assert job(base, "x")["status"] == "pre_print"
    r = action(base, uuid, "abort")
    assert r.status == 200 and r.json()["status"] == "aborted_wait_cleanup"
    time.sleep(4.)        # the macro is over: the start's turn came
    ps = print_stats(klippy)
    assert ps["filename"] != "x.gcode" or ps["state"] not in (
        "printing", "paused")
    js = jobs(base)
    assert [j["name"] for j in js] == ["x"]
    assert [j["name"] for j in httpc.get_json(base, httpc.HISTORY)] \
        == ["done"]
    assert by_name(js)["x"]["status"] == "aborted_wait_cleanup"
    assert not [j for j in js if j["owner"] == "Klipper"]


def test_abort_right_after_plate_cleared_never_prints(klippy):
    # plate cleared from the console, abort as soon as the job leaves the
    # queue
    base = klippy.base_url()
    uuid = done_and_queued(base)
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    wait_job(base, "x", lambda j: j["status"] != "queued")
    r = action(base, uuid, "abort")
    assert r.status == 200 and r.json()["status"] == "aborted_wait_cleanup"
    time.sleep(3.)
    assert print_stats(klippy)["state"] not in ("printing", "paused")
    assert job(base, "x")["status"] == "aborted_wait_cleanup"
    assert not [j for j in jobs(base) if j["owner"] == "Klipper"]


def test_resume_and_abort_after_a_pause_the_file_made(klippy):
    base = klippy.base_url()
    assert upload(base, "m25.gcode", with_m25(2).encode()).status == 200
    j = wait_job(base, "m25", lambda j: j["status"] == "paused")
    st = klippy.query("print_stats", "pause_resume")
    assert st["pause_resume"]["is_paused"] is False
    assert st["print_stats"]["state"] == "paused"
    r = action(base, j["uuid"], "print")
    assert r.status == 200 and r.json()["status"] == "printing", r
    assert print_stats(klippy)["state"] == "printing"
    # the second M25
    wait_job(base, "m25", lambda j: j["status"] == "paused")
    r = action(base, j["uuid"], "abort")
    assert r.status == 200, r
    assert r.json()["status"] == "aborted_wait_cleanup"
    assert print_stats(klippy)["state"] not in ("printing", "paused")
    assert klippy.query("virtual_sdcard")["virtual_sdcard"][
        "is_active"] is False
    assert "resume aborted" not in klippy.log_text()


def test_pause_resume_abort_replies_carry_the_real_status(klippy):
    base = klippy.base_url()
    assert upload(base, "long.gcode", LONG).status == 200
    j = wait_job(base, "long", lambda j: j["status"] == "printing")
    time.sleep(1.)
    r = action(base, j["uuid"], "pause")
    assert r.status == 200 and r.json()["status"] == "paused", r
    assert print_stats(klippy)["state"] == "paused"
    paused = job(base, "long")["time_elapsed"]
    r = action(base, j["uuid"], "pause")
    assert r.status == 409 and "paused" in r.json()["message"]
    r = action(base, j["uuid"], "print")
    assert r.status == 200 and r.json()["status"] == "printing", r
    r = action(base, j["uuid"], "print")
    assert r.status == 409
    r = action(base, j["uuid"], "pause")
    assert r.status == 200 and r.json()["status"] == "paused", r
    paused = job(base, "long")["time_elapsed"]
    ps = print_stats(klippy)
    time.sleep(2.5)       # a pause does not count (Klipper's print_duration)
    r = action(base, j["uuid"], "abort")
    assert r.status == 200 and r.json()["status"] == "aborted_wait_cleanup"
    ended = job(base, "long")
    assert ended["time_elapsed"] == paused == int(ps["print_duration"])
    r = action(base, j["uuid"], "abort")
    assert r.status == 409


def test_finished_print_is_not_shown_aborted(cura, klippy):
    base = klippy.base_url()
    # the slicer's estimate is far above the real time
    assert upload(base, "quick.gcode", b";TIME:1000\n" + SHORT).status \
        == 200
    j = wait_job(base, "quick", lambda j: j["status"] == "wait_cleanup")
    assert j["time_total"] == j["time_elapsed"]
    api = cura_client.ClusterApi("127.0.0.1:%d" % (klippy.cura_port(),))
    card = cura_client.MonitorView().poll(api)["printers"][0]["active_job"]
    # Cura 4.13 draws wait_cleanup with time_total > time_elapsed as
    # "Aborted"
    assert card["state"] == "wait_cleanup"
    assert card["time_total"] == card["time_elapsed"]


def test_refused_start_goes_back_to_the_queue(klippy):
    base = klippy.base_url()
    done_and_queued(base)
    console = klippy.write_gcode("console.gcode", moves=100)
    # the console starts a print in the same moment as the queue
    hold_gcode_queue(klippy, 2)
    klippy.api.send("gcode/script",
                    {"script": "SDCARD_PRINT_FILE FILENAME=" + console})
    time.sleep(0.3)
    r = httpc.request(base, "POST", "/cluster-api/v1/printers/%s/action/"
                      "plate_cleared" % (httpc.printer(base)["uuid"],))
    assert r.status == 200, r
    js = httpc.wait_for(lambda: (lambda js: js if js[0]["owner"] == "Klipper"
                                 else None)(jobs(base)), 10, "console job")
    assert js[0]["name"] == "console"
    x = by_name(js)["x"]
    assert x["status"] == "queued" and not x["started"], x
    assert x["message"].startswith("Waiting")
    assert print_stats(klippy)["filename"] == "console.gcode"


def test_action_behind_a_busy_gcode_queue_is_refused(klippy):
    # nothing is done when Klipper cannot do it in time: 409, not 200
    base = klippy.base_url()
    assert upload(base, "long.gcode", LONG).status == 200
    j = wait_job(base, "long", lambda j: j["status"] == "printing")
    hold_gcode_queue(klippy, 13)
    r = action(base, j["uuid"], "pause")
    assert r.status == 409 and "busy" in r.json()["message"]
    time.sleep(3.)
    assert print_stats(klippy)["state"] == "printing"
    assert job(base, "long")["status"] == "printing"


def write_data(k, name, data):
    d = k.data_dir
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return os.path.join(d, name)


def test_queue_json_that_is_a_number_does_not_stop_klippy(klippy_factory):
    k = klippy_factory(start=False)
    path = write_data(k, "queue.json", {"queue": 5})
    k.start()
    assert k.wait_ready()["state"] == "ready"
    assert jobs(k.base_url()) == []
    assert json.load(open(path + ".bad")) == {"queue": 5}
    assert "dropping queue: not a list" in k.log_text()
    # the queue works
    assert upload(k.base_url(), "a.gcode", SHORT).status == 200
    wait_job(k.base_url(), "a", lambda j: j["status"] == "wait_cleanup")


def test_auth_entry_without_allowed_then_allow_another(klippy_factory):
    k = klippy_factory(start=False,
                       module_options={"require_pairing": "True"})
    path = write_data(k, "auth.json", {"version": 1, "clients": {
        "aaaa1111": {"key": "k" * 32, "application": "Cura"},
        "bbbb2222": {"key": "b" * 32, "allowed": False,
                     "application": "Cura", "user": "bob"}}})
    k.start()
    k.wait_ready()
    k.gcode("CURA_ALLOW ID=bbbb2222")
    assert k.info()["state"] == "ready"
    r = httpc.request(k.base_url(), "GET", "/api/v1/auth/check/bbbb2222")
    assert r.status == 200 and r.json()["message"] == "authorized"
    r = httpc.request(k.base_url(), "GET", "/api/v1/auth/check/aaaa1111")
    assert r.status == 200 and r.json()["message"] == "unknown"
    assert os.path.exists(path + ".bad")
    log = k.log_text()
    assert "Internal error" not in log and "Traceback" not in log
