//! The RON run file: nca-api's config sections plus a target and output settings.
//!
//! Every struct denies unknown fields, so a misspelled key is an error with its
//! `file:line:col`, never silently ignored. The `implicit_some` extension is on by
//! default: an optional value may be written `3.0`, `Some(3.0)` or `None`.

use std::path::{Path, PathBuf};

use crate::error::{bail, invalid, Result, ResultExt};
use crate::events::Chosen;
use crate::sizing;
use nca_api::{GridConfig, ModelConfig, NcaConfig, NoiseConfig, TrainingConfig};
use ron::extensions::Extensions;
use serde::{Deserialize, Serialize};

use crate::target::Target;

/// One training run as written in a `.ron` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Grid size (defaults: 32×32, batch 1).
    #[serde(default)]
    pub grid: GridConfig,
    /// Transition shape (defaults: 3 visible channels, D = 16, position embeddings, clamp 3).
    #[serde(default)]
    pub model: ModelConfig,
    /// Noise levels and ε (defaults: the design doc's 0.01 / 0.1 / 0.001).
    #[serde(default)]
    pub noise: NoiseConfig,
    /// Optimiser and loop (defaults: 10,000 steps, lr 3e-3, seed 0).
    #[serde(default)]
    pub training: TrainingConfig,
    /// What the visible channels should become; required.
    pub target: Target,
    /// Where and how often results are written.
    #[serde(default)]
    pub output: OutputConfig,
    /// The regrowth score at the end of the run (and optionally during it).
    #[serde(default)]
    pub evaluation: EvaluationConfig,
}

/// The regrowth score: roll the trained rule out from fresh noise and compare with the
/// target (see `nca_api::eval`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvaluationConfig {
    /// Rollout steps from fresh noise before scoring.
    pub steps: u64,
    /// Fresh-noise starts scored (batch elements of one rollout).
    pub seeds: usize,
    /// Also score every this many training steps (`psnr.csv`, `psnr.png`); `None`: only at
    /// the end. A run file that leaves it out gets a tenth of the run
    /// ([`nca_api::SizedDefaults::evaluate_every_for`]).
    pub every: Option<u64>,
    /// With `every`: keep the weights whose score was the best (the last step's included)
    /// instead of the last ones, and score them on starts not used to choose them.
    pub keep_best: bool,
}

impl Default for EvaluationConfig {
    fn default() -> Self {
        Self {
            steps: nca_api::eval::DEFAULT_EVAL_STEPS,
            seeds: nca_api::eval::DEFAULT_EVAL_SEEDS,
            every: None,
            keep_best: true,
        }
    }
}

/// Most fresh-noise starts the score may use (they are one batch).
pub const MAX_EVAL_SEEDS: usize = 64;

impl EvaluationConfig {
    /// Checks ranges; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            bail!("invalid config field `evaluation.steps`: expected >= 1, found 0");
        }
        if !(1..=MAX_EVAL_SEEDS).contains(&self.seeds) {
            bail!(
                "invalid config field `evaluation.seeds`: expected 1..={MAX_EVAL_SEEDS}, found {}",
                self.seeds
            );
        }
        if self.every == Some(0) {
            bail!("invalid config field `evaluation.every`: expected >= 1 or None, found 0");
        }
        Ok(())
    }

    /// [`validate`](Self::validate) for settings that came from elsewhere than a run file
    /// (command-line flags, function arguments): the error names `steps` and `seeds` as the
    /// caller's user wrote them.
    pub fn validate_as(&self, steps: &str, seeds: &str) -> Result<()> {
        self.validate().map_err(|e| {
            let message = e
                .report()
                .replace("config field `evaluation.steps`", steps)
                .replace("config field `evaluation.seeds`", seeds);
            e.reworded(message)
        })
    }
}

/// Where a run writes its results and how often.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Run directory, relative to the current directory; `None` means `runs/<config stem>`.
    /// `--out` on the command line wins over it.
    pub dir: Option<PathBuf>,
    /// Write `snapshots/step_NNNNNN.png` every this many steps (and at step 0 and the end).
    pub snapshot_every: u64,
    /// Write `checkpoint.safetensors` every this many steps (and at the end).
    pub checkpoint_every: u64,
    /// Nearest-neighbour upscale factor of snapshots, so a 32×32 grid is visible.
    pub scale: u32,
    /// Delay between GIF frames in milliseconds.
    pub gif_frame_ms: u32,
    /// Frames of `trajectory.gif` over the whole run (written to `frames/`), independent of
    /// `snapshot_every`.
    pub gif_frames: u64,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: None,
            snapshot_every: 100,
            checkpoint_every: 1000,
            scale: 8,
            gif_frame_ms: 80,
            gif_frames: 100,
        }
    }
}

/// The RON options used for reading and writing run files.
pub fn ron_options() -> ron::Options {
    ron::Options::default().with_default_extension(Extensions::IMPLICIT_SOME)
}

impl RunConfig {
    /// Parses RON text; the error reads `origin:line:col: message`.
    pub fn from_ron(text: &str, origin: &str) -> Result<Self> {
        ron_options().from_str(text).map_err(|e| {
            invalid!(
                "{origin}:{}:{}: {}",
                e.span.start.line,
                e.span.start.col,
                e.code
            )
        })
    }

    /// Reads a run file, fills the fields it leaves out whose values depend on the grid
    /// (see [`crate::sizing`]) and validates it.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_sized(path).map(|(cfg, _)| cfg)
    }

    /// [`RunConfig::load`], also returning the values chosen for the grid.
    pub fn load_sized(path: &Path) -> Result<(Self, Vec<Chosen>)> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        let origin = path.display().to_string();
        let mut cfg = Self::from_ron(&text, &origin)?;
        let given: sizing::Given = ron_options().from_str(&text).map_err(|e| {
            invalid!(
                "{origin}:{}:{}: {}",
                e.span.start.line,
                e.span.start.col,
                e.code
            )
        })?;
        let chosen = sizing::apply(&mut cfg, &given);
        cfg.validate()
            .with_context(|| format!("{origin}: invalid config"))?;
        Ok((cfg, chosen))
    }

    /// Reads a run config written as JSON with the RON file's structure (how a Python
    /// `dict` arrives), sized for its grid and validated like a run file. Enums are written
    /// as serde does: `{"Image": {"path": "cat.png"}}`, `{"Solid": [1.0, 0.0, 0.0]}`.
    pub fn from_json_sized(json: &str, origin: &str) -> Result<(Self, Vec<Chosen>)> {
        let mut cfg: Self = serde_json::from_str(json).map_err(|e| invalid!("{origin}: {e}"))?;
        let given: sizing::Given =
            serde_json::from_str(json).map_err(|e| invalid!("{origin}: {e}"))?;
        let chosen = sizing::apply(&mut cfg, &given);
        cfg.validate()
            .with_context(|| format!("{origin}: invalid config"))?;
        Ok((cfg, chosen))
    }

    /// The grid, model, noise and training sections as nca-api's config.
    pub fn nca(&self) -> NcaConfig {
        NcaConfig {
            grid: self.grid.clone(),
            model: self.model.clone(),
            noise: self.noise.clone(),
            training: self.training.clone(),
        }
    }

    /// Checks every range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.nca().validate()?;
        let v = self.model.visible_channels;
        if v != 1 && v != 3 {
            bail!(
                "invalid config field `model.visible_channels`: targets and snapshots are \
                 pictures, so it must be 1 (grey) or 3 (RGB), found {v}"
            );
        }
        let o = &self.output;
        if o.snapshot_every == 0 {
            bail!("invalid config field `output.snapshot_every`: expected >= 1, found 0");
        }
        if o.checkpoint_every == 0 {
            bail!("invalid config field `output.checkpoint_every`: expected >= 1, found 0");
        }
        if !(1..=64).contains(&o.scale) {
            bail!(
                "invalid config field `output.scale`: expected 1..=64, found {}",
                o.scale
            );
        }
        if o.gif_frame_ms == 0 {
            bail!("invalid config field `output.gif_frame_ms`: expected >= 1, found 0");
        }
        if !(2..=1000).contains(&o.gif_frames) {
            bail!(
                "invalid config field `output.gif_frames`: expected 2..=1000, found {}",
                o.gif_frames
            );
        }
        self.evaluation.validate()?;
        if let (Some(psnr), None) = (self.training.stop_at_psnr, self.evaluation.every) {
            bail!(
                "invalid config field `training.stop_at_psnr`: {psnr} dB is checked when the \
                 rule is scored during training, which needs `evaluation.every` (e.g. \
                 `evaluation: (every: 1000)`)"
            );
        }
        self.target.validate()
    }

    /// The config as RON text, with a header saying where it came from.
    pub fn to_ron(&self, header: &str) -> Result<String> {
        let pretty = ron::ser::PrettyConfig::new()
            .struct_names(false)
            .separate_tuple_members(false);
        let body = ron_options()
            .to_string_pretty(self, pretty)
            .context("serialising the config as RON")?;
        let mut out = String::new();
        for line in header.lines() {
            out.push_str("// ");
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(&body);
        out.push('\n');
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "(target: Solid(1.0, 0.0, 0.0))";

    #[test]
    fn minimal_file_uses_defaults() {
        let cfg = RunConfig::from_ron(MINIMAL, "t.ron").expect("parses");
        assert_eq!(cfg.nca(), NcaConfig::default());
        assert_eq!(cfg.output, OutputConfig::default());
        cfg.validate().expect("valid");
    }

    #[test]
    fn misspelled_field_has_a_position() {
        let text = "(\n  training: (stpes: 10),\n  target: Solid(1.0, 0.0, 0.0),\n)";
        let err = RunConfig::from_ron(text, "t.ron").expect_err("rejected");
        let msg = format!("{err:#}");
        assert!(msg.starts_with("t.ron:2:"), "{msg}");
        assert!(msg.contains("stpes"), "{msg}");
    }

    #[test]
    fn options_accept_implicit_and_explicit_some() {
        for clamp in ["2.0", "Some(2.0)"] {
            let text = format!("(model: (state_clamp: {clamp}), target: Solid(1.0, 0.0, 0.0))");
            let cfg = RunConfig::from_ron(&text, "t.ron").expect("parses");
            assert_eq!(cfg.model.state_clamp, Some(2.0));
        }
        let text = "(model: (state_clamp: None), target: Solid(1.0, 0.0, 0.0))";
        let cfg = RunConfig::from_ron(text, "t.ron").expect("parses");
        assert_eq!(cfg.model.state_clamp, None);
    }

    #[test]
    fn written_config_reads_back() {
        let mut cfg = RunConfig::from_ron(MINIMAL, "t.ron").expect("parses");
        cfg.output.dir = Some("runs/x".into());
        cfg.training.grad_clip = Some(1.0);
        let text = cfg.to_ron("resolved\nby a test").expect("serialises");
        assert!(text.starts_with("// resolved\n// by a test\n"), "{text}");
        assert_eq!(RunConfig::from_ron(&text, "back").expect("reads back"), cfg);
    }

    #[test]
    fn evaluation_fields_are_checked_by_name() {
        for (bad, field) in [
            ("steps: 0", "evaluation.steps"),
            ("seeds: 0", "evaluation.seeds"),
            ("seeds: 65", "evaluation.seeds"),
            ("every: 0", "evaluation.every"),
        ] {
            let text = format!("(evaluation: ({bad}), target: Solid(1.0, 0.0, 0.0))");
            let cfg = RunConfig::from_ron(&text, "t.ron").expect("parses");
            let msg = format!("{:#}", cfg.validate().expect_err("rejected"));
            assert!(msg.contains(field), "{msg}");
        }
        let text = "(training: (stop_at_psnr: 30.0), target: Solid(1.0, 0.0, 0.0))";
        let cfg = RunConfig::from_ron(text, "t.ron").expect("parses");
        let msg = format!("{:#}", cfg.validate().expect_err("rejected"));
        assert!(
            msg.contains("training.stop_at_psnr") && msg.contains("evaluation.every"),
            "{msg}"
        );
        let text = "(evaluation: (steps: 50, seeds: 4, every: 500), target: Solid(1.0, 0.0, 0.0))";
        let cfg = RunConfig::from_ron(text, "t.ron").expect("parses");
        cfg.validate().expect("valid");
        assert_eq!(cfg.evaluation.every, Some(500));
    }

    #[test]
    fn picture_channels_are_checked() {
        let text = "(model: (visible_channels: 2), target: Solid(1.0, 0.0, 0.0))";
        let cfg = RunConfig::from_ron(text, "t.ron").expect("parses");
        let msg = format!("{:#}", cfg.validate().expect_err("rejected"));
        assert!(msg.contains("model.visible_channels"), "{msg}");
    }
}
