"""The daemon's life, end to end, with the REAL ``registry serve`` executable:
SIGKILL and SIGTERM under load, the drain and its deadline, SIGHUP reloads,
sd_notify, and the exit status a service manager must not restart on.

Traffic goes to 127.0.0.1 only; the callback targets are listeners this module
runs. Every wait is bounded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from registry.net.sdnotify import Notifier
from tests.support import ROOT, exe, free_port, run_registry, send_line

# Limits that never get in the way of a flood from 127.0.0.1.
OPEN_LIMITS = """
[ratelimit]
per_source = "100000/second"
per_target = "100000/second"
per_target_port = "100000/second"
global = "100000/second"
"""


# --- a callback target ------------------------------------------------------------


@dataclass
class Target:
    """A TCP listener on 127.0.0.1 the registry calls back.

    ``delay``: seconds to wait after reading the CALLBACK line before echoing it;
    ``echo=False``: never answer, just hold the connection until the peer closes
    (bounded by ``hold``).
    """

    delay: float = 0.0
    echo: bool = True
    hold: float = 5.0
    port: int = 0
    accepted: threading.Event = field(default_factory=threading.Event)
    calls: list[str] = field(default_factory=list)

    def serve(self, sock: socket.socket, stop: threading.Event) -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn: socket.socket) -> None:
        with conn:
            self.accepted.set()
            conn.settimeout(self.hold)
            try:
                data = b""
                while b"\n" not in data and len(data) < 4096:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                self.calls.append(data.decode(errors="replace"))
                if not self.echo:
                    conn.recv(1)  # until the registry gives up and closes (or hold passes)
                    return
                time.sleep(self.delay)
                conn.sendall(data)
            except OSError:
                pass


@contextmanager
def target(**kwargs: object) -> Iterator[Target]:
    t = Target(**kwargs)  # type: ignore[arg-type]
    stop = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(512)
        t.port = sock.getsockname()[1]
        thread = threading.Thread(target=t.serve, args=(sock, stop), daemon=True)
        thread.start()
        try:
            yield t
        finally:
            stop.set()
            thread.join(timeout=2)


# --- clients ------------------------------------------------------------------------


def exchange(port: int, line: bytes, timeout: float = 10.0) -> bytes | None:
    """Send one registration; return every byte of the reply (b"" when the connection
    closed without one), or None when the registry no longer listens."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError:
        return None
    data = b""
    with sock:
        try:
            sock.sendall(line)
            while chunk := sock.recv(4096):
                data += chunk
        except OSError:  # reset: a closed connection, with whatever arrived before
            pass
    return data


def flood(port: int, line: bytes, seconds: float, threads: int = 8) -> list[bytes]:
    """``threads`` clients registering back to back for ``seconds`` (or until the
    registry stops listening); every reply (complete or not) in order."""
    replies: list[bytes] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < end:
            reply = exchange(port, line)
            if reply is None:
                return
            with lock:
                replies.append(reply)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 15)
    assert not any(w.is_alive() for w in workers), "a flood client hung"
    return replies


def reply_ids(replies: list[bytes]) -> set[str]:
    ids = set()
    for reply in replies:
        m = re.search(rb"\bid=([0-9a-f]+)", reply)
        if m and reply.endswith(b"\n"):
            ids.add(m.group(1).decode())
    return ids


def db_rows(path: Path) -> dict[str, tuple[str, str]]:
    """id -> (status, code) for every row, after checking the file's integrity."""
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return {
            r[0]: (r[1], r[2]) for r in db.execute("SELECT id, status, code FROM registrations")
        }


def assert_whole_lines(replies: list[bytes]) -> None:
    """Every reply is nothing at all or exactly one complete line."""
    for reply in replies:
        assert reply == b"" or (reply.endswith(b"\n") and reply.count(b"\n") == 1), reply


# --- crash and drain ------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_mid_flood_loses_no_acknowledged_registration(tmp_path: Path) -> None:
    with target() as t:
        line = f"127.0.0.1:{t.port}\n".encode()
        with run_registry(tmp_path, config=OPEN_LIMITS) as reg:
            killer = threading.Timer(1.0, reg.proc.send_signal, (signal.SIGKILL,))
            killer.start()
            replies = flood(reg.port, line, seconds=3.0)
            killer.join()
            assert reg.proc.wait(timeout=10) == -signal.SIGKILL
        acknowledged = reply_ids(replies)
        assert len(acknowledged) >= 8, f"the flood barely ran: {len(replies)} replies"
        # A restart opens the crashed file (WAL recovery) and serves on it.
        with run_registry(tmp_path, config=OPEN_LIMITS) as again:
            assert send_line("127.0.0.1", again.port, line).startswith("OK connected")
            assert again.stop() == 0
    rows = db_rows(tmp_path / "registry.db")
    missing = acknowledged - set(rows)
    assert not missing, f"{len(missing)} acknowledged registrations lost"
    assert all(rows[i] == ("OK", "connected") for i in acknowledged)


@pytest.mark.slow
def test_sigterm_under_load_drains_and_exits_0(tmp_path: Path) -> None:
    with target() as t:
        line = f"127.0.0.1:{t.port}\n".encode()
        config = OPEN_LIMITS + '[server]\ngrace_period = "5s"\n'
        with run_registry(tmp_path, config=config) as reg:
            timer = threading.Timer(0.7, reg.proc.send_signal, (signal.SIGTERM,))
            timer.start()
            replies = flood(reg.port, line, seconds=3.0)
            timer.join()
            assert reg.proc.wait(timeout=10) == 0
            reg.wait_event("stopped", timeout=2)
            # The drain ended inside the grace period, by the registry's own clock.
            assert not reg.events("grace_period_expired")
    assert_whole_lines(replies)
    acknowledged = reply_ids(replies)
    assert len(acknowledged) >= 8
    rows = db_rows(tmp_path / "registry.db")
    assert acknowledged <= set(rows)


def _register_in_background(port: int, line: bytes) -> tuple[threading.Thread, list[bytes]]:
    out: list[bytes] = []
    thread = threading.Thread(target=lambda: out.append(exchange(port, line) or b""), daemon=True)
    thread.start()
    return thread, out


@pytest.mark.slow
def test_sigterm_waits_for_a_slow_callback(tmp_path: Path) -> None:
    """The callback's target echoes after 1 s: the drain waits, records, replies."""
    config = '[server]\ngrace_period = "5s"\n[callback]\nverify_timeout = "4s"\n'
    with target(delay=1.0) as t, run_registry(tmp_path, config=config) as reg:
        thread, out = _register_in_background(reg.port, f"127.0.0.1:{t.port} verify=yes\n".encode())
        assert t.accepted.wait(5)
        sent = time.monotonic()
        reg.proc.send_signal(signal.SIGTERM)
        assert reg.proc.wait(timeout=10) == 0
        took = time.monotonic() - sent
        thread.join(5)
        assert took > 0.5, took  # it waited for the callback's 1 s echo...
        assert out[0].startswith(b"OK connected") and b"verified=yes" in out[0], out
        reg.wait_event("stopped", timeout=2)
        assert not reg.events("grace_period_expired")  # ...inside the grace period
    (reg_id,) = reply_ids(out)
    assert db_rows(tmp_path / "registry.db")[reg_id] == ("OK", "connected")


@pytest.mark.slow
def test_tiny_grace_period_cuts_the_drain_and_still_exits_0(tmp_path: Path) -> None:
    """grace_period 200 ms: a client still sending is cut at the deadline; a callback
    already dialling ends within its own timeout and is recorded; exit 0."""
    config = (
        '[server]\ngrace_period = "200ms"\n[callback]\nverify_timeout = "1500ms"\n'
        '[protocol]\nread_deadline = "10s"\n'
        '[tuning]\nquiet_period = "5s"\n'  # a request without its newline stays unfinished
    )
    with target(echo=False) as t, run_registry(tmp_path, config=config) as reg:
        thread, out = _register_in_background(reg.port, f"127.0.0.1:{t.port} verify=yes\n".encode())
        assert t.accepted.wait(5)
        idle = socket.create_connection(("127.0.0.1", reg.port), timeout=10)
        idle.sendall(b"127.0.0.1:")  # mid-request: not yet a whole line
        time.sleep(0.1)  # let the registry accept it before the listeners close
        reg.proc.send_signal(signal.SIGTERM)
        with idle:
            try:
                # Cut by the drain, unanswered: read to its 5 s quiet period, the
                # half request would have had an "ERROR malformed" line.
                assert idle.recv(4096) == b""
            except ConnectionResetError:
                pass
        assert reg.proc.wait(timeout=10) == 0
        thread.join(5)
        reg.wait_event("grace_period_expired", timeout=2)
        assert_whole_lines(out)
    rows = db_rows(tmp_path / "registry.db")
    assert ("FAILED", "not_verified") in rows.values(), rows


# --- reload ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sighup_applies_a_good_file_and_keeps_the_old_config_on_a_bad_one(
    tmp_path: Path,
) -> None:
    # refusals answered at once: the hold of a refusal has its own tests (test_door.py)
    strict = '[tuning]\nrefusal_delay = "0s"\n[ratelimit]\nper_source = "1/hour"\n'
    with target() as t, run_registry(tmp_path, config=strict) as reg:
        path = tmp_path / "registry.toml"
        line = f"127.0.0.1:{t.port} verify=no\n".encode()
        assert exchange(reg.port, line).startswith(b"OK connected")
        assert exchange(reg.port, line).startswith(b"BUSY rate_limited")

        path.write_text('[ratelimit]\nper_source = "ten"\n')
        reg.proc.send_signal(signal.SIGHUP)
        (failed,) = reg.wait_event("reload_failed")
        assert any(p.startswith("ratelimit.per_source:") for p in failed["problems"])
        assert reg.proc.poll() is None
        assert exchange(reg.port, line).startswith(b"BUSY rate_limited"), "old config must stay"

        path.write_text('[ratelimit]\nper_source = "100/second"\n')
        reg.proc.send_signal(signal.SIGHUP)
        reg.wait_event("reloaded")
        time.sleep(0.05)  # one token of the new rate (10 ms) refills the old debt
        assert exchange(reg.port, line).startswith(b"OK connected")
        # the command-line overrides (--listen, --db) survive the reload
        assert not reg.events("reload_needs_restart")
        assert reg.stop() == 0


@pytest.mark.slow
def test_signals_right_after_ready_are_handled_not_fatal(tmp_path: Path) -> None:
    """SIGHUP then SIGTERM the moment the registry reports it listens."""
    with run_registry(tmp_path, config="") as reg:
        reg.proc.send_signal(signal.SIGHUP)
        reg.wait_event("reloaded")
        assert reg.proc.poll() is None
        assert reg.stop() == 0


# --- sd_notify ------------------------------------------------------------------------


@contextmanager
def notify_socket(probe_port: int) -> Iterator[tuple[str, list[tuple[float, str]]]]:
    """A unix datagram socket like systemd's; yields its path and the messages received.

    The moment the first READY=1 arrives, it tries to connect to ``probe_port``
    and records the result as a pseudo-message ``PROBE=open|closed``.
    """
    folder = tempfile.mkdtemp(prefix="cbl-notify-", dir="/tmp")  # short: sun_path is 108 bytes
    path = os.path.join(folder, "notify")
    messages: list[tuple[float, str]] = []
    stop = threading.Event()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.05)

    def receive() -> None:
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            text = data.decode()
            messages.append((time.monotonic(), text))
            if "READY=1" in text.splitlines() and not any(
                m.startswith("PROBE=") for _, m in messages
            ):
                messages.append((time.monotonic(), f"PROBE={_probe(probe_port)}"))

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    try:
        yield path, messages
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


def _probe(port: int) -> str:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return "closed"
    return "open"


def _wait_for(messages: list[tuple[float, str]], text: str, after: int = 0) -> int:
    """Index of the first message from ``after`` on that contains ``text``."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for i, (_, m) in enumerate(list(messages)[after:], start=after):
            if text in m.splitlines():
                return i
        time.sleep(0.01)
    raise AssertionError(f"no {text!r} in {[m for _, m in messages]}")


@pytest.mark.slow
def test_sd_notify_ready_reload_watchdog_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    with notify_socket(port) as (path, messages):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        with run_registry(tmp_path, listen=(f"127.0.0.1:{port}",), config="") as reg:
            ready = _wait_for(messages, "READY=1")
            # READY=1 means "serving": the port was already open when it arrived.
            assert _wait_for(messages, "PROBE=open") == ready + 1, messages

            time.sleep(0.5)  # watchdog every WATCHDOG_USEC/2 = 100 ms
            pings = [m for _, m in messages if m == "WATCHDOG=1"]
            assert len(pings) >= 3, messages

            mark = len(messages)
            reg.proc.send_signal(signal.SIGHUP)
            reloading = _wait_for(messages, "RELOADING=1", after=mark)
            assert "MONOTONIC_USEC=" in messages[reloading][1]
            assert _wait_for(messages, "READY=1", after=reloading + 1) > reloading

            mark = len(messages)
            reg.proc.send_signal(signal.SIGTERM)
            _wait_for(messages, "STOPPING=1", after=mark)
            assert reg.proc.wait(timeout=10) == 0
        assert ready < reloading


def test_notifier_abstract_socket_and_missing_socket(tmp_path: Path) -> None:
    name = f"cbl-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.address == "\0" + name  # the abstract namespace
        assert notifier.ready("listening on 127.0.0.1:9000")
        assert receiver.recv(4096) == b"READY=1\nSTATUS=listening on 127.0.0.1:9000"
        assert notifier.stopping() and receiver.recv(4096) == b"STOPPING=1"
        assert notifier.watchdog() and receiver.recv(4096) == b"WATCHDOG=1"
        assert notifier.reloading()
        assert re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=\d+", receiver.recv(4096))
    # gone, never there, or unset: harmless, and says so
    for env in ({"NOTIFY_SOCKET": "@" + name}, {"NOTIFY_SOCKET": str(tmp_path / "none")}, {}):
        notifier = Notifier(env)
        assert notifier.ready() is False and notifier.watchdog() is False


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}, None),  # meant for another process
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_notifier_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    assert Notifier(env).watchdog_interval == interval


# --- exit status for what a restart cannot fix ----------------------------------------


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe("registry"), "serve", "--admin", "off", "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "args", "key"),
    [
        ('[ratelimit]\nper_source = "ten"\n', (), "ratelimit.per_source"),
        ("[policy]\nbogus = 1\n", (), "policy.bogus"),
        ("", ("--listen", "localhost:9000"), "server.listen[0]"),
        ('[auth]\nmode = "token"\nsecret_file = "/nonexistent/secret"\n', (), "auth.secret_file"),
    ],
    ids=["bad-rate", "unknown-key", "bad-listen-option", "unreadable-secret"],
)
def test_bad_config_at_serve_exits_78_naming_the_key(
    tmp_path: Path, config: str, args: tuple[str, ...], key: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(config)
    result = serve(tmp_path, "--config", str(path), "--db", str(tmp_path / "r.db"), *args)
    assert result.returncode == 78, result.stderr
    assert f"registry: config: {key}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r.db").exists(), "nothing is created for a config that is refused"


@pytest.mark.slow
def test_database_from_a_newer_schema_exits_78(tmp_path: Path) -> None:
    db = tmp_path / "newer.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
    result = serve(tmp_path, "--db", str(db), "--listen", "127.0.0.1:0")
    assert result.returncode == 78, result.stderr
    assert "schema version 99" in result.stderr and "newer version" in result.stderr
    assert "Traceback" not in result.stderr


# --- the systemd unit -----------------------------------------------------------------


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    text = (ROOT / "config" / "registry.service").read_text()
    for needed in (
        "Type=notify",
        "RestartPreventExitStatus=78",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "CapabilityBoundingSet=\n",
    ):
        assert needed in text, needed
    # verify checks that ExecStart= exists: point it at this checkout's executable.
    unit = tmp_path / "callback-lab.service"
    unit.write_text(text.replace("/opt/callback-lab/venv/bin/registry", exe("registry")))
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "callback-lab.service" not in result.stderr, result.stderr  # no warnings for it
