"""Silent connections under attack: when to have the kernel keep them to itself.

Pure (``now`` is passed in). A connection that sends nothing before its read
deadline is a stall (the lab's clients send at once). One now and then is a
student's broken client, and is told ``ERROR read_timeout``. Many within a
short window are an attack: thousands that connected together are handed to
the registry together (``TCP_DEFER_ACCEPT`` ends for all of them at once, or a
full backlog lets them in by SYN cookie), and each costs an ``accept()`` and a
refusal in Python while honest students queue behind them in the kernel's
accept queue (docs/benchmarks.md).

Past ``after`` silent connections within one ``WINDOW_S`` window,
``SilentGuard`` switches on for ``duration`` seconds, and the edge
(registry/net/kernel/banfilter.py) puts the bare-ACK rule (SILENT_DROP, net/kernel/bpf.py) in the listeners'
filter: the kernel drops every bare handshake ACK, so a connection is made
only by its client's first bytes (or its FIN). A client that sends at once
does not notice; a silent one is never accepted, never answered, and
forgotten by the kernel when its SYN-ACK retries run out. The price, while
it is on: a client that connects and waits to be spoken to first hangs
instead of being told ``read_timeout``. Silent connections that still reach
the registry while it is on (a filter the kernel refused) extend it.
"""

from __future__ import annotations

import math

from registry.defense.tally import WINDOW_S


class SilentGuard:
    """Counts silent connections; says when dropping them in the kernel starts."""

    def __init__(self, after: int, duration: float) -> None:
        self.after, self.duration = after, duration
        self.until = -math.inf  # dropping is on while now < until
        self.switched_on = 0  # times it went from off to on (a metric)
        self._window_start = -math.inf
        self._count = 0

    def active(self, now: float) -> bool:
        return now < self.until

    def note(self, now: float, n: int = 1) -> bool:
        """Count ``n`` silent connections at ``now``; True when this switches it on."""
        if self.after <= 0 or n <= 0:
            return False
        if now - self._window_start >= WINDOW_S:
            self._window_start, self._count = now, 0
        self._count += n
        if self._count < self.after:
            return False
        was_on = self.active(now)
        self.until = now + self.duration
        self._window_start, self._count = now, 0
        if was_on:
            return False
        self.switched_on += 1
        return True

    def reconfigure(self, after: int, duration: float, now: float) -> None:
        """SIGHUP: ``after`` 0 ends it at once; a shorter duration shortens it."""
        self.after, self.duration = after, duration
        if after <= 0:
            self.until = -math.inf
        elif self.active(now):
            self.until = min(self.until, now + duration)
