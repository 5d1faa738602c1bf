"""Silent connections under attack: when to have the kernel keep them to itself.

Pure (``now`` is passed in). A connection that sends nothing before its read
deadline is a stall; one now and then is a student's broken client, many in
the attack window are an attack that costs an ``accept()`` and a refusal each
while students queue behind it. Past ``after`` of them in the window,
``SilentGuard`` switches on for ``duration`` seconds, and the listeners' filter
(registry/net/kernel/) drops every bare handshake ACK: only a client's first
bytes (or FIN) make a connection (docs/limits.md, "Silent drop").
"""

from __future__ import annotations

import math

from registry.defense.window import Window

SILENT_CONNECTIONS = "silent_connections"  # its count in the window


class SilentGuard:
    """Counts silent connections in ``window``; says when dropping them in the kernel starts."""

    def __init__(self, after: int, duration: float, window: Window | None = None) -> None:
        self.after, self.duration = after, duration
        self.window = window or Window()
        self.until = -math.inf  # dropping is on while now < until
        self.switched_on = 0  # times it went from off to on (a metric)

    def active(self, now: float) -> bool:
        return now < self.until

    def note(self, now: float, n: int = 1) -> bool:
        """Count ``n`` silent connections at ``now``; True when this switches it on.
        More while it is on extend it."""
        if self.after <= 0 or n <= 0 or self.window.count(SILENT_CONNECTIONS, n) < self.after:
            return False
        self.window.forget(SILENT_CONNECTIONS)
        was_on, self.until = self.active(now), now + self.duration
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
