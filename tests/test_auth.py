"""registry.policy.auth: per-student tokens (derive, check, authorize)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.config import AuthConfig
from registry.model import Code, Request
from registry.policy import auth
from registry.policy.auth import TOKEN_LENGTH, authorize, check_token, derive_token
from registry.policy.decide import Deny

SECRET = b"correct horse battery staple"
URLSAFE = set(string.ascii_letters + string.digits + "-_")


def test_derive_token_shape_and_value() -> None:
    token = derive_token(SECRET, "alice")
    assert len(token) == TOKEN_LENGTH >= 22 and set(token) <= URLSAFE
    # Pinned to the documented construction, so tokens handed out stay valid.
    mac = hmac.new(SECRET, b"callback-lab/student-token/v1\x00alice", hashlib.sha256).digest()
    assert token == base64.urlsafe_b64encode(mac).decode()[:22]


def test_derive_token_is_deterministic_and_distinct() -> None:
    assert derive_token(SECRET, "alice") == derive_token(SECRET, "alice")
    assert derive_token(SECRET, "alice") != derive_token(SECRET, "bob")
    assert derive_token(SECRET, "alice") != derive_token(SECRET, "Alice")
    assert derive_token(SECRET, "alice") != derive_token(b"other secret", "alice")


@pytest.mark.parametrize(
    ("student", "token", "ok"),
    [
        ("alice", derive_token(SECRET, "alice"), True),
        ("bob", derive_token(SECRET, "alice"), False),  # wrong student
        ("alice", derive_token(SECRET, "bob"), False),  # someone else's token
        ("alice", derive_token(b"x", "alice"), False),  # other secret
        ("alice", derive_token(SECRET, "alice")[:-1], False),  # truncated
        ("alice", derive_token(SECRET, "alice") + "A", False),  # extended
        ("alice", derive_token(SECRET, "alice").upper(), False),  # case matters
        ("alice", "", False),
        ("alice", "\u00e9" * 22, False),  # non-ASCII must not raise
        ("alice", "\ud800", False),  # lone surrogate must not raise
        ("\ud800", derive_token(SECRET, "\ud800"), True),
    ],
)
def test_check_token(student: str, token: str, ok: bool) -> None:
    assert check_token(SECRET, student, token) is ok


def test_check_token_uses_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert check_token(SECRET, "alice", derive_token(SECRET, "alice"))
    assert not check_token(SECRET, "alice", "short")  # a wrong length still compares
    assert len(calls) == 2


@given(st.text(max_size=40), st.text(max_size=40))
def test_check_token_is_total(student: str, token: str) -> None:
    assert check_token(SECRET, student, token) is (token == derive_token(SECRET, student))


# --- authorize ----------------------------------------------------------------------

TOKEN = AuthConfig(mode="token", secret="s3cret")
GOOD = derive_token(b"s3cret", "alice")


def req(student: str | None = None, token: str | None = None) -> Request:
    return Request(ipaddress.ip_address("203.0.113.5"), 15000, student, token)


@pytest.mark.parametrize(
    ("cfg", "secret", "student", "token", "ok"),
    [
        (AuthConfig(), b"", None, None, True),  # mode none: nothing asked
        (AuthConfig(), b"", "alice", "junk", True),
        (TOKEN, b"s3cret", "alice", GOOD, True),
        (TOKEN, b"s3cret", None, None, False),
        (TOKEN, b"s3cret", "alice", None, False),
        (TOKEN, b"s3cret", None, GOOD, False),
        (TOKEN, b"s3cret", "", GOOD, False),
        (TOKEN, b"s3cret", "bob", GOOD, False),
        (TOKEN, b"s3cret", "alice", "x" * 22, False),
        (TOKEN, b"", "alice", derive_token(b"", "alice"), False),  # empty secret fails closed
        (AuthConfig(mode="magic"), b"s3cret", "alice", GOOD, False),  # unknown mode fails closed
    ],
)
def test_authorize(cfg: AuthConfig, secret: bytes, student: Any, token: Any, ok: bool) -> None:
    d = authorize(req(student, token), cfg, secret)
    if ok:
        assert d is None
    else:
        assert isinstance(d, Deny) and d.code is Code.UNAUTHORIZED
        assert d.explanation.isascii() and GOOD not in d.explanation


def test_authorize_tells_what_is_missing() -> None:
    d = authorize(req(), TOKEN, b"s3cret")
    assert d is not None and "student=NAME token=TOKEN" in d.explanation
