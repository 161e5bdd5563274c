// The golden vectors through the real nca.wasm (the file the page loads), under Node: the
// same bytes, the same exported functions. NCA_WEB_DIR names a folder `nca-cli web` wrote
// (or set NCA_WEB_WASM to the .wasm itself).
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";

const here = new URL(".", import.meta.url).pathname;
const TESTDATA = join(here, "..", "..", "testdata");
const WASM = process.env.NCA_WEB_WASM || join(process.env.NCA_WEB_DIR || "", "nca.wasm");

/** The F32 tensors of a safetensors file, by name. */
function tensors(bytes) {
  const n = Number(Buffer.from(bytes).readBigUInt64LE(0));
  const header = JSON.parse(Buffer.from(bytes.subarray(8, 8 + n)).toString("utf8"));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    assert.equal(t.dtype, "F32", name);
    const [a, b] = t.data_offsets;
    const copy = bytes.slice(8 + n + a, 8 + n + b);
    out[name] = { shape: t.shape, data: new Float32Array(copy.buffer, copy.byteOffset, (b - a) / 4) };
  }
  return out;
}

const golden = readdirSync(TESTDATA).filter((f) => /^golden_.*\.safetensors$/.test(f)).sort();

test("there are golden files to check", () => {
  assert.ok(golden.length >= 7, golden.join(", "));
});

test("nca.wasm reproduces every golden next_state", async () => {
  const { instance } = await WebAssembly.instantiate(readFileSync(WASM), {});
  const w = instance.exports;
  for (const name of golden) {
    const bytes = new Uint8Array(readFileSync(join(TESTDATA, name)));
    const want = tensors(bytes).next_state;
    const ptr = w.nca_alloc(bytes.length);
    new Uint8Array(w.memory.buffer).set(bytes, ptr);
    const status = w.nca_load(ptr, bytes.length);
    w.nca_free(ptr, bytes.length);
    const error = new TextDecoder().decode(new Uint8Array(w.memory.buffer, w.nca_error_ptr(), w.nca_error_len()));
    assert.equal(status, 0, `${name}: ${error}`);
    assert.deepEqual([0, 1, 2, 3].map((i) => w.nca_dim(i)), want.shape, name);
    assert.equal(w.nca_step_exact(), 0, name);
    const got = new Float32Array(w.memory.buffer, w.nca_state_ptr(), w.nca_state_len());
    let max = 0;
    for (let i = 0; i < got.length; i++) max = Math.max(max, Math.abs(got[i] - want.data[i]));
    assert.equal(got.length, want.data.length);
    assert.ok(max < 1e-5, `${name}: max |Δ| = ${max}`);
    console.log(`${name}: max |Δ| = ${max.toExponential(2)}`);
  }
  // A file that is not safetensors is an error with a message, not a trap.
  const bad = new TextEncoder().encode("nope");
  const p = w.nca_alloc(bad.length);
  new Uint8Array(w.memory.buffer).set(bad, p);
  assert.equal(w.nca_load(p, bad.length), -1);
  const message = new TextDecoder().decode(new Uint8Array(w.memory.buffer, w.nca_error_ptr(), w.nca_error_len()));
  assert.match(message, /safetensors/);
});
