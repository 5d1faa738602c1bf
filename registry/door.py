"""The front door: admit or refuse a TCP connection by its source address alone.

Pure and synchronous (``now`` is passed in). The edge asks ``Door.arrive`` the
moment ``accept()`` returns, before it starts a task or reads a byte:

- a source over its connection cap (``limits.max_connections_per_source``)
  is refused ``BUSY overloaded``;
- a connection the kernel kept back for its whole ``TCP_DEFER_ACCEPT`` wait
  without receiving a byte (``Door.silent``, when that wait is at least the
  read deadline) is refused ``ERROR read_timeout`` at once: its deadline has
  passed already, and so the kernel's hand-over of a crowd of silent stalls
  costs a refusal each, not a slot, a row and a log line each;
- otherwise the connection takes the source's rate-limit token *here*
  (``ratelimit.per_source`` counts connections from a source, so a source
  that sends junk, or nothing at all, pays for it like an honest one), and a
  source with no token left is refused ``BUSY rate_limited retry_after=S``.

Why at the door: a refused connection then costs one accept, one
non-blocking write and one close, and no task, timer, parse, SQLite row or
log line. Under a flood or a wave of stalled connections, the full price
(~1 ms of CPU each) was what queued honest students behind the attacker
(docs/benchmarks.md). A door refusal is not a registration: no request was
read, so nothing is recorded for it; ``RefusalTally`` counts refusals in
aggregate for the log and the metrics instead (docs/limits.md).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass

from registry.conncaps import PER_SOURCE as CAP_PER_SOURCE
from registry.conncaps import ConnectionCaps
from registry.model import Code, IPAddress, Outcome
from registry.ratelimit import Busy, RateLimiter, SourceKey, source_key

RATE_LIMITED = "rate_limited"  # the source's per_source bucket is empty
PER_SOURCE = "per_source"  # the source holds max_connections_per_source connections
TOTAL = "total"  # max_connections are open (normally enforced before accept())
# the kernel held it for its whole TCP_DEFER_ACCEPT wait, longer than the read
# deadline, and not one byte came: it is already a read timeout
SILENT = "silent"
REASONS = (RATE_LIMITED, PER_SOURCE, TOTAL, SILENT)


@dataclass(frozen=True, slots=True)
class Admitted:
    """Come in. ``key`` holds a connection slot: give it back with ``Door.leave(key)``."""

    key: Hashable


@dataclass(frozen=True, slots=True)
class Refused:
    """Not now: answer ``outcome`` and close. Nothing is held.

    ``key`` is the source's identity (its IPv4 address or IPv6 /prefix), the
    one its refusals are counted and banned under (registry/bans.py)."""

    reason: str
    outcome: Outcome
    key: SourceKey


def told_of_ban(outcome: Outcome, seconds: float) -> Outcome:
    """The refusal that banned its source, saying so: it is still answered, and the
    source's next connects will time out (the kernel drops its SYNs), which a
    student would otherwise take for a network fault."""
    return outcome.with_(
        explanation=f"{outcome.explanation}; your address is now blocked for about "
        f"{math.ceil(seconds)} s (connecting before then times out)"
    )


class Door:
    """Connection caps and the per-source rate limit, applied on arrival."""

    def __init__(self, caps: ConnectionCaps, limiter: RateLimiter) -> None:
        self.caps = caps
        self.limiter = limiter  # the Service's own limiter: one per-source bucket per source

    def arrive(self, source: IPAddress, now: float) -> Admitted | Refused:
        key = source_key(source, self.limiter.config.ipv6_prefix)
        reason = self.caps.acquire(key)
        if reason is not None:  # checked first: a refused connection costs no token
            return Refused(
                PER_SOURCE if reason == CAP_PER_SOURCE else TOTAL,
                Outcome(
                    code=Code.OVERLOADED,
                    retry_after=5,
                    explanation="too many open connections from your address; close some and retry"
                    if reason == CAP_PER_SOURCE
                    else "the registry has too many open connections; try again in a few seconds",
                ),
                key,
            )
        busy = self.limiter.check(source, None, now, include_global=False)
        if isinstance(busy, Busy):
            self.caps.release(key)
            return Refused(
                RATE_LIMITED,
                Outcome(
                    code=Code.RATE_LIMITED,
                    retry_after=busy.retry_after,
                    explanation="too many connections from your address (source limit); "
                    f"wait {busy.retry_after} s before trying again",
                ),
                key,
            )
        return Admitted(key)

    def silent(self, source: IPAddress, waited: float) -> Refused:
        """A connection that sent nothing while the kernel held it ``waited`` seconds
        (at least the read deadline): refused ``ERROR read_timeout`` without a slot,
        a token or a row, like any refusal at the door."""
        return Refused(
            SILENT,
            Outcome(
                code=Code.READ_TIMEOUT,
                explanation=f"no request arrived within {waited:g} s of connecting; "
                "send HOST:PORT, e.g. 192.168.1.105:15000",
            ),
            source_key(source, self.limiter.config.ipv6_prefix),
        )

    def leave(self, key: Hashable) -> None:
        self.caps.release(key)


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
        and bans use); return how many it has had for ``reason`` in this
        window and the one before (1 for a source past ``max_sources``: untracked
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
