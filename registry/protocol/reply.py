"""Reply lines: ``STATUS CODE [key=value ...] free text explanation``.

A student's text is sanitised here, in one place (the parsers and the callback
line use the same helpers): no input can split the line, add a field, or drive
the terminal of whoever reads the reply.
"""

from __future__ import annotations

from registry.model import Outcome

EXPLANATION_LIMIT = 400  # after sanitising; the rest is cut with "..."
VALUE_LIMIT = 200  # a backstop: targets, ids and diagnoses are far shorter
QUOTE_LIMIT = 60  # how much of a student's input an error message may quote

_ELLIPSIS = "..."


def _plain(text: str) -> bool:
    """Every char is printable ASCII (0x20-0x7E), which escapes to itself."""
    return text.isascii() and text.isprintable()


def _token(text: str, limit: int) -> bool:
    """``text`` is a ``key=value`` token as it stands: short, plain, no space, no
    backslash (``safe_value`` returns it unchanged)."""
    return len(text) <= limit and _plain(text) and " " not in text and "\\" not in text


def _escape_capped(text: str, limit: int, escape: dict[str, str] | None = None) -> str:
    """Escape ``text`` char by char, cut with ``...`` past ``limit`` chars. The cap is
    on the output: emoji cannot grow it ten-fold, and work stops there."""
    pieces: list[str] = []
    used = fits = 0  # fits: how many pieces leave room for the ellipsis
    for ch in text:
        # unicode_escape: printable ASCII stays itself, the rest reads like repr (\x85, \u202e)
        piece = escape[ch] if escape and ch in escape else ch.encode("unicode_escape").decode()
        used += len(piece)
        if used > limit:
            return "".join(pieces[:fits]) + _ELLIPSIS
        pieces.append(piece)
        if used <= limit - len(_ELLIPSIS):
            fits = len(pieces)
    return "".join(pieces)


def quote_input(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Student input quoted for an error message, ``'127.1'``: one line of printable
    ASCII, at most ``limit`` chars between the quotes, non-printables escaped."""
    return "'" + _escape_capped(text, limit, {"'": "\\'"}) + "'"


def safe_value(text: str, limit: int = VALUE_LIMIT) -> str:
    """``text`` as one ``key=value`` token: whitespace becomes ``_``, the rest escaped."""
    if _token(text, limit):  # the common case (ids, addresses, codes)
        return text
    spaced = "".join("_" if ch.isspace() else ch for ch in text)
    return _escape_capped(spaced, limit)


def safe_text(text: str, limit: int = EXPLANATION_LIMIT) -> str:
    """Free text for the tail of a reply: whitespace runs (newlines too) become one
    space, other controls and non-ASCII are escaped, the ends stripped, capped."""
    if text.isascii() and text.isprintable() and len(text) <= limit and "  " not in text:
        if text[:1] != " " and text[-1:] != " ":  # already one plain line: no split and join
            return text
    collapsed = " ".join(text.split())
    if len(collapsed) <= limit and _plain(collapsed):
        return collapsed
    # A backslash is printable; leaving it alone keeps quote_input's escapes readable.
    return _escape_capped(collapsed, limit, {"\\": "\\"})


# The reply's keys, in their documented order; an extra key never takes one of these names.
STANDARD_KEYS = tuple("id target observed diagnosis verified rtt_ms retry_after corrected".split())


def _fields(o: Outcome) -> list[tuple[str, str]]:
    values = (
        o.id,
        o.target,
        o.observed,
        o.diagnosis,  # a StrEnum member is a str, its value: no .value (an enum property)
        None if o.verified is None else ("yes" if o.verified else "no"),
        None if o.rtt_ms is None else f"{o.rtt_ms:.1f}",
        None if o.retry_after is None else str(int(o.retry_after)),
        "yes" if o.corrected else None,
    )
    pairs = [(key, v) for key, v in zip(STANDARD_KEYS, values, strict=True) if v is not None]
    if not o.extra:
        return pairs
    # Not even an unset one: "id=" in a reply is always the registration's id (an
    # extra "ID" would read as "id"); a repeated key would make the reply ambiguous.
    seen = set(STANDARD_KEYS)
    for key, value in o.extra:
        # Keys are code-chosen, but kept to [a-z0-9_] so a token always parses.
        clean = "".join(ch if (ch.isascii() and ch.isalnum()) or ch == "_" else "_" for ch in key)
        clean = clean.lower()[:40] or "extra"
        if clean not in seen:
            seen.add(clean)
            pairs.append((clean, value))
    return pairs


def _explanation(text: str) -> str:
    clean = safe_text(text)
    if not clean:
        return "(no explanation)"
    # A reader takes key=value tokens up to the first one without "=": an
    # explanation starting with "verified=yes" must not become a field.
    if "=" in clean.split(" ", 1)[0]:
        clean = safe_text("note: " + clean)
    return clean


def format_reply(outcome: Outcome) -> bytes:
    """``outcome`` as ``b"STATUS CODE k=v ... explanation\\n"`` (``STANDARD_KEYS`` in
    order when set, then ``outcome.extra``): printable ASCII, one newline, at the end."""
    parts = [outcome.code.status, outcome.code]  # StrEnum members: their values
    pairs = _fields(outcome)
    values = "".join([value for _, value in pairs])
    # The usual reply's values are short plain tokens: checked together, they need no
    # safe_value each (what it would return unchanged; -3,600 instructions a reply).
    if _token(values, VALUE_LIMIT):
        parts += [f"{key}={value}" for key, value in pairs]
    else:
        parts += [f"{key}={safe_value(value)}" for key, value in pairs]
    parts.append(_explanation(outcome.explanation))
    return (" ".join(parts) + "\n").encode("ascii")
