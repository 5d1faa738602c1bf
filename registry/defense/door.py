"""The front door: admit or refuse a TCP connection by its source address alone. Pure.

``Door.arrive`` runs the moment ``accept()`` returns, before a task or a read: a source
over its connection cap is refused ``BUSY overloaded``; otherwise the connection takes the
source's rate-limit token here (junk and silence pay like a registration) or is refused
``BUSY rate_limited``. ``Door.silent`` refuses one the kernel held through its whole
``TCP_DEFER_ACCEPT`` wait without a byte. A refusal costs one accept, write and close, and
is not a registration: ``Window`` counts it (docs/limits.md, "The door").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from registry.defense.conncaps import PER_SOURCE, TOTAL, ConnectionCaps
from registry.defense.ratelimit import Busy, RateLimiter, source_of
from registry.model import Code, IPAddress, Outcome

# Why a connection was refused: PER_SOURCE, TOTAL (conncaps.py), or:
RATE_LIMITED = "rate_limited"  # the source's per_source bucket is empty
SILENT = "silent"  # not one byte through the kernel's TCP_DEFER_ACCEPT wait
REASONS = (RATE_LIMITED, PER_SOURCE, TOTAL, SILENT)


@dataclass(frozen=True, slots=True)
class Admitted:
    """Come in. ``key`` holds a connection slot: give it back with ``Door.leave(key)``."""

    key: int


@dataclass(frozen=True, slots=True)
class Refused:
    """Not now: answer ``outcome`` and close. Nothing is held. ``key`` is the source
    its refusals are counted and banned under; ``owed`` the wait it was told when it
    is in debt (``RateLimiter.in_debt``), else 0."""

    reason: str
    outcome: Outcome
    key: int
    owed: int = 0


def told_of_ban(outcome: Outcome, seconds: float) -> Outcome:
    """The refusal that banned its source, saying so: its next connects time out,
    which a student would otherwise take for a network fault."""
    return outcome.with_(
        explanation=f"{outcome.explanation}; your address is now blocked for about "
        f"{math.ceil(seconds)} s (connecting before then times out)"
    )


class Door:
    """Connection caps and the per-source rate limit, applied on arrival.
    ``longest_hold``: the doorway's longest hold (``limits.max_refusal_delay``)."""

    def __init__(self, caps: ConnectionCaps, limiter: RateLimiter, longest_hold: float) -> None:
        self.caps, self.limiter, self.longest_hold = caps, limiter, longest_hold

    def arrive(self, source: IPAddress, now: float) -> Admitted | Refused:
        key = source_of(source, self.limiter.config.ipv6_prefix)
        reason = self.caps.acquire(key)
        if reason is not None:  # checked first: a refused connection costs no token
            explanation = (
                "too many open connections from your address; close some and retry"
                if reason == PER_SOURCE
                else "the registry has too many open connections; try again in a few seconds"
            )
            return Refused(
                reason, Outcome(code=Code.OVERLOADED, retry_after=5, explanation=explanation), key
            )
        busy = self.limiter.admit_key(key, now)  # source_of once (-5,000 instructions)
        if not isinstance(busy, Busy):
            return Admitted(key)
        self.caps.release(key)
        wait = busy.retry_after
        outcome = Outcome(
            code=Code.RATE_LIMITED,
            retry_after=wait,
            explanation="too many connections from your address (source limit); "
            f"wait {wait} s before trying again",
        )
        owed = wait if self.limiter.in_debt(wait, self.longest_hold) else 0
        return Refused(RATE_LIMITED, outcome, key, owed)

    def silent(self, source: IPAddress, waited: float) -> Refused:
        """Refused ``ERROR read_timeout``: it sent nothing while the kernel held it
        ``waited`` seconds (at least the read deadline). No slot, token or row."""
        explanation = (
            f"no request arrived within {waited:g} s of connecting; "
            "send HOST:PORT, e.g. 192.168.1.105:15000"
        )
        outcome = Outcome(code=Code.READ_TIMEOUT, explanation=explanation)
        return Refused(SILENT, outcome, source_of(source, self.limiter.config.ipv6_prefix))

    def leave(self, key: int) -> None:
        self.caps.release(key)
