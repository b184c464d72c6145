# Materials: the profiles Cura syncs and the one in each extruder.
#
# MaterialStore keeps the .xml.fdm_material files Cura sends (request
# threads; its own lock); LoadedMaterials the material in each extruder
# and whether a job waits for another one (any thread reads; the reactor
# changes it); SET_CURA_MATERIAL (reactor).  Files are written by the
# disk worker.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import logging
import os
import re
import shlex
import threading
import uuid

from .errors import BadInput, CuraError, NoSpace
from .gcode_meta import MAX_MATERIAL_TEXT
from .names import safe_base_name
from .storage import SavedState, write_file_atomic
from .threads import never_reactor


MATERIAL_NS = "{http://www.ultimaker.com/material}"
MATERIAL_SUFFIX = ".xml.fdm_material"


class MaterialStore:
    """Material profiles Cura syncs, kept so each is sent only once."""
    MAX_HELD = 8 << 20   # bytes kept for Curas waiting for CURA_ALLOW

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.index = None   # guid -> material info, read on first use
        self.resolved = {}  # resolve() answers, until the next add()
        self.held = {}      # client id or address -> {filename: data}
        self.released = []  # (filename, data) the DiskWorker stores
        self.dirty = False
        self.on_change = None   # the DiskWorker's wake-up
        self.version = 0    # counts added profiles (the front's list)

    @staticmethod
    def parse(data):
        from defusedxml import ElementTree
        from defusedxml import DefusedXmlException
        try:
            root = ElementTree.fromstring(data)
        except (ElementTree.ParseError, DefusedXmlException, ValueError) as e:
            raise BadInput("Not a valid material file: %s" % (e,))
        if root.tag != MATERIAL_NS + "fdmmaterial":
            raise BadInput("Not an fdmmaterial document")
        meta = root.find(MATERIAL_NS + "metadata")
        def text(path):
            el = meta.find(path) if meta is not None else None
            return (el.text or "").strip() if el is not None else ""
        guid = text(MATERIAL_NS + "GUID")
        version = text(MATERIAL_NS + "version")
        # plain digits only: int() would take "1_0", "+1", " 1"
        version = int(version) if re.match(r"^[0-9]{1,9}\Z", version) \
            else None
        # Not always a well-formed UUID: fdm-materials ships "...59p3"
        if version is None or not re.match(r"^[\w-]{1,100}$", guid):
            raise BadInput("Material file needs a GUID and a version")
        if version < 1:
            raise BadInput("Material version must be 1 or more")
        name = MATERIAL_NS + "name/" + MATERIAL_NS
        material, color = text(name + "material"), text(name + "color")
        # The profile's name as Cura shows it: its label, else colour and
        # type ("Black PLA"; a Generic colour is left out: "PLA")
        label = text(name + "label") or " ".join(
            n for n in (color if color != "Generic" else "", material) if n)
        return {"guid": guid, "version": version,
                "brand": text(name + "brand"), "material": material,
                "color": color, "name": label or "Unknown",
                "color_code": text(MATERIAL_NS + "color_code")}

    def _load(self):
        if self.index is not None:
            return
        self.index = {}
        os.makedirs(self.path, exist_ok=True)
        for fname in sorted(os.listdir(self.path)):
            if not fname.endswith(MATERIAL_SUFFIX):
                continue
            try:
                with open(os.path.join(self.path, fname), "rb") as f:
                    info = self.parse(f.read())
            except (OSError, CuraError) as e:
                logging.info("cura_connection: skipping material %s: %s",
                             fname, e)
                continue
            info["file"] = fname
            old = self.index.get(info["guid"])
            if old is None or old["version"] < info["version"]:
                self.index[info["guid"]] = info

    def list(self):
        with self.lock:
            self._load()
            # by GUID: the same list before and after a restart
            return [dict(m) for m in sorted(self.index.values(),
                                            key=lambda m: m["guid"])]

    @staticmethod
    def file_name(filename):
        name = safe_base_name(filename, "")
        if not name.endswith(MATERIAL_SUFFIX) or name == MATERIAL_SUFFIX:
            raise BadInput("Material file names end in %s"
                           % (MATERIAL_SUFFIX,))
        return name

    def keep_waiting(self, owner, filename, data):
        """Keep a profile from a Cura not allowed yet (checked now), by
        its client id or address: release() hands it to the DiskWorker,
        drop() forgets it.  Raises BadInput (not a profile) or NoSpace
        (MAX_HELD bytes kept)."""
        self.file_name(filename)
        self.parse(data)
        with self.lock:
            files = self.held.setdefault(owner, {})
            files.pop(filename, None)   # Cura sends again when it reconnects
            kept = sum(len(d) for owned in self.held.values()
                       for d in owned.values())
            if kept + len(data) > self.MAX_HELD:
                raise NoSpace("Too many material profiles wait for "
                              "CURA_ALLOW")
            files[filename] = data

    def release(self, *owners):
        # Reactor (CURA_ALLOW): memory only, the DiskWorker stores them
        with self.lock:
            for owner in owners:
                self.released += self.held.pop(owner, {}).items()
            self.dirty = bool(self.released)
        if self.dirty and self.on_change is not None:
            self.on_change()

    def forget_waiting(self, *owners):
        with self.lock:
            for owner in owners:
                self.held.pop(owner, None)

    @never_reactor
    def save(self):
        """Store released profiles (DiskWorker thread)."""
        with self.lock:
            files, self.released = self.released, []
            self.dirty = False
        for i, (filename, data) in enumerate(files):
            try:
                self.add(filename, data)
            except CuraError as e:
                logging.info("cura_connection: material %s: %s",
                             filename, e.message)
            except OSError:
                with self.lock:   # tried again on the next step
                    self.released = files[i:] + self.released
                    self.dirty = True
                raise

    def add(self, filename, data):
        name = self.file_name(filename)
        info = self.parse(data)
        with self.lock:
            self._load()
            old = self.index.get(info["guid"])
            if old is not None and old["version"] >= info["version"]:
                return False
            taken = {m["file"] for m in self.index.values()
                     if m["guid"] != info["guid"]}
            if name in taken:
                # another profile's file: writing it would lose that one
                stem = safe_base_name(info["guid"]) + "-"
                name = next(n for n in (
                    "%s%d%s" % (stem, i, MATERIAL_SUFFIX)
                    for i in range(len(taken) + 1)) if n not in taken)
            write_file_atomic(os.path.join(self.path, name), data)
            if old is not None and old["file"] != name:
                try:
                    os.unlink(os.path.join(self.path, old["file"]))
                except OSError:
                    pass
            info["file"] = name
            self.index[info["guid"]] = info
            self.version += 1
            self.resolved.clear()
            return True

    def name_job_materials(self, wanted, profiles):
        """Not the reactor: the job materials wanted (parse_job_materials)
        with brand, material, colour and name from the file's own profiles
        (profiles: guid -> parse()), else from the stored ones by GUID; a
        GUID neither knows keeps no names."""
        out = []
        for entry in wanted:
            entry = dict(entry)
            guid = entry.get("guid")
            try:
                info = guid and (profiles.get(guid) or self.resolve(
                    {"guid": guid}))
            except OSError:     # no materials folder: no names, no loss
                info = None
            if info:
                # (as long as a saved job keeps them: valid_job_materials)
                entry.update((k, info[k][:MAX_MATERIAL_TEXT]) for k in (
                    "brand", "material", "color", "color_code", "name")
                    if info.get(k))
            out.append(entry)
        return out

    def resolve(self, entry):
        """The stored profile a loaded-material entry names, or None: by
        GUID, else the first match of material type, brand and colour
        (name or code), Generic brand first."""
        key = tuple(sorted(entry.items()))
        with self.lock:
            self._load()
            if key in self.resolved:
                return self.resolved[key]
            found = None
            if entry.get("guid"):
                found = self.index.get(entry["guid"])
            elif entry.get("material"):
                want = entry["material"].lower()
                brand = entry.get("brand", "").lower()
                color = entry.get("color", "").lower()
                matches = [m for m in self.index.values()
                           if m["material"].lower() == want
                           and (not brand or m["brand"].lower() == brand)
                           and (not color or color in (
                               m["color"].lower(), m["color_code"].lower()))]
                if matches:
                    found = min(matches, key=lambda m: (
                        m["brand"].lower() != "generic", m["brand"],
                        m["color"], m["guid"]))
            self.resolved[key] = found and dict(found)
            return self.resolved[key]
MATERIAL_WORDS = ("GUID", "BRAND", "MATERIAL", "COLOR")
COLOR_CODE_RE = re.compile(r"^#?([0-9a-fA-F]{6})$")


def parse_material_words(words):
    """{"GUID", "BRAND", "MATERIAL", "COLOR": text} (a subset) -> the entry
    LoadedMaterials keeps; MATERIAL=empty means nothing is loaded."""
    unknown = sorted(set(words) - set(MATERIAL_WORDS))
    if unknown:
        raise ValueError("Unknown parameter %s (use %s)"
                         % (unknown[0], ", ".join(MATERIAL_WORDS)))
    entry = {}
    for key in MATERIAL_WORDS:
        value = str(words.get(key) or "").strip()
        if len(value) > 64 or not value.isprintable():
            raise ValueError("%s must be at most 64 printable characters"
                             % (key,))
        if value:
            entry[key.lower()] = value
    if entry.get("material", "").lower() in ("empty", "none"):
        return {"material": "empty"}
    if "guid" in entry:
        try:
            entry["guid"] = str(uuid.UUID(entry["guid"]))
        except ValueError:
            raise ValueError("GUID=%s is not a GUID" % (entry["guid"],))
    elif "material" not in entry:
        raise ValueError("Give GUID=<guid> (a material Cura knows), or "
                         "MATERIAL=<type> with optional BRAND= and COLOR=")
    m = COLOR_CODE_RE.match(entry.get("color", ""))
    if m:
        entry["color"] = "#" + m.group(1).lower()
    return entry


def parse_material_option(text):
    # "GUID=..." or "MATERIAL=PETG COLOR=ff8000 BRAND=\"Some Brand\"",
    # the words of SET_CURA_MATERIAL; a lone GUID is fine too.
    words = {}
    parts = shlex.split(text)
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep and len(parts) == 1:
            key, value = "GUID", part
        elif not sep:
            raise ValueError("'%s' is not KEY=value" % (part,))
        words[key.strip().upper()] = value
    return parse_material_words(words)


def material_differs(wanted, loaded):
    """Whether a job that wants the material wanted (a job materials
    entry) must wait while loaded (a LoadedMaterials entry or None) is in
    its extruder: only when both are known and they differ.  By GUID when
    both have one, else by type, then brand and colour where both say (a
    Generic profile is any brand's, in any colour)."""
    if not loaded or loaded.get("material") == "empty":
        return False    # nothing known, or nothing to swap: no hold
    if loaded.get("guid") and wanted.get("guid"):
        return loaded["guid"].lower() != wanted["guid"].lower()
    if not loaded.get("material") or not wanted.get("material"):
        return False
    if loaded["material"].lower() != wanted["material"].lower():
        return True
    brand = loaded.get("brand", "").lower()
    want = wanted.get("brand", "").lower()
    if brand and want not in ("", "generic", brand):
        return True
    color = loaded.get("color", "").lower()
    names = [wanted.get(k, "").lower() for k in ("color", "color_code")]
    return bool(color and names[0] not in ("", "generic")
                and color not in names)


class LoadedMaterials(SavedState):
    """The material in each extruder, shown on Cura's printer card.

    SET_CURA_MATERIAL changes it in the reactor, in memory only; the
    DiskWorker thread writes the file.  With hold_mismatch (the option
    hold_material_mismatch), a queued job sliced for another material
    waits, as on an Ultimaker."""
    def __init__(self, path, defaults, hold_mismatch=True):
        SavedState.__init__(self, path)
        self.hold_mismatch = hold_mismatch
        self.names = [name for name, _ in defaults]
        self.entries = dict(defaults)
        saved = self._load()
        for name in self.names:
            if name in saved:
                self.entries[name] = saved[name]
        self._update_status_cache()

    def _load(self):
        extruders = self.read_file().get("extruders", {})
        if not isinstance(extruders, dict):
            self.discard("extruders", "not an object")
            return {}
        saved = {}
        for name, entry in extruders.items():
            try:
                if entry is not None and not (
                        isinstance(entry, dict) and all(
                            isinstance(k, str) and isinstance(v, str)
                            for k, v in entry.items())):
                    raise ValueError("not an object of texts")
                saved[name] = entry and parse_material_words(
                    {k.upper(): v for k, v in entry.items()})
            except ValueError as e:
                self.discard("the material of %s" % (name,), e)
        return saved

    def _update_status_cache(self):
        # get_status() runs in the reactor: hand it a ready-made dict
        self.status_cache = {name: self.entries.get(name) and
                             dict(self.entries[name]) for name in self.names}

    def set(self, name, entry):
        """Reactor (SET_CURA_MATERIAL); BadInput for an unknown extruder."""
        if name not in self.names:
            raise BadInput("Unknown extruder '%s' (known: %s)"
                           % (name, ", ".join(self.names)))
        with self.lock:
            self.entries[name] = entry
            self._update_status_cache()
            self.changed()

    def get(self, index):
        with self.lock:
            if index >= len(self.names):
                return None
            return self.entries.get(self.names[index])

    def changes(self, wanted):
        """Any thread: [(extruder index, wanted entry, loaded entry)] for
        the job materials wanted whose extruder holds another material
        (material_differs); extruders this printer lacks are left out."""
        out = []
        for entry in wanted:
            loaded = self.get(entry["extruder"])
            if material_differs(entry, loaded):
                out.append((entry["extruder"], entry, loaded))
        return out

    def configuration_changes(self, job):
        """Any thread (memory only): [(extruder index, wanted, loaded)]
        a queued job waits for (changes()); none once forced or without
        hold_mismatch."""
        if not self.hold_mismatch or job.force \
                or job.status != "queued" or not job.materials:
            return []
        return self.changes(job.materials)

    def state(self):
        return {"version": 1, "extruders": {
            name: self.entries.get(name) for name in self.names}}


class MaterialCommands:
    """SET_CURA_MATERIAL: the material in each extruder, as Cura is to
    show it.  Reactor (a G-code command): memory only, the disk worker
    saves; bad input raises only gcmd.error."""
    COMMANDS = ("SET_CURA_MATERIAL",)

    def __init__(self, loaded, bridge, lifecycle, shown, group=None):
        self.loaded = loaded
        self.bridge = bridge
        self.lifecycle = lifecycle
        self.shown = shown
        self.group = group      # PrinterGroup (PRINTER=) or None

    cmd_SET_CURA_MATERIAL_help = (
        "Tell Cura which material is loaded: EXTRUDER= GUID= or MATERIAL= "
        "BRAND= COLOR= (MATERIAL=empty: none; PRINTER=<name>: a printer "
        "of the group)")
    def cmd_SET_CURA_MATERIAL(self, gcmd):
        printer = gcmd.get("PRINTER", None)
        member = None
        if printer is not None and (self.group is None
                                    or printer != self.group.host_name):
            if self.group is None or printer not in self.group.by_name:
                raise gcmd.error("No printer %s in this group" % (printer,))
            member = self.group.by_name[printer]
        loaded = member.loaded if member else self.loaded
        name = gcmd.get("EXTRUDER", None)
        if name is None:
            name = "extruder" if member else self.bridge.active_extruder()
        words = {k: v for k, v in gcmd.get_command_parameters().items()
                 if k not in ("EXTRUDER", "PRINTER")}
        if not words:
            entry = loaded.status_cache.get(name)
            gcmd.respond_info("%s: %s" % (name, " ".join(
                "%s=%s" % (k.upper(), shlex.quote(v))
                for k, v in sorted(entry.items())) if entry else "not set"))
            return
        try:
            entry = parse_material_words(words)
            loaded.set(name, entry)
        except ValueError as e:
            raise gcmd.error(str(e))
        except CuraError as e:
            raise gcmd.error(e.message)
        # a job waiting for this material starts now
        if member is not None:
            member.wake.set()
        else:
            self.lifecycle.follow(self.bridge.publish_now())
        self.shown()
        gcmd.respond_info("%s%s: material set for Cura" % (
            member.name + " " if member else "", name))
