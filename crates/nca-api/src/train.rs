//! The single-trajectory training loop and the rollout loop, written once for every
//! backend.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::config::{LrSchedule, NcaConfig, SpikeKind};
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
    /// Spikes (simulated new trajectories) so far.
    pub spikes: u64,
    /// First step whose loss was below ε.
    pub first_below_epsilon: Option<u64>,
    /// Step of the last spike (`training.spike.force_after` counts from it); `None`
    /// before the first, and in checkpoints written before it was recorded.
    #[serde(default)]
    pub last_spike: Option<u64>,
    /// The moving average of the weights (`training.ema_decay`), after the last step;
    /// `None` without one. Not in the progress JSON: a checkpoint stores it as its
    /// weights ([`crate::Checkpoint::training_weights`]).
    #[serde(skip)]
    pub average: Option<Weights>,
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
    /// Standard deviation of the noise the spike added (drawn from the
    /// [`crate::noise::Stream::Spike`] stream of this step, so a picture can take it off
    /// again); 0 without a spike and for a spike that replaced the state.
    pub spike_sigma: f32,
    /// Learning rate of this step's update.
    pub learning_rate: f32,
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
    /// The state before a spike that replaced it with fresh noise
    /// ([`crate::SpikeKind::Reset`]), for pictures of what the rule made.
    pub before_reset: Option<&'a T::State>,
}

/// What an observer's evaluation found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    /// The rule's regrowth PSNR in dB, compared with [`LoopOptions::stop_at_psnr`];
    /// `None` when the observer does not score.
    pub psnr_db: Option<f64>,
    /// `Break` stops the loop after this evaluation, as from [`Observer::on_step`].
    pub flow: ControlFlow<()>,
}

/// Called after every step; snapshots, plots, progress bars, periodic scores and Ctrl-C
/// hook in here.
pub trait Observer<T: Trainer> {
    /// Why the observer failed, kept whole in [`TrainError::Observer`].
    type Error: std::error::Error + Send + Sync + 'static;

    /// Return `Break` to stop after this step, or an error to abort the run.
    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, Self::Error>;

    /// Scores the rule after step `step`, every [`LoopOptions::evaluate_every`] steps
    /// (not after the last step of a run, which callers score themselves). The default
    /// scores nothing, so the stop rule never fires.
    fn on_evaluation(&mut self, step: u64, trainer: &mut T) -> Result<Evaluation, Self::Error> {
        let _ = (step, trainer);
        Ok(Evaluation {
            psnr_db: None,
            flow: ControlFlow::Continue(()),
        })
    }
}

impl<T: Trainer, F, E> Observer<T> for F
where
    F: FnMut(&StepContext<'_, T>) -> Result<ControlFlow<()>, E>,
    E: std::error::Error + Send + Sync + 'static,
{
    type Error = E;

    fn on_step(&mut self, ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, E> {
        self(ctx)
    }
}

/// An observer that watches nothing.
pub struct NoObserver;

impl<T: Trainer> Observer<T> for NoObserver {
    type Error = std::convert::Infallible;

    fn on_step(&mut self, _ctx: &StepContext<'_, T>) -> Result<ControlFlow<()>, Self::Error> {
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
    /// Base learning rate (`training.learning_rate`).
    pub learning_rate: f32,
    /// How the learning rate changes with the step.
    pub lr_schedule: LrSchedule,
    /// Spike after this many steps without one, whatever the loss.
    pub force_spike_after: Option<u64>,
    /// What a spike does to the carried state.
    pub spike_kind: SpikeKind,
    /// Replace the carried state with fresh N(0, 1) noise at every multiple of this many
    /// steps (counted as a spike).
    pub reset_every: Option<u64>,
    /// Ask the observer for a score every this many steps.
    pub evaluate_every: Option<u64>,
    /// Stop once a score reaches this PSNR in dB.
    pub stop_at_psnr: Option<f32>,
    /// Decay per step of the weights' moving average ([`Progress::average`]), which the
    /// observer's scores see instead of the latest weights; `None`: no average.
    pub ema_decay: Option<f32>,
}

impl LoopOptions {
    /// The loop settings of a config (no periodic scoring: that is the caller's choice).
    pub fn from_config(cfg: &NcaConfig) -> Self {
        let t = &cfg.training;
        Self {
            steps: t.steps,
            max_spikes: t.max_spikes,
            state_clamp: cfg.model.state_clamp,
            seed: t.seed,
            learning_rate: t.learning_rate,
            lr_schedule: t.lr_schedule,
            force_spike_after: t.spike.force_after,
            spike_kind: t.spike.kind,
            reset_every: t.spike.reset_every,
            evaluate_every: None,
            stop_at_psnr: t.stop_at_psnr,
            ema_decay: t.ema_decay,
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
    /// A score reached `stop_at_psnr`.
    ReachedPsnr {
        /// The step after which it was scored.
        step: u64,
    },
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
/// Each step: set the scheduled learning rate; add σ_small noise to the state; replace it
/// by `s + f(s)` (the incoming state is a constant) while Adam updates the weights from
/// this step's loss; if the schedule says so (loss < ε), or `force_spike_after` steps
/// passed without a spike, spike the state *carried forward*; at every multiple of
/// `reset_every` replace it with fresh noise; clamp; tell the observer;
/// with `ema_decay`, update the weights' moving average ([`Progress::average`]); tell
/// the observer; every `evaluate_every` steps ask the observer for a score, with the
/// average in the trainer while it scores. Stops at `steps`, at
/// `max_spikes`, when a score reaches `stop_at_psnr`, or when the observer says so.
/// A NaN or infinite loss stops the run with [`TrainError::NonFiniteLoss`].
pub fn train<T, N, O>(
    trainer: &mut T,
    state: &mut T::State,
    schedule: &N,
    options: &LoopOptions,
    progress: &mut Progress,
    observer: &mut O,
) -> Result<TrainOutcome, TrainError<T::Error, O::Error>>
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
    if options.ema_decay.is_none() {
        progress.average = None;
    }
    let mut learning_rate = options.learning_rate;
    while progress.step < options.steps {
        let step = progress.step + 1;
        let backend = |source| TrainError::Backend { step, source };
        if options.lr_schedule != LrSchedule::Constant {
            learning_rate = options
                .lr_schedule
                .rate(options.learning_rate, step, options.steps);
            trainer.set_learning_rate(learning_rate).map_err(backend)?;
        }
        let sigma = schedule.sigma_small(step);
        trainer
            .add_noise(state, sigma, stream_seed(options.seed, step, Stream::Small))
            .map_err(backend)?;
        let loss = trainer.train_step(state).map_err(backend)?;
        if !loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { step, loss });
        }
        let below = schedule.should_spike(loss, step);
        let since = step.saturating_sub(progress.last_spike.unwrap_or(0));
        let forced = options.force_spike_after.is_some_and(|n| since >= n);
        let periodic = options.reset_every.is_some_and(|n| step.is_multiple_of(n));
        let kind = if periodic {
            SpikeKind::Reset
        } else {
            options.spike_kind
        };
        let spiked = below || forced || periodic;
        let mut spike_sigma = 0.0;
        let mut before_reset = None;
        if spiked {
            let seed = stream_seed(options.seed, step, Stream::Spike);
            match kind {
                SpikeKind::Add => spike_sigma = schedule.sigma_large(step),
                SpikeKind::Scaled(fraction) => {
                    spike_sigma = fraction * trainer.download(state).map_err(backend)?.rms();
                }
                SpikeKind::Reset => {
                    let shape = trainer.download(state).map_err(backend)?.dims4("state");
                    let shape = shape.map_err(|e| backend(e.into()))?;
                    let mut fresh = HostTensor::zeros(&shape);
                    fill_gaussian(fresh.data_mut(), 1.0, seed);
                    let fresh = trainer.upload(&fresh).map_err(backend)?;
                    before_reset = Some(std::mem::replace(state, fresh));
                }
            }
            if before_reset.is_none() {
                trainer
                    .add_noise(state, spike_sigma, seed)
                    .map_err(backend)?;
            }
            progress.spikes += 1;
            progress.last_spike = Some(step);
            if below {
                progress.first_below_epsilon.get_or_insert(step);
            }
        }
        if let Some(limit) = options.state_clamp {
            trainer.clamp(state, limit).map_err(backend)?;
        }
        if let Some(decay) = options.ema_decay {
            let latest = trainer.weights().map_err(backend)?;
            match &mut progress.average {
                Some(average) => average
                    .blend_toward(&latest, decay)
                    .map_err(|e| backend(e.into()))?,
                // The first step after a start (or a resume without a stored average).
                None => progress.average = Some(latest),
            }
        }
        progress.step = step;
        last_loss = Some(loss);
        let info = StepInfo {
            step,
            loss,
            spiked,
            spikes: progress.spikes,
            spike_sigma,
            learning_rate,
        };
        let ctx = StepContext {
            info,
            progress,
            trainer,
            state,
            before_reset: before_reset.as_ref(),
        };
        let observed = |source| TrainError::Observer { step, source };
        let flow = observer.on_step(&ctx).map_err(observed)?;
        let outcome = |reason| Ok(TrainOutcome { reason, last_loss });
        if flow.is_break() {
            return outcome(StopReason::Interrupted);
        }
        if options.max_spikes.is_some_and(|m| progress.spikes >= m) {
            return outcome(StopReason::MaxSpikes);
        }
        let scored = options
            .evaluate_every
            .is_some_and(|every| step.is_multiple_of(every) && step < options.steps);
        if scored {
            // The observer scores (and may keep) the rule: the average when there is one.
            let latest = match &progress.average {
                Some(average) => {
                    let latest = trainer.weights().map_err(backend)?;
                    trainer.set_weights(average).map_err(backend)?;
                    Some(latest)
                }
                None => None,
            };
            let evaluation = observer.on_evaluation(step, trainer);
            if let Some(latest) = latest {
                trainer.set_weights(&latest).map_err(backend)?;
            }
            let evaluation = evaluation.map_err(observed)?;
            let reached = evaluation.psnr_db.zip(options.stop_at_psnr);
            if reached.is_some_and(|(psnr, goal)| psnr >= f64::from(goal)) {
                return outcome(StopReason::ReachedPsnr { step });
            }
            if evaluation.flow.is_break() {
                return outcome(StopReason::Interrupted);
            }
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
        /// Every learning rate set, in order.
        rates: Vec<f32>,
        /// Leave the state as it is instead of zeroing it.
        keep_state: bool,
        /// The weights: every value is the number of the last step trained (0 before).
        weights: Weights,
    }

    impl Scripted {
        fn new(losses: &[f32]) -> Self {
            Self {
                model: ModelConfig::plain(),
                losses: losses.to_vec(),
                calls: 0,
                rates: Vec::new(),
                keep_state: false,
                weights: Weights::zeros(&ModelConfig::plain()),
            }
        }
    }

    /// Loop options for `steps` steps with the original rules.
    fn options(steps: u64, max_spikes: Option<u64>, seed: u64) -> LoopOptions {
        LoopOptions {
            steps,
            max_spikes,
            state_clamp: None,
            seed,
            ..LoopOptions::from_config(&NcaConfig::default())
        }
    }

    /// No small noise, σ_large 0.1, ε 0.1: only a spike moves the state.
    fn spikes_only() -> ConstantNoise {
        ConstantNoise {
            sigma_small: 0.0,
            sigma_large: 0.1,
            epsilon: 0.1,
        }
    }

    /// Runs the loop from a fresh start; returns the outcome and the progress.
    fn drive<O: Observer<Scripted>>(
        t: &mut Scripted,
        state: &mut HostTensor,
        schedule: &ConstantNoise,
        options: &LoopOptions,
        observe: &mut O,
    ) -> (TrainOutcome, Progress)
    where
        O::Error: std::fmt::Debug,
    {
        let mut progress = Progress::default();
        let outcome = train(t, state, schedule, options, &mut progress, observe).unwrap();
        (outcome, progress)
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
            Ok(self.weights.clone())
        }
        fn set_weights(&mut self, weights: &Weights) -> Result<(), TensorError> {
            self.weights = weights.clone();
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
            if !self.keep_state {
                *state = HostTensor::zeros(state.shape());
            }
            self.calls += 1;
            for (_, t) in self.weights.named_mut() {
                t.data_mut().fill(self.calls as f32);
            }
            Ok(self.losses[self.calls - 1])
        }
        fn adam_state(&self) -> Result<AdamState, TensorError> {
            Ok(AdamState::new(&self.model))
        }
        fn set_adam_state(&mut self, _: &AdamState) -> Result<(), TensorError> {
            Ok(())
        }
        fn set_learning_rate(&mut self, rate: f32) -> Result<(), TensorError> {
            self.rates.push(rate);
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
        let mut t = Scripted::new(losses);
        let mut state = HostTensor::zeros(&[1, 3, 16, 16]);
        let schedule = ConstantNoise {
            sigma_small: 0.01,
            sigma_large: 0.1,
            epsilon,
        };
        let options = options(losses.len() as u64, max_spikes, 9);
        let mut rms = Vec::new();
        let mut observe = |ctx: &StepContext<'_, Scripted>| {
            rms.push(ctx.state.rms());
            Ok::<_, std::convert::Infallible>(ControlFlow::Continue(()))
        };
        let (outcome, progress) = drive(&mut t, &mut state, &schedule, &options, &mut observe);
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
    fn a_forced_spike_comes_after_n_quiet_steps_and_counts_from_the_last_spike() {
        let mut t = Scripted::new(&[0.5, 0.5, 0.5, 0.05, 0.5, 0.5, 0.5, 0.5]);
        let mut state = HostTensor::zeros(&[1, 3, 16, 16]);
        let schedule = spikes_only();
        let options = LoopOptions {
            force_spike_after: Some(3),
            ..options(8, None, 3)
        };
        let mut progress = Progress::default();
        let mut spiked = Vec::new();
        let mut observe = |ctx: &StepContext<'_, Scripted>| {
            spiked.push(ctx.info.spiked);
            Ok::<_, std::convert::Infallible>(ControlFlow::Continue(()))
        };
        train(
            &mut t,
            &mut state,
            &schedule,
            &options,
            &mut progress,
            &mut observe,
        )
        .unwrap();
        // Step 3 is forced (3 quiet steps), 4 is below ε, 7 forced 3 steps after 4.
        let expected = [false, false, true, true, false, false, true, false];
        assert_eq!(spiked, expected);
        assert_eq!(progress.spikes, 3);
        assert_eq!(progress.last_spike, Some(7));
        // Only the loss below ε counts as having reached it.
        assert_eq!(progress.first_below_epsilon, Some(4));
    }

    #[test]
    fn a_reset_spike_replaces_the_state_with_unit_noise_and_keeps_the_old_one_for_pictures() {
        let mut t = Scripted::new(&[0.05, 0.5]);
        let mut state = HostTensor::zeros(&[1, 3, 16, 16]);
        let schedule = spikes_only();
        let options = LoopOptions {
            spike_kind: SpikeKind::Reset,
            ..options(2, None, 3)
        };
        let mut seen = Vec::new();
        let mut observe = |ctx: &StepContext<'_, Scripted>| {
            seen.push((
                ctx.state.rms(),
                ctx.before_reset.map(HostTensor::rms),
                ctx.info.spike_sigma,
            ));
            Ok::<_, std::convert::Infallible>(ControlFlow::Continue(()))
        };
        drive(&mut t, &mut state, &schedule, &options, &mut observe);
        let (rms, before, sigma) = seen[0];
        assert!((rms - 1.0).abs() < 0.1, "reset state RMS {rms}");
        assert_eq!((before, sigma), (Some(0.0), 0.0));
        assert_eq!(seen[1], (0.0, None, 0.0));
    }

    #[test]
    fn a_periodic_reset_comes_at_multiples_of_its_period_whatever_the_loss_and_kind() {
        // Losses high except at step 2, whose ε spike stays an `Add` spike; steps 3 and 6
        // are reset to fresh noise although no loss there is below ε.
        let mut t = Scripted::new(&[0.5, 0.05, 0.5, 0.5, 0.5, 0.5, 0.5]);
        let mut state = HostTensor::zeros(&[1, 3, 16, 16]);
        let schedule = spikes_only();
        let options = LoopOptions {
            reset_every: Some(3),
            ..options(7, None, 3)
        };
        let mut seen = Vec::new();
        let mut observe = |ctx: &StepContext<'_, Scripted>| {
            seen.push((ctx.info.spiked, ctx.before_reset.is_some(), ctx.state.rms()));
            Ok::<_, std::convert::Infallible>(ControlFlow::Continue(()))
        };
        let (_, progress) = drive(&mut t, &mut state, &schedule, &options, &mut observe);
        let resets: Vec<bool> = seen.iter().map(|s| s.1).collect();
        assert_eq!(resets, [false, false, true, false, false, true, false]);
        let spiked: Vec<bool> = seen.iter().map(|s| s.0).collect();
        assert_eq!(spiked, [false, true, true, false, false, true, false]);
        assert_eq!(progress.spikes, 3);
        assert!(
            (seen[1].2 / 0.1 - 1.0).abs() < 0.1,
            "ε spike RMS {}",
            seen[1].2
        );
        for at in [2, 5] {
            assert!((seen[at].2 - 1.0).abs() < 0.1, "reset RMS {}", seen[at].2);
        }
    }

    #[test]
    fn a_scaled_spike_is_relative_to_the_state() {
        let mut t = Scripted::new(&[0.05]);
        t.keep_state = true;
        let mut state = HostTensor::filled(&[1, 3, 16, 16], 2.0);
        let schedule = spikes_only();
        let options = LoopOptions {
            spike_kind: SpikeKind::Scaled(0.5),
            ..options(1, None, 3)
        };
        let mut sigma = None;
        let mut observe = |ctx: &StepContext<'_, Scripted>| {
            sigma = Some(ctx.info.spike_sigma);
            Ok::<_, std::convert::Infallible>(ControlFlow::Continue(()))
        };
        drive(&mut t, &mut state, &schedule, &options, &mut observe);
        // Half the RMS (2) of the state it was added to, not σ_large.
        assert_eq!(sigma, Some(1.0));
        let moved = (state.rms().powi(2) - 4.0).sqrt();
        assert!((moved - 1.0).abs() < 0.1, "spike RMS {moved}");
    }

    #[test]
    fn the_schedule_sets_the_rate_of_every_step_and_a_constant_rate_is_left_alone() {
        let mut t = Scripted::new(&[0.5; 4]);
        let mut state = HostTensor::zeros(&[1, 3, 4, 4]);
        let schedule = ConstantNoise::from(&crate::config::NoiseConfig::default());
        let lr_schedule = LrSchedule::WarmupCosine {
            warmup_steps: 2,
            final_fraction: 0.0,
        };
        let opts = LoopOptions {
            learning_rate: 1.0,
            lr_schedule,
            ..options(4, None, 1)
        };
        drive(&mut t, &mut state, &schedule, &opts, &mut NoObserver);
        assert_eq!(t.rates, vec![0.5, 1.0, 0.5, 0.0]);
        // Resuming at step 2 continues the schedule where it was.
        let mut resumed = Scripted::new(&[0.5; 2]);
        let mut progress = Progress {
            step: 2,
            ..Progress::default()
        };
        train(
            &mut resumed,
            &mut state,
            &schedule,
            &opts,
            &mut progress,
            &mut NoObserver,
        )
        .unwrap();
        assert_eq!(resumed.rates, vec![0.5, 0.0]);
        let mut constant = Scripted::new(&[0.5; 3]);
        drive(
            &mut constant,
            &mut state,
            &schedule,
            &options(3, None, 1),
            &mut NoObserver,
        );
        assert!(constant.rates.is_empty());
    }

    /// Scores from a list, and records the steps it was asked at and the value of the
    /// trainer's weights then.
    #[derive(Default)]
    struct Scores {
        psnr: Vec<f64>,
        asked: Vec<u64>,
        weights: Vec<f32>,
    }

    impl Observer<Scripted> for Scores {
        type Error = TensorError;
        fn on_step(
            &mut self,
            _: &StepContext<'_, Scripted>,
        ) -> Result<ControlFlow<()>, TensorError> {
            Ok(ControlFlow::Continue(()))
        }
        fn on_evaluation(
            &mut self,
            step: u64,
            t: &mut Scripted,
        ) -> Result<Evaluation, TensorError> {
            self.asked.push(step);
            self.weights.push(t.weights()?.flatten()[0]);
            let psnr = self.psnr.get(self.asked.len() - 1).copied();
            if psnr.is_some_and(f64::is_nan) {
                return Err(TensorError::Missing("score".into()));
            }
            Ok(Evaluation {
                psnr_db: psnr,
                flow: ControlFlow::Continue(()),
            })
        }
    }

    fn scored(
        psnr: &[f64],
        stop_at: Option<f32>,
        steps: u64,
    ) -> (Result<StopReason, String>, Vec<u64>) {
        let mut t = Scripted::new(&vec![0.5; steps as usize]);
        let mut state = HostTensor::zeros(&[1, 3, 4, 4]);
        let opts = LoopOptions {
            evaluate_every: Some(2),
            stop_at_psnr: stop_at,
            ..options(steps, None, 1)
        };
        let mut obs = Scores {
            psnr: psnr.to_vec(),
            ..Scores::default()
        };
        let r = train(
            &mut t,
            &mut state,
            &ConstantNoise::from(&crate::config::NoiseConfig::default()),
            &opts,
            &mut Progress::default(),
            &mut obs,
        );
        (r.map(|o| o.reason).map_err(|e| e.to_string()), obs.asked)
    }

    #[test]
    fn the_moving_average_is_what_is_scored_and_training_goes_on_from_the_latest_weights() {
        // Step k's weights are all k; the average starts at step 1's and then moves by
        // half: 1, 1.5, 2.25, 3.125, 4.0625, 5.03125.
        let expected = [1.0, 1.5, 2.25, 3.125, 4.0625, 5.03125f32];
        let mut t = Scripted::new(&[0.5; 6]);
        let mut state = HostTensor::zeros(&[1, 3, 4, 4]);
        let opts = LoopOptions {
            evaluate_every: Some(3),
            ema_decay: Some(0.5),
            ..options(6, None, 1)
        };
        let mut scored = Scores::default();
        let (_, progress) = drive(&mut t, &mut state, &spikes_only(), &opts, &mut scored);
        assert_eq!(scored.weights, vec![expected[2]]);
        assert_eq!(
            t.weights.flatten()[0],
            6.0,
            "the latest weights are back after a score"
        );
        let average = progress.average.expect("an average").flatten();
        assert!(average.iter().all(|&x| x == expected[5]));

        // A run resumed without `ema_decay` drops a stored average; one resumed with it
        // continues from the stored one.
        let mut resumed = Progress {
            step: 3,
            average: Some(Weights::zeros(&t.model)),
            ..Progress::default()
        };
        let mut t = Scripted::new(&[0.5; 3]);
        let plain = options(6, None, 1);
        train(
            &mut t,
            &mut state,
            &spikes_only(),
            &plain,
            &mut resumed,
            &mut NoObserver,
        )
        .unwrap();
        assert_eq!(resumed.average, None);
        let mut resumed = Progress {
            step: 4,
            average: Some(Weights::zeros(&t.model)),
            ..Progress::default()
        };
        let mut t = Scripted::new(&[0.5; 2]);
        train(
            &mut t,
            &mut state,
            &spikes_only(),
            &opts,
            &mut resumed,
            &mut NoObserver,
        )
        .unwrap();
        // 0 → 0.5·0 + 0.5·1 → 0.5·0.5 + 0.5·2 (this trainer counts its own steps from 1).
        let average = resumed.average.expect("an average").flatten();
        assert!(average.iter().all(|&x| x == 1.25));
    }

    #[test]
    fn scores_are_asked_for_every_n_steps_and_stop_the_loop_at_the_psnr() {
        // Never after the last step: the caller scores the final rule itself.
        assert_eq!(
            scored(&[10.0; 9], None, 7),
            (Ok(StopReason::Steps), vec![2, 4, 6])
        );
        assert_eq!(
            scored(&[10.0; 9], None, 6),
            (Ok(StopReason::Steps), vec![2, 4])
        );
        assert_eq!(
            scored(&[10.0, 29.9, 30.0, 40.0], Some(30.0), 20),
            (Ok(StopReason::ReachedPsnr { step: 6 }), vec![2, 4, 6])
        );
        assert_eq!(
            scored(&[50.0; 3], Some(30.0), 20).0,
            Ok(StopReason::ReachedPsnr { step: 2 })
        );
    }

    #[test]
    fn an_observer_error_is_kept_typed_with_its_step() {
        let mut t = Scripted::new(&[0.5; 6]);
        let mut state = HostTensor::zeros(&[1, 3, 4, 4]);
        let opts = LoopOptions {
            evaluate_every: Some(2),
            ..options(6, None, 1)
        };
        let mut obs = Scores {
            psnr: vec![10.0, f64::NAN],
            ..Scores::default()
        };
        let err = train(
            &mut t,
            &mut state,
            &ConstantNoise::from(&crate::config::NoiseConfig::default()),
            &opts,
            &mut Progress::default(),
            &mut obs,
        )
        .unwrap_err();
        assert!(
            matches!(&err, TrainError::Observer { step: 4, source: TensorError::Missing(m) } if m == "score"),
            "{err}"
        );
    }

    #[test]
    fn a_non_finite_loss_is_an_error_naming_the_step() {
        let mut t = Scripted::new(&[0.5, f32::NAN]);
        let mut state = HostTensor::zeros(&[1, 3, 4, 4]);
        let options = options(5, None, 1);
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
