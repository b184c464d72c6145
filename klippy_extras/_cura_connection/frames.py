# Frames: the wire between Klippy's side and the front process.
#
# Length-prefixed frames on the control socket pair, the head limits both
# sides agree on, and how long the front waits for an answer.  Used by
# front.py (the child) and front_link.py (Klippy's side).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import os
import re
import select
import struct

from .limits import READ_CHUNK


# How long the front waits for Klippy's side to queue an upload (s)
FRONT_CALL_LIMIT = 30.


# A request head not complete in this many bytes goes to Klippy's side,
# which answers it.  Where a head ends: at its first empty line, as
# http.server reads lines (ended by LF, CRLF or not).
MAX_HEAD = 16384
HEAD_END = re.compile(rb"\n\r?\n")


# More header lines than http.server takes (431) go to Klippy's side too
MAX_HEADERS = 100


# Frames on the control pair: payload length, key length, key, payload
FRAME = struct.Struct(">IH")


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


def package_stamp(folder):
    """The package's files as they are now, in a word: the front boots
    only from the files Klippy's side loaded (their newest change, ns)."""
    return str(max(os.stat(os.path.join(folder, name)).st_mtime_ns
                   for name in os.listdir(folder) if name.endswith(".py")))
