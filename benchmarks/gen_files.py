"""Benchmark input files: realistic Cura G-code and UFP packages.

The G-code looks like CuraEngine output (header, ;LAYER: markers, ;TYPE:
sections, G0/G1 moves with 3-decimal coordinates and relative E) so that it
compresses like real sliced files (about 3-4x with deflate).  To be quick, a
file is assembled from 16 distinct ~1 MiB layer blocks made once per seed;
each block is larger than deflate's 32 KiB window, so the repetition does not
make a UFP compress better than a real one.

The UFP is written with libcharon (Debian's python3-charon), exactly the calls
Cura's UFPWriter (and tests/cura_client.make_ufp) makes, except that the
G-code member is streamed block by block instead of held in memory.
"""
import os
import random
import struct
import zlib

BLOCK_COUNT = 16
BLOCK_SIZE = 1 << 20
MATERIALS_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), ".cache", "cura", "root", "usr", "share",
    "cura", "resources", "materials")
MATERIAL = "ultimaker_pla_silver-metallic.xml.fdm_material"

GRIFFIN_HEADER = """\
;START_OF_HEADER
;HEADER_VERSION:0.1
;FLAVOR:Griffin
;GENERATOR.NAME:Cura_SteamEngine
;GENERATOR.VERSION:4.13.1
;GENERATOR.BUILD_DATE:2022-01-26
;TARGET_MACHINE.NAME:Ultimaker S3
;EXTRUDER_TRAIN.0.INITIAL_TEMPERATURE:200
;EXTRUDER_TRAIN.0.MATERIAL.VOLUME_USED:{volume}
;EXTRUDER_TRAIN.0.MATERIAL.GUID:0e01be8c-e425-4fb1-b4a3-b79f255f1db9
;EXTRUDER_TRAIN.0.NOZZLE.DIAMETER:0.4
;EXTRUDER_TRAIN.0.NOZZLE.NAME:AA 0.4
;BUILD_PLATE.TYPE:glass
;BUILD_PLATE.INITIAL_TEMPERATURE:60
;BUILD_VOLUME.TEMPERATURE:28
;PRINT.TIME:{time}
;PRINT.GROUPS:1
;PRINT.SIZE.MIN.X:9
;PRINT.SIZE.MIN.Y:6
;PRINT.SIZE.MIN.Z:0.27
;PRINT.SIZE.MAX.X:220.2
;PRINT.SIZE.MAX.Y:210.8
;PRINT.SIZE.MAX.Z:180.27
;SLICE_UUID:8f3e2b0a-4c1d-4f7e-9a55-2d7c1b9e6a10
;END_OF_HEADER
;Generated with Cura_SteamEngine 4.13.1
T0
M82
G92 E0
M104 S200
"""

MARLIN_HEADER = """\
;FLAVOR:Marlin
;TIME:{time}
;Filament used: {filament}m
;Layer height: 0.2
;MINX:9
;MINY:6
;MINZ:0.27
;MAXX:220.2
;MAXY:210.8
;MAXZ:180.27
;Generated with Cura_SteamEngine 4.13.1
M140 S60
M105
M104 S200
M105
M82 ;absolute extrusion mode
G92 E0
"""

# After the header both files switch to relative extrusion, so that blocks
# can follow each other in any order.
START = """\
M83 ;relative extrusion mode
G1 Z2.0 F3000
G1 X0.1 Y20 Z0.3 F5000.0
G1 X0.1 Y200.0 Z0.3 F1500.0 E15
;LAYER_COUNT:{layers}
"""
END = """\
;TIME_ELAPSED:{time}
G91
G1 E-2 F2700
G1 E-2 Z0.2 F2400
G1 X5 Y5 F3000
G1 Z10
G90
M106 S0
M104 S0
M140 S0
M84 X Y E
;End of Gcode
"""
TYPES = ("WALL-OUTER", "WALL-INNER", "SKIN", "FILL", "SUPPORT")


def _block(rnd):
    """About BLOCK_SIZE bytes of one layer's moves (no ;LAYER: line)."""
    out = []
    size = 0
    x, y = rnd.uniform(20, 200), rnd.uniform(20, 200)
    while size < BLOCK_SIZE:
        t = rnd.choice(TYPES)
        lines = [";TYPE:%s" % t, "G0 F6000 X%.3f Y%.3f" % (x, y)]
        feed = {"WALL-OUTER": 1500, "WALL-INNER": 2500}.get(t, 3000)
        lines.append("G1 F%d" % feed)
        for _ in range(rnd.randint(40, 400)):
            nx = min(230., max(5., x + rnd.uniform(-12, 12)))
            ny = min(230., max(5., y + rnd.uniform(-12, 12)))
            d = ((nx - x) ** 2 + (ny - y) ** 2) ** .5
            x, y = nx, ny
            lines.append("G1 X%.3f Y%.3f E%.5f" % (x, y, d * 0.0333))
        if rnd.random() < .3:
            lines.append("G1 F2700 E-6.5")
            lines.append("G0 F6000 X%.3f Y%.3f" % (x, y))
            lines.append("G1 F2700 E6.5")
        text = "\n".join(lines) + "\n"
        out.append(text)
        size += len(text)
    return "".join(out).encode()


_blocks = {}


def blocks(seed=1):
    if seed not in _blocks:
        rnd = random.Random(seed)
        _blocks[seed] = [_block(rnd) for _ in range(BLOCK_COUNT)]
    return _blocks[seed]


def gcode_chunks(size, flavor="marlin", seed=1):
    """Yield bytes chunks of a G-code file of about `size` bytes."""
    bl = blocks(seed)
    layers = max(1, size // BLOCK_SIZE)
    est_time = layers * 60
    if flavor == "griffin":
        head = GRIFFIN_HEADER.format(volume=layers * 3000, time=est_time)
    else:
        head = MARLIN_HEADER.format(time=est_time, filament=layers * 1.2)
    yield (head + START.format(layers=layers)).encode()
    rnd = random.Random(seed + 1000)
    z = 0.27
    for n in range(layers):
        z += 0.2
        yield (";LAYER:%d\nM106 S255\nG0 F6000 Z%.2f\n" % (n, z)).encode()
        yield bl[rnd.randrange(len(bl))]
    yield END.format(time=est_time).encode()


def write_gcode(path, size, flavor="marlin", seed=1):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for chunk in gcode_chunks(size, flavor, seed):
            f.write(chunk)
    os.replace(tmp, path)
    return os.path.getsize(path)


def png_thumbnail(w=300, h=300, seed=3):
    """A PNG like Cura's build-plate snapshot (grey plate, a coloured blob)."""
    rnd = random.Random(seed)
    rows = []
    for yy in range(h):
        row = bytearray(b"\x00")
        for xx in range(w):
            inside = (xx - w / 2) ** 2 + (yy - h / 2) ** 2 < (w / 3) ** 2
            v = rnd.randrange(8)
            row += bytes((40 + v, 160 + v, 220, 255)) if inside \
                else bytes((200 + v, 200 + v, 200 + v, 0))
        rows.append(bytes(row))
    raw = zlib.compress(b"".join(rows), 9)

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def compression_ratio(seed=1):
    data = b"".join(blocks(seed)[:4])
    return len(data) / len(zlib.compress(data, 6))


def write_ufp(path, gcode_size, seed=1):
    """A UFP as Cura's UFPWriter makes it, holding a Griffin G-code of about
    gcode_size bytes.  Returns (ufp size, G-code size)."""
    from Charon.OpenMode import OpenMode
    from Charon.VirtualFile import VirtualFile
    from Charon.filetypes.OpenPackagingConvention import OPCError
    tmp = path + ".tmp"
    with open(tmp, "wb") as out:
        archive = VirtualFile()
        archive.openStream(out, "application/x-ufp", OpenMode.WriteOnly)
        archive.setMetadata({"metadata/objects": [{"name": "benchy.stl"}]})
        archive.addContentType(extension="gcode", mime_type="text/x-gcode")
        stream = archive.getStream("/3D/model.gcode")
        gsize = 0
        for chunk in gcode_chunks(gcode_size, "griffin", seed):
            stream.write(chunk)
            gsize += len(chunk)
        archive.addRelation(
            virtual_path="/3D/model.gcode",
            relation_type="http://schemas.ultimaker.org/package/2018/"
                          "relationships/gcode")
        archive.addContentType(extension="png", mime_type="image/png")
        archive.getStream("/Metadata/thumbnail.png").write(png_thumbnail())
        archive.addRelation(
            virtual_path="/Metadata/thumbnail.png",
            relation_type="http://schemas.openxmlformats.org/package/2006/"
                          "relationships/metadata/thumbnail",
            origin="/3D/model.gcode")
        material = os.path.join(MATERIALS_DIR, MATERIAL)
        if os.path.exists(material):
            try:
                archive.addContentType(
                    extension="xml.fdm_material",
                    mime_type="application/x-ultimaker-material-profile")
            except OPCError:
                pass
            member = "/Materials/" + MATERIAL
            with open(material, "rb") as f:
                archive.getStream(member).write(f.read())
            archive.addRelation(
                virtual_path=member,
                relation_type="http://schemas.ultimaker.org/package/2018/"
                              "relationships/material",
                origin="/3D/model.gcode")
        archive.close()
    os.replace(tmp, path)
    return os.path.getsize(path), gsize


def ensure(cache_dir, log=print):
    """Make (once) the benchmark files; returns {key: path}."""
    os.makedirs(cache_dir, exist_ok=True)
    mib = 1 << 20
    files = {}
    for key, size in (("gcode50", 50 * mib), ("gcode200", 200 * mib),
                      ("gcode400", 400 * mib)):
        path = os.path.join(cache_dir, "bench-v1-%s.gcode" % key)
        if not os.path.exists(path):
            log("generating %s (%d MiB of G-code)" % (path, size // mib))
            write_gcode(path, size)
        files[key] = path
    path = os.path.join(cache_dir, "bench-v1-ufp200.ufp")
    if not os.path.exists(path):
        # Size the G-code so that the package itself is about 200 MiB
        gsize = int(200 * mib * compression_ratio())
        log("generating %s (%d MiB of G-code, deflated)"
            % (path, gsize // mib))
        write_ufp(path, gsize)
    files["ufp200"] = path
    return files


if __name__ == "__main__":
    import sys
    for k, p in ensure(sys.argv[1] if len(sys.argv) > 1 else ".").items():
        print(k, p, os.path.getsize(p))
