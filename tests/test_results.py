"""``registry results``: parsing --since, the three formats, and the command.

Every database is a real SQLite file in tmp_path; the clock is passed in.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from registry.admin import results
from registry.admin.results import CSV_COLUMNS, iso_utc, parse_since, render, render_grades
from registry.model import GradeRow
from registry.store import Store
from tests.test_store import T0, rec

NOW = T0
HEADER = "id,received_at,protocol,student,peer,target,status,code,diagnosis,rtt_ms,verified"


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


# --- parse_since ------------------------------------------------------------------

VALID_SINCE = [
    ("2h", NOW - 7200),
    ("30m", NOW - 1800),
    ("7d", NOW - 7 * 86400),
    ("90s", NOW - 90),
    ("1w", NOW - 604800),
    ("1.5h", NOW - 5400),
    (" 2H ", NOW - 7200),
    ("2026-11-25T10:00:00Z", datetime.fromisoformat("2026-11-25T10:00:00+00:00").timestamp()),
    ("2026-11-25T10:00Z", datetime.fromisoformat("2026-11-25T10:00:00+00:00").timestamp()),
    ("2026-11-25T10:00+01:00", datetime.fromisoformat("2026-11-25T09:00:00+00:00").timestamp()),
    ("2026-11-25T10:00", datetime(2026, 11, 25, 10, 0).timestamp()),  # naive: local time
    ("2026-11-25", datetime(2026, 11, 25).timestamp()),  # local midnight
    ("2026-11-25 10:00:30.5", datetime(2026, 11, 25, 10, 0, 30, 500000).timestamp()),
]


@pytest.mark.parametrize(("text", "expected"), VALID_SINCE)
def test_parse_since_accepts(text: str, expected: float) -> None:
    assert parse_since(text, NOW) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["", "yesterday", "2h ago", "-2h", "2x", "h", "10", "2026-13-01", "2026-11-25T25:00"]
)
def test_parse_since_rejects_with_a_clear_message(text: str) -> None:
    with pytest.raises(ValueError, match=r"ISO 8601 .* 30m, 2h, 7d; got"):
        parse_since(text, NOW)


def test_iso_utc_has_milliseconds_and_z() -> None:
    assert iso_utc(1_700_000_000.123) == "2023-11-14T22:13:20.123Z"
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"


# --- CSV ---------------------------------------------------------------------------


def test_csv_header_is_exact() -> None:
    lines = render([rec(1)], "csv").splitlines()
    assert lines[0].startswith(HEADER + ",")
    assert lines[0] == ",".join(CSV_COLUMNS)
    assert CSV_COLUMNS[11:] == ("advertised", "explanation", "duration_ms", "corrected")


def test_csv_cells() -> None:
    rows = read_csv(render([rec(1), rec(2, verified=False), rec(3, verified=None)], "csv"))
    first = dict(zip(rows[0], rows[1], strict=True))
    assert first == {
        "id": "r1", "received_at": iso_utc(T0 + 1), "protocol": "text", "student": "alice",
        "peer": "127.0.0.1:40000", "target": "127.0.0.1:15000", "status": "OK",
        "code": "connected", "diagnosis": "direct", "rtt_ms": "1.25", "verified": "yes",
        "advertised": "127.0.0.1:15000", "explanation": "the registry connected",
        "duration_ms": "3.5", "corrected": "no",
    }  # fmt: skip
    assert [r[CSV_COLUMNS.index("verified")] for r in rows[1:]] == ["yes", "no", ""]


@pytest.mark.parametrize(
    ("student", "cell"),
    [
        ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
        ("+1+2", "'+1+2"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\t=1", "'\t=1"),
        ("alice", "alice"),
        ("a=b", "a=b"),  # only a leading character starts a formula
    ],
)
def test_csv_guards_formula_injection(student: str, cell: str) -> None:
    record = rec(1, student=student, advertised=student, explanation=student)
    rows = read_csv(render([record], "csv"))
    row = dict(zip(rows[0], rows[1], strict=True))
    assert row["student"] == row["advertised"] == row["explanation"] == cell
    assert json.loads(render([record], "json"))[0]["student"] == student  # JSON stays raw


@pytest.mark.parametrize(
    "student", ["Doe, Jane", 'say "hi"', "two\nlines", "crlf\r\nname", 'a,"b"\n,c', "Zoë 学生"]
)
def test_csv_round_trips_awkward_names(student: str) -> None:
    rows = read_csv(render([rec(1, student=student), rec(2)], "csv"))
    assert len(rows) == 3
    assert rows[1][CSV_COLUMNS.index("student")] == student
    assert rows[2][CSV_COLUMNS.index("student")] == "alice"


# --- JSON and table ------------------------------------------------------------------


def test_json_is_a_list_of_objects_with_the_csv_keys() -> None:
    records = [rec(1), rec(2, verified=False, rtt_ms=None), rec(3, verified=None, student=None)]
    items = json.loads(render(records, "json"))
    assert [list(item) for item in items] == [list(CSV_COLUMNS)] * 3
    assert [i["verified"] for i in items] == [True, False, None]
    assert items[0]["received_at"] == iso_utc(T0 + 1) and items[0]["rtt_ms"] == 1.25
    assert items[1]["rtt_ms"] is None and items[2]["student"] is None
    assert json.loads(render([], "json")) == []


@pytest.mark.parametrize("n", [0, 1, 3])
def test_table_has_a_row_per_record_and_a_count(n: int) -> None:
    lines = render([rec(i) for i in range(n)], "table").splitlines()
    assert lines[0].split()[:3] == ["received", "(UTC)", "id"]
    assert len(lines) == n + 3  # header, rule, rows, count
    assert lines[-1] == f"{n} registration{'' if n == 1 else 's'}"
    assert sum(line.startswith("2027-01-15 ") for line in lines) == n


def test_table_truncates_and_escapes_student_text() -> None:
    long_name = "x" * 60
    text = render([rec(1, student=long_name), rec(2, student="\x1b[31mred\nname")], "table")
    assert "\x1b" not in text and "\\x1b[31mred\\nname" in text
    assert long_name not in text and "x" * 19 + "…" in text
    widths = {len(line) for line in text.splitlines()[:2]}
    assert len(widths) == 1  # header and rule align


def test_unknown_format_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        render([], "xml")
    with pytest.raises(ValueError, match="unknown format"):
        render_grades([], "yaml")


SUMMARIES = [
    GradeRow("=ann", None, 3, 1, "OK", "connected", T0, T0 + 5, True),
    GradeRow(None, "192.168.1.105", 1, 0, "FAILED", "timeout", None, T0 + 9, False,
             last_status="FAILED", last_code="timeout", last_explanation="nobody answered"),
    GradeRow("zoë", None, on_roster=True),  # on the roster, not started
]  # fmt: skip


def test_summary_formats() -> None:
    rows = read_csv(render_grades(SUMMARIES, "csv"))
    assert rows[0] == list(results.SUMMARY_COLUMNS)
    assert rows[0][:6] == ["student", "source", "best_status", "best_code", "first_success_at", "attempts"]  # fmt: skip
    assert rows[1] == [
        "'=ann",
        "",
        "OK",
        "connected",
        iso_utc(T0),
        "3",
        "1",
        "yes",
        iso_utc(T0 + 5),
    ]
    assert rows[2] == [
        "",
        "192.168.1.105",
        "FAILED",
        "timeout",
        "",
        "1",
        "0",
        "no",
        iso_utc(T0 + 9),
    ]
    assert rows[3] == ["zoë", "", "", "", "", "0", "0", "no", ""]
    items = json.loads(render_grades(SUMMARIES, "json"))
    assert items[1] == {
        "student": None, "source": "192.168.1.105", "attempts": 1, "successes": 0,
        "best_status": "FAILED", "best_code": "timeout", "first_success_at": None,
        "last_attempt_at": iso_utc(T0 + 9), "verified_ever": False, "last_status": "FAILED",
        "last_code": "timeout", "last_explanation": "nobody answered",
    }  # fmt: skip
    assert items[2]["student"] == "zoë" and items[2]["best_status"] is None
    assert items[2]["attempts"] == 0
    table = render_grades(SUMMARIES, "table").splitlines()
    assert len(table) == 6 and table[-1] == "3 students"
    assert "(no name) 192.168.1.105" in table[3]


# --- the command ----------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="registry results")
    results.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.fixture
def filled_db(tmp_path: Path) -> Path:
    path = tmp_path / "registry.db"
    store = Store.open(str(path))
    store.record_many([rec(1), rec(2, student="bob", status="FAILED", code="timeout"), rec(3)])
    store.close()
    return path


def test_defaults() -> None:
    args = parse()
    assert (results._sources(args), args.format, args.since, args.student, args.summary) == (
        ("registry.db", None), "table", None, None, False
    )  # fmt: skip


def test_run_on_missing_db_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.db"
    assert results.run(parse("--db", str(missing))) == 2
    out, err = capsys.readouterr()
    assert out == "" and "no results database" in err and str(missing) in err
    assert not missing.exists()  # looking does not create it


def test_run_with_bad_since_exits_64(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert results.run(parse("--db", str(filled_db), "--since", "last tuesday")) == 64
    assert "--since" in capsys.readouterr().err


def test_run_on_a_newer_db_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 42")
    assert results.run(parse("--db", str(path))) == 2
    assert "newer version" in capsys.readouterr().err


def test_run_filters_and_formats(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ("--db", str(filled_db), "--format", "csv", "--since", "2026-01-01", "--student", "bob")
    assert results.run(parse(*argv)) == 0
    rows = read_csv(capsys.readouterr().out)
    assert [r[0] for r in rows] == ["id", "r2"]
    since = ("--db", str(filled_db), "--format", "json", "--since", "30s")
    assert results.run(parse(*since), clock=lambda: T0 + 32) == 0  # since T0 + 2
    assert [i["id"] for i in json.loads(capsys.readouterr().out)] == ["r2", "r3"]


def test_run_summary(filled_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert results.run(parse("--db", str(filled_db), "--summary", "--format", "json")) == 0
    items = json.loads(capsys.readouterr().out)
    assert [(i["student"], i["attempts"], i["best_status"]) for i in items] == [
        ("alice", 2, "OK"),
        ("bob", 1, "FAILED"),
    ]


def test_run_summary_nameless_by_source_and_with_a_roster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two machines running the lab's C++ client (no name): two rows; a roster names them,
    keeps its order and lists who has not started."""
    path = tmp_path / "registry.db"
    store = Store.open(str(path))
    store.record_many(
        [
            rec(1, student=None, peer="192.168.1.105:40001"),
            rec(2, student=None, peer="192.168.1.107:40001", status="FAILED", code="timeout"),
            rec(3, student=None, peer="192.168.1.105:40002", status="DENIED", code="bad_port"),
        ]
    )
    store.close()
    capsys.readouterr()  # the store's own log lines
    assert results.run(parse("--db", str(path), "--summary", "--format", "json")) == 0
    items = json.loads(capsys.readouterr().out)
    assert [(i["student"], i["source"], i["attempts"], i["best_status"]) for i in items] == [
        (None, "192.168.1.105", 2, "OK"),
        (None, "192.168.1.107", 1, "FAILED"),
    ]
    assert results.run(parse("--db", str(path), "--summary")) == 0
    assert "(no name) 192.168.1.107" in capsys.readouterr().out
    roster = tmp_path / "class.csv"
    roster.write_text("student,address\nzoë,\nbea,192.168.1.107\nali,192.168.1.105\n")
    argv = ("--db", str(path), "--summary", "--format", "csv", "--roster", str(roster))
    assert results.run(parse(*argv)) == 0
    sheet = read_csv(capsys.readouterr().out)
    assert [(r[0], r[1], r[2], r[5]) for r in sheet[1:]] == [
        ("zoë", "", "", "0"),
        ("bea", "", "FAILED", "1"),
        ("ali", "", "OK", "2"),
    ]
    roster.write_text("student,address\nbea,192.168.1.300\n")
    assert results.run(parse(*argv)) == 64
    assert f"{roster}:2: address '192.168.1.300' is not an IP address" in capsys.readouterr().err


def test_run_with_a_config_reads_its_database_and_its_roster(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config alone is the grade sheet of that registry: its server.db and its roster."""
    real = results.config_mod.loads
    path = tmp_path / "class.db"
    store = Store.open(str(path))
    store.record_many([rec(1, student=None, peer="192.168.1.105:40001")])
    store.close()
    (tmp_path / "class.csv").write_text("student,address\nali,192.168.1.105\nbea,\n")
    config = tmp_path / "registry.toml"
    config.write_text(f'[server]\ndb = "{path}"\n\n[class]\nroster = "class.csv"\n')
    capsys.readouterr()
    loads = []
    monkeypatch.setattr(results.config_mod, "loads", lambda *a: loads.append(a) or real(*a))
    assert results.run(parse("--config", str(config), "--summary", "--format", "csv")) == 0
    assert len(loads) == 1  # one reading of the config gives both the database and the roster
    sheet = read_csv(capsys.readouterr().out)
    assert [(r[0], r[2]) for r in sheet[1:]] == [("ali", "OK"), ("bea", "")]
    # --db still wins over the config's database
    missing = tmp_path / "other.db"
    assert results.run(parse("--config", str(config), "--db", str(missing), "--summary")) == 2
    assert str(missing) in capsys.readouterr().err


def test_run_reads_without_changing_the_database(
    filled_db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (sorted(os.listdir(filled_db.parent)), filled_db.read_bytes())
    assert results.run(parse("--db", str(filled_db))) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 registrations"
    assert (sorted(os.listdir(filled_db.parent)), filled_db.read_bytes()) == before


def test_results_imports_no_trio() -> None:
    """`registry results` is a plain read of a file: the daemon's event loop stays out of it."""
    probe = "import sys, registry.admin.results; print(sorted(sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert "trio" not in loaded.stdout.split("'") and "registry.store.aio" not in loaded.stdout
