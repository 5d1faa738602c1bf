"""The TCP edge over memory streams under the virtual clock: framing by
quiet period, EOF and LF; the total read deadline; exactly one reply line."""

from __future__ import annotations

import ipaddress
import socket
from functools import partial

import pytest
import trio
import trio.testing

from registry import config as config_mod
from registry.errors import ProtocolError
from registry.model import Code, Endpoint, Protocol
from registry.net.accept import accept_loop
from registry.net.interfaces import is_local_address
from registry.net.listeners import own_end
from registry.net.tcp import TcpHandler, endpoint_of, read_request
from registry.protocol.reader import RequestReader
from registry.service import Service
from tests.fakes import ListRecorder, ScriptedConnector
from tests.test_protocol_reader import CASES as READER_CASES
from tests.test_protocol_reader import summary

PEER = Endpoint(ipaddress.ip_address("127.0.0.1"), 50000)
CFG = config_mod.loads("")


async def _drip(stream: trio.abc.SendStream, chunks: list[tuple[float, bytes]]) -> None:
    for delay, data in chunks:
        await trio.sleep(delay)
        if data == b"EOF":
            await stream.aclose()
            return
        await stream.send_all(data)


@pytest.mark.parametrize(
    ("chunks", "done_at", "port"),
    [
        ([(0, b"127.0.0.1:15000\n")], 0.0, 15000),
        ([(0, b"127.0.0.1:15000\r\n")], 0.0, 15000),
        # the lab's C++ client: no newline, then it waits for a reply: quiet period frames it
        ([(0, b"127.0.0.1:15001")], 0.25, 15001),
        # the same client closing at once: EOF frames it
        ([(0, b"127.0.0.1:15002"), (0.01, b"EOF")], 0.01, 15002),
        # split across writes, each gap shorter than the quiet period
        ([(0, b"127.0."), (0.2, b"0.1:"), (0.2, b"15003")], 0.65, 15003),
    ],
)
async def test_framing(
    autojump_clock: trio.testing.MockClock,
    chunks: list[tuple[float, bytes]],
    done_at: float,
    port: int,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drip, client, chunks)
        protocol, request = await read_request(
            server, RequestReader(CFG.protocol, trio.current_time())
        )
    assert protocol is Protocol.TEXT and request.port == port
    assert trio.current_time() == pytest.approx(done_at)


@pytest.mark.parametrize("name", READER_CASES)
async def test_read_request_decides_like_the_reader_table(
    autojump_clock: trio.testing.MockClock, name: str
) -> None:
    # The table of tests/test_protocol_reader.py, played on a stream: this driver
    # decides the same thing at the same second as the sans-io reader alone.
    chunks, cfg, expected = READER_CASES[name]
    client, server = trio.testing.memory_stream_pair()
    reader = RequestReader(cfg, trio.current_time())

    async def play() -> None:
        for at, data in chunks:
            await trio.sleep_until(at)
            if data:
                await client.send_all(data)
            else:
                await client.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(play)
        try:
            decision: object = (await read_request(server, reader))[1]
        except ProtocolError as e:
            decision = e.with_traceback(None)
        nursery.cancel_scope.cancel()
    assert summary((trio.current_time(), reader.protocol, decision)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("chunks", "code", "at"),
    [
        ([], Code.READ_TIMEOUT, 5.0),  # connect and send nothing
        ([(0, b"EOF")], Code.MALFORMED, 0.0),  # connect and close
        # a one-byte-per-second drip: the first gap exceeds the quiet period, so
        # what has arrived is parsed as the whole request (and is malformed)
        ([(0, b"1"), (1, b"2")], Code.MALFORMED, 0.25),
        ([(0, b"x" * 600)], Code.TOO_LONG, 0.0),
    ],
)
async def test_read_errors(
    autojump_clock: trio.testing.MockClock, chunks: list[tuple[float, bytes]], code: Code, at: float
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drip, client, chunks)
        with pytest.raises(ProtocolError) as err:
            await read_request(server, RequestReader(CFG.protocol, trio.current_time()))
        nursery.cancel_scope.cancel()
    assert err.value.code is code
    assert trio.current_time() == pytest.approx(at)


async def test_whitespace_drip_is_cut_at_the_total_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    chunks = [(0.2, b" ")] * 100  # never a request, always inside the quiet period
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drip, client, chunks)
        with pytest.raises(ProtocolError) as err:
            await read_request(server, RequestReader(CFG.protocol, trio.current_time()))
        nursery.cancel_scope.cancel()
    assert err.value.code is Code.READ_TIMEOUT
    assert trio.current_time() == pytest.approx(5.0)


async def test_the_raised_error_is_a_copy_so_the_readers_own_holds_no_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Raised as-is, the reader's decision would hold this frame, which holds the reader:
    # a reference cycle per malformed request, freed only by the garbage collector.
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"bogus\n")
    reader = RequestReader(CFG.protocol, trio.current_time())
    with pytest.raises(ProtocolError) as err:
        await read_request(server, reader)
    kept = reader.receiver.next_event()  # type: ignore[union-attr]
    assert isinstance(kept, ProtocolError) and kept.code is err.value.code is Code.MALFORMED
    assert kept.__traceback__ is None


async def _exchange(
    request: bytes, **connector: object
) -> tuple[bytes, ListRecorder, ScriptedConnector]:
    conn = ScriptedConnector(**connector)  # type: ignore[arg-type]
    rec = ListRecorder()
    handler = TcpHandler(Service(CFG, is_local=is_local_address, connector=conn, recorder=rec))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.handle, server, PEER)
        await client.send_all(request)
        reply = b""
        with trio.fail_after(30):
            while chunk := await client.receive_some():
                reply += chunk
    return reply, rec, conn


async def test_one_reply_line_for_a_good_request(autojump_clock: trio.testing.MockClock) -> None:
    reply, rec, conn = await _exchange(b"127.0.0.1:15000 student=alice\n")
    assert reply.count(b"\n") == 1 and reply.endswith(b"\n")
    assert reply.startswith(b"OK connected ")
    assert f"id={rec.records[0].id}".encode() in reply
    assert len(conn.dials) == 1


@pytest.mark.parametrize(
    ("request_bytes", "prefix"),
    [
        (b"0177.0.0.1:15000\n", b"ERROR malformed "),
        (b"127.0.0.1\n", b"ERROR malformed "),
        (b"127.0.0.1:99999\n", b"ERROR malformed "),
        (b"127.0.0.1:15000 colour=blue\n", b"ERROR malformed "),
        (b"a" * 1000, b"ERROR too_long "),
        (b"\xff\xfe:1\n", b"ERROR malformed "),
    ],
)
async def test_bad_requests_get_one_error_line_and_a_record(
    autojump_clock: trio.testing.MockClock, request_bytes: bytes, prefix: bytes
) -> None:
    reply, rec, conn = await _exchange(request_bytes)
    assert reply.startswith(prefix) and reply.count(b"\n") == 1
    assert len(rec.records) == 1 and rec.records[0].status == "ERROR"
    assert conn.dials == []


async def test_callback_completes_and_is_recorded_when_client_vanishes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    conn = ScriptedConnector(delay=2.0)
    rec = ListRecorder()
    handler = TcpHandler(Service(CFG, is_local=is_local_address, connector=conn, recorder=rec))
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handler.handle, server, PEER)
        await client.send_all(b"127.0.0.1:15000\n")
        await trio.sleep(0.5)
        await client.aclose()  # gone before the callback finishes
    assert [r.code for r in rec.records] == ["connected"]
    assert trio.current_time() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("host", "own"),
    [("127.0.0.1", True), ("0.0.0.0", False), ("::1", True), ("::", False)],
)
async def test_a_listener_on_one_address_gives_every_connection_its_own_end(
    host: str, own: bool
) -> None:
    # own_end(): the handler's `local` without a getsockname per connection; a
    # wildcard listener's connections each have their own (the handler asks).
    try:
        (listener,) = await trio.open_tcp_listeners(0, host=host)
    except OSError:
        pytest.skip(f"no {host} here")
    async with listener:
        end = own_end(listener)
        if not own:
            assert end is None
            return
        client = await trio.open_tcp_stream(host, listener.socket.getsockname()[1])
        async with client, await listener.accept() as conn:
            assert end == endpoint_of(conn.socket.getsockname())


@pytest.mark.parametrize("bare", [False, True])
async def test_the_accept_loop_hands_over_bare_sockets_only_when_asked(bare: bool) -> None:
    # bare: the C socket without socket.socket's Python layer (the registration
    # path); trio's own streams (the admin endpoint) take only socket.socket.
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    admission = trio.CapacityLimiter(4)
    got: list[tuple[type, bytes]] = []
    async with listener, trio.open_nursery() as nursery:

        def on_accept(conn: socket.SocketType, addr: object, token: object) -> None:
            got.append((type(conn), conn.recv(10)))
            conn.close()
            admission.release_on_behalf_of(token)
            nursery.cancel_scope.cancel()

        nursery.start_soon(
            partial(accept_loop, listener, admission, on_accept, name="t", bare=bare)
        )
        port = listener.socket.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"hi")
            await trio.sleep_forever()
    assert got == [(socket.SocketType if bare else socket.socket, b"hi")]
    assert admission.borrowed_tokens == 0
