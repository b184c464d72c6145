"""The route table: declared on the handlers, checked at import."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "klippy_extras"))
from _cura_connection.api import (  # noqa: E402
    ROUTES, CuraApi, Route, check_routes, find_route)
from _cura_connection.errors import HTTPError  # noqa: E402


def test_every_handler_has_its_route():
    handlers = {r.handler for r in ROUTES}
    named = {n for n in vars(CuraApi) if n.split("_")[0] in (
        "get", "post", "put", "delete") and callable(getattr(CuraApi, n))}
    assert handlers == named


def test_front_answers_reads_only():
    front = {r.handler for r in ROUTES if r.front}
    assert front == {
        "get_system", "get_printers", "get_print_jobs", "get_history",
        "get_print_job", "get_preview_image", "get_materials", "get_page",
        "get_root", "get_definition_zip", "get_definition_file"}
    assert all(r.method == "GET" for r in ROUTES if r.front or r.gated)


def test_find_route():
    r, args = find_route("GET", "/cluster-api/v1/print_jobs/ab-12/")
    assert (r.handler, args) == ("get_print_job", ("ab-12",))
    r, args = find_route("GET", "/cluster-api/v1/print_jobs/history")
    assert r.handler == "get_history"
    with pytest.raises(HTTPError) as e:
        find_route("PATCH", "/cluster-api/v1/print_jobs")
    assert e.value.status == 405 and "GET, POST" in e.value.message
    with pytest.raises(HTTPError) as e:
        find_route("GET", "/nothing")
    assert e.value.status == 404


def test_a_bad_table_is_refused_at_import():
    class Api:
        def get_a(self, req):
            pass

        def post_a(self, req):
            pass
    good = [Route("GET", "/a", Api.get_a, True, True),
            Route("POST", "/a", Api.post_a, False, False)]
    check_routes(good, Api)
    with pytest.raises(AssertionError, match="declared twice"):
        check_routes(good + [Route("GET", "/a", Api.get_a, False, False)],
                     Api)
    with pytest.raises(AssertionError):     # the front answers reads only
        check_routes([Route("POST", "/a", Api.post_a, True, False)], Api)
    with pytest.raises(AssertionError):     # no such handler
        check_routes([Route("GET", "/b", lambda self, req: None, False,
                            False)], Api)
