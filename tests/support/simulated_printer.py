#!/usr/bin/env python3
"""A simulated Klipper printer with cura_connection, for trying Cura by hand.

Starts the real Klippy (from the test venvs, see tests/setup_env.sh) in
file-output mode with the module loaded, in a persistent work directory so
uploaded files and the queue survive, and runs until Ctrl-C.  Moves take
--move-delay seconds each (a cooperative sleep in cura_test_tools), so a
print lasts long enough to watch in Cura's Monitor tab.

    ./tests/simulate.sh [--port 8080] [--address 127.0.0.1] [--zeroconf]
                        [--flavor klipper] [--move-delay 0.01] [--reset]
"""
import argparse
import os
import shutil
import signal
import sys
import time

import klippy_harness

DEFAULT_WORKDIR = os.path.join(klippy_harness.REPO_DIR, ".cache",
                               "simulated-printer")


def parse_args():
    ap = argparse.ArgumentParser(
        description="Run a simulated Klipper printer that Cura can print to")
    ap.add_argument("--port", type=int, default=8080,
                    help="HTTP port of cura_connection (default 8080)")
    ap.add_argument("--address", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--zeroconf", action="store_true",
                    help="announce the printer with zeroconf (multicast on "
                    "the network of --address)")
    ap.add_argument("--flavor", default="klipper",
                    choices=sorted(klippy_harness.FLAVORS),
                    help="Klippy to run (default klipper)")
    ap.add_argument("--name", default="klipper-sim",
                    help="printer name shown in Cura (default klipper-sim)")
    ap.add_argument("--extruders", type=int, default=2, choices=(1, 2),
                    help="extruders (default 2, like the Ultimaker S3 that "
                    "Cura creates)")
    ap.add_argument("--move-delay", type=float, default=0.01,
                    help="seconds each G0/G1 takes (default 0.01; 0: prints "
                    "finish at once)")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR,
                    help="where config, log, uploads and queue are kept")
    ap.add_argument("--reset", action="store_true",
                    help="delete the work directory first (uploads, queue)")
    return ap.parse_args()


def print_help(k, args):
    url = "http://%s:%d" % (args.address, k.cura_port())
    print("""
Simulated Klipper printer "%s" (%s flavor) is ready.
  Cura API:       %s/api/v1/system
  Work directory: %s
  Klippy log:     %s
  G-code console: python3 tests/support/kapi.py %s gcode/script \\
                    '{"script": "CURA_BUILD_PLATE_CLEARED"}'

Add it in Cura (Preferences > Printers > Add):""" % (
        args.name, args.flavor, url, k.workdir, k.log_path, k.sock_path))
    if k.cura_port() == 80:
        print("  Add printer by IP address: %s" % (args.address,))
    else:
        print("""  Cura's "Add printer by IP address" only talks to port 80
  (--port 80 needs root).  For port %d: quit Cura, add the line
      manual_instances = %s:%d
  to the [um3networkprinting] section of cura.cfg (Linux:
  ~/.config/cura/<version>/cura.cfg), then start Cura again."""
              % (k.cura_port(), args.address, k.cura_port()))
    if args.zeroconf:
        print("  Zeroconf: it also appears under Networked printers.")
    print("""
A finished print waits for CURA_BUILD_PLATE_CLEARED before the next job
starts.  Press Ctrl-C to stop.
""")


def watch(k):
    # Report print state changes until Klippy dies or Ctrl-C
    last = None
    while True:
        st = k.query("print_stats")["print_stats"]
        now = (st["state"], st["filename"])
        if now != last:
            print("%s  print_stats: %s %s" % (
                time.strftime("%H:%M:%S"), st["state"], st["filename"]),
                flush=True)
            last = now
        time.sleep(1.)


def main():
    args = parse_args()
    # line by line also into a pipe or log file
    sys.stdout.reconfigure(line_buffering=True)
    if args.reset and os.path.isdir(args.workdir):
        shutil.rmtree(args.workdir)
    klippy_harness.install_module(args.flavor)
    k = klippy_harness.Klippy(
        args.flavor, args.workdir, extruders=args.extruders,
        module_options={"port": args.port, "address": args.address,
                        "zeroconf": args.zeroconf, "name": args.name},
        tools_options={"sim_move_delay": args.move_delay})
    # Ctrl-C (even if started with SIGINT ignored, e.g. "&" in a script)
    # and SIGTERM both end in the clean stop below
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    print("Starting Klippy (%s) in %s ..." % (args.flavor, args.workdir))
    k.start()
    try:
        k.wait_ready()
        print_help(k, args)
        watch(k)
    except KeyboardInterrupt:
        print("\nstopping Klippy ...")
    except klippy_harness.KlippyNotReady as e:
        print("Klippy did not get ready:\n%s" % (e,), file=sys.stderr)
        return 1
    except (RuntimeError, OSError) as e:
        print("Klippy stopped working:\n%s" % (e,), file=sys.stderr)
        return 1
    finally:
        # TEST_EXIT first, so the module closes its server and saves state
        k.stop(clean=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
