// Tollgate console, breaches page: follows /live/events (server-sent events) and puts each
// breach decision (watch, breached, cleared) and alert at the top of the live table without a
// reload. Every text is set with textContent, never as HTML. A record seen twice (the replay of
// recent records after a reconnect) is shown once.
(function () {
  "use strict";
  var rows = document.getElementById("live-rows");
  var status = document.getElementById("live-status");
  if (!rows || !status) { return; }
  var seen = new Set();
  var order = [];
  var MAX_ROWS = 500;
  var MAX_SEEN = 2000;

  function cell(tr, text, cls) {
    var td = document.createElement("td");
    td.textContent = text;
    if (cls) { td.className = cls; }
    tr.appendChild(td);
  }

  function show(kind, ev) {
    if (seen.has(ev.id)) { return; }
    seen.add(ev.id);
    order.push(ev.id);
    while (order.length > MAX_SEEN) { seen.delete(order.shift()); }
    var tr = document.createElement("tr");
    tr.className = "new " + kind;
    tr.dataset.id = ev.id;
    tr.dataset.kind = kind;
    tr.dataset.rule = ev.rule_id;
    tr.dataset.scope = ev.scope;
    tr.dataset.state = ev.state;
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
    if (source.readyState === EventSource.CLOSED) {
      // Refused for good (the session ended, or too many pages follow): say what to do.
      status.textContent = "stopped: reload the page (log in again if asked)";
      status.className = "status";
      document.body.dataset.live = "closed";
      return;
    }
    status.textContent = "reconnecting…";
    status.className = "status";
    document.body.dataset.live = "reconnecting";
  };
  ["breach", "alert"].forEach(function (kind) {
    source.addEventListener(kind, function (e) { show(kind, JSON.parse(e.data)); });
  });
  source.addEventListener("lagged", function (e) {
    status.textContent = "live (" + e.data + " missed: reload for the history)";
  });
})();
