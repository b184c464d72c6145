"""Several instances on one host, the logic on its own: each instance's
state folder and name from its config file, which instance owns a shared
gcodes folder, the state lock, the printer's UUID, and moving the old
shared state to one instance whatever step a crash interrupts."""
import json
import os
import shutil
import stat
import uuid

import pytest

from _cura_connection.instances import (StateLock, default_printer_name,
                                        gcodes_owner, instance_defaults,
                                        load_printer_uuid, move_old_state)


@pytest.mark.parametrize("config_file, state, suffix", [
    ("/home/pi/printer_data/config/printer.cfg",
     "/home/pi/printer_data/cura_connection", ""),
    ("/home/pi/printer_2_data/config/printer.cfg",
     "/home/pi/printer_2_data/cura_connection", "2"),
    ("/home/pi/printer_voron_data/config/printer.cfg",
     "/home/pi/printer_voron_data/cura_connection", "voron"),
    ("/home/pi/printer.cfg", "/home/pi/.cura_connection", ""),
    ("/home/pi/klipper_config/printer.cfg",
     "/home/pi/klipper_config/.cura_connection", ""),
    ("/home/pi/printer_data/config/ender.cfg",
     "/home/pi/printer_data/cura_connection-ender", "ender"),
    ("/home/pi/printer_2_data/config/ender.cfg",
     "/home/pi/printer_2_data/cura_connection-ender", "2-ender"),
    ("/home/pi/printer2.cfg", "/home/pi/.cura_connection-printer2",
     "printer2"),
    # KIAUH before data folders
    ("/home/pi/klipper_config/printer_2/printer.cfg",
     "/home/pi/klipper_config/printer_2/.cura_connection", "2"),
])
def test_instance_defaults(config_file, state, suffix):
    assert instance_defaults(config_file) == (state, suffix)


def test_instance_defaults_relative_to_the_working_folder(tmp_path,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert instance_defaults("printer.cfg") == (
        str(tmp_path / ".cura_connection"), "")


@pytest.mark.parametrize("host, suffix, name", [
    ("voron", "", "voron"),
    ("voron.lan", "", "voron"),
    ("voron", "2", "voron-2"),
    ("voron.local", "a.b c", "voron-a-b-c"),
    ("h" * 63, "", "h" * 63),
    ("h" * 63, "2", "h" * 61 + "-2"),
    ("h" * 63, "s" * 50, "h" * 32 + "-" + "s" * 30),
    ("", "2", "klipper-2"),
])
def test_default_printer_name(host, suffix, name):
    got = default_printer_name(host, suffix)
    assert got == name
    assert 1 <= len(got.encode()) <= 63 and "." not in got


def test_gcodes_owner(tmp_path):
    one, two = tmp_path / "printer_1_data", tmp_path / "printer_2_data"
    for d in (one, two):
        (d / "config").mkdir(parents=True)
        (d / "config" / "printer.cfg").write_text("")
    (one / "gcodes").mkdir()
    (two / "gcodes").symlink_to(one / "gcodes")
    cfg1, cfg2 = (str(d / "config" / "printer.cfg") for d in (one, two))
    assert gcodes_owner(str(one / "gcodes"), cfg1) is None
    assert gcodes_owner(str(two / "gcodes"), cfg2) == cfg1
    # a link to a folder of no instance, or to a folder in no data folder
    (tmp_path / "usb" / "gcodes").mkdir(parents=True)
    (tmp_path / "usb2").mkdir()
    (one / "gcodes").rmdir()
    (one / "gcodes").symlink_to(tmp_path / "usb" / "gcodes")
    assert gcodes_owner(str(one / "gcodes"), cfg1) is None
    (one / "gcodes").unlink()
    (one / "gcodes").symlink_to(tmp_path / "usb2")
    assert gcodes_owner(str(one / "gcodes"), cfg1) is None


def test_state_lock(tmp_path):
    a = StateLock(str(tmp_path), "/a/printer.cfg")
    b = StateLock(str(tmp_path), "/b/printer.cfg")
    assert a.acquire()
    assert not b.acquire()
    assert b.holder() == "the Klipper instance of /a/printer.cfg (pid %d)" \
        % (os.getpid(),)
    a.release()
    assert b.acquire()
    assert not a.acquire()
    b.release()
    with open(a.path, "w") as f:
        f.write("garbage")
    assert a.holder() == "another Klipper instance"


def test_printer_uuid(tmp_path):
    legacy = str(uuid.uuid5(uuid.NAMESPACE_DNS, "cura-connection.x"))
    fresh, used = tmp_path / "fresh", tmp_path / "used"
    fresh.mkdir()
    used.mkdir()
    (used / "queue.json").write_text("{}")
    one = load_printer_uuid(str(fresh), legacy)
    assert one != legacy and uuid.UUID(one)
    assert load_printer_uuid(str(fresh), legacy) == one
    assert load_printer_uuid(str(used), legacy) == legacy
    (fresh / "printer_uuid").write_text("not a uuid")
    two = load_printer_uuid(str(fresh), legacy)
    assert two not in (one, legacy)
    assert load_printer_uuid(str(fresh), legacy) == two


class Crash(BaseException):
    pass


def old_state(folder):
    os.makedirs(os.path.join(folder, "materials"))
    files = {"queue.json": b'{"queue": []}', "auth.json": b'{"keys": []}',
             "loaded_materials.json": b"{}", "queue.json.bad": b"[",
             "materials/a.xml.fdm_material": b"<a/>"}
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    os.chmod(os.path.join(folder, "auth.json"), 0o600)
    return files


def test_move_survives_a_crash_at_any_step(tmp_path, monkeypatch):
    # Crash at the n-th file system change, then start again: the state
    # is whole in the new place, and only there, for every n
    legacy = str(uuid.uuid5(uuid.NAMESPACE_DNS, "cura-connection.x"))
    n = 0
    while True:
        old, new = str(tmp_path / str(n) / "old"), str(tmp_path / str(n)
                                                       / "new")
        files = old_state(old)
        os.makedirs(new)
        calls = []

        def counted(fn):
            def call(*args, **kw):
                calls.append(fn)
                if len(calls) > n:
                    raise Crash()
                return fn(*args, **kw)
            return call
        with monkeypatch.context() as m:
            for mod, name in ((os, "replace"), (os, "unlink"),
                              (os, "makedirs"), (shutil, "copy2"),
                              (shutil, "rmtree"), (os, "fsync")):
                m.setattr(mod, name, counted(getattr(mod, name)))
            try:
                took = move_old_state(old, new, "/p/printer.cfg", legacy)
                crashed = False
            except Crash:
                crashed = True
        if crashed:
            took = move_old_state(old, new, "/p/printer.cfg", legacy)
            assert took or os.path.exists(os.path.join(old, "moved.json"))
        for name, data in files.items():
            with open(os.path.join(new, name), "rb") as f:
                assert f.read() == data, (n, name)
        assert stat.S_IMODE(os.stat(os.path.join(new, "auth.json"))
                            .st_mode) == 0o600
        with open(os.path.join(new, "printer_uuid")) as f:
            assert f.read().strip() == legacy
        assert sorted(os.listdir(new)) == sorted(
            ["auth.json", "loaded_materials.json", "materials",
             "printer_uuid", "queue.json", "queue.json.bad"])
        assert sorted(os.listdir(old)) == ["lock", "moved.json"]
        with open(os.path.join(old, "moved.json")) as f:
            assert json.load(f) == {"moved_to": new,
                                    "config_file": "/p/printer.cfg"}
        # and never again, for anyone
        other = str(tmp_path / str(n) / "other")
        os.makedirs(other)
        assert not move_old_state(old, other, "/q/printer.cfg", legacy)
        assert os.listdir(other) == []
        if not crashed:
            break
        n += 1
    assert n > 10


def test_move_leaves_a_used_or_locked_state_alone(tmp_path):
    legacy = str(uuid.uuid5(uuid.NAMESPACE_DNS, "cura-connection.x"))
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    files = old_state(old)
    os.makedirs(new)
    holder = StateLock(old, "/o/printer.cfg")
    assert holder.acquire()
    assert not move_old_state(old, new, "/p/printer.cfg", legacy)
    holder.release()
    (tmp_path / "new" / "printer_uuid").write_text(legacy)
    assert not move_old_state(old, new, "/p/printer.cfg", legacy)
    assert sorted(os.listdir(new)) == ["printer_uuid"]
    assert set(files) - {"materials/a.xml.fdm_material"} \
        <= set(os.listdir(old))
