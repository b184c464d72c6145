"""Cura >= 5.11's pairing as the tests use it: the Digest Authorization
header Cura signs its requests with (cura-protocol 2.3), a paired Cura, and
posting a material profile, signed or not."""
import hashlib
import uuid

import httpc
from httpc import JOBS

GCODE = b";TIME:60\nG1 X1\nG1 X2\n"


def upload(base, filename="part.gcode", headers=None):
    """A small G-code upload with the given headers (credentials)."""
    body, h = httpc.multipart({"owner": "alice"},
                              {"file": (filename, GCODE)})
    h.update(headers or {})
    return httpc.request(base, "POST", JOBS + "/", body=body, headers=h)


def sign(method, uri, key_id, key, nonce="c0ffee", nc=1, cnonce=None,
         algorithm="SHA-256"):
    """The Authorization header Cura >= 5.11 sends (cura-protocol 2.3)."""
    def h(s):
        return hashlib.sha256(s.encode()).hexdigest()
    cnonce = cnonce or uuid.uuid4().hex[:16]
    ha1 = h("%s:Jedi-API:%s" % (key_id, key))
    ha2 = h("%s:%s" % (method, uri))
    response = h("%s:%s:%08x:%s:auth:%s" % (ha1, nonce, nc, cnonce, ha2))
    return ('Digest username="%s", realm="Jedi-API", nonce="%s", uri="%s", '
            'nc=%08x, cnonce="%s", qop=auth, response="%s", algorithm="%s"'
            % (key_id, nonce, uri, nc, cnonce, response, algorithm))


MATERIALS = "/cluster-api/v1/materials"


def post_material(base, name, authorization=None):
    xml = ('<fdmmaterial xmlns="http://www.ultimaker.com/material">'
           '<metadata><name><brand>B</brand><material>PLA</material>'
           '<color>%s</color></name><GUID>guid-%s</GUID><version>1</version>'
           '</metadata></fdmmaterial>' % (name, name)).encode()
    body, headers = httpc.multipart({}, {"file": (
        name + ".xml.fdm_material", xml)})
    if authorization:
        headers["Authorization"] = authorization
    return httpc.request(base, "POST", MATERIALS + "/", body, headers)


class PairedCura:
    """What Cura >= 5.11 does: ask for credentials, then sign requests."""
    def __init__(self, base, user="user@laptop"):
        self.base = base
        r = httpc.request(base, "POST", "/api/v1/auth/request", json_body={
            "application": "UltiMaker Cura", "user": user})
        assert r.status == 200, r
        self.id, self.key = r.json()["id"], r.json()["key"]
        self.nonce = uuid.uuid4().hex
        self.nc = 0

    def auth(self, method, uri):
        self.nc += 1
        return sign(method, uri, self.id, self.key, self.nonce, self.nc)

    def request(self, method, uri, **kw):
        headers = kw.pop("headers", {})
        headers["Authorization"] = self.auth(method, uri)
        return httpc.request(self.base, method, uri, headers=headers, **kw)

    def upload(self, filename="part.gcode"):
        uri = JOBS + "/"
        return upload(self.base, filename, headers={
            "Authorization": self.auth("POST", uri)})

    def check(self):
        return httpc.get_json(self.base, "/api/v1/auth/check/" + self.id)[
            "message"]
