# The serve gate: request threads take turns with the reactor.
#
# Used by request threads of Klippy's process and by long encodings
# there (the job list, queue.json).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import threading
import time


class Breather:
    """Long work in a thread of Klippy's process pauses now and then
    (breathe()), so the reactor gets the GIL at once."""
    SLICE = 0.0005     # seconds of work between pauses
    PAUSE = 0.0005     # seconds: sleeping hands the GIL over

    def __init__(self):
        self.since = time.monotonic()

    def breathe(self):
        """Between steps of long work: pause once a slice is used up."""
        if time.monotonic() - self.since >= self.SLICE:
            time.sleep(self.PAUSE)
            self.since = time.monotonic()


class ServeGate(Breather):
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
    # steps (SLICE, PAUSE; measured: 1 ms / 0.2 ms let the reactor run 2x
    # later at p99)
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

    def leave(self):
        self.breathe()
        self.left = time.monotonic()
        self.lock.release()
