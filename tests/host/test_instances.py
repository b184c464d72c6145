"""Several Klippy instances on one host, as KIAUH makes them
(~/printer_1_data, ~/printer_2_data), their G-code folders one folder:
each keeps its own state and identity, the state of the old shared place
moves to one of them, and a state folder shared on purpose is a config
error.  The naming and moving logic on its own is in
unit/test_instances.py."""
import os
import socket
import stat
import uuid

import pytest

import httpc
from httpc import all_jobs, jobs, materials, printer, wait_for
import klippy_harness
from gcode_samples import ULTIMAKER_PLA_BLACK as PLA_BLACK
from pairing import MATERIALS, PairedCura, post_material

HOST = socket.gethostname().split(".")[0]
PAIRING = {"require_pairing": "True"}


def two_instances(klippy_factory, tmp_path, options=None):
    """printer_1_data and printer_2_data in one home, printer_2's gcodes
    a link to printer_1's."""
    home = tmp_path / "home"
    k1 = klippy_factory(workdir=home, instance="printer_1_data",
                        module_options=dict(options or {}))
    k2 = klippy_factory(workdir=home, instance="printer_2_data",
                        gcodes_link=k1.gcodes_dir,
                        module_options=dict(options or {}))
    return k1, k2


def identity(k):
    base = k.base_url()
    system = httpc.get_json(base, "/api/v1/system")
    card = printer(base)
    assert card["uuid"] == system["guid"]
    assert card["friendly_name"] == card["unique_name"] == system["name"]
    return system["name"], system["guid"]


def allowed(k, cura):
    return httpc.get_json(k.base_url(), "/api/v1/auth/check/" + cura.id)[
        "message"] == "authorized"


def paired(k, user):
    cura = PairedCura(k.base_url(), user=user)
    k.gcode("CURA_ALLOW ID=%s" % (cura.id,))
    assert allowed(k, cura)
    return cura


def summary(base):
    return {j["uuid"]: (j["name"], j["status"]) for j in all_jobs(base)}


def printing(k):
    return k.query("print_stats")["print_stats"]["filename"]


def test_instances_share_files_not_state(klippy_factory, tmp_path):
    k1, k2 = two_instances(klippy_factory, tmp_path, PAIRING)
    assert os.path.realpath(k2.gcodes_dir) == k1.gcodes_dir
    b1, b2 = k1.base_url(), k2.base_url()
    # own identities: the host name plus the instance, own uuids
    first = identity(k1), identity(k2)
    assert [n for n, _ in first] == [HOST + "-1", HOST + "-2"]
    assert first[0][1] != first[1][1]
    # a Cura allowed on one printer is not allowed on the other
    cura1, cura2 = paired(k1, "one@desk"), paired(k2, "two@desk")
    assert not allowed(k2, cura1) and not allowed(k1, cura2)
    r = cura1.request("GET", "/api/v1/auth/verify")
    assert r.status == 200
    r = PairedCura(b2).request("GET", "/api/v1/auth/verify")
    assert r.status == 401
    # printer 1: a finished job on the plate, one queued
    assert cura1.upload("a.gcode").status == 200
    wait_for(lambda: [j["status"] for j in jobs(b1)] == ["wait_cleanup"],
             what="a finished on printer 1")
    assert cura1.upload("b.gcode").status == 200
    queued1 = {j["name"]: j for j in all_jobs(b1)}
    assert queued1["b"]["status"] == "queued"
    with open(os.path.join(k1.gcodes_dir, "a.gcode"), "rb") as f:
        a_data = f.read()
    # a material set on printer 1 is not loaded on printer 2
    k1.gcode("SET_CURA_MATERIAL EXTRUDER=extruder GUID=%s" % (PLA_BLACK,))
    assert materials(b1)[0]["guid"] == PLA_BLACK
    assert materials(b2) == [None]
    # printer 1 is receiving a file (its partial file in the shared folder)
    partial = os.path.join(k1.gcodes_dir, ".cura-upload-%d-x" % (k1.pid,))
    open(partial, "wb").close()

    # printer 2's plate cleared: it has nothing to print, not printer 1's b
    assert all_jobs(b2) == []
    k2.gcode("CURA_BUILD_PLATE_CLEARED")
    k2.restart()
    b2 = cura2.base = k2.base_url()      # (port 0: a new port)
    assert all_jobs(b2) == [] and printing(k2) == ""
    assert materials(b2) == [None]
    assert identity(k2) == first[1]
    assert not allowed(k2, cura1) and allowed(k2, cura2)
    assert os.path.exists(partial)
    # its own upload of the same name is its own file, and it prints that
    assert cura2.upload("a.gcode").status == 200
    (job2,) = wait_for(lambda: [j for j in jobs(b2)
                                if j["status"] == "wait_cleanup"],
                       what="printer 2's job printed")
    assert job2["filename"] != "a.gcode"
    assert printing(k2) == job2["filename"]
    with open(os.path.join(k1.gcodes_dir, "a.gcode"), "rb") as f:
        assert f.read() == a_data

    # printer 1 over a restart of its own: all of it still its own
    k1.restart(firmware=True)
    b1 = cura1.base = k1.base_url()
    assert identity(k1) == first[0]
    assert summary(b1) == {j["uuid"]: (j["name"], j["status"])
                           for j in queued1.values()}
    assert materials(b1)[0]["guid"] == PLA_BLACK
    assert allowed(k1, cura1) and not allowed(k1, cura2)
    assert not os.path.exists(partial)      # its own, from before
    k1.gcode("CURA_BUILD_PLATE_CLEARED")
    wait_for(lambda: printing(k1) == "b.gcode", what="printer 1 prints b")
    assert [j["filename"] for j in all_jobs(b2)] == [job2["filename"]]
    assert printing(k2) == job2["filename"]
    # nothing of either's state in the shared folder
    assert sorted(os.listdir(k1.gcodes_dir)) == sorted(
        ["a.gcode", "b.gcode", job2["filename"]])


def test_one_state_folder_two_instances_is_a_config_error(klippy_factory,
                                                          tmp_path):
    shared = str(tmp_path / "state")
    home = tmp_path / "home"
    k1 = klippy_factory(workdir=home, instance="printer_1_data",
                        module_options={"data_path": shared})
    k2 = klippy_factory(workdir=home, instance="printer_2_data",
                        start=False, module_options={"data_path": shared})

    def refused():
        k2.start()
        with pytest.raises(klippy_harness.KlippyNotReady) as e:
            k2.wait_ready()
        k2.stop()
        msg = e.value.info["state_message"]
        assert "data_path %s is in use" % (shared,) in msg
        assert k1.cfg_path in msg and "pid %d" % (k1.pid,) in msg

    refused()
    # the holder restarts in its process: it takes its folder again
    k1.restart()
    k1.restart(firmware=True)
    refused()
    # a killed holder leaves no lock behind
    k1.kill9()
    k2.start()
    k2.wait_ready()
    assert jobs(k2.base_url()) == []


def test_a_failed_load_keeps_no_lock_from_its_own_process(klippy_factory):
    # The port is taken: the load fails after the state folder was locked;
    # the RESTART after the port is free takes the folder again
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    k = klippy_factory(start=False, module_options={
        "port": busy.getsockname()[1]})
    k.start()
    with pytest.raises(klippy_harness.KlippyNotReady) as e:
        k.wait_ready()
    assert "cannot listen" in e.value.info["state_message"]
    assert os.path.exists(os.path.join(k.data_dir, "lock"))
    busy.close()
    k.restart()
    assert jobs(k.base_url()) == []


def test_old_shared_state_moves_to_one_instance(klippy_factory, tmp_path):
    home = tmp_path / "home"
    k1 = klippy_factory(workdir=home, instance="printer_1_data", start=False)
    old = os.path.join(k1.gcodes_dir, ".cura_connection")
    # Before: the state in <gcodes>/.cura_connection, as older versions
    # kept it (with no uuid file and no lock)
    k1.module_options.update(PAIRING, data_path=old)
    k1.start()
    k1.wait_ready()
    base = k1.base_url()
    cura = paired(k1, "one@desk")
    for name in ("a", "b", "c"):
        assert cura.upload(name + ".gcode").status == 200
        # (a prints at once, and ends: b and c wait)
        wait_for(lambda: jobs(base)[0]["status"] == "wait_cleanup",
                 what="a printed")
    r = post_material(base, "house", cura.auth("POST", MATERIALS + "/"))
    assert r.status == 200, r
    k1.gcode("SET_CURA_MATERIAL EXTRUDER=extruder GUID=%s" % (PLA_BLACK,))
    before = summary(base)
    assert sorted(before.values()) == [("a", "wait_cleanup"),
                                       ("b", "queued"), ("c", "queued")]
    assert len(before) == 3
    k1.stop(clean=True)
    for name in ("printer_uuid", "lock"):
        os.unlink(os.path.join(old, name))
    with open(os.path.join(old, "auth.json"), "rb") as f:
        auth = f.read()
    saved = sorted(os.listdir(old))
    assert {"queue.json", "auth.json", "loaded_materials.json",
            "materials"} <= set(saved)

    # After: printer 2, whose gcodes folder is a link to printer 1's,
    # starts first, and leaves the state to printer 1
    k2 = klippy_factory(workdir=home, instance="printer_2_data",
                        gcodes_link=k1.gcodes_dir, module_options=PAIRING)
    assert sorted(os.listdir(old)) == saved
    del k1.module_options["data_path"]
    k1.start()
    k1.wait_ready()
    base = cura.base = k1.base_url()
    assert sorted(os.listdir(old)) == ["lock", "moved.json"]
    assert sorted(os.listdir(k1.data_dir)) == sorted(
        saved + ["lock", "printer_uuid"])
    with open(os.path.join(k1.data_dir, "auth.json"), "rb") as f:
        assert f.read() == auth
    assert stat.S_IMODE(os.stat(os.path.join(k1.data_dir, "auth.json"))
                        .st_mode) == 0o600
    # (the uuid the older version would have shown under the instance's
    # own name: instances no longer share the host name's)
    legacy = str(uuid.uuid5(uuid.NAMESPACE_DNS,
                            "cura-connection." + HOST + "-1"))
    for restart in (False, True):
        if restart:
            k1.restart()
            base = cura.base = k1.base_url()
        assert summary(base) == before
        assert identity(k1) == (HOST + "-1", legacy)
        assert materials(base)[0]["guid"] == PLA_BLACK
        assert [m["guid"] for m in httpc.get_json(base, MATERIALS)] \
            == ["guid-house"]
        assert allowed(k1, cura)
    assert "moved the saved state from %s to %s" % (old, k1.data_dir) \
        in k1.log_text()
    assert all_jobs(k2.base_url()) == []
    assert identity(k2)[1] != legacy
    assert "the state in %s belongs to the Klipper instance of %s" % (
        os.path.join(k2.gcodes_dir, ".cura_connection"), k1.cfg_path) \
        in k2.log_text()
    assert not allowed(k2, cura)


def test_single_printer_keeps_its_state_name_and_uuid(klippy_factory):
    # One printer, its state in the old place: after the move Cura sees
    # the printer it knows, with its jobs
    k = klippy_factory(start=False)
    old = os.path.join(k.gcodes_dir, ".cura_connection")
    queued = k.write_queue(3, data_dir=old)
    k.start()
    k.wait_ready()
    assert [j["uuid"] for j in all_jobs(k.base_url())
            if j["status"] == "queued"] == queued
    assert identity(k) == (HOST, str(uuid.uuid5(
        uuid.NAMESPACE_DNS, "cura-connection." + socket.gethostname())))
    assert k.data_dir == os.path.join(k.workdir, ".cura_connection")
    assert {"lock", "printer_uuid", "queue.json"} <= set(
        os.listdir(k.data_dir))
    assert sorted(os.listdir(old)) == ["lock", "moved.json"]


def test_first_of_equals_takes_the_old_state(klippy_factory, tmp_path):
    # Two instances whose gcodes folders both link to a third folder: the
    # first to start takes the old state, for good
    home = tmp_path / "home"
    shared = str(tmp_path / "shared")
    k2 = klippy_factory(workdir=home, instance="printer_2_data",
                        gcodes_link=shared, start=False)
    old = os.path.join(shared, ".cura_connection")
    queued = k2.write_queue(2, data_dir=old)
    k2.start()
    k2.wait_ready()
    k1 = klippy_factory(workdir=home, instance="printer_1_data",
                        gcodes_link=shared)
    for restart in (False, True):
        if restart:
            k1.restart()
            k2.restart()
        assert [j["uuid"] for j in all_jobs(k2.base_url())
                if j["status"] == "queued"] == queued
        assert all_jobs(k1.base_url()) == []
    assert "the state in %s went to %s" % (
        os.path.join(k1.gcodes_dir, ".cura_connection"), k2.data_dir) \
        in k1.log_text()
    assert identity(k1)[1] != identity(k2)[1]


def test_instances_upgraded_each_from_its_own_folder_differ(klippy_factory,
                                                            tmp_path):
    # KIAUH instances whose G-code folders are NOT linked: an older
    # version kept each one's state in its own <gcodes>/.cura_connection,
    # both named by the host name.  After the move each is its own
    # printer to Cura: at most one keeps the old uuid.
    home = tmp_path / "home"
    ks = []
    for n in (1, 2):
        k = klippy_factory(workdir=home, instance="printer_%d_data" % (n,),
                           start=False)
        queued = k.write_queue(1, data_dir=os.path.join(
            k.gcodes_dir, ".cura_connection"))
        ks.append((k, queued))
    for k, queued in ks:
        k.start()
        k.wait_ready()
        assert [j["uuid"] for j in all_jobs(k.base_url())
                if j["status"] == "queued"] == queued
    (k1, _), (k2, _) = ks
    assert identity(k1)[0] != identity(k2)[0]
    assert identity(k1)[1] != identity(k2)[1]


def test_instances_in_other_data_folders_show_their_own_names(
        klippy_factory, tmp_path):
    # Moonraker's data folder may have any name (moonraker -d ~/voron_data)
    home = tmp_path / "home"
    k1 = klippy_factory(workdir=home, instance="voron_data")
    k2 = klippy_factory(workdir=home, instance="ender_data",
                        gcodes_link=k1.gcodes_dir)
    assert identity(k1)[1] != identity(k2)[1]
    assert identity(k1)[0] != identity(k2)[0]
