//! A checkpoint trained on dfdx rolls out to the same state on nca-ndarray, and the
//! other way round (the check lives in `nca_testkit::cross`; it uses the default picture
//! model), and both backends agree on every combination of the model options.

use nca_api::{ModelConfig, OptimizerConfig};
use nca_testkit::cross::{checkpoint_rolls_out_identically, training_matches};
use nca_testkit::Harness;

struct Dfdx;

impl Harness for Dfdx {
    type Backend = nca_dfdx::DfdxTrainer;

    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<nca_dfdx::DfdxTrainer, nca_dfdx::Error> {
        nca_dfdx::DfdxTrainer::new(model, optim)
    }
}

struct Ndarray;

impl Harness for Ndarray {
    type Backend = nca_ndarray::NdarrayTrainer;

    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<nca_ndarray::NdarrayTrainer, nca_ndarray::Error> {
        nca_ndarray::NdarrayTrainer::new(model, optim)
    }
}

#[test]
fn dfdx_checkpoint_rolls_out_the_same_on_ndarray() {
    checkpoint_rolls_out_identically::<Dfdx, Ndarray>();
}

#[test]
fn training_on_dfdx_matches_training_on_ndarray() {
    training_matches::<Dfdx, Ndarray>();
}

#[test]
fn ndarray_checkpoint_rolls_out_the_same_on_dfdx() {
    checkpoint_rolls_out_identically::<Ndarray, Dfdx>();
}

/// Largest `|a − b| / max(1, |b|)` over two equally long slices.
fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1.0))
        .fold(0.0, f32::max)
}

/// Every combination of the two picture-model options (plain, position inputs only, MLP
/// only, both), with hidden channels and a batch of two: dfdx and ndarray agree on the
/// update, the attention, the loss and every gradient for the same random weights.
#[test]
#[allow(clippy::unwrap_used)]
fn every_model_option_agrees_with_ndarray() {
    use nca_api::{Trainer, Transition};
    use nca_testkit::checks::{random_tensor, random_weights};

    for (octaves, hidden) in [
        (None, None),
        (Some(2), None),
        (None, Some(12)),
        (Some(6), Some(128)),
    ] {
        let model = ModelConfig {
            hidden_channels: 1,
            position_octaves: octaves,
            mlp_hidden: hidden,
            ..ModelConfig::default()
        };
        let optim = OptimizerConfig::default();
        let mut a = Dfdx::create(&model, &optim).unwrap();
        let mut b = Ndarray::create(&model, &optim).unwrap();
        // Smaller weights than the default ±0.6, so 128 hidden units do not saturate.
        let mut weights = random_weights(&model, 71);
        for (_, t) in weights.named_mut() {
            t.data_mut().iter_mut().for_each(|x| *x *= 0.5);
        }
        let state = random_tensor(&[2, 4, 5, 6], 72);
        let target = random_tensor(&[2, 3, 5, 6], 73);
        a.set_weights(&weights).unwrap();
        b.set_weights(&weights).unwrap();
        a.set_target(&target).unwrap();
        b.set_target(&target).unwrap();
        let (sa, sb) = (a.upload(&state).unwrap(), b.upload(&state).unwrap());

        let fa = a.update(&sa).unwrap();
        let fa = a.download(&fa).unwrap();
        let fb = b.update(&sb).unwrap();
        let fb = b.download(&fb).unwrap();
        assert!(
            fb.data().iter().any(|&x| x.abs() > 1e-2),
            "{model:?}: f ≈ 0"
        );
        let diff = max_rel_diff(fa.data(), fb.data());
        assert!(diff < 1e-5, "{model:?}: update differs by {diff}");
        let (aa, ab) = (a.attention(&sa).unwrap(), b.attention(&sb).unwrap());
        let diff = max_rel_diff(aa.data(), ab.data());
        assert!(diff < 1e-5, "{model:?}: attention differs by {diff}");

        let (la, ga) = a.loss_and_gradients(&sa).unwrap();
        let (lb, gb) = b.loss_and_gradients(&sb).unwrap();
        let diff = max_rel_diff(&[la], &[lb]);
        assert!(diff < 1e-5, "{model:?}: loss {la} vs {lb}");
        let names = |g: &nca_api::Weights| g.named().iter().map(|(n, _)| *n).collect::<Vec<_>>();
        assert_eq!(names(&ga), names(&gb));
        assert_eq!(
            names(&ga).contains(&nca_api::Param::W1),
            hidden.is_some(),
            "w1 exactly with the MLP"
        );
        for ((name, x), (_, y)) in ga.named().into_iter().zip(gb.named()) {
            assert!(
                y.data().iter().any(|&g| g != 0.0),
                "{model:?}: grad.{name} is zero"
            );
            let diff = max_rel_diff(x.data(), y.data());
            assert!(diff < 1e-4, "{model:?}: grad.{name} differs by {diff}");
        }
    }
}
