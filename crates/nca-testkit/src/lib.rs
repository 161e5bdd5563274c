//! The conformance suite every `nca` backend runs unchanged.
//!
//! A backend's `tests/conformance.rs` implements [`Harness`] (how to build its trainer)
//! and invokes [`conformance_tests!`] once; every check below then runs against it:
//!
//! ```ignore
//! struct Cpu;
//! impl nca_testkit::Harness for Cpu {
//!     type Backend = my_backend::MyTrainer;
//!     fn create(model: &nca_api::ModelConfig, optim: &nca_api::OptimizerConfig)
//!         -> Result<Self::Backend, my_backend::Error> { my_backend::MyTrainer::new(model, optim) }
//! }
//! nca_testkit::conformance_tests!(Cpu);
//! ```
#![warn(missing_docs)]
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed check

pub mod checks;
pub mod cross;
pub mod reference;

use std::path::PathBuf;

use nca_api::{ModelConfig, OptimizerConfig, Trainer, Transition};

/// How a backend under test is built.
pub trait Harness {
    /// The backend's trainer.
    type Backend: Trainer;

    /// A trainer for `model` with Adam settings `optim`; weights are set by the checks.
    fn create(
        model: &ModelConfig,
        optim: &OptimizerConfig,
    ) -> Result<Self::Backend, <Self::Backend as Transition>::Error>;
}

/// Relative + absolute float tolerance: `|a − b| ≤ abs + rel·|b|`.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Absolute part.
    pub abs: f64,
    /// Relative part (of the expected value).
    pub rel: f64,
}

impl Tolerance {
    /// Forward values against the golden vectors (testdata/README.md): 1e-5 absolute.
    pub const FORWARD: Self = Self {
        abs: 1e-5,
        rel: 0.0,
    };
    /// Gradients against the golden vectors: 1e-4 relative or 1e-5 absolute.
    pub const GRADIENT: Self = Self {
        abs: 1e-5,
        rel: 1e-4,
    };

    /// Whether `actual` is within tolerance of `expected`.
    pub fn accepts(&self, actual: f64, expected: f64) -> bool {
        (actual - expected).abs() <= self.abs + self.rel * expected.abs()
    }

    /// Panics naming `what` and the worst element unless every pair is within tolerance.
    pub fn assert_close(&self, what: &str, actual: &[f32], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len(), "{what}: length differs");
        let mut worst: Option<(usize, f64)> = None;
        for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
            let excess = (f64::from(a) - e).abs() - (self.abs + self.rel * e.abs());
            if (excess > 0.0 || excess.is_nan())
                && worst.is_none_or(|(_, w)| excess > w || excess.is_nan())
            {
                worst = Some((i, excess));
            }
        }
        if let Some((i, _)) = worst {
            panic!(
                "{what}: element {i} is {} but expected {} (tolerance {:?})",
                actual[i], expected[i], self
            );
        }
    }
}

/// Directory of the repository's test data (golden vectors).
pub fn testdata_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata"))
}

/// Instantiates every conformance check as a `#[test]` for a [`Harness`].
///
/// Extra attributes after the harness (for instance
/// `#[ignore = "needs a CUDA GPU"]`) are put on every generated test.
#[macro_export]
macro_rules! conformance_tests {
    ($harness:ty $(, #[$attr:meta])* $(,)?) => {
        $crate::conformance_tests!(@each $harness [$(#[$attr])*]
            golden_6x7_without_position_embeddings,
            golden_5x5_with_position_embeddings,
            golden_4x9_with_hidden_channels,
            golden_5x6_with_position_inputs_and_mlp,
            golden_4x7_with_position_inputs,
            golden_6x5_with_mlp,
            golden_1x8_with_position_inputs_and_mlp,
            shape_and_attention_normalisation_5x5,
            noise_statistics,
            finite_difference_gradients,
            directional_gradients_on_a_large_grid,
            train_step_is_one_adam_update,
            gradient_clipping_bounds_the_update,
            solid_red_converges,
            solid_red_converges_with_the_default_model,
            a_real_picture_grows_from_noise,
            spike_moves_carried_state_by_sigma_large,
            spike_rules_reset_and_scale_the_carried_state,
            set_learning_rate_changes_the_next_update,
            same_seed_same_losses,
            hidden_channels_do_not_enter_the_loss,
            weights_and_adam_state_round_trip,
            wrong_shapes_are_errors,
        );
    };
    (@each $harness:ty [$($attr:tt)*] $check:ident, $($rest:ident,)*) => {
        #[test]
        $($attr)*
        fn $check() {
            $crate::checks::$check::<$harness>();
        }
        $crate::conformance_tests!(@each $harness [$($attr)*] $($rest,)*);
    };
    (@each $harness:ty [$($attr:tt)*]) => {};
}
