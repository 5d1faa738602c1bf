"""The request reader (registry/protocol/reader.py): sniff, frame and time one request.

Sans-io and handed the time, so ``play`` stands in for a driver: it feeds each
chunk at its (virtual) second and, between chunks, ticks at ``next_deadline``
the way net/tcp.py and net/waiting.py do. The tables give each client's bytes
on a schedule and the second and value the reader decides; then byte-by-byte
and hypothesis properties (every stream is decided once, never after the read
deadline).
"""

from __future__ import annotations

import math
from ipaddress import IPv4Address

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry import config as config_mod
from registry.config import ProtocolConfig
from registry.errors import ProtocolError
from registry.model import Code, Protocol, Request
from registry.protocol.reader import RequestReader, sniff
from registry.protocol.text import parse_line

EOF = b""
CFG = config_mod.from_dict({}).protocol  # read_deadline 5 s, quiet_period 250 ms, 512 bytes
assert (CFG.read_deadline, CFG.quiet_period, CFG.max_request_bytes) == (5.0, 0.25, 512)


def _cfg(**protocol: float) -> ProtocolConfig:
    return msgspec.structs.replace(CFG, **protocol)


def play(
    chunks: list[tuple[float, bytes]], cfg: ProtocolConfig = CFG, arrived: float = 0.0
) -> tuple[float, Protocol, Request | ProtocolError]:
    """Drive a reader through ``(second, bytes)`` chunks: (when, protocol, decision)."""
    reader = RequestReader(cfg, arrived)
    for at, data in [*chunks, (math.inf, None)]:
        while reader.next_deadline <= at:  # a deadline that falls with a byte goes first
            now = reader.next_deadline
            decision = reader.tick(now)
            if decision is not None:
                return now, reader.protocol, decision
            assert reader.next_deadline > now  # nothing is due twice
        assert data is not None, "undecided with no deadline left"
        decision = reader.feed(data, at)
        if decision is not None:
            return at, reader.protocol, decision
        assert at < reader.next_deadline <= reader.deadline
    raise AssertionError("unreachable")


def summary(decided: tuple[float, Protocol, Request | ProtocolError]) -> tuple[float, str, str]:
    when, protocol, decision = decided
    if isinstance(decision, ProtocolError):
        assert decision.__traceback__ is None  # kept by the waiting room: no frames tied to it
        return when, protocol.value, decision.code.value
    return when, protocol.value, decision.advertised


GOOD = b"127.0.0.1:15000"
JSON = b'{"host": "127.0.0.1", "port": 15000}'

# name: (chunks, config, (second, protocol, request or reply code))
CASES: dict[str, tuple[list[tuple[float, bytes]], ProtocolConfig, tuple[float, str, str]]] = {
    "line at once": ([(0, GOOD + b"\n")], CFG, (0, "text", "127.0.0.1:15000")),
    "CR LF": ([(0, GOOD + b"\r\n")], CFG, (0, "text", "127.0.0.1:15000")),
    "line in pieces": (
        [(0, b"127.0"), (0.125, b".0.1:1"), (0.25, b"5000\n")],
        CFG,
        (0.25, "text", "127.0.0.1:15000"),
    ),
    # the lab's C++ client: no newline, it waits for the reply
    "quiet period frames it": ([(0, GOOD)], CFG, (0.25, "text", "127.0.0.1:15000")),
    "a byte restarts the quiet period": (
        [(0, b"127.0.0.1:1"), (0.125, b"5000")],
        CFG,
        (0.375, "text", "127.0.0.1:15000"),
    ),
    "EOF frames it": ([(0, GOOD), (0.125, EOF)], CFG, (0.125, "text", "127.0.0.1:15000")),
    "json": ([(0, JSON + b"\n")], CFG, (0, "json", "127.0.0.1:15000")),
    "json after blank lines": (
        [(0, b"\r\n \t" + JSON)],
        CFG,
        (0.25, "json", "127.0.0.1:15000"),
    ),
    # an object cut in the middle is not parsed at its quiet period: it waits for the rest
    "json cut by a slow client": (
        [(0, JSON[:20]), (1, JSON[20:])],
        CFG,
        (1.25, "json", "127.0.0.1:15000"),
    ),
    # the first bytes choose: whitespace alone is text, and stays text
    "whitespace, then json": (
        [(0, b" "), (0.125, JSON + b"\n")],
        CFG,
        (0.125, "text", "malformed"),
    ),
    "one junk byte": ([(0, b"1")], CFG, (0.25, "text", "malformed")),
    "junk line": ([(0, b"hello\n")], CFG, (0, "text", "malformed")),
    "bad json": ([(0, b"{nope}\n")], CFG, (0, "json", "bad_json")),
    "too long": ([(0, b"1" * 600)], CFG, (0, "text", "too_long")),
    "too long in pieces": (
        [(0, b"1" * 512), (0.125, b"1")],
        CFG,
        (0.125, "text", "too_long"),
    ),
    "json too long": ([(0, b"{" + b" " * 600)], CFG, (0, "json", "too_long")),
    "closed before a byte": ([(0, EOF)], CFG, (0, "text", "malformed")),
    "silence": ([], CFG, (5, "text", "read_timeout")),
    "silence, shorter deadline": ([], _cfg(read_deadline=0.75), (0.75, "text", "read_timeout")),
    # its quiet period would end exactly at the deadline: the deadline wins
    "a tie goes to the deadline": ([(4.75, GOOD)], CFG, (5, "text", "read_timeout")),
    # whitespace is not a request: the quiet period does not frame it
    "whitespace drip": (
        [(0.125 * i, b" ") for i in range(1, 60)],
        CFG,
        (5, "text", "read_timeout"),
    ),
    # no gap reaches a 2 s quiet period: the total deadline cuts the drip
    "one byte a second, long quiet period": (
        [(i + 1.0, bytes([b])) for i, b in enumerate(GOOD)],
        _cfg(quiet_period=2.0),
        (5, "text", "read_timeout"),
    ),
    # the same drip under 250 ms: the first gap frames "1" as the whole request
    "one byte a second": (
        [(i + 1.0, bytes([b])) for i, b in enumerate(GOOD)],
        CFG,
        (1.25, "text", "malformed"),
    ),
    "one byte a second inside a long deadline": (
        [(i + 1.0, bytes([b])) for i, b in enumerate(GOOD)],
        _cfg(quiet_period=2.0, read_deadline=30.0),
        (17, "text", "127.0.0.1:15000"),
    ),
    "a byte past the size cap needs no deadline": (
        [(0.5, b"9" * 65)],
        _cfg(max_request_bytes=64),
        (0.5, "text", "too_long"),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_the_reader_decides_on_time(name: str) -> None:
    chunks, cfg, expected = CASES[name]
    assert summary(play(chunks, cfg)) == expected


@pytest.mark.parametrize(
    ("arrived", "chunks", "expected"),
    [
        # the kernel held it 3 s (TCP_DEFER_ACCEPT): they count in its deadline
        (-3.0, [], (2, "text", "read_timeout")),
        # held past its whole deadline: decided at the first look, before its bytes
        (-6.0, [(0, GOOD + b"\n")], (-1, "text", "read_timeout")),
        (-3.0, [(1, GOOD + b"\n")], (1, "text", "127.0.0.1:15000")),
    ],
)
def test_the_deadline_counts_from_arrival(
    arrived: float, chunks: list[tuple[float, bytes]], expected: tuple[float, str, str]
) -> None:
    assert summary(play(chunks, arrived=arrived)) == expected


@pytest.mark.parametrize(
    ("chunks", "explanation"),
    [
        ([], "no request arrived within 5 s; send HOST:PORT, e.g. 192.168.1.105:15000"),
        ([(0, b" ")], "the request was not complete within 5 s"),
        ([(0, JSON[:20])], "the request was not complete within 5 s"),
    ],
)
def test_a_timeout_says_whether_anything_arrived(
    chunks: list[tuple[float, bytes]], explanation: str
) -> None:
    _, _, error = play(chunks)
    assert isinstance(error, ProtocolError) and error.code is Code.READ_TIMEOUT
    assert error.explanation == explanation


def test_started_and_next_deadline() -> None:
    reader = RequestReader(CFG, 10.0)
    assert not reader.started and reader.next_deadline == 15.0
    assert reader.tick(14.0) is None  # nothing due yet: nothing changes
    assert reader.feed(b"127.0.0.1:", 11.0) is None
    assert reader.started and reader.next_deadline == 11.25
    assert reader.feed(b"150", 11.125) is None
    assert reader.next_deadline == 11.375  # counted from the last byte
    assert reader.tick(11.375) == Request(IPv4Address("127.0.0.1"), 150)


def test_a_quiet_period_that_frames_nothing_is_not_looked_at_again() -> None:
    reader = RequestReader(CFG, 0.0)
    assert reader.feed(b"  ", 1.0) is None
    assert reader.next_deadline == 1.25
    assert reader.tick(1.25) is None  # only whitespace: not a request yet
    assert reader.next_deadline == 5.0  # no new byte: the deadline is all that is left


@pytest.mark.parametrize(
    ("first", "protocol"),
    [
        (b'{"host": "1.2.3.4", "port": 80}', Protocol.JSON),
        (b"{", Protocol.JSON),
        (b" \r\n\t{", Protocol.JSON),
        (b"1.2.3.4:80", Protocol.TEXT),
        (b"[::1]:80", Protocol.TEXT),
        (b"  1{", Protocol.TEXT),
        (b"", Protocol.TEXT),
        (b" \n", Protocol.TEXT),
        (b"\xff", Protocol.TEXT),
    ],
)
def test_sniff(first: bytes, protocol: Protocol) -> None:
    assert sniff(first) == protocol


LINES = [
    b"127.0.0.1:15000",
    b"[::1]:15000 student=ada",
    b"10.0.0.1:80 student=ada verify=no",
    b'{"host": "10.0.0.1", "port": 80}',
    b'{"host": "::1", "port": 15000, "student": "ada"}',
    b"127.0.0.1:0",
    b"hello",
]


@pytest.mark.parametrize("line", LINES)
def test_byte_by_byte_is_the_same_as_whole(line: bytes) -> None:
    for ending in (b"\n", b"\r\n"):
        whole = summary(play([(0, line + ending)]))
        bytewise = summary(play([(0, bytes([b])) for b in line + ending]))
        assert bytewise == whole
    # and with no terminator, the quiet period after the last byte frames the same request
    expected = summary(play([(0, line + b"\n")]))[1:]
    assert summary(play([(0, bytes([b])) for b in line])) == (0.25, *expected)


@st.composite
def schedules(
    draw: st.DrawFn, data: st.SearchStrategy[bytes], max_gap: int = 200
) -> list[tuple[float, bytes]]:
    """``data`` cut into chunks, sent ``max_gap``/64 s apart at most (and EOF, maybe)."""
    payload = draw(data)
    inner = st.integers(1, len(payload) - 1)
    cuts = sorted(draw(st.sets(inner, max_size=8))) if len(payload) > 1 else []
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    gaps = draw(st.lists(st.integers(0, max_gap), min_size=len(pieces), max_size=len(pieces)))
    at, chunks = 0.0, []
    for gap, piece in zip(gaps, pieces, strict=True):
        at += gap / 64
        chunks.append((at, piece))
    if draw(st.booleans()):
        chunks.append((at + draw(st.integers(0, max_gap)) / 64, EOF))
    return chunks


@settings(max_examples=300)
@given(schedules(st.binary(max_size=700)))
def test_any_stream_is_decided_once_by_its_deadline(chunks: list[tuple[float, bytes]]) -> None:
    when, _, decision = play(chunks)  # play checks each step: nothing due twice, none missed
    assert when <= CFG.read_deadline
    assert isinstance(decision, Request | ProtocolError)


@settings(max_examples=200)
@given(st.sampled_from(LINES[:-2]), st.data())
def test_a_request_in_pieces_is_the_request(line: bytes, data: st.DataObject) -> None:
    # every gap under the quiet period: the LF frames exactly the request sent in one piece
    chunks = data.draw(schedules(st.just(line + b"\n"), max_gap=15))  # 15/64 s < 250 ms
    when, _, decision = play(chunks)
    expected = play([(0, line + b"\n")])[2]
    assert decision == expected and isinstance(decision, Request)
    assert when == next(at for at, piece in chunks if b"\n" in piece)  # framed by its LF
    if not line.startswith(b"{"):
        assert decision == parse_line(line)
