# Members of a group: another Klipper printer, reached through its
# Moonraker's HTTP API only (its status, its gcodes folder, its print).
#
# Every public method blocks on the network: it runs in a request thread
# or the group's own thread, never in the reactor.  Short requests share
# one keep-alive connection (a lock keeps them in turn); an upload has
# its own, so a poll is not held up behind hundreds of MB.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import hashlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid

from .threads import never_reactor

UPLOAD_CHUNK = 256 * 1024
# After the last byte of an upload Moonraker moves the file into place
# and reads its metadata before it answers: longer than a poll's timeout
UPLOAD_REPLY_TIMEOUT = 120.
STATUS_OBJECTS = {
    "webhooks": ["state", "state_message"],
    "print_stats": ["state", "filename", "print_duration", "message"],
    "virtual_sdcard": ["is_active", "progress", "file_position",
                       "file_size"],
    "pause_resume": ["is_paused"],
    "toolhead": ["axis_minimum", "axis_maximum"],
    # "Printing" while its G-code queue runs a command (a start waits)
    "idle_timeout": ["state"],
}
HEATER_FIELDS = ["temperature", "target"]
# Pieces of an answer read at a time, and the most an answer may hold
# (a status, a webcam list: a few kB)
READ_PIECE = 64 * 1024
MAX_ANSWER = 1 << 20
HTTP_ERROR_DETAIL = re.compile(r"HTTPError: HTTP \d+: ([^(]*)\((.*)\)\s*$")


class MemberError(Exception):
    """A member that cannot be reached, or refused what was asked;
    .message says which member and why, .status is Moonraker's HTTP
    status (None when it did not answer)."""
    def __init__(self, message, status=None):
        Exception.__init__(self, message)
        self.message = message
        self.status = status


def parse_member_url(url):
    """(host, port) of a Moonraker URL such as http://192.168.1.23:7125."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http":
        raise ValueError("'%s' is not an http:// URL" % (url,))
    try:
        port = u.port
    except ValueError:
        raise ValueError("'%s' has a bad port" % (url,))
    if not u.hostname or port is None:
        raise ValueError("'%s' needs a host and a port (Moonraker's, "
                         "such as http://192.168.1.23:7125)" % (url,))
    if u.path.strip("/") or u.query or u.fragment or u.username:
        raise ValueError("'%s': give only http://host:port" % (url,))
    return u.hostname, port


def shut_down(sock):
    # Ends a blocking read or write on sock in another thread (None: no
    # connection)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def check_remote_name(name):
    # A plain name in the gcodes root (the multipart header carries it)
    if (not name or name.startswith(".")
            or any(c in name for c in '/\\"\r\n\0')):
        raise ValueError("%r is not a plain file name" % (name,))
    return name


def multipart_parts(boundary, fields, filename):
    """(head, tail) around the file's bytes in a multipart/form-data body:
    fields first, then the "file" part."""
    head = b""
    for key, value in fields:
        head += ("--%s\r\nContent-Disposition: form-data; name=\"%s\""
                 "\r\n\r\n%s\r\n" % (boundary, key, value)).encode()
    head += ("--%s\r\nContent-Disposition: form-data; name=\"file\"; "
             "filename=\"%s\"\r\nContent-Type: application/octet-stream"
             "\r\n\r\n" % (boundary, filename)).encode("utf-8")
    return head, ("\r\n--%s--\r\n" % (boundary,)).encode()


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(UPLOAD_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def moonraker_message(body, reason):
    """Moonraker's {"error": {"message": ...}}, else the HTTP reason.  For
    some refusals (a checksum mismatch, a missing file) its message is
    only the reason and the detail is in the traceback's last line."""
    try:
        error = json.loads(body)["error"]
        message = error["message"]
    except (ValueError, KeyError, TypeError):
        return reason
    found = HTTP_ERROR_DETAIL.search(error.get("traceback") or "")
    if found and message == found.group(1).strip():
        return found.group(2)
    return message


def network_reason(exc):
    if isinstance(exc, socket.timeout):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "it closed the connection"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def extruder_index(name):
    """0 for extruder, n for extruder<n>, None for other objects."""
    if name == "extruder":
        return 0
    if name.startswith("extruder") and name[8:].isdigit():
        return int(name[8:])
    return None


def empty_status(error="", klippy_state=None):
    return {"reachable": not error, "error": error,
            "klippy_state": klippy_state, "state_message": "",
            "print_stats": None, "virtual_sdcard": None,
            "pause_resume": None, "extruders": [], "heater_bed": None,
            "axis_minimum": None, "axis_maximum": None, "busy": False}


class MoonrakerMember:
    def __init__(self, name, url, api_key=None, timeout=5.):
        self.name = name
        self.host, self.port = parse_member_url(url)
        self.url = "http://" + urllib.parse.urlsplit(url).netloc
        self.api_key = api_key
        self.timeout = timeout
        self.lock = threading.Lock()      # the shared connection
        self.conn = None
        self.uploads = set()              # their connections, for close()
        self.closed = False
        # Extruder and heater_bed names: read once per Klippy connection
        self.objects = None

    # Requests
    def _headers(self):
        return {"X-Api-Key": self.api_key} if self.api_key else {}

    def _connection(self, timeout):
        if self.closed:
            raise MemberError("%s is closed" % (self.name,))
        return http.client.HTTPConnection(self.host, self.port,
                                          timeout=timeout)

    def _unreachable(self, exc):
        return MemberError("%s (%s) is unreachable: %s"
                           % (self.name, self.url, network_reason(exc)))

    def _refused(self, what, status, reason, body):
        if status == 401:
            if self.api_key:
                return MemberError("%s's Moonraker refused the API key (401)"
                                   % (self.name,), status)
            return MemberError("%s's Moonraker asks for an API key (401 "
                               "Unauthorized): set one, or add this host to "
                               "its trusted_clients" % (self.name,), status)
        return MemberError("%s refused %s: %s" % (
            self.name, what, moonraker_message(body, reason)), status)

    def _request(self, method, path, what, body=None, deadline=None):
        """Moonraker's "result" for one request on the shared connection;
        MemberError when it cannot be reached or refuses."""
        headers = self._headers()
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        with self.lock:
            for attempt in (1, 2):
                timeout = self.timeout
                if deadline is not None:
                    timeout = max(0.01, deadline - time.monotonic())
                fresh = self.conn is None
                if fresh:
                    self.conn = self._connection(timeout)
                self.conn.timeout = timeout
                if self.conn.sock is not None:
                    self.conn.sock.settimeout(timeout)
                try:
                    self.conn.request(method, path, body, headers)
                    resp = self.conn.getresponse()
                    data = self._read_answer(resp, time.monotonic()
                                             + timeout)
                    break
                except (OSError, http.client.HTTPException) as e:
                    self.conn.close()
                    self.conn = None
                    # Moonraker may have closed an idle keep-alive: a read
                    # once more on a new connection.  Never a command
                    # (start, pause...): it may have arrived, and a start
                    # sent twice is refused as "already printing"; its
                    # caller decides on what the member then shows
                    reads = method == "GET" or path.startswith(
                        "/printer/objects/")
                    if fresh or attempt == 2 or not reads \
                            or isinstance(e, socket.timeout):
                        raise self._unreachable(e)
        if resp.status >= 300:
            raise self._refused(what, resp.status, resp.reason, data)
        try:
            return json.loads(data)["result"]
        except (ValueError, KeyError, TypeError):
            raise MemberError("%s answered %s with no result" % (
                self.name, path), resp.status)

    def _read_answer(self, resp, end):
        # The body by pieces, within the request's time however slowly
        # they come, and no bigger than any answer of Moonraker's we ask
        parts, size = [], 0
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise socket.timeout("no whole answer in time")
            if resp.length == 0:
                # (read whole: closed, so the connection takes the next
                # request; read1() leaves that to its caller)
                resp.close()
            if resp.isclosed():
                return b"".join(parts)
            self.conn.sock.settimeout(left)
            part = resp.read1(READ_PIECE)
            if not part:
                resp.close()
                return b"".join(parts)
            size += len(part)
            if size > MAX_ANSWER:
                raise http.client.HTTPException("an answer over %d bytes"
                                                % (MAX_ANSWER,))
            parts.append(part)

    def _path(self, path, **query):
        return path + "?" + urllib.parse.urlencode(query) if query else path

    # Status
    @never_reactor
    def poll(self):
        """The member's status as a plain dict (empty_status's keys); the
        objects' fields are None (extruders []) unless Klippy is ready.
        Never raises for the network or for an answer of another shape
        than Moonraker's: reachable False and the reason."""
        deadline = time.monotonic() + self.timeout
        try:
            return self._poll(deadline)
        except (AttributeError, TypeError, KeyError, IndexError,
                ValueError):
            self.objects = None
            return empty_status("%s answered its status with something "
                                "that is not Moonraker's" % (self.name,))

    def _poll(self, deadline):
        info = None
        try:
            info = self._request("GET", "/server/info", "the status",
                                 deadline=deadline)
            state = info.get("klippy_state")
            if state != "ready":
                self.objects = None
                status = empty_status(klippy_state=state)
                if info.get("klippy_connected"):
                    status["state_message"] = self._request(
                        "GET", "/printer/info", "the status",
                        deadline=deadline).get("state_message", "")
                return status
            if self.objects is None:
                self.objects = self._request(
                    "GET", "/printer/objects/list", "the status",
                    deadline=deadline)["objects"]
            return self._read_objects(deadline)
        except MemberError as e:
            self.objects = None
            if info is None or e.status is None or e.status == 401:
                return empty_status(e.message)
            # Moonraker answered, Klippy went away between two requests
            status = empty_status(klippy_state="disconnected")
            status["state_message"] = e.message
            return status

    def _read_objects(self, deadline):
        extruders = sorted((n for n in self.objects
                            if extruder_index(n) is not None),
                           key=extruder_index)
        heaters = extruders + [n for n in self.objects if n == "heater_bed"]
        query = dict(STATUS_OBJECTS)
        query.update((n, HEATER_FIELDS) for n in heaters)
        found = self._request("POST", "/printer/objects/query", "the status",
                              {"objects": query}, deadline)["status"]
        web = found.get("webhooks", {})
        status = empty_status(klippy_state=web.get("state", "ready"))
        if status["klippy_state"] != "ready":
            self.objects = None
        status["state_message"] = web.get("state_message", "")
        for name in ("print_stats", "virtual_sdcard", "pause_resume"):
            # (a Klipper without one of them shows it empty)
            status[name] = found.get(name) or {}
        def heater(name):
            return {f: found.get(name, {}).get(f) for f in HEATER_FIELDS}
        status["extruders"] = [heater(n) for n in extruders]
        if "heater_bed" in heaters:
            status["heater_bed"] = heater("heater_bed")
        for axis in ("axis_minimum", "axis_maximum"):
            value = found.get("toolhead", {}).get(axis)
            status[axis] = [float(v) for v in value[:3]] if value else None
            if status[axis] is not None and len(status[axis]) != 3:
                raise ValueError(axis)
        for name in ("print_stats", "virtual_sdcard", "pause_resume"):
            if not isinstance(status[name], dict):
                raise TypeError(name)
        status["busy"] = found.get("idle_timeout", {}).get(
            "state") == "Printing"
        return status

    # Files
    @never_reactor
    def upload(self, path, remote_name, folder=""):
        """Send the local file into the member's gcodes root (its folder
        there, made when missing) as remote_name, with its SHA-256:
        Moonraker keeps it only when whole and matching.  Streams it;
        MemberError on any failure."""
        check_remote_name(remote_name)
        if folder:
            check_remote_name(folder)
        checksum = sha256_of(path)
        boundary = uuid.uuid4().hex
        fields = [("root", "gcodes"), ("checksum", checksum)]
        if folder:
            fields.append(("path", folder))
        head, tail = multipart_parts(boundary, fields, remote_name)
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            conn = self._connection(self.timeout)
            self.uploads.add(conn)
            try:
                return self._send_upload(conn, f, size, head, tail, boundary)
            finally:
                self.uploads.discard(conn)
                conn.close()

    def _send_upload(self, conn, f, size, head, tail, boundary):
        sent = 0
        try:
            conn.putrequest("POST", "/server/files/upload")
            for key, value in self._headers().items():
                conn.putheader(key, value)
            conn.putheader("Content-Type",
                           "multipart/form-data; boundary=" + boundary)
            conn.putheader("Content-Length", len(head) + size + len(tail))
            conn.endheaders(head)
            while sent < size:
                chunk = f.read(min(UPLOAD_CHUNK, size - sent))
                if not chunk:
                    raise MemberError("%s: the file shrank while it was "
                                      "sent" % (f.name,))
                conn.send(chunk)
                sent += len(chunk)
            conn.send(tail)
            conn.sock.settimeout(max(self.timeout, UPLOAD_REPLY_TIMEOUT))
        except (OSError, http.client.HTTPException) as e:
            # Moonraker may have refused early (401, too large): its reply
            try:
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise MemberError("%s: the upload broke off after %d of %d "
                                  "bytes: %s" % (self.name, sent, size,
                                                 network_reason(e)))
            raise self._refused("the file", resp.status, resp.reason,
                                resp.read())
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise MemberError("%s did not confirm the upload: %s"
                              % (self.name, network_reason(e)))
        if resp.status >= 300:
            raise self._refused("the file", resp.status, resp.reason, data)
        return json.loads(data)

    @never_reactor
    def delete(self, filename):
        """Delete a file of the member's gcodes root; a missing one is
        not an error."""
        path = "/server/files/gcodes/" + urllib.parse.quote(filename)
        try:
            self._request("DELETE", path, "to delete " + filename)
        except MemberError as e:
            # Moonraker 0.11 answers a missing file 400 ("Invalid file
            # path"), a loaded one 403
            if e.status not in (400, 404):
                raise

    @never_reactor
    def gcode_script(self, script):
        """Run a G-code script on the member (its console shows what it
        answers)."""
        self._request("POST", self._path("/printer/gcode/script",
                                         script=script),
                      "to run " + script.split(" ", 1)[0])

    # Printing
    @never_reactor
    def start(self, filename):
        self._request("POST", self._path("/printer/print/start",
                                         filename=filename),
                      "to start " + filename)

    @never_reactor
    def pause(self):
        self._request("POST", "/printer/print/pause", "to pause")

    @never_reactor
    def resume(self):
        self._request("POST", "/printer/print/resume", "to resume")

    @never_reactor
    def cancel(self):
        self._request("POST", "/printer/print/cancel", "to cancel")

    # Cameras
    @never_reactor
    def webcams(self):
        """[{name, stream_url, snapshot_url}] of its enabled webcams; []
        when it has none or cannot be reached.  Relative URLs are the
        member's web server's (port 80, as Mainsail and Fluidd read
        them), not Moonraker's port."""
        try:
            cams = self._request("GET", "/server/webcams/list",
                                 "the webcams")["webcams"]
            base = "http://%s/" % (self.url[7:].rsplit(":", 1)[0],)
            resolve = lambda u: urllib.parse.urljoin(base, u) if u else u
            return [{"name": c.get("name"), "service": c.get("service"),
                     "stream_url": resolve(c.get("stream_url")),
                     "snapshot_url": resolve(c.get("snapshot_url"))}
                    for c in cams if c.get("enabled", True)]
        except (MemberError, AttributeError, TypeError, KeyError,
                ValueError):
            return []      # (none, or not Moonraker's answer)

    def close(self):
        """Close every connection; never blocks (any thread).  A request
        or an upload under way breaks off (one still connecting, at its
        timeout), and its thread closes it."""
        self.closed = True
        if self.lock.acquire(blocking=False):
            if self.conn is not None:
                self.conn.close()
                self.conn = None
            self.lock.release()
        else:
            self._break(self.conn)
        for conn in list(self.uploads):
            self._break(conn)

    @staticmethod
    def _break(conn):
        shut_down(conn.sock if conn is not None else None)
