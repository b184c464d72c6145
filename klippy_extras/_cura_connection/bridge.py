# Klippy bridge: the module's one way to Klipper's printer objects.
#
# Status snapshots (published by the reactor, read by any thread), G-code
# scripts and the G-code mutex (reactor), and KlippyBridge.call(), which
# runs a function in the reactor for another thread.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import logging
import threading
import time

from .errors import Conflict
from .threads import mark_reactor_thread, never_reactor, reactor_only


SNAPSHOT_INTERVAL = 0.5


class ScriptError(Exception):
    """Klipper refused a G-code script the module ran (its message)."""


# Thread boundary.  Code marked "Reactor:" runs in Klippy's reactor (a
# timer, a G-code command, or a call another thread submitted through
# KlippyBridge.call()); it may change the job store, and never writes to
# disk.  Code marked "Any thread:" only reads immutable snapshots or
# takes short locks.  Printer objects are reached only through
# KlippyBridge (threads.py checks the sides in tests).

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


def axis_limit(st, key):
    # toolhead's limit (a Coord) as [x, y, z], or None
    limit = st.get("toolhead", {}).get(key)
    try:
        return [float(v) for v in limit[:3]]
    except (TypeError, ValueError, IndexError):
        return None


class KlippyBridge:
    def __init__(self, config, extruder_names, on_snapshot):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.on_snapshot = on_snapshot
        self.closing = False
        self.seq = 0
        self.status_objects = []
        self.extruder_names = extruder_names     # of extruder_sections()
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
        mark_reactor_thread()
        self.gcode = self.printer.lookup_object("gcode")
        names = ["webhooks", "print_stats", "virtual_sdcard",
                 "pause_resume", "heater_bed", "toolhead"]
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
            # the box the printer reaches (a group sends a job where its
            # file fits)
            "axis_minimum": axis_limit(st, "axis_minimum"),
            "axis_maximum": axis_limit(st, "axis_maximum"),
        }

    @reactor_only
    def publish(self, eventtime):
        """Reactor: Klipper's state now, also published to other threads."""
        snap = self._collect(eventtime)
        self.snapshot = snap
        return snap

    def publish_now(self):
        """Reactor: Klipper's state at this moment (published too)."""
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

    @never_reactor
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

    @reactor_only
    def gcode_mutex(self):
        """Reactor: the G-code mutex; while it is held neither the file
        nor the console runs a command."""
        return self.gcode.get_mutex()

    @reactor_only
    def active_extruder(self):
        """Reactor: the name of the extruder the toolhead uses now."""
        toolhead = self.printer.lookup_object("toolhead")
        return toolhead.get_extruder().get_name()

    def has_pause_resume(self):
        """Klipper's PAUSE/RESUME are configured ([pause_resume])."""
        return self.printer.lookup_object("pause_resume", None) is not None

    def console(self, msg):
        """Any thread: a line in Klipper's console (Mainsail, Fluidd)."""
        def show(eventtime):
            if self.gcode is not None and not self.closing:
                self.gcode.respond_info(msg)
        self.reactor.register_async_callback(show)

    @reactor_only
    def command(self, script):
        """Reactor, inside the G-code mutex: run script; ScriptError
        with Klipper's message."""
        try:
            self.gcode.run_script_from_command(script)
        except Exception as e:
            raise ScriptError(str(e) or e.__class__.__name__)


class NoCall:
    """The ReactorCall of a G-code command: nobody can withdraw it."""
    state = "running"

    @staticmethod
    def commit():
        return True
