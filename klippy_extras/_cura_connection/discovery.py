# Discovery: the zeroconf announcement Cura browses for.
#
# Registered at config load, unregistered at close (zeroconf's own
# threads do the rest).
#
# This file may be distributed under the terms of the GNU GPLv3 license.
import logging
import re
import socket
import threading


SERVICE_TYPE = "_ultimaker._tcp.local."


def _host_ipv4_addresses(bind_address):
    # The addresses Cura may use to reach this host, best first: Cura uses
    # only the first one it is given.
    if bind_address not in ("0.0.0.0", "::"):
        return [bind_address]
    try:
        import ifaddr
        ips = [ip.ip for adapter in ifaddr.get_adapters()
               for ip in adapter.ips if isinstance(ip.ip, str)]
    except Exception:
        logging.exception("cura_connection: cannot list interfaces")
        ips = []
    usable = [ip for ip in ips if not ip.startswith("127.")]
    usable.sort(key=lambda ip: ip.startswith("169.254."))
    return usable or ["127.0.0.1"]


class ZeroconfAnnouncer:
    def __init__(self, name, port, bind_address, properties):
        self.name = name
        self.port = port
        self.bind_address = bind_address
        self.properties = properties
        self.stop_event = threading.Event()
        # register/unregister block for about a second: never in the reactor
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name="cura_connection zeroconf")
        self.thread.start()

    def _run(self):
        try:
            import zeroconf
        except ImportError:
            logging.warning("cura_connection: python zeroconf is missing; "
                            "Cura will not discover this printer")
            return
        zc = info = None
        try:
            addresses = _host_ipv4_addresses(self.bind_address)
            interfaces = zeroconf.InterfaceChoice.All
            if self.bind_address not in ("0.0.0.0", "::"):
                interfaces = [self.bind_address]
            zc = zeroconf.Zeroconf(interfaces=interfaces)
            host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())
            info = zeroconf.ServiceInfo(
                SERVICE_TYPE, "%s.%s" % (self.name, SERVICE_TYPE),
                addresses=[socket.inet_aton(a) for a in addresses],
                port=self.port, properties=self.properties,
                server="%s.local." % (host,))
            if self.stop_event.is_set():
                return
            zc.register_service(info, allow_name_change=True)
            logging.info("cura_connection: announced %s on %s",
                         info.name, ", ".join(addresses))
            self.stop_event.wait()
            zc.unregister_service(info)
        except Exception:
            logging.exception("cura_connection: zeroconf announcement")
        finally:
            if zc is not None:
                zc.close()

    def stop(self):
        self.stop_event.set()
        self.thread.join(5.)
