//! Checks between two backends: a checkpoint trained on one rolls out the same on the
//! other. Each backend's `tests/cross_backend.rs` calls it with its harness and ndarray's.

use nca_api::{
    initial_state, rollout, train, Checkpoint, ConstantNoise, HostTensor, LoopOptions, NcaConfig,
    NoObserver, Progress, RolloutOptions, Trainer, Transition, Weights,
};

use crate::Harness;

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

/// A bright square on a dark background, so training has something to learn.
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

/// Trains on `T` with the shared loop and returns the weights after a trip through a
/// checkpoint file's bytes.
fn trained_checkpoint<T: Trainer>(t: &mut T, cfg: &NcaConfig) -> Weights {
    let mut state = nca_api::start(t, cfg, &target(cfg)).unwrap();
    let mut progress = Progress::default();
    let schedule = ConstantNoise::from(&cfg.noise);
    let options = LoopOptions::from_config(cfg);
    train(
        t,
        &mut state,
        &schedule,
        &options,
        &mut progress,
        &mut NoObserver,
    )
    .unwrap();
    let ckpt = Checkpoint {
        config: cfg.clone(),
        weights: t.weights().unwrap(),
        adam: Some(t.adam_state().unwrap()),
        progress,
        state: Some(t.download(&state).unwrap()),
        backend: "under test".into(),
    };
    assert!(
        ckpt.weights
            .tensor("wo")
            .unwrap()
            .data()
            .iter()
            .any(|&x| x != 0.0),
        "training must move the output projection away from its zero init"
    );
    let bytes = ckpt.to_file().to_bytes().unwrap();
    let file = nca_api::TensorFile::from_bytes(&bytes).unwrap();
    Weights::from_lookup(&cfg.model, |n| file.tensors.get(n).cloned()).unwrap()
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

/// Weights trained on `Train` (with and without hidden channels) roll out with noise 0 to
/// the same state on `Train` and on `Other`, within 1e-4 after 20 steps.
pub fn checkpoint_rolls_out_identically<Train: Harness, Other: Harness>() {
    for hidden in [0, 2] {
        let cfg = config(hidden);
        let optim = cfg.training.optimizer();
        let mut trainer = Train::create(&cfg.model, &optim).unwrap();
        let weights = trained_checkpoint(&mut trainer, &cfg);
        let a = rolled_out(&mut trainer, &weights, &cfg);
        let b = rolled_out(
            &mut Other::create(&cfg.model, &optim).unwrap(),
            &weights,
            &cfg,
        );
        // Against the clamped start, so the clamp alone does not count as movement.
        let mut start = initial_state(&cfg);
        let limit = cfg.model.state_clamp.unwrap_or(f32::INFINITY);
        start
            .data_mut()
            .iter_mut()
            .for_each(|x| *x = x.clamp(-limit, limit));
        let moved = a.max_abs_diff(&start);
        assert!(moved > 1e-2, "the rollout must change the state ({moved})");
        let diff = a.max_abs_diff(&b);
        eprintln!(
            "hidden {hidden}: rollout moved the state by up to {moved}, backends differ by {diff}"
        );
        assert!(
            diff <= TOLERANCE,
            "rollouts differ by {diff} after {ROLLOUT_STEPS} steps"
        );
    }
}
