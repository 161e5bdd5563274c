//! A checkpoint trained on one backend rolls out to the same state on the other.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use nca_api::{
    initial_state, rollout, train, ConstantNoise, HostTensor, LoopOptions, NcaConfig, NoObserver,
    Progress, RolloutOptions, Trainer, Transition, Weights,
};
use nca_candle::CandleTrainer;
use nca_ndarray::NdarrayTrainer;

const TRAIN_STEPS: u64 = 40;
const ROLLOUT_STEPS: u64 = 20;
const TOLERANCE: f32 = 1e-4;

fn config(hidden: usize) -> NcaConfig {
    let mut cfg = NcaConfig::default();
    cfg.grid.height = 12;
    cfg.grid.width = 10;
    cfg.grid.batch = 2;
    cfg.model.hidden_channels = hidden;
    cfg.training.steps = TRAIN_STEPS;
    cfg.training.learning_rate = 0.01;
    cfg.training.seed = 3;
    cfg
}

/// A target with some structure: a bright square on a dark background.
fn target(cfg: &NcaConfig) -> HostTensor {
    let [b, v, h, w] = cfg.target_shape();
    let data = (0..b * v * h * w)
        .map(|i| {
            let (y, x) = ((i / w) % h, i % w);
            if (3..8).contains(&y) && (2..7).contains(&x) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    HostTensor::new(&[b, v, h, w], data).unwrap()
}

fn trained<T: Trainer>(t: &mut T, cfg: &NcaConfig) -> Weights {
    let mut state = nca_api::start(t, cfg, &target(cfg)).unwrap();
    train(
        t,
        &mut state,
        &ConstantNoise::from(&cfg.noise),
        &LoopOptions::from_config(cfg),
        &mut Progress::default(),
        &mut NoObserver,
    )
    .unwrap();
    let w = t.weights().unwrap();
    assert!(
        w.wo.data().iter().any(|&x| x != 0.0),
        "training must move the output projection away from its zero init"
    );
    w
}

fn rolled_out<T: Transition>(t: &mut T, weights: &Weights, cfg: &NcaConfig) -> HostTensor {
    t.set_weights(weights).unwrap();
    let mut state = t.upload(&initial_state(cfg)).unwrap();
    let options = RolloutOptions {
        steps: ROLLOUT_STEPS,
        sigma: 0.0,
        state_clamp: cfg.model.state_clamp,
        seed: 0,
    };
    rollout(t, &mut state, &options, |_, _, _| Ok::<(), T::Error>(())).unwrap();
    t.download(&state).unwrap()
}

fn compare(cfg: &NcaConfig, weights: &Weights) {
    let optim = cfg.training.optimizer();
    let mut candle = CandleTrainer::cpu(&cfg.model, &optim).unwrap();
    let mut ndarray = NdarrayTrainer::new(&cfg.model, &optim).unwrap();
    let a = rolled_out(&mut candle, weights, cfg);
    let b = rolled_out(&mut ndarray, weights, cfg);
    // Measured against the clamped start, so the clamp alone does not count as movement.
    let mut start = initial_state(cfg);
    let limit = cfg.model.state_clamp.unwrap_or(f32::INFINITY);
    start
        .data_mut()
        .iter_mut()
        .for_each(|x| *x = x.clamp(-limit, limit));
    let moved = a.max_abs_diff(&start);
    assert!(moved > 1e-2, "the rollout must change the state ({moved})");
    let diff = a.max_abs_diff(&b);
    eprintln!(
        "hidden {}: rollout moved the state by up to {moved}, backends differ by {diff}",
        cfg.model.hidden_channels
    );
    assert!(
        diff <= TOLERANCE,
        "candle and ndarray rollouts differ by {diff} after {ROLLOUT_STEPS} steps"
    );
}

#[test]
fn candle_checkpoint_rolls_out_the_same_on_ndarray() {
    for hidden in [0, 2] {
        let cfg = config(hidden);
        let mut t = CandleTrainer::cpu(&cfg.model, &cfg.training.optimizer()).unwrap();
        let weights = trained(&mut t, &cfg);
        compare(&cfg, &weights);
    }
}

#[test]
fn ndarray_checkpoint_rolls_out_the_same_on_candle() {
    for hidden in [0, 2] {
        let cfg = config(hidden);
        let mut t = NdarrayTrainer::new(&cfg.model, &cfg.training.optimizer()).unwrap();
        let weights = trained(&mut t, &cfg);
        compare(&cfg, &weights);
    }
}
