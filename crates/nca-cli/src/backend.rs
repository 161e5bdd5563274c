//! Choosing a backend at run time among those compiled in.
//!
//! All run logic is generic over [`nca_api::Trainer`] ([`Job`]); [`dispatch`] is the one
//! place that names backend types, each arm behind its cargo feature. A backend that was
//! not compiled in is a clear runtime error saying which feature to enable.

use anyhow::{anyhow, Context, Result};
use nca_api::{ModelConfig, OptimizerConfig, Trainer};

/// A backend name as given to `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Pure-Rust ndarray backend (always compiled).
    Ndarray,
    /// dfdx on the CPU (feature `dfdx`).
    Dfdx,
    /// candle on the CPU (feature `candle`).
    Candle,
    /// candle on CUDA device 0 (feature `candle-cuda`).
    CandleCuda,
}

impl Backend {
    /// The name used on the command line and in files.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Ndarray => "ndarray",
            Backend::Dfdx => "dfdx",
            Backend::Candle => "candle",
            Backend::CandleCuda => "candle-cuda",
        }
    }

    /// The cargo feature that compiles this backend in.
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Backend::Ndarray => None,
            other => Some(other.name()),
        }
    }
}

impl Backend {
    /// The backends compiled into this binary, default first.
    pub fn compiled() -> Vec<Backend> {
        let mut out = vec![Backend::Ndarray];
        if cfg!(feature = "dfdx") {
            out.push(Backend::Dfdx);
        }
        if cfg!(feature = "candle") {
            out.push(Backend::Candle);
        }
        if cfg!(feature = "candle-cuda") {
            out.push(Backend::CandleCuda);
        }
        out
    }
}

/// Most channels (visible + hidden) the ndarray backend supports.
pub const NDARRAY_MAX_CHANNELS: usize = nca_ndarray::MAX_CHANNELS;

/// Largest `model.attention_dim` the ndarray backend supports.
pub const NDARRAY_MAX_ATTENTION_DIM: usize = nca_ndarray::MAX_DIM;

impl Backend {
    /// Checks `model` against this backend's own limits (beyond nca-api's validation) and
    /// that the backend is compiled in; the error names the field to change.
    pub fn check_model(self, model: &ModelConfig) -> Result<()> {
        if !Backend::compiled().contains(&self) {
            return Err(not_compiled(self));
        }
        if self == Backend::Ndarray {
            let channels = model.channels();
            if channels > NDARRAY_MAX_CHANNELS {
                return Err(anyhow!(
                    "invalid config field `model.hidden_channels`: the ndarray backend supports \
                     at most {NDARRAY_MAX_CHANNELS} channels in all (visible + hidden), found \
                     {} + {} = {channels}; lower model.hidden_channels to at most {}",
                    model.visible_channels,
                    model.hidden_channels,
                    NDARRAY_MAX_CHANNELS.saturating_sub(model.visible_channels)
                ));
            }
            if model.attention_dim > NDARRAY_MAX_ATTENTION_DIM {
                return Err(anyhow!(
                    "invalid config field `model.attention_dim`: the ndarray backend supports \
                     at most {NDARRAY_MAX_ATTENTION_DIM}, found {}",
                    model.attention_dim
                ));
            }
        }
        Ok(())
    }
}

/// Work to do with a trainer, whatever its backend.
pub trait Job {
    /// What the work returns.
    type Output;
    /// Does the work with a freshly built trainer.
    fn run<T: Trainer>(self, trainer: T, backend: Backend) -> Result<Self::Output>;
}

/// Builds the trainer for `backend` and runs `job` with it.
pub fn dispatch<J: Job>(
    backend: Backend,
    model: &ModelConfig,
    optimizer: &OptimizerConfig,
    job: J,
) -> Result<J::Output> {
    let ctx = || format!("cannot start the {} backend", backend.name());
    match backend {
        Backend::Ndarray => {
            let t = nca_ndarray::NdarrayTrainer::new(model, optimizer).with_context(ctx)?;
            job.run(t, backend)
        }
        #[cfg(feature = "dfdx")]
        Backend::Dfdx => {
            let t = nca_dfdx::DfdxTrainer::new(model, optimizer).with_context(ctx)?;
            job.run(t, backend)
        }
        #[cfg(feature = "candle")]
        Backend::Candle => {
            let t = nca_candle::CandleTrainer::cpu(model, optimizer).with_context(ctx)?;
            job.run(t, backend)
        }
        #[cfg(feature = "candle-cuda")]
        Backend::CandleCuda => {
            let t = nca_candle::CandleTrainer::cuda(model, optimizer, 0).with_context(ctx)?;
            job.run(t, backend)
        }
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

/// The error for a backend this binary was built without.
pub fn not_compiled(backend: Backend) -> anyhow::Error {
    let feature = backend.feature().unwrap_or("?");
    anyhow!(
        "the {name} backend is not compiled into this binary; rebuild with the cargo feature \
         `{feature}`, e.g. `cargo run -p nca-cli --features {feature} -- --backend {name} \
         run.ron`",
        name = backend.name()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limits checked here are exactly where nca-ndarray's trainer starts refusing.
    #[test]
    fn ndarray_limits_match_the_backend() {
        let optimizer = OptimizerConfig::default();
        let model = |hidden: usize, dim: usize| ModelConfig {
            hidden_channels: hidden,
            attention_dim: dim,
            ..ModelConfig::default()
        };
        let edge = model(NDARRAY_MAX_CHANNELS - 3, NDARRAY_MAX_ATTENTION_DIM);
        assert!(nca_ndarray::NdarrayTrainer::new(&edge, &optimizer).is_ok());
        Backend::Ndarray.check_model(&edge).expect("at the limit");
        for over in [
            model(NDARRAY_MAX_CHANNELS - 2, 16),
            model(0, NDARRAY_MAX_ATTENTION_DIM + 1),
        ] {
            assert!(nca_ndarray::NdarrayTrainer::new(&over, &optimizer).is_err());
            let err = Backend::Ndarray
                .check_model(&over)
                .expect_err("over the limit");
            assert!(format!("{err}").contains("model."), "{err}");
        }
    }
}
