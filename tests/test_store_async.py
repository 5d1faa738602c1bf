"""AsyncStore: the trio face of the store, against real database files in tmp_path.

Same rules as tests/test_store.py: "committed" is checked through a second,
independent sqlite3 connection; no sleeps (the retention loop runs on trio's
MockClock); the store's thread is held inside Store.record_many where a test
needs records to queue.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from registry.store import Record, Store, StoreError
from registry.store.aio import AsyncStore
from tests.test_store import T0, committed_ids, rec


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


async def test_concurrent_records_are_committed_when_record_returns(db: Path) -> None:
    other = sqlite3.connect(db)  # opened first: the store must cope with another reader
    not_yet_visible: list[str] = []

    async def one(store: AsyncStore, n: int) -> None:
        await store.record(rec(n))
        row = other.execute("SELECT 1 FROM registrations WHERE id = ?", (f"r{n}",)).fetchone()
        if row is None:
            not_yet_visible.append(f"r{n}")

    try:
        async with AsyncStore(str(db)) as store:
            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(one, store, n)
            assert not_yet_visible == []
            assert 1 <= store.batches < 200  # group commit: far fewer transactions than records
            assert await store.count() == 200
    finally:
        other.close()
    assert committed_ids(db) == {f"r{n}" for n in range(200)}


@contextmanager
def store_thread_held(
    monkeypatch: pytest.MonkeyPatch, holding: Callable[[list[Record]], bool]
) -> Iterator[threading.Event]:
    """``Store.record_many`` of a batch for which ``holding(records)`` is true waits
    (on the store's thread) until the event is set; ``started`` reports it waits."""
    started, release = threading.Event(), threading.Event()
    real = Store.record_many

    def held(self: Store, records: list[Record]) -> None:
        if holding(records):
            started.set()
            release.wait(30)
        real(self, records)

    monkeypatch.setattr(Store, "record_many", held)
    try:
        yield started
    finally:
        release.set()


async def test_group_commit_writes_everything_queued_in_one_transaction(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with AsyncStore(str(db)) as store:
        await store.record(rec("first"))
        async with trio.open_nursery() as nursery:
            with store_thread_held(monkeypatch, lambda rs: rs[0].id == "rheld") as started:
                nursery.start_soon(store.record, rec("held"))
                await trio.to_thread.run_sync(started.wait, 30)  # the thread is busy
                for n in range(50):
                    nursery.start_soon(store.record, rec(n))
                await trio.testing.wait_all_tasks_blocked()
                assert store.batches == 1 and committed_ids(db) == {"rfirst"}  # [held] runs
        # Everything queued while the thread was busy went in one transaction.
        assert store.batches == 3
        assert len(committed_ids(db)) == 52


async def test_a_failed_batch_fails_every_waiter_and_the_store_recovers(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results: dict[str, BaseException | None] = {}

    async def one(store: AsyncStore, record: Record) -> None:
        try:
            await store.record(record)
            results[record.id] = None
        except StoreError as e:
            results[record.id] = e

    async with AsyncStore(str(db)) as store:
        await store.record(rec("dup"))
        async with trio.open_nursery() as nursery:
            with store_thread_held(monkeypatch, lambda rs: rs[0].id == "rfirst") as started:
                nursery.start_soon(one, store, rec("first"))
                await trio.to_thread.run_sync(started.wait, 30)  # the thread holds [first]
                nursery.start_soon(one, store, rec("dup", received_at=T0 + 99))
                for n in range(5):
                    nursery.start_soon(one, store, rec(n))
                await trio.testing.wait_all_tasks_blocked()  # these queue behind it
        assert results.pop("rfirst") is None
        assert sorted(results) == ["r0", "r1", "r2", "r3", "r4", "rdup"]
        for error in results.values():
            assert isinstance(error, StoreError)
            assert isinstance(error.__cause__, sqlite3.IntegrityError)
        assert store.batches == 3  # dup, [first], [dup r0..r4]
        await store.record(rec("after"))  # the store keeps working
    assert committed_ids(db) == {"rdup", "rfirst", "rafter"}


async def test_a_cancelled_caller_still_gets_its_row_and_the_queue_moves_on(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller whose batch just committed leads the next one; when it was
    cancelled meanwhile there is no one to lead, and the batch goes at once."""
    returned: list[str] = []

    async def one(store: AsyncStore, n: str) -> None:
        await store.record(rec(n))
        returned.append(n)

    async with AsyncStore(str(db)) as store:
        with trio.fail_after(30):  # a hang guard: the queue must not stall
            async with trio.open_nursery() as nursery:
                with store_thread_held(monkeypatch, lambda rs: rs[0].id == "rheld") as started:
                    held = trio.CancelScope()

                    async def cancelled() -> None:
                        with held:
                            await one(store, "held")

                    nursery.start_soon(cancelled)
                    await trio.to_thread.run_sync(started.wait, 30)
                    nursery.start_soon(one, store, "next")
                    await trio.testing.wait_all_tasks_blocked()
                    held.cancel()  # leaves at once; its row is being written
                    await trio.testing.wait_all_tasks_blocked()
                    assert returned == [] and committed_ids(db) == set()
            assert returned == ["next"]  # written in a batch of its own, then woken
            assert store.batches == 2
            await store.record(rec("after"))
    assert committed_ids(db) == {"rheld", "rnext", "rafter"}


async def test_closed_store_refuses_records_and_queries_pass_through(db: Path) -> None:
    async with AsyncStore(str(db)) as store:
        await store.record(rec(1, student="bob"))
        await store.record(rec(2))
        assert [r.id for r in await store.query(student="bob")] == ["r1"]
        assert [s.student for s in await store.summary()] == ["alice", "bob"]
        assert await store.purge_older_than(T0 + 2) == 1
    with pytest.raises(StoreError, match="closed|not open"):
        await store.record(rec(3))
    assert committed_ids(db) == {"r2"}


async def test_retention_purges_at_start_and_then_periodically(
    db: Path, mock_clock: trio.testing.MockClock
) -> None:
    seed = Store.open(str(db))
    seed.record_many([rec("old", received_at=T0 - 7200), rec("new", received_at=T0 - 60)])
    seed.close()
    now = [T0]
    store = AsyncStore(str(db), retention=3600, purge_interval=600, wallclock=lambda: now[0])
    async with store:
        assert committed_ids(db) == {"rnew"} and store.purges == 1
        now[0] = T0 + 3600  # rnew is now 3660 s old
        mock_clock.jump(599)
        await trio.testing.wait_all_tasks_blocked()
        assert await store.count() == 1 and store.purges == 1  # not yet due
        mock_clock.jump(1)
        await trio.testing.wait_all_tasks_blocked()  # the purge task is now in its thread
        assert await store.count() == 0  # queued behind it on the store's thread
        await trio.testing.wait_all_tasks_blocked()  # the purge task counts it
        assert store.purges == 2


async def test_no_retention_means_no_purge(db: Path, mock_clock: trio.testing.MockClock) -> None:
    async with AsyncStore(str(db), wallclock=lambda: T0 + 10**9) as store:
        await store.record(rec(1))
        mock_clock.jump(10**7)
        await trio.testing.wait_all_tasks_blocked()
        assert await store.count() == 1 and store.purges == 0


async def test_record_many_returns_once_all_are_committed_in_few_transactions(db: Path) -> None:
    async with AsyncStore(str(db)) as store:
        await store.record_many([rec(n) for n in range(100)])
        # every row is durable when record_many returns: another connection sees them
        assert committed_ids(db) == {f"r{n}" for n in range(100)}
        assert store.batches <= 2  # the writer may take the first one alone
        await store.record_many([])
        assert await store.count() == 100


async def test_record_many_on_a_closed_store_is_a_store_error(db: Path) -> None:
    store = AsyncStore(str(db))
    with pytest.raises(StoreError):
        await store.record_many([rec(1)])
