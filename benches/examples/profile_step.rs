//! Runs training steps on the ndarray backend for profiling (`perf record`).
//!
//! `cargo run --release -p nca-benches --no-default-features --example profile_step -- SIZE BATCH STEPS [picture|plain]`
//! (the default model is the picture model; `plain` is the model without position
//! inputs or MLP).

use nca_api::{Trainer, Transition};
use nca_benches::{Model, Workload};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let nums: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
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
    let cfg = w.config();
    let mut t = nca_ndarray::NdarrayTrainer::new(&cfg.model, &cfg.training.optimizer())?;
    let mut state = nca_api::start(&mut t, &cfg, &w.target())?;
    // One step first, so buffer sizing is not timed.
    t.train_step(&mut state)?;
    let start = std::time::Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = t.train_step(&mut state)?;
        t.clamp(&mut state, 3.0)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} {}: {steps} steps in {secs:.3} s = {:.1} steps/s, {:.1} ns/cell (last loss {loss:.4})",
        model.name(),
        w.label(),
        steps as f64 / secs,
        secs * 1e9 / (steps as f64 * w.cells() as f64)
    );
    Ok(())
}
