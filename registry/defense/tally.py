"""The attack window (``WINDOW_S``): door refusals summed per window for the log
and metrics, and a source's repeats within it, which drive the doorway's
doubling hold and the bans; silent connections within it switch on the silent
drop (silence.py). Pure."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable

from registry.defense.door import REASONS

WINDOW_S = 10.0  # one attack window: a refusal summary line, and the span repeats count in


class RefusalTally:
    """Door refusals counted in aggregate: totals for metrics, a window for the log.

    ``totals`` only grows (a Prometheus counter per reason). The window counts
    per source between two ``flush()`` calls and holds at most ``max_sources``
    keys, so a spray from a million addresses costs a bounded dict: sources
    beyond the cap are still counted, as ``untracked``. A source's repeats
    (``add``'s result, which drives holds and bans) count this window and the
    one before.
    """

    def __init__(self, max_sources: int = 10_000) -> None:
        # Repeats drive the doubling hold and bans, so an attack from thousands of
        # addresses must be tracked too (with 1,000, 4,000 of 5,000 attacking
        # addresses stayed "new": always the shortest hold, never banned).
        # ~150 bytes an entry, two windows: ~3 MB at the cap.
        self.max_sources = max_sources
        self.totals: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._window: Counter[tuple[Hashable, str]] = Counter()
        # The window before: a source's repeats count across a flush, so three
        # refusals that straddle one still make three (a fixed window let a loop
        # slowed down by a busy host restart at one forever, short holds and never
        # banned: measured, an attack from 5,000 addresses).
        self._previous: Counter[tuple[Hashable, str]] = Counter()
        self._reasons: Counter[str] = Counter()
        self._others = 0

    def add(self, source: Hashable, reason: str) -> int:
        """Count one refusal of ``source`` (its ``SourceKey``, the identity the limits
        and bans use); return how many it has had for ``reason`` in this window and
        the one before (1 for a source past ``max_sources``: untracked
        sources are new ones)."""
        self.totals[reason] += 1
        self._reasons[reason] += 1
        key = (source, reason)
        if key in self._window or len(self._window) < self.max_sources:
            self._window[key] += 1
            return self._window[key] + self._previous[key]
        self._others += 1
        return 1

    def flush(self, top: int = 10) -> dict[str, object] | None:
        """The window's summary (None when nothing was refused), and a fresh window."""
        if not self._reasons:
            self._previous, self._window = self._window, Counter()  # a quiet one, before now
            return None
        summary: dict[str, object] = {
            "refused": sum(self._reasons.values()),
            "by_reason": dict(self._reasons),
            "sources": len({source for source, _ in self._window}),
            "top": [[str(s), r, n] for (s, r), n in self._window.most_common(top)],
            "untracked": self._others,  # refusals from sources past max_sources
        }
        self._previous, self._window = self._window, Counter()
        self._reasons = Counter()
        self._others = 0
        return summary
