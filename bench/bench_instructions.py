"""Instructions per registration, counted by callgrind: an A/B a shared host cannot blur.

    .venv/bin/python bench/bench_instructions.py --base-pythonpath /tmp/base [--conc 4,16]

CPU time per cycle moves with the neighbours (caches, frequency, the SMT
sibling): on a host shared with other sessions the same tree measured 487 to
638 µs per cycle at c=16 within one run of bench_throughput.py. The count of
instructions the registry executes per registration hardly moves, so a change
is compared by it. The registry runs as bench_throughput.py starts it (JSON
logs to a file, SQLite with synchronous=FULL, the admin endpoint, the rate
limits lifted), under ``valgrind --tool=callgrind --instr-atstart=no``;
after a warm-up, counting is switched on for a window of load from
bench/loadgen.c (c students, ``verify=no``), and the figure is the count over
the cycles completed. User space only: the kernel's part (loopback TCP,
fdatasync) is in bench_throughput.py's CPU per cycle. Rows alternate (base,
this tree, base, ...); a cell is the median of the repeats. Counting with no
load costs a few thousand instructions a second, against ~1.5 million per
registration: not subtracted.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import BENCH, LIFTED, PLAIN, build_loadgen, free_port  # noqa: E402


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def count(
    loadgen: Path, work: Path, row: str, path: Path | None, conc: int, window: float
) -> float:
    """Instructions per registration of one server (a registry, or trio) under callgrind."""
    port, out = free_port(), work / f"cg-{time.monotonic_ns()}.out"
    (work / "lifted.toml").write_text("[server]\nworkers = 1\n\n" + LIFTED)
    env = dict(os.environ, **({"PYTHONPATH": str(path)} if path else {}))
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    if row == "trio":
        cmd += [sys.executable, str(BENCH / "baselines" / "minimal_trio.py"), str(port)]
    else:
        cmd += [sys.executable, str(Path(sys.executable).parent / "registry"), "serve"]
        cmd += ["--config", str(work / "lifted.toml"), "--listen", f"127.0.0.1:{port}"]
        cmd += ["--admin", f"127.0.0.1:{free_port()}", "--db", str(work / f"{port}.db")]
        cmd += ["--log-format", "json"]
    with (work / f"{port}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, cwd=work)
    try:
        load = [str(loadgen), "-p", str(port), "-c", str(conc), "-l", "registry", "-x", PLAIN]
        load += ["-s", str(proc.pid), "-w", "0"]
        deadline = time.monotonic() + 120  # Python under valgrind starts slowly
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the registry did not start; see {work}")
            time.sleep(1)
        # The students' listeners: ports of this run's own (two runs at once on one
        # host, e.g. two A/B comparisons, must not take each other's callbacks).
        base = 10000 + 500 * (os.getpid() % 40)  # below the ephemeral ports
        subprocess.run([*load, "-d", "3", "-b", str(base)], check=True, capture_output=True)
        control = ["callgrind_control", str(proc.pid)]
        subprocess.run([*control, "-i", "on"], check=True, capture_output=True)
        run = subprocess.run(
            [*load, "-d", str(window), "-b", str(base + 250)],
            check=True,
            capture_output=True,
            text=True,
        )
        subprocess.run([*control, "-d"], check=True, capture_output=True)  # write the counts
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # minimal_trio.py may not stop on SIGINT
            proc.kill()
            proc.wait(timeout=30)
    result = json.loads(run.stdout)
    total = max(
        int(line.split()[1])
        for dump in work.glob(out.name + "*")
        for line in dump.read_text().splitlines()
        if line.startswith(("summary:", "totals:"))
    )
    return total / max(int(result["cycles"]), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-pythonpath", type=Path, required=True)
    parser.add_argument("--registry-pythonpath", type=Path, help="default: this venv's registry")
    parser.add_argument("--conc", default="4,16")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--window", type=float, default=8.0, help="counted seconds per run")
    parser.add_argument("--trio", action="store_true", help="and bench/baselines/minimal_trio.py")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("gcc") is None:
        raise SystemExit("needs valgrind and gcc")
    rows = {"base": args.base_pythonpath, "this": args.registry_pythonpath}
    rows |= {"trio": None} if args.trio else {}
    counts: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        loadgen = build_loadgen(Path(tmp))
        for rep in range(args.repeat):
            for conc in (int(c) for c in args.conc.split(",")):
                for name, path in rows.items():
                    n = count(loadgen, Path(tmp), name, path, conc, args.window)
                    counts.setdefault((name, conc), []).append(n)
                    print(f"#{rep} c={conc} {name}: {n / 1000:,.0f}k", file=sys.stderr, flush=True)
    print(f"| c | {' | '.join(rows)} (k instructions per registration) | this / base |")
    print("|---:|" + "---|" * len(rows) + "---:|")
    for conc in sorted({c for _, c in counts}):
        median = {n: statistics.median(counts[n, conc]) for n in rows}
        cells = [f"{median[n] / 1000:,.0f}k "
                 f"({min(counts[n, conc]) / 1000:,.0f}-{max(counts[n, conc]) / 1000:,.0f})"
                 for n in rows]  # fmt: skip
        print(f"| {conc} | {' | '.join(cells)} | {median['this'] / median['base']:.2f} |")


if __name__ == "__main__":
    main()
