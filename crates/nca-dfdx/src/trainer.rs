//! Shortsighted training: dfdx's tape autodiff for the gradients, Adam written out here.
//!
//! dfdx 0.13 has an `Adam`, but its moments and step counter are private fields (and it
//! only updates a whole `TensorCollection` module), so `adam_state` / `set_adam_state`
//! could not export or restore them. Adam on a few hundred host floats is a handful of
//! lines, so it is written out below, following PyTorch's `torch.optim.Adam` exactly.

use dfdx::prelude::*;
use nca_api::{AdamState, HostTensor, ModelConfig, OptimizerConfig, TensorError, Trainer, Weights};

use crate::transition::{cells_to_state, forward, Params, State, T2};
use crate::Error;

/// A target kept in the step's cell-major layout.
struct Target {
    /// `[B, V, H, W]` as handed in.
    shape: [usize; 4],
    /// `[N, V]` with `N = B·H·W` cells in `(b, y, x)` order.
    cells: T2,
}

/// Adam's moments over all parameters, flattened in [`nca_api::WEIGHT_NAMES`] order.
struct Adam {
    step: u64,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The dfdx (CPU) backend: transition, autodiff gradients and Adam in one type.
pub struct DfdxTrainer {
    pub(crate) dev: Cpu,
    pub(crate) model: ModelConfig,
    pub(crate) params: Params,
    /// Offset one-hot columns of the last grid size seen (see `Neighbourhood`).
    pub(crate) one_hot: Option<T2>,
    optim: OptimizerConfig,
    target: Option<Target>,
    adam: Adam,
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
        let params = Params::upload(&dev, &weights)?;
        let n = weights.num_params();
        Ok(Self {
            dev,
            model: model.clone(),
            params,
            one_hot: None,
            optim: *optim,
            target: None,
            adam: Adam {
                step: 0,
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
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
        let grads = self
            .params
            .flat_views()
            .iter()
            .flat_map(|p| p.grad(&grads))
            .collect();
        Ok(Taped {
            loss: value,
            grads,
            next,
        })
    }

    /// Scales `grads` to the configured global norm, as `torch.nn.utils.clip_grad_norm_`.
    fn clip(&self, grads: &mut [f32]) {
        let Some(max_norm) = self.optim.grad_clip else {
            return;
        };
        let norm = grads
            .iter()
            .map(|&g| f64::from(g) * f64::from(g))
            .sum::<f64>()
            .sqrt();
        let coef = (f64::from(max_norm) / (norm + 1e-6)).min(1.0) as f32;
        if coef < 1.0 {
            grads.iter_mut().for_each(|g| *g *= coef);
        }
    }

    /// One bias-corrected Adam update, step for step as PyTorch's single-tensor Adam.
    fn adam_update(&mut self, grads: &[f32]) -> Result<(), Error> {
        let OptimizerConfig {
            learning_rate,
            beta1,
            beta2,
            eps,
            ..
        } = self.optim;
        let adam = &mut self.adam;
        adam.step += 1;
        // PyTorch computes the bias corrections in Python floats (f64).
        let t = adam.step as f64;
        let bc1 = 1.0 - f64::from(beta1).powf(t);
        let bc2_sqrt = (1.0 - f64::from(beta2).powf(t)).sqrt();
        let step_size = (f64::from(learning_rate) / bc1) as f32;
        let bc2_sqrt = bc2_sqrt as f32;
        let mut offset = 0;
        for view in self.params.flat_views_mut() {
            let mut p = view.as_vec();
            let len = p.len();
            let range = offset..offset + len;
            offset += len;
            for ((p, &g), (m, v)) in p
                .iter_mut()
                .zip(&grads[range.clone()])
                .zip(adam.m[range.clone()].iter_mut().zip(&mut adam.v[range]))
            {
                *m += (g - *m) * (1.0 - beta1);
                *v = *v * beta2 + (1.0 - beta2) * g * g;
                let denom = v.sqrt() / bc2_sqrt + eps;
                *p -= step_size * *m / denom;
            }
            view.set(&p);
        }
        Ok(())
    }

    fn flat_to_weights(&self, flat: &[f32]) -> Result<Weights, Error> {
        let mut w = Weights::zeros(&self.model);
        w.unflatten_from(flat)?;
        Ok(w)
    }
}

impl Trainer for DfdxTrainer {
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Error> {
        let [b, v, h, w] = target.dims4("target")?;
        if v != self.model.visible_channels || b == 0 || h == 0 || w == 0 {
            return Err(TensorError::WrongShape {
                what: "target (B, H, W must be non-zero)".into(),
                expected: vec![b.max(1), self.model.visible_channels, h.max(1), w.max(1)],
                found: target.shape().to_vec(),
            }
            .into());
        }
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
        self.clip(&mut grads);
        self.adam_update(&grads)?;
        if let Some(next) = next {
            *state = next;
        }
        Ok(loss)
    }

    fn adam_state(&self) -> Result<AdamState, Error> {
        Ok(AdamState {
            step: self.adam.step,
            m: self.flat_to_weights(&self.adam.m)?,
            v: self.flat_to_weights(&self.adam.v)?,
        })
    }

    fn set_adam_state(&mut self, state: &AdamState) -> Result<(), Error> {
        state.m.check(&self.model)?;
        state.v.check(&self.model)?;
        self.adam = Adam {
            step: state.step,
            m: state.m.flatten(),
            v: state.v.flatten(),
        };
        Ok(())
    }
}
