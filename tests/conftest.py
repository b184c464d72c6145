"""Generic pytest fixtures for running a real Klippy (klippy_harness.py).

    flavor          each Klippy flavor in $KLIPPY_FLAVORS (klipper, kalico)
    klippy          a started, ready Klippy with [cura_connection] defaults
    klippy_factory  klippy_factory(start=True, wait=True, **Klippy kwargs)
    members         members(name): a started group member (Klippy + Moonraker)

The test files import the helpers in support/ by their module names and
the module's package as Klippy's side does (from _cura_connection.jobs
import ...): both folders go on sys.path here.
"""
import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (os.path.join(_HERE, "support"),
              os.path.join(os.path.dirname(_HERE), "klippy_extras")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# The module's thread checks (_cura_connection/threads.py) are on in every
# test: in this process and in each Klippy it starts (they inherit it)
os.environ.setdefault("CURA_CONNECTION_THREAD_CHECKS", "1")

import klippy_harness  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Keep each phase's report on the item, so fixtures can tell a failure
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _test_failed(request):
    return any(getattr(request.node, "rep_" + when, None) is not None
               and getattr(request.node, "rep_" + when).failed
               for when in ("setup", "call"))


@pytest.fixture(scope="session")
def _installed_flavors():
    # Symlink the modules into a flavor's venv once per session
    return set()


def pytest_generate_tests(metafunc):
    # Every Klippy test runs on each flavor; the long ones marked
    # one_flavor (restart loops, load, fuzzing) run on the first only.
    if "flavor" in metafunc.fixturenames:
        flavors = klippy_harness.selected_flavors()
        if metafunc.definition.get_closest_marker("one_flavor"):
            flavors = flavors[:1]
        metafunc.parametrize("flavor", flavors, ids=flavors, indirect=True)


@pytest.fixture
def flavor(request, _installed_flavors):
    if request.param not in _installed_flavors:
        klippy_harness.install_module(request.param)
        _installed_flavors.add(request.param)
    return request.param


@pytest.fixture
def klippy_factory(flavor, tmp_path, request):
    made = []

    def make(start=True, wait=True, workdir=None, **kwargs):
        # (several instances may share one workdir: see instance=)
        workdir = workdir or tmp_path / ("klippy%d" % (len(made),))
        k = klippy_harness.Klippy(flavor, workdir, **kwargs)
        made.append(k)
        if start:
            k.start()
            if wait:
                k.wait_ready()
        return k
    yield make
    failed = _test_failed(request)
    broken = []
    for k in made:
        if failed and k.proc is not None:
            print(k.log_tail())
        k.stop()
        broken += klippy_harness.thread_check_failures(k.log_path)
    # A check that fires in a thread whose errors are only logged (the
    # disk worker, the front link) fails the test all the same
    assert not broken, "thread checks fired in Klippy:\n" + "\n".join(
        broken)


@pytest.fixture
def klippy(klippy_factory):
    return klippy_factory()


@pytest.fixture
def members(tmp_path, flavor):
    """members(name, **kw): a started group member (moonraker_member.py:
    a real Klippy and a real Moonraker; kw go to start_member) named name;
    all closed at the end."""
    from moonraker_member import start_member
    started = []

    def make(name, **kw):
        m = start_member(tmp_path / name, flavor, **kw)
        m.name = name
        started.append(m)
        return m
    yield make
    for m in started:
        m.close()


@pytest.fixture(scope="session")
def cura():
    """Cura 4.13's own network plugin code, loaded once (cura_client.py)."""
    import cura_client
    return cura_client.load()


@pytest.fixture
def cura5():
    """A headless Cura 5 (cura5_client.py) in its own interpreter; skipped,
    with the reason, where CURA5_DIR or .venv/cura5 is missing."""
    import cura5_client
    why = cura5_client.unavailable()
    if why:
        pytest.skip(why)
    client = cura5_client.Cura5()
    yield client
    client.close()
