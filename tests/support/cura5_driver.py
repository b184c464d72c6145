"""A headless Cura 5 network connection, driven over JSON lines (for tests).

Runs in its own interpreter (``.venv/cura5``: PyQt6 from PyPI), never in the
pytest process, which has Debian's PyQt5 for the Cura 4.13 leg: the two Qt
bindings must not meet in one process.  ``tests/support/cura5_client.py`` starts it
and talks to it.

Cura's own code is imported at run time from ``$CURA5_DIR`` (a folder holding
``Cura/``, ``Uranium/`` and ``libCharon/`` source trees), never copied.  The
plugin code runs unmodified: a real ``LocalClusterOutputDevice`` polls the
printer on its own 2 s timer, signs its requests with its real
``ClusterApiClient``, uploads through ``_startPrintJobUpload`` and syncs
materials with ``SendMaterialJob``.  What this file adds is the desktop
application around it, as small stand-ins:

* ``cura.CuraApplication`` is a stand-in module: the real one starts the whole
  desktop application.  Its ``CuraApplication.getInstance()`` (also
  Uranium's ``Application``/``QtApplication.getInstance()``) answers with
  ``_App``: real Uranium ``Preferences`` (in memory; Cura keeps the pairing
  credentials there), an output device manager, a read-only material
  registry, ``callLater`` onto the Qt thread, and a message centre that
  records what Cura shows (``UM.Message`` calls ``showMessageSignal``).
* ``pyArcus``, ``pyUvula``, ``pySavitar`` and ``pynest2d`` are native
  libraries that are imported but never called on the network plugin's
  paths: placeholder modules.
* the material library is a folder of ``.xml.fdm_material`` files parsed
  with Cura's own ``XmlMaterialProfile``.
* SendMaterialJob's 1 s throttle between material posts is shortened.

Protocol: one JSON object per line on stdin, ``{"cmd": name, ...}``; one JSON
reply per line on stdout, ``{"ok": true, ...}`` or ``{"ok": false, "error":
text}``.  Cura's log goes to stderr.
"""

import json
import logging
import os
import queue
import sys
import tempfile
import threading
import time
import traceback
import types

import cura_client   # its helpers; it imports no Qt until its load()


def _fail(message):
    print(json.dumps({"ok": False, "error": message}), flush=True)
    sys.exit(2)


ROOT = os.environ.get("CURA5_DIR")
if not ROOT or not os.path.isdir(os.path.join(
        ROOT, "Cura", "plugins", "UM3NetworkPrinting")):
    _fail("CURA5_DIR must name a folder with Cura/, Uranium/, libCharon/")
for entry in ("Cura", "Uranium", "libCharon", os.path.join(
        "Cura", "plugins")):
    sys.path.insert(0, os.path.join(ROOT, entry))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                    format="cura5 %(levelname)s: %(message)s")


class _NativePlaceholder(types.ModuleType):
    """Any attribute is an inert class (e.g. pyArcus.Socket as a base)."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        cls = type(attr, (), {"__init__": lambda self, *a, **kw: None})
        setattr(self, attr, cls)
        return cls


for _name in ("pyArcus", "pyUvula", "pySavitar", "pynest2d"):
    sys.modules[_name] = _NativePlaceholder(_name)

import warnings  # noqa: E402
warnings.simplefilter("ignore")

from PyQt6.QtCore import QCoreApplication, QEventLoop, QTimer  # noqa: E402
from PyQt6.QtNetwork import QNetworkRequest  # noqa: E402

QAPP = QCoreApplication([sys.argv[0]])

import UM  # noqa: E402,F401
warnings.simplefilter("ignore")
import cura  # noqa: E402


def _setting_version():
    import re
    with open(os.path.join(ROOT, "Cura", "cura", "CuraApplication.py"),
              encoding="utf-8") as f:
        return int(re.search(r"SettingVersion = (\d+)", f.read()).group(1))


class _Stand:
    """The stand-in module's CuraApplication class."""

    instance = None
    # the settings format version, read from the real module's source
    SettingVersion = _setting_version()

    @classmethod
    def getInstance(cls, *args, **kwargs):
        return cls.instance


_module = types.ModuleType("cura.CuraApplication")
_module.CuraApplication = _Stand
sys.modules["cura.CuraApplication"] = _module
cura.CuraApplication = _module

from UM.Application import Application  # noqa: E402
from UM.Logger import Logger  # noqa: E402
from UM.Preferences import Preferences  # noqa: E402
from UM.Qt.QtApplication import QtApplication  # noqa: E402
from UM.Resources import Resources  # noqa: E402
from UM.Settings.ContainerRegistry import ContainerRegistry  # noqa: E402
from UM.Signal import Signal  # noqa: E402

_plugin = types.ModuleType("UM3NetworkPrinting")
_plugin.__path__ = [os.path.join(ROOT, "Cura", "plugins",
                                 "UM3NetworkPrinting")]
sys.modules["UM3NetworkPrinting"] = _plugin
_xml = types.ModuleType("XmlMaterialProfile")
_xml.__path__ = [os.path.join(ROOT, "Cura", "plugins",
                              "XmlMaterialProfile")]
sys.modules["XmlMaterialProfile"] = _xml

from XmlMaterialProfile.XmlMaterialProfile import XmlMaterialProfile  # noqa
from UM3NetworkPrinting.src.Network.LocalClusterOutputDevice import \
    LocalClusterOutputDevice  # noqa: E402
from UM3NetworkPrinting.src.Network.ClusterApiClient import \
    ClusterApiClient  # noqa: E402,F401
import UM3NetworkPrinting.src.Network.SendMaterialJob as \
    send_material_module  # noqa: E402
from UM3NetworkPrinting.src.Messages.AuthorizationRequiredMessage import \
    AuthorizationRequiredMessage  # noqa: E402


# --------------------------------------------------------------------------
# The desktop application, as stand-ins


_SCRATCH = tempfile.TemporaryDirectory(prefix="cura5-")   # gone at exit


class _MaterialRegistry(cura_client._MaterialRegistry):
    """The Cura 4.13 leg's read-only registry of material files (a Cura's
    library), parsed with Cura 5's own XmlMaterialProfile; the parser asks
    the registry for machine definitions, so it is the instance first."""

    def __init__(self, folder, names=None):
        if names is not None:   # a smaller library: a folder of links
            subset = tempfile.mkdtemp(dir=_SCRATCH.name)
            for name in names:
                os.symlink(os.path.join(folder, name + ".xml.fdm_material"),
                           os.path.join(subset, name + ".xml.fdm_material"))
            folder = subset
        super().__init__(folder, cura_client.metadata_only_profile(
            XmlMaterialProfile))
        APP.registry = self


class _Emitter:
    def __init__(self, on_emit=None):
        self._on_emit = on_emit

    def emit(self, *args):
        if self._on_emit:
            self._on_emit(*args)

    def connect(self, *args):
        pass

    def disconnect(self, *args):
        pass


class _OutputDevices:
    """Cura's output device manager: the device under test is the active
    one (Cura shows the authorization message only for the active one)."""

    def __init__(self):
        self.devices = {}
        self.active = None
        self.outputDevicesChanged = _Emitter()

    def getActiveDevice(self):
        return self.active

    def getOutputDeviceIds(self):
        return list(self.devices)

    def addOutputDevice(self, device):
        self.devices.setdefault(device.getId(), device)

    def removeOutputDevice(self, key):
        return self.devices.pop(key, None) is not None


class _Plugins:
    def getPluginPath(self, plugin_id):
        return os.path.join(ROOT, "Cura", "plugins", plugin_id)


class _Machines:
    """No machine (global stack) is active: the group-name fix-up that
    runs when the device makes its network manager does nothing."""

    def activeMachineNetworkKey(self):
        return ""

    activeMachineNetworkGroupName = ""


class _App:
    """What the plugin asks of CuraApplication/Application/QtApplication."""

    def __init__(self):
        self.preferences = Preferences()
        self.output_devices = _OutputDevices()
        self.registry = None
        self.messages = []          # every Message shown, in order
        self.showMessageSignal = _Emitter(self.messages.append)
        self.hideMessageSignal = _Emitter()
        self.calls = queue.Queue()  # callLater from any thread

    def getInstance(self, *args, **kwargs):
        return self

    def getPreferences(self):
        return self.preferences

    def savePreferences(self):
        pass

    def getApplicationDisplayName(self):
        return "UltiMaker Cura"

    def getApplicationName(self):
        return "cura"

    def getVersion(self):
        return "5.11.0"

    def getOutputDeviceManager(self):
        return self.output_devices

    def getContainerRegistry(self):
        return self.registry

    def getPluginRegistry(self):
        return _Plugins()

    def getMachineManager(self):
        return _Machines()

    def getGlobalContainerStack(self):
        return None

    def isShuttingDown(self):
        return False

    def callLater(self, func, *args, **kwargs):
        self.calls.put((func, args, kwargs))

    def getMainThread(self):
        return threading.main_thread()

    def functionEvent(self, event):
        self.calls.put((event.call, (), {}))

    def run_calls(self):
        while True:
            try:
                func, args, kwargs = self.calls.get_nowait()
            except queue.Empty:
                return
            func(*args, **kwargs)


APP = _App()
Resources.addSearchPath(os.path.join(ROOT, "Cura", "resources"))
_Stand.instance = APP
for _cls in (Application, QtApplication):
    _cls.getInstance = classmethod(lambda cls, *a, **kw: APP)
ContainerRegistry.getInstance = classmethod(
    lambda cls, *a, **kw: APP.registry)
Signal._app = APP
LOG = cura_client._LogCapture()
Logger.addLogger(LOG)
CRASHES = []   # exceptions that escaped Cura's code in Qt slots


def _excepthook(*exc_info):
    # PyQt would abort the process; a real Cura shows its crash dialog.
    text = "".join(traceback.format_exception(*exc_info))
    CRASHES.append(text)
    sys.stderr.write(text)


sys.excepthook = _excepthook
_CALLS = QTimer()
_CALLS.timeout.connect(APP.run_calls)
_CALLS.start(10)


class _Throttle:
    """Replaces ``time`` in SendMaterialJob's module: Cura waits 1 s
    between material posts; here a little."""

    def __init__(self, seconds):
        self.seconds = seconds

    def sleep(self, seconds):
        time.sleep(self.seconds)


# --------------------------------------------------------------------------
# The session


class Session:
    def __init__(self):
        self.device = None
        self.replies = []      # every finished HTTP reply (both managers)
        self.watched = set()

    def _watch(self, manager):
        if manager is None or id(manager) in self.watched:
            return
        self.watched.add(id(manager))
        manager.finished.connect(self._finished)

    def _finished(self, reply):
        request = reply.request()
        auth = bytes(request.rawHeader(b"Authorization")).decode()
        self.replies.append({
            "method": _OPERATIONS.get(reply.operation(), "?"),
            "path": reply.url().path(),
            "status": reply.attribute(
                QNetworkRequest.Attribute.HttpStatusCodeAttribute),
            "signed": auth.startswith("Digest "),
            "username": _digest_user(auth),
            "error": reply.errorString()
            if reply.error().value else None})

    def run(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            QCoreApplication.processEvents(
                QEventLoop.ProcessEventsFlag.AllEvents, 50)
            APP.run_calls()
            self._watch(self.device and self.device._manager)
            self._watch(self.device and self.device._cluster_api
                        and self.device._cluster_api._manager)
            time.sleep(0.01)

    def run_until_reply(self, start, method, path, timeout=30.):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for reply in self.replies[start:]:
                if reply["method"] == method and reply["path"] == path:
                    self.run(0.1)   # let Cura's own handlers finish
                    return reply
            self.run(0.05)
        raise RuntimeError("no reply to %s %s within %ss"
                           % (method, path, timeout))

    # commands
    def cmd_device(self, address, materials_dir, materials=None,
                   name="klipper-test", throttle=0.02):
        """A new LocalClusterOutputDevice for address (like Cura after a
        start: the preferences, with their credentials, stay)."""
        if self.device is not None:
            self.device.close()
            APP.output_devices.removeOutputDevice(self.device.getId())
        _MaterialRegistry(materials_dir, materials and set(materials))
        send_material_module.time = _Throttle(throttle)
        ClusterApiClient._anti_gc_callbacks.clear()
        properties = {b"name": name.encode(), b"address": address.encode(),
                      b"machine": b"213482", b"firmware_version": b"7.0.2",
                      b"printer_type": b"ultimaker_s3", b"manual": b"true",
                      b"cluster_size": b"1"}
        self.device = LocalClusterOutputDevice(
            "manual:" + address, address, properties)
        # Cura skips polling for 10 s after making the device; not here.
        self.device._time_of_last_request = 0
        APP.output_devices.addOutputDevice(self.device)
        APP.output_devices.active = self.device
        self.replies.clear()
        return {}

    def cmd_connect(self):
        self.device.connect()
        self._watch(self.device._manager)
        self._watch(self.device._cluster_api._manager)
        return {}

    def cmd_close(self):
        self.device.close()
        return {}

    def cmd_run(self, seconds):
        self.run(seconds)
        return {}

    def cmd_replies(self, since=0):
        return {"replies": self.replies[since:], "count": len(self.replies)}

    def cmd_state(self):
        d = self.device
        api = d._cluster_api
        return {
            "connection_state": d.connectionState.name,
            "registered": d.getId() in APP.output_devices.devices,
            "printers": [_printer_dict(p) for p in d._printers],
            "jobs": [_job_dict(j) for j in d._print_jobs],
            # the Monitor tab's queue, each with the printer its row names
            "queue": [dict(_job_dict(j), printer_text=cura_client
                           .queue_label(j)) for j in d.queuedPrintJobs],
            # > 1: "Print over network" shows the printer selection
            "cluster_size": d.clusterSize,
            "messages": [_message_dict(m) for m in APP.messages
                         if m.visible],
            "shown": [_message_dict(m) for m in APP.messages],
            "auth_message_visible": AuthorizationRequiredMessage
            ._getInstance().visible,
            "auth_id": api and api._auth_id,
            "has_key": bool(api and api._auth_key),
            "preferences": {k: APP.preferences.getValue("cluster_api/" + k)
                            for k in ("auth_ids", "auth_keys")},
            "replies": len(self.replies),
            "log": LOG.since(0, "ec"),
            "crashes": CRASHES,
        }

    def cmd_forget_messages(self):
        for message in APP.messages:
            if message is not AuthorizationRequiredMessage._getInstance():
                message.hide()
        del APP.messages[:]
        if AuthorizationRequiredMessage._getInstance().visible:
            APP.messages.append(AuthorizationRequiredMessage._getInstance())
        return {}

    def cmd_upload(self, path, file_name=None, unique_name=None,
                   timeout=60.):
        """unique_name: the printer chosen in the printer-selection
        dialog (None: "Automatic")."""
        with open(path, "rb") as f:
            data = f.read()
        start = len(self.replies)
        self.device._active_exported_job = cura_client._PreparedJob(
            file_name or os.path.basename(path), data)
        self.device._startPrintJobUpload(unique_name)
        reply = self.run_until_reply(start, "POST",
                                     "/cluster-api/v1/print_jobs/", timeout)
        return {"reply": reply, "progress_visible":
                self.device._progress.visible}

    def cmd_action(self, kind, uuid, timeout=30.):
        """What Cura's Monitor-tab buttons call on the device."""
        start = len(self.replies)
        d = self.device
        base = "/cluster-api/v1/print_jobs/" + uuid
        if kind in ("pause", "resume", "abort"):
            d.setJobState(uuid, kind)
            method, path = "PUT", base + "/action"
        elif kind == "move_to_top":
            d.sendJobToTop(uuid)
            method, path = "POST", base + "/action/move"
        elif kind == "force":
            d.forceSendJob(uuid)
            method, path = "PUT", base
        elif kind == "delete":
            d.deleteJobFromQueue(uuid)
            method, path = "DELETE", base
        else:
            raise ValueError("unknown action %s" % (kind,))
        return {"reply": self.run_until_reply(start, method, path, timeout)}

    def cmd_get(self, what, uuid=None, timeout=30.):
        """One ClusterApiClient GET; returns what Cura's callback got."""
        api = self.device.getApiClient()
        self._watch(api._manager)
        got = []
        start = len(self.replies)
        call, path = _GETS[what]
        if what == "preview":
            getattr(api, call)(uuid, got.append)
            path = path % (uuid,)
        else:
            getattr(api, call)(got.append)
        reply = self.run_until_reply(start, "GET", path, timeout)
        result = None
        if got:
            value = got[0]
            if what == "preview":
                result = {"bytes": len(bytes(value))}
            elif isinstance(value, list):
                result = [_model_dict(m) for m in value]
            else:
                result = _model_dict(value)
        return {"reply": reply, "called_back": bool(got), "result": result}


_OPERATIONS = {}
_GETS = {   # what cmd_get asks: ClusterApiClient method, path
    "system": ("getSystem", "/api/v1/system"),
    "printers": ("getPrinters", "/cluster-api/v1/printers"),
    "print_jobs": ("getPrintJobs", "/cluster-api/v1/print_jobs"),
    "materials": ("getMaterials", "/cluster-api/v1/materials"),
    "preview": ("getPrintJobPreviewImage",
                "/cluster-api/v1/print_jobs/%s/preview_image")}


def _digest_user(header):
    import re
    m = re.search(r'username="([^"]*)"', header)
    return m and m.group(1)


def _model_dict(model):
    out = {}
    for key, value in vars(model).items():
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = value
    return out


def _material_dict(material):
    if material is None:
        return None
    return {"name": material.name, "brand": material.brand,
            "type": material.type, "color": material.color,
            "guid": material.guid}


def _job_dict(job):
    return {"key": job.key, "name": job.name, "owner": job.owner,
            "state": job.state, "time_total": job.timeTotal,
            "time_elapsed": job.timeElapsed, "progress": job.progress,
            "is_active": job.isActive,
            "assigned_printer": job.assignedPrinter.name
            if job.assignedPrinter else None,
            "configuration_changes": [
                cura_client._change_dict(c)
                for c in job.configurationChanges]}


def _printer_dict(printer):
    return {"key": printer.key, "name": printer.name,
            "unique_name": printer.uniqueName,
            "type": printer.type, "state": printer.state,
            "camera_url": printer.cameraUrl.toString(),
            "extruders": [{"hotend_id": e.hotendID,
                           "material": _material_dict(e.activeMaterial)}
                          for e in printer.extruders],
            "active_job": _job_dict(printer.activePrintJob)
            if printer.activePrintJob else None}


def _message_dict(message):
    return {"class": type(message).__qualname__, "title": message.getTitle(),
            "text": message.getText()}


def main():
    from PyQt6.QtNetwork import QNetworkAccessManager
    op = QNetworkAccessManager.Operation
    _OPERATIONS.update({op.GetOperation: "GET", op.PostOperation: "POST",
                        op.PutOperation: "PUT",
                        op.DeleteOperation: "DELETE",
                        op.HeadOperation: "HEAD"})
    session = Session()
    print(json.dumps({"ok": True, "ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        name = request.pop("cmd")
        try:
            result = getattr(session, "cmd_" + name)(**request)
            result["ok"] = True
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()}
        print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
