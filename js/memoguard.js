// MemoGuard front end: a live score chart on the Memorization Monitor, coloured tokens on Token Contributions.
// Data arrives as the pack's websocket events (memoguard.step / .verdict / .mitigation) while sampling, and as
// node outputs (memoguard_trace, memoguard_tokens) that ComfyUI re-sends for cached runs. The last data is kept
// in node.properties so a saved workflow shows it again when reloaded.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const MONITOR = "MemoGuardMemorizationMonitor";
const SCORE = "MemoGuardMemorizationScore";
const TOKENS = "MemoGuardTokenContributions";
const MITIGATION = "MemoGuardEmbeddingMinimization";

function nodeById(id) {
  if (id === null || id === undefined) return null;
  const last = String(id).split(":").pop(); // nodes inside subgraphs arrive as "outer:inner"
  return app.graph?.getNodeById(Number(last)) ?? null;
}

function panel(node, name, height) {
  const el = document.createElement("div");
  el.className = "memoguard-panel";
  Object.assign(el.style, { width: "100%", height: `${height}px`, overflow: "auto", font: "12px sans-serif",
                            color: "var(--input-text, #ddd)", boxSizing: "border-box", padding: "4px" });
  const widget = node.addDOMWidget(name, "memoguard", el, { serialize: false, hideOnZoom: false, getMinHeight: () => height });
  widget.serialize = false; // the graph's widgets_values: the front end reads this flag, not the option
  return el;
}

// -- Monitor chart ---------------------------------------------------------------------------------------
function emptyTrace() {
  return { run: null, steps: [], scores: [], threshold: null, total: null, summary: "", flagged: false };
}

function drawChart(node) {
  const state = node.properties.memoguard;
  const el = node.memoguardChart;
  if (!el || !state) return;
  const canvas = el.querySelector("canvas") ?? el.appendChild(document.createElement("canvas"));
  const label = el.querySelector(".memoguard-summary") ?? el.appendChild(Object.assign(document.createElement("div"), { className: "memoguard-summary" }));
  canvas.width = Math.max(200, el.clientWidth - 8);
  canvas.height = 90;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const values = state.scores.flat().filter(Number.isFinite);
  if (Number.isFinite(state.threshold)) values.push(state.threshold);
  const top = values.length ? Math.max(...values) * 1.15 : 1;
  const n = Math.max(state.total ?? state.steps.length, 2);
  const x = (i) => 4 + (canvas.width - 8) * i / (n - 1);
  const y = (v) => canvas.height - 4 - (canvas.height - 8) * v / top;
  if (Number.isFinite(state.threshold)) {
    ctx.strokeStyle = "#e04040"; ctx.setLineDash([5, 4]); ctx.beginPath();
    ctx.moveTo(0, y(state.threshold)); ctx.lineTo(canvas.width, y(state.threshold)); ctx.stroke(); ctx.setLineDash([]);
  }
  const colors = ["#4287f5", "#f58230", "#3cb44b", "#e6194b", "#911eb4", "#46f0f0"];
  const images = state.scores.length ? state.scores[0].length : 0;
  for (let b = 0; b < images; b++) {
    ctx.strokeStyle = colors[b % colors.length]; ctx.lineWidth = 2; ctx.beginPath();
    state.scores.forEach((row, i) => { const px = x(state.steps[i]), py = y(row[b]); i ? ctx.lineTo(px, py) : ctx.moveTo(px, py); });
    ctx.stroke();
  }
  label.textContent = state.summary || (state.steps.length ? `step ${state.steps.at(-1) + 1}/${state.total ?? "?"}` : "waiting for a sampler run");
  label.style.color = state.flagged ? "#ff6060" : "";
  label.dataset.flagged = String(state.flagged);
}

function monitorState(node, run) {
  let state = node.properties.memoguard;
  if (!state || (run !== undefined && state.run !== run)) {
    state = node.properties.memoguard = { ...emptyTrace(), run: run ?? null };
  }
  return state;
}

function onStep({ detail }) {
  const node = nodeById(detail.node);
  if (!node || node.type !== MONITOR) return;
  const state = monitorState(node, detail.run);
  state.steps.push(detail.step); state.scores.push(detail.score);
  state.threshold = detail.threshold; state.total = detail.total;
  drawChart(node);
}

function onVerdict({ detail }) {
  const node = nodeById(detail.node);
  if (!node || node.type !== MONITOR) return;
  const state = monitorState(node, detail.run);
  state.summary = detail.summary; state.flagged = detail.flagged;
  drawChart(node);
}

function restoreFromScore(output) {
  // The Score node's output carries the whole trace; ComfyUI re-sends it when the graph is cached.
  const raw = output?.memoguard_trace?.[0];
  if (!raw) return;
  const data = JSON.parse(raw);
  const node = nodeById(data.node);
  if (!node || node.type !== MONITOR) return;
  const rms = data.trace.rms; // per image, per step
  node.properties.memoguard = {
    run: data.run, steps: data.trace.steps, scores: data.trace.steps.map((_, i) => rms.map((img) => img[i])),
    threshold: data.threshold, total: data.trace.steps.length,
    summary: data.summary,
    flagged: data.verdicts.some((v) => v.flagged),
  };
  drawChart(node);
}

// -- Token colours --------------------------------------------------------------------------------------
function drawTokens(node) {
  const data = node.properties.memoguard_tokens;
  const el = node.memoguardTokens;
  if (!el || !data) return;
  el.replaceChildren();
  const top = Math.max(...data.shares, 1e-9);
  data.tokens.forEach((token, i) => {
    const share = data.shares[i];
    const span = document.createElement("span");
    span.className = "memoguard-token";
    span.textContent = `${token} ${(100 * share).toFixed(0)}%`;
    span.title = `score ${data.scores[i].toPrecision(3)}`;
    Object.assign(span.style, { display: "inline-block", margin: "2px", padding: "2px 5px", borderRadius: "4px",
                                color: "#fff", fontSize: "13px", background: `rgba(230, 25, 75, ${0.15 + 0.85 * share / top})` });
    el.appendChild(span);
  });
}

function onMitigation({ detail }) {
  const node = nodeById(detail.node);
  if (!node || node.type !== MITIGATION) return;
  node.properties.memoguard_mitigation = detail;
  const fmt = (xs) => xs.map((v) => v?.toFixed(4)).join(", ");
  node.memoguardMitigation.textContent = detail.ran
    ? `minimized: ${detail.iterations} iteration(s), score ${fmt(detail.before)} → ${fmt(detail.after)}`
    : `not run: ${detail.reason}`;
}

app.registerExtension({
  name: "memoguard.nodes",
  setup() {
    api.addEventListener("memoguard.step", onStep);
    api.addEventListener("memoguard.verdict", onVerdict);
    api.addEventListener("memoguard.mitigation", onMitigation);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const created = nodeType.prototype.onNodeCreated;
    const configured = nodeType.prototype.onConfigure;
    const executed = nodeType.prototype.onExecuted;
    if (nodeData.name === MONITOR) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardChart = panel(this, "memoguard_chart", 120);
        drawChart(this);
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        requestAnimationFrame(() => drawChart(this));
      };
    } else if (nodeData.name === TOKENS) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardTokens = panel(this, "memoguard_tokens", 80);
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
    } else if (nodeData.name === MITIGATION) {
      nodeType.prototype.onNodeCreated = function () {
        created?.apply(this, arguments);
        this.memoguardMitigation = panel(this, "memoguard_mitigation", 40);
      };
      nodeType.prototype.onConfigure = function () {
        configured?.apply(this, arguments);
        const detail = this.properties.memoguard_mitigation;
        if (detail) onMitigation({ detail: { ...detail, node: this.id } });
      };
    }
  },
});
