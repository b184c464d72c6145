"""Attacks on the group in real parts (a real host Klippy, members with
the real Moonraker): each xfail test shows a promise of issue 21 that does
not hold yet."""
import urllib.parse

import pytest

from mjpeg_source import MjpegSource
from moonraker_member import start_member

from .test_group import host_of, wait_card


@pytest.mark.xfail(strict=True, reason=(
    "a member's card sends Cura's camera to port 8080 (CURA_CAMERA_PORT) "
    "whatever port the host listens on: with port: set to anything else "
    "(crowsnest holds 8080 on a default MainsailOS) Cura opens the "
    "member's camera on whatever holds 8080, not on the host's relay"))
def test_a_members_camera_link_reaches_this_host_on_its_port(
        tmp_path, klippy_factory, flavor):
    source = MjpegSource()
    voron = start_member(tmp_path / "voron", flavor,
                         webcam_url=source.url("stream"))
    voron.name = "voron"
    try:
        host = host_of(klippy_factory, voron)
        card = wait_card(host.base_url(), "voron", lambda c: c["camera"],
                         "voron's webcam found")
        # what Cura opens: http://<ip_address>:8080/?action=stream
        url = urllib.parse.urlsplit("http://%s:8080/?action=stream"
                                    % (card["ip_address"],))
        assert url.port == host.cura_port()
    finally:
        voron.close()
        source.close()
