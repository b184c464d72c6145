"""Files are written whole or not at all."""
import os

from _cura_connection.storage import write_file_atomic


def test_write_file_atomic(tmp_path):
    p = str(tmp_path / "q.json")
    write_file_atomic(p, b"one")
    write_file_atomic(p, b"two")
    assert open(p, "rb").read() == b"two"
    assert os.listdir(tmp_path) == ["q.json"]   # no temp file left
