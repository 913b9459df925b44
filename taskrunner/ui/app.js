// The web UI's page: hash routes (#/, #/batch/{id}/{dag|table|timeline}?task={id},
// #/problems), the task panel, batch and task actions, and the auto-refresh.
//
// Refresh: every REFRESH_MS the open batch's stats (one cheap row) are compared with the
// last ones (latest_updated_at + counts); the DAG, table, timeline and panel are fetched
// again only when that fingerprint changed.

import { api, get } from "./api.js";
import { DagView, groupCounts } from "./dag.js";
import { STATUS, TERMINAL, statusOf } from "./status.js";

const REFRESH_MS = 2000;
const TABLE_ROWS = 500; // rows drawn at once in the table; the filter narrows the rest
const TIMELINE_ROWS = 300;
const PER_PAGE = 50; // batches per page of the list
const main = document.getElementById("main");
const panel = document.getElementById("panel");

// -- small DOM helpers ----------------------------------------------------------------------

/** An element: h("td.num", {title}, child, ...); strings become text (never HTML). */
function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag);
  if (classes.length) el.className = classes.join(" ");
  const plain = attrs !== null && typeof attrs === "object" && !(attrs instanceof Node) && !Array.isArray(attrs);
  if (!plain) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const badge = (status) => h(`span.badge.st-${status}`, STATUS[status] ? `${STATUS[status].icon} ${status}` : status);
const time = (v) => (v ? new Date(v).toLocaleString() : "—");
const short = (id) => String(id).slice(0, 8);

function duration(a, b) {
  if (!a) return "";
  const s = Math.max(0, ((b ? new Date(b) : new Date()) - new Date(a)) / 1000);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function say(text, ok = false) {
  const box = document.getElementById("messages");
  const msg = h(`div.msg${ok ? ".ok" : ""}`, text);
  box.append(msg);
  setTimeout(() => msg.remove(), ok ? 3000 : 8000);
}

function confirmAction(text) {
  const dialog = document.getElementById("confirm-dialog");
  document.getElementById("confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

/** Ask, call, report; then refresh what is on screen. */
// The answer of POST /task/{id}/rerun or /batch/{id}/rerun in one line.
function rerunSummary(r) {
  const parts = [`${r.rerun.length} task(s) rerun`];
  if (r.downstream.length) parts.push(`${r.downstream.length} downstream back to Waiting`);
  if (r.waiting_again.length) parts.push(`${r.waiting_again.length} waiting again`);
  return `Rerun: ${parts.join(", ")}`;
}

async function act(question, method, path, body, done) {
  if (!(await confirmAction(question))) return;
  try {
    const answer = await api(method, path, body);
    say(done ? done(answer) : "Done", true);
  } catch (err) {
    say(err.message);
  }
  await refresh(true);
}

function countBar(counts, total) {
  return h("div.bar", { title: Object.entries(counts).map(([s, c]) => `${s}: ${c}`).join(", ") },
    Object.keys(STATUS).map((s) => {
      const n = counts[s] || 0;
      return n ? h("span", { style: `width:${(100 * n) / total}%;background:${STATUS[s].color}` }) : null;
    }));
}

const label = (key) => key.charAt(0).toUpperCase() + key.slice(1);

/** ArcRun's lower-case status_counts -> {Label: n}; Claimed counted as Running in bars. */
function countsOf(statusCounts) {
  const out = {};
  for (const [k, v] of Object.entries(statusCounts)) {
    const name = k === "claimed" ? "Running" : label(k);
    out[name] = (out[name] || 0) + v;
  }
  return out;
}

function countChips(statusCounts) {
  return h("span.counts", Object.entries(statusCounts).filter(([, n]) => n > 0)
    .map(([k, n]) => h(`span.badge.st-${label(k)}`, { "data-status": label(k) }, `${label(k)} ${n}`)));
}

// -- routing --------------------------------------------------------------------------------

let route = {};
let timer = 0;
let state = {}; // what the current view shows, for refresh

function parseHash() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  return { parts, params: new URLSearchParams(query || "") };
}

function go(parts, params) {
  const q = params && [...params].length ? `?${params}` : "";
  location.hash = `#/${parts.join("/")}${q}`;
}

async function render() {
  const { parts, params } = parseHash();
  const prev = route;
  route = { parts, params };
  for (const a of document.querySelectorAll("[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === (parts[0] === "problems" ? "problems" : "batches"));
  }
  try {
    if (parts[0] === "batch" && parts[1]) {
      const view = parts[2] || "dag";
      const same = prev.parts && prev.parts[0] === "batch" && prev.parts[1] === parts[1] && prev.parts[2] === parts[2];
      if (!same) await showBatch(parts[1], view);
      await showPanel(params.get("task"), params.get("group"));
    } else if (parts[0] === "task" && parts[1]) {
      const task = await get(`/task/${parts[1]}`);
      go(["batch", task.batch_id, "dag"], new URLSearchParams({ task: task.id }));
    } else if (parts[0] === "problems") {
      hidePanel();
      await showProblems();
    } else {
      hidePanel();
      await showBatches(params);
    }
  } catch (err) {
    main.replaceChildren(h("p.error", err.message));
  }
}

// -- batch list -----------------------------------------------------------------------------

async function showBatches(params) {
  state = { view: "batches", params };
  const statuses = ["", ...Object.keys(STATUS), "Claimed"];
  const form = h("form.filters", { onsubmit: (e) => {
    e.preventDefault();
    const p = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (v) p.set(k, v);
    go([], p);
  } },
    h("label", "Status", h("select", { name: "status" }, statuses.map((s) =>
      h("option", { value: s, selected: params.get("status") === s }, s || "any")))),
    h("label", "Kind", h("input", { name: "kind", value: params.get("kind") || "", size: 12 })),
    h("label", "Task name contains", h("input", { name: "name", value: params.get("name") || "", size: 14 })),
    h("label", "Created after", h("input", { name: "created_after", type: "datetime-local", value: params.get("created_after") || "" })),
    h("button.primary", { type: "submit" }, "Filter"),
    h("button", { type: "button", onclick: () => go([]) }, "Clear"));
  const body = h("tbody");
  const page = Number(params.get("page") || 0);
  main.replaceChildren(h("h1", "Batches"), form,
    h("table.batches", h("thead", h("tr", ["Batch", "Created", "Last change", "Kinds", "Tasks", "Progress", "Per status"].map((c) => h("th", c)))), body),
    h("div.pager",
      page > 0 ? h("button", { onclick: () => { params.set("page", page - 1); go([], params); } }, "← Newer") : null,
      h("span.muted", `page ${page + 1}`),
      h("button", { id: "older", onclick: () => { params.set("page", page + 1); go([], params); } }, "Older →")));
  await fillBatches(body, params);
}

async function fillBatches(body, params) {
  const q = new URLSearchParams({ per_page: PER_PAGE, page: params.get("page") || 0 });
  for (const k of ["status", "kind", "name", "created_after"]) {
    if (params.get(k)) q.set(k, k === "created_after" ? new Date(params.get(k)).toISOString() : params.get(k));
  }
  const rows = await get(`/batches?${q}`);
  body.replaceChildren(...rows.map((b) => {
    const counts = countsOf(b.status_counts);
    const done = (counts.Success || 0) + (counts.Failure || 0) + (counts.Canceled || 0);
    return h("tr.clickable", { "data-batch-id": b.batch_id, onclick: () => go(["batch", b.batch_id, "dag"]) },
      h("td.mono", h("a", { href: `#/batch/${b.batch_id}/dag` }, short(b.batch_id))),
      h("td", time(b.first_created_at)),
      h("td", time(b.latest_updated_at)),
      h("td", b.kinds.join(", ")),
      h("td.num", b.total_tasks),
      h("td", countBar(counts, b.total_tasks), h("span.muted", `${done}/${b.total_tasks} done`)),
      h("td", countChips(b.status_counts)));
  }));
  if (!rows.length) body.append(h("tr", h("td", { colspan: 7 }, h("span.muted", "No batches"))));
  const older = document.getElementById("older");
  if (older) older.hidden = rows.length < PER_PAGE;
}

// -- batch page -----------------------------------------------------------------------------

async function showBatch(id, view) {
  const stats = await get(`/batch/${id}`);
  state = { view: "batch", id, tab: view, stats, fingerprint: fingerprint(stats) };
  const tabs = ["dag", "table", "timeline"].map((t) =>
    h(`a${t === view ? ".active" : ""}`, { href: `#/batch/${id}/${t}`, "data-tab": t }, { dag: "DAG", table: "Table", timeline: "Timeline" }[t]));
  state.head = h("div.batch-head");
  state.body = h("div.batch-body");
  main.replaceChildren(
    h("h1", "Batch ", h("span.mono", id)),
    state.head,
    h("div.tabs", tabs),
    state.body);
  renderHead();
  if (view === "dag") {
    const host = h("div.dag");
    state.body.replaceChildren(host);
    state.dagView = new DagView(host, pickNode);
    window.taskrunnerUi.dag = state.dagView;
  }
  await loadDag();
}

function fingerprint(stats) {
  return `${stats.latest_updated_at}|${JSON.stringify(stats.status_counts)}`;
}

function renderHead() {
  const s = state.stats;
  const counts = countsOf(s.status_counts);
  const unfinished = s.total_tasks - (counts.Success || 0) - (counts.Failure || 0) - (counts.Canceled || 0);
  const ended = (counts.Failure || 0) + (counts.Canceled || 0);
  state.head.replaceChildren(
    countBar(counts, s.total_tasks),
    h("span", `${s.total_tasks} tasks`),
    countChips(s.status_counts),
    h("span.muted", `kinds: ${s.kinds.join(", ")}`),
    h("span.muted", `last change ${time(s.latest_updated_at)}`),
    h("a", { href: `#/problems?batch_id=${s.batch_id}` }, "problems"),
    h("span.actions",
      h("button", { id: "edit-rules", onclick: editRules }, "Edit rules…"),
      h("button", {
        id: "rerun-batch",
        disabled: ended === 0,
        onclick: () => act(`Rerun batch ${short(s.batch_id)}? Its ${ended} failed or canceled tasks run again (and the tasks downstream that failed because of them).`,
          "POST", `/batch/${s.batch_id}/rerun`, undefined, rerunSummary),
      }, "Rerun failed"),
      h("button.danger", {
        id: "stop-batch",
        disabled: unfinished === 0,
        onclick: () => act(`Stop batch ${short(s.batch_id)}? Its ${unfinished} unfinished tasks will be canceled (running ones get their cancel webhooks).`,
          "DELETE", `/batch/${s.batch_id}`, undefined, (r) => `Batch stopped: ${Object.entries(r).filter(([k, v]) => k.startsWith("canceled_") && v).map(([k, v]) => `${v} ${k.slice(9)}`).join(", ") || "nothing to cancel"}`),
      }, "Stop batch")));
}

async function loadDag() {
  const dag = await get(`/dag/${state.id}`);
  state.tasks = dag.tasks;
  state.links = dag.links;
  state.byId = new Map(dag.tasks.map((t) => [t.id, t]));
  if (state.tab === "dag") state.dagView.setData(dag.tasks, dag.links);
  else if (state.tab === "table") renderTable();
  else renderTimeline();
}

function openTask(id) {
  const p = new URLSearchParams({ task: id });
  go(["batch", state.id, state.tab], p);
}

function pickNode(node) {
  if (node.task) openTask(node.id);
  else go(["batch", state.id, state.tab], new URLSearchParams({ group: node.id }));
}

// -- rules editor ---------------------------------------------------------------------------

async function editRules() {
  if (route.params.get("task") || route.params.get("group")) go(route.parts); // the editor replaces the task
  const kinds = state.stats.kinds;
  const kind = h("select", { id: "rules-kind" }, kinds.map((k) => h("option", { value: k }, k)));
  const text = h("textarea.rules", { id: "rules-text", spellcheck: "false" });
  // start from the rules an unfinished task of the kind has now; the text is read-only
  // until they are loaded, so nothing typed is overwritten
  const current = async () => {
    const t = state.tasks.find((x) => x.kind === kind.value && !TERMINAL.has(x.status));
    text.disabled = true;
    text.value = "[]";
    try {
      if (t) text.value = JSON.stringify((await get(`/task/${t.id}`)).rules, null, 2);
    } finally {
      text.disabled = false;
    }
  };
  kind.addEventListener("change", current);
  current();
  const form = h("div.rules-editor",
    h("h2", "Edit rules"),
    h("p.muted", "Replaces the rules of every unfinished task of this kind in the batch (",
      h("code", "[]"), " removes them). Takes effect at the next claim."),
    h("label", "Kind ", kind),
    text,
    h("div.buttons",
      h("button", { onclick: () => showPanel(null) }, "Close"),
      h("button.primary", { id: "rules-save", onclick: async () => {
        let rules;
        try { rules = JSON.parse(text.value); } catch (err) { say(`rules: ${err.message}`); return; }
        await act(`Replace the rules of the unfinished "${kind.value}" tasks of this batch?`,
          "PATCH", `/batch/${state.id}/rules`, { kind: kind.value, rules }, (r) => `Rules updated on ${r.updated_count} tasks`);
      } }, "Save rules")));
  panel.replaceChildren(h("button.close", { onclick: hidePanel }, "✕"), form);
  panel.hidden = false;
}

// -- table ----------------------------------------------------------------------------------

const COLUMNS = [
  ["name", "Name"], ["kind", "Kind"], ["status", "Status"], ["priority", "Priority", true],
  ["created_at", "Created"], ["started_at", "Started"], ["ended_at", "Ended"],
  ["duration", "Duration", true], ["success", "Success", true], ["failures", "Failures", true],
];

function renderTable() {
  const t = state.table || (state.table = { sort: "created_at", dir: 1, text: "", status: "" });
  const filter = h("form.filters", { onsubmit: (e) => e.preventDefault() },
    h("label", "Name or kind contains", h("input", { id: "table-filter", value: t.text, oninput: (e) => { t.text = e.target.value; fill(); } })),
    h("label", "Status", h("select", { id: "table-status", onchange: (e) => { t.status = e.target.value; fill(); } },
      ["", ...Object.keys(STATUS)].map((s) => h("option", { value: s, selected: s === t.status }, s || "any")))),
    h("span.muted.table-count"));
  const head = h("tr", COLUMNS.map(([key, name, num]) => h(`th.sortable${num ? ".num" : ""}`, {
    "data-key": key,
    class: `sortable${num ? " num" : ""}${t.sort === key ? (t.dir > 0 ? " sorted-asc" : " sorted-desc") : ""}`,
    onclick: () => { t.dir = t.sort === key ? -t.dir : 1; t.sort = key; renderTable(); },
  }, name)));
  const body = h("tbody");
  state.body.replaceChildren(filter, h("table.tasks", h("thead", head), body));
  const dur = (x) => (x.started_at ? (x.ended_at ? new Date(x.ended_at) : new Date()) - new Date(x.started_at) : -1);
  function fill() {
    const text = t.text.toLowerCase();
    const rows = state.tasks.filter((x) => (!t.status || x.status === t.status)
      && (!text || x.name.toLowerCase().includes(text) || x.kind.toLowerCase().includes(text)));
    const key = (x) => (t.sort === "duration" ? dur(x) : x[t.sort] ?? "");
    rows.sort((a, b) => (key(a) < key(b) ? -t.dir : key(a) > key(b) ? t.dir : 0));
    filter.querySelector(".table-count").textContent = rows.length > TABLE_ROWS
      ? `${rows.length} tasks, first ${TABLE_ROWS} shown` : `${rows.length} tasks`;
    body.replaceChildren(...rows.slice(0, TABLE_ROWS).map((x) =>
      h("tr.clickable", { "data-task-id": x.id, onclick: () => openTask(x.id) },
        h("td", x.name), h("td", x.kind), h("td", badge(x.status)), h("td.num", x.priority),
        h("td", time(x.created_at)), h("td", time(x.started_at)), h("td", time(x.ended_at)),
        h("td.num", duration(x.started_at, x.ended_at)), h("td.num", x.success), h("td.num", x.failures))));
  }
  fill();
}

// -- timeline -------------------------------------------------------------------------------

function renderTimeline() {
  const started = state.tasks.filter((t) => t.started_at)
    .sort((a, b) => new Date(a.started_at) - new Date(b.started_at));
  if (!started.length) {
    state.body.replaceChildren(h("p.muted", "No task has started yet."));
    return;
  }
  const now = Date.now();
  const t0 = new Date(started[0].started_at).getTime();
  const t1 = Math.max(...started.map((t) => (t.ended_at ? new Date(t.ended_at).getTime() : now)), t0 + 1000);
  const pct = (v) => (100 * (v - t0)) / (t1 - t0);
  const rows = started.slice(0, TIMELINE_ROWS).map((t) => {
    const a = new Date(t.started_at).getTime(), b = t.ended_at ? new Date(t.ended_at).getTime() : now;
    return h("div.tl-row", { "data-task-id": t.id, title: `${t.name}: ${t.status}, ${time(t.started_at)} → ${t.ended_at ? time(t.ended_at) : "running"} (${duration(t.started_at, t.ended_at)})`, onclick: () => openTask(t.id) },
      h("div.tl-name", `${statusOf(t.status).icon} ${t.name}`),
      h("div.tl-track", h("div.tl-bar", { style: `left:${pct(a)}%;width:${Math.max(0.2, pct(b) - pct(a))}%;background:${statusOf(t.status).color}` })));
  });
  state.body.replaceChildren(h("div.timeline",
    h("div.tl-axis", h("div", `${started.length} started tasks${started.length > TIMELINE_ROWS ? `, first ${TIMELINE_ROWS} shown` : ""}`),
      h("div", h("span", time(t0)), h("span", `${duration(new Date(t0), new Date(t1))}`), h("span", time(t1)))),
    rows));
}

// -- task panel -----------------------------------------------------------------------------

function hidePanel() {
  panel.hidden = true;
  panel.replaceChildren();
  if (route.params && (route.params.get("task") || route.params.get("group"))) {
    go(route.parts);
  }
}

async function showPanel(taskId, groupId) {
  if (state.dagView) {
    state.dagView.selected = taskId;
    state.dagView.draw();
  }
  if (groupId) return showGroup(groupId);
  if (!taskId) {
    if (!panel.querySelector(".rules-editor")) { panel.hidden = true; panel.replaceChildren(); }
    return;
  }
  const [task, history] = await Promise.all([get(`/task/${taskId}`), get(`/task/${taskId}/history`)]);
  const nameOf = (id) => (state.byId && state.byId.get(id) ? state.byId.get(id).name : short(id));
  const buttons = [];
  if (!TERMINAL.has(task.status)) {
    buttons.push(h("button.danger", { id: "task-cancel", onclick: () => act(`Cancel task "${task.name}"?`, "DELETE", `/task/${task.id}`, undefined, () => "Task canceled") }, "Cancel"));
  }
  if (task.status === "Waiting" || task.status === "Pending") {
    buttons.push(h("button", { id: "task-pause", onclick: () => act(`Pause task "${task.name}"?`, "PATCH", `/task/pause/${task.id}`, undefined, () => "Task paused") }, "Pause"));
  }
  if (task.status === "Failure" || task.status === "Canceled") {
    buttons.push(h("button", { id: "task-rerun", onclick: () => act(`Rerun task "${task.name}"? It runs again, and so do the tasks downstream that failed because of it.`, "POST", `/task/${task.id}/rerun`, undefined, rerunSummary) }, "Rerun"));
  }
  if (task.status === "Paused") {
    buttons.push(h("button", { id: "task-resume", onclick: () => act(`Resume task "${task.name}"?`, "PATCH", `/task/resume/${task.id}`, undefined, () => "Task resumed") }, "Resume"));
  }
  const field = (k, v) => [h("dt", k), h("dd", v ?? "—")];
  panel.replaceChildren(h("div",
    h("button.close", { onclick: hidePanel, title: "Close" }, "✕"),
    h("h2.task-title", { "data-task-id": task.id }, `${statusOf(task.status).icon} ${task.name}`),
    h("div", badge(task.status), " ", h("span.actions", { style: "display:inline-flex" }, buttons)),
    h("dl.fields",
      field("id", h("span.mono", task.id)), field("kind", task.kind), field("status", task.status),
      field("status reason", task.status_reason), field("local id", task.local_id),
      field("requester", task.requester), field("priority", task.priority), field("timeout", `${task.timeout} s`),
      field("success / failures", `${task.success} / ${task.failures}`), field("failure reason", task.failure_reason),
      field("created", time(task.created_at)), field("started", time(task.started_at)),
      field("ended", time(task.ended_at)), field("last update", time(task.last_updated)),
      field("duration", duration(task.started_at, task.ended_at))),
    whyBlock(task.why_not_running),
    h("h3", "Metadata"), h("pre", JSON.stringify(task.metadata, null, 2)),
    h("h3", "Dependencies"),
    task.dependencies.length
      ? h("ul", task.dependencies.map((d) => h("li", h("a", { href: `#/task/${d.id}` }, nameOf(d.id)),
        " ", state.byId && state.byId.get(d.id) ? badge(state.byId.get(d.id).status) : "",
        d.requires_success ? "" : h("span.muted", " (runs even if it fails)"))))
      : h("p.muted", "none"),
    h("h3", "Rules"),
    task.rules.length ? h("pre", JSON.stringify(task.rules, null, 2)) : h("p.muted", "none"),
    h("h3", "Actions"),
    actionsBlock(task),
    h("h3", "History"),
    h("table.history", h("thead", h("tr", ["At", "From", "To", "Reason", "By"].map((c) => h("th", c)))),
      h("tbody", history.map((x) => h("tr", h("td", time(x.at)), h("td", x.from ? badge(x.from) : "—"),
        h("td", badge(x.to)), h("td", x.reason ?? ""), h("td.muted", x.actor ?? "")))))));
  panel.hidden = false;
}

function whyBlock(why) {
  if (!why) return null;
  let text;
  if (why.reason === "unfinished_parents") {
    text = h("span", "Waiting for ", why.parents.map((p, i) => [i ? ", " : "",
      h("a", { href: `#/task/${p.id}` }, p.name), ` (${p.status})`]));
  } else if (why.reason === "rule") {
    text = h("span", "Held back by ", why.rules.map((r, i) => {
      const [type, m] = Object.entries(r.rule)[0];
      const by = m.matcher.fields.length ? ` by ${m.matcher.fields.join(",")}` : "";
      const what = { Concurency: `${r.count} of max ${r.max}`,
        Capacity: `remaining work ${r.count} of max ${r.max}`,
        RateLimit: `${r.count} starts in ${m.per_seconds}s of max ${r.max}` }[type];
      return [i ? "; " : "", `${type} ${m.matcher.kind}${m.matcher.status ? `/${m.matcher.status}` : ""}${by}: ${what}`];
    }));
  } else if (why.reason === "ready") {
    text = "Ready: no rule holds it back, the next claim may start it";
  } else {
    text = "Paused: claims skip it until it is resumed";
  }
  return h("p.why", h("b", "Why not running: "), text);
}

function actionsBlock(task) {
  const actions = [task.on_start, ...task.on_success, ...task.on_failure, ...task.on_cancel].filter(Boolean);
  if (!actions.length) return h("p.muted", "none");
  return actions.map((a) => h("div.action-box",
    h("div", h("b", a.trigger), " ", h("span.mono", `${a.params.verb} ${a.params.url}`)),
    a.deliveries.length ? a.deliveries.map((d) => h("div.delivery", { "data-delivery-id": d.id },
      h("div", "delivery ", badge(d.status), ` ${d.attempt_count} attempt(s)`,
        d.last_status_code ? `, last HTTP ${d.last_status_code}` : "",
        d.last_error ? h("span.error", ` ${d.last_error}`) : "",
        d.status === "Failed" && a.trigger !== "Start" ? h("button", { class: "retry", style: "margin-left:6px", onclick: () => act("Retry this webhook delivery?", "POST", `/delivery/${d.id}/retry`, undefined, () => "Delivery queued again") }, "Retry") : ""),
      d.attempts.length ? h("table.attempts", h("thead", h("tr", ["#", "Worker", "Started", "Finished", "HTTP", "Error"].map((c) => h("th", c)))),
        h("tbody", d.attempts.map((x) => h("tr", h("td", x.attempt), h("td.mono", x.worker ?? ""), h("td", time(x.started_at)),
          h("td", time(x.finished_at)), h("td", x.status_code ?? ""), h("td.error", x.error ?? ""))))) : null))
      : h("p.muted", "not triggered")));
}

function showGroup(groupId) {
  const node = state.dagView && state.dagView.graph.nodes.find((n) => n.id === groupId);
  if (!node || !node.tasks) return;
  const counts = groupCounts(node.tasks);
  panel.replaceChildren(h("div",
    h("button.close", { onclick: hidePanel }, "✕"),
    h("h2", `${node.kind} · ${node.label}`),
    h("p", `${node.tasks.length} tasks: `, Object.entries(counts).map(([s, c]) => [badge(s), ` ${c} `])),
    h("table", h("tbody", node.tasks.slice(0, TABLE_ROWS).map((t) =>
      h("tr.clickable", { "data-task-id": t.id, onclick: () => openTask(t.id) }, h("td", t.name), h("td", badge(t.status)))))),
    node.tasks.length > TABLE_ROWS ? h("p.muted", `first ${TABLE_ROWS} shown; the Table view filters all`) : null));
  panel.hidden = false;
}

// -- problems -------------------------------------------------------------------------------

async function showProblems() {
  const batch = route.params.get("batch_id");
  state = { view: "problems" };
  const p = await get(`/problems${batch ? `?batch_id=${encodeURIComponent(batch)}` : ""}`);
  main.replaceChildren(h("div",
    h("h1", "Problems", batch ? h("span.muted", ` in batch ${short(batch)} `) : "",
      batch ? h("a", { href: "#/problems", style: "font-size:13px" }, "(all batches)") : ""),
    h("h2", "Failing webhook deliveries"),
    p.deliveries.length ? h("table.problem-deliveries",
      h("thead", h("tr", ["Task", "Trigger", "Status", "Attempts", "HTTP", "Last error", "URL", ""].map((c) => h("th", c)))),
      h("tbody", p.deliveries.map((d) => h("tr", { "data-delivery-id": d.id },
        h("td", h("a", { href: `#/task/${d.task_id}` }, d.task_name)), h("td", d.trigger), h("td", badge(d.status)),
        h("td.num", d.attempt_count), h("td", d.last_status_code ?? ""), h("td.error", d.last_error ?? ""),
        h("td.mono", `${d.verb} ${d.url}`),
        h("td", d.status === "Failed" && d.trigger !== "Start" ? h("button", { class: "retry", onclick: () => act("Retry this webhook delivery?", "POST", `/delivery/${d.id}/retry`, undefined, () => "Delivery queued again") }, "Retry") : "")))))
      : h("p.muted", "None."),
    h("h2", "Running longest"),
    p.running.length ? h("table.problem-running",
      h("thead", h("tr", ["Task", "Kind", "Batch", "Worker", "Started", "Running for", "Times out at"].map((c) => h("th", c)))),
      h("tbody", p.running.map((t) => h("tr", { "data-task-id": t.id },
        h("td", h("a", { href: `#/task/${t.id}` }, t.name)), h("td", t.kind),
        h("td.mono", h("a", { href: `#/batch/${t.batch_id}/dag` }, short(t.batch_id))),
        h("td.mono", t.claimed_by ?? ""), h("td", time(t.started_at || t.claimed_at)),
        h("td.num", duration(t.started_at || t.claimed_at)), h("td", time(t.timeout_at))))))
      : h("p.muted", "No task is running.")));
}

// -- refresh --------------------------------------------------------------------------------

let refreshing = Promise.resolve();

/** Refresh what is on screen; calls run one after the other, never interleaved. */
function refresh(force = false) {
  refreshing = refreshing.then(() => refreshNow(force));
  return refreshing;
}

async function refreshNow(force) {
  if (document.hidden && !force) return;
  try {
    if (state.view === "batch") {
      const stats = await get(`/batch/${state.id}`);
      const fp = fingerprint(stats);
      if (fp !== state.fingerprint || force) {
        state.stats = stats;
        state.fingerprint = fp;
        renderHead();
        await loadDag();
        if (!panel.hidden && route.params.get("task")) await showPanel(route.params.get("task"));
      }
    } else if (state.view === "batches") {
      const body = main.querySelector("table.batches tbody");
      if (body) await fillBatches(body, state.params);
    } else if (state.view === "problems") {
      await showProblems();
    }
    document.getElementById("refresh-state").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("refresh-state").textContent = `refresh failed: ${err.message}`;
  }
}

window.taskrunnerUi = { refresh, dag: null };
window.addEventListener("hashchange", render);
render();
timer = setInterval(refresh, REFRESH_MS);
