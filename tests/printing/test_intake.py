"""What a user sends is checked by its content and kept as sent: binary
G-code under a text G-code name is refused (415) in every form, an upload
that unpacks to more than the disk holds stops with SPACE_MARGIN still
free (507), and a job is shown by the name the user gave it, whichever
process (the front or Klippy's) receives the upload."""
import gzip
import os
import struct
import threading
import zlib

import pytest

import cura_client
import gcode_samples
import httpc
from httpc import upload, wait_for
from hostile import connect, read_reply
from disk import (TO_KLIPPY, fill, gcode_upload, leftovers, parts_in,
                  tmpfs_gcodes)

SPACE_MARGIN = 16 << 20     # the module's

PROCESSES = [{}, {"front_process": False}]
PROCESS_IDS = ["front", "klippy"]


def bgcode():
    """The start of a binary G-code file (libbgcode's layout): magic,
    version 1, CRC32 checksums, a file metadata block."""
    meta = b"Producer=PrusaSlicer 2.7.1\n"
    return (b"GCDE" + struct.pack("<IH", 1, 1)
            + struct.pack("<HHI", 0, 0, len(meta)) + struct.pack("<H", 0)
            + meta + struct.pack("<I", zlib.crc32(meta)) + os.urandom(4096))


def job_ids(base):
    return sorted(j["uuid"] for j in httpc.all_jobs(base))


def listing(k, folder):
    """The files below folder (the gcodes folder as k sees it), but for
    the module's state folder (a queue save may be under way)."""
    state = os.path.relpath(k.data_dir, k.gcodes_dir)
    return sorted((os.path.relpath(root, folder), sorted(files))
                  for root, dirs, files in os.walk(folder)
                  if not os.path.relpath(root, folder).startswith(state))


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_binary_gcode_is_refused_in_every_form(klippy_factory, options,
                                               cura, tmp_path):
    k = klippy_factory(module_options=dict(options))
    base = k.base_url()
    assert upload(base, "first.gcode", b"G1 X1\n").status == 200
    before, jobs = listing(k, k.gcodes_dir), job_ids(base)
    binary = bgcode()
    ufp = cura_client.make_ufp(str(tmp_path / "part.ufp"), binary,
                               thumbnail_png=gcode_samples.png())
    sent = [("part.gcode", binary), ("part.g", binary),
            ("part.gco", binary), ("part.gcode.gz", gzip.compress(binary)),
            ("part.ufp", ufp.read_bytes())]
    for name, data in sent:
        r = upload(base, name, data)
        assert r.status == 415, (name, r)
        message = r.json()["message"]
        assert "binary G-code" in message and "export the file as text " \
            "G-code" in message, message
    # other content that is no text G-code: NUL bytes, control bytes,
    # text that is not UTF-8 (Klipper would stop at it)
    for data in (b";FLAVOR:Marlin\nG28\n\x00\x00\x00\x00",
                 b"\x7fELF\x02\x01\x01" + bytes(64),
                 b";Nozzle 210\xb0C\nG28\n"):
        r = upload(base, "odd.gcode.gz", gzip.compress(data))
        assert r.status == 415, (data, r)
        assert "is not text G-code" in r.json()["message"], r
    # Cura's own client sending a UFP whose G-code is binary
    status, body = cura_client.upload("127.0.0.1:%d" % (k.cura_port(),),
                                      str(ufp), owner="alice")
    assert status == 415 and b"binary G-code" in body, body
    # nothing stored: no file, no partial file, no preview, no job
    assert listing(k, k.gcodes_dir) == before
    assert leftovers(k.gcodes_dir) == []
    assert job_ids(base) == jobs
    # text G-code with UTF-8 comments passes
    text = ";Würfel – 测试\n;TIME:60\nG1 X1\n".encode()
    assert upload(base, "text.gcode.gz", gzip.compress(text)).status == 200
    assert open(os.path.join(k.gcodes_dir, "text.gcode"), "rb").read() \
        == text


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_text_that_is_not_utf8_past_the_head_is_refused(klippy_factory,
                                                        options):
    # A file saved in a Windows code page (a hand-edited end G-code, a
    # slicer's settings block at the end): Klipper reads it as UTF-8 and
    # stops at the first byte it cannot decode, mid-print
    k = klippy_factory(module_options=dict(options))
    base = k.base_url()
    before, jobs = listing(k, k.gcodes_dir), job_ids(base)
    body = gcode_samples.moves(3000, 0).encode()
    assert len(body) > 64 << 10
    body += ";end: bed 60\xb0C\nG1 X1\n".encode("latin-1")
    for name, data in (("late.gcode", body),
                       ("late.gcode.gz", gzip.compress(body))):
        r = upload(base, name, data)
        assert r.status == 415, (name, r)
        assert "is not text G-code" in r.json()["message"], r
    assert listing(k, k.gcodes_dir) == before
    assert leftovers(k.gcodes_dir) == []
    assert job_ids(base) == jobs


class FreeSpace(threading.Thread):
    """Records the least free space of path's file system until stop()."""
    def __init__(self, path):
        threading.Thread.__init__(self, daemon=True)
        self.path = path
        self.least = None
        self.done = threading.Event()

    def free(self):
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def run(self):
        while not self.done.wait(0.0005):
            free = self.free()
            self.least = free if self.least is None else min(self.least,
                                                             free)

    def stop(self):
        self.done.set()
        self.join()
        return self.least


def gz_unpacking_to(size):
    """A .gcode.gz of text G-code that unpacks to size bytes."""
    line = b"G1 X10 Y10 E0.05 F3000\n"
    chunk = line * ((1 << 20) // len(line))
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [z.compress(b";TIME:60\n")]
    for i in range(size // len(chunk)):
        out.append(z.compress(chunk))
    return b"".join(out + [z.flush()])


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """A .gcode.gz unpacking to 300 MiB and a UFP (written as Cura writes
    one) whose G-code unpacks to 400 MiB."""
    cura_client.load()
    folder = tmp_path_factory.mktemp("bombs")
    gcode = gcode_samples.cura_gcode(count=10) + b"G1 X10 Y10 F3000\n" * (
        (400 << 20) // 17)
    ufp = cura_client.make_ufp(str(folder / "big.ufp"), gcode)
    del gcode
    return {"big.gcode.gz": gz_unpacking_to(300 << 20),
            "big.ufp": ufp.read_bytes()}


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_unpacking_stops_at_the_space_margin(klippy_factory, monkeypatch,
                                             options, bombs):
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 100,
                     module_options=dict(options))
    base = k.base_url()
    assert upload(base, "first.gcode", b";TIME:5\nG1 X1\n").status == 200
    before, jobs = listing(k, k.disk), job_ids(base)
    for name, data in bombs.items():
        assert len(data) < 4 << 20      # the reservation lets it in
        sampler = FreeSpace(k.disk)
        sampler.start()
        try:
            r = upload(base, name, data)
        finally:
            least = sampler.stop()
        assert r.status == 507, (name, r)
        assert "Disk full" in r.json()["message"], r
        assert least >= SPACE_MARGIN, (name, least)
        # nothing kept, and the space is back
        assert listing(k, k.disk) == before
        assert leftovers(k.disk, k.pid) == []
        assert job_ids(base) == jobs
        assert sampler.free() > 80 << 20
    # what fits is still taken
    r = upload(base, "fits.gcode.gz", gz_unpacking_to(40 << 20))
    assert r.status == 200, r
    assert k.info()["state"] == "ready"


def stored_png(side):
    """A real side x side RGB PNG kept in stored (level 0) deflate blocks:
    side * side * 3 bytes as a file, a few KiB zipped (Cura's UFPWriter
    deflates it)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data))
    rows = (b"\0" + bytes(side * 3)) * side
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0,
                                         0))
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_unpacked_preview_keeps_the_space_margin(klippy_factory, monkeypatch,
                                                 options, tmp_path):
    # 20 MiB free: a small UFP gets in (its size plus the 16 MiB margin),
    # but its thumbnail unpacks to 15 MiB (MAX_PREVIEW_SIZE is 16 MiB)
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 64,
                     module_options=dict(options))
    fill(k.disk, leave=20 << 20)
    thumbnail = stored_png(2240)
    assert 14 << 20 < len(thumbnail) < 16 << 20
    ufp = cura_client.make_ufp(str(tmp_path / "big_preview.ufp"),
                               gcode_samples.cura_gcode(count=10),
                               thumbnail_png=thumbnail)
    data = ufp.read_bytes()
    assert len(data) < 1 << 20
    sampler = FreeSpace(k.disk)
    sampler.start()
    try:
        r = upload(k.base_url(), "big_preview.ufp", data)
    finally:
        least = sampler.stop()
    assert r.status in (200, 507), r
    assert least >= SPACE_MARGIN, least
    assert leftovers(k.disk, k.pid) == []


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_unpacking_507_names_the_upload(klippy_factory, monkeypatch,
                                        options):
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 64,
                     module_options=dict(options))
    fill(k.disk, leave=24 << 20)
    r = upload(k.base_url(), "Würfel.gcode.gz", gz_unpacking_to(16 << 20))
    assert r.status == 507, r
    message = r.json()["message"]
    assert "Würfel.gcode.gz unpacks to more" in message, message


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_a_small_upload_that_fits_is_taken(klippy_factory, monkeypatch,
                                           options, tmp_path):
    # 20 MiB free: room for a Cura UFP of a few KiB and the 16 MiB margin
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 64,
                     module_options=dict(options))
    fill(k.disk, leave=20 << 20)
    ufp = cura_client.make_ufp(str(tmp_path / "small.ufp"),
                               gcode_samples.cura_gcode(count=10),
                               thumbnail_png=gcode_samples.png())
    assert len(ufp.read_bytes()) < 64 << 10
    r = upload(k.base_url(), "small.ufp", ufp.read_bytes())
    assert r.status == 200, r


def test_unpacking_in_the_front_counts_klippys_uploads(klippy_factory,
                                                     monkeypatch):
    # 48 MiB free, a 28 MiB upload in flight in Klippy's process: a
    # .gcode.gz to the front that unpacks to 24 MiB would fit alone
    # (24 + 16 MiB margin), but not beside it; the first one completes.
    k = tmpfs_gcodes(klippy_factory, monkeypatch, 64)
    port, disk = k.cura_port(), k.disk
    fill(disk, leave=48 << 20)
    first = gcode_upload(TO_KLIPPY, "first.gcode", 28)
    s = connect(port)
    s.sendall(first[:3 << 19])
    wait_for(lambda: parts_in(disk), 10, "first upload in flight")
    sampler = FreeSpace(disk)
    sampler.start()
    try:
        r = upload(k.base_url(), "zipped.gcode.gz", gz_unpacking_to(24 << 20))
        assert r.status == 507, r
        assert "Disk full" in r.json()["message"], r
        s.sendall(first[3 << 19:])
        r = read_reply(s)
        s.close()
    finally:
        least = sampler.stop()
    assert r.status == 200, r
    assert least >= SPACE_MARGIN, least
    assert [j["name"] for j in httpc.all_jobs(k.base_url())] == ["first"]
    assert leftovers(disk, k.pid) == []


# file name sent -> name shown
ODD_NAMES = {
    "Würfel – 测试 ✓.gcode": "Würfel – 测试 ✓",
    "red\x1b[31m\tbox\u202e\x07.gcode.gz": "red[31m box",
    "שלום עולם 👨\u200d👩\u200d👧.gcode": "שלום עולם 👨\u200d👩\u200d👧",
    "C:\\Users\\ana\\Ünïcødé name.g": "Ünïcødé name",
    "x" * 300 + ".gcode": "x" * 200,
    # differ only by what the safe file name drops
    "cube?.gcode": "cube?", "cube*.gcode": "cube*",
}


def console_lines(k, command):
    k.api.notifications.clear()
    k.gcode(command)
    return "\n".join(str((n.get("params") or {}).get("response"))
                     for n in k.api.notifications)


@pytest.mark.parametrize("options", PROCESSES, ids=PROCESS_IDS)
def test_jobs_show_the_name_the_user_gave(klippy_factory, options):
    k = klippy_factory(module_options=dict(options, max_queue=20))
    base = k.base_url()
    uuids = {}
    for sent, shown in ODD_NAMES.items():
        data = b";TIME:60\nG1 X1\n"
        if sent.endswith(".gz"):
            data = gzip.compress(data)
        r = upload(base, sent, data)
        assert r.status == 200, (sent, r)
        assert r.json()["name"] == shown
        uuids[r.json()["uuid"]] = shown
    files = sorted(n for n in os.listdir(k.gcodes_dir)
                   if n.endswith(".gcode"))
    assert len(files) == len(ODD_NAMES)     # one file each
    assert "cube_.gcode" in files and "cube_-1.gcode" in files
    assert all(n.isprintable() and " " not in n for n in files)

    def names():
        return {j["uuid"]: j["name"] for j in httpc.all_jobs(base)
                if j["uuid"] in uuids}
    assert names() == uuids
    k.api.call("gcode/subscribe_output", {"response_template": {}})
    queue = console_lines(k, "CURA_QUEUE")
    for shown in ODD_NAMES.values():
        assert shown in queue, shown
    # saved and read back unchanged
    k.restart()
    base = k.base_url()
    wait_for(lambda: names() == uuids, 20, "names after the restart")


def test_klipper_prints_show_a_clean_name(klippy):
    # Started from Mainsail or a macro: shown as the user's uploads are
    base = klippy.base_url()
    sent = "red\x1b[31m\tbox\u202e.gcode"
    with open(os.path.join(klippy.gcodes_dir, sent), "w") as f:
        f.write(gcode_samples.moves(100, 10, 0.2))     # ~2 s
    klippy.gcode('SDCARD_PRINT_FILE FILENAME="%s"' % (sent,))
    job = wait_for(lambda: [j for j in httpc.all_jobs(base)
                            if j["source"] == "klipper"], what="the print")[0]
    assert job["name"] == "red[31m box"


def test_cura_shows_the_job_name_it_sent(cura, klippy, tmp_path):
    # Cura names the file after the job name, keeping letters of any
    # script, digits, spaces and -._() (cura-protocol.md 4.1)
    addr = "127.0.0.1:%d" % (klippy.cura_port(),)
    path = tmp_path / "job.ufp"
    cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
        print_time=600, count=2000, sleep_every=10, sleep_s=0.1))
    sent = ["Würfel - 测试 (2).ufp", "UMS3_Ünïcødé part.ufp",
            "Würfel - 测试 (2).ufp"]
    for name in sent:
        status, body = cura_client.upload(addr, str(path), file_name=name)
        assert status == 200, body
    api = cura_client.ClusterApi(addr)
    shown = sorted(j.name for j in api.print_jobs())
    assert shown == sorted(n[:-len(".ufp")] for n in sent)
    view = cura_client.MonitorView()
    state = view.poll(api)
    names = [q["name"] for q in state["queue"]]
    active = state["printers"][0]["active_job"]
    names += [active["name"]] if active else []
    assert sorted(names) == shown
