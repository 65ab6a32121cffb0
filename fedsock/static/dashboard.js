// fedsock dashboard: one live feed (server-sent events) into one state, drawn at most once a frame.
"use strict";

const state = { run: {}, settings: {}, privacy: {}, limits: {}, clients: new Map(), rounds: new Map(), log: [],
                refused: [], listening: {}, progress: new Map(), evaluation: {}, model_card: null };
const LOG_KEPT = 500;
let clockOffset = 0;  // the server's clock minus this page's, in seconds (times come from the server)
const $ = (id) => document.getElementById(id);
let charts = {};
let drawPending = false;
let formTouched = false;
let roundsVersion = 0, chartsVersion = -1;  // the charts are redrawn only when a round changed
let progressVersion = 0;

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
  state.clients = new Map(); state.rounds = new Map(); state.log = []; state.refused = []; state.progress = new Map();
  Object.assign(state, { settings: snapshot.settings, limits: snapshot.limits, listening: snapshot.listening,
                         model_card: snapshot.model_card || null });
  if (snapshot.server_time) clockOffset = snapshot.server_time - Date.now() / 1000;
  rowsById.clear(); document.querySelector("#clients tbody").textContent = "";
  merge(snapshot);
}

function merge(batch) {
  if (batch.run) state.run = batch.run;
  if (batch.settings) state.settings = batch.settings;
  if (batch.privacy) state.privacy = batch.privacy;
  for (const c of batch.clients || []) state.clients.set(c.id, c);
  for (const r of batch.rounds || []) state.rounds.set(r.round, r);
  if (batch.rounds) roundsVersion += 1;
  if (batch.log) state.log = state.log.concat(batch.log).slice(-LOG_KEPT);
  for (const [id, p] of Object.entries(batch.progress || {})) {
    if (p == null) state.progress.delete(Number(id)); else state.progress.set(Number(id), p);
  }
  if (batch.progress) progressVersion += 1;
  if (batch.evaluation) state.evaluation = batch.evaluation;
  if (batch.model_card) state.model_card = batch.model_card;
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
  drawHeadline();
  if (chartsVersion !== roundsVersion && typeof uPlot !== "undefined") { chartsVersion = roundsVersion; drawCharts(); }
  drawEmptyCharts();
  drawEvaluation(state.evaluation);
  drawModelCard(state.model_card);
  drawClients();
  drawClientView();
  const lines = filteredLog();
  drawLog("log", lines, (e) => [e.time, e.message, e.warning]);
  $("log-count").textContent = lines.length === state.log.length ? `(${lines.length} lines)`
    : `(${lines.length} of ${state.log.length} lines)`;
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
function chart(id, title, series, yLabel, xs, columns, fromZero = false) {
  const el = $(id);
  if (typeof uPlot === "undefined") return;
  let shown = series.map((s, i) => i).filter((i) => columns[i].some((v) => v != null));
  if (!shown.length) shown = [0];
  const key = shown.join(",");
  let entry = charts[id];
  if (!entry || entry.key !== key) {
    if (entry) entry.plot.destroy();
    const opts = {
      title, width: Math.max(el.clientWidth, 300), height: 210,
      // from zero where the size matters (2.3930 and 2.3932 MB are the same traffic, not a swing)
      scales: { x: { time: false }, ...(fromZero ? { y: { range: (u, lo, hi) => [0, hi > 0 ? hi * 1.1 : 1] } } : {}) },
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
    xs, [col("seconds"), col("max_fit_seconds")], true);
  const staleness = col("staleness"), isAsync = staleness.some((v) => v != null);  // --async-buffer: a row per version
  $("chart-staleness").hidden = !isAsync;
  if (isAsync) chart("chart-staleness", "staleness of the updates in each version", [["largest", "#c62828"],
    ["mean", "#2463eb", [6, 3]]], "versions behind", xs, [staleness, col("mean_staleness")], true);
  chart("chart-bytes", "megabytes per round", [["sent by the server", "#2463eb"], ["received", "#2e7d32"]], "MB",
    xs, [col("bytes_sent", 1e-6), col("bytes_received", 1e-6)], true);
}

// Before the first round: say what is coming instead of empty boxes.
function drawEmptyCharts() {
  const run = state.run, none = state.rounds.size === 0;
  let text = "";
  if (none) {
    if (run.phase === "training" && run.round && run.round.number) {
      text = `Round ${run.round.number} is under way: each chart gets its first point when the round's model is made.`;
    } else if (run.phase === "training") {
      text = "Training has started: the charts fill in as rounds finish.";
    } else if (run.phase === "finished") {
      text = "No round finished in this run.";
    } else {
      const when = run.phase === "waiting for start" && run.ready >= run.needed
        ? `${run.ready} client(s) ready; training starts when you press Start training`
        : `training starts when ${run.needed ?? "enough"} client(s) are ready (${run.ready ?? 0} now)`;
      text = `No round yet: ${when}. Then accuracy, loss, time and traffic are drawn here, round by round.`;
    }
  }
  for (const card of document.querySelectorAll(".charts")) {
    const p = card.querySelector(".empty");
    if (p.textContent !== text) p.textContent = text;
    p.hidden = !none;
    for (const div of card.querySelectorAll("div[id^=chart-]")) {
      if (div.id !== "chart-staleness") div.hidden = none;  // shown by drawCharts, for --async-buffer runs only
    }
  }
}

// ---- the headline: the model's quality, the round, the time, epsilon; and the round in progress
function quality() {
  const f1 = state.run.positive != null;
  const pick = (r) => f1 ? (r.test_f1 ?? r.fed_f1) : (r.test_accuracy ?? r.fed_accuracy);
  let current = null, best = null;
  for (const r of [...state.rounds.values()].sort((a, b) => a.round - b.round)) {
    const v = pick(r);
    if (v == null) continue;
    current = { round: r.round, value: v };
    if (!best || v > best.value) best = { round: r.round, value: v };
  }
  return { label: f1 ? `F1 of ${state.run.positive}` : "accuracy", current, best, f1 };
}

function duration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "—";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  return h ? `${h} h ${String(m).padStart(2, "0")} min` : m ? `${m} min ${String(s).padStart(2, "0")} s` : `${s} s`;
}

function drawHeadline() {
  const run = state.run, q = quality(), now = Date.now() / 1000 + clockOffset;
  const shown = (v) => (q.f1 ? g(v.value) : (100 * v.value).toFixed(2) + "%");
  const unit = state.settings.async_buffer ? "version" : "round";  // --async-buffer: a row per model version
  setText("hl-round-label", unit);
  setText("hl-metric-label", q.label + (q.current ? `, ${unit} ${q.current.round}'s model` : ""));
  setText("hl-current", q.current ? shown(q.current) : "—");
  setText("hl-best", q.best ? `best ${shown(q.best)} (${unit} ${q.best.round})`
    : run.evaluating ? "evaluating…" : "shown after the first round");
  const r = run.round || {};
  const number = run.phase === "training" && r.number ? r.number : run.rounds_done;
  setText("hl-round", number ? `${number} of ${run.num_rounds}` : `0 of ${run.num_rounds ?? "—"}`);
  let sub = run.phase === "training" && r.number ? "in progress" + (r.attempt ? ` (retry ${r.attempt})` : "")
    : run.phase || "";
  if (run.evaluating) sub += ` · evaluating round ${run.evaluating}'s model`;
  setText("hl-round-sub", sub);
  const end = run.finished_at || now;
  setText("hl-elapsed", run.started_at ? duration(end - run.started_at) : "—");
  const times = [...state.rounds.values()].map((x) => x.seconds).filter((x) => x != null);
  let left = "";
  if (run.phase === "training" && times.length) {
    const mean = times.reduce((a, b) => a + b, 0) / times.length;
    const inRound = r.started ? Math.min(now - r.started, mean) : 0;
    left = `about ${duration(mean * Math.max(run.num_rounds - run.rounds_done, 0) - inRound)} left`;
  } else if (run.phase === "training") {
    left = "time left: after the first round";
  } else if (!run.started_at) {
    left = "training has not started";
  }
  setText("hl-left", left);
  const p = state.privacy;
  $("hl-epsilon-box").hidden = !p.dp;
  if (p.dp) {
    setText("hl-epsilon", g(p.epsilon_spent));
    setText("hl-epsilon-sub", `of ${g(p.epsilon_planned)} planned (δ ${g(p.delta)})`);
  }
  drawRoundProgress(run, r);
}

function drawRoundProgress(run, r) {
  const box = $("round-progress");
  box.hidden = !(run.phase === "training" && r.number);
  if (box.hidden) return;
  let share = r.picked ? r.picked - run.waiting_for : 0, uploading = 0;
  for (const [id, p] of state.progress) {
    share += p[1] == null ? p[0] : 1;
    if (p[1] != null) uploading += 1;
  }
  const pct = r.picked ? Math.min(100, (100 * share) / r.picked) : 0;
  $("hl-bar").style.width = pct.toFixed(1) + "%";
  setText("hl-waiting", `round ${r.number}: ${pct.toFixed(0)}% of the clients' work done; ` +
    (run.waiting_for ? `waiting for ${run.waiting_for} of ${r.picked} client(s): ${run.waiting_ids}` +
      (uploading ? ` (${uploading} uploading)` : "") : "every update is in; aggregating"));
}

function setText(id, text) { const el = $(id); if (el.textContent !== text) el.textContent = text; }

// ---- evaluation: the confusion matrix of the global model, and each class's precision, recall and F1
function drawEvaluation(e) {
  const card = $("evaluation");
  card.querySelector(".empty").hidden = !!e.per_class;
  card.querySelector(".eval-body").hidden = !e.per_class;
  if (!e.per_class || card.dataset.round === `${e.round}/${e.source}`) return;
  card.dataset.round = `${e.round}/${e.source}`;
  setText("evaluation-what", `(round ${e.round}'s model, on ${e.source})`);
  let html = "";
  if (e.confusion) {
    const max = Math.max(1, ...e.confusion.flat());
    html = `<caption>confusion matrix: rows the true class, columns the predicted one</caption>` +
      `<tr><th></th>${e.classes.map((c) => `<th>${esc(c)}</th>`).join("")}</tr>` +
      e.confusion.map((row, i) => `<tr><th>${esc(e.classes[i])}</th>` + row.map((v, j) => {
        const a = v ? 0.12 + 0.88 * (v / max) : 0;
        const color = i === j ? `rgba(36,99,235,${a.toFixed(3)})` : `rgba(198,40,40,${a.toFixed(3)})`;
        return `<td style="background:${color}" class="${a > 0.55 ? "dark" : ""}" title="true ${esc(e.classes[i])}, predicted ${esc(e.classes[j])}: ${v}">${v}</td>`;
      }).join("") + "</tr>").join("");
  }
  $("confusion").innerHTML = html;
  const pct = (v) => (v == null ? "—" : (100 * v).toFixed(1) + "%");
  $("per-class").innerHTML = `<thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>examples</th></tr></thead><tbody>` +
    e.per_class.map((c, i) => `<tr><td>${esc(e.classes[i])}</td><td>${pct(c.precision)}</td><td>${pct(c.recall)}</td>` +
      `<td>${pct(c.f1)}</td><td>${c.support}</td></tr>`).join("") + "</tbody>";
}

// ---- the model card (fedsock/model_card.py: state.model_card; without it, nothing shows)
function drawModelCard(m) {
  $("model-card").hidden = !m;
  if (!m) return;
  const mb = (v) => (v == null ? null : `${(v / 1e6).toFixed(2)} MB`);
  const how = (kind) => (kind && kind !== "none" ? ` (${kind})` : "");
  const rows = [["parameters", m.parameters == null ? null : Number(m.parameters).toLocaleString("en-US")],
    ["size as float32", mb(m.weights_bytes)],
    ["an update on the wire", m.update_bytes == null ? null : mb(m.update_bytes) + how(m.update_compression)],
    ["the model on the wire", m.broadcast_bytes == null ? null : mb(m.broadcast_bytes) + how(m.broadcast_compression)],
    ["layers", Array.isArray(m.layers) ? m.layers.map((l) => `${l.name} ${l.type}`).join(", ") : null],
  ].filter(([, v]) => v != null);
  const html = rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join("");
  if ($("model-facts").dataset.html !== html) { $("model-facts").innerHTML = html; $("model-facts").dataset.html = html; }
  setText("model-architecture", m.architecture ? String(m.architecture) : "");
  $("model-architecture").hidden = !m.architecture;
}

// ---- the log, filtered by level and client
function filteredLog() {
  const level = $("log-level").value, client = $("log-client").value;
  if (!level && client === "") return state.log;
  return state.log.filter((e) => (!level || e.level === level) && (client === "" || e.client === Number(client)));
}

// The table is paged, ROWS_SHOWN clients a page by id (the counts above it cover all of them), and a
// big federation's table is redrawn at most once a second: the browser shares the machine with the server.
const ROWS_SHOWN = 100;
const rowsById = new Map();
let clientsDrawn = 0, clientPage = 0, selected = null;
function drawClients() {
  const body = document.querySelector("#clients tbody");
  const now = performance.now();
  if (state.clients.size > ROWS_SHOWN && now - clientsDrawn < 1000) {
    if (!drawPending) { drawPending = true; setTimeout(() => requestAnimationFrame(draw), 1000 - (now - clientsDrawn)); }
    return;
  }
  clientsDrawn = now;
  const ids = [...state.clients.keys()].sort((a, b) => a - b);
  let counts = {};
  for (const c of state.clients.values()) counts[c.state] = (counts[c.state] || 0) + 1;
  const pages = Math.max(1, Math.ceil(ids.length / ROWS_SHOWN));
  clientPage = Math.min(clientPage, pages - 1);
  const shown = ids.slice(clientPage * ROWS_SHOWN, (clientPage + 1) * ROWS_SHOWN);
  const keep = new Set(shown);
  for (const [id, tr] of rowsById) if (!keep.has(id)) { tr.remove(); rowsById.delete(id); }
  for (const id of shown) {
    const c = state.clients.get(id);
    const cells = [c.id, c.peer, c.joined ? clock(c.joined) : "", `<span class="state ${c.state}">${stateText(c)}</span>`,
      c.round ?? "", progressCell(state.progress.get(id)), num(c.loss, 4),
      c.accuracy == null ? "" : (100 * c.accuracy).toFixed(2) + "%", c.examples ?? "", num(c.fit_seconds, 1),
      num(c.upload_seconds, 2)];
    const html = cells.map((v, i) => (i === 3 || i === 5 ? `<td>${v}</td>` : `<td>${esc(String(v))}</td>`)).join("") +
      `<td class="policy"></td><td class="note">${esc(c.reason || "")}</td>`;
    const drawn = html + "\n" + c.policy_text;
    let tr = rowsById.get(id);
    if (!tr) { tr = document.createElement("tr"); tr.dataset.id = id; rowsById.set(id, tr); insertRow(body, tr, id); }
    tr.classList.toggle("selected", id === selected);
    if (tr.dataset.html !== drawn) {
      tr.innerHTML = html;
      tr.querySelector(".policy").textContent = c.policy_text;  // text, never markup
      tr.dataset.html = drawn;
    }
  }
  $("client-count").textContent = "(" + Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") + ")";
  $("pager").hidden = pages < 2;
  setText("page-text", `${clientPage * ROWS_SHOWN + 1}–${clientPage * ROWS_SHOWN + shown.length} of ${ids.length}`);
  $("page-prev").disabled = clientPage === 0;
  $("page-next").disabled = clientPage >= pages - 1;
}

// A client's progress in the round: its training (from its <PROGRESS> reports), then its upload (bytes in).
function progressCell(p) {
  if (!p) return "";
  const uploading = p[1] != null, share = uploading ? p[1] : p[0];
  const text = uploading ? `upload ${(100 * share).toFixed(0)}%` : `${(100 * share).toFixed(0)}% trained`;
  return `<span class="bar${uploading ? " up" : ""}" data-share="${share}"><span style="width:${(100 * share).toFixed(1)}%"></span></span>` +
    `<span class="bar-text">${text}</span>`;
}

// ---- one client's view: loss and local accuracy over rounds, its label balance, its fit and upload times
let clientDetail = null, detailAsked = "";
async function openClient(id) {
  selected = id;
  detailAsked = "";
  $("client-view").hidden = false;
  clientsDrawn = 0;
  drawClientView();
  draw();
  $("client-view").scrollIntoView({ block: "nearest" });
}

async function drawClientView() {
  if (selected == null) return;
  const c = state.clients.get(selected);
  const key = c ? `${selected}/${c.round}/${c.loss}/${c.state}` : "";
  if (key === detailAsked) return;
  detailAsked = key;
  try {
    const response = await fetch(`/api/client/${selected}`);
    if (!response.ok) return;
    clientDetail = await response.json();
  } catch (err) { return; }
  if (clientDetail.id !== selected) return;
  setText("cv-id", String(selected));
  const d = clientDetail;
  setText("cv-what", c ? `(${c.peer}, ${c.examples ?? "?"} training examples, ${d.history.length} round(s) trained)` : "");
  const xs = d.history.map((h) => h[0]);
  const column = (k, scale = 1) => d.history.map((h) => (h[k] == null ? null : h[k] * scale));
  chart("chart-client", "its training loss and local accuracy", [["training loss", "#2e7d32"],
    ["local test accuracy (0..1)", "#8e24aa", [6, 3]]], "", xs, [column(1), column(2)]);
  chart("chart-client-times", "its fit and upload seconds", [["fit", "#ef6c00"], ["upload", "#2463eb"]], "s", xs,
    [column(3), column(4)], true);
  const labels = $("cv-labels");
  if (!d.label_counts) {
    labels.innerHTML = `<p class="muted">This client reported no label counts (an older or third-party client).</p>`;
  } else {
    const max = Math.max(1, ...d.label_counts), total = d.label_counts.reduce((a, b) => a + b, 0);
    labels.innerHTML = d.label_counts.map((n, i) => `<div class="label-row" title="${n} of ${total}">` +
      `<span class="name">${esc(d.classes[i])}</span><span class="hbar"><span style="width:${(100 * n / max).toFixed(1)}%"></span></span>` +
      `<span class="count">${n}</span></div>`).join("");
  }
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
  const last = String(entries.length && entries[entries.length - 1].time) + (id === "log" ? $("log-level").value + "/" + $("log-client").value : "");
  if (list.dataset.count === String(entries.length) && list.dataset.last === last) return;
  list.innerHTML = entries.slice().reverse().map((e) => {
    const [time, text, warning] = fields(e);
    return `<li class="${warning ? "warning" : ""}"><time>${clock(time)}</time>${esc(text)}</li>`;
  }).join("");
  list.dataset.count = String(entries.length);
  list.dataset.last = last;
}

const esc = (s) => s.replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[ch]);
const num = (v, digits) => (v == null ? "" : Number(v).toFixed(digits));
// 24-hour, as the server's log lines: 14:03:07
const clock = (t) => { const d = new Date(t * 1000); return [d.getHours(), d.getMinutes(), d.getSeconds()].map((v) => String(v).padStart(2, "0")).join(":"); };

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
  const redraw = () => { if (!drawPending) { drawPending = true; requestAnimationFrame(draw); } };
  $("log-level").addEventListener("change", redraw);
  $("log-client").addEventListener("input", redraw);
  $("page-prev").addEventListener("click", () => { clientPage -= 1; clientsDrawn = 0; redraw(); });
  $("page-next").addEventListener("click", () => { clientPage += 1; clientsDrawn = 0; redraw(); });
  document.querySelector("#clients tbody").addEventListener("click", (e) => {
    const tr = e.target.closest("tr");
    if (tr) openClient(Number(tr.dataset.id));
  });
  $("cv-close").addEventListener("click", () => { selected = null; $("client-view").hidden = true; clientsDrawn = 0; redraw(); });
  setInterval(() => { if (state.run.phase === "training") drawHeadline(); }, 1000);  // the elapsed time ticks
  connect();
});
