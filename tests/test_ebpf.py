"""The eBPF ban filter (registry/net/kernel/ebpf.py) and BanFilter's eBPF way.

The program is checked two ways, like the classic one in test_bans.py: by a
small interpreter of the instructions it uses, over the same hand-built IPv4
and IPv6 headers and the same bans (a longest-prefix-match lookup in Python
standing in for the kernel's map), and by the kernel itself on loopback:
a banned source's SYN is dropped, another one connects, a /64 ban covers ::1,
and 5,000 bans (more than the classic filter holds) all drop. The kernel
tests need the right to load BPF (root, or CAP_BPF): CI runs as root; without
it they are skipped, and the registry falls back to the classic filter
(tested here too). Only 127.0.0.0/8 and ::1 are used.
"""

from __future__ import annotations

import errno
import ipaddress
import struct
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import structlog.testing
import trio

from registry.defense.bans import BanList
from registry.net.kernel import ebpf
from registry.net.kernel.banfilter import STEP, BanFilter
from registry.net.kernel.bpf import ACCEPT, BPF_MAXINSNS, DROP, SKF_NET_OFF, SO_DETACH_FILTER
from registry.net.kernel.ebpf import EbpfFilter, lpm_key, program
from tests.test_bans import (
    BANNED,
    PACKETS,
    OptionsSock,
    ipv4_header,
    ipv6_listener,
    key_of,
    listener,
    reaches,
    v4,
    v6,
)

MAP_FD = 7  # any number: the interpreter's map


def run_ebpf(
    insns: list[ebpf.Insn], net_header: bytes, banned: list[Any], transport: bytes = b""
) -> int:
    """Execute ``insns`` on a packet whose network header is ``net_header``, followed
    by ``transport`` (the TCP header and payload: ``skb->data`` and ``skb->len``)."""
    table = [struct.unpack("=I16s", lpm_key(key)) for key in banned]
    reg: list[Any] = [None] * 11
    reg[1], reg[10] = "ctx", 512
    stack = bytearray(512)
    pc = 0
    for _ in range(len(insns) + 1):  # only forward jumps: each insn at most once
        code, dst, src, off, imm = insns[pc]
        pc += 1
        if code == 0xBF:  # mov64 dst, src
            reg[dst] = reg[src]
        elif code == 0xB4:  # mov32 dst, imm
            reg[dst] = imm & 0xFFFFFFFF
        elif code in (0x30, 0x20):  # r0 = packet[imm], host order; uses r6 as ctx
            assert reg[6] == "ctx", "packet loads need the context in r6"
            size = 1 if code == 0x30 else 4
            if imm >= 0:  # from the start of the data: the TCP header
                data, offset = transport, imm
            else:
                data, offset = net_header, imm - SKF_NET_OFF
                assert 0 <= offset < 0x100000, "unexpected load offset"
            if offset + size > len(data):
                return 0  # the kernel ends the program with 0 (drop)
            reg[0] = int.from_bytes(data[offset : offset + size], "big")
            reg[1:6] = [None] * 5  # clobbered, r6 kept
            reg[6] = "ctx"
        elif code == 0x61:  # dst = *(u32 *)(src + off): the context's first word, skb->len
            assert reg[src] == "ctx" and off == 0
            reg[dst] = len(transport)
        elif code == 0x74:  # 32-bit ALU: dst >>= imm, <<=, &= (the upper half zeroed)
            reg[dst] = (reg[dst] & 0xFFFFFFFF) >> imm
        elif code == 0x64:
            reg[dst] = (reg[dst] << imm) & 0xFFFFFFFF
        elif code == 0x54:
            reg[dst] &= imm & 0xFFFFFFFF
        elif code == 0x55:  # if dst != imm goto +off
            if reg[dst] != imm:
                pc += off
        elif code == 0x5D:  # if dst != src goto +off
            if reg[dst] != reg[src]:
                pc += off
        elif code == 0x07:
            reg[dst] += imm
        elif code == 0xDC:  # to big endian: the bytes in memory come out in network order
            assert imm == 32
            reg[dst] = int.from_bytes((reg[dst] & 0xFFFFFFFF).to_bytes(4, "big"), sys.byteorder)
        elif code == 0x62:  # *(u32 *)(dst + off) = imm
            at = reg[dst] + off
            stack[at : at + 4] = (imm & 0xFFFFFFFF).to_bytes(4, sys.byteorder)
        elif code == 0x63:  # *(u32 *)(dst + off) = src
            at = reg[dst] + off
            stack[at : at + 4] = (reg[src] & 0xFFFFFFFF).to_bytes(4, sys.byteorder)
        elif code == 0x18:  # the map's address (a pseudo map fd), two instructions
            assert src == 1 and insns[pc] == (0, 0, 0, 0, 0)
            reg[dst] = ("map", imm)
            pc += 1
        elif code == 0x85:  # bpf_map_lookup_elem(r1 map, r2 key)
            assert imm == 1 and reg[1] == ("map", MAP_FD)
            plen, data = struct.unpack("=I16s", bytes(stack[reg[2] : reg[2] + 20]))
            assert plen == 128
            bits = int.from_bytes(data, "big")
            hit = any(
                (bits >> (128 - p)) == (int.from_bytes(d, "big") >> (128 - p)) if p else True
                for p, d in table
            )
            reg[0] = 1 if hit else 0
            reg[1:6] = [None] * 5
        elif code == 0x15:  # if dst == imm goto +off
            if reg[dst] == imm:
                pc += off
        elif code == 0x05:
            pc += off
        elif code == 0x95:
            return int(reg[0]) & 0xFFFFFFFF
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("ran off the program")


@pytest.mark.parametrize(("name", "header", "want"), PACKETS, ids=[p[0] for p in PACKETS])
def test_program_drops_exactly_the_banned(name: str, header: bytes, want: int) -> None:
    assert run_ebpf(program(MAP_FD), header, BANNED) == want


def test_program_with_an_empty_map_keeps_everything() -> None:
    for src in ("127.2.0.1", "10.1.2.3"):
        assert run_ebpf(program(MAP_FD), ipv4_header(src), []) == ACCEPT
        assert run_ebpf(program(MAP_FD), ipv4_header(src), [v4(src)]) == DROP  # the contrast


def test_keys_are_v4_mapped_or_the_v6_network() -> None:
    assert (
        lpm_key(v4("127.2.0.1")) == struct.pack("=I", 128) + bytes(10) + b"\xff\xff\x7f\x02\x00\x01"
    )
    assert (
        lpm_key(v6("2001:db8::/64"))
        == struct.pack("=I", 64) + ipaddress.IPv6Address("2001:db8::").packed
    )


def test_program_is_small_and_packs_to_bpf_insn() -> None:
    insns = program(MAP_FD)
    assert len(insns) == 36  # constant, whatever the number of bans (docs say so)
    packed = ebpf.pack(insns)
    assert len(packed) == 8 * len(insns)
    code, regs, off, imm = struct.unpack_from("=BBhi", packed, 0)
    assert (code, regs, off, imm) == (0xBF, 6 | (1 << 4), 0, 0)  # mov64 r6, r1


# --- the kernel, on loopback -----------------------------------------------------------


@pytest.fixture
def kernel_bans() -> Iterator[EbpfFilter]:
    try:
        bans = EbpfFilter.create()
    except OSError as e:
        pytest.skip(f"the kernel will not load BPF here: {e}")
    yield bans
    bans.close()


def test_kernel_drops_a_banned_source_and_lets_it_back(kernel_bans: EbpfFilter) -> None:
    with listener() as lst:
        kernel_bans.attach(lst)
        assert reaches(lst, "127.2.0.1")  # attached, nothing banned
        kernel_bans.add(v4("127.2.0.1"))
        assert not reaches(lst, "127.2.0.1")
        assert reaches(lst, "127.2.0.2")
        kernel_bans.remove(v4("127.2.0.1"))
        kernel_bans.remove(v4("127.2.0.1"))  # lifting twice is fine
        assert reaches(lst, "127.2.0.1")


def test_kernel_ipv6_prefix_ban(kernel_bans: EbpfFilter) -> None:
    with ipv6_listener() as lst:
        kernel_bans.attach(lst)
        kernel_bans.add(v6("2001:db8::/64"))
        assert reaches(lst, "::1")  # another /64
        kernel_bans.add(v6("::/64"))  # ::1's own /64
        assert not reaches(lst, "::1")


@pytest.mark.slow
def test_kernel_holds_more_bans_than_the_classic_filter(kernel_bans: EbpfFilter) -> None:
    keys = [v4(f"127.3.{n // 250}.{n % 250 + 1}") for n in range(5000)]
    with listener() as lst:
        kernel_bans.attach(lst)
        for key in keys:
            kernel_bans.add(key)
        assert not reaches(lst, str(keys[0]))
        assert not reaches(lst, str(keys[-1]))
        for _ in range(3):  # accepted sockets inherit the program: still created
            assert reaches(lst, "127.2.0.2")


# --- BanFilter's eBPF way ---------------------------------------------------------------


async def test_ban_filter_binds_ebpf_applies_bans_and_lifts_them(kernel_bans: EbpfFilter) -> None:
    kernel_bans.close()  # only the right to load was checked: BanFilter makes its own
    bans = BanList(after=1, duration=60.0, max_entries=10_000)
    with listener() as lst:
        bf = BanFilter([], bans)
        assert bf.bind([lst]) == "ebpf"
        assert await trio.to_thread.run_sync(reaches, lst, "127.2.0.1")
        bans.consider(key_of("127.2.0.1"), 1, trio.current_time())
        bf.apply()
        assert bf.filtered == 1
        assert not await trio.to_thread.run_sync(reaches, lst, "127.2.0.1")
        assert await trio.to_thread.run_sync(reaches, lst, "127.2.0.2")
        bans.expire(trio.current_time() + 61)
        bf.apply()
        assert bf.filtered == 0
        assert await trio.to_thread.run_sync(reaches, lst, "127.2.0.1")


async def test_a_wave_of_bans_is_applied_in_short_steps(kernel_bans: EbpfFilter) -> None:
    kernel_bans.close()
    bans = BanList(after=1, duration=60.0, max_entries=10_000)
    for n in range(10 * STEP):
        bans.consider(key_of(f"127.3.{n // 250}.{n % 250 + 1}"), 1, 0.0)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with listener() as lst:
        bf = BanFilter([], bans)
        assert bf.bind([lst]) == "ebpf"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            before = ticks
            await bf._apply_in_steps()
            during = ticks - before
            nursery.cancel_scope.cancel()
        assert bf.filtered == 10 * STEP
        assert during >= 9  # the other task ran between the steps, not only after
        assert not await trio.to_thread.run_sync(reaches, lst, "127.3.0.1")


def test_without_the_right_to_load_bpf_the_classic_filter_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(cls: type, max_entries: int = 0) -> EbpfFilter:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(EbpfFilter, "create", classmethod(refuse))
    bans = BanList(after=1, duration=60.0, max_entries=10)
    with listener() as lst, structlog.testing.capture_logs() as logs:
        bf = BanFilter([], bans)
        assert bf.bind([lst]) == "classic"
        bans.consider(key_of("127.2.0.1"), 1, 0.0)
        bf.apply()
        assert bf.filtered == 1 and not reaches(lst, "127.2.0.1")
    assert [(e["event"], e["kind"], e["ebpf_refused"]) for e in logs] == [
        ("ban_filter", "classic", "Operation not permitted")
    ]


class FailingMap(EbpfFilter):
    """An eBPF filter whose map stops taking changes (the kernel says EPERM)."""

    def __init__(self) -> None:
        super().__init__(-1, -1, -1)  # no descriptors: closing them is a no-op

    def add(self, key: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    def remove(self, key: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")


def test_a_map_that_fails_is_detached_so_it_can_drop_nobody() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    sock = OptionsSock()
    bf = BanFilter([sock], bans)
    bf.kernel = FailingMap()
    bans.consider(key_of("127.2.0.1"), 1, 0.0)
    with structlog.testing.capture_logs() as logs:
        bf.apply()
        bans.consider(key_of("127.2.0.2"), 1, 0.0)
        bf.apply()  # not tried again
    assert [e["event"] for e in logs] == ["ban_filter_failed"]
    assert sock.options == [SO_DETACH_FILTER]
    assert not bf.available and bf.filtered == 0 and len(bans) == 2


def test_a_full_map_keeps_the_oldest_bans_and_reports_once() -> None:
    class SmallMap(FailingMap):
        def __init__(self) -> None:
            super().__init__()
            self.keys: set[Any] = set()

        def add(self, key: Any) -> None:
            if len(self.keys) >= 2:
                raise OSError(errno.E2BIG, "Argument list too long")
            self.keys.add(key)

        def remove(self, key: Any) -> None:
            self.keys.discard(key)

    bans = BanList(after=1, duration=60.0, max_entries=10)
    bf = BanFilter([OptionsSock()], bans)
    small = SmallMap()
    bf.kernel = small
    assert bf.kind == "ebpf"
    with structlog.testing.capture_logs() as logs:
        for n in range(4):
            bans.consider(key_of(f"127.2.0.{n + 1}"), 1, float(n))
            bf.apply()
    assert {str(k) for k in small.keys} == {"127.2.0.1", "127.2.0.2"} and bf.filtered == 2
    assert [(e["event"], e["bans"], e["filtered"]) for e in logs] == [("bans_not_filtered", 3, 2)]
    assert bf.available  # a full map is not a failure
    assert not bf.drops_new_bans  # but the next ban is the door's, not the kernel's


class CountingMap(FailingMap):
    """A map that takes ``room`` keys and counts the calls made on it."""

    def __init__(self, room: int = 1 << 20) -> None:
        super().__init__()
        self.room = room
        self.keys: set[Any] = set()
        self.calls = 0

    def add(self, key: Any) -> None:
        self.calls += 1
        if len(self.keys) >= self.room:
            raise OSError(errno.E2BIG, "Argument list too long")
        self.keys.add(key)

    def remove(self, key: Any) -> None:
        self.calls += 1
        self.keys.remove(key)


class CountedKey(int):
    """A source (``source_of``) that counts how often it is hashed: every dict or set
    lookup of a key does, so the count is the work done over the bans."""

    hashed = 0

    def __hash__(self) -> int:
        CountedKey.hashed += 1
        return super().__hash__()


def test_a_pass_touches_only_the_bans_that_changed() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10_000)
    bf = BanFilter([OptionsSock()], bans)
    bf.kernel = kernel_map = CountingMap()
    for n in range(2000):
        bans.consider(CountedKey(key_of(f"127.3.{n // 250}.{n % 250 + 1}")), 1, float(n) / 100)
    bf.apply()
    assert kernel_map.calls == 2000 and bf.filtered == 2000
    kernel_map.calls, CountedKey.hashed = 0, 0
    bans.consider(CountedKey(key_of("127.4.0.1")), 1, 20.0)
    bf.lift(60.0)  # the first one's time is up
    assert bans.next_expiry() == 60.01
    bf.apply()
    assert kernel_map.calls == 2  # one add, one remove
    assert CountedKey.hashed < 50  # not a pass over 2,000 bans (that is >= 2,000)
    assert v4("127.4.0.1") in kernel_map.keys and v4("127.3.0.1") not in kernel_map.keys
    assert bf.filtered == 2000 == len(kernel_map.keys)
    kernel_map.calls = 0
    bf.apply()  # nothing changed: nothing to do
    assert kernel_map.calls == 0


def test_bans_that_did_not_fit_go_in_when_a_lift_makes_room() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    bf = BanFilter([OptionsSock()], bans)
    bf.kernel = kernel_map = CountingMap(room=2)
    with structlog.testing.capture_logs():
        for n in range(4):  # .1 and .2 fit; .3 and .4 are listed only
            bans.consider(key_of(f"127.2.0.{n + 1}"), 1, float(n))
        bf.apply()
        assert {str(k) for k in kernel_map.keys} == {"127.2.0.1", "127.2.0.2"}
        bans.expire(60.0)  # .1 lifted: room for one, the oldest waiting (.3)
        bf.apply()
    assert {str(k) for k in kernel_map.keys} == {"127.2.0.2", "127.2.0.3"}
    assert bf.filtered == 2 and len(bans) == 3


def test_the_classic_filter_takes_the_changes_it_does_not_need() -> None:
    bans = BanList(after=1, duration=60.0, max_entries=10)
    bf = BanFilter([OptionsSock()], bans, budget=BPF_MAXINSNS)
    bf.available = True
    bans.consider(key_of("127.2.0.1"), 1, 0.0)
    bf.apply()
    assert bans.take_changes() == []  # else a classic registry's list would grow forever
