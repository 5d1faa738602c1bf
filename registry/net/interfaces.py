"""This host's own addresses: where students can reach the registry, and
whether an address is ours (a callback there would call the registry itself).

Read from the kernel each time, so they stay current as addresses come and go
(a laptop changing Wi-Fi, a container getting its address late).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path

from registry.model import Endpoint

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_FIB_TRIE = Path("/proc/net/fib_trie")
_IF_INET6 = Path("/proc/net/if_inet6")


def interface_addresses() -> list[IPAddress]:
    """Every address of this host's interfaces, IPv4 first, from Linux's /proc tables;
    elsewhere (or unreadable) none, and callers use what they were configured with."""
    found: set[IPAddress] = set()
    lines = _lines(_FIB_TRIE)
    for previous, line in zip(lines, lines[1:], strict=False):
        # "|-- 192.0.2.2" followed by "/32 host LOCAL" is an address of ours.
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            found.add(ipaddress.IPv4Address(previous.split("|--", 1)[1].strip()))
    for row in _lines(_IF_INET6):
        if row.split():
            found.add(ipaddress.IPv6Address(int(row.split()[0], 16)))
    return sorted(found, key=lambda a: (a.version, a.packed))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def reachable(listen: list[tuple[str, int]]) -> list[str]:
    """The ``host:port`` strings students can send to, for the listeners given: a
    wildcard's every address of its family but loopback and IPv6 link-local (which
    needs a zone no student types), or loopback when there is nothing else."""
    shown: list[str] = []
    addresses = interface_addresses()
    for host, port in listen:
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified:
            candidates = [ip]
        else:
            same_family = [a for a in addresses if a.version == ip.version]
            candidates = [a for a in same_family if not a.is_loopback and not a.is_link_local]
            if not candidates:
                candidates = [a for a in same_family if a.is_loopback]
        for a in candidates:
            text = f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}"
            if text not in shown:
                shown.append(text)
    return shown


def send_to(listening: Iterable[Endpoint]) -> list[str]:
    """``reachable`` for the registry's own listeners: the addresses its ``listening``
    log event names, which the console's banner shows."""
    return reachable([(str(e.host), e.port) for e in listening])


def is_local_address(host: IPAddress) -> bool:
    """True when ``host`` is an address of this host, by a bind probe: the kernel
    binds only its own addresses (``EADDRNOTAVAIL`` otherwise) and knows them now,
    so no list goes stale. Fail-closed: any other failure is True, since the caller
    refuses to call the registry's own ports, and a wrong True only refuses those."""
    if host.is_unspecified or host.is_loopback:
        return True
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return is_local_address(host.ipv4_mapped)
    family = socket.AF_INET6 if host.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(host), 0))
    except OSError as exc:
        return exc.errno != errno.EADDRNOTAVAIL
    return True
