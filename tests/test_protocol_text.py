"""The text registration format: parse_line and TextReceiver framing.

Every table row goes through ``tr()`` (after h11's test_io.py): the same bytes
fed whole, byte by byte, and with trailing data after the LF (or finished by
the quiet period when there is no LF) must give the same Request or the same
error code. No sockets here: the receiver is sans-io.
"""

from __future__ import annotations

import ast
import string
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.provisional import domains

from registry.errors import ProtocolError
from registry.model import Code, Request
from registry.protocol.text import TextReceiver, parse_line

Result = Request | Code


def _code(decision: Request | ProtocolError | None) -> Result | None:
    """A decision as the tables write it: the Request, or the error's code."""
    return decision.code if isinstance(decision, ProtocolError) else decision


def _result(receiver: TextReceiver) -> Result | None:
    return _code(receiver.next_event())


def _whole(data: bytes, **kw: object) -> Result | None:
    receiver = TextReceiver(**kw)  # type: ignore[arg-type]
    receiver.receive_data(data)
    receiver.receive_data(b"")
    return _result(receiver)


def _bytewise(data: bytes, **kw: object) -> Result | None:
    """Feed one byte at a time; the result must stay None until the LF or overflow."""
    receiver = TextReceiver(**kw)  # type: ignore[arg-type]
    for i in range(len(data)):
        receiver.receive_data(data[i : i + 1])
        got = _result(receiver)
        if got is None:
            continue
        assert data[i : i + 1] == b"\n" or got == Code.TOO_LONG, (i, got)
        break
    receiver.receive_data(b"")
    return _result(receiver)


def tr(data: bytes, expected: Result, **kw: object) -> None:
    """Check ``data`` gives ``expected`` however it is delivered and ended."""
    assert _whole(data, **kw) == expected
    assert _bytewise(data, **kw) == expected
    receiver = TextReceiver(**kw)  # type: ignore[arg-type]
    if b"\n" in data:
        # One request per connection: whatever follows the LF is ignored, no EOF needed.
        receiver.receive_data(data + b"9.9.9.9:1 \x00\xff junk\n")
        assert _result(receiver) == expected
    else:
        # A lab client sends no newline and waits: the quiet period ends the request.
        if data:  # b"" would mean EOF
            receiver.receive_data(data)
        if data.strip(b" \t\r"):
            assert _code(receiver.quiet()) == expected
        else:
            assert receiver.quiet() is None
    if b"\n" not in data[:-1] and expected != Code.TOO_LONG:
        line_kw = {k: v for k, v in kw.items() if k != "max_bytes"}
        try:
            assert parse_line(data, **line_kw) == expected  # type: ignore[arg-type]
        except ProtocolError as exc:
            assert exc.code == expected


V4 = IPv4Address
V6 = IPv6Address

VALID: list[tuple[bytes, Request]] = [
    (b"192.168.1.105:15000", Request(V4("192.168.1.105"), 15000)),
    (b"192.168.1.105:15000\n", Request(V4("192.168.1.105"), 15000)),
    (b"192.168.1.105:15000\r\n", Request(V4("192.168.1.105"), 15000)),
    (b" \t 192.168.1.105:15000 \t ", Request(V4("192.168.1.105"), 15000)),
    (b"0.0.0.0:1", Request(V4("0.0.0.0"), 1)),
    (b"255.255.255.255:65535", Request(V4("255.255.255.255"), 65535)),
    (b"10.0.100.9:10000", Request(V4("10.0.100.9"), 10000)),
    (b"[::1]:15000", Request(V6("::1"), 15000)),
    (b"[2001:DB8::1]:15000\n", Request(V6("2001:db8::1"), 15000)),
    (b"[::ffff:192.0.2.1]:80", Request(V6("::ffff:192.0.2.1"), 80)),
    (b"[fe80::1]:15000", Request(V6("fe80::1"), 15000)),
    (
        b"10.0.0.1:15000 student=alice token=s3cr=t! verify=yes\n",
        Request(V4("10.0.0.1"), 15000, student="alice", token="s3cr=t!", verify=True),
    ),
    (
        b"10.0.0.1:15000\tstudent=a.b_c@d-e   verify=no",
        Request(V4("10.0.0.1"), 15000, student="a.b_c@d-e", verify=False),
    ),
    (b"Lab-Host.Example.:15000", Request("lab-host.example", 15000)),
    (b"localhost:15000", Request("localhost", 15000)),
    (b"host1:2", Request("host1", 2)),
    (b"a" * 63 + b".example:80", Request("a" * 63 + ".example", 80)),
    (b"1.2.3.4:80 token=" + b"~" * 128, Request(V4("1.2.3.4"), 80, token="~" * 128)),
    (b"1.2.3.4:80 student=" + b"s" * 64, Request(V4("1.2.3.4"), 80, student="s" * 64)),
    # Exactly at the default 512-byte limit (terminator excluded).
    (b"1.2.3.4:80" + b" " * 502 + b"\n", Request(V4("1.2.3.4"), 80)),
    (b"1.2.3.4:80" + b" " * 501 + b"\r\n", Request(V4("1.2.3.4"), 80)),
]


@pytest.mark.parametrize(("data", "expected"), VALID)
def test_valid(data: bytes, expected: Request) -> None:
    tr(data, expected)


M = Code.MALFORMED
INVALID: list[tuple[bytes, Code]] = [
    # nothing
    (b"", M),
    (b"\n", M),
    (b"\r\n", M),
    (b"   ", M),
    (b" \t \n", M),
    # CR without LF, NUL, other controls, bad UTF-8
    (b"\r", M),
    (b"1.2.3.4:80\r", M),
    (b"1.2.3.4:80\rstudent=x\n", M),
    (b"1.2.3.4:80\x00", M),
    (b"\x001.2.3.4:80\n", M),
    (b"1.2.3.4:80 \x1b[2J", M),
    (b"1.2.3.4:80\x7f", M),
    (b"1.2.3.4:80 \xc2\x85", M),
    (b"1.2.3.4:80 student=\xff", M),
    (b"\xc3\x28.example:80", M),
    # IPv4 spellings that some resolvers reinterpret
    (b"0177.0.0.1:80", M),
    (b"0x7f.0.0.1:80", M),
    (b"0X7F.0.0.1:80", M),
    (b"1.2.3.0x4:80", M),
    (b"2130706433:80", M),
    (b"0x7f000001:80", M),
    (b"127.1:80", M),
    (b"10.1.1:80", M),
    (b"010.1.1.1:80", M),
    (b"1.2.3.04:80", M),
    (b"09.1.1.1:80", M),
    (b"00.0.0.0:80", M),
    (b"1.2.3.4.:80", M),
    (b"1.2.3.256:80", M),
    (b"1.2.3.4.5:80", M),
    (b"1..2.3:80", M),
    (b".1.2.3:80", M),
    ("\u0661.2.3.4:80".encode(), M),  # Arabic-Indic digit one
    # IPv6 and brackets
    (b"::1:80", M),
    (b"fe80::1:80", M),
    (b"2001:db8::1", M),
    (b"[fe80::1%eth0]:80", M),
    (b"[fe80::1%25eth0]:80", M),
    (b"[::1", M),
    (b"[::1]", M),
    (b"[::1]:", M),
    (b"[::1]80", M),
    (b"[]:80", M),
    (b"[1.2.3.4]:80", M),
    (b"[zzz]:80", M),
    (b"[[::1]]:80", M),
    (b"::1]:80", M),
    # ports
    (b"1.2.3.4:0", M),
    (b"1.2.3.4:00", M),
    (b"1.2.3.4:65536", M),
    (b"1.2.3.4:-1", M),
    (b"1.2.3.4:+1", M),
    (b"1.2.3.4: 80", M),
    (b"1.2.3.4:1e3", M),
    (b"1.2.3.4:080", M),
    (b"1.2.3.4:0x50", M),
    (b"1.2.3.4:" + b"9" * 40, M),
    ("1.2.3.4:\u0668\u0660".encode(), M),
    (b"1.2.3.4", M),
    (b"1.2.3.4:", M),
    (b":80", M),
    (b"1.2.3.4:80:90", M),
    # hostnames
    (b"a_b:80", M),
    (b"-a.example:80", M),
    (b"a-.example:80", M),
    (b"a..example:80", M),
    (b"a" * 64 + b".example:80", M),
    ((b"abcdefgh." * 30)[:-1] + b":80", M),
    (b"1-2:80", M),
    ("\u00e9t\u00e9.example:80".encode(), M),
    # keys
    (b"1.2.3.4:80 foo=1", M),
    (b"1.2.3.4:80 cookie=abc", M),
    (b"1.2.3.4:80 student=a student=b", M),
    (b"1.2.3.4:80 verify=yes verify=yes", M),
    (b"1.2.3.4:80 bogus", M),
    (b"1.2.3.4:80 =x", M),
    (b"1.2.3.4:80 student=", M),
    (b"1.2.3.4:80 Student=bob", M),
    (b"1.2.3.4:80 student=" + b"s" * 65, M),
    (b"1.2.3.4:80 student=a/b", M),
    (b"1.2.3.4:80 token=" + b"t" * 129, M),
    (b"1.2.3.4:80 verify=maybe", M),
    (b"1.2.3.4:80 verify=YES", M),
    (b"student=bob 1.2.3.4:80", M),
    (b"GET / HTTP/1.1\r\nHost: registry\r\n\r\n", M),
    # size
    (b"1.2.3.4:80" + b" " * 503 + b"\n", Code.TOO_LONG),
    (b"1.2.3.4:80" + b" " * 502 + b"\r\n", Code.TOO_LONG),
    (b"x" * 513, Code.TOO_LONG),
    (b"1" * 600 + b"\n1.2.3.4:80\n", Code.TOO_LONG),
    (b"\xff" * 10_000, Code.TOO_LONG),
]


@pytest.mark.parametrize(("data", "code"), INVALID)
def test_invalid(data: bytes, code: Code) -> None:
    tr(data, code)


def test_cookie_only_when_allowed() -> None:
    data = b"1.2.3.4:80 cookie=AbC-123_x\n"
    tr(data, Request(V4("1.2.3.4"), 80, cookie="AbC-123_x"), allow_cookie=True)
    tr(data, M)


def test_smaller_limit() -> None:
    tr(b"1.2.3.4:80\n", Request(V4("1.2.3.4"), 80), max_bytes=10)
    tr(b"1.2.3.4:800\n", Code.TOO_LONG, max_bytes=10)


# ---------------------------------------------------------------- explanations

EXPLAINED: list[tuple[str, list[str]]] = [
    ("127.1:80", ["'127.1'", "short", "127.0.0.1", "four parts", "192.168.1.105:15000"]),
    ("10.1.1:80", ["'10.1.1'", "10.1.0.1"]),
    ("0177.0.0.1:80", ["'0177'", "octal", "127.0.0.1"]),
    ("010.1.1.1:80", ["leading zero", "8.1.1.1"]),
    ("0x7f.0.0.1:80", ["hexadecimal", "127.0.0.1"]),
    ("2130706433:80", ["integer", "127.0.0.1"]),
    ("1.2.3.4.:80", ["'1.2.3.4.'", "dot"]),
    ("1.2.3.256:80", ["255"]),
    ("[fe80::1%eth0]:80", ["zone", "'%eth0'"]),
    ("fe80::1:80", ["brackets", "[2001:db8::1]:15000"]),
    ("[1.2.3.4]:80", ["IPv6 only"]),
    ("1.2.3.4", ["'1.2.3.4'", "no port", "HOST:PORT"]),
    ("1.2.3.4:0", ["port 0"]),
    ("1.2.3.4:65536", ["'65536'", "1 to 65535"]),
    ("1.2.3.4:80 foo=1", ["unknown key 'foo'", "student"]),
    ("1.2.3.4:80 cookie=1", ["only for UDP"]),
    ("1.2.3.4:80 verify=no verify=no", ["'verify'", "twice"]),
    ("1.2.3.4:80 x", ["'x'", "key=value"]),
    ("1.2.3.4:80\x00", ["'\\x00'", "offset 10"]),
    ("GET / HTTP/1.1", ["HTTP"]),
    ("a_b:80", ["'a_b'", "hostname"]),
]


@pytest.mark.parametrize(("line", "needles"), EXPLAINED)
def test_explanations_say_why(line: str, needles: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_line(line)
    for needle in needles:
        assert needle in info.value.explanation


def test_non_utf8_explanation_names_byte() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_line(b"1.2.3.4:80 \xfe")
    assert "0xfe" in info.value.explanation and "offset 11" in info.value.explanation


@pytest.mark.parametrize(
    "line",
    [
        "q" * 300 + ":80",
        "q" * 300,
        "1.2.3.4:80 " + "q" * 300,
        "1.2.3.4:80 " + "q" * 300 + "=1",
        "1.2.3.4:80 student=" + "q" * 300,
        "1.2.3.4:80 verify=" + "q" * 300,
        "1.2.3.4:" + "q" * 300,
        "[" + "q" * 300 + "]:80",
        "1.2.3." + "1" * 300 + ":80",
    ],
)
def test_explanations_quote_little(line: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_line(line)
    assert "q" * 61 not in info.value.explanation
    assert "1" * 61 not in info.value.explanation


def test_secrets_are_not_echoed() -> None:
    for key in ("token", "cookie"):
        with pytest.raises(ProtocolError) as info:
            parse_line(f"1.2.3.4:80 {key}=hunter2\u00e9", allow_cookie=True)
        assert "hunter2" not in info.value.explanation


def _assert_safe(explanation: str) -> None:
    assert explanation.isascii() and explanation.isprintable()
    assert len(explanation) <= 400


@settings(max_examples=400)
@given(st.text(max_size=300))
def test_any_text_parses_or_explains_safely(line: str) -> None:
    try:
        parse_line(line)
    except ProtocolError as exc:
        assert exc.code == Code.MALFORMED
        _assert_safe(exc.explanation)


@settings(max_examples=300)
@given(
    st.lists(st.sampled_from(["1", "0", "7", "9", "255", "256", "0x", "f", ".", ":", "[", "]"])),
)
def test_numeric_soup_never_crashes(pieces: list[str]) -> None:
    try:
        parse_line("".join(pieces) + ":80")
    except ProtocolError as exc:
        _assert_safe(exc.explanation)


# ---------------------------------------------------------------- framing


@st.composite
def chunked(draw: st.DrawFn, data: st.SearchStrategy[bytes]) -> tuple[bytes, list[bytes]]:
    whole = draw(data)
    cuts = sorted(draw(st.lists(st.integers(0, len(whole)), max_size=12)))
    chunks = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    # An empty chunk would mean EOF; real receive loops never pass one mid-stream.
    return whole, [c for c in chunks if c]


REQUESTISH = st.one_of(
    st.binary(max_size=700),
    st.lists(
        st.sampled_from(
            [b"1.2.3.4", b":", b"80", b" ", b"\t", b"\r", b"\n", b"student=a", b"\x00"]
        ),
        max_size=20,
    ).map(b"".join),
)


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=400)
@given(chunked(REQUESTISH), st.sampled_from([16, 64, 512]))
def test_receiver_any_bytes_any_chunking(case: tuple[bytes, list[bytes]], limit: int) -> None:
    whole, chunks = case
    receiver = TextReceiver(limit)
    for chunk in chunks:
        receiver.receive_data(chunk)
        assert receiver.buffered <= limit
        got = receiver.next_event()
        if isinstance(got, ProtocolError):
            _assert_safe(got.explanation)
        else:
            assert got is None or isinstance(got, Request)
    receiver.receive_data(b"")
    final = _result(receiver)
    assert final is not None
    assert final == _whole(whole, max_bytes=limit)


@given(chunked(st.binary(min_size=1, max_size=100).filter(lambda b: b"\n" not in b)))
def test_quiet_matches_eof(case: tuple[bytes, list[bytes]]) -> None:
    whole, chunks = case
    receiver = TextReceiver()
    for chunk in chunks:
        receiver.receive_data(chunk)
    got = _code(receiver.quiet())
    if whole.strip(b" \t\r"):
        assert got == _whole(whole)
    else:
        assert got is None


def test_quiet_with_nothing_keeps_waiting() -> None:
    receiver = TextReceiver()
    assert receiver.quiet() is None
    assert receiver.buffered == 0
    receiver.receive_data(b"  ")
    assert receiver.quiet() is None
    assert receiver.buffered == 2
    receiver.receive_data(b"1.2.3.4:80")
    assert receiver.next_event() is None
    assert receiver.quiet() == Request(V4("1.2.3.4"), 80)
    # Complete: later bytes and EOF change nothing, and the answer is stable.
    receiver.receive_data(b"5 student=late\n")
    receiver.receive_data(b"")
    assert receiver.next_event() == Request(V4("1.2.3.4"), 80)


def test_error_is_stable_and_bounded() -> None:
    receiver = TextReceiver(8)
    receiver.receive_data(b"123456789")
    for _ in range(2):
        assert _result(receiver) == Code.TOO_LONG
    receiver.receive_data(b"x" * 10_000)
    assert receiver.buffered <= 8


def test_bad_limit() -> None:
    with pytest.raises(ValueError):
        TextReceiver(0)


# ---------------------------------------------------------------- round trips

PORTS = st.integers(1, 65535)
STUDENTS = st.none() | st.text(
    string.ascii_letters + string.digits + "._@-", min_size=1, max_size=64
)
TOKENS = st.none() | st.text(string.printable.strip(), min_size=1, max_size=128)


def _line(req: Request) -> str:
    parts = [req.advertised]
    if req.student is not None:
        parts.append(f"student={req.student}")
    if req.token is not None:
        parts.append(f"token={req.token}")
    if req.verify is not None:
        parts.append(f"verify={'yes' if req.verify else 'no'}")
    return " ".join(parts)


@pytest.mark.slow  # a long property run; its corpus and tables stay fast
@settings(max_examples=300)
@given(
    st.ip_addresses() | domains(max_length=253).map(str.lower),
    PORTS,
    STUDENTS,
    TOKENS,
    st.none() | st.booleans(),
)
def test_round_trip(
    host: object, port: int, student: str | None, token: str | None, verify: bool | None
) -> None:
    req = Request(host, port, student=student, token=token, verify=verify)  # type: ignore[arg-type]
    assert parse_line(_line(req)) == req
    tr(_line(req).encode() + b"\n", req, max_bytes=1024)


# ---------------------------------------------------------------- purity

PURE = ["text.py", "reply.py", "callback.py", "reader.py"]
ALLOWED_ROOTS = {"__future__", "dataclasses", "enum", "ipaddress", "re", "typing"}
# registry.policy.addresses is pure too: the parser builds the one Address value.
ALLOWED_REGISTRY = {
    "registry.model",
    "registry.errors",
    "registry.config",
    "registry.policy.addresses",
}


@pytest.mark.parametrize("name", PURE)
def test_protocol_modules_are_pure(name: str) -> None:
    path = Path(__file__).parent.parent / "registry" / "protocol" / name
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        else:
            continue
        for module in modules:
            ok = (
                module.split(".")[0] in ALLOWED_ROOTS
                or module in ALLOWED_REGISTRY
                or module.startswith("registry.protocol.")
            )
            assert ok, f"{name} imports {module}"
