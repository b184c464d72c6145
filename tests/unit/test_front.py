"""The front process's request heads: which it answers itself, where a head
ends and which connections stay open (as http.server does), which
requests are uploads it receives."""
import pytest

from _cura_connection.frames import HEAD_END
from _cura_connection.front import FrontRequest, UPLOAD_LINE


@pytest.mark.parametrize("head,route", [
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x\r\n\r\n",
     "get_printers"),
    (b"GET /cluster-api/v1/print_jobs/ HTTP/1.1\r\n\r\n", "get_print_jobs"),
    (b"GET /cluster-api/v1/print_jobs?a=1 HTTP/1.0\n\n", "get_print_jobs"),
    (b"GET /cluster-api/v1/print_jobs/history HTTP/1.1\r\n"
     b"Content-Length: 0\r\n\r\n", "get_history"),
    (b"GET /api/v1/system HTTP/1.1\r\n\r\n", "get_system"),
    (b"GET /cluster-api/v1/materials HTTP/1.1\r\n\r\n", "get_materials"),
    (b"GET /cluster-api/v1/print_jobs/0a-1 HTTP/1.1\r\n\r\n",
     "get_print_job"),
    (b"GET /cluster-api/v1/print_jobs/0a-1/preview_image HTTP/1.1\r\n\r\n",
     "get_preview_image"),
    (b"GET /print_jobs HTTP/1.1\r\nAccept: text/html\r\n\r\n", "get_page"),
    # (the camera's route: the front hands it over when it sees the query)
    (b"GET /?action=stream HTTP/1.1\r\n\r\n", None),
    # everything else is Klippy's side's to answer
    (b"GET /api/v1/auth/verify HTTP/1.1\r\n\r\n", None),
    (b"GET /api/v1/auth/check/abc HTTP/1.1\r\n\r\n", None),
    (b"GET /printers/cura_definition.zip HTTP/1.1\r\n\r\n",
     "get_definition_zip"),
    (b"GET /favicon.ico HTTP/1.1\r\n\r\n", "not_found"),
    (b"HEAD /cluster-api/v1/printers HTTP/1.1\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: x\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/2.0\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers\r\n\r\n", None),
    (b"GET //cluster-api/v1/printers HTTP/1.1\r\n\r\n", "not_found"),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
     None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nContent-Length: 0\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nExpect: 100-continue"
     b"\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
     None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\n folded\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nBad Header: x\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nX: \xff\r\n\r\n", None),
    # a bare CR, which the email parser behind http.server ends a line at
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nX: a\rContent-Length: 5"
     b"\r\n\r\n", None),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\r\n\r\n", None),
    # not one head (the front takes only up to the first empty line)
    (b"GET /cluster-api/v1/printers HTTP/1.1\n\nGET / HTTP/1.1\r\n\r\n",
     None),
    # more header lines than http.server takes
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\n" + b"X: y\r\n" * 101
     + b"\r\n", None),
])
def test_front_answers_only_plain_reads(head, route):
    req = FrontRequest.parse(head)
    assert (req and req.handler) == route


@pytest.mark.parametrize("head,rest", [
    (b"GET / HTTP/1.1\n\n", b"GET /x HTTP/1.1\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nA: b\r\n\r\n", b"GET /x HTTP/1.1\n\n"),
    (b"GET / HTTP/1.1\r\nA: b\n\r\n", b"GET"),
    (None, b"GET / HTTP/1.1\r\nA: b\r\n"),
])
def test_front_ends_a_head_where_http_server_does(head, rest):
    data = (head or b"") + rest
    found = HEAD_END.search(data)
    assert (found and data[:found.end()]) == head


@pytest.mark.parametrize("head,close", [
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\n\r\n", False),
    (b"GET /cluster-api/v1/printers HTTP/1.1\r\nConnection: close\r\n\r\n",
     True),
    (b"GET /cluster-api/v1/printers HTTP/1.0\r\n\r\n", True),
    (b"GET /cluster-api/v1/printers HTTP/1.0\r\nConnection: Keep-Alive"
     b"\r\n\r\n", False),
])
def test_front_keeps_connections_as_http_server_does(head, close):
    assert FrontRequest.parse(head).close is close


@pytest.mark.parametrize("line,upload", [
    ("POST /cluster-api/v1/print_jobs/ HTTP/1.1\r\n", True),
    ("POST /cluster-api/v1/print_jobs HTTP/1.0\n", True),
    ("POST /cluster-api/v1/print_jobs/x HTTP/1.1\r\n", False),
    ("PUT /cluster-api/v1/print_jobs/ HTTP/1.1\r\n", False),
    ("POST /cluster-api/v1/materials HTTP/1.1\r\n", False),
])
def test_front_receives_only_uploads(line, upload):
    assert bool(UPLOAD_LINE.match(line + "Host: x\r\n\r\n")) is upload
