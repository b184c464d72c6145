"""Calls from a group member's macros to the host (member_calls.py),
through a real member: a real Klippy whose printer.cfg holds MEMBER_MACROS
and a real Moonraker 0.11.0 (.venv/moonraker) on loopback.  The macros
run on the member through Moonraker's /printer/gcode/script, as from its
console."""
import json
import logging
import os
import signal
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

import httpc
import moonraker_member
from moonraker_member import UNTRUSTED
from _cura_connection import member_calls
from _cura_connection.member_calls import MEMBER_MACROS, MemberCalls

def wait_for(what, fn, timeout=30.):
    return httpc.wait_for(fn, timeout, what, interval=0.05)


class Moonraker(moonraker_member.Moonraker):
    """The member's real Moonraker (its data path is the Klippy's work
    dir), with what these tests ask of it: requests with the API key,
    macros run as from its console, its agents."""
    def __init__(self, klippy):
        moonraker_member.Moonraker.__init__(self, klippy.workdir,
                                            klippy.sock_path)
        self.klippy = klippy
        self.url = "http://127.0.0.1:%d" % (self.port,)
        self.api_key = None     # sent with each request when set

    def start(self, trusted="127.0.0.0/8", timeout=60.):
        self.trusted = trusted
        moonraker_member.Moonraker.start(self, timeout, wait_klippy=False)

        def klippy_ready():
            try:
                return self.klippy_state() == "ready"
            except OSError:
                return False
        wait_for("Moonraker connected to a ready Klippy", klippy_ready,
                 timeout)

    def request(self, method, path, **query):
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        req = urllib.request.Request(url, method=method)
        if self.api_key:
            req.add_header("X-Api-Key", self.api_key)
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["result"]

    def klippy_state(self):
        return self.request("GET", "/server/info")["klippy_state"]

    def gcode(self, script):
        """A script run on the member as from its console."""
        return self.request("POST", "/printer/gcode/script", script=script)

    def console_replies(self, script):
        """What the member's console shows in reply to script (Klippy's
        responses, not the echoed commands)."""
        def store():
            return self.request("GET", "/server/gcode_store",
                                count=1000)["gcode_store"]
        start = len(store())
        self.gcode(script)
        # M115's reply comes after all the script's replies
        self.gcode("M115")
        def replies():
            new = store()[start:]
            if any("FIRMWARE_VERSION" in e["message"] for e in new):
                return new
        new = wait_for("M115's reply", replies)
        end = [i for i, e in enumerate(new) if e["type"] == "command"
               and e["message"] == "M115"][-1]
        return [e["message"] for e in new[:end] if e["type"] == "response"]

    def agents(self):
        return self.request("GET", "/server/extensions/list")["agents"]

    def log_text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


@pytest.fixture
def member(klippy_factory):
    """A started member: Klippy with MEMBER_MACROS, its Moonraker."""
    k = klippy_factory(with_module=False, extra_cfg=MEMBER_MACROS)
    moonraker = Moonraker(k)
    moonraker.start()
    yield moonraker
    moonraker.stop()


class Recorder:
    """The host's side: records the calls; fail_next makes the next
    call's callback raise."""
    def __init__(self):
        self.calls = []
        self.threads = set()
        self.fail_next = False
        self.lock = threading.Lock()

    def method(self, name):
        def fn(params):
            with self.lock:
                self.threads.add(threading.current_thread().name)
                self.calls.append((name, params))
                if self.fail_next:
                    self.fail_next = False
                    raise RuntimeError("the host's callback failed")
        return fn

    def methods(self):
        return {name: self.method(name)
                for name in ("cura_plate_cleared", "cura_set_material")}

    def wait_calls(self, n):
        return wait_for("%d calls" % (n,),
                        lambda: len(self.calls) >= n and list(self.calls))


def wait_registered(member, calls, times):
    """calls registered, and Klippy told of it for the times-th time
    (Moonraker answers a registration before it tells Klippy, and
    registers again with each new Klippy connection)."""
    wait_for("registered", lambda: calls.connected)
    wait_for("Klippy told", lambda: member.klippy.log_text().count(
        "registering remote method 'cura_set_material'") >= times)


def calls_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith("cura_connection calls")]


@pytest.fixture
def open_calls():
    made = []

    def make(*args):
        calls = MemberCalls(*args)
        made.append(calls)
        calls.start()
        return calls
    yield make
    for calls in made:
        calls.close()


def test_macros_reach_the_host_over_restarts(member, open_calls):
    rec = Recorder()
    calls = open_calls("voron", member.url, None, rec.methods())
    wait_registered(member, calls, 1)
    assert [a["name"] for a in member.agents()] == ["cura_connection"]

    member.gcode("CURA_BUILD_PLATE_CLEARED")
    member.gcode("SET_CURA_MATERIAL EXTRUDER=extruder MATERIAL=PETG "
                 "BRAND=Generic COLOR=Red")
    member.gcode("SET_CURA_MATERIAL GUID=506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9")
    assert rec.wait_calls(3) == [
        ("cura_plate_cleared", {}),
        ("cura_set_material", {"extruder": "extruder", "material": "PETG",
                               "brand": "Generic", "color": "Red"}),
        ("cura_set_material",
         {"guid": "506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9"})]
    assert rec.threads == {"cura_connection calls voron"}

    # A callback that raises is logged; the next call still arrives
    rec.fail_next = True
    member.gcode("CURA_BUILD_PLATE_CLEARED")
    member.gcode("SET_CURA_MATERIAL MATERIAL=")
    assert rec.wait_calls(5)[3:] == [
        ("cura_plate_cleared", {}), ("cura_set_material", {"material": ""})]

    # The member's Klippy restarts: Moonraker registers the methods with
    # the new Klippy, the host's connection stays
    member.klippy.restart()
    wait_for("Moonraker sees Klippy ready",
             lambda: member.klippy_state() == "ready")
    wait_registered(member, calls, 2)
    member.gcode("CURA_BUILD_PLATE_CLEARED")
    assert rec.wait_calls(6)[5] == ("cura_plate_cleared", {})
    assert calls.connected

    # Moonraker restarts: the connection is lost, made and registered again
    member.stop()
    wait_for("the loss seen", lambda: not calls.connected)
    member.start()
    wait_registered(member, calls, 3)
    member.gcode("SET_CURA_MATERIAL EXTRUDER=extruder MATERIAL=PLA")
    assert rec.wait_calls(7)[6] == (
        "cura_set_material", {"extruder": "extruder", "material": "PLA"})
    assert member.klippy.info()["state"] == "ready"

    # close(): no thread left, the agent gone from Moonraker
    calls.close()
    assert not calls_threads()
    assert not calls.connected
    wait_for("the agent gone", lambda: member.agents() == [])


def test_macro_without_host(member, open_calls):
    """No host connected: the macro neither fails nor harms the member;
    the call is lost and the member's console shows nothing."""
    # Never registered since Klippy started: Klippy has no such method
    assert member.console_replies("CURA_BUILD_PLATE_CLEARED\n"
                                  "SET_CURA_MATERIAL MATERIAL=PETG") == []
    assert member.klippy.info()["state"] == "ready"
    assert "Remote method 'cura_plate_cleared' not registered" in \
        member.klippy.log_text()

    # Registered, then the host went away: Klippy still sends the call to
    # Moonraker, which drops it
    rec = Recorder()
    calls = open_calls("voron", member.url, None, rec.methods())
    wait_registered(member, calls, 1)
    calls.close()
    wait_for("the agent gone", lambda: member.agents() == [])
    assert member.console_replies("CURA_BUILD_PLATE_CLEARED") == []
    assert member.klippy.info()["state"] == "ready"
    wait_for("Moonraker's log of the dropped call", lambda:
             "Unknown method received: cura_plate_cleared"
             in member.log_text())
    assert rec.calls == []


def test_frozen_moonraker(member, open_calls, monkeypatch):
    """A Moonraker that stops answering (a member switched off leaves the
    connection open) is given up; close() ends the thread while it waits
    in a new connection's handshake."""
    monkeypatch.setattr(member_calls, "PING_EVERY", 0.5)
    monkeypatch.setattr(member_calls, "LIVE_LIMIT", 1.5)
    # a handshake that only close() can end before this test's timeout
    monkeypatch.setattr(member_calls, "CONNECT_TIMEOUT", 600.)
    rec = Recorder()
    calls = open_calls("voron", member.url, None, rec.methods())
    wait_registered(member, calls, 1)
    first = calls._ws
    os.kill(member.proc.pid, signal.SIGSTOP)
    try:
        wait_for("the loss seen", lambda: not calls.connected)
        assert "no answer from Moonraker" in calls.last_error
        # the next attempt: TCP connects (the kernel accepts), the
        # handshake waits for a frozen Moonraker
        wait_for("a handshake under way", lambda: calls._ws not in (
            None, first) and calls._ws.sock is not None)
        calls.close()
        assert not calls_threads()
    finally:
        os.kill(member.proc.pid, signal.SIGCONT)


class RecordingStop(threading.Event):
    """The thread's stop event, recording each wait between attempts."""
    def __init__(self):
        threading.Event.__init__(self)
        self.waits = []

    def wait(self, timeout=None):
        self.waits.append(timeout)
        return threading.Event.wait(self, timeout)


def test_api_key(member, open_calls, caplog):
    caplog.set_level(logging.INFO)
    member.api_key = key = member.request("GET", "/access/api_key")
    member.stop()
    member.start(trusted=UNTRUSTED)
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(member.url + "/server/info", timeout=10)

    # A wrong key: never registered, the reason logged once, a wait
    # before each new attempt, growing to the 10 s bound
    rec = Recorder()
    wrong = MemberCalls("voron", member.url, "0" * 32, rec.methods())
    wrong._stop = RecordingStop()
    wrong.start()
    try:
        wait_for("four attempts", lambda: len(wrong._stop.waits) >= 4,
                 timeout=60)
        assert not wrong.connected
        assert wrong._stop.waits[:4] == [1., 2., 4., 8.]
        assert all(w <= 10. for w in wrong._stop.waits)
        logged = [r.getMessage() for r in caplog.records
                  if "member voron" in r.getMessage()]
        assert len(logged) == 1 and "API Key" in logged[0], logged
        assert wrong.last_error and "API Key" in wrong.last_error
    finally:
        wrong.close()
    assert not calls_threads()

    # The right key: registered, and a macro's call arrives
    calls = open_calls("voron", member.url, key, rec.methods())
    wait_registered(member, calls, 1)
    member.gcode("CURA_BUILD_PLATE_CLEARED")
    assert rec.wait_calls(1) == [("cura_plate_cleared", {})]
