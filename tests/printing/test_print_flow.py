"""Uploads and the queue in the real Klippy: file types, names, previews,
the plate-clear handshake, persistence over RESTART and kill -9."""
import gzip
import os
import time

import httpc
from httpc import JOBS, all_jobs, jobs, upload
import gcode_samples
import real_inputs



def wait_jobs(base, pred, timeout=20., what="jobs"):
    deadline = time.monotonic() + timeout
    while True:
        js = all_jobs(base)
        if pred(js):
            return js
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s: %r" % (what, js))
        time.sleep(0.1)


def by_name(js):
    return {j["name"]: j for j in js}


def visible_files(k):
    out = []
    for root, dirs, files in os.walk(k.workdir):
        out += [os.path.relpath(os.path.join(root, f), k.workdir)
                for f in files]
    return out


def test_gcode_and_gzip_uploads(klippy):
    base = klippy.base_url()
    slow = gcode_samples.moves(600, 10, 0.1)
    thumb = gcode_samples.png(20, 10)
    plain = (";FLAVOR:Marlin\n;TIME:1500\n"
             + gcode_samples.embedded_thumbnail(thumb, 20, 10) + slow)
    r = upload(base, "first.gcode", plain.encode())
    assert r.status == 200 and r.json()["filename"] == "first.gcode"
    first = r.json()["uuid"]
    r = upload(base, "second.gcode.gz",
               gzip.compress(b"; estimated printing time = 1h 2m 3s\n"
                             + slow.encode()))
    assert r.status == 200 and r.json()["filename"] == "second.gcode"
    with open(os.path.join(klippy.gcodes_dir, "second.gcode"), "rb") as f:
        assert f.read().endswith(slow.encode())
    js = wait_jobs(base, lambda js: by_name(js).get("first", {}).get(
        "status") == "printing", what="first printing")
    j = by_name(js)
    assert j["first"]["uuid"] == first
    assert j["first"]["time_elapsed"] <= j["first"]["time_total"]
    assert j["second"]["status"] == "queued"
    assert j["second"]["time_total"] == 3723
    # the embedded thumbnail is the preview of plain G-code
    r = httpc.request(base, "GET", JOBS + "/%s/preview_image" % (first,))
    assert r.status == 200 and r.body == thumb
    assert r.headers["Content-Type"] == "image/png"
    # status for Mainsail/Fluidd macros and panels
    st = klippy.query("cura_connection")["cura_connection"]
    assert st["current_job"]["name"] == "first"
    assert [q["name"] for q in st["queue"]] == ["second"]
    assert st["plate_clear"] is False


def test_names_are_safe_and_unique(klippy):
    base = klippy.base_url()
    data = gcode_samples.moves(400, 10, 0.1).encode()
    assert upload(base, "cube.gcode", data).status == 200
    klippy.wait_print_state("printing")
    before = open(os.path.join(klippy.gcodes_dir, "cube.gcode"), "rb").read()
    names = []
    for fname in ["cube.gcode", "../../escape.gcode", "/etc/cron.d/x.gcode",
                  "..\\..\\win.gcode", "a b\x01c.gcode", "cube.gcode"]:
        r = upload(base, fname, b"G1 X1\n")
        assert r.status == 200, (fname, r)
        names.append(r.json()["filename"])
    assert names == ["cube-1.gcode", "escape.gcode", "x.gcode", "win.gcode",
                     "a_b_c.gcode", "cube-2.gcode"]
    # the file being printed was not touched; nothing escaped the folder
    assert open(os.path.join(klippy.gcodes_dir, "cube.gcode"), "rb").read() \
        == before
    top = set(os.listdir(klippy.workdir))
    assert not {"escape.gcode", "win.gcode", "x.gcode"} & top
    assert not [f for f in visible_files(klippy) if f.endswith(".part")]


def test_refused_uploads_leave_nothing(klippy_factory):
    k = klippy_factory(module_options={"max_upload_size": 1})
    base = k.base_url()
    r = upload(base, "big.gcode", b"G1 X1\n" * 400000)     # 2.4 MB
    assert r.status == 413 and "max_upload_size" in r.json()["message"]
    r = upload(base, "model.stl", b"solid x\n")
    assert r.status == 415
    r = upload(base, "broken.gcode.gz", b"\x1f\x8bnot really gzip")
    assert r.status == 400
    r = upload(base, "broken.ufp", b"PK not a zip")
    assert r.status == 400
    assert jobs(base) == []
    assert os.listdir(k.gcodes_dir) == []


def test_client_gone_mid_upload(klippy):
    import socket
    base = klippy.base_url()
    body, headers = httpc.multipart({"owner": "x"},
                                    {"file": ("cut.gcode", b"G1 X1\n" * 1000)})
    s = socket.create_connection(("127.0.0.1", klippy.cura_port()))
    head = "POST %s/ HTTP/1.1\r\nHost: 127.0.0.1\r\n" % (JOBS,)
    head += "".join("%s: %s\r\n" % kv for kv in headers.items()) + "\r\n"
    s.sendall(head.encode() + body[:len(body) // 2])
    time.sleep(0.3)
    s.close()
    time.sleep(0.5)
    assert jobs(base) == []
    assert os.listdir(klippy.gcodes_dir) == []


def test_plate_cleared_and_auto_start(klippy_factory):
    k = klippy_factory(module_options={"auto_start_next": "True"})
    base = k.base_url()
    quick = gcode_samples.moves(20, 10, 0.1).encode()
    for n in ("a", "b"):
        assert upload(base, n + ".gcode", quick).status == 200
    # b starts by itself after a; a goes to history as finished
    js = wait_jobs(base, lambda js: by_name(js).get("b", {}).get("status")
                   == "wait_cleanup", what="b done")
    assert by_name(js)["a"]["status"] == "finished"
    assert "printer_uuid" not in by_name(js)["a"]


def test_queue_survives_restart_and_kill(klippy_factory):
    k = klippy_factory()
    base = k.base_url()
    long_print = gcode_samples.moves(3000, 10, 0.1).encode()
    assert upload(base, "long.gcode", long_print).status == 200
    # Cura's UFP (thumbnail, material profile): queued behind it
    ufp = real_inputs.sample("ufp_pla")
    assert upload(base, "next.ufp", ufp.data, owner="bob").status == 200
    wait_jobs(base, lambda js: by_name(js)["long"]["status"] == "printing",
              what="long printing")
    queued = by_name(all_jobs(base))["next"]
    k.restart()
    js = by_name(all_jobs(k.base_url()))
    assert js["next"] == queued
    r = httpc.request(k.base_url(), "GET",
                      JOBS + "/%s/preview_image" % (queued["uuid"],))
    assert r.status == 200 and r.body == ufp.preview
    # the interrupted print is reported, never silently restarted
    assert js["long"]["status"] == "failed_wait_cleanup"
    assert "restart" in js["long"]["message"]
    assert js["next"]["status"] == "queued" and js["next"]["owner"] == "bob"
    assert k.query("print_stats")["print_stats"]["state"] == "standby"
    # the user clears the plate: next starts; kill -9 while it prints
    k.gcode("CURA_BUILD_PLATE_CLEARED")
    assert upload(k.base_url(), "long2.gcode", long_print).status == 200
    wait_jobs(k.base_url(), lambda js: by_name(js)["next"]["status"]
              in ("wait_cleanup", "finished"), what="next done")
    k.gcode("CURA_BUILD_PLATE_CLEARED")
    wait_jobs(k.base_url(), lambda js: by_name(js)["long2"]["status"]
              == "printing", what="long2 printing")
    # the writer thread has saved it (kill -9 a moment earlier loses the
    # change, as any process would)
    saved = os.path.join(k.data_dir, "queue.json")
    httpc.wait_for(lambda: '"name": "long2"' in open(saved).read().split(
        '"queue"')[0], what="long2 saved as the printer's job")
    k.kill9()
    k.start()
    k.wait_ready()
    js = by_name(all_jobs(k.base_url()))
    assert js["long2"]["status"] == "failed_wait_cleanup"
    assert js["next"]["status"] == "finished"
    assert js["long"]["status"] == "failed"
    # nothing the killed process was writing is left; the live one may
    # be saving the queue right now (its temp files name its pid)
    own = ".cura-tmp-%d-" % (k.pid,)
    assert not [f for f in visible_files(k) if (
        f.endswith(".part") or os.path.basename(f).startswith(".cura-"))
        and not os.path.basename(f).startswith(own)]


def test_errors_and_shutdown_fail_the_job(klippy):
    base = klippy.base_url()
    broken = gcode_samples.moves(20, 10, 0.1) + "M104 S5000\n"
    assert upload(base, "broken.gcode", broken.encode()).status == 200
    js = wait_jobs(base, lambda js: js and js[0]["status"]
                   == "failed_wait_cleanup", what="failed job")
    assert js[0]["name"] == "broken" and js[0]["message"]
    klippy.gcode("CURA_BUILD_PLATE_CLEARED")
    long_print = gcode_samples.moves(3000, 10, 0.1).encode()
    assert upload(base, "long.gcode", long_print).status == 200
    wait_jobs(base, lambda js: js[0]["status"] == "printing",
              what="printing")
    klippy.gcode("M112")
    js = wait_jobs(base, lambda js: js[0]["status"] == "failed_wait_cleanup",
                   what="failed after shutdown")
    assert js[0]["name"] == "long"
    assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["status"] \
        == "error"


def test_cura_queue_lists_the_queue_in_the_console(klippy):
    base = klippy.base_url()
    api = klippy.api
    # what the Mainsail/Fluidd console would show
    api.call("gcode/subscribe_output", {"response_template": {}})
    long_print = gcode_samples.moves(3000, 10, 0.1).encode()
    assert upload(base, "running.gcode", long_print).status == 200
    assert upload(base, "waiting.gcode", b"G1 X1\n", owner="bob").status \
        == 200
    httpc.wait_for(lambda: jobs(base)[0]["status"] == "printing")
    klippy.gcode("CURA_QUEUE")
    text = "\n".join(str(n.get("params")) for n in api.notifications)
    assert "Printer: running (printing)" in text
    assert "1. waiting (queued, from bob)" in text
    assert "Waiting for CURA_BUILD_PLATE_CLEARED" not in text
