//! Choosing a backend at run time among those compiled in.
//!
//! All run logic is generic over [`nca_api::Trainer`] ([`Job`]); [`dispatch`] is the one
//! place that names backend types, each arm behind its cargo feature. A backend that was
//! not compiled in is a clear runtime error saying which feature to enable.

use std::fmt;
use std::str::FromStr;

use nca_api::{ModelConfig, OptimizerConfig, Trainer};

use crate::error::{invalid, Error, Result, ResultExt};

/// A backend that computes the rule: the names `--backend` and `backend=` take.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = Error;

    /// Parses a backend name (`ndarray`, `dfdx`, `candle`, `candle-cuda`), whether or not
    /// it is compiled in; [`Backend::check_model`] says when it is not.
    fn from_str(name: &str) -> Result<Self> {
        Backend::ALL
            .into_iter()
            .find(|b| b.name() == name)
            .ok_or_else(|| {
                let names: Vec<&str> = Backend::ALL.iter().map(|b| b.name()).collect();
                invalid!(
                    "unknown backend `{name}`; expected one of {}",
                    names.join(", ")
                )
            })
    }
}

impl Backend {
    /// Every backend this crate knows, compiled in or not.
    pub const ALL: [Backend; 4] = [
        Backend::Ndarray,
        Backend::Dfdx,
        Backend::Candle,
        Backend::CandleCuda,
    ];

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
                return Err(invalid!(
                    "invalid config field `model.hidden_channels`: the ndarray backend supports \
                     at most {NDARRAY_MAX_CHANNELS} channels in all (visible + hidden), found \
                     {} + {} = {channels}; lower model.hidden_channels to at most {}",
                    model.visible_channels,
                    model.hidden_channels,
                    NDARRAY_MAX_CHANNELS.saturating_sub(model.visible_channels)
                ));
            }
            if model.attention_dim > NDARRAY_MAX_ATTENTION_DIM {
                return Err(invalid!(
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
            let t = nca_ndarray::NdarrayTrainer::new(model, optimizer)
                .map_err(Error::backend)
                .with_context(ctx)?;
            job.run(t, backend)
        }
        #[cfg(feature = "dfdx")]
        Backend::Dfdx => {
            let t = nca_dfdx::DfdxTrainer::new(model, optimizer)
                .map_err(Error::backend)
                .with_context(ctx)?;
            job.run(t, backend)
        }
        #[cfg(feature = "candle")]
        Backend::Candle => {
            let t = nca_candle::CandleTrainer::cpu(model, optimizer)
                .map_err(Error::backend)
                .with_context(ctx)?;
            job.run(t, backend)
        }
        #[cfg(feature = "candle-cuda")]
        Backend::CandleCuda => {
            let t = nca_candle::CandleTrainer::cuda(model, optimizer, 0)
                .map_err(Error::backend)
                .with_context(ctx)?;
            job.run(t, backend)
        }
        #[allow(unreachable_patterns)]
        other => Err(not_compiled(other)),
    }
}

/// The error for a backend this binary was built without.
pub fn not_compiled(backend: Backend) -> Error {
    Error::NotCompiled {
        name: backend.name(),
        feature: backend.feature().unwrap_or("?"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_unknown_names_list_the_known_ones() {
        for b in Backend::ALL {
            assert_eq!(b.name().parse::<Backend>().ok(), Some(b));
        }
        let err = "cuda".parse::<Backend>().expect_err("unknown");
        assert!(
            err.to_string()
                .contains("ndarray, dfdx, candle, candle-cuda"),
            "{err}"
        );
    }

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
