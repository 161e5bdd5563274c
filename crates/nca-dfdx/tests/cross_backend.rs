//! A checkpoint trained on dfdx rolls out the same on nca-ndarray, and the other way round.
#![allow(clippy::unwrap_used)] // test helpers: a failed unwrap is a failed test

use nca_api::{
    rollout, start, train, ConstantNoise, HostTensor, LoopOptions, NcaConfig, NoObserver, Progress,
    RolloutOptions, Trainer, Transition, Weights,
};
use nca_dfdx::DfdxTrainer;
use nca_ndarray::NdarrayTrainer;

fn config() -> NcaConfig {
    let mut cfg = NcaConfig {
        grid: nca_api::GridConfig {
            height: 12,
            width: 10,
            batch: 2,
        },
        ..NcaConfig::default()
    };
    cfg.model.hidden_channels = 2;
    cfg.training.steps = 40;
    cfg.training.seed = 3;
    cfg.training.learning_rate = 0.01;
    cfg
}

/// A red-and-green striped target, so training has something to learn.
fn target(cfg: &NcaConfig) -> HostTensor {
    let shape = cfg.target_shape();
    let mut t = HostTensor::zeros(&shape);
    let [_, v, h, w] = shape;
    for (i, x) in t.data_mut().iter_mut().enumerate() {
        let (ch, y) = ((i / (h * w)) % v, (i / w) % h);
        *x = if ch == y % 2 { 1.0 } else { 0.0 };
    }
    t
}

/// Trains `cfg.training.steps` steps with the shared loop; returns the weights and the
/// carried state.
fn trained<T: Trainer>(mut t: T, cfg: &NcaConfig) -> (Weights, HostTensor) {
    let mut state = start(&mut t, cfg, &target(cfg)).unwrap();
    let mut progress = Progress::default();
    train(
        &mut t,
        &mut state,
        &ConstantNoise::from(&cfg.noise),
        &LoopOptions::from_config(cfg),
        &mut progress,
        &mut NoObserver,
    )
    .unwrap();
    assert_eq!(progress.step, cfg.training.steps);
    (t.weights().unwrap(), t.download(&state).unwrap())
}

/// Loads `weights` and runs a noiseless 20-step rollout from `from`.
fn rolled_out<T: Transition>(mut t: T, weights: &Weights, from: &HostTensor) -> HostTensor {
    t.set_weights(weights).unwrap();
    let mut state = t.upload(from).unwrap();
    let options = RolloutOptions {
        steps: 20,
        sigma: 0.0,
        state_clamp: t.model().state_clamp,
        seed: 0,
    };
    rollout(&mut t, &mut state, &options, |_, _, _| {
        Ok::<(), T::Error>(())
    })
    .unwrap();
    t.download(&state).unwrap()
}

fn assert_same_rollout(weights: &Weights, from: &HostTensor, cfg: &NcaConfig) {
    let optim = cfg.training.optimizer();
    let on_dfdx = rolled_out(DfdxTrainer::new(&cfg.model, &optim).unwrap(), weights, from);
    let on_ndarray = rolled_out(
        NdarrayTrainer::new(&cfg.model, &optim).unwrap(),
        weights,
        from,
    );
    // The rollout must actually move the state, or the comparison proves nothing.
    assert!(
        on_dfdx.max_abs_diff(from) > 1e-2,
        "rollout left the state unchanged"
    );
    let diff = on_dfdx.max_abs_diff(&on_ndarray);
    eprintln!(
        "rollout moved the state by up to {}; dfdx vs ndarray differ by {diff}",
        on_dfdx.max_abs_diff(from)
    );
    assert!(diff <= 1e-4, "dfdx and ndarray rollouts differ by {diff}");
}

#[test]
fn checkpoint_trained_on_dfdx_rolls_out_on_ndarray() {
    let cfg = config();
    let (weights, state) = trained(
        DfdxTrainer::new(&cfg.model, &cfg.training.optimizer()).unwrap(),
        &cfg,
    );
    assert_ne!(weights, Weights::init(&cfg.model, cfg.training.seed));
    assert_same_rollout(&weights, &state, &cfg);
}

#[test]
fn checkpoint_trained_on_ndarray_rolls_out_on_dfdx() {
    let cfg = config();
    let (weights, state) = trained(
        NdarrayTrainer::new(&cfg.model, &cfg.training.optimizer()).unwrap(),
        &cfg,
    );
    assert_ne!(weights, Weights::init(&cfg.model, cfg.training.seed));
    assert_same_rollout(&weights, &state, &cfg);
}
