//! Checkpoints: weights under the golden-vector tensor names, plus what resuming needs.

use std::path::Path;

use crate::config::NcaConfig;
use crate::error::IoError;
use crate::io::TensorFile;
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

    /// Reads a checkpoint written by [`Checkpoint::save`]; every shape is checked against
    /// the config stored inside it.
    pub fn load(path: &Path) -> Result<Self, IoError> {
        let mut file = TensorFile::read(path)?;
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
            .map_err(|e| format(format!("stored config: {e}")))?;
        let progress = match file.metadata.get(META_PROGRESS) {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| format(format!("metadata `{META_PROGRESS}`: {e}")))?,
            None => Progress::default(),
        };
        let model = &config.model;
        let weights = Weights::from_lookup(model, |n| file.tensors.get(n).cloned())
            .map_err(|e| format(format!("weights: {e}")))?;
        let adam = match file.metadata.get(META_ADAM_STEP) {
            Some(step) => {
                let step = step
                    .parse()
                    .map_err(|e| format(format!("metadata `{META_ADAM_STEP}`: {e}")))?;
                let m = Weights::from_lookup(model, |n| {
                    file.tensors.get(&format!("adam.m.{n}")).cloned()
                })
                .map_err(|e| format(format!("adam.m: {e}")))?;
                let v = Weights::from_lookup(model, |n| {
                    file.tensors.get(&format!("adam.v.{n}")).cloned()
                })
                .map_err(|e| format(format!("adam.v: {e}")))?;
                Some(AdamState { step, m, v })
            }
            None => None,
        };
        let state = file.tensors.remove(STATE_TENSOR);
        if let Some(s) = &state {
            let [_, c, h, w] = s.dims4(STATE_TENSOR).map_err(|e| format(e.to_string()))?;
            if c != model.channels() || h != config.grid.height || w != config.grid.width {
                return Err(format(format!(
                    "tensor `state` has shape {:?}, the stored config implies [B, {}, {}, {}]",
                    s.shape(),
                    model.channels(),
                    config.grid.height,
                    config.grid.width
                )));
            }
        }
        Ok(Self {
            config,
            weights,
            adam,
            progress,
            state,
            backend: file.metadata.get(META_BACKEND).cloned().unwrap_or_default(),
        })
    }
}

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

    #[test]
    fn round_trips_and_is_atomic() {
        let dir = std::env::temp_dir().join(format!("nca-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let config = NcaConfig::default();
        let mut adam = AdamState::new(&config.model);
        adam.step = 12;
        if let Some(wq) = adam.m.get_mut("wq") {
            wq.data_mut()[0] = 0.5;
        }
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
