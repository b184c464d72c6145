"""The "Manage in browser" page in real headless Chromium (Debian's
chromium + chromium-driver, through selenium): it shows the printer, the
job, the queue and the history from the JSON API, and its buttons act
through the module.  Screenshots go to tests/artifacts/."""
import os
import shutil
import struct
import time
import zlib

import pytest

import httpc
from httpc import jobs, wait_for
from mjpeg_source import MjpegSource

ARTIFACTS = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "artifacts")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu",
                "--disable-quic", "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,1500",
                "--user-data-dir=%s" % (tmp_path / "chromium-profile",)):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def picture(width=96, height=96):
    """A PNG preview: a coloured disc on a light plate (stdlib only)."""
    rows = []
    for y in range(height):
        row = bytearray(b"\x00")
        for x in range(width):
            d = ((x - width / 2) ** 2 + (y - height / 2) ** 2) ** .5
            row += bytes((37, 99, 235) if d < width * .35
                         else (226, 232, 240))
        rows.append(bytes(row))
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(
        ">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"".join(rows)))
        + chunk(b"IEND", b""))


def gcode(seconds_estimate, count, thumbnail=True):
    import base64
    import gcode_samples
    head = ";FLAVOR:Marlin\n;TIME:%d\n" % (seconds_estimate,)
    if thumbnail:
        b64 = base64.b64encode(picture()).decode()
        head += "; thumbnail begin 96x96 %d\n%s\n; thumbnail end\n" % (
            len(b64), "\n".join("; " + b64[i:i + 78]
                                for i in range(0, len(b64), 78)))
    return (head + gcode_samples.moves(count=count, sleep_every=10,
                                       sleep_s=0.1)).encode()


def upload(base, name, data, owner):
    body, headers = httpc.multipart({"owner": owner}, {"file": (name, data)})
    r = httpc.request(base, "POST", "/cluster-api/v1/print_jobs/", body,
                      headers)
    assert r.status == 200, r
    return r.json()["uuid"]


def texts(driver, css):
    # in one go: the page redraws a section when its data changes
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".map(e => e.innerText)", css)


def text(driver, element_id):
    return driver.execute_script(
        "return document.getElementById(arguments[0]).innerText", element_id)


def stable(action, tries=20):
    """Run a selenium action again if a redraw replaced its element."""
    from selenium.common.exceptions import (
        ElementClickInterceptedException, NoSuchElementException,
        StaleElementReferenceException)
    for i in range(tries):
        try:
            return action()
        except (StaleElementReferenceException, NoSuchElementException,
                ElementClickInterceptedException):
            if i == tries - 1:
                raise
            time.sleep(0.1)


def click(driver, css):
    stable(lambda: driver.find_element("css selector", css).click())


def queue_button(driver, name, css):
    """The button matching css in the queue row of job `name`."""
    def find():
        for row in driver.find_elements("css selector", "#queue-list .row"):
            if row.find_element("css selector", ".name").text == name:
                return row.find_element("css selector", css)
        raise AssertionError("no queued job %s on the page" % (name,))
    return stable(find)


def screenshot(driver, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    driver.save_screenshot(path)
    return path


def test_page_shows_and_drives_the_printer(klippy_factory, browser):
    camera = MjpegSource(interval=0.2, size=(640, 360))
    try:
        run_page_scenario(klippy_factory, browser, camera)
    finally:
        camera.close()


def run_page_scenario(klippy_factory, browser, camera):
    k = klippy_factory(module_options={
        "name": "workshop-printer", "camera_url": camera.url(),
        "material_extruder": "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce"})
    base = k.base_url()
    # Cura's material sync gave the printer that material's profile
    import cura_client
    name = "ultimaker_pla_black.xml.fdm_material"
    body, headers = httpc.multipart({}, {"file": (name, (
        cura_client.DEFAULT_CURA_ROOT / "usr/share/cura/resources/materials"
        / name).read_bytes())})
    assert httpc.request(base, "POST", "/cluster-api/v1/materials/", body,
                         headers).status == 200
    # a short print that ends: its plate waits to be cleared
    upload(base, "calibration_cube.gcode", gcode(900, 20), "alice")
    wait_for(lambda: [j for j in jobs(base) if j["status"] == "wait_cleanup"],
             what="cube finished")
    benchy = upload(base, "benchy.gcode", gcode(5400, 6000), "alice")
    upload(base, "phone_stand.gcode", gcode(3000, 100), "<b>bob</b>")
    vase = upload(base, "vase.gcode", gcode(7200, 100, thumbnail=False),
                  "carol")

    # Cura's "Manage in browser" opens /print_jobs (and /printers)
    browser.get(base + "/print_jobs")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page loaded")
    assert browser.find_element("id", "printer-name").text \
        == "workshop-printer"
    assert browser.title.startswith("workshop-printer")
    assert texts(browser, "#current-job .name") == ["calibration_cube"]
    assert "Finished" in text(browser, "current-job")
    assert texts(browser, "#queue-list .name") == [
        "benchy", "phone_stand", "vase"]
    # owners are text, never markup
    assert "by <b>bob</b>" in text(browser, "queue-list")
    assert not browser.find_elements("css selector", "#queue-list b")
    assert "waits until the build plate" in text(browser, "queue-list")
    # the loaded material, named like Cura names it
    assert text(browser, "materials") == "Material: Black PLA"

    # "Build plate is clear": the ended job goes to the history and the
    # next one starts, through CURA_BUILD_PLATE_CLEARED in the reactor
    click(browser, "#plate-cleared")
    wait_for(lambda: texts(browser, "#current-job .name") == ["benchy"]
             and "Printing" in text(browser, "current-job"),
             what="benchy printing")
    assert [j["name"] for j in httpc.get_json(base, httpc.HISTORY)
            if j["status"] == "finished"] \
        == ["calibration_cube"]
    wait_for(lambda: "calibration_cube" in text(browser, "history-list"),
             what="history")
    # with the time it finished (finished_at, ISO like created_at)
    import re
    assert re.search(r"\d\d:\d\d", text(browser, "history-list")), \
        text(browser, "history-list")
    wait_for(lambda: texts(browser, "#queue-list .name")
             == ["phone_stand", "vase"], what="queue after start")
    # move to top, then delete (a second click confirms)
    stable(lambda: queue_button(browser, "vase", ".move-top").click())
    wait_for(lambda: [j["uuid"] for j in jobs(base)
                      if j["status"] == "queued"][0] == vase, what="moved")
    wait_for(lambda: texts(browser, "#queue-list .name")
             == ["vase", "phone_stand"], what="page shows the move")
    delete = queue_button(browser, "phone_stand", "button.danger")
    delete.click()
    # armed: the page holds its redraws until the second click
    assert delete.text.startswith("Sure?")
    assert [j["name"] for j in jobs(base) if j["status"] == "queued"] \
        == ["vase", "phone_stand"]           # not yet
    delete.click()
    wait_for(lambda: [j["name"] for j in jobs(base)
                      if j["status"] == "queued"] == ["vase"],
             what="deleted")
    # pause and resume, as Klipper's PAUSE/RESUME
    wait_for(lambda: browser.find_elements("id", "pause"), what="pause")
    click(browser, "#pause")
    k.wait_print_state("paused")
    wait_for(lambda: browser.find_elements("id", "resume"), what="resume")
    wait_for(lambda: text(browser, "printer-state") == "Paused",
             what="paused pill")
    click(browser, "#resume")
    k.wait_print_state("printing")
    wait_for(lambda: "Printing" in text(browser, "current-job")
             and text(browser, "printer-state") == "Printing",
             what="page shows printing again")
    assert "waits until the build plate" not in text(browser, "queue-list")
    # progress, time left and the preview of the running job
    wait_for(lambda: "left" in text(browser, "current-job"),
             what="time left")
    assert browser.execute_script(
        "const i = document.querySelector('#current-job img.preview');"
        "return i && i.complete && i.naturalWidth") == 96
    # the camera plays through the module
    wait_for(lambda: browser.execute_script(
        "const i = document.getElementById('camera-image');"
        "return !document.getElementById('camera').hidden && "
        "i.naturalWidth"), what="camera image")
    assert browser.execute_script(
        "return document.getElementById('camera-image').naturalWidth") == 640
    time.sleep(0.5)   # let the progress bar settle for the picture
    shot = screenshot(browser, "web_page_desktop.png")
    assert os.path.getsize(shot) > 10000
    # a phone-sized screen
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 1500, "deviceScaleFactor": 2,
        "mobile": True})
    browser.get(base + "/printers")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page on a phone")
    wait_for(lambda: browser.execute_script(
        "return document.getElementById('camera-image').naturalWidth"),
        what="camera on a phone")
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= 390")
    screenshot(browser, "web_page_phone.png")
    # abort asks twice too
    click(browser, "#abort")
    click(browser, "#abort")
    k.wait_print_state("cancelled", "standby")
    wait_for(lambda: [j for j in jobs(base) if j["uuid"] == benchy
                      and j["status"] == "aborted_wait_cleanup"],
             what="aborted")
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_page_paths_and_errors(klippy_factory, browser):
    k = klippy_factory(module_options={"name": "paths"})
    base = k.base_url()
    html = {"Accept": "text/html,application/xhtml+xml"}
    for path in ("/print_jobs", "/printers", "/print_jobs/", "/"):
        r = httpc.request(base, "GET", path, headers=html)
        assert r.status == 200, (path, r)
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert b"cluster-api/v1" in r.body
    # nothing the page needs comes from elsewhere: it works offline
    r = httpc.request(base, "GET", "/print_jobs", headers=html)
    assert b"http://" not in r.body and b"https://" not in r.body
    # scripts asking the browser paths get JSON
    assert httpc.get_json(base, "/printers")[0]["friendly_name"] == "paths"
    assert httpc.get_json(base, "/print_jobs") == []
    # the plate-cleared endpoint: through the reactor, errors as JSON
    uuid = httpc.get_json(base, "/cluster-api/v1/printers")[0]["uuid"]
    r = httpc.request(base, "POST", "/cluster-api/v1/printers/%s/action/"
                      "plate_cleared" % (uuid,), json_body={})
    assert r.status == 200, r
    r = httpc.request(base, "POST", "/cluster-api/v1/printers/0000/action/"
                      "plate_cleared", json_body={})
    assert r.status == 404
    # a printer that is not reachable: the page says so and keeps trying
    browser.get(base + "/printers")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page loaded")
    assert browser.find_element("id", "camera").is_displayed() is False
    k.stop()
    wait_for(lambda: browser.find_element("id", "offline").is_displayed(),
             what="offline banner")
    assert shutil.which("chromium") or os.path.exists(CHROMIUM)


def test_page_shows_a_held_job_and_prints_it_anyway(klippy_factory,
                                                     browser):
    import cura_client
    import gcode_samples
    k = klippy_factory(module_options={
        "material_extruder": gcode_samples.ULTIMAKER_PLA_BLACK})
    base = k.base_url()
    for name in ("ultimaker_pla_black", "generic_petg"):
        name += ".xml.fdm_material"
        body, headers = httpc.multipart({}, {"file": (name, (
            cura_client.DEFAULT_CURA_ROOT / "usr/share/cura/resources/"
            "materials" / name).read_bytes())})
        assert httpc.request(base, "POST", "/cluster-api/v1/materials/",
                             body, headers).status == 200
    upload(base, "lid.gcode", gcode_samples.cura_gcode(
        print_time=60, count=20, material=gcode_samples.GENERIC_PETG),
        "alice")
    browser.get(base + "/print_jobs")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page loaded")
    wait_for(lambda: browser.find_elements("id", "changes"),
             what="the held job's change")
    assert texts(browser, "#current-job .name") == ["lid"]
    assert text(browser, "changes") \
        == "Waits for PETG in extruder 1 (Black PLA is loaded)"
    assert k.query("print_stats")["print_stats"]["state"] == "standby"
    click(browser, "#override")
    wait_for(lambda: k.query("print_stats")["print_stats"]["filename"]
             == "lid.gcode", what="lid printing")
    wait_for(lambda: not browser.find_elements("id", "changes"),
             what="the change gone")


def test_page_shows_names_as_given_and_the_definition_folders(
        klippy_factory, browser):
    k = klippy_factory(module_options={"name": "names"})
    base = k.base_url()
    # a print that ends first (on the printer card), then a queue
    upload(base, "Würfel – 测试 ✓.gcode", gcode(60, 20, False), "ana")
    wait_for(lambda: [j for j in jobs(base) if j["status"] == "wait_cleanup"],
             what="first finished")
    queued = ["שלום עולם 👨\u200d👩\u200d👧", "cube?", "cube*",
              "<i>tag<i> & co"]
    for name in queued:
        upload(base, name + ".gcode", gcode(60, 20, False), "ana")
    browser.get(base + "/print_jobs")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page loaded")
    wait_for(lambda: texts(browser, "#queue-list .name") == queued,
             what="queue names")
    assert texts(browser, "#current-job .name") == ["Würfel – 测试 ✓"]
    assert not browser.find_elements("css selector", "#queue-list i")
    # the how-to names the folder Cura reads definitions from, per system
    click(browser, "#definition summary")
    howto = text(browser, "definition")
    for line in ("Windows: %APPDATA%\\cura\\<version>",
                 "macOS: ~/Library/Application Support/cura/<version>",
                 "Linux: ~/.local/share/cura/<version>"):
        assert line in howto, howto
    assert "~/.config/cura/<version>, which is not it" in howto


class GroupServer:
    """The page's server for a group without real members: the page's
    bytes as the module served them, fixed API replies in the module's
    shapes, previews and cameras as pictures; records what the page asks
    and sends."""

    def __init__(self, page, printers, print_jobs, history):
        import http.server
        import json
        import threading
        self.requests = []          # (method, path, JSON body or None)
        routes = {"/cluster-api/v1/printers": printers,
                  "/cluster-api/v1/print_jobs": print_jobs,
                  "/cluster-api/v1/print_jobs/history": history}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, ctype):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                server.requests.append(("GET", self.path, None))
                if path in ("/print_jobs", "/printers"):
                    self.reply(200, page, "text/html; charset=utf-8")
                elif path in routes:
                    self.reply(200, json.dumps(routes[path]).encode(),
                               "application/json")
                elif path.endswith("/preview_image"):
                    self.reply(200, picture(), "image/png")
                elif path.endswith("/camera") and any(
                        p["camera"] and path in (
                            "/printers/camera",
                            "/cluster-api/v1/printers/%s/camera"
                            % (p["uuid"],)) for p in printers):
                    # (a still picture: an <img> shows it as a stream's)
                    self.reply(200, picture(320, 180), "image/png")
                else:
                    self.reply(404, b'{"message": "not here"}',
                               "application/json")

            def do_action(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                server.requests.append((self.command, self.path,
                                        json.loads(body) if body else None))
                self.reply(200, b"{}", "application/json")
            do_POST = do_PUT = do_DELETE = do_action

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                     Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       daemon=True)
        self.thread.start()

    def url(self):
        return "http://127.0.0.1:%d" % (self.httpd.server_address[1],)

    def sent(self):
        return [r for r in self.requests if r[0] != "GET"]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def group_replies(host):
    """A group of three in the shapes the module lists it: this printer
    (its card as the module made it) idle with a finished job waiting for
    its plate, "voron" printing, "ender" unreachable; a queue with one
    job for ender and one for any printer."""
    import uuid
    host = dict(host, status="idle", plate_clear=False, camera=True)
    member = {k: v for k, v in host.items() if k != "machine_definition"}
    voron = dict(member, friendly_name="voron", unique_name="voron",
                 uuid=str(uuid.uuid4()), status="printing",
                 klipper_state="ready", state_message="Printer is ready",
                 extruders=[{"temperature": 215.2, "target": 215.}],
                 heater_bed={"temperature": 60.1, "target": 60.},
                 plate_clear=True, progress=0.42, camera=True,
                 group_member=True)
    ender = dict(member, friendly_name="ender", unique_name="ender",
                 uuid=str(uuid.uuid4()), status="unreachable",
                 klipper_state="unreachable",
                 state_message="http://127.0.0.1:7126: connection refused",
                 extruders=[], heater_bed=None, plate_clear=True,
                 progress=None, camera=False, group_member=True)

    def job(name, status, printer=None, target=None, **fields):
        d = {"uuid": str(uuid.uuid4()), "name": name, "owner": "alice",
             "created_at": "2026-12-08T08:00:00Z", "status": status,
             "started": status != "queued", "force": False,
             "machine_variant": host["machine_variant"],
             "time_total": 3600, "time_elapsed": 0,
             "configuration": host["configuration"],
             "constraints": {"require_printer_name": target} if target
             else [],
             "configuration_changes_required": [],
             "impediments_to_printing": [], "build_plate": {"type": "glass"},
             "compatible_machine_families": [host["machine_variant"]],
             "filename": name + ".gcode", "source": "cura",
             "has_preview": True, "finished_at": None}
        if printer:
            d["printer_uuid"] = d["assigned_to"] = printer["uuid"]
        d.update(fields)
        return d
    print_jobs = [
        job("cube", "wait_cleanup", host, time_elapsed=3500,
            finished_at="2026-12-08T09:00:00Z"),
        job("gear", "printing", voron, time_elapsed=1500),
        job("bracket", "queued", target="ender", has_preview=False),
        job("clip", "queued", time_total=600)]
    history = [job("hook", "finished", printed_on_uuid=voron["uuid"],
                   time_elapsed=1200, finished_at="2026-12-08T07:00:00Z")]
    return [host, voron, ender], print_jobs, history


def test_page_shows_every_printer_of_a_group(klippy_factory, browser):
    k = klippy_factory(module_options={"name": "workshop"})
    base = k.base_url()
    # the page as the module serves it; its JSON a group's
    r = httpc.request(base, "GET", "/print_jobs",
                      headers={"Accept": "text/html"})
    assert r.status == 200, r
    printers, print_jobs, history = group_replies(
        httpc.get_json(base, "/cluster-api/v1/printers")[0])
    host, voron, ender = printers
    server = GroupServer(r.body, printers, print_jobs, history)
    try:
        run_group_scenario(browser, server, host, voron, ender, print_jobs)
    finally:
        server.close()


def panel(printer, css=""):
    """The selector of (css in) a member's section."""
    return 'section.member[data-uuid="%s"] %s' % (printer["uuid"], css)


def run_group_scenario(browser, server, host, voron, ender, print_jobs):
    cube, gear, bracket, clip = print_jobs
    browser.get(server.url() + "/print_jobs")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page loaded")
    # this printer as on its own, then one section per member, in order
    assert text(browser, "printer-name") == "workshop"
    assert texts(browser, "section.member h2") == ["voron", "ender"]
    assert texts(browser, "#current-job .name") == ["cube"]
    assert "Finished" in text(browser, "current-job")
    # voron prints gear: its progress, its buttons, no plate button
    gear_box = texts(browser, panel(voron, ".member-job"))[0]
    assert "gear" in gear_box and "Printing" in gear_box
    assert "42 %" in gear_box and "left" in gear_box
    assert texts(browser, panel(voron, ".pill")) == ["Printing"]
    assert "215°" in texts(browser, panel(voron, ".temps"))[0]
    assert texts(browser, panel(voron, "button")) == [
        "Pause", "Abort", "Pause camera"]
    # ender is unreachable, says why, has no job and no camera
    assert texts(browser, panel(ender, ".pill")) == ["Unreachable"]
    assert texts(browser, panel(ender, ".msg")) == [
        "http://127.0.0.1:7126: connection refused"]
    assert texts(browser, panel(ender, ".member-job")) == [
        "No job on the printer."]
    assert not browser.find_element(
        "css selector", panel(ender, ".member-camera")).is_displayed()
    # the plate button only where a job waits for its plate: this printer
    assert len(browser.find_elements("css selector", ".plate-cleared")) == 1
    assert browser.find_elements("id", "plate-cleared")
    # the queue says which printer each job waits for; no "plate" notice
    # (another printer may take the next job)
    assert texts(browser, "#queue-list .name") == ["bracket", "clip"]
    assert texts(browser, "#queue-list .target") == [
        "Printer: ender", "Printer: First available"]
    assert "waits until the build plate" not in text(browser, "queue-list")
    # the history says where a job printed
    assert "on voron" in text(browser, "history-list")
    # each camera through its own URL: this printer's as always, voron's
    # through its relay; none for ender
    camera_of = {"host": "#camera-image",
                 "voron": panel(voron, "img.stream")}
    for what, css in camera_of.items():
        wait_for(lambda: browser.execute_script(
            "const i = document.querySelector(arguments[0]);"
            "return i.complete && i.naturalWidth", css) == 320,
            what="%s camera" % (what,))
    asked = [path for method, path, body in server.requests]
    assert any(p.startswith("/printers/camera?action=stream&")
               for p in asked)
    assert any(p.startswith("/cluster-api/v1/printers/%s/camera?action="
                            "stream&" % (voron["uuid"],)) for p in asked)
    assert not any(ender["uuid"] in p for p in asked)
    # one id per element, whatever the number of printers
    assert browser.execute_script(
        "const ids = [...document.querySelectorAll('[id]')].map(e => e.id);"
        "return ids.length === new Set(ids).size")
    # the whole page in the picture
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 1100, "height": 2400, "deviceScaleFactor": 1,
        "mobile": False})
    time.sleep(0.3)
    shot = screenshot(browser, "web_page_group_desktop.png")
    assert os.path.getsize(shot) > 10000

    # this printer's plate button: to this printer's uuid
    click(browser, "#plate-cleared")
    wait_for(lambda: server.sent(), what="plate cleared sent")
    assert server.sent() == [
        ("POST", "/cluster-api/v1/printers/%s/action/plate_cleared"
         % (host["uuid"],), {})]
    # voron's abort asks twice, then acts on voron's job
    abort = panel(voron, "button.abort")
    click(browser, abort)
    assert texts(browser, abort) == ["Sure? Abort"]
    assert len(server.sent()) == 1                  # not yet
    click(browser, abort)
    wait_for(lambda: len(server.sent()) == 2, what="abort sent")
    assert server.sent()[1] == (
        "PUT", "/cluster-api/v1/print_jobs/%s/action" % (gear["uuid"],),
        {"action": "abort"})

    # a phone-sized screen: nothing wider than it
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 2400, "deviceScaleFactor": 2,
        "mobile": True})
    browser.get(server.url() + "/printers")
    wait_for(lambda: browser.execute_script(
        "return document.body.dataset.loaded"), what="page on a phone")
    wait_for(lambda: browser.execute_script(
        "const i = document.querySelector(arguments[0]);"
        "return i.complete && i.naturalWidth", camera_of["voron"]),
        what="voron's camera on a phone")
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= 390")
    screenshot(browser, "web_page_group_phone.png")
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
