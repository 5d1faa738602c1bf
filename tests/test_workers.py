"""``server.workers = N``: the real ``registry serve`` as a supervisor and N workers
sharing the ports, each source steered to one worker by a reuseport BPF program.

Traffic goes to 127.0.0.0/8 only: sources are loopback addresses bound by the
clients, and every callback target is a listener this module runs on the
source's own address (the strict policy dials the address it saw). Every wait
is bounded; processes are stopped by PID.
"""

from __future__ import annotations

import ipaddress
import os
import re
import select
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest
import trio

from registry import config as config_mod
from registry.errors import ConfigError
from registry.model import Rate
from registry.net.group import GroupFailed, Supervisor, split_limits
from registry.net.kernel.reuseport import open_group, steering_program, worker_index
from registry.store import Store
from tests.netns import require_netns, run_cmd
from tests.support import RegistryProcess, free_port, http_get, run_registry
from tests.test_lifecycle import _wait_for, notify_socket
from tests.test_store import T0, rec

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
    return f"[tuning]\nworkers = {N}\n" + extra


# --- the steering program, against the kernel -----------------------------------------


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
@pytest.mark.parametrize("n", [2, 3])
def test_kernel_steers_each_source_to_the_socket_worker_index_names(kind: int, n: int) -> None:
    socks = open_group("127.0.0.1", 0, n, kind=kind)
    port = socks[0].getsockname()[1]
    seen: dict[int, int] = {}
    try:
        for last in range(1, 41):
            src = f"127.0.0.{last}"
            with socket.socket(socket.AF_INET, kind) as c:
                c.bind((src, 0))
                if kind == socket.SOCK_STREAM:
                    c.connect(("127.0.0.1", port))
                else:
                    c.sendto(b"x", ("127.0.0.1", port))
                ready, _, _ = select.select(socks, [], [], 5)
                assert len(ready) == 1, src
                if kind == socket.SOCK_STREAM:
                    ready[0].accept()[0].close()
                else:
                    ready[0].recvfrom(16)
            got = socks.index(ready[0])
            assert got == worker_index(ipaddress.ip_address(src), n, 64), src
            seen[got] = seen.get(got, 0) + 1
    finally:
        for s in socks:
            s.close()
    assert sorted(seen) == list(range(n)), f"every worker gets sources: {seen}"


@pytest.mark.parametrize(
    ("a", "b", "prefix", "same"),
    [
        ("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", 64, True),  # one /64: one worker
        ("2001:db8:1:2::1", "2001:db8:1:2::1", 128, True),
        ("::ffff:127.0.0.7", "127.0.0.7", 64, True),  # a mapped IPv4 is that IPv4
    ],
)
def test_worker_index_keys_like_the_rate_limiter(a: str, b: str, prefix: int, same: bool) -> None:
    for n in (2, 3, 4, 7):
        ia = worker_index(ipaddress.ip_address(a), n, prefix)
        ib = worker_index(ipaddress.ip_address(b), n, prefix)
        assert (ia == ib) is same
        assert 0 <= ia < n


def test_worker_index_spreads_sources_and_one_worker_is_index_0() -> None:
    counts = [0, 0, 0, 0]
    for i in range(4000):
        counts[worker_index(ipaddress.ip_address(f"10.{i >> 8}.{i & 255}.1"), 4, 64)] += 1
    assert min(counts) > 800, counts  # about 1000 each
    assert worker_index(ipaddress.ip_address("192.0.2.1"), 1, 64) == 0


def test_steering_program_v6_reads_only_the_prefix_words() -> None:
    loads = [i for i in steering_program(socket.AF_INET6, 2, 64) if i[0] == 0x20]
    assert len(loads) == 2  # the /64: two words
    assert len([i for i in steering_program(socket.AF_INET6, 2, 48) if i[0] == 0x20]) == 2
    assert len([i for i in steering_program(socket.AF_INET6, 2, 128) if i[0] == 0x20]) == 4


# --- config ---------------------------------------------------------------------------


def test_split_limits_divides_global_limits_and_keeps_per_source_ones() -> None:
    cfg = config_mod.loads(
        '[ratelimit]\nglobal = "101/second"\nper_source = "5/minute"\n'
        "[limits]\nmax_connections = 100\nmax_callbacks_in_flight = 9\n"
        "max_connections_per_source = 60\n"
    )
    w = split_limits(cfg, 2)
    assert w.ratelimit.global_ == Rate(51, 1.0)
    assert w.ratelimit.per_source == Rate(5, 60.0)
    assert w.limits.max_callbacks_in_flight == 5
    assert w.limits.max_connections == 60  # never below the per-source cap
    assert w.limits.max_connections_per_source == 60
    assert w.udp.unproven_global == Rate(250, 1.0)  # the profile's 500/second, halved
    assert w.server.admin == "off"  # the supervisor's
    config_mod.validate(w)


@pytest.mark.parametrize(
    ("value", "ok"), [(0, True), (1, True), (64, True), (65, False), (-1, False)]
)
def test_workers_key_is_validated(value: int, ok: bool) -> None:
    text = f"[tuning]\nworkers = {value}\n"
    if ok:
        assert config_mod.loads(text).server.workers == value
    else:
        with pytest.raises(ConfigError, match="tuning.workers"):
            config_mod.loads(text)


# --- the group, end to end ------------------------------------------------------------


def test_per_source_limits_are_exact_across_workers(tmp_path: Path) -> None:
    config = group_config('[ratelimit]\nper_source = "3/minute"\n')
    picks = sources_by_worker(per_worker=2)
    with run_registry(tmp_path, config=config) as reg:
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


def test_sigkill_of_a_worker_loses_no_acknowledged_row_and_it_is_restarted(
    tmp_path: Path,
) -> None:
    config = group_config(
        '[ratelimit]\nper_source = "100000/second"\nper_target = "100000/second"\n'
        'per_target_port = "100000/second"\nglobal = "100000/second"\n'
    )
    src = sources_by_worker()[0][0]
    replies: list[bytes] = []
    with echo_target(src) as tport, run_registry(tmp_path, config=config) as reg:
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


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    picks = {seat: s[0] for seat, s in sources_by_worker().items()}
    with run_registry(tmp_path, config=group_config('[ratelimit]\nper_source = "1/hour"\n')) as reg:
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


def test_one_admin_endpoint_counts_every_workers_registrations(tmp_path: Path) -> None:
    picks = {seat: s[0] for seat, s in sources_by_worker().items()}
    with run_registry(tmp_path, config=group_config(), admin="127.0.0.1:0") as reg:
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


def test_group_speaks_sd_notify_for_all_workers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    with notify_socket(port) as (path, messages):
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        with run_registry(tmp_path, listen=(f"127.0.0.1:{port}",), config=group_config()) as reg:
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


def test_workers_of_a_killed_supervisor_drain_and_exit(tmp_path: Path) -> None:
    with run_registry(tmp_path, config=group_config()) as reg:
        pids = [e["pid"] for e in reg.wait_event("worker_started", count=N)]
        reg.wait_event("worker_ready", count=N)
        reg.proc.send_signal(signal.SIGKILL)
        assert reg.proc.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(_gone(p) for p in pids):
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), "a worker outlived its supervisor"
        assert len(reg.wait_event("stopped", count=N)) == N  # each drained, not killed


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


def test_store_after_reads_other_writers_rows_in_commit_order_once(tmp_path: Path) -> None:
    """The supervisor's feed: rows two writers commit, each seen once, in commit order,
    even when an older received_at commits later."""
    path = str(tmp_path / "r.db")
    a, b, reader = Store.open(path), Store.open(path), Store.open(path)
    try:
        assert reader.last_seq() == 0
        a.record(rec(1, received_at=T0 + 5))
        start = reader.last_seq()
        b.record(rec(2, received_at=T0 + 9))
        a.record(rec(3, received_at=T0 + 1))  # received earlier, committed later
        seq, rows = reader.after(start)
        assert [r.id for r in rows] == ["r2", "r3"]
        assert reader.after(seq) == (seq, [])
        b.record(rec(4))
        seq2, rows = reader.after(seq, limit=5)
        assert [r.id for r in rows] == ["r4"] and seq2 > seq
        assert [r.id for r in reader.after(0, limit=2)[1]] == ["r1", "r2"]
    finally:
        for s in (a, b, reader):
            s.close()


_V6_PROBE = """
import ipaddress, select, socket, sys
from registry.net.kernel.reuseport import attach_steering, open_group, worker_index
n, prefix = int(sys.argv[1]), int(sys.argv[2])
socks = open_group("::1", 0, n, kind=socket.SOCK_STREAM, v6_prefix=128)
attach_steering(socks[0], n, prefix)  # what a reload of ipv6_prefix does: it replaces
port = socks[0].getsockname()[1]
for src in sys.argv[3:]:
    with socket.socket(socket.AF_INET6) as c:
        c.bind((src, 0))
        c.connect(("::1", port))
        ready, _, _ = select.select(socks, [], [], 5)
        ready[0].accept()[0].close()
        print(src, socks.index(ready[0]), worker_index(ipaddress.ip_address(src), n, prefix))
"""


@pytest.mark.parametrize("prefix", [64, 48])
def test_kernel_steers_ipv6_sources_by_their_prefix(prefix: int) -> None:
    """IPv6 sources from many networks, in a namespace of the test's own (only ::1 is on
    the host's loopback): the kernel's choice is worker_index's, and one network's
    addresses share a worker, after the program was replaced (a reload's re-attach)."""
    require_netns("workers")
    ns = f"workers-v6-{os.getpid()}-{prefix}"
    sources = [f"2001:db8:{a:x}:{b:x}::{c:x}" for a in (1, 2) for b in range(1, 9) for c in (1, 2)]
    run_cmd(["ip", "netns", "add", ns])
    try:
        run_cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        for src in sources:
            run_cmd(["ip", "-n", ns, "addr", "add", f"{src}/128", "dev", "lo", "nodad"])
        out = run_cmd(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _V6_PROBE, "3", str(prefix), *sources]
        )
    finally:
        run_cmd(["ip", "netns", "del", ns], check=False)
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == len(sources)
    assert all(got == expected for _, got, expected in rows), rows
    assert len({got for _, got, _ in rows}) > 1, "the sources all reached one worker"
    by_net: dict[str, set[str]] = {}
    for src, got, _ in rows:
        net = ipaddress.ip_network(f"{src}/{prefix}", strict=False)
        by_net.setdefault(str(net), set()).add(got)
    assert all(len(workers) == 1 for workers in by_net.values()), by_net


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


def test_a_restarted_worker_starts_without_its_predecessors_bans(tmp_path: Path) -> None:
    """The socket outlives the worker, and so would its kernel filter: the restarted
    worker takes it off (its ban list is empty), so no source stays banned for nothing."""
    config = group_config(
        'refusal_delay = "50ms"\nmax_refusal_delay = "50ms"\nban_after = 2\n'
        '[ratelimit]\nper_source = "1/hour"\n'
    )
    src = sources_by_worker()[0][0]
    with echo_target(src) as tport, run_registry(tmp_path, config=config) as reg:
        for _ in range(3):  # served once, then refused twice: banned
            register(reg.port, src, tport)
        (banned,) = reg.wait_event("source_banned")
        assert banned["worker"] == 0 and banned["source"] == src
        deadline = time.monotonic() + 5
        while _connects(reg.port, src) and time.monotonic() < deadline:
            time.sleep(0.1)  # the filter is updated on the ban task's next turn
        assert not _connects(reg.port, src), "the ban did not reach the kernel"
        pid = next(e["pid"] for e in reg.events("worker_started") if e["worker"] == 0)
        os.kill(pid, signal.SIGKILL)
        reg.wait_event("worker_ready", count=N + 1)
        assert _connects(reg.port, src, timeout=5.0)  # (its token: the next one is BUSY)
        assert register(reg.port, src, tport).startswith(b"BUSY rate_limited")
        assert reg.stop() == 0
