"""Who may do what: trusted_clients, browsers on other sites, monitor-only
mode and the pairing of Cura >= 5.11 (Digest, cura-protocol.md 2.3)."""
import os
import time
import uuid

import pytest

import httpc
from httpc import JOBS, jobs, wait_for
from hostile import assert_config_errors
import kapi
from pairing import MATERIALS, PairedCura, post_material, sign, upload


def cura_files(k):
    return sorted(os.listdir(k.gcodes_dir))


def is_json_error(r, status):
    return (r.status == status
            and r.headers["Content-Type"] == "application/json"
            and r.json()["status"] == status and r.json()["message"])


def test_untrusted_clients_get_403(klippy_factory):
    k = klippy_factory(module_options={"trusted_clients": "10.0.0.0/8"})
    base = k.base_url()
    for method, path in [("GET", "/cluster-api/v1/printers"),
                         ("GET", "/api/v1/system"),
                         ("POST", "/api/v1/auth/request"),
                         ("DELETE", JOBS + "/" + "a" * 8)]:
        r = httpc.request(base, method, path)
        assert is_json_error(r, 403), (method, path, r)
        assert "trusted_clients" in r.json()["message"]
        assert r.headers.get("Connection") == "close"
    r = upload(base)
    assert is_json_error(r, 403)
    assert cura_files(k) == []
    # behind the local nginx, X-Real-IP names the client
    r = httpc.request(base, "GET", "/api/v1/system",
                      headers={"X-Real-IP": "10.9.8.7"})
    assert r.status == 200
    r = upload(base, headers={"X-Real-IP": "10.9.8.7"})
    assert r.status == 200
    assert [j["name"] for j in jobs_as(base, "10.1.1.1")] == ["part"]
    assert k.info()["state"] == "ready"


def jobs_as(base, ip):
    r = httpc.request(base, "GET", JOBS, headers={"X-Real-IP": ip})
    assert r.status == 200, r
    return r.json()


def test_default_trusts_loopback_and_lan_only(klippy):
    base = klippy.base_url()
    for ip, status in [("192.168.1.20", 200), ("10.0.0.1", 200),
                       ("fe80::1", 200), ("fd12::7", 200),
                       ("8.8.8.8", 403), ("2001:db8::1", 403),
                       ("100.64.1.1", 403)]:
        r = httpc.request(base, "GET", "/cluster-api/v1/printers",
                          headers={"X-Real-IP": ip})
        assert r.status == status, (ip, r)


def test_ipv4_mapped_peers(klippy_factory):
    # A dual-stack socket sees IPv4 clients as ::ffff:a.b.c.d; the check
    # maps them back.  Bound to the mapped loopback address only.
    k = klippy_factory(module_options={"address": "::ffff:127.0.0.1",
                                       "trusted_clients": "127.0.0.0/8"})
    r = httpc.request("http://127.0.0.1:%d" % (k.cura_port(),), "GET",
                      "/cluster-api/v1/printers")
    assert r.status == 200, r
    k2 = klippy_factory(module_options={"address": "::1",
                                        "trusted_clients": "127.0.0.0/8"})
    r = httpc.request("http://[::1]:%d" % (k2.cura_port(),), "GET",
                      "/cluster-api/v1/printers")
    assert is_json_error(r, 403)
    assert "::1 is not in trusted_clients" in r.json()["message"]


def test_bad_access_options_are_config_errors(klippy_factory):
    assert_config_errors(klippy_factory, [
        ({"trusted_clients": "10.0.0.0/33"}, "10.0.0.0/33"),
        ({"trusted_clients": "lan"}, "trusted_clients"),
        ({"trusted_clients": ","}, "trusted_clients"),
        ({"allow_control": "maybe"}, "allow_control"),
        ({"require_pairing": "2"}, "require_pairing")])


def test_browser_on_another_site_cannot_change_anything(klippy):
    base = klippy.base_url()
    port = klippy.cura_port()
    for headers in [{"Origin": "http://evil.example.com"},
                    {"Origin": "null"},
                    {"Origin": "http://[broken"},
                    {"Referer": "http://192.168.1.66/attack.html"},
                    # DNS rebinding: same origin, public name
                    {"Host": "rebind.attacker.net",
                     "Origin": "http://rebind.attacker.net"}]:
        r = upload(base, headers=headers)
        assert is_json_error(r, 403), (headers, r)
        r = httpc.request(base, "PUT", JOBS + "/%s/action" % (uuid.uuid4(),),
                          json_body={"action": "abort"}, headers=headers)
        assert is_json_error(r, 403), (headers, r)
        r = httpc.request(base, "POST", "/api/v1/auth/request",
                          json_body={}, headers=headers)
        assert is_json_error(r, 403), (headers, r)
        # reading is harmless, and no CORS header lets the page read it
        r = httpc.request(base, "GET", JOBS, headers=headers)
        assert r.status == 200
        assert not [h for h in r.headers if h.lower().startswith(
            "access-control")]
    assert cura_files(klippy) == [] and jobs(base) == []
    # a refused request does not upset the keep-alive connection
    conn = httpc.connect(base)
    for _ in range(3):
        r = httpc.request(conn, "PUT", JOBS + "/%s/action" % (uuid.uuid4(),),
                          json_body={"action": "abort"},
                          headers={"Origin": "http://evil.example.com"})
        assert is_json_error(r, 403)
        assert httpc.request(conn, "GET", JOBS).status == 200
    conn.close()
    # a CORS preflight gets no permission
    r = httpc.request(base, "OPTIONS", JOBS + "/", headers={
        "Origin": "http://evil.example.com",
        "Access-Control-Request-Method": "POST"})
    assert r.status >= 400 and "Access-Control-Allow-Origin" not in r.headers
    # the printer's own page (same host, any port) and local names work
    for headers in [{"Origin": "http://127.0.0.1:%d" % (port,)},
                    {"Referer": "http://127.0.0.1/cura/"},
                    {"Host": "voron.local", "Origin": "http://voron.local"},
                    {"Host": "voron", "Referer": "http://voron:8080/x"}]:
        r = upload(base, headers=headers)
        assert r.status == 200, (headers, r)
    assert len(jobs(base)) == 4


def test_monitor_only(klippy_factory):
    k = klippy_factory(module_options={"allow_control": "False"})
    base = k.base_url()
    job = uuid.uuid4()
    fname = k.write_gcode("console.gcode", moves=400, sleep_every=10)
    k.gcode("SDCARD_PRINT_FILE FILENAME=%s" % (fname,))
    r = upload(base)
    assert is_json_error(r, 403) and "allow_control" in r.json()["message"]
    printing = None
    for _ in range(100):
        js = jobs(base)
        if js and js[0]["status"] == "printing":
            printing = js[0]["uuid"]
            break
        time.sleep(0.1)
    assert printing
    for method, path, body in [
            ("PUT", JOBS + "/%s/action" % (printing,), {"action": "abort"}),
            ("PUT", JOBS + "/%s/action" % (printing,), {"action": "pause"}),
            ("POST", JOBS + "/%s/action/move" % (job,), {"to_position": 0}),
            ("PUT", JOBS + "/%s" % (job,), {"force": True}),
            ("DELETE", JOBS + "/%s" % (printing,), None)]:
        r = httpc.request(base, method, path, json_body=body)
        assert is_json_error(r, 403), (method, path, r)
    body, h = httpc.multipart({}, {"file": ("x.xml.fdm_material", b"<x/>")})
    r = httpc.request(base, "POST", "/cluster-api/v1/materials/", body=body,
                      headers=h)
    assert is_json_error(r, 403)
    # reads still work, and the print goes on
    assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["status"] \
        == "printing"
    assert jobs(base)[0]["status"] == "printing"
    assert httpc.get_json(base, "/api/v1/system")["name"]
    assert cura_files(k) == ["console.gcode"]
    k.gcode("CANCEL_PRINT")


def wait_log(k, text):
    # klippy.log is written by a background thread
    deadline = time.monotonic() + 5.
    while text not in k.log_text():
        assert time.monotonic() < deadline, "%r not in klippy.log" % (text,)
        time.sleep(0.05)


def test_pairing(klippy_factory):
    k = klippy_factory(module_options={"require_pairing": "True"})
    base = k.base_url()
    # Cura before 5.11 sends no credentials: it may watch, not change
    r = upload(base)
    assert is_json_error(r, 403) and "CURA_PAIRING" in r.json()["message"]
    assert httpc.get_json(base, "/cluster-api/v1/printers")[0]["status"] \
        == "idle"
    # other credentials than Cura's Digest do not close reading
    r = httpc.request(base, "GET", "/cluster-api/v1/printers",
                      headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status == 200
    cura = PairedCura(base)
    assert cura.check() == "unauthorized"
    wait_log(k, "CURA_ALLOW ID=%s" % (cura.id,))
    r = cura.upload()
    assert is_json_error(r, 403) and "CURA_ALLOW" in r.json()["message"]
    # a signed read from a Cura not allowed yet: 401 and a challenge, so
    # Cura 5 shows its "authorization required" message and asks again
    for path in ("/api/v1/auth/verify", "/cluster-api/v1/printers"):
        r = cura.request("GET", path)
        assert is_json_error(r, 401) and "CURA_ALLOW ID=%s" % (
            cura.id,) in r.json()["message"]
        assert r.headers["WWW-Authenticate"].startswith(
            'Digest realm="Jedi-API", nonce="')
    # ... and asking again gives the same waiting request
    again = PairedCura(base)
    assert (again.id, again.key) == (cura.id, cura.key)
    # the material list stays readable to it (Cura reads it when it
    # connects, to send what is missing); what it sends is kept, signed
    # or sent before it had credentials, until CURA_ALLOW
    assert cura.request("GET", MATERIALS).status == 200
    r = post_material(base, "a", cura.auth("POST", MATERIALS + "/"))
    assert r.status == 200 and "kept" in r.json()["message"], r
    assert post_material(base, "b").status == 200
    assert httpc.get_json(base, MATERIALS) == []
    k.gcode("CURA_PAIRING")
    wait_log(k, "ID=%s UltiMaker Cura, user@laptop" % (cura.id,))
    # another Cura asks too: CURA_ALLOW needs the ID now
    other = PairedCura(base, user="bob@desk")
    assert other.id != cura.id
    with pytest.raises(kapi.KlippyError):
        k.gcode("CURA_ALLOW")
    k.gcode("CURA_ALLOW ID=%s" % (cura.id,))
    assert cura.check() == "authorized"
    wait_for(lambda: sorted(m["guid"] for m in httpc.get_json(
        base, MATERIALS)) == ["guid-a", "guid-b"], what="kept profiles")
    # Cura dropped its credentials at the last 401: asking now (before
    # it signed with them again) gives back the ones just allowed
    assert PairedCura(base).id == cura.id
    assert other.check() == "unauthorized"
    assert cura.request("GET", "/api/v1/auth/verify").status == 200
    r = cura.upload()
    assert r.status == 200, r
    job = r.json()["uuid"]
    assert other.upload().status == 403
    # the signature covers method and path; a captured header cannot be
    # sent again (with another body), nor used for another request
    header = cura.auth("PUT", JOBS + "/%s" % (job,))
    r = httpc.request(base, "PUT", JOBS + "/%s" % (job,),
                      json_body={"force": True},
                      headers={"Authorization": header})
    assert r.status == 200, r
    r = httpc.request(base, "PUT", JOBS + "/%s" % (job,),
                      json_body={"force": False},
                      headers={"Authorization": header})
    assert is_json_error(r, 401)
    challenge = r.headers["WWW-Authenticate"]
    assert 'realm="Jedi-API"' in challenge and "SHA-256" in challenge
    r = httpc.request(base, "DELETE", JOBS + "/%s" % (job,),
                      headers={"Authorization": header})
    assert is_json_error(r, 401)
    # Cura adopts the nonce of a 401 and counts from 1 again
    cura.nonce = challenge.split('nonce="', 1)[1].split('"', 1)[0]
    cura.nc = 0
    r = cura.request("POST", JOBS + "/%s/action/move" % (job,),
                     json_body={"to_position": 0, "list": "queued"})
    assert r.status in (200, 409), r
    # wrong key
    r = httpc.request(base, "DELETE", JOBS + "/%s" % (job,), headers={
        "Authorization": sign("DELETE", JOBS + "/%s" % (job,), cura.id,
                              "0" * 32, nc=77)})
    assert is_json_error(r, 401)
    # allowed clients survive a restart
    k.restart()
    base = k.base_url()
    cura.base = other.base = base
    assert cura.check() == "authorized"
    r = cura.upload("second.gcode")
    assert r.status == 200, r
    k.gcode("CURA_DENY ID=%s" % (cura.id,))
    assert cura.check() == "unknown"
    assert is_json_error(cura.upload("third.gcode"), 401)
    # CURA_ALLOW without ID takes the only request waiting
    k.gcode("CURA_ALLOW")
    assert other.check() == "authorized"
    assert other.upload("fourth.gcode").status == 200
    assert {"second", "fourth"} <= {j["name"] for j in jobs(base)}
    with open(os.path.join(k.data_dir, "auth.json")) as f:
        assert cura.id not in f.read()


def test_pairing_off_accepts_any_digest(klippy):
    # without require_pairing a Cura >= 5.11 is never refused, even with
    # credentials the printer has forgotten
    base = klippy.base_url()
    r = upload(base, headers={"Authorization": sign(
        "POST", JOBS + "/", "forgotten", "key")})
    assert r.status == 200
    cura = PairedCura(base)
    assert cura.check() == "authorized"
    assert cura.upload("b.gcode").status == 200
    assert httpc.get_json(base, "/api/v1/auth/check/nobody") == {
        "message": "unknown"}


