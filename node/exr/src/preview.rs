//! Small sRGB PNG previews of a render's Combined pass: what the live preview of a frame shows
//! while its slices arrive.
//!
//! The Combined pass of one view layer (the named one, or the first that has one in the file's
//! channel order, which is alphabetical) is box-filtered down to fit [`PreviewOptions::max_size`]
//! (never up), in linear premultiplied light, so edges keep their coverage. Each pixel is then
//! un-premultiplied, tone-mapped with an extended Reinhard curve whose white point is
//! [`PREVIEW_WHITE`] (close to Blender's "Standard" view below 1, highlights rolled off instead of
//! clipped), encoded as sRGB, and written with its alpha as an 8-bit RGBA PNG. Non-finite values
//! (fireflies gone wrong) count as black. The PNG is written atomically like the EXR.
//!
//! Memory is the target image plus one block at a time: previews stream like merges.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use exr::block::{BlockIndex, UncompressedBlock};
use exr::meta::attribute::SampleType;
use exr::meta::header::Header;

use crate::channels;
use crate::error::{InputError, PreviewError};
use crate::files::TempFile;
use crate::input::ExrFile;

/// The long side of a preview unless asked otherwise: enough for a panel in Blender's UI or a
/// web page, small enough to send to every watcher of a job after each slice.
pub const DEFAULT_PREVIEW_SIZE: u32 = 512;

/// The largest long side a preview may have; beyond this, use the EXR itself.
pub const MAX_PREVIEW_SIZE: u32 = 8192;

/// Linear value that the tone curve maps to white. Values up to about 1 look as in Blender's
/// "Standard" view; brighter ones roll off until this one.
pub const PREVIEW_WHITE: f32 = 4.0;

/// Where and how to write a preview.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewOptions {
    /// The PNG to write.
    pub path: PathBuf,
    /// The long side, in pixels; smaller images keep their size.
    pub max_size: u32,
    /// The view layer whose Combined pass is shown; `None` for the first that has one.
    pub layer: Option<String>,
}

impl PreviewOptions {
    /// A preview at `path` of the default size, of the first view layer.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_size: DEFAULT_PREVIEW_SIZE,
            layer: None,
        }
    }
}

/// What a preview shows and where it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviewReport {
    /// The PNG written.
    pub path: PathBuf,
    /// Its width in pixels.
    pub width: u32,
    /// Its height in pixels.
    pub height: u32,
    /// The view layer shown.
    pub layer: String,
}

/// Writes a preview of the EXR at `exr` (a merged frame or a single slice).
pub fn preview(
    exr: impl AsRef<Path>,
    options: &PreviewOptions,
) -> Result<PreviewReport, PreviewError> {
    let file = ExrFile::open(exr.as_ref())?;
    let combined = Combined::find(file.header(), &file.path, options)?;
    let handle = File::open(&file.path).map_err(|source| InputError::Read {
        path: file.path.clone(),
        source,
    })?;
    let size = file.header().layer_size;
    let mut scaler = Downscaler::new((size.0, size.1), options.max_size);
    let mut buf = Vec::new();
    for index in 0..file.blocks.len() {
        let block = file.read_block(&handle, index, &mut buf)?;
        scaler.add(&block.index, &combined.rgba(&block, file.header()));
    }
    scaler.write(options, combined.layer)
}

/// Checks a preview size.
pub(crate) fn check_size(size: u32) -> Result<(), PreviewError> {
    if size == 0 || size > MAX_PREVIEW_SIZE {
        return Err(PreviewError::BadSize {
            size,
            limit: MAX_PREVIEW_SIZE,
        });
    }
    Ok(())
}

/// The channels of one view layer's Combined pass.
#[derive(Debug, Clone)]
pub(crate) struct Combined {
    /// The view layer.
    pub layer: String,
    /// Indices of R, G, B and (if present) A in the channel list.
    channels: [Option<usize>; 4],
}

impl Combined {
    /// Finds the Combined pass to preview in `header` (of the EXR at `path`).
    pub(crate) fn find(
        header: &Header,
        path: &Path,
        options: &PreviewOptions,
    ) -> Result<Self, PreviewError> {
        check_size(options.max_size)?;
        let views = header.own_attributes.multi_view_names.as_ref();
        let multiview = views.is_some_and(|v| v.len() >= 2);
        // The first view listed is the file's default view.
        let first_view = views
            .and_then(|v| v.first())
            .map(|v| String::from_utf8_lossy(v.bytes()).into_owned());
        let mut found: Vec<Self> = Vec::new();
        for (index, channel) in header.channels.list.iter().enumerate() {
            let name = String::from_utf8_lossy(channel.name.bytes());
            let Some(parsed) = channels::parse(&name, multiview) else {
                continue;
            };
            if parsed.pass != "Combined" || (multiview && parsed.view != first_view.as_deref()) {
                continue;
            }
            let slot = match parsed.channel {
                "R" => 0,
                "G" => 1,
                "B" => 2,
                "A" => 3,
                _ => continue,
            };
            let entry = match found.iter_mut().find(|c| c.layer == parsed.layer) {
                Some(entry) => entry,
                None => {
                    found.push(Self {
                        layer: parsed.layer.to_string(),
                        channels: [None; 4],
                    });
                    found.last_mut().expect("just pushed")
                }
            };
            entry.channels[slot] = Some(index);
        }
        found.retain(|c| c.channels[..3].iter().all(Option::is_some));
        let chosen = match &options.layer {
            Some(layer) => found.iter().position(|c| &c.layer == layer),
            None => (!found.is_empty()).then_some(0),
        };
        match chosen {
            Some(index) => Ok(found.swap_remove(index)),
            None => Err(PreviewError::NoCombined {
                path: path.to_path_buf(),
                which: options
                    .layer
                    .as_ref()
                    .map(|l| format!(" in view layer {l}"))
                    .unwrap_or_default(),
                available: if found.is_empty() {
                    "none".into()
                } else {
                    found
                        .iter()
                        .map(|c| c.layer.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }

    /// The block's Combined pixels, interleaved RGBA (alpha 1 where the pass has none).
    pub(crate) fn rgba(&self, block: &UncompressedBlock, header: &Header) -> Vec<f32> {
        let (width, height) = (block.index.pixel_size.0, block.index.pixel_size.1);
        let list = &header.channels.list;
        let line_bytes = header.channels.bytes_per_pixel * width;
        let mut offsets = Vec::with_capacity(list.len());
        let mut offset = 0;
        for channel in list {
            offsets.push(offset);
            offset += channel.sample_type.bytes_per_sample() * width;
        }
        let mut out = vec![1.0f32; width * height * 4];
        for (slot, index) in self.channels.iter().enumerate() {
            let Some(index) = *index else { continue };
            let kind = list[index].sample_type;
            for y in 0..height {
                let line = &block.data[y * line_bytes + offsets[index]..];
                for x in 0..width {
                    out[(y * width + x) * 4 + slot] = sample(line, kind, x);
                }
            }
        }
        out
    }
}

/// Sample `x` of a channel's row of native-endian samples, as f32.
fn sample(row: &[u8], kind: SampleType, x: usize) -> f32 {
    match kind {
        SampleType::F32 => {
            let b = &row[x * 4..x * 4 + 4];
            f32::from_ne_bytes([b[0], b[1], b[2], b[3]])
        }
        SampleType::F16 => {
            let b = &row[x * 2..x * 2 + 2];
            exr::prelude::f16::from_bits(u16::from_ne_bytes([b[0], b[1]])).to_f32()
        }
        SampleType::U32 => {
            let b = &row[x * 4..x * 4 + 4];
            u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as f32
        }
    }
}

/// The size a `width`×`height` image is shrunk to so its long side is at most `max_size`.
pub(crate) fn fit(width: usize, height: usize, max_size: u32) -> (usize, usize) {
    let max = max_size.max(1) as usize;
    let long = width.max(height);
    if long <= max {
        return (width, height);
    }
    let scale = max as f64 / long as f64;
    let side = |n: usize| ((n as f64 * scale).round() as usize).clamp(1, max);
    (side(width), side(height))
}

/// How one source coordinate spreads over the target: the first target pixel it touches, its
/// weight there and its weight in the next one (area coverage, in target pixels).
#[derive(Debug, Clone, Copy)]
struct Spread {
    target: usize,
    first: f64,
    second: f64,
}

fn spreads(source: usize, target: usize) -> Vec<Spread> {
    let scale = target as f64 / source as f64;
    (0..source)
        .map(|x| {
            let start = x as f64 * scale;
            let end = (x + 1) as f64 * scale;
            let first_target = (start.floor() as usize).min(target - 1);
            let boundary = (first_target + 1) as f64;
            if end <= boundary || first_target + 1 >= target {
                Spread {
                    target: first_target,
                    first: end - start,
                    second: 0.0,
                }
            } else {
                Spread {
                    target: first_target,
                    first: boundary - start,
                    second: end - boundary,
                }
            }
        })
        .collect()
}

/// Shrinks an image fed block by block into a small RGBA accumulator (area-weighted box
/// filter); blocks may come in any order.
#[derive(Debug)]
pub(crate) struct Downscaler {
    width: usize,
    height: usize,
    xs: Vec<Spread>,
    ys: Vec<Spread>,
    sum: Vec<f64>,
}

impl Downscaler {
    /// A downscaler for a `source` (width, height) image fitting `max_size`.
    pub(crate) fn new(source: (usize, usize), max_size: u32) -> Self {
        let (width, height) = fit(source.0, source.1, max_size);
        Self {
            width,
            height,
            xs: spreads(source.0, width),
            ys: spreads(source.1, height),
            sum: vec![0.0; width * height * 4],
        }
    }

    /// Adds one block's interleaved RGBA pixels (from [`Combined::rgba`]).
    pub(crate) fn add(&mut self, block: &BlockIndex, rgba: &[f32]) {
        let (x0, y0) = (block.pixel_position.0, block.pixel_position.1);
        let (width, height) = (block.pixel_size.0, block.pixel_size.1);
        for y in 0..height {
            let sy = self.ys[y0 + y];
            for x in 0..width {
                let sx = self.xs[x0 + x];
                let pixel = &rgba[(y * width + x) * 4..][..4];
                for (ty, wy) in [(sy.target, sy.first), (sy.target + 1, sy.second)] {
                    if wy == 0.0 {
                        continue;
                    }
                    for (tx, wx) in [(sx.target, sx.first), (sx.target + 1, sx.second)] {
                        if wx == 0.0 {
                            continue;
                        }
                        let at = (ty * self.width + tx) * 4;
                        for (c, &v) in pixel.iter().enumerate() {
                            let v = if v.is_finite() { f64::from(v) } else { 0.0 };
                            self.sum[at + c] += v * wx * wy;
                        }
                    }
                }
            }
        }
    }

    /// The 8-bit sRGB RGBA pixels of the preview, row by row.
    pub(crate) fn pixels(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.sum.len());
        for pixel in self.sum.chunks_exact(4) {
            let alpha = pixel[3].clamp(0.0, 1.0) as f32;
            for &premultiplied in &pixel[..3] {
                let straight = if alpha > 0.0 {
                    premultiplied as f32 / alpha
                } else {
                    premultiplied as f32
                };
                out.push(to_byte(srgb(tone_map(straight))));
            }
            out.push(to_byte(alpha));
        }
        out
    }

    /// (width, height) of the preview.
    pub(crate) fn size(&self) -> (usize, usize) {
        (self.width, self.height)
    }

    /// Encodes the preview and writes it atomically where `options` says.
    pub(crate) fn write(
        &self,
        options: &PreviewOptions,
        layer: String,
    ) -> Result<PreviewReport, PreviewError> {
        let (width, height) = self.size();
        let (width, height) = (width as u32, height as u32);
        write_png(&options.path, width, height, &self.pixels())?;
        Ok(PreviewReport {
            path: options.path.clone(),
            width,
            height,
            layer,
        })
    }
}

/// Extended Reinhard: x (1 + x / white²) / (1 + x), so `PREVIEW_WHITE` maps to 1.
fn tone_map(x: f32) -> f32 {
    if x.is_nan() || x <= 0.0 {
        return 0.0;
    }
    let white2 = PREVIEW_WHITE * PREVIEW_WHITE;
    (x * (1.0 + x / white2) / (1.0 + x)).min(1.0)
}

/// The sRGB transfer function of a linear value in 0..=1.
fn srgb(linear: f32) -> f32 {
    if linear <= 0.003_130_8 {
        12.92 * linear
    } else {
        1.055 * linear.powf(1.0 / 2.4) - 0.055
    }
}

fn to_byte(value: f32) -> u8 {
    (value.clamp(0.0, 1.0) * 255.0).round() as u8
}

/// Writes an 8-bit RGBA PNG atomically.
fn write_png(path: &Path, width: u32, height: u32, rgba: &[u8]) -> Result<(), PreviewError> {
    let write_error = |source| PreviewError::Write {
        path: path.to_path_buf(),
        source,
    };
    let encode_error = |e: png::EncodingError| match e {
        png::EncodingError::IoError(source) => write_error(source),
        other => PreviewError::Encode {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    };
    let temp = TempFile::beside(path).map_err(write_error)?;
    {
        let mut encoder = png::Encoder::new(BufWriter::new(temp.file()), width, height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(encode_error)?;
        writer.write_image_data(rgba).map_err(encode_error)?;
        writer.finish().map_err(encode_error)?;
    }
    temp.persist(path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_fit_the_long_side_and_never_grow() {
        assert_eq!(fit(1920, 1080, 512), (512, 288));
        assert_eq!(fit(1080, 1920, 512), (288, 512));
        assert_eq!(fit(32, 24, 512), (32, 24));
        assert_eq!(fit(32, 24, 16), (16, 12));
        assert_eq!(fit(10_000, 3, 100), (100, 1));
    }

    #[test]
    fn spreads_cover_each_target_pixel_once() {
        for (source, target) in [(32, 16), (1920, 512), (7, 3), (5, 5), (100, 1)] {
            let mut coverage = vec![0.0; target];
            for s in spreads(source, target) {
                coverage[s.target] += s.first;
                if s.second > 0.0 {
                    coverage[s.target + 1] += s.second;
                }
            }
            for (i, c) in coverage.iter().enumerate() {
                assert!(
                    (c - 1.0).abs() < 1e-9,
                    "{source}->{target}: pixel {i} covered {c}"
                );
            }
        }
    }

    #[test]
    fn tone_curve_is_monotonic_black_to_white() {
        assert_eq!(tone_map(0.0), 0.0);
        assert_eq!(tone_map(-1.0), 0.0);
        assert_eq!(tone_map(f32::NAN), 0.0);
        assert!((tone_map(PREVIEW_WHITE) - 1.0).abs() < 1e-6);
        assert_eq!(tone_map(100.0), 1.0);
        let mut last = 0.0;
        for i in 1..400 {
            let v = tone_map(i as f32 * 0.01);
            assert!(v > last, "not increasing at {i}");
            last = v;
        }
        assert_eq!(to_byte(srgb(1.0)), 255);
        assert_eq!(to_byte(srgb(0.0)), 0);
        // Middle grey stays near where the Standard view puts it (sRGB 118 for 0.18).
        let grey = to_byte(srgb(tone_map(0.18)));
        assert!((100..=118).contains(&grey), "{grey}");
    }
}
