// The remote-exec daemon's status page (served by remote_exec.server.status).
//
// Nothing here is shown before the daemon accepted the token. The token is
// kept in this tab's sessionStorage and sent only as an Authorization header,
// never in a URL. Every text that comes from the daemon (instance and method
// names, errors, log lines) is put in the page with textContent: a log line
// that contains HTML shows as text. Live updates come from GET /events
// (server-sent events read through fetch(), which can send the header).
"use strict";

(function () {
  const TOKEN_KEY = "remote-exec-token";
  const MAX_FINISHED = 200; // finished invocations shown (the newest)
  const MAX_LOG_LINES = 1000; // log lines kept per invocation (the newest)
  const FINISHED = new Set(["completed", "error", "cancelled"]);

  const state = {
    token: null,
    controller: null, // AbortController of the open stream
    daemon: null,
    skew: 0, // the daemon's clock minus this one's, in seconds
    instances: [],
    invocations: new Map(), // id -> record
    expanded: new Set(), // ids whose log is shown
    collapsed: new Set(), // ids whose log the user hid
    loading: new Set(), // ids whose whole log is being fetched
    rows: new Map(), // id -> the table rows of an invocation
    view: null, // the dashboard's elements, once the token was accepted
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  function now() {
    return Date.now() / 1000 + state.skew;
  }

  // -- the token --------------------------------------------------------------------
  function start() {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = $("token");
      const value = input.value.trim();
      input.value = "";
      if (!value) return;
      sessionStorage.setItem(TOKEN_KEY, value);
      connect(value);
    });
    $("forget").addEventListener("click", () => forget(""));
    setInterval(tick, 1000);
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) connect(saved);
    else showLogin("");
  }

  function showLogin(message) {
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }

  function forget(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    if (state.controller) state.controller.abort();
    state.controller = null;
    clearDashboard();
    $("forget").hidden = true;
    setLink("", "");
    showLogin(message);
  }

  function connect(token) {
    if (state.controller) state.controller.abort();
    state.token = token;
    state.controller = new AbortController();
    $("login-error").textContent = "";
    setLink("", "connecting…");
    stream(token, state.controller.signal);
  }

  function setLink(kind, text) {
    const node = $("link-state");
    node.className = "link-state" + (kind ? " " + kind : "");
    node.textContent = text;
  }

  async function api(path, options) {
    const response = await fetch(
      path,
      Object.assign({ cache: "no-store", credentials: "omit", redirect: "error" }, options, {
        headers: { Authorization: "Bearer " + state.token },
      }),
    );
    if (response.status === 401) {
      forget("The daemon refused this token.");
      throw new Error("token refused");
    }
    return response;
  }

  // -- the event stream -------------------------------------------------------------------
  async function stream(token, signal) {
    let delay = 500;
    while (!signal.aborted) {
      let response;
      try {
        response = await fetch("/events", {
          headers: { Authorization: "Bearer " + token, Accept: "text/event-stream" },
          cache: "no-store",
          credentials: "omit",
          redirect: "error",
          signal,
        });
      } catch (error) {
        if (signal.aborted) return;
        setLink("down", "cannot reach the daemon: retrying");
        await sleep(delay);
        delay = Math.min(delay * 2, 10000);
        continue;
      }
      if (response.status === 401) {
        forget("The daemon refused this token.");
        return;
      }
      if (!response.ok || !response.body) {
        let reason = response.status + " " + response.statusText;
        try {
          const body = await response.json();
          if (body && body.error) reason = body.error;
        } catch (error) {
          // not JSON: the status says it
        }
        if (response.status === 403) {
          forget("Refused: " + reason);
          return;
        }
        setLink("down", reason + ": retrying");
        await sleep(delay);
        delay = Math.min(delay * 2, 10000);
        continue;
      }
      delay = 500;
      try {
        await readEvents(response.body, signal);
      } catch (error) {
        if (signal.aborted) return;
      }
      if (signal.aborted) return;
      setLink("down", "reconnecting…");
      await sleep(300);
    }
  }

  async function readEvents(body, signal) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    signal.addEventListener("abort", () => reader.cancel().catch(() => {}), { once: true });
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith(":")) continue; // a comment: the daemon is still there
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let rest = colon < 0 ? "" : line.slice(colon + 1);
          if (rest.startsWith(" ")) rest = rest.slice(1);
          if (field === "event") name = rest;
          else if (field === "data") data.push(rest);
        }
        if (data.length) handle(name, JSON.parse(data.join("\n")));
      }
    }
  }

  function handle(name, data) {
    if (name === "snapshot") {
      $("login").hidden = true;
      $("forget").hidden = false;
      setLink("live", "live");
      ensureDashboard();
      state.daemon = data.daemon;
      state.skew = data.daemon.now - Date.now() / 1000;
      state.instances = data.instances;
      const previous = state.invocations;
      state.invocations = new Map();
      for (const item of data.invocations) {
        state.invocations.set(item.id, merge(previous.get(item.id), item));
      }
      render();
    } else if (name === "update" && state.view) {
      for (const item of data.invocations) {
        state.invocations.set(item.id, merge(state.invocations.get(item.id), item));
      }
      if (data.instances) state.instances = data.instances;
      if (data.stats && state.daemon) {
        state.daemon.connections = data.stats.connections;
        state.daemon.dispatcher = data.stats.dispatcher;
        state.skew = data.stats.now - Date.now() / 1000;
      }
      trim();
      render();
    }
  }

  // An invocation's record, with what the page holds of its log: ``log`` are
  // the records from index ``logStart`` to ``logEnd`` of all it ever logged.
  function merge(old, item) {
    const record = Object.assign({}, old || {}, item);
    record.log = old && old.log ? old.log : [];
    record.logStart = old ? old.logStart || 0 : 0;
    record.logEnd = old ? old.logEnd || 0 : 0;
    record.hasLog = old ? !!old.hasLog : false;
    if (Array.isArray(item.log)) {
      const begin = item.log_start || 0;
      if (record.hasLog && begin <= record.logEnd) {
        record.log = record.log.concat(item.log.slice(record.logEnd - begin));
      } else {
        record.log = item.log.slice();
        record.logStart = begin;
      }
      record.logEnd = Math.max(item.logged || 0, record.logStart + record.log.length);
      record.hasLog = true;
    }
    if (record.log.length > MAX_LOG_LINES) {
      const dropped = record.log.length - MAX_LOG_LINES;
      record.log = record.log.slice(dropped);
      record.logStart += dropped;
    }
    delete record.log_start;
    if (record.status === "running" && !state.collapsed.has(record.id)) {
      state.expanded.add(record.id);
    }
    return record;
  }

  function trim() {
    const done = [...state.invocations.values()]
      .filter((record) => FINISHED.has(record.status))
      .sort((a, b) => (b.ended_at || 0) - (a.ended_at || 0));
    for (const record of done.slice(MAX_FINISHED)) {
      state.invocations.delete(record.id);
      state.expanded.delete(record.id);
      state.collapsed.delete(record.id);
    }
  }

  async function loadLog(id) {
    if (state.loading.has(id)) return;
    state.loading.add(id);
    try {
      const response = await api("/invocations/" + encodeURIComponent(id), {});
      const record = state.invocations.get(id);
      if (!record) return;
      if (!response.ok) {
        record.logNote = "its log is no longer kept";
        record.hasLog = true;
      } else {
        const info = await response.json();
        const logged = Math.max(record.logged || 0, info.log.length);
        record.log = info.log.slice(-MAX_LOG_LINES);
        record.logEnd = Math.max(logged, record.logEnd || 0);
        record.logStart = record.logEnd - record.log.length;
        record.hasLog = true;
      }
      render();
    } catch (error) {
      // refused (the token form is back) or the daemon is gone: nothing to show
    } finally {
      state.loading.delete(id);
    }
  }

  async function cancel(id, button) {
    button.disabled = true;
    button.textContent = "Cancelling…";
    try {
      const response = await api("/invocations/" + encodeURIComponent(id), { method: "DELETE" });
      if (response.ok) {
        const info = await response.json();
        delete info.log; // the stream brings the log
        state.invocations.set(id, merge(state.invocations.get(id), info));
        render();
      } else {
        button.textContent = "Cancel failed";
      }
    } catch (error) {
      button.textContent = "Cancel failed";
    }
  }

  // -- the dashboard -----------------------------------------------------------------------
  function ensureDashboard() {
    if (state.view) return;
    const main = $("dashboard");
    main.replaceChildren();

    const daemon = el("section", "panel");
    daemon.id = "daemon";
    const facts = el("dl", "facts");
    facts.id = "daemon-facts";
    daemon.append(el("h2", null, "Daemon"), facts);

    const instances = el("section", "panel");
    instances.id = "instances";
    const instanceCount = el("span", "count");
    const instanceTitle = el("h2", null, "Instances ");
    instanceTitle.append(instanceCount);
    const instanceTable = table(
      ["Name", "Class", "Scope", "Queued", "Running", "Created by"],
      "instance-rows",
    );
    const instanceEmpty = el("p", "empty", "No instances.");
    instances.append(instanceTitle, instanceTable, instanceEmpty);

    const invocations = el("section", "panel");
    invocations.id = "invocations";
    const invocationCount = el("span", "count");
    const invocationTitle = el("h2", null, "Invocations ");
    invocationTitle.append(invocationCount);
    const invocationTable = table(
      ["Status", "Method", "Instance", "Requested", "Duration", ""],
      "invocation-rows",
    );
    const invocationEmpty = el("p", "empty", "No invocations yet.");
    invocations.append(invocationTitle, invocationTable, invocationEmpty);

    main.append(daemon, instances, invocations);
    main.hidden = false;
    state.view = {
      facts,
      instanceCount,
      instanceBody: instanceTable.tBodies[0],
      instanceEmpty,
      invocationCount,
      invocationBody: invocationTable.tBodies[0],
      invocationEmpty,
    };
  }

  function table(headers, bodyId) {
    const node = el("table");
    const head = node.createTHead().insertRow();
    for (const text of headers) head.append(el("th", null, text));
    const body = node.createTBody();
    body.id = bodyId;
    return node;
  }

  function clearDashboard() {
    state.view = null;
    state.daemon = null;
    state.instances = [];
    state.invocations = new Map();
    state.rows = new Map();
    state.expanded.clear();
    state.collapsed.clear();
    const main = $("dashboard");
    main.replaceChildren();
    main.hidden = true;
  }

  function render() {
    if (!state.view) return;
    renderFacts();
    renderInstances();
    renderInvocations();
  }

  function tick() {
    if (!state.view) return;
    renderFacts();
    for (const [id, view] of state.rows) {
      const record = state.invocations.get(id);
      if (record && !FINISHED.has(record.status)) view.duration.textContent = took(record);
    }
  }

  function renderFacts() {
    const daemon = state.daemon;
    if (!daemon) return;
    const limits = daemon.limits || {};
    const connections = daemon.connections || {};
    const dispatcher = daemon.dispatcher || {};
    const history = daemon.history;
    const facts = [
      ["Version", "remote-exec " + daemon.version + " (Python " + daemon.python + ")"],
      ["Address", daemon.url || "?"],
      ["Backend", daemon.backend || "?"],
      ["Up for", span(now() - daemon.started_at)],
      ["Started", clock(daemon.started_at)],
      ["Connections", (connections.connections ?? "?") + " of " + (limits.max_connections ?? "?")],
      ["Calls in flight", dispatcher.calls_in_flight ?? "?"],
      ["Calls queued", dispatcher.queued ?? "?"],
      ["Max calls per connection", limits.max_calls ?? "?"],
      ["Max message size", bytes(limits.max_message_size)],
      ["Max instances", limits.max_server_instances ?? "?"],
      [
        "History",
        history
          ? history.path + " (" + history.rows + " invocations, " + bytes(history.bytes) + ")"
          : "off (memory only)",
      ],
    ];
    const nodes = [];
    for (const [term, value] of facts) {
      const item = el("div");
      item.append(el("dt", null, term), el("dd", null, value));
      nodes.push(item);
    }
    state.view.facts.replaceChildren(...nodes);
  }

  function renderInstances() {
    const view = state.view;
    const rows = [];
    for (const instance of state.instances) {
      const row = el("tr");
      row.dataset.name = instance.name;
      row.append(
        el("td", "mono", instance.name),
        el("td", "mono", instance.class),
        el("td", null, instance.scope || "server"),
        el("td", null, instance.queued),
        el("td", null, instance.running),
        el("td", "mono", instance.owner || "—"),
      );
      rows.push(row);
    }
    view.instanceBody.replaceChildren(...rows);
    view.instanceEmpty.hidden = rows.length > 0;
    view.instanceCount.textContent = "(" + rows.length + ")";
  }

  function rank(record) {
    return record.status === "running" ? 0 : 1;
  }

  function renderInvocations() {
    const view = state.view;
    const records = [...state.invocations.values()];
    const live = records
      .filter((record) => !FINISHED.has(record.status))
      .sort((a, b) => rank(a) - rank(b) || a.requested_at - b.requested_at);
    const done = records
      .filter((record) => FINISHED.has(record.status))
      .sort((a, b) => (b.ended_at || 0) - (a.ended_at || 0));
    const wanted = [];
    for (const record of live.concat(done)) {
      const rows = rowsFor(record);
      update(rows, record);
      wanted.push(rows.row, rows.logRow);
    }
    for (const [id, rows] of state.rows) {
      if (!state.invocations.has(id)) {
        rows.row.remove();
        rows.logRow.remove();
        state.rows.delete(id);
      }
    }
    const body = view.invocationBody;
    const current = body.children;
    let same = current.length === wanted.length;
    for (let i = 0; same && i < wanted.length; i++) same = current[i] === wanted[i];
    if (!same) body.replaceChildren(...wanted);
    view.invocationEmpty.hidden = wanted.length > 0;
    view.invocationCount.textContent =
      "(" + live.filter((record) => record.status === "running").length + " running, " +
      live.filter((record) => record.status === "pending").length + " pending, " +
      done.length + " recent)";
  }

  function rowsFor(record) {
    let rows = state.rows.get(record.id);
    if (rows) return rows;
    const row = el("tr", "inv");
    row.dataset.id = record.id;
    const badge = el("span", "status");
    const statusCell = el("td");
    statusCell.append(badge);
    const method = el("div", "mono method");
    const error = el("div", "err");
    const methodCell = el("td");
    methodCell.append(method, error);
    const instance = el("td", "mono");
    const requested = el("td");
    const duration = el("td");
    const toggle = el("button", "toggle", "Log");
    toggle.type = "button";
    const stop = el("button", "danger cancel", "Cancel");
    stop.type = "button";
    const actions = el("td", "actions");
    actions.append(toggle, stop);
    row.append(statusCell, methodCell, instance, requested, duration, actions);

    const logRow = el("tr", "logrow");
    logRow.dataset.logFor = record.id;
    const logCell = el("td");
    logCell.colSpan = 6;
    const note = el("div", "note");
    const box = el("div", "log");
    logCell.append(box);
    logRow.append(logCell);

    toggle.addEventListener("click", () => {
      const id = record.id;
      if (state.expanded.has(id)) {
        state.expanded.delete(id);
        state.collapsed.add(id);
      } else {
        state.expanded.add(id);
        state.collapsed.delete(id);
      }
      render();
    });
    stop.addEventListener("click", () => cancel(record.id, stop));
    rows = {
      row,
      logRow,
      badge,
      method,
      error,
      instance,
      requested,
      duration,
      toggle,
      stop,
      box,
      note,
      rendered: 0,
      renderedStart: -1,
      renderedNote: null,
    };
    state.rows.set(record.id, rows);
    return rows;
  }

  function update(rows, record) {
    const finished = FINISHED.has(record.status);
    rows.row.className = "inv " + (finished ? "finished" : "live");
    rows.row.dataset.status = record.status;
    rows.badge.className = "status " + record.status;
    rows.badge.textContent = record.status;
    rows.method.textContent = record.method;
    rows.error.textContent = record.error || "";
    rows.error.hidden = !record.error;
    rows.instance.textContent = record.instance;
    rows.requested.textContent = clock(record.requested_at);
    if (record.from_history) {
      rows.requested.append(el("div", "from-history", "from the history file"));
    }
    rows.duration.textContent = took(record);
    rows.stop.hidden = finished;
    const open = state.expanded.has(record.id);
    rows.toggle.textContent = open ? "Hide log" : "Log" + (record.logged ? " (" + record.logged + ")" : "");
    rows.logRow.hidden = !open;
    if (open) {
      if (!record.hasLog) loadLog(record.id);
      renderLog(rows, record);
    }
  }

  function renderLog(rows, record) {
    const box = rows.box;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 4;
    const note = record.logNote || (record.logStart > 0 ? record.logStart + " earlier lines not shown" : "");
    if (record.logStart !== rows.renderedStart || record.log.length < rows.rendered || note !== rows.renderedNote) {
      box.replaceChildren();
      rows.rendered = 0;
      rows.renderedStart = record.logStart;
      rows.renderedNote = note;
      if (note) box.append(el("div", "line note", "… " + note));
    }
    const lines = [];
    for (const entry of record.log.slice(rows.rendered)) lines.push(logLine(entry));
    if (lines.length) box.append(...lines);
    rows.rendered = record.log.length;
    if (!record.log.length && !note && record.hasLog && !box.childElementCount) {
      box.append(el("div", "line note", "(nothing logged)"));
      rows.renderedNote = "(nothing logged)";
    }
    if (atBottom || lines.length === rows.rendered) box.scrollTop = box.scrollHeight;
  }

  function logLine(entry) {
    const [time, level, logger, message] = entry;
    const line = el("div", "line");
    line.append(
      el("span", "time", clock(time, true)),
      " ",
      el("span", "level " + String(level).replace(/[^A-Z]/g, ""), level),
      " ",
      el("span", "logger", logger),
      " ",
      el("span", "message", message),
    );
    return line;
  }

  // -- formatting --------------------------------------------------------------------------
  function clock(seconds, precise) {
    if (seconds === null || seconds === undefined) return "—";
    const date = new Date(seconds * 1000);
    const today = new Date().toDateString() === date.toDateString();
    let text = date.toLocaleTimeString([], { hour12: false });
    if (precise) text += "." + String(date.getMilliseconds()).padStart(3, "0");
    return today ? text : date.toLocaleDateString() + " " + text;
  }

  function took(record) {
    if (!record.started_at) return record.status === "pending" ? "waiting" : "—";
    const end = record.ended_at || now();
    return span(end - record.started_at);
  }

  function span(seconds) {
    if (!(seconds >= 0)) return "—";
    if (seconds < 1) return Math.round(seconds * 1000) + " ms";
    if (seconds < 60) return seconds.toFixed(1) + " s";
    const minutes = Math.floor(seconds / 60);
    if (minutes < 60) return minutes + " min " + Math.floor(seconds % 60) + " s";
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + " h " + (minutes % 60) + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  function bytes(size) {
    if (typeof size !== "number") return "?";
    const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let value = size;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1 && value % 1024 === 0) {
      value /= 1024;
      unit += 1;
    }
    if (unit === 0 && value >= 1024) {
      while (value >= 1024 && unit < units.length - 1) {
        value /= 1024;
        unit += 1;
      }
      return value.toFixed(1) + " " + units[unit];
    }
    return value + " " + units[unit];
  }

  start();
})();
