"""Loaded materials: SET_CURA_MATERIAL and material_<extruder> in the real
Klippy, shown through Cura 4.13's own Monitor-tab code, kept over restarts."""
import json
import os

import pytest

import cura_client
from gcode_samples import ULTIMAKER_PLA_BLACK as PLA_BLACK
import httpc
from httpc import materials, wait_for
import kapi

MATERIALS = (cura_client.DEFAULT_CURA_ROOT
             / "usr/share/cura/resources/materials")
GENERIC_PLA = "506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9"
# A material Cura has never seen, with its own GUID and colour
HOUSE_GUID = "0b1c7e2a-5f7c-4d57-a9b4-2c9d7a4b1e01"
HOUSE_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<fdmmaterial xmlns="http://www.ultimaker.com/material" version="1.3">
 <metadata>
  <name><brand>House</brand><material>PETG</material><color>Teal</color></name>
  <GUID>%s</GUID><version>3</version><color_code>#008080</color_code>
 </metadata>
</fdmmaterial>
""" % HOUSE_GUID.encode()


def post_material(base, filename, data):
    body, headers = httpc.multipart({}, {"file": (filename, data)})
    r = httpc.request(base, "POST", "/cluster-api/v1/materials/", body,
                      headers)
    assert r.status == 200, r


def card(base):
    """The extruder boxes of Cura's printer card, from Cura's own code."""
    api = cura_client.ClusterApi(base.replace("http://", ""))
    view = cura_client.monitor_view(api.printers(), api.print_jobs())
    return [e["material"] for e in view["printers"][0]["extruders"]]


def test_materials_on_cura_card_and_over_restarts(cura, klippy_factory):
    k = klippy_factory(extruders=2, module_options={
        "material_extruder1": 'MATERIAL=PETG COLOR=ff8000 BRAND="Acme Co"'})
    base = k.base_url()
    # nothing said for extruder 0; extruder1's default from printer.cfg
    first, second = materials(base)
    assert first is None
    assert (second["brand"], second["material"], second["color"]) \
        == ("Acme Co", "PETG", "#ff8000")
    seen = card(base)
    assert seen[0] is None
    # Cura does not know that material: "Unknown", in the given colour
    assert (seen[1]["name"], seen[1]["color"]) == ("Unknown", "#ff8000")

    # a GUID Cura ships: Cura shows its own name and colour
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder GUID=%s" % (PLA_BLACK,))
    seen = card(base)
    assert (seen[0]["name"], seen[0]["brand"], seen[0]["type"]) \
        == ("Black PLA", "Ultimaker", "PLA")
    assert seen[0]["guid"] == PLA_BLACK

    # a profile synced to the printer supplies brand, type and colour to
    # a Cura that does not have it
    post_material(base, "house_petg.xml.fdm_material", HOUSE_XML)
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder1 GUID=%s" % (HOUSE_GUID,))
    m = materials(base)[1]
    assert (m["guid"], m["brand"], m["material"], m["color"], m["name"]) \
        == (HOUSE_GUID, "House", "PETG", "#008080", "Teal PETG")
    assert card(base)[1]["color"] == "#008080"
    # type, brand and colour words find the stored profile's GUID
    post_material(base, "ultimaker_pla_black.xml.fdm_material",
                  (MATERIALS / "ultimaker_pla_black.xml.fdm_material")
                  .read_bytes())
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder1 MATERIAL=pla "
            "BRAND=Ultimaker COLOR=black")
    assert materials(base)[1]["guid"] == PLA_BLACK
    # the name in /printers is the profile's own, as Cura shows it
    assert materials(base)[1]["name"] == card(base)[1]["name"] \
        == "Black PLA"
    post_material(base, "generic_pla.xml.fdm_material",
                  (MATERIALS / "generic_pla.xml.fdm_material").read_bytes())
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder1 GUID=%s" % (GENERIC_PLA,))
    assert materials(base)[1]["name"] == card(base)[1]["name"] == "PLA"
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder1 MATERIAL=pla "
            "BRAND=Ultimaker COLOR=black")

    # jobs carry the loaded materials too (Cura parses them)
    fname = k.write_gcode("with_material.gcode")
    k.gcode("SDCARD_PRINT_FILE FILENAME=%s" % (fname,))
    job = wait_for(lambda: httpc.get_json(base, "/cluster-api/v1/print_jobs"),
                   what="job")[0]
    assert [c["material"]["guid"] for c in job["configuration"]] \
        == [PLA_BLACK, PLA_BLACK]
    cura_client.ClusterApi(base.replace("http://", "")).print_jobs()

    # macros read it from the status
    status = k.query("cura_connection")["cura_connection"]["materials"]
    assert status["extruder"] == {"guid": PLA_BLACK}
    assert status["extruder1"]["material"] == "pla"

    # the runner thread wrote it; a restart keeps it over the config
    data_file = os.path.join(k.data_dir, "loaded_materials.json")
    wait_for(lambda: os.path.exists(data_file) and json.load(open(
        data_file))["extruders"]["extruder1"], what="saved file")
    k.restart()
    base = k.base_url()   # port 0: a new one after each restart
    assert [m["guid"] for m in materials(base)] == [PLA_BLACK, PLA_BLACK]

    # unloaded: Cura's "Empty"
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder MATERIAL=empty")
    assert card(base)[0]["name"] == "Empty"


def test_set_cura_material_errors_and_query(klippy_factory):
    k = klippy_factory(module_options={"material_extruder": GENERIC_PLA})
    base = k.base_url()
    assert materials(base)[0]["guid"] == GENERIC_PLA
    for script, text in [
            ("SET_CURA_MATERIAL EXTRUDER=extruder7 MATERIAL=PLA",
             "Unknown extruder"),
            ("SET_CURA_MATERIAL GUID=not-a-guid", "not a GUID"),
            ("SET_CURA_MATERIAL BRAND=Acme", "MATERIAL="),
            ("SET_CURA_MATERIAL MATERIAL=PLA SPEED=3", "Unknown parameter")]:
        with pytest.raises(kapi.KlippyError, match=text):
            k.gcode(script)
    assert materials(base)[0]["guid"] == GENERIC_PLA
    # without EXTRUDER: the active one; without material words: a report
    k.gcode("SET_CURA_MATERIAL MATERIAL=TPU COLOR=red")
    k.gcode("SET_CURA_MATERIAL")
    wait_for(lambda: "extruder: COLOR=red MATERIAL=TPU" in k.log_text(),
             what="the report in klippy.log")
    m = materials(base)[0]
    assert (m["material"], m["color"], m["name"]) == ("TPU", "red", "TPU red")
    # the same words always give the same GUID (Cura redraws on change)
    again = materials(base)[0]["guid"]
    assert again == m["guid"] and again != GENERIC_PLA
    # hex colours go without "#": Klipper cuts G-code lines there
    k.gcode("SET_CURA_MATERIAL MATERIAL=PLA COLOR=00FF00")
    assert materials(base)[0]["color"] == "#00ff00"


def test_bad_material_option_is_a_config_error(klippy_factory):
    k = klippy_factory(module_options={"material_extruder": "GUID=xyz"},
                       wait=False)
    info = k.wait_state("error")
    assert "material_extruder" in info["state_message"]
