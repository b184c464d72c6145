# Print from Ultimaker Cura over the network, as to an Ultimaker printer
#
# Copyright (C) 2026  cura_connection's authors
#
# This file may be distributed under the terms of the GNU GPLv3 license.
#
# Cura's bundled "UM3NetworkPrinting" plugin finds printers through zeroconf
# (_ultimaker._tcp) and talks to them with a small HTTP "cluster API".  This
# file is what Klippy loads for [cura_connection]: it reads the section,
# builds the parts and registers the G-code commands.  The parts live in
# the package _cura_connection beside this file's real path (install.sh
# links only this file into klippy/extras, so Klippy never sees the
# package); its README.md maps them.  Runs in the reactor.
import base64
import importlib.util
import ipaddress
import logging
import os
import shlex
import socket
import sys
import threading
import uuid

def _load_package():
    # The package beside this file's real path, under a name no Klippy
    # section has.  Klippy keeps modules across RESTART, and so does this.
    name = "_cura_connection"
    path = os.path.join(os.path.dirname(os.path.realpath(__file__)), name)
    loaded = sys.modules.get(name)
    if loaded is not None and list(loaded.__path__) == [path]:
        return
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(path, "__init__.py"),
        submodule_search_locations=[path])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)


_load_package()
from _cura_connection.access import AuthStore, DEFAULT_TRUSTED_CLIENTS, parse_trusted_clients
from _cura_connection.api import CuraApi, FIRMWARE_VERSION
from _cura_connection.bridge import KlippyBridge
from _cura_connection.camera import CameraProxy, camera_snapshot_url, parse_camera_url
from _cura_connection.definition import CURA_MACHINES, CUSTOM_MACHINE, MachineDefinition
from _cura_connection.discovery import ZeroconfAnnouncer
from _cura_connection.errors import CuraError
from _cura_connection.front_link import FRONT_SHOW_LIMIT, FrontProcess
from _cura_connection.http_server import CuraHTTPServer, CuraHTTPServer6
from _cura_connection.instances import OLD_STATE_DIR, StateLock, default_printer_name, gcodes_owner, instance_defaults, load_printer_uuid, move_old_state, state_in_use
from _cura_connection.intake import FileIntake
from _cura_connection.jobs import ACTIVE, JobStore
from _cura_connection.lifecycle import JobLifecycle
from _cura_connection.limits import REQUEST_TIMEOUT
from _cura_connection.materials import LoadedMaterials, MaterialStore, parse_material_option, parse_material_words
from _cura_connection.storage import StateWriter, remove_stale_temp_files


# Servers of earlier printer objects.  Klippy does not re-import modules on
# RESTART, so this list survives and lets load_config() release a port that
# a missed klippy:disconnect left bound.
_live_instances = []


# Their state folders' locks (StateLock), which a load_config() that failed
# after taking one leaves held until the next one.
_state_locks = []


class CuraConnection:
    """[cura_connection]: reads the config, builds the parts, registers
    the G-code commands.  Runs in the reactor (config load, commands)."""
    def __init__(self, config):
        self.printer = config.get_printer()
        while _live_instances:
            logging.info("cura_connection: closing server left open by a "
                         "previous printer instance")
            _live_instances.pop().close()
        while _state_locks:
            _state_locks.pop().release()    # of a load that failed
        # Which Klippy this is: its default name and state folder
        self.config_file = self.printer.get_start_args().get("config_file")
        self._read_identity(config)
        self._read_camera(config)
        trusted, request_timeout = self._read_access(config)
        gcodes, data_path = self._read_paths(config)
        material_defaults = self._read_extruders(config)
        max_upload = config.getint("max_upload_size", 1024, minval=1)
        history_size = config.getint("history_size", 20, minval=0,
                                     maxval=1000)
        # Every poll lists the whole queue: it must stay short
        self.max_queue = config.getint("max_queue", 100, minval=1,
                                       maxval=1000)
        auto_start_next = config.getboolean("auto_start_next", False)
        # A job sliced for another material than the one known loaded
        # waits, as on an Ultimaker
        self.hold_material_mismatch = config.getboolean(
            "hold_material_mismatch", True)
        # The parts, in data order
        self.lifecycle = None
        self.bridge = KlippyBridge(config, self._handle_snapshot)
        self.store = JobStore(os.path.join(data_path, "queue.json"),
                              history_size, auto_start_next)
        self.intake = FileIntake(gcodes, max_upload << 20)
        self.materials = MaterialStore(os.path.join(data_path, "materials"))
        self.loaded = LoadedMaterials(
            os.path.join(data_path, "loaded_materials.json"),
            material_defaults)
        self.auth = AuthStore(os.path.join(data_path, "auth.json"))
        for dirname in (gcodes, os.path.join(gcodes, ".thumbs"), data_path,
                        os.path.join(data_path, "materials")):
            remove_stale_temp_files(dirname)
        self.writer = StateWriter([self.store, self.loaded, self.auth,
                                   self.materials],
                                  self.bridge.reactor,
                                  self.intake.read_metadata,
                                  self.store.set_metadata)
        self.lifecycle = JobLifecycle(self.bridge, self.store,
                                      self.writer.want_metadata,
                                      self.configuration_changes)
        self.api = CuraApi(self)
        self._start_server(config, trusted, request_timeout)
        _live_instances.append(self)
        self.closed = False
        self._register_commands()
        self.printer.register_event_handler("klippy:disconnect",
                                            self._handle_disconnect)
        logging.info("cura_connection: serving Cura on %s:%d",
                     self.address, self.bound_port)

    # Config, one concern each
    def _read_identity(self, config):
        # Network name, address and what Cura is told this printer is
        self.port = config.getint("port", 8080, minval=0, maxval=65535)
        self.address = config.get("address", "0.0.0.0")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise config.error("cura_connection: address '%s' is not an IP "
                               "address" % (self.address,))
        self.use_zeroconf = config.getboolean("zeroconf", True)
        suffix = ""
        if self.config_file:
            suffix = instance_defaults(self.config_file)[1]
        self.name = config.get("name", default_printer_name(
            socket.gethostname(), suffix)).strip()
        if not self.name or len(self.name.encode("utf-8")) > 63 \
                or "." in self.name:
            raise config.error("cura_connection: name must be 1-63 bytes "
                               "without dots")
        self.definition = MachineDefinition(config, self.name)
        self.machine = config.getchoice(
            "cura_machine", {k: k for k in list(CURA_MACHINES)
                             + [CUSTOM_MACHINE]}, "ultimaker_s3")
        if self.machine == CUSTOM_MACHINE:
            self.machine_bom = self.definition.bom
            self.machine_variant = self.definition.name
        else:
            self.machine_bom, self.machine_variant = \
                CURA_MACHINES[self.machine]
        self.klipper_version = self.printer.get_start_args().get(
            "software_version", "unknown")

    def _read_camera(self, config):
        self.camera = None
        camera_url = config.get("camera_url", None)
        snapshot_url = config.get("camera_snapshot_url", None)
        if camera_url:
            try:
                camera_url = parse_camera_url(camera_url)
                snapshot_url = parse_camera_url(snapshot_url) \
                    if snapshot_url else camera_snapshot_url(camera_url)
            except ValueError as e:
                raise config.error("cura_connection: camera: %s" % (e,))
            self.camera = CameraProxy(camera_url, snapshot_url)

    def _read_access(self, config):
        # Who may talk to the printer, and what they may do
        try:
            trusted = parse_trusted_clients(config.get(
                "trusted_clients", DEFAULT_TRUSTED_CLIENTS))
        except ValueError as e:
            raise config.error("cura_connection: trusted_clients: %s" % (e,))
        if not trusted:
            raise config.error("cura_connection: trusted_clients is empty")
        self.allow_control = config.getboolean("allow_control", True)
        self.require_pairing = config.getboolean("require_pairing", False)
        # answer polls from a child process (see "HTTP front")
        self.front_process = config.getboolean("front_process", True)
        # undocumented: tests shorten it
        request_timeout = config.getfloat("request_timeout", REQUEST_TIMEOUT,
                                          above=0.)
        return trusted, request_timeout

    def _read_paths(self, config):
        # (G-code folder, folder of the module's own files), both created
        if not config.has_section("virtual_sdcard"):
            raise config.error("cura_connection needs a [virtual_sdcard] "
                               "section: uploads are stored in its path")
        gcodes = os.path.normpath(os.path.expanduser(
            config.getsection("virtual_sdcard").get("path")))
        default = os.path.join(gcodes, OLD_STATE_DIR)
        if self.config_file:
            default = instance_defaults(self.config_file)[0]
        data_path = config.get("data_path", None)
        data_path = os.path.normpath(os.path.expanduser(data_path or default))
        try:
            os.makedirs(gcodes, exist_ok=True)
            os.makedirs(data_path, exist_ok=True)
        except OSError as e:
            raise config.error("cura_connection: cannot create %s" % (e,))
        self._open_state(config, gcodes, data_path, default)
        return gcodes, data_path

    def _open_state(self, config, gcodes, data_path, default):
        # One instance per state folder, the old shared state moved to its
        # instance, and this printer's own uuid
        old = os.path.join(gcodes, OLD_STATE_DIR)
        owner = os.path.abspath(self.config_file or "unknown")
        self.state_lock = StateLock(data_path, owner)
        try:
            if not self.state_lock.acquire():
                raise config.error(
                    "cura_connection: data_path %s is in use by %s: give "
                    "each Klipper instance its own data_path" % (
                        data_path, self.state_lock.holder()))
            _state_locks.append(self.state_lock)
            # what versions before per-instance state showed: the uuid5
            # of the name, which defaulted to the host name -- kept by a
            # single printer (its default name is still the host name);
            # instances, named apart now, no longer share one
            legacy_uuid = str(uuid.uuid5(uuid.NAMESPACE_DNS,
                                         "cura-connection." + self.name))
            if data_path == default != old:
                other = gcodes_owner(gcodes, owner)
                if other is None:
                    move_old_state(old, data_path, owner, legacy_uuid)
                elif os.path.isdir(old) and not state_in_use(data_path):
                    logging.info("cura_connection: the state in %s "
                                 "belongs to the Klipper instance of %s, "
                                 "whose G-code folder it is in: starting "
                                 "with no saved state", old, other)
            self.printer_uuid = load_printer_uuid(data_path, legacy_uuid)
        except OSError as e:
            raise config.error("cura_connection: cannot set up the state "
                               "folder %s (%s); data_path can choose "
                               "another" % (data_path, e))

    def _read_extruders(self, config):
        # Print cores shown to Cura; returns [(extruder, material entry)]
        self.extruder_count = 0
        self.print_core_ids = []
        extruder_names = []
        while config.has_section("extruder%s" % (self.extruder_count or "")):
            extruder_names.append("extruder%s" % (self.extruder_count or ""))
            sec = config.getsection(extruder_names[-1])
            nozzle = sec.getfloat("nozzle_diameter", 0.4, above=0.)
            self.print_core_ids.append("AA %g" % (nozzle,))
            self.extruder_count += 1
        if not self.extruder_count:
            # Cura needs at least one extruder box on the printer card
            self.extruder_count, self.print_core_ids = 1, ["AA 0.4"]
            extruder_names = ["extruder"]
        if self.machine == CUSTOM_MACHINE:
            # The custom definition has no print cores: a core name would
            # keep Cura from matching the printer to its configuration.
            self.print_core_ids = [None] * self.extruder_count
        # material_<extruder>: loaded until SET_CURA_MATERIAL says otherwise
        material_defaults = []
        for name in extruder_names:
            text = config.get("material_" + name, None)
            try:
                entry = text and parse_material_option(text)
            except ValueError as e:
                raise config.error("cura_connection: material_%s: %s"
                                   % (name, e))
            material_defaults.append((name, entry or None))
        return material_defaults

    def _definition_settings(self):
        # the machine definition's downloads, for the front to answer
        d = self.definition
        return {"id": d.id, "zip": base64.b64encode(d.zip()).decode(),
                "files": {name: base64.b64encode(data).decode()
                          for name, data in d.files.items()}}

    def _start_server(self, config, trusted, request_timeout):
        # Bind now: a busy port is a config error, not a crash later.
        server_class = CuraHTTPServer6 if ":" in self.address \
            else CuraHTTPServer
        try:
            self.server = server_class((self.address, self.port), self.api)
        except OSError as e:
            raise config.error("cura_connection: cannot listen on %s:%d: %s"
                               % (self.address, self.port, e.strerror))
        self.bound_port = self.server.server_address[1]
        self.server.trusted_clients = trusted
        self.server.request_timeout = request_timeout
        self.server_threads = []
        if self.front_process:
            try:
                self.server.front = FrontProcess(self.server, self.api, {
                    "trusted": [str(n) for n in trusted],
                    "request_timeout": request_timeout,
                    "require_pairing": self.require_pairing,
                    # uploads of a paired Cura are checked in Klippy
                    "uploads": not self.require_pairing,
                    "allow_control": self.allow_control,
                    "gcodes": self.intake.gcodes,
                    "max_upload": self.intake.max_upload_size,
                    "max_queue": self.max_queue,
                    "definition": self._definition_settings()},
                    self._front_lost)
            except OSError as e:
                logging.error("cura_connection: cannot start the front "
                              "process (%s): answering in Klippy's process",
                              e)
        if self.server.front is None:
            self._serve_here(self.server)
        self.announcer = None
        if self.use_zeroconf:
            self.announcer = ZeroconfAnnouncer(
                self.name, self.bound_port, self.address, {
                    "type": "printer", "name": self.name,
                    "machine": str(self.machine_bom),
                    "firmware_version": FIRMWARE_VERSION,
                    "cluster_size": "1"})

    def _serve_here(self, server):
        thread = threading.Thread(target=server.serve, daemon=True,
                                  name="cura_connection http")
        self.server_threads.append(thread)
        thread.start()

    def _front_lost(self):
        # Front process thread: the child ended by itself.  Its connections
        # are gone; new ones are answered here, on the same port.
        if self.closed:
            return
        try:
            self.server.listen_again()
        except OSError as e:
            logging.error("cura_connection: cannot listen on %s:%d again: "
                          "%s", self.address, self.bound_port, e)
            return
        self._serve_here(self.server)

    def _register_commands(self):
        gcode = self.printer.lookup_object("gcode")
        for name in ("CURA_BUILD_PLATE_CLEARED", "CURA_QUEUE",
                     "CURA_PAIRING", "CURA_ALLOW", "CURA_DENY",
                     "SET_CURA_MATERIAL"):
            gcode.register_command(name, getattr(self, "cmd_" + name),
                                   desc=getattr(self, "cmd_%s_help" % name))

    def _handle_snapshot(self, snap):
        # Reactor (the status timer): the lifecycle follows Klipper
        if self.lifecycle is None:
            return
        try:
            self.lifecycle.follow(snap)
        except Exception:
            logging.exception("cura_connection: following the print")

    def _handle_disconnect(self):
        self.close()

    def _shown(self):
        # G-code command (reactor, which may pause here): return once the
        # front process shows what the command changed, so a poll after
        # the console's "ok" sees it (at most FRONT_SHOW_LIMIT)
        front = self.server.front
        if front is None:
            return
        asked = front.ask()
        reactor = self.bridge.reactor
        deadline = reactor.monotonic() + FRONT_SHOW_LIMIT
        while not front.shown(asked) and reactor.monotonic() < deadline:
            reactor.pause(reactor.monotonic() + 0.002)

    def configuration_changes(self, job):
        """Any thread (memory only): [(extruder index, wanted, loaded)]
        a queued job waits for (LoadedMaterials.changes); none once
        forced or with hold_material_mismatch off."""
        if not self.hold_material_mismatch or job.force \
                or job.status != "queued" or not job.materials:
            return []
        return self.loaded.changes(job.materials)

    def console(self, msg):
        # From any thread: a line in the Klipper console (Mainsail, Fluidd)
        def show(eventtime):
            if self.bridge.gcode is not None and not self.closed:
                self.bridge.gcode.respond_info(msg)
        self.bridge.reactor.register_async_callback(show)

    def close(self):
        if self.closed:
            return
        self.closed = True
        self.bridge.closing = True
        self.server.close()
        for thread in self.server_threads:
            thread.join(2.)
        self.writer.stop()
        if self.announcer is not None:
            self.announcer.stop()
        if self in _live_instances:
            _live_instances.remove(self)
        self.state_lock.release()
        if self.state_lock in _state_locks:
            _state_locks.remove(self.state_lock)
        logging.info("cura_connection: released port %d", self.bound_port)

    # G-code commands (reactor): bad input raises only gcmd.error
    cmd_CURA_BUILD_PLATE_CLEARED_help = (
        "Confirm the build plate is empty so the next Cura job can start")
    def cmd_CURA_BUILD_PLATE_CLEARED(self, gcmd):
        try:
            self.lifecycle.plate_cleared()
        except CuraError as e:
            raise gcmd.error(e.message)
        self._shown()
        n = len(self.store.queue)
        gcmd.respond_info("Build plate marked clear; %d job(s) queued" % n)

    cmd_CURA_QUEUE_help = "List the jobs Cura sent to this printer"
    def cmd_CURA_QUEUE(self, gcmd):
        cur, queue, _ = self.store.all_jobs()
        lines = ["Printer: %s (%s)" % (
            cur[0].name, cur[0].status) if cur else "Printer: no job"]
        # (a reactor command: the first jobs only, however long the queue)
        shown = self.store.STATUS_JOBS
        lines += ["%d. %s (%s, from %s)" % (i + 1, j.name, j.status, j.owner)
                  for i, j in enumerate(queue[:shown])]
        if len(queue) > shown:
            lines.append("... and %d more" % (len(queue) - shown,))
        waits = queue and self.configuration_changes(queue[0])
        for index, wanted, loaded in waits or ():
            lines.append("%s waits for %s in extruder %d (SET_CURA_MATERIAL"
                         " or Override in Cura)" % (
                             queue[0].name, wanted.get("name") or wanted.get(
                                 "material") or wanted.get("guid"), index))
        if not queue:
            lines.append("Queue is empty")
        if not self.store.plate_clear and queue and not (
                cur and cur[0].status in ACTIVE):
            lines.append("Waiting for CURA_BUILD_PLATE_CLEARED")
        gcmd.respond_info("\n".join(lines))

    cmd_CURA_PAIRING_help = "List the Cura clients that asked for access"
    def cmd_CURA_PAIRING(self, gcmd):
        clients = self.auth.listing()
        lines = ["Pairing is %s" % (
            "required (require_pairing: True)" if self.require_pairing else
            "not required: every trusted client may send and control "
            "prints",)]
        for allowed, title in ((False, "Waiting for CURA_ALLOW:"),
                               (True, "Allowed:")):
            found = [c for c in clients if bool(c.get("allowed")) == allowed]
            if found:
                lines.append(title)
            lines += ["  ID=%s %s, %s, from %s at %s" % (
                c["id"], c.get("application") or "?", c.get("user") or "?",
                c.get("address"), c.get("requested_at")) for c in found]
        if not clients:
            lines.append("No Cura has asked for access yet (Cura 5.11 or "
                         "newer asks when it connects)")
        gcmd.respond_info("\n".join(lines))

    def _client_id(self, gcmd, allowed):
        # ID=..., or the only client in that state
        key_id = gcmd.get("ID", None)
        if key_id is None:
            found = [c["id"] for c in self.auth.listing()
                     if bool(c.get("allowed")) == allowed]
            if len(found) != 1:
                raise gcmd.error("Give ID=<id> (see CURA_PAIRING)")
            key_id = found[0]
        return key_id.strip().lower()

    def _client_address(self, key_id):
        # where that Cura asked from: its profiles sent before it had
        # credentials are kept under this address
        return next((c.get("address") for c in self.auth.listing()
                     if c["id"] == key_id), None)

    cmd_CURA_ALLOW_help = "Allow a Cura that asked for access: ID=<id>"
    def cmd_CURA_ALLOW(self, gcmd):
        # memory only, the StateWriter saves.
        key_id = self._client_id(gcmd, False)
        if not self.auth.allow(key_id):
            raise gcmd.error("No Cura asked with ID=%s (see CURA_PAIRING)"
                             % (key_id,))
        self.materials.release(key_id, self._client_address(key_id))
        gcmd.respond_info("Cura ID=%s may now send and control prints"
                          % (key_id,))

    cmd_CURA_DENY_help = "Remove a Cura's access or request: ID=<id>"
    def cmd_CURA_DENY(self, gcmd):
        key_id = self._client_id(gcmd, False)
        address = self._client_address(key_id)
        if not self.auth.remove(key_id):
            raise gcmd.error("No Cura with ID=%s (see CURA_PAIRING)"
                             % (key_id,))
        self.materials.drop(key_id, address)
        gcmd.respond_info("Cura ID=%s removed" % (key_id,))

    cmd_SET_CURA_MATERIAL_help = (
        "Tell Cura which material is loaded: EXTRUDER= GUID= or MATERIAL= "
        "BRAND= COLOR= (MATERIAL=empty: none)")
    def cmd_SET_CURA_MATERIAL(self, gcmd):
        # memory only, the StateWriter saves.
        name = gcmd.get("EXTRUDER", None)
        if name is None:
            toolhead = self.printer.lookup_object("toolhead")
            name = toolhead.get_extruder().get_name()
        words = {k: v for k, v in gcmd.get_command_parameters().items()
                 if k != "EXTRUDER"}
        if not words:
            entry = self.loaded.status_cache.get(name)
            gcmd.respond_info("%s: %s" % (name, " ".join(
                "%s=%s" % (k.upper(), shlex.quote(v))
                for k, v in sorted(entry.items())) if entry else "not set"))
            return
        try:
            entry = parse_material_words(words)
            self.loaded.set(name, entry)
        except ValueError as e:
            raise gcmd.error(str(e))
        except CuraError as e:
            raise gcmd.error(e.message)
        # a job waiting for this material starts now
        self.lifecycle.follow(self.bridge.now())
        self._shown()
        gcmd.respond_info("%s: material set for Cura" % (name,))

    def get_status(self, eventtime):
        status = dict(self.store.status_cache)
        status["materials"] = self.loaded.status_cache
        status["port"] = self.bound_port
        status["address"] = self.address
        # requests answered in Klippy's process, by handler (the front's
        # own are not counted: they never reach this process)
        server = getattr(self, "server", None)
        status["answered_here"] = dict(server.answered) if server else {}
        return status


def load_config(config):
    return CuraConnection(config)
