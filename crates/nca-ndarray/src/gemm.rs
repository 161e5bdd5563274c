//! Small register-blocked matrix products over feature-major matrices (one row per
//! feature, cells contiguous), written once over the lane width ([`Vector`]: [`F8`] or,
//! on AVX-512 CPUs, [`F16`]).
//!
//! Each product is compiled once per instruction set (AVX-512, AVX2 + FMA, the
//! baseline), out of line, and a kernel's call picks the copy for the `V`, `A` it was
//! compiled with. Inlined into every call site instead, each of a kernel's dozen
//! products was another copy of all 18 tile shapes per instruction set and per kernel
//! specialisation, which made this crate take many minutes to compile; the call costs
//! nothing next to a product over a chunk of cells.
//!
//! They need no packing and allocate nothing: the cell dimension is always a whole number
//! of vectors, and the other dimensions are small (≤ a few hundred), so the
//! operands of a tile stay in L1/L2. Each output element is computed by one fixed
//! sequence of operations, so results do not depend on threads.

// Tiles are indexed by compile-time sizes: index loops are what unrolls.
#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]

use std::any::TypeId;

#[cfg(target_arch = "x86_64")]
use crate::simd::Fused;
use crate::simd::{MulAdd, Separate, Vector, F16, F8};

/// Largest tile in either product and either vector width ([`Vector::PROJECT_TILE`],
/// [`Vector::REDUCE_TILE`]): the shapes [`for_tile_shape`] spells out.
const MAX_TILE_ROWS: usize = 6;
const MAX_TILE_COLS: usize = 3;
const _: () = {
    assert!(F8::PROJECT_TILE.0 <= MAX_TILE_ROWS && F8::PROJECT_TILE.1 <= MAX_TILE_COLS);
    assert!(F8::REDUCE_TILE.0 <= MAX_TILE_ROWS && F8::REDUCE_TILE.1 <= MAX_TILE_COLS);
    assert!(F16::PROJECT_TILE.0 <= MAX_TILE_ROWS && F16::PROJECT_TILE.1 <= MAX_TILE_COLS);
    assert!(F16::REDUCE_TILE.0 <= MAX_TILE_ROWS && F16::REDUCE_TILE.1 <= MAX_TILE_COLS);
};

/// What a [`project`] tile starts from.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// Zero.
    Zero,
    /// `bias[i]` in every cell of row `i`.
    Bias(&'a [f32]),
    /// The output's current value: the product is added to what is there.
    Current,
    /// A term of the cell's grid row plus one of its column, in cell `c` of output row
    /// `i`: `row[i·row_stride + c / width]` plus `column[i·width + c % width]`, where the
    /// cells are rows of the grid `width` apart (`width` a whole number of vectors). What
    /// position inputs add to a product, without writing it into the output first: the
    /// output is the largest buffer of a step, and a separate pass to fill it cost about
    /// 5 % of a 128×128 step.
    RowColumn {
        /// Per output row `i`, the terms of the grid rows, from `row[i·row_stride]`.
        row: &'a [f32],
        /// Distance between output rows in `row`.
        row_stride: usize,
        /// Per output row `i`, the terms of the columns, `column[i·width..(i + 1)·width]`.
        column: &'a [f32],
        /// Cells per grid row.
        width: usize,
    },
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

/// Calls `$tile!(R, C)` for a register tile of `$rows` ≤ [`MAX_TILE_ROWS`] rows and
/// `$cols` ≤ [`MAX_TILE_COLS`] columns: tile sizes are const generics, so each shape is
/// spelled out once here for both products.
macro_rules! for_tile_shape {
    ($rows:expr, $cols:expr, $tile:ident) => {
        match ($rows, $cols) {
            (6, 3) => $tile!(6, 3),
            (6, 2) => $tile!(6, 2),
            (6, _) => $tile!(6, 1),
            (5, 3) => $tile!(5, 3),
            (5, 2) => $tile!(5, 2),
            (5, _) => $tile!(5, 1),
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

/// Index of the last element a strided access touches: `first + Σ (count_i − 1)·stride_i`,
/// checked once per product so that the tiles' inner loops read through raw pointers.
/// Saturates instead of wrapping, so an overflowing shape fails the bounds check.
#[inline(always)]
fn last_index(first: usize, strided: &[(usize, usize)]) -> usize {
    strided.iter().fold(first, |at, &(count, stride)| {
        at.saturating_add((count - 1).saturating_mul(stride))
    })
}

/// Defines the public product `$name`: it calls the out-of-line copy of `$inline` for the
/// `V`, `A` its caller was compiled with (one per instruction set, each compiled once with
/// that set's target features), or `$inline` itself for any other pair (tests).
macro_rules! per_instruction_set {
    ($(#[$doc:meta])* $name:ident = $inline:ident($($arg:ident: $t:ty),*)) => {
        $(#[$doc])*
        #[inline(always)]
        pub fn $name<V: Vector, A: MulAdd>($($arg: $t),*) {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
            #[inline(never)]
            unsafe fn avx512($($arg: $t),*) {
                $inline::<F16, Fused>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[inline(never)]
            unsafe fn avx2($($arg: $t),*) {
                $inline::<F8, Fused>($($arg),*)
            }
            #[inline(never)]
            fn base($($arg: $t),*) {
                $inline::<F8, Separate>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if is::<A, Fused>() {
                if is::<V, F16>() {
                    // SAFETY: `Fused` is only used inside `simd::run`'s AVX2 and AVX-512
                    // copies, and with `F16` only in the AVX-512 one, which run on CPUs
                    // that have them.
                    return unsafe { avx512($($arg),*) };
                }
                if is::<V, F8>() {
                    // SAFETY: as above: `Fused` runs only where AVX2 and FMA are present.
                    return unsafe { avx2($($arg),*) };
                }
            }
            if is::<A, Separate>() && is::<V, F8>() {
                return base($($arg),*);
            }
            $inline::<V, A>($($arg),*)
        }
    };
}

/// Whether `T` and `U` are the same type: constant once inlined.
#[inline(always)]
fn is<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<U>()
}

per_instruction_set! {
    /// `out[i][c] = start + Σ_k w(i, k) · b[k][c]` for `i < m`, `c < n`, with
    /// `w(i, k) = w[i·rsw + k·csw]`, rows of `b` `ldb` apart and rows of `out` `ldo` apart;
    /// `n` is a multiple of `V::LANES`.
    project = project_inline(
        dims: (usize, usize, usize),
        w: &[f32],
        w_strides: (usize, usize),
        b: &[f32],
        ldb: usize,
        out: &mut [f32],
        ldo: usize,
        start: Start<'_>,
        epi: Epilogue<'_>
    )
}

/// [`project`] itself, inlined into the copy that runs it.
#[inline(always)]
fn project_inline<V: Vector, A: MulAdd>(
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
    if m == 0 || n == 0 {
        return;
    }
    // Every index the tiles touch, checked once: the inner loops are unchecked.
    assert!(out.len() > last_index(n - 1, &[(m, ldo)]));
    if let Epilogue::Mask(mask) = epi {
        assert!(mask.len() > last_index(n - 1, &[(m, ldo)]));
    }
    match start {
        Start::Bias(bias) => assert!(bias.len() >= m),
        Start::RowColumn {
            row,
            row_stride,
            column,
            width,
        } => {
            assert!(width > 0 && width % V::LANES == 0);
            assert!(row.len() > last_index((n - 1) / width, &[(m, row_stride)]));
            assert!(column.len() > last_index(width - 1, &[(m, width)]));
        }
        Start::Zero | Start::Current => {}
    }
    if k > 0 {
        assert!(w.len() > last_index(0, &[(m, rsw), (k, csw)]));
        assert!(b.len() > last_index(n - 1, &[(k, ldb)]));
    }
    let (mr_wide, nv_max) = V::PROJECT_TILE;
    let nv = n / V::LANES;
    // Row panels: when the output is larger than `b` (k ≤ m), a panel of a few rows is
    // swept across all cells, so that the output streams through once, row by row, while
    // `b` stays in L1; otherwise one panel holds every row and `b` streams once, a few
    // vectors of cells at a time, while `w` stays in L1.
    let panel = if k <= m { mr_wide } else { m };
    let mut i0 = 0;
    while i0 < m {
        let i1 = (i0 + panel).min(m);
        let mut j = 0;
        while j < nv {
            let left = nv - j;
            // Three vectors (four rows) for panels of four rows or fewer: two vectors
            // would leave too few independent accumulators to hide the FMA latency.
            let narrow = nv_max == 2 && left >= 3 && i1 - i0 <= 4;
            let (mr, step) = if narrow {
                (4, 3)
            } else {
                (mr_wide, left.min(nv_max))
            };
            let mut i = i0;
            while i < i1 {
                let rows = (i1 - i).min(mr);
                macro_rules! tile {
                    ($r:literal, $v:literal) => {
                        // SAFETY: the asserts above cover rows i..i+rows, columns
                        // j..j+step.
                        unsafe {
                            project_tile::<$r, $v, V, A>(
                                i, j, k, w, rsw, csw, b, ldb, out, ldo, start, epi,
                            )
                        }
                    };
                }
                for_tile_shape!(rows, step, tile);
                i += rows;
            }
            j += step;
        }
        i0 = i1;
    }
}

/// One `R × NV_` tile of [`project`].
///
/// # Safety
/// Rows `i0..i0+R` and vectors `j0..j0+NV_` are within the bounds [`project`] checked.
#[inline(always)]
unsafe fn project_tile<const R: usize, const NV_: usize, V: Vector, A: MulAdd>(
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
    let c0 = j0 * V::LANES;
    match start {
        Start::Zero => {}
        Start::Bias(bias) => {
            for r in 0..R {
                acc[r] = [V::splat(bias[i0 + r]); NV_];
            }
        }
        Start::Current => {
            // Vectors outer, like the stores below.
            for v in 0..NV_ {
                for r in 0..R {
                    let at = (i0 + r) * ldo + c0 + v * V::LANES;
                    // SAFETY: within `out`, by the caller's contract.
                    acc[r][v] = unsafe { V::load_ptr(out.as_ptr().add(at)) };
                }
            }
        }
        Start::RowColumn {
            row,
            row_stride,
            column,
            width,
        } => {
            for v in 0..NV_ {
                // A vector lies in one grid row: `width` is a whole number of vectors.
                let cell = c0 + v * V::LANES;
                let (y, x) = (cell / width, cell % width);
                for r in 0..R {
                    let i = i0 + r;
                    // SAFETY: within `row` and `column`, checked by `project`.
                    let (rv, cv) = unsafe {
                        (
                            *row.as_ptr().add(i * row_stride + y),
                            V::load_ptr(column.as_ptr().add(i * width + x)),
                        )
                    };
                    acc[r][v] = V::splat(rv) + cv;
                }
            }
        }
    }
    let (wp, bp) = (w.as_ptr(), b.as_ptr());
    for kk in 0..k {
        let mut bv = [V::ZERO; NV_];
        for v in 0..NV_ {
            // SAFETY: within `b`, by the caller's contract.
            bv[v] = unsafe { V::load_ptr(bp.add(kk * ldb + c0 + v * V::LANES)) };
        }
        for r in 0..R {
            // SAFETY: within `w`, by the caller's contract.
            let wv = V::splat(unsafe { *wp.add((i0 + r) * rsw + kk * csw) });
            for v in 0..NV_ {
                acc[r][v] = V::madd::<A>(wv, bv[v], acc[r][v]);
            }
        }
    }
    let op = out.as_mut_ptr();
    // Vectors outer, rows inner: with a row's vectors stored one after another, LLVM
    // merged the stores into one copy of the row that it split at odd offsets (4 + 32 +
    // 16 + 8 + 4 bytes) and read from a stack spill of the accumulators, stalling every
    // load on a store it could not forward: products with a short `k` ran at a fifth of
    // their speed.
    for v in 0..NV_ {
        for r in 0..R {
            let at = (i0 + r) * ldo + c0 + v * V::LANES;
            let x = match epi {
                Epilogue::Store => acc[r][v],
                Epilogue::Relu => acc[r][v].relu(),
                // SAFETY: `mask` has the output's layout, checked like it.
                Epilogue::Mask(mask) => {
                    acc[r][v].keep_where_positive(unsafe { V::load_ptr(mask.as_ptr().add(at)) })
                }
            };
            // SAFETY: within `out`, by the caller's contract; `out` is borrowed mutably.
            unsafe { x.store_ptr(op.add(at)) };
        }
    }
}

/// Rows of the output from which [`reduce`] transposes `b` and runs as a [`project`]:
/// below it, transposing would cost more than the products it speeds up.
const TRANSPOSE_MIN_ROWS: usize = 8;

/// Scratch space of [`reduce`], kept by the caller so that a step allocates nothing once
/// it has grown to the largest product.
#[derive(Default)]
pub struct ReduceScratch {
    /// `b` transposed.
    bt: Transposed,
    /// The product before it is added into the output.
    product: Vec<f32>,
}

/// A matrix transposed for [`reduce_transposed`]: one row per cell, its columns padded to
/// whole vectors with zeros. Made once, it serves every product with the same `b`.
#[derive(Default)]
pub struct Transposed {
    /// `cells` rows of `np` floats.
    bt: Vec<f32>,
    /// Columns in use (rows of the original).
    n: usize,
    /// Columns per row: `n` rounded up to whole vectors.
    np: usize,
    /// Rows (cells of the original).
    cells: usize,
}

impl Transposed {
    /// Holds the transpose of `b`'s first `cells` columns of its `n` rows (`ldb` apart),
    /// rows padded to whole vectors of `V`; `V`, `A` say which instruction sets the
    /// caller runs with, as for the products.
    pub fn set<V: Vector, A: MulAdd>(&mut self, (n, cells): (usize, usize), b: &[f32], ldb: usize) {
        let np = n.div_ceil(V::LANES) * V::LANES;
        if n > 0 && cells > 0 {
            assert!(b.len() > last_index(cells - 1, &[(n, ldb)]));
        }
        debug_assert_eq!(cells % V::LANES, 0);
        self.bt.resize(cells * np, 0.0);
        (self.n, self.np, self.cells) = (n, np, cells);
        #[cfg(target_arch = "x86_64")]
        if is::<A, Fused>() {
            // SAFETY: `Fused` runs only where AVX2 is present (see `per_instruction_set!`);
            // `b` was checked above, `bt` holds `cells` rows of `np`, and `cells` and `np`
            // are whole multiples of eight.
            unsafe { transpose_avx2((n, cells), b, ldb, &mut self.bt, np) };
            return;
        }
        for (c, row) in self.bt.chunks_exact_mut(np).take(cells).enumerate() {
            for (j, t) in row[..n].iter_mut().enumerate() {
                *t = b[j * ldb + c];
            }
            row[n..].fill(0.0);
        }
    }
}

/// [`Transposed::set`] in blocks of 8 rows × 8 cells, each transposed in registers (eight
/// loads, 24 shuffles, eight stores instead of 64 scalar moves); rows past `n` read as
/// zero, which writes the padding columns.
///
/// # Safety
/// AVX2 is present; `b` holds rows `0..n` (`ldb` apart) of `cells` floats; `bt` holds
/// `cells` rows of `np`; `cells` and `np` are multiples of 8 and `np ≥ n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn transpose_avx2(
    (n, cells): (usize, usize),
    b: &[f32],
    ldb: usize,
    bt: &mut [f32],
    np: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(cells.is_multiple_of(8) && np.is_multiple_of(8) && np >= n);
    debug_assert!(bt.len() >= cells * np);
    let (bp, tp) = (b.as_ptr(), bt.as_mut_ptr());
    for c0 in (0..cells).step_by(8) {
        for j0 in (0..np).step_by(8) {
            let mut r = [_mm256_setzero_ps(); 8];
            for (i, v) in r.iter_mut().enumerate() {
                if j0 + i < n {
                    // SAFETY: row j0+i < n, cells c0..c0+8 ≤ cells: within `b`.
                    *v = unsafe { _mm256_loadu_ps(bp.add((j0 + i) * ldb + c0)) };
                }
            }
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let out = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (k, v) in out.into_iter().enumerate() {
                // SAFETY: row c0+k < cells, columns j0..j0+8 ≤ np: within `bt`.
                unsafe { _mm256_storeu_ps(tp.add((c0 + k) * np + j0), v) };
            }
        }
    }
}

per_instruction_set! {
    /// `out(i, j) += Σ_c a[i][c] · b[j][c]` for `i < m`, `j < n`, `c < cells`, with
    /// `out(i, j) = out[i·rso + j·cso]`, rows of `a` `lda` apart and of `b` `ldb` apart;
    /// `cells` is a multiple of `V::LANES`.
    ///
    /// With at least [`TRANSPOSE_MIN_ROWS`] rows, `b` is transposed into `scratch` and the
    /// product runs as a [`project`] over vectors of `j` (each output summed over `c` in
    /// order, in one lane: no horizontal sums, which are slow and which LLVM's SLP
    /// vectoriser turned into shuffles across the tile); with fewer, as register tiles over
    /// vectors of cells whose lanes are summed in a fixed order.
    reduce = reduce_inline(
        dims: (usize, usize, usize),
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        out: &mut [f32],
        out_strides: (usize, usize),
        scratch: &mut ReduceScratch
    )
}

/// [`reduce`] itself, inlined into the copy that runs it.
#[inline(always)]
fn reduce_inline<V: Vector, A: MulAdd>(
    (m, n, cells): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    (rso, cso): (usize, usize),
    scratch: &mut ReduceScratch,
) {
    debug_assert_eq!(cells % V::LANES, 0);
    if m == 0 || n == 0 {
        return;
    }
    assert!(out.len() > last_index(0, &[(m, rso), (n, cso)]));
    if cells == 0 {
        return;
    }
    assert!(a.len() > last_index(cells - 1, &[(m, lda)]));
    assert!(b.len() > last_index(cells - 1, &[(n, ldb)]));
    if m < TRANSPOSE_MIN_ROWS {
        reduce_lanes::<V, A>((m, n, cells), a, lda, b, ldb, out, (rso, cso));
        return;
    }
    scratch.bt.set::<V, A>((n, cells), b, ldb);
    reduce_transposed_inline::<V, A>(
        m,
        a,
        lda,
        &scratch.bt,
        out,
        (rso, cso),
        &mut scratch.product,
    );
}

per_instruction_set! {
    /// [`reduce`] with `b` already transposed (`bt`, its `n` and `cells`), for several
    /// products with the same `b`; `product` is scratch space.
    reduce_transposed = reduce_transposed_inline(
        m: usize,
        a: &[f32],
        lda: usize,
        bt: &Transposed,
        out: &mut [f32],
        out_strides: (usize, usize),
        product: &mut Vec<f32>
    )
}

/// [`reduce_transposed`] itself, inlined into the copy that runs it.
#[inline(always)]
fn reduce_transposed_inline<V: Vector, A: MulAdd>(
    m: usize,
    a: &[f32],
    lda: usize,
    bt: &Transposed,
    out: &mut [f32],
    (rso, cso): (usize, usize),
    product: &mut Vec<f32>,
) {
    let (n, np, cells) = (bt.n, bt.np, bt.cells);
    debug_assert_eq!(np % V::LANES, 0);
    if m == 0 || n == 0 || cells == 0 {
        return;
    }
    assert!(out.len() > last_index(0, &[(m, rso), (n, cso)]));
    product.resize(m * np, 0.0);
    project_inline::<V, A>(
        (m, cells, np),
        a,
        (lda, 1),
        &bt.bt,
        np,
        product,
        np,
        Start::Zero,
        Epilogue::Store,
    );
    for (i, row) in product.chunks_exact(np).take(m).enumerate() {
        for (j, &p) in row[..n].iter().enumerate() {
            out[i * rso + j * cso] += p;
        }
    }
}

/// [`reduce`] as register tiles over vectors of cells, lanes summed at the end.
#[inline(always)]
fn reduce_lanes<V: Vector, A: MulAdd>(
    (m, n, cells): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    out: &mut [f32],
    (rso, cso): (usize, usize),
) {
    let (mr, nc) = V::REDUCE_TILE;
    let mut i = 0;
    while i < m {
        let rows = (m - i).min(mr);
        let mut j = 0;
        while j < n {
            let cols = (n - j).min(nc);
            macro_rules! tile {
                ($r:literal, $c:literal) => {
                    // SAFETY: `reduce` checked rows i..i+rows, columns j..j+cols.
                    unsafe {
                        reduce_tile::<$r, $c, V, A>(i, j, cells, a, lda, b, ldb, out, rso, cso)
                    }
                };
            }
            for_tile_shape!(rows, cols, tile);
            j += cols;
        }
        i += rows;
    }
}

/// One `R × C` tile of [`reduce`].
///
/// # Safety
/// Rows `i0..i0+R` and columns `j0..j0+C` are within the bounds [`reduce`] checked.
#[inline(always)]
unsafe fn reduce_tile<const R: usize, const C: usize, V: Vector, A: MulAdd>(
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
    // SAFETY: row i0 of `a` and row j0 of `b` exist, by the caller's contract.
    let (ap, bp) = unsafe { (a.as_ptr().add(i0 * lda), b.as_ptr().add(j0 * ldb)) };
    for c in (0..cells).step_by(V::LANES) {
        let mut av = [V::ZERO; R];
        let mut bv = [V::ZERO; C];
        for r in 0..R {
            // SAFETY: within `a`, by the caller's contract.
            av[r] = unsafe { V::load_ptr(ap.add(r * lda + c)) };
        }
        for s in 0..C {
            // SAFETY: within `b`, by the caller's contract.
            bv[s] = unsafe { V::load_ptr(bp.add(s * ldb + c)) };
        }
        for r in 0..R {
            for s in 0..C {
                acc[r][s] = V::madd::<A>(av[r], bv[s], acc[r][s]);
            }
        }
    }
    // The lanes go through memory and are summed as scalars: summed in registers, LLVM
    // split the whole tile's accumulators into half-width vectors and spilled them.
    let mut lanes = [[[0.0f32; 16]; C]; R];
    for r in 0..R {
        for s in 0..C {
            // SAFETY: `lanes` rows hold 16 ≥ `V::LANES` floats.
            unsafe { acc[r][s].store_ptr(lanes[r][s].as_mut_ptr()) };
        }
    }
    let lanes = std::hint::black_box(&lanes);
    for r in 0..R {
        for s in 0..C {
            let sum: f32 = lanes[r][s][..V::LANES].iter().sum();
            out[(i0 + r) * rso + (j0 + s) * cso] += sum;
        }
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

    fn project_matches_naive_with<V: Vector>() {
        // Outputs wider than `b` (k ≤ m: row panels) and narrower (k > m: one panel),
        // and few rows over many vectors (the three-vector tiles).
        let shapes = [
            (1, 1, 16),
            (5, 7, 48),
            (16, 29, 96),
            (7, 3, 16),
            (3, 40, 112),
            (30, 5, 80),
        ];
        for (m, k, n) in shapes {
            let (w, b) = (data(m * k, 1), data(k * n, 2));
            let bias = data(m, 3);
            // Transposed weight access: w(i, kk) = w[kk·m + i].
            let mut out = vec![0.0; m * n];
            project::<V, Separate>(
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
    fn project_matches_naive() {
        project_matches_naive_with::<F8>();
        project_matches_naive_with::<F16>();
    }

    fn project_from_row_and_column_terms_with<V: Vector>() {
        // Grid rows of 32 cells (two F16 vectors), three of them; row terms `row_stride`
        // apart with an offset, as the caller slices a chunk's rows out of the grid's.
        let (m, k, width, rows, row_stride) = (7, 5, 32, 3, 10);
        let n = width * rows;
        let (w, b) = (data(m * k, 9), data(k * n, 10));
        let (row, column) = (data(2 + m * row_stride, 11), data(m * width, 12));
        let mut out = vec![f32::NAN; m * n];
        let start = Start::RowColumn {
            row: &row[2..],
            row_stride,
            column: &column,
            width,
        };
        project::<V, Separate>(
            (m, k, n),
            &w,
            (k, 1),
            &b,
            n,
            &mut out,
            n,
            start,
            Epilogue::Store,
        );
        for i in 0..m {
            for c in 0..n {
                let mut v = row[2 + i * row_stride + c / width] + column[i * width + c % width];
                for kk in 0..k {
                    v += w[i * k + kk] * b[kk * n + c];
                }
                assert!((out[i * n + c] - v).abs() < 1e-4, "row {i} cell {c}");
            }
        }
    }

    #[test]
    fn project_from_row_and_column_terms() {
        project_from_row_and_column_terms_with::<F8>();
        project_from_row_and_column_terms_with::<F16>();
    }

    #[test]
    fn project_from_current_adds_to_the_output() {
        let (m, k, n) = (7, 5, 32);
        let (w, b) = (data(m * k, 6), data(k * n, 7));
        let before = data(m * n, 8);
        let mut out = before.clone();
        let dims = (m, k, n);
        project::<F8, Separate>(
            dims,
            &w,
            (k, 1),
            &b,
            n,
            &mut out,
            n,
            Start::Current,
            Epilogue::Store,
        );
        for i in 0..m {
            for c in 0..n {
                let mut v = before[i * n + c];
                for kk in 0..k {
                    v += w[i * k + kk] * b[kk * n + c];
                }
                assert!((out[i * n + c] - v).abs() < 1e-4, "{i} {c}");
            }
        }
    }

    fn reduce_matches_naive_with<V: Vector>() {
        // One scratch for every shape: it is reused across products, as in a step.
        let mut scratch = ReduceScratch::default();
        let shapes = [
            (1, 1, 16),
            (5, 7, 48),
            (16, 29, 96),
            (128, 45, 16),
            (9, 3, 32),
        ];
        for (m, n, cells) in shapes {
            let (a, b) = (data(m * cells, 4), data(n * cells, 5));
            let mut out = vec![1.0; m * n];
            // Transposed output: out(i, j) at j·m + i.
            let dims = (m, n, cells);
            reduce::<V, Separate>(dims, &a, cells, &b, cells, &mut out, (1, m), &mut scratch);
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

    #[test]
    fn transposes_agree_with_and_without_avx2() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            use crate::simd::Fused;
            for (n, cells, ldb) in [(19, 256, 300), (16, 32, 32), (33, 64, 80), (3, 16, 16)] {
                let b = data(n * ldb, 9);
                let (mut fast, mut plain) = (Transposed::default(), Transposed::default());
                // Stale contents must not survive in the padding.
                fast.bt = vec![f32::NAN; cells * 48];
                fast.set::<F8, Fused>((n, cells), &b, ldb);
                plain.set::<F8, Separate>((n, cells), &b, ldb);
                assert_eq!(
                    (fast.n, fast.np, fast.cells),
                    (plain.n, plain.np, plain.cells)
                );
                assert_eq!(fast.bt[..cells * fast.np], plain.bt[..cells * plain.np]);
                assert_eq!(plain.bt[fast.np + 1], b[ldb + 1], "{n} {cells}");
            }
        }
    }

    #[test]
    fn reduce_matches_naive() {
        // Shapes below and above TRANSPOSE_MIN_ROWS, for both vector widths.
        reduce_matches_naive_with::<F8>();
        reduce_matches_naive_with::<F16>();
    }
}
