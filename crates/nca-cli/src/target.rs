//! Targets: what the visible channels should become, rendered to a `[B, V, H, W]` tensor.
//!
//! Colours are `(r, g, b)` in `[0, 1]`. With one visible channel (grey) a colour becomes
//! its luma `0.299 r + 0.587 g + 0.114 b`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, GenericImageView};
use nca_api::{HostTensor, NcaConfig};
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
    /// A PNG file, path relative to the config file: `Image(path: "frame.png")`.
    ///
    /// An image whose size differs from the grid is resized with a bilinear filter
    /// (`Triangle`, which averages when shrinking) and a warning is logged. An opaque alpha
    /// channel is dropped; a transparent pixel is an error. A grey image may train an RGB
    /// model; a colour image with `visible_channels: 1` is an error.
    Image {
        /// PNG file; a relative path is taken from the config file's directory.
        path: PathBuf,
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
            Target::Image { .. } => Ok(()),
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
            Target::Image { path } if path.is_relative() => {
                let joined = base.join(path);
                Target::Image {
                    path: std::fs::canonicalize(&joined).unwrap_or(joined),
                }
            }
            other => other.clone(),
        }
    }

    /// Renders the `[B, V, H, W]` target of `cfg`; image paths are relative to `base`.
    pub fn render(&self, cfg: &NcaConfig, base: &Path) -> Result<HostTensor> {
        let (h, w) = (cfg.grid.height, cfg.grid.width);
        let v = cfg.model.visible_channels;
        let plane: Vec<Rgb> = match self {
            Target::Solid(r, g, b) => vec![(*r, *g, *b); h * w],
            Target::Image { path } => load_image(&base.join(path), h, w, v)?,
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

fn load_image(path: &Path, h: usize, w: usize, v: usize) -> Result<Vec<Rgb>> {
    let what = || format!("target image {}", path.display());
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", what()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", what()))?
        .decode()
        .with_context(|| format!("cannot decode {} (expected a PNG file)", what()))?;
    let colour = img.color();
    if colour.has_alpha() && img.pixels().any(|(_, _, p)| p.0[3] != u8::MAX) {
        bail!(
            "{} has transparent pixels; flatten it onto a background colour first",
            what()
        );
    }
    if colour.has_color() && v == 1 {
        bail!(
            "{} is a colour image but model.visible_channels is 1 (grey); convert the image \
             to greyscale or set visible_channels: 3",
            what()
        );
    }
    let rgb = DynamicImage::ImageRgb32F(img.to_rgb32f());
    let (iw, ih) = rgb.dimensions();
    let rgb = if (iw as usize, ih as usize) != (w, h) {
        tracing::warn!(
            "{} is {iw}x{ih} but the grid is {w}x{h}: resizing it (bilinear)",
            what()
        );
        let (w32, h32) = (
            u32::try_from(w).context("grid too wide")?,
            u32::try_from(h).context("grid too tall")?,
        );
        rgb.resize_exact(w32, h32, FilterType::Triangle)
    } else {
        rgb
    };
    let rgb = rgb.to_rgb32f();
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
    fn colours_out_of_range_are_rejected() {
        let err = Target::Solid(2.0, 0.0, 0.0)
            .validate()
            .expect_err("rejected");
        assert!(format!("{err}").contains("target.Solid"));
    }
}
