//! One error enum per operation, each variant naming the file and what is wrong with it, so a
//! person (or the daemon, choosing whether to re-render a slice) can act on it.
//!
//! [`InputError`] is about one EXR on its own (it cannot be opened, is not an EXR, is cut
//! short, is not a multilayer render, lacks the samples Cycles weighs by). [`MergeError`] wraps
//! it and adds what only a set of inputs can get wrong (sizes and layouts that differ) and what
//! can fail while merging and writing. [`PreviewError`] is the same for PNG previews.

use std::io;
use std::path::PathBuf;

/// Why one EXR cannot be merged (or previewed). Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The file cannot be opened or read (missing, no permission, I/O error).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The file does not start with the OpenEXR magic number: it is something else (a PNG, a
    /// log, an empty file).
    #[error("{path} is not an OpenEXR file{detail}")]
    NotExr {
        /// The file.
        path: PathBuf,
        /// What it looks like instead, with a leading separator (`: it is empty`), or nothing.
        detail: String,
    },
    /// The file ends before the data its header and offset table announce: a render or a
    /// transfer was interrupted. Render (or fetch) the slice again.
    #[error("{path} is truncated: {detail}")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// Where the data runs out.
        detail: String,
    },
    /// The header or a block is not valid OpenEXR.
    #[error("{path} is not a valid OpenEXR file: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the decoder found wrong.
        detail: String,
    },
    /// A valid OpenEXR that uses something Cycles never writes (several parts, deep data, mip
    /// maps, subsampled channels) or is larger than this merge accepts.
    #[error("{path} cannot be merged: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature or limit.
        what: String,
    },
    /// No channel is named `Layer.Pass.Channel`: the file is a plain EXR (File Output "OpenEXR"
    /// rather than "OpenEXR MultiLayer"), which holds no render passes to merge.
    #[error(
        "{path} is not a multilayer EXR: no channel is named like ViewLayer.Combined.R \
         (render with the file format OpenEXR MultiLayer); its channels are {channels}"
    )]
    NotMultilayer {
        /// The file.
        path: PathBuf,
        /// The first few of its channel names, for the message.
        channels: String,
    },
    /// A render layer has no `cycles.<layer>.samples` attribute, so there is nothing to weigh
    /// its passes by. Cycles writes it on every render; the file was written by something else
    /// or had its metadata stripped.
    #[error("{path} has no samples metadata (cycles.{layer}.samples) for render layer {layer}")]
    MissingSamples {
        /// The file.
        path: PathBuf,
        /// The render layer.
        layer: String,
    },
    /// A render layer's `cycles.<layer>.samples` is not a positive number.
    #[error("{path}: cycles.{layer}.samples is {value:?}, not a positive number of samples")]
    BadSamples {
        /// The file.
        path: PathBuf,
        /// The render layer.
        layer: String,
        /// The attribute's text.
        value: String,
    },
}

/// Why [`merge`](crate::merge), [`RunningMerge::add`](crate::RunningMerge::add) or
/// [`RunningMerge::write`](crate::RunningMerge::write) failed. A failed merge leaves no file at
/// the output path (an earlier file there is kept as it was), except [`MergeError::Preview`]:
/// then the merged EXR was written and only its PNG preview failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// There is nothing to merge.
    #[error("no input files to merge")]
    NoInputs,
    /// More inputs than [`MAX_INPUTS`](crate::MAX_INPUTS).
    #[error("{count} inputs is more than the {limit} one merge accepts")]
    TooManyInputs {
        /// How many were given.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// One input is unusable on its own.
    #[error(transparent)]
    Input(#[from] InputError),
    /// An input's resolution (data or display window) differs from the first input's.
    #[error(
        "{path} is {size} but {first} is {first_size}: every slice of a frame must have the \
         same resolution"
    )]
    SizeMismatch {
        /// The input that differs.
        path: PathBuf,
        /// Its size, as `W×H` with the window's origin when it is not 0,0.
        size: String,
        /// The first input.
        first: PathBuf,
        /// The first input's size.
        first_size: String,
    },
    /// An input's channels or block layout differ from the first input's (other passes, other
    /// view layers, another sample type, another compression block size).
    #[error("{path} has a different layout from {first}: {detail}")]
    LayoutMismatch {
        /// The input that differs.
        path: PathBuf,
        /// The first input.
        first: PathBuf,
        /// The first difference found.
        detail: String,
    },
    /// An input changed on disk between [`RunningMerge::add`](crate::RunningMerge::add) and
    /// the merge.
    #[error("{path} changed since it was added to the merge; add it again")]
    Changed {
        /// The input.
        path: PathBuf,
    },
    /// The output (or its temporary file beside it) cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The EXR encoder refused the merged image (a bug, or a header this encoder cannot write).
    #[error("cannot encode {path}: {detail}")]
    Encode {
        /// The output.
        path: PathBuf,
        /// The encoder's reason.
        detail: String,
    },
    /// The progress callback asked to stop. Nothing was written at the output path.
    #[error("the merge was cancelled")]
    Cancelled,
    /// The merged EXR was written, but its preview could not be.
    #[error(transparent)]
    Preview(#[from] PreviewError),
}

/// Why a PNG preview could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PreviewError {
    /// The EXR to preview is unusable.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The EXR has no Combined pass in the requested (or any) view layer.
    #[error("{path} has no Combined pass{which}; its layers with one: {available}")]
    NoCombined {
        /// The EXR.
        path: PathBuf,
        /// ` in view layer X` when a layer was named, else nothing.
        which: String,
        /// The layers that have one, for the message.
        available: String,
    },
    /// The requested size is 0 or over [`MAX_PREVIEW_SIZE`](crate::MAX_PREVIEW_SIZE).
    #[error("a preview of {size} px is not possible: use 1 to {limit}")]
    BadSize {
        /// The requested size.
        size: u32,
        /// The limit.
        limit: u32,
    },
    /// The PNG (or its temporary file) cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The PNG encoder failed.
    #[error("cannot encode the preview {path}: {detail}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// The encoder's reason.
        detail: String,
    },
}
