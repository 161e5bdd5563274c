//! `nca-cli run.ron`: train, watch, and leave a complete run directory behind.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nca_api::{
    Checkpoint, ConstantNoise, HostTensor, LoopOptions, NcaConfig, Observer, Progress, StepContext,
    StopReason, TrainError, Trainer,
};
use serde::Serialize;

use crate::backend::{dispatch, Backend, Job};
use crate::config::RunConfig;
use crate::files::{self, CheckpointParts};
use crate::plot::{self, LossRecord};
use crate::render;
use crate::score;
use nca_api::noise::{add_gaussian, stream_seed, Stream};

/// How a command ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Ran to its end (steps or `max_spikes`).
    Completed,
    /// Stopped early by Ctrl-C; everything was still written.
    Interrupted,
}

/// Options of a training run, from the command line.
#[derive(Clone, Debug)]
pub struct TrainArgs {
    /// The RON run file.
    pub config: PathBuf,
    /// Run directory overriding the config's.
    pub out: Option<PathBuf>,
    /// Checkpoint to continue from.
    pub resume: Option<PathBuf>,
    /// Replace the results in an existing run directory.
    pub force: bool,
    /// Backend to train with.
    pub backend: Backend,
    /// Draw a progress bar (a terminal) instead of log lines.
    pub progress_bar: bool,
    /// Set by Ctrl-C: stop after the current step.
    pub interrupt: Arc<AtomicBool>,
}

/// What `summary.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Backend that trained.
    pub backend: String,
    /// `completed`, `max_spikes`, `interrupted`, `diverged` or `failed`.
    pub status: String,
    /// The error that stopped the run, if any.
    pub error: Option<String>,
    /// Config file the run was started with.
    pub config: String,
    /// Step of the checkpoint this run resumed from.
    pub resumed_from_step: Option<u64>,
    /// Steps run by this invocation.
    pub steps_run: u64,
    /// Steps completed in total (the step counter).
    pub final_step: u64,
    /// Spikes in total.
    pub spikes: u64,
    /// Loss of the last step (`null` when it was not finite).
    pub final_loss: Option<f32>,
    /// The spike threshold ε.
    pub epsilon: f32,
    /// First step whose loss was below ε.
    pub first_step_below_epsilon: Option<u64>,
    /// Wall-clock seconds of the whole command.
    pub wall_seconds: f64,
    /// Seconds spent in the training loop (including snapshots and checkpoints).
    pub train_seconds: f64,
    /// `steps_run / train_seconds`.
    pub steps_per_second: f64,
    /// The regrowth score of the final rule (`null` when the run failed).
    pub regrowth: Option<nca_api::RegrowthScore>,
}

/// Runs `nca-cli run.ron`.
pub fn train_command(args: TrainArgs) -> Result<Finish> {
    let started = Instant::now();
    let cfg = RunConfig::load(&args.config)?;
    let base = files::parent_dir(&args.config);
    let nca = cfg.nca();
    let target = cfg
        .target
        .render(&nca, &base)
        .with_context(|| format!("{}: cannot build the target", args.config.display()))?;
    let resume = match &args.resume {
        Some(path) => Some(load_resume(path, &nca, &args.config)?),
        None => None,
    };
    let out = match (&args.out, &args.resume, &cfg.output.dir) {
        (Some(o), ..) => o.clone(),
        (None, Some(r), _) => files::parent_dir(r),
        (None, None, dir) => {
            let base = dir.clone().unwrap_or_else(|| {
                let stem = args
                    .config
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into());
                Path::new("runs").join(stem)
            });
            // Without --out a second run goes next to the first instead of failing;
            // --force still means "replace the default directory".
            if args.force {
                base
            } else {
                files::next_free_dir(&base)?
            }
        }
    };
    let in_place = args
        .resume
        .as_ref()
        .is_some_and(|r| files::same_dir(&files::parent_dir(r), &out));
    let mut resolved = cfg.clone();
    resolved.target = cfg.target.resolved(&base);
    resolved.output.dir = Some(out.clone());
    let header = format!(
        "Resolved config written by nca-cli {} from {}.\nImage paths are absolute; \
         `nca-cli` reads this file as it reads any run file.",
        env!("CARGO_PKG_VERSION"),
        args.config.display()
    );
    let run_ron = resolved.to_ron(&header)?;
    let job = TrainJob {
        args: &args,
        cfg: &resolved,
        nca: &nca,
        target,
        resume,
        out,
        in_place,
        run_ron,
        started,
    };
    dispatch(args.backend, &nca.model, &nca.training.optimizer(), job)
}

/// A checkpoint to resume from, checked against the run config.
struct Resume {
    ckpt: Checkpoint,
    path: PathBuf,
}

fn load_resume(path: &Path, nca: &NcaConfig, config_path: &Path) -> Result<Resume> {
    let ckpt =
        Checkpoint::load(path).with_context(|| format!("cannot resume from {}", path.display()))?;
    let mut diffs = Vec::new();
    let (c, r) = (&ckpt.config, nca);
    let mut diff = |field: &str, a: String, b: String| {
        if a != b {
            diffs.push(format!("{field}: checkpoint {a}, config {b}"));
        }
    };
    diff(
        "grid.height",
        c.grid.height.to_string(),
        r.grid.height.to_string(),
    );
    diff(
        "grid.width",
        c.grid.width.to_string(),
        r.grid.width.to_string(),
    );
    diff(
        "grid.batch",
        c.grid.batch.to_string(),
        r.grid.batch.to_string(),
    );
    let (cm, rm) = (&c.model, &r.model);
    // One list of model fields for every check (nca-api's), so a new option is never
    // forgotten here; "checkpoint A vs config B".
    for d in cm.differences(rm) {
        diffs.push(
            d.replacen(": ", ": checkpoint ", 1)
                .replacen(" vs ", ", config ", 1),
        );
    }
    if !diffs.is_empty() {
        bail!(
            "checkpoint {} does not match config {}: its shapes differ ({}); a run resumes \
             only with the grid and model it was trained with{}",
            path.display(),
            config_path.display(),
            diffs.join("; "),
            if cm.position_octaves.is_none()
                && cm.mlp_hidden.is_none()
                && (rm.position_octaves.is_some() || rm.mlp_hidden.is_some())
            {
                " (the checkpoint holds the plain model, e.g. one written before \
                 position_octaves and mlp_hidden existed: set `position_octaves: None, \
                 mlp_hidden: None` in the run file's model section to continue it)"
            } else {
                ""
            }
        );
    }
    if cm.state_clamp != rm.state_clamp {
        tracing::warn!(
            "model.state_clamp changes from {:?} to {:?} on resume",
            cm.state_clamp,
            rm.state_clamp
        );
    }
    if ckpt.progress.step >= nca.training.steps {
        bail!(
            "checkpoint {} is already at step {} and {} sets training.steps to {}; raise \
             training.steps to train further",
            path.display(),
            ckpt.progress.step,
            config_path.display(),
            nca.training.steps
        );
    }
    if c.training.seed != r.training.seed {
        tracing::warn!(
            "re-seeding: the checkpoint was trained with seed {}, noise from step {} on is \
             drawn from seed {}",
            c.training.seed,
            ckpt.progress.step + 1,
            r.training.seed
        );
    }
    Ok(Resume {
        ckpt,
        path: path.to_path_buf(),
    })
}

struct TrainJob<'a> {
    args: &'a TrainArgs,
    cfg: &'a RunConfig,
    nca: &'a NcaConfig,
    target: HostTensor,
    resume: Option<Resume>,
    out: PathBuf,
    in_place: bool,
    run_ron: String,
    started: Instant,
}

impl Job for TrainJob<'_> {
    type Output = Finish;

    fn run<T: Trainer>(self, mut trainer: T, backend: Backend) -> Result<Finish> {
        let out = &self.out;
        let resume_step = self.resume.as_ref().map(|r| r.ckpt.progress.step);
        if self.in_place {
            files::remove_frames_after(out, resume_step)?;
        } else {
            files::prepare_new_dir(out, self.args.force)?;
        }
        let snap_dir = out.join("snapshots");
        let frame_dir = out.join("frames");
        for dir in [&snap_dir, &frame_dir] {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(out.join("config.ron"), &self.run_ron)
            .with_context(|| format!("cannot write {}", out.join("config.ron").display()))?;
        let v = self.nca.model.visible_channels;
        let scale = self.cfg.output.scale;
        render::save_png(
            &render::tile(&self.target, 0, v, scale)?,
            &out.join("target.png"),
        )?;

        let (mut state, mut progress, history, mut psnr_rows) = match &self.resume {
            None => {
                let state = nca_api::start(&mut trainer, self.nca, &self.target)?;
                (state, Progress::default(), Vec::new(), Vec::new())
            }
            Some(r) => {
                let ckpt = &r.ckpt;
                trainer.set_weights(&ckpt.weights)?;
                match &ckpt.adam {
                    Some(adam) => trainer.set_adam_state(adam)?,
                    None => tracing::warn!("checkpoint has no Adam state: moments start at 0"),
                }
                trainer.set_target(&self.target)?;
                let host = match &ckpt.state {
                    Some(s) => s.clone(),
                    None => {
                        tracing::warn!("checkpoint has no state: starting from fresh noise");
                        nca_api::initial_state(self.nca)
                    }
                };
                let state = trainer.upload(&host)?;
                let dir = files::parent_dir(&r.path);
                let old_csv = dir.join("loss.csv");
                let history = if old_csv.is_file() {
                    let mut h = plot::read_csv(&old_csv)?;
                    h.retain(|rec| rec.step <= ckpt.progress.step);
                    h
                } else {
                    Vec::new()
                };
                let old_psnr = dir.join("psnr.csv");
                let psnr = if old_psnr.is_file() {
                    let mut p = score::read_csv(&old_psnr)?;
                    // The old run's end-of-run score at the resume step is recomputed.
                    p.retain(|row| row.0 < ckpt.progress.step);
                    p
                } else {
                    Vec::new()
                };
                (state, ckpt.progress.clone(), history, psnr)
            }
        };

        let csv_path = out.join("loss.csv");
        plot::write_csv(&csv_path, &history)?;
        let csv = OpenOptions::new()
            .append(true)
            .open(&csv_path)
            .with_context(|| format!("cannot open {}", csv_path.display()))?;
        let parts = CheckpointParts {
            config: self.nca,
            backend: backend.name(),
            target: &self.target,
            run_ron: &self.run_ron,
        };
        let start_step = progress.step;
        let total = self.nca.training.steps;
        let mut obs = RunObserver {
            parts: &parts,
            out,
            snap_dir: &snap_dir,
            frame_dir: &frame_dir,
            target: &self.target,
            visible: v,
            scale,
            snapshot_every: self.cfg.output.snapshot_every,
            frame_every: total.div_ceil(self.cfg.output.gif_frames).max(1),
            checkpoint_every: self.cfg.output.checkpoint_every,
            total,
            csv: BufWriter::new(csv),
            records: history,
            last_snapshot: None,
            last_frame: None,
            last_checkpoint: resume_step,
            run_seed: self.nca.training.seed,
            sigma_large: self.nca.noise.sigma_large,
            interrupt: &self.args.interrupt,
            bar: None,
            last_log: (Instant::now(), start_step),
        };
        if self.resume.is_none() {
            obs.snapshot(&trainer, &state, 0, false)
                .map_err(anyhow::Error::msg)?;
        }
        if self.args.progress_bar {
            obs.bar = Some(progress_bar(total, start_step));
        } else {
            tracing::info!(
                "training {} steps on {} ({}) into {}",
                total - start_step,
                backend.name(),
                crate::bench::describe_model(&self.nca.model),
                out.display()
            );
        }

        let train_started = Instant::now();
        let schedule = ConstantNoise::from(&self.nca.noise);
        let options = LoopOptions::from_config(self.nca);
        let eval_cfg = &self.cfg.evaluation;
        let (seed, clamp) = (self.nca.training.seed, self.nca.model.state_clamp);
        let result = loop {
            // With `evaluation.every` the loop runs in chunks and the rule is scored in
            // between; the noise is counter-based, so chunking changes no number.
            let until = match eval_cfg.every {
                Some(e) => (progress.step / e + 1).saturating_mul(e).min(total),
                None => total,
            };
            let chunk = LoopOptions {
                steps: until,
                ..options
            };
            let r = nca_api::train(
                &mut trainer,
                &mut state,
                &schedule,
                &chunk,
                &mut progress,
                &mut obs,
            );
            match r {
                Ok(outcome) if outcome.reason == StopReason::Steps && progress.step < total => {
                    let reg = score::run(&mut trainer, &self.target, eval_cfg, seed, clamp, false)?;
                    let msg = format!("step {}: {}", progress.step, score::line(&reg.score));
                    match &obs.bar {
                        Some(bar) => bar.println(msg),
                        None => tracing::info!("{msg}"),
                    }
                    psnr_rows.push((progress.step, reg.score.mean_psnr_db, reg.score.mean_mse));
                }
                other => break other,
            }
        };
        let train_seconds = train_started.elapsed().as_secs_f64();
        if let Some(bar) = obs.bar.take() {
            bar.finish_and_clear();
        }

        let mut failure: Option<anyhow::Error> = None;
        let status = match result {
            Ok(outcome) => {
                let spiked = obs.records.last().is_some_and(|r| r.spiked);
                if obs.last_snapshot != Some(progress.step) {
                    obs.snapshot(&trainer, &state, progress.step, spiked)
                        .map_err(anyhow::Error::msg)?;
                }
                if obs.last_frame != Some(progress.step) {
                    obs.frame(&trainer, &state, progress.step, spiked)
                        .map_err(anyhow::Error::msg)?;
                }
                parts.save(
                    &trainer,
                    &state,
                    &progress,
                    &out.join("checkpoint.safetensors"),
                )?;
                match outcome.reason {
                    StopReason::Steps => "completed",
                    StopReason::MaxSpikes => "max_spikes",
                    StopReason::Interrupted => "interrupted",
                }
            }
            Err(e) => {
                let status = if let TrainError::NonFiniteLoss { step, loss } = &e {
                    obs.record(LossRecord {
                        step: *step,
                        loss: *loss,
                        spiked: false,
                        spikes: progress.spikes,
                    })
                    .map_err(anyhow::Error::msg)?;
                    "diverged"
                } else {
                    "failed"
                };
                let kept = match obs.last_checkpoint {
                    Some(s) => format!(
                        "the last good checkpoint (step {s}) is kept in {}",
                        out.join("checkpoint.safetensors").display()
                    ),
                    None => format!(
                        "no checkpoint was written yet (output.checkpoint_every is {})",
                        self.cfg.output.checkpoint_every
                    ),
                };
                failure = Some(anyhow::Error::new(e).context(format!(
                    "training stopped; loss.csv, loss.png and summary.json are written and {kept}"
                )));
                status
            }
        };
        obs.csv.flush().context("cannot write loss.csv")?;

        // Plots and summary are written even after a failure: that is when they matter.
        let mut late_errors = Vec::new();
        let regrowth = if failure.is_none() {
            match score::run(&mut trainer, &self.target, eval_cfg, seed, clamp, true) {
                Ok(r) => Some(r),
                Err(e) => {
                    late_errors.push(e);
                    None
                }
            }
        } else {
            None
        };
        let mut regrown_tile = None;
        if let Some(r) = &regrowth {
            psnr_rows.push((progress.step, r.score.mean_psnr_db, r.score.mean_mse));
            let frame_ms = self.cfg.output.gif_frame_ms;
            let half = (scale / 2).max(1);
            let pictures =
                score::write_picture(r, &self.target, v, scale, &out.join("regrowth.png"))
                    .and_then(|()| {
                        score::write_gif(
                            r,
                            &self.target,
                            v,
                            half,
                            frame_ms,
                            &out.join("regrowth.gif"),
                        )
                    });
            if let Err(e) = pictures {
                late_errors.push(e);
            }
            if let Some((_, last)) = r.frames.last() {
                match render::tile(last, 0, v, scale) {
                    Ok(t) => {
                        regrown_tile =
                            Some((format!("regrown · {:.1} dB", r.score.mean_psnr_db), t))
                    }
                    Err(e) => late_errors.push(e),
                }
            }
        }
        if !psnr_rows.is_empty() && (eval_cfg.every.is_some() || psnr_rows.len() > 1) {
            if let Err(e) = score::write_csv(&out.join("psnr.csv"), &psnr_rows) {
                late_errors.push(e);
            }
            let pts: Vec<(u64, f64)> = psnr_rows.iter().map(|r| (r.0, r.1)).collect();
            if let Err(e) = plot::plot_psnr(&out.join("psnr.png"), &pts) {
                late_errors.push(e);
            }
        }
        let eps = self.nca.noise.epsilon;
        if let Err(e) = plot::plot_loss(&out.join("loss.png"), &obs.records, eps) {
            late_errors.push(e);
        }
        let frame_ms = self.cfg.output.gif_frame_ms;
        if let Err(e) = render::gif_from_dir(&frame_dir, &out.join("trajectory.gif"), frame_ms) {
            late_errors.push(e);
        }
        let spiked: Vec<u64> = obs
            .records
            .iter()
            .filter(|r| r.spiked)
            .map(|r| r.step)
            .collect();
        let sheet = SheetParts {
            target: &self.target,
            visible: v,
            scale,
            spiked: &spiked,
            regrown: regrown_tile,
        };
        if let Err(e) = write_contact_sheet(out, &snap_dir, self.nca, sheet) {
            late_errors.push(e);
        }
        let steps_run = progress.step.saturating_sub(start_step);
        let final_loss = obs.records.last().map(|r| r.loss).filter(|l| l.is_finite());
        let summary = Summary {
            backend: backend.name().into(),
            status: status.into(),
            error: failure.as_ref().map(|e| format!("{e:#}")),
            config: self.args.config.display().to_string(),
            resumed_from_step: resume_step,
            steps_run,
            final_step: progress.step,
            spikes: progress.spikes,
            final_loss,
            epsilon: eps,
            first_step_below_epsilon: progress.first_below_epsilon,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            train_seconds,
            steps_per_second: if train_seconds > 0.0 {
                steps_run as f64 / train_seconds
            } else {
                0.0
            },
            regrowth: regrowth.map(|r| r.score),
        };
        files::write_json(&out.join("summary.json"), &summary)?;
        if let Some(e) = failure {
            for late in &late_errors {
                tracing::error!("{late:#}");
            }
            return Err(e);
        }
        if let Some(e) = late_errors.into_iter().next() {
            return Err(e);
        }
        report(&summary, out);
        Ok(if status == "interrupted" {
            Finish::Interrupted
        } else {
            Finish::Completed
        })
    }
}

fn report(s: &Summary, out: &Path) {
    let loss = s
        .final_loss
        .map_or_else(|| "n/a".into(), |l| format!("{l:.3e}"));
    let first = s
        .first_step_below_epsilon
        .map_or_else(|| "never".into(), |f| format!("step {f}"));
    println!(
        "{}: {} steps on {} ({:.0} steps/s), final loss {loss}, first below ε {first}, \
         {} spikes",
        s.status, s.final_step, s.backend, s.steps_per_second, s.spikes
    );
    if let Some(r) = &s.regrowth {
        println!("{}", score::line(r));
    }
    println!(
        "results in {} (regrowth.png, contact_sheet.png, trajectory.gif, summary.json)",
        out.display()
    );
}

fn progress_bar(total: u64, start: u64) -> ProgressBar {
    let bar = ProgressBar::new(total).with_position(start);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} step {pos}/{len}  {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// What the contact sheet shows besides the snapshots.
struct SheetParts<'a> {
    target: &'a HostTensor,
    visible: usize,
    scale: u32,
    /// Steps after which the state was spiked; their snapshots are labelled so.
    spiked: &'a [u64],
    /// The final rule's regrowth from fresh noise, labelled with its score.
    regrown: Option<(String, image::RgbImage)>,
}

/// A grid of up to ten snapshots (first batch element), the regrowth and the target, each
/// labelled.
fn write_contact_sheet(
    out: &Path,
    snap_dir: &Path,
    nca: &NcaConfig,
    parts: SheetParts<'_>,
) -> Result<()> {
    let scale = parts.scale;
    let (tw, th) = (
        nca.grid.width as u32 * scale,
        nca.grid.height as u32 * scale,
    );
    let mut tiles = Vec::new();
    for (step, path) in render::thin(&render::list_steps(snap_dir)?, 10) {
        let img = image::open(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .to_rgb8();
        if img.width() < tw || img.height() < th {
            continue;
        }
        let tile = image::imageops::crop_imm(&img, 0, 0, tw, th).to_image();
        let label = if parts.spiked.binary_search(&step).is_ok() {
            format!("step {step} (pre-spike)")
        } else {
            format!("step {step}")
        };
        tiles.push((label, tile));
    }
    if tiles.is_empty() {
        return Ok(());
    }
    if let Some(r) = parts.regrown {
        tiles.push(r);
    }
    tiles.push((
        "target".into(),
        render::tile(parts.target, 0, parts.visible, scale)?,
    ));
    let sheet = render::contact_sheet(&tiles, 6)?;
    render::save_png(&sheet, &out.join("contact_sheet.png"))
}

/// Watches the loop: CSV rows, snapshots, checkpoints, progress, Ctrl-C.
struct RunObserver<'a> {
    parts: &'a CheckpointParts<'a>,
    out: &'a Path,
    snap_dir: &'a Path,
    frame_dir: &'a Path,
    target: &'a HostTensor,
    visible: usize,
    scale: u32,
    snapshot_every: u64,
    frame_every: u64,
    checkpoint_every: u64,
    total: u64,
    csv: BufWriter<File>,
    records: Vec<LossRecord>,
    last_snapshot: Option<u64>,
    last_frame: Option<u64>,
    last_checkpoint: Option<u64>,
    run_seed: u64,
    sigma_large: f32,
    interrupt: &'a AtomicBool,
    bar: Option<ProgressBar>,
    last_log: (Instant, u64),
}

impl RunObserver<'_> {
    fn record(&mut self, r: LossRecord) -> Result<(), String> {
        writeln!(self.csv, "{}", r.csv()).map_err(|e| format!("cannot write loss.csv: {e}"))?;
        self.records.push(r);
        Ok(())
    }

    /// The picture of the state after `step`. A state just spiked is shown as it was
    /// before the spike: the spike is simulated noise, not the rule's work, and late in a
    /// run nearly every step spikes. The noise is counter-based, so subtracting the same
    /// draw undoes it (up to rounding, and the ±state_clamp clamp on values a picture shows
    /// as 0 or 1 anyway).
    fn picture<T: Trainer>(
        &self,
        t: &T,
        state: &T::State,
        step: u64,
        spiked: bool,
    ) -> Result<image::RgbImage, String> {
        let mut host = t.download(state).map_err(|e| e.to_string())?;
        if spiked {
            let seed = stream_seed(self.run_seed, step, Stream::Spike);
            add_gaussian(host.data_mut(), -self.sigma_large, seed);
        }
        render::snapshot(&host, Some(self.target), self.visible, self.scale)
            .map_err(|e| format!("{e:#}"))
    }

    fn snapshot<T: Trainer>(
        &mut self,
        t: &T,
        state: &T::State,
        step: u64,
        spiked: bool,
    ) -> Result<(), String> {
        let img = self.picture(t, state, step, spiked)?;
        render::save_png(&img, &render::step_path(self.snap_dir, step))
            .map_err(|e| format!("{e:#}"))?;
        self.last_snapshot = Some(step);
        if step == 0 {
            self.frame(t, state, step, spiked)?;
        }
        Ok(())
    }

    fn frame<T: Trainer>(
        &mut self,
        t: &T,
        state: &T::State,
        step: u64,
        spiked: bool,
    ) -> Result<(), String> {
        let img = self.picture(t, state, step, spiked)?;
        render::save_png(&img, &render::step_path(self.frame_dir, step))
            .map_err(|e| format!("{e:#}"))?;
        self.last_frame = Some(step);
        Ok(())
    }
}

impl<T: Trainer> Observer<T> for RunObserver<'_> {
    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, String> {
        let info = ctx.info;
        self.record(LossRecord {
            step: info.step,
            loss: info.loss,
            spiked: info.spiked,
            spikes: info.spikes,
        })?;
        if info.step % self.frame_every == 0 {
            self.frame(ctx.trainer, ctx.state, info.step, info.spiked)?;
        }
        if info.step % self.snapshot_every == 0 {
            self.snapshot(ctx.trainer, ctx.state, info.step, info.spiked)?;
            self.csv
                .flush()
                .map_err(|e| format!("cannot write loss.csv: {e}"))?;
        }
        if info.step % self.checkpoint_every == 0 {
            let path = self.out.join("checkpoint.safetensors");
            self.parts
                .save(ctx.trainer, ctx.state, ctx.progress, &path)
                .map_err(|e| format!("{e:#}"))?;
            self.last_checkpoint = Some(info.step);
        }
        if let Some(bar) = &self.bar {
            bar.set_position(info.step);
            if info.step % 10 == 0 || info.spiked {
                let (t0, s0) = self.last_log;
                let rate = (info.step - s0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {:.3e}  spikes {}  {rate:.0} steps/s",
                    info.loss, info.spikes
                ));
            }
        } else if info.step % self.snapshot_every == 0 {
            let (t0, s0) = self.last_log;
            let rate = (info.step - s0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            tracing::info!(
                "step {}/{} loss {:.4e} spikes {} ({rate:.0} steps/s)",
                info.step,
                self.total,
                info.loss,
                info.spikes
            );
            self.last_log = (Instant::now(), info.step);
        }
        if self.interrupt.load(Ordering::SeqCst) {
            if let Some(bar) = &self.bar {
                bar.println(format!("interrupted: stopping after step {}", info.step));
            } else {
                tracing::warn!("interrupted: stopping after step {}", info.step);
            }
            return Ok(ControlFlow::Break(()));
        }
        Ok(ControlFlow::Continue(()))
    }
}
