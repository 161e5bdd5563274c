//! The vectors the kernels are written in, the multiply-add flavours, and the one place
//! that picks the instruction set the kernels are compiled for.
//!
//! The kernels vectorise across neighbouring cells of a row (structure of arrays), so
//! every per-cell scalar operation becomes one vector operation and no dot product needs
//! a horizontal reduction. [`F8`] (eight lanes) carries the per-cell work, and [`F16`]
//! (sixteen) the matrix products and the picture model's attention on AVX-512 CPUs. The
//! attention's sums across cells stay in eight-lane accumulators fed in cell order
//! ([`Vector::add_to`]), so its results do not depend on the width (the products' do: they
//! sum in another order). Both are plain arrays and loops that LLVM turns into vector
//! registers; no intrinsics, so the same source builds on every target. A kernel is
//! written once as a [`Kernel`] generic over [`MulAdd`] and [`Vector`], and [`run`] calls
//! the copy compiled for the CPU, detected once per process.

use std::ops::{Add, Mul, Sub};
use std::sync::OnceLock;

/// Lanes per vector of the per-cell work: cells processed together.
pub const LANES: usize = 8;

/// Lanes of the widest vector ([`F16`]).
pub const MAX_LANES: usize = 16;

/// Eight `f32` lanes.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(align(32))]
pub struct F8(pub [f32; LANES]);

/// Sixteen `f32` lanes: one AVX-512 register, or two AVX2 ones. Used by the dense
/// matrix products ([`crate::gemm`]) on CPUs with AVX-512.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(align(64))]
pub struct F16(pub [f32; MAX_LANES]);

/// A vector of `f32` lanes: [`F8`] or [`F16`]. Every lane-wise loop compiles to one
/// instruction per vector.
pub trait Vector:
    Copy + 'static + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self>
{
    /// Number of lanes.
    const LANES: usize;
    /// All lanes zero.
    const ZERO: Self;
    /// All lanes `x`.
    fn splat(x: f32) -> Self;
    /// The lanes starting at `src[at]`.
    fn load(src: &[f32], at: usize) -> Self;
    /// Writes the lanes to `dst[at..]`.
    fn store(self, dst: &mut [f32], at: usize);
    /// `a·b + c`, fused or not as `A` says.
    fn madd<A: MulAdd>(a: Self, b: Self, c: Self) -> Self;
    /// `max(0, ·)`.
    fn relu(self) -> Self;
    /// Lanes of `self` where `mask` is positive, zero elsewhere.
    fn keep_where_positive(self, mask: Self) -> Self;
    /// Sum of the lanes in one fixed order, pairwise halves, whatever the width.
    fn sum(self) -> f32;
    /// Lane-wise maximum.
    fn max(self, o: Self) -> Self;
    /// Lane-wise `e^x` (see [`exp`]).
    fn exp(self) -> Self;
    /// Lane-wise `1/x`.
    fn recip(self) -> Self;
    /// `acc` plus the lanes, eight at a time in lane order: the sum an [`F8`] accumulator
    /// reaches by adding the [`F8`] blocks this vector spans one after the other, so a
    /// per-cell pass in wide vectors accumulates exactly what the eight-lane pass did.
    fn add_to(self, acc: F8) -> F8;
    /// `acc` plus `a·b`, eight lanes at a time in lane order (as [`Vector::add_to`]).
    fn madd_to<A: MulAdd>(a: Self, b: Self, acc: F8) -> F8;
    /// Register tile of [`crate::gemm::project`]: output rows × vectors of cells. Sized so
    /// that accumulators, operands and the broadcast fit the register file (16 registers
    /// for [`F8`] on AVX2, 32 for [`F16`] on AVX-512); a tile that spills runs at half
    /// speed.
    const PROJECT_TILE: (usize, usize);
    /// Register tile of [`crate::gemm::reduce`]: output rows × output columns.
    const REDUCE_TILE: (usize, usize);
    /// The lanes starting at `src`.
    ///
    /// # Safety
    /// `src .. src + LANES` must be readable `f32`s.
    unsafe fn load_ptr(src: *const f32) -> Self;
    /// Writes the lanes to `dst .. dst + LANES`.
    ///
    /// # Safety
    /// `dst .. dst + LANES` must be writable `f32`s, borrowed by no one else.
    unsafe fn store_ptr(self, dst: *mut f32);
}

macro_rules! lanewise {
    ($t:ident, $trait:ident, $method:ident, $op:tt) => {
        impl $trait for $t {
            type Output = $t;
            #[inline(always)]
            fn $method(self, o: $t) -> $t {
                let mut r = self.0;
                for (a, b) in r.iter_mut().zip(o.0) {
                    *a $op b;
                }
                $t(r)
            }
        }
    };
}

macro_rules! vector {
    ($t:ident, $n:literal, $project:expr, $reduce:expr) => {
        impl Vector for $t {
            const LANES: usize = $n;
            const ZERO: Self = $t([0.0; $n]);
            const PROJECT_TILE: (usize, usize) = $project;
            const REDUCE_TILE: (usize, usize) = $reduce;
            #[inline(always)]
            unsafe fn load_ptr(src: *const f32) -> Self {
                // A memcpy, like `load`: an array-typed `read_unaligned` is split into
                // scalars by LLVM and reassembled with shuffles.
                let mut v = [0.0; $n];
                // SAFETY: the caller guarantees `$n` readable floats; no alignment needed.
                unsafe { std::ptr::copy_nonoverlapping(src, v.as_mut_ptr(), $n) };
                $t(v)
            }
            #[inline(always)]
            unsafe fn store_ptr(self, dst: *mut f32) {
                // SAFETY: the caller guarantees `$n` writable, unaliased floats.
                unsafe { std::ptr::copy_nonoverlapping(self.0.as_ptr(), dst, $n) }
            }
            #[inline(always)]
            fn splat(x: f32) -> Self {
                $t([x; $n])
            }
            #[inline(always)]
            fn load(src: &[f32], at: usize) -> Self {
                let mut v = [0.0; $n];
                v.copy_from_slice(&src[at..at + $n]);
                $t(v)
            }
            #[inline(always)]
            fn store(self, dst: &mut [f32], at: usize) {
                dst[at..at + $n].copy_from_slice(&self.0);
            }
            #[inline(always)]
            fn madd<A: MulAdd>(a: Self, b: Self, c: Self) -> Self {
                let mut r = c.0;
                for i in 0..$n {
                    r[i] = A::scalar(a.0[i], b.0[i], r[i]);
                }
                $t(r)
            }
            #[inline(always)]
            fn relu(self) -> Self {
                let mut r = self.0;
                for a in &mut r {
                    *a = a.max(0.0);
                }
                $t(r)
            }
            #[inline(always)]
            fn keep_where_positive(self, mask: Self) -> Self {
                let mut r = self.0;
                for (a, m) in r.iter_mut().zip(mask.0) {
                    let keep = u32::from(m > 0.0).wrapping_neg();
                    *a = f32::from_bits(a.to_bits() & keep);
                }
                $t(r)
            }
            #[inline(always)]
            fn max(self, o: Self) -> Self {
                let mut r = self.0;
                for (a, b) in r.iter_mut().zip(o.0) {
                    *a = a.max(b);
                }
                $t(r)
            }
            #[inline(always)]
            fn exp(self) -> Self {
                let mut r = self.0;
                for a in &mut r {
                    *a = exp(*a);
                }
                $t(r)
            }
            #[inline(always)]
            fn recip(self) -> Self {
                let mut r = self.0;
                for a in &mut r {
                    *a = 1.0 / *a;
                }
                $t(r)
            }
            #[inline(always)]
            fn add_to(self, acc: F8) -> F8 {
                let mut r = acc.0;
                for block in self.0.chunks_exact(LANES) {
                    for (a, b) in r.iter_mut().zip(block) {
                        *a += b;
                    }
                }
                F8(r)
            }
            #[inline(always)]
            fn madd_to<A: MulAdd>(a: Self, b: Self, acc: F8) -> F8 {
                let mut r = acc.0;
                for (x, y) in a.0.chunks_exact(LANES).zip(b.0.chunks_exact(LANES)) {
                    for i in 0..LANES {
                        r[i] = A::scalar(x[i], y[i], r[i]);
                    }
                }
                F8(r)
            }
            #[inline(always)]
            fn sum(self) -> f32 {
                // Through memory: summed in registers, the halving shuffles led LLVM to
                // keep a loop's whole accumulator as 64-bit pieces (a 6 % hot spot).
                let mut v = std::hint::black_box(self.0);
                halving_sum(&mut v)
            }
        }
        lanewise!($t, Add, add, +=);
        lanewise!($t, Sub, sub, -=);
        lanewise!($t, Mul, mul, *=);
    };
}

// AVX2 (16 registers): 6×2 = 12 accumulators + 2 operands + 1 broadcast; 4×2 = 8 + 4 + 2.
vector!(F8, 8, (6, 2), (4, 2));
// AVX-512 (32 registers).
vector!(F16, 16, (4, 3), (4, 3));

/// Sum of `v` (a power-of-two length) in [`Vector::sum`]'s order: the upper half is added
/// to the lower, then the same again, down to one; `v` is overwritten on the way. For
/// lanes already in memory: sums made from a vector's stored lanes equal `sum`'s bit for bit.
#[inline(always)]
pub fn halving_sum(v: &mut [f32]) -> f32 {
    debug_assert!(v.len().is_power_of_two());
    let mut n = v.len();
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

/// How `a·b + c` is computed: fused where the CPU has FMA, else multiply then add.
pub trait MulAdd: Copy + 'static {
    /// `a·b + c` on eight lanes.
    #[inline(always)]
    fn madd(a: F8, b: F8, c: F8) -> F8 {
        F8::madd::<Self>(a, b, c)
    }
    /// `a·b + c` on one lane.
    fn scalar(a: f32, b: f32, c: f32) -> f32;
}

/// Separate multiply and add (baseline x86-64 has no FMA; `f32::mul_add` would call libm).
#[derive(Clone, Copy)]
pub struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn scalar(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Fused multiply-add; only used inside functions compiled with the `fma` feature.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy)]
pub struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn scalar(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// The instructions the kernels are compiled for.
// Elsewhere than x86-64 (aarch64, the browser's wasm32) only `Base` is ever detected.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Baseline x86-64 (or another architecture): separate multiply and add, [`F8`].
    Base,
    /// AVX2 + FMA: fused multiply-add, [`F8`] vectors.
    Avx2,
    /// AVX-512: fused multiply-add, [`F16`] vectors in the matrix products and the picture
    /// model's attention.
    Avx512,
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
impl Isa {
    /// The best instruction set this CPU supports, detected on the first call only.
    pub fn get() -> Self {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(Isa::detect)
    }

    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 =
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            let avx512 = std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512vl");
            if avx2 && avx512 {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Base
    }
}

/// A kernel written once over the multiply-add flavour and the product vector, compiled
/// by [`run`] once per instruction set. Binaries stay portable: no `-C target-cpu=native`
/// is needed.
pub trait Kernel {
    /// Whether the body's matrix products gain from [`F16`]. Without, AVX-512 CPUs run
    /// the AVX2 copy and the body is compiled once less (each copy costs build time).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    const WIDE: bool;
    /// What the body returns.
    type Output;
    /// The body. Implementations are `#[inline(always)]`: only inlined into [`run`]'s
    /// per-instruction-set functions is it compiled with their features.
    fn body<A: MulAdd, V: Vector>(self) -> Self::Output;
}

/// Runs `k` as compiled for this CPU's instruction set ([`Isa::get`]).
#[inline]
pub fn run<K: Kernel>(k: K) -> K::Output {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = Isa::get();
        // `K::WIDE` is a constant: for a narrow kernel the AVX-512 copy is never built.
        if K::WIDE && isa == Isa::Avx512 {
            // SAFETY: `Isa::detect` checked that the CPU supports AVX-512, AVX2 and FMA.
            return unsafe { run_avx512(k) };
        }
        if isa != Isa::Base {
            // SAFETY: `Isa::detect` checked that the CPU supports AVX2 and FMA.
            return unsafe { run_avx2(k) };
        }
    }
    k.body::<Separate, F8>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: Kernel>(k: K) -> K::Output {
    k.body::<Fused, F8>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn run_avx512<K: Kernel>(k: K) -> K::Output {
    k.body::<Fused, F16>()
}

/// Turns scores `a` (per lane) whose lane-wise maximum is `max` into softmax weights in
/// place; shared by the plain kernel and the picture model so both normalise identically.
#[inline(always)]
pub fn softmax_in_place<V: Vector>(a: &mut [V], max: V) {
    let mut total = V::ZERO;
    for x in a.iter_mut() {
        *x = (*x - max).exp();
        total = total + *x;
    }
    let inv = total.recip();
    for x in a.iter_mut() {
        *x = *x * inv;
    }
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
    fn a_sum_of_stored_lanes_equals_the_vector_sum_bit_for_bit() {
        // Values of very different sizes, so that another order would round differently.
        let lanes: [f32; 16] = std::array::from_fn(|i| (i as f32 * 0.37 + 1.0).powi(7) * 1e-3);
        let mut stored = lanes;
        assert_eq!(
            halving_sum(&mut stored).to_bits(),
            F16(lanes).sum().to_bits()
        );
        let mut stored8: [f32; 8] = std::array::from_fn(|i| lanes[2 * i]);
        let wide = F8(stored8).sum();
        assert_eq!(halving_sum(&mut stored8).to_bits(), wide.to_bits());
        let sequential: f32 = lanes.iter().sum();
        assert_ne!(
            sequential.to_bits(),
            F16(lanes).sum().to_bits(),
            "pick other values"
        );
    }

    #[test]
    fn fused_multiply_add_rounds_once() {
        // (1 + 2⁻²³)(1 − 2⁻²³) = 1 − 2⁻⁴⁶ exactly, which rounds to 1.0 in f32: a separate
        // multiply loses the 2⁻⁴⁶ before the add, a fused one keeps it.
        let eps = f32::EPSILON; // 2⁻²³
        let (a, b, c) = (F8::splat(1.0 + eps), F8::splat(1.0 - eps), F8::splat(-1.0));
        assert_eq!(Separate::madd(a, b, c), F8::splat(0.0));
        assert_eq!(Fused::madd(a, b, c), F8::splat(-(2.0f32).powi(-46)));
        assert_eq!(Separate::scalar(1.0 + eps, 1.0 - eps, -1.0), 0.0);
        assert_eq!(
            Fused::scalar(1.0 + eps, 1.0 - eps, -1.0),
            -(2.0f32).powi(-46)
        );
        assert_eq!(F8([1., 2., 3., 4., 5., 6., 7., 8.]).sum(), 36.0);
    }
}
