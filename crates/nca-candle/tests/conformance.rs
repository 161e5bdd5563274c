//! The shared conformance suite on candle's CPU device, and on CUDA with `--features cuda`.

use nca_api::{ModelConfig, OptimizerConfig};
use nca_candle::{CandleTrainer, Error};

// `nca_testkit::conformance_tests!` does not expand at the moment: its `@each` arm uses the
// depth-1 `$attr` inside the `$check` repetition, which rustc rejects ("meta-variable
// `attr` repeats 0 times, but `check` repeats 14 times"). Until the testkit is fixed, this
// local macro instantiates the same checks in the same way (one `#[test]` per check,
// extra attributes on each).
macro_rules! conformance_tests {
    ($harness:ty $(, #[$attr:meta])* $(,)?) => {
        conformance_tests!(@each $harness, [$(#[$attr])*],
            golden_6x7_without_position_embeddings,
            golden_5x5_with_position_embeddings,
            golden_4x9_with_hidden_channels,
            shape_and_attention_normalisation_5x5,
            noise_statistics,
            finite_difference_gradients,
            train_step_is_one_adam_update,
            gradient_clipping_bounds_the_update,
            solid_red_converges,
            spike_moves_carried_state_by_sigma_large,
            no_spike_when_epsilon_is_zero,
            same_seed_same_losses,
            hidden_channels_do_not_enter_the_loss,
            weights_and_adam_state_round_trip,
        );
    };
    (@each $harness:ty, $attrs:tt, $($check:ident),* $(,)?) => {
        $( conformance_tests!(@one $harness, $attrs, $check); )*
    };
    (@one $harness:ty, [$(#[$attr:meta])*], $check:ident) => {
        #[test]
        $(#[$attr])*
        fn $check() {
            nca_testkit::checks::$check::<$harness>();
        }
    };
}

struct CpuHarness;

impl nca_testkit::Harness for CpuHarness {
    type Backend = CandleTrainer;

    fn create(model: &ModelConfig, optim: &OptimizerConfig) -> Result<CandleTrainer, Error> {
        CandleTrainer::cpu(model, optim)
    }
}

conformance_tests!(CpuHarness);

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

    conformance_tests!(
        CudaHarness,
        #[ignore = "needs an NVIDIA GPU: run with --ignored on a CUDA machine"]
    );
}
