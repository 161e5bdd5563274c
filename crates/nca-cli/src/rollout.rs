//! `nca-cli rollout`: run a trained rule without training.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use nca_api::{Checkpoint, HostTensor, RolloutOptions, TensorFile, Trainer};
use serde::Serialize;

use crate::backend::{dispatch, Backend, Job};
use crate::config::EvaluationConfig;
use crate::files;
use crate::render;
use crate::run::Finish;
use crate::score;

/// Options of a rollout, from the command line.
#[derive(Clone, Debug)]
pub struct RolloutArgs {
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
    /// Set by Ctrl-C: stop after the current step.
    pub interrupt: Arc<AtomicBool>,
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

/// Runs `nca-cli rollout`.
pub fn rollout_command(args: RolloutArgs) -> Result<Finish> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(s) = args.noise {
        if !(s.is_finite() && s >= 0.0) {
            bail!("--noise must be a finite value >= 0, found {s}");
        }
    }
    if !(1..=64).contains(&args.scale) {
        bail!("--scale must be in 1..=64, found {}", args.scale);
    }
    let ckpt = Checkpoint::load(&args.checkpoint)
        .with_context(|| format!("cannot load checkpoint {}", args.checkpoint.display()))?;
    let target = files::checkpoint_target(&args.checkpoint)?;
    // The run's own evaluation settings, so the score matches its summary.json.
    let mut evaluation = files::checkpoint_run_config(&args.checkpoint)
        .map(|r| r.evaluation)
        .unwrap_or_default();
    if let Some(s) = args.eval_steps {
        evaluation.steps = s;
    }
    if let Some(s) = args.eval_seeds {
        evaluation.seeds = s;
    }
    evaluation.every = None;
    evaluation.validate().map_err(|e| {
        anyhow!(
            "{}",
            format!("{e:#}")
                .replace("config field `evaluation.steps`", "--eval-steps")
                .replace("config field `evaluation.seeds`", "--eval-seeds")
        )
    })?;
    let cfg = &ckpt.config;
    let v = cfg.model.visible_channels;
    if v != 1 && v != 3 {
        bail!("the checkpoint has {v} visible channels; frames need 1 (grey) or 3 (RGB)");
    }
    let init = match &args.init {
        Some(path) => {
            let mut file = TensorFile::read(path)
                .with_context(|| format!("cannot read initial state {}", path.display()))?;
            let state = file.take(nca_api::checkpoint::STATE_TENSOR, path)?;
            let [_, c, h, w] = state.dims4("state")?;
            if (c, h, w) != (cfg.model.channels(), cfg.grid.height, cfg.grid.width) {
                bail!(
                    "{}: tensor `state` has shape {:?}, the checkpoint's rule needs [B, {}, {}, {}]",
                    path.display(),
                    state.shape(),
                    cfg.model.channels(),
                    cfg.grid.height,
                    cfg.grid.width
                );
            }
            state
        }
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
    };
    let job = RolloutJob {
        args: &args,
        ckpt: &ckpt,
        evaluation,
        target,
        init,
        options,
        started: Instant::now(),
    };
    dispatch(args.backend, &cfg.model, &cfg.training.optimizer(), job)
}

struct RolloutJob<'a> {
    args: &'a RolloutArgs,
    ckpt: &'a Checkpoint,
    evaluation: EvaluationConfig,
    target: Option<HostTensor>,
    init: HostTensor,
    options: RolloutOptions,
    started: Instant,
}

/// Marks the error that stops a rollout on Ctrl-C.
#[derive(Debug)]
struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

impl Job for RolloutJob<'_> {
    type Output = Finish;

    fn run<T: Trainer>(self, mut t: T, backend: Backend) -> Result<Finish> {
        let out = &self.args.out;
        files::prepare_new_dir(out, self.args.force)?;
        let frames = out.join("frames");
        std::fs::create_dir_all(&frames)
            .with_context(|| format!("cannot create {}", frames.display()))?;
        t.set_weights(&self.ckpt.weights)?;
        let mut state = t.upload(&self.init)?;
        let v = self.ckpt.config.model.visible_channels;
        let scale = self.args.scale;
        let target = self.target.as_ref();
        let steps = self.options.steps;
        let every = self.args.frame_every.unwrap_or(steps.div_ceil(100)).max(1);
        let save = |host: &HostTensor, step: u64| -> Result<()> {
            let img = render::snapshot(host, target, v, scale)?;
            render::save_png(&img, &render::step_path(&frames, step))
        };
        save(&self.init, 0)?;
        let mut done = 0;
        let result = nca_api::rollout(&mut t, &mut state, &self.options, |step, t, s| {
            done = step;
            if step % every == 0 || step == steps {
                save(&t.download(s)?, step)?;
            }
            if self.args.interrupt.load(Ordering::SeqCst) {
                return Err(anyhow!(Interrupted));
            }
            Ok::<(), anyhow::Error>(())
        });
        let interrupted = match result {
            Ok(()) => false,
            Err(e) if e.is::<Interrupted>() => {
                tracing::warn!("interrupted: stopping after step {done}");
                true
            }
            Err(e) => return Err(e),
        };
        let last = t.download(&state)?;
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
        let loss = final_loss.map_or_else(|| "n/a".into(), |l| format!("{l:.3e}"));
        println!(
            "rollout: {done} steps on {} (σ = {}), final loss against the target {loss}",
            backend.name(),
            self.options.sigma
        );
        match &summary.regrowth {
            Some(r) => println!("{}", score::line(r)),
            None if target.is_none() => {
                println!("no regrowth score: the checkpoint holds no target")
            }
            None => {}
        }
        println!("results in {}", display(out));
        Ok(if interrupted {
            Finish::Interrupted
        } else {
            Finish::Completed
        })
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
