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


def griffin_header(print_time=3600):
    # What Cura writes for an Ultimaker S3 (libcharon checks these keys)
    return "\n".join([
        ";START_OF_HEADER", ";HEADER_VERSION:0.1", ";FLAVOR:Griffin",
        ";GENERATOR.NAME:Cura_SteamEngine", ";GENERATOR.VERSION:4.13.0",
        ";GENERATOR.BUILD_DATE:2022-01-01",
        ";TARGET_MACHINE.NAME:Ultimaker S3",
        ";EXTRUDER_TRAIN.0.INITIAL_TEMPERATURE:200",
        ";EXTRUDER_TRAIN.0.MATERIAL.VOLUME_USED:1234",
        ";EXTRUDER_TRAIN.0.MATERIAL.GUID:3ee70a86-77d8-4b87-8005-e4a1bc57d2ce",
        ";EXTRUDER_TRAIN.0.NOZZLE.DIAMETER:0.4",
        ";EXTRUDER_TRAIN.0.NOZZLE.NAME:AA 0.4",
        ";BUILD_PLATE.TYPE:glass", ";BUILD_PLATE.INITIAL_TEMPERATURE:60",
        ";PRINT.TIME:%d" % (print_time,), ";PRINT.GROUPS:1",
        ";PRINT.SIZE.MIN.X:9", ";PRINT.SIZE.MIN.Y:6", ";PRINT.SIZE.MIN.Z:0.27",
        ";PRINT.SIZE.MAX.X:173", ";PRINT.SIZE.MAX.Y:160",
        ";PRINT.SIZE.MAX.Z:58", ";END_OF_HEADER"]) + "\n"


def cura_gcode(print_time=3600, **kw):
    """G-code as Cura writes it for an Ultimaker (Griffin header)."""
    return (griffin_header(print_time) + moves(**kw)).encode()


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


def embedded_thumbnail(data, width=16, height=16):
    """PrusaSlicer/Cura-plugin style "; thumbnail begin" block."""
    import base64
    b64 = base64.b64encode(data).decode()
    lines = ["; %s" % (b64[i:i + 78],) for i in range(0, len(b64), 78)]
    return "\n".join(["; thumbnail begin %dx%d %d" % (width, height,
                                                       len(b64))]
                     + lines + ["; thumbnail end"]) + "\n"
