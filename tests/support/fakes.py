"""Small fakes of Klipper for the unit tests: FakeKlipper stands for the
bridge, reactor, printer and G-code of JobLifecycle in one."""
from _cura_connection.bridge import ScriptError, NoCall


class FakeMutex:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class FakeKlipper:
    """Bridge, reactor, printer and G-code of JobLifecycle in one: the
    scripts it runs change a small model of print_stats/virtual_sdcard/
    pause_resume the way Klipper's own code does."""
    def __init__(self):
        self.reactor = self.printer = self.gcode = self
        self.kstate, self.state, self.filename = "ready", "standby", ""
        self.duration, self.active, self.is_paused = 0., False, False
        self.paused_for, self.progress = 0., 0.5
        self.on_pause = []      # what happens while the reactor pauses
        self.scripts, self.callbacks, self.seq, self.t = [], [], 0, 0.

    # bridge
    def ready(self):
        return True

    @property
    def snapshot(self):
        return self.publish_now()

    def publish_now(self):
        self.seq += 1
        return {"seq": self.seq, "klippy_state": self.kstate,
                "state_message": "msg",
                "print_stats": {"state": self.state,
                                "filename": self.filename,
                                "print_duration": self.duration,
                                "message": ""},
                "virtual_sdcard": {"progress": self.progress,
                                   "file_position": int(
                                       self.progress * 1000),
                                   "file_size": 1000,
                                   "is_active": self.active},
                "pause_resume": {"is_paused": self.is_paused}}

    def command(self, script):
        try:
            self.run_script_from_command(script)
        except Exception as e:
            raise ScriptError(str(e))

    def call(self, fn, *args):
        # (the test's thread stands for the reactor)
        return fn(NoCall, *args)

    # reactor, printer
    def monotonic(self):
        self.t += 0.05
        return self.t

    def pause(self, waketime):
        if self.on_pause:
            self.on_pause.pop(0)()

    def register_callback(self, fn):
        self.callbacks.append(fn)

    def run_callbacks(self):
        while self.callbacks:
            self.callbacks.pop(0)(0.)

    def lookup_object(self, name, default=None):
        return self if name == "pause_resume" else default

    # G-code
    def get_mutex(self):
        return FakeMutex()

    def gcode_mutex(self):
        return FakeMutex()

    def has_pause_resume(self):
        return True

    def run_script_from_command(self, script):
        self.scripts.append(script)
        cmd = script.split()[0]
        if cmd == "SDCARD_PRINT_FILE":
            if self.active:
                raise Exception("SD busy")
            self.filename = script.split("=", 1)[1]
            self.state, self.active, self.duration = "printing", True, 0.
        elif cmd == "PAUSE" and not self.is_paused:
            # Klipper's PAUSE pauses also an idle printer
            self.is_paused = True
            if self.active:
                self.active, self.state = False, "paused"
        elif cmd == "M25" and self.active:
            self.active, self.state = False, "paused"
        elif cmd == "RESUME" and self.is_paused:
            self.is_paused = False
            if self.state == "paused":
                self.active, self.state = True, "printing"
        elif cmd == "M24":
            self.active, self.state = True, "printing"
        elif cmd == "CLEAR_PAUSE":
            self.is_paused = False
        elif cmd == "CANCEL_PRINT":
            if self.state == "paused":
                # print_stats counts the last pause in once cancelled
                self.duration += self.paused_for
            if self.active or self.is_paused:   # pause_resume's sd_paused
                self.active, self.state = False, "cancelled"
                self.progress = 0.      # the file is closed
            self.is_paused = False
        elif cmd == "SDCARD_RESET_FILE":
            self.active, self.state, self.filename = False, "standby", ""
            self.duration = self.progress = 0.

    # test helpers
    def follow(self, life):
        life.follow(self.publish_now())
        self.run_callbacks()

    def finish(self, state="complete", duration=None):
        self.active = False
        self.state = state
        if duration is not None:
            self.duration = duration


class FakeMoonraker:
    """A group member's Moonraker as PrinterGroup sees it (the calls of
    members.MoonrakerMember): a small model of the member's Klipper, its
    G-code folder, and faults (unreachable, a send that breaks)."""
    def __init__(self, name="voron", axis_maximum=(300., 300., 300.)):
        self.name = name
        self.reachable, self.kstate = True, "ready"
        self.state, self.filename, self.is_paused = "standby", "", False
        self.duration, self.progress = 0., 0.
        self.axis_maximum = list(axis_maximum)
        self.files = {}
        self.calls = []
        self.fail_upload = None     # a MemberError message
        self.webcam = []
        self.busy = False           # its G-code queue runs a command

    def _check(self):
        from _cura_connection.members import MemberError
        if not self.reachable:
            raise MemberError("%s is unreachable: connection refused"
                              % (self.name,))
        return MemberError

    def poll(self):
        from _cura_connection.members import empty_status
        if not self.reachable:
            return empty_status("connection refused")
        if self.kstate != "ready":
            return empty_status(klippy_state=self.kstate)
        return {"reachable": True, "error": "", "klippy_state": self.kstate,
                "state_message": "", "print_stats": {
                    "state": self.state, "filename": self.filename,
                    "print_duration": self.duration, "message": ""},
                "virtual_sdcard": {"is_active": self.state == "printing",
                                   "progress": self.progress,
                                   "file_position": 0, "file_size": 1},
                "pause_resume": {"is_paused": self.is_paused},
                "extruders": [{"temperature": 20., "target": 0.}],
                "heater_bed": {"temperature": 20., "target": 0.},
                "axis_minimum": [0., 0., 0.],
                "axis_maximum": list(self.axis_maximum),
                "busy": self.busy}

    def upload(self, path, remote, folder=""):
        error = self._check()
        remote = folder + "/" + remote if folder else remote
        self.calls.append(("upload", remote))
        if self.fail_upload:
            raise error(self.fail_upload)
        with open(path, "rb") as f:
            self.files[remote] = f.read()

    def start(self, remote):
        error = self._check()
        self.calls.append(("start", remote))
        # (refusals: Moonraker's answer, with its HTTP status)
        if self.state in ("printing", "paused"):
            raise error("Printer is busy", 400)
        if remote not in self.files:
            raise error("File %s does not exist" % (remote,), 400)
        self.state, self.filename = "printing", remote
        self.duration, self.progress = 0., 0.

    def pause(self):
        error = self._check()
        self.calls.append(("pause",))
        if self.state != "printing":
            raise error("Print is not in progress", 400)
        self.state, self.is_paused = "paused", True

    def resume(self):
        error = self._check()
        self.calls.append(("resume",))
        if self.state != "paused":
            raise error("Print is not paused", 400)
        self.state, self.is_paused = "printing", False

    def cancel(self):
        self._check()
        self.calls.append(("cancel",))
        if self.state in ("printing", "paused"):
            self.state, self.is_paused = "cancelled", False

    def delete(self, remote):
        self._check()
        self.calls.append(("delete", remote))
        self.files.pop(remote, None)

    def webcams(self):
        return list(self.webcam) if self.reachable else []

    def close(self):
        pass

    # the member's own side
    def finish(self):
        self.state, self.progress = "complete", 1.

    def restart_klipper(self):
        self.state, self.filename, self.is_paused = "standby", "", False
