"""A three-printer group as Cura's own client code sees it: the host is a
real Klippy with cura_connection, its members real Klippys with the real
Moonraker 0.11.0.  Cura 4.13's Monitor-tab code and Cura 5's own
LocalClusterOutputDevice poll the host and build their models; uploads
go through Cura's _startPrintJobUpload with the printer-selection
dialog's choice (a member's unique_name, or "Automatic").  One member
runs on "another host": a network namespace joined by a veth pair.

Each test prints Cura's cards as its models hold them (cards_text)."""
import os

import pytest

import cura_client
import gcode_samples
import httpc
import other_host
import real_inputs
import group_host

from _cura_connection.members import MoonrakerMember

HOST = "farm-host"
SOME_MATERIALS = ["generic_pla", "generic_petg", "ultimaker_pla_black"]


def host_of(klippy_factory, *members, **options):
    options.setdefault("name", HOST)
    return group_host.host_of(klippy_factory, *members, **options)


def address(k):
    return "127.0.0.1:%d" % (k.cura_port(),)


def slow_file(tmp_path, name, moves=6000):
    # prints for a while (TEST_SLEEP every 10 moves): seen printing
    path = tmp_path / (name + ".gcode")
    path.write_text(gcode_samples.moves(moves, 10, 0.1))
    return str(path)


def card(state, name):
    return next(p for p in state["printers"] if p["name"] == name)


def job_on(state, name):
    return card(state, name)["active_job"]


def printing_on(state, name, job):
    j = job_on(state, name)
    return j is not None and j["name"] == job and j["state"] == "printing"


def wait_view(api, view, pred, what, timeout=40.):
    """Cura 4.13's poll (printers, then print jobs) until pred holds."""
    last = []

    def poll():
        last[:] = [view.poll(api)]
        return last[0] if pred(last[0]) else None
    try:
        return httpc.wait_for(poll, timeout, what, interval=0.3)
    except AssertionError as e:
        raise AssertionError("%s; Cura's last view: %r" % (e, last))


def moving(state):
    """Every printing card's job has some progress (for the printout)."""
    return all(p["active_job"]["progress"] for p in state["printers"]
               if p["state"] == "printing")


def cards_text(title, state):
    """Cura's cards and queue as its models hold them, as text."""
    lines = ["%s: clusterSize %d" % (title, state["cluster_size"])]
    for p in state["printers"]:
        j = p["active_job"]
        job = "no job" if j is None else "%s %s %.1f %%" % (
            j["name"], j["state"], 100. * (j["progress"] or 0.))
        lines.append("  card %-10s %-11s %s" % (p["name"], p["state"], job))
    for q in state["queue"]:
        lines.append("  queue %-16s %-8s %s" % (q["name"], q["state"],
                                                q["printer_text"]))
    return "\n".join(lines)


def moonraker_state(member):
    client = MoonrakerMember(member.name, member.url)
    try:
        ps = client.poll()["print_stats"]
        return ps["state"], ps["filename"]
    finally:
        client.close()


def test_cura413_draws_the_group_and_prints_where_asked(
        cura, tmp_path, klippy_factory, members):
    voron, ender = members("voron"), members("ender")
    host = host_of(klippy_factory, voron, ender)
    addr = address(host)
    api = cura_client.ClusterApi(addr)
    view = cura_client.MonitorView(address=addr)
    state = wait_view(api, view, lambda s: [p["state"] for p in s[
        "printers"]] == ["idle"] * 3, "three idle cards")
    # the host's card first, then the members in group_printers' order;
    # three printers: "Print over network" shows Cura's printer selection
    assert [(p["name"], p["unique_name"]) for p in state["printers"]] == [
        (HOST, state["printers"][0]["unique_name"]), ("voron", "voron"),
        ("ender", "ender")]
    assert state["printers"][0]["unique_name"] not in ("voron", "ender")
    assert state["cluster_size"] == 3 and state["active_printer"] == HOST
    assert not state["not_cluster_host"]

    # the dialog's choice: ender
    status, body = cura_client.upload(addr, slow_file(tmp_path, "on_ender"),
                                      unique_name="ender")
    assert status == 200, body
    state = wait_view(api, view, lambda s: printing_on(s, "ender",
                                                       "on_ender"),
                      "on_ender printing on ender's card")
    assert card(state, "ender")["state"] == "printing"
    assert job_on(state, HOST) is None and job_on(state, "voron") is None
    assert moonraker_state(ender) == ("printing",
                                      "cura_connection/on_ender.gcode")
    # "Automatic" twice: each goes to a free printer, the host or voron
    for name in ("anywhere", "anywhere_too"):
        status, body = cura_client.upload(addr, slow_file(tmp_path, name))
        assert status == 200, body
        state = wait_view(api, view, lambda s: any(
            printing_on(s, p, name) for p in (HOST, "voron")),
            "%s printing on a free printer" % (name,))
    state = wait_view(api, view, lambda s: [p["state"] for p in s[
        "printers"]] == ["printing"] * 3, "three printing cards")
    assert sorted(job_on(state, p)["name"] for p in (HOST, "voron")) == [
        "anywhere", "anywhere_too"]
    assert job_on(state, "ender")["name"] == "on_ender"
    assert state["active_jobs"] and sorted(state["active_jobs"]) == [
        "anywhere", "anywhere_too", "on_ender"]

    # every printer busy: a job for voron and one for any printer wait
    status, body = cura_client.upload(
        addr, slow_file(tmp_path, "next_on_voron", 20), unique_name="voron")
    assert status == 200, body
    status, body = cura_client.upload(
        addr, slow_file(tmp_path, "next_anywhere", 20))
    assert status == 200, body
    state = wait_view(api, view, lambda s: len(s["queue"]) == 2
                      and moving(s), "two queued")
    # Cura's queue row names a printer only for a job that references
    # one; a pinned job waits unreferenced (else Cura would draw it as
    # voron's active job), so both rows read "First available".  Cura
    # parses the pin (constraints) and shows it nowhere.
    assert [(q["name"], q["state"], q["printer_text"])
            for q in state["queue"]] == [
        ("next_on_voron", "queued", "First available"),
        ("next_anywhere", "queued", "First available")]
    parsed = {j.name: j for j in api.print_jobs()}
    assert parsed["next_on_voron"].constraints.require_printer_name \
        == "voron"
    assert parsed["next_anywhere"].constraints is None
    # the queued jobs stay off the cards
    assert [job_on(state, p)["name"] for p in (HOST, "voron", "ender")] \
        == [job_on(state, HOST)["name"], job_on(state, "voron")["name"],
            "on_ender"]
    print("\n" + cards_text("Cura 4.13", state))

    # ender's job through Cura's own buttons (the job model's setState)
    key = job_on(state, "ender")["key"]
    assert view.set_job_state(key, "pause") == 200
    wait_view(api, view, lambda s: job_on(s, "ender")["state"] == "paused",
              "paused on ender's card")
    assert moonraker_state(ender)[0] == "paused"
    assert view.set_job_state(key, "resume") == 200
    wait_view(api, view, lambda s: job_on(s, "ender")["state"]
              == "printing", "resumed on ender's card")
    assert moonraker_state(ender)[0] == "printing"
    assert view.set_job_state(key, "abort") == 200
    state = wait_view(api, view, lambda s: job_on(s, "ender")["state"] in (
        "aborted", "aborted_wait_cleanup"), "aborted on ender's card")
    assert moonraker_state(ender)[0] == "cancelled"
    # the others print on; ender's plate waits to be cleared, so nothing
    # of the queue went there
    assert [job_on(state, p)["state"] for p in (HOST, "voron")] == [
        "printing", "printing"]
    assert [q["name"] for q in state["queue"]] == ["next_on_voron",
                                                   "next_anywhere"]
    print(cards_text("Cura 4.13, ender's job aborted", state))
    # ender's plate cleared (the web page's button): the job for any
    # printer goes there, past the one that waits for voron
    reply = httpc.request(host.base_url(), "POST",
                          "/cluster-api/v1/printers/%s/action/plate_cleared"
                          % (card(state, "ender")["key"],), json_body={})
    assert reply.status == 200, reply
    state = wait_view(api, view, lambda s: printing_on(
        s, "ender", "next_anywhere"), "next_anywhere printing on ender")
    assert [(q["name"], q["printer_text"]) for q in state["queue"]] == [
        ("next_on_voron", "First available")]
    assert [job_on(state, p)["state"] for p in (HOST, "voron")] == [
        "printing", "printing"]
    print(cards_text("Cura 4.13, ender's plate cleared", state))


def waiting_ids(k):
    import json
    path = os.path.join(k.data_dir, "auth.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return sorted(i for i, c in json.load(f)["clients"].items()
                      if not c["allowed"])


def test_cura5_draws_the_group_and_prints_where_asked(
        cura, cura5, tmp_path, klippy_factory, members):
    voron, ender = members("voron"), members("ender")
    host = host_of(klippy_factory, voron, ender, require_pairing="True")
    # Cura 5 asks for credentials; allowed on the host's console, it
    # signs every request
    cura5.device(address(host), materials=SOME_MATERIALS)
    cura5.connect()
    cura5.wait(lambda s: waiting_ids(host), timeout=40,
               what="Cura 5's request")
    key_id, = waiting_ids(host)
    host.gcode("CURA_ALLOW ID=%s" % (key_id,))
    cura5.wait(lambda s: not s["auth_message_visible"], timeout=40,
               what="Cura allowed")
    state = cura5.wait(lambda s: [p["state"] for p in s["printers"]]
                       == ["idle"] * 3, timeout=40, what="three idle cards")
    assert [(p["name"], p["unique_name"]) for p in state["printers"]][1:] \
        == [("voron", "voron"), ("ender", "ender")]
    assert state["printers"][0]["name"] == HOST
    assert state["cluster_size"] == 3

    def ufp(name, **kwargs):
        path = tmp_path / (name + ".ufp")
        path.write_bytes(real_inputs.ufp_bytes(gcode_samples.cura_gcode(
            material=gcode_samples.ULTIMAKER_PLA_BLACK, **kwargs),
            real_inputs.snapshot(), [gcode_samples.ULTIMAKER_PLA_BLACK],
            cura5=True))
        return path
    long = dict(print_time=900, count=6000, sleep_every=10, sleep_s=0.1)
    sent = cura5.upload(ufp("on_voron", **long), unique_name="voron")
    assert sent["reply"]["status"] == 200 and sent["reply"]["signed"], sent
    state = cura5.wait(lambda s: printing_on(s, "voron", "on_voron"),
                       timeout=40, what="on_voron printing on voron")
    assert job_on(state, HOST) is None and job_on(state, "ender") is None
    assert moonraker_state(voron) == ("printing",
                                      "cura_connection/on_voron.gcode")
    sent = cura5.upload(ufp("anywhere", **long))
    assert sent["reply"]["status"] == 200 and sent["reply"]["signed"], sent
    state = cura5.wait(lambda s: any(printing_on(s, p, "anywhere")
                                     for p in (HOST, "ender")),
                       timeout=40, what="anywhere printing on a free one")
    # voron is busy: the next job for it waits in the queue
    sent = cura5.upload(ufp("next_on_voron", **long), unique_name="voron")
    assert sent["reply"]["status"] == 200 and sent["reply"]["signed"], sent
    state = cura5.wait(lambda s: [(q["name"], q["printer_text"])
                                  for q in s["queue"]] == [
        ("next_on_voron", "First available")] and moving(s), timeout=40,
        what="next_on_voron queued")
    assert job_on(state, "voron")["name"] == "on_voron"
    print("\n" + cards_text("Cura 5", state))
    # voron's job through the device's job actions (Cura's buttons)
    key = job_on(state, "voron")["key"]
    assert cura5.action("pause", key)["status"] == 200
    cura5.wait(lambda s: job_on(s, "voron")["state"] == "paused",
               what="paused on voron's card")
    assert moonraker_state(voron)[0] == "paused"
    assert cura5.action("abort", key)["status"] == 200
    state = cura5.wait(lambda s: job_on(s, "voron")["state"] in (
        "aborted", "aborted_wait_cleanup"), what="aborted on voron's card")
    assert moonraker_state(voron)[0] == "cancelled"
    # (its plate waits to be cleared: the job for voron stays queued)
    assert [q["name"] for q in state["queue"]] == ["next_on_voron"]
    failed = [r for r in cura5.replies() if r["status"] is None
              or r["status"] >= 400]
    assert failed == [] and state["crashes"] == [], failed
    print(cards_text("Cura 5, voron's job aborted", state))
    # voron's plate cleared from the host's console: its job goes there
    host.gcode("CURA_BUILD_PLATE_CLEARED PRINTER=voron")
    state = cura5.wait(lambda s: printing_on(s, "voron", "next_on_voron")
                       and not s["queue"] and moving(s), timeout=40,
                       what="next_on_voron printing on voron")
    assert moonraker_state(voron)[1] == "cura_connection/next_on_voron.gcode"
    assert sorted(j["name"] for j in state["jobs"]) == [
        "anywhere", "next_on_voron"]
    print(cards_text("Cura 5, voron's plate cleared", state))


def test_a_member_on_another_host(cura, tmp_path, klippy_factory, flavor,
                                  members):
    why = other_host.available()
    if why:
        pytest.skip(why)
    with other_host.OtherHost() as there:
        # prusa's Klippy and Moonraker run in the other namespace; its
        # Moonraker listens on that side of the link only
        prusa = other_host.start_member_there(there, tmp_path / "prusa",
                                              flavor)
        prusa.name = "prusa"
        try:
            voron = members("voron")
            host = host_of(klippy_factory, voron, prusa)
            assert prusa.url.startswith("http://%s:" % (there.address,))
            addr = address(host)
            api = cura_client.ClusterApi(addr)
            view = cura_client.MonitorView(address=addr)
            state = wait_view(api, view, lambda s: [p["state"] for p in s[
                "printers"]] == ["idle"] * 3, "three idle cards")
            assert [p["name"] for p in state["printers"]] == [
                HOST, "voron", "prusa"]
            assert state["cluster_size"] == 3
            # prusa's cable out while it is idle: a job for it waits, one
            # for any printer goes to a printer that answers
            there.unplug()
            wait_view(api, view, lambda s: card(s, "prusa")["state"]
                      == "unreachable", "idle prusa unreachable")
            status, body = cura_client.upload(
                addr, slow_file(tmp_path, "far_away"), unique_name="prusa")
            assert status == 200, body
            status, body = cura_client.upload(
                addr, slow_file(tmp_path, "near_by"))
            assert status == 200, body
            state = wait_view(api, view, lambda s: any(
                printing_on(s, p, "near_by") for p in (HOST, "voron"))
                and [q["name"] for q in s["queue"]] == ["far_away"],
                "near_by printing here, far_away waiting")
            assert job_on(state, "prusa") is None
            # back in: prusa takes its job
            there.unplug(False)
            state = wait_view(api, view, lambda s: printing_on(
                s, "prusa", "far_away") and moving(s),
                "far_away printing on prusa")
            assert card(state, "prusa")["state"] == "printing"
            assert state["queue"] == []
            assert moonraker_state(prusa) == (
                "printing", "cura_connection/far_away.gcode")
            with open(os.path.join(prusa.gcodes_dir, "cura_connection",
                                   "far_away.gcode")) as f:
                assert f.read() == open(slow_file(tmp_path, "far_away")
                                        ).read()
            print("\n" + cards_text("Cura 4.13, prusa on another host",
                                    state))
            # prusa's cable out: its card says so, the others go on; back
            # in, its card shows its print again
            key = job_on(state, "prusa")["key"]
            there.unplug()
            state = wait_view(api, view, lambda s: card(
                s, "prusa")["state"] == "unreachable", "prusa unreachable")
            assert [p["name"] for p in state["printers"]] == [
                HOST, "voron", "prusa"]
            assert "unreachable" not in [p["state"]
                                         for p in state["printers"][:2]]
            print(cards_text("Cura 4.13, prusa's cable out", state))
            there.unplug(False)
            state = wait_view(api, view, lambda s: printing_on(
                s, "prusa", "far_away"), "prusa back")
            assert job_on(state, "prusa")["key"] == key
        finally:
            prusa.close()
