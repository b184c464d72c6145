"""Load: 20 Cura-like pollers (every endpoint every 2 s, keep-alive), an
upload after another, a print running and, when the camera proxy is
configured, a camera viewer -- for CURA_LOAD_SECONDS (default 45 s, at
most 60 s in CI), on one Klippy flavor.  No error, Klippy stays ready."""
import http.client
import json
import os
import random
import threading
import time

import pytest

import gcode_samples
import httpc
from hostile import wait_for

JOBS = "/cluster-api/v1/print_jobs"
POLLERS = 20
INTERVAL = 2.
SECONDS = float(os.environ.get("CURA_LOAD_SECONDS", "45"))


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.count = 0
        self.errors = []
        self.latencies = []

    def add(self, latency, error=None):
        with self.lock:
            self.count += 1
            self.latencies.append(latency)
            if error is not None:
                self.errors.append(error)


def poller(port, stats, stop):
    # What Cura does every 2 s: printers, print jobs, previews of jobs,
    # (and system/materials as on connect), on one keep-alive connection.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    time.sleep(random.random() * INTERVAL)
    previews = set()
    while not stop.is_set():
        t_cycle = time.monotonic()
        paths = ["/api/v1/system", "/cluster-api/v1/printers", JOBS,
                 "/cluster-api/v1/materials"]
        for path in paths + ["%s/%s/preview_image" % (JOBS, u)
                             for u in list(previews)[:5]]:
            t0 = time.monotonic()
            try:
                conn.request("GET", path,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                body = r.read()
                error = None
                if path.endswith("preview_image"):
                    if r.status not in (200, 404):
                        error = (path, r.status)
                elif r.status != 200:
                    error = (path, r.status, body[:200])
                else:
                    data = json.loads(body)
                    if path == JOBS:
                        previews = {j["uuid"] for j in data}
            except (OSError, http.client.HTTPException, ValueError) as e:
                error = (path, repr(e))
                conn.close()
            stats.add(time.monotonic() - t0, error)
        stop.wait(max(0., INTERVAL - (time.monotonic() - t_cycle)))
    conn.close()


def uploader(base, stats, stop, data):
    n = 0
    while not stop.is_set():
        n += 1
        body, headers = httpc.multipart({"owner": "load"}, {
            "file": ("load%d.gcode" % (n,), data)})
        t0 = time.monotonic()
        try:
            r = httpc.request(base, "POST", JOBS + "/", body=body,
                              headers=headers)
            error = None if r.status == 200 else ("upload", r.status, r.body)
        except (OSError, http.client.HTTPException) as e:
            error = ("upload", repr(e))
        stats.add(time.monotonic() - t0, error)
        # keep the queue short: delete what was queued
        if error is None:
            httpc.request(base, "DELETE", JOBS + "/" + r.json()["uuid"])
        stop.wait(0.5)


def viewer(base, stats, stop):
    from mjpeg_source import StreamReader
    frames = 0
    reader = StreamReader(base)
    try:
        while not stop.is_set():
            frame = reader.frame()
            if not frame.startswith(b"\xff\xd8"):
                stats.errors.append(("camera", frame[:20]))
            frames += 1
    except (OSError, http.client.HTTPException, AssertionError) as e:
        if not stop.is_set():
            stats.errors.append(("camera", repr(e)))
    finally:
        reader.close()
        stats.frames = frames


def camera_source():
    try:
        import mjpeg_source
        return mjpeg_source.MjpegSource(interval=0.1)
    except Exception:
        return None     # no camera proxy tests here (no PyQt5)


@pytest.mark.slow
@pytest.mark.one_flavor   # long-running: the first flavor is enough
def test_twenty_pollers_an_upload_and_a_print(klippy_factory, flavor):
    assert SECONDS <= 60 or os.environ.get("CURA_LOAD_SECONDS")
    source = camera_source()
    options = {}
    if source is not None:
        options["camera_url"] = source.url()
    k = klippy_factory(module_options=options)
    base, port = k.base_url(), k.cura_port()
    # a print runs throughout
    long_print = gcode_samples.moves(int(SECONDS * 100) + 2000, 10, 0.1)
    body, headers = httpc.multipart({}, {"file": ("long.gcode",
                                                  long_print.encode())})
    assert httpc.request(base, "POST", JOBS + "/", body=body,
                         headers=headers).status == 200
    wait_for(lambda: httpc.get_json(base, JOBS)[0]["status"] == "printing",
             20, "printing")
    k.gcode("TEST_LATENESS_RESET")
    polls, uploads, camera = Stats(), Stats(), Stats()
    stop = threading.Event()
    data = (gcode_samples.griffin_header() + gcode_samples.moves(
        60000, 0)).encode()                                  # ~2 MB
    threads = [threading.Thread(target=poller, args=(port, polls, stop))
               for _ in range(POLLERS)]
    threads.append(threading.Thread(target=uploader,
                                    args=(base, uploads, stop, data)))
    if source is not None:
        threads.append(threading.Thread(target=viewer,
                                        args=(base, camera, stop)))
    for t in threads:
        t.daemon = True
        t.start()
    states = []
    t_end = time.monotonic() + SECONDS
    while time.monotonic() < t_end:
        states.append(k.info()["state"])
        time.sleep(1.)
    stop.set()
    for t in threads:
        t.join(30)
    if source is not None:
        source.close()
    lat = sorted(polls.latencies)
    tools = k.query("cura_test_tools")["cura_test_tools"]
    print("\n%d s: %d polls (p50 %.1f ms, p99 %.1f ms, max %.0f ms), "
          "%d uploads of %.1f MB (max %.2f s), %s camera frames; reactor "
          "lateness max %.1f ms avg %.2f ms" % (
              SECONDS, polls.count, lat[len(lat) // 2] * 1000,
              lat[int(len(lat) * 0.99)] * 1000, lat[-1] * 1000,
              uploads.count, len(data) / 1e6, max(uploads.latencies),
              getattr(camera, "frames", "no"), tools["lateness_max_ms"],
              tools["lateness_avg_ms"]))
    assert polls.errors == [] and uploads.errors == [] \
        and camera.errors == []
    assert set(states) == {"ready"}
    assert k.info()["state"] == "ready"
    # each poller kept its 2 s rhythm (4+ requests per cycle)
    assert polls.count >= POLLERS * 4 * (SECONDS / INTERVAL) * 0.8
    assert uploads.count >= SECONDS / 10
    assert lat[-1] < INTERVAL, "a poll took %.2f s" % (lat[-1],)
    assert httpc.get_json(base, JOBS)[0]["status"] == "printing"
    if source is not None:
        assert camera.frames >= SECONDS * 5
