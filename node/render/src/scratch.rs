//! A temporary folder of Blender's own, removed with the process.
//!
//! Blender makes `$TMPDIR/blender_XXXXXX` at start and removes it only when it exits on its
//! own; a Blender that is killed (a cancelled task, a hang, a preempted render) leaves it
//! behind. A render node kills Blender often, so each Blender it starts gets a fresh folder as
//! its `TMPDIR`, and the folder goes when the [`Scratch`] that made it is dropped: after the
//! process, since its owner holds the child first. A daemon that is itself killed drops
//! nothing, so the folder is made where the run's own files are (a worker's directory, the
//! job's; beside a one-shot script; the data directory's `probe-tmp` for the start-up probes)
//! and goes with them rather than stay in the system's temporary folder.

use std::path::Path;

/// The variable that names a process's temporary folder (Blender's and Python's alike).
pub(crate) const TMPDIR: &str = "TMPDIR";

/// The folder, removed (with whatever Blender left in it) when dropped.
#[derive(Debug)]
pub(crate) struct Scratch(tempfile::TempDir);

impl Scratch {
    /// A new folder in the system's temporary folder (for a run with no folder of its own).
    pub(crate) fn new() -> std::io::Result<Scratch> {
        Scratch::builder().tempdir().map(Scratch)
    }

    /// A new folder in `dir`.
    pub(crate) fn new_in(dir: &Path) -> std::io::Result<Scratch> {
        Scratch::builder().tempdir_in(dir).map(Scratch)
    }

    fn builder() -> tempfile::Builder<'static, 'static> {
        let mut builder = tempfile::Builder::new();
        builder.prefix("blendnet-blender-");
        builder
    }

    /// The folder, to give the process as its [`TMPDIR`].
    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }
}
