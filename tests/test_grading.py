"""Grading (registry/admin/core/grading.py, pure): the roster, one row per student, the class view's order."""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
from pathlib import Path

import pytest

from registry import config as config_mod
from registry.admin.core import grading
from registry.admin.core.grading import (
    ago,
    class_counts,
    grade,
    parse_roster,
    stuck_first,
)
from registry.errors import ConfigError
from registry.model import GradeRow
from tests.support import exe, run_registry
from tests.test_admin import fetch

T0 = 1_800_000_000.0


def group(student: str | None, source: str | None = None, **kw: object) -> GradeRow:
    values: dict[str, object] = {
        "student": student,
        "attempts": 1,
        "successes": 0,
        "best_status": "FAILED",
        "best_code": "timeout",
        "first_success_at": None,
        "last_attempt_at": T0,
        "verified_ever": False,
        "source": source,
        "last_status": "FAILED",
        "last_code": "timeout",
        "last_explanation": "nobody answered",
    }
    values.update(kw)
    return GradeRow(**values)  # type: ignore[arg-type]


# --- the roster ---------------------------------------------------------------------------


def test_roster_columns_order_bom_blank_lines_and_nfc() -> None:
    text = "\ufeffAddress, Student ,email\n192.168.1.5,ali,a@x\n\n,Jose\u0301,\n[::ffff:10.0.0.9],bea,\n"
    roster = parse_roster(text, "class.csv")
    assert [(e.student, e.address, e.line) for e in roster.entries] == [
        ("ali", ipaddress.ip_address("192.168.1.5"), 2),
        ("José", None, 4),  # NFC: one precomposed é
        ("bea", ipaddress.ip_address("10.0.0.9"), 5),  # mapped IPv6 is the IPv4 address
    ]
    assert len(roster) == 3


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "class.csv:1: empty file"),
        ("name,address\nali,\n", "class.csv:1: no 'student' column"),
        ("student\nali\nali\n", "class.csv:3: student 'ali' already on line 2"),
        ("student,address\nali,10.0.0.300\n", "class.csv:2: address '10.0.0.300' is not an IP"),
        ("student,address\nali,10.0.0.1\nbea,10.0.0.1\n", "class.csv:3: address 10.0.0.1 already"),
        ("student\nal\u202eice\n", "class.csv:2: student name contains the invisible character U+202E"),
        ("student,address\n,10.0.0.1\n", "class.csv:2: student name is empty"),
        ("student\n" + "x" * 65 + "\n", "class.csv:2: student name is 65 characters long"),
        ("student\n\"ali,bea\"\n", "class.csv:2: student name contains U+002C (COMMA)"),
    ],
)  # fmt: skip
def test_bad_roster_names_the_file_and_line(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_roster(text, "class.csv")
    assert any(p.startswith(f"class.roster: {problem}") for p in caught.value.problems), (
        caught.value.problems
    )


def test_every_bad_row_is_listed() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_roster("student,address\nali,x\nbea,y\ncat,10.0.0.1\n", "c.csv")
    assert [p.split(": ")[1] for p in caught.value.problems] == ["c.csv:2", "c.csv:3"]


def test_config_roster_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "class.csv").write_text("student\nali\n")
    cfg_file = tmp_path / "registry.toml"
    cfg_file.write_text('[class]\nroster = "class.csv"\n')
    cfg = config_mod.load(str(cfg_file))
    assert cfg.class_.roster == str(tmp_path / "class.csv")
    roster = grading.load_roster(cfg)
    assert roster is not None and [e.student for e in roster.entries] == ["ali"]
    assert grading.load_roster(config_mod.Config()) is None
    cfg_file.write_text('[class]\nroster = "missing.csv"\n')
    with pytest.raises(ConfigError, match=r"class.roster: .*missing.csv: cannot read"):
        grading.load_roster(config_mod.load(str(cfg_file)))


def test_a_roster_too_large_is_refused_not_cut_mid_row(tmp_path: Path) -> None:
    rows = "".join(f"student{i}\n" for i in range(400_000))  # about 5 MB
    (tmp_path / "class.csv").write_text("student\n" + rows)
    cfg_file = tmp_path / "registry.toml"
    cfg_file.write_text('[class]\nroster = "class.csv"\n')
    with pytest.raises(ConfigError, match=r"class.csv: larger than 4 MiB"):
        grading.load_roster(config_mod.load(str(cfg_file)))


# --- grade rows ---------------------------------------------------------------------------


def test_without_roster_names_then_sources_in_address_order() -> None:
    rows = grade(
        [
            group("bob"),
            group(None, "192.168.1.20"),
            group("Ann"),
            group(None, "192.168.1.3"),
            group(None, "2001:db8::1"),
        ]
    )
    assert [r.label for r in rows] == [
        "Ann",
        "bob",
        "(no name) 192.168.1.3",
        "(no name) 192.168.1.20",
        "(no name) 2001:db8::1",
    ]
    assert class_counts(rows, None) == {"students": 5, "connected": 0, "not_started": 0}


def test_roster_order_not_started_rows_and_nameless_from_a_roster_address() -> None:
    roster = parse_roster("student,address\nzoë,\nbea,192.168.1.7\nali,192.168.1.5\n", "c.csv")
    rows = grade(
        [
            group("ali", attempts=2, best_status="FAILED", last_attempt_at=T0 + 5),
            # ali's machine, nameless (the lab's C++ client): it counts for ali
            group(
                None, "192.168.1.5", best_status="OK", best_code="connected", successes=1,
                first_success_at=T0 + 9, last_attempt_at=T0 + 9, verified_ever=True,
                last_status="OK", last_code="connected", last_explanation="fine",
            ),
            group("visitor"),
            group(None, "192.168.1.99"),
        ],
        roster,
    )  # fmt: skip
    assert [(r.label, r.attempts, r.best_status, r.on_roster) for r in rows] == [
        ("zoë", 0, None, True),
        ("bea", 0, None, True),
        ("ali", 3, "OK", True),
        ("visitor", 1, "FAILED", False),
        ("(no name) 192.168.1.99", 1, "FAILED", False),
    ]
    ali = rows[2]
    assert (ali.successes, ali.first_success_at, ali.last_attempt_at) == (1, T0 + 9, T0 + 9)
    assert ali.verified_ever and ali.last_explanation == "fine" and ali.source is None
    # M is the roster; N only roster students; K every row without an attempt
    assert class_counts(rows, roster) == {"students": 3, "connected": 1, "not_started": 2}


def test_merge_keeps_the_best_and_the_latest() -> None:
    a = GradeRow(
        "ali", None, 2, 0, "DENIED", "bad_port", None, T0 + 1, False, "DENIED", "bad_port", "a"
    )
    b = GradeRow("ali", None, 1, 0, "FAILED", "timeout", None, T0, False, "FAILED", "timeout", "b")
    merged = grading.merge(a, b)
    assert (merged.attempts, merged.best_status, merged.best_code) == (3, "FAILED", "timeout")
    assert (merged.last_status, merged.last_explanation, merged.last_attempt_at) == (
        "DENIED",
        "a",
        T0 + 1,
    )


def test_stuck_first_then_not_started_then_done() -> None:
    rows = [
        GradeRow("done-late", None, 1, 1, "OK", first_success_at=T0 + 50, last_attempt_at=T0 + 50),
        GradeRow("stuck-old", None, 1, 0, "FAILED", last_attempt_at=T0 + 1),
        GradeRow("waiting", None),
        GradeRow("done-early", None, 1, 1, "OK", first_success_at=T0 + 2, last_attempt_at=T0 + 60),
        GradeRow("stuck-new", None, 4, 0, "DENIED", last_attempt_at=T0 + 30),
    ]
    assert [r.label for r in stuck_first(rows)] == [
        "stuck-new",
        "stuck-old",
        "waiting",
        "done-early",
        "done-late",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "just now"), (9.9, "just now"), (10, "10 s ago"), (59, "59 s ago"), (60, "1 min ago"),
     (180, "3 min ago"), (3599, "59 min ago"), (3600, "1 h ago"), (86400 * 2, "2 d ago")],
)  # fmt: skip
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


# --- the real executables -----------------------------------------------------------------


@pytest.mark.slow
def test_check_config_reports_a_bad_roster_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "class.csv").write_text("student,address\nali,10.0.0.1\nbea,not-an-ip\n")
    cfg = tmp_path / "registry.toml"
    cfg.write_text('[class]\nroster = "class.csv"\n')
    done = subprocess.run(
        [exe("registry"), "check-config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert f"{tmp_path / 'class.csv'}:3: address 'not-an-ip' is not an IP address" in done.stdout
    (tmp_path / "class.csv").write_text("student,address\nali,10.0.0.1\nbea,\n")
    done = subprocess.run(
        [exe("registry"), "check-config", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and "class       2 students in" in done.stdout


@pytest.mark.slow
def test_serve_loads_the_roster_and_sighup_reloads_it(tmp_path: Path) -> None:
    roster = tmp_path / "class.csv"
    roster.write_text("student\nali\n")
    config = '[class]\nroster = "class.csv"\n'
    with run_registry(tmp_path, config=config, admin="127.0.0.1:0") as reg:
        assert reg.admin is not None
        port = int(reg.admin.rsplit(":", 1)[1])

        def summary() -> dict[str, object]:
            return json.loads(fetch(port, "/api/summary")[2])

        assert summary()["class"] == {"students": 1, "connected": 0, "not_started": 1}
        roster.write_text("student\nali\nbea\ncem\n")
        reg.proc.send_signal(signal.SIGHUP)
        reg.wait_event("reloaded")
        got = summary()
        assert got["class"] == {"students": 3, "connected": 0, "not_started": 3}
        assert [s["student"] for s in got["students"]] == ["ali", "bea", "cem"]  # type: ignore[index]
        roster.write_text("student\nali\nali\n")  # bad: the old roster stays
        reg.proc.send_signal(signal.SIGHUP)
        (failed,) = reg.wait_event("reload_failed")
        assert any("class.csv:3: student 'ali' already on line 2" in p for p in failed["problems"])
        assert summary()["class"] == {"students": 3, "connected": 0, "not_started": 3}
        assert reg.stop() == 0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_refuses_to_start_with_a_bad_roster(tmp_path: Path, workers: int) -> None:
    (tmp_path / "class.csv").write_text("student\nali\nali\n")
    cfg = tmp_path / "registry.toml"
    cfg.write_text(f'[server]\nworkers = {workers}\n\n[class]\nroster = "class.csv"\n')
    cmd = [exe("registry"), "serve", "--config", str(cfg), "--db", str(tmp_path / "r.db")]
    cmd += ["--listen", "127.0.0.1:0", "--admin", "off"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 78  # EX_CONFIG, as for any bad config
    assert "class.csv:3: student 'ali' already on line 2" in done.stderr
    assert not (tmp_path / "r.db").exists()  # stopped before opening anything
