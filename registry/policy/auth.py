"""Optional per-student tokens (``[auth] mode = "token"``). Pure.

A token is an HMAC of the student's (NFC) name under the instructor's
secret, so the registry stores no table of tokens and recomputes it per
request; the construction: docs/architecture.md, "Student tokens".
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
