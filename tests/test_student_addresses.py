"""``student addresses``: parsing fixed ``ip -j addr`` and /proc text, classifying, rendering.

Everything here runs on fixed input: no interfaces are read and no packets sent.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from student.addresses import (
    CGNAT,
    CONTAINER,
    LINK_LOCAL,
    LOOPBACK,
    OTHER,
    PRIVATE,
    PUBLIC,
    InterfaceAddress,
    classify,
    gather,
    parse_if_inet6,
    parse_ip_json,
    render,
    run_addresses,
)

IP_JSON = json.dumps(
    [
        {
            "ifindex": 1,
            "ifname": "lo",
            "flags": ["LOOPBACK", "UP"],
            "addr_info": [
                {
                    "family": "inet",
                    "local": "127.0.0.1",
                    "prefixlen": 8,
                    "scope": "host",
                    "label": "lo",
                },
                {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"},
            ],
        },
        {
            "ifindex": 2,
            "ifname": "wlan0",
            "addr_info": [
                {"family": "inet", "local": "192.168.1.105", "prefixlen": 24, "scope": "global"},
                {
                    "family": "inet6",
                    "local": "fe80::1c2:3ff:fe45:6789",
                    "prefixlen": 64,
                    "scope": "link",
                },
                {"family": "inet6", "local": "2001:db8:1::5", "prefixlen": 64, "scope": "global"},
            ],
        },
        {
            "ifindex": 3,
            "ifname": "docker0",
            "addr_info": [
                {"family": "inet", "local": "172.17.0.1", "prefixlen": 16, "scope": "global"},
            ],
        },
        {"ifindex": 4, "ifname": "ifb0", "flags": ["NOARP"], "addr_info": []},
        {"ifindex": 5, "ifname": "weird", "addr_info": [{"family": "inet", "local": "nope"}, "x"]},
        {
            "ifindex": 6,
            "ifname": "tailscale0",
            "addr_info": [
                {"family": "inet", "local": "100.101.102.103", "prefixlen": 32},
            ],
        },
    ]
)

IF_INET6 = (
    "00000000000000000000000000000001 01 80 10 80       lo\n"
    "fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n"
    "fd000000000000000000000000000002 04 40 00 82     eth0\n"
    "garbage line\n"
    "zz000000000000000000000000000002 04 40 00 82     eth0\n"
)


def test_parse_ip_json() -> None:
    got = [(a.ifname, a.cidr, a.kind) for a in parse_ip_json(IP_JSON)]
    assert got == [
        ("lo", "127.0.0.1/8", LOOPBACK),
        ("lo", "::1/128", LOOPBACK),
        ("wlan0", "192.168.1.105/24", PRIVATE),
        ("wlan0", "fe80::1c2:3ff:fe45:6789/64", LINK_LOCAL),
        ("wlan0", "2001:db8:1::5/64", PUBLIC),
        ("docker0", "172.17.0.1/16", CONTAINER),
        ("tailscale0", "100.101.102.103/32", CGNAT),
    ]


@pytest.mark.parametrize("text", ["", "not json", "{}", "[1, 2]", '[{"addr_info": null}]'])
def test_parse_ip_json_tolerates_junk(text: str) -> None:
    assert parse_ip_json(text) == []


def test_parse_if_inet6() -> None:
    got = [(a.ifname, a.cidr, a.kind) for a in parse_if_inet6(IF_INET6)]
    assert got == [
        ("lo", "::1/128", LOOPBACK),
        ("eth0", "fe80::fc:ff:fe00:1/64", LINK_LOCAL),
        ("eth0", "fd00::2/64", PRIVATE),
    ]


CLASSES = [
    ("lo", "127.0.0.1", LOOPBACK),
    ("lo", "127.5.5.5", LOOPBACK),
    ("eth0", "::ffff:127.0.0.1", LOOPBACK),
    ("eth0", "169.254.169.254", LINK_LOCAL),
    ("eth0", "fe80::1", LINK_LOCAL),
    ("docker0", "172.18.0.1", CONTAINER),
    ("br-0123abcd", "192.168.49.1", CONTAINER),
    ("eth0", "172.17.0.2", CONTAINER),  # inside a Docker container
    ("podman0", "10.88.0.1", CONTAINER),
    ("veth12ab", "fe80::2", LINK_LOCAL),  # link-local wins over the name
    ("eth0", "100.64.0.1", CGNAT),
    ("eth0", "100.127.255.254", CGNAT),
    ("eth0", "100.128.0.1", PUBLIC),
    ("eth0", "10.1.2.3", PRIVATE),
    ("eth0", "172.31.255.1", PRIVATE),
    ("eth0", "172.32.0.1", PUBLIC),
    ("wlan0", "192.168.1.105", PRIVATE),
    ("eth0", "fd12:3456::1", PRIVATE),
    ("eth0", "8.8.8.8", PUBLIC),
    ("eth0", "2606:4700::1111", PUBLIC),
    ("eth0", "192.0.2.2", PUBLIC),  # documentation ranges stand in for public in test networks
    ("eth0", "0.0.0.0", OTHER),
    ("eth0", "224.0.0.1", OTHER),
    ("eth0", "240.0.0.1", OTHER),
]


@pytest.mark.parametrize(("ifname", "addr", "kind"), CLASSES)
def test_classify(ifname: str, addr: str, kind: str) -> None:
    assert classify(ifname, ipaddress.ip_address(addr)) == kind


def _addr(name: str, text: str, prefix: int | None = None) -> InterfaceAddress:
    return InterfaceAddress(name, ipaddress.ip_address(text), prefix)


def test_gather_prefers_ip_json_then_falls_back() -> None:
    assert len(gather(lambda: IP_JSON, lambda: IF_INET6, list)) == 7
    v4 = [_addr("eth0", "10.0.0.7", 8)]
    fallback = gather(lambda: None, lambda: IF_INET6, lambda: v4)
    assert [a.cidr for a in fallback] == [
        "10.0.0.7/8",
        "::1/128",
        "fe80::fc:ff:fe00:1/64",
        "fd00::2/64",
    ]
    assert gather(lambda: None, lambda: None, list) == []
    # a duplicate from two sources is listed once
    assert len(gather(lambda: None, lambda: IF_INET6 + IF_INET6, list)) == 3


def test_gather_on_this_machine_never_raises() -> None:
    assert all(isinstance(a, InterfaceAddress) for a in gather())


def test_render_marks_the_route_to_the_registry() -> None:
    lines = render(parse_ip_json(IP_JSON), "192.168.1.105")
    marked = [line for line in lines if line.endswith("<- use this one")]
    assert len(marked) == 1 and marked[0].startswith("wlan0")
    assert "192.168.1.105/24" in marked[0] and PRIVATE in marked[0]
    assert not any("<- use" in line for line in render(parse_ip_json(IP_JSON)))
    assert render([]) == [
        "No interface addresses found (neither `ip` nor /proc/net/if_inet6 is available)."
    ]


@pytest.mark.parametrize(
    ("route", "code", "last"),
    [
        (
            "192.168.1.105",
            0,
            "Advertise 192.168.1.105: it is the address your traffic to the registry 10.0.0.1:9000 leaves from.",
        ),
        ("10.9.9.9", 0, "The route to the registry 10.0.0.1:9000 leaves from 10.9.9.9."),
        (
            None,
            5,
            "No route to the registry 10.0.0.1:9000: check the address and your network connection.",
        ),
    ],
)
def test_run_addresses_with_registry(route: str | None, code: int, last: str) -> None:
    out: list[str] = []
    asked: list[tuple[str, int]] = []

    def fake_route(host: str, port: int) -> str | None:
        asked.append((host, port))
        return route

    found = parse_ip_json(IP_JSON)
    assert run_addresses(("10.0.0.1", 9000), out.append, addresses=found, route=fake_route) == code
    assert asked == [("10.0.0.1", 9000)]
    assert out[-1] == last
    assert len(out) == len(found) + 1


def test_run_addresses_without_registry() -> None:
    out: list[str] = []
    assert run_addresses(None, out.append, addresses=parse_if_inet6(IF_INET6)) == 0
    assert len(out) == 3
