"""Optional per-student tokens (``[auth] mode = "token"``).

Pure. A token is derived from the instructor's secret and the student name,
so the registry stores no table of tokens: the instructor hands each student
``derive_token(secret, name)`` and the registry recomputes it on every
request.

    token = base64url(HMAC-SHA256(secret, b"callback-lab/student-token/v1\\0" + name))[:22]

22 base64url characters carry 132 bits, beyond guessing; the fixed prefix
keeps these MACs apart from any other use of the same secret (UDP cookies
use their own). Names arrive in Unicode NFC (the parsers and ``registry
token`` normalise them, registry/protocol/names.py), so ``josé`` typed either
way has one token; otherwise they are compared exactly (case matters). The
comparison is :func:`hmac.compare_digest`, whose time does not depend on
where the first differing character is.

The secret bytes come from ``registry.config.auth_secret`` (it reads
``auth.secret_file``, which is I/O).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from registry.config import AuthConfig
from registry.model import Code, Request
from registry.policy.decide import Deny

TOKEN_LENGTH = 22
_DOMAIN = b"callback-lab/student-token/v1\x00"


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate must yield a (wrong) byte string, not an exception
    return text.encode("utf-8", "surrogatepass")


def derive_token(secret: bytes, student: str) -> str:
    """The token of ``student`` under ``secret``: 22 base64url characters."""
    mac = hmac.new(secret, _DOMAIN + _utf8(student), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).decode("ascii")[:TOKEN_LENGTH]


def check_token(secret: bytes, student: str, token: str) -> bool:
    """True when ``token`` is the token of ``student``; constant-time comparison."""
    expected = derive_token(secret, student).encode("ascii")
    # Always compare, even for a wrong length, so every failure takes one path.
    return hmac.compare_digest(expected, _utf8(token))


def authorize(request: Request, auth: AuthConfig, secret: bytes) -> Deny | None:
    """None when the request may proceed, else ``Deny(unauthorized)``.

    Fails closed: an unknown ``auth.mode`` or an empty secret in token mode
    refuses everyone (an empty HMAC key would let anyone compute tokens).
    """
    if auth.mode == "none":
        return None
    if auth.mode != "token":
        return _unauthorized(
            f"the registry's auth.mode {auth.mode!r} is unknown; ask the instructor"
        )
    if not secret:
        return _unauthorized("token authentication has no secret configured; ask the instructor")
    student, token = request.student, request.token
    if not student or not token:
        return _unauthorized(
            "this registry requires student=NAME token=TOKEN in the request "
            "(student client --student NAME --token TOKEN)"
        )
    if not check_token(secret, student, token):
        return _unauthorized("the token does not match the student name; check both for typos")
    return None


def _unauthorized(why: str) -> Deny:
    return Deny(Code.UNAUTHORIZED, why[0].upper() + why[1:] + ".")
