// fedsock runs view: the run folders side by side (GET /api/runs), and the ticked ones on one chart
// (GET /api/runs/<name>/metrics). The token travels in the HttpOnly cookie the printed link set.
"use strict";

const view = { listing: null, sort: { key: "modified", up: false }, selected: [], metrics: new Map(), charts: {} };
const $ = (id) => document.getElementById(id);
const COLORS = ["#2463eb", "#ef6c00", "#2e7d32", "#8e24aa", "#c62828", "#00838f", "#6d4c41", "#f9a825"];

const setting = (r, k) => r.settings[k];
const pct = (v) => (v == null ? "" : (100 * v).toFixed(2));
const esc = (s) => String(s).replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);

// [key, heading, the value it sorts by, the text shown, numeric]
const COLUMNS = [
  ["name", "run", (r) => r.name, (r) => r.name],
  ["modified", "last written", (r) => r.modified, (r) => when(r.modified)],
  ["model", "model", (r) => setting(r, "model"), (r) => setting(r, "model")],
  ["data", "data", dataText, dataText],
  ["strategy", "strategy", (r) => setting(r, "strategy"), (r) => setting(r, "strategy")],
  ["clients", "clients", (r) => setting(r, "num_clients"), (r) => setting(r, "num_clients") +
    (setting(r, "clients_per_round") ? ` (${setting(r, "clients_per_round")} a round)` : ""), true],
  ["privacy", "DP, secure agg.", privacyText, privacyText],
  ["compression", "compression", compressionText, compressionText],
  ["seed", "seed", (r) => setting(r, "seed"), (r) => setting(r, "seed") ?? "", true],
  ["rounds", "rounds", (r) => r.rounds_done, (r) => `${r.rounds_done} of ${r.num_rounds ?? "?"}`, true],
  ["status", "status", statusText, statusText],
  ["final_accuracy", "final acc. %", (r) => r.final_accuracy, (r) => pct(r.final_accuracy) + (r.scored_on === "fed" ? "*" : ""), true],
  ["best_accuracy", "best (round)", (r) => r.best_accuracy,
    (r) => (r.best_accuracy == null ? "" : `${pct(r.best_accuracy)} (${r.best_round})`), true],
  ["final_f1", "final F1", (r) => r.final_f1, (r) => (r.final_f1 == null ? "" : r.final_f1.toFixed(4)), true],
  ["final_loss", "final loss", (r) => r.final_loss, (r) => (r.final_loss == null ? "" : r.final_loss.toFixed(4)), true],
  ["seconds", "time", (r) => r.seconds, (r) => duration(r.seconds), true],
];

function dataText(r) {
  const s = r.settings;
  if (s.task && s.task !== "dataset") return `own data (${s.task})`;
  return `${s.dataset}, ${s.partition}` + (s.partition === "dirichlet" ? ` α ${s.alpha}` : "");
}
function privacyText(r) {
  return [dpText(r), setting(r, "secure_aggregation") ? "secure agg." : ""].filter(Boolean).join("; ");
}
function dpText(r) {
  const s = r.settings;
  if (s.dp_clip == null) return "";
  return `${s.dp_mode}, S ${s.dp_clip}` + (s.dp_noise_multiplier != null ? `, z ${s.dp_noise_multiplier}` : "") +
    (s.dp_epsilon != null ? `, ε ≤ ${s.dp_epsilon}` : "");
}
function compressionText(r) {
  const s = r.settings, parts = [];
  if (s.compression && s.compression !== "none") parts.push(`updates ${s.compression}`);
  if (s.compress_broadcast && s.compress_broadcast !== "none") parts.push(`broadcast ${s.compress_broadcast}`);
  return parts.join(", ");
}
function statusText(r) {
  if (view.listing.live && r.name === view.listing.current && !r.completed) return "live";
  return r.completed ? "completed" : "stopped";
}
function when(t) {  // 2026-12-06 06:09, local time
  const d = new Date(t * 1000), two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ${two(d.getHours())}:${two(d.getMinutes())}`;
}
function duration(s) {
  if (s == null) return "";
  return s < 120 ? `${s.toFixed(1)} s` : s < 7200 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`;
}

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function say(text, ok) { $("answer").textContent = text; $("answer").className = ok ? "" : "error"; }

async function load() {
  try {
    view.listing = await getJSON("/api/runs");
  } catch (err) {
    say(String(err.message || err), false);
    return;
  }
  say("", true);
  const l = view.listing;
  $("title").textContent = `runs in ${l.folder}/`;
  $("live-link").hidden = !l.live;
  const names = new Set(l.runs.map((r) => r.name));
  view.selected = view.selected.filter((n) => names.has(n));
  $("run-count").textContent = `(${l.runs.length}` + (l.not_listed ? `; the newest ${l.max_runs} listed` : "") + ")";
  $("skipped-box").hidden = !l.skipped.length;
  $("skipped-count").textContent = `(${l.skipped.length})`;
  $("skipped").innerHTML = l.skipped.map((s) => `<li><b>${esc(s.name)}</b>: ${esc(s.reason)}</li>`).join("");
  drawTable();
  compare();
}

function drawTable() {
  const { key, up } = view.sort;
  const [, , sortValue] = COLUMNS.find((c) => c[0] === key);
  const runs = view.listing.runs.slice().sort((a, b) => {
    const x = sortValue(a), y = sortValue(b);
    if (x == null || x === "") return 1;  // a run without the number goes last, either way
    if (y == null || y === "") return -1;
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1);
  });
  $("runs").querySelector("thead tr").innerHTML = "<th>compare</th>" + COLUMNS.map(([k, heading]) =>
    `<th data-key="${k}" class="${k === key ? "sorted" + (up ? " up" : "") : ""}">${esc(heading)}</th>`).join("");
  $("runs").querySelector("tbody").innerHTML = runs.map((r) => {
    const i = view.selected.indexOf(r.name);
    const swatch = i >= 0 ? `<span class="swatch" style="background:${COLORS[i % COLORS.length]}"></span>` : "";
    const current = r.name === view.listing.current ? "current" : "";
    return `<tr data-name="${esc(r.name)}" class="${current}"><td><input type="checkbox" aria-label="compare ${esc(r.name)}"` +
      `${i >= 0 ? " checked" : ""}>${swatch}</td>` +
      COLUMNS.map(([k, , , text, numeric]) => {
        const cls = [numeric ? "num" : "", k === "status" ? `status ${statusText(r)}` : ""].join(" ").trim();
        return `<td data-key="${k}"${cls ? ` class="${cls}"` : ""}>${esc(text(r) ?? "")}</td>`;
      }).join("") + "</tr>";
  }).join("");
}

// The ticked runs, in the order ticked: their metrics (fetched once each), then one series per run.
async function compare() {
  const names = view.selected.slice();
  try {
    for (const name of names) {
      if (!view.metrics.has(name)) view.metrics.set(name, await getJSON(`/api/runs/${encodeURIComponent(name)}/metrics`));
    }
  } catch (err) {
    say(String(err.message || err), false);
    return;
  }
  if (names.join("\n") !== view.selected.join("\n")) return;  // ticked again meanwhile: that call draws
  $("compare-note").textContent = names.length ? `${names.length} run(s)` + (names.length < 2 ? ": tick another" : "")
    : "tick runs above";
  const runs = names.map((n) => view.listing.runs.find((r) => r.name === n));
  const rounds = [...new Set(names.flatMap((n) => view.metrics.get(n).rows.map((r) => r.round)))].sort((a, b) => a - b);
  const column = (name, key, scale) => {
    const byRound = new Map(view.metrics.get(name).rows.map((r) => [r.round, r[key] == null ? null : r[key] * scale]));
    return rounds.map((x) => (byRound.has(x) ? byRound.get(x) : null));
  };
  const scored = (i) => runs[i].scored_on || "test";
  plot("accuracy", "accuracy (%) per round", "%", rounds, names.map((n, i) => column(n, `${scored(i)}_accuracy`, 100)));
  plot("loss", "loss per round", "cross-entropy", rounds, names.map((n, i) => column(n, `${scored(i)}_loss`, 1)));
}

function plot(which, title, yLabel, xs, columns) {
  const el = $(`compare-${which}`);
  const names = view.selected.slice();
  if (view.charts[which]) { view.charts[which].destroy(); delete view.charts[which]; }
  if (!names.length || typeof uPlot === "undefined") return;
  const marks = () => names.flatMap((n, i) => sessionMarks(view.metrics.get(n).rows)
    .map((m) => ({ ...m, color: COLORS[i % COLORS.length], label: `${n}: ${m.label}` })));
  const opts = {
    title, width: Math.max(el.clientWidth, 300), height: 260, scales: { x: { time: false } },
    legend: { live: false }, plugins: [marksPlugin(marks)],
    axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] },
           { label: yLabel, size: 60 }],
    series: [{ label: "round" }, ...names.map((n, i) => ({ label: n, stroke: COLORS[i % COLORS.length], width: 2,
      spanGaps: true, points: { size: 5 } }))],
  };
  view.charts[which] = new uPlot(opts, [xs, ...columns], el);
}

document.addEventListener("DOMContentLoaded", () => {
  $("runs").addEventListener("click", (e) => {
    const th = e.target.closest("th[data-key]");
    if (!th) return;
    const key = th.dataset.key;
    view.sort = { key, up: view.sort.key === key ? !view.sort.up : key === "name" };
    drawTable();
  });
  $("runs").addEventListener("change", (e) => {
    const tr = e.target.closest("tr[data-name]");
    if (!tr) return;
    const name = tr.dataset.name;
    view.selected = e.target.checked ? [...view.selected.filter((n) => n !== name), name]
      : view.selected.filter((n) => n !== name);
    drawTable();
    compare();
  });
  $("reload").addEventListener("click", () => { view.metrics.clear(); load(); });
  load();
});
