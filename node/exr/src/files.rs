//! Atomic file output: a temporary file beside the target, fsynced, renamed over the target,
//! and the directory fsynced. A process killed at any point leaves either no file at the target
//! path (or the complete earlier one) and at worst a stray `.*.tmp` beside it; a failed write
//! removes its temporary file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Makes temporary names unique within the process; the pid makes them unique across processes
/// writing into one directory, and `create_new` settles any remaining clash.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many names are tried before giving up on creating a temporary file.
const CREATE_ATTEMPTS: u32 = 16;

/// A temporary file beside its target, deleted on drop unless [`TempFile::persist`]ed.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

impl TempFile {
    /// Creates `.<target name>.<pid>.<n>.tmp` in the target's directory, so the final rename
    /// never crosses file systems.
    pub(crate) fn beside(target: &Path) -> io::Result<Self> {
        let dir = parent_dir(target);
        let name = target
            .file_name()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name")
            })?
            .to_string_lossy()
            .into_owned();
        let mut last_error = None;
        for _ in 0..CREATE_ATTEMPTS {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(Self {
                        path,
                        file,
                        persisted: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("cannot create a temporary file")))
    }

    /// The open file, to write into.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Flushes the data to disk, renames the file over `target` and makes the rename durable.
    pub(crate) fn persist(mut self, target: &Path) -> io::Result<()> {
        self.file.sync_all()?;
        fs::rename(&self.path, target)?;
        self.persisted = true;
        sync_dir(&parent_dir(target))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted
            && let Err(error) = fs::remove_file(&self.path)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove a temporary file");
        }
    }
}

/// The directory a path is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Makes the directory entry changes in `dir` (a rename) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        // Windows cannot open a directory as a file; NTFS journals renames itself.
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn persisted_files_replace_the_target_and_dropped_ones_vanish() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.exr");
        let temp = TempFile::beside(&target).unwrap();
        temp.file().write_all(b"one").unwrap();
        assert!(!target.exists(), "nothing at the target before the rename");
        temp.persist(&target).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"one");

        let temp = TempFile::beside(&target).unwrap();
        temp.file().write_all(b"two").unwrap();
        drop(temp);
        assert_eq!(
            fs::read(&target).unwrap(),
            b"one",
            "a dropped write changes nothing"
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("out.exr")],
            "no temporary file left"
        );
    }
}
