"""The lab's own registration format: ``HOST:PORT[ key=value ...]``, sans-io.

Strict: only the canonical four-part decimal form is IPv4; ``127.1``,
``0x7f.0.0.1`` ... are refused with the reason, never reinterpreted
(SECURITY.md, "Parse strictly"). ``TextReceiver`` frames a line from a stream.
"""

from __future__ import annotations

import ipaddress
import re

from registry.errors import ProtocolError
from registry.model import Code, IPAddress, Request
from registry.policy.addresses import Address, Address6, dotted_quad
from registry.protocol.names import BadName, normalise
from registry.protocol.reply import quote_input

EXAMPLE = "192.168.1.105:15000"
EXAMPLE6 = "[2001:db8::1]:15000"
_FIX, _FIX6 = f"write HOST:PORT, like {EXAMPLE}", f"write [IPv6]:PORT, like {EXAMPLE6}"
DEFAULT_MAX_BYTES = 512
KEYS = ("student", "token", "verify")  # what a request may add to HOST:PORT (UDP: and cookie)

_SEP = re.compile(r"[ \t]+")
# C0 controls except TAB (a separator), DEL, and the C1 range: none belongs in a
# request, and several would drive the terminal of whoever reads the logs.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
_HEX_PART = re.compile(r"0[xX][0-9a-fA-F]*", re.ASCII)
_OCTAL_BAD = re.compile(r"0[0-7]*[89][0-9]*", re.ASCII)  # a leading zero, then 8 or 9
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_SECRET = re.compile(r"[\x21-\x7e]{1,128}", re.ASCII)
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT"})
_WHITESPACE = b" \t\r"


# What a receiver (and the reader over it) decides: the request, the error to answer,
# or None while the request is incomplete.
Decision = Request | ProtocolError | None


def _malformed(explanation: str) -> ProtocolError:
    return ProtocolError(Code.MALFORMED, explanation)


def parse_line(line: str | bytes, *, allow_cookie: bool = False) -> Request:
    """One registration line (one trailing LF or CR LF stripped) as a ``Request``;
    ``ProtocolError(MALFORMED)`` explains in printable ASCII, quoting little of the
    input. ``cookie=`` only with ``allow_cookie`` (the UDP transport)."""
    if isinstance(line, bytes):
        line = decode(line, Code.MALFORMED, f"plain ASCII text like {EXAMPLE}")
    if line.endswith("\n"):
        line = line[:-1].removesuffix("\r")
    # A printable line holds no control character: the regex only for the rest
    bad = None if line.isprintable() else _CONTROL.search(line)
    if bad is not None:
        raise _malformed(
            f"request contains the control character {quote_input(bad.group())} at offset "
            f"{bad.start()}{_in_field(line, bad.start())}; send one line of plain text like "
            f"{EXAMPLE}, ended by LF or CR LF"
        )
    stripped = line.strip(" \t")
    if not stripped:
        raise _malformed(f"empty request; send one line HOST:PORT, like {EXAMPLE}")
    # One space between words is the usual request: str.split, not the regex (-6,000 instructions)
    plain = "\t" not in stripped and "  " not in stripped
    tokens = stripped.split(" ") if plain else _SEP.split(stripped)
    _refuse_http(tokens)
    host, port = _parse_hostport(tokens[0])
    keys = _parse_keys(tokens[1:], allow_cookie)
    return Request(host=host, port=port, **keys)  # type: ignore[arg-type]


def decode(body: bytes, code: Code, shape: str) -> str:
    """``body`` as UTF-8, else ``ProtocolError(code)`` naming the first bad byte."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(
            code,
            f"request is not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start}); "
            f"send {shape}",
        ) from None


def _in_field(text: str, offset: int) -> str:
    """`` in student=`` when ``offset`` falls inside a ``key=value`` word, else ``""``."""
    start = max(text.rfind(" ", 0, offset), text.rfind("\t", 0, offset)) + 1
    key, eq, _ = text[start:offset].partition("=")
    if eq and key in ("student", "token", "verify", "cookie"):
        return f" (in {key}=)"
    return ""


def _refuse_http(tokens: list[str]) -> None:
    """A browser or curl pointed at the registration port deserves a clear word."""
    if tokens[0] in _HTTP_METHODS and len(tokens) > 1 and tokens[1].startswith("/"):
        raise _malformed(
            f"this looks like an HTTP request ({quote_input(tokens[0] + ' ' + tokens[1], 30)}); "
            f"the registration port takes one line HOST:PORT, like {EXAMPLE}"
        )


def _parse_hostport(token: str) -> tuple[IPAddress | str, int]:
    """Split and parse the first token, ``HOST:PORT`` or ``[IPv6]:PORT``."""
    if token.startswith("["):
        return _parse_bracketed(token)
    if "=" in token and ":" not in token:
        raise _malformed(
            f"the request must start with HOST:PORT, but it starts with {quote_input(token)}; "
            f"write for example {EXAMPLE} student=NAME"
        )
    if ":" not in token:
        raise _malformed(f"{quote_input(token)} has no port; {_FIX}")
    if token.count(":") > 1:
        raise _malformed(_explain_colons(token))
    host_text, _, port_text = token.partition(":")
    if not host_text:
        raise _malformed(f"missing host before {quote_input(token)}; {_FIX}")
    if not port_text:
        raise _malformed(f"missing port after {quote_input(token)}; {_FIX}")
    return parse_host(host_text), _parse_port(port_text)


def _explain_colons(token: str) -> str:
    """More than one ':' without brackets: usually an IPv6 address written bare."""
    host, _, _ = token.rpartition(":")
    if _is_ipv6(token):
        return f"{quote_input(token)} looks like an IPv6 address without brackets or port; {_FIX6}"
    if _is_ipv6(host):
        return (
            f"IPv6 addresses must be in brackets so the port can be told apart: "
            f"write {quote_input(token)} as [IPv6]:PORT, like {EXAMPLE6}"
        )
    return (
        f"{quote_input(token)} has more than one ':'; {_FIX}, "
        f"with IPv6 in brackets, like {EXAMPLE6}"
    )


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_bracketed(token: str) -> tuple[IPAddress, int]:
    """``[IPv6]:PORT``: no zone ids, no IPv4 in brackets."""
    inner, closed, after = token[1:].partition("]")
    if not closed:
        raise _malformed(f"{quote_input(token)} has no closing ']'; {_FIX6}")
    if not after:
        raise _malformed(f"{quote_input(token)} has no port; {_FIX6}")
    if not after.startswith(":"):
        raise _malformed(f"expected ':' after ']' in {quote_input(token)}; {_FIX6}")
    if not after[1:]:
        raise _malformed(f"missing port after {quote_input(token)}; {_FIX6}")
    return parse_ipv6(inner), _parse_port(after[1:])


def parse_ipv6(inner: str) -> Address:
    if "%" in inner:
        zone = inner[inner.index("%") :]
        raise _malformed(
            f"the zone id {quote_input(zone, 20)} is not accepted: it names an interface on "
            "your machine and means nothing to the registry; advertise an address "
            "without a zone (not link-local fe80::)"
        )
    if not inner:
        raise _malformed(f"empty brackets; {_FIX6}")
    if _DIGITS.fullmatch(inner.replace(".", "")) and "." in inner:
        raise _malformed(
            f"brackets are for IPv6 only; write IPv4 {quote_input(inner)} without them, "
            f"like {EXAMPLE}"
        )
    try:
        return Address6(inner)
    except ValueError:
        raise _malformed(
            f"{quote_input('[' + inner + ']')} is not a valid IPv6 address; {_FIX6}"
        ) from None


def _parse_port(text: str) -> int:
    """Decimal 1-65535, no sign, no leading zero, no exponent."""
    if not (text.isascii() and text.isdigit()):  # [0-9]+, without the regex
        what = "has a sign" if text[:1] in "+-" else "is not a decimal number"
        raise _malformed(f"port {quote_input(text, 20)} {what}; write a number from 1 to 65535")
    if len(text) > 1 and text.startswith("0"):
        raise _malformed(
            f"port {quote_input(text, 20)} has a leading zero; write it as "
            f"{text.lstrip('0') or '0'} (ports are decimal, 1-65535)"
        )
    port = int(text) if len(text) <= 5 else 65536
    if port > 65535:
        raise _malformed(f"port {quote_input(text, 20)} is out of range; ports go from 1 to 65535")
    if port == 0:
        raise _malformed(
            "port 0 means 'any port' and cannot be called back; advertise the port your "
            "server listens on (1-65535; the lab uses 15000)"
        )
    return port


def parse_host(text: str) -> IPAddress | str:
    """Canonical dotted-decimal IPv4, or a hostname (lower-cased, one trailing dot dropped)."""
    addr = dotted_quad(text)
    if addr is not None:
        return addr
    name = text[:-1] if text.endswith(".") else text
    last = name.rsplit(".", 1)[-1]
    # The WHATWG URL rule: a host whose last label is a number is an IPv4 attempt,
    # never a name ("1.2.3.0x4" is a valid-looking label set but means 1.2.3.4).
    if _DIGITS.fullmatch(last) or _HEX_PART.fullmatch(last):
        raise _malformed(_explain_ipv4(text))
    problem = _hostname_problem(name)
    if problem:
        raise _malformed(
            f"{quote_input(text)} is neither an IPv4 address nor a valid hostname ({problem}); "
            f"{_FIX}"
        )
    return name.lower()


def _hostname_problem(name: str) -> str | None:
    """Why ``name`` is not an RFC 1123 hostname, or None if it is one."""
    if len(name) > 253:
        return "longer than 253 characters"
    labels = name.split(".")
    for label in labels:
        if not label:
            return "empty part between dots"
        if len(label) > 63:
            return "a part is longer than 63 characters"
        if not _LABEL.fullmatch(label):
            return "only letters, digits and inner hyphens are allowed"
    if not any(ch.isalpha() for ch in labels[-1]):
        return "the last part must contain a letter"
    return None


def _explain_ipv4(text: str) -> str:
    """Say why a numeric-looking host is not accepted, and what some resolver would make of it."""
    shown = quote_input(text)
    fix = f"write all four parts in decimal, like {EXAMPLE}"
    parts = text.split(".")
    if text.endswith(".") and len(parts) > 1 and all(parts[:-1]):
        return f"{shown} ends with a dot; write the address without it, like {EXAMPLE}"
    if not all(parts):
        return f"{shown} has an empty part between dots; {fix}"
    if not all(_DIGITS.fullmatch(p) or _HEX_PART.fullmatch(p) for p in parts):
        return (
            f"{shown} is neither an IPv4 address nor a hostname (the last part of a "
            f"hostname must contain a letter); {fix}"
        )
    meant = _inet_aton(parts)
    reads = f"some resolvers read it as {meant}" if meant else "some resolvers accept it"
    hexed = next((p for p in parts if _HEX_PART.fullmatch(p)), None)
    if hexed is not None:
        return f"{shown} uses hexadecimal ({quote_input(hexed, 12)}) and {reads}; {fix}"
    zeroed = next((p for p in parts if len(p) > 1 and p.startswith("0")), None)
    if zeroed is not None:
        if meant:
            how = f"as octal (making it {meant}) and others as decimal"
        else:
            how = "as octal, others as decimal, and some refuse them"
        return (
            f"{shown} has a leading zero in {quote_input(zeroed, 12)}; some systems read such "
            f"parts {how}; write each part in decimal without leading zeros, like {EXAMPLE}"
        )
    if len(parts) == 1:
        return f"{shown} is an IPv4 address written as one integer and {reads}; {fix}"
    if len(parts) < 4:
        expand = f"expand to {meant}" if meant else "expand in different ways"
        return f"{shown} is a short IPv4 form that some resolvers {expand}; {fix}"
    if len(parts) > 4:
        return f"{shown} has {len(parts)} parts, an IPv4 address has four; {fix}"
    return f"{shown} has a part above 255; each of the four parts is 0-255, like {EXAMPLE}"


def _inet_aton(parts: list[str]) -> ipaddress.IPv4Address | None:
    """What BSD ``inet_aton`` would make of numeric ``parts`` (for explanations only)."""
    # Over 12 characters is far beyond 32 bits in any base: skip the big-int work.
    if len(parts) > 4 or any(len(p) > 12 or _OCTAL_BAD.fullmatch(p) for p in parts):
        return None
    *head, last = [
        int(p[2:] or "0", 16) if _HEX_PART.fullmatch(p) else int(p, 8 if p[:1] == "0" else 10)
        for p in parts
    ]
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    return ipaddress.IPv4Address(sum(v << (8 * (3 - i)) for i, v in enumerate(head)) + last)


def _parse_keys(tokens: list[str], allow_cookie: bool) -> dict[str, object]:
    """Parse the ``key=value`` tokens after HOST:PORT into Request keyword arguments."""
    known = KEYS + ("cookie",) if allow_cookie else KEYS
    found: dict[str, object] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq:
            raise _malformed(
                f"{quote_input(token)} is not key=value; after HOST:PORT only "
                f"{', '.join(k + '=' for k in known)} are accepted"
            )
        if key not in known:
            udp = " (cookie= is only for UDP)" if key == "cookie" else ""
            raise _malformed(
                f"unknown key {quote_input(key, 30)}{udp}; accepted keys: {', '.join(known)}"
            )
        if key in found:
            raise _malformed(f"key {quote_input(key)} given twice; give each key once")
        if not value:
            raise _malformed(f"{key}= needs a value")
        found[key] = _parse_value(key, value)
    return found


def _parse_value(key: str, value: str) -> object:
    if key == "verify":
        if value not in ("yes", "no"):
            raise _malformed(f"verify={quote_input(value, 20)} must be verify=yes or verify=no")
        return value == "yes"
    try:
        return check_value(key, value)
    except ValueError as exc:
        raise _malformed(f"{'student name' if key == 'student' else key} {exc}") from None


def check_value(key: str, value: str, *, spaces: bool = False) -> str:
    """A ``student`` (NFC), ``token`` or ``cookie`` value, the same rule in every
    grammar; ``ValueError`` says what is wrong, for the grammar to put its way."""
    if key == "student":
        try:
            return normalise(value, spaces=spaces)
        except BadName as exc:
            raise ValueError(f"{quote_input(value, 30)} {exc}") from None
    # token and cookie are secrets: never echo them back, not even in part.
    if not _SECRET.fullmatch(value):
        raise ValueError("must be 1-128 printable ASCII characters without spaces")
    return value


class OneRequestReceiver:
    """Frame one request per connection, h11-style: ``receive_data`` (``b""``: EOF), then
    ``next_event`` or ``quiet`` gives the ``Decision``. Subclasses add a grammar; the
    rules: docs/architecture.md, "Request framing"."""

    _SKIP = b""  # bytes skipped before the request starts (they still count to the cap)
    _EMPTY: tuple[Code, str]  # the error for a request of only whitespace
    _SEND: str  # what to send instead of too long a request

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._max = max_bytes
        self._buf = bytearray()
        self._seen = 0  # every byte before the terminator, skipped ones included
        self._result: Decision = None

    @property
    def buffered(self) -> int:
        """How many request bytes are held (terminator and skipped bytes excluded)."""
        return len(self._buf)

    def next_event(self) -> Decision:
        """The decision, fixed once made; ``None``: not complete yet."""
        return self._result

    def receive_data(self, data: bytes) -> None:
        if self._result is not None:
            return  # one request per connection: anything after it is ignored
        if not data:
            self._finish(lf=False)
            return
        if self._SKIP and not self._buf:
            kept = data.lstrip(self._SKIP)
            self._seen += len(data) - len(kept)
            data = kept
        cut = data.find(b"\n")
        chunk = data if cut < 0 else data[:cut]
        self._seen += len(chunk)
        if self._seen > self._max:
            why = f"request longer than {self._max} bytes; {self._SEND}"
            self._result = ProtocolError(Code.TOO_LONG, why)
            return
        self._buf += chunk
        if cut >= 0:
            self._finish(lf=True)

    def quiet(self) -> Decision:
        """The quiet period passed with no new byte: take the buffer if it may be a
        request; else ``None``, and the caller waits until its total deadline."""
        if self._result is None and self._complete():
            self._finish(lf=False)
        return self._result

    def _complete(self) -> bool:
        return bool(self._buf.strip(_WHITESPACE))  # only whitespace is no request yet

    def _parse(self, body: bytes) -> Request:
        raise NotImplementedError

    def _finish(self, *, lf: bool) -> None:
        body = bytes(self._buf).removesuffix(b"\r") if lf else bytes(self._buf)
        try:
            if not body.strip(_WHITESPACE):
                raise ProtocolError(*self._EMPTY)
            self._result = self._parse(body)
        except ProtocolError as exc:
            # The grammar's errors become the decision here, once. Without its
            # traceback: kept, it would tie the parser's frames into a reference cycle.
            self._result = exc.with_traceback(None)


class TextReceiver(OneRequestReceiver):
    _EMPTY = (Code.MALFORMED, f"empty request; send one line HOST:PORT, like {EXAMPLE}")
    _SEND = f"send one short line HOST:PORT[ key=value ...], like {EXAMPLE}"

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, *, allow_cookie: bool = False) -> None:
        super().__init__(max_bytes)
        self._allow_cookie = allow_cookie

    def _parse(self, body: bytes) -> Request:
        return parse_line(body, allow_cookie=self._allow_cookie)
