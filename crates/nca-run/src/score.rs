//! The regrowth score in a run or rollout directory: `regrowth.png`, `regrowth.gif`, the
//! score line, and `psnr.csv` for scores taken during training.
//!
//! The score itself is computed by `nca_api::eval`, once for every backend; this module
//! only runs it with the run file's settings and draws it.

use std::io::Write;
use std::path::Path;

use crate::error::{Result, ResultExt};
use image::RgbImage;
use nca_api::eval::{self, RegrowthOptions, RegrowthScore};
use nca_api::{HostTensor, Transition};

use crate::config::EvaluationConfig;
use crate::render;

/// The steps shown in `regrowth.png`: 0 (the noise), 1, 2, 4, 8, … and the last step.
pub fn picture_steps(steps: u64) -> Vec<u64> {
    let mut out = vec![0];
    let mut s = 1;
    while s < steps {
        out.push(s);
        s = s.saturating_mul(2);
    }
    out.push(steps);
    out
}

/// Every step up to this one is a frame of `regrowth.gif`: the picture forms there.
const GIF_EVERY_STEP_UNTIL: u64 = 16;

/// Frames of `regrowth.gif` after the first steps, spread to the end.
const GIF_LATER_FRAMES: u64 = 25;

/// Copies of the last frame that end `regrowth.gif`, so the loop shows the result.
const GIF_HOLD_FRAMES: usize = 12;

/// Whether the state after `step` of a `steps`-step score is a frame of `regrowth.gif`:
/// every step while the picture forms, then about 25 more (the later frames barely
/// change and a GIF pays for each one).
fn in_gif(step: u64, steps: u64) -> bool {
    let every = steps.div_ceil(GIF_LATER_FRAMES).max(1);
    step <= GIF_EVERY_STEP_UNTIL || step.is_multiple_of(every) || step == steps
}

/// States a scored regrowth with pictures keeps in memory for `steps` steps (those of
/// [`picture_steps`] and the GIF's), counted without running it.
pub fn kept_states(steps: u64) -> u64 {
    picture_steps(steps).len() as u64 + gif_states(steps)
}

/// Steps whose state is a frame of `regrowth.gif` ([`in_gif`]), counted.
fn gif_states(steps: u64) -> u64 {
    let every = steps.div_ceil(GIF_LATER_FRAMES).max(1);
    let early = steps.min(GIF_EVERY_STEP_UNTIL) + 1;
    let later = (steps / every).saturating_sub(GIF_EVERY_STEP_UNTIL / every);
    let last = u64::from(steps > GIF_EVERY_STEP_UNTIL && !steps.is_multiple_of(every));
    early + later + last
}

/// Frames `regrowth.gif` holds in memory while it is written for a `steps`-step score.
pub fn gif_frames(steps: u64) -> u64 {
    gif_states(steps) + GIF_HOLD_FRAMES as u64
}

/// A scored regrowth and the states kept for its pictures.
pub struct Regrowth {
    /// The score.
    pub score: RegrowthScore,
    /// `(step, [S, C, H, W] state)` at the steps of [`picture_steps`] (empty unless asked).
    pub frames: Vec<(u64, HostTensor)>,
    /// States for the GIF: every step up to 16, then about 25 more to the end.
    pub gif: Vec<(u64, HostTensor)>,
}

/// Scores `t`'s rule with the run's evaluation settings; keeps pictures when `pictures`.
pub fn run<T: Transition>(
    t: &mut T,
    target: &HostTensor,
    cfg: &EvaluationConfig,
    run_seed: u64,
    state_clamp: Option<f32>,
    pictures: bool,
) -> Result<Regrowth> {
    let options = RegrowthOptions {
        steps: cfg.steps,
        run_seed,
        seeds: cfg.seeds,
        state_clamp,
    };
    let keep = picture_steps(cfg.steps);
    let mut frames = Vec::new();
    let mut gif = Vec::new();
    let mut watch = |step: u64, s: &HostTensor| {
        if keep.contains(&step) {
            frames.push((step, s.clone()));
        }
        if in_gif(step, cfg.steps) {
            gif.push((step, s.clone()));
        }
    };
    let watcher: Option<eval::StepWatcher<'_>> = if pictures { Some(&mut watch) } else { None };
    let score = eval::regrowth(t, target, &options, watcher)
        .map_err(|e| crate::error::Error::backend(e).context("computing the regrowth score"))?;
    Ok(Regrowth { score, frames, gif })
}

/// One line for the terminal: mean and per-seed PSNR.
pub fn line(score: &RegrowthScore) -> String {
    let per: Vec<String> = score
        .per_seed
        .iter()
        .map(|s| format!("{:.1}", s.psnr_db))
        .collect();
    format!(
        "regrowth from fresh noise after {} steps: PSNR {:.1} dB (MSE {:.2e}; seeds {} dB)",
        score.steps,
        score.mean_psnr_db,
        score.mean_mse,
        per.join(" / ")
    )
}

/// `regrowth.png`: seed 1's noise, its state after 1, 2, 4, … steps and the target, each
/// labelled with its step and PSNR.
pub fn write_picture(
    r: &Regrowth,
    target: &HostTensor,
    visible: usize,
    scale: u32,
    path: &Path,
) -> Result<()> {
    let mut tiles: Vec<(String, RgbImage)> = Vec::new();
    for (step, s) in &r.frames {
        let psnr = eval::psnr_db(eval::visible_mse(s, 0, target)?);
        let label = if *step == 0 {
            format!("noise · {psnr:.1} dB")
        } else {
            format!("step {step} · {psnr:.1} dB")
        };
        tiles.push((label, render::tile(s, 0, visible, scale)?));
    }
    tiles.push(("target".into(), render::tile(target, 0, visible, scale)?));
    let columns = tiles.len().div_ceil(2).max(5);
    render::save_png(&render::contact_sheet(&tiles, columns)?, path)
}

/// `regrowth.gif`: every start side by side with the target, step by step.
pub fn write_gif(
    r: &Regrowth,
    target: &HostTensor,
    visible: usize,
    scale: u32,
    frame_ms: u32,
    path: &Path,
) -> Result<()> {
    let mut gif = render::GifWriter::create(path, frame_ms)?;
    let mut last = None;
    for (_, s) in &r.gif {
        let frame = render::snapshot(s, Some(target), visible, scale)?;
        gif.frame(&frame)?;
        last = Some(frame);
    }
    // Hold the last frame so the loop shows the result before starting over.
    if let Some(last) = last {
        for _ in 0..GIF_HOLD_FRAMES {
            gif.frame(&last)?;
        }
    }
    gif.finish()
}

/// Header of `psnr.csv`.
pub const PSNR_CSV_HEADER: &str = "step,mean_psnr_db,mean_mse";

/// Reads `(step, mean PSNR)` pairs from a `psnr.csv`, skipping malformed lines.
pub fn read_csv(path: &Path) -> Result<Vec<(u64, f64, f64)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut it = l.split(',');
            Some((
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
                it.next()?.parse().ok()?,
            ))
        })
        .collect())
}

/// Writes a whole `psnr.csv`.
pub fn write_csv(path: &Path, rows: &[(u64, f64, f64)]) -> Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{PSNR_CSV_HEADER}")?;
    for (step, psnr, mse) in rows {
        writeln!(f, "{step},{psnr},{mse}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picture_steps_double_and_end_on_the_last() {
        assert_eq!(picture_steps(100), vec![0, 1, 2, 4, 8, 16, 32, 64, 100]);
        assert_eq!(picture_steps(64), vec![0, 1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(picture_steps(1), vec![0, 1]);
    }

    #[test]
    fn kept_states_are_counted_as_the_score_keeps_them() {
        for steps in [1, 2, 15, 16, 17, 25, 26, 99, 100, 101, 1000, 4097] {
            let pictures = picture_steps(steps);
            let kept = (0..=steps)
                .map(|s| u64::from(pictures.contains(&s)) + u64::from(in_gif(s, steps)))
                .sum::<u64>();
            assert_eq!(kept_states(steps), kept, "steps {steps}");
            let gif = (0..=steps).filter(|&s| in_gif(s, steps)).count() + GIF_HOLD_FRAMES;
            assert_eq!(gif_frames(steps), gif as u64, "steps {steps}");
        }
        assert!(kept_states(u64::MAX) < 200, "bounded whatever the steps");
    }

    #[test]
    fn psnr_csv_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("psnr.csv");
        write_csv(&p, &[(100, 21.5, 0.007), (200, 30.0, 0.001)]).expect("writes");
        assert_eq!(
            read_csv(&p).expect("reads"),
            vec![(100, 21.5, 0.007), (200, 30.0, 0.001)]
        );
    }
}
