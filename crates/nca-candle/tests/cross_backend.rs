//! A checkpoint trained on candle rolls out to the same state on nca-ndarray, and the
//! other way round (the check lives in `nca_testkit::cross`); on CUDA too with
//! `--features cuda` (ignored without a GPU).

mod common;

use common::{CandleCpu, Ndarray};
use nca_testkit::cross::{checkpoint_rolls_out_identically, training_matches};

#[test]
fn candle_checkpoint_rolls_out_the_same_on_ndarray() {
    checkpoint_rolls_out_identically::<CandleCpu, Ndarray>();
}

#[test]
fn training_on_candle_matches_training_on_ndarray() {
    training_matches::<CandleCpu, Ndarray>();
}

#[test]
fn ndarray_checkpoint_rolls_out_the_same_on_candle() {
    checkpoint_rolls_out_identically::<Ndarray, CandleCpu>();
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::common::{CandleCuda, Ndarray};
    use nca_testkit::cross::checkpoint_rolls_out_identically;

    #[test]
    #[ignore = "needs an NVIDIA GPU: run with --ignored on a CUDA machine"]
    fn cuda_checkpoint_rolls_out_the_same_on_ndarray() {
        checkpoint_rolls_out_identically::<CandleCuda, Ndarray>();
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU: run with --ignored on a CUDA machine"]
    fn ndarray_checkpoint_rolls_out_the_same_on_cuda() {
        checkpoint_rolls_out_identically::<Ndarray, CandleCuda>();
    }
}
