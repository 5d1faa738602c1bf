"""The instructor's pages: HTML rendering of values, no I/O but reading ``static/`` once.

``render_class`` is the class view at ``/``, made to be projected (who is
connected, who is stuck, in plain words; no ids or ports). Without JavaScript
it is complete, in UTC, and reloads itself every 30 s; its script shows local
times and re-reads ``/api/summary`` on every event. ``render_dashboard`` is the
detailed view at ``/registrations``; its script adds each new registration.

Every student string is attacker-controlled: server side every dynamic value
passes ``_e`` (``html.escape``, quotes too); client side student text reaches
the DOM only through ``textContent``/``setAttribute``. No inline handlers or
style attributes, so the CSP allows exactly the ``static/`` files, by hash.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from registry.admin.core.grading import ago, stuck_first
from registry.admin.results import cell, iso_utc, when
from registry.model import STATUS_RANK, GradeRow
from registry.store import Record

STATUSES: tuple[str, ...] = tuple(STATUS_RANK)  # OK FAILED DENIED BUSY ERROR: best first


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


STYLE, SCRIPT, CLASS_STYLE, CLASS_SCRIPT = (
    (Path(__file__).parent / "static" / name).read_text(encoding="utf-8")
    for name in ("dashboard.css", "dashboard.js", "class.css", "class.js")
)
# Only these may run or style a page; everything else is refused.
CSP = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_sha256_source(SCRIPT)} {_sha256_source(CLASS_SCRIPT)}",
        f"style-src {_sha256_source(STYLE)} {_sha256_source(CLASS_STYLE)}",
        "connect-src 'self'",
        "img-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    )
)


@dataclass(frozen=True, slots=True)
class Page:
    """Everything one dashboard rendering shows (the handler gathers it)."""

    records: Sequence[Record]  # oldest first, as Store.query returns them
    summaries: Sequence[GradeRow]
    counts: Mapping[str, int]
    generated_at: float
    version: str = ""
    policy_mode: str = ""
    listening: Sequence[str] = ()
    limit: int = 100
    student: str | None = None  # the filter, when the page is narrowed to one student
    since: str | None = None  # the filter as typed (e.g. "2h")
    draining: bool = False


def complete_counts(counted: Mapping[str, int]) -> dict[str, int]:
    """Every known status (zero when absent) plus ``total``, from per-status counts."""
    counts = {s: counted.get(s, 0) for s in STATUSES}
    counts["total"] = sum(counted.values())
    return counts


def _e(value: object) -> str:
    """Escape for HTML text and double-quoted attributes; None is empty."""
    return "" if value is None else html.escape(str(value), quote=True)


def _td(value: object, cls: str = "") -> str:
    return f'<td class="{cls}">{_e(value)}</td>' if cls else f"<td>{_e(value)}</td>"


def _status(value: str) -> str:
    return _td(value, f"st st-{value}" if value in STATUS_RANK else "st")


def _counts(counts: Mapping[str, int]) -> str:
    return "".join(
        f'<li><span class="{"st st-" + k if k in STATUS_RANK else ""}">{_e(k)}</span>'
        f'<b id="count-{k}">{int(counts.get(k, 0))}</b></li>'
        for k in (*STATUSES, "total")
    )


def _registration_row(r: Record) -> str:
    return "<tr>" + "".join((
        _td(when(r.received_at), "t"),
        _td(r.student if r.student is not None else "(no name)"),
        _status(r.status),
        *map(_td, (r.code, r.peer, r.target, r.diagnosis)),
        _td(cell(r.rtt_ms), "n"),
        _td(cell(r.verified)),
        _td(r.explanation, "x"),
        _td(r.id),
    )) + "</tr>"  # fmt: skip


def _summary_row(s: GradeRow) -> str:
    rank = STATUS_RANK.get(s.best_status or "", 98)
    nameless = " data-nameless" if s.student is None else ""
    return f'<tr data-student="{_e(s.label)}" data-rank="{rank}"{nameless}>' + "".join((
        _td(s.label),
        _status(s.best_status or ""),
        _td(s.best_code),
        _td(int(s.attempts), "n"),
        _td(int(s.successes), "n"),
        _td(when(s.first_success_at), "t"),
        _td(when(s.last_attempt_at), "t"),
        _td(cell(s.verified_ever)),
    )) + "</tr>"  # fmt: skip


_REG_HEAD = (
    "received (UTC)", "student", "status", "code", "peer", "target",
    "diagnosis", "rtt ms", "verified", "explanation", "id",
)  # fmt: skip
_SUM_HEAD = (
    "student", "best", "code", "attempts", "successes",
    "first success (UTC)", "last attempt (UTC)", "verified",
)  # fmt: skip


def _table(head: Sequence[str], body_id: str, rows: list[str], empty_id: str, empty: str) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    if not rows:
        rows = [f'<tr id="{empty_id}"><td colspan="{len(head)}">{_e(empty)}</td></tr>']
    return (
        f'<table><thead><tr>{th}</tr></thead><tbody id="{body_id}">'
        + "\n".join(rows)
        + "</tbody></table>"
    )


def _filter_form(page: Page) -> str:
    return (
        '<form method="get" action="/registrations">'
        f'<label>student<input name="student" value="{_e(page.student)}" size="16"></label>'
        f'<label>since<input name="since" value="{_e(page.since)}" size="16" '
        'placeholder="2h, 2026-11-25T10:00"></label>'
        f'<label>rows<input name="limit" value="{int(page.limit)}" size="5"></label>'
        '<button type="submit">filter</button> <a href="/registrations">clear</a></form>'
    )


def _body_attrs(page: Page) -> str:
    attrs = f'data-limit="{int(page.limit)}"'
    if page.student is not None:
        attrs += f' data-student="{_e(page.student)}"'
    return attrs


def _head(title: str, style: str, extra: str = "") -> str:
    """The document's start, up to ``</head>``: the same for every page."""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        f"<title>{title}</title>\n{extra}<style>{style}</style></head>"
    )


def _narrowed(page: Page) -> str:
    """What the page's filter narrows it to, for a heading ("" when nothing)."""
    if page.student is None and not page.since:
        return ""
    return f" (filtered: student={_e(page.student or '*')}, since={_e(page.since or '*')})"


def render_dashboard(page: Page) -> str:
    """The whole dashboard document (escaped; see the module docstring)."""
    newest_first = [_registration_row(r) for r in reversed(page.records)]
    summaries = [_summary_row(s) for s in page.summaries]
    state = "draining: shutting down" if page.draining else "running"
    narrowed = _narrowed(page)
    return f"""{_head("Callback registry: registrations", STYLE)}
<body {_body_attrs(page)}>
<h1>Callback registry</h1>
<p class="meta">version {_e(page.version)} &middot; policy {_e(page.policy_mode)} &middot;
registrations on {_e(", ".join(page.listening) or "-")} &middot; {_e(state)} &middot;
page rendered {_e(when(page.generated_at))} UTC &middot;
<span id="live">static page: reload for new registrations</span></p>
<p class="meta"><a href="/">&larr; class view</a> &middot;
<a href="/api/summary.csv">grade sheet (CSV)</a></p>
{_filter_form(page)}
<ul class="counts">{_counts(page.counts)}</ul>
<h2>Students{narrowed}</h2>
<p class="note">best outcome of each student's attempts (OK &gt; FAILED &gt; DENIED &gt; BUSY &gt; ERROR)</p>
{_table(_SUM_HEAD, "students", summaries, "no-students", "no students yet")}
<h2>Latest registrations{narrowed}</h2>
<p class="note">newest first, at most {int(page.limit)} rows &middot;
JSON: <a href="/api/registrations">/api/registrations</a>, <a href="/api/summary">/api/summary</a>
&middot; <a href="/metrics">/metrics</a></p>
{_table(_REG_HEAD, "registrations", newest_first, "no-registrations", "no registrations yet")}
<script>{SCRIPT}</script>
</body></html>
"""


def render_message(title: str, message: str) -> str:
    """A minimal escaped HTML page for errors (401, 404...) under the same CSP."""
    return (
        f"{_head(_e(title), STYLE)}<body><h1>{_e(title)}</h1><p>{_e(message)}</p></body></html>\n"
    )


# --- the class view ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClassPage:
    rows: Sequence[GradeRow]
    klass: Mapping[str, int]  # grading.class_counts
    generated_at: float
    send_to: Sequence[str]  # HOST:PORT strings students can reach
    version: str = ""
    draining: bool = False
    student: str | None = None
    since: str | None = None


def _iso(ts: float) -> str:
    return iso_utc(ts)[:19] + "Z"


def _class_row(r: GradeRow, now: float) -> tuple[str, str]:
    """(list id, <li>) for one student: what a person at the back of the room reads."""
    if r.done:
        state, words = "done", "connected, verified" if r.verified_ever else "connected"
        at = r.first_success_at
        when = "" if at is None else (
            f'<time datetime="{_iso(at)}" data-kind="at">connected at {_iso(at)}</time>'
        )  # fmt: skip
    elif not r.attempts:
        state, words, when = "waiting", "not started", ""
    else:
        state = "stuck"
        words = f"{r.last_status or ''}: {r.last_explanation or r.last_code or ''}"
        at = r.last_attempt_at or now
        when = f'<time datetime="{_iso(at)}" data-kind="ago">last tried {_e(ago(now - at))}</time>'
    item = (
        f'<li class="{state}"><span class="who">{_e(r.label)}</span>'
        f'<span class="what">{_e(words)}</span><span class="when">{when}</span></li>'
    )
    return ("done" if state == "done" else "working"), item


def _send_banner(send_to: Sequence[str]) -> str:
    if not send_to:
        return '<p class="banner">Registrations are not being accepted.</p>'
    where = " or ".join(f"<b>{_e(a)}</b>" for a in send_to[:4])
    return f'<p class="banner">Send <b>IP:PORT</b> to {where}</p>'


def render_class(page: ClassPage) -> str:
    """The class view (see the module docstring); every student string escaped."""
    lists: dict[str, list[str]] = {"working": [], "done": []}
    for row in stuck_first(page.rows):
        where, item = _class_row(row, page.generated_at)
        lists[where].append(item)
    k = page.klass
    state = " &middot; draining: shutting down" if page.draining else ""
    narrowed = _narrowed(page)
    # Without JavaScript the class view reloads itself; with it, it updates live.
    refresh = '<noscript><meta http-equiv="refresh" content="30"></noscript>\n'
    return f"""{_head("Callback lab: the class", CLASS_STYLE, refresh)}
<body>
{_send_banner(page.send_to)}
<h1 id="headline"><span id="connected">{int(k.get("connected", 0))}</span> of
<span id="students">{int(k.get("students", 0))}</span> students connected</h1>
<p class="sub"><span id="not-started">{int(k.get("not_started", 0))}</span> not started{narrowed}
&middot; <a href="/registrations">all registrations</a>
&middot; <a href="/api/summary.csv" download>grade sheet (CSV)</a></p>
<h2>Still working (<span id="working-count">{len(lists["working"])}</span>)</h2>
<ol id="working">{"".join(lists["working"])}</ol>
<h2>Connected (<span id="done-count">{len(lists["done"])}</span>)</h2>
<ol id="done">{"".join(lists["done"])}</ol>
<p class="meta">callback-lab {_e(page.version)} &middot; page made {_iso(page.generated_at)}
(times in UTC until the page's script shows your local time){state}</p>
<script>{CLASS_SCRIPT}</script>
</body></html>
"""
