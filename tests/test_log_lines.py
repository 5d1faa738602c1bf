"""How log lines reach the stream (registry/log.py ``Lines``): whole, and the lines of
one trio scheduler wave in one write(); at once off the trio thread and outside a run;
none lost when the real executable stops on SIGTERM or SIGINT."""

from __future__ import annotations

import io
import json
import select
import signal
import threading
from pathlib import Path

import pytest
import structlog
import trio

from registry import log as log_mod
from registry.log import Lines
from tests.support import run_registry, wait_exit
from tests.test_lifecycle import OPEN_LIMITS, db_rows, flood, target


class Stream(io.StringIO):
    """A text stream that remembers each write() (one system call on stderr)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_outside_a_trio_run_each_line_is_written_at_once() -> None:
    stream = Stream()
    lines = Lines(stream)
    lines.msg("one")
    assert stream.writes == ["one\n"]
    lines.info("two")
    assert stream.writes == ["one\n", "two\n"]


def test_the_lines_of_one_wave_are_one_write_after_it() -> None:
    stream = Stream()
    lines = Lines(stream)
    seen: list[list[str]] = []

    async def log(n: int) -> None:
        lines.msg(f"line {n}")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for n in range(3):  # three tasks of one wave, as a group commit wakes them
                nursery.start_soon(log, n)
            await trio.testing.wait_all_tasks_blocked()
            seen.append(list(stream.writes))  # the nursery's tasks are done, so are the lines
        lines.msg("later")
        seen.append(list(stream.writes))  # held: no checkpoint since
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()

    trio.run(main)
    assert len(seen[0]) == 1  # the order within a wave is trio's
    assert sorted(seen[0][0].splitlines(keepends=True)) == ["line 0\n", "line 1\n", "line 2\n"]
    assert seen[1] == seen[0]
    assert stream.writes == [*seen[0], "later\n"]


def test_a_line_held_when_the_run_ends_is_written() -> None:
    stream = Stream()
    lines = Lines(stream)

    async def main() -> None:
        lines.msg("last")  # no checkpoint after it: the flusher's cancellation writes it

    trio.run(main)
    assert stream.writes == ["last\n"]


def test_a_write_never_exceeds_pipe_buf_nor_splits_a_line() -> None:
    # What keeps the lines of a worker group's processes, sharing stderr, apart.
    stream = Stream()
    lines = Lines(stream)
    sent = [("é" if n % 3 == 0 else "a") * 900 + f" {n}" for n in range(12)]  # é: 2 bytes

    async def main() -> None:
        for line in sent:
            lines.msg(line)

    trio.run(main)
    assert "".join(stream.writes) == "".join(f"{line}\n" for line in sent)
    assert len(stream.writes) > 1
    for chunk in stream.writes:
        assert chunk.endswith("\n") and len(chunk.encode()) <= select.PIPE_BUF


def test_a_line_longer_than_pipe_buf_is_written_alone() -> None:
    stream = Stream()
    lines = Lines(stream)
    long = "x" * (select.PIPE_BUF + 10)

    async def main() -> None:
        lines.msg("before")
        lines.msg(long)
        lines.msg("after")

    trio.run(main)
    assert stream.writes == ["before\n", f"{long}\n", "after\n"]


def test_a_line_from_another_thread_is_written_at_once() -> None:
    # The store's thread logs too: no flusher there, the line goes out at once.
    stream = Stream()
    lines = Lines(stream)

    def store_thread() -> list[str]:
        lines.msg("from the store's thread")
        return list(stream.writes)

    async def main() -> list[str]:
        return await trio.to_thread.run_sync(store_thread)

    assert trio.run(main) == ["from the store's thread\n"]


def test_a_failing_stream_does_not_end_the_run() -> None:
    class Closed(Stream):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    lines = Lines(Closed())
    done: list[bool] = []

    async def main() -> None:
        lines.msg("nowhere to go")
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        done.append(True)

    trio.run(main)
    assert done == [True]
    with pytest.raises(BrokenPipeError):  # outside a run the caller hears of it, as print()'s did
        lines.msg("nowhere either")


@pytest.fixture
def configured() -> object:
    yield
    structlog.reset_defaults()


def test_configure_writes_json_lines_through_lines(configured: object) -> None:
    stream = Stream()
    log_mod.configure("json", "info", stream=stream)

    async def main() -> None:
        log = structlog.get_logger(component="test")
        log.info("registration", id="a")
        log.debug("hidden")
        log.info("registration", id="b")

    trio.run(main)
    assert len(stream.writes) == 1
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["event"], e["id"], e["component"]) for e in events] == [
        ("registration", "a", "test"),
        ("registration", "b", "test"),
    ]


# --- the cached registration logger -------------------------------------------------


def test_the_cached_logger_follows_every_reconfiguration(configured: object) -> None:
    cached = log_mod.CachedLogger(component="service")
    first, second = Stream(), Stream()
    log_mod.configure("json", "info", stream=first)
    cached.current().info("registration", id="a")
    log_mod.configure("json", "warning", stream=second)  # a reload: level and stream
    cached.current().info("registration", id="hidden")
    cached.current().warning("registration", id="b")
    log_mod.configure("console", "info", stream=second)  # and the format
    cached.current().info("registration", id="c", status="OK", code="connected")
    assert [json.loads(line)["id"] for line in first.writes] == ["a"]
    assert json.loads(second.writes[0])["id"] == "b"
    assert "OK   connected" in second.writes[1] and len(second.writes) == 2
    assert all(json.loads(line)["component"] == "service" for line in first.writes)


def test_the_cached_logger_is_captured_after_a_reset(configured: object) -> None:
    # Built under one configuration, then the defaults come back and a test captures.
    cached = log_mod.CachedLogger(component="service")
    log_mod.configure("json", "info", stream=Stream())
    cached.current().info("registration", id="a")
    structlog.reset_defaults()
    with structlog.testing.capture_logs() as logs:
        cached.current().info("registration", id="b")
    with structlog.testing.capture_logs() as again:  # capture_logs edits the list in place
        cached.current().info("registration", id="c")
    assert [(e["id"], e["component"]) for e in logs] == [("b", "service")]
    assert [e["id"] for e in again] == ["c"]


# --- the real executable --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_every_row_has_its_line_after_a_signal_under_load(tmp_path: Path, sig: int) -> None:
    with target() as t:
        line = f"127.0.0.1:{t.port}\n".encode()
        with run_registry(tmp_path, config=OPEN_LIMITS) as reg:
            timer = threading.Timer(0.7, reg.proc.send_signal, (sig,))
            timer.start()
            replies = flood(reg.port, line, seconds=2.0)
            timer.join()
            assert wait_exit(reg.proc, 10) == 0
            reg.stop()  # reads its last lines
            logged = {e["id"]: (e["status"], e["code"]) for e in reg.events("registration")}
    rows = db_rows(tmp_path / "registry.db")
    assert len(rows) >= 8, f"the flood barely ran: {len(replies)} replies"
    assert logged == rows
