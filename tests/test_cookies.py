"""Stateless UDP cookies: issue/check, window expiry, secret rotation, source binding."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.model import Endpoint
from registry.protocol.cookies import COOKIE_CHARS, CookieJar

SECRET = b"s" * 32
OTHER = b"o" * 32
THIRD = b"t" * 32
WINDOW = 30.0
A = Endpoint(ipaddress.ip_address("198.51.100.7"), 40000)


def _ep(host: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(host), port)


def test_issue_is_short_url_safe_and_deterministic() -> None:
    jar = CookieJar(SECRET, WINDOW)
    cookie = jar.issue(A, 100.0)
    assert len(cookie) == COOKIE_CHARS
    assert all(ch.isalnum() or ch in "-_" for ch in cookie)
    assert jar.issue(A, 119.0) == cookie  # same window, same cookie: no state needed
    assert jar.issue(A, 120.0) != cookie  # next window
    assert CookieJar(OTHER, WINDOW).issue(A, 100.0) != cookie


@pytest.mark.parametrize(
    ("issued_at", "checked_at", "valid"),
    [
        (100.0, 100.0, True),
        (100.0, 119.9, True),  # same window
        (100.0, 120.0, True),  # the next window still accepts the previous one
        (100.0, 149.9, True),
        (100.0, 150.0, False),  # two windows on: expired
        (100.0, 1000.0, False),
        (100.0, 89.9, False),  # a cookie from the "future" window is not accepted back in time
        (89.9, 90.0, True),  # issued at the very end of a window: still a full window of life
        (89.9, 119.9, True),
        (89.9, 120.0, False),
    ],
)
def test_window_expiry(issued_at: float, checked_at: float, valid: bool) -> None:
    jar = CookieJar(SECRET, WINDOW)
    assert jar.check(jar.issue(A, issued_at), A, checked_at) is valid


def test_rotation_keeps_the_previous_secret_only() -> None:
    jar = CookieJar(SECRET, WINDOW)
    old = jar.issue(A, 100.0)
    jar.rotate(OTHER, 105.0)
    assert jar.rotated_at == 105.0
    assert jar.check(old, A, 110.0)  # issued under the previous secret: still good
    new = jar.issue(A, 110.0)
    assert new != old and jar.check(new, A, 110.0)
    jar.rotate(THIRD)
    assert not jar.check(old, A, 110.0)  # two rotations: the first secret is gone
    assert jar.check(new, A, 110.0)


def test_rotation_due() -> None:
    jar = CookieJar(SECRET, WINDOW, now=10.0)
    assert not jar.rotation_due(39.9)
    assert jar.rotation_due(40.0)
    jar.rotate(OTHER, 40.0)
    assert not jar.rotation_due(69.0)


@pytest.mark.parametrize(
    "other",
    [
        _ep("198.51.100.7", 40001),  # another port
        _ep("198.51.100.8", 40000),  # another address
        _ep("2001:db8::7", 40000),  # another family
        _ep("::ffff:198.51.100.8", 40000),
    ],
)
def test_a_cookie_is_bound_to_its_source(other: Endpoint) -> None:
    jar = CookieJar(SECRET, WINDOW)
    assert not jar.check(jar.issue(A, 100.0), other, 100.0)


def test_v4_mapped_source_shares_the_ipv4_cookie() -> None:
    jar = CookieJar(SECRET, WINDOW)
    mapped = _ep("::ffff:198.51.100.7", 40000)
    assert jar.issue(mapped, 5.0) == jar.issue(A, 5.0)
    assert jar.check(jar.issue(A, 5.0), mapped, 5.0)


@pytest.mark.parametrize(
    "cookie", [None, "", "short", "x" * COOKIE_CHARS, "é" * COOKIE_CHARS, "a" * 200]
)
def test_junk_cookies_fail_without_raising(cookie: str | None) -> None:
    assert not CookieJar(SECRET, WINDOW).check(cookie, A, 100.0)


@pytest.mark.parametrize(
    ("secret", "window"),
    [(b"short", 30.0), (SECRET, 0.0), (SECRET, -1.0), (SECRET, float("inf"))],
)
def test_bad_parameters_are_refused(secret: bytes, window: float) -> None:
    with pytest.raises(ValueError):
        CookieJar(secret, window)


def test_rotate_refuses_a_short_secret() -> None:
    with pytest.raises(ValueError):
        CookieJar(SECRET, WINDOW).rotate(b"tiny")


ADDRESSES = st.one_of(
    st.ip_addresses(v=4),
    st.ip_addresses(v=6),
)
ENDPOINTS = st.builds(Endpoint, ADDRESSES, st.integers(min_value=0, max_value=65535))


def _unmapped(ep: Endpoint) -> tuple[object, int]:
    host = ep.host
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        host = host.ipv4_mapped
    return host, ep.port


@given(
    ENDPOINTS,
    ENDPOINTS,
    st.floats(min_value=0, max_value=1e9),
    st.floats(min_value=0, max_value=2 * WINDOW),
    st.binary(min_size=16, max_size=64),
)
def test_no_cookie_validates_for_a_different_source(
    source: Endpoint, other: Endpoint, now: float, later: float, secret: bytes
) -> None:
    jar = CookieJar(secret, WINDOW)
    cookie = jar.issue(source, now)
    if _unmapped(source) == _unmapped(other):
        assert jar.check(cookie, other, now)
    else:
        assert not jar.check(cookie, other, now + later)
        assert not jar.check(cookie, other, now)
