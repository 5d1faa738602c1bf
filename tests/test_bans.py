"""Bans: the pure list and its BPF program, the kernel filter on real loopback
sockets, and the whole path in a registry (registry/defense/bans.py,
registry/net/kernel/banfilter.py).

The program is checked two ways: by a small classic-BPF interpreter here,
instruction by instruction over hand-built IPv4 and IPv6 headers (every
family, prefix and budget case), and by the kernel itself on loopback: a
banned source's SYN is dropped (its connect times out), another source
connects, and the largest program the budget allows still lets accepted
sockets be created. Only 127.0.0.0/8 and ::1 are used.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from registry import config as config_mod
from registry.defense.bans import BanList, spread_share
from registry.defense.door import RATE_LIMITED, Refused
from registry.defense.ratelimit import source_network, source_of
from registry.model import Code, Outcome
from registry.net.kernel.banfilter import BanFilter
from registry.net.kernel.bpf import (
    ACCEPT,
    AND_K,
    BPF_MAXINSNS,
    DROP,
    JA,
    JEQ_K,
    JEQ_X,
    LD_B_ABS,
    LD_MEM,
    LD_W_ABS,
    LD_W_LEN,
    LSH_K,
    RET_K,
    RSH_K,
    SKF_NET_OFF,
    ST,
    TAX,
    Insn,
    attach,
    detach,
    pack,
)
from registry.net.kernel.classic import drop_program, entry_cost, insn_budget
from registry.server import Registry, Runtime
from tests.support import exchange_from, http_get

linux = pytest.mark.skipif(sys.platform != "linux", reason="SO_ATTACH_FILTER is Linux")


def v4(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


def v6(text: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(text)


def key_of(text: str) -> int:
    """A source as the door names it (``source_of``): an IPv4 address or an IPv6 network."""
    net = ipaddress.ip_network(text)
    return source_of(net.network_address, net.prefixlen if net.version == 6 else 64)


# --- the list ----------------------------------------------------------------------


def test_a_source_is_banned_at_its_after_th_refusal_once() -> None:
    bans = BanList(after=3, duration=60.0, max_entries=10)
    key = key_of("127.2.0.1")
    assert bans.consider(key, 1, 10.0) is None
    assert bans.consider(key, 2, 10.5) is None
    ban = bans.consider(key, 3, 11.0)
    assert ban is not None and (ban.since, ban.until, ban.refusals) == (11.0, 71.0, 3)
    assert bans.consider(key, 4, 11.5) is None  # already banned: one ban, not two
    assert key in bans and len(bans) == 1 and bans.total == 1 and bans.version == 1


def test_after_zero_never_bans() -> None:
    bans = BanList(after=0, duration=60.0, max_entries=10)
    assert bans.consider(key_of("127.2.0.1"), 10_000, 0.0) is None
    assert len(bans) == 0 and bans.version == 0


# (repeat, wait owed): a source in debt (told to wait longer than a token and a hold:
# test_door.py) and back a third time within the window is banned for that wait (at
# most duration 60 s)
IGNORED = [
    ("first long refusal", 1, 40.0, None),
    ("second long refusal", 2, 40.0, None),
    ("third: banned for the wait", 3, 40.0, 40.0),
    ("a wait past duration: capped", 3, 3600.0, 60.0),
    ("not in debt (a rate limit, a hold, the per_source cap)", 3, 0.0, None),
    ("at ban_after the usual ban, whatever the wait", 20, 0.0, 60.0),
]


@pytest.mark.parametrize(
    ("name", "repeat", "wait", "want"), IGNORED, ids=[case[0] for case in IGNORED]
)
def test_a_source_ignoring_a_long_wait_is_banned_for_it(
    name: str, repeat: int, wait: float, want: float | None
) -> None:
    bans = BanList(after=20, duration=60.0, max_entries=10, ignored_after=3)
    ban = bans.consider(key_of("127.2.0.1"), repeat, 100.0, wait)
    assert (None if ban is None else ban.until - ban.since) == want


def test_the_ignored_wait_rule_is_off_at_zero_and_with_bans_off() -> None:
    rule_off = BanList(after=20, duration=60.0, max_entries=10, ignored_after=0)
    assert rule_off.consider(key_of("127.2.0.1"), 19, 0.0, 3600.0) is None
    bans_off = BanList(after=0, duration=60.0, max_entries=10, ignored_after=3)
    assert bans_off.consider(key_of("127.2.0.1"), 19, 0.0, 3600.0) is None
    exempt = BanList(
        after=20,
        duration=60.0,
        max_entries=10,
        exempt=[ipaddress.ip_network("127.2.0.0/16")],
        ignored_after=3,
    )
    assert exempt.consider(key_of("127.2.0.1"), 3, 0.0, 3600.0) is None
    lifted = rule_off.reconfigure(20, 60.0, 10, ignored_after=3)
    assert lifted == [] and rule_off.consider(key_of("127.2.0.1"), 3, 0.0, 3600.0) is not None


def test_a_ban_lasts_up_to_spread_longer_fixed_per_source() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10_000, spread=0.5)
    keys = [key_of(f"127.2.{n // 250}.{n % 250 + 1}") for n in range(1000)]
    lengths = []
    for key in keys:
        ban = bans.consider(key, 1, 100.0)
        assert ban is not None
        assert ban.until == 100.0 + 60.0 * (1 + 0.5 * spread_share(key))  # predictable
        lengths.append(ban.until - ban.since)
    assert 60.0 <= min(lengths) and max(lengths) < 90.0
    # a wave of 1,000 bans made together ends over 30 s, not at once: each
    # 3 s tenth of the spread lifts 70-130 of them
    tenths = [0] * 10
    for length in lengths:
        tenths[int((length - 60.0) / 3.0)] += 1
    assert all(70 <= n <= 130 for n in tenths), tenths
    v6_tenths = [0] * 10  # IPv6 sources: their /64s, whose low half is all zero
    for n in range(1000):
        v6_tenths[int(spread_share(key_of(f"2001:db8:0:{n:x}::/64")) * 10)] += 1
    assert all(70 <= n <= 130 for n in v6_tenths), v6_tenths
    assert BanList(1, 60.0, 10).consider(keys[0], 1, 0.0).until == 60.0  # type: ignore[union-attr]


def test_bans_expire_at_their_exact_time() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    bans.consider(key_of("127.2.0.1"), 1, 0.0)
    bans.consider(key_of("127.2.0.2"), 1, 5.0)
    assert bans.next_expiry() == 60.0
    assert bans.expire(59.999) == [] and bans.version == 2
    assert [str(b.network) for b in bans.expire(60.0)] == ["127.2.0.1"] and bans.version == 3
    assert bans.next_expiry() == 65.0
    assert [str(b.network) for b in bans.expire(100.0)] == ["127.2.0.2"]
    assert bans.next_expiry() == float("inf") and len(bans) == 0


def test_bans_of_different_lengths_expire_in_their_own_order() -> None:
    # an ignored-wait ban lasts the wait it ignored: made later, it may end sooner
    bans = BanList(after=20, duration=60.0, max_entries=10, ignored_after=1)
    bans.consider(key_of("127.2.0.1"), 20, 0.0)  # the usual 60 s
    bans.consider(key_of("127.2.0.2"), 1, 1.0, 30.0)  # until 31
    bans.consider(key_of("127.2.0.3"), 1, 2.0, 10.0)  # until 12
    assert bans.next_expiry() == 12.0
    assert [str(b.network) for b in bans.expire(31.0)] == ["127.2.0.3", "127.2.0.2"]
    assert bans.next_expiry() == 60.0 and len(bans) == 1


def test_take_changes_names_each_ban_and_lift_once() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    assert bans.take_changes() == []
    bans.consider(key_of("127.2.0.1"), 1, 0.0)
    bans.consider(key_of("127.2.0.2"), 1, 10.0)
    bans.consider(key_of("127.2.0.1"), 2, 11.0)  # banned already: no change
    assert [str(source_network(k)) for k in bans.take_changes()] == ["127.2.0.1", "127.2.0.2"]
    assert bans.take_changes() == []  # taken
    bans.expire(60.0)
    assert [str(source_network(k)) for k in bans.take_changes()] == ["127.2.0.1"]
    assert key_of("127.2.0.1") not in bans and key_of("127.2.0.2") in bans
    bans.reconfigure(after=0, duration=60.0, max_entries=10)  # lifts the rest
    assert [str(source_network(k)) for k in bans.take_changes()] == ["127.2.0.2"]


def test_a_ban_lifted_by_a_reload_does_not_expire_its_successor() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    bans.consider(key_of("127.2.0.1"), 1, 0.0)  # until 60
    bans.reconfigure(after=0, duration=60.0, max_entries=10)  # lifted at once
    assert bans.next_expiry() == float("inf")  # its old expiry is not reported
    bans.reconfigure(after=1, duration=60.0, max_entries=10)
    bans.consider(key_of("127.2.0.1"), 1, 30.0)  # banned again, until 90
    assert bans.expire(60.0) == [] and key_of("127.2.0.1") in bans  # not the old ban's time
    assert bans.next_expiry() == 90.0
    assert [b.until for b in bans.expire(90.0)] == [90.0]


def test_a_full_list_makes_no_new_ban_and_counts_it() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=2)
    for n in range(5):
        bans.consider(key_of(f"127.2.0.{n + 1}"), 1, float(n))
    assert [str(b.network) for b in bans.active()] == ["127.2.0.1", "127.2.0.2"]
    assert bans.skipped == 3 and bans.total == 2
    bans.expire(60.0)  # one slot frees: the next offender is banned
    assert bans.consider(key_of("127.2.0.9"), 1, 61.0) is not None


def test_reconfigure_lifts_all_when_off_and_the_newest_past_a_smaller_cap() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    for n in range(4):
        bans.consider(key_of(f"127.2.0.{n + 1}"), 1, float(n))
    lifted = bans.reconfigure(after=1, duration=30.0, max_entries=3)
    assert [str(b.network) for b in lifted] == ["127.2.0.4"]
    assert [b.until for b in bans.active()] == [60.0, 61.0, 62.0]  # live bans keep their time
    assert bans.consider(key_of("127.2.0.8"), 1, 10.0) is None  # full at the new cap
    assert len(bans.reconfigure(after=0, duration=30.0, max_entries=3)) == 3
    assert len(bans) == 0


def test_exempt_networks_are_never_banned_and_a_reload_lifts_newly_exempt() -> None:
    campus = [ipaddress.ip_network("203.0.113.0/24"), ipaddress.ip_network("2001:db8:7::/48")]
    bans = BanList(after=1, duration=60.0, max_entries=10, exempt=campus)
    assert bans.consider(key_of("203.0.113.9"), 100, 0.0) is None  # inside the /24
    assert bans.consider(key_of("2001:db8:7:1::/64"), 100, 0.0) is None  # a /64 of the /48
    assert bans.consider(key_of("2001:db8::/32"), 100, 0.0) is None  # overlaps it: partly exempt
    assert bans.consider(key_of("203.0.114.9"), 1, 0.0) is not None  # next door: banned
    assert bans.consider(key_of("2001:db8:8::/64"), 1, 0.0) is not None
    lifted = bans.reconfigure(1, 60.0, 10, exempt=[ipaddress.ip_network("203.0.114.0/24")])
    assert [str(b.network) for b in lifted] == ["203.0.114.9"]
    assert [str(b.network) for b in bans.active()] == ["2001:db8:8::/64"]


# --- the program, run by a classic-BPF interpreter ------------------------------------


def run_bpf(program: list[Insn], net_header: bytes, transport: bytes = b"") -> int:
    """Execute ``program`` on a packet whose network header is ``net_header``,
    followed by ``transport`` (the TCP header and payload: where the packet's
    data starts for a TCP socket's filter, and its ``len``)."""
    a, x, mem, pc = 0, 0, [0] * 16, 0
    for _ in range(len(program) + 1):  # no loops in classic BPF: each insn at most once
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (LD_W_ABS, LD_B_ABS):
            size = 4 if code == LD_W_ABS else 1
            if k < 0x100000:  # from the start of the data: the TCP header
                data, offset = transport, k
            else:
                data, offset = net_header, k - (SKF_NET_OFF & 0xFFFFFFFF)
                assert 0 <= offset < 0x100000, f"unexpected load offset k={k:#x}"
            if offset + size > len(data):
                return 0  # the kernel drops a packet a load runs past
            a = int.from_bytes(data[offset : offset + size], "big")
        elif code == LD_W_LEN:
            a = len(transport)
        elif code == TAX:
            x = a
        elif code == RSH_K:
            a >>= k
        elif code == LSH_K:
            a = (a << k) & 0xFFFFFFFF
        elif code == JEQ_X:
            pc += jt if a == x else jf
        elif code == LD_MEM:
            a = mem[k]
        elif code == ST:
            mem[k] = a
        elif code == AND_K:
            a &= k
        elif code == JEQ_K:
            pc += jt if a == k else jf
        elif code == JA:
            pc += k
        elif code == RET_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("ran off the program")


def ipv4_header(src: str) -> bytes:
    return (
        bytes([0x45, 0, 0, 40]) + bytes(8) + socket.inet_aton(src) + socket.inet_aton("127.0.0.1")
    )


def ipv6_header(src: str) -> bytes:
    return (
        bytes([0x60, 0, 0, 0, 0, 20, 6, 64])
        + ipaddress.IPv6Address(src).packed
        + ipaddress.IPv6Address("::1").packed
    )


def header_from(key: Any) -> bytes:
    """A packet from ``key`` (an address in it, for a network)."""
    if isinstance(key, ipaddress.IPv4Address):
        return ipv4_header(str(key))
    return ipv6_header(str(key.network_address + 1))


BANNED: list[Any] = [
    v4("127.2.0.1"),
    v4("10.1.2.3"),
    v6("2001:db8:1:2::/64"),
    v6("2001:db8:aa00::/40"),  # a partial word: 8 bits of the second
    v6("::1/128"),
]

PACKETS = [
    ("v4 banned", ipv4_header("127.2.0.1"), DROP),
    ("v4 banned, second entry", ipv4_header("10.1.2.3"), DROP),
    ("v4 neighbour", ipv4_header("127.2.0.2"), ACCEPT),
    ("v4 same low bytes, other net", ipv4_header("128.2.0.1"), ACCEPT),
    ("v6 in a banned /64", ipv6_header("2001:db8:1:2:dead:beef::9"), DROP),
    ("v6 next /64", ipv6_header("2001:db8:1:3::9"), ACCEPT),
    ("v6 in the /40", ipv6_header("2001:db8:aaff:ffff::1"), DROP),
    ("v6 just past the /40", ipv6_header("2001:db8:ab00::1"), ACCEPT),
    ("v6 /128 exact", ipv6_header("::1"), DROP),
    ("v6 /128 neighbour", ipv6_header("::2"), ACCEPT),
    ("v6 whose words hold a banned v4", ipv6_header("::7f02:1"), ACCEPT),
    ("not IP", bytes([0x10]) + bytes(39), ACCEPT),
    ("v4 truncated header", bytes([0x45]) + bytes(10), DROP),
]


@pytest.mark.parametrize(("name", "header", "want"), PACKETS, ids=[p[0] for p in PACKETS])
def test_program_drops_exactly_the_banned(name: str, header: bytes, want: int) -> None:
    program, held = drop_program(BANNED)
    assert held == len(BANNED)
    assert run_bpf(program, header) == want


def test_program_with_no_bans_accepts_everything() -> None:
    program, held = drop_program([])
    assert held == 0
    for header in (ipv4_header("127.2.0.1"), ipv6_header("::1")):
        assert run_bpf(program, header) == ACCEPT


def test_a_zero_prefix_bans_all_of_ipv6_and_no_ipv4() -> None:
    program, _ = drop_program([v6("::/0")])
    assert run_bpf(program, ipv6_header("2001:db8::1")) == DROP
    assert run_bpf(program, ipv4_header("127.2.0.1")) == ACCEPT


def test_program_is_well_formed_at_the_instruction_limit() -> None:
    # Jumps in classic BPF are forward only and 8-bit for conditionals: every
    # target must land inside the program, and the program must end in ret.
    keys: list[Any] = [v4(f"127.2.{n // 250}.{n % 250 + 1}") for n in range(1500)]
    keys += [v6(f"2001:db8:{n:x}::/64") for n in range(400)]
    program, held = drop_program(keys, BPF_MAXINSNS)
    assert len(program) <= BPF_MAXINSNS
    assert 0 < held < len(keys)  # the budget stopped it, in order
    assert sum(entry_cost(k) for k in keys[:held]) + 18 <= BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(program):
        if code == JEQ_K:
            assert jt <= 255 and jf <= 255
            assert pc + 1 + max(jt, jf) < len(program)
        if code == JA:
            assert pc + 1 + k < len(program)
    assert program[-1][0] == RET_K
    # the last key held is still dropped, the first one left out is not
    assert run_bpf(program, header_from(keys[held - 1])) == DROP
    assert run_bpf(program, header_from(keys[held])) == ACCEPT


def test_pack_is_struct_sock_filter() -> None:
    assert pack([(RET_K, 1, 2, 0x01020304)]) == struct.pack("=HBBI", 6, 1, 2, 0x01020304)
    assert len(pack([(RET_K, 0, 0, 0)] * 3)) == 24


def test_insn_budget_follows_optmem(tmp_path: Path) -> None:
    f = tmp_path / "optmem_max"
    f.write_text("20480\n")
    assert insn_budget(f) == 640
    f.write_text("131072\n")
    assert insn_budget(f) == 4096
    f.write_text("1048576\n")
    assert insn_budget(f) == BPF_MAXINSNS
    assert insn_budget(tmp_path / "missing") == 640


# --- the kernel, on loopback -----------------------------------------------------------


@contextmanager
def listener(host: str = "127.0.0.1") -> Iterator[socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        lst.bind((host, 0))
        lst.listen(64)
        yield lst


def reaches(lst: socket.socket, src: str, timeout: float = 0.4) -> bool:
    """Does a connection from ``src`` get through, data and all?"""
    family = lst.family
    with socket.socket(family, socket.SOCK_STREAM) as c:
        c.bind((src, 0))
        c.settimeout(timeout)
        try:
            c.connect(lst.getsockname()[:2])
        except TimeoutError:
            return False
        c.sendall(b"ping")
        lst.settimeout(2)
        conn, _ = lst.accept()
        with conn:
            conn.settimeout(2)
            return conn.recv(4) == b"ping"


def kernel_attach(lst: socket.socket, keys: list[Any], budget: int = BPF_MAXINSNS) -> int:
    program, held = drop_program(keys, budget)
    attach(lst, program)
    return held


@pytest.mark.slow
@linux
def test_kernel_drops_a_banned_sources_syn_and_no_other() -> None:
    with listener() as lst:
        kernel_attach(lst, [v4("127.2.0.1"), v4("127.2.0.3")])
        assert not reaches(lst, "127.2.0.1")
        assert reaches(lst, "127.2.0.2")
        assert not reaches(lst, "127.2.0.3")
        detach(lst)
        assert reaches(lst, "127.2.0.1")
        detach(lst)  # detaching twice is fine


@contextmanager
def ipv6_listener() -> Iterator[socket.socket]:
    """A listener on ::1; the test is skipped where there is no IPv6 loopback."""
    try:
        ctx = listener("::1")
        lst = ctx.__enter__()
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        yield lst
    finally:
        ctx.__exit__(None, None, None)


@linux
def test_kernel_ipv6_prefix_ban() -> None:
    with ipv6_listener() as lst:
        kernel_attach(lst, [v6("2001:db8::/64")])
        assert reaches(lst, "::1")  # another /64
        kernel_attach(lst, [v6("2001:db8::/64"), v6("::/64")])  # ::1's own /64
        assert not reaches(lst, "::1")


@linux
def test_kernel_accepts_the_largest_program_the_budget_allows() -> None:
    # Accepted sockets inherit the filter and are charged its size: at the budget
    # the charge must still succeed, or every new connection would be dropped.
    keys: list[Any] = [v4(f"127.3.{n // 250}.{n % 250 + 1}") for n in range(5000)]
    with listener() as lst:
        held = kernel_attach(lst, keys, insn_budget())
        assert held > 100
        for _ in range(3):
            assert reaches(lst, "127.2.0.2")
        assert not reaches(lst, str(keys[held - 1]))


class RecordingSock:
    """Records what BanFilter asks of a socket (which programs, when)."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int, bytes | int]] = []

    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None:
        self.calls.append((trio.current_time(), optname, value))


async def test_ban_filter_applies_coalesces_and_lifts_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    sock = RecordingSock()
    bf = BanFilter([sock], bans, budget=BPF_MAXINSNS)
    bf.available = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bf.run)
        await trio.sleep(1)
        assert sock.calls == []  # nothing banned: nothing attached
        for n, at in enumerate((1.0, 1.02, 1.05)):  # a burst of bans
            await trio.sleep(at - trio.current_time())
            bans.consider(key_of(f"127.2.0.{n + 1}"), 1, trio.current_time())
            bf.poke()
        await trio.sleep(1.5 - trio.current_time())
        bans.consider(key_of("127.2.0.9"), 1, trio.current_time())
        bf.poke()
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    attach_opt, detach_opt = 26, 27
    times = [(round(t, 3), opt) for t, opt, _ in sock.calls]
    # t=1: the first ban is attached at once; the two that follow within
    # REFRESH_S are attached together at 1.1; t=1.5: the fourth. Lifts: at 61.0
    # the first (three left), at 61.1 the two that fell due meanwhile, at 61.5
    # the last: no ban left, the filter is detached.
    assert times == [
        (1.0, attach_opt),
        (1.1, attach_opt),
        (1.5, attach_opt),
        (61.0, attach_opt),
        (61.1, attach_opt),
        (61.5, detach_opt),
    ], times
    assert bf.filtered == 0 and len(bans) == 0


class AcceptingSock:
    """Counts the filters attached or detached; the kernel is not involved."""

    def __init__(self) -> None:
        self.calls = 0

    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None:
        self.calls += 1


class RefusingSock:
    """A socket whose kernel refuses every filter (ENOMEM: optmem exhausted)."""

    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")


def test_a_kernel_that_refuses_the_filter_is_reported_and_the_bans_stand() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    bans.consider(key_of("127.2.0.1"), 1, 0.0)
    bf = BanFilter([RefusingSock()], bans, budget=BPF_MAXINSNS)
    bf.available = True
    with structlog.testing.capture_logs() as logs:
        bf.apply()
        bans.consider(key_of("127.2.0.2"), 1, 0.0)
        bf.apply()  # not tried again: one error line, not one per change
    assert [e["event"] for e in logs] == ["ban_filter_failed"]
    assert logs[0]["error"] == "Cannot allocate memory" and logs[0]["bans"] == 1
    assert not bf.available and bf.filtered == 0 and len(bans) == 2
    assert not bf.drops_new_bans  # a refusal that bans must not promise timeouts


def test_bans_past_the_budget_are_listed_and_reported_once() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=100)
    sock = AcceptingSock()
    bf = BanFilter([sock], bans, budget=18 + 2 * 3)  # the dispatch and tails, and 3 IPv4 bans
    bf.available = True
    assert bf.drops_new_bans  # nothing banned yet: a ban would be dropped
    with structlog.testing.capture_logs() as logs:
        for n in range(5):
            bans.consider(key_of(f"127.2.0.{n + 1}"), 1, 0.0)
            bf.apply()
        full = bf.drops_new_bans  # the refusal that bans must not promise timeouts now
        lifted = bans.expire(60.0)  # all gone: the filter fits again...
        bf.apply()
        fits_again = bf.drops_new_bans
        for n in range(4):  # ...until it is full once more: reported again
            bans.consider(key_of(f"127.3.0.{n + 1}"), 1, 61.0)
            bf.apply()
    assert len(lifted) == 5 and bf.filtered == 3 and len(bans) == 4
    assert [e["event"] for e in logs] == ["bans_not_filtered"] * 2
    assert (logs[0]["bans"], logs[0]["filtered"]) == (4, 3)
    assert sock.calls == 5 + 1 + 4  # attached on every change, detached once
    assert not full and fits_again and not bf.drops_new_bans


def test_a_report_with_a_limit_lists_only_the_oldest_bans_and_whole_counts() -> None:
    # A worker's snapshot (every second) builds only the bans it sends.
    bans = BanList(after=1, duration=60.0, max_entries=100)
    for n in range(5):
        bans.consider(key_of(f"127.2.0.{n + 1}"), 1, float(n))
    bf = BanFilter([], bans)
    whole, cut = bf.report(10.0), bf.report(10.0, limit=2)
    assert [b["source"] for b in whole["bans"]] == [f"127.2.0.{n + 1}" for n in range(5)]
    assert cut["bans"] == whole["bans"][:2] and cut["banned"] == whole["banned"] == 5
    assert bans.active(0) == [] and len(bans.active()) == 5


# --- the whole path ------------------------------------------------------------------


async def _exchange(port: int, src: str, data: bytes) -> bytes | None:
    return await exchange_from(port, src, data, connect_timeout=0.5)


@pytest.mark.slow
@linux
async def test_a_source_refused_in_a_loop_is_banned_in_the_kernel_then_let_back(
    tmp_path: Path,
) -> None:
    # per_source 1/hour, refusals answered after 50 ms, ban at the 3rd refusal for 1.5 s:
    # 127.2.0.9's first connection is served (ERROR malformed), the next three are
    # refused BUSY rate_limited, and from then on its SYNs are dropped, while
    # 127.2.0.10 is still answered. After 1.5 s the ban is lifted.
    cfg = config_mod.from_dict(
        {
            "server": {
                "listen": ["127.0.0.1:0"],
                "admin": "127.0.0.1:0",
                "db": str(tmp_path / "bans.db"),
            },
            "ratelimit": {"per_source": "1/hour"},
            "tuning": {
                "refusal_delay": "50ms",  # a hold: the request is read before the answer
                "max_refusal_delay": "50ms",
                "ban_after": 3,
                "ban_duration": "1500ms",
                "ban_spread": 0,  # exactly 1.5 s
                # the refusal-count rule alone (1/hour is a long wait: the ignored-wait
                # rule would ban at the 2nd refusal)
                "ban_after_ignored": 0,
            },
        }
    )
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        assert runtime.admin is not None
        admin = runtime.admin.port
        first = await _exchange(port, "127.2.0.9", b"hello\n")
        refused = [await _exchange(port, "127.2.0.9", b"hello\n") for _ in range(3)]
        banned_at = trio.current_time()
        await trio.sleep(0.05)  # the filter task attaches on its next turn
        dropped = await _exchange(port, "127.2.0.9", b"hello\n")
        other = await _exchange(port, "127.2.0.10", b"hello\n")
        status, body = await trio.to_thread.run_sync(http_get, admin, "/api/bans")
        _, metrics = await trio.to_thread.run_sync(http_get, admin, "/metrics")
        assert runtime.tally.totals["rate_limited"] == 3  # the dropped SYN never arrived
        kind = runtime.ban_filter.kind if runtime.ban_filter is not None else None
        await trio.sleep(max(0.0, banned_at + 1.7 - trio.current_time()))
        lifted = len(runtime.bans)
        back = await _exchange(port, "127.2.0.9", b"hello\n")
        # let back, but refused again within the same refusal window: banned again
        again = [str(ban.network) for ban in runtime.bans.active()]
        runtime.shutdown()
    assert first is not None and first.startswith(b"ERROR malformed "), first
    assert all(r is not None and r.startswith(b"BUSY rate_limited ") for r in refused), refused
    assert dropped is None, dropped
    assert other is not None and other.startswith(b"ERROR malformed "), other
    assert back is not None and back.startswith(b"BUSY rate_limited "), back
    assert lifted == 0 and again == ["127.2.0.9"]
    assert status == 200
    doc = json.loads(body)
    assert doc["banned"] == 1 and doc["kernel_filtered"] == 1 and doc["total"] == 1
    assert doc["kernel_filter"] == kind and kind in ("ebpf", "classic")
    [ban] = doc["bans"]
    assert ban["source"] == "127.2.0.9" and ban["refusals"] == 3
    assert 0 < ban["seconds_left"] <= 1.5
    assert b"registry_banned_sources 1.0" in metrics
    assert b"registry_bans_total 1.0" in metrics


@pytest.mark.slow
@linux
async def test_a_reload_to_the_classroom_profile_lifts_every_ban(tmp_path: Path) -> None:
    # docs/limits.md: "to lift every ban at once, set profile = "classroom" (no bans)
    # and send SIGHUP"
    path = tmp_path / "registry.toml"
    text = f"""
[server]
listen = ["127.0.0.1:0"]
admin = "off"
db = "{tmp_path / "reload.db"}"
[ratelimit]
per_source = "1/hour"
[limits]
profile = "internet"
[tuning]
refusal_delay = "50ms"
max_refusal_delay = "50ms"
ban_after = 2
"""
    path.write_text(text)
    cfg = config_mod.load(str(path))
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, config_path=str(path), handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        for _ in range(3):  # served once, then refused twice: banned
            await _exchange(port, "127.2.0.9", b"hello\n")
        await trio.sleep(0.05)
        banned = await _exchange(port, "127.2.0.9", b"hello\n")
        path.write_text(text.replace('"internet"', '"classroom"').replace("ban_after = 2\n", ""))
        runtime.reload()
        await trio.sleep(0.05)  # the filter task detaches on its next turn
        after = await _exchange(port, "127.2.0.9", b"hello\n")
        left = len(runtime.bans)
        runtime.shutdown()
    assert banned is None
    assert after is not None and after.startswith(b"BUSY rate_limited "), after
    assert left == 0


def looping_config(
    tmp_path: Path, limits: dict[str, object], **tuning: object
) -> config_mod.Config:
    """A registry on loopback where every connection after a source's first is
    refused (per_source 1/hour, a wait of ~3600 s), answered after 50 ms."""
    return config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(tmp_path / "l.db")},
            "ratelimit": {"per_source": "1/hour"},
            "limits": limits,
            "tuning": {"refusal_delay": "50ms", "max_refusal_delay": "50ms", **tuning},
        }
    )


@pytest.mark.slow
@linux
async def test_an_exempt_source_is_refused_but_never_banned(tmp_path: Path) -> None:
    cfg = looping_config(tmp_path, {"ban_exempt_networks": ["127.2.0.0/16"]}, ban_after=2)
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        replies = [await _exchange(port, "127.2.0.9", b"hello\n") for _ in range(6)]
        other = [await _exchange(port, "127.3.0.9", b"hello\n") for _ in range(4)]
        banned = [str(ban.network) for ban in runtime.bans.active()]
        runtime.shutdown()
    assert all(r is not None for r in replies), replies  # never dropped
    assert [r.split()[0] for r in replies if r] == [b"ERROR"] + [b"BUSY"] * 5
    assert other[-1] is None  # the same behaviour outside the exempt network: banned
    assert banned == ["127.3.0.9"]


@pytest.mark.slow
@linux
@pytest.mark.parametrize("ignored_after", [1, 2, 3, 0])
async def test_a_serial_source_ignoring_its_retry_after_is_banned_for_that_wait(
    tmp_path: Path, ignored_after: int
) -> None:
    # One connection at a time, never over ban_after (20). Under pressure (another
    # source's junk used up errors_global), 127.2.0.9's junk is fined: told to wait
    # ~66 s (per_source 10/minute), longer than any hold (50 ms) and than one token
    # (6 s). Its ignored_after-th refusal bans it for min(66 s, ban_duration 1.5 s);
    # with the rule off (ban_after_ignored = 0) it is refused, never banned.
    cfg = config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(tmp_path / "s.db")},
            "ratelimit": {"per_source": "10/minute"},
            "tuning": {
                "errors_global": "1/hour",
                "refusal_delay": "50ms",
                "max_refusal_delay": "50ms",
                "ban_after": 20,
                "ban_after_ignored": ignored_after,
                "ban_duration": "1500ms",
                "ban_spread": 0,
            },
        }
    )
    refusals = ignored_after or 3
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        await _exchange(port, "127.2.0.8", b"hello\n")  # the pressure budget's one error
        replies = [await _exchange(port, "127.2.0.9", b"hello\n") for _ in range(1 + refusals)]
        bans = runtime.bans.active()
        await trio.sleep(0.15)  # the filter task applies the ban on its next turn
        dropped = await _exchange(port, "127.2.0.9", b"hello\n")
        runtime.shutdown()
    assert replies[0] is not None and replies[0].startswith(b"ERROR malformed ")
    told = int(replies[0].split(b"retry_after=")[1].split()[0])  # the fine, told at once
    assert all(r is not None and r.startswith(b"BUSY rate_limited ") for r in replies[1:])
    wait = int(replies[1].split(b"retry_after=")[1].split()[0])  # type: ignore[union-attr]
    assert 60 <= told <= 66 and 60 <= wait <= 66  # what it was told, and ignored
    # only the refusal that bans says so (answered still; the ban is 1.5 s)
    blocked = [b"your address is now blocked for about 2 s" in (r or b"") for r in replies]
    if ignored_after:
        [ban] = bans
        assert (str(ban.network), ban.refusals, ban.until - ban.since) == (
            "127.2.0.9",
            refusals,
            1.5,
        )
        assert dropped is None  # its SYN dropped: the connect timed out
        assert blocked == [False] * refusals + [True]
    else:
        assert bans == [] and dropped is not None and dropped.startswith(b"BUSY rate_limited ")
        assert not any(blocked) and b"blocked" not in dropped


@pytest.mark.slow
@linux
async def test_in_debt_follows_the_configured_longest_hold_and_a_reload(tmp_path: Path) -> None:
    # Under pressure 127.2.0.9's junk is fined 5 tokens of 10/minute from an empty
    # bucket: told ~36 s. With max_refusal_delay 40 s that is no longer than a hold
    # (a held student may come back that late): refused, not banned. Reloaded to 5 s,
    # the same wait is a debt it ignores: its next refusal bans it (ban_after_ignored 1).
    path = tmp_path / "registry.toml"
    text = f"""
[server]
listen = ["127.0.0.1:0"]
admin = "off"
db = "{tmp_path / "debt.db"}"
[ratelimit]
per_source = "10/minute"
[tuning]
errors_global = "1/hour"
error_fine = 5
refusal_delay = "50ms"
max_refusal_delay = "40s"
ban_after = 20
ban_after_ignored = 1
ban_duration = "1500ms"
ban_spread = 0
"""
    path.write_text(text)
    cfg = config_mod.load(str(path))
    async with trio.open_nursery() as nursery:
        runtime: Runtime = await nursery.start(
            Registry(cfg, config_path=str(path), handle_signals=False).run  # type: ignore[arg-type]
        )
        port = runtime.tcp[0].port
        await _exchange(port, "127.2.0.8", b"hello\n")  # the pressure budget's one error
        fined = await _exchange(port, "127.2.0.9", b"hello\n")
        held = await _exchange(port, "127.2.0.9", b"hello\n")
        before = len(runtime.bans)
        path.write_text(text.replace('max_refusal_delay = "40s"', 'max_refusal_delay = "5s"'))
        runtime.reload()
        banning = await _exchange(port, "127.2.0.9", b"hello\n")
        bans = runtime.bans.active()
        runtime.shutdown()
    assert fined is not None and b"retry_after=36 " in fined, fined
    assert held is not None and held.startswith(b"BUSY rate_limited retry_after=36 "), held
    assert before == 0 and b"blocked" not in held
    assert banning is not None and b"your address is now blocked" in banning, banning
    assert [str(ban.network) for ban in bans] == ["127.2.0.9"]


def test_a_wave_of_bans_is_logged_as_ten_lines_and_one_sum(tmp_path: Path) -> None:
    cfg = config_mod.from_dict(
        {"server": {"db": str(tmp_path / "b.db")}, "tuning": {"ban_spread": 0}}
    )
    registry = Registry(cfg, handle_signals=False)
    long_wait = Outcome(code=Code.RATE_LIMITED, retry_after=50, explanation="wait")
    with structlog.testing.capture_logs() as logs:
        for n in range(15):
            key = key_of(f"127.2.0.{n + 1}")
            registry._consider_ban(Refused(RATE_LIMITED, long_wait, key, 50), 3, 0.0)
        registry._log_refusals()
        registry._consider_ban(Refused(RATE_LIMITED, long_wait, key_of("127.2.1.1"), 50), 3, 1.0)
        registry._log_refusals()  # a new interval: its first ban has its own line again
    events = [e["event"] for e in logs]
    assert events == ["source_banned"] * 10 + ["bans_made", "source_banned"], events
    made = logs[10]
    assert (made["unlogged"], made["total"], made["banned"]) == (5, 15, 15)
    assert logs[0]["seconds"] == 50 and len(registry.bans) == 16
    assert logs[0]["source"] == "127.2.0.1"


def test_a_filter_refused_on_one_listener_is_taken_off_the_others() -> None:
    # Attached to the first listener, refused by the second: the first must not keep
    # a program whose bans would never be lifted again.
    bans = BanList(after=1, duration=60.0, max_entries=10)
    bans.consider(key_of("127.2.0.1"), 1, 0.0)
    first = OptionsSock()
    bf = BanFilter([first, RefusingSock()], bans, budget=BPF_MAXINSNS)
    bf.available = True
    with structlog.testing.capture_logs() as logs:
        bf.apply()
    assert [e["event"] for e in logs] == ["ban_filter_failed"]
    assert first.options == [26, 27]  # attached, then detached
    assert not bf.available and bf.filtered == 0


class OptionsSock:
    """Records the socket options set on it."""

    def __init__(self) -> None:
        self.options: list[int] = []

    def setsockopt(self, level: int, optname: int, value: bytes | int, /) -> None:
        self.options.append(optname)
