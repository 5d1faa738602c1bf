"""Bans: sources that keep coming back after refusals, dropped by the kernel a while.

Pure (``now`` is passed in). A source refused ``after`` times within the attack
window (``Window``) is a loop with many connections, not a student retrying by
hand; a source in debt (``Refused.owed``) refused ``ignored_after`` times is a
loop that ignores the wait it was told. ``BanList`` bans it, and the edge puts
the bans in the registration listeners' own socket filter (registry/net/kernel/),
so the kernel drops its SYNs (docs/limits.md, "Bans").
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from registry.defense.ratelimit import SourceNetwork, source_network

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Ban:
    key: int  # the source (ratelimit.source_of)
    since: float
    until: float
    refusals: int  # the refusals in the window that triggered it

    @property
    def network(self) -> SourceNetwork:
        return source_network(self.key)


class BanList:
    """Banned sources, bounded, each until its own expiry.

    Full (``max_entries``), a new ban is not made (``skipped`` counts them):
    evicting a live ban would let its source back in when it is most active.
    What the event loop repeats in a wave costs O(log n) or O(changes), not
    O(bans): expiries in a heap, changed keys for ``take_changes``
    (docs/benchmarks.md, "Why each defence is there").
    """

    def __init__(self, *settings: Any, **named: Any) -> None:
        """The settings are ``reconfigure``'s."""
        self._bans: dict[int, Ban] = {}
        # (until, n, ban) by expiry; entries of bans lifted otherwise (a reload) are
        # stale and skipped: a ban counts only while it is the one in _bans.
        self._expiries: list[tuple[float, int, Ban]] = []
        self._seq = itertools.count()
        self._changed: dict[int, None] = {}  # banned or lifted since take_changes()
        self.total = 0  # bans made since start (a Prometheus counter)
        self.skipped = 0  # bans not made because the list was full
        self.version = 0  # bumped on every change: the edge re-attaches the filter
        self.reconfigure(*settings, **named)

    def __len__(self) -> int:
        return len(self._bans)

    def __contains__(self, key: object) -> bool:
        return key in self._bans

    def consider(self, key: int, repeat: int, now: float, owed: float = 0.0) -> Ban | None:
        """A refusal of ``key``, its ``repeat``-th in the window, of a source in debt
        told to wait ``owed`` seconds (0: not in debt): the new ban, or None."""
        if self.after <= 0 or key in self._bans:  # after 0: no bans at all
            return None
        ignored = 0 < self.ignored_after <= repeat and owed > 0
        if (repeat < self.after and not ignored) or self.is_exempt(key):
            return None
        if len(self._bans) >= self.max_entries:
            self.skipped += 1
            return None
        duration = self.duration if repeat >= self.after else min(owed, self.duration)
        duration *= 1 + self.spread * spread_share(key)
        ban = Ban(key, now, now + duration, repeat)
        self._bans[key] = ban
        heapq.heappush(self._expiries, (ban.until, next(self._seq), ban))
        self._changed[key] = None
        self.total += 1
        self.version += 1
        return ban

    def is_exempt(self, key: int) -> bool:
        """Is the source inside an exempt network? An IPv6 source network counts when it
        overlaps one: part of it is exempt."""
        net = ipaddress.ip_network(source_network(key))
        return any(e.version == net.version and e.overlaps(net) for e in self.exempt)  # type: ignore[arg-type]

    def expire(self, now: float) -> list[Ban]:
        """Lift the bans whose time is up; return them (soonest first)."""
        over = []
        while self._expiries and self._expiries[0][0] <= now:
            ban = heapq.heappop(self._expiries)[2]
            if self._bans.get(ban.key) is ban:
                del self._bans[ban.key]
                self._changed[ban.key] = None
                over.append(ban)
        if over:
            self.version += 1
        return over

    def next_expiry(self) -> float:
        heap = self._expiries
        while heap and self._bans.get(heap[0][2].key) is not heap[0][2]:
            heapq.heappop(heap)  # lifted by a reload
        return heap[0][0] if heap else math.inf

    def take_changes(self) -> list[int]:
        """The keys banned or lifted since the last call, in that order (ask ``key in
        self`` which); for one consumer, the kernel filter."""
        changed, self._changed = list(self._changed), {}
        return changed

    def active(self, limit: int | None = None) -> list[Ban]:
        """The bans in the order they were made (oldest first), the first ``limit``."""
        return list(itertools.islice(self._bans.values(), limit))

    def reconfigure(
        self,
        after: int,
        duration: float,
        max_entries: int,
        exempt: Sequence[Network] = (),
        *,
        ignored_after: int = 0,
        spread: float = 0.0,
    ) -> list[Ban]:
        """SIGHUP. ``after`` 0 lifts every ban; a newly exempt source is lifted; a
        smaller cap lifts the newest beyond it. Live bans keep their expiry.
        Returns the bans lifted. ``exempt``: never banned (a campus NAT, the
        instructor's hosts); ``spread``: a ban lasts up to this fraction longer."""
        self.after, self.duration, self.max_entries = after, duration, max_entries
        self.exempt = tuple(exempt)
        self.ignored_after, self.spread = ignored_after, spread
        bans = self.active()
        keep = [ban for ban in bans if not self.is_exempt(ban.key)][
            : max_entries if after > 0 else 0
        ]
        kept = {ban.key for ban in keep}
        lifted = [ban for ban in bans if ban.key not in kept]
        if lifted:
            self._bans = {ban.key: ban for ban in keep}
            self._changed.update(dict.fromkeys(ban.key for ban in lifted))
            self.version += 1
        return lifted


def spread_share(key: int) -> float:
    """A fixed number in [0, 1) for ``key``, even over neighbouring addresses (Fibonacci
    hashing): a ban lasts ``1 + spread x share`` times its duration, so the sources an
    attack's onset banned in one wave are not let back in one wave."""
    bits = key
    if key < 0:  # an IPv6 network's own bits (not its all-zero low half), folded to 64
        bits = (-1 - key) >> 8
        bits ^= bits >> 64
    return ((bits * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) / 2.0**64
