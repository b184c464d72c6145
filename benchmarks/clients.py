"""HTTP clients for the benchmark (loopback only, bounded in time).

upload(): one multipart POST the way Cura 4.13 (Qt) sends a print job:
Content-Length, quoted boundary with + and /, an unquoted name=owner text
part, a file part without Content-Type (tests/httpc.multipart builds the
layout).  The file is sent with sendfile() from the page cache, so the client
costs almost no CPU and the server side is what is measured.

Run as a script, it is the poller process (see run_pollers()).
"""
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests", "support")
sys.path.insert(0, TESTS)
# The tests' interpreter: Debian's Python, which has the libraries the
# real writers need (libcharon, PyQt5) and the runner's venv lacks
TEST_PYTHON = os.path.join(os.path.dirname(HERE), ".venv", "test", "bin",
                           "python")
import httpc  # noqa: E402

MARK = b"\x00\x01FILE-DATA\x01\x00"
CURA_HEADERS = {
    "User-Agent": "cura/4.13.0 ",
    "MIME-Version": "1.0",
    "Connection": "Keep-Alive",
    "Accept-Encoding": "gzip, deflate",
    "Accept-Language": "en-US,*",
}


def upload(port, path, file_path, filename, fields=None, timeout=600.):
    """POST file_path as multipart; returns dict(status, body, seconds)."""
    body, headers = httpc.multipart(fields or {},
                                    {"file": (filename, MARK)})
    head, tail = body.split(MARK)
    size = os.path.getsize(file_path)
    length = len(head) + size + len(tail)
    req = ["POST %s HTTP/1.1" % (path,), "Host: 127.0.0.1:%d" % (port,)]
    hdrs = dict(CURA_HEADERS)
    hdrs["Content-Type"] = headers["Content-Type"]
    hdrs["Content-Length"] = str(length)
    req += ["%s: %s" % kv for kv in hdrs.items()]
    req_bytes = ("\r\n".join(req) + "\r\n\r\n").encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with open(file_path, "rb") as f:
            t0 = time.monotonic()
            sock.sendall(req_bytes + head)
            sent = 0
            while sent < size:
                n = sock.sendfile(f, sent, size - sent)
                if not n:
                    raise RuntimeError("sendfile sent nothing")
                sent += n
            sock.sendall(tail)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            data = resp.read()
            t1 = time.monotonic()
        return {"status": resp.status, "body": data.decode("utf-8",
                                                           "replace"),
                "seconds": t1 - t0, "t_start": t0, "t_end": t1,
                "bytes": length}
    finally:
        sock.close()


def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a list; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100. * len(s) + .5)) - 1))
    return s[k]


def summary(values):
    return {"n": len(values), "p50": percentile(values, 50),
            "p99": percentile(values, 99),
            "max": max(values) if values else None,
            "mean": statistics.fmean(values) if values else None}


######################################################################
# Pollers: N threads, each with one keep-alive connection, in a child
# process (so the benchmark process' own GIL does not skew them).
######################################################################

class _Conn:
    """A lean keep-alive HTTP/1.1 client: a prebuilt GET, and a reply read
    until Content-Length is satisfied (the client's own CPU and GIL time
    stay small next to the server's)."""
    def __init__(self, port):
        self.port = port
        self.sock = None

    def _connect(self):
        self.sock = socket.create_connection(("127.0.0.1", self.port), 10.)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def get(self, request):
        if self.sock is None:
            self._connect()
        self.sock.sendall(request)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            buf += data
        head = buf[:end].decode("latin-1")
        status = int(head.split(" ", 2)[1])
        length = 0
        close = False
        for line in head.split("\r\n")[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection" and v.strip().lower() == "close":
                close = True
        need = end + 4 + length
        while len(buf) < need:
            data = self.sock.recv(max(65536, need - len(buf)))
            if not data:
                raise ConnectionError("closed")
            buf += data
        self.body = buf[end + 4:need]
        self.buf = buf[need:]
        if close:
            self.close()
        return status

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _poller(port, paths, interval, deadline, out, errors, start_evt):
    conn = _Conn(port)
    reqs = [(p, ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                 "User-Agent: bench-poller\r\n\r\n" % (p, port)).encode())
            for p in paths]
    lat = {p: [] for p in paths}
    start_evt.wait()
    # Cura instances poll out of step: a random phase per poller
    nxt = time.monotonic() + (random.uniform(0, interval) if interval else 0)
    try:
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            if interval:
                if now < nxt:
                    time.sleep(min(nxt - now, deadline - now))
                    continue
                nxt += interval
            for p, req in reqs:
                t0 = time.monotonic()
                try:
                    ok = conn.get(req) == 200
                except (OSError, ValueError, IndexError):
                    ok = False
                    conn.close()
                t1 = time.monotonic()
                if ok:
                    lat[p].append((t1 - t0) * 1000.)
                else:
                    errors.append(p)
    finally:
        conn.close()
        out.append(lat)


def poller_main(argv):
    port, n, duration, interval = (int(argv[0]), int(argv[1]),
                                   float(argv[2]), float(argv[3]))
    paths = argv[4:]
    out, errors, threads = [], [], []
    start_evt = threading.Event()
    t_start = time.monotonic() + 0.3
    deadline = t_start + duration
    for i in range(n):
        th = threading.Thread(target=_poller, args=(
            port, paths, interval, deadline, out, errors, start_evt),
            daemon=True)
        th.start()
        threads.append(th)
    time.sleep(max(0., t_start - time.monotonic()))
    start_evt.set()
    t0 = time.monotonic()
    for th in threads:
        th.join(duration + 30.)
    elapsed = time.monotonic() - t0
    lat = {p: [] for p in paths}
    for d in out:
        for p, v in d.items():
            lat[p].extend(v)
    json.dump({"latency_ms": lat, "errors": len(errors),
               "seconds": elapsed}, sys.stdout)


def child_results(procs, timeout, what):
    """The JSON each child process wrote to its stdout, in order."""
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode:
            raise RuntimeError("%s process failed" % (what,))
        yield json.loads(out)


class Pollers:
    """N pollers as threads spread over child processes of at most
    per_proc threads each (so the client's own GIL adds little latency),
    at the given nice value; .result() waits and merges."""
    def __init__(self, port, n, duration, interval, paths, per_proc=5,
                 nice=0):
        self.duration = duration
        self.procs = []
        left = n
        while left > 0:
            k = min(per_proc, left)
            left -= k
            self.procs.append(subprocess.Popen(
                ["nice", "-n", str(nice)] +
                [sys.executable, os.path.abspath(__file__), "poll",
                 str(port), str(k), str(duration), str(interval)]
                + list(paths), stdout=subprocess.PIPE))

    def result(self):
        merged = {"latency_ms": {}, "errors": 0, "seconds": 0.}
        for res in child_results(self.procs, self.duration + 60., "poller"):
            for p, v in res["latency_ms"].items():
                merged["latency_ms"].setdefault(p, []).extend(v)
            merged["errors"] += res["errors"]
            merged["seconds"] = max(merged["seconds"], res["seconds"])
        total = sum(len(v) for v in merged["latency_ms"].values())
        merged["requests_per_s"] = total / merged["seconds"]
        merged["summary"] = {p: summary(v)
                             for p, v in merged["latency_ms"].items()}
        return merged


if __name__ == "__main__":
    if sys.argv[1] == "poll":
        poller_main(sys.argv[2:])
