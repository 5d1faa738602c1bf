"""``AsyncStore``: the results store for trio code (see ``registry.store``).

sqlite runs in one dedicated thread, one call at a time; writes are
group-committed by one writer task, and ``record()`` returns only after its
row has committed (SPEC promise 6). The writer also checkpoints the WAL, in
the gap after a commit's waiters are woken, never inside a commit.
"""

from __future__ import annotations

import functools
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import structlog
import trio

from registry.model import GradeRow
from registry.store import Record, Store, StoreError

log = structlog.get_logger(component="store")

T = TypeVar("T")


def checkpoint_due(commits: int, idle: bool, *, idle_after: int, max_after: int) -> bool:
    """Whether the writer checkpoints the WAL now, ``commits`` commits after the last one.

    ``idle``: nothing is queued, so no record waits for the checkpoint.
    """
    return commits >= max_after or (idle and commits >= idle_after)


class _SqliteThread:
    """One dedicated thread that runs every sqlite call, one at a time: jobs over a
    SimpleQueue, results back through the trio token (~36 against ``to_thread``'s
    ~55 µs of CPU a call, pinned). Not abortable, like ``to_thread``'s default: a
    sqlite call cannot be stopped midway, so a cancelled caller waits for it."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="registry-store", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.value = job.fn()
            except BaseException as e:  # handed to the caller, raised there
                job.error = e
            try:
                self._token.run_sync_soon(trio.lowlevel.reschedule, job.task)
            except trio.RunFinishedError:  # pragma: no cover (the store closes inside the run)
                return

    async def run(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, trio.lowlevel.current_task())
        self._jobs.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if job.error is not None:
            raise job.error
        return job.value

    def stop(self) -> None:
        self._jobs.put(None)


class _Job:
    __slots__ = ("error", "fn", "task", "value")

    def __init__(self, fn: Callable[[], Any], task: trio.lowlevel.Task) -> None:
        self.fn = fn
        self.task = task
        self.value: Any = None
        self.error: BaseException | None = None


class _Waiter:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class AsyncStore:
    """The store for trio code: sqlite runs in one thread of its own, one call at a time.

    ``async with AsyncStore(path) as store:`` opens (and migrates) the file and
    runs the writer task, and the purge task when ``retention`` (seconds) is
    positive. Leaving the block writes whatever is queued, then closes. Each
    query method is its ``Store`` namesake, run on the store's thread; holding
    ``limiter`` (every sqlite call passes it) pauses the store.
    """

    def __init__(
        self,
        path: str,
        *,
        retention: float = 0.0,
        purge_interval: float | None = None,
        wallclock: Callable[[], float] = time.time,
        max_batch: int = 512,
        max_queue: int = 4096,
        checkpoint_idle: int = 160,
        checkpoint_max: int = 480,
        writer_lock: str = "",
    ) -> None:
        self.path = path
        self.writer_lock = writer_lock  # Store.open's: one of a worker group's writers
        self.retention = retention
        # Often enough that the table never holds much more than `retention`,
        # rarely enough that the DELETE is no load: between a minute and an hour.
        self.purge_interval = purge_interval or min(3600.0, max(60.0, retention / 10))
        self.wallclock = wallclock
        self.max_batch = max_batch
        self.max_queue = max_queue
        # A checkpoint after `checkpoint_idle` commits once nothing is queued (at
        # one record a commit, ~6 WAL pages each: about SQLite's own threshold of
        # 1,000 pages, so no more checkpoints than before), and after
        # `checkpoint_max` even under a flood, so the WAL cannot grow without bound.
        self.checkpoint_idle = checkpoint_idle
        self.checkpoint_max = checkpoint_max
        self.checkpoints = 0  # WAL checkpoints the writer ran between commits
        self._uncheckpointed = 0  # commits since the last checkpoint
        self.batches = 0  # write transactions attempted by the writer (group-commit evidence)
        self.purges = 0  # retention purges completed
        self.limiter = trio.CapacityLimiter(1)
        self._thread: _SqliteThread | None = None
        self._store: Store | None = None
        self._send: trio.MemorySendChannel[tuple[Record, _Waiter]] | None = None
        self._cm: Any = None

    async def __aenter__(self) -> AsyncStore:
        self._cm = self._lifetime()
        return await self._cm.__aenter__()

    async def __aexit__(self, *exc: object) -> bool | None:
        return await self._cm.__aexit__(*exc)

    @asynccontextmanager
    async def _lifetime(self) -> AsyncIterator[AsyncStore]:
        self._thread = _SqliteThread()
        try:
            self._store = await self._run(
                functools.partial(
                    Store.open, self.path, autocheckpoint=False, writer_lock=self.writer_lock
                )
            )
        except BaseException:
            self._thread.stop()
            raise
        try:
            if self.retention > 0:
                await self._purge_once()
            send, receive = trio.open_memory_channel[tuple[Record, _Waiter]](self.max_queue)
            self._send = send
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, receive)
                purging = trio.CancelScope()
                if self.retention > 0:
                    await nursery.start(self._purge_loop, purging)
                try:
                    yield self
                finally:
                    send.close()  # the writer drains what is queued, then ends
                    purging.cancel()
        finally:
            store, self._store = self._store, None
            try:
                with trio.CancelScope(shield=True):
                    await self._run(store.close)
            finally:
                self._thread.stop()

    async def _run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the store's thread, holding the limiter."""
        assert self._thread is not None
        try:
            self.limiter.acquire_nowait()  # no scheduler round when it is free
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            return await self._thread.run(fn)
        finally:
            self.limiter.release()

    async def _call(self, name: str, /, **kwargs: Any) -> Any:
        """``Store.name(**kwargs)`` on the store's thread."""
        if self._store is None:
            raise StoreError("the results store is not open")
        return await self._run(functools.partial(getattr(self._store, name), **kwargs))

    async def _writer(self, receive: trio.MemoryReceiveChannel[tuple[Record, _Waiter]]) -> None:
        async with receive:
            async for first in receive:
                batch = [first]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._commit(batch)
                self._uncheckpointed += 1
                idle = receive.statistics().current_buffer_used == 0
                if checkpoint_due(
                    self._uncheckpointed, idle, idle_after=self.checkpoint_idle,
                    max_after=self.checkpoint_max,
                ):  # fmt: skip
                    await self._checkpoint()

    async def _checkpoint(self) -> None:
        # The batch's waiters are already woken: their replies go out while this
        # runs; only a record queued meanwhile waits for it.
        self._uncheckpointed = 0
        try:
            await self._call("checkpoint")
        except sqlite3.Error as e:  # housekeeping: the rows are already committed
            log.error("store_checkpoint_failed", error=repr(e))
            return
        self.checkpoints += 1

    async def _commit(self, batch: list[tuple[Record, _Waiter]]) -> None:
        error: BaseException | None = StoreError("the results store shut down before writing")
        try:
            await self._call("record_many", records=[r for r, _ in batch])
            error = None
        except Exception as e:
            error = e
            log.error("store_write_failed", records=len(batch), error=repr(e))
        finally:
            # Always wake the waiters, even when cancelled: none may wait forever.
            self.batches += 1
            for _, waiter in batch:
                waiter.error = error
                waiter.done.set()

    async def record(self, record: Record) -> None:
        await self.record_many((record,))

    async def record_many(self, records: Sequence[Record]) -> None:
        """Queue every record; return once all of them have committed (in as few
        transactions as ``max_batch`` allows). Raises StoreError (its ``__cause__``
        the sqlite error) for the first that failed, or if the store is closed."""
        if self._send is None:
            raise StoreError("the results store is not open")
        waiters = []
        try:
            for record in records:
                waiter = _Waiter()
                try:  # no checkpoint between records: the writer finds them all queued
                    self._send.send_nowait((record, waiter))
                except trio.WouldBlock:  # the queue is full: wait for room
                    await self._send.send((record, waiter))
                waiters.append((record, waiter))
        except (trio.ClosedResourceError, trio.BrokenResourceError) as e:
            raise StoreError("the results store is closed") from e
        for record, waiter in waiters:
            await waiter.done.wait()
            if waiter.error is not None:
                raise StoreError(f"could not record {record.id}: {waiter.error}") from waiter.error

    async def query(
        self, *, since: float | None = None, student: str | None = None, limit: int | None = None
    ) -> list[Record]:
        return await self._call("query", since=since, student=student, limit=limit)

    async def last_seq(self) -> int:
        return await self._call("last_seq")

    async def after(self, seq: int, limit: int = 1000) -> tuple[int, list[Record]]:
        return await self._call("after", seq=seq, limit=limit)

    async def summary(
        self, *, since: float | None = None, student: str | None = None
    ) -> list[GradeRow]:
        return await self._call("summary", since=since, student=student)

    async def purge_older_than(self, cutoff: float) -> int:
        return await self._call("purge_older_than", cutoff=cutoff)

    async def count(self) -> int:
        return await self._call("count")

    async def count_by_status(
        self, *, since: float | None = None, student: str | None = None
    ) -> dict[str, int]:
        return await self._call("count_by_status", since=since, student=student)

    async def _purge_once(self) -> None:
        cutoff = self.wallclock() - self.retention
        try:
            deleted = await self.purge_older_than(cutoff)
        except (sqlite3.Error, StoreError) as e:  # retention is housekeeping: never fatal
            log.error("store_purge_failed", error=repr(e))
            return
        self.purges += 1
        if deleted:
            log.info("store_purged", deleted=deleted, retention_s=self.retention)

    async def _purge_loop(
        self,
        scope: trio.CancelScope,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with scope:
            # The first deadline is fixed before __aenter__ returns, so the schedule
            # does not depend on when this task first gets to run.
            deadline = trio.current_time() + self.purge_interval
            task_status.started()
            while True:
                await trio.sleep_until(deadline)
                await self._purge_once()
                deadline = trio.current_time() + self.purge_interval
