//! The transition's parameters as plain tensors, with PyTorch-like initialisation.

use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::error::TensorError;
use crate::tensor::HostTensor;

/// Names of every weight tensor, in the order used by [`Weights::flatten`].
///
/// These are the tensor names of `testdata/README.md`, so files open unchanged in
/// PyTorch or NumPy. `pk` and `pv` exist only with position embeddings.
pub const WEIGHT_NAMES: [&str; 10] = ["wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "pk", "pv"];

/// Number of cells in the 3×3 neighbourhood.
pub const NEIGHBOURS: usize = 9;

/// Parameters of the convolutional-attention transition (or gradients / Adam moments of
/// the same shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// Query projection `[D, C]`.
    pub wq: HostTensor,
    /// Query bias `[D]`.
    pub bq: HostTensor,
    /// Key projection `[D, C]`.
    pub wk: HostTensor,
    /// Key bias `[D]`.
    pub bk: HostTensor,
    /// Value projection `[D, C]`.
    pub wv: HostTensor,
    /// Value bias `[D]`.
    pub bv: HostTensor,
    /// Output projection `[C, D]`.
    pub wo: HostTensor,
    /// Output bias `[C]`.
    pub bo: HostTensor,
    /// Per-offset key embeddings `[9, D]`, present with position embeddings.
    pub pk: Option<HostTensor>,
    /// Per-offset value embeddings `[9, D]`, present with position embeddings.
    pub pv: Option<HostTensor>,
}

impl Weights {
    /// All-zero weights for `model` (also the shape of gradients and Adam moments).
    pub fn zeros(model: &ModelConfig) -> Self {
        let (c, d) = (model.channels(), model.attention_dim);
        let pos = model
            .position_embeddings
            .then(|| HostTensor::zeros(&[NEIGHBOURS, d]));
        Self {
            wq: HostTensor::zeros(&[d, c]),
            bq: HostTensor::zeros(&[d]),
            wk: HostTensor::zeros(&[d, c]),
            bk: HostTensor::zeros(&[d]),
            wv: HostTensor::zeros(&[d, c]),
            bv: HostTensor::zeros(&[d]),
            wo: HostTensor::zeros(&[c, d]),
            bo: HostTensor::zeros(&[c]),
            pk: pos.clone(),
            pv: pos,
        }
    }

    /// Fresh weights for `model`, reproducible from `seed`.
    ///
    /// Projections and biases are drawn like PyTorch's `nn.Linear`: uniform in
    /// `±1/sqrt(fan_in)`. Position embeddings are uniform in `±1/sqrt(D)`. The output
    /// projection `wo`, `bo` starts at zero so that `f(s) = 0` at first: with a random
    /// output the trajectory blows up within 2,000 steps (`findings.md` §2).
    pub fn init(model: &ModelConfig, seed: u64) -> Self {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let mut w = Self::zeros(model);
        let c_bound = 1.0 / (model.channels() as f32).sqrt();
        let d_bound = 1.0 / (model.attention_dim as f32).sqrt();
        for t in [
            &mut w.wq, &mut w.bq, &mut w.wk, &mut w.bk, &mut w.wv, &mut w.bv,
        ] {
            fill_uniform(t, c_bound, &mut rng);
        }
        for t in [w.pk.as_mut(), w.pv.as_mut()].into_iter().flatten() {
            fill_uniform(t, d_bound, &mut rng);
        }
        w
    }

    /// The tensors with their names, in [`WEIGHT_NAMES`] order, skipping absent ones.
    pub fn named(&self) -> Vec<(&'static str, &HostTensor)> {
        let mut out = vec![
            ("wq", &self.wq),
            ("bq", &self.bq),
            ("wk", &self.wk),
            ("bk", &self.bk),
            ("wv", &self.wv),
            ("bv", &self.bv),
            ("wo", &self.wo),
            ("bo", &self.bo),
        ];
        if let Some(pk) = &self.pk {
            out.push(("pk", pk));
        }
        if let Some(pv) = &self.pv {
            out.push(("pv", pv));
        }
        out
    }

    /// Mutable tensors with their names, in [`WEIGHT_NAMES`] order, skipping absent ones.
    pub fn named_mut(&mut self) -> Vec<(&'static str, &mut HostTensor)> {
        let mut out = vec![
            ("wq", &mut self.wq),
            ("bq", &mut self.bq),
            ("wk", &mut self.wk),
            ("bk", &mut self.bk),
            ("wv", &mut self.wv),
            ("bv", &mut self.bv),
            ("wo", &mut self.wo),
            ("bo", &mut self.bo),
        ];
        if let Some(pk) = self.pk.as_mut() {
            out.push(("pk", pk));
        }
        if let Some(pv) = self.pv.as_mut() {
            out.push(("pv", pv));
        }
        out
    }

    /// Builds weights for `model` by looking each name up with `get`; checks every shape.
    ///
    /// `pk`/`pv` are required exactly when `model.position_embeddings` is set.
    pub fn from_lookup(
        model: &ModelConfig,
        mut get: impl FnMut(&str) -> Option<HostTensor>,
    ) -> Result<Self, TensorError> {
        let mut w = Self::zeros(model);
        for (name, slot) in w.named_mut() {
            let t = get(name).ok_or_else(|| TensorError::Missing(name.to_string()))?;
            t.expect_shape(name, slot.shape())?;
            *slot = t;
        }
        Ok(w)
    }

    /// Checks that every tensor has the shape `model` implies.
    pub fn check(&self, model: &ModelConfig) -> Result<(), TensorError> {
        let expected = Self::zeros(model);
        if self.pk.is_some() != expected.pk.is_some() {
            return Err(TensorError::Missing(if expected.pk.is_some() {
                "pk/pv (model.position_embeddings is true)".into()
            } else {
                "no pk/pv expected (model.position_embeddings is false)".into()
            }));
        }
        for ((name, t), (_, e)) in self.named().into_iter().zip(expected.named()) {
            t.expect_shape(name, e.shape())?;
        }
        Ok(())
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.named().iter().map(|(_, t)| t.len()).sum()
    }

    /// All parameters concatenated in [`WEIGHT_NAMES`] order.
    pub fn flatten(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.num_params());
        for (_, t) in self.named() {
            out.extend_from_slice(t.data());
        }
        out
    }

    /// Overwrites the parameters from a slice laid out like [`Weights::flatten`].
    pub fn unflatten_from(&mut self, flat: &[f32]) -> Result<(), TensorError> {
        let total = self.num_params();
        if flat.len() != total {
            return Err(TensorError::ShapeMismatch {
                expected: vec![total],
                len: flat.len(),
            });
        }
        let mut offset = 0;
        for (_, t) in self.named_mut() {
            let n = t.len();
            t.data_mut().copy_from_slice(&flat[offset..offset + n]);
            offset += n;
        }
        Ok(())
    }
}

fn fill_uniform(t: &mut HostTensor, bound: f32, rng: &mut impl Rng) {
    for x in t.data_mut() {
        *x = rng.random_range(-bound..bound);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_zeroes_the_output_projection_only() {
        let w = Weights::init(&ModelConfig::default(), 7);
        assert!(w.wo.data().iter().all(|&x| x == 0.0));
        assert!(w.bo.data().iter().all(|&x| x == 0.0));
        assert!(w.wq.data().iter().any(|&x| x != 0.0));
        assert!(w
            .pk
            .as_ref()
            .is_some_and(|p| p.data().iter().any(|&x| x != 0.0)));
        let bound = 1.0 / 3f32.sqrt();
        assert!(w.wk.data().iter().all(|x| x.abs() <= bound));
        assert_eq!(w, Weights::init(&ModelConfig::default(), 7));
        assert_ne!(w, Weights::init(&ModelConfig::default(), 8));
    }

    #[test]
    fn flatten_round_trips() {
        let w = Weights::init(&ModelConfig::default(), 1);
        let mut z = Weights::zeros(&ModelConfig::default());
        z.unflatten_from(&w.flatten()).expect("same size");
        assert_eq!(z, w);
    }
}
