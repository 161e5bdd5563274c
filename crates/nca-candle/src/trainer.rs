//! Shortsighted training: loss, gradients by candle autograd, clipping and Adam.

use candle_core::Tensor;
use nca_api::{AdamState, FlatLayout, HostTensor, TensorError, Trainer, Weights};

use crate::transition::CandleTrainer;
use crate::Error;

/// Added to the global norm before dividing, as PyTorch's `clip_grad_norm_` does.
const CLIP_EPS: f64 = 1e-6;

impl CandleTrainer {
    /// `s + f(s)`, the loss against the target, and the gradient of every parameter (in
    /// `params` order), with the state treated as a constant.
    fn loss_grads(&mut self, state: &Tensor) -> Result<(Tensor, Tensor, Vec<Tensor>), Error> {
        // A candle tensor is a shared handle: cloning it copies no data.
        let target = self.target.clone().ok_or(Error::NoTarget)?;
        self.check_state(state)?;
        let (b, _, h, w) = state.dims4()?;
        let v = self.model.visible_channels;
        if target.dims() != [b, v, h, w] {
            return Err(nca_api::TensorError::WrongShape {
                what: "target (for this state)".into(),
                expected: vec![b, v, h, w],
                found: target.dims().to_vec(),
            }
            .into());
        }
        // A detached state cuts the gradient between steps.
        let state = state.detach();
        let fwd = self.forward(&self.tracked_params(), &state)?;
        let next = (&state + &fwd.update)?;
        let loss = next.narrow(1, 0, v)?.sub(&target)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        let grads = self
            .params
            .iter()
            .map(|p| match grads.get(p.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => p.as_tensor().zeros_like(),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((next.detach(), loss.detach(), grads))
    }

    /// One Adam update from the flat gradient `grad` (clipped first when configured).
    ///
    /// Written out rather than using candle-nn's `AdamW`: that optimiser keeps its moments
    /// private (so `adam_state`/`set_adam_state` could not export or restore them) and it
    /// cannot clip by the global norm. The arithmetic follows PyTorch's `Adam`: bias
    /// corrections in f64, `eps` added to `sqrt(v̂)`. Working on one flat vector keeps the
    /// update at a dozen device ops whatever the number of weight tensors.
    fn adam_update(&mut self, grad: Tensor) -> Result<(), Error> {
        let o = self.optim;
        let grad = match o.grad_clip {
            // PyTorch's `clip_grad_norm_`: g · min(1, max / (‖g‖ + 1e-6)), on the device.
            Some(max_norm) => {
                let coef = grad
                    .sqr()?
                    .sum_all()?
                    .sqrt()?
                    .affine(1.0, CLIP_EPS)?
                    .recip()?
                    .affine(f64::from(max_norm), 0.0)?
                    .minimum(1.0)?;
                grad.broadcast_mul(&coef)?
            }
            None => grad,
        };
        let (b1, b2) = (f64::from(o.beta1), f64::from(o.beta2));
        // Saturating like FlatAdam: a wrapped count of 0 would zero the bias correction.
        self.adam_step = self.adam_step.saturating_add(1);
        let (bias1, bias2_sqrt) = nca_api::optim::bias_corrections(self.adam_step, &o);
        let step_size = f64::from(o.learning_rate) / bias1;
        let m = (self.adam_m.affine(b1, 0.0)? + grad.affine(1.0 - b1, 0.0)?)?;
        let v = (self.adam_v.affine(b2, 0.0)? + grad.sqr()?.affine(1.0 - b2, 0.0)?)?;
        let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, f64::from(o.eps))?;
        let params = flat(&self.detached_params())?;
        let params = (params - (m.affine(step_size, 0.0)? / denom)?)?;
        let layout = FlatLayout::new(&self.model);
        for (spec, var) in self.model.parameters().iter().zip(&self.params) {
            let (offset, len) = layout
                .get(spec.param)
                .ok_or_else(|| TensorError::Missing(spec.name().to_string()))?;
            var.set(&params.narrow(0, offset, len)?.reshape(var.shape())?)?;
        }
        self.adam_m = m;
        self.adam_v = v;
        Ok(())
    }
}

/// The tensors concatenated into one vector, in order.
fn flat(tensors: &[Tensor]) -> Result<Tensor, Error> {
    let parts = tensors
        .iter()
        .map(Tensor::flatten_all)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}

impl CandleTrainer {
    /// Host weights from a flat device vector in `Weights::flatten` order.
    fn unflatten(&self, flat: &Tensor) -> Result<Weights, Error> {
        let mut w = Weights::zeros(&self.model);
        w.unflatten_from(&flat.to_vec1::<f32>()?)?;
        Ok(w)
    }
}

impl Trainer for CandleTrainer {
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Error> {
        self.model.check_target(target.shape())?;
        self.target = Some(self.to_device(target)?);
        Ok(())
    }

    fn loss_and_gradients(&mut self, state: &Tensor) -> Result<(f32, Weights), Error> {
        let (_, loss, grads) = self.loss_grads(state)?;
        Ok((loss.to_scalar::<f32>()?, self.download_weights(&grads)?))
    }

    fn train_step(&mut self, state: &mut Tensor) -> Result<f32, Error> {
        let (next, loss, grads) = self.loss_grads(state)?;
        self.adam_update(flat(&grads)?)?;
        *state = next;
        Ok(loss.to_scalar::<f32>()?)
    }

    fn adam_state(&self) -> Result<AdamState, Error> {
        Ok(AdamState {
            step: self.adam_step,
            m: self.unflatten(&self.adam_m)?,
            v: self.unflatten(&self.adam_v)?,
        })
    }

    fn set_adam_state(&mut self, state: &AdamState) -> Result<(), Error> {
        state.m.check(&self.model)?;
        state.v.check(&self.model)?;
        let m = Tensor::from_vec(state.m.flatten(), state.m.num_params(), &self.device)?;
        let v = Tensor::from_vec(state.v.flatten(), state.v.num_params(), &self.device)?;
        self.adam_m = m;
        self.adam_v = v;
        self.adam_step = state.step;
        Ok(())
    }

    fn set_learning_rate(&mut self, learning_rate: f32) -> Result<(), Error> {
        self.optim.learning_rate = learning_rate;
        Ok(())
    }
}
