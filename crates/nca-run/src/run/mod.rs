//! A training run: train, watch, and (when asked) leave a complete run directory behind.
//!
//! A run goes through five phases, each in its own module, so that "refuse before
//! writing" and "first failure first" are the order of the code rather than a matter of
//! care:
//!
//! 1. `plan`: validate and plan. Everything that can be refused is refused here (run
//!    file, target, resume checkpoint, output directory, inputs inside it, what the run
//!    will need); nothing is created on disk before this phase has passed.
//! 2. `dir`: create the run directory and take its exclusive lock; only then clean it.
//! 3. `train`: train. The first failure is kept as the run's error.
//! 4. `artefacts`: write plots, GIF, contact sheet and regrowth pictures, each
//!    atomically; their failures are reported after the first one.
//! 5. The summary (`summary.json`).
//!
//! With [`Output::Nothing`] phases 2 and 4 write nothing: the run is trained and scored in
//! memory and returned as a [`RunResult`].

mod artefacts;
mod dir;
mod kept;
mod plan;
mod train;

use std::fmt;
use std::path::PathBuf;
use std::time::Instant;

use nca_api::{Checkpoint, HostTensor, RegrowthScore};
use serde::Serialize;

use crate::backend::{dispatch, Backend};
use crate::config::RunConfig;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::plot::LossRecord;

pub use dir::lock;
pub use plan::PsnrRow;

/// Where a run's settings come from.
#[derive(Clone, Debug)]
pub enum RunSource {
    /// A RON run file; image paths are relative to its directory, and the default run
    /// directory is `runs/STEM`.
    File(PathBuf),
    /// Settings already read (a Python `dict`, a config built in code), sized for the grid
    /// and validated by [`crate::config::RunConfig::from_json_sized`] or [`crate::config::RunConfig::load_sized`].
    Config {
        /// The settings.
        config: Box<RunConfig>,
        /// The values chosen for the grid where the settings left them out.
        chosen: Vec<crate::events::Chosen>,
        /// Names the settings in messages (`"config"`, a notebook cell, …).
        origin: String,
        /// Directory relative image paths are taken from.
        base: PathBuf,
    },
}

/// Where a run writes its results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// `output.dir` of the run file, else `runs/STEM` (the next free `runs/STEM-N` unless
    /// `force`); when resuming, the checkpoint's directory.
    Default,
    /// This directory.
    Dir(PathBuf),
    /// Nothing on disk: the run is returned in memory only.
    Nothing,
}

/// One training run to do.
#[derive(Clone, Debug)]
pub struct TrainRequest {
    /// The settings.
    pub source: RunSource,
    /// A `[1, V, H, W]` (or `[B, V, H, W]`) target replacing the settings' target (already
    /// fitted to the grid, e.g. by [`crate::target::fit_pixels`]).
    pub target: Option<HostTensor>,
    /// Where results go.
    pub output: Output,
    /// Continue from this checkpoint.
    pub resume: Option<PathBuf>,
    /// Replace the results of a previous run in the output directory.
    pub force: bool,
    /// The backend to train with.
    pub backend: Backend,
}

impl TrainRequest {
    /// A run of the RON file at `path` on `backend`, written to its default directory.
    pub fn file(path: impl Into<PathBuf>, backend: Backend) -> Self {
        Self {
            source: RunSource::File(path.into()),
            target: None,
            output: Output::Default,
            resume: None,
            force: false,
            backend,
        }
    }
}

/// How a training run ended, as `summary.json` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// `training.steps` were run.
    Completed,
    /// Stopped by `training.max_spikes`.
    MaxSpikes,
    /// Stopped by `training.stop_at_psnr`: a score during training reached it.
    ReachedPsnr,
    /// Stopped by Ctrl-C (or an event handler asking to stop).
    Interrupted,
    /// The loss became NaN or infinite.
    Diverged,
    /// Something else failed (a write, the backend, the score).
    Failed,
}

impl Status {
    /// The name in `summary.json` and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Status::Completed => "completed",
            Status::MaxSpikes => "max_spikes",
            Status::ReachedPsnr => "reached_psnr",
            Status::Interrupted => "interrupted",
            Status::Diverged => "diverged",
            Status::Failed => "failed",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What `summary.json` holds.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Backend that trained.
    pub backend: String,
    /// How the run ended.
    pub status: Status,
    /// The error that stopped the run, if any (the first failure first).
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
    /// The spike threshold ε (`noise.epsilon`, or the one `training.spike.threshold`
    /// computed from the target).
    pub epsilon: f32,
    /// First step whose loss was below ε.
    pub first_step_below_epsilon: Option<u64>,
    /// Wall-clock seconds of the whole command.
    pub wall_seconds: f64,
    /// Seconds spent in the training loop (including snapshots and checkpoints).
    pub train_seconds: f64,
    /// `steps_run / train_seconds`.
    pub steps_per_second: f64,
    /// Seconds of `train_seconds` spent scoring the rule during training
    /// (`evaluation.every`).
    pub evaluation_seconds: f64,
    /// The stop rule `training.stop_at_psnr` in dB, if any.
    pub stop_at_psnr: Option<f32>,
    /// The step after which a score reached `stop_at_psnr` (status `reached_psnr`).
    pub reached_psnr_at_step: Option<u64>,
    /// The step of the weights `regrowth` scores when `evaluation.keep_best` chose them
    /// from the periodic scores (the last step's included; they are in `best.safetensors`
    /// and scored on held-out starts); `null` when the last weights were scored as they are.
    pub kept_step: Option<u64>,
    /// The regrowth score of the final rule, or of the kept weights when `kept_step` is set
    /// (`null` when the run failed).
    pub regrowth: Option<RegrowthScore>,
}

/// A finished run: how it ended, its summary and history, and the trained rule.
#[derive(Clone, Debug)]
pub struct RunResult {
    /// How it ended (completed, max_spikes or interrupted; failures are errors).
    pub status: Status,
    /// What `summary.json` holds (written there when the run has a directory).
    pub summary: Summary,
    /// Every step's loss, the resumed run's history included.
    pub losses: Vec<LossRecord>,
    /// The periodic and final regrowth scores: `(step, mean PSNR dB, mean MSE)`.
    pub psnr: Vec<PsnrRow>,
    /// The final checkpoint (weights, Adam state, progress, state, target and run file),
    /// as written to `checkpoint.safetensors` when the run has a directory.
    pub checkpoint: Checkpoint,
    /// The weights `summary.regrowth` scores when `evaluation.keep_best` chose them (as
    /// written to `best.safetensors`: no optimiser or carried state).
    pub kept: Option<Checkpoint>,
    /// The run directory, or `None` for [`Output::Nothing`].
    pub out: Option<PathBuf>,
}

/// Failures of one run in the order they happened: the first is the cause, the others
/// (a plot or the summary that could not be written afterwards) are reported after it.
#[derive(Debug, Default)]
pub(crate) struct Failures(Vec<Error>);

impl Failures {
    /// Adds a failure after the earlier ones.
    fn push(&mut self, e: Error) {
        self.0.push(e);
    }

    /// Keeps the error of `result`, if any; the value otherwise.
    fn keep<V>(&mut self, result: Result<V>) -> Option<V> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(e);
                None
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every failure so far, first first, one per line (for `summary.json`).
    fn describe(&self) -> Option<String> {
        let mut lines = self.0.iter().map(Error::report);
        let first = lines.next()?;
        Some(lines.fold(first, |acc, l| format!("{acc}\nafterwards: {l}")))
    }

    /// `Ok` when nothing failed, else the first failure followed by the later ones and
    /// `aftermath`.
    fn into_result(self, aftermath: String) -> Result<()> {
        let mut all = self.0.into_iter();
        match all.next() {
            None => Ok(()),
            Some(first) => Err(Error::RunFailed(Box::new(RunFailed {
                first,
                later: all.collect(),
                aftermath,
            }))),
        }
    }
}

/// A training run that failed: the first failure, the ones after it, and what is on disk
/// now (which checkpoint is kept, which files were written).
#[derive(Debug)]
pub struct RunFailed {
    /// The cause.
    pub first: Error,
    /// Failures after it (results that could not be written afterwards).
    pub later: Vec<Error>,
    /// What is on disk now.
    pub aftermath: String,
}

impl fmt::Display for RunFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.first.report())?;
        for later in &self.later {
            write!(f, "\nafterwards: {}", later.report())?;
        }
        write!(f, "\n{}", self.aftermath)
    }
}

impl std::error::Error for RunFailed {}

/// Trains one run: plans (refusing before anything is written), trains with `events`
/// watching every step, writes the run directory (unless [`Output::Nothing`]) and returns
/// the result. A run stopped by an event (Ctrl-C) still writes everything and returns
/// `Ok` with [`Status::Interrupted`].
pub fn train(request: &TrainRequest, events: &mut dyn Events) -> Result<RunResult> {
    let started = Instant::now();
    let plan = plan::plan(request, events)?;
    let job = train::TrainJob {
        request,
        plan: &plan,
        started,
        events,
    };
    dispatch(
        request.backend,
        &plan.nca.model,
        &plan.nca.training.optimizer(),
        job,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, Quiet};
    use crate::score;

    /// An 8×8 solid-green run file with `training` and `evaluation` section bodies.
    fn tiny(dir: &std::path::Path, training: &str, evaluation: &str) -> TrainRequest {
        let text = format!(
            "(grid: (height: 8, width: 8), training: ({training}), \
             target: Solid(0.0, 1.0, 0.0), output: (snapshot_every: 50, scale: 1), \
             evaluation: ({evaluation}))"
        );
        let path = dir.join("t.ron");
        std::fs::write(&path, text).expect("run file");
        TrainRequest {
            output: Output::Dir(dir.join("out")),
            ..TrainRequest::file(path, crate::backend::Backend::Ndarray)
        }
    }

    #[test]
    fn the_psnr_stop_rule_ends_the_run_at_a_score_and_the_summary_says_where() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let request = tiny(
            tmp.path(),
            "steps: 2000, learning_rate: 0.01, stop_at_psnr: 25.0",
            "steps: 10, seeds: 2, every: 40",
        );
        let mut scored = Vec::new();
        let mut events = |e: &Event<'_>| {
            if let Event::Evaluation { step, score } = e {
                scored.push((*step, score.mean_psnr_db));
            }
            std::ops::ControlFlow::Continue(())
        };
        let result = train(&request, &mut events).expect("trains");
        assert_eq!(result.status, Status::ReachedPsnr);
        let step = result.summary.reached_psnr_at_step.expect("step");
        assert_eq!(result.summary.final_step, step);
        assert!(step < 2000 && step.is_multiple_of(40), "stopped at {step}");
        // Every score before the last was below the goal, the last one reached it.
        let (last, earlier) = scored.split_last().expect("scored");
        assert_eq!(last.0, step);
        assert!(
            last.1 >= 25.0 && earlier.iter().all(|s| s.1 < 25.0),
            "{scored:?}"
        );
        assert!(result.summary.evaluation_seconds > 0.0);
        assert!(result.summary.evaluation_seconds <= result.summary.train_seconds);
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("out/summary.json")).expect("summary"),
        )
        .expect("json");
        assert_eq!(summary["status"], "reached_psnr");
        assert_eq!(summary["reached_psnr_at_step"], step);
        assert_eq!(summary["stop_at_psnr"], 25.0);
    }

    #[test]
    fn a_stop_asked_for_while_the_target_is_read_stops_before_the_first_step() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A 16×16 picture for an 8×8 grid: reading it sends a note (it is resized).
        image::RgbImage::from_pixel(16, 16, image::Rgb([0, 200, 0]))
            .save(tmp.path().join("t.png"))
            .expect("png");
        let path = tmp.path().join("t.ron");
        std::fs::write(
            &path,
            "(grid: (height: 8, width: 8), training: (steps: 50), \
             target: Image(path: \"t.png\"), output: (snapshot_every: 50, scale: 1))",
        )
        .expect("run file");
        let request = TrainRequest {
            output: Output::Dir(tmp.path().join("out")),
            ..TrainRequest::file(path, crate::backend::Backend::Ndarray)
        };
        let (mut notes, mut steps) = (0, 0);
        let mut events = |e: &Event<'_>| match e {
            Event::Note { .. } => {
                notes += 1;
                std::ops::ControlFlow::Break(())
            }
            Event::Step(_) => {
                steps += 1;
                std::ops::ControlFlow::Continue(())
            }
            _ => std::ops::ControlFlow::Continue(()),
        };
        let result = train(&request, &mut events).expect("a stopped run is not an error");
        assert!(notes >= 1, "reading the picture sent no note");
        assert_eq!(steps, 0);
        assert_eq!(result.status, Status::Interrupted);
        assert_eq!(result.summary.final_step, 0);
        let summary = std::fs::read_to_string(tmp.path().join("out/summary.json"));
        assert!(summary.expect("summary.json").contains("\"interrupted\""));
    }

    #[test]
    fn without_a_stop_rule_the_run_completes_and_scores_along_the_way() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let request = tiny(tmp.path(), "steps: 90", "steps: 5, seeds: 1, every: 40");
        let result = train(&request, &mut Quiet).expect("trains");
        assert_eq!(result.status, Status::Completed);
        assert_eq!(result.summary.reached_psnr_at_step, None);
        let steps: Vec<u64> = result.psnr.iter().map(|r| r.0).collect();
        assert_eq!(steps, [40, 80, 90]);
    }

    /// The regrowth score of `ckpt`'s weights on the starts of run seed `seed`.
    fn score_of(ckpt: &Checkpoint, seed: u64) -> f64 {
        let mut ckpt = ckpt.clone();
        ckpt.config.training.seed = seed;
        let limit = nca_api::MemoryLimit::from_env().expect("limit");
        crate::model::Model::from_checkpoint(ckpt)
            .regrowth(crate::backend::Backend::Ndarray, None, 5, 2, &limit)
            .expect("scores")
            .mean_psnr_db
    }

    #[test]
    fn the_best_scoring_weights_are_kept_and_scored_on_held_out_starts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let request = tiny(tmp.path(), "steps: 130", "steps: 5, seeds: 2, every: 20");
        let result = train(&request, &mut Quiet).expect("trains");
        let step = result.summary.kept_step.expect("a kept step");
        // The kept step is the best of every score on the evaluation's own starts.
        let best = result.psnr.iter().map(|r| r.1).fold(f64::MIN, f64::max);
        let row = result.psnr.iter().find(|r| r.0 == step).expect("its row");
        assert_eq!(row.1, best, "{:?}", result.psnr);
        // Those are the weights in best.safetensors and in the result: they score the
        // row's number on those starts, and the summary's on the held-out ones.
        let file = Checkpoint::load(&tmp.path().join("out/best.safetensors")).expect("file");
        let kept = result.kept.as_ref().expect("kept weights");
        assert_eq!(file.weights, kept.weights);
        assert_eq!(file.progress.step, step);
        assert!(file.adam.is_none() && file.state.is_none());
        assert!((score_of(kept, 0) - row.1).abs() < 1e-3);
        let held_out = nca_api::eval::held_out_run_seed(0);
        let reported = result
            .summary
            .regrowth
            .as_ref()
            .expect("score")
            .mean_psnr_db;
        assert!((score_of(kept, held_out) - reported).abs() < 1e-3);
        assert!((reported - row.1).abs() > 1e-6, "scored on the same starts");
        // The run's own checkpoint stays the last step's, for resuming.
        assert_eq!(result.checkpoint.progress.step, 130);
        assert!(result.checkpoint.adam.is_some());
    }

    #[test]
    fn without_keep_best_the_last_weights_are_scored_on_the_evaluation_starts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let evaluation = "steps: 5, seeds: 2, every: 20, keep_best: false";
        let request = tiny(tmp.path(), "steps: 130", evaluation);
        let result = train(&request, &mut Quiet).expect("trains");
        assert_eq!(result.summary.kept_step, None);
        assert!(result.kept.is_none());
        assert!(!tmp.path().join("out/best.safetensors").exists());
        let last = result.psnr.last().expect("final row");
        let reported = result.summary.regrowth.as_ref().expect("score");
        assert_eq!((last.0, last.1), (130, reported.mean_psnr_db));
    }

    #[test]
    fn a_resumed_run_keeps_the_earlier_best_when_it_stays_the_best() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let request = tiny(tmp.path(), "steps: 60", "steps: 5, seeds: 2, every: 20");
        let first = train(&request, &mut Quiet).expect("trains");
        let step = first.summary.kept_step.expect("a kept step");
        let earlier = first.kept.expect("kept weights").weights;
        // Raise the earlier best's recorded score above anything the rule can reach.
        let psnr_csv = tmp.path().join("out/psnr.csv");
        let mut rows = score::read_csv(&psnr_csv).expect("psnr.csv");
        rows.iter_mut()
            .filter(|r| r.0 == step)
            .for_each(|r| r.1 = 500.0);
        score::write_csv(&psnr_csv, &rows).expect("written");
        let resumed = TrainRequest {
            resume: Some(tmp.path().join("out/checkpoint.safetensors")),
            ..tiny(tmp.path(), "steps: 120", "steps: 5, seeds: 2, every: 20")
        };
        let result = train(&resumed, &mut Quiet).expect("resumes");
        assert_eq!(result.summary.kept_step, Some(step));
        assert_eq!(result.kept.expect("kept").weights, earlier);
        let file = Checkpoint::load(&tmp.path().join("out/best.safetensors"));
        assert_eq!(file.expect("file").weights, earlier);
        // The first run's scores are history, its last one (step 60) included.
        let steps: Vec<u64> = result.psnr.iter().map(|r| r.0).collect();
        assert_eq!(steps, [20, 40, 60, 80, 100, 120]);
    }
}
