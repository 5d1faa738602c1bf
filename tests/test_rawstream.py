"""RawStream: the registration connection and the callback on plain sockets (registry/net/tcp.py)."""

from __future__ import annotations

import ipaddress
import socket
import threading

import pytest
import trio
import trio.testing

from registry import config as config_mod
from registry.model import Code, Endpoint
from registry.net.connector import TcpConnector
from registry.net.tcp import RawStream, _reply
from registry.protocol.callback import callback_line


def _drain_unless(stop: threading.Event, sock: socket.socket) -> None:
    # Bounds the test if send_all ever blocks the thread: after 5 s the peer
    # shuts down, which fails the blocked send (and the assertion on `drained`).
    if not stop.wait(5):
        drained.set()
        sock.shutdown(socket.SHUT_RDWR)


drained = threading.Event()


async def test_send_to_a_peer_that_never_reads_waits_in_trio_not_in_the_thread() -> None:
    # An accepted socket's descriptor is blocking; the stream must not block the
    # event loop on it when the peer's window is full: other tasks run meanwhile.
    drained.clear()
    ours, peer = socket.socketpair()  # both blocking, like an accepted socket
    stop = threading.Event()
    watchdog = threading.Thread(target=_drain_unless, args=(stop, peer), daemon=True)
    watchdog.start()
    stream = RawStream(ours)
    others_ran_while_blocked = []
    try:
        async with trio.open_nursery() as nursery:

            async def other() -> None:
                await trio.sleep(0.05)
                others_ran_while_blocked.append(not drained.is_set())
                nursery.cancel_scope.cancel()

            nursery.start_soon(stream.send_all, b"x" * (64 << 20))
            nursery.start_soon(other)
    finally:
        stop.set()
        watchdog.join()
        stream.close()
        peer.close()
    assert others_ran_while_blocked == [True]
    assert ours.fileno() == -1


async def test_receive_eof_and_errors_as_trio_streams_report_them() -> None:
    ours, peer = socket.socketpair()
    stream = RawStream(ours)
    peer.sendall(b"hello")
    assert await stream.receive_some(4096) == b"hello"
    peer.shutdown(socket.SHUT_WR)
    assert await stream.receive_some(4096) == b""  # EOF
    await stream.send_eof()
    assert peer.recv(10) == b""  # our FIN arrived
    peer.close()  # gone: the next sends fail (EPIPE)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(3):  # the first send may still be accepted by the kernel
            await stream.send_all(b"more")
    await stream.aclose()
    assert ours.fileno() == -1
    stream.close()  # closing twice is harmless


def test_send_now_takes_what_fits_and_leaves_errors_to_send_all() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(True)  # like an accepted socket: send_now must not block on it
    stream = RawStream(ours)
    assert stream.send_now(b"line\n") == 5
    assert peer.recv(10) == b"line\n"
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    taken = stream.send_now(b"x" * (8 << 20))
    assert 0 < taken < 8 << 20  # a full buffer: part of it, at once
    assert stream.send_now(b"more") == 0  # nothing fits now
    peer.close()
    assert stream.send_now(b"more") == 0  # an error takes nothing
    ours.close()


@pytest.mark.parametrize("wait_echo", [False, True])
async def test_a_callback_the_kernel_connects_at_once_goes_out_without_a_wait(
    wait_echo: bool,
) -> None:
    # On loopback the handshake completes inside connect(): the line goes out with
    # no epoll registration, no scheduler round and no deadline; with nothing to
    # wait for (no echo) the whole callback runs without a checkpoint.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = Endpoint(ipaddress.ip_address("127.0.0.1"), listener.getsockname()[1])
        connector = TcpConnector(config_mod.DEFAULT.callback)
        if wait_echo:
            with trio.move_on_after(0.05):  # nobody echoes: the read waits, the line went
                await connector.call(target, "r1", "n1", wait_echo=True)
        else:
            with trio.testing.assert_no_checkpoints():
                result = await connector.call(target, "r1", "n1", wait_echo=False)
            assert (result.code, result.verified) == (Code.CONNECTED, False)
        conn, _ = listener.accept()
        with conn:
            line = callback_line("r1", "n1", config_mod.DEFAULT.callback.greeting)
            assert conn.recv(4096) == line
            assert conn.recv(10) == b""  # then our FIN


async def test_a_reply_that_fits_is_sent_without_a_checkpoint_and_closed_with_fin() -> None:
    ours, peer = socket.socketpair()
    stream = RawStream(ours)
    with trio.testing.assert_no_checkpoints():  # no deadline to set, no scheduler round
        await _reply(stream, b"OK connected\n", 5.0)
    stream.close()  # as TcpHandler does next: the FIN, with no shutdown() before it
    assert peer.recv(100) == b"OK connected\n"
    assert peer.recv(10) == b""  # our FIN
    peer.close()


async def test_a_reply_that_does_not_fit_is_sent_in_full_then_half_closed() -> None:
    ours, peer = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reply = b"x" * (1 << 20) + b"\n"
    got = bytearray()

    async def read_all() -> None:
        while chunk := await trio.to_thread.run_sync(peer.recv, 65536):
            got.extend(chunk)

    with trio.fail_after(60):  # a hang guard: without our FIN, read_all never ends
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await _reply(RawStream(ours), reply, 30.0)  # the FIN too, before any close
    assert bytes(got) == reply
    ours.close()
    peer.close()


async def test_closing_a_stream_wakes_a_task_waiting_on_it() -> None:
    # close() skips trio's notify_closing only for a socket trio never waited on:
    # a task blocked in receive_some must still wake (ClosedResourceError), not hang.
    ours, peer = socket.socketpair()
    stream = RawStream(ours)
    woke: list[type[BaseException]] = []

    async def reader() -> None:
        try:
            await stream.receive_some(10)
        except trio.ClosedResourceError as e:
            woke.append(type(e))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            stream.close()
    assert woke == [trio.ClosedResourceError]
    peer.close()


async def test_a_socket_trio_never_waited_on_closes_without_notify_closing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    notified: list[object] = []
    monkeypatch.setattr(trio.lowlevel, "notify_closing", notified.append)
    ours, peer = socket.socketpair()
    stream = RawStream(ours)
    peer.sendall(b"x")
    assert await stream.receive_some(10) == b"x"  # there at once: no wait
    stream.close()
    assert notified == []
    ours, peer2 = socket.socketpair()
    stream = RawStream(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some, 10)  # nothing sent: this one waits
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    stream.close()
    assert notified == [ours]
    peer.close()
    peer2.close()
