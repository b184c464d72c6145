"""A group member through its real Moonraker 0.11.0 and a real Klippy
(moonraker_member.py): its status, a checksummed upload that lands whole
or not at all, a print started, paused, resumed and cancelled, what a
refusal says, a Moonraker killed, frozen or asking for an API key, and a
Klippy restart."""
import hashlib
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

import gcode_samples
from _cura_connection import members
from _cura_connection.members import MemberError, MoonrakerMember
from moonraker_member import UNTRUSTED, BreakingProxy, start_member

LONG = gcode_samples.moves(3000, 10, 0.1)            # ~30 s of printing


@pytest.fixture
def member(flavor, tmp_path):
    m = start_member(tmp_path / "voron", flavor)
    yield m
    m.close()


@pytest.fixture
def client(member):
    c = MoonrakerMember("voron", member.url)
    yield c
    c.close()


def wait_status(client, pred, timeout=30.):
    deadline = time.monotonic() + timeout
    while True:
        status = client.poll()
        if pred(status):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def print_state(state):
    return lambda s: (s["print_stats"] or {}).get("state") == state


def moonraker_post(member, path):
    """Moonraker's own answer to a POST, for comparing messages."""
    req = urllib.request.Request(member.url + path, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_idle_member(flavor, tmp_path):
    m = start_member(tmp_path / "voron", flavor, extruders=2)
    c = MoonrakerMember("voron", m.url)
    try:
        status = c.poll()
    finally:
        c.close()
        m.close()
    assert status["reachable"] and status["error"] == ""
    assert status["klippy_state"] == "ready"
    assert status["state_message"] == "Printer is ready"
    assert status["print_stats"]["state"] == "standby"
    assert status["virtual_sdcard"]["is_active"] is False
    assert status["pause_resume"] == {"is_paused": False}
    assert len(status["extruders"]) == 2
    assert set(status["extruders"][1]) == {"temperature", "target"}
    assert set(status["heater_bed"]) == {"temperature", "target"}
    assert len(status["axis_minimum"]) == len(status["axis_maximum"]) == 3


def test_upload_print_pause_resume_cancel(member, client, tmp_path):
    src = tmp_path / "long.gcode"
    src.write_text(LONG)
    reply = client.upload(str(src), "benchy part.gcode")
    assert reply["item"]["path"] == "benchy part.gcode"
    with open(os.path.join(member.gcodes_dir, "benchy part.gcode"),
              "rb") as f:
        assert f.read() == src.read_bytes()

    client.start("benchy part.gcode")
    status = wait_status(client, print_state("printing"))
    assert status["print_stats"]["filename"] == "benchy part.gcode"
    assert status["virtual_sdcard"]["is_active"]
    client.pause()
    status = wait_status(client, print_state("paused"))
    assert status["pause_resume"]["is_paused"]
    client.resume()
    status = wait_status(client, print_state("printing"))
    assert not status["pause_resume"]["is_paused"]
    client.cancel()
    wait_status(client, print_state("cancelled"))
    assert member.klippy.query("print_stats")["print_stats"][
        "state"] == "cancelled"

    client.delete("benchy part.gcode")
    assert "benchy part.gcode" not in member.gcodes()
    client.delete("benchy part.gcode")         # missing: no error


def test_names_with_spaces_and_accents(member, client, tmp_path):
    src = tmp_path / "src.gcode"
    src.write_text("G28\n")
    client.upload(str(src), "bénchy 2 (x) & y%.gcode")
    assert "bénchy 2 (x) & y%.gcode" in member.gcodes()
    client.start("bénchy 2 (x) & y%.gcode")
    wait_status(client, print_state("complete"))
    client.delete("bénchy 2 (x) & y%.gcode")
    assert "bénchy 2 (x) & y%.gcode" not in member.gcodes()


def test_refused_start_says_moonrakers_message(member, client):
    status, body = moonraker_post(member,
                                  "/printer/print/start?filename=nope.gcode")
    assert status == 400
    with pytest.raises(MemberError) as e:
        client.start("nope.gcode")
    assert e.value.message == "voron refused to start nope.gcode: " + body[
        "error"]["message"]
    assert client.poll()["print_stats"]["state"] == "standby"


def test_checksum_mismatch_is_refused(member, client, tmp_path,
                                      monkeypatch):
    # As when the file changes between the checksum and the sending
    src = tmp_path / "a.gcode"
    src.write_text(LONG)
    before = member.gcodes()
    monkeypatch.setattr(members, "sha256_of",
                        lambda path: hashlib.sha256(b"other").hexdigest())
    with pytest.raises(MemberError) as e:
        client.upload(str(src), "a.gcode")
    assert e.value.status == 422
    assert e.value.message.startswith("voron refused the file: File "
                                      "checksum mismatch: expected ")
    assert member.gcodes() == before
    assert os.listdir(member.tmp_dir) == []     # its temporary file too


@pytest.mark.parametrize("how", ["dropped", "moonraker_killed"])
def test_upload_broken_half_way_leaves_no_file(member, tmp_path, how):
    """An upload whose connection drops, or whose Moonraker is killed,
    half way through the body leaves no file and no partial file in the
    member's gcodes folder; Moonraker's own temporary file (in its
    TMPDIR) is all that may remain, and it is never moved into place."""
    src = tmp_path / "big.gcode"
    with open(src, "wb") as f:
        for _ in range(16):
            f.write(os.urandom(1 << 19))           # 8 MiB
    before = member.gcodes()
    proxy = BreakingProxy(member.moonraker.port, 4 << 20,
                          hold=how == "moonraker_killed")
    c = MoonrakerMember("voron", proxy.url)
    errors = []

    def send():
        try:
            c.upload(str(src), "big.gcode")
        except MemberError as e:
            errors.append(e)
    t = threading.Thread(target=send)
    t.start()
    try:
        if how == "moonraker_killed":
            assert proxy.reached.wait(30)
            member.stop_moonraker(kill=True)
            proxy.release.set()
        t.join(60)
    finally:
        c.close()
        proxy.close()
    assert not t.is_alive()
    [err] = errors
    assert "broke off" in err.message or "did not confirm" in err.message
    if how == "moonraker_killed":
        member.start_moonraker()
    c = MoonrakerMember("voron", member.url)
    wait_status(c, lambda s: s["klippy_state"] == "ready")
    c.close()
    assert member.gcodes() == before
    leftovers = os.listdir(member.tmp_dir)
    assert all(n.startswith("moonraker.upload-") for n in leftovers)
    # a partial body at most
    assert all(os.path.getsize(os.path.join(member.tmp_dir, n)) < 8 << 20
               for n in leftovers)


def test_moonraker_killed_frozen_and_back(member, client):
    assert client.poll()["reachable"]
    os.kill(member.moonraker.pid, signal.SIGSTOP)
    try:
        # it accepts connections (the kernel does) but never answers
        short = MoonrakerMember("voron", member.url, timeout=1.)
        status = short.poll()
        short.close()
    finally:
        os.kill(member.moonraker.pid, signal.SIGCONT)
    assert not status["reachable"] and status["klippy_state"] is None
    assert status["error"] == "voron (%s) is unreachable: no answer in " \
        "time" % (member.url,)

    member.stop_moonraker(kill=True)
    status = client.poll()
    assert not status["reachable"]
    assert status["error"] == "voron (%s) is unreachable: connection " \
        "refused" % (member.url,)
    with pytest.raises(MemberError, match="unreachable: connection refused"):
        client.start("any.gcode")
    assert client.webcams() == []

    member.start_moonraker()
    status = client.poll()
    assert status["reachable"] and status["klippy_state"] == "ready"
    assert status["print_stats"]["state"] == "standby"


def test_klippy_restart_not_ready_then_ready(member, client):
    """A restart into a config error keeps Klippy not ready (no race
    with a poll); a restart with a fixed config, now with two extruders,
    comes back ready and the member's extruders are read again."""
    assert len(client.poll()["extruders"]) == 1
    k = member.klippy
    k.extra_cfg = "[no_such_section]\n"
    k.write_config()
    k.api.send("gcode/script", {"script": "RESTART"})
    status = wait_status(client, lambda s: s["klippy_state"] == "error")
    assert status["reachable"]
    assert "no_such_section" in status["state_message"]
    assert status["print_stats"] is None and status["extruders"] == []

    k.extra_cfg = ""
    k.extruders = 2
    k.write_config()
    assert moonraker_post(member, "/printer/restart")[0] == 200
    status = wait_status(client, lambda s: s["klippy_state"] == "ready")
    assert status["print_stats"]["state"] == "standby"
    assert len(status["extruders"]) == 2


def test_webcams_of_the_member(member, client):
    # (Moonraker's default service: the MJPEG streamer crowsnest runs)
    assert client.webcams() == [{
        "name": "bedcam", "service": "mjpegstreamer",
        "stream_url": "http://127.0.0.1/webcam/?action=stream",
        "snapshot_url": "http://127.0.0.1/webcam/?action=snapshot"}]


def test_moonraker_asking_for_an_api_key(member, tmp_path):
    key = member.moonraker.get("/access/api_key")["result"]
    member.stop_moonraker()
    member.moonraker.trusted = UNTRUSTED
    member.start_moonraker()
    src = tmp_path / "a.gcode"
    src.write_text("G28\n")

    anonymous = MoonrakerMember("voron", member.url)
    status = anonymous.poll()
    assert not status["reachable"]
    assert "401" in status["error"] and "API key" in status["error"]
    with pytest.raises(MemberError, match="401") as e:
        anonymous.upload(str(src), "a.gcode")
    assert e.value.status == 401
    wrong = MoonrakerMember("voron", member.url, api_key="0" * 32)
    with pytest.raises(MemberError) as e:
        wrong.cancel()
    assert e.value.message == "voron's Moonraker refused the API key (401)"

    keyed = MoonrakerMember("voron", member.url, api_key=key)
    status = wait_status(keyed, lambda s: s["klippy_state"] == "ready")
    assert status["print_stats"]["state"] == "standby"
    keyed.upload(str(src), "a.gcode")
    assert "a.gcode" in member.gcodes()
    for c in (anonymous, wrong, keyed):
        c.close()
