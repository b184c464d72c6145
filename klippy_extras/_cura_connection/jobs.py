# Jobs: the queue, the job on each printer of the group and the history.
#
# Job and JobStore with what is saved in queue.json and how it is read
# back.  This printer's job and the queue change in the reactor, through
# the lifecycle (two exceptions: arrived(), a flag a request thread sets
# under its lock, and set_metadata(), which a reactor callback of the disk
# worker calls with what it read in a print's file); a group member's job
# and plate (PrinterSlot), and the queued job a member takes, change in
# that member's follower thread or an action's request thread (group.py),
# under the store's lock.  Any thread reads it; the disk worker and
# request threads save it.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import json
import logging
import re
import threading
import time
import uuid

from .errors import Conflict, NotFound
from .gate import Breather
from .gcode_meta import checked_bounds, valid_job_materials
from .names import (
    GCODE_EXTENSIONS, preview_beside, safe_base_name, safe_relative_path)
from .storage import SavedState


# A job's life (JobLifecycle makes every change, in the reactor):
#   queued -> pre_print (start handed to Klipper) -> printing <-> paused
#   -> wait_cleanup | aborted_wait_cleanup | failed_wait_cleanup (on the
#   plate) -> finished | aborted | failed (history, after plate cleared)
ACTIVE = ("pre_print", "printing", "pausing", "paused", "resuming",
          "aborting")


# Status shown on the printer card after a print -> status in the history
ENDED = {"wait_cleanup": "finished", "aborted_wait_cleanup": "aborted",
         "failed_wait_cleanup": "failed"}
END_OF_PRINT = {"complete": "wait_cleanup",
                "cancelled": "aborted_wait_cleanup",
                "standby": "aborted_wait_cleanup",
                "error": "failed_wait_cleanup"}
JOB_FIELDS = ("uuid", "name", "filename", "owner", "created_at", "status",
              "source", "time_estimate", "time_elapsed", "time_total",
              "preview", "started", "force", "message", "finished_at",
              "materials", "target", "printer", "bounds")
JOB_FIELD_SET = frozenset(JOB_FIELDS)
JOB_UUID_RE = re.compile(r"^[0-9a-fA-F-]{1,64}$")


# Jobs' times as Cura's models expect them (ISO 8601, UTC)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.000000Z"


def iso_time(epoch=None):
    return time.strftime(TIME_FORMAT, time.gmtime(epoch))


class Job:
    def __init__(self, **fields):
        # Its saved JSON bytes (JobStore.encode), None after any change of
        # a saved field: a save encodes only the jobs that changed
        self.saved_json = None
        self.uuid = str(uuid.uuid4())
        self.name = self.filename = ""
        self.owner = "Cura"
        self.created_at = iso_time()
        self.status = "queued"
        self.source = "cura"
        self.time_estimate = self.time_elapsed = self.time_total = 0
        self.preview = None
        self.started = self.force = False
        self.message = ""
        self.finished_at = None
        # What the file asks of the extruders it uses: parse_job_materials,
        # named by MaterialStore.name_job_materials
        self.materials = []
        # In a group: the printer (uuid) the upload named ("": any, Cura's
        # "Automatic"); the printer that has it or had it ("": not yet);
        # the box its file prints in, [min x, y, z, max x, y, z] or None
        self.target = self.printer = ""
        self.bounds = None
        for k, v in fields.items():
            if k in JOB_FIELDS:
                setattr(self, k, v)
        # Not persisted: "waiting" while the start waits for the G-code
        # queue, "running" while Klipper runs SDCARD_PRINT_FILE; the
        # action (pausing, resuming, aborting) Klipper is carrying out;
        # the file's progress Klipper showed last (0..1).
        self.starting = None
        self.action = None
        self.progress = None
        # An upload's job until its queue is saved: it does not start
        # before (a job that cannot be saved is taken back)
        self.arriving = False
        # (a group member's job: when its start got no answer, starting
        # "unanswered"; group.py decides on what the member shows)
        self.sent_at = 0.

    def __setattr__(self, name, value):
        if name in JOB_FIELD_SET:
            object.__setattr__(self, "saved_json", None)
        object.__setattr__(self, name, value)

    def to_dict(self):
        return {k: getattr(self, k) for k in JOB_FIELDS}

    def summary(self):
        return {"uuid": self.uuid, "name": self.name, "owner": self.owner,
                "status": self.status, "filename": self.filename}


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) \
        and v == v and 0 <= v < 1e12


# Saved job field -> check of its value
SAVED_JOB_FIELDS = {
    "uuid": lambda v: isinstance(v, str) and JOB_UUID_RE.match(v),
    "name": lambda v: isinstance(v, str) and len(v) <= 300,
    # (a Cura upload's is a safe base name: saved_job checks that)
    "filename": lambda v: safe_relative_path(v) and
    v.lower().endswith(GCODE_EXTENSIONS),
    "owner": lambda v: isinstance(v, str) and len(v) <= 300,
    "created_at": lambda v: isinstance(v, str) and len(v) <= 64,
    "status": lambda v: isinstance(v, str) and (
        v in ACTIVE or v in ENDED or v in ENDED.values() or v == "queued"),
    "source": lambda v: v in ("cura", "klipper"),
    "time_estimate": _is_number, "time_elapsed": _is_number,
    "time_total": _is_number,
    # (in the .thumbs folder beside the job's file: saved_job checks)
    "preview": lambda v: v is None or safe_relative_path(v),
    "started": lambda v: isinstance(v, bool),
    "force": lambda v: isinstance(v, bool),
    "message": lambda v: isinstance(v, str),
    # a number: an epoch saved by an older version, converted on load
    "finished_at": lambda v: v is None or _is_number(v) or (
        isinstance(v, str) and len(v) <= 64),
    "materials": lambda v: valid_job_materials(v),
    "target": lambda v: _printer_ref(v),
    "printer": lambda v: _printer_ref(v),
    # (the check an upload's box passes: gcode_meta.checked_bounds)
    "bounds": lambda v: v is None or (isinstance(v, list)
                                      and checked_bounds(v) is not None),
}


def _printer_ref(v):
    return v == "" or (isinstance(v, str) and bool(JOB_UUID_RE.match(v)))


def saved_job(data, statuses):
    """A Job from a saved dict; ValueError says what is wrong with it.
    Missing fields take their defaults; uuid, filename and status must be
    there and status one of statuses."""
    if not isinstance(data, dict):
        raise ValueError("not an object")
    for key in ("uuid", "filename", "status"):
        if key not in data:
            raise ValueError("no %s" % (key,))
    fields = {}
    for key, check in SAVED_JOB_FIELDS.items():
        if key in data:
            if not check(data[key]):
                raise ValueError("bad %s %r" % (key, data[key]))
            fields[key] = data[key]
    if _is_number(fields.get("finished_at")):
        fields["finished_at"] = iso_time(fields["finished_at"])
    filename = fields["filename"]
    if (fields["status"] == "queued" or fields.get("source", "cura")
            == "cura") and safe_base_name(filename, "", 255) != filename:
        # what the queue starts is a file this module received and named
        raise ValueError("bad filename %r" % (filename,))
    if fields.get("preview") is not None \
            and not preview_beside(fields["preview"], filename):
        raise ValueError("bad preview %r" % (fields["preview"],))
    if fields["status"] not in statuses:
        raise ValueError("status %s is not possible here"
                         % (fields["status"],))
    return Job(**fields)


def estimate_time_total(estimate, elapsed, progress):
    # Blend the slicer's estimate with what the progress so far predicts,
    # trusting the observation more as the print goes on.
    total = float(estimate or 0)
    if progress and progress > 0.01 and elapsed > 0:
        observed = elapsed / progress
        total = observed if not total else (
            (1. - progress) * total + progress * observed)
    return int(max(total, elapsed + 1))


class PrinterSlot:
    """A group member's place in the store: the job on it and whether
    its plate is clear (changed under the store's lock)."""
    def __init__(self, uuid, name, auto_start_next):
        self.uuid = uuid
        self.name = name
        self.auto_start_next = auto_start_next
        self.current = None
        self.plate_clear = True
        self.held = None        # the job named for it that waits there


class JobStore(SavedState):
    """The queue, the job on the printer (current) and the history.

    JobLifecycle changes it in the reactor, a group's followers and
    actions (group.py) for their members in their threads, all under
    self.lock (held for a few lines, never across a reactor pause; of the
    work that grows with the queue, only a copy or a scan of its
    references, at C speed); other threads read with all_jobs(), find()
    and get()."""
    # Jobs listed in get_status() (the reactor's copy stays this small)
    STATUS_JOBS = 10
    def __init__(self, path, history_size, auto_start_next, host_uuid="",
                 members=()):
        SavedState.__init__(self, path, threading.RLock())
        self.history_size = history_size
        self.auto_start_next = auto_start_next
        # this printer's uuid; the group's other printers, by uuid
        self.host_uuid = host_uuid
        self.members = {m.uuid: m for m in members}
        self.current = None
        self.queue = []
        self.history = []
        self.plate_clear = True
        # The queue head while it waits for a configuration change (set
        # by JobLifecycle.follow); then it is the printer's job
        self.held = None
        self.status_cache = {}
        self.by_uuid = {}       # every job in current, queue and history
        self.next_cache = {}    # printer uuid -> (version, next_for's job)
        self._load()

    def _load(self):
        data = self.read_file()
        seen = set()
        def jobs(key, statuses, source=data, label=None):
            label = label or key
            items = source.get(key)
            if items is None:
                items = []
            elif key == "current":
                items = [items]
            if not isinstance(items, list):
                self.discard(label, "not a list")
                return []
            out = []
            for i, d in enumerate(items):
                try:
                    job = saved_job(d, statuses)
                    if job.uuid in seen:
                        raise ValueError("uuid %s twice" % (job.uuid,))
                except ValueError as e:
                    self.discard("%s entry %d" % (label, i + 1), e)
                    continue
                seen.add(job.uuid)
                out.append(job)
            return out
        cur = jobs("current", list(ACTIVE) + list(ENDED))
        self.current = cur[0] if cur else None
        # (the jobs on printers first: a job also listed after them is
        # dropped as a second copy)
        self.history = []
        self._load_members(data.get("printers"), jobs)
        self.queue = jobs("queue", ("queued",))
        self.history += jobs("history", list(ENDED.values()))
        del self.history[self.history_size:]
        self.by_uuid = {j.uuid: j for j in cur + self.queue + self.history}
        self.by_uuid.update((m.current.uuid, m.current) for m in
                            self.members.values() if m.current)
        known = set(self.members) | {self.host_uuid}
        for job in self.queue:
            if job.target and job.target not in known:
                # its printer left group_printers: any printer takes it
                logging.info("cura_connection: %s: its printer %s is no "
                             "longer in the group", job.filename, job.target)
                job.target = ""
                self.dirty = True
        self.plate_clear = data.get("plate_clear", True)
        if not isinstance(self.plate_clear, bool):
            self.discard("plate_clear", "not true or false")
            self.plate_clear = False
        if self.current is not None and self.current.status in ACTIVE:
            # A new printer object cannot still be printing that file.
            self._end(self.current, "failed_wait_cleanup",
                      "Interrupted by a Klipper restart")
            self.dirty = True
        self._update_status_cache()

    def _load_members(self, saved, jobs):
        # Each member's plate and the job on it.  An active job stays
        # active: the member may still print it (its follower decides on
        # what the member says).  A printer that left the group leaves its
        # job in the history.
        if saved is None:
            saved = {}
        if not isinstance(saved, dict):
            self.discard("printers", "not an object")
            saved = {}
        for key, entry in saved.items():
            slot = self.members.get(key)
            if not isinstance(entry, dict):
                self.discard("printers %s" % (key,), "not an object")
                continue
            plate_clear = entry.get("plate_clear", True)
            if not isinstance(plate_clear, bool):
                self.discard("printers %s plate_clear" % (key,),
                             "not true or false")
                plate_clear = False
            found = jobs("current", list(ACTIVE) + list(ENDED), entry,
                         "printers %s current" % (key,))
            job = found[0] if found else None
            if slot is not None:
                slot.current = job
                slot.plate_clear = plate_clear
                if job is not None:
                    job.printer = slot.uuid     # (whatever the file says)
            elif job is not None:
                if job.status in ACTIVE:
                    self._end(job, "failed_wait_cleanup",
                              "Its printer left the group")
                self._retire(job)
                self.dirty = True

    def state(self):
        return {"version": 1, "plate_clear": self.plate_clear,
                "current": self.current and self.current.to_dict(),
                "queue": [j.to_dict() for j in self.queue],
                "history": [j.to_dict() for j in self.history],
                "printers": {m.uuid: {
                    "plate_clear": m.plate_clear,
                    "current": m.current and m.current.to_dict()}
                    for m in self.members.values()}}

    def encode(self):
        """Not the reactor: queue.json as chunks of bytes.  The lock is
        held only to copy references and a changed job's fields (a job at a
        time), never while encoding.  A change meanwhile means the lists
        may not match their jobs' fields: then again, from the new
        state."""
        pause = Breather().breathe     # the reactor gets the GIL often
        def encoded(job):
            data = job.saved_json
            if not isinstance(data, bytes):
                with self.lock:
                    fields = job.to_dict()
                    mark = job.saved_json = object()
                data = json.dumps(fields).encode()
                with self.lock:
                    if job.saved_json is mark:   # (else it changed since)
                        job.saved_json = data
            pause()
            return data
        while True:
            with self.lock:
                version = self.version
                self.dirty = False
                plate_clear = self.plate_clear
                cur = self.current
                lists = (list(self.queue), list(self.history))
                members = [(m.uuid, m.plate_clear, m.current)
                           for m in self.members.values()]
            chunks = [b'{"version": 1, "plate_clear": %s, "current": ' % (
                b"true" if plate_clear else b"false"),
                      b"null" if cur is None else encoded(cur)]
            for key, jobs in zip((b"queue", b"history"), lists):
                chunks.append(b', "%s": [' % (key,))
                chunks += [b", " + encoded(j) if i else encoded(j)
                           for i, j in enumerate(jobs)]
                chunks.append(b"]")
            chunks.append(b', "printers": {')
            for i, (key, clear, job) in enumerate(members):
                chunks += [b'%s"%s": {"plate_clear": %s, "current": ' % (
                    b", " if i else b"", key.encode(),
                    b"true" if clear else b"false"),
                    b"null" if job is None else encoded(job), b"}"]
            chunks.append(b"}}")
            with self.lock:
                if self.version == version:
                    return chunks

    def _update_status_cache(self):
        # get_status() runs in the reactor: hand it a ready-made dict, of
        # a size that does not grow with the queue
        cur = self.current
        self.status_cache = {
            "current_job": cur and cur.summary(),
            "queue": [j.summary() for j in self.queue[:self.STATUS_JOBS]],
            "queue_length": len(self.queue),
            "plate_clear": self.plate_clear,
            "held_job": self.held and self.held.summary()}

    def _changed(self):
        self._update_status_cache()
        self.changed()

    # Any thread: reads
    def all_jobs(self):
        """([the jobs on printers], queue, history)."""
        with self.lock:
            cur = [self.current] if self.current else []
            cur += [m.current for m in self.members.values() if m.current]
            return cur, list(self.queue), list(self.history)

    def printer_jobs(self):
        """([(printer uuid, the job that points at it)], the other jobs of
        the list): per printer the job on it, or for this one the held
        job once the plate is clear (then the ended job is just listed);
        then the queue."""
        with self.lock:
            linked, others = [], []
            held = self.held
            if held is not None and held in self.queue \
                    and self.plate_clear and not self.has_active():
                linked.append((self.host_uuid, held))
                if self.current:
                    others.append(self.current)
            elif self.current:
                linked.append((self.host_uuid, self.current))
            for m in self.members.values():
                cur = m.current
                if m.held is not None and m.held in self.queue \
                        and m.plate_clear and not (cur is not None
                                                   and cur.status in ACTIVE):
                    linked.append((m.uuid, m.held))
                    if cur is not None:
                        others.append(cur)
                elif cur is not None:
                    linked.append((m.uuid, cur))
            queue = list(self.queue)
        # (the queue is scanned outside the lock the reactor takes)
        shown = {id(job) for _, job in linked}
        return linked, others + [j for j in queue if id(j) not in shown]

    def printer_of(self, job):
        """The member slot whose job this is, or None (this printer's,
        or queued, or in the history)."""
        printer = self.members.get(job.printer) if job.printer else None
        if printer is not None and printer.current is job:
            return printer
        return None

    def next_for(self, printer_uuid, fits, cached=False):
        """The first queued job this printer may print: one the upload
        named it for, or any printer's, that fits(job) (None: none).
        cached (for a fits() that cannot change while the store does
        not: this printer's own limits): the answer is kept until the
        store changes, so the reactor's status tick scans the queue (in a
        group, past the jobs named for others) only after a change."""
        with self.lock:
            key = (self.version, printer_uuid)
            hit = self.next_cache.get(printer_uuid)
            if cached and hit is not None and hit[0] == key:
                return hit[1]
            queue = list(self.queue)
        # (fits() is Python per job: outside the lock the reactor takes)
        found = None
        for job in queue:
            if job.target in ("", printer_uuid) and fits(job):
                found = job
                break
        if cached:
            with self.lock:
                self.next_cache[printer_uuid] = (key, found)
        return found

    def find(self, job_uuid):
        return self.by_uuid.get(job_uuid)

    def get(self, job_uuid):
        """The job, or NotFound."""
        job = self.find(job_uuid)
        if job is None:
            raise NotFound("No print job %s" % (job_uuid,))
        return job

    def has_active(self):
        cur = self.current
        return cur is not None and cur.status in ACTIVE

    # Changes (JobLifecycle, in the reactor)
    def add(self, job, limit=None):
        """Append a new job to the queue; Conflict when it holds limit
        jobs."""
        with self.lock:
            if limit is not None and len(self.queue) >= limit:
                raise Conflict("The print queue is full (max_queue: %d)"
                               % (limit,))
            self.queue.append(job)
            self.by_uuid[job.uuid] = job
            self._changed()

    def take_back(self, job):
        """Remove a job that is still queued (an upload whose job could
        not be saved); False when it has left the queue."""
        with self.lock:
            if job not in self.queue:
                return False
            self.queue.remove(job)
            del self.by_uuid[job.uuid]
            self._changed()
            return True

    def move(self, job_uuid, position):
        with self.lock:
            job = self._queued(job_uuid)
            self.queue.remove(job)
            self.queue.insert(min(position, len(self.queue)), job)
            self._changed()

    def delete(self, job_uuid):
        """Remove a queued or ended job; Conflict for one on the printer."""
        with self.lock:
            job = self.get(job_uuid)
            if job in self.queue:
                self.queue.remove(job)
                del self.by_uuid[job.uuid]
            elif job in self.history:
                self.history.remove(job)
                del self.by_uuid[job.uuid]
            elif job.status in ENDED:
                self._retire(job)
            else:
                raise Conflict("Print job %s is %s; abort it first"
                               % (job.name, job.status))
            self._changed()
            return job

    def hold_for_material(self, job):
        """The queue head job waits for a configuration change (None: no
        job waits)."""
        with self.lock:
            if self.held is not job:
                self.held = job
                self._update_status_cache()
                # (not saved, but the job lists show it: a new version)
                self.version += 1

    def set_force(self, job_uuid, force):
        with self.lock:
            job = self.get(job_uuid)
            job.force = force
            self._changed()

    def _queued(self, job_uuid):
        job = self.get(job_uuid)
        if job not in self.queue:
            raise Conflict("Print job %s is not queued" % (job_uuid,))
        return job

    def plate_cleared(self):
        with self.lock:
            cur = self.current
            if cur is not None and cur.status in ACTIVE:
                raise Conflict("A print is running (%s)" % (cur.name,))
            if cur is not None:
                self._retire(cur)
            self.plate_clear = True
            self._changed()

    def _end(self, job, status, message=""):
        job.status = status
        job.starting = job.action = None
        job.message = message or job.message
        job.finished_at = iso_time()
        if status == "wait_cleanup":
            # Cura 4.13 draws a job with time_total > time_elapsed as
            # aborted: a completed one took exactly its time.
            job.time_total = job.time_elapsed
        member = self.printer_of(job)
        if member is not None:
            member.plate_clear = member.auto_start_next
        elif job is self.current:
            self.plate_clear = self.auto_start_next

    def end(self, job, status, message=""):
        with self.lock:
            self._end(job, status, message)
            self._changed()

    def _retire(self, job):
        member = self.printer_of(job)
        if member is not None:
            member.current = None
        if self.current is job:
            self.current = None
        job.status = ENDED.get(job.status, job.status)
        self.history.insert(0, job)
        for old in self.history[self.history_size:]:
            self.by_uuid.pop(old.uuid, None)
        del self.history[self.history_size:]

    def begin_start(self, job):
        """A queued job -> the printer (pre_print, waiting for Klipper);
        False when it left the queue meanwhile (a member took it)."""
        with self.lock:
            if job not in self.queue:
                return False
            self.queue.remove(job)
            if self.current is not None:
                self._retire(self.current)
            self.current = job
            job.status = "pre_print"
            job.started = True
            job.starting = "waiting"
            job.message = ""
            job.printer = self.host_uuid
            self.plate_clear = False
            self._changed()
            return True

    def set_starting(self, job, starting):
        """Where a start stands: "waiting" for the G-code queue, "running"
        while Klipper runs SDCARD_PRINT_FILE, None once it is decided."""
        with self.lock:
            job.starting = starting

    def start_failed(self, job, message):
        """A start Klipper refused: the job ends failed, and the plate,
        on which nothing was printed, stays clear."""
        with self.lock:
            self._end(job, "failed_wait_cleanup", message)
            self.plate_clear = True
            self._changed()

    def arrived(self, job):
        """An upload's job is saved (or taken back): it may start.  (The
        request thread that saved it says so: only a flag the status
        timer reads.)"""
        with self.lock:
            job.arriving = False

    def requeue(self, job, message):
        """A start Klipper refused while busy: back to the queue head."""
        with self.lock:
            if self.current is job:
                self.current = None
            job.status = "queued"
            job.started = False
            job.starting = None
            job.message = message
            self.queue.insert(0, job)
            self.plate_clear = True
            self._changed()

    def add_external(self, job):
        """A print Klipper runs that this store did not start."""
        with self.lock:
            if self.current is not None:
                self._retire(self.current)
            self.current = job
            self.by_uuid[job.uuid] = job
            job.status = "printing"
            job.started = True
            job.printer = self.host_uuid
            self.plate_clear = False
            self._changed()

    # Changes for a group member: its follower thread (group.py), under
    # the lock, as the lifecycle's are for this printer
    def claim(self, member, fits):
        """The next job member may print, moved from the queue onto it
        (pre_print, waiting to be sent), or None: its plate is not clear,
        it has a job, or no queued job is for it.  The first job for it
        that is still arriving is waited for, not passed over."""
        def free():
            cur = member.current
            return member.plate_clear and not (cur is not None
                                               and cur.status in ACTIVE)
        if not free():
            return None
        job = self.next_for(member.uuid, fits)
        with self.lock:
            # (as the store is now: the job may have gone meanwhile)
            if job is None or job.arriving or job not in self.queue \
                    or not free():
                return None
            cur = member.current
            self.queue.remove(job)
            if cur is not None:
                self._retire(cur)
            member.current = job
            if self.held is job:
                self.held = None
            member.held = None
            job.printer = member.uuid
            job.status = "pre_print"
            job.started = True
            job.starting = "waiting"
            job.message = ""
            member.plate_clear = False
            self._changed()
            return job

    def note(self, job, message):
        """A queued job's message (why it waits)."""
        with self.lock:
            if job.message != message:
                job.message = message
                self._changed()

    def member_hold(self, member, job):
        """The job named for member waits there for a configuration
        change (None: none waits)."""
        with self.lock:
            if member.held is not job:
                member.held = job
                self.version += 1     # (the job lists show it)

    def member_requeue(self, member, job, message):
        """A job that did not reach member goes back to the queue head
        (member's plate, on which nothing was printed, stays clear)."""
        with self.lock:
            if member.current is job:
                member.current = None
            job.status = "queued"
            job.started = False
            job.starting = job.action = None
            job.printer = ""
            job.message = message
            self.queue.insert(0, job)
            member.plate_clear = True
            self._changed()

    def member_start_failed(self, member, job, message):
        with self.lock:
            self._end(job, "failed_wait_cleanup", message)
            member.plate_clear = True
            self._changed()

    def member_external(self, member, job):
        """A print member runs that this store did not start."""
        with self.lock:
            if member.current is not None:
                self._retire(member.current)
            member.current = job
            self.by_uuid[job.uuid] = job
            job.printer = member.uuid
            job.status = "printing"
            job.started = True
            member.plate_clear = False
            self._changed()

    def member_plate_cleared(self, member):
        with self.lock:
            cur = member.current
            if cur is not None and cur.status in ACTIVE:
                raise Conflict("%s is printing (%s)" % (member.name,
                                                        cur.name))
            if cur is not None:
                self._retire(cur)
            member.plate_clear = True
            self._changed()

    def set_status(self, job, status, action=None):
        with self.lock:
            job.action = action
            if job.status != status:
                job.status = status
                self._changed()

    def set_times(self, job, elapsed, progress):
        # Changes every second: saved with the next other change
        with self.lock:
            job.time_elapsed = int(elapsed)
            job.progress = progress
            job.time_total = estimate_time_total(job.time_estimate,
                                                 job.time_elapsed, progress)

    def set_reached(self, job, elapsed=None, progress=None):
        """A print that ended before its end: Cura draws time_elapsed /
        time_total, so that shows the progress it reached (progress None:
        the one Klipper showed last; a cancel resets the file)."""
        with self.lock:
            if elapsed:
                job.time_elapsed = int(elapsed)
            if progress is None:
                progress = job.progress
            if progress and 0. < progress < 1. and job.time_elapsed:
                job.time_total = int(job.time_elapsed / progress)
            job.time_total = max(job.time_total, job.time_elapsed + 1)

    def set_metadata(self, job, meta):
        with self.lock:
            job.time_estimate = meta["time_estimate"]
            job.preview = meta["preview"]
            job.materials = meta["materials"]
            if job.status in ACTIVE:
                job.time_total = max(job.time_total, job.time_estimate)
            self._changed()


# action -> (statuses it applies to, status while Klipper carries it out)
ACTIONS = {"pause": (("printing",), "pausing"),
           "print": (("paused",), "resuming"),
           "abort": (ACTIVE, "aborting")}
ACTION_VERBS = {"pause": "pause", "print": "resume", "abort": "abort"}
# action -> the statuses that show it took effect
ACTION_DONE = {"pause": ("paused",), "print": ("printing",) + tuple(ENDED),
               "abort": tuple(ENDED)}


def check_action(job, action, why=None):
    """Conflict saying why action does not apply to job now: why, the
    printer's reason if it has one, else the job's status."""
    if why is None:
        if job.status in ENDED:
            why = "its print has ended (it is %s)" % (job.status,)
        elif job.status not in ACTIONS[action][0]:
            why = "it is %s" % (job.status,)
        else:
            return
    raise Conflict("Cannot %s print job %s: %s; nothing was done" % (
        ACTION_VERBS[action], job.name, why))


def action_answer(job, action, left_printer):
    """After an action was carried out: (200, status) when job shows it
    (an aborted job that left its printer too), (202, status) for a
    pause that waits for the file's current command, else None."""
    if job.status in ACTION_DONE[action] or (action == "abort"
                                             and left_printer):
        return 200, job.status
    if action == "pause" and job.status == "pausing":
        return 202, job.status
    return None


def action_failed(job, action, who):
    """The Conflict for an action who carried out without its effect."""
    return Conflict("%s did not %s print job %s: %s" % (
        who, ACTION_VERBS[action], job.name,
        "its print ended first (it is %s)" % (job.status,)
        if job.status in ENDED else "it is %s" % (job.status,)))
