"""Fuzzing with hypothesis: the multipart intake on its own, and whole HTTP
requests against the real Klippy.  Each test runs batches of examples for
CURA_FUZZ_SECONDS (default 10 s each, so CI stays under 30 s); set it
higher for a long run, e.g. CURA_FUZZ_SECONDS=1800 ./tests/run.sh
tests/serving/test_fuzz.py.  A failure prints the smallest input
hypothesis found.
"""
import gzip
import io
import json
import os
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gcode_samples
import httpc
import klippy_harness
import real_inputs
from hostile import check_gcodes_dir, send, tree

from _cura_connection.access import AuthStore  # noqa: E402
from _cura_connection.errors import (  # noqa: E402
    BadInput, Conflict, Unsupported)
from _cura_connection.gcode_meta import (  # noqa: E402
    best_thumbnail, gcode_comment_lines, is_preview_image,
    parse_gcode_metadata)
from _cura_connection.intake import (  # noqa: E402
    FileIntake, parse_small_multipart)
from _cura_connection.jobs import JobStore, SAVED_JOB_FIELDS  # noqa: E402
from _cura_connection.materials import LoadedMaterials  # noqa: E402
from _cura_connection.names import (  # noqa: E402
    JOINERS, MAX_JOB_NAME, job_name, preview_beside, safe_base_name,
    safe_relative_path)

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
    intake = FileIntake(str(gcodes), 4 << 20)
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
        except (BadInput, Unsupported) as e:
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
                assert is_preview_image(f.read())
        stored.append(name)
        assert check_gcodes_dir(str(gcodes)) == []

    batches = run_for(SECONDS, one)
    new = tree(str(tmp_path)) - outside
    assert all(p.startswith("gcodes" + os.sep) for p in new), new
    assert check_gcodes_dir(str(gcodes)) == []
    print("\nmultipart intake: %d batches of examples, %d files stored"
          % (batches, len(stored)))


@settings(max_examples=500, deadline=None)
@given(text=st.text(max_size=400))
def test_job_names_are_one_clean_line(text):
    name = job_name(text + ".gcode")
    assert SAVED_JOB_FIELDS["name"](name)
    assert len(name) <= MAX_JOB_NAME and name == name.strip()
    assert all(c == " " or not c.isspace() for c in name)
    assert all(unicodedata.category(c)[0] != "C" or c in JOINERS
               for c in name)
    assert json.loads(json.dumps(name)) == name
    name.encode("utf-8")    # no lone surrogate


def test_fuzz_small_multipart(tmp_path):
    @BATCH
    @given(parts=parts, boundary=boundaries, closing=st.booleans(),
           ops=damage)
    def one(parts, boundary, closing, ops):
        body = apply_damage(build(parts, boundary, closing), ops)
        try:
            got = parse_small_multipart(body, boundary.encode("latin-1"))
        except BadInput as e:
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
            head = gcode_comment_lines(head)
        thumb = parse_gcode_metadata(head, b"")["thumbnail"]
        assert thumb is None or is_preview_image(thumb)
        # a block that gives a preview on its own still does among others
        if any(best_thumbnail(b) for b in blocks):
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
    # nothing is written outside the gcodes folder and the module's own
    skip = ("gcodes", os.path.relpath(k.data_dir, k.workdir))
    outside = tree(k.workdir, skip=skip)
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
    assert tree(k.workdir, skip=skip) == outside
    log = k.log_text()
    assert "Traceback" not in log and "Internal error" not in log
    print("\nHTTP: %d batches; replies by status: %s" % (
        batches, dict(sorted(seen.items()))))


# Saved files: whatever a user, a backup or another tool left in them,
# the stores load what is usable and stay usable

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
GOOD_JOB = {"uuid": "1234abcd", "name": "a", "filename": "a.gcode",
            "owner": "bob", "created_at": "2026-01-01T00:00:00.000000Z",
            "status": "queued", "source": "cura", "time_estimate": 10,
            "time_elapsed": 0, "time_total": 10, "preview": None,
            "started": False, "force": False, "message": "",
            "finished_at": 1764410400.0,
            "materials": [{"extruder": 0, "guid": "1cbfaeb3-1906-4b26-b2e7"
                           "-6f777a8c197a", "name": "PETG"}]}
GOOD_CLIENT = {"key": "k" * 32, "allowed": True, "application": "Cura",
               "user": "bob", "address": "127.0.0.1",
               "requested_at": "2026-01-01 00:00:00"}


def mutated(good, **overrides):
    """good with up to 3 fields replaced by any JSON and up to 2 gone."""
    good = dict(good, **overrides)
    keys = sorted(good)
    return st.tuples(
        st.dictionaries(st.sampled_from(keys), json_values, max_size=3),
        st.sets(st.sampled_from(keys), max_size=2)).map(
        lambda rd: {k: rd[0].get(k, v) for k, v in good.items()
                    if k not in rd[1]})


# and every form of real_inputs as the module saves it (previews in
# .thumbs, materials named from the UFP's profiles...)
GOOD_JOBS = [GOOD_JOB] + real_inputs.saved_jobs()


def good_job(**overrides):
    return st.sampled_from(GOOD_JOBS).flatmap(
        lambda good: mutated(good, **overrides))


def jobs_list(status):
    return st.lists(st.builds(
        lambda d, n: dict(d, uuid="%s%d" % (d.get("uuid"), n))
        if isinstance(d.get("uuid"), str) else d,
        good_job(status=status), st.integers(0, 3)) | json_values,
        max_size=4)


queue_files = st.fixed_dictionaries({}, optional={
    "version": json_values, "plate_clear": st.booleans() | json_values,
    "current": good_job(status="printing", uuid="c0") | json_values,
    "queue": jobs_list("queued") | json_values,
    "history": jobs_list("finished") | json_values}) | json_values
auth_files = st.fixed_dictionaries({}, optional={
    "version": json_values,
    "clients": st.dictionaries(
        st.sampled_from(["aaaa1111", "bbbb2222", "Upper", "", "a b"])
        | st.text(max_size=10),
        mutated(GOOD_CLIENT) | json_values, max_size=3) | json_values,
}) | json_values
material_files = st.fixed_dictionaries({}, optional={
    "version": json_values,
    "extruders": st.dictionaries(
        st.sampled_from(["extruder", "extruder1", "x"]),
        mutated({"guid": "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce"})
        | mutated({"material": "PLA", "brand": "Acme", "color": "#ff0000"})
        | json_values, max_size=2) | json_values}) | json_values
file_texts = st.one_of(
    st.builds(lambda v: __import__("json").dumps(v), json_values),
    st.text(max_size=50), st.just("{"), st.just(""))


def file_text(strategy):
    return st.one_of(st.builds(lambda v: __import__("json").dumps(v),
                               strategy), file_texts)


def test_fuzz_saved_files(tmp_path):
    import json
    seen = {"kept": 0, "dropped": 0}

    @BATCH
    @given(queue=file_text(queue_files), auth=file_text(auth_files),
           materials=file_text(material_files),
           ids=st.lists(st.text(max_size=10), max_size=3))
    def one(queue, auth, materials, ids):
        for name, text in (("queue.json", queue), ("auth.json", auth),
                           ("loaded.json", materials)):
            (tmp_path / name).write_text(text)
            if os.path.exists(str(tmp_path / (name + ".bad"))):
                os.unlink(str(tmp_path / (name + ".bad")))
        store = JobStore(str(tmp_path / "queue.json"), 5, False)
        cur, q, hist = store.all_jobs()
        seen["kept"] += len(cur + q + hist)
        seen["dropped"] += store.kept_aside
        for job in cur + q + hist:
            # inside the gcodes folder; what the queue starts, a file the
            # module named; a preview beside its file
            assert safe_relative_path(job.filename)
            if job in q or job.source == "cura":
                assert safe_base_name(job.filename, "", 255) \
                    == job.filename
            assert job.preview is None \
                or preview_beside(job.preview, job.filename)
            json.dumps(job.to_dict())
        assert all(j.status == "queued" for j in q)
        try:
            store.plate_cleared()
        except Conflict:
            pass
        store.save()
        again = JobStore(str(tmp_path / "queue.json"), 5, False)
        assert again.state() == store.state()
        auth = AuthStore(str(tmp_path / "auth.json"))
        for key_id in ids + [c["id"] for c in auth.listing()]:
            auth.allow(key_id)
            assert auth.status(key_id) in ("unknown", "authorized")
            auth.remove(key_id)
        auth.save()
        loaded = LoadedMaterials(str(tmp_path / "loaded.json"),
                                    [("extruder", None),
                                     ("extruder1", {"material": "PLA"})])
        assert set(loaded.status_cache) == {"extruder", "extruder1"}
        loaded.get(0), loaded.get(1), loaded.get(5)
        for job in cur + q + hist:     # what a saved job asks is usable
            loaded.changes(job.materials)
            assert job.finished_at is None \
                or isinstance(job.finished_at, str)
        loaded.save()

    batches = run_for(SECONDS, one)
    print("\nsaved files: %d batches; jobs kept %d, files with dropped "
          "entries %d" % (batches, seen["kept"], seen["dropped"]))


# G-code commands and saved files against the real Klippy: it stays ready

GCODE_COMMANDS = ["CURA_BUILD_PLATE_CLEARED", "CURA_QUEUE", "CURA_PAIRING",
                  "CURA_ALLOW", "CURA_DENY", "SET_CURA_MATERIAL"]
PARAM_NAMES = ["ID", "EXTRUDER", "GUID", "MATERIAL", "BRAND", "COLOR", "X",
               "id", "Extruder"]
param_values = st.one_of(
    st.sampled_from(["", "aaaa1111", "extruder", "extruder1", "empty",
                     "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce", "PLA",
                     "#ff8000", "x" * 100, "\"", "'", "=", "é"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x2ff,
                                   blacklist_characters=";"),
            max_size=20))


@pytest.mark.slow
@pytest.mark.one_flavor   # long-running: the first flavor is enough
def test_fuzz_gcode_commands_and_saved_files(klippy_factory, flavor):
    import json
    k = klippy_factory(start=False)
    data = k.data_dir
    os.makedirs(data, exist_ok=True)
    k.start()
    k.wait_ready()
    errors = [0, 0]

    @settings(max_examples=15, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(commands=st.lists(st.tuples(
        st.sampled_from(GCODE_COMMANDS),
        st.lists(st.tuples(st.sampled_from(PARAM_NAMES), param_values),
                 max_size=3)), min_size=1, max_size=6))
    def commands(commands):
        for cmd, params in commands:
            line = " ".join([cmd] + ["%s=%s" % kv for kv in params])
            try:
                k.gcode(line)
                errors[0] += 1
            except Exception as e:
                assert "Internal error" not in str(e), (line, e)
                errors[1] += 1
        assert k.info()["state"] == "ready"

    @settings(max_examples=4, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(queue=file_text(queue_files), auth=file_text(auth_files),
           materials=file_text(material_files))
    def files(queue, auth, materials):
        for name, text in (("queue.json", queue), ("auth.json", auth),
                           ("loaded_materials.json", materials)):
            with open(os.path.join(data, name), "w") as f:
                f.write(text)
        k.restart()
        assert k.info()["state"] == "ready"
        r = httpc.request(k.base_url(), "GET", "/cluster-api/v1/print_jobs")
        assert r.status == 200, r
        for line in ("CURA_QUEUE", "CURA_PAIRING", "SET_CURA_MATERIAL",
                     "CURA_ALLOW ID=aaaa1111", "CURA_BUILD_PLATE_CLEARED"):
            try:
                k.gcode(line)
            except Exception as e:
                assert "Internal error" not in str(e), (line, e)
        json.dumps(r.json())

    batches = run_for(SECONDS, lambda: (commands(), files()))
    assert k.info()["state"] == "ready"
    log = k.log_text()
    assert "Internal error" not in log
    assert klippy_harness.own_tracebacks(log) == []
    print("\nG-code commands: %d batches; %d ran, %d refused (gcmd.error)"
          % (batches, errors[0], errors[1]))
