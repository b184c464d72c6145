"""Another host on a private link, for tests (needs root): a network
namespace the test makes, joined to this one by a veth pair with a /30
of its own, so a group member's Moonraker listens on an address that is
not loopback and the group's host reaches it over that link.  Nothing
leaves the machine: the pair's two ends are its only interfaces.

    with OtherHost() as there:
        member = start_member_there(there, tmp_path / "prusa", flavor)
        member.url      # http://<there.address>:<port>
"""
import os
import subprocess

import moonraker_member


def _ip(*args):
    subprocess.run(("ip",) + args, check=True, capture_output=True,
                   text=True)


def available():
    """Why another host cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making a network namespace and a veth pair needs root"
    try:
        _ip("netns", "list")
    except (OSError, subprocess.CalledProcessError) as error:
        return "no usable `ip netns`: %s" % (error,)
    return None


def _free_subnet():
    # A /30 of 10.213.0.0/16 that no interface here uses
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True,
                          text=True, check=True).stdout
    start = os.getpid() % 16000
    for n in range(16000):
        k = (start + n) % 16000
        prefix = "10.213.%d.%d" % (k // 64, (k % 64) * 4)
        if " %s" % (prefix[:prefix.rindex(".")],) not in used:
            return prefix
    raise RuntimeError("no free 10.213.x.y/30")


class OtherHost:
    """.address: the namespace's end of the link; .near: this side's
    (what the namespace sees the group's host come from); .subnet."""
    def __init__(self):
        tag = "%d" % (os.getpid() % 100000,)
        self.name = "gcura-other-" + tag
        self.veth = "gco" + tag            # interface names: <= 15
        net = _free_subnet()
        base = net[:net.rindex(".") + 1]
        last = int(net[net.rindex(".") + 1:])
        self.near = base + str(last + 1)
        self.address = base + str(last + 2)
        self.subnet = net + "/30"
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.veth, "type", "veth", "peer", "name",
                self.veth + "p")
            _ip("link", "set", self.veth + "p", "netns", self.name)
            _ip("addr", "add", self.near + "/30", "dev", self.veth)
            _ip("link", "set", self.veth, "up")
            for args in (("addr", "add", self.address + "/30", "dev",
                          self.veth + "p"),
                         ("link", "set", self.veth + "p", "up"),
                         ("link", "set", "lo", "up")):
                _ip("-n", self.name, *args)
        except BaseException:
            self.close()
            raise

    def unplug(self, unplugged=True):
        """The other host's cable out (or back in): its end of the link
        goes down; packets to it are lost, nothing answers or refuses."""
        _ip("-n", self.name, "link", "set", self.veth + "p",
            "down" if unplugged else "up")

    def exec_prefix(self):
        """Put before a command line to run it there."""
        return ["ip", "netns", "exec", self.name]

    def close(self):
        # (deleting the namespace deletes the pair with its end)
        subprocess.run(["ip", "link", "del", self.veth],
                       capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name],
                       capture_output=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start_member_there(there, workdir, flavor, **klippy_kw):
    """A group member (moonraker_member.Member) whose Klippy and Moonraker
    both run in `there`, Moonraker listening on there.address and
    trusting the link; started."""
    member = moonraker_member.Member(workdir, flavor, trusted=there.subnet,
                                     **klippy_kw)
    member.klippy.exec_prefix = there.exec_prefix()
    member.moonraker.host = there.address
    member.moonraker.exec_prefix = there.exec_prefix()
    try:
        return member.start()
    except BaseException:
        member.close()
        raise
