"""A small HTTP client for the tests (loopback only), on http.client so a
test controls keep-alive connections and sees every status and header."""
import http.client
import json
import time
import urllib.parse

JOBS = "/cluster-api/v1/print_jobs"
HISTORY = JOBS + "/history"


class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def __repr__(self):
        return "<Reply %d %r>" % (self.status, self.body[:200])


def connect(base_url, timeout=20.):
    u = urllib.parse.urlsplit(base_url)
    assert u.hostname in ("127.0.0.1", "localhost", "::1"), base_url
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(base_url_or_conn, method, path, body=None, headers=None,
            json_body=None):
    conn = base_url_or_conn
    own = isinstance(conn, str)
    if own:
        conn = connect(conn)
    headers = dict(headers or {})
    if json_body is not None:
        body = json.dumps(json_body).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return Reply(r.status, dict(r.getheaders()), r.read())
    finally:
        if own:
            conn.close()


def get_json(base_url, path):
    r = request(base_url, "GET", path)
    assert r.status == 200, r
    assert r.headers["Content-Type"] == "application/json"
    return r.json()


def multipart(fields, files, boundary="boundary_.oOo._MjE+Mzk/NDU=",
              after=None):
    """Body in Qt's layout (cura-protocol.md 4.2): quoted boundary with
    + and /, an unquoted name=owner, no Content-Type on the file part.
    after: text fields after the files (where Cura puts
    require_printer_name); values str, or bytes sent as they are."""
    out = []

    def text_parts(fields):
        for name, value in (fields or {}).items():
            out.append(b"--%s\r\nContent-Disposition: form-data; name=%s\r\n"
                       b"Content-Type: text/plain\r\n\r\n%s\r\n" % (
                           boundary.encode(), name.encode(),
                           value if isinstance(value, bytes)
                           else value.encode()))
    text_parts(fields)
    for name, (filename, data) in files.items():
        out.append(b'--%s\r\nContent-Disposition: form-data; name="%s"; '
                   b'filename="%s"\r\n\r\n' % (
                       boundary.encode(), name.encode(), filename.encode()))
        out.append(data + b"\r\n")
    text_parts(after)
    out.append(b"--%s--\r\n" % (boundary.encode(),))
    body = b"".join(out)
    return body, {"Content-Type": 'multipart/form-data; boundary="%s"'
                  % (boundary,), "Content-Length": str(len(body))}


def upload(base, filename, data, owner="alice"):
    """POST a print file the way Cura does; returns the Reply."""
    body, headers = multipart({"owner": owner}, {"file": (filename, data)})
    return request(base, "POST", JOBS + "/", body=body, headers=headers)


def jobs(base):
    """Cura's list: the job on the printer and the queue."""
    return get_json(base, JOBS)


def all_jobs(base):
    """Cura's list, then the history.  Read in this order, a job moving to
    the history in between is in both (kept once), never in neither."""
    listed = get_json(base, JOBS)
    history = get_json(base, HISTORY)
    moved = {j["uuid"] for j in history}
    return [j for j in listed if j["uuid"] not in moved] + history


def printer(base):
    printers = get_json(base, "/cluster-api/v1/printers")
    assert len(printers) == 1, printers
    return printers[0]


def materials(base):
    """The printer's loaded materials, one per extruder."""
    return [c["material"] for c in printer(base)["configuration"]]


def wait_for(fn, timeout=15., what="condition", interval=0.1):
    """Poll fn until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % (what,))
        time.sleep(interval)
