"""A model-based test of a group: this printer and three members.

A hypothesis state machine interleaves what Cura, the consoles, the
members' own Klipper and the network do to a group: real clients' files
(real_inputs: UFPs as Cura's UFPWriter writes them, Griffin and Marlin
G-code with CuraEngine's bounding box, PrusaSlicer G-code without one)
uploaded through CuraApi.add_upload for "Automatic" or a printer named as
Cura's printer picker names it (some fitting no printer, some only the
big one); this printer's status timer (fakes.FakeKlipper + the module's
JobLifecycle) and each member's follower step (PrinterGroup._tick over a
fakes.FakeMoonraker); prints ending on either; pause, resume and abort
as Cura's PUT /action routes them; queue moves, deletes and Override;
plates cleared from the web page, the host's console and the member's
own; members unreachable, restarted, shut down, refusing a file, gone
once the file is there, starting a file whose answer is lost; prints
started on a member's or this printer's own console; materials set on
members; a host restart (the store saved and read back by a new JobStore
and PrinterGroup over the same members), also while a member is sent a
job.

After every step:
  - every job is in exactly one place (a printer, the queue, the
    history) and by_uuid is exactly those jobs;
  - printer_jobs() links a printer only to the job it has or holds, one
    job per printer, and lists every other queued job once; Cura's
    /print_jobs lists them so (printer_uuid on those jobs only) and
    /printers has a card per printer;
  - a job the upload named a printer for runs on no other printer, and no
    job runs where its box does not fit;
  - once its follower has stepped since, a member prints exactly the file
    of the job the store says is on it;
  - no printer prints the file of a queued job (it would print twice);
  - no job starts twice (successful starts counted on each printer) and
    an ended job never comes back (an interrupted print is not restarted
    by itself).  One exception, which no follower can tell apart: this
    printer stopped just after a member started a job (saved as still
    being sent) and the member's Klipper restarted before any follower
    saw the print: its job goes back to the queue and is sent again;
  - what is saved reads back field for field (the one change: this
    printer's own active job ends failed on a load);
and every action either took effect on the printer or was refused with
Conflict, leaving the printer (and, when the store was up to date, the
job) as it was.

150 examples of up to 40 steps by default (about 30 s); a longer run:
    CURA_GROUP_MODEL_EXAMPLES=2000 pytest tests/unit/test_group_model.py
"""
import json
import os
import shutil
import tempfile
import types

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, invariant,
                                 precondition, rule)

import gcode_samples as gs
import real_inputs
from fakes import FakeKlipper, FakeMoonraker

from _cura_connection.errors import Conflict, NotFound
from _cura_connection.gcode_meta import fits
from _cura_connection.group import (
    GroupMember, MEMBER_EXTRUDERS, PrinterGroup, REMOTE_DIR)
from _cura_connection.jobs import ACTIVE, ENDED, JobStore
from _cura_connection.lifecycle import JobLifecycle
from _cura_connection.materials import LoadedMaterials, parse_material_words


HOST = "00000000-0000-4000-8000-000000000000"
HOST_NAME = "test"          # real_inputs.cura_api's printer
HOST_MAX = [235., 235., 250.]
# name -> (axis_maximum, auto_start_next): a small one (Griffin's box,
# X 9..173, does not fit), a big one, a low one (Z 58 does not fit)
MEMBERS = {"voron": ([150., 150., 150.], True),
           "ender-3": ([300., 300., 300.], True),
           "mk4.s": ([200., 200., 40.], False)}
HISTORY = 5
SAMPLES = real_inputs.samples()


def _marlin(key, maxx):
    # Cura's Marlin-flavour header with a wider box: fits only the big
    # member (maxx 280), or no printer (900)
    header = gs.cura_marlin_header(2345).replace(";MAXX:129.9",
                                                 ";MAXX:%d" % (maxx,))
    return real_inputs.Sample(key, key + ".gcode",
                              (header + gs.moves(20, 0)).encode(), None,
                              2345)


FORMS = dict({k: SAMPLES[k] for k in (
    "ufp_pla", "ufp_petg", "griffin_one", "marlin", "prusaslicer")},
    wide=_marlin("wide_part", 280), huge=_marlin("huge_part", 900))
# Materials SET_CURA_MATERIAL gives (GUIDs of the forms', and types)
MATERIAL_WORDS = [{"GUID": gs.ULTIMAKER_PLA_BLACK}, {"GUID": gs.GENERIC_PETG},
                  {"GUID": gs.GENERIC_PLA}, {"MATERIAL": "PLA"},
                  {"MATERIAL": "PETG", "BRAND": "Generic"},
                  {"MATERIAL": "empty"}]
PRINTING = ("printing", "pausing", "paused")


class Req:
    """What CuraApi's handlers read of a request."""
    client_address = ("127.0.0.1", 40000)

    def __init__(self, body=None):
        self.body = body

    def require_control(self, waiting_ok=False):
        return None

    def read_json(self, optional=False):
        return self.body

    @staticmethod
    def reachable_ip():
        return "127.0.0.1"


class HostKlipper(FakeKlipper):
    """This printer's Klipper, with its reach, counting the files it
    started (for the job the store had on it then)."""
    def __init__(self, machine):
        FakeKlipper.__init__(self)
        self.machine = machine

    def publish_now(self):
        snap = FakeKlipper.publish_now(self)
        snap["axis_minimum"] = [0., 0., 0.]
        snap["axis_maximum"] = list(HOST_MAX)
        snap["extruders"] = [{"temperature": 21., "target": 0.}]
        snap["heater_bed"] = {"temperature": 21., "target": 0.}
        return snap

    def run_script_from_command(self, script):
        FakeKlipper.run_script_from_command(self, script)
        if script.startswith("SDCARD_PRINT_FILE"):
            job = self.machine.store.current
            assert job is not None and script.endswith("=" + job.filename)
            self.machine.started(HOST, job)


class MemberMoonraker(FakeMoonraker):
    """A member's Moonraker that counts the starts of the jobs the group
    sends it and answers its console's macros."""
    def __init__(self, machine, name, axis_maximum):
        FakeMoonraker.__init__(self, name, axis_maximum)
        self.machine = machine
        self.replies = []
        # the next send: its start's answer is lost (the member started
        # it), or the member is gone once the file is there
        self.fault = None

    def upload(self, path, remote, folder=""):
        FakeMoonraker.upload(self, path, remote, folder)
        if self.fault == "gone after the file":
            event("a member gone once the file was there")
            self.fault = None
            self.reachable = False

    def start(self, remote):
        FakeMoonraker.start(self, remote)
        m = self.machine.group.by_name[self.name]
        job = m.current
        sent = job is not None and job.starting == "running" \
            and m.remote_file(job) == remote
        if sent:
            self.machine.started(m.uuid, job)
        if sent and self.fault == "start answer lost":
            event("a start's answer was lost")
            self.fault = None
            from _cura_connection.members import MemberError
            raise MemberError("%s is unreachable: no answer in time"
                              % (self.name,))

    def gcode_script(self, script):
        self._check()
        self.replies.append(script)


class GroupModel(RuleBasedStateMachine):
    def __init__(self):
        RuleBasedStateMachine.__init__(self)
        self.root = tempfile.mkdtemp(prefix="group-model-")
        self.gcodes = os.path.join(self.root, "gcodes")
        self.data = os.path.join(self.gcodes, ".cura_connection")
        os.makedirs(os.path.join(self.data, "members"))
        self.fakes = {name: MemberMoonraker(self, name, axis)
                      for name, (axis, _) in MEMBERS.items()}
        self.starts = {}        # job uuid -> successful starts
        self.ended = set()      # uuids of jobs seen ended
        # member uuid -> a job it started that no follower has seen since
        # this printer stopped; the jobs whose member reset before then
        self.unseen = {}
        self.ambiguous = set()
        self.synced = {}        # printer uuid -> followed since it changed
        self.restarts = 0
        self.load()

    def teardown(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def load(self):
        """The parts as load_config() makes them, from the saved files."""
        self.members = self.make_members()
        self.store = JobStore(os.path.join(self.data, "queue.json"),
                              HISTORY, False, HOST, self.members)
        self.group = PrinterGroup(self.store, self.members, self.gcodes,
                                  HOST_NAME)
        self.klipper = HostKlipper(self)
        self.loaded = LoadedMaterials(
            os.path.join(self.data, "loaded_materials.json"),
            [("extruder", None)])
        self.life = JobLifecycle(
            self.klipper, self.store, lambda job: None,
            self.loaded.configuration_changes, lambda job, snap: fits(
                job.bounds, snap.get("axis_minimum"),
                snap.get("axis_maximum"), HOST_NAME)[0])
        self.api = real_inputs.cura_api(
            self.gcodes, self.data, store=self.store, bridge=self.klipper,
            lifecycle=self.life, group=self.group, loaded=self.loaded,
            definition=types.SimpleNamespace(id=HOST_NAME))
        self.synced = {}

    def make_members(self):
        return [GroupMember(name, "http://127.0.0.1:%d" % (7125 + i), None,
                            HOST, auto, LoadedMaterials(
                                os.path.join(self.data, "members",
                                             name + ".json"),
                                [(n, None) for n in MEMBER_EXTRUDERS]),
                            client=self.fakes[name])
                for i, (name, (_, auto)) in enumerate(MEMBERS.items())]

    def started(self, printer_uuid, job):
        self.starts[job.uuid] = self.starts.get(job.uuid, 0) + 1
        if job.uuid in self.ambiguous:
            # (the one start no one can tell from a send that did not
            # reach it: see the module doc)
            event("a start that was never seen: sent again")
            self.ambiguous.discard(job.uuid)
            return
        assert self.starts[job.uuid] == 1, ("started twice", job.to_dict())
        assert job.uuid not in self.ended, ("ended job restarted",
                                            job.to_dict())

    def member(self, n):
        return self.members[n % len(self.members)]

    def jobs(self):
        cur, queue, history = self.store.all_jobs()
        return cur + queue + history

    def pick(self, n, jobs):
        return jobs[n % len(jobs)] if jobs else None

    # Cura

    @rule(key=st.sampled_from(sorted(FORMS)),
          printer=st.sampled_from(["", HOST_NAME, "nope"] + list(MEMBERS)),
          owner=st.sampled_from(["alice", "Ünïcode user"]))
    def upload(self, key, printer, owner):
        sample = FORMS[key]
        after = {"require_printer_name": printer} if printer else None
        queued = len(self.store.queue)
        try:
            reply = real_inputs.upload(self.api, sample, owner=owner,
                                       after=after)
        except NotFound:
            event("upload: unknown printer")
            assert printer == "nope" and len(self.store.queue) == queued
            return
        except Conflict as e:
            event("upload: %s" % (e,))
            assert "fits no printer" in str(e), e
            assert len(self.store.queue) == queued
            return
        assert printer != "nope"
        job = self.store.get(reply["uuid"])
        assert job.status == "queued" and job in self.store.queue
        if printer == HOST_NAME:
            assert job.target == HOST
        elif printer:
            assert job.target == self.group.named(printer).uuid
        else:
            assert job.target == ""
        assert [m.get("guid") for m in job.materials] == sample.guids
        # it fits a printer it may go to: one whose reach is known (a
        # member not polled yet, or unreachable now, is taken at its word)
        where = [p for p in self.printers() if job.target in ("", p[0])]
        if all(limits is not None for _, limits in where):
            assert any(fits(job.bounds, [0., 0., 0.], limits)[0]
                       for _, limits in where), job.to_dict()
        else:
            event("upload: accepted while a printer's reach was unknown")

    def printers(self):
        """[(uuid, axis_maximum as the store's side knows it, or None)]."""
        return [(HOST, HOST_MAX)] + [(m.uuid, m.status.get("axis_maximum"))
                                     for m in self.members]

    @precondition(lambda self: self.jobs())
    @rule(n=st.integers(0, 1000),
          action=st.sampled_from(["pause", "print", "abort"]),
          fresh=st.booleans())
    def action(self, n, action, fresh):
        """PUT .../action as Cura sends it (the route decides whose job),
        on the state the store has (fresh: the printer's status step
        just ran: then a refused action leaves the job as it was)."""
        jobs = self.jobs()
        active = [j for j in jobs if j.status in ACTIVE]
        ended = [j for j in jobs if j.status in ENDED]
        job = self.pick(n // 5, (jobs, ended, active, active, active)[n % 5]
                        or jobs)
        member = self.store.printer_of(job)
        if fresh:
            if member is None:
                self.host_tick()
            else:
                self.member_tick(self.members.index(member))
            member = self.store.printer_of(job)
        printer_before = self.printer_state(member)
        job_before = self.job_fields(job)
        try:
            status, reply = self.api.put_action(Req({"action": action}),
                                                job.uuid)
        except Conflict as e:
            event("%s %s on a %s job: refused" % (
                "member" if member else "host", action, job.status))
            assert self.printer_state(member) == printer_before, (
                action, str(e))
            assert job.action is None
            if fresh:
                assert self.job_fields(job) == job_before, (action, str(e))
            return
        event("%s %s: %s" % ("member" if member else "host", action,
                             job.status))
        assert reply == {"status": job.status}
        state = self.printer_state(member)[0]
        if action == "pause":
            assert (status, job.status) in ((200, "paused"),
                                            (202, "pausing"))
            assert state == "paused"
        elif action == "print":
            assert job.status == "printing" or job.status in ENDED
            assert job.status != "printing" or state == "printing"
        else:
            assert job.status in ENDED or job.status in ENDED.values()
            assert state not in ("printing", "paused")
        assert job.action is None

    def printer_state(self, member):
        if member is None:
            k = self.klipper
            return k.state, k.filename, k.active, k.is_paused
        f = member.client
        return f.state, f.filename, f.is_paused

    @staticmethod
    def job_fields(job):
        # (a status step updates the times of a printing job)
        return {k: v for k, v in job.to_dict().items()
                if k not in ("time_elapsed", "time_total")}

    @precondition(lambda self: self.jobs())
    @rule(n=st.integers(0, 1000), to=st.integers(0, 6),
          what=st.sampled_from(["move", "delete", "force", "unforce"]))
    def change_queue(self, n, to, what):
        job = self.pick(n, self.store.queue if self.store.queue and n % 4
                        else self.jobs())
        try:
            if what == "move":
                self.api.post_move(Req({"to_position": to}), job.uuid)
            elif what == "delete":
                self.api.delete_print_job(Req(), job.uuid)
            else:
                self.api.put_print_job(Req({"force": what == "force"}),
                                       job.uuid)
        except Conflict:
            # (a job on a printer: not moved, not deleted)
            assert what in ("move", "delete") and job not in self.store.queue
            assert self.store.find(job.uuid) is job
            return
        if what == "move" and job in self.store.queue:
            assert self.store.queue.index(job) == min(
                to, len(self.store.queue) - 1)
        elif what == "delete":
            assert job not in self.store.queue
            assert self.store.find(job.uuid) is None \
                or job in self.store.history

    # This printer

    @rule()
    def host_tick(self):
        self.klipper.follow(self.life)
        self.synced[HOST] = True

    @precondition(lambda self: self.klipper.state in ("printing", "paused"))
    @rule(state=st.sampled_from(["complete", "cancelled", "error"]),
          duration=st.integers(0, 10 ** 5))
    def host_print_ends(self, state, duration):
        # its end, or CANCEL_PRINT / an error on this console
        k = self.klipper
        if k.state == "paused" and state == "complete":
            state = "cancelled"
        k.finish(state, duration)
        k.is_paused = False
        self.synced[HOST] = False

    @precondition(lambda self: self.klipper.state not in ("printing",
                                                          "paused"))
    @rule()
    def host_starts_its_own(self):
        # a print started from this printer's Mainsail
        k = self.klipper
        k.filename, k.state, k.active, k.duration = \
            "my prints/benchy.gcode", "printing", True, 0.
        self.synced[HOST] = False

    @rule()
    def host_plate_cleared(self):
        # CURA_BUILD_PLATE_CLEARED, or the web page's button
        try:
            self.api.post_plate_cleared(Req(), HOST)
        except Conflict:
            assert self.store.has_active()
            return
        assert self.store.current is None or self.store.current.status \
            in ACTIVE

    @rule(words=st.sampled_from(MATERIAL_WORDS))
    def host_material(self, words):
        self.loaded.set("extruder", parse_material_words(words))

    @rule()
    def host_restart(self):
        """RESTART, kill -9...: the store, the members' materials as saved;
        the members go on as they were."""
        self.store.save()
        for m in self.members:
            m.loaded.save()
        self.loaded.save()
        before = self.store.state()
        self.load()
        self.restarts += 1
        self.expect_round_trip(before, self.store.state())

    @precondition(lambda self: self.store.queue)
    @rule(n=st.integers(0, 2), stage=st.sampled_from(
        ["claimed", "sent", "started"]), meanwhile=st.sampled_from(
            [None, "complete", "cancelled", "restart"]))
    def host_stops_while_sending(self, n, stage, meanwhile):
        """This printer stops while a member's follower sends it a job:
        once it took the job, once the file is there, once the member
        started it (before the store heard); meanwhile, the member's
        print may end or its Klipper restart."""
        for i in range(n, n + len(self.members)):
            # (the first member from n on that takes a job)
            m = self.member(i)
            f = m.client
            if not (f.reachable and f.kstate == "ready"):
                continue
            # the follower's own steps: what _tick follows, then claims
            self.group._follow(m, f.poll())
            job = self.store.claim(m, lambda j: self.group.fits(m, j)[0]
                                   and not m.loaded.configuration_changes(j))
            if job is not None:
                break
        else:
            return
        n = self.members.index(m)
        event("this printer stopped while sending: %s" % (stage,))
        f.fault = None          # (the follower's faults: member_send_faults)
        if stage != "claimed" and not f.fail_upload:
            f.upload(os.path.join(self.gcodes, job.filename), job.filename,
                     REMOTE_DIR)
            if stage == "started" and f.state not in ("printing", "paused"):
                self.store.set_starting(job, "running")
                f.start(m.remote_file(job))
                self.unseen[m.uuid] = job.uuid
        self.host_restart()
        if meanwhile == "restart":
            self.member_klipper(n, "restart")
        elif meanwhile is not None:
            self.member_print_ends(n, meanwhile)

    # The members

    @rule()
    def a_second_passes(self):
        # every status step once
        self.host_tick()
        for n in range(len(self.members)):
            self.member_tick(n)

    @rule(n=st.integers(0, 2))
    def member_tick(self, n):
        m = self.member(n)
        self.group._tick(m)
        self.synced[m.uuid] = True
        if m.client.reachable and m.client.kstate == "ready":
            self.unseen.pop(m.uuid, None)
        event("member tick: %s" % (m.current and m.current.status,))

    @rule(n=st.integers(0, 2),
          state=st.sampled_from(["complete", "cancelled", "error"]))
    def member_print_ends(self, n, state):
        f = self.member(n).client
        if f.state in ("printing", "paused"):
            f.state, f.is_paused = state, False
            f.progress = 1. if state == "complete" else 0.4
            f.duration = 33.
            self.synced[self.member(n).uuid] = False

    @rule(n=st.integers(0, 2), how=st.sampled_from(
        ["web page", "host console", "member console"]))
    def member_plate_cleared(self, n, how):
        """The web page's button (the member is asked first),
        CURA_BUILD_PLATE_CLEARED PRINTER= (the store only), the member's
        own console (MEMBER_MACROS, answered there)."""
        m = self.member(n)
        replies = len(m.client.replies)
        refused = False
        try:
            if how == "web page":
                self.api.post_plate_cleared(Req(), m.uuid)
            elif how == "host console":
                self.group.plate_cleared(m, wait=False)
            else:
                self.group._called_plate_cleared(m, {})
                if m.client.reachable:
                    assert len(m.client.replies) == replies + 1
                    refused = "is printing" in m.client.replies[-1]
        except Conflict:
            assert how != "member console"
            refused = True
        if refused:
            assert m.current is not None and m.current.status in ACTIVE
        elif how != "member console" or m.client.reachable:
            assert m.plate_clear and m.current is None
        else:
            # (cleared, or refused: unanswered where nobody listens)
            assert (m.plate_clear and m.current is None) or (
                m.current is not None and m.current.status in ACTIVE)

    @rule(n=st.integers(0, 2), words=st.sampled_from(MATERIAL_WORDS),
          console=st.booleans())
    def member_material(self, n, words, console):
        m = self.member(n)
        if console:
            # the member's own SET_CURA_MATERIAL macro
            self.group._called_set_material(m, {k.lower(): v for k, v
                                                in words.items()})
        else:
            # SET_CURA_MATERIAL PRINTER=<member> on this console
            m.loaded.set("extruder", parse_material_words(words))
        assert m.loaded.get(0) == parse_material_words(words)

    @rule(n=st.integers(0, 2), reachable=st.booleans())
    def member_network(self, n, reachable):
        self.member(n).client.reachable = reachable
        self.synced[self.member(n).uuid] = False

    @rule(n=st.integers(0, 2), kstate=st.sampled_from(
        ["shutdown", "startup", "disconnected", "ready", "restart"]))
    def member_klipper(self, n, kstate):
        f = self.member(n).client
        if kstate in ("restart", "shutdown") \
                and self.member(n).uuid in self.unseen:
            self.ambiguous.add(self.unseen.pop(self.member(n).uuid))
        if kstate == "restart":
            f.restart_klipper()
            f.kstate = "ready"
        else:
            if kstate == "shutdown":
                f.restart_klipper()   # (its print is lost)
            f.kstate = kstate
        self.synced[self.member(n).uuid] = False

    @rule(n=st.integers(0, 2), fault=st.sampled_from(
        [None, "refuses files", "start answer lost", "gone after the file"]))
    def member_send_faults(self, n, fault):
        m = self.member(n)
        m.client.fail_upload = "No space left on device" \
            if fault == "refuses files" else None
        m.client.fault = fault
        m.retry_at = 0.     # (the retry delay has passed)
        if fault is not None:
            # its next status step (a send, when a job is there for it)
            self.member_tick(n)

    @precondition(lambda self: any(
        m.client.state not in ("printing", "paused") for m in self.members))
    @rule(n=st.integers(0, 2))
    def member_starts_its_own(self, n):
        # a print started from the member's Mainsail
        f = self.member(n).client
        if f.state in ("printing", "paused") or not f.reachable \
                or f.kstate != "ready":
            return
        f.files["benchy.gcode"] = b"G28\n"
        f.start("benchy.gcode")
        self.synced[self.member(n).uuid] = False

    # The saved state

    def expect_round_trip(self, before, after):
        cur = before["current"]
        if cur is not None and cur["status"] in ACTIVE:
            # (a new printer object cannot still be printing it)
            got = after["current"]
            assert got["status"] == "failed_wait_cleanup"
            for key in ("status", "message", "finished_at"):
                cur[key] = got[key]
        assert after == before

    @invariant()
    def saved_state_reads_back(self):
        self.store.save()
        fresh = JobStore(self.store.path, HISTORY, False, HOST,
                         [GroupMember(m.name, m.url, None, HOST,
                                      m.auto_start_next, None, client=True)
                          for m in self.members])
        self.expect_round_trip(self.store.state(), fresh.state())
        assert not os.path.exists(self.store.path + ".bad")
        for m in self.members:
            m.loaded.save()
            assert LoadedMaterials(m.loaded.path, [
                (n, None) for n in MEMBER_EXTRUDERS]).state() \
                == m.loaded.state()

    # Invariants

    @invariant()
    def every_job_in_one_place(self):
        places = []
        if self.store.current is not None:
            places.append(self.store.current)
        places += [m.current for m in self.members if m.current is not None]
        places += self.store.queue + self.store.history
        assert len({id(j) for j in places}) == len(places)
        assert len({j.uuid for j in places}) == len(places)
        assert self.store.by_uuid == {j.uuid: j for j in places}
        for job in self.store.queue:
            assert job.status == "queued" and not job.started
        for job in self.store.history:
            assert job.status in ENDED.values()
        for m in self.members:
            if m.current is not None:
                assert m.current.printer == m.uuid
                assert self.store.printer_of(m.current) is m
        if self.store.current is not None:
            assert self.store.current.printer in ("", HOST)

    @invariant()
    def printer_jobs_link_each_printer_once(self):
        linked, others = self.store.printer_jobs()
        printers = [p for p, _ in linked]
        assert len(set(printers)) == len(printers)
        slots = {HOST: (self.store.current, self.store.held)}
        slots.update({m.uuid: (m.current, m.held) for m in self.members})
        for printer, job in linked:
            current, held = slots[printer]
            assert job is current or (job is held
                                      and job in self.store.queue
                                      and job.target in ("", printer)), (
                printer, job.to_dict())
        shown = [j for _, j in linked] + others
        assert len({id(j) for j in shown}) == len(shown)
        assert all(j in shown for j in self.store.queue)

    @invariant()
    def cura_is_told_the_same(self):
        # Cura's /print_jobs and /printers as they are served
        linked, others = self.store.printer_jobs()
        jobs = json.loads(b"".join(self.api.print_jobs_reply(lambda: None)))
        assert [j["uuid"] for j in jobs] == [
            j.uuid for j in [job for _, job in linked] + others]
        pointing = [(j["printer_uuid"], j["uuid"]) for j in jobs
                    if "printer_uuid" in j]
        assert pointing == [(p, job.uuid) for p, job in linked]
        cards = json.loads(self.api.replies.printers(
            self.klipper.snapshot, Req))
        assert [c["uuid"] for c in cards] == [HOST] + [
            m.uuid for m in self.members]

    @invariant()
    def jobs_run_where_they_may(self):
        reach = {HOST: HOST_MAX}
        reach.update({m.uuid: m.client.axis_maximum for m in self.members})
        for job in self.jobs():
            if job.target and job.printer:
                assert job.printer == job.target, job.to_dict()
            if job.printer and job.source == "cura" and job.started:
                assert fits(job.bounds, [0., 0., 0.], reach[job.printer])[0],\
                    job.to_dict()

    @invariant()
    def members_print_what_the_store_says(self):
        for m in self.members:
            f = m.client
            if not self.synced.get(m.uuid) or not f.reachable \
                    or f.kstate != "ready":
                continue
            cur = m.current
            if cur is not None and cur.starting == "unanswered":
                # (a start that got no answer: undecided until the member
                # shows it printing, or its G-code queue idle for a while)
                continue
            if f.state in ("printing", "paused"):
                assert cur is not None and cur.status in ACTIVE, (
                    m.name, f.state, f.filename, cur and cur.to_dict())
                assert m.remote_file(cur) == f.filename
            else:
                assert cur is None or cur.status not in ACTIVE, (
                    m.name, f.state, cur.to_dict())

    @invariant()
    def no_queued_job_is_printing(self):
        # (it would be printed a second time)
        printing = {"%s/%s" % (REMOTE_DIR, job.filename)
                    for job in self.store.queue}
        for m in self.members:
            f = m.client
            if f.state in ("printing", "paused"):
                assert f.filename not in printing, (m.name, f.filename)
        k = self.klipper
        if k.state in ("printing", "paused"):
            assert k.filename not in {j.filename for j in self.store.queue}

    @invariant()
    def ended_jobs_stay_ended(self):
        for job in self.jobs():
            if job.uuid in self.ended:
                assert job.status in ENDED or job.status in ENDED.values(), \
                    job.to_dict()
            elif job.status in ENDED:
                self.ended.add(job.uuid)


GroupModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("CURA_GROUP_MODEL_EXAMPLES", "150")),
    stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=list(HealthCheck))
test_group_model = GroupModel.TestCase
