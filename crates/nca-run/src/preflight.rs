//! Preflight: what a command will allocate and draw, checked before anything is written.
//!
//! A run that fails after its directory exists leaves files behind and needs `--force` to
//! rerun; one that asks the allocator for more than the machine has aborts (or, between
//! the limit and physical memory, takes the machine down). So every size is computed
//! first, in checked arithmetic, and compared with the [`MemoryLimit`] and the drawing
//! limits (32-bit picture sides, 16-bit GIF sides) and the backend's own limits. Each
//! refusal says how much would be needed, the limit and where it came from, and which
//! field or flag to change.
//!
//! The estimates are deliberately generous: nca-api's [`training_bytes`] and
//! [`rollout_bytes`] for the model, plus every picture and every state a command keeps in
//! memory at once. The regrowth score runs between training steps, so it is counted on
//! top of what training holds between steps ([`training_resident_bytes`]), not on top of
//! a step's workspace. `trajectory.gif` and `rollout.gif` are encoded one frame at a time, so
//! however many frames they have, one is in memory; `regrowth.gif` is drawn from states
//! the score kept, and holds all its frames while it is written.

use crate::error::{bail, Result, ResultExt};
use nca_api::{rollout_bytes, training_bytes, training_resident_bytes, MemoryLimit, NcaConfig};

use crate::backend::Backend;
use crate::config::RunConfig;
use crate::render;
use crate::score;

/// Frames a GIF written from a folder of frames holds at once: it is streamed.
const STREAMED_GIF_FRAMES: u64 = 1;

/// Bytes an encoder needs beside one RGB frame of a GIF (its RGBA copy, the quantiser's
/// copy and the palette indices), in multiples of the frame's RGB bytes.
const GIF_ENCODER_COPIES: u64 = 4;

/// Contact-sheet tiles of a run: up to ten snapshots, the regrowth and the target.
const CONTACT_SHEET_TILES: usize = 12;

/// Columns of a run's contact sheet.
const CONTACT_SHEET_COLUMNS: usize = 6;

/// Bytes a run keeps per training step until its end: the `loss.csv` record, the point
/// `loss.png` plots and the path plotters draws through it.
const HISTORY_BYTES_PER_STEP: u64 = 64;

/// The names under which a command's sizes are set, for the hints of its refusals.
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// What sets the upscale factor of the pictures (`output.scale`, `--scale`).
    pub scale: &'static str,
    /// What sets the grid's sides.
    pub grid: &'static str,
    /// What sets the batch.
    pub batch: &'static str,
    /// What sets the regrowth score's starts.
    pub seeds: &'static str,
    /// What sets the regrowth score's steps.
    pub eval_steps: &'static str,
}

/// The knobs of a training run's run file.
pub const RUN_KNOBS: Knobs = Knobs {
    scale: "output.scale",
    grid: "grid.height / grid.width",
    batch: "grid.batch",
    seeds: "evaluation.seeds",
    eval_steps: "evaluation.steps",
};

/// The knobs of `nca-cli rollout`.
pub const ROLLOUT_KNOBS: Knobs = Knobs {
    scale: "--scale",
    grid: "the checkpoint's grid (stored in its `nca.config` metadata)",
    batch: "the batch of the --init state (without --init: the checkpoint's grid.batch)",
    seeds: "--eval-seeds",
    eval_steps: "--eval-steps",
};

/// Everything a training run of `cfg` will need, checked before anything is written:
/// the run file's validation, the backend's own limits, the memory of training, of the
/// regrowth score and of every picture and GIF, and the drawing limits of the pictures.
///
/// `nca` is the run's nca-api config (`cfg.nca()`); `limit` is usually
/// [`MemoryLimit::from_env`].
pub fn check_run(
    cfg: &RunConfig,
    nca: &NcaConfig,
    backend: Backend,
    limit: &MemoryLimit,
) -> Result<()> {
    nca.validate()?;
    cfg.validate()?;
    backend.check_model(&nca.model)?;
    let grid = Grid::of(nca, nca.grid.batch);
    let train = training_bytes(nca);
    limit.check(
        &format!("training {}", grid.describe()),
        train,
        &format!(
            "lower {} or {} (or model.hidden_channels)",
            RUN_KNOBS.grid, RUN_KNOBS.batch
        ),
    )?;
    let pictures = Pictures {
        nca,
        scale: cfg.output.scale,
        knobs: RUN_KNOBS,
        limit,
    };
    let snapshot = pictures.snapshot("a snapshot", grid.batch)?;
    let trajectory = pictures.gif_of_snapshots("trajectory.gif", grid.batch)?;
    let sheet = pictures.contact_sheet()?;
    let regrowth = pictures.regrowth(cfg.evaluation.seeds, cfg.evaluation.steps)?;
    let during = sum(&[train, Some(snapshot)]);
    limit.check(
        "training with its snapshots",
        during,
        &format!(
            "lower {}, {} or {}",
            RUN_KNOBS.grid, RUN_KNOBS.batch, RUN_KNOBS.scale
        ),
    )?;
    let steps = nca.training.steps;
    let history = steps.checked_mul(HISTORY_BYTES_PER_STEP);
    limit.check(
        &format!("the loss history of {steps} steps (loss.csv's records and loss.png)"),
        history,
        "lower training.steps",
    )?;
    let pictures_at_end = trajectory.max(sheet).max(regrowth.pictures);
    // The score runs between training steps, when a step's workspace is free again.
    let between_steps = training_resident_bytes(nca);
    let end = sum(&[
        between_steps,
        history,
        Some(regrowth.states),
        Some(pictures_at_end),
    ]);
    limit.check(
        "the end of the run (the trained model, the regrowth score and its pictures, \
         trajectory.gif and the contact sheet)",
        end,
        &format!(
            "lower {}, {}, {}, {} or {}",
            RUN_KNOBS.grid, RUN_KNOBS.batch, RUN_KNOBS.scale, RUN_KNOBS.seeds, RUN_KNOBS.eval_steps
        ),
    )?;
    Ok(())
}

/// What a rollout of a checkpoint's rule will need.
#[derive(Clone, Copy, Debug)]
pub struct RolloutPlan<'a> {
    /// The checkpoint's config.
    pub nca: &'a NcaConfig,
    /// Batch of the rollout: the `--init` state's, else the checkpoint's.
    pub batch: usize,
    /// Whether the checkpoint holds a target (drawn beside every frame and scored).
    pub with_target: bool,
    /// Upscale factor of the frames.
    pub scale: u32,
    /// Starts of the regrowth score.
    pub eval_seeds: usize,
    /// Steps of the regrowth score.
    pub eval_steps: u64,
}

/// Everything `nca-cli rollout` will need, checked before its directory is created: the
/// rule running on the batch, the initial state, a frame and `rollout.gif`, and the
/// regrowth score with its pictures.
pub fn check_rollout(plan: &RolloutPlan<'_>, limit: &MemoryLimit) -> Result<()> {
    let nca = plan.nca;
    let grid = Grid::of(nca, plan.batch);
    let run = rollout_bytes(nca, plan.batch);
    limit.check(
        &format!("rolling out {}", grid.describe()),
        run,
        &format!(
            "{} and {} decide this size",
            ROLLOUT_KNOBS.grid, ROLLOUT_KNOBS.batch
        ),
    )?;
    let pictures = Pictures {
        nca,
        scale: plan.scale,
        knobs: ROLLOUT_KNOBS,
        limit,
    };
    let state = grid.state_bytes();
    let frame = if plan.with_target {
        pictures.snapshot("a frame", plan.batch)?
    } else {
        pictures.snapshot_without_target("a frame", plan.batch)?
    };
    let gif = pictures.gif_of_snapshots("rollout.gif", plan.batch)?;
    let regrowth = if plan.with_target {
        pictures.regrowth(plan.eval_seeds, plan.eval_steps)?
    } else {
        Regrowth::default()
    };
    // The initial state, the rule's buffers and the last downloaded state stay alive.
    let during = sum(&[run, state, state, Some(frame)]);
    let end = sum(&[
        run,
        state,
        state,
        Some(regrowth.states),
        Some(gif.max(regrowth.pictures)),
    ]);
    let hint = format!(
        "lower {} or {}; {} and {} decide the rest",
        ROLLOUT_KNOBS.scale, ROLLOUT_KNOBS.seeds, ROLLOUT_KNOBS.grid, ROLLOUT_KNOBS.batch
    );
    limit.check("the rollout with its frames", during, &hint)?;
    limit.check(
        "the end of the rollout (rollout.gif and the regrowth score with its pictures)",
        end,
        &hint,
    )?;
    Ok(())
}

/// The grid a command runs on.
#[derive(Clone, Copy, Debug)]
struct Grid {
    height: usize,
    width: usize,
    batch: usize,
    channels: usize,
}

impl Grid {
    fn of(nca: &NcaConfig, batch: usize) -> Self {
        Self {
            height: nca.grid.height,
            width: nca.grid.width,
            batch,
            channels: nca.model.channels(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "a {}x{} grid (batch {}, {} channels)",
            self.height, self.width, self.batch, self.channels
        )
    }

    /// Bytes of one `[B, C, H, W]` f32 state.
    fn state_bytes(&self) -> Option<u64> {
        state_bytes(self.batch, self.channels, self.height, self.width)
    }
}

/// Bytes of a `[batch, channels, height, width]` f32 tensor; `None` when it overflows.
pub fn state_bytes(batch: usize, channels: usize, height: usize, width: usize) -> Option<u64> {
    [batch, channels, height, width]
        .iter()
        .try_fold(4u64, |acc, &n| acc.checked_mul(u64::try_from(n).ok()?))
}

/// Sum of estimates; `None` when any is unknown or the sum overflows.
fn sum(parts: &[Option<u64>]) -> Option<u64> {
    parts
        .iter()
        .try_fold(0u64, |acc, part| acc.checked_add((*part)?))
}

/// Memory of the regrowth score: the states it keeps and its largest picture.
#[derive(Clone, Copy, Debug, Default)]
struct Regrowth {
    states: u64,
    pictures: u64,
}

/// Sizes of a command's pictures at its scale.
struct Pictures<'a> {
    nca: &'a NcaConfig,
    scale: u32,
    knobs: Knobs,
    limit: &'a MemoryLimit,
}

impl Pictures<'_> {
    fn height(&self) -> usize {
        self.nca.grid.height
    }

    fn width(&self) -> usize {
        self.nca.grid.width
    }

    /// The largest scale below the current one for which `fits` holds.
    fn largest_scale(&self, below: u32, fits: impl Fn(u32) -> bool) -> Option<u32> {
        (1..below).rev().find(|&s| fits(s))
    }

    /// "lower SCALE (at most N fits)" or, when no scale fits, the grid and batch knobs.
    fn scale_hint(&self, below: u32, fits: impl Fn(u32) -> bool) -> String {
        match self.largest_scale(below, fits) {
            Some(s) => format!("lower {} to at most {s}", self.knobs.scale),
            None => format!(
                "lower {} or {} (even {} 1 is too large)",
                self.knobs.grid, self.knobs.batch, self.knobs.scale
            ),
        }
    }

    /// Pixels of a row of `tiles` tiles at `scale`; an error naming the knobs when it
    /// cannot be drawn at all.
    fn row(&self, what: &str, tiles: usize, scale: u32) -> Result<(u32, u32)> {
        render::row_size(tiles, self.height(), self.width(), scale).with_context(|| {
            format!(
                "cannot draw {what}; lower {}, {} or {}",
                self.knobs.scale, self.knobs.grid, self.knobs.batch
            )
        })
    }

    /// Bytes of one row picture of `tiles` tiles at `scale` (its tiles and the row).
    fn row_bytes(&self, tiles: usize, scale: u32) -> Option<u64> {
        let (w, h) = render::row_size(tiles, self.height(), self.width(), scale).ok()?;
        render::rgb_bytes(w, h)?.checked_mul(2)
    }

    /// A snapshot or frame of a `batch`-element state with the target beside it: its
    /// drawing limits and its memory, with the downloaded state it is drawn from.
    fn snapshot(&self, what: &str, batch: usize) -> Result<u64> {
        self.row_picture(what, render::snapshot_tiles(batch, true), batch)
    }

    /// The same without a target tile.
    fn snapshot_without_target(&self, what: &str, batch: usize) -> Result<u64> {
        self.row_picture(what, render::snapshot_tiles(batch, false), batch)
    }

    fn row_picture(&self, what: &str, tiles: usize, batch: usize) -> Result<u64> {
        let (w, h) = self.row(what, tiles, self.scale)?;
        let state = state_bytes(
            batch,
            self.nca.model.channels(),
            self.height(),
            self.width(),
        );
        let need = |scale: u32| sum(&[self.row_bytes(tiles, scale), state]);
        let bytes = need(self.scale);
        let hint = self.scale_hint(self.scale, |s| {
            need(s).is_some_and(|b| b <= self.limit.bytes)
        });
        self.limit.check(
            &format!(
                "{what} ({tiles} tiles, {w}x{h} pixels at {} {})",
                self.knobs.scale, self.scale
            ),
            bytes,
            &hint,
        )?;
        Ok(bytes.unwrap_or(u64::MAX))
    }

    /// A GIF of snapshots of a `batch`-element state (with the target), streamed from the
    /// folder of frames: one frame in memory at a time.
    fn gif_of_snapshots(&self, name: &str, batch: usize) -> Result<u64> {
        let tiles = render::snapshot_tiles(batch, true);
        self.gif(name, tiles, STREAMED_GIF_FRAMES, self.scale)
    }

    /// A GIF of rows of `tiles` tiles at `scale`, `frames` of them held in memory at once:
    /// every side within the GIF format's 16 bits, and the frames within the memory limit.
    fn gif(&self, name: &str, tiles: usize, frames: u64, scale: u32) -> Result<u64> {
        let (w, h) = self.row(name, tiles, scale)?;
        let side_fits = |s: u32| {
            render::row_size(tiles, self.height(), self.width(), s)
                .is_ok_and(|(w, h)| w <= render::MAX_GIF_SIDE && h <= render::MAX_GIF_SIDE)
        };
        if !side_fits(scale) {
            bail!(
                "{name} would have frames of {w}x{h} pixels ({tiles} tiles at {} {}), but a \
                 GIF side is at most {} pixels; {}",
                self.knobs.scale,
                self.scale,
                render::MAX_GIF_SIDE,
                self.scale_hint(self.scale, side_fits)
            );
        }
        let need = |s: u32| {
            let (w, h) = render::row_size(tiles, self.height(), self.width(), s).ok()?;
            render::rgb_bytes(w, h)?.checked_mul(frames.checked_add(GIF_ENCODER_COPIES)?)
        };
        let bytes = need(scale);
        let hint = self.scale_hint(self.scale, |s| {
            need(s).is_some_and(|b| b <= self.limit.bytes)
        });
        self.limit.check(
            &if frames == STREAMED_GIF_FRAMES {
                format!("{name} (written one frame of {w}x{h} pixels at a time)")
            } else {
                format!("{name} ({frames} frames of {w}x{h} pixels held while it is written)")
            },
            bytes,
            &hint,
        )?;
        Ok(bytes.unwrap_or(u64::MAX))
    }

    /// A labelled sheet of `count` tiles at `scale`, `columns` per row, with its tiles.
    fn sheet_bytes(&self, count: usize, columns: usize, scale: u32) -> Option<u64> {
        let (tw, th) = render::tile_size(self.height(), self.width(), scale).ok()?;
        let (.., w, h) = render::contact_sheet_size(tw, th, count, columns).ok()?;
        let tiles = render::rgb_bytes(tw, th)?.checked_mul(u64::try_from(count).ok()?)?;
        render::rgb_bytes(w, h)?.checked_add(tiles)
    }

    /// A labelled sheet: drawing limits and memory.
    fn sheet(&self, what: &str, count: usize, columns: usize) -> Result<u64> {
        let (tw, th) = render::tile_size(self.height(), self.width(), self.scale)
            .with_context(|| format!("cannot draw {what}"))?;
        render::contact_sheet_size(tw, th, count, columns).with_context(|| {
            format!(
                "cannot draw {what}; {}",
                self.scale_hint(self.scale, |s| {
                    render::tile_size(self.height(), self.width(), s)
                        .and_then(|(tw, th)| render::contact_sheet_size(tw, th, count, columns))
                        .is_ok()
                })
            )
        })?;
        let bytes = self.sheet_bytes(count, columns, self.scale);
        let hint = self.scale_hint(self.scale, |s| {
            self.sheet_bytes(count, columns, s)
                .is_some_and(|b| b <= self.limit.bytes)
        });
        self.limit.check(what, bytes, &hint)?;
        Ok(bytes.unwrap_or(u64::MAX))
    }

    /// The run's contact sheet, with the largest snapshot it reads.
    fn contact_sheet(&self) -> Result<u64> {
        let sheet = self.sheet(
            "contact_sheet.png",
            CONTACT_SHEET_TILES,
            CONTACT_SHEET_COLUMNS,
        )?;
        let snapshot = self
            .row_bytes(
                render::snapshot_tiles(self.nca.grid.batch, true),
                self.scale,
            )
            .unwrap_or(u64::MAX);
        Ok(sheet.saturating_add(snapshot))
    }

    /// The regrowth score on `seeds` starts for `steps` steps: the rule running on them,
    /// the states kept for its pictures, `regrowth.png` and `regrowth.gif` (half scale).
    fn regrowth(&self, seeds: usize, steps: u64) -> Result<Regrowth> {
        let grid = Grid::of(self.nca, seeds);
        let run = rollout_bytes(self.nca, seeds);
        let kept = grid
            .state_bytes()
            .and_then(|s| s.checked_mul(score::kept_states(steps)));
        let states = sum(&[run, kept]);
        self.limit.check(
            &format!(
                "the regrowth score ({seeds} starts on {}, {} states kept for its pictures)",
                grid.describe(),
                score::kept_states(steps)
            ),
            states,
            &format!("lower {} or {}", self.knobs.seeds, self.knobs.grid),
        )?;
        let columns = (score::picture_steps(steps).len() + 1).div_ceil(2).max(5);
        let png = self.sheet(
            "regrowth.png",
            score::picture_steps(steps).len() + 1,
            columns,
        )?;
        let half = (self.scale / 2).max(1);
        let gif = self.gif(
            "regrowth.gif",
            render::snapshot_tiles(seeds, true),
            score::gif_frames(steps),
            half,
        )?;
        Ok(Regrowth {
            states: states.unwrap_or(u64::MAX),
            pictures: png.max(gif),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn run_file(text: &str) -> RunConfig {
        RunConfig::from_ron(text, "t.ron").expect("parses")
    }

    fn check(text: &str, limit: u64) -> Result<()> {
        let cfg = run_file(text);
        check_run(&cfg, &cfg.nca(), Backend::Ndarray, &MemoryLimit::new(limit))
    }

    fn refused(text: &str, limit: u64, needles: &[&str]) -> String {
        let msg = format!("{:#}", check(text, limit).expect_err("refused"));
        for n in needles {
            assert!(msg.contains(n), "message lacks {n:?}: {msg}");
        }
        msg
    }

    #[test]
    fn every_example_passes_in_a_small_limit() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
        for entry in std::fs::read_dir(&dir).expect("examples") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == "ron") {
                let cfg = RunConfig::load(&path).expect("loads");
                // 4 GiB: the end of the 256×256 example (its 512-wide model, a
                // three-start score and its pictures) needs 3.2 GiB.
                check_run(
                    &cfg,
                    &cfg.nca(),
                    Backend::Ndarray,
                    &MemoryLimit::new(4 * GIB),
                )
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            }
        }
    }

    #[test]
    fn huge_grids_and_batches_say_how_much_and_which_field() {
        let limit = 8 * GIB;
        refused(
            "(grid: (height: 100000, width: 100000), target: Solid(1.0, 0.0, 0.0))",
            limit,
            &[
                "training a 100000x100000 grid",
                "GiB",
                "grid.height",
                "memory limit",
            ],
        );
        refused(
            "(grid: (batch: 1000000000), target: Solid(1.0, 0.0, 0.0))",
            limit,
            &["batch 1000000000", "grid.batch"],
        );
        refused(
            "(grid: (batch: 18446744073709551615), target: Solid(1.0, 0.0, 0.0))",
            limit,
            &["grid.batch"],
        );
        refused(
            "(grid: (height: 1, width: 100000000), target: Solid(1.0, 0.0, 0.0))",
            limit,
            &["1x100000000", "grid.height"],
        );
        refused(
            "(grid: (height: 4294967296, width: 32), target: Solid(1.0, 0.0, 0.0))",
            limit,
            &["4294967296", "grid.height"],
        );
    }

    #[test]
    fn a_scale_too_large_for_the_snapshot_names_output_scale_and_what_fits() {
        let msg = refused(
            "(grid: (height: 2048, width: 2048), model: (position_octaves: None, \
             mlp_hidden: None), output: (scale: 64), target: Solid(1.0, 0.0, 0.0))",
            64 * GIB,
            &[
                "a snapshot",
                "262148x131072 pixels",
                "192.0 GiB",
                "output.scale to at most 36",
            ],
        );
        assert!(!msg.contains("overflow"), "{msg}");
    }

    #[test]
    fn gif_sides_are_checked_before_the_run() {
        // 9 tiles of 8192 px are fine as PNG, but a GIF side is at most 65535 pixels.
        refused(
            "(grid: (height: 128, width: 128, batch: 8), model: (position_octaves: None, \
             mlp_hidden: None), output: (scale: 64), target: Solid(1.0, 0.0, 0.0))",
            64 * GIB,
            &["trajectory.gif", "65535", "output.scale to at most 56"],
        );
    }

    #[test]
    fn streamed_gifs_need_one_frame_of_memory_however_many_they_have() {
        // 300 frames of 4100x2048 pixels held at once would be 7.5 GiB; streamed, the
        // trajectory needs one frame and the encoder's copies of it.
        check(
            "(grid: (height: 128, width: 128), output: (scale: 16, gif_frames: 1000), \
             training: (steps: 100000), target: Solid(1.0, 0.0, 0.0))",
            2 * GIB,
        )
        .expect("a long trajectory at a large scale fits");
    }

    #[test]
    fn channels_beyond_the_backend_and_overflowing_channels_name_the_field() {
        refused(
            "(model: (hidden_channels: 30), target: Solid(1.0, 0.0, 0.0))",
            8 * GIB,
            &["model.hidden_channels", "at most 32"],
        );
        refused(
            "(model: (hidden_channels: 18446744073709551615), target: Solid(1.0, 0.0, 0.0))",
            8 * GIB,
            &["model.hidden_channels"],
        );
    }

    #[test]
    fn a_billion_steps_of_history_name_training_steps() {
        refused(
            "(training: (steps: 1000000000), target: Solid(1.0, 0.0, 0.0))",
            8 * GIB,
            &["loss history of 1000000000 steps", "training.steps"],
        );
        check(
            "(training: (steps: 1000000), target: Solid(1.0, 0.0, 0.0))",
            GIB,
        )
        .expect("a million steps fit");
    }

    #[test]
    fn many_regrowth_starts_on_a_large_grid_name_evaluation_seeds() {
        refused(
            "(grid: (height: 512, width: 512), evaluation: (seeds: 64), \
             output: (scale: 1), target: Solid(1.0, 0.0, 0.0))",
            8 * GIB,
            &["regrowth score", "evaluation.seeds"],
        );
    }

    #[test]
    fn rollouts_of_huge_checkpoints_are_refused() {
        let mut nca = NcaConfig::default();
        nca.grid.height = 100_000;
        nca.grid.width = 100_000;
        let plan = RolloutPlan {
            nca: &nca,
            batch: 1,
            with_target: true,
            scale: 8,
            eval_seeds: 3,
            eval_steps: 100,
        };
        let msg = format!(
            "{:#}",
            check_rollout(&plan, &MemoryLimit::new(8 * GIB)).expect_err("refused")
        );
        assert!(msg.contains("rolling out a 100000x100000 grid"), "{msg}");
        let small = NcaConfig::default();
        let plan = RolloutPlan {
            nca: &small,
            ..plan
        };
        check_rollout(&plan, &MemoryLimit::new(GIB)).expect("a 32x32 rollout fits");
    }
}
