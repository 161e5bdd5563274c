//! `loss.csv` and `loss.png`: the loss of every step, its ε line and the spikes.

use std::path::Path;

use crate::error::{invalid, Result, ResultExt};
use plotters::prelude::*;

use crate::render::{register_font, FONT_FAMILY};

/// One row of `loss.csv`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossRecord {
    /// Step (1-based).
    pub step: u64,
    /// Loss at that step (NaN or inf when the run diverged there).
    pub loss: f32,
    /// Whether the state was spiked after this step.
    pub spiked: bool,
    /// Spikes so far.
    pub spikes: u64,
}

/// Header line of `loss.csv`.
pub const CSV_HEADER: &str = "step,loss,spiked,spikes";

impl LossRecord {
    /// The record as a CSV line without the newline; `spiked` is 0 or 1.
    pub fn csv(&self) -> String {
        format!(
            "{},{},{},{}",
            self.step,
            self.loss,
            u8::from(self.spiked),
            self.spikes
        )
    }

    /// Parses a line written by [`LossRecord::csv`].
    pub fn parse(line: &str) -> Option<Self> {
        let mut it = line.trim().split(',');
        let step = it.next()?.parse().ok()?;
        let loss = it.next()?.parse().ok()?;
        let spiked = it.next()? == "1";
        let spikes = it.next()?.parse().ok()?;
        Some(Self {
            step,
            loss,
            spiked,
            spikes,
        })
    }
}

/// Reads the records of a `loss.csv`, skipping the header and malformed lines.
pub fn read_csv(path: &Path) -> Result<Vec<LossRecord>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(text.lines().skip(1).filter_map(LossRecord::parse).collect())
}

/// `loss.csv` as text: the header and one row per record.
pub fn csv_text(records: &[LossRecord]) -> String {
    let mut out = String::with_capacity(records.len() * 24 + 32);
    out.push_str(CSV_HEADER);
    out.push('\n');
    for r in records {
        out.push_str(&r.csv());
        out.push('\n');
    }
    out
}

/// Draws the mean regrowth PSNR against the training step (`psnr.png`); writes nothing
/// without points.
pub fn plot_psnr(path: &Path, points: &[(u64, f64)]) -> Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    register_font()?;
    let pts: Vec<(f64, f64)> = points.iter().map(|&(s, p)| (s as f64, p)).collect();
    let (x0, x1) = step_range(&pts);
    let hi = pts.iter().map(|p| p.1).fold(10.0, f64::max);
    let hi = (hi / 5.0).ceil() * 5.0 + 5.0;
    let (w, h) = (960u32, 540u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let draw = |e: &dyn std::fmt::Debug| invalid!("drawing {}: {e:?}", path.display());
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("regrowth from fresh noise (mean PSNR)", (FONT_FAMILY, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, 0.0..hi)
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .x_desc("training step")
            .y_desc("PSNR (dB)")
            .label_style((FONT_FAMILY, 14))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0}"))
            .draw()
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), BLUE.stroke_width(2)))
            .map_err(|e| draw(&e))?;
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
            .map_err(|e| draw(&e))?;
        root.present().map_err(|e| draw(&e))?;
    }
    save_rgb(path, &buf, w, h)
}

/// The x range of a plot of `pts` (sorted by step), widened around a single step so the
/// axis is never empty.
fn step_range(pts: &[(f64, f64)]) -> (f64, f64) {
    let (first, last) = match (pts.first(), pts.last()) {
        (Some(f), Some(l)) => (f.0, l.0),
        _ => (0.0, 0.0),
    };
    if last > first {
        (first, last)
    } else {
        (first - 1.0, last + 1.0)
    }
}

fn save_rgb(path: &Path, buf: &[u8], w: u32, h: u32) -> Result<()> {
    image::save_buffer_with_format(
        path,
        buf,
        w,
        h,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Draws log-scale loss against step with the ε line and the spike steps marked; writes
/// nothing when no step has a finite, positive loss.
pub fn plot_loss(path: &Path, records: &[LossRecord], epsilon: f32) -> Result<()> {
    let pts: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite() && r.loss > 0.0)
        .map(|r| (r.step as f64, f64::from(r.loss)))
        .collect();
    if pts.is_empty() {
        return Ok(());
    }
    register_font()?;
    let eps = f64::from(epsilon);
    let (x0, x1) = step_range(&pts);
    let lo = pts.iter().map(|p| p.1).fold(eps, f64::min) / 2.0;
    // A decade of headroom above the curve keeps the legend (upper right) off it.
    let hi = pts.iter().map(|p| p.1).fold(eps, f64::max) * 20.0;
    let (w, h) = (960u32, 540u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let draw = |e: &dyn std::fmt::Debug| invalid!("drawing {}: {e:?}", path.display());
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", (FONT_FAMILY, 22))
            .margin(12)
            .x_label_area_size(42)
            .y_label_area_size(72)
            .build_cartesian_2d(x0..x1, (lo..hi).log_scale())
            .map_err(|e| draw(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (MSE)")
            .label_style((FONT_FAMILY, 14))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y:.0e}"))
            .draw()
            .map_err(|e| draw(&e))?;
        // Thousands of points per pixel column add nothing but time.
        let stride = (pts.len() / 20_000).max(1);
        chart
            .draw_series(LineSeries::new(
                pts.iter().step_by(stride).copied(),
                BLUE.stroke_width(1),
            ))
            .map_err(|e| draw(&e))?
            .label("loss")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE));
        let red = RED.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new([(x0, eps), (x1, eps)], 8, 6, red))
            .map_err(|e| draw(&e))?
            .label(format!("ε = {epsilon}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], red));
        let spikes: Vec<(f64, f64)> = records
            .iter()
            .filter(|r| r.spiked && r.loss.is_finite() && r.loss > 0.0)
            .map(|r| (r.step as f64, f64::from(r.loss)))
            .collect();
        let orange = RGBColor(230, 120, 0);
        chart
            .draw_series(spikes.iter().map(|&p| Circle::new(p, 2, orange.filled())))
            .map_err(|e| draw(&e))?
            .label(format!("spike ({})", spikes.len()))
            .legend(move |(x, y)| Circle::new((x + 10, y), 3, orange.filled()));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| draw(&e))?;
        root.present().map_err(|e| draw(&e))?;
    }
    save_rgb(path, &buf, w, h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips() {
        let r = LossRecord {
            step: 7,
            loss: 0.0123,
            spiked: true,
            spikes: 2,
        };
        assert_eq!(r.csv(), "7,0.0123,1,2");
        assert_eq!(LossRecord::parse(&r.csv()), Some(r));
        let nan = LossRecord::parse("8,NaN,0,2").expect("parses");
        assert!(nan.loss.is_nan());
    }

    #[test]
    fn plot_is_a_png() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("loss.png");
        let records: Vec<LossRecord> = (1..=200)
            .map(|s| LossRecord {
                step: s,
                loss: 1.0 / s as f32,
                spiked: s % 50 == 0,
                spikes: s / 50,
            })
            .collect();
        plot_loss(&path, &records, 0.001).expect("plots");
        let img = image::open(&path).expect("decodes");
        assert_eq!(img.width(), 960);
    }
}
