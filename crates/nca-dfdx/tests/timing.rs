//! Quick timings behind the choice of neighbourhood gather; run with
//! `cargo test -p nca-dfdx --test timing -- --ignored --nocapture`.
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use dfdx::prelude::*;
use nca_api::{HostTensor, ModelConfig, OptimizerConfig, Trainer, Transition, Weights};
use nca_dfdx::transition::{gather_by_matmul, gather_by_slices};
use nca_dfdx::DfdxTrainer;

fn per_call(reps: u32, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    for _ in 0..reps {
        f();
    }
    start.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
}

#[test]
#[ignore = "timing, not a check"]
fn gather_and_step_timings() {
    let model = ModelConfig::default();
    for size in [32usize, 64] {
        let mut t = DfdxTrainer::new(&model, &OptimizerConfig::default()).unwrap();
        t.set_weights(&Weights::init(&model, 1)).unwrap();
        t.set_target(&HostTensor::filled(&[1, 3, size, size], 0.5))
            .unwrap();
        let mut state = t
            .upload(&HostTensor::filled(&[1, 3, size, size], 0.1))
            .unwrap();
        let dev = Cpu::default();
        let slices = per_call(200, || {
            gather_by_slices(&dev, &state).unwrap();
        });
        let dense = per_call(20, || {
            gather_by_matmul(&dev, &state).unwrap();
        });
        assert_eq!(
            gather_by_slices(&dev, &state).unwrap().as_vec(),
            gather_by_matmul(&dev, &state).unwrap().as_vec()
        );
        let step = per_call(100, || {
            t.train_step(&mut state).unwrap();
        });
        let fwd = per_call(100, || {
            t.step(&state).unwrap();
        });
        eprintln!(
            "{size}x{size}: gather by slices {slices:.3} ms, by dense matmul {dense:.3} ms; \
             train_step {step:.3} ms ({:.0} steps/s), forward step {fwd:.3} ms",
            1e3 / step
        );
    }
}

#[test]
#[ignore = "profiling loop, not a check"]
fn train_steps_32x32() {
    let model = ModelConfig::default();
    let mut t = DfdxTrainer::new(&model, &OptimizerConfig::default()).unwrap();
    t.set_weights(&Weights::init(&model, 1)).unwrap();
    t.set_target(&HostTensor::filled(&[1, 3, 32, 32], 0.5))
        .unwrap();
    let mut state = t.upload(&HostTensor::filled(&[1, 3, 32, 32], 0.1)).unwrap();
    let ms = per_call(500, || {
        t.train_step(&mut state).unwrap();
    });
    eprintln!("32x32 train_step {ms:.3} ms ({:.0} steps/s)", 1e3 / ms);
}
