"""Bounded token-bucket rate limiting (SPEC policy promise 5). Pure: ``now`` is passed in.

Four limits apply to a registration: per source (an IPv4 address, or an IPv6
network of ``ipv6_prefix`` bits, because one IPv6 host usually owns a whole
/64), per target address, per target address and port, and one global bucket.
A request passes only when every applicable bucket has a token; it then takes
one from each. When any bucket refuses, none is touched, so refused requests
cannot drain a neighbour's budget, and the reply names the longest wait.

Each bucket is stored as one float, its *theoretical arrival time* (the GCRA
form of a token bucket): ``tat`` is the moment at which the bucket would be
full again. With ``interval = period / count``, taking a token moves ``tat``
forward by ``interval``, and a take is allowed while ``tat`` stays within
``period`` (= ``count`` tokens) of ``now``. This is exactly a token bucket of
capacity ``count`` refilled at ``count / period`` per second, but it needs no
second field, and "the bucket is full" is simply ``tat <= now``. For the SPEC's
example, 10/minute, the arithmetic is exact: the interval is 6.0 s.

Memory is bounded per table (``max_entries`` keys). A full bucket carries no
information (a missing key *is* a full bucket), so full entries are dropped
first; only then is the least recently used entry evicted. Keys are packed
into plain ints to keep each entry small.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from registry.config import Rate, RateLimitConfig
from registry.errors import ConfigError
from registry.model import Endpoint, IPAddress
from registry.policy.addresses import Address

# Float slack: sums of intervals such as 0.01 drift by ~1e-16 per step; without
# the slack, the 100th token of "100/second" could be refused by 7e-16 s and
# reported as a 1 s wait.
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


SourceKey = ipaddress.IPv4Address | ipaddress.IPv6Network  # what one "source" is


def source_key(addr: IPAddress, ipv6_prefix: int) -> SourceKey:
    """The identity a source is limited under: the IPv4 address, or its IPv6 /prefix network."""
    addr = Address.of(addr).peer
    if addr.version == 4:
        return addr  # type: ignore[return-value]
    return ipaddress.IPv6Network((int(addr), ipv6_prefix), strict=False)


def _pack(addr: IPAddress, drop_bits: int = 0) -> int:
    """A compact int key: IPv4 keys are >= 0, IPv6 keys < 0, so the families never collide.

    ``drop_bits`` aggregates an IPv6 address to its network (128 - prefix bits).
    """
    addr = Address.of(addr).peer
    if isinstance(addr, ipaddress.IPv4Address):
        return int(addr)
    return -1 - (int(addr) >> drop_bits)


def _with_port(host_key: int, port: int) -> int:
    """A packed host key extended by 16 bits of port, keeping the sign of its family."""
    if host_key >= 0:
        return (host_key << 16) | port
    return -1 - (((-1 - host_key) << 16) | port)


class TokenBucketTable:
    """One keyed table of token buckets (capacity ``rate.count``, refill ``rate.per_second``).

    Holds at most ``max_entries`` keys. A count of 0 refuses everything.
    """

    __slots__ = (
        "_tats",
        "_interval",
        "_period",
        "_count",
        "_max",
        "_clock",
        "_since_sweep",
        "_soonest",
    )

    def __init__(self, rate: Rate, max_entries: int) -> None:
        self._tats: OrderedDict[Hashable, float] = OrderedDict()
        self._clock = -math.inf  # latest `now` seen, for reconfigure()
        self._since_sweep = 0
        # No bucket is full before this time (a lower bound on every tat): lets a
        # spray of fresh keys skip sweeps that could not find anything.
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

    @property
    def rate(self) -> Rate:
        return Rate(self._count, self._period)

    def wait(self, key: Hashable, now: float) -> float:
        """Seconds until ``key`` could take a token (0.0: now). Takes nothing, stores nothing.

        A present key is marked recently used: a source that keeps getting refused
        is an active one, and must not age out of the table and come back full.
        """
        if self._count <= 0:
            return self._period
        tat = self._tats.get(key)
        if tat is None:
            return 0.0
        self._tats.move_to_end(key)
        if tat < now:
            tat = now
        wait = tat + self._interval - now - self._period
        return wait if wait > _EPS else 0.0

    def full(self, key: Hashable, now: float) -> bool:
        """Does ``key``'s bucket hold its whole burst? (A key never seen does.)"""
        tat = self._tats.get(key)
        return tat is None or tat <= now + _EPS

    def take(self, key: Hashable, now: float) -> float:
        """Take one token for ``key``: 0.0 if taken, else seconds until one is available."""
        wait = self.wait(key, now)
        if wait > 0.0:
            return wait
        self._commit(key, now)
        return 0.0

    def fine(self, key: Hashable, now: float, tokens: int) -> None:
        """Empty ``key``'s bucket and take ``tokens`` more, into debt, but never more
        than one full period beyond an empty bucket (the wait stays under two periods).

        From the empty bucket, not from what is left: a source with most of its
        burst unused (an attacker's address on its first junk request) would
        otherwise pay a fine of a full burst with a few seconds' wait (30 tokens
        of 30/minute: ~6 s), come back, and be recorded again."""
        if self._count <= 0:
            return  # refuses everything already
        if now > self._clock:
            self._clock = now
        tats = self._tats
        tat = tats.get(key)
        if tat is None and len(tats) >= self._max:
            self._make_room(now)
        empty = now + self._period  # the tat of a bucket with no token left
        base = empty if tat is None or tat < empty else tat
        tat = tats[key] = min(base + tokens * self._interval, now + 2 * self._period)
        tats.move_to_end(key)
        if tat < self._soonest:
            self._soonest = tat

    def _commit(self, key: Hashable, now: float) -> None:
        """Take the token that ``wait(key, now)`` just found; the caller checked it is there."""
        if now > self._clock:
            self._clock = now
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self._max:
                self._make_room(now)
            tat = tats[key] = now + self._interval
            if tat < self._soonest:
                self._soonest = tat
        else:
            tats[key] = (tat if tat > now else now) + self._interval

    def _make_room(self, now: float) -> None:
        """Free one slot: full buckets first, then the least recently used.

        Why LRU eviction under a spray is safe enough: an evicted key is
        forgotten, so if it returns it starts with a FULL bucket again. An
        attacker spraying more than ``max_entries`` distinct sources within one
        refill period can therefore get about one extra burst per source per
        ``max_entries`` new keys: per-source limiting degrades to "count per
        max_entries requests". That is the price of bounded memory. What still
        holds: every one of those requests also needs a global token, so the
        global bucket caps the total rate whatever the spray; and a source that
        keeps knocking stays recently used (``wait`` refreshes it), so the
        entries evicted are the idle ones.
        """
        tats = self._tats
        # Cheap and usual case: the oldest entries are idle, and idle means full.
        while tats and next(iter(tats.values())) <= now + _EPS:
            tats.popitem(last=False)
        if len(tats) < self._max:
            return
        # A full bucket may hide behind a recently used one; a whole sweep finds it.
        # At most one sweep per max/8 insertions keeps the cost amortised O(1),
        # and none while no bucket can be full yet.
        self._since_sweep += 1
        if self._since_sweep >= max(1, self._max // 8) and now + _EPS >= self._soonest:
            self._since_sweep = 0
            self.expire(now)
            if len(tats) < self._max:
                return
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


_Check = tuple[TokenBucketTable, int, Scope]  # a bucket, its key, and its scope's name


def _validate(cfg: RateLimitConfig) -> None:
    problems = []
    if not 0 <= cfg.ipv6_prefix <= 128:
        problems.append(f"ratelimit.ipv6_prefix: expected 0-128, got {cfg.ipv6_prefix}")
    if cfg.max_entries < 1:
        problems.append(f"ratelimit.max_entries: expected at least 1, got {cfg.max_entries}")
    if problems:
        raise ConfigError(problems)


class RateLimiter:
    """The four limits of SPEC promise 5, checked and consumed atomically."""

    def __init__(self, cfg: RateLimitConfig) -> None:
        _validate(cfg)
        self._cfg = cfg
        self._drop = 128 - cfg.ipv6_prefix
        self._source = TokenBucketTable(cfg.per_source, cfg.max_entries)
        self._target = TokenBucketTable(cfg.per_target, cfg.max_entries)
        self._target_port = TokenBucketTable(cfg.per_target_port, cfg.max_entries)
        self._global = TokenBucketTable(cfg.global_, 1)
        self._errors = TokenBucketTable(cfg.errors_global, 1)  # pressure: errors recorded
        # True from when protocol errors outran errors_global until its bucket refilled
        # (as of the last error)
        self.under_pressure = False

    @property
    def config(self) -> RateLimitConfig:
        return self._cfg

    def admit(self, source: IPAddress, now: float) -> Allowed | Busy:
        """The source's token alone: a connection at the door, or a request that calls
        nobody back (the global bucket guards callbacks: bad requests must not drain it)."""
        wait = self._source.take(_pack(source, self._drop), now)
        return Busy(max(1, math.ceil(wait - _EPS)), "source") if wait > 0.0 else ALLOWED

    def callback(self, source: IPAddress, target: Endpoint, now: float) -> Allowed | Busy:
        """A callback's tokens: source, target, target and port, and global, or none."""
        return self._take((self._source_check(source), *self._callback_checks(target)), now)

    def paid_callback(self, target: Endpoint, now: float) -> Allowed | Busy:
        """A callback whose source paid at the door: target, target and port, global."""
        return self._take(self._callback_checks(target), now)

    def peek(self, source: IPAddress, now: float) -> Allowed | Busy:
        """The source's and global wait, taking nothing (asked before a DNS lookup)."""
        return self._wait((self._source_check(source), (self._global, 0, "global")), now)

    def owed(self, source: IPAddress, now: float) -> Allowed | Busy:
        """The source's own wait, taking nothing: what a source fined into debt is told."""
        return self._wait((self._source_check(source),), now)

    def _source_check(self, source: IPAddress) -> _Check:
        return (self._source, _pack(source, self._drop), "source")

    def _callback_checks(self, target: Endpoint) -> tuple[_Check, ...]:
        host = _pack(target.host)
        return (
            (self._target, host, "target"),
            (self._target_port, _with_port(host, target.port), "target_port"),
            (self._global, 0, "global"),
        )

    @staticmethod
    def _wait(checks: tuple[_Check, ...], now: float) -> Allowed | Busy:
        """ALLOWED, or Busy with the largest wait, rounded up to whole seconds, at least 1."""
        worst, scope = 0.0, ""
        for table, key, name in checks:
            wait = table.wait(key, now)
            if wait > worst:
                worst, scope = wait, name
        if worst > 0.0:
            return Busy(max(1, math.ceil(worst - _EPS)), scope)
        return ALLOWED

    def _take(self, checks: tuple[_Check, ...], now: float) -> Allowed | Busy:
        """A token from every bucket of ``checks``, or, when any has none, from none."""
        verdict = self._wait(checks, now)
        if verdict is ALLOWED:
            for table, key, _ in checks:
                table._commit(key, now)  # same `now`, each key checked above: a token is there
        return verdict

    def penalize(self, source: IPAddress, now: float) -> bool:
        """The price of a protocol error (junk, a stall) from ``source``; True if it paid.

        It paid its token at the door. Normally it pays one more here, if it has
        one (never into debt), so a source sending junk runs out twice as fast
        as one sending registrations. Under pressure, from when the registry has
        recorded more than ``errors_global`` errors until they have stayed under
        that rate for a whole burst (5,000 addresses each inside its own budget
        can still send thousands a second), the source is
        fined ``error_fine`` tokens beyond an empty bucket, into debt: its next
        connections are refused at the door, cheaply, for up to two periods
        (about a minute by default). Honest students send
        valid requests and never pay it; one who sends a malformed line during
        an attack waits about a minute (told by ``retry_after``).
        """
        key = _pack(source, self._drop)
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
        ``under_pressure`` as it now stands (``penalize`` does this itself).

        Pressure starts when errors outrun errors_global (the bucket is empty) and
        ends only when they have stayed under it long enough to refill the whole
        burst. Following the bucket alone, its refill (200 errors a second) let as
        many attacking addresses a second through unfined, each recorded again when
        it came back: ~1,700 of an attack from 5,000 (docs/benchmarks.md)."""
        calm = self._errors.full(0, now)
        if self._errors.take(0, now) > 0.0:
            self.under_pressure = True
        elif calm:
            self.under_pressure = False
        return self.under_pressure

    def reconfigure(self, cfg: RateLimitConfig) -> None:
        """SIGHUP: new rates and caps take effect; tokens already used stay used.

        A new ``ipv6_prefix`` changes what a source *is*, so the source table
        starts empty then. Raises ConfigError (state untouched) on invalid values.
        """
        _validate(cfg)
        if cfg.ipv6_prefix != self._cfg.ipv6_prefix:
            self._source = TokenBucketTable(cfg.per_source, cfg.max_entries)
            self._drop = 128 - cfg.ipv6_prefix
        else:
            self._source.reconfigure(cfg.per_source, cfg.max_entries)
        self._target.reconfigure(cfg.per_target, cfg.max_entries)
        self._target_port.reconfigure(cfg.per_target_port, cfg.max_entries)
        self._global.reconfigure(cfg.global_, 1)
        self._errors.reconfigure(cfg.errors_global, 1)
        self._cfg = cfg

    def expire(self, now: float) -> int:
        """Drop every full bucket in every table (optional housekeeping); return the count."""
        return sum(t.expire(now) for t in self._tables())

    def _tables(self) -> tuple[TokenBucketTable, ...]:
        return (self._source, self._target, self._target_port, self._global)

    @property
    def entries(self) -> int:
        """Total keys held across all tables (for metrics and the memory bench)."""
        return sum(len(t) for t in self._tables())

    def table_sizes(self) -> dict[Scope, int]:
        """Keys held per table, by scope name (for metrics)."""
        return dict(zip(SCOPES, (len(t) for t in self._tables()), strict=True))


def debt_threshold(per_source: Rate, longest_hold: float) -> float:
    """The longest wait told to a source that is not in debt (fined for junk under
    pressure: ``RateLimiter.penalize``). A student merely rate limited is told at
    most one token's time, rounded up, and one held at the door at most the longest
    hold; a source that comes back before a longer wait is a loop (defense/bans.py)."""
    token_time = per_source.period / per_source.count if per_source.count > 0 else 0.0
    return max(longest_hold, math.ceil(token_time))


class ReplyBudget:
    """How many unproven UDP datagrams are answered: per source and in total (DNS RRL-like).

    An unproven datagram (no valid cookie) may carry a forged source, so each
    answer to one goes to whoever the sender chose. Every answer takes a token
    from its source's bucket (an IPv4 address, or an IPv6 network of
    ``ipv6_prefix`` bits) and from the global one; past either, the datagram is
    dropped unanswered. A loop through a reflector the loop guard cannot
    recognise costs its (forged) source one token per exchange, so it dies
    when the source's burst is spent. A refused datagram takes no token from
    either bucket, so one flooded source cannot spend the global budget.
    """

    def __init__(self, per_source: Rate, global_: Rate, ipv6_prefix: int, max_entries: int) -> None:
        self._settings = (per_source, global_, ipv6_prefix, max_entries)
        self._drop = 128 - ipv6_prefix
        self._source = TokenBucketTable(per_source, max_entries)
        self._global = TokenBucketTable(global_, 1)

    def take(self, source: IPAddress, now: float) -> Scope | None:
        """Take one token for answering ``source``: None when taken, else the scope that
        refused ("source" or "global")."""
        key = _pack(source, self._drop)
        if self._source.wait(key, now) > 0.0:
            return "source"
        if self._global.wait(0, now) > 0.0:
            return "global"
        self._source._commit(key, now)
        self._global._commit(0, now)
        return None

    def configure(
        self, per_source: Rate, global_: Rate, ipv6_prefix: int, max_entries: int
    ) -> None:
        """Adopt new settings (a SIGHUP), keeping used tokens; a no-op when unchanged.

        A new ``ipv6_prefix`` changes what a source is: the source table starts empty.
        """
        settings = (per_source, global_, ipv6_prefix, max_entries)
        if settings == self._settings:
            return
        if ipv6_prefix != self._settings[2]:
            self._source = TokenBucketTable(per_source, max_entries)
            self._drop = 128 - ipv6_prefix
        else:
            self._source.reconfigure(per_source, max_entries)
        self._global.reconfigure(global_, 1)
        self._settings = settings

    @property
    def entries(self) -> int:
        """Sources held (for tests and memory bounds)."""
        return len(self._source)
