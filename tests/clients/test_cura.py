"""Cura 4.13's own UM3NetworkPrinting code against the module in the real
Klippy: every reply must parse into Cura's models and show on its Monitor
tab; uploads, actions and the material sync go through Cura's code."""
import time

import cura_client
import httpc
import gcode_samples
from hostile import children, cura_connections, wait_for


def address(k):
    return "127.0.0.1:%d" % (k.cura_port(),)


def wait_view(api, view, pred, timeout=20., what="Cura's view"):
    deadline = time.monotonic() + timeout
    while True:
        state = view.poll(api)
        if pred(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s; last: %r"
                                 % (what, state))
        time.sleep(0.2)


def active(state):
    return state["printers"][0]["active_job"]


def test_cura_parses_every_reply(cura, klippy_factory):
    k = klippy_factory(extruders=2, module_options={"name": "klipper-test"})
    api = cura_client.ClusterApi(address(k))
    system = api.system()
    assert system.name == "klipper-test" and system.hardware["typeid"] \
        == 213482
    printers = api.printers()
    jobs = api.print_jobs()
    assert api.materials() == []
    view = cura_client.monitor_view(printers, jobs)
    card = view["printers"][0]
    assert card["name"] == "klipper-test"
    assert card["type"] == "Ultimaker S3"
    assert card["state"] == "idle"
    assert card["camera_url"] == "http://127.0.0.1:8080/?action=stream"
    assert [e["hotend_id"] for e in card["extruders"]] == ["AA 0.4"] * 2
    assert card["active_job"] is None and view["queue"] == []
    assert not view["not_cluster_host"]


def test_print_from_klipper_shows_on_card(cura, klippy):
    fname = klippy.write_gcode("console_print.gcode", moves=600,
                               sleep_every=10, sleep_s=0.1,
                               header=";TIME:120\n")
    klippy.gcode("SDCARD_PRINT_FILE FILENAME=%s" % (fname,))
    api = cura_client.ClusterApi(address(klippy))
    view = cura_client.MonitorView()
    state = wait_view(api, view, lambda s: active(s) and active(s)[
        "progress"] and active(s)["progress"] > 0, what="progress")
    job = active(state)
    assert job["name"] == "console_print"
    assert job["state"] == "printing" and job["owner"] == "Klipper"
    assert 0 < job["progress"] < 100
    assert state["printers"][0]["state"] == "printing"


def test_material_sync_sends_each_material_once(cura, klippy):
    addr = address(klippy)
    sent = cura_client.sync_materials(addr, timeout=120)
    assert len(sent) > 200        # Debian's fdm-materials: 230 files
    assert all(r[0] == 200 and b"not added" not in r[1]
               for r in sent.replies.values())
    stored = cura_client.ClusterApi(addr).materials()
    assert len(stored) == len(set(m.guid for m in stored))
    assert all(m.version >= 1 for m in stored)
    # Cura's second connection has nothing left to send
    assert list(cura_client.sync_materials(addr)) == []
    # ... and neither after a restart (the files persist)
    klippy.restart()
    assert list(cura_client.sync_materials(address(klippy))) == []


def test_print_over_network(cura, klippy, tmp_path):
    addr = address(klippy)
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    first = tmp_path / "benchy.ufp"
    cura_client.make_ufp(str(first), gcode_samples.cura_gcode(
        print_time=1800, count=800, sleep_every=10, sleep_s=0.1),
        thumbnail_png=gcode_samples.png(32, 24))
    status, body = cura_client.upload(addr, str(first), owner="alice")
    assert status == 200, body
    # Klippy prints the file Cura sent
    klippy.wait_print_state("printing")
    ps = klippy.query("print_stats")["print_stats"]
    assert ps["filename"] == "benchy.gcode"
    state = wait_view(api, view, lambda s: active(s) is not None,
                      what="active job")
    job = active(state)
    assert (job["name"], job["owner"], job["state"]) == \
        ("benchy", "alice", "printing")
    assert job["time_total"] >= 1800 - 1
    # a second job waits in Cura's queue
    second = tmp_path / "phone stand.ufp"
    cura_client.make_ufp(str(second), gcode_samples.cura_gcode(
        print_time=600, count=100, sleep_every=10, sleep_s=0.1))
    assert cura_client.upload(addr, str(second), owner="bob")[0] == 200
    state = wait_view(api, view, lambda s: s["queue"], what="queue")
    assert [(q["name"], q["owner"], q["state"]) for q in state["queue"]] \
        == [("phone stand", "bob", "queued")]
    # the preview Cura shows is the UFP thumbnail
    jobs = {j.name: j for j in api.print_jobs()}
    image = api.preview_image(jobs["benchy"].uuid)
    assert image is not None and not image.isNull()
    assert (image.width(), image.height()) == (32, 24)
    assert api.preview_image(jobs["phone stand"].uuid) is None
    # files where Mainsail and Moonraker look; no .ufp left behind
    import os
    names = sorted(os.listdir(klippy.gcodes_dir))
    assert "benchy.gcode" in names and "phone_stand.gcode" in names
    assert not [n for n in names if n.endswith((".ufp", ".part"))]
    assert os.path.exists(os.path.join(klippy.gcodes_dir, ".thumbs",
                                       "benchy.png"))


def test_every_action_through_cura(cura, klippy, tmp_path):
    addr = address(klippy)
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    names = ["one", "two", "three"]
    for name in names:
        path = tmp_path / (name + ".ufp")
        cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
            print_time=900, count=3000, sleep_every=10, sleep_s=0.1))
        assert cura_client.upload(addr, str(path))[0] == 200
    wait_view(api, view, lambda s: active(s) and active(s)["state"]
              == "printing" and len(s["queue"]) == 2, what="one printing")
    uuids = {j.name: j.uuid for j in api.print_jobs()}
    # pause, resume
    assert api.pause(uuids["one"]) == 200
    wait_view(api, view, lambda s: active(s)["state"] == "paused",
              what="paused")
    assert klippy.query("print_stats")["print_stats"]["state"] == "paused"
    assert api.resume(uuids["one"]) == 200
    wait_view(api, view, lambda s: active(s)["state"] == "printing",
              what="printing again")
    # move to top, force, delete (queued jobs)
    assert api.move_to_top(uuids["three"]) == 200
    wait_view(api, view, lambda s: [q["name"] for q in s["queue"]]
              == ["three", "two"], what="three first")
    assert api.force(uuids["two"]) == 200
    assert api.delete(uuids["two"]) == 200
    wait_view(api, view, lambda s: [q["name"] for q in s["queue"]]
              == ["three"], what="two deleted")
    # actions in the wrong state are refused, and change nothing
    assert api.pause(uuids["three"]) == 409
    assert api.resume(uuids["one"]) == 409
    # abort
    assert api.abort(uuids["one"]) == 200
    wait_view(api, view, lambda s: active(s)["state"]
              in ("aborted", "aborted_wait_cleanup"), what="aborted")
    assert klippy.query("print_stats")["print_stats"]["state"] \
        == "cancelled"
    # the queue waits for the plate; then "three" starts
    time.sleep(1.)
    assert [q["name"] for q in view.poll(api)["queue"]] == ["three"]
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    wait_view(api, view, lambda s: active(s) and active(s)["name"]
              == "three" and not s["queue"], what="three printing")


def test_slicer_thumbnails_show_in_cura(cura, klippy):
    # Plain G-code with embedded thumbnails, as other slicers and Cura's
    # own Create Thumbnail script write them: Cura's code decodes the
    # preview, and the same image lands in .thumbs/.
    import os
    import httpc
    base = klippy.base_url()
    files = {
        # Cura 5 Create Thumbnail: "begin 300 300 <len>", two sizes
        "cura5": (gcode_samples.cura_marlin_header(2345)
                  + gcode_samples.embedded_thumbnail(
                      gcode_samples.png(32, 32), 32, 32, sep=" ")
                  + gcode_samples.embedded_thumbnail(
                      gcode_samples.png(300, 300), 300, 300, sep=" "),
                  (300, 300), "cura5.png"),
        # PrusaSlicer/OrcaSlicer with JPG thumbnails only
        "prusa_jpg": (";TIME:60\n" + gcode_samples.embedded_thumbnail(
            gcode_samples.jpeg(16, 16), 16, 16, kind="_JPG")
            + gcode_samples.embedded_thumbnail(
                gcode_samples.jpeg(220, 124), 220, 124, kind="_JPG"),
            (220, 124), "prusa_jpg.jpg"),
        # QOI only: nothing Cura could decode, so no preview at all
        "prusa_qoi": (";TIME:60\n" + gcode_samples.embedded_thumbnail(
            gcode_samples.qoi(480, 240), 480, 240, kind="_QOI"),
            None, None),
    }
    api = cura_client.ClusterApi(address(klippy))
    for name, (head, size, thumb) in files.items():
        r = httpc.upload(base, name + ".gcode",
                         (head + "G1 X1\n").encode())
        assert r.status == 200, r
    jobs = {j.name: j for j in api.print_jobs()}
    for name, (head, size, thumb) in files.items():
        image = api.preview_image(jobs[name].uuid)
        if size is None:
            assert image is None      # 404: no preview, nothing to decode
            continue
        assert image is not None and not image.isNull(), name
        assert (image.width(), image.height()) == size
    thumbs = sorted(os.listdir(os.path.join(klippy.gcodes_dir, ".thumbs")))
    assert thumbs == ["cura5.png", "prusa_jpg.jpg"]


def test_card_idle_after_plate_cleared(cura, klippy, tmp_path):
    # Cura un-assigns a job only when it leaves /print_jobs: a job in the
    # history must not be listed, or Cura shows it on the card for good
    addr = address(klippy)
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    path = tmp_path / "cube.ufp"
    cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
        print_time=60, count=20))
    assert cura_client.upload(addr, str(path))[0] == 200
    wait_view(api, view, lambda s: active(s) and active(s)["state"]
              == "wait_cleanup", what="cube waits for the plate")
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    state = wait_view(api, view, lambda s: active(s) is None,
                      what="no job on the card")
    card = state["printers"][0]
    assert card["state"] == "idle", card
    assert state["jobs"] == [] and state["queue"] == []
    # the history keeps the job, apart from Cura's list
    done = [j["name"] for j in httpc.get_json(
        "http://" + addr, "/cluster-api/v1/print_jobs/history")]
    assert done == ["cube"]


MATERIALS = (cura_client.DEFAULT_CURA_ROOT
             / "usr/share/cura/resources/materials")


def sync_profile(base, name):
    # One profile as Cura's material sync posts it
    body, headers = httpc.multipart({}, {"file": (
        name + ".xml.fdm_material",
        (MATERIALS / (name + ".xml.fdm_material")).read_bytes())})
    r = httpc.request(base, "POST", "/cluster-api/v1/materials/", body,
                      headers)
    assert r.status == 200, r


def send_sliced_for(addr, tmp_path, name, material, profiles=()):
    # Cura sends a short UFP sliced for that material (GUID), its
    # profiles packed with it
    path = tmp_path / (name + ".ufp")
    cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
        print_time=60, count=20, material=material), materials=profiles)
    assert cura_client.upload(addr, str(path))[0] == 200


def linked(base):
    """Names of the jobs in /print_jobs that point at the printer."""
    return [j["name"] for j in httpc.get_json(base, "/cluster-api/v1/"
                                              "print_jobs")
            if j.get("printer_uuid") or j.get("assigned_to")]


def wait_started(klippy, filename, timeout=20.):
    # Klipper prints (or has printed) this file
    deadline = time.monotonic() + timeout
    while True:
        ps = klippy.query("print_stats")["print_stats"]
        if ps["filename"] == filename and ps["state"] in ("printing",
                                                          "complete"):
            return
        assert time.monotonic() < deadline, ps
        time.sleep(0.1)


def clear_after(api, view, klippy, name):
    # the job has ended on Cura's card: then the plate is cleared
    wait_view(api, view, lambda s: active(s) and active(s)["name"] == name
              and active(s)["state"] == "wait_cleanup", what=name + " done")
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")


def test_job_for_another_material_waits_for_override_or_load(
        cura, klippy, tmp_path):
    addr, base = address(klippy), klippy.base_url()
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    sync_profile(base, "generic_pla")
    klippy.gcode("SET_CURA_MATERIAL GUID=%s" % (gcode_samples.GENERIC_PLA,))
    # a UFP sliced for Generic PETG, its profile packed with it (the
    # printer has not got that one)
    send_sliced_for(addr, tmp_path, "petg_box", gcode_samples.GENERIC_PETG,
                    [MATERIALS / "generic_petg.xml.fdm_material"])
    state = wait_view(api, view, lambda s: active(s) and active(s)[
        "configuration_changes"], what="the held job on the card")
    job = active(state)
    assert (job["name"], job["state"]) == ("petg_box", "queued")
    # Cura's override dialog: "Change material 1 from PLA to PETG", and
    # its Override button (shown when every change can be overridden)
    assert job["configuration_changes"] == [{
        "type": "material_change", "index": 0, "origin_name": "PLA",
        "target_name": "PETG", "can_override": True}]
    assert [q["name"] for q in state["queue"]] == ["petg_box"]
    assert state["printers"][0]["state"] == "idle"
    assert linked(base) == ["petg_box"]
    # the job's configuration is its file's; Cura's models take it
    raw = httpc.get_json(base, "/cluster-api/v1/print_jobs")[0]
    assert raw["configuration"] == [{
        "extruder_index": 0, "print_core_id": "AA 0.4", "material": {
            "guid": gcode_samples.GENERIC_PETG, "brand": "Generic",
            "material": "PETG", "color": "#ff5086", "name": "PETG"}}]
    time.sleep(1.)      # held: Klipper is not asked to print it
    assert klippy.query("print_stats")["print_stats"]["state"] == "standby"
    # macros and the console see it too
    assert klippy.query("cura_connection")["cura_connection"][
        "held_job"]["name"] == "petg_box"
    klippy.api.call("gcode/subscribe_output", {"response_template": {}})
    klippy.gcode("CURA_QUEUE")
    assert "petg_box waits for PETG in extruder 0" in "\n".join(
        str(n.get("params")) for n in klippy.api.notifications)
    # the Override button: Cura's forcePrintJob
    assert api.force(job["key"]) == 200
    wait_started(klippy, "petg_box.gcode")
    state = wait_view(api, view, lambda s: active(s) and active(s)[
        "state"] in ("printing", "wait_cleanup"), what="petg_box printed")
    assert active(state)["configuration_changes"] == []
    clear_after(api, view, klippy, "petg_box")
    # a Griffin G-code for PETG, named from the profile the printer now
    # has; loading PETG releases it
    sync_profile(base, "generic_petg")
    second = tmp_path / "petg_lid.gcode"
    second.write_bytes(gcode_samples.cura_gcode(
        print_time=60, count=20, material=gcode_samples.GENERIC_PETG))
    assert cura_client.upload(addr, str(second))[0] == 200
    state = wait_view(api, view, lambda s: active(s) and active(s)[
        "name"] == "petg_lid" and active(s)["configuration_changes"],
        what="petg_lid held")
    assert active(state)["configuration_changes"] == [{
        "type": "material_change", "index": 0, "origin_name": "PLA",
        "target_name": "PETG", "can_override": True}]
    assert linked(base) == ["petg_lid"]
    klippy.gcode("SET_CURA_MATERIAL GUID=%s" % (gcode_samples.GENERIC_PETG,))
    wait_started(klippy, "petg_lid.gcode")
    state = wait_view(api, view, lambda s: active(s)["state"] in (
        "printing", "wait_cleanup"), what="petg_lid printed")
    assert active(state)["configuration_changes"] == []
    assert not httpc.get_json(base, "/cluster-api/v1/print_jobs/%s" % (
        active(state)["key"],))["force"]


def test_jobs_without_material_facts_never_wait(cura, klippy, tmp_path):
    # nothing known loaded: a job for PETG prints
    addr = address(klippy)
    send_sliced_for(addr, tmp_path, "petg", gcode_samples.GENERIC_PETG)
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    wait_started(klippy, "petg.gcode")
    clear_after(api, view, klippy, "petg")
    # PLA known loaded: files that name no material print all the same
    klippy.gcode("SET_CURA_MATERIAL GUID=%s" % (gcode_samples.GENERIC_PLA,))
    files = {
        "marlin.gcode": (gcode_samples.cura_marlin_header(60)
                         + gcode_samples.moves(20)).encode(),
        "no_guid.gcode": gcode_samples.cura_gcode(
            print_time=60, count=20, material=None)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        assert cura_client.upload(addr, str(tmp_path / name))[0] == 200
        wait_started(klippy, name)
        state = view.poll(api)
        assert all(j["configuration_changes"] == [] for j in state["jobs"])
        clear_after(api, view, klippy, name[:-len(".gcode")])


def test_holding_can_be_turned_off(cura, klippy_factory, tmp_path):
    k = klippy_factory(module_options={"hold_material_mismatch": "False"})
    k.gcode("SET_CURA_MATERIAL GUID=%s" % (gcode_samples.GENERIC_PLA,))
    send_sliced_for(address(k), tmp_path, "petg", gcode_samples.GENERIC_PETG)
    wait_started(k, "petg.gcode")
    assert all(j["configuration_changes_required"] == [] for j in
               httpc.get_json(k.base_url(), "/cluster-api/v1/print_jobs"))


# What a Cura without pairing reads; the front answers every one of them
READS = {"get_system", "get_printers", "get_print_jobs", "get_history",
         "get_print_job", "get_preview_image", "get_materials"}


def test_a_cura_session_stays_in_the_front(cura, klippy, tmp_path):
    # Cura 4.13's own client code (its Qt connection pool reuses any
    # keep-alive connection for any request): system, materials, two UFP
    # uploads with thumbnails, monitor cycles with previews, a pause and a
    # resume.  No read is answered in Klippy's process, and between the
    # requests handed to it Klippy's process holds none of the
    # connections; Cura sees no failed request.
    k = klippy
    addr = address(k)
    front = wait_for(lambda: children(k.pid), 10., "the front process")[0]
    samples = []

    def sample():
        samples.append(cura_connections(k, front))
        assert k.pid not in samples[-1], samples

    mark = cura_client._cura.logs.mark()
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    assert api.system().name
    api.materials()
    sample()
    for name, seconds in (("first", 60), ("second", 600)):
        path = tmp_path / (name + ".ufp")
        cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
            print_time=seconds, count=3000, sleep_every=10, sleep_s=0.1),
            thumbnail_png=gcode_samples.png(32, 24))
        assert cura_client.upload(addr, str(path), owner="alice")[0] == 200
    previews = {}

    def cycle():
        state = view.poll(api)
        for job in api.print_jobs():
            if job.uuid not in previews:
                image = api.preview_image(job.uuid)
                previews[job.uuid] = image.width() if image else None
        sample()
        return state

    def until(pred, what):
        deadline = time.monotonic() + 30.
        while True:
            state = cycle()
            if pred(state):
                return state
            assert time.monotonic() < deadline, (what, state)
            time.sleep(0.5)

    state = until(lambda s: active(s) and active(s)["state"] == "printing",
                  "printing")
    uuid = [j.uuid for j in api.print_jobs() if j.name == "first"][0]
    assert api.pause(uuid) == 200
    sample()
    until(lambda s: active(s)["state"] == "paused", "paused")
    assert api.resume(uuid) == 200
    sample()
    state = until(lambda s: active(s)["state"] == "printing", "printing")
    assert [q["name"] for q in state["queue"]] == ["second"]
    assert sorted(previews.values()) == [32, 32]
    here = k.query("cura_connection")["cura_connection"]["answered_here"]
    assert not READS & set(here), here
    assert here == {"put_action": 2}, here
    # (Cura keeps its connections open between requests: samples find
    # them, every one in the front)
    assert len(samples) > 5 and any(samples), samples
    assert cura_client._cura.logs.since(mark) == []


def sd_progress(k):
    return k.query("virtual_sdcard")["virtual_sdcard"]["progress"]


def ended_progress(api, view, k, reached, state):
    """Cura's card and the history show the progress the print reached
    (Cura draws time_elapsed / time_total), not a full bar."""
    card = active(wait_view(api, view, lambda s: active(s)["state"] in (
        state, state + "_wait_cleanup"), what=state))
    assert reached - 0.01 <= card["progress"] <= reached + 0.03, \
        (reached, card)
    k.gcode("CURA_BUILD_PLATE_CLEARED")
    h = httpc.get_json("http://" + address(k), httpc.HISTORY)[0]
    assert h["status"] == state
    assert (h["time_elapsed"], h["time_total"]) == (card["time_elapsed"],
                                                     card["time_total"])


def test_aborted_and_failed_prints_show_their_progress(cura, klippy,
                                                        tmp_path):
    # an abort at 5 % once showed "Aborted 99 %"
    addr = address(klippy)
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView()
    path = tmp_path / "long.ufp"
    cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
        print_time=100, count=10000, sleep_every=10, sleep_s=0.1))
    assert cura_client.upload(addr, str(path))[0] == 200
    httpc.wait_for(lambda: sd_progress(klippy) >= 0.05, 30., "5 %")
    reached = sd_progress(klippy)
    uuid = {j.name: j.uuid for j in api.print_jobs()}["long"]
    assert api.abort(uuid) == 200
    ended_progress(api, view, klippy, reached, "aborted")
    # a print that fails at about 5 %
    path = tmp_path / "bad.ufp"
    cura_client.make_ufp(str(path), gcode_samples.griffin_header(100) +
                         gcode_samples.moves(500, 10, 0.1) + "M104 S5000\n"
                         + gcode_samples.moves(9500, 0))
    assert cura_client.upload(addr, str(path))[0] == 200
    klippy.wait_print_state("error")
    reached = sd_progress(klippy)
    assert 0.03 < reached < 0.08
    ended_progress(api, view, klippy, reached, "failed")
