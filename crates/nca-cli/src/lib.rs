//! The `nca-cli` binary's library: RON run files, training runs that leave a complete run
//! directory (snapshots, GIF, loss CSV and plot, checkpoints, summary), resume, and
//! rollouts of a trained rule.
//!
//! Everything backend-specific is in [`backend::dispatch`]; the rest is written once over
//! [`nca_api::Trainer`]. See `crates/nca-cli/README.md` for the command line, the RON format
//! and the run directory.
#![warn(missing_docs)]

pub mod backend;
pub mod bench;
pub mod cli;
pub mod config;
pub mod files;
pub mod plot;
pub mod preflight;
pub mod render;
pub mod rollout;
pub mod run;
pub mod score;
pub mod target;
pub mod web;
