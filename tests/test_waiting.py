"""The waiting room (registry/net/waiting.py): requests read with no task per connection.

Real sockets (socketpairs: epoll treats them like TCP), virtual time
(``autojump_clock``). The table plays a client's bytes on a schedule and
asserts what the room decides and at which virtual second, under the same
rules as ``tcp.read_request`` (tests/test_deadlines.py checks those on
memory streams); then waves, descriptor reuse, drain and cancellation.
"""

from __future__ import annotations

import gc
import ipaddress
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import config as config_mod
from registry.errors import ProtocolError
from registry.model import Endpoint, Protocol, Request
from registry.net.waiting import REJECT_CHUNK, Waiting, WaitingRoom
from tests.test_protocol_reader import CASES as READER_CASES
from tests.test_protocol_reader import play, summary

pytestmark = pytest.mark.skipif(not WaitingRoom.supported(), reason="needs select.epoll")

PEER = Endpoint(ipaddress.ip_address("127.0.0.1"), 40000)
CFG = config_mod.from_dict(
    {"protocol": {"read_deadline": "5s"}, "tuning": {"quiet_period": "250ms"}}
).protocol


class Room:
    """A WaitingRoom and a log of what left it, how and when (virtual seconds)."""

    def __init__(self) -> None:
        self.room = WaitingRoom(lambda: CFG)
        self.log: list[tuple[str, float, str, str]] = []  # (how, when, who, what)
        self.names: dict[int, str] = {}
        self.on_reject = lambda batch: None

    def add(self, name: str, conn: socket.socket) -> None:
        self.names[id(conn)] = name
        self.room.add(Waiting(conn, PEER, name, object(), trio.current_time()))

    def ready(self, w: Waiting, protocol: Protocol, request: Request) -> None:
        what = f"{protocol.value} {request.advertised}"
        self.log.append(("ready", trio.current_time(), self.names[id(w.conn)], what))
        w.conn.close()

    async def reject(self, batch: list[tuple[Waiting, ProtocolError]]) -> None:
        for w, error in batch:
            self.log.append(
                ("reject", trio.current_time(), self.names[id(w.conn)], error.code.value)
            )
        self.on_reject(batch)
        for w, _ in batch:
            w.conn.close()
        await trio.lowlevel.checkpoint()

    def drop(self, w: Waiting) -> None:
        self.log.append(("drop", trio.current_time(), self.names[id(w.conn)], ""))
        w.conn.close()

    async def run(self) -> None:
        await self.room.run(self.ready, self.reject, self.drop)


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def pair(pairs: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    """(the registry's end, the client's end)"""
    p = socket.socketpair()
    pairs.append(p)
    return p


# (client schedule: (delay, bytes or "EOF")...) -> (how, virtual second, what)
CASES = {
    "line at once": ([(0, b"127.0.0.1:15000\n")], ("ready", 0.0, "text 127.0.0.1:15000")),
    "CR LF": ([(0, b"127.0.0.1:15000\r\n")], ("ready", 0.0, "text 127.0.0.1:15000")),
    "line in pieces": (
        [(0, b"127.0"), (0.1, b".0.1:1"), (0.1, b"5000\n")],
        ("ready", 0.2, "text 127.0.0.1:15000"),
    ),
    # the lab's C++ client: no newline, it waits for the reply
    "quiet period frames it": ([(0, b"127.0.0.1:15000")], ("ready", 0.25, "text 127.0.0.1:15000")),
    "a byte restarts the quiet period": (
        [(0, b"127.0.0.1:1"), (0.2, b"5000")],
        ("ready", 0.45, "text 127.0.0.1:15000"),
    ),
    "EOF frames it": (
        [(0, b"127.0.0.1:15000"), (0.1, "EOF")],
        ("ready", 0.1, "text 127.0.0.1:15000"),
    ),
    "json": (
        [(0, b'{"host": "127.0.0.1", "port": 15000}\n')],
        ("ready", 0.0, "json 127.0.0.1:15000"),
    ),
    "one junk byte": ([(0, b"1")], ("reject", 0.25, "malformed")),
    "junk line": ([(0, b"hello\n")], ("reject", 0.0, "malformed")),
    "bad json": ([(0, b"{nope}\n")], ("reject", 0.0, "bad_json")),
    "too long": ([(0, b"1" * 600)], ("reject", 0.0, "too_long")),
    "closed before a byte": ([(0, "EOF")], ("reject", 0.0, "malformed")),
    "silence": ([], ("reject", 5.0, "read_timeout")),
    # its quiet period would end exactly at the deadline: the deadline wins, as in read_request
    "a tie goes to the deadline": ([(4.75, b"127.0.0.1:15000")], ("reject", 5.0, "read_timeout")),
    # whitespace is not a request: the quiet period does not frame it
    "whitespace drip": ([(0.2 * i, b" ") for i in range(1, 40)], ("reject", 5.0, "read_timeout")),
    "one byte a second is cut at the total deadline": (
        [(0, b"1")] + [(0.2, b"2")] * 30,
        ("reject", 5.0, "read_timeout"),
    ),
}


@pytest.mark.parametrize("name", CASES)
async def test_the_room_reads_like_read_request(
    autojump_clock: trio.testing.MockClock, pairs: list, name: str
) -> None:
    schedule, expected = CASES[name]
    r = Room()
    conn, client = pair(pairs)
    r.add("c", conn)

    async def play() -> None:
        for delay, data in schedule:
            await trio.sleep(delay)
            if r.log:
                return  # decided already: the client would see its reply
            if data == "EOF":
                client.shutdown(socket.SHUT_WR)
            else:
                client.send(data)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        nursery.start_soon(play)
        await trio.sleep(20)
        r.room.close()
    assert [(how, when, what) for how, when, _, what in r.log] == [expected]
    assert len(r.room) == 0


@pytest.mark.parametrize(
    ("sent", "waits", "expected"),
    [
        # the whole request came with the connection: handed over inside add(),
        # never registered in epoll
        (b"127.0.0.1:15000\n", False, ("ready", 0.5, "text 127.0.0.1:15000")),
        # decided wrong at once: recorded with run()'s next batch, no epoll either
        (b"hello\n", False, ("reject", 0.5, "malformed")),
        ("EOF", False, ("reject", 0.5, "malformed")),
        # a part: it waits in the room like any other (the quiet period frames it)
        (b"127.0.0.1:1", True, ("ready", 0.75, "text 127.0.0.1:1")),
    ],
)
async def test_a_connection_that_arrives_with_its_request_is_read_in_add(
    autojump_clock: trio.testing.MockClock,
    pairs: list,
    sent: bytes | str,
    waits: bool,
    expected: tuple[str, float, str],
) -> None:
    r = Room()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(0.5)
        conn, client = pair(pairs)
        if sent == "EOF":
            client.shutdown(socket.SHUT_WR)
        else:
            client.send(sent)
        r.add("c", conn)
        assert len(r.room) == waits
        if expected[0] == "ready" and not waits:
            assert r.log == [("ready", 0.5, "c", expected[2])]  # at once, in add()
        await trio.sleep(1.0)
        r.room.close()
    assert [(how, when, what) for how, when, _, what in r.log] == [expected]


@pytest.mark.parametrize("name", READER_CASES)
async def test_the_room_decides_like_the_reader_table(
    autojump_clock: trio.testing.MockClock, pairs: list, name: str
) -> None:
    # The table of tests/test_protocol_reader.py, played on a socket: the room
    # decides the same thing at the same second as the sans-io reader alone.
    chunks, cfg, expected = READER_CASES[name]
    r = Room()
    r.room = WaitingRoom(lambda: cfg)
    decided: list[tuple[float, Protocol, object]] = []
    r.ready = lambda w, protocol, request: decided.append(  # type: ignore[method-assign]
        (trio.current_time(), protocol, request)
    )

    async def reject(batch: list[tuple[Waiting, ProtocolError]]) -> None:
        decided.extend((trio.current_time(), w.reader.protocol, e) for w, e in batch)
        await trio.lowlevel.checkpoint()

    r.reject = reject  # type: ignore[method-assign]
    conn, client = pair(pairs)
    r.add("c", conn)

    async def play() -> None:
        for at, data in chunks:
            await trio.sleep_until(at)
            if decided:
                return  # the client would see its reply
            if data:
                client.send(data)
            else:
                client.shutdown(socket.SHUT_WR)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        nursery.start_soon(play)
        await trio.sleep(40)
        r.room.close()
    assert [summary(d) for d in decided] == [expected]  # type: ignore[arg-type]


async def test_every_schedule_at_once_each_decided_on_time(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    # One room, one heap: the quiet periods and deadlines of all the schedules
    # above interleave, and each connection is still decided at its own second.
    r = Room()

    async def play(name: str, client: socket.socket) -> None:
        for delay, data in CASES[name][0]:
            await trio.sleep(delay)
            if any(who == name for _, _, who, _ in r.log):
                return  # decided already
            if data == "EOF":
                client.shutdown(socket.SHUT_WR)
            else:
                client.send(data)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        for name in CASES:
            conn, client = pair(pairs)
            r.add(name, conn)
            nursery.start_soon(play, name, client)
        await trio.sleep(20)
        r.room.close()
    assert sorted((who, how, when, what) for how, when, who, what in r.log) == sorted(
        (name, *expected) for name, (_, expected) in CASES.items()
    )


async def test_an_idle_room_keeps_a_new_connections_deadline(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(13.0)  # the room waits with nothing in it
        r.add("d", pair(pairs)[0])
        await trio.sleep(10.0)
        r.room.close()
    assert r.log == [("reject", 18.0, "d", "read_timeout")]


async def test_a_reload_that_shortens_the_deadline_fires_later_arrivals_on_time(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    # Deadlines are no longer in arrival order once read_deadline shrinks (SIGHUP):
    # a connection that arrives after the reload is due before the one before it.
    current = [config_mod.from_dict({"protocol": {"read_deadline": "30s"}}).protocol]
    r = Room()
    r.room = WaitingRoom(lambda: current[0])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        r.add("before", pair(pairs)[0])  # due at 30
        await trio.sleep(1.0)
        current[0] = config_mod.from_dict({"protocol": {"read_deadline": "5s"}}).protocol
        r.add("after", pair(pairs)[0])  # due at 6
        await trio.sleep(40.0)
        r.room.close()
    assert r.log == [
        ("reject", 6.0, "after", "read_timeout"),
        ("reject", 30.0, "before", "read_timeout"),
    ]


async def test_a_connection_the_kernel_held_is_due_before_earlier_arrivals(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    # TCP_DEFER_ACCEPT: a connection handed over after 3 s of waiting in the kernel
    # counts them in its read deadline (arrived = now - held), so it can be due
    # before a connection accepted earlier.
    r = Room()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        r.add("fresh", pair(pairs)[0])  # due at 5
        await trio.sleep(1.0)
        held, _ = pair(pairs)
        r.names[id(held)] = "held"
        r.room.add(Waiting(held, PEER, "held", object(), trio.current_time() - 3.0))  # due at 3
        await trio.sleep(10.0)
        r.room.close()
    assert r.log == [
        ("reject", 3.0, "held", "read_timeout"),
        ("reject", 5.0, "fresh", "read_timeout"),
    ]


async def test_a_wave_is_rejected_in_chunks_and_requests_do_not_wait_for_it(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room()
    n = 2 * REJECT_CHUNK + 5
    for i in range(n):
        r.add(f"s{i}", pair(pairs)[0])
    late, late_client = pair(pairs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(1.0)
        r.add("late", late)  # its deadline is t=6: it is still waiting during the wave

        def on_reject(batch: list) -> None:
            if len(r.log) == REJECT_CHUNK:  # the first chunk is being recorded: a request arrives
                late_client.send(b"127.0.0.1:15000\n")

        r.on_reject = on_reject
        await trio.sleep(10.0)
        r.room.close()
    hows = [how for how, *_ in r.log]
    # dispatched between two chunks, not after the whole wave
    assert hows == ["reject"] * REJECT_CHUNK + ["ready"] + ["reject"] * (n - REJECT_CHUNK)
    assert {when for _, when, _, _ in r.log} == {5.0}
    rejected = [who for how, _, who, _ in r.log if how == "reject"]
    assert rejected == [f"s{i}" for i in range(n)]  # oldest first, each exactly once


@pytest.mark.parametrize(
    "junk", [b"hello\n", b"1"], ids=["refused on read", "refused at the quiet period"]
)
async def test_a_refused_wave_leaves_no_garbage_for_the_collector(
    autojump_clock: trio.testing.MockClock, pairs: list, junk: bytes
) -> None:
    # A refused request's error kept with its traceback tied the room's frames, the
    # receiver, the Waiting and its socket into a cycle: 5,000 junk connections made
    # ~180,000 objects for the collector, whose passes were 2-3 ms steps of the
    # event loop (docs/benchmarks.md). Freed by reference counting, they make none.
    r = Room()
    errors: list[ProtocolError] = []
    r.on_reject = lambda batch: errors.extend(e for _, e in batch)
    for i in range(40):
        conn, client = pair(pairs)
        client.send(junk)
        r.add(f"s{i}", conn)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds is kept in gc.garbage
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(r.run)
            await trio.sleep(1.0)
            r.room.close()
        assert len(errors) == 40 and all(e.__traceback__ is None for e in errors)
        errors.clear()
        r.log.clear()
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    for name in ("ProtocolError", "Waiting", "TextReceiver", "traceback"):
        assert name not in cyclic, (name, cyclic.count(name))


async def test_a_reused_descriptor_is_not_expired_on_its_predecessors_deadline(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room()
    a, a_client = pair(pairs)
    a_client.send(b"127.0.0.1:15000\n")
    r.add("a", a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(1.0)  # "a" left at t=0 and was closed: its number is free again
        b, _ = pair(pairs)
        r.add("b", b)
        await trio.sleep(10.0)
        r.room.close()
    assert [(how, when, who) for how, when, who, _ in r.log] == [
        ("ready", 0.0, "a"),
        ("reject", 6.0, "b"),
    ]


async def test_drain_waits_for_the_room_to_empty_and_cancel_drops_the_rest(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(1.0)
        r.room.close()  # empty: run() returns at once
    assert trio.current_time() == 1.0 and r.log == []

    r = Room()
    r.add("a", pair(pairs)[0])  # at t=1
    with trio.move_on_after(2.0):  # the grace period ends before a's deadline
        r.room.close()
        await r.run()
    assert r.log == [("drop", 3.0, "a", "")]

    r = Room()
    r.add("b", pair(pairs)[0])  # at t=3
    r.room.close()
    await r.run()  # closed but not empty: b is refused at its deadline, then it returns
    assert r.log == [("reject", 8.0, "b", "read_timeout")]


async def test_served_registrations_outlast_the_grace_deadline_the_room_does_not(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    # serve(): a handed-over request's task runs in one shielded nursery (its
    # registration runs shielded anyway); a cancel at the grace deadline cuts the
    # connection still sending, and serve() returns once the task has finished.
    r = Room()
    served: list[tuple[str, float, bool]] = []

    async def registration(w: Waiting, request: tuple[Protocol, Request]) -> None:
        await trio.sleep(3.0)  # the callback and the commit
        served.append((r.names[id(w.conn)], trio.current_time(), request[1].verify))
        w.conn.close()

    conn, client = pair(pairs)
    client.send(b"127.0.0.1:15000 verify=no\n")
    async with trio.open_nursery() as handlers:
        handlers.start_soon(r.room.serve, handlers, registration, r.reject, r.drop)
        await trio.testing.wait_all_tasks_blocked()
        r.add("sent", conn)  # whole: its task starts at once
        r.add("sending", pair(pairs)[0])
        r.room.close()  # the drain
        handlers.cancel_scope.deadline = trio.current_time() + 1.0  # the grace period
    assert r.log == [("drop", 1.0, "sending", "")]
    assert served == [("sent", 3.0, False)]
    assert handlers.cancel_scope.cancelled_caught


@st.composite
def _crowd(draw: st.DrawFn) -> list[tuple[float, float, list[tuple[float, bytes]]]]:
    """Connections as (added at, held by the kernel, chunks at absolute seconds).

    Seconds are multiples of 1/64; bytes come half a step off that grid, so a
    byte never lands exactly on a deadline (which of the two is seen first is
    then up to the driver), and no gap is exactly one quiet period for the same
    reason.
    """
    crowd = []
    for _ in range(draw(st.integers(1, 6))):
        added, held = draw(st.integers(0, 320)) / 64, draw(st.integers(0, 280)) / 64
        at, chunks = added + 1 / 128, []
        for _ in range(draw(st.integers(0, 5))):
            at += draw(st.integers(0, 40).filter(lambda g: g != 16)) / 64
            chunks.append((at, draw(st.binary(min_size=0, max_size=24))))
        crowd.append((added, held, chunks))
    return crowd


@settings(max_examples=60, deadline=None)
@given(_crowd())
def test_a_crowd_is_decided_as_each_reader_alone_decides(
    crowd: list[tuple[float, float, list[tuple[float, bytes]]]],
) -> None:
    # Arrivals at any time, some held by the kernel (due before earlier arrivals),
    # bytes, quiet periods and EOFs interleaved across connections: the room's one
    # heap decides each connection what and when the reader alone would.
    expected = {
        i: summary(play(chunks, CFG, added - held)) for i, (added, held, chunks) in enumerate(crowd)
    }
    got: dict[int, tuple[float, str, str]] = {}
    sockets = [socket.socketpair() for _ in crowd]
    names = {id(conn): i for i, (conn, _) in enumerate(sockets)}
    room = WaitingRoom(lambda: CFG)

    def ready(w: Waiting, protocol: Protocol, request: Request) -> None:
        got[names[id(w.conn)]] = summary((trio.current_time(), protocol, request))

    async def reject(batch: list[tuple[Waiting, ProtocolError]]) -> None:
        for w, e in batch:
            got[names[id(w.conn)]] = summary((trio.current_time(), w.reader.protocol, e))
        await trio.lowlevel.checkpoint()

    async def client(i: int) -> None:
        added, held, chunks = crowd[i]
        conn, peer = sockets[i]
        await trio.sleep_until(added)
        room.add(Waiting(conn, PEER, i, object(), added - held))
        for at, data in chunks:
            await trio.sleep_until(at)
            if i in got:
                return
            if data:
                peer.send(data)
            else:
                peer.shutdown(socket.SHUT_WR)
            await trio.lowlevel.checkpoint()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(room.run, ready, reject, lambda w: None)
            async with trio.open_nursery() as clients:
                for i in range(len(crowd)):
                    clients.start_soon(client, i)
            room.close()

    try:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    finally:
        for a, b in sockets:
            a.close()
            b.close()
    assert got == expected
