"""install.sh on a host with several Klipper instances, laid out as KIAUH
does: a data folder per instance (~/printer_data, ~/printer_<n>_data,
~/<name>_data, each with config/printer.cfg and config/moonraker.conf) and
the services klipper, klipper-<n>, klipper-<name>, all sharing ~/klipper
and ~/klippy-env.

Same approach as test_install.py, with its fake host
(support/install_host.py): a temporary HOME, --dry-run-privileged (root's
commands are printed) or fake system commands, a PATH with basic tools
only. Here systemctl is a fake that lists
the host's units (`systemctl list-unit-files`) and records every call.
"""
import os
import pty
import select
import shutil
import subprocess

import pytest

from install_host import (
    APT_DOWNLOAD_STUB, FAKE_RECORDER, INSTALL_SH, Host, MARK, _calls,
    _clean_venv, parse_snippet, would_run)

MR_BEGIN = ("# >>> cura_connection: added by install.sh, removed by "
            "install.sh --uninstall >>>")

# What `systemctl list-unit-files --no-legend` prints for a unit
FAKE_SYSTEMCTL = """#!/bin/sh
echo "systemctl $*" >> "$FAKE_DIR/calls.log"
if [ "$1" = list-unit-files ]; then
    for u in $FAKE_UNITS; do
        printf '%-40s enabled         enabled\\n' "$u.service"
    done
    printf '%-40s enabled         enabled\\n' ssh.service
fi
exit 0
"""

LAYOUTS = {
    # data folder names -> KIAUH's Klipper service of each
    "one": {"printer": "klipper"},
    "two": {"printer_1": "klipper-1", "printer_2": "klipper-2"},
    "named": {"printer": "klipper", "voron": "klipper-voron"},
    "second only": {"printer_2": "klipper-2"},
    "three": {"printer": "klipper", "printer_2": "klipper-2",
              "printer_3": "klipper-3"},
    # a name the group_printers option would not take as it is
    "odd name": {"printer": "klipper", "ender3:v2": "klipper-ender3:v2"},
}


class KiauhHost(Host):
    """the install tests' host, with the instances of one of LAYOUTS."""

    def __init__(self, tmp_path, venv, sandbox, repo, layout):
        super().__init__(tmp_path / "home", venv, sandbox, repo)
        self.instances = LAYOUTS[layout]
        template = self.home / "printer_data"
        for n, name in enumerate(self.instances):
            if name == "printer":
                continue
            data = self.home / (name + "_data")
            shutil.copytree(template, data)
            conf = data / "config" / "moonraker.conf"
            conf.write_text(conf.read_text().replace(
                "port: 7125", "port: %d" % (7125 + n)).replace(
                "~/printer_data", "~/%s_data" % name))
        if "printer" not in self.instances:
            shutil.rmtree(template)
        # a data folder that is no instance (no config) is never listed
        (self.home / "backup_data").mkdir()
        # fake system commands: systemctl lists the units; sudo/apt-get
        # are the install tests' recording stubs (no call may reach them)
        self.fake = tmp_path / "fake-system"
        self.fake.mkdir()
        for name in ("sudo", "apt-get"):
            shutil.copy2(self.stub_bin / name, self.fake / name)
        (self.fake / "systemctl").write_text(FAKE_SYSTEMCTL)
        (self.fake / "systemctl").chmod(0o755)
        units = []
        for name, service in self.instances.items():
            units += [service, service.replace("klipper", "moonraker")]
        self.units = units

    def config_of(self, name):
        return self.home / (name + "_data") / "config"

    def moonraker_conf(self, name):
        return (self.config_of(name) / "moonraker.conf").read_text()

    def install(self, *args, stdin=subprocess.DEVNULL, check=True,
                dry=True, stubs=None):
        """Runs install.sh without a terminal (stdin /dev/null)."""
        cmd = ["bash", str(self.repo / "install.sh"),
               "--nginx-dir", str(self.nginx)]
        cmd += ["--dry-run-privileged"] if dry else []
        cmd += list(args)
        res = subprocess.run(cmd, env=self.fake_env(stubs), stdin=stdin,
                             capture_output=True, text=True, timeout=600)
        res.output = res.stdout + res.stderr
        if check:
            assert res.returncode == 0, res.output
        self.check_no_privileged_call(dry)
        return res

    def fake_env(self, stubs=None):
        env = self.env(stubs=stubs or self.fake)
        env["FAKE_DIR"] = str(self.fake)
        env["FAKE_UNITS"] = " ".join(self.units)
        return env

    def check_no_privileged_call(self, dry):
        stub_log = self.stub_bin / "calls.log"
        assert not stub_log.exists(), \
            "privileged command really run:\n" + stub_log.read_text()
        if dry:     # systemctl was only asked for the list of units
            assert all(c.startswith("systemctl list-unit-files")
                       for c in _calls(self.fake)), _calls(self.fake)

    def snapshot(self):
        """Everything install.sh may change, in every instance."""
        out, config = {}, self.config
        for name in self.instances:
            self.config = self.config_of(name)
            out.update(super().snapshot())
        self.config = config
        return out


@pytest.fixture
def kiauh(request, tmp_path, klippy_venv, sandbox, repo_with_origin):
    h = KiauhHost(tmp_path, klippy_venv, sandbox, repo_with_origin,
                  request.param)
    yield h
    _clean_venv(h)


def _charon_linked(h):
    return (h.site_packages() / "Charon").is_symlink()


def test_help_says_what_happens_with_several_instances():
    res = subprocess.run(["bash", str(INSTALL_SH), "--help"],
                         capture_output=True, text=True, check=True)
    for words in ("--all-instances", "~/printer_<n>_data", "klipper-<n>",
                  "asks on a terminal"):
        assert words in res.stdout, words


@pytest.mark.parametrize("kiauh", ["two", "named"], indirect=True)
@pytest.mark.parametrize("uninstall", [False, True])
def test_without_terminal_it_lists_the_instances_and_changes_nothing(
        kiauh, uninstall):
    kiauh.add_mainsail_site()
    before = kiauh.snapshot()
    args = ["--uninstall"] if uninstall else []
    res = kiauh.install(*args, check=False)
    assert res.returncode != 0
    assert "nothing was changed" in res.stderr
    verb = "install.sh --uninstall" if uninstall else "install.sh"
    for name, service in kiauh.instances.items():
        assert "%s --config-dir ~/%s_data/config --service %s" % (
            verb, name, service) in res.stderr
    assert "backup_data" not in res.output
    assert kiauh.snapshot() == before
    assert not _charon_linked(kiauh)
    assert would_run(res.output) == []


@pytest.mark.parametrize("kiauh", ["two"], indirect=True)
@pytest.mark.parametrize("flags", [
    ["--config-dir", "{home}/printer_2_data/config"],
    ["--config-dir", "{home}/printer_2_data/config/"],
    ["--service", "klipper-2"],
    ["--config-dir", "{home}/printer_2_data/config", "--service",
     "klipper-2.service"]])
def test_flags_choose_the_instance(kiauh, flags):
    kiauh.add_mainsail_site()
    (kiauh.config_of("printer_2") / "mainsail.cfg").write_text(
        "[pause_resume]\n")
    first = kiauh.moonraker_conf("printer_1")
    printer_cfgs = {n: (kiauh.config_of(n) / "printer.cfg").read_bytes()
                    for n in kiauh.instances}
    res = kiauh.install(*[f.format(home=kiauh.home) for f in flags])

    # the shared parts: one link into the one Klipper checkout, one venv
    assert os.readlink(kiauh.link) == str(kiauh.module)
    assert _charon_linked(kiauh)
    # the chosen instance's Moonraker gets the section, the other does not
    # (the output shows it for that one)
    assert MR_BEGIN in kiauh.moonraker_conf("printer_2")
    assert kiauh.moonraker_conf("printer_1") == first
    assert "~/printer_1_data/config/moonraker.conf" in res.stdout
    assert "--all-instances" in res.stdout
    assert res.stdout.count("[update_manager cura_connection]") == 2
    # printer.cfg is never edited
    for n, data in printer_cfgs.items():
        assert (kiauh.config_of(n) / "printer.cfg").read_bytes() == data
    # the right Klipper restarts; port 80 is said to lead to it
    cmds = would_run(res.output)
    assert cmds[-1] == "systemctl restart klipper-2"
    assert "systemctl restart klipper" not in cmds
    assert "Port 80 (one per host) leads to klipper-2's" in res.stdout
    # its own port in the hint (no other instance has one yet: 8080)
    assert "    [cura_connection]\n    port: 8080\n" in res.stdout
    assert "path: ~/printer_2_data/gcodes" in res.stdout
    # the other instance, as a member of a group this one would host
    assert group_lines(res) == [
        "group_printers: printer_1=http://127.0.0.1:7125"]


@pytest.mark.parametrize("kiauh", ["two"], indirect=True)
def test_second_instance_gets_a_port_of_its_own(kiauh):
    kiauh.add_mainsail_site()
    with open(kiauh.config_of("printer_1") / "printer.cfg", "a") as f:
        f.write("\n[cura_connection]\n#port: 8080\n")
    res = kiauh.install("--service", "klipper-2", "--no-restart")
    assert "    [cura_connection]\n    port: 8081\n" in res.stdout
    locations = parse_snippet(kiauh.snippet.read_text())
    assert all("proxy_pass http://127.0.0.1:8081;" in body
               for body in locations.values())
    assert "leads to klipper-2's cura_connection on port 8081" in res.stdout
    assert "WARNING" not in res.output

    # its own configured port wins; a --port another instance uses is
    # called out
    with open(kiauh.config_of("printer_2") / "printer.cfg", "a") as f:
        f.write("\n[cura_connection]\nport: 8090\n")
    res = kiauh.install("--service", "klipper-2", "--no-restart")
    assert "on port 8090" in res.stdout
    assert "WARNING" not in res.output
    res = kiauh.install("--service", "klipper-2", "--no-restart",
                        "--port", "8080")
    assert ("port 8080 is already the [cura_connection] port of klipper-1"
            in res.stderr)
    assert "its port is 8090, but port 80 now leads to 8080" in res.stderr
    assert group_lines(res) == [
        "group_printers: printer_1=http://127.0.0.1:7125"]

    # "port: 0" (any free port) cannot be where port 80 leads
    cfg = kiauh.config_of("printer_2") / "printer.cfg"
    cfg.write_text(cfg.read_text().replace("port: 8090", "port: 0"))
    res = kiauh.install("--service", "klipper-2", "--no-restart")
    assert "on port 8081" in res.stdout
    assert "its port is 0, which port 80 cannot lead to: set port: 8081" \
        in res.stderr


@pytest.mark.parametrize("kiauh", ["named"], indirect=True)
def test_named_instance(kiauh):
    before = kiauh.moonraker_conf("printer")
    res = kiauh.install("--config-dir", str(kiauh.config_of("voron")),
                        "--no-port80")
    assert MR_BEGIN in kiauh.moonraker_conf("voron")
    assert kiauh.moonraker_conf("printer") == before
    assert would_run(res.output)[-1] == "systemctl restart klipper-voron"

    # the other one by its service: ~/printer_data is klipper's
    res = kiauh.install("--service", "klipper", "--no-port80")
    assert MR_BEGIN in kiauh.moonraker_conf("printer")
    assert would_run(res.output)[-1] == "systemctl restart klipper"


@pytest.mark.parametrize("kiauh", ["second only"], indirect=True)
def test_one_instance_needs_no_choice(kiauh):
    res = kiauh.install("--no-port80")
    assert MR_BEGIN in kiauh.moonraker_conf("printer_2")
    assert would_run(res.output)[-1] == "systemctl restart klipper-2"
    assert "[cura_connection]\n    #port: 8080" in res.stdout   # as before
    assert "group_printers" not in res.output     # no other instance


@pytest.mark.parametrize("kiauh", ["two", "one"], indirect=True)
def test_a_service_that_does_not_exist_fails_before_any_change(kiauh):
    kiauh.add_mainsail_site()
    before = kiauh.snapshot()
    name = next(iter(kiauh.instances))
    # not an instance's, and not on the host
    res = kiauh.install("--service", "klipper-3", check=False)
    assert res.returncode != 0 and "klipper-3" in res.stderr
    assert "nothing was changed" in res.stderr
    # the instance's folder is there, its service is not
    kiauh.units.remove(kiauh.instances[name])
    res = kiauh.install("--config-dir", str(kiauh.config_of(name)),
                        check=False)
    assert res.returncode != 0
    assert "there is no service %s on this host" % kiauh.instances[name] \
        in res.stderr
    assert kiauh.snapshot() == before
    assert not _charon_linked(kiauh)


def _on_terminal(h, args, answers):
    """Runs install.sh on a pseudo-terminal, typing each answer after the
    prompt it waits for; returns (exit status, everything it printed)."""
    master, slave = pty.openpty()
    cmd = ["bash", str(h.repo / "install.sh"), "--nginx-dir", str(h.nginx),
           "--dry-run-privileged"] + list(args)
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave,
                            env=h.fake_env(), close_fds=True)
    os.close(slave)
    out, answers = b"", list(answers)
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 600)
            assert ready, "install.sh is silent:\n" + out.decode()
            try:
                chunk = os.read(master, 4096)
            except OSError:     # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
            if answers and out.rstrip().endswith(b"]"):
                os.write(master, answers.pop(0).encode() + b"\n")
    finally:
        os.close(master)
        rc = proc.wait(timeout=600)
    h.check_no_privileged_call(True)
    return rc, out.decode().replace("\r\n", "\n")


@pytest.mark.parametrize("kiauh", ["two"], indirect=True)
def test_on_a_terminal_it_asks_which_instance(kiauh):
    before = kiauh.moonraker_conf("printer_1")
    rc, out = _on_terminal(kiauh, ["--no-port80"], ["3", "2"])
    assert rc == 0, out
    assert "1) ~/printer_1_data/config  (services klipper-1, moonraker-1)" \
        in out
    assert "2) ~/printer_2_data/config  (services klipper-2, moonraker-2)" \
        in out
    assert out.count("Install for which instance? [1-2]") == 2   # "3": again
    assert MR_BEGIN in kiauh.moonraker_conf("printer_2")
    assert kiauh.moonraker_conf("printer_1") == before
    assert would_run(out)[-1] == "systemctl restart klipper-2"

    # no answer (end of input): nothing changes
    snap = kiauh.snapshot()
    rc, out = _on_terminal(kiauh, ["--uninstall", "--no-port80"], ["\x04"])
    assert rc != 0 and "Uninstall for which instance?" in out
    assert "no answer: nothing was changed" in out
    assert kiauh.snapshot() == snap


@pytest.mark.parametrize("kiauh", ["two"], indirect=True)
def test_uninstall_is_for_the_chosen_instance(kiauh):
    kiauh.add_mainsail_site()
    site = kiauh.site.read_text()
    kiauh.install("--service", "klipper-1", "--all-instances")
    assert MR_BEGIN in kiauh.moonraker_conf("printer_1")
    assert MR_BEGIN in kiauh.moonraker_conf("printer_2")
    with open(kiauh.config_of("printer_1") / "printer.cfg", "a") as f:
        f.write("\n[cura_connection]\n")

    # klipper-2 goes; klipper-1 still loads the module: the shared parts stay
    res = kiauh.install("--uninstall", "--service", "klipper-2")
    assert MR_BEGIN not in kiauh.moonraker_conf("printer_2")
    assert MR_BEGIN in kiauh.moonraker_conf("printer_1")
    assert "keeps the section install.sh added" in res.stdout
    assert "klipper-1 still load" in res.stdout
    assert kiauh.link.is_symlink() and _charon_linked(kiauh)
    assert kiauh.snippet.exists() and MARK in kiauh.site.read_text()
    assert would_run(res.output) == ["systemctl restart klipper-2"]
    assert "group_printers" not in res.output

    # the last one: everything goes, and its Klipper stays stopped while
    # its printer.cfg still has the section
    res = kiauh.install("--uninstall", "--service", "klipper-1")
    assert MR_BEGIN not in kiauh.moonraker_conf("printer_1")
    assert not kiauh.link.exists() and not _charon_linked(kiauh)
    assert not kiauh.snippet.exists() and kiauh.site.read_text() == site
    assert "systemctl restart klipper-1" not in would_run(res.output)
    assert "[cura_connection] is still in" in res.stderr


@pytest.mark.parametrize("kiauh", ["two"], indirect=True)
def test_all_instances_flag_and_a_real_restart(kiauh):
    # real (not dry-run) code paths with fake root tools: sudo runs the
    # command, systemctl records it
    (kiauh.fake / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    kiauh.install("--service", "klipper-2", "--no-port80", "--all-instances",
                  dry=False)
    assert MR_BEGIN in kiauh.moonraker_conf("printer_1")
    assert MR_BEGIN in kiauh.moonraker_conf("printer_2")
    assert [c for c in _calls(kiauh.fake)
            if not c.startswith("systemctl list-unit-files")] == [
        "systemctl restart klipper-2"]
    kiauh.install("--uninstall", "--config-dir",
                  str(kiauh.config_of("printer_2")), "--no-port80",
                  "--all-instances", dry=False)
    assert MR_BEGIN not in kiauh.moonraker_conf("printer_1")
    assert MR_BEGIN not in kiauh.moonraker_conf("printer_2")
    assert _calls(kiauh.fake)[-1] == "systemctl restart klipper-2"


@pytest.mark.parametrize("kiauh", ["one"], indirect=True)
def test_an_instance_of_a_template_unit_is_a_service(kiauh):
    kiauh.units.append("klipper@")      # klipper@.service
    res = kiauh.install("--service", "klipper@voron", "--no-port80")
    assert would_run(res.output)[-1] == "systemctl restart klipper@voron"
    assert MR_BEGIN in kiauh.moonraker_conf("printer")
    res = kiauh.install("--service", "klipperx@voron", "--no-port80",
                        check=False)
    assert "there is no service klipperx@voron" in res.stderr


def group_lines(res):
    """The group_printers lines install.sh printed (indented, to paste)."""
    return [line.strip() for line in res.stdout.splitlines()
            if line.strip().startswith("group_printers")]


@pytest.mark.parametrize("kiauh", ["three"], indirect=True)
def test_the_other_instances_as_a_group_line(kiauh):
    printer_cfgs = {n: (kiauh.config_of(n) / "printer.cfg").read_bytes()
                    for n in kiauh.instances}
    res = kiauh.install("--service", "klipper", "--no-port80")
    assert group_lines(res) == [
        "group_printers: printer_2=http://127.0.0.1:7126, "
        "printer_3=http://127.0.0.1:7127"]
    # where it goes, and that it is a choice
    assert ("for Cura to see this host's other Klipper instances as one "
            "group with this one,\n    add this line under [cura_connection]"
            " in ~/printer_data/config/printer.cfg:") in res.stdout
    # printed, never written
    for n, data in printer_cfgs.items():
        assert (kiauh.config_of(n) / "printer.cfg").read_bytes() == data

    # from another instance: the others, in their order
    res = kiauh.install("--config-dir", str(kiauh.config_of("printer_2")),
                        "--no-port80")
    assert group_lines(res) == [
        "group_printers: printer=http://127.0.0.1:7125, "
        "printer_3=http://127.0.0.1:7127"]
    assert "under [cura_connection] in ~/printer_2_data/config/printer.cfg" \
        in res.stdout

    # each Moonraker's own [server] port (7125 when it sets none), never
    # another section's
    conf = kiauh.config_of("printer_3") / "moonraker.conf"
    conf.write_text(conf.read_text().replace("port: 7127", "port : 7300 "
                                             "# moved") + "\n[mqtt]\n"
                    "address: 127.0.0.1\nport: 1883\n")
    conf = kiauh.config_of("printer") / "moonraker.conf"
    conf.write_text(conf.read_text().replace("port: 7125\n", ""))
    res = kiauh.install("--service", "klipper-2", "--no-port80")
    assert group_lines(res) == [
        "group_printers: printer=http://127.0.0.1:7125, "
        "printer_3=http://127.0.0.1:7300"]

    # uninstalling prints none
    res = kiauh.install("--uninstall", "--service", "klipper-2",
                        "--no-port80")
    assert "group_printers" not in res.output


@pytest.mark.parametrize("kiauh", ["named", "odd name"], indirect=True)
def test_a_named_instance_in_the_group_line(kiauh):
    member = "voron" if "voron" in kiauh.instances else "ender3_v2"
    folder = next(n for n in kiauh.instances if n != "printer")
    res = kiauh.install("--service", "klipper", "--no-port80")
    assert group_lines(res) == [
        "group_printers: %s=http://127.0.0.1:7126" % (member,)]
    # the line the module's option takes (names: letters, digits - _ .)
    import re
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", member)
    # and the other way round
    res = kiauh.install("--config-dir", str(kiauh.config_of(folder)),
                        "--no-port80")
    assert group_lines(res) == [
        "group_printers: printer=http://127.0.0.1:7125"]
