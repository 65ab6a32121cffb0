// fedsock dashboard: one live feed (server-sent events) into one state, drawn at most once a frame.
"use strict";

const state = { run: {}, settings: {}, privacy: {}, limits: {}, clients: new Map(), rounds: new Map(), log: [],
                refused: [], listening: {} };
const $ = (id) => document.getElementById(id);
let charts = {};
let drawPending = false;
let formTouched = false;
let roundsVersion = 0, chartsVersion = -1;  // the charts are redrawn only when a round changed

// ---- the feed (the token travels in the HttpOnly cookie that the server's link set: no script sees it)
function connect() {
  const feed = new EventSource("/api/events");
  feed.addEventListener("snapshot", (e) => { replace(JSON.parse(e.data)); $("feed").classList.add("live"); });
  feed.onmessage = (e) => merge(JSON.parse(e.data));
  feed.onerror = () => { $("feed").classList.remove("live"); $("feed").title = "live feed lost; reconnecting"; refused(); };
  // EventSource reconnects by itself; each reconnection begins with a fresh snapshot.
}

// A refused feed is not retried: say why (a server started again has a new token, and a new link).
async function refused() {
  try {
    const response = await fetch("/api/state");
    if (response.status === 403) show((await response.json()).error, false);
  } catch (err) { /* the server is down: the feed retries */ }
}

function replace(snapshot) {
  state.clients = new Map(); state.rounds = new Map(); state.log = []; state.refused = [];
  Object.assign(state, { settings: snapshot.settings, limits: snapshot.limits, listening: snapshot.listening });
  merge(snapshot);
}

function merge(batch) {
  if (batch.run) state.run = batch.run;
  if (batch.settings) state.settings = batch.settings;
  if (batch.privacy) state.privacy = batch.privacy;
  for (const c of batch.clients || []) state.clients.set(c.id, c);
  for (const r of batch.rounds || []) state.rounds.set(r.round, r);
  if (batch.rounds) roundsVersion += 1;
  if (batch.log) state.log = state.log.concat(batch.log).slice(-200);
  if (batch.refused) state.refused = state.refused.concat(batch.refused).slice(-50);
  if (!drawPending) { drawPending = true; requestAnimationFrame(draw); }
}

// ---- drawing
function draw() {
  drawPending = false;
  const run = state.run, s = state.settings;
  document.title = `fedsock: ${run.phase || ""}`;
  $("title").textContent = `${s.model} on ${s.task === "dataset" ? s.dataset : "the clients' own data"}, ` +
    `${s.num_clients} clients, strategy ${s.strategy}` + (state.listening.address ? `, federation on ${state.listening.address}` : "");
  const phase = run.stopping && run.phase !== "finished" ? "stopping" : run.phase;
  $("phase").textContent = phase;
  $("phase").className = "badge " + (phase || "").replace(/ /g, "-");
  drawControls(run, s);
  drawSettings(s);
  drawPrivacy(state.privacy);
  if (chartsVersion !== roundsVersion && typeof uPlot !== "undefined") { chartsVersion = roundsVersion; drawCharts(); }
  drawClients();
  drawLog("log", state.log, (e) => [e.time, e.message, e.warning]);
  drawLog("refused", state.refused, (e) => [e.time, `${e.peer}: ${e.client_id != null ? "client " + e.client_id + ": " : ""}${e.reason}`, true]);
  $("refusal-count").textContent = run.refusals ? `(${run.refusals})` : "";
}

function drawControls(run, s) {
  const waiting = run.phase === "waiting for start", between = run.phase === "between sessions";
  const over = run.phase === "finished" || run.stopping;
  $("start").disabled = !waiting || run.ready < run.needed;
  $("start").title = waiting && run.ready < run.needed ? `${run.ready} client(s) ready, ${run.needed} needed` : "";
  $("stop").disabled = over;
  $("more").disabled = !between || over;
  $("more-box").hidden = !s.stay;
  const form = $("launch");
  for (const input of form.elements) {
    const limits = state.limits[input.name];
    if (limits) { input.min = limits[0]; input.max = limits[1]; }
    input.disabled = !waiting;
    if (!formTouched || !waiting) input.value = s[input.name];
  }
  const r = run.round || {};
  let text;
  if (run.phase === "training" && r.number) {
    text = `round ${r.number} of ${run.num_rounds}` + (r.attempt ? ` (retry ${r.attempt})` : "") +
      `: ${r.picked} of ${r.population} ready client(s) picked [${r.picked_ids}]`;
  } else if (run.phase === "training") {
    text = `training: ${run.rounds_done} of ${run.num_rounds} rounds done`;
  } else if (waiting || run.phase === "lobby") {
    text = `lobby: ${run.ready} of ${run.num_clients} client(s) ready (${run.connected} connected), ${run.needed} needed`;
  } else if (between) {
    text = `session ${run.session} done after round ${run.rounds_done}: ${run.ready} client(s) stay connected`;
  } else {
    text = run.message || `${run.rounds_done} rounds done`;
  }
  $("progress").textContent = text;
}

function drawSettings(s) {
  const table = $("settings");
  const rows = Object.entries(s).filter(([, v]) => v !== null && v !== false)
    .map(([k, v]) => `<tr><td>${esc(k.replace(/_/g, " "))}</td><td>${esc(String(v))}</td></tr>`).join("");
  if (table.dataset.html !== rows) { table.innerHTML = rows; table.dataset.html = rows; }
}

// The Privacy card: what protects the clients, in words; epsilon spent and planned; its warnings first.
function drawPrivacy(p) {
  if (p.dp === undefined) return;
  const rows = [];
  const row = (key, name, text, extra = "") => rows.push(
    `<tr data-key="${key}"><td>${esc(name)}</td><td>${esc(text)}${extra}</td></tr>`);
  if (p.dp) {
    row("dp", "differential privacy", "on, " + p.mode_text);
    row("noise", "clip, noise",
      `S = ${g(p.clip)}, z = ${g(p.noise_multiplier, 4)} (noise std z·S = ${g(p.clip * p.noise_multiplier)})`);
    row("relation", "neighbours", p.relation_text);
  } else {
    row("dp", "differential privacy", "off");
  }
  row("sampling", "sampling", p.sampling_text);
  if (p.dp) {
    const share = p.epsilon_planned ? Math.min(1, p.epsilon_spent / p.epsilon_planned) : 0;
    row("epsilon_spent", "ε spent", `${g(p.epsilon_spent)} after ${p.rounds_spent} of ${p.planned_rounds} rounds ` +
      `(${(100 * share).toFixed(0)}% of ε planned)`,
      `<span class="spent"><span style="width:${(100 * share).toFixed(1)}%"></span></span>`);
    row("epsilon_planned", "ε planned", p.budget != null
      ? `${g(p.epsilon_planned)}: the budget (--dp-epsilon); the run stops before a round would pass it`
      : `${g(p.epsilon_planned)}: what the ${p.planned_rounds} planned rounds spend`);
    row("delta", "δ", `${g(p.delta)} (the chance the guarantee may fail)`);
    row("accounting", "accounting", `${p.accounting}: ε ${p.accounting_text}`);
  }
  row("secure_aggregation", "secure aggregation", p.secure_aggregation ? "on, " + p.secure_text
    : "off: the server sees each client's update" + (p.dp && p.mode === "local" ? " (noised by its client)" : ""));
  if (p.compression) row("compression", "compression", p.compression);
  const html = rows.join("");
  const facts = $("privacy-facts");
  if (facts.dataset.html !== html) { facts.innerHTML = html; facts.dataset.html = html; }
  const warnings = p.warnings.map((w) => `<p class="warn ${w.level}">${esc(w.text)}</p>`).join("");
  if ($("privacy-warnings").dataset.html !== warnings) {
    $("privacy-warnings").innerHTML = warnings; $("privacy-warnings").dataset.html = warnings;
  }
  const badge = $("privacy-badge");
  badge.hidden = false;
  badge.className = "badge" + (p.warnings.some((w) => w.level === "danger") ? " none" : "");
  badge.textContent = p.dp
    ? `DP: ε ${g(p.epsilon_spent)} of ${g(p.epsilon_planned)}` + (p.secure_aggregation ? " · secure aggregation" : "")
    : p.secure_aggregation ? "secure aggregation, no DP" : "no privacy protection";
}

// Like Python's format(v, ".3g"): 0.532, 12.3, 1e-05 (null: a dash; an infinite epsilon came as null too).
function g(v, digits = 3) {
  if (v == null) return "—";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-4 || a >= 10 ** digits)) {
    const [m, e] = v.toExponential(digits - 1).split("e");
    const exp = Number(e);
    return `${Number(m)}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  return String(Number(v.toPrecision(digits)));
}

// As many decimals as the ticks' spacing needs (3.9885, 3.9890 rather than 3.989, 3.989).
function tickLabels(u, ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 1;
  const digits = step > 0 ? Math.min(Math.max(0, -Math.floor(Math.log10(step))), 8) : 0;
  return ticks.map((v) => v.toFixed(digits));
}

// A chart is made again when the series that have data change (F1 only for a task with a positive
// class, the clients' own evaluation only when they make one).
function chart(id, title, series, yLabel, xs, columns) {
  const el = $(id);
  if (typeof uPlot === "undefined") return;
  let shown = series.map((s, i) => i).filter((i) => columns[i].some((v) => v != null));
  if (!shown.length) shown = [0];
  const key = shown.join(",");
  let entry = charts[id];
  if (!entry || entry.key !== key) {
    if (entry) entry.plot.destroy();
    const opts = {
      title, width: Math.max(el.clientWidth, 300), height: 210, scales: { x: { time: false } },
      legend: { live: false },
      plugins: [marksPlugin(() => sessionMarks([...state.rounds.values()].sort((a, b) => a.round - b.round)))],
      axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000] },
             { label: yLabel, size: 60, values: tickLabels }],
      series: [{ label: "round" }, ...shown.map((i) => {
        const [label, stroke, dash] = series[i];
        return { label, stroke, width: 2, dash, spanGaps: true, points: { size: 5 } };
      })],
    };
    entry = charts[id] = { key, plot: new uPlot(opts, [[], ...shown.map(() => [])], el) };
  }
  entry.plot.setData([xs, ...shown.map((i) => columns[i])]);
}

function drawCharts() {
  const rounds = [...state.rounds.values()].sort((a, b) => a.round - b.round);
  const xs = rounds.map((r) => r.round);
  const col = (key, scale = 1) => rounds.map((r) => (r[key] == null ? null : r[key] * scale));
  chart("chart-accuracy", "accuracy (%)", [
    ["test accuracy", "#2463eb"], ["clients' test accuracy", "#8e24aa", [6, 3]],
    ["test F1 ×100", "#ef6c00"], ["clients' F1 ×100", "#f9a825", [6, 3]]], "%",
    xs, [col("test_accuracy", 100), col("fed_accuracy", 100), col("test_f1", 100), col("fed_f1", 100)]);
  chart("chart-loss", "loss", [["test loss", "#2463eb"], ["clients' test loss", "#8e24aa", [6, 3]],
    ["training loss", "#2e7d32"]], "cross-entropy", xs, [col("test_loss"), col("fed_loss"), col("train_loss")]);
  chart("chart-seconds", "seconds per round", [["whole round", "#2463eb"], ["slowest client's fit", "#ef6c00"]], "s",
    xs, [col("seconds"), col("max_fit_seconds")]);
  const staleness = col("staleness"), isAsync = staleness.some((v) => v != null);  // --async-buffer: a row per version
  $("chart-staleness").hidden = !isAsync;
  if (isAsync) chart("chart-staleness", "staleness of the updates in each version", [["largest", "#c62828"],
    ["mean", "#2463eb", [6, 3]]], "versions behind", xs, [staleness, col("mean_staleness")]);
  chart("chart-bytes", "megabytes per round", [["sent by the server", "#2463eb"], ["received", "#2e7d32"]], "MB",
    xs, [col("bytes_sent", 1e-6), col("bytes_received", 1e-6)]);
}

// The table lists the first ROWS_SHOWN clients by id (the counts above it cover all of them), and a
// big lobby's table is redrawn at most once a second: the browser shares the machine with the server.
const ROWS_SHOWN = 100;
const rowsById = new Map();
let clientsDrawn = 0;
function drawClients() {
  const body = document.querySelector("#clients tbody");
  const ids = [...state.clients.keys()].sort((a, b) => a - b);
  const now = performance.now();
  if (ids.length > ROWS_SHOWN && now - clientsDrawn < 1000) {
    if (!drawPending) { drawPending = true; setTimeout(() => requestAnimationFrame(draw), 1000 - (now - clientsDrawn)); }
    return;
  }
  clientsDrawn = now;
  let counts = {};
  for (const c of state.clients.values()) counts[c.state] = (counts[c.state] || 0) + 1;
  for (const id of ids.slice(0, ROWS_SHOWN)) {
    const c = state.clients.get(id);
    const cells = [c.id, c.peer, c.joined ? clock(c.joined) : "", `<span class="state ${c.state}">${stateText(c)}</span>`,
      c.round ?? "", num(c.loss, 4), c.accuracy == null ? "" : (100 * c.accuracy).toFixed(2) + "%",
      c.examples ?? "", num(c.fit_seconds, 1)];
    const html = cells.map((v, i) => (i === 3 ? `<td>${v}</td>` : `<td>${esc(String(v))}</td>`)).join("") +
      `<td class="policy"></td><td class="note">${esc(c.reason || "")}</td>`;
    const drawn = html + "\n" + c.policy_text;
    let tr = rowsById.get(id);
    if (!tr) { tr = document.createElement("tr"); tr.dataset.id = id; rowsById.set(id, tr); insertRow(body, tr, id); }
    if (tr.dataset.html !== drawn) {
      tr.innerHTML = html;
      tr.querySelector(".policy").textContent = c.policy_text;  // text, never markup
      tr.dataset.html = drawn;
    }
  }
  $("client-count").textContent = "(" + Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") + ")" +
    (ids.length > ROWS_SHOWN ? ` — the first ${ROWS_SHOWN} of ${ids.length} listed` : "");
}

function insertRow(body, tr, id) {
  for (const other of body.children) { if (Number(other.dataset.id) > id) { body.insertBefore(tr, other); return; } }
  body.appendChild(tr);
}

function stateText(c) {
  if (c.state === "training") return `training round ${c.round}`;
  if (c.state === "uploading") return `uploading round ${c.round}`;
  return c.state;
}

function drawLog(id, entries, fields) {
  const list = $(id);
  if (list.dataset.count === String(entries.length) && list.dataset.last === String(entries.length && entries[entries.length - 1].time)) return;
  list.innerHTML = entries.slice().reverse().map((e) => {
    const [time, text, warning] = fields(e);
    return `<li class="${warning ? "warning" : ""}"><time>${clock(time)}</time>${esc(text)}</li>`;
  }).join("");
  list.dataset.count = String(entries.length);
  list.dataset.last = String(entries.length && entries[entries.length - 1].time);
}

const esc = (s) => s.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
const num = (v, digits) => (v == null ? "" : Number(v).toFixed(digits));
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

// ---- actions
function show(text, ok) {
  $("answer").textContent = text;
  $("answer").className = ok ? "" : "error";
}

async function act(path, body) {
  const headers = { "Content-Type": "application/json", "X-Fedsock-Action": "1" };
  try {
    const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}), credentials: "same-origin" });
    const data = await response.json();
    show(data.message || data.error, response.ok);
  } catch (err) {
    show("the server did not answer: " + err, false);
  }
}

function launchSettings() {
  const body = {};
  for (const input of $("launch").elements) if (input.value !== "") body[input.name] = Number(input.value);
  return body;
}

document.addEventListener("DOMContentLoaded", () => {
  $("launch").addEventListener("input", () => { formTouched = true; });
  for (const form of document.forms) form.addEventListener("submit", (e) => e.preventDefault());
  $("start").addEventListener("click", () => act("/api/start", launchSettings()));
  $("stop").addEventListener("click", () => act("/api/stop"));
  $("more").addEventListener("click", () => act("/api/more", { rounds: Number($("more-rounds").value) }));
  connect();
});
