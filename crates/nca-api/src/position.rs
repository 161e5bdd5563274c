//! Fixed Fourier position inputs: what lets a cell know where on the grid it is.
//!
//! Cell (y, x) of an H×W grid has coordinates `X = −1 + 2x/(W−1)`, `Y = −1 + 2y/(H−1)`
//! (0 when that side is 1) and `P = 2 + 4L` features in this order:
//! `[X, Y, then for i in 0..L: sin(2^i·π·X), cos(2^i·π·X), sin(2^i·π·Y), cos(2^i·π·Y)]`.
//! They are computed once per grid size, never trained, and are not part of the state.

use crate::tensor::HostTensor;

/// Number of features for `octaves` octaves: `2 + 4·octaves`.
pub fn feature_count(octaves: u32) -> usize {
    2 + 4 * octaves as usize
}

/// The coordinate a position feature depends on: every feature is a function of `X` alone
/// or of `Y` alone, so a linear map of the features splits into a per-column and a
/// per-row part (what lets a backend skip a product per cell).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// A function of the column's `X` only.
    X,
    /// A function of the row's `Y` only.
    Y,
}

/// Which coordinate feature number `feature` (in [`features`]' order) depends on.
///
/// ```
/// use nca_api::position::{feature_axis, Axis};
/// assert_eq!(feature_axis(0), Axis::X); // X
/// assert_eq!(feature_axis(5), Axis::Y); // cos(π·Y)
/// ```
pub fn feature_axis(feature: usize) -> Axis {
    // Order: X, Y, then per octave sin X, cos X, sin Y, cos Y.
    let is_x = match feature {
        0 => true,
        1 => false,
        f => (f - 2) % 4 < 2,
    };
    if is_x {
        Axis::X
    } else {
        Axis::Y
    }
}

/// The `[P, H, W]` position features of an `height`×`width` grid with `octaves` octaves.
///
/// ```
/// let p = nca_api::position::features(1, 3, 5);
/// assert_eq!(p.shape(), &[6, 3, 5]);
/// // X runs from -1 to 1 along a row; cos(π·X) is -1 at both ends.
/// assert_eq!(p.data()[0], -1.0);
/// assert_eq!(p.data()[4], 1.0);
/// ```
pub fn features(octaves: u32, height: usize, width: usize) -> HostTensor {
    let p = feature_count(octaves);
    let plane = height * width;
    let mut out = HostTensor::zeros(&[p, height, width]);
    let coord = |i: usize, n: usize| {
        if n <= 1 {
            0.0
        } else {
            -1.0 + 2.0 * i as f64 / (n - 1) as f64
        }
    };
    let data = out.data_mut();
    for y in 0..height {
        let cy = coord(y, height);
        for x in 0..width {
            let cx = coord(x, width);
            let cell = y * width + x;
            let mut put = |f: usize, v: f64| data[f * plane + cell] = v as f32;
            put(0, cx);
            put(1, cy);
            for i in 0..octaves as usize {
                let freq = f64::from(1u32 << i.min(31)) * std::f64::consts::PI;
                put(2 + 4 * i, (freq * cx).sin());
                put(3 + 4 * i, (freq * cx).cos());
                put(4 + 4 * i, (freq * cy).sin());
                put(5 + 4 * i, (freq * cy).cos());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_side_of_one_has_coordinate_zero() {
        let p = features(2, 1, 4);
        assert_eq!(p.shape(), &[10, 1, 4]);
        // Y = 0 everywhere: sin 0 = 0, cos 0 = 1.
        for x in 0..4 {
            assert_eq!(p.data()[4 + x], 0.0);
            assert_eq!(p.data()[4 * 4 + x], 0.0);
            assert_eq!(p.data()[5 * 4 + x], 1.0);
        }
    }

    #[test]
    fn each_feature_depends_on_the_axis_it_is_said_to() {
        let (h, w) = (7, 10);
        let p = features(3, h, w);
        let at = |f: usize, y: usize, x: usize| p.data()[(f * h + y) * w + x];
        for f in 0..feature_count(3) {
            let (mut varies_x, mut varies_y) = (false, false);
            for y in 0..h {
                for x in 0..w {
                    varies_x |= at(f, y, x) != at(f, y, 0);
                    varies_y |= at(f, y, x) != at(f, 0, x);
                }
            }
            match feature_axis(f) {
                Axis::X => assert!(varies_x && !varies_y, "feature {f}"),
                Axis::Y => assert!(varies_y && !varies_x, "feature {f}"),
            }
        }
    }

    #[test]
    fn no_octaves_is_just_the_coordinates() {
        let p = features(0, 3, 3);
        assert_eq!(p.shape(), &[2, 3, 3]);
        assert_eq!(p.data()[..3], [-1.0, 0.0, 1.0]);
        assert_eq!(
            p.data()[9..],
            [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
        );
    }
}
