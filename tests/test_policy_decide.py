"""registry.policy.decide: modes, order of checks, lists, ports, hostnames, totality."""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.config import PolicyConfig, from_dict
from registry.model import Code, Diagnosis, Endpoint, Request
from registry.policy.addresses import Address
from registry.policy.decide import (
    MODES,
    Allow,
    Deny,
    NeedsResolution,
    decide,
    decide_resolved,
)

ip = ipaddress.ip_address
D = Diagnosis


def pol(**kw: Any) -> PolicyConfig:
    """A policy built through the real config parser, so CIDRs and ranges are real.

    Values the parser refuses (unknown mode, no ports) are set afterwards: decide
    must stay total for a PolicyConfig built in code.
    """
    raw = {k: kw.pop(k) for k in ("mode", "ports") if k in kw and _unparsable(k, kw[k])}
    return msgspec.structs.replace(from_dict({"policy": kw}).policy, **raw)


def _unparsable(key: str, value: Any) -> bool:
    return (key == "mode" and value not in MODES) or (key == "ports" and not value)


def req(host: str, port: int = 15000, **kw: Any) -> Request:
    try:
        return Request(ip(host), port, **kw)
    except ValueError:
        return Request(host, port, **kw)


def ep(host: str, port: int = 40000) -> Endpoint:
    return Endpoint(ip(host), port)


PUBLIC = ep("203.0.113.5")
OWN = frozenset({ep("0.0.0.0", 9000), ep("::", 9000), ep("127.0.0.1", 9100)})


def code(d: object) -> Code | str:
    return d.code if isinstance(d, Deny) else type(d).__name__


# --- modes ----------------------------------------------------------------------------

# (id, mode, allow_networks, advertised, observed, expected code or "Allow", diagnosis, corrected)
MODE_CASES = [
    ("strict-direct", "strict", [], "203.0.113.5", "203.0.113.5", "Allow", D.DIRECT, False),
    (
        "strict-mapped-peer",
        "strict",
        [],
        "203.0.113.5",
        "::ffff:203.0.113.5",
        "Allow",
        D.DIRECT,
        False,
    ),
    (
        "strict-nat",
        "strict",
        [],
        "192.168.1.5",
        "203.0.113.5",
        Code.SOURCE_MISMATCH,
        D.PRIVATE_BEHIND_NAT,
        False,
    ),
    (
        "strict-other",
        "strict",
        [],
        "198.51.100.9",
        "203.0.113.5",
        Code.SOURCE_MISMATCH,
        D.DIFFERENT_HOST,
        False,
    ),
    (
        "strict-family",
        "strict",
        [],
        "2001:db8::5",
        "203.0.113.5",
        Code.SOURCE_MISMATCH,
        D.FAMILY_MISMATCH,
        False,
    ),
    ("strict-lan", "strict", [], "192.168.1.5", "192.168.1.5", "Allow", D.DIRECT, False),
    ("strict-cgnat-same", "strict", [], "100.64.1.1", "100.64.1.1", "Allow", D.DIRECT, False),
    (
        "nat-corrects",
        "nat-observed",
        [],
        "192.168.1.5",
        "203.0.113.5",
        "Allow",
        D.PRIVATE_BEHIND_NAT,
        True,
    ),
    ("nat-direct", "nat-observed", [], "203.0.113.5", "203.0.113.5", "Allow", D.DIRECT, False),
    (
        "nat-family",
        "nat-observed",
        [],
        "2001:db8::5",
        "203.0.113.5",
        "Allow",
        D.FAMILY_MISMATCH,
        True,
    ),
    (
        "nat-container",
        "nat-observed",
        [],
        "172.17.0.2",
        "192.168.1.5",
        "Allow",
        D.CONTAINER_NAT,
        True,
    ),
    (
        "nat-allow-filters-peer",
        "nat-observed",
        ["198.51.100.0/24"],
        "192.168.1.5",
        "203.0.113.5",
        Code.ADDRESS_NOT_ALLOWED,
        D.PRIVATE_BEHIND_NAT,
        False,
    ),
    (
        "nat-loopback-adv-public-peer",
        "nat-observed",
        [],
        "127.0.0.1",
        "203.0.113.5",
        Code.ADDRESS_NOT_ALLOWED,
        D.LOOPBACK_ADVERTISED,
        False,
    ),
    (
        "adv-empty-is-strict",
        "advertised",
        [],
        "192.168.1.5",
        "203.0.113.5",
        Code.SOURCE_MISMATCH,
        D.PRIVATE_BEHIND_NAT,
        False,
    ),
    (
        "adv-trusted",
        "advertised",
        ["192.168.0.0/16"],
        "192.168.1.5",
        "203.0.113.5",
        "Allow",
        D.PRIVATE_BEHIND_NAT,
        False,
    ),
    (
        "adv-outside-allow",
        "advertised",
        ["10.0.0.0/8"],
        "192.168.1.5",
        "203.0.113.5",
        Code.ADDRESS_NOT_ALLOWED,
        D.PRIVATE_BEHIND_NAT,
        False,
    ),
    (
        "adv-direct-outside-allow",
        "advertised",
        ["10.0.0.0/8"],
        "203.0.113.5",
        "203.0.113.5",
        Code.ADDRESS_NOT_ALLOWED,
        D.DIRECT,
        False,
    ),
    (
        "adv-direct",
        "advertised",
        ["0.0.0.0/0"],
        "203.0.113.5",
        "203.0.113.5",
        "Allow",
        D.DIRECT,
        False,
    ),
    (
        "unknown-mode-is-strict",
        "trusting",
        [],
        "192.168.1.5",
        "203.0.113.5",
        Code.SOURCE_MISMATCH,
        D.PRIVATE_BEHIND_NAT,
        False,
    ),
    (
        "strict-allow-filters",
        "strict",
        ["10.0.0.0/8"],
        "203.0.113.5",
        "203.0.113.5",
        Code.ADDRESS_NOT_ALLOWED,
        D.DIRECT,
        False,
    ),
    (
        "strict-allow-v6-only",
        "strict",
        ["::/0"],
        "::ffff:203.0.113.5",
        "203.0.113.5",
        Code.ADDRESS_NOT_ALLOWED,
        D.DIRECT,
        False,
    ),
]


@pytest.mark.parametrize(
    ("mode", "allow", "adv", "obs", "want", "diag", "corrected"),
    [c[1:] for c in MODE_CASES],
    ids=[c[0] for c in MODE_CASES],
)
def test_modes(
    mode: str, allow: list[str], adv: str, obs: str, want: Any, diag: D, corrected: bool
) -> None:
    d = decide(req(adv), ep(obs), pol(mode=mode, allow_networks=allow))
    assert code(d) == want
    assert d.diagnosis is diag  # type: ignore[union-attr]
    if isinstance(d, Allow):
        assert d.corrected is corrected
        dialled = Address.of(obs if corrected else adv).norm
        assert d.target == Endpoint(dialled, 15000)


def test_nat_observed_dials_peer_at_advertised_port() -> None:
    d = decide(req("192.168.1.5", 15123), ep("::ffff:203.0.113.5", 50000), pol(mode="nat-observed"))
    assert d == Allow(Endpoint(ip("203.0.113.5"), 15123), D.PRIVATE_BEHIND_NAT, corrected=True)


def test_allow_target_is_normalised() -> None:
    d = decide(req("::ffff:203.0.113.5"), PUBLIC, pol())
    assert isinstance(d, Allow) and d.target == Endpoint(ip("203.0.113.5"), 15000)
    assert d.target.host.version == 4


def test_source_mismatch_explains() -> None:
    d = decide(req("192.168.1.5"), PUBLIC, pol())
    assert isinstance(d, Deny) and d.code is Code.SOURCE_MISMATCH
    assert "192.168.1.5:15000" in d.explanation and "203.0.113.5" in d.explanation
    assert "Forward port 15000" in d.explanation


# --- ports, lists, report-only --------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "port", "want"),
    [
        (None, 1024, "Allow"),
        (None, 65535, "Allow"),
        (None, 1023, Code.PORT_NOT_ALLOWED),
        (None, 80, Code.PORT_NOT_ALLOWED),
        (None, 0, Code.PORT_NOT_ALLOWED),
        (None, 65536, Code.PORT_NOT_ALLOWED),
        (None, -1, Code.PORT_NOT_ALLOWED),
        (["10000-20000"], 15000, "Allow"),
        (["10000-20000"], 9999, Code.PORT_NOT_ALLOWED),
        (["10000-20000"], 20001, Code.PORT_NOT_ALLOWED),
        (["10000-20000", "30000"], 30000, "Allow"),
        ([], 15000, Code.PORT_NOT_ALLOWED),
    ],
)
def test_ports(ports: list[str] | None, port: int, want: Any) -> None:
    p = pol() if ports is None else pol(ports=ports)
    assert code(decide(req("203.0.113.5", port), PUBLIC, p)) == want


def test_port_bool_is_not_a_port() -> None:
    assert code(decide(Request(ip("203.0.113.5"), True), PUBLIC, pol())) is Code.PORT_NOT_ALLOWED  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("deny", "allow", "adv", "want"),
    [
        (["203.0.113.0/24"], [], "203.0.113.5", Code.ADDRESS_NOT_ALLOWED),
        (["203.0.113.0/24"], ["203.0.113.0/24"], "203.0.113.5", Code.ADDRESS_NOT_ALLOWED),
        (["203.0.113.5/32"], ["0.0.0.0/0"], "203.0.113.5", Code.ADDRESS_NOT_ALLOWED),
        (["::ffff:0:0/96"], [], "::ffff:203.0.113.5", Code.ADDRESS_NOT_ALLOWED),  # as sent
        (["203.0.113.0/24"], [], "::ffff:203.0.113.5", Code.ADDRESS_NOT_ALLOWED),  # inside
        (["198.51.100.0/24"], [], "203.0.113.5", "Allow"),
        ([], ["203.0.113.0/24"], "203.0.113.5", "Allow"),
    ],
)
def test_deny_wins_and_matches_every_form(
    deny: list[str], allow: list[str], adv: str, want: Any
) -> None:
    d = decide(req(adv), PUBLIC, pol(deny_networks=deny, allow_networks=allow))
    assert code(d) == want


def test_deny_networks_names_the_network() -> None:
    d = decide(req("203.0.113.5"), PUBLIC, pol(deny_networks=["203.0.113.0/24"]))
    assert isinstance(d, Deny) and "203.0.113.0/24" in d.explanation


def test_report_only() -> None:
    p = pol(report_only_deny_networks=["203.0.113.0/24", "10.0.0.0/8", "::ffff:0:0/96"])
    d = decide(req("::ffff:203.0.113.5"), PUBLIC, p)
    assert isinstance(d, Allow)
    assert d.report_only == ("would deny: in 203.0.113.0/24", "would deny: in ::ffff:0:0/96")
    assert decide(req("203.0.113.5"), PUBLIC, pol()).report_only == ()  # type: ignore[union-attr]


def test_report_only_never_overrides_a_deny() -> None:
    p = pol(report_only_deny_networks=["192.168.0.0/16"])
    assert code(decide(req("192.168.1.5"), PUBLIC, p)) is Code.SOURCE_MISMATCH


# --- self target --------------------------------------------------------------------

LOOP4 = ep("127.0.0.1")
LOOP6 = ep("::1")


@pytest.mark.parametrize(
    ("adv", "port", "obs", "own", "want"),
    [
        ("127.0.0.1", 9000, LOOP4, OWN, Code.SELF_TARGET),
        ("127.0.0.1", 9100, LOOP4, OWN, Code.SELF_TARGET),
        ("127.0.0.2", 9000, LOOP4, OWN, Code.SELF_TARGET),
        ("::1", 9000, LOOP6, OWN, Code.SELF_TARGET),
        ("::ffff:127.0.0.1", 9100, LOOP6, OWN, Code.SELF_TARGET),
        ("127.0.0.1", 15000, LOOP4, OWN, "Allow"),
        ("127.0.0.1", 9000, LOOP4, frozenset(), "Allow"),
        (
            "203.0.113.1",
            9000,
            ep("203.0.113.1"),
            frozenset({ep("203.0.113.1", 9000)}),
            Code.SELF_TARGET,
        ),
        (
            "203.0.113.1",
            9000,
            ep("203.0.113.1"),
            frozenset({ep("::ffff:203.0.113.1", 9000)}),
            Code.SELF_TARGET,
        ),
        ("203.0.113.1", 9001, ep("203.0.113.1"), frozenset({ep("203.0.113.1", 9000)}), "Allow"),
        ("203.0.113.2", 9000, ep("203.0.113.2"), frozenset({ep("203.0.113.1", 9000)}), "Allow"),
    ],
)
def test_self_target(
    adv: str, port: int, obs: Endpoint, own: frozenset[Endpoint], want: Any
) -> None:
    assert code(decide(req(adv, port), obs, pol(), own)) == want


def test_self_target_in_nat_observed_mode_checks_the_dialled_peer() -> None:
    own = frozenset({ep("203.0.113.1", 9000)})
    d = decide(req("192.168.1.5", 9000), ep("203.0.113.1"), pol(mode="nat-observed"), own)
    assert code(d) is Code.SELF_TARGET


# --- loopback ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adv", "obs", "want"),
    [
        ("127.0.0.1", "127.0.0.1", "Allow"),
        ("::1", "::1", "Allow"),
        ("127.0.0.1", "::ffff:127.0.0.1", "Allow"),
        ("::ffff:127.0.0.1", "127.0.0.1", "Allow"),
        ("127.0.0.1", "::1", Code.SOURCE_MISMATCH),
        ("127.0.0.1", "192.168.1.5", Code.ADDRESS_NOT_ALLOWED),
        ("::1", "203.0.113.5", Code.ADDRESS_NOT_ALLOWED),
    ],
)
def test_loopback_only_from_loopback(adv: str, obs: str, want: Any) -> None:
    assert code(decide(req(adv), ep(obs), pol())) == want


def test_loopback_from_loopback_in_nat_observed() -> None:
    d = decide(req("127.0.0.1"), LOOP6, pol(mode="nat-observed"))
    assert d == Allow(Endpoint(ip("::1"), 15000), D.LOOPBACK_ADVERTISED, corrected=True)


# --- zone ids and bad input -----------------------------------------------------------


def test_zone_id_refused() -> None:
    d = decide(Request(ip("fe80::1%eth0"), 15000), ep("fe80::1%eth0"), pol())
    assert isinstance(d, Deny) and d.code is Code.ADDRESS_NOT_ALLOWED and "Zone" in d.explanation
    d = decide(Request(ip("2001:db8::1%1"), 15000), ep("2001:db8::1"), pol())
    assert code(d) is Code.ADDRESS_NOT_ALLOWED


def test_observed_zone_is_ignored() -> None:
    d = decide(req("2001:db8::1"), ep("2001:db8::1%eth0"), pol())
    assert isinstance(d, Allow) and d.target.host.scope_id is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "request_",
    [
        Request(None, 15000),  # type: ignore[arg-type]
        Request(12345, 15000),  # type: ignore[arg-type]
        Request(ip("203.0.113.5"), "15000"),  # type: ignore[arg-type]
        Request(ip("203.0.113.5"), None),  # type: ignore[arg-type]
        None,
    ],
)
def test_total_on_junk(request_: Any) -> None:
    assert isinstance(decide(request_, PUBLIC, pol()), Deny)


def test_total_on_junk_observed() -> None:
    assert isinstance(decide(req("203.0.113.5"), Endpoint("x", 1), pol()), Deny)  # type: ignore[arg-type]
    assert isinstance(decide(req("203.0.113.5"), None, pol()), Deny)  # type: ignore[arg-type]


HOSTS = st.one_of(
    st.ip_addresses(),
    st.text(max_size=40),
    st.sampled_from(["localhost", "example.com", "[::1]", "127.1", "0x7f000001"]),
)


@settings(max_examples=300)
@given(
    HOSTS,
    st.integers(-5, 70000),
    st.ip_addresses(),
    st.sampled_from(["strict", "nat-observed", "advertised", "bogus"]),
    st.booleans(),
)
def test_decide_is_total(host: Any, port: int, obs: Any, mode: str, names: bool) -> None:
    p = pol(mode=mode, allow_hostnames=names, allow_networks=["0.0.0.0/0", "::/0"])
    d = decide(Request(host, port), Endpoint(obs, 1), p, OWN)
    assert isinstance(d, Allow | Deny | NeedsResolution)
    if isinstance(d, Deny):
        assert d.explanation.isascii() and "\n" not in d.explanation
    if isinstance(d, Allow):
        assert 1024 <= d.target.port <= 65535


# --- hostnames --------------------------------------------------------------------------


def test_hostname_refused_by_default() -> None:
    d = decide(req("example.com"), PUBLIC, pol())
    assert d == Deny(Code.HOSTNAME_NOT_ALLOWED, d.explanation, D.HOSTNAME)  # type: ignore[union-attr]
    assert "203.0.113.5" in d.explanation  # type: ignore[union-attr]


def test_hostname_needs_resolution_when_enabled() -> None:
    assert decide(
        req("Student.Example.COM."), PUBLIC, pol(allow_hostnames=True)
    ) == NeedsResolution("student.example.com", 15000)


@pytest.mark.parametrize(
    ("name", "port", "want"),
    [
        ("[::1]", 15000, Code.HOSTNAME_NOT_ALLOWED),
        ("127.1", 15000, Code.HOSTNAME_NOT_ALLOWED),
        ("ok.example", 80, Code.PORT_NOT_ALLOWED),
    ],
)
def test_hostname_refused_before_resolution(name: str, port: int, want: Code) -> None:
    assert code(decide(Request(name, port), PUBLIC, pol(allow_hostnames=True))) is want


NAMES = pol(allow_hostnames=True)


@pytest.mark.parametrize(
    ("answers", "obs", "policy", "want", "target"),
    [
        (["203.0.113.5"], PUBLIC, NAMES, "Allow", "203.0.113.5"),
        (["2001:db8::5", "203.0.113.5"], PUBLIC, NAMES, "Allow", "203.0.113.5"),
        (["::ffff:203.0.113.5"], PUBLIC, NAMES, "Allow", "203.0.113.5"),
        # 10.0.0.1 passes the address checks; strict dials only the matching answer
        (["10.0.0.1", "203.0.113.5"], PUBLIC, NAMES, "Allow", "203.0.113.5"),
        (["10.0.0.1", "192.168.1.1"], PUBLIC, NAMES, Code.SOURCE_MISMATCH, None),
        (["203.0.113.5", "169.254.169.254"], PUBLIC, NAMES, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "127.0.0.1"], PUBLIC, NAMES, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "::ffff:127.0.0.1"], PUBLIC, NAMES, Code.ADDRESS_NOT_ALLOWED, None),
        (["203.0.113.5", "64:ff9b::a9fe:a9fe"], PUBLIC, NAMES, Code.ADDRESS_NOT_ALLOWED, None),
        (["198.51.100.1"], PUBLIC, NAMES, Code.SOURCE_MISMATCH, None),
        ([], PUBLIC, NAMES, Code.HOSTNAME_NOT_ALLOWED, None),
        (
            ["203.0.113.5"],
            PUBLIC,
            pol(allow_hostnames=True, deny_networks=["203.0.113.0/24"]),
            Code.ADDRESS_NOT_ALLOWED,
            None,
        ),
        (
            ["198.51.100.1", "198.51.100.2"],
            PUBLIC,
            pol(allow_hostnames=True, mode="advertised", allow_networks=["198.51.100.0/24"]),
            "Allow",
            "198.51.100.1",
        ),
        (
            ["198.51.100.1"],
            PUBLIC,
            pol(allow_hostnames=True, mode="nat-observed"),
            "Allow",
            "203.0.113.5",
        ),
        (["127.0.0.1", "::1"], LOOP4, NAMES, "Allow", "127.0.0.1"),
    ],
)
def test_decide_resolved(
    answers: list[str], obs: Endpoint, policy: PolicyConfig, want: Any, target: str | None
) -> None:
    r = Request("student.example", 15000)
    d = decide_resolved(r, [ip(a) for a in answers], obs, policy)
    assert code(d) == want
    if target is not None:
        assert isinstance(d, Allow) and d.target == Endpoint(ip(target), 15000)


def test_decide_resolved_names_the_bad_answer() -> None:
    d = decide_resolved(
        Request("evil.example", 15000), [ip("203.0.113.5"), ip("169.254.169.254")], PUBLIC, NAMES
    )
    assert isinstance(d, Deny) and "evil.example resolved to 169.254.169.254" in d.explanation


def test_decide_resolved_total() -> None:
    assert isinstance(decide_resolved(Request("x.example", 15000), ["junk"], PUBLIC, NAMES), Deny)  # type: ignore[list-item]
    assert isinstance(decide_resolved(None, [ip("203.0.113.5")], PUBLIC, NAMES), Deny)  # type: ignore[arg-type]
