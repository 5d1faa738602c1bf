"""SQLite results store: one row per registration, committed before its reply.

One ``sqlite3`` connection, WAL journal, ``synchronous=FULL`` (an acknowledged
reply survives SIGKILL and power loss), a ``busy_timeout``, and a schema
upgraded through ``PRAGMA user_version``. ``store/aio.py`` is the trio face.
"""

from __future__ import annotations

import fcntl
import functools
import itertools
import operator
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import structlog

from registry.errors import RegistryError
from registry.model import STATUS_RANK, GradeRow, Outcome, Protocol

log = structlog.get_logger(component="store")


BUSY_TIMEOUT_MS = 5000


def _lock_within(
    fd: int,
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """The writers' lock, waited for no longer than SQLite waits for its own
    (busy_timeout): a writer stopped while holding it fails the others' records
    (StoreError, then an error reply) instead of hanging their store threads.

    flock cannot wait with a timeout, so it is polled: first after 50 µs, doubling
    to 2 ms. The holder keeps it for one commit (an fdatasync, ~0.3 ms), so a
    waiter usually has it within a poll or two; polling every 2 ms made each
    contended commit of a group of two wait ~2.5 ms (more sleeps than commits
    under load, strace at c=16)."""
    deadline = clock() + seconds
    delay = 50e-6
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if clock() >= deadline:
                raise sqlite3.OperationalError("database is locked (the writers' lock)") from None
            sleep(delay)
            delay = min(delay * 2, 0.002)


class StoreError(RegistryError):
    """The results database cannot be opened, understood or written."""


# Not frozen: a frozen dataclass's __init__ sets each of the 15 fields through
# object.__setattr__, and one is built per registration: 42k against 23k
# instructions (callgrind) for from_outcome. Treat a Record as read-only.
@dataclass(slots=True)
class Record:
    """One registration and its outcome, exactly as stored (one row)."""

    id: str
    received_at: float  # unix epoch seconds
    protocol: str
    student: str | None
    peer: str
    advertised: str | None
    target: str | None
    status: str
    code: str
    diagnosis: str | None
    rtt_ms: float | None
    verified: bool | None
    explanation: str
    duration_ms: float | None
    corrected: bool

    @classmethod
    def from_outcome(
        cls,
        outcome: Outcome,
        *,
        protocol: Protocol,
        peer: str,
        received_at: float,
        duration_ms: float | None,
    ) -> Record:
        """The row for one outcome. An outcome without an id gets a fresh one:
        recording must not fail (and cost the client its reply) over a missing id.
        ``_value_``: the member's value as stored on it; ``.value`` is a property."""
        diagnosis = outcome.diagnosis
        return cls(  # positional, in COLUMNS order
            outcome.id or secrets.token_hex(6),
            received_at,
            protocol._value_,
            outcome.student,
            peer,
            outcome.advertised,
            outcome.target,
            outcome.status._value_,
            outcome.code._value_,
            diagnosis._value_ if diagnosis is not None else None,
            outcome.rtt_ms,
            outcome.verified,
            outcome.explanation,
            duration_ms,
            outcome.corrected,
        )


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Record))


# --- schema: MIGRATIONS[i] takes it from version i to i+1, in one transaction -----


def _m1_registrations(db: sqlite3.Connection) -> None:
    db.execute(
        """CREATE TABLE registrations (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            id TEXT UNIQUE NOT NULL,
            received_at REAL NOT NULL,
            protocol TEXT NOT NULL,
            student TEXT,
            peer TEXT NOT NULL,
            advertised TEXT,
            target TEXT,
            status TEXT NOT NULL,
            code TEXT NOT NULL,
            diagnosis TEXT,
            rtt_ms REAL,
            verified INTEGER NULL,
            explanation TEXT NOT NULL,
            duration_ms REAL,
            corrected INTEGER NOT NULL DEFAULT 0
        )"""
    )
    db.execute("CREATE INDEX registrations_received_at ON registrations (received_at)")
    db.execute("CREATE INDEX registrations_student ON registrations (student, received_at)")


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_m1_registrations,)
SCHEMA_VERSION = len(MIGRATIONS)


def _user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _newer_error(path: str, version: int) -> StoreError:
    return StoreError(
        f"{path}: results database has schema version {version}, but this registry "
        f"understands only up to {SCHEMA_VERSION}; it was written by a newer version. "
        "Upgrade callback-lab, or use another --db file"
    )


def _create_private(path: str) -> None:
    """Create the file 0600 before sqlite does (0644): it holds students' names and addresses."""
    if path == ":memory:" or path.startswith("file:"):
        return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise StoreError(f"{path}: cannot create results database: {e.strerror}") from e


# --- rows <-> records -------------------------------------------------------

_COLS = ", ".join(COLUMNS)
_ROW = f"({', '.join('?' for _ in COLUMNS)})"
# A record's values in column order, in C: not dataclasses.astuple (it deep-copies
# every field), and this runs once per registration, holding the GIL the event loop
# needs. sqlite3 stores the booleans as 1 and 0.
_values = operator.attrgetter(*COLUMNS)
# sqlite3 binds an exact int, float or str at once; any other value (a bool, None)
# first fails a search for an adapter (~2k instructions; a registration has about
# three). Registered, bool and None are found at the first look and bound as before:
# 1/0 and NULL ({}.get(None) is None, in C). 17.9k -> 9.9k instructions a row of
# six values, four of them None or bool (callgrind).
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(type(None), {}.get)


INSERT_ROWS = 512  # rows in one INSERT statement at most (15 bound values each)
# ...and no more than the SQLite library binds in one statement: 32,766 values since
# 3.32, 999 before (a Python built against an older system SQLite).
_VARIABLES = sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER


def _flat(records: Sequence[Record]) -> list[Any]:
    return list(itertools.chain.from_iterable(map(_values, records)))


@functools.lru_cache(maxsize=128)  # as many as sqlite3's own statement cache
def _insert(rows: int) -> str:
    """One INSERT of ``rows`` rows: a batch is one sqlite3 call, not one per row."""
    return f"INSERT INTO registrations ({_COLS}) VALUES " + ", ".join([_ROW] * rows)


def _from_row(row: Sequence[Any]) -> Record:
    values = dict(zip(COLUMNS, row, strict=True))
    values["verified"] = None if values["verified"] is None else bool(values["verified"])
    values["corrected"] = bool(values["corrected"])
    return Record(**values)


def _where(since: float | None, student: str | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if since is not None:
        clauses.append("received_at >= ?")
        params.append(since)
    if student is not None:
        clauses.append("student = ?")
        params.append(student)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


_RANK_SQL = (
    "CASE status "
    + " ".join(f"WHEN '{name}' THEN {rank}" for name, rank in STATUS_RANK.items())
    + f" ELSE {len(STATUS_RANK)} END"
)
_RANK_NAME = {rank: name for name, rank in STATUS_RANK.items()}

# The observed IP of a peer stored as "1.2.3.4:5" or "[2001:db8::1]:5".
_SOURCE_SQL = (
    "CASE WHEN substr(peer, 1, 1) = '[' AND instr(peer, ']') > 0 "
    "THEN substr(peer, 2, instr(peer, ']') - 2) "
    "WHEN instr(peer, ':') > 0 THEN substr(peer, 1, instr(peer, ':') - 1) ELSE peer END"
)

# f: the filtered rows with their rank and group (the name, or for a nameless row its
# source IP); n: each row numbered within its group twice, best first (best rank, then
# the most recent) and newest first; then one row per group.
_SUMMARY_SQL = """
WITH f AS (
    SELECT student, status, code, explanation, received_at, verified, seq, {rank} AS rank,
           CASE WHEN student IS NULL THEN {source} END AS source
    FROM registrations{where}
), n AS (
    SELECT *,
        ROW_NUMBER() OVER (PARTITION BY student, source ORDER BY rank, received_at DESC, seq DESC)
            AS best,
        ROW_NUMBER() OVER (PARTITION BY student, source ORDER BY received_at DESC, seq DESC)
            AS newest
    FROM f
)
SELECT student, source, COUNT(*), SUM(status = 'OK'), MIN(rank),
       MAX(CASE WHEN best = 1 THEN code END), MIN(CASE WHEN status = 'OK' THEN received_at END),
       MAX(received_at), MAX(COALESCE(verified, 0)), MAX(CASE WHEN newest = 1 THEN status END),
       MAX(CASE WHEN newest = 1 THEN code END), MAX(CASE WHEN newest = 1 THEN explanation END)
FROM n
GROUP BY student, source
ORDER BY student IS NULL, student COLLATE NOCASE, student, source
"""


class Store:
    """Synchronous store over one connection. Use from one thread at a time."""

    def __init__(self, db: sqlite3.Connection, path: str) -> None:
        self._db = db
        self.path = path
        # A worker group's writers queue on its flock (woken at once; SQLite's busy handler sleeps)
        self._writer_lock: int | None = None

    @classmethod
    def open(cls, path: str, *, autocheckpoint: bool = True, writer_lock: str = "") -> Store:
        """Open (creating if needed) and migrate ``path`` for writing. ``autocheckpoint=False``:
        no automatic WAL checkpoint (it runs inside the commit crossing 1,000 WAL pages,
        which then waits for two more syncs); the caller runs ``checkpoint()``.
        ``writer_lock``: a file every process writing ``path`` locks around its writes."""
        _create_private(path)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot open results database: {e}") from e
        store = cls(db, path)
        try:
            if writer_lock:
                store._writer_lock = os.open(
                    writer_lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            if not autocheckpoint:
                db.execute("PRAGMA wal_autocheckpoint = 0")
            store._migrate()
        except sqlite3.DatabaseError as e:
            store.close()
            raise StoreError(f"{path}: not a usable results database: {e}") from e
        except OSError as e:
            store.close()
            raise StoreError(f"{writer_lock}: cannot open the writers' lock: {e.strerror}") from e
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def open_readonly(cls, path: str) -> Store:
        """Open an existing database read-only (``mode=ro``): never migrates or writes.
        Without ``-wal``/``-shm`` beside it (no daemon) also ``immutable``, so a grader
        running as another user (root) leaves no ``-shm`` the daemon could not write."""
        uri = Path(path).absolute().as_uri() + "?mode=ro"
        if not (os.path.exists(path + "-wal") or os.path.exists(path + "-shm")):
            uri += "&immutable=1"
        try:
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            version = _user_version(db)
        except sqlite3.Error as e:
            raise StoreError(f"{path}: cannot read results database: {e}") from e
        if version != SCHEMA_VERSION:
            db.close()
            if version > SCHEMA_VERSION:
                raise _newer_error(path, version)
            raise StoreError(
                f"{path}: not a registry results database at schema version {SCHEMA_VERSION} "
                f"(found {version}); `registry serve --db {path}` creates or upgrades it"
            )
        return cls(db, path)

    def _migrate(self) -> None:
        if _user_version(self._db) == SCHEMA_VERSION:
            return
        with self._transaction():  # IMMEDIATE: two processes starting at once migrate once
            version = _user_version(self._db)
            if version > SCHEMA_VERSION:
                raise _newer_error(self.path, version)
            for step in MIGRATIONS[version:]:
                step(self._db)
            # user_version lives in the header page, so it commits with the schema.
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("store_migrated", path=self.path, from_version=version, to_version=SCHEMA_VERSION)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """The worker group's writers' lock, if any, held around a write."""
        if self._writer_lock is None:
            yield
            return
        _lock_within(self._writer_lock, BUSY_TIMEOUT_MS / 1000)
        try:
            yield
        finally:
            fcntl.flock(self._writer_lock, fcntl.LOCK_UN)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._writing():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self._db.execute("COMMIT")
            except BaseException:
                # A failed COMMIT may or may not have ended the transaction already.
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    @property
    def journal_mode(self) -> str:
        return str(self._db.execute("PRAGMA journal_mode").fetchone()[0])

    def record_many(self, records: Sequence[Record]) -> None:
        """Insert every record in one transaction, committed (fsynced) before returning.

        One statement in autocommit mode is its own transaction: all rows or none
        (a duplicate id fails them all), and it takes the write lock at its start,
        as BEGIN IMMEDIATE would. One sqlite3 call a batch, not BEGIN, a step per
        row and COMMIT: each call gives up the GIL and takes it back from the busy
        event loop (a futex and two context switches when pinned to one core)."""
        most = min(INSERT_ROWS, self._db.getlimit(_VARIABLES) // len(COLUMNS))
        if len(records) <= most:  # AsyncStore's batches (its max_batch)
            if records:
                with self._writing():
                    self._db.execute(_insert(len(records)), _flat(records))
            return
        with self._transaction():
            for start in range(0, len(records), most):
                chunk = records[start : start + most]
                self._db.execute(_insert(len(chunk)), _flat(chunk))

    def checkpoint(self) -> tuple[int, int]:
        """Copy the WAL into the database file; return (WAL frames, frames copied).
        PASSIVE: it never waits for a reader (a grader) and copies what it can; once all
        is copied, the next commit restarts the WAL from its start (it stops growing)."""
        _busy, frames, copied = self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(frames), int(copied)

    def query(
        self,
        *,
        since: float | None = None,
        student: str | None = None,
        limit: int | None = None,
    ) -> list[Record]:
        """Records received at or after ``since`` (exact ``student`` match), oldest first;
        with ``limit``, only the newest ``limit`` of them (a dashboard's latest rows)."""
        where, params = _where(since, student)
        sql = (
            f"SELECT {_COLS} FROM (SELECT seq, {_COLS} FROM registrations{where} "
            "ORDER BY received_at DESC, seq DESC LIMIT ?) ORDER BY received_at, seq"
        )
        params.append(-1 if limit is None else max(0, limit))  # SQLite: -1 is no limit
        return [_from_row(row) for row in self._db.execute(sql, params)]

    def last_seq(self) -> int:
        """The newest row's seq (0: none): where a reader of new rows starts."""
        return int(
            self._db.execute("SELECT coalesce(max(seq), 0) FROM registrations").fetchone()[0]
        )

    def after(self, seq: int, limit: int = 1000) -> tuple[int, list[Record]]:
        """Rows committed after row ``seq`` (oldest first, at most ``limit``) and the last
        seq seen: a later commit always has a larger seq (AUTOINCREMENT), so a reader
        polling with it never misses a row another process wrote."""
        sql = f"SELECT seq, {_COLS} FROM registrations WHERE seq > ? ORDER BY seq LIMIT ?"
        rows = self._db.execute(sql, (seq, limit)).fetchall()
        return (rows[-1][0] if rows else seq), [_from_row(row[1:]) for row in rows]

    def summary(self, *, since: float | None = None, student: str | None = None) -> list[GradeRow]:
        """Per student name, then per source IP for nameless registrations (SPEC
        "grading"): attempts, successes, best outcome, first success, last attempt."""
        where, params = _where(since, student)
        sql = _SUMMARY_SQL.format(rank=_RANK_SQL, source=_SOURCE_SQL, where=where)
        return [
            GradeRow(name, ip, n, ok, _RANK_NAME.get(rank, "?"), code, first, last, bool(v), *now)
            for name, ip, n, ok, rank, code, first, last, v, *now in self._db.execute(sql, params)
        ]

    def purge_older_than(self, cutoff: float) -> int:
        """Delete records received before ``cutoff`` (epoch seconds); return how many."""
        with self._transaction():
            cursor = self._db.execute("DELETE FROM registrations WHERE received_at < ?", (cutoff,))
        return cursor.rowcount

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM registrations").fetchone()[0])

    def count_by_status(
        self, *, since: float | None = None, student: str | None = None
    ) -> dict[str, int]:
        """Rows per status, counted by SQLite (a dashboard view must not load every row)."""
        where, params = _where(since, student)
        sql = f"SELECT status, COUNT(*) FROM registrations{where} GROUP BY status"
        return {status: int(n) for status, n in self._db.execute(sql, params)}

    def close(self) -> None:
        self._db.close()
        lock, self._writer_lock = self._writer_lock, None
        if lock is not None:
            os.close(lock)
