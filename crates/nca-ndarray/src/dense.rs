//! The picture model (position inputs and/or the MLP update): per-cell attention in SIMD,
//! everything dense as blocked GEMMs over a chunk of cells.
//!
//! Work is split into the same units of whole rows as the fused kernel ([`Geometry`]);
//! a unit is processed as consecutive chunks of a few rows, each with its own one-row
//! halo above and below, so that a chunk's buffers stay in the core's cache and every
//! chunk is independent of every other. Matrices are feature-major: one row per feature,
//! one column per cell, the cells of a chunk contiguous. Per chunk:
//!
//! 1. `XP` = cell inputs `x = [s; p]` of the chunk's padded rows (zero outside the grid);
//!    `Q, K, V = W·XP + b` — three GEMMs `[D × (C+P)]·[(C+P) × cells]`; a border cell's
//!    zero input gives `K = bk`, `V = bv`, as zero padding implies.
//! 2. Per cell (eight cells per vector, like the fused kernel): scores with `pk`, softmax,
//!    `u = Σ a_n ṽ_n`, written into `UX = [U; X_c]`.
//! 3. `H = relu(W1·UX + b1)`, `F = Wo·H + bo` (without the MLP `F = Wo·U + bo`); the
//!    output is `s + F` (or `F`).
//! 4. Backward (train mode): `G_f = 2(next − target)/N` on visible channels;
//!    `dWo += G_f·Hᵀ`; `G_h = (Woᵀ·G_f) ⊙ [Z > 0]`; `dW1 += G_h·UXᵀ`, `db1 += Σ G_h`;
//!    `G_u = W1[:, :D]ᵀ·G_h` (without the MLP, `G_u = Woᵀ·G_f`, `dWo += G_f·Uᵀ`). No
//!    gradient flows into the state: the incoming state is a constant.
//! 5. Per cell, the attention backward gives `dz_n = s·a_n(g_u·ṽ_n − Σ_m a_m g_u·ṽ_m)`,
//!    `dq = Σ dz_n k̃_n`, `xk = Σ dz_n x_n` and `xv = Σ a_n x_n`, plus the `pk`, `pv` and
//!    bias gradients in vector lanes; then `dWq += DQ·X_cᵀ`, `dWk += Q·XKᵀ`,
//!    `dWv += G_u·XVᵀ` are GEMMs again.
//!
//! Determinism: units and chunks depend only on the grid shape, GEMMs accumulate a chunk
//! at a time into the unit's own gradient vector, and units are summed in order, so the
//! result does not depend on the thread count. Per-thread scratch is overwritten before
//! it is read.

// Index loops over compile-time widths are what unrolls and vectorises.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use std::sync::Mutex;

use rayon::prelude::*;

use nca_api::{FlatLayout, ModelConfig, NEIGHBOURS};

use crate::kernel::{Geometry, Mode, MAX_DIM};
use crate::simd::{Fused, MulAdd, Separate, F8, LANES};

/// Calls `$f::<D>` (or `$f_fma::<D>` on CPUs with AVX2 and FMA) with D a compile-time
/// constant for the common widths (0 = run-time).
macro_rules! dispatch {
    ($fast:expr, $d:expr, $f:ident, $f_fma:ident, ($($arg:expr),*)) => {{
        let d: usize = $d;
        if $fast {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller checked that the CPU supports AVX2 and FMA.
            unsafe {
                match d {
                    16 => $f_fma::<16>($($arg),*),
                    8 => $f_fma::<8>($($arg),*),
                    _ => $f_fma::<0>($($arg),*),
                }
            }
        } else {
            match d {
                16 => $f::<16>($($arg),*),
                8 => $f::<8>($($arg),*),
                _ => $f::<0>($($arg),*),
            }
        }
    }};
}

/// Declares `$name` (baseline) and `$name_fma` (AVX2 + FMA) around one inlined body.
macro_rules! twin_d {
    ($name:ident, $name_fma:ident, $body:ident, ($($p:ident: $t:ty),*)) => {
        fn $name<const D: usize>($($p: $t),*) {
            $body::<D, Separate>($($p),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name_fma<const D: usize>($($p: $t),*) {
            $body::<D, Fused>($($p),*)
        }
    };
}

/// Target number of cells in a chunk: large enough for efficient GEMMs, small enough
/// that a chunk's matrices (about 1.7 KB per cell for the default model) stay in L2.
const CHUNK_CELLS: usize = 256;

/// Offsets of the model's parameters in the flat vector ([`FlatLayout`]) and its widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseLayout {
    /// Channels C.
    pub c: usize,
    /// Visible channels V.
    pub v: usize,
    /// Attention width D.
    pub d: usize,
    /// Input width C + P.
    pub x: usize,
    /// Hidden width M (0 without the MLP).
    pub m: usize,
    wq: usize,
    bq: usize,
    wk: usize,
    bk: usize,
    wv: usize,
    bv: usize,
    wo: usize,
    bo: usize,
    /// `pk`, `pv` offsets, when the model has position embeddings.
    pkv: Option<(usize, usize)>,
    /// `w1`, `b1` offsets, when the model has the MLP.
    mlp: Option<(usize, usize)>,
    /// Number of parameters; the loss is kept in the slot after them.
    pub params: usize,
}

impl DenseLayout {
    /// The layout of `model`, or `None` if its parameter list lacks a projection.
    pub fn new(model: &ModelConfig) -> Option<Self> {
        let flat = FlatLayout::new(model);
        let at = |name: &str| flat.offset(name);
        let pkv = match (at("pk"), at("pv")) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => None,
        };
        let mlp = match (at("w1"), at("b1")) {
            (Some(w), Some(b)) => Some((w, b)),
            _ => None,
        };
        Some(Self {
            c: model.channels(),
            v: model.visible_channels,
            d: model.attention_dim,
            x: model.input_width(),
            m: model.mlp_hidden.unwrap_or(0),
            wq: at("wq")?,
            bq: at("bq")?,
            wk: at("wk")?,
            bk: at("bk")?,
            wv: at("wv")?,
            bv: at("bv")?,
            wo: at("wo")?,
            bo: at("bo")?,
            pkv,
            mlp,
            params: flat.len(),
        })
    }

    /// `pk`, `pv` offsets, when the model has position embeddings.
    pub fn pkv(&self) -> Option<(usize, usize)> {
        self.pkv
    }

    /// Length of a unit's gradient vector: the parameters, then the loss.
    fn partial_len(&self) -> usize {
        self.params + 1
    }
}

/// Number of lane accumulators of a unit: `bq bk bv` (D each), `pk pv` (9·D each), `bo`
/// (C), then the loss.
fn lanes_len(l: &DenseLayout) -> usize {
    3 * l.d + 2 * NEIGHBOURS * l.d + l.c + 1
}

/// One thread's chunk buffers (feature-major, `np` padded or `nc` interior cells wide).
#[derive(Default)]
struct Scratch {
    xp: Vec<f32>,
    qkv: Vec<f32>,
    ux: Vec<f32>,
    att: Vec<f32>,
    qc: Vec<f32>,
    h: Vec<f32>,
    gh: Vec<f32>,
    f: Vec<f32>,
    gf: Vec<f32>,
    gu: Vec<f32>,
    dq: Vec<f32>,
    xk: Vec<f32>,
    xv: Vec<f32>,
    lanes: Vec<F8>,
}

impl Scratch {
    fn ensure(&mut self, l: &DenseLayout, np: usize, nc: usize) {
        let (d, x) = (l.d, l.x);
        self.xp.resize(x * np, 0.0);
        self.qkv.resize(3 * d * np, 0.0);
        self.ux.resize((d + x) * nc, 0.0);
        self.att.resize(NEIGHBOURS * nc, 0.0);
        self.qc.resize(d * nc, 0.0);
        self.h.resize(l.m * nc, 0.0);
        self.gh.resize(l.m * nc, 0.0);
        self.f.resize(l.c * nc, 0.0);
        self.gf.resize(l.c * nc, 0.0);
        self.gu.resize(d * nc, 0.0);
        self.dq.resize(d * nc, 0.0);
        self.xk.resize(x * nc, 0.0);
        self.xv.resize(x * nc, 0.0);
        self.lanes.resize(lanes_len(l), F8::ZERO);
    }
}

/// Buffers of the picture-model path, reused across steps; resized only when the grid
/// changes.
pub struct DenseWorkspace {
    l: DenseLayout,
    octaves: Option<u32>,
    geo: Option<Geometry>,
    /// Rows per chunk.
    chunk_rows: usize,
    /// Position features `[P][H][W]` of the current grid.
    pos: Vec<f32>,
    /// Row-planar output `[B][H][C][wr]`.
    out: Vec<f32>,
    /// Row-planar attention `[B][H][9][wr]`.
    attention: Vec<f32>,
    /// One gradient vector (and loss) per unit.
    partials: Vec<f32>,
    /// Reduced gradients in [`FlatLayout`] order, then the loss.
    pub grads: Vec<f32>,
    scratch: Vec<Mutex<Scratch>>,
}

/// Read-only inputs of a pass.
struct Ctx<'a> {
    w: &'a [f32],
    l: DenseLayout,
    geo: Geometry,
    chunk_rows: usize,
    state: &'a [f32],
    pos: &'a [f32],
    /// `pk`, `pv` (9·D each): the model's, or zeros without position embeddings.
    pk: &'a [f32],
    pv: &'a [f32],
    target: &'a [f32],
    mode: Mode,
    fast: bool,
}

impl DenseWorkspace {
    /// An empty workspace for `l`'s model with `octaves` position octaves.
    pub fn new(l: DenseLayout, octaves: Option<u32>) -> Self {
        Self {
            l,
            octaves,
            geo: None,
            chunk_rows: 1,
            pos: Vec::new(),
            out: Vec::new(),
            attention: Vec::new(),
            partials: Vec::new(),
            grads: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Sizes every buffer for `geo`; allocates only when it changes.
    pub fn ensure(&mut self, geo: Geometry) {
        if self.geo == Some(geo) {
            return;
        }
        let l = self.l;
        self.pos = match self.octaves {
            Some(oct) => nca_api::position::features(oct, geo.h, geo.w)
                .data()
                .to_vec(),
            None => Vec::new(),
        };
        self.chunk_rows = CHUNK_CELLS.div_ceil(geo.wr).clamp(1, geo.unit_rows);
        self.out.resize(geo.b * geo.h * l.c * geo.wr, 0.0);
        self.attention.clear();
        self.partials
            .resize(geo.b * geo.units_per_item * l.partial_len(), 0.0);
        self.grads.resize(l.partial_len(), 0.0);
        let np = (self.chunk_rows + 2) * geo.wp;
        let nc = self.chunk_rows * geo.wr;
        let threads = rayon::current_num_threads().max(1);
        self.scratch = (0..threads)
            .map(|_| {
                let mut s = Scratch::default();
                s.ensure(&l, np, nc);
                Mutex::new(s)
            })
            .collect();
        self.geo = Some(geo);
    }

    /// Runs forward (and in train mode backward) over every unit. `w` holds the
    /// parameters in [`FlatLayout`] order, `pkv` the 18·D `pk`, `pv` values the cells
    /// use, `state` is NCHW and `target` row-planar (train mode only).
    pub fn run(
        &mut self,
        w: &[f32],
        pkv: &[f32],
        state: &[f32],
        target: &[f32],
        mode: Mode,
        attention: bool,
    ) {
        let Some(geo) = self.geo else { return };
        let l = self.l;
        if attention {
            self.attention
                .resize(geo.b * geo.h * NEIGHBOURS * geo.wr, 0.0);
        }
        #[cfg(target_arch = "x86_64")]
        let fast = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let fast = false;
        let nd = NEIGHBOURS * l.d;
        let ctx = Ctx {
            w,
            l,
            geo,
            chunk_rows: self.chunk_rows,
            state,
            pos: &self.pos,
            pk: &pkv[..nd],
            pv: &pkv[nd..2 * nd],
            target,
            mode,
            fast,
        };
        let scratch = &self.scratch;
        let plen = l.partial_len();
        let per_item = geo.units_per_item;
        let out_unit = geo.unit_rows * l.c * geo.wr;
        let att_unit = geo.unit_rows * NEIGHBOURS * geo.wr;
        let run = |unit: usize, o: &mut [f32], a: &mut [f32], p: &mut [f32]| {
            let idx = rayon::current_thread_index().unwrap_or(0) % scratch.len();
            let mut s = scratch[idx]
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            unit_pass(&ctx, &mut s, unit, o, a, p);
        };
        let out_items = self.out.par_chunks_mut(geo.h * l.c * geo.wr);
        let part_items = self.partials.par_chunks_mut(per_item * plen);
        if attention {
            out_items
                .zip(self.attention.par_chunks_mut(geo.h * NEIGHBOURS * geo.wr))
                .zip(part_items)
                .enumerate()
                .for_each(|(bi, ((o, a), p))| {
                    o.par_chunks_mut(out_unit)
                        .zip(a.par_chunks_mut(att_unit))
                        .zip(p.par_chunks_mut(plen))
                        .enumerate()
                        .for_each(|(u, ((o, a), p))| run(bi * per_item + u, o, a, p));
                });
        } else {
            out_items
                .zip(part_items)
                .enumerate()
                .for_each(|(bi, (o, p))| {
                    o.par_chunks_mut(out_unit)
                        .zip(p.par_chunks_mut(plen))
                        .enumerate()
                        .for_each(|(u, (o, p))| run(bi * per_item + u, o, &mut [], p));
                });
        }
    }

    /// Sums the units' gradients in unit order into [`DenseWorkspace::grads`].
    pub fn reduce(&mut self) {
        let plen = self.l.partial_len();
        self.grads.fill(0.0);
        for part in self.partials.chunks_exact(plen) {
            for (g, p) in self.grads.iter_mut().zip(part) {
                *g += *p;
            }
        }
    }

    /// The last output (update or next state), row-planar `[B][H][C][wr]`.
    pub fn output(&self) -> &[f32] {
        &self.out
    }

    /// The last attention weights, row-planar `[B][H][9][wr]`.
    pub fn attention(&self) -> &[f32] {
        &self.attention
    }
}

/// A GEMM `C = α·A·B + β·C` on strided slices: `A` is `m × k` with strides `(rsa, csa)`,
/// `B` is `k × n`, `C` is `m × n`.
///
/// The slice bounds are checked here so that the raw-pointer call below stays in bounds.
fn gemm(
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    beta: f32,
    c: &mut [f32],
    (rsc, csc): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    assert!(
        k == 0 || (last(m, k, rsa, csa) < a.len() && last(k, n, rsb, csb) < b.len()),
        "gemm operand out of bounds"
    );
    assert!(last(m, n, rsc, csc) < c.len(), "gemm output out of bounds");
    // SAFETY: every index the GEMM touches was checked against its slice above; the
    // output does not alias the inputs (distinct borrows).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

/// Fills each of `rows` rows of length `len` of `dst` with `bias[row]`.
fn fill_rows(dst: &mut [f32], bias: &[f32], len: usize) {
    for (row, &b) in dst.chunks_exact_mut(len).zip(bias) {
        row.fill(b);
    }
}

/// One unit: its chunks in order, then the lane sums into the unit's gradient vector.
fn unit_pass(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    unit: usize,
    out: &mut [f32],
    att: &mut [f32],
    partial: &mut [f32],
) {
    let (l, geo) = (ctx.l, ctx.geo);
    let bi = unit / geo.units_per_item;
    let y0 = (unit % geo.units_per_item) * geo.unit_rows;
    let rows = out.len() / (l.c * geo.wr);
    partial.fill(0.0);
    s.lanes.fill(F8::ZERO);
    let mut r0 = 0;
    while r0 < rows {
        let n = ctx.chunk_rows.min(rows - r0);
        let o = &mut out[r0 * l.c * geo.wr..(r0 + n) * l.c * geo.wr];
        let a = if att.is_empty() {
            &mut [][..]
        } else {
            &mut att[r0 * NEIGHBOURS * geo.wr..(r0 + n) * NEIGHBOURS * geo.wr]
        };
        chunk_pass(ctx, s, bi, y0 + r0, n, o, a, partial);
        r0 += n;
    }
    if ctx.mode != Mode::Train {
        return;
    }
    let d = l.d;
    let nd = NEIGHBOURS * d;
    let lanes = &s.lanes;
    let sum = |i: usize| lanes[i].sum();
    for dd in 0..d {
        partial[l.bq + dd] += sum(dd);
        partial[l.bk + dd] += sum(d + dd);
        partial[l.bv + dd] += sum(2 * d + dd);
    }
    if let Some((pk, pv)) = l.pkv {
        for i in 0..nd {
            partial[pk + i] += sum(3 * d + i);
            partial[pv + i] += sum(3 * d + nd + i);
        }
    }
    let bo_at = 3 * d + 2 * nd;
    for ch in 0..l.c {
        partial[l.bo + ch] += sum(bo_at + ch);
    }
    partial[l.params] += sum(bo_at + l.c);
}

/// Rows `y0..y0+rows` of item `bi`: forward, and in train mode loss and backward.
fn chunk_pass(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    bi: usize,
    y0: usize,
    rows: usize,
    out: &mut [f32],
    att: &mut [f32],
    partial: &mut [f32],
) {
    let (l, geo, w) = (ctx.l, ctx.geo, ctx.w);
    let (c, d, x, m) = (l.c, l.d, l.x, l.m);
    let (wd, wp, wr, h) = (geo.w, geo.wp, geo.wr, geo.h);
    let np = (rows + 2) * wp;
    let nc = rows * wr;

    // 1. Inputs of the padded rows y0-1 ..= y0+rows, zero outside the grid.
    let xp = &mut s.xp[..x * np];
    xp.fill(0.0);
    for pr in 0..rows + 2 {
        let Some(y) = (y0 + pr).checked_sub(1).filter(|&y| y < h) else {
            continue;
        };
        for j in 0..x {
            let src = if j < c {
                let from = ((bi * c + j) * h + y) * wd;
                &ctx.state[from..from + wd]
            } else {
                let from = ((j - c) * h + y) * wd;
                &ctx.pos[from..from + wd]
            };
            let to = j * np + pr * wp + 1;
            xp[to..to + wd].copy_from_slice(src);
        }
    }
    let xp = &s.xp[..x * np];
    let qkv = &mut s.qkv[..3 * d * np];
    for (t, (wo, bo)) in [(l.wq, l.bq), (l.wk, l.bk), (l.wv, l.bv)]
        .into_iter()
        .enumerate()
    {
        let dst = &mut qkv[t * d * np..(t + 1) * d * np];
        fill_rows(dst, &w[bo..bo + d], np);
        gemm((d, x, np), &w[wo..], (x, 1), xp, (np, 1), 1.0, dst, (np, 1));
    }

    // 2. Attention per cell.
    let view = Chunk {
        qkv: &s.qkv[..3 * d * np],
        xp,
        np,
        nc,
        wp,
        wr,
        wd,
        rows,
        d,
        x,
        pk: ctx.pk,
        pv: ctx.pv,
    };
    dispatch!(
        ctx.fast,
        d,
        attend,
        attend_fma,
        (&view, &mut s.ux, &mut s.att, &mut s.qc)
    );
    if !att.is_empty() {
        for r in 0..rows {
            for n in 0..NEIGHBOURS {
                let (from, to) = (n * nc + r * wr, (r * NEIGHBOURS + n) * wr);
                att[to..to + wr].copy_from_slice(&s.att[from..from + wr]);
            }
        }
    }

    // 3. Dense output.
    let ux = &s.ux[..(d + x) * nc];
    let f = &mut s.f[..c * nc];
    fill_rows(f, &w[l.bo..l.bo + c], nc);
    if let Some((w1, b1)) = l.mlp {
        let hb = &mut s.h[..m * nc];
        fill_rows(hb, &w[b1..b1 + m], nc);
        gemm(
            (m, d + x, nc),
            &w[w1..],
            (d + x, 1),
            ux,
            (nc, 1),
            1.0,
            hb,
            (nc, 1),
        );
        hb.iter_mut().for_each(|z| *z = z.max(0.0));
        gemm((c, m, nc), &w[l.wo..], (m, 1), hb, (nc, 1), 1.0, f, (nc, 1));
    } else {
        gemm((c, d, nc), &w[l.wo..], (d, 1), ux, (nc, 1), 1.0, f, (nc, 1));
    }
    let f = &s.f[..c * nc];
    let centre = |j: usize, r: usize| j * np + (r + 1) * wp + 1;
    for r in 0..rows {
        for ch in 0..c {
            let dst = &mut out[(r * c + ch) * wr..(r * c + ch + 1) * wr];
            let fr = &f[ch * nc + r * wr..ch * nc + (r + 1) * wr];
            if ctx.mode == Mode::Update {
                dst.copy_from_slice(fr);
            } else {
                let sr = &xp[centre(ch, r)..centre(ch, r) + wr];
                for ((o, &fv), &sv) in dst.iter_mut().zip(fr).zip(sr) {
                    *o = sv + fv;
                }
            }
        }
    }
    if ctx.mode != Mode::Train {
        return;
    }

    // 4. Loss and dL/df on visible channels; padding lanes have mask 0.
    let norm = F8::splat(2.0 / (geo.cells() * l.v) as f32);
    let gf = &mut s.gf[..c * nc];
    gf.fill(0.0);
    let nd = NEIGHBOURS * d;
    let bo_at = 3 * d + 2 * nd;
    let lanes = &mut s.lanes;
    for r in 0..rows {
        let y = y0 + r;
        let t_row = (bi * h + y) * l.v * wr;
        for x0 in (0..wd).step_by(LANES) {
            let mut mask = F8::ZERO;
            for lane in 0..LANES.min(wd - x0) {
                mask.0[lane] = 1.0;
            }
            let mut sq = F8::ZERO;
            for ch in 0..l.v {
                let next = F8::load(out, (r * c + ch) * wr + x0);
                let diff = (next - F8::load(ctx.target, t_row + ch * wr + x0)) * mask;
                sq = sq + diff * diff;
                let g = norm * diff;
                g.store(gf, ch * nc + r * wr + x0);
                lanes[bo_at + ch] = lanes[bo_at + ch] + g;
            }
            lanes[bo_at + c] = lanes[bo_at + c] + sq;
        }
    }
    let gf = &s.gf[..c * nc];

    // Dense backward.
    let gu = &mut s.gu[..d * nc];
    if let Some((w1, b1)) = l.mlp {
        let hb = &s.h[..m * nc];
        gemm(
            (c, nc, m),
            gf,
            (nc, 1),
            hb,
            (1, nc),
            1.0,
            &mut partial[l.wo..],
            (m, 1),
        );
        let gh = &mut s.gh[..m * nc];
        gemm(
            (m, c, nc),
            &w[l.wo..],
            (1, m),
            gf,
            (nc, 1),
            0.0,
            gh,
            (nc, 1),
        );
        for (mm, (g, hv)) in gh.chunks_exact_mut(nc).zip(hb.chunks_exact(nc)).enumerate() {
            let mut acc = F8::ZERO;
            for (g8, h8) in g.chunks_exact_mut(LANES).zip(hv.chunks_exact(LANES)) {
                let mut v = [0.0; LANES];
                for i in 0..LANES {
                    // relu'(0) = 0: H > 0 exactly where Z > 0.
                    v[i] = if h8[i] > 0.0 { g8[i] } else { 0.0 };
                }
                g8.copy_from_slice(&v);
                acc = acc + F8(v);
            }
            partial[b1 + mm] += acc.sum();
        }
        let gh = &s.gh[..m * nc];
        gemm(
            (m, nc, d + x),
            gh,
            (nc, 1),
            ux,
            (1, nc),
            1.0,
            &mut partial[w1..],
            (d + x, 1),
        );
        gemm(
            (d, m, nc),
            &w[w1..],
            (1, d + x),
            gh,
            (nc, 1),
            0.0,
            gu,
            (nc, 1),
        );
    } else {
        gemm(
            (c, nc, d),
            gf,
            (nc, 1),
            ux,
            (1, nc),
            1.0,
            &mut partial[l.wo..],
            (d, 1),
        );
        gemm(
            (d, c, nc),
            &w[l.wo..],
            (1, d),
            gf,
            (nc, 1),
            0.0,
            gu,
            (nc, 1),
        );
    }

    // 5. Attention backward per cell, then the projection gradients.
    let view = Chunk {
        qkv: &s.qkv[..3 * d * np],
        xp,
        np,
        nc,
        wp,
        wr,
        wd,
        rows,
        d,
        x,
        pk: ctx.pk,
        pv: ctx.pv,
    };
    dispatch!(
        ctx.fast,
        d,
        attend_back,
        attend_back_fma,
        (
            &view,
            &s.att,
            &s.qc,
            &s.gu,
            &mut s.dq,
            &mut s.xk,
            &mut s.xv,
            &mut s.lanes
        )
    );
    let xc = &ux[d * nc..];
    let mut grad = |off: usize, a: &[f32], b: &[f32]| {
        gemm(
            (d, nc, x),
            a,
            (nc, 1),
            b,
            (1, nc),
            1.0,
            &mut partial[off..],
            (x, 1),
        );
    };
    grad(l.wq, &s.dq[..d * nc], xc);
    grad(l.wk, &s.qc[..d * nc], &s.xk[..x * nc]);
    grad(l.wv, &s.gu[..d * nc], &s.xv[..x * nc]);
}

/// A chunk's projected and input buffers, as the per-cell passes read them.
struct Chunk<'a> {
    /// `[Q; K; V]`, `3·D` rows of `np` padded cells.
    qkv: &'a [f32],
    /// Inputs, `x` rows of `np` padded cells.
    xp: &'a [f32],
    np: usize,
    nc: usize,
    wp: usize,
    wr: usize,
    wd: usize,
    rows: usize,
    d: usize,
    x: usize,
    pk: &'a [f32],
    pv: &'a [f32],
}

/// `N` if it is a compile-time width, else the run-time value.
#[inline(always)]
fn width<const N: usize>(runtime: usize) -> usize {
    if N == 0 {
        runtime
    } else {
        N
    }
}

/// Start, in padded-cell units, of neighbour `n` of the block at chunk row `r`, `x0`.
#[inline(always)]
fn neighbour_at(v: &Chunk<'_>, r: usize, x0: usize, n: usize) -> usize {
    (r + n / 3) * v.wp + x0 + n % 3
}

twin_d!(attend, attend_fma, attend_body,
    (v: &Chunk<'_>, ux: &mut [f32], att: &mut [f32], qc: &mut [f32]));

/// Forward attention of every cell of the chunk: writes `U` and `X_c` into `ux`, the
/// softmax weights into `att` and the queries into `qc`.
#[inline(always)]
fn attend_body<const D: usize, A: MulAdd>(
    v: &Chunk<'_>,
    ux: &mut [f32],
    att: &mut [f32],
    qc: &mut [f32],
) {
    let d = width::<D>(v.d);
    let (np, nc) = (v.np, v.nc);
    let scale = F8::splat(1.0 / (d as f32).sqrt());
    let (kq, vq) = (d * np, 2 * d * np);
    for r in 0..v.rows {
        for x0 in (0..v.wd).step_by(LANES) {
            let cell = r * v.wr + x0;
            let mut at = [0usize; NEIGHBOURS];
            for n in 0..NEIGHBOURS {
                at[n] = neighbour_at(v, r, x0, n);
            }
            let centre = at[NEIGHBOURS / 2];
            let mut q = [F8::ZERO; MAX_DIM];
            for dd in 0..d {
                q[dd] = F8::load(v.qkv, dd * np + centre);
                q[dd].store(qc, dd * nc + cell);
            }
            let mut a = [F8::ZERO; NEIGHBOURS];
            let mut max = F8::splat(f32::NEG_INFINITY);
            for n in 0..NEIGHBOURS {
                let mut z = F8::ZERO;
                for dd in 0..d {
                    let k = F8::load(v.qkv, kq + dd * np + at[n]) + F8::splat(v.pk[n * d + dd]);
                    z = A::madd(q[dd], k, z);
                }
                a[n] = z * scale;
                max = max.max(a[n]);
            }
            let mut total = F8::ZERO;
            for n in 0..NEIGHBOURS {
                a[n] = (a[n] - max).exp();
                total = total + a[n];
            }
            let mut inv = total;
            for t in &mut inv.0 {
                *t = 1.0 / *t;
            }
            for n in 0..NEIGHBOURS {
                a[n] = a[n] * inv;
                a[n].store(att, n * nc + cell);
            }
            for dd in 0..d {
                let mut u = F8::ZERO;
                for n in 0..NEIGHBOURS {
                    let val = F8::load(v.qkv, vq + dd * np + at[n]) + F8::splat(v.pv[n * d + dd]);
                    u = A::madd(a[n], val, u);
                }
                u.store(ux, dd * nc + cell);
            }
            for j in 0..v.x {
                F8::load(v.xp, j * np + centre).store(ux, (d + j) * nc + cell);
            }
        }
    }
}

twin_d!(attend_back, attend_back_fma, attend_back_body,
    (v: &Chunk<'_>, att: &[f32], qc: &[f32], gu: &[f32], dq: &mut [f32], xk: &mut [f32], xv: &mut [f32], lanes: &mut [F8]));

/// Attention backward of every cell of the chunk: `dq` into `dq`, `Σ dz_n x_n` into
/// `xk`, `Σ a_n x_n` into `xv`; bias and `pk`/`pv` gradients into `lanes`.
#[inline(always)]
fn attend_back_body<const D: usize, A: MulAdd>(
    v: &Chunk<'_>,
    att: &[f32],
    qc: &[f32],
    gu: &[f32],
    dq: &mut [f32],
    xk: &mut [f32],
    xv: &mut [f32],
    lanes: &mut [F8],
) {
    let d = width::<D>(v.d);
    let (np, nc) = (v.np, v.nc);
    let scale = F8::splat(1.0 / (d as f32).sqrt());
    let (kq, vq) = (d * np, 2 * d * np);
    let nd = NEIGHBOURS * d;
    let (lbq, lbk, lbv, lpk, lpv) = (0, d, 2 * d, 3 * d, 3 * d + nd);
    for r in 0..v.rows {
        for x0 in (0..v.wd).step_by(LANES) {
            let cell = r * v.wr + x0;
            let mut at = [0usize; NEIGHBOURS];
            for n in 0..NEIGHBOURS {
                at[n] = neighbour_at(v, r, x0, n);
            }
            let mut q = [F8::ZERO; MAX_DIM];
            let mut g = [F8::ZERO; MAX_DIM];
            for dd in 0..d {
                q[dd] = F8::load(qc, dd * nc + cell);
                g[dd] = F8::load(gu, dd * nc + cell);
            }
            let mut a = [F8::ZERO; NEIGHBOURS];
            let mut da = [F8::ZERO; NEIGHBOURS];
            let mut mean = F8::ZERO;
            for n in 0..NEIGHBOURS {
                a[n] = F8::load(att, n * nc + cell);
                let mut s = F8::ZERO;
                for dd in 0..d {
                    let val = F8::load(v.qkv, vq + dd * np + at[n]) + F8::splat(v.pv[n * d + dd]);
                    s = A::madd(g[dd], val, s);
                }
                da[n] = s;
                mean = A::madd(a[n], s, mean);
            }
            let mut dz = [F8::ZERO; NEIGHBOURS];
            let mut dz_sum = F8::ZERO;
            for n in 0..NEIGHBOURS {
                dz[n] = a[n] * (da[n] - mean) * scale;
                dz_sum = dz_sum + dz[n];
            }
            for dd in 0..d {
                let mut dqv = F8::ZERO;
                for n in 0..NEIGHBOURS {
                    let k = F8::load(v.qkv, kq + dd * np + at[n]) + F8::splat(v.pk[n * d + dd]);
                    dqv = A::madd(dz[n], k, dqv);
                    let (ik, iv) = (lpk + n * d + dd, lpv + n * d + dd);
                    lanes[ik] = A::madd(dz[n], q[dd], lanes[ik]);
                    lanes[iv] = A::madd(a[n], g[dd], lanes[iv]);
                }
                dqv.store(dq, dd * nc + cell);
                lanes[lbq + dd] = lanes[lbq + dd] + dqv;
                lanes[lbk + dd] = A::madd(dz_sum, q[dd], lanes[lbk + dd]);
                lanes[lbv + dd] = lanes[lbv + dd] + g[dd];
            }
            for j in 0..v.x {
                let mut sk = F8::ZERO;
                let mut sv = F8::ZERO;
                for n in 0..NEIGHBOURS {
                    let xn = F8::load(v.xp, j * np + at[n]);
                    sk = A::madd(dz[n], xn, sk);
                    sv = A::madd(a[n], xn, sv);
                }
                sk.store(xk, j * nc + cell);
                sv.store(xv, j * nc + cell);
            }
        }
    }
}
