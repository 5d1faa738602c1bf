"""The ``student`` commands: argparse, advice, exit statuses, and loopback conversations.

Rules of this module: traffic goes only to 127.0.0.1 (and ::1 when the machine
has it), every listening socket uses an ephemeral port, every I/O test runs
under ``trio.fail_after``. The fake registries here speak the SPEC from the
test's own text, not from ``registry/``.
"""

from __future__ import annotations

import functools
import json
import re
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
import trio

from student.advice import (
    ADVICE,
    CLIENT_CODES,
    DIAGNOSIS_ADVICE,
    GENERIC_ADVICE,
    AdviceContext,
    advice_for,
    format_advice,
)
from student.cli import build_parser, run
from student.client import ClientOptions, Registration, run_client
from student.lab import run_lab
from student.server import ServerOptions, run_server
from student.wire import DIAGNOSES, STATUS_CODES, Reply

LIMIT = 5  # seconds: no loopback test needs more


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --- argparse: usage errors exit 64 ------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["client"],
        ["client", "--registry", "127.0.0.1"],
        ["client", "--registry", "::1:9000"],
        ["client", "--registry", "127.0.0.1:9000", "--port", "0"],
        ["client", "--registry", "127.0.0.1:9000", "--json", "--udp"],
        ["client", "--registry", "127.0.0.1:9000", "--student", "two words"],
        ["client", "--registry", "127.0.0.1:9000", "--timeout", "-1"],
        ["client", "--registry", "127.0.0.1:9000", "--verify", "maybe"],
        ["server", "--port", "70000"],
        ["server", "--count", "0"],
        ["server", "--bind", "example.com"],
        ["server", "--unknown"],
        ["lab"],
        ["addresses", "--registry", "nope"],
    ],
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run(argv)
    assert exc.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_a_name_with_spaces_needs_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run(["client", "--registry", "127.0.0.1:9", "--student", "Ana Lima"])
    assert exc.value.code == 64
    assert "needs --json" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run(["client", "--help"])
    assert exc.value.code == 0
    assert "--registry HOST:PORT" in capsys.readouterr().out


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["client", "--registry", "[::1]:9000"])
    assert (args.registry, args.port, args.advertise, args.timeout) == (
        ("::1", 9000),
        15000,
        "auto",
        15.0,
    )
    args = build_parser().parse_args(["server"])
    assert (args.port, args.bind, args.count, args.timeout, args.udp) == (
        15000,
        None,
        1,
        None,
        False,
    )
    args = build_parser().parse_args(["server", "--bind", "[::1]", "--port", "0"])
    assert (args.bind, args.port) == ("::1", 0)


def test_console_entry_point_exit_status() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "student", "client"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 64
    assert "--registry" in done.stderr


# --- advice and exit statuses --------------------------------------------------------

CTX = AdviceContext(host="192.168.1.105", port=15000, registry="10.0.0.1:9000")
FAILURE_CODES = [c for status, codes in STATUS_CODES.items() if status != "OK" for c in codes]


@pytest.mark.parametrize("code", FAILURE_CODES + list(CLIENT_CODES))
def test_every_failure_code_has_its_own_advice(code: str) -> None:
    assert code in ADVICE
    lines = advice_for(code, None, CTX)
    assert lines and lines != advice_for("no_such_code", None, CTX)
    assert not any(re.search(r"\{[a-z_]+\}|None", line) for line in lines)


@pytest.mark.parametrize("diagnosis", [d for d in DIAGNOSES if d != "direct"])
def test_every_nat_diagnosis_has_its_own_advice(diagnosis: str) -> None:
    ctx = AdviceContext("192.168.1.105", 15000, "10.0.0.1:9000", observed="203.0.113.7")
    lines = advice_for("source_mismatch", diagnosis, ctx)
    assert lines == [
        t.format_map(ctx.values("source_mismatch")) for t in DIAGNOSIS_ADVICE[diagnosis]
    ]
    assert lines != advice_for("source_mismatch", None, ctx)


def test_advice_texts_name_the_students_values() -> None:
    assert advice_for("connection_refused", None, CTX)[0] == (
        "nothing was listening on 15000 at 192.168.1.105 — is `student server` running with the same --port?"
    )
    busy = AdviceContext("10.0.0.5", 15000, "r:9", retry_after="30")
    assert "wait 30 seconds" in advice_for("rate_limited", None, busy)[0]
    sent = AdviceContext("10.0.0.5", 15000, "r:9", sent="010.0.0.5:15000")
    assert "'010.0.0.5:15000'" in advice_for("malformed", None, sent)[0]
    nat = AdviceContext("192.168.1.105", 15000, "r:9", observed="203.0.113.7")
    assert (
        "you are behind a NAT router" in advice_for("source_mismatch", "private_behind_nat", nat)[0]
    )
    assert (
        "0.0.0.0 is a bind address"
        in advice_for("source_mismatch", "unspecified_advertised", nat)[0]
    )


def test_unknown_code_gets_generic_advice() -> None:
    assert advice_for("brand_new", None, CTX) == [GENERIC_ADVICE[0].format(code="brand_new")]
    assert advice_for(None, None, CTX)  # no code at all still says something
    assert advice_for("source_mismatch", "brand_new", CTX) == advice_for(
        "source_mismatch", None, CTX
    )


def test_format_advice() -> None:
    assert format_advice([]) == []
    assert format_advice(["a", "b"]) == ["What to check:", "  - a", "  - b"]


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Reply("OK", "connected"), 0),
        (Reply("DENIED", "source_mismatch"), 2),
        (Reply("FAILED", "timeout"), 3),
        (Reply("BUSY", "overloaded"), 4),
        (Reply("ERROR", "malformed"), 5),
        (None, 5),
    ],
)
def test_registration_exit_codes(reply: Reply | None, code: int) -> None:
    assert Registration(registry="r:1", reply=reply).exit_code == code


# --- helpers for loopback conversations -------------------------------------------


async def _read_line(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\n" not in data and len(data) < 4096:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def _read_all(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(4096):
        data += chunk
    return data


async def _fake_registry(
    nursery: trio.Nursery, respond: Callable[[bytes], Awaitable[bytes | None]]
) -> int:
    """A TCP registry on 127.0.0.1 that reads one line and writes ``respond(line)``."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            reply = await respond(await _read_line(stream))
            if reply is not None:
                await stream.send_all(reply)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def _fixed(reply: bytes, seen: list[bytes]) -> Callable[[bytes], Awaitable[bytes | None]]:
    async def respond(line: bytes) -> bytes | None:
        seen.append(line)
        return reply

    return respond


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on exit: connecting is refused


# --- student server ----------------------------------------------------------------


async def _start_server(
    nursery: trio.Nursery, opts: ServerOptions, out: list[str]
) -> tuple[int, dict[str, int]]:
    result: dict[str, int] = {}

    async def task(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        result["code"] = await run_server(opts, out.append, out.append, task_status=task_status)

    port = await nursery.start(task)
    return port, result


async def test_server_prints_lab_lines_and_echoes_the_nonce() -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port, result = await _start_server(
                nursery, ServerOptions(port=0, bind="127.0.0.1"), out
            )
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                ours = stream.socket.getsockname()[1]
                await stream.send_all(b"CALLBACK id=r1 nonce=abc123 Hello from the registry\r\n")
                echo = await _read_all(stream)
    assert echo == b"ECHO nonce=abc123\n"
    assert out == [
        f"Student server listening on port {port}...",
        f"Connection accepted from instructor's server at 127.0.0.1:{ours}",
        "CALLBACK id=r1 nonce=abc123 Hello from the registry",
    ]
    assert result == {"code": 0}


async def test_server_counts_connections_and_does_not_echo_plain_messages() -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            opts = ServerOptions(port=0, bind="127.0.0.1", count=2)
            port, result = await _start_server(nursery, opts, out)
            for message in (b"Hello from the instructor's server", b""):
                async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
                    await stream.send_all(message)
                    await stream.send_eof()
                    assert await _read_all(stream) == b""  # nothing to echo
    assert out[2] == "Hello from the instructor's server"
    assert out[4] == "(the connection closed without a message)"
    assert len(out) == 5 and result == {"code": 0}


async def test_server_default_bind_listens_on_both_families() -> None:
    out: list[str] = []
    hosts = ["127.0.0.1", "::1"] if _has_ipv6_loopback() else ["127.0.0.1"]
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            opts = ServerOptions(port=0, count=len(hosts))
            port, result = await _start_server(nursery, opts, out)
            for host in hosts:
                async with await trio.open_tcp_stream(host, port) as stream:
                    await stream.send_all(b"CALLBACK id=x nonce=n1 hi\n")
                    assert await _read_all(stream) == b"ECHO nonce=n1\n"
    accepted = [line for line in out if line.startswith("Connection accepted")]
    assert accepted[0].startswith("Connection accepted from instructor's server at 127.0.0.1:")
    if len(hosts) == 2:
        assert accepted[1].startswith("Connection accepted from instructor's server at [::1]:")
    assert result == {"code": 0}


async def test_server_port_in_use_exits_1() -> None:
    out: list[str] = []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = await run_server(ServerOptions(port=port, bind="127.0.0.1"), out.append)
    assert code == 1
    assert out == [
        f"student server: port {port} is already in use — is another student server running? "
        "pick another --port"
    ]


async def test_server_timeout_exits_1(autojump_clock: trio.abc.Clock) -> None:
    out: list[str] = []
    start = trio.current_time()
    code = await run_server(ServerOptions(port=0, bind="127.0.0.1", timeout=30), out.append)
    assert code == 1
    assert trio.current_time() - start == pytest.approx(30)
    assert out[1].startswith("student server: timed out after 30 s: 0 of 1 callback(s) arrived")


async def test_udp_server_echoes_a_datagram() -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            opts = ServerOptions(port=0, bind="127.0.0.1", udp=True)
            port, result = await _start_server(nursery, opts, out)
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                await sock.connect(("127.0.0.1", port))
                await sock.send(b"CALLBACK id=u1 nonce=zz9 hello over UDP")
                assert await sock.recv(100) == b"ECHO nonce=zz9\n"
                ours = sock.getsockname()[1]
    assert out == [
        f"Student server listening on UDP port {port}...",
        f"Datagram received from instructor's server at 127.0.0.1:{ours}",
        "CALLBACK id=u1 nonce=zz9 hello over UDP",
    ]
    assert result == {"code": 0}


# --- student client against a fake registry ------------------------------------------

CLIENT_CASES = [
    (b"OK connected id=r1 target=127.0.0.1:15000 rtt_ms=0.4 verified=yes Connected.\n", 0, 2),
    (b"DENIED port_not_allowed Port 15000 is outside 20000-30000.\n", 2, 4),
    (b"FAILED connection_refused id=r2 target=127.0.0.1:15000 Nothing listens there.\r\n", 3, 5),
    (b"BUSY rate_limited retry_after=30 Too many requests.\n", 4, 4),
    (b"ERROR malformed expected HOST:PORT\n", 5, 5),
]


@pytest.mark.parametrize(("reply", "code", "nlines"), CLIENT_CASES)
async def test_client_prints_the_reply_and_exits_by_status(
    reply: bytes, code: int, nlines: int
) -> None:
    out: list[str] = []
    seen: list[bytes] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _fake_registry(nursery, _fixed(reply, seen))
            opts = ClientOptions(registry=("127.0.0.1", port), student="alice")
            assert await run_client(opts, out.append) == code
            nursery.cancel_scope.cancel()
    assert seen == [b"127.0.0.1:15000 student=alice\n"]
    assert out[:2] == ["Sent to Registry Server: 127.0.0.1:15000", reply.decode().strip()]
    assert len(out) == nlines
    if code:
        assert out[2] == "What to check:"


async def test_client_advice_uses_reply_fields() -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            reply = b"BUSY rate_limited retry_after=30 Too many requests.\n"
            port = await _fake_registry(nursery, _fixed(reply, []))
            assert await run_client(ClientOptions(registry=("127.0.0.1", port)), out.append) == 4
            nursery.cancel_scope.cancel()
    assert out[3] == "  - you sent too many registrations: wait 30 seconds, then try again once"


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "Error: the reply is not in the registry's format"),
        (b"", "Error: the registry at 127.0.0.1:"),
    ],
)
async def test_client_bad_or_no_reply_exits_5(reply: bytes, problem: str) -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _fake_registry(nursery, _fixed(reply, []))
            assert await run_client(ClientOptions(registry=("127.0.0.1", port)), out.append) == 5
            nursery.cancel_scope.cancel()
    assert out[0] == "Sent to Registry Server: 127.0.0.1:15000"
    assert out[1].startswith(problem)
    assert out[2] == "What to check:"


async def test_client_registry_refused_exits_5() -> None:
    out: list[str] = []
    port = _closed_port()
    with trio.fail_after(LIMIT):
        code = await run_client(ClientOptions(registry=("127.0.0.1", port)), out.append)
    assert code == 5
    assert (
        out[0]
        == f"Error: could not connect to the registry at 127.0.0.1:{port}: connection refused"
    )
    assert out[1] == "What to check:"
    assert not any(line.startswith("Sent to") for line in out)


async def test_client_registry_silent_times_out(autojump_clock: trio.abc.Clock) -> None:
    out: list[str] = []

    async def never(line: bytes) -> bytes | None:
        await trio.sleep_forever()
        return None  # pragma: no cover

    async with trio.open_nursery() as nursery:
        port = await _fake_registry(nursery, never)
        opts = ClientOptions(registry=("127.0.0.1", port), timeout=7)
        assert await run_client(opts, out.append) == 5
        nursery.cancel_scope.cancel()
    assert out[1] == f"Error: no reply from the registry at 127.0.0.1:{port} within 7 s"


async def test_client_advertise_is_sent_exactly() -> None:
    out: list[str] = []
    seen: list[bytes] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _fake_registry(
                nursery,
                _fixed(
                    b"DENIED source_mismatch diagnosis=different_host observed=127.0.0.1 No.\n",
                    seen,
                ),
            )
            opts = ClientOptions(
                registry=("127.0.0.1", port), port=12345, advertise="2001:db8::5", verify=True
            )
            assert await run_client(opts, out.append) == 2
            nursery.cancel_scope.cancel()
    assert seen == [b"[2001:db8::5]:12345 verify=yes\n"]
    assert out[0] == "Sent to Registry Server: [2001:db8::5]:12345"
    assert "is not the machine your request came from (127.0.0.1)" in out[3]


async def test_client_json_mode() -> None:
    out: list[str] = []
    seen: list[bytes] = []
    reply = {
        "status": "OK",
        "code": "connected",
        "id": "j1",
        "target": "127.0.0.1:15001",
        "observed": "127.0.0.1",
        "diagnosis": "direct",
        "rtt_ms": 1.25,
        "verified": False,
        "retry_after": None,
        "explanation": "Connected; no echo.",
    }
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            port = await _fake_registry(nursery, _fixed(json.dumps(reply).encode() + b"\n", seen))
            opts = ClientOptions(
                registry=("127.0.0.1", port), port=15001, token="s3cret", json=True
            )
            assert await run_client(opts, out.append) == 0
            nursery.cancel_scope.cancel()
    assert json.loads(seen[0]) == {"host": "127.0.0.1", "port": 15001, "token": "s3cret"}
    assert seen[0].endswith(b"}\n")
    assert out == [
        "Sent to Registry Server: 127.0.0.1:15001",
        "OK connected id=j1 target=127.0.0.1:15001 observed=127.0.0.1 diagnosis=direct "
        "rtt_ms=1.25 verified=no Connected; no echo.",
    ]


# --- UDP registration with the cookie challenge -----------------------------------


async def _fake_udp_registry(
    nursery: trio.Nursery, *, drop_first: bool, call_back: bool, log: list[str]
) -> int:
    """A UDP registry on 127.0.0.1: COOKIE challenge, then (optionally) a UDP callback."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))

    async def loop() -> None:
        with sock:
            dropped = not drop_first
            while True:
                data, addr = await sock.recvfrom(2048)
                text = data.decode()
                log.append(text)
                if not dropped:
                    dropped = True
                    continue
                if "cookie=k1" not in text:
                    await sock.sendto(b"COOKIE cookie=k1 send it again with this cookie", addr)
                    continue
                verified = "no"
                if call_back:
                    host, _, port = text.split()[0].rpartition(":")
                    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as cb:
                        await cb.connect((host, int(port)))
                        await cb.send(b"CALLBACK id=u7 nonce=n7 hello")
                        verified = "yes" if b"nonce=n7" in await cb.recv(100) else "no"
                reply = f"OK connected id=u7 verified={verified} Connected over UDP."
                await sock.sendto(reply.encode(), addr)

    nursery.start_soon(loop)
    return int(sock.getsockname()[1])


async def test_client_udp_cookie_and_retry(autojump_clock: trio.abc.Clock) -> None:
    out: list[str] = []
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        port = await _fake_udp_registry(nursery, drop_first=True, call_back=False, log=log)
        opts = ClientOptions(registry=("127.0.0.1", port), port=15002, student="bo", udp=True)
        start = trio.current_time()
        assert await run_client(opts, out.append) == 0
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.1)  # one backoff
        nursery.cancel_scope.cancel()
    assert log == [
        "127.0.0.1:15002 student=bo",  # lost
        "127.0.0.1:15002 student=bo",
        "127.0.0.1:15002 student=bo cookie=k1",
    ]
    assert out == [
        "Sent to Registry Server: 127.0.0.1:15002",
        "OK connected id=u7 verified=no Connected over UDP.",
    ]


# --- student lab --------------------------------------------------------------------


async def _calling_registry(line: bytes) -> bytes:
    """Reads HOST:PORT, calls it back, checks the echo: the SPEC's callback in miniature."""
    target = line.decode().split()[0]
    host, _, port = target.rpartition(":")
    try:
        async with await trio.open_tcp_stream(host.strip("[]"), int(port)) as cb:
            await cb.send_all(b"CALLBACK id=L1 nonce=lab42 Hello from the registry\n")
            echo = await _read_all(cb)
    except OSError:
        return f"FAILED connection_refused target={target} Nothing listens there.\n".encode()
    verified = "yes" if b"nonce=lab42" in echo else "no"
    return f"OK connected id=L1 target={target} verified={verified} Connected.\n".encode()


async def test_lab_prints_the_timeline_and_verdict() -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            reg_port = await _fake_registry(nursery, _calling_registry)
            opts = ClientOptions(registry=("127.0.0.1", reg_port), port=0, student="alice")
            assert await run_lab(opts, out.append) == 0
            nursery.cancel_scope.cancel()
    events = [line.split(None, 2)[1:] for line in out[:-1]]
    assert [role for role, _ in events] == [
        "server",
        "client",
        "client",
        "server",
        "server",
        "client",
    ]
    assert events[0][1].startswith("listening on ")
    assert events[1][1].startswith(f"connected to registry 127.0.0.1:{reg_port} from 127.0.0.1:")
    assert events[2][1].startswith('sent "127.0.0.1:') and events[2][1].endswith(' student=alice"')
    assert events[3][1].endswith("(the registry dialled us)")
    assert events[4][1] == "received CALLBACK id=L1 nonce=lab42; echoed nonce"
    assert events[5][1].startswith("reply: OK connected id=L1 target=127.0.0.1:")
    assert all(line.startswith("+") and "ms  " in line for line in out[:-1])
    assert out[-1].startswith(
        "verdict: OK connected — the registry called this server back at 127.0.0.1:"
    )
    assert out[-1].endswith("and it echoed the nonce")


async def test_lab_says_when_no_callback_arrived() -> None:
    out: list[str] = []
    reply = b"DENIED port_not_allowed Ports 20000-30000 only.\n"
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            reg_port = await _fake_registry(nursery, _fixed(reply, []))
            opts = ClientOptions(registry=("127.0.0.1", reg_port), port=0)
            assert await run_lab(opts, out.append) == 2
            nursery.cancel_scope.cancel()
    assert out[3].endswith("client  reply: DENIED port_not_allowed Ports 20000-30000 only.")
    assert out[4] == "verdict: DENIED port_not_allowed — no callback arrived at this server"
    assert out[5] == "What to check:"


async def test_lab_over_udp() -> None:
    out: list[str] = []
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            reg_port = await _fake_udp_registry(nursery, drop_first=False, call_back=True, log=[])
            opts = ClientOptions(registry=("127.0.0.1", reg_port), port=0, udp=True)
            assert await run_lab(opts, out.append) == 0
            nursery.cancel_scope.cancel()
    assert any("server  received a callback datagram from 127.0.0.1:" in line for line in out)
    assert any(line.endswith("received CALLBACK id=u7 nonce=n7; echoed nonce") for line in out)
    assert any(
        line.endswith("reply: OK connected id=u7 verified=yes Connected over UDP.") for line in out
    )
