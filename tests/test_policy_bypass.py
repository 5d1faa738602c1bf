"""Bypass corpus: every way we know to sneak a forbidden target past the policy.

Each row asserts the exact reply code (and the diagnosis where it matters).
The property tests below then generate addresses in every always-denied class,
wrap them in every IPv6 embedding, and check that no mode and no allow list
(not even ``::/0`` + ``0.0.0.0/0``) ever returns Allow for them.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.config import PolicyConfig, from_dict
from registry.model import Code, Diagnosis, Endpoint, Request
from registry.policy.addresses import ALWAYS_DENIED, AddrClass, Address
from registry.policy.decide import Allow, Deny, decide

ip = ipaddress.ip_address
V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
D = Diagnosis
ANA = Code.ADDRESS_NOT_ALLOWED
ALLOW = "Allow"

PUBLIC = "203.0.113.5"
OWN = frozenset(
    {
        Endpoint(ip("0.0.0.0"), 9000),
        Endpoint(ip("::"), 9000),
        Endpoint(ip("127.0.0.1"), 9100),
        Endpoint(ip("198.51.100.1"), 9000),
    }
)
EVERYTHING = {"allow_networks": ["0.0.0.0/0", "::/0"]}
TRUSTING = {"mode": "advertised", **EVERYTHING}


def pol(**kw: Any) -> PolicyConfig:
    return from_dict({"policy": kw}).policy


def _forms(prefix: str, v4: str, sixto4: str, teredo: str) -> list[tuple[str, str]]:
    """The IPv6 embeddings of one IPv4 address, with readable ids."""
    return [
        (f"{prefix}-plain", v4),
        (f"{prefix}-mapped", f"::ffff:{v4}"),
        (f"{prefix}-translated", f"::ffff:0:{v4}"),
        (f"{prefix}-compatible", f"::{v4}"),
        (f"{prefix}-nat64", f"64:ff9b::{v4}"),
        (f"{prefix}-nat64-local", f"64:ff9b:1::{v4}"),
        (f"{prefix}-6to4", sixto4),
        (f"{prefix}-teredo", teredo),
    ]


# Teredo forms use server 192.0.2.1 and carry the client address inverted.
EMBEDDED = {
    "loop": (
        _forms("loop", "127.0.0.1", "2002:7f00:1::1", "2001:0:c000:201:8000:ffff:80ff:fffe"),
        ANA,
        D.LOOPBACK_ADVERTISED,
    ),
    "rfc1918": (
        _forms("rfc1918", "10.0.0.1", "2002:a00:1::1", "2001:0:c000:201:8000:ffff:f5ff:fffe"),
        Code.SOURCE_MISMATCH,
        D.PRIVATE_BEHIND_NAT,
    ),
    "metadata": (
        _forms(
            "metadata",
            "169.254.169.254",
            "2002:a9fe:a9fe::1",
            "2001:0:c000:201:8000:ffff:5601:5601",
        ),
        ANA,
        D.LINK_LOCAL_ADVERTISED,
    ),
    "unspec": (
        _forms("unspec", "0.0.0.0", "2002::1", "2001:0:c000:201:8000:ffff:ffff:ffff"),
        ANA,
        D.UNSPECIFIED_ADVERTISED,
    ),
    "mcast": (
        _forms("mcast", "224.0.0.1", "2002:e000:1::1", "2001:0:c000:201:8000:ffff:1fff:fffe"),
        ANA,
        None,
    ),
    "bcast": (
        _forms("bcast", "255.255.255.255", "2002:ffff:ffff::1", "2001:0:c000:201:8000:ffff::"),
        ANA,
        None,
    ),
}

# (id, advertised host, port, observed host, policy keys, expected code or "Allow", diagnosis or None)
CORPUS: list[tuple[str, str, int, str, dict[str, Any], Any, D | None]] = [
    (fid, host, 15000, PUBLIC, {}, want, diag)
    for forms, want, diag in EMBEDDED.values()
    for fid, host in forms
]
CORPUS += [
    # the same embeddings cannot be trusted in advertised mode either
    (
        "rfc1918-mapped-trusted-v6-allow",
        "::ffff:10.0.0.1",
        15000,
        PUBLIC,
        {"mode": "advertised", "allow_networks": ["::/0"]},
        ANA,
        D.PRIVATE_BEHIND_NAT,
    ),
    (
        "rfc1918-nat64-trusted-v6-allow",
        "64:ff9b::10.0.0.1",
        15000,
        PUBLIC,
        {"mode": "advertised", "allow_networks": ["2000::/3", "64:ff9b::/96"]},
        ANA,
        D.PRIVATE_BEHIND_NAT,
    ),
    (
        "rfc1918-6to4-trusted-v6-allow",
        "2002:a00:1::1",
        15000,
        PUBLIC,
        {"mode": "advertised", "allow_networks": ["2002::/16"]},
        ANA,
        D.PRIVATE_BEHIND_NAT,
    ),
    (
        "metadata-mapped-trusting",
        "::ffff:169.254.169.254",
        15000,
        PUBLIC,
        TRUSTING,
        ANA,
        D.LINK_LOCAL_ADVERTISED,
    ),
    ("metadata-from-itself", "169.254.169.254", 15000, "169.254.169.254", TRUSTING, ANA, None),
    (
        "metadata-nat-observed",
        "169.254.169.254",
        15000,
        PUBLIC,
        {"mode": "nat-observed"},
        ANA,
        D.LINK_LOCAL_ADVERTISED,
    ),
    (
        "teredo-metadata-server",
        "2001:0:a9fe:a9fe:8000:ffff:3400:8efa",
        15000,
        PUBLIC,
        TRUSTING,
        ANA,
        None,
    ),
    (
        "aws-v6-metadata",
        "fd00:ec2::254",
        15000,
        PUBLIC,
        {"mode": "advertised", "allow_networks": ["fc00::/7"]},
        ANA,
        None,
    ),
    (
        "alibaba-metadata",
        "100.100.100.200",
        15000,
        PUBLIC,
        {"mode": "advertised", "allow_networks": ["100.64.0.0/10"]},
        ANA,
        None,
    ),
    ("azure-wireserver", "168.63.129.16", 15000, "168.63.129.16", {}, ANA, None),
    # IPv6 specials
    ("v6-unspecified", "::", 15000, PUBLIC, {}, ANA, D.UNSPECIFIED_ADVERTISED),
    ("v6-unspecified-from-v6", "::", 15000, "2001:db8::5", TRUSTING, ANA, D.UNSPECIFIED_ADVERTISED),
    ("v6-loopback-public-peer", "::1", 15000, PUBLIC, {}, ANA, D.LOOPBACK_ADVERTISED),
    ("v6-loopback-lan-peer", "::1", 15000, "192.168.1.5", TRUSTING, ANA, D.LOOPBACK_ADVERTISED),
    (
        "v6-loopback-v6-peer",
        "::1",
        15000,
        "2001:db8::5",
        {"mode": "nat-observed"},
        ANA,
        D.LOOPBACK_ADVERTISED,
    ),
    ("v6-link-local", "fe80::1", 15000, "2001:db8::5", {}, ANA, D.LINK_LOCAL_ADVERTISED),
    ("v6-link-local-from-itself", "fe80::1", 15000, "fe80::1", TRUSTING, ANA, None),
    ("v6-link-local-zone", "fe80::1%eth0", 15000, "fe80::1%eth0", {}, ANA, None),
    ("v6-multicast", "ff02::1", 15000, "2001:db8::5", TRUSTING, ANA, None),
    ("v6-multicast-from-itself", "ff02::1", 15000, "ff02::1", {"mode": "nat-observed"}, ANA, None),
    ("v6-site-local", "fec0::1", 15000, "fec0::1", {}, ANA, None),
    ("v6-discard", "100::1", 15000, "100::1", {}, ANA, None),
    ("v6-unallocated", "4000::1", 15000, "4000::1", {}, ANA, None),
    ("nat64-local-odd-layout", "64:ff9b:1:1::a00:1", 15000, PUBLIC, TRUSTING, ANA, None),
    # IPv4 specials
    ("v4-reserved-240", "240.0.0.1", 15000, "240.0.0.1", TRUSTING, ANA, None),
    ("v4-this-network", "0.1.2.3", 15000, "0.1.2.3", {}, ANA, None),
    ("v4-ietf-192.0.0.8", "192.0.0.8", 15000, "192.0.0.8", {}, ANA, None),
    ("v4-6to4-relay", "192.88.99.1", 15000, "192.88.99.1", {}, ANA, None),
    ("v4-multicast-from-itself", "239.255.255.250", 15000, "239.255.255.250", {}, ANA, None),
    ("v4-loopback-127.1.2.3", "127.1.2.3", 15000, PUBLIC, {}, ANA, D.LOOPBACK_ADVERTISED),
    ("cgnat-advertised", "100.64.1.1", 15000, PUBLIC, {}, Code.SOURCE_MISMATCH, D.CGNAT),
    ("cgnat-same-host", "100.64.1.1", 15000, "100.64.1.1", {}, ALLOW, D.DIRECT),
    ("ds-lite", "192.0.0.1", 15000, PUBLIC, {}, Code.SOURCE_MISMATCH, D.CGNAT),
    (
        "private-trusted-needs-allow",
        "10.0.0.1",
        15000,
        PUBLIC,
        {"mode": "advertised"},
        Code.SOURCE_MISMATCH,
        D.PRIVATE_BEHIND_NAT,
    ),
    # loopback from loopback is the one legal loopback
    ("loop-from-loop", "127.0.0.1", 15000, "127.0.0.1", {}, ALLOW, D.DIRECT),
    (
        "loop-mapped-from-loop",
        "::ffff:127.0.0.1",
        15000,
        "::1",
        {"mode": "nat-observed"},
        ALLOW,
        D.LOOPBACK_ADVERTISED,
    ),
    # the registry's own sockets
    ("self-registry-v4", "127.0.0.1", 9000, "127.0.0.1", {}, Code.SELF_TARGET, D.DIRECT),
    ("self-registry-v6", "::1", 9000, "::1", {}, Code.SELF_TARGET, D.DIRECT),
    ("self-registry-other-loopback", "127.0.0.53", 9000, "127.0.0.1", {}, Code.SELF_TARGET, None),
    ("self-admin", "127.0.0.1", 9100, "127.0.0.1", {}, Code.SELF_TARGET, D.DIRECT),
    ("self-admin-mapped", "::ffff:127.0.0.1", 9100, "127.0.0.1", {}, Code.SELF_TARGET, D.DIRECT),
    ("self-public-listener", "198.51.100.1", 9000, "198.51.100.1", {}, Code.SELF_TARGET, D.DIRECT),
    ("self-unspecified-port", "0.0.0.0", 9000, "127.0.0.1", {}, ANA, D.UNSPECIFIED_ADVERTISED),
    ("self-trusted", "198.51.100.1", 9000, PUBLIC, TRUSTING, Code.SELF_TARGET, None),
    (
        "self-nat-observed",
        "10.0.0.1",
        9000,
        "198.51.100.1",
        {"mode": "nat-observed"},
        Code.SELF_TARGET,
        None,
    ),
    # ports
    ("port-80", PUBLIC, 80, PUBLIC, {}, Code.PORT_NOT_ALLOWED, None),
    ("port-22", PUBLIC, 22, PUBLIC, {}, Code.PORT_NOT_ALLOWED, None),
    ("port-1023", PUBLIC, 1023, PUBLIC, {}, Code.PORT_NOT_ALLOWED, None),
    ("port-0", PUBLIC, 0, PUBLIC, {}, Code.PORT_NOT_ALLOWED, None),
    ("port-65536", PUBLIC, 65536, PUBLIC, {}, Code.PORT_NOT_ALLOWED, None),
    (
        "port-lab-range",
        PUBLIC,
        25000,
        PUBLIC,
        {"ports": ["10000-20000"]},
        Code.PORT_NOT_ALLOWED,
        None,
    ),
    (
        "port-80-nat-observed",
        "10.0.0.1",
        80,
        PUBLIC,
        {"mode": "nat-observed"},
        Code.PORT_NOT_ALLOWED,
        None,
    ),
    # deny wins over allow
    (
        "deny-beats-allow",
        "10.0.0.1",
        15000,
        PUBLIC,
        {"mode": "advertised", "allow_networks": ["10.0.0.0/8"], "deny_networks": ["10.0.0.0/24"]},
        ANA,
        None,
    ),
    (
        "deny-beats-direct",
        PUBLIC,
        15000,
        PUBLIC,
        {"allow_networks": ["203.0.113.0/24"], "deny_networks": ["203.0.113.5/32"]},
        ANA,
        None,
    ),
    (
        "deny-v4-catches-mapped",
        "::ffff:203.0.113.5",
        15000,
        PUBLIC,
        {"deny_networks": ["203.0.113.0/24"]},
        ANA,
        None,
    ),
    (
        "deny-v4-catches-6to4",
        "2002:cb00:7105::1",
        15000,
        PUBLIC,
        {"deny_networks": ["203.0.113.0/24"]},
        ANA,
        None,
    ),
    (
        "deny-nat-observed-peer",
        "10.0.0.1",
        15000,
        PUBLIC,
        {"mode": "nat-observed", "deny_networks": ["203.0.113.0/24"]},
        ANA,
        None,
    ),
    # documentation ranges stay allowed when they match the source
    ("doc-test-net-1", "192.0.2.1", 15000, "192.0.2.1", {}, ALLOW, D.DIRECT),
    ("doc-test-net-2", "198.51.100.7", 15000, "198.51.100.7", {}, ALLOW, D.DIRECT),
    ("doc-test-net-3", "203.0.113.9", 15000, "203.0.113.9", {}, ALLOW, D.DIRECT),
    ("doc-v6", "2001:db8::9", 15000, "2001:db8::9", {}, ALLOW, D.DIRECT),
    ("doc-v6-3fff", "3fff::9", 15000, "3fff::9", {}, ALLOW, D.DIRECT),
    ("doc-mapped-peer", "192.0.2.1", 15000, "::ffff:192.0.2.1", {}, ALLOW, D.DIRECT),
    (
        "doc-other-host",
        "192.0.2.1",
        15000,
        "198.51.100.7",
        {},
        Code.SOURCE_MISMATCH,
        D.DIFFERENT_HOST,
    ),
    # names
    ("name-localhost", "localhost", 15000, PUBLIC, {}, Code.HOSTNAME_NOT_ALLOWED, D.HOSTNAME),
    (
        "name-metadata",
        "metadata.google.internal",
        15000,
        PUBLIC,
        TRUSTING,
        Code.HOSTNAME_NOT_ALLOWED,
        D.HOSTNAME,
    ),
    (
        "name-decimal-ipv4",
        "2130706433",
        15000,
        PUBLIC,
        {"allow_hostnames": True},
        Code.HOSTNAME_NOT_ALLOWED,
        D.HOSTNAME,
    ),
    (
        "name-short-ipv4",
        "127.1",
        15000,
        PUBLIC,
        {"allow_hostnames": True},
        Code.HOSTNAME_NOT_ALLOWED,
        D.HOSTNAME,
    ),
    (
        "name-hex-ipv4",
        "0x7f.0.0.1",
        15000,
        PUBLIC,
        {"allow_hostnames": True},
        Code.HOSTNAME_NOT_ALLOWED,
        D.HOSTNAME,
    ),
    (
        "name-bracketed",
        "[::1]",
        15000,
        PUBLIC,
        {"allow_hostnames": True},
        Code.HOSTNAME_NOT_ALLOWED,
        D.HOSTNAME,
    ),
]


def _host(text: str) -> Any:
    try:
        return ip(text)
    except ValueError:
        return text


@pytest.mark.parametrize(
    ("host", "port", "observed", "policy", "want", "diag"),
    [c[1:] for c in CORPUS],
    ids=[c[0] for c in CORPUS],
)
def test_bypass_corpus(
    host: str, port: int, observed: str, policy: dict[str, Any], want: Any, diag: D | None
) -> None:
    d = decide(Request(_host(host), port), Endpoint(ip(observed), 40000), pol(**policy), OWN)
    got = d.code if isinstance(d, Deny) else type(d).__name__
    assert got == want, getattr(d, "explanation", d)
    if diag is not None:
        assert d.diagnosis is diag  # type: ignore[union-attr]


def test_corpus_is_big_and_ids_unique() -> None:
    ids = [c[0] for c in CORPUS]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


# --- properties --------------------------------------------------------------------------

_DENIED_V4 = [
    "0.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "255.255.255.255/32",
    "192.0.0.8/29",
    "192.0.0.128/25",
    "192.88.99.0/24",
    "100.100.100.200/32",
    "168.63.129.16/32",
]
_DENIED_V6 = [
    "::/128",
    "fe80::/10",
    "ff00::/8",
    "fec0::/10",
    "100::/64",
    "4000::/2",
    "0:0:0:1::/64",
    "2001:10::/28",
    "64:ff9b:1:1::/64",
    "fd00:ec2::254/128",
]


def _in(networks: list[str]) -> st.SearchStrategy[V4 | V6]:
    nets = [ipaddress.ip_network(n) for n in networks]
    return st.sampled_from(nets).flatmap(
        lambda n: st.integers(int(n.network_address), int(n.broadcast_address)).map(
            lambda i: ipaddress.ip_address(i) if n.version == 4 else V6(i)
        )
    )


def _wrap(v: V4, how: str, server: V4) -> V4 | V6:
    i = int(v)
    return {
        "plain": v,
        "mapped": V6(0xFFFF << 32 | i),
        "translated": V6(0xFFFF << 48 | i),
        "compatible": V6(i) if i > 1 else v,  # ::, ::1 are not embeddings
        "nat64": V6(int(V6("64:ff9b::")) | i),
        "nat64-local": V6(int(V6("64:ff9b:1::")) | i),
        "6to4": V6(0x2002 << 112 | i << 80 | 7),
        "teredo": V6(0x20010000 << 96 | int(server) << 64 | (~i & 0xFFFFFFFF)),
        "teredo-server": V6(0x20010000 << 96 | i << 64 | (~int(server) & 0xFFFFFFFF)),
    }[how]


WRAPS = [
    "plain",
    "mapped",
    "translated",
    "compatible",
    "nat64",
    "nat64-local",
    "6to4",
    "teredo",
    "teredo-server",
]
MODES = ["strict", "nat-observed", "advertised"]
ALLOWS: list[list[str]] = [[], ["::/0", "0.0.0.0/0"]]
PEERS = ["same", "inner", PUBLIC, "192.168.1.5", "2001:db8::5", "127.0.0.1", "::1"]

denied_v4_wrapped = st.builds(
    _wrap, _in(_DENIED_V4), st.sampled_from(WRAPS), st.just(V4("198.51.100.1"))
)
denied_addresses = st.one_of(denied_v4_wrapped, _in(_DENIED_V6))


def _peer(choice: str, addr: V4 | V6) -> V4 | V6:
    if choice == "same":
        return addr
    if choice == "inner":
        return Address.of(addr).norm
    return ip(choice)


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=600)
@given(
    denied_addresses,
    st.sampled_from(PEERS),
    st.sampled_from(MODES),
    st.sampled_from(ALLOWS),
    st.integers(1024, 65535),
)
def test_always_denied_never_allowed(
    addr: Any, peer: str, mode: str, allow: list[str], port: int
) -> None:
    policy = pol(mode=mode, allow_networks=allow)
    d = decide(Request(addr, port), Endpoint(_peer(peer, addr), 40000), policy)
    assert isinstance(d, Deny) and d.code is ANA, (addr, d)


loopbacks = st.builds(
    _wrap,
    _in(["127.0.0.0/8"]),
    st.sampled_from(WRAPS[:-1]),
    st.just(V4("198.51.100.1")),
) | st.just(V6("::1"))
non_loopback_peers = st.sampled_from(
    [PUBLIC, "192.168.1.5", "10.0.0.7", "100.64.0.9", "2001:db8::5", "fd00::5"]
)


@settings(max_examples=300)
@given(loopbacks, non_loopback_peers, st.sampled_from(MODES), st.sampled_from(ALLOWS))
def test_loopback_never_for_a_remote_peer(
    addr: Any, peer: str, mode: str, allow: list[str]
) -> None:
    policy = pol(mode=mode, allow_networks=allow)
    d = decide(Request(addr, 15000), Endpoint(ip(peer), 40000), policy)
    assert isinstance(d, Deny) and d.code is ANA


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=600)
@given(
    st.ip_addresses() | denied_addresses,
    st.ip_addresses() | denied_addresses,
    st.sampled_from(MODES),
    st.sampled_from(ALLOWS),
    st.integers(1, 65535),
)
def test_every_allow_is_safe(addr: Any, peer: Any, mode: str, allow: list[str], port: int) -> None:
    """Whatever comes in, an Allow's target is never in a denied class, never the
    registry itself, loopback only for a loopback peer, and (strict) the peer."""
    policy = pol(mode=mode, allow_networks=allow)
    d = decide(Request(addr, port), Endpoint(peer, 40000), policy, OWN)
    if not isinstance(d, Allow):
        return
    target = d.target
    host, loopback = Address.of(target.host), AddrClass.LOOPBACK
    assert host.cls not in ALWAYS_DENIED
    assert host == host.norm
    assert host.cls is not loopback or Address.of(peer).cls is loopback
    assert 1024 <= target.port <= 65535
    if target.port in (9000, 9100):
        assert host.cls is not loopback and target.host != ip("198.51.100.1")
    if mode == "strict":
        assert target.host == Address.of(peer).norm and not d.corrected
