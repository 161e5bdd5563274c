//! Command-line parsing and the top-level entry point.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::backend::Backend;
use crate::bench::{bench_command, BenchArgs};
use crate::rollout::{rollout_command, RolloutArgs};
use crate::run::{train_command, Finish, TrainArgs};

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
                  (it lands in ~/.cargo/bin).\n\nExamples:\n  nca-cli examples/cat.ron\n  nca-cli examples/red.ron\n  nca-cli --backend candle run.ron --out runs/try2\n  nca-cli run.ron --resume runs/run/checkpoint.safetensors\n  nca-cli rollout --checkpoint runs/red/checkpoint.safetensors --steps 200 --out runs/red-rollout\n  nca-cli bench --sizes 32,128 --batches 1,8\n  nca-cli web --checkpoint runs/cat/checkpoint.safetensors --out runs/cat-web --serve\n\n\
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

/// Runs the parsed command; `interrupt` is set by Ctrl-C.
pub fn run(cli: Cli, interrupt: Arc<AtomicBool>) -> Result<Finish> {
    match cli.command {
        Some(Command::Bench(b)) => {
            if !(b.seconds.is_finite() && b.seconds > 0.0) {
                anyhow::bail!("--seconds: expected a duration > 0, found {}", b.seconds);
            }
            let backends = match (cli.backend, b.backends.is_empty()) {
                (None, true) => Backend::compiled(),
                (None, false) => b.backends,
                (Some(one), true) => vec![one],
                (Some(one), false) => anyhow::bail!(
                    "--backend {} and --backends both given; use --backends for several",
                    one.name()
                ),
            };
            let run_file = match &b.config {
                Some(path) => Some(crate::config::RunConfig::load(path)?),
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
            bench_command(&BenchArgs {
                backends,
                base,
                grids,
                batches,
                seconds: b.seconds,
                memory: nca_api::MemoryLimit::from_env()?,
            })?;
            Ok(Finish::Completed)
        }
        Some(Command::Web(w)) => crate::web::web_command(&crate::web::WebArgs {
            checkpoint: w.checkpoint,
            out: w.out,
            force: w.force,
            wasm: w.wasm,
            serve: w.serve,
            port: w.port,
        }),
        Some(Command::Rollout(r)) => rollout_command(RolloutArgs {
            checkpoint: r.checkpoint,
            init: r.init,
            steps: r.steps,
            noise: r.noise,
            seed: r.seed,
            out: r.out,
            force: r.force,
            backend: cli.backend.unwrap_or(Backend::Ndarray),
            frame_every: r.frame_every,
            scale: r.scale,
            gif_frame_ms: r.gif_frame_ms,
            eval_steps: r.eval_steps,
            eval_seeds: r.eval_seeds,
            interrupt,
            memory: nca_api::MemoryLimit::from_env()?,
        }),
        None => {
            let config = cli
                .config
                .ok_or_else(|| anyhow::anyhow!("no run file given (try --help)"))?;
            train_command(TrainArgs {
                config,
                out: cli.out,
                resume: cli.resume,
                force: cli.force,
                backend: cli.backend.unwrap_or(Backend::Ndarray),
                progress_bar: std::io::stderr().is_terminal(),
                interrupt,
            })
        }
    }
}
