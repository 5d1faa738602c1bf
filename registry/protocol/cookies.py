"""Stateless UDP cookies: proof that a request's source address can receive, so a
forged source causes no callback. Pure (time and secrets handed in); the
construction, lifetime and rotation: docs/architecture.md, "UDP cookies"."""

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


def _mac(secret: bytes, source: Endpoint, window: int) -> str:
    host = Address.of(source.host).peer  # family, packed address, port, window: a fixed layout
    message = bytes([host.version]) + host.packed + struct.pack("!Hq", source.port, window)
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:MAC_BYTES]).decode("ascii").rstrip("=")


class CookieJar:
    """Issue and check cookies; ``window`` in seconds, ``secret`` at least
    ``MIN_SECRET_BYTES`` bytes (the edge passes ``os.urandom(32)``)."""

    def __init__(self, secret: bytes, window: float, *, now: float = 0.0) -> None:
        if not (window > 0 and math.isfinite(window)):
            raise ValueError("the cookie window must be a positive number of seconds")
        self.window = float(window)
        self._secret = b""  # none yet: the first secret is taken as a rotation
        self.rotate(secret, now)

    def rotation_due(self, now: float) -> bool:
        """A full window has passed since the current secret took over."""
        return now - self.rotated_at >= self.window

    def issue(self, source: Endpoint, now: float) -> str:
        """The cookie for ``source`` at ``now``: 16 URL-safe base64 characters."""
        return _mac(self._secret, source, math.floor(now / self.window))

    def check(self, cookie: str | None, source: Endpoint, now: float) -> bool:
        """True if ``cookie`` was issued to ``source`` in this or the previous window.
        Every candidate is compared in constant time: timing tells nothing of a guess."""
        if not cookie or len(cookie) != COOKIE_CHARS or not cookie.isascii():
            return False
        given = cookie.encode("ascii")
        index = math.floor(now / self.window)
        ok = False
        for secret in filter(None, (self._secret, self._previous)):
            for window in (index, index - 1):
                ok |= hmac.compare_digest(given, _mac(secret, source, window).encode("ascii"))
        return ok

    def rotate(self, new_secret: bytes, now: float | None = None) -> None:
        """Issue under ``new_secret`` from now on; the old one is accepted until the next
        rotation. ``now``: when the new secret took over (the edge's schedule)."""
        if not isinstance(new_secret, bytes) or len(new_secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a cookie secret needs at least {MIN_SECRET_BYTES} bytes")
        self._previous, self._secret = self._secret, new_secret
        if now is not None:
            self.rotated_at = now
