"""Fixtures of the fake Klipper host (support/install_host.py) for the
install tests."""
from install_host import (  # noqa: F401  (fixtures, used by name)
    charon_deb, debian_charon, fake_system, host, host_tools, klippy_venv,
    repo_with_origin, repo_without_origin, sandbox, stub_bin)
