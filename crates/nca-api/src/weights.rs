//! The transition's parameters as plain tensors: one parameter list per model config
//! ([`ModelConfig::parameters`]), derived from [`Param`], with PyTorch-like initialisation.

use rand::{Rng, SeedableRng};

use crate::config::{Init, ModelConfig, Param};
use crate::error::TensorError;
use crate::tensor::HostTensor;

/// The file name of every parameter a model can have, in the order of [`Param::ALL`]
/// (and so of [`Weights::flatten`]); `Param::ALL[i].name()`.
pub const WEIGHT_NAMES: [&str; Param::ALL.len()] = {
    let mut names = [""; Param::ALL.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = Param::ALL[i].name();
        i += 1;
    }
    names
};

/// One entry of a model's parameter list: which parameter, its shape and initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    /// The parameter.
    pub param: Param,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// How [`Weights::init`] draws it.
    pub init: Init,
}

impl ParamSpec {
    /// The tensor name in files ([`Param::name`]).
    pub fn name(&self) -> &'static str {
        self.param.name()
    }

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

impl ModelConfig {
    /// The model's parameter list: the [`Param`]s this model has, in [`Param::ALL`]
    /// order, with their shapes and initialisation. Weights, checkpoints and every
    /// backend's layout are derived from it.
    ///
    /// Order: `wq bq wk bk wv bv wo bo`, then `pk pv` (position embeddings), then `w1 b1`
    /// (MLP).
    pub fn parameters(&self) -> Vec<ParamSpec> {
        Param::ALL
            .into_iter()
            .filter_map(|param| {
                Some(ParamSpec {
                    param,
                    shape: param.shape(self)?,
                    init: param.init(self),
                })
            })
            .collect()
    }
}

/// Where each parameter lives in the flat vector of [`Weights::flatten`].
///
/// Backends that keep all parameters in one buffer index it with this instead of
/// writing the list out again.
#[derive(Clone, Debug, PartialEq)]
pub struct FlatLayout {
    entries: Vec<(Param, usize, usize)>,
    len: usize,
}

impl FlatLayout {
    /// The layout of `model`'s parameters.
    pub fn new(model: &ModelConfig) -> Self {
        let mut entries = Vec::new();
        let mut offset = 0;
        for spec in model.parameters() {
            entries.push((spec.param, offset, spec.len()));
            offset += spec.len();
        }
        Self {
            entries,
            len: offset,
        }
    }

    /// `(offset, len)` of `param`, or `None` when the model has no such parameter.
    pub fn get(&self, param: Param) -> Option<(usize, usize)> {
        self.entries
            .iter()
            .find(|(p, _, _)| *p == param)
            .map(|&(_, o, l)| (o, l))
    }

    /// Offset of `param`, or `None` when the model has no such parameter.
    pub fn offset(&self, param: Param) -> Option<usize> {
        self.get(param).map(|(o, _)| o)
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
/// use nca_api::{ModelConfig, Param, Weights};
/// let model = ModelConfig::default();
/// let w = Weights::init(&model, 0);
/// assert_eq!(w[Param::Wq].shape(), &[16, 3 + 26]);
/// assert!(w[Param::Wo].data().iter().all(|&x| x == 0.0));
/// assert!(Weights::init(&ModelConfig::plain(), 0).get(Param::W1).is_none());
/// ```
///
/// Lookups take a [`Param`], never a string:
///
/// ```compile_fail,E0308
/// let w = nca_api::Weights::zeros(&nca_api::ModelConfig::default());
/// let _ = w.get("wq");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    tensors: Vec<(Param, HostTensor)>,
}

impl Weights {
    /// All-zero weights for `model` (also the shape of gradients and Adam moments).
    pub fn zeros(model: &ModelConfig) -> Self {
        Self {
            tensors: model
                .parameters()
                .into_iter()
                .map(|p| (p.param, HostTensor::zeros(&p.shape)))
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

    /// The tensor of `param`, or `None` when the model has no such parameter.
    pub fn get(&self, param: Param) -> Option<&HostTensor> {
        self.tensors
            .iter()
            .find(|(p, _)| *p == param)
            .map(|(_, t)| t)
    }

    /// Mutable access to the tensor of `param`, or `None` when the model has no such
    /// parameter.
    pub fn get_mut(&mut self, param: Param) -> Option<&mut HostTensor> {
        self.tensors
            .iter_mut()
            .find(|(p, _)| *p == param)
            .map(|(_, t)| t)
    }

    /// The tensor of `param`, or [`TensorError::Missing`] naming it.
    pub fn tensor(&self, param: Param) -> Result<&HostTensor, TensorError> {
        self.get(param)
            .ok_or_else(|| TensorError::Missing(param.name().to_string()))
    }

    /// The tensors with their parameters, in parameter-list order.
    pub fn named(&self) -> Vec<(Param, &HostTensor)> {
        self.tensors.iter().map(|(p, t)| (*p, t)).collect()
    }

    /// Mutable tensors with their parameters, in parameter-list order.
    pub fn named_mut(&mut self) -> Vec<(Param, &mut HostTensor)> {
        self.tensors.iter_mut().map(|(p, t)| (*p, t)).collect()
    }

    /// Builds weights for `model` by looking each of its parameters up with `get` (a file
    /// reader looks up [`Param::name`]); checks every shape. A parameter `get` does not
    /// find is [`TensorError::Missing`] naming it.
    pub fn from_lookup(
        model: &ModelConfig,
        mut get: impl FnMut(Param) -> Option<HostTensor>,
    ) -> Result<Self, TensorError> {
        let mut tensors = Vec::new();
        for spec in model.parameters() {
            let name = spec.name();
            let t = get(spec.param).ok_or_else(|| TensorError::Missing(name.to_string()))?;
            t.expect_shape(name, &spec.shape)?;
            tensors.push((spec.param, t));
        }
        Ok(Self { tensors })
    }

    /// Checks that the tensors are exactly `model`'s parameter list: the same names in
    /// the same order, each with the shape the model implies.
    pub fn check(&self, model: &ModelConfig) -> Result<(), TensorError> {
        let specs = model.parameters();
        for spec in &specs {
            if self.get(spec.param).is_none() {
                return Err(TensorError::Missing(format!(
                    "{} (required by {})",
                    spec.param,
                    spec.param.option().unwrap_or("every model")
                )));
            }
        }
        for (param, _) in &self.tensors {
            if !param.is_in(model) {
                return Err(TensorError::Unexpected(format!(
                    "{param} (the model has no such parameter: {} is off)",
                    param.option().unwrap_or("every model")
                )));
            }
        }
        for (spec, (param, t)) in specs.iter().zip(&self.tensors) {
            if spec.param != *param {
                return Err(TensorError::Unexpected(format!(
                    "{param} where {} belongs (parameters out of order)",
                    spec.param
                )));
            }
            t.expect_shape(param.name(), &spec.shape)?;
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

    /// Moves these weights (an average) toward `latest`: each value becomes
    /// `decay · self + (1 − decay) · latest`, one step of an exponential moving average.
    ///
    /// ```
    /// use nca_api::{ModelConfig, Weights};
    /// let model = ModelConfig::default();
    /// let mut average = Weights::zeros(&model);
    /// let latest = Weights::init(&model, 1);
    /// average.blend_toward(&latest, 0.75).expect("same model");
    /// let (a, l) = (average.flatten(), latest.flatten());
    /// assert!(a.iter().zip(&l).all(|(a, l)| *a == 0.25 * l));
    /// ```
    pub fn blend_toward(&mut self, latest: &Weights, decay: f32) -> Result<(), TensorError> {
        let same = self.tensors.len() == latest.tensors.len()
            && self
                .tensors
                .iter()
                .zip(&latest.tensors)
                .all(|((p, a), (q, b))| p == q && a.shape() == b.shape());
        if !same {
            return Err(TensorError::Unexpected(
                "weights of another model than the average's".into(),
            ));
        }
        let keep = 1.0 - decay;
        for ((_, a), (_, b)) in self.tensors.iter_mut().zip(&latest.tensors) {
            for (x, &y) in a.data_mut().iter_mut().zip(b.data()) {
                *x = decay * *x + keep * y;
            }
        }
        Ok(())
    }

    /// The first parameter holding NaN or infinity, `None` when all are finite.
    pub fn first_non_finite(&self) -> Option<Param> {
        self.tensors
            .iter()
            .find(|(_, t)| !t.is_finite())
            .map(|(param, _)| *param)
    }

    /// True when every parameter is finite.
    pub fn is_finite(&self) -> bool {
        self.tensors.iter().all(|(_, t)| t.is_finite())
    }
}

impl std::ops::Index<Param> for Weights {
    type Output = HostTensor;

    /// The tensor of `param`.
    ///
    /// # Panics
    /// When the model has no such parameter: only `pk`, `pv` (position embeddings) and
    /// `w1`, `b1` (MLP) can be absent; [`Weights::get`] asks without panicking.
    fn index(&self, param: Param) -> &HostTensor {
        match self.get(param) {
            Some(t) => t,
            None => panic!("the model has no parameter {param}"),
        }
    }
}

impl std::ops::IndexMut<Param> for Weights {
    /// Mutable access to the tensor of `param`.
    ///
    /// # Panics
    /// When the model has no such parameter; [`Weights::get_mut`] asks without panicking.
    fn index_mut(&mut self, param: Param) -> &mut HostTensor {
        match self.get_mut(param) {
            Some(t) => t,
            None => panic!("the model has no parameter {param}"),
        }
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
                assert_eq!(zero, matches!(name, Param::Wo | Param::Bo), "{name}");
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
            if name != Param::Wo {
                assert_eq!(Some(t), new.get(name), "{name}");
            }
        }
        assert!(new[Param::W1].data().iter().any(|&x| x != 0.0));
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
        let shape = |p: Param| w.get(p).map(|t| t.shape().to_vec());
        assert_eq!(shape(Param::Wq), Some(vec![8, 13]));
        assert_eq!(shape(Param::W1), Some(vec![12, 21]));
        assert_eq!(shape(Param::Wo), Some(vec![3, 12]));
        assert_eq!(shape(Param::Pk), Some(vec![9, 8]));
        let layout = FlatLayout::new(&model);
        assert_eq!(layout.len(), w.num_params());
        assert_eq!(model.parameter_count(), Some(w.num_params() as u64));
        assert_eq!(layout.get(Param::B1), Some((w.num_params() - 12, 12)));
        let plain = FlatLayout::new(&plain());
        assert_eq!(plain.get(Param::Pk).map(|(_, len)| len), Some(9 * 16));
        assert_eq!(plain.get(Param::W1), None);
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
        half.tensors.retain(|(p, _)| *p != Param::Pv);
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

    #[test]
    fn the_list_follows_param_all() {
        let every = ModelConfig::default();
        let listed: Vec<Param> = every.parameters().iter().map(|s| s.param).collect();
        assert_eq!(listed, Param::ALL);
        let names: Vec<&str> = Weights::zeros(&every)
            .named()
            .iter()
            .map(|(p, _)| p.name())
            .collect();
        assert_eq!(names, WEIGHT_NAMES);
        assert_eq!(
            WEIGHT_NAMES,
            ["wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "pk", "pv", "w1", "b1"]
        );
        let bare = ModelConfig {
            position_embeddings: false,
            ..ModelConfig::plain()
        };
        let listed: Vec<&str> = bare.parameters().iter().map(ParamSpec::name).collect();
        assert_eq!(listed, ["wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo"]);
    }

    #[test]
    fn lookups_by_param_build_weights_and_name_what_is_missing() {
        let model = ModelConfig::default();
        let w = Weights::init(&model, 5);
        let copy = Weights::from_lookup(&model, |p| w.get(p).cloned()).expect("complete");
        assert_eq!(copy, w);
        let err = Weights::from_lookup(&model, |p| (p != Param::Bv).then(|| w[p].clone()))
            .expect_err("bv missing");
        assert_eq!(err, TensorError::Missing("bv".into()));
        assert_eq!(w.tensor(Param::Bv), Ok(&w[Param::Bv]));
        assert_eq!(
            Weights::zeros(&ModelConfig::plain()).tensor(Param::W1),
            Err(TensorError::Missing("w1".into()))
        );
    }

    #[test]
    fn the_first_non_finite_parameter_is_named() {
        let mut w = Weights::init(&ModelConfig::default(), 2);
        assert_eq!(w.first_non_finite(), None);
        w[Param::Pv].data_mut()[1] = f32::NAN;
        w[Param::B1].data_mut()[0] = f32::INFINITY;
        assert_eq!(w.first_non_finite(), Some(Param::Pv));
        assert!(!w.is_finite());
    }

    #[test]
    #[should_panic(expected = "no parameter w1")]
    fn indexing_a_parameter_the_model_lacks_panics() {
        let _ = &Weights::zeros(&ModelConfig::plain())[Param::W1];
    }
}
