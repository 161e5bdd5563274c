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
//!    `Q, K, V = W·XP + b` — one GEMM `[3D × C]·[C × cells]` over the state rows, started
//!    from the position part (see below); a border cell's zero input gives `K = bk`,
//!    `V = bv`, as zero padding implies.
//! 2. Per cell (eight cells per vector, like the fused kernel): scores with `pk`, softmax,
//!    `u = Σ a_n ṽ_n`, written into `UX = [U; X_c]`.
//! 3. `H = relu(W1·UX + b1)`, `F = Wo·H + bo` (without the MLP `F = Wo·U + bo`); the
//!    output is `s + F` (or `F`). The product runs over `[U; S]` only, started from the
//!    position part.
//! 4. Backward (train mode): `G_f = 2(next − target)/N` on visible channels;
//!    `dWo += G_f·Hᵀ`; `G_h = (Woᵀ·G_f) ⊙ [Z > 0]`; `dW1 += G_h·UXᵀ`, `db1 += Σ G_h`;
//!    `G_u = W1[:, :D]ᵀ·G_h` (without the MLP, `G_u = Woᵀ·G_f`, `dWo += G_f·Uᵀ`). No
//!    gradient flows into the state: the incoming state is a constant. `dW1`'s position
//!    columns come from the row and column sums of `G_h` (below).
//! 5. Per cell, the attention backward ([`crate::attention`], shared with the plain
//!    kernel) gives `dq`, `xk = Σ dz_n x_n` and `xv = Σ a_n x_n`, plus the `pk`, `pv` and
//!    bias gradients in vector lanes; then `dWq += DQ·X_cᵀ`, `dWk += Q·XKᵀ`,
//!    `dWv += G_u·XVᵀ` are GEMMs again.
//!
//! **Position terms.** Every position feature is a function of the column's `X` alone or
//! of the row's `Y` alone ([`nca_api::position::feature_axis`]), so for any weights `W`,
//! `W·p(y, x) = W_X·p_X(x) + W_Y·p_Y(y)`: once per pass, [`PositionTerms`] computes the
//! per-column and per-row parts (`[rows × W]` and `[rows × H]`), and each cell adds two
//! numbers instead of a `P`-long dot product. With `P = 30` of the `D + C + P = 49` inputs
//! of the 128×128 model's `W1`, that removes about 60 % of its product per cell, forward
//! and backward (`dW1_X = Σ_x colsum(G_h)(x)·p_X(x)ᵀ`, `dW1_Y` likewise with row sums).
//! The attention's projection gradients still use the full inputs (they are a small part).
//!
//! Determinism: units and chunks depend only on the grid shape, GEMMs accumulate a chunk
//! at a time into the unit's own gradient vector, and units are summed in order, so the
//! result does not depend on the thread count. Per-thread scratch is overwritten before
//! it is read.

// Index loops over compile-time widths are what unrolls and vectorises.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use std::sync::Mutex;

use rayon::prelude::*;

use nca_api::position::{feature_axis, Axis};
use nca_api::{FlatLayout, ModelConfig, Param, NEIGHBOURS};

use crate::attention::{self, GradLanes, Neighbourhood, Taps};
use crate::gemm::{self, Epilogue, Start};
use crate::kernel::{Geometry, Mode, MAX_DIM};
#[cfg(doc)]
use crate::simd::F16;
use crate::simd::{self, Kernel, MulAdd, Vector, F8, LANES};

/// Target number of cells in a chunk: large enough for efficient GEMMs, small enough
/// that a chunk's matrices (about 1.7 KB per cell for the default model) stay in L2.
const CHUNK_CELLS: usize = 256;

/// Hidden units per panel of the MLP backward: a panel's `G_h` (32 KB for a chunk of 256
/// cells) stays in L1 while it is used.
const MLP_PANEL: usize = 32;

/// Cells in the widest vector the products use ([`F16`]): row lengths and chunk widths
/// are whole multiples of it.
pub const ALIGN: usize = 16;

/// About how many work units a grid is split into ([`Geometry::aligned`]): few, because
/// each unit pays once for its `dW1_X` product over a whole row ([`PositionTerms`]).
pub const UNITS: usize = 16;

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
    /// Position features that depend on `X`, and on `Y` ([`nca_api::position::Axis`]).
    px: usize,
    py: usize,
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
        let at = |param: Param| flat.offset(param);
        let pkv = match (at(Param::Pk), at(Param::Pv)) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => None,
        };
        let mlp = match (at(Param::W1), at(Param::B1)) {
            (Some(w), Some(b)) => Some((w, b)),
            _ => None,
        };
        let axes = (0..model.position_features()).map(feature_axis);
        let px = axes.filter(|&a| a == Axis::X).count();
        Some(Self {
            px,
            py: model.position_features() - px,
            c: model.channels(),
            v: model.visible_channels,
            d: model.attention_dim,
            x: model.input_width(),
            m: model.mlp_hidden.unwrap_or(0),
            wq: at(Param::Wq)?,
            bq: at(Param::Bq)?,
            wk: at(Param::Wk)?,
            bk: at(Param::Bk)?,
            wv: at(Param::Wv)?,
            bv: at(Param::Bv)?,
            wo: at(Param::Wo)?,
            bo: at(Param::Bo)?,
            pkv,
            mlp,
            params: flat.len(),
        })
    }

    /// Rebuilds, from the flat parameters `w`, what the cells read besides them: `pk`
    /// and `pv` (9·D each; zero without position embeddings), then `[wq; wk; wv]`
    /// (3·D × (C+P)) and `[bq; bk; bv]` (3·D) as one projection, then the position
    /// columns of that projection and of `w1` gathered by axis ([`Derived`]).
    pub fn derive(&self, w: &[f32], out: &mut Vec<f32>) {
        let nd = NEIGHBOURS * self.d;
        let dx = self.d * self.x;
        out.clear();
        match self.pkv {
            Some((pk, pv)) => {
                out.extend_from_slice(&w[pk..pk + nd]);
                out.extend_from_slice(&w[pv..pv + nd]);
            }
            None => out.resize(2 * nd, 0.0),
        }
        for at in [self.wq, self.wk, self.wv] {
            out.extend_from_slice(&w[at..at + dx]);
        }
        for at in [self.bq, self.bk, self.bv] {
            out.extend_from_slice(&w[at..at + self.d]);
        }
        let p = self.x - self.c;
        let first = self.c;
        for axis in [Axis::X, Axis::Y] {
            for at in [self.wq, self.wk, self.wv] {
                for row in 0..self.d {
                    let cols = features_along(axis, p);
                    out.extend(cols.map(|f| w[at + row * self.x + first + f]));
                }
            }
        }
        if let Some((w1, _)) = self.mlp {
            let (stride, first) = (self.d + self.x, self.d + self.c);
            for axis in [Axis::X, Axis::Y] {
                for row in 0..self.m {
                    let cols = features_along(axis, p);
                    out.extend(cols.map(|f| w[w1 + row * stride + first + f]));
                }
            }
        }
    }

    /// Names the parts of what [`DenseLayout::derive`] wrote.
    fn split<'a>(&self, derived: &'a [f32]) -> Derived<'a> {
        let (d3, m) = (3 * self.d, self.m);
        let mut rest = derived;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let nd = NEIGHBOURS * self.d;
        Derived {
            pk: take(nd),
            pv: take(nd),
            wqkv: take(d3 * self.x),
            bqkv: take(d3),
            qkv_x: take(d3 * self.px),
            qkv_y: take(d3 * self.py),
            w1_x: take(if self.mlp.is_some() { m * self.px } else { 0 }),
            w1_y: take(if self.mlp.is_some() { m * self.py } else { 0 }),
        }
    }

    /// Length of a unit's gradient vector: the parameters, then the loss.
    fn partial_len(&self) -> usize {
        self.params + 1
    }
}

/// What [`DenseLayout::derive`] makes of the parameters, by name.
struct Derived<'a> {
    /// `pk`, `pv` (9·D each): the model's, or zeros without position embeddings.
    pk: &'a [f32],
    pv: &'a [f32],
    /// `[wq; wk; wv]` as one `[3·D × (C+P)]` matrix, and `[bq; bk; bv]`.
    wqkv: &'a [f32],
    bqkv: &'a [f32],
    /// The columns of `wqkv` for the `X` features (`[3·D × PX]`) and the `Y` features.
    qkv_x: &'a [f32],
    qkv_y: &'a [f32],
    /// The columns of `w1` for the `X` features (`[M × PX]`) and the `Y` features.
    w1_x: &'a [f32],
    w1_y: &'a [f32],
}

/// The position features (of `p`) that depend on `axis`, in order: the column order of
/// the gathered `W_X`/`W_Y` and of their gradients.
fn features_along(axis: Axis, p: usize) -> impl Iterator<Item = usize> {
    (0..p).filter(move |&f| feature_axis(f) == axis)
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
    /// Column sums `[M][wr]` and row sums `[M][unit rows]` of `G_h` over the unit.
    gh_col: Vec<f32>,
    gh_row: Vec<f32>,
    /// `dW1`'s position columns of one axis, `[M][PX or PY]`, before they are scattered.
    dw1_pos: Vec<f32>,
    lanes: Vec<F8>,
    reduce: gemm::ReduceScratch,
    /// `[U; S]` transposed, for the panels of `dW1`, and their product before it is added.
    uxt: gemm::Transposed,
    product: Vec<f32>,
}

impl Scratch {
    fn ensure(&mut self, l: &DenseLayout, np: usize, nc: usize, geo: &Geometry) {
        let (d, x) = (l.d, l.x);
        self.gh_col.resize(l.m * geo.wr, 0.0);
        self.gh_row.resize(l.m * geo.unit_rows, 0.0);
        self.dw1_pos.resize(l.m * l.px.max(l.py), 0.0);
        self.xp.resize(x * np, 0.0);
        self.qkv.resize(3 * d * np, 0.0);
        self.ux.resize((d + x) * nc, 0.0);
        self.att.resize(NEIGHBOURS * nc, 0.0);
        self.qc.resize(d * nc, 0.0);
        self.h.resize(l.m * nc, 0.0);
        self.gh.resize(l.m.min(MLP_PANEL) * nc, 0.0);
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
    /// The `X` features along a row, `[PX][wr]` (zero past the grid), and the `Y`
    /// features down a column, `[PY][hr]`.
    pos_x: Vec<f32>,
    pos_y: Vec<f32>,
    /// Rows rounded up to whole vectors.
    hr: usize,
    /// The pass's position terms ([`PositionTerms`]): `[3D][wr]`, `[3D][hr]` for the
    /// projection, `[M][wr]`, `[M][hr]` (with `b1`) for the MLP.
    terms: Vec<f32>,
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
    derived: Derived<'a>,
    /// Position terms of the projection (without bias) and of the MLP (with `b1`),
    /// per column (`wr` apart) and per row (`hr` apart).
    q_col: &'a [f32],
    q_row: &'a [f32],
    h_col: &'a [f32],
    h_row: &'a [f32],
    pos_x: &'a [f32],
    pos_y: &'a [f32],
    hr: usize,
    target: &'a [f32],
    mode: Mode,
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
            pos_x: Vec::new(),
            pos_y: Vec::new(),
            hr: 0,
            terms: Vec::new(),
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
        let (plane, p) = (geo.h * geo.w, self.pos.len() / (geo.h * geo.w).max(1));
        let hr = geo.h.div_ceil(ALIGN) * ALIGN;
        let (mut pos_x, mut pos_y) = (Vec::new(), Vec::new());
        for f in 0..p {
            let feature = &self.pos[f * plane..(f + 1) * plane];
            match feature_axis(f) {
                Axis::X => {
                    pos_x.extend_from_slice(&feature[..geo.w]);
                    pos_x.resize(pos_x.len() + geo.wr - geo.w, 0.0);
                }
                Axis::Y => {
                    pos_y.extend(feature.iter().step_by(geo.w));
                    pos_y.resize(pos_y.len() + hr - geo.h, 0.0);
                }
            }
        }
        (self.pos_x, self.pos_y, self.hr) = (pos_x, pos_y, hr);
        self.terms.resize((3 * l.d + l.m) * (geo.wr + hr), 0.0);
        self.chunk_rows = CHUNK_CELLS.div_ceil(geo.wr).clamp(1, geo.unit_rows);
        self.out.resize(geo.b * geo.h * l.c * geo.wr, 0.0);
        self.attention.clear();
        self.partials
            .resize(geo.b * geo.units_per_item * l.partial_len(), 0.0);
        self.grads.resize(l.partial_len(), 0.0);
        let np = padded_cells(self.chunk_rows, geo.wp);
        let nc = self.chunk_rows * geo.wr;
        let threads = rayon::current_num_threads().max(1);
        self.scratch = (0..threads)
            .map(|_| {
                let mut s = Scratch::default();
                s.ensure(&l, np, nc, &geo);
                Mutex::new(s)
            })
            .collect();
        self.geo = Some(geo);
    }

    /// Runs forward (and in train mode backward) over every unit. `w` holds the
    /// parameters in [`FlatLayout`] order, `derived` what [`DenseLayout::derive`] made of
    /// them, `state` is NCHW and `target` row-planar (train mode only).
    pub fn run(
        &mut self,
        w: &[f32],
        derived: &[f32],
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
        let derived = l.split(derived);
        let (wr, hr) = (geo.wr, self.hr);
        let (q_col, rest) = self.terms.split_at_mut(3 * l.d * wr);
        let (q_row, rest) = rest.split_at_mut(3 * l.d * hr);
        let (h_col, h_row) = rest.split_at_mut(l.m * wr);
        let b1 = l.mlp.map_or(&[][..], |(_, b1)| &w[b1..b1 + l.m]);
        simd::run(PositionTerms {
            products: [
                (derived.qkv_x, &self.pos_x, wr, &mut *q_col, Start::Zero),
                (derived.qkv_y, &self.pos_y, hr, &mut *q_row, Start::Zero),
                (derived.w1_x, &self.pos_x, wr, &mut *h_col, Start::Zero),
                (derived.w1_y, &self.pos_y, hr, &mut *h_row, Start::Bias(b1)),
            ],
        });
        let ctx = Ctx {
            w,
            l,
            geo,
            chunk_rows: self.chunk_rows,
            state,
            pos: &self.pos,
            derived,
            q_col,
            q_row,
            h_col,
            h_row,
            pos_x: &self.pos_x,
            pos_y: &self.pos_y,
            hr,
            target,
            mode,
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
            simd::run(UnitPass {
                ctx: &ctx,
                s: &mut s,
                unit,
                out: o,
                att: a,
                partial: p,
            });
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

/// The per-column and per-row position terms of one pass: each product is
/// `out = start + W·features`, with `features` `[k × n]` and `out` `[rows × n]`.
struct PositionTerms<'a> {
    products: [PositionProduct<'a>; 4],
}

/// `(W, features, n, out, start)` of one [`PositionTerms`] product.
type PositionProduct<'a> = (&'a [f32], &'a [f32], usize, &'a mut [f32], Start<'a>);

impl Kernel for PositionTerms<'_> {
    const WIDE: bool = false;
    type Output = ();
    #[inline(always)]
    fn body<A: MulAdd, V: Vector>(self) {
        // A loop, not four calls: each call site is another inlined copy of the tiles.
        for (weights, features, n, out, start) in self.products {
            let (rows, k) = (out.len() / n, features.len() / n);
            let dims = (rows, k, n);
            gemm::project::<V, A>(
                dims,
                weights,
                (k, 1),
                features,
                n,
                out,
                n,
                start,
                Epilogue::Store,
            );
        }
    }
}

/// One unit: its chunks in order, then the lane sums into the unit's gradient vector.
struct UnitPass<'a, 'c> {
    ctx: &'a Ctx<'c>,
    s: &'a mut Scratch,
    unit: usize,
    out: &'a mut [f32],
    att: &'a mut [f32],
    partial: &'a mut [f32],
}

impl Kernel for UnitPass<'_, '_> {
    const WIDE: bool = true;
    type Output = ();
    /// With D a compile-time constant for the default width 16 (0 = run-time); every
    /// specialisation is another full copy of the chunk body for the compiler to
    /// optimise; see `by_shape!` in `kernel.rs` for why there are no more.
    #[inline(always)]
    fn body<A: MulAdd, V: Vector>(self) {
        match self.ctx.l.d {
            16 => self.chunks::<16, A, V>(),
            _ => self.chunks::<0, A, V>(),
        }
    }
}

impl UnitPass<'_, '_> {
    #[inline(always)]
    fn chunks<const D: usize, A: MulAdd, V: Vector>(self) {
        let (ctx, s, unit) = (self.ctx, self.s, self.unit);
        let (out, att, partial) = (self.out, self.att, self.partial);
        let (l, geo) = (ctx.l, ctx.geo);
        let bi = unit / geo.units_per_item;
        let y0 = (unit % geo.units_per_item) * geo.unit_rows;
        let rows = out.len() / (l.c * geo.wr);
        partial.fill(0.0);
        s.lanes.fill(F8::ZERO);
        if ctx.mode == Mode::Train {
            // Only the backward pass sums into these; a rollout step skips the fill.
            s.gh_col.fill(0.0);
            s.gh_row.fill(0.0);
        }
        let mut r0 = 0;
        while r0 < rows {
            let n = ctx.chunk_rows.min(rows - r0);
            let o = &mut out[r0 * l.c * geo.wr..(r0 + n) * l.c * geo.wr];
            let a = if att.is_empty() {
                &mut [][..]
            } else {
                &mut att[r0 * NEIGHBOURS * geo.wr..(r0 + n) * NEIGHBOURS * geo.wr]
            };
            chunk_body::<D, A, V>(ctx, s, bi, (y0 + r0, r0), n, o, a, partial);
            r0 += n;
        }
        if ctx.mode != Mode::Train {
            return;
        }
        if let Some((w1, b1)) = l.mlp {
            position_gradients::<V, A>(ctx, s, y0, rows, w1, b1, partial);
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
}

/// `dW1`'s position columns and `db1` from the unit's column and row sums of `G_h`:
/// `dW1_X += colsum·p_Xᵀ`, `dW1_Y += rowsum·p_Yᵀ`, `db1 += Σ rowsum`.
#[inline(always)]
fn position_gradients<V: Vector, A: MulAdd>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    y0: usize,
    rows: usize,
    w1: usize,
    b1: usize,
    partial: &mut [f32],
) {
    let (l, geo) = (ctx.l, ctx.geo);
    let (m, wr, ur) = (l.m, geo.wr, geo.unit_rows);
    let (stride, first) = (l.d + l.x, l.d + l.c);
    let p = l.x - l.c;
    for i in 0..m {
        let sums = &s.gh_row[i * ur..i * ur + rows];
        partial[b1 + i] += sums.iter().sum::<f32>();
    }
    for axis in [Axis::X, Axis::Y] {
        let k = if axis == Axis::X { l.px } else { l.py };
        if k == 0 {
            continue;
        }
        let dw = &mut s.dw1_pos[..m * k];
        dw.fill(0.0);
        if axis == Axis::X {
            let dims = (m, k, wr);
            gemm::reduce::<V, A>(
                dims,
                &s.gh_col,
                wr,
                ctx.pos_x,
                wr,
                dw,
                (k, 1),
                &mut s.reduce,
            );
        } else {
            // A few rows per unit: not worth a vector product.
            for i in 0..m {
                let sums = &s.gh_row[i * ur..i * ur + rows];
                for j in 0..k {
                    let feature = &ctx.pos_y[j * ctx.hr + y0..j * ctx.hr + y0 + rows];
                    dw[i * k + j] = sums.iter().zip(feature).map(|(a, b)| a * b).sum();
                }
            }
        }
        let columns = features_along(axis, p);
        for (j, f) in columns.enumerate() {
            for i in 0..m {
                partial[w1 + i * stride + first + f] += dw[i * k + j];
            }
        }
    }
}

/// Adds the sums of `G_h` (`m` rows of `rows` grid rows `wr` apart, `nc` apart) along
/// each grid row into `row_sums[i·ur + at + r]` and across the rows into `col_sums`.
#[inline(always)]
fn add_row_and_column_sums<V: Vector>(
    (m, rows, wr, nc): (usize, usize, usize, usize),
    gh: &[f32],
    col_sums: &mut [f32],
    row_sums: &mut [f32],
    (ur, at): (usize, usize),
) {
    for i in 0..m {
        for r in 0..rows {
            let mut acc = V::ZERO;
            for x0 in (0..wr).step_by(V::LANES) {
                let v = V::load(gh, i * nc + r * wr + x0);
                acc = acc + v;
                (V::load(col_sums, i * wr + x0) + v).store(col_sums, i * wr + x0);
            }
            row_sums[i * ur + at + r] += acc.sum();
        }
    }
}

/// Padded cells of a chunk of `rows` rows: the rows and their halo, rounded up to whole
/// vectors.
fn padded_cells(rows: usize, wp: usize) -> usize {
    ((rows + 2) * wp).div_ceil(ALIGN) * ALIGN
}

/// Rows `y0..y0+rows` of item `bi`: forward, and in train mode loss and backward.
#[inline(always)]
fn chunk_body<const D: usize, A: MulAdd, V: Vector>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    bi: usize,
    (y0, unit_row): (usize, usize),
    rows: usize,
    out: &mut [f32],
    att: &mut [f32],
    partial: &mut [f32],
) {
    let (l, geo, w) = (ctx.l, ctx.geo, ctx.w);
    let (c, d, x, m) = (l.c, width::<D>(l.d), l.x, l.m);
    let (wd, wp, wr, h) = (geo.w, geo.wp, geo.wr, geo.h);
    let np = padded_cells(rows, wp);
    let nc = rows * wr;
    let train = ctx.mode == Mode::Train;

    // 1. Inputs of the padded rows y0-1 ..= y0+rows, zero outside the grid. The forward
    //    products read only the state rows; the position rows are for the gradients.
    let x_used = if train { x } else { c };
    let xp = &mut s.xp[..x_used * np];
    xp.fill(0.0);
    for pr in 0..rows + 2 {
        let Some(y) = (y0 + pr).checked_sub(1).filter(|&y| y < h) else {
            continue;
        };
        for j in 0..x_used {
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
    let xp = &s.xp[..x_used * np];
    let qkv = &mut s.qkv[..3 * d * np];
    for f in 0..3 * d {
        let row = &mut qkv[f * np..(f + 1) * np];
        row.fill(ctx.derived.bqkv[f]);
        let col = &ctx.q_col[f * wr..f * wr + wd];
        for pr in 0..rows + 2 {
            let Some(y) = (y0 + pr).checked_sub(1).filter(|&y| y < h) else {
                continue;
            };
            let add = ctx.q_row[f * ctx.hr + y];
            let at = pr * wp + 1;
            for (o, &cv) in row[at..at + wd].iter_mut().zip(col) {
                *o += add + cv;
            }
        }
    }
    gemm::project::<V, A>(
        (3 * d, c, np),
        ctx.derived.wqkv,
        (x, 1),
        xp,
        np,
        qkv,
        np,
        Start::Current,
        Epilogue::Store,
    );

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
        x_used,
        pk: ctx.derived.pk,
        pv: ctx.derived.pv,
    };
    attend_body::<D, A>(&view, &mut s.ux, &mut s.att, &mut s.qc);
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
    let bo = Start::Bias(&w[l.bo..l.bo + c]);
    if let Some((w1, _)) = l.mlp {
        let hb = &mut s.h[..m * nc];
        for i in 0..m {
            let col = &ctx.h_col[i * wr..(i + 1) * wr];
            for r in 0..rows {
                let add = ctx.h_row[i * ctx.hr + y0 + r];
                let at = i * nc + r * wr;
                for (o, &cv) in hb[at..at + wr].iter_mut().zip(col) {
                    *o = add + cv;
                }
            }
        }
        let dims = (m, d + c, nc);
        gemm::project::<V, A>(
            dims,
            &w[w1..],
            (d + x, 1),
            ux,
            nc,
            hb,
            nc,
            Start::Current,
            Epilogue::Relu,
        );
        let hb = &s.h[..m * nc];
        gemm::project::<V, A>(
            (c, m, nc),
            &w[l.wo..],
            (m, 1),
            hb,
            nc,
            f,
            nc,
            bo,
            Epilogue::Store,
        );
    } else {
        gemm::project::<V, A>(
            (c, d, nc),
            &w[l.wo..],
            (d, 1),
            ux,
            nc,
            f,
            nc,
            bo,
            Epilogue::Store,
        );
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
    if !train {
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
                sq = A::madd(diff, diff, sq);
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
    if let Some((w1, _)) = l.mlp {
        let hb = &s.h[..m * nc];
        let wo = &mut partial[l.wo..];
        gemm::reduce::<V, A>((c, m, nc), gf, nc, hb, nc, wo, (m, 1), &mut s.reduce);
        // G_h one panel of hidden units at a time, each used for its rows of dW1, its
        // row and column sums and its part of G_u while it is still in L1: the whole
        // `M × cells` G_h (384 KB at M = 384) went through L2 four times.
        s.uxt.set::<V, A>((d + c, nc), ux, nc);
        let unit = (geo.unit_rows, unit_row);
        let (ur, stride) = (geo.unit_rows, d + x);
        for p0 in (0..m).step_by(MLP_PANEL) {
            let pm = MLP_PANEL.min(m - p0);
            let gh = &mut s.gh[..pm * nc];
            let mask = Epilogue::Mask(&hb[p0 * nc..]);
            let wo_t = &w[l.wo + p0..];
            gemm::project::<V, A>((pm, c, nc), wo_t, (1, m), gf, nc, gh, nc, Start::Zero, mask);
            let gh = &s.gh[..pm * nc];
            let (col, row) = (&mut s.gh_col[p0 * wr..], &mut s.gh_row[p0 * ur..]);
            add_row_and_column_sums::<V>((pm, rows, wr, nc), gh, col, row, unit);
            let dw1 = &mut partial[w1 + p0 * stride..];
            gemm::reduce_transposed::<V, A>(pm, gh, nc, &s.uxt, dw1, (stride, 1), &mut s.product);
            let start = if p0 == 0 { Start::Zero } else { Start::Current };
            let w1_t = &w[w1 + p0 * stride..];
            gemm::project::<V, A>(
                (d, pm, nc),
                w1_t,
                (1, stride),
                gh,
                nc,
                gu,
                nc,
                start,
                Epilogue::Store,
            );
        }
    } else {
        let wo = &mut partial[l.wo..];
        gemm::reduce::<V, A>((c, d, nc), gf, nc, ux, nc, wo, (d, 1), &mut s.reduce);
        let store = Epilogue::Store;
        gemm::project::<V, A>(
            (d, c, nc),
            &w[l.wo..],
            (1, d),
            gf,
            nc,
            gu,
            nc,
            Start::Zero,
            store,
        );
    }

    // 5. Attention backward per cell, then the projection gradients.
    attend_back_body::<D, A>(
        &view,
        &s.att,
        &s.qc,
        &s.gu,
        &mut s.dq,
        &mut s.xk,
        &mut s.xv,
        &mut s.lanes,
    );
    let xc = &ux[d * nc..];
    // Each runs transposed, `dWᵀ = X·Aᵀ`: `reduce` then transposes the D-row operand (two
    // whole vectors) instead of the `C + P`-row one, which it would pad to whole vectors.
    // A loop, not a closure: a closure would not inherit the caller's AVX2/FMA features.
    for (off, a, b) in [
        (l.wq, &s.dq[..d * nc], xc),
        (l.wk, &s.qc[..d * nc], &s.xk[..x * nc]),
        (l.wv, &s.gu[..d * nc], &s.xv[..x * nc]),
    ] {
        let out = &mut partial[off..];
        gemm::reduce::<V, A>((x, d, nc), b, nc, a, nc, out, (1, x), &mut s.reduce);
    }
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
    /// Input rows filled: all `x` when training, the state's `C` otherwise.
    x_used: usize,
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

/// Start, in padded-cell units, of each neighbour of the block at chunk row `r`, `x0`.
#[inline(always)]
fn neighbours_at(v: &Chunk<'_>, r: usize, x0: usize) -> [usize; NEIGHBOURS] {
    std::array::from_fn(|n| (r + n / 3) * v.wp + x0 + n % 3)
}

impl<'a> Chunk<'a> {
    /// The keys and values of the block whose neighbours start at `at`.
    #[inline(always)]
    fn neighbourhood(&self, d: usize, at: [usize; NEIGHBOURS]) -> Neighbourhood<'a> {
        let (np, qkv) = (self.np, self.qkv);
        let taps = |first: usize| Taps {
            buf: qkv,
            at: at.map(|i| i + first * np),
            stride: np,
        };
        Neighbourhood {
            keys: taps(d),
            values: taps(2 * d),
            pk: self.pk,
            pv: self.pv,
        }
    }

    /// The inputs of the block whose neighbours start at `at`.
    #[inline(always)]
    fn inputs(&self, at: [usize; NEIGHBOURS]) -> Taps<'a> {
        Taps {
            buf: self.xp,
            at,
            stride: self.np,
        }
    }
}

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
    for r in 0..v.rows {
        for x0 in (0..v.wd).step_by(LANES) {
            let cell = r * v.wr + x0;
            let at = neighbours_at(v, r, x0);
            let centre = at[NEIGHBOURS / 2];
            let mut q = [F8::ZERO; MAX_DIM];
            for dd in 0..d {
                q[dd] = F8::load(v.qkv, dd * np + centre);
                q[dd].store(qc, dd * nc + cell);
            }
            let mut a = [F8::ZERO; NEIGHBOURS];
            let mut u = [F8::ZERO; MAX_DIM];
            attention::forward::<A>(d, &q, &v.neighbourhood(d, at), &mut a, &mut u);
            for n in 0..NEIGHBOURS {
                a[n].store(att, n * nc + cell);
            }
            for dd in 0..d {
                u[dd].store(ux, dd * nc + cell);
            }
            for j in 0..v.x_used {
                F8::load(v.xp, j * np + centre).store(ux, (d + j) * nc + cell);
            }
        }
    }
}

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
    let nc = v.nc;
    let nd = NEIGHBOURS * d;
    let grads = GradLanes {
        bq: 0,
        bk: d,
        bv: 2 * d,
        pk: 3 * d,
        pv: 3 * d + nd,
    };
    for r in 0..v.rows {
        for x0 in (0..v.wd).step_by(LANES) {
            let cell = r * v.wr + x0;
            let at = neighbours_at(v, r, x0);
            let mut q = [F8::ZERO; MAX_DIM];
            let mut g = [F8::ZERO; MAX_DIM];
            for dd in 0..d {
                q[dd] = F8::load(qc, dd * nc + cell);
                g[dd] = F8::load(gu, dd * nc + cell);
            }
            let mut a = [F8::ZERO; NEIGHBOURS];
            for n in 0..NEIGHBOURS {
                a[n] = F8::load(att, n * nc + cell);
            }
            let nb = v.neighbourhood(d, at);
            let mut dz = [F8::ZERO; NEIGHBOURS];
            let mut dqv = [F8::ZERO; MAX_DIM];
            attention::backward::<A>(d, &q, &g, &a, &nb, grads, lanes, &mut dz, &mut dqv);
            for dd in 0..d {
                dqv[dd].store(dq, dd * nc + cell);
            }
            attention::input_sums::<A>(v.x, &v.inputs(at), &dz, &a, |j, sk, sv| {
                sk.store(xk, j * nc + cell);
                sv.store(xv, j * nc + cell);
            });
        }
    }
}
