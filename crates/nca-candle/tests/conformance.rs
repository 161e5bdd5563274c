//! The shared conformance suite on candle's CPU device, and on CUDA with `--features cuda`.

use nca_api::{ModelConfig, OptimizerConfig};
use nca_candle::{CandleTrainer, Error};

struct CpuHarness;

impl nca_testkit::Harness for CpuHarness {
    type Backend = CandleTrainer;

    fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<CandleTrainer, Error> {
        CandleTrainer::cpu(model, optim)
    }
}

nca_testkit::conformance_tests!(CpuHarness);

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;

    struct CudaHarness;

    impl nca_testkit::Harness for CudaHarness {
        type Backend = CandleTrainer;

        fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<CandleTrainer, Error> {
            CandleTrainer::cuda(model, optim, 0)
        }
    }

    nca_testkit::conformance_tests!(
        CudaHarness,
        #[ignore = "needs an NVIDIA GPU: run with --ignored on a CUDA machine"]
    );
}
