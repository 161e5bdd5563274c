//! Rolling a trained rule out without training: from seeded noise or a given state, into
//! a directory of frames, a GIF, the final state and the rule's regrowth score
//! (`nca-cli rollout`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::error::{bail, BackendResult, Error, Result, ResultExt};
use crate::events::{Event, Events};
use nca_api::{
    Checkpoint, HostTensor, MemoryLimit, NcaConfig, RolloutOptions, TensorFile, Trainer,
};
use serde::Serialize;

use crate::backend::{dispatch, Backend, Job};
use crate::config::EvaluationConfig;
use crate::files;
use crate::preflight::{self, RolloutPlan};
use crate::render;
use crate::score;

/// Largest `--noise` σ accepted: a hundred times the N(0, 1) start's spread is already
/// nothing but noise, and far larger values overflow the attention to NaN.
pub const MAX_ROLLOUT_NOISE: f32 = 100.0;

/// A rollout to do (the options of `nca-cli rollout`).
#[derive(Clone, Debug)]
pub struct RolloutRequest {
    /// Checkpoint holding the rule.
    pub checkpoint: PathBuf,
    /// Safetensors file with a `state` tensor `[B, C, H, W]` to start from.
    pub init: Option<PathBuf>,
    /// Steps to run.
    pub steps: u64,
    /// Noise σ before every step; `None` uses the checkpoint's `noise.sigma_small`.
    pub noise: Option<f32>,
    /// Seed of the initial noise and the per-step noise.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// Replace the results in an existing directory.
    pub force: bool,
    /// Backend to run on.
    pub backend: Backend,
    /// Save a frame every this many steps; `None` picks about 100 frames.
    pub frame_every: Option<u64>,
    /// Nearest-neighbour upscale factor of frames.
    pub scale: u32,
    /// Delay between GIF frames in milliseconds.
    pub gif_frame_ms: u32,
    /// Rollout steps of the regrowth score; `None`: the run file's `evaluation.steps`.
    pub eval_steps: Option<u64>,
    /// Fresh-noise starts of the score; `None`: the run file's `evaluation.seeds`.
    pub eval_seeds: Option<usize>,
    /// What the rollout may allocate (usually [`MemoryLimit::from_env`]).
    pub memory: MemoryLimit,
}

/// What `rollout.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutSummary {
    /// Backend that ran.
    pub backend: String,
    /// Checkpoint of the rule.
    pub checkpoint: String,
    /// Initial state file, or `null` for seeded N(0, 1) noise.
    pub init: Option<String>,
    /// Steps run.
    pub steps: u64,
    /// Noise σ before every step.
    pub sigma: f32,
    /// Seed used.
    pub seed: u64,
    /// Mean squared error of the final visible channels against the stored target.
    pub final_loss: Option<f32>,
    /// The rule's regrowth score from fresh noise (as in the run's `summary.json`), or
    /// `null` when the checkpoint holds no target.
    pub regrowth: Option<nca_api::RegrowthScore>,
    /// Whether Ctrl-C stopped it early.
    pub interrupted: bool,
    /// Wall-clock seconds.
    pub wall_seconds: f64,
}

/// A finished rollout: what `rollout.json` holds, and whether the rule had a target.
#[derive(Clone, Debug)]
pub struct RolloutOutcome {
    /// What `rollout.json` holds.
    pub summary: RolloutSummary,
    /// Whether the checkpoint held a target (without one there is no score).
    pub has_target: bool,
}

/// Rolls a checkpoint's rule out into `args.out`. Everything is read and checked (flags,
/// weights, stored target, `--init`, the memory and drawing sizes) before the output
/// directory is created. `events` sees every step ([`Event::RolloutStep`]); `Break`
/// stops after that step and still writes the results (`interrupted: true`).
pub fn rollout(args: &RolloutRequest, events: &mut dyn Events) -> Result<RolloutOutcome> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(s) = args.noise {
        if !(s.is_finite() && (0.0..=MAX_ROLLOUT_NOISE).contains(&s)) {
            bail!("--noise must be a finite value from 0 to {MAX_ROLLOUT_NOISE}, found {s}");
        }
    }
    if !(1..=64).contains(&args.scale) {
        bail!("--scale must be in 1..=64, found {}", args.scale);
    }
    if args.frame_every == Some(0) {
        bail!("--frame-every must be at least 1");
    }
    let limit = &args.memory;
    let path = &args.checkpoint;
    let ckpt = nca_api::Checkpoint::load_limited(path, limit)
        .with_context(|| format!("cannot load checkpoint {}", path.display()))?;
    let run_config = files::stored_run_config(&ckpt, path);
    let target = ckpt.target.clone();
    // Only the weights matter here: Adam's moments and the carried state are not used.
    if let Some(name) = ckpt.weights.first_non_finite() {
        bail!(
            "checkpoint {}: tensor `{name}` holds NaN or inf values, so the rule cannot be \
             rolled out (the checkpoint was probably written by a run that diverged)",
            path.display()
        );
    }
    let cfg = &ckpt.config;
    let v = cfg.model.visible_channels;
    if v != 1 && v != 3 {
        bail!(
            "checkpoint {}: the model has {v} visible channels; frames need 1 (grey) or 3 (RGB)",
            path.display()
        );
    }
    let target = checked_target(target, cfg, path)?;
    // The run's own evaluation settings, so the score matches its summary.json.
    let mut evaluation = run_config.map(|r| r.evaluation).unwrap_or_default();
    if let Some(s) = args.eval_steps {
        evaluation.steps = s;
    }
    if let Some(s) = args.eval_seeds {
        evaluation.seeds = s;
    }
    evaluation.every = None;
    evaluation.validate_as("--eval-steps", "--eval-seeds")?;
    let init = match &args.init {
        Some(init) => Some(read_init_state(init, cfg, limit)?),
        None => None,
    };
    let batch = init.as_ref().map_or(cfg.grid.batch, |s| s.shape()[0]);
    let frame_every = args.frame_every.unwrap_or(args.steps.div_ceil(100)).max(1);
    let plan = RolloutPlan {
        nca: cfg,
        batch,
        with_target: target.is_some(),
        scale: args.scale,
        eval_seeds: evaluation.seeds,
        eval_steps: evaluation.steps,
    };
    preflight::check_rollout(&plan, limit)
        .with_context(|| format!("cannot roll out checkpoint {}", path.display()))?;
    let init = match init {
        Some(state) => state,
        None => {
            let mut seeded = cfg.clone();
            seeded.training.seed = args.seed;
            nca_api::initial_state(&seeded)
        }
    };
    let options = RolloutOptions {
        steps: args.steps,
        sigma: args.noise.unwrap_or(cfg.noise.sigma_small),
        state_clamp: cfg.model.state_clamp,
        seed: args.seed,
        first_step: 0,
    };
    let job = RolloutJob {
        args,
        events,
        ckpt: &ckpt,
        evaluation,
        target,
        init,
        options,
        frame_every,
        started: Instant::now(),
    };
    dispatch(args.backend, &cfg.model, &cfg.training.optimizer(), job)
}

/// The target a checkpoint written by a training run stores beside the weights, checked
/// against its model and grid (`None` when it holds none).
fn checked_target(
    target: Option<HostTensor>,
    cfg: &NcaConfig,
    path: &Path,
) -> Result<Option<HostTensor>> {
    let Some(target) = target else {
        return Ok(None);
    };
    let (v, h, w) = (cfg.model.visible_channels, cfg.grid.height, cfg.grid.width);
    let fits = matches!(*target.shape(), [b, tv, th, tw] if b >= 1 && (tv, th, tw) == (v, h, w));
    if !fits {
        bail!(
            "checkpoint {}: tensor `{}` has shape {:?}, but its model and grid need \
             [B, {v}, {h}, {w}] (visible channels, height, width)",
            path.display(),
            files::TARGET_TENSOR,
            target.shape()
        );
    }
    if !target.is_finite() {
        bail!(
            "checkpoint {}: tensor `{}` holds NaN or inf values",
            path.display(),
            files::TARGET_TENSOR
        );
    }
    Ok(Some(target))
}

/// Reads the `[B, C, H, W]` tensor `state` of an `--init` file for a rollout of `cfg`'s
/// rule: the file's size is checked against `limit` before it is read, and every error
/// names the file (wrong rank, wrong shape, NaN or inf values).
pub fn read_init_state(path: &Path, cfg: &NcaConfig, limit: &MemoryLimit) -> Result<HostTensor> {
    let what = || format!("initial state {}", path.display());
    let mut file =
        TensorFile::read_limited(path, limit).with_context(|| format!("cannot read {}", what()))?;
    let state = file
        .take(nca_api::checkpoint::STATE_TENSOR, path)
        .with_context(|| format!("cannot read {}", what()))?;
    let need = [cfg.model.channels(), cfg.grid.height, cfg.grid.width];
    let fits = matches!(*state.shape(), [b, c, h, w] if b >= 1 && [c, h, w] == need);
    if !fits {
        bail!(
            "{}: tensor `state` has shape {:?}, the checkpoint's rule needs [B, {}, {}, {}] \
             (batch, channels, height, width)",
            path.display(),
            state.shape(),
            need[0],
            need[1],
            need[2]
        );
    }
    if let Some(at) = state.data().iter().position(|x| !x.is_finite()) {
        bail!(
            "{}: tensor `state` holds NaN or inf values (the first at element {at}); a \
             rollout needs a finite start",
            path.display()
        );
    }
    Ok(state)
}

struct RolloutJob<'a> {
    args: &'a RolloutRequest,
    events: &'a mut dyn Events,
    ckpt: &'a Checkpoint,
    evaluation: EvaluationConfig,
    target: Option<HostTensor>,
    init: HostTensor,
    options: RolloutOptions,
    /// Save a frame every this many steps.
    frame_every: u64,
    started: Instant,
}

/// The message for a rollout whose state stopped being finite: `last_finite` is the last
/// step whose state was seen finite (0: the start), `seen_at` the step it was first seen
/// with NaN or inf.
fn non_finite(last_finite: u64, seen_at: u64) -> String {
    if seen_at == last_finite + 1 {
        format!("the rollout became non-finite (NaN or inf) at step {seen_at}")
    } else {
        format!(
            "the rollout became non-finite (NaN or inf) after step {last_finite} and by step \
             {seen_at} (the state is checked at every saved frame)"
        )
    }
}

impl Job for RolloutJob<'_> {
    type Output = RolloutOutcome;

    fn run<T: Trainer>(self, mut t: T, backend: Backend) -> Result<RolloutOutcome> {
        let out = &self.args.out;
        files::prepare_new_dir(out, self.args.force)?;
        let frames = out.join("frames");
        std::fs::create_dir_all(&frames)
            .with_context(|| format!("cannot create {}", frames.display()))?;
        t.set_weights(&self.ckpt.weights).backend()?;
        let mut state = t.upload(&self.init).backend()?;
        let v = self.ckpt.config.model.visible_channels;
        let scale = self.args.scale;
        let target = self.target.as_ref();
        let steps = self.options.steps;
        let every = self.frame_every;
        let save = |host: &HostTensor, step: u64| -> Result<()> {
            let img = render::snapshot(host, target, v, scale)?;
            render::save_png(&img, &render::step_path(&frames, step))
        };
        save(&self.init, 0)?;
        let mut done = 0;
        let mut last_finite = 0;
        let events = self.events;
        let failed = |e: Error, last_finite: u64, hint: &str| {
            e.context(format!(
                "rollout of {} failed; frames up to step {last_finite} are in {}{hint}",
                self.args.checkpoint.display(),
                display(&frames)
            ))
        };
        // The loop's error type must come from the backend's, which `Error` cannot name
        // generically: errors travel boxed and are unboxed below.
        let result = nca_api::rollout(&mut t, &mut state, &self.options, |step, t, s| {
            done = step;
            if step % every == 0 || step == steps {
                let host = t.download(s)?;
                if !host.is_finite() {
                    return Err(Error::Diverged(non_finite(last_finite, step)).into());
                }
                last_finite = step;
                save(&host, step)?;
            }
            if events.on_event(&Event::RolloutStep { step }).is_break() {
                return Err(Error::Interrupted.into());
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .map_err(unbox);
        let interrupted = match result {
            Ok(()) => false,
            Err(Error::Interrupted) => true,
            Err(e @ Error::Diverged(_)) => {
                return Err(failed(e, last_finite, "; try a smaller --noise"));
            }
            Err(e) => return Err(e),
        };
        let last = t.download(&state).backend()?;
        if !last.is_finite() {
            return Err(failed(
                Error::Diverged(non_finite(last_finite, done)),
                last_finite,
                "",
            ));
        }
        if interrupted && done % every != 0 {
            save(&last, done)?;
        }
        let mut file = TensorFile::default();
        file.tensors
            .insert(nca_api::checkpoint::STATE_TENSOR.into(), last.clone());
        file.metadata.insert("steps".into(), done.to_string());
        file.metadata
            .insert("sigma".into(), self.options.sigma.to_string());
        file.metadata
            .insert("seed".into(), self.options.seed.to_string());
        file.write(&out.join("final.safetensors"))?;
        render::save_png(
            &render::snapshot(&last, target, v, scale)?,
            &out.join("final.png"),
        )?;
        render::gif_from_dir(&frames, &out.join("rollout.gif"), self.args.gif_frame_ms)?;
        let final_loss = match target {
            Some(tg) => Some(visible_mse(&last, tg)?),
            None => None,
        };
        let regrowth = match target {
            Some(tg) if !interrupted => {
                let cfg = &self.ckpt.config;
                let r = score::run(
                    &mut t,
                    tg,
                    &self.evaluation,
                    cfg.training.seed,
                    cfg.model.state_clamp,
                    true,
                )?;
                score::write_picture(&r, tg, v, scale, &out.join("regrowth.png"))?;
                let half = (scale / 2).max(1);
                let gif = out.join("regrowth.gif");
                score::write_gif(&r, tg, v, half, self.args.gif_frame_ms, &gif)?;
                Some(r.score)
            }
            _ => None,
        };
        let summary = RolloutSummary {
            backend: backend.name().into(),
            checkpoint: self.args.checkpoint.display().to_string(),
            init: self.args.init.as_ref().map(|p| p.display().to_string()),
            steps: done,
            sigma: self.options.sigma,
            seed: self.options.seed,
            final_loss,
            regrowth,
            interrupted,
            wall_seconds: self.started.elapsed().as_secs_f64(),
        };
        files::write_json(&out.join("rollout.json"), &summary)?;
        Ok(RolloutOutcome {
            summary,
            has_target: target.is_some(),
        })
    }
}

/// An error that travelled boxed through [`nca_api::rollout`]: this crate's own, or the
/// backend's.
pub(crate) fn unbox(e: Box<dyn std::error::Error + Send + Sync>) -> Error {
    match e.downcast::<Error>() {
        Ok(own) => *own,
        Err(other) => Error::Backend(other),
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Mean squared error of every batch element's visible channels against target batch 0.
pub fn visible_mse(state: &HostTensor, target: &HostTensor) -> Result<f32> {
    let [b, c, h, w] = state.dims4("state")?;
    let [_, v, th, tw] = target.dims4("target")?;
    if (th, tw) != (h, w) || v > c {
        bail!(
            "target {:?} does not fit state {:?}",
            target.shape(),
            state.shape()
        );
    }
    let plane = v * h * w;
    let t = &target.data()[..plane];
    let mut sum = 0.0f64;
    for bi in 0..b {
        let s = &state.data()[bi * c * h * w..bi * c * h * w + plane];
        sum += s
            .iter()
            .zip(t)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum::<f64>();
    }
    Ok((sum / (b * plane) as f64) as f32)
}
