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
    # material None: no material line; a list: one GUID per extruder
    # (two for the S3's two print cores)
    materials = list(material) if isinstance(material, (list, tuple)) \
        else [material]
    lines = [
        ";START_OF_HEADER", ";HEADER_VERSION:0.1", ";FLAVOR:Griffin",
        ";GENERATOR.NAME:Cura_SteamEngine", ";GENERATOR.VERSION:4.13.0",
        ";GENERATOR.BUILD_DATE:2022-01-01",
        ";TARGET_MACHINE.NAME:Ultimaker S3"]
    for n, guid in enumerate(materials):
        lines += [
            ";EXTRUDER_TRAIN.%d.INITIAL_TEMPERATURE:200" % (n,),
            ";EXTRUDER_TRAIN.%d.MATERIAL.VOLUME_USED:1234" % (n,)]
        if guid:
            lines.append(";EXTRUDER_TRAIN.%d.MATERIAL.GUID:%s" % (n, guid))
        lines += [
            ";EXTRUDER_TRAIN.%d.NOZZLE.DIAMETER:0.4" % (n,),
            ";EXTRUDER_TRAIN.%d.NOZZLE.NAME:%s" % (n, nozzle)]
    lines += [
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


def qt_image(width, height, rgb, kind):
    """A real image encoded by Qt as Cura does (its snapshot and its
    Create Thumbnail script save a QImage): kind "PNG" or "JPG"; a
    gradient over rgb, so the encoders have more than one colour."""
    from PyQt5.QtCore import QBuffer, QByteArray, QIODevice
    from PyQt5.QtGui import QColor, QImage
    image = QImage(width, height, QImage.Format_RGB32)
    image.fill(QColor(*rgb))
    for x in range(width):
        shade = QColor(*[(c + 200 * x // max(width, 1)) % 256 for c in rgb])
        for y in range(0, height, 2):
            image.setPixelColor(x, y, shade)
    data = QByteArray()
    buf = QBuffer(data)
    buf.open(QIODevice.WriteOnly)
    assert image.save(buf, kind)
    return bytes(data)


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


def cura_marlin_header(print_time=2345,
                       box=(90.1, 90.1, 0.2, 129.9, 129.9, 20)):
    # What Cura writes for a Marlin-flavour printer; box: the print's
    # min x, y, z, max x, y, z (mm)
    return "\n".join([
        ";FLAVOR:Marlin", ";TIME:%d" % (print_time,),
        ";Filament used: 1.23456m", ";Layer height: 0.2"] + [
        ";%s%s:%g" % (end, axis, value) for (end, axis), value in zip(
            [(e, a) for e in ("MIN", "MAX") for a in "XYZ"], box)] + [
        ";TARGET_MACHINE.NAME:Creality Ender-3",
        ";Generated with Cura_SteamEngine 5.6.0"]) + "\n"


def prusaslicer_gcode(thumbnails, body, print_time="1h 2m 3s",
                      kind="", version="2.7.1"):
    """G-code laid out as PrusaSlicer writes it: its "generated by" line,
    the thumbnail blocks (thumbnails: image bytes, width, height; kind
    "" for PNG, "_JPG" or "_QOI"), then the moves and its closing
    statistics and config comments."""
    parts = ["; generated by PrusaSlicer %s+linux-x64-GTK3 on 2026-11-30 at"
             " 10:22:31 UTC\n\n; \n\n" % (version,)]
    for data, w, h in thumbnails:
        parts.append(embedded_thumbnail(data, w, h, kind) + "; \n\n")
    parts += ["; external perimeters extrusion width = 0.45mm\n"
              "; perimeters extrusion width = 0.45mm\n"
              "M73 P0 R62\nM201 X1000 Y1000 Z200 E5000\n", body,
              "M73 P100 R0\n"
              "; filament used [mm] = 1234.56\n"
              "; filament used [cm3] = 2.97\n"
              "; filament used [g] = 3.68\n"
              "; filament cost = 0.09\n"
              "; total filament used [g] = 3.68\n"
              "; estimated printing time (normal mode) = %s\n"
              "; estimated printing time (silent mode) = %s\n"
              "; estimated first layer printing time (normal mode) = 2m 1s"
              "\n\n; prusaslicer_config = begin\n"
              "; filament_type = PETG\n; layer_height = 0.2\n"
              "; thumbnails = 16x16/PNG, 313x173/PNG\n"
              "; prusaslicer_config = end\n" % (print_time, print_time)]
    return "".join(parts)


def orcaslicer_gcode(thumbnails, body, print_time="28m 1s"):
    """G-code laid out as OrcaSlicer 2 writes it: header block, thumbnail
    block (PNG), config block, then the moves and its statistics."""
    parts = ["; HEADER_BLOCK_START\n"
             "; generated by OrcaSlicer 2.1.1 on 2026-11-30 at 10:22:31\n"
             "; total layer number: 50\n"
             "; model printing time: 21m 4s; total estimated time: %s\n"
             "; filament_density: 1.24\n; filament_diameter: 1.75\n"
             "; max_z_height: 10.00\n"
             "; HEADER_BLOCK_END\n\n; THUMBNAIL_BLOCK_START\n"
             % (print_time,)]
    for data, w, h in thumbnails:
        parts.append(embedded_thumbnail(data, w, h) + "; \n")
    parts += ["; THUMBNAIL_BLOCK_END\n\n; CONFIG_BLOCK_START\n"
              "; layer_height = 0.2\n; thumbnails = 96x96/PNG, 300x300/PNG"
              "\n; CONFIG_BLOCK_END\n\n; EXECUTABLE_BLOCK_START\n", body,
              "; EXECUTABLE_BLOCK_END\n"
              "; filament used [mm] = 987.65\n"
              "; filament used [cm3] = 2.38\n"
              "; filament used [g] = 2.95\n"
              "; total filament used [g] = 2.95\n"
              "; estimated printing time (normal mode) = %s\n"
              % (print_time,)]
    return "".join(parts)
