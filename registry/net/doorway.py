"""The edge of the front door: answer refused connections without a task each.

``registry/door.py`` decides; this module owns the sockets. A refused
connection is held for ``delay`` seconds, then answered with one line by a
non-blocking write (a short line always fits a fresh socket's empty send
buffer), closed with FIN, and forgotten. One reaper task serves every held
connection, so a flood still costs no task or timer per connection.

Why wait before answering:

- A refusal that comes back at once invites a closed-loop client (a script
  retrying in a loop, or an attacker keeping N requests in flight) to come
  straight back: answered in ~0.1 ms, a 64-connection flood from one source
  ran at ~4,500 connections a second. Answered after 0.5 s, the same client
  manages 128 a second (docs/benchmarks.md). The delay is small next to any
  ``retry_after`` it announces, so an honest student loses nothing.
- By then the client's request has arrived: it is read before the answer
  (it tells a JSON client from a text one) and nothing is left unread at
  close. Closing a socket with unread data, or one that data reaches later,
  makes the kernel send RST, and some TCP stacks discard a reply still unread
  when the RST lands: the student would see "connection reset" instead of
  "BUSY rate_limited retry_after=...".

Held connections are bounded (``max_held``): beyond it the oldest is answered
at once, so the delay never costs more than ``max_held`` descriptors.
"""

from __future__ import annotations

import functools
import socket
from collections import deque

import trio

from registry.model import Outcome, Protocol
from registry.net.tcp import default_encode
from registry.protocol.sniff import sniff

READ_LIMIT = 65536  # bytes read from a refused client before answering anyway


class Doorway:
    """Refused connections: held ``delay`` seconds, then answered and closed."""

    def __init__(self, delay: float = 0.5, max_held: int = 2048) -> None:
        self.delay = delay
        self.max_held = max_held
        self._held: deque[tuple[float, socket.socket, Outcome]] = deque()
        self._arrived = trio.Event()  # set when a refusal joins an empty queue

    @property
    def held(self) -> int:
        return len(self._held)

    def reconfigure(self, delay: float, max_held: int) -> None:
        """SIGHUP: new values apply to new refusals (and the bound at once)."""
        self.delay, self.max_held = delay, max_held
        while len(self._held) > self.max_held:
            _answer(*self._held.popleft()[1:])

    def refuse(self, conn: socket.socket, outcome: Outcome, now: float) -> None:
        """Take over ``conn``: it is answered with ``outcome`` at ``now + delay``. Never raises."""
        if self.delay <= 0 or self.max_held <= 0:
            _answer(conn, outcome)
            return
        if not self._held:
            self._arrived.set()
        self._held.append((now + self.delay, conn, outcome))
        while len(self._held) > self.max_held:
            _answer(*self._held.popleft()[1:])

    def reap(self, now: float) -> int:
        """Answer and close every held connection whose time has come; return how many."""
        n = 0
        while self._held and self._held[0][0] <= now:
            _answer(*self._held.popleft()[1:])
            n += 1
        return n

    def answer_all(self) -> None:
        """Answer everything held now (shutdown: nobody is left waiting)."""
        while self._held:
            _answer(*self._held.popleft()[1:])

    async def run(self) -> None:
        """Reap until cancelled; then answer whatever is still held."""
        try:
            while True:
                if not self._held:
                    await self._arrived.wait()
                    self._arrived = trio.Event()
                    continue
                await trio.sleep_until(self._held[0][0])
                self.reap(trio.current_time())
        finally:
            self.answer_all()


def _answer(conn: socket.socket, outcome: Outcome) -> None:
    """Answer in the client's protocol (sniffed from what it sent) and close."""
    try:
        first = conn.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except OSError:  # BlockingIOError: nothing sent; or the peer reset already
        first = b""
    send_and_close(conn, _reply(sniff(first) if first else Protocol.TEXT, outcome))


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
