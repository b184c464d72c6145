# The job lifecycle: the one owner of job transitions.
#
# Follows Klipper's print, starts the next job, carries out Cura's
# actions on what Klipper says at that moment, and the console's queue
# commands (CURA_BUILD_PLATE_CLEARED, CURA_QUEUE).  Reactor only.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import contextlib
import logging

from .bridge import ScriptError, NoCall
from .errors import Conflict, CuraError, NotFound
from .jobs import (
    ACTIONS, ACTION_VERBS, ACTIVE, END_OF_PRINT, Job, action_answer,
    action_failed, check_action)
from .names import job_name
from .threads import reactor_only


def klipper_print_state(snap):
    """What Klipper's print is doing: printing (also while a start or a
    resume is on its way: virtual_sdcard is active), pausing (PAUSE
    accepted, the file finishes its current command), paused, or
    print_stats' state after a print: standby, complete, cancelled,
    error."""
    state = snap["print_stats"].get("state") or "standby"
    if snap["virtual_sdcard"].get("is_active"):
        if snap["pause_resume"].get("is_paused"):
            return "pausing"
        return "printing"
    return state


# How long an action waits for Klipper to show its effect (a pause waits
# for the command the file is running)
ACTION_SETTLE = 3.


class JobLifecycle:
    """The one owner of job transitions.  Everything here runs in the
    reactor, where Klipper's state is read at the moment of deciding:
    the status timer (follow), G-code commands, and calls HTTP handlers
    submit through KlippyBridge.call().  Nothing here writes to disk."""
    def __init__(self, bridge, store, want_metadata,
                 changes=lambda job: [], fits=lambda job, snap: True):
        self.bridge = bridge
        self.store = store
        self.reactor = bridge.reactor
        # want_metadata(job): read the file's estimate/preview off the
        # reactor, then store.set_metadata() through the reactor
        self.want_metadata = want_metadata
        # changes(job): the configuration changes a queued job waits for
        # (memory only: it runs here); [] lets it start
        self.changes = changes
        # fits(job, snap): the job's file fits this printer (in a group,
        # the jobs that fit no other printer were refused at the upload)
        self.fits = fits

    # Reactor: following Klipper
    @reactor_only
    def follow(self, snap):
        """Bring the job on the printer in line with Klipper's state now
        and start the next queued job when the plate is clear."""
        store = self.store
        cur = store.current
        kstate = snap["klippy_state"]
        if kstate in ("shutdown", "error"):
            if cur is not None and cur.status in ACTIVE:
                store.set_reached(cur, snap["print_stats"].get(
                    "print_duration"), snap["virtual_sdcard"].get(
                        "progress"))
                store.end(cur, "failed_wait_cleanup", snap["state_message"])
            return
        if kstate != "ready" or not self.bridge.ready():
            return
        if cur is not None and (cur.starting or cur.action):
            return      # Klipper's answer decides (_run_start, act)
        state = klipper_print_state(snap)
        ps = snap["print_stats"]
        if state in ("printing", "pausing", "paused"):
            if cur is None or cur.status not in ACTIVE \
                    or cur.filename != ps.get("filename"):
                cur = self._external(cur, ps.get("filename") or "")
            store.set_status(cur, state)
            store.set_times(cur, ps.get("print_duration") or 0,
                            snap["virtual_sdcard"].get("progress"))
            return
        if cur is not None and cur.status in ACTIVE:
            self._ended(cur, state, snap)
        # (in a group: the first job for this printer; the others'
        # followers take theirs)
        head = store.next_for(store.host_uuid, lambda job: self.fits(
            job, snap), cached=True) if store.queue else None
        if head is not None and self.changes(head):
            # until the material is loaded or forced
            store.hold_for_material(head)
        elif store.plate_clear and head is not None \
                and not head.arriving and not store.has_active():
            store.hold_for_material(None)
            self._start(head)
        else:
            store.hold_for_material(None)

    def _ended(self, job, state, snap):
        # time_elapsed is Klipper's print_duration.  print_stats forgets
        # it on a reset (standby) and counts a last pause into it when a
        # paused print is cancelled: keep the value seen before then.
        ps = snap["print_stats"]
        if state == "complete":
            self.store.set_times(job, ps.get("print_duration") or 0, 1.)
        elif state == "error":
            # the file stays where it failed
            self.store.set_reached(job, ps.get("print_duration"),
                                   snap["virtual_sdcard"].get("progress"))
        else:
            self.store.set_reached(job, ps.get("print_duration") if (
                state == "cancelled" and job.status != "paused") else None)
        self.store.end(job, END_OF_PRINT.get(state, "aborted_wait_cleanup"),
                       ps.get("message") or "")

    def _external(self, cur, filename):
        # Started from Mainsail, KlipperScreen, a macro...
        if cur is not None and cur.status in ACTIVE:
            self.store.end(cur, "aborted_wait_cleanup",
                           "Klipper started %s" % (filename,))
        job = Job(name=job_name(filename), filename=filename,
                  owner="Klipper", source="klipper")
        self.store.add_external(job)
        self.want_metadata(job)
        return job

    # Reactor: starting a job
    def _start(self, job):
        if not self.store.begin_start(job):
            return      # a group member took it
        # its own reactor callback: it may wait for the G-code queue
        self.reactor.register_callback(lambda e: self._run_start(job))

    def _run_start(self, job):
        try:
            self._hand_to_klipper(job)
        except Exception:
            logging.exception("cura_connection: starting %s", job.filename)
            if job.starting:
                self.store.end(job, "failed_wait_cleanup",
                               "Internal error; see klippy.log")

    def _hand_to_klipper(self, job):
        error = None
        with self.bridge.gcode_mutex():
            if self.store.current is not job or job.starting != "waiting":
                return      # aborted while it waited for the G-code queue
            if klipper_print_state(self.bridge.publish_now()) in (
                    "printing", "pausing", "paused"):
                error = "SD busy"
            else:
                self.store.set_starting(job, "running")
                try:
                    self._clear_stale_pause()
                    self.bridge.command(
                        "SDCARD_PRINT_FILE FILENAME=%s" % (job.filename,))
                except ScriptError as e:
                    error = str(e)
        snap = self.bridge.publish_now()
        busy = klipper_print_state(snap) in ("printing", "pausing", "paused")
        if error is None and busy:
            self.store.set_status(job, "printing")
            self.store.set_starting(job, None)
        elif error is not None and busy:
            logging.info("cura_connection: %s waits: Klipper is printing "
                         "another file (%s)", job.filename, error)
            self.store.requeue(job, "Waiting: Klipper was busy (%s)"
                               % (error,))
        else:
            logging.info("cura_connection: cannot start %s: %s",
                         job.filename, error or "it did not start")
            self.store.start_failed(job, error
                                    or "Klipper did not start the file")
        self.follow(snap)

    # Reactor: actions of Cura, the web page and the console
    @reactor_only
    def act(self, call, job_uuid, action):
        """Pause ("pause"), resume ("print") or abort ("abort") the job on
        the printer.  Returns (2xx, status) once Klipper did it: 200, or
        202 while a pause waits for the file's current command; raises
        Conflict (nothing done) or NotFound."""
        job = self.store.get(job_uuid)
        # Decided on Klipper's state at the moment it is carried out:
        # inside the G-code mutex neither the file nor the console can
        # move the print on.  A start still waiting for the G-code queue
        # is not Klipper's yet: an abort of it needs no queue.
        waiting = job.starting == "waiting"
        status = None
        try:
            with (contextlib.nullcontext() if waiting
                  else self.bridge.gcode_mutex()):
                if not call.commit():
                    return None     # withdrawn: the caller has answered
                snap = None if waiting else self._at_rest()
                if snap is not None:
                    self.follow(snap)
                self._check(job, action, snap)
                if job.starting == "waiting":
                    # (abort) Klipper has not got the file: it never will
                    self.store.end(job, "aborted_wait_cleanup",
                                   "Aborted before it started")
                    return 200, job.status
                status = job.status
                self.store.set_status(job, ACTIONS[action][1], action)
                self._carry_out(job, action, snap)
            if action == "pause":
                # the file finishes the command it is running
                self._settle(lambda s: klipper_print_state(s) == "pausing")
        finally:
            if status is not None and job.action == action:
                # (not ended meanwhile)
                self.store.set_status(job, status, None)
        self.follow(self.bridge.publish_now())
        answer = action_answer(job, action, job is not self.store.current)
        if answer is not None:
            return answer
        if action == "pause":
            # its print ended before it paused: the pause is no one's
            with self.bridge.gcode_mutex():
                self._clear_stale_pause()
        raise action_failed(job, action, "Klipper")

    def _at_rest(self):
        # Inside the G-code mutex the file runs no command, but a Klipper
        # that reads it in a worker thread may be about to find its end
        # (a PAUSE or CANCEL_PRINT then meets a print that completes
        # under it): wait for that, then Klipper's state stands.
        deadline = self.reactor.monotonic() + ACTION_SETTLE
        snap = self.bridge.publish_now()
        while snap["virtual_sdcard"].get("is_active") \
                and (snap["virtual_sdcard"].get("file_position") or 0) \
                >= (snap["virtual_sdcard"].get("file_size") or 0) \
                and self.reactor.monotonic() < deadline:
            self.reactor.pause(self.reactor.monotonic() + 0.01)
            snap = self.bridge.publish_now()
        return snap

    def _check(self, job, action, snap):
        """Conflict (saying why) unless action applies to job now."""
        if snap is not None and snap["klippy_state"] != "ready":
            why = "Klipper is %s (%s)" % (snap["klippy_state"],
                                          snap["state_message"])
        elif job is not self.store.current:
            why = "it is not on the printer (it is %s)" % (job.status,)
        elif job.action is not None:
            why = "Klipper is still carrying out a %s (it is %s)" % (
                ACTION_VERBS[job.action], job.status)
        else:
            why = None
        check_action(job, action, why)

    def _carry_out(self, job, action, snap):
        # Inside the G-code mutex, with Klipper's print (snap) in the
        # state the action needs: its commands for that state
        bridge = self.bridge
        pause_resume = bridge.has_pause_resume()
        if action == "pause":
            script = "PAUSE" if pause_resume else "M25"
        elif action == "print":
            # RESUME only undoes Klipper's PAUSE; M24 resumes a file that
            # paused itself (M25) or was paused any other way
            script = "RESUME" if pause_resume \
                and snap["pause_resume"]["is_paused"] else "M24"
        else:
            if klipper_print_state(snap) in ("printing", "pausing"):
                self.store.set_times(job, snap["print_stats"].get(
                    "print_duration") or 0, snap["virtual_sdcard"].get(
                        "progress"))
            try:
                # the user's CANCEL_PRINT macro (heaters off...) first
                bridge.command("CANCEL_PRINT")
            except ScriptError as e:
                logging.info("cura_connection: CANCEL_PRINT: %s", e)
            if klipper_print_state(bridge.publish_now()) not in (
                    "printing", "pausing", "paused"):
                return
            # CANCEL_PRINT leaves a file that paused itself loaded
            script = "SDCARD_RESET_FILE"
        try:
            bridge.command(script)
        except ScriptError as e:
            raise Conflict("%s failed: %s" % (script, e))

    def _clear_stale_pause(self):
        # Inside the G-code mutex.  A PAUSE that found no print to pause
        # (typed as a print ended; a print that failed before it paused)
        # leaves pause_resume paused: the next print would show pausing
        # and refuse PAUSE.  It belongs to no print: clear it.
        snap = self.bridge.publish_now()
        if snap["pause_resume"]["is_paused"] and klipper_print_state(
                snap) not in ("printing", "pausing", "paused"):
            logging.info("cura_connection: clearing a pause of no print")
            self.bridge.command("CLEAR_PAUSE")

    def _settle(self, busy):
        deadline = self.reactor.monotonic() + ACTION_SETTLE
        while busy(self.bridge.publish_now()) \
                and self.reactor.monotonic() < deadline:
            self.reactor.pause(self.reactor.monotonic() + 0.05)

    @reactor_only
    def plate_cleared(self, call=NoCall):
        """Retire the ended job, let the queue go on; Conflict while a job
        is on its way or printing (as Klipper says now)."""
        if not call.commit():
            return
        self._catch_up()
        self.store.plate_cleared()
        self.follow(self.bridge.publish_now())

    @reactor_only
    def add(self, call, job, limit):
        """An upload's job joins the queue (Conflict when it holds limit
        jobs); the status timer starts it once it is no longer arriving."""
        if not call.commit():
            return
        job.arriving = True
        self.store.add(job, limit)

    @reactor_only
    def change(self, call, fn, *args):
        """A queue change (move, delete, force) made in the reactor, on
        the jobs as Klipper's state now makes them."""
        if not call.commit():
            return None
        self._catch_up()
        result = fn(*args)
        self.follow(self.bridge.publish_now())
        return result

    def _catch_up(self):
        # The job on the printer may have ended since the last status
        # tick: a queue change or plate clear decides on what Klipper
        # says now
        cur = self.store.current
        if cur is not None and cur.status in ACTIVE:
            self.follow(self.bridge.publish_now())


class JobCommands:
    """CURA_BUILD_PLATE_CLEARED and CURA_QUEUE: the console's hand on and
    view of the queue.  Reactor (G-code commands): bad input raises only
    gcmd.error.  shown() waits until the front shows the change."""
    COMMANDS = ("CURA_BUILD_PLATE_CLEARED", "CURA_QUEUE")

    def __init__(self, lifecycle, store, loaded, shown, group=None):
        self.lifecycle = lifecycle
        self.store = store
        self.loaded = loaded
        self.shown = shown
        self.group = group      # PrinterGroup (PRINTER=) or None

    cmd_CURA_BUILD_PLATE_CLEARED_help = (
        "Confirm the build plate is empty so the next Cura job can start"
        " (PRINTER=<name>: a printer of the group)")
    def cmd_CURA_BUILD_PLATE_CLEARED(self, gcmd):
        name = gcmd.get("PRINTER", None)
        try:
            host = self.group.host_name if self.group else None
            if name is not None and name != host:
                if self.group is None:
                    raise NotFound("No printer %s" % (name,))
                # (the store only: its follower asks the member)
                self.group.plate_cleared(self.group.named(name), wait=False)
            else:
                self.lifecycle.plate_cleared()
        except CuraError as e:
            raise gcmd.error(e.message)
        self.shown()
        n = len(self.store.queue)
        gcmd.respond_info("Build plate %smarked clear; %d job(s) queued" % (
            "of %s " % (name,) if name else "", n))

    cmd_CURA_QUEUE_help = "List the jobs Cura sent to this printer"
    def cmd_CURA_QUEUE(self, gcmd):
        store = self.store
        queue = store.all_jobs()[1]
        cur = store.current
        lines = ["Printer: %s (%s)" % (
            cur.name, cur.status) if cur else "Printer: no job"]
        # (a group's members: one line each, as configured)
        members = self.group.members if self.group else []
        names = {m.uuid: m.name for m in members}
        for m in members:
            job = m.current
            lines.append("%s: %s%s" % (m.name, "%s (%s)" % (
                job.name, job.status) if job else "no job", "" if (
                    m.plate_clear or (job and job.status in ACTIVE)) else
                ", waiting for CURA_BUILD_PLATE_CLEARED PRINTER=%s"
                % (m.name,)))
        # (a reactor command: the first jobs only, however long the queue)
        shown = store.STATUS_JOBS
        lines += ["%d. %s (%s, from %s%s)" % (
            i + 1, j.name, j.status, j.owner,
            ", for %s" % (names[j.target],) if j.target in names else "")
            for i, j in enumerate(queue[:shown])]
        if len(queue) > shown:
            lines.append("... and %d more" % (len(queue) - shown,))
        held = [(store.held or (queue[0] if queue and not members
                                else None), self.loaded)]
        held += [(m.held, m.loaded) for m in members]
        for job, loaded in held:
            for index, wanted, have in (job and loaded.configuration_changes(
                    job)) or ():
                lines.append("%s waits for %s in extruder %d "
                             "(SET_CURA_MATERIAL or Override in Cura)" % (
                                 job.name, wanted.get("name") or wanted.get(
                                     "material") or wanted.get("guid"),
                                 index))
        if not queue:
            lines.append("Queue is empty")
        if not store.plate_clear and queue and not (
                cur and cur.status in ACTIVE):
            lines.append("Waiting for CURA_BUILD_PLATE_CLEARED")
        gcmd.respond_info("\n".join(lines))
