"""The printer Cura's selection dialog names for an upload
(require_printer_name) and the space the print needs, as Cura's own
client code sends them, reaching Klippy's side through either process."""
import os

import pytest

import cura_client
import gcode_samples
import httpc
import real_inputs
from hostile import wait_for


TARGET = "require_printer_name"
BOX = [9., 6., 0.27, 173., 160., 58.]   # gcode_samples' Griffin header


@pytest.fixture
def ufp(tmp_path):
    path = tmp_path / "cube.ufp"
    cura_client.make_ufp(str(path), gcode_samples.cura_gcode(
        print_time=60, count=20), thumbnail_png=gcode_samples.png(32, 24))
    return path


@pytest.mark.parametrize("chosen, name", [
    ("voron_2", "voron_2"), (None, "")], ids=["chosen", "automatic"])
def test_cura_upload_names_its_printer(cura, tmp_path, ufp, chosen, name):
    # Cura's _startPrintJobUpload, with the printer picker's choice
    sent = cura_client.captured_upload(str(ufp), unique_name=chosen)
    body = sent[1]
    if chosen:
        # Cura appends the part after the whole file
        assert body.index(b"name=require_printer_name") > body.index(
            b'name="file"')
    else:
        assert b"require_printer_name" not in body
    # received by Klippy's own server, and by the front process
    here = real_inputs.MetaSpy(tmp_path / "klippy")
    meta = here.upload(sent=sent)
    front = real_inputs.MetaSpy(tmp_path / "front")
    passed = real_inputs.front_upload(front, sent=sent)
    for meta in (meta, passed):
        assert meta[TARGET] == name and meta["bounds"] == BOX
        assert meta["name"] == "cube"


@pytest.mark.parametrize("front", ["True", "False"])
def test_a_printer_name_upload_in_the_real_klippy(cura, klippy_factory, ufp,
                                                 front):
    # Both processes receive the part after the file and queue the job;
    # a name with control characters is refused whole (400, no job)
    # (voron_2: a member whose Moonraker is not there: the job waits)
    k = klippy_factory(module_options={
        "front_process": front,
        "group_printers": "voron_2=http://127.0.0.1:9"})
    addr = "127.0.0.1:%d" % (k.cura_port(),)
    status, body = cura_client.upload(addr, str(ufp), "bad.ufp",
                                      unique_name="voron\x1b[2J")
    assert status == 400 and b"require_printer_name" in body, body
    status, body = cura_client.upload(addr, str(ufp), unique_name="voron_2")
    assert status == 200, body
    wait_for(lambda: [j["name"] for j in httpc.jobs(k.base_url())]
             == ["cube"], 20., "the job")
    job, = httpc.jobs(k.base_url())
    assert job["constraints"] == {"require_printer_name": "voron_2"}
    assert job["status"] == "queued" and "printer_uuid" not in job
    # (nothing of the refused upload kept)
    assert sorted(n for n in os.listdir(k.gcodes_dir)
                  if not n.startswith(".")) == ["cube.gcode"]
