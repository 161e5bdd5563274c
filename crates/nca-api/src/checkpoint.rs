//! Checkpoints: weights under the golden-vector tensor names, plus what resuming needs.

use std::path::Path;

use crate::config::NcaConfig;
use crate::error::IoError;
use crate::io::{read_regular_file, TensorFile};
use crate::memory::{training_bytes, MemoryLimit};
use crate::tensor::HostTensor;
use crate::train::Progress;
use crate::traits::AdamState;
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

/// Everything needed to roll out a trained rule or resume its training.
///
/// On disk it is one safetensors file: the weights under `wq`, `bq`, … (loadable with
/// `safetensors.torch.load_file` or `safetensors.numpy.load_file`), Adam's moments under
/// `adam.m.NAME` / `adam.v.NAME`, the carried state under `state`, and the config and
/// progress as JSON in the metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The config the weights were trained with.
    pub config: NcaConfig,
    /// The transition's parameters.
    pub weights: Weights,
    /// Optimiser state, for resuming.
    pub adam: Option<AdamState>,
    /// Steps and spikes so far.
    pub progress: Progress,
    /// The carried `[B, C, H, W]` state, for resuming the same trajectory.
    pub state: Option<HostTensor>,
    /// The backend that wrote it (informational).
    pub backend: String,
}

impl Checkpoint {
    /// The checkpoint as a tensor file.
    pub fn to_file(&self) -> TensorFile {
        let mut file = TensorFile::default();
        for (name, t) in self.weights.named() {
            file.tensors.insert(name.to_string(), t.clone());
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
        let ckpt = Self {
            config,
            weights,
            adam,
            progress,
            state,
            backend,
        };
        Ok((ckpt, file))
    }

    /// The name of the first tensor holding NaN or infinity: a weight (`wq`, …), an Adam
    /// moment (`adam.m.wq`, `adam.v.wq`, …) or `state`; `None` when all are finite.
    pub fn first_non_finite(&self) -> Option<String> {
        if let Some(param) = self.weights.first_non_finite() {
            return Some(param.name().to_string());
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
            adam: Some(adam),
            progress: Progress {
                step: 12,
                spikes: 2,
                first_below_epsilon: Some(9),
            },
            state: Some(HostTensor::filled(&config.state_shape(), 0.25)),
            backend: "test".into(),
            config,
        };
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
            adam: Some(adam),
            progress: Progress {
                step: 7,
                ..Progress::default()
            },
            state: Some(HostTensor::filled(&config.state_shape(), 0.5)),
            backend: "test".into(),
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
