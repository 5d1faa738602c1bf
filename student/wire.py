"""Sans-io codec for the student side of the callback-lab protocols (SPEC).

Bytes and strings in, values out: no sockets, no trio, no clock. It is written
from the SPEC alone and imports nothing from ``registry/``, so the student
tools and the registry are two independent implementations of one contract
and an end-to-end test catches a bug in either.
Here: the request (text and JSON lines), the reply (both parsed into one
``Reply``), the UDP cookie challenge and padding, the callback line and its
echo, ``LineAssembler`` (a capped line buffer) and the exit-status table.
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from dataclasses import dataclass, field
from enum import Enum

# --- exit statuses (SPEC: student client) -------------------------------------

EXIT_OK = 0
EXIT_LOCAL_ERROR = 1  # a local problem: port taken, timeout waiting for a callback
EXIT_DENIED = 2
EXIT_FAILED = 3
EXIT_BUSY = 4
EXIT_UNREACHABLE = 5  # registry unreachable, no reply, bad reply, or an ERROR reply
EXIT_USAGE = 64

STATUS_EXIT: dict[str, int] = {
    "OK": EXIT_OK,
    "DENIED": EXIT_DENIED,
    "FAILED": EXIT_FAILED,
    "BUSY": EXIT_BUSY,
    "ERROR": EXIT_UNREACHABLE,
}

# Every reply code the SPEC names, by status. Unknown codes are still accepted
# (a newer registry may add some) and get generic advice.
STATUS_CODES: dict[str, tuple[str, ...]] = {
    "OK": ("connected",),
    "DENIED": (
        "source_mismatch",
        "address_not_allowed",
        "port_not_allowed",
        "self_target",
        "hostname_not_allowed",
        "unauthorized",
    ),
    "FAILED": ("connection_refused", "timeout", "unreachable", "reset", "not_verified"),
    "BUSY": ("rate_limited", "overloaded"),
    "ERROR": ("malformed", "too_long", "read_timeout", "bad_json"),
}

DIAGNOSES: tuple[str, ...] = (
    "direct",
    "loopback_advertised",
    "unspecified_advertised",
    "private_behind_nat",
    "cgnat",
    "container_nat",
    "different_host",
    "link_local_advertised",
    "family_mismatch",
)

# The order in which reply fields are shown when a JSON reply is printed as text.
REPLY_FIELDS: tuple[str, ...] = (
    "id",
    "target",
    "observed",
    "diagnosis",
    "rtt_ms",
    "verified",
    "retry_after",
)


def exit_code_for(status: str | None) -> int:
    """The process exit status for a reply status; anything unknown is a bad reply (5)."""
    if status is None:
        return EXIT_UNREACHABLE
    return STATUS_EXIT.get(status, EXIT_UNREACHABLE)


# --- endpoints -------------------------------------------------------------------


def format_endpoint(host: str, port: int) -> str:
    """``host:port`` with an IPv6 literal in brackets (``[::1]:15000``)."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def unbracket(host: str) -> str:
    """``[::1]`` -> ``::1``; anything else unchanged."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def display_ip(host: str) -> str:
    """An address as a student should read it: IPv4-mapped IPv6 shown as plain IPv4."""
    bare, _, zone = host.partition("%")
    try:
        addr = ipaddress.ip_address(bare)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return f"{addr.compressed}%{zone}" if zone else addr.compressed


def format_sockaddr(sockaddr: tuple[object, ...] | str) -> str:
    """A socket address tuple as ``IP:PORT`` / ``[IPv6]:PORT`` (v4-mapped shown as IPv4)."""
    if isinstance(sockaddr, str):  # AF_UNIX or an already formatted string
        return sockaddr
    host = display_ip(str(sockaddr[0]))
    return format_endpoint(host, int(sockaddr[1]))  # type: ignore[call-overload]


def parse_hostport(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` or ``[IPv6]:PORT``; raise ``ValueError`` with a readable reason."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not host:
            raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise ValueError(f"put an IPv6 address in brackets: [{host}]:{port_text}")
    return host, parse_port(port_text, allow_zero=False)


def parse_port(text: str, *, allow_zero: bool) -> int:
    """A decimal port number, 1-65535 (0 too when ``allow_zero``)."""
    if not text.isdigit() or not text.isascii():
        raise ValueError(f"port must be a decimal number, got {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be between {low} and 65535, got {port}")
    return port


# --- requests --------------------------------------------------------------------

_SAFE_VALUE = re.compile(r"[^\s\x00-\x1f\x7f]+")


# The registry's rule (protocol/names.py), mirrored since student/ imports nothing from
# registry/; tests/test_names.py ties the two. Hangul fillers, U+034F, variation selectors:
INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)


def refused_character(ch: str) -> str | None:
    """What kind of character a name may not hold (``control``...), or None."""
    kind = unicodedata.category(ch)
    if kind in ("Cc", "Zl", "Zp"):
        return "control" if kind == "Cc" else "line break"
    return "invisible" if kind in ("Cf", "Cs") or ord(ch) in INVISIBLE else None


def check_name(value: str) -> str:
    """``--student`` in NFC (the registry's form), refused before anything is sent if
    it holds a character that draws nothing (a name pasted from a chat can carry a
    zero-width space); the registry has the last word on the rest."""
    for ch in value:
        what = refused_character(ch)
        if what is not None:
            label = unicodedata.name(ch, "")
            shown = f"U+{ord(ch):04X}" + (f" ({label})" if label else "")
            raise ValueError(f"--student contains the {what} character {shown}; retype the name")
    name = unicodedata.normalize("NFC", value)
    # Single inner spaces are for JSON requests ("Ana Lima"); the CLI checks the mode.
    for word in name.split(" ") if " " in name.strip(" ") else [name]:
        check_value("--student", word)
    return name


def check_value(key: str, value: str) -> str:
    """A request value must be one printable token, or the line would not parse."""
    if not _SAFE_VALUE.fullmatch(value):
        raise ValueError(f"{key} must be one word without spaces or control characters")
    return value


@dataclass(frozen=True, slots=True)
class RegistrationRequest:
    """What the student asks the registry to call back, before it is encoded."""

    host: str  # exactly as advertised, without brackets
    port: int
    student: str | None = None
    token: str | None = None
    verify: bool | None = None

    @property
    def advertised(self) -> str:
        """The ``IP:PORT`` text the lab prints: ``Sent to Registry Server: ...``."""
        return format_endpoint(self.host, self.port)


def build_text_request(req: RegistrationRequest, *, cookie: str | None = None) -> str:
    """The text protocol line, without its line ending: ``HOST:PORT key=value...``."""
    parts = [req.advertised]
    if req.student is not None:
        parts.append("student=" + check_value("student", req.student))
    if req.token is not None:
        parts.append("token=" + check_value("token", req.token))
    if req.verify is not None:
        parts.append("verify=" + ("yes" if req.verify else "no"))
    if cookie is not None:
        parts.append("cookie=" + check_value("cookie", cookie))
    return " ".join(parts)


def build_json_request(req: RegistrationRequest) -> str:
    """One JSON object, without its line ending; absent options are left out, not null."""
    obj: dict[str, object] = {"host": unbracket(req.host), "port": req.port}
    if req.student is not None:
        obj["student"] = req.student
    if req.token is not None:
        obj["token"] = req.token
    if req.verify is not None:
        obj["verify"] = req.verify
    return json.dumps(obj, ensure_ascii=False)


# --- replies ---------------------------------------------------------------------


class ReplyError(ValueError):
    """The registry's reply does not follow the SPEC."""


@dataclass(frozen=True, slots=True)
class Reply:
    """One registry reply, from the text or the JSON form (values kept as text)."""

    status: str
    code: str | None
    fields: dict[str, str] = field(default_factory=dict)
    explanation: str = ""

    def get(self, key: str) -> str | None:
        """A field's raw text, or ``None`` when the registry did not send it."""
        value = self.fields.get(key)
        return value if value else None

    @property
    def verified(self) -> bool | None:
        value = self.get("verified")
        return {"yes": True, "no": False}.get(value) if value else None

    @property
    def rtt_ms(self) -> float | None:
        return _as_float(self.get("rtt_ms"))

    @property
    def retry_after(self) -> float | None:
        return _as_float(self.get("retry_after"))

    @property
    def exit_code(self) -> int:
        return exit_code_for(self.status)

    def to_text(self) -> str:
        """The one-line text form: ``STATUS CODE k=v ... explanation``."""
        parts = [self.status]
        if self.code:
            parts.append(self.code)
        ordered = [k for k in REPLY_FIELDS if k in self.fields]
        ordered += [k for k in self.fields if k not in REPLY_FIELDS]
        parts += [f"{k}={_one_token(self.fields[k])}" for k in ordered if self.fields[k]]
        if self.explanation:
            parts.append(self.explanation)
        return " ".join(parts)


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _one_token(value: str) -> str:
    """A JSON value shown as a text field: whitespace cannot split the token."""
    return re.sub(r"\s", "_", value)


_WORD = re.compile(r"\s*(\S+)")
# key=value: the SPEC's values are single tokens (no quoting).
_KV = re.compile(r"\s*([A-Za-z0-9_]+)=(\S*)(?=\s|$)")
_CODE = re.compile(r"[a-z][a-z0-9_]*")


def _scan_fields(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Consume ``key=value`` tokens from ``pos``; stop at the first other word.

    A repeated key keeps its first value: the registry writes its own fields first.
    """
    fields: dict[str, str] = {}
    while m := _KV.match(text, pos):
        fields.setdefault(m.group(1), m.group(2))
        pos = m.end()
    return fields, pos


def parse_reply(line: str | bytes) -> Reply:
    """Parse one text reply line (trailing CR LF and odd spacing tolerated).

    The status must be one of the SPEC's (or ``COOKIE``, the UDP challenge,
    which has no code); the code is required for every real status. Fields are
    optional. Anything else raises ``ReplyError``.
    """
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    m = _WORD.match(text)
    if m is None:
        raise ReplyError("empty reply")
    status, pos = m.group(1), m.end()
    if status not in STATUS_EXIT and status != "COOKIE":
        raise ReplyError(f"unknown reply status {status[:40]!r}")
    code = None
    if not _KV.match(text, pos) and (m := _WORD.match(text, pos)):
        if not _CODE.fullmatch(m.group(1)):
            raise ReplyError(f"bad reply code {m.group(1)[:40]!r}")
        code, pos = m.group(1), m.end()
    if code is None and status != "COOKIE":
        raise ReplyError(f"reply {status} has no code")
    fields, pos = _scan_fields(text, pos)
    return Reply(status, code, fields, text[pos:].strip())


def parse_json_reply(line: str | bytes) -> Reply:
    """Parse the JSON-lines reply object into the same ``Reply`` value."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise ReplyError(f"reply is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ReplyError("reply is not a JSON object")
    status, code = obj.get("status"), obj.get("code")
    if not isinstance(status, str) or status not in STATUS_EXIT:
        raise ReplyError(f"reply has no valid status: {status!r}")
    if not isinstance(code, str) or not code:
        raise ReplyError("reply has no code")
    fields = {}
    for key in REPLY_FIELDS:
        text = _json_field_text(obj.get(key))
        if text is not None:
            fields[key] = text
    explanation = obj.get("explanation")
    return Reply(status, code, fields, explanation if isinstance(explanation, str) else "")


def _json_field_text(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 1e15 else repr(value)
    return str(value)


def cookie_of(reply: Reply) -> str | None:
    """The cookie of a UDP ``COOKIE cookie=VALUE ...`` challenge, else ``None``."""
    return reply.get("cookie") if reply.status == "COOKIE" else None


# UDP replies are never larger than the request that caused them (no
# amplification), so a client pads its request with spaces: to at least
# UDP_MIN_BYTES always (room for the registry's shortest challenge,
# ``COOKIE pad=N``), and to the ``pad=N`` a challenge asks for, up to UDP_MAX_PAD.
UDP_MIN_BYTES = 16
UDP_MAX_PAD = 1200


def pad_of(reply: Reply) -> int | None:
    """The ``pad=N`` a UDP ``COOKIE`` challenge asks for (capped at UDP_MAX_PAD), else ``None``."""
    value = reply.get("pad") if reply.status == "COOKIE" else None
    if value is None or not value.isdigit() or not value.isascii():
        return None
    return min(int(value[:6]), UDP_MAX_PAD)


def pad_datagram(line: str, size: int) -> bytes:
    """``line`` encoded and padded with trailing spaces to ``size`` bytes (never cut)."""
    data = line.encode()
    return data + b" " * max(size - len(data), 0)


# --- the callback ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CallbackLine:
    """The registry's first line on a callback: ``CALLBACK id=ID nonce=NONCE greeting``."""

    nonce: str
    id: str | None = None
    greeting: str = ""


def parse_callback(line: str | bytes) -> CallbackLine | None:
    """The callback line if ``line`` is one with a nonce, else ``None`` (never raises)."""
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    text = text.strip()
    m = _WORD.match(text)
    if m is None or m.group(1) != "CALLBACK":
        return None
    fields, pos = _scan_fields(text, m.end())
    nonce = fields.get("nonce")
    if not nonce or not _SAFE_VALUE.fullmatch(nonce):
        return None
    return CallbackLine(nonce=nonce, id=fields.get("id") or None, greeting=text[pos:].strip())


def build_echo(nonce: str) -> bytes:
    """The student's proof of receipt: ``ECHO nonce=NONCE`` and LF."""
    return f"ECHO nonce={check_value('nonce', nonce)}\n".encode()


# --- line assembly (h11 style: feed bytes, b"" is EOF, then ask for the line) ------


class Ended(Enum):
    """Why a line ended."""

    NEWLINE = "newline"
    EOF = "eof"
    LIMIT = "limit"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Line:
    """One assembled line, its CR LF removed."""

    data: bytes
    ended: Ended

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


class LineAssembler:
    """Collects bytes until LF, EOF or ``limit`` bytes; bounded memory by design."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._eof = False

    def receive_data(self, data: bytes) -> None:
        """Add bytes; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
        self._buf += data

    def next_line(self) -> Line | None:
        """The line if one is complete, else ``None`` (need more data)."""
        nl = self._buf.find(b"\n", 0, self.limit)
        if nl >= 0:
            return Line(bytes(self._buf[:nl]).removesuffix(b"\r"), Ended.NEWLINE)
        if len(self._buf) >= self.limit:
            return Line(bytes(self._buf[: self.limit]), Ended.LIMIT)
        if self._eof:
            return Line(bytes(self._buf).removesuffix(b"\r"), Ended.EOF)
        return None

    def give_up(self) -> Line:
        """What arrived before a deadline, as a line of its own."""
        return Line(bytes(self._buf[: self.limit]).removesuffix(b"\r"), Ended.TIMEOUT)


_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Escape control characters so a peer cannot drive the student's terminal."""
    return _UNPRINTABLE.sub(_escape, text.replace("\t", " "))


def _escape(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"
