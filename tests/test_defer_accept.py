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

import pytest

from registry.net.accept import TCP_DEFER_ACCEPT, defer_accept

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


def test_off_means_accepted_at_once() -> None:
    with listener() as sock:
        assert defer_accept(sock, 0) == 0
        sock.settimeout(2)
        with socket.create_connection(sock.getsockname()):
            conn, _ = sock.accept()
            conn.close()
