//! Criterion comparison of every compiled backend: the forward step `s + f(s)` and the
//! full training step (noise, forward, backward, Adam, spike check), in cells·steps/s,
//! for the plain model (groups `forward`, `train_step`) and the default picture model
//! with position inputs and the MLP update (groups `forward_picture`,
//! `train_step_picture`), and the model sized to a 128×128 or 256×256 picture, batch 1
//! (groups `forward_sized`, `train_step_sized`).
//!
//! `cargo bench -p nca-benches` runs everything; `NCA_BENCH_QUICK=1` keeps two sizes and
//! short measurement times. A backend that cannot run a model (it returns an error) is
//! skipped with a note. Results feed `cargo run -p nca-benches --bin bench-table`.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use nca_api::{
    ConstantNoise, ModelConfig, NcaConfig, NoiseSchedule, OptimizerConfig, Trainer, Transition,
};
use nca_benches::{full_workloads, optim, quick_workloads, Model};

fn quick() -> bool {
    std::env::var_os("NCA_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// A constructor for one backend: `None` when it cannot run here at all (e.g. no GPU),
/// `Some(Err)` when it cannot run this model.
type Make<T> = fn(&ModelConfig, &OptimizerConfig) -> Option<Result<T, String>>;

/// Criterion group names of a model's rows.
fn groups(model: Model) -> [&'static str; 2] {
    match model {
        Model::Plain => ["forward", "train_step"],
        Model::Picture => ["forward_picture", "train_step_picture"],
        Model::Sized => ["forward_sized", "train_step_sized"],
    }
}

/// Benchmarks `name` on `model`'s workloads of at most `max_cells` cells.
fn bench_backend<T: Trainer>(
    c: &mut Criterion,
    name: &str,
    make: Make<T>,
    model: Model,
    max_cells: u64,
) {
    let workloads = if quick() {
        quick_workloads(model)
    } else {
        full_workloads(model)
    };
    let workloads: Vec<_> = workloads
        .into_iter()
        .filter(|w| w.cells() <= max_cells)
        .collect();
    for group_name in groups(model) {
        let mut group = c.benchmark_group(group_name);
        if quick() {
            group.warm_up_time(Duration::from_millis(300));
            group.measurement_time(Duration::from_secs(2));
        } else {
            group.warm_up_time(Duration::from_secs(1));
            group.measurement_time(Duration::from_secs(4));
        }
        // Flat sampling: ten timed iterations, however slow one is (a 256×256×8 step on an
        // autodiff backend takes seconds, and linear sampling would need 55 of them).
        group.sampling_mode(SamplingMode::Flat);
        group.sample_size(10);
        for w in &workloads {
            let cfg = w.config();
            // The sized model differs per grid, so each workload gets its own trainer.
            let mut probe = match make(&cfg.model, &optim()) {
                None => {
                    eprintln!("skipping {name}: not available on this machine");
                    group.finish();
                    return;
                }
                Some(Err(e)) => {
                    eprintln!("skipping {name}/{group_name}/{}: {e}", w.label());
                    continue;
                }
                Some(Ok(t)) => t,
            };
            group.throughput(Throughput::Elements(w.cells()));
            let id = BenchmarkId::new(name, w.label());
            let mut state = match nca_api::start(&mut probe, &cfg, &w.target()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("skipping {name}/{group_name}/{}: {e}", w.label());
                    continue;
                }
            };
            // A backend may only find out at the first step that it cannot run a model.
            if let Err(e) = probe.step(&state) {
                eprintln!("skipping {name}/{group_name}/{}: {e}", w.label());
                continue;
            }
            if group_name.starts_with("forward") {
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let next = probe.step(&state).expect("forward step");
                        sync(&probe, &next);
                        next
                    })
                });
            } else {
                if let Err(e) = probe.train_step(&mut state) {
                    eprintln!("skipping {name}/{group_name}/{}: {e}", w.label());
                    continue;
                }
                let schedule = ConstantNoise::from(&cfg.noise);
                let mut step = 0u64;
                group.bench_function(id, |b| {
                    b.iter(|| {
                        step += 1;
                        train_step(&mut probe, &mut state, &schedule, &cfg, step);
                    })
                });
            }
        }
        group.finish();
    }
}

/// One step of the training loop body, as `nca_api::train` runs it.
fn train_step<T: Trainer>(
    t: &mut T,
    state: &mut T::State,
    schedule: &ConstantNoise,
    cfg: &NcaConfig,
    step: u64,
) {
    use nca_api::noise::{stream_seed, Stream};
    let seed = cfg.training.seed;
    t.add_noise(
        state,
        schedule.sigma_small(step),
        stream_seed(seed, step, Stream::Small),
    )
    .expect("noise");
    let loss = t.train_step(state).expect("train step");
    if schedule.should_spike(loss, step) {
        t.add_noise(
            state,
            schedule.sigma_large(step),
            stream_seed(seed, step, Stream::Spike),
        )
        .expect("spike");
    }
    if let Some(limit) = cfg.model.state_clamp {
        t.clamp(state, limit).expect("clamp");
    }
}

/// Waits for queued device work so GPU timings include the computation.
fn sync<T: Transition>(t: &T, _s: &T::State) {
    t.synchronize().expect("device sync");
}

/// Largest picture-model workload (cells) for the slow autodiff backends.
const SMALL: u64 = 32 * 32 * 8;

fn backends(c: &mut Criterion) {
    // The sized model runs everywhere at batch 1: it is what a picture's run trains.
    for (model, small) in [
        (Model::Plain, u64::MAX),
        (Model::Picture, SMALL),
        (Model::Sized, u64::MAX),
    ] {
        bench_backend::<nca_ndarray::NdarrayTrainer>(
            c,
            "ndarray",
            |m, o| Some(nca_ndarray::NdarrayTrainer::new(m, o).map_err(|e| e.to_string())),
            model,
            u64::MAX,
        );
        #[cfg(feature = "dfdx")]
        bench_backend::<nca_dfdx::DfdxTrainer>(
            c,
            "dfdx",
            |m, o| Some(nca_dfdx::DfdxTrainer::new(m, o).map_err(|e| e.to_string())),
            model,
            small,
        );
        #[cfg(feature = "candle")]
        bench_backend::<nca_candle::CandleTrainer>(
            c,
            "candle-cpu",
            |m, o| Some(nca_candle::CandleTrainer::cpu(m, o).map_err(|e| e.to_string())),
            model,
            small,
        );
        #[cfg(feature = "cuda")]
        bench_backend::<nca_candle::CandleTrainer>(
            c,
            "candle-cuda",
            |m, o| nca_candle::CandleTrainer::cuda(m, o, 0).ok().map(Ok),
            model,
            u64::MAX,
        );
        let _ = small;
    }
}

criterion_group!(benches, backends);
criterion_main!(benches);
