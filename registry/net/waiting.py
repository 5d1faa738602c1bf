"""The waiting room: admitted connections whose request has not arrived yet.

One epoll set and one task feed every waiting connection's sans-io reader
(protocol/reader.py: the same rules as ``tcp.read_request``). A complete
request leaves through ``ready`` and only then gets a task; protocol errors
leave through ``reject``, a wave of them recorded in store batches of
``REJECT_CHUNK`` (each its own id, row and log line before its reply), with
no task, stream or timer of their own. Why: docs/architecture.md ("A task
only for a connection that speaks"). Linux only (``select.epoll``):
elsewhere every connection gets its task at once.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
import socket
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import trio

from registry.config import ProtocolConfig
from registry.errors import ProtocolError
from registry.model import Endpoint, Protocol, Request
from registry.net.tcp import next_conn_id
from registry.protocol.reader import Decision, RequestReader

# Short steps (docs/architecture.md): each bounds the work between two checkpoints.
REJECT_CHUNK = 16  # refused requests recorded in one store batch, then answered
BATCH = 16  # connections read, or deadlines handled, between two checkpoints (~20 us each)
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0
_seq = itertools.count()


@dataclass(slots=True, eq=False)
class Waiting:
    """One admitted connection, its door slot (``key``) and its admission ``token``."""

    conn: socket.SocketType
    peer: Endpoint
    key: Hashable
    token: object
    arrived: float  # trio clock
    received_at: float = field(default_factory=time.time)  # wall clock, for the record
    conn_id: int = field(default_factory=next_conn_id)
    local: Endpoint | None = None  # our end, known when the listener's address is one address
    reader: RequestReader = None  # type: ignore[assignment]  # set by WaitingRoom.add
    due: float = math.inf  # its reader's next deadline, as last put in the room's heap


Ready = Callable[[Waiting, Protocol, Request], None]
Serve = Callable[[Waiting, tuple[Protocol, Request]], Awaitable[None]]
Reject = Callable[[list[tuple[Waiting, ProtocolError]]], Awaitable[None]]


class WaitingRoom:
    """Connections whose request is still on its way; each leaves exactly once.

    ``ready(w, protocol, request)`` (synchronous) takes over a connection
    whose request is complete; ``reject(batch)`` takes over connections that
    failed (each with its ProtocolError); ``drop(w)`` (synchronous) gets
    whatever is still waiting when ``run`` is cancelled. Each owns the socket
    and its slot from then on.
    """

    @staticmethod
    def supported() -> bool:
        return hasattr(select, "epoll")

    def __init__(self, config: Callable[[], ProtocolConfig]) -> None:
        self.config = config  # read per connection: SIGHUP may change the deadlines
        self._epoll = select.epoll()
        self._by_fd: dict[int, Waiting] = {}
        # A heap, not arrival order: a reload that shortens read_deadline, or a connection
        # the kernel held (arrived = now - held), is due before earlier arrivals, and a
        # quiet period can end before any of them. An entry is stale once its connection
        # left or its `due` moved on.
        self._due_heap: list[tuple[float, int, Waiting]] = []
        self._closing = False
        self._wait = trio.CancelScope()  # run()'s current wait: add/close move its deadline
        self._ready: Ready | None = None  # run()'s, once it runs
        self._failed: list[tuple[Waiting, ProtocolError]] = []  # decided in add()

    def __len__(self) -> int:
        return len(self._by_fd)

    def add(self, w: Waiting) -> None:
        w.reader = RequestReader(self.config(), w.arrived)
        # Running: read what came with the connection (TCP_DEFER_ACCEPT hands most
        # over with their request).
        if self._ready is not None and (data := _recv(w.conn)) is not None:
            decision = w.reader.feed(data, trio.current_time())
            if isinstance(decision, ProtocolError):
                self._failed.append((w, decision))
                self._wait.cancel()  # run() records it with the next batch
                return
            if decision is not None:  # whole: no epoll registration, no heap entry
                self._ready(w, w.reader.protocol, decision)
                return
        fd = w.conn.fileno()
        self._epoll.register(fd, _EVENTS)
        self._by_fd[fd] = w
        self._schedule(w)
        if w.due < self._wait.deadline:  # moving a deadline costs trio real work:
            self._wait.deadline = w.due  # only when run() must wake earlier

    def close(self) -> None:
        """Drain: no new arrivals; ``run`` returns once the room is empty."""
        self._closing = True
        self._wait.cancel()

    async def run(self, ready: Ready, reject: Reject, drop: Callable[[Waiting], None]) -> None:
        """Until closed and empty, or cancelled (the grace period is over)."""
        self._ready = ready
        try:
            while self._by_fd or self._failed or not self._closing:
                with trio.CancelScope(deadline=self._next_deadline()) as self._wait:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                failed, self._failed = self._failed, []
                failed += self._read(ready)
                failed += self._due(ready, trio.current_time())
                while failed:
                    chunk, failed = failed[:REJECT_CHUNK], failed[REJECT_CHUNK:]
                    await reject(chunk)
                    # Between two chunks of a wave, the connections that did send are
                    # read: a student's request does not wait for the wave's records.
                    failed += self._read(ready)
        finally:
            self._ready = None
            for w in [*self._by_fd.values(), *(w for w, _ in self._failed)]:
                drop(w)
            self._failed.clear()
            self._by_fd.clear()
            self._due_heap.clear()
            self._epoll.close()

    async def serve(
        self,
        handlers: trio.Nursery,
        serve: Serve,
        reject: Reject,
        drop: Callable[[Waiting], None],
    ) -> None:
        """``run``, each complete request handed to ``serve(w, (protocol, request))``, a
        task in one shielded nursery that this starts in ``handlers``.

        The request is read, so its task goes straight to the registration, which
        runs shielded: one shield for all of them spares each a cancel scope of its
        own (~48k instructions, of ~1.24M a registration). Only the reply of a client
        that does not read can then outlast the grace period, by at most
        ``write_timeout``. The room itself stays cancellable: at the grace deadline
        the connections still sending are cut, and the nursery closes once the room
        is done and the registrations in it have replied.
        """
        done = trio.Event()

        async def shielded(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
            with trio.CancelScope(shield=True):
                async with trio.open_nursery() as nursery:
                    task_status.started(nursery)
                    await done.wait()

        registrations: trio.Nursery = await handlers.start(shielded)
        try:
            await self.run(
                lambda w, protocol, request: registrations.start_soon(
                    serve,
                    w,
                    (protocol, request),
                    name="registration",  # no name to format
                ),
                reject,
                drop,
            )
        finally:
            done.set()

    # --- reading and deadlines: the reader decides, the room hands over -------------

    def _read(self, ready: Ready) -> list[tuple[Waiting, ProtocolError]]:
        """Read every connection with something to read; hand over what is decided."""
        failed: list[tuple[Waiting, ProtocolError]] = []
        now = trio.current_time()
        for fd, _ in self._epoll.poll(0, BATCH):
            w = self._by_fd.get(fd)
            if w is not None and (data := _recv(w.conn)) is not None:
                self._act(w, w.reader.feed(data, now), ready, failed)
        return failed

    def _due(self, ready: Ready, now: float) -> list[tuple[Waiting, ProtocolError]]:
        """Quiet periods that ended and read deadlines passed, in the order they fell due."""
        failed: list[tuple[Waiting, ProtocolError]] = []
        heap = self._due_heap
        budget = BATCH  # the rest is due already: run() comes straight back for it
        while budget and heap and heap[0][0] <= now:
            budget -= 1
            at, _, w = heapq.heappop(heap)
            if at == w.due and self._waiting(w):
                self._act(w, w.reader.tick(now), ready, failed)
        return failed

    def _act(
        self,
        w: Waiting,
        decision: Decision,
        ready: Ready,
        failed: list[tuple[Waiting, ProtocolError]],
    ) -> None:
        """Hand over a decided connection, or keep its reader's next deadline in the heap."""
        if decision is None:
            self._schedule(w)
            return
        self._leave(w)
        if isinstance(decision, ProtocolError):
            failed.append((w, decision))
        else:
            ready(w, w.reader.protocol, decision)

    def _schedule(self, w: Waiting) -> None:
        due = w.reader.next_deadline
        if due != w.due:
            w.due = due
            heapq.heappush(self._due_heap, (due, next(_seq), w))

    def _next_deadline(self) -> float:
        heap = self._due_heap
        while heap and (heap[0][0] != heap[0][2].due or not self._waiting(heap[0][2])):
            heapq.heappop(heap)  # stale
        if self._failed or (self._closing and not self._by_fd):
            return -math.inf
        return heap[0][0] if heap else math.inf

    def _waiting(self, w: Waiting) -> bool:
        return self._by_fd.get(w.conn.fileno()) is w

    def _leave(self, w: Waiting) -> None:
        fd = w.conn.fileno()
        del self._by_fd[fd]
        self._epoll.unregister(fd)


def _recv(conn: socket.SocketType) -> bytes | None:
    """What arrived (``b""``: the peer closed, or reset), or None: nothing yet."""
    try:
        return conn.recv(4096, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    except OSError:
        return b""
