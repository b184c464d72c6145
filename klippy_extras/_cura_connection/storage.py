# Storage: saved state files and the disk worker.
#
# SavedState (read at load, written whole and atomically), temp files
# that name their process, and DiskWorker: the thread that writes changed
# state and reads G-code metadata, so the reactor never touches the disk.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import collections
import json
import logging
import os
import re
import tempfile
import threading

from .threads import never_reactor


# Temp files (uploads, atomic writes) name their process, so a restart can
# tell which ones a crash or kill -9 left behind (remove_stale_temp_files).
UPLOAD_TMP_PREFIX = ".cura-upload-%d-" % (os.getpid(),)
WRITE_TMP_PREFIX = ".cura-tmp-%d-" % (os.getpid(),)


class SavedState:
    """State kept in one JSON file, changed in memory (reactor, HTTP
    threads) and written by the DiskWorker thread, or by an HTTP thread
    that must answer after the change is on disk.  Subclasses give
    state() and load their fields from read_file(), reporting each
    unusable entry with drop()."""
    file_mode = 0o644

    def __init__(self, path, lock=None):
        self.path = path
        self.lock = lock or threading.Lock()
        self.save_lock = threading.Lock()
        self.dirty = False
        self.version = 0         # counts changes (the front publishes them)
        self.on_change = None    # the writer's wake-up, set when it starts
        self.kept_aside = False

    def read_file(self):
        # The saved dict, or {}: a file that is not one is kept aside as
        # .bad (runs at config load, before the reactor serves anything)
        try:
            with open(self.path, "r") as f:
                data = json.load(f)
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return data
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as e:
            logging.error("cura_connection: cannot read %s: %s", self.path, e)
            self.kept_aside = True
            try:
                os.replace(self.path, self.path + ".bad")
            except OSError:
                pass
            return {}

    def discard(self, what, why):
        """One log line for a saved entry that cannot be used; the file as
        it was stays beside it as .bad, the cleaned one replaces it."""
        logging.warning("cura_connection: %s: dropping %s: %s",
                        self.path, what, why)
        self.dirty = True
        if self.kept_aside:
            return
        self.kept_aside = True
        try:
            # a second name for the old file: no data written here
            if os.path.lexists(self.path + ".bad"):
                os.unlink(self.path + ".bad")
            os.link(self.path, self.path + ".bad")
        except OSError as e:
            logging.error("cura_connection: cannot keep %s aside: %s",
                          self.path, e)

    def changed(self):
        """Caller holds self.lock: the writer thread saves soon."""
        self.dirty = True
        self.version += 1
        if self.on_change is not None:
            self.on_change()

    @never_reactor
    def save(self):
        """Not the reactor: write the file if it changed (or now)."""
        with self.save_lock:
            chunks = self.encode()
            try:
                write_file_atomic(self.path, chunks, self.file_mode)
            except BaseException:
                self.dirty = True   # the writer tries again (disk full...)
                raise

    def encode(self):
        """The file's content (a list of bytes), as it is now; marks the
        state saved.  A small state is encoded whole under the lock."""
        with self.lock:
            self.dirty = False
            return [json.dumps(self.state()).encode()]


def write_file_atomic(path, data, mode=0o644):
    # temp file, fsync, rename, fsync the directory: all or nothing
    dirname = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=WRITE_TMP_PREFIX, dir=dirname)
    os.fchmod(fd, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            # data: bytes, or a list of them
            f.writelines([data] if isinstance(data, bytes) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(dirname, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class DiskWorker:
    """Thread that writes changed state files (disk writes stay off the
    reactor) and reads the metadata of prints started outside Cura."""
    def __init__(self, states, reactor, read_metadata, set_metadata):
        self.states = list(states)
        self.reactor = reactor
        self.read_metadata = read_metadata
        self.set_metadata = set_metadata
        self.wanted = collections.deque()
        self.event = threading.Event()
        self.stopping = False
        for state in self.states:
            state.on_change = self.event.set
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="cura_connection writer")
        self.thread.start()

    def want_metadata(self, job):
        """Any thread: read job.filename's metadata soon."""
        self.wanted.append(job)
        self.event.set()

    def _run(self):
        failing = None
        while True:
            self.event.wait(1.)
            self.event.clear()
            stopping = self.stopping    # then one last pass, and out
            try:
                while self.wanted:
                    job = self.wanted.popleft()
                    meta = self.read_metadata(job.filename)
                    self.reactor.register_async_callback(
                        lambda e, job=job, meta=meta:
                        self.set_metadata(job, meta))
                for state in self.states:
                    if state.dirty:
                        state.save()
                failing = None
            except OSError as e:
                # Disk full, read-only...: the state stays dirty and is
                # saved when it can be; say so once, not every second.
                if str(e) != failing:
                    logging.error("cura_connection: cannot save: %s", e)
                failing = str(e)
            except Exception:
                logging.exception("cura_connection: state writer")
            if stopping:
                break

    def stop(self):
        """Save what changed (in the writer thread) and end it."""
        for state in self.states:
            state.on_change = None
        self.stopping = True
        self.event.set()
        self.thread.join(2.)


def process_running(pid):
    # (a zombie has ended: its parent just has not collected it yet)
    try:
        with open("/proc/%d/stat" % (pid,)) as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def remove_stale_temp_files(dirname, pid=None):
    # Partial files of this process (a RESTART ended them) or of one that
    # is gone (an earlier front process too); another Klippy sharing the
    # folder keeps its own.  With pid: only those of that ended process.
    try:
        names = os.listdir(dirname)
    except OSError:
        return
    for name in names:
        m = re.match(r"\.cura-(?:upload|tmp)-(\d+)-", name)
        if m is None or (pid is not None and int(m.group(1)) != pid) or (
                int(m.group(1)) != os.getpid()
                and process_running(int(m.group(1)))):
            continue
        try:
            os.unlink(os.path.join(dirname, name))
            logging.info("cura_connection: removed partial file %s", name)
        except OSError:
            pass


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temp_file(name):
    return name.startswith((".cura-tmp-", ".cura-upload-"))
