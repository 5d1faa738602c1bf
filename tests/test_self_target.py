"""SPEC promise 2 through wildcard listeners: the registry never calls its own sockets.

A registry listening on ``0.0.0.0`` / ``[::]`` (and its admin on ``0.0.0.0``)
accepts on every address of its host, so a target is ``self_target`` when its
port is one of the registry's own and its address is any address of this host
(``registry.net.interfaces.is_local_address``, injected into the pure policy).

The end-to-end cases run the real ``registry`` and ``student`` in a namespace
this module creates (a veth pair carrying 192.0.2.1 and 2001:db8::1, nothing
connected to the host's network). The student connects *from* the host's
non-loopback address and advertises that address at the registry's own TCP,
admin and UDP ports: strict mode has nothing to object to, only the self rule.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import config as config_mod
from registry.config import PolicyConfig
from registry.model import Code, Endpoint, Request
from registry.policy.addresses import Address
from registry.policy.decide import Allow, Deny, decide, decide_resolved
from tests.netns import NetnsLab, RegistryInNs, netns_lab, require_netns
from tests.support import exe

ip = ipaddress.ip_address


# --- pure table ----------------------------------------------------------------

HOST_V4, HOST_V6, OTHER = ip("192.0.2.1"), ip("2001:db8::1"), ip("198.51.100.7")
WILDCARD = frozenset(
    {Endpoint(ip("0.0.0.0"), 9000), Endpoint(ip("::"), 9000), Endpoint(ip("0.0.0.0"), 9100)}
)
OURS = frozenset({HOST_V4, HOST_V6})


def _ours(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return addr in OURS


def _request(host: str, port: int) -> Request:
    return Request(ip(host), port)


@pytest.mark.parametrize(
    ("target", "port", "peer", "mode", "want"),
    [
        pytest.param("192.0.2.1", 9000, "192.0.2.1", "strict", Code.SELF_TARGET, id="v4-tcp-port"),
        pytest.param("192.0.2.1", 9100, "192.0.2.1", "strict", Code.SELF_TARGET, id="v4-admin"),
        pytest.param("2001:db8::1", 9000, "2001:db8::1", "strict", Code.SELF_TARGET, id="v6"),
        pytest.param(
            "::ffff:192.0.2.1", 9000, "192.0.2.1", "strict", Code.SELF_TARGET, id="v4-mapped"
        ),
        pytest.param(
            "192.0.2.1", 9000, "192.0.2.1", "nat-observed", Code.SELF_TARGET, id="nat-observed"
        ),
        pytest.param(
            "203.0.113.9", 9000, "192.0.2.1", "nat-observed", Code.SELF_TARGET, id="observed-ours"
        ),
        pytest.param("192.0.2.1", 15000, "192.0.2.1", "strict", None, id="ours-other-port"),
        pytest.param("198.51.100.7", 9000, "198.51.100.7", "strict", None, id="remote-same-port"),
    ],
)
def test_self_target_through_a_wildcard_listener(
    target: str, port: int, peer: str, mode: str, want: Code | None
) -> None:
    policy = PolicyConfig(mode=mode)
    d = decide(_request(target, port), Endpoint(ip(peer), 40000), policy, WILDCARD, _ours)
    if want is None:
        assert isinstance(d, Allow), d
    else:
        assert isinstance(d, Deny) and d.code is want, d


def test_the_predicate_is_asked_only_about_our_ports() -> None:
    asked: list[object] = []

    def probe(addr: object) -> bool:
        asked.append(addr)
        return False

    peer = Endpoint(OTHER, 40000)
    assert isinstance(
        decide(_request(str(OTHER), 15000), peer, PolicyConfig(), WILDCARD, probe), Allow
    )
    assert asked == []
    assert isinstance(
        decide(_request(str(OTHER), 9000), peer, PolicyConfig(), WILDCARD, probe), Allow
    )
    assert asked == [OTHER]


def test_a_predicate_that_cannot_tell_refuses_our_port_only() -> None:
    """Fail-closed: when asking the host fails, our own port is refused, others are not."""

    def broken(addr: object) -> bool:
        raise OSError("probe failed")

    peer = Endpoint(OTHER, 40000)
    d = decide(_request(str(OTHER), 9000), peer, PolicyConfig(), WILDCARD, broken)
    assert isinstance(d, Deny) and d.code is Code.SELF_TARGET, d
    d = decide(_request(str(OTHER), 15000), peer, PolicyConfig(), WILDCARD, broken)
    assert isinstance(d, Allow), d


def test_a_resolved_name_pointing_at_us_is_self_target() -> None:
    policy = PolicyConfig(allow_hostnames=True)
    request = Request("lab.example", 9000)
    peer = Endpoint(HOST_V4, 40000)
    d = decide_resolved(request, [HOST_V4], peer, policy, WILDCARD, _ours)
    assert isinstance(d, Deny) and d.code is Code.SELF_TARGET, d


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=400)
@given(
    st.ip_addresses(),
    st.ip_addresses(),
    st.sampled_from(["strict", "nat-observed", "advertised"]),
    st.sampled_from([[], ["::/0", "0.0.0.0/0"]]),
    st.sampled_from([9000, 9100]),
    st.booleans(),
)
def test_no_mode_dials_an_address_of_ours_on_our_ports(
    addr: Any, peer: Any, mode: str, allow: list[str], port: int, peer_is_ours: bool
) -> None:
    ours = Address.of(peer if peer_is_ours else addr).norm
    policy = config_mod.from_dict({"policy": {"mode": mode, "allow_networks": allow}}).policy
    d = decide(Request(addr, port), Endpoint(peer, 40000), policy, WILDCARD, lambda a: a == ours)
    if isinstance(d, Allow):
        assert d.target.host != ours, d


# --- end to end, in a namespace -------------------------------------------------

NS_V4, NS_V6 = "192.0.2.1", "2001:db8::1"
NS_V4_OTHER, NS_V6_OTHER = "192.0.2.2", "2001:db8::2"
NS_V4_LATE = "192.0.2.77"  # added while the registry runs
PORT, ADMIN = 9000, 9100

# Counts what a self-dial would send: a TCP SYN to the advertised address at our
# ports (the test's clients connect to the *other* address), or a datagram
# starting with "CALLBACK" to our UDP port. Nothing else in the namespace does.
DIAL_COUNTERS = f"""
table inet selftarget {{
  counter dialled_tcp {{}}
  counter dialled_udp {{}}
  chain out {{
    type filter hook output priority 0; policy accept;
    ip daddr {{ {NS_V4}, {NS_V4_LATE} }} tcp dport {{ {PORT}, {ADMIN} }} tcp flags syn counter name dialled_tcp
    ip6 daddr {NS_V6} tcp dport {{ {PORT}, {ADMIN} }} tcp flags syn counter name dialled_tcp
    udp dport {PORT} @ih,0,64 0x{b"CALLBACK".hex()} counter name dialled_udp
  }}
}}
"""


# One process, and a group (server.workers), whose workers must also refuse
# to call the supervisor's admin port.
@pytest.fixture(scope="module", params=["1", "2"], ids=["one-process", "group"])
def wildcard(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[NetnsLab, RegistryInNs]]:
    require_netns()
    tmp = tmp_path_factory.mktemp("selftarget")
    with netns_lab("selftarget") as lab:
        lab.add("reg")
        lab.link("reg", "st0", f"{NS_V4}/24", "reg", "st1", f"{NS_V4_OTHER}/24")
        lab.ip("reg", "addr", "add", f"{NS_V6}/64", "dev", "st0", "nodad")
        lab.ip("reg", "addr", "add", f"{NS_V6_OTHER}/64", "dev", "st1", "nodad")
        lab.nft("reg", DIAL_COUNTERS)
        db, cfg = tmp / "self.db", tmp / "self.toml"
        cfg.write_text("")
        out = lab.spawn(
            "reg",
            exe("registry"),
            "serve",
            "--listen",
            f"0.0.0.0:{PORT}",
            "--listen",
            f"[::]:{PORT}",
            "--admin",
            f"0.0.0.0:{ADMIN}",
            "--db",
            str(db),
            "--config",
            str(cfg),
            "--log-format",
            "json",
            "--workers",
            request.param,
        )
        out.wait_for('"event": "listening"', timeout=20)
        yield lab, RegistryInNs(out, lab.ns("reg"), db)


# A client that connects from one of the host's addresses to another (as a
# student on the registry's own machine may): the accepted connection's local
# address is not the advertised one, so only "any address of this host" catches it.
TCP_CLIENT = """
import socket, sys
src, dst, line = sys.argv[1], sys.argv[2], sys.argv[3]
family = socket.AF_INET6 if ":" in src else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(10)
    s.bind((src, 0))
    s.connect((dst, int(sys.argv[4])))
    s.sendall(line.encode() + b"\\n")
    print(s.makefile("rb").readline().decode().strip())
"""


def _dialled(lab: NetnsLab) -> dict[str, int]:
    """Packets each counter saw: a self-dial's SYNs and CALLBACK datagrams."""
    found = {}
    for name in ("dialled_tcp", "dialled_udp"):
        text = lab.exec_ok("reg", "nft", "list", "counter", "inet", "selftarget", name)
        found[name] = int(text.split("packets ", 1)[1].split()[0])
    return found


def _register(lab: NetnsLab, host: str, port: int, *extra: str) -> str:
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if "--udp" not in extra:
        via = NS_V6_OTHER if ":" in host else NS_V4_OTHER
        done = lab.run("reg", sys.executable, "-c", TCP_CLIENT, host, via, target, str(PORT))
        return done.stdout + done.stderr
    registry = f"[{host}]:{PORT}" if ":" in host else f"{host}:{PORT}"
    done = lab.run(
        "reg",
        exe("student"),
        "client",
        "--registry",
        registry,
        "--port",
        str(port),
        "--advertise",
        host,
        "--timeout",
        "10",
        *extra,
    )
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.parametrize(
    ("host", "port", "extra"),
    [
        pytest.param(NS_V4, PORT, (), id="tcp-v4"),
        pytest.param(NS_V6, PORT, (), id="tcp-v6"),
        pytest.param(NS_V4, ADMIN, (), id="admin-port"),
        pytest.param(NS_V4, PORT, ("--udp",), id="udp-v4"),
        pytest.param(NS_V6, PORT, ("--udp",), id="udp-v6"),
    ],
)
def test_a_wildcard_registry_refuses_to_call_itself(
    wildcard: tuple[NetnsLab, RegistryInNs], host: str, port: int, extra: tuple[str, ...]
) -> None:
    lab, reg = wildcard
    before = len(reg.registrations())
    output = _register(lab, host, port, *extra)
    assert "DENIED self_target" in output, output
    # Nothing was dialled: no SYN or CALLBACK datagram left for our own ports
    # (the callback is over before the student's reply), and no row but this
    # one (a registry calling its TCP port records its own CALLBACK line as a
    # malformed registration).
    assert _dialled(lab) == {"dialled_tcp": 0, "dialled_udp": 0}
    reg.out.wait_for('"code": "self_target"', timeout=5)
    rows = reg.registrations()[before:]
    assert [(r["status"], r["code"]) for r in rows] == [("DENIED", "self_target")], rows


@pytest.mark.slow
@pytest.mark.netns
def test_an_address_added_while_running_is_ours_at_once(
    wildcard: tuple[NetnsLab, RegistryInNs],
) -> None:
    # The host's addresses are asked of the kernel per request (a bind probe),
    # so one that appears after start (DHCP, a VPN, a container's late address)
    # is covered without a restart.
    lab, reg = wildcard
    lab.ip("reg", "addr", "add", f"{NS_V4_LATE}/32", "dev", "st0")
    try:
        before = len(reg.registrations())
        output = _register(lab, NS_V4_LATE, PORT)
        assert "DENIED self_target" in output, output
        assert _dialled(lab) == {"dialled_tcp": 0, "dialled_udp": 0}
        reg.out.wait_for(f'"advertised": "{NS_V4_LATE}:{PORT}"', timeout=5)
        rows = reg.registrations()[before:]
        assert [(r["status"], r["code"]) for r in rows] == [("DENIED", "self_target")], rows
    finally:
        lab.ip("reg", "addr", "del", f"{NS_V4_LATE}/32", "dev", "st0")
