"""Frozen values shared by every layer: requests, targets, decisions, outcomes.

Pure data: no I/O, no clock. Decisions travel as values (``Outcome``) rather
than exceptions, so every path through the service ends in one record and one
reply line built from the same object.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from enum import StrEnum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class Status(StrEnum):
    OK = "OK"
    DENIED = "DENIED"
    FAILED = "FAILED"
    BUSY = "BUSY"
    ERROR = "ERROR"


class Code(StrEnum):
    # OK
    CONNECTED = "connected"
    # DENIED: nothing was attempted
    SOURCE_MISMATCH = "source_mismatch"
    ADDRESS_NOT_ALLOWED = "address_not_allowed"
    PORT_NOT_ALLOWED = "port_not_allowed"
    SELF_TARGET = "self_target"
    HOSTNAME_NOT_ALLOWED = "hostname_not_allowed"
    UNAUTHORIZED = "unauthorized"
    # FAILED: the callback was attempted
    CONNECTION_REFUSED = "connection_refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    RESET = "reset"
    NOT_VERIFIED = "not_verified"
    # BUSY
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    # ERROR: the message itself is bad
    MALFORMED = "malformed"
    TOO_LONG = "too_long"
    READ_TIMEOUT = "read_timeout"
    BAD_JSON = "bad_json"

    @property
    def status(self) -> Status:
        return CODE_STATUS[self]


CODE_STATUS: dict[Code, Status] = {
    Code.CONNECTED: Status.OK,
    **{
        c: Status.DENIED
        for c in (
            Code.SOURCE_MISMATCH,
            Code.ADDRESS_NOT_ALLOWED,
            Code.PORT_NOT_ALLOWED,
            Code.SELF_TARGET,
            Code.HOSTNAME_NOT_ALLOWED,
            Code.UNAUTHORIZED,
        )
    },
    **{
        c: Status.FAILED
        for c in (
            Code.CONNECTION_REFUSED,
            Code.TIMEOUT,
            Code.UNREACHABLE,
            Code.RESET,
            Code.NOT_VERIFIED,
        )
    },
    Code.RATE_LIMITED: Status.BUSY,
    Code.OVERLOADED: Status.BUSY,
    Code.MALFORMED: Status.ERROR,
    Code.TOO_LONG: Status.ERROR,
    Code.READ_TIMEOUT: Status.ERROR,
    Code.BAD_JSON: Status.ERROR,
}


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


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An address and port, always in canonical form (never the raw input text).

    The edge builds ``host`` as a ``registry.policy.addresses.Address``: parsed
    once, its analysis kept for policy, limits and cookies."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        if self.host.version == 6:
            return f"[{self.host.compressed}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
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
        return str(Endpoint(self.host, self.port))


@dataclass(frozen=True, slots=True)
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
