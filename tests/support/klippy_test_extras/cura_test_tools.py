# Test-only Klippy extras module for the cura_connection test suite.
#
# NEVER install this on a real printer: it adds commands that stall the
# reactor (TEST_BLOCK) or end Klippy (TEST_EXIT).  The test harness symlinks
# it into a test venv's klippy/extras/ next to cura_connection.py.
#
# [cura_test_tools]
# #sim_move_delay: 0
# #   Seconds to sleep (cooperatively) after every G0/G1, so that a print in
# #   file-output mode takes some real time.  0 disables it.
#
# G-code commands:
#   TEST_SLEEP S=<sec>      cooperative sleep (pauses the reactor greenlet)
#   TEST_BLOCK S=<sec>      blocks the whole reactor with time.sleep()
#   TEST_LATENESS_RESET     clears the lateness probe statistics
#   TEST_LATENESS_DUMP FILE=<path>   writes the samples as JSON lines
#   TEST_EXIT               ends Klippy cleanly (klippy:disconnect runs)
#   TEST_REQUESTS_RESET     clears the count of HTTP requests answered in
#                           Klippy's process (not in cura_connection's front),
#                           connections its server refused with 503 included
#   TEST_REQUESTS_DUMP FILE=<path>   writes that count as JSON,
#                           {"<METHOD> <path, ids as {id}>": n}
#
# Only the standard library and the printer object API are used, so that the
# same file loads in every packaged Klippy flavor.
import collections
import json
import logging
import re
import sys
import threading
import time

PROBE_PERIOD = 0.010
# Request counts of this process (all Klippys of a test run share none:
# each is its own process); the patched handler adds to it
REQUESTS = collections.Counter()
REQUESTS_LOCK = threading.Lock()
ID_RE = re.compile(r"/[0-9a-fA-F-]{16,}(?=/|$)")
# A connection the server refused at MAX_CONNECTIONS: its client got a 503
# written in this process, without a dispatch
REFUSED = "REFUSED (503 Too many connections)"


def count_requests(module):
    """Count every request the module's CuraRequestHandler dispatches and
    every connection its server refuses (once per process: a RESTART loads
    the same module again)."""
    handler_class = module.CuraRequestHandler
    if getattr(handler_class, "_test_counted", False):
        return
    dispatch = handler_class.dispatch
    refuse = module.refuse_connection

    def counted(self, method):
        label = "%s %s" % (method, ID_RE.sub("/{id}",
                                             self.path.split("?", 1)[0]))
        with REQUESTS_LOCK:
            REQUESTS[label] += 1
        return dispatch(self, method)
    handler_class.dispatch = counted

    def counted_refuse(sock):
        with REQUESTS_LOCK:
            REQUESTS[REFUSED] += 1
        return refuse(sock)
    # (process_request finds it in the module's globals at each call)
    module.refuse_connection = counted_refuse
    handler_class._test_counted = True


class CuraTestTools:
    def __init__(self, config):
        self.printer = config.get_printer()
        self.reactor = self.printer.get_reactor()
        self.move_delay = config.getfloat("sim_move_delay", 0., minval=0.)
        # Lateness probe: a 10 ms timer measures how late the reactor runs it
        self.samples = collections.deque(maxlen=100000)
        self.late_max = self.late_sum = 0.
        self.late_count = 0
        self.probe_waketime = None
        self.probe_timer = self.reactor.register_timer(
            self._probe, self.reactor.NEVER)
        self.printer.register_event_handler("klippy:connect",
                                            self._handle_connect)
        self.printer.register_event_handler("klippy:ready",
                                            self._handle_ready)
        gcode = self.printer.lookup_object("gcode")
        gcode.register_command("TEST_SLEEP", self.cmd_TEST_SLEEP,
                               desc="Test only: cooperative sleep")
        gcode.register_command("TEST_BLOCK", self.cmd_TEST_BLOCK,
                               desc="Test only: block the reactor")
        gcode.register_command("TEST_LATENESS_RESET",
                               self.cmd_TEST_LATENESS_RESET,
                               desc="Test only: reset the lateness probe")
        gcode.register_command("TEST_LATENESS_DUMP",
                               self.cmd_TEST_LATENESS_DUMP,
                               desc="Test only: write lateness samples")
        gcode.register_command("TEST_EXIT", self.cmd_TEST_EXIT, True,
                               desc="Test only: exit Klippy")
        gcode.register_command("TEST_REQUESTS_RESET",
                               self.cmd_TEST_REQUESTS_RESET,
                               desc="Test only: reset the request count")
        gcode.register_command("TEST_REQUESTS_DUMP",
                               self.cmd_TEST_REQUESTS_DUMP,
                               desc="Test only: write the request count")

    def _handle_connect(self):
        # G0/G1 are registered by gcode_move after all config sections are
        # loaded, so they can only be wrapped from here.
        if not self.move_delay:
            return
        gcode = self.printer.lookup_object("gcode")
        for cmd in ("G0", "G1"):
            orig = gcode.register_command(cmd, None)
            if orig is not None:
                gcode.register_command(cmd, self._slow_move(orig))

    def _slow_move(self, orig):
        def cmd_slow_move(gcmd):
            orig(gcmd)
            self.reactor.pause(self.reactor.monotonic() + self.move_delay)
        return cmd_slow_move

    def _handle_ready(self):
        # Start probing only now: config loading is not reactor lateness
        self.probe_waketime = None
        self.reactor.update_timer(self.probe_timer, self.reactor.NOW)

    def _probe(self, eventtime):
        now = self.reactor.monotonic()
        if self.probe_waketime is not None:
            late = max(0., now - self.probe_waketime)
            self.samples.append((round(now, 4), round(late * 1000., 3)))
            self.late_max = max(self.late_max, late)
            self.late_sum += late
            self.late_count += 1
        # Schedule from now, so one stall counts once (no catch-up burst)
        self.probe_waketime = now + PROBE_PERIOD
        return self.probe_waketime

    def get_status(self, eventtime):
        avg = self.late_sum / self.late_count if self.late_count else 0.
        return {"lateness_max_ms": round(self.late_max * 1000., 3),
                "lateness_avg_ms": round(avg * 1000., 3),
                "lateness_count": self.late_count,
                "sim_move_delay": self.move_delay}

    def cmd_TEST_SLEEP(self, gcmd):
        secs = gcmd.get_float("S", 0.5, minval=0.)
        self.reactor.pause(self.reactor.monotonic() + secs)

    def cmd_TEST_BLOCK(self, gcmd):
        secs = gcmd.get_float("S", 0.1, minval=0.)
        time.sleep(secs)

    def cmd_TEST_LATENESS_RESET(self, gcmd):
        self.samples.clear()
        self.late_max = self.late_sum = 0.
        self.late_count = 0

    def cmd_TEST_LATENESS_DUMP(self, gcmd):
        path = gcmd.get("FILE")
        # File I/O in the reactor: acceptable for a test tool only
        with open(path, "w") as f:
            for t, late_ms in self.samples:
                f.write(json.dumps({"t": t, "late_ms": late_ms}) + "\n")
        gcmd.respond_info("wrote %d lateness samples to %s"
                          % (len(self.samples), path))

    def _count_module_requests(self):
        # the HTTP server is in the package cura_connection.py loads
        if self.printer.lookup_object("cura_connection", None) is None:
            return
        module = sys.modules.get("_cura_connection.http_server")
        if getattr(module, "CuraRequestHandler", None) is not None:
            count_requests(module)

    def cmd_TEST_REQUESTS_RESET(self, gcmd):
        self._count_module_requests()
        with REQUESTS_LOCK:
            REQUESTS.clear()

    def cmd_TEST_REQUESTS_DUMP(self, gcmd):
        path = gcmd.get("FILE")
        with REQUESTS_LOCK:
            counts = dict(REQUESTS)
        with open(path, "w") as f:
            json.dump(counts, f)
        gcmd.respond_info("%d requests answered in Klippy's process"
                          % (sum(counts.values()),))

    def cmd_TEST_EXIT(self, gcmd):
        logging.info("cura_test_tools: TEST_EXIT requested")
        self.printer.request_exit("exit")


def load_config(config):
    return CuraTestTools(config)
