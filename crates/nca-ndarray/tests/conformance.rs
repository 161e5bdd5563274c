//! The shared conformance suite, run against the ndarray backend.

use nca_api::{ModelConfig, OptimizerConfig};
use nca_ndarray::{Error, NdarrayTrainer};

struct Ndarray;

impl nca_testkit::Harness for Ndarray {
    type Backend = NdarrayTrainer;

    fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<NdarrayTrainer, Error> {
        NdarrayTrainer::new(model, optim)
    }
}

nca_testkit::conformance_tests!(Ndarray);
