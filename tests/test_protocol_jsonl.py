"""JSON lines: parse_json, JsonReceiver framing, scan_depth and format_json_reply.

Every table row goes through ``tr()``: the same bytes fed whole, byte by byte,
with trailing data after the LF, ended by EOF, and finished by the quiet
period must give the same Request or the same error code (and, for errors,
an explanation that names the field). Sans-io: no sockets here.
"""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.errors import ProtocolError
from registry.model import Code, Diagnosis, Outcome, Request
from registry.protocol.jsonl import (
    MAX_DEPTH,
    REPLY_KEYS,
    JsonReceiver,
    format_json_reply,
    parse_json,
    scan_depth,
)
from student.wire import parse_json_reply

Result = Request | tuple[Code, str]


def _pair(decision: Request | ProtocolError | None) -> Result | None:
    """A decision as the tables write it: the Request, or the error's (code, explanation)."""
    return (
        (decision.code, decision.explanation) if isinstance(decision, ProtocolError) else decision
    )


def _result(receiver: JsonReceiver) -> Result | None:
    return _pair(receiver.next_event())


def _whole(data: bytes) -> Result | None:
    receiver = JsonReceiver()
    receiver.receive_data(data + b"\n")
    return _result(receiver)


def _bytewise(data: bytes) -> Result | None:
    """One byte at a time: None until the LF (or the size cap), then the result."""
    receiver = JsonReceiver()
    for i, byte in enumerate(data + b"\n"):
        receiver.receive_data(bytes([byte]))
        got = _result(receiver)
        if got is not None:
            assert byte == 0x0A or (isinstance(got, tuple) and got[0] is Code.TOO_LONG), (i, got)
            return got
    return _result(receiver)


def _trailing(data: bytes) -> Result | None:
    receiver = JsonReceiver()
    receiver.receive_data(data + b"\n" + b'{"host": "10.0.0.1", "port": 1} junk')
    receiver.receive_data(b"more junk\n")
    return _result(receiver)


def _eof(data: bytes) -> Result | None:
    receiver = JsonReceiver()
    receiver.receive_data(data)
    receiver.receive_data(b"")
    return _result(receiver)


def _quiet(data: bytes) -> Result | None:
    receiver = JsonReceiver()
    receiver.receive_data(data)
    return _pair(receiver.quiet())


def _same(a: Result | None, b: Result | None) -> bool:
    """Requests equal; errors with the same code (explanations may differ by offset)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return a[0] is b[0]
    return a == b


def tr(data: bytes) -> Result | None:
    """The result of ``data``, checked to be the same whichever way it is delivered."""
    whole = _whole(data)
    for other in (_bytewise(data), _trailing(data), _eof(data)):
        assert _same(other, whole), (other, whole)
    quiet = _quiet(data)
    # The quiet period takes only an object whose brackets balance; anything
    # else keeps waiting for more bytes (the edge's deadline ends it).
    assert quiet is None or _same(quiet, whole), (quiet, whole)
    return whole


V4 = IPv4Address("192.168.1.105")

GOOD: list[tuple[str, Request]] = [
    ('{"host": "192.168.1.105", "port": 15000}', Request(V4, 15000)),
    ('{"port": 15000, "host": "192.168.1.105"}', Request(V4, 15000)),
    ('  \t{"host":"192.168.1.105","port":15000}', Request(V4, 15000)),
    ('{"host": "192.168.1.105", "port": 15000}\r', Request(V4, 15000)),
    (
        '{"host": "192.168.1.105", "port": 15000, "student": "alice", "token": "t0k!", '
        '"verify": true}',
        Request(V4, 15000, student="alice", token="t0k!", verify=True),
    ),
    ('{"host": "192.168.1.105", "port": 1, "verify": false}', Request(V4, 1, verify=False)),
    (
        '{"host": "192.168.1.105", "port": 65535, "student": null, "token": null, "verify": null}',
        Request(V4, 65535),
    ),
    ('{"host": "::1", "port": 15000}', Request(IPv6Address("::1"), 15000)),
    ('{"host": "[::1]", "port": 15000}', Request(IPv6Address("::1"), 15000)),
    ('{"host": "2001:DB8::1", "port": 15000}', Request(IPv6Address("2001:db8::1"), 15000)),
    ('{"host": "::ffff:127.0.0.1", "port": 15000}', Request(IPv6Address("::ffff:7f00:1"), 15000)),
    ('{"host": "Lab-PC.Example.COM.", "port": 15000}', Request("lab-pc.example.com", 15000)),
    ('{"host": "\\u0031\\u0030.0.0.1", "port": 15000}', Request(IPv4Address("10.0.0.1"), 15000)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD)
def test_good_requests(text: str, expected: Request) -> None:
    assert tr(text.encode()) == expected


# (request, code, the explanation must contain this)
BAD: list[tuple[bytes, Code, str]] = [
    # wrong types
    (b'{"host": 192, "port": 15000}', Code.BAD_JSON, '"host": expected a string'),
    (b'{"host": ["10.0.0.1"], "port": 15000}', Code.BAD_JSON, '"host": expected a string'),
    (b'{"host": "10.0.0.1", "port": "15000"}', Code.BAD_JSON, '"port": expected an integer'),
    (b'{"host": "10.0.0.1", "port": true}', Code.BAD_JSON, '"port": expected an integer'),
    (b'{"host": "10.0.0.1", "port": 15000.0}', Code.BAD_JSON, "write 15000 without"),
    (b'{"host": "10.0.0.1", "port": 1.5e4}', Code.BAD_JSON, '"port"'),
    (b'{"host": "10.0.0.1", "port": null}', Code.BAD_JSON, '"port": expected an integer'),
    (b'{"host": "10.0.0.1", "port": 1, "verify": "yes"}', Code.BAD_JSON, '"verify": expected'),
    (b'{"host": "10.0.0.1", "port": 1, "verify": 1}', Code.BAD_JSON, '"verify": expected'),
    (b'{"host": "10.0.0.1", "port": 1, "student": 7}', Code.BAD_JSON, '"student": expected'),
    (b'{"host": "10.0.0.1", "port": 1, "token": {}}', Code.BAD_JSON, '"token": expected'),
    # missing and unknown fields
    (b"{}", Code.BAD_JSON, '"host": missing'),
    (b'{"port": 15000}', Code.BAD_JSON, '"host": missing'),
    (b'{"host": "10.0.0.1"}', Code.BAD_JSON, '"port": missing'),
    (b'{"host": "10.0.0.1", "port": 1, "hots": 1}', Code.BAD_JSON, '"hots": unknown field'),
    (b'{"host": "10.0.0.1", "port": 1, "cookie": "x"}', Code.BAD_JSON, '"cookie": unknown'),
    (b'{"hostname": "a.b", "port": 1}', Code.BAD_JSON, '"hostname": unknown field'),
    # values
    (b'{"host": "10.0.0.1", "port": 0}', Code.BAD_JSON, '"port": 0 is out of range'),
    (b'{"host": "10.0.0.1", "port": 65536}', Code.BAD_JSON, '"port": 65536 is out of range'),
    (b'{"host": "10.0.0.1", "port": -1}', Code.BAD_JSON, '"port": -1 is out of range'),
    (b'{"host": "10.0.0.1", "port": 1' + b"0" * 40 + b"}", Code.BAD_JSON, "a huge number"),
    (b'{"host": "127.1", "port": 15000}', Code.BAD_JSON, "\"host\": '127.1' is a short"),
    (b'{"host": "0x7f.0.0.1", "port": 15000}', Code.BAD_JSON, "hexadecimal"),
    (b'{"host": "010.0.0.1", "port": 15000}', Code.BAD_JSON, "leading zero"),
    (b'{"host": "2130706433", "port": 15000}', Code.BAD_JSON, "one integer"),
    (b'{"host": "fe80::1%eth0", "port": 15000}', Code.BAD_JSON, "zone id"),
    (b'{"host": "[10.0.0.1]", "port": 15000}', Code.BAD_JSON, "brackets are for IPv6"),
    (b'{"host": "[::1", "port": 15000}', Code.BAD_JSON, "no closing"),
    (b'{"host": "10.0.0.1:15000", "port": 15000}', Code.BAD_JSON, '"host"'),
    (b'{"host": "", "port": 15000}', Code.BAD_JSON, '"host": empty'),
    (b'{"host": " 10.0.0.1", "port": 15000}', Code.BAD_JSON, "surrounding spaces"),
    (b'{"host": "a b.example", "port": 15000}', Code.BAD_JSON, '"host"'),
    (b'{"host": "10.0.0.1\\u0000", "port": 15000}', Code.BAD_JSON, "control character"),
    (b'{"host": "under_score.example", "port": 1}', Code.BAD_JSON, "only letters"),
    (b'{"host": "10.0.0.1", "port": 1, "student": "a  b"}', Code.BAD_JSON, '"student"'),
    (b'{"host": "10.0.0.1", "port": 1, "token": "a b"}', Code.BAD_JSON, '"token"'),
    (b'{"host": "10.0.0.1", "port": 1, "token": ""}', Code.BAD_JSON, '"token"'),
    # nesting, shape, JSON itself
    (b'{"host": [[[[["x"]]]]], "port": 1}', Code.BAD_JSON, "nesting too deep"),
    (b"[" * 100 + b"]" * 100, Code.BAD_JSON, "nesting too deep"),
    (b'{"a": {"b": {"c": {"d": {}}}}}', Code.BAD_JSON, "nesting too deep"),
    (b'{"host": "10.0.0.1", "port": 1, "student": "[[[[[["}', Code.BAD_JSON, '"student"'),
    (b"[]", Code.BAD_JSON, "array, not an object"),
    (b'"10.0.0.1:15000"', Code.BAD_JSON, "string, not an object"),
    (b"15000", Code.BAD_JSON, "integer, not an object"),
    (b"null", Code.BAD_JSON, "null, not an object"),
    (b'{"host": "10.0.0.1", "port": 1, "port": 15000}', Code.BAD_JSON, '"port": given twice'),
    (b'{"host": "10.0.0.1", "port": NaN}', Code.BAD_JSON, "NaN is not a JSON value"),
    (b'{"host": "10.0.0.1", "port": Infinity}', Code.BAD_JSON, "Infinity is not"),
    (b'{"host": "10.0.0.1", "port": -Infinity}', Code.BAD_JSON, "Infinity is not"),
    (b'{"host": "10.0.0.1", "port": }', Code.BAD_JSON, "not valid JSON"),
    (b'{"host": "10.0.0.1", "port": 1} x', Code.BAD_JSON, "Extra data"),
    (b'{"host": "10.0.0.1", "port": 1}{}', Code.BAD_JSON, "Extra data"),
    (b"{'host': '10.0.0.1', 'port': 1}", Code.BAD_JSON, "not valid JSON"),
    (b'{"host": "10.0.0.1", "port": 1,}', Code.BAD_JSON, "not valid JSON"),
    (b'{"host": "\xff", "port": 1}', Code.BAD_JSON, "not valid UTF-8"),
    (b'{"host": "10.0.0.1", "port": 1, "student": "' + b"a" * 600 + b'"}', Code.TOO_LONG, "512"),
]


@pytest.mark.parametrize(("data", "code", "needle"), BAD)
def test_bad_requests_get_a_code_that_names_the_problem(
    data: bytes, code: Code, needle: str
) -> None:
    got = tr(data)
    assert isinstance(got, tuple), got
    assert got[0] is code
    assert needle in got[1]
    assert got[1].isascii() and "\n" not in got[1]


def test_secrets_are_never_echoed() -> None:
    got = _whole(b'{"host": "10.0.0.1", "port": 1, "token": "s3cret with space"}')
    assert isinstance(got, tuple) and "s3cret" not in got[1]


def test_not_utf8_prefix_is_refused_even_without_lf() -> None:
    assert _eof(b'{"host": "\xc3(", "port": 1}') == (_whole(b'{"host": "\xc3(", "port": 1}'))


# ------------------------------------------------------------------------- framing


def test_incomplete_object_waits_through_the_quiet_period() -> None:
    receiver = JsonReceiver()
    receiver.receive_data(b'{"host": "10.0.0.1", ')
    assert receiver.quiet() is None  # a slow client: not parsed half-way
    receiver.receive_data(b'"port": 15000}')
    assert receiver.quiet() == Request(IPv4Address("10.0.0.1"), 15000)


def test_whitespace_and_blank_lines_before_the_object_are_skipped() -> None:
    receiver = JsonReceiver()
    receiver.receive_data(b"\r\n  \n")
    assert receiver.buffered == 0
    assert receiver.quiet() is None
    receiver.receive_data(b'{"host": "10.0.0.1", "port": 2}\n')
    assert receiver.next_event() == Request(IPv4Address("10.0.0.1"), 2)


@pytest.mark.parametrize("data", [b"", b"   ", b"\n"])
def test_empty_request_at_eof(data: bytes) -> None:
    got = _eof(data)
    assert isinstance(got, tuple) and got[0] is Code.BAD_JSON and "empty" in got[1]


def test_size_cap_counts_leading_whitespace_and_holds_no_more() -> None:
    receiver = JsonReceiver(64)
    receiver.receive_data(b" " * 60)
    assert receiver.next_event() is None
    receiver.receive_data(b'{"host": "10.0.0.1"}')
    got = _result(receiver)
    assert isinstance(got, tuple) and got[0] is Code.TOO_LONG
    assert receiver.buffered <= 64


def test_result_is_fixed_once_complete() -> None:
    receiver = JsonReceiver()
    receiver.receive_data(b'{"host": "10.0.0.1", "port": 3}\n')
    first = receiver.next_event()
    receiver.receive_data(b'{"host": "10.0.0.2", "port": 4}\n')
    receiver.receive_data(b"")
    assert receiver.next_event() == first == receiver.quiet()


# ---------------------------------------------------------------------- scan_depth


@pytest.mark.parametrize(
    ("data", "deepest", "balanced"),
    [
        (b"{}", 1, True),
        (b'{"a": [1, {"b": 2}]}', 3, True),
        (b'{"a": "[[[{{{"}', 1, True),  # brackets inside strings do not count
        (b'{"a": "\\"[[[["}', 1, True),  # nor after an escaped quote
        (b'{"a": "\\\\"}', 1, True),  # an escaped backslash ends the escape
        (b'{"a": [', 2, False),
        (b'{"a": "}', 1, False),  # unterminated string
        (b"x", 0, False),
        (b"]]]", 0, False),
        (b"[[[[[[", MAX_DEPTH + 1, False),  # the scan stops past the limit
    ],
)
def test_scan_depth(data: bytes, deepest: int, balanced: bool) -> None:
    assert scan_depth(data) == (deepest, balanced)


# ----------------------------------------------------------------------- hypothesis


@given(st.binary(max_size=700), st.integers(min_value=1, max_value=40))
def test_arbitrary_bytes_give_a_request_need_data_or_a_protocol_error(
    data: bytes, chunk: int
) -> None:
    receiver = JsonReceiver()
    for i in range(0, len(data), chunk):
        receiver.receive_data(data[i : i + chunk])
        got = receiver.next_event()
        if isinstance(got, ProtocolError):
            assert got.code in (Code.BAD_JSON, Code.TOO_LONG)
            assert got.explanation.isascii()
            return
        assert got is None or isinstance(got, Request)
    got = receiver.quiet()
    if isinstance(got, ProtocolError):
        assert got.code in (Code.BAD_JSON, Code.TOO_LONG)
        return
    assert got is None or isinstance(got, Request)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["host", "port", "x", "verify"]), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "host": JSON_VALUES | st.sampled_from(["10.0.0.1", "::1", "[::1]", "a.example"]),
            "port": JSON_VALUES | st.integers(min_value=1, max_value=65535),
            "student": JSON_VALUES,
            "token": JSON_VALUES,
            "verify": JSON_VALUES,
            "extra": JSON_VALUES,
        },
    )
)
def test_any_json_object_is_a_request_or_bad_json(obj: dict[str, object]) -> None:
    text = json.dumps(obj)
    try:
        request = parse_json(text)
    except ProtocolError as exc:
        assert exc.code is Code.BAD_JSON
        return
    # Only the schema's shapes get through.
    assert set(obj) <= {"host", "port", "student", "token", "verify"}
    assert type(obj["port"]) is int and request.port == obj["port"]
    assert isinstance(obj["host"], str)
    assert request.verify is None or obj["verify"] is request.verify


# ---------------------------------------------------------------------------- reply


def test_reply_has_every_key_in_order_with_nulls() -> None:
    line = format_json_reply(Outcome(code=Code.MALFORMED, explanation="bad"))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert tuple(obj) == REPLY_KEYS
    assert obj == {
        "status": "ERROR",
        "code": "malformed",
        "id": None,
        "target": None,
        "observed": None,
        "diagnosis": None,
        "rtt_ms": None,
        "verified": None,
        "retry_after": None,
        "explanation": "bad",
    }


def test_reply_values_and_types() -> None:
    outcome = Outcome(
        code=Code.CONNECTED,
        explanation="ok\n\x1b[31mred\u202e",
        id="abc123",
        target="[::1]:15000",
        observed="[::1]:40000",
        diagnosis=Diagnosis.DIRECT,
        rtt_ms=1.2345,
        verified=True,
        retry_after=None,
    )
    line = format_json_reply(outcome)
    assert line.isascii()
    obj = json.loads(line)
    assert obj["status"] == "OK" and obj["code"] == "connected"
    assert obj["rtt_ms"] == 1.2 and obj["verified"] is True and obj["diagnosis"] == "direct"
    assert "\x1b" not in obj["explanation"] and "\n" not in obj["explanation"]
    busy = json.loads(
        format_json_reply(Outcome(code=Code.RATE_LIMITED, explanation="", retry_after=7))
    )
    assert busy["retry_after"] == 7 and busy["explanation"] is None
    assert json.loads(format_json_reply(outcome.with_(rtt_ms=float("nan"))))["rtt_ms"] is None


@given(st.text(max_size=600), st.none() | st.text(max_size=80))
def test_reply_is_always_one_ascii_json_line_the_student_codec_reads(
    explanation: str, target: str | None
) -> None:
    line = format_json_reply(
        Outcome(code=Code.SOURCE_MISMATCH, explanation=explanation, target=target)
    )
    assert line.isascii() and line.endswith(b"\n") and line.count(b"\n") == 1
    reply = parse_json_reply(line)  # the student tools' independent codec
    assert (reply.status, reply.code) == ("DENIED", "source_mismatch")
