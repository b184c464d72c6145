#!/usr/bin/env python3
"""What the front process costs to start: the single-file layout (the last
version before the package, 84f80cb by default) loading its whole file,
against the package's front loading only what it uses.  Each run is a
fresh interpreter (Klippy's venv Python) that imports what the front's
boot imports, then reports its time and resident memory; runs alternate
old and new.  Usage: front_boot.py [--runs N] [--old REV]"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = os.path.join(REPO, "klippy_extras")
PYTHON = os.path.join(REPO, ".venv", "klipper", "bin", "python")

MEASURE = """
import resource, sys, time
t0 = time.perf_counter()
%s
t1 = time.perf_counter()
print(%s)
"""
REPORT = ("__import__('json').dumps({'ms': (t1 - t0) * 1000, 'rss_kib': "
          "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, 'files': "
          "sorted(getattr(m, '__file__', None) or '' for m in "
          "list(sys.modules.values()) + [globals().get('module')] "
          "if 'cura_connection' in (getattr(m, '__file__', None) or ''))})")
OLD = """import importlib.util
spec = importlib.util.spec_from_file_location("cura_connection_front", %r)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)"""
NEW = """sys.path.insert(0, %r)
from _cura_connection import front"""


def run(code):
    out = subprocess.run([PYTHON, "-c", MEASURE % (code, REPORT)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--old", default="84f80cb")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_file = os.path.join(tmp, "cura_connection.py")
        with open(old_file, "wb") as f:
            f.write(subprocess.run(
                ["git", "show", args.old + ":klippy_extras/cura_connection.py"],
                cwd=REPO, capture_output=True, check=True).stdout)
        results = {"old": [], "new": []}
        # warm the byte code caches first
        run(OLD % (old_file,))
        run(NEW % (EXTRAS,))
        for _ in range(args.runs):
            results["old"].append(run(OLD % (old_file,)))
            results["new"].append(run(NEW % (EXTRAS,)))
        print("%-22s %10s %11s %6s %7s" % ("front boot (median)", "import ms",
                                           "max RSS", "files", "lines"))
        for name, label in (("old", "single file (%s)" % (args.old,)),
                            ("new", "package front")):
            rs = results[name]
            files = rs[0]["files"]
            lines = sum(len(open(f, "rb").read().splitlines()) for f in files
                        if os.path.exists(f))
            print("%-22s %10.1f %7.1f MiB %6d %7d" % (
                label[:22], statistics.median(r["ms"] for r in rs),
                statistics.median(r["rss_kib"] for r in rs) / 1024.,
                len(files), lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
