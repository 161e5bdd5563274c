//! The weights a run keeps (`evaluation.keep_best`). A rule's regrowth score moves by
//! several dB between evaluations late in a run at a constant learning rate, so the last
//! step's weights are a draw, not the run's result. With periodic scores the run keeps the
//! best-scoring weights (the last step's among them), writes them to `best.safetensors`,
//! and reports them scored on starts that took no part in choosing them.

use std::path::Path;

use nca_api::{Checkpoint, Progress, Trainer};

use super::plan::{PsnrRow, Resume};
use crate::error::Result;
use crate::events::{self, Events, Level};
use crate::files::{self, CheckpointParts};

/// The file in a run directory that holds the kept weights.
pub const FILE: &str = "best.safetensors";

/// Weights kept because their periodic regrowth score was the best so far.
#[derive(Clone, Debug)]
pub struct Kept {
    /// The step after which they were scored.
    pub step: u64,
    /// Their periodic score: mean PSNR in dB over the evaluation's own starts.
    pub psnr_db: f64,
    /// The weights, as a checkpoint without optimiser or carried state (a rule to roll
    /// out; a run resumes from `checkpoint.safetensors`).
    pub checkpoint: Checkpoint,
}

impl Kept {
    /// The trainer's current weights after `progress`, scored `psnr_db`.
    pub fn capture<T: Trainer>(
        parts: &CheckpointParts<'_>,
        trainer: &T,
        progress: &Progress,
        psnr_db: f64,
    ) -> Result<Self> {
        Ok(Self {
            step: progress.step,
            psnr_db,
            checkpoint: parts.capture_weights(trainer, progress)?,
        })
    }

    /// Whether a score of `psnr_db` beats this one (ties keep the earlier weights).
    pub fn beaten_by(&self, psnr_db: f64) -> bool {
        psnr_db > self.psnr_db
    }

    /// Writes the weights to `dir/best.safetensors` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        files::write_checkpoint(&self.checkpoint, &dir.join(FILE))
    }
}

/// The weights the resumed run kept: `best.safetensors` beside its checkpoint, with its
/// score from the resumed run's `psnr.csv`, so that a resumed run still reports its best.
/// A file that cannot be read, or whose step has no score, is left out with a note (this
/// run's own best then replaces it).
pub(super) fn earlier(
    resume: &Resume,
    psnr: &[PsnrRow],
    limit: &nca_api::MemoryLimit,
    events: &mut dyn Events,
) -> Option<Kept> {
    let path = files::parent_dir(&resume.path).join(FILE);
    if !path.is_file() {
        return None;
    }
    let checkpoint = match Checkpoint::load_limited(&path, limit) {
        Ok(c) => c,
        Err(e) => {
            let message = format!("{e}; the weights this run keeps replace it");
            let _ = events::note(events, Level::Warn, &message);
            return None;
        }
    };
    let shapes = |c: &Checkpoint| -> Vec<(String, Vec<usize>)> {
        c.weights
            .named()
            .into_iter()
            .map(|(name, t)| (name.to_string(), t.shape().to_vec()))
            .collect()
    };
    if shapes(&checkpoint) != shapes(&resume.ckpt) {
        let message = format!(
            "{} holds weights of another model than the checkpoint resumed from; the \
             weights this run keeps replace it",
            path.display()
        );
        let _ = events::note(events, Level::Warn, &message);
        return None;
    }
    let step = checkpoint.progress.step;
    let score = psnr.iter().find(|row| row.0 == step);
    let Some(&(_, psnr_db, _)) = score else {
        let message = format!(
            "{} holds the weights of step {step}, which has no score in the resumed run's \
             psnr.csv; the weights this run keeps replace it",
            path.display()
        );
        let _ = events::note(events, Level::Warn, &message);
        return None;
    };
    Some(Kept {
        step,
        psnr_db,
        checkpoint,
    })
}
