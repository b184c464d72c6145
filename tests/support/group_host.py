"""A group's host in the real-parts tests: a real Klippy with
cura_connection whose group_printers are real members
(moonraker_member.start_member), and its cards and jobs as Cura reads
them through the module's HTTP API."""
import os

import gcode_samples
from httpc import get_json, jobs, wait_for
from moonraker_member import group_printers

PRINTERS = "/cluster-api/v1/printers"


def host_of(klippy_factory, *members, urls=None, extra_cfg="", **options):
    """A started host whose group is members (urls: name -> another URL
    for that member, such as a proxy's)."""
    options["group_printers"] = group_printers(members, urls)
    return klippy_factory(module_options=options, extra_cfg=extra_cfg)


def group_with(klippy_factory, member):
    """(host, its base URL, Cura's address of it, member's card once the
    host reached it) for a host whose group has member."""
    host = host_of(klippy_factory, member)
    base = host.base_url()
    card = wait_card(base, member.name, lambda c: c["status"] == "idle",
                     "%s reached" % (member.name,))
    return host, base, "127.0.0.1:%d" % (host.cura_port(),), card


def cards(base):
    return {c["friendly_name"]: c for c in get_json(base, PRINTERS)}


def host_card(base):
    return get_json(base, PRINTERS)[0]


def wait_card(base, name, pred, what, timeout=30.):
    return wait_for(lambda: (lambda c: c if pred(c) else None)(
        cards(base)[name]), timeout, what)


def write(tmp_path, name, text):
    path = os.path.join(str(tmp_path), name)
    with open(path, "w") as f:
        f.write(text)
    return path


def slow_file(tmp_path, name, moves=400):
    """A G-code file that prints slowly enough to be seen printing."""
    return write(tmp_path, name, gcode_samples.moves(moves, 10, 0.1))


def job_named(base, name):
    try:
        found = [j for j in jobs(base) if j["name"] == name]
    except OSError:
        return None     # (a restarting host: answered again in a moment)
    return found[0] if found else None


def wait_job(base, name, pred, what, timeout=30.):
    return wait_for(lambda: (lambda j: j if j and pred(j) else None)(
        job_named(base, name)), timeout, what)
