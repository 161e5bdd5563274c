//! Error types of the API crate.

use std::path::PathBuf;

/// A tensor had the wrong size, rank or shape.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum TensorError {
    /// The element count does not match the requested shape.
    #[error(
        "shape {expected:?} needs {} elements but {len} were given",
        element_count_text(expected)
    )]
    ShapeMismatch {
        /// Requested shape.
        expected: Vec<usize>,
        /// Elements supplied.
        len: usize,
    },
    /// A named tensor does not have the expected shape.
    #[error("{what}: expected shape {expected:?}, found {found:?}")]
    WrongShape {
        /// What the tensor is.
        what: String,
        /// Expected shape.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A named tensor does not have the expected rank.
    #[error("{what}: expected a rank-{expected} tensor, found shape {found:?}")]
    WrongRank {
        /// What the tensor is.
        what: String,
        /// Expected rank.
        expected: usize,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A tensor's element count overflows usize.
    #[error("{what}: shape {shape:?} has more elements than fit in memory")]
    TooManyElements {
        /// What the tensor is.
        what: String,
        /// The requested shape.
        shape: Vec<usize>,
    },
    /// A tensor needed by the model is absent.
    #[error("missing tensor `{0}`")]
    Missing(String),
    /// A tensor the model does not have was given.
    #[error("unexpected tensor `{0}`")]
    Unexpected(String),
}

/// A configuration value is out of range or inconsistent.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("invalid config field `{field}`: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `noise.sigma_small`.
    pub field: String,
    /// What was expected.
    pub message: String,
}

/// Reading or writing a safetensors file failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Reading the file would exceed the memory limit.
    #[error("{}: {source}", path.display())]
    Memory {
        /// The file.
        path: PathBuf,
        /// How much it needs and the limit.
        source: MemoryError,
    },
    /// The file is not valid safetensors or lacks something the model needs.
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
}

/// Training stopped with an error; `E` is the backend's error type and `O` the
/// observer's (see [`crate::Observer::Error`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError<
    E: std::error::Error + 'static,
    O: std::error::Error + 'static = std::convert::Infallible,
> {
    /// The backend failed.
    #[error("backend error at step {step}: {source}")]
    Backend {
        /// Step (1-based) being computed.
        step: u64,
        /// The backend's error.
        #[source]
        source: E,
    },
    /// The loss became NaN or infinite.
    #[error(
        "loss became {loss} at step {step}; try a lower learning rate, a state clamp \
         (model.state_clamp) or gradient clipping (training.grad_clip)"
    )]
    NonFiniteLoss {
        /// Step (1-based) whose loss was not finite.
        step: u64,
        /// The offending value.
        loss: f32,
    },
    /// The observer failed (writing a file, scoring the rule, …).
    #[error("observer failed at step {step}: {source}")]
    Observer {
        /// Step (1-based) after which the observer failed.
        step: u64,
        /// The observer's error, whole.
        #[source]
        source: O,
    },
}

/// A request exceeds the memory limit, or the limit itself is malformed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryError {
    /// The estimate exceeds the limit.
    #[error(
        "{what} needs {}, more than the memory limit of {} ({limit_from}); {hint}",
        format_bytes(*need),
        format_bytes(*limit)
    )]
    TooLarge {
        /// What would be allocated.
        what: String,
        /// Estimated bytes.
        need: u64,
        /// The limit in bytes.
        limit: u64,
        /// Where the limit came from.
        limit_from: String,
        /// Which field to change.
        hint: String,
    },
    /// The estimate does not even fit in 64 bits.
    #[error(
        "{what} needs more than 2^64 bytes (its size overflows), more than any memory \
         limit ({} from {limit_from}); {hint}",
        format_bytes(*limit)
    )]
    Overflow {
        /// What would be allocated.
        what: String,
        /// The limit in bytes.
        limit: u64,
        /// Where the limit came from.
        limit_from: String,
        /// Which field to change.
        hint: String,
    },
    /// `$NCA_MEMORY_LIMIT` is not a positive byte count.
    #[error(
        "{variable}={value:?}: expected a positive byte count with an optional K, M, G or T \
         suffix (binary: 8G = 8 GiB), e.g. 8G, 512M or 1500000000"
    )]
    BadLimit {
        /// The environment variable.
        variable: String,
        /// Its value.
        value: String,
    },
}

/// Bytes as `12.0 GiB`, `340.5 MiB` or `512 bytes`.
pub fn format_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    if bytes >= GIB {
        format!("{:.1} GiB", bytes as f64 / GIB as f64)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{bytes} bytes")
    }
}

/// The element count of `shape` for a message; a product that overflows usize is said so.
fn element_count_text(shape: &[usize]) -> String {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .map_or_else(|| "more than 2^64".to_string(), |n| n.to_string())
}
