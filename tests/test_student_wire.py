"""The student's sans-io codec (student/wire.py), table by table, against the SPEC text.

No sockets, no clock: strings and bytes in, values out.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from student.wire import (
    STATUS_CODES,
    CallbackLine,
    Ended,
    LineAssembler,
    RegistrationRequest,
    Reply,
    ReplyError,
    build_echo,
    build_json_request,
    build_text_request,
    cookie_of,
    display_ip,
    exit_code_for,
    format_endpoint,
    format_sockaddr,
    parse_callback,
    parse_hostport,
    parse_json_reply,
    parse_port,
    parse_reply,
    printable,
)

# --- requests -------------------------------------------------------------------

REQUESTS = [
    (RegistrationRequest("192.168.1.105", 15000), None, "192.168.1.105:15000"),
    (RegistrationRequest("::1", 15000), None, "[::1]:15000"),
    (RegistrationRequest("[::1]", 15000), None, "[::1]:15000"),
    (
        RegistrationRequest("10.0.0.5", 12345, student="alice"),
        None,
        "10.0.0.5:12345 student=alice",
    ),
    (
        RegistrationRequest("10.0.0.5", 12345, "bob", "t0k=n", True),
        None,
        "10.0.0.5:12345 student=bob token=t0k=n verify=yes",
    ),
    (
        RegistrationRequest("10.0.0.5", 12345, verify=False),
        "c00kie",
        "10.0.0.5:12345 verify=no cookie=c00kie",
    ),
    # The advertised text is sent exactly as given, never reinterpreted.
    (RegistrationRequest("010.0.0.1", 15000), None, "010.0.0.1:15000"),
]


@pytest.mark.parametrize(("req", "cookie", "line"), REQUESTS)
def test_build_text_request(req: RegistrationRequest, cookie: str | None, line: str) -> None:
    assert build_text_request(req, cookie=cookie) == line


@pytest.mark.parametrize("bad", ["two words", "tab\there", "", "nl\n", "bell\x07"])
def test_request_values_must_be_one_word(bad: str) -> None:
    with pytest.raises(ValueError):
        build_text_request(RegistrationRequest("10.0.0.1", 15000, student=bad))


@pytest.mark.parametrize(
    ("req", "obj"),
    [
        (RegistrationRequest("10.0.0.1", 15000), {"host": "10.0.0.1", "port": 15000}),
        (RegistrationRequest("[::1]", 80), {"host": "::1", "port": 80}),
        (
            RegistrationRequest("10.0.0.1", 15000, "al ice", "t", False),
            {"host": "10.0.0.1", "port": 15000, "student": "al ice", "token": "t", "verify": False},
        ),
    ],
)
def test_build_json_request(req: RegistrationRequest, obj: dict[str, object]) -> None:
    text = build_json_request(req)
    assert "\n" not in text and text.startswith("{")
    assert json.loads(text) == obj


# --- replies --------------------------------------------------------------------

REPLIES = [
    (
        "OK connected id=r1 target=10.0.0.5:15000 rtt_ms=1.5 verified=yes Connected.",
        Reply(
            "OK",
            "connected",
            {"id": "r1", "target": "10.0.0.5:15000", "rtt_ms": "1.5", "verified": "yes"},
            "Connected.",
        ),
    ),
    ("FAILED connection_refused\r\n", Reply("FAILED", "connection_refused", {}, "")),
    (
        "  DENIED   source_mismatch\tdiagnosis=private_behind_nat   observed=203.0.113.7  You are behind NAT: x=y stays text.  ",
        Reply(
            "DENIED",
            "source_mismatch",
            {"diagnosis": "private_behind_nat", "observed": "203.0.113.7"},
            "You are behind NAT: x=y stays text.",
        ),
    ),
    ("BUSY rate_limited retry_after=30", Reply("BUSY", "rate_limited", {"retry_after": "30"}, "")),
    (
        "ERROR malformed expected HOST:PORT",
        Reply("ERROR", "malformed", {}, "expected HOST:PORT"),
    ),
    (
        "OK connected target=[::1]:15000 id=a id=b note: verified=yes is text here",
        Reply(
            "OK",
            "connected",
            {"target": "[::1]:15000", "id": "a"},
            "note: verified=yes is text here",
        ),
    ),
    ("OK connected id= verified=no", Reply("OK", "connected", {"id": "", "verified": "no"}, "")),
    (
        "COOKIE cookie=abc.123 send it again",
        Reply("COOKIE", None, {"cookie": "abc.123"}, "send it again"),
    ),
    (b"OK connected \xff\n", Reply("OK", "connected", {}, "\ufffd")),
]


@pytest.mark.parametrize(("line", "reply"), REPLIES)
def test_parse_reply(line: str | bytes, reply: Reply) -> None:
    assert parse_reply(line) == reply


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   \r\n",
        "HELLO world",
        "ok connected",
        "OK",
        "OK verified=yes",
        "DENIED Source-Mismatch",
        "GET / HTTP/1.1",
    ],
)
def test_parse_reply_rejects(line: str) -> None:
    with pytest.raises(ReplyError):
        parse_reply(line)


def test_reply_typed_fields() -> None:
    reply = parse_reply("OK connected rtt_ms=2.25 verified=yes retry_after=x")
    assert (reply.rtt_ms, reply.verified, reply.retry_after) == (2.25, True, None)
    missing = parse_reply("FAILED timeout")
    assert (missing.rtt_ms, missing.verified, missing.get("id")) == (None, None, None)
    assert parse_reply("OK connected verified=no").verified is False


def test_reply_text_round_trip() -> None:
    for line, _ in REPLIES[:6]:
        reply = parse_reply(line)
        assert parse_reply(reply.to_text()) == reply


JSON_REPLIES = [
    (
        {
            "status": "OK",
            "code": "connected",
            "id": "r9",
            "target": "10.0.0.5:15000",
            "observed": "10.0.0.5",
            "diagnosis": None,
            "rtt_ms": 3.0,
            "verified": True,
            "retry_after": None,
            "explanation": "Connected.",
        },
        "OK connected id=r9 target=10.0.0.5:15000 observed=10.0.0.5 rtt_ms=3 verified=yes Connected.",
    ),
    (
        {"status": "BUSY", "code": "rate_limited", "retry_after": 12, "explanation": "Slow down"},
        "BUSY rate_limited retry_after=12 Slow down",
    ),
    (
        {
            "status": "DENIED",
            "code": "source_mismatch",
            "diagnosis": "cgnat",
            "observed": "100.64.1.2",
            "verified": False,
        },
        "DENIED source_mismatch observed=100.64.1.2 diagnosis=cgnat verified=no",
    ),
]


@pytest.mark.parametrize(("obj", "text"), JSON_REPLIES)
def test_parse_json_reply(obj: dict[str, object], text: str) -> None:
    reply = parse_json_reply(json.dumps(obj) + "\n")
    assert reply.to_text() == text
    assert parse_reply(text) == reply


def test_json_values_with_spaces_stay_one_token() -> None:
    reply = parse_json_reply('{"status": "FAILED", "code": "timeout", "target": "odd target"}')
    assert reply.get("target") == "odd target"
    assert reply.to_text() == "FAILED timeout target=odd_target"


@pytest.mark.parametrize(
    "line",
    [
        "",
        "[]",
        "not json",
        '{"code": "connected"}',
        '{"status": "YES", "code": "x"}',
        '{"status": "OK"}',
        '{"status": "OK", "code": 3}',
    ],
)
def test_parse_json_reply_rejects(line: str) -> None:
    with pytest.raises(ReplyError):
        parse_json_reply(line)


@pytest.mark.parametrize(
    ("line", "cookie"),
    [
        ("COOKIE cookie=v1.abc", "v1.abc"),
        ("COOKIE challenge cookie=zz ok", "zz"),
        ("OK connected cookie=zz", None),
        ("COOKIE nothing here", None),
    ],
)
def test_cookie_of(line: str, cookie: str | None) -> None:
    assert cookie_of(parse_reply(line)) == cookie


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("OK", 0),
        ("DENIED", 2),
        ("FAILED", 3),
        ("BUSY", 4),
        ("ERROR", 5),
        ("COOKIE", 5),
        (None, 5),
        ("??", 5),
    ],
)
def test_exit_code_for(status: str | None, code: int) -> None:
    assert exit_code_for(status) == code


def test_every_spec_code_parses_with_its_status() -> None:
    for status, codes in STATUS_CODES.items():
        for code in codes:
            assert parse_reply(f"{status} {code} because").code == code


# --- the callback ----------------------------------------------------------------

CALLBACKS = [
    (
        "CALLBACK id=r1 nonce=abc123 Hello from the registry!\n",
        CallbackLine("abc123", "r1", "Hello from the registry!"),
    ),
    ("CALLBACK nonce=n0 id=7\r\n", CallbackLine("n0", "7", "")),
    ("  CALLBACK   id=r2  nonce=x_y-z   hi  ", CallbackLine("x_y-z", "r2", "hi")),
    (b"CALLBACK id=r3 nonce=q \xfe", CallbackLine("q", "r3", "\ufffd")),
    ("CALLBACK id=r1 Hello, no nonce", None),
    ("CALLBACK id=r1 nonce= empty", None),
    ("HELLO nonce=abc", None),
    ("callback id=1 nonce=abc", None),
    ("", None),
    ("Hello from the instructor's server", None),
]


@pytest.mark.parametrize(("line", "parsed"), CALLBACKS)
def test_parse_callback(line: str | bytes, parsed: CallbackLine | None) -> None:
    assert parse_callback(line) == parsed


def test_build_echo() -> None:
    assert build_echo("abc123") == b"ECHO nonce=abc123\n"
    with pytest.raises(ValueError):
        build_echo("two words")


# --- line assembly (h11's tr(): whole, byte by byte, with trailing data) -----------


def _assemble(chunks: list[bytes], limit: int) -> tuple[bytes, Ended] | None:
    asm = LineAssembler(limit)
    for chunk in chunks:
        asm.receive_data(chunk)
        if (line := asm.next_line()) is not None:
            return line.data, line.ended
    return None


LINES = [
    (b"CALLBACK id=1 nonce=x\n", 4096, (b"CALLBACK id=1 nonce=x", Ended.NEWLINE)),
    (b"OK connected\r\n", 4096, (b"OK connected", Ended.NEWLINE)),
    (b"no newline then EOF", 4096, (b"no newline then EOF", Ended.EOF)),
    (b"", 4096, (b"", Ended.EOF)),
    (b"0123456789", 4, (b"0123", Ended.LIMIT)),
    (b"abc\n", 4, (b"abc", Ended.NEWLINE)),
]


@pytest.mark.parametrize(("data", "limit", "expected"), LINES)
def test_line_assembler(data: bytes, limit: int, expected: tuple[bytes, Ended]) -> None:
    eof = [] if expected[1] is not Ended.EOF else [b""]
    assert _assemble([data, *eof], limit) == expected
    assert _assemble([data[i : i + 1] for i in range(len(data))] + eof, limit) == expected
    if expected[1] is Ended.NEWLINE:
        assert _assemble([data + b"trailing\nmore"], limit) == expected


def test_line_assembler_needs_data_then_gives_up() -> None:
    asm = LineAssembler(4096)
    asm.receive_data(b"partial")
    assert asm.next_line() is None
    line = asm.give_up()
    assert (line.data, line.ended) == (b"partial", Ended.TIMEOUT)


# --- endpoints -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("127.0.0.1:9000", ("127.0.0.1", 9000)),
        ("[::1]:9000", ("::1", 9000)),
        ("registry.lab:9000", ("registry.lab", 9000)),
        (" 10.0.0.1:1 ", ("10.0.0.1", 1)),
    ],
)
def test_parse_hostport(text: str, parsed: tuple[str, int]) -> None:
    assert parse_hostport(text) == parsed


@pytest.mark.parametrize(
    "text",
    ["127.0.0.1", ":9000", "::1:9000", "[::1]", "[::1]9000", "h:0", "h:65536", "h:x", "h:٣"],
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


def test_parse_port_zero() -> None:
    assert parse_port("0", allow_zero=True) == 0
    with pytest.raises(ValueError):
        parse_port("0", allow_zero=False)


@pytest.mark.parametrize(
    ("sockaddr", "text"),
    [
        (("127.0.0.1", 40122), "127.0.0.1:40122"),
        (("::1", 5, 0, 0), "[::1]:5"),
        (("::ffff:10.1.2.3", 7, 0, 0), "10.1.2.3:7"),
        (("fe80::1%eth0", 9, 0, 2), "[fe80::1%eth0]:9"),
    ],
)
def test_format_sockaddr(sockaddr: tuple[object, ...], text: str) -> None:
    assert format_sockaddr(sockaddr) == text


def test_display_helpers() -> None:
    assert format_endpoint("2001:db8::1", 80) == "[2001:db8::1]:80"
    assert display_ip("::ffff:127.0.0.1") == "127.0.0.1"
    assert display_ip("not-an-ip") == "not-an-ip"
    assert printable("a\x1b[31mb\x00\u202e\nc") == "a\\x1b[31mb\\x00\\u202e\\x0ac"


def test_student_imports_nothing_from_registry() -> None:
    """The SPEC is the contract: two independent codecs catch each other's bugs."""
    for path in Path(__file__).parent.parent.joinpath("student").glob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "registry" or n.startswith("registry.") for n in names), path
