"""Bounded token-bucket rate limiting (SPEC policy promise 5). Pure: ``now`` is passed in.

Four limits apply to a registration: per source (``source_of``), per target
address, per target address and port, and one global bucket. A request passes
only when every applicable bucket has a token, and then takes one from each;
when any refuses, none is touched, and the reply names the longest wait.

Each bucket is one float, its *theoretical arrival time* (GCRA): ``tat`` is when
the bucket would be full again, a token moves it on by ``period / count``, and
a take is allowed while ``tat`` stays within ``period`` of ``now``. A missing
key is a full bucket, so tables drop full entries first, then the least
recently used (docs/limits.md, "Rates").
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from registry.config import RateLimitConfig
from registry.model import Endpoint, IPAddress, Rate
from registry.policy.addresses import Address

# Float slack: sums of intervals such as 0.01 drift by ~1e-16 per step; without
# it the 100th token of "100/second" could be refused by 7e-16 s.
_EPS = 1e-9

Scope = str  # "source" | "target" | "target_port" | "global"
SCOPES: tuple[Scope, ...] = ("source", "target", "target_port", "global")


@dataclass(frozen=True, slots=True)
class Allowed:
    """The request may proceed; one token was taken from each applicable bucket."""


ALLOWED = Allowed()


@dataclass(frozen=True, slots=True)
class Busy:
    """Refused: ``retry_after`` whole seconds (>= 1) until ``scope``'s bucket has a token."""

    retry_after: int
    scope: Scope


SourceNetwork = ipaddress.IPv4Address | ipaddress.IPv6Network


def source_of(addr: IPAddress, ipv6_prefix: int) -> int:
    """A source's one identity (limits, caps, the attack window, bans): an IPv4 address
    as an int (>= 0), or its IPv6 /ipv6_prefix network packed below zero with its prefix
    length (one IPv6 host usually owns a whole /64). A compact key, and the families
    never collide; a host (a target) is its /128."""
    addr = Address.of(addr).peer
    if addr.version == 4:
        return int(addr)
    return -1 - ((int(addr) >> (128 - ipv6_prefix)) << 8 | ipv6_prefix)


def source_network(source: int) -> SourceNetwork:
    """What ``source`` stands for: for the kernel's filters, and ``str`` for display."""
    if source >= 0:
        return ipaddress.IPv4Address(source)
    bits, prefix = divmod(-1 - source, 256)
    return ipaddress.IPv6Network((bits << (128 - prefix), prefix))


def _with_port(host_key: int, port: int) -> int:
    """A packed host key extended by 16 bits of port, keeping the sign of its family."""
    if host_key >= 0:
        return (host_key << 16) | port
    return -1 - (((-1 - host_key) << 16) | port)


class TokenBucketTable:
    """One keyed table of token buckets (capacity ``rate.count``, refill ``rate.per_second``),
    at most ``max_entries`` keys. A count of 0 refuses everything."""

    def __init__(self, rate: Rate, max_entries: int) -> None:
        self._tats: OrderedDict[Hashable, float] = OrderedDict()
        self._clock = -math.inf  # latest `now` seen, for reconfigure()
        self._since_sweep = 0
        # A lower bound on every tat: a spray of fresh keys skips sweeps that would find nothing.
        self._soonest = math.inf
        self._set_rate(rate)
        self._max = max_entries

    def _set_rate(self, rate: Rate) -> None:
        self._count = rate.count
        self._period = float(rate.period)
        self._interval = self._period / rate.count if rate.count > 0 else math.inf

    def __len__(self) -> int:
        return len(self._tats)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._tats

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` could take a token (0.0: now). Takes nothing, but marks a
        present key recently used: a source that keeps being refused must not age out
        and come back full."""
        if self._count <= 0:
            return self._period
        tat = self._tats.get(key)
        if tat is None:
            return 0.0
        self._tats.move_to_end(key)
        wait = (tat if tat > now else now) + self._interval - now - self._period
        return wait if wait > _EPS else 0.0

    def full(self, key: Hashable, now: float) -> bool:
        """Does ``key``'s bucket hold its whole burst? (A key never seen does.)"""
        tat = self._tats.get(key)
        return tat is None or tat <= now + _EPS

    def take(self, key: Hashable, now: float) -> float:
        """Take one token for ``key``: 0.0 if taken, else seconds until one is available."""
        wait = self.wait(key, now)
        if wait == 0.0:
            self.spend(key, now)
        return wait

    def spend(self, key: Hashable, now: float) -> None:
        """Take the token ``wait(key, now)`` just said is there (no second look).

        ``_set`` inlined, without its builtins: three buckets a registration
        (-17,000 instructions). A present key is the most recent already, where
        ``wait`` moved it; a new one goes last."""
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self._max:
                self._make_room(now)
            tat = now
        elif tat < now:
            tat = now
        tat += self._interval
        tats[key] = tat
        if now > self._clock:
            self._clock = now
        if tat < self._soonest:
            self._soonest = tat

    def fine(self, key: Hashable, now: float, tokens: int) -> None:
        """Empty ``key``'s bucket and take ``tokens`` more, into debt, but never more than
        one period beyond an empty bucket. From the empty bucket, not from what is left:
        see docs/limits.md, "The door"."""
        if self._count > 0:  # else it refuses everything already
            empty = now + self._period  # the tat of a bucket with no token left
            tat = max(self._tats.get(key, empty), empty) + tokens * self._interval
            self._set(key, now, min(tat, now + 2 * self._period))

    def _set(self, key: Hashable, now: float, tat: float) -> None:
        self._clock = max(self._clock, now)
        tats = self._tats
        if key not in tats and len(tats) >= self._max:
            self._make_room(now)
        tats[key] = tat
        tats.move_to_end(key)
        self._soonest = min(self._soonest, tat)

    def _make_room(self, now: float) -> None:
        """Free one slot: full buckets first, then the least recently used. An evicted key
        returns with a full bucket (the price of bounded memory); the global bucket still
        caps the total, and a source that keeps knocking stays recent (``wait``)."""
        tats = self._tats
        while tats and next(iter(tats.values())) <= now + _EPS:  # idle at the front: full
            tats.popitem(last=False)
        if len(tats) < self._max:
            return
        # A full bucket may hide behind a recent one: a whole sweep at most once per
        # max/8 insertions (amortised O(1)), and none while no bucket can be full yet.
        self._since_sweep += 1
        if self._since_sweep >= max(1, self._max // 8) and now + _EPS >= self._soonest:
            self._since_sweep = 0
            self.expire(now)
        while len(tats) >= self._max:
            tats.popitem(last=False)

    def expire(self, now: float) -> int:
        """Drop every full bucket (they carry no information); return how many were dropped."""
        full = [k for k, tat in self._tats.items() if tat <= now + _EPS]
        for k in full:
            del self._tats[k]
        self._soonest = min(self._tats.values(), default=math.inf)
        return len(full)

    def reconfigure(self, rate: Rate, max_entries: int) -> None:
        """Adopt a new rate and cap, keeping each key's used tokens (capped at the new capacity)."""
        old_interval = self._interval
        self._set_rate(rate)
        self._max = max_entries
        if self._count <= 0 or math.isinf(old_interval):
            self._tats.clear()  # "refuse everything" has no per-key state to carry over
        elif old_interval != self._interval:
            clock, scale = self._clock, self._interval / old_interval
            for key, tat in list(self._tats.items()):
                used = tat - clock  # seconds of debt at the old rate
                if used <= _EPS:
                    del self._tats[key]
                else:
                    self._tats[key] = clock + min(used * scale, self._period)
        while len(self._tats) > self._max:
            self._tats.popitem(last=False)
        self._soonest = min(self._tats.values(), default=math.inf)


_Check = tuple[TokenBucketTable, Hashable, Scope]  # a bucket, its key, and its scope's name


def _wait(checks: tuple[_Check, ...], now: float) -> Allowed | Busy:
    """ALLOWED, or Busy with the largest wait, rounded up to whole seconds, at least 1."""
    worst, scope = 0.0, ""
    for table, key, name in checks:
        wait = table.wait(key, now)
        if wait > worst:
            worst, scope = wait, name
    return Busy(max(1, math.ceil(worst - _EPS)), scope) if worst > 0.0 else ALLOWED


def _take(checks: tuple[_Check, ...], now: float) -> Allowed | Busy:
    """A token from every bucket of ``checks``, or, when any has none, from none."""
    verdict = _wait(checks, now)
    if verdict is ALLOWED:
        for table, key, _ in checks:
            # same `now`, checked above: a token is there (a second wait() per bucket
            # cost ~10,000 instructions a registration)
            table.spend(key, now)
    return verdict


class RateLimiter:
    """The four limits of SPEC promise 5, checked and consumed atomically, and the
    pressure of protocol errors (``errors_global``)."""

    def __init__(self, cfg: RateLimitConfig) -> None:
        self._cfg = cfg
        self._source = TokenBucketTable(cfg.per_source, cfg.max_entries)
        self._target = TokenBucketTable(cfg.per_target, cfg.max_entries)
        self._target_port = TokenBucketTable(cfg.per_target_port, cfg.max_entries)
        self._global = TokenBucketTable(cfg.global_, 1)
        self._errors = TokenBucketTable(cfg.errors_global, 1)  # protocol errors recorded
        # From when errors emptied the errors bucket until it refilled (as of the last error)
        self.under_pressure = False

    @property
    def config(self) -> RateLimitConfig:
        return self._cfg

    def admit(self, source: IPAddress, now: float) -> Allowed | Busy:
        """The source's token alone: a connection at the door, or a request that calls
        nobody back (the global bucket guards callbacks: bad requests must not drain it)."""
        return _take((self._source_check(source),), now)

    def callback(self, source: IPAddress, target: Endpoint, now: float) -> Allowed | Busy:
        """A callback's tokens: source, target, target and port, and global, or none."""
        return _take((self._source_check(source), *self._callback_checks(target)), now)

    def paid_callback(self, target: Endpoint, now: float) -> Allowed | Busy:
        """A callback whose source paid at the door: target, target and port, global."""
        return _take(self._callback_checks(target), now)

    def peek(self, source: IPAddress, now: float) -> Allowed | Busy:
        """The source's and global wait, taking nothing (asked before a DNS lookup)."""
        return _wait((self._source_check(source), (self._global, 0, "global")), now)

    def owed(self, source: IPAddress, now: float) -> Allowed | Busy:
        """The source's own wait, taking nothing: what a source fined into debt is told."""
        return _wait((self._source_check(source),), now)

    def in_debt(self, wait: float, longest_hold: float) -> bool:
        """Is a source told to wait ``wait`` s in debt (fined: ``penalize``)? One merely
        rate limited is told at most a token's time, rounded up, and one held at the
        door at most ``longest_hold``; coming back before a longer wait is a loop
        (``BanList.consider``)."""
        rate = self._cfg.per_source
        token_time = rate.period / rate.count if rate.count > 0 else 0.0
        return wait > max(longest_hold, math.ceil(token_time))

    def _source_check(self, source: IPAddress) -> _Check:
        return (self._source, source_of(source, self._cfg.ipv6_prefix), "source")

    def _callback_checks(self, target: Endpoint) -> tuple[_Check, ...]:
        host = source_of(target.host, 128)
        return (
            (self._target, host, "target"),
            (self._target_port, _with_port(host, target.port), "target_port"),
            (self._global, 0, "global"),
        )

    def penalize(self, source: IPAddress, now: float) -> bool:
        """The price of a protocol error (junk, a stall) from ``source``; True if it paid.

        It paid its token at the door; normally it pays one more here if it has one
        (never into debt). Under pressure (``fining``) it is fined ``error_fine``
        tokens beyond an empty bucket instead: its next connections are refused at
        the door for up to two periods (docs/limits.md, "The door")."""
        key = source_of(source, self._cfg.ipv6_prefix)
        self.note_error(now)
        if not self.fining:
            return self._source.take(key, now) == 0.0
        self._source.fine(key, now, self._cfg.error_fine)
        return True

    @property
    def fining(self) -> bool:
        """Does a protocol error that paid at the door fine its source now?"""
        return self.under_pressure and self._cfg.error_fine > 0

    def note_error(self, now: float) -> bool:
        """Count one recorded protocol error against ``errors_global``; return
        ``under_pressure``. Pressure starts when the errors bucket is empty and ends
        only when it is full again: following the bucket alone let its refill's worth
        of attacking addresses through unfined (docs/benchmarks.md)."""
        calm = self._errors.full(0, now)
        if self._errors.take(0, now) > 0.0:
            self.under_pressure = True
        elif calm:
            self.under_pressure = False
        return self.under_pressure

    def reconfigure(self, cfg: RateLimitConfig) -> None:
        """SIGHUP: new rates and caps take effect; tokens already used stay used (a new
        ``ipv6_prefix`` makes new IPv6 sources: the old ones age out)."""
        self._source.reconfigure(cfg.per_source, cfg.max_entries)
        self._target.reconfigure(cfg.per_target, cfg.max_entries)
        self._target_port.reconfigure(cfg.per_target_port, cfg.max_entries)
        self._global.reconfigure(cfg.global_, 1)
        self._errors.reconfigure(cfg.errors_global, 1)
        self._cfg = cfg

    def _tables(self) -> tuple[TokenBucketTable, ...]:
        return (self._source, self._target, self._target_port, self._global)

    @property
    def entries(self) -> int:
        """Total keys held across all tables (for metrics and the memory bench)."""
        return sum(len(t) for t in self._tables())

    def table_sizes(self) -> dict[Scope, int]:
        """Keys held per table, by scope name: each stays bounded (tests/test_attack.py's spray)."""
        return dict(zip(SCOPES, (len(t) for t in self._tables()), strict=True))


class ReplyBudget:
    """How many unproven UDP datagrams (no valid cookie: the source may be forged) are
    answered, per source and in total (DNS RRL-like). A refused datagram takes no
    token from either bucket, so one flooded source cannot spend the global budget."""

    def __init__(self, per_source: Rate, global_: Rate, ipv6_prefix: int, max_entries: int) -> None:
        self._settings = (per_source, global_, ipv6_prefix, max_entries)
        self._source = TokenBucketTable(per_source, max_entries)
        self._global = TokenBucketTable(global_, 1)

    def take(self, source: IPAddress, now: float) -> Scope | None:
        """Take one token for answering ``source``: None when taken, else the scope that
        refused ("source" or "global")."""
        key = source_of(source, self._settings[2])
        checks = ((self._source, key, "source"), (self._global, 0, "global"))
        verdict = _take(checks, now)
        return verdict.scope if isinstance(verdict, Busy) else None

    def configure(
        self, per_source: Rate, global_: Rate, ipv6_prefix: int, max_entries: int
    ) -> None:
        """Adopt new settings (a SIGHUP), keeping used tokens; a no-op when unchanged
        (asked per datagram)."""
        settings = (per_source, global_, ipv6_prefix, max_entries)
        if settings != self._settings:
            self._settings = settings
            self._source.reconfigure(per_source, max_entries)
            self._global.reconfigure(global_, 1)
