//! Targets: what the visible channels should become, rendered to a `[B, V, H, W]` tensor.
//!
//! Colours are `(r, g, b)` in `[0, 1]`. With one visible channel (grey) a colour becomes
//! its luma `0.299 r + 0.587 g + 0.114 b`.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::{bail, invalid, Result, ResultExt};
use crate::events::{self, Events, Level, Quiet};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView, ImageFormat};
use nca_api::{HostTensor, IoError, MemoryLimit, NcaConfig};
use serde::{Deserialize, Serialize};

/// An `(r, g, b)` colour with components in `[0, 1]`.
pub type Rgb = (f32, f32, f32);

/// Direction of a [`Target::Gradient`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// `from` on the left, `to` on the right.
    Horizontal,
    /// `from` at the top, `to` at the bottom.
    Vertical,
    /// `from` at the top-left corner, `to` at the bottom-right.
    Diagonal,
}

/// The picture the visible channels are trained towards.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum Target {
    /// One colour everywhere: `Solid(1.0, 0.0, 0.0)`.
    Solid(f32, f32, f32),
    /// A PNG file (or a GIF, whose first frame is used), path relative to the config
    /// file: `Image(path: "frame.png")`.
    ///
    /// Pixels with alpha are composited over `background` (white by default) and the log
    /// says so. A picture whose aspect ratio differs from the grid's is centre-cropped to
    /// it (`fit: Crop`, default) or stretched with a warning (`fit: Stretch`); then it is
    /// resized (Lanczos) to the grid. A grey image may train an RGB model; a colour image
    /// with `visible_channels: 1` is an error.
    Image {
        /// PNG or GIF file; a relative path is taken from the config file's directory.
        path: PathBuf,
        /// Colour behind transparent pixels.
        #[serde(default = "white")]
        background: Rgb,
        /// How a picture of another aspect ratio is fitted to the grid.
        #[serde(default)]
        fit: Fit,
    },
    /// A linear blend: `Gradient(from: (0.0, 0.0, 1.0), to: (1.0, 1.0, 0.0), direction: Horizontal)`.
    Gradient {
        /// Colour at the start.
        from: Rgb,
        /// Colour at the end.
        to: Rgb,
        /// Which way the blend runs.
        #[serde(default = "default_direction")]
        direction: Direction,
    },
    /// Squares of `cell × cell` cells alternating `a` and `b`, `a` in the top-left corner.
    Checkerboard {
        /// Side of one square in cells.
        cell: usize,
        /// First colour.
        a: Rgb,
        /// Second colour.
        b: Rgb,
    },
    /// A centred disc of radius `radius × min(H, W) / 2` in `inside`, on `outside`.
    Disc {
        /// Radius as a fraction of half the shorter side, in `(0, 1]` to fit the grid.
        radius: f32,
        /// Colour of the disc.
        inside: Rgb,
        /// Colour around it.
        outside: Rgb,
    },
}

/// How a picture whose aspect ratio differs from the grid's is fitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fit {
    /// Cut the largest centred part with the grid's aspect ratio (keeps shapes).
    #[default]
    Crop,
    /// Scale each axis on its own (keeps everything, distorts shapes; logs a warning).
    Stretch,
}

fn white() -> Rgb {
    (1.0, 1.0, 1.0)
}

fn default_direction() -> Direction {
    Direction::Horizontal
}

impl Target {
    /// Checks colours and sizes; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let colour = |name: &str, c: Rgb| -> Result<()> {
            for x in [c.0, c.1, c.2] {
                if !(0.0..=1.0).contains(&x) {
                    bail!(
                        "invalid config field `target.{name}`: colour components must be in \
                         [0, 1], found ({}, {}, {})",
                        c.0,
                        c.1,
                        c.2
                    );
                }
            }
            Ok(())
        };
        match self {
            Target::Solid(r, g, b) => colour("Solid", (*r, *g, *b)),
            Target::Image { background, .. } => colour("Image.background", *background),
            Target::Gradient { from, to, .. } => {
                colour("Gradient.from", *from)?;
                colour("Gradient.to", *to)
            }
            Target::Checkerboard { cell, a, b } => {
                if *cell == 0 {
                    bail!(
                        "invalid config field `target.Checkerboard.cell`: expected >= 1, found 0"
                    );
                }
                colour("Checkerboard.a", *a)?;
                colour("Checkerboard.b", *b)
            }
            Target::Disc {
                radius,
                inside,
                outside,
            } => {
                if !(radius.is_finite() && *radius > 0.0) {
                    bail!(
                        "invalid config field `target.Disc.radius`: expected a value > 0, \
                         found {radius}"
                    );
                }
                colour("Disc.inside", *inside)?;
                colour("Disc.outside", *outside)
            }
        }
    }

    /// The same target with an image path made absolute against `base` (the config
    /// file's directory), so a copied config still finds it.
    pub fn resolved(&self, base: &Path) -> Self {
        match self {
            Target::Image {
                path,
                background,
                fit,
            } if path.is_relative() => {
                let joined = base.join(path);
                Target::Image {
                    path: std::fs::canonicalize(&joined).unwrap_or(joined),
                    background: *background,
                    fit: *fit,
                }
            }
            other => other.clone(),
        }
    }

    /// Renders the `[B, V, H, W]` target of `cfg`; image paths are relative to `base`.
    /// Sizes are checked against the memory limit of the environment
    /// ([`MemoryLimit::from_env`]); [`Target::render_limited`] takes one.
    pub fn render(&self, cfg: &NcaConfig, base: &Path) -> Result<HostTensor> {
        self.render_limited(cfg, base, &MemoryLimit::from_env()?, &mut Quiet)
    }

    /// Renders the `[B, V, H, W]` target of `cfg` (image paths relative to `base`) after
    /// checking that it, and a target image decoded at its declared size, fit `limit`.
    /// How a picture was fitted to the grid (cropped, resized, composited) is told to
    /// `events` as notes.
    pub fn render_limited(
        &self,
        cfg: &NcaConfig,
        base: &Path,
        limit: &MemoryLimit,
        events: &mut dyn Events,
    ) -> Result<HostTensor> {
        let (h, w) = (cfg.grid.height, cfg.grid.width);
        let v = cfg.model.visible_channels;
        limit.check(
            &format!("the target of a {h}x{w} grid (batch {})", cfg.grid.batch),
            target_bytes(cfg),
            "lower grid.height / grid.width or grid.batch",
        )?;
        let plane: Vec<Rgb> = match self {
            Target::Solid(r, g, b) => vec![(*r, *g, *b); h * w],
            Target::Image {
                path,
                background,
                fit,
            } => {
                let path = base.join(path);
                let what = format!("target image {}", path.display());
                let img = load_image(&path, &what, h, w, v, limit)?;
                fit_picture(img, &what, h, w, *background, *fit, events)?
            }
            Target::Gradient {
                from,
                to,
                direction,
            } => {
                let mut out = Vec::with_capacity(h * w);
                for y in 0..h {
                    for x in 0..w {
                        let fx = frac(x, w);
                        let fy = frac(y, h);
                        let t = match direction {
                            Direction::Horizontal => fx,
                            Direction::Vertical => fy,
                            Direction::Diagonal => (fx + fy) / 2.0,
                        };
                        out.push(lerp(*from, *to, t));
                    }
                }
                out
            }
            Target::Checkerboard { cell, a, b } => {
                let mut out = Vec::with_capacity(h * w);
                for y in 0..h {
                    for x in 0..w {
                        out.push(if (y / cell + x / cell) % 2 == 0 {
                            *a
                        } else {
                            *b
                        });
                    }
                }
                out
            }
            Target::Disc {
                radius,
                inside,
                outside,
            } => {
                let r = radius * h.min(w) as f32 / 2.0;
                let (cy, cx) = (h as f32 / 2.0, w as f32 / 2.0);
                let mut out = Vec::with_capacity(h * w);
                for y in 0..h {
                    for x in 0..w {
                        let (dy, dx) = (y as f32 + 0.5 - cy, x as f32 + 0.5 - cx);
                        let d = (dy * dy + dx * dx).sqrt();
                        out.push(if d <= r { *inside } else { *outside });
                    }
                }
                out
            }
        };
        target_tensor(&plane, cfg)
    }
}

/// The `[B, V, H, W]` target of `cfg` from one colour per cell (row-major `H × W`): the
/// colours' luma with one visible channel, else R, G, B (and zeros for further visible
/// channels), repeated over the batch.
fn target_tensor(plane: &[Rgb], cfg: &NcaConfig) -> Result<HostTensor> {
    let (h, w, v) = (cfg.grid.height, cfg.grid.width, cfg.model.visible_channels);
    let mut one = Vec::with_capacity(v * h * w);
    if v == 1 {
        one.extend(
            plane
                .iter()
                .map(|c| 0.299 * c.0 + 0.587 * c.1 + 0.114 * c.2),
        );
    } else {
        one.extend(plane.iter().map(|c| c.0));
        one.extend(plane.iter().map(|c| c.1));
        one.extend(plane.iter().map(|c| c.2));
        one.resize(v * h * w, 0.0);
    }
    let data = one.repeat(cfg.grid.batch);
    Ok(HostTensor::new(&cfg.target_shape(), data)?)
}

/// A picture given as pixels rather than a file (a numpy array in Python): `height ×
/// width` pixels of `channels` (1 grey, 3 RGB or 4 RGBA) values in `[0, 1]`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Pixels {
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// Values per pixel: 1 (grey), 3 (RGB) or 4 (RGBA).
    pub channels: usize,
    /// `height · width · channels` values in `[0, 1]`.
    pub data: Vec<f32>,
}

/// Fits `pixels` to `cfg`'s grid exactly as an image file is fitted (alpha composited over
/// `background`, centre-cropped or stretched by `fit`, Lanczos-resized) and returns the
/// `[B, V, H, W]` target; `what` names the picture in messages and notes.
pub fn fit_pixels(
    pixels: &Pixels,
    cfg: &NcaConfig,
    background: Rgb,
    fit: Fit,
    what: &str,
    events: &mut dyn Events,
) -> Result<HostTensor> {
    let Pixels {
        height,
        width,
        channels,
        ..
    } = *pixels;
    let expected = height
        .checked_mul(width)
        .and_then(|n| n.checked_mul(channels));
    if !matches!(channels, 1 | 3 | 4) || expected != Some(pixels.data.len()) {
        bail!(
            "{what}: expected {height}x{width} pixels of 1, 3 or 4 values ({} values), found \
             {} values with {channels} per pixel",
            expected.map_or_else(|| "too many".to_string(), |n| n.to_string()),
            pixels.data.len()
        );
    }
    if height == 0 || width == 0 {
        bail!("{what}: expected a picture of at least 1x1 pixels, found {height}x{width}");
    }
    if let Some(bad) = pixels
        .data
        .iter()
        .position(|x| !(x.is_finite() && (0.0..=1.0).contains(x)))
    {
        bail!(
            "{what}: values must be in [0, 1] (uint8 pictures are divided by 255), found {} \
             at index {bad}",
            pixels.data[bad]
        );
    }
    let (iw, ih) = (
        u32::try_from(width).map_err(|_| invalid!("{what}: {width} columns are too many"))?,
        u32::try_from(height).map_err(|_| invalid!("{what}: {height} rows are too many"))?,
    );
    let rgba: Vec<f32> = pixels
        .data
        .chunks_exact(channels)
        .flat_map(|p| match *p {
            [g] => [g, g, g, 1.0],
            [r, g, b] => [r, g, b, 1.0],
            [r, g, b, a] => [r, g, b, a],
            _ => [0.0; 4],
        })
        .collect();
    let img = image::Rgba32FImage::from_raw(iw, ih, rgba)
        .ok_or_else(|| invalid!("{what}: the pixel count does not match {width}x{height}"))?;
    let img = DynamicImage::ImageRgba32F(img);
    if channels >= 3 && cfg.model.visible_channels == 1 {
        bail!(
            "{what} is a colour image but model.visible_channels is 1 (grey); convert the \
             picture to greyscale or set visible_channels: 3"
        );
    }
    let (h, w) = (cfg.grid.height, cfg.grid.width);
    let plane = fit_picture(img, what, h, w, background, fit, events)?;
    target_tensor(&plane, cfg)
}

/// Bytes [`Target::render_limited`] allocates for `cfg`'s target: a colour per cell, one
/// batch element and the whole `[B, V, H, W]` tensor; `None` when it overflows.
pub fn target_bytes(cfg: &NcaConfig) -> Option<u64> {
    let cells = u64::try_from(cfg.grid.height)
        .ok()?
        .checked_mul(u64::try_from(cfg.grid.width).ok()?)?;
    let v = u64::try_from(cfg.model.visible_channels).ok()?;
    let b = u64::try_from(cfg.grid.batch).ok()?;
    let colours = cells.checked_mul(12)?;
    let one = cells.checked_mul(v)?.checked_mul(4)?;
    colours.checked_add(one)?.checked_add(one.checked_mul(b)?)
}

/// Bytes decoding an `iw × ih` picture and fitting it to an `h × w` grid allocates at
/// once, at most: the decoded picture (up to 16-bit RGBA), its f32 RGBA and RGB copies,
/// the crop, and Lanczos' intermediate (`w × ih`) and result; `None` on overflow.
pub fn image_bytes(iw: u32, ih: u32, h: usize, w: usize) -> Option<u64> {
    let source = u64::from(iw).checked_mul(u64::from(ih))?;
    let w = u64::try_from(w).ok()?;
    let h = u64::try_from(h).ok()?;
    let per_source_pixel = 8 + 16 + 12 + 12;
    let intermediate = w.checked_mul(u64::from(ih))?.checked_mul(12)?;
    let result = w.checked_mul(h)?.checked_mul(12 * 2)?;
    source
        .checked_mul(per_source_pixel)?
        .checked_add(intermediate)?
        .checked_add(result)
}

fn frac(i: usize, n: usize) -> f32 {
    if n <= 1 {
        0.0
    } else {
        i as f32 / (n - 1) as f32
    }
}

fn lerp(a: Rgb, b: Rgb, t: f32) -> Rgb {
    (
        a.0 + (b.0 - a.0) * t,
        a.1 + (b.1 - a.1) * t,
        a.2 + (b.2 - a.2) * t,
    )
}

/// What a target image may be: the formats compiled into `image` here.
const TARGET_FORMATS: &str = "a PNG or GIF file (of a GIF, the first frame)";

/// A reader of the picture in `file`, from its start, with `limit` as the decoder's
/// allocation limit; only PNG and GIF are accepted.
fn image_reader<'f>(
    file: &'f File,
    what: &str,
    limit: &MemoryLimit,
) -> Result<image::ImageReader<BufReader<&'f File>>> {
    let mut at_start = file;
    at_start
        .seek(SeekFrom::Start(0))
        .with_context(|| format!("cannot read {what}"))?;
    let mut reader = image::ImageReader::new(BufReader::new(file))
        .with_guessed_format()
        .with_context(|| format!("cannot read {what}"))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Gif) => {}
        Some(other) => {
            bail!("cannot decode {what}: it is a {other:?} picture; expected {TARGET_FORMATS}")
        }
        None => bail!("cannot decode {what}: not a picture; expected {TARGET_FORMATS}"),
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(limit.bytes);
    reader.limits(limits);
    Ok(reader)
}

/// Decodes the picture at `path` (PNG or GIF, a regular file), after checking its declared
/// size against `limit`; a colour picture for a grey model is refused.
fn load_image(
    path: &Path,
    what: &str,
    h: usize,
    w: usize,
    v: usize,
    limit: &MemoryLimit,
) -> Result<DynamicImage> {
    let what = || what.to_string();
    // A FIFO would block the open (and every read) forever; nca-api checks the type first.
    let (file, _) = nca_api::io::open_regular_file(path).map_err(|e| match e {
        IoError::Io { source, .. } => {
            crate::error::Error::from(source).context(format!("cannot open {}", what()))
        }
        IoError::Format { message, .. } => {
            invalid!("cannot open {}: it is {message}", what())
        }
        other => crate::error::Error::from(other),
    })?;
    // The declared size first: a small file can claim a picture of gigabytes.
    let (iw, ih) = image_reader(&file, &what(), limit)?
        .into_dimensions()
        .with_context(|| format!("cannot decode {} (expected {TARGET_FORMATS})", what()))?;
    limit.check(
        &format!("decoding {} ({iw}x{ih} pixels)", what()),
        image_bytes(iw, ih, h, w),
        "use a smaller picture (it is resized to the grid anyway)",
    )?;
    let img = image_reader(&file, &what(), limit)?
        .decode()
        .with_context(|| format!("cannot decode {} (expected {TARGET_FORMATS})", what()))?;
    let colour = img.color();
    if colour.has_color() && v == 1 {
        bail!(
            "{} is a colour image but model.visible_channels is 1 (grey); convert the image \
             to greyscale or set visible_channels: 3",
            what()
        );
    }
    Ok(img)
}

/// The picture as one colour per grid cell: alpha composited over `background`, fitted
/// to the grid's aspect ratio by `fit`, resized (Lanczos) and clamped to `[0, 1]`.
fn fit_picture(
    img: DynamicImage,
    what: &str,
    h: usize,
    w: usize,
    background: Rgb,
    fit: Fit,
    events: &mut dyn Events,
) -> Result<Vec<Rgb>> {
    let rgba = img.to_rgba32f();
    let see_through = rgba.pixels().filter(|p| p.0[3] < 1.0).count();
    if see_through > 0 {
        let _ = events::note(
            events,
            Level::Info,
            &format!(
                "{what} has {see_through} (partly) transparent pixels: compositing them over \
                 the background ({}, {}, {})",
                background.0, background.1, background.2
            ),
        );
    }
    let bg = [background.0, background.1, background.2];
    let flat = image::Rgb32FImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = p[3].clamp(0.0, 1.0);
        image::Rgb([0, 1, 2].map(|c| a * p[c] + (1.0 - a) * bg[c]))
    });
    let rgb = fit_to_grid(DynamicImage::ImageRgb32F(flat), h, w, fit, what, events)?;
    Ok(rgb
        .pixels()
        .map(|p| {
            (
                p.0[0].clamp(0.0, 1.0),
                p.0[1].clamp(0.0, 1.0),
                p.0[2].clamp(0.0, 1.0),
            )
        })
        .collect())
}

/// The largest centred `(x, y, width, height)` of an `iw × ih` picture with the aspect
/// ratio `w : h`.
pub fn centre_crop(iw: u32, ih: u32, h: usize, w: usize) -> (u32, u32, u32, u32) {
    // Compare iw/ih with w/h in integers: iw·h against ih·w.
    let (iw64, ih64, h64, w64) = (u64::from(iw), u64::from(ih), h as u64, w as u64);
    if iw64 * h64 > ih64 * w64 {
        let cw = ((ih64 * w64 + h64 / 2) / h64).clamp(1, iw64) as u32;
        ((iw - cw) / 2, 0, cw, ih)
    } else {
        let ch = ((iw64 * h64 + w64 / 2) / w64).clamp(1, ih64) as u32;
        (0, (ih - ch) / 2, iw, ch)
    }
}

fn fit_to_grid(
    img: DynamicImage,
    h: usize,
    w: usize,
    fit: Fit,
    what: &str,
    events: &mut dyn Events,
) -> Result<image::Rgb32FImage> {
    let (w32, h32) = (
        u32::try_from(w).map_err(|_| invalid!("grid too wide"))?,
        u32::try_from(h).map_err(|_| invalid!("grid too tall"))?,
    );
    let (iw, ih) = img.dimensions();
    let same_aspect = u64::from(iw) * h as u64 == u64::from(ih) * w as u64;
    let img = match fit {
        Fit::Crop if !same_aspect => {
            let (x, y, cw, ch) = centre_crop(iw, ih, h, w);
            let _ = events::note(
                events,
                Level::Info,
                &format!(
                    "{what} is {iw}x{ih}, the grid {w}x{h}: using its centred {cw}x{ch} part \
                     (fit: Crop keeps the aspect ratio)"
                ),
            );
            img.crop_imm(x, y, cw, ch)
        }
        Fit::Stretch if !same_aspect => {
            let _ = events::note(
                events,
                Level::Warn,
                &format!(
                    "{what} is {iw}x{ih} but the grid is {w}x{h}: stretching it changes its \
                     aspect ratio (fit: Stretch; fit: Crop would keep it)"
                ),
            );
            img
        }
        _ => img,
    };
    let (iw, ih) = img.dimensions();
    let img = if (iw, ih) != (w32, h32) {
        let _ = events::note(
            events,
            Level::Info,
            &format!("{what}: resizing {iw}x{ih} to the grid's {w}x{h} (Lanczos)"),
        );
        img.resize_exact(w32, h32, FilterType::Lanczos3)
    } else {
        img
    };
    Ok(img.to_rgb32f())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, w: usize, v: usize, batch: usize) -> NcaConfig {
        let mut c = NcaConfig::default();
        c.grid.height = h;
        c.grid.width = w;
        c.grid.batch = batch;
        c.model.visible_channels = v;
        c
    }

    #[test]
    fn solid_fills_every_batch_and_channel() {
        let t = Target::Solid(1.0, 0.5, 0.0)
            .render(&cfg(2, 3, 3, 2), Path::new("."))
            .expect("renders");
        assert_eq!(t.shape(), &[2, 3, 2, 3]);
        assert_eq!(&t.data()[..6], &[1.0; 6]);
        assert_eq!(&t.data()[6..12], &[0.5; 6]);
        assert_eq!(&t.data()[18..24], &[1.0; 6]);
    }

    #[test]
    fn grey_uses_luma() {
        let t = Target::Solid(1.0, 0.0, 0.0)
            .render(&cfg(1, 1, 1, 1), Path::new("."))
            .expect("renders");
        assert!((t.data()[0] - 0.299).abs() < 1e-6);
    }

    #[test]
    fn procedural_targets_have_their_shape() {
        let c = cfg(4, 4, 3, 1);
        let board = Target::Checkerboard {
            cell: 2,
            a: (1.0, 1.0, 1.0),
            b: (0.0, 0.0, 0.0),
        }
        .render(&c, Path::new("."))
        .expect("renders");
        assert_eq!(&board.data()[..4], &[1.0, 1.0, 0.0, 0.0]);
        let grad = Target::Gradient {
            from: (0.0, 0.0, 0.0),
            to: (1.0, 1.0, 1.0),
            direction: Direction::Vertical,
        }
        .render(&c, Path::new("."))
        .expect("renders");
        assert_eq!(grad.data()[0], 0.0);
        assert_eq!(grad.data()[15], 1.0);
        let disc = Target::Disc {
            radius: 0.5,
            inside: (1.0, 0.0, 0.0),
            outside: (0.0, 0.0, 1.0),
        }
        .render(&c, Path::new("."))
        .expect("renders");
        assert_eq!(disc.data()[5], 1.0, "centre is inside");
        assert_eq!(disc.data()[0], 0.0, "corner is outside");
    }

    #[test]
    fn centre_crop_keeps_the_grid_aspect() {
        assert_eq!(centre_crop(20, 12, 8, 8), (4, 0, 12, 12));
        assert_eq!(centre_crop(12, 20, 8, 8), (0, 4, 12, 12));
        assert_eq!(centre_crop(30, 10, 8, 16), (5, 0, 20, 10));
        assert_eq!(centre_crop(16, 16, 8, 8), (0, 0, 16, 16));
    }

    #[test]
    fn alpha_is_composited_over_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut img = image::RgbaImage::from_pixel(2, 2, image::Rgba([255, 0, 0, 255]));
        img.put_pixel(1, 0, image::Rgba([255, 0, 0, 0]));
        img.put_pixel(0, 1, image::Rgba([0, 0, 0, 128]));
        img.save(dir.path().join("a.png")).expect("png");
        let t = Target::Image {
            path: "a.png".into(),
            background: (0.0, 0.0, 1.0),
            fit: Fit::Crop,
        }
        .render(&cfg(2, 2, 3, 1), dir.path())
        .expect("renders");
        let d = t.data();
        // Red plane, then green, then blue; pixels (0,0) (1,0) (0,1) (1,1).
        assert_eq!(&d[0..4], &[1.0, 0.0, 0.0, 1.0]);
        assert_eq!(&d[8..10], &[0.0, 1.0]);
        assert!((d[10] - (1.0 - 128.0 / 255.0)).abs() < 1e-6, "{}", d[10]);
    }

    #[test]
    fn colours_out_of_range_are_rejected() {
        let err = Target::Solid(2.0, 0.0, 0.0)
            .validate()
            .expect_err("rejected");
        assert!(format!("{err}").contains("target.Solid"));
    }
}
