//! Shortsighted training: dfdx's tape autodiff for the gradients, Adam written out here.
//!
//! dfdx 0.13 has an `Adam`, but its moments and step counter are private fields (and it
//! only updates a whole `TensorCollection` module), so `adam_state` / `set_adam_state`
//! could not export or restore them. The parameters are a few hundred floats, so the
//! update runs on the host with `nca_api::FlatAdam` (PyTorch's `torch.optim.Adam`).

use dfdx::prelude::*;
use nca_api::{
    AdamState, FlatAdam, HostTensor, ModelConfig, OptimizerConfig, Trainer, Transition, Weights,
};

use crate::transition::{cells_to_state, forward, Params, State, T2};
use crate::Error;

/// A target kept in the step's cell-major layout.
struct Target {
    /// `[B, V, H, W]` as handed in.
    shape: [usize; 4],
    /// `[N, V]` with `N = B·H·W` cells in `(b, y, x)` order.
    cells: T2,
}

/// The dfdx (CPU) backend: transition, autodiff gradients and Adam in one type.
pub struct DfdxTrainer {
    pub(crate) dev: Cpu,
    pub(crate) model: ModelConfig,
    pub(crate) params: Params,
    /// Position and offset one-hot columns of the last `(B, H, W)` seen (see
    /// `Neighbourhood`): constant per grid size, so built once.
    pub(crate) constant_columns: Option<((usize, usize, usize), T2)>,
    optim: OptimizerConfig,
    target: Option<Target>,
    adam: FlatAdam,
}

impl std::fmt::Debug for DfdxTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DfdxTrainer")
            .field("model", &self.model)
            .field("optim", &self.optim)
            .field("adam_step", &self.adam.step)
            .finish_non_exhaustive()
    }
}

/// Loss, flat gradients and (when asked for) the next state of one taped step.
struct Taped {
    loss: f32,
    grads: Vec<f32>,
    next: Option<State>,
}

impl DfdxTrainer {
    /// A trainer for `model` with Adam settings `optim`; weights start as
    /// `Weights::init(model, 0)` until [`nca_api::Transition::set_weights`] replaces them.
    pub fn new(model: &ModelConfig, optim: &OptimizerConfig) -> Result<Self, Error> {
        model.validate()?;
        let dev = Cpu::default();
        // Every step allocates the same buffer sizes; without dfdx's allocation cache
        // (off by default) page faults and zeroing of fresh memory cost ~10% of a step.
        dev.try_enable_cache()?;
        let weights = Weights::init(model, 0);
        let params = Params::upload(&dev, model, &weights)?;
        let n = weights.num_params();
        Ok(Self {
            dev,
            model: model.clone(),
            params,
            constant_columns: None,
            optim: *optim,
            target: None,
            adam: FlatAdam::new(n),
        })
    }

    /// The Adam settings this trainer was built with.
    pub fn optimizer(&self) -> &OptimizerConfig {
        &self.optim
    }

    fn taped(&mut self, state: &State, want_next: bool) -> Result<Taped, Error> {
        let shape = *state.shape();
        self.check_state(shape)?;
        let target = self.target.as_ref().ok_or(Error::NoTarget)?;
        let (target_shape, target_cells) = (target.shape, target.cells.clone());
        let (b, c, h, w) = shape;
        let [tb, tv, th, tw] = target_shape;
        if (tb, th, tw) != (b, h, w) {
            return Err(Error::TargetMismatch {
                target: vec![tb, tv, th, tw],
                state: vec![b, c, h, w],
            });
        }
        let v = self.model.visible_channels;
        let n = b * h * w;
        let nb = self.neighbourhood(state)?;
        let fwd = forward(self.params.traced(), &nb)?;
        let next = if want_next {
            let f = cells_to_state(fwd.update.retaped::<NoneTape>(), shape)?;
            Some(state.clone().try_add(f)?)
        } else {
            None
        };
        let offset = nb
            .rows
            .try_slice((4 * n..5 * n, 0..v))?
            .try_sub(target_cells)?;
        let diff = fwd.update.try_slice((.., 0..v))?.try_add(offset)?;
        let loss = diff.try_square()?.try_mean::<(), Axes2<0, 1>>()?;
        let value = loss.as_vec().first().copied().unwrap_or(f32::NAN);
        let grads = loss.try_backward()?;
        let grads = self.params.iter().flat_map(|p| p.grad(&grads)).collect();
        Ok(Taped {
            loss: value,
            grads,
            next,
        })
    }

    fn flat_to_weights(&self, flat: &[f32]) -> Result<Weights, Error> {
        let mut w = Weights::zeros(&self.model);
        w.unflatten_from(flat)?;
        Ok(w)
    }
}

impl Trainer for DfdxTrainer {
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Error> {
        let [b, v, h, w] = self.model.check_target(target.shape())?;
        let plane = h * w;
        let mut cells = vec![0.0; target.len()];
        for (i, &x) in target.data().iter().enumerate() {
            let (bi, rest) = (i / (v * plane), i % (v * plane));
            let (ch, p) = (rest / plane, rest % plane);
            cells[(bi * plane + p) * v + ch] = x;
        }
        self.target = Some(Target {
            shape: [b, v, h, w],
            cells: self.dev.try_tensor_from_vec(cells, (b * plane, v))?,
        });
        Ok(())
    }

    fn loss_and_gradients(&mut self, state: &State) -> Result<(f32, Weights), Error> {
        let taped = self.taped(state, false)?;
        Ok((taped.loss, self.flat_to_weights(&taped.grads)?))
    }

    fn train_step(&mut self, state: &mut State) -> Result<f32, Error> {
        let Taped {
            loss,
            mut grads,
            next,
        } = self.taped(state, true)?;
        let mut params = self.weights()?.flatten();
        self.adam.update(&mut params, &mut grads, &self.optim);
        let updated = self.flat_to_weights(&params)?;
        self.set_weights(&updated)?;
        if let Some(next) = next {
            *state = next;
        }
        Ok(loss)
    }

    fn adam_state(&self) -> Result<AdamState, Error> {
        Ok(self.adam.to_state(&self.model)?)
    }

    fn set_adam_state(&mut self, state: &AdamState) -> Result<(), Error> {
        self.adam = FlatAdam::from_state(state, &self.model)?;
        Ok(())
    }

    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<(), Error> {
        self.optim.learning_rate = learning_rate;
        Ok(())
    }
}
