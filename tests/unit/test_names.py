"""Upload and job names: a safe file name, the name a user sees, labels."""
import pytest

from _cura_connection.jobs import SAVED_JOB_FIELDS
from _cura_connection.names import (job_name, label_text, safe_base_name,
                                    split_upload_name)


@pytest.mark.parametrize("given,expected", [
    ("benchy.gcode", "benchy.gcode"),
    ("../../etc/passwd", "passwd"),
    ("/abs/path/x.ufp", "x.ufp"),
    ("C:\\Users\\a\\part.ufp", "part.ufp"),
    ("..", "print"),
    ("", "print"),
    (".hidden.gcode", "hidden.gcode"),
    ("a b;c\nd\x00e.gcode", "a_b_c_d_e.gcode"),
    ("Würfel (2).gcode", "Würfel_(2).gcode"),
    ("x" * 400 + ".gcode", "x" * 200),
])
def test_safe_base_name(given, expected):
    assert safe_base_name(given) == expected


def test_safe_base_name_never_escapes():
    for name in ["../a", "a/../../b", "/", "\\..\\..\\x", "....//", "\x00"]:
        out = safe_base_name(name)
        assert "/" not in out and "\\" not in out
        assert not out.startswith(".")
        assert out not in ("", ".", "..")


@pytest.mark.parametrize("given,expected", [
    ("a.gcode.gz", ("a", ".gcode.gz")),
    ("A.GCODE", ("A", ".gcode")),
    ("b.ufp", ("b", ".ufp")),
    ("c.g", ("c", ".g")),
    ("d.stl", ("d.stl", "")),
    (".ufp", (".ufp", "")),
])
def test_split_upload_name(given, expected):
    assert split_upload_name(given) == expected


@pytest.mark.parametrize("given, shown", [
    ("Würfel – 测试 ✓.gcode", "Würfel – 测试 ✓"),
    ("Wu\u0308rfel.ufp", "Würfel"),                 # NFD from macOS: NFC
    ("a\tb\nc\x00d\x1b[0m\u202e\u2028e.gcode.gz", "a b cd[0m e"),
    ("👩\u200d🔧 fix.g", "👩\u200d🔧 fix"),         # the joiner stays
    ("../../dir/C:\\x\\ שלום.gco", "שלום"),
    ("  spaced  .gcode", "spaced"),
    ("é" * 300 + ".gcode", "é" * 200),
])
def test_job_name_is_the_users(given, shown):
    assert job_name(given) == shown
    assert SAVED_JOB_FIELDS["name"](shown)


def test_label_text_takes_anything():
    assert label_text(None, 10) == "" and label_text(5, 10) == ""
    assert label_text("ab\udcff\u200d", 10) == "ab"
    assert label_text("x" * 20, 10) == "x" * 10
