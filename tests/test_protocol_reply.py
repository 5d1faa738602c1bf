"""Reply lines: exact formatting, field order, sanitising, and the tolerant parser.

The property that matters most: whatever text an Outcome holds (a student's
name, bytes they sent, a newline in an error), the reply is exactly one line
of printable ASCII whose status, code and id read back unchanged.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from registry.model import Code, Diagnosis, Outcome, Request, Status
from registry.protocol.reply import (
    EXPLANATION_LIMIT,
    STANDARD_KEYS,
    format_reply,
    quote_input,
    safe_text,
    safe_value,
)


@dataclass(frozen=True, slots=True)
class ParsedReply:
    """A reply line taken apart: what a client sees."""

    status: str
    code: str
    fields: dict[str, str] = field(default_factory=dict)
    explanation: str = ""


def parse_reply(line: str | bytes) -> ParsedReply:
    """Take a reply line apart (tolerant, never raises).

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


EXACT: list[tuple[Outcome, bytes]] = [
    (
        Outcome(
            Code.CONNECTED,
            "your server answered",
            id="r42",
            target="192.168.1.105:15000",
            verified=True,
            rtt_ms=3.14159,
        ),
        b"OK connected id=r42 target=192.168.1.105:15000 verified=yes rtt_ms=3.1 "
        b"your server answered\n",
    ),
    (
        Outcome(Code.RATE_LIMITED, "slow down", retry_after=30),
        b"BUSY rate_limited retry_after=30 slow down\n",
    ),
    (
        Outcome(
            Code.SOURCE_MISMATCH,
            "you advertised a private address",
            id="r1",
            target="192.168.1.5:15000",
            observed="203.0.113.7",
            diagnosis=Diagnosis.PRIVATE_BEHIND_NAT,
        ),
        b"DENIED source_mismatch id=r1 target=192.168.1.5:15000 observed=203.0.113.7 "
        b"diagnosis=private_behind_nat you advertised a private address\n",
    ),
    (
        Outcome(Code.MALFORMED, "'127.1' is a short IPv4 form"),
        b"ERROR malformed '127.1' is a short IPv4 form\n",
    ),
    (
        Outcome(Code.NOT_VERIFIED, "no echo", verified=False, rtt_ms=0.0),
        b"FAILED not_verified verified=no rtt_ms=0.0 no echo\n",
    ),
    (
        Outcome(Code.CONNECTED, "ok", target="[::1]:80", corrected=True, extra=(("mode", "nat"),)),
        b"OK connected target=[::1]:80 corrected=yes mode=nat ok\n",
    ),
    (Outcome(Code.TIMEOUT, ""), b"FAILED timeout (no explanation)\n"),
]


@pytest.mark.parametrize(("outcome", "line"), EXACT)
def test_exact_lines(outcome: Outcome, line: bytes) -> None:
    assert format_reply(outcome) == line


def test_field_order_with_everything() -> None:
    outcome = Outcome(
        Code.CONNECTED,
        "done",
        id="i",
        target="t",
        observed="o",
        diagnosis=Diagnosis.DIRECT,
        verified=True,
        rtt_ms=1.25,
        retry_after=5,
        corrected=True,
        extra=(("zeta", "1"), ("alpha", "2")),
    )
    parsed = parse_reply(format_reply(outcome))
    assert list(parsed.fields) == [
        "id",
        "target",
        "observed",
        "diagnosis",
        "verified",
        "rtt_ms",
        "retry_after",
        "corrected",
        "zeta",
        "alpha",
    ]
    # reply.STANDARD_KEYS (the names an extra may never take) is that same list
    assert list(parsed.fields)[: len(STANDARD_KEYS)] == list(STANDARD_KEYS)


SANITISED: list[tuple[Outcome, str, str]] = [
    (
        Outcome(Code.CONNECTED, "x", target="1.2.3.4:80 verified=yes"),
        "target",
        "1.2.3.4:80_verified=yes",
    ),
    (Outcome(Code.CONNECTED, "x", id="a\nOK connected"), "id", "a_OK_connected"),
    (Outcome(Code.CONNECTED, "x", id="a\x1b[31m"), "id", "a\\x1b[31m"),
    (Outcome(Code.CONNECTED, "x", id="\u00e9\u00e8"), "id", "\\xe9\\xe8"),
    (Outcome(Code.CONNECTED, "x", extra=(("who", "bob smith"),)), "who", "bob_smith"),
    (Outcome(Code.CONNECTED, "x", extra=(("bad key!", "v"),)), "bad_key_", "v"),
]


@pytest.mark.parametrize(("outcome", "key", "value"), SANITISED)
def test_values_cannot_split_the_line(outcome: Outcome, key: str, value: str) -> None:
    line = format_reply(outcome)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert parse_reply(line).fields[key] == value


def test_extra_cannot_override_standard_fields() -> None:
    outcome = Outcome(Code.NOT_VERIFIED, "x", verified=False, extra=(("verified", "yes"),))
    assert parse_reply(format_reply(outcome)).fields["verified"] == "no"
    assert format_reply(outcome).count(b"verified=") == 1


@pytest.mark.parametrize("key", ["id", "ID", "Target", "retry-after", "rtt_ms", "corrected"])
def test_extra_never_takes_a_standard_name_even_when_that_field_is_unset(key: str) -> None:
    # Found by hypothesis: an extra "ID" (lowercased to "id") read back as the
    # registration id of an outcome that had none.
    line = format_reply(Outcome(Code.CONNECTED, "x", extra=((key, "forged"),)))
    assert b"forged" not in line
    assert parse_reply(line).fields == {}


@pytest.mark.parametrize(
    ("explanation", "shown"),
    [
        ("line one\nline two", "line one line two"),
        ("a\r\nOK connected id=forged", "a OK connected id=forged"),
        ("  padded\t\ttabs  ", "padded tabs"),
        ("bell\x07 and esc\x1b", "bell\\x07 and esc\\x1b"),
        ("caf\u00e9 \U0001f600", "caf\\xe9 \\U0001f600"),
        ("verified=yes really", "note: verified=yes really"),
        ("back\\slash", "back\\slash"),
    ],
)
def test_explanation_is_sanitised(explanation: str, shown: str) -> None:
    line = format_reply(Outcome(Code.CONNECTED, explanation, id="r1"))
    parsed = parse_reply(line)
    assert parsed.explanation == shown
    assert parsed.fields == {"id": "r1"}


def test_explanation_is_capped() -> None:
    line = format_reply(Outcome(Code.MALFORMED, "w" * 5000))
    parsed = parse_reply(line)
    assert len(parsed.explanation) == 400
    assert parsed.explanation.endswith("...")


def test_escaping_cannot_grow_past_the_cap() -> None:
    line = format_reply(Outcome(Code.MALFORMED, "\U0001f600" * 5000, id="\U0001f600" * 5000))
    assert len(line) < 700


PARSED: list[tuple[str | bytes, ParsedReply]] = [
    (
        b"OK connected id=1 verified=yes fine\n",
        ParsedReply("OK", "connected", {"id": "1", "verified": "yes"}, "fine"),
    ),
    ("ERROR malformed\r\n", ParsedReply("ERROR", "malformed", {}, "")),
    (
        "BUSY  rate_limited   retry_after=3   wait  a bit",
        ParsedReply("BUSY", "rate_limited", {"retry_after": "3"}, "wait  a bit"),
    ),
    (
        "COOKIE cookie=abc send it again",
        ParsedReply("COOKIE", "", {"cookie": "abc"}, "send it again"),
    ),
    ("OK connected a=1 text b=2", ParsedReply("OK", "connected", {"a": "1"}, "text b=2")),
    ("OK connected a=1 a=2 x", ParsedReply("OK", "connected", {"a": "1"}, "x")),
    ("", ParsedReply("", "", {}, "")),
    ("OK", ParsedReply("OK", "", {}, "")),
    (b"OK \xff k=v", ParsedReply("OK", "\ufffd", {"k": "v"}, "")),
]


@pytest.mark.parametrize(("line", "expected"), PARSED)
def test_parse_reply(line: str | bytes, expected: ParsedReply) -> None:
    assert parse_reply(line) == expected


@pytest.mark.parametrize(
    ("text", "limit", "quoted"),
    [
        ("127.1", 60, "'127.1'"),
        ("it's", 60, "'it\\'s'"),
        ("a\x00b\n", 60, "'a\\x00b\\n'"),
        ("abcdefghij", 10, "'abcdefghij'"),
        ("abcdefghijk", 10, "'abcdefg...'"),
        ("\u00e9\u00e9\u00e9", 8, "'\\xe9...'"),
        ("a\\b\t\r\x7f\x85", 60, "'a\\\\b\\t\\r\\x7f\\x85'"),
        ("\u202e\ud800\U0001f600", 60, "'\\u202e\\ud800\\U0001f600'"),
    ],
)
def test_quote_input(text: str, limit: int, quoted: str) -> None:
    assert quote_input(text, limit) == quoted


def test_safe_helpers() -> None:
    assert safe_value("a b\tc\nd") == "a_b_c_d"
    assert safe_value("x" * 500) == "x" * 197 + "..."
    assert safe_text(" a \n\n b ") == "a b"
    assert safe_text("") == ""


# ---------------------------------------------------------------- properties

ANY_TEXT = st.text(st.characters(codec=None), max_size=600)
SAFE_ID = st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=40)


@st.composite
def outcomes(draw: st.DrawFn) -> Outcome:
    return Outcome(
        code=draw(st.sampled_from(Code)),
        explanation=draw(ANY_TEXT),
        id=draw(st.none() | ANY_TEXT),
        target=draw(st.none() | ANY_TEXT),
        observed=draw(st.none() | ANY_TEXT),
        diagnosis=draw(st.none() | st.sampled_from(Diagnosis)),
        rtt_ms=draw(st.none() | st.floats(allow_nan=True, allow_infinity=True)),
        verified=draw(st.none() | st.booleans()),
        retry_after=draw(st.none() | st.integers(0, 10**6)),
        corrected=draw(st.booleans()),
        student=draw(st.none() | ANY_TEXT),
        extra=tuple(draw(st.lists(st.tuples(ANY_TEXT, ANY_TEXT), max_size=3))),
    )


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=500)
@given(outcomes())
def test_reply_is_always_one_safe_line(outcome: Outcome) -> None:
    line = format_reply(outcome)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    body = line[:-1].decode("ascii")
    assert body.isprintable()
    parsed = parse_reply(line)
    assert parsed.status == outcome.status.value
    assert Status(parsed.status) == outcome.code.status
    assert parsed.code == outcome.code.value
    if outcome.id is not None:
        assert parsed.fields["id"] == safe_value(outcome.id)
    else:
        assert "id" not in parsed.fields
    assert parsed.explanation == safe_text(parsed.explanation)


@given(SAFE_ID, ANY_TEXT)
def test_plain_ids_read_back_exactly(reg_id: str, explanation: str) -> None:
    parsed = parse_reply(format_reply(Outcome(Code.CONNECTED, explanation, id=reg_id)))
    assert parsed.fields == {"id": reg_id}
    assert parsed.explanation


@given(st.binary(max_size=300) | ANY_TEXT)
def test_parse_reply_never_raises(line: bytes | str) -> None:
    parse_reply(line)


@given(st.text(st.sampled_from(" ab=\\'.:"), max_size=450))
def test_safe_text_of_printable_ascii_only_collapses_spaces(text: str) -> None:
    """The fast path (an already plain line) and the general one agree."""
    collapsed = " ".join(text.split())
    if len(collapsed) <= EXPLANATION_LIMIT:
        assert safe_text(text) == collapsed


def test_outcomes_and_requests_are_values_with_copies() -> None:
    """Hashed and compared by value (the doorway caches replies by Outcome); with_ copies."""
    first = Outcome(Code.CONNECTED, "ok", id="a1")
    assert first == Outcome(Code.CONNECTED, "ok", id="a1")
    assert hash(first) == hash(Outcome(Code.CONNECTED, "ok", id="a1"))
    changed = first.with_(id="b2")
    assert changed.id == "b2" and first.id == "a1" and changed is not first
    assert hash(Request("example.org", 15000)) == hash(Request("example.org", 15000))


@settings(max_examples=200)
@given(outcomes())
@example(Outcome(Code.CONNECTED, "x", id="a b", target="127.0.0.1:1"))
@example(Outcome(Code.CONNECTED, "x", id="a\\b"))
@example(Outcome(Code.CONNECTED, "x", observed="x" * 250))
def test_reply_fields_are_each_value_made_safe(outcome: Outcome) -> None:
    """The fast path (every value checked at once) gives each value's safe_value."""
    from registry.protocol.reply import _fields

    expected = [f"{key}={safe_value(value)}" for key, value in _fields(outcome)]
    tokens = format_reply(outcome).decode("ascii")[:-1].split(" ")
    assert tokens[2 : 2 + len(expected)] == expected
