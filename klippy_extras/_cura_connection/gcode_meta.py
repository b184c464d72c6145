# G-code metadata: what a file's header and tail say.
#
# Print time, filament, thumbnails, the materials Cura sliced for, and
# image types.  Pure functions: any thread, either process.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import os
import re


# "; thumbnail begin 300x300 <len>" (PrusaSlicer, Orca...) or "300 300"
# (Cura 5's Create Thumbnail script); _JPG and _QOI blocks alike
THUMB_BEGIN_RE = re.compile(
    rb"^;[ \t]*thumbnail(?:_(PNG|JPG|QOI))? begin (\d{1,5})(?:x| )"
    rb"(\d{1,5})(?: \d{1,9})?[ \t\r]*$", re.M)
THUMB_END_RE = re.compile(rb"^;[ \t]*thumbnail(?:_(?:PNG|JPG|QOI))? end",
                          re.M)


# The preview Cura shows: the largest thumbnail up to this many pixels a
# side (more only costs transfer), else the smallest bigger one.
PREVIEW_MAX_SIDE = 1024


# The previews kept in .thumbs/ (Moonraker's names for them too)
PREVIEW_SUFFIXES = (".png", ".jpg")
DURATION_RE = re.compile(rb"(\d{1,9})\s*([dhms])")
SECONDS_RE = re.compile(rb"^\d{1,12}(?:\.\d+)?\Z")
MAX_DURATION = 10 * 365 * 86400     # more is no estimate
TIME_PATTERNS = [
    re.compile(rb"^;TIME:\s*(\d+(?:\.\d+)?)\s*$", re.M),         # Cura
    re.compile(rb"^;PRINT\.TIME:\s*(\d+)\s*$", re.M),            # Griffin
    re.compile(rb"^;\s*estimated printing time(?: \(normal mode\))?\s*"
               rb"=\s*(.+?)\s*$", re.M),                         # Prusa/Orca
]
FILAMENT_PATTERNS = [
    (re.compile(rb"^;Filament used:\s*([\d.]+)m", re.M), 1000.),  # Cura
    (re.compile(rb"^;\s*filament used \[mm\]\s*=\s*([\d.]+)", re.M), 1.),
]
HEADER_BYTES = 1024 * 1024
TAIL_BYTES = 256 * 1024


# What an Ultimaker (Griffin) header says each extruder needs.  Cura's
# Marlin-flavour header names no material: such files need nothing.
GRIFFIN_EXTRUDER_RE = re.compile(
    rb"^;EXTRUDER_TRAIN\.(\d{1,2})\.(MATERIAL\.GUID|NOZZLE\.NAME):[ \t]*"
    rb"([^\r\n]*?)[ \t\r]*$", re.M)
MAX_EXTRUDERS = 16


# A job's materials entry: extruder (int), guid, and where known
JOB_MATERIAL_KEYS = ("guid", "print_core_id", "brand", "material", "color",
                     "color_code", "name")
MAX_MATERIAL_TEXT = 100     # characters of each


def parse_job_materials(head):
    """[{"extruder": n, "guid": ..., "print_core_id": ...}] from the
    Griffin header in head (comment lines), by extruder; [] when it names
    none.  A GUID is kept as written (lower case): Cura's own profiles are
    not all well-formed UUIDs."""
    found = {}
    for m in GRIFFIN_EXTRUDER_RE.finditer(head):
        n, key = int(m.group(1)), m.group(2)
        value = m.group(3).decode("utf-8", "replace").strip()
        if n >= MAX_EXTRUDERS or not value or len(value) > 64 \
                or not value.isprintable():
            continue
        entry = found.setdefault(n, {"extruder": n})
        if key == b"NOZZLE.NAME":
            entry["print_core_id"] = value
        elif re.match(r"^[\w-]{1,64}$", value):
            entry["guid"] = value.lower()
    return [found[n] for n in sorted(found)]


def valid_job_materials(value):
    # A saved job's materials: a short list of entries as above
    if not isinstance(value, list) or len(value) > MAX_EXTRUDERS:
        return False
    seen = set()
    for entry in value:
        if not isinstance(entry, dict) or set(entry) - set(
                JOB_MATERIAL_KEYS) - {"extruder"}:
            return False
        n = entry.get("extruder")
        if not isinstance(n, int) or isinstance(n, bool) \
                or not 0 <= n < MAX_EXTRUDERS or n in seen:
            return False
        seen.add(n)
        if not all(isinstance(entry[k], str)
                   and len(entry[k]) <= MAX_MATERIAL_TEXT
                   for k in entry if k != "extruder"):
            return False
    return True


def parse_duration(text):
    # "2345", "2345.6" or "1d 2h 3m 4s" -> seconds; absurd values -> 0
    if SECONDS_RE.match(text):
        seconds = int(float(text))
    else:
        scale = {b"d": 86400, b"h": 3600, b"m": 60, b"s": 1}
        seconds = sum(int(n) * scale[u] for n, u in DURATION_RE.findall(text))
    return seconds if seconds <= MAX_DURATION else 0


def best_thumbnail(text):
    """The embedded thumbnail to preview, as PNG or JPEG bytes, or None.

    Cura shows previews with QImage.loadFromData, which decodes PNG and
    JPEG but not QOI: QOI blocks are skipped (a file with only QOI
    thumbnails gets no preview), and so is any block whose data is not a
    PNG or JPEG image.  Of the others, the largest up to PREVIEW_MAX_SIDE
    wins (PNG before JPG at the same size).  Linear in len(text): each
    block's end is searched once, from its begin."""
    blocks = []
    pos = 0
    while True:
        begin = THUMB_BEGIN_RE.search(text, pos)
        end = begin and THUMB_END_RE.search(text, begin.end())
        if end is None:
            break       # no block after this one can end either
        kind, w, h = begin.group(1), int(begin.group(2)), int(begin.group(3))
        if kind != b"QOI" and w and h:
            fits = max(w, h) <= PREVIEW_MAX_SIDE
            rank = (fits, w * h if fits else -w * h, kind != b"JPG")
            blocks.append((rank, begin.end(), end.start()))
        pos = end.end()
    import base64
    for rank, start, stop in sorted(blocks, reverse=True):
        data = b"".join(line[1:].strip() for line
                        in text[start:stop].split(b"\n")
                        if line.startswith(b";"))
        try:
            image = base64.b64decode(data, validate=True)
        except ValueError:
            continue
        if is_preview_image(image):
            return image
    return None


def parse_gcode_metadata(head, tail):
    """Slicer estimate (s), filament (mm), the embedded thumbnail to
    preview (best_thumbnail) and the materials the header names
    (parse_job_materials)."""
    meta = {"time_estimate": 0, "filament_mm": 0., "thumbnail": None,
            "materials": parse_job_materials(head)}
    for text in (head, tail):
        for pattern in TIME_PATTERNS:
            m = pattern.search(text)
            if m and not meta["time_estimate"]:
                meta["time_estimate"] = parse_duration(m.group(1))
        for pattern, scale in FILAMENT_PATTERNS:
            m = pattern.search(text)
            if m and not meta["filament_mm"]:
                try:
                    meta["filament_mm"] = float(m.group(1)) * scale
                except ValueError:
                    pass
    meta["thumbnail"] = best_thumbnail(head)
    return meta


def gcode_comment_lines(text):
    """The lines of text that start with ";", in order.  Every metadata
    pattern is anchored there, and on the moves of a 1 MiB head a pattern
    that finds nothing holds the GIL for up to 15 ms (which stalls the
    reactor that long); split() and find() pick the lines out in 1 ms."""
    parts = text.split(b"\n;")
    lines = [b";" + p[:p.find(b"\n")] if b"\n" in p else b";" + p
             for p in parts[1:]]
    if parts[0].startswith(b";"):
        first = parts[0]
        lines.insert(0, first[:first.find(b"\n")] if b"\n" in first
                     else first)
    return b"\n".join(lines) + b"\n" if lines else b""


def read_gcode_metadata(path):
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        tail = b""
        if size > HEADER_BYTES:
            f.seek(max(HEADER_BYTES, size - TAIL_BYTES))
            tail = f.read()
    return parse_gcode_metadata(gcode_comment_lines(head),
                                gcode_comment_lines(tail))


def image_type(data):
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return "application/octet-stream"


def is_preview_image(data):
    # What Cura's preview (a QImage) decodes and we serve: PNG and JPEG
    return image_type(data) != "application/octet-stream"


def fits(bounds, axis_minimum, axis_maximum, printer_name):
    # TEMPORARY (replaced by the intake branch's)
    if bounds is None or axis_minimum is None or axis_maximum is None:
        return True, ""
    for i, axis in enumerate("XYZ"):
        if bounds[i] < axis_minimum[i] or bounds[i + 3] > axis_maximum[i]:
            return False, "needs %s %g..%g mm, %s reaches %g..%g" % (
                axis, bounds[i], bounds[i + 3], printer_name,
                axis_minimum[i], axis_maximum[i])
    return True, ""
