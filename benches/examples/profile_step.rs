//! Runs training steps on the ndarray backend, as the training loop does them (small
//! noise, train step, spike noise when the loss falls below ε, clamp), and prints steps/s
//! and GFLOP/s; also a workload for profiling (`perf record`).
//!
//! `cargo run --release -p nca-benches --no-default-features --example profile_step -- SIZE BATCH STEPS [picture|plain] [octaves=N] [mlp=N]`
//!
//! The default model is the picture model (position inputs and the MLP update); `plain`
//! is the model without position inputs or MLP; `octaves=N` and `mlp=N` override the
//! picture model's position octaves and hidden width. GFLOP/s counts the model's
//! multiply-adds as two operations, a training step as three forward passes
//! ([`step_flops`]).

use nca_api::noise::{stream_seed, Stream};
use nca_api::{ConstantNoise, ModelConfig, NoiseSchedule, Trainer, Transition, NEIGHBOURS};
use nca_benches::{Model, Workload};

/// Floating-point operations of one training step per cell: forward (the projections,
/// the nine scores and the weighted sum, the MLP or linear output) times three, the
/// usual estimate for forward plus backward.
fn step_flops(m: &ModelConfig) -> f64 {
    let (c, d, x) = (m.channels(), m.attention_dim, m.input_width());
    let attention = 3 * d * x + 2 * NEIGHBOURS * d;
    let output = match m.mlp_hidden {
        Some(h) => h * (d + x) + c * h,
        None => c * d,
    };
    3.0 * 2.0 * (attention + output) as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let option = |name: &str| -> Result<Option<usize>, String> {
        let prefix = format!("{name}=");
        args.iter()
            .find_map(|a| a.strip_prefix(&prefix))
            .map(|v| v.parse().map_err(|_| format!("{name}={v} is not a number")))
            .transpose()
    };
    let model = if args.iter().any(|a| a == "plain") {
        Model::Plain
    } else {
        Model::Picture
    };
    let (size, batch, steps) = match nums[..] {
        [s, b, n] => (s, b, n),
        _ => (128, 8, 100),
    };
    let w = Workload { size, batch, model };
    let mut cfg = w.config();
    if let Some(octaves) = option("octaves")? {
        cfg.model.position_octaves = Some(u32::try_from(octaves)?);
    }
    if let Some(hidden) = option("mlp")? {
        cfg.model.mlp_hidden = Some(hidden);
    }
    let mut t = nca_ndarray::NdarrayTrainer::new(&cfg.model, &cfg.training.optimizer())?;
    let mut state = nca_api::start(&mut t, &cfg, &w.target())?;
    let schedule = ConstantNoise::from(&cfg.noise);
    let seed = cfg.training.seed;
    // One step first, so buffer sizing is not timed.
    t.train_step(&mut state)?;
    let start = std::time::Instant::now();
    let mut loss = 0.0;
    for step in 1..=steps as u64 {
        let sigma = schedule.sigma_small(step);
        t.add_noise(&mut state, sigma, stream_seed(seed, step, Stream::Small))?;
        loss = t.train_step(&mut state)?;
        if schedule.should_spike(loss, step) {
            let sigma = schedule.sigma_large(step);
            t.add_noise(&mut state, sigma, stream_seed(seed, step, Stream::Spike))?;
        }
        if let Some(limit) = cfg.model.state_clamp {
            t.clamp(&mut state, limit)?;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let cell_steps = steps as f64 * w.cells() as f64;
    let label = match (cfg.model.position_octaves, cfg.model.mlp_hidden) {
        (None, None) => String::new(),
        (octaves, hidden) => format!(
            " (octaves {}, mlp {})",
            octaves.map_or("-".into(), |o| o.to_string()),
            hidden.map_or("-".into(), |h| h.to_string())
        ),
    };
    println!(
        "{}{label} {}: {steps} steps in {secs:.3} s = {:.1} steps/s, {:.1} ns/cell, {:.2} GFLOP/s (last loss {loss:.4})",
        model.name(),
        w.label(),
        steps as f64 / secs,
        secs * 1e9 / cell_steps,
        step_flops(&cfg.model) * cell_steps / secs / 1e9,
    );
    Ok(())
}
