# The front: the child process that answers the polls.
#
# Klippy's reactor shares the GIL with every thread of Klippy's process,
# so a flood of polls there makes its timers late.  By default this child
# process (started by front_link with Klippy's Python; main() below)
# owns the listening socket.  It answers the reads of routes marked
# front=True from replies Klippy's side keeps published in it, and
# receives uploads (without require_pairing) into the G-code folder,
# asking Klippy's side to reserve room for them and to queue the
# finished file.  Every other request (actions, pairing, signed reads
# with require_pairing, the camera, material posts) and any head the
# front does not fully understand it hands to the server in Klippy's
# process, whole and unread, with its socket; that server answers with
# "Connection: close" and closes it, so no connection stays in Klippy's
# process.  Closing rather than handing the connection back: Cura 4.13's
# and Cura 5's Qt clients open a new connection for their next request
# without a failed request (their tests find none in their logs), and a
# closed connection leaves no bytes read ahead by http.server that would
# have to go back with it.  The two processes are joined by two socket
# pairs: "control" carries published replies, answers and the end of
# handed-over connections ("released") one way, acknowledgements, calls
# (reserve, add_upload), the end of reservations ("unreserve") and log
# lines the other; "handover" carries connections (SCM_RIGHTS).
#
# Runs in the child only: a thread per connection, one reading control.
# It loads neither the lifecycle, the bridge nor front_link.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import base64
import errno
import http
import json
import logging
import os
import re
import select
import signal
import socket
import threading
import time

from .access import (
    AccessPolicy, client_ip, parse_trusted_clients, reachable_ip, untrusted)
from .api import camera_action, find_route, receive_upload
from .definition import definition_download, web_page
from .errors import HTTPError, NoSpace, NotFound, error_body, http_error
from .frames import (
    FRONT_CALL_LIMIT, FrameReader, HEAD_END, IP_MARK, MAX_HEAD, MAX_HEADERS,
    send_frame)
from .gcode_meta import image_type
from .http_server import (
    CuraRequestHandler, http_date, linger_close, refuse_connection)
from .intake import FileIntake, UNPACK_GRANT, Upload
from .limits import MAX_CONNECTIONS, MAX_HANDED_OVER


UPLOAD_LINE = re.compile(r"POST /cluster-api/v1/print_jobs/?(\?[!-~]*)? "
                         r"HTTP/1\.[01]\r?\n")
# The route of the uploads the front receives itself
UPLOAD_ROUTE = find_route("POST", "/cluster-api/v1/print_jobs")[0]


# The front's priority below Klippy's (nice value added): on a saturated
# core the printer goes first, and the front still gets about a tenth
FRONT_NICE = 10


def main(klippy_pid, listen_fd, ctl_fd, hand_fd):
    """The child process: serve until Klippy's side closes the control
    pair (or dies: the kernel then ends this process too)."""
    try:
        import ctypes
        # PR_SET_PDEATHSIG: SIGKILL when Klippy's thread that started us
        # ends (kill -9 of Klippy included); then check it was not before
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != klippy_pid:
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is Klippy's
    try:
        os.nice(FRONT_NICE)     # on a busy core the printer goes first
    except OSError:
        pass
    ctl = socket.socket(fileno=ctl_fd)
    front = FrontServer(socket.socket(fileno=listen_fd), ctl,
                        socket.socket(fileno=hand_fd))
    threading.Thread(target=front.read_control, daemon=True).start()
    front.serve()


class FrontLog(logging.Handler):
    """The child's log lines go to klippy.log through Klippy's side."""
    def __init__(self, front):
        logging.Handler.__init__(self, logging.INFO)
        self.front = front

    def emit(self, record):
        try:
            self.front.send("log", self.format(record).encode())
        except Exception:
            pass


class FrontRequest:
    """A request head the front can answer: GET of a route the front
    answers (Route.front), no body, every line plain; None from parse()
    for anything else (Klippy's side, http.server, reads that one)."""
    REQUEST_LINE = re.compile(r"GET (/[!-~]*) HTTP/1\.([01])\Z")
    # (no CR, no control character: a line the email parser behind
    # http.server would read as two headers is not plain)
    HEADER = re.compile(
        r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t -~]*?)[ \t]*\Z")
    # present at all -> Klippy's side decides
    HANDED_OVER = ("content-length", "transfer-encoding", "expect")
    # (a repeated framing header: http.server refuses differing lengths)
    ONCE = ("host", "x-real-ip", "connection", "authorization") + HANDED_OVER

    def __init__(self, path, handler, args, http11, headers):
        self.path = path
        self.handler = handler
        self.args = args
        self.headers = headers
        conn = headers.get("connection", "").lower()
        self.close = conn == "close" or (not http11 and conn != "keep-alive")

    @staticmethod
    def route(path):
        """(handler name, url groups) of a GET the front answers, as
        CuraApi.route finds it; ("not_found", (message,)) for no such
        path (the front answers Klippy's side's 404), None for a path the
        front does not answer."""
        try:
            found, args = find_route("GET", path)
        except HTTPError as e:
            return ("not_found", (e.message,)) if e.status == 404 else None
        return (found.handler, args) if found.front else None

    @classmethod
    def parse(cls, head):
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            return None
        lines = [line[:-1] if line.endswith("\r") else line
                 for line in text.split("\n")]
        # one head, ended by its first empty line (and by nothing else)
        if lines[-2:] != ["", ""] or "" in lines[:-2] \
                or len(lines) > MAX_HEADERS + 3:
            return None
        m = cls.REQUEST_LINE.match(lines[0])
        if m is None:
            return None
        path = m.group(1).split("?", 1)[0]
        route = cls.route(path)
        if route is None:
            return None
        if route[0] == "get_root" and camera_action(m.group(1)):
            return None     # the camera is Klippy's side's
        headers = {}
        for line in lines[1:-2]:
            h = cls.HEADER.match(line)
            if h is None:
                return None
            name = h.group(1).lower()
            if name in headers:
                if name in cls.ONCE:
                    return None
                continue        # the first one counts, as for http.server
            headers[name] = h.group(2)
        if any(h in headers for h in cls.HANDED_OVER):
            if headers.get("content-length") != "0" or len(
                    [h for h in cls.HANDED_OVER if h in headers]) > 1:
                return None
        return cls(path, route[0], route[1], m.group(2) == "1", headers)


class FrontIntake(FileIntake):
    """The child's intake.  Queue room and disk space for an upload are
    reserved by Klippy's side, in its own intake, so that one reservation
    covers the uploads of both processes: Klippy's side learns each chunk
    read (received) and grants room for what unpacking adds beyond it
    (check_room; a grant counts until the upload ends)."""
    def __init__(self, front, gcodes, max_upload_size):
        FileIntake.__init__(self, gcodes, max_upload_size)
        self.front = front

    def begin(self, length, queued=None, max_queue=None):
        token = self.front.call("reserve", length=length)["token"]
        upload = Upload(self, length)
        upload.token = token
        upload.granted = 0
        return upload

    def received(self, upload, n):
        # Klippy's side holds the reservation: it learns each chunk read,
        # so that only what is still to be written stays reserved
        upload.received += n
        try:
            self.front.send("received", b"%d %d" % (upload.token,
                                                     upload.received))
        except OSError:
            pass    # Klippy's side is gone (the front ends)

    def check_room(self, upload, n):
        # Unpacked bytes beyond the reservation: Klippy's side checks them
        # against every upload of both processes and adds them to this
        # one's reservation, a step at a time
        if upload.granted < n:
            # (near the margin: only the n bytes, as Klippy's side would)
            for grant in (max(n, UNPACK_GRANT), n):
                try:
                    self.front.call("grow", token=upload.token, n=grant,
                                    filename=upload.filename)
                    break
                except HTTPError as e:
                    if e.status != 507:
                        raise
                    if grant == n:
                        raise NoSpace(e.message)
            upload.granted += grant
        upload.granted -= n

    def end(self, upload):
        upload.discard()
        try:
            self.front.send("unreserve", b"%d" % (upload.token,))
        except OSError:
            pass     # Klippy's side is gone, and its reservations with it


class FrontUploads:
    """The child's own handler: uploads, received here and queued by
    Klippy's side (add_upload).  It stands where CuraApi stands for
    CuraRequestHandler, for this one route."""
    def __init__(self, front, settings):
        self.front = front
        self.max_queue = settings["max_queue"]
        self.intake = FrontIntake(front, settings["gcodes"],
                                  settings["max_upload"])

    def route_of(self, method, path):
        return UPLOAD_ROUTE, self.post_print_job, ()

    def post_print_job(self, req):
        req.require_control()
        return 200, receive_upload(
            req, self.intake, lambda: self.front.queued, self.max_queue,
            lambda filename, owner, meta: self.front.call(
                "add_upload", filename=filename, owner=owner, meta={
                    k: v for k, v in meta.items()
                    if not isinstance(v, (bytes, bytearray))},
                address=req.client_address[0]))


class FrontUploadHandler(CuraRequestHandler):
    """One upload on a connection, answered with Connection: close (the
    front goes on reading a connection only from the socket itself)."""
    def handle(self):
        self.handle_one_request()

    def send_json(self, status, body, close=False, headers=()):
        CuraRequestHandler.send_json(self, status, body, True, headers)


class NoGate:
    """ServeGate's place in the front process: no reactor to give way to."""
    def enter(self):
        return False

    def breathe(self):
        pass


class FrontServer:
    """The child process's server: a thread per connection answers
    FrontRequests from the published replies, receives uploads, and hands
    a connection over to Klippy's side at its first request of any other
    kind.  To FrontUploadHandler it offers what CuraRequestHandler asks of
    its server.

    One connection budget for the module: MAX_CONNECTIONS counts the
    child's connections and those it handed over until Klippy's side
    has closed them ("released").  A connection waiting for (the rest
    of) a request head is idle: at the limit, the oldest idle one is
    closed to make room, so connections that send nothing never keep
    Cura's polls out."""
    version_string = "%s %s" % (CuraRequestHandler.server_version,
                                CuraRequestHandler.sys_version)
    closing = False
    front = None
    gate = NoGate()
    handed = frozenset()    # (it hands connections over, takes none)

    def __init__(self, listen, ctl, hand):
        self.listen = listen
        self.ctl = ctl
        self.hand = hand
        self.send_lock = threading.Lock()
        self.settings = self.api = None
        self.ready = threading.Event()
        self.replies = {}          # route -> [bytes] (printers: 2 parts)
        self.queued = 0            # jobs in the queue, as last published
        self.calls = {}            # id -> [Event, answer]
        self.call_ids = iter(range(1, 1 << 62))
        self.connections = 0
        self.handed_over = 0       # of them, held by Klippy's side
        self.idle = {}             # idle connections, oldest first
        self.count_lock = threading.Lock()
        self.date_cache = (None, "")
        logging.getLogger().addHandler(FrontLog(self))
        logging.getLogger().setLevel(logging.INFO)

    def send(self, key, payload=b""):
        with self.send_lock:
            send_frame(self.ctl, key, payload)

    # Control: published replies and answers in, acknowledgements out
    def read_control(self):
        try:
            self._read_control()
        except Exception:
            logging.exception("control pair")
        finally:
            os._exit(0)     # Klippy's side closed it (or is gone)

    def _read_control(self):
        staged = {}
        reader = FrameReader(self.ctl)
        for key, payload in reader.frames():
            if key == "settings":
                self._take_settings(json.loads(payload.decode()))
            elif key == "commit":
                # serving begins once the state is the latest one
                # (a front that started late has several waiting)
                self._commit(staged, not reader.pending())
                self.send("ack", payload.split()[1])
            elif key == "answer":
                answer = json.loads(payload.decode())
                waiting = self.calls.get(answer["id"])
                if waiting is not None:
                    waiting[1] = answer
                    waiting[0].set()
                elif "token" in (answer.get("body") or {}):
                    # a reservation that came after its request gave up
                    self.send("unreserve", b"%d" % (answer["body"]["token"],))
            elif key == "released":
                with self.count_lock:
                    self.connections -= 1
                    self.handed_over -= 1
            else:
                staged[key] = payload

    def _take_settings(self, settings):
        settings["trusted"] = parse_trusted_clients(
            ", ".join(settings["trusted"]))
        self.settings = settings
        # (with require_pairing, uploads are handed over: none checked here)
        self.access = AccessPolicy(settings["trusted"],
                                   settings["allow_control"])
        self.request_timeout = settings["request_timeout"]
        self.api = FrontUploads(self, settings)
        d = settings["definition"]
        self.definition = (d["id"], base64.b64decode(d["zip"]), {
            name: base64.b64decode(data) for name, data in d["files"].items()})

    def _commit(self, staged, latest):
        # (every card, and a member's camera address, carries the mark:
        # the address the asking Cura reached this host by)
        replies = {"printers": staged["printers"].split(
            json.dumps(IP_MARK)[1:-1].encode()),
            "system": [staged["system"]], "materials": [staged["materials"]]}
        for name in ("print_jobs", "history"):
            n = int(staged["%s#" % (name,)])
            replies[name] = [staged["%s:%d" % (name, i)] for i in range(n)]
        # uuid -> (name, preview file, the job's reply)
        index = json.loads(staged["jobs"].decode())
        for key in [k for k in staged if k.startswith("job:")
                    and k[4:] not in index]:
            del staged[key]
        replies["jobs"] = {uuid: (name, preview, staged.get("job:" + uuid))
                           for uuid, (name, preview) in index.items()}
        self.queued = int(staged["queued"])
        self.replies = replies      # swapped whole: readers see one state
        if latest:
            self.ready.set()

    def call(self, op, **args):
        """Ask Klippy's side to do op(**args); its reply body, or
        HTTPError with its status and message."""
        call_id = next(self.call_ids)
        waiting = self.calls[call_id] = [threading.Event(), None]
        try:
            self.send("call", json.dumps({"id": call_id, "op": op,
                                          "args": args}).encode())
            if not waiting[0].wait(FRONT_CALL_LIMIT):
                raise HTTPError(503, "Klippy's side did not answer (%s) "
                                "within %.0f s" % (op, FRONT_CALL_LIMIT))
        finally:
            del self.calls[call_id]
        answer = waiting[1]
        if answer["status"] != 200:
            raise HTTPError(answer["status"], answer["message"])
        return answer["body"]

    # What CuraRequestHandler asks of its server
    def track(self, sock, add):
        pass

    def count(self, name):
        pass

    # Connections
    def serve(self):
        self.ready.wait()   # until the first replies (and settings) came
        while True:
            try:
                sock, addr = self.listen.accept()
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                               errno.ENOMEM):
                    time.sleep(0.05)
                continue
            with self.count_lock:
                busy = self.connections >= MAX_CONNECTIONS
                if busy and self.idle:
                    # (under the lock: its thread has not closed it yet)
                    oldest = next(iter(self.idle))
                    del self.idle[oldest]
                    try:
                        oldest.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    busy = False
                if not busy:
                    self.connections += 1
            if busy:
                refuse_connection(sock)
                sock.close()
                continue
            threading.Thread(target=self.connection, args=(sock, addr),
                             daemon=True).start()

    def connection(self, sock, addr):
        handed = False
        try:
            handed = self._serve_connection(sock, addr)
        except OSError:
            pass
        except Exception:
            logging.exception("connection from %s", addr[0])
        finally:
            with self.count_lock:
                self.idle.pop(sock, None)
                if not handed:      # (else: until Klippy's side releases)
                    self.connections -= 1
            if sock.fileno() != -1:
                linger_close(sock)

    def _serve_connection(self, sock, addr):
        # True once the connection is handed over
        settings = self.settings
        timeout = settings["request_timeout"]
        if not self.access.is_trusted(client_ip(addr[0])):
            timeout = min(timeout, 5.)
        sock.settimeout(timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                head = self._peek_head(sock, timeout)
            except OSError:     # timed out or reset: as Klippy's side does
                return False
            if not head:
                return False
            if settings["uploads"] and UPLOAD_LINE.match(
                    head.decode("latin-1")):
                FrontUploadHandler(sock, addr, self)
                return False
            req = FrontRequest.parse(head)
            reply = None
            if req is not None and self.replies and not (
                    settings["require_pairing"]
                    and "authorization" in req.headers):
                reply = self._answer(req, sock)
            if reply is None:
                with self.count_lock:
                    room = self.handed_over < MAX_HANDED_OVER
                    self.handed_over += room
                if not room:
                    refuse_connection(sock)
                    return False
                self._hand_over(sock)
                return True
            sock.recv(len(head), socket.MSG_WAITALL)
            ip = client_ip(addr[0], req.headers.get("x-real-ip"))
            if not self.access.is_trusted(ip):
                err = http_error(untrusted(ip))
                status, ctype, parts = self._error(err.status, err.message)
                self._reply(sock, status, parts, close=True)
                return False
            status, ctype, parts = reply[:3]
            self._reply(sock, status, parts, req.close, ctype, reply[3:4])
            if req.close:
                return False

    def _answer(self, req, sock):
        # (status, content type, [bytes]) from the published replies, or
        # None: Klippy's side answers it
        replies, name = self.replies, req.handler
        if name == "not_found":
            return self._error(404, req.args[0])
        if name in ("get_definition_zip", "get_definition_file"):
            return self._definition(req.args)
        if name in ("get_root", "get_page"):
            if "text/html" in req.headers.get("accept", ""):
                try:
                    page = web_page()
                except OSError as e:
                    return self._error(500, "Web page missing: %s" % (e,))
                return 200, "text/html; charset=utf-8", [page]
            if name == "get_root":
                return None         # the camera, or Klippy's side's 404
            # scripts asking the browser paths get the API's JSON
            name = "get_printers" if req.path.rstrip("/").endswith(
                "/printers") else "get_print_jobs"
        if name == "get_printers":
            ip = json.dumps(reachable_ip(req.headers.get("host"), sock))
            return 200, "application/json", [ip[1:-1].encode().join(
                replies["printers"])]
        if name in ("get_print_job", "get_preview_image"):
            job_uuid = req.args[0]
            job = replies["jobs"].get(job_uuid)
            if job is None:
                return self._error(404, "No print job %s" % (job_uuid,))
            if name == "get_print_job":
                if job[2] is None:
                    return None
                return 200, "application/json", [job[2]]
            data = job[1] and self.api.intake.read_preview(job[1])
            if not data:
                return self._error(404, "Print job %s has no preview image"
                                   % (job[0],))
            return 200, image_type(data), [data]
        key = {"get_print_jobs": "print_jobs", "get_history": "history",
               "get_system": "system", "get_materials": "materials"}[name]
        if replies[key] == [b""]:
            return None
        return 200, "application/json", replies[key]

    @staticmethod
    def _error(status, message):
        return status, "application/json", [error_body(status, message)]

    def _definition(self, args):
        # the machine definition's downloads (decoded once, from the
        # settings made at config load)
        try:
            data, ctype, headers = definition_download(
                *self.definition, *args)
        except NotFound as e:
            err = http_error(e)
            return self._error(err.status, err.message)
        return 200, ctype, [data], headers

    def _peek_head(self, sock, timeout):
        # The head without taking it from the socket: b"" when the client
        # closed before sending anything, or sent nothing new for timeout
        # (then it is closed without a reply, as http.server does).
        # Meanwhile the connection is idle (serve() may close it to make
        # room).
        with self.count_lock:
            self.idle[sock] = None
        # (a peek never sees the client's close: POLLRDHUP does)
        closed = select.poll()
        closed.register(sock, select.POLLRDHUP)
        try:
            data = sock.recv(MAX_HEAD, socket.MSG_PEEK)
            last, seen, pause = time.monotonic(), len(data), 0.001
            while data:
                end = HEAD_END.search(data)
                if end is not None:
                    return data[:end.end()]
                if len(data) >= MAX_HEAD:
                    return data     # too long for the front: handed over
                now = time.monotonic()
                if len(data) > seen:
                    last, seen, pause = now, len(data), 0.001
                elif now - last > timeout:
                    return b""
                elif closed.poll(0):
                    # the client's close ends the head (as http.server
                    # reads it): handed over
                    return data
                time.sleep(pause)
                pause = min(2 * pause, 0.05)
                with self.count_lock:
                    if sock not in self.idle:
                        return b""      # closed to make room
                data = sock.recv(MAX_HEAD, socket.MSG_PEEK)
            return data
        finally:
            with self.count_lock:
                self.idle.pop(sock, None)

    def _hand_over(self, sock):
        # Nothing of the request was taken: Klippy's side reads it whole
        socket.send_fds(self.hand, [b"c"], [sock.fileno()])
        sock.close()

    def _reply(self, sock, status, parts, close,
               ctype="application/json", headers=()):
        # (headers: [] or [[(name, value)...]], as _answer's replies end)
        length = sum(map(len, parts))
        extra = "".join("%s: %s\r\n" % h for hs in headers for h in hs)
        head = (b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
                b"Content-Type: %s\r\nContent-Length: %d\r\n"
                b"Cache-Control: no-store\r\n%s%s\r\n" % (
                    status, http.HTTPStatus(status).phrase.encode(),
                    self.version_string.encode(), http_date(self).encode(),
                    ctype.encode(), length, extra.encode(),
                    b"Connection: close\r\n" if close else b""))
        if length < 65536:
            sock.sendall(b"".join([head] + parts))
        else:
            sock.sendall(head)
            for part in parts:
                sock.sendall(part)
