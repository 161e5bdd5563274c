//! Runs training steps on the ndarray backend for profiling (`perf record`).
//!
//! `cargo run --release -p nca-benches --example profile_step -- SIZE BATCH STEPS`

use nca_api::{Trainer, Transition};
use nca_benches::{model_and_optim, Workload};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (size, batch, steps) = match args[..] {
        [s, b, n] => (s, b, n),
        _ => (128, 8, 100),
    };
    let w = Workload { size, batch };
    let (model, optim) = model_and_optim();
    let mut t = nca_ndarray::NdarrayTrainer::new(&model, &optim)?;
    let mut state = nca_api::start(&mut t, &w.config(), &w.target())?;
    let start = std::time::Instant::now();
    let mut loss = 0.0;
    for _ in 0..steps {
        loss = t.train_step(&mut state)?;
        t.clamp(&mut state, 3.0)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}: {steps} steps in {secs:.3} s = {:.1} steps/s, {:.1} ns/cell (last loss {loss:.4})",
        w.label(),
        steps as f64 / secs,
        secs * 1e9 / (steps as f64 * w.cells() as f64)
    );
    Ok(())
}
