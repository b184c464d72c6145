"""Cura 5.11's own UM3NetworkPrinting code (a real LocalClusterOutputDevice,
its ClusterApiClient and SendMaterialJob, tests/support/cura5_driver.py) against
the module in the real Klippy.  Runs where CURA5_DIR names Cura 5 source
trees (README, Run the tests); skipped with that reason elsewhere."""
import time

import cura_client
import gcode_samples
from hostile import children, cura_connections, wait_for
import real_inputs

# A few of the library's materials: the full library (230 files) is
# synced by the Cura 4.13 leg; here the flow matters
SOME_MATERIALS = ["generic_pla", "generic_petg", "ultimaker_pla_black"]


def address(k):
    return "127.0.0.1:%d" % (k.cura_port(),)


def active(state):
    return state["printers"][0]["active_job"] if state["printers"] else None


def queue_names(state):
    return [j["name"] for j in state["jobs"] if j["state"] == "queued"]


def errors(state):
    """What Cura logged as errors, less the 404 of a job without a preview
    (Cura asks again on every poll)."""
    return state["crashes"] + [line for line in state["log"]
                               if "/preview_image - server replied: Not "
                               "Found" not in line]


def ufp(tmp_path, name, material=gcode_samples.ULTIMAKER_PLA_BLACK,
        **kwargs):
    # as Cura 5 sends it (real_inputs): its snapshot, the material's
    # profile and its slice metadata with the G-code
    path = tmp_path / (name + ".ufp")
    path.write_bytes(real_inputs.ufp_bytes(gcode_samples.cura_gcode(
        material=material, **kwargs), real_inputs.snapshot(), [material],
        cura5=True))
    return path


def connected(cura5, klippy):
    """Cura 5's device for this Klippy, connected, showing the printer."""
    cura5.device(address(klippy), materials=SOME_MATERIALS)
    cura5.connect()
    return cura5.wait(lambda s: s["printers"], what="printer card")


def test_cura5_parses_every_reply(cura, cura5, klippy_factory, tmp_path):
    k = klippy_factory(extruders=2, module_options={"name": "klipper-test"})
    cura5.device(address(k), materials=SOME_MATERIALS)
    system = cura5.get("system")
    assert system["called_back"], system
    assert system["result"]["name"] == "klipper-test"
    assert system["result"]["hardware"]["typeid"] == 213482
    for what in ("printers", "print_jobs", "materials"):
        got = cura5.get(what)
        assert got["reply"]["status"] == 200 and got["called_back"], got
        # from the first request on, Cura signs (pairing off: accepted)
        assert got["reply"]["signed"], got
    assert len(cura5.get("printers")["result"]) == 1
    # the Monitor tab, from the device's own polling
    cura5.connect()
    state = cura5.wait(lambda s: s["printers"], what="printer card")
    card = state["printers"][0]
    assert (card["name"], card["type"], card["state"]) \
        == ("klipper-test", "Ultimaker S3", "idle")
    assert [e["hotend_id"] for e in card["extruders"]] == ["AA 0.4"] * 2
    assert card["camera_url"] == "http://127.0.0.1:8080/?action=stream"
    assert state["connection_state"] == "Connected" and state["registered"]
    assert not state["auth_message_visible"]
    # a job with a preview: Cura fetches it with its own client
    path = tmp_path / "preview.ufp"
    cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
        print_time=60, count=20), thumbnail_png=gcode_samples.png(16, 8))
    assert cura5.upload(path)["reply"]["status"] == 200
    state = cura5.wait(lambda s: s["jobs"], what="job")
    preview = cura5.get("preview", uuid=state["jobs"][0]["key"])
    assert preview["reply"]["status"] == 200
    assert preview["result"]["bytes"] > 0
    assert errors(state) == []


def test_cura5_print_over_network_and_every_action(cura, cura5, klippy,
                                                   tmp_path):
    connected(cura5, klippy)
    for name in ("one", "two", "three"):
        sent = cura5.upload(ufp(tmp_path, name, print_time=900, count=3000,
                                sleep_every=10, sleep_s=0.1))
        assert sent["reply"]["status"] == 200, sent
        assert sent["reply"]["signed"]
        assert not sent["progress_visible"]
    state = cura5.wait(lambda s: active(s) and active(s)["state"]
                       == "printing" and len(queue_names(s)) == 2,
                       what="one printing, two queued")
    assert active(state)["name"] == "one"
    assert "PrintJobUploadSuccessMessage" in [
        m["class"] for m in state["shown"]]
    uuids = {j["name"]: j["key"] for j in state["jobs"]}
    assert cura5.action("pause", uuids["one"])["status"] == 200
    cura5.wait(lambda s: active(s)["state"] == "paused", what="paused")
    assert klippy.query("print_stats")["print_stats"]["state"] == "paused"
    assert cura5.action("resume", uuids["one"])["status"] == 200
    cura5.wait(lambda s: active(s)["state"] == "printing", what="resumed")
    assert cura5.action("move_to_top", uuids["three"])["status"] == 200
    cura5.wait(lambda s: queue_names(s) == ["three", "two"],
               what="three first")
    assert cura5.action("force", uuids["two"])["status"] == 200
    assert cura5.action("delete", uuids["two"])["status"] == 200
    cura5.wait(lambda s: queue_names(s) == ["three"], what="two deleted")
    assert cura5.action("abort", uuids["one"])["status"] == 200
    cura5.wait(lambda s: active(s)["state"] in (
        "aborted", "aborted_wait_cleanup"), what="aborted")
    assert klippy.query("print_stats")["print_stats"]["state"] \
        == "cancelled"
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    state = cura5.wait(lambda s: active(s) and active(s)["name"] == "three",
                       what="three printing")
    assert errors(state) == []


def test_cura5_card_idle_after_plate_cleared(cura, cura5, klippy,
                                            tmp_path):
    # the history is not in Cura's list: Cura 5 clears the card too
    connected(cura5, klippy)
    sent = cura5.upload(ufp(tmp_path, "cube", print_time=60, count=20))
    assert sent["reply"]["status"] == 200, sent
    cura5.wait(lambda s: active(s) and active(s)["state"] == "wait_cleanup",
               what="cube waits for the plate")
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    state = cura5.wait(lambda s: s["printers"] and active(s) is None,
                       what="no job on the card")
    assert state["printers"][0]["state"] == "idle"
    assert state["jobs"] == []
    assert errors(state) == []


def test_cura5_syncs_materials_once(cura, cura5, klippy):
    connected(cura5, klippy)
    cura5.run(1)
    posts = [r for r in cura5.replies()
             if r["path"] == "/cluster-api/v1/materials/"]
    assert len(posts) == len(SOME_MATERIALS)
    assert all(r["status"] == 200 for r in posts), posts
    # (a fresh Cura's first post may leave before its credentials came)
    assert posts[-1]["signed"]
    state = cura5.state()
    assert "MaterialSyncMessage" in [m["class"] for m in state["shown"]]
    stored = cura5.get("materials")["result"]
    assert len(stored) == len(SOME_MATERIALS)
    # Cura's next start finds nothing to send
    connected(cura5, klippy)
    cura5.run(1)
    assert [r for r in cura5.replies()
            if r["path"] == "/cluster-api/v1/materials/"] == []


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waiting_ids(k):
    import json
    import os
    path = os.path.join(k.data_dir, "auth.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        clients = json.load(f)["clients"]
    return sorted(i for i, c in clients.items() if not c["allowed"])


def stored_materials(k):
    import httpc
    return httpc.get_json(k.base_url(), "/cluster-api/v1/materials")


def wait_asking(cura5, k, old_ids=()):
    """Cura shows its own message, and exactly one new request waits."""
    state = cura5.wait(lambda s: s["auth_message_visible"], timeout=40,
                       what="Cura's authorization message")
    msg = [m for m in state["messages"]
           if m["class"] == "AuthorizationRequiredMessage.InnerMessage"]
    assert msg and msg[0]["text"] == "klipper-test", state["messages"]
    assert msg[0]["title"] == "Host requires authentication"
    def new_ids():
        return [i for i in waiting_ids(k) if i not in old_ids]
    cura5.wait(lambda s: new_ids(), what="Cura asking again")
    cura5.run(4)   # Cura asks at every refused read: still one request
    assert len(new_ids()) == 1, waiting_ids(k)
    return new_ids()[0]


def wait_allowed(cura5):
    return cura5.wait(lambda s: not s["auth_message_visible"], timeout=40,
                      what="the message hidden after CURA_ALLOW")


def test_cura5_pairing(cura, cura5, klippy_factory, tmp_path):
    k = klippy_factory(module_options={
        "require_pairing": "True", "name": "klipper-test",
        "port": str(free_port())})
    cura5.device(address(k), materials=SOME_MATERIALS)
    cura5.connect()
    # Cura's own message appears; it asked once (the module answers its
    # repeated asks with the same request)
    key_id = wait_asking(cura5, k)
    assert "CURA_ALLOW ID=%s" % (key_id,) in k.log_text()
    # reading stays open: the Monitor tab shows the printer meanwhile
    cura5.wait(lambda s: s["printers"], what="printer card")
    # a change is refused; Cura says "sent" anyway (it never reads the
    # status), but no job appears and its message stays
    sent = cura5.upload(ufp(tmp_path, "early", print_time=60, count=20))
    assert sent["reply"]["status"] == 403
    cura5.run(3)
    state = cura5.state()
    assert state["jobs"] == [] and state["auth_message_visible"]
    assert len(waiting_ids(k)) == 1
    # the profiles Cura sent while waiting are kept, not stored yet
    assert stored_materials(k) == []

    k.gcode("CURA_ALLOW ID=%s" % (key_id,))
    wait_allowed(cura5)
    cura5.wait(lambda s: len(stored_materials(k)) == len(SOME_MATERIALS),
               what="the kept materials stored")
    sent = cura5.upload(ufp(tmp_path, "allowed", print_time=900, count=3000,
                            sleep_every=10, sleep_s=0.1))
    assert sent["reply"]["status"] == 200 and sent["reply"]["signed"]
    state = cura5.wait(lambda s: active(s) and active(s)["state"]
                       == "printing", what="allowed job printing")
    job = active(state)["key"]
    assert cura5.action("pause", job)["status"] == 200
    cura5.wait(lambda s: active(s)["state"] == "paused", what="paused")

    # CURA_DENY: Cura's next read is refused, it shows its message and
    # asks again; allowing the new request lets it work again
    k.gcode("CURA_DENY ID=%s" % (key_id,))
    assert cura5.action("resume", job)["status"] == 401
    second = wait_asking(cura5, k, old_ids=[key_id])
    k.gcode("CURA_ALLOW ID=%s" % (second,))
    wait_allowed(cura5)
    assert cura5.action("resume", job)["status"] == 200
    cura5.wait(lambda s: active(s)["state"] == "printing", what="resumed")

    # auth.json lost: the same, after a restart
    assert cura5.action("abort", job)["status"] == 200
    cura5.wait(lambda s: active(s)["state"] in ("aborted",
               "aborted_wait_cleanup"), what="aborted")
    import os
    os.unlink(os.path.join(k.data_dir, "auth.json"))
    k.restart()
    third = wait_asking(cura5, k)
    k.gcode("CURA_ALLOW ID=%s" % (third,))
    wait_allowed(cura5)
    sent = cura5.upload(ufp(tmp_path, "after_restart", print_time=60,
                            count=20))
    assert sent["reply"]["status"] == 200
    k.gcode("CURA_BUILD_PLATE_CLEARED")
    state = cura5.wait(lambda s: any(j["name"] == "after_restart"
                                     for j in s["jobs"]), what="new job")
    assert errors(state) == []


def test_cura5_pairing_materials_after_cura_restart(cura, cura5,
                                                    klippy_factory):
    # A Cura started while its request waits (its credentials already in
    # its preferences) syncs at connect too: kept until CURA_ALLOW
    k = klippy_factory(module_options={"require_pairing": "True"})
    cura5.device(address(k), materials=SOME_MATERIALS)
    cura5.get("system")          # asks for credentials
    cura5.run(1)
    cura5.device(address(k), materials=SOME_MATERIALS)   # Cura restarts
    cura5.connect()
    key_id = wait_asking(cura5, k)
    cura5.run(2)
    posts = [r for r in cura5.replies()
             if r["path"] == "/cluster-api/v1/materials/"]
    assert len(posts) == len(SOME_MATERIALS)
    # kept, whether signed or sent while Cura was between credentials
    assert all(r["status"] == 200 for r in posts), posts
    assert stored_materials(k) == []
    k.gcode("CURA_ALLOW ID=%s" % (key_id,))
    cura5.wait(lambda s: len(stored_materials(k)) == len(SOME_MATERIALS),
               what="the kept materials stored")


def test_cura5_held_job_override_and_material_load(cura, cura5, klippy,
                                                   tmp_path):
    # The printer has synced Cura's profiles (connected) and PLA loaded:
    # a job sliced for PETG waits on Cura 5's card with its change
    connected(cura5, klippy)
    klippy.gcode("SET_CURA_MATERIAL GUID=%s" % (gcode_samples.GENERIC_PLA,))
    change = [{"type": "material_change", "index": 0, "origin_name": "PLA",
               "target_name": "PETG", "can_override": True}]
    for name in ("forced", "loaded"):
        path = tmp_path / (name + ".ufp")
        cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
            print_time=60, count=20, material=gcode_samples.GENERIC_PETG),
            materials=[cura_client.DEFAULT_CURA_ROOT / "usr/share/cura/"
                       "resources/materials/generic_petg.xml.fdm_material"])
        assert cura5.upload(path)["reply"]["status"] == 200
        state = cura5.wait(lambda s: active(s) and active(s)["name"] == name
                           and active(s)["configuration_changes"] == change,
                           what="%s held with its change" % (name,))
        job = active(state)
        assert job["state"] == "queued"
        assert state["printers"][0]["state"] == "idle"
        assert klippy.query("print_stats")["print_stats"]["state"] in (
            "standby", "complete")
        if name == "forced":
            # Cura's Override button: forceSendJob
            assert cura5.action("force", job["key"])["status"] == 200
        else:
            klippy.gcode("SET_CURA_MATERIAL GUID=%s"
                         % (gcode_samples.GENERIC_PETG,))
        state = cura5.wait(lambda s: active(s)["state"] == "wait_cleanup",
                           what="%s printed" % (name,))
        assert active(state)["configuration_changes"] == []
        assert klippy.query("print_stats")["print_stats"]["filename"] \
            == name + ".gcode"
        klippy.gcode("CURA_BUILD_PLATE_CLEARED")
        cura5.wait(lambda s: active(s) is None, what="card cleared")
    assert errors(state) == []


def test_cura5_shows_the_job_name_it_sent(cura, cura5, klippy, tmp_path):
    # Cura names the file after the job name (letters of any script kept)
    connected(cura5, klippy)
    path = ufp(tmp_path, "job", print_time=900, count=3000, sleep_every=10,
               sleep_s=0.1)
    sent = ["Würfel - 测试 (2)", "UMS3_שלום part", "Würfel - 测试 (2)"]
    for name in sent:
        reply = cura5.upload(path, file_name=name + ".ufp")["reply"]
        assert reply["status"] == 200, reply
    state = cura5.wait(lambda s: len(s["jobs"]) == 3, what="three jobs")
    assert sorted(j["name"] for j in state["jobs"]) == sorted(sent)
    assert errors(state) == []


# What a Cura without pairing reads; the front answers every one of them
READS = {"get_system", "get_printers", "get_print_jobs", "get_history",
         "get_print_job", "get_preview_image", "get_materials"}


def test_cura5_session_stays_in_the_front(cura, cura5, klippy, tmp_path):
    # Cura 5's own device (its two Qt connection pools reuse any keep-alive
    # connection for any request, every request signed): connect (pairing
    # request, material sync), two UFP uploads with thumbnails, its own
    # monitor polls with previews, a pause and a resume.  No read is
    # answered in Klippy's process, between the requests handed to it
    # Klippy's process holds none of the connections, and no request fails.
    k = klippy
    front = wait_for(lambda: children(k.pid), 10., "the front process")[0]
    samples = []

    def sample(state=None):
        samples.append(cura_connections(k, front))
        assert k.pid not in samples[-1], samples
        return state

    connected(cura5, klippy)
    sample()
    for name in ("one", "two"):
        path = tmp_path / (name + ".ufp")
        cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
            print_time=900, count=3000, sleep_every=10, sleep_s=0.1),
            thumbnail_png=gcode_samples.png(32, 24))
        assert cura5.upload(path)["reply"]["status"] == 200
        sample()
    state = cura5.wait(lambda s: sample(s) and active(s) and active(s)[
        "state"] == "printing" and queue_names(s) == ["two"],
        what="one printing, two queued")
    uuids = {j["name"]: j["key"] for j in state["jobs"]}
    assert cura5.action("pause", uuids["one"])["status"] == 200
    sample()
    cura5.wait(lambda s: sample(s) and active(s)["state"] == "paused",
               what="paused")
    assert cura5.action("resume", uuids["one"])["status"] == 200
    sample()
    state = cura5.wait(lambda s: sample(s) and active(s)["state"]
                       == "printing", what="resumed")
    cura5.run(3.)       # more monitor polls
    sample()
    replies = cura5.replies()
    previews = [r for r in replies if r["path"].endswith("/preview_image")]
    assert previews and all(r["status"] == 200 for r in previews), previews
    failed = [r for r in replies if r["error"] or r["status"] is None
              or r["status"] >= 400]
    assert failed == [], failed
    assert errors(cura5.state()) == []
    here = k.query("cura_connection")["cura_connection"]["answered_here"]
    assert not READS & set(here), here
    assert here["put_action"] == 2, here
    assert len(samples) > 5 and any(samples), samples


def test_cura5_aborted_print_shows_its_progress(cura, cura5, klippy,
                                                tmp_path):
    # an abort at 5 % once showed "Aborted 99 %"
    connected(cura5, klippy)
    sent = cura5.upload(ufp(tmp_path, "long", print_time=100, count=10000,
                            sleep_every=10, sleep_s=0.1))
    assert sent["reply"]["status"] == 200, sent
    state = cura5.wait(lambda s: active(s) and active(s)["state"]
                       == "printing", what="long printing")
    sd = lambda: klippy.query("virtual_sdcard")["virtual_sdcard"]
    deadline = time.monotonic() + 30.
    while sd()["progress"] < 0.05 and time.monotonic() < deadline:
        time.sleep(0.2)
    reached = sd()["progress"]
    assert reached >= 0.05
    assert cura5.action("abort", active(state)["key"])["status"] == 200
    card = active(cura5.wait(lambda s: active(s)["state"] in (
        "aborted", "aborted_wait_cleanup"), what="aborted"))
    # Cura 5 draws time_elapsed / time_total too
    assert reached - 0.01 <= card["progress"] <= reached + 0.03, \
        (reached, card)
