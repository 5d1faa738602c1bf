"""The waiting room: admitted connections that have not sent a byte yet.

A connection the door admits does not get a task straight away. It waits
here, in one epoll set owned by one task, until its first byte (or EOF)
arrives; only then does it get a task and a handler, whose read deadline
still counts from the moment it was accepted. Connections that send nothing
until ``protocol.read_deadline`` are expired here, together, in one store
batch: each still gets its own ``ERROR read_timeout`` row, log line and
reply, in that order (SPEC promise 6), but no task, stream, cancel scope or
timer of its own.

Why: a stalled connection used to cost a task, a timer and, at the
deadline, a full pass through the handler (~1 ms of CPU). Stalls that
connect together expire together, and a wave of a thousand expiries kept
the event loop busy long enough to delay every honest student behind it
(docs/benchmarks.md). Here 5,000 stalls cost 5,000 epoll registrations and
5,000 small objects, and their expiry is processed ``EXPIRE_CHUNK`` at a
time; between two chunks, connections that did send are dispatched, so
honest work interleaves with the wave.

Linux only (``select.epoll``); elsewhere ``WaitingRoom.supported()`` is
false and the server gives every connection its task at once, as before.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field

import structlog
import trio

from registry.model import Endpoint

log = structlog.get_logger(component="waiting")

EXPIRE_CHUNK = 64  # expiries recorded in one store batch, then answered
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0


@dataclass(slots=True, eq=False)
class Waiting:
    """One admitted connection, its door slot (``key``) and its admission ``token``."""

    conn: socket.socket
    peer: Endpoint
    key: Hashable
    token: object
    arrived: float  # trio clock
    received_at: float = field(default_factory=time.time)  # wall clock, for the record


class WaitingRoom:
    """Connections waiting for their first byte; each leaves through ``ready`` or ``expire``.

    ``ready(w)`` (synchronous) takes over a connection that has data or EOF;
    ``expire(batch)`` takes over connections whose read deadline has passed;
    ``drop(w)`` (synchronous) gets whatever is still waiting when ``run`` is
    cancelled. Each owns the socket and its slot from then on.
    """

    @staticmethod
    def supported() -> bool:
        return hasattr(select, "epoll")

    def __init__(self, read_deadline: Callable[[], float]) -> None:
        self.read_deadline = read_deadline  # read per connection: SIGHUP may change it
        self._epoll = select.epoll()
        self._by_fd: dict[int, Waiting] = {}
        self._queue: deque[tuple[float, Waiting]] = deque()  # by deadline
        self._closing = False
        self._wait = trio.CancelScope()  # run()'s current wait: add/close move its deadline

    def __len__(self) -> int:
        return len(self._by_fd)

    def add(self, w: Waiting) -> None:
        fd = w.conn.fileno()
        self._epoll.register(fd, _EVENTS)
        self._by_fd[fd] = w
        deadline = w.arrived + self.read_deadline()
        self._queue.append((deadline, w))
        self._wait.deadline = min(self._wait.deadline, deadline)

    def close(self) -> None:
        """Drain: no new arrivals; ``run`` returns once the room is empty."""
        self._closing = True
        self._wait.cancel()

    async def run(
        self,
        ready: Callable[[Waiting], None],
        expire: Callable[[list[Waiting]], Awaitable[None]],
        drop: Callable[[Waiting], None],
    ) -> None:
        """Until closed and empty, or cancelled (the grace period is over)."""
        try:
            while self._by_fd or not self._closing:
                with trio.CancelScope(deadline=self._next_deadline()) as self._wait:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                self._dispatch(ready)
                due = self._take_due(trio.current_time())
                while due:
                    chunk, due = due[:EXPIRE_CHUNK], due[EXPIRE_CHUNK:]
                    await expire(chunk)
                    # Between chunks of a wave, connections that did send get their task
                    # at once: nobody waits for the whole wave to be recorded.
                    self._dispatch(ready)
        finally:
            for w in self._by_fd.values():
                drop(w)
            self._by_fd.clear()
            self._queue.clear()
            self._epoll.close()

    def _dispatch(self, ready: Callable[[Waiting], None]) -> None:
        for fd, _ in self._epoll.poll(0, 256):
            w = self._by_fd.pop(fd, None)
            if w is not None:
                self._epoll.unregister(fd)
                ready(w)

    def _next_deadline(self) -> float:
        while self._queue and not self._still_waiting(self._queue[0][1]):
            self._queue.popleft()  # left through ready() already
        if self._closing:
            return -math.inf if not self._by_fd else self._queue[0][0]
        return self._queue[0][0] if self._queue else math.inf

    def _still_waiting(self, w: Waiting) -> bool:
        return self._by_fd.get(w.conn.fileno()) is w

    def _take_due(self, now: float) -> list[Waiting]:
        due = []
        while self._queue and self._queue[0][0] <= now:
            _, w = self._queue.popleft()
            if self._still_waiting(w):
                fd = w.conn.fileno()
                del self._by_fd[fd]
                self._epoll.unregister(fd)
                due.append(w)
        return due
