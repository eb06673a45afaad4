// Drives ComfyUI's own front end in Chromium: opens one of the pack's workflow templates the way the template
// browser does (listed by /api/workflow_templates, fetched from /api/workflow_templates/<pack>/<name>.json,
// loaded as a graph), reports node types the front end does not know and the API prompt it would queue, sets
// the steps, queues it from the page and waits for MemoGuard's panel to fill. Then checks what a user sees: no
// MemoGuard node grew during the run (sizes after loading vs after the run: a grown node covers the one below),
// and on the Monitor the chart drew a point per recorded step and the band wherever the backend sent one.
// Usage: node browser_check.mjs URL PACK TEMPLATE SELECTOR SCREENSHOT.png STEPS [WIDGETS_JSON [EXPECT]]
//   WIDGETS_JSON: widget values to set by name before queueing, e.g. '{"cfg": 1}'
//   EXPECT: "band" (the Monitor must draw a benign band) or "unavailable" (it must say the score is unavailable)
// Writes SCREENSHOT.png (the canvas at 70 %) and SCREENSHOT_monitor.png (the Monitor node, 100 %), when present.
// Needs playwright-core (NODE_PATH) and a Chromium binary (CHROMIUM, default /usr/bin/chromium).
import { createRequire } from "node:module";

const { chromium } = createRequire(import.meta.url)("playwright-core"); // require() honours NODE_PATH

const [url, pack, template, selector, screenshot, steps, widgetsJson, expect] = process.argv.slice(2);
const overrides = widgetsJson ? JSON.parse(widgetsJson) : {};
const MEMOGUARD_NODES = /^MemoGuard/;
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
                                        args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => { if (/memoguard/i.test(String(e.stack))) errors.push(String(e.stack)); });
  page.on("console", (m) => { if (m.type() === "error" && /memoguard/i.test(m.text())) errors.push(m.text()); });
  await page.goto(url, { timeout: 180000 });
  await page.waitForFunction(() => window.app?.graph && window.app.vueAppReady !== false, null, { timeout: 120000 });
  const loaded = await page.evaluate(async ([pack, template, steps, overrides]) => {
    const listed = (await (await fetch("/api/workflow_templates")).json())[pack] ?? [];
    const workflow = await (await fetch(`/api/workflow_templates/${pack}/${template}.json`)).json();
    // the card's thumbnail: the front end asks for <name>.jpg next to the template
    const thumb = await fetch(`/api/workflow_templates/${pack}/${template}.jpg`);
    const thumbnail = { status: thumb.status, type: thumb.headers.get("content-type"), bytes: (await thumb.arrayBuffer()).byteLength };
    await window.app.loadGraphData(workflow, true, true, template);
    const nodes = window.app.graph._nodes;
    const missing = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
    const prompt = (await window.app.graphToPrompt()).output;
    for (const w of nodes.flatMap((n) => n.widgets ?? [])) {
      if (w.name === "steps") w.value = Number(steps);
      if (w.name in overrides) w.value = overrides[w.name];
    }
    return { listed, missing, prompt, nodes: nodes.length, thumbnail };
  }, [pack, template, steps, overrides]);
  // sizes once the front end has laid the loaded graph out (arrange runs on draw)
  const sizes = () => page.evaluate((pattern) => Object.fromEntries(window.app.graph._nodes
    .filter((n) => new RegExp(pattern).test(n.type))
    .map((n) => [n.id, [n.type, ...n.size.map(Math.round), Boolean(n.memoguardChart || n.memoguardTokens || n.memoguardMitigation),
                        Boolean(n.imgs?.length || n.images?.length),
                        (n.widgets ?? []).filter((w) => w.name === "$$node-text-preview" && !w.memoguardHidden).length]])),
    MEMOGUARD_NODES.source);
  await page.evaluate(() => window.app.canvas.setDirty(true, true));
  await page.waitForTimeout(1500);
  const before = await sizes();
  await page.evaluate(async () => { await window.app.queuePrompt(0, 1); });
  await page.waitForFunction((sel) => {
    const el = document.querySelector(sel);
    return el && el.textContent.trim().length > 0;
  }, selector, { timeout: 300000 });
  for (let busy = true; busy; await page.waitForTimeout(1000)) {  // until the whole prompt has run
    const queue = await page.evaluate(async () => (await fetch("/queue")).json());
    busy = queue.queue_running.length + queue.queue_pending.length > 0;
  }
  await page.keyboard.press("Escape"); // the first-run template dialog
  await page.waitForTimeout(1500);      // let late events (progress text, executed) land and the canvas redraw
  const after = await sizes();
  // a node with a MemoGuard panel must keep its size (an image preview, e.g. the Score node's plot, may grow its node
  // as ComfyUI's own preview nodes do: reported, not an error)
  const change = ([id, [type, w, h]]) => `${type} #${id}: ${before[id][1]}x${before[id][2]} -> ${w}x${h}`;
  const changed = Object.entries(after).filter(([id, [, , h]]) => before[id] && h > before[id][2]);
  const grown = changed.filter(([, [, , , panel, preview]]) => panel && !preview).map(change);
  const grownPreview = changed.filter(([, [, , , panel, preview]]) => !panel || preview).map(change);
  const progressShown = Object.entries(after).filter(([, [, , , panel, , shown]]) => panel && shown)
    .map(([id, [type]]) => `${type} #${id}: ComfyUI's progress-text widget is showing (the panel shows that text)`);
  const monitorShot = screenshot.replace(/\.png$/, "_monitor.png");
  const rect = await page.evaluate(() => {  // the Monitor node on screen at 100 %, placed at the top left
    const node = window.app.graph._nodes.find((n) => n.type === "MemoGuardMemorizationMonitor");
    if (!node) return null;
    const c = window.app.canvas, title = window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    // clear of the side bar and the tool bars, which newer front ends float over the canvas
    const at = [160, 130];
    c.ds.scale = 1; c.ds.offset[0] = at[0] - node.pos[0]; c.ds.offset[1] = at[1] + title - node.pos[1]; c.setDirty(true, true);
    const box = c.canvas.getBoundingClientRect();
    return { x: box.left + at[0] - 20, y: box.top + at[1] - 20, width: node.size[0] + 40, height: node.size[1] + title + 60 };
  });
  if (rect) { await page.waitForTimeout(800); await page.screenshot({ path: monitorShot, clip: rect }); }
  await page.evaluate(() => { window.app.canvas.ds.scale = 0.7; window.app.canvas.ds.offset[0] = 90; window.app.canvas.ds.offset[1] = 90; window.app.canvas.setDirty(true, true); });
  await page.waitForTimeout(1000);
  await page.screenshot({ path: screenshot });
  const charts = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.memoguardChart).map((n) => ({
    id: n.id, ...n.memoguardChart.dataset, text: n.memoguardChart.textContent,
    sentBand: (n.properties.memoguard?.band ?? []).filter(Boolean).length,
    recorded: (n.properties.memoguard?.scores ?? []).flat().filter(Number.isFinite).length,
    progressWidgets: (n.widgets ?? []).filter((w) => w.name === "$$node-text-preview" && !w.memoguardHidden).length })));
  const text = await page.evaluate((sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent).join(" | "), selector);
  const panels = await page.evaluate(() => [...document.querySelectorAll(".memoguard-panel")].map((e) => e.textContent));
  const state = await page.evaluate(() => window.app.graph._nodes
    .filter((n) => n.properties?.memoguard || n.properties?.memoguard_tokens || n.properties?.memoguard_mitigation
                   || n.properties?.memoguard_evidence)
    .map((n) => ({ type: n.type, memoguard: n.properties.memoguard, tokens: n.properties.memoguard_tokens,
                   mitigation: n.properties.memoguard_mitigation, evidence: n.properties.memoguard_evidence })));
  const problems = [...grown.map((g) => `node grew during the run: ${g}`), ...progressShown];
  if (loaded.thumbnail.status !== 200 || !/^image\//.test(loaded.thumbnail.type ?? "")) problems.push(`no thumbnail: ${JSON.stringify(loaded.thumbnail)}`);
  for (const c of charts) {
    if (Number(c.points) !== c.recorded) problems.push(`Monitor #${c.id}: ${c.points} points drawn for ${c.recorded} scores`);
    if (c.sentBand && Number(c.bandSteps) === 0) problems.push(`Monitor #${c.id}: band sent for ${c.sentBand} steps, none drawn`);
    if (c.progressWidgets) problems.push(`Monitor #${c.id}: ComfyUI's progress-text widget is showing`);
    if (expect === "band" && !(Number(c.bandSteps) > 0)) problems.push(`Monitor #${c.id}: no band drawn (${c.message})`);
    if (expect === "unavailable" && !/unavailable/i.test(c.text + c.message)) problems.push(`Monitor #${c.id}: does not say unavailable`);
  }
  console.log(JSON.stringify({ ...loaded, text, panels, state, errors, sizes: { before, after }, grownPreview, charts, problems }));
  if (errors.length) process.exitCode = 2;
  else if (problems.length) process.exitCode = 3;
} finally {
  await browser.close();
}
