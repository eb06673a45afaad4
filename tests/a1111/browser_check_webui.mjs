// Drives the WebUI's own page (A1111 or Forge) in Chromium as a user would: txt2img at 64x64, 3 Euler steps, the
// prompt given, the MemoGuard accordion opened and enabled with Explain tokens and Mitigation "always" (strategy and
// explanation method left at their defaults), Generate clicked; waits for MemoGuard's panel under the image, then
// screenshots the accordion and the panel.
// Usage: node browser_check_webui.mjs URL PROMPT SCREENSHOT.png
// Prints one JSON line: the strategy radio's choices and value, the controls' labels, the panel's text, the page
// errors that name MemoGuard.
// Needs playwright-core (NODE_PATH) and a Chromium binary (CHROMIUM, default /usr/bin/chromium).
import { createRequire } from "node:module";

const { chromium } = createRequire(import.meta.url)("playwright-core"); // require() honours NODE_PATH

const [url, prompt, screenshot] = process.argv.slice(2);
const P = "memoguard_accordion";
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
                                        args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1400 } });
  const errors = [];
  // MemoGuard's own errors only: A1111 1.10's page raises "reading 'props'" in gradio's Blocks on every Generate,
  // with or without the extension (checked on a WebUI without it)
  page.on("pageerror", (e) => { if (/memoguard/i.test(String(e.stack ?? e))) errors.push(String(e.stack ?? e)); });
  await page.goto(url, { timeout: 300000 });
  await page.waitForSelector("#txt2img_prompt textarea", { timeout: 300000 });
  await page.fill("#txt2img_prompt textarea", prompt);
  for (const [id, value] of [["txt2img_steps", 3], ["txt2img_width", 64], ["txt2img_height", 64]]) {
    const box = page.locator(`#${id} input[type=number]`);
    await box.fill(String(value));
    await box.press("Enter");
  }
  const accordion = page.locator(`#${P}_txt2img`);
  await accordion.scrollIntoViewIfNeeded();
  await accordion.locator(".label-wrap").first().click();
  await page.locator(`#${P}_enabled_txt2img input[type=checkbox]`).check();
  await page.locator(`#${P}_explain_txt2img input[type=checkbox]`).check();
  await page.locator(`#${P}_mitigation_txt2img label`, { hasText: "always" }).click();
  const strategy = await page.locator(`#${P}_strategy_txt2img`).evaluate((el) => ({
    choices: [...el.querySelectorAll("label")].map((l) => l.textContent.trim()),
    value: el.querySelector("input:checked")?.value ?? null }));
  const labels = await accordion.evaluate((el) =>
    [...el.querySelectorAll("[id^=memoguard_accordion_] span[data-testid=block-info], [id^=memoguard_accordion_] label > span")]
      .map((s) => s.textContent.trim()).filter(Boolean));
  await page.click("#txt2img_generate");
  const panel = page.locator(`#${P}_panel_txt2img`).first();  // gradio 3 gives its HTML wrapper the id too
  await page.waitForFunction((id) => /mitigation/i.test(document.querySelector(`#${id}`)?.textContent ?? ""),
                             `${P}_panel_txt2img`, { timeout: 600000 });
  await accordion.screenshot({ path: screenshot });
  await panel.screenshot({ path: screenshot.replace(/\.png$/, "_panel.png") });
  console.log(JSON.stringify({ strategy, labels, panel: (await panel.textContent()).trim(), errors }));
} finally {
  await browser.close();
}
