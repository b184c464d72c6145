#!/usr/bin/env python3
"""Small blocking client for Klippy's API server (the -a UNIX_SOCKET option).

Each request and each reply is one JSON object followed by the byte 0x03.
Replies carry the request "id"; messages without one (subscription updates)
are kept in KlippyAPI.notifications.

    api, info = wait_ready(sock_path)
    api.query("print_stats", "virtual_sdcard")    # attrs=[...] to filter
    api.gcode("SDCARD_PRINT_FILE FILENAME=x.gcode")
    api.call("objects/list")
From a shell:
    python3 kapi.py SOCKET METHOD [JSON_PARAMS]
"""
import json
import socket
import sys
import time

ETX = b"\x03"


class KlippyError(RuntimeError):
    """An error reply from Klippy (e.g. a failing G-code command)."""


class KlippyAPI:
    def __init__(self, path, timeout=10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.buf = b""
        self.next_id = 1
        self.notifications = []
        self.closed = False

    def close(self):
        self.closed = True
        self.sock.close()

    def is_alive(self):
        """False once Klippy has closed its end (e.g. after a restart)."""
        if self.closed:
            return False
        # Peek without blocking (with a timeout set, Python would first wait
        # for readability whatever the recv flags)
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0.)
        try:
            data = self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(timeout)
        return bool(data)

    def _read_msg(self):
        while ETX not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("klippy closed the API socket")
            self.buf += chunk
        raw, self.buf = self.buf.split(ETX, 1)
        return json.loads(raw)

    def send(self, method, params=None):
        """Send a request without waiting for its reply; returns its id."""
        req_id = self.next_id
        self.next_id += 1
        msg = {"id": req_id, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(msg).encode() + ETX)
        return req_id

    def call(self, method, params=None):
        req_id = self.send(method, params)
        while True:
            reply = self._read_msg()
            if reply.get("id") == req_id:
                if "error" in reply:
                    raise KlippyError("%s: %s" % (method, reply["error"]))
                return reply["result"]
            self.notifications.append(reply)

    def wait_closed(self, timeout):
        """Read (and drop) replies until Klippy closes the connection."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self._read_msg()
        except ConnectionError:
            pass
        finally:
            self.close()

    def query(self, *names, **kw):
        objs = {n: kw.get("attrs") for n in names}
        return self.call("objects/query", {"objects": objs})["status"]

    def gcode(self, script):
        return self.call("gcode/script", {"script": script})


def wait_ready(path, timeout=30.0):
    """Connect when the socket exists and poll 'info' until state==ready."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            api = KlippyAPI(path)
        except OSError:
            time.sleep(0.05)
            continue
        try:
            last = api.call("info")
            if last.get("state") == "ready":
                return api, last
        except (OSError, KlippyError):
            pass
        api.close()
        time.sleep(0.05)
    raise TimeoutError("klippy not ready: %r" % (last,))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    api = KlippyAPI(sys.argv[1])
    params = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    print(json.dumps(api.call(sys.argv[2], params), indent=1))
