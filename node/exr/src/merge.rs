//! The merge itself: which inputs go together ([`RunningMerge::add`]), and the block engine that
//! writes their merge ([`RunningMerge::write`], [`merge`]).
//!
//! ```text
//!  add(path) ── open + check structure ── same size/layout as the first? ── samples per layer
//!
//!  write(out):  workers (one per core)                          writer (calling thread)
//!    take the next block in file order   ──(index, chunk)──▶  reorder, write in file order
//!    for each input in turn:                bounded channel    into .out.exr.<pid>.<n>.tmp,
//!      read + decompress that block                            feed the preview, progress
//!      accumulate it (Cycles' rules)                           …then fsync, rename to out
//!    convert to each channel's type, compress
//! ```
//!
//! Memory is bounded independent of the number of inputs: a worker holds one output block's
//! accumulator and one input block at a time, and workers run at most
//! [`BLOCKS_AHEAD_PER_THREAD`] blocks per thread ahead of the writer. Per input the merge keeps
//! only its offset table and a few numbers (and the first input's header, which the output
//! copies).
//!
//! Arithmetic is Cycles' own, in the same order and precision: every channel is read as f32,
//! `out += value * (samples / total)` in f32 over the inputs in the order given, `Copy` passes
//! from the first input, sums for `Sum` passes; the result is stored in the channel's own type
//! (f16 rounded to nearest, f32 as is). With a `Debug Sample Count` pass the weight is per pixel,
//! `count × samples`. u32 channels, which Cycles never writes, are merged exactly in f64 and
//! rounded. The output is thus bit-for-bit what `_cycles.merge` writes for Blender's renders.
//!
//! A running merge re-reads every slice added so far on each [`RunningMerge::write`]: Cycles'
//! weights depend on the final sample total, so any running sum would round differently from a
//! one-shot merge, whereas this way each partial merge is exactly the merge of its slices.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::BufWriter;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::{Duration, Instant};

use exr::block::chunk::Chunk;
use exr::block::writer::ChunksWriter;
use exr::block::{BlockIndex, UncompressedBlock};
use exr::meta::attribute::{AttributeValue, SampleType, Text};
use exr::meta::header::Header;
use exr::meta::{BlockDescription, Headers};
use exr::prelude::f16;

use crate::channels::{self, PassOp, SAMPLE_COUNT_PASS};
use crate::error::{InputError, MergeError};
use crate::files::TempFile;
use crate::input::ExrFile;
use crate::metadata::{format_duration, parse_duration, parse_samples};
use crate::preview::{Combined, Downscaler, PreviewOptions, PreviewReport};

/// Most inputs one merge takes. Each is an open file during a merge, and a frame cut into more
/// slices than this would spend more time starting Blender than rendering; the limit also keeps
/// the merge well inside the usual limit of 1024 open files per process.
pub const MAX_INPUTS: usize = 256;

/// How many merged blocks per worker thread may wait, compressed, for the writer. Two keeps
/// every core busy while one block is being written, and bounds the memory of blocks that
/// finished out of order.
pub const BLOCKS_AHEAD_PER_THREAD: usize = 2;

/// Buffer between the encoder and the temporary output file.
const WRITE_BUFFER: usize = 1 << 20;

/// A progress callback: called on the writing thread after each block is written; returning
/// `ControlFlow::Break` stops the merge with [`MergeError::Cancelled`], leaving no output.
pub type ProgressFn = dyn Fn(Progress) -> ControlFlow<()> + Send + Sync;

/// How far a merge's writing is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Blocks written so far.
    pub blocks_written: usize,
    /// Blocks in the output.
    pub blocks: usize,
}

/// How to merge.
#[derive(Clone, Default)]
pub struct MergeOptions {
    /// Worker threads; 0 for one per core.
    pub threads: usize,
    /// Also write a PNG preview of the merged frame.
    pub preview: Option<PreviewOptions>,
    /// Called after each block is written; can cancel.
    pub progress: Option<Arc<ProgressFn>>,
}

impl fmt::Debug for MergeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MergeOptions")
            .field("threads", &self.threads)
            .field("preview", &self.preview)
            .field("progress", &self.progress.as_ref().map(|_| "Fn"))
            .finish()
    }
}

/// One input as the merge sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceInfo {
    /// The file.
    pub path: PathBuf,
    /// Samples per render layer, as its metadata says (`cycles.<layer>.samples`).
    pub samples: Vec<(String, u32)>,
    /// Its `RenderTime`, in seconds.
    pub render_time: f64,
}

/// One render layer of the merged frame, as its merged metadata says.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSummary {
    /// The render layer (`ViewLayer`).
    pub name: String,
    /// Samples merged.
    pub samples: u64,
    /// Sum of the inputs' `render_time`, in seconds.
    pub render_time: f64,
    /// Sum of the inputs' `total_time`, in seconds.
    pub total_time: f64,
    /// Average of the inputs' `synchronization_time`, in seconds.
    pub synchronization_time: f64,
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The merged EXR.
    pub output: PathBuf,
    /// Its width in pixels.
    pub width: usize,
    /// Its height in pixels.
    pub height: usize,
    /// Its number of channels.
    pub channels: usize,
    /// The inputs, in merge order.
    pub inputs: Vec<SliceInfo>,
    /// The render layers, by name.
    pub layers: Vec<LayerSummary>,
    /// The merged `RenderTime` (the inputs' sum), in seconds.
    pub render_time: f64,
    /// How long the merge took.
    pub elapsed: Duration,
    /// The preview written, if one was asked for.
    pub preview: Option<PreviewReport>,
}

/// Merges `inputs` into `output` in one go; see [`RunningMerge`] for slices that arrive one by
/// one. The first input decides the layout and provides the copied passes and the metadata.
pub fn merge<P: AsRef<Path>>(
    inputs: impl IntoIterator<Item = P>,
    output: impl AsRef<Path>,
    options: &MergeOptions,
) -> Result<MergeReport, MergeError> {
    let mut running = RunningMerge::new();
    for input in inputs {
        running.add(input)?;
    }
    running.write(output, options)
}

/// A merge whose slices arrive one at a time: each [`add`](Self::add) checks the new slice
/// against the first, and [`write`](Self::write) writes the merge of the slices so far (the
/// live preview). After the last slice, `write` gives the same pixels and metadata as [`merge`]
/// of all of them. Each `write` reads every slice added so far (about 0.13 s per 1080p slice of
/// 39 channels on 2 cores), so a caller with many slices writes previews less often.
#[derive(Debug, Default)]
pub struct RunningMerge {
    slices: Vec<Slice>,
    layout: Option<Layout>,
}

#[derive(Debug)]
struct Slice {
    file: ExrFile,
    info: SliceInfo,
    /// Samples of each group of [`Layout::groups`].
    samples: Vec<u32>,
    /// The metadata prefix (`cycles.ViewLayer`) each group's samples came from; `None` for the
    /// unnamed group.
    prefixes: Vec<Option<String>>,
    /// Per distinct prefix: render_time, total_time, synchronization_time (as text).
    times: BTreeMap<String, [String; 3]>,
    /// `RenderTime` as text.
    render_time: String,
}

/// The channels of the first input and what to do with each.
#[derive(Debug)]
struct Layout {
    channels: Vec<ChannelPlan>,
    groups: Vec<Group>,
}

#[derive(Debug, Clone)]
struct ChannelPlan {
    op: PassOp,
    group: usize,
    kind: SampleType,
    /// Bytes of the channels before this one, per pixel of a row.
    prefix: usize,
}

/// Channels weighted together: one render layer (one view of it, in a multiview file).
#[derive(Debug, Clone)]
struct Group {
    /// Cycles' key: `Layer` or `Layer.View`; empty for channels that are not render passes.
    key: String,
    /// The render layer.
    layer: String,
    /// The view, in a multiview file.
    view: Option<String>,
    /// The channel of its `Debug Sample Count` pass, if it has one.
    count_channel: Option<usize>,
}

impl RunningMerge {
    /// An empty merge.
    pub fn new() -> Self {
        Self::default()
    }

    /// The slices added so far.
    pub fn len(&self) -> usize {
        self.slices.len()
    }

    /// Whether no slice was added yet.
    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// The slices added so far, in merge order.
    pub fn slices(&self) -> impl Iterator<Item = &SliceInfo> {
        self.slices.iter().map(|s| &s.info)
    }

    /// Adds a slice: opens it, checks its structure, its samples metadata, and that its size
    /// and layout match the first slice's. A rejected slice changes nothing.
    pub fn add(&mut self, path: impl AsRef<Path>) -> Result<&SliceInfo, MergeError> {
        let path = path.as_ref();
        if self.slices.len() >= MAX_INPUTS {
            return Err(MergeError::TooManyInputs {
                count: self.slices.len() + 1,
                limit: MAX_INPUTS,
            });
        }
        let file = ExrFile::open(path)?;
        // Every input must be a multilayer render on its own, which says more than "it differs".
        let layout = Layout::of(&file)?;
        if let Some(first) = self.slices.first() {
            // Same channels and views: the same layout, groups in the same order.
            check_same_layout(&first.file, &file)?;
        }
        let mut slice = Slice::read(file, &layout)?;
        tracing::debug!(path = %path.display(), samples = ?slice.info.samples, "slice added to merge");
        if self.slices.is_empty() {
            self.layout = Some(layout);
        } else {
            slice.file.forget_attributes();
        }
        self.slices.push(slice);
        Ok(&self.slices[self.slices.len() - 1].info)
    }

    /// Writes the merge of the slices added so far to `output`, atomically (a temporary file
    /// beside it, fsynced, renamed), and the preview if `options` asks for one.
    ///
    /// Blocks the calling thread (and uses `options.threads` more); run it on a blocking thread
    /// from async code.
    pub fn write(
        &self,
        output: impl AsRef<Path>,
        options: &MergeOptions,
    ) -> Result<MergeReport, MergeError> {
        let output = output.as_ref();
        let start = Instant::now();
        let (Some(layout), Some(first)) = (&self.layout, self.slices.first()) else {
            return Err(MergeError::NoInputs);
        };
        let mut files = Vec::with_capacity(self.slices.len());
        for slice in &self.slices {
            if !slice.file.unchanged() {
                return Err(MergeError::Changed {
                    path: slice.file.path.clone(),
                });
            }
            files.push(
                File::open(&slice.file.path).map_err(|source| InputError::Read {
                    path: slice.file.path.clone(),
                    source,
                })?,
            );
        }
        let combined = options
            .preview
            .as_ref()
            .map(|p| Combined::find(first.file.header(), &first.file.path, p))
            .transpose()?;

        let header = self.output_header();
        let weights = Weights::new(layout, &self.slices);
        let engine = Engine {
            layout,
            slices: &self.slices,
            files: &files,
            weights: &weights,
            combined: combined.as_ref(),
        };
        let mut preview = options
            .preview
            .as_ref()
            .map(|p| Downscaler::new((header.layer_size.0, header.layer_size.1), p.max_size));
        let temp = TempFile::beside(output).map_err(|source| MergeError::Write {
            path: output.to_path_buf(),
            source,
        })?;
        let threads = match options.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut failure = None;
        let written = exr::block::write(
            BufWriter::with_capacity(WRITE_BUFFER, temp.file()),
            Headers::from_vec(vec![header.clone()]),
            true,
            |meta, writer| match engine.run(
                &meta.headers,
                writer,
                threads,
                &mut preview,
                options,
                output,
            ) {
                Ok(()) => Ok(()),
                Err(error) => {
                    failure = Some(error);
                    Err(exr::error::Error::Aborted)
                }
            },
        );
        if let Some(error) = failure {
            return Err(error);
        }
        written.map_err(|e| match e {
            exr::error::Error::Io(source) => MergeError::Write {
                path: output.to_path_buf(),
                source,
            },
            other => MergeError::Encode {
                path: output.to_path_buf(),
                detail: other.to_string(),
            },
        })?;
        temp.persist(output).map_err(|source| MergeError::Write {
            path: output.to_path_buf(),
            source,
        })?;

        let preview = match (preview, combined, &options.preview) {
            (Some(scaler), Some(combined), Some(options)) => {
                Some(scaler.write(options, combined.layer)?)
            }
            _ => None,
        };
        let report = MergeReport {
            output: output.to_path_buf(),
            width: header.layer_size.0,
            height: header.layer_size.1,
            channels: header.channels.list.len(),
            inputs: self.slices.iter().map(|s| s.info.clone()).collect(),
            layers: self.layer_summaries(),
            render_time: self
                .slices
                .iter()
                .map(|s| parse_duration(&s.render_time))
                .sum(),
            elapsed: start.elapsed(),
            preview,
        };
        tracing::info!(
            output = %output.display(),
            inputs = self.slices.len(),
            elapsed_ms = report.elapsed.as_millis() as u64,
            "merged"
        );
        Ok(report)
    }

    /// The first input's header with the merged metadata, as Cycles writes it.
    fn output_header(&self) -> Header {
        let mut header = self.slices[0].file.header().clone();
        let attributes = &mut header.own_attributes.other;
        let mut set = |name: &str, value: String| {
            attributes.insert(
                Text::from_slice_unchecked(name.as_bytes()),
                AttributeValue::Text(Text::from_slice_unchecked(value.as_bytes())),
            );
        };
        let render_time: f64 = self
            .slices
            .iter()
            .map(|s| parse_duration(&s.render_time))
            .sum();
        set("RenderTime", format_duration(render_time));
        for layer in self.layer_summaries() {
            let prefix = format!("cycles.{}", layer.name);
            set(&format!("{prefix}.samples"), layer.samples.to_string());
            set(
                &format!("{prefix}.total_time"),
                format_duration(layer.total_time),
            );
            set(
                &format!("{prefix}.render_time"),
                format_duration(layer.render_time),
            );
            set(
                &format!("{prefix}.synchronization_time"),
                format_duration(layer.synchronization_time),
            );
        }
        header
    }

    /// The merged metadata of each render layer: samples summed over the inputs that have the
    /// layer, times summed over all inputs, synchronization time averaged over all inputs.
    fn layer_summaries(&self) -> Vec<LayerSummary> {
        let mut samples: BTreeMap<&str, u64> = BTreeMap::new();
        for slice in &self.slices {
            let mut seen = Vec::new();
            for (prefix, &n) in slice.prefixes.iter().zip(&slice.samples) {
                if let Some(prefix) = prefix
                    && !seen.contains(&prefix)
                {
                    seen.push(prefix);
                    *samples.entry(prefix.as_str()).or_default() += u64::from(n);
                }
            }
        }
        let count = self.slices.len() as f64;
        samples
            .into_iter()
            .map(|(prefix, samples)| {
                let time = |i: usize| -> f64 {
                    self.slices
                        .iter()
                        .map(|s| s.times.get(prefix).map_or(0.0, |t| parse_duration(&t[i])))
                        .sum()
                };
                LayerSummary {
                    name: prefix.strip_prefix("cycles.").unwrap_or(prefix).to_string(),
                    samples,
                    render_time: time(0),
                    total_time: time(1),
                    synchronization_time: time(2) / count,
                }
            })
            .collect()
    }
}

impl Layout {
    /// The layout of the first input: each channel's operation and weight group.
    fn of(file: &ExrFile) -> Result<Self, InputError> {
        let header = file.header();
        let multiview = header
            .own_attributes
            .multi_view_names
            .as_ref()
            .is_some_and(|views| views.len() >= 2);
        let mut groups: Vec<Group> = Vec::new();
        let mut channels = Vec::with_capacity(header.channels.list.len());
        let mut prefix = 0;
        let mut passes = 0;
        for (index, channel) in header.channels.list.iter().enumerate() {
            let name = String::from_utf8_lossy(channel.name.bytes());
            let (key, layer, view, op, is_count) = match channels::parse(&name, multiview) {
                Some(parsed) => {
                    passes += 1;
                    (
                        parsed.group_key(),
                        parsed.layer.to_string(),
                        parsed.view.map(str::to_string),
                        PassOp::for_pass(parsed.pass),
                        parsed.pass == SAMPLE_COUNT_PASS,
                    )
                }
                // Not a render pass: Cycles puts it in an unnamed layer of one sample per input.
                None => (
                    String::new(),
                    String::new(),
                    None,
                    PassOp::for_pass(&name),
                    false,
                ),
            };
            let group = match groups.iter().position(|g| g.key == key) {
                Some(group) => group,
                None => {
                    groups.push(Group {
                        key,
                        layer,
                        view,
                        count_channel: None,
                    });
                    groups.len() - 1
                }
            };
            if is_count && groups[group].count_channel.is_none() {
                groups[group].count_channel = Some(index);
            }
            channels.push(ChannelPlan {
                op,
                group,
                kind: channel.sample_type,
                prefix,
            });
            prefix += channel.sample_type.bytes_per_sample();
        }
        if passes == 0 {
            /// Channel names quoted in the error, enough to recognise the file.
            const SHOWN: usize = 8;
            let list = &header.channels.list;
            let mut shown: Vec<String> = list
                .iter()
                .take(SHOWN)
                .map(|c| String::from_utf8_lossy(c.name.bytes()).into_owned())
                .collect();
            if list.len() > SHOWN {
                shown.push(format!("and {} more", list.len() - SHOWN));
            }
            return Err(InputError::NotMultilayer {
                path: file.path.clone(),
                channels: shown.join(", "),
            });
        }
        Ok(Self { channels, groups })
    }
}

impl Slice {
    /// Reads the merge metadata of `file`: samples of each group, times of each render layer.
    fn read(file: ExrFile, layout: &Layout) -> Result<Self, InputError> {
        let path = &file.path;
        let text = |name: &str| match file.header().own_attributes.other.get(name.as_bytes()) {
            Some(AttributeValue::Text(text)) => {
                Some(String::from_utf8_lossy(text.bytes()).into_owned())
            }
            _ => None,
        };
        let mut samples = Vec::with_capacity(layout.groups.len());
        let mut prefixes = Vec::with_capacity(layout.groups.len());
        for group in &layout.groups {
            if group.key.is_empty() {
                samples.push(1);
                prefixes.push(None);
                continue;
            }
            // Cycles looks up `cycles.<Layer.View>.samples` in a multiview file, which Blender
            // never writes; the render layer's own count is the one that exists.
            let own = format!("cycles.{}", group.key);
            let found = match text(&format!("{own}.samples")) {
                Some(value) => Some((own, value)),
                None if group.view.is_some() => {
                    let layer = format!("cycles.{}", group.layer);
                    text(&format!("{layer}.samples")).map(|value| (layer, value))
                }
                None => None,
            };
            let Some((prefix, value)) = found else {
                return Err(InputError::MissingSamples {
                    path: path.clone(),
                    layer: group.layer.clone(),
                });
            };
            let n = parse_samples(&value)
                .filter(|&n| n >= 1)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| InputError::BadSamples {
                    path: path.clone(),
                    layer: group.layer.clone(),
                    value: value.clone(),
                })?;
            samples.push(n);
            prefixes.push(Some(prefix));
        }
        let mut times = BTreeMap::new();
        let mut per_layer = Vec::new();
        for (prefix, &n) in prefixes.iter().zip(&samples) {
            let Some(prefix) = prefix else { continue };
            if times.contains_key(prefix) {
                continue;
            }
            let time = |what: &str| text(&format!("{prefix}.{what}")).unwrap_or_default();
            times.insert(
                prefix.clone(),
                [
                    time("render_time"),
                    time("total_time"),
                    time("synchronization_time"),
                ],
            );
            let layer = prefix.strip_prefix("cycles.").unwrap_or(prefix);
            per_layer.push((layer.to_string(), n));
        }
        let render_time = text("RenderTime").unwrap_or_default();
        let info = SliceInfo {
            path: path.clone(),
            samples: per_layer,
            render_time: parse_duration(&render_time),
        };
        Ok(Self {
            file,
            info,
            samples,
            prefixes,
            times,
            render_time,
        })
    }
}

/// Checks that `other` can be merged with `first`: same windows, channels and blocks.
fn check_same_layout(first: &ExrFile, other: &ExrFile) -> Result<(), MergeError> {
    let (a, b) = (first.header(), other.header());
    let size = |h: &Header| {
        let data = h.data_window();
        let display = h.shared_attributes.display_window;
        let mut text = format!("{}×{}", data.size.0, data.size.1);
        if data.position != exr::math::Vec2(0, 0) {
            text.push_str(&format!(" at {},{}", data.position.0, data.position.1));
        }
        if display != data {
            text.push_str(&format!(
                " (display window {}×{} at {},{})",
                display.size.0, display.size.1, display.position.0, display.position.1
            ));
        }
        text
    };
    if a.data_window() != b.data_window()
        || a.shared_attributes.display_window != b.shared_attributes.display_window
    {
        return Err(MergeError::SizeMismatch {
            path: other.path.clone(),
            size: size(b),
            first: first.path.clone(),
            first_size: size(a),
        });
    }
    let mismatch = |detail: String| MergeError::LayoutMismatch {
        path: other.path.clone(),
        first: first.path.clone(),
        detail,
    };
    let name = |c: &exr::meta::attribute::ChannelDescription| {
        String::from_utf8_lossy(c.name.bytes()).into_owned()
    };
    let types: HashMap<String, SampleType> = b
        .channels
        .list
        .iter()
        .map(|c| (name(c), c.sample_type))
        .collect();
    for channel in &a.channels.list {
        match types.get(&name(channel)) {
            None => return Err(mismatch(format!("it has no channel {}", name(channel)))),
            Some(&kind) if kind != channel.sample_type => {
                return Err(mismatch(format!(
                    "channel {} is {kind:?} there but {:?} in the first",
                    name(channel),
                    channel.sample_type
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = b
        .channels
        .list
        .iter()
        .find(|c| !a.channels.list.iter().any(|d| d.name == c.name))
    {
        return Err(mismatch(format!(
            "it has a channel {} that the first lacks",
            name(extra)
        )));
    }
    let blocks = |h: &Header| match h.blocks {
        BlockDescription::ScanLines => format!(
            "blocks of {} scanlines ({})",
            h.compression.scan_lines_per_block(),
            h.compression
        ),
        BlockDescription::Tiles(t) => format!("{}×{} tiles", t.tile_size.0, t.tile_size.1),
    };
    let same_blocks = a.blocks == b.blocks
        && (a.blocks != BlockDescription::ScanLines
            || a.compression.scan_lines_per_block() == b.compression.scan_lines_per_block());
    if !same_blocks {
        return Err(mismatch(format!(
            "its pixels are stored in {} but in {} in the first",
            blocks(b),
            blocks(a)
        )));
    }
    if a.own_attributes.multi_view_names != b.own_attributes.multi_view_names {
        return Err(mismatch(format!(
            "its views are {:?} but {:?} in the first",
            b.own_attributes.multi_view_names, a.own_attributes.multi_view_names
        )));
    }
    Ok(())
}

/// The weights of each input, computed once per merge as Cycles does (in f32, inputs in order).
#[derive(Debug)]
struct Weights {
    /// Per input, per group: its samples as f32.
    samples: Vec<Vec<f32>>,
    /// Per input, per group: samples / total, for groups without a sample count pass.
    scalar: Vec<Vec<f32>>,
    /// The same in f64, for u32 channels.
    scalar_wide: Vec<Vec<f64>>,
    /// Per group: the total samples, summed in f32.
    totals: Vec<f32>,
    /// Per group: the total samples.
    totals_int: Vec<u64>,
}

impl Weights {
    fn new(layout: &Layout, slices: &[Slice]) -> Self {
        let groups = layout.groups.len();
        let mut totals = vec![0.0f32; groups];
        let mut totals_int = vec![0u64; groups];
        for slice in slices {
            for g in 0..groups {
                totals[g] += slice.samples[g] as f32;
                totals_int[g] += u64::from(slice.samples[g]);
            }
        }
        let samples: Vec<Vec<f32>> = slices
            .iter()
            .map(|s| s.samples.iter().map(|&n| n as f32).collect())
            .collect();
        let scalar = samples
            .iter()
            .map(|s| s.iter().zip(&totals).map(|(&n, &t)| 1.0 * n / t).collect())
            .collect();
        let scalar_wide = slices
            .iter()
            .map(|s| {
                s.samples
                    .iter()
                    .zip(&totals_int)
                    .map(|(&n, &t)| f64::from(n) / t as f64)
                    .collect()
            })
            .collect();
        Self {
            samples,
            scalar,
            scalar_wide,
            totals,
            totals_int,
        }
    }
}

/// One merged, compressed block, ready to be written.
#[derive(Debug)]
struct Merged {
    chunk: Chunk,
    index: BlockIndex,
    /// Its Combined pixels for the preview.
    rgba: Option<Vec<f32>>,
}

/// Per-thread buffers, reused from block to block.
#[derive(Debug, Default)]
struct Scratch {
    /// The output block, as f32 samples: line, channel, x.
    acc: Vec<f32>,
    /// The same for u32 channels, in f64.
    wide: Vec<f64>,
    /// Per sample-count group, per pixel: the total samples (Cycles' `per_pixel`).
    pixel_totals: Vec<f32>,
    /// Per sample-count group, per pixel: this input's weight.
    pixel_weights: Vec<f32>,
    /// One channel's row, decoded.
    row: Vec<f32>,
    /// One u32 channel's row, decoded.
    row_wide: Vec<f64>,
    /// Compressed bytes read.
    buf: Vec<u8>,
}

/// Everything a merge's threads share.
#[derive(Debug)]
struct Engine<'a> {
    layout: &'a Layout,
    slices: &'a [Slice],
    files: &'a [File],
    weights: &'a Weights,
    combined: Option<&'a Combined>,
}

impl Engine<'_> {
    /// Merges every block on `threads` workers and writes them in file order into `writer`.
    fn run(
        &self,
        headers: &[Header],
        writer: &mut impl ChunksWriter,
        threads: usize,
        preview: &mut Option<Downscaler>,
        options: &MergeOptions,
        output: &Path,
    ) -> Result<(), MergeError> {
        let order: Vec<usize> = headers[0]
            .enumerate_ordered_blocks()
            .map(|(i, _)| i)
            .collect();
        let total = order.len();
        let threads = threads.clamp(1, total.max(1));
        let ahead = threads * BLOCKS_AHEAD_PER_THREAD;
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let written = Mutex::new(0usize);
        let moved = Condvar::new();
        let (next, abort, written, moved, order) = (&next, &abort, &written, &moved, &order);

        std::thread::scope(|scope| {
            let (sender, receiver) =
                mpsc::sync_channel::<(usize, Result<Merged, MergeError>)>(ahead);
            for _ in 0..threads {
                let sender = sender.clone();
                scope.spawn(move || {
                    let mut scratch = Scratch::default();
                    loop {
                        let position = next.fetch_add(1, Ordering::Relaxed);
                        if position >= total {
                            break;
                        }
                        let mut done = written.lock().unwrap_or_else(|e| e.into_inner());
                        while position >= *done + ahead && !abort.load(Ordering::Relaxed) {
                            done = moved.wait(done).unwrap_or_else(|e| e.into_inner());
                        }
                        drop(done);
                        if abort.load(Ordering::Relaxed) {
                            break;
                        }
                        let merged =
                            self.merge_block(headers, order[position], &mut scratch, output);
                        let failed = merged.is_err();
                        if sender.send((position, merged)).is_err() || failed {
                            break;
                        }
                    }
                });
            }
            drop(sender);

            let result = (|| {
                let mut pending = BTreeMap::new();
                let mut position = 0;
                for (at, merged) in receiver.iter() {
                    pending.insert(at, merged?);
                    while let Some(merged) = pending.remove(&position) {
                        writer
                            .write_chunk(order[position], merged.chunk)
                            .map_err(|e| encode_error(output, e))?;
                        if let (Some(scaler), Some(rgba)) = (preview.as_mut(), &merged.rgba) {
                            scaler.add(&merged.index, rgba);
                        }
                        position += 1;
                        *written.lock().unwrap_or_else(|e| e.into_inner()) = position;
                        moved.notify_all();
                        if let Some(progress) = &options.progress {
                            let now = Progress {
                                blocks_written: position,
                                blocks: total,
                            };
                            if progress(now).is_break() {
                                return Err(MergeError::Cancelled);
                            }
                        }
                    }
                    if position == total {
                        break;
                    }
                }
                if position == total {
                    Ok(())
                } else {
                    Err(MergeError::Encode {
                        path: output.to_path_buf(),
                        detail: format!("the merge stopped after {position} of {total} blocks"),
                    })
                }
            })();
            // Unblock every worker (waiting for room or sending) so the scope can end.
            abort.store(true, Ordering::Relaxed);
            drop(receiver);
            moved.notify_all();
            result
        })
    }

    /// Merges block `index` (increasing-y order) of every input.
    fn merge_block(
        &self,
        headers: &[Header],
        index: usize,
        scratch: &mut Scratch,
        output: &Path,
    ) -> Result<Merged, MergeError> {
        let header = &headers[0];
        let block = self.slices[0].file.blocks[index];
        let (width, height) = (block.pixel_size.0, block.pixel_size.1);
        let pixels = width * height;
        let plans = &self.layout.channels;
        let count = plans.len();
        let line_bytes = header.channels.bytes_per_pixel * width;
        let weights = self.weights;

        // Groups weighted per pixel by a sample count pass: (group, count channel).
        let counted: Vec<(usize, usize)> = self
            .layout
            .groups
            .iter()
            .enumerate()
            .filter_map(|(g, group)| group.count_channel.map(|c| (g, c)))
            .collect();
        let slot_of = |group: usize| counted.iter().position(|&(g, _)| g == group);
        let has_wide = plans.iter().any(|p| p.kind == SampleType::U32);

        let Scratch {
            acc,
            wide,
            pixel_totals,
            pixel_weights,
            row,
            row_wide,
            buf,
        } = scratch;
        acc.clear();
        acc.resize(pixels * count, 0.0);
        if has_wide {
            wide.clear();
            wide.resize(pixels * count, 0.0);
        }
        row.resize(width, 0.0);
        row_wide.resize(width, 0.0);
        pixel_totals.clear();
        pixel_totals.resize(counted.len() * pixels, 0.0);
        pixel_weights.resize(counted.len() * pixels, 0.0);

        // Cycles' per-pixel totals: the sum of count × samples over the inputs.
        if !counted.is_empty() {
            for (k, slice) in self.slices.iter().enumerate() {
                let data = slice.file.read_block(&self.files[k], index, buf)?;
                for (slot, &(g, channel)) in counted.iter().enumerate() {
                    let samples = weights.samples[k][g];
                    let plan = &plans[channel];
                    for y in 0..height {
                        let line = &data.data[y * line_bytes..][..line_bytes];
                        decode(&line[plan.prefix * width..], plan.kind, row);
                        let totals = &mut pixel_totals[slot * pixels + y * width..][..width];
                        for (total, &count) in totals.iter_mut().zip(row.iter()) {
                            *total += count * samples;
                        }
                    }
                }
            }
        }

        for (k, slice) in self.slices.iter().enumerate() {
            let data = slice.file.read_block(&self.files[k], index, buf)?;
            let data = &data.data;
            for (slot, &(g, channel)) in counted.iter().enumerate() {
                let samples = weights.samples[k][g];
                let plan = &plans[channel];
                for y in 0..height {
                    let line = &data[y * line_bytes..][..line_bytes];
                    decode(&line[plan.prefix * width..], plan.kind, row);
                    let at = slot * pixels + y * width;
                    let totals = &pixel_totals[at..][..width];
                    for ((weight, &count), &total) in pixel_weights[at..][..width]
                        .iter_mut()
                        .zip(row.iter())
                        .zip(totals)
                    {
                        *weight = 1.0 * (count * samples) / total;
                    }
                }
            }
            for y in 0..height {
                let line = &data[y * line_bytes..][..line_bytes];
                for (c, plan) in plans.iter().enumerate() {
                    let source = &line[plan.prefix * width..];
                    let at = (y * count + c) * width;
                    let slot = slot_of(plan.group);
                    if plan.kind == SampleType::U32 {
                        decode_wide(source, row_wide);
                        let out = &mut wide[at..][..width];
                        let pixel = slot.map(|s| {
                            let at = s * pixels + y * width;
                            (&pixel_weights[at..][..width], &pixel_totals[at..][..width])
                        });
                        merge_wide(plan, k, pixel, row_wide, out, weights);
                        continue;
                    }
                    let out = &mut acc[at..][..width];
                    match plan.op {
                        PassOp::Copy => {
                            if k == 0 {
                                decode(source, plan.kind, out);
                            }
                        }
                        PassOp::Sum => {
                            decode(source, plan.kind, row);
                            for (o, &v) in out.iter_mut().zip(row.iter()) {
                                *o += v;
                            }
                        }
                        PassOp::Average => {
                            decode(source, plan.kind, row);
                            match slot {
                                Some(s) => {
                                    let w = &pixel_weights[s * pixels + y * width..][..width];
                                    for ((o, &v), &w) in out.iter_mut().zip(row.iter()).zip(w) {
                                        *o += v * w;
                                    }
                                }
                                None => {
                                    let w = weights.scalar[k][plan.group];
                                    for (o, &v) in out.iter_mut().zip(row.iter()) {
                                        *o += v * w;
                                    }
                                }
                            }
                        }
                        PassOp::Samples => {
                            if k == 0 {
                                let total = weights.totals_int[plan.group] as f32;
                                match slot {
                                    Some(s) => {
                                        let t = &pixel_totals[s * pixels + y * width..][..width];
                                        for (o, &t) in out.iter_mut().zip(t) {
                                            *o = 1.0 * t / total;
                                        }
                                    }
                                    None => out.fill(1.0 * weights.totals[plan.group] / total),
                                }
                            }
                        }
                    }
                }
            }
        }

        let mut bytes = vec![0u8; pixels * header.channels.bytes_per_pixel];
        for y in 0..height {
            let line = &mut bytes[y * line_bytes..][..line_bytes];
            for (c, plan) in plans.iter().enumerate() {
                let at = (y * count + c) * width;
                let target = &mut line[plan.prefix * width..];
                match plan.kind {
                    SampleType::F32 => {
                        for (t, &v) in target.chunks_exact_mut(4).zip(&acc[at..at + width]) {
                            t.copy_from_slice(&v.to_ne_bytes());
                        }
                    }
                    SampleType::F16 => {
                        for (t, &v) in target.chunks_exact_mut(2).zip(&acc[at..at + width]) {
                            t.copy_from_slice(&f16::from_f32(v).to_bits().to_ne_bytes());
                        }
                    }
                    SampleType::U32 => {
                        for (t, &v) in target.chunks_exact_mut(4).zip(&wide[at..at + width]) {
                            let v = if v.is_nan() {
                                0
                            } else {
                                v.round().clamp(0.0, f64::from(u32::MAX)) as u32
                            };
                            t.copy_from_slice(&v.to_ne_bytes());
                        }
                    }
                }
            }
        }
        let merged = UncompressedBlock {
            index: block,
            data: bytes,
        };
        let rgba = self.combined.map(|c| c.rgba(&merged, header));
        let chunk = merged
            .compress_to_chunk(headers)
            .map_err(|e| encode_error(output, e))?;
        Ok(Merged {
            chunk,
            index: block,
            rgba,
        })
    }
}

/// Merges one row of a u32 channel in f64: exact for copies and sums, rounded once for
/// averages. `pixel_weights` and `pixel_totals` are the row's per-pixel weight of this input and
/// total samples when the group has a sample count pass.
fn merge_wide(
    plan: &ChannelPlan,
    k: usize,
    pixel: Option<(&[f32], &[f32])>,
    row: &[f64],
    out: &mut [f64],
    weights: &Weights,
) {
    let total = weights.totals_int[plan.group] as f64;
    match plan.op {
        PassOp::Copy => {
            if k == 0 {
                out.copy_from_slice(row);
            }
        }
        PassOp::Sum => out.iter_mut().zip(row).for_each(|(o, v)| *o += v),
        PassOp::Average => match pixel {
            Some((pixel_weights, _)) => out
                .iter_mut()
                .zip(row)
                .zip(pixel_weights)
                .for_each(|((o, v), &w)| *o += v * f64::from(w)),
            None => {
                let w = weights.scalar_wide[k][plan.group];
                out.iter_mut().zip(row).for_each(|(o, v)| *o += v * w);
            }
        },
        PassOp::Samples => {
            if k == 0 {
                match pixel {
                    Some((_, totals)) => out
                        .iter_mut()
                        .zip(totals)
                        .for_each(|(o, &t)| *o = f64::from(t) / total),
                    None => out.fill(f64::from(weights.totals[plan.group]) / total),
                }
            }
        }
    }
}

/// Decodes a row of native-endian samples of `kind` into `out` (its length is the row's).
fn decode(source: &[u8], kind: SampleType, out: &mut [f32]) {
    match kind {
        SampleType::F32 => {
            for (o, b) in out.iter_mut().zip(source.chunks_exact(4)) {
                *o = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        SampleType::F16 => {
            for (o, b) in out.iter_mut().zip(source.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_ne_bytes([b[0], b[1]])).to_f32();
            }
        }
        SampleType::U32 => {
            for (o, b) in out.iter_mut().zip(source.chunks_exact(4)) {
                *o = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as f32;
            }
        }
    }
}

/// Decodes a row of native-endian u32 samples into `out`.
fn decode_wide(source: &[u8], out: &mut [f64]) {
    for (o, b) in out.iter_mut().zip(source.chunks_exact(4)) {
        *o = f64::from(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    }
}

fn encode_error(output: &Path, error: exr::error::Error) -> MergeError {
    match error {
        exr::error::Error::Io(source) => MergeError::Write {
            path: output.to_path_buf(),
            source,
        },
        other => MergeError::Encode {
            path: output.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Spec, read};
    use exr::meta::attribute::{Compression, LineOrder};

    /// A value that differs per input, channel and pixel, and is not exact in binary.
    fn value(input: usize, channel: &str, x: usize, y: usize) -> f64 {
        let salt = channel.bytes().map(f64::from).sum::<f64>();
        ((input as f64 + 1.3) * 0.37 + salt * 0.011 + x as f64 * 0.071 + y as f64 * 0.013).sin()
            * 3.0
    }

    /// Cycles' weighted average of f32 inputs, in its order and precision.
    fn cycles_average(values: &[f32], samples: &[u32]) -> f32 {
        let total = samples.iter().fold(0.0f32, |t, &s| t + s as f32);
        values
            .iter()
            .zip(samples)
            .fold(0.0f32, |acc, (&v, &s)| acc + v * (1.0 * s as f32 / total))
    }

    const CHANNELS: [&str; 8] = [
        "ViewLayer.Combined.R",
        "ViewLayer.Combined.A",
        "ViewLayer.Depth.Z",
        "ViewLayer.CryptoObject00.r",
        "ViewLayer.Debug Ray Bounces.X",
        "ViewLayer.Normal.X",
        "ViewLayer.IndexMA.X",
        "ViewLayer.Custom.V",
    ];

    fn slices(dir: &Path, spec: &Spec, samples: &[u32]) -> Vec<PathBuf> {
        samples
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let path = dir.join(format!("slice{i}.exr"));
                spec.clone()
                    .attr("cycles.ViewLayer.samples", &n.to_string())
                    .attr("cycles.ViewLayer.render_time", &format!("00:0{i}.25"))
                    .attr("cycles.ViewLayer.total_time", "01:00.50")
                    .attr(
                        "cycles.ViewLayer.synchronization_time",
                        &format!("00:00.{}", 10 + i),
                    )
                    .attr("RenderTime", "00:01.07")
                    .attr("Camera", &format!("cam{i}"))
                    .write(&path, |c, x, y| match c {
                        "ViewLayer.IndexMA.X" => (i * 7 + x) as f64,
                        "ViewLayer.Custom.V" => (1000 * (i + 1) + x) as f64,
                        _ => value(i, c, x, y),
                    });
                path
            })
            .collect()
    }

    #[test]
    fn every_pass_is_merged_by_cycles_rules_in_its_own_type() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::new(7, 37, &CHANNELS)
            .typed("ViewLayer.Normal.X", SampleType::F16)
            .typed("ViewLayer.IndexMA.X", SampleType::U32)
            .typed("ViewLayer.Custom.V", SampleType::U32);
        let samples = [1u32, 3, 4];
        let inputs = slices(dir.path(), &spec, &samples);
        let out = dir.path().join("out.exr");
        let report = merge(&inputs, &out, &MergeOptions::default()).unwrap();
        assert_eq!((report.width, report.height, report.channels), (7, 37, 8));
        let (merged, attributes) = read(&out);
        let inputs: Vec<_> = inputs.iter().map(|p| read(p).0).collect();
        for (name, (kind, values)) in &merged {
            let expected_kind = inputs[0][name].0;
            assert_eq!(*kind, expected_kind, "{name} keeps its type");
            for (p, &got) in values.iter().enumerate() {
                let at = |i: usize| inputs[i][name].1[p];
                let expected = match name.as_str() {
                    "ViewLayer.Depth.Z" | "ViewLayer.CryptoObject00.r" | "ViewLayer.IndexMA.X" => {
                        at(0)
                    }
                    "ViewLayer.Debug Ray Bounces.X" => {
                        f64::from(at(0) as f32 + at(1) as f32 + at(2) as f32)
                    }
                    "ViewLayer.Custom.V" => {
                        // u32: exact weighted average, rounded once.
                        ((at(0) * 1.0 + at(1) * 3.0 + at(2) * 4.0) / 8.0).round()
                    }
                    _ => {
                        let avg =
                            cycles_average(&[at(0) as f32, at(1) as f32, at(2) as f32], &samples);
                        if expected_kind == SampleType::F16 {
                            f16::from_f32(avg).to_f64()
                        } else {
                            f64::from(avg)
                        }
                    }
                };
                assert_eq!(
                    got.to_bits(),
                    expected.to_bits(),
                    "{name} pixel {p}: {got} vs {expected}"
                );
            }
        }
        // The weighting matters: an unweighted mean is another image.
        let combined = &merged["ViewLayer.Combined.R"].1;
        let mean = |p: usize| {
            (0..3)
                .map(|i| inputs[i]["ViewLayer.Combined.R"].1[p])
                .sum::<f64>()
                / 3.0
        };
        assert!((0..combined.len()).any(|p| (combined[p] - mean(p)).abs() > 1e-3));

        assert_eq!(attributes["cycles.ViewLayer.samples"], "8");
        // 0.25 + 1.25 + 2.25 seconds; 3 × 60.5; (0.10 + 0.11 + 0.12) / 3; 3 × 1.07.
        assert_eq!(attributes["cycles.ViewLayer.render_time"], "00:03.75");
        assert_eq!(attributes["cycles.ViewLayer.total_time"], "03:01.50");
        assert_eq!(
            attributes["cycles.ViewLayer.synchronization_time"],
            "00:00.11"
        );
        assert_eq!(attributes["RenderTime"], "00:03.21");
        assert_eq!(
            attributes["Camera"], "cam0",
            "other metadata comes from the first input"
        );
        assert_eq!(report.layers.len(), 1);
        assert_eq!(report.layers[0].samples, 8);
        assert_eq!(report.inputs[2].samples, vec![("ViewLayer".to_string(), 4)]);
    }

    #[test]
    fn a_sample_count_pass_weighs_each_pixel() {
        let dir = tempfile::tempdir().unwrap();
        let channels = [
            "L.Combined.R",
            "L.Debug Sample Count.X",
            "L.Debug Sample Count Other.X",
        ];
        let samples = [4u32, 8];
        // Adaptive sampling: each pixel took a fraction of the slice's samples.
        let count = |i: usize, x: usize, y: usize| ((x + 2 * y + i) % 4 + 1) as f64 / 4.0;
        let inputs: Vec<PathBuf> = (0..2)
            .map(|i| {
                let path = dir.path().join(format!("{i}.exr"));
                Spec::new(5, 3, &channels)
                    .attr("cycles.L.samples", &samples[i].to_string())
                    .write(&path, |c, x, y| match c {
                        "L.Debug Sample Count.X" => count(i, x, y),
                        _ => value(i, c, x, y),
                    });
                path
            })
            .collect();
        let out = dir.path().join("out.exr");
        merge(&inputs, &out, &MergeOptions::default()).unwrap();
        let merged = read(&out).0;
        let inputs: Vec<_> = inputs.iter().map(|p| read(p).0).collect();
        for p in 0..15 {
            let (x, y) = (p % 5, p / 5);
            let ls: Vec<f32> = (0..2)
                .map(|i| count(i, x, y) as f32 * samples[i] as f32)
                .collect();
            let total = 0.0f32 + ls[0] + ls[1];
            let v = |i: usize| inputs[i]["L.Combined.R"].1[p] as f32;
            let expected = 0.0f32 + v(0) * (1.0 * ls[0] / total) + v(1) * (1.0 * ls[1] / total);
            assert_eq!(merged["L.Combined.R"].1[p] as f32, expected, "pixel {p}");
            assert_eq!(
                merged["L.Debug Sample Count.X"].1[p] as f32,
                1.0 * total / 12.0,
                "merged count, pixel {p}"
            );
            // Any `Debug Sample Count*` pass gets the layer's merged counts, as in Cycles.
            assert_eq!(
                merged["L.Debug Sample Count Other.X"].1[p],
                merged["L.Debug Sample Count.X"].1[p]
            );
        }
    }

    #[test]
    fn views_are_weighted_by_their_render_layer_samples() {
        let dir = tempfile::tempdir().unwrap();
        let channels = [
            "L.Combined.left.R",
            "L.Combined.right.R",
            "L.Depth.left.Z",
            "L.Depth.right.Z",
        ];
        let samples = [2u32, 6];
        let inputs: Vec<PathBuf> = (0..2)
            .map(|i| {
                let path = dir.path().join(format!("{i}.exr"));
                let mut spec = Spec::new(4, 2, &channels)
                    .attr("cycles.L.samples", &samples[i].to_string())
                    .typed("L.Combined.left.R", SampleType::F16)
                    .typed("L.Combined.right.R", SampleType::F16);
                spec.views = Some(vec!["left".into(), "right".into()]);
                spec.write(&path, |c, x, y| value(i, c, x, y));
                path
            })
            .collect();
        let out = dir.path().join("out.exr");
        let report = merge(&inputs, &out, &MergeOptions::default()).unwrap();
        assert_eq!(report.layers[0].name, "L");
        assert_eq!(
            report.layers[0].samples, 8,
            "each slice's samples count once, not per view"
        );
        let (merged, attributes) = read(&out);
        assert_eq!(attributes["cycles.L.samples"], "8");
        let inputs: Vec<_> = inputs.iter().map(|p| read(p).0).collect();
        for name in ["L.Combined.left.R", "L.Combined.right.R"] {
            assert_eq!(merged[name].0, SampleType::F16);
            for p in 0..8 {
                let v = |i: usize| inputs[i][name].1[p] as f32;
                let expected = f16::from_f32(cycles_average(&[v(0), v(1)], &samples)).to_f64();
                assert_eq!(merged[name].1[p], expected, "{name} {p}");
            }
        }
        assert_eq!(merged["L.Depth.right.Z"].1, inputs[0]["L.Depth.right.Z"].1);
    }

    #[test]
    fn tiles_decreasing_lines_and_mixed_codecs_merge_alike() {
        let dir = tempfile::tempdir().unwrap();
        let channels = ["L.Combined.R", "L.Combined.G"];
        let write = |name: &str, spec: Spec, i: usize| {
            let path = dir.path().join(name);
            spec.attr("cycles.L.samples", &(i + 1).to_string())
                .write(&path, |c, x, y| value(i, c, x, y));
            path
        };
        let reference = [
            write("a.exr", Spec::new(19, 11, &channels), 0),
            write("b.exr", Spec::new(19, 11, &channels), 1),
        ];
        let reference_out = dir.path().join("reference.exr");
        merge(&reference, &reference_out, &MergeOptions::default()).unwrap();
        let expected = read(&reference_out).0;

        let tiled = [
            write("ta.exr", Spec::new(19, 11, &channels).tiled(8), 0),
            write(
                "tb.exr",
                Spec {
                    compression: Compression::RLE,
                    ..Spec::new(19, 11, &channels).tiled(8)
                },
                1,
            ),
        ];
        let mut one_line = Spec::new(19, 11, &channels);
        one_line.compression = Compression::RLE;
        one_line.line_order = LineOrder::Decreasing;
        let mut uncompressed = Spec::new(19, 11, &channels);
        uncompressed.compression = Compression::Uncompressed;
        let lines = [
            write("la.exr", one_line, 0),
            write("lb.exr", uncompressed, 1),
        ];
        for (inputs, name) in [(&tiled, "tiled.exr"), (&lines, "lines.exr")] {
            let out = dir.path().join(name);
            merge(
                inputs,
                &out,
                &MergeOptions {
                    threads: 3,
                    ..Default::default()
                },
            )
            .unwrap();
            assert_eq!(read(&out).0, expected, "{name}");
        }
        // Blocks of 1 line and of 16 lines do not merge block by block.
        let err = merge(
            [&lines[0], &reference[1]],
            dir.path().join("x.exr"),
            &MergeOptions::default(),
        )
        .unwrap_err();
        assert!(matches!(err, MergeError::LayoutMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("b.exr") && err.to_string().contains("scanlines"),
            "{err}"
        );
    }

    #[test]
    fn mismatched_inputs_are_refused_with_both_names() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, spec: Spec| {
            let path = dir.path().join(name);
            spec.attr("cycles.L.samples", "4")
                .write(&path, |c, x, y| value(0, c, x, y));
            path
        };
        let first = write("first.exr", Spec::new(8, 6, &["L.Combined.R", "L.Depth.Z"]));
        let cases = [
            (
                write("small.exr", Spec::new(4, 3, &["L.Combined.R", "L.Depth.Z"])),
                "4×3",
            ),
            (
                write("fewer.exr", Spec::new(8, 6, &["L.Combined.R"])),
                "no channel L.Depth.Z",
            ),
            (
                write(
                    "more.exr",
                    Spec::new(8, 6, &["L.Combined.R", "L.Depth.Z", "L.Mist.Z"]),
                ),
                "L.Mist.Z",
            ),
            (
                write(
                    "half.exr",
                    Spec::new(8, 6, &["L.Combined.R", "L.Depth.Z"])
                        .typed("L.Depth.Z", SampleType::F16),
                ),
                "L.Depth.Z is F16",
            ),
        ];
        for (path, what) in cases {
            let mut running = RunningMerge::new();
            running.add(&first).unwrap();
            let err = running.add(&path).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains(path.to_str().unwrap())
                    && text.contains("first.exr")
                    && text.contains(what),
                "{text}"
            );
            assert_eq!(running.len(), 1, "a refused slice changes nothing");
        }
    }

    #[test]
    fn running_merges_write_each_state_and_end_at_the_one_shot_merge() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec::new(9, 20, &CHANNELS);
        let inputs = slices(dir.path(), &spec, &[2, 5, 1, 3]);
        let out = dir.path().join("running.exr");
        let mut running = RunningMerge::new();
        assert!(matches!(
            running.write(&out, &MergeOptions::default()),
            Err(MergeError::NoInputs)
        ));
        let mut states = Vec::new();
        for input in &inputs {
            running.add(input).unwrap();
            running.write(&out, &MergeOptions::default()).unwrap();
            states.push(read(&out));
        }
        let one_shot = dir.path().join("one-shot.exr");
        merge(&inputs, &one_shot, &MergeOptions::default()).unwrap();
        assert_eq!(states.last(), Some(&read(&one_shot)));
        assert_eq!(states[0].1["cycles.ViewLayer.samples"], "2");
        assert_eq!(states[2].1["cycles.ViewLayer.samples"], "8");
        assert_ne!(states[1].0, states[2].0, "each slice changes the image");
    }

    #[test]
    fn a_cancelled_merge_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let inputs = slices(dir.path(), &Spec::new(4, 64, &CHANNELS), &[1, 1]);
        let out = dir.path().join("out.exr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let watch = (Arc::clone(&seen), out.clone(), dir.path().to_path_buf());
        let options = MergeOptions {
            progress: Some(Arc::new(move |p: Progress| {
                let temps = std::fs::read_dir(&watch.2)
                    .unwrap()
                    .filter(|e| {
                        e.as_ref()
                            .unwrap()
                            .file_name()
                            .to_string_lossy()
                            .ends_with(".tmp")
                    })
                    .count();
                watch.0.lock().unwrap().push((p, temps, watch.1.exists()));
                if p.blocks_written == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })),
            ..Default::default()
        };
        let err = merge(&inputs, &out, &options).unwrap_err();
        assert!(matches!(err, MergeError::Cancelled), "{err}");
        assert!(!out.exists());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0],
            (
                Progress {
                    blocks_written: 1,
                    blocks: 4
                },
                1,
                false
            ),
            "writing into a temporary file"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "only the inputs are left: {left:?}");
    }
}
