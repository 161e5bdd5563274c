//! One training run of a convolutional-attention Neural Cellular Automaton, as a library:
//! the RON run file and its defaults sized to the grid, targets (procedural, image files,
//! arrays), the run directory (snapshots, GIFs, loss and PSNR plots, checkpoints with the
//! target and the run file, `summary.json`), resume, the regrowth score, rollouts and the
//! backend registry.
//!
//! `nca-cli` is a thin binary over this crate and the Python package `nca` calls it too,
//! so both refuse the same inputs with the same messages and compute the same numbers.
//! Nothing here prints: progress, scores and notes reach the caller as [`Event`](events::Event)s,
//! and failures as a typed [`Error`].
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod config;
pub mod error;
pub mod events;
pub mod files;
pub mod model;
pub mod plot;
pub mod preflight;
pub mod render;
pub mod rollout;
pub mod run;
pub mod score;
pub mod sizing;
pub mod target;

pub use backend::Backend;
pub use error::{Error, ErrorKind, Result};
