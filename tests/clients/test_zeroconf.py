"""Discovery: Cura's own ZeroConfClient finds the module's announcement.

Multicast never leaves this machine: the Klippy and Cura's client run
together inside a private network namespace that has only loopback."""

import pytest

import cura_netns

PROBE = r"""
import json, sys, tempfile
import klippy_harness, cura_client
cura_client.require_loopback_only()   # refuses if any real interface exists
result = {}
with klippy_harness.Klippy(%(flavor)r, tempfile.mkdtemp(), module_options={
        "zeroconf": "True", "address": "0.0.0.0", "name": "zc-printer",
        "cura_machine": "ultimaker_s5"}) as k:
    result["first"] = cura_client.discover(timeout=15, wait_for=1)
    result["port"] = k.cura_port()
    # a restart unregisters and registers again
    k.restart()
    result["after_restart"] = cura_client.discover(timeout=15, wait_for=1)
    result["log"] = k.log_text()
print("RESULT " + json.dumps(result))
"""


@pytest.mark.skipif(not cura_netns.netns_available(),
                    reason="needs network namespaces (root or userns)")
def test_cura_discovers_the_printer(flavor):
    result = cura_netns.run_probe(PROBE % {"flavor": flavor})
    for found in (result["first"], result["after_restart"]):
        assert len(found) == 1, result
        dev = found[0]
        assert dev["key"] == "zc-printer._ultimaker._tcp.local."
        assert dev["address"] == "127.0.0.1"
        props = dev["properties"]
        assert props["type"] == "printer"
        assert props["name"] == "zc-printer"
        assert props["machine"] == "9051"
        assert props["cluster_size"] == "1"
        assert tuple(map(int, props["firmware_version"].split("."))) \
            >= (4, 4)
    assert "announced zc-printer._ultimaker._tcp.local." in result["log"]


GROUP_PROBE = r"""
import json, sys, tempfile
import klippy_harness, cura_client
cura_client.require_loopback_only()
with klippy_harness.Klippy(%(flavor)r, tempfile.mkdtemp(), module_options={
        "zeroconf": "True", "address": "0.0.0.0", "name": "zc-host",
        # (members whose Moonraker is not there: still printers of it)
        "group_printers": "voron=http://127.0.0.1:9, ender=http://127.0.0.1:10",
        }) as k:
    found = cura_client.discover(timeout=15, wait_for=1)
print("RESULT " + json.dumps(found))
"""


@pytest.mark.skipif(not cura_netns.netns_available(),
                    reason="needs network namespaces (root or userns)")
def test_a_group_announces_its_size(flavor):
    # Cura shows its printer-selection dialog for cluster_size > 1
    found = cura_netns.run_probe(GROUP_PROBE % {"flavor": flavor})
    assert len(found) == 1, found
    assert found[0]["properties"]["cluster_size"] == "3"
