//! Behaviour of the candle backend beyond the shared conformance suite.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use nca_api::noise::fill_gaussian;
use nca_api::{
    AdamState, HostTensor, ModelConfig, OptimizerConfig, Param, Trainer, Transition, Weights,
};
use nca_candle::{CandleTrainer, Error};

fn trainer(model: &ModelConfig) -> CandleTrainer {
    CandleTrainer::cpu(model, &OptimizerConfig::default()).unwrap()
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_asks_for_a_rebuild() {
    let err = CandleTrainer::cuda(&ModelConfig::default(), &OptimizerConfig::default(), 0)
        .err()
        .expect("no CUDA in this build");
    assert!(matches!(err, Error::CudaUnavailable(_)), "{err:?}");
    assert!(err.to_string().contains("--features cuda"), "{err}");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_gpu_is_an_error_not_a_panic() {
    match CandleTrainer::cuda(&ModelConfig::default(), &OptimizerConfig::default(), 0) {
        Ok(t) => assert!(t.device().is_cuda()),
        Err(e) => assert!(matches!(e, Error::CudaUnavailable(_)), "{e:?}"),
    }
}

#[test]
fn starts_from_the_seed_zero_init() {
    let model = ModelConfig::default();
    assert_eq!(trainer(&model).weights().unwrap(), Weights::init(&model, 0));
}

#[test]
fn rejects_states_and_targets_of_the_wrong_shape() {
    let model = ModelConfig::default();
    let mut t = trainer(&model);
    assert!(t.upload(&HostTensor::zeros(&[1, 4, 5, 5])).is_err());
    assert!(t.upload(&HostTensor::zeros(&[3, 5, 5])).is_err());
    assert!(t.set_target(&HostTensor::zeros(&[1, 2, 5, 5])).is_err());
    t.set_target(&HostTensor::zeros(&[1, 3, 5, 5])).unwrap();
    let other_grid = t.upload(&HostTensor::zeros(&[1, 3, 6, 5])).unwrap();
    assert!(matches!(
        t.loss_and_gradients(&other_grid),
        Err(Error::Tensor(_))
    ));
}

#[test]
fn loss_needs_a_target() {
    let model = ModelConfig::default();
    let mut t = trainer(&model);
    let s = t.upload(&HostTensor::zeros(&[1, 3, 4, 4])).unwrap();
    assert!(matches!(t.loss_and_gradients(&s), Err(Error::NoTarget)));
}

#[test]
fn rejects_adam_state_of_the_wrong_shape_and_keeps_the_old_one() {
    let model = ModelConfig::default();
    let mut t = trainer(&model);
    let other = ModelConfig {
        position_embeddings: false,
        ..model.clone()
    };
    let mut bad = AdamState::new(&other);
    bad.step = 3;
    assert!(t.set_adam_state(&bad).is_err());
    assert_eq!(t.adam_state().unwrap(), AdamState::new(&model));
}

#[test]
fn noise_is_the_host_noise_bit_for_bit() {
    let model = ModelConfig::default();
    let mut t = trainer(&model);
    let host = HostTensor::filled(&[2, 3, 70, 130], 0.25);
    let mut state = t.upload(&host).unwrap();
    t.add_noise(&mut state, 0.1, 99).unwrap();
    let mut noise = vec![0.0; host.len()];
    fill_gaussian(&mut noise, 0.1, 99);
    let expected: Vec<f32> = host.data().iter().zip(&noise).map(|(x, n)| x + n).collect();
    assert_eq!(t.download(&state).unwrap().data(), &expected[..]);
}

#[test]
fn clamp_limits_every_element() {
    let model = ModelConfig::default();
    let mut t = trainer(&model);
    let host = HostTensor::new(&[1, 3, 1, 2], vec![-5.0, -1.0, 0.5, 2.0, 3.5, 9.0]).unwrap();
    let mut state = t.upload(&host).unwrap();
    t.clamp(&mut state, 3.0).unwrap();
    assert_eq!(
        t.download(&state).unwrap().data(),
        &[-3.0, -1.0, 0.5, 2.0, 3.0, 3.0]
    );
}

#[test]
fn position_features_follow_the_grid_size() {
    // The features are cached per grid size: a trainer that saw another grid first must
    // give the same update as a fresh one.
    let model = ModelConfig::default();
    let weights = nca_testkit::checks::random_weights(&model, 5);
    let state = nca_testkit::checks::random_tensor(&[1, 3, 5, 6], 6);
    let mut fresh = trainer(&model);
    fresh.set_weights(&weights).unwrap();
    let expected = fresh.update(&fresh.upload(&state).unwrap()).unwrap();
    let mut used = trainer(&model);
    used.set_weights(&weights).unwrap();
    let other = used
        .upload(&HostTensor::filled(&[1, 3, 4, 4], 0.3))
        .unwrap();
    used.update(&other).unwrap();
    let got = used.update(&used.upload(&state).unwrap()).unwrap();
    assert_eq!(
        used.download(&got).unwrap(),
        fresh.download(&expected).unwrap()
    );
}

#[test]
fn relu_has_no_gradient_at_zero() {
    // w1 = 0 and b1 = 0 put every pre-activation at exactly 0: relu'(0) = 0 leaves w1 and
    // b1 without gradient (candle's own relu would pass it through).
    let model = ModelConfig::default();
    let mut weights = nca_testkit::checks::random_weights(&model, 7);
    weights[Param::W1].data_mut().fill(0.0);
    weights[Param::B1].data_mut().fill(0.0);
    let mut t = trainer(&model);
    t.set_weights(&weights).unwrap();
    t.set_target(&HostTensor::filled(&[1, 3, 4, 5], 0.5))
        .unwrap();
    let s = t
        .upload(&nca_testkit::checks::random_tensor(&[1, 3, 4, 5], 8))
        .unwrap();
    let (_, grads) = t.loss_and_gradients(&s).unwrap();
    for param in [Param::W1, Param::B1] {
        let g = &grads[param];
        assert!(
            g.data().iter().all(|&x| x == 0.0),
            "{param}: {:?}",
            &g.data()[..4]
        );
    }
}
