# Instances: each Klippy's own state folder and identity.
#
# The per-instance defaults (KIAUH-style data folders), the lock that
# keeps two Klippys out of one state folder, the move of the old shared
# state, the printer uuid.  Config load (reactor, before it runs).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import fcntl
import json
import logging
import os
import re
import shutil
import stat
import uuid

from .storage import (
    fsync_dir, is_temp_file, remove_stale_temp_files, write_file_atomic)


# The files of a state folder (data_path); before each Klippy had its own,
# the folder was <virtual_sdcard path>/.cura_connection, shared by every
# instance printing from that folder.
STATE_FILES = ("queue.json", "loaded_materials.json", "auth.json",
               "materials")
OLD_STATE_DIR = ".cura_connection"
STATE_LOCK = "lock"
STATE_MOVED = "moved.json"          # in the old place: where its state went
STATE_MOVING = ".cura-moving"       # the copy of the old state, while moving
PRINTER_UUID_FILE = "printer_uuid"


# KIAUH names the data folder of instance <x> printer_<x>_data (before
# data folders: the config folder ~/klipper_config/printer_<x>); others
# name theirs <x>_data (Moonraker's -d takes any folder)
KIAUH_DATA_RE = re.compile(r"(?:printer_)?(.+)_data\Z")
KIAUH_OLD_CONFIG_RE = re.compile(r"printer_(.+)\Z")


def instance_defaults(config_file):
    """(default state folder, name suffix) of the Klippy started with
    config_file.  In a Moonraker data folder the state goes beside config/
    (~/printer_data/config/printer.cfg -> ~/printer_data/cura_connection),
    else beside the config file (~/printer.cfg -> ~/.cura_connection).
    The suffix tells instances apart: "2" for KIAUH's printer_2_data (or
    klipper_config/printer_2), "voron" for voron_data, "" for a single
    printer_data; a config file
    not named printer.cfg adds its own name to both."""
    folder, filename = os.path.split(os.path.abspath(config_file))
    stem = os.path.splitext(filename)[0]
    own = [] if stem == "printer" else [stem]
    if os.path.basename(folder) == "config":
        data = os.path.dirname(folder)
        m = KIAUH_DATA_RE.match(os.path.basename(data))
        state = os.path.join(data, "-".join(["cura_connection"] + own))
        suffix = [m.group(1)] if m and m.group(1) != "printer" else []
    else:
        m = KIAUH_OLD_CONFIG_RE.match(os.path.basename(folder))
        state = os.path.join(folder, "-".join([OLD_STATE_DIR] + own))
        suffix = [m.group(1)] if m else []
    return state, "-".join(suffix + own)


def default_printer_name(host, suffix):
    """The host name (its first label), plus "-<suffix>" for a second
    instance: 1-63 bytes without dots, as the name option."""
    host = host.split(".")[0] or "klipper"
    if not suffix:
        return host[:63]
    suffix = re.sub(r"[^\w-]", "-", suffix)[:30]
    while len((host + "-" + suffix).encode("utf-8")) > 63:
        host = host[:-1]
    return host + "-" + suffix


def gcodes_owner(gcodes, config_file):
    """The config file of the other instance whose own G-code folder this
    one is (through a link: KIAUH's shared ~/printer_2_data/gcodes ->
    ~/printer_1_data/gcodes gives ~/printer_1_data/config/printer.cfg),
    or None.  The old shared state is that instance's to take."""
    real = os.path.realpath(gcodes)
    if os.path.basename(real) != "gcodes":
        return None
    other = os.path.join(os.path.dirname(real), "config", "printer.cfg")
    if not os.path.exists(other) or os.path.realpath(other) \
            == os.path.realpath(config_file):
        return None
    return other


class StateLock:
    """One Klippy per state folder: an flock on <folder>/lock, held while
    the module runs.  The kernel drops it when the process ends (kill -9
    too); the file names the holder, for the error of the one refused."""
    def __init__(self, folder, owner):
        self.path = os.path.join(folder, STATE_LOCK)
        self.owner = owner
        self.fd = None

    def acquire(self):
        """True once held; False while another process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o644)
        except OSError:
            # a read-only folder: its files can't change, but two
            # instances must not show them both
            fd = os.open(os.path.dirname(self.path),
                         os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({
                    "pid": os.getpid(), "config_file": self.owner}).encode()
                    + b"\n", 0)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return True

    def holder(self):
        # (read while the other one holds it: it wrote itself down)
        try:
            with open(self.path) as f:
                info = json.load(f)
            return "the Klipper instance of %s (pid %d)" % (
                info["config_file"], info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return "another Klipper instance"

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def state_in_use(folder):
    return any(os.path.lexists(os.path.join(folder, n))
               for n in STATE_FILES + (PRINTER_UUID_FILE,))


def read_moved_note(old):
    # {"moved_to", "config_file"} once the old state moved, else None
    try:
        with open(os.path.join(old, STATE_MOVED)) as f:
            note = json.load(f)
        return note if isinstance(note, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def move_old_state(old, new, owner, legacy_uuid):
    """Moves the state kept in the old default place into this instance's
    new state folder (locked by the caller) when that has never been used;
    True when this instance took it.  First a whole, synced copy in new,
    then renames within new, then a note in old naming new, then the old
    files go: a crash at any step loses nothing, and the next start
    finishes the move.  Of instances sharing the G-code folder (and none
    of them its owner: gcodes_owner) the first to start takes it, under
    the old folder's lock; the note keeps the others from ever taking it.
    The copy keeps the printer uuid Cura knows."""
    staging = os.path.join(new, STATE_MOVING)
    complete = os.path.join(staging, ".complete")
    old_lock = StateLock(old, owner)
    remove_stale_temp_files(old)    # (of a move that crashed)
    if not os.path.exists(complete):
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(old) or os.path.samefile(old, new):
            return False
        if state_in_use(new):
            if read_moved_note(old) is None and state_in_use(old):
                logging.warning("cura_connection: %s is in use: leaving "
                                "the state in %s as it is", new, old)
            return False
        if not old_lock.acquire():
            logging.warning("cura_connection: not taking the state in %s: "
                            "%s uses it; starting with no saved state",
                            old, old_lock.holder())
            return False
        try:
            note = read_moved_note(old)
            if note is not None:
                logging.info("cura_connection: the state in %s went to %s "
                             "(%s); starting with no saved state", old,
                             note.get("moved_to"), note.get("config_file"))
                return False
            _copy_state(old, staging, legacy_uuid)
        except BaseException:
            old_lock.release()
            raise
    elif os.path.isdir(old):
        old_lock.acquire()      # (finishing a move: this instance took it)
    try:
        for name in os.listdir(staging):
            if name != ".complete":
                os.replace(os.path.join(staging, name),
                           os.path.join(new, name))
        fsync_dir(new)
        if os.path.isdir(old):
            write_file_atomic(os.path.join(old, STATE_MOVED), json.dumps({
                "moved_to": new, "config_file": owner}).encode() + b"\n")
            for name in os.listdir(old):
                path = os.path.join(old, name)
                if name in (STATE_LOCK, STATE_MOVED) or is_temp_file(name):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        shutil.rmtree(staging)
    finally:
        old_lock.release()
    logging.info("cura_connection: moved the saved state from %s to %s",
                 old, new)
    return True


def _copy_state(old, staging, legacy_uuid):
    # Everything but the lock, the note and partial files, synced
    def copy(src, dst):
        shutil.copy2(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    os.makedirs(staging)
    for name in os.listdir(old):
        if name in (STATE_LOCK, STATE_MOVED) or is_temp_file(name):
            continue
        src, dst = os.path.join(old, name), os.path.join(staging, name)
        if os.path.isdir(src):
            shutil.copytree(src, dst, copy_function=copy)
            for dirpath, dirnames, filenames in os.walk(dst):
                fsync_dir(dirpath)
        else:
            copy(src, dst)
    if not os.path.exists(os.path.join(staging, PRINTER_UUID_FILE)):
        write_file_atomic(os.path.join(staging, PRINTER_UUID_FILE),
                          (legacy_uuid + "\n").encode())
    write_file_atomic(os.path.join(staging, ".complete"), b"")


def load_printer_uuid(data_path, legacy_uuid):
    """The printer uuid Cura is shown, kept in the state folder: the same
    over restarts and renames, and never the same for two instances
    whatever their names.  Made once: for a folder that holds an older
    version's state the uuid that version showed (uuid5 of the name),
    else a random one."""
    path = os.path.join(data_path, PRINTER_UUID_FILE)
    try:
        with open(path) as f:
            return str(uuid.UUID(f.read().strip()))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        logging.error("cura_connection: unusable %s (%s): making a new "
                      "printer uuid", path, e)
    had_state = any(os.path.lexists(os.path.join(data_path, n))
                    for n in STATE_FILES)
    value = legacy_uuid if had_state else str(uuid.uuid4())
    try:
        write_file_atomic(path, (value + "\n").encode())
    except OSError as e:
        # (the state cannot be saved either: the uploads say so)
        logging.error("cura_connection: cannot save the printer uuid in "
                      "%s: %s", path, e)
    return value
