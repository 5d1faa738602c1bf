"""Hostname resolution edge: one ``getaddrinfo`` per request, every answer returned.

The policy decides (``registry.policy.decide``): it refuses names unless
``policy.allow_hostnames`` is on, normalises the name, and after this resolver
answers, :func:`~registry.policy.decide.decide_resolved` judges *every*
address and returns the one to dial as an ``Endpoint`` holding an IP address.
The connector dials that address literally, so there is no second lookup and
no DNS-rebinding window between the check and the connect (SPEC promise 4).

This module only turns a name into addresses:

- ``SOCK_STREAM`` so each address comes once (not once per socket type);
- every address family (``AF_UNSPEC``): an IPv6 answer next to an IPv4 one is
  judged too, so a name cannot hide an internal address in the other family;
- an IPv6 scope id reported by the system is kept on the address
  (``fe80::1%2``), so the policy sees it and refuses it rather than the zone
  being silently dropped;
- answers that are no IP address (``AF_PACKET`` rows, garbage from a custom
  resolver) are left out; a name with too many answers is an error, because a
  request must be judged on all of its answers, not a sample.

The service wraps :meth:`TrioResolver.resolve` in ``fail_after(resolve_timeout)``
and turns ``OSError`` into ``DENIED hostname_not_allowed``; so every failure
here is raised as an ``OSError`` (``socket.gaierror`` is one).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

import trio

from registry.model import IPAddress

#: More answers than this is not a student's machine; refuse rather than sample.
MAX_ANSWERS = 64

_FAMILIES = (socket.AF_INET, socket.AF_INET6)


class TooManyAnswers(OSError):
    """The name resolved to more than :data:`MAX_ANSWERS` addresses."""


class TrioResolver:
    """Resolve names with ``trio.socket.getaddrinfo`` (the system resolver, in a thread).

    Stateless and safe to share between requests; trio's thread limiter bounds
    how many lookups run at once.
    """

    def __init__(self, max_answers: int = MAX_ANSWERS) -> None:
        self.max_answers = max_answers

    async def resolve(self, name: str, port: int) -> list[IPAddress]:
        """Every distinct IP address ``name`` resolves to, in the resolver's order.

        Raises ``OSError`` (``socket.gaierror`` for lookup failures,
        :class:`TooManyAnswers`); never returns a hostname.
        """
        try:
            rows = await trio.socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except UnicodeError as e:  # a name the IDNA codec refuses: a lookup failure
            raise socket.gaierror(socket.EAI_NONAME, f"cannot encode the name: {e}") from e
        addresses = addresses_from_getaddrinfo(rows)
        if len(addresses) > self.max_answers:
            raise TooManyAnswers(f"{len(addresses)} addresses (at most {self.max_answers})")
        return addresses


def addresses_from_getaddrinfo(rows: Iterable[Any]) -> list[IPAddress]:
    """The distinct IP addresses in ``getaddrinfo`` result rows, first occurrence first.

    A row is ``(family, type, proto, canonname, sockaddr)``; rows of other
    families or with an unparseable address are skipped.
    """
    out: dict[IPAddress, None] = {}
    for row in rows:
        addr = _row_address(row)
        if addr is not None:
            out.setdefault(addr, None)
    return list(out)


def _row_address(row: Any) -> IPAddress | None:
    try:
        family, sockaddr = row[0], row[4]
        if family not in _FAMILIES or not isinstance(sockaddr[0], str):
            return None
        host = sockaddr[0]
        # Keep a scope id the system reported (only IPv6 sockaddrs have one),
        # unless the host text already carries it.
        if family == socket.AF_INET6 and len(sockaddr) >= 4 and sockaddr[3] and "%" not in host:
            host = f"{host}%{int(sockaddr[3])}"
        addr = ipaddress.ip_address(host)
    except (IndexError, TypeError, ValueError):
        return None
    expected = 4 if family == socket.AF_INET else 6
    return addr if addr.version == expected else None
