"""The attack window: what the defences count, in one clock; and the silent drop. Pure.

One ``Window`` of ``WINDOW_S`` seconds, rolled by the edge's one timer (``flush``, which
also writes the window's ``door_refusals`` log line). A count is the window's and the one
before's, so a burst that straddles a roll still adds up (docs/limits.md, "Bans"). Counted
in it: door refusals per reason and per source (the doubling hold, ``BanList``) and silent
connections (no byte before the read deadline): past ``after`` of them ``SilentGuard`` has
the listeners' filter drop bare handshake ACKs a while (docs/limits.md, "Silent drop").
"""

from __future__ import annotations

import math
from collections import Counter

from registry.defense.door import REASONS
from registry.defense.ratelimit import source_network

WINDOW_S = 10.0


class Window:
    """Counts of this window and the one before, and refusal totals since start.

    Per-source counts hold at most ``max_sources`` keys (~150 bytes each, two
    windows: ~3 MB), so a spray from a million addresses costs a bounded dict;
    sources beyond it are counted as ``untracked``, and as new ones. The cap is
    high because repeats drive the holds and bans: with 1,000, 4,000 of 5,000
    attacking addresses stayed "new", never banned.
    """

    def __init__(self, max_sources: int = 10_000) -> None:
        self.max_sources = max_sources
        self.totals: dict[str, int] = dict.fromkeys(REASONS, 0)  # only grow: metrics
        self._counts: Counter[str] = Counter()  # this window, by name (refusal reasons...)
        self._sources: Counter[tuple[int, str]] = Counter()  # (source, reason)
        self._before: tuple[Counter[str], Counter[tuple[int, str]]] = (Counter(), Counter())
        self._untracked = 0

    def count(self, name: str, n: int = 1) -> int:
        """Count ``n`` of ``name``; return its count in this window and the one before."""
        self._counts[name] += n
        return self._counts[name] + self._before[0][name]

    def forget(self, name: str) -> None:
        """Start ``name``'s count again from zero."""
        self._counts.pop(name, None)
        self._before[0].pop(name, None)

    def add(self, source: int, reason: str) -> int:
        """Count one door refusal of ``source`` (``source_of``); return how many it has had
        for ``reason`` in this window and the one before (1 for an untracked source)."""
        self.totals[reason] += 1
        self.count(reason)
        key = (source, reason)
        if key in self._sources or len(self._sources) < self.max_sources:
            self._sources[key] += 1
            return self._sources[key] + self._before[1][key]
        self._untracked += 1
        return 1

    def flush(self, top: int = 10) -> dict[str, object] | None:
        """Roll: the refusals' summary of the window (None when nothing was refused)."""
        by_reason = {r: self._counts[r] for r in REASONS if self._counts[r]}
        summary: dict[str, object] | None = None
        if by_reason:
            summary = {
                "refused": sum(by_reason.values()),
                "by_reason": by_reason,
                "sources": len({source for source, _ in self._sources}),
                "top": [
                    [str(source_network(s)), r, n] for (s, r), n in self._sources.most_common(top)
                ],
                "untracked": self._untracked,  # refusals from sources past max_sources
            }
        self._before = (self._counts, self._sources)
        self._counts, self._sources, self._untracked = Counter(), Counter(), 0
        return summary


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
