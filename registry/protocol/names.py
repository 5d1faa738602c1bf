"""Student names, pure: which are accepted, in which form (NFC), and why not
(the rule and its reasons: docs/protocol.md, "Student names")."""

from __future__ import annotations

import unicodedata

MAX_LENGTH = 64
SEPARATORS = "._@-"
RULE = "names are 1-64 letters or digits of any script and . _ @ -"
RULE_SPACES = "names are 1-64 letters or digits of any script, . _ @ - and single spaces"


# unicodedata has no names for controls; these are the ones people meet.
_CONTROL_NAMES = {
    0x00: "NUL",
    0x09: "TAB",
    0x0A: "LINE FEED",
    0x0D: "CARRIAGE RETURN",
    0x1B: "ESCAPE",
    0x7F: "DELETE",
}


class BadName(ValueError):
    """``str(exc)`` says why, in printable ASCII."""


def normalise(name: str | bytes, *, spaces: bool = False) -> str:
    """The NFC form of an accepted ``name``, else ``BadName``. ``spaces``: single spaces
    between words are allowed (JSON, where a space does not end the value)."""
    rule = RULE_SPACES if spaces else RULE
    if isinstance(name, bytes):
        try:
            name = name.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadName(
                f"is not valid UTF-8 (byte 0x{name[exc.start]:02x} at offset {exc.start}); {rule}"
            ) from None
    # Characters before NFC, which could compose a mark away.
    problem = next((f"contains {p}; {rule}" for p in map(_character_problem, name) if p), None)
    if problem is None:
        name = unicodedata.normalize("NFC", name)
        problem = _shape_problem(name, spaces)
    if problem is not None:
        raise BadName(problem)
    return name


def describe(ch: str) -> str:
    """``U+202E (RIGHT-TO-LEFT OVERRIDE)``: a character named in printable ASCII."""
    code = f"U+{ord(ch):04X}"
    label = unicodedata.name(ch, "") or _CONTROL_NAMES.get(ord(ch), "")
    return f"{code} ({label})" if label else code


# Letters and marks by category that still draw nothing: Hangul fillers, the
# combining grapheme joiner, variation selectors. "alice" + one of them would be a
# second student who looks the same.
INVISIBLE = frozenset(
    [0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)]
)


def _character_problem(ch: str) -> str | None:
    category = unicodedata.category(ch)
    if category == "Cc":
        return f"the control character {describe(ch)}"
    if category == "Cf" or ord(ch) in INVISIBLE:
        return f"the invisible character {describe(ch)}"
    if category == "Cs":
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # how Python carries undecodable argv bytes
            return f"the byte 0x{ord(ch) - 0xDC00:02x}, which is not UTF-8"
        return f"the lone surrogate {describe(ch)}"
    if category in ("Zl", "Zp"):
        return f"the line break {describe(ch)}"
    return None


def _shape_problem(name: str, spaces: bool) -> str | None:
    rule = RULE_SPACES if spaces else RULE
    if not name:
        return f"is empty; {rule}"
    if len(name) > MAX_LENGTH:
        return f"is {len(name)} characters long; {rule}"
    for i, ch in enumerate(name):
        if ch == " " and spaces:
            if i == 0 or i == len(name) - 1 or name[i - 1] == " ":
                return f"has a space at the start, at the end or twice in a row; {rule}"
            continue
        category = unicodedata.category(ch)
        if category[0] == "L" or category == "Nd" or ch in SEPARATORS:
            continue
        # Combining marks (Devanagari vowel signs, a Thai tone) belong to the letter before.
        if category[0] == "M" and i > 0 and name[i - 1] not in SEPARATORS + " ":
            continue
        what = "a space" if ch == " " else describe(ch)
        return f"contains {what}, which is not a letter or digit; {rule}"
    return None
