// Drives ComfyUI's own front end in Chromium: opens one of the pack's workflow templates the way the template
// browser does (listed by /api/workflow_templates, fetched from /api/workflow_templates/<pack>/<name>.json,
// loaded as a graph), reports node types the front end does not know and the API prompt it would queue, sets
// the steps, queues it from the page and waits for MemoGuard's panel to fill.
// Usage: node browser_check.mjs URL PACK TEMPLATE SELECTOR SCREENSHOT.png STEPS
// Needs playwright-core (NODE_PATH) and a Chromium binary (CHROMIUM, default /usr/bin/chromium).
import { createRequire } from "node:module";

const { chromium } = createRequire(import.meta.url)("playwright-core"); // require() honours NODE_PATH

const [url, pack, template, selector, screenshot, steps] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
                                        args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => { if (/memoguard/i.test(String(e.stack))) errors.push(String(e.stack)); });
  page.on("console", (m) => { if (m.type() === "error" && /memoguard/i.test(m.text())) errors.push(m.text()); });
  await page.goto(url, { timeout: 180000 });
  await page.waitForFunction(() => window.app?.graph && window.app.vueAppReady !== false, null, { timeout: 120000 });
  const loaded = await page.evaluate(async ([pack, template, steps]) => {
    const listed = (await (await fetch("/api/workflow_templates")).json())[pack] ?? [];
    const workflow = await (await fetch(`/api/workflow_templates/${pack}/${template}.json`)).json();
    await window.app.loadGraphData(workflow, true, true, template);
    const nodes = window.app.graph._nodes;
    const missing = nodes.filter((n) => !window.LiteGraph.registered_node_types[n.type]).map((n) => n.type);
    const prompt = (await window.app.graphToPrompt()).output;
    for (const w of nodes.flatMap((n) => n.widgets ?? [])) if (w.name === "steps") w.value = Number(steps);
    return { listed, missing, prompt, nodes: nodes.length };
  }, [pack, template, steps]);
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
  await page.evaluate(() => { window.app.canvas.ds.scale = 0.7; window.app.canvas.setDirty(true, true); });
  await page.waitForTimeout(1000);
  await page.screenshot({ path: screenshot });
  const text = await page.evaluate((sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent).join(" | "), selector);
  const panels = await page.evaluate(() => [...document.querySelectorAll(".memoguard-panel")].map((e) => e.textContent));
  const state = await page.evaluate(() => window.app.graph._nodes
    .filter((n) => n.properties?.memoguard || n.properties?.memoguard_tokens || n.properties?.memoguard_mitigation)
    .map((n) => ({ type: n.type, memoguard: n.properties.memoguard, tokens: n.properties.memoguard_tokens,
                   mitigation: n.properties.memoguard_mitigation })));
  console.log(JSON.stringify({ ...loaded, text, panels, state, errors }));
  if (errors.length) process.exitCode = 2;
} finally {
  await browser.close();
}
