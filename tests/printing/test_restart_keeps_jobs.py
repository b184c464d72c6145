"""Nothing a user sends is lost over a restart: every kind of
print file real clients send (real_inputs), queued behind a long print,
comes back after RESTART, FIRMWARE_RESTART and kill -9 + start exactly as
Cura was shown it before -- every field of its job, its preview bytes,
its place in the queue -- and a job held for its material stays held.
The saved material, synced profiles, pairing and a print Klipper started
from a sub-folder come back too.  Nothing is dropped or kept aside."""
import json
import os

import gcode_samples as gs
import httpc
import real_inputs
from httpc import JOBS, all_jobs, upload


def served(base, uuids):
    """What Cura is served of each job: its JSON and its preview bytes."""
    out = {}
    for uuid in uuids:
        job = httpc.get_json(base, "%s/%s" % (JOBS, uuid))
        r = httpc.request(base, "GET", "%s/%s/preview_image" % (JOBS, uuid))
        assert r.status in (200, 404), r
        out[uuid] = (job, r.body if r.status == 200 else None)
    return out


def queue_order(base):
    return [j["uuid"] for j in httpc.get_json(base, JOBS)
            if j["status"] == "queued"]


def held(k):
    job = k.query("cura_connection")["cura_connection"]["held_job"]
    return job and job["uuid"]


def test_restart_keeps_every_kind_of_job(klippy_factory):
    k = klippy_factory()
    base = k.base_url()
    samples = real_inputs.samples()
    # a print Klipper started itself, from a sub-folder, named with
    # spaces, its thumbnails extracted by Moonraker: it ends in the history
    folder = os.path.join(k.gcodes_dir, "my prints")
    os.makedirs(os.path.join(folder, ".thumbs"))
    with open(os.path.join(folder, "Part 1.gcode"), "w") as f:
        f.write(gs.prusaslicer_gcode([], gs.moves(100, 10, 0.2)))  # ~2 s
    moonraker_thumb = gs.qt_image(300, 300, (10, 20, 30), "PNG")
    for size, data in ((32, gs.qt_image(32, 32, (1, 2, 3), "PNG")),
                       (300, moonraker_thumb)):
        with open(os.path.join(folder, ".thumbs",
                               "Part 1-%dx%d.png" % (size, size)), "wb") as f:
            f.write(data)
    k.gcode('SDCARD_PRINT_FILE FILENAME="my prints/Part 1.gcode"')
    external = httpc.wait_for(lambda: [
        j for j in all_jobs(base) if j["source"] == "klipper"
        and j["status"] == "wait_cleanup" and j["has_preview"]],
        what="the external print done")[0]["uuid"]
    k.gcode("CURA_BUILD_PLATE_CLEARED")

    # Cura's material sync, the loaded material, a paired Cura 5
    for guid in (gs.GENERIC_PLA, gs.GENERIC_PETG):
        name, data = real_inputs.profile(guid)
        body, headers = httpc.multipart({}, {"file": (name, data)})
        r = httpc.request(base, "POST", "/cluster-api/v1/materials/", body,
                          headers)
        assert r.status == 200, r
    k.gcode("SET_CURA_MATERIAL GUID=%s" % (gs.GENERIC_PLA,))
    r = httpc.request(base, "POST", "/api/v1/auth/request", json_body={
        "application": "UltiMaker Cura 5.11.0", "user": "bob"})
    assert r.status == 200, r
    key_id = r.json()["id"]

    # the long print, then every kind of file behind it, the PETG UFP
    # first: the queue head, held for its material once the print is gone
    long_print = gs.moves(3000, 10, 0.1).encode()
    assert upload(base, "long.gcode", long_print).status == 200
    httpc.wait_for(lambda: k.query("print_stats")["print_stats"]["state"]
                   == "printing", what="long printing")
    order = ["ufp_petg"] + [key for key in real_inputs.KEYS
                            if key != "ufp_petg"]
    queued = []
    for key in order:
        sample = samples[key]
        r = upload(base, sample.filename, sample.data, owner="Ünï " + key)
        assert r.status == 200, (key, r)
        queued.append(r.json()["uuid"])
    assert queue_order(base) == queued
    before = served(base, queued + [external])
    # the real inputs gave what their slicers put in them
    for key, uuid in zip(order, queued):
        job, preview = before[uuid]
        assert preview == samples[key].preview, key
        assert job["has_preview"] == (preview is not None), key
        assert job["time_total"] == samples[key].time_estimate, key
        if samples[key].guids:
            # (the test printer has one extruder: Cura is shown that one;
            # a file that names none is shown the loaded material)
            assert job["configuration"][0]["material"]["guid"] \
                == samples[key].guids[0], key
    assert before[external][1] == moonraker_thumb
    # the loaded PLA differs from the PETG the head wants: a change Cura
    # is shown, and the job waits (once the print is gone) instead
    assert before[queued[0]][0]["configuration_changes_required"]
    unchanged = {
        "materials": httpc.get_json(base, "/cluster-api/v1/materials"),
        "printer": httpc.get_json(base, "/cluster-api/v1/printers")[0][
            "configuration"],
        "pairing": httpc.get_json(base, "/api/v1/auth/check/" + key_id)}

    def check(what):
        base = k.base_url()
        assert queue_order(base) == queued, what
        after = served(base, queued + [external])
        for uuid in queued + [external]:
            assert after[uuid] == before[uuid], (what, uuid)
        assert held(k) == queued[0], what
        assert {"materials": httpc.get_json(base, "/cluster-api/v1/materials"),
                "printer": httpc.get_json(base, "/cluster-api/v1/printers")[
                    0]["configuration"],
                "pairing": httpc.get_json(
                    base, "/api/v1/auth/check/" + key_id)} == unchanged, what
        assert not [f for f in os.listdir(k.data_dir)
                    if f.endswith(".bad")], what
        log = k.log_text()
        assert "dropping" not in log and "cannot read" not in log, what
        assert k.query("print_stats")["print_stats"]["state"] == "standby"

    k.restart()
    # the long print was interrupted: the one job a restart changes
    long_job = [j for j in httpc.get_json(k.base_url(), JOBS)
                if j["name"] == "long"][0]
    assert long_job["status"] == "failed_wait_cleanup"
    check("RESTART")
    k.restart(firmware=True)
    check("FIRMWARE_RESTART")
    # kill -9: only what is on disk counts (the interrupted print was
    # saved by the writer thread after the first restart)
    saved = os.path.join(k.data_dir, "queue.json")
    httpc.wait_for(lambda: '"printing"' not in open(saved).read(),
                   what="the interrupted print saved")
    with open(saved) as f:
        assert [j["uuid"] for j in json.load(f)["queue"]] == queued
    k.kill9()
    k.start()
    k.wait_ready()
    check("kill -9")


def test_restart_keeps_klipper_prints_of_any_file_name(klippy_factory):
    # Klipper prints any file its folder lists: names copied from the web
    # or a phone carry no-break spaces, emoji joined by ZWJ, even tabs
    k = klippy_factory()
    base = k.base_url()
    uuids = []
    for name in ("Part\u00a01.gcode", "\U0001F469\u200d\U0001F4BB case.gcode",
                 "a\tb.gcode", "line\u2028sep.gcode"):
        with open(os.path.join(k.gcodes_dir, name), "w") as f:
            f.write(gs.moves(100, 10, 0.2))     # ~2 s: the module sees it
        k.gcode('SDCARD_PRINT_FILE FILENAME="%s"' % (name,))
        uuids.append(httpc.wait_for(lambda: [
            j for j in all_jobs(base) if j["source"] == "klipper"
            and j["status"] == "wait_cleanup" and j["uuid"] not in uuids],
            what="the print of %r done" % (name,))[0]["uuid"])
        k.gcode("CURA_BUILD_PLATE_CLEARED")
    before = served(base, uuids)
    k.restart()
    assert served(k.base_url(), uuids) == before
    assert "dropping" not in k.log_text()
    assert not [f for f in os.listdir(k.data_dir) if f.endswith(".bad")]
