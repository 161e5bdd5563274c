//! Harnesses shared by this crate's test files: candle on the CPU and on CUDA device 0,
//! and nca-ndarray as the reference other backend.

// Each test file uses its own subset of these.
#![allow(dead_code)]

use nca_api::{ModelConfig, OptimizerConfig};
use nca_candle::{CandleTrainer, Error};
use nca_testkit::Harness;

/// candle on `Device::Cpu`.
pub struct CandleCpu;

impl Harness for CandleCpu {
    type Backend = CandleTrainer;

    fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<CandleTrainer, Error> {
        CandleTrainer::cpu(model, optim)
    }
}

/// candle on CUDA device 0.
#[cfg(feature = "cuda")]
pub struct CandleCuda;

#[cfg(feature = "cuda")]
impl Harness for CandleCuda {
    type Backend = CandleTrainer;

    fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<CandleTrainer, Error> {
        CandleTrainer::cuda(model, optim, 0)
    }
}

/// The default backend, which the others must agree with.
pub struct Ndarray;

impl Harness for Ndarray {
    type Backend = nca_ndarray::NdarrayTrainer;

    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<nca_ndarray::NdarrayTrainer, nca_ndarray::Error> {
        nca_ndarray::NdarrayTrainer::new(model, optim)
    }
}
