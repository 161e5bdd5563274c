//! Criterion comparison of every compiled backend: the forward step `s + f(s)` and the
//! full training step (noise, forward, backward, Adam, spike check), in cells·steps/s.
//!
//! `cargo bench -p nca-benches` runs everything; `NCA_BENCH_QUICK=1` keeps two sizes and
//! short measurement times. Results feed `cargo run -p nca-benches --bin bench-table`.

use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use nca_api::{ConstantNoise, NcaConfig, NoiseSchedule, Trainer, Transition};
use nca_benches::{full_workloads, model_and_optim, quick_workloads};

fn quick() -> bool {
    std::env::var_os("NCA_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// A constructor for one backend, or `None` when it cannot run here (e.g. no GPU).
type Make<T> = fn() -> Option<T>;

fn bench_backend<T: Trainer>(c: &mut Criterion, name: &str, make: Make<T>) {
    let Some(mut probe) = make() else {
        eprintln!("skipping {name}: not available on this machine");
        return;
    };
    let workloads = if quick() {
        quick_workloads()
    } else {
        full_workloads()
    };
    for group_name in ["forward", "train_step"] {
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
            group.throughput(Throughput::Elements(w.cells()));
            let id = BenchmarkId::new(name, w.label());
            let cfg = w.config();
            let mut state = match nca_api::start(&mut probe, &cfg, &w.target()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("skipping {name}/{}: {e}", w.label());
                    continue;
                }
            };
            if group_name == "forward" {
                group.bench_function(id, |b| {
                    b.iter(|| {
                        let next = probe.step(&state).expect("forward step");
                        sync(&probe, &next);
                        next
                    })
                });
            } else {
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

fn backends(c: &mut Criterion) {
    bench_backend::<nca_ndarray::NdarrayTrainer>(c, "ndarray", || {
        let (m, o) = model_and_optim();
        nca_ndarray::NdarrayTrainer::new(&m, &o).ok()
    });
    #[cfg(feature = "dfdx")]
    bench_backend::<nca_dfdx::DfdxTrainer>(c, "dfdx", || {
        let (m, o) = model_and_optim();
        nca_dfdx::DfdxTrainer::new(&m, &o).ok()
    });
    #[cfg(feature = "candle")]
    bench_backend::<nca_candle::CandleTrainer>(c, "candle-cpu", || {
        let (m, o) = model_and_optim();
        nca_candle::CandleTrainer::cpu(&m, &o).ok()
    });
    #[cfg(feature = "cuda")]
    bench_backend::<nca_candle::CandleTrainer>(c, "candle-cuda", || {
        let (m, o) = model_and_optim();
        nca_candle::CandleTrainer::cuda(&m, &o, 0).ok()
    });
}

criterion_group!(benches, backends);
criterion_main!(benches);
