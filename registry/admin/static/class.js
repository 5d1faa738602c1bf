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
