# The HTTP server in Klippy's process.
#
# http.server's threaded server: the connection budget, one request
# parser, the checks before a handler runs (trusted clients, origins,
# lengths), the errors' replies and lingering close.  The front's upload
# handler reuses the request handler.  Request threads.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import email.utils
import http.server
import json
import logging
import re
import socket
import socketserver
import threading
import time
import urllib.parse

from .access import client_ip, host_name, is_local_name, reachable_ip
from .api import MATERIALS_PATH, Payload
from .errors import CuraError, HTTPError, error_body, http_error, storage_error
from .gate import ServeGate
from .gcode_meta import image_type
from .limits import MAX_CONNECTIONS, MAX_JSON_BODY, READ_CHUNK, REQUEST_TIMEOUT
from .names import clean_text


def http_date(server):
    """The Date header's value now, formatted once a second (kept in
    server.date_cache: CuraHTTPServer, FrontServer)."""
    now = int(time.time())
    cached = server.date_cache
    if cached[0] != now:
        cached = server.date_cache = (now, email.utils.formatdate(
            now, usegmt=True))
    return cached[1]


class CuraRequestHandler(http.server.BaseHTTPRequestHandler):
    """One connection's requests, each checked, routed and answered.

    What it asks of its server (CuraHTTPServer here, FrontServer for the
    uploads the front receives): api (route_of()), access (an
    AccessPolicy), gate (ServeGate), closing, front (FrontLink or None),
    handed (connections handed over), request_timeout, date_cache,
    track(sock, add) and count(handler name)."""
    protocol_version = "HTTP/1.1"   # keep-alive, as Qt uses it
    default_request_version = "HTTP/1.0"   # every reply has a status line
    server_version = "cura_connection"

    def setup(self):
        # A client that stops sending frees its thread; one from outside
        # trusted_clients is not waited for long.
        self.timeout = self.server.request_timeout
        if not self.server.access.is_trusted(
                client_ip(self.client_address[0])):
            self.timeout = min(self.timeout, 5.)
        http.server.BaseHTTPRequestHandler.setup(self)
        # Replies go out as header + body writes: without NODELAY, Nagle
        # and delayed ACKs add ~40 ms to every keep-alive request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.body_left = 0
        self.expect_continue = False
        self.gated = False
        self.server.track(self.connection, True)
        # A connection the front handed over carries this one request
        self.handed = self.connection in self.server.handed

    def handle(self):
        if self.handed:
            self.handle_one_request()
        else:
            http.server.BaseHTTPRequestHandler.handle(self)

    def handle_one_request(self):
        # An idle keep-alive connection waits for its next request outside
        # the gate: only a request that has begun to arrive queues for it.
        try:
            if not self.rfile.peek(1):
                self.close_connection = True
                return
        except OSError:     # timed out or reset: as the stdlib does
            self.close_connection = True
            return
        self.gated = self.server.gate.enter()
        try:
            http.server.BaseHTTPRequestHandler.handle_one_request(self)
        finally:
            self.leave_gate()

    def leave_gate(self):
        if self.gated:
            self.gated = False
            self.server.gate.leave()

    def finish(self):
        try:
            http.server.BaseHTTPRequestHandler.finish(self)
        finally:
            self.server.track(self.connection, False)

    def log_message(self, fmt, *args):
        # formatted only when debug logging is on
        logging.debug("cura_connection: %s " + fmt, self.client_address[0],
                      *args)

    def date_time_string(self, timestamp=None):
        if timestamp is not None:
            return http.server.BaseHTTPRequestHandler.date_time_string(
                self, timestamp)
        return http_date(self.server)

    def handle_expect_100(self):
        # Answer "100 Continue" only once the upload has been accepted
        self.expect_continue = True
        return True

    def send_continue(self):
        if self.expect_continue:
            self.expect_continue = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self.wfile.flush()

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_PUT(self):
        self.dispatch("PUT")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def do_HEAD(self):
        self.dispatch("HEAD")

    def do_OPTIONS(self):
        self.dispatch("OPTIONS")

    def do_PATCH(self):
        self.dispatch("PATCH")

    def dispatch(self, method):
        self.body_left = 0
        try:
            if self.server.closing:
                raise HTTPError(503, "Klipper is restarting", close=True)
            self.check_client()
            lengths = self.headers.get_all("Content-Length") or []
            if self.headers.get("Transfer-Encoding"):
                raise HTTPError(411, "Send a Content-Length, not chunks",
                                close=True)
            # 1*DIGIT (RFC 9110), once: int() would take "+15" and "1_5"
            length = lengths[0].strip() if lengths else "0"
            if len(set(lengths)) > 1 or not re.match(r"^[0-9]+\Z", length):
                raise HTTPError(400, "Bad Content-Length %s: send one "
                                "number of plain digits" % (
                                    clean_text(", ".join(lengths)),),
                                close=True)
            # (over 18 digits: more than any limit, and int() stays cheap)
            self.body_left = int(length) if len(length) <= 18 else 10 ** 18
            self.check_origin(method)
            if method in ("GET", "HEAD"):
                self.check_reader()
            path = self.path.split("?", 1)[0]
            route, handler, args = self.server.api.route_of(method, path)
            self.server.count(route.handler)
            if not route.gated:
                self.leave_gate()
            status, body = handler(self, *args)
            self.show_change(method)
            if status is not None:   # None: the handler replied (streams)
                self.send_json(status, body)
        except (CuraError, HTTPError) as e:
            if isinstance(e, CuraError):
                # (a refused action may have found the print ended)
                self.show_change(method)
            err = http_error(e)
            if err.status >= 500:
                logging.info("cura_connection: %s %s: %s", method,
                             self.path, err.message)
            self.send_error_reply(err)
        except ConnectionError:
            self.close_connection = True
        except socket.timeout:
            # the client stopped sending: tell it, if it still listens
            self.send_error_reply(HTTPError(
                408, "No data for %.0f s" % (self.timeout,), close=True))
        except OSError as e:
            # Whatever the cause, the client gets a reply that names it
            logging.info("cura_connection: %s %s: %s", method, self.path, e)
            self.send_error_reply(http_error(storage_error(e), close=True))
        except Exception:
            logging.exception("cura_connection: %s %s", method, self.path)
            self.send_error_reply(HTTPError(
                500, "Internal error; see klippy.log", close=True))

    def show_change(self, method):
        # the polls the front answers show what this request changed
        # from now
        if method != "GET" and self.server.front is not None:
            self.server.front.sync()

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (bad request line, huge headers...)
        self.send_error_reply(HTTPError(
            code, message or explain or "Bad request", close=True))

    def send_error_reply(self, err):
        self.send_json(err.status, Payload(
            error_body(err.status, err.message), "application/json"),
            close=err.close, headers=err.headers)

    def send_json(self, status, body, close=False, headers=()):
        headers = list(headers)
        if isinstance(body, Payload):
            data, ctype = body.data, body.ctype
            headers += body.headers
        elif isinstance(body, bytes):
            data, ctype = body, image_type(body)
        else:
            data = json.dumps(body).encode()
            ctype = "application/json"
        if self.expect_continue:
            # The client still waits for "100 Continue": it never sent the
            # body, and must not send it now.
            self.expect_continue = False
            self.body_left = 0
            close = True
        if self.body_left and not close:
            # Keep the connection in step: skip a small unread body
            if self.body_left > MAX_JSON_BODY:
                close = True
            else:
                self.rfile.read(self.body_left)
                self.body_left = 0
        if close or self.server.closing or self.handed:
            self.close_connection = True
        chunks = data if isinstance(data, list) else [data]
        length = sum(map(len, chunks))
        if len(chunks) > 1 and length < 65536:
            chunks = [b"".join(chunks)]    # one write for a short reply
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(length))
            self.send_header("Cache-Control", "no-store")
            for name, value in headers:
                self.send_header(name, value)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.leave_gate()    # never hold the gate on a slow reader
            self.end_headers()
            if self.command != "HEAD":
                for chunk in chunks:
                    self.wfile.write(chunk)
            self.wfile.flush()
        except (ConnectionError, socket.timeout):
            self.close_connection = True
            return
        if self.close_connection and self.body_left:
            self.linger()

    def linger(self):
        # The client may still be sending a body we refused: read a bounded
        # amount of it so it can see our reply instead of a reset.
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(2.)
            left = min(self.body_left, 64 * 1024 * 1024)
            deadline = time.monotonic() + 5.
            while left > 0 and time.monotonic() < deadline:
                data = self.connection.recv(min(left, READ_CHUNK))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    # helpers for CuraApi handlers
    def reachable_ip(self):
        return reachable_ip(self.headers.get("Host"), self.connection)

    def client_ip(self):
        return client_ip(self.client_address[0],
                         self.headers.get("X-Real-IP"))

    def check_client(self):
        # Before anything is read or done: trusted networks only
        self.server.access.check_client(self.client_ip())

    def check_origin(self, method):
        # No web page from elsewhere may make a browser change anything
        # here (browsers name the page in Origin or Referer; Cura sends
        # neither).
        if method in ("GET", "HEAD", "OPTIONS"):
            return
        origin = self.headers.get("Origin") or self.headers.get("Referer")
        if origin is None:
            return
        host = host_name(self.headers.get("Host"))
        try:
            page = urllib.parse.urlsplit(origin.strip()).hostname
        except ValueError:
            page = None
        if page != host:
            raise HTTPError(403, "Refused a request from a web page on "
                            "another site (%s)" % (clean_text(origin),))
        if not is_local_name(host):
            # DNS rebinding: a public name that points at this printer
            raise HTTPError(403, "Browsers must reach this printer by IP "
                            "address or a local name, not %s"
                            % (clean_text(host),))

    def require_control(self, waiting_ok=False):
        # Every handler that changes something calls this first
        # (AccessPolicy.check_control)
        return self.server.access.check_control(
            self.command, self.path, self.headers.get("Authorization"),
            self.client_ip(), waiting_ok)

    def check_reader(self):
        # Cura reads the material list only when it connects, to send
        # what is missing: a waiting Cura's profiles are kept
        self.server.access.check_reader(
            self.command, self.path, self.headers.get("Authorization"),
            refuse=self.path.rstrip("/") != MATERIALS_PATH)

    def content_length(self, required=False):
        if required and self.headers.get("Content-Length") is None:
            raise HTTPError(411, "Content-Length required", close=True)
        return self.body_left

    def readinto_body(self, buf):
        # counts what is left, so an error reply knows what to skip
        n = self.rfile.readinto(buf[:self.body_left])
        self.body_left -= n
        return n

    def read_body(self, limit):
        if self.body_left > limit:
            raise HTTPError(413, "Request body over %d bytes" % (limit,),
                            close=True)
        self.send_continue()
        data = self.rfile.read(self.body_left)
        if len(data) < self.body_left:
            raise HTTPError(400, "Request body ended early", close=True)
        self.body_left = 0
        return data

    def read_json(self, optional=False):
        data = self.read_body(MAX_JSON_BODY)
        if not data.strip() and optional:
            return {}
        try:
            return json.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise HTTPError(400, "Body is not JSON: %s" % (e,))

    def multipart_boundary(self):
        from python_multipart.multipart import parse_options_header
        ctype, params = parse_options_header(
            self.headers.get("Content-Type", ""))
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary \
                or len(boundary) > 200:
            raise HTTPError(400, "Expected multipart/form-data with a "
                            "boundary", close=True)
        return boundary


# A closed connection's last words: what the client still sends after
# the reply is read for this long, up to this many bytes, so that the
# reply is not destroyed by a reset (unread data at close() sends RST)
LINGER_TIME = 1.
LINGER_BYTES = 1 << 16


def linger_close(sock):
    """Close sock after its last reply: FIN first, then read what the
    client still sends (briefly, a bounded amount) until it closes."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_TIME)
        deadline = time.monotonic() + LINGER_TIME
        left = LINGER_BYTES
        while left > 0 and time.monotonic() < deadline:
            data = sock.recv(min(left, READ_CHUNK))
            if not data:
                break
            left -= len(data)
    except OSError:
        pass
    sock.close()


def refuse_connection(sock):
    # One connection too many: a complete reply, then the caller closes
    body = error_body(503, "Too many connections")
    try:
        sock.settimeout(1.)
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass


class CuraHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False   # a stuck handler must not hold up a restart
    allow_reuse_address = True
    request_queue_size = 64
    request_timeout = REQUEST_TIMEOUT

    def __init__(self, address, api, access):
        self.api = api
        self.access = access       # AccessPolicy
        self.closing = False
        self.gate = ServeGate()
        self.date_cache = (None, "")
        self.front = None          # FrontLink, when the child listens
        self.connections = set()
        self.handed = set()        # of connections: from the front
        self.answered = {}         # handler name -> requests routed here
        self.conn_lock = threading.Lock()
        http.server.HTTPServer.__init__(self, address, CuraRequestHandler)

    def server_bind(self):
        # HTTPServer.server_bind resolves the host name (slow with a bad
        # DNS setup); nothing here needs it.
        socketserver.TCPServer.server_bind(self)

    def handle_error(self, request, client_address):
        logging.exception("cura_connection: request from %s",
                          client_address[0])

    def count(self, name):
        with self.conn_lock:
            self.answered[name] = self.answered.get(name, 0) + 1

    def process_request(self, request, client_address, handed=False):
        # Count the connection before its thread starts, so a flood is
        # refused here rather than growing threads without bound.  (The
        # front counts those it hands over in its own budget, until they
        # are released.)
        with self.conn_lock:
            busy = not handed and len(self.connections) >= MAX_CONNECTIONS
            if not busy:
                self.connections.add(request)
                if handed:
                    self.handed.add(request)
        if busy:
            # (closed at once: the accepting thread must not linger)
            refuse_connection(request)
            request.close()
            return
        socketserver.ThreadingMixIn.process_request(self, request,
                                                    client_address)

    def shutdown_request(self, request):
        # every accepted connection ends here, whatever happened to it
        self.track(request, False)
        with self.conn_lock:
            handed = request in self.handed
            self.handed.discard(request)
        linger_close(request)
        front = self.front
        if handed and front is not None:
            front.released()

    def track(self, sock, add):
        with self.conn_lock:
            if add:
                self.connections.add(sock)
            else:
                self.connections.discard(sock)

    def serve(self):
        """Thread: accept connections here (without a front process)."""
        self.serving = True
        self.serve_forever(poll_interval=0.2)

    def listen_again(self):
        """After the front process ended: a new listening socket on the
        address bound first (OSError if it is taken meanwhile)."""
        self.socket = socket.socket(self.address_family, self.socket_type)
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.socket.close()
            raise

    serving = False

    def close(self):
        self.closing = True
        if self.front is not None:
            self.front.close()
        if self.serving:
            self.shutdown()
        self.server_close()
        # Keep-alive connections from before a restart must not go on
        # talking to this instance.
        with self.conn_lock:
            conns = list(self.connections)
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class CuraHTTPServer6(CuraHTTPServer):
    address_family = socket.AF_INET6
