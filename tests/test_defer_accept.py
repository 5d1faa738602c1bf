"""TCP_DEFER_ACCEPT on the registration listeners (defer_accept), on real sockets.

What the kernel does with the option is the point, so these tests use real
loopback sockets: a connection that sends nothing is not accept()ed until the
kernel's deferral ends, one that sends is accepted at once, and the seconds the
kernel really waits follow its SYN-ACK retransmit schedule.
"""

from __future__ import annotations

import fcntl
import socket
import sqlite3
import struct
import termios
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import structlog
import trio

from registry import config as config_mod
from registry.defense.door import SILENT
from registry.net import listeners as listeners_mod
from registry.net.accept import TCP_DEFER_ACCEPT, defer_accept, held_silent
from registry.server import Registry

pytestmark = pytest.mark.skipif(TCP_DEFER_ACCEPT is None, reason="no TCP_DEFER_ACCEPT here")


@contextmanager
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield sock
    finally:
        sock.close()


def queued_bytes(conn: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(conn, termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.parametrize(
    ("asked", "kernel"),
    [(0, 0), (0.2, 1), (1, 1), (2, 3), (5, 7), (30, 31), (60, 63), (120, 127)],
)
def test_the_kernel_rounds_up_to_its_retransmit_schedule(asked: float, kernel: int) -> None:
    with listener() as sock:
        assert defer_accept(sock, asked) == kernel


@pytest.mark.slow
def test_a_silent_connection_waits_in_the_kernel_and_one_that_sends_does_not() -> None:
    with listener() as sock:
        assert defer_accept(sock, 2) == 3
        sock.setblocking(False)
        port = sock.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port)) as silent,
            socket.create_connection(("127.0.0.1", port)) as talker,
        ):
            started = time.monotonic()
            time.sleep(0.3)
            with pytest.raises(BlockingIOError):
                sock.accept()  # the silent one is connected, but not ours yet
            talker.sendall(b"127.0.0.1:15000\n")
            time.sleep(0.1)
            conn, _ = sock.accept()  # the one that sent: at once, its bytes waiting
            with conn:
                assert conn.getpeername() == talker.getsockname()
                assert queued_bytes(conn) == 16
            with pytest.raises(BlockingIOError):
                sock.accept()
            sock.settimeout(10)
            conn, _ = sock.accept()  # the silent one, when the kernel stops deferring
            took = time.monotonic() - started
            with conn:
                assert conn.getpeername() == silent.getsockname()
                assert queued_bytes(conn) == 0
            # the kernel's 3 s (test_the_kernel_rounds_up_to_its_retransmit_schedule)
            assert took > 2.5, f"the silent connection was accepted after {took:.1f} s"


@pytest.mark.slow
def test_held_silent_tells_a_connection_the_kernel_held_out_from_the_others() -> None:
    # Only a connection that sent nothing through the kernel's whole wait is "held
    # silent": one that sent, one that closed, and one on a listener without the
    # option (as a SYN-cookie connection, never deferred) are not.
    with listener() as deferring, listener() as plain:
        assert defer_accept(deferring, 1) == 1
        deferring.settimeout(10)
        plain.settimeout(10)
        port = deferring.getsockname()[1]
        with (
            socket.create_connection(("127.0.0.1", port)) as silent,
            socket.create_connection(("127.0.0.1", port)) as talker,
            socket.create_connection(("127.0.0.1", port)) as closer,
            socket.create_connection(plain.getsockname()),  # silent, no option
        ):
            talker.sendall(b"127.0.0.1:15000\n")
            closer.shutdown(socket.SHUT_WR)
            seen = {}
            for _ in range(3):  # the two that did something first, the silent one ~1 s later
                conn, addr = deferring.accept()
                seen[addr] = held_silent(conn)
                conn.close()
            assert seen == {
                talker.getsockname(): False,
                closer.getsockname(): False,
                silent.getsockname(): True,
            }
            time.sleep(1.2)  # as long as the deferred wait: still not held by the kernel
            conn, _ = plain.accept()
            with conn:
                assert held_silent(conn) is False


class _Refusing:
    """A socket whose network stack knows the option's number but refuses it."""

    def setsockopt(self, level: int, optname: int, value: int, /) -> None:
        raise OSError(92, "Protocol not available")

    def getsockopt(self, level: int, optname: int, /) -> int:
        raise AssertionError("not reached")


def test_a_stack_that_refuses_the_option_is_served_without_it() -> None:
    assert defer_accept(_Refusing(), 30) is None


def test_off_means_accepted_at_once() -> None:
    with listener() as sock:
        assert defer_accept(sock, 0) == 0
        sock.settimeout(2)
        with socket.create_connection(sock.getsockname()):
            conn, _ = sock.accept()
            conn.close()


@pytest.mark.slow
async def test_without_the_option_the_registry_warns_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stack that refuses TCP_DEFER_ACCEPT: the registry says so once per listener
    # and holds silent connections itself (the read deadline cuts this one).
    monkeypatch.setattr(listeners_mod, "defer_accept", lambda sock, seconds: None)
    cfg = config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(tmp_path / "r.db")},
            "protocol": {"read_deadline": "1s"},
        }
    )
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(Registry(cfg, handle_signals=False).run)
            with trio.fail_after(10):
                stream = await trio.open_tcp_stream("127.0.0.1", runtime.tcp[0].port)
                async with stream:
                    silent = b""  # sends nothing; reads until the registry closes
                    while chunk := await stream.receive_some(4096):
                        silent += chunk
            runtime.shutdown()
    warned = [e for e in logs if e["event"] == "defer_accept_unavailable"]
    assert [(e["address"], e["asked"]) for e in warned] == [("127.0.0.1:0", 30.0)]
    assert [e["defer_accept_s"] for e in logs if e["event"] == "listening"] == [None]
    assert silent.startswith(b"ERROR read_timeout "), silent


async def test_a_reload_cannot_change_the_option_and_says_restart(tmp_path: Path) -> None:
    # TCP_DEFER_ACCEPT is set on the listeners at start: a SIGHUP that changes it
    # is reported (reload_needs_restart), the listener keeps the kernel's old
    # value, and runtime.config goes on showing what is really in force. The
    # rest of the file applies (here, a ban rule and the silent drop).
    path = tmp_path / "registry.toml"
    server = f'listen = ["127.0.0.1:0"]\nadmin = "off"\ndb = "{tmp_path / "r.db"}"'
    text = (
        f'[server]\n{server}\n[tuning]\ndefer_accept = "3s"\nban_after_ignored = 3\n'
        "silent_drop_after = 40\n"
    )
    path.write_text(text)
    cfg = config_mod.load(str(path))
    registry = Registry(cfg, config_path=str(path), handle_signals=False)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(registry.run)
            sock = runtime_listener(registry)
            before = sock.getsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT)
            path.write_text(
                text.replace('"3s"', '"7s"')
                .replace("ban_after_ignored = 3\n", "ban_after_ignored = 5\n")
                .replace("silent_drop_after = 40\n", "silent_drop_after = 0\n")
            )
            runtime.reload()
            after = sock.getsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT)
            in_force = runtime.config.server.defer_accept
            ignored_after = runtime.bans.ignored_after
            silent_after = registry.silent.after
            runtime.shutdown()
    [warning] = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert warning["keys"] == ["server.defer_accept"]
    assert before == after == 3  # the kernel's own figure for "3s", unchanged
    assert in_force == 3.0 and ignored_after == 5
    assert silent_after == 0  # the silent drop, turned off by the reload


def runtime_listener(registry: Registry) -> socket.socket:
    """The registration listener's socket (the ban filter was bound to it)."""
    [sock] = registry.ban_filter.socks
    return sock  # type: ignore[return-value]


async def _silent_client(port: int) -> tuple[bytes, float]:
    """Connect, send nothing, read until the registry closes: (reply, seconds it took)."""
    started = trio.current_time()
    with trio.fail_after(15):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
    return reply, trio.current_time() - started


def deferring_config(db: Path, read_deadline: str) -> config_mod.Config:
    """A registry on loopback whose kernel defers silent connections 1 s."""
    server = {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(db)}
    return config_mod.from_dict(
        {
            "server": server,
            "protocol": {"read_deadline": read_deadline},
            "tuning": {"defer_accept": "1s"},
        }
    )


def _rows(db: Path) -> list[tuple[str, str]]:
    with closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT status, code FROM registrations").fetchall()


@pytest.mark.slow
async def test_silent_through_the_kernels_wait_is_refused_at_the_door_with_no_row(
    tmp_path: Path,
) -> None:
    # defer_accept 1 s, read deadline 1 s: when the kernel hands the connection
    # over, its deadline has passed already. It is answered at once, at the door
    # (no slot, no row, counted as a "silent" refusal in the log and metrics).
    db = tmp_path / "r.db"
    cfg = deferring_config(db, read_deadline="1s")
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(Registry(cfg, handle_signals=False).run)
            reply, took = await _silent_client(runtime.tcp[0].port)
            silent = runtime.tally.totals[SILENT]
            held = runtime.caps.total
            runtime.shutdown()
    assert reply.startswith(b"ERROR read_timeout no request arrived within 1 s of connecting"), (
        reply
    )
    assert b" id=" not in reply  # nothing recorded
    assert took > 0.9, took  # the kernel's wait...
    assert silent == 1 and held == 0  # ...then refused at once, at the door (not read 1 s more)
    assert _rows(db) == []
    [summary] = [e for e in logs if e["event"] == "door_refusals"]
    assert summary["by_reason"] == {SILENT: 1}


@pytest.mark.slow
async def test_a_wait_shorter_than_the_deadline_counts_in_it(tmp_path: Path) -> None:
    # defer_accept 1 s, read deadline 3 s: the connection is admitted when the
    # kernel hands it over, with 2 s left, not 3: the deadline counts from connect.
    db = tmp_path / "r.db"
    cfg = deferring_config(db, read_deadline="3s")
    registry = Registry(cfg, handle_signals=False)
    handed_over: list[float] = []  # the trio time the registry took it at
    arrivals: list[float] = []  # the arrival its deadline counts from
    async with trio.open_nursery() as nursery:
        runtime = await nursery.start(registry.run)
        arrive, room = registry.door.arrive, registry.room
        assert room is not None
        add = room.add
        registry.door.arrive = lambda host, now: (handed_over.append(now), arrive(host, now))[1]  # type: ignore[method-assign]
        room.add = lambda w: (arrivals.append(w.arrived), add(w))[1]  # type: ignore[method-assign]
        reply, took = await _silent_client(runtime.tcp[0].port)
        silent = runtime.tally.totals[SILENT]
        runtime.shutdown()
    assert reply.startswith(b"ERROR read_timeout id="), reply  # recorded, like any read timeout
    assert b" no request arrived within 3 s;" in reply, reply
    # Admitted with its arrival set back by the kernel's 1 s, so the room's deadline
    # (arrival + 3 s; exact in virtual time: tests/test_waiting.py) is 3 s after connect.
    assert len(handed_over) == len(arrivals) == 1
    assert handed_over[0] - arrivals[0] == pytest.approx(1.0)
    assert took > 2.8, took  # and not before it
    assert silent == 0
    assert _rows(db) == [("ERROR", "read_timeout")]


@pytest.mark.slow
async def test_each_listener_keeps_its_own_deferral(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The IPv4 listener defers 1 s, the IPv6 one cannot (its option refused) and
    # is opened last. A silent IPv4 connection the kernel held through its wait
    # is still judged by the IPv4 listener's deferral: refused at the door as
    # silent, with no row (not admitted as if nobody had held it).
    real = listeners_mod.defer_accept

    def v4_only(sock: socket.socket, seconds: float) -> int | None:
        return None if sock.family == socket.AF_INET6 else real(sock, seconds)

    monkeypatch.setattr(listeners_mod, "defer_accept", v4_only)
    db = tmp_path / "r.db"
    server = {
        "listen": ["127.0.0.1:0", "[::1]:0"],
        "admin": "off",
        "db": str(db),
    }
    cfg = config_mod.from_dict(
        {"server": server, "protocol": {"read_deadline": "1s"}, "tuning": {"defer_accept": "1s"}}
    )
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(Registry(cfg, handle_signals=False).run)
            [v4] = [e for e in runtime.tcp if e.host.version == 4]
            reply, _ = await _silent_client(v4.port)
            silent = runtime.tally.totals[SILENT]
            runtime.shutdown()
    assert reply.startswith(b"ERROR read_timeout no request arrived within 1 s"), reply
    assert silent == 1
    assert _rows(db) == []
    [listening] = [e for e in logs if e["event"] == "listening"]
    assert listening["defer_accept_s"] == {
        str(v4): 1,
        str(runtime.tcp[1 - runtime.tcp.index(v4)]): None,
    }
