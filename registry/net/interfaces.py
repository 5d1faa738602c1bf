"""This host's own addresses: where students can reach the registry, and
whether an address is ours (a callback there would call the registry itself).

Read from the kernel each time, so they stay current as addresses come and go
(a laptop changing Wi-Fi, a container getting its address late).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from pathlib import Path

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_FIB_TRIE = Path("/proc/net/fib_trie")
_IF_INET6 = Path("/proc/net/if_inet6")


def interface_addresses() -> list[IPAddress]:
    """Every address assigned to an interface of this host (IPv4 first).

    Linux's /proc tables; elsewhere (or when they cannot be read) the empty
    list, and callers fall back to what they were configured with.
    """
    found: list[IPAddress] = []
    try:
        lines = _FIB_TRIE.read_text().splitlines()
    except OSError:
        lines = []
    for previous, line in zip(lines, lines[1:], strict=False):
        # "|-- 192.0.2.2" followed by "/32 host LOCAL" is an address of ours.
        if line.strip() == "/32 host LOCAL" and "|--" in previous:
            found.append(ipaddress.IPv4Address(previous.split("|--", 1)[1].strip()))
    try:
        rows = _IF_INET6.read_text().splitlines()
    except OSError:
        rows = []
    for row in rows:
        fields = row.split()
        if fields:
            found.append(ipaddress.IPv6Address(int(fields[0], 16)))
    unique = sorted(set(found), key=lambda a: (a.version, a.packed))
    return unique


def reachable(listen: list[tuple[str, int]]) -> list[str]:
    """The ``host:port`` strings students can send to, for the listeners given.

    A listener on a wildcard (``0.0.0.0`` or ``::``) is reachable at every
    interface address of its family except loopback and IPv6 link-local (which
    need a zone no student types); when the host has no other address, loopback
    is all there is, and that is said. A specific address is reachable there.
    """
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


def is_local_address(host: IPAddress) -> bool:
    """True when ``host`` is an address of this host (fail-closed: True when unsure).

    A bind probe: the kernel lets a socket bind only to its own addresses
    (``EADDRNOTAVAIL`` otherwise), and it knows every interface at this moment,
    so no address list can go stale. Unspecified and loopback addresses are
    always ours. Any other failure answers True, because the caller uses this to
    refuse calling the registry's own ports, and a wrong True only refuses
    those.
    """
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
