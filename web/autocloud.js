// ComfyUI-AutoCloud panel: cache usage, downloads with live progress, pin / evict / fetch.
// A sidebar tab (ComfyUI frontend >= 1.2: app.extensionManager.registerSidebarTab); on older
// frontends without it, a small floating panel toggled from the menu button it adds.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TAB_ID = "autocloud";
const POLL_MS = 2000;
const state = { status: null, downloads: new Map(), error: null, root: null, timer: null };

function human(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return i === 0 ? `${v.toFixed(0)} ${units[i]}` : `${v.toFixed(1)} ${units[i]}`;
}

function ago(ts) {
  const d = Math.max(0, Date.now() / 1000 - ts);
  if (d >= 86400) return `${Math.floor(d / 86400)}d ago`;
  if (d >= 3600) return `${Math.floor(d / 3600)}h ago`;
  if (d >= 60) return `${Math.floor(d / 60)}m ago`;
  return `${Math.floor(d)}s ago`;
}

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

function bar(fraction, color) {
  const pct = Math.max(0, Math.min(100, fraction * 100));
  return el("div", { class: "autocloud-bar", style: { background: "var(--comfy-input-bg, #333)", height: "8px",
      borderRadius: "4px", overflow: "hidden", margin: "3px 0" } },
    el("div", { style: { width: `${pct}%`, height: "100%", background: color || "var(--p-primary-color, #4a9)" } }));
}

async function post(path, body) {
  const res = await api.fetchApi(path, { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body) });
  if (!res.ok) {
    const msg = (await res.json().catch(() => ({}))).error || `${res.status} ${res.statusText}`;
    state.error = msg;
  } else {
    state.error = null;
  }
  await refresh();
}

async function refresh() {
  try {
    const res = await api.fetchApi("/autocloud/status");
    if (!res.ok) throw new Error(`${res.status} ${res.statusText}`);
    state.status = await res.json();
    state.downloads = new Map(state.status.downloads.map((d) => [d.key, d]));
  } catch (e) {
    state.error = `status unavailable: ${e.message}`;
  }
  render();
}

function section(title, ...children) {
  return el("div", { class: "autocloud-section", style: { marginBottom: "14px" } },
    el("div", { style: { fontWeight: "bold", margin: "6px 0", opacity: 0.85 } }, title), ...children);
}

function downloadRow(d) {
  const total = d.bytes_total || 0;
  const frac = total ? d.bytes_done / total : 0;
  const speed = d.speed ? `${human(d.speed)}/s` : "";
  const eta = d.eta !== undefined ? `, ${d.eta}s left` : "";
  return el("div", { class: "autocloud-download", "data-key": d.key, style: { marginBottom: "8px" } },
    el("div", { style: { display: "flex", justifyContent: "space-between", gap: "6px" } },
      el("span", { style: { overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" }, title: d.key }, d.key),
      el("span", { style: { opacity: 0.7, whiteSpace: "nowrap" } }, d.reason,
        d.finished ? "" : el("button", { class: "autocloud-btn autocloud-cancel", title: "stop this download (the partial file is kept and resumes later)",
          style: { fontSize: "11px", padding: "0 5px", marginLeft: "6px", cursor: "pointer" },
          onclick: () => post("/autocloud/cancel", { key: d.key }) }, "cancel"))),
    bar(frac, d.phase === "error" ? "#c55" : undefined),
    el("div", { style: { fontSize: "11px", opacity: 0.75 } },
      d.phase === "queued" ? "queued" :
        `${d.phase} ${human(d.bytes_done)} / ${human(total)} (${(frac * 100).toFixed(0)}%) ${speed}${eta}`));
}

function fileRow(f) {
  const btn = (label, title, fn) => el("button", { title, class: "autocloud-btn", onclick: fn,
    style: { fontSize: "11px", padding: "1px 6px", marginLeft: "4px", cursor: "pointer" } }, label);
  return el("div", { class: "autocloud-file", "data-key": f.key, style: { marginBottom: "6px" } },
    el("div", { title: `${f.key}\n${f.source}`, style: { overflow: "hidden", textOverflow: "ellipsis",
      whiteSpace: "nowrap" } }, (f.pinned ? "📌 " : "") + f.key),
    el("div", { style: { display: "flex", justifyContent: "space-between", alignItems: "center", fontSize: "11px" } },
      el("span", { style: { opacity: 0.75 } }, `${human(f.size)} · ${f.hits} hits · ${ago(f.last_access)}`
        + (f.in_use ? " · in use" : "")),
      el("span", { style: { whiteSpace: "nowrap" } },
        btn(f.pinned ? "unpin" : "pin", "pinned files are never evicted",
          () => post("/autocloud/pin", { key: f.key, pinned: !f.pinned })),
        btn("evict", "delete from the cache (downloads again when used)",
          () => post("/autocloud/evict", { key: f.key })))));
}

function render() {
  const root = state.root;
  if (!root) return;
  const s = state.status;
  root.replaceChildren();
  root.append(el("div", { style: { fontSize: "15px", fontWeight: "bold", marginBottom: "8px" } }, "AutoCloud model cache"));
  if (state.error) root.append(el("div", { class: "autocloud-error", style: { color: "#e66", marginBottom: "8px" } }, state.error));
  if (!s) { root.append(el("div", {}, "loading…")); return; }
  if (s.manifest_error) root.append(el("div", { style: { color: "#e66" } }, `manifest: ${s.manifest_error}`));
  const cap = s.cap;
  root.append(section("Usage",
    el("div", { class: "autocloud-usage" }, cap ? `${human(s.bytes)} of ${human(cap)} (${(100 * s.bytes / cap).toFixed(0)}%)`
      : `${human(s.bytes)} (no cap)`),
    bar(cap ? s.bytes / cap : 0),
    el("div", { style: { fontSize: "11px", opacity: 0.75 } },
      `${s.entries} files, ${s.pinned} pinned · disk ${human(s.disk_free)} free · ${s.counters.hits} hits, `
      + `${s.counters.misses} misses, ${human(s.counters.bytes_downloaded)} downloaded`),
    el("div", { style: { fontSize: "11px", opacity: 0.6, wordBreak: "break-all" } }, s.cache_dir)));
  const downloads = [...state.downloads.values()];
  root.append(section(`Downloads (${downloads.length})`,
    ...(downloads.length ? downloads.map(downloadRow) : [el("div", { style: { opacity: 0.6 } }, "none running")]),
    ...s.recent.filter((r) => r.error).slice(0, 3).map((r) =>
      el("div", { class: "autocloud-failed", title: r.error, style: { color: "#e66", fontSize: "11px",
        overflow: "hidden", textOverflow: "ellipsis", whiteSpace: "nowrap" } }, r.error))));
  root.append(section(`Cached (${s.files.length})`, ...s.files.map(fileRow)));
  if (s.available.length) {
    root.append(section(`In the manifest, not cached (${s.available.length})`,
      ...s.available.slice(0, 50).map((a) => el("div", { style: { display: "flex", justifyContent: "space-between",
        fontSize: "12px" } }, el("span", { title: a.key }, a.key),
      el("button", { class: "autocloud-btn", style: { fontSize: "11px", cursor: "pointer" },
        onclick: () => post("/autocloud/fetch", { key: a.key }) }, state.downloads.has(a.key) ? "…" : "fetch")))));
  }
}

function mount(element) {
  state.root = el("div", { class: "autocloud-panel", style: { padding: "10px", fontSize: "13px", overflowY: "auto",
    height: "100%", boxSizing: "border-box" } });
  element.replaceChildren(state.root);
  refresh();
  clearInterval(state.timer);
  state.timer = setInterval(() => { if (state.root && state.root.isConnected) refresh(); }, POLL_MS);
}

function floatingPanel() {
  const panel = el("div", { id: "autocloud-floating", style: { position: "fixed", right: "12px", bottom: "12px",
    width: "360px", maxHeight: "70vh", zIndex: 1000, background: "var(--comfy-menu-bg, #222)",
    color: "var(--fg-color, #ddd)", border: "1px solid #555", borderRadius: "6px", display: "none" } });
  document.body.append(panel);
  const toggle = el("button", { id: "autocloud-toggle", style: { position: "fixed", right: "12px", bottom: "12px",
    zIndex: 1001 }, onclick: () => {
    const open = panel.style.display === "none";
    panel.style.display = open ? "block" : "none";
    if (open) mount(panel);
  } }, "AutoCloud");
  document.body.append(toggle);
}

app.registerExtension({
  name: "autocloud.panel",
  async setup() {
    api.addEventListener("autocloud.progress", (event) => {
      const d = event.detail;
      if (!d || !d.key) return;
      if (d.finished) state.downloads.delete(d.key);
      else state.downloads.set(d.key, d);
      if (d.finished) refresh(); else render();
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
