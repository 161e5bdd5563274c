//! Run directories: refusing to overwrite, checkpoints with the target, summaries.

use std::path::{Path, PathBuf};

use nca_api::{Checkpoint, HostTensor, NcaConfig, Progress, Trainer};
use serde::Serialize;

use crate::error::{bail, invalid, BackendResult, Result, ResultExt};

pub use nca_api::checkpoint::TARGET_TENSOR;

/// Files and folders the CLI writes into a run or rollout directory; `--force` removes
/// only these, never anything else a user keeps there.
const ARTEFACTS: [&str; 16] = [
    "config.ron",
    "target.png",
    "loss.csv",
    "loss.png",
    "trajectory.gif",
    "contact_sheet.png",
    "checkpoint.safetensors",
    "summary.json",
    "final.safetensors",
    "final.png",
    "rollout.gif",
    "rollout.json",
    "regrowth.png",
    "regrowth.gif",
    "psnr.csv",
    "psnr.png",
];

/// Folders of numbered frames the CLI writes.
const FRAME_DIRS: [&str; 2] = ["snapshots", "frames"];

/// Name of the lock file a training run holds in its run directory for the whole run; it
/// holds the pid of the holder as text. It is not a result: emptiness checks and `--force`
/// ignore it.
pub const LOCK_FILE: &str = ".nca-lock";

/// Makes `dir` ready for a new run: created if absent; an existing non-empty directory is
/// refused unless `force`, which removes only the CLI's own files from it.
pub fn prepare_new_dir(dir: &Path, force: bool) -> Result<()> {
    check_new_dir(dir, force)?;
    if force {
        remove_artefacts(dir)?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Refuses `dir` as the home of a new run when it is not a directory, or holds anything
/// besides the lock file and `force` is off. Reads only: nothing is created or removed.
pub fn check_new_dir(dir: &Path, force: bool) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        bail!(
            "output path {} exists and is not a directory",
            dir.display()
        );
    }
    if !force && !is_empty_dir(dir)? {
        bail!(
            "output directory {} already exists and is not empty; refusing to overwrite a \
             previous run (choose another with --out DIR, or pass --force to replace its \
             results)",
            dir.display()
        );
    }
    Ok(())
}

/// Whether `dir` holds nothing but (possibly) the lock file of an earlier run.
pub fn is_empty_dir(dir: &Path) -> Result<bool> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name() != LOCK_FILE {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes the CLI's files (and its stale temporaries) from `dir`; never the lock file,
/// which the caller holds.
pub fn remove_artefacts(dir: &Path) -> Result<()> {
    for name in ARTEFACTS {
        let p = dir.join(name);
        if p.is_file() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    remove_stale_temporaries(dir)?;
    remove_frames_after(dir, None)
}

/// Removes `.NAME.PID.tmp` files that a killed run of nca-cli left behind (NAME one of its
/// artefacts); other hidden files are the user's and stay.
pub fn remove_stale_temporaries(dir: &Path) -> Result<usize> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(0);
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_own_temporary(&name) && entry.path().is_file() {
            let p = entry.path();
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
            removed += 1;
        }
    }
    for sub in FRAME_DIRS {
        let frames = dir.join(sub);
        if frames.is_dir() {
            removed += remove_stale_temporaries(&frames)?;
        }
    }
    Ok(removed)
}

/// Whether `name` is a temporary of [`write_atomically`]: `.ARTEFACT.PID.tmp`.
fn is_own_temporary(name: &str) -> bool {
    let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
        return false;
    };
    let Some((artefact, pid)) = inner.rsplit_once('.') else {
        return false;
    };
    let numbered_frame = artefact.starts_with("step_") && artefact.ends_with(".png");
    !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && (ARTEFACTS.contains(&artefact) || numbered_frame)
}

pub use nca_api::io::temporary_path;

/// Writes `bytes` to `path` through [`temporary_path`], a sync and a rename; on failure
/// the temporary is removed and `path` is untouched.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    nca_api::io::write_atomically(path, bytes).map_err(|e| match e {
        nca_api::IoError::Io { source, .. } => {
            crate::error::Error::from(source).context(format!("cannot write {}", path.display()))
        }
        other => crate::error::Error::from(other),
    })
}

/// Lets `write` produce the file at a temporary path and renames it to `path` when it
/// succeeded; on failure the temporary is removed and `path` is untouched. Returns whether
/// a file was written (some writers write nothing when there is nothing to show).
pub fn write_artefact(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<bool> {
    let tmp = temporary_path(path);
    let result = write(&tmp);
    if let Err(e) = result {
        // The temporary may be partial or absent; either way it is not a result.
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", path.display())));
    }
    if !tmp.exists() {
        return Ok(false);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        crate::error::Error::from(e).context(format!("cannot write {}", path.display()))
    })?;
    Ok(true)
}

/// Removes numbered frames after `step` (all with `None`): when a run resumes in place
/// they belong to a future that is being recomputed.
pub fn remove_frames_after(dir: &Path, step: Option<u64>) -> Result<()> {
    for sub in FRAME_DIRS {
        for (s, p) in crate::render::list_steps(&dir.join(sub))? {
            if step.is_none_or(|keep| s > keep) {
                std::fs::remove_file(&p)
                    .with_context(|| format!("cannot remove {}", p.display()))?;
            }
        }
    }
    Ok(())
}

/// `base` if it is free (absent or an empty directory), else the first free `base-2`,
/// `base-3`, …: a default run directory never overwrites an earlier run.
pub fn next_free_dir(base: &Path) -> Result<PathBuf> {
    let free = |p: &Path| -> bool { !p.exists() || is_empty_dir(p).unwrap_or(false) };
    if free(base) {
        return Ok(base.to_path_buf());
    }
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    for i in 2..10_000 {
        let p = base.with_file_name(format!("{name}-{i}"));
        if free(&p) {
            return Ok(p);
        }
    }
    bail!(
        "{} and its numbered successors up to -9999 are all taken; pass --out DIR",
        base.display()
    )
}

/// Whether two paths name the same existing directory.
pub fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The directory holding `file` (`.` for a bare file name).
pub fn parent_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// What a checkpoint is written from.
pub struct CheckpointParts<'a> {
    /// Grid, model, noise and training of the run.
    pub config: &'a NcaConfig,
    /// Backend name, stored for information.
    pub backend: &'a str,
    /// The `[B, V, H, W]` target, stored so a rollout can show and score against it.
    pub target: &'a HostTensor,
    /// The resolved RON run config.
    pub run_ron: &'a str,
}

impl CheckpointParts<'_> {
    /// The checkpoint of the trainer's weights, Adam state and carried state at
    /// `progress`, with the target and run file; with a moving average of the weights in
    /// `progress`, the average is the checkpoint's weights and the trainer's are its
    /// training weights.
    pub fn capture<T: Trainer>(
        &self,
        trainer: &T,
        state: &T::State,
        progress: &Progress,
    ) -> Result<Checkpoint> {
        let rule = self.capture_weights(trainer, progress)?;
        // Training continues from the trainer's weights; with an average they are kept
        // beside it.
        let training_weights = match progress.average {
            Some(_) => Some(trainer.weights().backend()?),
            None => None,
        };
        Ok(Checkpoint {
            training_weights,
            adam: Some(trainer.adam_state().backend()?),
            state: Some(trainer.download(state).backend()?),
            ..rule
        })
    }

    /// The checkpoint of the rule at `progress` (the moving average of the weights when
    /// `progress` has one, else the trainer's weights), with the target and run file but
    /// no optimiser or carried state: a rule to roll out, not a run to resume.
    pub fn capture_weights<T: Trainer>(
        &self,
        trainer: &T,
        progress: &Progress,
    ) -> Result<Checkpoint> {
        let weights = match &progress.average {
            Some(average) => average.clone(),
            None => trainer.weights().backend()?,
        };
        Ok(Checkpoint {
            config: self.config.clone(),
            weights,
            training_weights: None,
            adam: None,
            // The average is stored as the weights, not again in the progress.
            progress: Progress {
                average: None,
                ..progress.clone()
            },
            state: None,
            backend: self.backend.to_string(),
            target: Some(self.target.clone()),
            run_file: Some(self.run_ron.to_string()),
        })
    }
}

/// Writes `ckpt` to `path` atomically (temporary file, sync, rename; the temporary is
/// removed when the write fails).
pub fn write_checkpoint(ckpt: &Checkpoint, path: &Path) -> Result<()> {
    let bytes = ckpt
        .to_file()
        .to_bytes()
        .map_err(|message| invalid!("cannot encode checkpoint {}: {message}", path.display()))?;
    write_atomically(path, &bytes)
}

/// The run file stored in a checkpoint, read back (`None` when absent or no longer
/// readable by this version).
pub fn stored_run_config(ckpt: &Checkpoint, path: &Path) -> Option<crate::config::RunConfig> {
    let text = ckpt.run_file.as_deref()?;
    crate::config::RunConfig::from_ron(text, &path.display().to_string()).ok()
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    write_atomically(path, (text + "\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_free_dir_counts_up_past_used_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = tmp.path().join("cat");
        assert_eq!(next_free_dir(&base).expect("free"), base);
        std::fs::create_dir_all(&base).expect("mkdir");
        assert_eq!(next_free_dir(&base).expect("empty is free"), base);
        std::fs::write(base.join("summary.json"), "{}").expect("write");
        let second = tmp.path().join("cat-2");
        assert_eq!(next_free_dir(&base).expect("next"), second);
        std::fs::create_dir_all(&second).expect("mkdir");
        std::fs::write(second.join("x"), "").expect("write");
        assert_eq!(
            next_free_dir(&base).expect("next"),
            tmp.path().join("cat-3")
        );
    }

    #[test]
    fn only_own_temporaries_count_as_stale() {
        assert!(is_own_temporary(".checkpoint.safetensors.1234.tmp"));
        assert!(is_own_temporary(".summary.json.7.tmp"));
        assert!(is_own_temporary(".step_000010.png.99.tmp"));
        assert!(!is_own_temporary(".notes.tmp"));
        assert!(!is_own_temporary(".checkpoint.safetensors.tmp"));
        assert!(!is_own_temporary(".mine.txt.12.tmp"));
        assert!(!is_own_temporary("checkpoint.safetensors.12.tmp"));
    }

    #[test]
    fn refuses_non_empty_dirs_and_force_keeps_foreign_files() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run");
        prepare_new_dir(&dir, false).expect("new dir is fine");
        prepare_new_dir(&dir, false).expect("empty dir is fine");
        std::fs::write(dir.join("summary.json"), "{}").expect("write");
        std::fs::write(dir.join("notes.txt"), "mine").expect("write");
        let err = prepare_new_dir(&dir, false).expect_err("refused");
        assert!(format!("{err}").contains("--force"));
        prepare_new_dir(&dir, true).expect("forced");
        assert!(!dir.join("summary.json").exists());
        assert!(dir.join("notes.txt").exists());
    }
}
