# A group of printers: this one and the members of group_printers,
# reached through their Moonraker.
#
# One follower thread per member polls its Moonraker, brings the job on
# it in line with what it says (as JobLifecycle does for this printer),
# and sends it the next job that is for it.  Actions on a member's job
# run in the request thread that asked; a plate cleared from the console
# only changes the store and wakes the follower.  The reactor does nothing
# per member.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import logging
import os
import re
import threading
import time
import uuid

from .camera import CameraProxy, camera_snapshot_url
from .errors import Conflict, CuraError, NotFound
from .gcode_meta import fits
from .jobs import (
    ACTIONS, ACTION_VERBS, ACTIVE, END_OF_PRINT, Job, PrinterSlot,
    action_answer, action_failed, check_action)
from .lifecycle import ACTION_SETTLE, klipper_print_state
from .materials import parse_material_words
from .member_calls import MemberCalls, REPLY_MACRO
from .members import (
    MemberError, MoonrakerMember, empty_status, parse_member_url)
from .names import job_name
from .threads import never_reactor


# Where the files sent to a member go, in its G-code folder (its own
# files of the same names stay untouched)
REMOTE_DIR = "cura_connection"
POLL_INTERVAL = 1.
# After a send failed, the member gets its next job this much later
RETRY_AFTER = 30.
# A start Moonraker did not answer (it answers once Klipper ran it, after
# what its G-code queue is doing): decided by what the member then shows;
# not started if its queue is idle this long after
UNANSWERED_START = 5.
# How often a member's webcam list is read again
WEBCAM_CHECK = 60.
# A member's card is redrawn at most this often for its temperatures and
# progress alone (Cura polls every 2 s or so)
CARD_REFRESH = 2.
# The extruders a member's loaded materials are kept for (its Klipper's
# names; its card shows as many as its Moonraker lists)
MEMBER_EXTRUDERS = ["extruder"] + ["extruder%d" % i for i in range(1, 8)]
# Moonraker's webcam services that serve MJPEG (None: an older Moonraker)
MJPEG_SERVICES = (None, "mjpegstreamer", "mjpegstreamer-adaptive",
                  "uv4l-mjpeg")
MEMBER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def member_uuid(host_uuid, name):
    # Stable while the member keeps its name in group_printers
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "cura-connection:member:%s/%s"
                          % (host_uuid, name)))


def parse_entries(text, what):
    """name -> value of 'name=value' entries, comma or line separated;
    ValueError says what is wrong."""
    out = {}
    for entry in re.split(r"[,\n]", text or ""):
        entry = entry.strip()
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not value:
            raise ValueError("%s: '%s' is not <name>=<value>" % (what, entry))
        if not MEMBER_NAME_RE.match(name):
            raise ValueError("%s: '%s' is not a printer name (letters, "
                             "digits, '-', '_', '.')" % (what, name))
        if name in out:
            raise ValueError("%s: %s is named twice" % (what, name))
        out[name] = value
    return out


def parse_group(printers_text, keys_text, auto_start_text, host_name):
    """[(name, Moonraker URL, API key or None, auto_start_next)] of the
    group_printers, group_api_keys and group_auto_start_next options."""
    printers = parse_entries(printers_text, "group_printers")
    keys = parse_entries(keys_text, "group_api_keys")
    auto = parse_entries(auto_start_text, "group_auto_start_next")
    for option, names in (("group_api_keys", keys),
                          ("group_auto_start_next", auto)):
        for name in names:
            if name not in printers:
                raise ValueError("%s: %s is not in group_printers"
                                 % (option, name))
    out = []
    seen = {}
    for name, url in printers.items():
        try:
            where = parse_member_url(url)
        except ValueError as e:
            raise ValueError("group_printers: %s: %s" % (name, e))
        where = (where[0].lower(), where[1])
        if where in seen:
            # (two followers would send jobs to one printer)
            raise ValueError("group_printers: %s and %s are one Moonraker "
                             "(%s)" % (seen[where], name, url))
        seen[where] = name
        if name == host_name:
            raise ValueError("group_printers: %s is this printer's name"
                             % (name,))
        flag = auto.get(name, "false").lower()
        if flag not in ("true", "false", "1", "0"):
            raise ValueError("group_auto_start_next: %s=%s is not true or "
                             "false" % (name, flag))
        out.append((name, url, keys.get(name), flag in ("true", "1")))
    return out


def print_state(status):
    ps = status.get("print_stats") or {}
    return ps.get("state"), ps.get("filename")


def member_printing(status):
    # The member's Klipper prints (or pauses) a file now
    return status["reachable"] and status["klippy_state"] == "ready" \
        and klipper_print_state(status) in ("printing", "pausing", "paused")


class GroupMember(PrinterSlot):
    """A member printer: its slot in the store (the job on it, its plate),
    its Moonraker, what it said last and its follower thread."""
    def __init__(self, name, url, api_key, host_uuid, auto_start_next,
                 loaded, client=None):
        PrinterSlot.__init__(self, member_uuid(host_uuid, name), name,
                             auto_start_next)
        self.url = url
        self.api_key = api_key
        self.client = client or MoonrakerMember(name, url, api_key)
        self.calls = None           # MemberCalls: its console's macros
        # LoadedMaterials of MEMBER_EXTRUDERS: SET_CURA_MATERIAL PRINTER=
        # on this console, or the member's own through its macro
        self.loaded = loaded
        self.status = empty_status("not reached yet")
        # (axis_minimum, axis_maximum) its Klipper showed last: kept while
        # it cannot be reached (a file it cannot print is refused then too)
        self.reach = (None, None)
        self.seq = 0                # its card changed
        self.card_at = 0.
        # Held while the follower or an action decides on the member's
        # state (not while a file is sent)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.retry_at = 0.
        self.camera = None          # CameraProxy of its webcam, or None
        self.webcam_at = 0.
        self.thread = None

    def remote_file(self, job):
        # The member's name of a job's file
        if job.source == "klipper":
            return job.filename
        return "%s/%s" % (REMOTE_DIR, job.filename)


class PrinterGroup:
    """The members of the group and their followers.  Threads: the
    followers; request threads (act, plate_cleared, route, the cards);
    the reactor only for the console's commands: plate_cleared(wait=False)
    and a member's materials (memory only, no network), and CURA_QUEUE's
    line per member."""
    def __init__(self, store, members, gcodes, host_name):
        self.store = store
        self.members = members          # [GroupMember], in card order
        self.by_uuid = {m.uuid: m for m in members}
        self.by_name = {m.name: m for m in members}
        self.gcodes = gcodes
        self.host_name = host_name
        self.closing = False
        self.version = 0               # a card changed

    def start(self, calls=True):
        for m in self.members:
            m.thread = threading.Thread(
                target=self._run, args=(m,), daemon=True,
                name="cura_connection member %s" % (m.name,))
            m.thread.start()
            if calls:
                m.calls = MemberCalls(m.name, m.url, m.api_key, {
                    "cura_plate_cleared": lambda params, m=m:
                        self._called_plate_cleared(m, params),
                    "cura_set_material": lambda params, m=m:
                        self._called_set_material(m, params)})
                m.calls.start()

    def close(self):
        self.closing = True
        for m in self.members:
            m.wake.set()
            m.client.close()        # (ends a request under way)
            if m.calls is not None:
                m.calls.stop()
        for m in self.members:
            if m.thread is not None:
                m.thread.join(10.)
            if m.calls is not None:
                m.calls.close()

    # Which printer: by uuid (actions, plate clears) or name (uploads)
    def member(self, printer_uuid):
        return self.by_uuid.get(printer_uuid)

    def named(self, name):
        """The member called name; NotFound for none."""
        m = self.by_name.get(name)
        if m is None:
            raise NotFound("No printer %s in this group" % (name,))
        return m

    # Follower thread
    def _run(self, member):
        while not self.closing:
            try:
                self._tick(member)
            except Exception:
                logging.exception("cura_connection: following %s",
                                  member.name)
            member.wake.wait(POLL_INTERVAL)
            member.wake.clear()

    @never_reactor
    def _tick(self, member):
        status = member.client.poll()
        if self.closing:
            return
        with member.lock:
            self._follow(member, status)
            job = None
            if status["reachable"] and status["klippy_state"] == "ready" \
                    and time.monotonic() >= member.retry_at:
                job = self.store.claim(member, lambda j: self.fits(
                    member, j)[0] and not member.loaded.configuration_changes(
                        j))
            self._hold(member)
        if job is not None:
            try:
                self._send(member, job)
            except Exception:
                logging.exception("cura_connection: sending %s to %s",
                                  job.filename, member.name)
                with member.lock:
                    if member.current is job and job.starting:
                        self.store.member_requeue(
                            member, job, "Internal error; see klippy.log")
                        member.retry_at = time.monotonic() + RETRY_AFTER
        self._check_webcam(member, status)

    def _hold(self, member):
        # The first job named for member waits there for its material
        # (shown on its card, where Cura offers Override); one that turned
        # out not to fit it (sent before its reach was known) says why
        store = self.store
        head = store.next_for(member.uuid, lambda j: j.target == member.uuid)
        if head is not None:
            ok, why = self.fits(member, head)
            if not ok:
                store.note(head, "Waits for %s, which it does not fit: %s "
                           "(delete it)" % (member.name, why))
                head = None
        store.member_hold(member, head if head is not None and
                          member.loaded.configuration_changes(head) else None)

    def _set_status(self, member, status):
        old = member.status
        member.status = status
        if status["axis_minimum"] is not None \
                and status["axis_maximum"] is not None:
            member.reach = (status["axis_minimum"], status["axis_maximum"])
        # (its card: redrawn at once for a change of its state, at most
        # every CARD_REFRESH for its temperatures and progress alone)
        now = time.monotonic()
        if any(old.get(k) != status.get(k) for k in (
                "reachable", "error", "klippy_state", "state_message",
                "pause_resume")) \
                or print_state(old) != print_state(status) or (
                    now >= member.card_at and any(
                        old.get(k) != status.get(k) for k in (
                            "print_stats", "virtual_sdcard", "extruders",
                            "heater_bed"))):
            member.seq += 1
            member.card_at = now + CARD_REFRESH
            self.version += 1

    def _follow(self, member, status):
        # Under member.lock: the job on member in line with its status
        store = self.store
        self._set_status(member, status)
        cur = member.current
        if not status["reachable"]:
            return
        active = cur is not None and cur.status in ACTIVE
        kstate = status["klippy_state"]
        if kstate != "ready":
            # (startup, disconnected: Moonraker (re)connecting to a Klippy
            # that may print on: its state decides once ready)
            if active and not cur.starting and kstate in ("shutdown",
                                                          "error"):
                store.end(cur, "failed_wait_cleanup", "%s: Klipper is %s%s"
                          % (member.name, kstate, status["state_message"]
                             and " (%s)" % (status["state_message"],)))
            return
        state = klipper_print_state(status)
        ps = status["print_stats"]
        if cur is not None and cur.starting == "unanswered":
            if not self._started_late(member, cur, status):
                return
            active = True
        if cur is not None and (cur.starting or cur.action):
            return      # the sender or the action decides
        if state in ("printing", "pausing", "paused"):
            if not active or member.remote_file(cur) != ps.get("filename"):
                cur = self._external(member, cur, ps.get("filename") or "")
            store.set_status(cur, state)
            store.set_times(cur, ps.get("print_duration") or 0,
                            status["virtual_sdcard"].get("progress"))
            return
        if not active:
            return
        if cur.status == "pre_print" and (
                member.remote_file(cur) != ps.get("filename")
                or state == "standby"):
            # loaded as it was being sent when this Klippy stopped (a
            # file the member ran and ended is ended below, not re-sent)
            store.member_requeue(member, cur, "Not started on %s: sending "
                                 "it was interrupted" % (member.name,))
            return
        if member.remote_file(cur) != ps.get("filename") \
                or state == "standby":
            store.end(cur, "failed_wait_cleanup", "Interrupted on %s (its "
                      "Klipper restarted or reset the file)" % (member.name,))
            return
        if state == "complete":
            store.set_times(cur, ps.get("print_duration") or 0, 1.)
        else:
            store.set_reached(cur, ps.get("print_duration"),
                              status["virtual_sdcard"].get("progress"))
        store.end(cur, END_OF_PRINT.get(state, "aborted_wait_cleanup"),
                  ps.get("message") or "")

    def _started_late(self, member, job, status):
        # A start without an answer: True once the member shows it ran
        # (the job is then printing, or ended there); put back in the
        # queue once its G-code queue is idle without it
        ps = status["print_stats"]
        if ps.get("filename") == member.remote_file(job) and ps.get(
                "state") in ("printing", "paused", "complete", "cancelled",
                             "error"):
            self.store.set_status(job, "printing")
            self.store.set_starting(job, None)
            return True
        if member_printing(status):
            self.store.member_requeue(member, job, "Waiting: %s was busy "
                                      "with another print" % (member.name,))
        elif not status.get("busy") and time.monotonic() - job.sent_at \
                > UNANSWERED_START:
            self.store.member_requeue(member, job, "Not started on %s: "
                                      "its start got no answer" % (
                                          member.name,))
            member.retry_at = time.monotonic() + RETRY_AFTER
        return False

    def _external(self, member, cur, filename):
        # Started from the member's Mainsail, Fluidd, KlipperScreen...
        if cur is not None and cur.status in ACTIVE:
            self.store.end(cur, "aborted_wait_cleanup", "%s started %s" % (
                member.name, filename))
        job = Job(name=job_name(filename), filename=filename,
                  owner=member.name, source="klipper")
        self.store.member_external(member, job)
        return job

    def _send(self, member, job):
        # Follower thread, without member.lock: the file to the member's
        # G-code folder (Moonraker keeps no half file), then the start
        remote = member.remote_file(job)
        local = os.path.join(self.gcodes, job.filename)
        if not os.path.isfile(local):
            # (deleted from Mainsail...): no member can print it
            with member.lock:
                if member.current is job and job.starting == "waiting":
                    self.store.member_start_failed(
                        member, job, "Its file is gone from this printer's "
                        "G-code folder")
            return
        try:
            member.client.upload(local, job.filename, REMOTE_DIR)
        except (MemberError, OSError) as e:
            with member.lock:
                if member.current is job and job.starting == "waiting":
                    logging.info("cura_connection: cannot send %s to %s: %s",
                                 job.filename, member.name, e)
                    self.store.member_requeue(member, job, "Could not send "
                                              "it to %s: %s" % (
                                                  member.name, e))
                    member.retry_at = time.monotonic() + RETRY_AFTER
            return
        with member.lock:
            if member.current is not job or job.starting != "waiting":
                self._forget(member, remote)    # aborted while sent
                return
            self.store.set_starting(job, "running")
            try:
                member.client.start(remote)
            except MemberError as e:
                if e.status is None:
                    # no answer: what the member shows decides
                    job.sent_at = time.monotonic()
                    self.store.set_starting(job, "unanswered")
                    self._follow(member, member.client.poll())
                    member.wake.set()
                    return
                self.store.set_starting(job, None)
                status = member.client.poll()
                if member_printing(status) and status["print_stats"].get(
                        "filename") == remote:
                    # it started: only its answer was lost
                    self.store.set_status(job, "printing")
                elif member_printing(status):
                    self.store.member_requeue(member, job, "Waiting: %s was "
                                              "busy (%s)" % (member.name, e))
                else:
                    self.store.member_start_failed(member, job, str(e))
                self._follow(member, status)
                return
            self.store.set_status(job, "printing")
            self.store.set_starting(job, None)
        logging.info("cura_connection: %s sent to %s", job.filename,
                     member.name)
        member.wake.set()

    def _forget(self, member, remote):
        try:
            member.client.delete(remote)
        except MemberError as e:
            logging.info("cura_connection: %s: %s", member.name, e)

    def _check_webcam(self, member, status):
        now = time.monotonic()
        if not status["reachable"] or now < member.webcam_at:
            return
        member.webcam_at = now + WEBCAM_CHECK
        # Cura's camera view shows MJPEG: the first such webcam (a
        # webcam of no service named is taken for one)
        cams = [c for c in member.client.webcams()
                if c.get("service") in MJPEG_SERVICES
                and isinstance(c.get("stream_url"), str)]
        stream = cams[0]["stream_url"] if cams else None
        if not stream:
            member.camera = None
        elif member.camera is None or member.camera.stream_url != stream:
            member.camera = CameraProxy(stream, cams[0].get(
                "snapshot_url") or camera_snapshot_url(stream))

    # Request threads: what fits where
    def fits(self, member, job):
        """(True, "") or (False, why) for job's file on member."""
        return fits(job.bounds, member.reach[0], member.reach[1],
                    member.name)

    # Request threads: actions on a member's job
    @never_reactor
    def act(self, member, job, action):
        """As JobLifecycle.act, through member's Moonraker: (2xx, status)
        once it did it, or Conflict saying why nothing was done."""
        store = self.store
        verb = ACTION_VERBS[action]
        with member.lock:
            if job.starting == "waiting":
                if action != "abort":
                    raise Conflict("Cannot %s print job %s: it is being "
                                   "sent to %s" % (verb, job.name,
                                                   member.name))
                # the sender sees it and removes the file it sent
                store.end(job, "aborted_wait_cleanup",
                          "Aborted before it started")
                return 200, job.status
            status = member.client.poll()
            self._follow(member, status)
            self._check(member, job, action, status)
            before = job.status
            store.set_status(job, ACTIONS[action][1], action)
            try:
                try:
                    getattr(member.client, {"pause": "pause",
                                            "print": "resume",
                                            "abort": "cancel"}[action])()
                except MemberError as e:
                    if e.status is not None:
                        raise Conflict("%s did not %s print job %s: %s" % (
                            member.name, verb, job.name, e))
                    # (no answer: what the member then shows decides)
                status = self._settle(member, action)
            finally:
                if job.action == action:
                    store.set_status(job, before, None)
            self._follow(member, status)
        member.wake.set()
        answer = action_answer(job, action, member.current is not job)
        if answer is not None:
            return answer
        raise action_failed(job, action, member.name)

    def _check(self, member, job, action, status):
        if not status["reachable"]:
            why = "%s is unreachable (%s)" % (member.name, status["error"])
        elif status["klippy_state"] != "ready":
            why = "%s's Klipper is %s" % (member.name,
                                          status["klippy_state"])
        elif job is not member.current:
            why = "it is not on %s (it is %s)" % (member.name, job.status)
        else:
            why = None
        check_action(job, action, why)

    def _settle(self, member, action):
        # Polls until the member shows the action's effect (a pause waits
        # for the command its file is running)
        want = {"pause": ("paused",), "print": ("printing",)}.get(
            action, ("standby", "complete", "cancelled", "error"))
        deadline = time.monotonic() + ACTION_SETTLE
        while True:
            status = member.client.poll()
            if not status["reachable"] or status["klippy_state"] != "ready" \
                    or klipper_print_state(status) in want \
                    or time.monotonic() >= deadline:
                return status
            time.sleep(0.1)

    # Plate cleared: the web page (wait: as the member says now), the
    # console (no wait: the reactor must not)
    def plate_cleared(self, member, wait=True):
        if wait:
            with member.lock:
                self._follow(member, member.client.poll())
        self.store.member_plate_cleared(member)
        member.wake.set()

    # A member's own console (MEMBER_MACROS), in its calls thread: the
    # same operations as on this console, answered on the member's
    def _called_plate_cleared(self, member, params):
        try:
            self.plate_cleared(member)
            reply = "Build plate marked clear; %d job(s) queued" % (
                len(self.store.queue),)
        except CuraError as e:
            reply = e.message
        self._reply(member, reply)

    def _called_set_material(self, member, params):
        name = str(params.get("extruder") or "extruder")
        words = {str(k).upper(): str(v) for k, v in params.items()
                 if k != "extruder"}
        try:
            member.loaded.set(name, parse_material_words(words))
            reply = "%s: material set for Cura" % (name,)
        except ValueError as e:
            reply = str(e)
        except CuraError as e:
            reply = e.message
        member.wake.set()
        self._reply(member, reply)

    def _reply(self, member, text):
        # (a message G-code's parser reads whole: no quotes or comments)
        text = re.sub(r'["#;*\n\r]', " ", text)[:200]
        try:
            member.client.gcode_script('%s MSG="Cura group: %s"' % (
                REPLY_MACRO, text))
        except MemberError as e:
            logging.info("cura_connection: answering %s: %s", member.name,
                         e)

    # The cards
    def card_key(self):
        # (the cards show each member's plate, camera, loaded materials
        # and whether a job is on it)
        return self.version, tuple(
            (m.plate_clear, m.camera is not None, m.loaded.version,
             m.current and (m.current.uuid, m.current.status))
            for m in self.members)
