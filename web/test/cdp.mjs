// A minimal Chrome DevTools Protocol client over --remote-debugging-pipe: Chromium reads
// commands from fd 3 and writes replies and events to fd 4, NUL-separated JSON. No npm
// package, no WebSocket, no port: nothing to download and nothing else can connect.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const FLAGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-default-apps", "--disable-extensions", "--mute-audio", "--no-default-browser-check",
  "--remote-debugging-pipe", "--window-size=1200,900",
];

export class Browser {
  static launch(executable = process.env.CHROMIUM || "/usr/bin/chromium") {
    const profile = mkdtempSync(join(tmpdir(), "nca-chromium-"));
    const proc = spawn(executable, [...FLAGS, `--user-data-dir=${profile}`, "about:blank"], {
      stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"],
    });
    return new Browser(proc, profile);
  }

  constructor(proc, profile) {
    this.proc = proc;
    this.profile = profile;
    this.nextId = 1;
    this.pending = new Map();
    this.listeners = [];
    this.stderr = "";
    this.exited = new Promise((resolve) => proc.on("exit", resolve));
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (s) => { this.stderr = (this.stderr + s).slice(-4000); });
    const incoming = proc.stdio[4];
    incoming.setEncoding("utf8");
    let buffer = "";
    incoming.on("data", (chunk) => {
      buffer += chunk;
      let end;
      while ((end = buffer.indexOf("\0")) >= 0) {
        const message = JSON.parse(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        this.dispatch(message);
      }
    });
    proc.on("exit", (code) => {
      for (const { reject } of this.pending.values()) {
        reject(new Error(`chromium exited (${code}): ${this.stderr}`));
      }
      this.pending.clear();
    });
  }

  dispatch(message) {
    if (message.id !== undefined) {
      const waiter = this.pending.get(message.id);
      if (!waiter) return;
      this.pending.delete(message.id);
      if (message.error) waiter.reject(new Error(`${waiter.method}: ${message.error.message}`));
      else waiter.resolve(message.result);
    } else {
      for (const listener of this.listeners) listener(message);
    }
  }

  /** Sends one command; every command is bounded by `timeoutMs`. */
  send(method, params = {}, sessionId = undefined, timeoutMs = 30000) {
    const id = this.nextId++;
    const payload = JSON.stringify({ id, method, params, ...(sessionId ? { sessionId } : {}) });
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new Error(`${method}: no answer in ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, {
        method,
        resolve: (v) => { clearTimeout(timer); resolve(v); },
        reject: (e) => { clearTimeout(timer); reject(e); },
      });
      this.proc.stdio[3].write(payload + "\0");
    });
  }

  /** A new tab, attached, with a fixed viewport; returns a Page. */
  async newPage(width = 1100, height = 760) {
    const { targetId } = await this.send("Target.createTarget", { url: "about:blank" });
    const { sessionId } = await this.send("Target.attachToTarget", { targetId, flatten: true });
    const page = new Page(this, sessionId);
    this.listeners.push((m) => { if (m.sessionId === sessionId) page.event(m); });
    await page.send("Page.enable");
    await page.send("Runtime.enable");
    await page.send("Network.enable");
    await page.send("Emulation.setDeviceMetricsOverride", { width, height, deviceScaleFactor: 1, mobile: false });
    return page;
  }

  async close() {
    try { await this.send("Browser.close", {}, undefined, 5000); } catch { /* already gone */ }
    const killer = setTimeout(() => this.proc.kill("SIGKILL"), 5000);
    await this.exited;
    clearTimeout(killer);
    rmSync(this.profile, { recursive: true, force: true });
  }
}

export class Page {
  constructor(browser, sessionId) {
    this.browser = browser;
    this.sessionId = sessionId;
    this.requests = [];
    this.exceptions = [];
  }

  event(m) {
    if (m.method === "Network.requestWillBeSent") this.requests.push(m.params.request.url);
    if (m.method === "Runtime.exceptionThrown") this.exceptions.push(m.params.exceptionDetails.text + " " + (m.params.exceptionDetails.exception?.description ?? ""));
  }

  send(method, params = {}, timeoutMs) {
    return this.browser.send(method, params, this.sessionId, timeoutMs);
  }

  /** The value of a JavaScript expression in the page. */
  async eval(expression) {
    const r = await this.send("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
    if (r.exceptionDetails) throw new Error(`${expression}: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text}`);
    return r.result.value;
  }

  async goto(url) {
    await this.send("Page.navigate", { url });
  }

  /** Polls `expression` until it is truthy; fails after `timeoutMs`. */
  async waitFor(expression, timeoutMs, what = expression) {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const v = await this.eval(expression);
      if (v) return v;
      if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  async mouse(type, x, y, buttons = 1) {
    await this.send("Input.dispatchMouseEvent", {
      type, x, y, button: "left", buttons: type === "mouseReleased" ? 0 : buttons, clickCount: 1,
    });
  }

  /** A real click (press and release) at the centre of the element with this id. */
  async click(id) {
    const r = await this.eval(`(() => { const b = document.getElementById(${JSON.stringify(id)}).getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2]; })()`);
    await this.mouse("mousePressed", r[0], r[1]);
    await this.mouse("mouseReleased", r[0], r[1]);
  }

  async screenshot() {
    const { data } = await this.send("Page.captureScreenshot", { format: "png" });
    return Buffer.from(data, "base64");
  }
}
