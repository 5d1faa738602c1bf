"""Stateless UDP cookies: proof that a request's source address can receive.

A UDP source can be forged, so a UDP request causes a callback only with a
cookie the registry sent to that very address and port a short while ago
(the DNS-cookie / QUIC-retry idea). Nothing is stored per client; the
construction, its lifetime and rotation: docs/architecture.md, "UDP cookies".
Pure: time and randomness are passed in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import struct

from registry.model import Endpoint
from registry.policy.addresses import Address

MAC_BYTES = 12  # 96 bits: forging one needs ~2**95 guesses inside one window
COOKIE_CHARS = 16  # base64url of MAC_BYTES, no padding
MIN_SECRET_BYTES = 16


def _message(source: Endpoint, window: int) -> bytes:
    """Fixed-layout MAC input: family byte, packed address, port, window index."""
    host = Address.of(source.host).peer
    return struct.pack("!B", host.version) + host.packed + struct.pack("!Hq", source.port, window)


def _mac(secret: bytes, source: Endpoint, window: int) -> str:
    digest = hmac.new(secret, _message(source, window), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:MAC_BYTES]).decode("ascii").rstrip("=")


class CookieJar:
    """Issue and check cookies; ``window`` in seconds, ``secret`` at least
    ``MIN_SECRET_BYTES`` bytes (the edge passes ``os.urandom(32)``)."""

    def __init__(self, secret: bytes, window: float, *, now: float = 0.0) -> None:
        if not (window > 0 and math.isfinite(window)):
            raise ValueError("the cookie window must be a positive number of seconds")
        _check_secret(secret)
        self.window = float(window)
        self._secret = secret
        self._previous: bytes | None = None
        self.rotated_at = now  # when the current secret took over (the edge's schedule)

    def rotation_due(self, now: float) -> bool:
        """A full window has passed since the current secret took over."""
        return now - self.rotated_at >= self.window

    def window_index(self, now: float) -> int:
        """The number of the window ``now`` falls in (windows start at time 0)."""
        return math.floor(now / self.window)

    def issue(self, source: Endpoint, now: float) -> str:
        """The cookie for ``source`` at ``now``: 16 URL-safe base64 characters."""
        return _mac(self._secret, source, self.window_index(now))

    def check(self, cookie: str | None, source: Endpoint, now: float) -> bool:
        """True if ``cookie`` was issued to ``source`` in this or the previous window.
        Every candidate is compared in constant time: timing tells nothing of a guess."""
        if not cookie or len(cookie) != COOKIE_CHARS or not cookie.isascii():
            return False
        given = cookie.encode("ascii")
        index = self.window_index(now)
        ok = False
        for secret in (self._secret, self._previous):
            if secret is None:
                continue
            for window in (index, index - 1):
                expected = _mac(secret, source, window).encode("ascii")
                ok |= hmac.compare_digest(given, expected)
        return ok

    def rotate(self, new_secret: bytes, now: float | None = None) -> None:
        """Issue under ``new_secret`` from now on; the old secret is accepted until the next rotation."""
        _check_secret(new_secret)
        self._previous = self._secret
        self._secret = new_secret
        if now is not None:
            self.rotated_at = now


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a cookie secret needs at least {MIN_SECRET_BYTES} bytes")
