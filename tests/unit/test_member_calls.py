"""member_calls.py on its own: the websocket address made from a
member's URL, and which messages reach the callbacks.  The calls through
a real member are in tests/printing/test_member_calls.py."""
import logging

import pytest

from _cura_connection.member_calls import MemberCalls, websocket_url


@pytest.mark.parametrize("url, ws", [
    ("http://192.168.1.23:7125", "ws://192.168.1.23:7125/websocket"),
    ("http://voron.local/", "ws://voron.local/websocket"),
    ("https://farm.example/voron/", "wss://farm.example/voron/websocket"),
    ("http://[fe80::1]:7125?x=1#y", "ws://[fe80::1]:7125/websocket"),
])
def test_websocket_url(url, ws):
    assert websocket_url(url) == ws


@pytest.mark.parametrize("url", ["ftp://voron", "voron:7125", "http://"])
def test_websocket_url_refuses(url):
    with pytest.raises(ValueError):
        websocket_url(url)


def test_dispatch_only_registered_notifications(caplog):
    got = []

    def broken(params):
        raise RuntimeError("boom")
    calls = MemberCalls("voron", "http://127.0.0.1:7125", None, {
        "cura_set_material": got.append, "cura_plate_cleared": broken})
    calls._dispatch({"jsonrpc": "2.0", "method": "cura_set_material",
                     "params": {"material": "PETG"}})
    # Moonraker's notifications, replies, odd params
    calls._dispatch({"jsonrpc": "2.0", "method": "notify_proc_stat_update",
                     "params": [{}]})
    calls._dispatch({"jsonrpc": "2.0", "method": "cura_set_material",
                     "id": 3, "params": {"material": "PLA"}})
    calls._dispatch({"jsonrpc": "2.0", "method": "cura_set_material",
                     "params": ["PLA"]})
    assert got == [{"material": "PETG"}, {}]
    # A callback that raises is logged, nothing more
    with caplog.at_level(logging.ERROR):
        calls._dispatch({"jsonrpc": "2.0", "method": "cura_plate_cleared"})
    assert "cura_plate_cleared from its macro failed" in caplog.text
