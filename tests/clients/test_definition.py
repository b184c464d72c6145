"""The Cura machine definition made from printer.cfg: Cura 4.13's own
definition code parses it, and its BOM lookup (add-by-IP and zeroconf)
maps what the module advertises with cura_machine: custom to it."""
import io
import json
import os
import re
import sys
import zipfile

import pytest

import cura_definitions
import cura_netns
import httpc

from _cura_connection.definition import CURA_DATA_FOLDERS, DEFINITION_HOWTO, cura_data_folders_html, cura_data_folders_text  # noqa: E402

CARTESIAN = """
[printer]
kinematics: cartesian
max_velocity: 250
max_accel: 2500
max_z_velocity: 12
max_z_accel: 100

[stepper_x]
step_pin: PB0
dir_pin: PB1
enable_pin: !PB2
microsteps: 16
rotation_distance: 40
endstop_pin: ^PB3
position_endstop: 0
position_min: -5
position_max: 235
homing_speed: 50

[stepper_y]
step_pin: PB4
dir_pin: PB5
enable_pin: !PB6
microsteps: 16
rotation_distance: 40
endstop_pin: ^PB7
position_endstop: 0
position_max: 225
homing_speed: 50

[stepper_z]
step_pin: PB8
dir_pin: PB9
enable_pin: !PB10
microsteps: 16
rotation_distance: 8
endstop_pin: ^PB11
position_endstop: 0
position_max: 250

[extruder1]
nozzle_diameter: 0.6

[gcode_macro PRINT_START]
gcode:
  G28

[gcode_macro print_end]
gcode:
  M84
"""
DEF_ID = "cura_connection_voron"


@pytest.fixture(scope="session")
def cura():
    return cura_definitions.load()


def download(base, def_id=DEF_ID):
    r = httpc.request(base, "GET", "/printers/cura_definition.zip")
    assert r.status == 200 and r.headers["Content-Type"] == "application/zip"
    assert def_id in r.headers["Content-Disposition"]
    with zipfile.ZipFile(io.BytesIO(r.body)) as z:
        files = {n: z.read(n) for n in z.namelist()}
    # each file is also served on its own, the same
    for name, data in files.items():
        if name.endswith(".def.json"):
            one = httpc.request(base, "GET", "/printers/cura_definition/"
                                + name.split("/")[-1])
            assert one.status == 200 and one.body == data
    return files


def prepends_heating(start_gcode):
    # Cura's own test whether to add M190/M109 before the start G-code:
    # the lines of CuraEngineBackend/StartSliceJob.py, run as they are
    import cura_client
    path = cura_client.DEFAULT_CURA_ROOT / \
        "usr/lib/cura/plugins/CuraEngineBackend/StartSliceJob.py"
    lines = path.read_text().splitlines()
    first = next(i for i, l in enumerate(lines)
                 if "bed_temperature_settings = [" in l)
    block = "\n".join(l.strip() for l in lines[first:first + 6])
    assert block.count("settings[") == 2, block
    scope = {"re": re, "settings": {}, "start_gcode": start_gcode}
    exec(block, scope)
    return (scope["settings"]["material_bed_temp_prepend"],
            scope["settings"]["material_print_temp_prepend"])


def test_definition_from_printer_cfg(cura, klippy_factory):
    k = klippy_factory(extruders=2, extra_cfg=CARTESIAN, module_options={
        "name": "voron", "cura_machine": "custom"})
    base = k.base_url()
    files = download(base)
    assert sorted(files) == [
        "README.txt", "definitions/%s.def.json" % DEF_ID,
        "extruders/%s_extruder_0.def.json" % DEF_ID,
        "extruders/%s_extruder_1.def.json" % DEF_ID]
    texts = {n.split("/")[-1][:-len(".def.json")]: d.decode()
             for n, d in files.items() if n.endswith(".def.json")}

    # Cura's DefinitionContainer reads them, with fdmprinter/fdmextruder
    machine, valid = cura_definitions.parse(DEF_ID, texts[DEF_ID])
    assert valid, "an override names a setting fdmprinter does not have"
    prop = lambda key: machine.getProperty(key, "default_value")
    assert machine.getName() == "voron (Klipper)"
    assert (prop("machine_width"), prop("machine_depth"),
            prop("machine_height")) == (235, 225, 250)
    assert prop("machine_center_is_zero") is False
    assert prop("machine_heated_bed") is True
    assert prop("machine_extruder_count") == 2
    assert prop("machine_gcode_flavor") == "RepRap (Marlin/Sprinter)"
    assert (prop("machine_max_feedrate_x"), prop("machine_max_feedrate_z"),
            prop("machine_acceleration")) == (250, 12, 2500)
    meta = machine.getMetaData()
    assert meta["manufacturer"] == "Ultimaker B.V."
    assert meta["supports_network_connection"] is True
    assert meta["supported_actions"] == ["DiscoverUM3Action"]
    assert "application/x-ufp" in meta["file_formats"].split(";")
    assert meta["preferred_material"] == "generic_pla_175"
    for i, nozzle in enumerate([0.4, 0.6]):
        ext_id = "%s_extruder_%d" % (DEF_ID, i)
        assert meta["machine_extruder_trains"][str(i)] == ext_id
        ext, valid = cura_definitions.parse(ext_id, texts[ext_id])
        assert valid
        assert ext.getMetaDataEntry("machine") == DEF_ID
        assert ext.getMetaDataEntry("position") == str(i)
        assert ext.getProperty("machine_nozzle_size", "default_value") \
            == nozzle
        assert ext.getProperty("material_diameter", "default_value") == 1.75
        assert ext.getProperty("extruder_nr", "default_value") == i

    # start/end G-code call the user's macros, with Cura's temperatures
    start, end = prop("machine_start_gcode"), prop("machine_end_gcode")
    expanded = cura_definitions.start_gcode(
        start, {"initial_extruder_nr": 1,
                "material_bed_temperature_layer_0": 65},
        [{"material_print_temperature_layer_0": 215},
         {"material_print_temperature_layer_0": 240}])
    assert "PRINT_START BED_TEMP=65 EXTRUDER_TEMP=240" in expanded
    # ... so Cura adds no heating of its own before the macro
    assert prepends_heating(start) == (False, False)
    assert end.strip() == "PRINT_END"

    # the printer advertises the definition's BOM; Cura's add-by-IP code
    # picks this definition once it is installed, and none before
    bom = json.loads(texts[DEF_ID])["metadata"]["bom_numbers"][0]
    assert re.match(r"^7\d{8}$", str(bom))
    system = httpc.get_json(base, "/api/v1/system")
    assert system["hardware"]["typeid"] == bom
    printer = httpc.get_json(base, "/cluster-api/v1/printers")[0]
    # Cura matches configurations by the definition's name
    assert printer["machine_variant"] == system["variant"] \
        == machine.getName()
    assert printer["machine_definition"] == DEF_ID
    address = "127.0.0.1:%d" % (k.cura_port(),)
    with_ours = cura_definitions.DefinitionRegistry(texts)
    assert cura_definitions.printer_type_by_ip(address, with_ours) == DEF_ID
    stock = cura_definitions.DefinitionRegistry()
    assert cura_definitions.printer_type_by_ip(address, stock) == "Unknown"
    # ... and no real Ultimaker is taken for this printer
    for bom_um, um in [("213482", "ultimaker_s3"), ("9051", "ultimaker_s5"),
                       ("9066", "ultimaker3"),
                       ("9511", "ultimaker3_extended")]:
        assert cura_definitions.printer_type(
            {"type": "printer", "name": "um", "machine": bom_um,
             "firmware_version": "5.2.11"}, with_ours) == um
    readme = files["README.txt"].decode()
    assert "cura_machine: custom" in readme and str(bom) in readme
    # where Cura reads definitions, per system (checked against Uranium in
    # test_definition_folders_are_where_cura_reads_them)
    assert "Linux: ~/.local/share/cura/<version>\n" in readme
    assert "Windows: %APPDATA%\\cura\\<version>\n" in readme
    assert "macOS: ~/Library/Application Support/cura/<version>\n" in readme
    assert "Help > Show Configuration Folder" in readme

    # "Sync with printer": Cura compares the printer's configuration with
    # the one MachineManager makes for the active machine (definition
    # name, no print core on a machine without variants, material GUIDs,
    # default build plate); here through Cura's own model classes
    import cura_client
    from cura.PrinterOutput.Models.ExtruderConfigurationModel import \
        ExtruderConfigurationModel
    from cura.PrinterOutput.Models.MaterialOutputModel import \
        MaterialOutputModel
    from cura.PrinterOutput.Models.PrinterConfigurationModel import \
        PrinterConfigurationModel
    pla = "506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9"
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder GUID=%s" % (pla,))
    k.gcode("SET_CURA_MATERIAL EXTRUDER=extruder1 GUID=%s" % (pla,))
    view = cura_client.MonitorView()
    view.poll(cura_client.ClusterApi(address))
    on_printer = view.device._printers[0].printerConfiguration
    active = PrinterConfigurationModel()
    active.printerType = machine.getName()
    extruders = []
    for i in range(2):
        ext = ExtruderConfigurationModel()
        ext.position = i
        ext.material = MaterialOutputModel(pla, "PLA", "Generic",
                                           "Generic", "Generic PLA")
        ext.hotendID = None
        extruders.append(ext)
    active.extruderConfigurations = extruders
    active.buildplateConfiguration = machine.getProperty(
        "machine_buildplate_type", "default_value")
    assert on_printer == active, (str(on_printer), str(active))


def test_definition_without_limits_or_macros(cura, klippy_factory):
    # the harness printer: kinematics none, no macros, one extruder
    k = klippy_factory(module_options={"name": "plain"})
    base = k.base_url()
    def_id = "cura_connection_plain"
    texts = {n.split("/")[-1][:-len(".def.json")]: d.decode()
             for n, d in download(base, def_id).items()
             if n.endswith(".def.json")}
    assert sorted(texts) == [def_id, def_id + "_extruder_0"]
    machine, valid = cura_definitions.parse(def_id, texts[def_id])
    assert valid
    prop = lambda key: machine.getProperty(key, "default_value")
    assert (prop("machine_width"), prop("machine_height")) == (200, 200)
    assert prop("machine_extruder_count") == 1
    start = prop("machine_start_gcode")
    assert start.startswith("G28")
    # no temperatures named: Cura heats before the start G-code itself
    assert prepends_heating(start) == (True, True)
    # not advertised: Cura still creates the configured Ultimaker
    address = "127.0.0.1:%d" % (k.cura_port(),)
    assert cura_definitions.printer_type_by_ip(
        address, cura_definitions.DefinitionRegistry(texts)) \
        == "ultimaker_s3"
    r = httpc.request(base, "GET", "/printers/cura_definition/nope.def.json")
    assert r.status == 404


PROBE = r"""
import json, sys, tempfile
import klippy_harness, cura_client, cura_definitions, httpc
cura_client.require_loopback_only()
result = {}
with klippy_harness.Klippy(%(flavor)r, tempfile.mkdtemp(), module_options={
        "zeroconf": "True", "address": "0.0.0.0", "name": "zc-custom",
        "cura_machine": "custom"}) as k:
    found = cura_client.discover(timeout=15, wait_for=1)
    base = "http://127.0.0.1:%%d" %% k.cura_port()
    import io, zipfile
    z = zipfile.ZipFile(io.BytesIO(httpc.request(
        base, "GET", "/printers/cura_definition.zip").body))
    texts = {n.split("/")[-1][:-9]: z.read(n).decode()
             for n in z.namelist() if n.endswith(".def.json")}
    result["properties"] = found[0]["properties"] if found else None
    result["printer_type"] = found and cura_definitions.printer_type(
        found[0]["properties"], cura_definitions.DefinitionRegistry(texts))
print("RESULT " + json.dumps(result))
"""


@pytest.mark.skipif(not cura_netns.netns_available(),
                    reason="needs network namespaces (root or userns)")
def test_zeroconf_machine_maps_to_the_definition(flavor):
    result = cura_netns.run_probe(PROBE % {"flavor": flavor})
    assert re.match(r"^7\d{8}$", result["properties"]["machine"]), result
    assert result["printer_type"] == "cura_connection_zc_custom"


def definition_texts(files):
    return {n.split("/")[-1][:-len(".def.json")]: d.decode()
            for n, d in files.items() if n.endswith(".def.json")}


# printer.cfg shapes, with the volume, shape and extruders Cura must get.
# Decimal limits: Cura's build plate is whole millimetres inside them.
STEPPERS = "".join("""
[stepper_%s]
step_pin: PB%d
dir_pin: PB%d
enable_pin: !PB%d
microsteps: 16
rotation_distance: 40
endstop_pin: ^PB%d
""" % (axis, 4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 3)
    for i, axis in enumerate("xyz"))
SHAPES = {
    # negative minimums are parking room; odd limits and a 0.25 nozzle
    "cartesian": dict(extruders=2, cfg="""
[printer]
kinematics: cartesian
max_velocity: 250
max_accel: 2500.5
max_z_velocity: 12.5
max_z_accel: 100
%s
[stepper_x]
position_endstop: -5.5
position_min: -5.5
position_max: 235.7
homing_speed: 50
[stepper_y]
position_endstop: -3
position_min: -3
position_max: 225.4
homing_speed: 50
[stepper_z]
position_endstop: 0
position_max: 250.8
[extruder1]
nozzle_diameter: 0.25
""" % (STEPPERS,), volume=(235, 225, 250), shape="rectangular", center=False,
        extruder=[(0.4, 1.75), (0.25, 1.75)],
        motion=(250, 2500.5, 12.5, 100)),
    # origin in the middle, one side shorter: Cura's plate is symmetric
    "corexy": dict(extruders=1, cfg="""
[printer]
kinematics: corexy
max_velocity: 500
max_accel: 10000
%s
[stepper_x]
position_endstop: 150
position_min: -150
position_max: 150
homing_speed: 50
[stepper_y]
position_endstop: 150
position_min: -147.5
position_max: 150
homing_speed: 50
[stepper_z]
position_endstop: 0
position_max: 280.3
[extruder]
nozzle_diameter: 0.8
filament_diameter: 2.85
""" % (STEPPERS,), volume=(300, 295, 280), shape="rectangular", center=True,
        extruder=[(0.8, 2.85)], motion=(500, 10000, 500, 10000)),
    "delta": dict(extruders=1, cfg="""
[printer]
kinematics: delta
max_velocity: 300
max_accel: 3000
max_z_velocity: 150
delta_radius: 174.75
print_radius: 140.5
%s
[stepper_a]
position_endstop: 297.05
arm_length: 333.0
homing_speed: 60
[extruder]
nozzle_diameter: 1.0
filament_diameter: 3.0
""" % (STEPPERS.replace("stepper_x", "stepper_a").replace(
        "stepper_y", "stepper_b").replace("stepper_z", "stepper_c"),),
        volume=(281, 281, 297), shape="elliptic", center=True,
        extruder=[(1, 3)], motion=(300, 3000, 150, 3000)),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_value_as_cura_reads_it(cura, klippy_factory, shape):
    spec = SHAPES[shape]
    k = klippy_factory(extruders=spec["extruders"], extra_cfg=spec["cfg"],
                       module_options={"name": shape,
                                       "cura_machine": "custom"})
    def_id = "cura_connection_" + shape
    texts = definition_texts(download(k.base_url(), def_id))
    assert len(texts) == 1 + len(spec["extruder"])
    # every setting, in Cura's own containers, against the type and the
    # limits fdmprinter/fdmextruder declare
    report = cura_definitions.setting_report(texts)
    assert [r for r in report if r[4]] == []
    values = {key: value for d, key, _, value, _ in report if d == def_id}
    assert (values["machine_width"], values["machine_depth"],
            values["machine_height"]) == spec["volume"]
    assert (values["machine_shape"], values["machine_center_is_zero"]) \
        == (spec["shape"], spec["center"])
    assert (values["machine_max_feedrate_x"],
            values["machine_max_acceleration_x"],
            values["machine_max_feedrate_z"],
            values["machine_max_acceleration_z"]) == spec["motion"]
    assert values["machine_extruder_count"] == len(spec["extruder"])
    for i, (nozzle, filament) in enumerate(spec["extruder"]):
        ext = {key: value for d, key, _, value, _ in report
               if d == "%s_extruder_%d" % (def_id, i)}
        assert (ext["machine_nozzle_size"], ext["material_diameter"],
                ext["extruder_nr"]) == (nozzle, filament, i)
        # whole numbers as JSON integers (1, not 1.0)
        assert type(ext["machine_nozzle_size"]) is type(nozzle)
    # Cura's arranger places models side by side on that plate
    global_stack = cura_definitions.stacks(texts)[0]
    placed, spots = cura_definitions.arrange(global_stack)
    assert placed and len(set(spots)) == 3
    width, depth = spec["volume"][:2]
    assert all(abs(x) < width / 2 and abs(y) < depth / 2 for x, y in spots)


def test_checks_catch_what_cura_cannot_use(cura):
    # the definition as it was written before: 235.0 breaks Cura's arranger
    # (TypeError in its Box), and each kind of wrong value is reported
    broken = {
        "machine_width": 235.0, "machine_depth": 225.5,
        "machine_extruder_count": 2.0, "machine_heated_bed": "True",
        "machine_gcode_flavor": "Klipper", "material_diameter": 5.2,
        "machine_max_feedrate_x": 250}
    texts = {"broken": json.dumps({
        "version": 2, "name": "broken", "inherits": "fdmprinter",
        "metadata": {}, "overrides": {k: {"default_value": v}
                                      for k, v in broken.items()}})}
    report = {key: problem for _, key, _, _, problem in
              cura_definitions.setting_report(texts)}
    assert all(report[k] for k in broken if k != "machine_max_feedrate_x"), \
        report
    assert "MaximumWarning" in report["material_diameter"]
    assert report["machine_max_feedrate_x"] is None
    with pytest.raises(TypeError, match="Box"):
        cura_definitions.arrange(cura_definitions.stacks(texts)[0])


def test_marlin_ufp_is_read_without_a_log_line(cura, klippy_factory, tmp_path):
    # What Cura sends for the custom definition: a UFP with a Marlin-flavour
    # G-code header, which libcharon's header check refuses (it knows only
    # Ultimaker's).  Normal input: no log line per job.  A package libcharon
    # cannot read at all is still logged.
    import time
    import cura_client
    import gcode_samples
    k = klippy_factory(module_options={"name": "quiet",
                                       "cura_machine": "custom"})
    address = "127.0.0.1:%d" % (k.cura_port(),)
    gcode = ";FLAVOR:Marlin\n;TIME:60\n" + gcode_samples.moves(40, 0)
    marlin = cura_client.make_ufp(str(tmp_path / "marlin.ufp"), gcode)
    assert cura_client.upload(address, str(marlin))[0] == 200
    broken = tmp_path / "broken.ufp"
    with zipfile.ZipFile(str(marlin)) as src, \
            zipfile.ZipFile(str(broken), "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"<not xml" if "Content_Types" in name
                         else src.read(name))
    assert cura_client.upload(address, str(broken))[0] == 200
    jobs = [j["name"] for j in
            httpc.get_json(k.base_url(), "/cluster-api/v1/print_jobs")]
    assert "marlin" in jobs and "broken" in jobs
    deadline = time.monotonic() + 10
    while "libcharon refused" not in k.log_text():
        assert time.monotonic() < deadline, "the broken package not logged"
        time.sleep(0.1)
    refusals = [line for line in k.log_text().splitlines()
                if "libcharon refused" in line]
    # one line: the broken package's (its XML), none for the Marlin one
    assert len(refusals) == 1 and "unclosed token" in refusals[0], refusals


SECOND_EXTRUDER = """
[extruder1]
heater_pin: PA5
sensor_type: EPCOS 100K B57560G104F
sensor_pin: PA6
control: watermark
min_temp: -273
max_temp: 300
nozzle_diameter: 0.4
filament_diameter: 1.75

[gcode_macro PRINT_START]
gcode:
  M140 S{params.BED_TEMP}
  M104 S{params.EXTRUDER_TEMP}
"""


def readme_tool_macros():
    # the T0/T1 example of README's definition section, as printed there
    import pathlib
    text = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    blocks = re.findall(r"```ini\n(.*?)```", text, re.S)
    found = [b for b in blocks if "[gcode_macro T0]" in b]
    assert len(found) == 1
    return found[0]


def cura_start(texts, def_id, initial):
    """The lines CuraEngine 4.13 writes at the start of a print for this
    Marlin-flavour two-extruder machine (FffGcodeWriter::processStartingCode:
    T<initial extruder> first, as for every machine with more than one
    extruder; no M190/M109 since the start G-code names the temperatures;
    absolute extrusion; the start G-code), then a change to the other
    extruder and back."""
    machine, _ = cura_definitions.parse(def_id, texts[def_id])
    start = machine.getProperty("machine_start_gcode", "default_value")
    assert prepends_heating(start) == (False, False)
    start = cura_definitions.start_gcode(
        start, {"initial_extruder_nr": initial,
                "material_bed_temperature_layer_0": 60},
        [{"material_print_temperature_layer_0": 205},
         {"material_print_temperature_layer_0": 215}])
    return (["T%d" % (initial,), "M82 ;absolute extrusion mode"]
            + start.splitlines() + ["G92 E0", "T%d" % (1 - initial,),
                                    "T%d" % (initial,)])


def test_two_extruders_start_needs_t_macros(cura, klippy_factory):
    def_id = "cura_connection_two_tools"
    # without T0/T1 macros the zip names them: Klippy runs Cura's start,
    # but ignores its T lines ("Unknown command"), so no tool ever changes
    k = klippy_factory(extra_cfg=SECOND_EXTRUDER, module_options={
        "name": "two tools", "cura_machine": "custom"})
    files = download(k.base_url(), def_id)
    texts = definition_texts(files)
    assert json.loads(texts[def_id])["overrides"][
        "machine_extruder_count"]["default_value"] == 2
    readme = " ".join(files["README.txt"].decode().split())
    assert "no [gcode_macro T0], [gcode_macro T1]" in readme
    lines = cura_start(texts, def_id, 1)
    assert lines[0] == "T1"
    seen = []
    for line in lines:
        k.gcode(line)
        seen.append(k.query("toolhead")["toolhead"]["extruder"])
    assert set(seen) == {"extruder"}
    k.stop()
    # with README's macros, Cura's start sequence selects the extruder
    # Cura prints with first, the user's PRINT_START heats with Cura's
    # values, and tools change
    k = klippy_factory(extra_cfg=SECOND_EXTRUDER + readme_tool_macros(),
                       module_options={"name": "two tools",
                                       "cura_machine": "custom"})
    files = download(k.base_url(), def_id)
    assert "gcode_macro T0" not in files["README.txt"].decode()
    seen = []
    for line in cura_start(definition_texts(files), def_id, 1):
        k.gcode(line)
        seen.append(k.query("toolhead")["toolhead"]["extruder"])
    assert seen[0] == "extruder1" and seen[-2:] == ["extruder", "extruder1"]
    st = k.query("heater_bed", "extruder", "extruder1")
    assert st["heater_bed"]["target"] == 60
    assert st["extruder1"]["target"] == 215
    assert st["extruder"]["target"] == 0


def test_without_the_definition_cura_shows_unknown(cura):
    # what README says Cura shows when the printer announces the custom
    # definition's BOM number and Cura lacks the definition: Cura's own
    # DiscoveredPrinter on the type its BOM lookup gives
    shown, heading, can_add = cura_definitions.discovered_listing(
        "Unknown", cura_definitions.DefinitionRegistry())
    assert (shown, can_add) == ("Unknown", False)
    assert heading == ("The printer(s) below cannot be connected because "
                       "they are part of a group")
    import pathlib
    readme = " ".join((pathlib.Path(__file__).parents[2] / "README.md")
                      .read_text().split())
    assert '"Unknown" under "%s"' % (heading,) in readme


# Uranium's own Resources code, asked where each system keeps the
# definitions of a Cura version (run in a child: Platform is patched)
URANIUM_PATHS = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from UM.Platform import Platform
from UM.Resources import Resources
home = sys.argv[3]
os.environ.update(HOME=home, APPDATA=os.path.join(home, "AppData"))
for var in ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
    os.environ.pop(var, None)
found = {}
for system in ("Windows", "OSX", "Linux"):
    for name in ("Windows", "OSX", "Linux"):
        setattr(Platform, "is" + name,
                classmethod(lambda cls, n=name: n == system))
    Resources.ApplicationIdentifier = "cura"
    Resources.ApplicationVersion = sys.argv[2]
    Resources._Resources__config_storage_path = None
    Resources._Resources__data_storage_path = None
    found[system] = Resources.getStoragePathForType(
        Resources.DefinitionContainers)
print(json.dumps(found))
"""


def uranium_definition_folders(python, uranium, version, home):
    import subprocess
    out = subprocess.run([python, "-c", URANIUM_PATHS, uranium, version,
                          str(home)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return json.loads(out.splitlines()[-1])


def documented_folders(home, version):
    """The module's folders as paths of this home and Cura version."""
    systems = {"Windows": "Windows", "macOS": "OSX", "Linux": "Linux"}
    return {systems[system]: folder.replace("<version>", version)
            .replace("%APPDATA%", str(home / "AppData")).replace("\\", "/")
            .replace("~", str(home)) + "/definitions"
            for system, folder in CURA_DATA_FOLDERS}


def test_definition_folders_are_where_cura_reads_them(cura, tmp_path):
    import pathlib
    import cura5_client
    import cura_client
    legs = [(sys.executable, str(cura_client.DEFAULT_CURA_ROOT / "usr" /
             "lib" / "python3" / "dist-packages"), "4.13.0", "4.13")]
    if not cura5_client.unavailable():
        legs.append((cura5_client.PYTHON, os.path.join(
            os.environ["CURA5_DIR"], "Uranium"), "5.11.0", "5.11"))
    for python, uranium, version, short in legs:
        home = tmp_path / short
        home.mkdir()
        found = uranium_definition_folders(python, uranium, version, home)
        assert found == documented_folders(home, short), (version, found)
        # not the folder Help > Show Configuration Folder opens on Linux
        assert not found["Linux"].startswith(str(home / ".config"))
    # the zip's README.txt, the web page and README.md name them all
    readme_txt = DEFINITION_HOWTO % {
        "id": "x", "bom": 1, "name": "x", "notes": "",
        "folders": cura_data_folders_text()}
    page = cura_data_folders_html()
    readme_md = (pathlib.Path(__file__).parents[2] / "README.md"
                 ).read_text()
    for system, folder in CURA_DATA_FOLDERS:
        assert "%s: %s\n" % (system, folder) in readme_txt
        assert "| %s | `%s` |" % (system, folder) in readme_md
        assert "<li>%s: <code>%s</code></li>" % (
            system, folder.replace("<", "&lt;").replace(">", "&gt;")) \
            in page
    assert "~/.config/cura/<version>, which is not it" in " ".join(
        readme_txt.split())
