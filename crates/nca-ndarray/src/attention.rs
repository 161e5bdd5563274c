//! The attention of a block of cells (one vector's lanes), forward and backward, written
//! once for the plain kernel ([`crate::kernel`]) and the picture model ([`crate::dense`]);
//! they differ only in where a neighbour's keys, values and inputs are read ([`Taps`]).
//!
//! For one cell with query `q` and neighbours `n` (keys `k̃_n = k_n + pk_n`, values
//! `ṽ_n = v_n + pv_n`, `s = 1/√D`): `z_n = s q·k̃_n`, `a = softmax(z)`, `u = Σ_n a_n ṽ_n`.
//!
//! Backward, given `g_u = ∂L/∂u`, with the scale folded into `dz` (`dz_n = ∂L/∂(q·k̃_n)`):
//! `dz_n = s a_n (g_u·ṽ_n − Σ_m a_m g_u·ṽ_m)`, `dq = Σ_n dz_n k̃_n`, `dpk_n = dz_n q`,
//! `dpv_n = a_n g_u`, `dbq = dq`, `dbk = q Σ_n dz_n` (zero up to rounding), `dbv = g_u`.
//! With `x_n` the inputs the keys and values were projected from (`k_n = Wk x_n + bk`):
//! `dWq += dq ⊗ x_centre`, `dWk += q ⊗ Σ_n dz_n x_n`, `dWv += g_u ⊗ Σ_n a_n x_n`
//! ([`input_sums`]; the callers accumulate these).

// Index loops over compile-time widths are what unrolls and vectorises.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use nca_api::NEIGHBOURS;

use crate::kernel::MAX_DIM;
use crate::simd::{softmax_in_place, MulAdd, Vector, F8};

/// Where the lanes of each neighbour of a block are read: feature `i` of
/// neighbour `n` starts at `buf[at[n] + i·stride]`.
#[derive(Clone, Copy)]
pub struct Taps<'a> {
    /// The feature-major buffer.
    pub buf: &'a [f32],
    /// Start of each neighbour's lanes in feature 0.
    pub at: [usize; NEIGHBOURS],
    /// Distance between features.
    pub stride: usize,
}

impl Taps<'_> {
    /// Feature `i` of neighbour `n`.
    #[inline(always)]
    pub fn load<V: Vector>(&self, n: usize, i: usize) -> V {
        V::load(self.buf, self.at[n] + i * self.stride)
    }

    /// Feature `i` of neighbour `n` plus the position embedding `emb[n·d + i]`.
    #[inline(always)]
    fn embedded<V: Vector>(&self, emb: &[f32], d: usize, n: usize, i: usize) -> V {
        self.load::<V>(n, i) + V::splat(emb[n * d + i])
    }
}

/// The keys and values of a block's neighbours and their position embeddings (`9·D`
/// each).
#[derive(Clone, Copy)]
pub struct Neighbourhood<'a> {
    /// Keys before `pk`.
    pub keys: Taps<'a>,
    /// Values before `pv`.
    pub values: Taps<'a>,
    /// Key position embedding.
    pub pk: &'a [f32],
    /// Value position embedding.
    pub pv: &'a [f32],
}

/// Where the bias and position-embedding gradients of a block are accumulated, as
/// eight-lane vectors in the caller's accumulator ([`Vector::add_to`]): `pk` and `pv`
/// are `9·D` long, neighbour-major.
#[derive(Clone, Copy)]
pub struct GradLanes {
    /// `bq` (D lanes).
    pub bq: usize,
    /// `bk` (D lanes).
    pub bk: usize,
    /// `bv` (D lanes).
    pub bv: usize,
    /// `pk` (9·D lanes).
    pub pk: usize,
    /// `pv` (9·D lanes).
    pub pv: usize,
}

/// Forward: the softmax weights `a` and the attended values `u` of the block with
/// queries `q`.
#[inline(always)]
pub fn forward<A: MulAdd, V: Vector>(
    d: usize,
    q: &[V; MAX_DIM],
    nb: &Neighbourhood<'_>,
    a: &mut [V; NEIGHBOURS],
    u: &mut [V; MAX_DIM],
) {
    let scale = V::splat(1.0 / (d as f32).sqrt());
    let mut max = V::splat(f32::NEG_INFINITY);
    for n in 0..NEIGHBOURS {
        let mut z = V::ZERO;
        for dd in 0..d {
            z = V::madd::<A>(q[dd], nb.keys.embedded(nb.pk, d, n, dd), z);
        }
        a[n] = z * scale;
        max = max.max(a[n]);
    }
    softmax_in_place(a, max);
    for dd in 0..d {
        let mut v = V::ZERO;
        for n in 0..NEIGHBOURS {
            v = V::madd::<A>(a[n], nb.values.embedded(nb.pv, d, n, dd), v);
        }
        u[dd] = v;
    }
}

/// Backward from `gu = ∂L/∂u`: writes `dz` and `dq`, and adds the bias gradients into
/// `acc` at `lanes`; with `embeddings`, the position embedding gradients too (a caller
/// that keeps `dz`, `a`, `q` and `gu` of every block adds those afterwards with
/// [`embedding_gradients`], in the same order and with fewer memory round trips).
#[inline(always)]
pub fn backward<A: MulAdd, V: Vector>(
    d: usize,
    q: &[V; MAX_DIM],
    gu: &[V; MAX_DIM],
    a: &[V; NEIGHBOURS],
    nb: &Neighbourhood<'_>,
    lanes: GradLanes,
    embeddings: bool,
    acc: &mut [F8],
    dz: &mut [V; NEIGHBOURS],
    dq: &mut [V; MAX_DIM],
) {
    let scale = V::splat(1.0 / (d as f32).sqrt());
    let mut da = [V::ZERO; NEIGHBOURS];
    let mut mean = V::ZERO;
    for n in 0..NEIGHBOURS {
        let mut v = V::ZERO;
        for dd in 0..d {
            v = V::madd::<A>(gu[dd], nb.values.embedded(nb.pv, d, n, dd), v);
        }
        da[n] = v;
        mean = V::madd::<A>(a[n], v, mean);
    }
    let mut dz_sum = V::ZERO;
    for n in 0..NEIGHBOURS {
        dz[n] = a[n] * (da[n] - mean) * scale;
        dz_sum = dz_sum + dz[n];
    }
    for dd in 0..d {
        let mut dqv = V::ZERO;
        for n in 0..NEIGHBOURS {
            dqv = V::madd::<A>(dz[n], nb.keys.embedded(nb.pk, d, n, dd), dqv);
            if embeddings {
                let (ik, iv) = (lanes.pk + n * d + dd, lanes.pv + n * d + dd);
                acc[ik] = V::madd_to::<A>(dz[n], q[dd], acc[ik]);
                acc[iv] = V::madd_to::<A>(a[n], gu[dd], acc[iv]);
            }
        }
        dq[dd] = dqv;
        acc[lanes.bq + dd] = dqv.add_to(acc[lanes.bq + dd]);
        acc[lanes.bk + dd] = V::madd_to::<A>(dz_sum, q[dd], acc[lanes.bk + dd]);
        acc[lanes.bv + dd] = gu[dd].add_to(acc[lanes.bv + dd]);
    }
}

/// Neighbours per register tile of [`embedding_gradients`] (a divisor of nine).
const TILE_NEIGHBOURS: usize = 3;
/// Attention features per register tile of [`embedding_gradients`]: with three
/// neighbours, twelve accumulators and the three neighbour weights fill AVX2's sixteen
/// registers.
const TILE_FEATURES: usize = 4;

/// Adds `dpk_n += dz_n ⊗ q` and `dpv_n += a_n ⊗ gu` of the blocks starting at `cells`
/// into `acc` at `lanes`: every buffer is feature-major with features `nc` apart
/// (`dz`, `a`: `[9][nc]`; `q`, `gu`: `[D][nc]`).
///
/// Each accumulator takes the blocks in the order of `cells`, one multiply-add each, as
/// [`backward`] with `embeddings` does block by block, so the sums are the same to the
/// bit; a tile of accumulators stays in registers across the blocks instead of being
/// loaded and stored for every block.
#[inline(always)]
pub fn embedding_gradients<A: MulAdd>(
    d: usize,
    nc: usize,
    cells: impl Iterator<Item = usize> + Clone,
    (dz, a): (&[f32], &[f32]),
    (q, gu): (&[f32], &[f32]),
    lanes: GradLanes,
    acc: &mut [F8],
) {
    for (weights, inputs, at) in [(dz, q, lanes.pk), (a, gu, lanes.pv)] {
        for n0 in (0..NEIGHBOURS).step_by(TILE_NEIGHBOURS) {
            let mut dd0 = 0;
            while dd0 + TILE_FEATURES <= d {
                let mut t = [[F8::ZERO; TILE_FEATURES]; TILE_NEIGHBOURS];
                for i in 0..TILE_NEIGHBOURS {
                    for j in 0..TILE_FEATURES {
                        t[i][j] = acc[at + (n0 + i) * d + dd0 + j];
                    }
                }
                for cell in cells.clone() {
                    let mut w = [F8::ZERO; TILE_NEIGHBOURS];
                    for i in 0..TILE_NEIGHBOURS {
                        w[i] = F8::load(weights, (n0 + i) * nc + cell);
                    }
                    for j in 0..TILE_FEATURES {
                        let x = F8::load(inputs, (dd0 + j) * nc + cell);
                        for i in 0..TILE_NEIGHBOURS {
                            t[i][j] = A::madd(w[i], x, t[i][j]);
                        }
                    }
                }
                for i in 0..TILE_NEIGHBOURS {
                    for j in 0..TILE_FEATURES {
                        acc[at + (n0 + i) * d + dd0 + j] = t[i][j];
                    }
                }
                dd0 += TILE_FEATURES;
            }
            // The features left over when D is not a multiple of the tile.
            for dd in dd0..d {
                let mut t = [F8::ZERO; TILE_NEIGHBOURS];
                for i in 0..TILE_NEIGHBOURS {
                    t[i] = acc[at + (n0 + i) * d + dd];
                }
                for cell in cells.clone() {
                    let x = F8::load(inputs, dd * nc + cell);
                    for i in 0..TILE_NEIGHBOURS {
                        let w = F8::load(weights, (n0 + i) * nc + cell);
                        t[i] = A::madd(w, x, t[i]);
                    }
                }
                for i in 0..TILE_NEIGHBOURS {
                    acc[at + (n0 + i) * d + dd] = t[i];
                }
            }
        }
    }
}

/// For each of the `count` inputs `j` read through `inputs`, calls `sink(j, Σ_n dz_n x_n,
/// Σ_n a_n x_n)`: what the key and value weight gradients need.
#[inline(always)]
pub fn input_sums<A: MulAdd, V: Vector>(
    count: usize,
    inputs: &Taps<'_>,
    dz: &[V; NEIGHBOURS],
    a: &[V; NEIGHBOURS],
    mut sink: impl FnMut(usize, V, V),
) {
    for j in 0..count {
        let mut sk = V::ZERO;
        let mut sv = V::ZERO;
        for n in 0..NEIGHBOURS {
            let xn = inputs.load::<V>(n, j);
            sk = V::madd::<A>(dz[n], xn, sk);
            sv = V::madd::<A>(a[n], xn, sv);
        }
        sink(j, sk, sv);
    }
}
