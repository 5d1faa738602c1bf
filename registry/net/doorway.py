"""The edge of the front door: answer refused connections without a task each.

``registry/defense/door.py`` decides; this module owns the sockets. A refused
connection is held for a while (``refusal_delay``, doubling for each
further refusal of the same source up to ``max_refusal_delay``), then
answered with one line by a non-blocking write (a short line always fits a
fresh socket's empty send buffer), closed with FIN, and forgotten. One
reaper task serves every held connection, so a flood still costs no task or
timer per connection.

Why wait before answering:

- A refusal that comes back at once invites a closed-loop client (a script
  retrying in a loop, or an attacker keeping N connections busy) to come
  straight back: answered in ~0.1 ms, a 64-connection flood from one source
  ran at ~4,500 connections a second, and 5,000 stalls that reconnect a
  second after each answer kept the attacker's own core busy as well as a
  third of ours. Held, a loop of N connections makes at most N attempts per
  delay (docs/benchmarks.md). The first delays are small next to the
  ``retry_after`` they announce, so a student retrying by hand loses little.
- By then the client's request has arrived: it is read before the answer
  (it tells a JSON client from a text one) and nothing is left unread at
  close. Closing a socket with unread data, or one that data reaches later,
  makes the kernel send RST, and some TCP stacks discard a reply still unread
  when the RST lands: the student would see "connection reset" instead of
  "BUSY rate_limited retry_after=...".

Held connections are bounded (``max_held``): beyond it the one due soonest is
answered at once, so the delay never costs more than ``max_held`` descriptors.
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
    """Refused connections: held a while, then answered and closed.

    A source's first refusal waits ``delay``; each further one in the same
    refusal window (``RefusalTally``) waits twice as long as the one before,
    up to ``max_delay``: a student retrying by hand waits 0.5, 1, 2 s; a
    loop is held ``max_delay`` each time, and makes that few attempts.
    """

    def __init__(self, delay: float = 0.5, max_delay: float = 5.0, max_held: int = 8192) -> None:
        self.delay, self.max_delay, self.max_held = delay, max_delay, max_held
        self._held: list[tuple[float, int, socket.socket, Outcome]] = []  # a heap by deadline
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
        self, conn: socket.socket, outcome: Outcome, now: float, delay: float | None = None
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
            _, _, conn, outcome = heapq.heappop(self._held)
            _answer(conn, outcome)
            n += 1
        return n

    def answer_all(self) -> None:
        """Answer everything held now (shutdown: nobody is left waiting)."""
        while self._held:
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
            _, _, conn, outcome = heapq.heappop(self._held)
            _answer(conn, outcome)


def _answer(conn: socket.socket, outcome: Outcome) -> None:
    """Read what the client sent (it tells JSON from text), answer in kind, close."""
    first = b""
    try:
        while len(first) < READ_LIMIT and (chunk := conn.recv(4096, socket.MSG_DONTWAIT)):
            first += chunk
    except OSError:  # BlockingIOError: nothing (more) sent; or the peer reset
        pass
    try:
        conn.send(_reply(sniff(first) if first else Protocol.TEXT, outcome), socket.MSG_DONTWAIT)
    except OSError:  # the client is gone: nobody to tell
        pass
    conn.close()  # nothing unread: FIN, not RST


def send_and_close(conn: socket.socket, line: bytes) -> None:
    """Write one reply line, FIN, read what the client sent, close. Never raises.

    For sockets with no task: the line always fits a fresh socket's empty send
    buffer, so one non-blocking send takes it whole. FIN goes out before the
    close so that a client's late bytes, which make the kernel answer RST,
    arrive after our reply and EOF (Linux clients then still read both), and
    whatever the client sent is read first so close() itself sends FIN, not RST.
    """
    try:
        conn.send(line, socket.MSG_DONTWAIT)
        conn.shutdown(socket.SHUT_WR)
    except OSError:  # the client is gone: nobody to tell
        pass
    got = 0
    try:
        while got < READ_LIMIT and (chunk := conn.recv(4096, socket.MSG_DONTWAIT)):
            got += len(chunk)
    except OSError:  # BlockingIOError: nothing (more) sent; or reset
        pass
    conn.close()


@functools.lru_cache(maxsize=256)
def _reply(protocol: Protocol, outcome: Outcome) -> bytes:
    # The same few refusals repeat thousands of times a second under a flood.
    return default_encode(protocol, outcome)
