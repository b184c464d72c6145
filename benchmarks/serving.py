"""Serving benchmark: does Klippy's reactor notice the HTTP server?

For each load, Klippys run side by side in the same run:

* ours: a Klippy with cura_connection as configured by default: its front
  process answers the polls (see "HTTP front" in the module);
* in-process: a Klippy with cura_connection and `front_process: False`,
  every request answered inside Klippy's process (the design before the
  front process): the baseline;
* bare: a Klippy without the module, with the same pinning and quota,
  running at the same time.  It sees the same machine (the load's CPU, the
  kernel's work) but no server shares its GIL: the floor for the others.

The load is aimed at ours, then at in-process, each time with bare
measured at the same moment.  The pollers run at nice 19 (LOAD_NICE).

Both report the lateness of the 10 ms probe timer of cura_test_tools.
Loads:

* Cura sessions (benchmarks/sessions.py): --sessions replays of what a
  Cura does with its printer (Cura 4.13 and Cura 5 alternating: connect,
  pairing request for Cura 5, material list and material posts, two UFP
  uploads with thumbnails, the monitor cycle with preview images, a pause
  and a resume now and then), over Qt-like pools of keep-alive
  connections, once at Cura's rate (a cycle every 2 s) and once flat out
  (cycles back to back), with a print running on ours and on bare;
* 20 and 50 keep-alive pollers flat out (/printers + /print_jobs only: the
  earlier figures);
* a 200 MiB G-code upload;
* a queue of 1,000 jobs (max_queue's limit, written to queue.json before
  Klippy starts) with --queue-sessions Cura sessions at Cura's rate and a
  print running.

For every load on a Klippy with the module, the requests answered in
Klippy's process are counted there (cura_test_tools' TEST_REQUESTS_*: the
request handler of Klippy's process counts what it dispatches) and set
against the requests the clients got answers to: the share answered in
Klippy's process (1.0 for in-process, by construction).

Two legs:

* x86: this machine as it is;
* pi: the Klippys pinned to CPU 0, each in its own cgroup (v1 `cpu`
  controller) with a CFS quota of a fraction of that core, and the load
  generator (this process and its children) on CPU 1.  The fraction is the
  speed of a Raspberry Pi 4 core relative to this one, measured with an
  n-body microbenchmark (pure-Python float arithmetic): see pi_fraction().
  The front process gets a group of its own with the same quota on CPU 1
  (`--front-cpu 1`, default: a Pi 4 has four cores, Klippy uses one), or
  shares its Klippy's group and core (`--front-cpu 0`: a one-core board,
  where one service's cgroup holds both).
"""
import json
import os
import subprocess
import time

import clients
import hostile
import klippy_harness
import sessions

MIB = 1 << 20
CURA_PATHS = ["/cluster-api/v1/printers", "/cluster-api/v1/print_jobs"]
UPLOAD_PATH = "/cluster-api/v1/print_jobs/"
CGROUP_CPU = "/sys/fs/cgroup/cpu"
# A Raspberry Pi 4 (Cortex-A72, 1.5 GHz) runs the classic 5,000,000-step
# n-body benchmark in CPython in 158 s (published figure, Python 3 of
# Raspberry Pi OS).  nbody() below is the same algorithm.
PI4_NBODY_5M_SECONDS = 158.
PERIOD_US = 2000   # short CFS period: the quota throttles in small steps
# The pollers run at the lowest priority: on a real network the clients
# are other machines; here they share this machine's cores with the
# Klippys, and at normal priority they take CPU time from ours and bare
# alike (up to 118 ms of lateness for bare under 50 pollers).
LOAD_NICE = 19
# who the load is aimed at: name, module options
VARIANTS = [("ours", {}), ("inproc", {"front_process": "False"})]

# name, what, goal on x86, unit
GOALS = [
    ("cura_p99", "Cura sessions at Cura's rate: lateness p99", 2., "ms"),
    ("cura_max", "Cura sessions at Cura's rate: lateness max", 5., "ms"),
    ("curaflat_p99", "Cura sessions flat out: lateness p99", 2., "ms"),
    ("curaflat_max", "Cura sessions flat out: lateness max", 5., "ms"),
    ("flood20_p99", "20 pollers flat out: lateness p99", 2., "ms"),
    ("flood20_max", "20 pollers flat out: lateness max", 5., "ms"),
    ("flood50_max", "50 pollers flat out: lateness max", 5., "ms"),
    ("queue1k_max", "1,000 queued jobs + Cura sessions: lateness max", 5.,
     "ms"),
    ("upload_p99", "200 MiB G-code upload: lateness p99", 2., "ms"),
]
PI_RATIO = 1.5
# The print the session loads run beside (1 s a move: an hour at most)
PRINT_MOVES = 3600
QUEUE_JOBS = 1000       # max_queue's limit
RPS_GOAL = 5000.
UPLOAD_RATIO_GOAL = 1.1


def nbody(steps):
    """Seconds of CPU for `steps` steps of the 5-body simulation."""
    solar = 4 * 3.141592653589793 ** 2
    bodies = [
        ([0., 0., 0.], [0., 0., 0.], solar),
        ([4.84143144246472090, -1.16032004402742839, -0.103622044471123109],
         [0.606326392995832, 2.81198684491626, -0.02521836165988763],
         9.54791938424326609e-04 * solar),
        ([8.34336671824457987, 4.12479856412430479, -0.403523417114321381],
         [-1.0107743461787924, 1.8256623712304119, 0.008415761376584154],
         2.85885980666130812e-04 * solar),
        ([12.8943695621391310, -15.1111514016986312, -0.223307578892655734],
         [1.0827910064415354, 0.8687130181696082, -0.010832637401363636],
         4.36624404335156298e-05 * solar),
        ([15.3796971148509165, -25.9193146099879641, 0.179258772950371181],
         [0.979090732243898, 0.5946989986476762, -0.034755955504078104],
         5.15138902046611451e-05 * solar)]
    pairs = [(bodies[i], bodies[j]) for i in range(5)
             for j in range(i + 1, 5)]
    dt = 0.01
    t0 = time.process_time()
    for _ in range(steps):
        for (p1, v1, m1), (p2, v2, m2) in pairs:
            dx, dy, dz = p1[0] - p2[0], p1[1] - p2[1], p1[2] - p2[2]
            mag = dt * (dx * dx + dy * dy + dz * dz) ** -1.5
            b1, b2 = m1 * mag, m2 * mag
            v1[0] -= dx * b2
            v1[1] -= dy * b2
            v1[2] -= dz * b2
            v2[0] += dx * b1
            v2[1] += dy * b1
            v2[2] += dz * b1
        for p, v, _m in bodies:
            p[0] += dt * v[0]
            p[1] += dt * v[1]
            p[2] += dt * v[2]
    return time.process_time() - t0


def pi_fraction(steps=50000, runs=5):
    """(fraction of this core a Pi 4 core is worth, this core's seconds
    for 5M steps): best of `runs` short runs, scaled."""
    here = min(nbody(steps) for _ in range(runs)) * 5e6 / steps
    return min(1., here / PI4_NBODY_5M_SECONDS), here


class PiCore:
    """A cgroup v1 `cpu` child with a CFS quota, plus a CPU pin."""
    def __init__(self, name, fraction, cpu=0, period_us=PERIOD_US):
        self.path = os.path.join(CGROUP_CPU, "cura_bench_%s_%d"
                                 % (name, os.getpid()))
        self.cpu = cpu
        os.mkdir(self.path)
        self._write("cpu.cfs_period_us", period_us)
        self._write("cpu.cfs_quota_us", max(1000, int(period_us * fraction)))

    def _write(self, name, value, path=None):
        with open(os.path.join(path or self.path, name), "w") as f:
            f.write("%s\n" % (value,))

    def add(self, pid):
        """Move pid (all its threads) into the group and onto the CPU."""
        self._write("cgroup.procs", pid)
        subprocess.check_call(["taskset", "-a", "-p", "-c", str(self.cpu),
                               str(pid)], stdout=subprocess.DEVNULL)

    def throttled(self):
        with open(os.path.join(self.path, "cpu.stat")) as f:
            return dict(line.split() for line in f)

    def close(self):
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                pids = f.read().split()
            for pid in pids:
                try:
                    self._write("cgroup.procs", pid, CGROUP_CPU)
                except OSError:
                    pass
            os.rmdir(self.path)
        except OSError:
            pass


class Serving:
    def __init__(self, bench, args, helpers):
        self.b = bench           # the work dir and files of bench.py
        self.h = helpers         # bench.py's probes (its module)
        self.args = args
        self.samples = {}        # (leg, load, who) -> [(t, ms)], for plots
        self.results = {}

    # -- Klippys -----------------------------------------------------
    def klippy(self, name, with_module=True, jobs=4, options=None):
        wd = os.path.join(self.b.workdir, name)
        opts = dict(self.args.module_options or {})
        opts.update(options or {})
        k = klippy_harness.Klippy("klipper", wd, with_module=with_module,
                                  module_options=opts)
        if with_module:
            # the jobs the module makes of real clients' files
            subprocess.check_call([clients.TEST_PYTHON, os.path.join(
                clients.TESTS, "real_inputs.py"), "queue", k.gcodes_dir,
                k.data_dir, str(jobs)], stdout=subprocess.DEVNULL)
        k.start()
        k.wait_ready()
        return k

    def measure(self, ours, bare, load):
        """Run load() (returns a dict) while both probes record."""
        h = self.h
        h.wait_quiet()
        lat = [h.Lateness(ours, ours.workdir),
               h.Lateness(bare, bare.workdir)]
        for probe in lat:
            probe.reset()
        with h.CpuWatch() as cpu:
            r = load()
        s_ours, s_bare = (probe.dump() for probe in lat)
        if "until" in r:
            # the load's own wind-down (50 poller processes encoding their
            # figures and exiting) is not load on the server
            s_ours, s_bare = ([x for x in s if x[0] <= r["until"]]
                              for s in (s_ours, s_bare))
        r.update(ours=lat_summary(s_ours), bare=lat_summary(s_bare),
                 foreign_cpu=cpu.foreign, s_ours=s_ours, s_bare=s_bare)
        return r

    def sessions(self, k, n, duration, flat):
        """n Cura sessions aimed at k; the requests k's process answered
        are counted there."""
        def load():
            k.gcode("TEST_REQUESTS_RESET")
            run = sessions.Sessions(k.cura_port(), n, duration, flat,
                                    self.ufps, nice=LOAD_NICE)
            res = run.result()
            path = os.path.join(k.workdir, "requests.json")
            k.gcode("TEST_REQUESTS_DUMP FILE=" + path)
            with open(path) as f:
                answered = json.load(f)
            return {"requests_per_s": res["requests_per_s"],
                    "requests": res["requests"], "errors": res["errors"],
                    "refused": res["refused"],
                    "connections": res["connections"],
                    "until": run.until, "counts": res["counts"],
                    "latency_ms": res["latency_ms"],
                    "klippy_answered": answered,
                    "klippy_share": sessions.klippy_share(answered, res)}
        return load

    def printing(self, ks):
        """Start the same long print on each Klippy of ks."""
        for k in ks:
            name = k.write_gcode("bench-long.gcode", moves=PRINT_MOVES,
                                 sleep_every=1, sleep_s=1.)
            k.gcode("SDCARD_PRINT_FILE FILENAME=" + name)

    def stop_printing(self, ks):
        for k in ks:
            k.gcode("CANCEL_PRINT")
            k.gcode("SDCARD_RESET_FILE")

    def forget_jobs(self, k):
        """Resume a print the sessions left paused; delete the jobs they
        queued (the next load starts with an equal queue)."""
        base = "http://127.0.0.1:%d" % (k.cura_port(),)
        import httpc
        for job in httpc.get_json(base, "/cluster-api/v1/print_jobs"):
            if job["status"] == "paused":
                httpc.request(base, "PUT", UPLOAD_PATH + job["uuid"] +
                              "/action", json_body={"action": "print"})
            elif job["status"] == "queued" and job["owner"].startswith(
                    "bench"):
                httpc_delete(k.cura_port(), job["uuid"])

    def pollers(self, port, n, duration, interval):
        def load():
            pollers = clients.Pollers(port, n, duration, interval,
                                      CURA_PATHS, nice=LOAD_NICE)
            # (Klippy's reactor clock is CLOCK_MONOTONIC_RAW)
            until = time.clock_gettime(time.CLOCK_MONOTONIC_RAW) + duration
            res = pollers.result()
            return {"requests_per_s": res["requests_per_s"],
                    "errors": res["errors"], "until": until,
                    "latency_ms": res["summary"]}
        return load

    def upload(self, k, i):
        def load():
            name = "bench-s-%d.gcode" % (i,)
            r = clients.upload(k.cura_port(), UPLOAD_PATH,
                               self.b.files["gcode200"], name,
                               {"owner": "bench"})
            if r["status"] != 200:
                raise RuntimeError("upload failed: %r" % (r,))
            job = json.loads(r["body"])
            httpc_delete(k.cura_port(), job["uuid"])
            path = os.path.join(k.gcodes_dir, job["filename"])
            if os.path.exists(path):
                os.unlink(path)
            return {"seconds": r["seconds"]}
        base = self.h.cp_baseline(self.b.files["gcode200"], k.gcodes_dir)
        r = self.measure(k, self.bare, load)
        r.update(base)
        return r

    # -- one leg -----------------------------------------------------
    def leg(self, leg):
        a = self.args
        groups = []
        fraction = None
        if leg == "pi":
            fraction = self.results["pi_fraction"]
            os.sched_setaffinity(0, {1})   # the load generator: CPU 1
        out = {}
        started = []

        def start(name, **kwargs):
            k = self.klippy("%s-%s" % (leg, name), **kwargs)
            started.append(k)
            if leg == "pi":
                g = PiCore("%s_%s" % (leg, name), fraction)
                groups.append(g)
                g.add(k.pid)
                for child in hostile.children(k.pid):   # the front process
                    if a.front_cpu == 0:
                        # one core: Klippy's share, as one service's
                        # cgroup would hold both on a one-core board
                        g.add(child)
                        continue
                    front = PiCore("%s_%s_front" % (leg, name), fraction,
                                   cpu=a.front_cpu)
                    groups.append(front)
                    front.add(child)
            return k
        try:
            self.bare = start("bare", with_module=False)
            for variant, options in VARIANTS:
                k = start(variant, options=options)
                port = k.cura_port()
                out[variant] = {}
                if a.sessions:
                    self.printing([k, self.bare])
                    for key, flat in (("cura", False), ("curaflat", True)):
                        r = self.measure(k, self.bare, self.sessions(
                            k, a.sessions, a.session_seconds, flat))
                        self.note(leg, key, variant, r, share(r))
                        out[variant][key] = r
                        self.forget_jobs(k)
                    self.stop_printing([k, self.bare])
                for n in (20, 50) if a.flood else ():
                    key = "flood%d" % (n,)
                    r = self.measure(k, self.bare,
                                     self.pollers(port, n, a.flood, 0))
                    self.note(leg, key, variant, r)
                    out.setdefault(variant, {})[key] = r
                runs = []
                for i in range(a.upload_runs):
                    r = self.upload(k, i)
                    self.note(leg, "upload", variant, r,
                              "upload %.3f s, cp+fsync %.3f s"
                              % (r["seconds"], r["cp_fsync"]))
                    runs.append(r)
                out[variant]["upload"] = runs
                k.stop()
                if not a.queue_seconds:
                    continue
                # 1,000 queued jobs: a fresh Klippy that loads them
                opts = dict(options, max_queue=QUEUE_JOBS)
                k = start(variant + "1k", jobs=QUEUE_JOBS, options=opts)
                self.printing([k, self.bare])
                r = self.measure(k, self.bare, self.sessions(
                    k, a.queue_sessions, a.queue_seconds, False))
                self.note(leg, "queue1k", variant, r, share(r))
                out[variant]["queue1k"] = r
                self.stop_printing([self.bare])
                k.stop()
        finally:
            for k in started:
                k.stop()
            for g in groups:
                g.close()
            os.sched_setaffinity(0, set(range(os.cpu_count())))
        return out

    def note(self, leg, load, variant, r, extra=""):
        self.samples.setdefault((leg, load, variant), []).append(
            (r.pop("s_ours"), r.pop("s_bare")))
        self.h.log("  %s %s: %s %s | bare %s %s%s" % (
            leg, load, variant, fmt_lat(r["ours"]), fmt_lat(r["bare"]),
            ("%.0f req/s " % r["requests_per_s"])
            if "requests_per_s" in r else "", extra))

    def run(self):
        log = self.h.log
        self.results["front_cpu"] = self.args.front_cpu
        self.results["sessions"] = self.args.sessions
        self.results["queue_sessions"] = self.args.queue_sessions
        self.ufps = sessions.make_ufps(self.b.workdir)
        frac, here = pi_fraction()
        self.results["pi_fraction"] = frac
        self.results["nbody_5m_here"] = here
        log("serving: n-body 5M steps here %.1f s, Pi 4 %.0f s: Pi leg "
            "quota %.0f%% of CPU 0" % (here, PI4_NBODY_5M_SECONDS,
                                       frac * 100))
        for leg in ("x86", "pi"):
            log("serving, %s leg" % (leg,))
            self.results[leg] = self.leg(leg)
        self.results["figures"] = self.figures()
        return self.results

    def figures(self):
        """{leg: {load: {variant: {"ours": summary, "bare": summary}}}}
        ("ours": the variant's Klippy); the upload's samples of all runs
        pooled."""
        out = {}
        for (leg, load, variant), runs in self.samples.items():
            out.setdefault(leg, {}).setdefault(load, {})[variant] = {
                who: lat_summary([x for r in runs for x in r[i]])
                for i, who in enumerate(("ours", "bare"))}
        return out



def share(r):
    """The note of a session load: who answered."""
    return ("%d requests on %d connections, %d answered in Klippy's "
            "process (%s), %d errors" % (
                r["requests"], r["connections"],
                sum(r["klippy_answered"].values()),
                _f(r["klippy_share"] and r["klippy_share"] * 100, 1, "%"),
                r["errors"]))


def lat_summary(samples):
    s = clients.summary([v for _, v in samples])
    return {"n": s["n"], "p50": s["p50"], "p99": s["p99"], "max": s["max"]}


def httpc_delete(port, job_uuid):
    import httpc
    r = httpc.request("http://127.0.0.1:%d" % port, "DELETE",
                      UPLOAD_PATH + job_uuid)
    if r.status != 200:
        raise RuntimeError("DELETE job: %r" % (r,))


def fmt_lat(s):
    return "p50 %.2f / p99 %.2f / max %.2f ms (n %d)" % (
        s["p50"] or 0, s["p99"] or 0, s["max"] or 0, s["n"])


def _f(v, digits=2, unit=""):
    return "-" if v is None else ("%.*f" % (digits, v)) + unit


def _ok(v, limit, at_least=False):
    if v is None:
        return "-"
    return "PASS" if (v >= limit if at_least else v <= limit) else "FAIL"


def report(res):
    """The issue's goal table, Markdown: every row with its goal, for the
    default (front process) beside in-process and bare."""
    fig = res["figures"]
    L = ["### Does the reactor notice the server? (goals beside each row)",
         "",
         "Lateness of Klippy's 10 ms probe timer.  'ours': cura_connection "
         "as configured by default (its front process answers the polls); "
         "'in-process': `front_process: False`, everything answered in "
         "Klippy's process; 'bare': a Klippy without cura_connection, "
         "running at the same time as each, with the same pinning and quota "
         "(the bare column is the one measured beside ours).  Pi-class leg: "
         "the Klippys on CPU 0, each in a cgroup with a CFS quota of %.0f%% "
         "of the core (period %d us; n-body: this core %.1f s for 5M steps, "
         "a Pi 4 %.0f s), the front process %s, the load generator on "
         "CPU 1.  The pollers run at nice 19 in both legs."
         % (res["pi_fraction"] * 100, PERIOD_US, res["nbody_5m_here"],
            PI4_NBODY_5M_SECONDS,
            "in its Klippy's group (one core)" if res.get("front_cpu") == 0
            else "in a group of its own with the same quota on CPU 1"), "",
         "| figure | x86: ours | x86: in-process | x86: bare | x86 goal | "
         "| Pi: ours | Pi: in-process | Pi: bare | Pi ours/bare "
         "| Pi in-process/bare | Pi goal | |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, what, goal, unit in GOALS:
        load, stat = key.rsplit("_", 1)
        cells = []
        for leg in ("x86", "pi"):
            f = fig.get(leg, {}).get(load, {})
            o = f.get("ours") and f["ours"]["ours"][stat]
            i = f.get("inproc") and f["inproc"]["ours"][stat]
            b = f.get("ours") and f["ours"]["bare"][stat]
            bi = f.get("inproc") and f["inproc"]["bare"][stat]
            cells.append((o, i, b, bi))
        (xo, xi, xb, _), (po, pi, pb, pbi) = cells
        pr = po / pb if po is not None and pb else None
        pir = pi / pbi if pi is not None and pbi else None
        L.append("| %s | %s | %s | %s | <= %g %s | %s | %s | %s | %s | %s "
                 "| %s | <= %gx | %s |" % (
                     what, _f(xo, 2, " ms"), _f(xi, 2, " ms"),
                     _f(xb, 2, " ms"), goal, unit, _ok(xo, goal),
                     _f(po, 2, " ms"), _f(pi, 2, " ms"), _f(pb, 2, " ms"),
                     _f(pr, 2, "x"), _f(pir, 2, "x"), PI_RATIO,
                     _ok(pr, PI_RATIO)))

    def got(leg, variant, load):
        return res.get(leg, {}).get(variant, {}).get(load) or {}
    rps = [got(leg, v, "flood50").get("requests_per_s")
           for leg in ("x86", "pi") for v in ("ours", "inproc")]
    L.append("| /printers + /print_jobs req/s, 50 pollers flat out | %s | %s "
             "| | >= %d | %s | %s | %s | | | | (no goal) | |"
             % (_f(rps[0], 0), _f(rps[1], 0), RPS_GOAL,
                _ok(rps[0], RPS_GOAL, True), _f(rps[2], 0), _f(rps[3], 0)))
    ups = [got("x86", v, "upload") or [] for v in ("ours", "inproc")]
    if ups[0]:
        import statistics
        cells = []
        for runs in ups:
            t = statistics.median(r["seconds"] for r in runs) if runs \
                else None
            base = statistics.median(r["cp_fsync"] for r in runs) if runs \
                else None
            cells.append((t, base))
        (t, base), (ti, basei) = cells
        L.append("| upload 200 MiB G-code / (cp + fsync), x86 leg, median "
                 "of %d | %s (%.3f / %.3f s) | %s | | <= %gx | %s | | | | | "
                 "| | |" % (len(ups[0]), _f(t / base, 2, "x"), t, base,
                            _f(ti / basei, 2, "x") if ti else "-",
                            UPLOAD_RATIO_GOAL, _ok(t / base,
                                                   UPLOAD_RATIO_GOAL)))
    L += sessions_report(res)
    return "\n".join(L) + "\n"


SESSION_LOADS = [("cura", "%d Cura sessions at Cura's rate"),
                 ("curaflat", "%d Cura sessions flat out"),
                 ("queue1k", "1,000 queued jobs + %d Cura sessions")]


def sessions_report(res):
    """Per leg and session load: requests answered, the share answered in
    Klippy's process, and the lateness against bare in the same seconds
    (goal: within PI_RATIO x bare, p99 and max, both legs)."""
    fig = res["figures"]
    L = ["", "### Cura sessions: who answers, and what the reactor notices",
         "",
         "Replayed Cura 4.13 and Cura 5 sessions (benchmarks/sessions.py), "
         "a print running on ours and on bare.  'in Klippy's process': "
         "requests its request handler dispatched (counted there) / "
         "requests the sessions got answers to.", "",
         "| load | leg | req/s ours | req/s in-process | in Klippy's "
         "process: ours | in-process | 503s / errors: ours | in-process "
         "| lateness p99 ours / bare | max ours / bare | ours/bare p99, max "
         "(goal <= %gx) | |" % (PI_RATIO,),
         "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for load, what in SESSION_LOADS:
        n = res.get("queue_sessions" if load == "queue1k" else "sessions")
        for leg in ("x86", "pi"):
            got = {v: res.get(leg, {}).get(v, {}).get(load) or {}
                   for v in ("ours", "inproc")}
            f = fig.get(leg, {}).get(load, {}).get("ours")
            if not got["ours"] or not f:
                continue
            o, b = f["ours"], f["bare"]
            ratios = [o[q] / b[q] if o[q] is not None and b[q] else None
                      for q in ("p99", "max")]
            ok = [_ok(r, PI_RATIO) for r in ratios]
            L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s "
                     "| %s / %s | %s, %s | %s |" % (
                         what % (n or 0,), leg,
                         _f(got["ours"].get("requests_per_s"), 0),
                         _f(got["inproc"].get("requests_per_s"), 0),
                         _f(got["ours"].get("klippy_share") and
                            got["ours"]["klippy_share"] * 100, 1, "%"),
                         _f(got["inproc"].get("klippy_share") and
                            got["inproc"]["klippy_share"] * 100, 1, "%"),
                         *("%s / %s" % (got[v].get("refused", "-"),
                                         got[v].get("errors", "-"))
                           for v in ("ours", "inproc")),
                         _f(o["p99"], 2), _f(b["p99"], 2), _f(o["max"], 2),
                         _f(b["max"], 2), _f(ratios[0], 2, "x"),
                         _f(ratios[1], 2, "x"),
                         "PASS" if ok == ["PASS", "PASS"] else "FAIL"))
    return L


def plot(samples, path):
    """Lateness over time, one panel per leg and load: ours and bare."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    loads = [("cura", "Cura sessions, Cura's rate"),
             ("curaflat", "Cura sessions flat out"),
             ("flood20", "20 pollers flat out"),
             ("flood50", "50 pollers flat out"),
             ("upload", "200 MiB G-code upload (runs end to end)"),
             ("queue1k", "1,000 jobs, Cura sessions")]
    legs = [("x86", "x86"), ("pi", "Pi-class (1 core, quota)")]
    fig, axes = plt.subplots(len(legs), len(loads), figsize=(25, 7.5),
                             sharey=True, squeeze=False)
    top = 6.
    for row, (leg, leg_label) in enumerate(legs):
        for col, (load, title) in enumerate(loads):
            ax = axes[row][col]
            lines = [(samples.get((leg, load, "inproc"), []), 0,
                      "in-process (front_process: False)", "tab:orange"),
                     (samples.get((leg, load, "ours"), []), 0,
                      "Klippy with cura_connection", "tab:blue"),
                     (samples.get((leg, load, "ours"), []), 1,
                      "Klippy without it, same time", "tab:green")]
            for runs, i, label, color in lines:
                xs, ys, t = [], [], 0.
                for run in runs:
                    s = run[i]
                    if not s:
                        continue
                    xs += [t + x - s[0][0] for x, _ in s]
                    ys += [y for _, y in s]
                    t = xs[-1] + 0.01
                if ys:
                    top = max(top, max(ys))
                    ax.plot(xs, ys, lw=0.7, color=color, label=label)
            ax.axhline(5, color="red", ls=":", lw=0.8)
            ax.axhline(2, color="grey", ls="--", lw=0.8)
            ax.set_title("%s: %s" % (leg_label, title), fontsize=9)
            ax.set_xlabel("seconds")
            if col == 0:
                ax.set_ylabel("probe lateness (ms)")
            ax.legend(loc="upper right", fontsize=7)
    for ax in axes.flat:
        ax.set_ylim(0, min(top * 1.05, 200.))
    fig.text(0.01, 0.005, "dashed: 2 ms (p99 goal), dotted: 5 ms (max "
             "goal)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
