//! `nca-cli`: train a convolutional-attention NCA from a RON file, or roll one out.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use nca_cli::cli::Finish;
use nca_cli::cli::{run, Cli};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `RUST_LOG` takes `level` or `target=level` directives (`debug`, `nca_cli=debug,warn`).
    // Targets rather than EnvFilter: EnvFilter brings a regex engine (about 30 s of a cold
    // build on two cores) for span and field filters a training log does not need.
    let (filter, bad_filter) = match std::env::var("RUST_LOG") {
        Ok(text) => match text.parse::<Targets>() {
            Ok(t) => (t, None),
            Err(e) => (
                Targets::new().with_default(LevelFilter::INFO),
                Some((text, e)),
            ),
        },
        Err(_) => (Targets::new().with_default(LevelFilter::INFO), None),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .with(filter)
        .init();
    if let Some((text, e)) = bad_filter {
        tracing::warn!("RUST_LOG={text:?} ignored ({e}); logging at info");
    }
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&interrupt);
    // The first Ctrl-C asks the loop to stop after the current step and write everything;
    // a second one is an impatient user and ends the process at once.
    let handler = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("second Ctrl-C: exiting without writing results");
            std::process::exit(130);
        }
    });
    if let Err(e) = handler {
        tracing::warn!("Ctrl-C will not stop training cleanly: {e}");
    }
    match run(cli, interrupt) {
        Ok(Finish::Completed) => ExitCode::SUCCESS,
        Ok(Finish::Interrupted) => {
            eprintln!("interrupted: results so far are written");
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
