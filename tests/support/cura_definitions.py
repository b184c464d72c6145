"""Cura 4.13's own machine-definition code, headless, for tests.

* parse(): Uranium's DefinitionContainer reads a .def.json with its real
  parents (fdmprinter, fdmextruder) from Cura's bundled resources, as Cura
  does at start-up.
* DefinitionRegistry: the definitions' metadata made by Uranium's
  DefinitionContainer.deserializeMetadata (what Cura's ContainerRegistry
  holds), for every bundled definition plus extra ones (as if copied into
  Cura's configuration folder).
* printer_type(): the plugin's LocalClusterOutputDeviceManager maps a
  discovered printer's properties (zeroconf TXT, or /api/v1/system for
  add-by-IP) to a machine definition by BOM number, unmodified; here with
  DefinitionRegistry as Cura's container registry.

Scaffolding, as in cura_client: the definition-file version upgrade step
(VersionUpgradeManager needs the running application; version-2 files are
current, so it would change nothing) is skipped, Cura's setting types are
registered with CuraApplication's own classmethod, and the application
singleton and the output-device class of the manager module are small
stand-ins (only the BOM lookup code is under test).
"""
from pathlib import Path

import cura_client

_state = {}


def load():
    if _state:
        return _state["cura"]
    cura = cura_client.load()
    from UM.Resources import Resources
    from UM.Settings.DefinitionContainer import DefinitionContainer
    from cura.CuraApplication import CuraApplication
    CuraApplication._initializeSettingDefinitions()   # Cura's setting types
    resources = cura.root / "usr/share/cura/resources"
    Resources.addSearchPath(str(resources))

    class Definition(DefinitionContainer):
        @classmethod
        def _updateSerialized(cls, serialized, file_name=None):
            return serialized

    _state.update(cura=cura, Definition=Definition, resources=resources)
    return cura


def parse(def_id, text):
    """Deserialize like Cura; returns (container, valid): valid is False
    when an override names a setting the parents do not have."""
    load()
    container = _state["Definition"](def_id)
    _, valid = container.readAndValidateSerialized(text)
    container.deserialize(text, def_id + ".def.json")
    return container, valid


class DefinitionRegistry:
    """Metadata of Cura's bundled definitions and `extra` ({id: text}),
    answering the ContainerRegistry queries the plugin makes."""

    def __init__(self, extra=None):
        load()
        self.extra = dict(extra or {})
        self.files = {}
        for folder in ("definitions", "extruders"):
            for path in (_state["resources"] / folder).glob("*.def.json"):
                self.files[path.name[:-len(".def.json")]] = path
        self.metadata = {}

    def _text(self, def_id):
        if def_id in self.extra:
            return self.extra[def_id]
        return Path(self.files[def_id]).read_text(encoding="utf-8")

    def _get(self, def_id):
        if def_id not in self.metadata:
            from UM.Settings.ContainerRegistry import ContainerRegistry
            saved = ContainerRegistry.getInstance
            # deserializeMetadata asks the registry for the parents
            ContainerRegistry.getInstance = classmethod(lambda cls: self)
            try:
                found = _state["Definition"].deserializeMetadata(
                    self._text(def_id), def_id)
            finally:
                ContainerRegistry.getInstance = saved
            self.metadata[def_id] = found[0] if found else None
        return self.metadata[def_id]

    def _all(self):
        return [m for m in (self._get(i) for i in
                            sorted(set(self.files) | set(self.extra)))
                if m is not None]

    def findDefinitionContainersMetadata(self, **kwargs):
        if set(kwargs) == {"id"}:
            if kwargs["id"] not in self.files and kwargs["id"] not in \
                    self.extra:
                return []
            found = self._get(kwargs["id"])
            return [found] if found else []
        return [m for m in self._all()
                if all(m.get(k) == v for k, v in kwargs.items())]

    findContainersMetadata = findDefinitionContainersMetadata

    def findContainers(self, **kwargs):
        return []


class _Devices:
    """Stand-in for Cura's DiscoveredPrintersModel: records what the
    plugin adds (the machine type it would create)."""

    def __init__(self):
        self.discoveredPrintersByAddress = {}
        self.added = []

    def addDiscoveredPrinter(self, **kwargs):
        self.added.append(kwargs)


class _App:
    def __init__(self, registry):
        self.registry = registry
        self.devices = _Devices()

    def getInstance(self):
        return self

    def getContainerRegistry(self):
        return self.registry

    def getDiscoveredPrintersModel(self):
        return self.devices

    def getGlobalContainerStack(self):
        return None   # no machine yet: nothing to reconnect

    def callLater(self, function, *args):
        function(*args)


class _Device:
    """Stand-in for LocalClusterOutputDevice (a full output device); its
    printerType is NetworkedPrinterOutputDevice's own property code."""

    def __init__(self, key, address, properties):
        self.key = key
        self.address = address
        self._properties = properties

    def getId(self):
        return self.key

    def getName(self):
        return self._properties.get(b"name", b"").decode("utf-8")

    @property
    def printerType(self):
        cls = load().NetworkedPrinterOutputDevice
        return cls.printerType.fget(self)


class _Signal:
    def emit(self, *args):
        pass


def _manager_module():
    import UM3NetworkPrinting.src.Network.LocalClusterOutputDeviceManager \
        as module
    return module


def _manager(registry):
    real = _manager_module().LocalClusterOutputDeviceManager

    class Manager:
        _onDeviceDiscovered = real._onDeviceDiscovered
        _onCheckManualDeviceResponse = real._onCheckManualDeviceResponse
        _getPrinterTypeIdentifiers = staticmethod(
            real._getPrinterTypeIdentifiers)
        _connectToActiveMachine = real._connectToActiveMachine
        _createMachineFromDiscoveredDevice = \
            real._createMachineFromDiscoveredDevice

        def __init__(self):
            self._discovered_devices = {}
            self.discoveredDevicesChanged = _Signal()
            self.stored = []

        def _storeManualAddress(self, address):
            self.stored.append(address)

    return Manager()


def printer_type(properties, registry):
    """Cura's _onDeviceDiscovered on zeroconf properties ({str: str});
    returns the machine definition id Cura would create ("Unknown": none)."""
    load()
    manager, app = _manager(registry), _App(registry)
    props = {k.encode(): v.encode() for k, v in properties.items()}
    with cura_client._patched(_manager_module(), CuraApplication=app,
                              LocalClusterOutputDevice=_Device):
        manager._onDeviceDiscovered("printer._ultimaker._tcp.local.",
                                    "127.0.0.1", props)
    added = app.devices.added[0]
    assert props[b"printer_type"].decode() == added["machine_type"]
    return added["machine_type"]


def printer_type_by_ip(address, registry):
    """Add-by-IP as Cura does it: GET /api/v1/system through Cura's
    ClusterApiClient, then _onCheckManualDeviceResponse; returns the
    machine definition id."""
    status = cura_client.ClusterApi(address).system()
    manager, app = _manager(registry), _App(registry)
    with cura_client._patched(_manager_module(), CuraApplication=app,
                              LocalClusterOutputDevice=_Device):
        manager._onCheckManualDeviceResponse(address, status)
    assert manager.stored == [address]
    return app.devices.added[0]["machine_type"]


def start_gcode(template, global_values, extruder_values):
    """Cura's start/end G-code token expansion (CuraEngineBackend's
    GcodeStartEndFormatter), as StartSliceJob calls it."""
    load()
    import sys
    plugins = str(_state["cura"].root / "usr/lib/cura/plugins")
    if plugins not in sys.path:
        sys.path.insert(0, plugins)
    from CuraEngineBackend.StartSliceJob import GcodeStartEndFormatter
    settings = {"-1": dict(global_values)}
    for nr, values in enumerate(extruder_values):
        settings[str(nr)] = dict(values)
    settings["default_extruder_nr"] = -1
    return str(GcodeStartEndFormatter(default_extruder_nr=-1).format(
        template, **settings))


# How each setting type Cura declares must be written in a definition's
# JSON: whole numbers as JSON integers, as Cura's own definitions write them
# (Cura hands some float settings, the build volume, to code that takes only
# ints); every other float a float.
def _is_number(v):
    return type(v) in (int, float)


_FORMS = {
    "int": lambda v, d: type(v) is int,
    "float": lambda v, d: type(v) is int or (type(v) is float
                                              and not v.is_integer()),
    "bool": lambda v, d: type(v) is bool,
    "str": lambda v, d: type(v) is str,
    "enum": lambda v, d: type(v) is str and v in d.options,
    "extruder": lambda v, d: type(v) is int,
    "polygon": lambda v, d: type(v) is list and all(
        type(p) is list and len(p) == 2 and all(map(_is_number, p))
        for p in v),
    "polygons": lambda v, d: type(v) is list and all(
        _FORMS["polygon"](p, d) for p in v),
}


# Declared float, but Cura 4.13's arranger hands them times 10000 to
# pynest2d's Box(), which takes only ints (Nest2DArrange.findNodePlacement).
_WHOLE = {"machine_width", "machine_depth"}


def stacks(texts):
    """Uranium ContainerStacks as Cura builds them for a machine: the
    global one on the definition that inherits fdmprinter, one per
    extruder definition with the global stack next.  texts: {id: json}.
    Returns (global_stack, {id: extruder_stack}, {id: container})."""
    load()
    from UM.Settings.ContainerStack import ContainerStack
    import json
    containers = {i: parse(i, t)[0] for i, t in texts.items()}
    machine = [i for i, t in texts.items()
               if json.loads(t)["inherits"] == "fdmprinter"]
    assert len(machine) == 1, machine
    global_stack = ContainerStack(machine[0] + "_stack")
    global_stack.addContainer(containers[machine[0]])
    extruders = {}
    for def_id, container in containers.items():
        if def_id != machine[0]:
            extruders[def_id] = ContainerStack(def_id + "_stack")
            extruders[def_id].addContainer(container)
            extruders[def_id].setNextStack(global_stack)
    return global_stack, extruders, containers


def setting_report(texts):
    """Every default_value the definitions set, checked as Cura takes it:
    the setting exists in fdmprinter/fdmextruder, its JSON form fits the
    declared type (_FORMS; enum: one of the options) and Cura's code
    (_WHOLE), the stack's "value" (what Cura reads) is that value,
    unchanged, and Uranium's own Validator finds it within
    minimum/maximum and their warnings.
    Returns [(definition id, key, declared type, value, problem or None)]."""
    import json
    global_stack, extruder_stacks, containers = stacks(texts)
    from UM.Settings.Validator import Validator, ValidatorState
    report = []
    for def_id, text in sorted(texts.items()):
        stack = extruder_stacks.get(def_id, global_stack)
        for key, props in sorted(json.loads(text)["overrides"].items()):
            found = containers[def_id].findDefinitions(key=key)
            if not found:
                report.append((def_id, key, None, None, "no such setting"))
                continue
            declared = found[0].type
            value = props.get("default_value")
            problem = None
            form = _FORMS.get(declared)
            if form is None:
                problem = "no check for type %s" % (declared,)
            elif "default_value" in props and not form(value, found[0]):
                problem = "%r is not written as Cura's %s" % (value, declared)
            elif key in _WHOLE and type(value) is not int:
                problem = "%r: Cura's arranger needs an int" % (value,)
            elif "default_value" in props:
                read = stack.getProperty(key, "value")
                state = Validator(key)(stack)
                if read != value or type(read) is not type(value):
                    problem = "Cura reads %r" % (read,)
                elif state != ValidatorState.Valid:
                    problem = "Cura's validator: %s" % (state.value,)
            report.append((def_id, key, declared, value, problem))
    return report


def arrange(global_stack, models=3, size=30):
    """Cura 4.13's arranger (Nest2DArrange.findNodePlacement, as Arrange
    All and loading models call it) placing `models` squares of `size` mm
    on the build plate of the stack's machine_width/machine_depth, read as
    BuildVolume reads them (no disallowed areas).  Returns
    (all placed, [(x, y) in mm])."""
    load()
    import numpy
    from UM.Math.Polygon import Polygon
    from cura.Arranging.Nest2DArrange import findNodePlacement

    class Plate:
        def getWidth(self):
            return global_stack.getProperty("machine_width", "value")

        def getDepth(self):
            return global_stack.getProperty("machine_depth", "value")

        def getDisallowedAreas(self):
            return []

    class Model:
        def __init__(self):
            half = size / 2.
            self.hull = Polygon(numpy.array(
                [[-half, -half], [half, -half], [half, half], [-half, half]],
                numpy.float32))

        def callDecoration(self, name):
            return self.hull if name == "getConvexHull" else None

        def getName(self):
            return "model"

    factor = 10000
    placed, items = findNodePlacement([Model() for _ in range(models)],
                                      Plate(), factor=factor)
    return placed, [(i.translation().x() / factor,
                     i.translation().y() / factor) for i in items]


def discovered_listing(machine_type, registry):
    """What Cura's add-printer pages make of a discovered printer of that
    machine type (DiscoveredPrinter, unmodified): (type shown, section
    heading, whether it can be added)."""
    load()
    from cura.Machines.Models.DiscoveredPrintersModel import \
        DiscoveredPrinter
    import cura.CuraApplication as app_module
    printer = DiscoveredPrinter("127.0.0.1", "key", "printer", None,
                                machine_type, device=None)
    saved = app_module.CuraApplication.getInstance
    app_module.CuraApplication.getInstance = classmethod(
        lambda cls: _App(registry))
    try:
        return (printer.readableMachineType, printer.sectionName,
                not printer.isUnknownMachineType and printer.isHostOfGroup)
    finally:
        app_module.CuraApplication.getInstance = saved
