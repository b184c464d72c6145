"""Access on its own: trusted_clients parsed, the client's address behind
a local proxy, local host names, Cura >= 5.11's Digest credentials checked
and kept, waiting requests bounded and given back to the Cura that asked."""
import ipaddress
import os
import time

import pytest

from httpc import JOBS
from pairing import sign

from _cura_connection.access import (AuthStore, DEFAULT_TRUSTED_CLIENTS,
                                     client_ip, host_name, is_local_name,
                                     parse_trusted_clients)
from _cura_connection.errors import CuraError, Unauthenticated, http_error


def test_trusted_clients_parsing():
    nets = parse_trusted_clients(DEFAULT_TRUSTED_CLIENTS)
    assert len(nets) == 8
    trusted = [client_ip(a) for a in (
        "127.0.0.1", "::1", "10.1.2.3", "172.31.0.1", "192.168.178.20",
        "169.254.1.1", "fd00::5", "fe80::1%eth0", "::ffff:192.168.1.5")]
    for ip in trusted:
        assert any(ip in n for n in nets), ip
    for a in ("8.8.8.8", "172.32.0.1", "2001:db8::1", "::ffff:8.8.8.8",
              "100.64.0.1"):
        ip = client_ip(a)
        assert not any(ip in n for n in nets), a
    # one address, newline and comma lists
    assert parse_trusted_clients("192.168.1.5\n 10.0.0.0/8,::1") == [
        ipaddress.ip_network("192.168.1.5/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128")]
    for bad in ("banana", "10.0.0.0/33", "300.1.1.1"):
        with pytest.raises(ValueError):
            parse_trusted_clients(bad)


def test_client_ip_behind_local_proxy():
    # only a loopback peer (nginx from install.sh) may name another client
    assert str(client_ip("127.0.0.1", "192.168.1.9")) == "192.168.1.9"
    assert str(client_ip("::ffff:127.0.0.1", "8.8.8.8")) == "8.8.8.8"
    assert str(client_ip("192.168.1.9", "127.0.0.1")) == "192.168.1.9"
    assert client_ip("127.0.0.1", "not an ip") is None
    assert client_ip("garbage") is None


def test_local_names():
    for host in ("192.168.1.5", "::1", "voron", "voron.local", "voron.lan",
                 "printer.fritz.box", "x.home.arpa"):
        assert is_local_name(host), host
    for host in ("evil.example.com", "", "attacker.net", "a.b.c.d.e"):
        assert not is_local_name(host), host
    assert host_name("[::1]:8080") == "::1"
    assert host_name("Voron.Local:80") == "voron.local"


def test_digest_verify_unit(tmp_path):
    auth = AuthStore(str(tmp_path / "auth.json"))
    key_id, key = auth.request("UltiMaker Cura", "user@pc\x1b[31m", "::1")
    assert auth.listing()[0]["user"] == "user@pc?[31m"
    auth.allow(key_id)
    uri = JOBS + "/"
    assert auth.verify("POST", uri, sign("POST", uri, key_id, key)) == key_id
    # out of order within the window is fine, each (nonce, nc) once
    assert auth.verify("GET", "/a", sign("GET", "/a", key_id, key, nc=5))
    assert auth.verify("GET", "/a", sign("GET", "/a", key_id, key, nc=3))
    for bad, status in [
            (sign("GET", "/a", key_id, key, nc=3), 401),      # replay
            (sign("GET", "/b", key_id, key, nc=9), 401),      # other uri
            (sign("POST", "/a", key_id, key, nc=9), 401),     # other method
            (sign("GET", "/a", key_id, "wrong", nc=9), 401),
            (sign("GET", "/a", "nobody", key, nc=9), 401),
            (sign("GET", "/a", key_id, key, nc=10, algorithm="MD5"), 401),
            ("Basic dXNlcjpwYXNz", 403), (None, 403), ("Digest", 403),
            ("Digest ", 401), ("Digest nc=zz, username=\"\"\"", 401)]:
        with pytest.raises(CuraError) as e:
            auth.verify("GET", "/a", bad)
        # the HTTP form of the error is what the client gets
        reply = http_error(e.value)
        assert reply.status == status, bad
        if status == 401:
            assert dict(reply.headers)["WWW-Authenticate"].startswith(
                'Digest realm="Jedi-API", nonce="')
    # far behind the highest count: refused, even if never seen
    auth.verify("GET", "/a", sign("GET", "/a", key_id, key, nc=500))
    with pytest.raises(Unauthenticated):
        auth.verify("GET", "/a", sign("GET", "/a", key_id, key, nc=400))
    # persisted, private
    auth.save()
    assert oct(os.stat(str(tmp_path / "auth.json")).st_mode & 0o777) \
        == "0o600"
    again = AuthStore(str(tmp_path / "auth.json"))
    assert again.status(key_id) == "authorized"
    # a damaged file is kept aside
    (tmp_path / "auth.json").write_text("{broken")
    assert AuthStore(str(tmp_path / "auth.json")).listing() == []
    assert (tmp_path / "auth.json.bad").exists()


def test_pending_requests_are_bounded(tmp_path):
    auth = AuthStore(str(tmp_path / "auth.json"))
    ids = [auth.request("Cura", "u%d" % i, "::1")[0] for i in range(40)]
    assert len(auth.listing()) == AuthStore.MAX_PENDING
    assert auth.status(ids[-1]) == "unauthorized"
    assert auth.status(ids[0]) == "unknown"


def test_waiting_cura_gets_its_request_back(tmp_path, monkeypatch):
    # Cura 5 drops its credentials at every 401 and asks again: the same
    # waiting request comes back, also when it was allowed meanwhile
    # (until it signs with it), never another client's
    auth = AuthStore(str(tmp_path / "auth.json"))
    key_id, key = auth.request("UltiMaker Cura", "u@pc", "10.0.0.2")
    assert auth.find_pending("UltiMaker Cura", "u@pc", "10.0.0.2") \
        == (key_id, key)
    for other in (("UltiMaker Cura", "u@pc", "10.0.0.3"),
                  ("UltiMaker Cura", "v@pc", "10.0.0.2"),
                  ("Other", "u@pc", "10.0.0.2")):
        assert auth.find_pending(*other) is None
    auth.allow(key_id)
    assert auth.find_pending("UltiMaker Cura", "u@pc", "10.0.0.2") is None
    auth.refuse_waiting(key_id)   # its last read was refused (401)
    assert auth.find_pending("UltiMaker Cura", "u@pc", "10.0.0.2") \
        == (key_id, key)
    # once it signs with it again, nobody gets it back
    uri = "/cluster-api/v1/printers"
    assert auth.identify("GET", uri, sign("GET", uri, key_id, key),
                         once=False) == (key_id, True)
    assert auth.find_pending("UltiMaker Cura", "u@pc", "10.0.0.2") is None
    # nor after the window
    auth.refuse_waiting(key_id)
    now = time.monotonic()
    monkeypatch.setattr(time, "monotonic",
                        lambda: now + AuthStore.REASK_WINDOW + 1)
    assert auth.find_pending("UltiMaker Cura", "u@pc", "10.0.0.2") is None
