//! The single-trajectory training loop and the rollout loop, written once for every
//! backend.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::config::NcaConfig;
use crate::error::TrainError;
use crate::noise::{fill_gaussian, stream_seed, Stream};
use crate::tensor::HostTensor;
use crate::traits::{NoiseSchedule, Trainer, Transition};
use crate::weights::Weights;

/// How far a run has come; saved in checkpoints so training can resume.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Steps completed.
    pub step: u64,
    /// Spikes (simulated trajectories that reached the target) so far.
    pub spikes: u64,
    /// First step whose loss was below ε.
    pub first_below_epsilon: Option<u64>,
}

/// What happened in one training step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// The step just completed (1-based).
    pub step: u64,
    /// Loss of `s + f(s)` against the target at this step.
    pub loss: f32,
    /// Whether the carried state received a spike after this step.
    pub spiked: bool,
    /// Spikes so far, including this one.
    pub spikes: u64,
}

/// What an observer sees after each step: the step, the trainer and the carried state.
pub struct StepContext<'a, T: Trainer> {
    /// The step just completed.
    pub info: StepInfo,
    /// Progress including this step.
    pub progress: &'a Progress,
    /// The trainer, for weights and optimiser state (checkpoints).
    pub trainer: &'a T,
    /// The state carried into the next step (after spike and clamp).
    pub state: &'a T::State,
}

/// Called after every step; snapshots, plots, progress bars and Ctrl-C hook in here.
pub trait Observer<T: Trainer> {
    /// Return `Break` to stop after this step, or an error message to abort the run.
    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, String>;
}

impl<T: Trainer, F> Observer<T> for F
where
    F: FnMut(&StepContext<'_, T>) -> Result<ControlFlow<()>, String>,
{
    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, String> {
        self(ctx)
    }
}

/// An observer that watches nothing.
pub struct NoObserver;

impl<T: Trainer> Observer<T> for NoObserver {
    fn on_step(&mut self, _ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, String> {
        Ok(ControlFlow::Continue(()))
    }
}

/// Loop settings taken from [`NcaConfig`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoopOptions {
    /// Stop once this many steps are completed in total.
    pub steps: u64,
    /// Stop once this many spikes have happened.
    pub max_spikes: Option<u64>,
    /// Clamp the carried state to `[-limit, limit]` after each step.
    pub state_clamp: Option<f32>,
    /// Run seed from which all noise is derived.
    pub seed: u64,
}

impl LoopOptions {
    /// The loop settings of a config.
    pub fn from_config(cfg: &NcaConfig) -> Self {
        Self {
            steps: cfg.training.steps,
            max_spikes: cfg.training.max_spikes,
            state_clamp: cfg.model.state_clamp,
            seed: cfg.training.seed,
        }
    }
}

/// Why [`train`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// `steps` were completed.
    Steps,
    /// `max_spikes` spikes happened.
    MaxSpikes,
    /// The observer asked to stop (e.g. Ctrl-C).
    Interrupted,
}

/// The end of a [`train`] call.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Why the loop stopped.
    pub reason: StopReason,
    /// Loss of the last step run in this call, if any.
    pub last_loss: Option<f32>,
}

/// The initial state: N(0, 1) in every channel, reproducible from the run seed.
pub fn initial_state(cfg: &NcaConfig) -> HostTensor {
    initial_noise(cfg.state_shape(), cfg.training.seed)
}

/// N(0, 1) noise of shape `[B, C, H, W]`: the initial state of a run with seed `seed` (see
/// [`initial_state`]), for callers that know the shape but not a whole config.
pub fn initial_noise(shape: [usize; 4], seed: u64) -> HostTensor {
    let mut state = HostTensor::zeros(&shape);
    fill_gaussian(state.data_mut(), 1.0, stream_seed(seed, 0, Stream::Init));
    state
}

/// Prepares a fresh run: seeded weights (zero output projection), the target, and the
/// uploaded initial state.
pub fn start<T: Trainer>(
    trainer: &mut T,
    cfg: &NcaConfig,
    target: &HostTensor,
) -> Result<T::State, T::Error> {
    trainer.set_weights(&Weights::init(&cfg.model, cfg.training.seed))?;
    trainer.set_target(target)?;
    trainer.upload(&initial_state(cfg))
}

/// Runs the single-trajectory training loop from `progress` until `options.steps`.
///
/// Each step: add σ_small noise to the state; replace it by `s + f(s)` (the incoming
/// state is a constant) while Adam updates the weights from this step's loss; if the
/// schedule says so (loss < ε) add a σ_large spike to the state *carried forward*; clamp;
/// tell the observer. Stops at `steps`, at `max_spikes`, or when the observer says so.
/// A NaN or infinite loss stops the run with [`TrainError::NonFiniteLoss`].
pub fn train<T, N, O>(
    trainer: &mut T,
    state: &mut T::State,
    schedule: &N,
    options: &LoopOptions,
    progress: &mut Progress,
    observer: &mut O,
) -> Result<TrainOutcome, TrainError<T::Error>>
where
    T: Trainer,
    N: NoiseSchedule + ?Sized,
    O: Observer<T> + ?Sized,
{
    let mut last_loss = None;
    if options.max_spikes.is_some_and(|m| progress.spikes >= m) {
        return Ok(TrainOutcome {
            reason: StopReason::MaxSpikes,
            last_loss,
        });
    }
    while progress.step < options.steps {
        let step = progress.step + 1;
        let backend = |source| TrainError::Backend { step, source };
        let sigma = schedule.sigma_small(step);
        trainer
            .add_noise(state, sigma, stream_seed(options.seed, step, Stream::Small))
            .map_err(backend)?;
        let loss = trainer.train_step(state).map_err(backend)?;
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { step, loss });
        }
        let spiked = schedule.should_spike(loss, step);
        if spiked {
            let sigma = schedule.sigma_large(step);
            trainer
                .add_noise(state, sigma, stream_seed(options.seed, step, Stream::Spike))
                .map_err(backend)?;
            progress.spikes += 1;
            progress.first_below_epsilon.get_or_insert(step);
        }
        if let Some(limit) = options.state_clamp {
            trainer.clamp(state, limit).map_err(backend)?;
        }
        progress.step = step;
        last_loss = Some(loss);
        let info = StepInfo {
            step,
            loss,
            spiked,
            spikes: progress.spikes,
        };
        let ctx = StepContext {
            info,
            progress,
            trainer,
            state,
        };
        let flow = observer
            .on_step(&ctx)
            .map_err(|message| TrainError::Observer { step, message })?;
        if flow.is_break() {
            return Ok(TrainOutcome {
                reason: StopReason::Interrupted,
                last_loss,
            });
        }
        if options.max_spikes.is_some_and(|m| progress.spikes >= m) {
            return Ok(TrainOutcome {
                reason: StopReason::MaxSpikes,
                last_loss,
            });
        }
    }
    Ok(TrainOutcome {
        reason: StopReason::Steps,
        last_loss,
    })
}

/// Settings of a rollout (running a trained rule without training).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RolloutOptions {
    /// Steps to run.
    pub steps: u64,
    /// Noise added before every step; 0 makes the rollout deterministic.
    pub sigma: f32,
    /// Clamp after every step, as in training.
    pub state_clamp: Option<f32>,
    /// Seed for the noise.
    pub seed: u64,
    /// Steps already taken on this state: the rollout continues with step `first_step + 1`,
    /// whose noise is the one an uninterrupted rollout would draw there (0 for a new one).
    pub first_step: u64,
}

/// Runs `steps` steps of `s ← clamp(s + noise + f(s + noise))`, calling `on_step` with the
/// 1-based step (counted from the start, `first_step + 1` first) and the new state after
/// each one.
pub fn rollout<T, E>(
    transition: &mut T,
    state: &mut T::State,
    options: &RolloutOptions,
    mut on_step: impl FnMut(u64, &T, &T::State) -> Result<(), E>,
) -> Result<(), E>
where
    T: Transition,
    E: From<T::Error>,
{
    let last = options.first_step.saturating_add(options.steps);
    for step in options.first_step.saturating_add(1)..=last {
        let seed = stream_seed(options.seed, step, Stream::Rollout);
        transition.add_noise(state, options.sigma, seed)?;
        *state = transition.step(state)?;
        if let Some(limit) = options.state_clamp {
            transition.clamp(state, limit)?;
        }
        on_step(step, transition, state)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The spike rule, checked on a scripted trainer so that every branch can be reached
    //! (no real loss is ever negative, so "ε = 0 never spikes" cannot fail on a backend).

    use super::*;
    use crate::config::ModelConfig;
    use crate::error::TensorError;
    use crate::noise::ConstantNoise;
    use crate::traits::AdamState;

    /// Replaces the state by zeros at every step and reports scripted losses.
    struct Scripted {
        model: ModelConfig,
        losses: Vec<f32>,
        calls: usize,
    }

    impl Transition for Scripted {
        type State = HostTensor;
        type Error = TensorError;
        fn model(&self) -> &ModelConfig {
            &self.model
        }
        fn upload(&self, host: &HostTensor) -> Result<HostTensor, TensorError> {
            Ok(host.clone())
        }
        fn download(&self, state: &HostTensor) -> Result<HostTensor, TensorError> {
            Ok(state.clone())
        }
        fn update(&mut self, state: &HostTensor) -> Result<HostTensor, TensorError> {
            Ok(HostTensor::zeros(state.shape()))
        }
        fn step(&mut self, state: &HostTensor) -> Result<HostTensor, TensorError> {
            Ok(HostTensor::zeros(state.shape()))
        }
        fn attention(&mut self, state: &HostTensor) -> Result<HostTensor, TensorError> {
            Ok(HostTensor::zeros(state.shape()))
        }
        fn weights(&self) -> Result<Weights, TensorError> {
            Ok(Weights::zeros(&self.model))
        }
        fn set_weights(&mut self, _: &Weights) -> Result<(), TensorError> {
            Ok(())
        }
    }

    impl Trainer for Scripted {
        fn set_target(&mut self, _: &HostTensor) -> Result<(), TensorError> {
            Ok(())
        }
        fn loss_and_gradients(&mut self, _: &HostTensor) -> Result<(f32, Weights), TensorError> {
            Ok((0.0, Weights::zeros(&self.model)))
        }
        fn train_step(&mut self, state: &mut HostTensor) -> Result<f32, TensorError> {
            *state = HostTensor::zeros(state.shape());
            self.calls += 1;
            Ok(self.losses[self.calls - 1])
        }
        fn adam_state(&self) -> Result<AdamState, TensorError> {
            Ok(AdamState::new(&self.model))
        }
        fn set_adam_state(&mut self, _: &AdamState) -> Result<(), TensorError> {
            Ok(())
        }
    }

    /// Runs the loop over `losses` with threshold `epsilon`; returns the progress, the
    /// reason and the RMS of the carried state after every step.
    fn run(
        losses: &[f32],
        epsilon: f32,
        max_spikes: Option<u64>,
    ) -> (Progress, StopReason, Vec<f32>) {
        let mut t = Scripted {
            model: ModelConfig::plain(),
            losses: losses.to_vec(),
            calls: 0,
        };
        let mut state = HostTensor::zeros(&[1, 3, 16, 16]);
        let schedule = ConstantNoise {
            sigma_small: 0.01,
            sigma_large: 0.1,
            epsilon,
        };
        let options = LoopOptions {
            steps: losses.len() as u64,
            max_spikes,
            state_clamp: None,
            seed: 9,
        };
        let mut progress = Progress::default();
        let mut rms = Vec::new();
        let mut observe = |ctx: &StepContext<'_, Scripted>| {
            rms.push(ctx.state.rms());
            Ok(ControlFlow::Continue(()))
        };
        let outcome = train(
            &mut t,
            &mut state,
            &schedule,
            &options,
            &mut progress,
            &mut observe,
        )
        .unwrap();
        (progress, outcome.reason, rms)
    }

    #[test]
    fn a_loss_below_epsilon_spikes_the_carried_state() {
        let (progress, reason, rms) = run(&[0.5, 0.05, 0.2, 0.01], 0.1, None);
        assert_eq!(reason, StopReason::Steps);
        assert_eq!(progress.spikes, 2);
        assert_eq!(progress.first_below_epsilon, Some(2));
        // train_step leaves zeros: only a spike can make the carried state non-zero, and
        // it has RMS σ_large = 0.1 over 768 samples.
        assert_eq!(rms[0], 0.0);
        assert!((rms[1] / 0.1 - 1.0).abs() < 0.1, "spike RMS {}", rms[1]);
        assert_eq!(rms[2], 0.0);
        assert!((rms[3] / 0.1 - 1.0).abs() < 0.1, "spike RMS {}", rms[3]);
    }

    #[test]
    fn a_loss_equal_to_epsilon_does_not_spike() {
        let (progress, _, rms) = run(&[0.0, 0.1, 0.0], 0.0, None);
        assert_eq!(progress.spikes, 0);
        assert_eq!(progress.first_below_epsilon, None);
        assert!(rms.iter().all(|&r| r == 0.0));
        let (progress, _, _) = run(&[0.1, 0.1], 0.1, None);
        assert_eq!(progress.spikes, 0);
    }

    #[test]
    fn max_spikes_stops_the_loop_after_the_spiking_step() {
        let (progress, reason, rms) = run(&[0.5, 0.05, 0.2, 0.01], 0.1, Some(1));
        assert_eq!(reason, StopReason::MaxSpikes);
        assert_eq!((progress.step, progress.spikes), (2, 1));
        assert_eq!(rms.len(), 2);
    }

    #[test]
    fn a_non_finite_loss_is_an_error_naming_the_step() {
        let mut t = Scripted {
            model: ModelConfig::plain(),
            losses: vec![0.5, f32::NAN],
            calls: 0,
        };
        let mut state = HostTensor::zeros(&[1, 3, 4, 4]);
        let options = LoopOptions {
            steps: 5,
            max_spikes: None,
            state_clamp: None,
            seed: 1,
        };
        let err = train(
            &mut t,
            &mut state,
            &ConstantNoise::from(&crate::config::NoiseConfig::default()),
            &options,
            &mut Progress::default(),
            &mut NoObserver,
        )
        .unwrap_err();
        assert!(
            matches!(err, TrainError::NonFiniteLoss { step: 2, .. }),
            "{err}"
        );
    }
}
