"""Logic of cura_connection.py on its own, with small fakes in place of
Klippy: names, G-code metadata, time estimates, the job store's state
machine, material files.  The real Klippy runs in the other test files."""
import base64
import json
import os
import re
import threading

import pytest

from _cura_connection.api import CuraApi, ReplyCache  # noqa: E402
from _cura_connection.bridge import NoCall, ReactorCall  # noqa: E402
from fakes import FakeKlipper  # noqa: E402
from _cura_connection.errors import BadInput, Conflict, NoSpace, NotFound, TooLarge, Unsupported  # noqa: E402
from _cura_connection.frames import FRAME, FrameReader, HEAD_END, send_frame  # noqa: E402
from _cura_connection.front import FrontRequest, UPLOAD_LINE  # noqa: E402
from _cura_connection.gate import ServeGate  # noqa: E402
from _cura_connection.gcode_meta import gcode_comment_lines, parse_gcode_metadata, read_gcode_metadata, valid_job_materials  # noqa: E402
from _cura_connection.intake import FileIntake, GcodeOutput, GzipWriter, SPACE_MARGIN, TEXT_CHECK_BYTES  # noqa: E402
from _cura_connection.jobs import ENDED, Job, JobStore, SAVED_JOB_FIELDS, estimate_time_total  # noqa: E402
from _cura_connection.lifecycle import JobLifecycle  # noqa: E402
from _cura_connection.materials import LoadedMaterials, MaterialStore, material_differs  # noqa: E402
from _cura_connection.names import job_name, label_text, safe_base_name, split_upload_name  # noqa: E402
from _cura_connection.storage import write_file_atomic  # noqa: E402
import gcode_samples  # noqa: E402


@pytest.mark.parametrize("given,expected", [
    ("benchy.gcode", "benchy.gcode"),
    ("../../etc/passwd", "passwd"),
    ("/abs/path/x.ufp", "x.ufp"),
    ("C:\\Users\\a\\part.ufp", "part.ufp"),
    ("..", "print"),
    ("", "print"),
    (".hidden.gcode", "hidden.gcode"),
    ("a b;c\nd\x00e.gcode", "a_b_c_d_e.gcode"),
    ("Würfel (2).gcode", "Würfel_(2).gcode"),
    ("x" * 400 + ".gcode", "x" * 200),
])
def test_safe_base_name(given, expected):
    assert safe_base_name(given) == expected


def test_safe_base_name_never_escapes():
    for name in ["../a", "a/../../b", "/", "\\..\\..\\x", "....//", "\x00"]:
        out = safe_base_name(name)
        assert "/" not in out and "\\" not in out
        assert not out.startswith(".")
        assert out not in ("", ".", "..")


@pytest.mark.parametrize("given,expected", [
    ("a.gcode.gz", ("a", ".gcode.gz")),
    ("A.GCODE", ("A", ".gcode")),
    ("b.ufp", ("b", ".ufp")),
    ("c.g", ("c", ".g")),
    ("d.stl", ("d.stl", "")),
    (".ufp", (".ufp", "")),
])
def test_split_upload_name(given, expected):
    assert split_upload_name(given) == expected


def _thumb(png, w, h):
    b64 = base64.b64encode(png).decode()
    lines = [b64[i:i + 78] for i in range(0, len(b64), 78)]
    return ("; thumbnail begin %dx%d %d\n" % (w, h, len(b64))
            + "".join("; %s\n" % l for l in lines)
            + "; thumbnail end\n").encode()


PNG_SMALL = b"\x89PNG\r\n\x1a\n" + b"small"
PNG_BIG = b"\x89PNG\r\n\x1a\n" + b"big" * 100


def test_metadata_cura_marlin_header():
    head = (b";FLAVOR:Marlin\n;TIME:5400\n;Filament used: 1.5m\n"
            + _thumb(PNG_SMALL, 32, 32) + _thumb(PNG_BIG, 300, 300)
            + b"G1 X1\n")
    meta = parse_gcode_metadata(head, b"")
    assert meta["time_estimate"] == 5400
    assert meta["filament_mm"] == 1500.
    assert meta["thumbnail"] == PNG_BIG


def test_metadata_griffin_header():
    head = b";START_OF_HEADER\n;FLAVOR:Griffin\n;PRINT.TIME:1234\n"
    assert parse_gcode_metadata(head, b"")["time_estimate"] == 1234


def test_metadata_prusa_tail():
    tail = (b"; filament used [mm] = 2345.6\n"
            b"; estimated printing time (normal mode) = 1d 2h 3m 4s\n")
    meta = parse_gcode_metadata(b"G1 X1\n", tail)
    assert meta["time_estimate"] == 86400 + 2 * 3600 + 3 * 60 + 4
    assert meta["filament_mm"] == pytest.approx(2345.6)
    assert meta["thumbnail"] is None


def test_metadata_ignores_broken_thumbnail():
    head = b"; thumbnail begin 10x10 4\n; !!!!\n; thumbnail end\n;TIME:7\n"
    meta = parse_gcode_metadata(head, b"")
    assert meta["thumbnail"] is None and meta["time_estimate"] == 7


def qimage_size(data):
    # Cura's preview: UM3PrintJobOutputModel.updatePreviewImageData
    from PyQt5.QtGui import QImage
    image = QImage()
    return (image.width(), image.height()) if image.loadFromData(data) \
        else None


def test_thumbnail_cura5_create_thumbnail_script():
    # "; thumbnail begin 300 300 <len>": width and height split by a space
    head = (gcode_samples.cura_marlin_header(2345)
            + gcode_samples.embedded_thumbnail(gcode_samples.png(32, 32),
                                               32, 32, sep=" ")
            + gcode_samples.embedded_thumbnail(gcode_samples.png(300, 300),
                                               300, 300, sep=" ")
            + gcode_samples.moves(10)).encode()
    meta = parse_gcode_metadata(gcode_comment_lines(head), b"")
    assert meta["time_estimate"] == 2345
    assert meta["filament_mm"] == pytest.approx(1234.56)
    assert qimage_size(meta["thumbnail"]) == (300, 300)


def test_thumbnail_without_length():
    block = gcode_samples.embedded_thumbnail(gcode_samples.png(20, 10),
                                             20, 10)
    head = block.replace(block.split("\n")[0], "; thumbnail begin 20x10")
    thumb = parse_gcode_metadata(head.encode(), b"")["thumbnail"]
    assert qimage_size(thumb) == (20, 10)


@pytest.mark.parametrize("blocks,expected", [
    # PrusaSlicer/Orca/SuperSlicer: only JPG blocks
    ([("_JPG", "jpeg", 16, 16), ("_JPG", "jpeg", 220, 124)], (220, 124)),
    # only QOI: Cura's QImage cannot decode it, so no preview
    ([("_QOI", "qoi", 16, 16), ("_QOI", "qoi", 480, 240)], None),
    # Prusa MK4 style: QOI for the printer's screen, a PNG for the rest
    ([("_QOI", "qoi", 480, 240), ("", "png", 300, 300),
      ("_QOI", "qoi", 16, 16)], (300, 300)),
    # same size: the lossless PNG
    ([("_JPG", "jpeg", 64, 64), ("_PNG", "png", 64, 64)], (64, 64)),
    # the largest up to PREVIEW_MAX_SIDE, not a huge one
    ([("", "png", 1600, 1600), ("_JPG", "jpeg", 400, 300),
      ("", "png", 32, 32)], (400, 300)),
    # only a huge one: better than none
    ([("", "png", 1600, 1200)], (1600, 1200)),
    # the label says PNG but the data is a JPEG: the data decides
    ([("", "jpeg", 50, 40)], (50, 40)),
    # the label says JPG but the data is QOI: skipped
    ([("_JPG", "qoi", 50, 40), ("", "png", 20, 20)], (20, 20)),
], ids=["jpg only", "qoi only", "qoi and png", "png before jpg",
        "largest fitting", "huge only", "jpeg labelled png",
        "qoi labelled jpg"])
def test_thumbnail_family(blocks, expected):
    head = ";TIME:60\n" + "".join(
        gcode_samples.embedded_thumbnail(
            getattr(gcode_samples, kind)(w, h), w, h, kind=label)
        for label, kind, w, h in blocks)
    thumb = parse_gcode_metadata(head.encode(), b"")["thumbnail"]
    if expected is None:
        assert thumb is None
    else:
        assert qimage_size(thumb) == expected
    # what a QOI decoder would need, Cura's does not have
    assert qimage_size(gcode_samples.qoi(4, 4)) is None


@pytest.mark.parametrize("head", [
    b"; thumbnail begin 1x1 1\n" * 43000,                   # never ends
    b"; thumbnail begin 1x1 1\n; thumbnail end\n" * 25000,  # empty blocks
    b"; thumbnail begin 99999x99999 1\n; iVBO\n; thumbnail end\n" * 20000,
    b"; thumbnail begin 0x0 1\n; thumbnail end\n",
    b"; thumbnail begin " + b"9" * 5000 + b"x1 1\n; thumbnail end\n",
], ids=["no end", "empty", "broken data", "zero size", "huge number"])
def test_thumbnail_hostile_blocks(head):
    # a megabyte of them is read in one pass (the old pattern searched
    # for each begin's end anew: 8,000 unended begins took 27 s)
    assert parse_gcode_metadata(head, b"")["thumbnail"] is None


@pytest.mark.parametrize("head,seconds", [
    (b";TIME:" + b"9" * 400 + b"\n", 0),          # float() -> inf
    (b"; estimated printing time = inf\n", 0),
    (b"; estimated printing time = nan\n", 0),
    (b"; estimated printing time = 1e400\n", 0),
    (b"; estimated printing time = " + b"9" * 5000 + b"s\n", 0),
    (b"; estimated printing time = 1_5\n", 0),    # int() said 15
    (b";TIME:2345.7\n", 2345),
], ids=["huge", "inf", "nan", "1e400", "5000 digits", "1_5", "fraction"])
def test_absurd_time_estimates(head, seconds):
    assert parse_gcode_metadata(head, b"")["time_estimate"] == seconds


def fake_statvfs(monkeypatch, free):
    """The module's os.statvfs says free[0] bytes are free."""
    class Vfs:
        f_frsize = 4096

        @property
        def f_bavail(self):
            return free[0] // 4096
    monkeypatch.setattr(os, "statvfs", lambda path: Vfs())


def test_intake_reserves_space_and_queue_slots(tmp_path, monkeypatch):
    MiB = 1 << 20
    free = [96 * MiB]

    fake_statvfs(monkeypatch, free)
    intake = FileIntake(str(tmp_path), 1024 * MiB)
    # two 55 MiB uploads into 96 MiB free: each fits alone, not together
    a = intake.begin(55 * MiB)
    with pytest.raises(NoSpace) as e:
        intake.begin(55 * MiB)
    assert "55 MiB of it for uploads in progress" in e.value.message
    # what a has written is no longer free, and no longer pending
    a.received = 40 * MiB
    free[0] -= 40 * MiB
    with pytest.raises(NoSpace):
        intake.begin(30 * MiB)
    intake.end(a)
    free[0] -= 15 * MiB
    b = intake.begin(25 * MiB)      # 25 + 16 <= 41
    intake.end(b)
    # queue slots: uploads in flight count as queued jobs
    c = intake.begin(MiB, lambda: 1, 2)
    with pytest.raises(Conflict) as e:
        intake.begin(MiB, lambda: 1, 2)
    assert "max_queue: 2" in e.value.message
    intake.end(c)
    intake.end(intake.begin(MiB, lambda: 1, 2))
    with pytest.raises(TooLarge):
        FileIntake(str(tmp_path), MiB).begin(MiB + 1)
    assert not intake.in_flight


def test_read_gcode_metadata_reads_head_and_tail(tmp_path):
    p = tmp_path / "big.gcode"
    with open(p, "wb") as f:
        f.write(b";TIME:99\n")
        f.write(b"G1 X1\n" * 400000)        # 2.4 MB of moves
        f.write(b"; filament used [mm] = 12.5\n")
    meta = read_gcode_metadata(str(p))
    assert meta["time_estimate"] == 99 and meta["filament_mm"] == 12.5


def test_estimate_time_total():
    assert estimate_time_total(1000, 0, 0.) == 1000
    # halfway after 600 s: half estimate, half observation (1200 s)
    assert estimate_time_total(1000, 600, 0.5) == 1100
    assert estimate_time_total(0, 300, 0.25) == 1200
    # never below what has already elapsed
    assert estimate_time_total(100, 500, 0.) == 501


def test_gzip_writer_handles_concatenated_members(tmp_path):
    import gzip
    import io
    data = gzip.compress(b"G1 X1\n" * 1000) + gzip.compress(b"G1 X2\n")
    out = io.BytesIO()
    w = GzipWriter(out)
    for i in range(0, len(data), 7):
        w.write(data[i:i + 7])
    w.close()
    assert out.getvalue() == b"G1 X1\n" * 1000 + b"G1 X2\n"


def test_write_file_atomic(tmp_path):
    p = str(tmp_path / "q.json")
    write_file_atomic(p, b"one")
    write_file_atomic(p, b"two")
    assert open(p, "rb").read() == b"two"
    assert os.listdir(tmp_path) == ["q.json"]   # no temp file left


# Job store: state machine with fake snapshots

@pytest.fixture
def store(tmp_path):
    return JobStore(str(tmp_path / "queue.json"), 3, False)


@pytest.fixture
def klipper():
    return FakeKlipper()


@pytest.fixture
def life(store, klipper):
    return JobLifecycle(klipper, store, lambda job: None)


def two_jobs(store):
    a = Job(name="a", filename="a.gcode")
    b = Job(name="b", filename="b.gcode")
    store.add(a)
    store.add(b)
    return a, b


def test_lifecycle_queue(store, klipper, life, tmp_path):
    a, b = two_jobs(store)
    life.follow(klipper.now())
    # handed to Klipper, which has not answered yet
    assert a.status == "pre_print" and store.current is a
    klipper.run_callbacks()
    assert klipper.scripts == ["SDCARD_PRINT_FILE FILENAME=a.gcode"]
    assert a.status == "printing"
    klipper.duration = 60.
    klipper.follow(life)
    assert a.time_elapsed == 60 and a.time_total > 60
    klipper.finish("complete", 115.4)
    klipper.follow(life)
    # a completed job took exactly its time (Cura 4.13 shows it as done)
    assert (a.status, a.time_elapsed, a.time_total) == \
        ("wait_cleanup", 115, 115)
    assert not store.plate_clear and b.status == "queued"
    klipper.follow(life)
    assert b.status == "queued"       # waits for the plate
    life.plate_cleared()
    klipper.run_callbacks()
    assert a.status == "finished" and store.history == [a]
    assert b.status == "printing"
    store.save()
    data = json.load(open(tmp_path / "queue.json"))
    assert [j["name"] for j in data["history"]] == ["a"]


def test_lifecycle_abort_during_start_cancels_it(store, klipper, life):
    a, b = two_jobs(store)
    life.follow(klipper.now())
    assert a.status == "pre_print"
    assert life.act(NoCall, a.uuid, "abort") == \
        (200, "aborted_wait_cleanup")
    klipper.run_callbacks()           # the start's turn comes: nothing
    klipper.follow(life)
    assert klipper.scripts == [] and not klipper.active
    assert a.status == "aborted_wait_cleanup" and b.status == "queued"


def test_lifecycle_refused_start_goes_back_to_the_queue(store, klipper,
                                                        life):
    a, b = two_jobs(store)
    life.follow(klipper.now())
    # a console print starts before the start gets the G-code queue
    klipper.filename, klipper.state, klipper.active = \
        "console.gcode", "printing", True
    klipper.run_callbacks()
    assert [j.name for j in store.queue] == ["a", "b"]
    assert a.status == "queued" and not a.started and a not in store.history
    klipper.follow(life)
    assert store.current.owner == "Klipper" and \
        store.current.filename == "console.gcode"


def test_lifecycle_failed_start(store, klipper, life):
    a = Job(name="a", filename="a.gcode")
    store.add(a)
    klipper.run_script_from_command = lambda script: (_ for _ in ()).throw(
        Exception("Unable to open file"))
    klipper.follow(life)
    assert a.status == "failed_wait_cleanup" and "Unable" in a.message
    assert store.plate_clear       # nothing was printed


@pytest.mark.parametrize("pause", ["PAUSE", "M25"])
def test_lifecycle_resume_and_abort_whatever_paused(store, klipper, life,
                                                    pause):
    a = Job(name="a", filename="a.gcode")
    store.add(a)
    klipper.follow(life)
    klipper.duration = 6.
    klipper.run_script_from_command(pause)   # the file or a macro
    klipper.follow(life)
    assert a.status == "paused" and a.time_elapsed == 6
    assert life.act(NoCall, a.uuid, "print") == (200, "printing")
    assert klipper.scripts[-1] == ("RESUME" if pause == "PAUSE" else "M24")
    assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
    assert klipper.scripts[-1] == "PAUSE"
    klipper.run_script_from_command(pause)
    klipper.paused_for = 12.
    assert life.act(NoCall, a.uuid, "abort") == \
        (200, "aborted_wait_cleanup")
    assert not klipper.active and klipper.state in ("cancelled", "standby")
    assert a.time_elapsed == 6 and a.time_total > 6


def test_lifecycle_refuses_what_does_not_apply(store, klipper, life):
    a, b = two_jobs(store)
    klipper.follow(life)
    for job, action in [(a, "print"), (b, "pause"), (b, "abort")]:
        with pytest.raises(Conflict):
            life.act(NoCall, job.uuid, action)
    with pytest.raises(NotFound):
        life.act(NoCall, "0000", "pause")
    # a withdrawn call (its HTTP request timed out) changes nothing
    call = ReactorCall()
    assert call.withdraw()
    assert life.act(call, a.uuid, "pause") is None
    assert a.status == "printing" and klipper.active
    with pytest.raises(Conflict):
        life.plate_cleared()


def printing_job(store, klipper, life, name="a"):
    job = Job(name=name, filename=name + ".gcode")
    store.add(job)
    klipper.follow(life)
    assert job.status == "printing"
    del klipper.scripts[:]
    return job


def refused(life, job, action, *words):
    """act() answers 409 with a reason naming words."""
    with pytest.raises(Conflict) as e:
        life.act(NoCall, job.uuid, action)
    for word in words:
        assert word in e.value.message, e.value.message
    assert "nothing was done" in e.value.message
    assert job.action is None
    return e.value.message


def test_actions_decide_on_klippers_state_at_that_moment(store, klipper,
                                                         life):
    # Each race: the job list (followed up to 0.5 s ago) says
    # one thing, Klipper has moved on when the action is carried out.
    # The action is refused, says why and sends Klipper nothing.
    a = printing_job(store, klipper, life)
    klipper.finish("complete", 30.)     # the print ends; not followed yet
    refused(life, a, "pause", "ended", "wait_cleanup")
    assert klipper.scripts == [] and not klipper.is_paused
    assert (a.status, a.time_total, a.time_elapsed) == \
        ("wait_cleanup", 30, 30)
    refused(life, a, "abort", "ended")
    refused(life, a, "print", "ended")
    assert klipper.scripts == [] and a.status == "wait_cleanup"
    life.plate_cleared()
    b = printing_job(store, klipper, life, "b")
    klipper.run_script_from_command("PAUSE")        # from the console
    refused(life, b, "pause", "it is paused")
    klipper.run_script_from_command("RESUME")       # from the console
    refused(life, b, "print", "it is printing")
    assert klipper.scripts == ["PAUSE", "RESUME"]   # only the console's
    klipper.kstate = "shutdown"                     # M112
    refused(life, b, "abort", "Klipper is shutdown")
    assert b.status == "failed_wait_cleanup" and b.action is None
    assert klipper.scripts == ["PAUSE", "RESUME"]


@pytest.mark.parametrize("action", ["pause", "abort"])
def test_actions_wait_for_a_file_read_to_its_end(store, klipper, life,
                                                 action):
    # Klipper (upstream) reads the file in a worker thread: with the
    # G-code mutex held, the file may still be about to find its end.
    # PAUSE or CANCEL_PRINT then would meet a print completing under it.
    a = printing_job(store, klipper, life)
    klipper.progress = 1.
    klipper.on_pause = [lambda: klipper.finish("complete")]
    refused(life, a, action, "ended", "wait_cleanup")
    assert klipper.scripts == [] and a.status == "wait_cleanup"


def test_resume_after_a_console_cancel(store, klipper, life):
    a = printing_job(store, klipper, life)
    assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
    klipper.run_script_from_command("CANCEL_PRINT")     # not followed yet
    del klipper.scripts[:]
    refused(life, a, "print", "ended", "aborted_wait_cleanup")
    assert klipper.scripts == [] and klipper.state == "cancelled"


def test_abort_of_a_print_the_console_replaced(store, klipper, life):
    a = printing_job(store, klipper, life)
    assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
    # the console starts another file over the paused one
    klipper.run_script_from_command("SDCARD_PRINT_FILE FILENAME=c.gcode")
    del klipper.scripts[:]
    refused(life, a, "abort", "not on the printer")
    assert klipper.scripts == [] and klipper.filename == "c.gcode"
    assert klipper.active and store.history == [a]
    assert a.status == "aborted" and "c.gcode" in a.message
    assert store.current.filename == "c.gcode"


def test_queue_changes_and_plate_clear_see_the_print_end(store, klipper,
                                                         life):
    a = printing_job(store, klipper, life)
    b = Job(name="b", filename="b.gcode")
    store.add(b)
    klipper.finish("complete", 10.)     # not followed yet
    life.plate_cleared()                # the job has ended: not refused
    klipper.run_callbacks()
    assert a.status == "finished" and store.current is b
    klipper.finish("complete", 10.)
    life.change(NoCall, store.delete, b.uuid)     # ended: deletable
    assert store.current is None and store.history[0] is b
    assert b.status == "finished"


def test_a_pause_of_no_print_is_cleared_before_the_next_start(store,
                                                              klipper, life):
    # PAUSE typed in the console as the print ended pauses the idle
    # printer (Klipper's own PAUSE): the next print must not inherit it
    a = printing_job(store, klipper, life)
    b = Job(name="b", filename="b.gcode")
    store.add(b)
    klipper.finish("complete")
    klipper.run_script_from_command("PAUSE")
    klipper.follow(life)
    assert klipper.is_paused and a.status == "wait_cleanup"
    life.plate_cleared()
    klipper.run_callbacks()
    assert klipper.scripts[-2:] == ["CLEAR_PAUSE",
                                    "SDCARD_PRINT_FILE FILENAME=b.gcode"]
    assert b.status == "printing" and not klipper.is_paused
    assert life.act(NoCall, b.uuid, "pause") == (200, "paused")
    assert life.act(NoCall, b.uuid, "print") == (200, "printing")


def test_a_pause_whose_print_fails_first_leaves_no_pause(store, klipper,
                                                         life):
    a = printing_job(store, klipper, life)
    run = klipper.run_script_from_command
    def pause_then_fail(script):
        # PAUSE waits for the file's current command, which fails
        run(script)
        if script == "PAUSE":
            klipper.is_paused, klipper.active = True, True
            klipper.run_script_from_command = run
            klipper.finish("error")
    klipper.run_script_from_command = pause_then_fail
    refused_msg = None
    with pytest.raises(Conflict) as e:
        life.act(NoCall, a.uuid, "pause")
    refused_msg = e.value.message
    assert "failed_wait_cleanup" in refused_msg
    assert not klipper.is_paused and klipper.scripts[-1] == "CLEAR_PAUSE"
    assert a.status == "failed_wait_cleanup" and a.action is None


@pytest.mark.parametrize("how", ["abort", "console cancel", "error",
                                 "paused abort", "shutdown"])
def test_an_ended_print_shows_the_progress_it_reached(store, klipper, life,
                                                      how):
    # Cura draws time_elapsed / time_total: 5 % reached shows 5 %
    a = printing_job(store, klipper, life)
    a.time_estimate = 3600
    klipper.duration, klipper.progress = 100., 0.05
    klipper.follow(life)
    if how == "abort":
        assert life.act(NoCall, a.uuid, "abort")[0] == 200
    elif how == "console cancel":
        klipper.run_script_from_command("CANCEL_PRINT")
    elif how == "error":
        klipper.finish("error")
    elif how == "paused abort":
        assert life.act(NoCall, a.uuid, "pause") == (200, "paused")
        klipper.paused_for = 500.
        assert life.act(NoCall, a.uuid, "abort")[0] == 200
    else:
        klipper.kstate = "shutdown"
    klipper.follow(life)
    assert a.status in ("aborted_wait_cleanup", "failed_wait_cleanup")
    assert (a.time_elapsed, a.time_total) == (100, 2000)
    life.plate_cleared()
    assert a.status in ("aborted", "failed") and store.history[0] is a
    assert (a.time_elapsed, a.time_total) == (100, 2000)


def test_lifecycle_end_states(store, klipper, life):
    for state, expected in [("cancelled", "aborted_wait_cleanup"),
                            ("error", "failed_wait_cleanup"),
                            ("standby", "aborted_wait_cleanup")]:
        job = Job(name=state, filename=state + ".gcode")
        store.add(job)
        klipper.follow(life)
        assert job.status == "printing"
        klipper.finish(state)
        klipper.follow(life)
        assert job.status == expected
        life.plate_cleared()
        assert job.status == ENDED[expected]
    job = Job(name="s", filename="s.gcode")
    store.add(job)
    klipper.follow(life)
    klipper.kstate = "shutdown"
    klipper.follow(life)
    assert job.status == "failed_wait_cleanup" and job.message == "msg"
    life.plate_cleared()
    assert [j.name for j in store.history] == ["s", "standby", "error"]


def test_lifecycle_external_print(store, klipper, life):
    seen = []
    life.want_metadata = seen.append
    klipper.run_script_from_command("SDCARD_PRINT_FILE FILENAME=m.gcode")
    store.add(Job(name="q", filename="q.gcode"))
    klipper.follow(life)
    cur = store.current
    assert (cur.name, cur.owner, cur.status) == ("m", "Klipper", "printing")
    assert seen == [cur] and store.queue[0].status == "queued"


def test_store_restart_reports_interrupted_job(tmp_path):
    path = str(tmp_path / "queue.json")
    s = JobStore(path, 5, False)
    job = Job(name="a", filename="a.gcode")
    s.add(job)
    s.add(Job(name="b", filename="b.gcode"))
    s.begin_start(job)
    s.save()
    s2 = JobStore(path, 5, False)
    assert s2.current.status == "failed_wait_cleanup"
    assert "restart" in s2.current.message
    assert [j.name for j in s2.queue] == ["b"] and not s2.plate_clear


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_store_damaged_file_is_kept_aside(tmp_path, text):
    path = tmp_path / "queue.json"
    path.write_text(text)
    s = JobStore(str(path), 5, False)
    assert s.queue == [] and (tmp_path / "queue.json.bad").exists()


GOOD = {"uuid": "1234abcd", "name": "a", "filename": "a.gcode",
        "status": "queued"}


@pytest.mark.parametrize("data,kept", [
    ({"queue": 5}, []),                                   # issue 9
    ({"queue": [GOOD, 5, dict(GOOD, uuid="x y")]}, ["a"]),
    ({"queue": [GOOD, dict(GOOD, filename="../etc/x.gcode", uuid="2")]},
     ["a"]),
    ({"queue": [dict(GOOD, time_total="12"), dict(GOOD, uuid="3")]}, ["a"]),
    ({"queue": [GOOD, GOOD]}, ["a"]),                     # same uuid
    ({"queue": [dict(GOOD, status="printing")]}, []),
    ({"queue": [dict(GOOD, status=["queued"]), dict(GOOD, uuid="4",
                                                   source={})]}, []),
    ({"queue": [GOOD], "history": {"a": 1}, "current": [],
      "plate_clear": "yes"}, ["a"]),
    ({"queue": [dict(GOOD, materials=[{"extruder": 0, "guid": 5}]),
                dict(GOOD, uuid="5", materials=[{"extruder": -1}]),
                dict(GOOD, uuid="6", materials={"0": {}}),
                dict(GOOD, uuid="7", materials=[{"extruder": 0},
                                                {"extruder": 0}]),
                dict(GOOD, uuid="8", materials=[{"extruder": 0, "x": ""}]),
                dict(GOOD, uuid="9", name="b",
                     materials=[{"extruder": 1, "guid": "g"}])]}, ["b"]),
], ids=["queue is a number", "bad entries", "unsafe name", "bad time",
        "twice", "wrong status", "unhashable status", "bad fields",
        "bad materials"])
def test_store_drops_bad_saved_entries(tmp_path, data, kept):
    path = tmp_path / "queue.json"
    path.write_text(json.dumps(data))
    s = JobStore(str(path), 5, False)
    assert [j.name for j in s.queue] == kept
    # the file as it was is kept aside; the next save cleans it
    assert json.loads((tmp_path / "queue.json.bad").read_text()) == data
    assert s.dirty
    s.save()
    again = JobStore(str(path), 5, False)
    assert [j.name for j in again.queue] == kept and not again.dirty


def test_store_move_delete_force(store):
    jobs = [Job(name=n, filename=n + ".gcode") for n in "abc"]
    for j in jobs:
        store.add(j)
    store.move(jobs[2].uuid, 0)
    assert [j.name for j in store.queue] == ["c", "a", "b"]
    store.delete(jobs[0].uuid)
    assert [j.name for j in store.queue] == ["c", "b"]
    store.set_force(jobs[1].uuid, True)
    assert jobs[1].force
    with pytest.raises(NotFound):
        store.move("nope", 0)


def lock_is_free(lock):
    # from another thread: an RLock is always free to its holder
    free = []
    def probe():
        if lock.acquire(blocking=False):
            lock.release()
            free.append(True)
    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return bool(free)


def test_store_never_encodes_under_its_lock(tmp_path, monkeypatch):
    """A save (the writer thread) encodes with the store's lock free: a
    change the reactor makes meanwhile goes through, and the file then
    written still reads back as the store is."""
    path = str(tmp_path / "queue.json")
    s = JobStore(path, 5, False)
    jobs = [Job(name="j%d" % i, filename="j%d.gcode" % i)
            for i in range(30)]
    for j in jobs:
        s.add(j)
    s.begin_start(jobs[0])
    s.end(jobs[0], "wait_cleanup")
    s.plate_cleared()
    real_dumps = json.dumps
    seen, changes = [], []
    def dumps(obj, *args, **kwargs):
        seen.append(lock_is_free(s.lock))
        if len(seen) == 5:
            # the reactor starts the next job while the save encodes
            t = threading.Thread(target=lambda: changes.append(
                s.begin_start(jobs[1])))
            t.start()
            t.join(10.)
            assert changes, "the store's lock was held while encoding"
        return real_dumps(obj, *args, **kwargs)
    monkeypatch.setattr(json, "dumps", dumps)
    s.save()
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert seen and all(seen) and changes
    with open(path) as f:
        assert json.load(f) == s.state()
    again = JobStore(path, 5, False)
    # (a job that was printing ends at a restart)
    assert again.current.name == "j1" and [
        (j.to_dict()) for j in again.queue + again.history] == [
            j.to_dict() for j in s.queue + s.history]
    # the next save encodes only what changed since
    seen.clear()
    s.set_force(jobs[5].uuid, True)
    monkeypatch.setattr(json, "dumps", dumps)
    s.save()
    monkeypatch.setattr(json, "dumps", real_dumps)
    assert len(seen) == 1
    with open(path) as f:
        assert json.load(f) == s.state()


def test_status_and_lookups_stay_small(tmp_path):
    """get_status() lists the first queued jobs and counts them all; jobs
    are found by uuid wherever they are, until they leave the store."""
    s = JobStore(str(tmp_path / "q.json"), 2, False)
    jobs = [Job(name="j%d" % i, filename="j%d.gcode" % i)
            for i in range(s.STATUS_JOBS + 5)]
    for j in jobs:
        s.add(j)
    st = s.status_cache
    assert [q["name"] for q in st["queue"]] == \
        ["j%d" % i for i in range(s.STATUS_JOBS)]
    assert st["queue_length"] == len(jobs)
    with pytest.raises(Conflict):
        s.add(Job(name="x", filename="x.gcode"), len(jobs))
    for j in jobs[:4]:
        s.begin_start(j)
        s.end(j, "wait_cleanup")
        assert s.find(j.uuid) is j
        s.plate_cleared()
    # a history of 2: the oldest ended jobs are gone
    assert [s.find(j.uuid) for j in jobs[:4]] == [None, None] + jobs[2:4]
    assert s.take_back(jobs[6]) and not s.take_back(jobs[6])
    assert s.find(jobs[6].uuid) is None
    with pytest.raises(Conflict):
        s.move(jobs[3].uuid, 0)     # in the history, not queued
    s.delete(jobs[3].uuid)
    assert s.find(jobs[3].uuid) is None
    assert s.status_cache["queue_length"] == len(jobs) - 5


class ReactorThreadKlipper(FakeKlipper):
    """FakeKlipper whose bridge.call() runs the call in a thread of its
    own (the reactor), as KlippyBridge.call does."""
    def call(self, fn, *args):
        out = {}
        def run():
            try:
                out["result"] = fn(NoCall, *args)
            except Exception as e:
                out["error"] = e
        t = threading.Thread(target=run, name="reactor")
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["result"]


def test_uploads_join_the_queue_in_the_reactor(tmp_path, monkeypatch):
    """add_upload (an HTTP or control thread) changes the store only
    through the lifecycle, in the reactor: the job, the queue limit, and
    taking the job back when it cannot be saved."""
    from types import SimpleNamespace
    klipper = ReactorThreadKlipper()
    store = JobStore(str(tmp_path / "queue.json"), 5, False)
    store.plate_clear = False       # nothing starts
    changed_in = []
    for name in ("add", "take_back"):
        def wrapped(*args, real=getattr(store, name), name=name):
            changed_in.append((name, threading.current_thread().name))
            return real(*args)
        monkeypatch.setattr(store, name, wrapped)
    removed = []
    conn = SimpleNamespace(
        bridge=klipper, store=store, max_queue=2,
        lifecycle=JobLifecycle(klipper, store, lambda job: None),
        intake=SimpleNamespace(remove=lambda f, p: removed.append(f)),
        materials=SimpleNamespace(name_job_materials=lambda w, p: []))
    api = CuraApi(conn)
    meta = {"time_estimate": 60, "preview": None, "materials": [],
            "material_profiles": {}}
    reply = api.add_upload("a.gcode", "alice", meta, "127.0.0.1")
    assert reply["status"] == "queued" and changed_in == [
        ("add", "reactor")]
    with open(store.path) as f:
        assert [j["filename"] for j in json.load(f)["queue"]] == ["a.gcode"]
    api.add_upload("b.gcode", "alice", meta, "127.0.0.1")
    with pytest.raises(Conflict):
        api.add_upload("c.gcode", "alice", meta, "127.0.0.1")
    assert removed == ["c.gcode"] and len(store.queue) == 2
    store.delete(store.queue[1].uuid)
    store.delete(store.queue[0].uuid)
    store.plate_clear = True

    def no_room():
        # the status timer runs while the HTTP thread saves: the job
        # waits for its save, it does not start
        conn.lifecycle.follow(klipper.now())
        klipper.run_callbacks()
        assert store.current is None and not klipper.scripts
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(store, "save", no_room)
    changed_in.clear()
    with pytest.raises(NoSpace):
        api.add_upload("d.gcode", "alice", meta, "127.0.0.1")
    assert changed_in == [("add", "reactor"), ("take_back", "reactor")]
    assert removed == ["c.gcode", "d.gcode"] and store.queue == []
    # saved: it starts at the next tick
    monkeypatch.setattr(store, "save", lambda: None)
    api.add_upload("e.gcode", "alice", meta, "127.0.0.1")
    klipper.follow(conn.lifecycle)
    assert store.current.filename == "e.gcode"
    assert klipper.scripts == ["SDCARD_PRINT_FILE FILENAME=e.gcode"]


def test_auto_start_next(tmp_path, klipper):
    store = JobStore(str(tmp_path / "q.json"), 5, True)
    life = JobLifecycle(klipper, store, lambda job: None)
    a, b = two_jobs(store)
    klipper.follow(life)
    klipper.finish()
    klipper.follow(life)
    assert a.status == "finished" and b.status == "printing"


# Materials

MATERIAL = """<?xml version="1.0" encoding="UTF-8"?>
<fdmmaterial xmlns="http://www.ultimaker.com/material" version="1.3">
  <metadata>
    <name><brand>Acme</brand><material>PLA</material><color>Red</color></name>
    <GUID>%s</GUID><version>%s</version><color_code>#ff0000</color_code>
  </metadata>
</fdmmaterial>"""
GUID = "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce"


def test_material_store(tmp_path):
    m = MaterialStore(str(tmp_path / "materials"))
    assert m.list() == []
    assert m.add("acme_pla.xml.fdm_material", (MATERIAL % (GUID, 2)).encode())
    assert not m.add("acme_pla.xml.fdm_material",
                     (MATERIAL % (GUID, 2)).encode())
    assert m.add("renamed.xml.fdm_material", (MATERIAL % (GUID, 3)).encode())
    assert os.listdir(tmp_path / "materials") == ["renamed.xml.fdm_material"]
    # a new store reads the folder back
    got = MaterialStore(str(tmp_path / "materials")).list()
    assert [(g["guid"], g["version"], g["brand"], g["color"]) for g in got] \
        == [(GUID, 3, "Acme", "Red")]


@pytest.mark.parametrize("data,why", [
    (MATERIAL % (GUID, 0), "version"),
    (MATERIAL % ("", 1), "GUID"),
    (MATERIAL % ("a b;c", 1), "GUID"),
    (MATERIAL % (GUID, "1_0"), "version"),
    (MATERIAL % (GUID, "+1"), "version"),
    ("<fdmmaterial/>", "fdmmaterial"),
    ("not xml at all", "valid"),
    ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">'
     '<!ENTITY b "&a;&a;&a;&a;">]><fdmmaterial>&b;</fdmmaterial>', "valid"),
    ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM '
     '"file:///etc/passwd">]><fdmmaterial>&e;</fdmmaterial>', "valid"),
], ids=["version 0", "no GUID", "bad GUID", "version 1_0", "version +1",
        "wrong root", "not XML",
        "entity expansion", "external entity"])
def test_material_rejects(tmp_path, data, why):
    m = MaterialStore(str(tmp_path))
    with pytest.raises(BadInput) as e:
        m.add("x.xml.fdm_material", data.encode())
    assert why in e.value.message
    assert m.list() == []


def test_material_bad_name(tmp_path):
    m = MaterialStore(str(tmp_path))
    with pytest.raises(BadInput):
        m.add("../evil.xml", (MATERIAL % (GUID, 1)).encode())


class FakeApi:
    """What ReplyCache reads of CuraApi: the configuration and job_json."""
    config = [{"extruder_index": 0, "material": None}]

    def printer_configuration(self, snap):
        return self.config

    def jobs_basis(self):
        return json.dumps(self.config)

    def job_json(self, job, linked):
        d = job.to_dict()
        d["linked"] = linked
        d["configuration"] = self.config
        return d


def test_reply_cache_job_list():
    api = FakeApi()
    cache = ReplyCache(api)
    jobs = [Job(name="j%d" % i, filename="j%d.gcode" % i)
            for i in range(45)]
    head, rest = [jobs[0]], jobs[1:]
    pauses = []
    first = cache.job_list(head, rest, lambda: pauses.append(1))
    # the same bytes as encoding the whole list at once, in chunks
    assert b"".join(first) == json.dumps(
        [api.job_json(jobs[0], True)]
        + [api.job_json(j, False) for j in jobs[1:]]).encode()
    assert len(pauses) == 2          # a long list is encoded in steps
    small = ReplyCache(api)
    small.CHUNK = 10
    chunked = small.job_list(head, rest, lambda: None)
    assert len(chunked) == 7 and b"".join(chunked) == b"".join(first)
    # nothing changed: the same chunks again, not joined anew
    assert small.job_list(head, rest, lambda: None) is chunked
    kept = cache.entries[jobs[3].uuid]
    # a job changes: its reply changes, the others are reused as they are
    jobs[5].status = "printing"
    second = json.loads(b"".join(cache.job_list(head, rest, lambda: None)))
    assert second[5]["status"] == "printing"
    assert cache.entries[jobs[3].uuid] is kept
    # so does every job when the configuration changes
    api.config = [{"extruder_index": 0, "material": {"guid": "x"}}]
    third = json.loads(b"".join(cache.job_list(head, rest, lambda: None)))
    assert all(j["configuration"] == api.config for j in third)
    # a job no longer listed is forgotten
    cache.job_list([jobs[0]], [jobs[1]], lambda: None)
    assert set(cache.entries) == {jobs[0].uuid, jobs[1].uuid}
    assert b"".join(cache.job_list([], [], lambda: None)) == b"[]"


def test_serve_gate_one_holder_and_a_stuck_one():
    gate = ServeGate()
    gate.STUCK = 0.05
    assert gate.enter()
    inside = []
    waiter = threading.Thread(target=lambda: inside.append(gate.enter()))
    waiter.start()
    # the holder stays: the waiter goes on without the gate
    waiter.join(10.)
    assert inside == [False]
    gate.leave()
    # once free, the gate lets the next one in, and out again
    assert gate.enter()
    gate.breathe()
    gate.leave()
    assert not gate.lock.locked()


def test_serve_gate_hands_over():
    # Threads queued at the gate all get through, one at a time
    gate = ServeGate()
    gate.STUCK = 60.     # a loaded test machine is no stuck holder
    held, peak, done = [0], [0], []
    lock = threading.Lock()

    def worker():
        for _ in range(50):
            assert gate.enter()
            with lock:
                held[0] += 1
                peak[0] = max(peak[0], held[0])
            gate.breathe()
            with lock:
                held[0] -= 1
            gate.leave()
        done.append(1)
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.)
    assert len(done) == 8 and peak[0] == 1


def test_material_profile_names_like_cura():
    # label, else colour and type, a Generic colour left out
    xml = (b'<fdmmaterial xmlns="http://www.ultimaker.com/material"><metadata>'
           b'<name><brand>B</brand><material>PLA</material><color>%s</color>'
           b'%s</name><GUID>g</GUID><version>1</version></metadata>'
           b'</fdmmaterial>')
    for color, label, name in ((b"Generic", b"", "PLA"),
                               (b"Black", b"", "Black PLA"),
                               (b"Black", b"<label>Pro PLA</label>",
                                "Pro PLA")):
        assert MaterialStore.parse(xml % (color, label))["name"] == name


# The front process: which request heads it answers itself

@pytest.mark.parametrize("head,route", [
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x\r\n\r\n",
     "get_printers"),
    (b"GET /cluster-api/v1/print_jobs/ HTTP/1.1\r\n\r\n", "get_print_jobs"),
    (b"GET /cluster-api/v1/print_jobs?a=1 HTTP/1.0\n\n", "get_print_jobs"),
    (b"GET /cluster-api/v1/print_jobs/history HTTP/1.1\r\n"
     b"Content-Length: 0\r\n\r\n", "get_history"),
    (b"GET /api/v1/system HTTP/1.1\r\n\r\n", "get_system"),
    (b"GET /cluster-api/v1/materials HTTP/1.1\r\n\r\n", "get_materials"),
    (b"GET /cluster-api/v1/print_jobs/0a-1 HTTP/1.1\r\n\r\n",
     "get_print_job"),
    (b"GET /cluster-api/v1/print_jobs/0a-1/preview_image HTTP/1.1\r\n\r\n",
     "get_preview_image"),
    (b"GET /print_jobs HTTP/1.1\r\nAccept: text/html\r\n\r\n", "get_page"),
    # (the camera's route: the front hands it over when it sees the query)
    (b"GET /?action=stream HTTP/1.1\r\n\r\n", None),
    # everything else is Klippy's side's to answer
    (b"GET /api/v1/auth/verify HTTP/1.1\r\n\r\n", None),
    (b"GET /api/v1/auth/check/abc HTTP/1.1\r\n\r\n", None),
    (b"GET /printers/cura_definition.zip HTTP/1.1\r\n\r\n",
     "get_definition_zip"),
    (b"GET /favicon.ico HTTP/1.1\r\n\r\n", "not_found"),
    (b"HEAD /cluster-api/v1/printers HTTP/1.1\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/2.0\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers\r\n\r\n", None),
    (b"GET //cluster-api/v1/printers HTTP/1.1\r\n\r\n", "not_found"),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
     None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nContent-Length: 0\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nExpect: 100-continue"
     b"\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
     None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\n folded\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nBad Header: x\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nX: \xff\r\n\r\n", None),
    # a bare CR, which the email parser behind http.server ends a line at
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nX: a\rContent-Length: 5"
     b"\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\r\n\r\n", None),
    # not one head (the front takes only up to the first empty line)
    (b"GET /cluster-api/v1/printers HTTP/1.1\n\nGET / HTTP/1.1\r\n\r\n",
     None),
    # more header lines than http.server takes
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\n" + b"X: y\r\n" * 101
     + b"\r\n", None),
])
def test_front_answers_only_plain_reads(head, route):
    req = FrontRequest.parse(head)
    assert (req and req.handler) == route


@pytest.mark.parametrize("head,rest", [
    (b"GET / HTTP/1.1\n\n", b"GET /x HTTP/1.1\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nA: b\r\n\r\n", b"GET /x HTTP/1.1\n\n"),
    (b"GET / HTTP/1.1\r\nA: b\n\r\n", b"GET"),
    (None, b"GET / HTTP/1.1\r\nA: b\r\n"),
])
def test_front_ends_a_head_where_http_server_does(head, rest):
    data = (head or b"") + rest
    found = HEAD_END.search(data)
    assert (found and data[:found.end()]) == head


@pytest.mark.parametrize("head,close", [
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\n\r\n", False),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nConnection: close\r\n\r\n",
     True),
    (b"GET /cluster-api/v1/printers HTTP/1.0\r\n\r\n", True),
    (b"GET /cluster-api/v1/printers HTTP/1.0\r\nConnection: Keep-Alive"
     b"\r\n\r\n", False),
])
def test_front_keeps_connections_as_http_server_does(head, close):
    assert FrontRequest.parse(head).close is close


@pytest.mark.parametrize("line,upload", [
    ("POST /cluster-api/v1/print_jobs/ HTTP/1.1\r\n", True),
    ("POST /cluster-api/v1/print_jobs HTTP/1.0\n", True),
    ("POST /cluster-api/v1/print_jobs/x HTTP/1.1\r\n", False),
    ("PUT /cluster-api/v1/print_jobs/ HTTP/1.1\r\n", False),
    ("POST /cluster-api/v1/materials HTTP/1.1\r\n", False),
])
def test_front_receives_only_uploads(line, upload):
    assert bool(UPLOAD_LINE.match(line + "Host: x\r\n\r\n")) is upload


def test_control_frames_round_trip_and_stop_at_a_cut():
    import socket
    a, b = socket.socketpair()
    sent = [("printers", b"[1]"), ("commit", b"1 0"), ("empty", b""),
            ("big", b"x" * 300000)]
    writer = threading.Thread(target=lambda: [send_frame(a, k, v)
                                              for k, v in sent])
    writer.start()
    reader = FrameReader(b)
    frames = reader.frames()
    got = [next(frames) for _ in sent]
    writer.join()
    assert got == sent
    assert not reader.pending()
    send_frame(a, "more", b"1")
    assert reader.pending() and next(frames) == ("more", b"1")
    a.close()
    assert list(frames) == []
    b.close()
    # a frame cut short (the other process died) ends the stream
    c, d = socket.socketpair()
    c.sendall(FRAME.pack(100, 4) + b"half" + b"z" * 10)
    c.close()
    assert list(FrameReader(d).frames()) == []
    d.close()


PETG = {"extruder": 0, "guid": "1cbfaeb3-1906-4b26-b2e7-6f777a8c197a",
        "brand": "Generic", "material": "PETG", "color": "Generic",
        "name": "PETG"}


def test_griffin_header_materials():
    head = gcode_comment_lines(
        b";FLAVOR:Griffin\n"
        b";EXTRUDER_TRAIN.0.MATERIAL.GUID:3EE70A86-77d8-4b87-8005-e4a1bc57d2ce"
        b"\r\n;EXTRUDER_TRAIN.0.NOZZLE.NAME:AA 0.4\n"
        b";EXTRUDER_TRAIN.1.NOZZLE.NAME:BB 0.4 \n"
        b";EXTRUDER_TRAIN.1.MATERIAL.GUID:not a guid\n"
        b";EXTRUDER_TRAIN.2.MATERIAL.GUID:\n"
        b";EXTRUDER_TRAIN.99.MATERIAL.GUID:abc\nG1 X1\n")
    assert parse_gcode_metadata(head, b"")["materials"] == [
        {"extruder": 0, "guid": "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce",
         "print_core_id": "AA 0.4"},
        {"extruder": 1, "print_core_id": "BB 0.4"}]
    # Cura's Marlin header names no material
    marlin = b";FLAVOR:Marlin\n;TIME:60\n;Filament used: 1m\nG1 X1\n"
    assert parse_gcode_metadata(marlin, b"")["materials"] == []
    assert valid_job_materials(
        parse_gcode_metadata(head, b"")["materials"])


HOUSE = {"extruder": 0, "guid": "0b1c7e2a-5f7c-4d57-a9b4-2c9d7a4b1e01",
         "brand": "House", "material": "PETG", "color": "Teal",
         "color_code": "#008080"}


@pytest.mark.parametrize("wanted,loaded,differs", [
    (PETG, None, False),                             # nothing known
    (PETG, {"material": "empty"}, False),            # nothing to swap
    (PETG, {"guid": PETG["guid"].upper()}, False),
    (PETG, {"guid": "506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9"}, True),
    (PETG, {"material": "petg"}, False),
    (PETG, {"material": "PLA"}, True),
    # a Generic profile is any brand's, in any colour
    (PETG, {"material": "PETG", "brand": "Acme", "color": "red"}, False),
    (HOUSE, {"material": "PETG", "brand": "Acme"}, True),
    (HOUSE, {"material": "PETG", "brand": "house", "color": "#008080"},
     False),
    (HOUSE, {"material": "PETG", "color": "teal"}, False),
    (HOUSE, {"material": "PETG", "color": "red"}, True),
])
def test_material_differs(wanted, loaded, differs):
    assert material_differs(wanted, loaded) is differs
    # a job that names only a GUID is compared by GUID only
    assert material_differs({"extruder": 0, "guid": wanted["guid"]},
                               loaded) is bool(differs and "guid" in loaded)


def test_job_materials_named_from_the_ufp_then_the_store(tmp_path):
    m = MaterialStore(str(tmp_path / "m"))
    m.add("house.xml.fdm_material", (MATERIAL % (GUID, 1)).encode())
    wanted = [{"extruder": 0, "guid": PETG["guid"]},
              {"extruder": 1, "guid": GUID},
              {"extruder": 2, "guid": "unknown"}]
    named = m.name_job_materials(wanted, {PETG["guid"]: MaterialStore.parse(
        (MATERIAL % (PETG["guid"], 2)).encode())})
    assert [e.get("name") for e in named] == ["Red PLA", "Red PLA", None]
    assert named[2] == {"extruder": 2, "guid": "unknown"}
    assert valid_job_materials(named)


def test_lifecycle_holds_a_job_until_forced_or_loaded(tmp_path, klipper):
    loaded = LoadedMaterials(str(tmp_path / "loaded.json"),
                                [("extruder", {"material": "PLA"})])
    def changes(job):
        return [] if job.force else loaded.changes(job.materials)
    for auto_start_next in (False, True):
        store = JobStore(str(tmp_path / "q.json"), 5, auto_start_next)
        life = JobLifecycle(klipper, store, lambda job: None, changes)
        done = Job(name="done", filename="done.gcode")
        store.add(done)
        klipper.follow(life)
        klipper.finish()
        klipper.follow(life)
        if not auto_start_next:
            life.plate_cleared()
        a = Job(name="a", filename="a.gcode", materials=[PETG])
        b = Job(name="b", filename="b.gcode", materials=[PETG])
        store.add(a)
        store.add(b)
        klipper.follow(life)
        klipper.follow(life)
        # held: not started, and the job Cura's card shows (alone)
        assert a.status == "queued" and store.held is a
        assert klipper.filename == "done.gcode"
        assert store.printer_jobs() == ([a], [done, b] if store.current
                                        else [b])
        assert store.status_cache["held_job"]["name"] == "a"
        life.change(NoCall, store.set_force, a.uuid, True)
        klipper.run_callbacks()
        assert a.status == "printing" and store.printer_jobs()[0] == [a]
        klipper.finish()
        klipper.follow(life)
        life.plate_cleared()
        klipper.follow(life)
        assert b.status == "queued" and store.held is b
        loaded.set("extruder", {"material": "PETG"})
        klipper.follow(life)
        assert b.status == "printing" and store.held is None
        klipper.finish()
        klipper.follow(life)
        life.plate_cleared()
        loaded.set("extruder", {"material": "PLA"})


def test_finished_at_is_iso_and_old_epochs_convert(tmp_path):
    path = tmp_path / "queue.json"
    path.write_text(json.dumps({"history": [dict(
        GOOD, status="finished", finished_at=1764410400.5)]}))
    s = JobStore(str(path), 5, False)
    assert s.history[0].finished_at == "2025-11-29T10:00:00.000000Z"
    job = Job(name="x", filename="x.gcode")
    s.end(job, "wait_cleanup")
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.000000Z$",
                    job.finished_at)
    assert len(job.finished_at) == len(job.created_at)


@pytest.mark.parametrize("given, shown", [
    ("Würfel – 测试 ✓.gcode", "Würfel – 测试 ✓"),
    ("Wu\u0308rfel.ufp", "Würfel"),                 # NFD from macOS: NFC
    ("a\tb\nc\x00d\x1b[0m\u202e\u2028e.gcode.gz", "a b cd[0m e"),
    ("👩\u200d🔧 fix.g", "👩\u200d🔧 fix"),         # the joiner stays
    ("../../dir/C:\\x\\ שלום.gco", "שלום"),
    ("  spaced  .gcode", "spaced"),
    ("é" * 300 + ".gcode", "é" * 200),
])
def test_job_name_is_the_users(given, shown):
    assert job_name(given) == shown
    assert SAVED_JOB_FIELDS["name"](shown)


def test_label_text_takes_anything():
    assert label_text(None, 10) == "" and label_text(5, 10) == ""
    assert label_text("ab\udcff\u200d", 10) == "ab"
    assert label_text("x" * 20, 10) == "x" * 10


class FakeUpload:
    def __init__(self, intake):
        self.intake, self.filename = intake, "part.gcode"
        self.length = self.received = 0


def gcode_output(tmp_path, covered=lambda: 1 << 40):
    import io
    intake = FileIntake(str(tmp_path), 1 << 30)
    out = io.BytesIO()
    return GcodeOutput(out, FakeUpload(intake), covered), out


@pytest.mark.parametrize("data, why", [
    (b"GCDE\x01\x00\x00\x00\x01\x00", "binary G-code (.bgcode)"),
    (b"GCDE", "binary G-code (.bgcode)"),
    (b"G28\nG1 X1\x00", "byte 0x00 at offset 9"),
    (b"\x1b[2J", "byte 0x1b at offset 0"),
    (b";\xb0C\n", "not UTF-8 text"),
    (b";\xe6\xb5", "not UTF-8 text"),        # cut in the middle of a letter
])
def test_gcode_output_refuses_binary(tmp_path, data, why):
    gcode, out = gcode_output(tmp_path)
    with pytest.raises(Unsupported) as e:
        for i in range(len(data)):      # byte by byte: found all the same
            gcode.write(memoryview(data)[i:i + 1])
        gcode.close()
    assert why in e.value.message and "text G-code" in e.value.message


def test_gcode_output_passes_text(tmp_path):
    text = ";Würfel – 测试\r\n\tG1 X1\f\x1a".encode()
    gcode, out = gcode_output(tmp_path)
    for i in range(len(text)):
        gcode.write(text[i:i + 1])
    gcode.close()
    assert out.getvalue() == text
    # only the start is looked at
    gcode, out = gcode_output(tmp_path)
    gcode.write(b"G1\n" * (TEXT_CHECK_BYTES // 3 + 1))
    gcode.write(b"\x00")
    gcode.close()


def test_gcode_output_keeps_the_margin(tmp_path, monkeypatch):
    MiB = 1 << 20
    free = [40 * MiB]

    fake_statvfs(monkeypatch, free)
    covered = [2 * MiB]
    gcode, out = gcode_output(tmp_path, lambda: covered[0])
    gcode.upload.intake.in_flight.add(gcode.upload)
    chunk = b"G1 X1\n" * (MiB // 6)
    written = 0
    with pytest.raises(NoSpace) as e:
        while True:
            gcode.write(chunk)
            written += len(chunk)
            free[0] -= len(chunk) if written > covered[0] else 0
    assert "Disk full" in e.value.message
    assert free[0] >= SPACE_MARGIN
    assert free[0] - len(chunk) < SPACE_MARGIN
    # another upload's pending bytes are kept free as well
    other = FakeUpload(gcode.upload.intake)
    other.length = 10 * MiB
    gcode.upload.intake.in_flight.add(other)
    free[0] = 40 * MiB
    with pytest.raises(NoSpace):
        gcode.upload.intake.check_room(gcode.upload, 15 * MiB)
    gcode.upload.intake.check_room(gcode.upload, 14 * MiB)
