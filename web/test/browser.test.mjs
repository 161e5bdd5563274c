// The page in a real browser: headless Chromium (Debian's `chromium`) loads the folder
// `nca-cli web` wrote, served here on 127.0.0.1, and everything is judged from the canvas
// pixels: the trained picture grows from noise, a scripted mouse drag erases part of it and
// it grows back, and a bad or missing weights file shows an error instead of a blank page.
//
//   NCA_WEB_DIR=runs/cat-web node --test web/test/
//
// NCA_WEB_ARTIFACTS (default: NCA_WEB_DIR/../web-artifacts) receives the screenshots.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import { Browser } from "./cdp.mjs";

const DIR = process.env.NCA_WEB_DIR;
const ARTIFACTS = resolve(process.env.NCA_WEB_ARTIFACTS || join(DIR || ".", "..", "web-artifacts"));
const PSNR_DB = 30;
// Steps allowed to grow the picture from noise, and to regrow it after the erasure; the
// cat checkpoint's regrowth score is taken at 100 steps.
const GROW_STEPS = 300;
const REGROW_STEPS = 300;
const TYPES = { html: "text/html", js: "text/javascript", wasm: "application/wasm", safetensors: "application/octet-stream" };

let browser, server, base;
// Per-test replacements of the weights file: bytes, or null for 404.
const overrides = new Map();

before(async () => {
  assert.ok(DIR, "set NCA_WEB_DIR to a folder written by `nca-cli web`");
  for (const f of ["index.html", "nca.js", "nca.wasm", "weights.safetensors"]) {
    assert.ok(existsSync(join(DIR, f)), `${DIR} lacks ${f}`);
  }
  mkdirSync(ARTIFACTS, { recursive: true });
  server = createServer((req, res) => {
    const url = new URL(req.url, "http://127.0.0.1");
    const [, variant, name] = url.pathname.match(/^\/([a-z]+)\/([a-z.]*)$/) || [];
    const file = name || "index.html";
    let body = null;
    if (variant && overrides.has(`${variant}/${file}`)) body = overrides.get(`${variant}/${file}`);
    else if (variant && existsSync(join(DIR, file))) body = readFileSync(join(DIR, file));
    if (body === null) { res.writeHead(404, { "Content-Type": "text/plain" }); res.end("not found\n"); return; }
    res.writeHead(200, { "Content-Type": TYPES[file.split(".").pop()] || "application/octet-stream", "Cache-Control": "no-store" });
    res.end(body);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${server.address().port}`;
  browser = Browser.launch();
});

after(async () => {
  if (browser) await browser.close();
  if (server) server.close();
});

/** RGBA bytes of a canvas (its backing store: one pixel per cell). */
function pixels(page, id) {
  return page.eval(`(() => { const c = document.getElementById(${JSON.stringify(id)});
    return Array.from(c.getContext("2d").getImageData(0, 0, c.width, c.height).data); })()`);
}

/** PSNR (peak 1) over the RGB of the cells `keep(i)` selects. */
function psnr(a, b, keep = () => true) {
  let sum = 0, n = 0;
  for (let i = 0; i < a.length / 4; i++) {
    if (!keep(i)) continue;
    for (let c = 0; c < 3; c++) {
      const d = (a[4 * i + c] - b[4 * i + c]) / 255;
      sum += d * d;
      n++;
    }
  }
  return 10 * Math.log10(1 / Math.max(sum / n, 1e-10));
}

const steps = (page) => page.eval(`Number(document.getElementById("steps").textContent)`);

/** Waits until the canvas is within PSNR_DB of the target; returns [psnr, steps]. */
async function waitForPicture(page, target, maxSteps, what) {
  const deadline = Date.now() + 90000;
  for (;;) {
    const [p, s] = [psnr(await pixels(page, "grid"), target), await steps(page)];
    if (p >= PSNR_DB) return [p, s];
    assert.ok(s <= maxSteps, `${what}: ${p.toFixed(1)} dB after ${s} steps (needs ${PSNR_DB} dB within ${maxSteps})`);
    assert.ok(Date.now() < deadline, `${what}: timed out at ${p.toFixed(1)} dB, step ${s}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

test("the trained picture grows from noise, and regrows after a drag erases part of it", async () => {
  const page = await browser.newPage();
  await page.goto(`${base}/good/?paused`);
  await page.waitFor("window.ncaPage && (window.ncaPage.ready || window.ncaPage.error)", 30000, "the page to load");
  assert.equal(await page.eval("window.ncaPage.error"), null);
  const target = await pixels(page, "target");
  const [w, h] = await page.eval(`[document.getElementById("grid").width, document.getElementById("grid").height]`);
  assert.equal(target.length, w * h * 4);
  // A canvas that merely stays black or flat must not pass for the picture.
  const start = await pixels(page, "grid");
  assert.ok(psnr(start, target) < 20, `the start should be noise, not the picture (${psnr(start, target).toFixed(1)} dB)`);

  assert.equal(await steps(page), 0, "?paused opens paused");
  await page.click("pause"); // play
  const [grown, grownAt] = await waitForPicture(page, target, GROW_STEPS, "growing from noise");
  console.log(`grown from noise: ${grown.toFixed(1)} dB at step ${grownAt}`);
  const shownPsnr = await page.eval(`document.getElementById("psnr").textContent`);
  assert.match(shownPsnr, /^\d+\.\d dB$/);
  // Let it settle a little further, then pause with a real click.
  await new Promise((r) => setTimeout(r, 1000));
  await page.click("pause");
  writeFileSync(join(ARTIFACTS, "web-grown.png"), await page.screenshot());

  // Erase a band through the middle of the picture with a real mouse drag (radius 4 cells).
  const rect = await page.eval(`(() => { const b = document.getElementById("grid").getBoundingClientRect(); return [b.x, b.y, b.width, b.height]; })()`);
  const at = (cx, cy) => [rect[0] + (cx / w) * rect[2], rect[1] + (cy / h) * rect[3]];
  const from = at(w * 0.2, h * 0.5), to = at(w * 0.8, h * 0.5);
  await page.mouse("mousePressed", ...from);
  for (let i = 1; i <= 12; i++) {
    await page.mouse("mouseMoved", from[0] + ((to[0] - from[0]) * i) / 12, from[1] + ((to[1] - from[1]) * i) / 12);
  }
  await page.mouse("mouseReleased", ...to);
  const stepsAtErase = await steps(page);
  const erased = await pixels(page, "grid");
  // Cells well inside the band (within 3 of the line, between its ends).
  const band = (i) => {
    const [x, y] = [(i % w) + 0.5, Math.floor(i / w) + 0.5];
    return Math.abs(y - h * 0.5) <= 3 && x >= w * 0.2 && x <= w * 0.8;
  };
  const black = (i) => erased[4 * i] === 0 && erased[4 * i + 1] === 0 && erased[4 * i + 2] === 0;
  let inBand = 0, allBlack = true;
  for (let i = 0; i < w * h; i++) if (band(i)) { inBand++; allBlack &&= black(i); }
  assert.ok(inBand > 50, `band has ${inBand} cells`);
  assert.ok(allBlack, "every cell under the brush is zero (black)");
  const bandPsnr = psnr(erased, target, band);
  assert.ok(bandPsnr < 15, `the erased band differs from the target (${bandPsnr.toFixed(1)} dB)`);
  const whole = psnr(erased, target);
  assert.ok(whole < PSNR_DB, `after erasing, the whole picture is below ${PSNR_DB} dB (${whole.toFixed(1)})`);
  writeFileSync(join(ARTIFACTS, "web-erased.png"), await page.screenshot());

  // Paused really means paused.
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await steps(page), stepsAtErase);
  await page.click("pause"); // play
  const [regrown, regrownAt] = await waitForPicture(page, target, stepsAtErase + REGROW_STEPS, "regrowing");
  console.log(`erased band: ${bandPsnr.toFixed(1)} dB there, ${whole.toFixed(1)} dB overall; regrown: ${regrown.toFixed(1)} dB after ${regrownAt - stepsAtErase} steps`);
  const band2 = psnr(await pixels(page, "grid"), target, band);
  assert.ok(band2 > bandPsnr + 10, `the band itself grew back (${band2.toFixed(1)} dB)`);
  await new Promise((r) => setTimeout(r, 1500));
  writeFileSync(join(ARTIFACTS, "web-regrown.png"), await page.screenshot());

  // The step button and reset work while paused.
  await page.click("pause");
  const s0 = await steps(page);
  await page.click("step");
  await page.waitFor(`Number(document.getElementById("steps").textContent) === ${s0 + 1}`, 5000, "one step");
  await page.click("reset");
  await page.waitFor(`Number(document.getElementById("steps").textContent) === 0`, 5000, "reset");
  assert.ok(psnr(await pixels(page, "grid"), target) < 20, "reset shows noise again");

  assert.deepEqual(page.exceptions, []);
  const foreign = page.requests.filter((u) => !u.startsWith(base + "/"));
  assert.deepEqual(foreign, [], "the page fetches nothing but its own folder");
});

for (const [variant, bytes, expect] of [
  ["missing", null, /weights\.safetensors: HTTP 404/],
  ["garbage", Buffer.from("this is not a safetensors file"), /weights\.safetensors: .*safetensors/],
  ["truncated", null, /weights\.safetensors: /],
]) {
  test(`a ${variant} weights file shows an error on the page`, async () => {
    let body = bytes;
    if (variant === "truncated") {
      const good = readFileSync(join(DIR, "weights.safetensors"));
      body = good.subarray(0, Math.floor(good.length / 2));
    }
    overrides.set(`${variant}/weights.safetensors`, body);
    const page = await browser.newPage();
    await page.goto(`${base}/${variant}/`);
    await page.waitFor("window.ncaPage && (window.ncaPage.ready || window.ncaPage.error)", 30000, "the page to settle");
    assert.equal(await page.eval("window.ncaPage.ready"), false);
    const text = await page.eval(`document.getElementById("error").textContent`);
    const visible = await page.eval(`getComputedStyle(document.getElementById("error")).display !== "none" && document.getElementById("error").offsetHeight > 0`);
    assert.ok(visible, "the error box is shown");
    assert.match(text, expect);
    console.log(`${variant}: ${text}`);
    if (variant === "garbage") writeFileSync(join(ARTIFACTS, "web-error.png"), await page.screenshot());
  });
}
