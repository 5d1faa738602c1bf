"""The dashboard's only stylesheets and scripts (inline, allowed by hash in the CSP).

Student text only ever reaches the DOM through ``textContent`` /
``setAttribute`` (never ``innerHTML``); event and summary data are parsed
with ``JSON.parse``.
"""

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
  function host(peer) {
    var p = text(peer);
    if (p.charAt(0) === "[") { return p.slice(1, p.indexOf("]")); }
    return p.lastIndexOf(":") > 0 ? p.slice(0, p.lastIndexOf(":")) : p;
  }
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
    if (r.student === null) { tr.setAttribute("data-nameless", ""); }
    cell(tr, key);
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
      if (r.student !== null && (rows[i].hasAttribute("data-nameless") ||
          other.toLowerCase() > key.toLowerCase())) { break; }
    }
    students.insertBefore(tr, i < rows.length ? rows[i] : null);
    dropPlaceholder("no-students");
    return tr;
  }
  function updateStudent(r) {
    var key = r.student === null ? "(no name) " + host(r.peer) : text(r.student), tr = null, i;
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


# The class view (/): large type for a projector, one column of rows that wrap
# instead of scrolling sideways at 1024 px.
CLASS_STYLE = """
:root { color-scheme: light dark; --ok: #1a7f37; --bad: #b42318; --wait: #667085;
  --line: #8884; }
* { box-sizing: border-box; }
html { font-size: clamp(18px, 0.9vw + 10px, 28px); }
body { font: 1rem/1.35 system-ui, sans-serif; margin: 0 auto; padding: .6rem 1.2rem;
  max-width: 90rem; overflow-wrap: anywhere; }
.banner { font-size: 1.5rem; padding: .5rem .9rem; border-radius: 8px; margin: 0 0 .6rem;
  background: #1d4ed81a; border: 2px solid #1d4ed8; }
.banner b { font-family: ui-monospace, monospace; white-space: nowrap; }
h1 { font-size: 2.3rem; margin: .2rem 0; }
.sub { font-size: 1.2rem; margin: 0 0 .6rem; color: var(--wait); }
.sub a { color: inherit; }
h2 { font-size: 1.3rem; margin: .9rem 0 .3rem; }
ol { list-style: none; margin: 0; padding: 0; }
li { display: grid; grid-template-columns: minmax(6rem, 14rem) 1fr auto; gap: .2rem 1rem;
  padding: .35rem .4rem; border-bottom: 1px solid var(--line); align-items: baseline; }
.who { font-weight: 700; font-size: 1.2rem; }
.what { font-size: .9rem; }
.when { font-size: .9rem; color: var(--wait); white-space: nowrap; }
.stuck .who { color: var(--bad); } .waiting .who { color: var(--wait); }
/* The row a teacher must spot from the back of the room: a red band, not just red ink. */
.stuck { background: #b423181f; border-left: .45rem solid var(--bad); }
.stuck .what { font-size: 1rem; }
.done .who { color: var(--ok); }
.meta { font-size: .8rem; color: var(--wait); margin-top: 1rem; }
@media (max-width: 700px) { li { grid-template-columns: 1fr; } }
""".strip()

CLASS_SCRIPT = """
(function () {
  "use strict";
  var body = document.body;
  function text(x) { return x === null || x === undefined ? "" : String(x); }
  function set(id, v) { var el = document.getElementById(id); if (el) { el.textContent = v; } }
  function ago(iso) {
    var s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
    if (s < 10) { return "just now"; }
    if (s < 60) { return Math.floor(s) + " s ago"; }
    if (s < 3600) { return Math.floor(s / 60) + " min ago"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h ago"; }
    return Math.floor(s / 86400) + " d ago";
  }
  function local(iso) {
    var d = new Date(iso);
    return isNaN(d.getTime()) ? text(iso) : d.toLocaleTimeString();
  }
  function localize() {
    var times = document.querySelectorAll("time[data-kind]"), i;
    for (i = 0; i < times.length; i++) {
      var t = times[i], iso = t.getAttribute("datetime"), kind = t.getAttribute("data-kind");
      t.textContent = kind === "ago" ? "last tried " + ago(iso) : "connected at " + local(iso);
    }
  }
  function span(cls, value) {
    var el = document.createElement("span");
    el.className = cls;
    el.textContent = value;
    return el;
  }
  function row(r) {
    var li = document.createElement("li"), state, words, t = null;
    var who = r.student === null ? "(no name) " + text(r.source) : text(r.student);
    if (r.best_status === "OK") {
      state = "done";
      words = r.verified_ever ? "connected, verified" : "connected";
    } else if (!r.attempts) {
      state = "waiting";
      words = "not started";
    } else {
      state = "stuck";
      words = text(r.last_status) + ": " + text(r.last_explanation || r.last_code);
    }
    li.className = state;
    li.appendChild(span("who", who));
    li.appendChild(span("what", words));
    var when = span("when", "");
    var iso = state === "done" ? r.first_success_at : r.last_attempt_at;
    if (state !== "waiting" && iso) {
      t = document.createElement("time");
      t.setAttribute("datetime", text(iso));
      t.setAttribute("data-kind", state === "done" ? "at" : "ago");
      when.appendChild(t);
    }
    li.appendChild(when);
    return {li: li, state: state, r: r};
  }
  function fill(id, items) {
    var list = document.getElementById(id);
    while (list.firstChild) { list.removeChild(list.firstChild); }
    items.forEach(function (x) { list.appendChild(x.li); });
  }
  function render(data) {
    if (!data || typeof data !== "object" || !data["class"]) { return; }
    var k = data["class"], rows = (data.students || []).map(row);
    var stuck = rows.filter(function (x) { return x.state === "stuck"; });
    var waiting = rows.filter(function (x) { return x.state === "waiting"; });
    var done = rows.filter(function (x) { return x.state === "done"; });
    stuck.sort(function (a, b) { return a.r.last_attempt_at < b.r.last_attempt_at ? 1 : -1; });
    done.sort(function (a, b) { return a.r.first_success_at > b.r.first_success_at ? 1 : -1; });
    set("connected", String(k.connected));
    set("students", String(k.students));
    set("not-started", String(k.not_started));
    set("working-count", String(stuck.length + waiting.length));
    set("done-count", String(done.length));
    fill("working", stuck.concat(waiting));
    fill("done", done);
    localize();
  }
  var pending = false;
  function refresh() {
    if (pending) { return; }
    pending = true;
    window.setTimeout(function () {
      fetch("/api/summary" + window.location.search, {credentials: "same-origin"})
        .then(function (resp) { return resp.ok ? resp.text() : null; })
        .then(function (t) { pending = false; if (t) { render(JSON.parse(t)); } })
        .catch(function () { pending = false; });
    }, 300);
  }
  localize();
  window.setInterval(localize, 30000);
  if (!window.EventSource || !window.fetch) { return; }
  var source = new EventSource("/api/events");
  source.onopen = function () { body.setAttribute("data-live", "open"); refresh(); };
  source.onerror = function () { body.setAttribute("data-live", "error"); };
  source.onmessage = refresh;
})();
""".strip()
