"""The SQLite store against real database files in tmp_path (no mocks).

Rules: every database lives in tmp_path; "committed" is always checked through
a second, independent sqlite3 connection; no sleeps (the retention loop runs
on trio's MockClock).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from registry.model import Code, Diagnosis, GradeRow, Outcome, Protocol
from registry.store import COLUMNS, SCHEMA_VERSION, Record, Store, StoreError

T0 = 1_800_000_000.0  # a fixed epoch second: tests never read the real clock


def rec(n: int | str, **changes: object) -> Record:
    base = Record(
        id=f"r{n}",
        received_at=T0 + (n if isinstance(n, int) else 0),
        protocol="text",
        student="alice",
        peer="127.0.0.1:40000",
        advertised="127.0.0.1:15000",
        target="127.0.0.1:15000",
        status="OK",
        code="connected",
        diagnosis="direct",
        rtt_ms=1.25,
        verified=True,
        explanation="the registry connected",
        duration_ms=3.5,
        corrected=False,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def committed_ids(path: Path) -> set[str]:
    """What another process would see: a fresh, independent connection."""
    with sqlite3.connect(path) as other:
        return {row[0] for row in other.execute("SELECT id FROM registrations")}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


# --- schema and migrations ------------------------------------------------------


def test_open_creates_schema_wal_and_private_file(db: Path) -> None:
    store = Store.open(str(db))
    try:
        assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 1
        assert store.journal_mode == "wal"
        # synchronous is per connection, so it can only be read on this one: 2 = FULL.
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert store.count() == 0
    finally:
        store.close()
    with sqlite3.connect(db) as other:
        names = {r[0] for r in other.execute("SELECT name FROM sqlite_master")}
    assert {"registrations", "registrations_received_at", "registrations_student"} <= names
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_reopen_keeps_data_and_does_not_migrate_again(db: Path) -> None:
    store = Store.open(str(db))
    store.record_many([rec(1)])
    store.close()
    again = Store.open(str(db))
    try:
        assert again._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert again.query() == [rec(1)]
    finally:
        again.close()


@pytest.mark.parametrize("opener", [Store.open, Store.open_readonly], ids=["rw", "ro"])
def test_database_from_a_newer_version_is_a_clear_error(db: Path, opener: object) -> None:
    with sqlite3.connect(db) as other:
        other.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    with pytest.raises(StoreError, match="newer version"):
        opener(str(db))  # type: ignore[operator]
    with sqlite3.connect(db) as other:  # and it was left alone
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 5


def test_a_file_that_is_not_sqlite_is_a_clear_error(db: Path) -> None:
    db.write_bytes(b"this is a text file, not a database\n" * 50)
    with pytest.raises(StoreError, match="not a usable results database"):
        Store.open(str(db))


def test_readonly_refuses_a_database_without_our_schema(db: Path) -> None:
    sqlite3.connect(db).close()
    with pytest.raises(StoreError, match="registry serve"):
        Store.open_readonly(str(db))


# --- writing ---------------------------------------------------------------------


def test_every_field_round_trips(db: Path) -> None:
    rows = [
        rec(1),
        rec(
            2,
            student=None,
            advertised=None,
            target=None,
            diagnosis=None,
            rtt_ms=None,
            verified=None,
            duration_ms=None,
            status="ERROR",
            code="malformed",
        ),  # fmt: skip
        rec(3, verified=False, corrected=True, student='Zoë, "the" tester\n'),
    ]
    store = Store.open(str(db))
    try:
        store.record_many(rows)
        assert store.query() == rows
        assert committed_ids(db) == {"r1", "r2", "r3"}
    finally:
        store.close()


def test_record_many_is_atomic(db: Path) -> None:
    store = Store.open(str(db))
    try:
        store.record_many([rec(1)])
        with pytest.raises(sqlite3.IntegrityError):
            store.record_many([rec(2), rec(3), rec(1)])  # r1 exists: the whole batch fails
        assert committed_ids(db) == {"r1"}
        store.record_many([rec(2), rec(3)])  # and the store is still usable
        assert committed_ids(db) == {"r1", "r2", "r3"}
    finally:
        store.close()


@pytest.mark.slow
def test_a_recorded_row_survives_sigkill_right_after_record_returns(db: Path) -> None:
    code = (
        "import os, signal, sys\n"
        "from registry.store import Store\n"
        "from tests.test_store import rec\n"
        "s = Store.open(sys.argv[1]); s.record_many([rec(7)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code, str(db)], cwd=root, timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert committed_ids(db) == {"r7"}


def test_from_outcome_maps_every_field() -> None:
    outcome = Outcome(
        code=Code.SOURCE_MISMATCH,
        explanation="you advertised another address",
        id="abc123",
        target="10.0.0.5:15000",
        advertised="10.0.0.6:15001",
        observed="127.0.0.1:40000",
        diagnosis=Diagnosis.PRIVATE_BEHIND_NAT,
        student="bob",
        corrected=True,
        rtt_ms=1.5,
        verified=False,
    )
    r = Record.from_outcome(
        outcome, protocol=Protocol.JSON, peer="127.0.0.1:40000", received_at=T0, duration_ms=2.0
    )
    assert r == Record(
        id="abc123", received_at=T0, protocol="json", student="bob", peer="127.0.0.1:40000",
        advertised="10.0.0.6:15001", target="10.0.0.5:15000", status="DENIED",
        code="source_mismatch", diagnosis="private_behind_nat", rtt_ms=1.5, verified=False,
        explanation="you advertised another address", duration_ms=2.0, corrected=True,
    )  # fmt: skip
    # plain values, as read back from SQLite: no enum member in a row
    assert {type(getattr(r, c)) for c in COLUMNS} <= {str, float, bool, type(None)}
    anonymous = Record.from_outcome(
        outcome.with_(id=None), protocol=Protocol.TEXT, peer="p", received_at=T0, duration_ms=None
    )
    assert len(anonymous.id) == 12  # a missing id never makes recording fail


# --- reading -----------------------------------------------------------------------


QUERIES = [
    ({}, ["r1", "r2", "r3", "r4", "r5"]),
    ({"since": T0 + 3}, ["r3", "r4", "r5"]),  # inclusive
    ({"student": "bob"}, ["r2", "r4"]),
    ({"student": "Bob"}, []),  # exact match
    ({"since": T0 + 3, "student": "bob"}, ["r4"]),
    ({"limit": 2}, ["r4", "r5"]),  # the newest two, oldest first
    ({"limit": 0}, []),
    ({"student": "alice", "limit": 1}, ["r5"]),
]


@pytest.mark.parametrize(("filters", "expected"), QUERIES)
def test_query_filters_and_orders_oldest_first(
    db: Path, filters: dict[str, object], expected: list[str]
) -> None:
    store = Store.open(str(db))
    try:
        # Written out of order: the result follows received_at, not insertion.
        store.record_many([rec(5), rec(1), rec(2, student="bob"), rec(4, student="bob"), rec(3)])
        assert [r.id for r in store.query(**filters)] == expected  # type: ignore[arg-type]
    finally:
        store.close()


def _attempt(n: int, student: str | None, status: str, code: str, **kw: object) -> Record:
    return rec(n, student=student, status=status, code=code, **kw)


SUMMARY_ROWS = [
    # ann: DENIED, then OK unverified, then FAILED again -> best OK, first success at +2
    _attempt(1, "ann", "DENIED", "source_mismatch"),
    _attempt(2, "ann", "OK", "connected", verified=False),
    _attempt(3, "ann", "FAILED", "timeout"),
    # ben: ERROR < BUSY < DENIED < FAILED: best FAILED, the most recent FAILED code
    _attempt(4, "ben", "ERROR", "malformed", verified=None),
    _attempt(5, "ben", "FAILED", "connection_refused", verified=None),
    _attempt(6, "ben", "BUSY", "rate_limited", verified=None),
    _attempt(7, "ben", "FAILED", "timeout", verified=None),
    _attempt(8, "ben", "DENIED", "port_not_allowed", verified=None),
    # cat: only BUSY and ERROR -> BUSY
    _attempt(9, "cat", "ERROR", "too_long", verified=None),
    _attempt(10, "cat", "BUSY", "overloaded", verified=None),
    # no name: listed last
    _attempt(11, None, "OK", "connected", verified=True),
    _attempt(12, "ann", "OK", "connected", verified=True),
]


def _last(status: str, code: str) -> dict[str, object]:
    return {"last_status": status, "last_code": code, "last_explanation": "the registry connected"}


def test_summary_ranks_best_outcome_per_student(db: Path) -> None:
    store = Store.open(str(db))
    try:
        store.record_many(SUMMARY_ROWS)
        assert store.summary() == [
            GradeRow("ann", None, 4, 2, "OK", "connected", T0 + 2, T0 + 12, True,
                     **_last("OK", "connected")),
            GradeRow("ben", None, 5, 0, "FAILED", "timeout", None, T0 + 8, False,
                     **_last("DENIED", "port_not_allowed")),
            GradeRow("cat", None, 2, 0, "BUSY", "overloaded", None, T0 + 10, False,
                     **_last("BUSY", "overloaded")),
            GradeRow(None, "127.0.0.1", 1, 1, "OK", "connected", T0 + 11, T0 + 11, True,
                     **_last("OK", "connected")),
        ]  # fmt: skip
        # Filters apply before ranking: since +3, ann has one OK (verified) and one FAILED.
        assert store.summary(since=T0 + 3, student="ann") == [
            GradeRow("ann", None, 2, 1, "OK", "connected", T0 + 12, T0 + 12, True,
                     **_last("OK", "connected"))
        ]  # fmt: skip
    finally:
        store.close()


def test_summary_groups_nameless_registrations_by_source_ip(db: Path) -> None:
    """The lab's C++ client sends no name: each machine (source IP) is its own row,
    whatever its ephemeral ports; a name is one row from any machine."""
    store = Store.open(str(db))
    try:
        store.record_many(
            [
                _attempt(1, None, "FAILED", "timeout", peer="192.168.1.105:40001"),
                _attempt(2, None, "OK", "connected", peer="192.168.1.105:40002"),
                _attempt(3, None, "DENIED", "port_not_allowed", peer="192.168.1.7:50000"),
                _attempt(4, None, "FAILED", "timeout", peer="[2001:db8::7]:50000"),
                _attempt(5, "ann", "OK", "connected", peer="192.168.1.7:50001"),
                _attempt(6, "ann", "FAILED", "timeout", peer="192.168.1.8:50001"),
            ]
        )
        got = [
            (s.student, s.source, s.attempts, s.best_status, s.last_code) for s in store.summary()
        ]
        assert got == [
            ("ann", None, 2, "OK", "timeout"),
            (None, "192.168.1.105", 2, "OK", "connected"),
            (None, "192.168.1.7", 1, "DENIED", "port_not_allowed"),
            (None, "2001:db8::7", 1, "FAILED", "timeout"),
        ]
    finally:
        store.close()


def test_purge_deletes_only_older_records(db: Path) -> None:
    store = Store.open(str(db))
    try:
        store.record_many([rec(1), rec(2), rec(3)])
        assert store.purge_older_than(T0 + 2) == 1
        assert committed_ids(db) == {"r2", "r3"}
        assert store.purge_older_than(T0) == 0
    finally:
        store.close()


def test_readonly_sees_live_data_and_cannot_write(db: Path) -> None:
    writer = Store.open(str(db))
    try:
        writer.record_many([rec(1)])
        reader = Store.open_readonly(str(db))
        try:
            writer.record_many([rec(2)])  # committed after the reader opened: still visible
            assert [r.id for r in reader.query()] == ["r1", "r2"]
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                reader.record_many([rec(3)])
        finally:
            reader.close()
    finally:
        writer.close()


def test_readonly_on_a_stopped_daemons_file_changes_nothing(db: Path) -> None:
    writer = Store.open(str(db))
    writer.record_many([rec(1)])
    writer.close()  # last connection: WAL checkpointed, -wal and -shm removed
    before = (sorted(os.listdir(db.parent)), db.read_bytes())
    reader = Store.open_readonly(str(db))
    assert [r.id for r in reader.query()] == ["r1"]
    reader.close()
    assert (sorted(os.listdir(db.parent)), db.read_bytes()) == before


def test_count_by_status_matches_the_rows_and_filters(tmp_path: Path) -> None:
    store = Store.open(str(tmp_path / "r.db"))
    try:
        store.record_many(
            [
                rec(1),
                rec(2, status="DENIED", code="source_mismatch"),
                rec(3, status="DENIED", code="port_not_allowed", student="bob"),
                rec(4, status="ERROR", code="malformed", student=None),
            ]
        )
        assert store.count_by_status() == {"OK": 1, "DENIED": 2, "ERROR": 1}
        assert store.count_by_status(student="bob") == {"DENIED": 1}
        assert store.count_by_status(since=T0 + 3) == {"DENIED": 1, "ERROR": 1}
        assert store.count_by_status(student="nobody") == {}
    finally:
        store.close()


def test_a_contended_writers_lock_is_polled_from_50_us_doubling_to_2_ms(tmp_path: Path) -> None:
    """The other worker holds the lock for one commit (~0.3 ms): the first polls are
    short, so a waiter takes it soon after it is free, and they grow to 2 ms so a
    long hold costs little."""
    import fcntl

    from registry.store import _lock_within

    path = str(tmp_path / "lock")
    ours, holder = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 9:  # the holder's commit ends
            fcntl.flock(holder, fcntl.LOCK_UN)

    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        _lock_within(ours, 5.0, sleep=sleep)
        assert slept == pytest.approx(
            [50e-6, 100e-6, 200e-6, 400e-6, 800e-6, 1.6e-3, 2e-3, 2e-3, 2e-3]
        )
        with pytest.raises(BlockingIOError):  # ours holds it now
            fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(ours)
        os.close(holder)


def test_the_writers_lock_gives_up_at_its_deadline(tmp_path: Path) -> None:
    import fcntl

    from registry.store import _lock_within

    path = str(tmp_path / "lock")
    ours, holder = os.open(path, os.O_RDWR | os.O_CREAT), os.open(path, os.O_RDWR)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(sqlite3.OperationalError, match="writers' lock"):
            _lock_within(ours, 0.01, clock=lambda: now[0], sleep=sleep)
        assert 0.01 <= now[0] < 0.01 + 2e-3
    finally:
        os.close(ours)
        os.close(holder)


def test_a_held_writers_lock_fails_the_record_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker stopped inside its transaction (SIGSTOP, a hung disk) holds the
    writers' lock: the others give up after busy_timeout, as SQLite would."""
    import fcntl

    import registry.store as store_mod

    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_MS", 100)
    path = str(tmp_path / "r.db")
    store = Store.open(path, writer_lock=path + "-writer")
    holder = os.open(path + "-writer", os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(sqlite3.OperationalError, match="writers' lock"):
            store.record_many([rec(1)])
        fcntl.flock(holder, fcntl.LOCK_UN)
        store.record_many([rec(2)])  # free again: the next record goes through
        assert [r.id for r in store.query()] == ["r2"]
    finally:
        os.close(holder)
        store.close()


@pytest.mark.parametrize("count", [1, 511, 512, 513, 1200])
def test_record_many_writes_any_number_of_records_all_or_none(db: Path, count: int) -> None:
    """A batch is one INSERT statement up to INSERT_ROWS rows, one transaction of
    several beyond: either way all rows commit, or none when one fails."""
    store = Store.open(str(db))
    try:
        store.record_many([rec(n) for n in range(count)])
        assert committed_ids(db) == {f"r{n}" for n in range(count)}
        again = [rec(n) for n in range(count, count + 600)] + [rec(count - 1)]  # a duplicate last
        with pytest.raises(sqlite3.IntegrityError):
            store.record_many(again)
        assert len(committed_ids(db)) == count  # none of the 601
        assert [r.id for r in store.query(limit=1)] == [f"r{count - 1}"]
        assert store.query()[0] == rec(0)  # every column round-trips
    finally:
        store.close()


def test_a_sqlite_that_binds_999_values_gets_its_batches_in_smaller_statements(db: Path) -> None:
    """SQLite before 3.32 binds at most 999 values a statement (66 rows of 15)."""
    store = Store.open(str(db))
    try:
        store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        store.record_many([rec(n) for n in range(200)])
        assert committed_ids(db) == {f"r{n}" for n in range(200)}
    finally:
        store.close()


def test_booleans_and_none_are_stored_as_integers_and_null(db: Path) -> None:
    """The sqlite3 adapters for bool and None (a shortcut) store what sqlite3 would."""
    store = Store.open(str(db))
    try:
        store.record_many([rec(1, verified=True, corrected=False, student=None, rtt_ms=None)])
        store.record_many([rec(2, verified=None, corrected=True, diagnosis=None)])
    finally:
        store.close()
    with sqlite3.connect(db) as other:
        rows = other.execute(
            "SELECT verified, typeof(verified), corrected, typeof(corrected), typeof(student),"
            " typeof(rtt_ms), typeof(diagnosis) FROM registrations ORDER BY seq"
        ).fetchall()
    assert rows == [
        (1, "integer", 0, "integer", "null", "null", "text"),
        (None, "null", 1, "integer", "text", "real", "null"),
    ]
    reader = Store.open_readonly(str(db))
    try:
        assert [(r.verified, r.corrected, r.student) for r in reader.query()] == [
            (True, False, None),
            (None, True, "alice"),
        ]
    finally:
        reader.close()
