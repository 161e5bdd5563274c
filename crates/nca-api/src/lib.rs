//! Backend-agnostic core of `nca`, a toolkit for Neural Cellular Automata whose rule is a
//! 3×3 convolutional attention.
//!
//! * [`HostTensor`] and [`Weights`]: plain tensors for states, targets and parameters, with
//!   safetensors I/O under the names of `testdata/README.md`; [`Param`] names each
//!   parameter (its file name, shape and initialisation), checked by the compiler.
//! * [`Transition`], [`Trainer`], [`NoiseSchedule`]: what a backend implements.
//! * [`train()`] and [`rollout()`]: the single-trajectory training loop and the rollout
//!   loop, written once over those traits.
//! * [`NcaConfig`]: serde config with the original design's defaults and validation.
//! * [`Checkpoint`]: weights, optimiser state, progress and state in one file.
//! * [`MemoryLimit`], [`training_bytes`]: what a command may allocate and what a run needs.
#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod io;
pub mod memory;
pub mod noise;
pub mod optim;
pub mod position;
pub mod tensor;
pub mod train;
pub mod traits;
pub mod weights;

pub use checkpoint::{Checkpoint, ResumeError, ResumeNote};
pub use config::{
    GridConfig, Init, LrSchedule, ModelConfig, NcaConfig, NoiseConfig, OptimizerConfig, Param,
    SizedDefaults, SpikeKind, SpikeRule, SpikeThreshold, TrainingConfig, DEFAULT_GRAD_CLIP,
    DEFAULT_LEARNING_RATE, MAX_MLP_HIDDEN, MAX_POSITION_OCTAVES, NEIGHBOURS, SIZED_EMA_DECAY,
};
pub use error::{ConfigError, IoError, MemoryError, TensorError, TrainError};
pub use eval::{psnr_db, regrowth, RegrowthOptions, RegrowthScore, SeedScore};
pub use io::TensorFile;
pub use memory::{rollout_bytes, training_bytes, training_resident_bytes, MemoryLimit};
pub use noise::ConstantNoise;
pub use optim::FlatAdam;
pub use tensor::HostTensor;
pub use train::{
    initial_noise, initial_state, rollout, start, train, Evaluation, LoopOptions, NoObserver,
    Observer, Progress, RolloutOptions, StepContext, StepInfo, StopReason, TrainOutcome,
};
pub use traits::{AdamState, NoiseSchedule, Trainer, Transition};
pub use weights::{FlatLayout, ParamSpec, Weights, WEIGHT_NAMES};
