// qstore console: a hand-written single-page app (no framework, no build step).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const state = { user: null, csrf: "", sae: "", timer: null, pages: [""], next: null, tables: [] };

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["X-CSRF-Token"] = cookie("qs_csrf") || state.csrf;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, { method, headers, credentials: "same-origin",
                                   body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await resp.json(); } catch (e) { data = null; }
  if (resp.status === 401 && path !== "/api/login") { showLogin(); }
  if (!resp.ok) throw new Error((data && data.error) || resp.statusText);
  return data;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function human(n) {
  if (n === null || n === undefined) return "–";
  const units = ["", "Ki", "Mi", "Gi", "Ti"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
}

function bits(n) { return n === null || n === undefined ? "–" : human(n) + "b"; }
function rate(bps) { return bps === null || bps === undefined ? "unlimited" : human(bps) + "b/s"; }

function fmt(v) {
  if (v === null || v === undefined) return "suppressed";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(8).replace(/\.?0+$/, "");
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => k + " = " + fmt(x)).join(", ");
  return String(v);
}

// -- routing ---------------------------------------------------------------------------

const PAGES = ["network", "nodes", "objects", "stats", "planner"];

function showLogin() {
  state.user = null;
  clearInterval(state.timer);
  for (const p of document.querySelectorAll(".page")) p.hidden = true;
  $("nav").hidden = true; $("logout").hidden = true; $("who").textContent = "";
  $("page-login").hidden = false;
}

async function route() {
  if (!state.user) {
    try {
      const me = await api("GET", "/api/me");
      state.user = me.user; state.csrf = me.csrf; state.sae = me.sae;
    } catch (e) { showLogin(); return; }
  }
  $("nav").hidden = false; $("logout").hidden = false; $("who").textContent = state.user;
  let page = (location.hash || "").replace(/^#\/?/, "");
  if (!PAGES.includes(page)) page = "network";
  for (const p of document.querySelectorAll(".page")) p.hidden = p.id !== "page-" + page;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.hash === "#/" + page);
  clearInterval(state.timer);
  const load = { network: loadNetwork, nodes: loadNodes, objects: loadObjectsPage, stats: loadStats,
                 planner: loadPlanner }[page];
  await load();
  if (page === "network" || page === "nodes") state.timer = setInterval(load, 3000);
}

// -- login -----------------------------------------------------------------------------

async function login(ev) {
  ev.preventDefault();
  $("login-error").textContent = "";
  try {
    const r = await api("POST", "/api/login", { access_key: $("access-key").value.trim(),
                                               secret_key: $("secret-key").value });
    state.user = r.user; state.csrf = r.csrf;
    $("secret-key").value = "";
    const me = await api("GET", "/api/me");
    state.sae = me.sae;
    if (!location.hash || location.hash === "#/login") location.hash = "#/network"; else await route();
  } catch (e) { $("login-error").textContent = e.message; }
}

async function logout() {
  try { await api("POST", "/api/logout"); } catch (e) { /* gone already */ }
  showLogin();
}

// -- network ---------------------------------------------------------------------------

async function loadNetwork() {
  let net;
  try { net = await api("GET", "/api/network"); } catch (e) { return; }
  $("net-name").textContent = `${net.name}: k = ${net.k} of n = ${net.n}`;
  const map = $("net-map");
  map.replaceChildren();
  const W = 800, H = 520, cx = W / 2, cy = H / 2, R = Math.min(W, H) / 2 - 70;
  const pos = {};
  net.sites.forEach((s, i) => {
    const a = -Math.PI / 2 + 2 * Math.PI * i / net.sites.length;
    pos[s.name] = [cx + R * Math.cos(a), cy + R * Math.sin(a)];
  });
  const tbody = $("net-links").tBodies[0];
  tbody.replaceChildren();
  for (const lk of net.links) {
    const [x1, y1] = pos[lk.a], [x2, y2] = pos[lk.b];
    const ab = lk[lk.a + "->" + lk.b], ba = lk[lk.b + "->" + lk.a];
    const avail = Math.min(ab ? ab.available_bits || 0 : 0, ba ? ba.available_bits || 0 : 0);
    const frac = lk.capacity_bits ? Math.max(0, Math.min(1, avail / lk.capacity_bits)) : (ab ? 1 : 0);
    const hue = Math.round(120 * frac);
    map.append(svg("line", { x1, y1, x2, y2, stroke: `hsl(${hue},70%,45%)`, "stroke-width": 2 + 6 * frac,
                             "stroke-opacity": 0.8, class: "link", "data-link": lk.a + "-" + lk.b }));
    map.append(svg("text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle" },
                   `${bits(ab && ab.available_bits)} / ${bits(ba && ba.available_bits)}`));
    tbody.append(el("tr", {}, el("td", {}, lk.a + " – " + lk.b), el("td", {}, rate(lk.rate_bps)),
      el("td", { class: "num" }, bits(ab && ab.available_bits)), el("td", { class: "num" }, bits(ba && ba.available_bits)),
      el("td", { class: "num" }, bits(ab && ab.delivered_bits)), el("td", { class: "num" }, bits(ba && ba.delivered_bits))));
  }
  for (const s of net.sites) {
    const [x, y] = pos[s.name];
    const down = s.processes.some((p) => p.health !== "ok");
    const c = svg("circle", { cx: x, cy: y, r: 18, class: "site" + (down ? " down" : ""), "data-site": s.name });
    c.append(svg("title", {}, s.processes.map((p) => `${p.id}: ${p.health}`).join("\n")));
    map.append(c);
    map.append(svg("text", { x, y: y + 34, "text-anchor": "middle" }, s.name));
  }
}

// -- nodes -----------------------------------------------------------------------------

async function loadNodes() {
  let r;
  try { r = await api("GET", "/api/nodes"); } catch (e) { return; }
  const tbody = $("nodes-table").tBodies[0];
  tbody.replaceChildren();
  for (const p of r.processes) {
    const f = p.figures || {};
    const ok = p.health === "ok";
    tbody.append(el("tr", {}, el("td", {}, p.id), el("td", {}, p.kind), el("td", {}, p.site),
      el("td", { class: ok ? "health-ok" : "health-bad" }, ok ? "ok" : String(p.health || "unreachable")),
      el("td", { class: "num" }, f.requests ?? "–"), el("td", { class: "num" }, f.errors ?? "–"),
      el("td", { class: "num" }, f.objects ?? "–"), el("td", { class: "num" }, f.stored_bytes === undefined ? "–" : human(f.stored_bytes) + "B"),
      el("td", { class: "num" }, f.mpc_queries ?? "–")));
  }
}

// -- objects ---------------------------------------------------------------------------

async function loadObjectsPage() {
  const sel = $("bucket");
  const current = sel.value;
  try {
    const r = await api("GET", "/api/buckets");
    sel.replaceChildren(...r.buckets.map((b) => el("option", { value: b }, b)));
    if (r.buckets.includes(current)) sel.value = current;
  } catch (e) { $("objects-error").textContent = e.message; return; }
  state.pages = [""];
  await listObjects();
}

async function listObjects() {
  $("objects-error").textContent = "";
  const tbody = $("objects-table").tBodies[0];
  const bucket = $("bucket").value;
  if (!bucket) { tbody.replaceChildren(); $("page-info").textContent = "no bucket"; return; }
  const after = state.pages[state.pages.length - 1];
  const q = new URLSearchParams({ bucket, prefix: $("prefix").value, after, limit: "100" });
  let r;
  try { r = await api("GET", "/api/objects?" + q); } catch (e) { $("objects-error").textContent = e.message; return; }
  state.next = r.next;
  tbody.replaceChildren(...r.objects.map((o) => {
    const q2 = new URLSearchParams({ bucket, key: o.key });
    return el("tr", { "data-key": o.key }, el("td", {}, el("a", { href: "/api/object?" + q2, download: o.key.split("/").pop(), class: "download" }, o.key)),
      el("td", { class: "num" }, human(o.size) + "B"), el("td", {}, new Date(o.committed_at * 1000).toLocaleString()),
      el("td", {}, o.holders.join(", ")),
      el("td", {}, el("button", { class: "delete", onclick: () => deleteObject(bucket, o.key) }, "Delete")));
  }));
  const n = state.pages.length;
  $("page-info").textContent = `page ${n}` + (r.objects.length ? ` (${r.objects[0].key} … ${r.objects[r.objects.length - 1].key})` : " (empty)");
  $("prev-page").disabled = n <= 1;
  $("next-page").disabled = !r.next;
}

async function deleteObject(bucket, key) {
  if (!confirm(`Delete ${key}?`)) return;
  try { await api("DELETE", "/api/object?" + new URLSearchParams({ bucket, key })); await listObjects(); }
  catch (e) { $("objects-error").textContent = e.message; }
}

async function createBucket() {
  const name = $("new-bucket").value.trim();
  if (!name) return;
  try {
    await api("POST", "/api/buckets", { name });
    $("new-bucket").value = "";
    await loadObjectsPage();
    $("bucket").value = name;
    state.pages = [""];
    await listObjects();
  } catch (e) { $("objects-error").textContent = e.message; }
}

function upload() {
  const file = $("upload-file").files[0];
  const bucket = $("bucket").value;
  if (!file || !bucket) { $("objects-error").textContent = "pick a bucket and a file"; return; }
  const key = $("upload-key").value.trim() || file.name;
  const xhr = new XMLHttpRequest();
  xhr.open("PUT", "/api/object?" + new URLSearchParams({ bucket, key }));
  xhr.setRequestHeader("X-CSRF-Token", cookie("qs_csrf") || state.csrf);
  xhr.setRequestHeader("Content-Type", "application/octet-stream");
  $("upload-progress").value = 0;
  $("upload-status").textContent = "uploading…";
  xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) $("upload-progress").value = 100 * ev.loaded / ev.total; };
  xhr.onload = async () => {
    if (xhr.status === 200) {
      $("upload-progress").value = 100;
      $("upload-status").textContent = `stored ${key}`;
      state.pages = [""];
      await listObjects();
    } else {
      let msg = xhr.statusText;
      try { msg = JSON.parse(xhr.responseText).error; } catch (e) { /* keep */ }
      $("upload-status").textContent = "";
      $("objects-error").textContent = msg;
    }
  };
  xhr.onerror = () => { $("objects-error").textContent = "upload failed"; };
  xhr.send(file);
}

// -- statistics ------------------------------------------------------------------------

const OPS = { count: 0, sum: 1, mean: 1, var: 1, std: 1, min: 1, max: 1, median: 1, quantile: 1, histogram: 1,
              crosstab: 2, cov: 2, corr: 2, linreg: -1, ttest: 1, chi2: 2 };

async function loadStats() {
  $("stats-sae").textContent = state.sae;
  const ops = $("stats-op");
  if (!ops.options.length) ops.replaceChildren(...Object.keys(OPS).map((o) => el("option", { value: o }, o)));
  try {
    const r = await api("GET", "/api/tables");
    state.tables = r.tables;
    const sel = $("stats-table"), cur = sel.value;
    sel.replaceChildren(...r.tables.map((t) => el("option", { value: t.name }, `${t.name} (${t.rows} rows, ${t.owner})`)));
    if (cur && r.tables.some((t) => t.name === cur)) sel.value = cur;
    showColumns();
  } catch (e) { $("stats-error").textContent = e.message; }
}

function showColumns() {
  const t = state.tables.find((x) => x.name === $("stats-table").value);
  const cols = t && t.schema ? t.schema.columns : [];
  const box = (c, cls) => el("label", {}, el("input", { type: "checkbox", value: c.name, class: cls }), " " + c.name + " (" + c.type + ")");
  $("stats-columns").replaceChildren(...cols.map((c) => box(c, "col")));
  $("stats-groupby").replaceChildren(...cols.filter((c) => c.type === "categorical" || c.type === "boolean").map((c) => box(c, "grp")));
}

async function runQuery() {
  $("stats-error").textContent = "";
  $("stats-status").textContent = "running…";
  const checked = (cls) => [...document.querySelectorAll(`input.${cls}:checked`)].map((i) => i.value);
  const body = { table: $("stats-table").value, op: $("stats-op").value, columns: checked("col"),
                 group_by: checked("grp"), where: $("stats-where").value.trim() || null,
                 q: $("stats-q").value.trim() || null, bins: $("stats-bins").value.trim() || null };
  let r;
  try { r = await api("POST", "/api/query", body); }
  catch (e) { $("stats-error").textContent = e.message; $("stats-status").textContent = ""; return; }
  $("stats-status").textContent = `done in ${r.report.seconds.toFixed(2)} s on ${r.report.nodes.join(", ")}; `
    + `${human(r.report.key_spent_bytes)}B of QKD key`;
  const label = (x) => x.group ? Object.entries(x.group).map(([k, v]) => `${k}=${v}`).join(", ") : "(all)";
  $("stats-result").tBodies[0].replaceChildren(...r.results.map((x) => el("tr", { class: x.suppressed ? "suppressed" : "" },
    el("td", {}, label(x)), el("td", {}, x.column || ""),
    el("td", { class: "num value" + (x.suppressed ? " suppressed" : ""), "data-value": JSON.stringify(x.value) }, x.suppressed ? "suppressed" : fmt(x.value)),
    el("td", { class: "num" }, x.rows ?? "–"))));
  drawBars(r.results.map((x) => ({ label: label(x), value: typeof x.value === "number" ? x.value : null,
                                   suppressed: x.suppressed })));
}

function drawBars(items) {
  const chart = $("stats-chart");
  chart.replaceChildren();
  const shown = items.filter((i) => i.value !== null || i.suppressed);
  if (!shown.length) return;
  const W = 800, H = 300, L = 70, B = 40, T = 15;
  const max = Math.max(0, ...shown.map((i) => i.value || 0)), min = Math.min(0, ...shown.map((i) => i.value || 0));
  const span = max - min || 1;
  const y = (v) => T + (H - T - B) * (max - v) / span;
  const bw = (W - L - 10) / shown.length;
  chart.append(svg("line", { x1: L, y1: y(0), x2: W - 10, y2: y(0), class: "axis" }));
  chart.append(svg("text", { x: L - 6, y: y(max) + 4, "text-anchor": "end" }, fmt(max)));
  if (min < 0) chart.append(svg("text", { x: L - 6, y: y(min) + 4, "text-anchor": "end" }, fmt(min)));
  shown.forEach((it, i) => {
    const x = L + i * bw + bw * 0.1;
    if (it.suppressed) {
      chart.append(svg("rect", { x, y: T, width: bw * 0.8, height: H - T - B, class: "bar suppressed", opacity: 0.35 }));
      chart.append(svg("text", { x: x + bw * 0.4, y: H / 2, "text-anchor": "middle" }, "suppressed"));
    } else {
      const top = Math.min(y(it.value), y(0)), h = Math.abs(y(it.value) - y(0));
      const r = svg("rect", { x, y: top, width: bw * 0.8, height: Math.max(h, 1), class: "bar" });
      r.append(svg("title", {}, `${it.label}: ${fmt(it.value)}`));
      chart.append(r);
    }
    chart.append(svg("text", { x: x + bw * 0.4, y: H - B + 16, "text-anchor": "middle" }, it.label.slice(0, 24)));
  });
}

// -- key-rate planner ------------------------------------------------------------------

async function loadPlanner() {
  if (!$("plan-protocol").options.length) {
    const o = await api("GET", "/api/planner/options");
    $("plan-protocol").replaceChildren(...o.protocols.map((p) => el("option", { value: p }, p)));
    $("plan-preset").replaceChildren(...o.presets.map((p) => el("option", { value: p }, p)));
    $("plan-protocol").value = o.default_protocol;
    $("plan-preset").value = o.default_preset;
  }
  await plot();
}

async function plot() {
  $("plan-error").textContent = "";
  const q = new URLSearchParams({ protocol: $("plan-protocol").value, preset: $("plan-preset").value,
    start: $("plan-start").value, stop: $("plan-stop").value, step: $("plan-step").value, mu: $("plan-mu").value });
  let r;
  try { r = await api("GET", "/api/planner?" + q); } catch (e) { $("plan-error").textContent = e.message; return; }
  const chart = $("plan-chart");
  chart.replaceChildren();
  const W = 800, H = 400, L = 70, B = 40, T = 15, Rm = 15;
  const pts = r.rows.filter((p) => p.rate_bps > 0);
  const vals = r.rows.flatMap((p) => [p.rate_bps, p.plob_bps]).filter((v) => v !== null && v > 0 && isFinite(v));
  if (!vals.length) { $("plan-summary").textContent = "no key at these distances"; return; }
  const lo = Math.floor(Math.log10(Math.min(...vals))), hi = Math.ceil(Math.log10(Math.max(...vals)));
  const d0 = r.rows[0].distance_km, d1 = r.rows[r.rows.length - 1].distance_km || 1;
  const x = (d) => L + (W - L - Rm) * (d - d0) / ((d1 - d0) || 1);
  const y = (v) => T + (H - T - B) * (hi - Math.log10(v)) / ((hi - lo) || 1);
  for (let e = lo; e <= hi; e++) {
    chart.append(svg("line", { x1: L, x2: W - Rm, y1: y(10 ** e), y2: y(10 ** e), class: "gridline" }));
    chart.append(svg("text", { x: L - 6, y: y(10 ** e) + 4, "text-anchor": "end" }, `1e${e}`));
  }
  for (let i = 0; i <= 5; i++) {
    const d = d0 + (d1 - d0) * i / 5;
    chart.append(svg("text", { x: x(d), y: H - B + 18, "text-anchor": "middle" }, d.toFixed(0) + " km"));
  }
  chart.append(svg("line", { x1: L, y1: H - B, x2: W - Rm, y2: H - B, class: "axis" }));
  chart.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  const path = (rows, key) => rows.filter((p) => p[key] > 0 && isFinite(p[key]))
    .map((p, i) => `${i ? "L" : "M"}${x(p.distance_km).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ");
  chart.append(svg("path", { d: path(r.rows, "plob_bps"), class: "curve plob" }));
  chart.append(svg("path", { d: path(r.rows, "rate_bps"), class: "curve rate" }));
  chart.append(svg("text", { x: W - Rm - 4, y: T + 14, "text-anchor": "end" }, `${r.protocol} (solid), PLOB bound (dashed); bits/s`));
  const last = pts.length ? pts[pts.length - 1] : null;
  $("plan-summary").textContent = last ? `${r.protocol} on ${r.preset} (${(r.repetition_rate_hz / 1e6).toFixed(0)} MHz): `
    + `${rate(pts[0].rate_bps)} at ${pts[0].distance_km} km, ${rate(last.rate_bps)} at ${last.distance_km} km` : "no key";
}

// -- wiring ----------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("bucket").addEventListener("change", () => { state.pages = [""]; listObjects(); });
  $("refresh-objects").addEventListener("click", () => { state.pages = [""]; listObjects(); });
  $("create-bucket").addEventListener("click", createBucket);
  $("next-page").addEventListener("click", () => { if (state.next) { state.pages.push(state.next); listObjects(); } });
  $("prev-page").addEventListener("click", () => { if (state.pages.length > 1) { state.pages.pop(); listObjects(); } });
  $("upload-button").addEventListener("click", upload);
  $("stats-table").addEventListener("change", showColumns);
  $("stats-run").addEventListener("click", runQuery);
  $("plan-run").addEventListener("click", plot);
  window.addEventListener("hashchange", route);
  route();
});
