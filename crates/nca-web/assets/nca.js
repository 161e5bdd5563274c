// The page's glue: loads nca.wasm (the Rust rule) and weights.safetensors, runs steps on a
// timer, draws the state, and turns pointer drags into erasures. All of the math is in the
// wasm module (crates/nca-web); this file only moves bytes and handles the controls.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const targetCanvas = $("target");
  // What the browser test reads besides the DOM: whether loading finished, and why not.
  const page = { ready: false, error: null };
  window.ncaPage = page;

  function fail(message) {
    page.error = message;
    $("error").textContent = "Cannot run the rule: " + message;
    document.body.classList.add("failed");
  }

  async function fetchBytes(name) {
    let response;
    try {
      response = await fetch(name, { cache: "no-store" });
    } catch (e) {
      throw new Error(`cannot fetch ${name}: ${e.message} (serve this folder over HTTP, e.g. nca-cli web … --serve)`);
    }
    if (!response.ok) {
      throw new Error(`cannot fetch ${name}: HTTP ${response.status} ${response.statusText}`);
    }
    return new Uint8Array(await response.arrayBuffer());
  }

  async function start() {
    const [wasmBytes, weights] = await Promise.all([fetchBytes("nca.wasm"), fetchBytes("weights.safetensors")]);
    const { instance } = await WebAssembly.instantiate(wasmBytes, {});
    const w = instance.exports;
    const bytes = () => new Uint8Array(w.memory.buffer);
    const errorText = () => new TextDecoder().decode(bytes().slice(w.nca_error_ptr(), w.nca_error_ptr() + w.nca_error_len()));

    const ptr = w.nca_alloc(weights.length);
    bytes().set(weights, ptr);
    const loaded = w.nca_load(ptr, weights.length);
    w.nca_free(ptr, weights.length);
    if (loaded !== 0) throw new Error("weights.safetensors: " + errorText());

    const H = w.nca_dim(2), W = w.nca_dim(3);
    grid.width = W; grid.height = H;
    targetCanvas.width = W; targetCanvas.height = H;
    // A readable scale: whole multiples of the grid, about 512 px across.
    const scale = Math.max(1, Math.floor(512 / Math.max(W, H)));
    grid.style.width = W * scale + "px"; grid.style.height = H * scale + "px";
    const ctx = grid.getContext("2d");
    const image = ctx.createImageData(W, H);
    const hasTarget = w.nca_target_rgba() !== 0;
    if (hasTarget) {
      const t = targetCanvas.getContext("2d").createImageData(W, H);
      t.data.set(bytes().subarray(w.nca_target_rgba(), w.nca_target_rgba() + W * H * 4));
      targetCanvas.getContext("2d").putImageData(t, 0, 0);
    } else {
      targetCanvas.parentElement.style.display = "none";
    }
    $("info").textContent = `${W}×${H} cells, ${w.nca_dim(1)} channels; per-step noise σ defaults to the training run's.`;

    let running = true, seed = 1, pending = 0, last = performance.now();
    const speed = $("speed"), sigma = $("sigma"), brush = $("brush");
    sigma.value = w.nca_sigma();

    function check(status) {
      if (status < 0) throw new Error(errorText());
    }
    function draw() {
      const p = w.nca_render();
      image.data.set(bytes().subarray(p, p + W * H * 4));
      ctx.putImageData(image, 0, 0);
      $("steps").textContent = String(w.nca_steps());
      const psnr = w.nca_psnr();
      $("psnr").textContent = Number.isNaN(psnr) ? "n/a" : psnr.toFixed(1) + " dB";
    }
    function labels() {
      $("speed-value").textContent = speed.value + " steps/s";
      $("sigma-value").textContent = Number(sigma.value).toFixed(3);
      $("brush-value").textContent = brush.value + " cells";
    }
    function setRunning(on) {
      running = on;
      $("pause").textContent = on ? "Pause" : "Play";
      $("step").disabled = on;
      pending = 0;
      last = performance.now();
    }
    function reset() {
      check(w.nca_reset(seed++));
      draw();
    }

    $("pause").addEventListener("click", () => setRunning(!running));
    $("step").addEventListener("click", () => { check(w.nca_step(1)); draw(); });
    $("reset").addEventListener("click", reset);
    speed.addEventListener("input", labels);
    sigma.addEventListener("input", () => { w.nca_set_sigma(Number(sigma.value)); labels(); });
    brush.addEventListener("input", labels);

    // The brush: every pointer position while pressed erases a disc, and so does the path
    // between two positions, so a quick drag leaves no gaps.
    let lastCell = null;
    function cellAt(e) {
      const r = grid.getBoundingClientRect();
      return [((e.clientX - r.left) / r.width) * W, ((e.clientY - r.top) / r.height) * H];
    }
    function eraseTo(cell) {
      const radius = Number(brush.value);
      const from = lastCell || cell;
      const n = Math.max(1, Math.ceil(Math.hypot(cell[0] - from[0], cell[1] - from[1]) / (radius / 2)));
      for (let i = 1; i <= n; i++) {
        const t = i / n;
        check(w.nca_erase(from[0] + (cell[0] - from[0]) * t, from[1] + (cell[1] - from[1]) * t, radius));
      }
      lastCell = cell;
      draw();
    }
    grid.addEventListener("pointerdown", (e) => {
      grid.setPointerCapture(e.pointerId);
      lastCell = null;
      eraseTo(cellAt(e));
    });
    grid.addEventListener("pointermove", (e) => { if (lastCell) eraseTo(cellAt(e)); });
    const up = () => { lastCell = null; };
    grid.addEventListener("pointerup", up);
    grid.addEventListener("pointercancel", up);

    // Steps follow wall time at the chosen rate; at most a quarter second of catching up
    // per frame so that a slow machine stays responsive.
    function frame(now) {
      if (running) {
        const rate = Number(speed.value);
        pending = Math.min(pending + ((now - last) / 1000) * rate, rate / 4 + 1);
        const n = Math.floor(pending);
        if (n > 0) {
          pending -= n;
          check(w.nca_step(n));
          draw();
        }
      }
      last = now;
      requestAnimationFrame(frameSafe);
    }
    function frameSafe(now) {
      try { frame(now); } catch (e) { fail(e.message); }
    }

    labels();
    reset();
    // `?paused` opens the page on the noise, waiting for Play (the browser test uses it to
    // see the start).
    setRunning(!new URLSearchParams(location.search).has("paused"));
    page.ready = true;
    requestAnimationFrame(frameSafe);
  }

  start().catch((e) => fail(e && e.message ? e.message : String(e)));
})();
