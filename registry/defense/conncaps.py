"""Concurrency caps (SPEC policy promise 5): pure, synchronous bookkeeping.

The edge calls ``ConnectionCaps.acquire`` when it accepts a registration
connection and ``release`` when that connection closes (in a ``finally``), and
asks ``CallbackSlots.admit`` before queueing a callback and ``done`` after it.
Nothing here waits or touches a socket: the trio layer owns waiting
(``trio.CapacityLimiter``); these classes only decide admission and keep the
numbers that metrics report.

Memory is bounded by construction: ``ConnectionCaps`` holds a key only while
that source has an open connection, so it never holds more than ``max_total``
keys, whatever the number of distinct sources.
"""

from __future__ import annotations

from collections.abc import Hashable

from registry.errors import ConfigError

TOTAL = "total"
PER_SOURCE = "per_source"


def _check_limits(**limits: int) -> None:
    problems = [
        f"limits.{k}: expected a non-negative integer, got {v}" for k, v in limits.items() if v < 0
    ]
    if problems:
        raise ConfigError(problems)


class ConnectionCaps:
    """Open registration connections, capped in total and per source key.

    Use the rate limiter's ``source_key`` (IPv6 aggregated per prefix) as the key,
    so one host cannot dodge the per-source cap by rotating through its /64.
    """

    __slots__ = ("_counts", "_total", "_max_total", "_max_per_source")

    def __init__(self, max_total: int, max_per_source: int) -> None:
        _check_limits(max_connections=max_total, max_connections_per_source=max_per_source)
        self._counts: dict[Hashable, int] = {}
        self._total = 0
        self._max_total = max_total
        self._max_per_source = max_per_source

    def acquire(self, source_key: Hashable) -> str | None:
        """Admit one connection: None when admitted, else the reason "total" or "per_source".

        A refused connection holds nothing and must not be released.
        """
        if self._total >= self._max_total:
            return TOTAL
        held = self._counts.get(source_key, 0)
        if held >= self._max_per_source:
            return PER_SOURCE
        self._counts[source_key] = held + 1
        self._total += 1
        return None

    def release(self, source_key: Hashable) -> None:
        """Give back one admitted connection. An unknown key is ignored (never negative)."""
        held = self._counts.get(source_key)
        if held is None:
            return
        if held <= 1:
            del self._counts[source_key]  # keys live only while connections are open
        else:
            self._counts[source_key] = held - 1
        self._total -= 1

    @property
    def total(self) -> int:
        """Connections currently admitted."""
        return self._total

    @property
    def sources(self) -> int:
        """Distinct source keys with at least one open connection."""
        return len(self._counts)

    @property
    def max_total(self) -> int:
        return self._max_total

    @property
    def max_per_source(self) -> int:
        return self._max_per_source

    def count(self, source_key: Hashable) -> int:
        """Open connections held by ``source_key``."""
        return self._counts.get(source_key, 0)

    def reconfigure(self, max_total: int, max_per_source: int) -> None:
        """SIGHUP: new caps apply to new connections; open ones are never cut.

        If the new caps are below the current counts, new connections are
        refused until enough of the open ones close.
        """
        _check_limits(max_connections=max_total, max_connections_per_source=max_per_source)
        self._max_total = max_total
        self._max_per_source = max_per_source


class CallbackSlots:
    """Callbacks admitted = in flight + waiting for a slot; refuse beyond both caps.

    One counter, not two: the edge's ``trio.CapacityLimiter(max_in_flight)``
    decides which admitted callback actually runs, and since it runs as many as
    it can, ``in_flight = min(admitted, max_in_flight)`` and the rest wait. A
    callback that is cancelled while waiting and one that finishes both call
    ``done()``, so the count cannot drift between two fields.
    """

    __slots__ = ("_admitted", "_max_in_flight", "_max_queue")

    def __init__(self, max_in_flight: int, max_queue: int) -> None:
        _check_limits(max_callbacks_in_flight=max_in_flight, max_callback_queue=max_queue)
        self._admitted = 0
        self._max_in_flight = max_in_flight
        self._max_queue = max_queue

    def admit(self) -> bool:
        """Reserve a place; False means every slot and queue place is taken (BUSY overloaded)."""
        if self._admitted >= self._max_in_flight + self._max_queue:
            return False
        self._admitted += 1
        return True

    def done(self) -> None:
        """Give back a place taken by ``admit()`` (finished or abandoned). Never below zero."""
        if self._admitted > 0:
            self._admitted -= 1

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def in_flight(self) -> int:
        """Callbacks that hold a slot (the CapacityLimiter's borrowed tokens, at rest)."""
        return min(self._admitted, self._max_in_flight)

    @property
    def waiting(self) -> int:
        """Admitted callbacks queued behind the in-flight ones."""
        return max(0, self._admitted - self._max_in_flight)

    @property
    def max_in_flight(self) -> int:
        return self._max_in_flight

    @property
    def max_queue(self) -> int:
        return self._max_queue

    def reconfigure(self, max_in_flight: int, max_queue: int) -> None:
        """SIGHUP: new caps for new admissions; the edge also sets the limiter's total_tokens."""
        _check_limits(max_callbacks_in_flight=max_in_flight, max_callback_queue=max_queue)
        self._max_in_flight = max_in_flight
        self._max_queue = max_queue
