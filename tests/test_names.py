"""Student names of any script (registry/protocol/names.py), table-driven,
and the same rule through both parsers, ``registry token`` and ``results --student``."""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.errors import ProtocolError
from registry.model import Code
from registry.policy.auth import derive_token
from registry.protocol.jsonl import parse_json
from registry.protocol.names import BadName, normalise
from registry.protocol.text import parse_line

JOSE_NFC = "jos\u00e9"
JOSE_NFD = "jose\u0301"

ACCEPTED = [
    ("alice", "alice", False),
    ("a.b_c@d-e", "a.b_c@d-e", False),
    (JOSE_NFC, JOSE_NFC, False),
    (JOSE_NFD, JOSE_NFC, False),  # composed: one student, whatever keyboard typed it
    (JOSE_NFD.encode(), JOSE_NFC, False),
    ("李雷", "李雷", False),
    ("Ωmega", "Ωmega", False),
    ("हिन्दी", "हिन्दी", False),  # vowel signs and virama are combining marks
    ("محمد٣", "محمد٣", False),  # Arabic-Indic digit
    ("x" * 64, "x" * 64, False),
    ("Ana Lima", "Ana Lima", True),  # JSON only
]

REFUSED = [
    ("ali\u202ece", False, "the invisible character U+202E (RIGHT-TO-LEFT OVERRIDE)"),
    ("ali\u200bce", False, "the invisible character U+200B (ZERO WIDTH SPACE)"),
    ("\ufeffalice", False, "the invisible character U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
    ("alice\u3164", False, "the invisible character U+3164 (HANGUL FILLER)"),
    ("\u115falice", False, "the invisible character U+115F (HANGUL CHOSEONG FILLER)"),
    ("alice\ufe0f", False, "the invisible character U+FE0F (VARIATION SELECTOR-16)"),
    ("ali\u034fce", False, "the invisible character U+034F (COMBINING GRAPHEME JOINER)"),
    ("ali\tce", False, "the control character U+0009 (TAB)"),
    ("ali\x1b[31mce", False, "the control character U+001B (ESCAPE)"),
    ("ali\x85ce", False, "the control character U+0085"),
    (b"ali\xffce", False, "is not valid UTF-8 (byte 0xff at offset 3)"),
    ("ali\udcffce", False, "the byte 0xff, which is not UTF-8"),  # surrogateescape'd argv
    ("ali\ud800ce", False, "the lone surrogate U+D800"),
    ("ali\u2028ce", False, "the line break U+2028"),
    ("", False, "is empty"),
    ("x" * 65, False, "is 65 characters long"),
    ("alice!", False, "U+0021 (EXCLAMATION MARK), which is not a letter or digit"),
    ("ali\u00a0ce", False, "U+00A0 (NO-BREAK SPACE), which is not a letter or digit"),
    ("Ana Lima", False, "contains a space, which is not a letter or digit"),
    ("Ana  Lima", True, "twice in a row"),
    (" Ana", True, "at the start"),
    ("\u0301abc", False, "U+0301 (COMBINING ACUTE ACCENT), which is not a letter"),
    ("\U0001f600", False, "U+1F600 (GRINNING FACE), which is not a letter or digit"),
]


@pytest.mark.parametrize(("name", "expected", "spaces"), ACCEPTED)
def test_accepted_names_come_back_in_nfc(name: str | bytes, expected: str, spaces: bool) -> None:
    got = normalise(name, spaces=spaces)
    assert got == expected
    assert unicodedata.is_normalized("NFC", got)


@pytest.mark.parametrize(("name", "spaces", "why"), REFUSED)
def test_refused_names_say_what_is_wrong(name: str | bytes, spaces: bool, why: str) -> None:
    with pytest.raises(BadName) as info:
        normalise(name, spaces=spaces)
    message = str(info.value)
    assert why in message
    assert message.isascii() and message.isprintable()


def test_text_protocol_normalises_and_explains() -> None:
    assert parse_line(f"10.0.0.1:15000 student={JOSE_NFD}".encode()).student == JOSE_NFC
    assert parse_line("10.0.0.1:15000 student=李雷").student == "李雷"
    with pytest.raises(ProtocolError) as info:
        parse_line("10.0.0.1:15000 student=ali\u202ece".encode())
    assert info.value.code is Code.MALFORMED
    assert "student name" in info.value.explanation
    assert "the invisible character U+202E" in info.value.explanation


def test_text_protocol_names_the_field_of_a_control_character() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_line(b"10.0.0.1:15000 student=al\x01ice")
    assert "control character '\\x01' at offset 25 (in student=)" in info.value.explanation
    with pytest.raises(ProtocolError) as info:
        parse_line(b"10.0.0.1:1\x0250")
    assert "(in " not in info.value.explanation


def test_json_protocol_normalises_and_explains() -> None:
    got = parse_json(f'{{"host": "10.0.0.1", "port": 1, "student": "{JOSE_NFD}"}}'.encode())
    assert got.student == JOSE_NFC
    spaced = parse_json(b'{"host": "10.0.0.1", "port": 1, "student": "Ana Lima"}')
    assert spaced.student == "Ana Lima"
    with pytest.raises(ProtocolError) as info:
        parse_json(b'{"host": "10.0.0.1", "port": 1, "student": "a\\u200bb"}')
    assert info.value.code is Code.BAD_JSON
    assert '"student"' in info.value.explanation
    assert "U+200B (ZERO WIDTH SPACE)" in info.value.explanation


def test_token_is_the_same_for_either_spelling_of_a_name() -> None:
    """The parsers hand auth the NFC form, so ``registry token`` must derive from it too."""
    from registry.cli import token_name

    assert token_name(JOSE_NFD) == JOSE_NFC
    assert derive_token(b"s", token_name(JOSE_NFD)) == derive_token(b"s", JOSE_NFC)


def test_student_tool_sends_nfc_and_refuses_invisible_characters() -> None:
    """The student side cannot import the registry's rule; its own check agrees on these."""
    from student.wire import check_name

    assert check_name(JOSE_NFD) == JOSE_NFC
    assert check_name("李雷") == "李雷"
    for bad, why in [
        ("ali\u202ece", "invisible character U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("ali\u200bce", "invisible character U+200B (ZERO WIDTH SPACE)"),
        ("\ufeffalice", "invisible character U+FEFF"),
        ("ali\x1bce", "control character U+001B"),
    ]:
        with pytest.raises(ValueError, match=re.escape(why)):
            check_name(bad)


@pytest.mark.parametrize(
    ("char", "why"),
    [
        ("\u3164", "invisible character U+3164 (HANGUL FILLER)"),
        ("\u115f", "invisible character U+115F (HANGUL CHOSEONG FILLER)"),
        ("\u1160", "invisible character U+1160 (HANGUL JUNGSEONG FILLER)"),
        ("\uffa0", "invisible character U+FFA0 (HALFWIDTH HANGUL FILLER)"),
        ("\u034f", "invisible character U+034F (COMBINING GRAPHEME JOINER)"),
        ("\ufe0f", "invisible character U+FE0F (VARIATION SELECTOR-16)"),
        ("\U000e0100", "invisible character U+E0100 (VARIATION SELECTOR-17)"),
        ("\u2028", "line break character U+2028 (LINE SEPARATOR)"),
    ],
)
def test_student_tool_refuses_the_characters_that_draw_nothing(char: str, why: str) -> None:
    """``alice`` + a Hangul filler would be a second student who looks the same."""
    from student.wire import check_name

    with pytest.raises(ValueError, match=re.escape(why)):
        check_name("alice" + char)
    with pytest.raises(BadName):
        normalise("alice" + char)


@pytest.mark.slow  # every code point: about a second
def test_the_student_tool_refuses_exactly_the_characters_the_registry_does() -> None:
    """One rule on both sides: the student's mirror of names.py, checked on every code point."""
    from registry.protocol import names
    from student import wire

    assert wire.INVISIBLE == names.INVISIBLE
    differ = [
        f"U+{cp:04X}"
        for cp in range(0x110000)
        if (wire.refused_character(chr(cp)) is None) != (names._character_problem(chr(cp)) is None)
    ]
    assert not differ, differ[:20]


def test_student_tool_takes_a_name_with_spaces_only_for_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from student.cli import run
    from student.wire import check_name

    assert check_name("Ana Lima") == "Ana Lima"
    for bad in ("Ana  Lima", " Ana", "Ana "):
        with pytest.raises(ValueError, match="one word"):
            check_name(bad)
    with pytest.raises(SystemExit) as info:
        run(["client", "--registry", "127.0.0.1:9", "--student", "Ana Lima"])
    assert info.value.code == 64
    assert "needs --json" in capsys.readouterr().err


@given(st.text(max_size=80), st.booleans())
def test_any_text_is_either_a_clean_nfc_name_or_refused_in_printable_ascii(
    text: str, spaces: bool
) -> None:
    try:
        name = normalise(text, spaces=spaces)
    except BadName as exc:
        assert str(exc).isascii() and str(exc).isprintable()
        return
    assert 1 <= len(name) <= 64
    assert unicodedata.is_normalized("NFC", name)
    assert not any(unicodedata.category(ch)[0] in "CZ" and ch != " " for ch in name)
    assert spaces or " " not in name
    assert normalise(name, spaces=spaces) == name  # idempotent
