"""Who may use the admin endpoint: pure decisions, no sockets.

With ``server.admin_token`` set, every path but ``/healthz`` needs
``Authorization: Bearer <token>`` or the dashboard cookie (constant-time
compares). ``/?token=<token>`` once sends a browser (303) to the same URL
without the token, with the HttpOnly SameSite=Strict cookie
``ISSUED.HMAC-SHA256(token, "registry-admin-cookie/v2" NUL ISSUED)``: it never
holds the token, dies with it (SIGHUP), and expires after ``COOKIE_MAX_AGE``
whatever the browser does (cookies are not scoped by port, so a stolen one
must not last). Without a token, a ``Host`` that is a DNS name other than
``localhost`` is refused (403): DNS rebinding would let a web page read
students' data through 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlencode

COOKIE = "registry_admin"
COOKIE_MAX_AGE = 12 * 3600
_CLOCK_SKEW = 60  # a cookie issued this far "in the future" is still ours (clock steps)
_DOMAIN = b"registry-admin-cookie/v2\x00"


class Verdict(Enum):
    ALLOW = "allow"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"  # a DNS name in Host and no token: the DNS rebinding guard


@dataclass(frozen=True, slots=True)
class Login:
    """The token was in the URL: set the cookie and send the browser on without it."""

    location: str
    set_cookie: str


Decision = Verdict | Login


def host_allowed(host: str | None) -> bool:
    """DNS-rebinding guard: an IP literal or ``localhost`` (with or without a port)."""
    if not host:
        return True  # HTTP/1.0 without Host: not a browser following a DNS name
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].split("]", 1)[0]
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    if name in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _mac(token: str, issued: int) -> str:
    return hmac.new(token.encode(), _DOMAIN + str(issued).encode(), hashlib.sha256).hexdigest()


def cookie_value(token: str, issued: int) -> str:
    """The dashboard cookie's value for ``token``, issued at ``issued`` (unix seconds)."""
    return f"{issued}.{_mac(token, issued)}"


def cookie_valid(value: str, token: str, now: float) -> bool:
    """Made with this token, and younger than ``COOKIE_MAX_AGE`` at ``now``."""
    issued_text, dot, mac = value.partition(".")
    if not dot or not issued_text.isdigit() or len(issued_text) > 12:
        return False
    issued = int(issued_text)
    if not issued - _CLOCK_SKEW <= now < issued + COOKIE_MAX_AGE:
        return False
    return _same(mac, _mac(token, issued))


def cookies(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep:
            jar.setdefault(name, value)
    return jar


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "replace"), b.encode("utf-8", "replace"))


def check(
    path: str,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    token: str,
    now: float,
) -> Decision:
    """May this request proceed? ``headers`` lower-cased, ``token`` the one in force."""
    if path == "/healthz":
        return Verdict.ALLOW
    if not token:
        return Verdict.ALLOW if host_allowed(headers.get("host")) else Verdict.FORBIDDEN
    scheme, _, presented = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and _same(presented.strip(), token):
        return Verdict.ALLOW
    cookie = cookies(headers.get("cookie", "")).get(COOKIE, "")
    if cookie and cookie_valid(cookie, token, now):
        return Verdict.ALLOW
    if path == "/" and "token" in query and _same(query["token"], token):
        rest = {k: v for k, v in query.items() if k != "token"}
        location = "/" + ("?" + urlencode(rest) if rest else "")
        value = cookie_value(token, int(now))
        attributes = f"Path=/; Max-Age={COOKIE_MAX_AGE}; HttpOnly; SameSite=Strict"
        return Login(location, f"{COOKIE}={value}; {attributes}")
    return Verdict.UNAUTHORIZED
