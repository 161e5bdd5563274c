//! The convolutional-attention transition on candle tensors.

use candle_core::{DType, Device, Tensor, Var};
use nca_api::noise::fill_gaussian;
use nca_api::{
    HostTensor, ModelConfig, OptimizerConfig, Param, TensorError, Transition, Weights, NEIGHBOURS,
};

use crate::Error;

/// Where each parameter sits in `CandleTrainer::params`, derived from
/// [`ModelConfig::parameters`] (the order host weights, gradients and Adam moments share),
/// so that a new parameter or a reordering there cannot silently misalign this backend.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParamIndex {
    pub(crate) wq: usize,
    pub(crate) bq: usize,
    pub(crate) wk: usize,
    pub(crate) bk: usize,
    pub(crate) wv: usize,
    pub(crate) bv: usize,
    pub(crate) wo: usize,
    pub(crate) bo: usize,
    /// `pk`, `pv`: present exactly with `model.position_embeddings`.
    pub(crate) pk_pv: Option<(usize, usize)>,
    /// `w1`, `b1`: present exactly with `model.mlp_hidden`.
    pub(crate) w1_b1: Option<(usize, usize)>,
}

impl ParamIndex {
    /// The indices of `model`'s parameters; an error if the list lacks one the model's
    /// options require (so a model this code cannot run is refused, never run wrongly).
    pub(crate) fn new(model: &ModelConfig) -> Result<Self, Error> {
        let list: Vec<Param> = model.parameters().iter().map(|p| p.param).collect();
        let find = |param: Param| list.iter().position(|p| *p == param);
        let need = |p: Param| find(p).ok_or_else(|| TensorError::Missing(p.name().to_string()));
        let pair = |a: Param, b: Param, on: bool| -> Result<Option<(usize, usize)>, Error> {
            match (on, find(a), find(b)) {
                (true, Some(i), Some(j)) => Ok(Some((i, j))),
                (false, None, None) => Ok(None),
                (true, _, _) => Err(TensorError::Missing(format!("{a}/{b}")).into()),
                (false, _, _) => Err(TensorError::Unexpected(format!("{a}/{b}")).into()),
            }
        };
        Ok(Self {
            wq: need(Param::Wq)?,
            bq: need(Param::Bq)?,
            wk: need(Param::Wk)?,
            bk: need(Param::Bk)?,
            wv: need(Param::Wv)?,
            bv: need(Param::Bv)?,
            wo: need(Param::Wo)?,
            bo: need(Param::Bo)?,
            pk_pv: pair(Param::Pk, Param::Pv, model.position_embeddings)?,
            w1_b1: pair(Param::W1, Param::B1, model.mlp_hidden.is_some())?,
        })
    }
}

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
    /// Where each parameter sits in `params`.
    pub(crate) index: ParamIndex,
    /// The position features `[P, H, W]` of the last grid size seen, on the device: they
    /// are fixed, so they are computed and uploaded once per grid size, not per step.
    pub(crate) positions: Option<((usize, usize), Tensor)>,
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
        let index = ParamIndex::new(model)?;
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
            index,
            positions: None,
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

    /// The position features of an `h`×`w` grid on the device, cell-major `[H, W, P]`
    /// like the rest of the forward pass, or `None` without position inputs. They are
    /// fixed, so they are computed on the host and uploaded only when the grid size
    /// changes.
    fn positions(&mut self, h: usize, w: usize) -> Result<Option<Tensor>, Error> {
        let Some(octaves) = self.model.position_octaves else {
            return Ok(None);
        };
        match &self.positions {
            Some((size, t)) if *size == (h, w) => Ok(Some(t.clone())),
            _ => {
                let t = self
                    .to_device(&nca_api::position::features(octaves, h, w))?
                    .permute((1, 2, 0))?
                    .contiguous()?;
                self.positions = Some(((h, w), t.clone()));
                Ok(Some(t))
            }
        }
    }

    /// The forward pass with parameters `p` (tracked or detached).
    ///
    /// Every cell's input is `x = [s; pos]` (X = C + P channels; just `s` without position
    /// inputs). With `X_n` the 9 shifted inputs (zero outside the grid, features included),
    /// the attention is rewritten exactly as
    /// * `q · k_n = (wkᵀ q) · X_n + q · (bk + pk[n])`,
    /// * `u = Σ a_n v_n = wv (Σ a_n X_n) + bv + Σ a_n pv[n]` (the `a_n` sum to one),
    ///
    /// so keys and values are never materialised, and the shifted inputs (X channels, not
    /// D) depend on no parameter, so autograd never differentiates through them.
    ///
    /// The layout is cell-major: the N = B·H·W cells are rows, so every projection is one
    /// matmul over all cells (`[N, X]·wqᵀ`, the MLP's `w1` and `wo` likewise), biases
    /// broadcast along the last dimension, the softmax reduces the last dimension, and the
    /// two per-cell contractions with `X_n` (`[9, X]·[X]` for the scores, `[9]·[9, X]`
    /// for the mix) are batched matmuls. The same contractions written as broadcast
    /// products and sums over `[B, 9, X, H·W]` were measured 3× slower forward+backward on
    /// the CPU (each costs ~6 full-size tensors in candle's backward, and candle's sums
    /// over an inner dimension are slow): at 32×32, batch 1, one thread, `train_step` of
    /// the picture model (L = 6, M = 128) took 44 ms that way and 14 ms this way, with
    /// position inputs alone 22 ms and 5 ms (machine shared with compiles, so ratios
    /// matter).
    pub(crate) fn forward(&mut self, p: &[Tensor], s: &Tensor) -> Result<Forward, Error> {
        self.check_state(s)?;
        let (b, c, h, w) = s.dims4()?;
        let d = self.model.attention_dim;
        let xw = self.model.input_width();
        let n = b * h * w;
        let ix = self.index;
        let s_rows = s.permute((0, 2, 3, 1))?.contiguous()?;
        let x = match self.positions(h, w)? {
            Some(pos) => {
                let pos = pos.unsqueeze(0)?.broadcast_as((b, h, w, xw - c))?;
                Tensor::cat(&[&s_rows, &pos], 3)?
            }
            None => s_rows,
        };
        let x_rows = x.reshape((n, xw))?;
        let shifted = neighbours(&x)?.reshape((n, NEIGHBOURS, xw))?;

        let q = x_rows
            .matmul(&p[ix.wq].t()?)?
            .broadcast_add(&p[ix.bq])?
            .affine(1.0 / (d as f64).sqrt(), 0.0)?;
        let q_input = q.matmul(&p[ix.wk])?;
        let key_bias = match ix.pk_pv {
            Some((pk, _)) => p[pk].broadcast_add(&p[ix.bk])?,
            None => p[ix.bk].unsqueeze(0)?,
        };
        let scores = shifted
            .matmul(&q_input.unsqueeze(2)?)?
            .squeeze(2)?
            .broadcast_add(&q.matmul(&key_bias.t()?)?)?;
        // The max is a constant shift for the softmax, so it needs no gradient.
        let max = scores.max_keepdim(1)?.detach();
        let e = scores.broadcast_sub(&max)?.exp()?;
        let attention = e.broadcast_div(&e.sum_keepdim(1)?)?;

        let mixed = attention.unsqueeze(1)?.matmul(&shifted)?.squeeze(1)?;
        let mut u = mixed.matmul(&p[ix.wv].t()?)?.broadcast_add(&p[ix.bv])?;
        if let Some((_, pv)) = ix.pk_pv {
            u = (u + attention.matmul(&p[pv])?)?;
        }
        let out = match ix.w1_b1 {
            Some((w1, b1)) => {
                let pre = Tensor::cat(&[&u, &x_rows], 1)?
                    .matmul(&p[w1].t()?)?
                    .broadcast_add(&p[b1])?;
                // relu as a product with a constant mask: candle's own `relu` passes the
                // gradient at exactly 0 (it tests `>= 0`), the model says relu'(0) = 0.
                let mask = pre.detach().gt(0.0)?.to_dtype(pre.dtype())?;
                (pre * mask)?
            }
            None => u,
        };
        let update = out
            .matmul(&p[ix.wo].t()?)?
            .broadcast_add(&p[ix.bo])?
            .reshape((b, h, w, c))?
            .permute((0, 3, 1, 2))?;
        Ok(Forward {
            attention: attention
                .reshape((b, h, w, NEIGHBOURS))?
                .permute((0, 3, 1, 2))?,
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

/// The 9 neighbours of every cell of a cell-major `x: [B, H, W, F]` as
/// `[B, H, W, 9, F]`, zero outside the grid, in the order `n = 3·(dy+1) + (dx+1)`.
///
/// Padding once and stacking 9 `narrow` views avoids candle's `unfold` (whose backward is
/// broken) and a grouped convolution (slow in candle).
fn neighbours(x: &Tensor) -> Result<Tensor, Error> {
    let (_, h, w, _) = x.dims4()?;
    let padded = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let mut views = Vec::with_capacity(NEIGHBOURS);
    for dy in 0..3 {
        for dx in 0..3 {
            views.push(padded.narrow(1, dy, h)?.narrow(2, dx, w)?);
        }
    }
    Ok(Tensor::stack(&views, 3)?)
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
