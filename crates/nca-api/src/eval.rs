//! The regrowth score: how well a trained rule grows the target from fresh noise.
//!
//! Training sees one long trajectory, so its loss says little about what the rule does
//! from a new start. The score rolls the rule out from N(0, 1) noise that training never
//! drew, without noise, for a fixed number of steps, and compares the visible channels,
//! clamped to `[0, 1]` as the pictures show them, with the target: MSE and PSNR (peak 1).
//! It is written once over [`Transition`], so every backend is scored the same way.

use serde::{Deserialize, Serialize};

use crate::error::TensorError;
use crate::noise::{add_gaussian, stream_seed, Stream};
use crate::tensor::HostTensor;
use crate::traits::Transition;

/// PSNR reported for a perfect match (MSE below [`MIN_MSE`]), so that JSON and plots never
/// see an infinity.
pub const MAX_PSNR_DB: f64 = 100.0;

/// MSE at or below which a score counts as a perfect match (`10·log10(1/1e-10) = 100 dB`).
pub const MIN_MSE: f64 = 1e-10;

/// Default number of rollout steps of the score.
pub const DEFAULT_EVAL_STEPS: u64 = 100;

/// Default number of fresh-noise seeds the score averages over.
pub const DEFAULT_EVAL_SEEDS: usize = 3;

/// Peak signal-to-noise ratio in dB of an MSE between images in `[0, 1]`, capped at
/// [`MAX_PSNR_DB`] (identical images); a NaN MSE scores 0 dB.
pub fn psnr_db(mse: f64) -> f64 {
    if mse.is_nan() {
        return 0.0;
    }
    if mse <= MIN_MSE {
        return MAX_PSNR_DB;
    }
    (10.0 * (1.0 / mse).log10()).min(MAX_PSNR_DB)
}

/// MSE between batch element `b` of a `[B, C, H, W]` state, its first V channels clamped to
/// `[0, 1]` (NaN counts as 0, as in pictures), and batch element 0 of a `[B', V, H, W]`
/// target.
pub fn visible_mse(state: &HostTensor, b: usize, target: &HostTensor) -> Result<f64, TensorError> {
    let [sb, c, h, w] = state.dims4("state")?;
    let [_, v, th, tw] = target.dims4("target")?;
    if (th, tw) != (h, w) || v > c || b >= sb {
        return Err(TensorError::WrongShape {
            what: format!("target for batch element {b} of the state"),
            expected: vec![1, c.min(v), h, w],
            found: target.shape().to_vec(),
        });
    }
    let plane = v * h * w;
    let start = b * c * h * w;
    let s = &state.data()[start..start + plane];
    let t = &target.data()[..plane];
    let sum: f64 = s
        .iter()
        .zip(t)
        .map(|(&a, &b)| {
            let a = if a.is_nan() { 0.0 } else { a.clamp(0.0, 1.0) };
            f64::from(a - b).powi(2)
        })
        .sum();
    Ok(sum / plane as f64)
}

/// Settings of [`regrowth`].
#[derive(Clone, Debug, PartialEq)]
pub struct RegrowthOptions {
    /// Rollout steps from noise before scoring.
    pub steps: u64,
    /// Run seed the fresh noise is derived from (see [`eval_noise_seed`]).
    pub run_seed: u64,
    /// How many fresh-noise starts to score (one batch element each).
    pub seeds: usize,
    /// Clamp after every step, as in training.
    pub state_clamp: Option<f32>,
}

/// The score of one fresh-noise start.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedScore {
    /// Index `k` (1-based) of the start; its noise is drawn from
    /// [`eval_noise_seed`]`(run_seed, k)`.
    pub seed: u64,
    /// MSE of the clamped visible channels against the target.
    pub mse: f64,
    /// PSNR in dB (peak 1, capped at [`MAX_PSNR_DB`]).
    pub psnr_db: f64,
}

/// The regrowth score of a rule: per start and the mean.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegrowthScore {
    /// Rollout steps from noise.
    pub steps: u64,
    /// Run seed the starts were derived from.
    pub run_seed: u64,
    /// One entry per start.
    pub per_seed: Vec<SeedScore>,
    /// Mean of the per-start MSEs.
    pub mean_mse: f64,
    /// Mean of the per-start PSNRs in dB.
    pub mean_psnr_db: f64,
}

/// Seed of the N(0, 1) noise of evaluation start `k` (1-based) of a run seeded `run_seed`.
///
/// Training draws its initial state from `stream_seed(run_seed, 0, Init)` and all later
/// noise from other streams, so step indices `k >= 1` of the `Init` stream are noise the
/// training never saw.
pub fn eval_noise_seed(run_seed: u64, k: u64) -> u64 {
    stream_seed(run_seed, k, Stream::Init)
}

/// The run seed of a held-out score: weights chosen by their periodic scores are scored
/// again on starts and rollout noise drawn from this seed instead of `run_seed`, so the
/// reported number is not biased upwards by the choice.
pub fn held_out_run_seed(run_seed: u64) -> u64 {
    stream_seed(run_seed, 0, Stream::HeldOut)
}

/// The `[S, C, H, W]` initial state of the evaluation: batch element `i` is N(0, 1) noise
/// from [`eval_noise_seed`]`(run_seed, i + 1)`. The shape's element count must fit in
/// usize ([`regrowth`] checks it; check memory with [`crate::rollout_bytes`] first).
pub fn eval_initial_state(shape: [usize; 4], run_seed: u64) -> HostTensor {
    let [s, c, h, w] = shape;
    let mut state = HostTensor::zeros(&shape);
    let each = c * h * w;
    for (i, chunk) in state.data_mut().chunks_mut(each.max(1)).take(s).enumerate() {
        add_gaussian(chunk, 1.0, eval_noise_seed(run_seed, i as u64 + 1));
    }
    state
}

/// A callback that sees the downloaded state after every step of [`regrowth`].
pub type StepWatcher<'a> = &'a mut dyn FnMut(u64, &HostTensor);

/// Rolls `transition` out from fresh noise (one batch element per start, no added noise)
/// for `options.steps` steps and scores every start against batch element 0 of `target`
/// (`[B, V, H, W]`).
///
/// `on_step(step, state)` sees the downloaded `[S, C, H, W]` state at step 0 (the noise)
/// and after every step, for pictures; pass `None` to skip the downloads.
pub fn regrowth<T: Transition>(
    transition: &mut T,
    target: &HostTensor,
    options: &RegrowthOptions,
    mut on_step: Option<StepWatcher<'_>>,
) -> Result<RegrowthScore, T::Error> {
    let [_, _, h, w] = target.dims4("target")?;
    let c = transition.model().channels();
    let seeds = options.seeds.max(1);
    let shape = [seeds, c, h, w];
    if crate::tensor::element_count(&shape).is_none() {
        return Err(TensorError::TooManyElements {
            what: "regrowth state [seeds, C, H, W] (evaluation seeds)".into(),
            shape: shape.to_vec(),
        }
        .into());
    }
    let host = eval_initial_state(shape, options.run_seed);
    if let Some(f) = on_step.as_mut() {
        f(0, &host);
    }
    let mut state = transition.upload(&host)?;
    for step in 1..=options.steps {
        state = transition.step(&state)?;
        if let Some(limit) = options.state_clamp {
            transition.clamp(&mut state, limit)?;
        }
        if let Some(f) = on_step.as_mut() {
            f(step, &transition.download(&state)?);
        }
    }
    let last = transition.download(&state)?;
    let mut per_seed = Vec::with_capacity(seeds);
    for b in 0..seeds {
        let mse = visible_mse(&last, b, target)?;
        per_seed.push(SeedScore {
            seed: b as u64 + 1,
            mse,
            psnr_db: psnr_db(mse),
        });
    }
    Ok(score(options, per_seed))
}

fn score(options: &RegrowthOptions, per_seed: Vec<SeedScore>) -> RegrowthScore {
    let n = per_seed.len().max(1) as f64;
    RegrowthScore {
        steps: options.steps,
        run_seed: options.run_seed,
        mean_mse: per_seed.iter().map(|s| s.mse).sum::<f64>() / n,
        mean_psnr_db: per_seed.iter().map(|s| s.psnr_db).sum::<f64>() / n,
        per_seed,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn known_mse_gives_known_db() {
        assert!((psnr_db(0.01) - 20.0).abs() < 1e-12);
        assert!((psnr_db(1e-3) - 30.0).abs() < 1e-12);
        assert!((psnr_db(1.0) - 0.0).abs() < 1e-12);
        assert!((psnr_db(0.25) - 6.020_599_913_279_624).abs() < 1e-9);
    }

    #[test]
    fn identical_images_are_capped_not_infinite() {
        assert_eq!(psnr_db(0.0), MAX_PSNR_DB);
        assert_eq!(psnr_db(1e-12), MAX_PSNR_DB);
        assert_eq!(psnr_db(f64::NAN), 0.0);
        let t = HostTensor::filled(&[1, 3, 2, 2], 0.5);
        assert_eq!(visible_mse(&t, 0, &t).unwrap(), 0.0);
    }

    #[test]
    fn mse_clamps_visible_channels_and_ignores_hidden_ones() {
        // Visible values 2.0 and -1.0 are drawn as 1 and 0; the hidden channel is ignored.
        let state = HostTensor::new(&[1, 2, 1, 2], vec![2.0, -1.0, 9.0, 9.0]).unwrap();
        let target = HostTensor::new(&[1, 1, 1, 2], vec![1.0, 0.5]).unwrap();
        let mse = visible_mse(&state, 0, &target).unwrap();
        assert!((mse - 0.125).abs() < 1e-12, "{mse}");
        let nan = HostTensor::new(&[1, 2, 1, 2], vec![f32::NAN, 0.5, 0.0, 0.0]).unwrap();
        assert!((visible_mse(&nan, 0, &target).unwrap() - 0.5).abs() < 1e-12);
        assert!(
            visible_mse(&state, 1, &target).is_err(),
            "no batch element 1"
        );
        let wrong = HostTensor::zeros(&[1, 1, 2, 2]);
        assert!(visible_mse(&state, 0, &wrong).is_err());
    }

    #[test]
    fn starts_differ_from_each_other_and_from_training() {
        let s = eval_initial_state([3, 2, 4, 4], 0);
        let d = s.data();
        assert_ne!(&d[..32], &d[32..64]);
        assert_ne!(eval_noise_seed(0, 1), stream_seed(0, 0, Stream::Init));
        let rms = s.rms();
        assert!((0.7..1.3).contains(&rms), "N(0, 1): rms {rms}");
        assert_eq!(s, eval_initial_state([3, 2, 4, 4], 0), "reproducible");
    }

    #[test]
    fn means_are_over_starts() {
        let opts = RegrowthOptions {
            steps: 1,
            run_seed: 0,
            seeds: 2,
            state_clamp: None,
        };
        let per = vec![
            SeedScore {
                seed: 1,
                mse: 0.01,
                psnr_db: 20.0,
            },
            SeedScore {
                seed: 2,
                mse: 0.001,
                psnr_db: 30.0,
            },
        ];
        let s = score(&opts, per);
        assert!((s.mean_psnr_db - 25.0).abs() < 1e-12);
        assert!((s.mean_mse - 0.0055).abs() < 1e-12);
    }

    /// A rule that jumps straight to a fixed picture: the score of a perfect rule.
    struct Paint {
        model: crate::ModelConfig,
        picture: Vec<f32>,
    }

    #[derive(Debug, thiserror::Error)]
    #[error(transparent)]
    struct MockError(#[from] TensorError);

    impl Transition for Paint {
        type State = HostTensor;
        type Error = MockError;
        fn model(&self) -> &crate::ModelConfig {
            &self.model
        }
        fn upload(&self, host: &HostTensor) -> Result<HostTensor, MockError> {
            Ok(host.clone())
        }
        fn download(&self, state: &HostTensor) -> Result<HostTensor, MockError> {
            Ok(state.clone())
        }
        fn update(&mut self, state: &HostTensor) -> Result<HostTensor, MockError> {
            let next = self.step(state)?;
            let d = next.data().iter().zip(state.data()).map(|(a, b)| a - b);
            Ok(HostTensor::new(state.shape(), d.collect())?)
        }
        fn step(&mut self, state: &HostTensor) -> Result<HostTensor, MockError> {
            let [b, c, h, w] = state.dims4("state")?;
            let mut next = state.clone();
            for i in 0..b {
                let at = i * c * h * w;
                next.data_mut()[at..at + self.picture.len()].copy_from_slice(&self.picture);
            }
            Ok(next)
        }
        fn attention(&mut self, _: &HostTensor) -> Result<HostTensor, MockError> {
            Ok(HostTensor::zeros(&[1]))
        }
        fn weights(&self) -> Result<crate::Weights, MockError> {
            Ok(crate::Weights::zeros(&self.model))
        }
        fn set_weights(&mut self, _: &crate::Weights) -> Result<(), MockError> {
            Ok(())
        }
    }

    #[test]
    fn an_overflowing_seed_count_is_an_error_not_a_panic() {
        let target = HostTensor::filled(&[1, 3, 4, 5], 0.25);
        let mut rule = Paint {
            model: crate::ModelConfig::plain(),
            picture: target.data().to_vec(),
        };
        let opts = RegrowthOptions {
            steps: 1,
            run_seed: 0,
            seeds: usize::MAX,
            state_clamp: None,
        };
        let err = regrowth(&mut rule, &target, &opts, None).expect_err("too many seeds");
        assert!(err.to_string().contains("evaluation seeds"), "{err}");
    }

    #[test]
    fn a_rule_that_paints_the_target_scores_the_cap_and_noise_scores_low() {
        let model = crate::ModelConfig {
            hidden_channels: 1,
            ..crate::ModelConfig::plain()
        };
        let target = HostTensor::filled(&[1, 3, 4, 5], 0.25);
        let mut rule = Paint {
            model,
            picture: target.data().to_vec(),
        };
        let opts = RegrowthOptions {
            steps: 3,
            run_seed: 9,
            seeds: 3,
            state_clamp: Some(3.0),
        };
        let mut seen = Vec::new();
        let mut watch = |step: u64, s: &HostTensor| seen.push((step, s.shape().to_vec()));
        let score = regrowth(&mut rule, &target, &opts, Some(&mut watch)).unwrap();
        assert_eq!(seen.len(), 4, "step 0 and three steps");
        assert_eq!(seen[0].1, vec![3, 4, 4, 5]);
        assert_eq!(score.per_seed.len(), 3);
        assert_eq!(score.mean_psnr_db, MAX_PSNR_DB);
        let lazy = RegrowthOptions { steps: 0, ..opts };
        let noise = regrowth(&mut rule, &target, &lazy, None).unwrap();
        assert!(noise.mean_psnr_db < 10.0, "{noise:?}");
        assert!(noise.per_seed.iter().all(|s| s.mse > 0.05));
    }
}
