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
    #[serde(deserialize_with = "present")]
    lr_schedule: bool,
    #[serde(deserialize_with = "present")]
    spike: bool,
    #[serde(deserialize_with = "present")]
    ema_decay: bool,
}

/// Which sized fields of the `evaluation` section were written.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct GivenEvaluation {
    #[serde(deserialize_with = "present")]
    every: bool,
}

/// Which sized fields of a run file were written (everything else is ignored here).
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct Given {
    model: GivenModel,
    training: GivenTraining,
    evaluation: GivenEvaluation,
}

/// Values chosen for a grid of `height × width` cells: nca-api's sizing rule (see
/// [`nca_api::SizedDefaults::for_grid`]).
pub type GridDefaults = nca_api::SizedDefaults;

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
    if !given.training.lr_schedule {
        // After `steps` is settled: the warm-up of a short run is shortened to fit it.
        let schedule = d.lr_schedule_for(cfg.training.steps);
        cfg.training.lr_schedule = schedule;
        choose("training.lr_schedule", ron_value(&schedule));
    }
    if !given.training.spike {
        cfg.training.spike = d.spike;
        choose("training.spike", ron_value(&d.spike));
    }
    if !given.training.ema_decay {
        // After `steps` is settled: a short run averages over fewer steps.
        let decay = d.ema_decay_for(cfg.training.steps);
        cfg.training.ema_decay = decay;
        choose("training.ema_decay", ron_option(decay));
    }
    if !given.evaluation.every {
        let every = GridDefaults::evaluate_every_for(cfg.training.steps);
        cfg.evaluation.every = every;
        choose("evaluation.every", ron_option(every));
    }
    chosen
}

/// An optional value as a run file writes it.
fn ron_option<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "None".to_string(), |x| x.to_string())
}

/// A value as a run file writes it (`WarmupCosine(warmup_steps: 500, final_fraction: 0.1)`).
fn ron_value<T: serde::Serialize>(v: &T) -> String {
    crate::config::ron_options()
        .to_string(v)
        .unwrap_or_else(|e| format!("<{e}>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use nca_api::{LrSchedule, MemoryLimit};

    fn sized(text: &str) -> (RunConfig, Vec<Chosen>) {
        let mut cfg = RunConfig::from_ron(text, "t.ron").expect("parses");
        let given: Given = crate::config::ron_options().from_str(text).expect("parses");
        let chosen = apply(&mut cfg, &given);
        (cfg, chosen)
    }

    #[test]
    fn a_small_grid_keeps_the_defaults_and_a_large_one_gets_the_large_model() {
        let (small, chosen) = sized("(target: Solid(1.0, 0.0, 0.0))");
        let defaults = nca_api::NcaConfig::default();
        assert_eq!(small.nca().model, defaults.model);
        assert_eq!(small.training.steps, defaults.training.steps);
        assert_eq!(small.training.spike, defaults.training.spike);
        assert_eq!(chosen.len(), 8);
        // Every size scores and saves the weights' moving average.
        assert_eq!(small.training.ema_decay, Some(nca_api::SIZED_EMA_DECAY));
        // Ten scores in the run, so the best weights are kept; a short run only at its end.
        assert_eq!(small.evaluation.every, Some(1_000));
        // Up to 32×32 the rate decays; at 64×64 the picture is still learning at the end.
        assert_eq!(
            small.training.lr_schedule,
            LrSchedule::WarmupCosine {
                warmup_steps: 500,
                final_fraction: 0.1
            }
        );
        // A short run's warm-up is a tenth of it.
        let (short, _) = sized("(training: (steps: 60), target: Solid(1.0, 0.0, 0.0))");
        assert_eq!(
            short.training.lr_schedule,
            LrSchedule::WarmupCosine {
                warmup_steps: 6,
                final_fraction: 0.1
            }
        );
        assert_eq!(short.evaluation.every, None);
        // Its moving average spans a twentieth of it.
        assert_eq!(short.training.ema_decay, Some(1.0 - 1.0 / 3.0));
        let (middle, _) = sized("(grid: (height: 64, width: 33), target: Solid(1.0, 0.0, 0.0))");
        assert_eq!(middle.training.lr_schedule, LrSchedule::Constant);
        assert_eq!(middle.model.mlp_hidden, small.model.mlp_hidden);
        let (large, chosen) =
            sized("(grid: (height: 128, width: 128), target: Solid(1.0, 0.0, 0.0))");
        assert_eq!(large.model.position_octaves, Some(7));
        assert_eq!(large.model.mlp_hidden, Some(512));
        assert_eq!(large.training.steps, 18_000);
        assert!(matches!(
            large.training.lr_schedule,
            LrSchedule::WarmupCosine { .. }
        ));
        let schedule = chosen
            .iter()
            .find(|c| c.field == "training.lr_schedule")
            .expect("chosen");
        assert_eq!(
            schedule.value,
            "WarmupCosine(warmup_steps:500,final_fraction:0.1)"
        );
        assert_eq!(large.training.spike.reset_every, Some(500));
        assert_eq!(large.training.spike.kind, nca_api::SpikeKind::Add);
        assert_eq!(large.evaluation.every, Some(1_800));
        assert_eq!(large.training.ema_decay, Some(nca_api::SIZED_EMA_DECAY));
        let ema = chosen.iter().find(|c| c.field == "training.ema_decay");
        assert_eq!(ema.expect("chosen").value, "0.995");
    }

    #[test]
    fn written_values_win_even_when_they_are_the_small_defaults() {
        let (cfg, chosen) = sized(
            "(grid: (height: 128, width: 128), model: (mlp_hidden: None), \
             training: (steps: 50, lr_schedule: Constant, spike: (), ema_decay: None), \
             evaluation: (every: None), target: Solid(1.0, 0.0, 0.0))",
        );
        assert_eq!(cfg.model.mlp_hidden, None);
        assert_eq!(cfg.training.steps, 50);
        assert_eq!(cfg.training.lr_schedule, LrSchedule::Constant);
        // `spike: ()` is written: the original rule, no periodic reset.
        assert_eq!(cfg.training.spike, nca_api::SpikeRule::default());
        assert_eq!(cfg.model.position_octaves, Some(7));
        assert_eq!(cfg.evaluation.every, None);
        assert_eq!(cfg.training.ema_decay, None);
        let fields: Vec<&str> = chosen.iter().map(|c| c.field).collect();
        assert_eq!(fields, ["model.position_octaves", "training.learning_rate"]);
    }

    /// The chosen 256×256 model trains within 4 GiB (half of a small 8 GiB machine, the
    /// default limit there) on every compiled CPU backend, score and pictures included,
    /// with the pictures at their natural size (`examples/cat256.ron`) and at the default
    /// 8× scale; under 3.5 GiB the 8× pictures no longer fit beside the score and the run
    /// is refused up front, naming `output.scale`, while the natural size still fits.
    #[test]
    fn the_chosen_256_model_fits_a_small_machine_on_every_cpu_backend() {
        let grid = "grid: (height: 256, width: 256), target: Solid(1.0, 0.0, 0.0)";
        let (natural, _) = sized(&format!("({grid}, output: (scale: 1))"));
        assert_eq!(natural.model.position_octaves, Some(8));
        assert_eq!(natural.model.mlp_hidden, Some(512));
        assert_eq!(natural.training.steps, 30_000);
        assert_eq!(natural.evaluation.every, Some(3_000));
        let (scaled, _) = sized(&format!("({grid})"));
        let limit = MemoryLimit::new(4 << 30);
        // Every CPU backend compiled into this test build (all of them under `cargo test
        // --workspace`, where nca-cli's dev-dependencies turn on dfdx and candle).
        for backend in Backend::compiled()
            .into_iter()
            .filter(|b| *b != Backend::CandleCuda)
        {
            for cfg in [&natural, &scaled] {
                crate::preflight::check_run(cfg, &cfg.nca(), backend, &limit)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", backend.name()));
            }
        }
        let smaller = MemoryLimit::new(7 << 29);
        crate::preflight::check_run(&natural, &natural.nca(), Backend::Ndarray, &smaller)
            .expect("the natural size fits 3.5 GiB");
        let err = crate::preflight::check_run(&scaled, &scaled.nca(), Backend::Ndarray, &smaller)
            .expect_err("refused");
        assert!(format!("{err:#}").contains("output.scale"), "{err:#}");
    }
}
