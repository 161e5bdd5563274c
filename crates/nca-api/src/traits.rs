//! The three traits a backend implements: [`Transition`], [`Trainer`] and, for the loop,
//! [`NoiseSchedule`].

use crate::config::ModelConfig;
use crate::error::TensorError;
use crate::noise::add_gaussian;
use crate::tensor::HostTensor;
use crate::weights::Weights;

/// The convolutional-attention rule `s ↦ s + f(s)` on one backend.
///
/// `State` is the backend's own `[B, C, H, W]` tensor (host array, device buffer, …), so
/// the training loop never copies the state off a GPU unless an observer asks for it.
/// Only the methods without a default are tensor math a backend must supply; the noise
/// and clamp defaults go through the host and may be overridden for speed.
pub trait Transition {
    /// The backend's state tensor, shape `[B, C, H, W]`.
    type State;
    /// The backend's error; it must carry shape errors from the API.
    type Error: std::error::Error + Send + Sync + From<TensorError> + 'static;

    /// The model shape this transition was built for.
    fn model(&self) -> &ModelConfig;

    /// Copies a host `[B, C, H, W]` tensor into a backend state.
    fn upload(&self, host: &HostTensor) -> Result<Self::State, Self::Error>;

    /// Copies a backend state into a host `[B, C, H, W]` tensor.
    fn download(&self, state: &Self::State) -> Result<HostTensor, Self::Error>;

    /// The update `f(s)`, same shape as `s`.
    fn update(&mut self, state: &Self::State) -> Result<Self::State, Self::Error>;

    /// The next state `s + f(s)`.
    fn step(&mut self, state: &Self::State) -> Result<Self::State, Self::Error>;

    /// Softmax weights `[B, 9, H, W]` of every cell over its 3×3 neighbourhood
    /// (neighbour `n = 3·(dy+1) + (dx+1)`).
    fn attention(&mut self, state: &Self::State) -> Result<HostTensor, Self::Error>;

    /// The current parameters as plain tensors.
    fn weights(&self) -> Result<Weights, Self::Error>;

    /// Replaces the parameters; fails when a shape does not match [`Transition::model`].
    fn set_weights(&mut self, weights: &Weights) -> Result<(), Self::Error>;

    /// Adds `sigma · N(0, 1)` noise to every element, reproducibly from `seed`.
    ///
    /// The default draws the noise on the host with [`add_gaussian`], so every backend
    /// using it sees the same numbers for the same seed.
    fn add_noise(
        &mut self,
        state: &mut Self::State,
        sigma: f32,
        seed: u64,
    ) -> Result<(), Self::Error> {
        if sigma == 0.0 {
            return Ok(());
        }
        let mut host = self.download(state)?;
        add_gaussian(host.data_mut(), sigma, seed);
        *state = self.upload(&host)?;
        Ok(())
    }

    /// Waits until all queued device work has finished; benchmarks call it so that
    /// asynchronous (GPU) backends are timed honestly. A no-op for host backends.
    fn synchronize(&self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// Clamps every element to `[-limit, limit]`.
    fn clamp(&mut self, state: &mut Self::State, limit: f32) -> Result<(), Self::Error> {
        let mut host = self.download(state)?;
        for x in host.data_mut() {
            *x = x.clamp(-limit, limit);
        }
        *state = self.upload(&host)?;
        Ok(())
    }
}

/// Adam's moments and step count, in plain tensors so a run can resume on any backend.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamState {
    /// Number of updates applied so far (Adam's `t`).
    pub step: u64,
    /// First moment, shaped like the weights.
    pub m: Weights,
    /// Second moment, shaped like the weights.
    pub v: Weights,
}

impl AdamState {
    /// The state of an optimiser that has taken no step.
    pub fn new(model: &ModelConfig) -> Self {
        Self {
            step: 0,
            m: Weights::zeros(model),
            v: Weights::zeros(model),
        }
    }
}

/// Shortsighted training of a [`Transition`]: one step, one loss, one Adam update.
///
/// The incoming state is a constant (gradients are cut between steps): the gradient flows
/// only through `f`. The loss is `mean((s + f(s))[:, :V] - target)²` over the visible
/// channels.
pub trait Trainer: Transition {
    /// Sets the `[B, V, H, W]` target compared with the first V channels.
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Self::Error>;

    /// Loss of `s + f(s)` against the target and its gradient for every weight, without
    /// changing anything.
    fn loss_and_gradients(&mut self, state: &Self::State) -> Result<(f32, Weights), Self::Error>;

    /// One training step: replaces `state` with `s + f(s)` computed with the current
    /// weights, then applies one Adam update from that step's loss; returns the loss.
    fn train_step(&mut self, state: &mut Self::State) -> Result<f32, Self::Error>;

    /// The optimiser's moments and step count.
    fn adam_state(&self) -> Result<AdamState, Self::Error>;

    /// Restores the optimiser's moments and step count (for resuming).
    fn set_adam_state(&mut self, state: &AdamState) -> Result<(), Self::Error>;

    /// Sets the learning rate of the next updates; the training loop calls it before each
    /// step when `training.lr_schedule` varies the rate.
    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<(), Self::Error>;
}

/// When and how much noise the training loop injects.
pub trait NoiseSchedule {
    /// Standard deviation of the noise added before step `step` (1-based).
    fn sigma_small(&self, step: u64) -> f32;
    /// Standard deviation of the spike added after step `step` when it spikes.
    fn sigma_large(&self, step: u64) -> f32;
    /// Whether the state carried forward after step `step`, whose loss is `loss`, gets a
    /// spike (a simulated new trajectory).
    fn should_spike(&self, loss: f32, step: u64) -> bool;
}
