"""Values shared by every layer: requests, targets, decisions, outcomes.

Pure data: no I/O, no clock, never changed once built (frozen, but for
``Endpoint``, ``Request`` and ``Outcome``, built on every registration: see
``Endpoint``). Decisions travel as values
(``Outcome``) rather than exceptions, so every path through the service ends
in one record and one reply line built from the same object.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Status(StrEnum):
    OK = "OK"
    DENIED = "DENIED"
    FAILED = "FAILED"
    BUSY = "BUSY"
    ERROR = "ERROR"


# Best first: a student's best attempt (grading, and the store's summary SQL).
STATUS_RANK: dict[str, int] = {"OK": 0, "FAILED": 1, "DENIED": 2, "BUSY": 3, "ERROR": 4}


class Code(StrEnum):
    CONNECTED = "connected"
    SOURCE_MISMATCH = "source_mismatch"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    PORT_NOT_ALLOWED = "port_not_allowed"
    SELF_TARGET = "self_target"
    HOSTNAME_NOT_ALLOWED = "hostname_not_allowed"
    UNAUTHORIZED = "unauthorized"
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    RESET = "reset"
    NOT_VERIFIED = "not_verified"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    MALFORMED = "malformed"
    TOO_LONG = "too_long"
    READ_TIMEOUT = "read_timeout"
    BAD_JSON = "bad_json"

    status: Status  # set on each member below (a plain attribute: read ~5 times a registration)


# DENIED: nothing was attempted; FAILED: the callback was; ERROR: the message is bad.
_CODES_OF = {
    Status.OK: "connected",
    Status.DENIED: "source_mismatch address_not_allowed port_not_allowed self_target "
    "hostname_not_allowed unauthorized",
    Status.FAILED: "connection_refused timeout unreachable reset not_verified",
    Status.BUSY: "rate_limited overloaded",
    Status.ERROR: "malformed too_long read_timeout bad_json",
}
CODE_STATUS = {Code(code): status for status, codes in _CODES_OF.items() for code in codes.split()}
for _code, _status in CODE_STATUS.items():
    _code.status = _status


class Diagnosis(StrEnum):
    """How the advertised address relates to the observed peer (SPEC: NAT cases)."""

    DIRECT = "direct"
    LOOPBACK_ADVERTISED = "loopback_advertised"
    UNSPECIFIED_ADVERTISED = "unspecified_advertised"
    PRIVATE_BEHIND_NAT = "private_behind_nat"
    CGNAT = "cgnat"
    CONTAINER_NAT = "container_nat"
    DIFFERENT_HOST = "different_host"
    LINK_LOCAL_ADVERTISED = "link_local_advertised"
    FAMILY_MISMATCH = "family_mismatch"
    HOSTNAME = "hostname"  # advertised a name: nothing to compare until resolved


class Protocol(StrEnum):
    TEXT = "text"
    JSON = "json"
    UDP = "udp"


# Endpoint, Request and Outcome, built on every registration, are values nobody
# assigns to, but not frozen: a frozen dataclass sets each field through
# object.__setattr__, ~1,400 instructions a field (-35,000 a registration). Hashed
# by value (sets of endpoints; the doorway caches replies by Outcome): never
# change one (``Outcome.with_`` copies).
@dataclass(slots=True, unsafe_hash=True)
class Endpoint:
    """An address and port, always in canonical form (never the raw input text); the
    edge builds ``host`` as a ``policy.addresses.Address`` (parsed once, analysis kept)."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        return _host_port(self.host, self.port)


def _host_port(host: IPAddress, port: int) -> str:
    text = str(host)  # not format(): ipaddress parses a format spec there first
    return f"[{text}]:{port}" if host.version == 6 else f"{text}:{port}"


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see Endpoint
class Request:
    """One parsed registration request, before any policy.

    ``host`` is an IP address for literal addresses and a lower-cased name
    (no trailing dot) for a hostname; only policy decides whether names are
    acceptable.
    """

    host: IPAddress | str
    port: int
    student: str | None = None
    token: str | None = None
    verify: bool | None = None  # None: the policy default
    cookie: str | None = None

    @property
    def advertised(self) -> str:
        if isinstance(self.host, str):
            return f"{self.host}:{self.port}"
        return _host_port(self.host, self.port)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see Endpoint
class Outcome:
    """The single result of one registration: recorded, logged and replied."""

    code: Code
    explanation: str
    id: str | None = None
    target: str | None = None  # what was (or would have been) dialled
    advertised: str | None = None  # what the client said
    observed: str | None = None  # the peer address the registry saw
    diagnosis: Diagnosis | None = None
    rtt_ms: float | None = None
    verified: bool | None = None
    retry_after: int | None = None
    corrected: bool = False  # nat-observed mode replaced the advertised host
    student: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def status(self) -> Status:
        return self.code.status

    def with_(self, **changes: object) -> Outcome:
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class GradeRow:
    """One student's standing (a roster student, a name, or a nameless source IP); the
    store's summary gives one per group. ``best_code``: the most recent attempt that
    reached ``best_status``."""

    student: str | None
    source: str | None  # the observed IP of a nameless row, else None
    attempts: int = 0
    successes: int = 0
    best_status: str | None = None
    best_code: str | None = None
    first_success_at: float | None = None
    last_attempt_at: float | None = None
    verified_ever: bool = False
    last_status: str | None = None
    last_code: str | None = None
    last_explanation: str | None = None  # the last outcome in plain words
    on_roster: bool = False

    @property
    def label(self) -> str:
        return self.student if self.student is not None else f"(no name) {self.source}"

    @property
    def done(self) -> bool:
        return self.best_status == "OK"


# --- the config's values with units, parsed from TOML by registry.config -------

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour)\s*$")


class Duration(float):
    """Seconds; written in TOML as ``"250ms"``, ``"5s"``, ``"2m"``, ``"1h"``, ``"30d"`` or a number.

    A subclass may set a range (``positive``, ``most``): msgspec's ``Meta``
    constraints apply to builtin types only, so ``parse`` checks it.
    """

    positive = False
    most = math.inf
    expect = ""

    @classmethod
    def parse(cls, value: object) -> Duration:
        if isinstance(value, bool):
            raise TypeError(f'expected a duration like "5s", got {value!r}')
        if isinstance(value, int | float):
            if value < 0:
                raise ValueError(f"expected a non-negative duration, got {value!r}")
            seconds = float(value)
        elif isinstance(value, str):
            m = _DURATION_RE.match(value)
            if not m:
                raise ValueError(f'expected a duration like "250ms", "5s", "2m", got "{value}"')
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise TypeError(f'expected a duration like "5s", got {type(value).__name__}')
        if (cls.positive and seconds <= 0) or seconds > cls.most:
            raise ValueError(cls.expect)
        return cls(seconds)


class _Value:
    """A value equal, hashed and shown by its slots."""

    __slots__: tuple[str, ...] = ()

    def _key(self) -> tuple[object, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self}')"


class Rate(_Value):
    """``"N/unit"`` with unit second, minute or hour, N >= 1: N events per period."""

    __slots__ = ("count", "period")

    def __init__(self, count: int, period: float) -> None:
        self.count, self.period = count, period

    @classmethod
    def parse(cls, value: object) -> Rate:
        m = _RATE_RE.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError(f'expected "N/unit", got {value!r}'.replace("'", '"'))
        if int(m.group(1)) < 1:
            raise ValueError(f'expected N >= 1 in "N/unit", got "{value}"')
        return cls(int(m.group(1)), _RATE_UNITS[m.group(2)])

    @property
    def per_second(self) -> float:
        return self.count / self.period

    def __str__(self) -> str:
        unit = {v: k for k, v in _RATE_UNITS.items()}.get(self.period, f"{self.period}s")
        return f"{self.count}/{unit}"


class PortRange(_Value):
    """``"1024-65535"`` or ``"15000"``: an inclusive range of TCP/UDP ports."""

    __slots__ = ("low", "high")

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    @classmethod
    def parse(cls, value: object) -> PortRange:
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and re.fullmatch(r"\s*\d{1,5}\s*(-\s*\d{1,5}\s*)?", value):
            parts = [int(p) for p in value.split("-")]
            low, high = parts[0], parts[-1]
        else:
            raise ValueError(f'expected a port range like "10000-20000", got {value!r}')
        if not (1 <= low <= high <= 65535):
            raise ValueError(f"expected ports within 1-65535 with low <= high, got {value!r}")
        return cls(low, high)

    def __contains__(self, port: int) -> bool:
        return self.low <= port <= self.high

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


class CIDR(_Value):
    """A ``"10.0.0.0/8"`` network from the config; ``.network`` is the ipaddress object.

    A wrapper because msgspec allows one custom type per union.
    """

    __slots__ = ("network",)

    def __init__(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.network = network

    @classmethod
    def parse(cls, value: object) -> CIDR:
        if not isinstance(value, str):
            raise TypeError(f'expected a CIDR network like "10.0.0.0/8", got {value!r}')
        try:
            return cls(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError as e:
            raise ValueError(
                f'expected a CIDR network like "10.0.0.0/8", got "{value}" ({e})'
            ) from None

    @property
    def version(self) -> int:
        return self.network.version

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, IPAddress) and (
            addr.version == self.network.version and addr in self.network
        )

    def __str__(self) -> str:
        return str(self.network)
