"""Reply lines: ``STATUS CODE [key=value ...] free text explanation``.

Every reply is one ASCII line ending in ``\\n``. Values and explanations may
carry a student's text, so it is sanitised here, in one place (the parsers and
the callback line use the same helpers): no input can split the line, add a
field, or drive the terminal of whoever reads the reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.model import Outcome

# Longest explanation sent (after sanitising); the rest is cut with "...".
EXPLANATION_LIMIT = 400
# Longest field value: targets, ids and diagnoses are far shorter; this is a backstop.
VALUE_LIMIT = 200
# How much of a student's input an error message may quote.
QUOTE_LIMIT = 60

_ELLIPSIS = "..."
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(ch: str) -> str:
    """Return ``ch`` as printable ASCII: itself if it is, else a repr-style escape."""
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    if 0x20 <= code < 0x7F:
        return ch
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _plain(text: str) -> bool:
    """True if every char of ``text`` is printable ASCII (0x20-0x7E), which escapes to itself."""
    return text.isascii() and text.isprintable()


def _escape_capped(text: str, limit: int, escape: dict[str, str] | None = None) -> str:
    """Escape ``text`` char by char; if the result exceeds ``limit`` chars, cut it with
    ``...``. The cap is on the output: emoji cannot grow it ten-fold, and work stops there."""
    pieces: list[str] = []
    used = fits = 0  # fits: how many pieces leave room for the ellipsis
    for ch in text:
        piece = escape[ch] if escape and ch in escape else _escape_char(ch)
        used += len(piece)
        if used > limit:
            return "".join(pieces[:fits]) + _ELLIPSIS
        pieces.append(piece)
        if used <= limit - len(_ELLIPSIS):
            fits = len(pieces)
    return "".join(pieces)


def quote_input(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Quote a piece of student input for an error message: ``'127.1'``.

    Printable ASCII, single-line, at most ``limit`` characters between the
    quotes (cut with ``...``); non-printables are escaped like ``repr``.
    """
    return "'" + _escape_capped(text, limit, {"'": "\\'"}) + "'"


def safe_value(text: str, limit: int = VALUE_LIMIT) -> str:
    """Make ``text`` usable as the value of a ``key=value`` token.

    Whitespace becomes ``_`` and any other non-printable or non-ASCII char is
    escaped, so the value is one token of printable ASCII without spaces.
    """
    if len(text) <= limit and _plain(text) and " " not in text and "\\" not in text:
        return text  # the common case (ids, addresses, codes): nothing to escape
    spaced = "".join("_" if ch.isspace() else ch for ch in text)
    return _escape_capped(spaced, limit)


def safe_text(text: str, limit: int = EXPLANATION_LIMIT) -> str:
    """Make free text safe for the tail of a one-line reply.

    Runs of whitespace (including newlines and CR) collapse to one space,
    other control and non-ASCII chars are escaped, the result is stripped and
    capped at ``limit`` characters.
    """
    collapsed = " ".join(text.split())
    if len(collapsed) <= limit and _plain(collapsed):
        return collapsed  # printable ASCII already (backslashes stay as they are)
    # A backslash is printable; leaving it alone keeps quote_input's escapes readable.
    return _escape_capped(collapsed, limit, {"\\": "\\"})


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """A reply line taken apart: what a client or a test sees."""

    status: str
    code: str
    fields: dict[str, str] = field(default_factory=dict)
    explanation: str = ""


# The reply's keys, in their documented order; an extra key never takes one of these names.
STANDARD_KEYS = tuple("id target observed diagnosis verified rtt_ms retry_after corrected".split())


def _fields(outcome: Outcome) -> list[tuple[str, str]]:
    """The reply's key=value pairs, in the documented order."""
    o = outcome
    values = (
        o.id,
        o.target,
        o.observed,
        None if o.diagnosis is None else o.diagnosis.value,
        None if o.verified is None else ("yes" if o.verified else "no"),
        None if o.rtt_ms is None else f"{o.rtt_ms:.1f}",
        None if o.retry_after is None else str(int(o.retry_after)),
        "yes" if o.corrected else None,
    )
    pairs = [(key, v) for key, v in zip(STANDARD_KEYS, values, strict=True) if v is not None]
    # Not even an unset one: "id=" in a reply is always the registration's id (an
    # extra "ID" would read as "id"); a repeated key would make the reply ambiguous.
    seen = set(STANDARD_KEYS)
    for key, value in o.extra:
        clean = _safe_key(key)
        if clean not in seen:
            seen.add(clean)
            pairs.append((clean, value))
    return pairs


def _safe_key(key: str) -> str:
    """Keys are code-chosen, but keep them to ``[a-z0-9_]`` so a token always parses."""
    clean = "".join(ch if (ch.isascii() and ch.isalnum()) or ch == "_" else "_" for ch in key)
    return clean.lower()[:40] or "extra"


def _explanation(text: str) -> str:
    """Sanitise the explanation so it can never be read back as a field."""
    clean = safe_text(text)
    if not clean:
        return "(no explanation)"
    # parse_reply reads key=value tokens until the first token without "=";
    # an explanation starting with "verified=yes" must not become a field.
    if "=" in clean.split(" ", 1)[0]:
        clean = safe_text("note: " + clean)
    return clean


def format_reply(outcome: Outcome) -> bytes:
    """``outcome`` as one reply line ``b"STATUS CODE k=v ... explanation\\n"`` (keys in
    ``STANDARD_KEYS`` order when set, then ``outcome.extra``): printable ASCII with
    exactly one newline, at the end, whatever text the outcome holds."""
    parts = [outcome.status.value, outcome.code.value]
    parts.extend(f"{key}={safe_value(value)}" for key, value in _fields(outcome))
    parts.append(_explanation(outcome.explanation))
    return (" ".join(parts) + "\n").encode("ascii")


def parse_reply(line: str | bytes) -> ParsedReply:
    """Take a reply line apart (for tests and tools; tolerant, never raises).

    ``STATUS`` is the first token, ``CODE`` the second unless it is already a
    ``key=value`` (as in the UDP ``COOKIE cookie=...`` challenge); then
    ``key=value`` tokens up to the first token without ``=``; the rest is the
    explanation. A repeated key keeps its first value.
    """
    text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
    status, rest = _word(text.removesuffix("\n").removesuffix("\r"))
    code, after = _word(rest)
    if "=" not in code:
        rest = after
    else:
        code = ""
    fields: dict[str, str] = {}
    while rest:
        token, after = _word(rest)
        if "=" not in token:
            break
        key, _, value = token.partition("=")
        fields.setdefault(key, value)
        rest = after
    return ParsedReply(status=status, code=code, fields=fields, explanation=rest.strip())


def _word(text: str) -> tuple[str, str]:
    """The first whitespace-separated word of ``text`` and what follows it."""
    parts = text.split(None, 1)
    return (parts[0] if parts else ""), (parts[1] if len(parts) > 1 else "")
