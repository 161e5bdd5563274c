//! Phase 4, artefacts: the regrowth score and every picture, plot and GIF of the run
//! directory. Each is written through a temporary file and a rename, so a failure leaves
//! no partial file under a final name; failures are collected after the run's first one.

use std::path::Path;

use crate::error::{BackendResult, Result, ResultExt};
use nca_api::{Checkpoint, HostTensor, NcaConfig, RegrowthScore, Trainer};

use super::kept::{self, Kept};
use super::plan::{Plan, PsnrRow};
use super::train::Trained;
use super::Failures;
use crate::files::write_artefact;
use crate::{plot, render, score};

/// What the end of a run scored.
pub(super) struct Scored {
    /// The score `summary.json` reports (`None` after a failure).
    pub regrowth: Option<RegrowthScore>,
    /// The last step's `psnr.csv` row: the last weights on the evaluation's own starts.
    pub final_row: Option<PsnrRow>,
    /// The weights `regrowth` scores, when `evaluation.keep_best` chose them from the
    /// periodic scores (they are then scored on held-out starts).
    pub kept: Option<Kept>,
}

/// Scores the final rule and writes the run's results (into `out`; nothing without one);
/// returns what was scored and the names of the files written.
pub(super) fn write<T: Trainer>(
    trainer: &mut T,
    plan: &Plan,
    out: Option<&Path>,
    trained: &Trained,
    failures: &mut Failures,
) -> (Scored, Vec<&'static str>) {
    let mut written = Vec::new();
    let mut wrote = |failures: &mut Failures, name: &'static str, r: Result<bool>| {
        if let Some(true) = failures.keep(r) {
            written.push(name);
        }
    };
    let cfg = &plan.cfg;
    let eval_cfg = &cfg.evaluation;
    let nca = &plan.nca;
    let v = nca.model.visible_channels;
    let scale = cfg.output.scale;
    let frame_ms = cfg.output.gif_frame_ms;
    let target = &plan.target;
    // A rule that failed is not scored: its number would describe a broken run.
    let (regrowth, final_row, kept) = if failures.is_empty() {
        match failures.keep(score_final(trainer, plan, trained, out.is_some())) {
            Some((r, row, kept)) => (Some(r), Some(row), kept),
            None => (None, None, None),
        }
    } else {
        (None, None, None)
    };
    let Some(out) = out else {
        let scored = Scored {
            regrowth: regrowth.map(|r| r.score),
            final_row,
            kept,
        };
        return (scored, written);
    };
    if let Some(k) = &kept {
        wrote(failures, kept::FILE, k.write(out).map(|()| true));
    }
    let mut psnr_rows = trained.psnr_rows.clone();
    psnr_rows.extend(final_row);
    let mut regrown_tile = None;
    if let Some(r) = &regrowth {
        let half = (scale / 2).max(1);
        let picture = write_artefact(&out.join("regrowth.png"), |tmp| {
            score::write_picture(r, target, v, scale, tmp)
        });
        wrote(failures, "regrowth.png", picture);
        let gif = write_artefact(&out.join("regrowth.gif"), |tmp| {
            score::write_gif(r, target, v, half, frame_ms, tmp)
        });
        wrote(failures, "regrowth.gif", gif);
        if let Some((_, last)) = r.frames.last() {
            if let Some(t) = failures.keep(render::tile(last, 0, v, scale)) {
                regrown_tile = Some((format!("regrown · {:.1} dB", r.score.mean_psnr_db), t));
            }
        }
    }
    if !psnr_rows.is_empty() && (eval_cfg.every.is_some() || psnr_rows.len() > 1) {
        let csv = write_artefact(&out.join("psnr.csv"), |tmp| {
            score::write_csv(tmp, &psnr_rows)
        });
        wrote(failures, "psnr.csv", csv);
        let pts: Vec<(u64, f64)> = psnr_rows.iter().map(|r| (r.0, r.1)).collect();
        let png = write_artefact(&out.join("psnr.png"), |tmp| plot::plot_psnr(tmp, &pts));
        wrote(failures, "psnr.png", png);
    }
    let eps = nca.noise.epsilon;
    let loss = write_artefact(&out.join("loss.png"), |tmp| {
        plot::plot_loss(tmp, &trained.records, eps)
    });
    wrote(failures, "loss.png", loss);
    let frame_dir = out.join("frames");
    let gif = write_artefact(&out.join("trajectory.gif"), |tmp| {
        render::gif_from_dir(&frame_dir, tmp, frame_ms).map(|_| ())
    });
    wrote(failures, "trajectory.gif", gif);
    let spiked: Vec<u64> = trained
        .records
        .iter()
        .filter(|r| r.spiked)
        .map(|r| r.step)
        .collect();
    let sheet = SheetParts {
        target,
        visible: v,
        scale,
        spiked: &spiked,
        regrown: regrown_tile,
    };
    let contact = write_artefact(&out.join("contact_sheet.png"), |tmp| {
        write_contact_sheet(tmp, &out.join("snapshots"), nca, sheet)
    });
    wrote(failures, "contact_sheet.png", contact);
    let scored = Scored {
        regrowth: regrowth.map(|r| r.score),
        final_row,
        kept,
    };
    (scored, written)
}

/// Scores the last weights on the evaluation's starts (the last `psnr.csv` row). With
/// `evaluation.keep_best` and periodic scores, the better of them and the best periodic
/// weights is loaded into `trainer` and scored again on held-out starts, since a maximum
/// over scores on the same starts would overstate it; returns the reported score (with
/// pictures when `pictures`), the row, and the weights chosen.
fn score_final<T: Trainer>(
    trainer: &mut T,
    plan: &Plan,
    trained: &Trained,
    pictures: bool,
) -> Result<(score::Regrowth, PsnrRow, Option<Kept>)> {
    let nca = &plan.nca;
    let eval_cfg = &plan.cfg.evaluation;
    let (seed, clamp) = (nca.training.seed, nca.model.state_clamp);
    let step = trained.progress.step;
    let best = trained.kept.as_ref().filter(|_| eval_cfg.keep_best);
    let last_ckpt = trained.checkpoint.as_ref();
    let (Some(best), Some(last_ckpt)) = (best, last_ckpt) else {
        let last = score::run(trainer, &plan.target, eval_cfg, seed, clamp, pictures)?;
        let row = (step, last.score.mean_psnr_db, last.score.mean_mse);
        return Ok((last, row, None));
    };
    let last = score::run(trainer, &plan.target, eval_cfg, seed, clamp, false)?.score;
    let row = (step, last.mean_psnr_db, last.mean_mse);
    let kept = if best.beaten_by(last.mean_psnr_db) {
        Kept {
            step,
            psnr_db: last.mean_psnr_db,
            checkpoint: Checkpoint {
                training_weights: None,
                adam: None,
                state: None,
                ..last_ckpt.clone()
            },
        }
    } else {
        trainer
            .set_weights(&best.checkpoint.weights)
            .backend()
            .context("loading the kept weights")?;
        best.clone()
    };
    let held_out = nca_api::eval::held_out_run_seed(seed);
    let reported = score::run(trainer, &plan.target, eval_cfg, held_out, clamp, pictures)?;
    Ok((reported, row, Some(kept)))
}

/// What the contact sheet shows besides the snapshots.
struct SheetParts<'a> {
    target: &'a HostTensor,
    visible: usize,
    scale: u32,
    /// Steps after which the state was spiked; their snapshots are labelled so.
    spiked: &'a [u64],
    /// The final rule's regrowth from fresh noise, labelled with its score.
    regrown: Option<(String, image::RgbImage)>,
}

/// A grid of up to ten snapshots (first batch element), the regrowth and the target, each
/// labelled, written to `path`; nothing without snapshots.
fn write_contact_sheet(
    path: &Path,
    snap_dir: &Path,
    nca: &NcaConfig,
    parts: SheetParts<'_>,
) -> Result<()> {
    let scale = parts.scale;
    let (tw, th) = (
        nca.grid.width as u32 * scale,
        nca.grid.height as u32 * scale,
    );
    let mut tiles = Vec::new();
    for (step, snap) in render::thin(&render::list_steps(snap_dir)?, 10) {
        let img = image::open(&snap)
            .with_context(|| format!("cannot read {}", snap.display()))?
            .to_rgb8();
        if img.width() < tw || img.height() < th {
            continue;
        }
        let tile = image::imageops::crop_imm(&img, 0, 0, tw, th).to_image();
        let label = if parts.spiked.binary_search(&step).is_ok() {
            format!("step {step} (pre-spike)")
        } else {
            format!("step {step}")
        };
        tiles.push((label, tile));
    }
    if tiles.is_empty() {
        return Ok(());
    }
    if let Some(r) = parts.regrown {
        tiles.push(r);
    }
    tiles.push((
        "target".into(),
        render::tile(parts.target, 0, parts.visible, scale)?,
    ));
    let sheet = render::contact_sheet(&tiles, 6)?;
    render::save_png(&sheet, path)
}
