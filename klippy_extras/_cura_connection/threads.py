# Which thread may run what, checked where it matters.
#
# Klippy's reactor runs in Klippy's main thread; every other thread of
# the module reaches it through KlippyBridge: call() (requests, the front
# link), console() (a line for the console); the disk worker, which never
# waits for it, hands in what it read with a reactor callback.  The
# reactor's thread is recorded when Klippy connects; with
# CURA_CONNECTION_THREAD_CHECKS=1 in the environment (the tests set it)
# the marked functions raise AssertionError when called from the wrong
# side.  Without it the marks cost nothing: they return the function
# unchanged.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import functools
import os
import threading

CHECKS = os.environ.get("CURA_CONNECTION_THREAD_CHECKS") == "1"
_reactor_thread = None


def mark_reactor_thread():
    """Reactor (klippy:connect): this thread is the reactor's."""
    global _reactor_thread
    _reactor_thread = threading.get_ident()


def in_reactor():
    return threading.get_ident() == _reactor_thread


def reactor_only(fn):
    """fn runs in the reactor only (once Klippy connected)."""
    if not CHECKS:
        return fn
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if _reactor_thread is not None and not in_reactor():
            raise AssertionError("%s runs in the reactor only (called from "
                                 "%s)" % (fn.__qualname__,
                                          threading.current_thread().name))
        return fn(*args, **kwargs)
    return checked


def never_reactor(fn):
    """fn blocks or writes to disk: never in the reactor."""
    if not CHECKS:
        return fn
    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if in_reactor():
            raise AssertionError("%s must not run in the reactor"
                                 % (fn.__qualname__,))
        return fn(*args, **kwargs)
    return checked
