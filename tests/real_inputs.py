"""The print files real clients send, made with the real writers, for
every test that uploads: a UFP as Cura's UFPWriter writes it (libcharon,
Griffin header, its snapshot as /Metadata/thumbnail.png, the material
profiles of the Debian fdm-materials package under /Materials/), Cura 5's
Create Thumbnail G-code, PrusaSlicer and OrcaSlicer G-code with their
header and statistics comments and thumbnails of several sizes, JPG-only
thumbnails, .gcode.gz, Griffin G-code for one and two extruders and Cura's
Marlin-flavour header.  Images are encoded by Qt as Cura encodes them.

Each Sample says what the printer must make of it: the preview bytes
Cura is served, the time estimate and the material GUIDs per extruder.
Samples are built once per process (the UFPs take libcharon a moment).
"""
import functools
import gzip
import os
import tempfile

import cura_client
import gcode_samples as gs

MATERIALS_DIR = (cura_client.DEFAULT_CURA_ROOT
                 / "usr/share/cura/resources/materials")
# GUID -> the fdm-materials file Cura packs for it (its base_file)
PROFILE_FILES = {
    gs.ULTIMAKER_PLA_BLACK: "ultimaker_pla_black.xml.fdm_material",
    gs.GENERIC_PLA: "generic_pla.xml.fdm_material",
    gs.GENERIC_PETG: "generic_petg.xml.fdm_material",
}


def profile(guid):
    """(file name, bytes) of the Debian fdm-materials profile of guid."""
    name = PROFILE_FILES[guid]
    return name, (MATERIALS_DIR / name).read_bytes()


def profile_files():
    """Every fdm-materials profile Cura would sync: [(name, bytes)]."""
    return [(p.name, p.read_bytes())
            for p in sorted(MATERIALS_DIR.glob("*.xml.fdm_material"))]


class Sample:
    """One upload: its file name and bytes, and what the printer keeps of
    it (preview: the image bytes served, or None)."""
    def __init__(self, key, filename, data, preview, time_estimate,
                 guids=()):
        self.key = key
        self.filename = filename
        self.data = data
        self.preview = preview
        self.time_estimate = time_estimate
        self.guids = list(guids)

    def __repr__(self):
        return "Sample(%s)" % (self.key,)


def _ufp(gcode, thumbnail, guids):
    # Cura's UFPWriter through libcharon, into memory
    fd, path = tempfile.mkstemp(suffix=".ufp")
    os.close(fd)
    try:
        cura_client.make_ufp(path, gcode, thumbnail_png=thumbnail,
                             materials=[MATERIALS_DIR / PROFILE_FILES[g]
                                        for g in guids if g],
                             object_names=["cube.stl"])
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


@functools.lru_cache(maxsize=None)
def _samples(moves):
    body = gs.moves(moves, 0)
    # each sample its own images: a preview served for the wrong job shows
    def png(w, h, n):
        return gs.qt_image(w, h, (40 * n % 256, 90 + 13 * n, 200 - 17 * n),
                           "PNG")
    snapshots = [png(300, 300, n) for n in range(3)]
    small = png(16, 16, 3)
    wide = png(313, 173, 4)
    orca = png(300, 300, 5)
    c5 = png(300, 300, 6)
    jpg = gs.qt_image(220, 124, (200, 120, 60), "JPG")
    two = [gs.GENERIC_PETG, gs.ULTIMAKER_PLA_BLACK]
    prusa = gs.prusaslicer_gcode([(small, 16, 16), (wide, 313, 173)], body)
    zipped = png(313, 173, 7)
    out = [
        Sample("ufp_pla", "pla_cube.ufp", _ufp(
            gs.griffin_header(1800, gs.ULTIMAKER_PLA_BLACK) + body,
            snapshots[0], [gs.ULTIMAKER_PLA_BLACK]), snapshots[0], 1800,
            [gs.ULTIMAKER_PLA_BLACK]),
        Sample("ufp_petg", "petg_cube.ufp", _ufp(
            gs.griffin_header(1200, gs.GENERIC_PETG) + body, snapshots[1],
            [gs.GENERIC_PETG]), snapshots[1], 1200, [gs.GENERIC_PETG]),
        Sample("ufp_two", "two_cores.ufp", _ufp(
            gs.griffin_header(2400, two) + body, snapshots[2], two),
            snapshots[2], 2400, two),
        Sample("cura5_thumbnail", "cura5_thumb.gcode", (
            gs.cura_marlin_header(2345)
            + gs.embedded_thumbnail(small, 16, 16, sep=" ")
            + gs.embedded_thumbnail(c5, 300, 300, sep=" ") + body).encode(),
            c5, 2345),
        Sample("prusaslicer", "prusa_part.gcode", prusa.encode(), wide,
               3723),
        Sample("orcaslicer", "orca_part.gcode", gs.orcaslicer_gcode(
            [(small, 96, 96), (orca, 300, 300)], body).encode(), orca, 1681),
        Sample("jpg_only", "jpg_only.gcode", gs.prusaslicer_gcode(
            [(gs.qt_image(16, 16, (0, 0, 0), "JPG"), 16, 16),
             (jpg, 220, 124)], body, kind="_JPG").encode(), jpg, 3723),
        Sample("gcode_gz", "zipped.gcode.gz", gzip.compress(
            gs.prusaslicer_gcode([(small, 16, 16), (zipped, 313, 173)],
                                 body).encode()), zipped, 3723),
        Sample("griffin_one", "griffin_one.gcode", (
            gs.griffin_header(900, gs.GENERIC_PLA) + body).encode(), None,
            900, [gs.GENERIC_PLA]),
        Sample("griffin_two", "griffin_two.gcode", (
            gs.griffin_header(960, two) + body).encode(), None, 960, two),
        Sample("marlin", "marlin_part.gcode", (
            gs.cura_marlin_header(2345) + body).encode(), None, 2345),
    ]
    return {s.key: s for s in out}


KEYS = ("ufp_pla", "ufp_petg", "ufp_two", "cura5_thumbnail", "prusaslicer",
        "orcaslicer", "jpg_only", "gcode_gz", "griffin_one", "griffin_two",
        "marlin")


def samples(moves=20):
    """{key: Sample} of every form above; moves: G1 lines of each (no
    TEST_SLEEP: they print at once in the file-output Klippy)."""
    return _samples(moves)


def sample(key, moves=20):
    return samples(moves)[key]
