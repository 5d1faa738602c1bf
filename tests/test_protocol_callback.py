"""The callback line and the nonce echo scanner."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.protocol.callback import EchoScanner, callback_line, make_nonce
from student.wire import parse_callback

NONCE = "00112233aabbccdd"
NEEDLE = b"nonce=" + NONCE.encode()


def test_make_nonce() -> None:
    assert make_nonce(bytes(range(8))) == "0001020304050607"
    assert make_nonce(b"\xff" * 8) == "f" * 16
    with pytest.raises(ValueError):
        make_nonce(b"")


@pytest.mark.parametrize(
    ("reg_id", "nonce", "greeting", "line"),
    [
        (
            "r42",
            NONCE,
            "Hello from the registry!",
            b"CALLBACK id=r42 nonce=" + NONCE.encode() + b" Hello from the registry!\n",
        ),
        ("r1", "ab", "", b"CALLBACK id=r1 nonce=ab\n"),
        ("r1", "ab", "two\nlines\r\n", b"CALLBACK id=r1 nonce=ab two lines\n"),
        ("r 1", "a\nb", "caf\u00e9", b"CALLBACK id=r_1 nonce=a_b caf\\xe9\n"),
    ],
)
def test_callback_line(reg_id: str, nonce: str, greeting: str, line: bytes) -> None:
    assert callback_line(reg_id, nonce, greeting) == line


def test_callback_greeting_is_capped() -> None:
    line = callback_line("r1", NONCE, "g" * 10_000)
    assert len(line) < 300 and line.count(b"\n") == 1


@given(st.text(max_size=100), st.text(max_size=300))
def test_callback_line_is_one_ascii_line(reg_id: str, greeting: str) -> None:
    line = callback_line(reg_id or "x", NONCE, greeting)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line[:-1].decode("ascii").isprintable()
    parsed = parse_callback(line)  # as the student's server reads it
    assert parsed is not None and parsed.nonce == NONCE


def test_callback_round_trip() -> None:
    line = callback_line("r-7", NONCE, "id=spoofed nonce=spoofed")
    parsed = parse_callback(line)  # a greeting cannot override the id or the nonce
    assert parsed is not None and (parsed.id, parsed.nonce) == ("r-7", NONCE)


# ---------------------------------------------------------------- echo scanner


def _scan(chunks: list[bytes], max_bytes: int = 4096) -> EchoScanner:
    scanner = EchoScanner(NONCE, max_bytes)
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner


ECHOES: list[tuple[list[bytes], int, bool, bool]] = [
    # (chunks, max_bytes, verified, overflowed)
    ([NEEDLE + b"\n"], 4096, True, False),
    ([b"CALLBACK id=r1 " + NEEDLE + b" hello\n"], 4096, True, False),
    ([b"got it: " + NEEDLE + b"\r\n"], 4096, True, False),
    ([b"nonce=0011", b"2233aa", b"bbccdd\n"], 4096, True, False),
    ([b"first line\n", b"second " + NEEDLE], 4096, True, False),
    ([b"first line\n", b"second " + NEEDLE, b""], 4096, True, False),
    ([b"nonce=00112233aabbccd\n"], 4096, False, False),
    ([b"nonce=00112233aabbccd", b"", b"d\n"], 4096, False, False),
    ([b"nonce=00112233AABBCCDD\n"], 4096, False, False),
    ([b"nonce 00112233aabbccdd\n"], 4096, False, False),
    ([b"nonce=0011\n2233aabbccdd"], 4096, False, False),
    ([b"hello\n", b""], 4096, False, False),
    ([b"x" * 5000 + NEEDLE], 4096, False, True),
    ([b"x" * 100, NEEDLE], 100, False, True),
    ([b"x" * (100 - len(NEEDLE)), NEEDLE], 100, True, False),
    ([b"x" * (101 - len(NEEDLE)) + NEEDLE], 100, False, True),
    ([b"x" * (100 - len(NEEDLE)) + NEEDLE + b"\nmore"], 100, True, True),
    ([b"x" * 100], 100, False, False),
    ([b"x" * 100, b"y"], 100, False, True),
]


@pytest.mark.parametrize(("chunks", "limit", "verified", "overflowed"), ECHOES)
def test_echo_scanner(chunks: list[bytes], limit: int, verified: bool, overflowed: bool) -> None:
    scanner = _scan(chunks, limit)
    assert (scanner.verified, scanner.overflowed) == (verified, overflowed)
    assert scanner.received <= limit


def test_feed_reports_and_then_ignores() -> None:
    scanner = EchoScanner(NONCE)
    assert scanner.feed(b"hello ") is False
    assert scanner.feed(NEEDLE) is True
    assert scanner.feed(b"x" * 10_000) is True
    assert not scanner.overflowed


def test_nothing_counts_after_eof() -> None:
    scanner = EchoScanner(NONCE)
    assert scanner.feed(b"") is False
    assert scanner.feed(NEEDLE + b"\n") is False


@pytest.mark.parametrize(("nonce", "limit"), [("", 10), ("a b", 10), ("\u00e9", 10), ("ab", 0)])
def test_scanner_rejects_bad_arguments(nonce: str, limit: int) -> None:
    with pytest.raises(ValueError):
        EchoScanner(nonce, limit)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    noise = st.binary(max_size=80) | st.sampled_from([b"nonce=", b"nonce=0011", b"\n", NEEDLE[:-1]])
    pieces = draw(st.lists(noise | st.just(NEEDLE), max_size=8))
    whole = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=10)))
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    return whole, [c for c in chunks if c]


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=400)
@given(streams(), st.sampled_from([16, 64, 200, 4096]))
def test_echo_any_chunking(case: tuple[bytes, list[bytes]], limit: int) -> None:
    whole, chunks = case
    scanner = _scan([*chunks, b""], limit)
    assert scanner.verified == (NEEDLE in whole[:limit])
    if not scanner.verified:
        assert scanner.overflowed == (len(whole) > limit)
    assert scanner.received <= limit
