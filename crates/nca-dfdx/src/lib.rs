//! dfdx backend for `nca`: the 3×3 convolutional-attention transition written with dfdx
//! tensor ops, trained with dfdx's tape autodiff and an exact PyTorch-style Adam.
//!
//! * dfdx is unmaintained: 0.13.0 (July 2023) is its last release, so it is pinned to
//!   `=0.13.0`. This crate uses it on the CPU only (`default-features = false`,
//!   `std`, `fast-alloc`, `cpu`); dfdx's `cuda` feature is never enabled.
//! * On stable rustc dfdx has no `conv2d` and no `unfold`, so the 3×3 neighbourhood is a
//!   zero-padded state cut into nine shifted slices (see [`transition`]).
//! * Shapes (B, C, H, W, D) are known only at run time, so every tensor uses dfdx's
//!   dynamic `usize` dimensions; the element type is `f32`.
//!
//! Run the tests (conformance suite and the dfdx ↔ ndarray checkpoint exchange) with
//!
//! ```text
//! cargo test -p nca-dfdx
//! ```
#![warn(missing_docs)]

pub mod trainer;
pub mod transition;

pub use trainer::DfdxTrainer;
pub use transition::State;

/// Everything that can go wrong in the dfdx backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor handed in had the wrong shape, rank or size.
    #[error(transparent)]
    Tensor(#[from] nca_api::TensorError),
    /// The model configuration is invalid.
    #[error(transparent)]
    Config(#[from] nca_api::ConfigError),
    /// dfdx's CPU device failed (out of memory or a bad element count).
    #[error("dfdx CPU device: {0}")]
    Device(#[from] dfdx::tensor::CpuError),
    /// A loss was requested before [`nca_api::Trainer::set_target`].
    #[error("no target set: call set_target before computing a loss")]
    NoTarget,
    /// The target's batch or grid size differs from the state's.
    #[error("target shape {target:?} does not match state shape {state:?} (batch, height, width must agree)")]
    TargetMismatch {
        /// Shape `[B, V, H, W]` of the target.
        target: Vec<usize>,
        /// Shape `[B, C, H, W]` of the state.
        state: Vec<usize>,
    },
}
