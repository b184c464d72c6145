"""Drive Ultimaker Cura 4.13's own network-printing code headlessly, for tests.

Cura's bundled UM3NetworkPrinting plugin is what decides whether our server's
replies are good enough, so the tests run *that* code (imported at run time
from the unpacked Debian packages under CURA_ROOT, never copied) instead of a
re-implementation of it.  Everything here is synchronous: each call runs the Qt
event loop until Cura's own callback ran or the HTTP reply finished.

Cura is not started.  The plugin code runs unmodified; what this module adds
is the smallest host-application scaffolding the code paths need (see
section 7 of the project's cura-protocol.md notes):

* a synthetic ``UM3NetworkPrinting`` package (its ``__init__`` registers the
  plugin with a running Cura) and ``import cura.CuraApplication`` first (else a
  circular import of ``cura.PrinterOutput.PrinterOutputDevice`` fails);
* a QCoreApplication (offscreen) so QNetworkAccessManager and QImage work;
* ``ContainerRegistry.getInstance`` answers with a read-only registry of the
  bundled fdm-materials files (metadata made by Cura's own XmlMaterialProfile
  parser), so material GUIDs resolve to names like in a real Cura install;
* a stand-in for the ``CuraApplication`` singleton inside the plugin modules
  that ask it for the container registry, output device manager or shutdown;
* device methods are called as plain functions on small duck-typed classes
  (plain classes: PyQt connects signals to their bound methods through weak
  references, which e.g. SimpleNamespace does not support);
* Uranium's Logger output is captured, so a reply Cura rejects (Cura logs and
  never calls back) raises CuraParseError carrying what Cura logged.

Must be used from the main thread (Cura's ``call_on_qt_thread`` assumes it).
"""

import contextlib
import io
import ipaddress
import logging
import os
import queue
import sys
import threading
import time
import traceback
import types
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CURA_ROOT = REPO / ".cache" / "cura" / "root"

HTTP_STATUS = None  # QNetworkRequest.HttpStatusCodeAttribute, set by load()

_log = logging.getLogger("cura")
_log.addHandler(logging.NullHandler())  # records still propagate (pytest shows them)


# --------------------------------------------------------------------------
# Errors


class CuraClientError(Exception):
    """Cura's code did not get to a usable result (base class)."""

    def __init__(self, message, log=()):
        self.log = list(log)
        if self.log:
            shown = [line if len(line) <= 800 else line[:800] + "..." for line in self.log]
            message += "\nCura logged:\n  " + "\n  ".join(shown)
        super().__init__(message)


class CuraParseError(CuraClientError):
    """Cura rejected a reply: it logged the problem and never ran its callback.

    In Cura this means the Monitor tab silently stops updating (and after 30 s
    the device is dropped), or the printer is never added.
    """


class CuraCrashError(CuraParseError):
    """Cura's code raised an uncaught exception inside a Qt slot.

    A real Cura shows its crash dialog; PyQt would otherwise abort the whole
    test process, so the exception is caught and re-raised as this.
    """


class CuraHttpError(CuraClientError):
    """The reply had an HTTP error status; Cura only calls its on_error."""

    def __init__(self, status, error_string, log=()):
        self.status = status
        self.error_string = error_string
        super().__init__("HTTP %s: %s" % (status, error_string), log)


class CuraNoResponseError(CuraClientError):
    """The reply finished without an HTTP status (refused, reset, closed).

    Cura ignores such replies completely; for an upload that means the
    progress message stays forever and further prints are blocked.
    """


class CuraTimeoutError(CuraClientError):
    """Nothing finished within the timeout (Cura itself would wait forever)."""


# --------------------------------------------------------------------------
# Loading Cura


class _LogCapture:
    """A Uranium log output that keeps every line (and forwards it to logging,
    so pytest shows Cura's log for a failing test)."""

    LEVELS = {"d": logging.DEBUG, "i": logging.INFO, "w": logging.WARNING,
              "e": logging.ERROR, "c": logging.CRITICAL}

    def __init__(self):
        self.lines = []

    def log(self, log_type, message):
        self.lines.append((log_type, message))
        _log.log(self.LEVELS.get(log_type, logging.INFO), "%s", message)

    def mark(self):
        return len(self.lines)

    def since(self, mark, kinds="wec"):
        """Warnings/errors logged after mark() returned `mark`."""
        return ["%s: %s" % (k, m) for k, m in self.lines[mark:] if k in kinds]


class _MaterialRegistry:
    """Read-only stand-in for Cura's ContainerRegistry, holding the bundled
    fdm-materials base materials (what a stock Cura install has).

    Metadata comes from Cura's own ``XmlMaterialProfile.deserializeMetadata``;
    only the base metadata is kept (the per-machine variants Cura also makes
    need machine definitions, and they carry the same GUID, name and version).
    """

    def __init__(self, materials_dir, profile_class):
        self._dir = Path(materials_dir)
        self._profile_class = profile_class
        self._by_id = None  # id -> (metadata, file path), parsed on first use

    def _load(self):
        if self._by_id is None:
            by_id = {}
            for path in sorted(self._dir.glob("*.xml.fdm_material")):
                container_id = path.name[:-len(".xml.fdm_material")]
                text = path.read_text(encoding="utf-8")
                for metadata in self._profile_class.deserializeMetadata(text, container_id):
                    if metadata["id"] == container_id:
                        by_id[container_id] = (metadata, str(path))
            self._by_id = by_id
        return self._by_id

    def findInstanceContainersMetadata(self, **kwargs):
        # Copies: SendMaterialJob._getLocalMaterials() converts "version" in place.
        return [dict(md) for md, _ in self._load().values()
                if all(md.get(k) == v for k, v in kwargs.items())]

    def findDefinitionContainersMetadata(self, **kwargs):
        return []

    def findContainers(self, **kwargs):
        return []

    def isLoaded(self, container_id):
        return False

    def isReadOnly(self, container_id):
        return True  # bundled resources are read-only in Cura

    def getContainerFilePathById(self, container_id):
        entry = self._load().get(container_id)
        return entry[1] if entry else None


def metadata_only_profile(xml_material_profile):
    """Cura's XML material parser class minus the two steps that need a
    running Cura: the version upgrade (fdm-materials 4.13 files are current)
    and the product-to-machine map (no machine definitions are loaded).
    Also used by the Cura 5 leg (cura5_driver.py)."""

    class MetadataOnlyProfile(xml_material_profile):
        @classmethod
        def _updateSerialized(cls, serialized, file_name=None):
            return serialized

        @classmethod
        def getProductIdMap(cls):
            return {}

    return MetadataOnlyProfile


class _CuraAppStand:
    """Replaces the name ``CuraApplication`` inside individual plugin modules
    (never globally): those modules only call ``CuraApplication.getInstance()``
    and then the few methods below."""

    def __init__(self, registry):
        self._registry = registry
        self.shutting_down = False
        self.removed_output_devices = []

    def getInstance(self):
        return self

    def getContainerRegistry(self):
        return self._registry

    def isShuttingDown(self):
        return self.shutting_down

    def getOutputDeviceManager(self):
        return self

    def getOutputDeviceIds(self):
        return []

    def removeOutputDevice(self, key):
        self.removed_output_devices.append(key)


class _NotClusterHostMessage:
    """Replaces the "not a group host" message: Cura shows it and then closes
    the device; here the device just remembers that it was shown."""

    def __init__(self, device):
        self._device = device

    def show(self):
        self._device.not_cluster_host_message = True


_cura = None  # types.SimpleNamespace of what load() imported


def load(cura_root=None):
    """Import Cura's code once per process and return a namespace with the
    classes/modules used here (also handy for tests that need one more)."""
    global _cura, HTTP_STATUS
    root = Path(cura_root or os.environ.get("CURA_ROOT") or DEFAULT_CURA_ROOT).resolve()
    if _cura is not None:
        if _cura.root != root:
            raise RuntimeError("Cura already loaded from %s, not %s" % (_cura.root, root))
        return _cura

    plugins = root / "usr/lib/cura/plugins"
    network_plugin = plugins / "UM3NetworkPrinting"
    if not (network_plugin / "src").is_dir():
        raise RuntimeError("no Cura 4.13 under %s (run tests/setup_env.sh)" % root)
    for entry in (str(plugins), str(root / "usr/lib/python3/dist-packages")):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    # The plugin's __init__ registers it with a running Cura: bypass it so only
    # the src/ modules load.
    package = types.ModuleType("UM3NetworkPrinting")
    package.__path__ = [str(network_plugin)]
    sys.modules["UM3NetworkPrinting"] = package
    xml_package = types.ModuleType("XmlMaterialProfile")
    xml_package.__path__ = [str(plugins / "XmlMaterialProfile")]
    sys.modules["XmlMaterialProfile"] = xml_package

    with warnings.catch_warnings():
        # Uranium/Cura 4.13 sources trigger DeprecationWarnings (invalid escapes, imp).
        warnings.simplefilter("ignore")
        import UM  # noqa: F401  (its __init__ re-enables DeprecationWarnings)
        warnings.simplefilter("ignore")
        import cura.CuraApplication  # noqa: F401  first: avoids a circular import
        from PyQt5.QtCore import QCoreApplication
        from PyQt5.QtNetwork import QNetworkRequest
        from UM.Logger import Logger
        from UM.Settings.ContainerRegistry import ContainerRegistry
        from cura import ApplicationMetadata
        from cura.PrinterOutput.NetworkedPrinterOutputDevice import NetworkedPrinterOutputDevice
        from cura.PrinterOutput.PrinterOutputDevice import ConnectionState
        from XmlMaterialProfile.XmlMaterialProfile import XmlMaterialProfile
        import UM3NetworkPrinting.src.UltimakerNetworkedPrinterOutputDevice as device_module
        import UM3NetworkPrinting.src.Network.SendMaterialJob as send_material_module
        import UM3NetworkPrinting.src.Network.ZeroConfClient as zeroconf_module
        from UM3NetworkPrinting.src.Network.ClusterApiClient import ClusterApiClient
        from UM3NetworkPrinting.src.Network.LocalClusterOutputDevice import LocalClusterOutputDevice
        from UM3NetworkPrinting.src.ClusterOutputController import ClusterOutputController
        from UM3NetworkPrinting.src.Models.UM3PrintJobOutputModel import UM3PrintJobOutputModel
        from UM3NetworkPrinting.src.Models.Http.ClusterPrinterStatus import ClusterPrinterStatus
        from UM3NetworkPrinting.src.Models.Http.ClusterPrintJobStatus import ClusterPrintJobStatus

    app = QCoreApplication.instance() or QCoreApplication([sys.argv[0] if sys.argv else "cura_client"])

    logs = _LogCapture()
    Logger.addLogger(logs)

    registry = _MaterialRegistry(root / "usr/share/cura/resources/materials",
                                 metadata_only_profile(XmlMaterialProfile))
    if ContainerRegistry.getInstance() is None:  # never replace a real one
        ContainerRegistry.getInstance = classmethod(lambda cls, *a, **kw: registry)

    app_stand = _CuraAppStand(registry)
    device_module.CuraApplication = app_stand
    device_module.NotClusterHostMessage = _NotClusterHostMessage
    send_material_module.CuraApplication = app_stand
    zeroconf_module.CuraApplication = app_stand
    # Discovery must never touch a real interface, whatever the caller does.
    zeroconf_module.Zeroconf = _loopback_zeroconf

    HTTP_STATUS = QNetworkRequest.HttpStatusCodeAttribute
    _cura = types.SimpleNamespace(
        root=root, app=app, logs=logs, registry=registry, app_stand=app_stand,
        user_agent="%s/%s " % (ApplicationMetadata.CuraAppName, ApplicationMetadata.CuraVersion),
        ConnectionState=ConnectionState,
        ClusterApiClient=ClusterApiClient,
        ClusterOutputController=ClusterOutputController,
        ClusterPrinterStatus=ClusterPrinterStatus,
        ClusterPrintJobStatus=ClusterPrintJobStatus,
        UM3PrintJobOutputModel=UM3PrintJobOutputModel,
        UltimakerNetworkedPrinterOutputDevice=device_module.UltimakerNetworkedPrinterOutputDevice,
        LocalClusterOutputDevice=LocalClusterOutputDevice,
        NetworkedPrinterOutputDevice=NetworkedPrinterOutputDevice,
        SendMaterialJob=send_material_module.SendMaterialJob,
        send_material_module=send_material_module,
        ZeroConfClient=zeroconf_module.ZeroConfClient,
    )
    _borrow_device_methods(_cura)
    return _cura


def _loopback_zeroconf():
    import zeroconf
    return zeroconf.Zeroconf(interfaces=["127.0.0.1"])


# --------------------------------------------------------------------------
# Event loop


class _SlotExceptions:
    """While active, exceptions escaping Python code called from Qt are
    collected instead of reaching PyQt's default handler (which aborts the
    process when sys.excepthook is the default one)."""

    def __init__(self):
        self.caught = []

    def __enter__(self):
        self._saved = sys.excepthook
        sys.excepthook = lambda *exc_info: self.caught.append(exc_info)
        return self

    def __exit__(self, *exc):
        sys.excepthook = self._saved


def _run_until(predicate, timeout):
    """Run the Qt event loop until predicate() is true; False on timeout.
    Raises CuraCrashError if Cura's code raised inside a Qt slot."""
    from PyQt5.QtCore import QCoreApplication, QEventLoop, QTimer

    mark = _cura.logs.mark()
    deadline = time.monotonic() + timeout
    wakeup = QTimer()  # wakes the blocking processEvents so the deadline is checked
    wakeup.start(20)
    try:
        with _SlotExceptions() as slots:
            done = predicate()
            while not done and not slots.caught and time.monotonic() < deadline:
                QCoreApplication.processEvents(QEventLoop.AllEvents | QEventLoop.WaitForMoreEvents)
                done = predicate()
            # Let slots connected to the same signal run too (no waiting).
            QCoreApplication.processEvents(QEventLoop.AllEvents)
    finally:
        wakeup.stop()
    if slots.caught:
        text = "".join(traceback.format_exception(*slots.caught[0]))
        raise CuraCrashError("Cura's code raised in a Qt slot:\n" + text, _cura.logs.since(mark))
    return done


def _abort_unfinished(manager):
    from PyQt5.QtNetwork import QNetworkReply
    for reply in manager.findChildren(QNetworkReply):
        if not reply.isFinished():
            reply.abort()


class _Reply:
    """What came back for one request, read before Cura's handlers see it."""

    def __init__(self, qreply):
        self.status = qreply.attribute(HTTP_STATUS)
        self.error = qreply.errorString() if qreply.error() else ""
        # peek, not read: Cura's own handler reads the body afterwards.
        self.body = bytes(qreply.peek(qreply.bytesAvailable())) if self.status is not None else b""


# --------------------------------------------------------------------------
# Cluster API (GETs and job actions)


class ClusterApi:
    """Cura's own ClusterApiClient against ``address`` ("127.0.0.1:<port>").

    Getters return exactly what Cura's callback received: Cura's model objects
    (PrinterSystemStatus, lists of ClusterPrinterStatus, ClusterPrintJobStatus,
    ClusterMaterial; fields as attributes, ``toDict()`` for all of them).
    """

    def __init__(self, address, timeout=10.0):
        cura = load()
        self.address = address
        self.timeout = timeout
        self._errors = []
        self._client = cura.ClusterApiClient(address, on_error=self._on_error)
        self._finished = []  # _Reply per finished request, in order
        # Connected before Cura's per-reply parse() exists, so this sees the
        # reply first (and peek()s its body without consuming it).
        self._client._manager.finished.connect(self._on_finished)

    def _on_error(self, error_string):
        self._errors.append(error_string)

    def _on_finished(self, qreply):
        self._finished.append(_Reply(qreply))

    def _fetch(self, start, what, shape=None):
        mark = _cura.logs.mark()
        results = []
        self._errors.clear()
        count = len(self._finished)
        start(results.append)  # Cura calls this only with a parsed reply
        if not _run_until(lambda: results or len(self._finished) > count, self.timeout):
            _abort_unfinished(self._client._manager)
            raise CuraTimeoutError("%s: no reply within %ss" % (what, self.timeout))
        if results:
            value = results[0]
            # Cura's parser accepts either JSON shape; the code it then calls
            # back into only works with one of them.
            if shape == "list" and not isinstance(value, list):
                raise CuraParseError(
                    "%s: Cura parsed a single object (%s) where its device code iterates a list"
                    % (what, type(value).__name__), _cura.logs.since(mark))
            if shape == "object" and isinstance(value, list):
                raise CuraParseError("%s: Cura parsed a list where its code expects one object" % what,
                                     _cura.logs.since(mark))
            return value
        reply = self._finished[count]
        if reply.status is None:
            raise CuraNoResponseError("%s: no HTTP response (%s); Cura ignores it" % (what, reply.error))
        if self._errors:
            raise CuraHttpError(reply.status, self._errors[0], _cura.logs.since(mark))
        raise CuraParseError("%s: Cura could not parse the reply (HTTP %s, body %r)"
                             % (what, reply.status, reply.body[:500]), _cura.logs.since(mark))

    def system(self):
        """GET /api/v1/system -> PrinterSystemStatus (add-by-IP)."""
        return self._fetch(self._client.getSystem, "GET /api/v1/system", "object")

    def printers(self):
        """GET /cluster-api/v1/printers -> [ClusterPrinterStatus]."""
        return self._fetch(self._client.getPrinters, "GET printers", "list")

    def print_jobs(self):
        """GET /cluster-api/v1/print_jobs -> [ClusterPrintJobStatus]."""
        return self._fetch(self._client.getPrintJobs, "GET print_jobs", "list")

    def materials(self):
        """GET /cluster-api/v1/materials -> [ClusterMaterial]."""
        return self._fetch(self._client.getMaterials, "GET materials", "list")

    def preview_image(self, uuid):
        """GET .../print_jobs/<uuid>/preview_image, stored the way Cura does
        (UM3PrintJobOutputModel.updatePreviewImageData). Returns the QImage
        (``isNull()`` if the bytes were not an image: Cura keeps that null
        image and never asks again), or None for an HTTP error (Cura retries
        on its next poll)."""
        job = _cura.UM3PrintJobOutputModel(_cura.ClusterOutputController(None), uuid, "")

        def start(done):
            def on_finished(data):
                job.updatePreviewImageData(data)
                done(data)
            self._client.getPrintJobPreviewImage(uuid, on_finished)
        try:
            self._fetch(start, "GET preview_image")
        except CuraHttpError:
            return None
        return job.getPreviewImage()

    # Job actions: Cura sends them and never looks at the reply. Each returns
    # the HTTP status (None: finished without one) so tests can still check.

    def _action(self, send, what):
        count = len(self._finished)
        send()
        if not _run_until(lambda: len(self._finished) > count, self.timeout):
            _abort_unfinished(self._client._manager)
            raise CuraTimeoutError("%s: no reply within %ss" % (what, self.timeout))
        return self._finished[count].status

    def pause(self, uuid):
        return self._action(lambda: self._client.setPrintJobState(uuid, "pause"), "pause")

    def resume(self, uuid):
        # Cura sends {"action": "print"} for resume.
        return self._action(lambda: self._client.setPrintJobState(uuid, "resume"), "resume")

    def abort(self, uuid):
        return self._action(lambda: self._client.setPrintJobState(uuid, "abort"), "abort")

    def move_to_top(self, uuid):
        return self._action(lambda: self._client.movePrintJobToTop(uuid), "move to top")

    def delete(self, uuid):
        return self._action(lambda: self._client.deletePrintJob(uuid), "delete")

    def force(self, uuid):
        return self._action(lambda: self._client.forcePrintJob(uuid), "force")


# --------------------------------------------------------------------------
# Duck-typed devices.  Their Cura methods are borrowed (plain functions taken
# from Cura's classes) by _borrow_device_methods() once Cura is loaded.


class _Emitter:
    """Stands in for a pyqtSignal on a duck device; nothing listens here."""

    def emit(self, *args):
        pass


class _MonitorDevice:
    """Stand-in for UltimakerNetworkedPrinterOutputDevice: holds the Monitor
    tab's models; Cura's own _updatePrinters/_updatePrintJobs fill them."""

    def __init__(self, key, address=None):
        self.key = key
        self.address = address  # where Cura's job actions go (setJobState)
        self._cluster_api = None
        self._printers = []
        self._print_jobs = []
        self._active_printer = None
        self._has_received_printers = False
        self._num_is_host_check_failed = 0
        self._time_of_last_response = 0.0
        self._connected = True
        self.not_cluster_host_message = False
        self.printersChanged = _Emitter()
        self.printJobsChanged = _Emitter()
        self.activePrinterChanged = _Emitter()

    @property
    def activePrinter(self):
        return self._active_printer

    def isConnected(self):
        return self._connected

    def getProperty(self, key):
        # The zeroconf TXT record (clusterSize reads cluster_size before
        # the first printers): none here, as for a printer added by IP
        return ""

    def close(self):
        self._connected = False


class _ProgressMessage:
    """Stands in for PrintJobUploadProgressMessage (a Message needs the app)."""

    def __init__(self):
        self.visible = False
        self.progress = []

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def setProgress(self, percentage):
        self.progress.append(percentage)


class _PreparedJob:
    """Stands in for ExportFileJob after the scene was written (needs slicing)."""

    def __init__(self, file_name, data):
        self._file_name = file_name
        self._data = data

    def getFileName(self):
        return self._file_name

    def getOutput(self):
        return self._data


class _PostingDevice:
    """Stand-in for LocalClusterOutputDevice when it posts multiparts (print
    job upload, material files) via NetworkedPrinterOutputDevice."""

    def __init__(self, address, owner="alice"):
        self._address = address
        self._api_prefix = ""
        self._user_agent = _cura.user_agent
        self._owner = owner
        self._manager = None
        self._onFinishedCallbacks = {}
        self._kept_alive_multiparts = {}
        self._last_request_time = None
        self._last_response_time = None
        self._active_exported_job = None
        self.connectionState = _cura.ConnectionState.Connected
        self._progress = _ProgressMessage()
        self.writeProgress = _Emitter()
        self.replies = []  # _Reply per finished request, in order
        self.upload_completed = 0  # times Cura's upload-completed handler ran

    def _createNetworkManager(self):
        # The real one also renames the active machine's group; there is none.
        from PyQt5.QtNetwork import QNetworkAccessManager
        self._manager = QNetworkAccessManager()
        self._manager.finished.connect(self._recordReply)  # first: peeks the body
        self._manager.finished.connect(self._handleOnFinished)

    def _recordReply(self, qreply):
        self.replies.append(_Reply(qreply))

    def _getUserName(self):
        # The real one asks the Ultimaker account, then LOGNAME/USER/...
        return self._owner

    def _onPrintUploadCompleted(self, reply):
        # The real one swaps the progress message for "Data Sent" messages.
        self.upload_completed += 1


_BORROWED = {
    _MonitorDevice: {
        "UltimakerNetworkedPrinterOutputDevice": [
            "_responseReceived", "_updatePrinters", "_checkIfClusterHost", "setActivePrinter",
            "_updatePrintJobs", "_createPrintJobModel", "_updateAssignedPrinter",
            "QUEUED_PRINT_JOBS_STATES"],
        "LocalClusterOutputDevice": ["setJobState", "_getApiClient"],
    },
    _PostingDevice: {
        "LocalClusterOutputDevice": ["_startPrintJobUpload", "_onPrintJobUploadProgress"],
        "NetworkedPrinterOutputDevice": [
            "postFormWithParts", "createFormPart", "_createFormPart", "_createEmptyRequest",
            "_validateManager", "_registerOnFinishedCallback", "_handleOnFinished",
            "_clearCachedMultiPart"],
    },
}


def _borrow_device_methods(cura):
    for duck, sources in _BORROWED.items():
        for class_name, names in sources.items():
            source = getattr(cura, class_name)
            for name in names:
                setattr(duck, name, getattr(source, name))


# --------------------------------------------------------------------------
# Monitor tab


class MonitorView:
    """The Monitor tab's models across polls: call update() with each poll's
    printers and jobs (Cura model objects from ClusterApi, or plain dicts as
    the server would send them). Cura polls printers, then print jobs."""

    def __init__(self, key="manual:127.0.0.1", address=None):
        """address: the printer ("127.0.0.1:<port>") that set_job_state()
        sends Cura's job actions to."""
        load()
        self.device = _MonitorDevice(key, address)

    def update(self, printers, jobs):
        try:  # parse dicts like ClusterApiClient._parseModels does
            printers = [p if not isinstance(p, dict) else _cura.ClusterPrinterStatus(**p) for p in printers]
            jobs = [j if not isinstance(j, dict) else _cura.ClusterPrintJobStatus(**j) for j in jobs]
        except (TypeError, ValueError) as error:
            raise CuraParseError("Cura's models rejected the data: %s" % error) from error
        mark = _cura.logs.mark()
        try:
            _cura.UltimakerNetworkedPrinterOutputDevice._updatePrinters(self.device, printers)
            _cura.UltimakerNetworkedPrinterOutputDevice._updatePrintJobs(self.device, jobs)
        except Exception as error:
            # In Cura these run inside the reply's Qt slot: an exception there
            # is an uncaught crash, not a handled parse error.
            raise CuraCrashError("Cura's Monitor-tab update raised:\n" + traceback.format_exc(),
                                 _cura.logs.since(mark)) from error
        return self.view()

    def poll(self, api):
        """One poll cycle as Cura runs it: GET printers, then print_jobs."""
        return self.update(api.printers(), api.print_jobs())

    def set_job_state(self, key, state, timeout=10.0):
        """A job's button on the Monitor tab (Pause, Resume, Abort): the
        job model's own setState(), through Cura's ClusterOutputController
        and the device's setJobState.  Returns the reply's HTTP status."""
        job = next(j for j in self.device._print_jobs if j.key == key)
        finished = []
        manager = self.device._getApiClient()._manager
        manager.finished.connect(finished.append)
        try:
            job.setState(state)
            if not _run_until(lambda: finished, timeout):
                _abort_unfinished(manager)
                raise CuraTimeoutError("%s: no reply within %ss" % (state, timeout))
            return finished[0].attribute(HTTP_STATUS)
        finally:
            manager.finished.disconnect(finished.append)

    def view(self):
        """What the Monitor tab shows, read from Cura's own Qt models:

        {"printers": [{"key", "name", "unique_name", "type" (machine_variant),
                       "state", "camera_url", "buildplate", "firmware_version",
                       "extruders": [{"position", "hotend_id",
                                      "material": None or {"name", "brand",
                                                  "type", "color", "guid"}}],
                       "active_job": None or a job dict}],
         "queue": [{"key", "name", "owner", "state", "time_total",
                    "assigned_printer", "machine_variant",
                    "printer_text"}],  # queuedPrintJobs (queue_label)
         "active_jobs": [names],  # activePrintJobs
         "jobs": [job dict for every job Cura keeps, in reply order],
         "active_printer": name of the selected printer card,
         "cluster_size": clusterSize (> 1: "Print over network" shows
                         the printer-selection dialog),
         "not_cluster_host": bool}

        A job dict: key, name, owner, state, time_elapsed, time_total,
        time_remaining, progress (0..1), is_active, assigned_printer (name),
        machine_variant, configuration_changes (list of {"type", "index",
        "origin_name", "target_name", "can_override"}).
        """
        device = self.device
        cls = _cura.UltimakerNetworkedPrinterOutputDevice
        queued = cls.queuedPrintJobs.fget(device)
        active = cls.activePrintJobs.fget(device)
        return {
            "printers": [_printer_dict(p) for p in device._printers],
            "queue": [_queued_job_dict(j) for j in queued],
            "active_jobs": [j.name for j in active],
            "jobs": [_job_dict(j) for j in device._print_jobs],
            "active_printer": device.activePrinter.name if device.activePrinter else None,
            "cluster_size": cls.clusterSize.fget(device),
            # Set after six polls without printers: Cura then shows "not a
            # group host" and drops the connection.
            "not_cluster_host": device.not_cluster_host_message,
        }


def monitor_view(printers, jobs):
    """One poll through Cura's Monitor-tab code (fresh device); returns
    MonitorView.view()."""
    return MonitorView().update(printers, jobs)


def _material_dict(material):
    if material is None:
        return None
    return {"name": material.name, "brand": material.brand, "type": material.type,
            "color": material.color, "guid": material.guid}


def _job_dict(job):
    return {
        "key": job.key,
        "name": job.name,
        "owner": job.owner,
        "state": job.state,
        "time_elapsed": job.timeElapsed,
        "time_total": job.timeTotal,
        "time_remaining": job.timeRemaining,
        "progress": job.progress,
        "is_active": job.isActive,
        "assigned_printer": job.assignedPrinter.name if job.assignedPrinter else None,
        "machine_variant": job.configuration.printerType if job.configuration else None,
        "configuration_changes": [_change_dict(c) for c in job.configurationChanges],
    }


def _change_dict(change):
    """A ConfigurationChangeModel as the override dialog reads it."""
    return {"type": change.typeOfChange, "index": change.index,
            "origin_name": change.originName, "target_name": change.targetName,
            "can_override": change.canOverride}


def queue_label(job):
    """The printer a queued job's row names on the Monitor tab: what
    MonitorPrintJobCard.qml's printerAssignmentLabel makes of the model
    (its assignedPrinter only; the job's constraints never reach it)."""
    if job.assignedPrinter is None:
        return "Unavailable printer" if job.state == "error" else "First available"
    return job.assignedPrinter.name


def _queued_job_dict(job):
    keys = ("key", "name", "owner", "state", "time_total", "assigned_printer", "machine_variant")
    full = _job_dict(job)
    queued = {k: full[k] for k in keys}
    queued["printer_text"] = queue_label(job)
    return queued


def _printer_dict(printer):
    return {
        "key": printer.key,
        "name": printer.name,
        "unique_name": printer.uniqueName,
        "type": printer.type,
        "state": printer.state,
        "camera_url": printer.cameraUrl.toString(),
        "buildplate": printer.buildplate,
        "firmware_version": printer.firmwareVersion,
        "extruders": [{"position": e.getPosition(), "hotend_id": e.hotendID,
                       "material": _material_dict(e.activeMaterial)} for e in printer.extruders],
        "active_job": _job_dict(printer.activePrintJob) if printer.activePrintJob else None,
    }


# --------------------------------------------------------------------------
# Upload


def upload(address, path, file_name=None, owner="alice", unique_name=None, timeout=60.0):
    """Post a prepared file (e.g. from make_ufp) the way "Print over network"
    does, through Cura's LocalClusterOutputDevice._startPrintJobUpload.

    unique_name: sent as require_printer_name (printer picker, cluster > 1).
    Returns (status_code, body_bytes). Raises CuraNoResponseError if the reply
    had no HTTP status and CuraTimeoutError if it never finished: both are the
    "upload never finishes" hang Cura users see.
    """
    load()
    mark = _cura.logs.mark()
    data = Path(path).read_bytes()
    device = _PostingDevice(address, owner)
    device._active_exported_job = _PreparedJob(file_name or Path(path).name, data)
    _cura.LocalClusterOutputDevice._startPrintJobUpload(device, unique_name)
    if not _run_until(lambda: device.replies, timeout):
        _abort_unfinished(device._manager)
        raise CuraTimeoutError("upload: no reply within %ss; Cura would show progress forever" % timeout)
    reply = device.replies[0]
    if reply.status is None:
        raise CuraNoResponseError("upload: no HTTP response (%s); Cura's upload never finishes" % reply.error)
    if device.upload_completed != 1:
        raise CuraClientError("upload: Cura did not run its completion handler", _cura.logs.since(mark))
    return reply.status, reply.body


def captured_upload(path, file_name=None, owner="alice", unique_name=None, timeout=60.0):
    """The request upload() makes, as a server receives it: Cura's own
    _startPrintJobUpload posts path to a one-request loopback server.
    Returns (headers, body): headers a dict with lower-case names, body the
    multipart bytes exactly as Cura sent them (with unique_name: the
    require_printer_name part the printer picker adds)."""
    import http.server

    got = {}

    class Capture(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got["headers"] = {k.lower(): v for k, v in self.headers.items()}
            got["body"] = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Capture)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    try:
        status, _ = upload("127.0.0.1:%d" % server.server_port, path, file_name, owner,
                           unique_name, timeout)
    finally:
        thread.join(timeout)
        server.server_close()
    assert status == 200 and "body" in got, status
    return got["headers"], got["body"]


# --------------------------------------------------------------------------
# UFP


def make_ufp(path, gcode, thumbnail_png=None, materials=(), object_names=(),
             slice_metadata=None):
    """Write a UFP with libcharon the way Cura's UFPWriter.write() does.

    gcode: bytes or str. thumbnail_png: PNG bytes (Cura adds one only when the
    backend made a snapshot). materials: paths of .xml.fdm_material files (Cura
    writes its re-serialized container, named after its base_file; here the
    file itself). object_names: names for the "metadata/objects" list.
    slice_metadata: a dict Cura 5 writes as Cura/slicemetadata.json (its
    settings and material use; Cura 4.13 writes none).
    """
    load()
    from Charon.OpenMode import OpenMode
    from Charon.VirtualFile import VirtualFile
    from Charon.filetypes.OpenPackagingConvention import OPCError

    if isinstance(gcode, str):
        gcode = gcode.encode("utf-8")
    stream = io.BytesIO()
    archive = VirtualFile()
    archive.openStream(stream, "application/x-ufp", OpenMode.WriteOnly)
    archive.setMetadata({"metadata/objects": [{"name": name} for name in object_names]})
    archive.addContentType(extension="gcode", mime_type="text/x-gcode")
    archive.getStream("/3D/model.gcode").write(gcode)
    archive.addRelation(virtual_path="/3D/model.gcode",
                        relation_type="http://schemas.ultimaker.org/package/2018/relationships/gcode")
    if slice_metadata is not None:
        import json
        archive.addContentType(extension="json", mime_type="application/json")
        archive.getStream("Cura/slicemetadata.json").write(json.dumps(
            slice_metadata, separators=(", ", ": "), indent=4).encode("utf-8"))
    if thumbnail_png:
        archive.addContentType(extension="png", mime_type="image/png")
        archive.getStream("/Metadata/thumbnail.png").write(thumbnail_png)
        archive.addRelation(virtual_path="/Metadata/thumbnail.png",
                            relation_type="http://schemas.openxmlformats.org/package/2006/relationships/metadata/thumbnail",
                            origin="/3D/model.gcode")
    try:
        archive.addContentType(extension="xml.fdm_material", mime_type="application/x-ultimaker-material-profile")
    except OPCError:
        pass
    added = []
    for material in materials:
        material = Path(material)
        member = "/Materials/" + material.name[:-len(".xml.fdm_material")] + ".xml.fdm_material"
        if member in added:
            continue
        archive.getStream(member).write(material.read_bytes())
        archive.addRelation(virtual_path=member,
                            relation_type="http://schemas.ultimaker.org/package/2018/relationships/material",
                            origin="/3D/model.gcode")
        added.append(member)
    archive.close()
    Path(path).write_bytes(stream.getvalue())
    return Path(path)


# --------------------------------------------------------------------------
# Material sync


class SentMaterials(list):
    """File names Cura sent, in sending order, plus per file the reply
    (``replies[name] = (status, body)``). ``error`` is set when the GET of
    /materials failed: Cura then silently syncs nothing."""

    def __init__(self):
        super().__init__()
        self.replies = {}
        self.error = None


class _WaitForPreviousPost:
    """Replaces ``time`` in SendMaterialJob's module during a sync: instead of
    sleeping 1 s between files, wait until the previous post finished (Cura's
    throttle makes the posts effectively sequential too)."""

    def __init__(self, device, sent, timeout):
        self._device = device
        self._sent = sent
        self._timeout = timeout

    def sleep(self, seconds):
        if not _run_until(lambda: len(self._device.replies) >= len(self._sent), self._timeout):
            _abort_unfinished(self._device._manager)
            raise CuraTimeoutError("material sync: no reply for %s within %ss" % (self._sent[-1], self._timeout))


@contextlib.contextmanager
def _patched(target, **attributes):
    saved = {name: getattr(target, name) for name in attributes}
    for name, value in attributes.items():
        setattr(target, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(target, name, value)


def sync_materials(address, timeout=30.0):
    """Run Cura's SendMaterialJob against ``address``: GET /materials with
    ClusterApiClient, then the job's own _sendMissingMaterials (local
    fdm-materials vs. remote GUID/version, one multipart post per file).
    Returns SentMaterials (a list of the file names sent)."""
    load()
    result = SentMaterials()
    try:
        remote = ClusterApi(address, timeout).materials()
    except CuraClientError as error:
        result.error = error
        return result

    device = _PostingDevice(address)
    with warnings.catch_warnings():
        # Cura 4.13 calls Thread.setDaemon(), deprecated since Python 3.10.
        warnings.simplefilter("ignore", DeprecationWarning)
        job = _cura.SendMaterialJob(device=device)
    # What job._onGetMaterials does before handing over to its worker thread:
    job._remote_materials = {material.guid: material for material in remote}

    real_send = job._sendMaterialFile

    def send_material_file(file_path, file_name, material_id):
        result.append(file_name)
        real_send(file_path, file_name, material_id)

    # Instance attributes shadow the methods the job looks up on self.
    job._sendMaterialFile = send_material_file
    # The real _sendingFinished only logs or shows "Sending materials" (needs
    # the app); replies are recorded by the device instead.
    job._sendingFinished = lambda reply: None

    throttle = _WaitForPreviousPost(device, result, timeout)
    with _patched(_cura.send_material_module, time=throttle):
        job._sendMissingMaterials()
        if result:
            throttle.sleep(0)  # the last file's reply
    for name, reply in zip(result, device.replies):
        result.replies[name] = (reply.status, reply.body)
    return result


# --------------------------------------------------------------------------
# Discovery


def require_loopback_only():
    """Raise unless every IP address in this network namespace is loopback:
    discovery sends mDNS packets and must only run inside `unshare --net`."""
    import ifaddr
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            if not ipaddress.ip_address(address.split("%")[0]).is_loopback:
                raise RuntimeError("refusing zeroconf: %s has %s (run inside unshare --net)"
                                   % (adapter.nice_name, address))


class _SignalApp:
    """Stand-in for Uranium's application as seen by UM.Signal: emits from
    other threads are queued here and run on the main thread by discover(),
    like Cura's event loop does. (Without an application, UM.Signal drops
    them.)"""

    def __init__(self):
        self.events = queue.Queue()

    def getMainThread(self):
        return threading.main_thread()

    def functionEvent(self, event):
        self.events.put(event)


class _Discovered:
    def __init__(self):
        self.devices = {}

    def added(self, key, address, properties):
        self.devices[key] = {
            "key": key,
            "address": address,
            "properties": {k.decode("utf-8", "replace"): None if v is None else v.decode("utf-8", "replace")
                           for k, v in properties.items()},
        }

    def removed(self, key):
        self.devices.pop(key, None)


def discover(timeout=10.0, wait_for=None):
    """Run Cura's ZeroConfClient on loopback for up to ``timeout`` seconds and
    return what it reported as added (and not removed again): a list of
    {"key": service name, "address": "a.b.c.d", "properties": {str: str}}.
    Returns early once ``wait_for`` devices were found."""
    require_loopback_only()
    load()
    from UM.Signal import Signal

    signal_app = _SignalApp()
    found = _Discovered()  # UM.Signal keeps weak references: hold it here
    client = _cura.ZeroConfClient()
    client.addedNetworkCluster.connect(found.added)
    client.removedNetworkCluster.connect(found.removed)
    mark = _cura.logs.mark()
    deadline = time.monotonic() + timeout
    with _patched(Signal, _app=signal_app):
        client.start()
        if client._zero_conf is None:
            raise CuraClientError("Cura's ZeroConfClient could not start", _cura.logs.since(mark))
        try:
            while time.monotonic() < deadline:
                if wait_for is not None and len(found.devices) >= wait_for:
                    break
                try:
                    signal_app.events.get(timeout=0.05).call()
                except queue.Empty:
                    pass
        finally:
            thread = client._service_changed_request_thread
            _cura.app_stand.shutting_down = True
            client._service_changed_request_event.set()
            client.stop()
            if thread is not None:
                thread.join(10)
            _cura.app_stand.shutting_down = False
    return list(found.devices.values())
