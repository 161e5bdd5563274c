//! Run directories: refusing to overwrite, checkpoints with the target, summaries.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nca_api::{Checkpoint, HostTensor, NcaConfig, Progress, TensorFile, Trainer};
use serde::Serialize;

/// Metadata key under which the CLI stores the resolved RON run config in a checkpoint.
pub const META_RUN_CONFIG: &str = "nca_cli.run_config";

/// Tensor name of the `[B, V, H, W]` target stored beside the weights.
pub const TARGET_TENSOR: &str = "target";

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

/// Makes `dir` ready for a new run: created if absent; an existing non-empty directory is
/// refused unless `force`, which removes only the CLI's own files from it.
pub fn prepare_new_dir(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!(
                "output path {} exists and is not a directory",
                dir.display()
            );
        }
        let non_empty = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .next()
            .is_some();
        if non_empty {
            if !force {
                bail!(
                    "output directory {} already exists and is not empty; refusing to \
                     overwrite a previous run (choose another with --out DIR, or pass --force \
                     to replace its results)",
                    dir.display()
                );
            }
            remove_artefacts(dir)?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Removes the CLI's files from `dir`.
fn remove_artefacts(dir: &Path) -> Result<()> {
    for name in ARTEFACTS {
        let p = dir.join(name);
        if p.is_file() {
            std::fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
        }
    }
    remove_frames_after(dir, None)
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
    let free = |p: &Path| -> bool {
        !p.exists() || std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_none())
    };
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
    /// Writes weights, Adam state, progress, carried state, target and run config to
    /// `path` atomically (temporary file, then rename).
    pub fn save<T: Trainer>(
        &self,
        trainer: &T,
        state: &T::State,
        progress: &Progress,
        path: &Path,
    ) -> Result<()> {
        let ckpt = Checkpoint {
            config: self.config.clone(),
            weights: trainer.weights()?,
            adam: Some(trainer.adam_state()?),
            progress: progress.clone(),
            state: Some(trainer.download(state)?),
            backend: self.backend.to_string(),
        };
        let mut file = ckpt.to_file();
        file.tensors
            .insert(TARGET_TENSOR.into(), self.target.clone());
        file.metadata
            .insert(META_RUN_CONFIG.into(), self.run_ron.to_string());
        file.write(path)
            .with_context(|| format!("cannot write checkpoint {}", path.display()))
    }
}

/// The target stored in a checkpoint written by the CLI, if any.
pub fn checkpoint_target(path: &Path) -> Result<Option<HostTensor>> {
    let mut file = TensorFile::read(path)?;
    Ok(file.tensors.remove(TARGET_TENSOR))
}

/// The resolved run file stored in a checkpoint written by the CLI, if it has one that
/// still parses.
pub fn checkpoint_run_config(path: &Path) -> Option<crate::config::RunConfig> {
    let file = TensorFile::read(path).ok()?;
    let text = file.metadata.get(META_RUN_CONFIG)?;
    crate::config::RunConfig::from_ron(text, &path.display().to_string()).ok()
}

/// Writes `value` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
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
