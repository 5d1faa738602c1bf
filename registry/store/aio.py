"""``AsyncStore``: the results store for trio code (see ``registry.store``).

sqlite runs in one dedicated thread, one call at a time; that thread
group-commits the records queued to it, and ``record()`` returns only after its
row has committed (SPEC promise 6). It also checkpoints the WAL, in the gap
after a commit's callers are woken, never inside a commit.
"""

from __future__ import annotations

import collections
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


class _Rows:
    """One ``record_many`` call's records, queued until written."""

    __slots__ = ("error", "failed", "records", "taken", "task")

    def __init__(self, records: Sequence[Record], task: trio.lowlevel.Task) -> None:
        self.records = records
        self.task: trio.lowlevel.Task | None = task  # None: the caller was cancelled
        self.taken = 0  # records already in a transaction
        self.error: BaseException | None = None  # the first failed transaction's error
        self.failed = ""  # the id of this call's first record in that transaction


class _Job:
    __slots__ = ("error", "fn", "task", "value")

    def __init__(self, fn: Callable[[], Any], task: trio.lowlevel.Task) -> None:
        self.fn = fn
        self.task = task
        self.value: Any = None
        self.error: BaseException | None = None


class _SqliteThread:
    """One dedicated thread that runs every sqlite call, one at a time: jobs over a
    SimpleQueue, results back through the trio token (~36 against ``to_thread``'s
    ~55 µs of CPU a call, pinned). Not abortable, like ``to_thread``'s default: a
    sqlite call cannot be stopped midway, so a cancelled caller waits for it. A plain
    callable on the queue is run for no caller: it reports back itself (``soon``)."""

    def __init__(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self.queue: queue.SimpleQueue[_Job | Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="registry-store", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (job := self.queue.get()) is not None:
            if type(job) is not _Job:
                job()  # type: ignore[operator]
                continue
            try:
                job.value = job.fn()
            except BaseException as e:  # handed to the caller, raised there
                job.error = e
            if not self.soon(trio.lowlevel.reschedule, job.task):
                return

    def soon(self, fn: Callable[..., object], *args: Any) -> bool:
        """``fn(*args)`` in the trio thread; False once trio has finished."""
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:  # pragma: no cover (the store closes inside the run)
            return False
        return True

    async def run(self, fn: Callable[[], T]) -> T:
        await trio.lowlevel.checkpoint_if_cancelled()
        job = _Job(fn, trio.lowlevel.current_task())
        self.queue.put(job)
        await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if job.error is not None:
            raise job.error
        return job.value

    def stop(self) -> None:
        self.queue.put(None)


class AsyncStore:
    """The store for trio code: sqlite runs in one thread of its own, one call at a time.

    ``async with AsyncStore(path) as store:`` opens (and migrates) the file and
    starts the store's thread, and the purge task when ``retention`` (seconds) is
    positive. Leaving the block writes whatever is queued, then closes. Each
    query method is its ``Store`` namesake, run on the store's thread.
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
        self.checkpoints = 0  # WAL checkpoints run between commits
        self._uncheckpointed = 0  # commits since the last checkpoint
        self.batches = 0  # write transactions attempted (group-commit evidence)
        self.purges = 0  # retention purges completed
        self._thread: _SqliteThread | None = None
        self._store: Store | None = None
        self._open: bool | None = None  # None: not yet open; False: closed
        # Records wait here while a batch is written; a caller then hands them over
        # together (``_lead``), so what arrives during one commit goes in the next.
        self._pending: collections.deque[_Rows] = collections.deque()
        self._writing = False  # a batch is on the store's thread, or _leader hands one over
        self._leader: trio.lowlevel.Task | None = None
        self._queued = 0  # records queued or being written
        self._room = trio.lowlevel.ParkingLot()  # callers waiting for _queued < max_queue
        self._drained = trio.lowlevel.ParkingLot()  # the closing waits for the last batch
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
            self._open = True
            async with trio.open_nursery() as nursery:
                purging = trio.CancelScope()
                if self.retention > 0:
                    await nursery.start(self._purge_loop, purging)
                try:
                    yield self
                finally:
                    self._open = False
                    purging.cancel()
        finally:
            store = self._store
            try:
                with trio.CancelScope(shield=True):
                    while self._writing:  # every queued record is written first
                        await self._drained.park()
                    await self._run(store.close)
            finally:
                self._store = None
                self._thread.stop()

    async def _run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the store's thread."""
        assert self._thread is not None
        return await self._thread.run(fn)

    async def _call(self, name: str, /, **kwargs: Any) -> Any:
        """``Store.name(**kwargs)`` on the store's thread."""
        if self._store is None:
            raise StoreError("the results store is not open")
        return await self._run(functools.partial(getattr(self._store, name), **kwargs))

    def _next_batch(self) -> None:
        """Hand the pending records (up to ``max_batch``) to the store's thread."""
        batch: list[Record] = []
        parts: list[tuple[_Rows, int]] = []  # each caller's part and where it starts
        done: list[_Rows] = []  # the callers whose last records are in it
        pending = self._pending
        while pending and len(batch) < self.max_batch:
            rows = pending[0]
            start = rows.taken
            rows.taken = min(len(rows.records), start + self.max_batch - len(batch))
            batch.extend(rows.records[start : rows.taken])
            parts.append((rows, start))
            if rows.taken == len(rows.records):
                done.append(pending.popleft())
        assert self._thread is not None
        self._writing = True
        self._thread.queue.put(functools.partial(self._write, batch, parts, done))

    def _write(
        self, batch: list[Record], parts: list[tuple[_Rows, int]], done: list[_Rows]
    ) -> None:
        """On the store's thread: one transaction; then ``_written`` in trio."""
        assert self._thread is not None and self._store is not None
        error: Exception | None = None
        try:
            self._store.record_many(batch)
        except Exception as e:
            error = e
            for rows, start in parts:
                if rows.error is None:
                    rows.error, rows.failed = e, rows.records[start].id
        self.batches += 1
        self._thread.soon(self._written, done, error, len(batch))

    def _written(self, done: list[_Rows], error: Exception | None, records: int) -> None:
        """In trio, a batch written (or failed): wake its callers, checkpoint the WAL
        if due, and hand over what queued meanwhile."""
        if error is not None:
            log.error("store_write_failed", records=records, error=repr(error))
        for rows in done:
            self._queued -= len(rows.records)
            if rows.task is not None:
                trio.lowlevel.reschedule(rows.task)
        if self._room:
            self._room.unpark_all()
        self._uncheckpointed += 1
        if checkpoint_due(
            self._uncheckpointed, not self._pending, idle_after=self.checkpoint_idle,
            max_after=self.checkpoint_max,
        ):  # fmt: skip
            # The batch's callers are woken already: their replies go out while the
            # thread runs it; only records queued meanwhile wait for it.
            self._uncheckpointed = 0
            assert self._thread is not None
            self._thread.queue.put(self._checkpoint)
        # What queued meanwhile goes when a woken caller runs (``_lead``).
        self._leader = next((rows.task for rows in done if rows.task is not None), None)
        if self._leader is None:  # no caller to lead: at once
            if self._pending:
                self._next_batch()
            else:
                self._idle()

    async def _lead(self) -> None:
        """Let the other tasks of this scheduler round queue theirs, then hand the batch
        over: ~7.7 records a commit at c=16 (fdatasyncs per registration 0.13), against
        ~6 (0.15-0.17) when handed over at once. At c=1 the round is empty."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._next_batch()

    def _idle(self) -> None:
        self._writing = False
        self._drained.unpark_all()

    def _checkpoint(self) -> None:
        """On the store's thread, between two batches."""
        assert self._thread is not None and self._store is not None
        try:
            self._store.checkpoint()
        except Exception as e:  # housekeeping: the rows are already committed
            self._thread.soon(
                functools.partial(log.error, "store_checkpoint_failed", error=repr(e))
            )
            return
        self.checkpoints += 1

    async def record(self, record: Record) -> None:
        await self.record_many((record,))

    async def record_many(self, records: Sequence[Record]) -> None:
        """Queue every record; return once all of them have committed (in as few
        transactions as ``max_batch`` allows). Raises StoreError (its ``__cause__``
        the sqlite error) for the first that failed, or if the store is closed."""
        while self._open and self._queued >= self.max_queue:
            await self._room.park()
        if not self._open:
            closed = "closed" if self._open is False else "not open"
            raise StoreError(f"the results store is {closed}")
        if not records:
            return
        task = trio.lowlevel.current_task()
        rows = _Rows(records, task)
        self._queued += len(records)
        self._pending.append(rows)
        if not self._writing:  # this caller leads the next batch
            self._writing = True
            await self._lead()

        def abort(_: object) -> trio.lowlevel.Abort:
            rows.task = None  # the records are still written
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        if self._leader is task:
            self._leader = None
            if self._pending:
                await self._lead()
            else:
                self._idle()
        if rows.error is not None:
            raise StoreError(f"could not record {rows.failed}: {rows.error}") from rows.error

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
