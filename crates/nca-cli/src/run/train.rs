//! Phase 3, train: the loop with its observer (loss rows, snapshots, frames, checkpoints,
//! progress, Ctrl-C), ending in a typed [`Status`]; the first failure is kept, not
//! stringified.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use nca_api::noise::{add_gaussian, stream_seed, Stream};
use nca_api::{
    ConstantNoise, HostTensor, LoopOptions, Observer, Progress, StepContext, StopReason,
    TrainError, Trainer,
};

use super::artefacts;
use super::dir::RunDir;
use super::plan::Plan;
use super::{Failures, Finish, Status, Summary, TrainArgs};
use crate::backend::{Backend, Job};
use crate::files::{self, CheckpointParts};
use crate::plot::{self, LossRecord};
use crate::render;
use crate::score;

/// A planned run, waiting for its trainer.
pub(super) struct TrainJob<'a> {
    /// The command line.
    pub args: &'a TrainArgs,
    /// The validated plan.
    pub plan: &'a Plan,
    /// When the command started.
    pub started: Instant,
}

/// What training left behind for the later phases.
pub(super) struct Trained {
    /// How it ended.
    pub status: Status,
    /// Steps and spikes at the end.
    pub progress: Progress,
    /// The step it started from.
    pub start_step: u64,
    /// Every `loss.csv` row, history included.
    pub records: Vec<LossRecord>,
    /// `psnr.csv` rows so far.
    pub psnr_rows: Vec<super::plan::PsnrRow>,
    /// Seconds in the loop.
    pub train_seconds: f64,
    /// Whether every row reached `loss.csv`.
    pub loss_csv_complete: bool,
    /// Step of the checkpoint this run wrote last into the run directory (or found there
    /// when resuming in place).
    pub last_checkpoint: Option<u64>,
}

impl Job for TrainJob<'_> {
    type Output = Finish;

    fn run<T: Trainer>(self, mut trainer: T, backend: Backend) -> Result<Finish> {
        let plan = self.plan;
        let dir = RunDir::open(plan, self.args.force)?;
        let mut failures = Failures::default();
        let trained = train(
            &mut trainer,
            backend,
            plan,
            &dir.path,
            self.args,
            &mut failures,
        )?;
        let (regrowth, mut written) =
            artefacts::write(&mut trainer, plan, &dir.path, &trained, &mut failures);
        if trained.loss_csv_complete {
            written.insert(0, "loss.csv");
        }

        let progress = &trained.progress;
        let steps_run = progress.step.saturating_sub(trained.start_step);
        let train_seconds = trained.train_seconds;
        let summary = Summary {
            backend: backend.name().into(),
            status: trained.status,
            error: failures.describe(),
            config: plan.config_path.display().to_string(),
            resumed_from_step: plan.resume.as_ref().map(|r| r.step()),
            steps_run,
            final_step: progress.step,
            spikes: progress.spikes,
            final_loss: trained
                .records
                .last()
                .map(|r| r.loss)
                .filter(|l| l.is_finite()),
            epsilon: plan.nca.noise.epsilon,
            first_step_below_epsilon: progress.first_below_epsilon,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            train_seconds,
            steps_per_second: if train_seconds > 0.0 {
                steps_run as f64 / train_seconds
            } else {
                0.0
            },
            regrowth,
        };
        if failures
            .keep(files::write_json(&dir.path.join("summary.json"), &summary))
            .is_some()
        {
            written.push("summary.json");
        }
        let aftermath = aftermath(plan, &dir.path, &trained, &written);
        failures.into_result(aftermath)?;
        report(&summary, &dir.path);
        Ok(if trained.status == Status::Interrupted {
            Finish::Interrupted
        } else {
            Finish::Completed
        })
    }
}

/// What is on disk after a failed run, said only where it was checked: which checkpoint
/// the directory holds (read back from the file) and which results were written.
fn aftermath(plan: &Plan, out: &Path, trained: &Trained, written: &[&str]) -> String {
    let ckpt_path = out.join("checkpoint.safetensors");
    let kept = match nca_api::Checkpoint::load(&ckpt_path) {
        Ok(c) if trained.last_checkpoint == Some(c.progress.step) => format!(
            "the last good checkpoint (step {}) is kept in {}",
            c.progress.step,
            ckpt_path.display()
        ),
        Ok(c) => format!(
            "{} holds a checkpoint of step {}",
            ckpt_path.display(),
            c.progress.step
        ),
        Err(_) => match (&plan.resume, plan.in_place) {
            (Some(r), false) => format!(
                "no checkpoint was written to {}; the one this run resumed from (step {}) is \
                 unchanged in {}",
                out.display(),
                r.step(),
                r.path.display()
            ),
            _ => format!(
                "no checkpoint was written to {} (output.checkpoint_every is {})",
                out.display(),
                plan.cfg.output.checkpoint_every
            ),
        },
    };
    let written = if written.is_empty() {
        "no other results were written".to_string()
    } else {
        format!("written in {}: {}", out.display(), written.join(", "))
    };
    format!(
        "{} at step {}: {kept}; {written}",
        trained.status, trained.progress.step
    )
}

/// Sets up the trainer and the run directory's first files, runs the loop, and writes the
/// final snapshot, frame and checkpoint. Failures before the loop return at once (nothing
/// to save yet); failures from the loop on are kept in `failures`, first first.
fn train<T: Trainer>(
    trainer: &mut T,
    backend: Backend,
    plan: &Plan,
    out: &Path,
    args: &TrainArgs,
    failures: &mut Failures,
) -> Result<Trained> {
    let nca = &plan.nca;
    let cfg = &plan.cfg;
    let snap_dir = out.join("snapshots");
    let frame_dir = out.join("frames");
    for dir in [&snap_dir, &frame_dir] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    files::write_atomically(&out.join("config.ron"), plan.run_ron.as_bytes())?;
    let v = nca.model.visible_channels;
    let scale = cfg.output.scale;
    let target_png = render::tile(&plan.target, 0, v, scale)?;
    files::write_artefact(&out.join("target.png"), |tmp| {
        render::save_png(&target_png, tmp)
    })?;

    let (mut state, mut progress) = match &plan.resume {
        None => (
            nca_api::start(trainer, nca, &plan.target)?,
            Progress::default(),
        ),
        Some(r) => {
            let ckpt = &r.ckpt;
            trainer.set_weights(&ckpt.weights)?;
            match &ckpt.adam {
                Some(adam) => trainer.set_adam_state(adam)?,
                None => tracing::warn!("checkpoint has no Adam state: moments start at 0"),
            }
            trainer.set_target(&plan.target)?;
            let host = match &ckpt.state {
                Some(s) => s.clone(),
                None => {
                    tracing::warn!("checkpoint has no state: starting from fresh noise");
                    nca_api::initial_state(nca)
                }
            };
            (trainer.upload(&host)?, ckpt.progress.clone())
        }
    };

    let csv_path = out.join("loss.csv");
    files::write_atomically(&csv_path, plot::csv_text(&plan.history).as_bytes())?;
    let csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .with_context(|| format!("cannot open {}", csv_path.display()))?;
    let parts = CheckpointParts {
        config: nca,
        backend: backend.name(),
        target: &plan.target,
        run_ron: &plan.run_ron,
    };
    let start_step = progress.step;
    let total = nca.training.steps;
    let mut obs = RunObserver {
        parts: &parts,
        checkpoint_path: out.join("checkpoint.safetensors"),
        csv_path: csv_path.clone(),
        snap_dir: &snap_dir,
        frame_dir: &frame_dir,
        target: &plan.target,
        visible: v,
        scale,
        snapshot_every: cfg.output.snapshot_every,
        frame_every: total.div_ceil(cfg.output.gif_frames).max(1),
        checkpoint_every: cfg.output.checkpoint_every,
        total,
        csv: BufWriter::new(csv),
        records: plan.history.clone(),
        last_snapshot: None,
        last_frame: None,
        last_checkpoint: plan
            .resume
            .as_ref()
            .filter(|_| plan.in_place)
            .map(|r| r.step()),
        run_seed: nca.training.seed,
        sigma_large: nca.noise.sigma_large,
        interrupt: &args.interrupt,
        bar: None,
        last_log: (Instant::now(), start_step),
        csv_ok: true,
        error: None,
    };
    if plan.resume.is_none() {
        obs.snapshot(trainer, &state, 0, false)?;
    }
    if args.progress_bar {
        obs.bar = Some(progress_bar(total, start_step));
    } else {
        tracing::info!(
            "training {} steps on {} ({}) into {}",
            total - start_step,
            backend.name(),
            crate::bench::describe_model(&nca.model),
            out.display()
        );
    }

    let train_started = Instant::now();
    let schedule = ConstantNoise::from(&nca.noise);
    let options = LoopOptions::from_config(nca);
    let eval_cfg = &cfg.evaluation;
    let (seed, clamp) = (nca.training.seed, nca.model.state_clamp);
    let mut psnr_rows = plan.psnr_history.clone();
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
            trainer,
            &mut state,
            &schedule,
            &chunk,
            &mut progress,
            &mut obs,
        );
        match r {
            Ok(outcome) if outcome.reason == StopReason::Steps && progress.step < total => {
                match score::run(trainer, &plan.target, eval_cfg, seed, clamp, false) {
                    Ok(reg) => {
                        let msg = format!("step {}: {}", progress.step, score::line(&reg.score));
                        match &obs.bar {
                            Some(bar) => bar.println(msg),
                            None => tracing::info!("{msg}"),
                        }
                        psnr_rows.push((progress.step, reg.score.mean_psnr_db, reg.score.mean_mse));
                    }
                    Err(e) => break Err(LoopEnd::Score(e)),
                }
            }
            Ok(outcome) => break Ok(outcome.reason),
            Err(e) => break Err(LoopEnd::Train(e)),
        }
    };
    let train_seconds = train_started.elapsed().as_secs_f64();
    if let Some(bar) = obs.bar.take() {
        bar.finish_and_clear();
    }

    let status = match result {
        Ok(reason) => {
            let spiked = obs.records.last().is_some_and(|r| r.spiked);
            let step = progress.step;
            let mut end = || -> Result<()> {
                if obs.last_snapshot != Some(step) {
                    obs.snapshot(trainer, &state, step, spiked)?;
                }
                if obs.last_frame != Some(step) {
                    obs.frame(trainer, &state, step, spiked)?;
                }
                if obs.last_checkpoint != Some(step) {
                    obs.checkpoint(trainer, &state, &progress)?;
                }
                Ok(())
            };
            match end() {
                Ok(()) => match reason {
                    StopReason::Steps => Status::Completed,
                    StopReason::MaxSpikes => Status::MaxSpikes,
                    StopReason::Interrupted => Status::Interrupted,
                },
                Err(e) => {
                    let status = status_of(&e);
                    failures.push(e.context(format!("after step {step}")));
                    status
                }
            }
        }
        Err(LoopEnd::Train(TrainError::NonFiniteLoss { step, loss })) => {
            failures.push(anyhow!(TrainError::<T::Error>::NonFiniteLoss {
                step,
                loss
            }));
            // The bad row is history too: it shows where and how the run diverged.
            let row = LossRecord {
                step,
                loss,
                spiked: false,
                spikes: progress.spikes,
            };
            failures.keep(obs.record(row));
            Status::Diverged
        }
        Err(LoopEnd::Train(TrainError::Observer { step, message })) => {
            let cause = obs.error.take().unwrap_or_else(|| anyhow!(message));
            let status = status_of(&cause);
            failures.push(cause.context(format!("training stopped at step {step}")));
            status
        }
        Err(LoopEnd::Train(TrainError::Backend { step, source })) => {
            failures.push(anyhow::Error::new(source).context(format!(
                "training stopped at step {step}: the {} backend failed",
                backend.name()
            )));
            Status::Failed
        }
        Err(LoopEnd::Train(other)) => {
            failures.push(anyhow::Error::new(other).context("training stopped"));
            Status::Failed
        }
        Err(LoopEnd::Score(e)) => {
            failures.push(e.context(format!(
                "training stopped at step {}: the regrowth score failed",
                progress.step
            )));
            Status::Failed
        }
    };
    let loss_csv_complete = failures.keep(obs.flush_csv()).is_some() && obs.csv_ok;
    Ok(Trained {
        loss_csv_complete,
        status,
        progress,
        start_step,
        records: obs.records,
        psnr_rows,
        train_seconds,
        last_checkpoint: obs.last_checkpoint,
    })
}

/// The weights, Adam's moments or the state hold NaN or infinity at a checkpoint although
/// the loss was still finite: the run has diverged, and that checkpoint is not written.
#[derive(Debug)]
struct NonFiniteCheckpoint {
    step: u64,
    tensor: String,
}

impl std::fmt::Display for NonFiniteCheckpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tensor `{}` holds NaN or infinite values at step {} although the loss is still \
             finite, so the run has diverged and the checkpoint of that step is not written; \
             try a lower learning rate, a state clamp (model.state_clamp) or gradient \
             clipping (training.grad_clip)",
            self.tensor, self.step
        )
    }
}

impl std::error::Error for NonFiniteCheckpoint {}

/// `Diverged` when `e` is a non-finite checkpoint, else `Failed`.
fn status_of(e: &anyhow::Error) -> Status {
    if e.downcast_ref::<NonFiniteCheckpoint>().is_some() {
        Status::Diverged
    } else {
        Status::Failed
    }
}

/// Why the training loop ended early.
enum LoopEnd<E: std::error::Error + 'static> {
    /// The loop itself failed (divergence, backend, observer).
    Train(TrainError<E>),
    /// Scoring between chunks (`evaluation.every`) failed.
    Score(anyhow::Error),
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

/// Watches the loop: CSV rows, snapshots, checkpoints, progress, Ctrl-C.
struct RunObserver<'a> {
    parts: &'a CheckpointParts<'a>,
    checkpoint_path: PathBuf,
    csv_path: PathBuf,
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
    /// Whether every row written so far reached the file.
    csv_ok: bool,
    /// The error that made `on_step` fail, kept whole (the loop only carries a string).
    error: Option<anyhow::Error>,
}

impl RunObserver<'_> {
    fn record(&mut self, r: LossRecord) -> Result<()> {
        let written = writeln!(self.csv, "{}", r.csv());
        self.records.push(r);
        self.csv_ok &= written.is_ok();
        written.with_context(|| format!("cannot write {}", self.csv_path.display()))
    }

    fn flush_csv(&mut self) -> Result<()> {
        let flushed = self.csv.flush();
        self.csv_ok &= flushed.is_ok();
        flushed.with_context(|| format!("cannot write {}", self.csv_path.display()))
    }

    /// Writes the checkpoint of `progress`, after the loss rows up to its step are on disk
    /// (so a run killed right after it resumes without a gap in `loss.csv`). A checkpoint
    /// holding NaN or inf anywhere is not written (the previous one stays the kept one) and
    /// ends the run as diverged.
    fn checkpoint<T: Trainer>(
        &mut self,
        t: &T,
        state: &T::State,
        progress: &Progress,
    ) -> Result<()> {
        self.flush_csv()?;
        let ckpt = self.parts.capture(t, state, progress)?;
        if let Some(tensor) = ckpt.first_non_finite() {
            return Err(NonFiniteCheckpoint {
                step: progress.step,
                tensor,
            }
            .into());
        }
        self.parts.write(&ckpt, &self.checkpoint_path)?;
        self.last_checkpoint = Some(progress.step);
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
    ) -> Result<image::RgbImage> {
        let mut host = t.download(state)?;
        if spiked {
            let seed = stream_seed(self.run_seed, step, Stream::Spike);
            add_gaussian(host.data_mut(), -self.sigma_large, seed);
        }
        render::snapshot(&host, Some(self.target), self.visible, self.scale)
    }

    /// Writes the picture of `step` as `dir/STEP.png` (a snapshot or a GIF frame).
    fn save_step_picture<T: Trainer>(
        &self,
        dir: &Path,
        t: &T,
        state: &T::State,
        step: u64,
        spiked: bool,
    ) -> Result<()> {
        let img = self.picture(t, state, step, spiked)?;
        let path = render::step_path(dir, step);
        files::write_artefact(&path, |tmp| render::save_png(&img, tmp)).map(|_| ())
    }

    fn snapshot<T: Trainer>(
        &mut self,
        t: &T,
        state: &T::State,
        step: u64,
        spiked: bool,
    ) -> Result<()> {
        self.save_step_picture(self.snap_dir, t, state, step, spiked)?;
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
    ) -> Result<()> {
        self.save_step_picture(self.frame_dir, t, state, step, spiked)?;
        self.last_frame = Some(step);
        Ok(())
    }

    fn step<T: Trainer>(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>> {
        let info = ctx.info;
        self.record(LossRecord {
            step: info.step,
            loss: info.loss,
            spiked: info.spiked,
            spikes: info.spikes,
        })?;
        if info.step.is_multiple_of(self.frame_every) {
            self.frame(ctx.trainer, ctx.state, info.step, info.spiked)?;
        }
        if info.step.is_multiple_of(self.snapshot_every) {
            self.snapshot(ctx.trainer, ctx.state, info.step, info.spiked)?;
            self.flush_csv()?;
        }
        if info.step.is_multiple_of(self.checkpoint_every) {
            self.checkpoint(ctx.trainer, ctx.state, ctx.progress)?;
        }
        if let Some(bar) = &self.bar {
            bar.set_position(info.step);
            if info.step.is_multiple_of(10) || info.spiked {
                let (t0, s0) = self.last_log;
                let rate = (info.step - s0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                bar.set_message(format!(
                    "loss {:.3e}  spikes {}  {rate:.0} steps/s",
                    info.loss, info.spikes
                ));
            }
        } else if info.step.is_multiple_of(self.snapshot_every) {
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

impl<T: Trainer> Observer<T> for RunObserver<'_> {
    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, String> {
        self.step(ctx).map_err(|e| {
            let message = format!("{e:#}");
            self.error = Some(e);
            message
        })
    }
}
