"""The module's layout: one file Klippy loads, the package beside it, the
front process loading only what it uses."""
import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
EXTRAS = os.path.join(HERE, "..", "..", "klippy_extras")
PACKAGE = os.path.join(EXTRAS, "_cura_connection")


def loaded_by(code):
    # the package's modules a fresh interpreter has after code
    out = subprocess.run(
        [sys.executable, "-c", "import sys\nsys.path.insert(0, %r)\n%s\n"
         "print(' '.join(sorted(m for m in sys.modules "
         "if m.startswith('_cura_connection'))))" % (EXTRAS, code)],
        capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_front_loads_neither_lifecycle_bridge_nor_front_link():
    # what the front process's boot imports before it serves
    loaded = loaded_by("from _cura_connection import front")
    assert "_cura_connection.front" in loaded
    for part in ("lifecycle", "bridge", "front_link"):
        assert "_cura_connection." + part not in loaded, loaded


def test_the_loaded_file_finds_its_package_through_its_real_path(tmp_path):
    # install.sh links only the file into klippy/extras
    extras = tmp_path / "klippy" / "extras"
    extras.mkdir(parents=True)
    (extras / "cura_connection.py").symlink_to(
        os.path.join(os.path.abspath(EXTRAS), "cura_connection.py"))
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, %r)\nimport cura_connection\n"
         "import _cura_connection\nprint(_cura_connection.__path__[0])"
         % (str(extras),)],
        capture_output=True, text=True, check=True)
    assert out.stdout.strip() == os.path.realpath(PACKAGE)


def test_a_copied_file_without_its_package_says_so(tmp_path):
    # a user who copied the file instead of running install.sh
    extras = tmp_path / "klippy" / "extras"
    extras.mkdir(parents=True)
    with open(os.path.join(EXTRAS, "cura_connection.py"), "rb") as f:
        (extras / "cura_connection.py").write_bytes(f.read())
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, %r)\nimport cura_connection"
         % (str(extras),)], capture_output=True, text=True)
    assert out.returncode != 0
    assert "ImportError: cura_connection: its parts are missing" in out.stderr
    assert "run install.sh" in out.stderr


def test_each_file_says_what_it_owns():
    for path in sorted(glob.glob(os.path.join(PACKAGE, "*.py"))):
        with open(path) as f:
            head = f.read().split("\nimport ", 1)[0]
        assert head.startswith("# ") and "GPLv3" in head, path
        # (a file of one concern stays readable on its own)
        with open(path) as f:
            assert len(f.readlines()) < 1000, path
