//! Phase 3, train: the loop with its observer (loss rows, snapshots, frames, checkpoints,
//! events), ending in a typed [`Status`]; the first failure is kept, not stringified.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use nca_api::noise::{add_gaussian, stream_seed, Stream};
use nca_api::{
    Checkpoint, ConstantNoise, Evaluation, HostTensor, LoopOptions, Observer, Progress,
    StepContext, StopReason, TrainError, Trainer,
};

use super::artefacts;
use super::dir::RunDir;
use super::kept::Kept;
use super::plan::Plan;
use super::{Failures, RunResult, Status, Summary, TrainRequest};
use crate::backend::{Backend, Job};
use crate::config::EvaluationConfig;
use crate::error::{BackendResult, Error, Result, ResultExt};
use crate::events::{Event, Events, Started};
use crate::files::{self, CheckpointParts};
use crate::plot::{self, LossRecord};
use crate::render;
use crate::score;

/// A planned run, waiting for its trainer.
pub(super) struct TrainJob<'a> {
    /// What was asked.
    pub request: &'a TrainRequest,
    /// The validated plan.
    pub plan: &'a Plan,
    /// When the command started.
    pub started: Instant,
    /// Who watches.
    pub events: &'a mut dyn Events,
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
    /// Seconds of those spent scoring the rule (`evaluation.every`).
    pub evaluation_seconds: f64,
    /// The step after which a score reached `training.stop_at_psnr`.
    pub reached_psnr_at_step: Option<u64>,
    /// The spike threshold the loop used.
    pub epsilon: f32,
    /// Whether every row reached `loss.csv`.
    pub loss_csv_complete: bool,
    /// Step of the checkpoint this run wrote last into the run directory (or found there
    /// when resuming in place).
    pub last_checkpoint: Option<u64>,
    /// The checkpoint of the last step, in memory (`None` when the run failed before it).
    pub checkpoint: Option<Checkpoint>,
    /// The best-scoring weights of the periodic scores (`evaluation.keep_best`), the
    /// resumed run's included.
    pub kept: Option<Kept>,
}

impl Job for TrainJob<'_> {
    type Output = RunResult;

    fn run<T: Trainer>(self, mut trainer: T, backend: Backend) -> Result<RunResult> {
        let plan = self.plan;
        let dir = match &plan.out {
            Some(path) => Some(RunDir::open(plan, path, self.request.force)?),
            None => None,
        };
        let out = dir.as_ref().map(|d| d.path.as_path());
        let mut failures = Failures::default();
        let trained = train(&mut trainer, backend, plan, out, self.events, &mut failures)?;
        let (scored, mut written) =
            artefacts::write(&mut trainer, plan, out, &trained, &mut failures);
        let regrowth = scored.regrowth;
        if trained.loss_csv_complete && out.is_some() {
            written.insert(0, "loss.csv");
        }

        let progress = &trained.progress;
        let steps_run = progress.step.saturating_sub(trained.start_step);
        let train_seconds = trained.train_seconds;
        let summary = Summary {
            backend: backend.name().into(),
            status: trained.status,
            error: failures.describe(),
            config: plan.origin.clone(),
            resumed_from_step: plan.resume.as_ref().map(|r| r.step()),
            steps_run,
            final_step: progress.step,
            spikes: progress.spikes,
            final_loss: trained
                .records
                .last()
                .map(|r| r.loss)
                .filter(|l| l.is_finite()),
            epsilon: trained.epsilon,
            first_step_below_epsilon: progress.first_below_epsilon,
            wall_seconds: self.started.elapsed().as_secs_f64(),
            train_seconds,
            steps_per_second: if train_seconds > 0.0 {
                steps_run as f64 / train_seconds
            } else {
                0.0
            },
            evaluation_seconds: trained.evaluation_seconds,
            stop_at_psnr: plan.nca.training.stop_at_psnr,
            reached_psnr_at_step: trained.reached_psnr_at_step,
            kept_step: scored.kept.as_ref().map(|k| k.step),
            regrowth,
        };
        if let Some(out) = out {
            if failures
                .keep(files::write_json(&out.join("summary.json"), &summary))
                .is_some()
            {
                written.push("summary.json");
            }
            let aftermath = aftermath(plan, out, &trained, &written);
            failures.into_result(aftermath)?;
        } else {
            failures.into_result(format!(
                "{} at step {}; nothing was written to disk",
                trained.status, trained.progress.step
            ))?;
        }
        let mut psnr = trained.psnr_rows.clone();
        psnr.extend(scored.final_row);
        let checkpoint = trained
            .checkpoint
            .ok_or_else(|| Error::Diverged("the run ended without a checkpoint".into()))?;
        Ok(RunResult {
            status: trained.status,
            summary,
            losses: trained.records,
            psnr,
            checkpoint,
            kept: scored.kept.map(|k| k.checkpoint),
            out: out.map(Path::to_path_buf),
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

/// The run directory's files the observer writes as it goes.
struct RunFiles {
    /// The run directory.
    dir: PathBuf,
    checkpoint: PathBuf,
    csv_path: PathBuf,
    csv: BufWriter<File>,
    snapshots: PathBuf,
    frames: PathBuf,
}

/// Sets up the trainer and the run directory's first files, runs the loop, and writes the
/// final snapshot, frame and checkpoint. Failures before the loop return at once (nothing
/// to save yet); failures from the loop on are kept in `failures`, first first.
fn train<T: Trainer>(
    trainer: &mut T,
    backend: Backend,
    plan: &Plan,
    out: Option<&Path>,
    events: &mut dyn Events,
    failures: &mut Failures,
) -> Result<Trained> {
    let nca = &plan.nca;
    let cfg = &plan.cfg;
    let v = nca.model.visible_channels;
    let scale = cfg.output.scale;
    let (mut state, mut progress) = match &plan.resume {
        None => (
            nca_api::start(trainer, nca, &plan.target).backend()?,
            Progress::default(),
        ),
        Some(r) => r.ckpt.resume(trainer, nca, &plan.target).backend()?,
    };
    let files = match out {
        Some(out) => Some(open_run_files(plan, out)?),
        None => None,
    };
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
        files,
        target: &plan.target,
        visible: v,
        scale,
        snapshot_every: cfg.output.snapshot_every,
        frame_every: total.div_ceil(cfg.output.gif_frames).max(1),
        checkpoint_every: cfg.output.checkpoint_every,
        records: plan.history.clone(),
        last_snapshot: None,
        last_frame: None,
        last_checkpoint: plan
            .resume
            .as_ref()
            .filter(|_| plan.in_place)
            .map(|r| r.step()),
        run_seed: nca.training.seed,
        state_clamp: nca.model.state_clamp,
        evaluation: &cfg.evaluation,
        psnr_rows: plan.psnr_history.clone(),
        progress: progress.clone(),
        kept: plan.earlier_kept.clone(),
        evaluation_seconds: 0.0,
        reset_before: None,
        last_spike: None,
        events,
        csv_ok: true,
    };
    if plan.resume.is_none() && obs.files.is_some() {
        let shown = trainer.download(&state).backend()?;
        obs.snapshot(&shown, 0)?;
    }
    let started = Started {
        backend: backend.name(),
        out: out.map(Path::to_path_buf),
        start_step,
        total_steps: total,
        model: nca.model.clone(),
        grid: (nca.grid.height, nca.grid.width),
        chosen: plan.chosen.clone(),
        log_every: cfg.output.snapshot_every,
    };
    // `Started` goes out either way, so the caller sees the run it stopped.
    let asked = obs.events.on_event(&Event::Started(&started)).is_break();
    let stop = asked || plan.stop_requested;

    let train_started = Instant::now();
    let epsilon = nca.training.spike.epsilon(&nca.noise, &plan.target);
    let schedule = ConstantNoise {
        epsilon,
        ..ConstantNoise::from(&nca.noise)
    };
    let options = LoopOptions {
        evaluate_every: cfg.evaluation.every,
        ..LoopOptions::from_config(nca)
    };
    let result = if stop {
        Ok(StopReason::Interrupted)
    } else {
        nca_api::train(
            trainer,
            &mut state,
            &schedule,
            &options,
            &mut progress,
            &mut obs,
        )
        .map(|outcome| outcome.reason)
    };
    let train_seconds = train_started.elapsed().as_secs_f64();

    let mut checkpoint = None;
    let mut reached_psnr_at_step = None;
    let status = match result {
        Ok(reason) => {
            let step = progress.step;
            let mut end = || -> Result<Checkpoint> {
                let shown = obs.shown_state(trainer, &state, step)?;
                if obs.last_snapshot != Some(step) {
                    obs.snapshot(&shown, step)?;
                }
                if obs.last_frame != Some(step) {
                    obs.frame(&shown, step)?;
                }
                let ckpt = obs.capture(trainer, &state, &progress)?;
                if obs.last_checkpoint != Some(step) {
                    obs.write_checkpoint(&ckpt, step)?;
                }
                Ok(ckpt)
            };
            match end() {
                Ok(ckpt) => {
                    checkpoint = Some(ckpt);
                    match reason {
                        StopReason::Steps => Status::Completed,
                        StopReason::MaxSpikes => Status::MaxSpikes,
                        StopReason::Interrupted => Status::Interrupted,
                        StopReason::ReachedPsnr { step } => {
                            reached_psnr_at_step = Some(step);
                            Status::ReachedPsnr
                        }
                    }
                }
                Err(e) => {
                    let status = status_of(&e);
                    failures.push(e.context(format!("after step {step}")));
                    status
                }
            }
        }
        Err(TrainError::NonFiniteLoss { step, loss }) => {
            failures.push(Error::from(TrainError::<T::Error>::NonFiniteLoss {
                step,
                loss,
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
        Err(TrainError::Observer { step, source }) => {
            let status = status_of(&source);
            failures.push(source.context(format!("training stopped at step {step}")));
            status
        }
        Err(TrainError::Backend { step, source }) => {
            failures.push(Error::backend(source).context(format!(
                "training stopped at step {step}: the {} backend failed",
                backend.name()
            )));
            Status::Failed
        }
        Err(other) => {
            failures.push(Error::backend(other).context("training stopped"));
            Status::Failed
        }
    };
    // With a moving average of the weights, the average is the run's rule: the final
    // score and its pictures are of it (the checkpoint keeps the training weights too).
    if let Some(average) = &progress.average {
        let loaded = trainer.set_weights(average).backend();
        failures.keep(loaded.context("loading the weights' moving average"));
    }
    let loss_csv_complete = failures.keep(obs.flush_csv()).is_some() && obs.csv_ok;
    Ok(Trained {
        loss_csv_complete,
        status,
        progress,
        start_step,
        records: obs.records,
        psnr_rows: obs.psnr_rows,
        train_seconds,
        evaluation_seconds: obs.evaluation_seconds,
        reached_psnr_at_step,
        epsilon,
        last_checkpoint: obs.last_checkpoint,
        checkpoint,
        kept: obs.kept,
    })
}

/// Creates the run directory's folders and first files (`config.ron`, `target.png`,
/// `loss.csv` with the resumed history) and opens `loss.csv` for appending.
fn open_run_files(plan: &Plan, out: &Path) -> Result<RunFiles> {
    let snapshots = out.join("snapshots");
    let frames = out.join("frames");
    for dir in [&snapshots, &frames] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    files::write_atomically(&out.join("config.ron"), plan.run_ron.as_bytes())?;
    let v = plan.nca.model.visible_channels;
    let target_png = render::tile(&plan.target, 0, v, plan.cfg.output.scale)?;
    files::write_artefact(&out.join("target.png"), |tmp| {
        render::save_png(&target_png, tmp)
    })?;
    let csv_path = out.join("loss.csv");
    files::write_atomically(&csv_path, plot::csv_text(&plan.history).as_bytes())?;
    let csv = std::fs::OpenOptions::new()
        .append(true)
        .open(&csv_path)
        .with_context(|| format!("cannot open {}", csv_path.display()))?;
    Ok(RunFiles {
        dir: out.to_path_buf(),
        checkpoint: out.join("checkpoint.safetensors"),
        csv_path,
        csv: BufWriter::new(csv),
        snapshots,
        frames,
    })
}

/// `Diverged` when `e` is a non-finite checkpoint, else `Failed`.
fn status_of(e: &Error) -> Status {
    if matches!(e.root(), Error::Diverged(_)) {
        Status::Diverged
    } else {
        Status::Failed
    }
}

/// Watches the loop: CSV rows, snapshots, checkpoints, events.
struct RunObserver<'a> {
    parts: &'a CheckpointParts<'a>,
    /// The run directory's files; `None` when nothing is written.
    files: Option<RunFiles>,
    target: &'a HostTensor,
    visible: usize,
    scale: u32,
    snapshot_every: u64,
    frame_every: u64,
    checkpoint_every: u64,
    records: Vec<LossRecord>,
    last_snapshot: Option<u64>,
    last_frame: Option<u64>,
    last_checkpoint: Option<u64>,
    run_seed: u64,
    state_clamp: Option<f32>,
    /// How the rule is scored during training.
    evaluation: &'a EvaluationConfig,
    /// `psnr.csv` rows so far, the resumed run's included.
    psnr_rows: Vec<super::plan::PsnrRow>,
    /// The loop's progress after the last step seen.
    progress: Progress,
    /// The best-scoring weights so far (`evaluation.keep_best`).
    kept: Option<Kept>,
    /// Seconds spent scoring during training.
    evaluation_seconds: f64,
    /// The step and state before its spike replaced the state with fresh noise, so the
    /// pictures of that step show what the rule made.
    reset_before: Option<(u64, HostTensor)>,
    /// The step of the last spike and the σ of the noise it added.
    last_spike: Option<(u64, f32)>,
    events: &'a mut dyn Events,
    /// Whether every row written so far reached the file.
    csv_ok: bool,
}

impl RunObserver<'_> {
    fn record(&mut self, r: LossRecord) -> Result<()> {
        self.records.push(r);
        let Some(f) = &mut self.files else {
            return Ok(());
        };
        let written = writeln!(f.csv, "{}", r.csv());
        self.csv_ok &= written.is_ok();
        written.with_context(|| format!("cannot write {}", f.csv_path.display()))
    }

    fn flush_csv(&mut self) -> Result<()> {
        let Some(f) = &mut self.files else {
            return Ok(());
        };
        let flushed = f.csv.flush();
        self.csv_ok &= flushed.is_ok();
        flushed.with_context(|| format!("cannot write {}", f.csv_path.display()))
    }

    /// The checkpoint of `progress`; one holding NaN or inf anywhere ends the run as
    /// diverged (the previous one on disk stays the kept one).
    fn capture<T: Trainer>(
        &self,
        t: &T,
        state: &T::State,
        progress: &Progress,
    ) -> Result<Checkpoint> {
        let ckpt = self.parts.capture(t, state, progress)?;
        if let Some(tensor) = ckpt.first_non_finite() {
            return Err(Error::Diverged(format!(
                "tensor `{tensor}` holds NaN or infinite values at step {} although the loss \
                 is still finite, so the run has diverged and the checkpoint of that step is \
                 not written; try a lower learning rate, a state clamp (model.state_clamp) or \
                 gradient clipping (training.grad_clip)",
                progress.step
            )));
        }
        Ok(ckpt)
    }

    /// Writes `ckpt` of `step`, after the loss rows up to its step are on disk (so a run
    /// killed right after it resumes without a gap in `loss.csv`).
    fn write_checkpoint(&mut self, ckpt: &Checkpoint, step: u64) -> Result<()> {
        self.flush_csv()?;
        let Some(f) = &self.files else {
            return Ok(());
        };
        let path = f.checkpoint.clone();
        files::write_checkpoint(ckpt, &path)?;
        self.last_checkpoint = Some(step);
        let _ = self
            .events
            .on_event(&Event::Checkpoint { step, path: &path });
        Ok(())
    }

    /// The state after `step` as its pictures show it: as it was before a spike, since the
    /// spike is simulated noise, not the rule's work, and late in a run nearly every step
    /// spikes. An added spike is taken off again (the noise is counter-based, so
    /// subtracting the same draw undoes it up to rounding and the ±state_clamp clamp on
    /// values a picture shows as 0 or 1 anyway); a reset shows the state it replaced.
    fn shown_state<T: Trainer>(&self, t: &T, state: &T::State, step: u64) -> Result<HostTensor> {
        if let Some((_, before)) = self.reset_before.as_ref().filter(|r| r.0 == step) {
            return Ok(before.clone());
        }
        let mut host = t.download(state).backend()?;
        if let Some((_, sigma)) = self.last_spike.filter(|s| s.0 == step && s.1 > 0.0) {
            let seed = stream_seed(self.run_seed, step, Stream::Spike);
            add_gaussian(host.data_mut(), -sigma, seed);
        }
        Ok(host)
    }

    /// Writes the picture of `shown` as `dir/STEP.png` (a snapshot or a GIF frame);
    /// returns its path.
    fn save_step_picture(&self, dir: &Path, shown: &HostTensor, step: u64) -> Result<PathBuf> {
        let img = render::snapshot(shown, Some(self.target), self.visible, self.scale)?;
        let path = render::step_path(dir, step);
        files::write_artefact(&path, |tmp| render::save_png(&img, tmp))?;
        Ok(path)
    }

    fn snapshot(&mut self, shown: &HostTensor, step: u64) -> Result<()> {
        let Some(dir) = self.files.as_ref().map(|f| f.snapshots.clone()) else {
            return Ok(());
        };
        let path = self.save_step_picture(&dir, shown, step)?;
        self.last_snapshot = Some(step);
        let _ = self.events.on_event(&Event::Snapshot { step, path: &path });
        if step == 0 {
            self.frame(shown, step)?;
        }
        Ok(())
    }

    fn frame(&mut self, shown: &HostTensor, step: u64) -> Result<()> {
        let Some(dir) = self.files.as_ref().map(|f| f.frames.clone()) else {
            return Ok(());
        };
        self.save_step_picture(&dir, shown, step)?;
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
        if info.spiked {
            self.last_spike = Some((info.step, info.spike_sigma));
        }
        self.progress.clone_from(ctx.progress);
        if let Some(before) = ctx.before_reset {
            self.reset_before = Some((info.step, ctx.trainer.download(before).backend()?));
        }
        let frame = info.step.is_multiple_of(self.frame_every);
        let snapshot = info.step.is_multiple_of(self.snapshot_every);
        if (frame || snapshot) && self.files.is_some() {
            let shown = self.shown_state(ctx.trainer, ctx.state, info.step)?;
            if frame {
                self.frame(&shown, info.step)?;
            }
            if snapshot {
                self.snapshot(&shown, info.step)?;
                self.flush_csv()?;
            }
        }
        if info.step.is_multiple_of(self.checkpoint_every) && self.files.is_some() {
            let ckpt = self.capture(ctx.trainer, ctx.state, ctx.progress)?;
            self.write_checkpoint(&ckpt, info.step)?;
        }
        Ok(self.events.on_event(&Event::Step(&info)))
    }

    /// Scores the rule from fresh noise (`evaluation.every`), records the `psnr.csv` row
    /// and tells the caller.
    fn evaluate<T: Trainer>(&mut self, step: u64, trainer: &mut T) -> Result<Evaluation> {
        let started = Instant::now();
        let scored = score::run(
            trainer,
            self.target,
            self.evaluation,
            self.run_seed,
            self.state_clamp,
            false,
        );
        self.evaluation_seconds += started.elapsed().as_secs_f64();
        let reg = scored.context("the regrowth score failed")?;
        let flow = self.events.on_event(&Event::Evaluation {
            step,
            score: &reg.score,
        });
        self.psnr_rows
            .push((step, reg.score.mean_psnr_db, reg.score.mean_mse));
        self.keep_if_best(trainer, reg.score.mean_psnr_db)?;
        Ok(Evaluation {
            psnr_db: Some(reg.score.mean_psnr_db),
            flow,
        })
    }
}

impl RunObserver<'_> {
    /// Keeps the trainer's weights (in memory and in `best.safetensors`) when a periodic
    /// score of `psnr_db` beats the best so far and `evaluation.keep_best` is on.
    fn keep_if_best<T: Trainer>(&mut self, trainer: &T, psnr_db: f64) -> Result<()> {
        let better = self.kept.as_ref().is_none_or(|k| k.beaten_by(psnr_db));
        if !self.evaluation.keep_best || !better {
            return Ok(());
        }
        let kept = Kept::capture(self.parts, trainer, &self.progress, psnr_db)?;
        if let Some(f) = &self.files {
            kept.write(&f.dir)?;
        }
        self.kept = Some(kept);
        Ok(())
    }
}

impl<T: Trainer> Observer<T> for RunObserver<'_> {
    type Error = Error;

    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>> {
        self.step(ctx)
    }

    fn on_evaluation(&mut self, step: u64, trainer: &mut T) -> Result<Evaluation> {
        self.evaluate(step, trainer)
    }
}
