"""The waiting room (registry/net/waiting.py): no task per connection until its first byte.

Real sockets (socketpairs: epoll treats them like TCP), virtual time
(``autojump_clock``): every expiry at its exact deadline, arrivals dispatched
between the chunks of a wave, descriptor reuse, drain and cancellation.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.lowlevel
import trio.testing

from registry.model import Endpoint
from registry.net.waiting import EXPIRE_CHUNK, Waiting, WaitingRoom

pytestmark = pytest.mark.skipif(not WaitingRoom.supported(), reason="needs select.epoll")

PEER = Endpoint(ipaddress.ip_address("127.0.0.1"), 40000)


class Room:
    """A WaitingRoom and a log of what left it, how and when (virtual seconds)."""

    def __init__(self, read_deadline: float = 5.0) -> None:
        self.room = WaitingRoom(lambda: read_deadline)
        self.log: list[tuple[str, float, list[str]]] = []
        self.names: dict[int, str] = {}
        self.on_expire = lambda batch: None

    def add(self, name: str, conn: socket.socket) -> None:
        self.names[id(conn)] = name
        self.room.add(Waiting(conn, PEER, name, object(), trio.current_time()))

    def _names(self, ws: list[Waiting]) -> list[str]:
        return [self.names[id(w.conn)] for w in ws]

    def ready(self, w: Waiting) -> None:
        self.log.append(("ready", trio.current_time(), self._names([w])))
        w.conn.close()

    async def expire(self, batch: list[Waiting]) -> None:
        self.log.append(("expire", trio.current_time(), self._names(batch)))
        self.on_expire(batch)
        for w in batch:
            w.conn.close()
        await trio.lowlevel.checkpoint()

    def drop(self, w: Waiting) -> None:
        self.log.append(("drop", trio.current_time(), self._names([w])))
        w.conn.close()

    async def run(self) -> None:
        await self.room.run(self.ready, self.expire, self.drop)


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


async def test_first_byte_dispatches_and_silence_expires_at_the_deadline(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room(read_deadline=5.0)
    a, a_client = pair(pairs)
    b, _ = pair(pairs)
    c, c_client = pair(pairs)
    a_client.send(b"1")
    r.add("a", a)
    r.add("b", b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(2.0)
        r.add("c", c)  # joins an idle room: its deadline (t=7) must still be kept
        await trio.sleep(1.0)
        c_client.close()  # EOF counts as "ready": the handler reports it
        await trio.sleep(10.0)
        d, _ = pair(pairs)
        r.add("d", d)
        await trio.sleep(5.0)
        r.room.close()
    assert r.log == [
        ("ready", 0.0, ["a"]),
        ("ready", 3.0, ["c"]),
        ("expire", 5.0, ["b"]),
        ("expire", 18.0, ["d"]),  # added at 13
    ]
    assert len(r.room) == 0


async def test_a_wave_expires_in_chunks_and_arrivals_do_not_wait_for_it(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room(read_deadline=5.0)
    n = 2 * EXPIRE_CHUNK + 5
    for i in range(n):
        r.add(f"s{i}", pair(pairs)[0])
    late, late_client = pair(pairs)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(1.0)
        r.add("late", late)  # its deadline is t=6: it is still waiting during the wave
        sent = []

        def on_expire(batch: list[Waiting]) -> None:
            if not sent:  # while the first chunk is being recorded, "late" sends its request
                late_client.send(b"127.0.0.1:15000\n")
                sent.append(True)

        r.on_expire = on_expire
        await trio.sleep(10.0)
        r.room.close()
    kinds = [(kind, t, len(names)) for kind, t, names in r.log]
    assert kinds == [
        ("expire", 5.0, EXPIRE_CHUNK),
        ("ready", 5.0, 1),  # dispatched between two chunks, not after the whole wave
        ("expire", 5.0, EXPIRE_CHUNK),
        ("expire", 5.0, 5),
    ]
    expired = [name for kind, _, names in r.log if kind == "expire" for name in names]
    assert expired == [f"s{i}" for i in range(n)]  # oldest first, each exactly once


async def test_a_reused_descriptor_is_not_expired_on_its_predecessors_deadline(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room(read_deadline=5.0)
    a, a_client = pair(pairs)
    a_client.send(b"x")
    r.add("a", a)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(1.0)  # "a" left at t=0 and was closed: its number is free again
        b, _ = pair(pairs)
        r.add("b", b)
        await trio.sleep(10.0)
        r.room.close()
    assert r.log == [("ready", 0.0, ["a"]), ("expire", 6.0, ["b"])]


async def test_drain_waits_for_the_room_to_empty_and_cancel_drops_the_rest(
    autojump_clock: trio.testing.MockClock, pairs: list
) -> None:
    r = Room(read_deadline=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(r.run)
        await trio.sleep(1.0)
        r.room.close()  # empty: run() returns at once
    assert trio.current_time() == 1.0 and r.log == []

    r = Room(read_deadline=5.0)
    r.add("a", pair(pairs)[0])  # at t=1
    with trio.move_on_after(2.0):  # the grace period ends before a's deadline
        r.room.close()
        await r.run()
    assert r.log == [("drop", 3.0, ["a"])]

    r = Room(read_deadline=5.0)
    r.add("b", pair(pairs)[0])  # at t=3
    r.room.close()
    await r.run()  # closed but not empty: b is expired normally at its deadline, then it returns
    assert r.log == [("expire", 8.0, ["b"])]
