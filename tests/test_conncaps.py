"""registry.defense.conncaps: connection caps (total, per source) and callback admission."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.defense.conncaps import PER_SOURCE, TOTAL, CallbackSlots, ConnectionCaps

A, B, C = IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), IPv6Network("2001:db8::/64")


# --- ConnectionCaps ----------------------------------------------------------

# Each step: ("acquire", key, expected reason) or ("release", key, None); then (total, count(A)).
SCRIPTS = {
    "per_source_cap": (
        (5, 2),
        [
            ("acquire", A, None, 1, 1),
            ("acquire", A, None, 2, 2),
            ("acquire", A, PER_SOURCE, 2, 2),
            ("acquire", B, None, 3, 2),
            ("release", A, None, 2, 1),
            ("acquire", A, None, 3, 2),
        ],
    ),
    "total_cap_before_per_source": (
        (2, 2),
        [
            ("acquire", A, None, 1, 1),
            ("acquire", B, None, 2, 1),
            ("acquire", C, TOTAL, 2, 1),
            ("acquire", A, TOTAL, 2, 1),  # total is checked first
            ("release", B, None, 1, 1),
            ("acquire", C, None, 2, 1),
        ],
    ),
    "release_unknown_is_harmless": (
        (2, 1),
        [
            ("release", A, None, 0, 0),
            ("acquire", B, None, 1, 0),
            ("release", A, None, 1, 0),
            ("release", B, None, 0, 0),
            ("release", B, None, 0, 0),  # double release: never negative
        ],
    ),
    "zero_caps_refuse_all": (
        (0, 0),
        [("acquire", A, TOTAL, 0, 0)],
    ),
    "zero_per_source": (
        (3, 0),
        [("acquire", A, PER_SOURCE, 0, 0)],
    ),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_connection_caps_script(name: str) -> None:
    (max_total, max_per_source), steps = SCRIPTS[name]
    caps = ConnectionCaps(max_total, max_per_source)
    for op, key, reason, total, count_a in steps:
        if op == "acquire":
            assert caps.acquire(key) == reason, (op, key)
        else:
            caps.release(key)
        assert (caps.total, caps.count(A)) == (total, count_a), (op, key)


def test_release_to_zero_removes_the_key() -> None:
    caps = ConnectionCaps(10, 3)
    for _ in range(3):
        assert caps.acquire(A) is None
    assert caps.sources == 1
    for _ in range(3):
        caps.release(A)
    assert caps.sources == 0 and caps.total == 0 and caps.count(A) == 0


def test_keys_never_exceed_max_total() -> None:
    caps = ConnectionCaps(100, 1)
    refused = [caps.acquire(IPv4Address(i + 1)) for i in range(10_000)]
    assert refused.count(None) == 100 and refused.count(TOTAL) == 9_900
    assert caps.sources == 100


def test_reconfigure_lowers_caps_without_cutting_open_connections() -> None:
    caps = ConnectionCaps(10, 5)
    for _ in range(4):
        assert caps.acquire(A) is None
    caps.reconfigure(10, 2)
    assert (caps.total, caps.count(A)) == (4, 4)
    assert caps.acquire(A) == PER_SOURCE
    caps.release(A)
    caps.release(A)
    assert caps.acquire(A) == PER_SOURCE  # 2 open, cap 2
    caps.release(A)
    assert caps.acquire(A) is None
    caps.reconfigure(1, 2)
    assert caps.acquire(B) == TOTAL
    assert (caps.max_total, caps.max_per_source) == (1, 2)


@given(
    max_total=st.integers(0, 6),
    max_per_source=st.integers(0, 3),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 4)), max_size=100),
)
def test_connection_caps_model(
    max_total: int, max_per_source: int, ops: list[tuple[bool, int]]
) -> None:
    """Against a plain model: counts match, caps hold, nothing negative, no empty keys."""
    caps = ConnectionCaps(max_total, max_per_source)
    model: dict[int, int] = {}
    for is_acquire, key in ops:
        if is_acquire:
            if sum(model.values()) >= max_total:
                expected: str | None = TOTAL
            elif model.get(key, 0) >= max_per_source:
                expected = PER_SOURCE
            else:
                expected = None
                model[key] = model.get(key, 0) + 1
            assert caps.acquire(key) == expected
        else:
            caps.release(key)
            if model.get(key, 0) > 0:
                model[key] -= 1
        assert caps.total == sum(model.values()) <= max_total
        assert all(caps.count(k) == model.get(k, 0) <= max_per_source for k in range(5))
        assert caps.sources == sum(1 for v in model.values() if v > 0)


# --- CallbackSlots -----------------------------------------------------------


def test_callback_slots_admission() -> None:
    slots = CallbackSlots(max_in_flight=2, max_queue=3)
    admitted = [slots.admit() for _ in range(7)]
    assert admitted == [True] * 5 + [False] * 2
    assert (slots.in_flight, slots.waiting, slots.admitted) == (2, 3, 5)
    slots.done()
    assert (slots.in_flight, slots.waiting) == (2, 2)  # a waiter takes the freed slot
    assert slots.admit() is True
    assert slots.admit() is False
    for _ in range(5):
        slots.done()
    assert (slots.in_flight, slots.waiting) == (0, 0)
    slots.done()  # extra done: never negative
    assert slots.admitted == 0


@pytest.mark.parametrize(
    ("max_in_flight", "max_queue", "admits"),
    [(0, 0, 0), (1, 0, 1), (0, 2, 2), (3, 1, 4)],
)
def test_callback_slots_capacity(max_in_flight: int, max_queue: int, admits: int) -> None:
    slots = CallbackSlots(max_in_flight, max_queue)
    results = [slots.admit() for _ in range(admits + 3)]
    assert results == [True] * admits + [False] * 3
    assert slots.in_flight == min(admits, max_in_flight)
    assert slots.waiting == admits - slots.in_flight


def test_callback_slots_reconfigure() -> None:
    slots = CallbackSlots(2, 2)
    assert all(slots.admit() for _ in range(4))
    slots.reconfigure(1, 1)
    assert (slots.in_flight, slots.waiting) == (1, 3)
    assert slots.admit() is False
    slots.done()
    slots.done()
    assert slots.admit() is False  # 2 admitted, cap 1 + 1
    slots.done()
    assert slots.admit() is True
