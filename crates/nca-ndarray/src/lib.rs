//! The default `nca` backend: pure Rust, no autodiff crate.
//!
//! The convolutional-attention transition runs as one fused per-cell kernel whose
//! backward pass is written by hand ([`kernel`] documents the derivation) and checked
//! against the golden vectors and f64 finite differences by `nca-testkit`. Adam follows
//! PyTorch (β = (0.9, 0.999), eps 1e-8, bias-corrected). Work is split across threads
//! with rayon in units that depend only on the grid shape, so results are reproducible
//! bit for bit on any machine thread count. Buffers are kept between steps: a training
//! step on an unchanged grid allocates nothing.
//!
//! ```
//! use nca_api::{ModelConfig, OptimizerConfig, Trainer, Transition, HostTensor, Weights};
//! use nca_ndarray::NdarrayTrainer;
//!
//! let model = ModelConfig::default();
//! let mut t = NdarrayTrainer::new(&model, &OptimizerConfig::default()).unwrap();
//! t.set_weights(&Weights::init(&model, 0)).unwrap();
//! t.set_target(&HostTensor::filled(&[1, 3, 8, 8], 0.5)).unwrap();
//! let mut state = t.upload(&HostTensor::zeros(&[1, 3, 8, 8])).unwrap();
//! let loss = t.train_step(&mut state).unwrap();
//! assert!((loss - 0.25).abs() < 1e-6); // f = 0 at init: the loss is (0 − 0.5)²
//! ```
#![warn(missing_docs)]

mod kernel;

use ndarray::Array4;
use rayon::prelude::*;

use nca_api::noise::{add_gaussian_block, NOISE_BLOCK};
use nca_api::{
    AdamState, HostTensor, ModelConfig, OptimizerConfig, TensorError, Trainer, Transition, Weights,
    NEIGHBOURS,
};

use kernel::{CellInputs, Geometry, GradLayout, KernelParams, Mode, MAX_CHANNELS, MAX_DIM};

/// Errors of the ndarray backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor had the wrong shape.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// The model is larger than this backend's per-cell scratch space.
    #[error("the ndarray backend supports at most {MAX_CHANNELS} channels and attention_dim {MAX_DIM}; found {channels} channels and attention_dim {dim}")]
    TooLarge {
        /// Channels requested.
        channels: usize,
        /// Attention dimension requested.
        dim: usize,
    },
    /// Training was asked for before a target was set.
    #[error("no target set: call set_target before computing a loss")]
    NoTarget,
    /// The state's grid differs from the target's.
    #[error("state grid [B, H, W] = {state:?} does not match the target's {target:?}")]
    TargetMismatch {
        /// `[B, H, W]` of the state.
        state: [usize; 3],
        /// `[B, H, W]` of the target.
        target: [usize; 3],
    },
}

/// The state tensor of this backend: an NCHW `f32` array.
pub type State = Array4<f32>;

/// Reusable per-grid buffers.
#[derive(Default)]
struct Scratch {
    geo: Option<Geometry>,
    s_pad: Vec<f32>,
    kv_pad: Vec<f32>,
    out: Vec<f32>,
    attention: Vec<f32>,
    partials: Vec<f32>,
    grads: Vec<f32>,
}

/// Adam's moments over the flat parameter vector.
struct Adam {
    step: u64,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The ndarray backend's [`Transition`] and [`Trainer`].
pub struct NdarrayTrainer {
    model: ModelConfig,
    optim: OptimizerConfig,
    /// Parameters in [`Weights::flatten`] order: the optimiser's view.
    params: Vec<f32>,
    /// The same parameters in the kernel's layout.
    kernel: KernelParams,
    layout: GradLayout,
    /// Gradient in [`Weights::flatten`] order.
    flat_grad: Vec<f32>,
    adam: Adam,
    target: Option<(Array4<f32>, [usize; 3])>,
    scratch: Scratch,
}

impl NdarrayTrainer {
    /// A trainer for `model` with Adam settings `optim`, starting from
    /// [`Weights::init`]`(model, 0)`.
    pub fn new(model: &ModelConfig, optim: &OptimizerConfig) -> Result<Self, Error> {
        let (c, d) = (model.channels(), model.attention_dim);
        if c > MAX_CHANNELS || d > MAX_DIM || c == 0 || d == 0 {
            return Err(Error::TooLarge {
                channels: c,
                dim: d,
            });
        }
        let weights = Weights::init(model, 0);
        let n = weights.num_params();
        let mut t = Self {
            model: model.clone(),
            optim: *optim,
            params: weights.flatten(),
            kernel: KernelParams::default(),
            layout: GradLayout::new(c, d),
            flat_grad: vec![0.0; n],
            adam: Adam {
                step: 0,
                m: vec![0.0; n],
                v: vec![0.0; n],
            },
            target: None,
            scratch: Scratch::default(),
        };
        t.refresh_kernel_params();
        Ok(t)
    }

    fn template(&self) -> Weights {
        Weights::zeros(&self.model)
    }

    /// Rebuilds the kernel's transposed copies from the flat parameters.
    fn refresh_kernel_params(&mut self) {
        let (c, d) = (self.model.channels(), self.model.attention_dim);
        let k = &mut self.kernel;
        k.c = c;
        k.d = d;
        let p = &self.params;
        let mut at = 0;
        let mut next = |n: usize| {
            let s = &p[at..at + n];
            at += n;
            s
        };
        let transpose = |src: &[f32], dst: &mut Vec<f32>| {
            dst.resize(c * d, 0.0);
            for i in 0..d {
                for ch in 0..c {
                    dst[ch * d + i] = src[i * c + ch];
                }
            }
        };
        transpose(next(d * c), &mut k.wq_t);
        set(&mut k.bq, next(d));
        transpose(next(d * c), &mut k.wk_t);
        set(&mut k.bk, next(d));
        transpose(next(d * c), &mut k.wv_t);
        set(&mut k.bv, next(d));
        set(&mut k.wo, next(c * d));
        set(&mut k.bo, next(c));
        if self.model.position_embeddings {
            set(&mut k.pk, next(NEIGHBOURS * d));
            set(&mut k.pv, next(NEIGHBOURS * d));
        } else {
            k.pk.clear();
            k.pk.resize(NEIGHBOURS * d, 0.0);
            k.pv.clear();
            k.pv.resize(NEIGHBOURS * d, 0.0);
        }
    }

    fn check_state(&self, state: &State) -> Result<Geometry, Error> {
        let (b, c, h, w) = state.dim();
        if c != self.model.channels() || h == 0 || w == 0 || b == 0 {
            return Err(TensorError::WrongShape {
                what: "state".into(),
                expected: vec![b, self.model.channels(), h.max(1), w.max(1)],
                found: vec![b, c, h, w],
            }
            .into());
        }
        Ok(Geometry::new(b, h, w))
    }

    /// Sizes the buffers for `geo` (no allocation when the grid is unchanged) and runs
    /// the projection pass.
    fn prepare(&mut self, state: &State, geo: Geometry, attention: bool) {
        let (c, d) = (self.kernel.c, self.kernel.d);
        let sc = &mut self.scratch;
        if sc.geo != Some(geo) {
            sc.geo = Some(geo);
            sc.s_pad.resize(geo.padded_cells() * c, 0.0);
            sc.kv_pad.resize(geo.padded_cells() * 2 * d, 0.0);
            sc.out.resize(geo.cells() * c, 0.0);
            sc.partials.resize(geo.units() * self.layout.len, 0.0);
            sc.grads.resize(self.layout.len, 0.0);
            sc.attention.clear();
        }
        if attention {
            sc.attention.resize(geo.cells() * NEIGHBOURS, 0.0);
        }
        let flat = state.as_slice();
        let owned;
        let flat = match flat {
            Some(f) => f,
            None => {
                owned = state.as_standard_layout().to_owned();
                owned.as_slice().unwrap_or(&[])
            }
        };
        kernel::prepare(&self.kernel, geo, flat, &mut sc.s_pad, &mut sc.kv_pad);
    }

    /// Runs the cell pass; returns `(loss, sum of squared errors)` in train mode.
    fn run_cells(&mut self, geo: Geometry, mode: Mode, attention: bool) -> Result<(), Error> {
        let empty = Array4::zeros((0, 0, 0, 0));
        let (target, visible) = match (&self.target, mode) {
            (Some((t, dims)), Mode::Train) => {
                if *dims != [geo.b, geo.h, geo.w] {
                    return Err(Error::TargetMismatch {
                        state: [geo.b, geo.h, geo.w],
                        target: *dims,
                    });
                }
                (t, self.model.visible_channels)
            }
            (None, Mode::Train) => return Err(Error::NoTarget),
            _ => (&empty, self.model.visible_channels),
        };
        let sc = &mut self.scratch;
        let inputs = CellInputs {
            params: &self.kernel,
            geo,
            s_pad: &sc.s_pad,
            kv_pad: &sc.kv_pad,
            target: target.as_slice().unwrap_or(&[]),
            visible,
            layout: self.layout,
        };
        let att: &mut [f32] = if attention {
            &mut sc.attention
        } else {
            &mut []
        };
        kernel::cells(&inputs, mode, &mut sc.out, att, &mut sc.partials);
        Ok(())
    }

    /// Sums per-unit partial gradients in unit order and converts them to the flat
    /// [`Weights::flatten`] layout; returns the loss.
    fn reduce_gradients(&mut self, geo: Geometry) -> f32 {
        let len = self.layout.len;
        let sc = &mut self.scratch;
        sc.grads.fill(0.0);
        for part in sc.partials.chunks_exact(len) {
            for (g, p) in sc.grads.iter_mut().zip(part) {
                *g += p;
            }
        }
        let (c, d) = (self.kernel.c, self.kernel.d);
        let l = self.layout;
        let g = &sc.grads;
        let out = &mut self.flat_grad;
        let mut at = 0;
        // Projections are [C][D] in the kernel and [D][C] in the flat layout.
        for (src, bias) in [(l.wq_t, l.bq), (l.wk_t, l.bk), (l.wv_t, l.bv)] {
            for i in 0..d {
                for ch in 0..c {
                    out[at + i * c + ch] = g[src + ch * d + i];
                }
            }
            at += c * d;
            out[at..at + d].copy_from_slice(&g[bias..bias + d]);
            at += d;
        }
        let mut rest = vec![(l.wo, c * d), (l.bo, c)];
        if self.model.position_embeddings {
            rest.extend([(l.pk, NEIGHBOURS * d), (l.pv, NEIGHBOURS * d)]);
        }
        for (src, n) in rest {
            out[at..at + n].copy_from_slice(&g[src..src + n]);
            at += n;
        }
        g[l.loss] / (geo.cells() * self.model.visible_channels) as f32
    }

    /// Copies the channel-last kernel output into an NCHW array of the same grid.
    fn write_out(&self, geo: Geometry, dst: &mut State) {
        if !dst.is_standard_layout() {
            *dst = dst.as_standard_layout().to_owned();
        }
        let c = self.kernel.c;
        let plane = geo.h * geo.w;
        let src = &self.scratch.out;
        if let Some(flat) = dst.as_slice_mut() {
            flat.par_chunks_mut(plane)
                .enumerate()
                .for_each(|(bc, plane_out)| {
                    let (bi, ch) = (bc / c, bc % c);
                    let base = bi * plane * c;
                    for (i, o) in plane_out.iter_mut().enumerate() {
                        *o = src[base + i * c + ch];
                    }
                });
        }
    }

    fn forward(&mut self, state: &State, mode: Mode) -> Result<State, Error> {
        let geo = self.check_state(state)?;
        self.prepare(state, geo, false);
        self.run_cells(geo, mode, false)?;
        let mut out = Array4::zeros(state.raw_dim());
        self.write_out(geo, &mut out);
        Ok(out)
    }

    fn apply_adam(&mut self) {
        let o = self.optim;
        if let Some(clip) = o.grad_clip {
            let norm = self
                .flat_grad
                .iter()
                .map(|g| f64::from(*g).powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > f64::from(clip) {
                let scale = (f64::from(clip) / norm) as f32;
                self.flat_grad.iter_mut().for_each(|g| *g *= scale);
            }
        }
        let a = &mut self.adam;
        a.step += 1;
        let t = a.step as i32;
        let bc1 = 1.0 - o.beta1.powi(t);
        let bc2 = 1.0 - o.beta2.powi(t);
        let step_size = o.learning_rate / bc1;
        let bc2_sqrt = bc2.sqrt();
        for (((p, g), m), v) in self
            .params
            .iter_mut()
            .zip(&self.flat_grad)
            .zip(&mut a.m)
            .zip(&mut a.v)
        {
            *m = o.beta1 * *m + (1.0 - o.beta1) * g;
            *v = o.beta2 * *v + (1.0 - o.beta2) * g * g;
            // PyTorch's form: lr/bc1 · m / (sqrt(v)/sqrt(bc2) + eps).
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + o.eps);
        }
        self.refresh_kernel_params();
    }
}

fn set(dst: &mut Vec<f32>, src: &[f32]) {
    dst.clear();
    dst.extend_from_slice(src);
}

impl Transition for NdarrayTrainer {
    type State = State;
    type Error = Error;

    fn model(&self) -> &ModelConfig {
        &self.model
    }

    fn upload(&self, host: &HostTensor) -> Result<State, Error> {
        let [b, c, h, w] = host.dims4("state")?;
        if c != self.model.channels() {
            return Err(TensorError::WrongShape {
                what: "state".into(),
                expected: vec![b, self.model.channels(), h, w],
                found: host.shape().to_vec(),
            }
            .into());
        }
        Array4::from_shape_vec((b, c, h, w), host.data().to_vec()).map_err(|_| {
            Error::Tensor(TensorError::ShapeMismatch {
                expected: host.shape().to_vec(),
                len: host.len(),
            })
        })
    }

    fn download(&self, state: &State) -> Result<HostTensor, Error> {
        let (b, c, h, w) = state.dim();
        let data = state.as_standard_layout().iter().copied().collect();
        Ok(HostTensor::new(&[b, c, h, w], data)?)
    }

    fn update(&mut self, state: &State) -> Result<State, Error> {
        self.forward(state, Mode::Update)
    }

    fn step(&mut self, state: &State) -> Result<State, Error> {
        self.forward(state, Mode::Next)
    }

    fn attention(&mut self, state: &State) -> Result<HostTensor, Error> {
        let geo = self.check_state(state)?;
        self.prepare(state, geo, true);
        self.run_cells(geo, Mode::Update, true)?;
        let plane = geo.h * geo.w;
        let src = &self.scratch.attention;
        let mut out = vec![0.0; geo.b * NEIGHBOURS * plane];
        for (bn, chunk) in out.chunks_mut(plane).enumerate() {
            let (bi, n) = (bn / NEIGHBOURS, bn % NEIGHBOURS);
            for (i, o) in chunk.iter_mut().enumerate() {
                *o = src[(bi * plane + i) * NEIGHBOURS + n];
            }
        }
        Ok(HostTensor::new(&[geo.b, NEIGHBOURS, geo.h, geo.w], out)?)
    }

    fn weights(&self) -> Result<Weights, Error> {
        let mut w = self.template();
        w.unflatten_from(&self.params)?;
        Ok(w)
    }

    fn set_weights(&mut self, weights: &Weights) -> Result<(), Error> {
        weights.check(&self.model)?;
        self.params = weights.flatten();
        self.refresh_kernel_params();
        Ok(())
    }

    fn add_noise(&mut self, state: &mut State, sigma: f32, seed: u64) -> Result<(), Error> {
        if sigma == 0.0 {
            return Ok(());
        }
        match state.as_slice_mut() {
            Some(flat) => flat
                .par_chunks_mut(NOISE_BLOCK)
                .enumerate()
                .for_each(|(block, chunk)| add_gaussian_block(chunk, sigma, seed, block as u64)),
            None => {
                let mut owned = state.as_standard_layout().to_owned();
                if let Some(flat) = owned.as_slice_mut() {
                    nca_api::noise::add_gaussian(flat, sigma, seed);
                }
                *state = owned;
            }
        }
        Ok(())
    }

    fn clamp(&mut self, state: &mut State, limit: f32) -> Result<(), Error> {
        if !state.is_standard_layout() {
            *state = state.as_standard_layout().to_owned();
        }
        if let Some(flat) = state.as_slice_mut() {
            flat.par_chunks_mut(NOISE_BLOCK)
                .for_each(|chunk| chunk.iter_mut().for_each(|x| *x = x.clamp(-limit, limit)));
        }
        Ok(())
    }
}

impl Trainer for NdarrayTrainer {
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Error> {
        let [b, v, h, w] = target.dims4("target")?;
        if v != self.model.visible_channels {
            return Err(TensorError::WrongShape {
                what: "target".into(),
                expected: vec![b, self.model.visible_channels, h, w],
                found: target.shape().to_vec(),
            }
            .into());
        }
        // Channel-last, so the kernel reads a cell's V values contiguously.
        let plane = h * w;
        let src = target.data();
        let mut cl = Array4::zeros((b, h, w, v));
        if let Some(dst) = cl.as_slice_mut() {
            for bi in 0..b {
                for ch in 0..v {
                    for i in 0..plane {
                        dst[(bi * plane + i) * v + ch] = src[(bi * v + ch) * plane + i];
                    }
                }
            }
        }
        self.target = Some((cl, [b, h, w]));
        Ok(())
    }

    fn loss_and_gradients(&mut self, state: &State) -> Result<(f32, Weights), Error> {
        let geo = self.check_state(state)?;
        self.prepare(state, geo, false);
        self.run_cells(geo, Mode::Train, false)?;
        let loss = self.reduce_gradients(geo);
        let mut grads = self.template();
        grads.unflatten_from(&self.flat_grad)?;
        Ok((loss, grads))
    }

    fn train_step(&mut self, state: &mut State) -> Result<f32, Error> {
        let geo = self.check_state(state)?;
        self.prepare(state, geo, false);
        self.run_cells(geo, Mode::Train, false)?;
        let loss = self.reduce_gradients(geo);
        self.write_out(geo, state);
        self.apply_adam();
        Ok(loss)
    }

    fn adam_state(&self) -> Result<AdamState, Error> {
        let mut m = self.template();
        let mut v = self.template();
        m.unflatten_from(&self.adam.m)?;
        v.unflatten_from(&self.adam.v)?;
        Ok(AdamState {
            step: self.adam.step,
            m,
            v,
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
