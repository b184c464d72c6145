"""Attacks on the group in real parts (a real host Klippy, members with
the real Moonraker): each xfail test shows a promise of issue 21 that does
not hold yet."""
import os
import threading
import urllib.parse


import httpc

import cura_client
import gcode_samples
from httpc import jobs, wait_for
from mjpeg_source import MjpegSource
from moonraker_member import start_member

from _cura_connection.members import MoonrakerMember

from group_host import host_of, wait_card


def test_a_members_camera_link_reaches_this_host_on_its_port(
        tmp_path, klippy_factory, flavor):
    source = MjpegSource()
    voron = start_member(tmp_path / "voron", flavor,
                         webcam_url=source.url("stream"))
    voron.name = "voron"
    try:
        host = host_of(klippy_factory, voron)
        card = wait_card(host.base_url(), "voron", lambda c: c["camera"],
                         "voron's webcam found")
        # what Cura opens: http://<ip_address>:8080/?action=stream
        url = urllib.parse.urlsplit("http://%s:8080/?action=stream"
                                    % (card["ip_address"],))
        assert url.port == host.cura_port()
    finally:
        voron.close()
        source.close()


def test_every_card_carries_the_asking_curas_address(tmp_path,
                                                     klippy_factory, flavor):
    # (held) the front's published /printers: each Cura gets its own
    # address in every card, the members' camera links included
    source = MjpegSource()
    voron = start_member(tmp_path / "voron", flavor,
                         webcam_url=source.url("stream"))
    voron.name = "voron"
    try:
        host = host_of(klippy_factory, voron)
        base = host.base_url()
        wait_card(base, "voron", lambda c: c["camera"], "voron's webcam")
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.2"):
            reply = httpc.request(base, "GET", "/cluster-api/v1/printers",
                                  headers={"Host": "%s:%d" % (
                                      ip, host.cura_port())})
            assert reply.status == 200
            cards = reply.json()
            assert [c["ip_address"].split(":")[0].split("/")[0]
                    for c in cards] == [ip, ip], cards
    finally:
        voron.close()
        source.close()


def test_a_job_sent_to_a_busy_member_prints_as_itself(
        tmp_path, klippy_factory, flavor):
    voron = start_member(tmp_path / "voron", flavor)
    voron.name = "voron"
    busy = MoonrakerMember("voron", voron.url, timeout=30.)
    try:
        host = host_of(klippy_factory, voron)
        base = host.base_url()
        wait_card(base, "voron", lambda c: c["status"] == "idle",
                  "voron reached")
        # the member's console waits (as M190 would: the G-code mutex is
        # held, the reactor runs on)
        wait = threading.Thread(target=busy.gcode_script,
                                args=("TEST_SLEEP S=9",), daemon=True)
        wait.start()
        path = os.path.join(str(tmp_path), "a.gcode")
        with open(path, "w") as f:
            f.write(gcode_samples.moves(400, 10, 0.1))
        status, body = cura_client.upload(
            "127.0.0.1:%d" % (host.cura_port(),), path, unique_name="voron")
        assert status == 200, body
        wait.join(20.)

        def shown():
            listed = [j for j in jobs(base) if j["name"] == "a"]
            return listed if any(j["status"] == "printing"
                                 for j in listed) else None
        listed = wait_for(shown, 30., "a printing on voron")
        assert len(listed) == 1, [(j["status"], j.get("message"))
                                  for j in listed]
        assert listed[0]["owner"] != "voron", listed[0]
    finally:
        busy.close()
        voron.close()
