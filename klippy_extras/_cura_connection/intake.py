# File intake: uploads into the G-code folder.
#
# Multipart bodies read in chunks, the free-space reservation, G-code,
# .gcode.gz and UFP (libcharon) unpacked into complete files only, the
# content checks, previews, the printer Cura's dialog names.  Request threads of either process (the
# front receives uploads too); FileIntake.lock guards the reservations.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import codecs
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import unicodedata
import zlib

from .errors import (
    BadInput, Conflict, CuraError, NoSpace, TooLarge, Unsupported,
    storage_error)
from .gcode_meta import (
    MAX_EXTRUDERS, PREVIEW_SUFFIXES, image_type, is_preview_image,
    read_gcode_metadata)
from .limits import MAX_MATERIAL_BODY, MAX_PREVIEW_SIZE, READ_CHUNK
from .materials import MATERIAL_SUFFIX, MaterialStore
from .names import job_name, safe_base_name, split_upload_name
from .storage import UPLOAD_TMP_PREFIX, write_file_atomic


UPLOAD_CHUNK = 1024 * 1024


# Cura's printer-selection dialog names the printer to print on in a text
# part after the file part: that printer's unique_name.  "Automatic"
# sends no such part.
PRINTER_NAME_FIELD = "require_printer_name"
MAX_PRINTER_NAME = 128


def required_printer_name(data):
    """The require_printer_name part's bytes as the name it routes to
    ("" for none): UTF-8, stripped, at most MAX_PRINTER_NAME characters,
    no control or format characters.  BadInput otherwise: a name cut or
    cleaned into another would send the job to the wrong printer."""
    try:
        name = bytes(data).decode("utf-8").strip()
    except UnicodeDecodeError:
        raise BadInput("%s is not UTF-8 text" % (PRINTER_NAME_FIELD,))
    if len(name) > MAX_PRINTER_NAME:
        raise BadInput("%s is longer than %d characters"
                       % (PRINTER_NAME_FIELD, MAX_PRINTER_NAME))
    if any(unicodedata.category(c) in ("Cc", "Cf") for c in name):
        raise BadInput("%s contains control characters"
                       % (PRINTER_NAME_FIELD,))
    return name


# Free space an upload must leave (Klipper's logs, Moonraker's database)
SPACE_MARGIN = 16 * 1024 * 1024


# An upload that unpacks in the front process asks Klippy's side for room
# beyond its reservation in steps of at least this many bytes
UNPACK_GRANT = 8 * 1024 * 1024
WRITEBACK_WINDOW = 8 * 1024 * 1024


class WritebackFile:
    """Writes a big file through to the disk while it arrives.

    Every WRITEBACK_WINDOW bytes, POSIX_FADV_DONTNEED starts the disk writes
    of the new pages (and drops the pages of the window before, written by
    now) from the page cache: the final fsync then has only the last window
    left to wait for, instead of the whole file after the last byte, and a
    big upload does not push Klipper's own pages out of a small host's RAM.
    """
    def __init__(self, f):
        self.f = f
        self.pos = self.kicked = self.dropped = 0

    def write(self, data):
        n = self.f.write(data)
        self.pos += n
        if self.pos - self.kicked >= WRITEBACK_WINDOW:
            self.f.flush()
            try:
                os.posix_fadvise(self.f.fileno(), self.dropped,
                                 self.pos - self.dropped,
                                 os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                pass
            self.dropped, self.kicked = self.kicked, self.pos
        return n


# Binary G-code (libbgcode's format, PrusaSlicer's .bgcode) starts with
# this.  Klipper reads text only: it would pause at the first line, and
# Cura would show "Paused" with no reason.
BGCODE_MAGIC = b"GCDE"


# How much of a G-code file is checked for binary content (all of a
# smaller file); every byte must be UTF-8
TEXT_CHECK_BYTES = 64 * 1024


# C0 control bytes no text G-code has (tabs, line ends, form feeds and
# DOS's end-of-file mark pass)
CONTROL_BYTE_RE = re.compile(rb"[\x00-\x08\x0e-\x19\x1b-\x1f]")
TEXT_ONLY = ("Klipper prints text G-code only: export the file as text"
             " G-code")


class GcodeOutput:
    """The G-code of an upload on its way to the disk (below the unpacking
    of a .gcode.gz or .ufp): refuses what does not start as text G-code
    or is not UTF-8 throughout (Unsupported), and has
    FileIntake.check_room() keep SPACE_MARGIN free for every byte beyond
    covered(), the bytes the upload's reservation covers so far."""
    def __init__(self, f, upload, covered):
        self.f = f
        self.upload = upload
        self.covered = covered
        self.written = 0
        self.head = b""
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def write(self, data):
        n = len(data)
        if self.written < TEXT_CHECK_BYTES:
            self._check(bytes(data[:TEXT_CHECK_BYTES - self.written]))
        # Klipper decodes every line: a byte that is not UTF-8 anywhere
        # would pause the print there
        self._decode(data)
        if self.written + n > self.covered():
            self.upload.intake.check_room(self.upload, n)
        self.f.write(data)
        self.written += n
        return n

    def close(self):
        # (a file that ends inside a UTF-8 sequence is not text)
        self._decode(b"", True)

    def _decode(self, data, final=False):
        try:
            self.decoder.decode(data, final)
        except UnicodeDecodeError as e:
            raise Unsupported("%s is not text G-code (not UTF-8 text near "
                              "byte %d); %s" % (self.upload.filename,
                                                self.written + e.start,
                                                TEXT_ONLY))

    def _check(self, data):
        name = self.upload.filename
        self.head = (self.head + data)[:len(BGCODE_MAGIC)]
        if self.head == BGCODE_MAGIC:
            raise Unsupported("%s is binary G-code (.bgcode); %s (turn off "
                              "binary G-code in the slicer's printer "
                              "settings)" % (name, TEXT_ONLY))
        m = CONTROL_BYTE_RE.search(data)
        if m is not None:
            raise Unsupported("%s is not text G-code (byte 0x%02x at offset"
                              " %d); %s" % (name, data[m.start()],
                                            self.written + m.start(),
                                            TEXT_ONLY))


class GzipWriter:
    """Decompresses a .gcode.gz upload while it streams to disk."""
    def __init__(self, f):
        self.f = f
        self.z = zlib.decompressobj(47)  # gzip or zlib header, auto
        self.fed = False    # the current member has begun

    def write(self, data):
        while data:
            self.fed = True
            self.f.write(self.z.decompress(data, READ_CHUNK))
            data = self.z.unconsumed_tail
            if self.z.eof:
                # a new gzip member may follow (concatenated .gz files)
                data = self.z.unused_data + data
                self.z = zlib.decompressobj(47)
                self.fed = False

    def close(self):
        self.f.write(self.z.flush())
        if self.fed and not self.z.eof:
            # a cut-off file would print half the part
            raise zlib.error("the file ends in the middle")


class MultipartReader:
    """python-multipart callbacks: collects each part's headers (bounded,
    they are kept in memory) and hands on the part's name and file name.
    Subclasses implement begin_part, on_part_data and on_part_end."""
    def __init__(self):
        self._headers = {}
        self._field = None
        self._header_bytes = 0

    def callbacks(self):
        return {n: getattr(self, n) for n in (
            "on_part_begin", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished", "on_part_data",
            "on_part_end")}

    def on_part_begin(self):
        self._headers = {}
        self._field = None
        self._header_bytes = 0

    def _count_header(self, n):
        self._header_bytes += n
        if self._header_bytes > 16384:
            raise BadInput("Multipart part headers are too long")

    def on_header_field(self, data, start, end):
        self._count_header(end - start)
        self._field = (self._field or b"") + data[start:end]

    def on_header_value(self, data, start, end):
        self._count_header(end - start)
        key = (self._field or b"").lower()
        self._headers[key] = self._headers.get(key, b"") + data[start:end]

    def on_header_end(self):
        self._field = None

    def on_headers_finished(self):
        from python_multipart.multipart import parse_options_header
        disp, params = parse_options_header(
            self._headers.get(b"content-disposition", b""))
        fname = params.get(b"filename")
        self.begin_part(params.get(b"name", b"").decode("utf-8", "replace"),
                        fname.decode("utf-8", "replace")
                        if fname is not None else None)


class Upload(MultipartReader):
    """One multipart upload streaming into a hidden temp file: length
    bytes declared, received of them read so far."""
    def __init__(self, intake, length):
        MultipartReader.__init__(self)
        self.intake = intake
        self.length = length
        self.received = 0
        self.fields = {}
        self.printer_name = ""
        self.filename = None
        self.kind = None
        self.tmp_path = None
        self.file = None
        self.writer = None
        self.gcode = None
        self._name = None
        self._in_file = False

    def begin_part(self, name, filename):
        self._name = name
        self._in_file = filename is not None
        if not self._in_file:
            if len(self.fields) >= 32:
                raise BadInput("Too many form fields")
            self.fields[self._name] = b""
            return
        if self.filename is not None:
            raise BadInput("Only one file per upload")
        self.filename = filename
        base, ext = split_upload_name(self.filename)
        if not ext:
            raise Unsupported("Unsupported file type %r: send .ufp, "
                              ".gcode or .gcode.gz" % (self.filename,))
        if ext == ".ufp" and self.intake.charon is None:
            raise Unsupported("UFP files need libcharon (python3-charon)"
                              " in Klipper's Python environment")
        self.kind = ext
        fd, self.tmp_path = tempfile.mkstemp(
            prefix=UPLOAD_TMP_PREFIX, suffix=".part", dir=self.intake.gcodes)
        os.fchmod(fd, 0o644)
        self.file = os.fdopen(fd, "wb")
        # A .ufp is read back at once and deleted: it stays in the cache
        if ext == ".ufp":
            self.writer = self.file
            return
        # (what the body holds so far is reserved: no longer pending)
        self.gcode = GcodeOutput(WritebackFile(self.file), self,
                                 lambda: self.received)
        self.writer = self.gcode
        if ext == ".gcode.gz":
            self.writer = GzipWriter(self.writer)

    def on_part_data(self, data, start, end):
        if self._in_file:
            self.writer.write(memoryview(data)[start:end])
            return
        value = self.fields[self._name] + data[start:end]
        if len(value) > 4096:
            raise BadInput("Form field %s is too long" % (self._name,))
        self.fields[self._name] = value

    def on_part_end(self):
        if not self._in_file and self._name == PRINTER_NAME_FIELD:
            # (checked as it ends: before a file that follows is read)
            self.printer_name = required_printer_name(self.fields[self._name])
        if self._in_file and self.file is not None:
            if isinstance(self.writer, GzipWriter):
                self.writer.close()
            if self.gcode is not None:
                self.gcode.close()
            self.file.flush()
            if self.kind != ".ufp":
                # the .ufp is a scratch file: only its G-code must be durable
                os.fsync(self.file.fileno())
            self.file.close()
            self.file = None
        self._in_file = False

    def discard(self):
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tmp_path is not None:
            try:
                os.unlink(self.tmp_path)
            except OSError:
                pass
            self.tmp_path = None


class FileIntake:
    """Turns uploads into .gcode files (plus thumbnails) in the gcodes dir.
    Errors: BadInput, Unsupported, TooLarge, Conflict, NoSpace and
    StorageError (naming the path); nothing half-written is kept."""
    def __init__(self, gcodes, max_upload_size):
        self.gcodes = gcodes
        self.thumbs = os.path.join(gcodes, ".thumbs")
        self.max_upload_size = max_upload_size
        self.lock = threading.Lock()
        self.in_flight = set()   # admitted Uploads, until end()
        try:
            import Charon.VirtualFile
            import Charon.OpenMode
            self.charon = Charon
        except ImportError:
            logging.warning("cura_connection: libcharon (python3-charon) is "
                            "not importable; UFP uploads are refused")
            self.charon = None

    def begin(self, length, queued=lambda: 0, max_queue=None):
        """Admit an upload whose body is length bytes, before any of it is
        read: returns its Upload, to pass to receive() and then end().
        It needs room in the queue (queued() -> jobs waiting, called under
        the lock; each upload in flight counts as one more) and free disk
        space for length bytes plus what the uploads in flight still have
        to write.  Raises TooLarge, Conflict (queue full), NoSpace or
        StorageError (the folder is missing...)."""
        if length > self.max_upload_size:
            raise TooLarge("Upload of %d MiB is larger than max_upload_size"
                           " (%d MiB)" % (length >> 20,
                                          self.max_upload_size >> 20))
        with self.lock:
            waiting = queued() + len(self.in_flight)
            if max_queue is not None and waiting >= max_queue:
                raise Conflict("The print queue is full: %d jobs waiting or"
                               " arriving (max_queue: %d)"
                               % (waiting, max_queue))
            try:
                st = os.statvfs(self.gcodes)
            except OSError as e:
                raise storage_error(e, self.gcodes)
            free = st.f_bavail * st.f_frsize
            pending = sum(u.length - u.received for u in self.in_flight)
            if length + pending + SPACE_MARGIN > free:
                raise NoSpace("Not enough free disk space in %s: %d MiB "
                              "free, %d MiB needed (%d MiB of it for uploads"
                              " in progress)" % (
                                  self.gcodes, free >> 20,
                                  (length + pending + SPACE_MARGIN) >> 20,
                                  pending >> 20))
            upload = Upload(self, length)
            self.in_flight.add(upload)
            return upload

    def received(self, upload, n):
        # n more bytes of the body read (what is still to be written of
        # it stays reserved for it)
        upload.received += n

    def check_room(self, upload, n):
        """NoSpace unless n more bytes of upload's G-code, beyond what its
        reservation covers (it unpacks to more), leave SPACE_MARGIN free
        beside what the other uploads in flight still have to write."""
        with self.lock:
            try:
                st = os.statvfs(self.gcodes)
            except OSError as e:
                raise storage_error(e, self.gcodes)
            pending = sum(u.length - u.received for u in self.in_flight
                          if u is not upload)
        if n + pending + SPACE_MARGIN > st.f_bavail * st.f_frsize:
            raise NoSpace("Disk full (%s): %s unpacks to more than the free"
                          " space allows (%d MiB must stay free)" % (
                              self.gcodes, upload.filename,
                              SPACE_MARGIN >> 20))

    def end(self, upload):
        """Release what begin() reserved; removes what is left of an
        upload that did not finish."""
        upload.discard()
        with self.lock:
            self.in_flight.discard(upload)

    def receive(self, upload, read_into, boundary):
        """Read the multipart body of an admitted upload with
        read_into(buffer) -> byte count; returns (gcode name, metadata)
        once the G-code is in place."""
        from python_multipart.multipart import MultipartParser
        length = upload.length
        parser = MultipartParser(boundary, upload.callbacks())
        # One buffer, parsed in place: the parser hands each byte to the
        # callbacks, which write or copy it, before write() returns.
        buf = bytearray(UPLOAD_CHUNK)
        view = memoryview(buf)
        remaining = length
        try:
            while remaining:
                n = read_into(view[:min(remaining, UPLOAD_CHUNK)])
                if not n:
                    raise BadInput("Upload ended after %d of %d bytes"
                                   % (length - remaining, length))
                remaining -= n
                self.received(upload, n)
                parser.write(buf if n == UPLOAD_CHUNK else bytes(view[:n]))
            parser.finalize()
            if upload.tmp_path is None or upload.file is not None:
                raise BadInput("No complete file part in the upload")
            return self._finish(upload)
        except (ConnectionError, socket.timeout):
            upload.discard()
            raise       # the client's trouble: the HTTP layer answers
        except OSError as e:
            upload.discard()
            raise storage_error(e, self.gcodes)
        except Exception as e:
            upload.discard()
            if isinstance(e, CuraError):
                raise
            if e.__class__.__module__.startswith("python_multipart"):
                raise BadInput("Malformed multipart body: %s" % (e,))
            if isinstance(e, zlib.error):
                raise BadInput("Broken .gcode.gz file: %s" % (e,))
            raise

    def _finish(self, upload):
        """Unpack a UFP, read metadata, move the G-code into place."""
        thumbnail = None
        profiles = {}
        gcode_tmp = upload.tmp_path
        if upload.kind == ".ufp":
            gcode_tmp, thumbnail = self._unpack_ufp(upload)
            profiles = self._ufp_materials(upload.tmp_path)
            os.unlink(upload.tmp_path)
            upload.tmp_path = gcode_tmp
        meta = read_gcode_metadata(gcode_tmp)
        meta["material_profiles"] = profiles
        if thumbnail and not is_preview_image(thumbnail):
            thumbnail = None    # Cura would keep a blank preview for good
        thumbnail = thumbnail or meta["thumbnail"]
        meta["name"] = job_name(upload.filename)
        meta[PRINTER_NAME_FIELD] = upload.printer_name
        # room for _place's "-<n>.gcode": the file name stays safe whole
        base = safe_base_name(split_upload_name(upload.filename)[0],
                              max_bytes=200 - len("-9999.gcode"))
        final = self._place(gcode_tmp, base)
        upload.tmp_path = None
        name = os.path.basename(final)
        meta["preview"] = None
        if thumbnail:
            try:
                # (a file the reservation does not cover: the margin
                # stays free, or there is no preview)
                self.check_room(upload, len(thumbnail))
                meta["preview"] = self._store_thumbnail(name, thumbnail)
            except (OSError, NoSpace) as e:
                # a thumbnail is an extra: without it, no preview
                logging.warning("cura_connection: no preview for %s: %s",
                                name, e)
        return name, meta

    def _unpack_ufp(self, upload):
        # libcharon reads the package; fall back to plain zip reading for
        # packages whose G-code header it rejects (non-Griffin flavours).
        path = upload.tmp_path
        fd, gcode_tmp = tempfile.mkstemp(prefix=UPLOAD_TMP_PREFIX,
                                         suffix=".part", dir=self.gcodes)
        thumbnail = None
        os.fchmod(fd, 0o644)
        try:
            with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                try:
                    vf = self.charon.VirtualFile.VirtualFile()
                    # by MIME type: the temp file's name ends in .part
                    vf.openStream(src, "application/x-ufp",
                                  self.charon.OpenMode.OpenMode.ReadOnly)
                    try:
                        gcode = self._ufp_output(out, upload)
                        shutil.copyfileobj(vf.getStream("/3D/model.gcode"),
                                           gcode, READ_CHUNK)
                        gcode.close()
                        try:
                            thumbnail = vf.getStream("/Metadata/thumbnail.png"
                                                     ).read(MAX_PREVIEW_SIZE)
                        except (FileNotFoundError, KeyError):
                            pass
                    finally:
                        vf.close()
                except (FileNotFoundError, KeyError):
                    raise BadInput("The UFP file has no G-code")
                except Exception as e:
                    if isinstance(e, (CuraError, OSError)):
                        raise
                    # A G-code header libcharon rejects is not Ultimaker's
                    # (Marlin flavour from a custom definition): normal.
                    header = self.charon.filetypes.GCodeFile
                    if not isinstance(e, header.InvalidHeaderException):
                        logging.info("cura_connection: libcharon refused %s "
                                     "(%s); reading it as a zip", path, e)
                    out.seek(0)
                    out.truncate()
                    thumbnail = self._unpack_zip(
                        path, self._ufp_output(out, upload))
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            os.unlink(gcode_tmp)
            raise
        return gcode_tmp, thumbnail

    def _unpack_zip(self, path, gcode):
        import zipfile
        try:
            with zipfile.ZipFile(path) as z:
                names = {n.lstrip("/"): n for n in z.namelist()}
                if "3D/model.gcode" not in names:
                    raise BadInput("The UFP file has no G-code")
                with z.open(names["3D/model.gcode"]) as src:
                    shutil.copyfileobj(src, gcode, READ_CHUNK)
                gcode.close()
                thumb = names.get("Metadata/thumbnail.png")
                return z.read(thumb)[:MAX_PREVIEW_SIZE] if thumb else None
        except zipfile.BadZipFile as e:
            raise BadInput("Not a UFP (zip) file: %s" % (e,))

    @staticmethod
    def _ufp_output(out, upload):
        # The .ufp on disk took the upload's whole reservation: every byte
        # of its G-code needs room of its own.
        return GcodeOutput(WritebackFile(out), upload, lambda: 0)

    @staticmethod
    def _ufp_materials(path):
        # The material profiles Cura packs with the G-code: {guid: info}
        # (MaterialStore.parse); they name the GUIDs of its header.
        import zipfile
        profiles = {}
        try:
            with zipfile.ZipFile(path) as z:
                names = [n for n in z.namelist()
                         if n.lstrip("/").startswith("Materials/")
                         and n.endswith(MATERIAL_SUFFIX)]
                for name in names[:MAX_EXTRUDERS * 4]:
                    with z.open(name) as f:
                        data = f.read(MAX_MATERIAL_BODY + 1)
                    try:
                        info = MaterialStore.parse(data)
                    except CuraError:
                        continue
                    profiles[info["guid"].lower()] = info
        except (zipfile.BadZipFile, zlib.error, NotImplementedError,
                ValueError) as e:
            logging.info("cura_connection: no material profiles read from "
                         "the UFP: %s", e)
        return profiles

    def _place(self, tmp, base):
        # A free name, taken atomically: existing files (and the one being
        # printed) are never overwritten.
        for i in range(10000):
            name = "%s.gcode" % (base,) if not i else "%s-%d.gcode" % (base, i)
            final = os.path.join(self.gcodes, name)
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                # no hard links (vfat): reserve the name, then replace it
                try:
                    os.close(os.open(final, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                os.replace(tmp, final)
                return final
            os.unlink(tmp)
            return final
        raise Conflict("No free file name for %s" % (base,))

    def remove(self, filename, preview):
        """Delete a stored upload (G-code and preview) no job refers to."""
        for rel in (filename, preview):
            try:
                if rel:
                    os.unlink(os.path.join(self.gcodes, rel))
            except OSError:
                pass

    def _store_thumbnail(self, gcode_name, image):
        # Moonraker, Mainsail and Fluidd look for <name>.png in .thumbs/
        # (.jpg for a JPEG)
        os.makedirs(self.thumbs, exist_ok=True)
        ext = ".jpg" if image_type(image) == "image/jpeg" else ".png"
        rel = os.path.join(".thumbs", gcode_name[:-len(".gcode")] + ext)
        write_file_atomic(os.path.join(self.gcodes, rel), image)
        return rel

    def read_metadata(self, filename):
        # For prints started outside Cura: the slicer's estimate and a
        # thumbnail Moonraker may have extracted.
        meta = {"time_estimate": 0, "preview": None, "materials": [],
                "bounds": None}
        path = os.path.join(self.gcodes, filename)
        try:
            found = read_gcode_metadata(path)
        except OSError:
            return meta
        for key in ("time_estimate", "materials", "bounds"):
            meta[key] = found[key]
        dirname, name = os.path.split(filename)
        stem = os.path.splitext(name)[0]
        thumbs = os.path.join(self.gcodes, dirname, ".thumbs")
        try:
            found = [n for n in os.listdir(thumbs)
                     if n.startswith(stem) and n.endswith(PREVIEW_SUFFIXES)
                     and re.match(r"^(-\d+x\d+)?$", n[len(stem):-4])]
        except OSError:
            found = []
        if found:
            biggest = max(found, key=lambda n: os.path.getsize(
                os.path.join(thumbs, n)))
            meta["preview"] = os.path.join(dirname, ".thumbs", biggest)
        return meta

    def read_preview(self, rel):
        path = os.path.realpath(os.path.join(self.gcodes, rel))
        if not path.startswith(os.path.realpath(self.gcodes) + os.sep):
            return None
        try:
            with open(path, "rb") as f:
                return f.read(MAX_PREVIEW_SIZE)
        except OSError:
            return None


class SmallParts(MultipartReader):
    """A small multipart body (a material file) read into memory."""
    def __init__(self):
        MultipartReader.__init__(self)
        self.parts = []

    def begin_part(self, name, filename):
        self.parts.append({"name": name, "filename": filename, "data": b""})

    def on_part_data(self, data, start, end):
        self.parts[-1]["data"] += data[start:end]

    def on_part_end(self):
        pass


def parse_small_multipart(body, boundary):
    from python_multipart.multipart import MultipartParser
    reader = SmallParts()
    parser = MultipartParser(boundary, reader.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except CuraError:
        raise
    except Exception as e:
        raise BadInput("Malformed multipart body: %s" % (e,))
    return reader.parts
