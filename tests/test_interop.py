"""Interop: programs the registry did not write, against the real ``registry serve``.

- The lab's own C++ programs (examples/lab-cpp), written from the lab text and
  compiled with g++ once per session: a server that prints and closes, a
  client that sends ``IP:PORT`` without a newline and closes at once, and one
  that waits with a single ``recv()``.
- ``nc`` and ``socat`` as the client (``printf '127.0.0.1:PORT' | nc -q1 ...``)
  and as the student server (listening and printing what the registry sent).
- Mixed pairs: a C++ client with ``student server``, ``student client`` with
  the C++ server.

Loopback only, ephemeral ports; every child process is bounded in time.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.support import ROOT, RegistryProcess, exe, free_port, require_tool, run_registry
from tests.test_e2e import GREETING, ID, NONCE, RUN_TIMEOUT, SRC, Spawned, ok_line, student

pytestmark = pytest.mark.slow  # compiles the C++ lab; runs nc and socat

LAB_CPP = ROOT / "examples" / "lab-cpp"
PROGRAMS = ("student_server", "student_client", "student_client_wait")
CONFIG = """
[callback]
# nc and socat never echo the nonce: do not wait the default 2 s for it.
verify_timeout = "1s"

[ratelimit]
per_source = "1000/minute"
per_target = "1000/minute"
per_target_port = "1000/minute"
"""


@pytest.fixture(scope="session")
def cpp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The lab's C++ programs, compiled as the lab says (plus warnings as errors)."""
    gxx = require_tool("g++")
    out = tmp_path_factory.mktemp("lab-cpp")
    built = {}
    for name in PROGRAMS:
        done = subprocess.run(
            [gxx, "-o", str(out / name), str(LAB_CPP / f"{name}.cpp"), "-std=c++11"]
            + ["-Wall", "-Wextra", "-Werror"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        built[name] = str(out / name)
    return built


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with run_registry(tmp_path_factory.mktemp("interop"), config=CONFIG) as reg:
        yield reg
        assert reg.proc.poll() is None, f"the registry died: {reg.raw[-10:]}"


def run(cmd: list[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def registration(reg: RegistryProcess, reg_id: str | None = None, *, advertised: str) -> dict:
    """The one ``registration`` log event for this advertised endpoint (and id)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [
            e
            for e in reg.events("registration")
            if e.get("advertised") == advertised and reg_id in (None, e.get("id"))
        ]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no registration for {advertised}: {reg.raw[-5:]}")


def start_cpp_server(cpp: dict[str, str]) -> tuple[Spawned, int]:
    """The lab's C++ server on a kernel-chosen port (it prints the port it bound)."""
    server = Spawned([cpp["student_server"], "0"])
    port = int(server.wait_line(r"Student server listening on port (\d+)\.\.\.").group(1))
    return server, port


def start_student_server(port: int) -> Spawned:
    server = Spawned(
        [exe("student"), "server", "--port", str(port), "--bind", "127.0.0.1", "--timeout", "15"]
    )
    server.wait_line(rf"Student server listening on port {port}\.\.\.")
    return server


def cpp_server_lines(port: int) -> list[str]:
    return [
        rf"Student server listening on port {port}\.\.\.",
        rf"Connection accepted from instructor's server at {SRC}",
        rf"CALLBACK id=({ID}) nonce={NONCE} {re.escape(GREETING)}",
    ]


def assert_lines(got: list[str], patterns: list[str]) -> list[re.Match]:
    assert len(got) == len(patterns), f"expected {len(patterns)} lines, got {got}"
    matches = [re.fullmatch(p, line) for line, p in zip(got, patterns, strict=True)]
    assert all(matches), f"{got} does not match {patterns}"
    return matches  # type: ignore[return-value]


# ---------------------------------------------------------------- the lab in C++


def test_cpp_lab_completes_with_the_client_that_closes_at_once(
    registry: RegistryProcess, cpp: dict[str, str]
) -> None:
    server, port = start_cpp_server(cpp)
    with server:
        client = run(
            [cpp["student_client"], "127.0.0.1", str(registry.port), "127.0.0.1", str(port)]
        )
        assert server.finish() == 0, server.err
    assert client.returncode == 0, client.stderr
    assert client.stdout == f"Sent to Registry Server: 127.0.0.1:{port}\n"
    (_, _, callback) = assert_lines(server.out, cpp_server_lines(port))
    # The client was gone before the reply; the callback still happened and was recorded.
    event = registration(registry, callback.group(1), advertised=f"127.0.0.1:{port}")
    assert (event["status"], event["code"], event["verified"]) == ("OK", "connected", False)
    results = run([exe("registry"), "results", "--db", str(registry.db), "--format", "csv"])
    assert results.returncode == 0, results.stderr
    row = [line for line in results.stdout.splitlines() if line.startswith(callback.group(1))]
    assert len(row) == 1
    fields = row[0].split(",")
    assert fields[2] == "text" and fields[5] == f"127.0.0.1:{port}"
    assert fields[6:9] == ["OK", "connected", "direct"] and fields[10] == "no"


def test_cpp_lab_completes_with_the_client_that_waits_for_the_reply(
    registry: RegistryProcess, cpp: dict[str, str]
) -> None:
    server, port = start_cpp_server(cpp)
    with server:
        started = time.monotonic()
        client = run(
            [cpp["student_client_wait"], "127.0.0.1", str(registry.port), "127.0.0.1", str(port)]
        )
        elapsed = time.monotonic() - started
        assert server.finish() == 0, server.err
    assert client.returncode == 0, client.stderr
    sent, reply = assert_lines(
        client.stdout.splitlines(),
        [
            rf"Sent to Registry Server: 127\.0\.0\.1:{port}",
            "Reply from Registry Server: " + ok_line(port, verified=False),
        ],
    )
    (_, _, callback) = assert_lines(server.out, cpp_server_lines(port))
    assert callback.group(1) == reply.group(1)
    # No newline and no close: the registry's quiet period (250 ms) ended the request
    # (an OK, not the read deadline's ERROR read_timeout; timed in virtual time by
    # test_tcp_edge.py::test_framing).
    assert elapsed > 0.2, elapsed


def test_cpp_client_with_student_server_is_verified(
    registry: RegistryProcess, cpp: dict[str, str]
) -> None:
    port = free_port()
    with start_student_server(port) as server:
        client = run(
            [cpp["student_client_wait"], "127.0.0.1", str(registry.port), "127.0.0.1", str(port)]
        )
        assert server.finish() == 0, server.err
    assert client.returncode == 0, client.stderr
    assert_lines(
        client.stdout.splitlines(),
        [
            rf"Sent to Registry Server: 127\.0\.0\.1:{port}",
            "Reply from Registry Server: " + ok_line(port, verified=True),
        ],
    )


def test_cpp_client_that_closes_with_student_server(
    registry: RegistryProcess, cpp: dict[str, str]
) -> None:
    port = free_port()
    with start_student_server(port) as server:
        client = run(
            [cpp["student_client"], "127.0.0.1", str(registry.port), "127.0.0.1", str(port)]
        )
        assert server.finish() == 0, server.err
    assert client.stdout == f"Sent to Registry Server: 127.0.0.1:{port}\n"
    (_, _, callback) = assert_lines(
        server.out,
        [
            rf"Student server listening on port {port}\.\.\.",
            rf"Connection accepted from instructor's server at {SRC}",
            rf"CALLBACK id=({ID}) nonce={NONCE} {re.escape(GREETING)}",
        ],
    )
    event = registration(registry, callback.group(1), advertised=f"127.0.0.1:{port}")
    assert (event["status"], event["code"], event["verified"]) == ("OK", "connected", True)


def test_student_client_with_the_cpp_server(registry: RegistryProcess, cpp: dict[str, str]) -> None:
    server, port = start_cpp_server(cpp)
    with server:
        done = student("client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port))
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stdout
    assert_lines(
        done.stdout.splitlines(),
        [rf"Sent to Registry Server: 127\.0\.0\.1:{port}", ok_line(port, verified=False)],
    )
    assert_lines(server.out, cpp_server_lines(port))


def test_cpp_programs_reject_bad_arguments(cpp: dict[str, str]) -> None:
    assert run([cpp["student_server"], "70000"]).returncode == 64
    assert run([cpp["student_client"], "127.0.0.1"]).returncode == 64
    assert run([cpp["student_client_wait"], "127.0.0.1", "0"]).returncode == 64
    bad = run([cpp["student_client"], "127.1", "9000", "127.0.0.1", "15000"])
    assert bad.returncode == 1 and "inet_pton" in bad.stderr


# ----------------------------------------------------------- nc and socat: clients


@pytest.mark.parametrize(
    ("argv", "request_text"),
    [
        # the lab's bytes: no newline; -q1 quits 1 s after stdin's EOF, reply read by then
        (["-q1"], "127.0.0.1:{port}"),
        # a line, and a half-close (-N) at stdin's EOF
        (["-N"], "127.0.0.1:{port}\n"),
    ],
)
def test_nc_as_the_client(registry: RegistryProcess, argv: list[str], request_text: str) -> None:
    nc = require_tool("nc")
    port = free_port()
    with start_student_server(port) as server:
        done = run(
            [nc, *argv, "127.0.0.1", str(registry.port)], stdin=request_text.format(port=port)
        )
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stderr
    assert_lines(done.stdout.splitlines(), [ok_line(port, verified=True)])


@pytest.mark.parametrize("request_text", ["127.0.0.1:{port}", "127.0.0.1:{port}\r\n"])
def test_socat_as_the_client(registry: RegistryProcess, request_text: str) -> None:
    socat = require_tool("socat")
    port = free_port()
    with start_student_server(port) as server:
        done = run(
            [socat, "-t5", "-", f"TCP:127.0.0.1:{registry.port}"],
            stdin=request_text.format(port=port),
        )
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stderr
    assert_lines(done.stdout.splitlines(), [ok_line(port, verified=True)])


# ------------------------------------------------------ nc and socat: the server


def test_nc_as_the_student_server(registry: RegistryProcess) -> None:
    nc = require_tool("nc")
    port = free_port()
    with Spawned([nc, "-v", "-n", "-l", "127.0.0.1", str(port)]) as server:
        server.wait_line(rf"Listening on 127\.0\.0\.1 {port}", stderr=True)
        done = student("client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port))
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stdout
    _, reply = assert_lines(
        done.stdout.splitlines(),
        [rf"Sent to Registry Server: 127\.0\.0\.1:{port}", ok_line(port, verified=False)],
    )
    # What the registry sent, exactly as nc printed it.
    (callback,) = assert_lines(
        server.out, [rf"CALLBACK id=({ID}) nonce={NONCE} {re.escape(GREETING)}"]
    )
    assert callback.group(1) == reply.group(1)
    server.wait_line(rf"Connection received on {SRC.replace(':', ' ')}", stderr=True)


def test_socat_as_the_student_server(registry: RegistryProcess) -> None:
    socat = require_tool("socat")
    port = free_port()
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"
    with Spawned([socat, "-d", "-d", "-u", listen, "STDOUT"]) as server:
        server.wait_line(rf".* listening on .*127\.0\.0\.1:{port}", stderr=True)
        done = student("client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port))
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stdout
    assert_lines(
        done.stdout.splitlines(),
        [rf"Sent to Registry Server: 127\.0\.0\.1:{port}", ok_line(port, verified=False)],
    )
    assert_lines(server.out, [rf"CALLBACK id={ID} nonce={NONCE} {re.escape(GREETING)}"])


def test_a_socat_one_liner_can_prove_it_got_the_call(registry: RegistryProcess) -> None:
    """Verification is plain text: echoing the ``nonce=`` token back is enough."""
    socat = require_tool("socat")
    port = free_port()
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"
    echo = 'SYSTEM:read -r word id nonce rest; echo "$word $id $nonce" >&2; echo "$nonce"'
    with Spawned([socat, "-d", "-d", listen, echo]) as server:
        server.wait_line(rf".* listening on .*127\.0\.0\.1:{port}", stderr=True)
        done = student(
            "client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port),
            "--verify", "yes",
        )  # fmt: skip
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stdout
    assert_lines(
        done.stdout.splitlines(),
        [rf"Sent to Registry Server: 127\.0\.0\.1:{port}", ok_line(port, verified=True)],
    )
    server.wait_line(rf"CALLBACK id={ID} nonce={NONCE}", stderr=True)
