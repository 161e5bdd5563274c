//! The convolutional-attention transition on candle tensors.

use candle_core::{DType, Device, Tensor, Var};
use nca_api::noise::fill_gaussian;
use nca_api::{
    HostTensor, ModelConfig, OptimizerConfig, TensorError, Transition, Weights, NEIGHBOURS,
};

use crate::Error;

// Positions of the parameters in `CandleTrainer::params`, which follows `Weights::named`
// order so that host weights, gradients and Adam moments zip with it.
pub(crate) const WQ: usize = 0;
pub(crate) const BQ: usize = 1;
pub(crate) const WK: usize = 2;
pub(crate) const BK: usize = 3;
pub(crate) const WV: usize = 4;
pub(crate) const BV: usize = 5;
pub(crate) const WO: usize = 6;
pub(crate) const BO: usize = 7;
pub(crate) const PK: usize = 8;
pub(crate) const PV: usize = 9;

/// The candle transition and its Adam trainer, on the CPU or a CUDA device.
///
/// Parameters live on the device as autograd [`Var`]s; the state type is a candle
/// [`Tensor`] `[B, C, H, W]` on the same device.
pub struct CandleTrainer {
    pub(crate) model: ModelConfig,
    pub(crate) optim: OptimizerConfig,
    pub(crate) device: Device,
    /// One variable per weight tensor, in `Weights::named` order.
    pub(crate) params: Vec<Var>,
    pub(crate) adam_step: u64,
    /// Adam's first moment over all parameters, flat in `Weights::flatten` order.
    pub(crate) adam_m: Tensor,
    /// Adam's second moment, laid out like `adam_m`.
    pub(crate) adam_v: Tensor,
    pub(crate) target: Option<Tensor>,
}

/// Outputs of one forward pass.
pub(crate) struct Forward {
    /// Softmax weights `[B, 9, H, W]`.
    pub(crate) attention: Tensor,
    /// `f(s)`, `[B, C, H, W]`.
    pub(crate) update: Tensor,
}

impl CandleTrainer {
    /// A trainer on the CPU, starting from [`Weights::init`]`(model, 0)` (replace them
    /// with [`Transition::set_weights`]).
    pub fn cpu(model: &ModelConfig, optim: &OptimizerConfig) -> Result<Self, Error> {
        Self::with_device(model, optim, Device::Cpu)
    }

    /// A trainer on CUDA device `ordinal`, starting from [`Weights::init`]`(model, 0)`.
    ///
    /// Fails with [`Error::CudaUnavailable`] when the crate was built without the `cuda`
    /// feature, or when no GPU or driver is usable.
    pub fn cuda(
        model: &ModelConfig,
        optim: &OptimizerConfig,
        ordinal: usize,
    ) -> Result<Self, Error> {
        #[cfg(feature = "cuda")]
        {
            // With the feature compiled in candle reports CUDA as available even on a
            // machine without a GPU; only creating the device tells.
            let device = Device::new_cuda(ordinal).map_err(|e| {
                // With RUST_BACKTRACE set candle attaches a backtrace to the message; the
                // driver's words are what the user needs.
                let e = match e {
                    candle_core::Error::WithBacktrace { inner, .. } => *inner,
                    e => e,
                };
                Error::CudaUnavailable(format!("CUDA device {ordinal}: {e}"))
            })?;
            Self::with_device(model, optim, device)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, optim);
            Err(Error::CudaUnavailable(format!(
                "device {ordinal} requested but nca-candle was built without CUDA support; \
                 rebuild with --features cuda"
            )))
        }
    }

    /// A trainer on any candle device, starting from [`Weights::init`]`(model, 0)`.
    pub fn with_device(
        model: &ModelConfig,
        optim: &OptimizerConfig,
        device: Device,
    ) -> Result<Self, Error> {
        model.validate()?;
        let init = Weights::init(model, 0);
        let params = init
            .named()
            .into_iter()
            .map(|(_, t)| Var::from_slice(t.data(), t.shape(), &device))
            .collect::<Result<Vec<_>, _>>()?;
        let adam_m = Tensor::zeros(init.num_params(), DType::F32, &device)?;
        let adam_v = adam_m.clone();
        Ok(Self {
            model: model.clone(),
            optim: *optim,
            device,
            params,
            adam_step: 0,
            adam_m,
            adam_v,
            target: None,
        })
    }

    /// The device the parameters and states live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Parameters without autograd tracking, for inference.
    pub(crate) fn detached_params(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_tensor().detach()).collect()
    }

    /// Parameters as tracked variables, for training.
    pub(crate) fn tracked_params(&self) -> Vec<Tensor> {
        self.params.iter().map(|v| v.as_tensor().clone()).collect()
    }

    /// Uploads a host tensor of any shape.
    pub(crate) fn to_device(&self, host: &HostTensor) -> Result<Tensor, Error> {
        Ok(Tensor::from_slice(host.data(), host.shape(), &self.device)?)
    }

    /// Checks that a state is `[B, C, H, W]` with this model's C.
    pub(crate) fn check_state(&self, state: &Tensor) -> Result<(), Error> {
        let dims = state.dims();
        match dims {
            [_, c, _, _] if *c == self.model.channels() => Ok(()),
            [b, _, h, w] => Err(TensorError::WrongShape {
                what: "state".into(),
                expected: vec![*b, self.model.channels(), *h, *w],
                found: dims.to_vec(),
            }
            .into()),
            _ => Err(TensorError::WrongRank {
                what: "state".into(),
                expected: 4,
                found: dims.to_vec(),
            }
            .into()),
        }
    }

    /// The forward pass with parameters `p` (tracked or detached).
    ///
    /// With `S_n` the 9 shifted states (zero outside the grid), the rule is rewritten
    /// exactly as
    /// * `q · k_n = (wkᵀ q) · S_n + q · (bk + pk[n])`,
    /// * `u = Σ a_n v_n = wv (Σ a_n S_n) + bv + Σ a_n pv[n]` (the `a_n` sum to one),
    ///
    /// so the only 9-neighbour tensors have C channels instead of D, and keys and values
    /// are never materialised; everything else is a per-cell matmul. Out-of-grid neighbours
    /// come out right by construction: their `S_n` is 0, so their key is `bk + pk[n]` and
    /// their value `bv + pv[n]`.
    ///
    /// Measured against the two direct layouts (10 `train_step`s after 5 warm-up ones, CPU,
    /// D = 16, ms per `train_step`; machine shared with a compile, so ratios matter):
    ///
    /// | state `[B, C, H, W]` | project K/V, shift them | shift s, project | this |
    /// | --- | --- | --- | --- |
    /// | 1×3×32×32 | 19.7 | 17.5 | 1.1 |
    /// | 4×3×64×64 | 419 | 315 | 68 |
    /// | 1×16×32×32 | 24.6 | 20.9 | 10.6 |
    /// | 4×16×64×64 | 479 | 444 | 334 |
    ///
    /// Both direct layouts build and differentiate `[B, 9, 2D, H, W]` tensors (one stack,
    /// bias add, product and reduction each); this one's largest is `[B, 9, C, H·W]`.
    pub(crate) fn forward(&self, p: &[Tensor], s: &Tensor) -> Result<Forward, Error> {
        self.check_state(s)?;
        let (b, c, h, w) = s.dims4()?;
        let d = self.model.attention_dim;
        let hw = h * w;
        let s3 = s.reshape((b, c, hw))?;
        let shifted = neighbours(s)?.reshape((b, NEIGHBOURS, c, hw))?;

        let q = p[WQ]
            .broadcast_matmul(&s3)?
            .broadcast_add(&p[BQ].reshape((1, d, 1))?)?;
        let q_state = p[WK].t()?.broadcast_matmul(&q)?;
        let key_bias = if self.model.position_embeddings {
            p[PK].broadcast_add(&p[BK].unsqueeze(0)?)?
        } else {
            p[BK].unsqueeze(0)?
        };
        let scores = shifted
            .broadcast_mul(&q_state.unsqueeze(1)?)?
            .sum(2)?
            .broadcast_add(&key_bias.broadcast_matmul(&q)?)?
            .affine(1.0 / (d as f64).sqrt(), 0.0)?;
        // The max is a constant shift for the softmax, so it needs no gradient.
        let max = scores.max_keepdim(1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let attention = e.broadcast_div(&e.sum_keepdim(1)?)?;

        let mixed = shifted.broadcast_mul(&attention.unsqueeze(2)?)?.sum(1)?;
        let mut u = p[WV]
            .broadcast_matmul(&mixed)?
            .broadcast_add(&p[BV].reshape((1, d, 1))?)?;
        if self.model.position_embeddings {
            u = (u + p[PV].t()?.broadcast_matmul(&attention)?)?;
        }
        let update = p[WO]
            .broadcast_matmul(&u)?
            .broadcast_add(&p[BO].reshape((1, c, 1))?)?
            .reshape((b, c, h, w))?;
        Ok(Forward {
            attention: attention.reshape((b, NEIGHBOURS, h, w))?,
            update,
        })
    }

    /// Weights laid out like `Weights::named`, from device tensors.
    pub(crate) fn download_weights(&self, tensors: &[Tensor]) -> Result<Weights, Error> {
        let mut out = Weights::zeros(&self.model);
        for ((_, slot), t) in out.named_mut().into_iter().zip(tensors) {
            *slot = to_host(t)?;
        }
        Ok(out)
    }

    /// Device tensors laid out like `Weights::named`, after checking shapes.
    pub(crate) fn upload_weights(&self, weights: &Weights) -> Result<Vec<Tensor>, Error> {
        weights.check(&self.model)?;
        weights
            .named()
            .into_iter()
            .map(|(_, t)| self.to_device(t))
            .collect()
    }
}

/// The 9 neighbours of every cell of `x: [B, F, H, W]` as `[B, 9, F, H, W]`, zero outside
/// the grid, in the order `n = 3·(dy+1) + (dx+1)`.
///
/// Padding once and stacking 9 `narrow` views keeps autograd working (candle's `unfold`
/// backward is broken) and avoids a grouped convolution (slow in candle).
fn neighbours(x: &Tensor) -> Result<Tensor, Error> {
    let (_, _, h, w) = x.dims4()?;
    let padded = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let mut views = Vec::with_capacity(NEIGHBOURS);
    for dy in 0..3 {
        for dx in 0..3 {
            views.push(padded.narrow(2, dy, h)?.narrow(3, dx, w)?);
        }
    }
    Ok(Tensor::stack(&views, 1)?)
}

/// Copies a device tensor of any shape to the host.
pub(crate) fn to_host(t: &Tensor) -> Result<HostTensor, Error> {
    let data = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(HostTensor::new(t.dims(), data)?)
}

impl Transition for CandleTrainer {
    type State = Tensor;
    type Error = Error;

    fn model(&self) -> &ModelConfig {
        &self.model
    }

    fn upload(&self, host: &HostTensor) -> Result<Tensor, Error> {
        self.model.check_state(host.shape())?;
        let t = self.to_device(host)?;
        self.check_state(&t)?;
        Ok(t)
    }

    fn download(&self, state: &Tensor) -> Result<HostTensor, Error> {
        to_host(state)
    }

    fn update(&mut self, state: &Tensor) -> Result<Tensor, Error> {
        Ok(self.forward(&self.detached_params(), state)?.update)
    }

    fn step(&mut self, state: &Tensor) -> Result<Tensor, Error> {
        let f = self.forward(&self.detached_params(), state)?.update;
        Ok((state + f)?)
    }

    fn attention(&mut self, state: &Tensor) -> Result<HostTensor, Error> {
        to_host(&self.forward(&self.detached_params(), state)?.attention)
    }

    fn weights(&self) -> Result<Weights, Error> {
        self.download_weights(&self.detached_params())
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<(), Error> {
        // Upload everything before touching any variable, so a failure leaves the old
        // weights intact.
        let tensors = self.upload_weights(weights)?;
        for (var, t) in self.params.iter().zip(&tensors) {
            var.set(t)?;
        }
        Ok(())
    }

    /// Adds `sigma · N(0, 1)` noise drawn on the host with [`fill_gaussian`].
    ///
    /// Only the noise crosses to the device (the state never comes back), and every
    /// device, CUDA included, sees exactly the numbers the other backends see for the
    /// same seed, so runs compare bit for bit across devices up to the math itself.
    fn add_noise(&mut self, state: &mut Tensor, sigma: f32, seed: u64) -> Result<(), Error> {
        if sigma == 0.0 {
            return Ok(());
        }
        let mut noise = vec![0.0; state.elem_count()];
        fill_gaussian(&mut noise, sigma, seed);
        let noise = Tensor::from_vec(noise, state.shape(), &self.device)?;
        *state = (&*state + noise)?;
        Ok(())
    }

    fn clamp(&mut self, state: &mut Tensor, limit: f32) -> Result<(), Error> {
        *state = state.clamp(-limit, limit)?;
        Ok(())
    }

    fn synchronize(&self) -> Result<(), Error> {
        // CUDA kernels are queued asynchronously; benchmarks must wait for them.
        Ok(self.device().synchronize()?)
    }
}
