"""The Address value: normalisation and classification from explicit range tables.

Pure. The edge builds one :class:`Address` per address it meets; every policy
check runs on its normalised form (``norm``), so an IPv4 address wrapped in an
IPv6 form is judged as the IPv4 address it reaches. Why our own tables and not
``ipaddress.is_global``, and which embeddings are unwrapped how:
docs/architecture.md, "Addresses".
"""

from __future__ import annotations

import functools
import ipaddress
import re
from enum import StrEnum
from typing import Any, NamedTuple

from registry.model import IPAddress

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_MASK32 = 0xFFFFFFFF


class AddrClass(StrEnum):
    """What an address is, for policy and diagnosis."""

    GLOBAL = "global"
    DOCUMENTATION = "documentation"  # RFC 5737 / 3849 / 9637: allowed, behaves as public
    PRIVATE = "private"  # RFC 1918, ULA, benchmarking
    CGNAT = "cgnat"  # RFC 6598 shared space, DS-Lite B4
    LOOPBACK = "loopback"
    LINK_LOCAL = "link_local"
    UNSPECIFIED = "unspecified"
    BROADCAST = "broadcast"
    MULTICAST = "multicast"
    RESERVED = "reserved"
    METADATA = "metadata"  # cloud instance-metadata services outside link-local


_C = AddrClass
#: Classes that are never a callback target, whatever the mode or allow list.
ALWAYS_DENIED = frozenset(
    {_C.UNSPECIFIED, _C.BROADCAST, _C.MULTICAST, _C.LINK_LOCAL, _C.RESERVED, _C.METADATA}
)

#: Classes that act as "the public internet" for NAT diagnosis.
PUBLIC = frozenset({_C.GLOBAL, _C.DOCUMENTATION})


class Range(NamedTuple):
    """One row of a range table: the network, its class and why it is listed."""

    network: Network
    cls: AddrClass
    note: str


# Longest prefix wins, so a row may carve an exception out of a wider one
# (255.255.255.255 out of 240/4, 192.0.0.0/29 out of 192.0.0.0/24).
_V4_ROWS: tuple[tuple[str, AddrClass, str], ...] = (
    ("0.0.0.0/0", _C.GLOBAL, "public internet"),
    ("0.0.0.0/8", _C.RESERVED, "'this network', RFC 1122; Linux dials 0.x as the local host"),
    ("0.0.0.0/32", _C.UNSPECIFIED, "the unspecified address, a bind address"),
    ("10.0.0.0/8", _C.PRIVATE, "private network, RFC 1918"),
    ("100.64.0.0/10", _C.CGNAT, "carrier-grade NAT shared space, RFC 6598"),
    ("100.100.100.200/32", _C.METADATA, "Alibaba Cloud instance metadata"),
    ("127.0.0.0/8", _C.LOOPBACK, "loopback, RFC 1122"),
    ("168.63.129.16/32", _C.METADATA, "Azure platform WireServer"),
    ("169.254.0.0/16", _C.LINK_LOCAL, "link-local, RFC 3927"),
    ("169.254.169.254/32", _C.LINK_LOCAL, "link-local cloud instance metadata service"),
    ("172.16.0.0/12", _C.PRIVATE, "private network, RFC 1918"),
    ("192.0.0.0/24", _C.RESERVED, "IETF protocol assignments, RFC 6890"),
    ("192.0.0.0/29", _C.CGNAT, "DS-Lite B4/AFTR, RFC 6333"),
    ("192.0.2.0/24", _C.DOCUMENTATION, "TEST-NET-1 documentation, RFC 5737"),
    ("192.88.99.0/24", _C.RESERVED, "deprecated 6to4 relay anycast, RFC 7526"),
    ("192.168.0.0/16", _C.PRIVATE, "private network, RFC 1918"),
    ("198.18.0.0/15", _C.PRIVATE, "benchmarking, RFC 2544"),
    ("198.51.100.0/24", _C.DOCUMENTATION, "TEST-NET-2 documentation, RFC 5737"),
    ("203.0.113.0/24", _C.DOCUMENTATION, "TEST-NET-3 documentation, RFC 5737"),
    ("224.0.0.0/4", _C.MULTICAST, "multicast, RFC 5771"),
    ("240.0.0.0/4", _C.RESERVED, "reserved for future use, RFC 1112"),
    ("255.255.255.255/32", _C.BROADCAST, "limited broadcast, RFC 919"),
)
# Outside 2000::/3, fc00::/7, fe80::/10 and ff00::/8 nothing is allocated for
# unicast, hence the RESERVED default. Embedded forms never reach this table
# (they are unwrapped first); the embedding prefixes that remain after a failed
# unwrap (64:ff9b:1::/48 with another layout) land in ::/8, i.e. RESERVED.
_V6_ROWS: tuple[tuple[str, AddrClass, str], ...] = (
    ("::/0", _C.RESERVED, "not allocated for unicast (IANA)"),
    ("::/128", _C.UNSPECIFIED, "the unspecified address, a bind address"),
    ("::1/128", _C.LOOPBACK, "loopback, RFC 4291"),
    ("64:ff9b:1::/48", _C.RESERVED, "NAT64 local-use prefix with an ambiguous layout"),
    ("100::/64", _C.RESERVED, "discard-only, RFC 6666"),
    ("2000::/3", _C.GLOBAL, "public internet"),
    ("2001::/23", _C.RESERVED, "IETF protocol assignments, RFC 2928"),
    ("2001:2::/48", _C.PRIVATE, "benchmarking, RFC 5180"),
    ("2001:db8::/32", _C.DOCUMENTATION, "documentation, RFC 3849"),
    ("3fff::/20", _C.DOCUMENTATION, "documentation, RFC 9637"),
    ("fc00::/7", _C.PRIVATE, "unique local address, RFC 4193"),
    ("fd00:ec2::254/128", _C.METADATA, "AWS IPv6 instance metadata"),
    ("fe80::/10", _C.LINK_LOCAL, "link-local, RFC 4291"),
    ("fec0::/10", _C.RESERVED, "deprecated site-local, RFC 3879"),
    ("ff00::/8", _C.MULTICAST, "multicast, RFC 4291"),
)


def _table(rows: tuple[tuple[str, AddrClass, str], ...]) -> tuple[Range, ...]:
    parsed = [Range(ipaddress.ip_network(n), c, why) for n, c, why in rows]
    return tuple(sorted(parsed, key=lambda r: r.network.prefixlen, reverse=True))


_V4_TABLE = _table(_V4_ROWS)
_V6_TABLE = _table(_V6_ROWS)


class Embedding(StrEnum):
    """The IPv6 forms that carry an IPv4 address."""

    MAPPED = "IPv4-mapped"
    TRANSLATED = "IPv4-translated"
    COMPATIBLE = "IPv4-compatible"
    NAT64 = "NAT64"
    NAT64_LOCAL = "NAT64 local-use"
    SIX_TO_FOUR = "6to4"
    TEREDO = "Teredo"


_NET = ipaddress.IPv6Network
_MAPPED = _NET("::ffff:0:0/96")
_TRANSLATED = _NET("::ffff:0:0:0/96")
_COMPATIBLE = _NET("::/96")
_NAT64 = _NET("64:ff9b::/96")
_NAT64_LOCAL = _NET("64:ff9b:1::/48")
_SIX_TO_FOUR = _NET("2002::/16")
_TEREDO = _NET("2001::/32")


class Unwrapped(NamedTuple):
    """An embedding found in an IPv6 address: its kind, the IPv4 inside, and ``also``
    any further IPv4 it carries (the Teredo server: judged, never dialled)."""

    kind: Embedding
    inner: IPv4
    also: tuple[IPv4, ...] = ()


def _low32(value: int) -> IPv4:
    return IPv4(value & _MASK32)


def _unwrap(addr: IPAddress) -> Unwrapped | None:
    """The IPv4 embedded in ``addr`` (one level, no zone id), or None for a plain address."""
    if not isinstance(addr, IPv6):
        return None
    value = int(addr)
    if addr in _MAPPED:
        return Unwrapped(Embedding.MAPPED, _low32(value))
    if addr in _TRANSLATED:
        return Unwrapped(Embedding.TRANSLATED, _low32(value))
    if addr in _COMPATIBLE and value > 1:  # :: and ::1 are themselves, not 0.0.0.x
        return Unwrapped(Embedding.COMPATIBLE, _low32(value))
    if addr in _NAT64:
        return Unwrapped(Embedding.NAT64, _low32(value))
    if addr in _NAT64_LOCAL and (value >> 32) & ((1 << 48) - 1) == 0:
        return Unwrapped(Embedding.NAT64_LOCAL, _low32(value))
    if addr in _SIX_TO_FOUR:
        return Unwrapped(Embedding.SIX_TO_FOUR, _low32(value >> 80))
    if addr in _TEREDO:
        server = _low32(value >> 64)
        return Unwrapped(Embedding.TEREDO, _low32(~value), (server,))
    return None


def _row(addr: IPAddress) -> Range:
    """The most specific table row for an address that embeds nothing."""
    table = _V4_TABLE if addr.version == 4 else _V6_TABLE
    for row in table:
        if addr in row.network:
            return row
    raise AssertionError("unreachable: every table has a /0 row")


class Address:
    """One address as the registry knows it: built once at the edge, then only read.

    An :class:`Address4` or :class:`Address6` *is* the stdlib address (zone id
    stripped, kept in ``zone``), so sockets and networks take it as it is. The
    rest is worked out on first read, once per value: ``norm`` (the address
    judged and dialled: the IPv4 inside any embedding, else itself),
    ``embedding`` (or None), ``inner`` (itself and every IPv4 it carries),
    ``row`` (the table row of ``norm``), ``denied`` (the always-denied class of
    any of its forms) with ``culprit`` (that form and its row), ``display``.
    """

    __slots__ = ()
    zone: str | None
    norm: Address
    embedding: Unwrapped | None
    inner: tuple[IPAddress, ...]
    row: Range
    denied: AddrClass | None
    culprit: tuple[IPAddress, Range]
    display: str
    text: str  # str(self), kept

    @staticmethod
    def of(value: IPAddress | str) -> Address:
        """``value`` as an Address; an Address is returned as it is (no new analysis)."""
        if isinstance(value, Address):
            return value
        ip = ipaddress.ip_address(value) if isinstance(value, str) else value
        if isinstance(ip, IPv6):
            return Address6(int(ip), ip.scope_id)
        return Address4(int(ip))

    def __getattr__(self, name: str) -> Any:  # only for a slot not yet filled
        if name == "text":  # no analysis: every new source of a flood is shown
            text = self.text = super().__str__()
            return text
        if name not in _LAZY:
            raise AttributeError(name)
        self._analyse()
        return getattr(self, name)

    def __str__(self) -> str:
        # ipaddress renders the text anew each time; an Address is shared (the
        # parser's and the edge's caches) and shown three times a registration (-25,000 instructions per registration).
        return self.text  # type: ignore[no-any-return]

    def _analyse(self) -> None:
        # Every embedding holds an IPv4, which embeds nothing: one level is all there is.
        found = self.embedding = _unwrap(self)
        if found is None:
            self.row, self.norm, self.inner = _row(self), self, (self,)
        else:
            self.row = _row(found.inner)
            self.norm = _settled(found.inner, self.row)
            self.inner = tuple(dict.fromkeys([self, *found.also, self.norm]))
        self.culprit = (self.norm, self.row)
        self.denied = None
        for form in (self.norm, *self.inner[1:]):
            row = self.row if form is self.norm else _row(form)
            if row.cls in ALWAYS_DENIED:
                self.denied, self.culprit = row.cls, (form, row)
                break
        self.display = _display(self, found)

    @property
    def cls(self) -> AddrClass:
        return self.row.cls

    @property
    def family(self) -> int:
        """4 or 6: the family the registry would call, so ``::ffff:a.b.c.d`` is 4."""
        return self.norm.version  # type: ignore[attr-defined, no-any-return]

    @property
    def peer(self) -> Address:
        """This address as a peer: a dual-stack socket's ``::ffff:a.b.c.d`` is the
        IPv4 host a.b.c.d; every other form is itself (limits and cookies key on it)."""
        if isinstance(self, IPv4) or int(self) >> 32 != 0xFFFF:  # ::ffff:0:0/96
            return self  # no analysis: every new source of a flood passes here
        return self.norm


_LAZY = frozenset({"norm", "embedding", "inner", "row", "denied", "culprit", "display"})
_SLOTS = ("zone", "text", *sorted(_LAZY))


class Address4(Address, IPv4):
    __slots__ = _SLOTS

    def __init__(self, value: int | str) -> None:
        super().__init__(value)
        self.zone = None


class Address6(Address, IPv6):
    __slots__ = _SLOTS

    def __init__(self, value: int | str, zone: str | None = None) -> None:
        super().__init__(value)
        self.zone = zone


_DEC_OCTET = re.compile(r"(?:0|[1-9][0-9]{0,2})", re.ASCII)


@functools.lru_cache(maxsize=4096)
def dotted_quad(text: str) -> Address4 | None:
    """``text`` as an Address4 when it is a canonical dotted quad (four decimal parts,
    0-255, no leading zero), else None. One shared value per text: a class
    advertises the same few addresses again and again, and a hit skips the check,
    the parse and, the value being analysed once, the range lookups (-100,000
    instructions per registration)."""
    parts = text.split(".")
    if len(parts) == 4 and all(_DEC_OCTET.fullmatch(p) and int(p) <= 255 for p in parts):
        return Address4(text)
    return None


def _settled(ip: IPAddress, row: Range) -> Address:
    """An embedded IPv4 as an Address whose analysis is already known (it embeds nothing)."""
    addr = Address4(int(ip))
    addr.norm, addr.embedding, addr.inner, addr.row = addr, None, (addr,), row
    addr.denied = row.cls if row.cls in ALWAYS_DENIED else None
    addr.culprit, addr.display = (addr, row), str(addr)
    return addr


# --- hostnames -------------------------------------------------------------

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


def normalise_hostname(name: str) -> str:
    """Lower-case ``name`` and drop one trailing dot; ValueError if it is no hostname:
    brackets, empty or long labels, anything but letters, digits, ``-`` and ``_``
    (IDNs come as punycode), or a numeric last label (``127.1``, ``0x7f.1``: IPv4
    to resolvers, spellings the protocol refuses)."""
    if "[" in name or "]" in name:
        raise ValueError("brackets belong to IPv6 literals, not hostnames")
    host = name.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > 253:
        raise ValueError("a hostname has 1 to 253 characters")
    labels = host.split(".")
    for label in labels:
        if not _LABEL.match(label):
            raise ValueError(
                f"bad hostname label {ascii_safe(label)!r}: use letters, digits and '-' (1-63 each)"
            )
    if _NUMERIC.match(labels[-1]):
        raise ValueError(f"{ascii_safe(host)!r} looks like an IPv4 address in an unusual spelling")
    return host


def ascii_safe(text: str, limit: int = 64) -> str:
    """``text`` made ASCII-safe and short, for explanations."""
    safe = text.encode("ascii", "backslashreplace").decode("ascii")
    safe = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in safe)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


def _display(addr: IPAddress, found: Unwrapped | None) -> str:
    """The address as a person writes it: zone dropped, IPv6 compressed, and an
    IPv4 in the low 32 bits shown dotted (``::ffff:127.0.0.1``, RFC 5952 s5), so
    students recognise the address they wrote."""
    if found is None or found.kind in (Embedding.SIX_TO_FOUR, Embedding.TEREDO):
        return addr.compressed
    high = IPv6(int(addr) & ~_MASK32).compressed
    if high.endswith("::"):
        return f"{high}{found.inner}"
    return f"{high.removesuffix('0:0')}{found.inner}"
