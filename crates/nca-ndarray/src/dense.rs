//! The picture model (position inputs and/or the MLP update): per-cell attention in SIMD,
//! everything dense as blocked GEMMs over a chunk of cells.
//!
//! Work is split into the same units of whole rows as the fused kernel ([`Geometry`]);
//! a unit is processed as consecutive chunks of a few rows, each with its own one-row
//! halo above and below, so that a chunk's buffers stay in the core's cache and every
//! chunk is independent of every other. Matrices are feature-major: one row per feature,
//! one column per cell, the cells of a chunk contiguous. Per chunk:
//!
//! 1. `XP` = the state `s` of the chunk's padded rows (zero outside the grid);
//!    `Q, K, V = W·x + b` for the inputs `x = [s; p]` — one GEMM `[3D × C]·[C × cells]`
//!    over the state rows, started from the position part (see below); a border cell's
//!    zero input gives `K = bk`, `V = bv`, as zero padding implies.
//! 2. Per cell (eight cells per vector, like the fused kernel): scores with `pk`, softmax,
//!    `u = Σ a_n ṽ_n`, written into `UX = [U; S]`.
//! 3. `H = relu(W1·UX + b1)`, `F = Wo·H + bo` (without the MLP `F = Wo·U + bo`); the
//!    output is `s + F` (or `F`). The product runs over `[U; S]` only, started from the
//!    position part.
//! 4. Backward (train mode): `G_f = 2(next − target)/N` on visible channels;
//!    `dWo += G_f·Hᵀ`; `G_h = (Woᵀ·G_f) ⊙ [Z > 0]`; `dW1 += G_h·UXᵀ`, `db1 += Σ G_h`;
//!    `G_u = W1[:, :D]ᵀ·G_h` (without the MLP, `G_u = Woᵀ·G_f`, `dWo += G_f·Uᵀ`). No
//!    gradient flows into the state: the incoming state is a constant. `dW1`'s position
//!    columns come from the row and column sums of `G_h` over the whole grid, once per
//!    pass after the units' gradients are summed (below).
//! 5. Per cell, the attention backward ([`crate::attention`], shared with the plain
//!    kernel) gives `dq`, `xk = Σ dz_n s_n` and `xv = Σ a_n s_n`, plus the `pk`, `pv` and
//!    bias gradients in vector lanes; then `dWq += DQ·Sᵀ`, `dWk += Q·XKᵀ`,
//!    `dWv += G_u·XVᵀ` are GEMMs again over the state columns; their position columns
//!    come from sums by neighbour offset ([`ProjectionSums`]).
//!
//! **Position terms.** Every position feature is a function of the column's `X` alone or
//! of the row's `Y` alone ([`nca_api::position::feature_axis`]), so for any weights `W`,
//! `W·p(y, x) = W_X·p_X(x) + W_Y·p_Y(y)`: once per pass, [`PositionTerms`] computes the
//! per-column and per-row parts (`[rows × W]` and `[rows × H]`), and each cell adds two
//! numbers instead of a `P`-long dot product. With `P = 30` of the `D + C + P = 49` inputs
//! of the 128×128 model's `W1`, that removes about 60 % of its product per cell, forward
//! and backward (`dW1_X = Σ_x colsum(G_h)(x)·p_X(x)ᵀ`, `dW1_Y` likewise with row sums).
//! The projection gradients do the same per neighbour offset: a neighbour's position
//! input is the cell's feature one column (or row) over, or zero outside the grid.
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
use crate::simd::{self, Kernel, MulAdd, Vector, F8, LANES, MAX_LANES};

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
        for axis in [Axis::X, Axis::Y] {
            for at in [self.wq, self.wk, self.wv] {
                let matrix = (&w[at..], self.d, self.x, self.c);
                gather_position_columns(out, matrix, axis, p);
            }
        }
        if let Some((w1, _)) = self.mlp {
            for axis in [Axis::X, Axis::Y] {
                let matrix = (&w[w1..], self.m, self.d + self.x, self.d + self.c);
                gather_position_columns(out, matrix, axis, p);
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

/// Appends to `out`, row by row, the columns `first + f` for the features `f` along `axis`
/// of the first `rows` rows of `matrix` (rows `stride` apart). Column by column, so the
/// features are told apart once per column rather than once per element: this runs every
/// step, for every row of `w1`.
fn gather_position_columns(
    out: &mut Vec<f32>,
    (matrix, rows, stride, first): (&[f32], usize, usize, usize),
    axis: Axis,
    p: usize,
) {
    let n = features_along(axis, p).count();
    let start = out.len();
    out.resize(start + rows * n, 0.0);
    let gathered = &mut out[start..];
    for (j, f) in features_along(axis, p).enumerate() {
        for row in 0..rows {
            gathered[row * n + j] = matrix[row * stride + first + f];
        }
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
    /// The lanes of a panel's row sums of `G_h` ([`add_row_and_column_sums`]).
    gh_lanes: Vec<f32>,
    f: Vec<f32>,
    gf: Vec<f32>,
    gu: Vec<f32>,
    dq: Vec<f32>,
    xk: Vec<f32>,
    xv: Vec<f32>,
    /// `dz` of every cell, `[9][nc]`, for the position embeddings' gradients.
    dz: Vec<f32>,
    /// The unit's sums for the position columns of `dWk`, `dWv`, `dWq`
    /// ([`ProjectionSums`]): per column `[7][D][wr]`, per row `[unit rows][7][D]`, and
    /// the current row's lanes `[7][D]`.
    proj_col: Vec<f32>,
    proj_row: Vec<f32>,
    proj_lanes: Vec<F8>,
    /// One axis' position columns of a projection gradient, before they are scattered.
    dw_pos: Vec<f32>,
    lanes: Vec<F8>,
    reduce: gemm::ReduceScratch,
    /// `[U; S]` transposed, for the panels of `dW1`, and their product before it is added.
    uxt: gemm::Transposed,
    product: Vec<f32>,
}

impl Scratch {
    fn ensure(&mut self, l: &DenseLayout, np: usize, nc: usize, geo: &Geometry) {
        let (c, d) = (l.c, l.d);
        self.proj_col.resize(PROJECTION_SUMS * d * geo.wr, 0.0);
        self.proj_row
            .resize(geo.unit_rows * PROJECTION_SUMS * d, 0.0);
        self.proj_lanes.resize(PROJECTION_SUMS * d, F8::ZERO);
        self.dw_pos.resize(d * l.px.max(l.py), 0.0);
        self.xp.resize(c * np, 0.0);
        self.qkv.resize(3 * d * np, 0.0);
        self.ux.resize((d + c) * nc, 0.0);
        self.att.resize(NEIGHBOURS * nc, 0.0);
        self.qc.resize(d * nc, 0.0);
        self.h.resize(l.m * nc, 0.0);
        self.gh.resize(l.m.min(MLP_PANEL) * nc, 0.0);
        // Lanes of the widest vector, F16.
        let rows = nc.div_ceil(geo.wr);
        self.gh_lanes.resize(l.m.min(MLP_PANEL) * rows * 16, 0.0);
        self.f.resize(l.c * nc, 0.0);
        self.gf.resize(l.c * nc, 0.0);
        self.gu.resize(d * nc, 0.0);
        self.dq.resize(d * nc, 0.0);
        self.xk.resize(c * nc, 0.0);
        self.xv.resize(c * nc, 0.0);
        self.dz.resize(NEIGHBOURS * nc, 0.0);
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
    /// The `X` features along a row, `[PX][wr]` (zero past the grid), and the `Y`
    /// features down a column, `[PY][hr]`.
    pos_x: Vec<f32>,
    pos_y: Vec<f32>,
    /// The `X` features with a zero on each side, `[PX][wr + 2]`: feature `j` at column
    /// `x` (−1 ≤ x ≤ wr) is `pos_xp[j·(wr + 2) + x + 1]`.
    pos_xp: Vec<f32>,
    /// Rows rounded up to whole vectors.
    hr: usize,
    /// The pass's position terms ([`PositionTerms`]): `[3D][wr]`, `[3D][hr]` for the
    /// projection, `[M][wr]`, `[M][hr]` (with `b1`) for the MLP.
    terms: Vec<f32>,
    /// Row-planar output `[B][H][C][wr]`.
    out: Vec<f32>,
    /// Row-planar attention `[B][H][9][wr]`.
    attention: Vec<f32>,
    /// One gradient vector per unit: the parameters' gradients and the loss, then
    /// (with the MLP) the unit's column sums of `G_h`, `[M][wr]`.
    partials: Vec<f32>,
    /// Length of one of [`DenseWorkspace::partials`]' vectors.
    partial_len: usize,
    /// Row sums of `G_h`, `[B][units][unit rows][M]`: each unit writes its own rows.
    row_sums: Vec<f32>,
    /// `dW1`'s position columns of one axis, `[M][PX]` or `[PY][M]`, before they are
    /// scattered into [`DenseWorkspace::grads`].
    dw1_pos: Vec<f32>,
    reduce_scratch: gemm::ReduceScratch,
    /// Reduced gradients in [`FlatLayout`] order, then the loss (then the column sums).
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
    derived: Derived<'a>,
    /// Position terms of the projection (without bias) and of the MLP (with `b1`),
    /// per column (`wr` apart) and per row (`hr` apart).
    q_col: &'a [f32],
    q_row: &'a [f32],
    h_col: &'a [f32],
    h_row: &'a [f32],
    /// [`DenseWorkspace::pos_xp`] and the `Y` features `[PY][hr]`.
    pos_xp: &'a [f32],
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
            pos_x: Vec::new(),
            pos_y: Vec::new(),
            pos_xp: Vec::new(),
            hr: 0,
            terms: Vec::new(),
            out: Vec::new(),
            attention: Vec::new(),
            partials: Vec::new(),
            partial_len: 0,
            row_sums: Vec::new(),
            dw1_pos: Vec::new(),
            reduce_scratch: gemm::ReduceScratch::default(),
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
        let pos = match self.octaves {
            Some(oct) => nca_api::position::features(oct, geo.h, geo.w).into_data(),
            None => Vec::new(),
        };
        let (plane, p) = (geo.h * geo.w, pos.len() / (geo.h * geo.w).max(1));
        let hr = geo.h.div_ceil(ALIGN) * ALIGN;
        let (mut pos_x, mut pos_y) = (Vec::new(), Vec::new());
        for f in 0..p {
            let feature = &pos[f * plane..(f + 1) * plane];
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
        self.pos_xp = pos_x
            .chunks_exact(geo.wr)
            .flat_map(|row| std::iter::once(0.0).chain(row.iter().copied()).chain([0.0]))
            .collect();
        (self.pos_x, self.pos_y, self.hr) = (pos_x, pos_y, hr);
        self.terms.resize((3 * l.d + l.m) * (geo.wr + hr), 0.0);
        self.chunk_rows = CHUNK_CELLS.div_ceil(geo.wr).clamp(1, geo.unit_rows);
        self.out.resize(geo.b * geo.h * l.c * geo.wr, 0.0);
        self.attention.clear();
        // The position columns of `dW1` are made once per pass from sums of `G_h` over
        // the whole grid (`PositionGradients`), not per unit: a unit of a
        // 32×32 grid would pay for a whole row's product to use a quarter of it.
        let units = geo.b * geo.units_per_item;
        self.partial_len = l.partial_len() + l.m * geo.wr;
        self.partials.resize(units * self.partial_len, 0.0);
        // One float per unit without the MLP: the units' slices of it must not be empty.
        self.row_sums
            .resize(units * (geo.unit_rows * l.m).max(1), 0.0);
        self.dw1_pos.resize(l.m * l.px.max(l.py), 0.0);
        self.grads.resize(self.partial_len, 0.0);
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
            derived,
            q_col,
            q_row,
            h_col,
            h_row,
            pos_xp: &self.pos_xp,
            pos_y: &self.pos_y,
            hr,
            target,
            mode,
        };
        let scratch = &self.scratch;
        let plen = self.partial_len;
        let per_item = geo.units_per_item;
        let out_unit = geo.unit_rows * l.c * geo.wr;
        let att_unit = geo.unit_rows * NEIGHBOURS * geo.wr;
        let rows_unit = (geo.unit_rows * l.m).max(1);
        let run = |unit: usize, o: &mut [f32], a: &mut [f32], (p, r): (&mut [f32], &mut [f32])| {
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
                row_sums: r,
            });
        };
        let out_items = self.out.par_chunks_mut(geo.h * l.c * geo.wr);
        let part_items = self.partials.par_chunks_mut(per_item * plen);
        let row_items = self.row_sums.par_chunks_mut(per_item * rows_unit);
        let units = |o, p, r| unit_slices((o, p, r), (out_unit, plen, rows_unit));
        if attention {
            out_items
                .zip(self.attention.par_chunks_mut(geo.h * NEIGHBOURS * geo.wr))
                .zip(part_items.zip(row_items))
                .enumerate()
                .for_each(|(bi, ((o, a), (p, r)))| {
                    units(o, p, r)
                        .zip(a.par_chunks_mut(att_unit))
                        .for_each(|((u, (o, pr)), a)| run(bi * per_item + u, o, a, pr));
                });
        } else {
            out_items
                .zip(part_items.zip(row_items))
                .enumerate()
                .for_each(|(bi, (o, (p, r)))| {
                    units(o, p, r).for_each(|(u, (o, pr))| run(bi * per_item + u, o, &mut [], pr));
                });
        }
    }

    /// Sums the units' gradients in unit order into [`DenseWorkspace::grads`], then adds
    /// the position columns of `dW1` and `db1` made from the sums of `G_h`.
    pub fn reduce(&mut self) {
        let plen = self.partial_len;
        let partials = &self.partials;
        // Slices of the vector in parallel; each element still sums the units in order.
        const SLICE: usize = 4096;
        self.grads
            .par_chunks_mut(SLICE)
            .enumerate()
            .for_each(|(i, grads)| {
                grads.fill(0.0);
                let at = i * SLICE;
                for part in partials.chunks_exact(plen) {
                    for (g, p) in grads.iter_mut().zip(&part[at..]) {
                        *g += *p;
                    }
                }
            });
        let Some(geo) = self.geo else { return };
        if self.l.mlp.is_some() {
            simd::run(PositionGradients {
                l: self.l,
                geo,
                grads: &mut self.grads,
                row_sums: &self.row_sums,
                pos_x: &self.pos_x,
                pos_y: &self.pos_y,
                hr: self.hr,
                dw: &mut self.dw1_pos,
                scratch: &mut self.reduce_scratch,
            });
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

/// A batch item's output, gradient and row-sum buffers split into its units', numbered.
fn unit_slices<'a>(
    (out, partials, row_sums): (&'a mut [f32], &'a mut [f32], &'a mut [f32]),
    (out_unit, partial_len, rows_unit): (usize, usize, usize),
) -> impl IndexedParallelIterator<Item = (usize, UnitSlices<'a>)> {
    out.par_chunks_mut(out_unit)
        .zip(
            partials
                .par_chunks_mut(partial_len)
                .zip(row_sums.par_chunks_mut(rows_unit)),
        )
        .enumerate()
}

/// One unit's output, and its gradient vector and row sums.
type UnitSlices<'a> = (&'a mut [f32], (&'a mut [f32], &'a mut [f32]));

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
    /// The unit's rows of [`DenseWorkspace::row_sums`].
    row_sums: &'a mut [f32],
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
        let (out, att, partial, row_sums) = (self.out, self.att, self.partial, self.row_sums);
        let (l, geo) = (ctx.l, ctx.geo);
        let bi = unit / geo.units_per_item;
        let y0 = (unit % geo.units_per_item) * geo.unit_rows;
        let rows = out.len() / (l.c * geo.wr);
        // The column sums of `G_h` after the gradients are written, not added to, by the
        // unit's first chunk (`add_row_and_column_sums`): zeroing them was most of the
        // 3 % of a 128×128 step that `perf` showed in `memset`.
        partial[..l.partial_len()].fill(0.0);
        s.lanes.fill(F8::ZERO);
        if ctx.mode == Mode::Train {
            // Only the backward pass sums into these; a rollout step skips the fill.
            row_sums.fill(0.0);
            s.proj_col.fill(0.0);
            s.proj_row.fill(0.0);
        }
        let (partial, col_sums) = partial.split_at_mut(l.partial_len());
        let mut sums = GhSums {
            col: col_sums,
            row: row_sums,
        };
        let mut r0 = 0;
        while r0 < rows {
            let n = ctx.chunk_rows.min(rows - r0);
            let o = &mut out[r0 * l.c * geo.wr..(r0 + n) * l.c * geo.wr];
            let a = if att.is_empty() {
                &mut [][..]
            } else {
                &mut att[r0 * NEIGHBOURS * geo.wr..(r0 + n) * NEIGHBOURS * geo.wr]
            };
            chunk_body::<D, A, V>(ctx, s, bi, (y0 + r0, r0), n, o, a, partial, &mut sums);
            r0 += n;
        }
        if ctx.mode != Mode::Train {
            return;
        }
        projection_position_gradients::<V, A>(ctx, s, y0, rows, partial);
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

/// Adds the gradients of one axis' position columns, `dw[i·row_step + j·feature_step]`
/// for row `i < rows` and the `j`-th feature along `axis`, into the weight matrix at
/// `out[weight..]` whose rows are `stride` apart and whose position inputs start at
/// column `first`.
fn add_position_columns(
    out: &mut [f32],
    (weight, stride, first): (usize, usize, usize),
    axis: Axis,
    p: usize,
    (rows, dw): (usize, &[f32]),
    (row_step, feature_step): (usize, usize),
) {
    for (j, f) in features_along(axis, p).enumerate() {
        for i in 0..rows {
            out[weight + i * stride + first + f] += dw[i * row_step + j * feature_step];
        }
    }
}

/// Where a unit's chunks add the sums of `G_h`: along each grid row into `row`
/// (`[unit rows][M]`), across the rows into `col` (`[M][wr]`).
struct GhSums<'a> {
    col: &'a mut [f32],
    row: &'a mut [f32],
}

/// `dW1`'s position columns and `db1` from the grid's sums of `G_h`, added to the reduced
/// gradients: `dW1_X += colsum·p_Xᵀ`, `dW1_Y += rowsum·p_Yᵀ`, `db1 += Σ rowsum`.
struct PositionGradients<'a> {
    l: DenseLayout,
    geo: Geometry,
    /// The reduced gradients, the column sums after the loss.
    grads: &'a mut [f32],
    row_sums: &'a [f32],
    pos_x: &'a [f32],
    pos_y: &'a [f32],
    hr: usize,
    dw: &'a mut [f32],
    scratch: &'a mut gemm::ReduceScratch,
}

impl Kernel for PositionGradients<'_> {
    const WIDE: bool = false;
    type Output = ();
    #[inline(always)]
    fn body<A: MulAdd, V: Vector>(self) {
        let (l, geo) = (self.l, self.geo);
        let Some((w1, b1)) = l.mlp else { return };
        let (m, wr) = (l.m, geo.wr);
        let (stride, first) = (l.d + l.x, l.d + l.c);
        let p = l.x - l.c;
        let (grads, col_sums) = self.grads.split_at_mut(l.partial_len());
        let dw = &mut self.dw[..m * l.px.max(l.py)];
        // Rows of the grid in order, batch item by item; a unit's rows past the grid's
        // last are zero.
        let item_rows = geo.units_per_item * geo.unit_rows;
        let rows = self.row_sums.chunks_exact(m).enumerate();
        let rows = rows.filter(|(g, _)| g % item_rows < geo.h);
        let db1 = &mut grads[b1..b1 + m];
        for (_, sums) in rows.clone() {
            for (d, &v) in db1.iter_mut().zip(sums) {
                *d += v;
            }
        }
        if l.px > 0 {
            let dw = &mut dw[..m * l.px];
            dw.fill(0.0);
            let dims = (m, l.px, wr);
            let scratch = self.scratch;
            gemm::reduce::<V, A>(dims, col_sums, wr, self.pos_x, wr, dw, (l.px, 1), scratch);
            let at = (w1, stride, first);
            add_position_columns(grads, at, Axis::X, p, (m, dw), (l.px, 1));
        }
        if l.py > 0 {
            // `[PY][M]`, so that the loop runs along the contiguous row sums.
            let dw = &mut dw[..l.py * m];
            dw.fill(0.0);
            for (g, sums) in rows {
                let y = g % item_rows;
                for j in 0..l.py {
                    let feature = self.pos_y[j * self.hr + y];
                    for (d, &v) in dw[j * m..(j + 1) * m].iter_mut().zip(sums) {
                        *d += feature * v;
                    }
                }
            }
            let at = (w1, stride, first);
            add_position_columns(grads, at, Axis::Y, p, (m, dw), (1, m));
        }
    }
}

/// Adds the sums of `G_h` (`pm` rows of `rows` grid rows `wr` apart, `nc` apart) for the
/// hidden units `p0..p0 + pm` along each grid row into `row[(at + r)·m + p0 + i]` and
/// across the rows into `col[(p0 + i)·wr..]`. `lanes` (`pm·rows` vectors) holds each row
/// sum's lanes until all are made: adding a vector's lanes right after summing it into
/// registers read them back through a store the CPU had not finished (about 2 % of a
/// 128×128 step); the lanes are added in [`Vector::sum`]'s order, so the sums are the same.
#[inline(always)]
fn add_row_and_column_sums<V: Vector>(
    (pm, rows, wr, nc): (usize, usize, usize, usize),
    gh: &[f32],
    sums: &mut GhSums<'_>,
    (m, p0, at): (usize, usize, usize),
    lanes: &mut [f32],
) {
    let lanes = &mut lanes[..pm * rows * V::LANES];
    for i in 0..pm {
        let col = &mut sums.col[(p0 + i) * wr..(p0 + i + 1) * wr];
        // Up to four rows per sweep, each column's running sum held in a register across
        // them: a sweep per row loaded and stored the column sums once per row (the
        // sweeps were about 4 % of a 128×128 step). The column sums still take the rows
        // in order.
        let mut r0 = 0;
        while r0 < rows {
            let gh = &gh[i * nc + r0 * wr..];
            let sums = &mut lanes[(i * rows + r0) * V::LANES..];
            // The unit's first rows start the column sums from zero (its `partial` was not
            // zeroed there).
            let fresh = at == 0 && r0 == 0;
            r0 += match rows - r0 {
                1 => sweep_rows::<V, 1>(gh, wr, (col, fresh), sums),
                2 => sweep_rows::<V, 2>(gh, wr, (col, fresh), sums),
                3 => sweep_rows::<V, 3>(gh, wr, (col, fresh), sums),
                _ => sweep_rows::<V, 4>(gh, wr, (col, fresh), sums),
            };
        }
    }
    for i in 0..pm {
        for r in 0..rows {
            let v = &mut lanes[(i * rows + r) * V::LANES..(i * rows + r + 1) * V::LANES];
            sums.row[(at + r) * m + p0 + i] += simd::halving_sum(v);
        }
    }
}

/// Adds `N` rows of `G_h` (`gh`, rows `wr` apart) to the column sums `col` (to zero
/// instead if `fresh`), taking the rows in order, and stores each row's lane sums into
/// `lanes`; returns `N`. The running column sums stay in registers across the rows (a
/// compile-time `N` keeps the row sums there too).
#[inline(always)]
fn sweep_rows<V: Vector, const N: usize>(
    gh: &[f32],
    wr: usize,
    (col, fresh): (&mut [f32], bool),
    lanes: &mut [f32],
) -> usize {
    let rows: [&[f32]; N] = std::array::from_fn(|k| &gh[k * wr..(k + 1) * wr]);
    let mut acc = [V::ZERO; N];
    for x0 in (0..wr).step_by(V::LANES) {
        let mut total = if fresh { V::ZERO } else { V::load(col, x0) };
        for k in 0..N {
            let v = V::load(rows[k], x0);
            acc[k] = acc[k] + v;
            total = total + v;
        }
        total.store(col, x0);
    }
    for k in 0..N {
        acc[k].store(lanes, k * V::LANES);
    }
    N
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
    sums: &mut GhSums<'_>,
) {
    let (l, geo, w) = (ctx.l, ctx.geo, ctx.w);
    let (c, d, x, m) = (l.c, width::<D>(l.d), l.x, l.m);
    let (wd, wp, wr, h) = (geo.w, geo.wp, geo.wr, geo.h);
    let np = padded_cells(rows, wp);
    let nc = rows * wr;
    let train = ctx.mode == Mode::Train;

    // 1. State of the padded rows y0-1 ..= y0+rows, zero outside the grid (the position
    //    inputs enter only through the position terms and sums).
    let xp = &mut s.xp[..c * np];
    xp.fill(0.0);
    for pr in 0..rows + 2 {
        let Some(y) = (y0 + pr).checked_sub(1).filter(|&y| y < h) else {
            continue;
        };
        for j in 0..c {
            let from = ((bi * c + j) * h + y) * wd;
            let to = j * np + pr * wp + 1;
            xp[to..to + wd].copy_from_slice(&ctx.state[from..from + wd]);
        }
    }
    let xp = &s.xp[..c * np];
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
        c,
        pk: ctx.derived.pk,
        pv: ctx.derived.pv,
    };
    attend_body::<D, A, V>(&view, &mut s.ux, &mut s.att, &mut s.qc);
    if !att.is_empty() {
        for r in 0..rows {
            for n in 0..NEIGHBOURS {
                let (from, to) = (n * nc + r * wr, (r * NEIGHBOURS + n) * wr);
                att[to..to + wr].copy_from_slice(&s.att[from..from + wr]);
            }
        }
    }

    // 3. Dense output.
    let ux = &s.ux[..(d + c) * nc];
    let f = &mut s.f[..c * nc];
    let bo = Start::Bias(&w[l.bo..l.bo + c]);
    if let Some((w1, _)) = l.mlp {
        let hb = &mut s.h[..m * nc];
        let position = Start::RowColumn {
            row: &ctx.h_row[y0..],
            row_stride: ctx.hr,
            column: &ctx.h_col[..m * wr],
            width: wr,
        };
        let dims = (m, d + c, nc);
        gemm::project::<V, A>(
            dims,
            &w[w1..],
            (d + x, 1),
            ux,
            nc,
            hb,
            nc,
            position,
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
        let stride = d + x;
        for p0 in (0..m).step_by(MLP_PANEL) {
            let pm = MLP_PANEL.min(m - p0);
            let gh = &mut s.gh[..pm * nc];
            let mask = Epilogue::Mask(&hb[p0 * nc..]);
            let wo_t = &w[l.wo + p0..];
            gemm::project::<V, A>((pm, c, nc), wo_t, (1, m), gf, nc, gh, nc, Start::Zero, mask);
            let gh = &s.gh[..pm * nc];
            let dims = (pm, rows, wr, nc);
            add_row_and_column_sums::<V>(dims, gh, sums, (m, p0, unit_row), &mut s.gh_lanes);
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
    let mut sums = ProjectionSums {
        col: &mut s.proj_col,
        row: &mut s.proj_row,
        lanes: &mut s.proj_lanes,
        active: x > c,
        y0,
        unit_row,
        h,
    };
    let mut out = AttentionGrads {
        dq: &mut s.dq,
        xk: &mut s.xk,
        xv: &mut s.xv,
        dz: &mut s.dz,
    };
    let inputs = (&s.att[..], &s.qc[..], &s.gu[..]);
    attend_back_body::<D, A, V>(&view, inputs, &mut out, &mut s.lanes, &mut sums);
    let xc = &ux[d * nc..];
    // Each runs transposed, `dWᵀ = X·Aᵀ`: `reduce` then transposes the D-row operand (two
    // whole vectors) instead of the `C + P`-row one, which it would pad to whole vectors.
    // A loop, not a closure: a closure would not inherit the caller's AVX2/FMA features.
    for (off, a, b) in [
        (l.wq, &s.dq[..d * nc], xc),
        (l.wk, &s.qc[..d * nc], &s.xk[..c * nc]),
        (l.wv, &s.gu[..d * nc], &s.xv[..c * nc]),
    ] {
        let out = &mut partial[off..];
        gemm::reduce::<V, A>((c, d, nc), b, nc, a, nc, out, (1, x), &mut s.reduce);
    }
}

/// A chunk's projected and input buffers, as the per-cell passes read them.
struct Chunk<'a> {
    /// `[Q; K; V]`, `3·D` rows of `np` padded cells.
    qkv: &'a [f32],
    /// The state, `C` rows of `np` padded cells.
    xp: &'a [f32],
    np: usize,
    nc: usize,
    wp: usize,
    wr: usize,
    wd: usize,
    rows: usize,
    d: usize,
    c: usize,
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

/// The block of a row of `wd` cells that starts at `x0`: whether it is a whole vector of
/// `V`, and the next block's start. Where the row's eight-lane blocks end inside a
/// vector, the block is eight lanes instead, so that exactly the lanes of the eight-lane
/// pass are computed whatever the vector width. (A helper taking a closure would be
/// simpler, but a closure is compiled without the caller's AVX features.)
#[inline(always)]
fn row_block<V: Vector>(wd: usize, x0: usize) -> (bool, usize) {
    if x0 + V::LANES <= wd.next_multiple_of(LANES) {
        (true, x0 + V::LANES)
    } else {
        (false, x0 + LANES)
    }
}

/// Forward attention of every cell of the chunk: writes `U` and `X_c` into `ux`, the
/// softmax weights into `att` and the queries into `qc`. Each lane is one cell, so the
/// results do not depend on the vector width `V`.
#[inline(always)]
fn attend_body<const D: usize, A: MulAdd, V: Vector>(
    v: &Chunk<'_>,
    ux: &mut [f32],
    att: &mut [f32],
    qc: &mut [f32],
) {
    for r in 0..v.rows {
        let mut x0 = 0;
        while x0 < v.wd {
            let (wide, next) = row_block::<V>(v.wd, x0);
            if wide {
                attend_block::<D, A, V>(v, (r, x0), ux, att, qc);
            } else {
                attend_block::<D, A, F8>(v, (r, x0), ux, att, qc);
            }
            x0 = next;
        }
    }
}

/// [`attend_body`] for the block of `V::LANES` cells at chunk row `r`, column `x0`.
#[inline(always)]
fn attend_block<const D: usize, A: MulAdd, V: Vector>(
    v: &Chunk<'_>,
    (r, x0): (usize, usize),
    ux: &mut [f32],
    att: &mut [f32],
    qc: &mut [f32],
) {
    let d = width::<D>(v.d);
    let (np, nc) = (v.np, v.nc);
    let cell = r * v.wr + x0;
    let at = neighbours_at(v, r, x0);
    let centre = at[NEIGHBOURS / 2];
    let mut q = [V::ZERO; MAX_DIM];
    for dd in 0..d {
        q[dd] = V::load(v.qkv, dd * np + centre);
        q[dd].store(qc, dd * nc + cell);
    }
    let mut a = [V::ZERO; NEIGHBOURS];
    let mut u = [V::ZERO; MAX_DIM];
    attention::forward::<A, V>(d, &q, &v.neighbourhood(d, at), &mut a, &mut u);
    for n in 0..NEIGHBOURS {
        a[n].store(att, n * nc + cell);
    }
    for dd in 0..d {
        u[dd].store(ux, dd * nc + cell);
    }
    for j in 0..v.c {
        V::load(v.xp, j * np + centre).store(ux, (d + j) * nc + cell);
    }
}

/// Where [`attend_back_body`] writes a chunk's per-cell results: `dq`, `Σ dz_n x_n`
/// (`xk`) and `Σ a_n x_n` (`xv`) for the state inputs, and `dz`.
struct AttentionGrads<'a> {
    dq: &'a mut [f32],
    xk: &'a mut [f32],
    xv: &'a mut [f32],
    dz: &'a mut [f32],
}

/// Attention backward of every cell of the chunk: `dq` into `dq`, `Σ dz_n x_n` into
/// `xk` and `Σ a_n x_n` into `xv` for the state inputs; bias and `pk`/`pv` gradients into
/// `lanes`; what the position columns of `dWq`, `dWk`, `dWv` need into `sums`. Sums
/// across cells are kept in eight-lane accumulators fed in cell order
/// ([`Vector::add_to`]), so they too are the same for every vector width.
#[inline(always)]
fn attend_back_body<const D: usize, A: MulAdd, V: Vector>(
    v: &Chunk<'_>,
    (att, qc, gu): (&[f32], &[f32], &[f32]),
    out: &mut AttentionGrads<'_>,
    lanes: &mut [F8],
    sums: &mut ProjectionSums<'_>,
) {
    let d = width::<D>(v.d);
    let (nc, wr) = (v.nc, v.wr);
    let grads = GradLanes {
        bq: 0,
        bk: d,
        bv: 2 * d,
        pk: 3 * d,
        pv: 3 * d + NEIGHBOURS * d,
    };
    for r in 0..v.rows {
        sums.lanes.fill(F8::ZERO);
        let mut x0 = 0;
        while x0 < v.wd {
            let (wide, next) = row_block::<V>(v.wd, x0);
            let block = BackBlock {
                v,
                r,
                x0,
                inputs: (att, qc, gu),
                grads,
            };
            if wide {
                block.run::<D, A, V>(out, lanes, sums);
            } else {
                block.run::<D, A, F8>(out, lanes, sums);
            }
            x0 = next;
        }
        if !sums.active {
            continue;
        }
        let row = &mut sums.row[(sums.unit_row + r) * PROJECTION_SUMS * d..];
        for (o, l) in row.iter_mut().zip(&sums.lanes[..PROJECTION_SUMS * d]) {
            *o += l.sum();
        }
    }
    let (rows, wd) = (v.rows, v.wd);
    let blocks = (0..rows).flat_map(move |r| (0..wd).step_by(LANES).map(move |x0| r * wr + x0));
    let dzs = &*out.dz;
    attention::embedding_gradients::<A>(d, nc, blocks, (dzs, att), (qc, gu), grads, lanes);
}

/// One block of [`attend_back_body`]: the cells at chunk row `r` from column `x0`.
struct BackBlock<'v, 'a> {
    v: &'v Chunk<'a>,
    r: usize,
    x0: usize,
    /// The softmax weights, queries and `∂L/∂u` of the chunk.
    inputs: (&'v [f32], &'v [f32], &'v [f32]),
    grads: GradLanes,
}

impl BackBlock<'_, '_> {
    /// Backward through the block's `V::LANES` cells.
    #[inline(always)]
    fn run<const D: usize, A: MulAdd, V: Vector>(
        self,
        out: &mut AttentionGrads<'_>,
        lanes: &mut [F8],
        sums: &mut ProjectionSums<'_>,
    ) {
        let (v, r, x0) = (self.v, self.r, self.x0);
        let (att, qc, gu) = self.inputs;
        let d = width::<D>(v.d);
        let (nc, wr) = (v.nc, v.wr);
        let cell = r * wr + x0;
        let at = neighbours_at(v, r, x0);
        let mut q = [V::ZERO; MAX_DIM];
        let mut g = [V::ZERO; MAX_DIM];
        for dd in 0..d {
            q[dd] = V::load(qc, dd * nc + cell);
            g[dd] = V::load(gu, dd * nc + cell);
        }
        let mut a = [V::ZERO; NEIGHBOURS];
        for n in 0..NEIGHBOURS {
            a[n] = V::load(att, n * nc + cell);
        }
        let nb = v.neighbourhood(d, at);
        let mut dz = [V::ZERO; NEIGHBOURS];
        let mut dqv = [V::ZERO; MAX_DIM];
        attention::backward::<A, V>(
            d, &q, &g, &a, &nb, self.grads, false, lanes, &mut dz, &mut dqv,
        );
        for dd in 0..d {
            dqv[dd].store(out.dq, dd * nc + cell);
        }
        for n in 0..NEIGHBOURS {
            dz[n].store(out.dz, n * nc + cell);
        }
        let (xk, xv) = (&mut *out.xk, &mut *out.xv);
        attention::input_sums::<A, V>(v.c, &v.inputs(at), &dz, &a, |j, sk, sv| {
            sk.store(xk, j * nc + cell);
            sv.store(xv, j * nc + cell);
        });
        // Without position inputs there is nothing to gather.
        if !sums.active {
            return;
        }
        // A neighbour row outside the grid has zero inputs: it drops out of the sums for
        // the column features (the row features are zero-padded instead).
        let y = sums.y0 + r;
        let row_inside = [y > 0, true, y + 1 < sums.h];
        // Column features: the neighbours at each column offset, over rows inside.
        let (mut col_k, mut col_v) = ([V::ZERO; 3], [V::ZERO; 3]);
        for dy in 0..3 {
            if row_inside[dy] {
                for dx in 0..3 {
                    col_k[dx] = col_k[dx] + dz[3 * dy + dx];
                    col_v[dx] = col_v[dx] + a[3 * dy + dx];
                }
            }
        }
        // Row features: the neighbours at each row offset, over columns inside.
        let (mut left, mut right) = ([0.0; MAX_LANES], [0.0; MAX_LANES]);
        for lane in 0..V::LANES {
            left[lane] = f32::from(u8::from(x0 + lane > 0));
            right[lane] = f32::from(u8::from(x0 + lane + 1 < v.wd));
        }
        let (left, right) = (V::load(&left, 0), V::load(&right, 0));
        let (mut row_k, mut row_v) = ([V::ZERO; 3], [V::ZERO; 3]);
        for dy in 0..3 {
            let n = 3 * dy;
            row_k[dy] = V::madd::<A>(dz[n], left, V::madd::<A>(dz[n + 2], right, dz[n + 1]));
            row_v[dy] = V::madd::<A>(a[n], left, V::madd::<A>(a[n + 2], right, a[n + 1]));
        }
        for dd in 0..d {
            for t in 0..3 {
                let ik = (t * d + dd) * wr + x0;
                let iv = ((3 + t) * d + dd) * wr + x0;
                V::madd::<A>(q[dd], col_k[t], V::load(sums.col, ik)).store(sums.col, ik);
                V::madd::<A>(g[dd], col_v[t], V::load(sums.col, iv)).store(sums.col, iv);
                let (lk, lv) = (t * d + dd, (3 + t) * d + dd);
                sums.lanes[lk] = V::madd_to::<A>(q[dd], row_k[t], sums.lanes[lk]);
                sums.lanes[lv] = V::madd_to::<A>(g[dd], row_v[t], sums.lanes[lv]);
            }
            let iq = (6 * d + dd) * wr + x0;
            (V::load(sums.col, iq) + dqv[dd]).store(sums.col, iq);
            sums.lanes[6 * d + dd] = dqv[dd].add_to(sums.lanes[6 * d + dd]);
        }
    }
}

/// Sums in which the position inputs' part of `dWk`, `dWv`, `dWq` is gathered: with `p`
/// a position feature of the column alone (or of the row alone) and every neighbour
/// offset `(dy, dx)`, `Σ_cells q ⊗ Σ_n dz_n p(neighbour n)` becomes
/// `Σ_dx Σ_x p(x + dx)·[Σ_y q·Σ_dy dz_(dy,dx)]`: one sum per column and offset (`col`),
/// one per row and offset (`row`), instead of a `P`-long product per cell. Seven sums of
/// `D` each: `dWk` by offset (3, with `q` and `dz`), `dWv` by offset (3, `g_u` and `a`),
/// `dWq` (the centre, `dq`).
struct ProjectionSums<'a> {
    /// `[7][D][wr]`, summed over the unit's rows.
    col: &'a mut [f32],
    /// `[unit rows][7][D]`.
    row: &'a mut [f32],
    /// The current row's sums in lanes, `[7][D]`.
    lanes: &'a mut [F8],
    /// Whether the model has position inputs (else the sums are not needed).
    active: bool,
    /// Grid row of the chunk's first row, its row in the unit, and the grid's height.
    y0: usize,
    unit_row: usize,
    h: usize,
}

/// Number of `D`-wide sums in [`ProjectionSums`].
const PROJECTION_SUMS: usize = 7;

/// The position columns of `dWk`, `dWv`, `dWq` from the unit's [`ProjectionSums`],
/// added to its gradient vector.
#[inline(always)]
fn projection_position_gradients<V: Vector, A: MulAdd>(
    ctx: &Ctx<'_>,
    s: &mut Scratch,
    y0: usize,
    rows: usize,
    partial: &mut [f32],
) {
    let (l, geo) = (ctx.l, ctx.geo);
    let (c, d, x, wr, h) = (l.c, l.d, l.x, geo.wr, geo.h);
    let p = x - c;
    // (first sum, weight, offsets): the centre alone for `dWq`.
    for (first, weight, offsets) in [(0, l.wk, 0..3), (3, l.wv, 0..3), (6, l.wq, 1..2)] {
        if l.px > 0 {
            let dw = &mut s.dw_pos[..d * l.px];
            dw.fill(0.0);
            for (i, dx) in offsets.clone().enumerate() {
                let sums = &s.proj_col[(first + i) * d * wr..];
                let features = &ctx.pos_xp[dx..];
                let dims = (d, l.px, wr);
                gemm::reduce::<V, A>(
                    dims,
                    sums,
                    wr,
                    features,
                    wr + 2,
                    dw,
                    (l.px, 1),
                    &mut s.reduce,
                );
            }
            add_position_columns(partial, (weight, x, c), Axis::X, p, (d, dw), (l.px, 1));
        }
        if l.py > 0 {
            let dw = &mut s.dw_pos[..l.py * d];
            dw.fill(0.0);
            for r in 0..rows {
                for (i, dy) in offsets.clone().enumerate() {
                    let Some(y) = (y0 + r + dy).checked_sub(1).filter(|&y| y < h) else {
                        continue;
                    };
                    let at = (r * PROJECTION_SUMS + first + i) * d;
                    let sums = &s.proj_row[at..at + d];
                    for j in 0..l.py {
                        let feature = ctx.pos_y[j * ctx.hr + y];
                        for (o, &v) in dw[j * d..(j + 1) * d].iter_mut().zip(sums) {
                            *o += feature * v;
                        }
                    }
                }
            }
            add_position_columns(partial, (weight, x, c), Axis::Y, p, (d, dw), (1, d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Separate, F16};

    /// Values of many sizes and both signs, the same for every call with one `seed`.
    fn noise(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
            })
            .collect()
    }

    /// Everything the per-cell attention passes write for one chunk.
    #[derive(Debug, PartialEq)]
    struct Written {
        forward: [Vec<f32>; 3],
        backward: [Vec<f32>; 4],
        lanes: Vec<F8>,
        sums: (Vec<f32>, Vec<f32>),
    }

    /// Runs both passes over a chunk `wd` cells wide (rows padded to sixteen) in vectors
    /// of `V`.
    fn attend_in<V: Vector>(wd: usize) -> Written {
        let (d, c, rows, h) = (4, 3, 2, 5);
        let wr = wd.next_multiple_of(ALIGN);
        let wp = wr + 2;
        let np = padded_cells(rows, wp);
        let nc = rows * wr;
        let (qkv, xp) = (noise(3 * d * np, 1), noise(c * np, 2));
        let (pk, pv) = (noise(NEIGHBOURS * d, 3), noise(NEIGHBOURS * d, 4));
        let view = Chunk {
            qkv: &qkv,
            xp: &xp,
            np,
            nc,
            wp,
            wr,
            wd,
            rows,
            d,
            c,
            pk: &pk,
            pv: &pv,
        };
        let (mut ux, mut att, mut qc) =
            (noise((d + c) * nc, 5), noise(9 * nc, 6), noise(d * nc, 7));
        attend_body::<0, Separate, V>(&view, &mut ux, &mut att, &mut qc);
        let gu = noise(d * nc, 8);
        let mut backward = [
            noise(d * nc, 9),
            noise(c * nc, 10),
            noise(c * nc, 11),
            noise(NEIGHBOURS * nc, 12),
        ];
        let [dq, xk, xv, dz] = &mut backward;
        let mut out = AttentionGrads { dq, xk, xv, dz };
        let mut lanes = vec![F8::splat(0.25); 3 * d + 2 * NEIGHBOURS * d];
        let (mut col, mut row) = (
            noise(PROJECTION_SUMS * d * wr, 13),
            noise(rows * PROJECTION_SUMS * d, 14),
        );
        let mut sum_lanes = vec![F8::ZERO; PROJECTION_SUMS * d];
        let mut sums = ProjectionSums {
            col: &mut col,
            row: &mut row,
            lanes: &mut sum_lanes,
            active: true,
            y0: 1,
            unit_row: 0,
            h,
        };
        attend_back_body::<0, Separate, V>(
            &view,
            (&att, &qc, &gu),
            &mut out,
            &mut lanes,
            &mut sums,
        );
        Written {
            forward: [ux, att, qc],
            backward,
            lanes,
            sums: (col, row),
        }
    }

    #[test]
    fn sixteen_lane_attention_writes_what_eight_lanes_write_bit_for_bit() {
        // 40: two wide blocks and an eight-lane one; 48: three wide blocks and no eight-lane
        // block; 13: one wide block, which covers the eight-lane pass's two.
        for wd in [40, 48, 13] {
            let (narrow, wide) = (attend_in::<F8>(wd), attend_in::<F16>(wd));
            assert!(narrow.forward[1].iter().all(|a| a.is_finite()));
            // Compared as bits: equal floats of another rounding would pass `==` on -0.0.
            let bits = |w: &Written| {
                format!(
                    "{:?}",
                    w.lanes
                        .iter()
                        .flat_map(|l| l.0)
                        .map(f32::to_bits)
                        .collect::<Vec<_>>()
                )
            };
            assert_eq!(bits(&narrow), bits(&wide), "lanes, width {wd}");
            assert_eq!(narrow, wide, "width {wd}");
        }
    }
}
