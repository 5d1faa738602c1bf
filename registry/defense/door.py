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
aggregate for the log and the metrics instead (tally.py).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

from registry.defense.conncaps import PER_SOURCE, TOTAL, ConnectionCaps
from registry.defense.ratelimit import Busy, RateLimiter, SourceKey, source_key
from registry.model import Code, IPAddress, Outcome

# Why a connection was refused: PER_SOURCE (the source holds
# max_connections_per_source connections), TOTAL (max_connections are open, normally
# enforced before accept()), or:
RATE_LIMITED = "rate_limited"  # the source's per_source bucket is empty
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
    one its refusals are counted and banned under (registry/defense/bans.py)."""

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
                reason,
                Outcome(
                    code=Code.OVERLOADED,
                    retry_after=5,
                    explanation="too many open connections from your address; close some and retry"
                    if reason == PER_SOURCE
                    else "the registry has too many open connections; try again in a few seconds",
                ),
                key,
            )
        busy = self.limiter.admit(source, now)
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
