//! Jobs, tasks and the signed events that change them, as they cross the network.
//!
//! ```text
//!  submitter   ── Submitted{spec} ─────────────────────────▶ blendnet/v1/jobs  (job id = its event id)
//!              ── Cancelled{job} ──────────────────────────▶ blendnet/v1/jobs
//!  coordinator ── Coordinating / Heartbeat / Granted / Done / JobFailed ─▶ blendnet/v1/tasks
//!  worker      ── Rendered / TaskFailed ───────────────────▶ blendnet/v1/tasks
//!  worker ◀──── /blendnet/work/1: WorkRequest ⇄ WorkResponse ────▶ coordinator
//! ```
//!
//! Every event is a [`SignedEvent`]: the bincode encoding of an [`EventBody`], signed by its
//! author's node key (ed25519) over a domain-separated message, so a signature over an event can
//! never be replayed as a certificate or anything else. Ed25519 peer ids inline their public key,
//! so an event verifies from its author's [`PeerId`] alone, without any key exchange.
//!
//! An event is named by its [`EventId`], a BLAKE3 hash of its author and body (not of its
//! signature bytes): two copies of one event are one event. A job is named by the id of its
//! `Submitted` event, so a job id can be neither forged nor chosen to collide with another job.
//!
//! What the events mean, and how a board merges them, is `blendnet-core`'s business; this
//! module only checks what can be checked without any state ([`EventBody::validate`]).

use crate::{BlobHash, DecodeError, PeerId, Topic, UnixTime, decode, encode};
use libp2p_identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

/// Largest encoded [`SignedEvent`]: under gossipsub's 64 KiB default transmit size with room for
/// gossipsub's own framing, so every event we sign can be published and relayed by any peer.
pub const MAX_EVENT_BYTES: usize = 60 * 1024;
/// Largest encoded [`WorkRequest`] or [`WorkResponse`]: each carries at most one event that is
/// not a submission (a merge's grant, with its inputs, is the largest), plus a few fields.
pub const MAX_WORK_BYTES: usize = MAX_EVENT_BYTES + 4 * 1024;
/// Most slices one merge takes: a 4096-sample frame cut into 4-sample slices, far beyond what
/// sizing carves, and 32 KiB of hashes in a grant.
pub const MAX_MERGE_INPUTS: usize = 1024;
/// Most frames in one job: ten thousand frames (seven minutes at 24 fps per job) keep the
/// explicit frame list of a submission far under [`MAX_EVENT_BYTES`].
pub const MAX_FRAMES: usize = 10_000;
/// Most samples per frame: Cycles' own upper bound for the samples setting (2^24).
pub const MAX_SAMPLES: u32 = 1 << 24;
/// Longest job name: a name is for people, one line in a list.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest path of the `.blend` inside the manifest: paths deeper than this are not projects.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest engine name for [`Engine::Other`]: Blender's engine identifiers are short.
pub const MAX_ENGINE_BYTES: usize = 64;
/// Longest failure reason: enough for an error and the last few lines of Blender's log.
pub const MAX_REASON_BYTES: usize = 1024;
/// Most frames in one whole-frame task: beyond this a task takes hours and a lost worker
/// loses too much.
pub const MAX_FRAMES_PER_TASK: u32 = 1_000;
/// Longest target task time: a day; longer tasks defeat leases and retries.
pub const MAX_TARGET_TASK_SECS: u32 = 24 * 3600;
/// Default target task time (DESIGN §6): long enough that Blender's per-task overhead is small,
/// short enough that a lost task costs a minute.
pub const DEFAULT_TARGET_TASK_SECS: u32 = 60;

/// Prefix of every signed event message: separates event signatures from any other use of a
/// node key.
const EVENT_DOMAIN: &[u8] = b"blendnet/v1/event\0";
/// BLAKE3 key-derivation context for event ids.
const EVENT_ID_CONTEXT: &str = "blendnet v1 event id";
/// The multihash code of an identity hash: a peer id that inlines its public key.
const IDENTITY_MULTIHASH: u64 = 0;

macro_rules! hex_id {
    ($name:ident, $what:literal, $bad:ident) => {
        #[doc = concat!("A ", $what, ": 32 bytes, shown as 64 hex digits.")]
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub struct $name(#[serde(with = "crate::id::hex32")] pub [u8; 32]);

        impl $name {
            /// The first 12 hex digits: enough to tell them apart in logs.
            pub fn short(&self) -> String {
                self.to_string()[..12].to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        #[doc = concat!("Text that is not a ", $what, " (64 hex digits).")]
        #[derive(Debug, thiserror::Error)]
        #[error("not a {what}: {0:?} (expected 64 hex digits)", what = $what)]
        pub struct $bad(String);

        impl FromStr for $name {
            type Err = $bad;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let bytes = data_encoding::HEXLOWER_PERMISSIVE
                    .decode(s.trim().as_bytes())
                    .map_err(|_| $bad(s.to_string()))?;
                let arr: [u8; 32] = bytes.try_into().map_err(|_| $bad(s.to_string()))?;
                Ok($name(arr))
            }
        }
    };
}

hex_id!(JobId, "job id", BadJobId);
hex_id!(EventId, "event id", BadEventId);

impl From<EventId> for JobId {
    /// A job is named by the id of its `Submitted` event.
    fn from(id: EventId) -> JobId {
        JobId(id.0)
    }
}

/// How a job is cut into tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Split {
    /// Sample slices for a Cycles still, whole frames for everything else.
    #[default]
    Auto,
    /// Sample slices of every frame (Cycles only).
    Samples,
    /// Whole frames.
    Frames,
}

/// The render engine a scene uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Engine {
    Cycles,
    Eevee,
    Workbench,
    /// Any other engine, by Blender's identifier; rendered by whole frames.
    Other(String),
}

/// A job as submitted: which scene, which frames, how many samples, how to split it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct JobSpec {
    /// A name for people.
    pub name: String,
    /// The scene's manifest blob.
    pub scene: BlobHash,
    /// The `.blend` to render: a relative path inside the manifest.
    pub blend_path: String,
    /// The frames to render, each once, in any order.
    pub frames: Vec<u32>,
    /// Cycles samples per frame; for whole-frame tasks, what the scene renders.
    pub samples: u32,
    pub split: Split,
    pub engine: Engine,
    /// The render time a sample slice aims at ([`DEFAULT_TARGET_TASK_SECS`] unless asked).
    pub target_task_secs: u32,
    /// Frames per whole-frame task (1 unless asked).
    pub frames_per_task: u32,
    /// The submitter's clock at submission (Unix seconds), for display and ordering only.
    pub submitted_at: UnixTime,
    /// The Blender the scene was made with, as `major.minor` (`4.2`): only peers whose Blender
    /// has the same major.minor render it (a `.blend` is not portable across versions). `None`
    /// lets any Blender render it.
    pub blender: Option<String>,
}

/// What is wrong with a [`JobSpec`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error("the job names no frames")]
    NoFrames,
    #[error("the job names {count} frames; at most {MAX_FRAMES} per job")]
    TooManyFrames { count: usize },
    #[error("frame {0} is listed twice")]
    DuplicateFrame(u32),
    #[error("samples must be at least 1")]
    NoSamples,
    #[error("{0} samples per frame is over Cycles' limit of {MAX_SAMPLES}")]
    TooManySamples(u32),
    #[error("the job name is {0} bytes long; at most {MAX_NAME_BYTES}")]
    NameTooLong(usize),
    #[error("the .blend path {0:?} is not a relative path inside the project")]
    BadBlendPath(String),
    #[error("the engine name is {0} bytes long; at most {MAX_ENGINE_BYTES}")]
    EngineNameTooLong(usize),
    #[error("splitting by samples needs Cycles, not {0:?}")]
    SamplesNeedCycles(Engine),
    #[error("target task time of {0} s is outside 1..={MAX_TARGET_TASK_SECS}")]
    TargetTaskSecs(u32),
    #[error("{0} frames per task is outside 1..={MAX_FRAMES_PER_TASK}")]
    FramesPerTask(u32),
    #[error("Blender version {0:?} is not of the form major.minor, like 4.2")]
    BadBlenderVersion(String),
}

/// `(major, minor)` of a Blender version such as `4.2.1` or `4.2`.
pub fn major_minor(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

impl JobSpec {
    /// A spec with the defaults: automatic split, 60 s target, one frame per task.
    pub fn new(
        name: impl Into<String>,
        scene: BlobHash,
        blend_path: impl Into<String>,
        frames: Vec<u32>,
        samples: u32,
        engine: Engine,
        submitted_at: UnixTime,
    ) -> JobSpec {
        JobSpec {
            name: name.into(),
            scene,
            blend_path: blend_path.into(),
            frames,
            samples,
            split: Split::Auto,
            engine,
            target_task_secs: DEFAULT_TARGET_TASK_SECS,
            frames_per_task: 1,
            submitted_at,
            blender: None,
        }
    }

    /// Checks every bound and rule; a submission that fails is refused with the reason.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        if self.frames.is_empty() {
            return Err(InvalidSpec::NoFrames);
        }
        if self.frames.len() > MAX_FRAMES {
            return Err(InvalidSpec::TooManyFrames {
                count: self.frames.len(),
            });
        }
        let mut sorted = self.frames.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(InvalidSpec::DuplicateFrame(w[0]));
        }
        if self.samples == 0 {
            return Err(InvalidSpec::NoSamples);
        }
        if self.samples > MAX_SAMPLES {
            return Err(InvalidSpec::TooManySamples(self.samples));
        }
        if self.name.len() > MAX_NAME_BYTES {
            return Err(InvalidSpec::NameTooLong(self.name.len()));
        }
        if !is_relative_path(&self.blend_path) {
            return Err(InvalidSpec::BadBlendPath(truncated(&self.blend_path, 80)));
        }
        if let Engine::Other(name) = &self.engine
            && name.len() > MAX_ENGINE_BYTES
        {
            return Err(InvalidSpec::EngineNameTooLong(name.len()));
        }
        if self.split == Split::Samples && self.engine != Engine::Cycles {
            return Err(InvalidSpec::SamplesNeedCycles(self.engine.clone()));
        }
        if !(1..=MAX_TARGET_TASK_SECS).contains(&self.target_task_secs) {
            return Err(InvalidSpec::TargetTaskSecs(self.target_task_secs));
        }
        if !(1..=MAX_FRAMES_PER_TASK).contains(&self.frames_per_task) {
            return Err(InvalidSpec::FramesPerTask(self.frames_per_task));
        }
        if let Some(version) = &self.blender
            && major_minor(version).is_none_or(|(a, b)| format!("{a}.{b}") != *version)
        {
            return Err(InvalidSpec::BadBlenderVersion(truncated(version, 20)));
        }
        Ok(())
    }

    /// Whether a peer with Blender `version` (`4.2.1`, or none) may render this job.
    pub fn blender_matches(&self, version: Option<&str>) -> bool {
        match &self.blender {
            None => true,
            Some(wanted) => version
                .and_then(major_minor)
                .is_some_and(|v| Some(v) == major_minor(wanted)),
        }
    }

    /// Whether frames are cut into sample slices (Cycles, split `Samples`, or `Auto` with a
    /// single frame); otherwise tasks are whole frames.
    pub fn splits_samples(&self) -> bool {
        self.engine == Engine::Cycles
            && match self.split {
                Split::Samples => true,
                Split::Frames => false,
                Split::Auto => self.frames.len() == 1,
            }
    }
}

fn is_relative_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= MAX_PATH_BYTES
        && !path.starts_with('/')
        && !path.starts_with('\\')
        && !path.contains(':')
        && !path.contains('\0')
        && path
            .split(['/', '\\'])
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn truncated(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// What a task does.
///
/// Merges come first in [`TaskSpec`]'s order, so a coordinator grants a frame's merge before
/// more rendering: finished frames reach the artist as early as they can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Merge a sample-split frame's slices and finish it into the scene's output file. The
    /// task names the frame and all its samples (`frame_count` 1, `sample_offset` 0); its grant
    /// names the slices.
    Merge,
    /// Render samples of frames with Blender.
    Render,
}

/// The unit of work, named by its content: a run of frames, and a slice of samples of each.
///
/// Whole-frame tasks have `sample_offset` 0 and `samples` equal to the job's samples. Ordered
/// by kind (merges first), then by frame, then by sample offset, which is the order tasks are
/// granted in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskSpec {
    pub kind: TaskKind,
    pub frame_start: u32,
    pub frame_count: u32,
    pub sample_offset: u32,
    pub samples: u32,
}

impl TaskSpec {
    /// A task that renders `samples` samples from `sample_offset` of `frame_count` frames.
    pub fn render(frame_start: u32, frame_count: u32, sample_offset: u32, samples: u32) -> Self {
        TaskSpec {
            kind: TaskKind::Render,
            frame_start,
            frame_count,
            sample_offset,
            samples,
        }
    }

    /// The merge of `frame`, a frame of `samples` samples.
    pub fn merge(frame: u32, samples: u32) -> Self {
        TaskSpec {
            kind: TaskKind::Merge,
            frame_start: frame,
            frame_count: 1,
            sample_offset: 0,
            samples,
        }
    }

    /// Whether this is a merge.
    pub fn is_merge(&self) -> bool {
        self.kind == TaskKind::Merge
    }

    /// The frames this task renders. Empty if the run would pass `u32::MAX`.
    pub fn frames(&self) -> Range<u32> {
        match self.frame_start.checked_add(self.frame_count) {
            Some(end) => self.frame_start..end,
            None => 0..0,
        }
    }

    /// The sample slice `[sample_offset, sample_offset + samples)`; empty if it would overflow.
    pub fn sample_range(&self) -> Range<u32> {
        match self.sample_offset.checked_add(self.samples) {
            Some(end) => self.sample_offset..end,
            None => 0..0,
        }
    }

    /// Whether two tasks render some sample of some frame both (merges render nothing).
    pub fn overlaps(&self, other: &TaskSpec) -> bool {
        if self.is_merge() || other.is_merge() {
            return false;
        }
        let (f, g) = (self.frames(), other.frames());
        let (s, t) = (self.sample_range(), other.sample_range());
        f.start < g.end && g.start < f.end && s.start < t.end && t.start < s.end
    }

    /// Frames × samples: the amount of render work, in the unit sizing measures time by (0 for
    /// a merge).
    pub fn units(&self) -> u64 {
        if self.is_merge() {
            return 0;
        }
        u64::from(self.frame_count) * u64::from(self.samples)
    }
}

impl fmt::Display for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_merge() {
            return write!(f, "merge of frame {}", self.frame_start);
        }
        if self.frame_count == 1 {
            write!(f, "frame {}", self.frame_start)?;
        } else {
            let end = self.frame_start.saturating_add(self.frame_count - 1);
            write!(f, "frames {}-{}", self.frame_start, end)?;
        }
        write!(
            f,
            " samples {}..{}",
            self.sample_offset,
            u64::from(self.sample_offset) + u64::from(self.samples)
        )
    }
}

/// The right to render one task, issued by the job's coordinator.
///
/// `(epoch, seq)` is unique per task among the leases of the epoch's coordinator; a lease of a
/// newer epoch, or a later lease of the same epoch, ranks above an older one. A backup lease
/// is a second copy of a straggling task; the first result wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Lease {
    pub epoch: u64,
    pub seq: u64,
    pub worker: PeerId,
    pub backup: bool,
}

/// What a worker measured while rendering a task, carried in its signed `Rendered` event, so
/// every peer holding the job's events holds its statistics too.
///
/// A task's time on its worker is cut into phases that follow each other without gaps, each
/// measured on the worker's monotonic clock:
///
/// ```text
///  lease accepted ─ wait ─▶ started ─ fetch ─▶ inputs here ─ blender_start ─▶ scene loaded
///     ─ render (or merge) ─▶ outputs written ─ upload ─▶ result in the store, report sent
/// ```
///
/// `wall_ms` is measured on its own, from one instant at the start of the wait to one at the
/// end of the upload, so the phases can be checked against it: they add up to it within the
/// milliseconds lost to rounding each phase down.
///
/// "Upload" is the import of the outputs into the worker's own blob store, after which the
/// worker reports the result. Copying the result to a second peer (which makes the task done)
/// happens after that, asked by the coordinator, and is no part of the worker's task time.
///
/// Adding fields changes the encoding of `Rendered` events: events from a daemon of an earlier
/// version do not decode, so every peer of a mesh runs the same version (pre-release).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TaskStats {
    /// Wall time of the render itself, from the task handed to the loaded Blender to its
    /// outputs written (0 for a merge).
    pub render_ms: u64,
    /// Samples rendered per frame.
    pub samples: u32,
    /// Time to start Blender and load the scene; 0 when a loaded process was reused. For a
    /// merge, 0: Blender starts inside the merge phase.
    pub blender_start_ms: u64,
    /// Peak resident memory of the Blender process that rendered it (so far in its life: a
    /// Blender kept for the job's next task carries it over); 0 where the system does not
    /// tell.
    pub peak_memory_bytes: u64,
    /// This slice's samples are not exactly the ones a single render of the frame takes, so the
    /// merged frame equals a local render statistically (same noise level), not pixel for
    /// pixel: the worker's Blender has no `sample_offset` (a seed of its own stood in), or its
    /// sampling pattern depends on the sample count (see worker.py `exact_slices`).
    pub inexact: bool,
    /// The scene asks Cycles to denoise: its frames need a merger whose Blender can.
    pub denoise: bool,
    /// The worker held the lease but had not started the task: from its board accepting the
    /// grant to its render side taking the task up.
    pub wait_ms: u64,
    /// Fetching the inputs into the worker's workspace: the scene for a render task (0 when
    /// the job's scene was loaded already), the slices and the scene for a merge.
    pub fetch_ms: u64,
    /// Importing the outputs into the worker's blob store, until the report is sent.
    pub upload_ms: u64,
    /// A merge task's merge of the slices and Blender's finish of the frame (0 for a render).
    pub merge_ms: u64,
    /// The task's whole time on the worker, measured apart from the phases (see above).
    pub wall_ms: u64,
    /// What an hour of the worker costs, in millionths of a US dollar, as the worker said when
    /// it reported (its `price_per_hour` setting, or the launch price of a cloud instance);
    /// `None` when unknown.
    pub price_per_hour_micros: Option<u64>,
}

impl TaskStats {
    /// The phases in order: wait, fetch, Blender start, render, merge, upload.
    pub fn phases(&self) -> [u64; 6] {
        [
            self.wait_ms,
            self.fetch_ms,
            self.blender_start_ms,
            self.render_ms,
            self.merge_ms,
            self.upload_ms,
        ]
    }

    /// The sum of the phases: `wall_ms` up to rounding.
    pub fn phases_ms(&self) -> u64 {
        self.phases().iter().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// What an event says. The author is in the [`SignedEvent`] around it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventBody {
    /// A new job (by a peer with the `submit` role). Its event id is the job id.
    Submitted { spec: JobSpec },
    /// The author coordinates `job` from `epoch` on (a first claim or a takeover).
    Coordinating { job: JobId, epoch: u64 },
    /// The coordinator is alive. Not stored: a liveness signal, published every heartbeat.
    /// `beat` differs between heartbeats so that no transport mistakes one for a duplicate.
    Heartbeat { job: JobId, epoch: u64, beat: u64 },
    /// The coordinator leased `task` to `lease.worker`. A merge's grant names the results of
    /// the slices to merge, which together render each of the frame's samples once; a render
    /// task's names none.
    Granted {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        inputs: Vec<BlobHash>,
    },
    /// The worker of `lease` rendered `task`; it holds the result blob.
    Rendered {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        result: BlobHash,
        stats: TaskStats,
    },
    /// The coordinator of `epoch` saw `result` held by a second peer: the task is done.
    Done {
        job: JobId,
        task: TaskSpec,
        result: BlobHash,
        epoch: u64,
    },
    /// The worker of `lease` could not render `task`.
    TaskFailed {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        reason: String,
    },
    /// The coordinator of `epoch` gave the job up (a task failed on too many peers).
    JobFailed {
        job: JobId,
        epoch: u64,
        reason: String,
    },
    /// The submitter cancelled the job.
    Cancelled { job: JobId },
}

/// What is wrong with an event body on its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEvent {
    #[error("invalid job spec: {0}")]
    Spec(#[from] InvalidSpec),
    #[error("epoch 0 is not an epoch (epochs start at 1)")]
    ZeroEpoch,
    #[error("a lease's seq starts at 1")]
    ZeroSeq,
    #[error(
        "a merge takes 1 to {MAX_MERGE_INPUTS} slices and is one frame's; a render task takes none (got {inputs} inputs for {task})"
    )]
    BadInputs { task: TaskSpec, inputs: usize },
    #[error("the task is empty or runs past the end of the frame or sample range")]
    EmptyTask,
    #[error("the reason is {0} bytes long; at most {MAX_REASON_BYTES}")]
    ReasonTooLong(usize),
    #[error("a {0} event must be signed by the lease's worker")]
    NotTheWorker(&'static str),
}

impl EventBody {
    /// The job the event is about; `None` for a submission (its own id is the job).
    pub fn job(&self) -> Option<JobId> {
        match self {
            EventBody::Submitted { .. } => None,
            EventBody::Coordinating { job, .. }
            | EventBody::Heartbeat { job, .. }
            | EventBody::Granted { job, .. }
            | EventBody::Rendered { job, .. }
            | EventBody::Done { job, .. }
            | EventBody::TaskFailed { job, .. }
            | EventBody::JobFailed { job, .. }
            | EventBody::Cancelled { job } => Some(*job),
        }
    }

    /// The epoch of an event only a job's coordinator may author; `None` for the others.
    pub fn coordinator_epoch(&self) -> Option<u64> {
        match self {
            EventBody::Coordinating { epoch, .. }
            | EventBody::Heartbeat { epoch, .. }
            | EventBody::Done { epoch, .. }
            | EventBody::JobFailed { epoch, .. } => Some(*epoch),
            EventBody::Granted { lease, .. } => Some(lease.epoch),
            EventBody::Submitted { .. }
            | EventBody::Rendered { .. }
            | EventBody::TaskFailed { .. }
            | EventBody::Cancelled { .. } => None,
        }
    }

    /// The task the event is about, if any.
    pub fn task(&self) -> Option<TaskSpec> {
        match self {
            EventBody::Granted { task, .. }
            | EventBody::Rendered { task, .. }
            | EventBody::Done { task, .. }
            | EventBody::TaskFailed { task, .. } => Some(*task),
            _ => None,
        }
    }

    /// The gossip topic the event is published on. Job failures go on `tasks`: coordinators
    /// publish them, and need not hold the `submit` role that `jobs` asks for.
    pub fn topic(&self) -> Topic {
        match self {
            EventBody::Submitted { .. } | EventBody::Cancelled { .. } => Topic::Jobs,
            _ => Topic::Tasks,
        }
    }

    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Submitted { .. } => "submitted",
            EventBody::Coordinating { .. } => "coordinating",
            EventBody::Heartbeat { .. } => "heartbeat",
            EventBody::Granted { .. } => "granted",
            EventBody::Rendered { .. } => "rendered",
            EventBody::Done { .. } => "done",
            EventBody::TaskFailed { .. } => "task failed",
            EventBody::JobFailed { .. } => "job failed",
            EventBody::Cancelled { .. } => "cancelled",
        }
    }

    /// Checks what can be checked without knowing the job: bounds, epochs, and that worker
    /// events are by the lease's worker.
    pub fn validate(&self, author: &PeerId) -> Result<(), InvalidEvent> {
        if let Some(0) = self.coordinator_epoch() {
            return Err(InvalidEvent::ZeroEpoch);
        }
        if let Some(task) = self.task()
            && (task.frame_count == 0
                || task.samples == 0
                || task.frames().is_empty()
                || task.sample_range().is_empty())
        {
            return Err(InvalidEvent::EmptyTask);
        }
        match self {
            EventBody::Submitted { spec } => spec.validate()?,
            EventBody::Granted { lease, .. } if lease.seq == 0 => {
                return Err(InvalidEvent::ZeroSeq);
            }
            EventBody::Granted { task, inputs, .. }
                if match task.kind {
                    TaskKind::Merge => {
                        inputs.is_empty()
                            || inputs.len() > MAX_MERGE_INPUTS
                            || task.frame_count != 1
                            || task.sample_offset != 0
                    }
                    TaskKind::Render => !inputs.is_empty(),
                } =>
            {
                return Err(InvalidEvent::BadInputs {
                    task: *task,
                    inputs: inputs.len(),
                });
            }
            EventBody::Rendered { lease, .. } | EventBody::TaskFailed { lease, .. }
                if lease.worker != *author =>
            {
                return Err(InvalidEvent::NotTheWorker(self.kind()));
            }
            _ => {}
        }
        match self {
            EventBody::TaskFailed { reason, .. } | EventBody::JobFailed { reason, .. }
                if reason.len() > MAX_REASON_BYTES =>
            {
                Err(InvalidEvent::ReasonTooLong(reason.len()))
            }
            _ => Ok(()),
        }
    }
}

/// Cuts a failure reason to [`MAX_REASON_BYTES`] (on a character boundary), so that an event
/// we author is always valid.
pub fn bounded_reason(reason: &str) -> String {
    truncated(reason, MAX_REASON_BYTES)
}

/// An event as it travels and as it is stored: the encoded body, its author and signature.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SignedEvent {
    pub author: PeerId,
    /// The bincode encoding of an [`EventBody`].
    pub body: Vec<u8>,
    /// The author's signature over the event domain followed by `body`.
    pub signature: Vec<u8>,
}

impl fmt::Debug for SignedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignedEvent")
            .field("id", &self.id())
            .field("author", &self.author)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// Why an event could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("node key is not ed25519: its peer id does not inline the public key")]
    KeyNotInlined,
    #[error("signing failed: {0}")]
    Signing(#[from] libp2p_identity::SigningError),
    #[error("the event is {len} bytes encoded; at most {MAX_EVENT_BYTES}")]
    TooLarge { len: usize },
}

/// Why an event was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event cannot be decoded: {0}")]
    Malformed(#[from] DecodeError),
    #[error("author {0} does not inline its public key (not an ed25519 peer id)")]
    KeyNotInlined(PeerId),
    #[error("author {0}'s inlined public key cannot be decoded")]
    BadKey(PeerId),
    #[error("signature by {0} does not verify")]
    BadSignature(PeerId),
    #[error("invalid {kind} event: {source}")]
    Invalid {
        kind: &'static str,
        #[source]
        source: InvalidEvent,
    },
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(EVENT_DOMAIN.len() + body.len());
    msg.extend_from_slice(EVENT_DOMAIN);
    msg.extend_from_slice(body);
    msg
}

/// The public key an ed25519 peer id inlines, if it does.
pub fn inlined_key(peer: &PeerId) -> Option<PublicKey> {
    let multihash = peer.as_ref();
    if multihash.code() != IDENTITY_MULTIHASH {
        return None;
    }
    PublicKey::try_decode_protobuf(multihash.digest()).ok()
}

impl SignedEvent {
    /// Signs `body` with the node key. Fails for keys whose peer id does not inline the public
    /// key (only ed25519 does, and only those verify from a peer id alone).
    pub fn sign(keypair: &Keypair, body: EventBody) -> Result<VerifiedEvent, SignError> {
        let author = keypair.public().to_peer_id();
        if inlined_key(&author).is_none() {
            return Err(SignError::KeyNotInlined);
        }
        let bytes = encode(&body);
        let signature = keypair.sign(&signed_message(&bytes))?;
        let signed = SignedEvent {
            author,
            body: bytes,
            signature,
        };
        let len = encode(&signed).len();
        if len > MAX_EVENT_BYTES {
            return Err(SignError::TooLarge { len });
        }
        Ok(VerifiedEvent(Arc::new(Verified {
            id: signed.id(),
            signed,
            body,
        })))
    }

    /// The event's id: BLAKE3 of the author and the body bytes, whatever the signature bytes.
    pub fn id(&self) -> EventId {
        let mut hasher = blake3::Hasher::new_derive_key(EVENT_ID_CONTEXT);
        let author = self.author.to_bytes();
        hasher.update(&(author.len() as u64).to_le_bytes());
        hasher.update(&author);
        hasher.update(&self.body);
        EventId(*hasher.finalize().as_bytes())
    }

    /// Decodes a stored or received event, refusing more than [`MAX_EVENT_BYTES`].
    pub fn from_bytes(bytes: &[u8]) -> Result<SignedEvent, DecodeError> {
        decode(bytes, MAX_EVENT_BYTES)
    }

    /// The wire and storage encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Checks the signature against the key the author's peer id inlines, decodes the body and
    /// checks it on its own ([`EventBody::validate`]).
    pub fn verify(self) -> Result<VerifiedEvent, EventError> {
        let key = inlined_key(&self.author).ok_or_else(|| {
            if self.author.as_ref().code() == IDENTITY_MULTIHASH {
                EventError::BadKey(self.author)
            } else {
                EventError::KeyNotInlined(self.author)
            }
        })?;
        if !key.verify(&signed_message(&self.body), &self.signature) {
            return Err(EventError::BadSignature(self.author));
        }
        let body: EventBody = decode(&self.body, MAX_EVENT_BYTES)?;
        body.validate(&self.author)
            .map_err(|source| EventError::Invalid {
                kind: body.kind(),
                source,
            })?;
        Ok(VerifiedEvent(Arc::new(Verified {
            id: self.id(),
            signed: self,
            body,
        })))
    }
}

#[derive(PartialEq, Eq)]
struct Verified {
    id: EventId,
    signed: SignedEvent,
    body: EventBody,
}

/// An event whose signature and body have been checked, with its decoded body and id.
///
/// Only [`SignedEvent::verify`] and [`SignedEvent::sign`] make one, so holding one proves the
/// check was done: a shell may verify on any thread and hand boards the result. Cloning is
/// cheap (shared).
#[derive(Clone, PartialEq, Eq)]
pub struct VerifiedEvent(Arc<Verified>);

impl VerifiedEvent {
    /// The event's id.
    pub fn id(&self) -> EventId {
        self.0.id
    }

    /// Who signed it.
    pub fn author(&self) -> PeerId {
        self.0.signed.author
    }

    /// What it says.
    pub fn body(&self) -> &EventBody {
        &self.0.body
    }

    /// The signed form, to store or send.
    pub fn signed(&self) -> &SignedEvent {
        &self.0.signed
    }
}

impl fmt::Debug for VerifiedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedEvent")
            .field("id", &self.0.id)
            .field("author", &self.0.signed.author)
            .field("body", &self.0.body)
            .finish()
    }
}

/// What a worker tells a coordinator about itself when it asks for work.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Offer {
    pub cores: u32,
    pub gpus: u32,
    /// Blender's version (`4.2.1`), if the worker found one.
    pub blender: Option<String>,
    /// Its Blender can denoise (has OpenImageDenoise).
    pub denoiser: bool,
    /// What an hour of the worker costs, in millionths of a US dollar, if it knows: its board
    /// puts it in the stats of every task it reports ([`TaskStats::price_per_hour_micros`]).
    pub price_per_hour_micros: Option<u64>,
}

/// Why a coordinator took a lease back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
pub enum RevokeReason {
    #[error("the task is done (another copy finished first)")]
    TaskDone,
    #[error("the lease lapsed and the task went to another worker")]
    Superseded,
    #[error("the task was carved differently by another coordinator and is no longer needed")]
    Orphaned,
    #[error("the job was cancelled")]
    JobCancelled,
    #[error("the job failed")]
    JobFailed,
    #[error("the job is done")]
    JobDone,
    #[error("the lease is not one this coordinator issued or knows")]
    UnknownLease,
}

/// A worker's request to a job's coordinator on [`crate::WORK_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkRequest {
    /// "Give me a task of `job`." `report` carries the worker's latest `Rendered` or
    /// `TaskFailed` event for the job, so the coordinator learns of it before deciding even if
    /// gossip has not brought it yet.
    RequestWork {
        job: JobId,
        offer: Offer,
        report: Option<SignedEvent>,
    },
    /// "I am still rendering this": `grant` is the `Granted` event of the lease, so a new
    /// coordinator that missed it learns of it and honours it.
    Renew { grant: SignedEvent },
    /// "I give this lease back" (shutdown, preemption).
    Release { grant: SignedEvent },
}

impl WorkRequest {
    /// Decodes a request from untrusted bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<WorkRequest, DecodeError> {
        decode(bytes, MAX_WORK_BYTES)
    }
}

/// A coordinator's answer to a [`WorkRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkResponse {
    /// The `Granted` event of a new lease for the asker (or of the one it already holds, if it
    /// asks again without having reported it).
    Grant { grant: SignedEvent },
    /// Nothing to grant now; ask again after this long.
    NoWork { retry_after_ms: u64 },
    /// The lease is extended by this long on the coordinator's clock.
    Renewed { valid_for_ms: u64 },
    /// The lease is given back.
    Released,
    /// Stop rendering this lease's task (for `Renew`), or stop asking (for `RequestWork`).
    Revoked { reason: RevokeReason },
    /// This peer does not coordinate the job; `hint` is the one it believes does.
    NotCoordinator { hint: Option<PeerId> },
}

impl WorkResponse {
    /// Decodes a response from untrusted bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<WorkResponse, DecodeError> {
        decode(bytes, MAX_WORK_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> JobSpec {
        JobSpec::new(
            "shot 10",
            BlobHash::of(b"manifest"),
            "shots/010.blend",
            vec![1, 2, 3],
            128,
            Engine::Cycles,
            1_700_000_000,
        )
    }

    #[test]
    fn only_a_blender_of_the_same_major_minor_matches() {
        let mut s = spec();
        assert!(s.blender_matches(None) && s.blender_matches(Some("3.4.1")));
        s.blender = Some("4.2".into());
        assert!(s.validate().is_ok());
        assert!(s.blender_matches(Some("4.2.3")) && s.blender_matches(Some("4.2")));
        assert!(!s.blender_matches(Some("4.3.0")) && !s.blender_matches(Some("3.4.1")));
        assert!(
            !s.blender_matches(None),
            "a peer without Blender renders nothing"
        );
        for bad in ["4", "4.2.1", "four.two", ""] {
            s.blender = Some(bad.into());
            assert!(
                matches!(s.validate(), Err(InvalidSpec::BadBlenderVersion(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn events_verify_from_the_peer_id_alone_and_refuse_tampering() {
        let key = Keypair::generate_ed25519();
        let ev = SignedEvent::sign(&key, EventBody::Submitted { spec: spec() }).unwrap();
        let back = SignedEvent::from_bytes(&ev.signed().to_bytes())
            .unwrap()
            .verify()
            .unwrap();
        assert_eq!(back.id(), ev.id());
        assert_eq!(back.author(), key.public().to_peer_id());
        assert_eq!(back.body(), ev.body());

        let mut tampered = ev.signed().clone();
        let mut other = spec();
        other.samples = 4096;
        tampered.body = encode(&EventBody::Submitted { spec: other });
        assert!(matches!(
            tampered.verify(),
            Err(EventError::BadSignature(_))
        ));

        let mut stolen = ev.signed().clone();
        stolen.author = Keypair::generate_ed25519().public().to_peer_id();
        assert!(matches!(stolen.verify(), Err(EventError::BadSignature(_))));

        let mut random_author = ev.signed().clone();
        random_author.author = PeerId::random();
        assert!(random_author.verify().is_err());
    }

    #[test]
    fn an_event_signature_is_not_a_signature_of_the_bare_body() {
        let key = Keypair::generate_ed25519();
        let body = encode(&EventBody::Cancelled {
            job: JobId([1; 32]),
        });
        let bare = SignedEvent {
            author: key.public().to_peer_id(),
            signature: key.sign(&body).unwrap(),
            body,
        };
        assert!(matches!(bare.verify(), Err(EventError::BadSignature(_))));
    }

    #[test]
    fn the_id_ignores_signature_bytes_and_names_the_job() {
        let key = Keypair::generate_ed25519();
        let ev = SignedEvent::sign(&key, EventBody::Submitted { spec: spec() }).unwrap();
        let mut copy = ev.signed().clone();
        copy.signature = vec![0; 64];
        assert_eq!(copy.id(), ev.id());
        let other = SignedEvent::sign(
            &Keypair::generate_ed25519(),
            EventBody::Submitted { spec: spec() },
        )
        .unwrap();
        assert_ne!(JobId::from(other.id()), JobId::from(ev.id()));
        let job = JobId::from(ev.id());
        assert_eq!(job.to_string().parse::<JobId>().unwrap(), job);
        assert!("xyz".parse::<JobId>().is_err());
    }

    #[test]
    fn bodies_that_break_a_rule_are_refused_at_verification() {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id();
        let task = TaskSpec::render(1, 1, 0, 16);
        let someone = PeerId::random();
        let lease = Lease {
            epoch: 1,
            seq: 1,
            worker: someone,
            backup: false,
        };
        let job = JobId([2; 32]);
        let bad = [
            EventBody::Coordinating { job, epoch: 0 },
            EventBody::Granted {
                job,
                task,
                lease: Lease { seq: 0, ..lease },
                inputs: vec![],
            },
            EventBody::Granted {
                job,
                task: TaskSpec { samples: 0, ..task },
                lease,
                inputs: vec![],
            },
            // A render task names no inputs; a merge names at least one, and not too many.
            EventBody::Granted {
                job,
                task,
                lease,
                inputs: vec![BlobHash::of(b"x")],
            },
            EventBody::Granted {
                job,
                task: TaskSpec::merge(1, 16),
                lease,
                inputs: vec![],
            },
            EventBody::Granted {
                job,
                task: TaskSpec::merge(1, 16),
                lease,
                inputs: vec![BlobHash::of(b"x"); MAX_MERGE_INPUTS + 1],
            },
            EventBody::Rendered {
                job,
                task,
                lease,
                result: BlobHash::of(b"x"),
                stats: TaskStats::default(),
            },
            EventBody::JobFailed {
                job,
                epoch: 1,
                reason: "x".repeat(MAX_REASON_BYTES + 1),
            },
        ];
        for body in bad {
            // Sign by hand: `sign` itself does not validate, so a buggy peer could send these.
            let bytes = encode(&body);
            let ev = SignedEvent {
                author: me,
                signature: key.sign(&signed_message(&bytes)).unwrap(),
                body: bytes,
            };
            assert!(
                matches!(ev.verify(), Err(EventError::Invalid { .. })),
                "{body:?} should be refused"
            );
        }
    }

    #[test]
    fn the_largest_valid_submission_fits_in_one_event() {
        let mut big = spec();
        big.name = "n".repeat(MAX_NAME_BYTES);
        big.blend_path = "p/".repeat(MAX_PATH_BYTES / 2 - 1) + "x";
        big.frames = (u32::MAX - MAX_FRAMES as u32..u32::MAX).collect();
        big.engine = Engine::Other("e".repeat(MAX_ENGINE_BYTES));
        big.split = Split::Frames;
        big.validate().unwrap();
        let ev = SignedEvent::sign(
            &Keypair::generate_ed25519(),
            EventBody::Submitted { spec: big },
        )
        .unwrap();
        assert!(ev.signed().to_bytes().len() <= MAX_EVENT_BYTES);
        assert!(ev.signed().to_bytes().len() > MAX_EVENT_BYTES / 2);
    }

    #[test]
    fn specs_are_validated() {
        spec().validate().unwrap();
        type Change = Box<dyn Fn(&mut JobSpec)>;
        let cases: Vec<(Change, InvalidSpec)> = vec![
            (Box::new(|s| s.frames.clear()), InvalidSpec::NoFrames),
            (
                Box::new(|s| s.frames = vec![4, 5, 4]),
                InvalidSpec::DuplicateFrame(4),
            ),
            (Box::new(|s| s.samples = 0), InvalidSpec::NoSamples),
            (
                Box::new(|s| s.samples = MAX_SAMPLES + 1),
                InvalidSpec::TooManySamples(MAX_SAMPLES + 1),
            ),
            (
                Box::new(|s| s.blend_path = "../secret.blend".into()),
                InvalidSpec::BadBlendPath("../secret.blend".into()),
            ),
            (
                Box::new(|s| s.blend_path = "/etc/x.blend".into()),
                InvalidSpec::BadBlendPath("/etc/x.blend".into()),
            ),
            (
                Box::new(|s| {
                    s.engine = Engine::Eevee;
                    s.split = Split::Samples;
                }),
                InvalidSpec::SamplesNeedCycles(Engine::Eevee),
            ),
            (
                Box::new(|s| s.target_task_secs = 0),
                InvalidSpec::TargetTaskSecs(0),
            ),
            (
                Box::new(|s| s.frames_per_task = 0),
                InvalidSpec::FramesPerTask(0),
            ),
            (
                Box::new(|s| s.frames = (0..MAX_FRAMES as u32 + 1).collect()),
                InvalidSpec::TooManyFrames {
                    count: MAX_FRAMES + 1,
                },
            ),
        ];
        for (change, expected) in cases {
            let mut s = spec();
            change(&mut s);
            assert_eq!(s.validate(), Err(expected));
        }
    }

    #[test]
    fn auto_split_slices_only_cycles_stills() {
        let mut s = spec();
        assert!(!s.splits_samples(), "an animation is split by frames");
        s.frames = vec![7];
        assert!(s.splits_samples());
        s.engine = Engine::Eevee;
        assert!(!s.splits_samples());
        s.engine = Engine::Cycles;
        s.split = Split::Frames;
        assert!(!s.splits_samples());
    }

    #[test]
    fn work_messages_round_trip_under_their_limit() {
        let key = Keypair::generate_ed25519();
        let me = key.public().to_peer_id();
        let task = TaskSpec::render(1, 1, 0, 16);
        let failed = SignedEvent::sign(
            &key,
            EventBody::TaskFailed {
                job: JobId([3; 32]),
                task,
                lease: Lease {
                    epoch: 9,
                    seq: 9,
                    worker: me,
                    backup: true,
                },
                reason: bounded_reason(&"é".repeat(MAX_REASON_BYTES)),
            },
        )
        .unwrap();
        let req = WorkRequest::RequestWork {
            job: JobId([3; 32]),
            offer: Offer {
                cores: 64,
                gpus: 8,
                blender: Some("4.2.1".into()),
                denoiser: true,
                price_per_hour_micros: Some(3_060_000),
            },
            report: Some(failed.signed().clone()),
        };
        let bytes = encode(&req);
        assert!(bytes.len() <= MAX_WORK_BYTES);
        assert_eq!(WorkRequest::from_bytes(&bytes).unwrap(), req);
        let resp = WorkResponse::Revoked {
            reason: RevokeReason::Orphaned,
        };
        assert_eq!(WorkResponse::from_bytes(&encode(&resp)).unwrap(), resp);
        // The largest grant: a merge of as many slices as a merge takes.
        let grant = SignedEvent::sign(
            &key,
            EventBody::Granted {
                job: JobId([3; 32]),
                task: TaskSpec::merge(u32::MAX, MAX_SAMPLES),
                lease: Lease {
                    epoch: u64::MAX,
                    seq: u64::MAX,
                    worker: me,
                    backup: true,
                },
                inputs: vec![BlobHash([7; 32]); MAX_MERGE_INPUTS],
            },
        )
        .unwrap();
        let resp = WorkResponse::Grant {
            grant: grant.signed().clone(),
        };
        let bytes = encode(&resp);
        assert!(bytes.len() <= MAX_WORK_BYTES);
        assert!(grant.signed().to_bytes().len() <= MAX_EVENT_BYTES);
        assert_eq!(WorkResponse::from_bytes(&bytes).unwrap(), resp);
        let renew = WorkRequest::Renew {
            grant: grant.signed().clone(),
        };
        assert!(encode(&renew).len() <= MAX_WORK_BYTES);
    }

    proptest! {
        #[test]
        fn overlap_is_symmetric_and_matches_the_ranges(
            a in (0u32..4, 1u32..3, 0u32..64, 1u32..64),
            b in (0u32..4, 1u32..3, 0u32..64, 1u32..64),
        ) {
            let t = |(f, c, o, s): (u32, u32, u32, u32)| TaskSpec::render(f, c, o, s);
            let (x, y) = (t(a), t(b));
            prop_assert_eq!(x.overlaps(&y), y.overlaps(&x));
            let shared = x.frames().any(|f| y.frames().contains(&f))
                && x.sample_range().any(|s| y.sample_range().contains(&s));
            prop_assert_eq!(x.overlaps(&y), shared);
        }
    }
}
