//! Workspaces: reading a manifest blob ([`Store::read_manifest`]) and laying its files out
//! under a directory ([`Store::materialize`]) so that a `.blend`'s relative paths resolve.
//!
//! Files are hard links to the blobs (the same inode: no copy, no extra space), or copies
//! where linking fails (another file system). Blob files are read-only, so a workspace
//! cannot change a blob in place (though root can; a change would be caught when the blob is
//! next served). Since links share their inode, an executable entry makes the blob file
//! executable for every link to it; nothing else depends on that bit.
//!
//! Nothing is written outside the destination: paths are validated first, and every
//! directory on the way is checked to be a real directory, never a symlink.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use blendnet_proto::BlobHash;

use crate::error::{ManifestError, MaterializeError};
use crate::files::{TempFile, is_disk_full, set_read_only};
use crate::manifest::{Manifest, ManifestEntry};
use crate::{MAX_MANIFEST_BYTES, Store};

impl Store {
    /// Reads, verifies against its hash, decodes and validates the manifest blob `hash`.
    pub fn read_manifest(&self, hash: &BlobHash) -> Result<Manifest, ManifestError> {
        let size = {
            let mut index = self.index();
            let Some(b) = index.blobs.get(hash) else {
                return Err(ManifestError::NotFound { hash: *hash });
            };
            let size = b.size;
            self.touch(&mut index, &[*hash]);
            size
        };
        if size > MAX_MANIFEST_BYTES as u64 {
            return Err(ManifestError::TooLarge {
                size,
                limit: MAX_MANIFEST_BYTES,
            });
        }
        let path = self.blob_path(hash);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ManifestError::NotFound { hash: *hash });
            }
            Err(source) => return Err(ManifestError::Io { path, source }),
        };
        // Small enough to check whole; a manifest that decodes wrongly would be worse than none.
        if BlobHash::of(&bytes) != *hash {
            tracing::warn!(%hash, "manifest is corrupt on disk; forgetting the bad part");
            self.demote(hash);
            return Err(ManifestError::Corrupt { hash: *hash });
        }
        Manifest::from_bytes(&bytes)
    }

    /// Lays out `manifest` under `dest` (created if needed): each file a hard link to its blob
    /// (a copy where linking fails), at its relative path, read-only, executable if the entry
    /// says so. Refuses before writing anything if a blob is missing, naming it. Files already
    /// in `dest` at a manifest path are replaced; other files are left alone. Counts as a use
    /// of every blob for least-recently-used eviction.
    ///
    /// Pin the blobs first: an unpinned blob may be evicted while this runs, which fails with
    /// [`MaterializeError::Missing`].
    pub fn materialize(&self, manifest: &Manifest, dest: &Path) -> Result<(), MaterializeError> {
        manifest.validate()?;
        {
            let index = self.index();
            let mut missing = manifest
                .entries
                .iter()
                .filter(|e| !index.blobs.contains_key(&e.hash));
            if let Some(first) = missing.next() {
                return Err(MaterializeError::Missing {
                    path: first.path.clone(),
                    hash: first.hash,
                    others: missing.count(),
                });
            }
            for e in &manifest.entries {
                let stored = index.blobs.get(&e.hash).map_or(0, |b| b.size);
                if stored != e.size {
                    return Err(MaterializeError::SizeMismatch {
                        path: e.path.clone(),
                        hash: e.hash,
                        manifest: e.size,
                        stored,
                    });
                }
            }
        }
        fs::create_dir_all(dest).map_err(|e| dest_err(dest, dest, e))?;
        for entry in &manifest.entries {
            let target = prepare(dest, &entry.path)?;
            self.place(entry, dest, &target)?;
        }
        let hashes: Vec<BlobHash> = manifest.entries.iter().map(|e| e.hash).collect();
        let mut index = self.index();
        self.touch(&mut index, &hashes);
        tracing::debug!(files = manifest.entries.len(), dest = %dest.display(), "materialized");
        Ok(())
    }

    /// Puts one file at `target`: a hard link to the blob, or a copy.
    fn place(
        &self,
        entry: &ManifestEntry,
        dest: &Path,
        target: &Path,
    ) -> Result<(), MaterializeError> {
        let blob = self.blob_path(&entry.hash);
        let missing = || MaterializeError::Missing {
            path: entry.path.clone(),
            hash: entry.hash,
            others: 0,
        };
        // Link under the lock, so the blob cannot be evicted between the check and the link.
        let source = {
            let index = self.index();
            if !index.blobs.contains_key(&entry.hash) {
                return Err(missing());
            }
            if already_linked(&blob, target) {
                None
            } else {
                match fs::hard_link(&blob, target) {
                    Ok(()) => None,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    Err(error) => {
                        tracing::debug!(path = %target.display(), %error, "cannot hard-link, copying");
                        // The open file keeps the blob's content even if it is evicted now.
                        Some(File::open(&blob).map_err(|_| missing())?)
                    }
                }
            }
        };
        let executable = match source {
            Some(mut source) => {
                let dir = target.parent().unwrap_or(dest);
                let mut copy =
                    TempFile::create(dir, ".blendnet-").map_err(|e| dest_err(dest, dir, e))?;
                io::copy(&mut source, copy.file_mut())
                    .and_then(|_| copy.file().sync_all())
                    .map_err(|e| dest_err(dest, target, e))?;
                copy.persist(target)
                    .map_err(|e| dest_err(dest, target, e))?;
                entry.executable
            }
            // A link shares its mode with the blob and every other link to it: never take the
            // executable bit away from another entry that asked for it.
            None => entry.executable || is_executable(target),
        };
        set_read_only(target, executable).map_err(|e| dest_err(dest, target, e))
    }
}

/// Creates the directories of `path` under `dest`, refusing to pass through anything that is
/// not a real directory, and clears the way for the file. Returns where the file goes.
fn prepare(dest: &Path, path: &str) -> Result<PathBuf, MaterializeError> {
    let mut current = dest.to_path_buf();
    let components: Vec<&str> = path.split('/').collect();
    let (file, dirs) = components.split_last().unwrap_or((&"", &[]));
    for dir in dirs {
        current.push(dir);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_dir() => {}
            Ok(_) => return Err(MaterializeError::Obstructed { path: current }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match fs::create_dir(&current) {
                Ok(()) => {}
                // Raced with another materialize into the same place: fine if a directory.
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        && fs::symlink_metadata(&current).is_ok_and(|m| m.is_dir()) => {}
                Err(e) => return Err(dest_err(dest, &current, e)),
            },
            Err(e) => return Err(dest_err(dest, &current, e)),
        }
    }
    current.push(file);
    match fs::symlink_metadata(&current) {
        Ok(meta) if meta.file_type().is_dir() => {
            Err(MaterializeError::Obstructed { path: current })
        }
        Ok(_) => Ok(current), // a file or a symlink: replaced (never followed)
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(current),
        Err(e) => Err(dest_err(dest, &current, e)),
    }
}

/// Whether `target` is already a hard link to `blob`; if it is something else, removes it.
fn already_linked(blob: &Path, target: &Path) -> bool {
    let Ok(target_meta) = fs::symlink_metadata(target) else {
        return false;
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(blob_meta) = fs::metadata(blob)
            && target_meta.file_type().is_file()
            && blob_meta.ino() == target_meta.ino()
            && blob_meta.dev() == target_meta.dev()
        {
            return true;
        }
    }
    let _ = (blob, target_meta);
    // `remove_file` removes a symlink itself, not what it points to.
    let _ = crate::files::remove_file_if_exists(target);
    false
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

fn dest_err(dest: &Path, path: &Path, e: io::Error) -> MaterializeError {
    if is_disk_full(&e) {
        MaterializeError::DiskFull {
            dir: dest.to_owned(),
        }
    } else {
        MaterializeError::Io {
            path: path.to_owned(),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ManifestEntry;
    use crate::test_util::{TestStore, data};

    /// A file of a test scene: path, content, executable.
    type SceneFile = (&'static str, Vec<u8>, bool);

    fn scene() -> (tempfile::TempDir, Vec<SceneFile>) {
        let src = tempfile::tempdir().unwrap();
        let files = vec![
            ("scene.blend", data(40_000, 1), false),
            ("textures/wood.png", data(3_000, 2), false),
            ("textures/metal/rust.exr", data(20_000, 3), false),
            ("tools/bake.sh", b"#!/bin/sh\necho bake\n".to_vec(), true),
        ];
        for (path, bytes, exec) in &files {
            let p = src.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, bytes).unwrap();
            #[cfg(unix)]
            if *exec {
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            }
            let _ = exec;
        }
        (src, files)
    }

    #[test]
    fn materialize_hard_links_the_layout_with_the_executable_bit() {
        let t = TestStore::new(None);
        let (src, files) = scene();
        let (hash, _) = t.store.import_dir(src.path()).unwrap();
        let manifest = t.store.read_manifest(&hash).unwrap();
        let work = tempfile::tempdir().unwrap();
        let dest = work.path().join("job-1");
        t.store.materialize(&manifest, &dest).unwrap();
        for (path, bytes, exec) in &files {
            let placed = dest.join(path);
            assert_eq!(&fs::read(&placed).unwrap(), bytes, "{path}");
            #[cfg(unix)]
            {
                use std::os::unix::fs::{MetadataExt, PermissionsExt};
                let blob = t.store.blob_path(&BlobHash::of(bytes));
                assert_eq!(
                    fs::metadata(&placed).unwrap().ino(),
                    fs::metadata(&blob).unwrap().ino(),
                    "{path}"
                );
                let mode = fs::metadata(&placed).unwrap().permissions().mode();
                assert_eq!(mode & 0o111 != 0, *exec, "{path}: {mode:o}");
                assert_eq!(mode & 0o222, 0, "{path} is writable");
            }
            let _ = exec;
        }
        // Doing it again over the same workspace is fine.
        t.store.materialize(&manifest, &dest).unwrap();
    }

    #[test]
    fn materialize_names_a_missing_blob_and_writes_nothing() {
        let t = TestStore::new(None);
        let present = t.store.import_bytes(b"here").unwrap();
        let absent = BlobHash::of(b"absent");
        let manifest = Manifest {
            entries: vec![
                ManifestEntry {
                    path: "a.txt".into(),
                    hash: present,
                    size: 4,
                    executable: false,
                },
                ManifestEntry {
                    path: "sub/b.txt".into(),
                    hash: absent,
                    size: 6,
                    executable: false,
                },
            ],
        };
        let work = tempfile::tempdir().unwrap();
        let dest = work.path().join("ws");
        let err = t.store.materialize(&manifest, &dest).unwrap_err();
        assert!(
            matches!(&err, MaterializeError::Missing { hash, path, .. } if *hash == absent && path == "sub/b.txt")
        );
        assert!(
            err.to_string().contains(&absent.to_string()) && err.to_string().contains("sub/b.txt"),
            "{err}"
        );
        assert!(!dest.exists());
        // A size that disagrees with the blob's is refused too.
        let wrong = Manifest {
            entries: vec![ManifestEntry {
                path: "a.txt".into(),
                hash: present,
                size: 5,
                executable: false,
            }],
        };
        assert!(matches!(
            t.store.materialize(&wrong, &dest),
            Err(MaterializeError::SizeMismatch { .. })
        ));
    }

    #[cfg(unix)]
    #[test]
    fn materialize_never_writes_through_a_symlink_in_dest() {
        let t = TestStore::new(None);
        let h = t.store.import_bytes(b"payload").unwrap();
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dest = work.path().join("ws");
        fs::create_dir_all(&dest).unwrap();
        std::os::unix::fs::symlink(outside.path(), dest.join("sub")).unwrap();
        let entry = |path: &str| ManifestEntry {
            path: path.into(),
            hash: h,
            size: 7,
            executable: false,
        };
        let manifest = Manifest {
            entries: vec![entry("sub/file.txt")],
        };
        let err = t.store.materialize(&manifest, &dest).unwrap_err();
        assert!(
            matches!(&err, MaterializeError::Obstructed { path } if path.ends_with("sub")),
            "{err}"
        );
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);

        // A symlink at the file's own place is replaced, not followed.
        let target = outside.path().join("victim");
        fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dest.join("file.txt")).unwrap();
        t.store
            .materialize(
                &Manifest {
                    entries: vec![entry("file.txt")],
                },
                &dest,
            )
            .unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"keep");
        assert_eq!(fs::read(dest.join("file.txt")).unwrap(), b"payload");
        assert!(
            !fs::symlink_metadata(dest.join("file.txt"))
                .unwrap()
                .file_type()
                .is_symlink()
        );

        // Bad paths never reach the disk.
        let bad = Manifest {
            entries: vec![entry("../escape.txt")],
        };
        assert!(matches!(
            t.store.materialize(&bad, &dest),
            Err(MaterializeError::Invalid(_))
        ));
        assert!(!work.path().join("escape.txt").exists());
    }

    #[test]
    fn read_manifest_refuses_a_corrupt_or_missing_one() {
        let t = TestStore::new(None);
        let m = Manifest {
            entries: vec![ManifestEntry {
                path: "a".into(),
                hash: BlobHash::of(b"a"),
                size: 1,
                executable: false,
            }],
        };
        let h = t.store.import_bytes(&m.to_bytes()).unwrap();
        assert_eq!(t.store.read_manifest(&h).unwrap(), m);
        let not_a_manifest = t.store.import_bytes(b"\xff\xff\xff not bincode").unwrap();
        assert!(matches!(
            t.store.read_manifest(&not_a_manifest),
            Err(ManifestError::Malformed(_))
        ));
        assert!(matches!(
            t.store.read_manifest(&BlobHash::of(b"x")),
            Err(ManifestError::NotFound { .. })
        ));
        let path = t.store.blob_path(&h);
        crate::files::set_writable(&path).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] ^= 1;
        fs::write(&path, bytes).unwrap();
        assert!(matches!(
            t.store.read_manifest(&h),
            Err(ManifestError::Corrupt { .. })
        ));
        assert_eq!(t.store.has(&h).map(|i| i.complete), Some(false));
    }
}
