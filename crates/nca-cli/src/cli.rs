//! Command-line parsing, the top-level entry point, and how the run's events are shown
//! (a progress bar on a terminal, log lines otherwise).

use std::io::IsTerminal;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use nca_run::bench::{bench, describe_model, BenchArgs, BenchLine};
use nca_run::events::{Event, Events, Level};
use nca_run::rollout::{rollout, RolloutRequest};
use nca_run::run::{Output, RunResult, Status, Summary, TrainRequest};
use nca_run::score;

/// How a command ended when it did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Ran to its end (steps or `max_spikes`).
    Completed,
    /// Stopped early by Ctrl-C, SIGTERM or SIGHUP; everything was still written.
    Interrupted,
    /// Stopped by one of those signals with nothing to write (`web --serve`).
    Stopped,
}

/// A backend name as given to `--backend` (the names of [`nca_run::Backend`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Pure-Rust ndarray backend (always compiled).
    Ndarray,
    /// dfdx on the CPU (feature `dfdx`).
    Dfdx,
    /// candle on the CPU (feature `candle`).
    Candle,
    /// candle on CUDA device 0 (feature `candle-cuda`).
    CandleCuda,
}

impl From<Backend> for nca_run::Backend {
    fn from(b: Backend) -> Self {
        match b {
            Backend::Ndarray => nca_run::Backend::Ndarray,
            Backend::Dfdx => nca_run::Backend::Dfdx,
            Backend::Candle => nca_run::Backend::Candle,
            Backend::CandleCuda => nca_run::Backend::CandleCuda,
        }
    }
}

/// Train a convolutional-attention Neural Cellular Automaton from a RON run file, or roll
/// out a trained one.
#[derive(Debug, Parser)]
#[command(
    name = "nca-cli",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "`nca-cli` is the binary of this crate: run it as `cargo run -p nca-cli -- ARGS` \
                  from the repository, or install it with `cargo install --path crates/nca-cli` \
                  (it lands in ~/.cargo/bin).\n\nExamples:\n  nca-cli examples/cat.ron\n  nca-cli examples/red.ron\n  nca-cli --backend candle run.ron --out runs/try2\n  nca-cli run.ron --resume runs/run/checkpoint.safetensors\n  nca-cli rollout --checkpoint runs/red/checkpoint.safetensors --steps 200 --out runs/red-rollout\n  nca-cli bench --sizes 32,128 --batches 1,8\n  nca-cli web --checkpoint runs/cat/best.safetensors --out runs/cat-web --serve\n\n\
                  Memory: sizes are estimated before anything is allocated or written, and a \
                  command that would need more than NCA_MEMORY_LIMIT (e.g. 8G, 512M; default: \
                  half of physical memory) is refused with the field or flag to change. A run \
                  locks its directory (DIR/.nca-lock) while it runs; a second run there is \
                  refused, naming the first one's pid."
)]
pub struct Cli {
    /// RON run file to train with (see crates/nca-cli/README.md for the format).
    #[arg(value_name = "RUN.ron", required = true)]
    pub config: Option<PathBuf>,
    /// Run directory (default: output.dir of the run file, else runs/STEM where STEM is
    /// the run file's name without extension; with --resume, the checkpoint's directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue training from a checkpoint written by an earlier run.
    #[arg(long, value_name = "CHECKPOINT")]
    pub resume: Option<PathBuf>,
    /// Replace the results of a previous run in the output directory.
    #[arg(long)]
    pub force: bool,
    /// Backend to compute with [default: ndarray]; all but ndarray need their cargo feature.
    #[arg(long, value_enum, global = true)]
    pub backend: Option<Backend>,
    /// A subcommand instead of training.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Dies as `kill -9` would right after the first checkpoint written at or after step
    /// STEP: a crash at a known point, for the tests of what a crash leaves on disk.
    #[arg(long, value_name = "STEP", hide = true)]
    pub abort_after_checkpoint: Option<u64>,
}

/// How the memory limit is set, for `--help`.
pub const MEMORY_HELP: &str = "Memory: sizes are estimated before anything is allocated or \
    written, and a command that would need more than NCA_MEMORY_LIMIT (e.g. 8G, 512M; \
    default: half of physical memory) is refused with the field or flag to change.";

/// Subcommands besides training.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a trained rule without training, from seeded N(0, 1) noise or a given state.
    #[command(after_help = MEMORY_HELP)]
    Rollout(RolloutCli),
    /// Measure training steps per second of every compiled backend on this machine.
    #[command(after_help = MEMORY_HELP)]
    Bench(BenchCli),
    /// Write a static web page that runs a trained rule in the browser (WebAssembly).
    Web(WebCli),
}

/// Arguments of `nca-cli web`.
#[derive(Debug, clap::Args)]
pub struct WebCli {
    /// Checkpoint holding the trained rule.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Folder to write index.html, nca.js, nca.wasm and weights.safetensors to.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the files of a non-empty folder.
    #[arg(long)]
    pub force: bool,
    /// Use this built nca_web.wasm instead of building it with cargo [env: NCA_WEB_WASM].
    #[arg(long, value_name = "WASM")]
    pub wasm: Option<PathBuf>,
    /// Then serve the folder on 127.0.0.1 and print the URL (Ctrl-C stops).
    #[arg(long)]
    pub serve: bool,
    /// Port for --serve (0: any free port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
}

/// Arguments of `nca-cli bench`.
#[derive(Debug, clap::Args)]
pub struct BenchCli {
    /// Backends to measure [default: --backend if given, else every backend compiled into
    /// this binary].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub backends: Vec<Backend>,
    /// Measure this run file's model, noise and optimiser, on its grid and batch unless
    /// --sizes / --batches say otherwise [default: the default (picture) model].
    #[arg(long, value_name = "RUN.ron")]
    pub config: Option<PathBuf>,
    /// Grid sides to measure (square grids) [default: 32,128, or the run file's grid].
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Batch sizes to measure [default: 1,8, or the run file's batch].
    #[arg(long, value_delimiter = ',')]
    pub batches: Vec<usize>,
    /// Wall time per measurement, in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub seconds: f64,
}

/// Arguments of `nca-cli rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutCli {
    /// Checkpoint holding the trained rule.
    #[arg(long, value_name = "CKPT")]
    pub checkpoint: PathBuf,
    /// Start from tensor `state` ([B, C, H, W]) of this safetensors file instead of noise.
    #[arg(long, value_name = "STATE.safetensors")]
    pub init: Option<PathBuf>,
    /// Steps to run.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Noise σ added before every step, 0 to 100 [default: the checkpoint's
    /// noise.sigma_small]; 0 makes the rollout deterministic.
    #[arg(long, value_name = "SIGMA", allow_negative_numbers = true)]
    pub noise: Option<f32>,
    /// Seed of the initial noise and of the per-step noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (refused if it exists and is not empty, unless --force).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace the results of a previous rollout in the output directory.
    #[arg(long)]
    pub force: bool,
    /// Save a frame every N steps [default: about 100 frames in all].
    #[arg(long, value_name = "N")]
    pub frame_every: Option<u64>,
    /// Nearest-neighbour upscale factor of the frames.
    #[arg(long, default_value_t = 8)]
    pub scale: u32,
    /// Delay between GIF frames in milliseconds.
    #[arg(long, default_value_t = 60)]
    pub gif_frame_ms: u32,
    /// Rollout steps of the regrowth score [default: the run file's evaluation.steps,
    /// else 100].
    #[arg(long, value_name = "N")]
    pub eval_steps: Option<u64>,
    /// Fresh-noise starts of the regrowth score [default: the run file's
    /// evaluation.seeds, else 3].
    #[arg(long, value_name = "N")]
    pub eval_seeds: Option<usize>,
}

/// Runs the parsed command; `interrupt` is set by Ctrl-C, SIGTERM or SIGHUP.
pub fn run(cli: Cli, interrupt: Arc<AtomicBool>) -> Result<Finish> {
    let backend: Option<nca_run::Backend> = cli.backend.map(Into::into);
    match cli.command {
        Some(Command::Bench(b)) => {
            if !(b.seconds.is_finite() && b.seconds > 0.0) {
                anyhow::bail!("--seconds: expected a duration > 0, found {}", b.seconds);
            }
            let listed: Vec<nca_run::Backend> = b.backends.into_iter().map(Into::into).collect();
            let backends = match (backend, listed.is_empty()) {
                (None, true) => nca_run::Backend::compiled(),
                (None, false) => listed,
                (Some(one), true) => vec![one],
                (Some(one), false) => anyhow::bail!(
                    "--backend {} and --backends both given; use --backends for several",
                    one.name()
                ),
            };
            let run_file = match &b.config {
                // Sized like a run of the same file, so the model measured is the one it trains.
                Some(path) => Some(nca_run::config::RunConfig::load_sized(path)?.0),
                None => None,
            };
            let base = run_file.as_ref().map(|r| r.nca()).unwrap_or_default();
            let grids = match (b.sizes.is_empty(), &run_file) {
                (false, _) => b.sizes.iter().map(|&s| (s, s)).collect(),
                (true, Some(r)) => vec![(r.grid.height, r.grid.width)],
                (true, None) => vec![(32, 32), (128, 128)],
            };
            let batches = match (b.batches.is_empty(), &run_file) {
                (false, _) => b.batches,
                (true, Some(r)) => vec![r.grid.batch],
                (true, None) => vec![1, 8],
            };
            let args = BenchArgs {
                backends,
                base,
                grids,
                batches,
                seconds: b.seconds,
                memory: nca_api::MemoryLimit::from_env()?,
            };
            // Checked before the header is printed, so a refusal is the only output.
            args.workloads()?;
            println!("model: {}", describe_model(&args.base.model));
            println!(
                "{:<12} {:>12} {:>12} {:>16}",
                "backend", "grid", "steps/s", "Mcells·steps/s"
            );
            bench(&args, &mut print_bench_line)?;
            Ok(Finish::Completed)
        }
        Some(Command::Web(w)) => crate::web::web_command(&crate::web::WebArgs {
            checkpoint: w.checkpoint,
            out: w.out,
            force: w.force,
            wasm: w.wasm,
            serve: w.serve,
            port: w.port,
            interrupt: &interrupt,
        }),
        Some(Command::Rollout(r)) => {
            let request = RolloutRequest {
                checkpoint: r.checkpoint,
                init: r.init,
                steps: r.steps,
                noise: r.noise,
                seed: r.seed,
                out: r.out,
                force: r.force,
                backend: backend.unwrap_or(nca_run::Backend::Ndarray),
                frame_every: r.frame_every,
                scale: r.scale,
                gif_frame_ms: r.gif_frame_ms,
                eval_steps: r.eval_steps,
                eval_seeds: r.eval_seeds,
                memory: nca_api::MemoryLimit::from_env()?,
            };
            let mut events = |event: &Event<'_>| match event {
                Event::RolloutStep { step } if interrupt.load(Ordering::SeqCst) => {
                    tracing::warn!("interrupted: stopping after step {step}");
                    ControlFlow::Break(())
                }
                Event::Note { level, message } => {
                    log(*level, message);
                    ControlFlow::Continue(())
                }
                _ => ControlFlow::Continue(()),
            };
            let outcome = rollout(&request, &mut events)?;
            let summary = &outcome.summary;
            let loss = summary
                .final_loss
                .map_or_else(|| "n/a".into(), |l| format!("{l:.3e}"));
            println!(
                "rollout: {} steps on {} (σ = {}), final loss against the target {loss}",
                summary.steps, summary.backend, summary.sigma
            );
            match &summary.regrowth {
                Some(r) => println!("{}", score::line(r)),
                None if !outcome.has_target => {
                    println!("no regrowth score: the checkpoint holds no target")
                }
                None => {}
            }
            println!("results in {}", request.out.display());
            Ok(if summary.interrupted {
                Finish::Interrupted
            } else {
                Finish::Completed
            })
        }
        None => {
            let config = cli
                .config
                .ok_or_else(|| anyhow::anyhow!("no run file given (try --help)"))?;
            let request = TrainRequest {
                output: cli.out.map_or(Output::Default, Output::Dir),
                resume: cli.resume,
                force: cli.force,
                ..TrainRequest::file(config, backend.unwrap_or(nca_run::Backend::Ndarray))
            };
            let mut shown = Shown::new(std::io::stderr().is_terminal(), &interrupt);
            shown.abort_after_checkpoint = cli.abort_after_checkpoint;
            let result = nca_run::run::train(&request, &mut shown);
            shown.finish();
            let result = result?;
            report(&result);
            Ok(if result.status == Status::Interrupted {
                Finish::Interrupted
            } else {
                Finish::Completed
            })
        }
    }
}

/// Prints one line of `nca-cli bench`.
fn print_bench_line(line: BenchLine) {
    match line {
        BenchLine::Measured(m) => println!(
            "{:<12} {:>12} {:>12.1} {:>16.2}",
            m.backend,
            format!("{}x{}x{}", m.grid.0, m.grid.1, m.batch),
            m.steps_per_second,
            m.cells_per_second() / 1e6
        ),
        BenchLine::Skipped { backend, error } => {
            println!("{:<12} skipped: {}", backend.name(), error.report())
        }
        BenchLine::Failed {
            backend,
            workload: (h, w, b),
            error,
        } => println!(
            "{:<12} {:>12} failed: {}",
            backend.name(),
            format!("{h}x{w}x{b}"),
            error.report()
        ),
    }
}

/// A note of the run, as a log line.
fn log(level: Level, message: &str) {
    match level {
        Level::Info => tracing::info!("{message}"),
        Level::Warn => tracing::warn!("{message}"),
    }
}

/// How a training run's events are shown: a progress bar on a terminal, else a log line
/// every `output.snapshot_every` steps; Ctrl-C turns into a stop after the current step.
struct Shown<'a> {
    terminal: bool,
    interrupt: &'a AtomicBool,
    /// `--abort-after-checkpoint`.
    abort_after_checkpoint: Option<u64>,
    bar: Option<ProgressBar>,
    total: u64,
    log_every: u64,
    last_log: (Instant, u64),
}

impl<'a> Shown<'a> {
    fn new(terminal: bool, interrupt: &'a AtomicBool) -> Self {
        Self {
            terminal,
            interrupt,
            abort_after_checkpoint: None,
            bar: None,
            total: 0,
            log_every: 1,
            last_log: (Instant::now(), 0),
        }
    }

    /// A line that does not tear the progress bar.
    fn say(&self, level: Level, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => log(level, message),
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Events for Shown<'_> {
    fn on_event(&mut self, event: &Event<'_>) -> ControlFlow<()> {
        match event {
            Event::Note { level, message } => self.say(*level, message),
            Event::Started(s) => {
                self.total = s.total_steps;
                self.log_every = s.log_every.max(1);
                self.last_log = (Instant::now(), s.start_step);
                if !s.chosen.is_empty() {
                    let list: Vec<String> = s
                        .chosen
                        .iter()
                        .map(|c| format!("{} {}", c.field, c.value))
                        .collect();
                    tracing::info!(
                        "chosen for a {}x{} grid (set them in the run file to override): {}",
                        s.grid.0,
                        s.grid.1,
                        list.join(", ")
                    );
                }
                if self.terminal {
                    self.bar = Some(progress_bar(s.total_steps, s.start_step));
                } else {
                    let into = s
                        .out
                        .as_deref()
                        .map_or_else(|| "memory".to_string(), |p| p.display().to_string());
                    tracing::info!(
                        "training {} steps on {} ({}) into {into}",
                        s.total_steps - s.start_step,
                        s.backend,
                        describe_model(&s.model),
                    );
                }
            }
            Event::Step(info) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(info.step);
                    if info.step.is_multiple_of(10) || info.spiked {
                        let (t0, s0) = self.last_log;
                        let rate = (info.step - s0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                        bar.set_message(format!(
                            "loss {:.3e}  spikes {}  {rate:.0} steps/s",
                            info.loss, info.spikes
                        ));
                    }
                } else if info.step.is_multiple_of(self.log_every) {
                    let (t0, s0) = self.last_log;
                    let rate = (info.step - s0) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
                    tracing::info!(
                        "step {}/{} loss {:.4e} spikes {} ({rate:.0} steps/s)",
                        info.step,
                        self.total,
                        info.loss,
                        info.spikes
                    );
                    self.last_log = (Instant::now(), info.step);
                }
                if self.interrupt.load(Ordering::SeqCst) {
                    self.say(
                        Level::Warn,
                        &format!("interrupted: stopping after step {}", info.step),
                    );
                    return ControlFlow::Break(());
                }
            }
            Event::Evaluation { step, score } => {
                self.say(Level::Info, &format!("step {step}: {}", score::line(score)));
            }
            Event::Checkpoint { step, .. }
                if self.abort_after_checkpoint.is_some_and(|at| *step >= at) =>
            {
                crash();
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

/// Ends the process at once, as `kill -9` does: no destructor runs and no buffer is
/// flushed, so what is on disk is exactly what a crash at this point would leave.
fn crash() -> ! {
    // SIGKILL rather than abort(): the same death as `kill -9`, and no core file.
    #[cfg(unix)]
    let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
    std::process::abort()
}

fn progress_bar(total: u64, start: u64) -> ProgressBar {
    let bar = ProgressBar::new(total).with_position(start);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} step {pos}/{len}  {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// The end-of-run lines on stdout.
fn report(result: &RunResult) {
    let s: &Summary = &result.summary;
    let loss = s
        .final_loss
        .map_or_else(|| "n/a".into(), |l| format!("{l:.3e}"));
    let first = s
        .first_step_below_epsilon
        .map_or_else(|| "never".into(), |f| format!("step {f}"));
    println!(
        "{}: {} steps on {} ({:.0} steps/s), final loss {loss}, first below ε {first}, \
         {} spikes",
        s.status, s.final_step, s.backend, s.steps_per_second, s.spikes
    );
    if let Some(step) = s.kept_step {
        let scored = |at: u64| result.psnr.iter().find(|row| row.0 == at).map(|row| row.1);
        let db = |p: Option<f64>| p.map_or_else(|| "n/a".into(), |p| format!("{p:.1} dB"));
        println!(
            "evaluation.keep_best: kept the weights of step {step} ({}; the last step's {}) \
             in best.safetensors; the score below is theirs on held-out starts",
            db(scored(step)),
            db(scored(s.final_step)),
        );
    }
    if let Some(r) = &s.regrowth {
        println!("{}", score::line(r));
    }
    let out = result.out.as_deref().unwrap_or(Path::new("."));
    println!(
        "results in {} (regrowth.png, contact_sheet.png, trajectory.gif, summary.json)",
        out.display()
    );
}
