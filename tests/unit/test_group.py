"""A group's members against a small model of their Moonraker
(fakes.FakeMoonraker): a job goes to the printer named for it or to the
first free one it fits, keeps one owner, waits for the member's plate,
actions reach the member and take effect or say why not, faults put the
job back or end it with the reason, and the store keeps it all."""
import json
import os
import types

import pytest

from fakes import FakeKlipper, FakeMoonraker
from real_inputs import cura_api

from _cura_connection.errors import Conflict, NotFound
from _cura_connection.group import (
    GroupMember, MEMBER_EXTRUDERS, PrinterGroup, REMOTE_DIR, member_uuid,
    parse_group)
from _cura_connection.jobs import Job, JobStore
from _cura_connection.lifecycle import JobLifecycle
from _cura_connection.materials import LoadedMaterials
from _cura_connection.members import MemberError


HOST = "00000000-0000-4000-8000-000000000000"


class Farm:
    """A store with members m0, m1... and their fake Moonrakers."""
    def __init__(self, tmp_path, n=2, auto_start_next=False, reload_from=None):
        self.tmp = tmp_path
        self.gcodes = str(tmp_path)
        self.fakes = reload_from.fakes if reload_from else [
            FakeMoonraker("m%d" % i) for i in range(n)]
        self.members = [GroupMember(f.name, "http://127.0.0.1:%d" % (
            7125 + i), None, HOST, auto_start_next, LoadedMaterials(
                str(tmp_path / ("%s.json" % (f.name,))),
                [(n, None) for n in MEMBER_EXTRUDERS]), client=f)
            for i, f in enumerate(self.fakes)]
        self.store = JobStore(str(tmp_path / "queue.json"), 5, False, HOST,
                              self.members)
        self.group = PrinterGroup(self.store, self.members, self.gcodes,
                                  "host")

    def job(self, name, target="", bounds=None):
        path = os.path.join(self.gcodes, name + ".gcode")
        with open(path, "w") as f:
            f.write("G28\n; %s\n" % (name,))
        job = Job(name=name, filename=name + ".gcode", target=target,
                  bounds=bounds)
        self.store.add(job)
        return job

    def api(self):
        """A CuraApi over this farm's store and group (this printer's own
        materials unknown)."""
        return cura_api(self.gcodes, str(self.tmp / "data"), store=self.store,
                        group=self.group, loaded=LoadedMaterials(
                            str(self.tmp / "loaded.json"),
                            [("extruder", None)], True),
                        definition=types.SimpleNamespace(id="test"))

    def tick(self, *which):
        for m in which or self.members:
            self.group._tick(m)

    def reload(self, members=None):
        self.store.save()
        again = Farm(self.tmp, reload_from=self)
        if members is not None:
            again.members = members
            again.store = JobStore(str(self.tmp / "queue.json"), 5, False,
                                   HOST, members)
            again.group = PrinterGroup(again.store, members, self.gcodes,
                                       "host")
        return again


def test_parse_group_options():
    entries = parse_group("voron=http://192.168.1.23:7125,\n"
                          "ender = http://127.0.0.1:7126",
                          "voron=abc123", "ender=true", "host")
    assert entries == [("voron", "http://192.168.1.23:7125", "abc123",
                        False),
                       ("ender", "http://127.0.0.1:7126", None, True)]
    for printers, keys, auto, why in [
            ("voron", "", "", "not <name>=<value>"),
            ("voron=http://a:1, voron=http://b:1", "", "", "named twice"),
            ("host=http://a:1", "", "", "this printer's name"),
            ("vo ron=http://a:1", "", "", "not a printer name"),
            ("voron=http://a:1", "ender=k", "", "not in group_printers"),
            ("voron=http://a:1", "", "voron=maybe", "not true or false")]:
        with pytest.raises(ValueError, match=why):
            parse_group(printers, keys, auto, "host")


def test_member_uuids_are_stable_and_distinct():
    assert member_uuid(HOST, "voron") == member_uuid(HOST, "voron")
    assert member_uuid(HOST, "voron") != member_uuid(HOST, "ender")
    assert member_uuid(HOST, "voron") != HOST


def test_a_job_named_for_a_member_prints_there(tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    job = farm.job("a", target=m1.uuid)
    farm.tick(m0)
    assert job.status == "queued" and farm.fakes[0].calls == []
    # this printer does not take it either
    assert farm.store.next_for(HOST, lambda j: True) is None
    farm.tick(m1)
    remote = "%s/a.gcode" % (REMOTE_DIR,)
    assert farm.fakes[1].files[remote] == b"G28\n; a\n"
    assert farm.fakes[1].filename == remote
    assert job.status == "printing" and job.printer == m1.uuid
    assert farm.store.printer_jobs() == ([(m1.uuid, job)], [])
    farm.tick(m1)
    assert job.status == "printing" and not job.message


def test_any_printer_job_goes_to_the_first_free_member_it_fits(tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    farm.fakes[0].axis_maximum = [200., 200., 200.]
    farm.tick()         # (their limits are known once polled)
    big = farm.job("big", bounds=[0., 0., 0., 250., 250., 10.])
    small = farm.job("small", bounds=[0., 0., 0., 20., 20., 10.])
    farm.tick(m0)
    # the big one waits for a printer it fits; the small one goes
    assert big.status == "queued" and small.printer == m0.uuid
    farm.tick(m1)
    assert big.printer == m1.uuid and big.status == "printing"


def test_a_member_waits_for_its_plate_to_be_cleared(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    a, b = farm.job("a"), farm.job("b")
    farm.tick()
    farm.fakes[0].duration = 12.
    farm.fakes[0].finish()
    farm.tick()
    assert a.status == "wait_cleanup" and a.time_elapsed == 12
    assert not m0.plate_clear and b.status == "queued"
    assert farm.store.printer_jobs()[0] == [(m0.uuid, a)]
    farm.tick()
    assert b.status == "queued"
    farm.group.plate_cleared(m0, wait=False)
    assert a.status == "finished" and a in farm.store.history
    farm.tick()
    assert b.status == "printing" and b.printer == m0.uuid


def test_a_member_that_clears_its_own_plate_goes_on(tmp_path):
    farm = Farm(tmp_path, n=1, auto_start_next=True)
    a, b = farm.job("a"), farm.job("b")
    farm.tick()
    farm.fakes[0].finish()
    farm.tick()
    farm.tick()
    assert a.status == "finished" and b.status == "printing"


def test_the_plate_of_a_printing_member_is_not_cleared(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    a = farm.job("a")
    farm.tick()
    with pytest.raises(Conflict, match="m0 is printing"):
        farm.group.plate_cleared(m0)
    assert a.status == "printing" and a is m0.current


def test_an_unreachable_member_keeps_its_job_and_its_restart_ends_it(
        tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    a = farm.job("a")
    farm.tick()
    farm.fakes[0].reachable = False
    farm.tick()
    assert a.status == "printing" and not m0.status["reachable"]
    # back, its Klipper restarted meanwhile: the print was lost
    farm.fakes[0].reachable = True
    farm.fakes[0].restart_klipper()
    farm.tick()
    assert a.status == "failed_wait_cleanup"
    assert "Interrupted on m0" in a.message
    # never started again by itself
    farm.tick()
    assert farm.fakes[0].state == "standby" and a not in farm.store.queue


def test_a_member_whose_moonraker_reconnects_goes_on_printing(tmp_path):
    farm = Farm(tmp_path, n=1)
    a = farm.job("a")
    farm.tick()
    for state in ("disconnected", "startup"):
        farm.fakes[0].kstate = state
        farm.tick()
        assert a.status == "printing"
    farm.fakes[0].kstate = "ready"
    farm.tick()
    assert a.status == "printing" and a is farm.members[0].current


def test_a_member_klipper_shutdown_fails_its_print(tmp_path):
    farm = Farm(tmp_path, n=1)
    a = farm.job("a")
    farm.tick()
    farm.fakes[0].kstate = "shutdown"
    farm.tick()
    assert a.status == "failed_wait_cleanup" and "shutdown" in a.message


def test_a_send_that_fails_puts_the_job_back_with_the_reason(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    farm.fakes[0].fail_upload = "m0 refused the file: No space left"
    a, b = farm.job("a"), farm.job("b")
    farm.tick()
    assert farm.store.queue == [a, b] and a.status == "queued"
    assert "Could not send it to m0" in a.message and "No space" \
        in a.message
    assert m0.plate_clear and m0.current is None and not a.started
    assert farm.fakes[0].files == {}
    # not again at once (a member that refuses is not hammered)
    farm.fakes[0].fail_upload = None
    farm.tick()
    assert a.status == "queued"
    m0.retry_at = 0.
    farm.tick()
    assert a.status == "printing"


def test_a_start_the_member_refuses_fails_the_job_and_keeps_the_plate(
        tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    fake = farm.fakes[0]
    real_upload = fake.upload
    def lose_file(path, remote, folder):
        real_upload(path, remote, folder)
        fake.files.clear()      # (gone before the start)
    fake.upload = lose_file
    a = farm.job("a")
    farm.tick()
    assert a.status == "failed_wait_cleanup" and "does not exist" \
        in a.message
    assert m0.plate_clear


def test_a_print_started_on_the_member_shows_on_its_card(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    fake = farm.fakes[0]
    fake.files["benchy.gcode"] = b"G28\n"
    fake.start("benchy.gcode")
    queued = farm.job("a")
    farm.tick()
    job = m0.current
    assert job.filename == "benchy.gcode" and job.source == "klipper"
    assert job.owner == "m0" and job.status == "printing"
    assert queued.status == "queued"     # m0 is busy


@pytest.mark.parametrize("action,ok", [("pause", "paused"),
                                       ("abort", "aborted_wait_cleanup")])
def test_actions_reach_the_member(tmp_path, action, ok):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    a = farm.job("a")
    farm.tick()
    assert farm.group.act(m0, a, action) == (200, ok)
    assert a.status == ok and a.action is None
    if action == "pause":
        assert farm.group.act(m0, a, "print") == (200, "printing")
        assert farm.fakes[0].state == "printing"
        with pytest.raises(Conflict, match="it is printing; nothing"):
            farm.group.act(m0, a, "print")


def test_an_action_on_an_unreachable_member_says_why(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    a = farm.job("a")
    farm.tick()
    farm.fakes[0].reachable = False
    with pytest.raises(Conflict, match="m0 is unreachable"):
        farm.group.act(m0, a, "pause")
    assert a.status == "printing" and a.action is None


def test_an_abort_while_the_file_is_sent_removes_it(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    fake = farm.fakes[0]
    real_upload = fake.upload
    answers = []
    def abort_meanwhile(path, remote, folder):
        real_upload(path, remote, folder)
        answers.append(farm.group.act(m0, m0.current, "abort"))
    fake.upload = abort_meanwhile
    a = farm.job("a")
    farm.tick()
    assert answers == [(200, "aborted_wait_cleanup")]
    assert a.status == "aborted_wait_cleanup"
    assert fake.files == {} and fake.state == "standby"
    assert ("start", "%s/a.gcode" % (REMOTE_DIR,)) not in fake.calls


def test_the_group_round_trips_through_its_saved_state(tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    printing = farm.job("p", target=m0.uuid)
    farm.tick(m0)
    pinned = farm.job("q", target=m1.uuid)
    anywhere = farm.job("r", bounds=[1., 2., 3., 40., 50., 60.])
    before = {j.uuid: j.to_dict() for j in (printing, pinned, anywhere)}
    again = farm.reload()
    after = again.store
    assert {j.uuid: j.to_dict() for j in after.queue} == {
        k: v for k, v in before.items() if k != printing.uuid}
    m0b = after.members[m0.uuid]
    assert m0b.current.to_dict() == before[printing.uuid]
    assert not m0b.plate_clear and after.members[m1.uuid].plate_clear
    # the member goes on printing it: so does its job
    again.tick(again.members[0])
    assert m0b.current.status == "printing"
    assert m0b.current.uuid == printing.uuid
    # and the saved bytes are what state() says
    with open(after.path) as f:
        assert json.load(f) == farm.store.state()


def test_a_job_being_sent_when_the_host_stopped_goes_back(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    a = farm.job("a")
    claimed = farm.store.claim(m0, lambda j: True)
    assert claimed is a and a.status == "pre_print"
    again = farm.reload()
    again.tick()
    job = again.store.find(a.uuid)
    # it was not printing there: sent again, and started once
    assert job.status == "printing" and job.printer == m0.uuid
    assert again.fakes[0].calls.count(
        ("start", "%s/a.gcode" % (REMOTE_DIR,))) == 1


def test_a_printer_that_left_the_group(tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    printing = farm.job("p", target=m0.uuid)
    farm.tick(m0)
    pinned = farm.job("q", target=m0.uuid)
    again = farm.reload(members=[])
    store = again.store
    gone = store.find(printing.uuid)
    assert gone in store.history and gone.status == "failed"
    assert "left the group" in gone.message
    assert store.find(pinned.uuid).target == ""


def test_cards_and_jobs_as_cura_reads_them(tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    api = farm.api()
    a = farm.job("a", target=m1.uuid)
    b = farm.job("b")
    farm.fakes[0].reachable = False
    farm.tick()
    class Req:
        @staticmethod
        def reachable_ip():
            return "10.0.0.5"
    cards = json.loads(api.replies.printers(api.bridge.snapshot, Req))
    assert [c["friendly_name"] for c in cards] == ["test", "m0", "m1"]
    assert [c["unique_name"] for c in cards] == ["test", "m0", "m1"]
    assert len({c["uuid"] for c in cards}) == 3
    assert [c["status"] for c in cards[1:]] == ["unreachable", "printing"]
    jobs = {j["uuid"]: j for j in json.loads(b"".join(
        api.print_jobs_reply(lambda: None)))}
    assert jobs[a.uuid]["printer_uuid"] == m1.uuid
    assert jobs[a.uuid]["constraints"] == {"require_printer_name": "m1"}
    assert "printer_uuid" not in jobs[b.uuid]
    assert jobs[b.uuid]["constraints"] == []


def test_uploads_name_a_printer_that_fits(tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    farm.fakes[1].axis_maximum = [500., 500., 500.]
    farm.tick()
    api = farm.api()
    big = [0., 0., 0., 400., 400., 100.]
    assert api.target_of("m1", big, "x.gcode") == m1.uuid
    assert api.target_of("", big, "x.gcode") == ""
    assert api.target_of("test", None, "x.gcode") == HOST
    with pytest.raises(Conflict, match="needs X 0.0..400.0 mm, m0 reaches"):
        api.target_of("m0", big, "x.gcode")
    with pytest.raises(NotFound, match="No printer nope"):
        api.target_of("nope", None, "x.gcode")
    with pytest.raises(Conflict, match="fits no printer of this group"):
        api.target_of("", [0., 0., 0., 900., 10., 10.], "x.gcode")


PETG = {"extruder": 0, "guid": "1cbfaeb3-1906-4b26-b2e7-6f777a8c197a",
        "brand": "Generic", "material": "PETG", "color": "Generic",
        "name": "PETG"}


def test_materials_route_jobs_and_hold_the_one_named_for_a_member(
        tmp_path):
    farm = Farm(tmp_path)
    m0, m1 = farm.members
    for m in farm.members:
        m.loaded.set("extruder", {"material": "PLA"})
    anywhere = farm.job("any")
    anywhere.materials = [PETG]
    farm.tick()
    # no member has PETG: it waits in the queue for one that has
    assert anywhere.status == "queued" and not farm.fakes[0].calls
    m1.loaded.set("extruder", {"material": "PETG"})
    farm.tick()
    assert anywhere.printer == m1.uuid and anywhere.status == "printing"
    # a job named for m0 waits there, on its card, for its material
    pinned = farm.job("pinned", target=m0.uuid)
    pinned.materials = [PETG]
    farm.tick()
    assert pinned.status == "queued" and m0.held is pinned
    assert (m0.uuid, pinned) in farm.store.printer_jobs()[0]
    api = farm.api()
    changes = api.job_json(pinned, m0.uuid)["configuration_changes_required"]
    assert [(c["origin_name"], c["target_name"]) for c in changes] == [
        ("PLA", "PETG")]
    # Override (force): it goes
    farm.store.set_force(pinned.uuid, True)
    farm.tick()
    assert pinned.status == "printing" and pinned.printer == m0.uuid
    assert m0.held is None


@pytest.mark.parametrize("end", ["complete", "cancelled"])
def test_a_job_the_member_ran_while_the_host_was_stopped_ends_there(
        tmp_path, end):
    # Found by test_group_model: the host stopped after the member had
    # started the job (saved as pre_print); the member's print ended
    # before the new host's follower looked.  The job ran: it ends, and
    # is not sent and printed again.
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    fake = farm.fakes[0]
    a = farm.job("a")
    assert farm.store.claim(m0, lambda j: True) is a
    remote = "%s/a.gcode" % (REMOTE_DIR,)
    fake.upload(str(tmp_path / "a.gcode"), "a.gcode", REMOTE_DIR)
    fake.start(remote)
    again = farm.reload()
    if end == "complete":
        fake.finish()
    else:
        fake.state = "cancelled"     # (its own console)
    again.tick()
    job = again.store.find(a.uuid)
    assert job.status == {"complete": "wait_cleanup",
                          "cancelled": "aborted_wait_cleanup"}[end]
    assert fake.calls.count(("start", remote)) == 1
    again.tick()
    assert fake.calls.count(("start", remote)) == 1 and job.printer == m0.uuid


def test_a_start_whose_answer_was_lost_is_not_sent_again(tmp_path):
    # Found by test_group_model: the member started the file but its
    # answer did not come back (a timeout).  The member prints the job:
    # it is that job's print, not a busy member's, and it is not queued
    # to be printed a second time.
    farm = Farm(tmp_path, n=1, auto_start_next=True)
    m0, = farm.members
    fake = farm.fakes[0]
    real_start = fake.start
    def answer_lost(remote):
        real_start(remote)
        fake.start = real_start
        raise MemberError("m0 is unreachable: no answer in time")
    fake.start = answer_lost
    a = farm.job("a")
    farm.tick()
    assert a.status == "printing" and m0.current is a
    assert farm.store.queue == []
    fake.finish()
    farm.tick()
    farm.tick()
    assert a.status == "wait_cleanup" and farm.store.queue == []
    assert fake.calls.count(("start", "%s/a.gcode" % (REMOTE_DIR,))) == 1


def test_this_printer_passes_over_jobs_named_for_members(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    klipper = FakeKlipper()
    life = JobLifecycle(klipper, farm.store, lambda job: None)
    pinned = farm.job("pinned", target=m0.uuid)
    anyone = farm.job("anyone")
    farm.fakes[0].reachable = False      # (m0 takes nothing meanwhile)
    farm.tick()
    klipper.follow(life)
    klipper.run_callbacks()
    assert anyone.status == "printing" and anyone.printer == HOST
    assert pinned.status == "queued" and farm.store.queue == [pinned]
    # the same answer on every tick: the queue is scanned once per change
    klipper.finish()
    klipper.follow(life)
    asked = []
    life.fits = lambda job, snap: asked.append(job.name) and False
    big = farm.job("big")
    life.plate_cleared()
    for _ in range(4):
        klipper.follow(life)
    assert asked == ["big"] and big.status == "queued"
    assert pinned.status == "queued" and klipper.filename == "anyone.gcode"


def test_a_job_named_for_a_member_it_does_not_fit_says_so(tmp_path):
    # (sent before the member was ever reached: its reach was not known)
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    big = farm.job("big", target=m0.uuid,
                   bounds=[0., 0., 0., 400., 10., 10.])
    farm.tick()
    assert big.status == "queued" and "does not fit" in big.message
    assert "needs X 0.0..400.0 mm, m0 reaches 0.0..300.0" in big.message
    # its reach is kept while it cannot be reached
    farm.fakes[0].reachable = False
    farm.tick()
    assert m0.reach == ([0., 0., 0.], [300., 300., 300.])
    assert not farm.group.fits(m0, big)[0]


def test_a_start_that_got_no_answer_and_never_ran_goes_back(tmp_path):
    from _cura_connection.members import MemberError
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    fake = farm.fakes[0]

    def lost(remote):
        raise MemberError("m0 is unreachable: no answer in time")
    fake.start = lost
    a = farm.job("a")
    farm.tick()
    assert a.status == "pre_print" and a.starting == "unanswered"
    # its G-code queue still runs a command (heating): the start may come
    fake.busy = True
    a.sent_at -= 60.
    farm.tick()
    assert a.status == "pre_print"
    # idle without it: not started, back to the queue, never twice
    fake.busy = False
    farm.tick()
    assert a.status == "queued" and "start got no answer" in a.message
    assert m0.plate_clear and m0.current is None


def test_a_members_card_shows_why_it_is_unreachable_at_once(tmp_path):
    farm = Farm(tmp_path, n=1)
    m0, = farm.members
    api = farm.api()

    class Req:
        @staticmethod
        def reachable_ip():
            return "10.0.0.5"
    farm.fakes[0].reachable = False
    farm.tick()
    card = json.loads(api.replies.printers(api.bridge.snapshot, Req))[1]
    assert card["status"] == "unreachable"
    assert card["state_message"] == "connection refused"
    farm.fakes[0].poll = lambda: dict(FakeMoonraker.poll(farm.fakes[0]),
                                      error="refused the API key (401)")
    farm.tick()
    card = json.loads(api.replies.printers(api.bridge.snapshot, Req))[1]
    assert card["state_message"] == "refused the API key (401)"
