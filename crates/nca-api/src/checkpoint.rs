//! Checkpoints: weights under the golden-vector tensor names, plus what resuming needs.

use std::path::Path;

use crate::config::{NcaConfig, Param};
use crate::error::IoError;
use crate::io::{read_regular_file, TensorFile};
use crate::memory::{training_bytes, MemoryLimit};
use crate::tensor::HostTensor;
use crate::train::Progress;
use crate::traits::{AdamState, Trainer};
use crate::weights::Weights;

/// Metadata key holding the run's [`NcaConfig`] as JSON.
pub const META_CONFIG: &str = "nca.config";
/// Metadata key holding the [`Progress`] as JSON.
pub const META_PROGRESS: &str = "nca.progress";
/// Metadata key naming the backend that wrote the checkpoint.
pub const META_BACKEND: &str = "nca.backend";
/// Metadata key holding Adam's step count.
pub const META_ADAM_STEP: &str = "adam.step";
/// Tensor name of the carried state.
pub const STATE_TENSOR: &str = "state";
/// Tensor name of the `[B, V, H, W]` target the rule was trained towards.
pub const TARGET_TENSOR: &str = "target";
/// Prefix of the tensors holding the weights training continues from, when the
/// checkpoint's weights are their moving average ([`Checkpoint::training_weights`]).
pub const TRAINING_PREFIX: &str = "train.";
/// Metadata key holding the run file (RON) the run was started with, resolved; the name
/// is the one the first checkpoints used, so those still read.
pub const META_RUN_FILE: &str = "nca_cli.run_config";

/// Everything needed to roll out a trained rule or resume its training.
///
/// On disk it is one safetensors file: the weights under `wq`, `bq`, … (loadable with
/// `safetensors.torch.load_file` or `safetensors.numpy.load_file`), the weights training
/// continues from under `train.NAME` when those are the weights' moving average
/// (`training.ema_decay`), Adam's moments under
/// `adam.m.NAME` / `adam.v.NAME`, the carried state under `state`, the target under
/// `target`, the config and progress as JSON and the run file as RON in the metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The config the weights were trained with.
    pub config: NcaConfig,
    /// The transition's parameters: the rule to roll out (the moving average of the
    /// weights when the run keeps one).
    pub weights: Weights,
    /// With `training.ema_decay`, the latest weights, which training resumes from (Adam's
    /// moments are theirs) while `weights` holds their average; `None`: training resumes
    /// from `weights`.
    pub training_weights: Option<Weights>,
    /// Optimiser state, for resuming.
    pub adam: Option<AdamState>,
    /// Steps and spikes so far.
    pub progress: Progress,
    /// The carried `[B, C, H, W]` state, for resuming the same trajectory.
    pub state: Option<HostTensor>,
    /// The backend that wrote it (informational).
    pub backend: String,
    /// The `[B, V, H, W]` target the rule was trained towards, so that a rollout can show
    /// and score against it.
    pub target: Option<HostTensor>,
    /// The run file (RON) the run was started with, with image paths made absolute and
    /// the values chosen for the grid written out, so that the run can be repeated.
    pub run_file: Option<String>,
}

impl Checkpoint {
    /// The checkpoint as a tensor file.
    pub fn to_file(&self) -> TensorFile {
        let mut file = TensorFile::default();
        for (name, t) in self.weights.named() {
            file.tensors.insert(name.to_string(), t.clone());
        }
        if let Some(training) = &self.training_weights {
            for (name, t) in training.named() {
                file.tensors
                    .insert(format!("{TRAINING_PREFIX}{name}"), t.clone());
            }
        }
        if let Some(adam) = &self.adam {
            for (prefix, w) in [("adam.m.", &adam.m), ("adam.v.", &adam.v)] {
                for (name, t) in w.named() {
                    file.tensors.insert(format!("{prefix}{name}"), t.clone());
                }
            }
            file.metadata
                .insert(META_ADAM_STEP.into(), adam.step.to_string());
        }
        if let Some(state) = &self.state {
            file.tensors.insert(STATE_TENSOR.into(), state.clone());
        }
        if let Some(target) = &self.target {
            file.tensors.insert(TARGET_TENSOR.into(), target.clone());
        }
        if let Some(run_file) = &self.run_file {
            file.metadata.insert(META_RUN_FILE.into(), run_file.clone());
        }
        let m = &self.config.model;
        let meta = [
            (
                META_CONFIG,
                serde_json::to_string(&self.config).unwrap_or_default(),
            ),
            (
                META_PROGRESS,
                serde_json::to_string(&self.progress).unwrap_or_default(),
            ),
            (META_BACKEND, self.backend.clone()),
            ("C", m.channels().to_string()),
            ("D", m.attention_dim.to_string()),
            ("visible_channels", m.visible_channels.to_string()),
            ("position_embeddings", m.position_embeddings.to_string()),
            (
                "position_octaves",
                m.position_octaves
                    .map_or_else(|| "none".to_string(), |l| l.to_string()),
            ),
            ("mlp_hidden", m.mlp_hidden.unwrap_or(0).to_string()),
        ];
        for (k, v) in meta {
            file.metadata.insert(k.into(), v);
        }
        file
    }

    /// Writes the checkpoint atomically (temporary file, then rename).
    pub fn save(&self, path: &Path) -> Result<(), IoError> {
        self.to_file().write(path)
    }

    /// Reads a checkpoint within the memory limit of the environment
    /// ([`MemoryLimit::from_env`]); see [`Checkpoint::load_limited`].
    pub fn load(path: &Path) -> Result<Self, IoError> {
        let limit = MemoryLimit::from_env().map_err(|source| IoError::Memory {
            path: path.to_path_buf(),
            source,
        })?;
        Self::load_limited(path, &limit)
    }

    /// Reads a checkpoint written by [`Checkpoint::save`] from a regular file no larger
    /// than `limit` allows; see [`Checkpoint::from_bytes`] for what is checked.
    pub fn load_limited(path: &Path, limit: &MemoryLimit) -> Result<Self, IoError> {
        let bytes = read_regular_file(path, limit)?;
        Self::from_bytes(&bytes, path, limit)
    }

    /// Parses checkpoint bytes (`path` only names the file in errors).
    ///
    /// Every shape is checked against the config stored inside, and that config must be
    /// valid and trainable within `limit` ([`training_bytes`]); Adam's step count must be
    /// plausible (at most [`ADAM_STEP_MARGIN`] more than the recorded training steps) and
    /// the state's batch must be the config's `grid.batch`. Non-finite values are not
    /// refused here: [`Checkpoint::first_non_finite`] names them for callers to decide.
    pub fn from_bytes(bytes: &[u8], path: &Path, limit: &MemoryLimit) -> Result<Self, IoError> {
        let file =
            TensorFile::from_bytes_limited(bytes, limit).map_err(|message| IoError::Format {
                path: path.to_path_buf(),
                message,
            })?;
        Self::from_file(file, path, limit).map(|(ckpt, _rest)| ckpt)
    }

    /// The checkpoint in an already parsed `file`, checked as [`Checkpoint::from_bytes`]
    /// says, and the rest of the file: the tensors the checkpoint does not use and all
    /// metadata, for callers that keep more in the same file (so it is read only once).
    pub fn from_file(
        mut file: TensorFile,
        path: &Path,
        limit: &MemoryLimit,
    ) -> Result<(Self, TensorFile), IoError> {
        let format = |message: String| IoError::Format {
            path: path.to_path_buf(),
            message,
        };
        let config_json = file.metadata.get(META_CONFIG).ok_or_else(|| {
            format(format!(
                "no `{META_CONFIG}` metadata: not an nca checkpoint (weights-only files can \
                 be read with TensorFile and Weights::from_lookup)"
            ))
        })?;
        let config = parse_config(config_json)
            .map_err(|e| format(format!("metadata `{META_CONFIG}`: {e}")))?;
        config
            .validate()
            .map_err(|e| format(format!("stored config (metadata `{META_CONFIG}`): {e}")))?;
        let grid = &config.grid;
        limit
            .check(
                &format!(
                    "training the config stored in metadata `{META_CONFIG}` (grid {}x{}, \
                     batch {})",
                    grid.height, grid.width, grid.batch
                ),
                training_bytes(&config),
                "the checkpoint claims a grid larger than this machine can hold",
            )
            .map_err(|source| IoError::Memory {
                path: path.to_path_buf(),
                source,
            })?;
        let progress: Progress = match file.metadata.get(META_PROGRESS) {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| format(format!("metadata `{META_PROGRESS}`: {e}")))?,
            None => Progress::default(),
        };
        let model = &config.model;
        let weights = Weights::from_lookup(model, |p| file.tensors.remove(p.name()))
            .map_err(|e| format(format!("weights: {e}")))?;
        let prefixed = format!("{TRAINING_PREFIX}{}", Param::Wq.name());
        let training_weights = if file.tensors.contains_key(&prefixed) {
            let lookup = |p: Param| file.tensors.remove(&format!("{TRAINING_PREFIX}{p}"));
            let training = Weights::from_lookup(model, lookup)
                .map_err(|e| format(format!("{TRAINING_PREFIX}*: {e}")))?;
            Some(training)
        } else {
            None
        };
        let adam = match file.metadata.get(META_ADAM_STEP) {
            Some(step) => {
                let step: u64 = step.parse().map_err(|e| {
                    format(format!(
                        "metadata `{META_ADAM_STEP}`: expected an update count, found {step:?} ({e})"
                    ))
                })?;
                let most = progress.step.saturating_add(ADAM_STEP_MARGIN);
                if step > most {
                    return Err(format(format!(
                        "metadata `{META_ADAM_STEP}`: {step} Adam updates is implausible after \
                         {} training steps (metadata `{META_PROGRESS}`); expected at most {most}",
                        progress.step
                    )));
                }
                let m =
                    Weights::from_lookup(model, |p| file.tensors.remove(&format!("adam.m.{p}")))
                        .map_err(|e| format(format!("adam.m: {e}")))?;
                let v =
                    Weights::from_lookup(model, |p| file.tensors.remove(&format!("adam.v.{p}")))
                        .map_err(|e| format(format!("adam.v: {e}")))?;
                Some(AdamState { step, m, v })
            }
            None => None,
        };
        let state = file.tensors.remove(STATE_TENSOR);
        if let Some(s) = &state {
            let [b, c, h, w] = s
                .dims4(STATE_TENSOR)
                .map_err(|e| format(format!("tensor `{STATE_TENSOR}`: {e}")))?;
            if b != grid.batch || c != model.channels() || h != grid.height || w != grid.width {
                return Err(format(format!(
                    "tensor `{STATE_TENSOR}` has shape {:?}, the stored config (metadata \
                     `{META_CONFIG}`) implies [{}, {}, {}, {}] (grid.batch, channels, \
                     grid.height, grid.width)",
                    s.shape(),
                    grid.batch,
                    model.channels(),
                    grid.height,
                    grid.width
                )));
            }
        }
        let backend = file.metadata.get(META_BACKEND).cloned().unwrap_or_default();
        let target = file.tensors.remove(TARGET_TENSOR);
        let run_file = file.metadata.get(META_RUN_FILE).cloned();
        let ckpt = Self {
            config,
            weights,
            training_weights,
            adam,
            progress,
            state,
            backend,
            target,
            run_file,
        };
        Ok((ckpt, file))
    }

    /// The name of the first tensor holding NaN or infinity: a weight (`wq`, …), a
    /// training weight (`train.wq`, …), an Adam moment (`adam.m.wq`, `adam.v.wq`, …) or
    /// `state`; `None` when all are finite.
    pub fn first_non_finite(&self) -> Option<String> {
        if let Some(param) = self.weights.first_non_finite() {
            return Some(param.name().to_string());
        }
        let training = self.training_weights.as_ref();
        if let Some(param) = training.and_then(Weights::first_non_finite) {
            return Some(format!("{TRAINING_PREFIX}{param}"));
        }
        if let Some(adam) = &self.adam {
            for (prefix, moments) in [("adam.m.", &adam.m), ("adam.v.", &adam.v)] {
                if let Some(name) = moments.first_non_finite() {
                    return Some(format!("{prefix}{name}"));
                }
            }
        }
        match &self.state {
            Some(state) if !state.is_finite() => Some(STATE_TENSOR.into()),
            _ => None,
        }
    }
}

/// Why a checkpoint cannot continue a run with a given config.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ResumeError {
    /// A weight, Adam moment or the state holds NaN or infinity.
    #[error(
        "tensor `{tensor}` holds NaN or infinite values, so training would diverge at once; \
         resume from an earlier checkpoint or start a new run"
    )]
    NonFinite {
        /// The first such tensor.
        tensor: String,
    },
    /// Adam claims more updates than training steps were taken.
    #[error(
        "metadata `{META_ADAM_STEP}` is {adam_step}, expected at most the checkpoint's step \
         {step} (metadata `{META_PROGRESS}`)"
    )]
    AdamAhead {
        /// Adam's update count.
        adam_step: u64,
        /// The checkpoint's training step.
        step: u64,
    },
    /// The grid or model differs: the weights do not fit the config.
    #[error("its shapes differ ({})", differences.join("; "))]
    Shapes {
        /// `field: checkpoint A, config B` for each difference.
        differences: Vec<String>,
        /// The checkpoint holds the plain model and the config asks for the picture model
        /// (a checkpoint from before those options existed).
        plain_checkpoint: bool,
    },
    /// The carried state does not have the config's `[B, C, H, W]`.
    #[error(
        "tensor `{STATE_TENSOR}` has shape {found:?}, but the config asks for [grid.batch, \
         channels, grid.height, grid.width] = {expected:?}"
    )]
    StateShape {
        /// The state's shape.
        found: Vec<usize>,
        /// What the config implies.
        expected: [usize; 4],
    },
    /// The checkpoint has already reached `training.steps`.
    #[error(
        "the checkpoint is already at step {step} and training.steps is {steps}; raise \
         training.steps to train further"
    )]
    AlreadyDone {
        /// The checkpoint's step.
        step: u64,
        /// `training.steps` of the config.
        steps: u64,
    },
}

/// Something that changes when a checkpoint continues with a config, worth telling the
/// user but not refusing.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum ResumeNote {
    /// `model.state_clamp` differs.
    ClampChanged {
        /// The checkpoint's clamp.
        from: Option<f32>,
        /// The config's clamp.
        to: Option<f32>,
    },
    /// `training.seed` differs: noise from the next step on comes from the new seed.
    Reseeded {
        /// The checkpoint's seed.
        from: u64,
        /// The config's seed.
        to: u64,
        /// The first step whose noise comes from the new seed.
        at_step: u64,
    },
    /// The checkpoint has no Adam state: the moments start at zero.
    NoAdamState,
    /// The checkpoint has no carried state: training continues from fresh noise.
    NoState,
}

impl std::fmt::Display for ResumeNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResumeNote::ClampChanged { from, to } => write!(
                f,
                "model.state_clamp changes from {from:?} to {to:?} on resume"
            ),
            ResumeNote::Reseeded { from, to, at_step } => write!(
                f,
                "re-seeding: the checkpoint was trained with seed {from}, noise from step \
                 {at_step} on is drawn from seed {to}"
            ),
            ResumeNote::NoAdamState => {
                f.write_str("checkpoint has no Adam state: moments start at 0")
            }
            ResumeNote::NoState => {
                f.write_str("checkpoint has no state: starting from fresh noise")
            }
        }
    }
}

impl Checkpoint {
    /// Checks that this checkpoint can continue a run of `cfg`, in the order a user fixes
    /// things: finite tensors, a plausible Adam step, the same grid and model (every model
    /// field that changes the weights, named), the state's shape, and steps left to run.
    /// Returns what changes without being refused (clamp, seed, missing Adam state or
    /// carried state).
    pub fn check_resume(&self, cfg: &NcaConfig) -> Result<Vec<ResumeNote>, ResumeError> {
        if let Some(tensor) = self.first_non_finite() {
            return Err(ResumeError::NonFinite { tensor });
        }
        if let Some(adam) = &self.adam {
            // Adam takes one step per training step and may start later (a checkpoint
            // without moments), never earlier: a larger count is a corrupt file, and near
            // u64::MAX it would turn the bias correction into NaN a few steps in.
            if adam.step > self.progress.step {
                return Err(ResumeError::AdamAhead {
                    adam_step: adam.step,
                    step: self.progress.step,
                });
            }
        }
        let (c, r) = (&self.config, cfg);
        let mut differences = Vec::new();
        for (field, a, b) in [
            ("grid.height", c.grid.height, r.grid.height),
            ("grid.width", c.grid.width, r.grid.width),
            ("grid.batch", c.grid.batch, r.grid.batch),
        ] {
            if a != b {
                differences.push(format!("{field}: checkpoint {a}, config {b}"));
            }
        }
        let (cm, rm) = (&c.model, &r.model);
        // One list of model fields for every check, so a new option is never forgotten.
        for d in cm.differences(rm) {
            differences.push(
                d.replacen(": ", ": checkpoint ", 1)
                    .replacen(" vs ", ", config ", 1),
            );
        }
        if !differences.is_empty() {
            let plain_checkpoint = cm.position_octaves.is_none()
                && cm.mlp_hidden.is_none()
                && (rm.position_octaves.is_some() || rm.mlp_hidden.is_some());
            return Err(ResumeError::Shapes {
                differences,
                plain_checkpoint,
            });
        }
        // After the field comparison, which names the field; this catches a state tensor
        // that disagrees with the checkpoint's own config (a batch of 4 in a batch-1 run).
        if let Some(state) = &self.state {
            let expected = cfg.state_shape();
            if state.shape() != expected {
                return Err(ResumeError::StateShape {
                    found: state.shape().to_vec(),
                    expected,
                });
            }
        }
        if self.progress.step >= cfg.training.steps {
            return Err(ResumeError::AlreadyDone {
                step: self.progress.step,
                steps: cfg.training.steps,
            });
        }
        let mut notes = Vec::new();
        if cm.state_clamp != rm.state_clamp {
            notes.push(ResumeNote::ClampChanged {
                from: cm.state_clamp,
                to: rm.state_clamp,
            });
        }
        if c.training.seed != r.training.seed {
            notes.push(ResumeNote::Reseeded {
                from: c.training.seed,
                to: r.training.seed,
                at_step: self.progress.step.saturating_add(1),
            });
        }
        if self.adam.is_none() {
            notes.push(ResumeNote::NoAdamState);
        }
        if self.state.is_none() {
            notes.push(ResumeNote::NoState);
        }
        Ok(notes)
    }

    /// Sets `trainer` up to continue this checkpoint's run of `cfg` towards `target`:
    /// weights (the training weights when stored beside an average), Adam's moments (when
    /// stored), the target, and the carried state (fresh noise from `cfg` when none is
    /// stored). Returns the uploaded state and the progress to continue from, with the
    /// stored average in [`Progress::average`]. Call [`Checkpoint::check_resume`] first.
    pub fn resume<T: Trainer>(
        &self,
        trainer: &mut T,
        cfg: &NcaConfig,
        target: &HostTensor,
    ) -> Result<(T::State, Progress), T::Error> {
        trainer.set_weights(self.training_weights.as_ref().unwrap_or(&self.weights))?;
        if let Some(adam) = &self.adam {
            trainer.set_adam_state(adam)?;
        }
        trainer.set_target(target)?;
        let state = match &self.state {
            Some(s) => trainer.upload(s)?,
            None => trainer.upload(&crate::train::initial_state(cfg))?,
        };
        let progress = Progress {
            // The average continues where it was (`weights`, beside the training weights).
            average: self.training_weights.as_ref().map(|_| self.weights.clone()),
            ..self.progress.clone()
        };
        Ok((state, progress))
    }
}

/// How many more Adam updates than recorded training steps a checkpoint may claim.
///
/// The two are equal in checkpoints this crate writes; the margin tolerates files
/// written by other tools, while a count like u64::MAX (which once turned every weight
/// into NaN) is refused.
pub const ADAM_STEP_MARGIN: u64 = 1_000_000;

/// Parses a checkpoint's stored config. Checkpoints written before the position inputs
/// and the MLP existed lack those fields; they hold the plain model, so a missing field
/// means "off" here rather than today's default.
fn parse_config(json: &str) -> Result<NcaConfig, serde_json::Error> {
    let mut value: serde_json::Value = serde_json::from_str(json)?;
    if let Some(model) = value.get_mut("model").and_then(|m| m.as_object_mut()) {
        for field in ["position_octaves", "mlp_hidden"] {
            model.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::from_value(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Param;

    #[test]
    fn round_trips_and_is_atomic() {
        let dir = std::env::temp_dir().join(format!("nca-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = NcaConfig::default();
        let mut adam = AdamState::new(&config.model);
        adam.step = 12;
        adam.m[Param::Wq].data_mut()[0] = 0.5;
        let ckpt = Checkpoint {
            weights: Weights::init(&config.model, 3),
            // An average as the weights, the training weights beside it.
            training_weights: Some(Weights::init(&config.model, 4)),
            adam: Some(adam),
            progress: Progress {
                step: 12,
                spikes: 2,
                first_below_epsilon: Some(9),
                last_spike: Some(11),
                average: None,
            },
            state: Some(HostTensor::filled(&config.state_shape(), 0.25)),
            backend: "test".into(),
            target: Some(HostTensor::filled(&config.target_shape(), 0.75)),
            run_file: Some("(target: Solid(1.0, 0.0, 0.0))".into()),
            config,
        };
        let file = ckpt.to_file();
        assert!(file.tensors.contains_key("wq") && file.tensors.contains_key("train.wq"));
        let path = dir.join("c.safetensors");
        ckpt.save(&path).expect("save");
        assert_eq!(Checkpoint::load(&path).expect("load"), ckpt);
        let leftovers = std::fs::read_dir(&dir).expect("list").count();
        assert_eq!(leftovers, 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).ok();
    }

    fn small() -> Checkpoint {
        let mut config = NcaConfig::default();
        config.grid.height = 4;
        config.grid.width = 5;
        let mut adam = AdamState::new(&config.model);
        adam.step = 7;
        Checkpoint {
            weights: Weights::init(&config.model, 1),
            training_weights: None,
            adam: Some(adam),
            progress: Progress {
                step: 7,
                ..Progress::default()
            },
            state: Some(HostTensor::filled(&config.state_shape(), 0.5)),
            backend: "test".into(),
            target: None,
            run_file: None,
            config,
        }
    }

    /// `ckpt` saved, edited as a tensor file, and loaded again under 1 GiB.
    fn load_edited(
        ckpt: &Checkpoint,
        edit: impl FnOnce(&mut TensorFile),
    ) -> Result<Checkpoint, IoError> {
        let mut file = ckpt.to_file();
        edit(&mut file);
        let bytes = file.to_bytes().expect("serialise");
        Checkpoint::from_bytes(
            &bytes,
            Path::new("edited.safetensors"),
            &MemoryLimit::new(1 << 30),
        )
    }

    #[test]
    fn a_stored_config_too_large_for_the_limit_is_refused_naming_it() {
        let ckpt = small();
        for (grid, batch) in [((100_000, 100_000), 1), ((32, 32), 1_000_000_000)] {
            let mut config = ckpt.config.clone();
            (config.grid.height, config.grid.width) = grid;
            config.grid.batch = batch;
            let err = load_edited(&ckpt, |f| {
                f.metadata.insert(
                    META_CONFIG.into(),
                    serde_json::to_string(&config).expect("json"),
                );
            })
            .expect_err("too large");
            let text = err.to_string();
            assert!(matches!(err, IoError::Memory { .. }), "{text}");
            assert!(
                text.starts_with(
                    "edited.safetensors: training the config stored in metadata `nca.config`"
                ),
                "{text}"
            );
            assert!(
                text.contains(&format!("grid {}x{}, batch {batch}", grid.0, grid.1)),
                "{text}"
            );
        }
    }

    #[test]
    fn an_implausible_adam_step_is_refused() {
        let ckpt = small();
        let err = load_edited(&ckpt, |f| {
            f.metadata
                .insert(META_ADAM_STEP.into(), u64::MAX.to_string());
        })
        .expect_err("u64::MAX updates after 7 steps");
        assert!(
            err.to_string()
                .contains("metadata `adam.step`: 18446744073709551615"),
            "{err}"
        );
        let err = load_edited(&ckpt, |f| {
            f.metadata.insert(META_ADAM_STEP.into(), "-1".into());
        })
        .expect_err("not a count");
        assert!(err.to_string().contains("metadata `adam.step`"), "{err}");
        load_edited(&ckpt, |_| {}).expect("the unedited checkpoint loads");
    }

    #[test]
    fn a_state_whose_batch_differs_from_the_grid_is_refused() {
        let ckpt = small();
        let err = load_edited(&ckpt, |f| {
            f.tensors
                .insert(STATE_TENSOR.into(), HostTensor::zeros(&[4, 3, 4, 5]));
        })
        .expect_err("batch 4 against grid.batch 1");
        assert!(
            err.to_string()
                .contains("tensor `state` has shape [4, 3, 4, 5]"),
            "{err}"
        );
        assert!(err.to_string().contains("implies [1, 3, 4, 5]"), "{err}");
    }

    #[test]
    fn the_first_non_finite_tensor_is_named() {
        let mut ckpt = small();
        assert_eq!(ckpt.first_non_finite(), None);
        if let Some(s) = &mut ckpt.state {
            s.data_mut()[3] = f32::INFINITY;
        }
        assert_eq!(ckpt.first_non_finite().as_deref(), Some("state"));
        if let Some(adam) = &mut ckpt.adam {
            adam.v[Param::Bo].data_mut()[0] = f32::INFINITY;
        }
        assert_eq!(ckpt.first_non_finite().as_deref(), Some("adam.v.bo"));
        ckpt.weights[Param::Wk].data_mut()[0] = f32::NAN;
        assert_eq!(ckpt.weights.first_non_finite(), Some(Param::Wk));
        assert_eq!(ckpt.first_non_finite().as_deref(), Some("wk"));
        // A NaN checkpoint still loads: callers decide, with the tensor named.
        let back = load_edited(&ckpt, |_| {}).expect("loads");
        assert_eq!(back.first_non_finite().as_deref(), Some("wk"));
    }

    #[test]
    fn resuming_refuses_in_the_order_a_user_fixes_things() {
        let ckpt = small();
        let mut cfg = ckpt.config.clone();
        cfg.training.steps = 100;
        assert_eq!(ckpt.check_resume(&cfg), Ok(vec![]));
        let mut other = cfg.clone();
        other.grid.width = 6;
        other.model.mlp_hidden = Some(64);
        match ckpt.check_resume(&other) {
            Err(ResumeError::Shapes { differences, .. }) => assert_eq!(
                differences,
                vec![
                    "grid.width: checkpoint 5, config 6".to_string(),
                    "model.mlp_hidden: checkpoint Some(128), config Some(64)".to_string()
                ]
            ),
            other => panic!("expected a shape refusal, got {other:?}"),
        }
        let mut done = cfg.clone();
        done.training.steps = 7;
        assert_eq!(
            ckpt.check_resume(&done),
            Err(ResumeError::AlreadyDone { step: 7, steps: 7 })
        );
        let mut ahead = ckpt.clone();
        if let Some(a) = &mut ahead.adam {
            a.step = 8;
        }
        assert!(matches!(
            ahead.check_resume(&cfg),
            Err(ResumeError::AdamAhead {
                adam_step: 8,
                step: 7
            })
        ));
        let mut nan = ckpt.clone();
        if let Some(w) = nan.weights.get_mut(Param::Bq) {
            w.data_mut()[0] = f32::NAN;
        }
        // Non-finite tensors come first, even before a shape difference.
        assert_eq!(
            nan.check_resume(&other),
            Err(ResumeError::NonFinite {
                tensor: "bq".into()
            })
        );
        let mut reseeded = cfg.clone();
        reseeded.training.seed = 5;
        reseeded.model.state_clamp = None;
        let mut bare = ckpt.clone();
        bare.adam = None;
        bare.state = None;
        assert_eq!(
            bare.check_resume(&reseeded),
            Ok(vec![
                ResumeNote::ClampChanged {
                    from: Some(3.0),
                    to: None
                },
                ResumeNote::Reseeded {
                    from: 0,
                    to: 5,
                    at_step: 8
                },
                ResumeNote::NoAdamState,
                ResumeNote::NoState,
            ])
        );
    }

    #[test]
    fn the_target_and_run_file_travel_with_the_checkpoint() {
        let mut ckpt = small();
        ckpt.target = Some(HostTensor::filled(&ckpt.config.target_shape(), 0.25));
        ckpt.run_file = Some("(target: Solid(0.0, 0.0, 1.0))".into());
        let back = load_edited(&ckpt, |_| {}).expect("loads");
        assert_eq!(back, ckpt);
    }

    #[test]
    fn a_misspelt_tensor_in_the_file_is_an_error_naming_the_tensor() {
        let ckpt = small();
        for (stored, misspelt) in [("wq", "wqq"), ("adam.m.pv", "adam.m.pvv")] {
            let err = load_edited(&ckpt, |f| {
                let t = f.tensors.remove(stored).expect("stored");
                f.tensors.insert(misspelt.into(), t);
            })
            .expect_err("a parameter is missing");
            let missing = stored.rsplit('.').next().unwrap_or(stored);
            assert!(
                err.to_string()
                    .contains(&format!("missing tensor `{missing}`")),
                "{err}"
            );
        }
    }

    #[test]
    fn a_config_without_the_new_options_is_the_plain_model() {
        let mut json: serde_json::Value =
            serde_json::to_value(NcaConfig::default()).expect("serialise");
        let model = json["model"].as_object_mut().expect("model");
        model.remove("position_octaves");
        model.remove("mlp_hidden");
        let config = parse_config(&json.to_string()).expect("parse");
        assert_eq!(config.model, crate::ModelConfig::plain());
        let config = parse_config(&serde_json::to_string(&NcaConfig::default()).expect("json"))
            .expect("parse");
        assert_eq!(config, NcaConfig::default());
    }
}
