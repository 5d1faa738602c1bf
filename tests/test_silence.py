"""Silent connections under attack (registry/defense/window.py and the filters' silent drop).

Three layers, as for bans: ``SilentGuard`` table-driven with exact times; the
``SILENT_DROP`` block of both filter programs run by the interpreters of
test_bans.py and test_ebpf.py over hand-built TCP segments; and the kernel on
loopback: with the block on a listener a client that sends nothing is never
made a connection, one that sends (or closes) is, and an accepted socket
must shed the inherited filter or its client's ACKs are dropped. Last, the
real registry switching it on after a crowd of silent connections and off
again. Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import math
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing

from registry import config as config_mod
from registry.defense.bans import BanList
from registry.defense.door import SILENT
from registry.defense.window import SilentGuard, Window
from registry.net.kernel import bpf
from registry.net.kernel.banfilter import BanFilter, detach_inherited
from registry.net.kernel.bpf import ACCEPT, BPF_MAXINSNS, DROP, attach
from registry.net.kernel.classic import drop_program
from registry.net.kernel.ebpf import EbpfFilter, from_classic, program
from registry.server import Registry
from tests.test_bans import RecordingSock, ipv4_header, key_of, listener, run_bpf, v4
from tests.test_ebpf import MAP_FD, run_ebpf

linux = pytest.mark.skipif(sys.platform != "linux", reason="Linux socket filters")

# --- SilentGuard: (step, now, n) -> switched on?, active after? ---------------------------

# Each script: after, duration, then steps ("note", now, n, switched_on), ("active", now,
# bool) or ("roll",): the attack window's timer (every 10 s in the registry).
SCRIPTS: dict[str, tuple[int, float, list[tuple[Any, ...]]]] = {
    "on at the after-th within a window, for the duration": (
        3, 60.0,
        [("note", 0.0, 1, False), ("note", 4.0, 1, False), ("active", 4.0, False),
         ("note", 9.9, 1, True), ("active", 9.9, True), ("active", 69.8, True),
         ("active", 69.9, False)],
    ),
    "this window and the one before count; older ones do not": (
        3, 60.0,
        [("note", 0.0, 2, False), ("roll",), ("roll",), ("note", 20.0, 1, False),
         ("note", 25.0, 1, False), ("roll",), ("note", 30.0, 1, True)],
    ),
    "a batch counts as many": (
        50, 30.0, [("note", 1.0, 16, False), ("note", 1.5, 34, True), ("active", 31.4, True),
                   ("active", 31.5, False)],
    ),
    "more while on extend it, and do not switch it on again": (
        2, 30.0,
        [("note", 0.0, 2, True), ("note", 5.0, 1, False), ("active", 29.9, True),
         ("roll",), ("note", 12.0, 1, False), ("active", 41.9, True), ("active", 42.0, False),
         ("roll",), ("roll",), ("note", 50.0, 2, True)],
    ),
    "after 0: never": (0, 60.0, [("note", 0.0, 1000, False), ("active", 0.0, False)]),
}  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_guard_scripts(name: str) -> None:
    after, duration, steps = SCRIPTS[name]
    guard = SilentGuard(after, duration, Window())
    for step in steps:
        if step[0] == "roll":
            guard.window.flush()
        elif step[0] == "note":
            _, now, n, switched = step
            assert guard.note(now, n) is switched, step
        else:
            _, now, active = step
            assert guard.active(now) is active, step
    assert guard.switched_on == sum(1 for s in steps if s[0] == "note" and s[3])


def test_guard_counts_in_the_shared_attack_window() -> None:
    # The door's window: a spray of refused sources past its cap does not crowd out
    # the silent count, and its roll is the guard's.
    window = Window(max_sources=2)
    guard = SilentGuard(3, 60.0, window)
    for n in range(10):
        window.add(n, SILENT)
    assert not guard.note(0.0, 2)
    assert window.flush() is not None
    assert guard.note(1.0)  # 2 before the roll and 1 after


def test_guard_reconfigure() -> None:
    guard = SilentGuard(1, 60.0)
    assert guard.note(0.0)
    guard.reconfigure(1, 5.0, now=1.0)  # shorter: ends 5 s from the reload
    assert guard.active(5.9) and not guard.active(6.0)
    guard.reconfigure(1, 600.0, now=2.0)  # longer: not extended by a reload
    assert not guard.active(6.0)
    assert guard.note(7.0)
    guard.reconfigure(0, 60.0, now=8.0)  # off: ends at once and stays off
    assert not guard.active(8.0) and guard.until == -math.inf
    assert not guard.note(9.0, 100)


# --- the programs, interpreted -------------------------------------------------------------

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


def tcp(flags: int, payload: bytes = b"", options: int = 0) -> bytes:
    """A TCP segment from port 40000 to 9000: header (with ``options`` bytes) and payload."""
    doff = 5 + options // 4
    header = struct.pack("!HHIIBBHHH", 40000, 9000, 7, 8, doff << 4, flags, 65535, 0, 0)
    return header + bytes(options) + payload


SEGMENTS = [
    ("bare ACK: the last step of a handshake", tcp(ACK), DROP),
    ("bare ACK with timestamps", tcp(ACK, options=12), DROP),
    ("ACK and PSH without a byte", tcp(ACK | PSH), DROP),
    ("the request itself", tcp(ACK | PSH, b"127.0.0.1:15000\n"), ACCEPT),
    ("one byte", tcp(ACK, b"1"), ACCEPT),
    ("one byte after timestamps", tcp(ACK, b"1", options=12), ACCEPT),
    ("SYN", tcp(SYN), ACCEPT),
    ("FIN: a client that closes", tcp(FIN | ACK), ACCEPT),
    ("RST", tcp(RST | ACK), ACCEPT),
    ("a TCP header cut short", tcp(ACK)[:10], DROP),
]

# Both filters, as (program with the block, program without it, the banned source's
# program): each run over an IPv4 packet from ``source``.
Runner = Callable[[bool, list[Any], str, bytes], int]


def classic(drop_silent: bool, banned: list[Any], source: str, segment: bytes) -> int:
    insns, _ = drop_program(banned, drop_silent=drop_silent)
    return run_bpf(insns, ipv4_header(source), segment)


def extended(drop_silent: bool, banned: list[Any], source: str, segment: bytes) -> int:
    return run_ebpf(program(MAP_FD, drop_silent=drop_silent), ipv4_header(source), banned, segment)


RUNNERS = {"classic": classic, "ebpf": extended}


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize(("name", "segment", "want"), SEGMENTS, ids=[s[0] for s in SEGMENTS])
def test_the_block_drops_bare_acks_only(runner: str, name: str, segment: bytes, want: int) -> None:
    run = RUNNERS[runner]
    assert run(True, [], "127.2.0.1", segment) == want
    if len(segment) >= 20:  # a whole header: without the block, every segment is kept
        assert run(False, [], "127.2.0.1", segment) == ACCEPT


# A classic block converted: each jump lands on the instruction it landed on (a
# ``ret`` is two eBPF instructions), one past the end on what follows the block.
CONVERTED = [
    ((bpf.LD_B_ABS, 0, 0, 13), (0x30, 0, 0, 0, 13)),
    ((bpf.JEQ_K, 0, 2, 0x10), (0x55, 0, 0, 3, 0x10)),  # false: over the ret (2) and the ja
    ((bpf.RET_K, 0, 0, DROP), (0xB4, 0, 0, 0, 0)),
    (None, (0x95, 0, 0, 0, 0)),
    ((bpf.JA, 0, 0, 2), (0x05, 0, 0, 2, 0)),  # over the mov and the jne, to the ret
    ((bpf.TAX, 0, 0, 0), (0xBF, 7, 0, 0, 0)),
    ((bpf.JEQ_X, 0, 1, 0), (0x5D, 0, 7, 2, 0)),  # A != X: past the end
    ((bpf.RET_K, 0, 0, ACCEPT), (0xB4, 0, 0, 0, -1)),
    (None, (0x95, 0, 0, 0, 0)),
]


def test_a_classic_block_converts_to_ebpf_with_its_jumps_on_target() -> None:
    block = [classic for classic, _ in CONVERTED if classic is not None]
    assert from_classic(block) == [insn for _, insn in CONVERTED]
    with pytest.raises(ValueError, match="no eBPF"):
        from_classic([(bpf.JEQ_K, 1, 0, 0x10)])  # true must fall through


@pytest.mark.parametrize("runner", RUNNERS)
def test_bans_still_apply_behind_the_block(runner: str) -> None:
    run = RUNNERS[runner]
    request = tcp(ACK | PSH, b"127.2.0.1:15000\n")
    assert run(True, [v4("127.2.0.1")], "127.2.0.1", request) == DROP
    assert run(True, [v4("127.2.0.1")], "127.2.0.2", request) == ACCEPT
    assert run(True, [v4("127.2.0.1")], "127.2.0.2", tcp(ACK)) == DROP


def test_the_block_costs_its_length_in_the_classic_budget() -> None:
    keys = [v4(f"127.3.0.{n}") for n in range(1, 201)]
    plain, held_plain = drop_program(keys, 300)
    dropping, held_dropping = drop_program(keys, 300, drop_silent=True)
    assert len(plain) <= 300 and len(dropping) <= 300
    assert held_dropping == held_plain - 5  # 10 instructions: five IPv4 bans of 2


# --- the kernel, on loopback ---------------------------------------------------------------


@contextmanager
def dropping_listener(kind: str) -> Iterator[socket.socket]:
    """A listener whose filter drops bare ACKs (``kind``: classic or ebpf)."""
    with listener() as lst:
        if kind == "classic":
            insns, _ = drop_program([], drop_silent=True)
            attach(lst, insns)
            yield lst
            return
        try:
            bpf = EbpfFilter.create()
        except OSError as e:
            pytest.skip(f"the kernel will not load BPF here: {e}")
        try:
            bpf.attach(lst, drop_silent=True)
            yield lst
        finally:
            bpf.close()


@pytest.mark.slow
@linux
@pytest.mark.parametrize("kind", ["classic", "ebpf"])
def test_kernel_makes_a_connection_only_from_a_clients_bytes(kind: str) -> None:
    with dropping_listener(kind) as lst:
        lst.settimeout(2)
        address = lst.getsockname()
        with (
            socket.create_connection(address, timeout=2) as silent,  # connected, it thinks
            socket.create_connection(address, timeout=2) as talker,
            socket.create_connection(address, timeout=2) as closer,
        ):
            talker.sendall(b"127.0.0.1:15000\n")
            closer.shutdown(socket.SHUT_WR)
            got = {}
            for _ in range(2):
                conn, addr = lst.accept()
                with conn:
                    conn.settimeout(2)
                    got[addr] = conn.recv(64)
            assert got == {talker.getsockname(): b"127.0.0.1:15000\n", closer.getsockname(): b""}
            lst.settimeout(1.5)
            with pytest.raises(TimeoutError):
                lst.accept()  # the silent one: not a connection, however long it waits
            silent.sendall(b"late\n")  # its first bytes make it one, at once
            lst.settimeout(2)
            conn, addr = lst.accept()
            with conn:
                conn.settimeout(2)
                assert addr == silent.getsockname() and conn.recv(64) == b"late\n"


def unacked(conn: socket.socket) -> int:
    """tcpi_unacked: segments we sent that the peer has not acknowledged (yet)."""
    info = conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 28)
    return int(struct.unpack_from("=I", info, 24)[0])


@pytest.mark.slow
@linux
@pytest.mark.parametrize("kind", ["classic", "ebpf"])
@pytest.mark.parametrize("shed", [True, False])
def test_an_accepted_socket_must_shed_the_inherited_filter(kind: str, shed: bool) -> None:
    # The accepted socket inherits the listener's filter. Kept, it drops the client's
    # ACKs of our reply (bare ACKs too), and the reply stays unacknowledged.
    with dropping_listener(kind) as lst:
        lst.settimeout(2)
        with socket.create_connection(lst.getsockname(), timeout=2) as client:
            client.sendall(b"127.0.0.1:15000\n")
            conn, _ = lst.accept()
            with conn:
                if shed:
                    detach_inherited(conn)
                conn.sendall(b"OK connected\n")
                assert client.recv(64) == b"OK connected\n"
                deadline = time.monotonic() + 1.0  # the client's delayed ACK: <= 200 ms
                while unacked(conn) and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert unacked(conn) == (0 if shed else 1)


# --- the whole registry --------------------------------------------------------------------


async def _read_all(stream: trio.SocketStream, seconds: float) -> bytes | None:
    """What the registry sends until it closes; None if it says nothing for ``seconds``."""
    reply = b""
    with trio.move_on_after(seconds):
        while chunk := await stream.receive_some(4096):
            reply += chunk
        return reply
    return None


@pytest.mark.slow
@linux
async def test_a_crowd_of_silent_connections_turns_the_drop_on_and_it_ends(
    tmp_path: Path,
) -> None:
    # Three connections that send nothing within the 1 s read deadline switch the drop
    # on for 3 s: a fourth silent client is then not answered at all (it would have
    # been told read_timeout after 1 s), while a client that sends is served as ever;
    # then the drop ends by itself and says so.
    cfg = config_mod.from_dict(
        {
            "server": {
                "listen": ["127.0.0.1:0"],
                "admin": "off",
                "db": str(tmp_path / "r.db"),
            },
            "protocol": {"read_deadline": "1s"},
            "tuning": {
                "defer_accept": "0s",  # silent connections reach the registry at once
                "silent_drop_after": 3,
                "silent_drop_duration": "3s",
            },
        }
    )
    registry = Registry(cfg, handle_signals=False)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(registry.run)
            port = runtime.tcp[0].port
            silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(3)]
            replies = [await _read_all(s, 5) for s in silent]
            with trio.fail_after(2):
                while not registry.ban_filter.dropping_now:  # noqa: ASYNC110 (polled state)
                    await trio.sleep(0.05)
            fourth = await trio.open_tcp_stream("127.0.0.1", port)  # connected, it thinks
            talker = await trio.open_tcp_stream("127.0.0.1", port)
            await talker.send_all(b"hello\n")
            talked = await _read_all(talker, 5)
            unanswered = await _read_all(fourth, 1.5)
            with trio.fail_after(5):
                while registry.ban_filter.dropping_now:  # noqa: ASYNC110 (polled state)
                    await trio.sleep(0.05)
            for stream in [*silent, fourth, talker]:
                await stream.aclose()
            runtime.shutdown()
    assert all(r is not None and r.startswith(b"ERROR read_timeout ") for r in replies), replies
    assert talked is not None and talked.startswith(b"ERROR malformed "), talked
    assert unanswered is None
    started = [e for e in logs if e["event"] == "silent_drop_started"]
    assert [(e["after"], e["seconds"]) for e in started] == [(3, 3.0)]
    assert [e["event"] for e in logs if e["event"] == "silent_drop_ended"] == ["silent_drop_ended"]


# --- BanFilter switching it, under the mock clock ------------------------------------------


async def test_the_classic_filter_switches_the_block_on_and_off_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No bans: the classic filter is attached only for the silent drop, with the
    # block in front, at the moment the guard switches on (t=2), and detached
    # when it ends (t=2 + 30); both logged once.
    bans = BanList(after=1, duration=60.0, max_entries=10)
    guard = SilentGuard(2, 30.0)
    sock = RecordingSock()
    bf = BanFilter([sock], bans, budget=BPF_MAXINSNS, silent=guard)
    bf.available = True
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bf.run)
            await trio.sleep(1)
            assert not guard.note(trio.current_time())
            await trio.sleep(1)
            assert guard.note(trio.current_time())
            bf.poke()
            await trio.sleep(1)
            on = bf.dropping_now
            await trio.sleep(40)
            nursery.cancel_scope.cancel()
    attach_opt, detach_opt = 26, 27
    assert [(round(t, 3), opt) for t, opt, _ in sock.calls] == [
        (2.0, attach_opt),
        (32.0, detach_opt),
    ]
    fprog = sock.calls[0][2]
    assert isinstance(fprog, bytes)  # struct sock_fprog: the program's length, then a pointer
    assert struct.unpack_from("@H", fprog)[0] == len(drop_program([], drop_silent=True)[0])
    assert on and not bf.dropping_now
    events = [e["event"] for e in logs if e["event"].startswith("silent_drop")]
    assert events == ["silent_drop_started", "silent_drop_ended"]


async def test_the_ebpf_filter_swaps_programs_and_keeps_its_bans(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # eBPF: the block is a second program; switching attaches it, then the plain
    # one again, on every listener; the map of bans is not touched by it.
    try:
        bpf = EbpfFilter.create()
    except OSError as e:
        pytest.skip(f"the kernel will not load BPF here: {e}")
    bans = BanList(after=1, duration=600.0, max_entries=10)
    guard = SilentGuard(1, 10.0)
    socks = [RecordingSock(), RecordingSock()]
    bf = BanFilter(socks, bans, silent=guard)
    bf.kernel, bf.available = bpf, True  # as bind() leaves it, without real listeners
    plain, silent = bpf.prog_fd, bpf.silent_fd  # run() closes them when it ends
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bf.run)
        bans.consider(key_of("127.2.0.1"), 1, trio.current_time())
        guard.note(trio.current_time())
        bf.poke()
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    for sock in socks:
        assert [(round(t, 1), value) for t, _, value in sock.calls] == [
            (0.0, silent),
            (10.0, plain),
        ]
    assert bf.filtered == 1  # the ban stayed in the map throughout
