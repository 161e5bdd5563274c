//! The default `nca` backend: pure Rust, no autodiff crate.
//!
//! Every model the config allows runs here, with exact hand-written gradients:
//!
//! - the plain model (no position inputs, no MLP) as one fused per-cell kernel whose
//!   backward pass is written by hand (`src/kernel.rs` documents the derivation);
//! - position inputs and/or the MLP update (the default "picture model") as blocked
//!   matrix products around a per-cell SIMD attention (`src/dense.rs`): per chunk of rows,
//!   `Q, K, V = W·[s; p] + b`, attention per cell, `h = relu(W1·[u; x] + b1)`,
//!   `f = Wo·h + bo`, and in the backward pass every weight gradient is again a matrix
//!   product over the chunk's cells (`src/gemm.rs`: register-blocked, no packing,
//!   AVX-512 or AVX2 + FMA chosen at run time). The position inputs enter those products
//!   as one term per grid column plus one per row (each feature depends on `X` or on `Y`
//!   only), not as a product per cell.
//!
//! Both are checked against the golden vectors and f64 finite differences by
//! `nca-testkit`. Adam follows PyTorch (β = (0.9, 0.999), eps 1e-8, bias-corrected).
//! Work is split across threads with rayon in units that depend only on the grid shape,
//! so results are reproducible bit for bit on any machine thread count. Buffers are kept
//! between steps: a training step on an unchanged grid allocates nothing.
//!
//! Measured on the 2-core development machine (release, C = 3, D = 16, L = 6, M = 128):
//! see the crate README and `BENCHMARKS.md`.
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

mod attention;
mod dense;
mod gemm;
mod kernel;
mod simd;

use ndarray::Array4;
use rayon::prelude::*;

use nca_api::noise::{add_gaussian_block, NOISE_BLOCK};
use nca_api::{
    AdamState, FlatAdam, HostTensor, ModelConfig, OptimizerConfig, TensorError, Trainer,
    Transition, Weights, NEIGHBOURS,
};

use dense::{DenseLayout, DenseWorkspace};
use kernel::{Geometry, Layout, Mode, Workspace};
pub use kernel::{MAX_CHANNELS, MAX_DIM};

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
    /// The model's parameter list is not one this backend knows how to compute.
    #[error("the ndarray backend cannot run this model: {reason}")]
    Unsupported {
        /// What is missing.
        reason: &'static str,
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

/// How the transition is computed: the fused kernel for the plain model, blocked GEMMs
/// around a per-cell attention for the picture model. The workspaces are boxed: they are
/// hundreds of bytes of buffer handles, of very different sizes.
enum Engine {
    /// Plain model (no position inputs, no MLP): one fused per-cell kernel.
    Fused {
        /// The parameters in the kernel's [`Layout`] (zero `pk`/`pv` appended without
        /// position embeddings).
        kernel_w: Vec<f32>,
        layout: Layout,
        workspace: Box<Workspace>,
    },
    /// Position inputs and/or the MLP update ([`dense`]).
    Dense {
        /// What the cells read besides the flat parameters ([`DenseLayout::derive`]).
        derived: Vec<f32>,
        layout: DenseLayout,
        workspace: Box<DenseWorkspace>,
    },
}

/// The ndarray backend's [`Transition`] and [`Trainer`].
pub struct NdarrayTrainer {
    model: ModelConfig,
    optim: OptimizerConfig,
    /// Parameters in [`Weights::flatten`] order: the optimiser's view.
    params: Vec<f32>,
    /// Gradient in [`Weights::flatten`] order.
    flat_grad: Vec<f32>,
    adam: FlatAdam,
    /// Row-planar target and its `[B, H, W]`.
    target: Option<(Vec<f32>, [usize; 3])>,
    engine: Engine,
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
        let engine = match Layout::new(model) {
            Some(layout) => Engine::Fused {
                kernel_w: Vec::new(),
                layout,
                workspace: Box::default(),
            },
            None => {
                let layout = DenseLayout::new(model).ok_or(Error::Unsupported {
                    reason: "the parameter list lacks a projection",
                })?;
                Engine::Dense {
                    derived: Vec::new(),
                    layout,
                    workspace: Box::new(DenseWorkspace::new(layout, model.position_octaves)),
                }
            }
        };
        let weights = Weights::init(model, 0);
        let n = weights.num_params();
        let mut t = Self {
            model: model.clone(),
            optim: *optim,
            params: weights.flatten(),
            flat_grad: vec![0.0; n],
            adam: FlatAdam::new(n),
            target: None,
            engine,
        };
        t.refresh_kernel_params();
        Ok(t)
    }

    fn template(&self) -> Weights {
        Weights::zeros(&self.model)
    }

    /// Rebuilds the engine's view of the parameters from the flat parameters.
    fn refresh_kernel_params(&mut self) {
        match &mut self.engine {
            Engine::Fused {
                kernel_w, layout, ..
            } => {
                kernel_w.clear();
                kernel_w.extend_from_slice(&self.params);
                kernel_w.resize(layout.loss, 0.0);
            }
            Engine::Dense {
                derived, layout, ..
            } => layout.derive(&self.params, derived),
        }
    }

    /// The geometry of a `b`×`h`×`w` grid as this model's kernels lay it out.
    fn geometry(&self, b: usize, h: usize, w: usize) -> Geometry {
        match self.engine {
            Engine::Fused { .. } => Geometry::new(b, h, w),
            Engine::Dense { .. } => Geometry::aligned(b, h, w, dense::ALIGN, dense::UNITS),
        }
    }

    fn check_state(&self, state: &State) -> Result<Geometry, Error> {
        let [b, _, h, w] = self.model.check_state(state.shape())?;
        Ok(self.geometry(b, h, w))
    }

    /// Runs a pass over the state: sizes the buffers for its grid (no allocation when it
    /// is unchanged), checks the target in train mode, and computes the output (and in
    /// train mode the loss and gradients).
    fn run(&mut self, state: &State, mode: Mode, attention: bool) -> Result<Geometry, Error> {
        let geo = self.check_state(state)?;
        let target: &[f32] = match (&self.target, mode) {
            (Some((t, dims)), Mode::Train) => {
                if *dims != [geo.b, geo.h, geo.w] {
                    return Err(Error::TargetMismatch {
                        state: [geo.b, geo.h, geo.w],
                        target: *dims,
                    });
                }
                t
            }
            (None, Mode::Train) => return Err(Error::NoTarget),
            _ => &[],
        };
        let owned;
        let flat = match state.as_slice() {
            Some(flat) => flat,
            None => {
                owned = state.as_standard_layout().to_owned();
                owned.as_slice().unwrap_or(&[])
            }
        };
        let visible = self.model.visible_channels;
        match &mut self.engine {
            Engine::Fused {
                kernel_w,
                layout,
                workspace,
            } => {
                workspace.ensure(geo, *layout);
                workspace.prepare(kernel_w, flat);
                workspace.cells(kernel_w, mode, target, visible, attention);
            }
            Engine::Dense {
                derived, workspace, ..
            } => {
                workspace.ensure(geo);
                workspace.run(&self.params, derived, flat, target, mode, attention);
            }
        }
        Ok(geo)
    }

    /// Reduces the gradients into [`Weights::flatten`] order; returns the loss.
    fn reduce_gradients(&mut self, geo: Geometry) -> f32 {
        let n = self.flat_grad.len();
        let sum = match &mut self.engine {
            Engine::Fused {
                layout, workspace, ..
            } => {
                workspace.reduce();
                self.flat_grad.copy_from_slice(&workspace.grads[..n]);
                workspace.grads[layout.loss]
            }
            Engine::Dense {
                layout, workspace, ..
            } => {
                workspace.reduce();
                self.flat_grad.copy_from_slice(&workspace.grads[..n]);
                workspace.grads[layout.params]
            }
        };
        sum / (geo.cells() * self.model.visible_channels) as f32
    }

    /// Copies the last output into an NCHW array of the same grid.
    fn write_out(&self, geo: Geometry, dst: &mut State) {
        if !dst.is_standard_layout() {
            *dst = dst.as_standard_layout().to_owned();
        }
        let c = self.model.channels();
        if let Some(flat) = dst.as_slice_mut() {
            match &self.engine {
                Engine::Fused { workspace, .. } => workspace.write_output(flat),
                Engine::Dense { workspace, .. } => {
                    kernel::planar_to_nchw(workspace.output(), geo, c, flat)
                }
            }
        }
    }

    fn forward(&mut self, state: &State, mode: Mode) -> Result<State, Error> {
        on_pool(|| {
            let geo = self.run(state, mode, false)?;
            let mut out = Array4::zeros(state.raw_dim());
            self.write_out(geo, &mut out);
            Ok(out)
        })
    }

    fn apply_adam(&mut self) {
        self.adam
            .update(&mut self.params, &mut self.flat_grad, &self.optim);
        self.refresh_kernel_params();
    }
}

impl Transition for NdarrayTrainer {
    type State = State;
    type Error = Error;

    fn model(&self) -> &ModelConfig {
        &self.model
    }

    fn upload(&self, host: &HostTensor) -> Result<State, Error> {
        let [b, c, h, w] = self.model.check_state(host.shape())?;
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
        let geo = self.run(state, Mode::Update, true)?;
        let mut out = vec![0.0; geo.b * NEIGHBOURS * geo.h * geo.w];
        match &self.engine {
            Engine::Fused { workspace, .. } => workspace.write_attention(&mut out),
            Engine::Dense { workspace, .. } => {
                kernel::planar_to_nchw(workspace.attention(), geo, NEIGHBOURS, &mut out)
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
            // One block is drawn where the caller is: handing it to the pool costs more.
            Some(flat) if flat.len() <= NOISE_BLOCK => add_gaussian_block(flat, sigma, seed, 0),
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
        let clamp = |chunk: &mut [f32]| chunk.iter_mut().for_each(|x| *x = x.clamp(-limit, limit));
        match state.as_slice_mut() {
            Some(flat) if flat.len() <= NOISE_BLOCK => clamp(flat),
            Some(flat) => flat.par_chunks_mut(NOISE_BLOCK).for_each(clamp),
            None => {}
        }
        Ok(())
    }
}

impl Trainer for NdarrayTrainer {
    fn set_target(&mut self, target: &HostTensor) -> Result<(), Error> {
        let [b, v, h, w] = self.model.check_target(target.shape())?;
        let planar = kernel::row_planar_target(target.data(), v, self.geometry(b, h, w));
        self.target = Some((planar, [b, h, w]));
        Ok(())
    }

    fn loss_and_gradients(&mut self, state: &State) -> Result<(f32, Weights), Error> {
        let loss = on_pool(|| {
            let geo = self.run(state, Mode::Train, false)?;
            Ok::<_, Error>(self.reduce_gradients(geo))
        })?;
        let mut grads = self.template();
        grads.unflatten_from(&self.flat_grad)?;
        Ok((loss, grads))
    }

    fn train_step(&mut self, state: &mut State) -> Result<f32, Error> {
        on_pool(|| {
            let geo = self.run(state, Mode::Train, false)?;
            let loss = self.reduce_gradients(geo);
            self.write_out(geo, state);
            self.apply_adam();
            Ok(loss)
        })
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

/// Runs `work` on a worker of rayon's pool. From any other thread each parallel loop of a
/// step hands its work to the pool and sleeps until it is done, two thread wake-ups per
/// loop and several loops per step (about a fifth of a 32×32 step's time); inside the pool
/// the step pays that once and its loops split between the workers directly. On a worker
/// already, `work` runs where it is.
fn on_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| work())
}
