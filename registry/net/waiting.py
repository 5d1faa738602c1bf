"""The waiting room: admitted connections whose request has not arrived yet.

A connection the door admits does not get a task straight away. It waits
here, in one epoll set owned by one task, which reads what arrives
(non-blocking), frames it with the same sans-io receivers and under the same
rules as ``tcp.read_request`` (LF, EOF, the quiet period, the size cap, the
total read deadline counted from ``accept()``), and only then decides:

- a complete request leaves through ``ready``: it gets its task and the TCP
  handler, which registers it and replies;
- a protocol error (malformed, too long, bad JSON, closed before a byte,
  nothing in time) leaves through ``reject``, together with every other one
  due at the same moment: their outcomes are recorded in one store batch, in
  chunks of ``REJECT_CHUNK``, each with its own id, row and log line before
  its reply (SPEC promise 6), and with no task, stream, cancel scope or timer
  of its own.

Why: junk and stalls would cost a task, timers and a full pass through the
handler each (~1 ms of CPU). A thousand stalls that connect together expire
together, and a thousand one-byte requests are framed together by the quiet
period; such a wave kept the event loop busy long enough to delay every
honest student behind it (docs/benchmarks.md). Between two chunks of a wave
the room reads the connections that did send, so a student's request does not
wait for the wave to be recorded.

Linux only (``select.epoll``); elsewhere ``WaitingRoom.supported()`` is
false and the server gives every connection its task at once, as before.
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
from registry.net.tcp import (
    ReceiverFactory,
    closed_early_error,
    default_receiver,
    next_conn_id,
    read_timeout_error,
)
from registry.protocol.jsonl import JsonReceiver
from registry.protocol.sniff import sniff
from registry.protocol.text import NeedData, TextReceiver

# Short steps (docs/architecture.md): each bounds the work between two checkpoints.
REJECT_CHUNK = 16  # refused requests recorded in one store batch, then answered
BATCH = 16  # connections read, or deadlines handled, between two checkpoints (~20 us each)
_EVENTS = select.EPOLLIN | select.EPOLLRDHUP if hasattr(select, "epoll") else 0
_seq = itertools.count()


@dataclass(slots=True, eq=False)
class Waiting:
    """One admitted connection, its door slot (``key``) and its admission ``token``."""

    conn: socket.socket
    peer: Endpoint
    key: Hashable
    token: object
    arrived: float  # trio clock
    received_at: float = field(default_factory=time.time)  # wall clock, for the record
    conn_id: int = field(default_factory=next_conn_id)
    receiver: TextReceiver | JsonReceiver | None = None
    protocol: Protocol = Protocol.TEXT
    quiet_at: float = math.inf  # when the quiet period frames what is buffered
    deadline: float = math.inf  # the total read deadline (set by WaitingRoom.add)


Ready = Callable[[Waiting, Protocol, Request], None]
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

    def __init__(
        self,
        config: Callable[[], ProtocolConfig],
        make_receiver: ReceiverFactory = default_receiver,
    ) -> None:
        self.config = config  # read per connection: SIGHUP may change the deadlines
        self.make_receiver = make_receiver
        self._epoll = select.epoll()
        self._by_fd: dict[int, Waiting] = {}
        # Heaps, not arrival order: a reload that shortens read_deadline, or a connection
        # the kernel held (arrived = now - held), is due before earlier arrivals.
        self._deadlines: list[tuple[float, int, Waiting]] = []  # stale entries skipped
        self._quiet: list[tuple[float, int, Waiting]] = []  # heap; stale entries skipped
        self._closing = False
        self._wait = trio.CancelScope()  # run()'s current wait: add/close move its deadline

    def __len__(self) -> int:
        return len(self._by_fd)

    def add(self, w: Waiting) -> None:
        fd = w.conn.fileno()
        self._epoll.register(fd, _EVENTS)
        self._by_fd[fd] = w
        w.deadline = w.arrived + self.config().read_deadline
        heapq.heappush(self._deadlines, (w.deadline, next(_seq), w))
        if w.deadline < self._wait.deadline:  # moving a deadline costs trio real work:
            self._wait.deadline = w.deadline  # only when run() must wake earlier

    def close(self) -> None:
        """Drain: no new arrivals; ``run`` returns once the room is empty."""
        self._closing = True
        self._wait.cancel()

    async def run(self, ready: Ready, reject: Reject, drop: Callable[[Waiting], None]) -> None:
        """Until closed and empty, or cancelled (the grace period is over)."""
        try:
            while self._by_fd or not self._closing:
                with trio.CancelScope(deadline=self._next_deadline()) as self._wait:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                failed = self._read(ready)
                failed += self._due(ready, trio.current_time())
                while failed:
                    chunk, failed = failed[:REJECT_CHUNK], failed[REJECT_CHUNK:]
                    await reject(chunk)
                    # Between two chunks of a wave, the connections that did send are
                    # read: a student's request does not wait for the wave's records.
                    failed += self._read(ready)
        finally:
            for w in self._by_fd.values():
                drop(w)
            self._by_fd.clear()
            self._deadlines.clear()
            self._quiet.clear()
            self._epoll.close()

    # --- reading ---------------------------------------------------------------------

    def _read(self, ready: Ready) -> list[tuple[Waiting, ProtocolError]]:
        """Read every connection with something to read; hand over what is decided."""
        failed = []
        now = trio.current_time()
        for fd, _ in self._epoll.poll(0, BATCH):
            w = self._by_fd.get(fd)
            if w is None:
                continue
            try:
                result = self._feed(w, now)
            except ProtocolError as e:
                self._leave(w)
                # kept without its traceback: its frames hold `failed`, a cycle only gc frees
                failed.append((w, e.with_traceback(None)))
                continue
            if result is not None:
                self._leave(w)
                ready(w, w.protocol, result)
        return failed

    def _feed(self, w: Waiting, now: float) -> Request | None:
        """One non-blocking read into ``w``'s receiver: the request, None for "not
        yet", or ProtocolError (as read_request decides it)."""
        try:
            data = w.conn.recv(4096, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError:  # reset by the peer: it has closed
            data = b""
        if w.receiver is None:
            if not data:
                raise closed_early_error()
            w.protocol = sniff(data)
            w.receiver = self.make_receiver(w.protocol, self.config())
        w.receiver.receive_data(data)
        event = w.receiver.next_event()
        if isinstance(event, NeedData):
            if w.receiver.buffered:  # a new byte restarts the quiet period
                w.quiet_at = now + self.config().quiet_period
                heapq.heappush(self._quiet, (w.quiet_at, next(_seq), w))
            return None
        return event

    # --- deadlines -------------------------------------------------------------------

    def _due(self, ready: Ready, now: float) -> list[tuple[Waiting, ProtocolError]]:
        """Quiet periods that ended (framing what is buffered) and read deadlines passed."""
        failed: list[tuple[Waiting, ProtocolError]] = []
        budget = BATCH  # the rest is due already: run() comes straight back for it
        while budget and self._quiet and self._quiet[0][0] <= now:
            budget -= 1
            at, _, w = heapq.heappop(self._quiet)
            if not self._waiting(w) or at != w.quiet_at or w.receiver is None:
                continue  # gone, or a later byte moved its quiet period
            if at >= w.deadline:
                continue  # as in read_request: the total deadline wins a tie
            w.quiet_at = math.inf
            try:
                event = w.receiver.quiet()
            except ProtocolError as e:
                self._leave(w)
                failed.append((w, e.with_traceback(None)))
                continue
            if not isinstance(event, NeedData):
                self._leave(w)
                ready(w, w.protocol, event)
        while budget and self._deadlines and self._deadlines[0][0] <= now:
            budget -= 1
            _, _, w = heapq.heappop(self._deadlines)
            if self._waiting(w):
                self._leave(w)
                failed.append((w, read_timeout_error(self.config(), w.receiver is not None)))
        return failed

    def _next_deadline(self) -> float:
        while self._deadlines and not self._waiting(self._deadlines[0][2]):
            heapq.heappop(self._deadlines)  # left already
        while self._quiet and (
            not self._waiting(self._quiet[0][2]) or self._quiet[0][0] != self._quiet[0][2].quiet_at
        ):
            heapq.heappop(self._quiet)
        soonest = min(
            self._deadlines[0][0] if self._deadlines else math.inf,
            self._quiet[0][0] if self._quiet else math.inf,
        )
        if self._closing and not self._by_fd:
            return -math.inf
        return soonest

    def _waiting(self, w: Waiting) -> bool:
        return self._by_fd.get(w.conn.fileno()) is w

    def _leave(self, w: Waiting) -> None:
        fd = w.conn.fileno()
        del self._by_fd[fd]
        self._epoll.unregister(fd)
        w.quiet_at = math.inf
