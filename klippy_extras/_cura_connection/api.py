# Cura's cluster API: the routes and what each answers.
#
# CuraApi's handlers turn a request into a reply from the published
# snapshot, the job store and the other parts; each declares its route
# (@route), and the table is checked at import.  Handlers run in request
# threads of Klippy's process; they change jobs only through
# bridge.call(lifecycle...), in the reactor (but for the upload's
# store.arrived(), a flag), and a group member's job through
# PrinterGroup (act, plate_cleared) in the request thread itself.  The reads marked front=True are answered by
# the front process from what front_link publishes; it also uses the
# route table and receive_upload() in its own request threads.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import json
import logging
import operator
import os
import re
import socket
import threading
import urllib.parse
import uuid

from .definition import definition_download, web_page
from .errors import Conflict, CuraError, HTTPError, NotFound, storage_error
from .gcode_meta import checked_bounds, fits
from .intake import parse_small_multipart
from .jobs import ACTIONS, ACTIVE, JOB_FIELDS, Job
from .limits import MAX_MATERIAL_BODY
from .names import MAX_JOB_NAME, clean_text, label_text


# Cura refuses firmware below 4.0.0 and sends UFP from 4.4 on.
FIRMWARE_VERSION = "5.2.11"


class Payload:
    """A reply body as bytes (an image, or JSON encoded ahead) or a list of
    bytes to send one after the other, its type, extra headers."""
    def __init__(self, data, ctype, headers=()):
        self.data = data
        self.ctype = ctype
        self.headers = list(headers)


UUID_RE = r"([0-9a-fA-F-]{1,64})"
MATERIALS_PATH = "/cluster-api/v1/materials"


class Route:
    """One path of the API, declared on its CuraApi handler with @route:
    the method, the pattern (url groups become the handler's arguments),
    the handler, and where it is answered: front (the front process
    answers it from what Klippy's side publishes) and gated (a small
    reply from memory: it stays in the ServeGate)."""
    def __init__(self, method, pattern, fn, front, gated):
        self.method = method
        self.pattern = re.compile(pattern + "$")
        self.fn = fn
        self.handler = fn.__name__
        self.front = front
        self.gated = gated


ROUTES = []


def route(method, pattern, front=False, gated=False):
    """Declare the route of the CuraApi handler below (checked at import
    by check_routes)."""
    def declare(fn):
        ROUTES.append(Route(method, pattern, fn, front, gated))
        return fn
    return declare


def find_route(method, path):
    """(Route, url groups) of a request (path without its query);
    HTTPError 405 for a path of another method, 404 for no such path
    (both processes route with this)."""
    path = path.rstrip("/") or "/"
    allowed = []
    for r in ROUTES:
        match = r.pattern.match(path)
        if match:
            if r.method == method:
                return r, match.groups()
            allowed.append(r.method)
    if allowed:
        raise HTTPError(405, "%s is not allowed on %s (use %s)"
                        % (method, path, ", ".join(allowed)))
    raise HTTPError(404, "No such endpoint: %s" % (path,))


def camera_action(path):
    """What a path of the camera routes asks: "stream", "snapshot" or
    "" (the page, or the 404 that names the camera address)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
    action = query.get("action", [""])[0]
    return action if action in ("stream", "snapshot") else ""


# What a job's reply is made of (its saved fields): a change to any of
# them is a new reply
JOB_REPLY_KEY = operator.attrgetter(*JOB_FIELDS)


def card_status(kstate, cur, print_stats):
    """Cura's status of a printer whose Klipper is in kstate, with the
    job cur on it and print_stats as Klipper shows them."""
    if kstate == "startup":
        return "booting"
    if kstate != "ready":
        return "error"
    if (cur is not None and cur.status in ACTIVE) or \
            print_stats.get("state") in ("printing", "paused"):
        return "printing"
    return "idle"


class ReplyCache:
    """Replies serialized once and reused while what they show is unchanged.

    A poll of an unchanged printer or job list then costs a key compare,
    not a JSON encoding; a long queue is encoded job by job (short GIL
    holds, with pause() between them), and only jobs that changed.  The
    list goes out in chunks: joining 6 MB at once held the GIL for 10-20 ms
    on a busy host.  A poll leaves few new objects behind (keys are flat
    tuples of plain values): Klipper's reactor runs the garbage collector
    itself, and its pause grows with what other threads left to collect.
    One cache per job list: it keeps the jobs of the last list only."""
    PAUSE_EVERY = 20       # jobs encoded or checked between pause() calls
    CHUNK = 100            # jobs per chunk of the list

    def __init__(self, api):
        self.api = api
        self.printer = (None, b"")
        # uuid -> (what the JSON was made from, JSON bytes); replaced
        # whole, so a thread never sees one job's key with another's JSON
        self.entries = {}
        self.listing = ([], [b"[]"])   # the last list: parts, chunks
        self.cards = {}                # member uuid -> (key, JSON bytes)

    def printers(self, snap, req):
        """JSON bytes of the /printers list for this snapshot."""
        api = self.api
        cur = api.store.current
        config = json.dumps(api.printer_configuration(snap))
        key = (snap["seq"], req.reachable_ip(), config, api.store.plate_clear,
               cur and JOB_REPLY_KEY(cur), api.group and api.group.card_key())
        if self.printer[0] != key:
            cards = [json.dumps(api.printer_json(snap, req)).encode()]
            if api.group is not None:
                cards += [self.member_card(m, req)
                          for m in api.group.members]
            self.printer = (key, b"[" + b", ".join(cards) + b"]")
        return self.printer[1]

    def member_card(self, member, req):
        # A member's card, encoded again only once it changed
        cur = member.current
        key = (member.seq, req.reachable_ip(), member.plate_clear,
               member.camera is not None, member.loaded.version,
               cur and (cur.uuid, cur.status), self.api.port)
        entry = self.cards.get(member.uuid)
        if entry is None or entry[0] != key:
            entry = self.cards[member.uuid] = (key, json.dumps(
                self.api.member_json(member, req)).encode())
        return entry[1]

    def job(self, job, linked, config, entries):
        """JSON bytes of one job (config: CuraApi.jobs_basis()); its
        entry goes into entries."""
        key = JOB_REPLY_KEY(job) + (linked, config)
        entry = self.entries.get(job.uuid)
        if entry is None or entry[0] != key:
            # (an unchanged job keeps its old entry: nothing new to collect)
            entry = (key, json.dumps(self.api.job_json(job, linked)).encode())
        entries[job.uuid] = entry
        return entry[1]

    def job_list(self, linked, others, pause):
        """The JSON list of the jobs linked ([(printer uuid, the job on
        it)]), then the others, as a list of bytes."""
        config = self.api.jobs_basis()
        parts, entries = [], {}
        listed = linked + [(None, job) for job in others]
        for i, (printer, job) in enumerate(listed):
            if i and not i % self.PAUSE_EVERY:
                pause()
            parts.append(self.job(job, printer, config, entries))
        self.entries = entries    # jobs no longer listed are forgotten
        last_parts, chunks = self.listing
        if parts != last_parts:     # the same bytes objects: compared fast
            chunks = [b", ".join(parts[i:i + self.CHUNK])
                      for i in range(0, len(parts), self.CHUNK)]
            chunks = [b"["] + [b", " + c if i else c
                               for i, c in enumerate(chunks)] + [b"]"]
            self.listing = (parts, chunks)
        return chunks


class CuraApi:
    """The cluster API: turns requests into JSON from snapshots and store.
    Handlers run in HTTP threads: they read snapshots and the store, and
    change jobs only through bridge.call(lifecycle...), in the reactor,
    or, for a group member's job, through the PrinterGroup."""
    def __init__(self, bridge, store, lifecycle, intake, materials, loaded,
                 identity, access, definition, camera=None, max_queue=100,
                 group=None):
        self.bridge = bridge            # KlippyBridge
        self.store = store              # JobStore (read here)
        self.lifecycle = lifecycle      # JobLifecycle (through the bridge)
        self.intake = intake            # FileIntake
        self.materials = materials      # MaterialStore
        self.loaded = loaded            # LoadedMaterials
        self.identity = identity        # PrinterIdentity
        self.access = access            # AccessPolicy
        self.definition = definition    # MachineDefinition
        self.camera = camera            # CameraProxy or None
        self.max_queue = max_queue
        self.port = 8080                # the server's, once bound
        self.group = group              # PrinterGroup, or None (not loaded
        #                                 in the front process)
        self.replies = ReplyCache(self)
        self.history_replies = ReplyCache(self)    # the page's history
        self.auth_request_lock = threading.Lock()

    def route_of(self, method, path):
        """(Route, its handler bound here, url groups) of a request."""
        found, args = find_route(method, path)
        return found, found.fn.__get__(self), args

    # JSON models
    def printer_configuration(self, snap, loaded=None):
        loaded = loaded or self.loaded
        return [{"extruder_index": i,
                 "print_core_id": self.identity.print_core_ids[i],
                 "material": self.material_json(loaded.get(i))}
                for i in range(self.identity.extruder_count)]

    def material_json(self, entry):
        # Cura shows name and colour of the GUIDs it has; for others,
        # "Unknown" in the colour given here (a QML colour: code or name)
        if not entry:
            return None
        if entry.get("material") == "empty":
            return {"guid": "", "material": "empty", "brand": "",
                    "color": "", "name": "Empty"}
        known = self.materials.resolve(entry)
        if known:
            return {"guid": known["guid"], "brand": known["brand"],
                    "material": known["material"],
                    "color": known["color_code"] or known["color"],
                    "name": known["name"]}
        # Cura only redraws a material whose GUID changed: give each
        # brand/type/colour its own
        guid = entry.get("guid") or str(uuid.uuid5(
            uuid.NAMESPACE_URL, "cura-connection:material:%s/%s/%s" % (
                entry.get("brand", ""), entry.get("material", ""),
                entry.get("color", ""))))
        return {"guid": guid, "brand": entry.get("brand", ""),
                "material": entry.get("material", ""),
                "color": entry.get("color", ""),
                "name": " ".join(entry[k] for k in (
                    "brand", "material", "color") if entry.get(k))
                or "Unknown"}

    def printer_json(self, snap, req):
        kstate = snap["klippy_state"]
        status = card_status(kstate, self.store.current, snap["print_stats"])
        return {
            "enabled": True, "firmware_version": FIRMWARE_VERSION,
            "friendly_name": self.identity.name,
            "unique_name": self.identity.name,
            "ip_address": req.reachable_ip(),
            "machine_variant": self.identity.machine_variant,
            "status": status, "uuid": self.identity.printer_uuid,
            "configuration": self.printer_configuration(snap),
            "build_plate": {"type": "glass"}, "reserved_by": None,
            "maintenance_required": False,
            "firmware_update_status": "up_to_date",
            "latest_available_firmware": FIRMWARE_VERSION,
            # extra fields, ignored by Cura, read by the web page
            "klipper_state": kstate, "state_message": snap["state_message"],
            "extruders": snap["extruders"], "heater_bed": snap["heater_bed"],
            "plate_clear": self.store.plate_clear,
            "progress": snap["virtual_sdcard"].get("progress"),
            "camera": self.camera is not None,
            "machine_definition": self.definition.id,
        }

    def member_json(self, member, req):
        """A group member's card, from what its Moonraker said last."""
        st = member.status
        kstate = st["klippy_state"]
        status = card_status(kstate, member.current, st["print_stats"]) \
            if st["reachable"] else "unreachable"
        progress = (st["virtual_sdcard"] or {}).get("progress")
        ip = req.reachable_ip()
        if member.camera is not None:
            # Cura opens http://<ip_address>:8080/?action=stream: this
            # makes it the member's relay on this server's port (the rest
            # is a URL fragment)
            ip = "%s:%d/cluster-api/v1/printers/%s/camera?action=stream#" \
                % (ip, self.port, member.uuid)
        return {
            "enabled": True, "firmware_version": FIRMWARE_VERSION,
            "friendly_name": member.name, "unique_name": member.name,
            "ip_address": ip,
            "machine_variant": self.identity.machine_variant,
            "status": status, "uuid": member.uuid,
            "configuration": [
                {"extruder_index": i, "print_core_id":
                 self.identity.print_core_ids[0],
                 "material": self.material_json(member.loaded.get(i))}
                for i in range(max(1, len(st["extruders"])))],
            "build_plate": {"type": "glass"}, "reserved_by": None,
            "maintenance_required": False,
            "firmware_update_status": "up_to_date",
            "latest_available_firmware": FIRMWARE_VERSION,
            # extra fields, ignored by Cura, read by the web page
            "klipper_state": kstate or "unreachable",
            "state_message": st["state_message"] or st["error"],
            "extruders": st["extruders"], "heater_bed": st["heater_bed"],
            "plate_clear": member.plate_clear,
            "progress": progress,
            "camera": member.camera is not None, "group_member": True,
        }

    def jobs_basis(self):
        # JSON of what jobs' replies are made of besides their fields: the
        # printer's configuration, the loaded entries changes compare
        members = self.group.members if self.group else []
        return json.dumps([self.printer_configuration(None),
                           self.loaded.status_cache] + [
                               m.loaded.status_cache for m in members])

    def loaded_for(self, job):
        # The loaded materials a job is compared with: those of the
        # member it is named for or is on, else this printer's
        member = self.group and self.group.member(job.printer or job.target)
        return member.loaded if member else self.loaded

    def job_configuration(self, job):
        # The printer's configuration, with what the job's file asks of
        # the extruders it names
        config = self.printer_configuration(None, self.loaded_for(job))
        for wanted in job.materials:
            if wanted["extruder"] >= len(config):
                continue
            extruder = config[wanted["extruder"]]
            if wanted.get("print_core_id") and extruder["print_core_id"]:
                extruder["print_core_id"] = wanted["print_core_id"]
            if wanted.get("guid") or wanted.get("material"):
                extruder["material"] = self.wanted_material_json(wanted)
        return config

    def wanted_material_json(self, wanted):
        # A job's material as the printer's are shown (by GUID, else the
        # file's own names and colour code)
        entry = {k: wanted[k] for k in ("guid", "brand", "material")
                 if wanted.get(k)}
        if wanted.get("color_code") or wanted.get("color"):
            entry["color"] = wanted.get("color_code") or wanted["color"]
        d = self.material_json(entry)
        d["name"] = wanted.get("name") or d["name"]
        return d

    def configuration_changes(self, job):
        # Cura's "Configuration change" list for a job that waits for one;
        # material_change only: Cura lets the user override it
        changes = []
        for index, wanted, loaded in self.loaded_for(
                job).configuration_changes(job):
            target = self.wanted_material_json(wanted)
            origin = self.material_json(loaded)
            changes.append({
                "type_of_change": "material_change", "index": index,
                "target_id": target["guid"], "origin_id": origin["guid"],
                "target_name": target["name"],
                "origin_name": origin["name"]})
        return changes

    def job_json(self, job, linked):
        d = {"uuid": job.uuid, "name": job.name, "owner": job.owner,
             "created_at": job.created_at, "status": job.status,
             "started": job.started, "force": job.force,
             "machine_variant": self.identity.machine_variant,
             "time_total": int(job.time_total),
             "time_elapsed": int(job.time_elapsed or 0),
             "configuration": self.job_configuration(job),
             "constraints": self.job_constraints(job),
             "configuration_changes_required":
                 self.configuration_changes(job),
             "impediments_to_printing": [], "build_plate": {"type": "glass"},
             "compatible_machine_families": [self.identity.machine_variant],
             "filename": job.filename, "source": job.source,
             "has_preview": bool(job.preview), "finished_at": job.finished_at}
        if job.message:
            d["message"] = job.message
        # Only the job on a printer may point at it (Cura pitfall 6)
        # (linked: the printer's uuid; "" is this printer's in a store
        # made without it)
        if linked is not None:
            d["printer_uuid"] = d["assigned_to"] = \
                linked or self.identity.printer_uuid
        elif job.started:
            d["printed_on_uuid"] = job.printer or self.identity.printer_uuid
        return d

    def printer_name(self, printer_uuid):
        if printer_uuid == self.identity.printer_uuid:
            return self.identity.name
        member = self.group and self.group.member(printer_uuid)
        return member.name if member else None

    def job_constraints(self, job):
        # A job the upload named a printer for says so (Cura reads it);
        # it points at that printer only once it is on it
        name = job.target and self.printer_name(job.target)
        return {"require_printer_name": name} if name else []

    # Handlers: (request, *url groups) -> (status, JSON-able or bytes)
    @route("GET", r"/api/v1/system", front=True, gated=True)
    def get_system(self, req):
        return 200, {
            "guid": self.identity.printer_uuid, "firmware": FIRMWARE_VERSION,
            "hostname": socket.gethostname(), "name": self.identity.name,
            "platform": "Klipper %s" % (self.identity.klipper_version,),
            "variant": self.identity.machine_variant,
            "hardware": {"typeid": self.identity.machine_bom, "revision": 0},
        }

    @route("POST", r"/api/v1/auth/request")
    def post_auth_request(self, req):
        # Cura >= 5.11 asks for credentials and then signs requests with
        # them (HTTP Digest).  With require_pairing the user allows them
        # with CURA_ALLOW; otherwise they are handed out and accepted.
        body = req.read_json(optional=True)
        if not isinstance(body, dict):
            body = {}
        auth = self.access.auth
        with self.auth_request_lock:
            # Cura asks again after each 401 (and several times at once
            # when it connects): one waiting request per Cura
            found = auth.find_pending(body.get("application"),
                                      body.get("user"), str(req.client_ip()))
            if found:
                return 200, {"id": found[0], "key": found[1]}
            key_id, key = auth.request(body.get("application"),
                                       body.get("user"),
                                       str(req.client_ip()))
        try:
            auth.save()
        except OSError as e:
            logging.error("cura_connection: cannot save credentials: %s", e)
        if self.access.require_pairing:
            self.bridge.console(
                "Cura (%s, %s) at %s asks to control this printer: "
                "CURA_ALLOW ID=%s allows it, CURA_PAIRING lists requests"
                % (clean_text(body.get("application")) or "?",
                   clean_text(body.get("user")) or "?", req.client_ip(),
                   key_id))
        return 200, {"id": key_id, "key": key}

    @route("GET", r"/api/v1/auth/check/([0-9a-zA-Z]{1,64})", gated=True)
    def get_auth_check(self, req, key_id):
        status = self.access.auth.status(key_id)
        if status != "unknown" and not self.access.require_pairing:
            status = "authorized"
        return 200, {"message": status}

    @route("GET", r"/api/v1/auth/verify")
    def get_auth_verify(self, req):
        if self.access.require_pairing:
            self.access.auth.verify(req.command, req.path,
                                  req.headers.get("Authorization"))
        return 200, {"message": "ok"}

    # The three polled replies (also published to the front process)
    def printers_reply(self, req):
        """JSON bytes of /printers as req (its reachable_ip()) sees it."""
        return self.replies.printers(self.bridge.snapshot, req)

    def print_jobs_reply(self, pause):
        """The /print_jobs list as chunks of JSON bytes: only the
        printer's job and the queue, as an Ultimaker lists them (Cura
        clears its printer card only when the job leaves this list)."""
        linked, others = self.store.printer_jobs()
        return self.replies.job_list(linked, others, pause)

    def history_reply(self, pause):
        cur, queue, history = self.store.all_jobs()
        return self.history_replies.job_list([], history, pause)

    @route("GET", r"/cluster-api/v1/printers", front=True, gated=True)
    def get_printers(self, req):
        return 200, Payload(self.printers_reply(req), "application/json")

    @route("GET", r"/cluster-api/v1/print_jobs", front=True, gated=True)
    def get_print_jobs(self, req):
        return 200, Payload(self.print_jobs_reply(req.server.gate.breathe),
                            "application/json")

    @route("GET",
           r"/cluster-api/v1/print_jobs/history", front=True, gated=True)
    def get_history(self, req):
        return 200, Payload(self.history_reply(req.server.gate.breathe),
                            "application/json")

    @route("GET",
           r"/cluster-api/v1/print_jobs/%s" % UUID_RE, front=True, gated=True)
    def get_print_job(self, req, job_uuid):
        job = self.store.get(job_uuid)
        linked = dict((j.uuid, printer) for printer, j
                      in self.store.printer_jobs()[0])
        return 200, self.job_json(job, linked.get(job.uuid))

    @route("GET",
           r"/cluster-api/v1/print_jobs/%s/preview_image" % UUID_RE,
           front=True)
    def get_preview_image(self, req, job_uuid):
        job = self.store.get(job_uuid)
        data = job.preview and self.intake.read_preview(job.preview)
        if not data:
            raise HTTPError(404, "Print job %s has no preview image"
                            % (job.name,))
        return 200, data

    @route("POST", r"/cluster-api/v1/print_jobs")
    def post_print_job(self, req):
        req.require_control()
        return 200, receive_upload(
            req, self.intake, lambda: len(self.store.queue),
            self.max_queue, lambda filename, owner, meta:
            self.add_upload(filename, owner, meta, req.client_address[0]))

    def add_upload(self, filename, owner, meta, address):
        """A received print file (its G-code in place) becomes a queued
        job, saved before the reply: {uuid, name, filename, status}.
        Conflict when the queue is full, StorageError when the queue
        cannot be saved; either way the file is removed."""
        # (meta comes from the front process too: cleaned again)
        name = label_text(meta.get("name"), MAX_JOB_NAME)
        bounds = checked_bounds(meta.get("bounds"))
        try:
            target = self.target_of(meta.get("require_printer_name") or "",
                                    bounds, filename)
        except CuraError as e:
            logging.info("cura_connection: refused %s from %s: %s",
                         filename, owner, e.message)
            self.intake.remove(filename, meta["preview"])
            raise
        job = Job(name=name or os.path.splitext(filename)[0],
                  target=target, bounds=bounds,
                  filename=filename, owner=owner,
                  time_estimate=meta["time_estimate"],
                  time_total=meta["time_estimate"], preview=meta["preview"],
                  materials=self.materials.name_job_materials(
                      meta["materials"], meta["material_profiles"]))
        try:
            # (the front process counts the queue it was last shown: the
            # limit is checked again where the job is added)
            self.bridge.call(self.lifecycle.add, job, self.max_queue)
        except CuraError:
            self.intake.remove(filename, meta["preview"])
            raise
        try:
            self.store.save()
        except OSError as e:
            # An unsaved job would vanish at the next restart: the upload
            # fails whole instead (unless it was deleted meanwhile),
            # leaving no job and no file.
            unsaved = self.bridge.call(self.lifecycle.change,
                                       self.store.take_back, job)
            if unsaved:
                self.intake.remove(filename, meta["preview"])
                raise storage_error(e, self.store.path)
        finally:
            self.store.arrived(job)     # (saved, or taken back)
        logging.info("cura_connection: received %s from %s (%s)",
                     filename, job.owner, address)
        return {"uuid": job.uuid, "name": job.name, "filename": filename,
                "status": job.status}

    def target_of(self, wanted, bounds, filename):
        """The uuid of the printer the upload named ("" for any), once the
        file fits it (or, for any, one printer): else Conflict or
        NotFound, saying why."""
        host = self.identity.printer_uuid
        snap = self.bridge.snapshot
        printers = [(host, self.identity.name, snap.get("axis_minimum"),
                     snap.get("axis_maximum"))]
        if self.group is not None:
            printers += [(m.uuid, m.name) + m.reach
                         for m in self.group.members]
        if wanted:
            printers = [p for p in printers if p[1] == wanted]
            if not printers:
                raise NotFound("No printer %s in this group" % (wanted,))
        reasons = []
        for printer_uuid, name, low, high in printers:
            ok, why = fits(bounds, low, high, name)
            if ok:
                return printer_uuid if wanted else ""
            reasons.append(why)
        raise Conflict("%s fits no printer%s: %s" % (
            filename, " of this group" if len(printers) > 1 else "",
            "; ".join(reasons)))

    @route("PUT", r"/cluster-api/v1/print_jobs/%s/action" % UUID_RE)
    def put_action(self, req, job_uuid):
        req.require_control()
        body = req.read_json()
        action = body.get("action") if isinstance(body, dict) else None
        if not isinstance(action, str) or action not in ACTIONS:
            raise HTTPError(400, "action must be one of %s"
                            % (", ".join(sorted(ACTIONS)),))
        job = self.store.get(job_uuid)
        member = self.store.printer_of(job)
        # answered once Klipper did it (or refused: 409)
        if member is not None:
            status, job_status = self.group.act(member, job, action)
        else:
            status, job_status = self.bridge.call(self.lifecycle.act,
                                                  job_uuid, action)
        self.store.save()
        return status, {"status": job_status}

    @route("POST", r"/cluster-api/v1/print_jobs/%s/action/move" % UUID_RE)
    def post_move(self, req, job_uuid):
        req.require_control()
        body = req.read_json()
        pos = body.get("to_position") if isinstance(body, dict) else None
        if not isinstance(pos, int) or isinstance(pos, bool) or pos < 0 \
                or body.get("list", "queued") != "queued":
            raise HTTPError(400, 'Expected {"to_position": <n>, '
                            '"list": "queued"}')
        self.bridge.call(self.lifecycle.change, self.store.move, job_uuid,
                         pos)
        self.store.save()
        return 200, {"message": "moved"}

    @route("PUT", r"/cluster-api/v1/print_jobs/%s" % UUID_RE)
    def put_print_job(self, req, job_uuid):
        req.require_control()
        body = req.read_json()
        if not isinstance(body, dict) or not isinstance(body.get("force"),
                                                        bool):
            raise HTTPError(400, 'Expected {"force": true}')
        self.bridge.call(self.lifecycle.change, self.store.set_force,
                         job_uuid, body["force"])
        self.store.save()
        return 200, {"message": "ok"}

    @route("DELETE", r"/cluster-api/v1/print_jobs/%s" % UUID_RE)
    def delete_print_job(self, req, job_uuid):
        req.require_control()
        self.bridge.call(self.lifecycle.change, self.store.delete, job_uuid)
        self.store.save()
        return 200, {"message": "deleted"}

    @route("GET", MATERIALS_PATH, front=True, gated=True)
    def get_materials(self, req):
        return 200, [{"guid": m["guid"], "version": m["version"],
                      "brand": m["brand"], "material": m["material"],
                      "color": m["color"]}
                     for m in self.materials.list()]

    @route("POST", MATERIALS_PATH)
    def post_material(self, req):
        # Cura syncs only when it connects, before anyone could allow it:
        # a waiting Cura's profiles are kept until CURA_ALLOW stores them.
        waiting = req.require_control(waiting_ok=True)
        body = req.read_body(MAX_MATERIAL_BODY)
        boundary = req.multipart_boundary()
        parts = parse_small_multipart(body, boundary)
        files = [p for p in parts if p["filename"] is not None
                 and p["name"] != "signature_file"]
        if len(files) != 1:
            raise HTTPError(400, "Send one material file in part 'file'")
        if waiting is not None:
            self.materials.keep_waiting(waiting, files[0]["filename"],
                                files[0]["data"])
            return 200, {"message": "kept until this Cura is allowed "
                         "(CURA_PAIRING, CURA_ALLOW)"}
        added = self.materials.add(files[0]["filename"], files[0]["data"])
        if not added:
            return 200, {"message": "not added: the printer has this "
                         "version or a newer one"}
        return 200, {"message": "stored"}

    # Not Cura's: the web page, the camera and the machine definition
    # not Cura's: the web page's, the camera and the machine definition
    @route("POST",
           r"/cluster-api/v1/printers/%s/action/plate_cleared" % UUID_RE)
    def post_plate_cleared(self, req, printer_uuid):
        req.require_control()
        req.read_json(optional=True)
        member = self.group and self.group.member(printer_uuid)
        if member:
            # as the member says now (its Moonraker is asked)
            self.group.plate_cleared(member)
        elif printer_uuid != self.identity.printer_uuid:
            raise HTTPError(404, "No printer %s" % (printer_uuid,))
        else:
            # the same operation as CURA_BUILD_PLATE_CLEARED, in the reactor
            self.bridge.call(self.lifecycle.plate_cleared)
        self.store.save()
        return 200, {"message": "Build plate marked clear"}

    @staticmethod
    def wants_html(req):
        return "text/html" in req.headers.get("Accept", "")

    # "Manage in browser" links
    @route("GET", r"/print_jobs", front=True, gated=True)
    @route("GET", r"/printers", front=True, gated=True)
    def get_page(self, req):
        if not self.wants_html(req):
            # scripts asking the browser paths get the API's JSON
            if req.path.split("?", 1)[0].rstrip("/").endswith("/printers"):
                return self.get_printers(req)
            return self.get_print_jobs(req)
        try:
            page = web_page()
        except OSError as e:
            raise HTTPError(500, "Web page missing: %s" % (e,))
        return 200, Payload(page, "text/html; charset=utf-8")

    # Cura's camera: /?action=stream, also under nginx's paths
    @route("GET", r"/", front=True)
    @route("GET", r"/printers/camera", front=True)
    def get_root(self, req):
        action = camera_action(req.path)
        if action:
            if self.camera is None:
                raise HTTPError(404, "No camera: set camera_url in "
                                "[cura_connection]")
            if action == "snapshot":
                return 200, self.camera.snapshot()
            return self.camera.stream(req)
        if self.wants_html(req):
            return self.get_page(req)
        raise HTTPError(404, "No such endpoint: / (the camera is "
                        "/?action=stream)")

    # A group member's camera (its card's ip_address leads here)
    @route("GET", r"/cluster-api/v1/printers/%s/camera" % UUID_RE)
    def get_member_camera(self, req, printer_uuid):
        member = self.group and self.group.member(printer_uuid)
        if not member:
            raise HTTPError(404, "No printer %s in this group"
                            % (printer_uuid,))
        camera = member.camera
        if camera is None:
            raise HTTPError(404, "%s's Moonraker lists no webcam"
                            % (member.name,))
        if camera_action(req.path) == "snapshot":
            return 200, camera.snapshot()
        return camera.stream(req)

    @route("GET", r"/printers/cura_definition\.zip", front=True)
    def get_definition_zip(self, req):
        return 200, Payload(*definition_download(
            self.definition.id, self.definition.zip(), {}))

    @route("GET",
           r"/printers/cura_definition/([A-Za-z0-9_.]{1,200})", front=True)
    def get_definition_file(self, req, fname):
        return 200, Payload(*definition_download(
            self.definition.id, None, self.definition.files, fname))


def receive_upload(req, intake, queued, max_queue, add):
    """Not the reactor: admit the upload in req (queue room and disk space
    are taken before the body is read: see FileIntake.begin), receive it,
    and return add(filename, owner, meta), the reply.  What begin()
    reserved is held until add() has made the job."""
    length = req.content_length(required=True)
    boundary = req.multipart_boundary()
    upload = intake.begin(length, queued, max_queue)
    try:
        req.send_continue()
        filename, meta = intake.receive(upload, req.readinto_body, boundary)
        owner = upload.fields.get("owner", b"").decode("utf-8", "replace")
        return add(filename, label_text(owner, 100) or "Cura", meta)
    finally:
        intake.end(upload)


def check_routes(routes, api_class):
    """At import: every route has a handler of api_class, no two share a
    method and pattern, and the front answers reads only."""
    seen = set()
    for r in routes:
        key = (r.method, r.pattern.pattern)
        assert key not in seen, "route declared twice: %s %s" % key
        seen.add(key)
        assert getattr(api_class, r.handler, None) is r.fn, r.handler
        assert r.method == "GET" or not (r.front or r.gated), r.handler


check_routes(ROUTES, CuraApi)
