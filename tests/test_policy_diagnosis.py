"""registry.policy.diagnosis: every NAT / mis-advertisement case and its explanation."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.config import PolicyConfig
from registry.model import Diagnosis, Endpoint, Request
from registry.policy.addresses import Address
from registry.policy.decide import Deny, decide
from registry.policy.diagnosis import container_network, diagnose, explain

ip = ipaddress.ip_address
D = Diagnosis

# (id, advertised, observed, expected)
CASES = [
    ("direct-v4", "203.0.113.5", "203.0.113.5", D.DIRECT),
    ("direct-v6", "2001:db8::5", "2001:db8::5", D.DIRECT),
    ("direct-mapped-peer", "198.51.100.7", "::ffff:198.51.100.7", D.DIRECT),
    ("direct-mapped-advertised", "::ffff:198.51.100.7", "198.51.100.7", D.DIRECT),
    ("direct-lan", "192.168.1.5", "192.168.1.5", D.DIRECT),
    ("direct-loopback", "127.0.0.1", "127.0.0.1", D.DIRECT),
    ("direct-cgnat-same", "100.64.1.1", "100.64.1.1", D.DIRECT),
    ("loopback-v4", "127.0.0.1", "203.0.113.5", D.LOOPBACK_ADVERTISED),
    ("loopback-127.0.1.1", "127.0.1.1", "192.168.1.5", D.LOOPBACK_ADVERTISED),
    ("loopback-v6-over-v4", "::1", "203.0.113.5", D.LOOPBACK_ADVERTISED),
    ("loopback-mapped", "::ffff:127.0.0.1", "2001:db8::5", D.LOOPBACK_ADVERTISED),
    ("loopback-other-loopback", "127.0.0.1", "::1", D.LOOPBACK_ADVERTISED),
    ("unspecified-v4", "0.0.0.0", "203.0.113.5", D.UNSPECIFIED_ADVERTISED),
    ("unspecified-v6", "::", "2001:db8::5", D.UNSPECIFIED_ADVERTISED),
    ("unspecified-mapped", "::ffff:0.0.0.0", "192.168.1.5", D.UNSPECIFIED_ADVERTISED),
    ("home-router", "192.168.1.5", "203.0.113.5", D.PRIVATE_BEHIND_NAT),
    ("campus-10", "10.1.2.3", "198.51.100.20", D.PRIVATE_BEHIND_NAT),
    ("172.16-not-container", "172.16.0.9", "203.0.113.5", D.PRIVATE_BEHIND_NAT),
    ("ula-behind-nat66", "fd00::5", "2001:db8::5", D.PRIVATE_BEHIND_NAT),
    ("cgnat-observed", "192.168.1.5", "100.64.7.7", D.CGNAT),
    ("cgnat-advertised", "100.80.0.1", "203.0.113.5", D.CGNAT),
    ("ds-lite", "192.0.0.2", "203.0.113.5", D.CGNAT),
    ("docker0", "172.17.0.2", "192.168.1.5", D.CONTAINER_NAT),
    ("docker-user-bridge", "172.18.0.3", "10.0.0.4", D.CONTAINER_NAT),
    ("docker-172.31", "172.31.9.9", "192.168.1.5", D.CONTAINER_NAT),
    ("podman", "10.88.0.5", "192.168.1.5", D.CONTAINER_NAT),
    ("k8s-pod", "10.244.1.7", "10.0.0.4", D.CONTAINER_NAT),
    ("k3s-pod", "10.42.0.9", "192.168.1.5", D.CONTAINER_NAT),
    ("container-host-loopback", "172.17.0.2", "127.0.0.1", D.CONTAINER_NAT),
    ("container-same-bridge", "172.17.0.2", "172.17.0.3", D.DIFFERENT_HOST),
    ("container-from-public", "172.17.0.2", "203.0.113.5", D.PRIVATE_BEHIND_NAT),
    ("lan-neighbour", "192.168.1.5", "192.168.1.6", D.DIFFERENT_HOST),
    ("public-other", "198.51.100.1", "203.0.113.5", D.DIFFERENT_HOST),
    ("public-from-lan", "203.0.113.5", "192.168.1.5", D.DIFFERENT_HOST),
    ("public-from-loopback", "203.0.113.5", "127.0.0.1", D.DIFFERENT_HOST),
    ("v6-other", "2001:db8::1", "2001:db8::2", D.DIFFERENT_HOST),
    ("link-local-v4", "169.254.3.4", "203.0.113.5", D.LINK_LOCAL_ADVERTISED),
    ("metadata", "169.254.169.254", "192.168.1.5", D.LINK_LOCAL_ADVERTISED),
    ("link-local-v6", "fe80::1", "2001:db8::5", D.LINK_LOCAL_ADVERTISED),
    ("link-local-v6-over-v4", "fe80::1", "203.0.113.5", D.LINK_LOCAL_ADVERTISED),
    ("v6-over-v4", "2001:db8::5", "203.0.113.5", D.FAMILY_MISMATCH),
    ("v4-over-v6", "203.0.113.5", "2001:db8::5", D.FAMILY_MISMATCH),
    ("private-v4-over-v6", "192.168.1.5", "2001:db8::5", D.FAMILY_MISMATCH),
    ("6to4-is-its-ipv4", "2002:cb00:7105::1", "203.0.113.5", D.DIRECT),
]


@pytest.mark.parametrize(("adv", "obs", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_diagnose(adv: str, obs: str, want: Diagnosis) -> None:
    assert diagnose(ip(adv), ip(obs)) is want


def test_every_case_is_in_the_table() -> None:
    covered = {c[3] for c in CASES}
    assert covered == set(Diagnosis) - {Diagnosis.HOSTNAME}


def test_container_network() -> None:
    assert container_network(ip("172.17.0.2")) is not None
    assert container_network(ip("::ffff:10.244.3.3")) is not None
    assert container_network(ip("172.16.0.2")) is None
    assert container_network(ip("10.0.0.1")) is None


# --- explanations -------------------------------------------------------------------

# Each line states the fix; these fragments are what a student must read.
FIX_WORDS = {
    D.DIRECT: ["same host"],
    D.LOOPBACK_ADVERTISED: ["this machine", "Advertise"],
    D.UNSPECIFIED_ADVERTISED: ["bind address", "not a destination", "advertise"],
    D.PRIVATE_BEHIND_NAT: ["NAT router", "Forward port 15000", "advertise 203.0.113.5:15000"],
    D.CGNAT: ["carrier-grade NAT", "cannot forward"],
    D.CONTAINER_NAT: ["-p 15000:15000", "advertise the host address"],
    D.DIFFERENT_HOST: ["calls back the address a request comes from"],
    D.LINK_LOCAL_ADVERTISED: ["link-local", "routable"],
    D.FAMILY_MISMATCH: ["the IPv6 address", "over IPv4", "over IPv6"],
    D.HOSTNAME: ["name", "IP address"],
}


@pytest.mark.parametrize("diag", list(Diagnosis))
def test_explain_states_sent_seen_and_fix(diag: Diagnosis) -> None:
    adv = "2001:db8::5" if diag is D.FAMILY_MISMATCH else "192.168.1.5"
    line = explain(diag, adv, "203.0.113.5", 15000)
    shown = f"[{adv}]" if ":" in adv else adv
    assert f"{shown}:15000" in line and "203.0.113.5" in line
    for word in FIX_WORDS[diag]:
        assert word in line, (diag, word)
    assert line.isascii() and "\n" not in line and "\r" not in line
    assert len(line) < 400


@pytest.mark.parametrize("diag", list(Diagnosis))
def test_explain_longest_addresses_fit(diag: Diagnosis) -> None:
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = explain(diag, v6, "::ffff:255.255.255.255", 65535)
    assert f"[{v6}]:65535" in line and len(line) < 400 and not line.endswith("...")


@pytest.mark.parametrize(
    ("adv", "obs", "sent", "seen"),
    [
        pytest.param("2002:c633:6405::", "2001:db8::9", "IPv4", "IPv6", id="6to4-over-v6"),
        pytest.param("::ffff:198.51.100.5", "2001:db8::9", "IPv4", "IPv6", id="mapped-over-v6"),
        pytest.param("2001:db8::5", "::ffff:203.0.113.5", "IPv6", "IPv4", id="mapped-peer"),
        pytest.param("2001:db8::5", "203.0.113.5", "IPv6", "IPv4", id="plain"),
    ],
)
def test_family_mismatch_names_the_families_of_the_addresses(
    adv: str, obs: str, sent: str, seen: str
) -> None:
    # From the address, not from a ':' in its text: an IPv4 carried in an IPv6
    # form is an IPv4 address, and the registry calls it over IPv4.
    line = explain(D.FAMILY_MISMATCH, Address.of(adv), Address.of(obs), 15000)
    assert f"the {sent} address" in line, line
    assert f"connected over {seen}" in line, line
    assert line.endswith(f"connect to the registry over {sent}."), line


def test_family_mismatch_from_decide_for_an_embedded_ipv4() -> None:
    host = ipaddress.ip_address("::ffff:198.51.100.5")
    peer = Endpoint(ipaddress.ip_address("2001:db8::9"), 40000)
    d = decide(Request(host, 15000), peer, PolicyConfig())
    assert isinstance(d, Deny) and d.diagnosis is D.FAMILY_MISMATCH, d
    assert "the IPv4 address" in d.explanation and "over IPv4." in d.explanation, d.explanation


def test_explain_brackets_ipv6_once() -> None:
    assert "[2001:db8::1]:80" in explain(D.DIFFERENT_HOST, "[2001:db8::1]", "2001:db8::2", 80)
    assert "[[" not in explain(D.DIFFERENT_HOST, "[2001:db8::1]", "2001:db8::2", 80)


@given(
    st.sampled_from(list(Diagnosis)), st.text(max_size=600), st.text(max_size=600), st.integers()
)
def test_explain_is_safe_for_any_text(diag: Diagnosis, adv: str, obs: str, port: int) -> None:
    line = explain(diag, adv, obs, port)
    assert line.isascii() and len(line) < 400
    assert all(32 <= ord(ch) < 127 for ch in line)


def test_double_nat_advice_never_forwards_the_router_to_a_container() -> None:
    from registry.model import Diagnosis
    from registry.policy.diagnosis import explain

    seen = Address.of("203.0.113.7")
    text = explain(Diagnosis.PRIVATE_BEHIND_NAT, Address.of("172.17.0.2"), seen, 15000)
    assert "to 172.17.0.2" not in text and "docker run -p 15000:15000" in text
    assert "advertise 203.0.113.7:15000" in text
    plain = explain(Diagnosis.PRIVATE_BEHIND_NAT, Address.of("192.168.1.5"), seen, 15000)
    assert "Forward port 15000 on the router to 192.168.1.5:15000" in plain
