"""Cura sessions replayed: the request sequences of Cura 4.13 and Cura 5
(their UM3NetworkPrinting ClusterApiClient and output device), over
connection pools that behave like Qt's.

One session is one Cura with the printer as its active machine:

* connect: GET /api/v1/system.  Cura 5 without credentials (not paired)
  first posts /api/v1/auth/request unsigned (beside that first request,
  which goes out unsigned too) and signs every later request with the id
  and key it got (HTTP Digest, SHA-256, a new nonce and the next nc each
  time), uploads and material posts included;
* the material sync: GET /cluster-api/v1/materials, then one POST
  /cluster-api/v1/materials/ a second for every local material (the
  fdm_materials Cura ships) the printer lacks or has in an older version;
* two UFP uploads (libcharon-written, with a thumbnail and the material
  profile: tests/cura_client.make_ufp) a few seconds after connecting;
* the monitor cycle every 2 s (Cura 5 skips the first 10 s): GET
  /printers and /print_jobs at once, and GET .../preview_image for every
  job of the last list whose image it has not got yet (again next cycle
  after an error);
* now and then a pause of the printing job and, 4 s later, its resume
  (PUT .../action), as a user does from the Monitor tab.

Cura's API client and its output device each have a QNetworkAccessManager:
two pools per session, each of up to 6 keep-alive connections to the
printer; a request goes out on any idle connection of its pool, or a new
one, or waits for one.  A request that finds its reused connection closed
is sent again once on a new one (as Qt does).

"Flat out": the monitor cycles run back to back instead of every 2 s.

Run as a script, this file is the session process (loopback only).
"""
import hashlib
import json
import os
import queue
import random
import re
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests", "support")
sys.path.insert(0, TESTS)
sys.path.insert(0, HERE)
import clients  # noqa: E402
import httpc  # noqa: E402

MATERIALS_DIR = os.path.join(os.path.dirname(HERE), ".cache", "cura", "root",
                             "usr", "share", "cura", "resources",
                             "materials")
UFP_MATERIAL = "ultimaker_pla_black.xml.fdm_material"
POOL_SIZE = 6           # Qt's connections per host and manager
CYCLE = 2.              # Cura's update timer (PrinterOutputDevice)
CURA5_FIRST_CYCLE = 10.  # Cura 5: CHECK_CLUSTER_INTERVAL after connecting
MATERIAL_GAP = 1.       # SendMaterialJob: one material a second
UPLOADS_AT = (3., 8.)   # seconds after connecting (Cura's rate)
ACTION_EVERY = 60.      # a pause (and its resume) per session, on average
RESUME_AFTER = 4.
# What Qt's manager sends for ClusterApiClient (content type even on GET)
API_HEADERS = [("Content-Type", "application/json"),
               ("Connection", "Keep-Alive"),
               ("Accept-Encoding", "gzip, deflate"),
               ("Accept-Language", "en-US,*"),
               ("User-Agent", "Mozilla/5.0")]
# ... and for the output device's uploads and material posts
DEVICE_HEADERS = {"cura4": [("User-Agent", "cura/4.13.0 "),
                            ("MIME-Version", "1.0"),
                            ("Connection", "Keep-Alive"),
                            ("Accept-Encoding", "gzip, deflate"),
                            ("Accept-Language", "en-US,*")],
                  "cura5": [("User-Agent", "Mozilla/5.0"),
                            ("MIME-Version", "1.0"),
                            ("Connection", "Keep-Alive"),
                            ("Accept-Encoding", "gzip, deflate"),
                            ("Accept-Language", "en-US,*")]}
API = "/cluster-api/v1"
ID_RE = re.compile(r"/[0-9a-fA-F-]{16,}(?=/|$)")


def label(method, path):
    """What a request is, for the counts: ids as {id}."""
    return "%s %s" % (method, ID_RE.sub("/{id}", path.split("?", 1)[0]))


def local_materials(limit=None):
    """[(file name, guid, version, bytes)] of the materials Cura ships."""
    out = []
    for name in sorted(os.listdir(MATERIALS_DIR)):
        if not name.endswith(".xml.fdm_material"):
            continue
        with open(os.path.join(MATERIALS_DIR, name), "rb") as f:
            data = f.read()
        guid = re.search(rb"<GUID>\s*([^<\s]+)\s*</GUID>", data)
        version = re.search(rb"<version>\s*(\d+)\s*</version>", data)
        if guid and version:
            out.append((name, guid.group(1).decode(), int(version.group(1)),
                        data))
    return out[:limit]


def make_ufps(directory):
    """Two UFPs as Cura's UFPWriter writes them (libcharon, in a child
    process: it loads Cura's code), with a thumbnail and the material
    profile; returns their paths."""
    paths = [os.path.join(directory, "session_part_%d.ufp" % (i,))
             for i in range(2)]
    subprocess.check_call([clients.TEST_PYTHON, os.path.abspath(__file__),
                           "ufp"] + paths)
    return paths


def _write_ufps(paths):
    import cura_client
    import gcode_samples
    for i, path in enumerate(paths):
        cura_client.make_ufp(
            path, gcode_samples.cura_gcode(print_time=1800 + 600 * i,
                                           count=20000, sleep_every=0),
            thumbnail_png=gcode_samples.png(rgb=(40 * i, 120, 200)),
            materials=[os.path.join(MATERIALS_DIR, UFP_MATERIAL)],
            object_names=["part_%d.stl" % (i,)])


class Digest:
    """Cura 5's request signature once it holds an id and key."""
    REALM = "Jedi-API"

    def __init__(self, key_id, key):
        self.id, self.key = key_id, key
        self.nc = 1
        self.lock = threading.Lock()

    def header(self, method, path):
        def h(text):
            return hashlib.sha256(text.encode()).hexdigest()
        with self.lock:
            nc = "%08x" % (self.nc,)
            self.nc += 1
        nonce = os.urandom(16).hex()
        cnonce = os.urandom(8).hex()
        response = h("%s:%s:%s:%s:auth:%s" % (
            h("%s:%s:%s" % (self.id, self.REALM, self.key)), nonce, nc,
            cnonce, h("%s:%s" % (method, path))))
        return ("Digest username=\"%s\", realm=\"%s\", nonce=\"%s\", "
                "uri=\"%s\", nc=%s, cnonce=\"%s\", qop=auth, response=\"%s\","
                " algorithm=\"SHA-256\"" % (self.id, self.REALM, nonce, path,
                                           nc, cnonce, response))


class Stats:
    """Counts and latencies of one process' sessions."""
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}        # label -> {status: n}
        self.ms = {}            # "poll" / "other" -> [ms]
        self.errors = 0
        self.connections = 0    # opened

    def add(self, what, status, ms):
        kind = "poll" if what in ("GET %s/printers" % (API,),
                                  "GET %s/print_jobs" % (API,)) else "other"
        with self.lock:
            by = self.counts.setdefault(what, {})
            by[str(status)] = by.get(str(status), 0) + 1
            if status is None:
                self.errors += 1
            else:
                self.ms.setdefault(kind, []).append(ms)


class Pool:
    """Qt's connection pool for one manager: up to POOL_SIZE keep-alive
    connections, any idle one takes the next request."""
    def __init__(self, port, headers, stats, deadline):
        self.port, self.headers, self.stats = port, headers, stats
        self.deadline = deadline
        self.queue = queue.Queue()
        self.lock = threading.Lock()
        self.workers = self.idle = 0
        self.sign = None        # a Digest once Cura 5 has credentials

    def request(self, method, path, body=b"", headers=()):
        """Send without waiting; the returned Event is set with .reply =
        (status, body) or None."""
        done = threading.Event()
        done.reply = None
        with self.lock:
            self.queue.put((method, path, body, list(headers), done))
            # more waiting than idle connections: one more, up to the limit
            if self.queue.qsize() > self.idle and self.workers < POOL_SIZE:
                self.workers += 1
                threading.Thread(target=self._worker, daemon=True).start()
        return done

    def call(self, method, path, body=b"", headers=()):
        done = self.request(method, path, body, headers)
        done.wait(max(0., self.deadline - time.monotonic()) + 60.)
        return done.reply

    def _head(self, method, path, body, extra):
        lines = ["%s %s HTTP/1.1" % (method, path),
                 "Host: 127.0.0.1:%d" % (self.port,)]
        sign = self.sign
        if sign is not None:
            lines.append("Authorization: " + sign.header(method, path))
        lines += ["%s: %s" % kv for kv in extra + self.headers]
        if body or method in ("POST", "PUT"):
            lines.append("Content-Length: %d" % (len(body),))
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    def _worker(self):
        conn = clients._Conn(self.port)
        try:
            while True:
                with self.lock:
                    self.idle += 1
                try:
                    item = self.queue.get(timeout=1.)
                except queue.Empty:
                    item = None
                with self.lock:
                    self.idle -= 1
                if item is None:
                    if time.monotonic() > self.deadline + 60.:
                        return
                    continue
                method, path, body, extra, done = item
                raw = self._head(method, path, body, extra)
                t0 = time.monotonic()
                reply = None
                for attempt in (0, 1):
                    fresh = conn.sock is None
                    if fresh:
                        with self.stats.lock:
                            self.stats.connections += 1
                    try:
                        status = conn.get(raw)
                        reply = (status, conn.body)
                        break
                    except (OSError, ValueError, IndexError):
                        conn.close()
                        if fresh:
                            break   # a new connection failed: no retry
                ms = (time.monotonic() - t0) * 1000.
                self.stats.add(label(method, path),
                               reply and reply[0], ms)
                done.reply = reply
                done.set()
        finally:
            conn.close()


class Session(threading.Thread):
    def __init__(self, kind, port, flat, seconds, stats, ufps, materials,
                 seed):
        threading.Thread.__init__(self, daemon=True)
        self.kind, self.port, self.flat = kind, port, flat
        self.stats, self.ufps, self.materials = stats, ufps, materials
        self.rand = random.Random(seed)
        self.start_at = time.monotonic()
        self.deadline = self.start_at + seconds
        self.api = Pool(port, API_HEADERS, stats, self.deadline)
        self.device = Pool(port, DEVICE_HEADERS[kind], stats, self.deadline)
        self.user = "bench%d@cura-host" % (seed,)

    def left(self):
        return self.deadline - time.monotonic()

    def sleep_until(self, t):
        time.sleep(max(0., min(t, self.deadline) - time.monotonic()))

    def run(self):
        try:
            self._run()
        except Exception as e:      # a broken session is an error count
            sys.stderr.write("session: %r\n" % (e,))
            self.stats.add("session failed", None, 0.)

    def _run(self):
        connect = self.api.request("GET", "/api/v1/system")
        if self.kind == "cura5":
            # no credentials: ask for them, unsigned, beside that request
            body = json.dumps({"application": "UltiMaker Cura",
                               "user": self.user}).encode()
            reply = self.api.call("POST", "/api/v1/auth/request", body)
            if reply and reply[0] == 200:
                auth = json.loads(reply[1])
                self.api.sign = self.device.sign = Digest(auth["id"],
                                                          auth["key"])
        connect.wait(self.left() + 60.)
        threading.Thread(target=self._sync_materials, daemon=True).start()
        uploads = threading.Thread(target=self._upload, daemon=True)
        uploads.start()
        self._monitor()
        uploads.join(max(0., self.left()) + 60.)

    def _sync_materials(self):
        reply = self.api.call("GET", API + "/materials")
        if not reply or reply[0] != 200:
            return      # Cura then syncs nothing
        remote = {m.get("guid"): m.get("version") or 0
                  for m in json.loads(reply[1])}
        for name, guid, version, data in self.materials:
            if guid in remote and remote[guid] >= version:
                continue
            if self.left() <= 0:
                return
            body, headers = httpc.multipart({}, {"file": (name, data)})
            self.device.call("POST", API + "/materials/", body,
                             [("Content-Type", headers["Content-Type"])])
            time.sleep(MATERIAL_GAP)

    def _upload(self):
        for at, path in zip(UPLOADS_AT, self.ufps):
            if not self.flat:
                self.sleep_until(self.start_at + at)
            if self.left() <= 0:
                return
            with open(path, "rb") as f:
                data = f.read()
            body, headers = httpc.multipart(
                {"owner": self.user}, {"file": (os.path.basename(path),
                                                data)})
            self.device.call("POST", API + "/print_jobs/", body,
                             [("Content-Type", headers["Content-Type"])])

    def _monitor(self):
        previews = {}       # uuid -> got its image
        jobs = []
        nxt = self.start_at + (CURA5_FIRST_CYCLE if self.kind == "cura5"
                               and not self.flat else CYCLE)
        pause_at = self.start_at + self.rand.uniform(5., 5. + ACTION_EVERY)
        resume = None
        while self.left() > 0:
            if not self.flat:
                self.sleep_until(nxt)
                nxt += CYCLE
                if self.left() <= 0:
                    break
            wanted = [u for u in jobs if not previews.get(u)]
            printers = self.api.request("GET", API + "/printers")
            listing = self.api.request("GET", API + "/print_jobs")
            images = [(u, self.api.request(
                "GET", "%s/print_jobs/%s/preview_image" % (API, u)))
                for u in wanted]
            for done in [printers, listing] + [d for _, d in images]:
                done.wait(max(0., self.left()) + 60.)
            for u, done in images:
                if done.reply and done.reply[0] == 200:
                    previews[u] = True
            listed = listing.reply
            if listed and listed[0] == 200:
                new = json.loads(listed[1])
                jobs = [j["uuid"] for j in new]
                printing = [j["uuid"] for j in new
                            if j.get("status") == "printing"]
                now = time.monotonic()
                if printing and now >= pause_at:
                    self.api.request("PUT", "%s/print_jobs/%s/action" % (
                        API, printing[0]), json.dumps(
                            {"action": "pause"}).encode())
                    resume = (now + RESUME_AFTER, printing[0])
                    pause_at = now + self.rand.uniform(0.5, 1.5) * \
                        ACTION_EVERY
                if resume and now >= resume[0]:
                    self.api.request("PUT", "%s/print_jobs/%s/action" % (
                        API, resume[1]), json.dumps(
                            {"action": "print"}).encode())
                    resume = None


def session_main(argv):
    """session process: port kinds(comma) flat seconds ufp1 ufp2 seed0"""
    port, kinds, flat, seconds = (int(argv[0]), argv[1].split(","),
                                  argv[2] == "1", float(argv[3]))
    ufps, seed0 = argv[4:6], int(argv[6])
    materials = local_materials()
    stats = Stats()
    t0 = time.monotonic()
    sessions = [Session(kind, port, flat, seconds, stats, ufps, materials,
                        seed0 + i) for i, kind in enumerate(kinds)]
    for s in sessions:
        s.start()
    for s in sessions:
        s.join(seconds + 120.)
    json.dump({"counts": stats.counts, "ms": stats.ms,
               "errors": stats.errors, "connections": stats.connections,
               "seconds": time.monotonic() - t0},
              sys.stdout)


class Sessions:
    """N sessions (Cura 4.13 and Cura 5 alternating) spread over child
    processes of at most per_proc sessions, at the given nice value;
    .result() waits and merges."""
    def __init__(self, port, n, seconds, flat, ufps, per_proc=5, nice=0,
                 kinds=("cura4", "cura5")):
        self.seconds = seconds
        self.until = time.clock_gettime(time.CLOCK_MONOTONIC_RAW) + seconds
        self.procs = []
        all_kinds = [kinds[i % len(kinds)] for i in range(n)]
        for start in range(0, n, per_proc):
            self.procs.append(subprocess.Popen(
                ["nice", "-n", str(nice), sys.executable,
                 os.path.abspath(__file__), "sessions", str(port),
                 ",".join(all_kinds[start:start + per_proc]),
                 "1" if flat else "0", str(seconds)] + list(ufps)
                + [str(start)], stdout=subprocess.PIPE))

    def result(self):
        counts, ms, errors, secs, opened = {}, {}, 0, 0., 0
        for res in clients.child_results(self.procs, self.seconds + 300.,
                                         "session"):
            for what, by in res["counts"].items():
                mine = counts.setdefault(what, {})
                for status, n in by.items():
                    mine[status] = mine.get(status, 0) + n
            for kind, values in res["ms"].items():
                ms.setdefault(kind, []).extend(values)
            errors += res["errors"]
            opened += res["connections"]
            secs = max(secs, res["seconds"])
        total = sum(n for by in counts.values() for status, n in by.items()
                    if status != "None")
        # answered, but with a 503 (a refused connection among them)
        refused = sum(by.get("503", 0) for by in counts.values())
        return {"counts": counts, "requests": total, "errors": errors,
                "refused": refused,
                "connections": opened,
                "requests_per_s": total / secs if secs else 0.,
                "latency_ms": {k: clients.summary(v) for k, v in ms.items()}}


def klippy_share(answered, result):
    """Requests answered in Klippy's process / requests answered."""
    n = sum(answered.values())
    return n / result["requests"] if result["requests"] else None


if __name__ == "__main__":
    if sys.argv[1] == "sessions":
        session_main(sys.argv[2:])
    elif sys.argv[1] == "ufp":
        _write_ufps(sys.argv[2:])
