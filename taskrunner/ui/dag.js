// The DAG view: a layered layout by dagre (vendored from npm, see bin/build-ui) drawn on
// a canvas, with pan (drag), zoom (wheel, buttons) and click-to-open.
//
// Up to FULL_LIMIT tasks every task is a node. Bigger batches are aggregated: tasks are
// grouped by (depth band, kind), each group a node with its counts per status; dagre's
// crossing minimisation grows too slowly to lay out 10,000 nodes in the 3 s budget
// (docs/performance.md). Clicking a group lists its tasks in the panel.

import dagre from "./vendor/dagre.esm.js";
import { STATUS, statusOf } from "./status.js";

export const FULL_LIMIT = 500;
const MAX_BANDS = 12; // depth bands of the aggregated view: a screen wide at a readable zoom
const NODE = { w: 190, h: 40 };
const GROUP = { w: 220, h: 56 };

/** Longest-path depth of each task from the batch's roots (links from outside ignored). */
export function depths(tasks, links) {
  const index = new Map(tasks.map((t, i) => [t.id, i]));
  const children = tasks.map(() => []);
  const indegree = new Int32Array(tasks.length);
  for (const l of links) {
    const p = index.get(l.parent_id), c = index.get(l.child_id);
    if (p === undefined || c === undefined) continue;
    children[p].push(c);
    indegree[c] += 1;
  }
  const depth = new Int32Array(tasks.length);
  const queue = [];
  indegree.forEach((d, i) => { if (d === 0) queue.push(i); });
  for (let head = 0; head < queue.length; head++) {
    const i = queue[head];
    for (const c of children[i]) {
      depth[c] = Math.max(depth[c], depth[i] + 1);
      if (--indegree[c] === 0) queue.push(c);
    }
  }
  return depth;
}

function fullGraph(tasks, links) {
  const ids = new Set(tasks.map((t) => t.id));
  const nodes = tasks.map((t) => ({ id: t.id, task: t, ...NODE }));
  const edges = links
    .filter((l) => ids.has(l.parent_id) && ids.has(l.child_id))
    .map((l) => ({ from: l.parent_id, to: l.child_id, dashed: !l.requires_success }));
  return { nodes, edges, grouped: false };
}

function groupedGraph(tasks, links) {
  const depth = depths(tasks, links);
  const maxDepth = depth.reduce((a, b) => Math.max(a, b), 0);
  const band = Math.max(1, Math.ceil((maxDepth + 1) / MAX_BANDS));
  const groups = new Map();
  const groupOf = new Map();
  tasks.forEach((t, i) => {
    const b = Math.floor(depth[i] / band);
    const key = `${b}\u0000${t.kind}`;
    let g = groups.get(key);
    if (!g) {
      const first = b * band, last = Math.min(maxDepth, first + band - 1);
      const label = first === last ? `depth ${first}` : `depth ${first}–${last}`;
      g = { id: key, kind: t.kind, label, tasks: [], ...GROUP };
      groups.set(key, g);
    }
    g.tasks.push(t);
    groupOf.set(t.id, key);
  });
  const seen = new Map();
  for (const l of links) {
    const a = groupOf.get(l.parent_id), b = groupOf.get(l.child_id);
    if (a === undefined || b === undefined || a === b) continue;
    const key = `${a}\u0001${b}`;
    const e = seen.get(key) || { from: a, to: b, count: 0, dashed: true };
    e.count += 1;
    e.dashed = e.dashed && !l.requires_success;
    seen.set(key, e);
  }
  return { nodes: [...groups.values()], edges: [...seen.values()], grouped: true };
}

function layout(graph, rankdir = "LR") {
  const g = new dagre.graphlib.Graph({ multigraph: false });
  g.setGraph({ rankdir, nodesep: 12, ranksep: 48, marginx: 20, marginy: 20 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const n of graph.nodes) g.setNode(n.id, { width: n.w, height: n.h });
  for (const e of graph.edges) g.setEdge(e.from, e.to);
  dagre.layout(g);
  for (const n of graph.nodes) {
    const p = g.node(n.id);
    n.x = p.x - n.w / 2;
    n.y = p.y - n.h / 2;
  }
  for (const e of graph.edges) e.points = g.edge(e.from, e.to).points;
  const size = g.graph();
  return { width: size.width, height: size.height };
}

export function groupCounts(tasks) {
  const counts = {};
  for (const t of tasks) counts[t.status] = (counts[t.status] || 0) + 1;
  return counts;
}

export class DagView {
  /** `host`: the element to fill; `onPick(node)`: a task or group was clicked. */
  constructor(host, onPick) {
    this.host = host;
    this.onPick = onPick;
    this.canvas = document.createElement("canvas");
    this.canvas.setAttribute("aria-label", "DAG of the batch");
    this.list = document.createElement("ul"); // what is drawn, for screen readers and tests
    this.list.className = "sr-only dag-nodes";
    host.append(this.canvas, this.list, this.tools(), this.legend());
    this.view = { x: 0, y: 0, k: 1 };
    this.graph = { nodes: [], edges: [] };
    this.signature = "";
    this.bind();
    new ResizeObserver(() => this.resize()).observe(host);
  }

  tools() {
    const box = document.createElement("div");
    box.className = "tools";
    for (const [label, title, fn] of [
      ["+", "Zoom in", () => this.zoomBy(1.25)],
      ["−", "Zoom out", () => this.zoomBy(0.8)],
      ["Fit", "Fit the whole DAG", () => this.fit()],
    ]) {
      const b = document.createElement("button");
      b.textContent = label;
      b.title = title;
      b.addEventListener("click", fn);
      box.append(b);
    }
    return box;
  }

  legend() {
    const box = document.createElement("div");
    box.className = "legend";
    for (const [name, s] of Object.entries(STATUS)) {
      const span = document.createElement("span");
      span.innerHTML = `<b style="color:${s.color}">${s.icon}</b> ${name}`;
      box.append(span);
    }
    return box;
  }

  /** Show `tasks`/`links`; keeps the layout and the view when the set of tasks is the same. */
  setData(tasks, links) {
    const signature = `${tasks.length}:${tasks.map((t) => t.id).join(",")}`;
    if (signature === this.signature) {
      const byId = new Map(tasks.map((t) => [t.id, t]));
      for (const n of this.graph.nodes) {
        if (n.task) n.task = byId.get(n.id);
        else n.tasks = n.tasks.map((t) => byId.get(t.id));
      }
    } else {
      this.signature = signature;
      this.graph = tasks.length > FULL_LIMIT ? groupedGraph(tasks, links) : fullGraph(tasks, links);
      this.size = layout(this.graph);
      if (this.graph.grouped) {
        // a few dozen groups lay out in milliseconds: keep the direction that fits the
        // screen at the larger (more readable) zoom
        const r = this.host.getBoundingClientRect();
        const scale = (z) => Math.min(r.width / z.width, r.height / z.height);
        const across = this.size;
        const down = layout(this.graph, "TB");
        if (scale(down) <= scale(across)) this.size = layout(this.graph, "LR");
        else this.size = down;
      }
      this.resize();
      this.fit();
    }
    this.renderList();
    this.draw();
  }

  renderList() {
    this.list.replaceChildren(...this.graph.nodes.map((n) => {
      const li = document.createElement("li");
      if (n.task) {
        li.dataset.taskId = n.id;
        li.dataset.status = n.task.status;
        li.textContent = `${n.task.name} (${n.task.kind}): ${n.task.status}`;
      } else {
        const counts = groupCounts(n.tasks);
        li.dataset.group = n.id;
        li.textContent = `${n.kind}, ${n.label}: ${n.tasks.length} tasks; ` +
          Object.entries(counts).map(([s, c]) => `${s} ${c}`).join(", ");
      }
      return li;
    }));
  }

  resize() {
    const r = this.host.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    this.canvas.width = Math.max(1, Math.round(r.width * dpr));
    this.canvas.height = Math.max(1, Math.round(r.height * dpr));
    this.draw();
  }

  fit() {
    if (!this.size) return;
    const r = this.host.getBoundingClientRect();
    const k = Math.min(1.5, r.width / this.size.width, r.height / this.size.height) || 1;
    this.view = {
      k,
      x: (r.width - this.size.width * k) / 2,
      y: (r.height - this.size.height * k) / 2,
    };
    this.draw();
  }

  zoomBy(f, cx, cy) {
    const r = this.host.getBoundingClientRect();
    cx = cx ?? r.width / 2;
    cy = cy ?? r.height / 2;
    const k = Math.min(4, Math.max(0.02, this.view.k * f));
    this.view.x = cx - ((cx - this.view.x) * k) / this.view.k;
    this.view.y = cy - ((cy - this.view.y) * k) / this.view.k;
    this.view.k = k;
    this.draw();
  }

  /** Where on the page a task's or group's node is drawn (its centre). */
  screenPositionOf(id) {
    const n = this.graph.nodes.find((m) => m.id === id || (m.tasks && m.tasks.some((t) => t.id === id)));
    if (!n) return null;
    const r = this.canvas.getBoundingClientRect();
    return {
      x: r.left + this.view.x + (n.x + n.w / 2) * this.view.k,
      y: r.top + this.view.y + (n.y + n.h / 2) * this.view.k,
    };
  }

  nodeAt(px, py) {
    const x = (px - this.view.x) / this.view.k, y = (py - this.view.y) / this.view.k;
    return this.graph.nodes.find((n) => x >= n.x && x <= n.x + n.w && y >= n.y && y <= n.y + n.h);
  }

  bind() {
    let drag = null;
    this.canvas.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, vx: this.view.x, vy: this.view.y, moved: false };
      this.canvas.setPointerCapture(e.pointerId);
    });
    this.canvas.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
      this.view.x = drag.vx + dx;
      this.view.y = drag.vy + dy;
      this.draw();
    });
    this.canvas.addEventListener("pointerup", (e) => {
      const wasDrag = drag && drag.moved;
      drag = null;
      if (wasDrag) return;
      const r = this.canvas.getBoundingClientRect();
      const n = this.nodeAt(e.clientX - r.left, e.clientY - r.top);
      if (n) this.onPick(n);
    });
    this.canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      const r = this.canvas.getBoundingClientRect();
      this.zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
  }

  draw() {
    if (this.pending) return;
    this.pending = requestAnimationFrame(() => {
      this.pending = 0;
      this.paint();
    });
  }

  paint() {
    const ctx = this.canvas.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    const { x, y, k } = this.view;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    ctx.setTransform(dpr * k, 0, 0, dpr * k, dpr * x, dpr * y);
    // only what is on screen (large batches: most of it is not)
    const vx0 = -x / k, vy0 = -y / k;
    const vx1 = vx0 + this.canvas.width / dpr / k, vy1 = vy0 + this.canvas.height / dpr / k;
    const visible = (n) => n.x + n.w >= vx0 && n.x <= vx1 && n.y + n.h >= vy0 && n.y <= vy1;
    ctx.lineWidth = 1 / Math.max(k, 0.5);
    ctx.strokeStyle = "#9aa4b1";
    for (const e of this.graph.edges) {
      const pts = e.points;
      if (!pts || !pts.length) continue;
      ctx.setLineDash(e.dashed ? [4, 3] : []);
      ctx.beginPath();
      ctx.moveTo(pts[0].x, pts[0].y);
      for (const p of pts.slice(1)) ctx.lineTo(p.x, p.y);
      ctx.stroke();
      const a = pts[pts.length - 2] || pts[0], b = pts[pts.length - 1];
      const ang = Math.atan2(b.y - a.y, b.x - a.x);
      ctx.setLineDash([]);
      ctx.beginPath();
      ctx.moveTo(b.x, b.y);
      ctx.lineTo(b.x - 7 * Math.cos(ang - 0.4), b.y - 7 * Math.sin(ang - 0.4));
      ctx.lineTo(b.x - 7 * Math.cos(ang + 0.4), b.y - 7 * Math.sin(ang + 0.4));
      ctx.closePath();
      ctx.fillStyle = "#9aa4b1";
      ctx.fill();
    }
    const detail = k > 0.3; // text is unreadable below this zoom: colours only
    for (const n of this.graph.nodes) {
      if (!visible(n)) continue;
      if (n.task) this.paintTask(ctx, n, detail);
      else this.paintGroup(ctx, n, detail);
    }
  }

  paintTask(ctx, n, detail) {
    const s = statusOf(n.task.status);
    ctx.fillStyle = s.tint;
    ctx.strokeStyle = s.color;
    ctx.lineWidth = n.id === this.selected ? 3 : 1.5;
    roundRect(ctx, n.x, n.y, n.w, n.h, 5);
    ctx.fill();
    ctx.stroke();
    ctx.fillStyle = s.color;
    ctx.fillRect(n.x, n.y + 3, 5, n.h - 6);
    if (!detail) return;
    ctx.fillStyle = "#1d2127";
    ctx.font = "600 12px system-ui, sans-serif";
    ctx.fillText(clip(ctx, `${s.icon} ${n.task.name}`, n.w - 16), n.x + 10, n.y + 16);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#4b5563";
    ctx.fillText(clip(ctx, `${n.task.status} · ${n.task.kind}`, n.w - 16), n.x + 10, n.y + 32);
  }

  paintGroup(ctx, n, detail) {
    const counts = groupCounts(n.tasks);
    ctx.fillStyle = "#fff";
    ctx.strokeStyle = "#6b7280";
    ctx.lineWidth = 1.2;
    roundRect(ctx, n.x, n.y, n.w, n.h, 5);
    ctx.fill();
    ctx.stroke();
    let bx = n.x + 8;
    const bw = n.w - 16;
    for (const [name, s] of Object.entries(STATUS)) {
      const w = ((counts[name] || 0) / n.tasks.length) * bw;
      ctx.fillStyle = s.color;
      ctx.fillRect(bx, n.y + n.h - 14, w, 8);
      bx += w;
    }
    if (!detail) return;
    ctx.fillStyle = "#1d2127";
    ctx.font = "600 12px system-ui, sans-serif";
    ctx.fillText(clip(ctx, `${n.kind} · ${n.tasks.length} tasks`, n.w - 16), n.x + 8, n.y + 15);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#4b5563";
    const top = Object.entries(counts).sort((a, b) => b[1] - a[1]).slice(0, 3)
      .map(([st, c]) => `${statusOf(st).icon}${c}`).join(" ");
    ctx.fillText(clip(ctx, `${n.label}  ${top}`, n.w - 16), n.x + 8, n.y + 30);
  }
}

function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  ctx.moveTo(x + r, y);
  ctx.arcTo(x + w, y, x + w, y + h, r);
  ctx.arcTo(x + w, y + h, x, y + h, r);
  ctx.arcTo(x, y + h, x, y, r);
  ctx.arcTo(x, y, x + w, y, r);
  ctx.closePath();
}

function clip(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  while (text.length > 1 && ctx.measureText(`${text}…`).width > width) text = text.slice(0, -1);
  return `${text}…`;
}
