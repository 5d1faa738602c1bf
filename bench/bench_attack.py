"""Attack benchmark: honest registrations while the registry is under attack.

Run (about 10 minutes for both servers; --quick about 2):

    .venv/bin/python bench/bench_attack.py [--quick] [--json results.json]

Host drift: ``--paired`` runs the same honest cycles unloaded on the same
server just before each attack run and reports each run's p99 over its own
reference (steal and neighbours change the unloaded p99 by 2-3x within an
hour on a shared virtual machine). With ``--paired`` the ``none`` row is an
A/A test (two unloaded windows back to back): its ratios show how far the
host's drift alone moves a p99. With ``--repeat`` too, a pooled ratio (p99 of
all the runs' cycles over p99 of all their reference cycles) is shown beside
the median of the runs' ratios.

``--decoy`` points the attacker at a second server of the same kind on the
same host while the honest cycles go to the measured one: the measured server
then does none of the attack's work, and its ratio is what the attack's load
on the machine alone (the attacker, the kernel's loopback, the decoy) does to
a student's latency. The attacker CPU column then includes the decoy's.

A/B a patch: copy the patched ``registry/`` package to DIR and add
``--registry-pythonpath DIR --servers registry`` (``--only NAME,...`` picks
scenarios; ``--registry-config FILE`` runs a profile instead of the defaults).

For each server (the real ``registry serve`` on its embedded defaults, and the
naive thread-per-connection baseline in bench/baselines/threaded_registry.py)
and each scenario, it starts a fresh server process on 127.0.0.1, starts an
attacker process (this same file, ``--role attacker``), lets the attack reach
its steady state, then runs honest student cycles at a fixed rate and records:

- honest success: the reply is ``OK connected`` with ``verified=yes``;
- p50 / p99 / p99.9 latency of the successful cycles (connect to reply);
- the server's peak RSS (VmRSS of its process, sampled every 250 ms);
- the server's open descriptors during the window (median of 1 s samples):
  how many attacking connections it actually holds (a ban holds none);
- p99 under attack / p99 without attack, for the same server;
- CPU during the measured window, in % of one core: the server's, and
  "other" (everything on the machine that is neither the server, the
  attacker nor this process): a busy neighbour makes every latency worse,
  so read the latency columns with that one; and "stolen", the time the
  hypervisor gave this virtual machine's CPUs to others (steal in
  /proc/stat), which slows everything here and is no process's CPU.
  With ``--paired`` the server's CPU over the unloaded reference cycles is
  shown too (``ref``): the difference is what the attack costs the registry,
  a figure steal does not stretch as it stretches latencies.

An honest cycle is what a student does: listen on its own address, register
``ADDR:PORT`` from that address, echo the callback line, read the reply. Each
cycle uses a fresh 127.1.x.y address, so no honest cycle is rate limited by
another. Latencies are measured in this process; the attacker runs in its own
process so its work does not delay the clock that measures the honest path
(all processes still share the machine's cores, as they would on one host).

Scenarios (attack sources are 127.2.x.y / 127.3.x.y / 127.4.x.y; honest ones 127.1.x.y):

- ``none``: no attack (the reference for the p99 ratio).
- ``stall0-N``: N connections that send nothing, spread over N/25 sources
  (under the default per-source cap of 32, the attacker's best spread); when
  the server cuts one, it reconnects 1 s later.
- ``stall1-N``: the same, each sending one byte (``1``) first. The registry
  frames it after the quiet period and refuses it; the attacker reconnects.
  Concentrated on N/25 sources, these attackers are refused again and again
  and banned (``ban_after``): the kernel then drops their SYNs.
- ``wide0-N`` / ``wide1-N``: the same stalls from N sources, one connection
  each: no source is ever over its connection cap. The registry holds all N
  stalls and records each one it cuts; under pressure each such error fines
  its source (``error_fine``), whose next connections are refused
  with a long ``retry_after``, and a source that comes back inside it anyway
  is banned for the rest of that wait (``ban_after_ignored``).

- ``flood``: one source, 64 registrations in flight back to back.
- ``spray``: a new source address per registration, 400 a second on average
  (Poisson arrivals, seeded); the RSS growth over the spray is reported
  (memory must stay flat).

An attacker's connect that gets no SYN-ACK (a banned source) is given up
after ``CONNECT_TIMEOUT`` (3 s) and tried again a second later.

Everything is on loopback; each process started here is stopped by its PID;
every phase has a time bound. Needs Linux (/proc) and a descriptor limit of
at least ~2x the largest stall count (the hard limit is used).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "bench" / "baselines" / "threaded_registry.py"
HONEST_NET = 1
STALL_NET, FLOOD_NET, SPRAY_NET = 2, 3, 4
SOURCES_PER_STALL_GROUP = 25  # connections per attacker source (default cap is 32)
RECONNECT_DELAY = 1.0
CONNECT_TIMEOUT = 3.0  # an attacker's connect with no SYN-ACK (banned): given up, tried again
SPRAY_RATE, SPRAY_SEED = 400.0, 4
CYCLE_TIMEOUT = 15.0


def addr(net: int, n: int) -> str:
    """The n-th address of 127.<net>.0.0/16, skipping .0 and .255 host bytes."""
    return f"127.{net}.{(n // 250) % 250}.{n % 250 + 1}"


# --- the server under test -----------------------------------------------------


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def process_jiffies(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def fd_count(pid: int) -> int:
    """Open descriptors of a process (0 once it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def busy_jiffies() -> tuple[int, int]:
    """(ticks all CPUs spent busy, not idle nor iowait nor stolen; ticks stolen) since boot.

    Steal is time the hypervisor gave our virtual CPUs to someone else: it
    delays every latency here without showing up as any process's CPU."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    steal = values[7] if len(values) > 7 else 0
    return sum(values[:8]) - values[3] - values[4] - steal, steal


@dataclass
class CpuWindow:
    """CPU used during the measured window: the server's, and everything not ours."""

    pids: list[int]  # the server first, then the attacker and this process
    start: float = 0.0
    busy: int = 0
    steal: int = 0
    per_pid: dict[int, int] = field(default_factory=dict)
    used: dict[int, float] = field(default_factory=dict)  # % of one core, after end()

    def begin(self) -> None:
        self.start = time.monotonic()
        self.busy, self.steal = busy_jiffies()
        self.per_pid = {pid: process_jiffies(pid) for pid in self.pids}

    def end(self) -> tuple[float, float, float]:
        """(server CPU %, foreign CPU %, stolen %), in percent of one core over the window."""
        ticks = (time.monotonic() - self.start) * os.sysconf("SC_CLK_TCK")
        used = {pid: process_jiffies(pid) - j for pid, j in self.per_pid.items()}
        busy, steal = busy_jiffies()
        foreign = (busy - self.busy) - sum(used.values())
        self.used = {pid: j / ticks * 100 for pid, j in used.items()}
        return (
            used[self.pids[0]] / ticks * 100,
            max(0.0, foreign / ticks * 100),
            (steal - self.steal) / ticks * 100,
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    kind: str, workdir: Path, registry_config: Path | None, pythonpath: Path | None = None
) -> Server:
    port = free_port()
    log = workdir / f"{kind}-{port}.log"
    if kind == "registry":
        exe = Path(sys.executable).parent / "registry"
        cmd = [str(exe), "serve", "--listen", f"127.0.0.1:{port}", "--admin", "off"]
        cmd += ["--db", str(workdir / f"registry-{port}.db"), "--log-format", "json"]
        if registry_config is not None:
            cmd += ["--config", str(registry_config)]
        ready = '"listening"'
    else:
        cmd = [sys.executable, str(BASELINE), "--port", str(port)]
        ready = "listening on"
    env = dict(os.environ)
    if pythonpath is not None and kind == "registry":
        env["PYTHONPATH"] = str(pythonpath)  # a patched checkout, for A/B runs
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=workdir, env=env
        )
    server = Server(kind, proc, port, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if ready in log.read_text(errors="replace"):
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    server.stop()
    raise SystemExit(f"{kind} did not start; log: {log.read_text(errors='replace')[-2000:]}")


# --- clients -----------------------------------------------------------------------


async def connect_from(src: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((src, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def read_until_eof(stream: trio.abc.ReceiveStream, limit: int = 1 << 16) -> bytes:
    data = b""
    try:
        while len(data) < limit and (chunk := await stream.receive_some(4096)):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return data


async def honest_cycle(port: int, src: str) -> tuple[bool, float, str]:
    """One student cycle: (success, seconds, first words of the reply or the error)."""
    listener = (await trio.open_tcp_listeners(0, host=src))[0]
    target = listener.socket.getsockname()[1]
    if target == port:  # the registry's own port on a loopback address: self_target
        await listener.aclose()
        listener = (await trio.open_tcp_listeners(0, host=src))[0]
        target = listener.socket.getsockname()[1]

    async def echo_one() -> None:
        stream = await listener.accept()
        async with stream:
            line = b""
            while b"\n" not in line and (chunk := await stream.receive_some(4096)):
                line += chunk
            await stream.send_all(line)

    started = trio.current_time()
    reply = b""
    try:
        with trio.fail_after(CYCLE_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo_one)
                stream = await connect_from(src, port)
                async with stream:
                    await stream.send_all(f"{src}:{target}\n".encode())
                    reply = await read_until_eof(stream)
                nursery.cancel_scope.cancel()
    except (trio.TooSlowError, OSError) as e:
        return False, trio.current_time() - started, type(e).__name__
    finally:
        await listener.aclose()
    took = trio.current_time() - started
    words = reply.decode("ascii", "replace").split()
    ok = words[:2] == ["OK", "connected"] and "verified=yes" in words
    summary = " ".join(words[:2]) or "<no reply>"
    if words[:2] == ["BUSY", "rate_limited"]:
        scope = next((w.strip("(") for w in words if w.startswith("(")), "?")
        summary += f" ({scope})"  # which bucket: source, target, target_port, global
    return ok, took, summary


@dataclass
class HonestResult:
    cycles: int = 0
    ok: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    # (seconds into the measured window when the cycle started, latency): the slow
    # ones show whether a tail is spread out or one burst (an expiry wave, say).
    timeline: list[tuple[float, float]] = field(default_factory=list)


async def run_honest(port: int, count: int, rate: float, first: int) -> HonestResult:
    """``count`` cycles started open-loop at ``rate`` per second, each from a fresh address."""
    result = HonestResult()

    async def one(n: int) -> None:
        ok, took, summary = await honest_cycle(port, addr(HONEST_NET, first + n))
        result.cycles += 1
        if ok:
            result.ok += 1
            result.latencies.append(took)
            result.timeline.append((n / rate, took))
        else:
            result.failures[summary] = result.failures.get(summary, 0) + 1

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for n in range(count):
            await trio.sleep_until(start + n / rate)
            nursery.start_soon(one, n)
    return result


# --- the attacker process ----------------------------------------------------------


@dataclass
class AttackStats:
    connects: int = 0
    cuts: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    replies: dict[str, int] = field(default_factory=dict)

    def error(self, e: OSError) -> None:
        key = os.strerror(e.errno) if e.errno else type(e).__name__
        self.errors[key] = self.errors.get(key, 0) + 1

    def reply(self, data: bytes) -> None:
        key = " ".join(data.decode("ascii", "replace").split()[:2]) or "<closed>"
        self.replies[key] = self.replies.get(key, 0) + 1


async def stall_forever(
    port: int, src: str, first: bytes, stats: AttackStats, limit: trio.CapacityLimiter
) -> None:
    # A connect that gets no SYN-ACK (a banned source) is given up after
    # CONNECT_TIMEOUT and tried again, as a determined attacker would: waiting
    # out the kernel's SYN retries (two minutes) would also hold one of the
    # ramp-up's slots and starve the attacker's other sources.
    while True:
        stream: trio.SocketStream | None = None
        try:
            async with limit:
                with trio.move_on_after(CONNECT_TIMEOUT) as timer:
                    stream = await connect_from(src, port)
            if timer.cancelled_caught:
                stats.errors["connect timeout"] = stats.errors.get("connect timeout", 0) + 1
        except OSError as e:
            stats.error(e)
        if stream is None:
            await trio.sleep(RECONNECT_DELAY)
            continue
        stats.connects += 1
        async with stream:
            try:
                if first:
                    await stream.send_all(first)
                data = await read_until_eof(stream)
            except (trio.BrokenResourceError, OSError):
                data = b""
        stats.cuts += 1
        stats.reply(data)
        await trio.sleep(RECONNECT_DELAY)


async def register_once(port: int, src: str, stats: AttackStats) -> None:
    try:
        with trio.fail_after(CYCLE_TIMEOUT):
            stream = await connect_from(src, port)
            stats.connects += 1
            async with stream:
                await stream.send_all(f"{src}:1024\n".encode())
                stats.reply(await read_until_eof(stream))
    except OSError as e:
        stats.error(e)
        await trio.sleep(0.05)
    except trio.TooSlowError:
        stats.errors["timeout"] = stats.errors.get("timeout", 0) + 1


async def attacker(args: argparse.Namespace) -> AttackStats:
    stats = AttackStats()
    with trio.move_on_after(args.duration):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            if args.mode == "stall":
                first = b"1" if args.first_byte else b""
                limit = trio.CapacityLimiter(128)  # connects in progress (the ramp-up)
                for i in range(args.n):
                    src = addr(STALL_NET, i // args.per_source)
                    nursery.start_soon(stall_forever, args.port, src, first, stats, limit)
            elif args.mode == "flood":

                async def loop() -> None:
                    while True:
                        await register_once(args.port, addr(FLOOD_NET, 0), stats)

                for _ in range(64):
                    nursery.start_soon(loop)
            elif args.mode == "spray":
                # Poisson arrivals (seeded), not a metronome: a spray every 2.5 ms
                # exactly phase-locks with the honest cycles (every 20 ms) and the
                # global bucket's refill (every 10 ms), so the honest success rate
                # came out anywhere from 0 % to 67 % by the luck of the phase.
                rng = random.Random(SPRAY_SEED)
                at = trio.current_time()
                for n in range(int(args.duration * SPRAY_RATE)):
                    at += rng.expovariate(SPRAY_RATE)
                    await trio.sleep_until(at)
                    nursery.start_soon(register_once, args.port, addr(SPRAY_NET, n), stats)
    return stats


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            scope.cancel()  # the stats are still printed
            return


def attacker_main(args: argparse.Namespace) -> None:
    raise_nofile()
    if args.nice:
        os.nice(args.nice)
    stats = trio.run(attacker, args)
    print(json.dumps(asdict(stats)), flush=True)


def start_attacker(
    mode: str, port: int, n: int, first_byte: bool, duration: float, per_source: int, nice: int
) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, __file__, "--role", "attacker", "--mode", mode, "--port", str(port)]
    cmd += ["--n", str(n), "--duration", str(duration), "--per-source", str(per_source)]
    cmd += ["--nice", str(nice)]
    if first_byte:
        cmd.append("--first-byte")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)


def stop_attacker(proc: subprocess.Popen[bytes]) -> dict[str, object]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # it stops attacking and prints its stats
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}


# --- one measured run --------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    mode: str | None  # None: no attack
    n: int = 0
    first_byte: bool = False
    warmup: float = 2.0
    per_source: int = SOURCES_PER_STALL_GROUP  # stalls: connections per attacking address


@dataclass
class Row:
    server: str
    scenario: str
    cycles: int
    success: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    rss_peak_mb: float
    rss_start_mb: float
    rss_end_mb: float
    server_cpu: float
    foreign_cpu: float
    failures: dict[str, int]
    attack: dict[str, object]
    ratio: float = math.nan
    slowest: list[tuple[float, float]] = field(default_factory=list)  # (start s, ms)
    p99_runs: list[float] = field(default_factory=list)  # every repetition's p99 (--repeat)
    fds_median: float = math.nan  # the server's open descriptors in the window
    steal: float = math.nan  # CPU the hypervisor took from this machine in the window
    reference_ms: float = math.nan  # --paired: p99 of this run's own unloaded cycles
    # --paired: the server's CPU over those unloaded cycles. CPU time is what the
    # attack costs the registry, and unlike a latency it is not stretched by steal.
    reference_cpu: float = math.nan
    ratio_runs: list[float] = field(default_factory=list)  # --paired: each run's ratio
    attacker_cpu: float = math.nan  # the attacker process's CPU in the window (+ --decoy's)
    # --paired --repeat: the p99 of every run's cycles pooled over the p99 of every
    # reference cycle pooled: 3,000 cycles a side instead of three 1,000-cycle p99s.
    pooled_ratio: float = math.nan
    # Each cycle's seconds (not written to --json: 1,000 numbers a run).
    latencies: list[float] = field(default_factory=list, repr=False)
    reference_latencies: list[float] = field(default_factory=list, repr=False)


def pooled_ratio(runs: list[Row]) -> float:
    """p99 of all the runs' cycles over p99 of all their reference cycles."""
    attacked = sorted(t for r in runs for t in r.latencies)
    reference = sorted(t for r in runs for t in r.reference_latencies)
    if not attacked or not reference:
        return math.nan
    return percentile(attacked, 99) / percentile(reference, 99)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list; nan when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


async def measure(
    server: Server,
    scenario: Scenario,
    honest: int,
    rate: float,
    first_addr: int,
    paired: bool = False,
    attacker_nice: int = 0,
    decoy: Server | None = None,
) -> Row:
    reference_ms = reference_cpu = math.nan
    reference_latencies: list[float] = []
    if paired:
        # The same cycles on the same fresh server just before the attack starts:
        # this run's own reference, taken minutes closer than the "none" row. For
        # "none" itself it is an A/A test: two unloaded windows back to back, whose
        # ratio shows how far this host's drift alone moves a p99.
        ref_cpu = CpuWindow([server.proc.pid, os.getpid()])
        ref_cpu.begin()
        ref = await run_honest(server.port, honest, rate, first_addr + honest)
        reference_cpu = ref_cpu.end()[0]
        reference_latencies = ref.latencies
        reference_ms = percentile(sorted(ref.latencies), 99) * 1000
    duration = scenario.warmup + honest / rate + CYCLE_TIMEOUT + 10
    proc = (
        start_attacker(
            scenario.mode,
            decoy.port if decoy else server.port,
            scenario.n,
            scenario.first_byte,
            duration,
            scenario.per_source,
            attacker_nice,
        )
        if scenario.mode
        else None
    )
    samples: list[float] = []
    fds: list[int] = []
    measuring = False

    async def sample_rss() -> None:
        while True:
            samples.append(server.rss_mb())
            await trio.sleep(0.25)

    async def sample_fds() -> None:
        while True:
            await trio.sleep(1.0)
            if measuring:  # listing 5,000 entries: in a thread, off the clock's loop
                fds.append(await trio.to_thread.run_sync(fd_count, server.proc.pid))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            nursery.start_soon(sample_fds)
            await trio.sleep(scenario.warmup)
            rss_start = server.rss_mb()
            attack_pids = [proc.pid] if proc else []
            attack_pids += [decoy.proc.pid] if decoy else []
            cpu = CpuWindow([server.proc.pid, *attack_pids, os.getpid()])
            cpu.begin()
            measuring = True
            result = await run_honest(server.port, honest, rate, first_addr)
            measuring = False
            server_cpu, foreign_cpu, steal = cpu.end()
            attacker_cpu = sum(cpu.used.get(pid, 0.0) for pid in attack_pids)
            rss_end = server.rss_mb()
            nursery.cancel_scope.cancel()
    finally:
        attack = stop_attacker(proc) if proc else {}
    lat = sorted(result.latencies)
    return Row(
        server=server.name,
        scenario=scenario.name,
        cycles=result.cycles,
        success=result.ok / result.cycles if result.cycles else math.nan,
        p50_ms=percentile(lat, 50) * 1000,
        p99_ms=percentile(lat, 99) * 1000,
        p999_ms=percentile(lat, 99.9) * 1000,
        rss_peak_mb=max(samples, default=math.nan),
        rss_start_mb=rss_start,
        rss_end_mb=rss_end,
        server_cpu=server_cpu,
        foreign_cpu=foreign_cpu,
        attacker_cpu=attacker_cpu,
        steal=steal,
        reference_ms=reference_ms,
        reference_cpu=reference_cpu,
        failures=result.failures,
        attack=attack,
        fds_median=percentile(sorted(fds), 50),
        latencies=result.latencies,
        reference_latencies=reference_latencies,
        slowest=[
            (round(at, 2), round(took * 1000, 1))
            for at, took in sorted(result.timeline, key=lambda t: -t[1])[:15]
        ],
    )


def scenarios(quick: bool) -> list[Scenario]:
    sizes = (1000,) if quick else (1000, 5000)
    out = [Scenario("none", None)]
    for n in sizes:
        # 7 s: the first stalls are cut at the 5 s read deadline and come back 1 s later
        out.append(Scenario(f"stall0-{n}", "stall", n, False, warmup=7.0))
        out.append(Scenario(f"stall1-{n}", "stall", n, True, warmup=4.0))
    if not quick:  # the same stalls, one per address: nobody is refused or banned
        out.append(Scenario("wide0-5000", "stall", 5000, False, warmup=7.0, per_source=1))
        out.append(Scenario("wide1-5000", "stall", 5000, True, warmup=4.0, per_source=1))
    out.append(Scenario("flood", "flood", warmup=3.0))
    out.append(Scenario("spray", "spray", warmup=3.0))
    return out


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def table(rows: list[Row]) -> str:
    head = (
        "| server | scenario | honest cycles | success | p50 ms | p99 ms | p99.9 ms "
        "| p99 / p99 no attack | p99 of each run | peak RSS MB | server fds | server CPU "
        "| attacker CPU | other CPU | stolen | failures |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"
    )
    lines = [head]
    for r in rows:
        fails = ", ".join(f"{k}: {v}" for k, v in sorted(r.failures.items())) or "-"
        lines.append(
            f"| {r.server} | {r.scenario} | {r.cycles} | {r.success * 100:.2f} % "
            f"| {r.p50_ms:.1f} | {r.p99_ms:.1f} | {r.p999_ms:.1f} | {r.ratio:.2f} "
            f"| {' / '.join(f'{p:.1f}' for p in r.p99_runs) or '-'}"
            f"{' (ref ' + format(r.reference_ms, '.1f') + ')' if r.reference_ms == r.reference_ms else ''} "
            f"{'(ratios ' + ' / '.join(map(str, r.ratio_runs)) + ')' if r.ratio_runs else ''}"
            f"{' (pooled ' + format(r.pooled_ratio, '.2f') + ')' if len(r.ratio_runs) > 1 else ''} "
            f"| {r.rss_peak_mb:.0f} | {r.fds_median:.0f} | {r.server_cpu:.0f} %"
            f"{' (ref ' + format(r.reference_cpu, '.0f') + ' %)' if r.reference_cpu == r.reference_cpu else ''} "
            f"| {r.attacker_cpu:.0f} % | {r.foreign_cpu:.0f} % | {r.steal:.0f} % | {fails} |"
        )
    return "\n".join(lines)


def spray_lines(rows: list[Row]) -> str:
    out = []
    for r in rows:
        if r.scenario == "spray":
            out.append(
                f"- {r.server}: RSS {r.rss_start_mb:.1f} MB at the start of the measured spray, "
                f"{r.rss_end_mb:.1f} MB at its end ({r.rss_end_mb - r.rss_start_mb:+.1f} MB); "
                f"attacker requests: {sum(v for v in r.attack.get('replies', {}).values())}"  # type: ignore[union-attr]
            )
    return "\n".join(out)


async def bench(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    servers = args.servers.split(",")
    honest = 200 if args.quick else args.honest
    first_addr = 0
    with tempfile.TemporaryDirectory(prefix="cbl-bench-") as tmp:
        for kind in servers:
            reference = math.nan
            for scenario in scenarios(args.quick):
                if args.only and scenario.name not in args.only.split(","):
                    continue
                if args.warmup is not None and scenario.mode is not None:
                    scenario.warmup = args.warmup
                runs = []
                for _ in range(args.repeat):
                    server = start_server(
                        kind, Path(tmp), args.registry_config, args.registry_pythonpath
                    )
                    decoy = None
                    try:
                        if args.decoy and scenario.mode is not None:
                            decoy = start_server(
                                kind, Path(tmp), args.registry_config, args.registry_pythonpath
                            )
                        runs.append(
                            await measure(
                                server,
                                scenario,
                                honest,
                                args.rate,
                                first_addr,
                                args.paired,
                                args.attacker_nice,
                                decoy,
                            )
                        )
                    finally:
                        server.stop()
                        if decoy is not None:
                            decoy.stop()
                    first_addr += 2 * honest
                    await trio.sleep(1.0)
                # The run with the median p99 stands for the scenario (all its columns
                # from one run); the others' p99s are kept: one host hiccup of a few
                # hundred ms in a 20 s window moves a p99 by itself.
                runs.sort(key=lambda r: r.p99_ms)
                row = runs[len(runs) // 2]
                row.p99_runs = [round(r.p99_ms, 1) for r in runs]
                if scenario.mode is None:
                    reference = row.p99_ms
                row.ratio = row.p99_ms / reference if reference else math.nan
                if args.paired:
                    # Each run against its own reference; the row: the median ratio.
                    ratios = sorted(r.p99_ms / r.reference_ms for r in runs)
                    row.ratio_runs = [round(x, 2) for x in ratios]
                    if scenario.mode is not None:
                        row.ratio = ratios[len(ratios) // 2]
                    row.pooled_ratio = pooled_ratio(runs)
                rows.append(row)
                print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 stalls only, 200 cycles")
    parser.add_argument("--servers", default="registry,threaded")
    parser.add_argument("--only", help="comma-separated scenario names (default: all)")
    parser.add_argument("--honest", type=int, default=1000, help="honest cycles per scenario")
    parser.add_argument("--rate", type=float, default=50.0, help="honest cycles per second")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per scenario; the one with the median p99 is reported (default 1)",
    )
    parser.add_argument(
        "--registry-config", type=Path, help="TOML for the registry (default: none)"
    )
    parser.add_argument(
        "--registry-pythonpath",
        type=Path,
        help="import the registry from this checkout instead (A/B runs of a patch)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="before each attack run, the same honest cycles unloaded on the same server: "
        "the ratio is each run's p99 over its own reference (the median over --repeat), "
        "fair when the host's speed drifts between scenarios",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of attack before the measured window, for every attack scenario "
        "(default: each scenario's own, 2-7 s); a later window shows a later phase",
    )
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="0-19",
        help="run the attacker process at this nice value (default 0)",
    )
    parser.add_argument(
        "--decoy",
        action="store_true",
        help="attack a second server of the same kind on this host instead of the measured "
        "one: what the attack's load on the machine alone does to the honest cycles",
    )
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    # the attacker role (started by the benchmark itself)
    parser.add_argument("--role", choices=("bench", "attacker"), default="bench")
    parser.add_argument("--mode", choices=("stall", "flood", "spray"))
    parser.add_argument("--port", type=int)
    parser.add_argument("--n", type=int, default=0)
    parser.add_argument("--first-byte", action="store_true")
    parser.add_argument("--per-source", type=int, default=SOURCES_PER_STALL_GROUP)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args()
    if args.role == "attacker":
        attacker_main(args)
        return
    if not Path("/proc/self/status").exists():
        raise SystemExit("needs Linux /proc")
    raise_nofile()
    started = time.monotonic()
    rows = trio.run(bench, args)
    print(table(rows))
    print()
    print(spray_lines(rows))
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    if args.json:
        out = [asdict(r) for r in rows]
        for r in out:
            del r["latencies"], r["reference_latencies"]
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
