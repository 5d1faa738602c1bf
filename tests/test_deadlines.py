"""Every deadline and limit of the registration path, at exact virtual times.

Memory streams (never sockets) under ``autojump_clock``: the read deadline and
the quiet period, the reply write timeout of the TCP handler (a refusal at the door
writes once without blocking and waits for nothing: tests/test_door.py), the callback's send and verify deadlines and its cap on
bytes read from a target, the callback queue and every rate-limit scope. Each
table row names the config it runs under and the virtual second at which the
registry must let go. Connector *connect* timeouts need a real socket: they
are in tests/test_attack.py.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import trio
import trio.testing

from registry import config as config_mod
from registry.config import Config
from registry.model import Code, Endpoint
from registry.net.connector import TcpConnector
from registry.net.interfaces import is_local_address
from registry.net.tcp import TcpHandler
from registry.protocol.callback import callback_line
from registry.service import CallResult, Service
from tests.fakes import ListRecorder, ScriptedConnector

PEER = Endpoint(ipaddress.ip_address("127.0.0.1"), 50000)
NONCE = "00112233aabbccdd"
# Rate limits out of the way, for tests about something else.
OPEN_RATES = {
    "per_source": "1000/second",
    "per_target": "1000/second",
    "per_target_port": "1000/second",
    "global": "1000/second",
}


def _cfg(**sections: dict[str, Any]) -> Config:
    # quiet_period and max_response_bytes are constants of limits.profile: a test
    # sets them through [tuning]
    tuning: dict[str, Any] = {}
    for section in ("protocol", "callback"):
        table = dict(sections.pop(section, {}))
        for name in ("quiet_period", "max_response_bytes"):
            if name in table:
                tuning[name] = table.pop(name)
        sections[section] = table
    return config_mod.from_dict({**sections, "tuning": tuning})


class _Handler:
    """A TcpHandler over a Service with a scripted connector and an in-memory store."""

    def __init__(self, cfg: Config, **connector: Any) -> None:
        self.connector = ScriptedConnector(**connector)
        self.recorder = ListRecorder()
        self.service = Service(
            cfg, is_local=is_local_address, connector=self.connector, recorder=self.recorder
        )
        self.tcp = TcpHandler(self.service)

    async def exchange(
        self, chunks: list[tuple[float, bytes]], peer: Endpoint = PEER
    ) -> tuple[bytes, float]:
        """Play ``(delay, bytes)`` chunks as a client; return (reply, virtual time it ended)."""
        client, server = trio.testing.memory_stream_pair()
        reply = b""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.tcp.handle, server, peer)
            nursery.start_soon(_drip, client, chunks)
            with trio.fail_after(600):
                while chunk := await client.receive_some():
                    reply += chunk
            nursery.cancel_scope.cancel()
        return reply, trio.current_time()


async def _drip(stream: trio.abc.SendStream, chunks: list[tuple[float, bytes]]) -> None:
    for delay, data in chunks:
        await trio.sleep(delay)
        await stream.send_all(data)


def _peer(n: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(f"127.0.0.{n}"), 50000)


# --- reading the request -----------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "chunks", "reply", "at"),
    [
        # silence: cut at the total read deadline, whatever its value
        ({}, [], b"ERROR read_timeout ", 5.0),
        ({"read_deadline": "2s"}, [], b"ERROR read_timeout ", 2.0),
        ({"read_deadline": "750ms"}, [], b"ERROR read_timeout ", 0.75),
        # one byte per second of a valid request, with a quiet period long enough
        # that no gap frames it: the total deadline cuts it, not the gaps
        (
            {"quiet_period": "2s", "read_deadline": "5s"},
            [(1.0, bytes([b])) for b in b"127.0.0.1:15000"],
            b"ERROR read_timeout ",
            5.0,
        ),
        # the same drip under the default quiet period: the first gap (1 s > 250 ms)
        # frames "1" as the whole request, which is malformed
        ({}, [(1.0, bytes([b])) for b in b"127.0.0.1:15000"], b"ERROR malformed ", 1.25),
        # a whitespace drip is never a request: only the total deadline ends it
        ({"read_deadline": "3s"}, [(1.0, b" ")] * 10, b"ERROR read_timeout ", 3.0),
        # a one-byte-per-second drip of a valid request inside a 30 s deadline but
        # with a 2 s quiet period completes (each gap is under the quiet period)
        (
            {"quiet_period": "2s", "read_deadline": "30s"},
            [(1.0, bytes([b])) for b in b"127.0.0.1:15000"],
            b"OK connected ",
            17.0,  # last byte at 15 s, then 2 s of quiet
        ),
        # the size limit needs no deadline at all
        ({"max_request_bytes": 64}, [(0.5, b"9" * 65)], b"ERROR too_long ", 0.5),
    ],
)
async def test_read_deadline_and_drip(
    autojump_clock: trio.testing.MockClock,
    protocol: dict[str, Any],
    chunks: list[tuple[float, bytes]],
    reply: bytes,
    at: float,
) -> None:
    handler = _Handler(_cfg(protocol=protocol))
    got, ended = await handler.exchange(chunks)
    assert got.startswith(reply), got
    assert got.count(b"\n") == 1
    assert ended == pytest.approx(at)
    assert len(handler.recorder.records) == 1  # recorded before the reply, whatever the end


@pytest.mark.parametrize(
    ("quiet", "chunks", "at"),
    [
        ("250ms", [(0.0, b"127.0.0.1:15000")], 0.25),
        ("100ms", [(0.0, b"127.0.0.1:15000")], 0.1),
        ("1s", [(0.0, b"127.0.0.1:15000")], 1.0),
        # the quiet period counts from the LAST byte
        ("250ms", [(0.0, b"127.0.0.1:"), (0.2, b"15000")], 0.45),
        # a newline or a half-close frames at once, whatever the quiet period
        ("1s", [(0.3, b"127.0.0.1:15000\n")], 0.3),
    ],
)
async def test_quiet_period_frames_a_request_without_newline(
    autojump_clock: trio.testing.MockClock,
    quiet: str,
    chunks: list[tuple[float, bytes]],
    at: float,
) -> None:
    handler = _Handler(_cfg(protocol={"quiet_period": quiet}))
    got, ended = await handler.exchange(chunks)
    assert got.startswith(b"OK connected ")
    assert ended == pytest.approx(at)
    assert handler.connector.dials[0].at == pytest.approx(at)


# --- writing the reply -------------------------------------------------------


@pytest.mark.parametrize(("write_timeout", "ends"), [("5s", 6.0), ("500ms", 1.5)])
async def test_write_timeout_cuts_a_client_that_never_reads(
    autojump_clock: trio.testing.MockClock, write_timeout: str, ends: float
) -> None:
    # lockstep: send_all blocks until the peer reads, as on a socket whose
    # buffers are full. The client sends its request and never reads.
    handler = _Handler(_cfg(protocol={"write_timeout": write_timeout}), delay=1.0)
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"127.0.0.1:15000\n")
        await handler.tcp.handle(server, PEER)  # returns: the handler let go
        assert trio.current_time() == pytest.approx(ends)  # 1 s callback + the write timeout
        nursery.cancel_scope.cancel()
    assert [r.code for r in handler.recorder.records] == ["connected"]


# --- the callback: send, verify, bytes read ----------------------------------


class _Target(trio.abc.HalfCloseableStream):
    """A callback target. ``reads``: it takes the callback line; ``answer``: what it sends.

    ``answer`` None: silent forever. ``flood``: an endless stream of ``flood``-sized
    chunks (``sent`` counts what the registry actually pulled). ``after_eof``: it
    reads until the registry's end of stream, then sends this and closes (nc,
    ``while (recv(...) > 0)``, a server that answers a complete request).
    """

    def __init__(
        self,
        *,
        reads: bool = True,
        answer: list[tuple[float, bytes]] | None = None,
        flood: int = 0,
        after_eof: bytes | None = None,
    ) -> None:
        self.reads = reads
        self.answer = list(answer) if answer is not None else None
        self.flood = flood
        self.after_eof = after_eof
        self.eof = trio.Event()
        self.received = b""
        self.sent = 0
        self.closed_at: float | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.reads:
            await trio.sleep_forever()  # accepts, never reads: the send never completes
        self.received += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self.eof.set()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.after_eof is not None:
            await self.eof.wait()
            data, self.after_eof = self.after_eof, b""
            return data
        if self.flood:
            await trio.lowlevel.checkpoint()
            n = min(self.flood, max_bytes or self.flood)
            self.sent += n
            return b"x" * n
        if not self.answer:
            if self.answer is None:
                await trio.sleep_forever()
            await trio.lowlevel.checkpoint()
            return b""  # the script is over: EOF
        delay, data = self.answer.pop(0)
        await trio.sleep(delay)
        self.sent += len(data)
        return data

    async def aclose(self) -> None:
        self.closed_at = trio.current_time()
        await trio.lowlevel.checkpoint()


ECHO = f"ECHO nonce={NONCE}\n".encode()


@pytest.mark.parametrize(
    ("callback", "target", "wait_echo", "code", "verified", "at"),
    [
        # echo after 0.3 s: verified at 0.3
        ({}, {"answer": [(0.3, ECHO)]}, True, Code.CONNECTED, True, 0.3),
        # the echo split across two chunks still counts
        ({}, {"answer": [(0.1, ECHO[:9]), (0.1, ECHO[9:])]}, True, Code.CONNECTED, True, 0.2),
        # reads, never answers: the verify timeout ends the wait
        ({}, {"answer": None}, True, Code.CONNECTED, False, 2.0),
        ({"verify_timeout": "500ms"}, {"answer": None}, True, Code.CONNECTED, False, 0.5),
        # verify=no: no wait at all
        ({}, {"answer": None}, False, Code.CONNECTED, False, 0.0),
        # prints and closes (the lab's C++ server): EOF ends the wait at once
        ({}, {"answer": [(0.1, b"Hello\n")]}, True, Code.CONNECTED, False, 0.1),
        # reads until the registry's end of stream: the registry half-closes after
        # its line, so such a server closes, or answers, at once
        ({}, {"after_eof": b""}, True, Code.CONNECTED, False, 0.0),
        ({}, {"after_eof": ECHO}, True, Code.CONNECTED, True, 0.0),
        # accepts, never reads, never answers: the send is bounded by the verify
        # timeout (never below 0.5 s, so a tiny verify timeout still lets a slow
        # but honest server take the line)
        ({}, {"reads": False}, True, Code.CONNECTED, False, 2.0),
        ({"verify_timeout": "3s"}, {"reads": False}, True, Code.CONNECTED, False, 3.0),
        ({"verify_timeout": "100ms"}, {"reads": False}, True, Code.CONNECTED, False, 0.5),
        # a flood is cut at max_response_bytes at once, not at the verify timeout
        ({}, {"flood": 65536}, True, Code.CONNECTED, False, 0.0),
        # an echo that arrives after the byte cap is not seen (exactly the cap
        # arrived at 0; the next chunk, at 0.1, is past it)
        (
            {"max_response_bytes": 64},
            {"answer": [(0.0, b"y" * 64), (0.1, ECHO)]},
            True,
            Code.CONNECTED,
            False,
            0.1,
        ),
        # one byte under the cap, the echo crosses it: the part within the cap is
        # examined, the needle is cut, not verified
        (
            {"max_response_bytes": 64},
            {"answer": [(0.0, b"y" * 60), (0.1, ECHO)]},
            True,
            Code.CONNECTED,
            False,
            0.1,
        ),
    ],
)
async def test_callback_conversation_deadlines(
    autojump_clock: trio.testing.MockClock,
    callback: dict[str, Any],
    target: dict[str, Any],
    wait_echo: bool,
    code: Code,
    verified: bool,
    at: float,
) -> None:
    cfg = _cfg(callback=callback)
    connector = TcpConnector(cfg.callback)
    stream = _Target(**target)
    # _converse is everything after connect(): it takes any stream, so a scripted
    # target can play each misbehaviour at exact virtual times.
    result = await connector._converse(stream, "id1", NONCE, 1.0, wait_echo)  # type: ignore[arg-type]
    assert (result.code, result.verified) == (code, verified)
    assert trio.current_time() == pytest.approx(at)
    if target.get("reads", True):
        assert stream.received == callback_line("id1", NONCE, cfg.callback.greeting)


@pytest.mark.parametrize("cap", [64, 4096, 100_000])
async def test_flooding_target_is_read_no_further_than_the_cap(
    autojump_clock: trio.testing.MockClock, cap: int
) -> None:
    cfg = _cfg(callback={"max_response_bytes": cap})
    stream = _Target(flood=1 << 20)
    result = await TcpConnector(cfg.callback)._converse(stream, "id1", NONCE, 1.0, True)  # type: ignore[arg-type]
    assert result.code is Code.CONNECTED and not result.verified
    # Reads are 4096 bytes at most; the one that crosses the cap is the last.
    assert cap < stream.sent <= cap + 4096
    assert stream.closed_at == 0.0


# --- callbacks in flight and the queue, over the wire --------------------------


async def test_callback_queue_overflow_answers_busy_overloaded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cfg = _cfg(limits={"max_callbacks_in_flight": 2, "max_callback_queue": 2}, ratelimit=OPEN_RATES)
    handler = _Handler(cfg, delay=4.0)
    results: list[tuple[float, bytes]] = []

    async def one(n: int) -> None:
        reply, ended = await handler.exchange(
            [(0.01 * n, f"127.0.0.{n}:15000\n".encode())], _peer(n)
        )
        results.append((round(ended, 6), b" ".join(reply.split(b" ")[:2])))

    async with trio.open_nursery() as nursery:
        for n in range(1, 7):
            nursery.start_soon(one, n)
    # 2 dial at once, 2 wait for a slot (4 s each), the 5th and 6th are turned
    # away the moment they arrive.
    assert sorted(results) == [
        (0.05, b"BUSY overloaded"),
        (0.06, b"BUSY overloaded"),
        (4.01, b"OK connected"),
        (4.02, b"OK connected"),
        (8.01, b"OK connected"),
        (8.02, b"OK connected"),
    ]
    assert handler.service.slots.admitted == 0  # every place given back
    assert handler.service.dialing.borrowed_tokens == 0


# --- rate limits, over the wire ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "rate", "peers", "ports", "retry_after"),
    [
        # 3/minute: a token every 20 s; the 4th request waits 20 s
        ("per_source", "3/minute", [1, 1, 1, 1], [15000, 15001, 15002, 15003], 20),
        # one target host (nat-observed mode would differ; strict: peer == target)
        ("per_target", "2/minute", [1, 1, 1], [15000, 15001, 15002], 30),
        ("per_target_port", "2/hour", [1, 1, 1], [15000, 15000, 15000], 1800),
        # the global bucket refuses a fresh source too
        ("global", "3/second", [1, 2, 3, 4], [15000] * 4, 1),
    ],
)
async def test_rate_limit_scopes_answer_busy_with_exact_retry_after(
    autojump_clock: trio.testing.MockClock,
    key: str,
    rate: str,
    peers: list[int],
    ports: list[int],
    retry_after: int,
) -> None:
    handler = _Handler(_cfg(ratelimit={**OPEN_RATES, key: rate}))
    replies = []
    for n, port in zip(peers, ports, strict=True):
        reply, _ = await handler.exchange([(0.0, f"127.0.0.{n}:{port}\n".encode())], _peer(n))
        replies.append(reply)
    assert all(r.startswith(b"OK connected ") for r in replies[:-1])
    assert replies[-1].startswith(b"BUSY rate_limited ")
    assert f" retry_after={retry_after} ".encode() in replies[-1]
    assert trio.current_time() == 0.0
    # retry_after is honest: one virtual second early is still refused (when the
    # wait is longer than a second), on time is served
    n, port = peers[-1], ports[-1]
    if retry_after > 1:
        await trio.sleep(retry_after - 1)
        early, _ = await handler.exchange([(0.0, f"127.0.0.{n}:{port}\n".encode())], _peer(n))
        assert early.startswith(b"BUSY rate_limited ")
    await trio.sleep_until(retry_after)
    late, _ = await handler.exchange([(0.0, f"127.0.0.{n}:{port}\n".encode())], _peer(n))
    assert late.startswith(b"OK connected ")


async def test_drip_then_no_read_is_held_for_read_deadline_plus_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A drip that uses the whole read deadline, then a client that never reads
    # the error reply: each stage is bounded, so the connection's life is too.
    cfg = _cfg(protocol={"read_deadline": "3s", "quiet_period": "2s", "write_timeout": "1s"})
    recorder = ListRecorder()
    service = Service(
        cfg, is_local=is_local_address, connector=_SilentTargetConnector(cfg), recorder=recorder
    )
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        # "127.0.0.1:15000" is complete at 1.5 s; quiet 2 s would frame it at 3.5 s,
        # but the 3 s read deadline cuts it first: ERROR read_timeout, not a callback.
        nursery.start_soon(_drip_lockstep, client, b"127.0.0.1:15000", 0.1)
        await TcpHandler(service).handle(server, PEER)
        assert trio.current_time() == pytest.approx(3.0 + 1.0)  # read deadline + write timeout
        nursery.cancel_scope.cancel()
    assert [r.code for r in recorder.records] == ["read_timeout"]


async def _drip_lockstep(stream: trio.abc.SendStream, data: bytes, gap: float) -> None:
    for b in data:
        await trio.sleep(gap)
        await stream.send_all(bytes([b]))


class _SilentTargetConnector:
    """A connector whose every target takes the line and never echoes."""

    def __init__(self, cfg: Config) -> None:
        self.connector = TcpConnector(cfg.callback)

    async def call(
        self, target: Endpoint, reg_id: str, nonce: str, *, wait_echo: bool
    ) -> CallResult:
        return await self.connector._converse(_Target(answer=None), reg_id, nonce, 1.0, wait_echo)  # type: ignore[arg-type]


async def test_callback_and_reply_deadlines_add_up(autojump_clock: trio.testing.MockClock) -> None:
    # A request framed by LF at 0, a target that never echoes (verify 2 s), a
    # client that never reads (write 1 s): the handler lets go at exactly 3 s.
    cfg = _cfg(protocol={"write_timeout": "1s"}, callback={"verify_timeout": "2s"})
    recorder = ListRecorder()
    service = Service(
        cfg, is_local=is_local_address, connector=_SilentTargetConnector(cfg), recorder=recorder
    )
    client, server = trio.testing.lockstep_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"127.0.0.1:15000\n")
        await TcpHandler(service).handle(server, PEER)
        assert trio.current_time() == pytest.approx(3.0)
        nursery.cancel_scope.cancel()
    assert [(r.code, r.verified) for r in recorder.records] == [("connected", False)]
