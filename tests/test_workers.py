"""``server.workers = N``: the real ``registry serve`` as a supervisor and N workers
sharing the ports, each source steered to one worker by a reuseport BPF program.

Traffic goes to 127.0.0.0/8 only: sources are loopback addresses bound by the
clients, and every callback target is a listener this module runs on the
source's own address (the strict policy dials the address it saw). Every wait
is bounded; processes are stopped by PID.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, closing, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from registry import config as config_mod
from registry.errors import ConfigError
from registry.group import (
    BANS_SENT,
    GroupFailed,
    Supervisor,
    merged_bans,
    report_probes,
    resolved_workers,
    restart_delay,
    summed_probes,
)
from registry.metrics import Probes
from registry.net.kernel.reuseport import worker_index
from registry.net.sdnotify import Notifier
from tests.support import RegistryProcess, free_port, http_get, run_registry
from tests.test_lifecycle import _wait_for, notify_socket

slow = pytest.mark.slow  # a supervisor and its workers

N = 2


def sources_by_worker(n: int = N, per_worker: int = 1) -> dict[int, list[str]]:
    """Loopback sources the kernel steers to each worker (the hash, in Python)."""
    found: dict[int, list[str]] = {i: [] for i in range(n)}
    for last in range(2, 250):
        src = f"127.0.0.{last}"
        seat = worker_index(ipaddress.ip_address(src), n, 64)
        if len(found[seat]) < per_worker:
            found[seat].append(src)
        if all(len(v) == per_worker for v in found.values()):
            return found
    raise AssertionError(found)


@contextmanager
def echo_target(host: str) -> Iterator[int]:
    """A callback target on ``host`` that echoes the CALLBACK line; yields its port."""
    stop = threading.Event()
    sock = socket.socket()
    sock.bind((host, 0))
    sock.listen(256)
    sock.settimeout(0.1)

    def conn(c: socket.socket) -> None:
        with c:
            c.settimeout(5)
            data = b""
            try:
                while b"\n" not in data and (chunk := c.recv(4096)):
                    data += chunk
                c.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                c, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=conn, args=(c,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        sock.close()


def register(port: int, src: str, target_port: int, timeout: float = 10.0) -> bytes:
    """One registration from ``src`` for its own ``target_port``; the whole reply."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"{src}:{target_port}\n".encode())
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        return data


def workers_of(reg: RegistryProcess, event: str = "registration") -> dict[str, set[int]]:
    """peer host -> the workers whose log lines name it."""
    out: dict[str, set[int]] = {}
    for e in reg.events(event):
        peer = str(e.get("peer", "")).rsplit(":", 1)[0]
        out.setdefault(peer, set()).add(e["worker"])
    return out


def assert_whole_lines(reg: RegistryProcess) -> None:
    """The group's processes share stderr: every line must still be one JSON object."""
    for line in list(reg.raw):
        assert line.startswith("{") and line.endswith("}"), line


def group_config(extra: str = "") -> str:
    return "[tuning]\n" + extra


def run_group(tmp_path: Path, **kwargs: Any) -> AbstractContextManager[RegistryProcess]:
    return run_registry(tmp_path, "--workers", str(N), **kwargs)


# --- the group, end to end ------------------------------------------------------------


@slow
def test_per_source_limits_are_exact_across_workers(tmp_path: Path) -> None:
    config = group_config(
        # refusals answered at once: their hold is tested in test_door.py and test_attack.py
        'refusal_delay = "0s"\nmax_refusal_delay = "0s"\n[ratelimit]\nper_source = "3/minute"\n'
    )
    picks = sources_by_worker(per_worker=2)
    with run_group(tmp_path, config=config) as reg:
        for sources in picks.values():
            for src in sources:
                with echo_target(src) as tport:
                    replies = [register(reg.port, src, tport) for _ in range(5)]
                codes = [r.split(b" ", 2)[:2] for r in replies]
                assert codes[:3] == [[b"OK", b"connected"]] * 3, (src, replies)
                assert all(c[0] == b"BUSY" for c in codes[3:]), (src, replies)
        reg.wait_event("registration", count=12)  # the BUSY ones are refused at the door
        served = workers_of(reg)
        for seat, sources in picks.items():
            for src in sources:
                assert served[src] == {seat}, (src, served)
        assert_whole_lines(reg)
        assert reg.stop() == 0
    reg.wait_event("stopped")


@slow
def test_sigkill_of_a_worker_loses_no_acknowledged_row_and_it_is_restarted(
    tmp_path: Path,
) -> None:
    config = group_config(
        '[ratelimit]\nper_source = "100000/second"\nper_target = "100000/second"\n'
        'per_target_port = "100000/second"\nglobal = "100000/second"\n'
    )
    src = sources_by_worker()[0][0]
    replies: list[bytes] = []
    with echo_target(src) as tport, run_group(tmp_path, config=config) as reg:
        pid = next(e["pid"] for e in reg.events("worker_started") if e["worker"] == 0)
        end = time.monotonic() + 3.0
        killed = False

        def client() -> None:
            while time.monotonic() < end:
                try:
                    replies.append(register(reg.port, src, tport))
                except OSError:
                    replies.append(b"")

        clients = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for c in clients:
            c.start()
        while time.monotonic() < end - 2.0:
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        killed = True
        for c in clients:
            c.join(timeout=30)
        assert killed and not any(c.is_alive() for c in clients)
        (exited,) = reg.wait_event("worker_exited")
        assert exited["worker"] == 0 and exited["status"] == -signal.SIGKILL
        again = [e for e in reg.wait_event("worker_started", count=N + 1) if e["restarts"]]
        assert again[0]["worker"] == 0 and again[0]["pid"] != pid
        reg.wait_event("worker_ready", count=N + 1)
        assert register(reg.port, src, tport).startswith(b"OK connected")
        assert reg.stop() == 0
    acknowledged = {
        m.group(1).decode() for r in replies if (m := re.search(rb"\bid=([0-9a-f]+)", r))
    }
    assert len(acknowledged) >= 8, f"the flood barely ran: {len(replies)} replies"
    with closing(sqlite3.connect(tmp_path / "registry.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0] for r in db.execute("SELECT id FROM registrations")}
    missing = acknowledged - rows
    assert not missing, f"{len(missing)} acknowledged registrations lost"


@slow
def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    picks = {seat: s[0] for seat, s in sources_by_worker().items()}
    # refusals answered at once: the hold of a refusal has its own tests (test_door.py)
    first = group_config('refusal_delay = "0s"\n[ratelimit]\nper_source = "1/hour"\n')
    with run_group(tmp_path, config=first) as reg:
        path = tmp_path / "registry.toml"
        with echo_target(picks[0]) as p0, echo_target(picks[1]) as p1:
            ports = {0: p0, 1: p1}
            for seat, src in picks.items():
                assert register(reg.port, src, ports[seat]).startswith(b"OK connected")
                assert register(reg.port, src, ports[seat]).startswith(b"BUSY")
            path.write_text(group_config('[ratelimit]\nper_source = "100/second"\n'))
            reg.proc.send_signal(signal.SIGHUP)
            reg.wait_event("group_reloaded")
            assert {e["worker"] for e in reg.events("reloaded")} == set(range(N))
            assert_whole_lines(reg)
            time.sleep(0.05)  # one token of the new rate refills the old debt
            for seat, src in picks.items():
                assert register(reg.port, src, ports[seat]).startswith(b"OK connected"), src
        assert reg.stop() == 0
        assert len(reg.events("stopped")) == N + 1  # each worker drained, then the supervisor


@slow
def test_one_admin_endpoint_counts_every_workers_registrations(tmp_path: Path) -> None:
    picks = {seat: s[0] for seat, s in sources_by_worker().items()}
    with run_group(tmp_path, config=group_config(), admin="127.0.0.1:0") as reg:
        assert reg.admin is not None
        admin_port = int(reg.admin.rsplit(":", 1)[1])
        for src in picks.values():
            with echo_target(src) as tport:
                assert register(reg.port, src, tport).startswith(b"OK connected")
        deadline = time.monotonic() + 10
        total = 0.0
        while time.monotonic() < deadline:
            status, body = http_get(admin_port, "/metrics")
            assert status == 200
            total = sum(
                float(m.group(1))
                for m in re.finditer(rb"^registry_registrations_total\{[^}]*\} (\S+)$", body, re.M)
            )
            if total >= N:
                break
            time.sleep(0.1)
        assert total == N, body.decode()
        status, body = http_get(admin_port, "/api/registrations")
        assert status == 200 and all(src.encode() in body for src in picks.values())
        assert reg.stop() == 0


@slow
def test_group_speaks_sd_notify_for_all_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    with notify_socket(port) as (path, messages):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        with run_group(tmp_path, listen=(f"127.0.0.1:{port}",), config=group_config()) as reg:
            ready = _wait_for(messages, "READY=1")
            assert _wait_for(messages, "PROBE=open") == ready + 1, messages
            assert len(reg.wait_event("worker_ready", count=N)) == N
            time.sleep(0.5)  # the supervisor's watchdog: every 100 ms
            assert len([m for _, m in messages if m == "WATCHDOG=1"]) >= 3, messages
            # the workers' own READY=1 (and probes) go to the supervisor, never here
            assert sum("READY=1" in m.splitlines() for _, m in messages) == 1, messages
            assert not [m for _, m in messages if "X_PROBES" in m]

            mark = len(messages)
            reg.proc.send_signal(signal.SIGHUP)
            reloading = _wait_for(messages, "RELOADING=1", after=mark)
            again = _wait_for(messages, "READY=1", after=reloading + 1)
            assert len(reg.events("reloaded")) == N, "READY=1 only once every worker reloaded"
            assert again > reloading

            mark = len(messages)
            reg.proc.send_signal(signal.SIGTERM)
            _wait_for(messages, "STOPPING=1", after=mark)
            assert reg.proc.wait(timeout=30) == 0


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


@slow
def test_workers_of_a_killed_supervisor_drain_and_exit(tmp_path: Path) -> None:
    with run_group(tmp_path, config=group_config()) as reg:
        pids = [e["pid"] for e in reg.wait_event("worker_started", count=N)]
        reg.wait_event("worker_ready", count=N)
        reg.proc.send_signal(signal.SIGKILL)
        assert reg.proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), "a worker outlived its supervisor"
        assert len(reg.wait_event("stopped", count=N)) == N  # each drained, not killed


@slow
def test_a_worker_that_cannot_start_stops_the_group_with_its_status(tmp_path: Path) -> None:
    """Workers whose first start fails (here: their --config is missing, exit 78) make
    the supervisor stop the group with that status instead of restarting them forever."""
    cfg = config_mod.from_dict(
        {"server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": str(tmp_path / "r.db")}}
    )
    argv = ["serve", "--config", str(tmp_path / "missing.toml"), "--log-format", "json"]
    with pytest.raises(GroupFailed) as failed:
        trio.run(Supervisor(cfg, N, argv).run)
    assert failed.value.status == 78


def _connects(port: int, src: str, timeout: float = 1.0) -> bool:
    """Whether a handshake from ``src`` completes (a banned source's SYN is dropped)."""
    with socket.socket() as s:
        s.settimeout(timeout)
        s.bind((src, 0))
        try:
            s.connect(("127.0.0.1", port))
        except TimeoutError:
            return False
        return True


@slow
def test_a_restarted_worker_starts_without_its_predecessors_bans(tmp_path: Path) -> None:
    """The socket outlives the worker, and so would its kernel filter: the restarted
    worker takes it off (its ban list is empty), so no source stays banned for nothing."""
    config = group_config(
        'refusal_delay = "50ms"\nmax_refusal_delay = "50ms"\nban_after = 2\n'
        '[ratelimit]\nper_source = "1/hour"\n'
    )
    src = sources_by_worker()[0][0]
    with echo_target(src) as tport, run_group(tmp_path, config=config) as reg:
        for _ in range(3):  # served once, then refused twice: banned
            register(reg.port, src, tport)
        (banned,) = reg.wait_event("source_banned")
        assert banned["worker"] == 0 and banned["source"] == src
        deadline = time.monotonic() + 5
        while (connected := _connects(reg.port, src)) and time.monotonic() < deadline:
            time.sleep(0.1)  # the filter is updated on the ban task's next turn
        assert not connected, "the ban did not reach the kernel"
        pid = next(e["pid"] for e in reg.events("worker_started") if e["worker"] == 0)
        os.kill(pid, signal.SIGKILL)
        reg.wait_event("worker_ready", count=N + 1)
        assert _connects(reg.port, src, timeout=5.0)  # (its token: the next one is BUSY)
        assert register(reg.port, src, tport).startswith(b"BUSY rate_limited")
        assert reg.stop() == 0


@slow
def test_banned_sources_of_every_worker_are_in_the_one_api_bans(tmp_path: Path) -> None:
    """The workers hold the bans; the supervisor's /api/bans lists each worker's."""
    config = group_config(
        'refusal_delay = "50ms"\nmax_refusal_delay = "50ms"\nban_after = 2\n'
        '[ratelimit]\nper_source = "1/hour"\n'
    )
    picks = {seat: s[0] for seat, s in sources_by_worker().items()}
    with run_group(tmp_path, config=config, admin="127.0.0.1:0") as reg:
        assert reg.admin is not None
        admin_port = int(reg.admin.rsplit(":", 1)[1])
        for src in picks.values():
            with echo_target(src) as tport:
                for _ in range(3):  # served once, then refused twice: banned
                    register(reg.port, src, tport)
        banned = reg.wait_event("source_banned", count=N)
        assert {(e["worker"], e["source"]) for e in banned} == set(picks.items())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = http_get(admin_port, "/api/bans")
            report = json.loads(body)
            if report["banned"] == N:
                break
            time.sleep(0.2)  # the workers report every second
        assert status == 200 and report["banned"] == N and report["total"] == N, report
        assert {b["source"] for b in report["bans"]} == set(picks.values()), report
        assert all(0 < b["seconds_left"] <= 450 for b in report["bans"]), report  # 5 min, +50 %
        assert report["ban_after"] == 2 and report["kernel_filter"] in ("ebpf", "classic")
        assert report["silent_drop"]["after"] == 50  # the group's, not a worker's half
        status, metrics = http_get(admin_port, "/metrics")
        assert re.search(rb"^registry_banned_sources 2(\.0)?$", metrics, re.M), metrics.decode()
        assert reg.stop() == 0


# --- the supervisor's decisions, without processes -------------------------------------


@pytest.mark.parametrize(
    ("previous", "lived", "delay"),
    [
        (0.0, 0.5, 1.0),  # the first quick death: 1 s
        (1.0, 0.5, 2.0),
        (2.0, 59.9, 4.0),
        (32.0, 1.0, 60.0),  # up to a minute
        (60.0, 1.0, 60.0),
        (60.0, 60.0, 0.0),  # a long life: at once, and the next quick death waits 1 s again
        (0.0, 3600.0, 0.0),
    ],
)
def test_restart_delay(previous: float, lived: float, delay: float) -> None:
    assert restart_delay(previous, lived) == delay


class _FakeProcess:
    """A worker process that lives ``life`` virtual seconds, then exits 1."""

    pid = 4242
    returncode: int | None = None

    def __init__(self, life: float) -> None:
        self.life = life

    async def wait(self) -> int:
        await trio.sleep(self.life)
        self.returncode = 1
        return 1

    def send_signal(self, sig: int) -> None:
        raise AssertionError("no signal expected")


async def test_a_dying_worker_is_restarted_after_1_2_4_s_and_at_once_after_a_long_life(
    autojump_clock: trio.abc.Clock,
) -> None:
    lives = [0.5, 0.5, 0.5, 120.0, 0.5, 0.5]
    starts: list[float] = []
    sup = Supervisor(config_mod.DEFAULT, 1, ["serve"])

    async def spawn(cmd: list[str], **kwargs: object) -> _FakeProcess:
        starts.append(trio.current_time())
        if len(starts) > len(lives):
            sup.stopping = True  # the group stops while this one runs
            return _FakeProcess(0.0)
        return _FakeProcess(lives[len(starts) - 1])

    sup.spawn = spawn  # type: ignore[assignment]
    worker = sup.workers[0]
    worker.ever_ready = True  # it was ready once: a death is restarted, not fatal
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sup._keep, worker, [], [], "/nonexistent", nursery.cancel_scope)
    waits = [b - (a + life) for a, b, life in zip(starts, starts[1:], lives, strict=False)]
    assert waits == [1.0, 2.0, 4.0, 0.0, 1.0, 2.0]
    assert worker.restarts == len(lives)


def _report(*bans: tuple[str, float, float], silent: float = 0.0) -> dict:
    return {
        "banned": len(bans),
        "kernel_filtered": 3,
        "kernel_filter": "ebpf",
        "total": len(bans) + 1,
        "skipped_list_full": 0,
        "ban_after": 10,
        "silent_drop": {"active": silent > 0, "seconds_left": silent, "after": 25},
        "bans": [
            {"source": s, "refusals": 10, "banned_for_s": since, "seconds_left": left}
            for s, since, left in bans
        ],
    }


def test_merged_bans_sums_the_workers_and_ages_each_report() -> None:
    reports = [
        (0.0, _report(("192.0.2.1", 5.0, 55.0))),
        (1.5, _report(("192.0.2.2", 20.0, 40.0), ("192.0.2.3", 59.0, 1.0), silent=30.0)),
    ]
    out = merged_bans(reports, after=50)
    assert out["banned"] == 3 and out["total"] == 5 and out["kernel_filtered"] == 6
    assert out["kernel_filter"] == "ebpf" and out["ban_after"] == 10
    assert out["silent_drop"] == {"active": True, "seconds_left": 28.5, "after": 50}
    # aged by its report's age, oldest first; a ban that ran out since is gone
    assert [(b["source"], b["banned_for_s"], b["seconds_left"]) for b in out["bans"]] == [
        ("192.0.2.2", 21.5, 38.5),
        ("192.0.2.1", 5.0, 55.0),
    ]
    assert merged_bans([], after=50)["bans"] == []


@pytest.mark.parametrize(
    ("text", "args", "workers"),
    [
        ("", [], 0),  # "internet", the default profile: one per core
        ('[limits]\nprofile = "classroom"\n', [], 1),
        ('[limits]\nprofile = "classroom"\n[server]\nworkers = 3\n', [], 3),
        ('[limits]\nprofile = "internet"\n[server]\nworkers = 2\n', ["--workers", "1"], 1),
        ("", ["--workers", "0"], 0),
    ],
)
def test_workers_default_follows_the_profile_and_the_command_line_wins(
    tmp_path: Path, text: str, args: list[str], workers: int
) -> None:
    from registry.cli import build_parser, load_config

    path = tmp_path / "registry.toml"
    path.write_text(text)
    parsed = build_parser().parse_args(["serve", "--config", str(path), *args])
    assert load_config(parsed).server.workers == workers


def test_workers_on_the_command_line_are_checked() -> None:
    from registry.cli import build_parser, load_config

    with pytest.raises(ConfigError, match="server.workers"):
        load_config(build_parser().parse_args(["serve", "--workers", "65"]))


async def test_a_snapshot_with_the_most_bans_fits_one_datagram(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A worker under a ban wave still reaches its supervisor: its snapshot (bans cut
    to BANS_SENT, the longest sources) is one sd_notify datagram, read whole."""
    bans = [(f"2001:db8:{i:x}:ffff::/64", 12345.6, 12345.6) for i in range(3 * BANS_SENT)]
    report = _report(*bans)
    workdir = tempfile.mkdtemp(prefix="grp-")  # short: a unix socket path has 108 bytes
    try:
        path = os.path.join(workdir, "0")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        await sock.bind(path)
        sup = Supervisor(config_mod.DEFAULT, 1, ["serve"])
        with sock, trio.move_on_after(0.5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup._notices, sup.workers[0], sock)
                notifier = Notifier({"NOTIFY_SOCKET": path})
                nursery.start_soon(report_probes, notifier, Probes(), lambda limit: dict(report))
    finally:
        shutil.rmtree(workdir)
    got = sup.snapshots[0]["bans"]
    assert got["banned"] == 3 * BANS_SENT and len(got["bans"]) == BANS_SENT
    assert got["bans"][0] == report["bans"][0]


@slow
def test_a_bad_file_on_sighup_keeps_every_workers_config(tmp_path: Path) -> None:
    picks = {seat: s[0] for seat, s in sources_by_worker().items()}
    first = group_config('refusal_delay = "0s"\n[ratelimit]\nper_source = "1/hour"\n')
    with run_group(tmp_path, config=first) as reg:
        (tmp_path / "registry.toml").write_text('[ratelimit]\nper_source = "often"\n')
        reg.proc.send_signal(signal.SIGHUP)
        reg.wait_event("group_reloaded")
        failed = reg.wait_event("reload_failed", count=N + 1)  # the supervisor and each worker
        assert sorted(str(e.get("worker", "-")) for e in failed) == ["-", "0", "1"]
        assert not reg.events("reloaded")
        for seat, src in picks.items():
            with echo_target(src) as tport:
                assert register(reg.port, src, tport).startswith(b"OK connected"), seat
                assert register(reg.port, src, tport).startswith(b"BUSY rate_limited"), seat
        assert reg.stop() == 0


def test_summed_probes_add_up_every_workers_latest_snapshot() -> None:
    def snapshot(n: int, refusals: dict[str, int], dropped: dict[str, int], bans: dict) -> dict:
        gauges = ("open_connections", "callbacks_in_flight", "callbacks_waiting", "limiter_entries")
        return dict.fromkeys(gauges, n) | {
            "door_refusals": refusals,
            "udp_dropped": dropped,
            "bans": bans,
        }

    snapshots = {
        0: snapshot(1, {"rate_limited": 2}, {}, _report(("192.0.2.1", 1.0, 9.0))),
        1: snapshot(2, {"rate_limited": 1, "total": 4}, {"reply": 3}, _report(silent=5.0)),
    }
    probes = summed_probes(snapshots, lambda: False, lambda: "strict")
    assert probes.open_connections() == probes.limiter_entries() == 3
    assert probes.door_refusals() == {"rate_limited": 3, "total": 4}
    assert probes.udp_dropped() == {"reply": 3}
    assert (probes.bans_active(), probes.bans_total(), probes.silent_drop()) == (1, 3, True)
    del snapshots[1]  # a worker that died: its successor starts afresh
    assert probes.open_connections() == 1 and probes.silent_drop() is False


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 2), (48, 48), (128, 64)])
def test_one_worker_per_core_this_process_may_use_at_most_64(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert resolved_workers(config_mod.DEFAULT) == workers
    assert resolved_workers(config_mod.loads("[server]\nworkers = 3\n")) == 3
