//! `nca-cli run.ron`: train, watch, and leave a complete run directory behind.
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
//! 5. The summary (`summary.json`) and the report.

mod artefacts;
mod dir;
mod plan;
mod train;

use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde::Serialize;

use crate::backend::{dispatch, Backend};

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

/// How a training run ended, as `summary.json` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// `training.steps` were run.
    Completed,
    /// Stopped by `training.max_spikes`.
    MaxSpikes,
    /// Stopped by Ctrl-C.
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

/// Failures of one run in the order they happened: the first is the cause, the others
/// (a plot or the summary that could not be written afterwards) are reported after it.
#[derive(Debug, Default)]
pub(crate) struct Failures(Vec<anyhow::Error>);

impl Failures {
    /// Adds a failure after the earlier ones.
    fn push(&mut self, e: anyhow::Error) {
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
        let mut lines = self.0.iter().map(|e| format!("{e:#}"));
        let first = lines.next()?;
        Some(lines.fold(first, |acc, l| format!("{acc}\nafterwards: {l}")))
    }
}

/// A training run that failed: the first failure, the ones after it, and what is on disk
/// now (which checkpoint is kept, which files were written).
#[derive(Debug)]
pub struct RunFailed {
    first: anyhow::Error,
    later: Vec<anyhow::Error>,
    aftermath: String,
}

impl fmt::Display for RunFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#}", self.first)?;
        for later in &self.later {
            write!(f, "\nafterwards: {later:#}")?;
        }
        write!(f, "\n{}", self.aftermath)
    }
}

impl std::error::Error for RunFailed {}

impl Failures {
    /// `Ok` when nothing failed, else the first failure followed by the later ones and
    /// `aftermath`.
    fn into_result(self, aftermath: String) -> Result<()> {
        let mut all = self.0.into_iter();
        match all.next() {
            None => Ok(()),
            Some(first) => Err(RunFailed {
                first,
                later: all.collect(),
                aftermath,
            }
            .into()),
        }
    }
}

/// Runs `nca-cli run.ron`.
pub fn train_command(args: TrainArgs) -> Result<Finish> {
    let started = Instant::now();
    let plan = plan::plan(&args)?;
    let job = train::TrainJob {
        args: &args,
        plan: &plan,
        started,
    };
    dispatch(
        args.backend,
        &plan.nca.model,
        &plan.nca.training.optimizer(),
        job,
    )
}
