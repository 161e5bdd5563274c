//! Serde configuration types with defaults from the original design (see docs/design-notes.md) and validation.
//!
//! Every struct rejects unknown fields so a misspelled key is an error, never ignored.

use serde::{Deserialize, Serialize};

use crate::error::{ConfigError, TensorError};

/// Largest `model.position_octaves` accepted: 2^16·π is already far beyond what a grid
/// of any size can resolve.
pub const MAX_POSITION_OCTAVES: u32 = 16;

/// Largest `model.mlp_hidden` accepted, a guard against typos that would allocate
/// gigabytes of weights.
pub const MAX_MLP_HIDDEN: usize = 4096;

/// The learning rate used when a config does not set one.
///
/// The original design's 1e-3 needs 795–1,819 steps to reach ε on the solid-red run
/// (`docs/design-notes.md`), too close to its own 1,000-step check; 3e-3 was measured to reach ε in
/// well under 1,000 steps on every seed tried while staying stable (see README).
pub const DEFAULT_LEARNING_RATE: f32 = 3e-3;

/// The global gradient-norm clip used when a config does not set one.
///
/// Measured on real photographs with the default picture model: 44.5–45.8 dB regrowth
/// with clipping at 1.0 against 41.7–44.0 dB without, and the first loss below ε sooner.
pub const DEFAULT_GRAD_CLIP: f32 = 1.0;

/// Size of the grid: batch of independent trajectories, height and width in cells.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GridConfig {
    /// Grid height in cells.
    pub height: usize,
    /// Grid width in cells.
    pub width: usize,
    /// Number of independent trajectories trained together.
    pub batch: usize,
}

impl Default for GridConfig {
    fn default() -> Self {
        Self {
            height: 32,
            width: 32,
            batch: 1,
        }
    }
}

/// Shape and options of the convolutional-attention transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Channels compared with the target (3 for RGB).
    pub visible_channels: usize,
    /// Extra channels the rule may use as memory; never compared with the target.
    pub hidden_channels: usize,
    /// Width D of queries, keys and values.
    pub attention_dim: usize,
    /// Learned per-offset embeddings added to keys and values (`pk`, `pv`).
    ///
    /// Without them the 3×3 attention is isotropic and cannot single out the centre cell
    /// (`docs/design-notes.md` §1).
    pub position_embeddings: bool,
    /// Clamp the carried state to `[-limit, limit]` after every step; `None` disables.
    pub state_clamp: Option<f32>,
    /// Octaves L of the fixed Fourier position inputs each cell sees (P = 2 + 4L
    /// features, see [`crate::position`]); `None` gives the cells no position.
    ///
    /// With one-step gradients a cell that does not know where it is cannot paint a
    /// position-dependent picture: rollouts of real photos stay a flat mean colour.
    pub position_octaves: Option<u32>,
    /// Hidden width M of the MLP update `f = wo·relu(w1·[u; x] + b1) + bo`; `None` keeps
    /// the linear output `f = wo·u + bo`.
    pub mlp_hidden: Option<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            visible_channels: 3,
            hidden_channels: 0,
            attention_dim: 16,
            position_embeddings: true,
            state_clamp: Some(3.0),
            position_octaves: Some(6),
            mlp_hidden: Some(128),
        }
    }
}

impl ModelConfig {
    /// Total channels C = visible + hidden.
    pub fn channels(&self) -> usize {
        self.visible_channels.saturating_add(self.hidden_channels)
    }

    /// The original design's model: no position inputs, linear output (per-offset embeddings
    /// and the state clamp as by default).
    pub fn plain() -> Self {
        Self {
            position_octaves: None,
            mlp_hidden: None,
            ..Self::default()
        }
    }

    /// Number P of position features per cell (0 without position inputs).
    pub fn position_features(&self) -> usize {
        self.position_octaves
            .map_or(0, |l| 2usize.saturating_add((l as usize).saturating_mul(4)))
    }

    /// Length C + P of a cell's input vector (state channels, then position features).
    pub fn input_width(&self) -> usize {
        self.channels().saturating_add(self.position_features())
    }

    /// Width of the layer `wo` reads: M with the MLP, else D.
    pub fn output_width(&self) -> usize {
        self.mlp_hidden.unwrap_or(self.attention_dim)
    }

    /// Number of scalar parameters of the model, summed over [`Param::ALL`] in checked
    /// arithmetic (`None` when it overflows u64).
    pub fn parameter_count(&self) -> Option<u64> {
        Param::ALL
            .iter()
            .filter_map(|param| param.shape(self))
            .try_fold(0u64, |sum, shape| {
                let len = shape
                    .iter()
                    .try_fold(1u64, |len, &dim| len.checked_mul(u64::try_from(dim).ok()?))?;
                sum.checked_add(len)
            })
    }

    /// The fields in which `other` differs from `self` that change the parameter list
    /// or the math (everything but `state_clamp`), as `model.NAME: A vs B` strings.
    pub fn differences(&self, other: &Self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |field: &str, a: String, b: String| {
            if a != b {
                out.push(format!("model.{field}: {a} vs {b}"));
            }
        };
        cmp(
            "visible_channels",
            self.visible_channels.to_string(),
            other.visible_channels.to_string(),
        );
        cmp(
            "hidden_channels",
            self.hidden_channels.to_string(),
            other.hidden_channels.to_string(),
        );
        cmp(
            "attention_dim",
            self.attention_dim.to_string(),
            other.attention_dim.to_string(),
        );
        cmp(
            "position_embeddings",
            self.position_embeddings.to_string(),
            other.position_embeddings.to_string(),
        );
        cmp(
            "position_octaves",
            format!("{:?}", self.position_octaves),
            format!("{:?}", other.position_octaves),
        );
        cmp(
            "mlp_hidden",
            format!("{:?}", self.mlp_hidden),
            format!("{:?}", other.mlp_hidden),
        );
        out
    }

    /// `[B, C, H, W]` of a state shape that fits this model: C channels, no empty axis.
    pub fn check_state(&self, shape: &[usize]) -> Result<[usize; 4], TensorError> {
        check_grid("state", shape, self.channels())
    }

    /// `[B, V, H, W]` of a target shape that fits this model: V visible channels, no
    /// empty axis.
    pub fn check_target(&self, shape: &[usize]) -> Result<[usize; 4], TensorError> {
        check_grid("target", shape, self.visible_channels)
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("model.visible_channels", self.visible_channels)?;
        positive("model.attention_dim", self.attention_dim)?;
        if self
            .visible_channels
            .checked_add(self.hidden_channels)
            .is_none()
        {
            return Err(ConfigError {
                field: "model.hidden_channels".into(),
                message: format!("{} channels in all is too many", self.hidden_channels),
            });
        }
        if let Some(l) = self.position_octaves {
            if l > MAX_POSITION_OCTAVES {
                return Err(ConfigError {
                    field: "model.position_octaves".into(),
                    message: format!(
                        "expected at most {MAX_POSITION_OCTAVES} octaves or None, found {l}"
                    ),
                });
            }
        }
        if let Some(m) = self.mlp_hidden {
            if m == 0 || m > MAX_MLP_HIDDEN {
                return Err(ConfigError {
                    field: "model.mlp_hidden".into(),
                    message: format!(
                        "expected a hidden width from 1 to {MAX_MLP_HIDDEN} or None, found {m}"
                    ),
                });
            }
        }
        self.check_parameter_count()?;
        if let Some(limit) = self.state_clamp {
            if !(limit.is_finite() && limit > 0.0) {
                return Err(ConfigError {
                    field: "model.state_clamp".into(),
                    message: format!("expected a finite value > 0 or None, found {limit}"),
                });
            }
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Refuses a model whose weight tensors' element counts overflow, naming the field
    /// that makes them so.
    fn check_parameter_count(&self) -> Result<(), ConfigError> {
        if self
            .parameter_count()
            .and_then(|n| n.checked_mul(4))
            .is_some_and(|bytes| bytes <= MAX_BUFFER_BYTES)
        {
            return Ok(());
        }
        let field = if self.hidden_channels > self.attention_dim {
            "model.hidden_channels"
        } else {
            "model.attention_dim"
        };
        Err(ConfigError {
            field: field.into(),
            message: format!(
                "{} channels and attention width {} give more weights than fit in memory",
                self.channels(),
                self.attention_dim
            ),
        })
    }
}

/// Largest buffer Rust can allocate (`isize::MAX` bytes): a tensor larger than this is
/// refused by the config, not discovered as a capacity-overflow panic.
const MAX_BUFFER_BYTES: u64 = isize::MAX as u64;

/// Number of cells in the 3×3 neighbourhood.
pub const NEIGHBOURS: usize = 9;

/// How a parameter is initialised by [`crate::Weights::init`].
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

/// One parameter tensor of the transition: its name in files, its shape and its
/// initialisation all follow from the variant, so a misspelt parameter does not compile.
///
/// With D = `attention_dim`, C = channels, X = C + P the cell's input width, M =
/// `mlp_hidden` and O the width `wo` reads (M with the MLP, else D):
///
/// | param | shape | init | present |
/// |---|---|---|---|
/// | `wq`, `wk`, `wv` | `[D, X]` | ±1/√X | always |
/// | `bq`, `bk`, `bv` | `[D]` | ±1/√X | always |
/// | `wo` | `[C, O]` | zero | always |
/// | `bo` | `[C]` | zero | always |
/// | `pk`, `pv` | `[9, D]` | ±1/√D | `model.position_embeddings` |
/// | `w1` | `[M, D + X]` | ±1/√(D + X) | `model.mlp_hidden` |
/// | `b1` | `[M]` | ±1/√(D + X) | `model.mlp_hidden` |
///
/// The output projection starts at zero so that `f(s) = 0` at first (a random output
/// made trajectories blow up); the others are drawn like PyTorch's `nn.Linear`.
///
/// ```
/// use nca_api::{ModelConfig, Param};
/// let model = ModelConfig::default();
/// assert_eq!(Param::Wq.name(), "wq");
/// assert_eq!(Param::Wq.shape(&model), Some(vec![16, 3 + 26]));
/// assert_eq!(Param::W1.shape(&ModelConfig::plain()), None);
/// assert_eq!("pk".parse::<Param>(), Ok(Param::Pk));
/// ```
///
/// A name that is not a parameter is a compile error, not a lookup that finds nothing:
///
/// ```compile_fail,E0599
/// let _ = nca_api::Param::Wqq;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Param {
    /// Query projection.
    Wq,
    /// Query bias.
    Bq,
    /// Key projection.
    Wk,
    /// Key bias.
    Bk,
    /// Value projection.
    Wv,
    /// Value bias.
    Bv,
    /// Output projection (zero at initialisation).
    Wo,
    /// Output bias (zero at initialisation).
    Bo,
    /// Per-offset key embeddings (with `model.position_embeddings`).
    Pk,
    /// Per-offset value embeddings (with `model.position_embeddings`).
    Pv,
    /// MLP hidden layer (with `model.mlp_hidden`).
    W1,
    /// MLP hidden bias (with `model.mlp_hidden`).
    B1,
}

impl Param {
    /// Every parameter a model can have, in parameter-list order (the order of
    /// [`ModelConfig::parameters`], [`crate::Weights::flatten`] and [`crate::FlatLayout`]).
    ///
    /// Parameters of newer model options come last, so a model without them keeps the
    /// initial weights it always had for a seed.
    pub const ALL: [Param; 12] = [
        Param::Wq,
        Param::Bq,
        Param::Wk,
        Param::Bk,
        Param::Wv,
        Param::Bv,
        Param::Wo,
        Param::Bo,
        Param::Pk,
        Param::Pv,
        Param::W1,
        Param::B1,
    ];

    /// The tensor name in safetensors files (those of `testdata/README.md`, so files open
    /// unchanged in PyTorch or NumPy).
    pub const fn name(self) -> &'static str {
        match self {
            Param::Wq => "wq",
            Param::Bq => "bq",
            Param::Wk => "wk",
            Param::Bk => "bk",
            Param::Wv => "wv",
            Param::Bv => "bv",
            Param::Wo => "wo",
            Param::Bo => "bo",
            Param::Pk => "pk",
            Param::Pv => "pv",
            Param::W1 => "w1",
            Param::B1 => "b1",
        }
    }

    /// The model option that adds this parameter, `None` for those every model has.
    pub const fn option(self) -> Option<&'static str> {
        match self {
            Param::Pk | Param::Pv => Some("model.position_embeddings"),
            Param::W1 | Param::B1 => Some("model.mlp_hidden"),
            _ => None,
        }
    }

    /// Whether `model` has this parameter.
    pub fn is_in(self, model: &ModelConfig) -> bool {
        match self {
            Param::Pk | Param::Pv => model.position_embeddings,
            Param::W1 | Param::B1 => model.mlp_hidden.is_some(),
            _ => true,
        }
    }

    /// The shape, outermost first, of this parameter in `model`; `None` when the model
    /// has no such parameter.
    pub fn shape(self, model: &ModelConfig) -> Option<Vec<usize>> {
        if !self.is_in(model) {
            return None;
        }
        let (c, d, x) = (model.channels(), model.attention_dim, model.input_width());
        let m = model.mlp_hidden.unwrap_or(0);
        Some(match self {
            Param::Wq | Param::Wk | Param::Wv => vec![d, x],
            Param::Bq | Param::Bk | Param::Bv => vec![d],
            Param::Wo => vec![c, model.output_width()],
            Param::Bo => vec![c],
            Param::Pk | Param::Pv => vec![NEIGHBOURS, d],
            Param::W1 => vec![m, d.saturating_add(x)],
            Param::B1 => vec![m],
        })
    }

    /// How [`crate::Weights::init`] draws this parameter for `model`.
    pub fn init(self, model: &ModelConfig) -> Init {
        let uniform = |fan_in: usize| Init::Uniform {
            bound: 1.0 / (fan_in.max(1) as f32).sqrt(),
        };
        let (d, x) = (model.attention_dim, model.input_width());
        match self {
            Param::Wq | Param::Bq | Param::Wk | Param::Bk | Param::Wv | Param::Bv => uniform(x),
            Param::Wo | Param::Bo => Init::Zero,
            Param::Pk | Param::Pv => uniform(d),
            Param::W1 | Param::B1 => uniform(d.saturating_add(x)),
        }
    }
}

impl std::fmt::Display for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Param {
    type Err = TensorError;

    /// The parameter whose file name is `name`; any other name is
    /// [`TensorError::Unexpected`], naming it and the valid ones.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Param::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let valid: Vec<&str> = Param::ALL.iter().map(|p| p.name()).collect();
                TensorError::Unexpected(format!(
                    "{name} (not a parameter name; expected one of {})",
                    valid.join(", ")
                ))
            })
    }
}

/// Noise levels and the spike threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseConfig {
    /// Standard deviation of the Gaussian noise added before every step.
    pub sigma_small: f32,
    /// Standard deviation of the spike added when the loss falls below `epsilon`.
    pub sigma_large: f32,
    /// Loss below which the trajectory counts as having reached the target.
    pub epsilon: f32,
}

impl Default for NoiseConfig {
    fn default() -> Self {
        Self {
            sigma_small: 0.01,
            sigma_large: 0.1,
            epsilon: 0.001,
        }
    }
}

impl NoiseConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        non_negative("noise.sigma_small", self.sigma_small)?;
        non_negative("noise.sigma_large", self.sigma_large)?;
        strictly_positive("noise.epsilon", self.epsilon)
    }
}

/// Optimiser and loop settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    /// Training steps to run.
    pub steps: u64,
    /// Adam learning rate.
    pub learning_rate: f32,
    /// Clip the global gradient norm to this value before the Adam update.
    pub grad_clip: Option<f32>,
    /// Stop after this many spikes (simulated trajectories reaching the target).
    pub max_spikes: Option<u64>,
    /// Seed for weight init, the initial state and all noise.
    pub seed: u64,
    /// How the learning rate changes over the run (a function of the step, so a resumed
    /// run continues it).
    pub lr_schedule: LrSchedule,
    /// Stop once the rule's regrowth PSNR reaches this many dB; checked whenever the rule is
    /// scored during training (every `evaluation.every` steps of a run file).
    pub stop_at_psnr: Option<f32>,
    /// When the carried state gets a spike (a simulated new trajectory) and what it does.
    pub spike: SpikeRule,
    /// Keep an exponential moving average of the weights, with this decay per step
    /// (`average ← decay · average + (1 − decay) · weights` after every step; 0.99 averages
    /// over about the last hundred steps). The average is what the run scores, keeps and
    /// saves as the rule (a checkpoint's weights; training resumes from the weights
    /// stored beside it); training itself continues from the latest weights. `None`: the
    /// latest weights are the rule.
    ///
    /// A step's weights carry that step's gradient noise, and a rule rolled out for a
    /// hundred steps amplifies it; the average does not (docs/sizing.md).
    pub ema_decay: Option<f32>,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            steps: 10_000,
            learning_rate: DEFAULT_LEARNING_RATE,
            grad_clip: Some(DEFAULT_GRAD_CLIP),
            max_spikes: None,
            seed: 0,
            lr_schedule: LrSchedule::Constant,
            stop_at_psnr: None,
            spike: SpikeRule::default(),
            ema_decay: None,
        }
    }
}

/// The learning rate of each step, relative to `training.learning_rate`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LrSchedule {
    /// The same rate at every step.
    #[default]
    Constant,
    /// A linear warm-up from `lr / warmup_steps` to `lr` over the first `warmup_steps`
    /// steps, then a cosine decay to `final_fraction · lr` at `training.steps`.
    ///
    /// Large pictures need it: with a constant rate the 128×128 picture model's regrowth
    /// collapsed late in the run.
    WarmupCosine {
        /// Steps of the linear warm-up (0: none).
        warmup_steps: u64,
        /// The rate at the last step, as a fraction of `training.learning_rate`.
        final_fraction: f32,
    },
}

impl LrSchedule {
    /// The learning rate of step `step` (1-based) of a `total`-step run whose base rate
    /// is `base`.
    ///
    /// ```
    /// use nca_api::LrSchedule;
    /// let s = LrSchedule::WarmupCosine { warmup_steps: 10, final_fraction: 0.1 };
    /// assert_eq!(s.rate(1.0, 5, 110), 0.5);
    /// assert_eq!(s.rate(1.0, 10, 110), 1.0);
    /// assert!((s.rate(1.0, 60, 110) - 0.55).abs() < 1e-6);
    /// assert!((s.rate(1.0, 110, 110) - 0.1).abs() < 1e-6);
    /// assert_eq!(LrSchedule::Constant.rate(3e-3, 7, 10), 3e-3);
    /// ```
    pub fn rate(&self, base: f32, step: u64, total: u64) -> f32 {
        match *self {
            LrSchedule::Constant => base,
            LrSchedule::WarmupCosine {
                warmup_steps,
                final_fraction,
            } => {
                if step < warmup_steps {
                    return (f64::from(base) * step.max(1) as f64 / warmup_steps as f64) as f32;
                }
                let span = total.saturating_sub(warmup_steps);
                let done = if span == 0 {
                    1.0
                } else {
                    (step.saturating_sub(warmup_steps) as f64 / span as f64).min(1.0)
                };
                let f = f64::from(final_fraction);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * done).cos());
                (f64::from(base) * (f + (1.0 - f) * cosine)) as f32
            }
        }
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let LrSchedule::WarmupCosine { final_fraction, .. } = *self {
            if !(final_fraction.is_finite() && (0.0..=1.0).contains(&final_fraction)) {
                return Err(ConfigError {
                    field: "training.lr_schedule.final_fraction".into(),
                    message: format!("expected a value from 0 to 1, found {final_fraction}"),
                });
            }
        }
        Ok(())
    }
}

/// When the carried state gets a spike and what the spike does.
///
/// The default is the original design's rule: a `noise.sigma_large` spike whenever the
/// loss is below `noise.epsilon`. On busy pictures the loss may never get there, so the
/// simulated new trajectories stop; `force_after` and `threshold` keep them coming, and
/// `reset_every` gives the trajectory a real fresh start at a fixed period.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpikeRule {
    /// The loss below which a step spikes.
    pub threshold: SpikeThreshold,
    /// Also spike after this many steps without a spike.
    pub force_after: Option<u64>,
    /// What a spike does to the carried state.
    pub kind: SpikeKind,
    /// Also replace the carried state with fresh N(0, 1) noise at every multiple of this
    /// many steps, whatever the loss and whatever `kind` says: the start the regrowth
    /// score uses, which the other spikes never show the rule once it is trained.
    pub reset_every: Option<u64>,
}

/// The loss below which a step spikes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum SpikeThreshold {
    /// `noise.epsilon`.
    #[default]
    Epsilon,
    /// This fraction of the variance of the target's visible values: a loss that small
    /// means the same thing on a busy picture as on a plain one.
    TargetVariance(f32),
}

/// What a spike does to the carried state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum SpikeKind {
    /// Adds `noise.sigma_large · N(0, 1)`.
    #[default]
    Add,
    /// Adds `fraction · RMS(state) · N(0, 1)`: the same relative shake whatever the
    /// state's scale.
    Scaled(f32),
    /// Replaces the state with fresh N(0, 1) noise, as at the start of the run.
    Reset,
}

impl SpikeRule {
    /// The loss threshold for a target `target` (its variance is taken for
    /// [`SpikeThreshold::TargetVariance`]) and the noise settings `noise`.
    pub fn epsilon(&self, noise: &NoiseConfig, target: &crate::HostTensor) -> f32 {
        match self.threshold {
            SpikeThreshold::Epsilon => noise.epsilon,
            SpikeThreshold::TargetVariance(fraction) => {
                let data = target.data();
                let n = data.len().max(1) as f64;
                let mean = data.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
                let var = data
                    .iter()
                    .map(|&x| (f64::from(x) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                (f64::from(fraction) * var) as f32
            }
        }
    }

    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let SpikeThreshold::TargetVariance(f) = self.threshold {
            strictly_positive("training.spike.threshold", f)?;
        }
        if let SpikeKind::Scaled(f) = self.kind {
            strictly_positive("training.spike.kind", f)?;
        }
        for (field, value) in [
            ("training.spike.force_after", self.force_after),
            ("training.spike.reset_every", self.reset_every),
        ] {
            if value == Some(0) {
                return Err(ConfigError {
                    field: field.into(),
                    message: "expected at least 1 or None, found 0".into(),
                });
            }
        }
        Ok(())
    }
}

/// Settings chosen for the size of the grid when a run leaves them out: the one rule
/// that sizes the picture model, its training length and its schedules.
///
/// Measured on the bundled cat photograph (ndarray): at 32×32 the defaults with a
/// decaying learning rate reach about 50 dB regrowth PSNR; at 128×128 they reach only
/// 26 dB, while 7 octaves, a 256-wide MLP, 18,000 steps and a warm-up + cosine learning
/// rate reach 35–37 dB, and a 512-wide MLP gets busier photos there too (docs/sizing.md
/// in the repository has the tables).
#[derive(Clone, Debug, PartialEq)]
pub struct SizedDefaults {
    /// `model.position_octaves`.
    pub position_octaves: Option<u32>,
    /// `model.mlp_hidden`.
    pub mlp_hidden: Option<usize>,
    /// `training.steps`.
    pub steps: u64,
    /// `training.learning_rate`.
    pub learning_rate: f32,
    /// `training.lr_schedule`.
    pub lr_schedule: LrSchedule,
    /// `training.spike`.
    pub spike: SpikeRule,
    /// `training.ema_decay`.
    pub ema_decay: Option<f32>,
}

/// Decay per step of the sized runs' moving average of the weights
/// (`training.ema_decay`) in runs of 4,000 steps or more: an average over about the last
/// 200 steps ([`SizedDefaults::ema_decay_for`] shortens it for shorter runs). Scored side by side
/// with the latest weights of the same runs, averages over 80–400 steps regrew the 32×32
/// cat 0.5–1.2 dB better late in the run (three seeds), and a 256×256 photo 1–2 dB
/// better in mid-run and 0.2–0.4 dB at the end, where the decayed learning rate leaves
/// less noise to average (docs/sizing.md).
pub const SIZED_EMA_DECAY: f32 = 0.995;

/// Period, in steps, of a large grid's resets to fresh noise
/// ([`SizedDefaults::for_grid`], `training.spike.reset_every`).
pub const LARGE_GRID_RESET_EVERY: u64 = 500;

/// Largest grid side that keeps the small-picture model and length (the defaults of
/// [`ModelConfig`] and [`TrainingConfig`]).
pub const SMALL_GRID_SIDE: usize = 64;

/// Largest grid side whose sized learning rate decays (warm-up + cosine) on the small
/// model. Up to 32×32 the 10,000 steps are enough for the picture to converge and the
/// decay lets it settle (the 32×32 cat's last weights 49.3–51.5 dB over five training
/// seeds, against 45.2–50.7 at a constant rate); at 48×48 and 64×64 it is still learning
/// when the steps end, and the decay only slows it (64×64: 38.7–39.1 against 41.2 dB).
pub const DECAYED_RATE_MAX_SIDE: usize = 32;

/// The sized warm-up + cosine schedule: 500 steps of warm-up, then a decay to a tenth
/// ([`SizedDefaults::lr_schedule_for`] shortens the warm-up of a short run).
const SIZED_WARMUP_COSINE: LrSchedule = LrSchedule::WarmupCosine {
    warmup_steps: 500,
    final_fraction: 0.1,
};

/// Largest grid side that gets the 512-wide MLP; larger grids get 256. At 128×128 that
/// run stays under ten minutes on a 2-core laptop. At 256×256 photos regrow far better
/// with 512 than with 256 (scikit-image's astronaut, not tuned on: 30.3 against 27.4 dB;
/// the cat: 37.2 against 34.7 dB) for 1.6× the time, about half an hour, in under
/// 200 MB on ndarray. Beyond 256 a side the run's time, not the picture, decides.
pub const WIDE_MLP_MAX_SIDE: usize = 256;

/// Largest grid side that trains for 18,000 sized steps; larger grids, up to
/// [`WIDE_MLP_MAX_SIDE`], train for 30,000 ([`SizedDefaults::for_grid`]). With the moving
/// average of the weights, 30,000 steps regrew all three 256×256 photos better than 18,000
/// (the astronaut, the busiest: 30.2 against 29.4 dB, its score still rising at 18,000)
/// for 1.7 times the time, about 22 minutes on a 2-core laptop (docs/sizing.md).
pub const MEDIUM_GRID_MAX_SIDE: usize = 128;

impl SizedDefaults {
    /// The settings for a `height × width` grid.
    ///
    /// Up to [`SMALL_GRID_SIDE`] cells a side: the defaults of [`ModelConfig`] and
    /// [`TrainingConfig`], except that up to [`DECAYED_RATE_MAX_SIDE`] the learning rate
    /// warms up for 500 steps and then decays to a tenth (a cosine). Larger: one octave
    /// per doubling of the side, so the finest position feature has a period of about
    /// two cells (`ceil(log2(side))`, at least the default 6); an MLP 512 wide up to
    /// [`WIDE_MLP_MAX_SIDE`], 256 wide beyond (busy photos at 128×128 regrow below 35 dB
    /// with 256 and 384, at 256×256 below 30 dB with 256); 18,000 steps up to
    /// [`MEDIUM_GRID_MAX_SIDE`], 30,000 beyond it up to [`WIDE_MLP_MAX_SIDE`] (18,000 again
    /// for the narrower MLP beyond, to bound the time); a 500-step warm-up with a cosine decay to a tenth of the rate, without which the regrowth
    /// collapsed late in the run; and the original spike rule plus a reset to fresh
    /// noise every [`LARGE_GRID_RESET_EVERY`] steps: on busy photos the loss stays above
    /// ε for thousands of steps, no spike fires, and cells that fresh noise starts in an
    /// untrained state stay stuck at saturated colours. Every size scores and saves a
    /// moving average of the weights over about 200 steps ([`SIZED_EMA_DECAY`]).
    ///
    /// ```
    /// use nca_api::{LrSchedule, SizedDefaults};
    /// let d = SizedDefaults::for_grid(128, 128);
    /// assert_eq!((d.position_octaves, d.mlp_hidden, d.steps), (Some(7), Some(512), 18_000));
    /// let large = SizedDefaults::for_grid(256, 256);
    /// assert_eq!((large.mlp_hidden, large.steps), (Some(512), 30_000));
    /// assert_eq!(SizedDefaults::for_grid(512, 512).mlp_hidden, Some(256));
    /// assert_eq!(d.spike.reset_every, Some(500));
    /// let small = SizedDefaults::for_grid(32, 32);
    /// assert_eq!(small.lr_schedule, d.lr_schedule);
    /// assert_eq!((small.mlp_hidden, small.steps), (Some(128), 10_000));
    /// assert_eq!(small.spike.reset_every, None);
    /// assert_eq!((small.ema_decay, d.ema_decay), (Some(0.995), Some(0.995)));
    /// assert_eq!(SizedDefaults::for_grid(64, 64).lr_schedule, LrSchedule::Constant);
    /// ```
    pub fn for_grid(height: usize, width: usize) -> Self {
        let model = ModelConfig::default();
        let training = TrainingConfig::default();
        let side = height.max(width);
        if side <= SMALL_GRID_SIDE {
            return Self {
                position_octaves: model.position_octaves,
                mlp_hidden: model.mlp_hidden,
                steps: training.steps,
                learning_rate: training.learning_rate,
                lr_schedule: if side <= DECAYED_RATE_MAX_SIDE {
                    SIZED_WARMUP_COSINE
                } else {
                    training.lr_schedule
                },
                spike: training.spike,
                ema_decay: Some(SIZED_EMA_DECAY),
            };
        }
        // ceil(log2(side)) without floats; side > 64 here, so at least 7.
        let octaves = usize::BITS - (side - 1).leading_zeros();
        Self {
            position_octaves: Some(octaves.clamp(6, MAX_POSITION_OCTAVES)),
            mlp_hidden: Some(if side <= WIDE_MLP_MAX_SIDE { 512 } else { 256 }),
            steps: if side <= MEDIUM_GRID_MAX_SIDE || side > WIDE_MLP_MAX_SIDE {
                18_000
            } else {
                30_000
            },
            learning_rate: training.learning_rate,
            lr_schedule: SIZED_WARMUP_COSINE,
            spike: SpikeRule {
                reset_every: Some(LARGE_GRID_RESET_EVERY),
                ..training.spike
            },
            ema_decay: Some(SIZED_EMA_DECAY),
        }
    }

    /// The sized learning-rate schedule for a run of `steps` steps: a warm-up takes at
    /// most a tenth of the run, so that a short run (a quick try, a test) still spends
    /// most of its steps near the full rate; runs of 5,000 steps or more keep the 500.
    ///
    /// ```
    /// use nca_api::{LrSchedule, SizedDefaults};
    /// let d = SizedDefaults::for_grid(32, 32);
    /// let warmup = |s: LrSchedule| match s {
    ///     LrSchedule::WarmupCosine { warmup_steps, .. } => warmup_steps,
    ///     LrSchedule::Constant => u64::MAX,
    /// };
    /// assert_eq!(warmup(d.lr_schedule_for(10_000)), 500);
    /// assert_eq!(warmup(d.lr_schedule_for(60)), 6);
    /// let middle = SizedDefaults::for_grid(64, 64);
    /// assert_eq!(middle.lr_schedule_for(60), LrSchedule::Constant);
    /// ```
    pub fn lr_schedule_for(&self, steps: u64) -> LrSchedule {
        match self.lr_schedule {
            LrSchedule::WarmupCosine {
                warmup_steps,
                final_fraction,
            } => LrSchedule::WarmupCosine {
                warmup_steps: warmup_steps.min(steps / 10),
                final_fraction,
            },
            LrSchedule::Constant => LrSchedule::Constant,
        }
    }

    /// The sized moving average for a run of `steps` steps: over about 200 steps
    /// ([`SIZED_EMA_DECAY`]), but at most a twentieth of the run, so that by its end the
    /// average holds no weights from early in the run, when they still moved fast (a
    /// 60-step try of a setting averages over 3 steps); `None` under 20 steps, and where
    /// the rule chose none.
    ///
    /// ```
    /// use nca_api::SizedDefaults;
    /// let d = SizedDefaults::for_grid(32, 32);
    /// assert_eq!(d.ema_decay_for(10_000), Some(0.995));
    /// assert_eq!(d.ema_decay_for(1_000), Some(0.98));
    /// assert_eq!(d.ema_decay_for(60), Some(1.0 - 1.0 / 3.0));
    /// assert_eq!(d.ema_decay_for(19), None);
    /// ```
    pub fn ema_decay_for(&self, steps: u64) -> Option<f32> {
        let decay = self.ema_decay?;
        // The average's span: about 1 / (1 − decay) steps.
        let span = (1.0 / (1.0 - f64::from(decay))).round() as u64;
        let fitted = span.min(steps / 20);
        match fitted {
            0 => None,
            _ if fitted == span => Some(decay),
            _ => Some(1.0 - 1.0 / fitted as f32),
        }
    }

    /// How often a sized run of `steps` steps scores its regrowth (a run file's
    /// `evaluation.every`): ten times in a run of 1,000 steps or more, at a multiple of 100
    /// steps, so the best weights can be kept; a shorter run is scored only at its end,
    /// where ten scores (each about a hundred training steps' work) would dominate it.
    ///
    /// Kept weights matter where the rate stays constant (33–64 cells a side): the
    /// regrowth score still moves by a dB or more between evaluations there.
    ///
    /// ```
    /// use nca_api::SizedDefaults;
    /// assert_eq!(SizedDefaults::evaluate_every_for(10_000), Some(1_000));
    /// assert_eq!(SizedDefaults::evaluate_every_for(18_000), Some(1_800));
    /// assert_eq!(SizedDefaults::evaluate_every_for(2_345), Some(200));
    /// assert_eq!(SizedDefaults::evaluate_every_for(999), None);
    /// ```
    pub fn evaluate_every_for(steps: u64) -> Option<u64> {
        (steps >= SIZED_EVALUATIONS * 100).then(|| steps / SIZED_EVALUATIONS / 100 * 100)
    }
}

/// Scores in a sized run ([`SizedDefaults::evaluate_every_for`]).
const SIZED_EVALUATIONS: u64 = 10;

impl TrainingConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.steps == 0 {
            return Err(ConfigError {
                field: "training.steps".into(),
                message: "expected at least 1 step, found 0".into(),
            });
        }
        strictly_positive("training.learning_rate", self.learning_rate)?;
        if let Some(clip) = self.grad_clip {
            strictly_positive("training.grad_clip", clip)?;
        }
        if self.max_spikes == Some(0) {
            return Err(ConfigError {
                field: "training.max_spikes".into(),
                message: "expected at least 1 or None, found 0".into(),
            });
        }
        if let Some(psnr) = self.stop_at_psnr {
            strictly_positive("training.stop_at_psnr", psnr)?;
        }
        if let Some(decay) = self.ema_decay {
            if !(0.0..1.0).contains(&decay) {
                return Err(ConfigError {
                    field: "training.ema_decay".into(),
                    message: format!(
                        "expected a decay per step in [0, 1) (e.g. 0.99) or None, found {decay}"
                    ),
                });
            }
        }
        self.lr_schedule.validate()?;
        self.spike.validate()
    }

    /// The Adam settings implied by this config (PyTorch defaults besides lr and clipping).
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig {
            learning_rate: self.learning_rate,
            grad_clip: self.grad_clip,
            ..OptimizerConfig::default()
        }
    }
}

/// Adam hyper-parameters handed to a backend's trainer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimizerConfig {
    /// Step size.
    pub learning_rate: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
    /// Clip the global gradient norm to this value before the update.
    pub grad_clip: Option<f32>,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            learning_rate: DEFAULT_LEARNING_RATE,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: None,
        }
    }
}

/// Grid, model, noise and training settings of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NcaConfig {
    /// Grid size.
    pub grid: GridConfig,
    /// Transition shape.
    pub model: ModelConfig,
    /// Noise and spike threshold.
    pub noise: NoiseConfig,
    /// Optimiser and loop.
    pub training: TrainingConfig,
}

impl NcaConfig {
    /// Checks every section; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        positive("grid.height", self.grid.height)?;
        positive("grid.width", self.grid.width)?;
        positive("grid.batch", self.grid.batch)?;
        self.model.validate()?;
        self.check_element_counts()?;
        self.noise.validate()?;
        self.training.validate()
    }

    /// Refuses grids whose tensors' element counts `B·C·H·W` (and `B·(C+P)·H·W` for the
    /// cells' inputs) overflow usize or exceed the largest buffer Rust can allocate, so
    /// that everything computing them afterwards may multiply plainly. The error names the
    /// field whose factor overflowed first.
    fn check_element_counts(&self) -> Result<(), ConfigError> {
        let (h, w, b) = (self.grid.height, self.grid.width, self.grid.batch);
        let channels_field = if self.model.hidden_channels > 0 {
            "model.hidden_channels"
        } else {
            "model.visible_channels"
        };
        let too_many = |field: &str| ConfigError {
            field: field.into(),
            message: format!(
                "a [{b}, {}, {h}, {w}] state has more elements than fit in memory \
                 (more than {MAX_BUFFER_BYTES} bytes)",
                self.model.channels()
            ),
        };
        let fits = |n: usize| {
            (n as u64)
                .checked_mul(4)
                .is_some_and(|x| x <= MAX_BUFFER_BYTES)
        };
        let plane = h
            .checked_mul(w)
            .filter(|&n| fits(n))
            .ok_or_else(|| too_many("grid.width"))?;
        let cells = plane
            .checked_mul(b)
            .filter(|&n| fits(n))
            .ok_or_else(|| too_many("grid.batch"))?;
        cells
            .checked_mul(self.model.input_width())
            .filter(|&n| fits(n))
            .ok_or_else(|| too_many(channels_field))?;
        Ok(())
    }

    /// Shape `[B, C, H, W]` of the state.
    pub fn state_shape(&self) -> [usize; 4] {
        [
            self.grid.batch,
            self.model.channels(),
            self.grid.height,
            self.grid.width,
        ]
    }

    /// Shape `[B, V, H, W]` of the target.
    pub fn target_shape(&self) -> [usize; 4] {
        [
            self.grid.batch,
            self.model.visible_channels,
            self.grid.height,
            self.grid.width,
        ]
    }
}

fn check_grid(what: &str, shape: &[usize], channels: usize) -> Result<[usize; 4], TensorError> {
    let [b, c, h, w] = match *shape {
        [b, c, h, w] => [b, c, h, w],
        _ => {
            return Err(TensorError::WrongRank {
                what: what.into(),
                expected: 4,
                found: shape.to_vec(),
            })
        }
    };
    if c != channels || b == 0 || h == 0 || w == 0 {
        return Err(TensorError::WrongShape {
            what: format!("{what} [B, C, H, W] (B, H, W must be non-zero)"),
            expected: vec![b.max(1), channels, h.max(1), w.max(1)],
            found: shape.to_vec(),
        });
    }
    Ok([b, c, h, w])
}

fn positive(field: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError {
            field: field.into(),
            message: "expected a value >= 1, found 0".into(),
        })
    } else {
        Ok(())
    }
}

fn strictly_positive(field: &str, value: f32) -> Result<(), ConfigError> {
    if value.is_finite() && value > 0.0 {
        Ok(())
    } else {
        Err(ConfigError {
            field: field.into(),
            message: format!("expected a finite value > 0, found {value}"),
        })
    }
}

fn non_negative(field: &str, value: f32) -> Result<(), ConfigError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(ConfigError {
            field: field.into(),
            message: format!("expected a finite value >= 0, found {value}"),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_follow_the_design_doc() {
        let cfg = NcaConfig::default();
        cfg.validate().expect("defaults validate");
        assert_eq!(cfg.noise.sigma_small, 0.01);
        assert_eq!(cfg.noise.sigma_large, 0.1);
        assert_eq!(cfg.noise.epsilon, 0.001);
        assert_eq!(cfg.training.steps, 10_000);
        assert_eq!(cfg.model.attention_dim, 16);
        assert!(cfg.model.position_embeddings);
        assert_eq!(cfg.model.position_octaves, Some(6));
        assert_eq!(cfg.model.mlp_hidden, Some(128));
        assert_eq!(cfg.training.grad_clip, Some(1.0));
    }

    #[test]
    fn model_options_are_validated_by_field() {
        let mut cfg = NcaConfig::default();
        cfg.model.position_octaves = Some(17);
        assert_eq!(cfg.validate().unwrap_err().field, "model.position_octaves");
        let mut cfg = NcaConfig::default();
        cfg.model.mlp_hidden = Some(0);
        assert_eq!(cfg.validate().unwrap_err().field, "model.mlp_hidden");
        let mut cfg = NcaConfig::default();
        cfg.model.hidden_channels = usize::MAX;
        assert_eq!(cfg.validate().unwrap_err().field, "model.hidden_channels");
        let mut cfg = NcaConfig::default();
        cfg.model.position_octaves = Some(16);
        cfg.model.mlp_hidden = None;
        cfg.validate().expect("16 octaves and no MLP are fine");
    }

    #[test]
    fn element_counts_that_overflow_name_their_field() {
        let with = |f: &dyn Fn(&mut NcaConfig)| {
            let mut cfg = NcaConfig::default();
            f(&mut cfg);
            cfg.validate().map_err(|e| e.field)
        };
        assert_eq!(
            with(&|c| c.model.hidden_channels = 18446744073709551615),
            Err("model.hidden_channels".into())
        );
        assert_eq!(
            with(&|c| c.model.hidden_channels = 1 << 60),
            Err("model.hidden_channels".into())
        );
        assert_eq!(
            with(&|c| c.grid.batch = 18446744073709551615),
            Err("grid.batch".into())
        );
        assert_eq!(
            with(&|c| {
                c.grid.height = 4294967296;
                c.grid.width = 4294967296;
            }),
            Err("grid.width".into())
        );
        assert_eq!(
            with(&|c| c.model.attention_dim = 1 << 62),
            Err("model.attention_dim".into())
        );
        // Large but representable: validation passes; the memory limit is a separate check.
        assert_eq!(
            with(&|c| {
                c.grid.height = 100_000;
                c.grid.width = 100_000;
            }),
            Ok(())
        );
    }

    #[test]
    fn differences_name_the_fields() {
        let a = ModelConfig::default();
        let b = ModelConfig::plain();
        assert_eq!(
            a.differences(&b),
            vec![
                "model.position_octaves: Some(6) vs None".to_string(),
                "model.mlp_hidden: Some(128) vs None".to_string()
            ]
        );
        assert!(a.differences(&a).is_empty());
    }

    #[test]
    fn state_and_target_shapes_are_checked() {
        let m = ModelConfig {
            hidden_channels: 2,
            ..ModelConfig::default()
        };
        assert_eq!(m.check_state(&[2, 5, 4, 3]), Ok([2, 5, 4, 3]));
        assert_eq!(m.check_target(&[2, 3, 4, 3]), Ok([2, 3, 4, 3]));
        assert!(m.check_state(&[2, 3, 4, 3]).is_err());
        assert!(m.check_state(&[2, 5, 0, 3]).is_err());
        assert!(m.check_target(&[3, 4, 3]).is_err());
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut cfg = NcaConfig::default();
        cfg.noise.sigma_small = -1.0;
        assert_eq!(cfg.validate().unwrap_err().field, "noise.sigma_small");
        let mut cfg = NcaConfig::default();
        cfg.noise.epsilon = 0.0;
        assert_eq!(cfg.validate().unwrap_err().field, "noise.epsilon");
        let mut cfg = NcaConfig::default();
        cfg.training.learning_rate = 0.0;
        assert_eq!(cfg.validate().unwrap_err().field, "training.learning_rate");
        let mut cfg = NcaConfig::default();
        cfg.training.steps = 0;
        assert_eq!(cfg.validate().unwrap_err().field, "training.steps");
        for decay in [1.0, -0.1, f32::NAN] {
            let mut cfg = NcaConfig::default();
            cfg.training.ema_decay = Some(decay);
            assert_eq!(cfg.validate().unwrap_err().field, "training.ema_decay");
        }
        let mut cfg = NcaConfig::default();
        cfg.training.ema_decay = Some(0.0);
        assert!(
            cfg.validate().is_ok(),
            "0: the average is the latest weights"
        );
        let mut cfg = NcaConfig::default();
        cfg.grid.width = 0;
        assert_eq!(cfg.validate().unwrap_err().field, "grid.width");
    }

    #[test]
    fn param_names_round_trip_and_unknown_names_are_named() {
        for param in Param::ALL {
            assert_eq!(param.name().parse::<Param>(), Ok(param));
            assert_eq!(param.to_string(), param.name());
        }
        let err = "wqq".parse::<Param>().unwrap_err();
        assert!(
            matches!(&err, TensorError::Unexpected(m) if m.starts_with("wqq ")),
            "{err}"
        );
        assert!(err.to_string().contains("wq, bq, wk"), "{err}");
        assert!("WQ".parse::<Param>().is_err());
    }

    #[test]
    fn param_presence_and_shapes_follow_the_options() {
        let bare = ModelConfig {
            position_embeddings: false,
            ..ModelConfig::plain()
        };
        let full = ModelConfig {
            hidden_channels: 2,
            attention_dim: 4,
            position_octaves: Some(1),
            mlp_hidden: Some(7),
            ..ModelConfig::default()
        };
        for param in Param::ALL {
            assert_eq!(param.is_in(&bare), param.option().is_none(), "{param}");
            assert!(param.is_in(&full), "{param}");
            assert_eq!(param.shape(&bare).is_some(), param.is_in(&bare), "{param}");
        }
        assert_eq!(Param::Pk.option(), Some("model.position_embeddings"));
        assert_eq!(Param::B1.option(), Some("model.mlp_hidden"));
        // C = 5, D = 4, X = C + P = 5 + 6, M = 7.
        let shape = |p: Param| p.shape(&full).unwrap();
        assert_eq!(shape(Param::Wv), vec![4, 11]);
        assert_eq!(shape(Param::Bk), vec![4]);
        assert_eq!(shape(Param::Wo), vec![5, 7]);
        assert_eq!(shape(Param::Bo), vec![5]);
        assert_eq!(shape(Param::Pv), vec![NEIGHBOURS, 4]);
        assert_eq!(shape(Param::W1), vec![7, 15]);
        assert_eq!(shape(Param::B1), vec![7]);
        assert_eq!(Param::Wo.shape(&bare), Some(vec![3, 16]));
        assert_eq!(
            full.parameter_count(),
            Some(3 * (44 + 4) + 35 + 5 + 2 * 36 + 105 + 7)
        );
        let bound = |p: Param| match p.init(&full) {
            Init::Uniform { bound } => bound,
            Init::Zero => 0.0,
        };
        assert_eq!(bound(Param::Wq), 1.0 / 11f32.sqrt());
        assert_eq!(bound(Param::Pk), 0.5);
        assert_eq!(bound(Param::B1), 1.0 / 15f32.sqrt());
        assert_eq!(Param::Wo.init(&full), Init::Zero);
    }
}
