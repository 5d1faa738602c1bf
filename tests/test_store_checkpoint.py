"""WAL checkpoints run between commits, never inside one (issue 20, c=1 latency).

SQLite's automatic checkpoint runs inside the commit that crosses its
threshold, and that registration's reply waits for two more syncs. The store
turns it off and its writer checkpoints after a commit's waiters are woken.
Real database files in tmp_path; "on disk" is read from a copy of the main
database file alone (no WAL), which holds only what a checkpoint copied.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import structlog
import structlog.testing
import trio
import trio.testing

from registry.store import Store, StoreError
from registry.store.aio import AsyncStore, checkpoint_due
from tests.test_store import committed_ids, rec


def main_file_ids(db: Path, tmp_path: Path) -> set[str]:
    """The rows in the main database file alone: what checkpoints copied there."""
    copy = tmp_path / "main-only.db"
    shutil.copyfile(db, copy)
    with sqlite3.connect(copy) as other:
        tables = {row[0] for row in other.execute("SELECT name FROM sqlite_master")}
        if "registrations" not in tables:  # even the schema is still in the WAL
            return set()
        return {row[0] for row in other.execute("SELECT id FROM registrations")}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.mark.parametrize(
    ("commits", "idle", "due"),
    [
        (0, True, False),
        (63, True, False),
        (64, True, True),  # idle threshold reached with nothing queued
        (64, False, False),  # records are queued: they would wait for it
        (255, False, False),
        (256, False, True),  # the bound holds even under a flood
        (300, True, True),
    ],
)
def test_checkpoint_due(commits: int, idle: bool, due: bool) -> None:
    assert checkpoint_due(commits, idle, idle_after=64, max_after=256) is due


@pytest.mark.parametrize("autocheckpoint", [True, False])
def test_commits_leave_the_main_file_alone_without_autocheckpoint(
    db: Path, tmp_path: Path, autocheckpoint: bool
) -> None:
    store = Store.open(str(db), autocheckpoint=autocheckpoint)
    try:
        before = digest(db)
        for n in range(250):  # ~6 WAL pages a commit: past SQLite's 1,000-page threshold
            store.record_many([rec(n)])
        if autocheckpoint:  # the control: SQLite checkpointed inside some commit
            assert digest(db) != before
            return
        assert digest(db) == before and main_file_ids(db, tmp_path) == set()
        frames, copied = store.checkpoint()
        assert frames == copied > 1000
        assert main_file_ids(db, tmp_path) == {f"r{n}" for n in range(250)}
    finally:
        store.close()


async def test_the_reply_does_not_wait_for_the_checkpoint(
    db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real = Store.checkpoint

    def gated(self: Store) -> tuple[int, int]:
        started.set()
        release.wait(30)
        return real(self)

    monkeypatch.setattr(Store, "checkpoint", gated)
    async with AsyncStore(str(db), checkpoint_idle=3, checkpoint_max=100) as store:
        for n in range(3):
            await store.record(rec(n))  # returns while the checkpoint after it is held
        assert committed_ids(db) == {"r0", "r1", "r2"}
        await trio.to_thread.run_sync(started.wait, 30)
        assert store.checkpoints == 0 and main_file_ids(db, tmp_path) == set()
        release.set()
        await store.record(rec(3))  # queued behind the checkpoint, so it is done now
        assert store.checkpoints == 1
        assert main_file_ids(db, tmp_path) == {"r0", "r1", "r2"}


async def test_a_flood_checkpoints_at_the_bound_and_the_wal_stays_small(
    db: Path, tmp_path: Path
) -> None:
    wal = Path(f"{db}-wal")
    # max_batch=1: one commit per record, and the queue empties only at the last.
    async with AsyncStore(str(db), max_batch=1, checkpoint_idle=4, checkpoint_max=50) as store:
        await store.record_many([rec(n) for n in range(610)])
        # Without checkpoints: 610 commits x ~6 pages x 4 KiB, about 15 MB.
        assert os.stat(wal).st_size < 60 * 10 * 4120
    # Twelve at the bound (not 150: the idle threshold waits for an empty queue),
    # then one after the last commit, the queue empty.
    assert store.checkpoints == 13
    # Closing still checkpoints everything and removes the WAL: a grader then
    # reads the file alone (Store.open_readonly's immutable mode).
    with pytest.raises(FileNotFoundError):
        os.stat(wal)
    assert main_file_ids(db, tmp_path) == {f"r{n}" for n in range(610)}


async def test_a_failing_checkpoint_is_logged_and_records_go_on(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Store) -> tuple[int, int]:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Store, "checkpoint", broken)
    with structlog.testing.capture_logs() as logs:
        async with AsyncStore(str(db), checkpoint_idle=1, checkpoint_max=1) as store:
            for n in range(3):
                await store.record(rec(n))
            assert store.checkpoints == 0
    failures = [e for e in logs if e["event"] == "store_checkpoint_failed"]
    assert len(failures) == 3 and "disk I/O error" in failures[0]["error"]
    assert committed_ids(db) == {"r0", "r1", "r2"}


# --- the store's thread ---------------------------------------------------------


def store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "registry-store"]


def joined_all_store_threads() -> bool:
    for t in store_threads():
        t.join(10)
    return store_threads() == []


async def test_every_sqlite_call_runs_on_one_thread_that_ends_with_the_store(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[int] = set()
    real_record_many, real_count = Store.record_many, Store.count

    def record_many(self: Store, records: list[object]) -> None:
        seen.add(threading.get_ident())
        real_record_many(self, records)  # type: ignore[arg-type]

    def count(self: Store) -> int:
        seen.add(threading.get_ident())
        return real_count(self)

    monkeypatch.setattr(Store, "record_many", record_many)
    monkeypatch.setattr(Store, "count", count)
    async with AsyncStore(str(db)) as store:
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(store.record, rec(n))
                nursery.start_soon(store.count)
        assert [t.ident for t in store_threads()] == list(seen)
        assert threading.get_ident() not in seen
        assert await store.count() == 20
    assert joined_all_store_threads()


async def test_a_failed_open_leaves_no_thread_behind(db: Path) -> None:
    with sqlite3.connect(db) as other:
        other.execute("PRAGMA user_version = 999")
    with pytest.raises(StoreError, match="newer version"):
        async with AsyncStore(str(db)):
            pytest.fail("must not open")  # pragma: no cover
    assert joined_all_store_threads()


async def test_a_cancelled_caller_waits_for_its_sqlite_call(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, release = threading.Event(), threading.Event()
    real_count = Store.count
    log: list[str] = []

    def gated(self: Store) -> int:
        started.set()
        release.wait(30)
        return real_count(self)

    async def caller(scope: trio.CancelScope) -> None:
        with scope:
            log.append(f"count {await store.count()}")
        log.append("left")

    async with AsyncStore(str(db)) as store:
        await store.record(rec(1))
        monkeypatch.setattr(Store, "count", gated)
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, scope)
            await trio.to_thread.run_sync(started.wait, 30)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert log == []  # sqlite is mid-call: the caller cannot leave yet
            release.set()
        # The call finished and returned its result; the cancellation waits for the
        # caller's next checkpoint (there is none inside the scope).
        assert log == ["count 1", "left"]
        monkeypatch.setattr(Store, "count", real_count)
        assert await store.count() == 1  # the thread answers again
