//! Shortsighted training: loss, gradients by candle autograd, clipping and Adam.

use candle_core::Tensor;
use nca_api::{AdamState, HostTensor, Trainer, Weights};

use crate::transition::CandleTrainer;
use crate::Error;

/// Added to the global norm before dividing, as PyTorch's `clip_grad_norm_` does.
const CLIP_EPS: f64 = 1e-6;

impl CandleTrainer {
    /// `s + f(s)`, the loss against the target, and the gradient of every parameter (in
    /// `params` order), with the state treated as a constant.
    fn loss_grads(&self, state: &Tensor) -> Result<(Tensor, Tensor, Vec<Tensor>), Error> {
        let target = self.target.as_ref().ok_or(Error::NoTarget)?;
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
        let loss = next.narrow(1, 0, v)?.sub(target)?.sqr()?.mean_all()?;
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

    /// Scales the gradients to global norm `max_norm` when it is larger, on the device.
    ///
    /// Same formula as PyTorch's `clip_grad_norm_`: `g · min(1, max / (‖g‖ + 1e-6))`.
    fn clip(grads: Vec<Tensor>, max_norm: f32) -> Result<Vec<Tensor>, Error> {
        let squares = grads
            .iter()
            .map(|g| g.sqr()?.sum_all())
            .collect::<Result<Vec<_>, _>>()?;
        let norm = Tensor::stack(&squares, 0)?.sum_all()?.sqrt()?;
        let coef = norm
            .affine(1.0, CLIP_EPS)?
            .recip()?
            .affine(f64::from(max_norm), 0.0)?
            .minimum(1.0)?;
        Ok(grads
            .iter()
            .map(|g| g.broadcast_mul(&coef))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// One Adam update from `grads`, with the device tensors of the moments.
    ///
    /// Written out rather than using candle-nn's `AdamW`: that optimiser keeps its moments
    /// private (so `adam_state`/`set_adam_state` could not export or restore them) and it
    /// cannot clip by the global norm. The arithmetic follows PyTorch's `Adam`
    /// (`foreach=False`): bias corrections in f64, `eps` added to `sqrt(v̂)`.
    fn adam_update(&mut self, grads: &[Tensor]) -> Result<(), Error> {
        let o = self.optim;
        let (b1, b2) = (f64::from(o.beta1), f64::from(o.beta2));
        self.adam_step += 1;
        let t = i32::try_from(self.adam_step).unwrap_or(i32::MAX);
        let bias1 = 1.0 - b1.powi(t);
        let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = f64::from(o.learning_rate) / bias1;
        let mut new_params = Vec::with_capacity(grads.len());
        for (i, g) in grads.iter().enumerate() {
            let m = (self.adam_m[i].affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            let v = (self.adam_v[i].affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, f64::from(o.eps))?;
            let p = (self.params[i].as_tensor().detach() - (m.affine(step_size, 0.0)? / denom)?)?;
            new_params.push(p);
            self.adam_m[i] = m;
            self.adam_v[i] = v;
        }
        for (var, p) in self.params.iter().zip(&new_params) {
            var.set(p)?;
        }
        Ok(())
    }
}

impl Trainer for CandleTrainer {
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Error> {
        let [_, v, _, _] = target.dims4("target")?;
        if v != self.model.visible_channels {
            return Err(nca_api::TensorError::WrongShape {
                what: "target channels".into(),
                expected: vec![self.model.visible_channels],
                found: vec![v],
            }
            .into());
        }
        self.target = Some(self.to_device(target)?);
        Ok(())
    }

    fn loss_and_gradients(&mut self, state: &Tensor) -> Result<(f32, Weights), Error> {
        let (_, loss, grads) = self.loss_grads(state)?;
        Ok((loss.to_scalar::<f32>()?, self.download_weights(&grads)?))
    }

    fn train_step(&mut self, state: &mut Tensor) -> Result<f32, Error> {
        let (next, loss, grads) = self.loss_grads(state)?;
        let grads = match self.optim.grad_clip {
            Some(max_norm) => Self::clip(grads, max_norm)?,
            None => grads,
        };
        self.adam_update(&grads)?;
        *state = next;
        Ok(loss.to_scalar::<f32>()?)
    }

    fn adam_state(&self) -> Result<AdamState, Error> {
        Ok(AdamState {
            step: self.adam_step,
            m: self.download_weights(&self.adam_m)?,
            v: self.download_weights(&self.adam_v)?,
        })
    }

    fn set_adam_state(&mut self, state: &AdamState) -> Result<(), Error> {
        let m = self.upload_weights(&state.m)?;
        let v = self.upload_weights(&state.v)?;
        self.adam_m = m;
        self.adam_v = v;
        self.adam_step = state.step;
        Ok(())
    }
}
