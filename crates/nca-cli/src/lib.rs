//! The `nca-cli` binary's library: argument parsing, progress display and the web page
//! command. The run itself (run files, targets, training, resume, scoring, pictures,
//! rollouts, the backend registry) is the `nca-run` crate.
#![warn(missing_docs)]

pub mod cli;
pub mod web;
