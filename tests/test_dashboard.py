"""Dashboard rendering (pure): escaping, structure, CSP hashes, counts.

The rendered page is parsed back with the stdlib HTML parser, so the tests
check what a browser would build (elements, attributes, text), not substrings
of the markup alone.
"""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

from registry.admin import pages as dashboard
from registry.admin.pages import (
    CLASS_SCRIPT,
    CLASS_STYLE,
    CSP,
    SCRIPT,
    STYLE,
    Page,
    complete_counts,
    render_dashboard,
)
from registry.model import GradeRow
from registry.store import Record

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "'><svg onload=alert(3)>",
    "</textarea></td></tr></table><iframe src=//evil>",
    "&lt;already escaped&gt; & ampersand",
    "javascript:alert(4)",
)


def record(n: int, **kw: object) -> Record:
    values: dict[str, object] = {
        "id": f"id{n:04d}",
        "received_at": 1_795_000_000.0 + n,
        "protocol": "text",
        "student": f"s{n}",
        "peer": "127.0.0.1:40000",
        "advertised": "127.0.0.1:15000",
        "target": "127.0.0.1:15000",
        "status": "OK",
        "code": "connected",
        "diagnosis": "direct",
        "rtt_ms": 0.25,
        "verified": True,
        "explanation": "fine",
        "duration_ms": 1.0,
        "corrected": False,
    }
    values.update(kw)
    return Record(**values)  # type: ignore[arg-type]


def summary(student: str | None, **kw: object) -> GradeRow:
    values: dict[str, object] = {
        "student": student,
        "source": "10.0.0.5" if student is None else None,
        "attempts": 2,
        "successes": 1,
        "best_status": "OK",
        "best_code": "connected",
        "first_success_at": 1_795_000_000.0,
        "last_attempt_at": 1_795_000_100.0,
        "verified_ever": True,
    }
    values.update(kw)
    return GradeRow(**values)  # type: ignore[arg-type]


@dataclass
class Parsed(HTMLParser):
    """Elements, attributes and text as a browser's tokenizer sees them."""

    tags: list[tuple[str, dict[str, str | None]]] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    scripts: list[str] = field(default_factory=list)
    styles: list[str] = field(default_factory=list)
    _in: str | None = None

    def __post_init__(self) -> None:
        super().__init__(convert_charrefs=True)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag in ("script", "style") else None

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)
        else:
            self.text.append(data)


def parse(markup: str) -> Parsed:
    p = Parsed()
    p.feed(markup)
    p.close()
    return p


def page(**kw: object) -> Page:
    values: dict[str, object] = {
        "records": [],
        "summaries": [],
        "counts": complete_counts({}),
        "generated_at": 1_795_000_200.0,
        "version": "0.1.0",
        "policy_mode": "strict",
        "listening": ["127.0.0.1:9000"],
    }
    values.update(kw)
    return Page(**values)  # type: ignore[arg-type]


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@pytest.mark.parametrize("evil", HOSTILE)
@pytest.mark.parametrize("where", ["student", "advertised", "target", "explanation", "diagnosis"])
def test_hostile_record_fields_stay_text(evil: str, where: str) -> None:
    rec = record(1, **{where: evil})
    summ = summary(evil if where == "student" else "bob")
    markup = render_dashboard(page(records=[rec], summaries=[summ], student=evil, since=evil))
    parsed = parse(markup)
    # The only script is ours, the only style is ours; no element grew an event handler.
    assert parsed.scripts == [SCRIPT] and parsed.styles == [STYLE]
    assert [t for t, _ in parsed.tags].count("script") == 1
    assert {t for t, _ in parsed.tags} <= {
        "html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "span", "form",
        "label", "input", "button", "a", "ul", "li", "b", "table", "thead", "tbody", "tr",
        "th", "td", "script",
    }  # fmt: skip
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    # The hostile string survives as text, exactly, and never verbatim in the markup
    # (unless it holds nothing to escape, like "javascript:alert(4)" as plain text).
    assert any(evil in chunk for chunk in parsed.text)
    assert evil not in markup or not re.search(r"[<>\"'&]", evil)


def test_filter_values_round_trip_through_attributes() -> None:
    evil = HOSTILE[1]
    parsed = parse(render_dashboard(page(student=evil, since=evil, records=[record(1)])))
    body = next(attrs for tag, attrs in parsed.tags if tag == "body")
    assert body["data-student"] == evil
    inputs = {a["name"]: a["value"] for t, a in parsed.tags if t == "input"}
    assert inputs["student"] == evil and inputs["since"] == evil


def test_summary_rows_carry_the_student_key_and_rank() -> None:
    parsed = parse(
        render_dashboard(
            page(
                summaries=[
                    summary("alice"),
                    summary(HOSTILE[0], best_status="FAILED", best_code="timeout"),
                    summary(None, best_status="ERROR", best_code="malformed"),
                ]
            )
        )
    )
    rows = [(a["data-student"], a["data-rank"]) for t, a in parsed.tags if "data-rank" in a]
    assert rows == [("alice", "0"), (HOSTILE[0], "1"), ("(no name) 10.0.0.5", "4")]
    assert "(no name) 10.0.0.5" in parsed.text


def test_registrations_are_newest_first_with_times_in_utc() -> None:
    markup = render_dashboard(page(records=[record(1), record(2), record(3)]))
    ids = re.findall(r"<td>(id\d{4})</td>", markup)
    assert ids == ["id0003", "id0002", "id0001"]
    assert "2026-11-18 11:06:43" in markup  # 1_795_000_003 in UTC


def test_empty_page_has_placeholders_and_zero_counts() -> None:
    markup = render_dashboard(page())
    assert 'id="no-registrations"' in markup and 'id="no-students"' in markup
    for status in (*dashboard.STATUSES, "total"):
        assert f'<b id="count-{status}">0</b>' in markup


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([], {"OK": 0, "FAILED": 0, "DENIED": 0, "BUSY": 0, "ERROR": 0, "total": 0}),
        (["OK", "OK", "DENIED"], {"OK": 2, "FAILED": 0, "DENIED": 1, "BUSY": 0, "ERROR": 0, "total": 3}),
        (["ERROR", "BUSY", "FAILED"], {"OK": 0, "FAILED": 1, "DENIED": 0, "BUSY": 1, "ERROR": 1, "total": 3}),
    ],
)  # fmt: skip
def test_status_counts(statuses: list[str], expected: dict[str, int]) -> None:
    assert complete_counts(Counter(statuses)) == expected
    markup = render_dashboard(page(counts=expected))
    for key, value in expected.items():
        assert f'<b id="count-{key}">{value}</b>' in markup


def test_csp_allows_exactly_the_inline_script_and_style_by_hash() -> None:
    parsed = parse(render_dashboard(page(records=[record(1)])))
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    # This page's script and style, and the class view's (one CSP for every page).
    assert (
        directives["script-src"]
        == f"{sha256_source(parsed.scripts[0])} {sha256_source(CLASS_SCRIPT)}"
    )
    assert (
        directives["style-src"] == f"{sha256_source(parsed.styles[0])} {sha256_source(CLASS_STYLE)}"
    )
    assert directives["connect-src"] == "'self'"
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP and "http" not in CSP


@pytest.mark.parametrize("script", [SCRIPT, CLASS_SCRIPT], ids=["registrations", "class"])
def test_script_never_writes_markup(script: str) -> None:
    # Student text reaches the DOM only through textContent / setAttribute.
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script
    assert "textContent" in script and "JSON.parse" in script


def test_no_external_assets() -> None:
    markup = render_dashboard(page(records=[record(1)]))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", markup)
    assert "<link" not in markup


def test_draining_and_meta_line() -> None:
    markup = render_dashboard(page(draining=True, version="9.9", policy_mode="nat-observed"))
    assert "draining" in markup and "version 9.9" in markup and "policy nat-observed" in markup


def test_message_page_escapes() -> None:
    parsed = parse(dashboard.render_message(HOSTILE[0], HOSTILE[1]))
    assert parsed.scripts == []
    assert HOSTILE[0] in parsed.text and HOSTILE[1] in parsed.text


@pytest.mark.slow
def test_the_pages_files_are_package_data(tmp_path: Path) -> None:
    """An installed registry (not an editable checkout) has the static/ files beside pages.py:
    setuptools' build_py, which wheels are made from, copies them (from a clean copy of the
    sources: an egg-info left by an earlier build would list them whatever pyproject says)."""
    src, out = tmp_path / "src", tmp_path / "build"
    shutil.copytree(
        ROOT / "registry", src / "registry", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py"]
    subprocess.run([*build, "-d", str(out)], cwd=src, check=True, capture_output=True)
    shipped = out / "registry" / "admin" / "static"
    assert sorted(p.name for p in shipped.glob("*")) == [
        "class.css", "class.js", "dashboard.css", "dashboard.js"
    ]  # fmt: skip
    assert (shipped / "dashboard.js").read_text() == SCRIPT
