"""TCP_DEFER_ACCEPT on the registration listeners (server.defer_accept), on real sockets.

What the kernel does with the option is the point, so these tests use real
loopback sockets: a connection that sends nothing is not accept()ed until the
kernel's deferral ends, one that sends is accepted at once, and the seconds the
kernel really waits follow its SYN-ACK retransmit schedule.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import structlog
import trio

from registry import config as config_mod
from registry import server as server_mod
from registry.net.accept import TCP_DEFER_ACCEPT, defer_accept
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
            assert 2.5 < took < 6, f"the silent connection was accepted after {took:.1f} s"


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


async def test_without_the_option_the_registry_warns_and_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stack that refuses TCP_DEFER_ACCEPT: the registry says so once per listener
    # and holds silent connections itself (the read deadline cuts this one).
    monkeypatch.setattr(server_mod, "defer_accept", lambda sock, seconds: None)
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
    # rest of the file applies (here, a ban rule).
    path = tmp_path / "registry.toml"
    server = f'listen = ["127.0.0.1:0"]\nadmin = "off"\ndb = "{tmp_path / "r.db"}"'
    text = f'[server]\n{server}\ndefer_accept = "3s"\n[limits]\nban_after_ignored = 3\n'
    path.write_text(text)
    cfg = config_mod.load(str(path))
    registry = Registry(cfg, config_path=str(path), handle_signals=False)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            runtime = await nursery.start(registry.run)
            sock = runtime_listener(registry)
            before = sock.getsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT)
            path.write_text(text.replace('"3s"', '"7s"').replace("= 3\n", "= 5\n"))
            runtime.reload()
            after = sock.getsockopt(socket.IPPROTO_TCP, TCP_DEFER_ACCEPT)
            in_force = runtime.config.server.defer_accept
            ignored_after = runtime.bans.ignored_after
            runtime.shutdown()
    [warning] = [e for e in logs if e["event"] == "reload_needs_restart"]
    assert warning["keys"] == ["server.defer_accept"]
    assert before == after == 3  # the kernel's own figure for "3s", unchanged
    assert in_force == 3.0 and ignored_after == 5


def runtime_listener(registry: Registry) -> socket.socket:
    """The registration listener's socket (the ban filter was bound to it)."""
    [sock] = registry.ban_filter.socks
    return sock  # type: ignore[return-value]
