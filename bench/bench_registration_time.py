"""How long one registration takes, seen from a student program, by server kind.

Run:  python bench/bench_registration_time.py [--runs N]

A real registry (in this process, loopback, default timings: quiet period
250 ms, verify_timeout 2 s) and, for each case, a student client written as
the lab text suggests: it sends ``IP:PORT`` with no newline and waits for the
reply (so the quiet period frames it), and last one that ends its line. The
time is from connect to the reply line; the median of ``--runs``.

Servers (all accept the callback and print what they read; none echoes):

- ``reads-to-eof``: reads until the registry's end of stream, then closes
  (nc, socat, a ``while (recv(...) > 0)`` loop);
- ``keeps-open``: reads the line and keeps the connection open (never echoes);
- ``prints-and-closes``: one ``recv()``, then closes (the lab's C++ server).

The registry waits up to ``verify_timeout`` for a nonce echo; a server that
closes answers that wait at once.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from pathlib import Path

import structlog
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from registry import config as config_mod  # noqa: E402
from registry.server import Registry  # noqa: E402


async def _server(kind: str, task_status: trio.TaskStatus[int]) -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    task_status.started(listener.socket.getsockname()[1])
    async with listener:
        stream = await listener.accept()
        async with stream:
            if kind == "prints-and-closes":
                await stream.receive_some(4096)
                return
            while await stream.receive_some(4096):
                pass  # until EOF
            if kind == "keeps-open":
                await trio.sleep_forever()


async def _one(registry_port: int, kind: str, end: bytes = b"") -> float:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_server, kind)
        started = trio.current_time()
        stream = await trio.open_tcp_stream("127.0.0.1", registry_port)
        async with stream:
            await stream.send_all(f"127.0.0.1:{port}".encode() + end)  # no newline, as in the lab
            reply = b""
            while b"\n" not in reply:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                reply += chunk
        took = trio.current_time() - started
        assert reply.startswith(b"OK connected"), reply
        nursery.cancel_scope.cancel()
    return took


async def main(runs: int) -> None:
    cfg = config_mod.from_dict(
        {
            "server": {"listen": ["127.0.0.1:0"], "admin": "off", "db": ":memory:"},
            "ratelimit": {
                "per_source": "10000/minute",
                "per_target": "10000/minute",
                "per_target_port": "10000/minute",
            },
        }
    )
    async with trio.open_nursery() as nursery:
        runtime = await nursery.start(Registry(cfg, handle_signals=False).run)
        port = runtime.tcp[0].port
        cases = [(k, b"") for k in ("reads-to-eof", "keeps-open", "prints-and-closes")]
        for kind, end in [*cases, ("reads-to-eof", b"\n")]:
            times = [await _one(port, kind, end) for _ in range(runs)]
            label = kind + (" (LF)" if end else "")
            print(
                f"{label:23} median {statistics.median(times):.3f} s  "
                f"(min {min(times):.3f}, max {max(times):.3f}, n={runs})"
            )
        runtime.shutdown()


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    trio.run(main, parser.parse_args().runs)
