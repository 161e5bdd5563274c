//! How much memory a command may use, and how much a run of a config will need.
//!
//! A request that passes the allocator but exceeds physical memory does not fail: it
//! swaps or is killed with the machine it takes down. So every command estimates what it
//! will allocate *before* allocating it and refuses what exceeds a [`MemoryLimit`].
//!
//! # The limit
//! * `$NCA_MEMORY_LIMIT` when set: a byte count with an optional binary suffix, case
//!   insensitive (`1500000000`, `512m`, `512MiB`, `8G`, `8GiB`, `1T`). Zero or anything
//!   else is an error naming the variable, never silently ignored.
//! * Otherwise half of physical memory (`MemTotal` in `/proc/meminfo`): the other half is
//!   left to the system, the page cache and a second command running beside this one.
//! * Where physical memory cannot be read (not Linux), 8 GiB.
//!
//! # What is counted
//! [`training_bytes`] counts, for a `B × H × W` grid of `C = V + hidden` channels with
//! `P` position features, attention width `D` and MLP width `M`:
//! * per cell: the state, the target, the position features, and the workspace of the
//!   largest CPU backend (dfdx and candle materialise the nine shifted neighbourhoods of
//!   every cell's input, the keys, values and scores of every neighbour, the MLP's hidden
//!   layer, and keep all of it on the autodiff tape with its gradients);
//! * per parameter: the weights, their gradients and Adam's two moments, plus the flat
//!   copies a host backend and a checkpoint hold;
//! * a fixed allowance for the program itself.
//!
//! [`rollout_bytes`] counts the same without the tape, gradients or Adam. Both are
//! deliberately generous (the measurements they were checked against are in the source,
//! beside the workspace factors): refusing a run that would have fit costs a re-run with a larger
//! `$NCA_MEMORY_LIMIT`, admitting one that does not fit can cost the machine.

use crate::config::{ModelConfig, NcaConfig, NEIGHBOURS};
pub use crate::error::{format_bytes, MemoryError};

/// Bytes in one GiB, for messages and defaults.
const GIB: u64 = 1 << 30;

/// The limit where physical memory is unknown.
const UNKNOWN_PHYSICAL_LIMIT: u64 = 8 * GIB;

/// Bytes one command may allocate: `$NCA_MEMORY_LIMIT` (e.g. `8G`, `512M`, `1500000000`)
/// or, without it, half of physical memory (`/proc/meminfo` `MemTotal`; 8 GiB where unknown).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLimit {
    /// The limit in bytes.
    pub bytes: u64,
    /// Where the limit came from, for messages: `NCA_MEMORY_LIMIT` or
    /// `half of 24.0 GiB physical memory`.
    pub source: String,
}

impl MemoryLimit {
    /// The environment variable that overrides the default limit.
    pub const ENV: &'static str = "NCA_MEMORY_LIMIT";

    /// The limit from `$NCA_MEMORY_LIMIT`, else half of physical memory; a malformed
    /// variable is an error naming it.
    pub fn from_env() -> Result<Self, MemoryError> {
        let value = std::env::var_os(Self::ENV).map(|v| v.to_string_lossy().into_owned());
        let physical = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total(&text));
        Self::from_setting(value.as_deref(), physical)
    }

    /// A limit of `bytes`, for tests and callers that choose their own.
    pub fn new(bytes: u64) -> Self {
        Self {
            bytes,
            source: "set by the caller".into(),
        }
    }

    /// `Ok` if `need` bytes fit; else an error "WHAT needs N GiB, more than the memory
    /// limit of L GiB (SOURCE); HINT". `None` means the estimate overflowed.
    pub fn check(&self, what: &str, need: Option<u64>, hint: &str) -> Result<(), MemoryError> {
        match need {
            Some(need) if need <= self.bytes => Ok(()),
            Some(need) => Err(MemoryError::TooLarge {
                what: what.into(),
                need,
                limit: self.bytes,
                limit_from: self.source.clone(),
                hint: hint.into(),
            }),
            None => Err(MemoryError::Overflow {
                what: what.into(),
                limit: self.bytes,
                limit_from: self.source.clone(),
                hint: hint.into(),
            }),
        }
    }

    /// The limit from the variable's value (if set) and physical memory (if known).
    fn from_setting(value: Option<&str>, physical: Option<u64>) -> Result<Self, MemoryError> {
        if let Some(value) = value {
            return match parse_size(value) {
                Some(bytes) if bytes > 0 => Ok(Self {
                    bytes,
                    source: Self::ENV.into(),
                }),
                _ => Err(MemoryError::BadLimit {
                    variable: Self::ENV.into(),
                    value: value.into(),
                }),
            };
        }
        Ok(match physical {
            Some(total) if total > 0 => Self {
                bytes: total / 2,
                source: format!("half of {} physical memory", format_bytes(total)),
            },
            _ => Self {
                bytes: UNKNOWN_PHYSICAL_LIMIT,
                source: "physical memory unknown, default 8.0 GiB".into(),
            },
        })
    }
}

/// Parses `8G`, `8GiB`, `512m`, `1500000000` (binary suffixes, any case) into bytes;
/// `None` for anything else or a value that overflows u64.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let number: u64 = digits.parse().ok()?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    number.checked_mul(1u64 << shift)
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// Allowance for the program, its libraries and the allocator's slack, whatever the grid.
const FIXED_BYTES: u64 = 64 << 20;

/// Multiplier on the per-cell workspace of one training step, covering the CPU backends'
/// autodiff tape (every intermediate kept for the backward pass, plus its gradient) and
/// allocator fragmentation.
///
/// Calibrated against the peak RSS (`/usr/bin/time -v`, "Maximum resident set size", in
/// MB = 10⁶ bytes) of two training steps on solid-red targets, default picture model and
/// plain model (C = 3, D = 16), release build, on the 24 GiB dev machine; the ndarray
/// column from `profile_step -- SIZE 8 3 MODEL` (3 steps), the others from a throwaway
/// example calling `DfdxTrainer::new` / `CandleTrainer::cpu` the same way:
///
/// | grid, model | ndarray | dfdx | candle (CPU) | this estimate |
/// |---|---|---|---|---|
/// | 128×128×8 picture | 13.4 | 1,291 | 1,746 | 2,497 |
/// | 128×128×8 plain | 28.0 | 637 | 375 | 1,455 |
/// | 256×256×8 picture | 34.9 | 5,151 | 6,835 | 9,786 |
/// | 256×256×8 plain | 98.7 | 2,537 | 1,432 | 5,620 |
///
/// The sized 256×256 picture model (L = 8, M = 512, batch 1), whole runs of two training
/// steps and a five-step regrowth score (`nca-cli --backend B`, peak RSS in MB): ndarray
/// 100; dfdx 1,332; candle 1,684 with a score of one start, 1,977 with three (the
/// default), 4,510 with eight. The estimates: 2,166 for training, 3,312 for training's
/// resident part plus a three-start score ([`rollout_bytes`]), 8,586 with eight starts.
///
/// ndarray works tile by tile and needs little; candle's picture model is the largest at
/// 13.0 KB per cell, dfdx's 9.8 KB. With a factor of 4 the estimate is 18.5 KB per cell
/// for the picture model (1.4× candle) and 10.6 KB for the plain one (2.2× dfdx), while
/// 256×256×8, the largest benchmark workload, still fits a 12 GiB limit.
const TRAINING_WORKSPACE_FACTOR: u64 = 4;

/// Multiplier for running the rule without gradients: activations of one step are freed
/// before the next, so only allocator slack is added.
const ROLLOUT_WORKSPACE_FACTOR: u64 = 2;

/// Floats one cell needs in the forward pass of the largest CPU backend: the nine shifted
/// copies of its input `[state; position]`, keys and values per neighbour (with their
/// position embeddings added), the query, nine scores and nine attention weights, the
/// attended vector, the MLP's hidden layer (pre- and post-activation) and the update.
fn workspace_floats_per_cell(model: &ModelConfig) -> Option<u64> {
    let c = u64::try_from(model.channels()).ok()?;
    let p = u64::try_from(model.position_features()).ok()?;
    let d = u64::try_from(model.attention_dim).ok()?;
    let m = u64::try_from(model.mlp_hidden.unwrap_or(0)).ok()?;
    let n = NEIGHBOURS as u64;
    let shifted_inputs = n.checked_mul(c.checked_add(p)?)?;
    let keys_values = n.checked_mul(d)?.checked_mul(4)?;
    let query_attended = d.checked_mul(2)?;
    let scores = n.checked_mul(2)?;
    let mlp = m.checked_mul(2)?;
    let update = c.checked_mul(2)?;
    shifted_inputs
        .checked_add(keys_values)?
        .checked_add(query_attended)?
        .checked_add(scores)?
        .checked_add(mlp)?
        .checked_add(update)
}

/// The floats every cell holds across steps: state, next state, target, position
/// features (kept per trajectory by some backends) and the loss gradient of the state.
fn resident_floats_per_cell(model: &ModelConfig) -> Option<u64> {
    let c = u64::try_from(model.channels()).ok()?;
    let v = u64::try_from(model.visible_channels).ok()?;
    let p = u64::try_from(model.position_features()).ok()?;
    c.checked_mul(3)?.checked_add(v)?.checked_add(p)
}

/// Number of cells `B·H·W` of a grid of `batch` trajectories.
fn cells(config: &NcaConfig, batch: usize) -> Option<u64> {
    let b = u64::try_from(batch).ok()?;
    let h = u64::try_from(config.grid.height).ok()?;
    let w = u64::try_from(config.grid.width).ok()?;
    b.checked_mul(h)?.checked_mul(w)
}

/// Conservative estimate of the bytes a training run of `config` needs on any backend
/// (state, target, position features, weights, gradients, Adam moments and the per-cell
/// workspace of the largest CPU backend); `None` when the arithmetic overflows u64.
pub fn training_bytes(config: &NcaConfig) -> Option<u64> {
    let workspace = cells(config, config.grid.batch)?
        .checked_mul(workspace_floats_per_cell(&config.model)?)?
        .checked_mul(TRAINING_WORKSPACE_FACTOR)?
        .checked_mul(4)?;
    training_resident_bytes(config)?.checked_add(workspace)
}

/// Conservative estimate of the bytes a training run of `config` holds between steps
/// (state, target, position features, weights, gradients and Adam moments); `None` when
/// the arithmetic overflows u64.
///
/// What a step adds on top of this, its autodiff tape and activations, is freed when the
/// step ends on dfdx and candle, and is a few tiles' worth on ndarray, so a regrowth
/// score run after (or between) training steps needs this plus [`rollout_bytes`], not
/// [`training_bytes`] plus [`rollout_bytes`].
pub fn training_resident_bytes(config: &NcaConfig) -> Option<u64> {
    let model = &config.model;
    // Weights, gradients, two Adam moments, and flat copies of each in a host backend
    // and in a checkpoint being written; with a moving average, the average, the latest
    // weights copied out beside it, the copy in the loop's progress and the checkpoint's
    // training weights.
    let per_parameter = if config.training.ema_decay.is_some() {
        12u64
    } else {
        8
    };
    let floats = cells(config, config.grid.batch)?
        .checked_mul(resident_floats_per_cell(model)?)?
        .checked_add(model.parameter_count()?.checked_mul(per_parameter)?)?;
    floats.checked_mul(4)?.checked_add(FIXED_BYTES)
}

/// Conservative estimate of the bytes running the rule of `config` without training
/// (rollout, regrowth score) needs with `batch` grids; `None` when it overflows u64.
pub fn rollout_bytes(config: &NcaConfig, batch: usize) -> Option<u64> {
    let model = &config.model;
    let per_cell = workspace_floats_per_cell(model)?
        .checked_mul(ROLLOUT_WORKSPACE_FACTOR)?
        .checked_add(resident_floats_per_cell(model)?)?;
    let floats = cells(config, batch)?
        .checked_mul(per_cell)?
        .checked_add(model.parameter_count()?.checked_mul(2)?)?;
    floats.checked_mul(4)?.checked_add(FIXED_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GridConfig;

    #[test]
    fn sizes_parse_with_binary_suffixes_in_any_case() {
        assert_eq!(parse_size("1500000000"), Some(1_500_000_000));
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("8GiB"), Some(8 << 30));
        assert_eq!(parse_size("8gb"), Some(8 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size(" 64 KiB "), Some(64 << 10));
        assert_eq!(parse_size("2T"), Some(2 << 40));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("8X"), None);
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("-1"), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn the_variable_overrides_and_bad_values_name_it() {
        let limit = MemoryLimit::from_setting(Some("512M"), Some(24 * GIB)).expect("valid");
        assert_eq!(limit.bytes, 512 << 20);
        assert_eq!(limit.source, "NCA_MEMORY_LIMIT");
        for bad in ["0", "garbage", "", "12Q"] {
            let err = MemoryLimit::from_setting(Some(bad), Some(24 * GIB))
                .expect_err("a bad limit is refused");
            assert!(err.to_string().starts_with("NCA_MEMORY_LIMIT="), "{err}");
        }
    }

    #[test]
    fn the_default_is_half_of_physical_memory() {
        let limit = MemoryLimit::from_setting(None, Some(24 * GIB)).expect("default");
        assert_eq!(limit.bytes, 12 * GIB);
        assert_eq!(limit.source, "half of 24.0 GiB physical memory");
        let unknown = MemoryLimit::from_setting(None, None).expect("default");
        assert_eq!(unknown.bytes, 8 * GIB);
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(meminfo), Some(24_576_000 * 1024));
        assert_eq!(mem_total("nothing"), None);
    }

    #[test]
    fn check_says_what_needs_how_much_and_what_to_change() {
        let limit = MemoryLimit::new(GIB);
        limit
            .check("x", Some(GIB), "h")
            .expect("exactly the limit fits");
        let err = limit
            .check(
                "training on grid 100000x100000",
                Some(3 * GIB),
                "lower grid.height",
            )
            .expect_err("too large");
        assert_eq!(
            err.to_string(),
            "training on grid 100000x100000 needs 3.0 GiB, more than the memory limit of \
             1.0 GiB (set by the caller); lower grid.height"
        );
        let err = limit.check("x", None, "h").expect_err("overflow");
        assert!(err.to_string().contains("overflows"), "{err}");
    }

    fn config(height: usize, width: usize, batch: usize, model: ModelConfig) -> NcaConfig {
        NcaConfig {
            grid: GridConfig {
                height,
                width,
                batch,
            },
            model,
            ..NcaConfig::default()
        }
    }

    #[test]
    fn ordinary_runs_fit_and_hostile_sizes_do_not() {
        let twelve = MemoryLimit::new(12 * GIB);
        let big_picture = config(256, 256, 8, ModelConfig::default());
        twelve
            .check("256x256x8", training_bytes(&big_picture), "")
            .expect("the largest benchmark workload fits in 12 GiB");
        for hostile in [
            config(100_000, 100_000, 1, ModelConfig::default()),
            config(32, 32, 1_000_000_000, ModelConfig::default()),
            config(1, 100_000_000, 1, ModelConfig::plain()),
        ] {
            assert!(
                twelve.check("x", training_bytes(&hostile), "").is_err(),
                "{:?}",
                hostile.grid
            );
            assert!(twelve
                .check("x", rollout_bytes(&hostile, hostile.grid.batch), "")
                .is_err());
        }
        let overflowing = config(usize::MAX, usize::MAX, usize::MAX, ModelConfig::default());
        assert_eq!(training_bytes(&overflowing), None);
        assert_eq!(rollout_bytes(&overflowing, 1), None);
        let wide = ModelConfig {
            hidden_channels: usize::MAX - 3,
            ..ModelConfig::default()
        };
        assert_eq!(training_bytes(&config(1, 1, 1, wide)), None);
    }

    #[test]
    fn a_moving_average_counts_its_copies_of_the_weights() {
        let plain = config(64, 64, 1, ModelConfig::default());
        let mut averaged = plain.clone();
        averaged.training.ema_decay = Some(0.995);
        let params = plain.model.parameter_count().expect("small model");
        assert_eq!(
            training_resident_bytes(&averaged),
            training_resident_bytes(&plain).map(|b| b + 4 * 4 * params)
        );
    }

    #[test]
    fn the_estimate_covers_every_measured_backend() {
        // Peak RSS in bytes measured on the largest CPU backend for each (see
        // TRAINING_WORKSPACE_FACTOR).
        for (side, model, measured) in [
            (128, ModelConfig::default(), 1_746_000_000u64),
            (128, ModelConfig::plain(), 637_000_000),
            (256, ModelConfig::default(), 6_835_000_000),
            (256, ModelConfig::plain(), 2_537_000_000),
        ] {
            let need = training_bytes(&config(side, side, 8, model)).expect("no overflow");
            assert!(
                need >= measured * 13 / 10,
                "{side}: {need} < 1.3 x {measured}"
            );
        }
    }

    #[test]
    fn a_score_after_training_is_covered_on_every_measured_backend() {
        // Peak RSS of the sized 256×256 model's whole run on candle, the hungriest, with
        // a score of 1, 3 and 8 starts (see TRAINING_WORKSPACE_FACTOR). With one start
        // the training step is the peak, and the 512-wide MLP leaves the estimate 1.29×
        // candle's (1.4× at the default M = 128), hence 1.25 here.
        let model = ModelConfig {
            position_octaves: Some(8),
            mlp_hidden: Some(512),
            ..ModelConfig::default()
        };
        let run = config(256, 256, 1, model);
        for (seeds, measured) in [
            (1, 1_684_000_000u64),
            (3, 1_977_000_000),
            (8, 4_510_000_000),
        ] {
            let need = training_resident_bytes(&run)
                .and_then(|r| r.checked_add(rollout_bytes(&run, seeds)?))
                .expect("no overflow");
            let need = need.max(training_bytes(&run).expect("no overflow"));
            assert!(
                need >= measured * 5 / 4,
                "{seeds} starts: {need} < 1.25 x {measured}"
            );
        }
    }

    #[test]
    fn every_example_run_fits_easily() {
        // The largest grids of examples/*.ron: 32x32 with batch 2, default picture model.
        let largest_example = config(32, 32, 2, ModelConfig::default());
        let need = training_bytes(&largest_example).expect("no overflow");
        assert!(need < 256 << 20, "{}", format_bytes(need));
        MemoryLimit::new(GIB)
            .check("examples", Some(need), "")
            .expect("fits in 1 GiB");
    }

    #[test]
    fn training_needs_more_than_rolling_out_and_grows_with_the_grid() {
        let small = config(32, 32, 1, ModelConfig::default());
        let large = config(64, 64, 1, ModelConfig::default());
        let (Some(s), Some(l)) = (training_bytes(&small), training_bytes(&large)) else {
            panic!("small grids do not overflow");
        };
        assert!(l > s);
        assert!(rollout_bytes(&small, 1) < Some(s));
    }
}
