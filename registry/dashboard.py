"""The instructor's dashboard page: pure HTML rendering, no I/O.

``render_dashboard(page)`` returns one complete HTML document that is useful
with JavaScript off (counts per status, the per-student summary, the latest
registrations, a filter form). A small inline script then subscribes to
``/api/events`` (EventSource) and, per registration, prepends a row, bumps the
counts and updates that student's summary row.

Safety rules, because every student string here is attacker-controlled
(names, advertised addresses, explanations that quote them):

- server side, every dynamic value passes ``html.escape(..., quote=True)``
  (``_e``), in text and in attributes alike;
- client side, student text only ever reaches the DOM through
  ``textContent`` / ``setAttribute`` (never ``innerHTML``), and event data is
  parsed with ``JSON.parse``;
- the page carries no inline event handlers or style attributes, so the
  Content-Security-Policy (``CSP``) can allow exactly this one script and this
  one stylesheet by their SHA-256 hashes and nothing else (no CDN, no
  external assets, ``connect-src 'self'`` for the event stream).
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from registry.results import iso_utc
from registry.store import STATUS_RANK, Record, StudentSummary

STATUSES: tuple[str, ...] = tuple(STATUS_RANK)  # OK FAILED DENIED BUSY ERROR: best first

STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --failed: #b35900; --denied: #b42318;
  --busy: #6941c6; --error: #667085; --line: #8884; }
body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem 1.5rem; }
h1 { font-size: 1.3rem; margin: 0 0 .2rem; }
h2 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
.meta, .note { color: #667085; font-size: .85rem; margin: .1rem 0; }
.counts { display: flex; flex-wrap: wrap; gap: .6rem; margin: .8rem 0; padding: 0; }
.counts li { list-style: none; border: 1px solid var(--line); border-radius: 6px;
  padding: .3rem .8rem; min-width: 5rem; }
.counts b { display: block; font-size: 1.4rem; font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .2rem .5rem; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { position: sticky; top: 0; background: Canvas; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td.x { font-size: .8rem; max-width: 32rem; }
td.t { white-space: nowrap; font-variant-numeric: tabular-nums; }
.st { font-weight: 600; }
.st-OK { color: var(--ok); } .st-FAILED { color: var(--failed); }
.st-DENIED { color: var(--denied); } .st-BUSY { color: var(--busy); }
.st-ERROR { color: var(--error); }
tr.new { animation: flash 2s ease-out; }
@keyframes flash { from { background: #fde68a88; } to { background: transparent; } }
form { display: flex; flex-wrap: wrap; gap: .5rem; align-items: end; margin: .6rem 0; }
label { font-size: .8rem; display: flex; flex-direction: column; }
#live { font-weight: 600; }
""".strip()

SCRIPT = """
(function () {
  "use strict";
  var RANK = {OK: 0, FAILED: 1, DENIED: 2, BUSY: 3, ERROR: 4};
  var body = document.body;
  var limit = parseInt(body.getAttribute("data-limit"), 10) || 100;
  var only = body.hasAttribute("data-student") ? body.getAttribute("data-student") : null;
  var regs = document.getElementById("registrations");
  var students = document.getElementById("students");
  var live = document.getElementById("live");
  function when(iso) { return iso ? String(iso).slice(0, 19).replace("T", " ") : ""; }
  function text(x) { return x === null || x === undefined ? "" : String(x); }
  function yesno(x) { return x === null || x === undefined ? "" : (x ? "yes" : "no"); }
  function known(s) { return Object.prototype.hasOwnProperty.call(RANK, s); }
  function cell(tr, value, cls) {
    var td = document.createElement("td");
    td.textContent = value;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
    return td;
  }
  function status(tr, s) { return cell(tr, text(s), known(s) ? "st st-" + s : "st"); }
  function bump(id, by) {
    var el = document.getElementById(id);
    if (el) { el.textContent = String((parseInt(el.textContent, 10) || 0) + by); }
  }
  function dropPlaceholder(id) {
    var el = document.getElementById(id);
    if (el && el.parentNode) { el.parentNode.removeChild(el); }
  }
  function addRegistration(r) {
    var tr = document.createElement("tr");
    tr.className = "new";
    cell(tr, when(r.received_at), "t");
    cell(tr, r.student === null ? "(no name)" : text(r.student));
    status(tr, r.status);
    cell(tr, text(r.code));
    cell(tr, text(r.peer));
    cell(tr, text(r.target));
    cell(tr, text(r.diagnosis));
    cell(tr, text(r.rtt_ms), "n");
    cell(tr, yesno(r.verified));
    cell(tr, text(r.explanation), "x");
    cell(tr, text(r.id));
    dropPlaceholder("no-registrations");
    regs.insertBefore(tr, regs.firstChild);
    while (regs.rows.length > limit) { regs.deleteRow(regs.rows.length - 1); }
  }
  function newStudentRow(key, r) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-student", key);
    tr.setAttribute("data-rank", "99");
    cell(tr, r.student === null ? "(no name)" : key);
    status(tr, "");
    cell(tr, "");
    cell(tr, "0", "n");
    cell(tr, "0", "n");
    cell(tr, "", "t");
    cell(tr, "", "t");
    cell(tr, "no");
    var rows = students.rows, i;
    for (i = 0; i < rows.length; i++) {
      var other = rows[i].getAttribute("data-student");
      if (key !== "" && (other === "" || other.toLowerCase() > key.toLowerCase())) { break; }
    }
    students.insertBefore(tr, i < rows.length ? rows[i] : null);
    dropPlaceholder("no-students");
    return tr;
  }
  function updateStudent(r) {
    var key = r.student === null ? "" : text(r.student), tr = null, i;
    for (i = 0; i < students.rows.length; i++) {
      if (students.rows[i].getAttribute("data-student") === key) { tr = students.rows[i]; break; }
    }
    if (tr === null) { tr = newStudentRow(key, r); }
    var c = tr.cells, rank = known(r.status) ? RANK[r.status] : 98;
    if (rank <= parseInt(tr.getAttribute("data-rank"), 10)) {
      tr.setAttribute("data-rank", String(rank));
      c[1].textContent = text(r.status);
      c[1].className = known(r.status) ? "st st-" + r.status : "st";
      c[2].textContent = text(r.code);
    }
    c[3].textContent = String((parseInt(c[3].textContent, 10) || 0) + 1);
    if (r.status === "OK") {
      c[4].textContent = String((parseInt(c[4].textContent, 10) || 0) + 1);
      if (!c[5].textContent) { c[5].textContent = when(r.received_at); }
    }
    c[6].textContent = when(r.received_at);
    if (r.verified === true) { c[7].textContent = "yes"; }
  }
  function onRecord(e) {
    var r;
    try { r = JSON.parse(e.data); } catch (err) { return; }
    if (!r || typeof r !== "object") { return; }
    if (only !== null && text(r.student) !== only) { return; }
    addRegistration(r);
    updateStudent(r);
    if (known(r.status)) { bump("count-" + r.status, 1); }
    bump("count-total", 1);
  }
  if (!window.EventSource) { return; }
  var hadError = false;
  var source = new EventSource("/api/events");
  live.textContent = "connecting\\u2026";
  source.onopen = function () {
    if (hadError) { window.location.reload(); return; }  // resync what was missed
    live.textContent = "live";
    body.setAttribute("data-live", "open");
  };
  source.onerror = function () {
    hadError = true;
    body.setAttribute("data-live", "error");
    live.textContent = source.readyState === EventSource.CLOSED
      ? "live updates stopped: reload the page" : "reconnecting\\u2026";
  };
  source.onmessage = onRecord;
})();
""".strip()


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only the two blocks above may run or style the page; everything else is refused.
CSP = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_sha256_source(SCRIPT)}",
        f"style-src {_sha256_source(STYLE)}",
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
    summaries: Sequence[StudentSummary]
    counts: Mapping[str, int]
    generated_at: float
    version: str = ""
    policy_mode: str = ""
    listening: Sequence[str] = ()
    limit: int = 100
    student: str | None = None  # the filter, when the page is narrowed to one student
    since: str | None = None  # the filter as typed (e.g. "2h")
    draining: bool = False


def status_counts(records: Iterable[Record]) -> dict[str, int]:
    """Records per status (every known status present, zero when absent) plus ``total``."""
    return complete_counts(Counter(r.status for r in records))


def complete_counts(counted: Mapping[str, int]) -> dict[str, int]:
    """Every known status (zero when absent) plus ``total``, from per-status counts."""
    counts = {s: counted.get(s, 0) for s in STATUSES}
    counts["total"] = sum(counted.values())
    return counts


def _e(value: object) -> str:
    """Escape for HTML text and double-quoted attributes; None is empty."""
    return "" if value is None else html.escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    return "" if ts is None else iso_utc(ts)[:19].replace("T", " ")


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}".rstrip("0").rstrip(".")


def _yes_no(x: bool | None) -> str:
    return "" if x is None else ("yes" if x else "no")


def _status(value: str) -> str:
    cls = f"st st-{value}" if value in STATUS_RANK else "st"
    return f'<td class="{cls}">{_e(value)}</td>'


def _counts(counts: Mapping[str, int]) -> str:
    items = [*STATUSES, "total"]
    return "".join(
        f'<li><span class="{"st st-" + k if k in STATUS_RANK else ""}">{_e(k)}</span>'
        f'<b id="count-{k}">{int(counts.get(k, 0))}</b></li>'
        for k in items
    )


def _registration_row(r: Record) -> str:
    cells = (
        f'<td class="t">{_e(_when(r.received_at))}</td>',
        f"<td>{_e(r.student) if r.student is not None else '(no name)'}</td>",
        _status(r.status),
        f"<td>{_e(r.code)}</td>",
        f"<td>{_e(r.peer)}</td>",
        f"<td>{_e(r.target)}</td>",
        f"<td>{_e(r.diagnosis)}</td>",
        f'<td class="n">{_e(_num(r.rtt_ms))}</td>',
        f"<td>{_e(_yes_no(r.verified))}</td>",
        f'<td class="x">{_e(r.explanation)}</td>',
        f"<td>{_e(r.id)}</td>",
    )
    return "<tr>" + "".join(cells) + "</tr>"


def _summary_row(s: StudentSummary) -> str:
    key = s.student if s.student is not None else ""
    rank = STATUS_RANK.get(s.best_status, 98)
    cells = (
        f"<td>{_e(s.student) if s.student is not None else '(no name)'}</td>",
        _status(s.best_status),
        f"<td>{_e(s.best_code)}</td>",
        f'<td class="n">{int(s.attempts)}</td>',
        f'<td class="n">{int(s.successes)}</td>',
        f'<td class="t">{_e(_when(s.first_success_at))}</td>',
        f'<td class="t">{_e(_when(s.last_attempt_at))}</td>',
        f"<td>{_e(_yes_no(s.verified_ever))}</td>",
    )
    return f'<tr data-student="{_e(key)}" data-rank="{rank}">' + "".join(cells) + "</tr>"


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
        '<form method="get" action="/">'
        f'<label>student<input name="student" value="{_e(page.student)}" size="16"></label>'
        f'<label>since<input name="since" value="{_e(page.since)}" size="16" '
        'placeholder="2h, 2026-11-25T10:00"></label>'
        f'<label>rows<input name="limit" value="{int(page.limit)}" size="5"></label>'
        '<button type="submit">filter</button> <a href="/">clear</a></form>'
    )


def _body_attrs(page: Page) -> str:
    attrs = f'data-limit="{int(page.limit)}"'
    if page.student is not None:
        attrs += f' data-student="{_e(page.student)}"'
    return attrs


def render_dashboard(page: Page) -> str:
    """The whole dashboard document (escaped; see the module docstring)."""
    newest_first = [_registration_row(r) for r in reversed(page.records)]
    summaries = [_summary_row(s) for s in page.summaries]
    state = "draining: shutting down" if page.draining else "running"
    narrowed = ""
    if page.student is not None or page.since:
        narrowed = f" (filtered: student={_e(page.student or '*')}, since={_e(page.since or '*')})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>Callback registry: dashboard</title>
<style>{STYLE}</style></head>
<body {_body_attrs(page)}>
<h1>Callback registry</h1>
<p class="meta">version {_e(page.version)} &middot; policy {_e(page.policy_mode)} &middot;
registrations on {_e(", ".join(page.listening) or "-")} &middot; {_e(state)} &middot;
page rendered {_e(_when(page.generated_at))} UTC &middot;
<span id="live">static page: reload for new registrations</span></p>
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
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>"
        f"<body><h1>{_e(title)}</h1><p>{_e(message)}</p></body></html>\n"
    )


__all__ = ["CSP", "SCRIPT", "STATUSES", "STYLE", "Page", "render_dashboard", "render_message"]
