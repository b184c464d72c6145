"""Material profiles and loaded materials on their own: the profile store,
profile names as Cura shows them, when a loaded material differs from a
job's, a job's materials named from its UFP, then the store."""
import os

import pytest

from _cura_connection.errors import BadInput, CuraError, error_status
from _cura_connection.gcode_meta import valid_job_materials
from _cura_connection.materials import MaterialStore, material_differs


MATERIAL = """<?xml version="1.0" encoding="UTF-8"?>
<fdmmaterial xmlns="http://www.ultimaker.com/material" version="1.3">
  <metadata>
    <name><brand>Acme</brand><material>PLA</material><color>Red</color></name>
    <GUID>%s</GUID><version>%s</version><color_code>#ff0000</color_code>
  </metadata>
</fdmmaterial>"""


GUID = "3ee70a86-77d8-4b87-8005-e4a1bc57d2ce"


def test_material_store(tmp_path):
    m = MaterialStore(str(tmp_path / "materials"))
    assert m.list() == []
    assert m.add("acme_pla.xml.fdm_material", (MATERIAL % (GUID, 2)).encode())
    assert not m.add("acme_pla.xml.fdm_material",
                     (MATERIAL % (GUID, 2)).encode())
    assert m.add("renamed.xml.fdm_material", (MATERIAL % (GUID, 3)).encode())
    assert os.listdir(tmp_path / "materials") == ["renamed.xml.fdm_material"]
    # a new store reads the folder back
    got = MaterialStore(str(tmp_path / "materials")).list()
    assert [(g["guid"], g["version"], g["brand"], g["color"]) for g in got] \
        == [(GUID, 3, "Acme", "Red")]


@pytest.mark.parametrize("data,why", [
    (MATERIAL % (GUID, 0), "version"),
    (MATERIAL % ("", 1), "GUID"),
    (MATERIAL % ("a b;c", 1), "GUID"),
    (MATERIAL % (GUID, "1_0"), "version"),
    (MATERIAL % (GUID, "+1"), "version"),
    ("<fdmmaterial/>", "fdmmaterial"),
    ("not xml at all", "valid"),
    ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">'
     '<!ENTITY b "&a;&a;&a;&a;">]><fdmmaterial>&b;</fdmmaterial>', "valid"),
    ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM '
     '"file:///etc/passwd">]><fdmmaterial>&e;</fdmmaterial>', "valid"),
], ids=["version 0", "no GUID", "bad GUID", "version 1_0", "version +1",
        "wrong root", "not XML",
        "entity expansion", "external entity"])
def test_material_rejects(tmp_path, data, why):
    m = MaterialStore(str(tmp_path))
    with pytest.raises(BadInput) as e:
        m.add("x.xml.fdm_material", data.encode())
    assert why in e.value.message
    assert m.list() == []


def test_material_bad_name(tmp_path):
    m = MaterialStore(str(tmp_path))
    with pytest.raises(BadInput):
        m.add("../evil.xml", (MATERIAL % (GUID, 1)).encode())


def test_material_profile_names_like_cura():
    # label, else colour and type, a Generic colour left out
    xml = (b'<fdmmaterial xmlns="http://www.ultimaker.com/material"><metadata>'
           b'<name><brand>B</brand><material>PLA</material><color>%s</color>'
           b'%s</name><GUID>g</GUID><version>1</version></metadata>'
           b'</fdmmaterial>')
    for color, label, name in ((b"Generic", b"", "PLA"),
                               (b"Black", b"", "Black PLA"),
                               (b"Black", b"<label>Pro PLA</label>",
                                "Pro PLA")):
        assert MaterialStore.parse(xml % (color, label))["name"] == name


PETG = {"extruder": 0, "guid": "1cbfaeb3-1906-4b26-b2e7-6f777a8c197a",
        "brand": "Generic", "material": "PETG", "color": "Generic",
        "name": "PETG"}


HOUSE = {"extruder": 0, "guid": "0b1c7e2a-5f7c-4d57-a9b4-2c9d7a4b1e01",
         "brand": "House", "material": "PETG", "color": "Teal",
         "color_code": "#008080"}


@pytest.mark.parametrize("wanted,loaded,differs", [
    (PETG, None, False),                             # nothing known
    (PETG, {"material": "empty"}, False),            # nothing to swap
    (PETG, {"guid": PETG["guid"].upper()}, False),
    (PETG, {"guid": "506c9f0d-e3aa-4bd4-b2d2-23e2425b1aa9"}, True),
    (PETG, {"material": "petg"}, False),
    (PETG, {"material": "PLA"}, True),
    # a Generic profile is any brand's, in any colour
    (PETG, {"material": "PETG", "brand": "Acme", "color": "red"}, False),
    (HOUSE, {"material": "PETG", "brand": "Acme"}, True),
    (HOUSE, {"material": "PETG", "brand": "house", "color": "#008080"},
     False),
    (HOUSE, {"material": "PETG", "color": "teal"}, False),
    (HOUSE, {"material": "PETG", "color": "red"}, True),
])
def test_material_differs(wanted, loaded, differs):
    assert material_differs(wanted, loaded) is differs
    # a job that names only a GUID is compared by GUID only
    assert material_differs({"extruder": 0, "guid": wanted["guid"]},
                               loaded) is bool(differs and "guid" in loaded)


def test_job_materials_named_from_the_ufp_then_the_store(tmp_path):
    m = MaterialStore(str(tmp_path / "m"))
    m.add("house.xml.fdm_material", (MATERIAL % (GUID, 1)).encode())
    wanted = [{"extruder": 0, "guid": PETG["guid"]},
              {"extruder": 1, "guid": GUID},
              {"extruder": 2, "guid": "unknown"}]
    named = m.name_job_materials(wanted, {PETG["guid"]: MaterialStore.parse(
        (MATERIAL % (PETG["guid"], 2)).encode())})
    assert [e.get("name") for e in named] == ["Red PLA", "Red PLA", None]
    assert named[2] == {"extruder": 2, "guid": "unknown"}
    assert valid_job_materials(named)


def test_kept_materials(tmp_path):
    store = MaterialStore(str(tmp_path / "materials"))
    xml = (b'<fdmmaterial xmlns="http://www.ultimaker.com/material">'
           b'<metadata><name><brand>B</brand><material>PLA</material>'
           b'<color>C</color></name><GUID>%s</GUID><version>1</version>'
           b'</metadata></fdmmaterial>')
    store.keep_waiting("abc", "one.xml.fdm_material", xml % b"g-1")
    store.keep_waiting("10.0.0.2", "two.xml.fdm_material", xml % b"g-2")
    store.keep_waiting("other", "three.xml.fdm_material", xml % b"g-3")
    # sent again (Cura reconnected): kept once
    store.keep_waiting("other", "three.xml.fdm_material", xml % b"g-3")
    store.MAX_HELD = 4 * len(xml % b"g-1")   # room for one more
    store.keep_waiting("abc", "four.xml.fdm_material", xml % b"g-4")
    for bad, status in ((("abc", "x.txt", xml % b"g-5"), 400),
                        (("abc", "x.xml.fdm_material", b"<nope/>"), 400),
                        (("abc", "x.xml.fdm_material", xml % b"g-5"), 507)):
        with pytest.raises(CuraError) as e:
            store.keep_waiting(*bad)
        assert error_status(e.value) == status
    assert store.list() == [] and not store.dirty
    store.release("abc", "10.0.0.2")
    assert store.dirty
    store.save()
    assert sorted(m["guid"] for m in store.list()) == ["g-1", "g-2", "g-4"]
    store.forget_waiting("other")
    store.release("other")
    assert not store.dirty
