//! The shared conformance suite on candle's CPU device, and on CUDA with `--features cuda`.

mod common;

use common::CandleCpu;

nca_testkit::conformance_tests!(CandleCpu);

#[cfg(feature = "cuda")]
mod cuda {
    use super::common::CandleCuda;

    nca_testkit::conformance_tests!(
        CandleCuda,
        #[ignore = "needs an NVIDIA GPU: run with --ignored on a CUDA machine"]
    );
}
