"""Small private networks in network namespaces, with real programs running in them.

Used by the NAT lab and attack demos in ``examples/`` and by the tests
(``tests/netns.py`` re-exports it). Everything a :class:`NetnsLab` creates
lives inside namespaces it creates: veth pairs are created directly inside
their namespaces (never in the host's), no namespace is connected to the
host's network, and the addresses used are documentation / private ranges
that exist only inside the lab. Nothing can leave it.

Names are unique per process (``cbl-<kind>-<pid>-<role>``), so parallel runs
do not collide. :func:`netns_lab` tears everything down in a ``finally`` (so
also after Ctrl-C): the processes the lab started are stopped by their PID
(SIGTERM, then SIGKILL), then its namespaces are deleted (which deletes their
veths). Namespaces left by a process that no longer exists are removed when
the next lab of the same kind starts.

Requirements: root, ``ip`` (iproute2) and ``nft`` (nftables) with NAT support
in the kernel; :func:`netns_unavailable` says what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def exe(name: str) -> str:
    """A console script of this project (``registry``, ``student``) beside this interpreter."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the project (python3 run.py does)")
    return found


# Every process a lab starts gets this environment: unbuffered output so the
# test sees "listening" lines at once, and no proxy that could send traffic out.
_ENV = {
    **{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
    "PYTHONUNBUFFERED": "1",
}
_CMD_TIMEOUT = 10.0
# Every process a lab starts carries LAB_MARK=<its tag> in its environment, so a
# test can prove that none outlives the lab (by reading /proc/*/environ).
LAB_MARK = "CBL_NETNS_LAB"


def netns_unavailable(kind: str = "probe") -> str | None:
    """Why namespaces cannot be built here (not root, no ``ip``/``nft``, no netns), or None.

    Only the environment is probed; a veth or nft rule that fails later is an
    error of the lab itself and must not be reported as "unavailable".
    """
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = f"cbl-{kind}-{os.getpid()}-probe"
    try:
        run_cmd(["ip", "netns", "add", probe])
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"cannot create a network namespace: {getattr(e, 'stderr', None) or e}"
    run_cmd(["ip", "netns", "del", probe], check=False)
    return None


def run_cmd(cmd: Sequence[str], *, stdin: str | None = None, check: bool = True) -> str:
    done = subprocess.run(
        list(cmd),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=_CMD_TIMEOUT,
        check=False,
    )
    if check and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done.stdout


@dataclass
class Output:
    """A started process whose output lines a thread collects as they come."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ended: bool = False
    _new: threading.Condition = field(default_factory=threading.Condition)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self.ended = True
            self._new.notify_all()

    def wait_for(self, needle: str, timeout: float = 10.0) -> str:
        """The first output line containing ``needle``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._new:
            while True:
                found = next((line for line in self.lines if needle in line), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.ended:
                    raise AssertionError(f"no {needle!r} within {timeout}s; output: {self.lines}")
                self._new.wait(left)

    def finish(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit on its own (and its output to be read); its status."""
        status = self.proc.wait(timeout=timeout)
        with self._new:
            self._new.wait_for(lambda: self.ended, timeout=timeout)
        return status


@dataclass
class RegistryInNs:
    """A real ``registry serve`` inside a namespace, with its JSON log parsed."""

    out: Output
    ns: str
    db: Path

    @property
    def events(self) -> list[dict]:
        found = []
        for line in list(self.out.lines):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def registrations(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "registration"]


@dataclass
class NetnsLab:
    """Namespaces, veths, addresses, nft rules and processes of one test lab."""

    tag: str
    namespaces: list[str] = field(default_factory=list)
    started: list[subprocess.Popen[str]] = field(default_factory=list)

    def ns(self, role: str) -> str:
        return f"{self.tag}-{role}"

    def add(self, role: str) -> str:
        """A new namespace with its loopback up."""
        name = self.ns(role)
        run_cmd(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.ip(role, "link", "set", "lo", "up")
        return name

    def ip(self, role: str, *args: str) -> str:
        return run_cmd(["ip", "-n", self.ns(role), *args])

    def link(self, a: str, dev_a: str, cidr_a: str, b: str, dev_b: str, cidr_b: str) -> None:
        """A veth pair from namespace ``a`` to ``b``, addressed and up on both ends."""
        self.ip(
            a,
            "link",
            "add",
            "name",
            dev_a,
            "type",
            "veth",
            "peer",
            "name",
            dev_b,
            "netns",
            self.ns(b),
        )
        for role, dev, cidr in ((a, dev_a, cidr_a), (b, dev_b, cidr_b)):
            self.ip(role, "addr", "add", cidr, "dev", dev)
            self.ip(role, "link", "set", dev, "up")

    def route_default(self, role: str, via: str) -> None:
        self.ip(role, "route", "add", "default", "via", via)

    def forward(self, role: str) -> None:
        """Make ``role`` a router (forwarding is per namespace)."""
        # /proc/sys/net shows the namespace of the writer (no procps needed).
        self.exec_ok(role, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")

    def nft(self, role: str, ruleset: str) -> None:
        run_cmd(["ip", "netns", "exec", self.ns(role), "nft", "-f", "-"], stdin=ruleset)

    def exec_ok(self, role: str, *cmd: str) -> str:
        return run_cmd(["ip", "netns", "exec", self.ns(role), *cmd])

    def run(self, role: str, *cmd: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``role`` to completion (stdout and stderr captured)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns(role), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**_ENV, LAB_MARK: self.tag},
            check=False,
        )

    def spawn(self, role: str, *cmd: str, stderr_to_stdout: bool = True) -> Output:
        """Start ``cmd`` inside ``role``; ``ip netns exec`` execs it, so the PID is its own."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(role), *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if stderr_to_stdout else subprocess.DEVNULL,
            text=True,
            env={**_ENV, LAB_MARK: self.tag},
            # Its own session: a Ctrl-C at the terminal reaches only the lab's
            # script, which then stops these processes in order (close()).
            start_new_session=True,
        )
        self.started.append(proc)
        out = Output(proc)
        threading.Thread(target=out._pump, daemon=True).start()
        return out

    def registry(self, role: str, tmp: Path, listen: str, config: str = "") -> RegistryInNs:
        """Start the real ``registry serve`` in ``role`` (JSON log; admin off)."""
        name = listen.replace(":", "_").replace(".", "_")
        db, cfg = tmp / f"{name}.db", tmp / f"{name}.toml"
        cfg.write_text(config)
        out = self.spawn(
            role,
            exe("registry"),
            "serve",
            "--listen",
            listen,
            "--db",
            str(db),
            "--config",
            str(cfg),
            "--log-format",
            "json",
            "--workers",  # one process: a lab namespace needs no group
            "1",
            "--admin",
            "off",
        )
        return RegistryInNs(out, self.ns(role), db)

    def close(self) -> None:
        """Stop what the lab started (by PID), then delete its namespaces."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for name in reversed(self.namespaces):
            run_cmd(["ip", "netns", "del", name], check=False)
        self.namespaces.clear()


def _remove_stale(kind: str) -> None:
    """Delete ``cbl-<kind>-<pid>-*`` namespaces left by a test process that no longer
    exists (killed before its finally ran). Nothing is killed here."""
    listing = run_cmd(["ip", "netns", "list"], check=False)
    for line in listing.splitlines():
        name = line.split(" ", 1)[0]
        m = re.match(rf"^cbl-{re.escape(kind)}-(\d+)-", name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            run_cmd(["ip", "netns", "del", name], check=False)


def lab_processes(tag: str) -> list[int]:
    """PIDs of live processes started by the lab ``tag`` (marked in their environment)."""
    mark = f"{LAB_MARK}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def netns_lab(kind: str = "nat") -> Iterator[NetnsLab]:
    """A :class:`NetnsLab` that is torn down however the block ends."""
    _remove_stale(kind)
    lab = NetnsLab(f"cbl-{kind}-{os.getpid()}")
    try:
        yield lab
    finally:
        # A second Ctrl-C must not cut the teardown short and leave namespaces behind.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            lab.close()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
