"""``student addresses``: this machine's interface addresses, classified for the lab.

The lab's step 3 ("type ``ip addr`` and find your primary interface") is where
most callbacks go wrong, so this lists every address with what it means for a
callback: loopback, link-local, container bridge, private, CGNAT or public,
and with ``--registry`` marks the one the kernel would use to reach the registry.

Parsing is pure (fixed text in, values out) and unit-tested; gathering tries
``ip -j addr`` first, then ``/proc/net/if_inet6`` and the ``SIOCGIFADDR`` ioctl,
and never fails because one source is missing.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK, LINK_LOCAL, CONTAINER = "loopback", "link-local", "container"
PRIVATE, CGNAT, PUBLIC, OTHER = "private", "cgnat", "public", "other"

KIND_NOTES: dict[str, str] = {
    LOOPBACK: "this machine only: the registry cannot call it (unless it runs here too)",
    LINK_LOCAL: "valid on one network segment only: the registry never calls it",
    CONTAINER: "a container network: reachable from outside only through published ports",
    PRIVATE: "private: reachable on this local network, not from the internet",
    CGNAT: "carrier-grade NAT: your provider's network, not reachable from outside",
    PUBLIC: "public: reachable from anywhere, unless a firewall blocks it",
    OTHER: "a special-purpose address: not usable for the lab",
}

# Interface names that container runtimes and VM managers give their bridges.
_CONTAINER_NAME = re.compile(
    r"^(docker\d*|br-[0-9a-f]+|cni\d*|podman\d*|veth\w*|virbr\d*|lxcbr\d*|lxdbr\d*"
    r"|cali\w*|flannel\S*|cilium\S*|weave|kube-bridge|vethwe\S*)$"
)
# Default networks of Docker (bridge) and Podman: seen from inside a container too.
_CONTAINER_NETS = tuple(ipaddress.ip_network(n) for n in ("172.17.0.0/16", "10.88.0.0/16"))
_CGNAT_NET = ipaddress.ip_network("100.64.0.0/10")
_PRIVATE_NETS = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)
# Documentation ranges: the SPEC lets them be targets, and test networks use them as "public".
_DOC_NETS = tuple(
    ipaddress.ip_network(n)
    for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
)


@dataclass(frozen=True, slots=True)
class InterfaceAddress:
    """One address of one interface."""

    ifname: str
    address: IPAddress
    prefixlen: int | None = None

    @property
    def kind(self) -> str:
        return classify(self.ifname, self.address)

    @property
    def cidr(self) -> str:
        text = self.address.compressed
        return f"{text}/{self.prefixlen}" if self.prefixlen is not None else text


def classify(ifname: str, address: IPAddress) -> str:
    """What an address means for a callback; the first matching class wins."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return LOOPBACK
    if address.is_link_local:
        return LINK_LOCAL
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return OTHER  # ipaddress calls some multicast "global": never an interface to advertise
    if _CONTAINER_NAME.match(ifname) or any(address in net for net in _CONTAINER_NETS):
        return CONTAINER
    if address in _CGNAT_NET:
        return CGNAT
    if any(address in net for net in _PRIVATE_NETS):
        return PRIVATE
    if address.is_global or any(address in net for net in _DOC_NETS):
        return PUBLIC
    return OTHER


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None


def parse_ip_json(text: str) -> list[InterfaceAddress]:
    """Addresses from ``ip -j addr`` output; malformed entries are skipped."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    found: list[InterfaceAddress] = []
    for iface in data if isinstance(data, list) else []:
        if not isinstance(iface, dict):
            continue
        name = str(iface.get("ifname", "?"))
        for info in iface.get("addr_info") or []:
            addr = _address(str(info.get("local", ""))) if isinstance(info, dict) else None
            if addr is None:
                continue
            prefix = info.get("prefixlen")
            found.append(InterfaceAddress(name, addr, prefix if isinstance(prefix, int) else None))
    return found


def parse_if_inet6(text: str) -> list[InterfaceAddress]:
    """IPv6 addresses from ``/proc/net/if_inet6`` (hex address, index, prefix, scope, flags, name)."""
    found: list[InterfaceAddress] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32:
            continue
        try:
            addr = ipaddress.IPv6Address(int(fields[0], 16))
            prefix = int(fields[2], 16)
        except ValueError:
            continue
        found.append(InterfaceAddress(fields[5], addr, prefix))
    return found


def _ip_json() -> str | None:
    try:
        done = subprocess.run(
            ["ip", "-j", "addr"], capture_output=True, text=True, timeout=3, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _proc_if_inet6() -> str | None:
    try:
        with open("/proc/net/if_inet6", encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


def _ioctl_ipv4() -> list[InterfaceAddress]:
    """IPv4 addresses by interface name (Linux ioctls); empty where unsupported."""
    try:
        import fcntl

        names = [name for _, name in socket.if_nameindex()]
    except (ImportError, OSError):
        return []
    found: list[InterfaceAddress] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            request = struct.pack("256s", name.encode()[:15])
            try:
                raw = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            addr = ipaddress.IPv4Address(raw[20:24])
            try:
                mask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, request)[20:24]
                prefix = bin(int.from_bytes(mask, "big")).count("1")
            except OSError:
                prefix = None
            found.append(InterfaceAddress(name, addr, prefix))
    return found


def gather(
    ip_json: Callable[[], str | None] = _ip_json,
    if_inet6: Callable[[], str | None] = _proc_if_inet6,
    ioctl_ipv4: Callable[[], list[InterfaceAddress]] = _ioctl_ipv4,
) -> list[InterfaceAddress]:
    """This machine's addresses from the best available source (never raises)."""
    text = ip_json()
    found = parse_ip_json(text) if text else []
    if not found:
        found = ioctl_ipv4() + parse_if_inet6(if_inet6() or "")
    unique: dict[tuple[str, IPAddress], InterfaceAddress] = {}
    for item in found:
        unique.setdefault((item.ifname, item.address), item)
    return list(unique.values())


def route_source(host: str, port: int) -> str | None:
    """The local address the kernel would use towards ``host:port``; ``None`` if no route.

    A UDP ``connect()`` only picks the route: no packet is sent.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(sockaddr)
            local = str(sock.getsockname()[0]).partition("%")[0]
    except (OSError, IndexError):
        return None
    addr = _address(local)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return local


def render(addresses: list[InterfaceAddress], chosen: str | None = None) -> list[str]:
    """The table printed by ``student addresses``; ``chosen`` is marked ``<- use this one``."""
    if not addresses:
        return ["No interface addresses found (neither `ip` nor /proc/net/if_inet6 is available)."]
    name_w = max(len(a.ifname) for a in addresses)
    cidr_w = max(len(a.cidr) for a in addresses)
    chosen_addr = _address(chosen) if chosen else None
    lines = []
    for a in sorted(addresses, key=lambda a: (a.address.version, a.ifname, a.address)):
        mark = "  <- use this one" if chosen_addr is not None and a.address == chosen_addr else ""
        lines.append(
            f"{a.ifname:<{name_w}}  {a.cidr:<{cidr_w}}  {a.kind:<10}  {KIND_NOTES[a.kind]}{mark}"
        )
    return lines


def run_addresses(
    registry: tuple[str, int] | None,
    out: Callable[[str], None],
    *,
    addresses: list[InterfaceAddress] | None = None,
    route: Callable[[str, int], str | None] = route_source,
) -> int:
    """Run ``student addresses``; exit 0, or 5 when ``--registry`` has no route."""
    found = gather() if addresses is None else addresses
    chosen = route(*registry) if registry is not None else None
    for line in render(found, chosen):
        out(line)
    if registry is None:
        return 0
    where = (
        f"[{registry[0]}]:{registry[1]}" if ":" in registry[0] else f"{registry[0]}:{registry[1]}"
    )
    if chosen is None:
        out(f"No route to the registry {where}: check the address and your network connection.")
        return 5
    if not any(a.address == _address(chosen) for a in found):
        out(f"The route to the registry {where} leaves from {chosen}.")
    else:
        out(
            f"Advertise {chosen}: it is the address your traffic to the registry {where} leaves from."
        )
    return 0
