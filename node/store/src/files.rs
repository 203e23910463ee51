//! File-system helpers the store is built on: temporary files that delete themselves unless
//! persisted, directory fsync, positioned writes to a shared file, permissions, and telling a
//! full disk apart from other I/O failures.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether `e` means the disk (or the user's disk quota) is full.
pub(crate) fn is_disk_full(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    )
}

/// Makes the directory entry changes in `dir` (a rename, a create) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
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

/// Writes all of `buf` at `offset` of a file that other threads also read and write.
pub(crate) fn write_all_at(file: &File, offset: u64, buf: &[u8]) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_write(
                file,
                &buf[done..],
                offset + done as u64,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Starts writing `len` bytes at `offset` of `file` to disk without waiting for them, so that
/// the fsync that commits the file finds little left to write: the disk works while the data
/// still arrives instead of after it (1 GiB fetched on loopback here: the final fsync took
/// 0.3-0.4 s of a 2.2 s fetch, and 1-2 ms with this). Linux only (elsewhere the fsync does it
/// all). A hint: a failure is ignored, and the fsync reports real errors.
pub(crate) fn start_writeback(file: &File, offset: u64, len: usize) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: the descriptor stays open while `file` is borrowed, and the call touches no
        // memory of ours.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
    }
}

/// A sequential writer to a file that starts writing back each [`WRITEBACK_BYTES`] it has
/// written (see [`start_writeback`]).
pub(crate) struct WritingBack<'a> {
    file: &'a File,
    written: u64,
    flushed: u64,
}

/// How much a [`WritingBack`] writes before starting the writeback of it.
const WRITEBACK_BYTES: u64 = 8 << 20;

impl<'a> WritingBack<'a> {
    pub(crate) fn new(file: &'a File) -> Self {
        WritingBack {
            file,
            written: 0,
            flushed: 0,
        }
    }
}

impl io::Write for WritingBack<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = io::Write::write(&mut self.file, buf)?;
        self.written += n as u64;
        if self.written - self.flushed >= WRITEBACK_BYTES {
            let len = usize::try_from(self.written - self.flushed).unwrap_or(usize::MAX);
            start_writeback(self.file, self.flushed, len);
            self.flushed = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Permissions of a stored or materialized file: never writable (a hard link shares them
/// with the store, so a workspace cannot modify a blob in place), executable when asked.
pub(crate) fn set_read_only(path: &Path, executable: bool) -> io::Result<()> {
    let mut perms = fs::metadata(path)?.permissions();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        perms.set_mode(if executable { 0o555 } else { 0o444 });
    }
    #[cfg(not(unix))]
    {
        let _ = executable;
        perms.set_readonly(true);
    }
    fs::set_permissions(path, perms)
}

/// Makes a stored file writable again (a blob demoted to a partial download).
pub(crate) fn set_writable(path: &Path) -> io::Result<()> {
    let mut perms = fs::metadata(path)?.permissions();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        perms.set_mode(0o644);
    }
    #[cfg(not(unix))]
    {
        perms.set_readonly(false);
    }
    fs::set_permissions(path, perms)
}

/// Deletes a file if it exists; read-only files too (Windows refuses those otherwise).
pub(crate) fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    #[cfg(not(unix))]
    {
        let _ = set_writable(path);
    }
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Deletes files, logging (not returning) failures: used where the store is already
/// consistent without them and a leftover file is only wasted space that `open` cleans up.
pub(crate) fn remove_quietly(paths: &[&Path]) {
    for path in paths {
        if let Err(error) = remove_file_if_exists(path) {
            tracing::warn!(path = %path.display(), %error, "cannot delete file from the blob store");
        }
    }
}

/// A temporary file that is deleted when dropped unless it was renamed into place.
#[derive(Debug)]
pub(crate) struct TempFile {
    path: PathBuf,
    file: File,
    persisted: bool,
}

/// Makes temporary names unique within the process; the pid makes them unique across
/// processes sharing a directory, and `create_new` settles any remaining clash.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl TempFile {
    /// Creates a new empty file in `dir`, open for reading and writing.
    pub(crate) fn create(dir: &Path, prefix: &str) -> io::Result<TempFile> {
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{prefix}{}-{n}.tmp", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        persisted: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// The open file, for writers that need `&mut`.
    pub(crate) fn file_mut(&mut self) -> &mut File {
        &mut self.file
    }

    /// Where the file is now.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file to `dest` (replacing what is there). The caller syncs `dest`'s
    /// directory. On failure the file is still deleted when dropped.
    pub(crate) fn persist(mut self, dest: &Path) -> io::Result<()> {
        fs::rename(&self.path, dest)?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            remove_quietly(&[&self.path]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_is_removed_unless_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let t = TempFile::create(dir.path(), "x").unwrap();
        let path = t.path().to_owned();
        assert!(path.exists());
        drop(t);
        assert!(!path.exists());

        let t = TempFile::create(dir.path(), "x").unwrap();
        let dest = dir.path().join("kept");
        t.persist(&dest).unwrap();
        assert!(dest.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn disk_full_is_recognised() {
        assert!(is_disk_full(&io::Error::from(io::ErrorKind::StorageFull)));
        #[cfg(target_os = "linux")]
        assert!(is_disk_full(&io::Error::from_raw_os_error(28))); // ENOSPC
        assert!(!is_disk_full(&io::Error::from(io::ErrorKind::NotFound)));
    }
}
