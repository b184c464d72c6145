# What Cura is told this printer is.
#
# The printer's identity (name, uuid, the Ultimaker machine it poses as,
# print cores), the Cura machine definition made from printer.cfg (the
# custom machine and its downloads), the help text and the web page.
# Made at config load (reactor); read by any thread of either process.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import json
import os
import re
import zlib

from .errors import NotFound


# Ultimaker machine types Cura knows: option value -> (BOM number, variant).
# The BOM number makes Cura create that machine definition; the variant is
# the display name Cura shows (and the picture it picks).
CURA_MACHINES = {
    "ultimaker_s3": (213482, "Ultimaker S3"),
    "ultimaker_s5": (9051, "Ultimaker S5"),
    "ultimaker3": (9066, "Ultimaker 3"),
    "ultimaker3_extended": (9511, "Ultimaker 3 Extended"),
}


# cura_machine: custom advertises the definition made from printer.cfg
# (MachineDefinition) under a private BOM number: 9 digits starting with
# 7, which no Ultimaker BOM is a prefix of (Cura matches by prefix).
CUSTOM_MACHINE = "custom"
CUSTOM_BOM_BASE = 700000000


def extruder_sections(config):
    """Klipper's [extruder], [extruder1]... section names in order (Cura
    takes up to 16: machine_extruder_count)."""
    names = []
    while len(names) < 16 and config.has_section(
            "extruder%s" % (len(names) or "",)):
        names.append("extruder%s" % (len(names) or "",))
    return names


class PrinterIdentity:
    """What Cura is told this printer is: its name and uuid, the
    Ultimaker machine it poses as (BOM number, variant), one print core
    per extruder, Klipper's version.  Made at config load, never changed
    (any thread)."""
    def __init__(self, name, printer_uuid, machine_bom, machine_variant,
                 print_core_ids, klipper_version="unknown"):
        self.name = name
        self.printer_uuid = printer_uuid
        self.machine_bom = machine_bom
        self.machine_variant = machine_variant
        self.print_core_ids = list(print_core_ids)
        self.extruder_count = len(self.print_core_ids)
        self.klipper_version = klipper_version


def definition_download(def_id, zip_data, files, fname=None):
    """(bytes, content type, headers) of the machine definition's zip
    (fname None) or of one of its files; NotFound for no such file.  Both
    processes serve the downloads with this."""
    if fname is None:
        return zip_data, "application/zip", [(
            "Content-Disposition", 'attachment; filename="%s.zip"'
            % (def_id,))]
    data = files.get(fname)
    if data is None:
        raise NotFound("No definition file %s" % (fname,))
    return data, "application/json", [(
        "Content-Disposition", 'attachment; filename="%s"' % (fname,))]


class MachineDefinition:
    """A Cura machine definition (plus one per extruder) made from
    printer.cfg.  With cura_machine: custom, Cura finds it by its BOM
    number and creates this printer instead of an Ultimaker."""
    def __init__(self, config, name):
        slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
        self.id = "cura_connection_" + (slug or "printer")
        self.bom = CUSTOM_BOM_BASE + zlib.crc32(self.id.encode()) % 10**8
        self.name = "%s (Klipper)" % (name,)
        self.notes = []
        self.files = {}
        extruders = [
            (self._number(self._opt(config, sec, "nozzle_diameter", 0.4)),
             self._number(self._opt(config, sec, "filament_diameter", 1.75)))
            for sec in extruder_sections(config)] or [(0.4, 1.75)]
        macros = set(s.get_name().split(None, 1)[-1].upper()
                     for s in config.get_prefix_sections("gcode_macro "))
        trains = {str(i): "%s_extruder_%d" % (self.id, i)
                  for i in range(len(extruders))}
        overrides = self._volume(config)
        overrides.update(self._motion(config))
        heated = config.has_section("heater_bed")
        start, end = self._gcode(macros, heated)
        self._tool_macros(macros, len(extruders))
        overrides.update({
            "machine_name": name,
            "machine_heated_bed": heated,
            "machine_extruder_count": len(extruders),
            "machine_gcode_flavor": "RepRap (Marlin/Sprinter)",
            "machine_start_gcode": start,
            "machine_end_gcode": end})
        self._add(self.id, {
            "version": 2, "name": self.name, "inherits": "fdmprinter",
            "metadata": {
                "visible": True,
                "author": "cura_connection (from printer.cfg)",
                # Cura looks BOM numbers up among Ultimaker's machines only
                "manufacturer": "Ultimaker B.V.",
                "file_formats": "application/x-ufp;text/x-gcode",
                "has_materials": True,
                "preferred_material": "generic_pla_175"
                if extruders[0][1] < 2.5 else "generic_pla",
                "machine_extruder_trains": trains,
                "supports_usb_connection": False,
                "supports_network_connection": True,
                "supported_actions": ["DiscoverUM3Action"],
                "bom_numbers": [self.bom]},
            "overrides": {k: {"default_value": v}
                          for k, v in overrides.items()}})
        for i, (nozzle, filament) in enumerate(extruders):
            self._add(trains[str(i)], {
                "version": 2, "name": "Extruder %d" % (i + 1,),
                "inherits": "fdmextruder",
                "metadata": {"machine": self.id, "position": str(i)},
                "overrides": {
                    "extruder_nr": {"default_value": i,
                                    "maximum_value": str(len(extruders) - 1)},
                    "machine_nozzle_size": {"default_value": nozzle},
                    "material_diameter": {"default_value": filament}}})

    def _add(self, def_id, data):
        self.files[def_id + ".def.json"] = (
            json.dumps(data, indent=4) + "\n").encode()

    @staticmethod
    def _opt(config, section, option, default, kind="float"):
        # note_valid=False: reading another section must not hide its typos
        if not config.has_section(section):
            return default
        sec = config.getsection(section)
        try:
            if kind == "float":
                return sec.getfloat(option, default, note_valid=False)
            return sec.get(option, default, note_valid=False)
        except config.error:
            return default

    @staticmethod
    def _number(value):
        # Whole numbers as JSON integers, as Cura's own definitions write
        # them: Cura hands some values to code that takes only ints.
        value = round(value, 4)
        return int(value) if value == int(value) else value

    @staticmethod
    def _whole_mm(value):
        # Build volume in whole millimetres, rounded down (never beyond the
        # printer's limits): Cura 4.13's arranger takes only integers.
        return int(value + 1e-6)

    def _volume(self, config):
        kin = self._opt(config, "printer", "kinematics", "none", "str")
        size = None
        if kin in ("delta", "rotary_delta"):
            radius = (self._opt(config, "printer", "print_radius", None)
                      or self._opt(config, "printer", "delta_radius", None))
            height = self._opt(config, "stepper_a", "position_endstop", None)
            if radius and height:
                shape, center = "elliptic", True
                size = [2 * radius, 2 * radius, height]
        else:
            axes = [(self._opt(config, s, "position_min", 0.),
                     self._opt(config, s, "position_max", None))
                    for s in ("stepper_x", "stepper_y", "stepper_z")]
            if all(hi is not None for lo, hi in axes):
                (xlo, xhi), (ylo, yhi), (_, zhi) = axes
                # -150..150: the origin is the bed's centre, and Cura's bed
                # spans -w/2..w/2.  Otherwise the bed starts at 0; negative
                # minimums are parking room.
                shape, center = "rectangular", all(
                    lo < 0 and abs(lo + hi) <= .1 * (hi - lo)
                    for lo, hi in axes[:2])
                if center:
                    size = [2 * min(-xlo, xhi), 2 * min(-ylo, yhi), zhi]
                else:
                    size = [xhi, yhi, zhi]
                    for axis, (lo, _) in zip("xy", axes):
                        if lo > 0:
                            self.notes.append(
                                "stepper_%s position_min is %g: Cura's "
                                "build plate starts at 0; keep models "
                                "clear of its first %g mm (Klipper "
                                "refuses moves there)." % (axis, lo, lo))
        if size and min(self._whole_mm(v) for v in size) >= 1:
            width, depth, height = [self._whole_mm(v) for v in size]
            return {"machine_shape": shape, "machine_center_is_zero": center,
                    "machine_width": width, "machine_depth": depth,
                    "machine_height": height}
        self.notes.append("No build volume in printer.cfg (kinematics %s): "
                          "200 mm cube; set it in Cura's Machine Settings"
                          % (kin,))
        return {"machine_shape": "rectangular",
                "machine_center_is_zero": False, "machine_width": 200,
                "machine_depth": 200, "machine_height": 200}

    def _motion(self, config):
        velocity = self._opt(config, "printer", "max_velocity", 300.)
        accel = self._opt(config, "printer", "max_accel", 3000.)
        limits = {
            "machine_max_feedrate_x": velocity,
            "machine_max_feedrate_y": velocity,
            "machine_max_feedrate_z": self._opt(
                config, "printer", "max_z_velocity", velocity),
            "machine_max_acceleration_x": accel,
            "machine_max_acceleration_y": accel,
            "machine_max_acceleration_z": self._opt(
                config, "printer", "max_z_accel", accel),
            "machine_acceleration": accel}
        return {k: self._number(v) for k, v in limits.items()}

    def _tool_macros(self, macros, count):
        # CuraEngine writes T0 before the start G-code of every print on a
        # machine with more than one extruder, and Tn at each tool change;
        # Klipper has no such commands unless printer.cfg defines them (it
        # only answers "Unknown command").
        missing = ["T%d" % (i,) for i in range(count)
                   if "T%d" % (i,) not in macros]
        if count > 1 and missing:
            self.notes.append(
                "Cura writes T0..T%d (the extruder to print with) before "
                "the start G-code of every print and at each tool change, "
                "but printer.cfg has no [gcode_macro %s].  Unless "
                "another section (a tool changer's) defines them, add "
                "macros that select the extruder (T1: ACTIVATE_EXTRUDER "
                "EXTRUDER=extruder1): Klipper answers \"Unknown command\" "
                "to these and ignores them, so a print runs all on one "
                "extruder."
                % (count - 1, "], [gcode_macro ".join(missing)))

    def _gcode(self, macros, heated):
        start = [m for m in ("PRINT_START", "START_PRINT") if m in macros]
        end = [m for m in ("PRINT_END", "END_PRINT") if m in macros]
        if start:
            # Naming the temperatures also stops Cura adding its own
            # M190/M109 before the macro.
            bed = " BED_TEMP={material_bed_temperature_layer_0}" \
                if heated else ""
            start_gcode = ("; heating, homing and priming: your %s macro\n"
                           "%s%s EXTRUDER_TEMP={material_print_temperature"
                           "_layer_0, initial_extruder_nr}"
                           % (start[0], start[0], bed))
        else:
            start_gcode = "G28 ; home all axes\nG92 E0\n"
        if end:
            end_gcode = "%s\n" % (end[0],)
        else:
            end_gcode = ("M104 S0 ; heaters off\n"
                         + ("M140 S0\n" if heated else "")
                         + "M107 ; fan off\nM84 ; motors off\n")
        return start_gcode, end_gcode

    def zip(self):
        import io
        import textwrap
        import zipfile
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for fname, data in sorted(self.files.items()):
                folder = "definitions" if fname == self.id + ".def.json" \
                    else "extruders"
                z.writestr("%s/%s" % (folder, fname), data)
            notes = "".join("\n%s\n" % (textwrap.fill("Note: " + n, 72),)
                            for n in self.notes)
            z.writestr("README.txt", DEFINITION_HOWTO % {
                "id": self.id, "bom": self.bom, "name": self.name,
                "folders": cura_data_folders_text(), "notes": notes})
        return buf.getvalue()


# Where Cura reads machine definitions from, per system: Uranium's data
# folder (on Linux not its configuration folder)
CURA_DATA_FOLDERS = (
    ("Windows", "%APPDATA%\\cura\\<version>"),
    ("macOS", "~/Library/Application Support/cura/<version>"),
    ("Linux", "~/.local/share/cura/<version>"),
)
CURA_DATA_FOLDER_NOTE = (
    "<version> is Cura's, e.g. 5.11. Help > Show Configuration Folder"
    " opens it on Windows and macOS; on Linux it opens"
    " ~/.config/cura/<version>, which is not it. A set $XDG_DATA_HOME"
    " takes the place of ~/.local/share.")


def cura_data_folders_text():
    # for the zip's README.txt
    import textwrap
    return "".join("     %s: %s\n" % f for f in CURA_DATA_FOLDERS) + \
        textwrap.fill(CURA_DATA_FOLDER_NOTE, 72, initial_indent="   ",
                      subsequent_indent="   ")


def cura_data_folders_html():
    # for the web page (where it says <!--cura-data-folders-->)
    from html import escape
    return "<ul>%s</ul><small>%s</small>" % ("".join(
        "<li>%s: <code>%s</code></li>" % (escape(system), escape(folder))
        for system, folder in CURA_DATA_FOLDERS),
        escape(CURA_DATA_FOLDER_NOTE))
DEFINITION_HOWTO = """\
Cura machine definition for %(name)s, made by cura_connection from the
printer's Klipper configuration.

1. Close Cura.  Cura reads machine definitions from the "definitions"
   and "extruders" folders of its data folder:
%(folders)s
2. Copy definitions/*.def.json into that folder's "definitions" folder
   and extruders/*.def.json into its "extruders" folder (create them if
   missing).
3. In printer.cfg, [cura_connection]: cura_machine: custom, then restart
   Klipper.  The printer now announces BOM %(bom)s, which is this
   definition's (%(id)s).
4. Start Cura, Add printer > Add a networked printer (or Add printer by
   IP): the printer shows as "%(name)s".  Not under "Add a
   non-networked printer" (there it is listed under Ultimaker B.V.): a
   printer added that way has no network connection.
   If Cura shows the printer as "Unknown" and will not connect, it lacks
   this definition: check step 2 and restart Cura.
5. A printer added earlier as an Ultimaker keeps that type (and its build
   plate and print cores).  Add the printer again as in step 4 first, then
   remove the old one in Preferences > Printers (Cura keeps Remove greyed
   out while it is the only printer).
%(notes)s"""
WEB_PAGE = os.path.join(os.path.dirname(os.path.realpath(__file__)),
                        "web_page.html")


def web_page():
    """The web page's bytes, with Cura's data folders filled in (either
    process serves it); OSError when the file is missing."""
    with open(WEB_PAGE, "rb") as f:
        page = f.read()
    return page.replace(b"<!--cura-data-folders-->",
                        cura_data_folders_html().encode())
