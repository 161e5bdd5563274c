//! The shared conformance suite run against the dfdx backend.

use nca_api::{ModelConfig, OptimizerConfig};
use nca_dfdx::{DfdxTrainer, Error};

struct Dfdx;

impl nca_testkit::Harness for Dfdx {
    type Backend = DfdxTrainer;

    fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<DfdxTrainer, Error> {
        DfdxTrainer::new(model, optim)
    }
}

nca_testkit::conformance_tests!(Dfdx);
