// The Monitor chart and token panel of js/memoguard.js in Chromium, without ComfyUI: stand-ins for ComfyUI's
// app/api modules, a fake node class, and the pack's websocket events as the backend sends them (contract:
// memoguard.step {node, run, step, total, score[], sigma, band [median, high] | null, window, threshold, label},
// memoguard.verdict {node, run, flagged, summary, verdicts[], notes[]}). Checks canvas pixels where the band,
// the single point and the threshold must be, that the progress-text widget takes no height, the no-band and
// unavailable texts, and the long token list. Usage: node chart_harness.mjs [SCREENSHOT.png]
// Needs playwright-core (NODE_PATH) and Chromium (CHROMIUM, default /usr/bin/chromium).
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

const { chromium } = createRequire(import.meta.url)("playwright-core");
const js = readFileSync(fileURLToPath(new URL("../../js/memoguard.js", import.meta.url)), "utf8");
const screenshot = process.argv[2];

const PAGE = `<!doctype html><html><body style="background:#353535;color:#ddd;margin:8px;font:12px sans-serif">
<div id="grid" style="display:grid;grid-template-columns:repeat(3,340px);gap:10px"></div>
<script>window.errs = []; window.addEventListener("error", (e) => window.errs.push(e.message + " " + e.lineno + ":" + e.colno));</script>
<script type="module">
import { app, api } from "/scripts/app.js";
await import("/extensions/memoguard/memoguard.js");
const ext = app.extensions[0];
window.nodes = {};
class FakeNode {
  constructor() { this.widgets = []; this.properties = {}; }
  addCustomWidget(w) { this.widgets.push(w); return w; }
  addDOMWidget(name, type, element, options) {
    const box = document.createElement("div");
    Object.assign(box.style, { width: "320px", height: (this.panelHeight ?? 200) + "px", background: "#222", border: "1px solid #555" });
    const title = document.createElement("div"); title.textContent = this.caption; box.before?.(title);
    this.box.append(title, box); box.append(element);
    const w = { name, type, element, options }; this.widgets.push(w); return w;
  }
}
const types = {};
for (const name of ["MemoGuardMemorizationMonitor", "MemoGuardTokenContributions"]) {
  types[name] = class extends FakeNode {};
  await ext.beforeRegisterNodeDef(types[name], { name });
}
ext.setup();
window.make = (id, type, caption, panelHeight) => {
  const node = new types[type]();
  Object.assign(node, { id, type, caption, panelHeight, box: document.createElement("div") });
  document.getElementById("grid").append(node.box);
  node.onNodeCreated();
  window.nodes[id] = node;
  return node;
};
window.send = (type, detail) => api.dispatchEvent(new CustomEvent(type, { detail }));
window.ready = true;
</script></body></html>`;

const APP = `export const api = new EventTarget();
export const app = { extensions: [], registerExtension(e) { this.extensions.push(e); },
                     graph: { getNodeById: (id) => window.nodes[id] ?? null } };`;

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium", args: ["--no-sandbox"] });
const failures = [];
const check = (ok, what) => { if (!ok) failures.push(what); };
try {
  const page = await browser.newPage({ viewport: { width: 1080, height: 760 }, deviceScaleFactor: 1 });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e.stack ?? e)));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  await page.route("http://mg.test/**", (route) => {
    const path = new URL(route.request().url()).pathname;
    const body = path === "/" ? PAGE : path === "/scripts/app.js" ? APP : path === "/scripts/api.js" ? "export { api } from './app.js';"
      : path === "/extensions/memoguard/memoguard.js" ? js : null;
    if (body === null) return route.fulfill({ status: 404, body: "" });
    route.fulfill({ status: 200, contentType: path === "/" ? "text/html" : "text/javascript", body });
  });
  await page.goto("http://mg.test/");
  await page.waitForFunction(() => window.ready === true, null, { timeout: 30000 });

  const result = await page.evaluate(() => {
    const M = "MemoGuardMemorizationMonitor";
    const out = {};
    const band = [[0.015, 0.022], [0.022, 0.03], [0.03, 0.042], [0.045, 0.06], [0.062, 0.08], [0.085, 0.11]];
    const a = [0.017, 0.025, 0.035, 0.05, 0.07, 0.0945], b = [0.04, 0.05, 0.06, 0.07, 0.08, 0.11];
    // 1. calibrated, two images, band at every step, verdict window 1
    const n1 = make(1, M, "calibrated: band, two images");
    for (let i = 0; i < 6; i++) {
      send("memoguard.step", { node: "1", run: 1, step: i, total: 6, score: [a[i], b[i]], sigma: 14 / (i + 1), band: band[i],
                               window: 1, threshold: 0.0232, label: i ? "flagged" : "flagged" });
      if (i === 0) send("memoguard.verdict", { node: "1", run: 1, flagged: true, summary: "ok: score 0.0170; LIKELY MEMORIZED: score 0.0400",
        verdicts: [{ available: true, score: 0.017, percentile: 45, threshold: 0.0232, flagged: false, reason: "first 1 step(s)", notes: [], label: "ok" },
                   { available: true, score: 0.04, percentile: 100, threshold: 0.0232, flagged: true, reason: "first 1 step(s)", notes: [], label: "flagged" }],
        notes: ["band measured at cfg 3.0, this run cfg 7.5"] });
    }
    send("progress_text", { nodeId: "1", text: "MemoGuard: ok: score 0.0170; LIKELY MEMORIZED: score 0.0400" });
    const d = n1.memoguardDrawn, ctx = n1.memoguardChart.querySelector("canvas").getContext("2d");

    if (typeof d.x !== "function") throw new Error(`chart not drawn: ${window.errs.join("; ")}`);
    const X = d.x, Y = d.y;
    const px = (x, y) => Array.from(ctx.getImageData(Math.round(x), Math.round(y), 1, 1).data);
    const xm = (X(3) + X(4)) / 2;
    out.bandInside = px(xm, Y((0.045 + 0.062) / 4 + (0.06 + 0.08) / 4));
    out.bandAbove = px(xm, Y(0.1));
    out.log = d.log;
    out.thresholdInWindow = px(X(0) + 3, Y(0.0232));
    out.thresholdLater = px(X(3), Y(0.0232));
    out.n1 = { drawn: d, text: n1.memoguardChart.textContent, dataset: { ...n1.memoguardChart.dataset } };
    // ComfyUI's progress-text widget arrives: hidden, no height
    const w = { name: "$$node-text-preview", options: {}, computeLayoutSize: () => ({ minHeight: 58 }) };
    n1.addCustomWidget(w);
    out.progressWidget = { hidden: w.hidden, visible: w.isVisible(), layout: w.computeLayoutSize() };
    // 2. uncalibrated
    const n2 = make(2, M, "uncalibrated");
    for (let i = 0; i < 6; i++) send("memoguard.step", { node: "2", run: 1, step: i, total: 6, score: [a[i] * 10], sigma: 1, band: null, window: 1, threshold: null, label: "uncalibrated" });
    send("memoguard.verdict", { node: "2", run: 1, flagged: false, summary: "uncalibrated: score 0.2638 (calibrate ...)",
      verdicts: [{ available: true, score: 0.2638, percentile: null, threshold: null, flagged: false, label: "uncalibrated",
                   reason: "no calibration for this model (key 3f2a...); calibrate it with the MemoGuard Calibrate node", notes: [] }], notes: [] });
    out.n2 = { drawn: n2.memoguardDrawn, text: n2.memoguardChart.textContent };
    // 3. cfg 1: unavailable, the backend's summary already says "score unavailable"
    const n3 = make(3, M, "cfg 1: unavailable");
    send("memoguard.verdict", { node: "3", run: 1, flagged: false,
      summary: "score unavailable: score unavailable at cfg 1: ComfyUI skips the unconditional pass; turn on 'force_uncond_at_cfg1'",
      verdicts: [{ available: false, score: null, percentile: null, threshold: null, flagged: false, label: "unavailable",
                   reason: "score unavailable at cfg 1: ComfyUI skips the unconditional pass; turn on 'force_uncond_at_cfg1'", notes: [] }], notes: [] });
    send("progress_text", { nodeId: "3", text: "MemoGuard: score unavailable: score unavailable at cfg 1: ComfyUI skips the unconditional pass; turn on 'force_uncond_at_cfg1'" });
    out.n3 = { drawn: n3.memoguardDrawn, text: n3.memoguardChart.textContent };
    // 4. one step so far
    const n4 = make(4, M, "one point");
    send("memoguard.step", { node: "4", run: 1, step: 0, total: 1, score: [0.03], sigma: 14.6, band: [0.015, 0.022], window: 1, threshold: 0.0232, label: "pending" });
    const d4 = n4.memoguardDrawn, ctx4 = n4.memoguardChart.querySelector("canvas").getContext("2d");
    out.onePoint = Array.from(ctx4.getImageData(Math.round(d4.x(0)), Math.round(d4.y(0.03)), 1, 1).data);
    out.n4 = { drawn: d4, text: n4.memoguardChart.textContent };
    // 5. calibrated, but the run is outside the band's range
    const n5 = make(5, M, "outside the calibrated range");
    for (let i = 0; i < 6; i++) send("memoguard.step", { node: "5", run: 1, step: i, total: 6, score: [a[i]], sigma: 50, band: null, window: 2, threshold: 0.0232, label: "ok" });
    send("memoguard.verdict", { node: "5", run: 1, flagged: false, summary: "ok", notes: ["benign band not drawn: it was sampled at cfg 7.5, this run uses cfg 3"],
      verdicts: [{ available: true, score: 0.021, percentile: 90, threshold: 0.0232, flagged: false, label: "ok", reason: "first 2 step(s)", notes: [] }] });
    out.n5 = { drawn: n5.memoguardDrawn, text: n5.memoguardChart.textContent };
    // 6. 120 tokens
    const n6 = make(6, "MemoGuardTokenContributions", "120 tokens", 150);
    const tokens = Array.from({ length: 120 }, (_, i) => `word${i}`);
    const shares = tokens.map((_, i) => (i % 7 + 1) / 480);
    n6.onExecuted({ memoguard_tokens: [JSON.stringify({ tokens, shares, scores: shares })] });
    const chips = [...n6.memoguardTokens.querySelectorAll(".memoguard-token")];
    const box = n6.memoguardTokens.querySelector(".memoguard-chips").getBoundingClientRect();
    out.tokens = { chips: chips.length, visible: chips.filter((c) => c.getBoundingClientRect().bottom <= box.bottom + 1).length,
                   scrolls: n6.memoguardTokens.querySelector(".memoguard-chips").scrollHeight > box.height,
                   header: n6.memoguardTokens.firstChild.textContent };
    return out;
  });
  if (screenshot) await page.screenshot({ path: screenshot });
  const isBand = (p) => p[3] > 40 && p[2] > p[0];
  check(isBand(result.bandInside), `band pixel inside median..high: ${result.bandInside}`);
  check(result.bandAbove[3] < 30, `no band above high: ${result.bandAbove}`);
  check(result.thresholdInWindow[0] > 200 && result.thresholdInWindow[1] < 120, `threshold in the window: ${result.thresholdInWindow}`);
  check(!(result.thresholdLater[0] > 200 && result.thresholdLater[1] < 120), `no threshold after the window: ${result.thresholdLater}`);
  check(result.n1.drawn.bandSteps === 6 && result.n1.drawn.points === 12, `calibrated chart: ${JSON.stringify(result.n1.drawn)}`);
  check(result.n1.text.includes("band measured at cfg 3.0"), "notes shown");
  check(!result.n1.text.includes("LIKELY MEMORIZED: score 0.0400"), "the progress text repeating the summary is not shown again");
  check(result.progressWidget.hidden && !result.progressWidget.visible && result.progressWidget.layout.minHeight === 0, "progress widget hidden");
  check(/uncalibrated/.test(result.n2.drawn.message ?? "") && result.n2.drawn.bandSteps === 0, `uncalibrated says so: ${result.n2.drawn.message}`);
  check((result.n3.text.match(/score unavailable/gi) ?? []).length === 1 && result.n3.drawn.message?.includes("unavailable"), `cfg 1 text once: ${result.n3.text}`);
  check(result.onePoint[3] > 200 && result.n4.drawn.points === 1, `single point drawn: ${result.onePoint}`);
  check(/cfg 7.5/.test(result.n5.drawn.message ?? "") && result.n5.drawn.bandSteps === 0, `no band outside range: ${result.n5.drawn.message}`);
  check(result.tokens.chips === 120 && result.tokens.scrolls && result.tokens.header.startsWith("120 tokens"), `tokens: ${JSON.stringify(result.tokens)}`);
  check(errors.length === 0, `page errors: ${errors.join("\n")}`);
  console.log(JSON.stringify({ failures, result }, null, 1));
  if (failures.length) process.exitCode = 1;
} finally {
  await browser.close();
}
