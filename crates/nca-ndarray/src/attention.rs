//! The attention of a block of eight cells, forward and backward, written once for the
//! plain kernel ([`crate::kernel`]) and the picture model ([`crate::dense`]); they differ
//! only in where a neighbour's keys, values and inputs are read ([`Taps`]).
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

/// Where the eight lanes of each neighbour of a block are read: feature `i` of
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
    pub fn load(&self, n: usize, i: usize) -> F8 {
        F8::load(self.buf, self.at[n] + i * self.stride)
    }

    /// Feature `i` of neighbour `n` plus the position embedding `emb[n·d + i]`.
    #[inline(always)]
    fn embedded(&self, emb: &[f32], d: usize, n: usize, i: usize) -> F8 {
        self.load(n, i) + F8::splat(emb[n * d + i])
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

/// Where the bias and position-embedding gradients of a block are accumulated, as lane
/// vectors in the caller's accumulator: `pk` and `pv` are `9·D` long, neighbour-major.
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
pub fn forward<A: MulAdd>(
    d: usize,
    q: &[F8; MAX_DIM],
    nb: &Neighbourhood<'_>,
    a: &mut [F8; NEIGHBOURS],
    u: &mut [F8; MAX_DIM],
) {
    let scale = F8::splat(1.0 / (d as f32).sqrt());
    let mut max = F8::splat(f32::NEG_INFINITY);
    for n in 0..NEIGHBOURS {
        let mut z = F8::ZERO;
        for dd in 0..d {
            z = A::madd(q[dd], nb.keys.embedded(nb.pk, d, n, dd), z);
        }
        a[n] = z * scale;
        max = max.max(a[n]);
    }
    softmax_in_place(a, max);
    for dd in 0..d {
        let mut v = F8::ZERO;
        for n in 0..NEIGHBOURS {
            v = A::madd(a[n], nb.values.embedded(nb.pv, d, n, dd), v);
        }
        u[dd] = v;
    }
}

/// Backward from `gu = ∂L/∂u`: writes `dz` and `dq`, and adds the bias and position
/// embedding gradients into `acc` at `lanes`.
#[inline(always)]
pub fn backward<A: MulAdd>(
    d: usize,
    q: &[F8; MAX_DIM],
    gu: &[F8; MAX_DIM],
    a: &[F8; NEIGHBOURS],
    nb: &Neighbourhood<'_>,
    lanes: GradLanes,
    acc: &mut [F8],
    dz: &mut [F8; NEIGHBOURS],
    dq: &mut [F8; MAX_DIM],
) {
    let scale = F8::splat(1.0 / (d as f32).sqrt());
    let mut da = [F8::ZERO; NEIGHBOURS];
    let mut mean = F8::ZERO;
    for n in 0..NEIGHBOURS {
        let mut v = F8::ZERO;
        for dd in 0..d {
            v = A::madd(gu[dd], nb.values.embedded(nb.pv, d, n, dd), v);
        }
        da[n] = v;
        mean = A::madd(a[n], v, mean);
    }
    let mut dz_sum = F8::ZERO;
    for n in 0..NEIGHBOURS {
        dz[n] = a[n] * (da[n] - mean) * scale;
        dz_sum = dz_sum + dz[n];
    }
    for dd in 0..d {
        let mut dqv = F8::ZERO;
        for n in 0..NEIGHBOURS {
            dqv = A::madd(dz[n], nb.keys.embedded(nb.pk, d, n, dd), dqv);
            let (ik, iv) = (lanes.pk + n * d + dd, lanes.pv + n * d + dd);
            acc[ik] = A::madd(dz[n], q[dd], acc[ik]);
            acc[iv] = A::madd(a[n], gu[dd], acc[iv]);
        }
        dq[dd] = dqv;
        acc[lanes.bq + dd] = acc[lanes.bq + dd] + dqv;
        acc[lanes.bk + dd] = A::madd(dz_sum, q[dd], acc[lanes.bk + dd]);
        acc[lanes.bv + dd] = acc[lanes.bv + dd] + gu[dd];
    }
}

/// For each of the `count` inputs `j` read through `inputs`, calls `sink(j, Σ_n dz_n x_n,
/// Σ_n a_n x_n)`: what the key and value weight gradients need.
#[inline(always)]
pub fn input_sums<A: MulAdd>(
    count: usize,
    inputs: &Taps<'_>,
    dz: &[F8; NEIGHBOURS],
    a: &[F8; NEIGHBOURS],
    mut sink: impl FnMut(usize, F8, F8),
) {
    for j in 0..count {
        let mut sk = F8::ZERO;
        let mut sv = F8::ZERO;
        for n in 0..NEIGHBOURS {
            let xn = inputs.load(n, j);
            sk = A::madd(dz[n], xn, sk);
            sv = A::madd(a[n], xn, sv);
        }
        sink(j, sk, sv);
    }
}
