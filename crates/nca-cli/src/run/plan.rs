//! Phase 1, validate and plan: everything that can refuse a run does so here, before
//! anything is created on disk.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nca_api::{Checkpoint, HostTensor, IoError, NcaConfig};

use super::TrainArgs;
use crate::config::RunConfig;
use crate::files;
use crate::plot::{self, LossRecord};
use crate::score;

/// Everything a run needs, checked: the resolved config, the target, the checkpoint to
/// resume from and the output directory.
pub(super) struct Plan {
    /// The run file as given, for messages and `summary.json`.
    pub config_path: PathBuf,
    /// The run file with image paths made absolute and `output.dir` filled in.
    pub cfg: RunConfig,
    /// Grid, model, noise and training.
    pub nca: NcaConfig,
    /// The `[B, V, H, W]` target.
    pub target: HostTensor,
    /// The checkpoint to continue from, checked against `nca`.
    pub resume: Option<Resume>,
    /// The run directory.
    pub out: PathBuf,
    /// Whether the run continues in the directory of its checkpoint.
    pub in_place: bool,
    /// `config.ron` as it will be written.
    pub run_ron: String,
    /// `loss.csv` rows of the resumed run up to its checkpoint.
    pub history: Vec<LossRecord>,
    /// `psnr.csv` rows of the resumed run before its checkpoint.
    pub psnr_history: Vec<PsnrRow>,
}

/// A `psnr.csv` row: step, mean PSNR in dB, mean MSE.
pub(super) type PsnrRow = (u64, f64, f64);

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

/// Validates the run and decides where it goes; reads files, writes none.
pub(super) fn plan(args: &TrainArgs) -> Result<Plan> {
    let cfg = RunConfig::load(&args.config)?;
    let base = files::parent_dir(&args.config);
    let nca = cfg.nca();
    // Sizes first: the target and everything after it allocate in proportion to the grid.
    let limit = nca_api::MemoryLimit::from_env()?;
    crate::preflight::check_run(&cfg, &nca, args.backend, &limit)
        .with_context(|| format!("{}: the run cannot start", args.config.display()))?;
    let target = cfg
        .target
        .render_limited(&nca, &base, &limit)
        .with_context(|| format!("{}: cannot build the target", args.config.display()))?;
    let resume = match &args.resume {
        Some(path) => Some(load_resume(path, &nca, &args.config, &limit)?),
        None => None,
    };
    let out = choose_out_dir(args, &cfg)?;
    let in_place = args
        .resume
        .as_ref()
        .is_some_and(|r| files::same_dir(&files::parent_dir(r), &out));
    let mut inputs = vec![("run file", args.config.clone())];
    if let crate::target::Target::Image { path, .. } = &cfg.target {
        inputs.push(("target image", base.join(path)));
    }
    if let (Some(r), false) = (&resume, in_place) {
        inputs.push(("--resume checkpoint", r.path.clone()));
    }
    refuse_inputs_inside(&out, &inputs, args.force)?;
    if !in_place {
        files::check_new_dir(&out, args.force)?;
    }
    let (history, psnr_history) = match &resume {
        Some(r) => read_history(r)?,
        None => (Vec::new(), Vec::new()),
    };

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
    Ok(Plan {
        config_path: args.config.clone(),
        cfg: resolved,
        nca,
        target,
        resume,
        out,
        in_place,
        run_ron,
        history,
        psnr_history,
    })
}

/// `--out`, else the checkpoint's directory when resuming, else `output.dir`, else
/// `runs/STEM` (or the next free `runs/STEM-N` unless `--force`).
fn choose_out_dir(args: &TrainArgs, cfg: &RunConfig) -> Result<PathBuf> {
    Ok(match (&args.out, &args.resume, &cfg.output.dir) {
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
    })
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
        Err(IoError::Io { source, .. }) => Err(anyhow!(
            "cannot resume from {}: cannot read it: {source}",
            path.display()
        )),
        Err(e) => Err(anyhow!("cannot resume from {e}")),
    }
}

fn load_resume(
    path: &Path,
    nca: &NcaConfig,
    config_path: &Path,
    limit: &nca_api::MemoryLimit,
) -> Result<Resume> {
    let ckpt = read_checkpoint(path, limit)?;
    if let Some(tensor) = ckpt.first_non_finite() {
        bail!(
            "cannot resume from {}: tensor `{tensor}` holds NaN or infinite values, so \
             training would diverge at once; resume from an earlier checkpoint or start a \
             new run",
            path.display()
        );
    }
    if let Some(adam) = &ckpt.adam {
        // Adam takes one step per training step and may start later (a checkpoint without
        // moments), never earlier: a larger count is a corrupt file, and near u64::MAX it
        // would turn the bias correction into NaN a few steps in.
        if adam.step > ckpt.progress.step {
            bail!(
                "cannot resume from {}: metadata `adam.step` is {}, expected at most the \
                 checkpoint's step {} (metadata `nca.progress`)",
                path.display(),
                adam.step,
                ckpt.progress.step
            );
        }
    }
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
    // After the field comparison, which names the field; this catches a state tensor
    // that disagrees with the checkpoint's own config (a batch of 4 in a batch-1 run).
    if let Some(state) = &ckpt.state {
        let expected = nca.state_shape();
        if state.shape() != expected {
            bail!(
                "cannot resume from {}: tensor `state` has shape {:?}, but {} asks for \
                 [grid.batch, channels, grid.height, grid.width] = {expected:?}",
                path.display(),
                state.shape(),
                config_path.display()
            );
        }
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

/// The resumed run's `loss.csv` rows up to its checkpoint and `psnr.csv` rows before it
/// (the end-of-run score at the resume step is recomputed).
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
    psnr.retain(|row| row.0 < step);
    Ok((history, psnr))
}
