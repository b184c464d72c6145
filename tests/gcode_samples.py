"""Print files for the tests: G-code that lasts a while in file-output
Klippy (TEST_SLEEP from klippy_test_extras), Cura-style headers, and a
small real PNG for previews."""
import struct
import zlib


def moves(count=200, sleep_every=20, sleep_s=0.1):
    lines = ["G90", "M83", "G92 E0"]
    for i in range(count):
        lines.append("G1 X%.1f Y%.1f E0.05 F3000"
                     % (10 + i % 50, 10 + (i // 50) % 50))
        if sleep_every and (i + 1) % sleep_every == 0:
            lines.append("TEST_SLEEP S=%g" % (sleep_s,))
    return "\n".join(lines) + "\n"


# Material GUIDs of Cura's library (fdm_materials)
ULTIMAKER_PLA_BLACK = "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce"
GENERIC_PLA = "506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9"
GENERIC_PETG = "1cbfaeb3-1906-4b26-b2e7-6f777a8c197a"


def griffin_header(print_time=3600, material=ULTIMAKER_PLA_BLACK,
                   nozzle="AA 0.4"):
    # What Cura writes for an Ultimaker S3 (libcharon checks these keys);
    # material None: no material line
    lines = [
        ";START_OF_HEADER", ";HEADER_VERSION:0.1", ";FLAVOR:Griffin",
        ";GENERATOR.NAME:Cura_SteamEngine", ";GENERATOR.VERSION:4.13.0",
        ";GENERATOR.BUILD_DATE:2022-01-01",
        ";TARGET_MACHINE.NAME:Ultimaker S3",
        ";EXTRUDER_TRAIN.0.INITIAL_TEMPERATURE:200",
        ";EXTRUDER_TRAIN.0.MATERIAL.VOLUME_USED:1234"]
    if material:
        lines.append(";EXTRUDER_TRAIN.0.MATERIAL.GUID:%s" % (material,))
    lines += [
        ";EXTRUDER_TRAIN.0.NOZZLE.DIAMETER:0.4",
        ";EXTRUDER_TRAIN.0.NOZZLE.NAME:%s" % (nozzle,),
        ";BUILD_PLATE.TYPE:glass", ";BUILD_PLATE.INITIAL_TEMPERATURE:60",
        ";PRINT.TIME:%d" % (print_time,), ";PRINT.GROUPS:1",
        ";PRINT.SIZE.MIN.X:9", ";PRINT.SIZE.MIN.Y:6", ";PRINT.SIZE.MIN.Z:0.27",
        ";PRINT.SIZE.MAX.X:173", ";PRINT.SIZE.MAX.Y:160",
        ";PRINT.SIZE.MAX.Z:58", ";END_OF_HEADER"]
    return "\n".join(lines) + "\n"


def cura_gcode(print_time=3600, material=ULTIMAKER_PLA_BLACK, **kw):
    """G-code as Cura writes it for an Ultimaker (Griffin header), sliced
    for the material of that GUID."""
    return (griffin_header(print_time, material) + moves(**kw)).encode()


def png(width=16, height=16, rgb=(200, 40, 40)):
    """A real PNG image (stdlib only)."""
    raw = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                         0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def jpeg(width=16, height=16, rgb=(40, 200, 40)):
    """A real JPEG image, encoded by Qt (as Cura's own scripts do)."""
    from PyQt5.QtCore import QBuffer, QByteArray, QIODevice
    from PyQt5.QtGui import QColor, QImage
    image = QImage(width, height, QImage.Format_RGB32)
    image.fill(QColor(*rgb))
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.WriteOnly)
    assert image.save(buf, "JPG")
    return bytes(data)


def qoi(width=16, height=16, rgb=(40, 40, 200)):
    """A real QOI image (one colour: a pixel, then runs)."""
    out = [b"qoif", struct.pack(">IIBB", width, height, 3, 0),
           b"\xfe" + bytes(rgb)]
    left = width * height - 1
    while left:
        run = min(left, 62)
        out.append(bytes([0xc0 | (run - 1)]))
        left -= run
    return b"".join(out) + b"\x00" * 7 + b"\x01"


def embedded_thumbnail(data, width=16, height=16, kind="", sep="x"):
    """A "; thumbnail begin" block: kind "" (PNG), "_PNG", "_JPG" or "_QOI"
    as PrusaSlicer, OrcaSlicer and SuperSlicer write them; sep " " is the
    "300 300" form of Cura 5's Create Thumbnail script."""
    import base64
    b64 = base64.b64encode(data).decode()
    lines = ["; %s" % (b64[i:i + 78],) for i in range(0, len(b64), 78)]
    return "\n".join(["; thumbnail%s begin %d%s%d %d" % (
        kind, width, sep, height, len(b64))] + lines
        + ["; thumbnail%s end" % (kind,)]) + "\n"


def cura_marlin_header(print_time=2345):
    # What Cura writes for a Marlin-flavour printer
    return "\n".join([
        ";FLAVOR:Marlin", ";TIME:%d" % (print_time,),
        ";Filament used: 1.23456m", ";Layer height: 0.2",
        ";MINX:90.1", ";MINY:90.1", ";MINZ:0.2", ";MAXX:129.9",
        ";MAXY:129.9", ";MAXZ:20", ";TARGET_MACHINE.NAME:Creality Ender-3",
        ";Generated with Cura_SteamEngine 5.6.0"]) + "\n"
