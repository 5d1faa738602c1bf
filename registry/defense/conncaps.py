"""Concurrency caps (SPEC policy promise 5): pure, synchronous bookkeeping.

The edge calls ``ConnectionCaps.acquire`` when it accepts a registration
connection and ``release`` when it closes, and asks ``CallbackSlots.admit``
before queueing a callback and ``done`` after it. Waiting is the trio layer's
(``trio.CapacityLimiter``); these decide admission and keep the numbers
metrics report. ``ConnectionCaps`` holds a source only while it has an open
connection: never more than ``max_total`` keys, whatever the spray.
"""

from __future__ import annotations

TOTAL = "total"
PER_SOURCE = "per_source"


class ConnectionCaps:
    """Open registration connections, capped in total and per source (``source_of``: one
    IPv6 host cannot dodge the per-source cap by rotating through its /64)."""

    __slots__ = ("_counts", "total", "max_total", "max_per_source")

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self._counts: dict[int, int] = {}
        self.total = 0  # connections admitted now
        self.reconfigure(max_total, max_per_source)

    def acquire(self, source: int) -> str | None:
        """Admit one connection: None when admitted, else the reason TOTAL or PER_SOURCE.
        A refused connection holds nothing and must not be released."""
        if self.total >= self.max_total:
            return TOTAL
        held = self._counts.get(source, 0)
        if held >= self.max_per_source:
            return PER_SOURCE
        self._counts[source] = held + 1
        self.total += 1
        return None

    def release(self, source: int) -> None:
        """Give back one admitted connection. An unknown key is ignored (never negative)."""
        held = self._counts.pop(source, 0)  # a source is kept only while it holds one
        if held:
            self.total -= 1
            if held > 1:
                self._counts[source] = held - 1

    @property
    def sources(self) -> int:
        """Distinct sources with at least one open connection."""
        return len(self._counts)

    def count(self, source: int) -> int:
        """Open connections held by ``source``."""
        return self._counts.get(source, 0)

    def reconfigure(self, max_total: int, max_per_source: int) -> None:
        """SIGHUP: new caps apply to new connections; open ones are never cut (below the
        counts, new ones are refused until enough have closed)."""
        self.max_total, self.max_per_source = max_total, max_per_source


class CallbackSlots:
    """Callbacks admitted = in flight + waiting for a slot; refuse beyond both caps.

    One counter: the edge's ``trio.CapacityLimiter(max_in_flight)`` runs as many
    as it can, so ``in_flight = min(admitted, max_in_flight)`` and the rest wait;
    a callback cancelled while waiting and one that finished both call ``done()``.
    """

    __slots__ = ("admitted", "max_in_flight", "max_queue")

    def __init__(self, max_in_flight: int, max_queue: int) -> None:
        self.admitted = 0
        self.reconfigure(max_in_flight, max_queue)

    def admit(self) -> bool:
        """Reserve a place; False means every slot and queue place is taken (BUSY overloaded)."""
        if self.admitted >= self.max_in_flight + self.max_queue:
            return False
        self.admitted += 1
        return True

    def done(self) -> None:
        """Give back a place taken by ``admit()`` (finished or abandoned). Never below zero."""
        if self.admitted > 0:
            self.admitted -= 1

    @property
    def in_flight(self) -> int:
        """Callbacks that hold a slot (the CapacityLimiter's borrowed tokens, at rest)."""
        return min(self.admitted, self.max_in_flight)

    @property
    def waiting(self) -> int:
        """Admitted callbacks queued behind the in-flight ones."""
        return max(0, self.admitted - self.max_in_flight)

    def reconfigure(self, max_in_flight: int, max_queue: int) -> None:
        """SIGHUP: new caps for new admissions; the edge also sets the limiter's total_tokens."""
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
