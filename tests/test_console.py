"""The instructor's terminal and the small commands, through the real executables.

``registry serve`` on a real pseudo-terminal prints a banner and one short
line per registration; on a pipe it keeps writing JSON. ``--version`` of both
commands, and ``registry token`` without a secret.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.support import ROOT, exe

JOSE_NFC = "jos\u00e9"
JOSE_NFD = "jose\u0301"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.mark.slow
def test_version_of_both_commands() -> None:
    for name in ("registry", "student"):
        done = subprocess.run([exe(name), "--version"], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"callback-lab {VERSION}\n"


class Pty:
    """The master side of a pseudo-terminal, read with a bound on every wait."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.text = ""

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.text, re.MULTILINE)
            if found:
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} on the terminal; it shows:\n{self.text}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: every writer closed the terminal
                    chunk = b""
                assert chunk, f"terminal closed before {pattern!r}:\n{self.text}"
                self.text += chunk.decode("utf-8", "replace").replace("\r\n", "\n")

    def start(self, argv: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        """Run ``argv`` with this terminal as its stdin, stdout and stderr."""
        proc = subprocess.Popen(
            argv, stdin=self.slave, stdout=self.slave, stderr=self.slave, cwd=cwd
        )
        os.close(self.slave)
        return proc

    def close(self) -> None:
        os.close(self.master)


def _send(port: int, line: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line.encode() + b"\n")
        return s.makefile(encoding="utf-8").readline()


@pytest.mark.slow
def test_tty_shows_a_banner_and_one_line_per_registration(tmp_path: Path) -> None:
    term = Pty()
    proc = term.start(
        [exe("registry"), "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        + ["--workers", "1"],
        tmp_path,
    )
    try:
        banner = term.wait_for(r"One line per registration follows")
        send = term.wait_for(
            r"^  Students send to \(TCP and UDP\)\s+(127\.0\.0\.1:(\d+))"
            r"   \(this machine only: no network address to offer\)$"
        )
        port = int(send.group(2))
        assert re.search(rf"^  Listening on\s+127\.0\.0\.1:{port}$", term.text, re.M)
        assert re.search(r"^  Dashboard\s+http://127\.0\.0\.1:\d+/$", term.text, re.M)
        assert re.search(r"^  Config\s+\(embedded defaults\)$", term.text, re.M)
        assert f"  Results database{' ' * 16}{tmp_path / 'registry.db'}\n" in term.text
        assert f"student lab --registry 127.0.0.1:{port}" in term.text
        assert banner

        lab = subprocess.run(
            [exe("student"), "lab", "--registry", f"127.0.0.1:{port}", "--port", "0"]
            + ["--student", JOSE_NFD],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert lab.returncode == 0, lab.stdout + lab.stderr
        ok = term.wait_for(
            rf"^(\d\d:\d\d:\d\d) OK   connected  {JOSE_NFC}  127\.0\.0\.1:\d+  verified$"
        )
        assert ok

        assert _send(port, "127.0.0.1:1 student=bob").startswith("DENIED port_not_allowed")
        term.wait_for(
            r"^\d\d:\d\d:\d\d DENIED port_not_allowed  bob  127\.0\.0\.1:1  "
            r"that port is outside the allowed range$"
        )
        assert _send(port, "nonsense").startswith("ERROR malformed")
        term.wait_for(
            r"^\d\d:\d\d:\d\d ERROR malformed  \(no name\) 127\.0\.0\.1  127\.0\.0\.1:\d+  "
            r"the message is not HOST:PORT$"
        )
        assert '"event": "registration"' not in term.text  # no JSON for a person to read
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        term.close()

    # The name was stored in NFC; results --student finds it in either spelling.
    for spelling in (JOSE_NFD, JOSE_NFC):
        done = subprocess.run(
            [exe("registry"), "results", "--db", str(tmp_path / "registry.db")]
            + ["--format", "json", "--student", spelling],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        rows = json.loads(done.stdout)
        assert [(r["student"], r["status"]) for r in rows] == [(JOSE_NFC, "OK")]


@pytest.mark.slow
@pytest.mark.netns
def test_banner_on_a_wildcard_names_the_hosts_real_addresses(tmp_path: Path) -> None:
    """In a namespace of its own with one network address, the banner offers that address."""
    from tests.netns import require_netns

    require_netns()
    ns = f"firsthour-{os.getpid()}"
    ip = ["ip", "-n", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    term = Pty()
    proc = None
    try:
        subprocess.run([*ip, "link", "set", "lo", "up"], check=True, timeout=10)
        subprocess.run(
            [*ip, "link", "add", "fh0", "type", "veth", "peer", "name", "fh1"],
            check=True,
            timeout=10,
        )
        subprocess.run([*ip, "addr", "add", "198.51.100.7/24", "dev", "fh0"], check=True)
        subprocess.run([*ip, "link", "set", "fh0", "up"], check=True, timeout=10)
        proc = term.start(
            ["ip", "netns", "exec", ns, exe("registry"), "serve"]
            + ["--listen", "0.0.0.0:0", "--admin", "off", "--workers", "1"],
            tmp_path,
        )
        term.wait_for(r"One line per registration follows")
        send = term.wait_for(r"^  Students send to \(TCP and UDP\)\s+198\.51\.100\.7:(\d+)$")
        assert "127.0.0.1" not in term.text  # loopback is no use to a class
        assert re.search(rf"^  Listening on\s+0\.0\.0\.0:{send.group(1)}$", term.text, re.M)
        assert re.search(r"^  Dashboard\s+off$", term.text, re.M)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        term.close()
        subprocess.run(["ip", "netns", "del", ns], check=True, timeout=10)


def test_not_a_tty_keeps_json_logs(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [exe("registry"), "serve", "--listen", "127.0.0.1:0", "--admin", "off", "--workers", "1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    try:
        assert proc.stderr is not None
        events = []
        while not any(e.get("event") == "listening" for e in events):
            line = proc.stderr.readline()
            assert line, "registry exited before listening"
            events.append(json.loads(line))
        listening = events[-1]
        assert listening["tcp"][0].startswith("127.0.0.1:")
        assert listening["send_to"] == listening["tcp"]  # where students send: the banner's
        assert "Registry Server ready" not in json.dumps(events)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        proc.stderr.close()  # type: ignore[union-attr]


@pytest.mark.slow
def test_token_without_a_secret_says_how_to_make_one(tmp_path: Path) -> None:
    done = subprocess.run(
        [exe("registry"), "token", "alice"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "tokens need a secret, and no --config FILE was given" in done.stderr
    assert "head -c 32 /dev/urandom" in done.stderr
    assert 'secret_file = "secret.key"' in done.stderr

    cfg = tmp_path / "c.toml"
    cfg.write_text('[auth]\nmode = "token"\nsecret = "s3cret"\n')
    tokens = {
        subprocess.run(
            [exe("registry"), "token", spelling, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        for spelling in (JOSE_NFC, JOSE_NFD)
    }
    assert len(tokens) == 1  # one student, one token, whichever way the name was typed

    bad = subprocess.run(
        [exe("registry"), "token", "ali\u202ece", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 64
    assert "the invisible character U+202E (RIGHT-TO-LEFT OVERRIDE)" in bad.stderr


LINES = [
    (
        {"status": "OK", "code": "connected", "student": "alice", "verified": True},
        "OK   connected  alice  192.168.1.105:15000  verified",
    ),
    (
        {"status": "OK", "code": "connected", "student": None, "verified": False},
        "OK   connected  (no name) 192.168.1.105  192.168.1.105:15000  not verified",
    ),
    (
        {"status": "FAILED", "code": "timeout", "student": "bob", "diagnosis": "direct"},
        "FAILED timeout  bob  192.168.1.105:15000  "
        "no answer from that address (firewall, NAT or wrong address)",
    ),
    (
        {"status": "DENIED", "code": "source_mismatch", "student": "eve", "diagnosis": "cgnat"},
        "DENIED source_mismatch  eve  192.168.1.105:15000  "
        "advertised address is not where the request came from (cgnat)",
    ),
    (
        # Names are validated before they get here; the console escapes anyway.
        {"status": "OK", "code": "connected", "student": "a\x1b[2Jb\u202e", "verified": True},
        "OK   connected  a\\u001b[2Jb\\u202e  192.168.1.105:15000  verified",
    ),
    (
        {"status": "ERROR", "code": "malformed", "student": None, "target": None},
        "ERROR malformed  (no name) 192.168.1.105  192.168.1.105:52114  "
        "the message is not HOST:PORT",
    ),
]


def _as_logged(fields: dict[str, str]) -> dict[str, object]:
    # Service._recorded logs the Status, Code and Diagnosis members (StrEnum), not strings.
    from registry.model import Code, Diagnosis, Status

    members: dict[str, object] = {"status": Status(fields["status"]), "code": Code(fields["code"])}
    if fields.get("diagnosis"):
        members["diagnosis"] = Diagnosis(fields["diagnosis"])
    return {**fields, **members}


@pytest.mark.parametrize("enums", [False, True], ids=["strings", "enums"])
def test_registration_lines(enums: bool) -> None:
    from registry.log import registration_line

    for fields, expected in LINES:
        event = {
            "event": "registration",
            "timestamp": "2026-01-01T12:03:04.5Z",
            "peer": "192.168.1.105:52114",
            "target": "192.168.1.105:15000",
            **(_as_logged(fields) if enums else fields),
        }
        line = registration_line(event)
        assert re.fullmatch(r"\d\d:\d\d:\d\d", line[:8]), line
        assert line[9:] == expected


def test_every_failure_code_has_words_on_the_console() -> None:
    """A new reply code must get its short reason, not show its raw name to the teacher."""
    from registry.log import REASONS
    from registry.model import Code

    assert {c.value for c in Code} - {"connected"} <= REASONS.keys()


def test_a_group_starting_is_its_banner_and_a_restart_still_shows() -> None:
    import structlog

    from registry.log import ClassConsole

    console = ClassConsole(colors=False, config=None)
    for quiet in (
        {"event": "worker_started", "worker": 1, "restarts": 0},
        {"event": "worker_ready", "worker": 1, "tcp": ["127.0.0.1:9000"]},
    ):
        with pytest.raises(structlog.DropEvent):
            console(None, "info", dict(quiet))
    shown = console(None, "info", {"event": "worker_started", "worker": 1, "restarts": 2})
    assert "worker_started" in shown and "restarts=2" in shown
    assert "worker_exited" in console(None, "info", {"event": "worker_exited", "worker": 1})
    group = {"event": "listening", "tcp": ["127.0.0.1:9000"], "db": "r.db", "workers": 2}
    assert "  127.0.0.1:9000   (2 worker processes)\n" in console(None, "info", group)
    alone = {"event": "listening", "tcp": ["127.0.0.1:9000"], "db": "r.db", "workers": 1}
    assert "worker processes" not in console(None, "info", alone)


@pytest.mark.slow
def test_a_group_on_a_tty_shows_one_banner_and_its_registrations(tmp_path: Path) -> None:
    term = Pty()
    proc = term.start(
        [exe("registry"), "serve", "--listen", "127.0.0.1:0", "--admin", "off"]
        + ["--workers", "2"],
        tmp_path,
    )
    try:
        found = term.wait_for(r"^  Listening on\s+127\.0\.0\.1:(\d+)   \(2 worker processes\)$")
        port = int(found.group(1))
        term.wait_for(r"One line per registration follows")
        assert _send(port, "nonsense").startswith("ERROR malformed")
        term.wait_for(r"^\d\d:\d\d:\d\d ERROR malformed  \(no name\) 127\.0\.0\.1  ")
        assert "worker_ready" not in term.text and "worker_started" not in term.text
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        term.close()
