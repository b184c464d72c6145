# Access: who may read and who may change.
#
# Trusted networks and client addresses, browsers' origins, the access
# policy (allow_control, require_pairing), Cura 5's pairing (HTTP Digest
# credentials in auth.json: AuthStore) and the console's answer to it
# (CURA_PAIRING, CURA_ALLOW, CURA_DENY).  AccessPolicy and AuthStore run
# in request threads of either process (AuthStore locks itself); the
# commands in the reactor; auth.json is written by the disk worker.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import collections
import functools
import hashlib
import hmac
import ipaddress
import re
import socket
import time
import uuid

from .errors import Forbidden, Unauthenticated, Untrusted
from .names import clean_text
from .storage import SavedState


# Loopback, private IPv4, link-local, IPv6 ULA and link-local
DEFAULT_TRUSTED_CLIENTS = ("127.0.0.0/8, ::1/128, 10.0.0.0/8, 172.16.0.0/12,"
                           " 192.168.0.0/16, 169.254.0.0/16, fc00::/7,"
                           " fe80::/10")


def parse_trusted_clients(text):
    """"10.0.0.0/8, 192.168.1.5" -> networks; ValueError names a bad one."""
    nets = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("'%s' is not an IP address or network" % (item,))
    return nets


@functools.lru_cache(maxsize=256)
def client_ip(address, real_ip=None):
    # The IP to judge a request by.  Behind install.sh's nginx block the
    # peer is loopback and X-Real-IP names the real client; only a local
    # peer may name another one.
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if real_ip and ip.is_loopback:
        return client_ip(real_ip.strip())
    return ip


def reachable_ip(host, sock):
    # The address Cura reached us on: Host (nginx or iptables keep it)
    # when it is an IP, else this socket's local address.
    host = (host or "").strip()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return ip_text(host) or sock.getsockname()[0]


def is_trusted(ip, networks):
    return ip is not None and any(ip in net for net in networks)


def untrusted(ip):
    """The refusal of a client outside trusted_clients."""
    return Untrusted("%s is not in trusted_clients" % (ip,))


@functools.lru_cache(maxsize=256)
def not_allowed_yet(key_id):
    """The refusal of a paired Cura the user has not allowed yet."""
    return Forbidden("This Cura is not allowed yet: run CURA_ALLOW ID=%s on "
                     "the printer" % (key_id,))


def ip_text(host):
    # "192.168.1.5" -> the same, normalised; a name -> None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


# Names a browser may use for this printer when it changes something.  A
# DNS-rebinding page reaches the printer under its own public name.
LOCAL_NAME_SUFFIXES = (".local", ".lan", ".home", ".internal", ".localdomain",
                       ".home.arpa", ".fritz.box")


def host_name(value):
    # "Host" header or URL netloc -> lower-case host without port/brackets
    value = (value or "").strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def is_local_name(host):
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    host = host.rstrip(".")
    return bool(host) and ("." not in host or host.endswith(
        LOCAL_NAME_SUFFIXES) or host == socket.gethostname().lower())
DIGEST_REALM = "Jedi-API"
DIGEST_PARAM_RE = re.compile(
    r'([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))')


def parse_digest(header):
    """Authorization: Digest k=v, k="v" -> dict (None if not Digest)."""
    if not header or header[:7].lower() != "digest ":
        return None
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None
            else m.group(3) for m in DIGEST_PARAM_RE.finditer(header[7:])}


def sha256_hex(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AccessPolicy:
    """Who may read and who may change, as the section says: trusted
    networks, allow_control, require_pairing (with the paired clients of
    auth, an AuthStore).  Request threads of either process (its settings
    never change; AuthStore takes its own lock)."""
    def __init__(self, trusted_clients, allow_control=True,
                 require_pairing=False, auth=None):
        self.trusted_clients = trusted_clients
        self.allow_control = allow_control
        self.require_pairing = require_pairing
        self.auth = auth

    def is_trusted(self, ip):
        return is_trusted(ip, self.trusted_clients)

    def check_client(self, ip):
        """Before anything is read or done: trusted networks only."""
        if not self.is_trusted(ip):
            raise untrusted(ip)

    def check_control(self, method, uri, authorization, ip,
                      waiting_ok=False):
        """Every handler that changes something asks this first.  With
        waiting_ok, a Cura not allowed yet gets through: its id is
        returned, or its address when it has no credentials yet (a Cura 5
        sends before its first answer came); else None."""
        if not self.allow_control:
            raise Forbidden("This printer is monitor-only "
                            "(allow_control: False)")
        if self.require_pairing:
            if waiting_ok and authorization is None:
                return str(ip)
            key_id, allowed = self.auth.identify(method, uri, authorization)
            if not allowed:
                if waiting_ok:
                    return key_id
                raise not_allowed_yet(key_id)
        return None

    def check_reader(self, method, uri, authorization, refuse=True):
        """Reading is open, but a signed read must carry credentials this
        printer allowed: Cura 5 reacts to a 401 on a read (not on a
        change) by showing its "authorization required" message and
        asking for credentials again (POST /api/v1/auth/request).  A
        waiting Cura's read passes where refuse is False."""
        if not self.require_pairing or parse_digest(authorization) is None:
            return   # unsigned (Cura before 5.11, browsers): open
        key_id, allowed = self.auth.identify(method, uri, authorization,
                                             once=False)
        if not allowed and refuse:
            self.auth.refuse_waiting(key_id)
            raise self.auth.challenge(
                "This Cura waits for CURA_ALLOW ID=%s on the printer"
                % (key_id,))


class AuthStore(SavedState):
    """The credentials Cura >= 5.11 asks for (POST /api/v1/auth/request)
    and which of them the user allowed (CURA_ALLOW), kept in auth.json."""
    MAX_PENDING = 16
    MAX_CLIENTS = 64
    NC_WINDOW = 64       # how far out of order parallel requests may come
    MAX_NONCES = 256     # per client: older nonces are forgotten
    REASK_WINDOW = 30.   # s: a refused Cura asks again within seconds

    # saved client field -> check of its value (key and allowed needed)
    CLIENT_FIELDS = {
        "key": lambda v: isinstance(v, str) and 16 <= len(v) <= 128,
        "allowed": lambda v: isinstance(v, bool),
        "application": lambda v: isinstance(v, str),
        "user": lambda v: isinstance(v, str),
        "address": lambda v: isinstance(v, str),
        "requested_at": lambda v: isinstance(v, str)}
    ID_RE = re.compile(r"^[0-9a-z]{1,64}$")

    def __init__(self, path):
        SavedState.__init__(self, path)
        self.clients = {}    # id -> {"key", "application", "user", ...}
        self.nonces = {}     # id -> OrderedDict nonce -> set of nc seen
        self.refused = {}    # id -> monotonic time of a read refused 401
        self._load()

    def _load(self):
        clients = self.read_file().get("clients", {})
        if not isinstance(clients, dict):
            self.discard("clients", "not an object")
            return
        for key_id, client in clients.items():
            try:
                if not self.ID_RE.match(key_id):
                    raise ValueError("not an id of 1-64 letters and digits")
                if not isinstance(client, dict):
                    raise ValueError("not an object")
                for field in ("key", "allowed"):
                    if field not in client:
                        raise ValueError("no %s" % (field,))
                bad = [f for f, check in self.CLIENT_FIELDS.items()
                       if f in client and not check(client[f])]
                if bad:
                    raise ValueError("bad %s" % (bad[0],))
            except ValueError as e:
                self.discard("client %s" % (clean_text(key_id),), e)
                continue
            self.clients[key_id] = {f: client[f] for f in self.CLIENT_FIELDS
                                    if f in client}

    file_mode = 0o600   # the keys are secrets

    def state(self):
        return {"version": 1, "clients": self.clients}

    def request(self, application, user, address):
        with self.lock:
            while True:
                key_id = uuid.uuid4().hex[:8]
                if key_id not in self.clients:
                    break
            self.clients[key_id] = {
                "key": uuid.uuid4().hex, "application": clean_text(
                    application), "user": clean_text(user),
                "address": address, "allowed": False,
                "requested_at": time.strftime("%Y-%m-%d %H:%M:%S")}
            pending = [k for k, c in self.clients.items()
                       if not c.get("allowed")]
            for k in pending[:-self.MAX_PENDING]:
                del self.clients[k]
            self.changed()
            return key_id, self.clients[key_id]["key"]

    def allow(self, key_id):
        with self.lock:
            client = self.clients.get(key_id)
            if client is None:
                return False
            client["allowed"] = True
            allowed = [k for k, c in self.clients.items() if c.get("allowed")]
            for k in allowed[:-self.MAX_CLIENTS]:
                del self.clients[k]
            self.changed()
            return True

    def remove(self, key_id):
        with self.lock:
            self.nonces.pop(key_id, None)
            self.refused.pop(key_id, None)
            if self.clients.pop(key_id, None) is None:
                return False
            self.changed()
            return True

    def listing(self):
        with self.lock:
            return [dict(c, id=k) for k, c in self.clients.items()]

    def status(self, key_id):
        with self.lock:
            client = self.clients.get(key_id)
        if client is None:
            return "unknown"
        return "authorized" if client["allowed"] else "unauthorized"

    def find_pending(self, application, user, address):
        """(id, key) of a request still waiting for CURA_ALLOW from this
        application, user and address, or None: Cura drops its
        credentials at every 401 and asks again, and must get the same
        back -- also when they were allowed in between (until it signs
        with them again)."""
        application, user = clean_text(application), clean_text(user)
        now = time.monotonic()
        with self.lock:
            for key_id, c in self.clients.items():
                if c.get("address") != address \
                        or c.get("application") != application \
                        or c.get("user") != user:
                    continue
                if not c.get("allowed"):
                    return key_id, c["key"]
                if now - self.refused.get(key_id, -1e9) \
                        < self.REASK_WINDOW:
                    return key_id, c["key"]
        return None

    def refuse_waiting(self, key_id):
        """Note that this waiting client's read was just refused (401)."""
        with self.lock:
            self.refused[key_id] = time.monotonic()

    def verify(self, method, uri, header):
        """Check a Digest signature (cura-protocol.md 2.3): returns the
        client id, or raises Unauthenticated (bad, replayed) / Forbidden."""
        key_id, allowed = self.identify(method, uri, header)
        if not allowed:
            raise not_allowed_yet(key_id)
        return key_id

    def identify(self, method, uri, header, once=True):
        """Check a Digest signature: returns (client id, allowed), or
        raises Forbidden (unsigned) or Unauthenticated with a fresh challenge
        (unknown client, bad signature; replayed when `once`: reads may
        come again, a change only once)."""
        p = parse_digest(header)
        if p is None:
            raise Forbidden("Changes need a Cura paired with this printer "
                            "(Cura 5.11 or newer; CURA_PAIRING lists "
                            "requests)")
        key_id = p.get("username", "")
        with self.lock:
            client = self.clients.get(key_id)
            key = client and client["key"]
        try:
            nc = int(p.get("nc", ""), 16)
        except ValueError:
            nc = -1
        if client is None or p.get("realm") != DIGEST_REALM \
                or p.get("qop") != "auth" or nc < 0 \
                or (p.get("algorithm") or "").upper() != "SHA-256" \
                or p.get("uri") != uri or not p.get("nonce"):
            raise self.challenge("Unknown or malformed credentials")
        ha1 = sha256_hex("%s:%s:%s" % (key_id, DIGEST_REALM, key))
        ha2 = sha256_hex("%s:%s" % (method, uri))
        expected = sha256_hex("%s:%s:%s:%s:auth:%s" % (
            ha1, p["nonce"], p["nc"], p.get("cnonce", ""), ha2))
        if not hmac.compare_digest(expected,
                                   (p.get("response") or "").lower()):
            raise self.challenge("Wrong Digest signature")
        if not once:
            with self.lock:
                allowed = client.get("allowed")
                if allowed:
                    self.refused.pop(key_id, None)   # it has its key
                return key_id, bool(allowed)
        with self.lock:
            # A signature covers method and path, not the body: each
            # (nonce, nc) is accepted once, so a captured request cannot
            # be sent again (with another body).
            seen_by_nonce = self.nonces.setdefault(
                key_id, collections.OrderedDict())
            seen = seen_by_nonce.pop(p["nonce"], None)
            if seen is None:
                seen = set()
            top = max(seen) if seen else nc
            if nc in seen or nc <= top - self.NC_WINDOW:
                seen_by_nonce[p["nonce"]] = seen
                raise self.challenge("Replayed request (nonce count %d)"
                                     % (nc,))
            seen.add(nc)
            top = max(top, nc)
            seen.difference_update([n for n in seen
                                    if n <= top - self.NC_WINDOW])
            seen_by_nonce[p["nonce"]] = seen
            while len(seen_by_nonce) > self.MAX_NONCES:
                seen_by_nonce.popitem(last=False)
            allowed = client.get("allowed")
            if allowed:
                self.refused.pop(key_id, None)
        return key_id, bool(allowed)

    @staticmethod
    def challenge(message):
        # A fresh server nonce: Cura adopts it (and restarts its count)
        nonce = uuid.uuid4().hex
        return Unauthenticated(message, 'Digest realm="%s", nonce="%s", '
                               'qop="auth", algorithm=SHA-256'
                               % (DIGEST_REALM, nonce))


class PairingCommands:
    """CURA_PAIRING, CURA_ALLOW and CURA_DENY: the user's answer to the
    Cura clients that asked for access (auth, an AuthStore), and to the
    material profiles they sent while waiting (materials, a
    MaterialStore).  Reactor (G-code commands): memory only, the disk
    worker saves; bad input raises only gcmd.error."""
    COMMANDS = ("CURA_PAIRING", "CURA_ALLOW", "CURA_DENY")

    def __init__(self, auth, materials, require_pairing):
        self.auth = auth
        self.materials = materials
        self.require_pairing = require_pairing

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
        self.materials.forget_waiting(key_id, address)
        gcmd.respond_info("Cura ID=%s removed" % (key_id,))
