# Print from Ultimaker Cura over the network, as to an Ultimaker printer
#
# This file may be distributed under the terms of the GNU GPLv3 license.
#
# Cura's bundled "UM3NetworkPrinting" plugin finds printers through zeroconf
# (_ultimaker._tcp) and talks to them with a small HTTP "cluster API".  This
# module answers that API for Klippy: a threaded HTTP server reads status
# snapshots published by the reactor, stores uploads in the virtual_sdcard
# directory, keeps a persistent print queue and sends its commands
# (SDCARD_PRINT_FILE, PAUSE, RESUME, CANCEL_PRINT) back through the
# reactor.  HTTP threads never touch printer objects.  A child process
# (the "front") takes Cura's reads and uploads off Klippy's process.
import base64
import codecs
import collections
import contextlib
import email.utils
import errno
import fcntl
import functools
import hashlib
import hmac
import http
import http.client
import http.server
import ipaddress
import json
import logging
import operator
import os
import re
import select
import shlex
import shutil
import signal
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import urllib.parse
import uuid
import zlib

# Ultimaker machine types Cura knows: option value -> (BOM number, variant).
# The BOM number makes Cura create that machine definition; the variant is
# the display name Cura shows (and the picture it picks).
CURA_MACHINES = {
    "ultimaker_s3": (213482, "Ultimaker S3"),
    "ultimaker_s5": (9051, "Ultimaker S5"),
    "ultimaker3": (9066, "Ultimaker 3"),
    "ultimaker3_extended": (9511, "Ultimaker 3 Extended"),
}
# cura_machine: custom advertises the definition made from printer.cfg
# (MachineDefinition) under a private BOM number: 9 digits starting with
# 7, which no Ultimaker BOM is a prefix of (Cura matches by prefix).
CUSTOM_MACHINE = "custom"
CUSTOM_BOM_BASE = 700000000
# Cura refuses firmware below 4.0.0 and sends UFP from 4.4 on.
FIRMWARE_VERSION = "5.2.11"
SERVICE_TYPE = "_ultimaker._tcp.local."
SNAPSHOT_INTERVAL = 0.5
COMMAND_TIMEOUT = 5.
MAX_JSON_BODY = 64 * 1024
MAX_MATERIAL_BODY = 4 * 1024 * 1024
MAX_PREVIEW_SIZE = 16 * 1024 * 1024
READ_CHUNK = 256 * 1024
# A client that sends nothing for this long loses its connection and thread
# (the undocumented option request_timeout shortens it for tests).
REQUEST_TIMEOUT = 60.
# Beyond this many open connections new ones get 503: a flood of idle
# connections must not grow threads without bound.
MAX_CONNECTIONS = 100
# Of those, at most this many at once may be requests the front hands to
# Klippy's side (slow ones hold theirs there): the rest stays free for the
# reads the front answers
MAX_HANDED_OVER = MAX_CONNECTIONS - 20
# Loopback, private IPv4, link-local, IPv6 ULA and link-local
DEFAULT_TRUSTED_CLIENTS = ("127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12,"
                           " 192.168.0.0/16, 169.254.0.0/16, fc00::/7,"
                           " fe80::/10")
GCODE_EXTENSIONS = (".gcode", ".g", ".gco")
# Temp files (uploads, atomic writes) name their process, so a restart can
# tell which ones a crash or kill -9 left behind (remove_stale_temp_files).
UPLOAD_TMP_PREFIX = ".cura-upload-%d-" % (os.getpid(),)
WRITE_TMP_PREFIX = ".cura-tmp-%d-" % (os.getpid(),)
UPLOAD_EXTENSIONS = (".ufp", ".gcode.gz") + GCODE_EXTENSIONS

# Servers of earlier printer objects.  Klippy does not re-import modules on
# RESTART, so this list survives and lets load_config() release a port that
# a missed klippy:disconnect left bound.
_live_instances = []
# Their state folders' locks (StateLock), which a load_config() that failed
# after taking one leaves held until the next one.
_state_locks = []


class CommandError(Exception):
    pass


class CuraError(Exception):
    """A request the printer cannot carry out, said in the domain's terms.
    Code outside the HTTP chapter raises these (never HTTPError); the HTTP
    layer turns each kind into a status in one place (ERROR_STATUS)."""
    def __init__(self, message):
        Exception.__init__(self, message)
        self.message = message


class NotFound(CuraError):
    """No such job, printer or file."""


class Conflict(CuraError):
    """Not possible in the current state: nothing was changed."""


class BadInput(CuraError):
    """The request or the file is malformed."""


class TooLarge(CuraError):
    """Over a configured limit (upload size, queue length...)."""


class Unsupported(CuraError):
    """A file type the printer cannot print."""


class NoSpace(CuraError):
    """Not enough free disk space: nothing was kept."""


class StorageError(CuraError):
    """A file or folder could not be read or written (the message names
    the path and the cause): nothing was kept."""


def storage_error(e, path=None):
    """The CuraError for OSError e on path (default: the one e names):
    NoSpace for a full disk or quota, StorageError for any other cause
    (a missing folder, a read-only file system, a file where a folder
    should be...)."""
    path = path or e.filename
    where = " (%s)" % (path,) if path else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace("Disk full%s: %s" % (where, e.strerror or e))
    return StorageError("Cannot use %s: %s" % (path or "the disk",
                                                e.strerror or e))


class HTTPError(Exception):
    def __init__(self, status, message, close=False, headers=()):
        Exception.__init__(self, message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers


def _host_ipv4_addresses(bind_address):
    # The addresses Cura may use to reach this host, best first: Cura uses
    # only the first one it is given.
    if bind_address not in ("0.0.0.0", "::"):
        return [bind_address]
    try:
        import ifaddr
        ips = [ip.ip for adapter in ifaddr.get_adapters()
               for ip in adapter.ips if isinstance(ip.ip, str)]
    except Exception:
        logging.exception("cura_connection: cannot list interfaces")
        ips = []
    usable = [ip for ip in ips if not ip.startswith("127.")]
    usable.sort(key=lambda ip: ip.startswith("169.254."))
    return usable or ["127.0.0.1"]


######################################################################
# Klippy bridge: the only code that touches printer objects
######################################################################

# Thread boundary.  Code marked "Reactor:" runs in Klippy's reactor (a
# timer, a G-code command, or a call an HTTP thread submitted); it may
# change printer objects and the job store, and never writes to disk.
# Code marked "Any thread:" only reads immutable snapshots or takes short
# locks.  HTTP handlers reach the reactor only through KlippyBridge.call().

class ReactorCall:
    """One call an HTTP thread hands to the reactor, and its outcome.

    The reactor side commits (commit()) before it changes Klipper; until
    then the waiting thread may withdraw the call, so a call that timed
    out is guaranteed never to take effect."""
    def __init__(self):
        self.lock = threading.Lock()
        self.state = "queued"      # -> running -> done, or withdrawn
        self.done = threading.Event()
        self.result = self.error = None

    def commit(self):
        """Reactor: True if the call may go on (not withdrawn)."""
        with self.lock:
            if self.state == "withdrawn":
                return False
            self.state = "running"
            return True

    def withdraw(self):
        """Any thread: True if the call had not committed (it never will)."""
        with self.lock:
            if self.state in ("queued",):
                self.state = "withdrawn"
                return True
            return False


# A call the reactor never got to (a macro or a heating wait holds the
# G-code queue) is withdrawn after this long and answered 409.
CALL_TIMEOUT = 10.
# A call that did commit is waited for up to this long in all.
CALL_RUN_LIMIT = 60.


class KlippyBridge:
    def __init__(self, config, on_snapshot):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.on_snapshot = on_snapshot
        self.closing = False
        self.seq = 0
        self.status_objects = []
        self.extruder_names = []
        self.gcode = None
        # Readers in other threads only ever see a complete snapshot: a new
        # dict is built and swapped in, never changed afterwards.
        self.snapshot = {"seq": 0, "klippy_state": "startup",
                         "state_message": "Klipper is starting",
                         "print_stats": {}, "virtual_sdcard": {},
                         "pause_resume": {}, "extruders": [],
                         "heater_bed": None}
        self.printer.register_event_handler("klippy:connect",
                                            self._handle_connect)
        # Klippy's state changes are shown at once, not at the next tick
        for event in ("klippy:ready", "klippy:shutdown"):
            self.printer.register_event_handler(event, self._handle_state)
        self.reactor.register_timer(self._publish_timer, self.reactor.NOW)

    def _handle_connect(self):
        self.gcode = self.printer.lookup_object("gcode")
        names = ["webhooks", "print_stats", "virtual_sdcard",
                 "pause_resume", "heater_bed", "toolhead"]
        for i in range(99):
            name = "extruder%d" % (i,) if i else "extruder"
            if self.printer.lookup_object(name, None) is None:
                break
            self.extruder_names.append(name)
        self.status_objects = [
            (name, self.printer.lookup_object(name))
            for name in names + self.extruder_names
            if self.printer.lookup_object(name, None) is not None]

    def _collect(self, eventtime):
        st = {}
        for name, obj in self.status_objects:
            try:
                st[name] = obj.get_status(eventtime)
            except Exception:
                logging.exception("cura_connection: %s status", name)
        msg, state = self.printer.get_state_message()
        ps = st.get("print_stats", {})
        vsd = st.get("virtual_sdcard", {})
        self.seq += 1
        bed = st.get("heater_bed")
        return {
            "seq": self.seq, "time": time.time(),
            "klippy_state": state, "state_message": msg.strip(),
            "print_stats": {k: ps.get(k) for k in (
                "state", "filename", "print_duration", "total_duration",
                "filament_used", "message")},
            "virtual_sdcard": {k: vsd.get(k) for k in (
                "progress", "is_active", "file_position", "file_size")},
            "pause_resume": {"is_paused": st.get("pause_resume", {}).get(
                "is_paused", False)},
            "extruders": [{"name": n,
                           "temperature": st.get(n, {}).get("temperature"),
                           "target": st.get(n, {}).get("target")}
                          for n in self.extruder_names],
            "heater_bed": bed and {"temperature": bed.get("temperature"),
                                   "target": bed.get("target")},
            "homed_axes": st.get("toolhead", {}).get("homed_axes", ""),
        }

    def publish(self, eventtime):
        """Reactor: Klipper's state now, also published to other threads."""
        snap = self._collect(eventtime)
        self.snapshot = snap
        return snap

    def now(self):
        """Reactor: publish(now)."""
        return self.publish(self.reactor.monotonic())

    def _publish_timer(self, eventtime):
        self.on_snapshot(self.publish(eventtime))
        return eventtime + SNAPSHOT_INTERVAL

    def _handle_state(self):
        # (a callback: no work inside Klippy's event handler itself)
        self.reactor.register_callback(
            lambda e: self.on_snapshot(self.publish(e)))

    def ready(self):
        return not self.closing and self.gcode is not None

    def call(self, fn, *args, timeout=CALL_TIMEOUT):
        """Any thread but the reactor: run fn(call, *args) in the reactor
        and return its result (or raise its CuraError).  fn must call
        call.commit() before it changes anything in Klipper."""
        if not self.ready():
            raise Conflict("Klipper is not ready (starting or restarting)")
        call = ReactorCall()
        def run(eventtime):
            if call.state == "withdrawn":
                return
            try:
                call.result = fn(call, *args)
            except Exception as e:
                call.error = e
            call.done.set()
        self.reactor.register_async_callback(run)
        if not call.done.wait(timeout):
            if call.withdraw():
                raise Conflict("Klipper is busy (a macro or a heating wait "
                               "holds its G-code queue for more than %.0f "
                               "s): nothing was done, try again later"
                               % (timeout,))
            if not call.done.wait(CALL_RUN_LIMIT - timeout):
                raise Conflict("Klipper started this but did not finish "
                               "within %.0f s" % (CALL_RUN_LIMIT,))
        if call.error is not None:
            raise call.error
        return call.result

    def command(self, script):
        """Reactor, inside the G-code mutex: run script; CommandError
        with Klipper's message."""
        try:
            self.gcode.run_script_from_command(script)
        except Exception as e:
            raise CommandError(str(e) or e.__class__.__name__)


class NoCall:
    """The ReactorCall of a G-code command: nobody can withdraw it."""
    state = "running"

    @staticmethod
    def commit():
        return True


######################################################################
# Job store: the queue, the job on the printer and the history
######################################################################

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
              "materials")
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
}


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


class SavedState:
    """State kept in one JSON file, changed in memory (reactor, HTTP
    threads) and written by the StateWriter thread, or by an HTTP thread
    that must answer after the change is on disk.  Subclasses give
    state() and load their fields from read_file(), reporting each
    unusable entry with drop()."""
    file_mode = 0o644

    def __init__(self, path, lock=None):
        self.path = path
        self.lock = lock or threading.Lock()
        self.save_lock = threading.Lock()
        self.dirty = False
        self.version = 0         # counts changes (the front publishes them)
        self.on_change = None    # the writer's wake-up, set when it starts
        self.kept_aside = False

    def read_file(self):
        # The saved dict, or {}: a file that is not one is kept aside as
        # .bad (runs at config load, before the reactor serves anything)
        try:
            with open(self.path, "r") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            logging.error("cura_connection: cannot read %s: %s", self.path, e)
            self.kept_aside = True
            try:
                os.replace(self.path, self.path + ".bad")
            except OSError:
                pass
            return {}

    def drop(self, what, why):
        """One log line for a saved entry that cannot be used; the file as
        it was stays beside it as .bad, the cleaned one replaces it."""
        logging.warning("cura_connection: %s: dropping %s: %s",
                        self.path, what, why)
        self.dirty = True
        if self.kept_aside:
            return
        self.kept_aside = True
        try:
            # a second name for the old file: no data written here
            if os.path.lexists(self.path + ".bad"):
                os.unlink(self.path + ".bad")
            os.link(self.path, self.path + ".bad")
        except OSError as e:
            logging.error("cura_connection: cannot keep %s aside: %s",
                          self.path, e)

    def changed(self):
        """Caller holds self.lock: the writer thread saves soon."""
        self.dirty = True
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    def save(self):
        """Not the reactor: write the file if it changed (or now)."""
        with self.save_lock:
            chunks = self.encode()
            try:
                write_file_atomic(self.path, chunks, self.file_mode)
            except BaseException:
                self.dirty = True   # the writer tries again (disk full...)
                raise

    def encode(self):
        """The file's content (a list of bytes), as it is now; marks the
        state saved.  A small state is encoded whole under the lock."""
        with self.lock:
            self.dirty = False
            return [json.dumps(self.state()).encode()]


class JobStore(SavedState):
    """The queue, the job on the printer (current) and the history.

    Only JobLifecycle changes it, in the reactor, under self.lock (held
    for a few lines, never across a reactor pause; of the work that grows
    with the queue, only a copy or a scan of its references, at C speed);
    other threads read with all_jobs(), find() and get()."""
    # Jobs listed in get_status() (the reactor's copy stays this small)
    STATUS_JOBS = 10
    def __init__(self, path, history_size, auto_start_next):
        SavedState.__init__(self, path, threading.RLock())
        self.history_size = history_size
        self.auto_start_next = auto_start_next
        self.current = None
        self.queue = []
        self.history = []
        self.plate_clear = True
        # The queue head while it waits for a configuration change (set
        # by JobLifecycle.follow); then it is the printer's job
        self.held = None
        self.status_cache = {}
        self.by_uuid = {}       # every job in current, queue and history
        self._load()

    def _load(self):
        data = self.read_file()
        seen = set()
        def jobs(key, statuses):
            items = data.get(key)
            if items is None:
                items = []
            elif key == "current":
                items = [items]
            if not isinstance(items, list):
                self.drop(key, "not a list")
                return []
            out = []
            for i, d in enumerate(items):
                try:
                    job = saved_job(d, statuses)
                    if job.uuid in seen:
                        raise ValueError("uuid %s twice" % (job.uuid,))
                except ValueError as e:
                    self.drop("%s entry %d" % (key, i + 1), e)
                    continue
                seen.add(job.uuid)
                out.append(job)
            return out
        cur = jobs("current", list(ACTIVE) + list(ENDED))
        self.current = cur[0] if cur else None
        self.queue = jobs("queue", ("queued",))
        self.history = jobs("history", list(ENDED.values()))
        del self.history[self.history_size:]
        self.by_uuid = {j.uuid: j for j in cur + self.queue + self.history}
        self.plate_clear = data.get("plate_clear", True)
        if not isinstance(self.plate_clear, bool):
            self.drop("plate_clear", "not true or false")
            self.plate_clear = False
        if self.current is not None and self.current.status in ACTIVE:
            # A new printer object cannot still be printing that file.
            self._end(self.current, "failed_wait_cleanup",
                      "Interrupted by a Klipper restart")
            self.dirty = True
        self._update_status_cache()

    def state(self):
        return {"version": 1, "plate_clear": self.plate_clear,
                "current": self.current and self.current.to_dict(),
                "queue": [j.to_dict() for j in self.queue],
                "history": [j.to_dict() for j in self.history]}

    def encode(self):
        """Not the reactor: queue.json as chunks of bytes.  The lock is
        held only to copy references and a changed job's fields (a job at a
        time), never while encoding.  A change meanwhile means the lists
        may not match their jobs' fields: then again, from the new
        state."""
        pause = ServeGate().breathe     # the reactor gets the GIL often
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
            chunks = [b'{"version": 1, "plate_clear": %s, "current": ' % (
                b"true" if plate_clear else b"false"),
                      b"null" if cur is None else encoded(cur)]
            for key, jobs in zip((b"queue", b"history"), lists):
                chunks.append(b', "%s": [' % (key,))
                chunks += [b", " + encoded(j) if i else encoded(j)
                           for i, j in enumerate(jobs)]
                chunks.append(b"]")
            chunks.append(b"}")
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
        with self.lock:
            cur = [self.current] if self.current else []
            return cur, list(self.queue), list(self.history)

    def printer_jobs(self):
        """([the job that points at the printer] or [], the other jobs of
        the printer's list): the job on it, or the held queue head once
        the plate is clear (then the ended job is just listed); then the
        queue."""
        with self.lock:
            cur = [self.current] if self.current else []
            held = self.held
            if held is not None and self.queue and self.queue[0] is held \
                    and self.plate_clear and not self.has_active():
                return [held], cur + self.queue[1:]
            return cur, list(self.queue)

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

    def hold(self, job):
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
        self.plate_clear = self.auto_start_next

    def end(self, job, status, message=""):
        with self.lock:
            self._end(job, status, message)
            self._changed()

    def _retire(self, job):
        if self.current is job:
            self.current = None
        job.status = ENDED.get(job.status, job.status)
        self.history.insert(0, job)
        for old in self.history[self.history_size:]:
            del self.by_uuid[old.uuid]
        del self.history[self.history_size:]

    def begin_start(self, job):
        """Queue head -> the printer (pre_print, waiting for Klipper)."""
        with self.lock:
            if job in self.queue:
                self.queue.remove(job)
            if self.current is not None:
                self._retire(self.current)
            self.current = job
            job.status = "pre_print"
            job.started = True
            job.starting = "waiting"
            job.message = ""
            self.plate_clear = False
            self._changed()

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
            self.plate_clear = False
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


def write_file_atomic(path, data, mode=0o644):
    # temp file, fsync, rename, fsync the directory: all or nothing
    dirname = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=WRITE_TMP_PREFIX, dir=dirname)
    os.fchmod(fd, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # data: bytes, or a list of them
            f.writelines([data] if isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(dirname, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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


# action -> (statuses it applies to, status while Klipper carries it out)
ACTIONS = {"pause": (("printing",), "pausing"),
           "print": (("paused",), "resuming"),
           "abort": (ACTIVE, "aborting")}
ACTION_VERBS = {"pause": "pause", "print": "resume", "abort": "abort"}
# How long an action waits for Klipper to show its effect (a pause waits
# for the command the file is running)
ACTION_SETTLE = 3.


class JobLifecycle:
    """The one owner of job transitions.  Everything here runs in the
    reactor, where Klipper's state is read at the moment of deciding:
    the status timer (follow), G-code commands, and calls HTTP handlers
    submit through KlippyBridge.call().  Nothing here writes to disk."""
    def __init__(self, bridge, store, want_metadata,
                 changes=lambda job: []):
        self.bridge = bridge
        self.store = store
        self.reactor = bridge.reactor
        self.printer = bridge.printer
        # want_metadata(job): read the file's estimate/preview off the
        # reactor, then store.set_metadata() through the reactor
        self.want_metadata = want_metadata
        # changes(job): the configuration changes a queued job waits for
        # (memory only: it runs here); [] lets it start
        self.changes = changes

    # Reactor: following Klipper
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
        head = store.queue[0] if store.queue else None
        if head is not None and self.changes(head):
            store.hold(head)    # until the material is loaded or forced
        elif store.plate_clear and head is not None \
                and not head.arriving and not store.has_active():
            store.hold(None)
            self._start(head)
        else:
            store.hold(None)

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
        self.store.begin_start(job)
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
        with self.bridge.gcode.get_mutex():
            if self.store.current is not job or job.starting != "waiting":
                return      # aborted while it waited for the G-code queue
            if klipper_print_state(self.bridge.now()) in (
                    "printing", "pausing", "paused"):
                error = "SD busy"
            else:
                job.starting = "running"
                try:
                    self._clear_stale_pause()
                    self.bridge.command(
                        "SDCARD_PRINT_FILE FILENAME=%s" % (job.filename,))
                except CommandError as e:
                    error = str(e)
        snap = self.bridge.now()
        busy = klipper_print_state(snap) in ("printing", "pausing", "paused")
        if error is None and busy:
            self.store.set_status(job, "printing")
            job.starting = None
        elif error is not None and busy:
            logging.info("cura_connection: %s waits: Klipper is printing "
                         "another file (%s)", job.filename, error)
            self.store.requeue(job, "Waiting: Klipper was busy (%s)"
                               % (error,))
        else:
            logging.info("cura_connection: cannot start %s: %s",
                         job.filename, error or "it did not start")
            self.store.end(job, "failed_wait_cleanup",
                           error or "Klipper did not start the file")
            # nothing was printed: the plate is as clear as before
            with self.store.lock:
                self.store.plate_clear = True
                self.store._changed()
        self.follow(snap)

    # Reactor: actions of Cura, the web page and the console
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
                  else self.bridge.gcode.get_mutex()):
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
        self.follow(self.bridge.now())
        ok = {"pause": ("paused",), "print": ("printing",) + tuple(ENDED)
              }.get(action, tuple(ENDED))
        if job.status in ok or (action == "abort"
                                and job is not self.store.current):
            return 200, job.status
        if action == "pause" and job.status == "pausing":
            return 202, job.status
        if action == "pause":
            # its print ended before it paused: the pause is no one's
            with self.bridge.gcode.get_mutex():
                self._clear_stale_pause()
        raise Conflict("Klipper did not %s print job %s: %s" % (
            ACTION_VERBS[action], job.name,
            "its print ended first (it is %s)" % (job.status,)
            if job.status in ENDED else "it is %s" % (job.status,)))

    def _at_rest(self):
        # Inside the G-code mutex the file runs no command, but a Klipper
        # that reads it in a worker thread may be about to find its end
        # (a PAUSE or CANCEL_PRINT then meets a print that completes
        # under it): wait for that, then Klipper's state stands.
        deadline = self.reactor.monotonic() + ACTION_SETTLE
        snap = self.bridge.now()
        while snap["virtual_sdcard"].get("is_active") \
                and (snap["virtual_sdcard"].get("file_position") or 0) \
                >= (snap["virtual_sdcard"].get("file_size") or 0) \
                and self.reactor.monotonic() < deadline:
            self.reactor.pause(self.reactor.monotonic() + 0.01)
            snap = self.bridge.now()
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
        elif job.status in ENDED:
            why = "its print has ended (it is %s)" % (job.status,)
        elif job.status not in ACTIONS[action][0]:
            why = "it is %s" % (job.status,)
        else:
            return
        raise Conflict("Cannot %s print job %s: %s; nothing was done" % (
            ACTION_VERBS[action], job.name, why))

    def _carry_out(self, job, action, snap):
        # Inside the G-code mutex, with Klipper's print (snap) in the
        # state the action needs: its commands for that state
        pr = self.printer.lookup_object("pause_resume", None)
        bridge = self.bridge
        if action == "pause":
            script = "PAUSE" if pr is not None else "M25"
        elif action == "print":
            # RESUME only undoes Klipper's PAUSE; M24 resumes a file that
            # paused itself (M25) or was paused any other way
            script = "RESUME" if pr is not None \
                and snap["pause_resume"]["is_paused"] else "M24"
        else:
            if klipper_print_state(snap) in ("printing", "pausing"):
                self.store.set_times(job, snap["print_stats"].get(
                    "print_duration") or 0, snap["virtual_sdcard"].get(
                        "progress"))
            try:
                # the user's CANCEL_PRINT macro (heaters off...) first
                bridge.command("CANCEL_PRINT")
            except CommandError as e:
                logging.info("cura_connection: CANCEL_PRINT: %s", e)
            if klipper_print_state(bridge.now()) not in (
                    "printing", "pausing", "paused"):
                return
            # CANCEL_PRINT leaves a file that paused itself loaded
            script = "SDCARD_RESET_FILE"
        try:
            bridge.command(script)
        except CommandError as e:
            raise Conflict("%s failed: %s" % (script, e))

    def _clear_stale_pause(self):
        # Inside the G-code mutex.  A PAUSE that found no print to pause
        # (typed as a print ended; a print that failed before it paused)
        # leaves pause_resume paused: the next print would show pausing
        # and refuse PAUSE.  It belongs to no print: clear it.
        snap = self.bridge.now()
        if snap["pause_resume"]["is_paused"] and klipper_print_state(
                snap) not in ("printing", "pausing", "paused"):
            logging.info("cura_connection: clearing a pause of no print")
            self.bridge.command("CLEAR_PAUSE")

    def _settle(self, busy):
        deadline = self.reactor.monotonic() + ACTION_SETTLE
        while busy(self.bridge.now()) \
                and self.reactor.monotonic() < deadline:
            self.reactor.pause(self.reactor.monotonic() + 0.05)

    def plate_cleared(self, call=NoCall):
        """Retire the ended job, let the queue go on; Conflict while a job
        is on its way or printing (as Klipper says now)."""
        if not call.commit():
            return
        self._catch_up()
        self.store.plate_cleared()
        self.follow(self.bridge.now())

    def add(self, call, job, limit):
        """An upload's job joins the queue (Conflict when it holds limit
        jobs); the status timer starts it once it is no longer arriving."""
        if not call.commit():
            return
        job.arriving = True
        self.store.add(job, limit)

    def change(self, call, fn, *args):
        """A queue change (move, delete, force) made in the reactor, on
        the jobs as Klipper's state now makes them."""
        if not call.commit():
            return None
        self._catch_up()
        result = fn(*args)
        self.follow(self.bridge.now())
        return result

    def _catch_up(self):
        # The job on the printer may have ended since the last status
        # tick: a queue change or plate clear decides on what Klipper
        # says now
        cur = self.store.current
        if cur is not None and cur.status in ACTIVE:
            self.follow(self.bridge.now())


class StateWriter:
    """Thread that writes changed state files (disk writes stay off the
    reactor) and reads the metadata of prints started outside Cura."""
    def __init__(self, states, reactor, read_metadata, set_metadata):
        self.states = list(states)
        self.reactor = reactor
        self.read_metadata = read_metadata
        self.set_metadata = set_metadata
        self.wanted = collections.deque()
        self.event = threading.Event()
        self.stopping = False
        for state in self.states:
            state.on_change = self.event.set
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="cura_connection writer")
        self.thread.start()

    def want_metadata(self, job):
        """Any thread: read job.filename's metadata soon."""
        self.wanted.append(job)
        self.event.set()

    def _run(self):
        failing = None
        while True:
            self.event.wait(1.)
            self.event.clear()
            stopping = self.stopping    # then one last pass, and out
            try:
                while self.wanted:
                    job = self.wanted.popleft()
                    meta = self.read_metadata(job.filename)
                    self.reactor.register_async_callback(
                        lambda e, job=job, meta=meta:
                        self.set_metadata(job, meta))
                for state in self.states:
                    if state.dirty:
                        state.save()
                failing = None
            except OSError as e:
                # Disk full, read-only...: the state stays dirty and is
                # saved when it can be; say so once, not every second.
                if str(e) != failing:
                    logging.error("cura_connection: cannot save: %s", e)
                failing = str(e)
            except Exception:
                logging.exception("cura_connection: state writer")
            if stopping:
                break

    def stop(self):
        """Save what changed (in the writer thread) and end it."""
        for state in self.states:
            state.on_change = None
        self.stopping = True
        self.event.set()
        self.thread.join(2.)


######################################################################
# File intake: uploads, G-code metadata, materials
######################################################################

def safe_base_name(filename, default="print", max_bytes=200):
    # Only the base name, letters/digits and a few safe marks, no leading
    # dot: the result can't escape the folder, hide, or break a G-code line.
    # (max_bytes leaves room for "-<n>.gcode" in a file name's 255)
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(c if c.isalnum() or c in "._-()+" else "_" for c in name)
    name = name.lstrip(".")
    while len(name.encode("utf-8")) > max_bytes:
        name = name[:-1]
    return name or default


# The name a job is shown by (Cura, the web page, CURA_QUEUE) is the one
# the user gave, as on an Ultimaker; only the file needs a safe name.
MAX_JOB_NAME = 200
# Format characters that join emoji and letters stay (ZWNJ, ZWJ)
JOINERS = "\u200c\u200d"


def label_text(value, limit):
    """value (any type) as a one-line label of at most limit characters:
    other line breaks and spaces become spaces, control and format
    characters (direction overrides...) go."""
    text = unicodedata.normalize("NFC", value if isinstance(value, str)
                                 else "")
    out = []
    for c in text:
        cat = unicodedata.category(c)
        if c.isspace():
            out.append(" ")
        elif cat[0] != "C" or c in JOINERS:
            out.append(c)
    return "".join(out).strip()[:limit].rstrip(" " + JOINERS)


def job_name(filename):
    """The name a job uploaded as filename is shown by: the base name
    without the print file extension, as the user wrote it."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return label_text(split_upload_name(base)[0], MAX_JOB_NAME)


def safe_relative_path(path):
    # A file inside the gcodes folder as Klipper names it (its prints
    # started elsewhere may be in sub-folders, named with any text a
    # G-code line carries: no-break spaces, emoji joiners, tabs...):
    # relative, one line, no NUL, no empty, "." or ".." part -- it cannot
    # escape the folder.
    return isinstance(path, str) and 0 < len(path) <= 4096 \
        and not set(path) & set("\0\n\r") and all(
            part not in ("", ".", "..") for part in path.split("/"))


def preview_beside(preview, filename):
    # Where FileIntake keeps a job's preview (_store_thumbnail, or a
    # slicer's or Moonraker's for read_metadata): a .png or .jpg in the
    # .thumbs folder beside the G-code file
    folder, _, name = preview.rpartition("/")
    return safe_relative_path(preview) and name.endswith(PREVIEW_SUFFIXES) \
        and folder == os.path.join(os.path.dirname(filename), ".thumbs")


def process_running(pid):
    # (a zombie has ended: its parent just has not collected it yet)
    try:
        with open("/proc/%d/stat" % (pid,)) as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def remove_stale_temp_files(dirname, pid=None):
    # Partial files of this process (a RESTART ended them) or of one that
    # is gone (an earlier front process too); another Klippy sharing the
    # folder keeps its own.  With pid: only those of that ended process.
    try:
        names = os.listdir(dirname)
    except OSError:
        return
    for name in names:
        m = re.match(r"\.cura-(?:upload|tmp)-(\d+)-", name)
        if m is None or (pid is not None and int(m.group(1)) != pid) or (
                int(m.group(1)) != os.getpid()
                and process_running(int(m.group(1)))):
            continue
        try:
            os.unlink(os.path.join(dirname, name))
            logging.info("cura_connection: removed partial file %s", name)
        except OSError:
            pass


def split_upload_name(filename):
    # "benchy.gcode.gz" -> ("benchy", ".gcode.gz")
    lower = filename.lower()
    for ext in UPLOAD_EXTENSIONS:
        if lower.endswith(ext) and len(filename) > len(ext):
            return filename[:-len(ext)], ext
    return filename, ""


# "; thumbnail begin 300x300 <len>" (PrusaSlicer, Orca...) or "300 300"
# (Cura 5's Create Thumbnail script); _JPG and _QOI blocks alike
THUMB_BEGIN_RE = re.compile(
    rb"^;[ \t]*thumbnail(?:_(PNG|JPG|QOI))? begin (\d{1,5})(?:x| )"
    rb"(\d{1,5})(?: \d{1,9})?[ \t\r]*$", re.M)
THUMB_END_RE = re.compile(rb"^;[ \t]*thumbnail(?:_(?:PNG|JPG|QOI))? end",
                          re.M)
# The preview Cura shows: the largest thumbnail up to this many pixels a
# side (more only costs transfer), else the smallest bigger one.
PREVIEW_MAX_SIDE = 1024
# The previews kept in .thumbs/ (Moonraker's names for them too)
PREVIEW_SUFFIXES = (".png", ".jpg")
DURATION_RE = re.compile(rb"(\d{1,9})\s*([dhms])")
SECONDS_RE = re.compile(rb"^\d{1,12}(?:\.\d+)?\Z")
MAX_DURATION = 10 * 365 * 86400     # more is no estimate
TIME_PATTERNS = [
    re.compile(rb"^;TIME:\s*(\d+(?:\.\d+)?)\s*$", re.M),         # Cura
    re.compile(rb"^;PRINT\.TIME:\s*(\d+)\s*$", re.M),            # Griffin
    re.compile(rb"^;\s*estimated printing time(?: \(normal mode\))?\s*"
               rb"=\s*(.+?)\s*$", re.M),                         # Prusa/Orca
]
FILAMENT_PATTERNS = [
    (re.compile(rb"^;Filament used:\s*([\d.]+)m", re.M), 1000.),  # Cura
    (re.compile(rb"^;\s*filament used \[mm\]\s*=\s*([\d.]+)", re.M), 1.),
]
HEADER_BYTES = 1024 * 1024
TAIL_BYTES = 256 * 1024
# What an Ultimaker (Griffin) header says each extruder needs.  Cura's
# Marlin-flavour header names no material: such files need nothing.
GRIFFIN_EXTRUDER_RE = re.compile(
    rb"^;EXTRUDER_TRAIN\.(\d{1,2})\.(MATERIAL\.GUID|NOZZLE\.NAME):[ \t]*"
    rb"([^\r\n]*?)[ \t\r]*$", re.M)
MAX_EXTRUDERS = 16
# A job's materials entry: extruder (int), guid, and where known
JOB_MATERIAL_KEYS = ("guid", "print_core_id", "brand", "material", "color",
                     "color_code", "name")
MAX_MATERIAL_TEXT = 100     # characters of each


def parse_job_materials(head):
    """[{"extruder": n, "guid": ..., "print_core_id": ...}] from the
    Griffin header in head (comment lines), by extruder; [] when it names
    none.  A GUID is kept as written (lower case): Cura's own profiles are
    not all well-formed UUIDs."""
    found = {}
    for m in GRIFFIN_EXTRUDER_RE.finditer(head):
        n, key = int(m.group(1)), m.group(2)
        value = m.group(3).decode("utf-8", "replace").strip()
        if n >= MAX_EXTRUDERS or not value or len(value) > 64 \
                or not value.isprintable():
            continue
        entry = found.setdefault(n, {"extruder": n})
        if key == b"NOZZLE.NAME":
            entry["print_core_id"] = value
        elif re.match(r"^[\w-]{1,64}$", value):
            entry["guid"] = value.lower()
    return [found[n] for n in sorted(found)]


def valid_job_materials(value):
    # A saved job's materials: a short list of entries as above
    if not isinstance(value, list) or len(value) > MAX_EXTRUDERS:
        return False
    seen = set()
    for entry in value:
        if not isinstance(entry, dict) or set(entry) - set(
                JOB_MATERIAL_KEYS) - {"extruder"}:
            return False
        n = entry.get("extruder")
        if not isinstance(n, int) or isinstance(n, bool) \
                or not 0 <= n < MAX_EXTRUDERS or n in seen:
            return False
        seen.add(n)
        if not all(isinstance(entry[k], str)
                   and len(entry[k]) <= MAX_MATERIAL_TEXT
                   for k in entry if k != "extruder"):
            return False
    return True


def parse_duration(text):
    # "2345", "2345.6" or "1d 2h 3m 4s" -> seconds; absurd values -> 0
    if SECONDS_RE.match(text):
        seconds = int(float(text))
    else:
        scale = {b"d": 86400, b"h": 3600, b"m": 60, b"s": 1}
        seconds = sum(int(n) * scale[u] for n, u in DURATION_RE.findall(text))
    return seconds if seconds <= MAX_DURATION else 0


def best_thumbnail(text):
    """The embedded thumbnail to preview, as PNG or JPEG bytes, or None.

    Cura shows previews with QImage.loadFromData, which decodes PNG and
    JPEG but not QOI: QOI blocks are skipped (a file with only QOI
    thumbnails gets no preview), and so is any block whose data is not a
    PNG or JPEG image.  Of the others, the largest up to PREVIEW_MAX_SIDE
    wins (PNG before JPG at the same size).  Linear in len(text): each
    block's end is searched once, from its begin."""
    blocks = []
    pos = 0
    while True:
        begin = THUMB_BEGIN_RE.search(text, pos)
        end = begin and THUMB_END_RE.search(text, begin.end())
        if end is None:
            break       # no block after this one can end either
        kind, w, h = begin.group(1), int(begin.group(2)), int(begin.group(3))
        if kind != b"QOI" and w and h:
            fits = max(w, h) <= PREVIEW_MAX_SIDE
            rank = (fits, w * h if fits else -w * h, kind != b"JPG")
            blocks.append((rank, begin.end(), end.start()))
        pos = end.end()
    import base64
    for rank, start, stop in sorted(blocks, reverse=True):
        data = b"".join(line[1:].strip() for line
                        in text[start:stop].split(b"\n")
                        if line.startswith(b";"))
        try:
            image = base64.b64decode(data, validate=True)
        except ValueError:
            continue
        if is_preview_image(image):
            return image
    return None


def parse_gcode_metadata(head, tail):
    """Slicer estimate (s), filament (mm), the embedded thumbnail to
    preview (best_thumbnail) and the materials the header names
    (parse_job_materials)."""
    meta = {"time_estimate": 0, "filament_mm": 0., "thumbnail": None,
            "materials": parse_job_materials(head)}
    for text in (head, tail):
        for pattern in TIME_PATTERNS:
            m = pattern.search(text)
            if m and not meta["time_estimate"]:
                meta["time_estimate"] = parse_duration(m.group(1))
        for pattern, scale in FILAMENT_PATTERNS:
            m = pattern.search(text)
            if m and not meta["filament_mm"]:
                try:
                    meta["filament_mm"] = float(m.group(1)) * scale
                except ValueError:
                    pass
    meta["thumbnail"] = best_thumbnail(head)
    return meta


def gcode_comment_lines(text):
    """The lines of text that start with ";", in order.  Every metadata
    pattern is anchored there, and on the moves of a 1 MiB head a pattern
    that finds nothing holds the GIL for up to 15 ms (which stalls the
    reactor that long); split() and find() pick the lines out in 1 ms."""
    parts = text.split(b"\n;")
    lines = [b";" + p[:p.find(b"\n")] if b"\n" in p else b";" + p
             for p in parts[1:]]
    if parts[0].startswith(b";"):
        first = parts[0]
        lines.insert(0, first[:first.find(b"\n")] if b"\n" in first
                     else first)
    return b"\n".join(lines) + b"\n" if lines else b""


def read_gcode_metadata(path):
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        tail = b""
        if size > HEADER_BYTES:
            f.seek(max(HEADER_BYTES, size - TAIL_BYTES))
            tail = f.read()
    return parse_gcode_metadata(gcode_comment_lines(head),
                                gcode_comment_lines(tail))


UPLOAD_CHUNK = 1024 * 1024
# Free space an upload must leave (Klipper's logs, Moonraker's database)
SPACE_MARGIN = 16 * 1024 * 1024
# An upload that unpacks in the front process asks Klippy's side for room
# beyond its reservation in steps of at least this many bytes
UNPACK_GRANT = 8 * 1024 * 1024
WRITEBACK_WINDOW = 8 * 1024 * 1024


class WritebackFile:
    """Writes a big file through to the disk while it arrives.

    Every WRITEBACK_WINDOW bytes, POSIX_FADV_DONTNEED starts the disk writes
    of the new pages (and drops the pages of the window before, written by
    now) from the page cache: the final fsync then has only the last window
    left to wait for, instead of the whole file after the last byte, and a
    big upload does not push Klipper's own pages out of a small host's RAM.
    """
    def __init__(self, f):
        self.f = f
        self.pos = self.kicked = self.dropped = 0

    def write(self, data):
        n = self.f.write(data)
        self.pos += n
        if self.pos - self.kicked >= WRITEBACK_WINDOW:
            self.f.flush()
            try:
                os.posix_fadvise(self.f.fileno(), self.dropped,
                                 self.pos - self.dropped,
                                 os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            self.dropped, self.kicked = self.kicked, self.pos
        return n


# Binary G-code (libbgcode's format, PrusaSlicer's .bgcode) starts with
# this.  Klipper reads text only: it would pause at the first line, and
# Cura would show "Paused" with no reason.
BGCODE_MAGIC = b"GCDE"
# How much of a G-code file is checked for binary content (all of a
# smaller file); every byte must be UTF-8
TEXT_CHECK_BYTES = 64 * 1024
# C0 control bytes no text G-code has (tabs, line ends, form feeds and
# DOS's end-of-file mark pass)
CONTROL_BYTE_RE = re.compile(rb"[\x00-\x08\x0e-\x19\x1b-\x1f]")
TEXT_ONLY = ("Klipper prints text G-code only: export the file as text"
             " G-code")


class GcodeOutput:
    """The G-code of an upload on its way to the disk (below the unpacking
    of a .gcode.gz or .ufp): refuses what does not start as text G-code
    or is not UTF-8 throughout (Unsupported), and has
    FileIntake.check_room() keep SPACE_MARGIN free for every byte beyond
    covered(), the bytes the upload's reservation covers so far."""
    def __init__(self, f, upload, covered):
        self.f = f
        self.upload = upload
        self.covered = covered
        self.written = 0
        self.head = b""
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def write(self, data):
        n = len(data)
        if self.written < TEXT_CHECK_BYTES:
            self._check(bytes(data[:TEXT_CHECK_BYTES - self.written]))
        # Klipper decodes every line: a byte that is not UTF-8 anywhere
        # would pause the print there
        self._decode(data)
        if self.written + n > self.covered():
            self.upload.intake.check_room(self.upload, n)
        self.f.write(data)
        self.written += n
        return n

    def close(self):
        # (a file that ends inside a UTF-8 sequence is not text)
        self._decode(b"", True)

    def _decode(self, data, final=False):
        try:
            self.decoder.decode(data, final)
        except UnicodeDecodeError as e:
            raise Unsupported("%s is not text G-code (not UTF-8 text near "
                              "byte %d); %s" % (self.upload.filename,
                                                self.written + e.start,
                                                TEXT_ONLY))

    def _check(self, data):
        name = self.upload.filename
        self.head = (self.head + data)[:len(BGCODE_MAGIC)]
        if self.head == BGCODE_MAGIC:
            raise Unsupported("%s is binary G-code (.bgcode); %s (turn off "
                              "binary G-code in the slicer's printer "
                              "settings)" % (name, TEXT_ONLY))
        m = CONTROL_BYTE_RE.search(data)
        if m is not None:
            raise Unsupported("%s is not text G-code (byte 0x%02x at offset"
                              " %d); %s" % (name, data[m.start()],
                                            self.written + m.start(),
                                            TEXT_ONLY))


class GzipWriter:
    """Decompresses a .gcode.gz upload while it streams to disk."""
    def __init__(self, f):
        self.f = f
        self.z = zlib.decompressobj(47)  # gzip or zlib header, auto
        self.fed = False    # the current member has begun

    def write(self, data):
        while data:
            self.fed = True
            self.f.write(self.z.decompress(data, READ_CHUNK))
            data = self.z.unconsumed_tail
            if self.z.eof:
                # a new gzip member may follow (concatenated .gz files)
                data = self.z.unused_data + data
                self.z = zlib.decompressobj(47)
                self.fed = False

    def close(self):
        self.f.write(self.z.flush())
        if self.fed and not self.z.eof:
            # a cut-off file would print half the part
            raise zlib.error("the file ends in the middle")


class MultipartReader:
    """python-multipart callbacks: collects each part's headers (bounded,
    they are kept in memory) and hands on the part's name and file name.
    Subclasses implement begin_part, on_part_data and on_part_end."""
    def __init__(self):
        self._headers = {}
        self._field = None
        self._header_bytes = 0

    def callbacks(self):
        return {n: getattr(self, n) for n in (
            "on_part_begin", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished", "on_part_data",
            "on_part_end")}

    def on_part_begin(self):
        self._headers = {}
        self._field = None
        self._header_bytes = 0

    def _count_header(self, n):
        self._header_bytes += n
        if self._header_bytes > 16384:
            raise BadInput("Multipart part headers are too long")

    def on_header_field(self, data, start, end):
        self._count_header(end - start)
        self._field = (self._field or b"") + data[start:end]

    def on_header_value(self, data, start, end):
        self._count_header(end - start)
        key = (self._field or b"").lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def on_header_end(self):
        self._field = None

    def on_headers_finished(self):
        from python_multipart.multipart import parse_options_header
        disp, params = parse_options_header(
            self._headers.get(b"content-disposition", b""))
        fname = params.get(b"filename")
        self.begin_part(params.get(b"name", b"").decode("utf-8", "replace"),
                        fname.decode("utf-8", "replace")
                        if fname is not None else None)


class Upload(MultipartReader):
    """One multipart upload streaming into a hidden temp file: length
    bytes declared, received of them read so far."""
    def __init__(self, intake, length):
        MultipartReader.__init__(self)
        self.intake = intake
        self.length = length
        self.received = 0
        self.fields = {}
        self.filename = None
        self.kind = None
        self.tmp_path = None
        self.file = None
        self.writer = None
        self.gcode = None
        self._name = None
        self._in_file = False

    def begin_part(self, name, filename):
        self._name = name
        self._in_file = filename is not None
        if not self._in_file:
            if len(self.fields) >= 32:
                raise BadInput("Too many form fields")
            self.fields[self._name] = b""
            return
        if self.filename is not None:
            raise BadInput("Only one file per upload")
        self.filename = filename
        base, ext = split_upload_name(self.filename)
        if not ext:
            raise Unsupported("Unsupported file type %r: send .ufp, "
                              ".gcode or .gcode.gz" % (self.filename,))
        if ext == ".ufp" and self.intake.charon is None:
            raise Unsupported("UFP files need libcharon (python3-charon)"
                              " in Klipper's Python environment")
        self.kind = ext
        fd, self.tmp_path = tempfile.mkstemp(
            prefix=UPLOAD_TMP_PREFIX, suffix=".part", dir=self.intake.gcodes)
        os.fchmod(fd, 0o644)
        self.file = os.fdopen(fd, "wb")
        # A .ufp is read back at once and deleted: it stays in the cache
        if ext == ".ufp":
            self.writer = self.file
            return
        # (what the body holds so far is reserved: no longer pending)
        self.gcode = GcodeOutput(WritebackFile(self.file), self,
                                 lambda: self.received)
        self.writer = self.gcode
        if ext == ".gcode.gz":
            self.writer = GzipWriter(self.writer)

    def on_part_data(self, data, start, end):
        if self._in_file:
            self.writer.write(memoryview(data)[start:end])
            return
        value = self.fields[self._name] + data[start:end]
        if len(value) > 4096:
            raise BadInput("Form field %s is too long" % (self._name,))
        self.fields[self._name] = value

    def on_part_end(self):
        if self._in_file and self.file is not None:
            if isinstance(self.writer, GzipWriter):
                self.writer.close()
            if self.gcode is not None:
                self.gcode.close()
            self.file.flush()
            if self.kind != ".ufp":
                # the .ufp is a scratch file: only its G-code must be durable
                os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
        self._in_file = False

    def discard(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
            self.tmp_path = None


class FileIntake:
    """Turns uploads into .gcode files (plus thumbnails) in the gcodes dir.
    Errors: BadInput, Unsupported, TooLarge, Conflict, NoSpace and
    StorageError (naming the path); nothing half-written is kept."""
    def __init__(self, gcodes, max_upload_size):
        self.gcodes = gcodes
        self.thumbs = os.path.join(gcodes, ".thumbs")
        self.max_upload_size = max_upload_size
        self.lock = threading.Lock()
        self.in_flight = set()   # admitted Uploads, until end()
        try:
            import Charon.VirtualFile
            import Charon.OpenMode
            self.charon = Charon
        except ImportError:
            logging.warning("cura_connection: libcharon (python3-charon) is "
                            "not importable; UFP uploads are refused")
            self.charon = None

    def begin(self, length, queued=lambda: 0, max_queue=None):
        """Admit an upload whose body is length bytes, before any of it is
        read: returns its Upload, to pass to receive() and then end().
        It needs room in the queue (queued() -> jobs waiting, called under
        the lock; each upload in flight counts as one more) and free disk
        space for length bytes plus what the uploads in flight still have
        to write.  Raises TooLarge, Conflict (queue full), NoSpace or
        StorageError (the folder is missing...)."""
        if length > self.max_upload_size:
            raise TooLarge("Upload of %d MiB is larger than max_upload_size"
                           " (%d MiB)" % (length >> 20,
                                          self.max_upload_size >> 20))
        with self.lock:
            waiting = queued() + len(self.in_flight)
            if max_queue is not None and waiting >= max_queue:
                raise Conflict("The print queue is full: %d jobs waiting or"
                               " arriving (max_queue: %d)"
                               % (waiting, max_queue))
            try:
                st = os.statvfs(self.gcodes)
            except OSError as e:
                raise storage_error(e, self.gcodes)
            free = st.f_bavail * st.f_frsize
            pending = sum(u.length - u.received for u in self.in_flight)
            if length + pending + SPACE_MARGIN > free:
                raise NoSpace("Not enough free disk space in %s: %d MiB "
                              "free, %d MiB needed (%d MiB of it for uploads"
                              " in progress)" % (
                                  self.gcodes, free >> 20,
                                  (length + pending + SPACE_MARGIN) >> 20,
                                  pending >> 20))
            upload = Upload(self, length)
            self.in_flight.add(upload)
            return upload

    def received(self, upload, n):
        # n more bytes of the body read (what is still to be written of
        # it stays reserved for it)
        upload.received += n

    def check_room(self, upload, n):
        """NoSpace unless n more bytes of upload's G-code, beyond what its
        reservation covers (it unpacks to more), leave SPACE_MARGIN free
        beside what the other uploads in flight still have to write."""
        with self.lock:
            try:
                st = os.statvfs(self.gcodes)
            except OSError as e:
                raise storage_error(e, self.gcodes)
            pending = sum(u.length - u.received for u in self.in_flight
                          if u is not upload)
        if n + pending + SPACE_MARGIN > st.f_bavail * st.f_frsize:
            raise NoSpace("Disk full (%s): %s unpacks to more than the free"
                          " space allows (%d MiB must stay free)" % (
                              self.gcodes, upload.filename,
                              SPACE_MARGIN >> 20))

    def end(self, upload):
        """Release what begin() reserved; removes what is left of an
        upload that did not finish."""
        upload.discard()
        with self.lock:
            self.in_flight.discard(upload)

    def receive(self, upload, read_into, boundary):
        """Read the multipart body of an admitted upload with
        read_into(buffer) -> byte count; returns (gcode name, metadata)
        once the G-code is in place."""
        from python_multipart.multipart import MultipartParser
        length = upload.length
        parser = MultipartParser(boundary, upload.callbacks())
        # One buffer, parsed in place: the parser hands each byte to the
        # callbacks, which write or copy it, before write() returns.
        buf = bytearray(UPLOAD_CHUNK)
        view = memoryview(buf)
        remaining = length
        try:
            while remaining:
                n = read_into(view[:min(remaining, UPLOAD_CHUNK)])
                if not n:
                    raise BadInput("Upload ended after %d of %d bytes"
                                   % (length - remaining, length))
                remaining -= n
                self.received(upload, n)
                parser.write(buf if n == UPLOAD_CHUNK else bytes(view[:n]))
            parser.finalize()
            if upload.tmp_path is None or upload.file is not None:
                raise BadInput("No complete file part in the upload")
            return self._finish(upload)
        except (ConnectionError, socket.timeout):
            upload.discard()
            raise       # the client's trouble: the HTTP layer answers
        except OSError as e:
            upload.discard()
            raise storage_error(e, self.gcodes)
        except Exception as e:
            upload.discard()
            if isinstance(e, CuraError):
                raise
            if e.__class__.__module__.startswith("python_multipart"):
                raise BadInput("Malformed multipart body: %s" % (e,))
            if isinstance(e, zlib.error):
                raise BadInput("Broken .gcode.gz file: %s" % (e,))
            raise

    def _finish(self, upload):
        """Unpack a UFP, read metadata, move the G-code into place."""
        thumbnail = None
        profiles = {}
        gcode_tmp = upload.tmp_path
        if upload.kind == ".ufp":
            gcode_tmp, thumbnail = self._unpack_ufp(upload)
            profiles = self._ufp_materials(upload.tmp_path)
            os.unlink(upload.tmp_path)
            upload.tmp_path = gcode_tmp
        meta = read_gcode_metadata(gcode_tmp)
        meta["material_profiles"] = profiles
        if thumbnail and not is_preview_image(thumbnail):
            thumbnail = None    # Cura would keep a blank preview for good
        thumbnail = thumbnail or meta["thumbnail"]
        meta["name"] = job_name(upload.filename)
        # room for _place's "-<n>.gcode": the file name stays safe whole
        base = safe_base_name(split_upload_name(upload.filename)[0],
                              max_bytes=200 - len("-9999.gcode"))
        final = self._place(gcode_tmp, base)
        upload.tmp_path = None
        name = os.path.basename(final)
        meta["preview"] = None
        if thumbnail:
            try:
                # (a file the reservation does not cover: the margin
                # stays free, or there is no preview)
                self.check_room(upload, len(thumbnail))
                meta["preview"] = self._store_thumbnail(name, thumbnail)
            except (OSError, NoSpace) as e:
                # a thumbnail is an extra: without it, no preview
                logging.warning("cura_connection: no preview for %s: %s",
                                name, e)
        return name, meta

    def _unpack_ufp(self, upload):
        # libcharon reads the package; fall back to plain zip reading for
        # packages whose G-code header it rejects (non-Griffin flavours).
        path = upload.tmp_path
        fd, gcode_tmp = tempfile.mkstemp(prefix=UPLOAD_TMP_PREFIX,
                                         suffix=".part", dir=self.gcodes)
        thumbnail = None
        os.fchmod(fd, 0o644)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                try:
                    vf = self.charon.VirtualFile.VirtualFile()
                    # by MIME type: the temp file's name ends in .part
                    vf.openStream(src, "application/x-ufp",
                                  self.charon.OpenMode.OpenMode.ReadOnly)
                    try:
                        gcode = self._ufp_output(out, upload)
                        shutil.copyfileobj(vf.getStream("/3D/model.gcode"),
                                           gcode, READ_CHUNK)
                        gcode.close()
                        try:
                            thumbnail = vf.getStream("/Metadata/thumbnail.png"
                                                     ).read(MAX_PREVIEW_SIZE)
                        except (FileNotFoundError, KeyError):
                            pass
                    finally:
                        vf.close()
                except (FileNotFoundError, KeyError):
                    raise BadInput("The UFP file has no G-code")
                except Exception as e:
                    if isinstance(e, (CuraError, OSError)):
                        raise
                    # A G-code header libcharon rejects is not Ultimaker's
                    # (Marlin flavour from a custom definition): normal.
                    header = self.charon.filetypes.GCodeFile
                    if not isinstance(e, header.InvalidHeaderException):
                        logging.info("cura_connection: libcharon refused %s "
                                     "(%s); reading it as a zip", path, e)
                    out.seek(0)
                    out.truncate()
                    thumbnail = self._unpack_zip(
                        path, self._ufp_output(out, upload))
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(gcode_tmp)
            raise
        return gcode_tmp, thumbnail

    def _unpack_zip(self, path, gcode):
        import zipfile
        try:
            with zipfile.ZipFile(path) as z:
                names = {n.lstrip("/"): n for n in z.namelist()}
                if "3D/model.gcode" not in names:
                    raise BadInput("The UFP file has no G-code")
                with z.open(names["3D/model.gcode"]) as src:
                    shutil.copyfileobj(src, gcode, READ_CHUNK)
                gcode.close()
                thumb = names.get("Metadata/thumbnail.png")
                return z.read(thumb)[:MAX_PREVIEW_SIZE] if thumb else None
        except zipfile.BadZipFile as e:
            raise BadInput("Not a UFP (zip) file: %s" % (e,))

    @staticmethod
    def _ufp_output(out, upload):
        # The .ufp on disk took the upload's whole reservation: every byte
        # of its G-code needs room of its own.
        return GcodeOutput(WritebackFile(out), upload, lambda: 0)

    @staticmethod
    def _ufp_materials(path):
        # The material profiles Cura packs with the G-code: {guid: info}
        # (MaterialStore.parse); they name the GUIDs of its header.
        import zipfile
        profiles = {}
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist()
                         if n.lstrip("/").startswith("Materials/")
                         and n.endswith(MATERIAL_SUFFIX)]
                for name in names[:MAX_EXTRUDERS * 4]:
                    with z.open(name) as f:
                        data = f.read(MAX_MATERIAL_BODY + 1)
                    try:
                        info = MaterialStore.parse(data)
                    except CuraError:
                        continue
                    profiles[info["guid"].lower()] = info
        except (zipfile.BadZipFile, zlib.error, NotImplementedError,
                ValueError) as e:
            logging.info("cura_connection: no material profiles read from "
                         "the UFP: %s", e)
        return profiles

    def _place(self, tmp, base):
        # A free name, taken atomically: existing files (and the one being
        # printed) are never overwritten.
        for i in range(10000):
            name = "%s.gcode" % (base,) if not i else "%s-%d.gcode" % (base, i)
            final = os.path.join(self.gcodes, name)
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                # no hard links (vfat): reserve the name, then replace it
                try:
                    os.close(os.open(final, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                os.replace(tmp, final)
                return final
            os.unlink(tmp)
            return final
        raise Conflict("No free file name for %s" % (base,))

    def remove(self, filename, preview):
        """Delete a stored upload (G-code and preview) no job refers to."""
        for rel in (filename, preview):
            try:
                if rel:
                    os.unlink(os.path.join(self.gcodes, rel))
            except OSError:
                pass

    def _store_thumbnail(self, gcode_name, image):
        # Moonraker, Mainsail and Fluidd look for <name>.png in .thumbs/
        # (.jpg for a JPEG)
        os.makedirs(self.thumbs, exist_ok=True)
        ext = ".jpg" if image_type(image) == "image/jpeg" else ".png"
        rel = os.path.join(".thumbs", gcode_name[:-len(".gcode")] + ext)
        write_file_atomic(os.path.join(self.gcodes, rel), image)
        return rel

    def read_metadata(self, filename):
        # For prints started outside Cura: the slicer's estimate and a
        # thumbnail Moonraker may have extracted.
        meta = {"time_estimate": 0, "preview": None, "materials": []}
        path = os.path.join(self.gcodes, filename)
        try:
            found = read_gcode_metadata(path)
        except OSError:
            return meta
        meta["time_estimate"] = found["time_estimate"]
        meta["materials"] = found["materials"]
        dirname, name = os.path.split(filename)
        stem = os.path.splitext(name)[0]
        thumbs = os.path.join(self.gcodes, dirname, ".thumbs")
        try:
            found = [n for n in os.listdir(thumbs)
                     if n.startswith(stem) and n.endswith(PREVIEW_SUFFIXES)
                     and re.match(r"^(-\d+x\d+)?$", n[len(stem):-4])]
        except OSError:
            found = []
        if found:
            biggest = max(found, key=lambda n: os.path.getsize(
                os.path.join(thumbs, n)))
            meta["preview"] = os.path.join(dirname, ".thumbs", biggest)
        return meta

    def read_preview(self, rel):
        path = os.path.realpath(os.path.join(self.gcodes, rel))
        if not path.startswith(os.path.realpath(self.gcodes) + os.sep):
            return None
        try:
            with open(path, "rb") as f:
                return f.read(MAX_PREVIEW_SIZE)
        except OSError:
            return None


MATERIAL_NS = "{http://www.ultimaker.com/material}"
MATERIAL_SUFFIX = ".xml.fdm_material"


class MaterialStore:
    """Material profiles Cura syncs, kept so each is sent only once."""
    MAX_HELD = 8 << 20   # bytes kept for Curas waiting for CURA_ALLOW

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.index = None   # guid -> material info, read on first use
        self.resolved = {}  # resolve() answers, until the next add()
        self.held = {}      # client id or address -> {filename: data}
        self.released = []  # (filename, data) the StateWriter stores
        self.dirty = False
        self.on_change = None   # the StateWriter's wake-up
        self.version = 0    # counts added profiles (the front's list)

    @staticmethod
    def parse(data):
        from defusedxml import ElementTree
        from defusedxml import DefusedXmlException
        try:
            root = ElementTree.fromstring(data)
        except (ElementTree.ParseError, DefusedXmlException, ValueError) as e:
            raise BadInput("Not a valid material file: %s" % (e,))
        if root.tag != MATERIAL_NS + "fdmmaterial":
            raise BadInput("Not an fdmmaterial document")
        meta = root.find(MATERIAL_NS + "metadata")
        def text(path):
            el = meta.find(path) if meta is not None else None
            return (el.text or "").strip() if el is not None else ""
        guid = text(MATERIAL_NS + "GUID")
        version = text(MATERIAL_NS + "version")
        # plain digits only: int() would take "1_0", "+1", " 1"
        version = int(version) if re.match(r"^[0-9]{1,9}\Z", version) \
            else None
        # Not always a well-formed UUID: fdm-materials ships "...59p3"
        if version is None or not re.match(r"^[\w-]{1,100}$", guid):
            raise BadInput("Material file needs a GUID and a version")
        if version < 1:
            raise BadInput("Material version must be 1 or more")
        name = MATERIAL_NS + "name/" + MATERIAL_NS
        material, color = text(name + "material"), text(name + "color")
        # The profile's name as Cura shows it: its label, else colour and
        # type ("Black PLA"; a Generic colour is left out: "PLA")
        label = text(name + "label") or " ".join(
            n for n in (color if color != "Generic" else "", material) if n)
        return {"guid": guid, "version": version,
                "brand": text(name + "brand"), "material": material,
                "color": color, "name": label or "Unknown",
                "color_code": text(MATERIAL_NS + "color_code")}

    def _load(self):
        if self.index is not None:
            return
        self.index = {}
        os.makedirs(self.path, exist_ok=True)
        for fname in sorted(os.listdir(self.path)):
            if not fname.endswith(MATERIAL_SUFFIX):
                continue
            try:
                with open(os.path.join(self.path, fname), "rb") as f:
                    info = self.parse(f.read())
            except (OSError, CuraError) as e:
                logging.info("cura_connection: skipping material %s: %s",
                             fname, e)
                continue
            info["file"] = fname
            old = self.index.get(info["guid"])
            if old is None or old["version"] < info["version"]:
                self.index[info["guid"]] = info

    def list(self):
        with self.lock:
            self._load()
            # by GUID: the same list before and after a restart
            return [dict(m) for m in sorted(self.index.values(),
                                            key=lambda m: m["guid"])]

    @staticmethod
    def file_name(filename):
        name = safe_base_name(filename, "")
        if not name.endswith(MATERIAL_SUFFIX) or name == MATERIAL_SUFFIX:
            raise BadInput("Material file names end in %s"
                           % (MATERIAL_SUFFIX,))
        return name

    def hold(self, owner, filename, data):
        """Keep a profile from a Cura not allowed yet (checked now), by
        its client id or address: release() hands it to the StateWriter,
        drop() forgets it.  Raises BadInput (not a profile) or NoSpace
        (MAX_HELD bytes kept)."""
        self.file_name(filename)
        self.parse(data)
        with self.lock:
            files = self.held.setdefault(owner, {})
            files.pop(filename, None)   # Cura sends again when it reconnects
            kept = sum(len(d) for owned in self.held.values()
                       for d in owned.values())
            if kept + len(data) > self.MAX_HELD:
                raise NoSpace("Too many material profiles wait for "
                              "CURA_ALLOW")
            files[filename] = data

    def release(self, *owners):
        # Reactor (CURA_ALLOW): memory only, the StateWriter stores them
        with self.lock:
            for owner in owners:
                self.released += self.held.pop(owner, {}).items()
            self.dirty = bool(self.released)
        if self.dirty and self.on_change is not None:
            self.on_change()

    def drop(self, *owners):
        with self.lock:
            for owner in owners:
                self.held.pop(owner, None)

    def save(self):
        """Store released profiles (StateWriter thread)."""
        with self.lock:
            files, self.released = self.released, []
            self.dirty = False
        for i, (filename, data) in enumerate(files):
            try:
                self.add(filename, data)
            except CuraError as e:
                logging.info("cura_connection: material %s: %s",
                             filename, e.message)
            except OSError:
                with self.lock:   # tried again on the next step
                    self.released = files[i:] + self.released
                    self.dirty = True
                raise

    def add(self, filename, data):
        name = self.file_name(filename)
        info = self.parse(data)
        with self.lock:
            self._load()
            old = self.index.get(info["guid"])
            if old is not None and old["version"] >= info["version"]:
                return False
            taken = {m["file"] for m in self.index.values()
                     if m["guid"] != info["guid"]}
            if name in taken:
                # another profile's file: writing it would lose that one
                stem = safe_base_name(info["guid"]) + "-"
                name = next(n for n in (
                    "%s%d%s" % (stem, i, MATERIAL_SUFFIX)
                    for i in range(len(taken) + 1)) if n not in taken)
            write_file_atomic(os.path.join(self.path, name), data)
            if old is not None and old["file"] != name:
                try:
                    os.unlink(os.path.join(self.path, old["file"]))
                except OSError:
                    pass
            info["file"] = name
            self.index[info["guid"]] = info
            self.version += 1
            self.resolved.clear()
            return True

    def name_job_materials(self, wanted, profiles):
        """Not the reactor: the job materials wanted (parse_job_materials)
        with brand, material, colour and name from the file's own profiles
        (profiles: guid -> parse()), else from the stored ones by GUID; a
        GUID neither knows keeps no names."""
        out = []
        for entry in wanted:
            entry = dict(entry)
            guid = entry.get("guid")
            try:
                info = guid and (profiles.get(guid) or self.resolve(
                    {"guid": guid}))
            except OSError:     # no materials folder: no names, no loss
                info = None
            if info:
                # (as long as a saved job keeps them: valid_job_materials)
                entry.update((k, info[k][:MAX_MATERIAL_TEXT]) for k in (
                    "brand", "material", "color", "color_code", "name")
                    if info.get(k))
            out.append(entry)
        return out

    def resolve(self, entry):
        """The stored profile a loaded-material entry names, or None: by
        GUID, else the first match of material type, brand and colour
        (name or code), Generic brand first."""
        key = tuple(sorted(entry.items()))
        with self.lock:
            self._load()
            if key in self.resolved:
                return self.resolved[key]
            found = None
            if entry.get("guid"):
                found = self.index.get(entry["guid"])
            elif entry.get("material"):
                want = entry["material"].lower()
                brand = entry.get("brand", "").lower()
                color = entry.get("color", "").lower()
                matches = [m for m in self.index.values()
                           if m["material"].lower() == want
                           and (not brand or m["brand"].lower() == brand)
                           and (not color or color in (
                               m["color"].lower(), m["color_code"].lower()))]
                if matches:
                    found = min(matches, key=lambda m: (
                        m["brand"].lower() != "generic", m["brand"],
                        m["color"], m["guid"]))
            self.resolved[key] = found and dict(found)
            return self.resolved[key]


MATERIAL_WORDS = ("GUID", "BRAND", "MATERIAL", "COLOR")
COLOR_CODE_RE = re.compile(r"^#?([0-9a-fA-F]{6})$")


def parse_material_words(words):
    """{"GUID", "BRAND", "MATERIAL", "COLOR": text} (a subset) -> the entry
    LoadedMaterials keeps; MATERIAL=empty means nothing is loaded."""
    unknown = sorted(set(words) - set(MATERIAL_WORDS))
    if unknown:
        raise ValueError("Unknown parameter %s (use %s)"
                         % (unknown[0], ", ".join(MATERIAL_WORDS)))
    entry = {}
    for key in MATERIAL_WORDS:
        value = str(words.get(key) or "").strip()
        if len(value) > 64 or not value.isprintable():
            raise ValueError("%s must be at most 64 printable characters"
                             % (key,))
        if value:
            entry[key.lower()] = value
    if entry.get("material", "").lower() in ("empty", "none"):
        return {"material": "empty"}
    if "guid" in entry:
        try:
            entry["guid"] = str(uuid.UUID(entry["guid"]))
        except ValueError:
            raise ValueError("GUID=%s is not a GUID" % (entry["guid"],))
    elif "material" not in entry:
        raise ValueError("Give GUID=<guid> (a material Cura knows), or "
                         "MATERIAL=<type> with optional BRAND= and COLOR=")
    m = COLOR_CODE_RE.match(entry.get("color", ""))
    if m:
        entry["color"] = "#" + m.group(1).lower()
    return entry


def parse_material_option(text):
    # "GUID=..." or "MATERIAL=PETG COLOR=ff8000 BRAND=\"Some Brand\"",
    # the words of SET_CURA_MATERIAL; a lone GUID is fine too.
    words = {}
    parts = shlex.split(text)
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep and len(parts) == 1:
            key, value = "GUID", part
        elif not sep:
            raise ValueError("'%s' is not KEY=value" % (part,))
        words[key.strip().upper()] = value
    return parse_material_words(words)


def material_differs(wanted, loaded):
    """Whether a job that wants the material wanted (a job materials
    entry) must wait while loaded (a LoadedMaterials entry or None) is in
    its extruder: only when both are known and they differ.  By GUID when
    both have one, else by type, then brand and colour where both say (a
    Generic profile is any brand's, in any colour)."""
    if not loaded or loaded.get("material") == "empty":
        return False    # nothing known, or nothing to swap: no hold
    if loaded.get("guid") and wanted.get("guid"):
        return loaded["guid"].lower() != wanted["guid"].lower()
    if not loaded.get("material") or not wanted.get("material"):
        return False
    if loaded["material"].lower() != wanted["material"].lower():
        return True
    brand = loaded.get("brand", "").lower()
    want = wanted.get("brand", "").lower()
    if brand and want not in ("", "generic", brand):
        return True
    color = loaded.get("color", "").lower()
    names = [wanted.get(k, "").lower() for k in ("color", "color_code")]
    return bool(color and names[0] not in ("", "generic")
                and color not in names)


class LoadedMaterials(SavedState):
    """The material in each extruder, shown on Cura's printer card.

    SET_CURA_MATERIAL changes it in the reactor, in memory only; the
    StateWriter thread writes the file."""
    def __init__(self, path, defaults):
        SavedState.__init__(self, path)
        self.names = [name for name, _ in defaults]
        self.entries = dict(defaults)
        saved = self._load()
        for name in self.names:
            if name in saved:
                self.entries[name] = saved[name]
        self._update_status_cache()

    def _load(self):
        extruders = self.read_file().get("extruders", {})
        if not isinstance(extruders, dict):
            self.drop("extruders", "not an object")
            return {}
        saved = {}
        for name, entry in extruders.items():
            try:
                if entry is not None and not (
                        isinstance(entry, dict) and all(
                            isinstance(k, str) and isinstance(v, str)
                            for k, v in entry.items())):
                    raise ValueError("not an object of texts")
                saved[name] = entry and parse_material_words(
                    {k.upper(): v for k, v in entry.items()})
            except ValueError as e:
                self.drop("the material of %s" % (name,), e)
        return saved

    def _update_status_cache(self):
        # get_status() runs in the reactor: hand it a ready-made dict
        self.status_cache = {name: self.entries.get(name) and
                             dict(self.entries[name]) for name in self.names}

    def set(self, name, entry):
        """Reactor (SET_CURA_MATERIAL); BadInput for an unknown extruder."""
        if name not in self.names:
            raise BadInput("Unknown extruder '%s' (known: %s)"
                           % (name, ", ".join(self.names)))
        with self.lock:
            self.entries[name] = entry
            self._update_status_cache()
            self.changed()

    def get(self, index):
        with self.lock:
            if index >= len(self.names):
                return None
            return self.entries.get(self.names[index])

    def changes(self, wanted):
        """Any thread: [(extruder index, wanted entry, loaded entry)] for
        the job materials wanted whose extruder holds another material
        (material_differs); extruders this printer lacks are left out."""
        out = []
        for entry in wanted:
            loaded = self.get(entry["extruder"])
            if material_differs(entry, loaded):
                out.append((entry["extruder"], entry, loaded))
        return out

    def state(self):
        return {"version": 1, "extruders": {
            name: self.entries.get(name) for name in self.names}}


######################################################################
# Around the job: camera, machine definition, web page
######################################################################

class Payload:
    """A reply body as bytes (an image, or JSON encoded ahead) or a list of
    bytes to send one after the other, its type, extra headers."""
    def __init__(self, data, ctype, headers=()):
        self.data = data
        self.ctype = ctype
        self.headers = list(headers)


CAMERA_TIMEOUT = 10.
MAX_CAMERA_STREAMS = 8


def parse_camera_url(url):
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError("'%s' is not an http:// URL" % (url,))
    u.port  # raises ValueError for a bad port
    return url


def camera_snapshot_url(stream_url):
    # mjpg-streamer and ustreamer (crowsnest) take ?action=snapshot
    u = urllib.parse.urlsplit(stream_url)
    query = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
    if ("action", "stream") not in query:
        return None
    query = [(k, "snapshot" if (k, v) == ("action", "stream") else v)
             for k, v in query]
    return urllib.parse.urlunsplit(u._replace(
        query=urllib.parse.urlencode(query)))


class CameraProxy:
    """Relays the webcam: Cura only ever opens
    http://<printer>:8080/?action=stream, which is this server.

    Every viewer gets its own upstream connection, relayed chunk by chunk
    (nothing is buffered), and closed as soon as either side goes away."""
    def __init__(self, stream_url, snapshot_url):
        self.stream_url = stream_url
        self.snapshot_url = snapshot_url
        self.lock = threading.Lock()
        self.streams = 0

    def _open(self, url):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port or 80,
                                          timeout=CAMERA_TIMEOUT)
        target = urllib.parse.urlunsplit(("", "", u.path or "/", u.query,
                                          ""))
        try:
            conn.request("GET", target)
            resp = conn.getresponse()
        except socket.timeout:
            conn.close()
            raise HTTPError(504, "The camera at %s did not answer" % (url,))
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise HTTPError(502, "Cannot reach the camera at %s: %s"
                            % (url, e))
        if resp.status != 200:
            conn.close()
            raise HTTPError(502, "The camera at %s answered HTTP %d"
                            % (url, resp.status))
        return conn, resp

    def snapshot(self):
        if not self.snapshot_url:
            raise HTTPError(404, "No camera snapshot URL: set "
                            "camera_snapshot_url")
        conn, resp = self._open(self.snapshot_url)
        try:
            data = resp.read(MAX_PREVIEW_SIZE + 1)
        except (OSError, http.client.HTTPException) as e:
            raise HTTPError(502, "Camera snapshot failed: %s" % (e,))
        finally:
            conn.close()
        if len(data) > MAX_PREVIEW_SIZE:
            raise HTTPError(502, "Camera snapshot over %d MiB"
                            % (MAX_PREVIEW_SIZE >> 20,))
        return Payload(data, resp.getheader("Content-Type")
                       or image_type(data))

    def stream(self, req):
        with self.lock:
            if self.streams >= MAX_CAMERA_STREAMS:
                raise HTTPError(503, "Already %d camera viewers"
                                % (self.streams,))
            self.streams += 1
        try:
            conn, resp = self._open(self.stream_url)
            req.close_connection = True
            try:
                req.send_response(200)
                req.send_header("Content-Type", resp.getheader(
                    "Content-Type", "multipart/x-mixed-replace"))
                req.send_header("Cache-Control", "no-store")
                req.send_header("X-Accel-Buffering", "no")  # nginx
                req.send_header("Connection", "close")
                req.end_headers()
                while True:
                    data = resp.read1(READ_CHUNK)
                    if not data:
                        break
                    req.wfile.write(data)
            except (OSError, http.client.HTTPException):
                pass   # the viewer or the camera went away
            finally:
                conn.close()
        finally:
            with self.lock:
                self.streams -= 1
        return None, None


class MachineDefinition:
    """A Cura machine definition (plus one per extruder) made from
    printer.cfg.  With cura_machine: custom, Cura finds it by its BOM
    number and creates this printer instead of an Ultimaker."""
    def __init__(self, config, name):
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        self.id = "cura_connection_" + (slug or "printer")
        self.bom = CUSTOM_BOM_BASE + zlib.crc32(self.id.encode()) % 10**8
        self.name = "%s (Klipper)" % (name,)
        self.notes = []
        self.files = {}
        extruders = []
        i = 0
        # Cura takes up to 16 extruders (machine_extruder_count)
        while i < 16 and config.has_section("extruder%s" % (i or "",)):
            sec = "extruder%s" % (i or "",)
            extruders.append((
                self._number(self._opt(config, sec, "nozzle_diameter", 0.4)),
                self._number(self._opt(config, sec, "filament_diameter",
                                       1.75))))
            i += 1
        extruders = extruders or [(0.4, 1.75)]
        macros = set(s.get_name().split(None, 1)[-1].upper()
                     for s in config.get_prefix_sections("gcode_macro "))
        trains = {str(i): "%s_extruder_%d" % (self.id, i)
                  for i in range(len(extruders))}
        overrides = self._volume(config)
        overrides.update(self._motion(config))
        heated = config.has_section("heater_bed")
        start, end = self._gcode(macros, heated)
        self._tool_macros(macros, len(extruders))
        overrides.update({
            "machine_name": name,
            "machine_heated_bed": heated,
            "machine_extruder_count": len(extruders),
            "machine_gcode_flavor": "RepRap (Marlin/Sprinter)",
            "machine_start_gcode": start,
            "machine_end_gcode": end})
        self._add(self.id, {
            "version": 2, "name": self.name, "inherits": "fdmprinter",
            "metadata": {
                "visible": True,
                "author": "cura_connection (from printer.cfg)",
                # Cura looks BOM numbers up among Ultimaker's machines only
                "manufacturer": "Ultimaker B.V.",
                "file_formats": "application/x-ufp;text/x-gcode",
                "has_materials": True,
                "preferred_material": "generic_pla_175"
                if extruders[0][1] < 2.5 else "generic_pla",
                "machine_extruder_trains": trains,
                "supports_usb_connection": False,
                "supports_network_connection": True,
                "supported_actions": ["DiscoverUM3Action"],
                "bom_numbers": [self.bom]},
            "overrides": {k: {"default_value": v}
                          for k, v in overrides.items()}})
        for i, (nozzle, filament) in enumerate(extruders):
            self._add(trains[str(i)], {
                "version": 2, "name": "Extruder %d" % (i + 1,),
                "inherits": "fdmextruder",
                "metadata": {"machine": self.id, "position": str(i)},
                "overrides": {
                    "extruder_nr": {"default_value": i,
                                    "maximum_value": str(len(extruders) - 1)},
                    "machine_nozzle_size": {"default_value": nozzle},
                    "material_diameter": {"default_value": filament}}})

    def _add(self, def_id, data):
        self.files[def_id + ".def.json"] = (
            json.dumps(data, indent=4) + "\n").encode()

    @staticmethod
    def _opt(config, section, option, default, kind="float"):
        # note_valid=False: reading another section must not hide its typos
        if not config.has_section(section):
            return default
        sec = config.getsection(section)
        try:
            if kind == "float":
                return sec.getfloat(option, default, note_valid=False)
            return sec.get(option, default, note_valid=False)
        except config.error:
            return default

    @staticmethod
    def _number(value):
        # Whole numbers as JSON integers, as Cura's own definitions write
        # them: Cura hands some values to code that takes only ints.
        value = round(value, 4)
        return int(value) if value == int(value) else value

    @staticmethod
    def _whole_mm(value):
        # Build volume in whole millimetres, rounded down (never beyond the
        # printer's limits): Cura 4.13's arranger takes only integers.
        return int(value + 1e-6)

    def _volume(self, config):
        kin = self._opt(config, "printer", "kinematics", "none", "str")
        size = None
        if kin in ("delta", "rotary_delta"):
            radius = (self._opt(config, "printer", "print_radius", None)
                      or self._opt(config, "printer", "delta_radius", None))
            height = self._opt(config, "stepper_a", "position_endstop", None)
            if radius and height:
                shape, center = "elliptic", True
                size = [2 * radius, 2 * radius, height]
        else:
            axes = [(self._opt(config, s, "position_min", 0.),
                     self._opt(config, s, "position_max", None))
                    for s in ("stepper_x", "stepper_y", "stepper_z")]
            if all(hi is not None for lo, hi in axes):
                (xlo, xhi), (ylo, yhi), (_, zhi) = axes
                # -150..150: the origin is the bed's centre, and Cura's bed
                # spans -w/2..w/2.  Otherwise the bed starts at 0; negative
                # minimums are parking room.
                shape, center = "rectangular", all(
                    lo < 0 and abs(lo + hi) <= .1 * (hi - lo)
                    for lo, hi in axes[:2])
                if center:
                    size = [2 * min(-xlo, xhi), 2 * min(-ylo, yhi), zhi]
                else:
                    size = [xhi, yhi, zhi]
                    for axis, (lo, _) in zip("xy", axes):
                        if lo > 0:
                            self.notes.append(
                                "stepper_%s position_min is %g: Cura's "
                                "build plate starts at 0; keep models "
                                "clear of its first %g mm (Klipper "
                                "refuses moves there)." % (axis, lo, lo))
        if size and min(self._whole_mm(v) for v in size) >= 1:
            width, depth, height = [self._whole_mm(v) for v in size]
            return {"machine_shape": shape, "machine_center_is_zero": center,
                    "machine_width": width, "machine_depth": depth,
                    "machine_height": height}
        self.notes.append("No build volume in printer.cfg (kinematics %s): "
                          "200 mm cube; set it in Cura's Machine Settings"
                          % (kin,))
        return {"machine_shape": "rectangular",
                "machine_center_is_zero": False, "machine_width": 200,
                "machine_depth": 200, "machine_height": 200}

    def _motion(self, config):
        velocity = self._opt(config, "printer", "max_velocity", 300.)
        accel = self._opt(config, "printer", "max_accel", 3000.)
        limits = {
            "machine_max_feedrate_x": velocity,
            "machine_max_feedrate_y": velocity,
            "machine_max_feedrate_z": self._opt(
                config, "printer", "max_z_velocity", velocity),
            "machine_max_acceleration_x": accel,
            "machine_max_acceleration_y": accel,
            "machine_max_acceleration_z": self._opt(
                config, "printer", "max_z_accel", accel),
            "machine_acceleration": accel}
        return {k: self._number(v) for k, v in limits.items()}

    def _tool_macros(self, macros, count):
        # CuraEngine writes T0 before the start G-code of every print on a
        # machine with more than one extruder, and Tn at each tool change;
        # Klipper has no such commands unless printer.cfg defines them (it
        # only answers "Unknown command").
        missing = ["T%d" % (i,) for i in range(count)
                   if "T%d" % (i,) not in macros]
        if count > 1 and missing:
            self.notes.append(
                "Cura writes T0..T%d (the extruder to print with) before "
                "the start G-code of every print and at each tool change, "
                "but printer.cfg has no [gcode_macro %s].  Unless "
                "another section (a tool changer's) defines them, add "
                "macros that select the extruder (T1: ACTIVATE_EXTRUDER "
                "EXTRUDER=extruder1): Klipper answers \"Unknown command\" "
                "to these and ignores them, so a print runs all on one "
                "extruder."
                % (count - 1, "], [gcode_macro ".join(missing)))

    def _gcode(self, macros, heated):
        start = [m for m in ("PRINT_START", "START_PRINT") if m in macros]
        end = [m for m in ("PRINT_END", "END_PRINT") if m in macros]
        if start:
            # Naming the temperatures also stops Cura adding its own
            # M190/M109 before the macro.
            bed = " BED_TEMP={material_bed_temperature_layer_0}" \
                if heated else ""
            start_gcode = ("; heating, homing and priming: your %s macro\n"
                           "%s%s EXTRUDER_TEMP={material_print_temperature"
                           "_layer_0, initial_extruder_nr}"
                           % (start[0], start[0], bed))
        else:
            start_gcode = "G28 ; home all axes\nG92 E0\n"
        if end:
            end_gcode = "%s\n" % (end[0],)
        else:
            end_gcode = ("M104 S0 ; heaters off\n"
                         + ("M140 S0\n" if heated else "")
                         + "M107 ; fan off\nM84 ; motors off\n")
        return start_gcode, end_gcode

    def zip(self):
        import io
        import textwrap
        import zipfile
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for fname, data in sorted(self.files.items()):
                folder = "definitions" if fname == self.id + ".def.json" \
                    else "extruders"
                z.writestr("%s/%s" % (folder, fname), data)
            notes = "".join("\n%s\n" % (textwrap.fill("Note: " + n, 72),)
                            for n in self.notes)
            z.writestr("README.txt", DEFINITION_HOWTO % {
                "id": self.id, "bom": self.bom, "name": self.name,
                "folders": cura_data_folders_text(), "notes": notes})
        return buf.getvalue()


# Where Cura reads machine definitions from, per system: Uranium's data
# folder (on Linux not its configuration folder)
CURA_DATA_FOLDERS = (
    ("Windows", "%APPDATA%\\cura\\<version>"),
    ("macOS", "~/Library/Application Support/cura/<version>"),
    ("Linux", "~/.local/share/cura/<version>"),
)
CURA_DATA_FOLDER_NOTE = (
    "<version> is Cura's, e.g. 5.11. Help > Show Configuration Folder"
    " opens it on Windows and macOS; on Linux it opens"
    " ~/.config/cura/<version>, which is not it. A set $XDG_DATA_HOME"
    " takes the place of ~/.local/share.")


def cura_data_folders_text():
    # for the zip's README.txt
    import textwrap
    return "".join("     %s: %s\n" % f for f in CURA_DATA_FOLDERS) + \
        textwrap.fill(CURA_DATA_FOLDER_NOTE, 72, initial_indent="   ",
                      subsequent_indent="   ")


def cura_data_folders_html():
    # for the web page (where it says <!--cura-data-folders-->)
    from html import escape
    return "<ul>%s</ul><small>%s</small>" % ("".join(
        "<li>%s: <code>%s</code></li>" % (escape(system), escape(folder))
        for system, folder in CURA_DATA_FOLDERS),
        escape(CURA_DATA_FOLDER_NOTE))


DEFINITION_HOWTO = """\
Cura machine definition for %(name)s, made by cura_connection from the
printer's Klipper configuration.

1. Close Cura.  Cura reads machine definitions from the "definitions"
   and "extruders" folders of its data folder:
%(folders)s
2. Copy definitions/*.def.json into that folder's "definitions" folder
   and extruders/*.def.json into its "extruders" folder (create them if
   missing).
3. In printer.cfg, [cura_connection]: cura_machine: custom, then restart
   Klipper.  The printer now announces BOM %(bom)s, which is this
   definition's (%(id)s).
4. Start Cura, Add printer > Add a networked printer (or Add printer by
   IP): the printer shows as "%(name)s".  Not under "Add a
   non-networked printer" (there it is listed under Ultimaker B.V.): a
   printer added that way has no network connection.
   If Cura shows the printer as "Unknown" and will not connect, it lacks
   this definition: check step 2 and restart Cura.
5. A printer added earlier as an Ultimaker keeps that type (and its build
   plate and print cores).  Add the printer again as in step 4 first, then
   remove the old one in Preferences > Printers (Cura keeps Remove greyed
   out while it is the only printer).
%(notes)s"""
WEB_PAGE = os.path.join(os.path.dirname(os.path.realpath(__file__)),
                        "cura_connection_web.html")


def web_page():
    """The web page's bytes, with Cura's data folders filled in (either
    process serves it); OSError when the file is missing."""
    with open(WEB_PAGE, "rb") as f:
        page = f.read()
    return page.replace(b"<!--cura-data-folders-->",
                        cura_data_folders_html().encode())


######################################################################
# Access control: trusted networks, browsers, paired Cura clients
######################################################################

def parse_trusted_clients(text):
    """"10.0.0.0/8, 192.168.1.5" -> networks; ValueError names a bad one."""
    nets = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("'%s' is not an IP address or network" % (item,))
    return nets


@functools.lru_cache(maxsize=256)
def client_ip(address, real_ip=None):
    # The IP to judge a request by.  Behind install.sh's nginx block the
    # peer is loopback and X-Real-IP names the real client; only a local
    # peer may name another one.
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if real_ip and ip.is_loopback:
        return client_ip(real_ip.strip())
    return ip


def reachable_ip(host, sock):
    # The address Cura reached us on: Host (nginx or iptables keep it)
    # when it is an IP, else this socket's local address.
    host = (host or "").strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return ip_text(host) or sock.getsockname()[0]


def is_trusted(ip, networks):
    return ip is not None and any(ip in net for net in networks)


def untrusted(ip):
    """The refusal of a client outside trusted_clients."""
    return HTTPError(403, "%s is not in trusted_clients" % (ip,), close=True)


@functools.lru_cache(maxsize=256)
def ip_text(host):
    # "192.168.1.5" -> the same, normalised; a name -> None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


# Names a browser may use for this printer when it changes something.  A
# DNS-rebinding page reaches the printer under its own public name.
LOCAL_NAME_SUFFIXES = (".local", ".lan", ".home", ".internal", ".localdomain",
                       ".home.arpa", ".fritz.box")


def host_name(value):
    # "Host" header or URL netloc -> lower-case host without port/brackets
    value = (value or "").strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def is_local_name(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    host = host.rstrip(".")
    return bool(host) and ("." not in host or host.endswith(
        LOCAL_NAME_SUFFIXES) or host == socket.gethostname().lower())


DIGEST_REALM = "Jedi-API"
DIGEST_PARAM_RE = re.compile(
    r'([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')


def parse_digest(header):
    """Authorization: Digest k=v, k="v" -> dict (None if not Digest)."""
    if not header or header[:7].lower() != "digest ":
        return None
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None
            else m.group(3) for m in DIGEST_PARAM_RE.finditer(header[7:])}


def sha256_hex(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def clean_text(value, limit=64):
    # Client-chosen text shown in the console: printable, one line, short
    text = value if isinstance(value, str) else ""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class AuthStore(SavedState):
    """The credentials Cura >= 5.11 asks for (POST /api/v1/auth/request)
    and which of them the user allowed (CURA_ALLOW), kept in auth.json."""
    MAX_PENDING = 16
    MAX_CLIENTS = 64
    NC_WINDOW = 64       # how far out of order parallel requests may come
    MAX_NONCES = 256     # per client: older nonces are forgotten
    REASK_WINDOW = 30.   # s: a refused Cura asks again within seconds

    # saved client field -> check of its value (key and allowed needed)
    CLIENT_FIELDS = {
        "key": lambda v: isinstance(v, str) and 16 <= len(v) <= 128,
        "allowed": lambda v: isinstance(v, bool),
        "application": lambda v: isinstance(v, str),
        "user": lambda v: isinstance(v, str),
        "address": lambda v: isinstance(v, str),
        "requested_at": lambda v: isinstance(v, str)}
    ID_RE = re.compile(r"^[0-9a-z]{1,64}$")

    def __init__(self, path):
        SavedState.__init__(self, path)
        self.clients = {}    # id -> {"key", "application", "user", ...}
        self.nonces = {}     # id -> OrderedDict nonce -> set of nc seen
        self.refused = {}    # id -> monotonic time of a read refused 401
        self._load()

    def _load(self):
        clients = self.read_file().get("clients", {})
        if not isinstance(clients, dict):
            self.drop("clients", "not an object")
            return
        for key_id, client in clients.items():
            try:
                if not self.ID_RE.match(key_id):
                    raise ValueError("not an id of 1-64 letters and digits")
                if not isinstance(client, dict):
                    raise ValueError("not an object")
                for field in ("key", "allowed"):
                    if field not in client:
                        raise ValueError("no %s" % (field,))
                bad = [f for f, check in self.CLIENT_FIELDS.items()
                       if f in client and not check(client[f])]
                if bad:
                    raise ValueError("bad %s" % (bad[0],))
            except ValueError as e:
                self.drop("client %s" % (clean_text(key_id),), e)
                continue
            self.clients[key_id] = {f: client[f] for f in self.CLIENT_FIELDS
                                    if f in client}

    file_mode = 0o600   # the keys are secrets

    def state(self):
        return {"version": 1, "clients": self.clients}

    def request(self, application, user, address):
        with self.lock:
            while True:
                key_id = uuid.uuid4().hex[:8]
                if key_id not in self.clients:
                    break
            self.clients[key_id] = {
                "key": uuid.uuid4().hex, "application": clean_text(
                    application), "user": clean_text(user),
                "address": address, "allowed": False,
                "requested_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            pending = [k for k, c in self.clients.items()
                       if not c.get("allowed")]
            for k in pending[:-self.MAX_PENDING]:
                del self.clients[k]
            self.changed()
            return key_id, self.clients[key_id]["key"]

    def allow(self, key_id):
        with self.lock:
            client = self.clients.get(key_id)
            if client is None:
                return False
            client["allowed"] = True
            allowed = [k for k, c in self.clients.items() if c.get("allowed")]
            for k in allowed[:-self.MAX_CLIENTS]:
                del self.clients[k]
            self.changed()
            return True

    def remove(self, key_id):
        with self.lock:
            self.nonces.pop(key_id, None)
            self.refused.pop(key_id, None)
            if self.clients.pop(key_id, None) is None:
                return False
            self.changed()
            return True

    def listing(self):
        with self.lock:
            return [dict(c, id=k) for k, c in self.clients.items()]

    def status(self, key_id):
        with self.lock:
            client = self.clients.get(key_id)
        if client is None:
            return "unknown"
        return "authorized" if client["allowed"] else "unauthorized"

    def find_pending(self, application, user, address):
        """(id, key) of a request still waiting for CURA_ALLOW from this
        application, user and address, or None: Cura drops its
        credentials at every 401 and asks again, and must get the same
        back -- also when they were allowed in between (until it signs
        with them again)."""
        application, user = clean_text(application), clean_text(user)
        now = time.monotonic()
        with self.lock:
            for key_id, c in self.clients.items():
                if c.get("address") != address \
                        or c.get("application") != application \
                        or c.get("user") != user:
                    continue
                if not c.get("allowed"):
                    return key_id, c["key"]
                if now - self.refused.get(key_id, -1e9) \
                        < self.REASK_WINDOW:
                    return key_id, c["key"]
        return None

    def refuse_waiting(self, key_id):
        """Note that this waiting client's read was just refused (401)."""
        with self.lock:
            self.refused[key_id] = time.monotonic()

    def verify(self, method, uri, header):
        """Check a Digest signature (cura-protocol.md 2.3): returns the
        client id, or raises HTTPError 401 (bad, replayed) / 403."""
        key_id, allowed = self.identify(method, uri, header)
        if not allowed:
            raise HTTPError(403, "This Cura is not allowed yet: run "
                            "CURA_ALLOW ID=%s on the printer" % (key_id,))
        return key_id

    def identify(self, method, uri, header, once=True):
        """Check a Digest signature: returns (client id, allowed), or
        raises HTTPError 403 (unsigned) or 401 with a fresh challenge
        (unknown client, bad signature; replayed when `once`: reads may
        come again, a change only once)."""
        p = parse_digest(header)
        if p is None:
            raise HTTPError(403, "Changes need a Cura paired with this "
                            "printer (Cura 5.11 or newer; CURA_PAIRING "
                            "lists requests)")
        key_id = p.get("username", "")
        with self.lock:
            client = self.clients.get(key_id)
            key = client and client["key"]
        try:
            nc = int(p.get("nc", ""), 16)
        except ValueError:
            nc = -1
        if client is None or p.get("realm") != DIGEST_REALM \
                or p.get("qop") != "auth" or nc < 0 \
                or (p.get("algorithm") or "").upper() != "SHA-256" \
                or p.get("uri") != uri or not p.get("nonce"):
            raise self.challenge("Unknown or malformed credentials")
        ha1 = sha256_hex("%s:%s:%s" % (key_id, DIGEST_REALM, key))
        ha2 = sha256_hex("%s:%s" % (method, uri))
        expected = sha256_hex("%s:%s:%s:%s:auth:%s" % (
            ha1, p["nonce"], p["nc"], p.get("cnonce", ""), ha2))
        if not hmac.compare_digest(expected,
                                   (p.get("response") or "").lower()):
            raise self.challenge("Wrong Digest signature")
        if not once:
            with self.lock:
                allowed = client.get("allowed")
                if allowed:
                    self.refused.pop(key_id, None)   # it has its key
                return key_id, bool(allowed)
        with self.lock:
            # A signature covers method and path, not the body: each
            # (nonce, nc) is accepted once, so a captured request cannot
            # be sent again (with another body).
            seen_by_nonce = self.nonces.setdefault(
                key_id, collections.OrderedDict())
            seen = seen_by_nonce.pop(p["nonce"], None)
            if seen is None:
                seen = set()
            top = max(seen) if seen else nc
            if nc in seen or nc <= top - self.NC_WINDOW:
                seen_by_nonce[p["nonce"]] = seen
                raise self.challenge("Replayed request (nonce count %d)"
                                     % (nc,))
            seen.add(nc)
            top = max(top, nc)
            seen.difference_update([n for n in seen
                                    if n <= top - self.NC_WINDOW])
            seen_by_nonce[p["nonce"]] = seen
            while len(seen_by_nonce) > self.MAX_NONCES:
                seen_by_nonce.popitem(last=False)
            allowed = client.get("allowed")
            if allowed:
                self.refused.pop(key_id, None)
        return key_id, bool(allowed)

    @staticmethod
    def challenge(message):
        # A fresh server nonce: Cura adopts it (and restarts its count)
        nonce = uuid.uuid4().hex
        return HTTPError(401, message, headers=[(
            "WWW-Authenticate", 'Digest realm="%s", nonce="%s", qop="auth",'
            ' algorithm=SHA-256' % (DIGEST_REALM, nonce))])


######################################################################
# HTTP routes: Cura's cluster API
######################################################################

UUID_RE = r"([0-9a-fA-F-]{1,64})"
MATERIALS_PATH = "/cluster-api/v1/materials"
ROUTES = [
    ("GET", r"/api/v1/system", "get_system"),
    ("POST", r"/api/v1/auth/request", "post_auth_request"),
    ("GET", r"/api/v1/auth/check/([0-9a-zA-Z]{1,64})", "get_auth_check"),
    ("GET", r"/api/v1/auth/verify", "get_auth_verify"),
    ("GET", r"/cluster-api/v1/printers", "get_printers"),
    ("GET", r"/cluster-api/v1/print_jobs", "get_print_jobs"),
    ("GET", r"/cluster-api/v1/print_jobs/history", "get_history"),
    ("POST", r"/cluster-api/v1/print_jobs", "post_print_job"),
    ("GET", r"/cluster-api/v1/print_jobs/%s" % UUID_RE, "get_print_job"),
    ("PUT", r"/cluster-api/v1/print_jobs/%s" % UUID_RE, "put_print_job"),
    ("DELETE", r"/cluster-api/v1/print_jobs/%s" % UUID_RE,
     "delete_print_job"),
    ("PUT", r"/cluster-api/v1/print_jobs/%s/action" % UUID_RE, "put_action"),
    ("POST", r"/cluster-api/v1/print_jobs/%s/action/move" % UUID_RE,
     "post_move"),
    ("GET", r"/cluster-api/v1/print_jobs/%s/preview_image" % UUID_RE,
     "get_preview_image"),
    ("GET", MATERIALS_PATH, "get_materials"),
    ("POST", MATERIALS_PATH, "post_material"),
    # not Cura's: the web page's, the camera and the machine definition
    ("POST", r"/cluster-api/v1/printers/%s/action/plate_cleared" % UUID_RE,
     "post_plate_cleared"),
    ("GET", r"/", "get_root"),            # Cura's camera: /?action=stream
    ("GET", r"/printers/camera", "get_root"),   # same, under nginx's paths
    ("GET", r"/print_jobs", "get_page"),  # "Manage in browser" links
    ("GET", r"/printers", "get_page"),
    ("GET", r"/printers/cura_definition\.zip", "get_definition_zip"),
    ("GET", r"/printers/cura_definition/([A-Za-z0-9_.]{1,200})",
     "get_definition_file"),
]
COMPILED_ROUTES = [(m, re.compile(p + "$"), h) for m, p, h in ROUTES]


def find_route(method, path):
    """(handler name, url groups) of a request (path without its query);
    HTTPError 405 for a path of another method, 404 for no such path
    (both processes route with this)."""
    path = path.rstrip("/") or "/"
    allowed = []
    for m, regex, handler in COMPILED_ROUTES:
        match = regex.match(path)
        if match:
            if m == method:
                return handler, match.groups()
            allowed.append(m)
    if allowed:
        raise HTTPError(405, "%s is not allowed on %s (use %s)"
                        % (method, path, ", ".join(allowed)))
    raise HTTPError(404, "No such endpoint: %s" % (path,))


def camera_action(path):
    """What a path of the camera routes asks: "stream", "snapshot" or
    "" (the page, or the 404 that names the camera address)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    action = query.get("action", [""])[0]
    return action if action in ("stream", "snapshot") else ""


# What a job's reply is made of (its saved fields): a change to any of
# them is a new reply
JOB_REPLY_KEY = operator.attrgetter(*JOB_FIELDS)


class ReplyCache:
    """Replies serialized once and reused while what they show is unchanged.

    A poll of an unchanged printer or job list then costs a key compare,
    not a JSON encoding; a long queue is encoded job by job (short GIL
    holds, with pause() between them), and only jobs that changed.  The
    list goes out in chunks: joining 6 MB at once held the GIL for 10-20 ms
    on a busy host.  A poll leaves few new objects behind (keys are flat
    tuples of plain values): Klipper's reactor runs the garbage collector
    itself, and its pause grows with what other threads left to collect.
    One cache per job list: it keeps the jobs of the last list only."""
    PAUSE_EVERY = 20       # jobs encoded or checked between pause() calls
    CHUNK = 100            # jobs per chunk of the list

    def __init__(self, api):
        self.api = api
        self.printer = (None, b"")
        # uuid -> (what the JSON was made from, JSON bytes); replaced
        # whole, so a thread never sees one job's key with another's JSON
        self.entries = {}
        self.listing = ([], [b"[]"])   # the last list: parts, chunks

    def printers(self, snap, req):
        """JSON bytes of the /printers list for this snapshot."""
        api = self.api
        cur = api.store.current
        config = json.dumps(api.printer_configuration(snap))
        key = (snap["seq"], req.reachable_ip(), config, api.store.plate_clear,
               cur and JOB_REPLY_KEY(cur))
        if self.printer[0] != key:
            self.printer = (key, json.dumps(
                [api.printer_json(snap, req)]).encode())
        return self.printer[1]

    def job(self, job, linked, config, entries):
        """JSON bytes of one job (config: CuraApi.jobs_basis()); its
        entry goes into entries."""
        key = JOB_REPLY_KEY(job) + (linked, config)
        entry = self.entries.get(job.uuid)
        if entry is None or entry[0] != key:
            # (an unchanged job keeps its old entry: nothing new to collect)
            entry = (key, json.dumps(self.api.job_json(job, linked)).encode())
        entries[job.uuid] = entry
        return entry[1]

    def job_list(self, linked, others, pause):
        """The JSON list of the jobs linked (on the printer), then the
        others, as a list of bytes."""
        config = self.api.jobs_basis()
        parts, entries = [], {}
        for i, job in enumerate(linked + others):
            if i and not i % self.PAUSE_EVERY:
                pause()
            parts.append(self.job(job, i < len(linked), config, entries))
        self.entries = entries    # jobs no longer listed are forgotten
        last_parts, chunks = self.listing
        if parts != last_parts:     # the same bytes objects: compared fast
            chunks = [b", ".join(parts[i:i + self.CHUNK])
                      for i in range(0, len(parts), self.CHUNK)]
            chunks = [b"["] + [b", " + c if i else c
                               for i, c in enumerate(chunks)] + [b"]"]
            self.listing = (parts, chunks)
        return chunks


class CuraApi:
    """The cluster API: turns requests into JSON from snapshots and store.
    Handlers run in HTTP threads: they read snapshots and the store, and
    change jobs only through bridge.call(lifecycle...), in the reactor."""
    def __init__(self, conn):
        self.conn = conn
        self.bridge = conn.bridge
        self.store = conn.store
        self.lifecycle = conn.lifecycle
        self.intake = conn.intake
        self.materials = conn.materials
        self.replies = ReplyCache(self)
        self.history_replies = ReplyCache(self)    # the page's history
        self.auth_request_lock = threading.Lock()

    def route(self, method, path):
        handler, args = find_route(method, path)
        return getattr(self, handler), args

    # JSON models
    def printer_configuration(self, snap):
        return [{"extruder_index": i,
                 "print_core_id": self.conn.print_core_ids[i],
                 "material": self.material_json(self.conn.loaded.get(i))}
                for i in range(self.conn.extruder_count)]

    def material_json(self, entry):
        # Cura shows name and colour of the GUIDs it has; for others,
        # "Unknown" in the colour given here (a QML colour: code or name)
        if not entry:
            return None
        if entry.get("material") == "empty":
            return {"guid": "", "material": "empty", "brand": "",
                    "color": "", "name": "Empty"}
        known = self.materials.resolve(entry)
        if known:
            return {"guid": known["guid"], "brand": known["brand"],
                    "material": known["material"],
                    "color": known["color_code"] or known["color"],
                    "name": known["name"]}
        # Cura only redraws a material whose GUID changed: give each
        # brand/type/colour its own
        guid = entry.get("guid") or str(uuid.uuid5(
            uuid.NAMESPACE_URL, "cura-connection:material:%s/%s/%s" % (
                entry.get("brand", ""), entry.get("material", ""),
                entry.get("color", ""))))
        return {"guid": guid, "brand": entry.get("brand", ""),
                "material": entry.get("material", ""),
                "color": entry.get("color", ""),
                "name": " ".join(entry[k] for k in (
                    "brand", "material", "color") if entry.get(k))
                or "Unknown"}

    def printer_json(self, snap, req):
        cur = self.store.current
        kstate = snap["klippy_state"]
        if kstate == "startup":
            status = "booting"
        elif kstate != "ready":
            status = "error"
        elif (cur is not None and cur.status in ACTIVE) or \
                snap["print_stats"].get("state") in ("printing", "paused"):
            status = "printing"
        else:
            status = "idle"
        return {
            "enabled": True, "firmware_version": FIRMWARE_VERSION,
            "friendly_name": self.conn.name, "unique_name": self.conn.name,
            "ip_address": req.reachable_ip(),
            "machine_variant": self.conn.machine_variant,
            "status": status, "uuid": self.conn.printer_uuid,
            "configuration": self.printer_configuration(snap),
            "build_plate": {"type": "glass"}, "reserved_by": None,
            "maintenance_required": False,
            "firmware_update_status": "up_to_date",
            "latest_available_firmware": FIRMWARE_VERSION,
            # extra fields, ignored by Cura, read by the web page
            "klipper_state": kstate, "state_message": snap["state_message"],
            "extruders": snap["extruders"], "heater_bed": snap["heater_bed"],
            "plate_clear": self.store.plate_clear,
            "progress": snap["virtual_sdcard"].get("progress"),
            "camera": self.conn.camera is not None,
            "machine_definition": self.conn.definition.id,
        }

    def jobs_basis(self):
        # JSON of what jobs' replies are made of besides their fields: the
        # printer's configuration, the loaded entries changes compare
        return json.dumps([self.printer_configuration(None),
                           self.conn.loaded.status_cache])

    def job_configuration(self, job):
        # The printer's configuration, with what the job's file asks of
        # the extruders it names
        config = self.printer_configuration(None)
        for wanted in job.materials:
            if wanted["extruder"] >= len(config):
                continue
            extruder = config[wanted["extruder"]]
            if wanted.get("print_core_id") and extruder["print_core_id"]:
                extruder["print_core_id"] = wanted["print_core_id"]
            if wanted.get("guid") or wanted.get("material"):
                extruder["material"] = self.wanted_material_json(wanted)
        return config

    def wanted_material_json(self, wanted):
        # A job's material as the printer's are shown (by GUID, else the
        # file's own names and colour code)
        entry = {k: wanted[k] for k in ("guid", "brand", "material")
                 if wanted.get(k)}
        if wanted.get("color_code") or wanted.get("color"):
            entry["color"] = wanted.get("color_code") or wanted["color"]
        d = self.material_json(entry)
        d["name"] = wanted.get("name") or d["name"]
        return d

    def configuration_changes(self, job):
        # Cura's "Configuration change" list for a job that waits for one;
        # material_change only: Cura lets the user override it
        changes = []
        for index, wanted, loaded in self.conn.configuration_changes(job):
            target = self.wanted_material_json(wanted)
            origin = self.material_json(loaded)
            changes.append({
                "type_of_change": "material_change", "index": index,
                "target_id": target["guid"], "origin_id": origin["guid"],
                "target_name": target["name"],
                "origin_name": origin["name"]})
        return changes

    def job_json(self, job, linked):
        d = {"uuid": job.uuid, "name": job.name, "owner": job.owner,
             "created_at": job.created_at, "status": job.status,
             "started": job.started, "force": job.force,
             "machine_variant": self.conn.machine_variant,
             "time_total": int(job.time_total),
             "time_elapsed": int(job.time_elapsed or 0),
             "configuration": self.job_configuration(job),
             "constraints": [],
             "configuration_changes_required":
                 self.configuration_changes(job),
             "impediments_to_printing": [], "build_plate": {"type": "glass"},
             "compatible_machine_families": [self.conn.machine_variant],
             "filename": job.filename, "source": job.source,
             "has_preview": bool(job.preview), "finished_at": job.finished_at}
        if job.message:
            d["message"] = job.message
        # Only the job on the printer may point at it (Cura pitfall 6)
        if linked:
            d["printer_uuid"] = d["assigned_to"] = self.conn.printer_uuid
        elif job.started:
            d["printed_on_uuid"] = self.conn.printer_uuid
        return d

    # Handlers: (request, *url groups) -> (status, JSON-able or bytes)
    def get_system(self, req):
        return 200, {
            "guid": self.conn.printer_uuid, "firmware": FIRMWARE_VERSION,
            "hostname": socket.gethostname(), "name": self.conn.name,
            "platform": "Klipper %s" % (self.conn.klipper_version,),
            "variant": self.conn.machine_variant,
            "hardware": {"typeid": self.conn.machine_bom, "revision": 0},
        }

    def post_auth_request(self, req):
        # Cura >= 5.11 asks for credentials and then signs requests with
        # them (HTTP Digest).  With require_pairing the user allows them
        # with CURA_ALLOW; otherwise they are handed out and accepted.
        body = req.read_json(optional=True)
        if not isinstance(body, dict):
            body = {}
        auth = self.conn.auth
        with self.auth_request_lock:
            # Cura asks again after each 401 (and several times at once
            # when it connects): one waiting request per Cura
            found = auth.find_pending(body.get("application"),
                                      body.get("user"), str(req.client_ip()))
            if found:
                return 200, {"id": found[0], "key": found[1]}
            key_id, key = auth.request(body.get("application"),
                                       body.get("user"),
                                       str(req.client_ip()))
        try:
            auth.save()
        except OSError as e:
            logging.error("cura_connection: cannot save credentials: %s", e)
        if self.conn.require_pairing:
            self.conn.console(
                "Cura (%s, %s) at %s asks to control this printer: "
                "CURA_ALLOW ID=%s allows it, CURA_PAIRING lists requests"
                % (clean_text(body.get("application")) or "?",
                   clean_text(body.get("user")) or "?", req.client_ip(),
                   key_id))
        return 200, {"id": key_id, "key": key}

    def get_auth_check(self, req, key_id):
        status = self.conn.auth.status(key_id)
        if status != "unknown" and not self.conn.require_pairing:
            status = "authorized"
        return 200, {"message": status}

    def get_auth_verify(self, req):
        if self.conn.require_pairing:
            self.conn.auth.verify(req.command, req.path,
                                  req.headers.get("Authorization"))
        return 200, {"message": "ok"}

    # The three polled replies (also published to the front process)
    def printers_reply(self, req):
        """JSON bytes of /printers as req (its reachable_ip()) sees it."""
        return self.replies.printers(self.bridge.snapshot, req)

    def print_jobs_reply(self, pause):
        """The /print_jobs list as chunks of JSON bytes: only the
        printer's job and the queue, as an Ultimaker lists them (Cura
        clears its printer card only when the job leaves this list)."""
        linked, others = self.store.printer_jobs()
        return self.replies.job_list(linked, others, pause)

    def history_reply(self, pause):
        cur, queue, history = self.store.all_jobs()
        return self.history_replies.job_list([], history, pause)

    def get_printers(self, req):
        return 200, Payload(self.printers_reply(req), "application/json")

    def get_print_jobs(self, req):
        return 200, Payload(self.print_jobs_reply(req.server.gate.breathe),
                            "application/json")

    def get_history(self, req):
        return 200, Payload(self.history_reply(req.server.gate.breathe),
                            "application/json")

    def get_print_job(self, req, job_uuid):
        job = self.store.get(job_uuid)
        return 200, self.job_json(job, job in self.store.printer_jobs()[0])

    def get_preview_image(self, req, job_uuid):
        job = self.store.get(job_uuid)
        data = job.preview and self.intake.read_preview(job.preview)
        if not data:
            raise HTTPError(404, "Print job %s has no preview image"
                            % (job.name,))
        return 200, data

    def post_print_job(self, req):
        req.require_control()
        return 200, receive_upload(
            req, self.intake, lambda: len(self.store.queue),
            self.conn.max_queue, lambda filename, owner, meta:
            self.add_upload(filename, owner, meta, req.client_address[0]))

    def add_upload(self, filename, owner, meta, address):
        """A received print file (its G-code in place) becomes a queued
        job, saved before the reply: {uuid, name, filename, status}.
        Conflict when the queue is full, StorageError when the queue
        cannot be saved; either way the file is removed."""
        # (meta comes from the front process too: cleaned again)
        name = label_text(meta.get("name"), MAX_JOB_NAME)
        job = Job(name=name or os.path.splitext(filename)[0],
                  filename=filename, owner=owner,
                  time_estimate=meta["time_estimate"],
                  time_total=meta["time_estimate"], preview=meta["preview"],
                  materials=self.materials.name_job_materials(
                      meta["materials"], meta["material_profiles"]))
        try:
            # (the front process counts the queue it was last shown: the
            # limit is checked again where the job is added)
            self.bridge.call(self.lifecycle.add, job, self.conn.max_queue)
        except CuraError:
            self.intake.remove(filename, meta["preview"])
            raise
        try:
            self.store.save()
        except OSError as e:
            # An unsaved job would vanish at the next restart: the upload
            # fails whole instead (unless it was deleted meanwhile),
            # leaving no job and no file.
            unsaved = self.bridge.call(self.lifecycle.change,
                                       self.store.take_back, job)
            if unsaved:
                self.intake.remove(filename, meta["preview"])
                raise storage_error(e, self.store.path)
        finally:
            job.arriving = False    # (saved, or taken back)
        logging.info("cura_connection: received %s from %s (%s)",
                     filename, job.owner, address)
        return {"uuid": job.uuid, "name": job.name, "filename": filename,
                "status": job.status}

    def put_action(self, req, job_uuid):
        req.require_control()
        body = req.read_json()
        action = body.get("action") if isinstance(body, dict) else None
        if not isinstance(action, str) or action not in ACTIONS:
            raise HTTPError(400, "action must be one of %s"
                            % (", ".join(sorted(ACTIONS)),))
        self.store.get(job_uuid)
        # answered once Klipper did it (or refused: 409)
        status, job_status = self.bridge.call(self.lifecycle.act, job_uuid,
                                              action)
        self.store.save()
        return status, {"status": job_status}

    def post_move(self, req, job_uuid):
        req.require_control()
        body = req.read_json()
        pos = body.get("to_position") if isinstance(body, dict) else None
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0 \
                or body.get("list", "queued") != "queued":
            raise HTTPError(400, 'Expected {"to_position": <n>, '
                            '"list": "queued"}')
        self.bridge.call(self.lifecycle.change, self.store.move, job_uuid,
                         pos)
        self.store.save()
        return 200, {"message": "moved"}

    def put_print_job(self, req, job_uuid):
        req.require_control()
        body = req.read_json()
        if not isinstance(body, dict) or not isinstance(body.get("force"),
                                                        bool):
            raise HTTPError(400, 'Expected {"force": true}')
        self.bridge.call(self.lifecycle.change, self.store.set_force,
                         job_uuid, body["force"])
        self.store.save()
        return 200, {"message": "ok"}

    def delete_print_job(self, req, job_uuid):
        req.require_control()
        self.bridge.call(self.lifecycle.change, self.store.delete, job_uuid)
        self.store.save()
        return 200, {"message": "deleted"}

    def get_materials(self, req):
        return 200, [{"guid": m["guid"], "version": m["version"],
                      "brand": m["brand"], "material": m["material"],
                      "color": m["color"]}
                     for m in self.materials.list()]

    def post_material(self, req):
        # Cura syncs only when it connects, before anyone could allow it:
        # a waiting Cura's profiles are kept until CURA_ALLOW stores them.
        waiting = req.require_control(waiting_ok=True)
        body = req.read_body(MAX_MATERIAL_BODY)
        boundary = req.multipart_boundary()
        parts = parse_small_multipart(body, boundary)
        files = [p for p in parts if p["filename"] is not None
                 and p["name"] != "signature_file"]
        if len(files) != 1:
            raise HTTPError(400, "Send one material file in part 'file'")
        if waiting is not None:
            self.materials.hold(waiting, files[0]["filename"],
                                files[0]["data"])
            return 200, {"message": "kept until this Cura is allowed "
                         "(CURA_PAIRING, CURA_ALLOW)"}
        added = self.materials.add(files[0]["filename"], files[0]["data"])
        if not added:
            return 200, {"message": "not added: the printer has this "
                         "version or a newer one"}
        return 200, {"message": "stored"}

    # Not Cura's: the web page, the camera and the machine definition
    def post_plate_cleared(self, req, printer_uuid):
        req.require_control()
        req.read_json(optional=True)
        if printer_uuid != self.conn.printer_uuid:
            raise HTTPError(404, "No printer %s" % (printer_uuid,))
        # the same operation as CURA_BUILD_PLATE_CLEARED, in the reactor
        self.bridge.call(self.lifecycle.plate_cleared)
        self.store.save()
        return 200, {"message": "Build plate marked clear"}

    @staticmethod
    def wants_html(req):
        return "text/html" in req.headers.get("Accept", "")

    def get_page(self, req):
        if not self.wants_html(req):
            # scripts asking the browser paths get the API's JSON
            if req.path.split("?", 1)[0].rstrip("/").endswith("/printers"):
                return self.get_printers(req)
            return self.get_print_jobs(req)
        try:
            page = web_page()
        except OSError as e:
            raise HTTPError(500, "Web page missing: %s" % (e,))
        return 200, Payload(page, "text/html; charset=utf-8")

    def get_root(self, req):
        action = camera_action(req.path)
        if action:
            if self.conn.camera is None:
                raise HTTPError(404, "No camera: set camera_url in "
                                "[cura_connection]")
            if action == "snapshot":
                return 200, self.conn.camera.snapshot()
            return self.conn.camera.stream(req)
        if self.wants_html(req):
            return self.get_page(req)
        raise HTTPError(404, "No such endpoint: / (the camera is "
                        "/?action=stream)")

    def get_definition_zip(self, req):
        return 200, Payload(self.conn.definition.zip(), "application/zip", [
            ("Content-Disposition", 'attachment; filename="%s.zip"'
             % (self.conn.definition.id,))])

    def get_definition_file(self, req, fname):
        data = self.conn.definition.files.get(fname)
        if data is None:
            raise HTTPError(404, "No definition file %s" % (fname,))
        return 200, Payload(data, "application/json", [
            ("Content-Disposition", 'attachment; filename="%s"' % (fname,))])


def receive_upload(req, intake, queued, max_queue, add):
    """Not the reactor: admit the upload in req (queue room and disk space
    are taken before the body is read: see FileIntake.begin), receive it,
    and return add(filename, owner, meta), the reply.  What begin()
    reserved is held until add() has made the job."""
    length = req.content_length(required=True)
    boundary = req.multipart_boundary()
    upload = intake.begin(length, queued, max_queue)
    try:
        req.send_continue()
        filename, meta = intake.receive(upload, req.readinto_body, boundary)
        owner = upload.fields.get("owner", b"").decode("utf-8", "replace")
        return add(filename, label_text(owner, 100) or "Cura", meta)
    finally:
        intake.end(upload)


class SmallParts(MultipartReader):
    """A small multipart body (a material file) read into memory."""
    def __init__(self):
        MultipartReader.__init__(self)
        self.parts = []

    def begin_part(self, name, filename):
        self.parts.append({"name": name, "filename": filename, "data": b""})

    def on_part_data(self, data, start, end):
        self.parts[-1]["data"] += data[start:end]

    def on_part_end(self):
        pass


def parse_small_multipart(body, boundary):
    from python_multipart.multipart import MultipartParser
    reader = SmallParts()
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except CuraError:
        raise
    except Exception as e:
        raise BadInput("Malformed multipart body: %s" % (e,))
    return reader.parts


# The one place where errors of the domain become HTTP statuses
ERROR_STATUS = {NotFound: 404, Conflict: 409, BadInput: 400, TooLarge: 413,
                Unsupported: 415, NoSpace: 507, StorageError: 500}


def error_status(err):
    # the status of a CuraError, subclasses included (a bare one: 500)
    for cls in type(err).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return 500


class ServeGate:
    """Lets one request thread at a time run Python, in short slices.

    Klippy's reactor shares the GIL with the request threads.  With many of
    them runnable (a flood of polls), the reactor waits for the GIL behind
    them, in steps of CPython's 5 ms switch interval.  Through the gate at
    most one request thread is runnable, and after each SLICE of holding it
    that thread sleeps PAUSE, which hands the GIL to the reactor at once.
    A thread waits for the gate as long as it changes hands; once one
    holder has kept it for STUCK (a slow client), the others go on without
    it: such a holder delays them, never stops them."""
    # Under a flood the server gets at most half of the GIL, in 0.5 ms
    # steps (measured: 1 ms / 0.2 ms let the reactor run 2x later at p99)
    SLICE = 0.0005     # seconds of work between pauses
    PAUSE = 0.0005     # seconds: sleeping hands the GIL over
    STUCK = 0.05

    def __init__(self):
        self.lock = threading.Lock()
        self.since = self.left = self.entered = 0.

    def enter(self):
        """True if the caller now holds the gate (then it calls leave)."""
        while not self.lock.acquire(timeout=self.STUCK):
            if time.monotonic() - self.entered > self.STUCK:
                return False
        now = self.entered = time.monotonic()
        if now - self.left > self.PAUSE:   # it was idle: a fresh slice
            self.since = now
        return True

    def breathe(self):
        """Between steps of long work: pause once a slice is used up."""
        if time.monotonic() - self.since >= self.SLICE:
            time.sleep(self.PAUSE)
            self.since = time.monotonic()

    def leave(self):
        self.breathe()
        self.left = time.monotonic()
        self.lock.release()


# Handlers that only compute a small reply from memory stay in the gate;
# every other one (uploads, actions waiting for Klipper, disk, camera)
# leaves it before it starts.
GATED_HANDLERS = frozenset((
    "get_system", "get_auth_check", "get_printers", "get_print_jobs",
    "get_history", "get_print_job", "get_materials", "get_page"))


def http_date(server):
    """The Date header's value now, formatted once a second (kept in
    server.date_cache: CuraHTTPServer, FrontServer)."""
    now = int(time.time())
    cached = server.date_cache
    if cached[0] != now:
        cached = server.date_cache = (now, email.utils.formatdate(
            now, usegmt=True))
    return cached[1]


class CuraRequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as Qt uses it
    default_request_version = "HTTP/1.0"   # every reply has a status line
    server_version = "cura_connection"

    def setup(self):
        # A client that stops sending frees its thread; one from outside
        # trusted_clients is not waited for long.
        self.timeout = self.server.request_timeout
        if not self.server.is_trusted(client_ip(self.client_address[0])):
            self.timeout = min(self.timeout, 5.)
        http.server.BaseHTTPRequestHandler.setup(self)
        # Replies go out as header + body writes: without NODELAY, Nagle
        # and delayed ACKs add ~40 ms to every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.body_left = 0
        self.expect_continue = False
        self.gated = False
        self.server.track(self.connection, True)
        # A connection the front handed over carries this one request
        self.handed = self.connection in self.server.handed

    def handle(self):
        if self.handed:
            self.handle_one_request()
        else:
            http.server.BaseHTTPRequestHandler.handle(self)

    def handle_one_request(self):
        # An idle keep-alive connection waits for its next request outside
        # the gate: only a request that has begun to arrive queues for it.
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:     # timed out or reset: as the stdlib does
            self.close_connection = True
            return
        self.gated = self.server.gate.enter()
        try:
            http.server.BaseHTTPRequestHandler.handle_one_request(self)
        finally:
            self.leave_gate()

    def leave_gate(self):
        if self.gated:
            self.gated = False
            self.server.gate.leave()

    def finish(self):
        try:
            http.server.BaseHTTPRequestHandler.finish(self)
        finally:
            self.server.track(self.connection, False)

    def log_message(self, fmt, *args):
        # formatted only when debug logging is on
        logging.debug("cura_connection: %s " + fmt, self.client_address[0],
                      *args)

    def date_time_string(self, timestamp=None):
        if timestamp is not None:
            return http.server.BaseHTTPRequestHandler.date_time_string(
                self, timestamp)
        return http_date(self.server)

    def handle_expect_100(self):
        # Answer "100 Continue" only once the upload has been accepted
        self.expect_continue = True
        return True

    def send_continue(self):
        if self.expect_continue:
            self.expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def dispatch(self, method):
        self.body_left = 0
        try:
            if self.server.closing:
                raise HTTPError(503, "Klipper is restarting", close=True)
            self.check_client()
            lengths = self.headers.get_all("Content-Length") or []
            if self.headers.get("Transfer-Encoding"):
                raise HTTPError(411, "Send a Content-Length, not chunks",
                                close=True)
            # 1*DIGIT (RFC 9110), once: int() would take "+15" and "1_5"
            length = lengths[0].strip() if lengths else "0"
            if len(set(lengths)) > 1 or not re.match(r"^[0-9]+\Z", length):
                raise HTTPError(400, "Bad Content-Length %s: send one "
                                "number of plain digits" % (
                                    clean_text(", ".join(lengths)),),
                                close=True)
            # (over 18 digits: more than any limit, and int() stays cheap)
            self.body_left = int(length) if len(length) <= 18 else 10 ** 18
            self.check_origin(method)
            if method in ("GET", "HEAD"):
                self.check_reader()
            path = self.path.split("?", 1)[0]
            handler, args = self.server.api.route(method, path)
            self.server.count(handler.__name__)
            if handler.__name__ not in GATED_HANDLERS:
                self.leave_gate()
            status, body = handler(self, *args)
            self.show_change(method)
            if status is not None:   # None: the handler replied (streams)
                self.send_json(status, body)
        except CuraError as e:
            # (a refused action may have found the print ended)
            self.show_change(method)
            status = error_status(e)
            if status >= 500:
                logging.info("cura_connection: %s %s: %s", method,
                             self.path, e.message)
            self.send_json(status, {"message": e.message, "status": status})
        except HTTPError as e:
            if e.status >= 500:
                logging.info("cura_connection: %s %s: %s", method,
                             self.path, e.message)
            self.send_json(e.status, {"message": e.message,
                                      "status": e.status},
                           close=e.close, headers=e.headers)
        except ConnectionError:
            self.close_connection = True
        except socket.timeout:
            # the client stopped sending: tell it, if it still listens
            self.send_json(408, {"message": "No data for %.0f s"
                                 % (self.timeout,), "status": 408},
                           close=True)
        except OSError as e:
            # Whatever the cause, the client gets a reply that names it
            err = storage_error(e)
            status = error_status(err)
            logging.info("cura_connection: %s %s: %s", method, self.path, e)
            self.send_json(status, {"message": err.message,
                                    "status": status}, close=True)
        except Exception:
            logging.exception("cura_connection: %s %s", method, self.path)
            self.send_json(500, {"message": "Internal error; see klippy.log",
                                 "status": 500}, close=True)

    def show_change(self, method):
        # the polls the front answers show what this request changed
        # from now
        if method != "GET" and self.server.front is not None:
            self.server.front.sync()

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (bad request line, huge headers...)
        self.send_json(code, {"message": message or explain or
                              "Bad request", "status": code}, close=True)

    def send_json(self, status, body, close=False, headers=()):
        headers = list(headers)
        if isinstance(body, Payload):
            data, ctype = body.data, body.ctype
            headers += body.headers
        elif isinstance(body, bytes):
            data, ctype = body, image_type(body)
        else:
            data = json.dumps(body).encode()
            ctype = "application/json"
        if self.expect_continue:
            # The client still waits for "100 Continue": it never sent the
            # body, and must not send it now.
            self.expect_continue = False
            self.body_left = 0
            close = True
        if self.body_left and not close:
            # Keep the connection in step: skip a small unread body
            if self.body_left > MAX_JSON_BODY:
                close = True
            else:
                self.rfile.read(self.body_left)
                self.body_left = 0
        if close or self.server.closing or self.handed:
            self.close_connection = True
        chunks = data if isinstance(data, list) else [data]
        length = sum(map(len, chunks))
        if len(chunks) > 1 and length < 65536:
            chunks = [b"".join(chunks)]    # one write for a short reply
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Cache-Control", "no-store")
            for name, value in headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.leave_gate()    # never hold the gate on a slow reader
            self.end_headers()
            if self.command != "HEAD":
                for chunk in chunks:
                    self.wfile.write(chunk)
            self.wfile.flush()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        if self.close_connection and self.body_left:
            self.linger()

    def linger(self):
        # The client may still be sending a body we refused: read a bounded
        # amount of it so it can see our reply instead of a reset.
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2.)
            left = min(self.body_left, 64 * 1024 * 1024)
            deadline = time.monotonic() + 5.
            while left > 0 and time.monotonic() < deadline:
                data = self.connection.recv(min(left, READ_CHUNK))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    # helpers for CuraApi handlers
    def reachable_ip(self):
        return reachable_ip(self.headers.get("Host"), self.connection)

    def client_ip(self):
        return client_ip(self.client_address[0],
                         self.headers.get("X-Real-IP"))

    def check_client(self):
        # Before anything is read or done: trusted networks only
        ip = self.client_ip()
        if not self.server.is_trusted(ip):
            raise untrusted(ip)

    def check_origin(self, method):
        # No web page from elsewhere may make a browser change anything
        # here (browsers name the page in Origin or Referer; Cura sends
        # neither).
        if method in ("GET", "HEAD", "OPTIONS"):
            return
        origin = self.headers.get("Origin") or self.headers.get("Referer")
        if origin is None:
            return
        host = host_name(self.headers.get("Host"))
        try:
            page = urllib.parse.urlsplit(origin.strip()).hostname
        except ValueError:
            page = None
        if page != host:
            raise HTTPError(403, "Refused a request from a web page on "
                            "another site (%s)" % (clean_text(origin),))
        if not is_local_name(host):
            # DNS rebinding: a public name that points at this printer
            raise HTTPError(403, "Browsers must reach this printer by IP "
                            "address or a local name, not %s"
                            % (clean_text(host),))

    def require_control(self, waiting_ok=False):
        # Every handler that changes something calls this first.  With
        # waiting_ok, a Cura not allowed yet gets through: its id is
        # returned, or its address when it has no credentials yet (a
        # Cura 5 sends before its first answer came); else None.
        conn = self.server.api.conn
        if not conn.allow_control:
            raise HTTPError(403, "This printer is monitor-only "
                            "(allow_control: False)")
        if conn.require_pairing:
            if waiting_ok and self.headers.get("Authorization") is None:
                return str(self.client_ip())
            key_id, allowed = conn.auth.identify(
                self.command, self.path, self.headers.get("Authorization"))
            if not allowed:
                if waiting_ok:
                    return key_id
                raise HTTPError(403, "This Cura is not allowed yet: run "
                                "CURA_ALLOW ID=%s on the printer"
                                % (key_id,))
        return None

    def check_reader(self):
        # Reading is open, but a signed read must carry credentials this
        # printer allowed: Cura 5 reacts to a 401 on a read (not on a
        # change) by showing its "authorization required" message and
        # asking for credentials again (POST /api/v1/auth/request).
        conn = self.server.api.conn
        header = self.headers.get("Authorization")
        if not conn.require_pairing or parse_digest(header) is None:
            return   # unsigned (Cura before 5.11, browsers): open
        key_id, allowed = conn.auth.identify(self.command, self.path,
                                             header, once=False)
        # Cura reads the material list only when it connects, to send
        # what is missing: a waiting Cura's profiles are kept
        if not allowed and self.path.rstrip("/") != MATERIALS_PATH:
            conn.auth.refuse_waiting(key_id)
            raise conn.auth.challenge(
                "This Cura waits for CURA_ALLOW ID=%s on the printer"
                % (key_id,))

    def content_length(self, required=False):
        if required and self.headers.get("Content-Length") is None:
            raise HTTPError(411, "Content-Length required", close=True)
        return self.body_left

    def readinto_body(self, buf):
        # counts what is left, so an error reply knows what to skip
        n = self.rfile.readinto(buf[:self.body_left])
        self.body_left -= n
        return n

    def read_body(self, limit):
        if self.body_left > limit:
            raise HTTPError(413, "Request body over %d bytes" % (limit,),
                            close=True)
        self.send_continue()
        data = self.rfile.read(self.body_left)
        if len(data) < self.body_left:
            raise HTTPError(400, "Request body ended early", close=True)
        self.body_left = 0
        return data

    def read_json(self, optional=False):
        data = self.read_body(MAX_JSON_BODY)
        if not data.strip() and optional:
            return {}
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise HTTPError(400, "Body is not JSON: %s" % (e,))

    def multipart_boundary(self):
        from python_multipart.multipart import parse_options_header
        ctype, params = parse_options_header(
            self.headers.get("Content-Type", ""))
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary \
                or len(boundary) > 200:
            raise HTTPError(400, "Expected multipart/form-data with a "
                            "boundary", close=True)
        return boundary


def image_type(data):
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return "application/octet-stream"


def is_preview_image(data):
    # What Cura's preview (a QImage) decodes and we serve: PNG and JPEG
    return image_type(data) != "application/octet-stream"


# A closed connection's last words: what the client still sends after
# the reply is read for this long, up to this many bytes, so that the
# reply is not destroyed by a reset (unread data at close() sends RST)
LINGER_TIME = 1.
LINGER_BYTES = 1 << 16


def linger_close(sock):
    """Close sock after its last reply: FIN first, then read what the
    client still sends (briefly, a bounded amount) until it closes."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_TIME)
        deadline = time.monotonic() + LINGER_TIME
        left = LINGER_BYTES
        while left > 0 and time.monotonic() < deadline:
            data = sock.recv(min(left, READ_CHUNK))
            if not data:
                break
            left -= len(data)
    except OSError:
        pass
    sock.close()


def refuse_connection(sock):
    # One connection too many: a complete reply, then the caller closes
    body = b'{"message": "Too many connections", "status": 503}'
    try:
        sock.settimeout(1.)
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass


class CuraHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False   # a stuck handler must not hold up a restart
    allow_reuse_address = True
    request_queue_size = 64
    request_timeout = REQUEST_TIMEOUT
    trusted_clients = parse_trusted_clients(DEFAULT_TRUSTED_CLIENTS)

    def __init__(self, address, api):
        self.api = api
        self.closing = False
        self.gate = ServeGate()
        self.date_cache = (None, "")
        self.front = None          # FrontProcess, when the child listens
        self.connections = set()
        self.handed = set()        # of connections: from the front
        self.answered = {}         # handler name -> requests routed here
        self.conn_lock = threading.Lock()
        http.server.HTTPServer.__init__(self, address, CuraRequestHandler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (slow with a bad
        # DNS setup); nothing here needs it.
        socketserver.TCPServer.server_bind(self)

    def handle_error(self, request, client_address):
        logging.exception("cura_connection: request from %s",
                          client_address[0])

    def is_trusted(self, ip):
        return is_trusted(ip, self.trusted_clients)

    def count(self, name):
        with self.conn_lock:
            self.answered[name] = self.answered.get(name, 0) + 1

    def process_request(self, request, client_address, handed=False):
        # Count the connection before its thread starts, so a flood is
        # refused here rather than growing threads without bound.  (The
        # front counts those it hands over in its own budget, until they
        # are released.)
        with self.conn_lock:
            busy = not handed and len(self.connections) >= MAX_CONNECTIONS
            if not busy:
                self.connections.add(request)
                if handed:
                    self.handed.add(request)
        if busy:
            # (closed at once: the accepting thread must not linger)
            refuse_connection(request)
            request.close()
            return
        socketserver.ThreadingMixIn.process_request(self, request,
                                                    client_address)

    def shutdown_request(self, request):
        # every accepted connection ends here, whatever happened to it
        self.track(request, False)
        with self.conn_lock:
            handed = request in self.handed
            self.handed.discard(request)
        linger_close(request)
        front = self.front
        if handed and front is not None:
            front.released()

    def track(self, sock, add):
        with self.conn_lock:
            if add:
                self.connections.add(sock)
            else:
                self.connections.discard(sock)

    def serve(self):
        """Thread: accept connections here (without a front process)."""
        self.serving = True
        self.serve_forever(poll_interval=0.2)

    def listen_again(self):
        """After the front process ended: a new listening socket on the
        address bound first (OSError if it is taken meanwhile)."""
        self.socket = socket.socket(self.address_family, self.socket_type)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.socket.close()
            raise

    serving = False

    def close(self):
        self.closing = True
        if self.front is not None:
            self.front.close()
        if self.serving:
            self.shutdown()
        self.server_close()
        # Keep-alive connections from before a restart must not go on
        # talking to this instance.
        with self.conn_lock:
            conns = list(self.connections)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class CuraHTTPServer6(CuraHTTPServer):
    address_family = socket.AF_INET6


######################################################################
# HTTP front: a child process answers the polls
######################################################################

# Klippy's reactor shares the GIL with every thread of Klippy's process,
# so a flood of polls there makes its timers late.  By default a child
# process (this file, run by Klippy's Python) owns the listening socket.
# It answers the reads (FRONT_HANDLERS) from replies Klippy's side keeps
# published in it, and receives uploads (without require_pairing) into
# the G-code folder, asking Klippy's side to reserve room for them and to
# queue the finished file.  Every other request (actions, pairing, signed
# reads with require_pairing, the camera, material posts) it hands to the
# server in Klippy's process, whole and unread, with its socket, which
# that server closes after its reply.  The two are joined by two socket
# pairs: "control" carries published replies, answers and the end of
# handed-over connections ("released") one way, acknowledgements, calls
# (reserve, add_upload), the end of reservations ("unreserve") and log
# lines the other; "handover" carries connections (SCM_RIGHTS).

# The reads the front answers (CuraApi's handlers of their routes), from
# what Klippy's side publishes: everything a Cura without pairing reads,
# and the web page with its reads.  A request for any other route (and
# any head the front does not fully understand) is handed over alone:
# Klippy's side answers it with "Connection: close" and closes (see
# CuraRequestHandler.handle), so no connection stays in Klippy's process.
# Closing rather than handing the connection back: Cura 4.13's and Cura
# 5's Qt clients open a new connection for their next request without a
# failed request (tests/test_cura.py, tests/test_cura5.py: none in their
# logs), and a closed connection leaves no bytes read ahead by
# http.server that would have to go back with it.
FRONT_HANDLERS = frozenset((
    "get_system", "get_printers", "get_print_jobs", "get_history",
    "get_print_job", "get_preview_image", "get_materials", "get_page",
    "get_root", "get_definition_zip", "get_definition_file", "not_found"))
UPLOAD_LINE = re.compile(r"POST /cluster-api/v1/print_jobs/?(\?[!-~]*)? "
                         r"HTTP/1\.[01]\r?\n")
# How long the front waits for Klippy's side to queue an upload (s)
FRONT_CALL_LIMIT = 30.
# How long a G-code command waits for the front to show its change (s)
FRONT_SHOW_LIMIT = 0.5
# The front's priority below Klippy's (nice value added): on a saturated
# core the printer goes first, and the front still gets about a tenth
FRONT_NICE = 10
# A request head not complete in this many bytes goes to Klippy's side,
# which answers it.  Where a head ends: at its first empty line, as
# http.server reads lines (ended by LF, CRLF or not).
MAX_HEAD = 16384
HEAD_END = re.compile(rb"\n\r?\n")
# More header lines than http.server takes (431) go to Klippy's side too
MAX_HEADERS = 100
# Frames on the control pair: payload length, key length, key, payload
FRAME = struct.Struct(">IH")
# How often the publisher looks for a new snapshot or a change of jobs or
# loaded materials (s); a change a request made is published before its
# reply
PUBLISH_CHECK = 0.02
# The printer's address as each client reached it is put into the
# published /printers reply by the front, in place of this mark.
IP_MARK = "\x00reachable_ip\x00"


def send_frame(sock, key, payload=b""):
    """Any thread (caller serialises): one frame on a control pair."""
    key = key.encode()
    sock.sendall(FRAME.pack(len(payload), len(key)) + key)
    if payload:
        sock.sendall(payload)


class FrameReader:
    """Reads frames from a control pair (one thread)."""
    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def _fill(self, n):
        # False at EOF (or a reset: the other process ended with frames
        # unread) before n bytes are buffered
        while len(self.buf) < n:
            try:
                data = self.sock.recv(max(READ_CHUNK, n - len(self.buf)))
            except OSError:
                return False
            if not data:
                return False
            self.buf += data
        return True

    def frames(self):
        """Yields (key, payload) until EOF."""
        while self._fill(FRAME.size):
            size, key_size = FRAME.unpack_from(self.buf)
            end = FRAME.size + key_size + size
            if not self._fill(end):
                return
            key = bytes(self.buf[FRAME.size:FRAME.size + key_size]).decode()
            payload = bytes(self.buf[FRAME.size + key_size:end])
            del self.buf[:end]
            yield key, payload

    def pending(self):
        """True if more is there to read right now."""
        return bool(self.buf) or bool(select.select([self.sock], [], [],
                                                    0)[0])


class MarkRequest:
    """Stands for every client while /printers is published."""
    @staticmethod
    def reachable_ip():
        return IP_MARK


class FrontProcess:
    """Klippy's side of the front process: starts it with the listening
    socket, keeps its replies current and takes the connections it hands
    over.  Threads: publisher (encodes what changed after each status
    snapshot, job change and request that changed something), control
    reader (acks, log lines, the child's end), handover (connections into
    server).  The reactor does nothing for it."""
    def __init__(self, server, api, settings, on_lost):
        self.server = server
        self.api = api
        self.on_lost = on_lost
        self.closing = False
        self.cond = threading.Condition()
        self.asked = self.acked = 0    # sync() rounds asked / published
        self.wake_event = threading.Event()
        self.sent = {}                 # key -> the bytes the child has
        self.list_keys = {}            # job list -> (store version, ...)
        self.materials = (None, b"")   # (materials version, list reply)
        self.send_lock = threading.Lock()
        # The child's uploads in flight, reserved in Klippy's intake (one
        # reservation of queue room and disk space for the whole module)
        self.reserved = {}             # token -> Upload
        self.tokens = iter(range(1, 1 << 62))
        ctl, child_ctl = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        hand, child_hand = socket.socketpair(socket.AF_UNIX,
                                             socket.SOCK_SEQPACKET)
        listen_fd = server.socket.fileno()
        fds = (listen_fd, child_ctl.fileno(), child_hand.fileno())
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", FRONT_BOOT, os.path.abspath(__file__),
                 str(os.getpid())] + [str(fd) for fd in fds], pass_fds=fds,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        finally:
            child_ctl.close()
            child_hand.close()
        # The child accepts from now on; Klippy's copy of the listening
        # socket goes, so the port is free as soon as the child ends.
        server.socket.close()
        self.ctl, self.hand = ctl, hand
        self.send("settings", json.dumps(settings).encode())
        self.threads = [threading.Thread(target=fn, daemon=True,
                                         name="cura_connection " + name)
                        for fn, name in ((self._publish_loop, "publisher"),
                                         (self._read_control, "control"),
                                         (self._take_connections,
                                          "handover"))]
        for t in self.threads:
            t.start()
        logging.info("cura_connection: front process %d answers the polls",
                     self.proc.pid)

    # Any thread
    def send(self, key, payload=b""):
        with self.send_lock:
            send_frame(self.ctl, key, payload)

    def released(self):
        """A connection the child handed over is closed: it leaves the
        child's connection budget."""
        try:
            self.send("released")
        except OSError:
            pass

    def ask(self):
        """Ask for a publication of the state as it is now; returns the
        number to pass to shown()."""
        with self.cond:
            self.asked += 1
            self.wake_event.set()
            return self.asked

    def shown(self, asked):
        """True once the child has publication asked (or is gone)."""
        return self.acked >= asked or self.closing

    def sync(self, timeout=2.):
        """Not the reactor: return once the child has what the state is
        now, so a poll after this reply shows the change it made."""
        mine = self.ask()
        with self.cond:
            self.cond.wait_for(lambda: self.shown(mine), timeout)

    # Publisher thread
    def _publish_loop(self):
        # Looks for a change every PUBLISH_CHECK (a few attribute reads):
        # the reactor does nothing for the front process
        gen, seen = 0, None
        bridge = self.api.bridge
        states = (self.api.store, self.api.conn.loaded)
        while not self.closing:
            self.wake_event.wait(PUBLISH_CHECK)
            self.wake_event.clear()
            with self.cond:
                asked = self.asked
            now = (bridge.snapshot["seq"], asked) + tuple(
                state.version for state in states)
            if now == seen:
                continue
            seen = now
            gen += 1
            try:
                self._publish(gen, asked)
            except OSError:
                return      # the child is gone: the control reader says so
            except Exception:
                logging.exception("cura_connection: publishing replies")

    def _publish(self, gen, asked):
        gate = self.server.gate
        gated = gate.enter()
        try:
            changed = self._changed_replies(gate.breathe)
        finally:
            if gated:
                gate.leave()
        for key, data in changed:
            self.send(key, data)
        self.send("commit", b"%d %d" % (gen, asked))

    def _changed_replies(self, pause):
        # [(key, bytes)] that differ from what the child has
        api, store = self.api, self.api.store
        out = [("printers", api.printers_reply(MarkRequest)),
               ("queued", b"%d" % (len(store.queue),)),
               ("system", json.dumps(api.get_system(None)[1]).encode()),
               ("materials", self._materials_reply())]
        listed = False
        cur = store.current
        version = (store.version, cur and JOB_REPLY_KEY(cur),
                   api.jobs_basis())
        for name, reply in (("print_jobs", api.print_jobs_reply),
                            ("history", api.history_reply)):
            if self.list_keys.get(name) == version:
                continue
            chunks = reply(pause)
            self.list_keys[name] = version
            listed = True
            out += [("%s:%d" % (name, i), c) for i, c in enumerate(chunks)]
            out.append(("%s#" % (name,), b"%d" % (len(chunks),)))
        if listed:
            out += self._job_replies(pause)
        changed = []
        for key, data in out:
            old = self.sent.get(key)
            if old is not data and old != data:
                self.sent[key] = data
                changed.append((key, data))
        return changed

    def _materials_reply(self):
        # The material list, encoded again only once a profile was added
        version = self.api.materials.version
        if self.materials[0] != version:
            try:
                self.materials = (version, json.dumps(
                    self.api.get_materials(None)[1]).encode())
            except OSError:
                return b""     # unreadable: Klippy's side says why
        return self.materials[1]

    def _job_replies(self, pause):
        # Each listed job's own reply (the bytes its list entry was made
        # of) as "job:<uuid>", and "jobs": uuid -> [name, preview file],
        # from the lists just made
        entries = dict(self.api.history_replies.entries)
        entries.update(self.api.replies.entries)
        name, preview = JOB_FIELDS.index("name"), JOB_FIELDS.index("preview")
        index, out = {}, []
        for i, (job_uuid, (key, data)) in enumerate(entries.items()):
            if i and not i % ReplyCache.PAUSE_EVERY:
                pause()
            index[job_uuid] = [key[name], key[preview]]
            out.append(("job:" + job_uuid, data))
        for key in [k for k in self.sent if k.startswith("job:")
                    and k[4:] not in index]:
            del self.sent[key]      # (the child forgets it too)
        out.append(("jobs", json.dumps(index).encode()))
        return out

    # Control reader thread
    def _read_control(self):
        for key, payload in FrameReader(self.ctl).frames():
            if key == "ack":
                with self.cond:
                    self.acked = max(self.acked, int(payload))
                    self.cond.notify_all()
            elif key == "log":
                logging.info("cura_connection: front process: %s",
                             payload.decode("utf-8", "replace"))
            elif key == "call":
                threading.Thread(target=self._answer, args=(payload,),
                                 daemon=True).start()
            elif key == "unreserve":
                self._unreserve(int(payload))
            elif key == "received":
                self._received(*map(int, payload.split()))
        with self.cond:
            lost = not self.closing
            self.closing = True
            self.cond.notify_all()
        if lost:
            try:
                rc = self.proc.wait(5.)
            except subprocess.TimeoutExpired:
                rc = "still running"
            logging.error("cura_connection: the front process ended (%s); "
                          "answering in Klippy's process", rc)
            self._clean_up()
            self.on_lost()

    def _clean_up(self):
        # A lost child's pair ends, its reservations go and its partial
        # uploads are removed (it has been waited for: its pid is free)
        for sock in (self.ctl, self.hand):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.threads[2].join(2.)
        for sock in (self.ctl, self.hand):
            sock.close()
        with self.cond:
            tokens = list(self.reserved)
        for token in tokens:
            self._unreserve(token)
        gcodes = self.api.intake.gcodes
        for dirname in (gcodes, os.path.join(gcodes, ".thumbs")):
            remove_stale_temp_files(dirname, self.proc.pid)

    def _reserve(self, length):
        upload = self.api.intake.begin(length, lambda: len(
            self.api.store.queue), self.api.conn.max_queue)
        with self.cond:
            if not self.closing:
                token = next(self.tokens)
                self.reserved[token] = upload
                return {"token": token}
        self.api.intake.end(upload)
        raise CuraError("The front process ended")

    def _grow(self, token, n, filename=None):
        # The front's upload unpacks to more than it reserved
        with self.cond:
            upload = self.reserved.get(token)
        if upload is None:
            raise CuraError("No reservation %d" % (token,))
        upload.filename = filename      # (named in a 507)
        self.api.intake.check_room(upload, n)
        with self.api.intake.lock:
            upload.length += n
        return {}

    def _received(self, token, n):
        # how much of the front's upload it has read (and so written)
        with self.cond:
            upload = self.reserved.get(token)
        if upload is not None:
            with self.api.intake.lock:
                upload.received = n

    def _unreserve(self, token):
        with self.cond:
            upload = self.reserved.pop(token, None)
        if upload is not None:
            self.api.intake.end(upload)

    # A thread per call of the child (an upload to queue)
    def _answer(self, payload):
        call = json.loads(payload.decode())
        try:
            if call["op"] == "reserve":
                reply = {"status": 200, "body": self._reserve(
                    **call["args"])}
            elif call["op"] == "grow":
                reply = {"status": 200, "body": self._grow(**call["args"])}
            elif call["op"] == "add_upload":
                # the next poll shows what happened: the new job, or none
                # when it was taken back
                try:
                    reply = {"status": 200, "body": self.api.add_upload(
                        **call["args"])}
                finally:
                    self.sync()
            else:
                raise BadInput("Unknown call %s" % (call["op"],))
        except CuraError as e:
            reply = {"status": error_status(e), "message": e.message}
        except Exception:
            logging.exception("cura_connection: front process call")
            reply = {"status": 500, "message": "Internal error; see "
                     "klippy.log"}
        reply["id"] = call["id"]
        try:
            self.send("answer", json.dumps(reply).encode())
        except OSError:
            pass

    # Handover thread: connections the child passes on, unread
    def _take_connections(self):
        while True:
            try:
                msg, fds, flags, addr = socket.recv_fds(self.hand, 16, 4)
            except OSError:
                return
            if not msg and not fds:
                return
            for fd in fds:
                try:
                    sock = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)
                    continue
                try:
                    peer = sock.getpeername()
                except OSError:
                    sock.close()
                    self.released()
                    continue
                self.server.process_request(sock, peer, handed=True)

    def close(self):
        """Ends the child (its connections with it) and the threads."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.wake_event.set()
        for sock in (self.ctl, self.hand):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        try:
            self.proc.wait(2.)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(2.)
        for t in self.threads:
            t.join(2.)
        for sock in (self.ctl, self.hand):
            sock.close()


# Run by FrontProcess with Klippy's Python: loads this file (its cached
# byte code) without Klippy, and serves.
FRONT_BOOT = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("cura_connection_front",
                                              sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.front_main(*[int(a) for a in sys.argv[2:]])
"""


def front_main(klippy_pid, listen_fd, ctl_fd, hand_fd):
    """The child process: serve until Klippy's side closes the control
    pair (or dies: the kernel then ends this process too)."""
    try:
        import ctypes
        # PR_SET_PDEATHSIG: SIGKILL when Klippy's thread that started us
        # ends (kill -9 of Klippy included); then check it was not before
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != klippy_pid:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is Klippy's
    try:
        os.nice(FRONT_NICE)     # on a busy core the printer goes first
    except OSError:
        pass
    ctl = socket.socket(fileno=ctl_fd)
    front = FrontServer(socket.socket(fileno=listen_fd), ctl,
                        socket.socket(fileno=hand_fd))
    threading.Thread(target=front.read_control, daemon=True).start()
    front.serve()


class FrontLog(logging.Handler):
    """The child's log lines go to klippy.log through Klippy's side."""
    def __init__(self, front):
        logging.Handler.__init__(self, logging.INFO)
        self.front = front

    def emit(self, record):
        try:
            self.front.send("log", self.format(record).encode())
        except Exception:
            pass


class FrontRequest:
    """A request head the front can answer: GET of a route in
    FRONT_HANDLERS, no body, every line plain; None from parse() for
    anything else (Klippy's side, http.server, reads that one)."""
    REQUEST_LINE = re.compile(r"GET (/[!-~]*) HTTP/1\.([01])\Z")
    # (no CR, no control character: a line the email parser behind
    # http.server would read as two headers is not plain)
    HEADER = re.compile(
        r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t -~]*?)[ \t]*\Z")
    # present at all -> Klippy's side decides
    HANDED_OVER = ("content-length", "transfer-encoding", "expect")
    # (a repeated framing header: http.server refuses differing lengths)
    ONCE = ("host", "x-real-ip", "connection", "authorization") + HANDED_OVER

    def __init__(self, path, handler, args, http11, headers):
        self.path = path
        self.handler = handler
        self.args = args
        self.headers = headers
        conn = headers.get("connection", "").lower()
        self.close = conn == "close" or (not http11 and conn != "keep-alive")

    @staticmethod
    def route(path):
        """(handler name, url groups) of a GET, as CuraApi.route finds
        it; ("not_found", (message,)) for no such path (the front answers
        Klippy's side's 404), None for a path of another method."""
        try:
            return find_route("GET", path)
        except HTTPError as e:
            return ("not_found", (e.message,)) if e.status == 404 else None

    @classmethod
    def parse(cls, head):
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            return None
        lines = [line[:-1] if line.endswith("\r") else line
                 for line in text.split("\n")]
        # one head, ended by its first empty line (and by nothing else)
        if lines[-2:] != ["", ""] or "" in lines[:-2] \
                or len(lines) > MAX_HEADERS + 3:
            return None
        m = cls.REQUEST_LINE.match(lines[0])
        if m is None:
            return None
        path = m.group(1).split("?", 1)[0]
        route = cls.route(path)
        if route is None or route[0] not in FRONT_HANDLERS:
            return None
        if route[0] == "get_root" and camera_action(m.group(1)):
            return None     # the camera is Klippy's side's
        headers = {}
        for line in lines[1:-2]:
            h = cls.HEADER.match(line)
            if h is None:
                return None
            name = h.group(1).lower()
            if name in headers:
                if name in cls.ONCE:
                    return None
                continue        # the first one counts, as for http.server
            headers[name] = h.group(2)
        if any(h in headers for h in cls.HANDED_OVER):
            if headers.get("content-length") != "0" or len(
                    [h for h in cls.HANDED_OVER if h in headers]) > 1:
                return None
        return cls(path, route[0], route[1], m.group(2) == "1", headers)


class FrontIntake(FileIntake):
    """The child's intake.  Queue room and disk space for an upload are
    reserved by Klippy's side, in its own intake, so that one reservation
    covers the uploads of both processes: Klippy's side learns each chunk
    read (received) and grants room for what unpacking adds beyond it
    (check_room; a grant counts until the upload ends)."""
    def __init__(self, front, gcodes, max_upload_size):
        FileIntake.__init__(self, gcodes, max_upload_size)
        self.front = front

    def begin(self, length, queued=None, max_queue=None):
        token = self.front.call("reserve", length=length)["token"]
        upload = Upload(self, length)
        upload.token = token
        upload.granted = 0
        return upload

    def received(self, upload, n):
        # Klippy's side holds the reservation: it learns each chunk read,
        # so that only what is still to be written stays reserved
        upload.received += n
        try:
            self.front.send("received", b"%d %d" % (upload.token,
                                                     upload.received))
        except OSError:
            pass    # Klippy's side is gone (the front ends)

    def check_room(self, upload, n):
        # Unpacked bytes beyond the reservation: Klippy's side checks them
        # against every upload of both processes and adds them to this
        # one's reservation, a step at a time
        if upload.granted < n:
            # (near the margin: only the n bytes, as Klippy's side would)
            for grant in (max(n, UNPACK_GRANT), n):
                try:
                    self.front.call("grow", token=upload.token, n=grant,
                                    filename=upload.filename)
                    break
                except HTTPError as e:
                    if e.status != 507:
                        raise
                    if grant == n:
                        raise NoSpace(e.message)
            upload.granted += grant
        upload.granted -= n

    def end(self, upload):
        upload.discard()
        try:
            self.front.send("unreserve", b"%d" % (upload.token,))
        except OSError:
            pass     # Klippy's side is gone, and its reservations with it


class FrontUploads:
    """The child's own handler: uploads, received here and queued by
    Klippy's side (add_upload).  It stands where CuraApi stands for
    CuraRequestHandler, for this one route."""
    def __init__(self, front, settings):
        self.front = front
        self.conn = self    # what require_control() reads
        self.allow_control = settings["allow_control"]
        self.require_pairing = False     # (else uploads are handed over)
        self.max_queue = settings["max_queue"]
        self.intake = FrontIntake(front, settings["gcodes"],
                                  settings["max_upload"])

    def route(self, method, path):
        return self.post_print_job, ()

    def post_print_job(self, req):
        req.require_control()
        return 200, receive_upload(
            req, self.intake, lambda: self.front.queued, self.max_queue,
            lambda filename, owner, meta: self.front.call(
                "add_upload", filename=filename, owner=owner, meta={
                    k: v for k, v in meta.items()
                    if not isinstance(v, (bytes, bytearray))},
                address=req.client_address[0]))


class FrontUploadHandler(CuraRequestHandler):
    """One upload on a connection, answered with Connection: close (the
    front goes on reading a connection only from the socket itself)."""
    def handle(self):
        self.handle_one_request()

    def send_json(self, status, body, close=False, headers=()):
        CuraRequestHandler.send_json(self, status, body, True, headers)


class NoGate:
    """ServeGate's place in the front process: no reactor to give way to."""
    def enter(self):
        return False

    def breathe(self):
        pass


class FrontServer:
    """The child process's server: a thread per connection answers
    FrontRequests from the published replies, receives uploads, and hands
    a connection over to Klippy's side at its first request of any other
    kind.  It also stands for CuraHTTPServer to FrontUploadHandler.

    One connection budget for the module: MAX_CONNECTIONS counts the
    child's connections and those it handed over until Klippy's side
    has closed them ("released").  A connection waiting for (the rest
    of) a request head is idle: at the limit, the oldest idle one is
    closed to make room, so connections that send nothing never keep
    Cura's polls out."""
    version_string = "%s %s" % (CuraRequestHandler.server_version,
                                CuraRequestHandler.sys_version)
    closing = False
    front = None
    gate = NoGate()
    handed = frozenset()    # (it hands connections over, takes none)

    def __init__(self, listen, ctl, hand):
        self.listen = listen
        self.ctl = ctl
        self.hand = hand
        self.send_lock = threading.Lock()
        self.settings = self.api = None
        self.ready = threading.Event()
        self.replies = {}          # route -> [bytes] (printers: 2 parts)
        self.queued = 0            # jobs in the queue, as last published
        self.calls = {}            # id -> [Event, answer]
        self.call_ids = iter(range(1, 1 << 62))
        self.connections = 0
        self.handed_over = 0       # of them, held by Klippy's side
        self.idle = {}             # idle connections, oldest first
        self.count_lock = threading.Lock()
        self.date_cache = (None, "")
        logging.getLogger().addHandler(FrontLog(self))
        logging.getLogger().setLevel(logging.INFO)

    def send(self, key, payload=b""):
        with self.send_lock:
            send_frame(self.ctl, key, payload)

    # Control: published replies and answers in, acknowledgements out
    def read_control(self):
        try:
            self._read_control()
        except Exception:
            logging.exception("control pair")
        finally:
            os._exit(0)     # Klippy's side closed it (or is gone)

    def _read_control(self):
        staged = {}
        reader = FrameReader(self.ctl)
        for key, payload in reader.frames():
            if key == "settings":
                self._settle(json.loads(payload.decode()))
            elif key == "commit":
                # serving begins once the state is the latest one
                # (a front that started late has several waiting)
                self._commit(staged, not reader.pending())
                self.send("ack", payload.split()[1])
            elif key == "answer":
                answer = json.loads(payload.decode())
                waiting = self.calls.get(answer["id"])
                if waiting is not None:
                    waiting[1] = answer
                    waiting[0].set()
                elif "token" in (answer.get("body") or {}):
                    # a reservation that came after its request gave up
                    self.send("unreserve", b"%d" % (answer["body"]["token"],))
            elif key == "released":
                with self.count_lock:
                    self.connections -= 1
                    self.handed_over -= 1
            else:
                staged[key] = payload

    def _settle(self, settings):
        settings["trusted"] = parse_trusted_clients(
            ", ".join(settings["trusted"]))
        self.settings = settings
        self.trusted_clients = settings["trusted"]
        self.request_timeout = settings["request_timeout"]
        self.api = FrontUploads(self, settings)

    def _commit(self, staged, latest):
        replies = {"printers": staged["printers"].split(
            json.dumps(IP_MARK).encode(), 1),
            "system": [staged["system"]], "materials": [staged["materials"]]}
        for name in ("print_jobs", "history"):
            n = int(staged["%s#" % (name,)])
            replies[name] = [staged["%s:%d" % (name, i)] for i in range(n)]
        # uuid -> (name, preview file, the job's reply)
        index = json.loads(staged["jobs"].decode())
        for key in [k for k in staged if k.startswith("job:")
                    and k[4:] not in index]:
            del staged[key]
        replies["jobs"] = {uuid: (name, preview, staged.get("job:" + uuid))
                           for uuid, (name, preview) in index.items()}
        self.queued = int(staged["queued"])
        self.replies = replies      # swapped whole: readers see one state
        if latest:
            self.ready.set()

    def call(self, op, **args):
        """Ask Klippy's side to do op(**args); its reply body, or
        HTTPError with its status and message."""
        call_id = next(self.call_ids)
        waiting = self.calls[call_id] = [threading.Event(), None]
        try:
            self.send("call", json.dumps({"id": call_id, "op": op,
                                          "args": args}).encode())
            if not waiting[0].wait(FRONT_CALL_LIMIT):
                raise HTTPError(503, "Klippy's side did not answer (%s) "
                                "within %.0f s" % (op, FRONT_CALL_LIMIT))
        finally:
            del self.calls[call_id]
        answer = waiting[1]
        if answer["status"] != 200:
            raise HTTPError(answer["status"], answer["message"])
        return answer["body"]

    # What CuraRequestHandler asks of its server
    def is_trusted(self, ip):
        return is_trusted(ip, self.trusted_clients)

    def track(self, sock, add):
        pass

    def count(self, name):
        pass

    # Connections
    def serve(self):
        self.ready.wait()   # until the first replies (and settings) came
        while True:
            try:
                sock, addr = self.listen.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                               errno.ENOMEM):
                    time.sleep(0.05)
                continue
            with self.count_lock:
                busy = self.connections >= MAX_CONNECTIONS
                if busy and self.idle:
                    # (under the lock: its thread has not closed it yet)
                    oldest = next(iter(self.idle))
                    del self.idle[oldest]
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    busy = False
                if not busy:
                    self.connections += 1
            if busy:
                refuse_connection(sock)
                sock.close()
                continue
            threading.Thread(target=self.connection, args=(sock, addr),
                             daemon=True).start()

    def connection(self, sock, addr):
        handed = False
        try:
            handed = self._serve_connection(sock, addr)
        except OSError:
            pass
        except Exception:
            logging.exception("connection from %s", addr[0])
        finally:
            with self.count_lock:
                self.idle.pop(sock, None)
                if not handed:      # (else: until Klippy's side releases)
                    self.connections -= 1
            if sock.fileno() != -1:
                linger_close(sock)

    def _serve_connection(self, sock, addr):
        # True once the connection is handed over
        settings = self.settings
        timeout = settings["request_timeout"]
        if not is_trusted(client_ip(addr[0]), settings["trusted"]):
            timeout = min(timeout, 5.)
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                head = self._peek_head(sock, timeout)
            except OSError:     # timed out or reset: as Klippy's side does
                return False
            if not head:
                return False
            if settings["uploads"] and UPLOAD_LINE.match(
                    head.decode("latin-1")):
                FrontUploadHandler(sock, addr, self)
                return False
            req = FrontRequest.parse(head)
            reply = None
            if req is not None and self.replies and not (
                    settings["require_pairing"]
                    and "authorization" in req.headers):
                reply = self._answer(req, sock)
            if reply is None:
                with self.count_lock:
                    room = self.handed_over < MAX_HANDED_OVER
                    self.handed_over += room
                if not room:
                    refuse_connection(sock)
                    return False
                self._hand_over(sock)
                return True
            sock.recv(len(head), socket.MSG_WAITALL)
            ip = client_ip(addr[0], req.headers.get("x-real-ip"))
            if not is_trusted(ip, settings["trusted"]):
                err = untrusted(ip)
                status, ctype, parts = self._error(err.status, err.message)
                self._reply(sock, status, parts, close=True)
                return False
            status, ctype, parts = reply[:3]
            self._reply(sock, status, parts, req.close, ctype, reply[3:4])
            if req.close:
                return False

    def _answer(self, req, sock):
        # (status, content type, [bytes]) from the published replies, or
        # None: Klippy's side answers it
        replies, name = self.replies, req.handler
        if name == "not_found":
            return self._error(404, req.args[0])
        if name in ("get_definition_zip", "get_definition_file"):
            return self._definition(name, req.args)
        if name in ("get_root", "get_page"):
            if "text/html" in req.headers.get("accept", ""):
                try:
                    page = web_page()
                except OSError as e:
                    return self._error(500, "Web page missing: %s" % (e,))
                return 200, "text/html; charset=utf-8", [page]
            if name == "get_root":
                return None         # the camera, or Klippy's side's 404
            # scripts asking the browser paths get the API's JSON
            name = "get_printers" if req.path.rstrip("/").endswith(
                "/printers") else "get_print_jobs"
        if name == "get_printers":
            parts = replies["printers"]
            return 200, "application/json", [parts[0], json.dumps(
                reachable_ip(req.headers.get("host"), sock)).encode(),
                parts[1]]
        if name in ("get_print_job", "get_preview_image"):
            job_uuid = req.args[0]
            job = replies["jobs"].get(job_uuid)
            if job is None:
                return self._error(404, "No print job %s" % (job_uuid,))
            if name == "get_print_job":
                if job[2] is None:
                    return None
                return 200, "application/json", [job[2]]
            data = job[1] and self.api.intake.read_preview(job[1])
            if not data:
                return self._error(404, "Print job %s has no preview image"
                                   % (job[0],))
            return 200, image_type(data), [data]
        key = {"get_print_jobs": "print_jobs", "get_history": "history",
               "get_system": "system", "get_materials": "materials"}[name]
        if replies[key] == [b""]:
            return None
        return 200, "application/json", replies[key]

    @staticmethod
    def _error(status, message):
        return status, "application/json", [json.dumps(
            {"message": message, "status": status}).encode()]

    def _definition(self, name, args):
        # the machine definition, from the settings (made at config load)
        definition = self.settings["definition"]
        if name == "get_definition_zip":
            return 200, "application/zip", [base64.b64decode(
                definition["zip"])], [("Content-Disposition",
                                       'attachment; filename="%s.zip"'
                                       % (definition["id"],))]
        data = definition["files"].get(args[0])
        if data is None:
            return self._error(404, "No definition file %s" % (args[0],))
        return 200, "application/json", [base64.b64decode(data)], [
            ("Content-Disposition", 'attachment; filename="%s"'
             % (args[0],))]

    def _peek_head(self, sock, timeout):
        # The head without taking it from the socket: b"" when the client
        # closed before sending anything, or sent nothing new for timeout
        # (then it is closed without a reply, as http.server does).
        # Meanwhile the connection is idle (serve() may close it to make
        # room).
        with self.count_lock:
            self.idle[sock] = None
        # (a peek never sees the client's close: POLLRDHUP does)
        closed = select.poll()
        closed.register(sock, select.POLLRDHUP)
        try:
            data = sock.recv(MAX_HEAD, socket.MSG_PEEK)
            last, seen, pause = time.monotonic(), len(data), 0.001
            while data:
                end = HEAD_END.search(data)
                if end is not None:
                    return data[:end.end()]
                if len(data) >= MAX_HEAD:
                    return data     # too long for the front: handed over
                now = time.monotonic()
                if len(data) > seen:
                    last, seen, pause = now, len(data), 0.001
                elif now - last > timeout:
                    return b""
                elif closed.poll(0):
                    # the client's close ends the head (as http.server
                    # reads it): handed over
                    return data
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
                with self.count_lock:
                    if sock not in self.idle:
                        return b""      # closed to make room
                data = sock.recv(MAX_HEAD, socket.MSG_PEEK)
            return data
        finally:
            with self.count_lock:
                self.idle.pop(sock, None)

    def _hand_over(self, sock):
        # Nothing of the request was taken: Klippy's side reads it whole
        socket.send_fds(self.hand, [b"c"], [sock.fileno()])
        sock.close()

    def _reply(self, sock, status, parts, close,
               ctype="application/json", headers=()):
        # (headers: [] or [[(name, value)...]], as _answer's replies end)
        length = sum(map(len, parts))
        extra = "".join("%s: %s\r\n" % h for hs in headers for h in hs)
        head = (b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
                b"Content-Type: %s\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\n%s%s\r\n" % (
                    status, http.HTTPStatus(status).phrase.encode(),
                    self.version_string.encode(), http_date(self).encode(),
                    ctype.encode(), length, extra.encode(),
                    b"Connection: close\r\n" if close else b""))
        if length < 65536:
            sock.sendall(b"".join([head] + parts))
        else:
            sock.sendall(head)
            for part in parts:
                sock.sendall(part)


######################################################################
# Discovery: the zeroconf announcement Cura browses for
######################################################################

class ZeroconfAnnouncer:
    def __init__(self, name, port, bind_address, properties):
        self.name = name
        self.port = port
        self.bind_address = bind_address
        self.properties = properties
        self.stop_event = threading.Event()
        # register/unregister block for about a second: never in the reactor
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="cura_connection zeroconf")
        self.thread.start()

    def _run(self):
        try:
            import zeroconf
        except ImportError:
            logging.warning("cura_connection: python zeroconf is missing; "
                            "Cura will not discover this printer")
            return
        zc = info = None
        try:
            addresses = _host_ipv4_addresses(self.bind_address)
            interfaces = zeroconf.InterfaceChoice.All
            if self.bind_address not in ("0.0.0.0", "::"):
                interfaces = [self.bind_address]
            zc = zeroconf.Zeroconf(interfaces=interfaces)
            host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
            info = zeroconf.ServiceInfo(
                SERVICE_TYPE, "%s.%s" % (self.name, SERVICE_TYPE),
                addresses=[socket.inet_aton(a) for a in addresses],
                port=self.port, properties=self.properties,
                server="%s.local." % (host,))
            if self.stop_event.is_set():
                return
            zc.register_service(info, allow_name_change=True)
            logging.info("cura_connection: announced %s on %s",
                         info.name, ", ".join(addresses))
            self.stop_event.wait()
            zc.unregister_service(info)
        except Exception:
            logging.exception("cura_connection: zeroconf announcement")
        finally:
            if zc is not None:
                zc.close()

    def stop(self):
        self.stop_event.set()
        self.thread.join(5.)


######################################################################
# Instances: each Klippy's own state folder and identity
######################################################################

# The files of a state folder (data_path); before each Klippy had its own,
# the folder was <virtual_sdcard path>/.cura_connection, shared by every
# instance printing from that folder.
STATE_FILES = ("queue.json", "loaded_materials.json", "auth.json",
               "materials")
OLD_STATE_DIR = ".cura_connection"
STATE_LOCK = "lock"
STATE_MOVED = "moved.json"          # in the old place: where its state went
STATE_MOVING = ".cura-moving"       # the copy of the old state, while moving
PRINTER_UUID_FILE = "printer_uuid"
# KIAUH names the data folder of instance <x> printer_<x>_data (before
# data folders: the config folder ~/klipper_config/printer_<x>); others
# name theirs <x>_data (Moonraker's -d takes any folder)
KIAUH_DATA_RE = re.compile(r"(?:printer_)?(.+)_data\Z")
KIAUH_OLD_CONFIG_RE = re.compile(r"printer_(.+)\Z")


def instance_defaults(config_file):
    """(default state folder, name suffix) of the Klippy started with
    config_file.  In a Moonraker data folder the state goes beside config/
    (~/printer_data/config/printer.cfg -> ~/printer_data/cura_connection),
    else beside the config file (~/printer.cfg -> ~/.cura_connection).
    The suffix tells instances apart: "2" for KIAUH's printer_2_data (or
    klipper_config/printer_2), "voron" for voron_data, "" for a single
    printer_data; a config file
    not named printer.cfg adds its own name to both."""
    folder, filename = os.path.split(os.path.abspath(config_file))
    stem = os.path.splitext(filename)[0]
    own = [] if stem == "printer" else [stem]
    if os.path.basename(folder) == "config":
        data = os.path.dirname(folder)
        m = KIAUH_DATA_RE.match(os.path.basename(data))
        state = os.path.join(data, "-".join(["cura_connection"] + own))
        suffix = [m.group(1)] if m and m.group(1) != "printer" else []
    else:
        m = KIAUH_OLD_CONFIG_RE.match(os.path.basename(folder))
        state = os.path.join(folder, "-".join([OLD_STATE_DIR] + own))
        suffix = [m.group(1)] if m else []
    return state, "-".join(suffix + own)


def default_printer_name(host, suffix):
    """The host name (its first label), plus "-<suffix>" for a second
    instance: 1-63 bytes without dots, as the name option."""
    host = host.split(".")[0] or "klipper"
    if not suffix:
        return host[:63]
    suffix = re.sub(r"[^\w-]", "-", suffix)[:30]
    while len((host + "-" + suffix).encode("utf-8")) > 63:
        host = host[:-1]
    return host + "-" + suffix


def gcodes_owner(gcodes, config_file):
    """The config file of the other instance whose own G-code folder this
    one is (through a link: KIAUH's shared ~/printer_2_data/gcodes ->
    ~/printer_1_data/gcodes gives ~/printer_1_data/config/printer.cfg),
    or None.  The old shared state is that instance's to take."""
    real = os.path.realpath(gcodes)
    if os.path.basename(real) != "gcodes":
        return None
    other = os.path.join(os.path.dirname(real), "config", "printer.cfg")
    if not os.path.exists(other) or os.path.realpath(other) \
            == os.path.realpath(config_file):
        return None
    return other


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StateLock:
    """One Klippy per state folder: an flock on <folder>/lock, held while
    the module runs.  The kernel drops it when the process ends (kill -9
    too); the file names the holder, for the error of the one refused."""
    def __init__(self, folder, owner):
        self.path = os.path.join(folder, STATE_LOCK)
        self.owner = owner
        self.fd = None

    def acquire(self):
        """True once held; False while another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
        except OSError:
            # a read-only folder: its files can't change, but two
            # instances must not show them both
            fd = os.open(os.path.dirname(self.path),
                         os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({
                    "pid": os.getpid(), "config_file": self.owner}).encode()
                    + b"\n", 0)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def holder(self):
        # (read while the other one holds it: it wrote itself down)
        try:
            with open(self.path) as f:
                info = json.load(f)
            return "the Klipper instance of %s (pid %d)" % (
                info["config_file"], info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return "another Klipper instance"

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def is_temp_file(name):
    return name.startswith((".cura-tmp-", ".cura-upload-"))


def state_in_use(folder):
    return any(os.path.lexists(os.path.join(folder, n))
               for n in STATE_FILES + (PRINTER_UUID_FILE,))


def read_moved_note(old):
    # {"moved_to", "config_file"} once the old state moved, else None
    try:
        with open(os.path.join(old, STATE_MOVED)) as f:
            note = json.load(f)
        return note if isinstance(note, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def move_old_state(old, new, owner, legacy_uuid):
    """Moves the state kept in the old default place into this instance's
    new state folder (locked by the caller) when that has never been used;
    True when this instance took it.  First a whole, synced copy in new,
    then renames within new, then a note in old naming new, then the old
    files go: a crash at any step loses nothing, and the next start
    finishes the move.  Of instances sharing the G-code folder (and none
    of them its owner: gcodes_owner) the first to start takes it, under
    the old folder's lock; the note keeps the others from ever taking it.
    The copy keeps the printer uuid Cura knows."""
    staging = os.path.join(new, STATE_MOVING)
    complete = os.path.join(staging, ".complete")
    old_lock = StateLock(old, owner)
    remove_stale_temp_files(old)    # (of a move that crashed)
    if not os.path.exists(complete):
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(old) or os.path.samefile(old, new):
            return False
        if state_in_use(new):
            if read_moved_note(old) is None and state_in_use(old):
                logging.warning("cura_connection: %s is in use: leaving "
                                "the state in %s as it is", new, old)
            return False
        if not old_lock.acquire():
            logging.warning("cura_connection: not taking the state in %s: "
                            "%s uses it; starting with no saved state",
                            old, old_lock.holder())
            return False
        try:
            note = read_moved_note(old)
            if note is not None:
                logging.info("cura_connection: the state in %s went to %s "
                             "(%s); starting with no saved state", old,
                             note.get("moved_to"), note.get("config_file"))
                return False
            _copy_state(old, staging, legacy_uuid)
        except BaseException:
            old_lock.release()
            raise
    elif os.path.isdir(old):
        old_lock.acquire()      # (finishing a move: this instance took it)
    try:
        for name in os.listdir(staging):
            if name != ".complete":
                os.replace(os.path.join(staging, name),
                           os.path.join(new, name))
        fsync_dir(new)
        if os.path.isdir(old):
            write_file_atomic(os.path.join(old, STATE_MOVED), json.dumps({
                "moved_to": new, "config_file": owner}).encode() + b"\n")
            for name in os.listdir(old):
                path = os.path.join(old, name)
                if name in (STATE_LOCK, STATE_MOVED) or is_temp_file(name):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        shutil.rmtree(staging)
    finally:
        old_lock.release()
    logging.info("cura_connection: moved the saved state from %s to %s",
                 old, new)
    return True


def _copy_state(old, staging, legacy_uuid):
    # Everything but the lock, the note and partial files, synced
    def copy(src, dst):
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    os.makedirs(staging)
    for name in os.listdir(old):
        if name in (STATE_LOCK, STATE_MOVED) or is_temp_file(name):
            continue
        src, dst = os.path.join(old, name), os.path.join(staging, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, copy_function=copy)
            for dirpath, dirnames, filenames in os.walk(dst):
                fsync_dir(dirpath)
        else:
            copy(src, dst)
    if not os.path.exists(os.path.join(staging, PRINTER_UUID_FILE)):
        write_file_atomic(os.path.join(staging, PRINTER_UUID_FILE),
                          (legacy_uuid + "\n").encode())
    write_file_atomic(os.path.join(staging, ".complete"), b"")


def load_printer_uuid(data_path, legacy_uuid):
    """The printer uuid Cura is shown, kept in the state folder: the same
    over restarts and renames, and never the same for two instances
    whatever their names.  Made once: for a folder that holds an older
    version's state the uuid that version showed (uuid5 of the name),
    else a random one."""
    path = os.path.join(data_path, PRINTER_UUID_FILE)
    try:
        with open(path) as f:
            return str(uuid.UUID(f.read().strip()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        logging.error("cura_connection: unusable %s (%s): making a new "
                      "printer uuid", path, e)
    had_state = any(os.path.lexists(os.path.join(data_path, n))
                    for n in STATE_FILES)
    value = legacy_uuid if had_state else str(uuid.uuid4())
    try:
        write_file_atomic(path, (value + "\n").encode())
    except OSError as e:
        # (the state cannot be saved either: the uploads say so)
        logging.error("cura_connection: cannot save the printer uuid in "
                      "%s: %s", path, e)
    return value


######################################################################
# The [cura_connection] section
######################################################################

class CuraConnection:
    """[cura_connection]: reads the config, builds the parts, registers
    the G-code commands.  Runs in the reactor (config load, commands)."""
    def __init__(self, config):
        self.printer = config.get_printer()
        while _live_instances:
            logging.info("cura_connection: closing server left open by a "
                         "previous printer instance")
            _live_instances.pop().close()
        while _state_locks:
            _state_locks.pop().release()    # of a load that failed
        # Which Klippy this is: its default name and state folder
        self.config_file = self.printer.get_start_args().get("config_file")
        self._read_identity(config)
        self._read_camera(config)
        trusted, request_timeout = self._read_access(config)
        gcodes, data_path = self._read_paths(config)
        material_defaults = self._read_extruders(config)
        max_upload = config.getint("max_upload_size", 1024, minval=1)
        history_size = config.getint("history_size", 20, minval=0,
                                     maxval=1000)
        # Every poll lists the whole queue: it must stay short
        self.max_queue = config.getint("max_queue", 100, minval=1,
                                       maxval=1000)
        auto_start_next = config.getboolean("auto_start_next", False)
        # A job sliced for another material than the one known loaded
        # waits, as on an Ultimaker
        self.hold_material_mismatch = config.getboolean(
            "hold_material_mismatch", True)
        # The parts, in data order
        self.lifecycle = None
        self.bridge = KlippyBridge(config, self._handle_snapshot)
        self.store = JobStore(os.path.join(data_path, "queue.json"),
                              history_size, auto_start_next)
        self.intake = FileIntake(gcodes, max_upload << 20)
        self.materials = MaterialStore(os.path.join(data_path, "materials"))
        self.loaded = LoadedMaterials(
            os.path.join(data_path, "loaded_materials.json"),
            material_defaults)
        self.auth = AuthStore(os.path.join(data_path, "auth.json"))
        for dirname in (gcodes, os.path.join(gcodes, ".thumbs"), data_path,
                        os.path.join(data_path, "materials")):
            remove_stale_temp_files(dirname)
        self.writer = StateWriter([self.store, self.loaded, self.auth,
                                   self.materials],
                                  self.bridge.reactor,
                                  self.intake.read_metadata,
                                  self.store.set_metadata)
        self.lifecycle = JobLifecycle(self.bridge, self.store,
                                      self.writer.want_metadata,
                                      self.configuration_changes)
        self.api = CuraApi(self)
        self._start_server(config, trusted, request_timeout)
        _live_instances.append(self)
        self.closed = False
        self._register_commands()
        self.printer.register_event_handler("klippy:disconnect",
                                            self._handle_disconnect)
        logging.info("cura_connection: serving Cura on %s:%d",
                     self.address, self.bound_port)

    # Config, one concern each
    def _read_identity(self, config):
        # Network name, address and what Cura is told this printer is
        self.port = config.getint("port", 8080, minval=0, maxval=65535)
        self.address = config.get("address", "0.0.0.0")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise config.error("cura_connection: address '%s' is not an IP "
                               "address" % (self.address,))
        self.use_zeroconf = config.getboolean("zeroconf", True)
        suffix = ""
        if self.config_file:
            suffix = instance_defaults(self.config_file)[1]
        self.name = config.get("name", default_printer_name(
            socket.gethostname(), suffix)).strip()
        if not self.name or len(self.name.encode("utf-8")) > 63 \
                or "." in self.name:
            raise config.error("cura_connection: name must be 1-63 bytes "
                               "without dots")
        self.definition = MachineDefinition(config, self.name)
        self.machine = config.getchoice(
            "cura_machine", {k: k for k in list(CURA_MACHINES)
                             + [CUSTOM_MACHINE]}, "ultimaker_s3")
        if self.machine == CUSTOM_MACHINE:
            self.machine_bom = self.definition.bom
            self.machine_variant = self.definition.name
        else:
            self.machine_bom, self.machine_variant = \
                CURA_MACHINES[self.machine]
        self.klipper_version = self.printer.get_start_args().get(
            "software_version", "unknown")

    def _read_camera(self, config):
        self.camera = None
        camera_url = config.get("camera_url", None)
        snapshot_url = config.get("camera_snapshot_url", None)
        if camera_url:
            try:
                camera_url = parse_camera_url(camera_url)
                snapshot_url = parse_camera_url(snapshot_url) \
                    if snapshot_url else camera_snapshot_url(camera_url)
            except ValueError as e:
                raise config.error("cura_connection: camera: %s" % (e,))
            self.camera = CameraProxy(camera_url, snapshot_url)

    def _read_access(self, config):
        # Who may talk to the printer, and what they may do
        try:
            trusted = parse_trusted_clients(config.get(
                "trusted_clients", DEFAULT_TRUSTED_CLIENTS))
        except ValueError as e:
            raise config.error("cura_connection: trusted_clients: %s" % (e,))
        if not trusted:
            raise config.error("cura_connection: trusted_clients is empty")
        self.allow_control = config.getboolean("allow_control", True)
        self.require_pairing = config.getboolean("require_pairing", False)
        # answer polls from a child process (see "HTTP front")
        self.front_process = config.getboolean("front_process", True)
        # undocumented: tests shorten it
        request_timeout = config.getfloat("request_timeout", REQUEST_TIMEOUT,
                                          above=0.)
        return trusted, request_timeout

    def _read_paths(self, config):
        # (G-code folder, folder of the module's own files), both created
        if not config.has_section("virtual_sdcard"):
            raise config.error("cura_connection needs a [virtual_sdcard] "
                               "section: uploads are stored in its path")
        gcodes = os.path.normpath(os.path.expanduser(
            config.getsection("virtual_sdcard").get("path")))
        default = os.path.join(gcodes, OLD_STATE_DIR)
        if self.config_file:
            default = instance_defaults(self.config_file)[0]
        data_path = config.get("data_path", None)
        data_path = os.path.normpath(os.path.expanduser(data_path or default))
        try:
            os.makedirs(gcodes, exist_ok=True)
            os.makedirs(data_path, exist_ok=True)
        except OSError as e:
            raise config.error("cura_connection: cannot create %s" % (e,))
        self._open_state(config, gcodes, data_path, default)
        return gcodes, data_path

    def _open_state(self, config, gcodes, data_path, default):
        # One instance per state folder, the old shared state moved to its
        # instance, and this printer's own uuid
        old = os.path.join(gcodes, OLD_STATE_DIR)
        owner = os.path.abspath(self.config_file or "unknown")
        self.state_lock = StateLock(data_path, owner)
        try:
            if not self.state_lock.acquire():
                raise config.error(
                    "cura_connection: data_path %s is in use by %s: give "
                    "each Klipper instance its own data_path" % (
                        data_path, self.state_lock.holder()))
            _state_locks.append(self.state_lock)
            # what versions before per-instance state showed: the uuid5
            # of the name, which defaulted to the host name -- kept by a
            # single printer (its default name is still the host name);
            # instances, named apart now, no longer share one
            legacy_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS,
                                         "cura-connection." + self.name))
            if data_path == default != old:
                other = gcodes_owner(gcodes, owner)
                if other is None:
                    move_old_state(old, data_path, owner, legacy_uuid)
                elif os.path.isdir(old) and not state_in_use(data_path):
                    logging.info("cura_connection: the state in %s "
                                 "belongs to the Klipper instance of %s, "
                                 "whose G-code folder it is in: starting "
                                 "with no saved state", old, other)
            self.printer_uuid = load_printer_uuid(data_path, legacy_uuid)
        except OSError as e:
            raise config.error("cura_connection: cannot set up the state "
                               "folder %s (%s); data_path can choose "
                               "another" % (data_path, e))

    def _read_extruders(self, config):
        # Print cores shown to Cura; returns [(extruder, material entry)]
        self.extruder_count = 0
        self.print_core_ids = []
        extruder_names = []
        while config.has_section("extruder%s" % (self.extruder_count or "")):
            extruder_names.append("extruder%s" % (self.extruder_count or ""))
            sec = config.getsection(extruder_names[-1])
            nozzle = sec.getfloat("nozzle_diameter", 0.4, above=0.)
            self.print_core_ids.append("AA %g" % (nozzle,))
            self.extruder_count += 1
        if not self.extruder_count:
            # Cura needs at least one extruder box on the printer card
            self.extruder_count, self.print_core_ids = 1, ["AA 0.4"]
            extruder_names = ["extruder"]
        if self.machine == CUSTOM_MACHINE:
            # The custom definition has no print cores: a core name would
            # keep Cura from matching the printer to its configuration.
            self.print_core_ids = [None] * self.extruder_count
        # material_<extruder>: loaded until SET_CURA_MATERIAL says otherwise
        material_defaults = []
        for name in extruder_names:
            text = config.get("material_" + name, None)
            try:
                entry = text and parse_material_option(text)
            except ValueError as e:
                raise config.error("cura_connection: material_%s: %s"
                                   % (name, e))
            material_defaults.append((name, entry or None))
        return material_defaults

    def _definition_settings(self):
        # the machine definition's downloads, for the front to answer
        d = self.definition
        return {"id": d.id, "zip": base64.b64encode(d.zip()).decode(),
                "files": {name: base64.b64encode(data).decode()
                          for name, data in d.files.items()}}

    def _start_server(self, config, trusted, request_timeout):
        # Bind now: a busy port is a config error, not a crash later.
        server_class = CuraHTTPServer6 if ":" in self.address \
            else CuraHTTPServer
        try:
            self.server = server_class((self.address, self.port), self.api)
        except OSError as e:
            raise config.error("cura_connection: cannot listen on %s:%d: %s"
                               % (self.address, self.port, e.strerror))
        self.bound_port = self.server.server_address[1]
        self.server.trusted_clients = trusted
        self.server.request_timeout = request_timeout
        self.server_threads = []
        if self.front_process:
            try:
                self.server.front = FrontProcess(self.server, self.api, {
                    "trusted": [str(n) for n in trusted],
                    "request_timeout": request_timeout,
                    "require_pairing": self.require_pairing,
                    # uploads of a paired Cura are checked in Klippy
                    "uploads": not self.require_pairing,
                    "allow_control": self.allow_control,
                    "gcodes": self.intake.gcodes,
                    "max_upload": self.intake.max_upload_size,
                    "max_queue": self.max_queue,
                    "definition": self._definition_settings()},
                    self._front_lost)
            except OSError as e:
                logging.error("cura_connection: cannot start the front "
                              "process (%s): answering in Klippy's process",
                              e)
        if self.server.front is None:
            self._serve_here(self.server)
        self.announcer = None
        if self.use_zeroconf:
            self.announcer = ZeroconfAnnouncer(
                self.name, self.bound_port, self.address, {
                    "type": "printer", "name": self.name,
                    "machine": str(self.machine_bom),
                    "firmware_version": FIRMWARE_VERSION,
                    "cluster_size": "1"})

    def _serve_here(self, server):
        thread = threading.Thread(target=server.serve, daemon=True,
                                  name="cura_connection http")
        self.server_threads.append(thread)
        thread.start()

    def _front_lost(self):
        # Front process thread: the child ended by itself.  Its connections
        # are gone; new ones are answered here, on the same port.
        if self.closed:
            return
        try:
            self.server.listen_again()
        except OSError as e:
            logging.error("cura_connection: cannot listen on %s:%d again: "
                          "%s", self.address, self.bound_port, e)
            return
        self._serve_here(self.server)

    def _register_commands(self):
        gcode = self.printer.lookup_object("gcode")
        for name in ("CURA_BUILD_PLATE_CLEARED", "CURA_QUEUE",
                     "CURA_PAIRING", "CURA_ALLOW", "CURA_DENY",
                     "SET_CURA_MATERIAL"):
            gcode.register_command(name, getattr(self, "cmd_" + name),
                                   desc=getattr(self, "cmd_%s_help" % name))

    def _handle_snapshot(self, snap):
        # Reactor (the status timer): the lifecycle follows Klipper
        if self.lifecycle is None:
            return
        try:
            self.lifecycle.follow(snap)
        except Exception:
            logging.exception("cura_connection: following the print")

    def _handle_disconnect(self):
        self.close()

    def _shown(self):
        # G-code command (reactor, which may pause here): return once the
        # front process shows what the command changed, so a poll after
        # the console's "ok" sees it (at most FRONT_SHOW_LIMIT)
        front = self.server.front
        if front is None:
            return
        asked = front.ask()
        reactor = self.bridge.reactor
        deadline = reactor.monotonic() + FRONT_SHOW_LIMIT
        while not front.shown(asked) and reactor.monotonic() < deadline:
            reactor.pause(reactor.monotonic() + 0.002)

    def configuration_changes(self, job):
        """Any thread (memory only): [(extruder index, wanted, loaded)]
        a queued job waits for (LoadedMaterials.changes); none once
        forced or with hold_material_mismatch off."""
        if not self.hold_material_mismatch or job.force \
                or job.status != "queued" or not job.materials:
            return []
        return self.loaded.changes(job.materials)

    def console(self, msg):
        # From any thread: a line in the Klipper console (Mainsail, Fluidd)
        def show(eventtime):
            if self.bridge.gcode is not None and not self.closed:
                self.bridge.gcode.respond_info(msg)
        self.bridge.reactor.register_async_callback(show)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.bridge.closing = True
        self.server.close()
        for thread in self.server_threads:
            thread.join(2.)
        self.writer.stop()
        if self.announcer is not None:
            self.announcer.stop()
        if self in _live_instances:
            _live_instances.remove(self)
        self.state_lock.release()
        if self.state_lock in _state_locks:
            _state_locks.remove(self.state_lock)
        logging.info("cura_connection: released port %d", self.bound_port)

    # G-code commands (reactor): bad input raises only gcmd.error
    cmd_CURA_BUILD_PLATE_CLEARED_help = (
        "Confirm the build plate is empty so the next Cura job can start")
    def cmd_CURA_BUILD_PLATE_CLEARED(self, gcmd):
        try:
            self.lifecycle.plate_cleared()
        except CuraError as e:
            raise gcmd.error(e.message)
        self._shown()
        n = len(self.store.queue)
        gcmd.respond_info("Build plate marked clear; %d job(s) queued" % n)

    cmd_CURA_QUEUE_help = "List the jobs Cura sent to this printer"
    def cmd_CURA_QUEUE(self, gcmd):
        cur, queue, _ = self.store.all_jobs()
        lines = ["Printer: %s (%s)" % (
            cur[0].name, cur[0].status) if cur else "Printer: no job"]
        # (a reactor command: the first jobs only, however long the queue)
        shown = self.store.STATUS_JOBS
        lines += ["%d. %s (%s, from %s)" % (i + 1, j.name, j.status, j.owner)
                  for i, j in enumerate(queue[:shown])]
        if len(queue) > shown:
            lines.append("... and %d more" % (len(queue) - shown,))
        waits = queue and self.configuration_changes(queue[0])
        for index, wanted, loaded in waits or ():
            lines.append("%s waits for %s in extruder %d (SET_CURA_MATERIAL"
                         " or Override in Cura)" % (
                             queue[0].name, wanted.get("name") or wanted.get(
                                 "material") or wanted.get("guid"), index))
        if not queue:
            lines.append("Queue is empty")
        if not self.store.plate_clear and queue and not (
                cur and cur[0].status in ACTIVE):
            lines.append("Waiting for CURA_BUILD_PLATE_CLEARED")
        gcmd.respond_info("\n".join(lines))

    cmd_CURA_PAIRING_help = "List the Cura clients that asked for access"
    def cmd_CURA_PAIRING(self, gcmd):
        clients = self.auth.listing()
        lines = ["Pairing is %s" % (
            "required (require_pairing: True)" if self.require_pairing else
            "not required: every trusted client may send and control "
            "prints",)]
        for allowed, title in ((False, "Waiting for CURA_ALLOW:"),
                               (True, "Allowed:")):
            found = [c for c in clients if bool(c.get("allowed")) == allowed]
            if found:
                lines.append(title)
            lines += ["  ID=%s %s, %s, from %s at %s" % (
                c["id"], c.get("application") or "?", c.get("user") or "?",
                c.get("address"), c.get("requested_at")) for c in found]
        if not clients:
            lines.append("No Cura has asked for access yet (Cura 5.11 or "
                         "newer asks when it connects)")
        gcmd.respond_info("\n".join(lines))

    def _client_id(self, gcmd, allowed):
        # ID=..., or the only client in that state
        key_id = gcmd.get("ID", None)
        if key_id is None:
            found = [c["id"] for c in self.auth.listing()
                     if bool(c.get("allowed")) == allowed]
            if len(found) != 1:
                raise gcmd.error("Give ID=<id> (see CURA_PAIRING)")
            key_id = found[0]
        return key_id.strip().lower()

    def _client_address(self, key_id):
        # where that Cura asked from: its profiles sent before it had
        # credentials are kept under this address
        return next((c.get("address") for c in self.auth.listing()
                     if c["id"] == key_id), None)

    cmd_CURA_ALLOW_help = "Allow a Cura that asked for access: ID=<id>"
    def cmd_CURA_ALLOW(self, gcmd):
        # memory only, the StateWriter saves.
        key_id = self._client_id(gcmd, False)
        if not self.auth.allow(key_id):
            raise gcmd.error("No Cura asked with ID=%s (see CURA_PAIRING)"
                             % (key_id,))
        self.materials.release(key_id, self._client_address(key_id))
        gcmd.respond_info("Cura ID=%s may now send and control prints"
                          % (key_id,))

    cmd_CURA_DENY_help = "Remove a Cura's access or request: ID=<id>"
    def cmd_CURA_DENY(self, gcmd):
        key_id = self._client_id(gcmd, False)
        address = self._client_address(key_id)
        if not self.auth.remove(key_id):
            raise gcmd.error("No Cura with ID=%s (see CURA_PAIRING)"
                             % (key_id,))
        self.materials.drop(key_id, address)
        gcmd.respond_info("Cura ID=%s removed" % (key_id,))

    cmd_SET_CURA_MATERIAL_help = (
        "Tell Cura which material is loaded: EXTRUDER= GUID= or MATERIAL= "
        "BRAND= COLOR= (MATERIAL=empty: none)")
    def cmd_SET_CURA_MATERIAL(self, gcmd):
        # memory only, the StateWriter saves.
        name = gcmd.get("EXTRUDER", None)
        if name is None:
            toolhead = self.printer.lookup_object("toolhead")
            name = toolhead.get_extruder().get_name()
        words = {k: v for k, v in gcmd.get_command_parameters().items()
                 if k != "EXTRUDER"}
        if not words:
            entry = self.loaded.status_cache.get(name)
            gcmd.respond_info("%s: %s" % (name, " ".join(
                "%s=%s" % (k.upper(), shlex.quote(v))
                for k, v in sorted(entry.items())) if entry else "not set"))
            return
        try:
            entry = parse_material_words(words)
            self.loaded.set(name, entry)
        except ValueError as e:
            raise gcmd.error(str(e))
        except CuraError as e:
            raise gcmd.error(e.message)
        # a job waiting for this material starts now
        self.lifecycle.follow(self.bridge.now())
        self._shown()
        gcmd.respond_info("%s: material set for Cura" % (name,))

    def get_status(self, eventtime):
        status = dict(self.store.status_cache)
        status["materials"] = self.loaded.status_cache
        status["port"] = self.bound_port
        status["address"] = self.address
        # requests answered in Klippy's process, by handler (the front's
        # own are not counted: they never reach this process)
        server = getattr(self, "server", None)
        status["answered_here"] = dict(server.answered) if server else {}
        return status


def load_config(config):
    return CuraConnection(config)
