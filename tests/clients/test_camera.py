"""The camera proxy: Cura opens http://<printer>:8080/?action=stream, the
module relays the real camera (here a small MJPEG source on loopback, shaped
like ustreamer/mjpg-streamer) and Cura's own NetworkMJPGImage shows it."""
import json
import os
import socket
import subprocess
import sys

import pytest

import httpc
from httpc import wait_for
from mjpeg_source import BOUNDARY, COLORS, MjpegSource, StreamReader

SUPPORT_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "support")


@pytest.fixture
def source():
    s = MjpegSource()
    yield s
    s.close()


def test_stream_and_snapshot_through_the_module(klippy_factory, source):
    k = klippy_factory(module_options={"camera_url": source.url()})
    base = k.base_url()
    # the snapshot URL is derived from the stream URL
    r = httpc.request(base, "GET", "/?action=snapshot")
    assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.body == source.frames[0]
    # the page's alias, under a path nginx already sends to the module
    assert httpc.request(base, "GET", "/printers/camera?action=snapshot"
                         ).body == source.frames[0]

    viewer = StreamReader(base)
    assert viewer.resp.status == 200
    assert viewer.resp.getheader("Content-Type") \
        == "multipart/x-mixed-replace;boundary=" + BOUNDARY
    assert viewer.resp.getheader("Content-Length") is None
    assert [viewer.frame() for _ in range(4)] == \
        source.frames + source.frames[:1]
    # relayed as it comes, never collected: with the camera holding its
    # second frame back, a new viewer still gets the first
    source.gate.clear()
    late = StreamReader(base)
    assert late.frame() == source.frames[0]
    source.gate.set()
    assert late.frame() == source.frames[1]
    # many viewers at once, each with its own camera connection
    more = [StreamReader(base) for _ in range(3)]
    for v in more:
        assert v.frame() == source.frames[0]
    assert source.open_streams == 5
    # a viewer that leaves frees its camera connection
    for v in [viewer, late] + more:
        v.close()
    wait_for(lambda: source.open_streams == 0, what="camera connections "
             "to close")
    # and the server goes on answering
    assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["camera"]
    # a restart with a viewer attached ends that stream, not Klippy
    viewer = StreamReader(base)
    viewer.frame()
    k.restart()
    wait_for(lambda: source.open_streams == 0, what="stream to end on "
             "restart")
    viewer.close()
    assert httpc.request(k.base_url(), "GET", "/?action=snapshot").status \
        == 200


def test_cura_camera_widget_shows_the_stream(klippy_factory, source):
    k = klippy_factory(module_options={"camera_url": source.url()})
    # what Cura opens: http://<ip_address>:8080/?action=stream, here with
    # the test's port
    url = k.base_url() + "/?action=stream"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    out = subprocess.run(
        [sys.executable, os.path.join(SUPPORT_DIR, "cura_mjpeg_view.py"),
         url, "6", "20"], capture_output=True, text=True, timeout=60,
        cwd=SUPPORT_DIR, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    frames = json.loads(out.stdout.strip().splitlines()[-1])["frames"]
    assert len(frames) >= 6, (frames, out.stderr[-2000:])
    assert all((w, h) == (64, 48) for w, h, _ in frames)
    # the colours cycle as the camera sends them (JPEG is lossy)
    def nearest(rgb):
        return min(range(len(COLORS)), key=lambda i: sum(
            (a - b) ** 2 for a, b in zip(rgb, COLORS[i])))
    assert len(set(nearest(rgb) for _, _, rgb in frames)) == 3
    wait_for(lambda: source.open_streams == 0, what="Cura's stream to end")


def test_camera_errors(klippy_factory):
    k = klippy_factory()
    base = k.base_url()
    for path in ("/?action=stream", "/?action=snapshot", "/"):
        r = httpc.request(base, "GET", path)
        assert r.status == 404, (path, r)
        assert r.headers["Content-Type"] == "application/json"
        assert r.json()["message"]
    assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["camera"] \
        is False
    k.stop()
    # a camera that is down: 502 with a message, quickly
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    k = klippy_factory(module_options={
        "camera_url": "http://127.0.0.1:%d/?action=stream" % (dead,)})
    for path in ("/?action=stream", "/?action=snapshot"):
        r = httpc.request(k.base_url(), "GET", path)
        assert r.status == 502 and "camera" in r.json()["message"], r
    # a stream URL without action=stream needs its snapshot URL spelled out
    k.stop()
    k = klippy_factory(module_options={
        "camera_url": "http://127.0.0.1:%d/stream" % (dead,)})
    r = httpc.request(k.base_url(), "GET", "/?action=snapshot")
    assert r.status == 404 and "camera_snapshot_url" in r.json()["message"]
    k.stop()
    k = klippy_factory(module_options={"camera_url": "rtsp://cam/live"},
                       wait=False)
    assert "camera" in k.wait_state("error")["state_message"]
