//! candle backend for `nca`: the 3×3 convolutional-attention transition and its
//! shortsighted Adam trainer, on candle tensors.
//!
//! [`CandleTrainer`] implements [`nca_api::Transition`] and [`nca_api::Trainer`]. Its state
//! is a candle [`Tensor`](candle_core::Tensor) `[B, C, H, W]` that stays on the device:
//! the forward pass, autograd, gradient clipping and the Adam update all run as candle
//! ops, and only the loss (one scalar per step) comes back to the host.
//!
//! # Features
//!
//! * default (no feature): the CPU device only. [`CandleTrainer::cpu`] works;
//!   [`CandleTrainer::cuda`] returns [`Error::CudaUnavailable`] asking for a rebuild.
//! * `cuda`: candle's CUDA backend ([`CandleTrainer::cuda`]). Building it needs the CUDA
//!   toolkit (`nvcc`) even for `cargo check`; running it needs an NVIDIA GPU and driver.
//!   Without a usable GPU the constructor returns [`Error::CudaUnavailable`] with the
//!   driver's message; it never panics.
//!
//! ```
//! use nca_api::{HostTensor, ModelConfig, OptimizerConfig, Transition, Weights};
//! let model = ModelConfig::default();
//! let mut t = nca_candle::CandleTrainer::cpu(&model, &OptimizerConfig::default())?;
//! t.set_weights(&Weights::init(&model, 0))?;
//! let s = t.upload(&HostTensor::zeros(&[1, 3, 8, 8]))?;
//! let next = t.step(&s)?;
//! assert_eq!(t.download(&next)?.shape(), &[1, 3, 8, 8]);
//! # Ok::<(), nca_candle::Error>(())
//! ```
#![warn(missing_docs)]

mod error;
mod trainer;
mod transition;

pub use error::Error;
pub use transition::CandleTrainer;
