//! Blender supervision: one persistent Blender process per job, driven by JSON lines.
//!
//! ```text
//!  Worker::start ── blender -b -Y scene.blend -P worker.py ──▶ Blender (scene loaded once)
//!      │   stdin:  {"render": {...}}\n            one task at a time
//!      ◀── stdout: @blendnet {"ready"|"started"|"done"|"error": {...}}\n
//!               (every other stdout/stderr line is Blender's own log, kept for errors)
//! ```
//!
//! The script run inside Blender ([`WORKER_PY`]) is embedded in the binary and written next to
//! the job's workspace when a worker starts. It keeps the scene loaded between tasks
//! (`render.use_persistent_data`), so a task costs its render time, not Blender's start-up.
//! Autoexec is off (`-Y`): a `.blend` from a peer never runs its own scripts here.
//!
//! [`discovery`] finds Blender (and the machine's GPUs) and asks it which devices its Cycles
//! can use ([`devices`]).
//!
//! [`finish`] makes the artist's file of a merged frame (denoise, compositor, output format).
//!
//! [`collect`] lists every file a scene needs, for its upload, and saves a copy of the scene
//! whose paths resolve once the upload is laid out as the artist's project.
//!
//! See [`protocol`] for the messages and [`Worker`] for the process's life: start, render,
//! cancel (kill), crash and hang detection.

pub mod collect;
pub mod devices;
pub mod discovery;
pub mod finish;
mod oneshot;
pub mod protocol;
mod scratch;
pub mod worker;

pub use collect::{
    COLLECT_PY, CollectError, Collected, SceneInfo, collect, project_root, upload_list,
};
pub use devices::{Device, Devices};
pub use finish::{FinishError, finish};
pub use protocol::{ErrorKind, Ready, RenderTask, SliceMode};
pub use worker::{Done, Progress, RenderError, StartError, Worker};

/// The Python script Blender runs for a worker (`-P`).
pub const WORKER_PY: &str = include_str!("worker.py");
