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
  live.textContent = "connecting\u2026";
  source.onopen = function () {
    if (hadError) { window.location.reload(); return; }  // resync what was missed
    live.textContent = "live";
    body.setAttribute("data-live", "open");
  };
  source.onerror = function () {
    hadError = true;
    body.setAttribute("data-live", "error");
    live.textContent = source.readyState === EventSource.CLOSED
      ? "live updates stopped: reload the page" : "reconnecting\u2026";
  };
  source.onmessage = onRecord;
})();
