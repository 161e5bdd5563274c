//! Pictures: states as images, snapshot sheets, contact sheets and GIFs.
//!
//! State values map to pixels by clamping to `[0, 1]`, not by a sigmoid: the target lives
//! in `[0, 1]` and the loss pulls the state there, so a cell exactly on target shows its
//! exact colour (a sigmoid would show 0 as mid-grey).

use std::cell::Cell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Once;

use crate::error::{invalid, Result, ResultExt};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, Rgb, RgbImage, RgbaImage};
use nca_api::HostTensor;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// The font all text is drawn with (DejaVu Sans, Bitstream Vera licence in `assets/`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Font family name under which the bundled DejaVu Sans is registered.
pub const FONT_FAMILY: &str = "sans-serif";

/// Gap in pixels between tiles of a sheet.
const GAP: u32 = 4;

/// Background of sheets, between tiles.
const BACKGROUND: Rgb<u8> = Rgb([40, 40, 40]);

/// Most frames a GIF gets; more snapshots are thinned evenly so files stay small.
pub const MAX_GIF_FRAMES: usize = 300;

/// Widest and tallest frame a GIF can hold: the format stores each side in 16 bits.
pub const MAX_GIF_SIDE: u32 = u16::MAX as u32;

/// Most batch elements a snapshot shows (then the target).
pub const MAX_SNAPSHOT_TILES: usize = 8;

/// Registers the bundled font with plotters; needed once before drawing any text.
pub fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            if plotters::style::register_font(FONT_FAMILY, style, FONT).is_err() {
                result = Err(invalid!("the bundled font could not be loaded"));
            }
        }
    });
    result
}

/// Batch element `b` of a `[B, C, H, W]` tensor as an image of its first `visible` channels
/// (1 = grey, 3 = RGB), clamped to `[0, 1]` and upscaled `scale` times nearest-neighbour.
pub fn tile(t: &HostTensor, b: usize, visible: usize, scale: u32) -> Result<RgbImage> {
    let [_, c, h, w] = t.dims4("state")?;
    if visible > c || !(visible == 1 || visible == 3) {
        return Err(invalid!(
            "cannot draw {visible} visible channels of a {c}-channel tensor"
        ));
    }
    let plane = h * w;
    let base = b * c * plane;
    let data = t.data();
    let px = |ch: usize, y: usize, x: usize| -> u8 {
        let v = data[base + ch * plane + y * w + x];
        let v = if v.is_nan() { 0.0 } else { v.clamp(0.0, 1.0) };
        (v * 255.0).round() as u8
    };
    let (pw, ph) = tile_size(h, w, scale)?;
    let mut img = RgbImage::new(pw, ph);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (sy, sx) = ((y / scale) as usize, (x / scale) as usize);
        *p = if visible == 1 {
            let g = px(0, sy, sx);
            Rgb([g, g, g])
        } else {
            Rgb([px(0, sy, sx), px(1, sy, sx), px(2, sy, sx)])
        };
    }
    Ok(img)
}

/// Width and height in pixels of one tile of an `h × w` grid upscaled `scale` times; an
/// error when a side does not fit the 32-bit sides of an image.
pub fn tile_size(h: usize, w: usize, scale: u32) -> Result<(u32, u32)> {
    let side = |n: usize| -> Result<u32> {
        u32::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(scale))
            .ok_or_else(|| {
                invalid!(
                    "grid side {n} at scale {scale} is too large to draw: a picture side is \
                     at most {} pixels",
                    u32::MAX
                )
            })
    };
    Ok((side(w)?, side(h)?))
}

/// Width and height in pixels of `tiles` tiles of an `h × w` grid at `scale` side by side
/// with gaps, as [`snapshot`] draws them; an error when it does not fit an image.
pub fn row_size(tiles: usize, h: usize, w: usize, scale: u32) -> Result<(u32, u32)> {
    let (tw, th) = tile_size(h, w, scale)?;
    let n = u64::try_from(tiles).unwrap_or(u64::MAX);
    let width = u64::from(tw)
        .checked_mul(n)
        .and_then(|x| x.checked_add(u64::from(GAP).checked_mul(n.saturating_sub(1))?))
        .and_then(|x| u32::try_from(x).ok())
        .ok_or_else(|| {
            invalid!(
                "{tiles} tiles of {tw} pixels side by side are too wide to draw: a picture \
                 side is at most {} pixels",
                u32::MAX
            )
        })?;
    Ok((width.max(1), th))
}

/// Tiles in a snapshot of a `batch`-element state: at most [`MAX_SNAPSHOT_TILES`] batch
/// elements, plus the target when there is one.
pub fn snapshot_tiles(batch: usize, with_target: bool) -> usize {
    batch.min(MAX_SNAPSHOT_TILES) + usize::from(with_target)
}

/// Bytes of an RGB picture of `width × height` pixels; `None` when it overflows u64.
pub fn rgb_bytes(width: u32, height: u32) -> Option<u64> {
    u64::from(width)
        .checked_mul(u64::from(height))?
        .checked_mul(3)
}

/// Tiles side by side with a gap between them; an error when the row is too wide for an
/// image.
pub fn row(tiles: &[RgbImage]) -> Result<RgbImage> {
    let h = tiles.iter().map(|t| t.height()).max().unwrap_or(1);
    let w = tiles
        .iter()
        .try_fold(0u32, |sum, t| sum.checked_add(t.width()))
        .and_then(|sum| {
            sum.checked_add(GAP.checked_mul(u32::try_from(tiles.len().saturating_sub(1)).ok()?)?)
        })
        .ok_or_else(|| invalid!("{} tiles side by side are too wide to draw", tiles.len()))?;
    let mut out = RgbImage::from_pixel(w.max(1), h, BACKGROUND);
    let mut x0 = 0;
    for t in tiles {
        image::imageops::replace(&mut out, t, i64::from(x0), 0);
        x0 += t.width() + GAP;
    }
    Ok(out)
}

/// A snapshot: every batch element of the state (at most 8), then the target (batch 0).
pub fn snapshot(
    state: &HostTensor,
    target: Option<&HostTensor>,
    visible: usize,
    scale: u32,
) -> Result<RgbImage> {
    let [b, ..] = state.dims4("state")?;
    let mut tiles = Vec::new();
    for i in 0..b.min(MAX_SNAPSHOT_TILES) {
        tiles.push(tile(state, i, visible, scale)?);
    }
    if let Some(t) = target {
        tiles.push(tile(t, 0, visible, scale)?);
    }
    row(&tiles)
}

/// Saves an image as PNG, naming the file on failure.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    img.save_with_format(path, image::ImageFormat::Png)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `dir/step_NNNNNN.png`.
pub fn step_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step_{step:06}.png"))
}

/// The `(step, path)` of every `step_NNNNNN.png` in `dir`, sorted by step.
pub fn list_steps(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    if !dir.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step_"))
            .and_then(|n| n.strip_suffix(".png"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Evenly thins `items` to at most `max`, keeping the first and the last.
pub fn thin<T: Clone>(items: &[T], max: usize) -> Vec<T> {
    if items.len() <= max || max < 2 {
        return items.to_vec();
    }
    (0..max)
        .map(|i| items[i * (items.len() - 1) / (max - 1)].clone())
        .collect()
}

/// Writes the `step_*.png` files of `dir` (thinned to [`MAX_GIF_FRAMES`]) as a looping GIF,
/// one frame at a time: only the frame being encoded is in memory. Frames whose size
/// differs from the last one (e.g. after a change of `scale`) are skipped. Returns the
/// number of frames written.
pub fn gif_from_dir(dir: &Path, out: &Path, frame_ms: u32) -> Result<usize> {
    let steps = thin(&list_steps(dir)?, MAX_GIF_FRAMES);
    let Some((_, last)) = steps.last() else {
        return Ok(0);
    };
    let size =
        image::image_dimensions(last).with_context(|| format!("cannot read {}", last.display()))?;
    let mut gif = GifWriter::create(out, frame_ms)?;
    let mut written = 0;
    for (_, path) in &steps {
        // The header alone tells the size, so a skipped frame is never decoded.
        let dims = image::image_dimensions(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if dims != size {
            continue;
        }
        let img = image::open(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .to_rgb8();
        gif.frame(&img)?;
        written += 1;
    }
    gif.finish()?;
    Ok(written)
}

/// A GIF that loops forever, written frame by frame as the frames come.
pub struct GifWriter {
    encoder: GifEncoder<CheckedFile>,
    failed: Rc<Cell<Option<Failure>>>,
    delay: Delay,
    path: PathBuf,
}

impl GifWriter {
    /// Creates `out` for frames shown `frame_ms` each.
    pub fn create(out: &Path, frame_ms: u32) -> Result<Self> {
        let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
        let failed = Rc::new(Cell::new(None));
        let file = CheckedFile {
            inner: BufWriter::new(file),
            failed: Rc::clone(&failed),
        };
        let mut encoder = GifEncoder::new_with_speed(file, 10);
        encoder.set_repeat(Repeat::Infinite)?;
        Ok(Self {
            encoder,
            failed,
            delay: Delay::from_numer_denom_ms(frame_ms, 1),
            path: out.to_path_buf(),
        })
    }

    /// Encodes and writes one frame.
    pub fn frame(&mut self, img: &RgbImage) -> Result<()> {
        let rgba: RgbaImage = image::DynamicImage::ImageRgb8(img.clone()).to_rgba8();
        self.encoder
            .encode_frame(Frame::from_parts(rgba, 0, 0, self.delay))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Writes the GIF's trailer and the buffered rest of the file; an error if any write
    /// failed, so a truncated GIF never passes for a whole one.
    pub fn finish(self) -> Result<()> {
        // The encoder writes the trailer when dropped and the file flushes when dropped;
        // neither can return an error, so the file records it.
        drop(self.encoder);
        match self.failed.get() {
            None => Ok(()),
            Some(failure) => Err(crate::error::Error::from(failure.error())
                .context(format!("cannot write {}", self.path.display()))),
        }
    }
}

/// What a failed write was, kept to be reported later.
#[derive(Clone, Copy, Debug)]
struct Failure {
    kind: std::io::ErrorKind,
    os: Option<i32>,
}

impl Failure {
    fn error(self) -> std::io::Error {
        self.os
            .map_or_else(|| self.kind.into(), std::io::Error::from_raw_os_error)
    }
}

/// A buffered file that records the first failed write or flush, including the flush
/// when it is dropped.
struct CheckedFile {
    inner: BufWriter<File>,
    failed: Rc<Cell<Option<Failure>>>,
}

impl CheckedFile {
    fn check<T>(&self, result: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &result {
            if self.failed.get().is_none() {
                self.failed.set(Some(Failure {
                    kind: e.kind(),
                    os: e.raw_os_error(),
                }));
            }
        }
        result
    }
}

impl Write for CheckedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let result = self.inner.write(buf);
        self.check(result)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let result = self.inner.flush();
        self.check(result)
    }
}

impl Drop for CheckedFile {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Height of the label above each contact-sheet tile.
const LABEL_HEIGHT: u32 = 22;

/// Narrowest contact-sheet cell, so labels fit above small tiles.
const MIN_CELL_WIDTH: u32 = 72;

/// Cell width, cell height, columns and the sheet's width and height of a contact sheet
/// of `count` tiles of at most `tile_w × tile_h` pixels, `columns` per row; an error when
/// the sheet does not fit an image (drawn text needs sides below 2^31).
pub fn contact_sheet_size(
    tile_w: u32,
    tile_h: u32,
    count: usize,
    columns: usize,
) -> Result<(u32, u32, u32, u32, u32)> {
    let too_large = || {
        invalid!(
            "a contact sheet of {count} tiles of {tile_w}x{tile_h} pixels is too large to draw"
        )
    };
    let count = u32::try_from(count).map_err(|_| too_large())?;
    let columns =
        u32::try_from(columns.clamp(1, count.max(1) as usize)).map_err(|_| too_large())?;
    let rows = count.div_ceil(columns).max(1);
    let cell_w = tile_w
        .max(MIN_CELL_WIDTH)
        .checked_add(GAP * 2)
        .ok_or_else(too_large)?;
    let cell_h = tile_h
        .checked_add(LABEL_HEIGHT + GAP * 2)
        .ok_or_else(too_large)?;
    let w = cell_w.checked_mul(columns).ok_or_else(too_large)?;
    let h = cell_h.checked_mul(rows).ok_or_else(too_large)?;
    if i32::try_from(w).is_err() || i32::try_from(h).is_err() {
        return Err(too_large());
    }
    Ok((cell_w, cell_h, columns, w, h))
}

/// A labelled contact sheet: one tile per `(label, image)`, up to `columns` per row.
pub fn contact_sheet(tiles: &[(String, RgbImage)], columns: usize) -> Result<RgbImage> {
    register_font()?;
    let label_h = LABEL_HEIGHT;
    let tw = tiles.iter().map(|(_, t)| t.width()).max().unwrap_or(1);
    let th = tiles.iter().map(|(_, t)| t.height()).max().unwrap_or(1);
    let (cell_w, cell_h, columns, w, h) = contact_sheet_size(tw, th, tiles.len(), columns)?;
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    for (i, (_, t)) in tiles.iter().enumerate() {
        let (cx, cy) = ((i as u32 % columns) * cell_w, (i as u32 / columns) * cell_h);
        let x = cx + (cell_w - t.width()) / 2;
        image::imageops::replace(&mut img, t, i64::from(x), i64::from(cy + label_h + GAP));
    }
    {
        let root = BitMapBackend::with_buffer(&mut img, (w, h)).into_drawing_area();
        let style = TextStyle::from((FONT_FAMILY, 15).into_font())
            .color(&BLACK)
            .pos(plotters::style::text_anchor::Pos::new(
                plotters::style::text_anchor::HPos::Center,
                plotters::style::text_anchor::VPos::Top,
            ));
        for (i, (label, _)) in tiles.iter().enumerate() {
            let (cx, cy) = ((i as u32 % columns) * cell_w, (i as u32 / columns) * cell_h);
            let pos = ((cx + cell_w / 2) as i32, (cy + GAP) as i32);
            root.draw_text(label, &style, pos)
                .map_err(|e| invalid!("drawing a label: {e:?}"))?;
        }
        root.present()
            .map_err(|e| invalid!("drawing the contact sheet: {e:?}"))?;
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_clamp_and_upscale() {
        let t = HostTensor::new(&[1, 3, 1, 2], vec![2.0, -1.0, 0.5, 0.0, 0.0, 1.0])
            .expect("6 elements");
        let img = tile(&t, 0, 3, 2).expect("draws");
        assert_eq!(img.dimensions(), (4, 2));
        assert_eq!(img.get_pixel(0, 0).0, [255, 128, 0]);
        assert_eq!(img.get_pixel(3, 1).0, [0, 0, 255]);
    }

    #[test]
    fn thinning_keeps_ends() {
        let v: Vec<u32> = (0..10).collect();
        assert_eq!(thin(&v, 4), vec![0, 3, 6, 9]);
        assert_eq!(thin(&v, 20), v);
    }

    #[test]
    fn gif_from_dir_streams_frames_of_the_last_size_in_step_order() {
        use image::AnimationDecoder;
        let tmp = tempfile::tempdir().expect("tempdir");
        // An early frame at another scale is skipped; the rest keep their order.
        save_png(&RgbImage::new(4, 4), &step_path(tmp.path(), 0)).expect("png");
        for (step, shade) in [(10, 50), (20, 150), (30, 250)] {
            let img = RgbImage::from_pixel(6, 3, Rgb([shade, 0, 0]));
            save_png(&img, &step_path(tmp.path(), step)).expect("png");
        }
        let out = tmp.path().join("t.gif");
        assert_eq!(gif_from_dir(tmp.path(), &out, 40).expect("writes"), 3);
        let file = std::io::BufReader::new(File::open(&out).expect("gif"));
        let frames = image::codecs::gif::GifDecoder::new(file)
            .expect("header")
            .into_frames()
            .collect_frames()
            .expect("whole frames");
        let reds: Vec<u8> = frames
            .iter()
            .map(|f| {
                assert_eq!(f.buffer().dimensions(), (6, 3));
                f.buffer().get_pixel(0, 0).0[0]
            })
            .collect();
        assert_eq!(reds.len(), 3);
        assert!(reds[0] < reds[1] && reds[1] < reds[2], "{reds:?}");
    }

    #[test]
    fn contact_sheet_draws_labels() {
        let tiles: Vec<(String, RgbImage)> = (0..3)
            .map(|i| (format!("step {i}"), RgbImage::new(16, 16)))
            .collect();
        let img = contact_sheet(&tiles, 2).expect("draws");
        let dark = img
            .pixels()
            .filter(|p| p.0[0] < 128 && p.0[1] < 128)
            .count();
        assert!(dark > 3 * 16 * 16, "tiles and text are drawn");
    }
}
