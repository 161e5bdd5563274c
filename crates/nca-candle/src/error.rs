//! The backend's error type.

use nca_api::{ConfigError, TensorError};

/// Everything that can go wrong in the candle backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A candle operation failed (shape, device or driver error).
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A host tensor or weight set had the wrong shape.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// The model config is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A CUDA device was requested but this build or this machine cannot provide one.
    #[error("CUDA is unavailable: {0}")]
    CudaUnavailable(String),
    /// A loss was requested before [`nca_api::Trainer::set_target`] was called.
    #[error("no target set: call set_target before computing a loss")]
    NoTarget,
}
