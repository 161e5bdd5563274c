//! Defaults sized to the grid: the fields a run file (or Python `dict`) leaves out whose
//! best value depends on the picture's size take the value chosen for its grid; a field
//! written out always wins, even when it says `None`.
//!
//! Which fields were written is read from the same text a second time into `Given`,
//! whose fields only record presence; the chosen values are written into the resolved
//! `config.ron` and the checkpoint, so a run is repeated exactly from either.

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

use crate::config::RunConfig;
use crate::events::Chosen;

/// Deserialises any value and records that the field was present.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(d)?;
    Ok(true)
}

/// Which sized fields of the `model` section were written.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct GivenModel {
    #[serde(deserialize_with = "present")]
    position_octaves: bool,
    #[serde(deserialize_with = "present")]
    mlp_hidden: bool,
}

/// Which sized fields of the `training` section were written.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct GivenTraining {
    #[serde(deserialize_with = "present")]
    steps: bool,
    #[serde(deserialize_with = "present")]
    learning_rate: bool,
}

/// Which sized fields of a run file were written (everything else is ignored here).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Given {
    model: GivenModel,
    training: GivenTraining,
}

/// Values chosen for a grid of `height × width` cells.
#[derive(Clone, Debug, PartialEq)]
pub struct GridDefaults {
    /// `model.position_octaves`.
    pub position_octaves: Option<u32>,
    /// `model.mlp_hidden`.
    pub mlp_hidden: Option<usize>,
    /// `training.steps`.
    pub steps: u64,
    /// `training.learning_rate`.
    pub learning_rate: f32,
}

impl GridDefaults {
    /// The values for a `height × width` grid.
    pub fn for_grid(_height: usize, _width: usize) -> Self {
        let model = nca_api::ModelConfig::default();
        let training = nca_api::TrainingConfig::default();
        Self {
            position_octaves: model.position_octaves,
            mlp_hidden: model.mlp_hidden,
            steps: training.steps,
            learning_rate: training.learning_rate,
        }
    }
}

/// Fills the fields `given` does not list with the values for `cfg`'s grid; returns what
/// was chosen, in the order of the run file.
pub(crate) fn apply(cfg: &mut RunConfig, given: &Given) -> Vec<Chosen> {
    let d = GridDefaults::for_grid(cfg.grid.height, cfg.grid.width);
    let mut chosen = Vec::new();
    let mut choose = |field: &'static str, value: String| chosen.push(Chosen { field, value });
    if !given.model.position_octaves {
        cfg.model.position_octaves = d.position_octaves;
        choose("model.position_octaves", ron_option(d.position_octaves));
    }
    if !given.model.mlp_hidden {
        cfg.model.mlp_hidden = d.mlp_hidden;
        choose("model.mlp_hidden", ron_option(d.mlp_hidden));
    }
    if !given.training.steps {
        cfg.training.steps = d.steps;
        choose("training.steps", d.steps.to_string());
    }
    if !given.training.learning_rate {
        cfg.training.learning_rate = d.learning_rate;
        choose("training.learning_rate", format!("{:?}", d.learning_rate));
    }
    chosen
}

/// An optional value as a run file writes it.
fn ron_option<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "None".to_string(), |x| x.to_string())
}
