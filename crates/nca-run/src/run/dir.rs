//! Phase 2: create the run directory and hold its exclusive lock for the whole run; only
//! with the lock held is anything in it removed or written.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result, ResultExt};

use super::plan::Plan;
use crate::files;

/// The run directory, locked against every other run until this value is dropped.
pub(super) struct RunDir {
    /// The directory.
    pub path: PathBuf,
    /// The open lock file; the advisory lock lives as long as this handle.
    _lock: File,
}

impl RunDir {
    /// Creates (if needed) and locks the planned directory, then makes it ready: for a new
    /// run, the CLI's old files are removed (`--force`); for an in-place resume, the frames
    /// after the checkpoint's step. Stale temporaries of killed runs go in both cases.
    pub fn open(plan: &Plan, path: &Path, force: bool) -> Result<Self> {
        let path = path.to_path_buf();
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let lock = lock(&path)?;
        if plan.in_place {
            files::remove_frames_after(&path, plan.resume.as_ref().map(|r| r.step()))?;
            files::remove_stale_temporaries(&path)?;
        } else {
            // Checked again under the lock: another run may have filled the directory
            // between planning and now.
            files::check_new_dir(&path, force)?;
            if force {
                files::remove_artefacts(&path)?;
            }
        }
        Ok(Self { path, _lock: lock })
    }
}

/// Takes the exclusive lock of `dir` and writes this process's pid into the lock file; a
/// directory locked by another process is refused at once, naming that process. The lock
/// lasts as long as the returned file is open.
pub fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(files::LOCK_FILE);
    // Not truncated on open: the holder's pid must stay readable for the message below.
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() {
                "another process".to_string()
            } else {
                format!("another nca-cli process (pid {holder})")
            };
            return Err(Error::Busy {
                dir: dir.to_path_buf(),
                lock: path,
                holder,
            });
        }
        Err(TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    let write_pid = |file: &mut File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        write!(file, "{}", std::process::id())?;
        file.flush()
    };
    write_pid(&mut file).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(file)
}
