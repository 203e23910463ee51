//! Importing local files into the store: [`Store::import_file`], [`Store::import_bytes`] and
//! [`Store::import_dir`].
//!
//! One pass over the source: the bytes are copied into `tmp/` while BLAKE3 and the bao
//! outboard are computed from the same reads. The copy and the outboard are fsynced, made
//! read-only and renamed into `blobs/`, and only then does the database row appear. If the
//! content is already stored, the copy is dropped and the blob only counts as used.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use bao_tree::BaoTree;
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::io::sync::WriteAt;
use blendnet_proto::BlobHash;

use crate::error::ImportError;
use crate::files::{TempFile, WritingBack, is_disk_full, remove_quietly, sync_dir};
use crate::manifest::{Manifest, ManifestEntry};
use crate::store::{BlobMeta, NoRoom};
use crate::{
    BLOCK_SIZE, MAX_BLOB_SIZE, MAX_DIR_DEPTH, MAX_MANIFEST_BYTES, MAX_MANIFEST_ENTRIES, Store, db,
};

/// Size of the buffer the copy into `tmp/` goes through.
const COPY_BUFFER_BYTES: usize = 256 * 1024;

/// Reads from a source and writes what it read to the copy, remembering a failure of the copy
/// (a full disk) apart from a failure of the source.
struct Tee<R, W> {
    src: R,
    dst: W,
    dst_error: Option<io::Error>,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.src.read(buf)?;
        if let Err(e) = self.dst.write_all(&buf[..n]) {
            self.dst_error = Some(e);
            return Err(io::Error::other("copy into the store failed"));
        }
        Ok(n)
    }
}

/// The outboard file, remembering a failure to write it apart from a failure of the source.
struct TrackedOutboard<'a> {
    file: &'a mut File,
    error: Option<io::Error>,
}

impl WriteAt for TrackedOutboard<'_> {
    fn write_at(&mut self, pos: u64, buf: &[u8]) -> io::Result<usize> {
        self.file.write_at(pos, buf).map_err(|e| {
            self.error = Some(e);
            io::Error::other("writing the outboard failed")
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why copying and hashing a source failed.
enum CopyError {
    /// Reading the source failed.
    Source(io::Error),
    /// The source was shorter or longer than its size.
    Changed,
    /// Writing the copy failed.
    Copy(io::Error),
    /// Writing the outboard failed.
    Outboard(io::Error),
}

/// Copies `size` bytes of `src` into `data` while computing the blob's hash and writing its
/// pre-order outboard into `outboard`: one pass over the source.
fn hash_and_copy(
    src: impl Read,
    size: u64,
    data: &File,
    outboard: &mut File,
) -> Result<blake3::Hash, CopyError> {
    let tree = BaoTree::new(size, BLOCK_SIZE);
    let mut outboard = PreOrderOutboard {
        root: blake3::Hash::from_bytes([0; 32]),
        tree,
        data: TrackedOutboard {
            file: outboard,
            error: None,
        },
    };
    let mut tee = Tee {
        src,
        dst: BufWriter::with_capacity(COPY_BUFFER_BYTES, WritingBack::new(data)),
        dst_error: None,
    };
    let hashed = bao_tree::io::sync::outboard(&mut tee, tree, &mut outboard);
    let root = hashed.map_err(
        |e| match (tee.dst_error.take(), outboard.data.error.take()) {
            (Some(e), _) => CopyError::Copy(e),
            (None, Some(e)) => CopyError::Outboard(e),
            (None, None) if e.kind() == io::ErrorKind::UnexpectedEof => CopyError::Changed,
            (None, None) => CopyError::Source(e),
        },
    )?;
    let Tee { mut src, dst, .. } = tee;
    // The source must end where its size said.
    let mut probe = [0u8; 1];
    match src.read(&mut probe) {
        Ok(0) => {}
        Ok(_) => return Err(CopyError::Changed),
        Err(e) => return Err(CopyError::Source(e)),
    }
    dst.into_inner()
        .map_err(|e| CopyError::Copy(e.into_error()))?;
    Ok(root)
}

impl Store {
    /// Imports the file at `path` (following a symlink), hashing it and computing its
    /// outboard in the same pass as the copy. Returns its hash and size. Importing content the
    /// store already has stores nothing new.
    pub fn import_file(&self, path: &Path) -> Result<(BlobHash, u64), ImportError> {
        let read_err = |source| ImportError::Read {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(ImportError::NotAFile {
                path: path.to_owned(),
            });
        }
        let size = meta.len();
        let hash = self.import_reader(file, size, Some(path))?;
        Ok((hash, size))
    }

    /// Imports `bytes`. Returns their hash.
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<BlobHash, ImportError> {
        self.import_reader(bytes, bytes.len() as u64, None)
    }

    fn import_reader(
        &self,
        src: impl Read,
        size: u64,
        path: Option<&Path>,
    ) -> Result<BlobHash, ImportError> {
        let what = || path.map_or_else(|| PathBuf::from("<bytes>"), Path::to_owned);
        if size > MAX_BLOB_SIZE {
            return Err(ImportError::TooLarge {
                what: what().display().to_string(),
                size,
                limit: MAX_BLOB_SIZE,
            });
        }
        if let Some(quota) = self.inner.quota {
            // Cannot fit even in an empty store: refuse before copying anything.
            if size > quota {
                let pinned = self.index().unevictable();
                return Err(ImportError::QuotaExceeded {
                    needed: size,
                    quota,
                    pinned,
                });
            }
        }
        let tmp = self.tmp_dir();
        let write_err = |path: &Path, e: io::Error| self.import_write_err(path, e);
        let data = TempFile::create(&tmp, "import-").map_err(|e| write_err(&tmp, e))?;
        let mut outboard_file =
            TempFile::create(&tmp, "import-").map_err(|e| write_err(&tmp, e))?;

        let root = match hash_and_copy(src, size, data.file(), outboard_file.file_mut()) {
            Ok(root) => root,
            Err(CopyError::Copy(e)) => return Err(write_err(data.path(), e)),
            Err(CopyError::Outboard(e)) => return Err(write_err(outboard_file.path(), e)),
            Err(CopyError::Changed) => return Err(ImportError::Changed { path: what() }),
            Err(CopyError::Source(source)) => {
                return Err(ImportError::Read {
                    path: what(),
                    source,
                });
            }
        };
        data.file()
            .sync_all()
            .and_then(|()| outboard_file.file().sync_all())
            .and_then(|()| crate::files::set_read_only(data.path(), false))
            .map_err(|e| write_err(data.path(), e))?;
        let hash = BlobHash(*root.as_bytes());
        self.commit_import(hash, size, data, outboard_file)?;
        Ok(hash)
    }

    fn import_write_err(&self, path: &Path, e: io::Error) -> ImportError {
        if is_disk_full(&e) {
            ImportError::DiskFull {
                dir: self.inner.dir.clone(),
            }
        } else {
            ImportError::Write {
                path: path.to_owned(),
                source: e,
            }
        }
    }

    /// Moves a hashed copy into `blobs/` and records it, evicting to make room if needed.
    fn commit_import(
        &self,
        hash: BlobHash,
        size: u64,
        data: TempFile,
        outboard: TempFile,
    ) -> Result<(), ImportError> {
        let mut index = self.index();
        if index.blobs.contains_key(&hash) {
            self.touch(&mut index, &[hash]);
            return Ok(()); // the copies are deleted when dropped
        }
        // A download of the same blob is superseded: its bytes count towards the room.
        let superseded = index.partials.get(&hash).map(|p| p.size);
        let victims = self
            .plan_room(&index, size, superseded.unwrap_or(0))
            .map_err(
                |NoRoom {
                     needed,
                     quota,
                     pinned,
                 }| ImportError::QuotaExceeded {
                    needed,
                    quota,
                    pinned,
                },
            )?;

        let (blob_path, outboard_path) = (self.blob_path(&hash), self.blob_outboard_path(&hash));
        let moved = outboard
            .persist(&outboard_path)
            .and_then(|()| data.persist(&blob_path))
            .and_then(|()| sync_dir(&self.blobs_dir()));
        if let Err(e) = moved {
            remove_quietly(&[&blob_path, &outboard_path]);
            return Err(self.import_write_err(&blob_path, e));
        }
        let now = index.tick();
        let committed = db::write(&self.inner.db, |txn| {
            let mut blobs = txn.open_table(db::BLOBS)?;
            blobs.insert(hash.0, (size, now))?;
            for v in &victims {
                blobs.remove(v.0)?;
            }
            if superseded.is_some() {
                txn.open_table(db::PARTIALS)?.remove(hash.0)?;
            }
            Ok(())
        });
        if let Err(e) = committed {
            remove_quietly(&[&blob_path, &outboard_path]);
            return Err(ImportError::Database(e));
        }
        self.evict(&mut index, &victims);
        if let Some(p) = index.partials.remove(&hash) {
            index.used -= p.size;
            remove_quietly(&[
                &self.partial_path(&hash),
                &self.partial_outboard_path(&hash),
            ]);
        }
        index.blobs.insert(hash, BlobMeta::new(size, now));
        index.used += size;
        tracing::debug!(%hash, size, "imported");
        Ok(())
    }

    /// Imports every regular file under `dir` and stores the manifest listing them (sorted by
    /// path) as a blob of its own. Returns the manifest's hash and the manifest.
    ///
    /// Symlinks are followed only while they stay inside `dir` (a link out of it, a dangling
    /// link or a link back to an enclosing directory is skipped with a warning); special files
    /// (pipes, sockets, devices) are skipped too. Empty directories are not recorded.
    pub fn import_dir(&self, dir: &Path) -> Result<(BlobHash, Manifest), ImportError> {
        let root = fs::canonicalize(dir).map_err(|source| ImportError::Read {
            path: dir.to_owned(),
            source,
        })?;
        if !root.is_dir() {
            return Err(ImportError::NotADirectory {
                path: dir.to_owned(),
            });
        }
        let mut walk = Walk {
            store: self,
            root: &root,
            ancestors: vec![root.clone()],
            entries: Vec::new(),
        };
        walk.dir(&root, "", 0)?;
        let mut manifest = Manifest {
            entries: walk.entries,
        };
        manifest.entries.sort_by(|a, b| a.path.cmp(&b.path));
        manifest.validate()?;
        let bytes = manifest.to_bytes();
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ImportError::TooManyFiles {
                dir: dir.to_owned(),
                limit_entries: MAX_MANIFEST_ENTRIES,
                limit_bytes: MAX_MANIFEST_BYTES,
            });
        }
        let hash = self.import_bytes(&bytes)?;
        tracing::info!(%hash, files = manifest.entries.len(), bytes = manifest.total_size(), dir = %dir.display(), "imported directory");
        Ok((hash, manifest))
    }
}

/// The state of one `import_dir` walk.
struct Walk<'a> {
    store: &'a Store,
    root: &'a Path,
    /// Canonical directories from the root down to the one being walked: a symlink to one of
    /// them would loop.
    ancestors: Vec<PathBuf>,
    entries: Vec<ManifestEntry>,
}

impl Walk<'_> {
    fn dir(&mut self, fs_dir: &Path, rel: &str, depth: usize) -> Result<(), ImportError> {
        if depth > MAX_DIR_DEPTH {
            return Err(ImportError::TooDeep {
                path: fs_dir.to_owned(),
                limit: MAX_DIR_DEPTH,
            });
        }
        let read_err = |path: &Path| {
            let path = path.to_owned();
            move |source| ImportError::Read { path, source }
        };
        let mut children = Vec::new();
        for entry in fs::read_dir(fs_dir).map_err(read_err(fs_dir))? {
            children.push(entry.map_err(read_err(fs_dir))?);
        }
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let path = child.path();
            let name = child
                .file_name()
                .into_string()
                .map_err(|_| ImportError::NotUtf8 { path: path.clone() })?;
            let rel_path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let file_type = child.file_type().map_err(read_err(&path))?;
            // Where the content is (a symlink's canonical target), and what it is.
            let (target, meta) = if file_type.is_symlink() {
                let Ok(target) = fs::canonicalize(&path) else {
                    tracing::warn!(path = %path.display(), "dangling symlink, skipped");
                    continue;
                };
                if !target.starts_with(self.root) {
                    tracing::warn!(path = %path.display(), target = %target.display(), "symlink leaves the imported directory, skipped");
                    continue;
                }
                let meta = fs::metadata(&target).map_err(read_err(&target))?;
                (target, meta)
            } else {
                let meta = fs::symlink_metadata(&path).map_err(read_err(&path))?;
                (path, meta)
            };
            if meta.is_dir() {
                if self.ancestors.contains(&target) {
                    tracing::warn!(path = %child.path().display(), "symlink loops back to an enclosing directory, skipped");
                    continue;
                }
                self.ancestors.push(target.clone());
                self.dir(&target, &rel_path, depth + 1)?;
                self.ancestors.pop();
            } else if meta.is_file() {
                if self.entries.len() >= MAX_MANIFEST_ENTRIES {
                    return Err(ImportError::TooManyFiles {
                        dir: self.root.to_owned(),
                        limit_entries: MAX_MANIFEST_ENTRIES,
                        limit_bytes: MAX_MANIFEST_BYTES,
                    });
                }
                let (hash, size) = self.store.import_file(&target)?;
                self.entries.push(ManifestEntry {
                    path: rel_path,
                    hash,
                    size,
                    executable: is_executable(&meta),
                });
            } else {
                tracing::warn!(path = %child.path().display(), "not a regular file, skipped");
            }
        }
        Ok(())
    }
}

fn is_executable(meta: &fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        meta.permissions().mode() & 0o111 != 0
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TestStore, data};

    #[test]
    fn import_dir_lists_files_with_layout_sizes_and_executable_bit() {
        let t = TestStore::new(None);
        let src = tempfile::tempdir().unwrap();
        let root = src.path();
        fs::create_dir_all(root.join("textures/metal")).unwrap();
        fs::write(root.join("scene.blend"), data(70_000, 1)).unwrap();
        fs::write(root.join("textures/wood.png"), data(5_000, 2)).unwrap();
        fs::write(root.join("textures/metal/rust.exr"), data(20_000, 3)).unwrap();
        // Same content twice: two entries, one blob.
        fs::write(root.join("textures/copy.png"), data(5_000, 2)).unwrap();
        fs::write(root.join("run.sh"), b"#!/bin/sh\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
            let outside = tempfile::tempdir().unwrap();
            fs::write(outside.path().join("secret"), b"secret").unwrap();
            std::os::unix::fs::symlink(outside.path().join("secret"), root.join("leak")).unwrap();
            std::os::unix::fs::symlink(root.join("textures/wood.png"), root.join("alias.png"))
                .unwrap();
            std::os::unix::fs::symlink(root, root.join("textures/loop")).unwrap();
            std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling")).unwrap();
        }

        let (hash, manifest) = t.store.import_dir(root).unwrap();
        let paths: Vec<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
        let mut expected = vec![
            "run.sh",
            "scene.blend",
            "textures/copy.png",
            "textures/metal/rust.exr",
            "textures/wood.png",
        ];
        if cfg!(unix) {
            expected.insert(0, "alias.png");
        }
        assert_eq!(paths, expected);
        for e in &manifest.entries {
            let bytes = fs::read(root.join(&e.path)).unwrap();
            assert_eq!(e.hash, BlobHash::of(&bytes), "{}", e.path);
            assert_eq!(e.size, bytes.len() as u64);
            assert_eq!(e.executable, cfg!(unix) && e.path == "run.sh", "{}", e.path);
            assert!(t.store.has(&e.hash).is_some_and(|i| i.complete));
        }
        // The manifest is a blob and reads back equal.
        assert_eq!(t.store.read_manifest(&hash).unwrap(), manifest);
        // 4 distinct file contents + the manifest.
        assert_eq!(t.store.list().len(), 5);
        // Importing again changes nothing.
        let before = t.store.usage();
        assert_eq!(t.store.import_dir(root).unwrap().0, hash);
        assert_eq!(t.store.usage(), before);
    }

    #[test]
    fn import_dir_refuses_names_that_collide_on_other_systems() {
        let t = TestStore::new(None);
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("Wood.png"), b"a").unwrap();
        if fs::write(src.path().join("wood.png"), b"b").is_ok()
            && fs::read_dir(src.path()).unwrap().count() == 2
        {
            let err = t.store.import_dir(src.path()).unwrap_err();
            assert!(err.to_string().contains("wood.png"), "{err}");
        }
    }

    #[test]
    fn a_failed_import_leaves_nothing_behind() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk went away"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let t = TestStore::new(None);
        let path = t.dir.path().join("src");
        let err = t
            .store
            .import_reader(Failing(100_000), 200_000, Some(&path))
            .unwrap_err();
        assert!(matches!(err, ImportError::Read { .. }), "{err}");
        // A file that grew while it was read.
        let err = t
            .store
            .import_reader(&[1u8; 1000][..], 999, Some(&path))
            .unwrap_err();
        assert!(matches!(err, ImportError::Changed { .. }), "{err}");
        let err = t
            .store
            .import_reader(&[1u8; 1000][..], 1001, Some(&path))
            .unwrap_err();
        assert!(matches!(err, ImportError::Changed { .. }), "{err}");
        assert_eq!(fs::read_dir(t.store.tmp_dir()).unwrap().count(), 0);
        assert_eq!(fs::read_dir(t.store.blobs_dir()).unwrap().count(), 0);
        assert!(t.store.list().is_empty());
        assert!(matches!(
            t.store.import_file(t.dir.path()),
            Err(ImportError::NotAFile { .. } | ImportError::Read { .. })
        ));
    }
}
