//! The fused per-cell kernel: attention forward, loss and exact backward in one pass.
//!
//! Layout. Keys, values and the state are first projected once per cell into padded,
//! channel-last buffers (`prepare`): the 3×3 neighbourhood is then nine fixed offsets
//! into those buffers, and the one-cell border holds what zero padding implies (state 0,
//! key `bk`, value `bv`) so the hot loop has no bounds branches and never materialises
//! nine shifted copies. The cell pass (`cells`) recomputes the query, scores, softmax
//! and weighted sum in registers; in training mode it continues straight into the
//! backward pass and accumulates weight gradients into a small per-work-unit buffer.
//!
//! Backward, for one cell p with neighbours n (derivation in the crate README):
//! `dz_n = a_n (g_u·ṽ_n − Σ_m a_m g_u·ṽ_m)`, `dq = s Σ_n dz_n k̃_n`,
//! `dWk += s q ⊗ Σ_n dz_n s_n`, `dWv += g_u ⊗ Σ_n a_n s_n`, `dpk_n += s dz_n q`,
//! `dpv_n += a_n g_u` (s = 1/√D, k̃/ṽ include the position embeddings).
//!
//! Work is split into units of whole rows whose size depends only on the grid shape, and
//! per-unit partial sums are added in unit order, so results are bit-for-bit reproducible
//! whatever the thread count.

// Index loops over compile-time channel/width constants are what unrolls and vectorises.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use nca_api::NEIGHBOURS;

/// Largest attention dimension the stack-allocated per-cell scratch supports.
pub const MAX_DIM: usize = 128;
/// Largest channel count the stack-allocated per-cell scratch supports.
pub const MAX_CHANNELS: usize = 64;
/// Target number of cells per parallel work unit.
const CELLS_PER_UNIT: usize = 512;

/// Parameters in the layout the kernel reads: projections transposed to `[C][D]` so a
/// query is `b + Σ_c s_c · row_c`, a contiguous D-vector operation.
#[derive(Clone, Debug, Default)]
pub struct KernelParams {
    pub c: usize,
    pub d: usize,
    pub wq_t: Vec<f32>,
    pub wk_t: Vec<f32>,
    pub wv_t: Vec<f32>,
    pub bq: Vec<f32>,
    pub bk: Vec<f32>,
    pub bv: Vec<f32>,
    /// `[C][D]`, as stored.
    pub wo: Vec<f32>,
    pub bo: Vec<f32>,
    /// `[9][D]`; zeros without position embeddings.
    pub pk: Vec<f32>,
    pub pv: Vec<f32>,
}

/// Offsets of each gradient inside one flat per-unit buffer (kernel layout).
#[derive(Clone, Copy, Debug, Default)]
pub struct GradLayout {
    pub wq_t: usize,
    pub wk_t: usize,
    pub wv_t: usize,
    pub bq: usize,
    pub bk: usize,
    pub bv: usize,
    pub wo: usize,
    pub bo: usize,
    pub pk: usize,
    pub pv: usize,
    pub loss: usize,
    pub len: usize,
}

impl GradLayout {
    pub fn new(c: usize, d: usize) -> Self {
        let mut at = 0;
        let mut take = |n: usize| {
            let start = at;
            at += n;
            start
        };
        let wq_t = take(c * d);
        let wk_t = take(c * d);
        let wv_t = take(c * d);
        let bq = take(d);
        let bk = take(d);
        let bv = take(d);
        let wo = take(c * d);
        let bo = take(c);
        let pk = take(NEIGHBOURS * d);
        let pv = take(NEIGHBOURS * d);
        let loss = take(1);
        Self {
            wq_t,
            wk_t,
            wv_t,
            bq,
            bk,
            bv,
            wo,
            bo,
            pk,
            pv,
            loss,
            len: at,
        }
    }
}

/// Grid geometry and the derived work split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    /// Rows per work unit.
    pub unit_rows: usize,
    /// Work units per batch item.
    pub units_per_item: usize,
}

impl Geometry {
    pub fn new(b: usize, h: usize, w: usize) -> Self {
        let unit_rows = CELLS_PER_UNIT.div_ceil(w.max(1)).clamp(1, h.max(1));
        Self {
            b,
            h,
            w,
            unit_rows,
            units_per_item: h.div_ceil(unit_rows),
        }
    }

    pub fn padded_cells(&self) -> usize {
        self.b * (self.h + 2) * (self.w + 2)
    }

    pub fn cells(&self) -> usize {
        self.b * self.h * self.w
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

/// Inputs of a cell pass that do not change per unit.
pub struct CellInputs<'a> {
    pub params: &'a KernelParams,
    pub geo: Geometry,
    pub s_pad: &'a [f32],
    pub kv_pad: &'a [f32],
    /// Channel-last target `[B][H][W][V]` (train mode only).
    pub target: &'a [f32],
    pub visible: usize,
    pub layout: GradLayout,
}

/// Calls `$f::<C, D>(args)` with the channel count and attention width as compile-time
/// constants for the common shapes (0 = known only at run time), so the per-cell loops
/// unroll and vectorise; on x86-64 CPUs with AVX2 it calls the AVX2-compiled twin
/// `$f_avx2` instead. Binaries stay portable: no `-C target-cpu=native` is needed.
macro_rules! specialise {
    ($c:expr, $d:expr, $f:ident, $f_avx2:ident, ($($arg:expr),*)) => {{
        let (c, d): (usize, usize) = ($c, $d);
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU was just checked to support AVX2.
                return unsafe {
                    match (c, d) {
                        (3, 16) => $f_avx2::<3, 16>($($arg),*),
                        (4, 16) => $f_avx2::<4, 16>($($arg),*),
                        (3, 8) => $f_avx2::<3, 8>($($arg),*),
                        (3, 32) => $f_avx2::<3, 32>($($arg),*),
                        (_, 16) => $f_avx2::<0, 16>($($arg),*),
                        _ => $f_avx2::<0, 0>($($arg),*),
                    }
                };
            }
        }
        match (c, d) {
            (3, 16) => $f::<3, 16>($($arg),*),
            (4, 16) => $f::<4, 16>($($arg),*),
            (3, 8) => $f::<3, 8>($($arg),*),
            (3, 32) => $f::<3, 32>($($arg),*),
            (_, 16) => $f::<0, 16>($($arg),*),
            _ => $f::<0, 0>($($arg),*),
        }
    }};
}

/// Declares `$name` (baseline) and `$name_avx2` (AVX2) around one `#[inline(always)]` body.
macro_rules! twin {
    ($name:ident, $name_avx2:ident, $body:ident, ($($p:ident: $t:ty),*)) => {
        fn $name<const C: usize, const D: usize>($($p: $t),*) {
            $body::<C, D>($($p),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn $name_avx2<const C: usize, const D: usize>($($p: $t),*) {
            $body::<C, D>($($p),*)
        }
    };
}

/// `C` if it is a compile-time shape, else the run-time value.
#[inline(always)]
fn shape<const N: usize>(runtime: usize) -> usize {
    if N == 0 {
        runtime
    } else {
        N
    }
}

/// Fills the padded channel-last state and key/value buffers from an NCHW state.
pub fn prepare(
    params: &KernelParams,
    geo: Geometry,
    state: &[f32],
    s_pad: &mut [f32],
    kv_pad: &mut [f32],
) {
    let (c, d) = (params.c, params.d);
    let wp = geo.w + 2;
    s_pad
        .par_chunks_mut(wp * c)
        .zip(kv_pad.par_chunks_mut(wp * 2 * d))
        .enumerate()
        .for_each(|(row, (s_row, kv_row))| {
            prepare_row_dispatch(params, geo, state, row, s_row, kv_row)
        });
}

fn prepare_row_dispatch(
    p: &KernelParams,
    geo: Geometry,
    state: &[f32],
    row: usize,
    s_row: &mut [f32],
    kv_row: &mut [f32],
) {
    specialise!(
        p.c,
        p.d,
        prepare_row,
        prepare_row_avx2,
        (p, geo, state, row, s_row, kv_row)
    )
}

twin!(prepare_row, prepare_row_avx2, prepare_row_body, (p: &KernelParams, geo: Geometry, state: &[f32], row: usize, s_row: &mut [f32], kv_row: &mut [f32]));

#[inline(always)]
fn prepare_row_body<const C: usize, const D: usize>(
    p: &KernelParams,
    geo: Geometry,
    state: &[f32],
    row: usize,
    s_row: &mut [f32],
    kv_row: &mut [f32],
) {
    let (c, d) = (shape::<C>(p.c), shape::<D>(p.d));
    let (h, w) = (geo.h, geo.w);
    let plane = h * w;
    let (bi, yp) = (row / (h + 2), row % (h + 2));
    for xp in 0..w + 2 {
        let s_cell = &mut s_row[xp * c..xp * c + c];
        let (k, v) = kv_row[xp * 2 * d..xp * 2 * d + 2 * d].split_at_mut(d);
        k.copy_from_slice(&p.bk[..d]);
        v.copy_from_slice(&p.bv[..d]);
        if yp == 0 || yp == h + 1 || xp == 0 || xp == w + 1 {
            s_cell.fill(0.0);
            continue;
        }
        let idx = (yp - 1) * w + (xp - 1);
        for ch in 0..c {
            let sv = state[(bi * c + ch) * plane + idx];
            s_cell[ch] = sv;
            axpy(sv, &p.wk_t[ch * d..ch * d + d], k);
            axpy(sv, &p.wv_t[ch * d..ch * d + d], v);
        }
    }
}

/// Runs the cell pass over every unit; `out` is channel-last `[B][H][W][C]`, `attention`
/// (possibly empty) is `[B][H][W][9]`, `partials` holds one gradient buffer per unit.
pub fn cells(
    inp: &CellInputs<'_>,
    mode: Mode,
    out: &mut [f32],
    attention: &mut [f32],
    partials: &mut [f32],
) {
    let geo = inp.geo;
    let (c, w) = (inp.params.c, geo.w);
    let glen = inp.layout.len;
    let unit_cells = geo.unit_rows * w;
    let item = geo.h * w;
    // Units never straddle batch items, so split each item's rows separately.
    if attention.is_empty() {
        out.par_chunks_mut(item * c)
            .zip(partials.par_chunks_mut(geo.units_per_item * glen))
            .enumerate()
            .for_each(|(bi, (o, p))| {
                o.par_chunks_mut(unit_cells * c)
                    .zip(p.par_chunks_mut(glen))
                    .enumerate()
                    .for_each(|(u, (o, p))| {
                        unit_dispatch(inp, mode, bi * geo.units_per_item + u, o, &mut [], p)
                    });
            });
    } else {
        out.par_chunks_mut(item * c)
            .zip(attention.par_chunks_mut(item * NEIGHBOURS))
            .zip(partials.par_chunks_mut(geo.units_per_item * glen))
            .enumerate()
            .for_each(|(bi, ((o, a), p))| {
                o.par_chunks_mut(unit_cells * c)
                    .zip(a.par_chunks_mut(unit_cells * NEIGHBOURS))
                    .zip(p.par_chunks_mut(glen))
                    .enumerate()
                    .for_each(|(u, ((o, a), p))| {
                        unit_dispatch(inp, mode, bi * geo.units_per_item + u, o, a, p)
                    });
            });
    }
}

fn unit_dispatch(
    inp: &CellInputs<'_>,
    mode: Mode,
    unit: usize,
    out: &mut [f32],
    att: &mut [f32],
    part: &mut [f32],
) {
    specialise!(
        inp.params.c,
        inp.params.d,
        unit_pass,
        unit_pass_avx2,
        (inp, mode, unit, out, att, part)
    )
}

twin!(unit_pass, unit_pass_avx2, unit_body, (inp: &CellInputs<'_>, mode: Mode, unit: usize, out: &mut [f32], att: &mut [f32], part: &mut [f32]));

#[inline(always)]
fn unit_body<const C: usize, const D: usize>(
    inp: &CellInputs<'_>,
    mode: Mode,
    unit: usize,
    out: &mut [f32],
    att: &mut [f32],
    part: &mut [f32],
) {
    let (c, d) = (shape::<C>(inp.params.c), shape::<D>(inp.params.d));
    let geo = inp.geo;
    let w = geo.w;
    let bi = unit / geo.units_per_item;
    let y0 = (unit % geo.units_per_item) * geo.unit_rows;
    part.fill(0.0);
    let rows = out.len() / (w * c);
    for y in y0..y0 + rows {
        for x in 0..w {
            let local = (y - y0) * w + x;
            let a = if att.is_empty() {
                None
            } else {
                Some(&mut att[local * NEIGHBOURS..local * NEIGHBOURS + NEIGHBOURS])
            };
            cell(
                c,
                d,
                inp,
                mode,
                bi,
                y,
                x,
                &mut out[local * c..local * c + c],
                a,
                part,
            );
        }
    }
}

/// One cell: forward, and in train mode loss and backward into `grads`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cell(
    c: usize,
    d: usize,
    inp: &CellInputs<'_>,
    mode: Mode,
    bi: usize,
    y: usize,
    x: usize,
    out: &mut [f32],
    attention: Option<&mut [f32]>,
    grads: &mut [f32],
) {
    let p = inp.params;
    let geo = inp.geo;
    let wp = geo.w + 2;
    let centre = (bi * (geo.h + 2) + y + 1) * wp + x + 1;
    let scale = 1.0 / (d as f32).sqrt();
    let offsets = neighbour_offsets(wp);
    let s_of = |cell: usize| &inp.s_pad[cell * c..cell * c + c];
    let k_of = |cell: usize| &inp.kv_pad[cell * 2 * d..cell * 2 * d + d];
    let v_of = |cell: usize| &inp.kv_pad[cell * 2 * d + d..cell * 2 * d + 2 * d];
    let s = s_of(centre);

    let mut q = [0f32; MAX_DIM];
    let q = &mut q[..d];
    q.copy_from_slice(&p.bq[..d]);
    for ch in 0..c {
        axpy(s[ch], &p.wq_t[ch * d..ch * d + d], q);
    }

    let mut z = [0f32; NEIGHBOURS];
    for n in 0..NEIGHBOURS {
        let nb = add_offset(centre, offsets[n]);
        z[n] = scale * (dot(q, k_of(nb)) + dot(q, &p.pk[n * d..n * d + d]));
    }
    let a = softmax9(&z);
    if let Some(att) = attention {
        att.copy_from_slice(&a);
    }

    let mut u = [0f32; MAX_DIM];
    let u = &mut u[..d];
    for n in 0..NEIGHBOURS {
        let nb = add_offset(centre, offsets[n]);
        axpy(a[n], v_of(nb), u);
        axpy(a[n], &p.pv[n * d..n * d + d], u);
    }

    let mut f = [0f32; MAX_CHANNELS];
    let f = &mut f[..c];
    for ch in 0..c {
        f[ch] = p.bo[ch] + dot(&p.wo[ch * d..ch * d + d], u);
    }
    match mode {
        Mode::Update => out.copy_from_slice(f),
        Mode::Next | Mode::Train => {
            for ch in 0..c {
                out[ch] = s[ch] + f[ch];
            }
        }
    }
    if mode != Mode::Train {
        return;
    }

    // Loss on the visible channels and dL/df (the incoming state is a constant).
    let l = inp.layout;
    let v_count = inp.visible;
    let cell_index = (bi * geo.h + y) * geo.w + x;
    let target = &inp.target[cell_index * v_count..cell_index * v_count + v_count];
    let norm = 2.0 / (geo.cells() * v_count) as f32;
    let mut gf = [0f32; MAX_CHANNELS];
    let gf = &mut gf[..c];
    let mut loss = 0.0;
    for ch in 0..v_count {
        let diff = out[ch] - target[ch];
        loss += diff * diff;
        gf[ch] = norm * diff;
    }
    grads[l.loss] += loss;

    let mut gu = [0f32; MAX_DIM];
    let gu = &mut gu[..d];
    for ch in 0..v_count {
        axpy(gf[ch], u, &mut grads[l.wo + ch * d..l.wo + ch * d + d]);
        grads[l.bo + ch] += gf[ch];
        axpy(gf[ch], &p.wo[ch * d..ch * d + d], gu);
    }

    let mut da = [0f32; NEIGHBOURS];
    for n in 0..NEIGHBOURS {
        let nb = add_offset(centre, offsets[n]);
        da[n] = dot(gu, v_of(nb)) + dot(gu, &p.pv[n * d..n * d + d]);
    }
    let mean: f32 = (0..NEIGHBOURS).map(|n| a[n] * da[n]).sum();
    let mut dz = [0f32; NEIGHBOURS];
    for n in 0..NEIGHBOURS {
        dz[n] = a[n] * (da[n] - mean);
    }

    let mut dq = [0f32; MAX_DIM];
    let dq = &mut dq[..d];
    let mut sk = [0f32; MAX_CHANNELS];
    let mut sv = [0f32; MAX_CHANNELS];
    let (sk, sv) = (&mut sk[..c], &mut sv[..c]);
    let mut dz_sum = 0.0;
    for n in 0..NEIGHBOURS {
        let nb = add_offset(centre, offsets[n]);
        let g = scale * dz[n];
        axpy(g, k_of(nb), dq);
        axpy(g, &p.pk[n * d..n * d + d], dq);
        axpy(g, q, &mut grads[l.pk + n * d..l.pk + n * d + d]);
        axpy(a[n], gu, &mut grads[l.pv + n * d..l.pv + n * d + d]);
        axpy(dz[n], s_of(nb), sk);
        axpy(a[n], s_of(nb), sv);
        dz_sum += g;
    }
    axpy(1.0, dq, &mut grads[l.bq..l.bq + d]);
    axpy(dz_sum, q, &mut grads[l.bk..l.bk + d]);
    axpy(1.0, gu, &mut grads[l.bv..l.bv + d]);
    for ch in 0..c {
        axpy(s[ch], dq, &mut grads[l.wq_t + ch * d..l.wq_t + ch * d + d]);
        axpy(
            scale * sk[ch],
            q,
            &mut grads[l.wk_t + ch * d..l.wk_t + ch * d + d],
        );
        axpy(sv[ch], gu, &mut grads[l.wv_t + ch * d..l.wv_t + ch * d + d]);
    }
}

/// Flat-index offsets of the nine neighbours in a padded row-major grid of width `wp`.
#[inline(always)]
fn neighbour_offsets(wp: usize) -> [isize; NEIGHBOURS] {
    let wp = wp as isize;
    let mut o = [0isize; NEIGHBOURS];
    for (n, slot) in o.iter_mut().enumerate() {
        let (dy, dx) = (n as isize / 3 - 1, n as isize % 3 - 1);
        *slot = dy * wp + dx;
    }
    o
}

#[inline(always)]
fn add_offset(cell: usize, offset: isize) -> usize {
    cell.wrapping_add_signed(offset)
}

/// `y += alpha · x`.
#[inline(always)]
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// Dot product with eight independent accumulators, so it vectorises instead of forming
/// one long chain of dependent additions.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Softmax over the nine scores, shifted by their maximum for stability.
#[inline(always)]
fn softmax9(z: &[f32; NEIGHBOURS]) -> [f32; NEIGHBOURS] {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut e = [0f32; NEIGHBOURS];
    let mut total = 0.0;
    for n in 0..NEIGHBOURS {
        e[n] = exp(z[n] - max);
        total += e[n];
    }
    let inv = 1.0 / total;
    for x in &mut e {
        *x *= inv;
    }
    e
}

/// `e^x` to about 2 ulp (Cephes `expf` polynomial), branch-free so it vectorises; the
/// libm call it replaces cost more than the rest of the softmax.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5·2²³ rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + MAGIC;
    let n = t - MAGIC;
    let k = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let poly = p * r * r + r + 1.0;
    poly * f32::from_bits(((k + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst: f32 = 0.0;
        let mut x = -87.0f32;
        while x < 20.0 {
            let rel = (exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.013;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn dot_matches_naive_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..19).map(|i| (i as f32).sin()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-4);
    }

    #[test]
    fn units_cover_every_row_once() {
        for (h, w) in [(1, 1), (5, 700), (32, 32), (33, 17), (128, 128)] {
            let g = Geometry::new(2, h, w);
            assert!(g.unit_rows * g.units_per_item >= h);
            assert!(g.unit_rows * (g.units_per_item - 1) < h);
        }
    }
}
