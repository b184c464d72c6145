"""A group member's Moonraker client (members.py) against a real idle
Klippy + Moonraker 0.11.0 on loopback: poll() round trips and upload
throughput.  Standalone, about 40 s:

    .venv/test/bin/python benchmarks/member_bench.py [klipper|kalico]
"""
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "support"))
sys.path.insert(0, os.path.join(REPO, "klippy_extras"))

import klippy_harness  # noqa: E402
import moonraker_member  # noqa: E402
from _cura_connection.members import MoonrakerMember  # noqa: E402

POLLS = 50
UPLOAD_MB = 50


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(flavor="klipper"):
    klippy_harness.install_module(flavor)
    with tempfile.TemporaryDirectory() as tmp:
        member = moonraker_member.start_member(os.path.join(tmp, "voron"),
                                               flavor)
        client = MoonrakerMember("voron", member.url)
        try:
            client.poll()                        # connection, objects list
            # back to back: each query waits for Klippy's next status tick
            rows = [("back to back", [timed(client.poll)
                                      for _ in range(POLLS)])]
            spaced = []
            for i in range(POLLS):
                time.sleep(0.1 + 0.013 * i % 0.25)   # off Klippy's tick
                spaced.append(timed(client.poll))
            rows.append(("spaced (as a poll loop)", spaced))
            for what, times in rows:
                print("poll %-24s median %.1f ms  min %.1f  max %.1f (n=%d)"
                      % (what, 1000 * statistics.median(times),
                         1000 * min(times), 1000 * max(times), len(times)))
            src = os.path.join(tmp, "big.gcode")
            with open(src, "wb") as f:
                for _ in range(UPLOAD_MB):
                    f.write(os.urandom(1 << 20))
            for n in range(3):
                secs = timed(lambda: client.upload(src, "big%d.gcode" % n))
                print("upload %d MB: %.2f s, %.0f MB/s (checksum pass "
                      "included)" % (UPLOAD_MB, secs, UPLOAD_MB / secs))
        finally:
            client.close()
            member.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
