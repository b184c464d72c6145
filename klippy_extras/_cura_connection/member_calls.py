# Calls from a group member's own console or macros to the host.
#
# The host keeps a websocket to each member's Moonraker, identifies as an
# "agent" (the only client type Moonraker lets register methods) and
# registers remote methods; a macro on the member (MEMBER_MACROS) calls
# one with action_call_remote_method() and Moonraker forwards the call
# here as a JSON-RPC notification.  One thread per member, never the
# reactor: it connects, registers, reads, and after any loss (Moonraker
# restarted, network down) connects and registers again with a backoff.
# A Klippy restart on the member needs nothing: Moonraker registers the
# methods of its connected agents with the new Klippy itself.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import json
import logging
import threading
import time
import urllib.parse

import websocket

from .members import shut_down

CLIENT_NAME = "cura_connection"
CLIENT_VERSION = "1"
# identify requires a url; there is no project page to name
CLIENT_URL = ""
# Backoff between attempts: 1 s doubling up to 10 s, back to 1 s after a
# registered session
BACKOFF_FIRST = 1.
BACKOFF_MAX = 10.
# TCP connect and handshake; also the wait for each reply to identify and
# register
CONNECT_TIMEOUT = 3.
REPLY_TIMEOUT = 10.
# A read that sees nothing this long sends a ping; a connection with no
# frame at all (pong, notification, Moonraker's own pings) for LIVE_LIMIT
# is dead (a member switched off leaves no FIN behind)
PING_EVERY = 10.
LIVE_LIMIT = 35.

# What users put in the member's printer.cfg.  SET_CURA_MATERIAL passes
# only the words given, as the host's own SET_CURA_MATERIAL reads them
# (no EXTRUDER: the member's active extruder).
MEMBER_MACROS = """\
[gcode_macro CURA_BUILD_PLATE_CLEARED]
description: Tell the Cura group host that this printer's build plate is clear
gcode:
  {action_call_remote_method("cura_plate_cleared")}

[gcode_macro SET_CURA_MATERIAL]
description: Tell the Cura group host which material is loaded here
gcode:
  {% set words = {} %}
  {% for key in ["EXTRUDER", "MATERIAL", "BRAND", "COLOR", "GUID"] %}
    {% if key in params %}
      {% set _ = words.update({key|lower: params[key]}) %}
    {% endif %}
  {% endfor %}
  {action_call_remote_method("cura_set_material", **words)}

[gcode_macro _CURA_GROUP_REPLY]
description: Shows what the Cura group host answered
gcode:
  {action_respond_info(params.MSG|default(""))}
"""
# The macro the host answers a call with (REPLY_MACRO MSG="...")
REPLY_MACRO = "_CURA_GROUP_REPLY"


class MemberCallError(Exception):
    pass


def websocket_url(url):
    """The member's Moonraker websocket from its HTTP base URL."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError("not an http:// or https:// URL: %r" % (url,))
    return urllib.parse.urlunsplit(
        (scheme, parts.netloc, parts.path.rstrip("/") + "/websocket", "", ""))


class MemberCalls:
    """Remote methods a member's macros call.  methods maps a method
    name to fn(params: dict), called in this class's thread."""
    def __init__(self, name, url, api_key, methods):
        self.name = name
        self.ws_url = websocket_url(url)
        self.api_key = api_key or None
        self.methods = dict(methods)
        # True while identified and every method is registered
        self.connected = False
        # why the last attempt or session ended (None: never failed)
        self.last_error = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ws = None
        self._next_id = 0
        self._thread = None

    def start(self):
        self._thread = threading.Thread(
            target=self._run, name="cura_connection calls %s" % (self.name,),
            daemon=True)
        self._thread.start()

    def stop(self):
        """Ask the thread to end, without waiting: stop() every member
        first, then close() each, and they end together."""
        self._stop.set()
        self._wake()

    def close(self, timeout=CONNECT_TIMEOUT + 2.):
        """End the thread and its socket (any thread but this one's):
        at once, or within CONNECT_TIMEOUT when the thread waits in a TCP
        connect (a member that is off)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _wake(self):
        # Unblocks a handshake or read in the thread; a TCP connect in
        # progress ends by its own timeout
        with self._lock:
            ws = self._ws
        shut_down(ws.sock if ws is not None else None)

    # The thread
    def _run(self):
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            registered = False
            try:
                registered = self._session()
            except (OSError, websocket.WebSocketException, ValueError,
                    MemberCallError) as e:
                self._failed(e)
            except Exception as e:
                logging.exception("cura_connection: member %s: calls "
                                  "connection", self.name)
                self._failed(e, logged=True)
            finally:
                self.connected = False
                with self._lock:
                    ws, self._ws = self._ws, None
                if ws is not None:
                    ws.shutdown()
            if registered:
                delay = BACKOFF_FIRST
            if self._stop.wait(delay):
                break
            if not registered:
                delay = min(delay * 2., BACKOFF_MAX)

    def _failed(self, error, logged=False):
        reason = str(error) or error.__class__.__name__
        if self._stop.is_set():
            return
        # A member that stays away is logged once, not every attempt
        if reason != self.last_error and not logged:
            logging.info("cura_connection: member %s: no calls from its "
                         "macros (%s): %s", self.name, self.ws_url, reason)
        self.last_error = reason

    def _session(self):
        """One connection: True once it was registered."""
        ws = websocket.WebSocket(enable_multithread=True,
                                 skip_utf8_validation=True)
        with self._lock:
            if self._stop.is_set():
                return False
            self._ws = ws
        header = []
        if self.api_key:
            header.append("X-Api-Key: %s" % (self.api_key,))
        ws.connect(self.ws_url, header=header, timeout=CONNECT_TIMEOUT,
                   suppress_origin=True, http_no_proxy=["*"])
        if self._stop.is_set():
            return False
        ident = {"client_name": CLIENT_NAME, "version": CLIENT_VERSION,
                 "type": "agent", "url": CLIENT_URL}
        if self.api_key:
            # Moonraker authenticates a websocket at identify
            ident["api_key"] = self.api_key
        ws.settimeout(REPLY_TIMEOUT)
        self._request(ws, "server.connection.identify", ident)
        for method in self.methods:
            self._request(ws, "connection.register_remote_method",
                          {"method_name": method})
        self.connected = True
        if self.last_error is not None:
            logging.info("cura_connection: member %s: calls from its macros "
                         "connected again", self.name)
        self.last_error = None
        self._read(ws)
        return True

    def _request(self, ws, method, params):
        self._next_id += 1
        req_id = self._next_id
        ws.send(json.dumps({"jsonrpc": "2.0", "method": method,
                            "params": params, "id": req_id}))
        # Moonraker's notifications to every client keep coming meanwhile
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            if time.monotonic() > deadline:
                raise MemberCallError("no reply to %s" % (method,))
            msg = self._receive(ws)
            if msg is None:
                continue
            if msg.get("id") != req_id:
                self._dispatch(msg)
                continue
            if "error" in msg:
                err = msg["error"]
                raise MemberCallError("%s refused: %s" % (
                    method, err.get("message", err)
                    if isinstance(err, dict) else err))
            return msg.get("result")

    def _receive(self, ws):
        """The next JSON message, or None for a control frame."""
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise MemberCallError("Moonraker closed the connection")
        if opcode not in (websocket.ABNF.OPCODE_TEXT,
                          websocket.ABNF.OPCODE_BINARY):
            return None
        msg = json.loads(frame.data)
        return msg if isinstance(msg, dict) else None

    def _read(self, ws):
        ws.settimeout(PING_EVERY)
        quiet = 0.
        while not self._stop.is_set():
            try:
                msg = self._receive(ws)
            except websocket.WebSocketTimeoutException:
                quiet += PING_EVERY
                if quiet >= LIVE_LIMIT:
                    raise MemberCallError("no answer from Moonraker for "
                                          "%.0f s" % (quiet,))
                ws.ping()
                continue
            quiet = 0.
            if msg is not None:
                self._dispatch(msg)

    def _dispatch(self, msg):
        method = msg.get("method")
        fn = self.methods.get(method)
        if fn is None or "id" in msg:
            return      # Moonraker's notify_* to every client
        params = msg.get("params")
        if not isinstance(params, dict):
            params = {}
        try:
            fn(dict(params))
        except Exception:
            logging.exception("cura_connection: member %s: %s from its "
                              "macro failed", self.name, method)
