"""The lab end to end: the real ``registry serve`` and the real ``student`` executables.

Every process here is a real console script started as a subprocess, talking
over loopback with ephemeral ports. Output lines are matched whole (regular
expressions only where a value is random: ids, nonces, source ports, times),
and each exit status of ``student client`` (0, 2, 3, 4, 5, 64) is provoked
for real, by the registry's own policy and limits.

``Spawned`` (a child whose output lines are collected by threads, with
bounded waits) is shared with test_interop.py.
"""

from __future__ import annotations

import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RegistryProcess, exe, free_port, run_registry

ID = r"[0-9a-f]{12}"
NONCE = r"[0-9a-f]{16}"
RTT = r"\d+\.\d"
SRC = r"127\.0\.0\.1:\d+"  # a kernel-chosen source port on loopback
MS = r"\+\d+\.\dms"
GREETING = "Hello from the instructor's Registry Server!"
RUN_TIMEOUT = 20.0  # seconds: a bound for every child process, never reached when all is well


def _local_port_range() -> tuple[int, int]:
    """The kernel's ephemeral range: every port free_port() or port 0 can return."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


EPHEMERAL = _local_port_range()
# Ports the registry allows: exactly the ephemeral range, so the port just below is refused.
PORTS_CONFIG = f"""
[policy]
ports = ["{EPHEMERAL[0]}-{EPHEMERAL[1]}"]

[ratelimit]
# One source (127.0.0.1) registers many times in this module.
per_source = "1000/minute"
per_target = "1000/minute"
per_target_port = "1000/minute"
"""


class Spawned:
    """A child process; threads collect its stdout and stderr lines as they come."""

    def __init__(self, cmd: list[str], *, cwd: Path | None = None) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            cwd=cwd,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _drain(pipe: object, lines: list[str]) -> None:
        for line in pipe:  # type: ignore[attr-defined]
            lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, *, stderr: bool = False, timeout: float = 10.0) -> re.Match:
        """The first collected line matching ``pattern`` in full; fail after ``timeout``."""
        lines = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(lines):
                m = re.fullmatch(pattern, line)
                if m:
                    return m
            if self.proc.poll() is not None and all(not t.is_alive() for t in self._threads):
                break
            time.sleep(0.01)
        raise AssertionError(f"no line {pattern!r} from {self.cmd}: out={self.out} err={self.err}")

    def finish(self, timeout: float = RUN_TIMEOUT) -> int:
        """Wait for the exit (bounded) and for the last output lines; the exit status."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"{self.cmd} still running after {timeout}s: {self.out}") from None
        for thread in self._threads:
            thread.join(timeout=5)
        return rc

    def stop(self) -> None:
        """Terminate this child (by its own PID) if it is still running."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def __enter__(self) -> Spawned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def student(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``student ARGS`` to completion."""
    return subprocess.run(
        [exe("student"), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def lines(text: str) -> list[str]:
    return text.splitlines()


def assert_lines(got: list[str], patterns: list[str]) -> list[re.Match]:
    """Every line matches its pattern in full, and there are exactly as many."""
    assert len(got) == len(patterns), f"expected {len(patterns)} lines, got {got}"
    matches = []
    for line, pattern in zip(got, patterns, strict=True):
        m = re.fullmatch(pattern, line)
        assert m, f"line {line!r} does not match {pattern!r}"
        matches.append(m)
    return matches


def ok_line(port: int, *, verified: bool) -> str:
    how = "and your server echoed the nonce" if verified else r"\(no nonce echo\)"
    return (
        rf"OK connected id=({ID}) target=127\.0\.0\.1:{port} observed={SRC} diagnosis=direct "
        rf"verified={'yes' if verified else 'no'} rtt_ms={RTT} "
        rf"the registry connected to 127\.0\.0\.1:{port} {how}"
    )


def server_lines(port: int) -> list[str]:
    """The lab's three lines, as ``student server`` prints them for one callback."""
    return [
        rf"Student server listening on port {port}\.\.\.",
        rf"Connection accepted from instructor's server at {SRC}",
        rf"CALLBACK id=({ID}) nonce={NONCE} {re.escape(GREETING)}",
    ]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    with run_registry(tmp_path_factory.mktemp("e2e"), config=PORTS_CONFIG) as reg:
        yield reg
        assert reg.proc.poll() is None, f"the registry died: {reg.raw[-10:]}"


def _registration(reg: RegistryProcess, reg_id: str) -> dict:
    """The registry's one ``registration`` log event for ``reg_id``."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [e for e in reg.events("registration") if e.get("id") == reg_id]
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"no registration event for {reg_id}: {reg.raw[-5:]}")


# ----------------------------------------------------------------------- exit 0


@pytest.mark.slow
def test_server_and_client_complete_the_lab(registry: RegistryProcess) -> None:
    port = free_port()
    with Spawned(
        [exe("student"), "server", "--port", str(port), "--bind", "127.0.0.1", "--timeout", "15"]
    ) as server:
        server.wait_line(rf"Student server listening on port {port}\.\.\.")
        done = student(
            "client",
            "--registry",
            f"127.0.0.1:{registry.port}",
            "--port",
            str(port),
            "--advertise",
            "127.0.0.1",
        )
        assert server.finish() == 0, server.err
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    sent, reply = assert_lines(
        lines(done.stdout),
        [rf"Sent to Registry Server: 127\.0\.0\.1:{port}", ok_line(port, verified=True)],
    )
    got = assert_lines(server.out, server_lines(port))
    reg_id = reply.group(1)
    assert got[2].group(1) == reg_id  # the call the server got is the one the reply reports
    event = _registration(registry, reg_id)
    assert (event["status"], event["code"], event["verified"]) == ("OK", "connected", True)


def test_lab_prints_the_timeline_and_the_verdict(registry: RegistryProcess) -> None:
    done = student("lab", "--registry", f"127.0.0.1:{registry.port}", "--port", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    out = lines(done.stdout)
    head = re.fullmatch(
        rf"{MS}  server  listening on (?:\[::\]:(\d+) and )?0\.0\.0\.0:(\d+)", out[0]
    )
    assert head, out
    port = int(head.group(2))
    assert head.group(1) in (None, str(port))
    assert EPHEMERAL[0] <= port <= EPHEMERAL[1]  # --port 0: the kernel chose, the lab advertised it
    want = {
        "connected": rf"{MS}  client  connected to registry 127\.0\.0\.1:{registry.port} from {SRC}",
        "sent": rf'{MS}  client  sent "127\.0\.0\.1:{port}"',
        "accepted": rf"{MS}  server  accepted callback from {SRC} \(the registry dialled us\)",
        "received": rf"{MS}  server  received CALLBACK id=({ID}) nonce={NONCE}; echoed nonce",
        "reply": rf"{MS}  client  reply: {ok_line(port, verified=True)}",
    }
    body = out[1:-1]
    assert len(body) == len(want), out
    where = {}
    for name, pattern in want.items():
        hits = [i for i, line in enumerate(body) if re.fullmatch(pattern, line)]
        assert len(hits) == 1, f"{name}: {pattern!r} in {body}"
        where[name] = hits[0]
    # The order the lab's first discussion question asks about.
    assert where["connected"] < where["sent"] < where["accepted"] < where["received"]
    assert where["sent"] < where["reply"]
    times = [float(re.match(r"\+(\d+\.\d)ms", line).group(1)) for line in out[:-1]]  # type: ignore[union-attr]
    assert times == sorted(times)
    assert out[-1] == (
        f"verdict: OK connected — the registry called this server back at 127.0.0.1:{port} "
        "and it echoed the nonce"
    )
    ids = {re.search(rf"id=({ID})", body[where[k]]).group(1) for k in ("received", "reply")}  # type: ignore[union-attr]
    assert len(ids) == 1


@pytest.mark.slow
def test_lab_over_ipv6_loopback(tmp_path: Path) -> None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    with run_registry(tmp_path, listen=("[::1]:0",)) as reg:
        done = student("lab", "--registry", f"[::1]:{reg.port}", "--port", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    out = lines(done.stdout)
    port = int(re.fullmatch(rf"{MS}  server  listening on \[::\]:(\d+) and .*", out[0]).group(1))  # type: ignore[union-attr]
    assert re.fullmatch(
        rf"{MS}  client  reply: OK connected id={ID} target=\[::1\]:{port} "
        rf"observed=\[::1\]:\d+ diagnosis=direct verified=yes rtt_ms={RTT} "
        rf"the registry connected to \[::1\]:{port} and your server echoed the nonce",
        out[-2],
    ), out
    assert out[-1].startswith("verdict: OK connected — the registry called this server back at")


@pytest.mark.slow
def test_addresses_marks_the_loopback_route(registry: RegistryProcess) -> None:
    done = student("addresses", "--registry", f"127.0.0.1:{registry.port}")
    assert done.returncode == 0, done.stderr
    out = lines(done.stdout)
    marked = [line for line in out if line.endswith("<- use this one")]
    assert len(marked) == 1, out
    assert re.fullmatch(r"\S+\s+127\.0\.0\.1/8\s+loopback\s+this machine only: .*", marked[0])
    assert out[-1] == (
        f"Advertise 127.0.0.1: it is the address your traffic to the registry "
        f"127.0.0.1:{registry.port} leaves from."
    )
    plain = student("addresses")
    assert plain.returncode == 0
    assert any(re.match(r"\S+\s+127\.0\.0\.1/8\s+loopback\s", line) for line in lines(plain.stdout))


# --------------------------------------------------------------- exit 2, 3 and 5


def test_denied_port_outside_the_policy_range_exits_2(registry: RegistryProcess) -> None:
    port = EPHEMERAL[0] - 1
    done = student("client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port))
    assert done.returncode == 2, done.stdout
    out = lines(done.stdout)
    assert out[0] == f"Sent to Registry Server: 127.0.0.1:{port}"
    assert re.fullmatch(
        rf"DENIED port_not_allowed id={ID} target=127\.0\.0\.1:{port} observed={SRC} "
        rf"diagnosis=direct Port {port} is outside the ports this registry calls "
        rf"\({EPHEMERAL[0]}-{EPHEMERAL[1]}\); run your server on a port in that range\.",
        out[1],
    ), out
    assert out[2:] == [
        "What to check:",
        f"  - port {port} is outside the range the registry accepts (the lab suggests "
        "10000-20000): pick another --port, the same for `student server` and `student client`",
    ]
    # Nothing was attempted: no callback, and the record says so.
    reg_id = re.search(rf"id=({ID})", out[1]).group(1)  # type: ignore[union-attr]
    event = _registration(registry, reg_id)
    assert (event["status"], event["code"], event["rtt_ms"]) == ("DENIED", "port_not_allowed", None)


@pytest.mark.slow
def test_denied_loopback_advertised_exits_2(registry: RegistryProcess) -> None:
    # strict reflection: the request came from 127.0.0.1, so 127.0.0.2 is not "you"
    port = free_port()
    done = student(
        "client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port),
        "--advertise", "127.0.0.2",
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert_lines(
        lines(done.stdout),
        [
            rf"Sent to Registry Server: 127\.0\.0\.2:{port}",
            rf"DENIED source_mismatch id={ID} target=127\.0\.0\.2:{port} observed={SRC} "
            rf"diagnosis=loopback_advertised You sent 127\.0\.0\.2:{port}, but loopback means "
            r"'this machine' to the registry, so it would call itself, not you; it saw you at "
            rf"127\.0\.0\.1\. Advertise an address of your machine the registry can reach, e\.g\. "
            rf"127\.0\.0\.1:{port} \(student client --advertise auto\)\.",
            "What to check:",
            r"  - 127\.0\.0\.2 is a loopback address: it means 'this machine' to whoever dials "
            rf"it, so the registry would call itself — advertise 127\.0\.0\.1:{port} instead",
        ],
    )


def test_denied_unspecified_address_exits_2(registry: RegistryProcess) -> None:
    port = free_port()
    done = student(
        "client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port),
        "--advertise", "0.0.0.0",
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    out = lines(done.stdout)
    assert_lines(
        out[:3],
        [
            rf"Sent to Registry Server: 0\.0\.0\.0:{port}",
            rf"DENIED address_not_allowed id={ID} target=0\.0\.0\.0:{port} observed={SRC} "
            r"diagnosis=unspecified_advertised You sent .*",
            "What to check:",
        ],
    )


def test_denied_self_target_exits_2(registry: RegistryProcess) -> None:
    done = student(
        "client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(registry.port)
    )
    assert done.returncode == 2, done.stdout
    assert_lines(
        lines(done.stdout),
        [
            rf"Sent to Registry Server: 127\.0\.0\.1:{registry.port}",
            rf"DENIED self_target id={ID} target=127\.0\.0\.1:{registry.port} observed={SRC} "
            rf"diagnosis=direct 127\.0\.0\.1:{registry.port} is one of the registry's own "
            r"sockets; run your server on another port\.",
            "What to check:",
            rf"  - 127\.0\.0\.1:{registry.port} is the registry's own address: advertise your "
            r"server's address, not the registry's",
        ],
    )


def test_nobody_listening_is_failed_connection_refused_exit_3(registry: RegistryProcess) -> None:
    port = free_port()  # bound and released: nobody listens there now
    done = student("client", "--registry", f"127.0.0.1:{registry.port}", "--port", str(port))
    assert done.returncode == 3, done.stdout
    assert_lines(
        lines(done.stdout),
        [
            rf"Sent to Registry Server: 127\.0\.0\.1:{port}",
            rf"FAILED connection_refused id={ID} target=127\.0\.0\.1:{port} observed={SRC} "
            rf"diagnosis=direct the callback reached 127\.0\.0\.1:{port} but nothing was "
            rf"listening on port {port} \(connection refused\): start your server first, on "
            r"the same port you advertised \(ECONNREFUSED: Connection refused\)",
            "What to check:",
            rf"  - nothing was listening on {port} at 127\.0\.0\.1 — is `student server` "
            r"running with the same --port\?",
            rf"  - start `student server --port {port}` first, in another terminal, and keep "
            "it running",
        ],
    )


def test_lab_exit_status_is_the_registrys_verdict(registry: RegistryProcess) -> None:
    done = student(
        "lab", "--registry", f"127.0.0.1:{registry.port}", "--port", "0", "--advertise", "127.0.0.2"
    )
    assert done.returncode == 2, done.stdout
    out = lines(done.stdout)
    verdict = [line for line in out if line.startswith("verdict:")]
    assert verdict == ["verdict: DENIED source_mismatch — no callback arrived at this server"]
    assert not any("accepted callback" in line for line in out)


@pytest.mark.slow
def test_registry_not_running_exits_5() -> None:
    port = free_port()  # closed: nothing listens there
    done = student("client", "--registry", f"127.0.0.1:{port}", "--port", "15000")
    assert done.returncode == 5
    assert lines(done.stdout) == [
        f"Error: could not connect to the registry at 127.0.0.1:{port}: connection refused",
        "What to check:",
        f"  - is the registry running at 127.0.0.1:{port}? check the IP address and port your "
        "instructor gave you",
        "  - a firewall between you and the registry may block outgoing connections",
    ]
    lab = student("lab", "--registry", f"127.0.0.1:{port}", "--port", "0")
    assert lab.returncode == 5
    assert (
        f"verdict: no verdict — could not connect to the registry at 127.0.0.1:{port}: "
        "connection refused"
    ) in lines(lab.stdout)


def test_an_error_reply_exits_5(registry: RegistryProcess) -> None:
    # The student tool sends what it is told; the registry refuses the short IPv4 form.
    done = student("client", "--registry", f"127.0.0.1:{registry.port}", "--advertise", "127.1")
    assert done.returncode == 5, done.stdout + done.stderr
    out = lines(done.stdout)
    assert out[0] == "Sent to Registry Server: 127.1:15000"
    assert re.fullmatch(
        rf"ERROR malformed id={ID} observed={SRC} '127\.1' is a short IPv4 form that some "
        r"resolvers expand to 127\.0\.0\.1; write all four parts in decimal, like "
        r"192\.168\.1\.105:15000",
        out[1],
    ), out
    assert out[2] == "What to check:"


# ----------------------------------------------------------------------- exit 4


@pytest.mark.slow
def test_rate_limited_is_busy_exit_4_and_sigterm_exits_0(tmp_path: Path) -> None:
    config = '[ratelimit]\nper_source = "1/hour"\n'
    with run_registry(tmp_path, config=config) as reg:
        port = free_port()
        first = student("client", "--registry", f"127.0.0.1:{reg.port}", "--port", str(port))
        assert first.returncode == 3, first.stdout  # the one registration this hour: refused
        second = student("client", "--registry", f"127.0.0.1:{reg.port}", "--port", str(port))
        assert second.returncode == 4, second.stdout
        out = lines(second.stdout)
        # Refused at the door, before the request was read: no id, no row (docs/limits.md).
        m = re.fullmatch(
            r"BUSY rate_limited retry_after=(\d+) too many connections from your address "
            r"\(source limit\); wait (\d+) s before trying again",
            out[1],
        )
        assert m, out
        assert m.group(1) == m.group(2) and 3000 <= int(m.group(1)) <= 3600
        assert out[2:] == [
            "What to check:",
            f"  - you sent too many registrations: wait {m.group(1)} seconds, then try again once",
        ]
        assert reg.stop() == 0  # SIGTERM: drain and exit 0
        assert reg.events("stopped")
        # ... counted in aggregate instead: one summary line, and one row for the first only
        [summary] = reg.events("door_refusals")
        assert summary["refused"] == 1 and summary["by_reason"] == {"rate_limited": 1}
        assert summary["top"] == [["127.0.0.1", "rate_limited", 1]]
        with sqlite3.connect(reg.db) as db:
            assert db.execute("SELECT status, code FROM registrations").fetchall() == [
                ("FAILED", "connection_refused")
            ]


# ---------------------------------------------------------------- exit 64 and 1


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv",
    [
        ["client"],  # --registry is required
        ["client", "--registry", "127.0.0.1"],  # no port
        ["client", "--registry", "127.0.0.1:9000", "--port", "70000"],
        ["client", "--registry", "127.0.0.1:9000", "--port", "0"],  # the server's port, not 0
        ["lab", "--registry", "127.0.0.1:9000", "--student", "two words"],
        ["server", "--count", "0"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_64(argv: list[str]) -> None:
    done = student(*argv)
    assert done.returncode == 64, done.stderr
    assert done.stdout == ""
    assert re.search(r"^student( \w+)?: error: ", done.stderr, re.M), done.stderr


def test_server_port_taken_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = student("server", "--port", str(port), "--bind", "127.0.0.1")
    assert done.returncode == 1
    assert done.stdout == ""
    assert lines(done.stderr) == [
        f"student server: port {port} is already in use — is another student server running? "
        "pick another --port"
    ]


@pytest.mark.slow
def test_server_timeout_exits_1() -> None:
    done = student("server", "--port", "0", "--bind", "127.0.0.1", "--timeout", "0.3")
    assert done.returncode == 1
    assert re.fullmatch(r"Student server listening on port \d+\.\.\.", done.stdout.strip())
    assert re.fullmatch(
        r"student server: timed out after 0\.3 s: 0 of 1 callback\(s\) arrived — .*",
        done.stderr.strip(),
    )


@pytest.mark.slow
def test_lab_with_the_default_port(tmp_path: Path) -> None:
    """The command as a student types it: no --port, so the lab's 15000."""
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 15000))
    except OSError:
        pytest.skip("port 15000 is in use on this machine")
    with run_registry(tmp_path) as reg:  # the default policy: ports 1024-65535
        done = student("lab", "--registry", f"127.0.0.1:{reg.port}")
    if done.returncode == 1 and "already in use" in done.stderr:
        pytest.skip("port 15000 was taken meanwhile")
    assert done.returncode == 0, done.stdout + done.stderr
    out = lines(done.stdout)
    assert re.fullmatch(rf"{MS}  server  listening on (\[::\]:15000 and )?0\.0\.0\.0:15000", out[0])
    assert re.fullmatch(rf"{MS}  client  reply: {ok_line(15000, verified=True)}", out[-2]), out
    assert out[-1] == (
        "verdict: OK connected — the registry called this server back at 127.0.0.1:15000 "
        "and it echoed the nonce"
    )


# ------------------------------------------------------------ drain and caps


@pytest.mark.slow
def test_sigterm_lets_an_inflight_callback_finish(tmp_path: Path) -> None:
    """SIGTERM while the registry waits for an echo: the client still gets its verdict."""
    config = '[callback]\nverify_timeout = "1s"\n'
    with run_registry(tmp_path, config=config) as reg, socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel completes the handshake; nobody reads or echoes
        port = silent.getsockname()[1]
        client = Spawned(
            [exe("student"), "client", "--registry", f"127.0.0.1:{reg.port}", "--port", str(port)]
        )
        with client:
            silent.settimeout(10)
            call, _ = silent.accept()  # the registry dialled: its callback is under way
            with call:
                assert call.recv(4096).startswith(b"CALLBACK id=")
                assert reg.stop() == 0  # SIGTERM, while the registry waits for the echo
                assert client.finish() == 0, client.out
        assert reg.events("draining") and reg.events("stopped")
        assert not reg.events("grace_period_expired")
    assert_lines(
        client.out,
        [rf"Sent to Registry Server: 127\.0\.0\.1:{port}", ok_line(port, verified=False)],
    )


CAPPED_CONFIG = """
[tuning]
defer_accept = 0  # the silent connection that holds the one slot must reach the registry
max_refusal_delay = "500ms"  # each refusal still held (500 ms), not doubled per repeat

[limits]
max_connections_per_source = 1
"""


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryProcess]:
    """A registry that allows one open connection per source, and that one held open."""
    with run_registry(tmp_path_factory.mktemp("capped"), config=CAPPED_CONFIG) as reg:
        with socket.create_connection(("127.0.0.1", reg.port), timeout=5):
            time.sleep(0.1)  # accepted and counted before the tests connect
            yield reg


def _over_the_cap(port: int) -> tuple[bytes, str]:
    """Connect past the cap, send a request at once (as every lab client does), read to the end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"127.0.0.1:15000\n")
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            return data, "reset"
    return data, "eof"


@pytest.mark.slow
def test_over_the_connection_cap_is_busy_overloaded(capped: RegistryProcess) -> None:
    data, _ = _over_the_cap(capped.port)
    assert data == (
        b"BUSY overloaded retry_after=5 too many open connections from your address; "
        b"close some and retry\n"
    )


@pytest.mark.slow
def test_over_the_connection_cap_reply_ends_with_a_clean_close(capped: RegistryProcess) -> None:
    ends = [_over_the_cap(capped.port)[1] for _ in range(5)]
    assert ends == ["eof"] * 5
