// ComfyUI-AutoCloud in the browser: the cloud tab (cache usage, downloads with live progress, pin / evict /
// fetch, the loaded workflow's models, health checks) and two fixes to the frontend's model handling:
// - a workflow's download hints (top-level `models[]`, which the frontend drops when it queues a prompt)
//   are sent to the server when the workflow loads and put back into the queued workflow;
// - the "Missing Models" check counts the models AutoCloud can provide as present, so the dialog only
//   lists models nobody can provide (its Download button would save to this computer, not the server).
// A sidebar tab (frontend >= 1.2: app.extensionManager.registerSidebarTab); older frontends get a small
// floating panel. Rows are updated in place (progress arrives ~4x/s; a rebuilt row would lose clicks).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "autocloud";
const POLL_MS = 2000;
const REASONS = { prefetch: "for a queued prompt", "on-demand": "needed by a loader", background: "fetching ahead",
  api: "requested here", unknown: "" };
const PHASES = { queued: "waiting", wait: "waiting for another download", start: "connecting",
  download: "downloading", commit: "verifying and saving" };
const ORIGINS = { manifest: "manifest", workflow: "from workflow", request: "added by URL" };
const WORKFLOW_STATUS = { cached: "cached", on_disk: "on disk", downloading: "downloading",
  available: "downloads on Run", refused: "not allowed", missing: "missing: no source known" };
const PROVIDED = new Set(["cached", "on_disk", "downloading", "available"]);

const state = {
  status: null, downloads: new Map(), error: null, root: null, timer: null, parts: null,
  filter: "", confirming: null, health: null,
  hints: new Map(), // "folder/name" -> {name, url, directory, hash?, hash_type?} of every loaded workflow
  workflow: [], // the loaded workflow's models as /autocloud/workflow answered
  provide: null, // directory -> Set(names) AutoCloud provides, while the frontend checks for missing models
};

// ------------------------------------------------------------------ formatting
export function human(n) {
  if (n === null || n === undefined) return "?";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v.toFixed(0)} ${units[i]}` : `${v.toFixed(1)} ${units[i]}`;
}

export function clock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const mm = String(Math.floor((s % 3600) / 60)).padStart(2, "0");
  const ss = String(s % 60).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}

function ago(ts) {
  const d = Math.max(0, Date.now() / 1000 - ts);
  if (d >= 86400) return `${Math.floor(d / 86400)}d ago`;
  if (d >= 3600) return `${Math.floor(d / 3600)}h ago`;
  if (d >= 60) return `${Math.floor(d / 60)}m ago`;
  return `${Math.floor(d)}s ago`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function splitKey(key) {
  const i = key.indexOf("/");
  return i < 0 ? ["", key] : [key.slice(0, i), key.slice(i + 1)];
}

// ------------------------------------------------------------------ DOM helpers
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") Object.assign(node.style, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function button(label, icon, title, onclick, extra = "") {
  return el("button", { class: `autocloud-btn ${extra}`.trim(), title, type: "button", onclick },
    el("i", { class: `pi ${icon}` }), el("span", {}, label));
}

function originTag(origin) {
  return origin ? el("span", { class: `autocloud-tag autocloud-origin-${origin}` }, ORIGINS[origin] || origin) : "";
}

const CSS = `
.autocloud-panel { padding: 10px; font-size: 13px; overflow-y: auto; height: 100%; box-sizing: border-box;
  color: var(--p-text-color, var(--fg-color, #ddd)); }
.autocloud-panel h3 { font-size: 15px; margin: 0 0 8px; }
.autocloud-section { margin-bottom: 14px; }
.autocloud-section > .autocloud-title { font-weight: 600; margin: 6px 0; opacity: .85; }
.autocloud-muted { font-size: 11px; opacity: .75; overflow-wrap: anywhere; }
.autocloud-row { margin-bottom: 8px; padding: 4px 6px; border-radius: 6px;
  border-left: 3px solid transparent; background: var(--p-content-hover-background, rgba(127,127,127,.06)); }
.autocloud-row.autocloud-failed { border-left-color: var(--p-red-400, #e66); }
.autocloud-row.autocloud-cancelled { border-left-color: var(--p-amber-400, #d9a441); }
.autocloud-line { display: flex; justify-content: space-between; align-items: flex-start; gap: 6px; }
.autocloud-name { font-weight: 500; overflow-wrap: anywhere; }
.autocloud-reason { white-space: normal; overflow-wrap: anywhere; font-size: 12px; margin-top: 2px; }
.autocloud-failed .autocloud-reason { color: var(--p-red-400, #e66); }
.autocloud-actions { display: flex; gap: 4px; flex-wrap: wrap; flex-shrink: 0; }
.autocloud-btn { display: inline-flex; align-items: center; gap: 4px; font: inherit; font-size: 11px;
  padding: 2px 7px; cursor: pointer; border-radius: 4px; color: inherit;
  background: var(--comfy-input-bg, var(--p-button-secondary-background, #333));
  border: 1px solid var(--p-content-border-color, var(--border-color, #555)); }
.autocloud-btn:hover { border-color: var(--p-primary-color, #4a9); }
.autocloud-btn.autocloud-danger { color: var(--p-red-400, #e66); }
.autocloud-btn .pi { font-size: 11px; }
.autocloud-tag { font-size: 10px; padding: 0 5px; border-radius: 8px; margin-left: 4px; white-space: nowrap;
  border: 1px solid var(--p-content-border-color, #555); opacity: .85; font-weight: normal; }
.autocloud-bar { background: var(--comfy-input-bg, #333); height: 8px; border-radius: 4px; overflow: hidden;
  margin: 4px 0; }
.autocloud-bar > div { height: 100%; background: var(--p-primary-color, #4a9); transition: width .2s; }
.autocloud-filter { width: 100%; box-sizing: border-box; margin: 4px 0 8px; padding: 4px 6px; font: inherit;
  color: inherit; background: var(--comfy-input-bg, #222); border-radius: 4px;
  border: 1px solid var(--p-content-border-color, #555); }
.autocloud-error { color: var(--p-red-400, #e66); margin-bottom: 8px; overflow-wrap: anywhere; }
.autocloud-pinned { color: var(--p-primary-color, #4a9); }
.autocloud-check-fail { color: var(--p-red-400, #e66); }
.autocloud-check-warn { color: var(--p-amber-400, #d9a441); }
`;

function installStyle() {
  if (document.getElementById("autocloud-style")) return;
  document.head.append(el("style", { id: "autocloud-style" }, CSS));
}

// Keep `container`'s children in the order of `items`, one per key: existing rows are updated, not rebuilt.
function syncRows(container, items, keyOf, create, update) {
  const existing = new Map([...container.children].map((c) => [c.dataset.key, c]));
  let prev = null;
  const wanted = new Set();
  for (const item of items) {
    const key = keyOf(item);
    wanted.add(key);
    let node = existing.get(key);
    if (!node) {
      node = create(item);
      node.dataset.key = key;
    }
    node._data = item;
    update(node, item);
    const want = prev ? prev.nextSibling : container.firstChild;
    if (node !== want) container.insertBefore(node, want);
    prev = node;
  }
  for (const [key, node] of existing) if (!wanted.has(key)) node.remove();
}

// ------------------------------------------------------------------ server calls
async function post(path, body) {
  let res;
  try {
    res = await api.fetchApi(path, { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body) });
  } catch (e) {
    state.error = `${path}: ${e.message}`;
    render();
    return null;
  }
  const data = await res.json().catch(() => ({}));
  state.error = res.ok ? null : (data.error || `${path}: ${res.status} ${res.statusText}`);
  await refresh();
  return res.ok ? data : null;
}

async function refresh() {
  try {
    const res = await api.fetchApi("/autocloud/status");
    if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
    state.status = await res.json();
    state.downloads = new Map(state.status.downloads.map((d) => [d.key, d]));
  } catch (e) {
    state.error = `AutoCloud status unavailable: ${e.message}`;
  }
  render();
}

async function refreshHealth() {
  try {
    const res = await api.fetchApi("/autocloud/doctor");
    if (res.ok) state.health = await res.json();
  } catch (e) {
    state.health = null;
  }
  render();
}

// ------------------------------------------------------------------ rows
function downloadRowCreate() {
  const name = el("div", { class: "autocloud-name" });
  const actions = el("div", { class: "autocloud-actions" });
  const cancel = button("cancel", "pi-times", "stop this download (the partial file is kept; it resumes later)",
    (ev) => post("/autocloud/cancel", { key: ev.currentTarget.closest(".autocloud-row").dataset.key }),
    "autocloud-cancel");
  actions.append(cancel);
  const fill = el("div");
  const line = el("div", { class: "autocloud-muted autocloud-progress" });
  const row = el("div", { class: "autocloud-row autocloud-download" },
    el("div", { class: "autocloud-line" }, name, actions), el("div", { class: "autocloud-bar" }, fill), line);
  row._parts = { name, fill, line };
  return row;
}

function downloadRowUpdate(row, d) {
  const [folder, file] = splitKey(d.key);
  const { name, fill, line } = row._parts;
  if (!name.childNodes.length || name.dataset.origin !== String(d.origin)) {
    name.replaceChildren(file, el("span", { class: "autocloud-muted" }, ` ${folder}`), originTag(d.origin));
    name.dataset.origin = String(d.origin);
  }
  const total = d.bytes_total || 0;
  const frac = total ? d.bytes_done / total : 0;
  fill.style.width = `${Math.max(0, Math.min(100, frac * 100)).toFixed(1)}%`;
  const phase = PHASES[d.phase] || d.phase;
  const why = REASONS[d.reason] ?? d.reason;
  const parts = [d.phase === "download" || d.phase === "commit"
    ? `${phase} ${human(d.bytes_done)} of ${human(total || null)}${total ? ` (${(frac * 100).toFixed(0)}%)` : ""}`
    : phase];
  if (d.speed && d.phase === "download") parts.push(`${human(d.speed)}/s`);
  if (d.eta !== undefined && d.phase === "download") parts.push(`${clock(d.eta)} left`);
  if (why) parts.push(why);
  line.textContent = parts.join(" · ");
}

function finishedRowCreate(r) {
  const name = el("div", { class: "autocloud-name" });
  const reason = el("div", { class: "autocloud-reason" });
  const actions = el("div", { class: "autocloud-actions" });
  const row = el("div", { class: "autocloud-row" }, el("div", { class: "autocloud-line" }, name, actions), reason);
  row._parts = { name, reason, actions };
  return row;
}

function finishedRowUpdate(row, r) {
  const [folder, file] = splitKey(r.key);
  const { name, reason, actions } = row._parts;
  row.classList.toggle("autocloud-failed", !r.cancelled);
  row.classList.toggle("autocloud-cancelled", !!r.cancelled);
  name.replaceChildren(file, el("span", { class: "autocloud-muted" }, ` ${folder}`), originTag(r.origin));
  const sig = `${r.cancelled}|${r.origin}|${r.error}|${r.bytes_done}`;
  if (row.dataset.sig === sig) return;
  row.dataset.sig = sig;
  const again = () => post("/autocloud/fetch", { key: r.key });
  const dismiss = button("", "pi-times", "dismiss", () => post("/autocloud/dismiss", { key: r.key }),
    "autocloud-dismiss");
  if (r.cancelled) {
    const pct = r.bytes_total ? Math.floor((100 * r.bytes_done) / r.bytes_total) : 0;
    reason.textContent = r.bytes_done ? `cancelled, ${pct}% kept (${human(r.bytes_done)})` : "cancelled";
    actions.replaceChildren(button("resume", "pi-play", "continue from the kept part", again, "autocloud-resume"),
      dismiss);
  } else {
    const error = r.error || "unknown error";  // the row already names the model: no "<key>: " prefix
    reason.textContent = `failed: ${error.startsWith(`${r.key}: `) ? error.slice(r.key.length + 2) : error}`;
    const retry = r.origin ? [button("retry", "pi-refresh", "try the download again", again, "autocloud-retry")] : [];
    actions.replaceChildren(...retry, dismiss);
  }
}

function fileRowCreate() {
  const name = el("div", { class: "autocloud-name" });
  const info = el("span", { class: "autocloud-muted" });
  const actions = el("span", { class: "autocloud-actions" });
  const row = el("div", { class: "autocloud-row autocloud-file" }, name,
    el("div", { class: "autocloud-line", style: { alignItems: "center" } }, info, actions));
  row._parts = { name, info, actions };
  return row;
}

function fileRowUpdate(row, f) {
  const [folder, file] = splitKey(f.key);
  const { name, info, actions } = row._parts;
  name.replaceChildren(...(f.pinned ? [el("i", { class: "pi pi-thumbtack autocloud-pinned", title: "pinned" }), " "] : []),
    file, el("span", { class: "autocloud-muted" }, ` ${folder}`), originTag(f.origin));
  name.title = `${f.key}\n${f.source || ""}`;
  // the index counts the request that downloaded a file as its first access: loads from the cache are the rest
  info.textContent = `${human(f.size)} · ${plural(Math.max(0, f.hits - 1), "load")} from cache · last used `
    + `${ago(f.last_access)}${f.in_use ? " · in use" : ""}`;
  const sig = `${f.pinned}|${state.confirming === f.key}`;
  if (actions.dataset.sig === sig) return;
  actions.dataset.sig = sig;
  if (state.confirming === f.key) {
    actions.replaceChildren(el("span", { class: "autocloud-muted" }, `delete ${human(f.size)}?`),
      button("delete", "pi-trash", "delete the file from the cache (it downloads again when used)", () => {
        state.confirming = null;
        post("/autocloud/evict", { key: f.key });
      }, "autocloud-danger autocloud-evict-yes"),
      button("keep", "pi-undo", "keep the file", () => { state.confirming = null; render(); }, "autocloud-evict-no"));
    return;
  }
  actions.replaceChildren(
    button(f.pinned ? "unpin" : "pin", "pi-thumbtack", "pinned files are never evicted",
      () => post("/autocloud/pin", { key: f.key, pinned: !f.pinned }), "autocloud-pin"),
    button("evict", "pi-trash", "delete from the cache (asks first)", () => { state.confirming = f.key; render(); },
      "autocloud-evict"));
}

function availableRowCreate() {
  const name = el("span", { class: "autocloud-name" });
  const act = button("fetch", "pi-download", "download it into the cache now", (ev) =>
    post("/autocloud/fetch", { key: ev.currentTarget.closest(".autocloud-row").dataset.key }), "autocloud-fetch");
  const row = el("div", { class: "autocloud-row autocloud-available" },
    el("div", { class: "autocloud-line", style: { alignItems: "center" } }, name, act));
  row._parts = { name };
  return row;
}

function availableRowUpdate(row, a) {
  const [folder, file] = splitKey(a.key);
  row._parts.name.replaceChildren(file, el("span", { class: "autocloud-muted" },
    ` ${folder}${a.size ? ` · ${human(a.size)}` : ""}`), originTag(a.origin));
}

function workflowRowCreate() {
  const name = el("span", { class: "autocloud-name" });
  const what = el("div", { class: "autocloud-muted" });
  const actions = el("span", { class: "autocloud-actions" });
  const row = el("div", { class: "autocloud-row autocloud-wf" }, el("div", { class: "autocloud-line" }, name, actions),
    what);
  row._parts = { name, what, actions };
  return row;
}

function workflowStatus(m) {
  if (state.downloads.has(m.key)) return "downloading";
  if (state.status && state.status.files.some((f) => f.key === m.key)) return "cached";
  return m.status === "downloading" || m.status === "cached" ? "available" : m.status;
}

function workflowRowUpdate(row, m) {
  const st = workflowStatus(m);
  const { name, what, actions } = row._parts;
  name.replaceChildren(m.name, el("span", { class: "autocloud-muted" }, ` ${m.folder}`), originTag(m.origin));
  what.textContent = WORKFLOW_STATUS[st] + (m.reason ? `: ${m.reason}` : "");
  what.className = `autocloud-muted${st === "missing" || st === "refused" ? " autocloud-check-fail" : ""}`;
  if (actions.dataset.st === st) return;
  actions.dataset.st = st;
  actions.replaceChildren(...(st === "available"
    ? [button("fetch now", "pi-download", "download it now instead of when the prompt runs",
      () => post("/autocloud/fetch", { key: m.key }), "autocloud-fetch")] : []));
}

// ------------------------------------------------------------------ the panel
function section(title) {
  const head = el("div", { class: "autocloud-title" }, title);
  const body = el("div");
  const empty = el("div", { class: "autocloud-muted" });
  const node = el("div", { class: "autocloud-section" }, head, body, empty);
  return { node, head, body, empty };
}

function build(root) {
  const usageText = el("div", { class: "autocloud-usage" });
  const usageFill = el("div");
  const usageInfo = el("div", { class: "autocloud-muted autocloud-counters" });
  const cacheDir = el("div", { class: "autocloud-muted" });
  const usage = section("Usage");
  usage.body.append(usageText, el("div", { class: "autocloud-bar" }, usageFill), usageInfo, cacheDir);
  const filter = el("input", { class: "autocloud-filter", type: "search", placeholder: "filter models…",
    oninput: (ev) => { state.filter = ev.target.value.trim().toLowerCase(); render(); } });
  const parts = {
    error: el("div", { class: "autocloud-error" }),
    manifest: el("div", { class: "autocloud-error" }),
    health: section("Health"),
    usage, usageText, usageFill, usageInfo, cacheDir,
    workflow: section("This workflow"),
    downloads: section("Downloads"),
    finished: el("div"),
    filter,
    cached: section("Cached"),
    available: section("Not downloaded yet"),
  };
  parts.downloads.body.after(parts.finished);
  root.replaceChildren(el("h3", {}, "AutoCloud model cache"), parts.error, parts.manifest, parts.health.node,
    usage.node, parts.workflow.node, parts.downloads.node, filter, parts.cached.node, parts.available.node);
  return parts;
}

function matches(key) {
  return !state.filter || key.toLowerCase().includes(state.filter);
}

function render() {
  const root = state.root;
  if (!root || !root.isConnected) return;
  if (!state.parts || !root.contains(state.parts.usage.node)) state.parts = build(root);
  const p = state.parts;
  const s = state.status;
  p.error.textContent = state.error || "";
  p.error.style.display = state.error ? "" : "none";
  p.manifest.textContent = s && s.manifest_error ? `manifest not loaded: ${s.manifest_error}` : "";
  p.manifest.style.display = s && s.manifest_error ? "" : "none";
  renderHealth(p.health);
  if (!s) { p.usageText.textContent = "loading…"; return; }
  const cap = s.cap;
  p.usageText.textContent = cap ? `${human(s.bytes)} of ${human(cap)} (${((100 * s.bytes) / cap).toFixed(0)}%)`
    : `${human(s.bytes)} used (no size cap)`;
  p.usageFill.style.width = `${cap ? Math.min(100, (100 * s.bytes) / cap) : 0}%`;
  const c = s.counters;
  p.usageInfo.textContent = `${plural(s.files.length, "file")}, ${s.pinned} pinned · ${human(s.disk_free)} free on disk · `
    + `${c.downloads} downloaded (${human(c.bytes_downloaded)}) · ${plural(c.hits, "load")} from cache`
    + (c.errors ? ` · ${c.errors} failed` : "");
  p.cacheDir.textContent = s.cache_dir;

  p.workflow.node.style.display = state.workflow.length ? "" : "none";
  const n = state.workflow.length;
  p.workflow.head.textContent = `This workflow (${plural(n, "model")})`;
  syncRows(p.workflow.body, state.workflow, (m) => m.key, workflowRowCreate, workflowRowUpdate);

  renderDownloads();
  const files = s.files.filter((f) => matches(f.key));
  p.cached.head.textContent = `Cached (${s.files.length})`;
  p.cached.empty.textContent = s.files.length ? (files.length ? "" : "nothing matches the filter") : "nothing cached yet";
  syncRows(p.cached.body, files, (f) => f.key, fileRowCreate, fileRowUpdate);
  const notBusy = s.available.filter((a) => !state.downloads.has(a.key));
  const avail = notBusy.filter((a) => matches(a.key));
  p.available.node.style.display = notBusy.length ? "" : "none";
  p.available.head.textContent = `Not downloaded yet (${notBusy.length})`;
  p.available.empty.textContent = avail.length ? "" : "nothing matches the filter";
  syncRows(p.available.body, avail.slice(0, 200), (a) => a.key, availableRowCreate, availableRowUpdate);
}

function renderDownloads() {
  const p = state.parts;
  if (!p || !state.status) return;
  const active = [...state.downloads.values()];
  const finished = state.status.recent.filter((r) => (r.error || r.cancelled) && !state.downloads.has(r.key));
  p.downloads.head.textContent = `Downloads (${active.length} running${finished.length
    ? `, ${finished.length} stopped` : ""})`;
  p.downloads.empty.textContent = active.length ? "" : "none running";
  syncRows(p.downloads.body, active, (d) => d.key, downloadRowCreate, downloadRowUpdate);
  syncRows(p.finished, finished.slice(0, 10), (r) => r.key, finishedRowCreate, finishedRowUpdate);
}

function renderHealth(sec) {
  const h = state.health;
  if (!h) { sec.node.style.display = "none"; return; }
  sec.node.style.display = "";
  const bad = h.checks.filter((c) => c.status !== "ok" && c.status !== "info");
  sec.head.textContent = bad.length ? `Health: ${bad.length} to fix` : `Health: all ${h.checks.length} checks OK`;
  syncRows(sec.body, bad, (c) => c.name, () => el("div", { class: "autocloud-row autocloud-check" }),
    (row, c) => {
      row.className = `autocloud-row autocloud-check autocloud-check-${c.status}`;
      row.textContent = `${c.name}: ${c.detail}`;
    });
}

function mount(element) {
  installStyle();
  state.root = el("div", { class: "autocloud-panel" });
  state.parts = null;
  element.replaceChildren(state.root);
  refresh();
  refreshHealth();
  clearInterval(state.timer);
  state.timer = setInterval(() => {
    if (state.root && state.root.isConnected) refresh();
    else clearInterval(state.timer);
  }, POLL_MS);
}

function floatingPanel() {
  const panel = el("div", { id: "autocloud-floating", style: { position: "fixed", right: "12px", bottom: "48px",
    width: "380px", maxHeight: "70vh", zIndex: 1000, background: "var(--comfy-menu-bg, #222)",
    border: "1px solid var(--border-color, #555)", borderRadius: "6px", display: "none", overflow: "auto" } });
  document.body.append(panel);
  const toggle = el("button", { id: "autocloud-toggle", class: "autocloud-btn", style: { position: "fixed",
    right: "12px", bottom: "12px", zIndex: 1001 }, onclick: () => {
    const open = panel.style.display === "none";
    panel.style.display = open ? "block" : "none";
    if (open) mount(panel);
  } }, "AutoCloud");
  document.body.append(toggle);
}

// ------------------------------------------------------------------ workflow models
function hintList(graphData) {
  const out = [];
  const add = (list) => { if (Array.isArray(list)) for (const m of list) if (m && m.name && m.directory) out.push(m); };
  add(graphData.models);
  const groups = [graphData.nodes, ...((graphData.definitions && graphData.definitions.subgraphs) || [])
    .map((g) => g && g.nodes)];
  for (const nodes of groups) for (const n of nodes || []) add(n && n.properties && n.properties.models);
  return out;
}

// What the server needs to know which models a workflow names (not its whole layout).
function slim(graphData) {
  const node = (n) => ({ id: n.id, type: n.type, mode: n.mode, widgets_values: n.widgets_values,
    inputs: (n.inputs || []).map((i) => ({ name: i.name, widget: i.widget, link: i.link })),
    properties: n.properties && n.properties.models ? { models: n.properties.models } : {} });
  const subgraphs = ((graphData.definitions && graphData.definitions.subgraphs) || [])
    .filter((g) => g && Array.isArray(g.nodes)).map((g) => ({ nodes: g.nodes.map(node) }));
  return { models: Array.isArray(graphData.models) ? graphData.models : [],
    nodes: (graphData.nodes || []).map(node), definitions: { subgraphs } };
}

async function beforeConfigureGraph(graphData) {
  state.provide = null;
  if (!graphData || !Array.isArray(graphData.nodes)) return;
  for (const m of hintList(graphData)) if (m.url) state.hints.set(`${m.directory}/${m.name}`, m);
  let answer;
  try {
    const res = await api.fetchApi("/autocloud/workflow", { method: "POST",
      headers: { "Content-Type": "application/json" }, body: JSON.stringify({ workflow: slim(graphData) }) });
    answer = await res.json();
    if (!res.ok) { console.warn("AutoCloud: workflow check:", answer.error || res.status); return; }
  } catch (e) {
    console.warn("AutoCloud: workflow check failed:", e.message);
    return;
  }
  state.workflow = answer.models;
  state.provide = new Map();
  for (const m of answer.models) {
    if (!PROVIDED.has(m.status)) continue;
    for (const dir of m.directories) {
      if (!state.provide.has(dir)) state.provide.set(dir, new Set());
      state.provide.get(dir).add(m.name);
    }
  }
  const later = answer.models.filter((m) => m.status === "available");
  const toast = app.extensionManager && app.extensionManager.toast;
  if (later.length && toast && typeof toast.add === "function") {
    toast.add({ severity: "info", summary: "AutoCloud", life: 8000,
      detail: `${later.length === 1 ? `${later[0].name} downloads` : `${later.length} models download`} on the `
        + "server when you run this workflow (see the AutoCloud tab to fetch now)." });
  }
  render();
}

// The missing-models check asks /experiment/models/<folder>; while a workflow loads, add what AutoCloud provides.
function wrapGetModels() {
  if (typeof api.getModels !== "function" || api.getModels.__autocloud) return;
  const original = api.getModels.bind(api);
  const wrapped = async (folder) => {
    const list = await original(folder);
    const extra = state.provide && state.provide.get(folder);
    if (!extra || !Array.isArray(list)) return list;
    const have = new Set(list.map((m) => m.name));
    return [...list, ...[...extra].filter((n) => !have.has(n)).map((name) => ({ name, pathIndex: 0 }))];
  };
  wrapped.__autocloud = true;
  api.getModels = wrapped;
}

// The frontend drops the workflow's top-level `models` when it queues: put back the hints the prompt uses.
function wrapGraphToPrompt() {
  if (typeof app.graphToPrompt !== "function" || app.graphToPrompt.__autocloud) return;
  const original = app.graphToPrompt.bind(app);
  const wrapped = async (...args) => {
    const p = await original(...args);
    try {
      const used = new Set();
      for (const node of Object.values((p && p.output) || {})) {
        for (const v of Object.values(node.inputs || {})) if (typeof v === "string") used.add(v);
      }
      const have = new Set(((p.workflow && p.workflow.models) || []).map((m) => `${m.directory}/${m.name}`));
      const add = [...state.hints.entries()].filter(([k, m]) => used.has(m.name) && !have.has(k)).map(([, m]) => m);
      if (add.length && p.workflow) p.workflow.models = [...(p.workflow.models || []), ...add];
    } catch (e) {
      console.warn("AutoCloud: could not add the workflow's model hints:", e.message);
    }
    return p;
  };
  wrapped.__autocloud = true;
  app.graphToPrompt = wrapped;
}

app.registerExtension({
  name: "autocloud.panel",
  beforeConfigureGraph,
  afterConfigureGraph() {
    state.provide = null;
  },
  async setup() {
    wrapGetModels();
    wrapGraphToPrompt();
    api.addEventListener("autocloud.progress", (event) => {
      const d = event.detail;
      if (!d || !d.key) return;
      if (d.finished) {
        state.downloads.delete(d.key);
        refresh();
      } else {
        const old = state.downloads.get(d.key);
        state.downloads.set(d.key, { ...d, origin: old ? old.origin : d.origin });
        if (old) renderDownloads();
        else render(); // a new row: it leaves "Not downloaded yet" at once (one row per model)
      }
    });
    const manager = app.extensionManager;
    if (manager && typeof manager.registerSidebarTab === "function") {
      manager.registerSidebarTab({
        id: TAB_ID,
        icon: "pi pi-cloud-download",
        title: "AutoCloud",
        tooltip: "AutoCloud model cache",
        type: "custom",
        render: mount,
      });
    } else {
      floatingPanel();
    }
  },
});
