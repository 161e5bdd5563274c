//! What a run tells its caller while it works: notes, the start (with the values chosen
//! for the grid), every step, periodic scores, snapshots and checkpoints.
//!
//! The library never prints. `nca-cli` turns events into a progress bar and log lines;
//! the Python package into `on_step` calls and warnings. Returning
//! [`ControlFlow::Break`] from any event asks the work to stop after the current step and
//! write what it has (as Ctrl-C does).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use nca_api::{ModelConfig, RegrowthScore, StepInfo};

/// How much a note matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Worth knowing (a picture was resized to the grid).
    Info,
    /// Probably not what the user meant (a picture was stretched, a run re-seeded).
    Warn,
}

/// A value the run chose because the run file left it out: the field, the value as RON,
/// and why ("for a 128x128 grid").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// Dotted field name, e.g. `model.mlp_hidden`.
    pub field: &'static str,
    /// The value, as it would be written in a run file.
    pub value: String,
}

/// What a training run is about to do.
#[derive(Clone, Debug)]
pub struct Started {
    /// Backend name.
    pub backend: &'static str,
    /// Run directory, or `None` when nothing is written to disk.
    pub out: Option<PathBuf>,
    /// Step the run starts from (0, or the checkpoint's step when resuming).
    pub start_step: u64,
    /// Step it will stop at (`training.steps`).
    pub total_steps: u64,
    /// The model trained.
    pub model: ModelConfig,
    /// Grid `(height, width)`.
    pub grid: (usize, usize),
    /// Fields the run file left out whose values depend on the grid, as chosen.
    pub chosen: Vec<Chosen>,
    /// How often a log line is worth writing without a progress bar
    /// (`output.snapshot_every`).
    pub log_every: u64,
}

/// One thing that happened.
#[derive(Debug)]
#[non_exhaustive]
pub enum Event<'a> {
    /// A message for the user.
    Note {
        /// How much it matters.
        level: Level,
        /// The message, one sentence naming the file or field.
        message: &'a str,
    },
    /// Training is about to start.
    Started(&'a Started),
    /// A training step finished (`info.spiked`: the carried state got a spike).
    Step(&'a StepInfo),
    /// The rule was scored from fresh noise during training (`evaluation.every`).
    Evaluation {
        /// Step after which it was scored.
        step: u64,
        /// The score.
        score: &'a RegrowthScore,
    },
    /// A snapshot picture was written.
    Snapshot {
        /// Its step.
        step: u64,
        /// Where.
        path: &'a Path,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Its step.
        step: u64,
        /// Where.
        path: &'a Path,
    },
    /// A rollout step finished (rollouts only).
    RolloutStep {
        /// The step (1-based).
        step: u64,
    },
}

/// Receives a run's events.
pub trait Events {
    /// Called for every event; `Break` asks the work to stop after the current step.
    fn on_event(&mut self, event: &Event<'_>) -> ControlFlow<()>;
}

impl<F: FnMut(&Event<'_>) -> ControlFlow<()>> Events for F {
    fn on_event(&mut self, event: &Event<'_>) -> ControlFlow<()> {
        self(event)
    }
}

/// Events nobody watches.
#[derive(Clone, Copy, Debug, Default)]
pub struct Quiet;

impl Events for Quiet {
    fn on_event(&mut self, _event: &Event<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// Passes events on and remembers whether any of them asked to stop: work that cannot
/// stop halfway (reading the target or the checkpoint before training) keeps the request
/// for the training loop, which then stops before its first step.
pub(crate) struct StopLatch<'a> {
    inner: &'a mut dyn Events,
    /// Whether an event returned `Break`.
    pub stopped: bool,
}

impl<'a> StopLatch<'a> {
    /// A latch in front of `inner`.
    pub(crate) fn new(inner: &'a mut dyn Events) -> Self {
        Self {
            inner,
            stopped: false,
        }
    }
}

impl Events for StopLatch<'_> {
    fn on_event(&mut self, event: &Event<'_>) -> ControlFlow<()> {
        let flow = self.inner.on_event(event);
        self.stopped |= flow.is_break();
        flow
    }
}

/// Sends a note.
pub(crate) fn note(events: &mut dyn Events, level: Level, message: &str) -> ControlFlow<()> {
    events.on_event(&Event::Note { level, message })
}
