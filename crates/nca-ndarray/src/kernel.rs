//! The fused kernel: attention forward, loss and exact backward in one pass over cells.
//!
//! Layout. The state, keys and values are first written once into padded, row-planar
//! buffers (`[B][H+2][channel][W+2]`, [`Workspace::prepare`]): the 3×3 neighbourhood is
//! then nine fixed offsets, the one-cell border holds what zero padding implies (state 0,
//! key `bk`, value `bv`), and nothing is materialised nine times. The cell pass works on
//! blocks of eight neighbouring cells of a row at once ([`F8`] lanes), so every per-cell
//! operation is one vector operation and dot products need no horizontal sums. It
//! recomputes the query, scores, softmax and weighted sum in registers and, when
//! training, continues straight into the backward pass.
//!
//! Backward: the loss gives `g_f = 2(next − target)/N` on visible channels and
//! `g_u = woᵀ g_f`; the attention backward ([`crate::attention`], shared with the
//! picture model) gives everything else, with the block's own state as the inputs `x_n`.
//!
//! Determinism. Work is split into units of whole rows whose size depends only on the
//! grid shape; each unit accumulates its own gradient lanes and units are summed in
//! order, so results are bit-for-bit identical whatever the thread count.

// Index loops over compile-time channel/width constants are what unrolls and vectorises.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use rayon::prelude::*;

use nca_api::{FlatLayout, ModelConfig, Param, NEIGHBOURS};

use crate::attention::{self, GradLanes, Neighbourhood, Taps};
use crate::simd::{self, Kernel, MulAdd, Vector, F8, LANES};

/// Largest `attention_dim` the backend supports (its per-block scratch is sized for it).
pub const MAX_DIM: usize = 64;
/// Most channels (visible + hidden) the backend supports (its per-block scratch is sized
/// for them).
pub const MAX_CHANNELS: usize = 32;

/// Offsets of each tensor in the kernel's parameter (and gradient) vector: the
/// [`nca_api::FlatLayout`] offsets of the plain model, then, for a model without position
/// embeddings, `pk`/`pv` appended as private zeros (the kernel always adds them), then
/// the loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    pub c: usize,
    pub d: usize,
    pub wq: usize,
    pub bq: usize,
    pub wk: usize,
    pub bk: usize,
    pub wv: usize,
    pub bv: usize,
    pub wo: usize,
    pub bo: usize,
    pub pk: usize,
    pub pv: usize,
    /// Number of model parameters (the prefix shared with [`nca_api::Weights::flatten`]).
    pub params: usize,
    pub loss: usize,
    pub len: usize,
}

impl Layout {
    /// The layout of a plain model (no position inputs, no MLP), or `None` for any other.
    pub fn new(model: &ModelConfig) -> Option<Self> {
        if model.position_octaves.is_some() || model.mlp_hidden.is_some() {
            return None;
        }
        let flat = FlatLayout::new(model);
        let at = |param: Param| flat.offset(param);
        let (c, d) = (model.channels(), model.attention_dim);
        let nd = NEIGHBOURS * d;
        let params = flat.len();
        let (pk, pv, loss) = match (at(Param::Pk), at(Param::Pv)) {
            (Some(pk), Some(pv)) => (pk, pv, params),
            _ => (params, params + nd, params + 2 * nd),
        };
        Some(Self {
            c,
            d,
            wq: at(Param::Wq)?,
            bq: at(Param::Bq)?,
            wk: at(Param::Wk)?,
            bk: at(Param::Bk)?,
            wv: at(Param::Wv)?,
            bv: at(Param::Bv)?,
            wo: at(Param::Wo)?,
            bo: at(Param::Bo)?,
            pk,
            pv,
            params,
            loss,
            len: loss + 1,
        })
    }
}

/// Grid geometry and the derived work split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    /// Row length rounded up to whole blocks.
    pub wr: usize,
    /// Padded row length: `wr + 2`.
    pub wp: usize,
    /// Rows per work unit.
    pub unit_rows: usize,
    /// Work units per batch item.
    pub units_per_item: usize,
}

impl Geometry {
    pub fn new(b: usize, h: usize, w: usize) -> Self {
        Self::aligned(b, h, w, LANES, 64)
    }

    /// The geometry with rows padded to a multiple of `align` cells (a multiple of
    /// [`LANES`]), split into about `units` work units (at least 256 cells, at most 4,096
    /// each).
    pub fn aligned(b: usize, h: usize, w: usize, align: usize, units: usize) -> Self {
        // Enough units for both cores on small grids, few enough that the per-unit
        // gradient lanes stay small on large ones; depends only on the shape.
        let unit_cells = (b * h * w / units.max(1)).clamp(256, 4096);
        let unit_rows = unit_cells.div_ceil(w.max(1)).clamp(1, h.max(1));
        let wr = w.div_ceil(align) * align;
        Self {
            b,
            h,
            w,
            wr,
            wp: wr + 2,
            unit_rows,
            units_per_item: h.div_ceil(unit_rows),
        }
    }

    pub fn cells(&self) -> usize {
        self.b * self.h * self.w
    }

    pub fn padded_rows(&self) -> usize {
        self.b * (self.h + 2)
    }

    pub fn units(&self) -> usize {
        self.b * self.units_per_item
    }
}

/// What a cell pass computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Write `f(s)`.
    Update,
    /// Write `s + f(s)`.
    Next,
    /// Write `s + f(s)`, the loss and every gradient.
    Train,
}

/// Buffers reused across steps; resized only when the grid changes.
#[derive(Default)]
pub struct Workspace {
    geo: Option<Geometry>,
    layout: Layout,
    s_pad: Vec<f32>,
    k_pad: Vec<f32>,
    v_pad: Vec<f32>,
    /// Row-planar output `[B][H][C][wr]`.
    out: Vec<f32>,
    /// Row-planar attention `[B][H][9][wr]`.
    attention: Vec<f32>,
    /// Gradient lanes, `layout.len` per unit.
    partials: Vec<F8>,
    lanes: Vec<F8>,
    /// Reduced gradients and loss, in [`Layout`] order.
    pub grads: Vec<f32>,
}

/// Inputs shared by every block of a cell pass.
struct Ctx<'a> {
    w: &'a [f32],
    l: Layout,
    geo: Geometry,
    s_pad: &'a [f32],
    k_pad: &'a [f32],
    v_pad: &'a [f32],
    /// Row-planar target `[B][H][V][wr]`, zero in padding lanes.
    target: &'a [f32],
    visible: usize,
}

impl Workspace {
    /// Sizes every buffer for `geo` and `layout`; allocates only when they change.
    pub fn ensure(&mut self, geo: Geometry, layout: Layout) {
        if self.geo == Some(geo) && self.layout == layout {
            return;
        }
        let (c, d) = (layout.c, layout.d);
        let rows = geo.padded_rows();
        self.s_pad.resize(rows * c * geo.wp, 0.0);
        self.k_pad.resize(rows * d * geo.wp, 0.0);
        self.v_pad.resize(rows * d * geo.wp, 0.0);
        self.out.resize(geo.b * geo.h * c * geo.wr, 0.0);
        self.attention.clear();
        self.partials.resize(geo.units() * layout.len, F8::ZERO);
        self.lanes.resize(layout.len, F8::ZERO);
        self.grads.resize(layout.len, 0.0);
        self.geo = Some(geo);
        self.layout = layout;
    }

    /// Fills the padded state, key and value buffers from an NCHW state.
    pub fn prepare(&mut self, w: &[f32], state: &[f32]) {
        let (Some(geo), l) = (self.geo, self.layout) else {
            return;
        };
        let wp = geo.wp;
        self.s_pad
            .par_chunks_mut(l.c * wp)
            .zip(self.k_pad.par_chunks_mut(l.d * wp))
            .zip(self.v_pad.par_chunks_mut(l.d * wp))
            .enumerate()
            .for_each(|(row, ((s, k), v))| {
                simd::run(PrepareRow {
                    w,
                    l,
                    geo,
                    state,
                    row,
                    s,
                    k,
                    v,
                })
            });
    }

    /// Runs the cell pass; in train mode `target` is the row-planar target from
    /// [`row_planar_target`]. With `attention`, the softmax weights are kept too.
    pub fn cells(
        &mut self,
        w: &[f32],
        mode: Mode,
        target: &[f32],
        visible: usize,
        attention: bool,
    ) {
        let (Some(geo), l) = (self.geo, self.layout) else {
            return;
        };
        if attention {
            self.attention
                .resize(geo.b * geo.h * NEIGHBOURS * geo.wr, 0.0);
        }
        let ctx = Ctx {
            w,
            l,
            geo,
            s_pad: &self.s_pad,
            k_pad: &self.k_pad,
            v_pad: &self.v_pad,
            target,
            visible,
        };
        let out_unit = geo.unit_rows * l.c * geo.wr;
        let att_unit = geo.unit_rows * NEIGHBOURS * geo.wr;
        let per_item = geo.units_per_item;
        let run = |unit: usize, out: &mut [f32], att: &mut [f32], acc: &mut [F8]| {
            simd::run(UnitPass {
                ctx: &ctx,
                mode,
                unit,
                out,
                att,
                acc,
            })
        };
        // Units never straddle batch items, so split each item's rows separately.
        let out_items = self.out.par_chunks_mut(geo.h * l.c * geo.wr);
        let part_items = self.partials.par_chunks_mut(per_item * l.len);
        if attention {
            out_items
                .zip(self.attention.par_chunks_mut(geo.h * NEIGHBOURS * geo.wr))
                .zip(part_items)
                .enumerate()
                .for_each(|(bi, ((o, a), p))| {
                    o.par_chunks_mut(out_unit)
                        .zip(a.par_chunks_mut(att_unit))
                        .zip(p.par_chunks_mut(l.len))
                        .enumerate()
                        .for_each(|(u, ((o, a), p))| run(bi * per_item + u, o, a, p));
                });
        } else {
            out_items
                .zip(part_items)
                .enumerate()
                .for_each(|(bi, (o, p))| {
                    o.par_chunks_mut(out_unit)
                        .zip(p.par_chunks_mut(l.len))
                        .enumerate()
                        .for_each(|(u, (o, p))| run(bi * per_item + u, o, &mut [], p));
                });
        }
    }

    /// Sums the units' gradient lanes in unit order into [`Workspace::grads`].
    pub fn reduce(&mut self) {
        let len = self.layout.len;
        self.lanes.fill(F8::ZERO);
        for part in self.partials.chunks_exact(len) {
            for (acc, p) in self.lanes.iter_mut().zip(part) {
                *acc = *acc + *p;
            }
        }
        for (g, lanes) in self.grads.iter_mut().zip(&self.lanes) {
            *g = lanes.sum();
        }
    }

    /// Copies the last output (update or next state) into an NCHW slice.
    pub fn write_output(&self, dst: &mut [f32]) {
        let (Some(geo), c) = (self.geo, self.layout.c) else {
            return;
        };
        planar_to_nchw(&self.out, geo, c, dst);
    }

    /// Copies the last attention weights into an NCHW `[B][9][H][W]` slice.
    pub fn write_attention(&self, dst: &mut [f32]) {
        let Some(geo) = self.geo else { return };
        planar_to_nchw(&self.attention, geo, NEIGHBOURS, dst);
    }
}

/// `[B][H][K][wr]` → `[B][K][H][W]`.
pub fn planar_to_nchw(src: &[f32], geo: Geometry, k: usize, dst: &mut [f32]) {
    let (h, w, wr) = (geo.h, geo.w, geo.wr);
    dst.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(bk, plane)| {
            let (bi, ch) = (bk / k, bk % k);
            for y in 0..h {
                let from = ((bi * h + y) * k + ch) * wr;
                plane[y * w..y * w + w].copy_from_slice(&src[from..from + w]);
            }
        });
}

/// An NCHW `[B][V][H][W]` target as the row-planar `[B][H][V][wr]` the kernels read,
/// zero in the padding lanes.
pub fn row_planar_target(target: &[f32], v: usize, geo: Geometry) -> Vec<f32> {
    let (b, h, w) = (geo.b, geo.h, geo.w);
    let mut out = vec![0.0; b * h * v * geo.wr];
    for bi in 0..b {
        for ch in 0..v {
            for y in 0..h {
                let from = ((bi * v + ch) * h + y) * w;
                let to = ((bi * h + y) * v + ch) * geo.wr;
                out[to..to + w].copy_from_slice(&target[from..from + w]);
            }
        }
    }
    out
}

/// Calls `$recv.$f::<C, D, A>()` with the channel count and attention width as
/// compile-time constants for the common shapes (0 = known only at run time) so the
/// per-block loops unroll.
///
/// Only the default shape (C = 3, D = 16) and D = 16 with any C are specialised: each
/// specialisation is one more optimised copy of the kernel per instruction set, and the
/// four dropped ones (here C = 4, D = 8 and D = 32; D = 8 in `dense.rs`) were about 40 %
/// of this crate's build time (344 s → 205 s for this crate in one cold `cargo build -p
/// nca-cli` each, same load) for shapes no example uses; those run the run-time-shape
/// path: the same arithmetic with run-time loop bounds.
macro_rules! by_shape {
    ($c:expr, $d:expr, $recv:ident.$f:ident::<$a:ident>()) => {
        match ($c, $d) {
            (3, 16) => $recv.$f::<3, 16, $a>(),
            (_, 16) => $recv.$f::<0, 16, $a>(),
            _ => $recv.$f::<0, 0, $a>(),
        }
    };
}

/// `N` if it is a compile-time shape, else the run-time value.
#[inline(always)]
fn shape<const N: usize>(runtime: usize) -> usize {
    if N == 0 {
        runtime
    } else {
        N
    }
}

/// One padded row of the state, key and value buffers.
struct PrepareRow<'a> {
    w: &'a [f32],
    l: Layout,
    geo: Geometry,
    state: &'a [f32],
    row: usize,
    s: &'a mut [f32],
    k: &'a mut [f32],
    v: &'a mut [f32],
}

impl Kernel for PrepareRow<'_> {
    const WIDE: bool = false;
    type Output = ();
    #[inline(always)]
    fn body<A: MulAdd, V: Vector>(self) {
        by_shape!(self.l.c, self.l.d, self.fill::<A>())
    }
}

impl PrepareRow<'_> {
    #[inline(always)]
    fn fill<const C: usize, const D: usize, A: MulAdd>(self) {
        let (w, l, geo, state, row) = (self.w, self.l, self.geo, self.state, self.row);
        let (s, k, v) = (self.s, self.k, self.v);
        let (c, d) = (shape::<C>(l.c), shape::<D>(l.d));
        let (h, wd, wp) = (geo.h, geo.w, geo.wp);
        let (bi, yp) = (row / (h + 2), row % (h + 2));
        s.fill(0.0);
        if yp != 0 && yp != h + 1 {
            for ch in 0..c {
                let from = ((bi * c + ch) * h + yp - 1) * wd;
                s[ch * wp + 1..ch * wp + 1 + wd].copy_from_slice(&state[from..from + wd]);
            }
        }
        // Border cells have state 0, so the same loop leaves exactly the bias there.
        for dd in 0..d {
            let (kr, vr) = (&mut k[dd * wp..dd * wp + wp], &mut v[dd * wp..dd * wp + wp]);
            kr.fill(w[l.bk + dd]);
            vr.fill(w[l.bv + dd]);
            for ch in 0..c {
                let (wk, wv) = (w[l.wk + dd * c + ch], w[l.wv + dd * c + ch]);
                let sr = &s[ch * wp..ch * wp + wp];
                for x in 0..wp {
                    kr[x] += wk * sr[x];
                    vr[x] += wv * sr[x];
                }
            }
        }
    }
}

/// One work unit of the cell pass.
struct UnitPass<'a, 'c> {
    ctx: &'a Ctx<'c>,
    mode: Mode,
    unit: usize,
    out: &'a mut [f32],
    att: &'a mut [f32],
    acc: &'a mut [F8],
}

impl Kernel for UnitPass<'_, '_> {
    const WIDE: bool = false;
    type Output = ();
    #[inline(always)]
    fn body<A: MulAdd, V: Vector>(self) {
        by_shape!(self.ctx.l.c, self.ctx.l.d, self.cells::<A>())
    }
}

impl UnitPass<'_, '_> {
    #[inline(always)]
    fn cells<const C: usize, const D: usize, A: MulAdd>(self) {
        let (ctx, mode, unit) = (self.ctx, self.mode, self.unit);
        let (out, att, acc) = (self.out, self.att, self.acc);
        let (c, d) = (shape::<C>(ctx.l.c), shape::<D>(ctx.l.d));
        let geo = ctx.geo;
        let bi = unit / geo.units_per_item;
        let y0 = (unit % geo.units_per_item) * geo.unit_rows;
        let rows = out.len() / (c * geo.wr);
        acc.fill(F8::ZERO);
        for y in y0..y0 + rows {
            let out_row = &mut out[(y - y0) * c * geo.wr..(y - y0 + 1) * c * geo.wr];
            for x0 in (0..geo.w).step_by(LANES) {
                let att_row = if att.is_empty() {
                    None
                } else {
                    Some(
                        &mut att
                            [(y - y0) * NEIGHBOURS * geo.wr..(y - y0 + 1) * NEIGHBOURS * geo.wr],
                    )
                };
                block::<A>(c, d, ctx, mode, bi, y, x0, out_row, att_row, acc);
            }
        }
    }
}

/// Eight cells `(y, x0..x0+8)` of item `bi`: forward, and in train mode the loss and
/// backward into the lane accumulators `acc`.
#[inline(always)]
fn block<A: MulAdd>(
    c: usize,
    d: usize,
    ctx: &Ctx<'_>,
    mode: Mode,
    bi: usize,
    y: usize,
    x0: usize,
    out_row: &mut [f32],
    att_row: Option<&mut [f32]>,
    acc: &mut [F8],
) {
    let (w, l, geo) = (ctx.w, ctx.l, ctx.geo);
    let (wp, wr) = (geo.wp, geo.wr);
    // Start of each neighbour's lanes in channel 0 of the padded buffers.
    let mut s_at = [0usize; NEIGHBOURS];
    let mut kv_at = [0usize; NEIGHBOURS];
    for n in 0..NEIGHBOURS {
        let (dy, dx) = (n / 3, n % 3);
        let row = bi * (geo.h + 2) + y + dy;
        s_at[n] = row * c * wp + x0 + dx;
        kv_at[n] = row * d * wp + x0 + dx;
    }
    let centre = NEIGHBOURS / 2;
    let states = Taps {
        buf: ctx.s_pad,
        at: s_at,
        stride: wp,
    };
    let nb = Neighbourhood {
        keys: Taps {
            buf: ctx.k_pad,
            at: kv_at,
            stride: wp,
        },
        values: Taps {
            buf: ctx.v_pad,
            at: kv_at,
            stride: wp,
        },
        pk: &w[l.pk..l.pk + NEIGHBOURS * d],
        pv: &w[l.pv..l.pv + NEIGHBOURS * d],
    };

    let mut s = [F8::ZERO; MAX_CHANNELS];
    for ch in 0..c {
        s[ch] = states.load(centre, ch);
    }
    let mut q = [F8::ZERO; MAX_DIM];
    for dd in 0..d {
        let mut v = F8::splat(w[l.bq + dd]);
        for ch in 0..c {
            v = A::madd(F8::splat(w[l.wq + dd * c + ch]), s[ch], v);
        }
        q[dd] = v;
    }
    let mut a = [F8::ZERO; NEIGHBOURS];
    let mut u = [F8::ZERO; MAX_DIM];
    attention::forward::<A, F8>(d, &q, &nb, &mut a, &mut u);
    if let Some(att) = att_row {
        for n in 0..NEIGHBOURS {
            a[n].store(att, n * wr + x0);
        }
    }

    let mut next = [F8::ZERO; MAX_CHANNELS];
    for ch in 0..c {
        let mut f = F8::splat(w[l.bo + ch]);
        for dd in 0..d {
            f = A::madd(F8::splat(w[l.wo + ch * d + dd]), u[dd], f);
        }
        next[ch] = if mode == Mode::Update { f } else { s[ch] + f };
        next[ch].store(out_row, ch * wr + x0);
    }
    if mode != Mode::Train {
        return;
    }

    // Loss and dL/df on the visible channels; padding lanes have target 0 and mask 0.
    let valid = geo.w - x0;
    let mut mask = F8::ZERO;
    for lane in 0..LANES.min(valid) {
        mask.0[lane] = 1.0;
    }
    let norm = F8::splat(2.0 / (geo.cells() * ctx.visible) as f32);
    let t_row = (bi * geo.h + y) * ctx.visible * wr;
    let mut gu = [F8::ZERO; MAX_DIM];
    let mut sq = F8::ZERO;
    for ch in 0..ctx.visible {
        let diff = (next[ch] - F8::load(ctx.target, t_row + ch * wr + x0)) * mask;
        sq = A::madd(diff, diff, sq);
        let gf = norm * diff;
        acc[l.bo + ch] = acc[l.bo + ch] + gf;
        for dd in 0..d {
            let i = l.wo + ch * d + dd;
            acc[i] = A::madd(gf, u[dd], acc[i]);
            gu[dd] = A::madd(F8::splat(w[i]), gf, gu[dd]);
        }
    }
    acc[l.loss] = acc[l.loss] + sq;

    let lanes = GradLanes {
        bq: l.bq,
        bk: l.bk,
        bv: l.bv,
        pk: l.pk,
        pv: l.pv,
    };
    let mut dz = [F8::ZERO; NEIGHBOURS];
    let mut dq = [F8::ZERO; MAX_DIM];
    attention::backward::<A, F8>(d, &q, &gu, &a, &nb, lanes, true, acc, &mut dz, &mut dq);
    let mut sk = [F8::ZERO; MAX_CHANNELS];
    let mut sv = [F8::ZERO; MAX_CHANNELS];
    attention::input_sums::<A, F8>(c, &states, &dz, &a, |ch, k, v| {
        sk[ch] = k;
        sv[ch] = v;
    });
    for dd in 0..d {
        for ch in 0..c {
            let i = dd * c + ch;
            acc[l.wq + i] = A::madd(dq[dd], s[ch], acc[l.wq + i]);
            acc[l.wk + i] = A::madd(q[dd], sk[ch], acc[l.wk + i]);
            acc[l.wv + i] = A::madd(gu[dd], sv[ch], acc[l.wv + i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_cover_every_row_once() {
        for (b, h, w) in [
            (1, 1, 1),
            (1, 5, 700),
            (1, 32, 32),
            (2, 33, 17),
            (8, 128, 128),
            (8, 512, 512),
        ] {
            let g = Geometry::new(b, h, w);
            assert!(g.unit_rows * g.units_per_item >= h);
            assert!(g.unit_rows * (g.units_per_item - 1) < h);
            assert!(g.wr >= w && g.wr.is_multiple_of(LANES));
        }
    }
}
