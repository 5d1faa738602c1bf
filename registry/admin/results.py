"""``registry results``: every recorded registration, or the grade sheet (docs/grading.md).

The database is opened read-only, so grading during a class never blocks or
changes the running daemon. ``table`` is for a terminal: long cells cut with
``…``, control characters escaped (a name cannot move the cursor). ``csv``:
times ISO 8601 UTC, yes/no, and any text cell starting with ``= + - @`` (or
tab/CR) gets a leading ``'``, so a spreadsheet shows a student's
``=HYPERLINK(...)`` as text instead of running it. ``json``: the same keys,
raw text.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from registry import config as config_mod
from registry.admin.core import grading
from registry.errors import ConfigError
from registry.model import GradeRow
from registry.store import Record, Store, StoreError

FORMATS = ("table", "csv", "json")
EXIT_USAGE = 64  # sysexits EX_USAGE, as in registry.cli
EXIT_NO_DB = 2

CSV_COLUMNS: tuple[str, ...] = (
    "id", "received_at", "protocol", "student", "peer", "target", "status", "code",
    "diagnosis", "rtt_ms", "verified", "advertised", "explanation", "duration_ms", "corrected",
)  # fmt: skip
# The grade sheet: one row per student (roster order when there is a roster).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "student", "source", "best_status", "best_code", "first_success_at",
    "attempts", "successes", "verified_ever", "last_attempt_at",
)  # fmt: skip

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SINCE_HELP = (
    "an ISO 8601 date or time (2026-11-25, 2026-11-25T10:00, 2026-11-25T10:00Z, "
    "2026-11-25T10:00+01:00; without a zone it is local time) or an age such as 30m, 2h, 7d"
)


# --- parsing ------------------------------------------------------------------


def parse_since(text: str, now: float) -> float:
    """``--since`` value -> epoch seconds: an ISO 8601 date/time (naive = local
    time) or a duration ago (``90s``, ``30m``, ``2h``, ``7d``, ``1w``)."""
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"expected {_SINCE_HELP}; got {text!r}") from None
    return when.timestamp()  # a naive datetime is taken as local time


# --- cell formatting --------------------------------------------------------------


def iso_utc(ts: float) -> str:
    """Epoch seconds -> ``2026-11-25T10:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def cell(value: object) -> str:
    """A JSON value as display text: empty for null, yes/no, numbers without trailing zeros."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def when(ts: float | None) -> str:
    """``2026-11-25 10:00:00`` (UTC, to the second; the headers say UTC)."""
    return "" if ts is None else iso_utc(ts)[:19].replace("T", " ")


def csv_safe(text: str) -> str:
    """Neutralise spreadsheet formulas: a leading ``'`` before ``= + - @`` (and tab/CR)."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _printable(text: str) -> str:
    """Escape control characters (ANSI escapes, newlines) for a terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def record_json(r: Record) -> dict[str, Any]:
    item: dict[str, Any] = {c: getattr(r, c) for c in CSV_COLUMNS}
    item["received_at"] = iso_utc(r.received_at)
    for key in ("rtt_ms", "duration_ms"):
        item[key] = None if item[key] is None else round(item[key], 3)
    return item


def grade_json(s: GradeRow) -> dict[str, Any]:
    """SPEC "grading": ``student`` (or null) and ``source`` (the IP of a nameless row)."""
    item = {f.name: getattr(s, f.name) for f in fields(GradeRow) if f.name != "on_roster"}
    for key in ("first_success_at", "last_attempt_at"):
        item[key] = None if item[key] is None else iso_utc(item[key])
    return item


# --- the three formats -------------------------------------------------------------


def _csv(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(csv_safe(row[c]) for c in columns)
    return buf.getvalue()


# (column, header, max width, right-aligned); widths fit an IPv6 endpoint.
_TABLE = (
    ("received_at", "received (UTC)", 19, False),
    ("id", "id", 12, False),
    ("student", "student", 20, False),
    ("peer", "peer", 47, False),
    ("target", "target", 47, False),
    ("status", "status", 6, False),
    ("code", "code", 20, False),
    ("diagnosis", "diagnosis", 22, False),
    ("rtt_ms", "rtt_ms", 9, True),
    ("verified", "verified", 8, False),
)
_SUMMARY_TABLE = (
    ("student", "student", 40, False),
    ("attempts", "attempts", 8, True),
    ("successes", "successes", 9, True),
    ("best_status", "best", 6, False),
    ("best_code", "code", 20, False),
    ("first_success_at", "first success (UTC)", 19, False),
    ("last_attempt_at", "last attempt (UTC)", 19, False),
    ("verified_ever", "verified", 8, False),
)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(
    rows: Sequence[dict[str, str]], spec: Sequence[tuple[str, str, int, bool]], noun: str
) -> str:
    cells = [[_cut(_printable(row[key]), limit) for key, _, limit, _ in spec] for row in rows]
    headers = [header for _, header, _, _ in spec]
    widths = [max([len(h)] + [len(line[i]) for line in cells]) for i, h in enumerate(headers)]
    right = [r for *_, r in spec]

    def line(values: Sequence[str]) -> str:
        parts = (
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        )
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    out.append(f"{len(rows)} {noun}{'' if len(rows) == 1 else 's'}")
    return "\n".join(out) + "\n"


def _render(
    items: list[dict[str, Any]],
    fmt: str,
    columns: Sequence[str],
    spec: Sequence[tuple[str, str, int, bool]],
    noun: str,
) -> str:
    if fmt == "json":
        return json.dumps(items, indent=2, ensure_ascii=False) + "\n"
    cells = [{k: cell(v) for k, v in item.items()} for item in items]
    if fmt == "csv":
        return _csv(cells, columns)
    if fmt == "table":  # 2026-11-25T10:00:00.123Z -> 2026-11-25 10:00:00 (the header says UTC)
        for c in cells:
            c.update({k: v[:19].replace("T", " ") for k, v in c.items() if k.endswith("_at")})
        return _table(cells, spec, noun)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def render(records: list[Record], fmt: str) -> str:
    """Records as ``table``, ``csv`` or ``json`` text (see the module docstring)."""
    return _render([record_json(r) for r in records], fmt, CSV_COLUMNS, _TABLE, "registration")


def render_grades(rows: list[GradeRow], fmt: str) -> str:
    """Grade rows (grading.grade) as ``table``, ``csv`` (the grade sheet) or ``json``."""
    items = [grade_json(r) for r in rows]
    if fmt == "table":
        items = [{**i, "student": r.label} for i, r in zip(items, rows, strict=True)]
    return _render(items, fmt, SUMMARY_COLUMNS, _SUMMARY_TABLE, "student")


# --- the command ---------------------------------------------------------------------


def student_name(text: str) -> str:
    """A student name as the parsers store it (NFC): a decomposed josé still finds josé,
    and ``registry token`` derives the token the registry will check."""
    from registry.protocol.names import BadName, normalise

    try:
        return normalise(text, spaces=True)
    except BadName as exc:
        raise argparse.ArgumentTypeError(f"student name {text!r} {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``registry results`` options."""
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=None,
        help="SQLite results file (default: server.db of --config, else registry.db)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="table", help="output format (default table)"
    )
    parser.add_argument(
        "--since", metavar="WHEN", help=f"only registrations since WHEN: {_SINCE_HELP}"
    )
    parser.add_argument(
        "--student",
        metavar="NAME",
        type=student_name,
        help="only this student (exact name, in either Unicode spelling)",
    )
    parser.add_argument(
        "--summary",
        action="store_true",
        help="one line per student (the grade sheet): best outcome, first success, "
        "attempts; nameless registrations by source IP",
    )
    parser.add_argument(
        "--roster",
        metavar="FILE",
        help="class roster CSV (student, optional address): every student gets a "
        "row, in roster order (default: [class] roster of --config)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="the registry's config file, for its [class] roster"
    )
    parser.epilog = (
        "CSV cells that start with = + - @ get a leading ' so spreadsheets do not run "
        "student-supplied formulas. The database is opened read-only."
    )


def _fail(message: str, status: int) -> int:
    print(f"registry results: {message}", file=sys.stderr)
    return status


def run(args: argparse.Namespace, *, clock: Callable[[], float] = time.time) -> int:
    """Print the registrations (or ``--summary``); 0, 2 (no/bad db) or 64 (bad --since)."""
    since: float | None = None
    if args.since is not None:
        try:
            since = parse_since(args.since, clock())
        except ValueError as e:
            return _fail(f"--since: {e}", EXIT_USAGE)
    try:
        db, roster = _sources(args)
    except ConfigError as e:
        for problem in e.problems:
            print(f"registry results: {problem}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.isfile(db):
        return _fail(
            f"no results database at {db!r}; pass --db PATH, or start "
            "`registry serve` in that directory first",
            EXIT_NO_DB,
        )
    try:
        store = Store.open_readonly(db)
        try:
            if args.summary:
                groups = store.summary(since=since, student=args.student)
                rows = grading.grade(groups, roster if args.student is None else None)
                text = render_grades(rows, args.format)
            else:
                text = render(store.query(since=since, student=args.student), args.format)
        finally:
            store.close()
    except (StoreError, sqlite3.Error) as e:
        return _fail(str(e), EXIT_NO_DB)
    return _write(text)


def _sources(args: argparse.Namespace) -> tuple[str, grading.Roster | None]:
    """The database (--db, else the config's server.db, as `registry serve` opens it) and
    the roster (--roster, else the config's [class] roster)."""
    cfg = config_mod.load(args.config) if args.config else None
    db = args.db if args.db is not None else cfg.server.db if cfg is not None else "registry.db"
    if args.roster:
        return db, grading.read_roster(args.roster)
    return db, grading.load_roster(cfg) if cfg is not None else None


def _write(text: str) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A student's name must not crash the listing on a non-UTF-8 terminal.
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `registry results | head`: stop quietly; point stdout at devnull so the
        # interpreter's final flush does not complain (Python docs' SIGPIPE note).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
