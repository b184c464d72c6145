"""Group benchmark: does the host's reactor notice its group?

The issue's goal: the host's reactor does nothing per member (member
connections, uploads to members and their status live outside it); with
10 members and 20 Cura sessions the host's reactor lateness stays within
1.5x a bare Klippy's, both legs.

What runs, per Klippy flavour (the same flavour for every Klippy):

* the members: --members real Klippys (the harness's simulated printer,
  without cura_connection), each with its own real Moonraker 0.11.0
  (tests/support/moonraker_member.py).  They run during the whole
  flavour, both legs and both Klippys measured, so the baseline carries
  the same machine load;
* the host: a Klippy with cura_connection as configured by default (the
  front process answers the polls) and `group_printers` naming every
  member's Moonraker (one entry per Moonraker);
* bare: a Klippy without the module, started beside the host, with the
  same pinning and quota.  Both probes record in the same seconds
  (serving.py's method): bare sees the machine (members, sessions, the
  host's front) but no module;
* before the rounds: the same long print on the host's own printer and on
  bare (started with SDCARD_PRINT_FILE, as serving.py does), and a long
  job uploaded to the host pinned to the first member, printing there
  (the follower follows it every second);
* each round (--rounds, --seconds each): every member's plate marked
  clear through the host's API, then --sessions Cura sessions at Cura's
  rate (benchmarks/sessions.py: connect, material sync, two UFP uploads
  each for any printer, the monitor cycle with previews, a pause and a
  resume now and then) aimed at the host.  The idle members claim the
  sessions' uploads: the host sends each one to its member (upload to its
  Moonraker, then start) during the round.  After the round the jobs
  sessions left queued are deleted and a paused job is resumed.

Legs (serving.py's): x86 as the machine is; pi: host and bare (and the
host's front, in its own group on CPU 1) under a CFS quota of a Pi 4
core's share of CPU 0, the members and the sessions on CPU 1 (they are
other computers on a real network).

Run with the bench venv (benchmarks/run.sh makes it and Moonraker's):

    .venv/bench/bin/python benchmarks/group.py --flavors klipper,kalico \\
        --legs x86,pi --rounds 2 --seconds 30
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
sys.path.insert(0, HERE)

import bench  # noqa: E402
import clients  # noqa: E402
import hostile  # noqa: E402
import httpc  # noqa: E402
import klippy_harness  # noqa: E402
import moonraker_member  # noqa: E402
import serving  # noqa: E402
import sessions  # noqa: E402

API = "/cluster-api/v1"
RATIO = 1.5
# name: (module options, with the group).  nogroup: the module as
# configured by default but no group_printers (what the sessions alone
# cost the host, for telling the group's share from theirs)
VARIANTS = {"front": ({}, True), "inproc": ({"front_process": "False"}, True),
            "nogroup": ({}, False)}
LONG_MOVES = 3600       # 1 s a move: an hour at most


def log(*a):
    bench.log(*a)


def cpu_of(pids):
    """utime+stime (s) of pids and their threads."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                v = f.read().rsplit(")", 1)[1].split()
            total += int(v[11]) + int(v[12])
        except OSError:
            pass
    return total / tick


def pin(pid, cpus):
    subprocess.check_call(["taskset", "-a", "-p", "-c", cpus, str(pid)],
                          stdout=subprocess.DEVNULL)


class Group:
    def __init__(self, args, workdir):
        self.args = args
        self.workdir = workdir
        self.results = {"args": vars(args), "flavors": {}}
        self.ufps = sessions.make_ufps(workdir)

    # -- parts -------------------------------------------------------
    def members_up(self, flavor):
        out = []
        t0 = time.monotonic()
        for i in range(self.args.members):
            m = moonraker_member.start_member(
                os.path.join(self.workdir, flavor, "m%02d" % (i,)), flavor)
            m.name = "m%02d" % (i,)
            out.append(m)
        log("  %d members (Klippy + Moonraker %s) up in %.0f s" % (
            len(out), out[0].moonraker.version(), time.monotonic() - t0))
        return out

    def member_pids(self, members):
        return [p for m in members for p in (m.klippy.pid,
                                             m.moonraker.pid)]

    def klippy(self, flavor, name, members=None, options=None,
               with_module=None):
        opts = dict(options or {})
        if with_module is None:
            with_module = bool(members)
        if members:
            opts["group_printers"] = ", ".join(
                "%s=%s" % (m.name, m.url) for m in members)
        k = klippy_harness.Klippy(flavor, os.path.join(self.workdir, flavor,
                                                       name),
                                  with_module=with_module,
                                  module_options=opts)
        k.start()
        k.wait_ready()
        return k

    # -- the host's API ------------------------------------------------
    def cards(self, host):
        return httpc.get_json(host.base_url(), API + "/printers")

    def wait_members(self, host, members, timeout=60.):
        deadline = time.monotonic() + timeout
        names = {m.name for m in members}
        while True:
            cards = {c["friendly_name"]: c for c in self.cards(host)}
            bad = {n: cards.get(n, {}).get("status") for n in names
                   if cards.get(n, {}).get("status") in (None,
                                                         "unreachable")}
            if not bad:
                return cards
            if time.monotonic() > deadline:
                raise RuntimeError("members not reached: %r" % (bad,))
            time.sleep(0.5)

    def clear_plates(self, host, members):
        cleared = 0
        for c in self.cards(host)[1:]:
            if not c.get("plate_clear") and c["status"] != "printing":
                r = httpc.request(host.base_url(), "POST", "%s/printers/%s/"
                                  "action/plate_cleared" % (API, c["uuid"]),
                                  json_body={})
                cleared += r.status == 200
        return cleared

    def pinned_long_job(self, host, member):
        """A long job pinned to member, printing there."""
        path = os.path.join(self.workdir, "group-long.gcode")
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write("; group bench long print\nG90\nM83\n")
                for i in range(LONG_MOVES):
                    f.write("G1 X%d Y%d E0.05 F3000\nTEST_SLEEP S=1\n"
                            % (10 + i % 50, 10 + i // 50 % 50))
        r = clients.upload(host.cura_port(), API + "/print_jobs/", path,
                           "group-long.gcode",
                           {"owner": "group-bench",
                            "require_printer_name": member.name})
        if r["status"] != 200:
            raise RuntimeError("pinned upload: %r" % (r,))
        uuid = json.loads(r["body"])["uuid"]
        deadline = time.monotonic() + 60.
        while time.monotonic() < deadline:
            for j in httpc.get_json(host.base_url(), API + "/print_jobs"):
                if j["uuid"] == uuid and j["status"] == "printing":
                    return uuid
            time.sleep(0.5)
        raise RuntimeError("the pinned job did not start on %s"
                           % (member.name,))

    def tidy(self, host):
        """Resume what the sessions left paused, delete their queued
        jobs; returns {status: n} of the listed jobs first."""
        base = host.base_url()
        seen = {}
        for job in httpc.get_json(base, API + "/print_jobs"):
            seen[job["status"]] = seen.get(job["status"], 0) + 1
            if job["status"] == "paused":
                httpc.request(base, "PUT", "%s/print_jobs/%s/action"
                              % (API, job["uuid"]),
                              json_body={"action": "print"})
            elif job["status"] == "queued" and job["owner"].startswith(
                    "bench"):
                serving.httpc_delete(host.cura_port(), job["uuid"])
        return seen

    def member_jobs(self, host):
        """Jobs the host sent to members so far (history included)."""
        member_uuids = {c["uuid"] for c in self.cards(host)[1:]}
        listed = httpc.get_json(host.base_url(), API + "/print_jobs")
        if not member_uuids:
            return 0
        try:
            listed += httpc.get_json(host.base_url(),
                                     API + "/print_jobs/history")
        except Exception:
            pass
        return sum(1 for j in listed
                   if j.get("printer_uuid") in member_uuids)

    # -- one leg -------------------------------------------------------
    def leg(self, flavor, leg, members):
        a = self.args
        groups = []
        started = []
        out = {}
        mpids = self.member_pids(members)
        try:
            if leg == "pi":
                os.sched_setaffinity(0, {1})
                for pid in mpids:
                    pin(pid, "1")
            else:
                for pid in mpids:
                    pin(pid, "0-%d" % (os.cpu_count() - 1))
            bare = self.klippy(flavor, "%s-bare" % (leg,))
            started.append(bare)
            self.pi_group(flavor, leg, "bare", bare, groups)
            name = bare.write_gcode("bench-long.gcode", moves=LONG_MOVES,
                                    sleep_every=1, sleep_s=1.)
            bare.gcode("SDCARD_PRINT_FILE FILENAME=" + name)
            for variant in a.variants:
                out[variant] = self.variant(flavor, leg, variant, bare,
                                            members, groups, started)
        finally:
            for k in started:
                k.stop()
            for g in groups:
                g.close()
            os.sched_setaffinity(0, set(range(os.cpu_count())))
        return out

    def pi_group(self, flavor, leg, name, k, groups):
        if leg != "pi":
            return
        frac = self.results["pi_fraction"]
        g = serving.PiCore("g_%s_%s_%s" % (flavor, leg, name), frac)
        groups.append(g)
        g.add(k.pid)
        for child in hostile.children(k.pid):   # the front
            f = serving.PiCore("g_%s_%s_%s_front" % (flavor, leg, name),
                               frac, cpu=1)
            groups.append(f)
            f.add(child)

    def variant(self, flavor, leg, variant, bare, members, groups, started):
        """The host (front process or in-process) beside bare: rounds."""
        a = self.args
        out = {"rounds": []}
        opts, grouped = VARIANTS[variant]
        if not grouped:
            members = []
        host = self.klippy(flavor, "%s-host-%s" % (leg, variant), members,
                           opts, with_module=True)
        started.append(host)
        try:
            self.pi_group(flavor, leg, "host_" + variant, host, groups)
            name = host.write_gcode("bench-long.gcode", moves=LONG_MOVES,
                                    sleep_every=1, sleep_s=1.)
            host.gcode("SDCARD_PRINT_FILE FILENAME=" + name)
            if members:
                self.wait_members(host, members)
                self.pinned_long_job(host, members[0])
            for rnd in range(a.rounds):
                cleared = self.clear_plates(host, members) if members \
                    else 0
                sent0 = self.member_jobs(host)
                spy = None
                if a.profile:
                    out_path = os.path.join(a.profile, "%s-%s-%s-%d.txt" % (
                        flavor, leg, variant, rnd))
                    spy = subprocess.Popen(
                        [os.path.join(os.path.dirname(sys.executable),
                                      "py-spy"), "record", "--gil",
                         "--nonblocking", "--threads", "-r", "200", "-d",
                         str(int(a.seconds)), "-f", "raw", "-o", out_path,
                         "-p", str(host.pid)], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
                # (the members are measured in every variant: the same
                # machine load; only the host's configuration differs)
                r = self.measure(host, bare, self.all_members, a.sessions,
                                 a.seconds)
                if spy:
                    spy.wait(60)
                    r["profile"] = out_path
                r["plates_cleared"] = cleared
                r["member_jobs_sent"] = self.member_jobs(host) - sent0
                r["jobs_after"] = self.tidy(host)
                cards = self.cards(host)[1:]
                r["member_status_after"] = {
                    c["friendly_name"]: c["status"] for c in cards}
                o, b = r["host"], r["bare"]
                log("  %s %s %s round %d: host %s | bare %s | %.0f req/s, "
                    "%d errors, %d 503s, %d jobs sent to members, host CPU "
                    "%.2f s, members CPU %.2f s" % (
                        flavor, leg, variant, rnd, serving.fmt_lat(o),
                        serving.fmt_lat(b), r["requests_per_s"],
                        r["errors"], r["refused"], r["member_jobs_sent"],
                        r["host_cpu_s"], r["members_cpu_s"]))
                out["rounds"].append(r)
            # the pinned job: cancel it, so the member is free for the next
            for j in httpc.get_json(host.base_url(), API + "/print_jobs"):
                if j["status"] in ("printing", "paused"):
                    httpc.request(host.base_url(), "PUT",
                                  "%s/print_jobs/%s/action"
                                  % (API, j["uuid"]),
                                  json_body={"action": "abort"})
            out["host_tracebacks"] = klippy_harness.own_tracebacks(
                host.log_text())
        finally:
            host.stop()
        return out

    def measure(self, host, bare, members, n, seconds):
        bench.wait_quiet()
        lat = [bench.Lateness(host, host.workdir),
               bench.Lateness(bare, bare.workdir)]
        for p in lat:
            p.reset()
        hcpu = cpu_of([host.pid])
        mcpu = cpu_of(self.member_pids(members))
        with bench.CpuWatch() as cpu:
            run = sessions.Sessions(host.cura_port(), n, seconds, False,
                                    self.ufps, nice=serving.LOAD_NICE)
            if not n:       # the group alone: its members' polling
                time.sleep(seconds)
            res = run.result()
        hcpu = cpu_of([host.pid]) - hcpu
        mcpu = cpu_of(self.member_pids(members)) - mcpu
        s_host, s_bare = (p.dump() for p in lat)
        s_host, s_bare = ([x for x in s if x[0] <= run.until]
                          for s in (s_host, s_bare))
        return {"host": serving.lat_summary(s_host),
                "bare": serving.lat_summary(s_bare),
                "requests": res["requests"], "errors": res["errors"],
                "refused": res["refused"],
                "requests_per_s": res["requests_per_s"],
                "counts": res["counts"], "foreign_cpu": cpu.foreign,
                "host_cpu_s": hcpu, "members_cpu_s": mcpu,
                "s_host": s_host, "s_bare": s_bare}

    # -- all -----------------------------------------------------------
    def run(self):
        a = self.args
        if "pi" in a.legs:
            frac, here = serving.pi_fraction()
            self.results["pi_fraction"] = frac
            self.results["nbody_5m_here"] = here
            log("n-body 5M steps here %.1f s: Pi leg quota %.0f%% of CPU 0"
                % (here, frac * 100))
        for flavor in a.flavors:
            klippy_harness.install_module(flavor)
            log("flavour %s" % (flavor,))
            members = self.members_up(flavor)
            self.all_members = members
            try:
                idle0 = cpu_of(self.member_pids(members))
                time.sleep(5.)
                idle = (cpu_of(self.member_pids(members)) - idle0) / 5.
                log("  members idle, no host: %.1f%% of a core" % (
                    idle * 100))
                res = {"members_idle_cpu": idle,
                       "moonraker": members[0].moonraker.version()}
                for leg in a.legs:
                    res[leg] = self.leg(flavor, leg, members)
                self.results["flavors"][flavor] = res
            finally:
                for m in members:
                    m.close()
        return self.results


def pooled(rounds, who):
    return serving.lat_summary([x for r in rounds for x in r["s_" + who]])


def each(res):
    for flavor, fr in res["flavors"].items():
        for leg in ("x86", "pi"):
            for variant in VARIANTS:
                got = fr.get(leg, {}).get(variant)
                if got:
                    yield flavor, leg, variant, got["rounds"]


def report(res):
    L = ["| flavour | leg | host | rounds | host p50 / p99 / max | bare p50 "
         "/ p99 / max | host/bare p99 | host/bare max | <= %gx |" % (RATIO,),
         "|---|---|---|---|---|---|---|---|---|"]
    for flavor, leg, variant, rounds in each(res):
        h, b = pooled(rounds, "host"), pooled(rounds, "bare")
        rp = h["p99"] / b["p99"] if b["p99"] else None
        rm = h["max"] / b["max"] if b["max"] else None
        ok = "PASS" if rp is not None and rm is not None and \
            rp <= RATIO and rm <= RATIO else "FAIL"
        L.append("| %s | %s | %s | %d x %gs | %.2f / %.2f / %.2f ms | "
                 "%.2f / %.2f / %.2f ms | %.2fx | %.2fx | %s |" % (
                     flavor, leg, variant, len(rounds),
                     res["args"]["seconds"], h["p50"], h["p99"],
                     h["max"], b["p50"], b["p99"], b["max"], rp, rm, ok))
    L += ["", "Per round:", "",
          "| flavour | leg | host | round | host p99 / max | bare p99 / max "
          "| req/s | errors / 503s | jobs sent to members | host CPU | "
          "members CPU | other CPU |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for flavor, leg, variant, rounds in each(res):
        for i, r in enumerate(rounds):
            L.append("| %s | %s | %s | %d | %.2f / %.2f | %.2f / %.2f | "
                     "%.0f | %d / %d | %d | %.1f s | %.1f s | %.0f%% |" % (
                         flavor, leg, variant, i, r["host"]["p99"],
                         r["host"]["max"], r["bare"]["p99"],
                         r["bare"]["max"], r["requests_per_s"],
                         r["errors"], r["refused"], r["member_jobs_sent"],
                         r["host_cpu_s"], r["members_cpu_s"],
                         r["foreign_cpu"] * 100))
    return "\n".join(L) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--flavors", default="klipper,kalico")
    p.add_argument("--legs", default="x86,pi")
    p.add_argument("--variants", default="front",
                   help="front (default config), inproc (front_process: "
                   "False), comma list")
    p.add_argument("--profile", default="",
                   help="a folder: py-spy (--gil --nonblocking) records "
                   "the host Klippy during every round (not for the table)")
    p.add_argument("--members", type=int, default=10)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quiet-wait", type=float, default=5.)
    p.add_argument("--out", default=os.path.join(HERE, "results",
                                                 "group.json"))
    args = p.parse_args()
    args.flavors = [f for f in args.flavors.split(",") if f]
    args.legs = [x for x in args.legs.split(",") if x]
    args.variants = [x for x in args.variants.split(",") if x]
    bench.QUIET_TIMEOUT = args.quiet_wait
    with tempfile.TemporaryDirectory(prefix="group-bench-") as wd:
        res = Group(args, wd).run()
    table = report(res)
    print(table)
    for _f, _l, _v, rounds in each(res):
        for r in rounds:
            r["samples_host"] = len(r.pop("s_host"))
            r["samples_bare"] = len(r.pop("s_bare"))
    res["args"]["out"] = os.path.basename(args.out)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()
