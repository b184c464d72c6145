"""Actions racing the print in the real Klippy: an action is
decided on Klipper's state at the moment it is carried out (inside the
G-code mutex), a 409 means nothing changed and says why, and no raced
action leaves pause_resume paused.  The races are made deterministic with
TEST_SLEEP (tests/support/klippy_test_extras): an action sent while the
file's last command (or a console macro) holds the G-code queue is carried
out only once that command is over."""
import threading
import time

import gcode_samples
import httpc
from httpc import jobs, upload
from job_actions import action, hold_gcode_queue, job, wait_job

LAST = "TEST_SLEEP S=1.5\n"


def ending(lines=8):
    """A short print: a few commands that pause and resume can act on, and
    a last command that holds the G-code queue while an action waits."""
    return ("TEST_SLEEP S=0.2\n" * lines + LAST).encode()


def klipper(k):
    return k.query("print_stats", "virtual_sdcard", "pause_resume")


def in_last_command(k, data):
    """Wait until the file runs its last command (LAST)."""
    last = len(data) - len(LAST)
    httpc.wait_for(lambda: klipper(k)["virtual_sdcard"]["file_position"]
                   == last, 20., "the last command")


def pause_and_resume_work(base, k, name):
    j = wait_job(base, name, lambda j: j["status"] not in (
        "queued", "pre_print"))
    assert j["status"] == "printing", j
    st = klipper(k)
    assert st["pause_resume"]["is_paused"] is False
    assert st["print_stats"]["state"] == "printing"
    r = action(base, j["uuid"], "pause")
    assert (r.status, r.json()["status"]) == (200, "paused"), r
    assert klipper(k)["print_stats"]["state"] == "paused"
    r = action(base, j["uuid"], "print")
    assert (r.status, r.json()["status"]) == (200, "printing"), r
    return j


def test_pause_as_the_print_ends_never_sticks(klippy):
    # 20 times: Cura's pause arrives while the file's
    # last command runs and is carried out as the print completes.
    base = klippy.base_url()
    data = ending()
    assert upload(base, "end_0.gcode", data).status == 200
    for i in range(20):
        name = "end_%d" % (i,)
        j = pause_and_resume_work(base, klippy, name)
        in_last_command(klippy, data)
        r = action(base, j["uuid"], "pause")
        if r.status == 409:
            msg = r.json()["message"]
            assert "ended" in msg and "wait_cleanup" in msg, msg
        else:
            # a Klipper that paused at the file's end: resume finishes it
            assert (r.status, r.json()["status"]) == (200, "paused"), r
            r = action(base, j["uuid"], "print")
            assert r.status == 200, r
        ended = wait_job(base, name, lambda j: j["status"] != "printing")
        assert ended["status"] == "wait_cleanup", ended
        assert ended["time_total"] == ended["time_elapsed"]
        st = klipper(klippy)
        assert st["print_stats"]["state"] == "complete"
        assert st["pause_resume"]["is_paused"] is False, i
        # the next job prints, shown printing (checked at the loop's top)
        assert upload(base, "end_%d.gcode" % (i + 1,), data).status == 200
        klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    pause_and_resume_work(base, klippy, "end_20")
    log = klippy.log_text()
    assert "Print already paused" not in log
    assert "clearing a pause of no print" not in log


def test_abort_as_the_print_ends_is_refused(klippy):
    # The print completed first: it is not shown aborted, and the user's
    # CANCEL_PRINT did not run on the idle printer
    base = klippy.base_url()
    data = ending(2)
    for i in range(3):
        name = "done_%d" % (i,)
        assert upload(base, name + ".gcode", data).status == 200
        j = wait_job(base, name, lambda j: j["status"] == "printing")
        in_last_command(klippy, data)
        r = action(base, j["uuid"], "abort")
        assert r.status == 409, r
        assert "ended" in r.json()["message"]
        assert job(base, name)["status"] == "wait_cleanup"
        assert klipper(klippy)["print_stats"]["state"] == "complete"
        klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    history = httpc.get_json(base, httpc.HISTORY)
    assert [(h["name"], h["status"]) for h in history] == [
        ("done_2", "finished"), ("done_1", "finished"),
        ("done_0", "finished")]


def long_print(base, name="long"):
    assert upload(base, name + ".gcode", gcode_samples.moves(
        3000, 10, 0.1).encode()).status == 200
    return wait_job(base, name, lambda j: j["status"] == "printing")


def test_console_command_first_then_cura(klippy):
    # What the console typed before Cura's action is what Klipper does;
    # Cura's action, decided after it, is refused and does nothing more.
    base = klippy.base_url()
    j = long_print(base)
    hold_gcode_queue(klippy, 1.5)
    klippy.api.send("gcode/script", {"script": "PAUSE"})
    time.sleep(0.2)
    r = action(base, j["uuid"], "pause")
    assert r.status == 409 and "it is paused" in r.json()["message"], r
    hold_gcode_queue(klippy, 1.5)
    klippy.api.send("gcode/script", {"script": "RESUME"})
    time.sleep(0.2)
    r = action(base, j["uuid"], "print")
    assert r.status == 409 and "it is printing" in r.json()["message"], r
    st = klipper(klippy)
    assert st["print_stats"]["state"] == "printing"
    assert st["pause_resume"]["is_paused"] is False
    assert wait_job(base, "long", lambda j: j["status"] == "printing")
    assert "resume aborted" not in klippy.log_text()
    assert "Print already paused" not in klippy.log_text()


def test_abort_after_the_console_started_another_file(klippy):
    # The paused job was replaced from the console: Cura's abort must
    # not cancel the console's print
    base = klippy.base_url()
    j = long_print(base)
    r = action(base, j["uuid"], "pause")
    assert r.status == 200, r
    other = klippy.write_gcode("other.gcode", moves=600)
    hold_gcode_queue(klippy, 1.5)
    klippy.api.send("gcode/script",
                    {"script": "SDCARD_PRINT_FILE FILENAME=" + other})
    time.sleep(0.2)
    r = action(base, j["uuid"], "abort")
    assert r.status == 409, r
    assert "not on the printer" in r.json()["message"]
    # the console's print goes on (upstream Klipper starts it from its
    # file reader: "printing" may take a moment); it is never cancelled
    seen = []
    def printing_other():
        ps = klipper(klippy)["print_stats"]
        seen.append(ps["state"])
        return (ps["state"], ps["filename"]) == ("printing", other)
    httpc.wait_for(printing_other, 5., "the console's print")
    assert not {"cancelled", "error", "complete"} & set(seen), seen
    js = jobs(base)
    # (Klipper's pause_resume stays paused over a file started from the
    # console: Klipper's own state, shown as it is)
    assert js[0]["owner"] == "Klipper" and js[0]["name"] == "other"
    history = httpc.get_json(base, httpc.HISTORY)
    assert [(h["name"], h["status"]) for h in history] == [
        ("long", "aborted")]


def test_console_pause_as_the_print_ends_does_not_stick(klippy):
    # Klipper's own PAUSE typed as the print completes pauses the idle
    # printer; the next job must not inherit it
    base = klippy.base_url()
    data = ending(2)
    assert upload(base, "a.gcode", data).status == 200
    wait_job(base, "a", lambda j: j["status"] == "printing")
    in_last_command(klippy, data)
    klippy.gcode("PAUSE")     # waits for the last command: then idle
    assert klipper(klippy)["print_stats"]["state"] == "complete"
    assert klipper(klippy)["pause_resume"]["is_paused"] is True
    assert upload(base, "b.gcode", ending()).status == 200
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    pause_and_resume_work(base, klippy, "b")
    assert "clearing a pause of no print" in klippy.log_text()


def test_abort_behind_an_emergency_stop(klippy):
    # M112 (Mainsail's emergency stop) while Cura's abort waits for the
    # G-code queue: refused with the reason, no CANCEL_PRINT on a
    # shut-down Klipper, and the job shows the progress it reached
    base = klippy.base_url()
    j = long_print(base)
    time.sleep(1.)
    hold_gcode_queue(klippy, 1.5)
    replies = []
    t = threading.Thread(target=lambda: replies.append(
        action(base, j["uuid"], "abort")))
    t.start()
    time.sleep(0.3)
    klippy.api.send("emergency_stop", {})
    t.join(30.)
    r = replies[0]
    assert r.status == 409 and "Klipper is shutdown" in r.json()["message"]
    ended = job(base, "long")
    assert ended["status"] == "failed_wait_cleanup"
    assert 0 < ended["time_elapsed"] < ended["time_total"]
    assert "CANCEL_PRINT" not in klippy.log_text()
