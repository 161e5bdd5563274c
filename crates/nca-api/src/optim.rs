//! Adam over a flat host parameter vector, shared by the host backends.
//!
//! GPU backends keep their moments on the device; host backends (ndarray, dfdx on the
//! CPU) hold parameters as one flat `f32` vector in [`Weights::flatten`] order and use
//! this, so the update rule and its PyTorch details live in one place.

use crate::config::{ModelConfig, OptimizerConfig};
use crate::error::TensorError;
use crate::traits::AdamState;
use crate::weights::Weights;

/// Adam's step count and moments over a flat parameter vector.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatAdam {
    /// Updates applied so far.
    pub step: u64,
    /// First moment, same layout as the parameters.
    pub m: Vec<f32>,
    /// Second moment, same layout as the parameters.
    pub v: Vec<f32>,
}

impl FlatAdam {
    /// An optimiser that has taken no step, for `len` parameters.
    pub fn new(len: usize) -> Self {
        Self {
            step: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// Scales `grads` to global norm `max_norm` when larger, exactly as
    /// `torch.nn.utils.clip_grad_norm_` (coefficient `max_norm / (norm + 1e-6)`, capped at 1).
    pub fn clip(grads: &mut [f32], max_norm: Option<f32>) {
        let Some(max_norm) = max_norm else { return };
        let norm = grads
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        let coef = (f64::from(max_norm) / (norm + 1e-6)).min(1.0) as f32;
        if coef < 1.0 {
            grads.iter_mut().for_each(|g| *g *= coef);
        }
    }

    /// Clips `grads` (if configured) and applies one bias-corrected Adam update to
    /// `params`, step for step as PyTorch's single-tensor Adam.
    pub fn update(&mut self, params: &mut [f32], grads: &mut [f32], cfg: &OptimizerConfig) {
        Self::clip(grads, cfg.grad_clip);
        // Saturating: a restored step count of u64::MAX used to wrap to 0, and a bias
        // correction of 1 - β⁰ = 0 turned every parameter into NaN.
        self.step = self.step.saturating_add(1);
        let (bc1, bc2_sqrt) = bias_corrections(self.step, cfg);
        let step_size = (f64::from(cfg.learning_rate) / bc1) as f32;
        let bc2_sqrt = bc2_sqrt as f32;
        let (b1, b2, eps) = (cfg.beta1, cfg.beta2, cfg.eps);
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads.iter())
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m += (g - *m) * (1.0 - b1);
            *v = *v * b2 + (1.0 - b2) * g * g;
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
        }
    }

    /// The state as plain tensors shaped like `model`'s weights.
    pub fn to_state(&self, model: &ModelConfig) -> Result<AdamState, TensorError> {
        let mut m = Weights::zeros(model);
        let mut v = Weights::zeros(model);
        m.unflatten_from(&self.m)?;
        v.unflatten_from(&self.v)?;
        Ok(AdamState {
            step: self.step,
            m,
            v,
        })
    }

    /// Restores from plain tensors, checking their shapes against `model`.
    pub fn from_state(state: &AdamState, model: &ModelConfig) -> Result<Self, TensorError> {
        state.m.check(model)?;
        state.v.check(model)?;
        Ok(Self {
            step: state.step,
            m: state.m.flatten(),
            v: state.v.flatten(),
        })
    }
}

/// Adam's bias corrections `1 - β1^t` and `√(1 - β2^t)` for update `step` (1-based), in
/// f64 as PyTorch computes them in Python floats; `t` is at least 1, so both are positive
/// and finite for any step count (they tend to 1 for large ones).
pub fn bias_corrections(step: u64, cfg: &OptimizerConfig) -> (f64, f64) {
    let t = step.max(1) as f64;
    let bc1 = 1.0 - f64::from(cfg.beta1).powf(t);
    let bc2_sqrt = (1.0 - f64::from(cfg.beta2).powf(t)).sqrt();
    (bc1, bc2_sqrt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_parameter_by_the_learning_rate() {
        let cfg = OptimizerConfig {
            learning_rate: 0.1,
            ..OptimizerConfig::default()
        };
        let mut adam = FlatAdam::new(2);
        let mut p = vec![1.0, 1.0];
        adam.update(&mut p, &mut [0.5, -3.0], &cfg);
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] - 1.1).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn a_huge_restored_step_count_stays_finite() {
        let cfg = OptimizerConfig::default();
        let mut adam = FlatAdam::new(2);
        adam.step = u64::MAX;
        let mut p = vec![1.0, 1.0];
        adam.update(&mut p, &mut [0.5, -3.0], &cfg);
        adam.update(&mut p, &mut [0.5, -3.0], &cfg);
        assert!(p.iter().all(|x| x.is_finite()), "{p:?}");
        assert_eq!(adam.step, u64::MAX);
        let (bc1, bc2) = bias_corrections(u64::MAX, &cfg);
        assert!(bc1 > 0.0 && bc1.is_finite() && bc2 > 0.0 && bc2.is_finite());
    }

    #[test]
    fn clipping_matches_pytorch() {
        let mut g = vec![3.0, 4.0];
        FlatAdam::clip(&mut g, Some(1.0));
        let norm = (g[0] * g[0] + g[1] * g[1]).sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let mut small = vec![0.3, 0.4];
        FlatAdam::clip(&mut small, Some(1.0));
        assert_eq!(small, vec![0.3, 0.4]);
    }
}
