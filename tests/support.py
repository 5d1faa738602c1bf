"""Shared test helpers: the real executables, free ports, required tools.

Rules for every test module (as trio-websocket's tests state theirs): traffic
goes to loopback only (127.0.0.1 / ::1) or to namespaces the test creates;
ports come from the kernel (port 0) or from free_port(); every I/O wait is
bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from registry.store import Record

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI") == "true"


def require_tool(name: str) -> str:
    """Path of a system tool; skip locally when missing, but fail in CI (which installs it)."""
    path = shutil.which(name)
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is required in CI (.ci/run installs it)")
    pytest.skip(f"{name} not installed (.ci/run installs it)")


def exe(name: str) -> str:
    """A console script of this project, from the running interpreter's environment."""
    path = BIN / name
    assert path.exists(), f"{path} missing: install the project (python3 run.py pytest does)"
    return str(path)


def free_port(family: int = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RegistryProcess:
    proc: subprocess.Popen[str]
    db: Path
    tcp: list[str]
    logs: list[dict] = field(default_factory=list)
    admin: str | None = None  # "127.0.0.1:PORT" of the admin endpoint, when started with one
    raw: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None  # reads stderr into logs/raw until EOF

    @property
    def port(self) -> int:
        return int(self.tcp[0].rsplit(":", 1)[1])

    def events(self, name: str) -> list[dict]:
        return [e for e in list(self.logs) if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 10.0, count: int = 1) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.events(name)
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(
            f"no {count}x {name!r} event within {timeout}s; log tail: {self.raw[-10:]}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal, wait for the exit, and for its last log lines to be read (so events() has them)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = wait_exit(self.proc, timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        return code


def wait_exit(proc: subprocess.Popen[str], timeout: float) -> int:
    """``proc.wait(timeout)`` without its polling ``time.sleep``, so an async test may
    call it: the process's pidfd becomes readable when it exits."""
    if not hasattr(os, "pidfd_open"):  # not Linux: Popen's own (polling) wait
        return proc.wait(timeout)
    if proc.poll() is None:
        fd = os.pidfd_open(proc.pid)
        try:
            if not select.select([fd], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(proc.args, timeout)
        finally:
            os.close(fd)
    return proc.wait()


def _drain(proc: subprocess.Popen[str], reg: RegistryProcess, ready: threading.Event) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        reg.raw.append(line.rstrip("\n"))
        try:
            event = json.loads(line)
        except ValueError:
            continue
        reg.logs.append(event)
        if event.get("event") == "listening":
            reg.tcp[:] = event["tcp"]
            reg.admin = event.get("admin") if event.get("admin") != "off" else None
            ready.set()
    ready.set()


@contextmanager
def run_registry(
    tmp_path: Path,
    *args: str,
    listen: tuple[str, ...] = ("127.0.0.1:0",),
    config: str | None = None,
    timeout: float = 15.0,
    cwd: Path | None = None,
    admin: str = "off",
    prefix: tuple[str, ...] = (),
) -> Iterator[RegistryProcess]:
    """Start the real ``registry serve`` executable; stop it (by PID) afterwards.

    ``prefix`` runs it through another command, e.g. ``("ip", "netns", "exec", NS)``
    to start it inside a namespace the test created.
    """
    db = tmp_path / "registry.db"
    cmd = [
        *prefix,
        exe("registry"),
        "serve",
        "--db",
        str(db),
        "--log-format",
        "json",
        "--admin",
        admin,
        "--workers",  # one process unless the test asks for a group (args come after)
        "1",
    ]
    for spec in listen:
        cmd += ["--listen", spec]
    if config is not None:
        cfg = tmp_path / "registry.toml"
        cfg.write_text(config)
        cmd += ["--config", str(cfg)]
    cmd += list(args)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd or tmp_path,
    )
    reg = RegistryProcess(proc, db, [])
    ready = threading.Event()
    reg.reader = threading.Thread(target=_drain, args=(proc, reg, ready), daemon=True)
    reg.reader.start()
    try:
        if not ready.wait(timeout) or not reg.tcp:
            raise AssertionError(f"registry did not start: rc={proc.poll()} log={reg.raw[-20:]}")
        yield reg
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                wait_exit(proc, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                wait_exit(proc, 5)


def send_line(
    host: str, port: int, data: bytes, *, timeout: float = 10.0, shut: bool = False
) -> str:
    """Blocking client for end-to-end tests: send bytes, read the one reply line."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()


async def exchange_from(
    port: int, src: str, data: bytes, *, connect_timeout: float | None = None
) -> bytes | None:
    """Connect to 127.0.0.1:``port`` from ``src``, send ``data``, half-close, read to EOF.

    None when the connect does not complete within ``connect_timeout`` (a SYN
    dropped by a ban); without one, a connect that fails raises.
    """
    sock = trio.socket.socket()
    try:
        await sock.bind((src, 0))
        with trio.move_on_after(connect_timeout if connect_timeout is not None else float("inf")):
            await sock.connect(("127.0.0.1", port))
            if data:
                await sock.send(data)
            sock.shutdown(socket.SHUT_WR)
            reply = b""
            with trio.fail_after(10):
                while chunk := await sock.recv(4096):
                    reply += chunk
            return reply
        return None
    finally:
        sock.close()


def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET http://127.0.0.1:``port````path`` with the stdlib client: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def stored(n: int, **kw: object) -> Record:
    """A stored registration (a timeout, by default) for tests of what reads records."""
    values: dict[str, object] = {
        "id": f"r{n:05d}",
        "received_at": time.time(),
        "protocol": "text",
        "student": "alice",
        "peer": "127.0.0.1:40000",
        "advertised": "127.0.0.1:15000",
        "target": "127.0.0.1:15000",
        "status": "FAILED",
        "code": "timeout",
        "diagnosis": "direct",
        "rtt_ms": None,
        "verified": None,
        "explanation": "x" * 200,
        "duration_ms": 3.0,
        "corrected": False,
    }
    values.update(kw)
    return Record(**values)  # type: ignore[arg-type]
