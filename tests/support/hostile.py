"""Helpers for the hostile-input, fault, load and fuzz tests: raw HTTP over
a socket (loopback only), reply parsing, and checks that nothing was
written where it must not be."""
import json
import os
import re
import socket
import time

from httpc import wait_for  # noqa: F401 (re-exported)


class RawReply:
    def __init__(self, status, headers, body, raw):
        self.status = status
        self.headers = headers      # lower-case names
        self.body = body
        self.raw = raw

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<RawReply %s %r>" % (self.status, self.body[:200])


def connect(port, timeout=10.):
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_reply(s):
    """One final (non-1xx) reply from s, or None if the server closed
    without one."""
    buf = b""
    while True:
        end = buf.find(b"\r\n\r\n")
        while end >= 0 and re.match(rb"HTTP/1\.[01] 1\d\d ", buf):
            buf = buf[end + 4:]          # "100 Continue"
            end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", buf[:end])
            if m and len(buf) >= end + 4 + int(m.group(1)):
                break
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        buf += chunk
    end = buf.find(b"\r\n\r\n")
    if not buf.startswith(b"HTTP/") or end < 0:
        return None
    lines = buf[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = buf[end + 4:]
    if "content-length" in headers:
        body = body[:int(headers["content-length"])]
    return RawReply(status, headers, body, buf)


def read_replies(s, count):
    """Up to count replies from s, in order, until the server closes:
    ([RawReply], how it ended: "eof", "reset", "timeout" or "open")."""
    buf, out = b"", []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            m = re.search(rb"(?im)^content-length:\s*(\d+)", buf[:end])
            size = end + 4 + int(m.group(1)) if m else None
            if size is not None and len(buf) >= size:
                out.append(_raw_reply(buf[:size]))
                buf = buf[size:]
                continue
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return out, "reset"
        except socket.timeout:
            return out, "timeout"
        if not chunk:
            return out, "eof"
        buf += chunk
    return out, "open"


def _raw_reply(buf):
    end = buf.find(b"\r\n\r\n")
    lines = buf[:end].decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return RawReply(int(lines[0].split()[1]), headers, buf[end + 4:], buf)


def send(port, data, timeout=10., shut=False, pause=0.):
    """Send raw bytes, return the reply (None: closed without one)."""
    s = connect(port, timeout)
    try:
        try:
            s.sendall(data)
            if pause:
                time.sleep(pause)
            if shut:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass          # it answered early and closed; read the answer
        return read_reply(s)
    finally:
        s.close()


def request_bytes(method, path, headers=None, body=b"", host="127.0.0.1"):
    head = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % (host,)]
    headers = dict(headers or {})
    if body and "Content-Length" not in headers:
        headers["Content-Length"] = str(len(body))
    head += ["%s: %s" % kv for kv in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def is_json_error(reply, *statuses):
    if reply is None or reply.status not in statuses:
        return False
    headers = {k.lower(): v for k, v in reply.headers.items()}
    if headers.get("content-type") != "application/json":
        return False
    data = reply.json()
    return data.get("status") == reply.status and bool(data.get("message"))


def tree(top, skip=()):
    """Every path under top (relative), files and dirs, minus skip dirs."""
    out = set()
    for root, dirs, files in os.walk(top):
        rel = os.path.relpath(root, top)
        dirs[:] = [d for d in dirs
                   if os.path.normpath(os.path.join(rel, d)) not in skip]
        for name in dirs + files:
            out.add(os.path.normpath(os.path.join(rel, name)))
    return out


SAFE_NAME = re.compile(r"^[^./\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]*\.gcode$")


def check_gcodes_dir(gcodes):
    """Only plain, safe .gcode names (plus the thumbnails, .thumbs);
    no partial uploads."""
    bad = []
    for name in os.listdir(gcodes):
        if name == ".thumbs":
            continue
        path = os.path.join(gcodes, name)
        if not SAFE_NAME.match(name) or not os.path.isfile(path) \
                or os.path.islink(path) or len(name.encode()) > 255:
            bad.append(name)
    return bad


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    """The live processes pid started (Klippy: the module's front
    process)."""
    out = []
    for tid in os.listdir("/proc/%d/task" % (pid,)):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return [c for c in out if alive(c)]


def alive(pid):
    try:
        with open("/proc/%d/stat" % (pid,)) as f:
            return f.read().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def server_pid(k):
    """The process that accepts Cura's connections: the front process,
    or Klippy itself with front_process: False."""
    found = children(k.pid)
    assert len(found) <= 1, found
    return found[0] if found else k.pid


def port_holders(port, pids):
    """For each established connection to port (its server end, from
    /proc/net/tcp*): which of pids holds it (None: none of them)."""
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port \
                        and fields[3] == "01":
                    inodes.append(fields[9])
    owners = {}
    for pid in pids:
        fd_dir = "/proc/%d/fd" % (pid,)
        for fd in os.listdir(fd_dir):
            try:
                link = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if link.startswith("socket:["):
                owners[link[8:-1]] = pid
    return [owners.get(inode) for inode in inodes]


def cura_connections(k, front):
    """Which process holds each of the connections to k's Cura port (see
    port_holders), once Klippy's process holds none of them: a connection
    it answered ends when the client has read the reply and closed its
    end.  (After a while, whoever holds them.)"""
    port, pids = k.cura_port(), [front, k.pid]
    try:
        wait_for(lambda: k.pid not in port_holders(port, pids), 10.)
    except AssertionError:
        pass
    return port_holders(port, pids)


def thread_count(pid):
    return len(os.listdir("/proc/%d/task" % (pid,)))


def socket_count(pid):
    fd_dir = "/proc/%d/fd" % (pid,)
    n = 0
    for fd in os.listdir(fd_dir):
        try:
            n += os.readlink(os.path.join(fd_dir, fd)).startswith("socket:")
        except OSError:
            pass
    return n

def assert_config_errors(klippy_factory, cases):
    """Each (module options, text): Klippy refuses the config, naming it."""
    for opts, text in cases:
        k = klippy_factory(module_options=opts, wait=False)
        info = k.wait_state("error")
        assert text in info["state_message"], info
        k.stop()
