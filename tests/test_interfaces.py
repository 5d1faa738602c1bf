"""This host's addresses, read from the kernel (real sockets, no fakes)."""

from __future__ import annotations

import ipaddress

from registry.net.interfaces import interface_addresses, is_local_address, reachable


def test_loopback_is_among_the_interface_addresses() -> None:
    assert ipaddress.ip_address("127.0.0.1") in interface_addresses()


def test_a_wildcard_listener_is_reachable_at_real_addresses_not_the_wildcard() -> None:
    shown = reachable([("0.0.0.0", 9000)])
    assert shown, "some address must be offered"
    assert all(not s.startswith("0.0.0.0") for s in shown)
    non_loopback = [a for a in interface_addresses() if a.version == 4 and not a.is_loopback]
    if non_loopback:
        assert f"{non_loopback[0]}:9000" in shown
        assert "127.0.0.1:9000" not in shown
    else:
        assert shown == ["127.0.0.1:9000"]


def test_a_specific_listener_is_reachable_where_it_is_bound() -> None:
    assert reachable([("127.0.0.1", 9000), ("127.0.0.1", 9000)]) == ["127.0.0.1:9000"]
    assert reachable([("::1", 9001)]) == ["[::1]:9001"]


def test_is_local_address_knows_ours_and_refuses_only_what_is_not() -> None:
    for ours in interface_addresses():
        if not ours.is_link_local:
            assert is_local_address(ours), ours
    assert is_local_address(ipaddress.ip_address("127.8.9.10"))
    assert is_local_address(ipaddress.ip_address("0.0.0.0"))
    assert is_local_address(ipaddress.ip_address("::"))
    assert is_local_address(ipaddress.ip_address("::ffff:127.0.0.1"))
    # TEST-NET-3 is assigned to no host (RFC 5737); a bind probe sends nothing.
    assert not is_local_address(ipaddress.ip_address("203.0.113.77"))
    assert not is_local_address(ipaddress.ip_address("2001:db8::77"))
