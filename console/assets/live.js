// Tollgate console, breaches page: follows /live/events (server-sent events) and puts each
// breach decision, lifted decision and alert at the top of the live table without a reload.
// Every text is set with textContent, never as HTML. A record seen twice (the replay of recent
// records after a reconnect) is shown once.
(function () {
  "use strict";
  var rows = document.getElementById("live-rows");
  var status = document.getElementById("live-status");
  if (!rows || !status) { return; }
  var seen = new Set();
  var MAX_ROWS = 500;

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
  }

  function show(kind, ev) {
    if (seen.has(ev.id)) { return; }
    seen.add(ev.id);
    var tr = document.createElement("tr");
    tr.className = "new " + kind;
    tr.dataset.id = ev.id;
    tr.dataset.kind = kind;
    tr.dataset.rule = ev.rule_id;
    tr.dataset.scope = ev.scope;
    cell(tr, ev.at);
    cell(tr, kind === "breach" ? "decision" : kind);
    cell(tr, ev.rule_id);
    cell(tr, ev.scope);
    cell(tr, ev.state);
    cell(tr, ev.action);
    cell(tr, ev.observed, "num");
    cell(tr, ev.limit, "num");
    rows.insertBefore(tr, rows.firstChild);
    while (rows.children.length > MAX_ROWS) { rows.removeChild(rows.lastChild); }
    setTimeout(function () { tr.classList.remove("new"); }, 4000);
  }

  var source = new EventSource("/live/events");
  source.onopen = function () {
    status.textContent = "live";
    status.className = "status open";
    document.body.dataset.live = "open";
  };
  source.onerror = function () {
    status.textContent = "reconnecting…";
    status.className = "status";
    document.body.dataset.live = "reconnecting";
  };
  ["breach", "cleared", "alert"].forEach(function (kind) {
    source.addEventListener(kind, function (e) { show(kind, JSON.parse(e.data)); });
  });
  source.addEventListener("lagged", function (e) {
    status.textContent = "live (" + e.data + " missed: reload for the history)";
  });
})();
