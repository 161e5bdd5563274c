//! Small register-blocked matrix products over feature-major matrices (one row per
//! feature, cells contiguous), written once over the lane width ([`Vector`]: [`F8`] or,
//! on AVX-512 CPUs, [`F16`]) and inlined into the calling kernel, so they compile into
//! whatever it was compiled for (AVX-512, AVX2 + FMA or the baseline).
//!
//! They need no packing and allocate nothing: the cell dimension is always a whole number
//! of vectors, and the other dimensions are small (≤ a few hundred), so the
//! operands of a tile stay in L1/L2. Each output element is computed by one fixed
//! sequence of operations, so results do not depend on threads.

// Tiles are indexed by compile-time sizes: index loops are what unrolls.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use crate::simd::{MulAdd, Vector};
#[cfg(doc)]
use crate::simd::{F16, F8};

/// Output rows per tile.
const MR: usize = 4;
/// Vectors of cells per tile of [`project`]; three reduction columns per tile of
/// [`reduce`].
const NV: usize = 3;

/// What a [`project`] tile starts from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// Zero.
    Zero,
    /// `bias[i]` in every cell of row `i`.
    Bias(&'a [f32]),
}

/// What a [`project`] tile does before it stores.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// Nothing.
    Store,
    /// `max(0, ·)`.
    Relu,
    /// Keep the value where `mask` (same layout as the output) is positive, else 0: the
    /// relu derivative, with relu'(0) = 0.
    Mask(&'a [f32]),
}

/// Calls `$tile!(R, V)` for a register tile of `$rows` ≤ [`MR`] rows and `$cols` ≤ [`NV`]
/// vector columns: tile sizes are const generics, so each shape is spelled out once here
/// for both products.
macro_rules! for_tile_shape {
    ($rows:expr, $cols:expr, $tile:ident) => {
        match ($rows, $cols) {
            (4, 3) => $tile!(4, 3),
            (4, 2) => $tile!(4, 2),
            (4, _) => $tile!(4, 1),
            (3, 3) => $tile!(3, 3),
            (3, 2) => $tile!(3, 2),
            (3, _) => $tile!(3, 1),
            (2, 3) => $tile!(2, 3),
            (2, 2) => $tile!(2, 2),
            (2, _) => $tile!(2, 1),
            (_, 3) => $tile!(1, 3),
            (_, 2) => $tile!(1, 2),
            _ => $tile!(1, 1),
        }
    };
}

/// `out[i][c] = start + Σ_k w(i, k) · b[k][c]` for `i < m`, `c < n`, with
/// `w(i, k) = w[i·rsw + k·csw]`, rows of `b` `ldb` apart and rows of `out` `ldo` apart;
/// `n` is a multiple of `V::LANES`.
#[inline(always)]
pub fn project<V: Vector, A: MulAdd>(
    (m, k, n): (usize, usize, usize),
    w: &[f32],
    (rsw, csw): (usize, usize),
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    ldo: usize,
    start: Start<'_>,
    epi: Epilogue<'_>,
) {
    debug_assert_eq!(n % V::LANES, 0);
    let nv = n / V::LANES;
    let mut j = 0;
    while j < nv {
        let step = (nv - j).min(NV);
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(MR);
            macro_rules! tile {
                ($r:literal, $v:literal) => {
                    project_tile::<$r, $v, V, A>(i, j, k, w, rsw, csw, b, ldb, out, ldo, start, epi)
                };
            }
            for_tile_shape!(rows, step, tile);
            i += rows;
        }
        j += step;
    }
}

#[inline(always)]
fn project_tile<const R: usize, const NV_: usize, V: Vector, A: MulAdd>(
    i0: usize,
    j0: usize,
    k: usize,
    w: &[f32],
    rsw: usize,
    csw: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    ldo: usize,
    start: Start<'_>,
    epi: Epilogue<'_>,
) {
    let mut acc = [[V::ZERO; NV_]; R];
    if let Start::Bias(bias) = start {
        for r in 0..R {
            acc[r] = [V::splat(bias[i0 + r]); NV_];
        }
    }
    let c0 = j0 * V::LANES;
    for kk in 0..k {
        let mut bv = [V::ZERO; NV_];
        for v in 0..NV_ {
            bv[v] = V::load(b, kk * ldb + c0 + v * V::LANES);
        }
        for r in 0..R {
            let wv = V::splat(w[(i0 + r) * rsw + kk * csw]);
            for v in 0..NV_ {
                acc[r][v] = V::madd::<A>(wv, bv[v], acc[r][v]);
            }
        }
    }
    for r in 0..R {
        for v in 0..NV_ {
            let at = (i0 + r) * ldo + c0 + v * V::LANES;
            let x = match epi {
                Epilogue::Store => acc[r][v],
                Epilogue::Relu => acc[r][v].relu(),
                Epilogue::Mask(mask) => acc[r][v].keep_where_positive(V::load(mask, at)),
            };
            x.store(out, at);
        }
    }
}

/// `out(i, j) += Σ_c a[i][c] · b[j][c]` for `i < m`, `j < n`, `c < cells`, with
/// `out(i, j) = out[i·rso + j·cso]`, rows of `a` `lda` apart and of `b` `ldb` apart;
/// `cells` is a multiple of `V::LANES`. Lanes are summed in a fixed order.
#[inline(always)]
pub fn reduce<V: Vector, A: MulAdd>(
    (m, n, cells): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    (rso, cso): (usize, usize),
) {
    debug_assert_eq!(cells % V::LANES, 0);
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(MR);
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(NV);
            macro_rules! tile {
                ($r:literal, $c:literal) => {
                    reduce_tile::<$r, $c, V, A>(i, j, cells, a, lda, b, ldb, out, rso, cso)
                };
            }
            for_tile_shape!(rows, cols, tile);
            j += cols;
        }
        i += rows;
    }
}

#[inline(always)]
fn reduce_tile<const R: usize, const C: usize, V: Vector, A: MulAdd>(
    i0: usize,
    j0: usize,
    cells: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    rso: usize,
    cso: usize,
) {
    let mut acc = [[V::ZERO; C]; R];
    let a = &a[i0 * lda..];
    let b = &b[j0 * ldb..];
    for c in (0..cells).step_by(V::LANES) {
        let mut av = [V::ZERO; R];
        let mut bv = [V::ZERO; C];
        for r in 0..R {
            av[r] = V::load(a, r * lda + c);
        }
        for s in 0..C {
            bv[s] = V::load(b, s * ldb + c);
        }
        for r in 0..R {
            for s in 0..C {
                acc[r][s] = V::madd::<A>(av[r], bv[s], acc[r][s]);
            }
        }
    }
    for r in 0..R {
        for s in 0..C {
            out[(i0 + r) * rso + (j0 + s) * cso] += acc[r][s].sum();
        }
    }
}

/// `out[i] += Σ_c a[i][c]` for the `m` rows of `a` (`lda` apart), `cells` wide.
#[inline(always)]
pub fn row_sums<V: Vector>(m: usize, cells: usize, a: &[f32], lda: usize, out: &mut [f32]) {
    for i in 0..m {
        let mut acc = V::ZERO;
        for c in (0..cells).step_by(V::LANES) {
            acc = acc + V::load(a, i * lda + c);
        }
        out[i] += acc.sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{Separate, F16, F8};

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000)
            .map(|x| x as f32 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn project_matches_naive() {
        for (m, k, n) in [(1, 1, 16), (5, 7, 48), (16, 29, 96), (7, 3, 16)] {
            let (w, b) = (data(m * k, 1), data(k * n, 2));
            let bias = data(m, 3);
            // Transposed weight access: w(i, kk) = w[kk·m + i].
            let mut out = vec![0.0; m * n];
            project::<F16, Separate>(
                (m, k, n),
                &w,
                (1, m),
                &b,
                n,
                &mut out,
                n,
                Start::Bias(&bias),
                Epilogue::Relu,
            );
            for i in 0..m {
                for c in 0..n {
                    let mut v = bias[i];
                    for kk in 0..k {
                        v += w[kk * m + i] * b[kk * n + c];
                    }
                    let v = v.max(0.0);
                    assert!((out[i * n + c] - v).abs() < 1e-4, "{m} {k} {n}");
                }
            }
        }
    }

    #[test]
    fn reduce_matches_naive() {
        for (m, n, cells) in [(1, 1, 8), (5, 7, 40), (16, 29, 96), (128, 45, 16)] {
            let (a, b) = (data(m * cells, 4), data(n * cells, 5));
            let mut out = vec![1.0; m * n];
            // Transposed output: out(i, j) at j·m + i.
            reduce::<F8, Separate>((m, n, cells), &a, cells, &b, cells, &mut out, (1, m));
            for i in 0..m {
                for j in 0..n {
                    let mut v = 0.0;
                    for c in 0..cells {
                        v += a[i * cells + c] * b[j * cells + c];
                    }
                    assert!((out[j * m + i] - 1.0 - v).abs() < 1e-3, "{m} {n} {cells}");
                }
            }
        }
    }
}
