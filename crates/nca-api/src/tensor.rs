//! Plain host tensors: the currency between the training loop, backends and files.

use crate::error::TensorError;

/// The number of elements of `shape`, or `None` when the product overflows usize.
pub fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// A dense, row-major `f32` tensor living in host memory.
///
/// States are `[B, C, H, W]`, targets `[B, V, H, W]`, attention maps `[B, 9, H, W]`;
/// weights use the shapes listed in `testdata/README.md`.
///
/// ```
/// use nca_api::HostTensor;
/// let t = HostTensor::zeros(&[2, 3]);
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!(t.len(), 6);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl HostTensor {
    /// Wraps `data` as a tensor of `shape`; fails when the element count does not match.
    pub fn new(shape: &[usize], data: Vec<f32>) -> Result<Self, TensorError> {
        if element_count(shape) != Some(data.len()) {
            return Err(TensorError::ShapeMismatch {
                expected: shape.to_vec(),
                len: data.len(),
            });
        }
        Ok(Self {
            shape: shape.to_vec(),
            data,
        })
    }

    /// A tensor of `shape` filled with zeros.
    pub fn zeros(shape: &[usize]) -> Self {
        Self::filled(shape, 0.0)
    }

    /// A tensor of `shape` filled with `value`.
    ///
    /// The shape comes from a validated config ([`crate::NcaConfig::validate`] refuses
    /// element counts that overflow); an overflowing shape panics with capacity overflow.
    pub fn filled(shape: &[usize], value: f32) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![value; element_count(shape).unwrap_or(usize::MAX)],
        }
    }

    /// The tensor's dimensions, outermost first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements in row-major order.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Mutable access to the elements in row-major order.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the tensor and returns its elements.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True when the tensor holds no element.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The same elements under a new shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self, TensorError> {
        Self::new(shape, self.data)
    }

    /// Fails with a message naming `what` unless the tensor has exactly `shape`.
    pub fn expect_shape(&self, what: &str, shape: &[usize]) -> Result<(), TensorError> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(TensorError::WrongShape {
                what: what.to_string(),
                expected: shape.to_vec(),
                found: self.shape.clone(),
            })
        }
    }

    /// `[B, C, H, W]` of a rank-4 tensor, or an error naming `what`.
    pub fn dims4(&self, what: &str) -> Result<[usize; 4], TensorError> {
        match self.shape[..] {
            [b, c, h, w] => Ok([b, c, h, w]),
            _ => Err(TensorError::WrongRank {
                what: what.to_string(),
                expected: 4,
                found: self.shape.clone(),
            }),
        }
    }

    /// Channels `[start, start + count)` of a `[B, C, H, W]` tensor.
    pub fn channels(&self, start: usize, count: usize) -> Result<Self, TensorError> {
        let [b, c, h, w] = self.dims4("tensor")?;
        let end = start.saturating_add(count);
        if end > c {
            return Err(TensorError::WrongShape {
                what: format!("channels {start}..{end}"),
                expected: vec![b, end, h, w],
                found: self.shape.clone(),
            });
        }
        let plane = h * w;
        let mut data = Vec::with_capacity(b * count * plane);
        for bi in 0..b {
            let base = (bi * c + start) * plane;
            data.extend_from_slice(&self.data[base..base + count * plane]);
        }
        Self::new(&[b, count, h, w], data)
    }

    /// Largest absolute elementwise difference to `other` (infinite when shapes differ).
    pub fn max_abs_diff(&self, other: &Self) -> f32 {
        if self.shape != other.shape {
            return f32::INFINITY;
        }
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Root-mean-square of the elements (0 for an empty tensor).
    pub fn rms(&self) -> f32 {
        if self.data.is_empty() {
            return 0.0;
        }
        let sum: f64 = self.data.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        (sum / self.data.len() as f64).sqrt() as f32
    }

    /// True when every element is finite.
    pub fn is_finite(&self) -> bool {
        self.data.iter().all(|x| x.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_shape_is_an_error_not_a_panic() {
        let err = HostTensor::new(&[usize::MAX, 2], vec![0.0; 2]).expect_err("overflow");
        assert!(err.to_string().contains("more than 2^64"), "{err}");
        assert_eq!(element_count(&[usize::MAX, 2]), None);
        assert_eq!(element_count(&[3, 0, usize::MAX]), Some(0));
        let t = HostTensor::zeros(&[1, 2, 1, 1]);
        assert!(t.channels(usize::MAX, 2).is_err());
    }
}
