"""Throughput benchmark: registration cycles per second, the registry against baselines.

Run (about 8 minutes with the defaults; ``--quick`` about 2):

    .venv/bin/python bench/bench_throughput.py [--repeat 3] [--duration 5] [--json out.json]

One cycle is what a student does (bench/loadgen.c, one epoll thread in C,
N simulated students on 127.0.0.1, on one of four port ranges in turn, the
ranges this process's own): connect, send
``127.0.0.1:PORT verify=no`` and a newline, accept the registry's callback
on its own listener and read it to EOF, read the reply to EOF (it must start
with ``OK``); the next cycle starts at once (closed loop). The ``echo`` rows
send ``verify=yes`` and echo the callback's nonce.

Servers, each started once, as a user runs it, and left running for the
whole benchmark:

- ``registry``: the shipped ``registry serve`` (the executable of this venv,
  or ``--registry-pythonpath DIR`` for a patched copy), JSON logs to a file,
  SQLite with ``synchronous=FULL``, the admin endpoint on, and only the rate
  limits and the per-source connection cap lifted, since all the load comes
  from 127.0.0.1 (``LIFTED`` below).
- ``threaded``: bench/baselines/naive_threaded.py, the naive
  ``socketserver.ThreadingTCPServer`` (its default listen backlog of 5).
- ``trio``: bench/baselines/minimal_trio.py (``serve_tcp`` and
  ``open_tcp_stream``, no validation, log or storage); ``trio-rawcb`` the same
  with the callback on a raw ``trio.socket``.
- echo rows: ``registry`` and bench/baselines/threaded_registry.py (which
  waits for the echo as the registry does with ``verify=yes``).

Runs are interleaved (for each repeat, each concurrency, each server in turn:
A B C A B C ...) because this host's speed drifts by 15-20 % within an hour,
in two modes: ``pinned`` (every thread of the server on CPU 0, the load
generator on CPU 1) and ``unpinned`` (both free to use both cores). Each
table cell is the median of the runs, with min-max beside it. CPU per cycle
is the server's CPU (every thread of every process of it, from /proc) over
the cycles it completed; steal is what the hypervisor took from CPU 0 or 1,
"others" the CPU every other process of the machine used meanwhile (in % of
one core): on a shared host cycles/s follow it, CPU per cycle much less.

Everything is on loopback, every run is bounded in time (the load generator
refuses more than 60 s), and only the processes started here are stopped, by
their PIDs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# Only what 127.0.0.1 as the one source of all the load would hit; everything
# else (deadlines, policy, bans, store, log) is the embedded default.
LIFTED = """\
[ratelimit]
per_source = "1000000/second"
per_target = "1000000/second"
per_target_port = "1000000/second"
global = "1000000/second"

[limits]
max_connections_per_source = 8192

[tuning]
errors_global = "1000000/second"
"""

PLAIN = " verify=no\n"
_RUNS = itertools.count()
ECHO = " verify=yes\n"


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def pids(self) -> list[int]:
        """The server's process and every descendant (a server of several processes)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    children = Path(f"/proc/{pid}/task/{task}/children").read_text()
                    todo.extend(int(c) for c in children.split())
            except OSError:
                pass
        return found

    def pin(self, cpus: str) -> None:
        for pid in self.pids():
            subprocess.run(
                ["taskset", "-a", "-p", "-c", cpus, str(pid)],
                check=True,
                stdout=subprocess.DEVNULL,
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Kind:
    """One row: which server program, and what the students send."""

    name: str
    server: str  # registry | threaded | trio | trio-rawcb | threaded-echo
    suffix: str = PLAIN
    echo: bool = False


KINDS = {
    "registry": Kind("registry", "registry"),
    "threaded": Kind("threaded", "threaded"),
    "trio": Kind("trio", "trio"),
    "trio-rawcb": Kind("trio-rawcb", "trio-rawcb"),
    "registry-echo": Kind("registry-echo", "registry", ECHO, True),
    "threaded-echo": Kind("threaded-echo", "threaded-echo", ECHO, True),
    # A/B: the registry package from --base-pythonpath (e.g. `git archive main registry`)
    "registry-base": Kind("registry-base", "registry-base"),
    # beside a --registry-workers N row: the same registry as one process
    "registry-1": Kind("registry-1", "registry-1"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(kind: str, workdir: Path, pythonpath: Path | None, workers: int = 1) -> Server:
    if kind == "registry-base":
        if pythonpath is None:
            raise SystemExit("registry-base needs --base-pythonpath DIR")
        base = workdir / "base"
        base.mkdir(exist_ok=True)
        return start_server("registry", base, pythonpath, workers)
    if kind == "registry-1":
        one = workdir / "one"
        one.mkdir(exist_ok=True)
        return start_server("registry", one, pythonpath, 1)
    port = free_port()
    log = workdir / f"{kind}-{port}.log"
    env = dict(os.environ)
    if kind == "registry":
        config = workdir / "lifted.toml"
        config.write_text(f"[server]\nworkers = {workers}\n\n" + LIFTED)
        exe = Path(sys.executable).parent / "registry"
        cmd = [str(exe), "serve", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
        cmd += ["--admin", f"127.0.0.1:{free_port()}", "--db", str(workdir / "registry.db")]
        cmd += ["--log-format", "json"]
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)  # a patched checkout, for A/B runs
    elif kind == "threaded":
        cmd = [sys.executable, str(BENCH / "baselines" / "naive_threaded.py"), str(port)]
    elif kind == "threaded-echo":
        cmd = [sys.executable, str(BENCH / "baselines" / "threaded_registry.py")]
        cmd += ["--port", str(port)]
    else:
        cmd = [sys.executable, str(BENCH / "baselines" / "minimal_trio.py"), str(port)]
        cmd += ["--rawcb"] if kind == "trio-rawcb" else []
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=workdir, env=env
        )
    server = Server(kind, proc, port, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass  # a bare connect: the registry counts it as silent, nothing more
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise SystemExit(f"{kind} did not start; log: {log.read_text(errors='replace')[-2000:]}")


def build_loadgen(workdir: Path) -> Path:
    exe = workdir / "loadgen"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(BENCH / "loadgen.c")], check=True)
    return exe


def run_loadgen(
    loadgen: Path, server: Server, kind: Kind, conc: int, args: argparse.Namespace, pinned: bool
) -> dict[str, object]:
    cmd = ["taskset", "-c", "1"] if pinned else []
    cmd += [str(loadgen), "-p", str(server.port), "-c", str(conc), "-l", kind.name]
    cmd += ["-w", str(args.warmup), "-d", str(args.duration), "-x", kind.suffix]
    cmd += ["-s", ",".join(str(p) for p in server.pids())]
    # Each run listens on other ports than the last three: a callback still in
    # flight from the previous run must not reach this run's students (it was
    # taken for theirs, and their own then came too late: "not verified").
    # Two benchmarks at once on one host must not take each other's callbacks either:
    # each process has its own four ranges, below the ephemeral ports.
    cmd += ["-b", str(10000 + 1000 * (os.getpid() % 20) + 200 * (next(_RUNS) % 4))]
    cmd += ["-E"] if kind.echo else []
    cmd += ["-m", str(args.sources)] if args.sources > 1 else []
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=args.warmup + args.duration + 30
    )
    result: dict[str, object] = json.loads(out.stdout)
    result["mode"] = "pinned" if pinned else "unpinned"
    return result


# --- statistics (pure) ------------------------------------------------------------


def cpu_per_cycle_us(result: dict[str, object]) -> float:
    """The server's CPU time per completed cycle, in microseconds (nan without cycles)."""
    rate = float(result["rate"])  # type: ignore[arg-type]
    cpu = float(result["server_cpu_pct"])  # type: ignore[arg-type]
    if rate <= 0 or cpu < 0:
        return float("nan")
    return cpu / 100.0 / rate * 1e6


def others_pct(result: dict[str, object]) -> float:
    """CPU the rest of the machine used during the run (other processes, not steal),
    in % of one core: both CPUs' busy time less the server's and the load generator's."""
    busy = sum(float(v) for k, v in result.items() if k.endswith("_busy_pct"))  # type: ignore[arg-type]
    ours = float(result["server_cpu_pct"]) + float(result["loadgen_cpu_pct"])  # type: ignore[arg-type]
    return max(0.0, busy - ours)


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the runs' values."""
    return statistics.median(values), min(values), max(values)


def summarize(results: list[dict[str, object]]) -> dict[tuple[str, str, int], dict[str, object]]:
    """Group the runs by (mode, row, concurrency) and take median/min/max of each figure."""
    groups: dict[tuple[str, str, int], list[dict[str, object]]] = {}
    for r in results:
        key = (str(r["mode"]), str(r["label"]), int(r["conc"]))  # type: ignore[call-overload]
        groups.setdefault(key, []).append(r)
    summary = {}
    for key, runs in groups.items():
        row: dict[str, object] = {"runs": len(runs)}
        for field in ("rate", "p50_ms", "p99_ms", "p999_ms"):
            row[field] = spread([float(r[field]) for r in runs])  # type: ignore[arg-type]
        row["cpu_us"] = spread([cpu_per_cycle_us(r) for r in runs])
        row["rss_mb"] = spread([float(r["server_rss_kb"]) / 1024 for r in runs])  # type: ignore[arg-type]
        steal = [
            max(float(r.get("cpu0_steal_pct", 0.0)), float(r.get("cpu1_steal_pct", 0.0)))  # type: ignore[arg-type]
            for r in runs
        ]
        row["steal_pct"] = spread(steal)
        row["others_pct"] = spread([others_pct(r) for r in runs])
        row["errors"] = sum(
            int(r[k])  # type: ignore[call-overload]
            for r in runs
            for k in ("err_connect", "err_reply", "err_other", "timeouts")
        )
        summary[key] = row
    return summary


def _reference(label: str) -> str:
    """The registry row a baseline row is compared with."""
    return "registry-echo" if "echo" in label else "registry"


def fmt(cell: tuple[float, float, float], digits: int = 0) -> str:
    med, lo, hi = cell
    return f"{med:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def table(summary: dict[tuple[str, str, int], dict[str, object]]) -> str:
    lines = [
        "| mode | server | c | cycles/s | p50 ms | p99 ms | p99.9 ms | CPU/cycle µs "
        "| RSS MB | steal % | others % | errors | registry ÷ this |",
        "|---|---|---:|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for (mode, label, conc), row in sorted(summary.items()):
        ref = summary.get((mode, _reference(label), conc))
        ratio = ""
        if ref is not None:
            ratio = f"{ref['rate'][0] / row['rate'][0]:.2f}"  # type: ignore[index]
        lines.append(
            f"| {mode} | {label} | {conc} | {fmt(row['rate'])} "  # type: ignore[arg-type]
            f"| {fmt(row['p50_ms'], 2)} | {fmt(row['p99_ms'], 1)} "  # type: ignore[arg-type]
            f"| {fmt(row['p999_ms'], 1)} | {fmt(row['cpu_us'])} "  # type: ignore[arg-type]
            f"| {row['rss_mb'][0]:.0f} | {row['steal_pct'][0]:.0f} "  # type: ignore[index]
            f"| {row['others_pct'][0]:.0f} "  # type: ignore[index]
            f"| {row['errors']} | {ratio} |"
        )
    return "\n".join(lines)


def ratios(summary: dict[tuple[str, str, int], dict[str, object]]) -> str:
    """registry / baseline cycles/s, per mode and concurrency (the issue's targets)."""
    out = []
    for (mode, label, conc), row in sorted(summary.items()):
        if label in ("registry", "registry-echo"):
            continue
        ref = summary.get((mode, _reference(label), conc))
        if ref is None:
            continue
        r = ref["rate"][0] / row["rate"][0]  # type: ignore[index]
        out.append(f"{mode:8} c={conc:<4} registry / {label}: {r:.2f}x")
    return "\n".join(out)


# --- main ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--prime", type=float, default=3.0, help="untimed seconds per row first")
    parser.add_argument("--conc", default="1,16,128")
    parser.add_argument("--servers", default=",".join(KINDS))
    parser.add_argument("--modes", default="pinned,unpinned")
    parser.add_argument("--quick", action="store_true", help="one repeat of 2 s, pinned only")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--registry-pythonpath", type=Path, help="a patched registry package's parent"
    )
    parser.add_argument("--base-pythonpath", type=Path, help="for the registry-base row (A/B)")
    parser.add_argument(
        "--registry-workers", type=int, default=1, help="server.workers of the registry rows"
    )
    parser.add_argument(
        "--sources",
        type=int,
        default=1,
        help="students spread over this many addresses, 127.0.0.2 on (1: all from 127.0.0.1); "
        "server.workers steers by source, so one source reaches one worker",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.duration, args.modes = 1, 2.0, "pinned"
    if shutil.which("taskset") is None or shutil.which("gcc") is None:
        raise SystemExit("needs taskset and gcc")
    kinds = [KINDS[k] for k in args.servers.split(",")]
    concs = [int(c) for c in args.conc.split(",")]
    modes = args.modes.split(",")
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        loadgen = build_loadgen(work)
        servers: dict[str, Server] = {}
        try:
            for kind in kinds:
                if kind.server not in servers:
                    path = (
                        args.base_pythonpath
                        if kind.server == "registry-base"
                        else args.registry_pythonpath
                    )
                    servers[kind.server] = start_server(
                        kind.server, work, path, args.registry_workers
                    )
            # One untimed run each first: the registry's SQLite WAL grows to its
            # steady size (appends that grow a file cost the filesystem's journal
            # more than overwrites), and every server's code paths are warm.
            for kind in kinds:
                prime = argparse.Namespace(warmup=0.0, duration=args.prime, sources=args.sources)
                run_loadgen(loadgen, servers[kind.server], kind, 16, prime, False)
            for mode in modes:
                pinned = mode == "pinned"
                for server in servers.values():
                    server.pin("0" if pinned else "0-1")
                for rep in range(args.repeat):
                    for conc in concs:
                        for kind in kinds:
                            r = run_loadgen(loadgen, servers[kind.server], kind, conc, args, pinned)
                            r["repeat"] = rep
                            results.append(r)
                            print(
                                f"{mode} #{rep} c={conc} {kind.name}: {r['rate']} /s "
                                f"p99.9 {r['p999_ms']} ms cpu {cpu_per_cycle_us(r):.0f} µs "
                                f"steal {r.get('cpu0_steal_pct')}/{r.get('cpu1_steal_pct')} % "
                                f"errors {r['err_reply']}/{r['timeouts']} {r['reply_sample']!r}",
                                file=sys.stderr,
                                flush=True,
                            )
        finally:
            for server in servers.values():
                server.stop()
    summary = summarize(results)
    print(table(summary))
    print()
    print(ratios(summary))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
