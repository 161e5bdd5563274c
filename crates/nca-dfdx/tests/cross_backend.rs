//! A checkpoint trained on dfdx rolls out to the same state on nca-ndarray, and the
//! other way round (the check lives in `nca_testkit::cross`).

use nca_api::{ModelConfig, OptimizerConfig};
use nca_testkit::cross::checkpoint_rolls_out_identically;
use nca_testkit::Harness;

struct Dfdx;

impl Harness for Dfdx {
    type Backend = nca_dfdx::DfdxTrainer;

    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<nca_dfdx::DfdxTrainer, nca_dfdx::Error> {
        nca_dfdx::DfdxTrainer::new(model, optim)
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
fn dfdx_checkpoint_rolls_out_the_same_on_ndarray() {
    checkpoint_rolls_out_identically::<Dfdx, Ndarray>();
}

#[test]
fn ndarray_checkpoint_rolls_out_the_same_on_dfdx() {
    checkpoint_rolls_out_identically::<Ndarray, Dfdx>();
}
