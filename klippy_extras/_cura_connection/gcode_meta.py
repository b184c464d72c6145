# G-code metadata: what a file's header and tail say.
#
# Print time, filament, thumbnails, the materials Cura sliced for, the
# space the print takes (and whether a printer reaches it), and image
# types.  Pure functions: any thread, either process.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import math
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


# The print's bounding box (mm), as CuraEngine writes it: after
# ";Layer height:" for Marlin-like flavours, in the Griffin header for
# Ultimaker's.  PrusaSlicer and Orca write none.
BOX_NUMBER = (rb"[ \t]*([-+]?\d{1,12}(?:\.\d{0,12})?(?:[eE][-+]?\d{1,3})?)"
              rb"[ \t\r]*$")
# (pattern, the texts its lines start with: the search begins at the
# first of them, found cheaply; most files have neither)
BOUNDS_PATTERNS = [
    (re.compile(rb"^;PRINT\.SIZE\.(MIN|MAX)\.([XYZ]):" + BOX_NUMBER, re.M),
     (b";PRINT.SIZE.",)),
    (re.compile(rb"^;(MIN|MAX)([XYZ]):" + BOX_NUMBER, re.M),
     (b";MIN", b";MAX")),
]
BOUNDS_KEYS = [(b"MIN", b"X"), (b"MIN", b"Y"), (b"MIN", b"Z"),
               (b"MAX", b"X"), (b"MAX", b"Y"), (b"MAX", b"Z")]
# A header value beyond this is no coordinate (CuraEngine writes its
# empty box's sentinels when nothing was sliced)
MAX_COORDINATE = 100000.


def parse_bounds(head):
    """[min_x, min_y, min_z, max_x, max_y, max_z] (floats, mm) from the
    header in head (comment lines), or None when it names no complete,
    sane box (a value that is not a finite number within
    MAX_COORDINATE, or a min above its max)."""
    for pattern, starts in BOUNDS_PATTERNS:
        found = {}
        at = [i for i in (head.find(t) for t in starts) if i >= 0]
        for m in pattern.finditer(head, min(at, default=len(head))):
            found.setdefault((m.group(1), m.group(2)), m.group(3))
            if len(found) == len(BOUNDS_KEYS):
                break
        if len(found) < len(BOUNDS_KEYS):
            continue
        try:
            return checked_bounds([float(found[k]) for k in BOUNDS_KEYS])
        except ValueError:
            return None
    return None


def checked_bounds(value):
    """value if it is a sane bounding box, as a list of six floats (min
    x, y, z, max x, y, z: each finite, within MAX_COORDINATE, no min above
    its max), else None.  For boxes from a header, and for metadata from
    the other process."""
    if not isinstance(value, (list, tuple)) or len(value) != 6 or any(
            isinstance(v, bool) or not isinstance(v, (int, float))
            for v in value):
        return None
    try:
        box = [float(v) for v in value]
    except OverflowError:
        return None     # (an int too big for a float)
    if not all(abs(v) <= MAX_COORDINATE for v in box) \
            or any(box[i] > box[i + 3] for i in range(3)):
        return None     # (NaN and infinities fail the first test)
    return box


def _limit(values, axis):
    # A printer's limit on axis (0..2) as a finite float, or None
    try:
        v = float(values[axis])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return v if math.isfinite(v) else None


def fits(bounds, axis_minimum, axis_maximum, printer_name="the printer",
         margin=0.):
    """(True, "") when a print of bounds (parse_bounds' list, or None)
    lies within the printer's reach on X, Y and Z: axis_minimum and
    axis_maximum as Klipper's toolhead status gives them ([x, y, z, ...]).
    margin: mm the print may overstep the reach by (a negative margin
    demands that much room to spare).  What is not known fits: no
    bounds, no limits, or one axis without them (or with no reach, as
    kinematics none shows).  Else (False, reason),
    the reason naming every axis that does not fit."""
    if bounds is None or axis_minimum is None or axis_maximum is None:
        return True, ""
    misses = []
    for axis, letter in enumerate("XYZ"):
        low = _limit(axis_minimum, axis)
        high = _limit(axis_maximum, axis)
        if low is None or high is None or low >= high:
            continue    # (unknown, or no reach: kinematics none)
        need_low, need_high = bounds[axis], bounds[axis + 3]
        if need_low < low - margin or need_high > high + margin:
            misses.append("needs %s %.1f..%.1f mm, %s reaches %.1f..%.1f" % (
                letter, need_low, need_high, printer_name, low, high))
    if misses:
        return False, "; ".join(misses)
    return True, ""


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
    preview (best_thumbnail), the materials the header names
    (parse_job_materials) and the print's bounding box (parse_bounds)."""
    meta = {"time_estimate": 0, "filament_mm": 0., "thumbnail": None,
            "materials": parse_job_materials(head),
            "bounds": parse_bounds(head)}
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

