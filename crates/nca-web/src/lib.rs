//! The trained `nca` rule in the browser.
//!
//! This crate compiles to `wasm32-unknown-unknown` and runs the forward step
//! `s ← s + f(s)` of a checkpoint with the **ndarray backend itself**
//! ([`nca_ndarray::NdarrayTrainer`] through [`Transition::step`]): there is no second
//! implementation of the math, neither here nor in JavaScript. Rayon runs on the calling
//! thread where threads cannot be spawned, and the x86 SIMD paths are compiled out on
//! wasm, so the portable kernels run.
//!
//! [`Sim`] holds one simulation (rule, state, target, step counter); [`ffi`] exposes it
//! to the page as a handful of `extern "C"` functions over raw pointers into the wasm
//! memory. The same code runs natively, so `cargo test -p nca-web` checks the golden
//! vectors through exactly the functions the page calls.
//!
//! ```
//! use nca_web::Sim;
//! let bytes = std::fs::read("../../testdata/golden_5x6_pe_mlp.safetensors").unwrap();
//! let mut sim = Sim::from_bytes(&bytes).unwrap();
//! sim.step_exact().unwrap(); // one s + f(s), as the golden file's `next_state`
//! assert_eq!(sim.state().len(), 2 * 3 * 5 * 6);
//! ```
#![warn(missing_docs)]

pub mod ffi;

use std::collections::BTreeMap;

use nca_api::checkpoint::{META_CONFIG, STATE_TENSOR};
use nca_api::eval::{psnr_db, visible_mse};
use nca_api::{
    ConfigError, HostTensor, ModelConfig, NcaConfig, OptimizerConfig, RolloutOptions, TensorError,
    TensorFile, Transition, Weights,
};
use nca_ndarray::{NdarrayTrainer, State};

pub use nca_api::checkpoint::TARGET_TENSOR;

/// The page (`index.html`) that loads `nca.js`, `nca.wasm` and `weights.safetensors` from
/// its own folder; `nca-cli web` writes it there.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");

/// The page's script (`nca.js`): loads this crate's `.wasm`, calls [`ffi`] and draws the
/// state; plain JavaScript, no build step.
pub const NCA_JS: &str = include_str!("../assets/nca.js");

/// Why a file cannot be run or a step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a safetensors file, or lack what a rule needs.
    #[error("{0}")]
    Format(String),
    /// The stored config is not valid JSON for this version of `nca`.
    #[error("metadata `{META_CONFIG}` is not an nca config: {0}")]
    ConfigJson(#[from] serde_json::Error),
    /// The stored config has a bad field.
    #[error("stored config: {0}")]
    Config(#[from] ConfigError),
    /// A tensor has the wrong shape.
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// The backend refused the model or the state.
    #[error(transparent)]
    Backend(#[from] nca_ndarray::Error),
}

/// One running simulation: the rule, its state, the target and the controls' settings.
pub struct Sim {
    trainer: NdarrayTrainer,
    state: State,
    target: Option<HostTensor>,
    /// Noise added before every step (σ of a Gaussian), as in training and `rollout`.
    sigma: f32,
    /// The model's state clamp, applied after every step as in training.
    clamp: Option<f32>,
    /// Seed of the current run: the initial noise and the per-step noise derive from it.
    seed: u64,
    steps: u64,
    rgba: Vec<u8>,
    target_rgba: Vec<u8>,
}

impl Sim {
    /// Loads a rule from safetensors bytes.
    ///
    /// With an `nca.config` entry in the metadata (checkpoints, and the files `nca-cli web`
    /// writes) the config gives the model, the grid and the per-step noise, and the state
    /// starts from N(0, 1) noise; otherwise (bare weight files such as the golden vectors)
    /// the model comes from the `C D visible_channels position_embeddings position_octaves
    /// mlp_hidden` metadata keys and the grid and initial state from the tensor `state`.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let mut file = TensorFile::from_bytes(bytes).map_err(Error::Format)?;
        let (model, grid, sigma) = match file.metadata.get(META_CONFIG) {
            Some(json) => {
                let cfg: NcaConfig = serde_json::from_str(json)?;
                cfg.validate()?;
                let grid = (cfg.grid.height, cfg.grid.width);
                (cfg.model, Some(grid), cfg.noise.sigma_small)
            }
            None => (model_from_keys(&file.metadata)?, None, 0.0),
        };
        let weights = Weights::from_lookup(&model, |p| file.tensors.get(p.name()).cloned())?;
        let mut trainer = NdarrayTrainer::new(&model, &OptimizerConfig::default())?;
        trainer.set_weights(&weights)?;
        let stored = file.tensors.remove(STATE_TENSOR);
        let (state, height, width) = match (grid, stored) {
            (Some((h, w)), _) => (None, h, w),
            (None, Some(s)) => {
                let [_, _, h, w] = s.dims4(STATE_TENSOR)?;
                (Some(s), h, w)
            }
            (None, None) => {
                return Err(Error::Format(format!(
                    "neither metadata `{META_CONFIG}` nor a tensor `{STATE_TENSOR}`: the grid \
                     size is unknown"
                )))
            }
        };
        let target = match file.tensors.remove(TARGET_TENSOR) {
            Some(t) => {
                let [_, v, th, tw] = t.dims4(TARGET_TENSOR)?;
                if (v, th, tw) != (model.visible_channels, height, width) {
                    return Err(Error::Format(format!(
                        "tensor `{TARGET_TENSOR}` has shape {:?}, the rule needs [1, {}, {height}, {width}]",
                        t.shape(),
                        model.visible_channels
                    )));
                }
                Some(t)
            }
            None => None,
        };
        let start = match state {
            Some(s) => s,
            None => HostTensor::zeros(&[1, model.channels(), height, width]),
        };
        let state = trainer.upload(&start)?;
        let mut sim = Self {
            clamp: model.state_clamp,
            trainer,
            state,
            target,
            sigma,
            seed: 0,
            steps: 0,
            rgba: Vec::new(),
            target_rgba: Vec::new(),
        };
        if grid.is_some() {
            sim.reset(0)?;
        }
        if let Some(t) = &sim.target {
            sim.target_rgba = rgba(t.data(), model.visible_channels, 0, height, width);
        }
        Ok(sim)
    }

    /// The rule's model.
    pub fn model(&self) -> &ModelConfig {
        self.trainer.model()
    }

    /// `[B, C, H, W]` of the state.
    pub fn shape(&self) -> [usize; 4] {
        let (b, c, h, w) = self.state.dim();
        [b, c, h, w]
    }

    /// Starts over from N(0, 1) noise drawn from `seed` (the same numbers
    /// [`nca_api::initial_state`] draws for a run with that seed); the step count restarts.
    pub fn reset(&mut self, seed: u64) -> Result<(), Error> {
        self.state = self
            .trainer
            .upload(&nca_api::initial_noise(self.shape(), seed))?;
        self.seed = seed;
        self.steps = 0;
        Ok(())
    }

    /// σ of the Gaussian noise added before every step.
    pub fn sigma(&self) -> f32 {
        self.sigma
    }

    /// Sets the per-step noise σ (negative or NaN counts as 0).
    pub fn set_sigma(&mut self, sigma: f32) {
        self.sigma = if sigma.is_finite() {
            sigma.max(0.0)
        } else {
            0.0
        };
    }

    /// Steps taken since the last reset.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Runs `n` steps of `s ← clamp(s + ε + f(s + ε))`, ε ~ N(0, σ²) per step, exactly as
    /// [`nca_api::rollout`] does with this seed.
    pub fn step(&mut self, n: u32) -> Result<(), Error> {
        let options = RolloutOptions {
            steps: u64::from(n),
            sigma: self.sigma,
            state_clamp: self.clamp,
            seed: self.seed,
            first_step: self.steps,
        };
        nca_api::rollout::<_, Error>(&mut self.trainer, &mut self.state, &options, |_, _, _| {
            Ok(())
        })?;
        self.steps += u64::from(n);
        Ok(())
    }

    /// One bare `s + f(s)`: no noise, no clamp (what the golden vectors pin).
    pub fn step_exact(&mut self) -> Result<(), Error> {
        self.state = self.trainer.step(&self.state)?;
        self.steps += 1;
        Ok(())
    }

    /// The state, `[B, C, H, W]` row-major.
    pub fn state(&mut self) -> &[f32] {
        if self.state.as_slice().is_none() {
            self.state = self.state.as_standard_layout().into_owned();
        }
        self.state.as_slice().unwrap_or(&[])
    }

    /// Zeroes every channel of the cells whose centre lies within `radius` cells of
    /// `(x, y)` (in cells, from the grid's top-left corner), in every batch element;
    /// returns how many cells were erased.
    pub fn erase(&mut self, x: f32, y: f32, radius: f32) -> usize {
        let [b, c, h, w] = self.shape();
        let r2 = radius * radius;
        let mut erased = 0;
        for cy in 0..h {
            for cx in 0..w {
                let (dx, dy) = (cx as f32 + 0.5 - x, cy as f32 + 0.5 - y);
                if dx * dx + dy * dy > r2 {
                    continue;
                }
                erased += 1;
                for bi in 0..b {
                    for ch in 0..c {
                        self.state[[bi, ch, cy, cx]] = 0.0;
                    }
                }
            }
        }
        erased
    }

    /// The first batch element's visible channels as RGBA bytes (`H·W·4`), clamped to
    /// `[0, 1]` as every picture of `nca` shows them (NaN as 0); one visible channel is
    /// grey.
    pub fn render(&mut self) -> &[u8] {
        let [_, c, h, w] = self.shape();
        let v = self.model().visible_channels;
        let data = self.state().to_vec();
        self.rgba = rgba(&data, v.min(c), c, h, w);
        &self.rgba
    }

    /// The target as RGBA bytes like [`Sim::render`]; empty without a target.
    pub fn target_rgba(&self) -> &[u8] {
        &self.target_rgba
    }

    /// PSNR in dB of the first batch element's visible channels against the target
    /// ([`nca_api::eval`]'s definition, peak 1); `None` without a target.
    pub fn psnr(&mut self) -> Option<f64> {
        let shape = self.shape();
        let target = self.target.clone()?;
        let host = HostTensor::new(&shape, self.state().to_vec()).ok()?;
        visible_mse(&host, 0, &target).ok().map(psnr_db)
    }
}

/// A model from the shape metadata that golden files and checkpoints carry; missing
/// `position_octaves` / `mlp_hidden` keys mean the plain model, as in files written before
/// those options existed.
fn model_from_keys(meta: &BTreeMap<String, String>) -> Result<ModelConfig, Error> {
    let get = |key: &str| {
        meta.get(key).ok_or_else(|| {
            Error::Format(format!(
                "no metadata `{META_CONFIG}` and no `{key}` key: not an nca rule"
            ))
        })
    };
    let number = |key: &str| -> Result<usize, Error> {
        get(key)?
            .parse()
            .map_err(|e| Error::Format(format!("metadata `{key}`: {e}")))
    };
    let channels = number("C")?;
    let visible = number("visible_channels")?;
    let position_octaves = match meta.get("position_octaves").map(String::as_str) {
        None | Some("none") => None,
        Some(l) => Some(
            l.parse()
                .map_err(|e| Error::Format(format!("metadata `position_octaves`: {e}")))?,
        ),
    };
    let mlp_hidden = match meta.get("mlp_hidden").map(String::as_str) {
        None | Some("0") => None,
        Some(_) => Some(number("mlp_hidden")?),
    };
    let model = ModelConfig {
        visible_channels: visible,
        hidden_channels: channels.checked_sub(visible).ok_or_else(|| {
            Error::Format(format!(
                "metadata: C = {channels} < visible_channels = {visible}"
            ))
        })?,
        attention_dim: number("D")?,
        position_embeddings: get("position_embeddings")? == "true",
        state_clamp: None,
        position_octaves,
        mlp_hidden,
    };
    model.validate()?;
    Ok(model)
}

/// RGBA bytes of batch element 0 of a row-major `[B, C, H, W]` buffer whose first `v`
/// channels are shown (`c` is the channel stride; 0 means `v`).
fn rgba(data: &[f32], v: usize, c: usize, h: usize, w: usize) -> Vec<u8> {
    let c = if c == 0 { v } else { c };
    let plane = h * w;
    let byte = |x: f32| {
        let x = if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
        (x * 255.0).round() as u8
    };
    let channel = |ch: usize, i: usize| data.get(ch.min(c - 1) * plane + i).copied();
    let mut out = Vec::with_capacity(plane * 4);
    for i in 0..plane {
        let (r, g, b) = if v >= 3 {
            (channel(0, i), channel(1, i), channel(2, i))
        } else {
            let grey = channel(0, i);
            (grey, grey, grey)
        };
        for x in [r, g, b] {
            out.push(byte(x.unwrap_or(0.0)));
        }
        out.push(255);
    }
    out
}
