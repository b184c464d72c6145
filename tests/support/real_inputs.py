"""The print files real clients send, made with the real writers, for
every test that uploads: a UFP as Cura's UFPWriter writes it (libcharon,
Griffin header, its snapshot as /Metadata/thumbnail.png, the material
profiles of the Debian fdm-materials package under /Materials/), Cura 5's
Create Thumbnail G-code, PrusaSlicer and OrcaSlicer G-code with their
header and statistics comments and thumbnails of several sizes, JPG-only
thumbnails, .gcode.gz, Griffin G-code for one and two extruders and Cura's
Marlin-flavour header.  Images are encoded by Qt as Cura encodes them.

Each Sample says what the printer must make of it: the preview bytes
Cura is served, the time estimate and the material GUIDs per extruder.
Samples are built once per process (the UFPs take libcharon a moment).
"""
import functools
import gzip
import io
import json
import os
import re
import sys
import tempfile

import cura_client
import gcode_samples as gs
import httpc

MATERIALS_DIR = (cura_client.DEFAULT_CURA_ROOT
                 / "usr/share/cura/resources/materials")
# GUID -> the fdm-materials file Cura packs for it (its base_file)
PROFILE_FILES = {
    gs.ULTIMAKER_PLA_BLACK: "ultimaker_pla_black.xml.fdm_material",
    gs.GENERIC_PLA: "generic_pla.xml.fdm_material",
    gs.GENERIC_PETG: "generic_petg.xml.fdm_material",
}


def profile(guid):
    """(file name, bytes) of the Debian fdm-materials profile of guid."""
    name = PROFILE_FILES[guid]
    return name, (MATERIALS_DIR / name).read_bytes()


def profile_files():
    """Every fdm-materials profile Cura would sync: [(name, bytes)]."""
    return [(p.name, p.read_bytes())
            for p in sorted(MATERIALS_DIR.glob("*.xml.fdm_material"))]


class Sample:
    """One upload: its file name and bytes, and what the printer keeps of
    it (preview: the image bytes served, or None)."""
    def __init__(self, key, filename, data, preview, time_estimate,
                 guids=()):
        self.key = key
        self.filename = filename
        self.data = data
        self.preview = preview
        self.time_estimate = time_estimate
        self.guids = list(guids)

    def __repr__(self):
        return "Sample(%s)" % (self.key,)


def _slice_metadata(guids):
    # what Cura 5 adds as Cura/slicemetadata.json (a few of its settings)
    meta = {"material": {"length": [1.23] * len(guids),
                         "weight": [3.68] * len(guids),
                         "cost": [0.09] * len(guids)},
            "global": {"changes": {"layer_height": "0.15"},
                       "all_settings": {"layer_height": "0.15",
                                        "adhesion_type": "brim"}},
            "quality": {"profile": "Normal", "intent": "Default",
                        "custom_profile": ""}}
    for n in range(len(guids)):
        meta["extruder_%d" % (n,)] = {
            "changes": {}, "all_settings": {"infill_sparse_density": "20"}}
    return meta


def ufp_bytes(gcode, thumbnail, guids, cura5=False):
    """A UFP as Cura's UFPWriter writes it (libcharon), in memory: the
    G-code, Cura's snapshot (thumbnail, PNG bytes or None), the profiles
    of the material GUIDs (PROFILE_FILES) and, from Cura 5, its slice
    metadata."""
    fd, path = tempfile.mkstemp(suffix=".ufp")
    os.close(fd)
    try:
        cura_client.make_ufp(path, gcode, thumbnail_png=thumbnail,
                             materials=[MATERIALS_DIR / PROFILE_FILES[g]
                                        for g in guids if g],
                             object_names=["cube.stl"],
                             slice_metadata=_slice_metadata(guids)
                             if cura5 else None)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _png(w, h, n):
    # each form its own image: a preview served for the wrong job shows
    return gs.qt_image(w, h, (40 * n % 256, 90 + 13 * n, 200 - 17 * n),
                       "PNG")


def snapshot():
    """Cura's snapshot of the build plate: a 300x300 PNG by Qt."""
    return _images()["snapshot"][0]


@functools.lru_cache(maxsize=None)
def _images():
    return {"snapshot": [_png(300, 300, n) for n in range(3)],
            "small": _png(16, 16, 3), "wide": _png(313, 173, 4),
            "orca": _png(300, 300, 5), "cura5": _png(300, 300, 6),
            "zipped": _png(313, 173, 7),
            "jpg_small": gs.qt_image(16, 16, (0, 0, 0), "JPG"),
            "jpg": gs.qt_image(220, 124, (200, 120, 60), "JPG")}


# key -> (upload file name, material GUIDs per extruder of a Griffin
# header, or None: the form names no material).  ufp_pla is Cura 4.13's
# UFP, the other two Cura 5's (with its slice metadata).
FORMS = {
    "ufp_pla": ("pla_cube.ufp", [gs.ULTIMAKER_PLA_BLACK]),
    "ufp_petg": ("petg_cube.ufp", [gs.GENERIC_PETG]),
    "ufp_two": ("two_cores.ufp", [gs.GENERIC_PETG, gs.ULTIMAKER_PLA_BLACK]),
    "cura5_thumbnail": ("cura5_thumb.gcode", None),
    "prusaslicer": ("prusa_part.gcode", None),
    "orcaslicer": ("orca_part.gcode", None),
    "jpg_only": ("jpg_only.gcode", None),
    "gcode_gz": ("zipped.gcode.gz", None),
    "griffin_one": ("griffin_one.gcode", [gs.GENERIC_PLA]),
    "griffin_two": ("griffin_two.gcode", [gs.GENERIC_PETG,
                                          gs.ULTIMAKER_PLA_BLACK]),
    "marlin": ("marlin_part.gcode", None),
}
KEYS = tuple(FORMS)
# the forms whose header names the material it was sliced for
GRIFFIN = tuple(k for k, (_, guids) in FORMS.items() if guids)


def make(key, body, material=None):
    """A Sample of form key around body (G-code moves, text); material:
    the GUID of extruder 0 for a Griffin form (else the form's own)."""
    im = _images()
    filename, guids = FORMS[key]
    if guids and material:
        guids = [material] + guids[1:]
    guids = guids or []
    if key.startswith("ufp_"):
        n = list(FORMS).index(key)
        est = 1200 + 600 * n
        snapshot = im["snapshot"][n]
        return Sample(key, filename, ufp_bytes(gs.griffin_header(
            est, guids if len(guids) > 1 else guids[0]) + body, snapshot,
            guids, cura5=key != "ufp_pla"), snapshot, est, guids)
    if key.startswith("griffin_"):
        est = 900 + 60 * len(guids)
        return Sample(key, filename, (gs.griffin_header(
            est, guids if len(guids) > 1 else guids[0]) + body).encode(),
            None, est, guids)
    if key == "cura5_thumbnail":
        return Sample(key, filename, (
            gs.cura_marlin_header(2345)
            + gs.embedded_thumbnail(im["small"], 16, 16, sep=" ")
            + gs.embedded_thumbnail(im["cura5"], 300, 300, sep=" ")
            + body).encode(), im["cura5"], 2345)
    if key == "prusaslicer":
        return Sample(key, filename, gs.prusaslicer_gcode(
            [(im["small"], 16, 16), (im["wide"], 313, 173)], body).encode(),
            im["wide"], 3723)
    if key == "orcaslicer":
        return Sample(key, filename, gs.orcaslicer_gcode(
            [(im["small"], 96, 96), (im["orca"], 300, 300)], body).encode(),
            im["orca"], 1681)
    if key == "jpg_only":
        return Sample(key, filename, gs.prusaslicer_gcode(
            [(im["jpg_small"], 16, 16), (im["jpg"], 220, 124)], body,
            kind="_JPG").encode(), im["jpg"], 3723)
    if key == "gcode_gz":
        return Sample(key, filename, gzip.compress(gs.prusaslicer_gcode(
            [(im["small"], 16, 16), (im["zipped"], 313, 173)],
            body).encode()), im["zipped"], 3723)
    assert key == "marlin", key
    return Sample(key, filename, (gs.cura_marlin_header(2345)
                                  + body).encode(), None, 2345)


@functools.lru_cache(maxsize=None)
def samples(moves=20):
    """{key: Sample} of every form, each with its own material; moves: G1
    lines of each (no TEST_SLEEP: they print at once in the file-output
    Klippy)."""
    body = gs.moves(moves, 0)
    return {key: make(key, body) for key in KEYS}


def sample(key, moves=20):
    return samples(moves)[key]


# The module's own code paths, without Klippy

def package():
    """Make the module's package importable (as the tests import it)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                        "..", "klippy_extras")
    if path not in sys.path:
        sys.path.insert(0, path)


class UploadRequest:
    """What the module's receive_upload reads of an HTTP request, over the
    body Cura's client sends (httpc.multipart: Qt's layout; fields: text
    parts before the file, after: after it), or over sent: (headers,
    body) as Cura's own code sent them (cura_client.captured_upload)."""
    def __init__(self, filename=None, data=None, owner="alice", fields=(),
                 after=None, sent=None):
        if sent is None:
            body, headers = httpc.multipart(
                dict({"owner": owner}, **dict(fields)),
                {"file": (filename, data)}, after=after)
        else:
            headers, body = sent
            headers = {"Content-Type": headers["content-type"]}
        self.body = io.BytesIO(body)
        self.length = len(body)
        self.boundary = re.search(r'boundary="([^"]+)"',
                                  headers["Content-Type"]).group(1).encode()

    def content_length(self, required=False):
        return self.length

    def multipart_boundary(self):
        return self.boundary

    def send_continue(self):
        pass

    def readinto_body(self, buf):
        return self.body.readinto(buf)


def upload(api, sample, filename=None, owner="alice", **parts):
    """sample received as POST /print_jobs receives it (receive_upload,
    FileIntake) and queued by api (a CuraApi): the reply dict.  parts:
    UploadRequest's fields and after."""
    package()
    from _cura_connection.api import receive_upload
    if sample is not None:      # (else parts' sent: a captured request)
        parts.update(filename=filename or sample.filename, data=sample.data)
    return receive_upload(
        UploadRequest(owner=owner, **parts),
        api.intake, lambda: len(api.store.queue), api.max_queue,
        lambda name, who, meta: api.add_upload(name, who, meta, "127.0.0.1"))


class MetaSpy:
    """A CuraApi (Klippy's side) over tmp_path whose add_upload records
    the metadata each upload brings (upload: a sample received by
    receive_upload, as Klippy's own server receives it)."""
    def __init__(self, tmp_path):
        self.gcodes = str(tmp_path / "gcodes")
        os.makedirs(self.gcodes)
        os.makedirs(str(tmp_path / "data"))
        self.api = cura_api(self.gcodes, str(tmp_path / "data"))
        self.metas = []
        add = self.api.add_upload

        def spy(filename, owner, meta, address):
            self.metas.append(meta)
            # (this api has no group: the names uploads bring are what is
            # looked at here, not where they route)
            return add(filename, owner, dict(meta, require_printer_name=""),
                       address)
        self.api.add_upload = spy

    def upload(self, key="marlin", **parts):
        upload(self.api, None if "sent" in parts else sample(key), **parts)
        return self.metas[-1]

    def left(self):
        return sorted(os.listdir(self.gcodes))


class LinkedFront:
    """The front process's end of the link to Klippy's side, without the
    socket: each call's arguments cross as JSON (as frames carry them) to
    Klippy's side, whose reservations it stands in for and whose
    add_upload (spy's) it calls."""
    def __init__(self, spy):
        self.spy = spy
        self.queued = 0

    def call(self, op, **args):
        args = json.loads(json.dumps(args))
        if op == "reserve":
            return {"token": 1}
        if op == "grow":
            return {}
        assert op == "add_upload", op
        return json.loads(json.dumps(self.spy.api.add_upload(**args)))

    def send(self, key, payload=b""):
        pass


class FrontRequest(UploadRequest):
    client_address = ("127.0.0.1", 40000)

    def require_control(self):
        pass


def front_upload(spy, key="marlin", **parts):
    """Sample key (or parts' sent: a captured request) received by the
    front process's FrontUploads and handed to spy's Klippy's side: the
    metadata that arrives there."""
    package()
    from _cura_connection.front import FrontUploads
    uploads = FrontUploads(LinkedFront(spy), {
        "max_queue": 100, "gcodes": spy.gcodes, "max_upload": 1 << 30})
    if "sent" not in parts:
        parts.update(filename=sample(key).filename, data=sample(key).data)
    status, reply = uploads.post_print_job(FrontRequest(**parts))
    assert status == 200 and reply["filename"] in spy.left()
    return spy.metas[-1]


class QueueOnly:
    """Bridge and lifecycle for a CuraApi without Klipper: what an upload
    asks of them (the job joins the queue, or is taken back) runs at once,
    with the module's own JobLifecycle.add."""
    def __init__(self, store):
        self.store = store
        # Klipper's state as an idle printer's status timer shows it
        self.snapshot = {"seq": 0, "klippy_state": "ready",
                         "state_message": "Printer is ready",
                         "print_stats": {"state": "standby"},
                         "virtual_sdcard": {}, "pause_resume": {},
                         "extruders": [], "heater_bed": None,
                         "axis_minimum": [0., 0., 0.],
                         "axis_maximum": [230., 190., 200.]}

    def call(self, fn, *args):
        package()
        from _cura_connection.bridge import NoCall
        return fn(NoCall, *args)

    def add(self, call, job, limit):
        package()
        from _cura_connection.lifecycle import JobLifecycle
        return JobLifecycle.add(self, call, job, limit)

    def change(self, call, fn, *args):
        return fn(*args)


def cura_api(gcodes, data_dir, max_queue=1000, **parts):
    """A CuraApi over the module's own FileIntake, MaterialStore and
    JobStore in gcodes and data_dir, as load_config() places them; parts
    (store, intake, materials, bridge, lifecycle, loaded, definition,
    group) replace those."""
    package()
    from _cura_connection.access import AccessPolicy
    from _cura_connection.api import CuraApi
    from _cura_connection.definition import PrinterIdentity
    from _cura_connection.intake import FileIntake
    from _cura_connection.jobs import JobStore
    from _cura_connection.materials import MaterialStore
    store = parts.get("store") or JobStore(
        os.path.join(data_dir, "queue.json"), 1000, False)
    bridge = parts.get("bridge") or QueueOnly(store)
    return CuraApi(
        bridge, store, parts.get("lifecycle") or bridge,
        parts.get("intake") or FileIntake(gcodes, 1 << 30),
        parts.get("materials") or MaterialStore(
            os.path.join(data_dir, "materials")),
        parts.get("loaded"),
        PrinterIdentity("test", "00000000-0000-4000-8000-000000000000",
                        213482, "Ultimaker S3", ["AA 0.4"]),
        AccessPolicy([]), parts.get("definition"), max_queue=max_queue,
        group=parts.get("group"))


def received_jobs(gcodes, data_dir, keys=KEYS):
    """Each form of keys uploaded and queued through the module's own code
    (upload above) into gcodes: the JobStore saved at data_dir/queue.json,
    its jobs as the module makes them (previews, materials...)."""
    os.makedirs(gcodes, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    api = cura_api(gcodes, data_dir)
    for key in keys:
        upload(api, samples()[key])
    return api.store


def saved_jobs():
    """Every form's job as the module saves it (Job.to_dict() of
    received_jobs), its files made in a folder removed again."""
    import shutil
    tmp = tempfile.mkdtemp(prefix="real-inputs-")
    try:
        store = received_jobs(tmp, os.path.join(tmp, ".cura_connection"))
        return [j.to_dict() for j in store.queue]
    finally:
        shutil.rmtree(tmp)


def write_queue(gcodes, data_dir, jobs):
    """data_dir/queue.json as an old version (before max_queue) or a
    raised limit leaves it -- a finished job on the plate, so nothing
    starts by itself, and `jobs` queued jobs.  The jobs are the module's
    own: every form received and queued through its intake into gcodes
    (files, previews, materials in place), then repeated under new uuids
    and names to make up the count.  Returns the queued jobs' uuids."""
    store = received_jobs(gcodes, data_dir)
    done = store.queue[0]
    store.begin_start(done)
    store.end(done, "wait_cleanup")
    made = [j.to_dict() for j in store.queue]
    state = store.state()
    state["queue"] = [dict(made[i % len(made)], name="job %d" % (i + 1,),
                           uuid="00000000-0000-4000-8000-%012d" % (i + 1,))
                      for i in range(jobs)]
    with open(os.path.join(data_dir, "queue.json"), "w") as f:
        json.dump(state, f)
    return [j["uuid"] for j in state["queue"]]


if __name__ == "__main__":
    # For programs on another Python (the benchmarks' runner), which
    # lacks the libraries the real writers need:
    #   real_inputs.py queue GCODES DATA_DIR JOBS  -> the uuids, as JSON
    if sys.argv[1:2] == ["queue"] and len(sys.argv) == 5:
        print(json.dumps(write_queue(sys.argv[2], sys.argv[3],
                                     int(sys.argv[4]))))
    else:
        sys.exit("usage: real_inputs.py queue GCODES DATA_DIR JOBS")
