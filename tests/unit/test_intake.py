"""File intake on its own: space and queue slots reserved for uploads in
flight, .gcode.gz unpacking, text G-code only, the disk margin kept."""
import os

import pytest

import real_inputs

from _cura_connection.errors import (BadInput, Conflict, NoSpace, TooLarge,
                                     Unsupported, error_status)
from _cura_connection.intake import (FileIntake, GcodeOutput, GzipWriter,
                                     SPACE_MARGIN, TEXT_CHECK_BYTES)


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


TARGET = "require_printer_name"


@pytest.mark.parametrize("parts, name", [
    ({"after": {TARGET: "voron_2"}}, "voron_2"),     # where Cura puts it
    ({"fields": {TARGET: "voron_2"}}, "voron_2"),
    ({"after": {TARGET: " \tprinter two\r\n"}}, "printer two"),
    ({"after": {TARGET: "dr\u00fccker"}}, "dr\u00fccker"),
    ({"after": {TARGET: "x" * 128}}, "x" * 128),
    ({"after": {TARGET: ""}}, ""),
    ({}, ""),                                       # "Automatic"
], ids=["after file", "before file", "stripped", "utf-8", "128 chars",
        "empty", "absent"])
def test_upload_names_its_printer(tmp_path, parts, name):
    spy = real_inputs.MetaSpy(tmp_path)
    meta = spy.upload(**parts)
    assert meta[TARGET] == name
    assert meta["bounds"] == [90.1, 90.1, 0.2, 129.9, 129.9, 20.]
    assert spy.left() == ["marlin_part.gcode"]


@pytest.mark.parametrize("value, why", [
    ("x" * 129, "longer than 128"),
    ("voron\x1b[2J", "control"),
    ("voron\x00", "control"),
    ("vor\non", "control"),
    ("\u202enorov", "control"),        # a direction override
    (b"voron\xff", "UTF-8"),
], ids=["129 chars", "escape", "nul", "line break", "override", "latin-1"])
@pytest.mark.parametrize("where", ["after", "fields"])
def test_upload_with_a_bad_printer_name_is_refused(tmp_path, value, why,
                                                   where):
    spy = real_inputs.MetaSpy(tmp_path)
    with pytest.raises(BadInput) as e:
        spy.upload(**{where: {TARGET: value}})
    assert e.value.message.startswith(TARGET + " ") and why in \
        e.value.message
    assert error_status(e.value) == 400
    # nothing kept: no job, no file, no part file
    assert spy.metas == [] and spy.left() == []
    assert spy.api.store.queue == []


@pytest.mark.parametrize("key, bounds", [
    ("ufp_pla", [9., 6., 0.27, 173., 160., 58.]),   # libcharon's UFP
    ("griffin_one", [9., 6., 0.27, 173., 160., 58.]),
    ("cura5_thumbnail", [90.1, 90.1, 0.2, 129.9, 129.9, 20.]),
    ("gcode_gz", None), ("prusaslicer", None), ("orcaslicer", None),
])
def test_upload_bounds(tmp_path, key, bounds):
    spy = real_inputs.MetaSpy(tmp_path)
    meta = spy.upload(key)
    assert meta["bounds"] == bounds
    # the disk worker reads a file's metadata the same way
    name, = [n for n in spy.left() if n.endswith(".gcode")]
    assert spy.api.intake.read_metadata(name)["bounds"] == bounds


def test_front_passes_the_target_and_bounds_on(tmp_path):
    spy = real_inputs.MetaSpy(tmp_path)
    meta = real_inputs.front_upload(spy, after={TARGET: "voron_2"})
    assert meta[TARGET] == "voron_2"
    assert meta["bounds"] == [90.1, 90.1, 0.2, 129.9, 129.9, 20.]
    meta = real_inputs.front_upload(spy, "ufp_pla")
    assert meta[TARGET] == "" and meta["bounds"] == [
        9., 6., 0.27, 173., 160., 58.]
    assert real_inputs.front_upload(spy, "prusaslicer")["bounds"] is None
    with pytest.raises(BadInput):
        real_inputs.front_upload(spy, after={TARGET: "voron\x1b"})
