// Drives ComfyUI's own front end in Chromium: loads an example workflow, queues it from the page and waits
// for MemoGuard's panel to fill. Usage: node browser_check.mjs URL WORKFLOW.json SELECTOR SCREENSHOT.png
// Needs playwright-core (NODE_PATH) and a Chromium binary (CHROMIUM, default /usr/bin/chromium).
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const { chromium } = createRequire(import.meta.url)("playwright-core"); // require() honours NODE_PATH

const [url, workflowPath, selector, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
                                        args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => { if (/memoguard/i.test(String(e.stack))) errors.push(String(e.stack)); });
  page.on("console", (m) => { if (m.type() === "error" && /memoguard/i.test(m.text())) errors.push(m.text()); });
  await page.goto(url, { timeout: 180000 });
  await page.waitForFunction(() => window.app?.graph && window.app.vueAppReady !== false, null, { timeout: 120000 });
  const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
  await page.evaluate(async (wf) => { await window.app.loadApiJson(wf, "memoguard"); }, workflow);
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
  await page.evaluate(() => { window.app.canvas.ds.scale = 0.8; window.app.canvas.setDirty(true, true); });
  await page.waitForTimeout(1000);
  await page.screenshot({ path: screenshot });
  const text = await page.evaluate((sel) => [...document.querySelectorAll(sel)].map((e) => e.textContent).join(" | "), selector);
  const state = await page.evaluate(() => window.app.graph._nodes.filter((n) => n.properties?.memoguard || n.properties?.memoguard_tokens)
    .map((n) => ({ type: n.type, memoguard: n.properties.memoguard, tokens: n.properties.memoguard_tokens })));
  console.log(JSON.stringify({ text, state, errors }));
  if (errors.length) process.exitCode = 2;
} finally {
  await browser.close();
}
