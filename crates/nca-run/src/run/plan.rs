//! Phase 1, validate and plan: everything that can refuse a run does so here, before
//! anything is created on disk.

use std::path::{Path, PathBuf};

use nca_api::{Checkpoint, HostTensor, IoError, NcaConfig, ResumeError};

use super::kept::{self, Kept};
use super::{Output, RunSource, TrainRequest};
use crate::config::RunConfig;
use crate::error::{bail, invalid, Result, ResultExt};
use crate::events::{self, Chosen, Events, Level, StopLatch};
use crate::files;
use crate::plot::{self, LossRecord};
use crate::score;
use crate::target::Target;

/// Everything a run needs, checked: the resolved config, the target, the checkpoint to
/// resume from and the output directory.
pub(super) struct Plan {
    /// Names the settings in messages and `summary.json` (the run file's path as given).
    pub origin: String,
    /// The settings with image paths made absolute and `output.dir` filled in.
    pub cfg: RunConfig,
    /// Grid, model, noise and training.
    pub nca: NcaConfig,
    /// Values chosen for the grid where the settings left them out.
    pub chosen: Vec<Chosen>,
    /// The `[B, V, H, W]` target.
    pub target: HostTensor,
    /// The checkpoint to continue from, checked against `nca`.
    pub resume: Option<Resume>,
    /// The run directory, `None` when nothing is written.
    pub out: Option<PathBuf>,
    /// Whether the run continues in the directory of its checkpoint.
    pub in_place: bool,
    /// `config.ron` as it will be written (and stored in checkpoints).
    pub run_ron: String,
    /// `loss.csv` rows of the resumed run up to its checkpoint.
    pub history: Vec<LossRecord>,
    /// `psnr.csv` rows of the resumed run up to its checkpoint.
    pub psnr_history: Vec<PsnrRow>,
    /// The weights the resumed run kept (`best.safetensors` beside its checkpoint).
    pub earlier_kept: Option<Kept>,
    /// Whether an event during planning (a note about the target or the checkpoint) asked
    /// to stop: the run then stops before its first step.
    pub stop_requested: bool,
}

/// A `psnr.csv` row: step, mean PSNR in dB, mean MSE.
pub type PsnrRow = (u64, f64, f64);

/// A checkpoint to resume from, checked against the run config.
pub(super) struct Resume {
    /// The checkpoint.
    pub ckpt: Checkpoint,
    /// Where it was read from.
    pub path: PathBuf,
}

impl Resume {
    /// The step the checkpoint holds.
    pub fn step(&self) -> u64 {
        self.ckpt.progress.step
    }
}

/// The settings of `source`, where they came from, and the directory images are read from.
fn settings(source: &RunSource) -> Result<(RunConfig, Vec<Chosen>, String, PathBuf)> {
    Ok(match source {
        RunSource::File(path) => {
            let (cfg, chosen) = RunConfig::load_sized(path)?;
            (
                cfg,
                chosen,
                path.display().to_string(),
                files::parent_dir(path),
            )
        }
        RunSource::Config {
            config,
            chosen,
            origin,
            base,
        } => (
            (**config).clone(),
            chosen.clone(),
            origin.clone(),
            base.clone(),
        ),
    })
}

/// Validates the run and decides where it goes; reads files, writes none.
pub(super) fn plan(request: &TrainRequest, events: &mut dyn Events) -> Result<Plan> {
    let events = &mut StopLatch::new(events);
    let (cfg, chosen, origin, base) = settings(&request.source)?;
    let nca = cfg.nca();
    // Sizes first: the target and everything after it allocate in proportion to the grid.
    let limit = nca_api::MemoryLimit::from_env()?;
    // Runs that write nothing are checked as if they drew every picture: the estimate
    // stays on the safe side, and the same run file passes or fails either way.
    crate::preflight::check_run(&cfg, &nca, request.backend, &limit)
        .with_context(|| format!("{origin}: the run cannot start"))?;
    let target = match &request.target {
        Some(t) => check_target(t, &nca, &origin)?,
        None => cfg
            .target
            .render_limited(&nca, &base, &limit, events)
            .with_context(|| format!("{origin}: cannot build the target"))?,
    };
    let resume = match &request.resume {
        Some(path) => Some(load_resume(path, &nca, &origin, &limit, events)?),
        None => None,
    };
    let out = choose_out_dir(request, &cfg)?;
    let in_place = match (&request.resume, &out) {
        (Some(r), Some(out)) => files::same_dir(&files::parent_dir(r), out),
        _ => false,
    };
    if let Some(out) = &out {
        let mut inputs = Vec::new();
        if let RunSource::File(path) = &request.source {
            inputs.push(("run file", path.clone()));
        }
        if let (Target::Image { path, .. }, None) = (&cfg.target, &request.target) {
            inputs.push(("target image", base.join(path)));
        }
        if let (Some(r), false) = (&resume, in_place) {
            inputs.push(("--resume checkpoint", r.path.clone()));
        }
        refuse_inputs_inside(out, &inputs, request.force)?;
        if !in_place {
            files::check_new_dir(out, request.force)?;
        }
    }
    let (history, psnr_history) = match &resume {
        Some(r) => read_history(r)?,
        None => (Vec::new(), Vec::new()),
    };
    let earlier_kept = resume
        .as_ref()
        .and_then(|r| kept::earlier(r, &psnr_history, &limit, events));

    let mut resolved = cfg.clone();
    resolved.target = cfg.target.resolved(&base);
    resolved.output.dir.clone_from(&out);
    let header = format!(
        "Resolved config written by nca-run {} from {origin}.\nImage paths are absolute and \
         the values chosen for the grid are written out; `nca-cli` reads this file as it \
         reads any run file.",
        env!("CARGO_PKG_VERSION"),
    );
    let run_ron = resolved.to_ron(&header)?;
    Ok(Plan {
        origin,
        cfg: resolved,
        nca,
        chosen,
        target,
        resume,
        out,
        in_place,
        run_ron,
        history,
        psnr_history,
        earlier_kept,
        stop_requested: events.stopped,
    })
}

/// A target given as a tensor, checked against the grid: `[1 or B, V, H, W]`, finite; a
/// single picture is repeated over the batch.
fn check_target(t: &HostTensor, nca: &NcaConfig, origin: &str) -> Result<HostTensor> {
    let [b, v, h, w] = nca.target_shape();
    let fits =
        matches!(*t.shape(), [tb, tv, th, tw] if (tb == 1 || tb == b) && (tv, th, tw) == (v, h, w));
    if !fits {
        bail!(
            "{origin}: the target has shape {:?}, the run needs [1, {v}, {h}, {w}] (visible \
             channels, grid.height, grid.width)",
            t.shape()
        );
    }
    if !t.is_finite() {
        bail!("{origin}: the target holds NaN or inf values");
    }
    if t.shape()[0] == b {
        return Ok(t.clone());
    }
    Ok(HostTensor::new(&[b, v, h, w], t.data().repeat(b))?)
}

/// `Output::Dir`, else the checkpoint's directory when resuming, else `output.dir`, else
/// `runs/STEM` (or the next free `runs/STEM-N` unless `force`); `None` for
/// `Output::Nothing`.
fn choose_out_dir(request: &TrainRequest, cfg: &RunConfig) -> Result<Option<PathBuf>> {
    Ok(Some(
        match (&request.output, &request.resume, &cfg.output.dir) {
            (Output::Nothing, ..) => return Ok(None),
            (Output::Dir(o), ..) => o.clone(),
            (Output::Default, Some(r), _) => files::parent_dir(r),
            (Output::Default, None, dir) => {
                let base = dir.clone().unwrap_or_else(|| {
                    let stem = match &request.source {
                        RunSource::File(path) => path
                            .file_stem()
                            .map(|s| s.to_string_lossy().into_owned())
                            .unwrap_or_else(|| "run".into()),
                        RunSource::Config { .. } => "run".into(),
                    };
                    Path::new("runs").join(stem)
                });
                // Without an explicit directory a second run goes next to the first instead
                // of failing; `force` still means "replace the default directory".
                if request.force {
                    base
                } else {
                    files::next_free_dir(&base)?
                }
            }
        },
    ))
}

/// Refuses an output directory that holds an input of the run: the run writes and
/// `--force` removes files there, and an input must never be one of them.
fn refuse_inputs_inside(out: &Path, inputs: &[(&str, PathBuf)], force: bool) -> Result<()> {
    // A directory that does not exist yet holds nothing.
    let Ok(out_real) = std::fs::canonicalize(out) else {
        return Ok(());
    };
    for (what, path) in inputs {
        let Ok(real) = std::fs::canonicalize(path) else {
            continue;
        };
        if real.starts_with(&out_real) {
            bail!(
                "output directory {out} holds the {what} {path}, which this run reads; the run \
                 writes its results into that directory{force}, which could overwrite or \
                 delete it. Choose another output directory with --out DIR, or move the \
                 {what} out of {out}",
                out = out.display(),
                path = path.display(),
                force = if force {
                    " and --force removes earlier results from it"
                } else {
                    ""
                },
            );
        }
    }
    Ok(())
}

/// Reads a checkpoint, turning a read error into one sentence (the I/O error's text once).
fn read_checkpoint(path: &Path, limit: &nca_api::MemoryLimit) -> Result<Checkpoint> {
    match Checkpoint::load_limited(path, limit) {
        Ok(c) => Ok(c),
        Err(IoError::Io { source, .. }) => Err(crate::error::Error::from(source).context(format!(
            "cannot resume from {}: cannot read it",
            path.display()
        ))),
        Err(e) => {
            let message = format!("cannot resume from {e}");
            Err(crate::error::Error::from(e).reworded(message))
        }
    }
}

/// Reads the checkpoint at `path` and checks it can continue `nca` (nca-api's
/// [`Checkpoint::check_resume`]); what changes without being refused is told as notes.
fn load_resume(
    path: &Path,
    nca: &NcaConfig,
    origin: &str,
    limit: &nca_api::MemoryLimit,
    events: &mut dyn Events,
) -> Result<Resume> {
    let ckpt = read_checkpoint(path, limit)?;
    let notes = ckpt.check_resume(nca).map_err(|e| {
        let p = path.display();
        match &e {
            ResumeError::Shapes {
                plain_checkpoint, ..
            } => invalid!(
                "checkpoint {p} does not match config {origin}: {e}; a run resumes only with \
                 the grid and model it was trained with{}",
                if *plain_checkpoint {
                    " (the checkpoint holds the plain model, e.g. one written before \
                     position_octaves and mlp_hidden existed: set `position_octaves: None, \
                     mlp_hidden: None` in the run file's model section to continue it)"
                } else {
                    ""
                }
            ),
            ResumeError::StateShape { found, expected } => invalid!(
                "cannot resume from {p}: tensor `state` has shape {found:?}, but {origin} asks \
                 for [grid.batch, channels, grid.height, grid.width] = {expected:?}"
            ),
            ResumeError::AlreadyDone { step, steps } => invalid!(
                "checkpoint {p} is already at step {step} and {origin} sets training.steps to \
                 {steps}; raise training.steps to train further"
            ),
            other => invalid!("cannot resume from {p}: {other}"),
        }
    })?;
    for note in notes {
        let _ = events::note(events, Level::Warn, &note.to_string());
    }
    Ok(Resume {
        ckpt,
        path: path.to_path_buf(),
    })
}

/// The resumed run's `loss.csv` and `psnr.csv` rows up to its checkpoint (the end-of-run
/// score at the resume step scored the checkpoint's weights, so it stays).
fn read_history(r: &Resume) -> Result<(Vec<LossRecord>, Vec<PsnrRow>)> {
    let dir = files::parent_dir(&r.path);
    let step = r.step();
    let old_csv = dir.join("loss.csv");
    let mut history = if old_csv.is_file() {
        plot::read_csv(&old_csv)?
    } else {
        Vec::new()
    };
    history.retain(|rec| rec.step <= step);
    let old_psnr = dir.join("psnr.csv");
    let mut psnr = if old_psnr.is_file() {
        score::read_csv(&old_psnr)?
    } else {
        Vec::new()
    };
    psnr.retain(|row| row.0 <= step);
    Ok((history, psnr))
}
