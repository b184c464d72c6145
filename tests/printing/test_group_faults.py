"""A group's faults and routing in real parts: the host is a real Klippy
with cura_connection, each member a real Klippy with the real Moonraker
0.11.0.  Cura's own client uploads; jobs, cards and actions go through the
module's HTTP API as Cura and the web page use it.  Members that break an
upload half way, restart or shut down mid-print, printers a file does
not fit, actions on every printer, a Moonraker that asks for an API key."""
import os
import time

import pytest

import cura_client
import gcode_samples
import httpc
from httpc import JOBS, jobs, wait_for
from job_actions import action
from klippy_harness import cartesian_cfg
from group_host import (
    PRINTERS, cards, host_card, host_of, job_named, slow_file, wait_card,
    wait_job, write)
from moonraker_member import UNTRUSTED, BreakingProxy

from _cura_connection.group import RETRY_AFTER
from _cura_connection.members import MemberError, MoonrakerMember

def boxed_file(tmp_path, name, box, sleeps=5):
    # A Cura (Marlin flavour) file whose header says the print's box; its
    # body only waits (the cartesian test printers are never homed)
    return write(tmp_path, name, gcode_samples.cura_marlin_header(box=box)
                 + "TEST_SLEEP S=0.1\n" * sleeps)


def files_under(folder):
    """Every file below folder (relative names), hidden ones too."""
    out = set()
    for root, _, names in os.walk(folder):
        for n in names:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out


def member_state(member):
    return member.moonraker.get("/printer/objects/query?print_stats")[
        "result"]["status"]["print_stats"]["state"]


# 1. A member that disappears mid-upload
@pytest.mark.slow
@pytest.mark.one_flavor   # waits out RETRY_AFTER: the first flavor is enough
@pytest.mark.parametrize("how", ["connection_broken", "moonraker_killed"])
def test_a_member_gone_mid_upload_keeps_no_half_file_and_gets_the_job_later(
        tmp_path, klippy_factory, members, how):
    voron = members("voron")
    src = slow_file(tmp_path, "a.gcode", 2000)
    size = os.path.getsize(src)
    # the host reaches voron through a relay that breaks the first upload
    # half way and holds it there
    proxy = BreakingProxy(voron.moonraker.port, size // 2, hold=True,
                          uploads_only=True)
    try:
        host = host_of(klippy_factory, voron, urls={"voron": proxy.url})
        base = host.base_url()
        addr = "127.0.0.1:%d" % (host.cura_port(),)
        card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                         "voron reached")
        before = files_under(voron.gcodes_dir)
        status, body = cura_client.upload(addr, src, unique_name="voron")
        assert status == 200, body
        assert proxy.reached.wait(30), "the upload never reached voron"
        # half of it is on its way: none of it is in voron's files
        assert files_under(voron.gcodes_dir) == before
        wait_job(base, "a", lambda j: j["status"] == "pre_print",
                 "a being sent to voron")
        if how == "moonraker_killed":
            voron.stop_moonraker(kill=True)
        proxy.release.set()
        job = wait_job(base, "a", lambda j: j["status"] == "queued",
                       "a back in the queue")
        assert job["message"].startswith("Could not send it to voron: "), \
            job
        assert len(job["message"]) > len("Could not send it to voron: ")
        assert "printer_uuid" not in job
        assert job["constraints"] == {"require_printer_name": "voron"}
        assert files_under(voron.gcodes_dir) == before
        if how == "moonraker_killed":
            wait_card(base, "voron", lambda c: c["status"] == "unreachable",
                      "voron unreachable")
            voron.start_moonraker()
        # nothing was printed on it: its plate stays clear
        assert wait_card(base, "voron", lambda c: c["status"] == "idle",
                         "voron back")["plate_clear"]
        # the group tries again later (RETRY_AFTER): it prints, whole
        job = wait_job(base, "a", lambda j: j["status"] == "printing",
                       "a sent again", timeout=RETRY_AFTER + 60.)
        assert job["printer_uuid"] == card["uuid"]
        with open(os.path.join(voron.gcodes_dir, "cura_connection",
                               "a.gcode")) as f, open(src) as sent:
            assert f.read() == sent.read()
        assert member_state(voron) == "printing"
        assert action(base, job["uuid"], "abort").status == 200
    finally:
        proxy.close()


def test_a_job_aborted_while_it_is_sent_stays_aborted(tmp_path,
                                                     klippy_factory,
                                                     members):
    voron = members("voron")
    src = slow_file(tmp_path, "a.gcode", 2000)
    proxy = BreakingProxy(voron.moonraker.port, os.path.getsize(src) // 2,
                          hold=True, uploads_only=True)
    try:
        host = host_of(klippy_factory, voron, urls={"voron": proxy.url})
        base = host.base_url()
        addr = "127.0.0.1:%d" % (host.cura_port(),)
        card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                         "voron reached")
        before = files_under(voron.gcodes_dir)
        status, body = cura_client.upload(addr, src, unique_name="voron")
        assert status == 200, body
        assert proxy.reached.wait(30), "the upload never reached voron"
        job = wait_job(base, "a", lambda j: j["status"] == "pre_print",
                       "a being sent to voron")
        reply = action(base, job["uuid"], "abort")
        assert reply.status == 200, reply
        assert job_named(base, "a")["status"] == "aborted_wait_cleanup"
        proxy.release.set()
        # the broken upload does not bring it back to the queue, nor
        # anything to voron: once voron's follower (the sender) has sent
        # the next job, a is still the aborted one
        reply = httpc.request(base, "POST", "%s/%s/action/plate_cleared" % (
            PRINTERS, card["uuid"]), json_body={})
        assert reply.status == 200, reply
        status, body = cura_client.upload(
            addr, slow_file(tmp_path, "b.gcode", 20), unique_name="voron")
        assert status == 200, body
        wait_job(base, "b", lambda j: j.get("printer_uuid") == card["uuid"]
                 and j["status"] in ("printing", "wait_cleanup"),
                 "b printed on voron")
        job = job_named(base, "a") or [
            j for j in httpc.all_jobs(base) if j["name"] == "a"][0]
        assert job["status"] in ("aborted_wait_cleanup", "aborted"), job
        assert job["message"] == "Aborted before it started", job
        assert files_under(voron.gcodes_dir) - before == {
            "cura_connection/b.gcode"}
    finally:
        proxy.close()


@pytest.mark.slow
@pytest.mark.one_flavor   # waits out RETRY_AFTER: the first flavor is enough
def test_the_host_restarting_mid_upload_sends_the_job_again(
        tmp_path, klippy_factory, members):
    voron = members("voron")
    src = slow_file(tmp_path, "a.gcode", 2000)
    proxy = BreakingProxy(voron.moonraker.port, os.path.getsize(src) // 2,
                          hold=True, uploads_only=True)
    try:
        host = host_of(klippy_factory, voron, urls={"voron": proxy.url})
        base = host.base_url()
        addr = "127.0.0.1:%d" % (host.cura_port(),)
        card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                         "voron reached")
        before = files_under(voron.gcodes_dir)
        status, body = cura_client.upload(addr, src, unique_name="voron")
        assert status == 200, body
        assert proxy.reached.wait(30), "the upload never reached voron"
        host.restart()
        proxy.release.set()
        base = host.base_url()
        job = wait_job(base, "a", lambda j: j["status"] == "printing",
                       "a sent again", timeout=RETRY_AFTER + 60.)
        assert job["printer_uuid"] == card["uuid"]
        # one whole file, no other
        assert files_under(voron.gcodes_dir) - before == {
            "cura_connection/a.gcode"}
        with open(os.path.join(voron.gcodes_dir, "cura_connection",
                               "a.gcode")) as f, open(src) as sent:
            assert f.read() == sent.read()
        assert action(base, job["uuid"], "abort").status == 200
    finally:
        proxy.close()


# 2. A member's Klippy restarts mid-print
def test_a_member_klippy_restarting_mid_print_fails_the_job_for_good(
        tmp_path, klippy_factory, members):
    voron = members("voron")
    host = host_of(klippy_factory, voron)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron reached")
    for name, firmware in (("r", False), ("f", True)):
        status, body = cura_client.upload(
            addr, slow_file(tmp_path, name + ".gcode", 3000),
            unique_name="voron")
        assert status == 200, body
        wait_job(base, name, lambda j: j["status"] == "printing",
                 "%s printing on voron" % (name,))
        voron.klippy.restart(firmware=firmware)
        job = wait_job(base, name,
                       lambda j: j["status"] == "failed_wait_cleanup",
                       "%s failed" % (name,))
        assert "voron" in job["message"] and "restarted" in job["message"], \
            job
        assert job["printer_uuid"] == card["uuid"]
        back = wait_card(base, "voron", lambda c: c["status"] == "idle",
                         "voron idle again")
        assert not back["plate_clear"]
        # never started again by itself: a few of the host's polls later
        # voron still stands by and the job is still the failed one
        time.sleep(3)
        assert member_state(voron) == "standby"
        assert job_named(base, name)["status"] == "failed_wait_cleanup"
        reply = httpc.request(base, "POST", "%s/%s/action/plate_cleared" % (
            PRINTERS, card["uuid"]), json_body={})
        assert reply.status == 200, reply
        wait_card(base, "voron", lambda c: c["plate_clear"], "plate clear")
        assert job_named(base, name) is None      # (in the history)


# 3. A member's Klipper shuts down mid-print
def test_a_member_shut_down_mid_print(tmp_path, klippy_factory, members):
    voron = members("voron")
    host = host_of(klippy_factory, voron)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron reached")
    status, body = cura_client.upload(addr, slow_file(tmp_path, "s.gcode",
                                                      3000),
                                      unique_name="voron")
    assert status == 200, body
    wait_job(base, "s", lambda j: j["status"] == "printing", "s printing")
    client = MoonrakerMember("voron", voron.url)
    try:
        client.gcode_script("M112")
    except MemberError:
        pass        # (Klippy may shut down before it answers)
    finally:
        client.close()
    job = wait_job(base, "s", lambda j: j["status"] == "failed_wait_cleanup",
                   "s failed")
    assert job["message"].startswith("voron: Klipper is shutdown"), job
    assert job["printer_uuid"] == card["uuid"]
    card = wait_card(base, "voron", lambda c: c["status"] == "error",
                     "voron's card shows the error")
    assert card["klipper_state"] == "shutdown" and card["state_message"]
    # an action on it says why nothing was done
    reply = action(base, job["uuid"], "abort")
    assert reply.status == 409 and b"voron's Klipper is shutdown" \
        in reply.body, reply
    # FIRMWARE_RESTART on voron: idle again, its plate still to clear, the
    # job still the failed one
    voron.klippy.restart(firmware=True)
    back = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron back from its shutdown")
    assert not back["plate_clear"]
    assert job_named(base, "s")["status"] == "failed_wait_cleanup"
    assert member_state(voron) == "standby"


# 4. What fits where
SMALL, BIG = 100, 300
TINY_BOX = (10, 10, 0.2, 50, 50, 10)
MID_BOX = (10, 10, 0.2, 150, 150, 10)      # the big printer's only
HUGE_BOX = (10, 10, 0.2, 400, 150, 10)     # nobody's


def test_files_go_only_where_they_fit(tmp_path, klippy_factory, members):
    small = members("small", extra_cfg=cartesian_cfg(SMALL, SMALL, SMALL))
    host = host_of(klippy_factory, small,
                   extra_cfg=cartesian_cfg(BIG, BIG, BIG))
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    small_card = wait_card(base, "small", lambda c: c["status"] == "idle",
                           "small reached")
    me = host_card(base)
    host_files = files_under(host.gcodes_dir)
    small_files = files_under(small.gcodes_dir)
    # pinned to a printer it does not fit: refused, nothing kept
    status, body = cura_client.upload(
        addr, boxed_file(tmp_path, "mid.gcode", MID_BOX),
        unique_name="small")
    assert status == 409, body
    assert b"mid.gcode fits no printer" in body and \
        b"small reaches 0.0..100.0" in body, body
    # bigger than every printer: refused, naming each
    status, body = cura_client.upload(
        addr, boxed_file(tmp_path, "huge.gcode", HUGE_BOX))
    assert status == 409, body
    assert b"fits no printer of this group" in body, body
    assert b"small reaches" in body and (
        "%s reaches" % (me["friendly_name"],)).encode() in body, body
    assert [j for j in jobs(base)] == []
    assert files_under(host.gcodes_dir) == host_files
    assert files_under(small.gcodes_dir) == small_files
    # the host busy, an Automatic job that fits only the host waits for
    # it, and one that fits small goes past it to small
    status, body = cura_client.upload(
        addr, boxed_file(tmp_path, "long.gcode", TINY_BOX, 600),
        unique_name=me["unique_name"])
    assert status == 200, body
    long_job = wait_job(base, "long", lambda j: j["status"] == "printing",
                        "long printing on the host")
    assert long_job["printer_uuid"] == me["uuid"]
    status, body = cura_client.upload(
        addr, boxed_file(tmp_path, "mid.gcode", MID_BOX))
    assert status == 200, body
    status, body = cura_client.upload(
        addr, boxed_file(tmp_path, "tiny.gcode", TINY_BOX))
    assert status == 200, body
    wait_job(base, "tiny", lambda j: j.get("printer_uuid")
             == small_card["uuid"] and j["status"] in (
                 "printing", "wait_cleanup"), "tiny printed on small")
    mid = job_named(base, "mid")
    assert mid["status"] == "queued" and "printer_uuid" not in mid, mid
    assert files_under(os.path.join(small.gcodes_dir, "cura_connection")) \
        == {"tiny.gcode"}
    # the host frees up: mid prints there
    assert action(base, long_job["uuid"], "abort").status == 200
    reply = httpc.request(base, "POST", "%s/%s/action/plate_cleared" % (
        PRINTERS, me["uuid"]), json_body={})
    assert reply.status == 200, reply
    mid = wait_job(base, "mid", lambda j: j.get("printer_uuid") == me["uuid"],
                   "mid on the host")
    assert mid["status"] in ("printing", "wait_cleanup"), mid
    assert "mid.gcode" not in files_under(small.gcodes_dir) | files_under(
        os.path.join(small.gcodes_dir, "cura_connection"))


def test_a_member_out_of_reach_keeps_its_build_volume(
        tmp_path, klippy_factory, members):
    # The host learnt small's reach; small's Moonraker goes away: a file
    # pinned to small that does not fit it is still refused
    small = members("small", extra_cfg=cartesian_cfg(SMALL, SMALL, SMALL))
    host = host_of(klippy_factory, small)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    wait_card(base, "small", lambda c: c["status"] == "idle",
              "small reached")
    small.stop_moonraker()
    wait_card(base, "small", lambda c: c["status"] == "unreachable",
              "small unreachable")
    status, body = cura_client.upload(
        addr, boxed_file(tmp_path, "mid.gcode", MID_BOX),
        unique_name="small")
    assert status == 409, (status, body, jobs(base))
    assert b"small reaches 0.0..100.0" in body, body
    assert jobs(base) == []


# 5. Actions on every printer
def test_actions_reach_the_printer_that_has_the_job(tmp_path, klippy_factory,
                                                    members):
    voron = members("voron")
    host = host_of(klippy_factory, voron)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron reached")
    me = host_card(base)
    for name, where in (("h", me["unique_name"]), ("v", "voron")):
        status, body = cura_client.upload(
            addr, slow_file(tmp_path, name + ".gcode", 3000),
            unique_name=where)
        assert status == 200, body
    h = wait_job(base, "h", lambda j: j["status"] == "printing",
                 "h printing on the host")
    v = wait_job(base, "v", lambda j: j["status"] == "printing",
                 "v printing on voron")
    assert (h["printer_uuid"], v["printer_uuid"]) == (me["uuid"],
                                                      card["uuid"])

    def host_state():
        return host.query("print_stats")["print_stats"]["state"]
    for job, state in ((h, host_state), (v, lambda: member_state(voron))):
        reply = action(base, job["uuid"], "pause")
        assert reply.status in (200, 202), reply
        wait_for(lambda: state() == "paused", 20., "paused")
        wait_job(base, job["name"], lambda j: j["status"] == "paused",
                 "%s paused" % (job["name"],))
        assert action(base, job["uuid"], "print").status == 200
        assert state() == "printing"
    # queued jobs pinned to voron: no printer has them
    for name in ("q1", "q2"):
        status, body = cura_client.upload(
            addr, slow_file(tmp_path, name + ".gcode", 20),
            unique_name="voron")
        assert status == 200, body
    q1 = wait_job(base, "q1", lambda j: j["status"] == "queued", "q1 queued")
    q2 = wait_job(base, "q2", lambda j: j["status"] == "queued", "q2 queued")
    reply = action(base, q1["uuid"], "pause")
    assert reply.status == 409 and b"queued" in reply.body, reply
    assert member_state(voron) == "printing" and host_state() == "printing"
    reply = httpc.request(base, "POST", "%s/%s/action/move" % (
        JOBS, q2["uuid"]), json_body={"to_position": 0, "list": "queued"})
    assert reply.status == 200, reply
    assert [j["name"] for j in jobs(base) if j["status"] == "queued"] == [
        "q2", "q1"]
    reply = httpc.request(base, "DELETE", "%s/%s" % (JOBS, q1["uuid"]))
    assert reply.status == 200, reply
    assert job_named(base, "q1") is None
    assert job_named(base, "q2")["constraints"] == {
        "require_printer_name": "voron"}
    # voron out of reach: nothing can be done there, and the reply says so
    voron.stop_moonraker(kill=True)
    wait_card(base, "voron", lambda c: c["status"] == "unreachable",
              "voron unreachable")
    reply = action(base, v["uuid"], "pause")
    assert reply.status == 409 and b"voron is unreachable" in reply.body, \
        reply
    voron.start_moonraker()
    wait_card(base, "voron", lambda c: c["status"] == "printing",
              "voron back")
    assert job_named(base, "v")["status"] == "printing"
    for job, state in ((h, host_state), (v, lambda: member_state(voron))):
        assert action(base, job["uuid"], "abort").status == 200
        assert state() == "cancelled"
        assert job_named(base, job["name"])["status"] \
            == "aborted_wait_cleanup"
        reply = action(base, job["uuid"], "abort")
        assert reply.status == 409, reply


def test_override_of_a_job_held_for_its_material_on_a_member(
        tmp_path, klippy_factory, members):
    voron = members("voron")
    host = host_of(klippy_factory, voron)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron reached")
    # (by GUID: the file names its material by GUID only, and the host
    # has no profile that would name it; MATERIAL=PLA would not hold it)
    host.gcode("SET_CURA_MATERIAL PRINTER=voron GUID=%s"
               % (gcode_samples.GENERIC_PLA,))
    wait_card(base, "voron", lambda c: c["configuration"][0]["material"],
              "voron's PLA")
    path = os.path.join(str(tmp_path), "petg.gcode")
    with open(path, "wb") as f:
        f.write(gcode_samples.cura_gcode(material=gcode_samples.GENERIC_PETG,
                                         count=40))
    status, body = cura_client.upload(addr, path, unique_name="voron")
    assert status == 200, body
    held = wait_job(base, "petg", lambda j: j.get("printer_uuid")
                    == card["uuid"], "petg held on voron")
    assert held["status"] == "queued", held
    [change] = held["configuration_changes_required"]
    assert change["type_of_change"] == "material_change"
    assert (change["target_id"], change["origin_id"]) == (
        gcode_samples.GENERIC_PETG, gcode_samples.GENERIC_PLA)
    assert member_state(voron) == "standby"
    reply = httpc.request(base, "PUT", "%s/%s" % (JOBS, held["uuid"]),
                          json_body={"force": True})
    assert reply.status == 200, reply
    job = wait_job(base, "petg", lambda j: j["status"] in (
        "printing", "wait_cleanup"), "petg printed on voron")
    assert job["printer_uuid"] == card["uuid"]
    assert os.path.exists(os.path.join(voron.gcodes_dir, "cura_connection",
                                       "petg.gcode"))


# 6. A member's Moonraker that asks for an API key
def test_a_member_that_asks_for_an_api_key(tmp_path, klippy_factory,
                                           members):
    voron = members("voron")
    key = voron.moonraker.get("/access/api_key")["result"]
    voron.stop_moonraker()
    voron.moonraker.trusted = UNTRUSTED
    voron.start_moonraker()
    host = host_of(klippy_factory, voron, group_api_keys="voron=" + key)
    base = host.base_url()
    addr = "127.0.0.1:%d" % (host.cura_port(),)
    card = wait_card(base, "voron", lambda c: c["status"] == "idle",
                     "voron reached with its key")
    status, body = cura_client.upload(addr, slow_file(tmp_path, "k.gcode",
                                                      20),
                                      unique_name="voron")
    assert status == 200, body
    wait_job(base, "k", lambda j: j.get("printer_uuid") == card["uuid"]
             and j["status"] in ("printing", "wait_cleanup"), "k on voron")
    # a wrong key: the card says why, the host goes on answering
    host.module_options["group_api_keys"] = "voron=" + "0" * 32
    host.write_config()
    host.restart()
    base = host.base_url()
    card = wait_card(base, "voron", lambda c: c["status"] == "unreachable",
                     "voron refusing the key")
    assert card["state_message"] == \
        "voron's Moonraker refused the API key (401)", card
    # several polls later: the host still answers, and said it once
    def refused():
        with open(voron.moonraker.log_path) as f:
            return f.read().count("401 GET /server/info (127.0.0.1): "
                                  "Invalid API Key")
    wait_for(lambda: refused() >= 5, 30., "the host polling voron")
    assert host.info()["state"] == "ready"
    assert host_card(base)["status"] == "idle"
    assert cards(base)["voron"]["status"] == "unreachable"
    said = [line for line in host.log_text().splitlines()
            if "member voron" in line and "Invalid API Key" in line]
    assert len(said) == 1, said
