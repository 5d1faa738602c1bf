"""Hostname resolution edge: one ``getaddrinfo`` per request, every answer returned.

The policy judges *every* address (``policy.decide.decide_resolved``) and the
connector dials the one it returns literally: no second lookup, no DNS-rebinding
window between the check and the connect (SPEC promise 4). Every family, so a
name cannot hide an internal address in the other one; each address once; an
IPv6 scope id the system reports is kept (``fe80::1%2``), so the policy refuses
it rather than the zone being dropped. Every failure is an ``OSError``, which
the service answers with ``DENIED hostname_not_allowed``.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import trio

from registry.model import IPAddress

#: More answers than this is not a student's machine: a request is judged on all
#: of its answers, never a sample, so it is refused.
MAX_ANSWERS = 64

_VERSIONS = {socket.AF_INET: 4, socket.AF_INET6: 6}


class TooManyAnswers(OSError):
    """The name resolved to more than :data:`MAX_ANSWERS` addresses."""


class TrioResolver:
    """``trio.socket.getaddrinfo`` (the system resolver, in a thread); stateless."""

    def __init__(self, max_answers: int = MAX_ANSWERS) -> None:
        self.max_answers = max_answers

    async def resolve(self, name: str, port: int) -> list[IPAddress]:
        """Every distinct IP address ``name`` resolves to, in the resolver's order."""
        try:  # SOCK_STREAM: each address once, not once per socket type
            rows = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except UnicodeError as e:  # a name the IDNA codec refuses: a lookup failure
            raise socket.gaierror(socket.EAI_NONAME, f"cannot encode the name: {e}") from e
        addresses = addresses_from_getaddrinfo(rows)
        if len(addresses) > self.max_answers:
            raise TooManyAnswers(f"{len(addresses)} addresses (at most {self.max_answers})")
        return addresses


def addresses_from_getaddrinfo(rows: Iterable[Any]) -> list[IPAddress]:
    """The distinct IP addresses in ``(family, type, proto, canonname, sockaddr)`` rows,
    first occurrence first; rows of other families (``AF_PACKET``) or garbage skipped."""
    out: dict[IPAddress, None] = {}
    for row in rows:
        addr = _row_address(row)
        if addr is not None:
            out.setdefault(addr, None)
    return list(out)


def _row_address(row: Any) -> IPAddress | None:
    try:
        family, sockaddr = row[0], row[4]
        host = sockaddr[0]
        if family not in _VERSIONS or not isinstance(host, str):
            return None
        # only IPv6 sockaddrs carry a scope id; keep it unless the text has it already
        if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3] and "%" not in host:
            host = f"{host}%{int(sockaddr[3])}"
        addr = ipaddress.ip_address(host)
    except (IndexError, TypeError, ValueError):
        return None
    return addr if addr.version == _VERSIONS[family] else None
