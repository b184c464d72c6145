# Names: safe file names and clean labels.
#
# Pure functions: any thread, either process.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import os
import unicodedata

from .gcode_meta import PREVIEW_SUFFIXES


GCODE_EXTENSIONS = (".gcode", ".g", ".gco")
UPLOAD_EXTENSIONS = (".ufp", ".gcode.gz") + GCODE_EXTENSIONS


def safe_base_name(filename, default="print", max_bytes=200):
    # Only the base name, letters/digits and a few safe marks, no leading
    # dot: the result can't escape the folder, hide, or break a G-code line.
    # (max_bytes leaves room for "-<n>.gcode" in a file name's 255)
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    name = unicodedata.normalize("NFC", name)
    name = "".join(c if c.isalnum() or c in "._-()+" else "_" for c in name)
    name = name.lstrip(".")
    while len(name.encode("utf-8")) > max_bytes:
        name = name[:-1]
    return name or default


# The name a job is shown by (Cura, the web page, CURA_QUEUE) is the one
# the user gave, as on an Ultimaker; only the file needs a safe name.
MAX_JOB_NAME = 200


# Format characters that join emoji and letters stay (ZWNJ, ZWJ)
JOINERS = "\u200c\u200d"


def label_text(value, limit):
    """value (any type) as a one-line label of at most limit characters:
    other line breaks and spaces become spaces, control and format
    characters (direction overrides...) go."""
    text = unicodedata.normalize("NFC", value if isinstance(value, str)
                                 else "")
    out = []
    for c in text:
        cat = unicodedata.category(c)
        if c.isspace():
            out.append(" ")
        elif cat[0] != "C" or c in JOINERS:
            out.append(c)
    return "".join(out).strip()[:limit].rstrip(" " + JOINERS)


def job_name(filename):
    """The name a job uploaded as filename is shown by: the base name
    without the print file extension, as the user wrote it."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return label_text(split_upload_name(base)[0], MAX_JOB_NAME)


def safe_relative_path(path):
    # A file inside the gcodes folder as Klipper names it (its prints
    # started elsewhere may be in sub-folders, named with any text a
    # G-code line carries: no-break spaces, emoji joiners, tabs...):
    # relative, one line, no NUL, no empty, "." or ".." part -- it cannot
    # escape the folder.
    return isinstance(path, str) and 0 < len(path) <= 4096 \
        and not set(path) & set("\0\n\r") and all(
            part not in ("", ".", "..") for part in path.split("/"))


def preview_beside(preview, filename):
    # Where FileIntake keeps a job's preview (_store_thumbnail, or a
    # slicer's or Moonraker's for read_metadata): a .png or .jpg in the
    # .thumbs folder beside the G-code file
    folder, _, name = preview.rpartition("/")
    return safe_relative_path(preview) and name.endswith(PREVIEW_SUFFIXES) \
        and folder == os.path.join(os.path.dirname(filename), ".thumbs")


def split_upload_name(filename):
    # "benchy.gcode.gz" -> ("benchy", ".gcode.gz")
    lower = filename.lower()
    for ext in UPLOAD_EXTENSIONS:
        if lower.endswith(ext) and len(filename) > len(ext):
            return filename[:-len(ext)], ext
    return filename, ""


def clean_text(value, limit=64):
    # Client-chosen text shown in the console: printable, one line, short
    text = value if isinstance(value, str) else ""
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]
