"""A group in real parts: the host is a real Klippy with cura_connection,
each member a real Klippy with the real Moonraker 0.11.0 (no
cura_connection).  Cura's own client uploads with and without a chosen
printer; the cards, the jobs, actions and plate clears go through the
module's HTTP API, as Cura and the web page use it."""
import os
import urllib.parse

import cura_client
import httpc
from group_host import (
    PRINTERS, cards, group_with, host_of, job_named, slow_file, wait_card,
    wait_job)
from httpc import get_json, wait_for
from job_actions import action
from mjpeg_source import MjpegSource, StreamReader
from moonraker_member import start_member

from _cura_connection.member_calls import MEMBER_MACROS
from _cura_connection.members import MoonrakerMember


def test_a_job_sent_to_a_chosen_member_prints_there(tmp_path, klippy_factory,
                                                   members):
    voron = members("voron")
    host = host_of(klippy_factory, voron)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    listed = get_json(base, PRINTERS)
    assert [c["friendly_name"] for c in listed] == [
        listed[0]["friendly_name"], "voron"]
    card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron reached")
    assert card["unique_name"] == "voron" and card["plate_clear"]
    status, body = cura_client.upload(addr, slow_file(tmp_path, "a.gcode"),
                                      unique_name="voron")
    assert status == 200, body
    job = wait_job(base, "a", lambda j: j["status"] == "printing",
                   "a printing on voron")
    assert job["printer_uuid"] == card["uuid"]
    assert job["constraints"] == {"require_printer_name": "voron"}
    with open(os.path.join(voron.gcodes_dir, "cura_connection",
                           "a.gcode")) as f, open(os.path.join(
                               str(tmp_path), "a.gcode")) as sent:
        assert f.read() == sent.read()
    assert cards(base)["voron"]["status"] == "printing"
    # the host's own printer has nothing to do with it
    host_card = get_json(base, PRINTERS)[0]
    assert host_card["status"] == "idle"
    # Cura's actions reach the member and take effect
    reply = action(base, job["uuid"], "pause")
    assert reply.status == 200, reply
    client = MoonrakerMember("voron", voron.url)
    assert client.poll()["print_stats"]["state"] == "paused"
    reply = action(base, job["uuid"], "pause")
    assert reply.status == 409 and b"it is paused" in reply.body
    assert action(base, job["uuid"], "print").status == 200
    assert client.poll()["print_stats"]["state"] == "printing"
    assert action(base, job["uuid"], "abort").status == 200
    assert client.poll()["print_stats"]["state"] == "cancelled"
    job = job_named(base, "a")
    assert job["status"] == "aborted_wait_cleanup"
    assert job["printer_uuid"] == card["uuid"]
    # the next job for voron waits for its plate
    status, body = cura_client.upload(addr, slow_file(tmp_path, "b.gcode"),
                                      unique_name="voron")
    assert status == 200, body
    b = wait_job(base, "b", lambda j: j["status"] == "queued", "b queued")
    assert "printer_uuid" not in b and not cards(base)["voron"][
        "plate_clear"]
    reply = httpc.request(base, "POST", "%s/%s/action/plate_cleared" % (
        PRINTERS, card["uuid"]), json_body={})
    assert reply.status == 200, reply
    wait_job(base, "b", lambda j: j["status"] == "printing"
             and j["printer_uuid"] == card["uuid"], "b printing on voron")
    client.close()


def test_any_printer_jobs_and_a_member_that_goes_away(tmp_path,
                                                     klippy_factory,
                                                     members):
    voron = members("voron")
    host, base, addr, card = group_with(klippy_factory, voron)
    # a print started on voron from its own Moonraker shows on its card
    client = MoonrakerMember("voron", voron.url)
    client.upload(slow_file(tmp_path, "benchy.gcode"), "benchy.gcode")
    client.start("benchy.gcode")
    own = wait_job(base, "benchy", lambda j: j["status"] == "printing",
                   "voron's own print")
    assert own["printer_uuid"] == card["uuid"] and own["owner"] == "voron"
    # an upload for any printer goes to the free one: the host
    status, body = cura_client.upload(addr, slow_file(tmp_path, "c.gcode"))
    assert status == 200, body
    c = wait_job(base, "c", lambda j: j["status"] == "printing",
                 "c printing")
    host_uuid = get_json(base, PRINTERS)[0]["uuid"]
    assert c["printer_uuid"] == host_uuid and c["constraints"] == []
    # voron's Moonraker goes away: its card stays, unreachable, its job too
    voron.stop_moonraker(kill=True)
    wait_card(base, "voron", lambda c: c["status"] == "unreachable",
              "voron unreachable")
    assert len(get_json(base, PRINTERS)) == 2
    assert job_named(base, "benchy")["status"] == "printing"
    voron.start_moonraker()
    wait_card(base, "voron", lambda c: c["status"] == "printing",
              "voron back")
    assert job_named(base, "benchy")["uuid"] == own["uuid"]
    client.close()


def test_the_host_restarts_while_a_member_prints(tmp_path, klippy_factory,
                                                 members):
    voron = members("voron")
    host, base, addr, card = group_with(klippy_factory, voron)
    status, body = cura_client.upload(addr, slow_file(tmp_path, "d.gcode",
                                                      1200),
                                      unique_name="voron")
    assert status == 200, body
    d = wait_job(base, "d", lambda j: j["status"] == "printing",
                 "d printing on voron")
    host.restart()
    base = host.base_url()      # (the test's port is chosen anew)
    again = wait_job(base, "d", lambda j: j["status"] == "printing",
                     "d still printing after the host's restart")
    assert again["uuid"] == d["uuid"]
    assert again["printer_uuid"] == d["printer_uuid"]
    host.restart(firmware=True)
    wait_job(host.base_url(), "d", lambda j: j["status"] == "printing"
             and j["uuid"] == d["uuid"], "d after FIRMWARE_RESTART")


def test_plate_clears_and_materials_from_every_place(tmp_path,
                                                     klippy_factory,
                                                     members, flavor):
    # voron's printer.cfg has the macros README gives for members
    voron = start_member(tmp_path / "voron", flavor, extra_cfg=MEMBER_MACROS)
    voron.name = "voron"
    try:
        host, base, addr, card = group_with(klippy_factory, voron)
        client = MoonrakerMember("voron", voron.url)
        # the member's own console: SET_CURA_MATERIAL reaches its card
        wait_for(lambda: "registering remote method" in open(
            voron.klippy.log_path).read(), 20., "the host's methods")
        client.gcode_script("SET_CURA_MATERIAL MATERIAL=PETG BRAND=Generic "
                            "COLOR=Red")
        card = wait_card(base, "voron", lambda c: c["configuration"][0][
            "material"], "voron's material")
        assert card["configuration"][0]["material"]["name"] \
            == "Generic PETG Red"
        for where in ("web page", "host console", "member console"):
            name = "p%d" % (len(where),)
            status, body = cura_client.upload(
                addr, slow_file(tmp_path, name + ".gcode", 20),
                unique_name="voron")
            assert status == 200, body
            wait_job(base, name, lambda j: j["status"] == "wait_cleanup",
                     "%s printed on voron" % (name,))
            assert not cards(base)["voron"]["plate_clear"]
            if where == "web page":
                reply = httpc.request(base, "POST", "%s/%s/action/"
                                      "plate_cleared" % (PRINTERS,
                                                         card["uuid"]),
                                      json_body={})
                assert reply.status == 200, reply
            elif where == "host console":
                host.gcode("CURA_BUILD_PLATE_CLEARED PRINTER=voron")
            else:
                client.gcode_script("CURA_BUILD_PLATE_CLEARED")
            wait_card(base, "voron", lambda c: c["plate_clear"],
                      "voron's plate cleared from the %s" % (where,))
            assert job_named(base, name) is None    # (in the history)
        # the member's console was answered (Moonraker's console history)
        def console():
            return [e["message"] for e in voron.moonraker.get(
                "/server/gcode_store?count=200")["result"]["gcode_store"]]
        wait_for(lambda: any("Cura group: Build plate marked clear" in line
                             for line in console()), 10., "the answer")
        assert any("Cura group: extruder: material set for Cura" in line
                   for line in console()), console()
        client.close()
    finally:
        voron.close()


def test_each_card_shows_its_printers_camera(tmp_path, klippy_factory,
                                            flavor):
    source = MjpegSource()
    voron = start_member(tmp_path / "voron", flavor,
                         webcam_url=source.url("stream"))
    voron.name = "voron"
    try:
        host = host_of(klippy_factory, voron)
        base = host.base_url()
        card = wait_card(base, "voron", lambda c: c["camera"],
                         "voron's webcam found")
        # Cura builds http://<ip_address>:8080/?action=stream; the rest of
        # what it builds is a fragment it never sends: the relay on the
        # host's own port
        url = urllib.parse.urlsplit("http://%s:8080/?action=stream"
                                    % (card["ip_address"],))
        assert url.hostname == "127.0.0.1" and url.port == host.cura_port()
        assert url.path == "/cluster-api/v1/printers/%s/camera" % (
            card["uuid"],)
        assert url.query == "action=stream"
        viewer = StreamReader(base, url.path + "?" + url.query)
        try:
            assert viewer.frame() in source.frames
            assert viewer.frame() in source.frames
        finally:
            viewer.close()
        reply = httpc.request(base, "GET", url.path + "?action=snapshot")
        assert reply.status == 200 and reply.body in source.frames
        # the host's own card is not the member's camera
        assert get_json(base, PRINTERS)[0]["ip_address"] == "127.0.0.1"
    finally:
        voron.close()
        source.close()


def test_restarts_leave_no_member_thread_behind(tmp_path, klippy_factory,
                                                members):
    # RESTART and FIRMWARE_RESTART end each member's follower and its
    # macros' websocket, also of a member that cannot be reached
    voron = members("voron")
    host = klippy_factory(module_options={
        "group_printers": "voron=%s, gone=http://127.0.0.1:9" % (voron.url,)})
    wait_card(host.base_url(), "voron", lambda c: c["status"] == "idle",
              "voron reached")
    threads = host.thread_count()
    for firmware in (False, True, False):
        host.restart(firmware=firmware)
        wait_card(host.base_url(), "voron", lambda c: c["status"] == "idle",
                  "voron reached again")
    wait_for(lambda: host.thread_count() <= threads, 10.,
             "no thread left over (%d before)" % (threads,))
    # and the member sees one host, not one per restart
    agents = voron.moonraker.get("/server/extensions/list")["result"][
        "agents"]
    assert [a["name"] for a in agents] == ["cura_connection"]
