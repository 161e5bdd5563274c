//! `nca-cli`: train a convolutional-attention NCA from a RON file, or roll one out.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use clap::Parser;
use nca_cli::cli::Finish;
use nca_cli::cli::{run, Cli, Command};
#[cfg(unix)]
use signal_hook::consts::SIGHUP;
use signal_hook::consts::{SIGINT, SIGTERM};
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
    let signal = Arc::new(AtomicUsize::new(0));
    // Only training, rollouts and `web --serve` look at the flag; any other command keeps
    // the default: the first signal ends it.
    let honoured = match &cli.command {
        None | Some(Command::Rollout(_)) => true,
        Some(Command::Web(w)) => w.serve,
        Some(Command::Bench(_)) => false,
    };
    let watched = watch_stop_signals(Arc::clone(&interrupt), Arc::clone(&signal), honoured);
    if let Err(e) = watched {
        tracing::warn!("Ctrl-C, SIGTERM and SIGHUP will not stop training cleanly: {e}");
    }
    // The exit status of a process stopped by signal N is 128 + N, as the shell reports
    // one that the signal killed, so scripts and supervisors read it the usual way.
    let stopped_by = || {
        let sig = signal.load(Ordering::SeqCst);
        let sig = if sig == 0 { SIGINT as usize } else { sig };
        (signal_name(sig), u8::try_from(128 + sig).unwrap_or(1))
    };
    match run(cli, interrupt) {
        Ok(Finish::Completed) => ExitCode::SUCCESS,
        Ok(Finish::Interrupted) => {
            let (name, code) = stopped_by();
            eprintln!("interrupted by {name}: results so far are written");
            ExitCode::from(code)
        }
        Ok(Finish::Stopped) => ExitCode::from(stopped_by().1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The signals that stop a run cleanly: Ctrl-C, `kill`'s default and a closed terminal.
#[cfg(unix)]
const STOP_SIGNALS: [i32; 3] = [SIGINT, SIGTERM, SIGHUP];
/// The signals that stop a run cleanly: Ctrl-C and a termination request.
#[cfg(not(unix))]
const STOP_SIGNALS: [i32; 2] = [SIGINT, SIGTERM];

/// The name of a stop signal, for messages.
fn signal_name(sig: usize) -> &'static str {
    match i32::try_from(sig) {
        Ok(SIGTERM) => "SIGTERM",
        #[cfg(unix)]
        Ok(SIGHUP) => "SIGHUP",
        _ => "Ctrl-C",
    }
}

/// The first stop signal records its number in `signal` and sets `interrupt`, which asks
/// the work to stop after the current step and write everything; a second one is an
/// impatient user (or a supervisor that gave up waiting) and ends the process at once.
/// When the command does not look at `interrupt` (`honoured` false), nothing is installed
/// and the first signal ends the process as usual.
#[cfg(unix)]
fn watch_stop_signals(
    interrupt: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
    honoured: bool,
) -> std::io::Result<()> {
    if !honoured {
        return Ok(());
    }
    let mut signals = signal_hook::iterator::Signals::new(STOP_SIGNALS)?;
    // A thread of our own rather than a handler: it may print and exit, which a signal
    // handler may not.
    std::thread::Builder::new()
        .name("stop-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let Ok(number) = usize::try_from(sig) else {
                    continue;
                };
                if signal
                    .compare_exchange(0, number, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    interrupt.store(true, Ordering::SeqCst);
                } else {
                    eprintln!(
                        "second stop signal ({}): exiting without writing results",
                        signal_name(number)
                    );
                    std::process::exit(128 + sig);
                }
            }
        })?;
    Ok(())
}

/// As on Unix, without the message on the second signal: no thread can wait for
/// signals here, and a handler must not print.
#[cfg(not(unix))]
fn watch_stop_signals(
    interrupt: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
    honoured: bool,
) -> std::io::Result<()> {
    use signal_hook::flag;
    if !honoured {
        return Ok(());
    }
    for sig in STOP_SIGNALS {
        // Registered first, so it sees the flag as the previous signal left it.
        flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&interrupt))?;
        flag::register_usize(sig, Arc::clone(&signal), sig as usize)?;
        flag::register(sig, Arc::clone(&interrupt))?;
    }
    Ok(())
}
