// MemoGuard front end: a live score chart on the Memorization Monitor, coloured tokens on Token Contributions.
// Data arrives as the pack's websocket events (memoguard.step / .verdict / .mitigation) while sampling, and as
// node outputs (memoguard_trace, memoguard_tokens) that ComfyUI re-sends for cached runs. The last data is kept
// in node.properties so a saved workflow shows it again when reloaded.
//
// The chart: score per step, one line per image, over the benign band (median..upper edge of ordinary
// prompts at each step's noise level, from the calibration); the verdict window shaded, the threshold dashed
// across it only (the threshold is a first-steps threshold: later steps are judged by the band). Without a band
// it says why in words. The verdict per image, notes and status are text below the chart: one place, wrapped.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MONITOR = "MemoGuardMemorizationMonitor";
const SCORE = "MemoGuardMemorizationScore";
const TOKENS = "MemoGuardTokenContributions";
const MITIGATION = "MemoGuardEmbeddingMinimization";
const EVIDENCE = "MemoGuardCopyEvidence";
const FILTER_REPORT = "MemoGuardTrainingFilterReport";
const PROGRESS_WIDGET = "$$node-text-preview"; // ComfyUI's progress-text widget (send_progress_text)
const PANEL_NODES = [MONITOR, TOKENS, MITIGATION, EVIDENCE];  // their panel shows the progress text instead
// the same colours as memoguard/report.py LINE_COLORS (red is the threshold's and "flagged"'s)
const LINE_COLORS = ["#2d6edc", "#eb8214", "#28a05a", "#9650c8", "#00a0aa", "#785a3c"];
const LABEL_COLORS = { ok: "#3cb45a", flagged: "#ff5050", uncalibrated: "#e0a020", unavailable: "#999", pending: "#999" };

function nodeById(id) {
  if (id === null || id === undefined) return null;
  const last = String(id).split(":").pop(); // nodes inside subgraphs arrive as "outer:inner"
  return app.graph?.getNodeById(Number(last)) ?? app.graph?.getNodeById(last) ?? null;
}

// A panel that fills the free space of its node (at least minHeight) and never asks for more: what does not fit
// scrolls inside it, so nothing that arrives after a run can make the node grow.
function panel(node, name, minHeight) {
  const el = document.createElement("div");
  el.className = "memoguard-panel";
  Object.assign(el.style, { width: "100%", height: "100%", overflow: "hidden", font: "12px sans-serif",
                            color: "var(--input-text, #ddd)", boxSizing: "border-box", padding: "2px 4px",
                            display: "flex", flexDirection: "column", gap: "2px" });
  const widget = node.addDOMWidget(name, "memoguard", el, { serialize: false, hideOnZoom: false,
                                                           getMinHeight: () => minHeight });
  widget.serialize = false; // the graph's widgets_values: the front end reads this flag, not the option
  // scrolling inside the panel scrolls the panel, not the canvas zoom
  el.addEventListener("wheel", (e) => { if (e.target.closest?.(".memoguard-scroll")) e.stopPropagation(); }, { passive: true });
  return el;
}

// ComfyUI shows a node's progress text in a widget it adds on the first message; on the Monitor that widget grew
// the node over the one below, repeated our summary and cut it mid-word (break-all). The Monitor's panel shows
// that text instead; the widget stays, hidden and of zero height.
function hideProgressWidget(...widgets) {
  for (const w of widgets) {
    if (!w || w.memoguardHidden) continue;
    w.memoguardHidden = true;
    w.hidden = true;                                   // frontend 1.49: left out of the layout and the DOM
    w.computeLayoutSize = () => ({ minHeight: 0, maxHeight: 0, minWidth: 0 }); // 1.27: zero height
    w.isVisible = () => false;                         // both: not rendered
    w.computedHeight = 0;
  }
}

function el(tag, props = {}, style = {}) {
  const e = Object.assign(document.createElement(tag), props);
  Object.assign(e.style, style);
  return e;
}

// A node's progress text, when it says something its panel does not already show.
function statusLine(node, shown) {
  const status = clean(node.properties?.memoguard_status);
  if (!status || shown.includes(status)) return null;
  return el("div", { className: "memoguard-status", textContent: status }, { color: "#999", fontSize: "11px", flex: "0 0 auto" });
}

// -- Monitor chart ---------------------------------------------------------------------------------------
function emptyTrace() {
  return { run: null, steps: [], scores: [], sigma: [], band: [], threshold: null, window: null, total: null,
           summary: "", flagged: false, label: null, verdicts: [], notes: [], status: "" };
}

const finite = (v) => typeof v === "number" && Number.isFinite(v);

function niceTicks(hi, count = 4) {
  if (!finite(hi) || hi <= 0) return [0];
  const raw = hi / count, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const out = [];
  for (let k = 0; k * step <= hi * (1 + 1e-9); k++) out.push(+(k * step).toPrecision(12));
  return out;
}
const fmt = (v) => (v ? Number(v.toPrecision(3)).toString() : "0");

// The score axis: linear from 0, or logarithmic when the values span more than LOG_SPAN (the gap grows many
// times over a run: on a linear axis the first steps, where the verdict is taken, would be squashed flat).
// Same rule as memoguard/report.py. at(v) -> 0..1 of the plot height.
const LOG_SPAN = 6;
function yScale(values, measure) {
  const vals = values.filter(finite);
  const top = Math.max(...vals, 0), positive = vals.filter((v) => v > 0), lo = Math.min(...positive);
  if (positive.length && top / lo > LOG_SPAN) {
    const ymin = lo / 1.15, ymax = top * 1.15, l0 = Math.log(ymin), span = Math.log(ymax) - l0;
    let ticks = [];
    for (let e = Math.floor(Math.log10(ymin)); e <= Math.ceil(Math.log10(ymax)); e++)
      for (const m of [1, 2, 5]) { const t = +(m * 10 ** e).toPrecision(12); if (t >= ymin && t <= ymax) ticks.push(t); }
    if (ticks.length > 6) ticks = ticks.filter((t) => /^1|^5/.test(t.toExponential()));
    return { log: true, ticks, hi: ymax, labelWidth: Math.max(...ticks.map((t) => measure(t)), 0),
             at: (v) => (finite(v) && v > 0 ? Math.min(Math.max((Math.log(v) - l0) / span, 0), 1.05) : 0) };
  }
  let ticks = niceTicks(top > 0 ? top * 1.1 : 1);
  const hi = Math.max(top * 1.08, ticks.at(-1)) || 1;
  ticks = ticks.filter((t) => t <= hi * 1.0001);
  return { log: false, ticks, hi, labelWidth: Math.max(...ticks.map((t) => measure(t))),
           at: (v) => Math.min(Math.max(v / hi, 0), 1.05) };
}

// "score unavailable: score unavailable at cfg 1: ..." -> one prefix (and never add one of our own)
function clean(text) {
  return String(text ?? "").replace(/^(score unavailable:\s*)+(?=score unavailable)/i, "").trim();
}

function bandRows(state, n) {
  const rows = [];
  for (let i = 0; i < n; i++) {
    const b = state.band?.[i];
    rows.push(Array.isArray(b) && finite(b[0]) && finite(b[1]) ? b : null);
  }
  return rows;
}

function runLabel(state) {
  if (state.verdicts?.length) {
    const labels = new Set(state.verdicts.map((v) => v.label));
    for (const l of ["flagged", "ok", "uncalibrated", "unavailable"]) if (labels.has(l)) return l;
  }
  if (/^score unavailable/i.test(state.summary ?? "")) return "unavailable";
  return state.label ?? null;
}

// Why there is no band, in words (null when one is drawn for every step).
function bandMessage(state, rows, steps) {
  const label = runLabel(state);
  const has = rows.filter(Boolean).length;
  if (has === rows.length && has) return null;
  const noteBand = (state.notes ?? []).find((n) => /band/i.test(n));
  if (has) {
    const missing = rows.map((r, i) => (r ? null : steps[i] + 1)).filter(Boolean);
    const list = missing.length > 4 ? `${missing.slice(0, 3).join(", ")}, ...` : missing.join(", ");
    return `no band at step${missing.length > 1 ? "s" : ""} ${list}: outside the calibrated noise range`;
  }
  if (label === "unavailable") return null; // the chart already says the score is unavailable
  if (label === "uncalibrated" || (!finite(state.threshold) && label !== "pending"))
    return "no benign band: this model is uncalibrated";
  if (noteBand) return `no benign band: ${noteBand.replace(/^benign band not drawn:\s*/i, "")}`;
  return "no benign band: this run is outside the calibrated range";
}

function drawCanvas(canvas, state, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(width * ratio));
  canvas.height = Math.max(1, Math.round(height * ratio));
  canvas.style.width = `${width}px`; canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.font = "10px sans-serif"; ctx.textBaseline = "middle";
  const images = Math.max(0, ...state.scores.map((row) => (Array.isArray(row) ? row.length : 0)));
  const n = Math.max(state.total ?? 0, state.steps.length ? Math.max(...state.steps) + 1 : 0, 1);
  const rows = bandRows(state, n);
  const bandAt = new Array(n).fill(null);
  // band values are per recorded step: place them at the step numbers they belong to
  state.steps.forEach((s, i) => { if (s < n) bandAt[s] = rows[i]; });
  const values = state.scores.flat().filter(finite);
  const label = runLabel(state);
  const info = { points: 0, bandSteps: bandAt.filter(Boolean).length, message: null, thresholdSteps: 0 };
  if (!values.length) {
    const text = label === "unavailable" ? "score unavailable (see below)" : "waiting for a sampler run";
    ctx.fillStyle = "#999"; ctx.textAlign = "center"; ctx.font = "12px sans-serif";
    ctx.fillText(text, width / 2, height / 2);
    info.message = text;
    return info;
  }
  const scale = yScale([...values, ...bandAt.filter(Boolean).flat(), ...(finite(state.threshold) ? [state.threshold] : [])],
                       (t) => ctx.measureText(fmt(t)).width);
  const left = 6 + scale.labelWidth, right = width - 6;
  const topY = 6, bottom = height - 16;
  const x = (i) => (n === 1 ? (left + right) / 2 : left + (right - left) * i / (n - 1));
  const y = (v) => bottom - (bottom - topY) * scale.at(v);
  // no two tick labels closer than 12 px (a short chart keeps every other one, and so on)
  let ticks = scale.ticks;
  for (let k = 2; ticks.length > 1 && Math.abs(y(ticks[0]) - y(ticks[1])) < 12 && k <= 8; k++)
    ticks = scale.ticks.filter((_, i) => i % k === 0);
  const half = n > 1 ? (right - left) / (2 * (n - 1)) : (right - left) / 2;
  // verdict window
  const win = finite(state.window) && state.window >= 1 ? Math.min(state.window, n) : null;
  if (win) {
    ctx.fillStyle = "rgba(255, 210, 90, 0.13)";
    const x0 = Math.max(left, x(0) - half), x1 = Math.min(right, x(win - 1) + half);
    ctx.fillRect(x0, topY, x1 - x0, bottom - topY);
  }
  // grid, y ticks
  ctx.strokeStyle = "rgba(255, 255, 255, 0.08)"; ctx.fillStyle = "#aaa"; ctx.textAlign = "right"; ctx.lineWidth = 1;
  for (const t of ticks) {
    ctx.beginPath(); ctx.moveTo(left, y(t)); ctx.lineTo(right, y(t)); ctx.stroke();
    ctx.fillText(fmt(t), left - 3, y(t));
  }
  // band
  ctx.fillStyle = "rgba(110, 160, 235, 0.35)";
  for (let i = 0; i < n; i++) {
    const a = bandAt[i], b = bandAt[i + 1];
    if (a && b) {
      ctx.beginPath(); ctx.moveTo(x(i), y(a[1])); ctx.lineTo(x(i + 1), y(b[1]));
      ctx.lineTo(x(i + 1), y(b[0])); ctx.lineTo(x(i), y(a[0])); ctx.closePath(); ctx.fill();
    } else if (a && !(i > 0 && bandAt[i - 1])) {
      ctx.fillRect(x(i) - 3, y(a[1]), 6, Math.max(1, y(a[0]) - y(a[1])));
    }
  }
  ctx.strokeStyle = "rgba(150, 185, 240, 0.8)"; ctx.beginPath();
  for (let i = 0; i + 1 < n; i++) {
    if (bandAt[i] && bandAt[i + 1]) { ctx.moveTo(x(i), y(bandAt[i][0])); ctx.lineTo(x(i + 1), y(bandAt[i + 1][0])); }
  }
  ctx.stroke();
  info.message = bandMessage(state, state.steps.map((st) => bandAt[st] ?? null), state.steps);
  if (info.message) {
    ctx.fillStyle = "#bbb"; ctx.textAlign = "left"; ctx.fillText(info.message, left + 4, topY + 7, right - left - 8);
  }
  // threshold: across the verdict window only (the whole chart when the window is unknown)
  if (finite(state.threshold)) {
    const x0 = win ? Math.max(left, x(0) - half) : left, x1 = win ? Math.min(right, x(win - 1) + half) : right;
    ctx.strokeStyle = "#ff5050"; ctx.lineWidth = 2; ctx.setLineDash([5, 4]); ctx.beginPath();
    ctx.moveTo(x0, y(state.threshold)); ctx.lineTo(x1, y(state.threshold)); ctx.stroke(); ctx.setLineDash([]);
    info.thresholdSteps = win ?? n;
  }
  // axes under the lines, so a point on an axis stays visible
  ctx.strokeStyle = "#888"; ctx.lineWidth = 1; ctx.beginPath();
  ctx.moveTo(left, topY); ctx.lineTo(left, bottom); ctx.lineTo(right, bottom); ctx.stroke();
  // one line per image; every point a dot too, so a single step is visible
  for (let b = 0; b < images; b++) {
    const color = LINE_COLORS[b % LINE_COLORS.length];
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    let open = false;
    state.scores.forEach((row, i) => {
      const v = row?.[b];
      if (!finite(v)) { open = false; return; }
      const px = x(state.steps[i]), py = y(v);
      open ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
      open = true;
    });
    ctx.stroke();
    state.scores.forEach((row, i) => {
      const v = row?.[b];
      if (!finite(v)) return;
      ctx.beginPath(); ctx.arc(x(state.steps[i]), y(v), state.scores.length === 1 ? 3.5 : 2.2, 0, 2 * Math.PI); ctx.fill();
      info.points++;
    });
  }
  // x ticks (steps from 1)
  ctx.strokeStyle = "#888"; ctx.lineWidth = 1;
  let every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor((right - left) / 28))));
  every = [1, 2, 5, 10, 20, 25, 50, 100, 200, 500, 1000].find((m) => m >= every) ?? every;
  ctx.fillStyle = "#aaa"; ctx.textAlign = "center";
  for (let i = 0; i < n; i++) {
    if (i !== 0 && (i + 1) % every) continue;
    ctx.beginPath(); ctx.moveTo(x(i), bottom); ctx.lineTo(x(i), bottom + 3); ctx.stroke();
    ctx.fillText(String(i + 1), x(i), bottom + 9);
  }
  if (left >= 24) { ctx.textAlign = "left"; ctx.fillText("step", 1, bottom + 9); }
  Object.assign(info, { left, right, top: topY, bottom, hi: scale.hi, n, log: scale.log, x, y });
  return info;
}

function verdictText(v) {
  const pct = finite(v.percentile) ? `, ${v.percentile.toFixed(1)}th percentile of benign` : "";
  switch (v.label) {
    case "ok": case "flagged":
      return `score ${v.score.toFixed(4)}${pct}, threshold ${v.threshold.toFixed(4)}${v.reason ? ` (${v.reason})` : ""}`;
    case "uncalibrated":
      return `score ${finite(v.score) ? v.score.toFixed(4) : "?"}, no threshold: ${clean(v.reason) || "calibrate this model to get a verdict"}`;
    default:
      return clean(v.reason) || "no score";
  }
}

function drawInfo(box, state) {
  box.replaceChildren();
  const images = Math.max(state.verdicts?.length ?? 0, ...state.scores.map((r) => (Array.isArray(r) ? r.length : 0)));
  const last = state.scores.at(-1) ?? [];
  const lines = [];
  for (let b = 0; b < images; b++) {
    const v = state.verdicts?.[b];
    const label = v?.label ?? (runLabel(state) === "unavailable" ? "unavailable" : "pending");
    const text = v ? verdictText(v)
      : label === "unavailable" ? clean(state.summary)
      : `score ${finite(last[b]) ? last[b].toFixed(4) : "?"} at step ${(state.steps.at(-1) ?? 0) + 1}` +
        (finite(state.window) ? `, verdict at step ${state.window}` : "");
    lines.push({ b, label, text });
  }
  for (const { b, label, text } of lines) {
    const row = el("div", { className: `memoguard-image memoguard-${label}` }, { lineHeight: "14px" });
    row.dataset.label = label;
    row.append(el("span", { textContent: "■ " }, { color: LINE_COLORS[b % LINE_COLORS.length] }),
               el("span", { textContent: `image ${b + 1}: ` }),
               el("b", { className: "memoguard-label", textContent: label }, { color: LABEL_COLORS[label] ?? "" }),
               el("span", { textContent: ` — ${text}` }));
    box.append(row);
  }
  if (!lines.length) {
    const text = clean(state.summary) || (state.steps.length ? "" : "waiting for a sampler run");
    if (text) box.append(el("div", { className: "memoguard-text", textContent: text }));
  }
  const notes = [...new Set([...(state.notes ?? []), ...(state.verdicts ?? []).flatMap((v) => v.notes ?? [])])];
  for (const note of notes) box.append(el("div", { className: "memoguard-note", textContent: `note: ${note}` }, { color: "#e0a020" }));
  const summary = clean(state.summary);
  const status = clean(state.status);
  if (status && status !== summary && !summary.includes(status) && !lines.some((l) => status.includes(l.text)))
    box.append(el("div", { className: "memoguard-status", textContent: status }, { color: "#999" }));
}

function drawPlot(node) {
  const root = node.memoguardChart, state = node.properties?.memoguard;
  const plot = root?.querySelector(".memoguard-plot");
  if (!plot || !state) return;
  const width = Math.max(60, plot.clientWidth), height = Math.max(40, plot.clientHeight);
  const drawn = drawCanvas(plot.querySelector("canvas"), state, width, height);
  plot.memoguardSize = `${width}x${height}`;
  Object.assign(root.dataset, { points: String(drawn.points), bandSteps: String(drawn.bandSteps),
                                thresholdSteps: String(drawn.thresholdSteps), message: drawn.message ?? "" });
  node.memoguardDrawn = drawn;
}

function drawChart(node) {
  const state = node.properties?.memoguard;
  const root = node.memoguardChart;
  if (!root || !state) return;
  for (const [k, v] of Object.entries(emptyTrace())) state[k] ??= v;
  let plot = root.querySelector(".memoguard-plot");
  if (!plot) {
    plot = el("div", { className: "memoguard-plot" }, { flex: "1 1 auto", minHeight: "40px", position: "relative" });
    plot.append(el("canvas", {}, { position: "absolute", left: 0, top: 0 }));
    const info = el("div", { className: "memoguard-summary memoguard-scroll" },
                    { flex: "0 1 auto", maxHeight: "45%", minHeight: "16px", overflowY: "auto", whiteSpace: "normal",
                      overflowWrap: "break-word", wordBreak: "normal", fontSize: "11px" });
    root.append(plot, info);
    // only the canvas follows the panel's size; it is absolutely placed, so redrawing it cannot resize anything
    new ResizeObserver(() => {
      if (plot.memoguardSize !== `${Math.max(60, plot.clientWidth)}x${Math.max(40, plot.clientHeight)}`) drawPlot(node);
    }).observe(plot);
  }
  const info = root.querySelector(".memoguard-summary");
  drawInfo(info, state);
  info.dataset.flagged = String(Boolean(state.flagged));
  info.dataset.label = runLabel(state) ?? "";
  info.style.maxHeight = state.scores.flat().some(finite) ? "45%" : "75%"; // no chart to show: more room for text
  drawPlot(node);
}

function monitorState(node, run) {
  let state = node.properties.memoguard;
  if (!state || (run !== undefined && state.run !== run)) {
    state = node.properties.memoguard = { ...emptyTrace(), run: run ?? null, status: state?.status ?? "" };
  }
  return state;
}

function onStep({ detail }) {
  const node = nodeById(detail.node);
  if (!node || node.type !== MONITOR) return;
  const state = monitorState(node, detail.run);
  state.steps.push(detail.step); state.scores.push(Array.isArray(detail.score) ? detail.score : [detail.score]);
  state.sigma.push(detail.sigma ?? null); state.band.push(detail.band ?? null);
  state.threshold = detail.threshold ?? null; state.total = detail.total ?? null;
  state.window = detail.window ?? state.window; state.label = detail.label ?? state.label;
  drawChart(node);
}

function onVerdict({ detail }) {
  const node = nodeById(detail.node);
  if (!node || node.type !== MONITOR) return;
  const state = monitorState(node, detail.run);
  state.summary = detail.summary ?? ""; state.flagged = Boolean(detail.flagged);
  state.verdicts = detail.verdicts ?? []; state.notes = detail.notes ?? [];
  drawChart(node);
}

function onProgressText({ detail }) {
  const node = nodeById(detail?.nodeId);
  if (!node || !PANEL_NODES.includes(node.type) || !node.properties) return;
  const text = String(detail.text ?? "").replace(/^MemoGuard:\s*/, "");
  if (node.type === MONITOR) {
    const state = node.properties.memoguard ?? (node.properties.memoguard = emptyTrace());
    state.status = text;
    drawChart(node);
  } else if (node.type === TOKENS) {
    node.properties.memoguard_status = text;
    drawTokens(node);
  } else if (node.type === MITIGATION) {
    node.properties.memoguard_status = text;
    showMitigation(node);
  } else if (node.type === EVIDENCE) {
    node.properties.memoguard_status = text;
    drawEvidence(node);
  }
}

// -- Copy evidence: each image's nearest training image and verdict (the cards are ComfyUI's image preview) --------
function drawEvidence(node) {
  const data = node.properties?.memoguard_evidence;
  const root = node.memoguardEvidence;
  if (!root) return;
  root.replaceChildren();
  const summary = clean(data?.summary ?? data?.error);
  if (summary) root.append(el("div", { className: "memoguard-text memoguard-evidence-summary", textContent: summary },
                              { flex: "0 0 auto", fontSize: "12px", color: "#ddd" }));
  const list = el("div", { className: "memoguard-scroll" }, { flex: "1 1 auto", minHeight: 0, overflowY: "auto" });
  (data?.matches ?? []).forEach((m, i) => {
    const verdict = m.copy === true ? "COPY" : m.copy === false ? "no copy" : "no verdict";
    const caption = m.caption ? ` "${m.caption.length > 50 ? m.caption.slice(0, 50) + "…" : m.caption}"` : "";
    list.append(el("div", { className: "memoguard-evidence",
                            textContent: `image ${i + 1}: ${verdict}, ${m.file}${caption}, similarity ${m.similarity.toFixed(3)}`,
                            title: `ratio ${m.ratio.toFixed(3)}` + (m.threshold === null ? "" : ` (threshold ${m.threshold.toFixed(3)})`) +
                                   `, pHash distance ${m.hash_distance}` },
                   { fontSize: "12px", whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
                     color: m.copy === true ? LABEL_COLORS.flagged : m.copy === false ? LABEL_COLORS.ok : "#ccc" }));
  });
  root.append(list);
  const status = statusLine(node, root.textContent);
  if (status) root.append(status);
}

function restoreFromScore(output) {
  // The Score node's output carries the whole trace; ComfyUI re-sends it when the graph is cached.
  const raw = output?.memoguard_trace?.[0];
  if (!raw) return;
  const data = typeof raw === "string" ? JSON.parse(raw) : raw;
  const node = nodeById(data.node);
  if (!node || node.type !== MONITOR) return;
  const trace = data.trace ?? {};
  const steps = trace.steps ?? data.steps ?? [];
  const rms = trace.rms ?? data.rms ?? []; // per image, per step
  const status = node.properties.memoguard?.status ?? "";
  node.properties.memoguard = {
    ...emptyTrace(), run: data.run, steps, scores: steps.map((_, i) => rms.map((img) => img[i])),
    sigma: data.sigma ?? trace.sigma ?? trace.t ?? [], band: data.band ?? trace.band ?? [],
    threshold: data.threshold ?? null, window: data.window ?? null, total: data.total ?? steps.length,
    summary: data.summary ?? "", verdicts: data.verdicts ?? [], notes: data.notes ?? [], label: data.label ?? null,
    flagged: (data.verdicts ?? []).some((v) => v.flagged), status,
  };
  drawChart(node);
}

// -- Token colours --------------------------------------------------------------------------------------
function drawTokens(node) {
  const data = node.properties?.memoguard_tokens;
  const root = node.memoguardTokens;
  if (!root) return;
  root.replaceChildren();
  if (!data || !Array.isArray(data.tokens) || !data.tokens.length) {
    const text = clean(data?.error) || (data ? "no tokens" : "");
    if (text) root.append(el("div", { className: "memoguard-text", textContent: text }));
    const status = statusLine(node, text);
    if (status) root.append(status);
    return;
  }
  const shares = data.tokens.map((_, i) => (finite(data.shares?.[i]) ? data.shares[i] : 0));
  const top = Math.max(...shares, 1e-9);
  const ranked = shares.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]).slice(0, 5);
  if (data.tokens.length > 12) root.append(el("div", { className: "memoguard-text",
                          textContent: `${data.tokens.length} tokens; largest: ` +
                            ranked.map(([s, i]) => `${data.tokens[i]} ${(100 * s).toFixed(0)}%`).join(", ") },
                 { flex: "0 0 auto", fontSize: "11px", color: "#aaa" }));
  const box = el("div", { className: "memoguard-chips memoguard-scroll" },
                 { flex: "1 1 auto", minHeight: 0, overflowY: "auto", display: "flex", flexWrap: "wrap",
                   alignContent: "flex-start", gap: "2px" });
  const compact = data.tokens.length > 30;
  data.tokens.forEach((token, i) => {
    const share = shares[i];
    const span = el("span", { className: "memoguard-token", textContent: `${token} ${(100 * share).toFixed(0)}%`,
                              title: `${(100 * share).toFixed(1)}% of the contribution` +
                                     (finite(data.scores?.[i]) ? `, score ${data.scores[i].toPrecision(3)}` : "") +
                                     (finite(data.score_without?.[i])
                                       ? `; first-step score without it ${data.score_without[i].toFixed(4)}` : "") },
                    { display: "inline-block", padding: compact ? "0 3px" : "2px 5px", borderRadius: "4px",
                      color: "#fff", fontSize: compact ? "11px" : "13px", whiteSpace: "nowrap",
                      background: `rgba(230, 25, 75, ${0.15 + 0.85 * share / top})` });
    box.append(span);
  });
  root.append(box);
  // the summary's "top words" repeat the chips; what they cannot say ("spread over the caption ...") is shown
  const summary = clean(data.summary);
  if (summary && !/^top words/.test(summary)) root.append(el("div", { className: "memoguard-text", textContent: summary },
                                                             { flex: "0 0 auto", fontSize: "12px", color: "#ddd" }));
  if (data.method_name) root.append(el("div", { className: "memoguard-text", textContent: `method: ${data.method_name}` },
                                       { flex: "0 0 auto", fontSize: "11px", color: "#aaa" }));
  const status = statusLine(node, root.textContent);
  const said = status && (/^(MemoGuard: )?top (tokens|words)/.test(status.textContent)  // = the chips
                          || root.textContent.includes(status.textContent.replace(/^MemoGuard: /, "")));
  if (status && !said) root.append(status);
}

function onMitigation({ detail }) {
  const node = nodeById(detail.node);
  if (!node || node.type !== MITIGATION) return;
  node.properties.memoguard_mitigation = detail;
  showMitigation(node);
}

function showMitigation(node) {
  const root = node.memoguardMitigation, detail = node.properties?.memoguard_mitigation;
  if (!root) return;
  // the server words it (memoguard.mitigate's record summary): one wording for every strategy
  const text = !detail ? "" : !detail.ran ? `not run: ${clean(detail.reason)}` : clean(detail.summary);
  root.replaceChildren(el("div", { className: "memoguard-text", textContent: text }));
  const status = statusLine(node, text);
  const numbers = (s) => (s.match(/\d+\.\d+/g) ?? []).join(" ");
  if (status && !(detail && numbers(status.textContent) && numbers(text).includes(numbers(status.textContent)))) root.append(status);
}

function showFilterReport(node) {
  const root = node.memoguardFilterReport;
  if (!root) return;
  const text = clean(node.properties?.memoguard_filter_report ?? "");
  root.replaceChildren(el("div", { className: "memoguard-text memoguard-scroll", textContent: text },
                          { whiteSpace: "pre-wrap", overflowY: "auto" }));
}

app.registerExtension({
  name: "memoguard.nodes",
  setup() {
    api.addEventListener("memoguard.step", onStep);
    api.addEventListener("memoguard.verdict", onVerdict);
    api.addEventListener("memoguard.mitigation", onMitigation);
    api.addEventListener("progress_text", onProgressText);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const created = nodeType.prototype.onNodeCreated;
    const configured = nodeType.prototype.onConfigure;
    const executed = nodeType.prototype.onExecuted;
    if (PANEL_NODES.includes(nodeData.name)) {
      const addCustomWidget = nodeType.prototype.addCustomWidget;
      nodeType.prototype.addCustomWidget = function (widget) {
        const added = addCustomWidget.apply(this, arguments);
        if (widget?.name === PROGRESS_WIDGET) hideProgressWidget(widget, added);
        return added;
      };
    }
    if (nodeData.name === MONITOR) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardChart = panel(this, "memoguard_chart", 120);
        this.properties ??= {};
        this.properties.memoguard ??= emptyTrace();
        drawChart(this);
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        requestAnimationFrame(() => drawChart(this));
      };
    } else if (nodeData.name === TOKENS) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardTokens = panel(this, "memoguard_tokens", 90);
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        drawTokens(this);
      };
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        if (output?.memoguard_tokens?.[0]) {
          this.properties.memoguard_tokens = JSON.parse(output.memoguard_tokens[0]);
          drawTokens(this);
        }
      };
    } else if (nodeData.name === SCORE) {
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        restoreFromScore(output);
      };
    } else if (nodeData.name === EVIDENCE) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardEvidence = panel(this, "memoguard_evidence", 70);
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        drawEvidence(this);
      };
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        if (output?.memoguard_evidence?.[0]) {
          this.properties.memoguard_evidence = JSON.parse(output.memoguard_evidence[0]);
          drawEvidence(this);
        }
      };
    } else if (nodeData.name === FILTER_REPORT) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardFilterReport = panel(this, "memoguard_filter_report", 60);
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        showFilterReport(this);
      };
      nodeType.prototype.onExecuted = function (output) {
        executed?.apply(this, arguments);
        if (output?.memoguard_filter_report?.[0] !== undefined) {
          this.properties.memoguard_filter_report = output.memoguard_filter_report[0];
          showFilterReport(this);
        }
      };
    } else if (nodeData.name === MITIGATION) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardMitigation = panel(this, "memoguard_mitigation", 40);
        Object.assign(this.memoguardMitigation.style, { display: "block", overflowY: "auto" });
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        showMitigation(this);
      };
    }
  },
});

// for tests and the static harness page (tests/comfyui/chart_harness.html)
export const memoguardChart = { drawCanvas, drawInfo, drawChart, niceTicks, clean, emptyTrace, hideProgressWidget };
