"""What a G-code file says about itself: time, filament, the thumbnail
Cura shows, the materials of a Griffin header; hostile headers stay cheap."""
import base64

import pytest

import gcode_samples

from _cura_connection.gcode_meta import (checked_bounds, fits,
                                         gcode_comment_lines,
                                         parse_gcode_metadata,
                                         read_gcode_metadata,
                                         valid_job_materials)


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


def test_read_gcode_metadata_reads_head_and_tail(tmp_path):
    p = tmp_path / "big.gcode"
    with open(p, "wb") as f:
        f.write(b";TIME:99\n")
        f.write(b"G1 X1\n" * 400000)        # 2.4 MB of moves
        f.write(b"; filament used [mm] = 12.5\n")
    meta = read_gcode_metadata(str(p))
    assert meta["time_estimate"] == 99 and meta["filament_mm"] == 12.5


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


def bounds_of(text):
    data = text.encode() if isinstance(text, str) else text
    return parse_gcode_metadata(gcode_comment_lines(data), b"")["bounds"]


def test_bounds_from_cura_headers():
    # CuraEngine's Marlin-flavour header, and its Griffin header
    assert bounds_of(gcode_samples.cura_marlin_header() + "G1 X1\n") == [
        90.1, 90.1, 0.2, 129.9, 129.9, 20.]
    assert bounds_of(gcode_samples.cura_gcode()) == [
        9., 6., 0.27, 173., 160., 58.]
    # a Griffin box may lie around the bed's centre; CRLF line ends
    griffin = gcode_samples.griffin_header().replace(
        ";PRINT.SIZE.MIN.X:9", ";PRINT.SIZE.MIN.X:-110.5").replace(
        "\n", "\r\n")
    assert bounds_of(griffin)[0] == -110.5
    # the box of a header only: a later comment does not move it
    assert bounds_of(gcode_samples.cura_marlin_header()
                     + "G1 X1\n;MINX:0\n")[0] == 90.1


def test_no_bounds_from_prusaslicer_and_orca():
    prusa = gcode_samples.prusaslicer_gcode([], "G1 X1\n")
    orca = gcode_samples.orcaslicer_gcode([], "G1 X1\n")
    assert bounds_of(prusa) is None and bounds_of(orca) is None
    assert bounds_of(";FLAVOR:Marlin\n;TIME:60\nG1 X1\n") is None


def marlin_box(minx="0", maxx="220"):
    return (";FLAVOR:Marlin\n;TIME:60\n;Layer height: 0.2\n;MINX:%s\n"
            ";MINY:0\n;MINZ:0.2\n;MAXX:%s\n;MAXY:220\n;MAXZ:10\n"
            % (minx, maxx))


@pytest.mark.parametrize("minx, maxx", [
    ("abc", "220"), ("nan", "220"), ("inf", "220"), ("0", "1e999"),
    # CuraEngine's empty box (nothing sliced): its sentinels
    ("9.22337e+15", "-9.22337e+15"),
    ("100001", "100002"), ("-100001", "0"),
    ("300", "220"),                 # min above max
    ("1" * 20, "220"), ("", "220"), ("0x10", "220"), ("1,5", "220"),
], ids=["word", "nan", "inf", "1e999", "empty box", "far", "far below",
        "min>max", "20 digits", "empty", "hex", "comma"])
def test_garbage_bounds_give_none(minx, maxx):
    assert bounds_of(marlin_box(minx, maxx)) is None


def test_bounds_need_all_six_values():
    assert bounds_of(marlin_box()) == [0., 0., 0.2, 220., 220., 10.]
    assert bounds_of(marlin_box().replace(";MAXZ:10\n", "")) is None
    assert bounds_of(marlin_box("-1.5e1", "2.2E2"))[::3] == [-15., 220.]


def test_read_gcode_metadata_reads_bounds(tmp_path):
    p = tmp_path / "cube.gcode"
    p.write_bytes(gcode_samples.cura_gcode(count=20))
    assert read_gcode_metadata(str(p))["bounds"] == [
        9., 6., 0.27, 173., 160., 58.]


@pytest.mark.parametrize("value, box", [
    ([0, 0, 0, 1, 2, 3], [0., 0., 0., 1., 2., 3.]),
    ((0.5, 0, 0, 1, 2, 3), [0.5, 0., 0., 1., 2., 3.]),
    (None, None), ([0, 0, 0, 1, 2], None), ("012345", None),
    ([0, 0, 0, 1, 2, "3"], None), ([0, 0, 0, 1, 2, True], None),
    ([0, 0, 0, 1, 2, float("nan")], None), ([0, 0, 0, 1, 2, 10 ** 400], None),
    ([0, 0, 5, 1, 2, 3], None), ([0, 0, 0, 1, 2, 100001], None),
])
def test_checked_bounds(value, box):
    # (what the front process passes on is checked again)
    assert checked_bounds(value) == box


# Klipper's toolhead status: [x, y, z, e]
VORON_MIN = [0., 0., -2., 0.]
VORON_MAX = [300., 300., 280., 0.]


def test_fits():
    assert fits([10, 10, 0.2, 290, 300, 100], VORON_MIN, VORON_MAX,
                "voron") == (True, "")
    assert fits([0, 0, 0, 320, 200, 10], VORON_MIN, VORON_MAX,
                "voron") == (
        False, "needs X 0.0..320.0 mm, voron reaches 0.0..300.0")
    ok, why = fits([-5, 0, 0, 100, 100, 290], VORON_MIN, VORON_MAX, "voron")
    assert not ok and why == ("needs X -5.0..100.0 mm, voron reaches "
                              "0.0..300.0; needs Z 0.0..290.0 mm, voron "
                              "reaches -2.0..280.0")
    # margin: how far a print may overstep (negative: room to spare)
    assert fits([0, 0, 0, 301, 10, 10], VORON_MIN, VORON_MAX, "voron",
                margin=1.)[0]
    assert not fits([0, 0, 0, 300, 10, 10], VORON_MIN, VORON_MAX, "voron",
                    margin=-1.)[0]


@pytest.mark.parametrize("bounds, low, high", [
    (None, VORON_MIN, VORON_MAX),
    ([0, 0, 0, 999, 999, 999], None, VORON_MAX),
    ([0, 0, 0, 999, 999, 999], VORON_MIN, None),
    ([0, 0, 0, 999, 999, 999], [], []),
    ([0, 0, 0, 999, 999, 999], [float("nan")] * 3, [float("inf")] * 3),
    # Klipper's kinematics none: a toolhead reaching 0..0 has no box
    ([0, 0, 0, 999, 999, 999], [0., 0., 0., 0.], [0., 0., 0., 0.]),
], ids=["no bounds", "no minimum", "no maximum", "empty", "not finite",
        "kinematics none"])
def test_fits_what_is_not_known(bounds, low, high):
    assert fits(bounds, low, high, "voron") == (True, "")
