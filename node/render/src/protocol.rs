//! The JSON-lines protocol between a [`Worker`](crate::Worker) and the script inside Blender.
//!
//! Requests (one JSON object per line on Blender's stdin), externally tagged:
//! `{"render": RenderTask}` and `{"quit": {}}`.
//!
//! Replies (one per line on Blender's stdout, after [`REPLY_PREFIX`], so they stand apart from
//! Blender's own log lines): `{"ready": Ready}` once the scene is loaded, then per task
//! `{"started": ...}`, `{"progress": ...}` after each frame, and `{"done": ...}` or
//! `{"error": ...}`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What starts a reply line on Blender's stdout.
pub const REPLY_PREFIX: &str = "@blendnet ";

/// Longest reply line read. A reply lists at most a task's outputs or a scene's missing files;
/// anything longer is not from our script.
pub const MAX_REPLY_BYTES: usize = 1 << 20;

/// How a task renders its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SliceMode {
    /// A sample slice of a Cycles frame: `cycles.samples` = the slice length,
    /// `cycles.sample_offset` = its start, the scene's seed untouched; adaptive sampling,
    /// denoising (its data passes kept) and compositing off; a multilayer 32-bit EXR with
    /// every enabled pass.
    Slice,
    /// Whole frames, each written as `blender -b scene.blend -f N` writes it: the scene's own
    /// samples, denoising, compositor, sequencer, output format and color management, named
    /// as Blender names frames (the file name of the scene's output path with the frame
    /// number and extension, like `shot_0002.png`). A scene that asks for denoising on a
    /// Blender without OpenImageDenoise fails with [`ErrorKind::DenoiserMissing`]; one whose
    /// output is a movie fails with [`ErrorKind::BadRequest`].
    Frames,
}

/// One task for a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderTask {
    /// Chosen by the caller; echoed in every reply about this task.
    pub id: u64,
    pub mode: SliceMode,
    /// The frames to render, in order.
    pub frames: Vec<i32>,
    /// [`SliceMode::Slice`]: the slice length. [`SliceMode::Frames`]: the frames' sample
    /// count on a Cycles scene (the job's), or 0 for the scene's own.
    pub samples: u32,
    /// The frame's samples in all, of which the slice is a part ([`SliceMode::Slice`] only; 0
    /// when unknown): whether slices are exact depends on it.
    #[serde(default)]
    pub frame_samples: u32,
    /// Slice start ([`SliceMode::Slice`] only).
    pub sample_offset: u32,
    /// An existing directory for the outputs: `frame_<NNNNNN>.exr` for a
    /// [`SliceMode::Slice`], the scene's own frame names for [`SliceMode::Frames`].
    pub output_dir: PathBuf,
    /// Render even though the scene refers to files that are not there.
    pub allow_missing: bool,
}

/// What the script found when it loaded the scene.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Blender's version, like `3.4.1`.
    pub blender: String,
    /// `CYCLES`, `BLENDER_EEVEE`, `BLENDER_EEVEE_NEXT`, `BLENDER_WORKBENCH`, …
    pub engine: String,
    pub has_camera: bool,
    /// Whether this Blender's Cycles has `sample_offset` (3.2 and later). Without it a slice
    /// gets its own seed instead: statistically equal noise, not the same pixels.
    pub sample_offset: bool,
    pub frame_start: i32,
    pub frame_end: i32,
    /// Files the scene refers to that do not exist (absolute paths).
    pub missing: Vec<String>,
    pub view_layers: Vec<String>,
    /// Cycles denoises the scene's final render: a sliced frame needs a merger whose Blender
    /// has a denoiser.
    #[serde(default)]
    pub denoise: bool,
}

/// Why a task failed, as the script names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    SceneUnreadable,
    NoCamera,
    MissingFiles,
    EngineUnsupported,
    OutOfMemory,
    RenderFailed,
    BadRequest,
    /// The scene asks for Cycles denoising and this Blender has no OpenImageDenoise (Debian's
    /// build lacks it): a peer with an official Blender can render the task.
    DenoiserMissing,
}

/// A reply line from the script.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    Ready(Ready),
    Started {
        id: u64,
    },
    Progress {
        id: u64,
        frame: i32,
    },
    Done {
        id: u64,
        outputs: Vec<PathBuf>,
        render_ms: u64,
        /// True when the slice's samples are not exactly a single render's (see worker.py
        /// `exact_slices`).
        #[serde(default)]
        inexact: bool,
    },
    Error {
        id: Option<u64>,
        kind: ErrorKind,
        message: String,
        #[serde(default)]
        files: Vec<String>,
    },
}

/// A request line to the script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Request {
    Render(RenderTask),
    Quit {},
}

impl Reply {
    /// The reply on a line of Blender's stdout, if the line is one; `Err` when it starts like
    /// one but does not decode (a broken script, said so rather than ignored).
    pub(crate) fn parse(line: &str) -> Option<Result<Reply, String>> {
        let json = line.strip_prefix(REPLY_PREFIX)?;
        Some(serde_json::from_str(json).map_err(|e| format!("{e}: {json}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_stand_apart_from_blenders_log() {
        assert!(Reply::parse("Fra:1 Mem:12.00M | Sample 3/16").is_none());
        let done =
            Reply::parse(r#"@blendnet {"done": {"id": 3, "outputs": ["/a.exr"], "render_ms": 5}}"#);
        assert_eq!(
            done,
            Some(Ok(Reply::Done {
                id: 3,
                outputs: vec!["/a.exr".into()],
                render_ms: 5,
                inexact: false
            }))
        );
        assert!(matches!(
            Reply::parse("@blendnet {\"done\": 1}"),
            Some(Err(_))
        ));
    }

    #[test]
    fn requests_are_one_line_of_tagged_json() {
        let line = serde_json::to_string(&Request::Quit {}).unwrap();
        assert_eq!(line, r#"{"quit":{}}"#);
        let task = RenderTask {
            id: 1,
            mode: SliceMode::Slice,
            frames: vec![1],
            samples: 8,
            frame_samples: 16,
            sample_offset: 8,
            output_dir: "/tmp/x".into(),
            allow_missing: false,
        };
        let line = serde_json::to_string(&Request::Render(task)).unwrap();
        assert!(
            line.starts_with(r#"{"render":{"id":1,"mode":"slice""#),
            "{line}"
        );
        assert!(!line.contains('\n'));
    }
}
