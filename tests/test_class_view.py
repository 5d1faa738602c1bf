"""The class view (registry/admin/pages.py render_class, pure): order, words, escaping, CSP."""

from __future__ import annotations

import re

import pytest

from registry.admin.pages import CLASS_SCRIPT, CLASS_STYLE, CSP, ClassPage, render_class
from registry.model import GradeRow
from tests.test_dashboard import HOSTILE, parse, sha256_source

NOW = 1_800_000_000.0


def page(rows: list[GradeRow], **kw: object) -> ClassPage:
    values: dict[str, object] = {
        "rows": rows,
        "klass": {"students": len(rows), "connected": 1, "not_started": 1},
        "generated_at": NOW,
        "send_to": ["192.168.1.10:9000", "[2001:db8::10]:9000"],
        "version": "9.9",
    }
    values.update(kw)
    return ClassPage(**values)  # type: ignore[arg-type]


ROWS = [
    GradeRow("done", None, 2, 1, "OK", "connected", NOW - 600, NOW - 300, True),
    GradeRow("waiting", None, on_roster=True),
    GradeRow(
        None, "192.168.1.105", 3, 0, "FAILED", "timeout", None, NOW - 180, False,
        last_status="DENIED", last_code="port_not_allowed",
        last_explanation="port 80 is outside the allowed range 1024-65535",
    ),
]  # fmt: skip


def who(markup: str) -> list[str]:
    return re.findall(r'<span class="who">([^<]*)</span>', markup)


def test_stuck_first_then_not_started_then_done_with_words_and_times() -> None:
    markup = render_class(page(ROWS))
    assert who(markup) == ["(no name) 192.168.1.105", "waiting", "done"]
    assert "DENIED: port 80 is outside the allowed range 1024-65535" in markup
    assert "last tried 3 min ago" in markup
    assert ">not started<" in markup
    assert "connected at 2027-01-15T07:50:00Z" in markup  # UTC until the script runs
    headline = re.sub(r"<[^>]+>|\s+", " ", markup.split('<h1 id="headline">')[1].split("</h1>")[0])
    assert " ".join(headline.split()) == "1 of 3 students connected"
    assert '<span id="not-started">1</span> not started' in markup


def test_banner_names_every_address_and_no_ports_of_students() -> None:
    markup = render_class(page(ROWS))
    assert "Send <b>IP:PORT</b> to <b>192.168.1.10:9000</b> or <b>[2001:db8::10]:9000</b>" in markup
    assert "Registrations are not being accepted" in render_class(page(ROWS, send_to=[]))


@pytest.mark.parametrize("evil", HOSTILE)
def test_hostile_names_and_words_stay_text(evil: str) -> None:
    rows = [
        GradeRow(evil, None, 1, 0, "FAILED", "timeout", None, NOW, False, "FAILED", "x", evil),
        GradeRow(None, evil, 1, 1, "OK", "connected", NOW, NOW, False),
    ]
    markup = render_class(page(rows, student=evil, since=evil))
    parsed = parse(markup)
    assert parsed.scripts == [CLASS_SCRIPT] and parsed.styles == [CLASS_STYLE]
    assert not any(name.startswith("on") for _, attrs in parsed.tags for name in attrs)
    assert any(evil in chunk for chunk in parsed.text)
    assert evil not in markup or not re.search(r"[<>\"'&]", evil)


def test_csp_allows_the_class_script_and_style_and_no_script_reloads() -> None:
    markup = render_class(page(ROWS))
    parsed = parse(markup)
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert sha256_source(parsed.scripts[0]) in directives["script-src"].split()
    assert sha256_source(parsed.styles[0]) in directives["style-src"].split()
    assert '<noscript><meta http-equiv="refresh" content="30"></noscript>' in markup
