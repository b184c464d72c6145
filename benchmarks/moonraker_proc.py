"""Moonraker 0.11.0 (from PyPI, in .venv/moonraker) on loopback, for the
side-by-side baselines: the tests' own (tests/support/moonraker_member.py).
Its data path is the Klippy work dir, so its "gcodes" root is the same
virtual_sdcard directory cura_connection uses, and it talks to the same
Klippy through its API socket."""
from moonraker_member import Moonraker, free_port  # noqa: F401
