"""registry.defense.ratelimit: exact-time token buckets, aggregation, atomicity, bounded memory."""

from __future__ import annotations

import copy
import math
from ipaddress import IPv4Address, IPv6Address, IPv6Network, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.config import RateLimitConfig
from registry.defense.ratelimit import (
    ALLOWED,
    Allowed,
    Busy,
    RateLimiter,
    TokenBucketTable,
    source_network,
    source_of,
)
from registry.model import Endpoint, Rate

PER_MIN = 60.0
HUGE = Rate(1_000_000, 1.0)  # effectively unlimited, to isolate one scope


def cfg(
    per_source: Rate = HUGE,
    per_target: Rate = HUGE,
    per_target_port: Rate = HUGE,
    global_: Rate = HUGE,
    ipv6_prefix: int = 64,
    max_entries: int = 100_000,
) -> RateLimitConfig:
    return RateLimitConfig(
        per_source=per_source,
        per_target=per_target,
        per_target_port=per_target_port,
        global_=global_,
        ipv6_prefix=ipv6_prefix,
        max_entries=max_entries,
    )


def ip(text: str) -> IPv4Address | IPv6Address:
    return ip_address(text)


def ep(text: str, port: int = 15000) -> Endpoint:
    return Endpoint(ip_address(text), port)


S1, S2, S3 = ip("192.0.2.1"), ip("192.0.2.2"), ip("192.0.2.3")


# --- exact times -------------------------------------------------------------

# (now, expected) for one key of a 10/minute table: the interval is exactly 6 s.
TEN_PER_MINUTE = [
    *[(0.0, 0.0)] * 10,
    (0.0, 6.0),  # 11th at t=0: one interval to wait
    (3.0, 3.0),
    (5.999, pytest.approx(0.001)),
    (6.0, 0.0),  # exactly one token back
    (6.0, 6.0),
    (12.0, 0.0),
    (72.0, 0.0),  # idle a full minute: bucket full again (10 tokens)...
    *[(72.0, 0.0)] * 9,
    (72.0, 6.0),  # ...and never more than 10
]


def test_table_exact_times_ten_per_minute() -> None:
    table = TokenBucketTable(Rate(10, PER_MIN), max_entries=10)
    got = [(now, table.take("k", now)) for now, _ in TEN_PER_MINUTE]
    assert got == TEN_PER_MINUTE


def test_limiter_ten_per_minute_exact() -> None:
    lim = RateLimiter(cfg(per_source=Rate(10, PER_MIN)))
    assert [lim.admit(S1, 0.0) for _ in range(10)] == [ALLOWED] * 10
    assert lim.admit(S1, 0.0) == Busy(retry_after=6, scope="source")
    assert lim.admit(S1, 5.999) == Busy(retry_after=1, scope="source")
    assert lim.admit(S1, 6.0) == ALLOWED
    assert lim.admit(S1, 6.0) == Busy(retry_after=6, scope="source")
    assert lim.admit(S2, 6.0) == ALLOWED  # other sources are independent


def test_hundred_per_second_has_no_float_drift() -> None:
    # Summing 0.01 a hundred times overshoots 1.0; the 100th token must still pass.
    table = TokenBucketTable(Rate(100, 1.0), max_entries=1)
    assert [table.take(0, 0.0) for _ in range(100)] == [0.0] * 100
    assert table.take(0, 0.0) == pytest.approx(0.01)


@pytest.mark.parametrize(
    ("rate", "burst", "now", "retry_after"),
    [
        (Rate(1, 3600.0), 1, 0.0, 3600),
        (Rate(1, PER_MIN), 1, 30.2, 30),  # 29.8 s -> 30 (ceil)
        (Rate(1, PER_MIN), 1, 59.5, 1),  # 0.5 s -> 1
        (Rate(2, 1.0), 2, 0.0, 1),  # 0.5 s -> 1
        (Rate(2, 1.0), 2, 0.4999, 1),  # 0.0001 s -> 1, never 0
        (Rate(3, PER_MIN), 3, 0.0, 20),  # exactly 20 s stays 20
    ],
)
def test_retry_after_is_ceil_and_at_least_one(
    rate: Rate, burst: int, now: float, retry_after: int
) -> None:
    lim = RateLimiter(cfg(per_source=rate))
    for _ in range(burst):
        assert lim.admit(S1, 0.0) == ALLOWED
    assert lim.admit(S1, now) == Busy(retry_after, "source")


def test_zero_count_refuses_everything() -> None:
    lim = RateLimiter(cfg(per_source=Rate(0, PER_MIN)))
    assert lim.admit(S1, 0.0) == Busy(60, "source")
    assert lim.admit(S1, 1e6) == Busy(60, "source")
    assert lim.entries == 0


# --- keys: IPv6 aggregation, v4-mapped ---------------------------------------


@pytest.mark.parametrize(
    ("addr", "prefix", "key"),
    [
        ("192.0.2.7", 64, IPv4Address("192.0.2.7")),
        ("::ffff:192.0.2.7", 64, IPv4Address("192.0.2.7")),
        ("2001:db8:1:2:aaaa::1", 64, IPv6Network("2001:db8:1:2::/64")),
        ("2001:db8:1:2:aaaa::1", 48, IPv6Network("2001:db8:1::/48")),
        ("2001:db8:1:2:aaaa::1", 128, IPv6Network("2001:db8:1:2:aaaa::1/128")),
        ("2001:db8:1:2:aaaa::1", 0, IPv6Network("::/0")),
    ],
)
def test_source_identity(addr: str, prefix: int, key: object) -> None:
    source = source_of(ip(addr), prefix)
    assert type(source) is int and source_network(source) == key
    # the families never collide: IPv4 sources are >= 0, IPv6 networks below
    assert (source >= 0) is (key.version == 4)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("a", "b", "prefix", "shared"),
    [
        ("2001:db8:0:1::1", "2001:db8:0:1:ffff:ffff:ffff:ffff", 64, True),
        ("2001:db8:0:1::1", "2001:db8:0:2::1", 64, False),
        ("2001:db8:0:1::1", "2001:db8:0:2::1", 48, True),
        ("2001:db8:0:1::1", "2001:db8:0:1::2", 128, False),
        ("2001:db8:0:1::1", "2001:db9:0:1::1", 48, False),
        ("::ffff:192.0.2.9", "192.0.2.9", 64, True),  # v4-mapped is the v4 host
        ("192.0.2.9", "192.0.2.10", 64, False),  # no aggregation for IPv4
        ("::c000:209", "192.0.2.9", 128, False),  # same low 32 bits, other family
        ("::", "0.0.0.0", 0, False),  # both pack to 0-ish: families never collide
    ],
)
def test_sources_share_a_bucket(a: str, b: str, prefix: int, shared: bool) -> None:
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), ipv6_prefix=prefix))
    assert lim.admit(ip(a), 0.0) == ALLOWED
    expected = Busy(60, "source") if shared else ALLOWED
    assert lim.admit(ip(b), 0.0) == expected


def test_target_v4_mapped_is_the_v4_target() -> None:
    lim = RateLimiter(cfg(per_target=Rate(1, PER_MIN)))
    assert lim.callback(S1, ep("198.51.100.5"), 0.0) == ALLOWED
    assert lim.callback(S2, ep("::ffff:198.51.100.5", 16000), 0.0) == Busy(60, "target")


# --- scopes and atomicity ----------------------------------------------------


def test_target_refusal_does_not_consume_source() -> None:
    lim = RateLimiter(cfg(per_source=Rate(3, PER_MIN), per_target=Rate(1, PER_MIN)))
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    for _ in range(20):
        assert lim.callback(S1, ep("198.51.100.1"), 0.0) == Busy(60, "target")
    # Source still has exactly its 2 remaining tokens.
    assert lim.callback(S1, ep("198.51.100.2"), 0.0) == ALLOWED
    assert lim.callback(S1, ep("198.51.100.3"), 0.0) == ALLOWED
    assert lim.callback(S1, ep("198.51.100.4"), 0.0) == Busy(20, "source")


def test_source_refusal_does_not_consume_target() -> None:
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), per_target=Rate(2, PER_MIN)))
    t = ep("198.51.100.1")
    assert lim.callback(S1, t, 0.0) == ALLOWED
    for _ in range(20):
        assert lim.callback(S1, t, 0.0) == Busy(60, "source")
    assert lim.callback(S2, t, 0.0) == ALLOWED  # target's second token was never taken
    assert lim.callback(S3, t, 0.0) == Busy(30, "target")


def test_target_port_scope() -> None:
    lim = RateLimiter(cfg(per_target=Rate(5, PER_MIN), per_target_port=Rate(1, PER_MIN)))
    assert lim.callback(S1, ep("198.51.100.1", 15000), 0.0) == ALLOWED
    assert lim.callback(S1, ep("198.51.100.1", 15000), 0.0) == Busy(60, "target_port")
    assert lim.callback(S1, ep("198.51.100.1", 15001), 0.0) == ALLOWED
    assert lim.callback(S1, ep("198.51.100.2", 15000), 0.0) == ALLOWED


def test_global_refusal_does_not_consume_source() -> None:
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), global_=Rate(2, 1.0)))
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    assert lim.callback(S2, ep("198.51.100.2"), 0.0) == ALLOWED
    assert lim.callback(S3, ep("198.51.100.3"), 0.0) == Busy(1, "global")
    assert lim.callback(S3, ep("198.51.100.4"), 0.5) == ALLOWED  # S3's source bucket was untouched


def test_busy_names_the_longest_wait() -> None:
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), global_=Rate(1, 1.0)))
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    assert lim.callback(S1, ep("198.51.100.2"), 0.0) == Busy(60, "source")  # global: 1 s
    assert lim.callback(S2, ep("198.51.100.3"), 0.0) == Busy(1, "global")


def test_admit_takes_the_source_token_alone_and_a_callback_takes_four() -> None:
    lim = RateLimiter(cfg())
    assert lim.admit(S1, 0.0) == ALLOWED
    assert lim.table_sizes() == {"source": 1, "target": 0, "target_port": 0, "global": 0}
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    assert lim.entries == 4


def test_peek_and_owed_take_nothing() -> None:
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), global_=Rate(1, 1.0)))
    assert lim.peek(S1, 0.0) == ALLOWED and lim.owed(S1, 0.0) == ALLOWED
    assert lim.entries == 0
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    assert lim.peek(S1, 0.0) == Busy(60, "source")
    assert lim.peek(S2, 0.0) == Busy(1, "global")  # peek asks the global bucket too
    assert lim.owed(S2, 0.0) == ALLOWED  # owed asks the source's alone
    assert lim.owed(S1, 30.0) == Busy(30, "source")


def test_refused_requests_store_nothing_new() -> None:
    lim = RateLimiter(cfg(global_=Rate(1, 1.0)))
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    for i in range(100):
        assert isinstance(lim.callback(ip(f"10.0.0.{i}"), ep(f"10.1.0.{i}"), 0.0), Busy)
    assert lim.entries == 4


# --- bounded memory ----------------------------------------------------------


@pytest.mark.slow
def test_spray_of_distinct_ipv4_sources_stays_bounded() -> None:
    lim = RateLimiter(cfg(per_source=Rate(30, PER_MIN), max_entries=1000))
    table = lim._source
    base = int(IPv4Address("10.0.0.0"))
    for i in range(200_000):
        assert lim.admit(IPv4Address(base + i), i * 1e-6) == ALLOWED
        assert len(table) <= 1000
    assert len(table) == 1000


def test_spray_of_ipv6_64s_stays_bounded() -> None:
    lim = RateLimiter(cfg(per_source=Rate(30, PER_MIN), max_entries=500))
    base = int(IPv6Address("2001:db8::"))
    for i in range(20_000):
        addr = IPv6Address(base + (i << 64))  # a new /64 each time
        assert lim.callback(addr, Endpoint(addr, 15000), i * 1e-6) == ALLOWED
        assert lim.entries <= 3 * 500 + 1
    assert lim.table_sizes() == {"source": 500, "target": 500, "target_port": 500, "global": 1}


def test_idle_entries_expire() -> None:
    lim = RateLimiter(cfg(per_source=Rate(30, PER_MIN)))  # interval 2 s
    for i in range(100):
        lim.admit(IPv4Address(i + 1), 0.0)

    def expire(now: float) -> int:  # what eviction does when a table is full
        return sum(table.expire(now) for table in lim._tables())

    assert expire(1.9) == 0  # no source bucket has refilled yet
    assert lim.table_sizes()["source"] == 100
    assert expire(2.0) == 100  # one interval later the source buckets are full again
    assert lim.entries == 0


def test_full_entries_are_evicted_before_recent_ones() -> None:
    table = TokenBucketTable(Rate(2, 1.0), max_entries=2)  # interval 0.5 s
    assert table.take("b", 0.0) == table.take("b", 0.0) == 0.0  # b: empty until t=1.0
    assert table.take("a", 0.0) == 0.0  # a: full again at t=0.5; most recently used
    assert table.take("c", 0.6) == 0.0  # LRU is b (not full): a full sweep drops a instead
    assert "a" not in table and "b" in table and "c" in table
    assert table.take("b", 0.6) == 0.0
    assert table.take("b", 0.6) == pytest.approx(0.4)  # b kept its state


def test_lru_eviction_and_refusals_keep_a_key_recent() -> None:
    table = TokenBucketTable(Rate(1, PER_MIN), max_entries=2)
    assert table.take("a", 0.0) == 0.0
    assert table.take("b", 0.0) == 0.0
    assert table.take("a", 1.0) == 59.0  # refused, but marked recently used
    assert table.take("c", 1.0) == 0.0  # evicts b, the least recently used
    assert "a" in table and "b" not in table
    assert table.take("a", 1.0) == 59.0
    assert table.take("b", 1.0) == 0.0  # forgotten: a full bucket again (the trade-off)


# --- reconfigure -------------------------------------------------------------


def _drain(lim: RateLimiter, source: IPv4Address | IPv6Address, n: int, now: float) -> None:
    for _ in range(n):
        assert lim.admit(source, now) == ALLOWED


def test_reconfigure_faster_rate_keeps_used_tokens() -> None:
    lim = RateLimiter(cfg(per_source=Rate(10, PER_MIN)))
    _drain(lim, S1, 10, 0.0)
    lim.reconfigure(cfg(per_source=Rate(20, PER_MIN)))
    _drain(lim, S1, 10, 0.0)  # 10 used of the new 20
    assert lim.admit(S1, 0.0) == Busy(3, "source")


def test_reconfigure_slower_rate_caps_debt_at_an_empty_bucket() -> None:
    lim = RateLimiter(cfg(per_source=Rate(10, PER_MIN)))
    _drain(lim, S1, 10, 0.0)
    lim.reconfigure(cfg(per_source=Rate(2, PER_MIN)))
    assert lim.admit(S1, 0.0) == Busy(30, "source")
    assert lim.admit(S1, 30.0) == ALLOWED
    assert lim.admit(S1, 30.0) == Busy(30, "source")


def test_reconfigure_global_rate_and_untouched_tables() -> None:
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), global_=Rate(1, 1.0)))
    assert lim.callback(S1, ep("198.51.100.1"), 0.0) == ALLOWED
    lim.reconfigure(cfg(per_source=Rate(1, PER_MIN), global_=Rate(2, 3600.0)))
    assert lim.callback(S1, ep("198.51.100.2"), 0.0) == Busy(60, "source")  # state kept
    assert lim.callback(S2, ep("198.51.100.3"), 0.0) == ALLOWED  # 1 used of 2/hour, 1 left
    assert lim.callback(S3, ep("198.51.100.4"), 0.0) == Busy(1800, "global")


def test_reconfigure_prefix_resets_sources() -> None:
    a, b = ip("2001:db8:0:1::1"), ip("2001:db8:0:2::1")
    lim = RateLimiter(cfg(per_source=Rate(1, PER_MIN), ipv6_prefix=64))
    assert lim.admit(a, 0.0) == ALLOWED
    lim.reconfigure(cfg(per_source=Rate(1, PER_MIN), ipv6_prefix=48))
    assert lim.admit(a, 0.0) == ALLOWED  # new identities: a fresh table
    assert lim.admit(b, 0.0) == Busy(60, "source")  # same /48 now


def test_reconfigure_shrinks_tables() -> None:
    lim = RateLimiter(cfg(per_source=Rate(5, PER_MIN), max_entries=100))
    for i in range(100):
        lim.admit(IPv4Address(i + 1), 0.0)
    lim.reconfigure(cfg(per_source=Rate(5, PER_MIN), max_entries=10))
    assert lim.table_sizes()["source"] == 10


# --- properties --------------------------------------------------------------

rates = st.builds(Rate, st.integers(1, 5), st.sampled_from([1.0, 2.0, 60.0]))
events = st.lists(
    st.tuples(st.integers(0, 4), st.integers(0, 3000).map(lambda ms: ms / 1000)),
    min_size=1,
    max_size=150,
)


@given(rate=rates, evs=events)
def test_bucket_invariant(rate: Rate, evs: list[tuple[int, float]]) -> None:
    """In any window [t_i, t_j], a key gets at most count + (t_j - t_i) * rate tokens."""
    table = TokenBucketTable(rate, max_entries=5)  # 5 keys: no eviction, exact invariant
    now = 0.0
    granted: dict[int, list[float]] = {}
    for key, dt in evs:
        now += dt
        if table.take(key, now) == 0.0:
            granted.setdefault(key, []).append(now)
    for times in granted.values():
        for i, start in enumerate(times):
            for j in range(i, len(times)):
                window = times[j] - start
                assert j - i + 1 <= rate.count + window * rate.per_second + 1e-6


@given(
    rate=rates,
    max_entries=st.integers(1, 4),
    evs=st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 500).map(lambda ms: ms / 1000)),
        max_size=200,
    ),
)
def test_table_never_exceeds_cap(
    rate: Rate, max_entries: int, evs: list[tuple[int, float]]
) -> None:
    table = TokenBucketTable(rate, max_entries)
    now = 0.0
    for key, dt in evs:
        now += dt
        wait = table.take(key, now)
        assert wait >= 0.0
        assert len(table) <= max_entries


addrs = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8:0:1::1", "2001:db8:0:1::2"])


@given(
    per_source=rates,
    per_target=rates,
    per_target_port=rates,
    global_=rates,
    reqs=st.lists(
        st.tuples(
            addrs,
            st.none() | st.tuples(addrs, st.sampled_from([15000, 15001])),
            st.integers(0, 2000).map(lambda ms: ms / 1000),
        ),
        min_size=1,
        max_size=60,
    ),
)
def test_retry_after_is_honest(
    per_source: Rate,
    per_target: Rate,
    per_target_port: Rate,
    global_: Rate,
    reqs: list[tuple[str, tuple[str, int] | None, float]],
) -> None:
    """A Busy request repeated exactly retry_after seconds later (nothing in between) passes."""
    lim = RateLimiter(cfg(per_source, per_target, per_target_port, global_))
    now = 0.0
    for src, tgt, dt in reqs:
        now += dt
        source = ip(src)
        target = None if tgt is None else ep(tgt[0], tgt[1])
        result = charge(lim, source, target, now)
        if isinstance(result, Busy):
            assert result.retry_after >= 1
            later = copy.deepcopy(lim)
            assert charge(later, source, target, now + result.retry_after) == ALLOWED
        else:
            assert isinstance(result, Allowed)


def charge(
    lim: RateLimiter, source: IPv4Address | IPv6Address, target: Endpoint | None, now: float
) -> Allowed | Busy:
    """A request's price: a callback's tokens, or (no target) the source's alone."""
    return lim.admit(source, now) if target is None else lim.callback(source, target, now)


def test_ipaddress_objects_are_not_kept_as_keys() -> None:
    # Keys are packed ints: compact, and no reference to caller objects survives.
    lim = RateLimiter(cfg())
    lim.callback(S1, ep("198.51.100.1"), 0.0)
    for table in lim._tables():
        assert all(type(k) is int for k in table._tats)


@pytest.mark.parametrize(
    ("a", "b", "shared"),
    [
        (ep("::1", 15000), ep("0.0.0.1", 15000), False),  # same low bits, other family
        (ep("::ffff:0.0.0.1", 15000), ep("0.0.0.1", 15000), True),  # v4-mapped: same host
        (ep("2001:db8::1", 15000), ep("2001:db8::1", 15001), False),
        (ep("2001:db8::1", 15000), ep("2001:db8::1", 15000), True),
    ],
)
def test_target_port_keys(a: Endpoint, b: Endpoint, shared: bool) -> None:
    lim = RateLimiter(cfg(per_target_port=Rate(1, PER_MIN)))
    assert lim.callback(S1, a, 0.0) == ALLOWED
    assert lim.callback(S1, b, 0.0) == (Busy(60, "target_port") if shared else ALLOWED)


@given(
    rate=rates,
    max_entries=st.integers(1, 7),  # below 8 the full sweep runs on every eviction
    evs=st.lists(
        st.tuples(st.integers(0, 12), st.integers(0, 1500).map(lambda ms: ms / 1000)),
        max_size=120,
    ),
)
def test_full_buckets_are_evicted_first(
    rate: Rate, max_entries: int, evs: list[tuple[int, float]]
) -> None:
    """A bucket that is not full is only forgotten when no full one was left to drop."""
    table = TokenBucketTable(rate, max_entries)
    now = 0.0
    for key, dt in evs:
        now += dt
        before = dict(table._tats)  # white-box: key -> time at which the bucket is full
        if table.take(key, now) > 0.0:
            continue
        lost = [k for k in before if k not in table]
        if any(before[k] > now for k in lost):
            assert all(tat > now for tat in before.values())


def test_penalize_takes_a_spare_token_and_never_goes_into_debt() -> None:
    limiter = RateLimiter(RateLimitConfig(per_source=Rate(3, 60.0)))
    src = ip_address("10.0.0.1")
    assert isinstance(limiter.admit(src, 0.0), Allowed)
    assert limiter.penalize(src, 0.0) and limiter.penalize(src, 0.0)  # tokens 2 and 3
    assert not limiter.penalize(src, 0.0)  # none left: no debt
    busy = limiter.admit(src, 0.0)
    assert isinstance(busy, Busy) and busy.retry_after == 20  # one token back in 20 s, not later
    assert isinstance(limiter.admit(src, 20.0), Allowed)
    # only the source's own bucket: the target and global buckets are untouched
    assert limiter.table_sizes()["target"] == 0 and limiter.table_sizes()["global"] == 0


def test_under_pressure_a_protocol_error_fines_its_source_into_debt() -> None:
    # per_source 10/minute (a token every 6 s); the registry "under pressure" after
    # 2 errors an hour; then each error fines its source 30 tokens, into debt, but
    # never past one full period beyond an empty bucket.
    limiter = RateLimiter(
        RateLimitConfig(per_source=Rate(10, 60.0), errors_global=Rate(2, 3600.0), error_fine=30)
    )
    a, b = ip_address("10.0.0.1"), ip_address("10.0.0.2")
    assert isinstance(limiter.admit(a, 0.0), Allowed)  # door
    assert limiter.penalize(a, 0.0)  # error 1: the usual second token (2 used)
    assert limiter.penalize(b, 0.0)  # error 2: still usual
    assert isinstance(limiter.admit(a, 0.0), Allowed)  # 3 used
    assert limiter.penalize(a, 0.0)  # error 3: pressure: fined, into debt
    busy = limiter.admit(a, 0.0)
    # 3 used (tat 18 s) + 30 fined = tat 198 s, capped at now + 2 periods = 120 s:
    # the next token at 120 + 6 - 60 = 66 s
    assert isinstance(busy, Busy) and busy.retry_after == 66 and busy.scope == "source"
    assert isinstance(limiter.admit(a, 65.9), Busy)
    assert isinstance(limiter.admit(a, 66.0), Allowed)
    # b, fined once under pressure from a full bucket: 30 tokens (capped), 66 s as well
    assert limiter.penalize(b, 0.0)
    assert limiter.admit(b, 0.0) == Busy(66, "source")


@pytest.mark.parametrize(
    ("per_source", "used", "wait"),
    [
        (Rate(30, 60.0), 2, 62),  # the default: a fresh source's first fine, about a minute
        (Rate(30, 60.0), 30, 62),  # from an empty bucket: the same cap
        (Rate(5, 60.0), 1, 72),  # the internet profile: up to two periods minus a burst
        (Rate(600, 60.0), 2, 3.1),  # 30 tokens of 600/minute: 3 s of debt, from empty
    ],
)
def test_a_fine_counts_from_an_empty_bucket(per_source: Rate, used: int, wait: float) -> None:
    # The unused part of a source's burst does not pay the fine: it would leave a
    # source that sent junk at once only a few seconds' wait (30 of 30/minute: 6 s).
    limiter = RateLimiter(
        RateLimitConfig(per_source=per_source, errors_global=Rate(1, 3600.0), error_fine=30)
    )
    src, other = ip_address("10.0.0.1"), ip_address("10.0.0.2")
    assert limiter.penalize(other, 0.0)  # uses up errors_global: under pressure from now
    for _ in range(used):
        assert isinstance(limiter.admit(src, 0.0), Allowed)
    assert limiter.penalize(src, 0.0) and limiter.under_pressure
    busy = limiter.admit(src, 0.0)
    assert isinstance(busy, Busy) and busy.retry_after == math.ceil(wait), busy


def test_under_pressure_from_an_empty_errors_bucket_until_it_refilled() -> None:
    # errors_global 2/second (a token every 0.5 s): the third error within a second
    # starts the pressure; a token back does not end it (the refill would let two
    # errors a second through unfined), only the whole burst back does; checks at
    # the door change nothing.
    limiter = RateLimiter(RateLimitConfig(errors_global=Rate(2, 1.0)))
    src = ip_address("10.0.0.1")
    states = []
    # tokens before each error: 2, 1, 0, 0, 1, 0; then errors at the rate (one each
    # 0.5 s: 1, 1) keep it on; by 2.5 s the burst is back: off
    for now in (0.0, 0.0, 0.0, 0.1, 0.6, 0.6, 1.4, 1.9, 2.5):
        limiter.penalize(src, now)
        states.append(limiter.under_pressure)
        limiter.admit(src, now)
        assert limiter.under_pressure is states[-1]
    assert states == [False, False, True, True, True, True, True, True, False]


def test_error_fine_zero_keeps_the_usual_price_under_pressure() -> None:
    limiter = RateLimiter(
        RateLimitConfig(per_source=Rate(3, 60.0), errors_global=Rate(1, 3600.0), error_fine=0)
    )
    src = ip_address("10.0.0.1")
    assert limiter.penalize(src, 0.0) and limiter.penalize(src, 0.0)  # pressure from the 2nd
    assert limiter.penalize(src, 0.0)  # the third token, still no debt
    assert not limiter.penalize(src, 0.0)
    assert limiter.admit(src, 0.0) == Busy(20, "source")


def test_the_pressure_bucket_refills_and_follows_a_reload() -> None:
    limiter = RateLimiter(
        RateLimitConfig(per_source=Rate(100, 60.0), errors_global=Rate(1, 10.0), error_fine=50)
    )
    src = ip_address("10.0.0.1")
    limiter.penalize(src, 0.0)  # the pressure budget's one token
    limiter.penalize(src, 10.0)  # refilled 10 s later: usual price again
    assert isinstance(limiter.admit(src, 10.0), Allowed)
    limiter.reconfigure(
        RateLimitConfig(per_source=Rate(100, 60.0), errors_global=Rate(1, 10.0), error_fine=0)
    )
    limiter.penalize(src, 10.0)  # budget empty, but fines are off now
    assert isinstance(limiter.admit(src, 10.0), Allowed)


def test_check_without_the_source_leaves_its_bucket_alone() -> None:
    limiter = RateLimiter(RateLimitConfig(per_source=Rate(1, 60.0)))
    src = ip_address("10.0.0.1")
    target = Endpoint(src, 15000)
    for _ in range(5):  # the door charged the source already: only target buckets here
        assert isinstance(limiter.paid_callback(target, 0.0), Allowed)
    assert isinstance(limiter.admit(src, 0.0), Allowed)
