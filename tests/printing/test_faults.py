"""Faults: kill -9 of Klippy mid-upload and mid-print, a full disk (a tiny
tmpfs in Klippy's own mount namespace), and many RESTARTs and
FIRMWARE_RESTARTs in a row under a Cura-like poller."""
import gzip
import http.client
import json
import os
import threading
import time

import pytest

import gcode_samples
import httpc
from httpc import JOBS, upload
from hostile import (connect, free_port, is_json_error, read_reply,
                     request_bytes, send, socket_count, thread_count, wait_for)
from disk import (TO_KLIPPY, fill, gcode_upload, leftovers, parts_in,
                  start_with_mounts, tmpfs_gcodes)



def upload_bytes(filename, data):
    body, headers = httpc.multipart({"owner": "x"},
                                    {"file": (filename, data)})
    return request_bytes("POST", JOBS + "/", headers, body)


def by_name(base):
    return {j["name"]: j for j in httpc.get_json(base, JOBS)}


def test_kill9_mid_upload_and_mid_print(klippy_factory):
    k = klippy_factory()
    base, port = k.base_url(), k.cura_port()
    long_print = gcode_samples.moves(3000, 10, 0.1).encode()
    assert upload(base, "long.gcode", long_print).status == 200
    assert upload(base, "next.gcode", b"G1 X1\n", owner="bob").status == 200
    wait_for(lambda: by_name(base)["long"]["status"] == "printing", 20,
             "long printing")
    # an upload is half sent when Klippy dies
    data = upload_bytes("cut.gcode", b"G1 X1 Y1\n" * 400000)
    s = connect(port)
    s.sendall(data[:len(data) // 2])
    wait_for(lambda: [n for n in os.listdir(k.gcodes_dir)
                      if n.endswith(".part")], 10, "partial upload")
    k.kill9()
    s.close()
    k.start()
    k.wait_ready()
    base = k.base_url()
    jobs = by_name(base)
    assert set(jobs) == {"long", "next"}
    # the interrupted print is reported, never silently restarted
    assert jobs["long"]["status"] == "failed_wait_cleanup"
    assert "restart" in jobs["long"]["message"]
    assert jobs["next"]["status"] == "queued"
    assert jobs["next"]["owner"] == "bob"
    assert k.query("print_stats")["print_stats"]["state"] == "standby"
    # no partial file, visible or hidden
    assert sorted(os.listdir(k.gcodes_dir)) == ["long.gcode", "next.gcode"]
    assert leftovers(k.gcodes_dir, k.pid) == []
    assert "removed partial file .cura-upload-" in k.log_text()
    # and it goes on: the queue starts once the plate is clear
    k.gcode("CURA_BUILD_PLATE_CLEARED")
    wait_for(lambda: by_name(base)["next"]["status"] in (
        "printing", "wait_cleanup"), 20, "next started")
    assert upload(base, "after.gcode", b"G1 X1\n").status == 200


TMPFS_MIB = 32


@pytest.fixture
def small_disk(klippy_factory, monkeypatch):
    """A Klippy whose gcodes folder, its state folder in it, is a 32 MiB
    tmpfs."""
    return tmpfs_gcodes(klippy_factory, monkeypatch, TMPFS_MIB,
                        state_inside=True)


def test_disk_full(small_disk):
    k = small_disk
    base, port = k.base_url(), k.cura_port()
    disk = k.disk
    assert upload(base, "first.gcode", b";TIME:5\nG1 X1\n").status == 200
    before = by_name(base)
    # 1. a .gcode.gz that unpacks to more than the disk holds
    bomb = gzip.compress(b"G1 X1 Y1\n" * (8 << 20), 9)      # 72 MiB
    r = upload(base, "bomb.gcode.gz", bomb)
    assert is_json_error(r, 507), r
    assert "Disk full" in r.json()["message"]
    assert by_name(base).keys() == before.keys()
    assert sorted(os.listdir(disk)) == [".cura_connection", "first.gcode"]
    # 2. the disk fills up while an upload streams in
    data = upload_bytes("streamed.gcode", b"G1 X2 Y2\n" * (1 << 20))  # 9 MiB
    s = connect(port)
    s.sendall(data[:len(data) // 3])
    # (once its free space was checked: the partial file is there)
    wait_for(lambda: parts_in(disk), 10, "the upload's partial file")
    filler = fill(disk)
    try:
        s.sendall(data[len(data) // 3:])
    except (BrokenPipeError, ConnectionResetError):
        pass
    r = read_reply(s)
    s.close()
    assert is_json_error(r, 507) and "Disk full" in r.json()["message"], r
    assert leftovers(disk, k.pid) == []
    assert not os.path.exists(os.path.join(disk, "streamed.gcode"))
    # 3. a full disk is seen before the body is read
    r = upload(base, "later.gcode", b"G1 X1\n" * 1000)
    assert is_json_error(r, 507) and "free" in r.json()["message"], r
    # 4. saving the queue fails: a clear error, the old file stays whole
    uuid = before["first"]["uuid"]
    queue_json = os.path.join(disk, ".cura_connection", "queue.json")
    with open(queue_json) as f:
        saved = f.read()
    fill(disk)
    r = httpc.request(base, "PUT", JOBS + "/" + uuid,
                      json_body={"force": True})
    assert is_json_error(r, 507) and "Disk full" in r.json()["message"], r
    with open(queue_json) as f:
        assert f.read() == saved
    assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["status"]
    assert k.info()["state"] == "ready"
    # space again: the change is saved after all, uploads work
    os.unlink(filler)
    wait_for(lambda: '"force": true' in open(queue_json).read(), 10,
             "queue saved")
    r = upload(base, "again.gcode", b"G1 X1\n" * 1000)
    assert r.status == 200, r
    assert set(by_name(base)) == {"first", "again"}
    assert leftovers(disk, k.pid) == []
    with open(queue_json) as f:
        json.load(f)
    log = k.log_text()
    assert "Internal error" not in log and "request from" not in log


@pytest.mark.parametrize("first_path, second_path", [
    (JOBS + "/", JOBS + "/"), (JOBS + "/", TO_KLIPPY),
    (TO_KLIPPY, JOBS + "/")])
def test_uploads_in_flight_reserve_space(klippy_factory, monkeypatch,
                                         first_path, second_path):
    # Each alone fits (28 MiB + 16 MiB margin <= 48 MiB free); two at once
    # would fill the disk: the second is refused before writing, whichever
    # process receives each (one reservation for the module).
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 64)
    base, port, disk = k.base_url(), k.cura_port(), k.disk
    fill(disk, leave=48 << 20)
    first = gcode_upload(first_path, "first.gcode", 28)
    second = gcode_upload(second_path, "second.gcode", 28)
    s = connect(port)
    s.sendall(first[:3 << 19])
    wait_for(lambda: parts_in(disk), 10, "first upload in flight")
    r = send(port, second)
    assert is_json_error(r, 507), r
    assert "in progress" in r.json()["message"], r
    assert len(parts_in(disk)) == 1
    s.sendall(first[3 << 19:])
    r = read_reply(s)
    s.close()
    assert r.status == 200, r
    assert set(by_name(base)) == {"first"}
    assert leftovers(disk, k.pid) == []
    assert os.path.getsize(os.path.join(disk, "first.gcode")) > 27 << 20
    assert "Disk full" not in k.log_text()
    # the reservations are released: 1 MiB fits in the 20 MiB left
    r = send(port, gcode_upload(second_path, "small.gcode", 1))
    assert r.status == 200, r
    # (the uploads to TO_KLIPPY were received in Klippy's process)
    here = k.query("cura_connection")["cura_connection"]["answered_here"]
    assert here.get("post_print_job", 0) == [
        first_path, second_path, second_path].count(TO_KLIPPY)



@pytest.mark.parametrize("first_path, second_path", [
    (JOBS + "/", JOBS + "/"), (JOBS + "/", TO_KLIPPY)])
def test_a_written_upload_holds_only_what_it_still_needs(
        klippy_factory, monkeypatch, first_path, second_path):
    # 48 MiB free.  The first upload (24 MiB) has written all but its
    # last MiB or two; the second (6 MiB) fits beside it with the 16 MiB
    # margin (24 + 6 + 16 <= 48): 200 whichever process receives each,
    # as without the front.
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 64)
    base, port, disk = k.base_url(), k.cura_port(), k.disk
    fill(disk, leave=48 << 20)
    first = gcode_upload(first_path, "first.gcode", 24)
    second = gcode_upload(second_path, "second.gcode", 6)
    s = connect(port)
    s.sendall(first[:-1000])
    wait_for(lambda: [n for n in parts_in(disk) if os.path.getsize(
        os.path.join(disk, n)) > 22 << 20], 20,
        "the first upload written but its end")
    r = send(port, second)
    assert r is not None and r.status == 200, r
    s.sendall(first[-1000:])
    r = read_reply(s)
    s.close()
    assert r.status == 200, r
    assert set(by_name(base)) == {"first", "second"}
    assert leftovers(disk, k.pid) == []


def test_gcodes_folder_gone(klippy_factory):
    # Mainsail renamed it, or the USB stick is gone: statvfs fails
    k = klippy_factory(start=False)
    k.module_options["data_path"] = os.path.join(k.workdir, "data")
    k.start()
    k.wait_ready()
    base = k.base_url()
    moved = k.gcodes_dir + "-renamed"
    os.rename(k.gcodes_dir, moved)
    r = upload(base, "lost.gcode", b";TIME:5\nG1 X1\n")
    assert is_json_error(r, 500), r
    assert k.gcodes_dir in r.json()["message"]
    assert "No such file" in r.json()["message"]
    assert httpc.get_json(base, JOBS) == []
    assert os.listdir(moved) == []
    # back again: uploads work
    os.rename(moved, k.gcodes_dir)
    assert upload(base, "found.gcode", b";TIME:5\nG1 X1\n").status == 200
    assert [j["name"] for j in httpc.get_json(base, JOBS)] == ["found"]
    assert "Traceback" not in k.log_text()


def test_thumbs_is_a_file(klippy_factory):
    # a failed thumbnail only means no preview
    k = klippy_factory()
    base = k.base_url()
    with open(os.path.join(k.gcodes_dir, ".thumbs"), "w") as f:
        f.write("not a folder")
    data = (";TIME:5\n" + gcode_samples.embedded_thumbnail(
        gcode_samples.png(16, 16)) + "G1 X1\n").encode()
    r = upload(base, "thumb.gcode", data)
    assert r.status == 200, r
    job = by_name(base)["thumb"]
    r = httpc.request(base, "GET", JOBS + "/%s/preview_image" % job["uuid"])
    assert is_json_error(r, 404), r
    with open(os.path.join(k.gcodes_dir, "thumb.gcode"), "rb") as f:
        assert f.read() == data
    assert "no preview for thumb.gcode" in k.log_text()
    assert "Traceback" not in k.log_text()


def test_data_path_read_only(klippy_factory, monkeypatch):
    # The queue cannot be saved: the upload fails whole, with a reply;
    # no job in memory, no file on disk.
    k = klippy_factory(start=False)
    data_dir = os.path.join(k.workdir, "data")
    os.makedirs(data_dir)
    k.module_options["data_path"] = data_dir
    start_with_mounts(k, monkeypatch, 'mount --bind "$0/data" "$0/data" '
                      '&& mount -o remount,ro,bind "$0/data" "$0/data"')
    base = k.base_url()
    data = (";TIME:5\n" + gcode_samples.embedded_thumbnail(
        gcode_samples.png(16, 16)) + "G1 X1\n").encode()
    r = upload(base, "ro.gcode", data)
    assert is_json_error(r, 500), r
    message = r.json()["message"]
    assert os.path.join(data_dir, "queue.json") in message
    assert "Read-only file system" in message
    assert httpc.get_json(base, JOBS) == []
    assert sorted(os.listdir(k.gcodes_dir)) in ([], [".thumbs"])
    assert leftovers(k.gcodes_dir) == []
    if os.path.isdir(os.path.join(k.gcodes_dir, ".thumbs")):
        assert os.listdir(os.path.join(k.gcodes_dir, ".thumbs")) == []
    # nothing starts, nothing is sent again by a confused Cura: the printer
    # stays idle, and every other request is answered too
    assert httpc.printer(base)["status"] == "idle"
    r = httpc.request(base, "GET", "/cluster-api/v1/materials")
    assert r.status == 200 or is_json_error(r, 500), r
    assert k.info()["state"] == "ready"
    assert "Traceback" not in k.log_text()


class Poller:
    """Cura's polling (every endpoint, keep-alive), fast, in a thread;
    reconnects after errors.  Counts replies by kind."""
    PATHS = ["/api/v1/system", "/cluster-api/v1/printers", JOBS,
             "/cluster-api/v1/materials"]

    def __init__(self, port, interval=0.05):
        self.port = port
        self.interval = interval
        self.ok = 0
        self.refused = 0          # connection refused/reset, 503
        self.bad = []             # anything else: a bug
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        conn = None
        while not self.stop.is_set():
            for path in self.PATHS:
                try:
                    if conn is None:
                        conn = http.client.HTTPConnection(
                            "127.0.0.1", self.port, timeout=10)
                    conn.request("GET", path)
                    r = conn.getresponse()
                    body = r.read()
                    if r.status == 503:
                        self.refused += 1
                        conn.close()
                        conn = None
                        continue
                    if r.status != 200:
                        self.bad.append((path, r.status, body[:200]))
                        continue
                    json.loads(body)
                    self.ok += 1
                except (OSError, http.client.HTTPException):
                    self.refused += 1
                    if conn is not None:
                        conn.close()
                    conn = None
                    time.sleep(0.02)
                except ValueError as e:
                    self.bad.append((path, "not JSON", str(e)))
            time.sleep(self.interval)
        if conn is not None:
            conn.close()

    def close(self):
        self.stop.set()
        self.thread.join(15)


@pytest.mark.slow
@pytest.mark.one_flavor   # first flavor only (70 restarts take ~1.5 min)
def test_many_restarts_under_polling(klippy_factory, flavor):
    # One flavor is enough: each restart takes ~1.3 s, the module's code
    # path is the same, and test_foundation restarts both flavors 10 times.
    port = free_port()
    k = klippy_factory(module_options={"port": port})
    base = "http://127.0.0.1:%d" % (port,)
    poller = Poller(port)
    try:
        counts = None
        times = []
        for i, firmware in enumerate([False] * 50 + [True] * 20):
            seen = poller.ok
            k.restart(firmware=firmware)
            times.append(k.restart_seconds)
            # released and bound again, and the poller gets answers
            assert k.cura_port() == port
            assert httpc.get_json(base, "/cluster-api/v1/printers")[0][
                "status"] == "idle"
            wait_for(lambda: poller.ok > seen + 4, 10, "poller answered")
            assert poller.bad == []
            if i == 1:
                time.sleep(0.5)
                counts = (thread_count(k.pid), socket_count(k.pid))
    finally:
        poller.close()
    assert poller.bad == []
    # Klippy itself leaks a pipe pair per restart (its serial queue), so
    # count sockets; the poller's connection may come and go (+1).
    wait_for(lambda: thread_count(k.pid) <= counts[0], 10, "threads to end")
    wait_for(lambda: socket_count(k.pid) <= counts[1], 5, "sockets to close")
    log = k.log_text()
    assert log.count("cura_connection: released port %d" % (port,)) == 70
    assert "Address already in use" not in log
    print("70 restarts: %.2f s each on average (max %.2f s); poller: %d "
          "answers, %d refused during restarts; %d threads, %d sockets"
          % (sum(times) / len(times), max(times), poller.ok, poller.refused,
             thread_count(k.pid), socket_count(k.pid)))
