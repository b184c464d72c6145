"""Fuzzing with hypothesis: the multipart intake on its own, and whole HTTP
requests against the real Klippy.  Each test runs batches of examples for
CURA_FUZZ_SECONDS (default 10 s each, so CI stays under 30 s); set it
higher for a long run, e.g. CURA_FUZZ_SECONDS=1800 ./tests/run.sh
tests/test_fuzz.py.  A failure prints the smallest input hypothesis found.
"""
import gzip
import io
import os
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gcode_samples
from hostile import check_gcodes_dir, send, tree

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "klippy_extras"))
import cura_connection as cc  # noqa: E402

SECONDS = float(os.environ.get("CURA_FUZZ_SECONDS", "10"))
GCODE = b";TIME:60\nG1 X1\nG1 X2\n"
# no example database in the repository; a failing seed is printed
BATCH = settings(max_examples=40, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


def run_for(seconds, batch):
    """Call a @given test (one batch of examples) until time is up."""
    deadline = time.monotonic() + seconds
    batches = 0
    while time.monotonic() < deadline or not batches:
        batch()
        batches += 1
    return batches


# Strategies: multipart bodies, mostly well-formed, then damaged
names = st.one_of(
    st.sampled_from(["part.gcode", "a.gcode.gz", "b.ufp", "c.stl", "",
                     "../../x.gcode", "/etc/x.gcode", "a\\b.gcode",
                     ".gcode", "x" * 300 + ".gcode"]),
    st.text(max_size=40).map(lambda t: t + ".gcode"),
    st.text(max_size=20))
header_text = st.text(alphabet=st.characters(min_codepoint=1,
                                             max_codepoint=0x2ff),
                      max_size=30)
# "; thumbnail begin" blocks of every form slicers write, then damaged
thumb_kinds = st.sampled_from(["", "_PNG", "_JPG", "_QOI", "_BMP"])
thumb_images = st.one_of(
    st.builds(gcode_samples.png, st.integers(1, 40), st.integers(1, 40)),
    st.builds(gcode_samples.qoi, st.integers(1, 40), st.integers(1, 40)),
    st.sampled_from([gcode_samples.jpeg(8, 8), gcode_samples.jpeg(30, 20)]),
    st.binary(max_size=200))
thumb_block = st.builds(
    lambda image, w, h, kind, sep: gcode_samples.embedded_thumbnail(
        image, w, h, kind, sep).encode(),
    thumb_images, st.integers(0, 3000), st.integers(0, 3000), thumb_kinds,
    st.sampled_from(["x", " ", "X", "  ", "x-"]))
thumb_gcode = st.builds(
    lambda blocks, ops: apply_damage(b";TIME:60\n" + b"".join(blocks), ops)
    + GCODE, st.lists(thumb_block, max_size=4),
    st.lists(st.tuples(st.sampled_from(["insert", "delete", "flip", "cut"]),
                       st.floats(0, 1), st.binary(min_size=1, max_size=8)),
             max_size=2))
file_data = st.one_of(st.just(GCODE), st.binary(max_size=3000), thumb_gcode,
                      st.just(gzip.compress(GCODE * 50)),
                      st.binary(max_size=200).map(
                          lambda b: gzip.compress(GCODE + b)[:-5]))
parts = st.lists(st.fixed_dictionaries({
    "name": st.sampled_from(["file", "owner", "x", "", 'a"b']),
    "filename": st.none() | names,
    "quote": st.booleans(),
    "extra": st.lists(st.tuples(header_text, header_text), max_size=2),
    "data": file_data,
}), min_size=0, max_size=4)
boundaries = st.one_of(st.just("boundary_.oOo._MjE+Mzk/NDU="),
                       st.text(alphabet="abcXYZ019'()+_,-./:=? ",
                               min_size=1, max_size=70))
damage = st.lists(st.tuples(st.sampled_from(["insert", "delete", "flip",
                                             "cut"]),
                            st.floats(0, 1), st.binary(min_size=1,
                                                       max_size=8)),
                  max_size=3)


def build(parts, boundary, closing):
    b = boundary.encode()
    out = []
    for p in parts:
        disp = "form-data; name=%s" % (
            '"%s"' % p["name"] if p["quote"] else p["name"])
        if p["filename"] is not None:
            disp += '; filename="%s"' % (p["filename"],)
        head = "Content-Disposition: %s\r\n" % (disp,)
        head += "".join("%s: %s\r\n" % kv for kv in p["extra"])
        out.append(b"--" + b + b"\r\n"
                   + head.encode("utf-8", "surrogatepass") + b"\r\n"
                   + p["data"] + b"\r\n")
    if closing:
        out.append(b"--" + b + b"--\r\n")
    return b"".join(out)


def apply_damage(body, ops):
    body = bytearray(body)
    for op, where, data in ops:
        i = int(where * len(body))
        if op == "insert":
            body[i:i] = data
        elif op == "delete":
            del body[i:i + len(data)]
        elif op == "flip" and i < len(body):
            body[i] ^= data[0] or 1
        elif op == "cut":
            del body[i:]
    return bytes(body)


def test_fuzz_multipart_intake(tmp_path):
    gcodes = tmp_path / "gcodes"
    gcodes.mkdir()
    intake = cc.FileIntake(str(gcodes), 4 << 20)
    outside = tree(str(tmp_path))
    stored = []

    @BATCH
    @given(parts=parts, boundary=boundaries, closing=st.booleans(),
           ops=damage)
    def one(parts, boundary, closing, ops):
        body = apply_damage(build(parts, boundary, closing), ops)
        before = set(os.listdir(str(gcodes)))
        upload = intake.begin(len(body))
        try:
            name, meta = intake.receive(upload, io.BytesIO(body).readinto,
                                        boundary.encode("latin-1"))
        except (cc.BadInput, cc.Unsupported) as e:
            assert e.message
            assert set(os.listdir(str(gcodes))) == before
            return
        finally:
            intake.end(upload)
        assert not intake.in_flight
        assert name in os.listdir(str(gcodes))
        assert set(os.listdir(str(gcodes))) - before <= {name, ".thumbs"}
        if meta["preview"]:
            # only what Cura's QImage decodes: PNG or JPEG
            with open(os.path.join(str(gcodes), meta["preview"]), "rb") as f:
                assert cc.is_preview_image(f.read())
        stored.append(name)
        assert check_gcodes_dir(str(gcodes)) == []

    batches = run_for(SECONDS, one)
    new = tree(str(tmp_path)) - outside
    assert all(p.startswith("gcodes" + os.sep) for p in new), new
    assert check_gcodes_dir(str(gcodes)) == []
    print("\nmultipart intake: %d batches of examples, %d files stored"
          % (batches, len(stored)))


def test_fuzz_small_multipart(tmp_path):
    @BATCH
    @given(parts=parts, boundary=boundaries, closing=st.booleans(),
           ops=damage)
    def one(parts, boundary, closing, ops):
        body = apply_damage(build(parts, boundary, closing), ops)
        try:
            got = cc.parse_small_multipart(body, boundary.encode("latin-1"))
        except cc.BadInput as e:
            assert e.message
            return
        assert isinstance(got, list)
    run_for(min(SECONDS, 3.), one)


def test_fuzz_thumbnail_blocks():
    @BATCH
    @given(blocks=st.lists(thumb_block, max_size=5), text=thumb_gcode,
           comments_only=st.booleans())
    def one(blocks, text, comments_only):
        head = b"".join(blocks) + text
        if comments_only:
            head = cc.gcode_comment_lines(head)
        thumb = cc.parse_gcode_metadata(head, b"")["thumbnail"]
        assert thumb is None or cc.is_preview_image(thumb)
        # a block that gives a preview on its own still does among others
        if any(cc.best_thumbnail(b) for b in blocks):
            assert thumb is not None
    run_for(min(SECONDS, 3.), one)


# Whole requests against the real Klippy

ROUTES = ["/api/v1/system", "/api/v1/auth/request", "/api/v1/auth/check/x",
          "/api/v1/auth/verify", "/cluster-api/v1/printers",
          "/cluster-api/v1/print_jobs", "/cluster-api/v1/print_jobs/",
          "/cluster-api/v1/print_jobs/%s",
          "/cluster-api/v1/print_jobs/%s/action",
          "/cluster-api/v1/print_jobs/%s/action/move",
          "/cluster-api/v1/print_jobs/%s/preview_image",
          "/cluster-api/v1/materials", "/cluster-api/v1/materials/", "/",
          "/?action=snapshot", "/print_jobs", "/printers"]
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS",
                           "PATCH", "BREW", "get", "POST "])
paths = st.builds(
    lambda route, uid, tail: (route % (uid,) if "%s" in route else route)
    + tail,
    st.sampled_from(ROUTES),
    st.sampled_from(["0" * 8, "ffffffff-ffff-ffff-ffff-ffffffffffff", "..",
                     "%00", "x" * 70]),
    st.sampled_from(["", "/", "?a=b", "/..", "%2f..", "//", "#x",
                     "\x01", " x"]))
json_bodies = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(["action", "to_position", "list",
                                       "force", "application", "user"]),
                      inner, max_size=3), max_leaves=8).map(
    lambda v: __import__("json").dumps(v).encode())
header_names = st.sampled_from([
    "Content-Type", "Content-Length", "Transfer-Encoding", "Expect",
    "Origin", "Referer", "Host", "X-Real-IP", "Authorization", "Connection",
    "X-Other"])
header_values = st.one_of(
    st.sampled_from(["application/json", "multipart/form-data",
                     'multipart/form-data; boundary="b"',
                     "multipart/form-data; boundary=b", "100-continue",
                     "chunked", "close", "0", "-1", "99999999999", "1e3",
                     "+15", "1_5", " 15 ",
                     "http://evil.example", "null", "127.0.0.1",
                     "8.8.8.8", 'Digest username="x", nc=zz', ""]),
    header_text)


# Content-Length forms Python's int() takes but RFC 9110 does not
BAD_LENGTHS = {"plus": "Content-Length: +%(n)d",
               "underscore": "Content-Length: %(n)d_0",
               "hex": "Content-Length: 0x%(n)x",
               "inner space": "Content-Length: 1 %(n)d",
               "two values": "Content-Length: %(n)d\r\nContent-Length: 1%(n)d",
               "list": "Content-Length: %(n)d, %(n)d",
               "empty": "Content-Length: "}


@pytest.mark.slow
@pytest.mark.one_flavor   # long-running: the first flavor is enough
def test_fuzz_http_requests(klippy_factory, flavor):
    k = klippy_factory(module_options={"request_timeout": 1,
                                       "max_upload_size": 2})
    port = k.cura_port()
    outside = tree(k.workdir, skip=("gcodes",))
    seen = {}

    @BATCH
    @given(method=methods, path=paths, body_kind=st.sampled_from(
        ["none", "json", "multipart", "raw"]), json_body=json_bodies,
        parts=parts, closing=st.booleans(), ops=damage,
        headers=st.lists(st.tuples(header_names, header_values),
                         max_size=4),
        length=st.sampled_from(["right", "none", "short", "long"]
                               + list(BAD_LENGTHS)))
    def one(method, path, body_kind, json_body, parts, closing, ops,
            headers, length):
        body = {"none": b"", "json": json_body,
                "multipart": build(parts, "b", closing),
                "raw": apply_damage(json_body, ops)}[body_kind]
        if body_kind == "multipart":
            body = apply_damage(body, ops)
            headers = [("Content-Type", 'multipart/form-data; boundary="b"')
                       ] + headers
        n = {"right": len(body), "none": None, "short": len(body) // 2,
             "long": len(body) + 10}.get(length)
        head = ["%s %s HTTP/1.1" % (method, path), "Host: 127.0.0.1"]
        if n is not None:
            head.append("Content-Length: %d" % (n,))
        if length in BAD_LENGTHS:
            head.append(BAD_LENGTHS[length] % {"n": len(body)})
        head += ["%s: %s" % (k_, v) for k_, v in headers
                 if "\r" not in v and "\n" not in v]
        data = ("\r\n".join(head) + "\r\n\r\n").encode(
            "utf-8", "surrogatepass") + body
        r = send(port, data, timeout=10, shut=True)
        if r is None:
            return      # the server closed an incomplete request: fine
        seen[r.status] = seen.get(r.status, 0) + 1
        assert r.status < 500 or r.status in (501, 505), r
        if length in BAD_LENGTHS:
            # refused, whatever else is wrong (or a check that comes first)
            assert r.status in (400, 403, 411, 501, 505), r
        if r.status >= 400 and method.strip() != "HEAD":
            ctype = r.headers.get("content-type")
            assert ctype == "application/json", r
            assert r.json()["message"], r

    batches = run_for(SECONDS, one)
    assert k.info()["state"] == "ready"
    assert check_gcodes_dir(k.gcodes_dir) == []
    assert tree(k.workdir, skip=("gcodes",)) == outside
    log = k.log_text()
    assert "Traceback" not in log and "Internal error" not in log
    print("\nHTTP: %d batches; replies by status: %s" % (
        batches, dict(sorted(seen.items()))))
