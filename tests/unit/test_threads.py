"""The thread checks: a function marked for the reactor refuses another
thread once the reactor's thread is known, and one that must never run
in the reactor refuses it there (CURA_CONNECTION_THREAD_CHECKS=1, set for
every test by conftest.py)."""
import os
import threading

import pytest

from _cura_connection import threads
from _cura_connection.bridge import KlippyBridge
from _cura_connection.lifecycle import JobLifecycle
from _cura_connection.storage import SavedState


def in_thread(fn):
    out = []
    def run():
        try:
            out.append(fn())
        except AssertionError as e:
            out.append(e)
    t = threading.Thread(target=run, name="request")
    t.start()
    t.join()
    return out[0]


@pytest.fixture
def reactor_here(monkeypatch):
    # this test's thread stands for the reactor
    monkeypatch.setattr(threads, "_reactor_thread", None)
    threads.mark_reactor_thread()


def test_checks_are_on_in_the_tests():
    assert os.environ["CURA_CONNECTION_THREAD_CHECKS"] == "1"
    assert threads.CHECKS


def test_reactor_only_refuses_other_threads(reactor_here):
    @threads.reactor_only
    def tick():
        return "ran"
    assert tick() == "ran"
    err = in_thread(tick)
    assert isinstance(err, AssertionError)
    assert "runs in the reactor only" in str(err) and "request" in str(err)


def test_never_reactor_refuses_the_reactor(reactor_here):
    @threads.never_reactor
    def block():
        return "ran"
    with pytest.raises(AssertionError, match="must not run in the reactor"):
        block()
    assert in_thread(block) == "ran"


def test_the_module_marks_its_boundaries(reactor_here, tmp_path):
    # a blocking bridge call and a save never in the reactor; the
    # lifecycle's entry points only there
    with pytest.raises(AssertionError):
        KlippyBridge.call(object(), lambda call: None)
    state = SavedState(str(tmp_path / "x.json"))
    with pytest.raises(AssertionError):
        state.save()
    err = in_thread(lambda: JobLifecycle.follow(object(), {}))
    assert isinstance(err, AssertionError)


def test_unmarked_until_klippy_connects(monkeypatch):
    # before klippy:connect (config load, unit tests with fakes) nothing
    # is known about the reactor: reactor_only lets any thread through
    monkeypatch.setattr(threads, "_reactor_thread", None)
    @threads.reactor_only
    def tick():
        return "ran"
    assert in_thread(tick) == "ran"
