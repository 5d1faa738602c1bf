"""The callback policy: may the registry call the advertised endpoint back?

Pure and total: :func:`decide` and :func:`decide_resolved` return a value for
every input and never raise (a bug inside fails closed as a Deny). The order
of the checks (first failure wins), the three modes and the self rule are in
docs/architecture.md, "Callback policy"; the address dialled is always the
normalised one that was checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry.config import PolicyConfig
from registry.model import CIDR, Code, Diagnosis, Endpoint, IPAddress, Request
from registry.policy.addresses import AddrClass, Address, ascii_safe, normalise_hostname
from registry.policy.diagnosis import diagnose, explain

# config.py validates policy.mode against the same names; a PolicyConfig built in
# code skips that, so an unknown mode still acts as strict here.
MODES = ("strict", "nat-observed", "advertised")
_IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)

IsLocal = Callable[[IPAddress], bool]


def no_host_addresses(_host: IPAddress) -> bool:  # only loopback and explicit hosts are ours
    return False


# Allow, Deny and _Rules are built for every request: values never assigned to, but
# not frozen (object.__setattr__ per field, as for model.Endpoint).
@dataclass(slots=True, unsafe_hash=True)
class Allow:
    """Call ``target`` back. ``corrected``: nat-observed replaced the advertised host."""

    target: Endpoint
    diagnosis: Diagnosis
    corrected: bool = False
    report_only: tuple[str, ...] = ()  # "would deny: in 10.0.0.0/8" notes for the log


@dataclass(slots=True, unsafe_hash=True)
class Deny:
    """Refuse without attempting anything; ``code`` is a DENIED reply code."""

    code: Code
    explanation: str
    diagnosis: Diagnosis | None = None


@dataclass(frozen=True)
class NeedsResolution:
    """The request names a host: resolve ``name`` once, then call :func:`decide_resolved`."""

    name: str
    port: int


Decision = Allow | Deny


@dataclass(slots=True)
class _Rules:
    """What a request is judged against: the policy and the registry's own sockets."""

    policy: PolicyConfig
    own: frozenset[Endpoint]
    is_local: IsLocal


def decide(
    request: Request,
    observed: Endpoint,
    policy: PolicyConfig,
    own: frozenset[Endpoint] = frozenset(),
    is_local: IsLocal = no_host_addresses,
) -> Decision | NeedsResolution:
    """Judge one request against the policy (docs/architecture.md, "Callback policy")."""
    try:
        host = getattr(request, "host", None)
        if isinstance(host, str):
            return _hostname(request, observed, policy)
        seen = _peer(observed)
        if isinstance(seen, Deny):
            return seen
        port = getattr(request, "port", None)
        return _decide_ip(host, port, seen, _Rules(policy, own, is_local))
    except Exception as e:  # totality: a bug here must refuse, never crash the handler
        return _internal(e)


def decide_resolved(
    request: Request,
    addresses: list[IPAddress],
    observed: Endpoint,
    policy: PolicyConfig,
    own: frozenset[Endpoint] = frozenset(),
    is_local: IsLocal = no_host_addresses,
) -> Decision:
    """Judge every resolved answer for ``request.host``; return the one address to
    dial (every answer must pass; docs/architecture.md, "Callback policy")."""
    try:
        name = ascii_safe(str(getattr(request, "host", "")))
        seen = _peer(observed)
        if isinstance(seen, Deny):
            return seen
        answers = [a for a in dict.fromkeys(addresses) if isinstance(a, _IP_TYPES)]
        if not answers:
            return Deny(
                Code.HOSTNAME_NOT_ALLOWED,
                f"{name} did not resolve to any address; advertise an IP address instead.",
                Diagnosis.HOSTNAME,
            )
        return _pick(name, answers, request.port, seen, _Rules(policy, own, is_local))
    except Exception as e:  # totality, as in decide()
        return _internal(e)


def _pick(name: str, answers: list[IPAddress], port: int, seen: Address, rules: _Rules) -> Decision:
    allowed: list[Allow] = []
    mismatch: Deny | None = None
    for answer in answers:
        addr = Address.of(answer)
        d = _decide_ip(addr, port, seen, rules)
        if isinstance(d, Allow):
            allowed.append(d)
        elif d.code is Code.SOURCE_MISMATCH:
            mismatch = mismatch or d
        else:
            why = f"{name} resolved to {addr.display}: {d.explanation}"
            return Deny(d.code, why, d.diagnosis)
    if allowed:  # an answer that is the peer itself first
        return next((a for a in allowed if a.diagnosis is Diagnosis.DIRECT), allowed[0])
    assert mismatch is not None
    return Deny(
        mismatch.code,
        f"{name} resolved to no address you connected from. {mismatch.explanation}",
        mismatch.diagnosis,
    )


# --- steps -------------------------------------------------------------------


def _hostname(
    request: Request, observed: Endpoint, policy: PolicyConfig
) -> Decision | NeedsResolution:
    raw = str(request.host)
    if not policy.allow_hostnames:
        peer = _peer(observed)
        seen = peer.display if isinstance(peer, Address) else "an unknown address"
        return Deny(
            Code.HOSTNAME_NOT_ALLOWED,
            f"This registry does not resolve names; you sent {ascii_safe(raw)!r}. "
            f"Advertise the IP address it can reach you at (it saw you at {seen}).",
            Diagnosis.HOSTNAME,
        )
    try:
        name = normalise_hostname(raw)
    except ValueError as e:
        return Deny(Code.HOSTNAME_NOT_ALLOWED, f"Not a usable hostname: {e}.", Diagnosis.HOSTNAME)
    port_problem = _check_port(request.port, policy)
    if port_problem is not None:
        return port_problem
    return NeedsResolution(name, request.port)


def _peer(observed: Endpoint) -> Address | Deny:
    host = getattr(observed, "host", None)
    if not isinstance(host, _IP_TYPES):
        return Deny(Code.ADDRESS_NOT_ALLOWED, "The registry could not tell your address; refused.")
    return Address.of(host)


def _decide_ip(host: Any, port: Any, seen: Address, rules: _Rules) -> Decision:
    if not isinstance(host, _IP_TYPES):
        return Deny(Code.ADDRESS_NOT_ALLOWED, "The advertised host is not an IP address.")
    addr = Address.of(host)
    problem = _check_format(addr, port)
    if problem is not None:
        return problem
    diag = diagnose(addr, seen)
    problem = _check_class(addr, port, seen, diag)
    if problem is not None:
        return problem
    policy = rules.policy
    mode = policy.mode if policy.mode in MODES else "strict"
    dialled = seen if mode == "nat-observed" else addr
    dial = Endpoint(dialled.norm, port)
    if mode == "nat-observed":
        # The dialled peer gets step 3 too; no diagnosis text applies to it.
        problem = _check_class(dialled, port, seen, Diagnosis.DIRECT)
    problem = problem or _check_dial(dialled, dial, rules, diag)
    if problem is not None:
        return problem
    hits = _matches(dialled, policy.report_only_deny_networks)
    notes = tuple(f"would deny: in {n}" for n in hits) if hits else ()
    if diag is Diagnosis.DIRECT:  # diagnose's first rule: addr.norm == seen.norm
        return Allow(dial, Diagnosis.DIRECT, report_only=notes)
    if mode == "nat-observed":
        return Allow(dial, diag, corrected=True, report_only=notes)
    if mode == "advertised" and policy.allow_networks:
        return Allow(dial, diag, report_only=notes)
    why = explain(diag, addr, seen.norm, port)
    return Deny(Code.SOURCE_MISMATCH, why, diag)


def _check_format(addr: Address, port: Any) -> Deny | None:
    """Step 2: an IP address without a zone id, and a port number."""
    if addr.zone is not None:
        return Deny(
            Code.ADDRESS_NOT_ALLOWED,
            f"Zone ids are not accepted ({ascii_safe(f'{addr}%{addr.zone}')}): "
            "advertise a routable address.",
        )
    return _check_port(port)


def _check_port(port: Any, policy: PolicyConfig | None = None) -> Deny | None:
    """A port number, and with ``policy`` one of the ports it calls."""
    if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
        why = f"Port {ascii_safe(str(port), 16)} is not a port (1-65535)."
        return Deny(Code.PORT_NOT_ALLOWED, why)
    if policy is None or any(r.low <= port <= r.high for r in policy.ports):
        return None
    ranges = ", ".join(f"{r.low}-{r.high}" for r in policy.ports) or "none"
    return Deny(
        Code.PORT_NOT_ALLOWED,
        f"Port {port} is outside the ports this registry calls ({ranges}); "
        "run your server on a port in that range.",
    )


def _check_class(addr: Address, port: int, seen: Address, diag: Diagnosis) -> Deny | None:
    """Step 3: always-denied classes, then loopback for a non-loopback peer."""
    cls = addr.denied
    if cls is None and addr.cls is AddrClass.LOOPBACK and seen.cls is not AddrClass.LOOPBACK:
        cls = AddrClass.LOOPBACK
    if cls is None:
        return None
    if diag in _ADVERTISED_CASES:
        # The diagnosis line already names the class, what was seen and the fix.
        why = explain(diag, addr, seen.norm, port)
        return Deny(Code.ADDRESS_NOT_ALLOWED, why, diag)
    return Deny(Code.ADDRESS_NOT_ALLOWED, _class_text(addr, cls), diag)


_D = Diagnosis
_ADVERTISED_CASES = {_D.LOOPBACK_ADVERTISED, _D.UNSPECIFIED_ADVERTISED, _D.LINK_LOCAL_ADVERTISED}


def _class_text(addr: Address, cls: AddrClass) -> str:
    """``10.0.0.1 is ...`` naming the class and range, showing any embedding unwrapped."""
    culprit, row = addr.culprit
    found = addr.embedding
    carried = f" (a {found.kind} form carrying {culprit})" if found else ""
    name = cls.value.replace("_", "-")
    article = "an" if name[0] in "aeiou" else "a"
    return (
        f"{addr.display}{carried} is {article} {name} address "
        f"({row.network}: {row.note}); the registry never calls it."
    )


def _check_dial(dialled: Address, dial: Endpoint, rules: _Rules, diag: Diagnosis) -> Deny | None:
    """Steps 4-7 on the address that would be dialled."""
    policy = rules.policy
    if _is_self(dialled.norm, dial, rules):
        return Deny(
            Code.SELF_TARGET,
            f"{dial} is one of the registry's own sockets; run your server on another port.",
            diag,
        )
    shown = dialled.norm.display
    hits = _matches(dialled, policy.deny_networks)
    if hits:
        return Deny(Code.ADDRESS_NOT_ALLOWED, f"{shown} is in {hits[0]}, denied here.", diag)
    bad_port = _check_port(dial.port, policy)
    if bad_port is not None:
        return Deny(bad_port.code, bad_port.explanation, diag)
    allow = policy.allow_networks
    if allow and not any(dial.host in n for n in allow):
        nets = ", ".join(str(n) for n in allow[:4]) + (", ..." if len(allow) > 4 else "")
        why = f"{shown} is outside the networks this registry calls ({nets})."
        return Deny(Code.ADDRESS_NOT_ALLOWED, why, diag)
    return None


def _is_self(host: Address, dial: Endpoint, rules: _Rules) -> bool:
    if all(e.port != dial.port for e in rules.own):
        return False
    if host.cls in (AddrClass.LOOPBACK, AddrClass.UNSPECIFIED):
        return True
    if any(host == Address.of(e.host).norm for e in rules.own):
        return True
    try:
        return bool(rules.is_local(dial.host))
    except Exception:  # cannot tell: refusing our own port costs a student nothing
        return True


def _matches(addr: Address, networks: tuple[CIDR, ...]) -> list[CIDR]:
    """The networks holding ``addr`` as sent or any address embedded in it."""
    if not networks:  # the usual case: skip building the comprehensions
        return []
    return [net for net in networks if any(form in net for form in addr.inner)]


def _internal(e: Exception) -> Deny:
    return Deny(
        Code.ADDRESS_NOT_ALLOWED,
        f"Refused: the policy could not judge this request ({type(e).__name__}).",
    )
