//! Checks between two backends: a checkpoint trained on one rolls out the same on the
//! other. Each backend's `tests/cross_backend.rs` calls it with its harness and ndarray's.

use nca_api::{
    initial_state, rollout, train, Checkpoint, ConstantNoise, HostTensor, LoopOptions, NcaConfig,
    NoObserver, Param, Progress, RolloutOptions, Trainer, Transition, Weights,
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
        training_weights: None,
        adam: Some(t.adam_state().unwrap()),
        progress,
        state: Some(t.download(&state).unwrap()),
        backend: "under test".into(),
        target: None,
        run_file: None,
    };
    assert!(
        ckpt.weights[Param::Wo].data().iter().any(|&x| x != 0.0),
        "training must move the output projection away from its zero init"
    );
    let bytes = ckpt.to_file().to_bytes().unwrap();
    let file = nca_api::TensorFile::from_bytes(&bytes).unwrap();
    Weights::from_lookup(&cfg.model, |p| file.tensors.get(p.name()).cloned()).unwrap()
}

fn rolled_out<T: Transition>(t: &mut T, weights: &Weights, cfg: &NcaConfig) -> HostTensor {
    t.set_weights(weights).unwrap();
    let mut state = t.upload(&initial_state(cfg)).unwrap();
    let options = RolloutOptions {
        steps: ROLLOUT_STEPS,
        sigma: 0.0,
        state_clamp: cfg.model.state_clamp,
        seed: 0,
        first_step: 0,
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

/// Training steps compared by [`training_matches`].
pub const MATCHED_TRAINING_STEPS: u64 = 20;
/// Largest relative difference of a step's loss between two backends in
/// [`training_matches`].
pub const MATCHED_LOSS_RTOL: f32 = 1e-4;
/// Largest absolute difference of a weight between two backends after
/// [`MATCHED_TRAINING_STEPS`] steps at learning rate 1e-3 (each step moves a weight by up
/// to ~1e-3, so this is 2% of one step; dfdx against ndarray was measured at 1.3e-7).
pub const MATCHED_WEIGHT_ATOL: f32 = 2e-5;

/// Trains `cfg` from the same seeded weights, target and noise for
/// [`MATCHED_TRAINING_STEPS`] steps; returns every step's loss and the final weights.
fn trained<T: Trainer>(t: &mut T, cfg: &NcaConfig) -> (Vec<f32>, Weights) {
    let mut state = nca_api::start(t, cfg, &target(cfg)).unwrap();
    let mut losses = Vec::new();
    let mut record = |ctx: &nca_api::StepContext<'_, T>| {
        losses.push(ctx.info.loss);
        Ok::<_, std::convert::Infallible>(std::ops::ControlFlow::Continue(()))
    };
    train(
        t,
        &mut state,
        &ConstantNoise::from(&cfg.noise),
        &LoopOptions::from_config(cfg),
        &mut Progress::default(),
        &mut record,
    )
    .unwrap();
    (losses, t.weights().unwrap())
}

/// Training, not only rollouts, agrees between backends: from the same weights, target
/// and noise, [`MATCHED_TRAINING_STEPS`] steps of the shared loop on `A` and on `B` give
/// the same loss at every step (relative [`MATCHED_LOSS_RTOL`]) and the same weights
/// (absolute [`MATCHED_WEIGHT_ATOL`]), for the plain model and the default picture model.
///
/// `bk` is left out of the weight comparison: its gradient is exactly zero in theory
/// (softmax ignores a shift shared by all nine scores), so what each backend computes for
/// it is rounding noise that Adam's normalisation amplifies to ±lr per step; it has no
/// effect on any output.
pub fn training_matches<A: Harness, B: Harness>() {
    let mut plain = config(0);
    plain.model = nca_api::ModelConfig {
        state_clamp: plain.model.state_clamp,
        ..nca_api::ModelConfig::plain()
    };
    let picture = config(0);
    for mut cfg in [plain, picture] {
        cfg.training.steps = MATCHED_TRAINING_STEPS;
        cfg.training.learning_rate = 1e-3;
        let optim = cfg.training.optimizer();
        let (la, wa) = trained(&mut A::create(&cfg.model, &optim).unwrap(), &cfg);
        let (lb, wb) = trained(&mut B::create(&cfg.model, &optim).unwrap(), &cfg);
        assert_eq!(la.len(), MATCHED_TRAINING_STEPS as usize);
        assert_eq!(la.len(), lb.len());
        let mut worst_loss = 0.0f32;
        for (step, (a, b)) in la.iter().zip(&lb).enumerate() {
            let rel = (a - b).abs() / b.abs().max(1e-12);
            worst_loss = worst_loss.max(rel);
            assert!(
                rel <= MATCHED_LOSS_RTOL,
                "{:?}: step {} loss {a} vs {b}",
                cfg.model,
                step + 1
            );
        }
        let mut worst_weight = 0.0f32;
        let (na, nb) = (wa.named(), wb.named());
        assert_eq!(na.len(), nb.len());
        for ((name, a), (name_b, b)) in na.into_iter().zip(nb) {
            assert_eq!(name, name_b);
            if name == Param::Bk {
                continue;
            }
            let diff = a.max_abs_diff(b);
            worst_weight = worst_weight.max(diff);
            assert!(
                diff <= MATCHED_WEIGHT_ATOL,
                "{:?}: {name} differs by {diff} after {MATCHED_TRAINING_STEPS} steps",
                cfg.model
            );
        }
        eprintln!(
            "{:?}: worst relative loss difference {worst_loss:e}, worst weight difference {worst_weight:e}",
            cfg.model
        );
    }
}
