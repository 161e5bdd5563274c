//! An eight-lane `f32` vector and the multiply-add flavours the kernels are compiled with.
//!
//! The kernels vectorise across eight neighbouring cells of a row (structure of arrays),
//! so every per-cell scalar operation becomes one vector operation and no dot product
//! needs a horizontal reduction. `F8` is plain arrays and loops that LLVM turns into AVX
//! registers; no intrinsics, so the same source builds on every target.

use std::ops::{Add, Mul, Sub};

/// Lanes per vector: cells processed together.
pub const LANES: usize = 8;

/// Eight `f32` lanes.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(align(32))]
pub struct F8(pub [f32; LANES]);

impl F8 {
    /// All lanes zero.
    pub const ZERO: Self = Self([0.0; LANES]);

    /// All lanes `x`.
    #[inline(always)]
    pub fn splat(x: f32) -> Self {
        Self([x; LANES])
    }

    /// The eight values starting at `at`.
    #[inline(always)]
    pub fn load(src: &[f32], at: usize) -> Self {
        let mut v = [0.0; LANES];
        v.copy_from_slice(&src[at..at + LANES]);
        Self(v)
    }

    /// Writes the lanes to `dst[at..at + 8]`.
    #[inline(always)]
    pub fn store(self, dst: &mut [f32], at: usize) {
        dst[at..at + LANES].copy_from_slice(&self.0);
    }

    /// Lane-wise maximum.
    #[inline(always)]
    pub fn max(self, o: Self) -> Self {
        let mut r = self.0;
        for (a, b) in r.iter_mut().zip(o.0) {
            *a = a.max(b);
        }
        Self(r)
    }

    /// Lane-wise `e^x` (see [`exp`]).
    #[inline(always)]
    pub fn exp(self) -> Self {
        let mut r = self.0;
        for a in &mut r {
            *a = exp(*a);
        }
        Self(r)
    }

    /// Sum of the lanes, in a fixed order.
    #[inline(always)]
    pub fn sum(self) -> f32 {
        let v = self.0;
        ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
    }
}

macro_rules! lanewise {
    ($trait:ident, $method:ident, $op:tt) => {
        impl $trait for F8 {
            type Output = F8;
            #[inline(always)]
            fn $method(self, o: F8) -> F8 {
                let mut r = self.0;
                for (a, b) in r.iter_mut().zip(o.0) {
                    *a $op b;
                }
                F8(r)
            }
        }
    };
}
lanewise!(Add, add, +=);
lanewise!(Sub, sub, -=);
lanewise!(Mul, mul, *=);

/// How `a·b + c` is computed: fused where the CPU has FMA, else multiply then add.
pub trait MulAdd: Copy {
    /// `a·b + c`.
    fn madd(a: F8, b: F8, c: F8) -> F8;
    /// `a·b + c` on one lane.
    fn scalar(a: f32, b: f32, c: f32) -> f32;
}

/// Separate multiply and add (baseline x86-64 has no FMA; `f32::mul_add` would call libm).
#[derive(Clone, Copy)]
pub struct Separate;

impl MulAdd for Separate {
    #[inline(always)]
    fn madd(a: F8, b: F8, c: F8) -> F8 {
        a * b + c
    }
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
    fn madd(a: F8, b: F8, c: F8) -> F8 {
        let mut r = c.0;
        for ((r, a), b) in r.iter_mut().zip(a.0).zip(b.0) {
            *r = a.mul_add(b, *r);
        }
        F8(r)
    }
    #[inline(always)]
    fn scalar(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Sixteen `f32` lanes: one AVX-512 register, or two AVX2 ones. Used by the dense
/// matrix products ([`crate::gemm`]) on CPUs with AVX-512.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(align(64))]
pub struct F16(pub [f32; 16]);

/// Turns scores `a` (per lane) whose lane-wise maximum is `max` into softmax weights in
/// place; shared by the plain kernel and the picture model so both normalise identically.
#[inline(always)]
pub fn softmax_in_place(a: &mut [F8], max: F8) {
    let mut total = F8::ZERO;
    for x in a.iter_mut() {
        *x = (*x - max).exp();
        total = total + *x;
    }
    let mut inv = total;
    for t in &mut inv.0 {
        *t = 1.0 / *t;
    }
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
