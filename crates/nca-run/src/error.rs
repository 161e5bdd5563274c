//! The error of every run, rollout and benchmark: a typed cause with the context it
//! happened in, so the binary can print one sentence and a Python binding can raise the
//! right exception.
//!
//! [`Error::Context`] wraps an earlier error with what was being done ("cannot build the
//! target"); its `Display` is the context alone and `source()` is the cause, so printing
//! the chain (`{:#}` through `anyhow`, or [`Error::report`]) reads
//! `context: cause: root`. [`Error::kind`] looks through the contexts at the root cause.

use std::fmt;
use std::path::PathBuf;

use nca_api::{ConfigError, IoError, MemoryError, TensorError, TrainError};

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a run, rollout or benchmark failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A value the user gave is out of range or inconsistent (a run-file field, a flag, a
    /// checkpoint that does not fit the run); the message names it and what was expected.
    #[error("{0}")]
    Invalid(String),
    /// A config section of nca-api refused a field.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// What the command needs exceeds the memory limit.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Reading or writing a file failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A safetensors file or checkpoint could not be read or is not what it should be.
    #[error(transparent)]
    File(#[from] IoError),
    /// A tensor has the wrong shape.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// A picture could not be decoded or encoded.
    #[error(transparent)]
    Image(#[from] image::ImageError),
    /// JSON could not be written or read.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A config could not be written as RON.
    #[error(transparent)]
    Ron(#[from] ron::Error),
    /// The backend failed (or refused the model).
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The backend asked for is not compiled into this build.
    #[error(
        "the {name} backend is not compiled into this binary; rebuild with the cargo feature \
         `{feature}`, e.g. `cargo run -p nca-cli --features {feature} -- --backend {name} \
         run.ron`"
    )]
    NotCompiled {
        /// The backend's name.
        name: &'static str,
        /// The cargo feature that compiles it in.
        feature: &'static str,
    },
    /// The run directory is locked by another run.
    #[error(
        "run directory {} is in use by {holder}, which holds its lock {}; wait for that run \
         to end, or write to another directory with --out DIR",
        dir.display(),
        lock.display()
    )]
    Busy {
        /// The run directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
        /// Who holds it ("another nca-cli process (pid 123)").
        holder: String,
    },
    /// The training loss or the weights became NaN or infinite.
    #[error("{0}")]
    Diverged(String),
    /// The user stopped the work (Ctrl-C, a signal, a callback returning stop).
    #[error("interrupted")]
    Interrupted,
    /// An error with what was being done when it happened.
    #[error("{context}")]
    Context {
        /// What was being done, naming the file or field.
        context: String,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
    /// An error said in other words (a flag's name instead of the field it sets), of the
    /// same kind as the error it replaces.
    #[error("{message}")]
    Reworded {
        /// The new message.
        message: String,
        /// The replaced error's kind.
        kind: ErrorKind,
    },
    /// A training run failed: its first failure, the ones after it, and what is on disk.
    #[error(transparent)]
    RunFailed(#[from] Box<crate::run::RunFailed>),
}

/// The broad class of an [`Error`], for callers that map errors onto their own (an exit
/// code, a Python exception).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad input: a field, flag, file content or combination the user can change.
    Invalid,
    /// A file that must be read does not exist.
    NotFound,
    /// Reading or writing failed for another reason.
    Io,
    /// The memory limit refused the work.
    Memory,
    /// The backend failed, is missing or the run diverged.
    Backend,
    /// The run directory is in use.
    Busy,
    /// Stopped by the user.
    Interrupted,
}

impl Error {
    /// An error from a backend's own error type.
    pub fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> Self {
        Error::Backend(Box::new(e))
    }

    /// Wraps `self` with what was being done.
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error::Context {
            context: context.to_string(),
            source: Box::new(self),
        }
    }

    /// The same error said as `message`, keeping its [`ErrorKind`].
    pub fn reworded(self, message: impl Into<String>) -> Self {
        Error::Reworded {
            kind: self.kind(),
            message: message.into(),
        }
    }

    /// The cause under all contexts.
    pub fn root(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.root(),
            Error::RunFailed(r) => r.first.root(),
            other => other,
        }
    }

    /// The broad class of the root cause.
    pub fn kind(&self) -> ErrorKind {
        match self.root() {
            Error::Invalid(_)
            | Error::Config(_)
            | Error::Tensor(_)
            | Error::Json(_)
            | Error::Ron(_) => ErrorKind::Invalid,
            Error::Image(image::ImageError::IoError(e)) | Error::Io(e) => io_kind(e),
            Error::Image(_) => ErrorKind::Invalid,
            Error::File(IoError::Io { source, .. }) => io_kind(source),
            Error::File(IoError::Memory { .. }) | Error::Memory(_) => ErrorKind::Memory,
            Error::File(_) => ErrorKind::Invalid,
            Error::Backend(_) | Error::NotCompiled { .. } | Error::Diverged(_) => {
                ErrorKind::Backend
            }
            Error::Busy { .. } => ErrorKind::Busy,
            Error::Interrupted => ErrorKind::Interrupted,
            Error::Reworded { kind, .. } => *kind,
            Error::Context { .. } | Error::RunFailed(_) => ErrorKind::Invalid,
        }
    }

    /// The whole chain on one line, `context: cause: root`, as the CLI prints it.
    pub fn report(&self) -> String {
        let mut out = self.to_string();
        let mut next = std::error::Error::source(self);
        while let Some(e) = next {
            out.push_str(": ");
            out.push_str(&e.to_string());
            next = e.source();
        }
        out
    }
}

fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::OutOfMemory => ErrorKind::Memory,
        _ => ErrorKind::Io,
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<TrainError<E>> for Error {
    fn from(e: TrainError<E>) -> Self {
        match e {
            TrainError::NonFiniteLoss { .. } => Error::Diverged(e.to_string()),
            other => Error::backend(other),
        }
    }
}

/// `context` and `with_context` on results, as `anyhow` spells them, producing [`Error`].
pub trait ResultExt<T> {
    /// Wraps the error with `context`.
    fn context(self, context: impl fmt::Display) -> Result<T>;
    /// Wraps the error with the context `f` returns (computed only on error).
    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context(self, context: impl fmt::Display) -> Result<T> {
        self.map_err(|e| e.into().context(context))
    }

    fn with_context<C: fmt::Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| e.into().context(f()))
    }
}

/// `.backend()` on a backend's result: its error as [`Error::Backend`].
pub trait BackendResult<T> {
    /// Converts the backend's error.
    fn backend(self) -> Result<T>;
}

impl<T, E: std::error::Error + Send + Sync + 'static> BackendResult<T>
    for std::result::Result<T, E>
{
    fn backend(self) -> Result<T> {
        self.map_err(Error::backend)
    }
}

/// Returns early with [`Error::Invalid`] and a formatted message.
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::error::Error::Invalid(format!($($arg)*)))
    };
}

/// An [`Error::Invalid`] with a formatted message.
macro_rules! invalid {
    ($($arg:tt)*) => {
        $crate::error::Error::Invalid(format!($($arg)*))
    };
}

pub(crate) use {bail, invalid};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_reads_like_a_context_chain_and_the_kind_looks_at_the_root() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let e = Error::from(io)
            .context("cannot read cat.png")
            .context("run.ron: cannot build the target");
        assert_eq!(
            e.report(),
            "run.ron: cannot build the target: cannot read cat.png: No such file"
        );
        assert_eq!(e.kind(), ErrorKind::NotFound);
        let e = invalid!("invalid config field `grid.height`: expected >= 1").context("run.ron");
        assert_eq!(e.kind(), ErrorKind::Invalid);
    }
}
