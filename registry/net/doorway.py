"""The edge of the front door: answer refused connections without a task each.

``registry/defense/door.py`` decides; this module owns the sockets. A refused
connection is held a while (``refusal_delay``, doubling for each further
refusal of its source in the attack window, up to ``max_refusal_delay``),
then answered with one line by a non-blocking write, closed with FIN, and
forgotten; one reaper task serves them all. Held, a loop of N connections
makes at most N attempts per delay, and the client's request has arrived by
then: it is read first (JSON or text) so that nothing unread turns the close
into an RST that could destroy the reply (docs/limits.md, "The door"). At
most ``max_held`` are held: beyond it the one due soonest is answered at once.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import socket

import trio

from registry.model import Outcome, Protocol
from registry.net.tcp import default_encode
from registry.protocol.reader import sniff

READ_LIMIT = 65536  # bytes read from a refused client before answering anyway
REAP_CHUNK = 8  # refusals answered between two checkpoints (~35 us each: ~0.3 ms)


class Doorway:
    """Refused connections: held a while (``delay_for``), then answered and closed."""

    def __init__(self, delay: float = 0.5, max_delay: float = 5.0, max_held: int = 8192) -> None:
        self.delay, self.max_delay, self.max_held = delay, max_delay, max_held
        self._held: list[tuple[float, int, socket.SocketType, Outcome]] = []  # a heap by deadline
        self._seq = itertools.count()
        self._wait = trio.CancelScope()  # run()'s sleep: refuse() moves its deadline

    @property
    def held(self) -> int:
        return len(self._held)

    def delay_for(self, repeat: int) -> float:
        """The wait for a source's ``repeat``-th refusal in the current window (1, 2...)."""
        if self.delay <= 0:
            return 0.0
        return min(self.max_delay, self.delay * 2 ** min(max(repeat, 1) - 1, 30))

    def reconfigure(self, delay: float, max_delay: float, max_held: int) -> None:
        """SIGHUP: new values apply to new refusals (and the bound at once)."""
        self.delay, self.max_delay, self.max_held = delay, max_delay, max_held
        self._trim()

    def refuse(
        self, conn: socket.SocketType, outcome: Outcome, now: float, delay: float | None = None
    ) -> None:
        """Take over ``conn``: answered with ``outcome`` at ``now + delay``. Never raises."""
        delay = self.delay if delay is None else delay
        if delay <= 0 or self.max_held <= 0:
            _answer(conn, outcome)
            return
        heapq.heappush(self._held, (now + delay, next(self._seq), conn, outcome))
        self._wait.deadline = min(self._wait.deadline, now + delay)
        self._trim()

    def reap(self, now: float, limit: int = REAP_CHUNK) -> int:
        """Answer and close held connections whose time has come, at most ``limit``;
        return how many."""
        n = 0
        while n < limit and self._held and self._held[0][0] <= now:
            self._answer_soonest()
            n += 1
        return n

    def answer_all(self) -> None:
        """Answer everything held now (shutdown: nobody is left waiting)."""
        while self._held:
            self._answer_soonest()

    def _answer_soonest(self) -> None:
        _, _, conn, outcome = heapq.heappop(self._held)
        _answer(conn, outcome)

    async def run(self) -> None:
        """Reap until cancelled; then answer whatever is still held."""
        try:
            while True:
                soonest = self._held[0][0] if self._held else math.inf
                with trio.CancelScope(deadline=soonest) as self._wait:
                    await trio.sleep_forever()
                # Refusals that arrived together fall due together: answer them a
                # chunk at a time, letting every other task run in between.
                while self.reap(trio.current_time()) == REAP_CHUNK:
                    await trio.lowlevel.checkpoint()
        finally:
            self.answer_all()

    def _trim(self) -> None:
        while len(self._held) > self.max_held:  # the soonest due goes first
            self._answer_soonest()


def _answer(conn: socket.SocketType, outcome: Outcome) -> None:
    """Read what the client sent (it tells JSON from text), answer in kind, close."""
    first = _read(conn)
    try:
        conn.send(_reply(sniff(first) if first else Protocol.TEXT, outcome), socket.MSG_DONTWAIT)
    except OSError:  # the client is gone: nobody to tell
        pass
    conn.close()  # nothing unread: FIN, not RST


def send_and_close(conn: socket.SocketType, line: bytes) -> None:
    """Write one reply line, FIN, read what the client sent, close. Never raises.

    For sockets with no task: the line always fits a fresh socket's empty send
    buffer. FIN goes out before the close so that a client's late bytes (which
    make the kernel answer RST) arrive after our reply and EOF, and what the
    client sent is read first so close() itself sends FIN, not RST.
    """
    try:
        conn.send(line, socket.MSG_DONTWAIT)
        conn.shutdown(socket.SHUT_WR)
    except OSError:  # the client is gone: nobody to tell
        pass
    _read(conn)
    conn.close()


def _read(conn: socket.SocketType) -> bytes:
    """What the client has sent, up to READ_LIMIT, without waiting."""
    got = b""
    try:
        while len(got) < READ_LIMIT and (chunk := conn.recv(4096, socket.MSG_DONTWAIT)):
            got += chunk
    except OSError:  # BlockingIOError: nothing (more) sent; or the peer reset
        pass
    return got


@functools.lru_cache(maxsize=256)
def _reply(protocol: Protocol, outcome: Outcome) -> bytes:
    # The same few refusals repeat thousands of times a second under a flood.
    return default_encode(protocol, outcome)
