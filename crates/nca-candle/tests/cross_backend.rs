//! A checkpoint trained on candle rolls out to the same state on nca-ndarray, and the
//! other way round (the check lives in `nca_testkit::cross`).

use nca_api::{ModelConfig, OptimizerConfig};
use nca_testkit::cross::checkpoint_rolls_out_identically;
use nca_testkit::Harness;

struct CandleCpu;

impl Harness for CandleCpu {
    type Backend = nca_candle::CandleTrainer;

    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<nca_candle::CandleTrainer, nca_candle::Error> {
        nca_candle::CandleTrainer::cpu(model, optim)
    }
}

struct Ndarray;

impl Harness for Ndarray {
    type Backend = nca_ndarray::NdarrayTrainer;

    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<nca_ndarray::NdarrayTrainer, nca_ndarray::Error> {
        nca_ndarray::NdarrayTrainer::new(model, optim)
    }
}

#[test]
fn candle_checkpoint_rolls_out_the_same_on_ndarray() {
    checkpoint_rolls_out_identically::<CandleCpu, Ndarray>();
}

#[test]
fn ndarray_checkpoint_rolls_out_the_same_on_candle() {
    checkpoint_rolls_out_identically::<Ndarray, CandleCpu>();
}
