//! The transition's parameters as plain tensors: one parameter list derived from the
//! model config ([`ModelConfig::parameters`]), with PyTorch-like initialisation.

use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::error::TensorError;
use crate::tensor::HostTensor;

/// Every parameter name a model can have, in the order of [`ModelConfig::parameters`]
/// (and so of [`Weights::flatten`]).
///
/// These are the tensor names of `testdata/README.md`, so files open unchanged in
/// PyTorch or NumPy. `pk`/`pv` exist only with position embeddings, `w1`/`b1` only with
/// the MLP update.
pub const WEIGHT_NAMES: [&str; 12] = [
    "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "pk", "pv", "w1", "b1",
];

/// Number of cells in the 3×3 neighbourhood.
pub const NEIGHBOURS: usize = 9;

/// How a parameter is initialised by [`Weights::init`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// All zeros (the output projection, so that `f(s) = 0` at first).
    Zero,
    /// Uniform in `[-bound, bound)`, like PyTorch's `nn.Linear` with `bound = 1/√fan_in`.
    Uniform {
        /// Half-width of the interval.
        bound: f32,
    },
}

/// One entry of a model's parameter list: name, shape and initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// Tensor name (one of [`WEIGHT_NAMES`]).
    pub name: &'static str,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// How [`Weights::init`] draws it.
    pub init: Init,
}

impl ParamSpec {
    /// Number of scalars in the tensor (`usize::MAX` when the shape overflows, which a
    /// validated config rules out).
    pub fn len(&self) -> usize {
        crate::tensor::element_count(&self.shape).unwrap_or(usize::MAX)
    }

    /// True for a tensor without elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where each parameter lives in the flat vector of [`Weights::flatten`].
///
/// Backends that keep all parameters in one buffer index it with this instead of
/// writing the list out again.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    entries: Vec<(&'static str, usize, usize)>,
    len: usize,
}

impl FlatLayout {
    /// The layout of `model`'s parameters.
    pub fn new(model: &ModelConfig) -> Self {
        let mut entries = Vec::new();
        let mut offset = 0;
        for spec in model.parameters() {
            entries.push((spec.name, offset, spec.len()));
            offset += spec.len();
        }
        Self {
            entries,
            len: offset,
        }
    }

    /// `(offset, len)` of `name`, or `None` when the model has no such parameter.
    pub fn get(&self, name: &str) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|&(_, o, l)| (o, l))
    }

    /// Offset of `name`, or `None` when the model has no such parameter.
    pub fn offset(&self, name: &str) -> Option<usize> {
        self.get(name).map(|(o, _)| o)
    }

    /// Total number of scalars.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the model has no parameter (never for a valid model).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Parameters of the convolutional-attention transition (or gradients / Adam moments of
/// the same shapes), in the order of [`ModelConfig::parameters`].
///
/// ```
/// use nca_api::{ModelConfig, Weights};
/// let model = ModelConfig::default();
/// let w = Weights::init(&model, 0);
/// assert_eq!(w.get("wq").map(|t| t.shape().to_vec()), Some(vec![16, 3 + 26]));
/// assert!(w.get("wo").is_some_and(|t| t.data().iter().all(|&x| x == 0.0)));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    tensors: Vec<(&'static str, HostTensor)>,
}

impl Weights {
    /// All-zero weights for `model` (also the shape of gradients and Adam moments).
    pub fn zeros(model: &ModelConfig) -> Self {
        Self {
            tensors: model
                .parameters()
                .into_iter()
                .map(|p| (p.name, HostTensor::zeros(&p.shape)))
                .collect(),
        }
    }

    /// Fresh weights for `model`, reproducible from `seed`.
    ///
    /// Every non-zero parameter is drawn in the order of [`ModelConfig::parameters`] from
    /// one seeded generator. Parameters added by newer model options come last in that
    /// list, so a model without them gets exactly the weights it always got for a seed.
    pub fn init(model: &ModelConfig, seed: u64) -> Self {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
        let mut w = Self::zeros(model);
        for (spec, (_, t)) in model.parameters().iter().zip(w.tensors.iter_mut()) {
            if let Init::Uniform { bound } = spec.init {
                for x in t.data_mut() {
                    *x = rng.random_range(-bound..bound);
                }
            }
        }
        w
    }

    /// The tensor `name`, or `None` when the model has no such parameter.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
    }

    /// Mutable access to the tensor `name`, or `None` when the model has no such parameter.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut HostTensor> {
        self.tensors
            .iter_mut()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| t)
    }

    /// The tensor `name`, or [`TensorError::Missing`].
    pub fn tensor(&self, name: &str) -> Result<&HostTensor, TensorError> {
        self.get(name)
            .ok_or_else(|| TensorError::Missing(name.to_string()))
    }

    /// The tensors with their names, in parameter-list order.
    pub fn named(&self) -> Vec<(&'static str, &HostTensor)> {
        self.tensors.iter().map(|(n, t)| (*n, t)).collect()
    }

    /// Mutable tensors with their names, in parameter-list order.
    pub fn named_mut(&mut self) -> Vec<(&'static str, &mut HostTensor)> {
        self.tensors.iter_mut().map(|(n, t)| (*n, t)).collect()
    }

    /// Builds weights for `model` by looking each name up with `get`; checks every shape.
    pub fn from_lookup(
        model: &ModelConfig,
        mut get: impl FnMut(&str) -> Option<HostTensor>,
    ) -> Result<Self, TensorError> {
        let mut tensors = Vec::new();
        for spec in model.parameters() {
            let t = get(spec.name).ok_or_else(|| TensorError::Missing(spec.name.to_string()))?;
            t.expect_shape(spec.name, &spec.shape)?;
            tensors.push((spec.name, t));
        }
        Ok(Self { tensors })
    }

    /// Checks that the tensors are exactly `model`'s parameter list: the same names in
    /// the same order, each with the shape the model implies.
    pub fn check(&self, model: &ModelConfig) -> Result<(), TensorError> {
        let specs = model.parameters();
        for spec in &specs {
            if self.get(spec.name).is_none() {
                return Err(TensorError::Missing(format!(
                    "{} (required by {})",
                    spec.name,
                    requirement(spec.name)
                )));
            }
        }
        for (name, _) in &self.tensors {
            if !specs.iter().any(|s| s.name == *name) {
                return Err(TensorError::Unexpected(format!(
                    "{name} (the model has no such parameter: {} is off)",
                    requirement(name)
                )));
            }
        }
        for (spec, (name, t)) in specs.iter().zip(&self.tensors) {
            if spec.name != *name {
                return Err(TensorError::Unexpected(format!(
                    "{name} where {} belongs (parameters out of order)",
                    spec.name
                )));
            }
            t.expect_shape(name, &spec.shape)?;
        }
        Ok(())
    }

    /// Total number of scalar parameters.
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(|(_, t)| t.len()).sum()
    }

    /// All parameters concatenated in parameter-list order (see [`FlatLayout`]).
    pub fn flatten(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.num_params());
        for (_, t) in &self.tensors {
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
        for (_, t) in &mut self.tensors {
            let n = t.len();
            t.data_mut().copy_from_slice(&flat[offset..offset + n]);
            offset += n;
        }
        Ok(())
    }

    /// The name of the first parameter holding NaN or infinity, `None` when all are finite.
    pub fn first_non_finite(&self) -> Option<String> {
        self.tensors
            .iter()
            .find(|(_, t)| !t.is_finite())
            .map(|(name, _)| (*name).to_string())
    }

    /// True when every parameter is finite.
    pub fn is_finite(&self) -> bool {
        self.tensors.iter().all(|(_, t)| t.is_finite())
    }
}

/// The model option a parameter belongs to, for error messages.
fn requirement(name: &str) -> &'static str {
    match name {
        "pk" | "pv" => "model.position_embeddings",
        "w1" | "b1" => "model.mlp_hidden",
        _ => "every model",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain() -> ModelConfig {
        ModelConfig {
            position_octaves: None,
            mlp_hidden: None,
            ..ModelConfig::default()
        }
    }

    #[test]
    fn init_zeroes_the_output_projection_only() {
        for model in [plain(), ModelConfig::default()] {
            let w = Weights::init(&model, 7);
            for (name, t) in w.named() {
                let zero = t.data().iter().all(|&x| x == 0.0);
                assert_eq!(zero, name == "wo" || name == "bo", "{name}");
            }
            assert_eq!(w, Weights::init(&model, 7));
            assert_ne!(w, Weights::init(&model, 8));
        }
        let w = Weights::init(&plain(), 7);
        let bound = 1.0 / 3f32.sqrt();
        assert!(w
            .named()
            .iter()
            .all(|(_, t)| t.data().iter().all(|x| x.abs() <= bound)));
    }

    #[test]
    fn new_options_do_not_change_the_old_draws() {
        // The plain model's weights are a prefix of the draws of a model that adds the MLP.
        let old = Weights::init(&plain(), 3);
        let mlp = ModelConfig {
            mlp_hidden: Some(8),
            ..plain()
        };
        let new = Weights::init(&mlp, 3);
        for (name, t) in old.named() {
            if name != "wo" {
                assert_eq!(Some(t), new.get(name), "{name}");
            }
        }
        assert!(new
            .get("w1")
            .is_some_and(|t| t.data().iter().any(|&x| x != 0.0)));
    }

    #[test]
    fn shapes_follow_the_options() {
        let model = ModelConfig {
            position_octaves: Some(2),
            mlp_hidden: Some(12),
            attention_dim: 8,
            ..ModelConfig::default()
        };
        let w = Weights::zeros(&model);
        let shape = |n: &str| w.get(n).map(|t| t.shape().to_vec());
        assert_eq!(shape("wq"), Some(vec![8, 13]));
        assert_eq!(shape("w1"), Some(vec![12, 21]));
        assert_eq!(shape("wo"), Some(vec![3, 12]));
        assert_eq!(shape("pk"), Some(vec![9, 8]));
        let layout = FlatLayout::new(&model);
        assert_eq!(layout.len(), w.num_params());
        assert_eq!(layout.get("b1"), Some((w.num_params() - 12, 12)));
    }

    #[test]
    fn check_compares_the_whole_list() {
        let with = ModelConfig::default();
        let without = ModelConfig {
            position_embeddings: false,
            ..ModelConfig::default()
        };
        assert!(Weights::zeros(&with).check(&with).is_ok());
        assert!(Weights::zeros(&with).check(&without).is_err());
        assert!(Weights::zeros(&without).check(&with).is_err());
        // pk without pv is refused, not padded.
        let mut half = Weights::zeros(&with);
        half.tensors.retain(|(n, _)| *n != "pv");
        let err = half.check(&with).expect_err("pv missing");
        assert!(err.to_string().contains("pv"), "{err}");
        let no_mlp = ModelConfig {
            mlp_hidden: None,
            ..ModelConfig::default()
        };
        let err = Weights::zeros(&with).check(&no_mlp).expect_err("w1 extra");
        assert!(err.to_string().contains("w1"), "{err}");
    }

    #[test]
    fn flatten_round_trips() {
        let w = Weights::init(&ModelConfig::default(), 1);
        let mut z = Weights::zeros(&ModelConfig::default());
        z.unflatten_from(&w.flatten()).expect("same size");
        assert_eq!(z, w);
    }
}
