//! Serving blobs: which ranges the store can give ([`Store::valid_ranges`]) and their verified
//! bao encoding ([`Store::encode`]), from complete blobs and from the verified part of
//! downloads in progress (so a fetcher passes on what it has).
//!
//! Encoding re-verifies everything it reads against the outboard and the root hash
//! (`encode_ranges_validated`), so bit rot on disk is caught before a byte of the bad chunk
//! group is sent. Then the store forgets the bad part: a complete blob is demoted to a
//! download (its files move to `partial/`, and the ranges that still verify are found again
//! on its next use), a download loses the bad ranges. A fetcher resumes it like any other.

use std::fs::File;
use std::io::{self, Write};
use std::sync::Arc;

use bao_tree::io::EncodeError;
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use blendnet_proto::BlobHash;

use crate::error::ReadError;
use crate::files::{self, remove_quietly, sync_dir};
use crate::partial::PartialFiles;
use crate::store::PartialMeta;
use crate::{BLOCK_SIZE, Store, all_chunks, db};

/// Where the bytes of a blob come from.
enum Source {
    Complete {
        data: File,
        outboard: File,
        size: u64,
    },
    Partial(Arc<PartialFiles>),
}

/// Counts bytes written and remembers whether the output (not the disk) failed.
struct Output<W> {
    inner: W,
    written: u64,
    failed: bool,
}

impl<W: Write> Write for Output<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.written += n as u64;
                Ok(n)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().inspect_err(|_| self.failed = true)
    }
}

impl Store {
    /// The chunk ranges this store can serve for `hash`: all of it when complete, the verified
    /// whole chunk groups of a download. The first call for a download after the store was
    /// opened re-hashes its files.
    pub fn valid_ranges(&self, hash: &BlobHash) -> Result<ChunkRanges, ReadError> {
        let index = self.index();
        if let Some(b) = index.blobs.get(hash) {
            return Ok(all_chunks(b.size));
        }
        let files = self.partial_files(hash, index)?;
        Ok(files.valid())
    }

    /// Writes the verified bao encoding of `ranges` of `hash` to `out` (ranges past the end
    /// are ignored) and returns the bytes written. Works on complete blobs and on the valid
    /// part of downloads; asking a download for ranges it does not have fails with
    /// [`ReadError::NotAvailable`] before anything is written.
    ///
    /// Everything read is checked against the blob's hash first. If the disk holds something
    /// else, this fails with [`ReadError::Corrupt`] naming the blob, after having written the
    /// verified groups before the bad one, and the store forgets the bad part so it is not
    /// served again. Counts as a use of the blob for least-recently-used eviction.
    pub fn encode(
        &self,
        hash: &BlobHash,
        ranges: &ChunkRanges,
        out: impl Write,
    ) -> Result<u64, ReadError> {
        let source = self.open_source(hash)?;
        let root = blake3::Hash::from_bytes(hash.0);
        let mut out = Output {
            inner: out,
            written: 0,
            failed: false,
        };
        let (result, path) = match &source {
            Source::Complete {
                data,
                outboard,
                size,
            } => {
                let len = data.metadata().map_err(|source| ReadError::Io {
                    path: self.blob_path(hash),
                    source,
                })?;
                if len.len() != *size {
                    let detail = format!("file is {} bytes, not {size}", len.len());
                    self.on_corrupt(hash, &source, &ChunkRanges::all());
                    return Err(ReadError::Corrupt {
                        hash: *hash,
                        detail,
                    });
                }
                let outboard = PreOrderOutboard {
                    root,
                    tree: BaoTree::new(*size, BLOCK_SIZE),
                    data: outboard,
                };
                let result =
                    bao_tree::io::sync::encode_ranges_validated(data, outboard, ranges, &mut out);
                (result, self.blob_path(hash))
            }
            Source::Partial(files) => {
                let wanted = ranges & &all_chunks(files.size());
                let missing = &wanted - &files.valid();
                if !missing.is_empty() {
                    return Err(ReadError::NotAvailable {
                        hash: *hash,
                        missing,
                    });
                }
                let outboard = PreOrderOutboard {
                    root,
                    tree: files.tree,
                    data: &files.outboard,
                };
                let result = bao_tree::io::sync::encode_ranges_validated(
                    &files.data,
                    outboard,
                    ranges,
                    &mut out,
                );
                (result, self.partial_path(hash))
            }
        };
        let Err(error) = result else {
            return Ok(out.written);
        };
        if out.failed {
            return Err(ReadError::Output {
                hash: *hash,
                source: error.into(),
            });
        }
        let tree = match &source {
            Source::Complete { size, .. } => BaoTree::new(*size, BLOCK_SIZE),
            Source::Partial(files) => files.tree,
        };
        let (bad, detail) = match error {
            EncodeError::LeafHashMismatch(chunk) => {
                let start = ChunkNum::chunk_group_start(chunk, BLOCK_SIZE);
                let end = ChunkNum::chunk_group_end(chunk + 1, BLOCK_SIZE).min(tree.chunks());
                (
                    ChunkRanges::from(start..end),
                    format!("data at byte {} does not match its hash", start.to_bytes()),
                )
            }
            EncodeError::ParentHashMismatch(node) => {
                let range = node.chunk_range();
                (
                    ChunkRanges::from(range.clone()),
                    format!(
                        "hash pair for bytes {}..{} does not match",
                        range.start.to_bytes(),
                        range.end.to_bytes().min(tree.size())
                    ),
                )
            }
            EncodeError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                // The file is shorter than it was (checked above for complete blobs).
                (ranges.clone(), "file was cut short".to_string())
            }
            error => {
                return Err(ReadError::Io {
                    path,
                    source: error.into(),
                });
            }
        };
        tracing::warn!(%hash, detail, "blob is corrupt on disk; forgetting the bad part");
        self.on_corrupt(hash, &source, &bad);
        Err(ReadError::Corrupt {
            hash: *hash,
            detail,
        })
    }

    /// Opens a blob for reading, under the index lock so that it cannot be evicted or
    /// finished between the look-up and the open. Complete blobs count as used.
    fn open_source(&self, hash: &BlobHash) -> Result<Source, ReadError> {
        let mut index = self.index();
        if let Some(b) = index.blobs.get(hash) {
            let size = b.size;
            let opened = File::open(self.blob_path(hash)).and_then(|data| {
                File::open(self.blob_outboard_path(hash)).map(|outboard| (data, outboard))
            });
            return match opened {
                Ok((data, outboard)) => {
                    self.touch(&mut index, &[*hash]);
                    Ok(Source::Complete {
                        data,
                        outboard,
                        size,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    drop(index);
                    tracing::warn!(%hash, "blob's files vanished; forgetting it");
                    self.forget_complete(hash);
                    Err(ReadError::Corrupt {
                        hash: *hash,
                        detail: "its file is missing".into(),
                    })
                }
                Err(source) => Err(ReadError::Io {
                    path: self.blob_path(hash),
                    source,
                }),
            };
        }
        let files = self.partial_files(hash, index)?;
        Ok(Source::Partial(files))
    }

    /// The files of the download in progress of `hash`; releases the index lock before
    /// opening them.
    fn partial_files(
        &self,
        hash: &BlobHash,
        index: std::sync::MutexGuard<'_, crate::store::Index>,
    ) -> Result<std::sync::Arc<crate::partial::PartialFiles>, ReadError> {
        let Some(p) = index.partials.get(hash) else {
            return Err(ReadError::NotFound { hash: *hash });
        };
        let (size, slot) = (p.size, p.slot.clone());
        drop(index);
        self.load_partial(hash, size, &slot)
            .map_err(|source| ReadError::Io {
                path: self.partial_path(hash),
                source,
            })
    }

    fn on_corrupt(&self, hash: &BlobHash, source: &Source, bad: &ChunkRanges) {
        match source {
            Source::Partial(files) => files.forget(bad),
            Source::Complete { .. } => self.demote(hash),
        }
    }

    /// Turns a complete blob found corrupt into a download, keeping what still verifies
    /// (found when it is next used). If its files cannot be moved, forgets it entirely.
    pub(crate) fn demote(&self, hash: &BlobHash) {
        let mut index = self.index();
        let Some(size) = index.blobs.get(hash).map(|b| b.size) else {
            return; // already forgotten by another reader
        };
        let (data, outboard) = (self.blob_path(hash), self.blob_outboard_path(hash));
        let (pdata, poutboard) = (self.partial_path(hash), self.partial_outboard_path(hash));
        let moved = std::fs::rename(&outboard, &poutboard)
            .and_then(|()| std::fs::rename(&data, &pdata))
            .and_then(|()| files::set_writable(&pdata))
            .and_then(|()| sync_dir(&self.partial_dir()))
            .and_then(|()| sync_dir(&self.blobs_dir()));
        if let Err(error) = moved {
            tracing::warn!(%hash, %error, "cannot keep the good part of a corrupt blob; deleting it");
            remove_quietly(&[&pdata, &poutboard]);
            drop(index);
            self.forget_complete(hash);
            return;
        }
        let now = index.tick();
        let committed = db::write(&self.inner.db, |txn| {
            txn.open_table(db::BLOBS)?.remove(hash.0)?;
            txn.open_table(db::PARTIALS)?.insert(hash.0, (size, now))?;
            Ok(())
        });
        if let Err(error) = committed {
            // The row still says complete; `open` will find the data missing and drop it.
            tracing::warn!(%hash, %error, "cannot record a corrupt blob as partial");
        }
        index.blobs.remove(hash);
        index
            .partials
            .insert(*hash, PartialMeta::new(size, now, None));
    }

    /// Removes a complete blob: row, files and index entry.
    fn forget_complete(&self, hash: &BlobHash) {
        let mut index = self.index();
        if let Err(error) = db::write(&self.inner.db, |txn| {
            txn.open_table(db::BLOBS)?.remove(hash.0)?;
            Ok(())
        }) {
            tracing::warn!(%hash, %error, "cannot remove a lost blob's row; open will");
        }
        self.forget_blob(&mut index, hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::WriteError;
    use crate::test_util::{TestStore, data};
    use crate::{GROUP_BYTES, group_count, group_ranges, ranges_bytes};
    use std::fs;

    /// Copies `hash` from `from` into `to` by the ranges given, in that order.
    fn transfer(from: &Store, to: &Store, hash: &BlobHash, size: u64, pieces: &[ChunkRanges]) {
        let partial = to.partial(hash, size).unwrap();
        for ranges in pieces {
            let mut encoded = Vec::new();
            from.encode(hash, ranges, &mut encoded).unwrap();
            partial.write(ranges, &encoded[..]).unwrap();
        }
        partial.finish().unwrap();
    }

    fn flip_byte(path: &std::path::Path, at: u64) {
        files::set_writable(path).unwrap();
        let mut bytes = fs::read(path).unwrap();
        bytes[at as usize] ^= 0x40;
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn blobs_of_edge_sizes_round_trip_between_stores() {
        let a = TestStore::new(None);
        let b = TestStore::new(None);
        let g = GROUP_BYTES as usize;
        for (i, size) in [0, 1, g - 1, g, g + 1, 3 * 1024 * 1024 + 12_345]
            .into_iter()
            .enumerate()
        {
            let bytes = data(size, i as u64);
            let hash = a.store.import_bytes(&bytes).unwrap();
            assert_eq!(hash, BlobHash::of(&bytes), "size {size}");
            transfer(
                &a.store,
                &b.store,
                &hash,
                size as u64,
                &[ChunkRanges::all()],
            );
            assert_eq!(
                fs::read(b.store.blob_path(&hash)).unwrap(),
                bytes,
                "size {size}"
            );
            assert_eq!(
                b.store.has(&hash).map(|i| (i.size, i.complete)),
                Some((size as u64, true))
            );
            assert_eq!(
                b.store.valid_ranges(&hash).unwrap(),
                all_chunks(size as u64)
            );
            // And the copy serves again, verified, to a third store.
            let c = TestStore::new(None);
            transfer(
                &b.store,
                &c.store,
                &hash,
                size as u64,
                &[ChunkRanges::all()],
            );
            assert_eq!(fs::read(c.store.blob_path(&hash)).unwrap(), bytes);
        }
    }

    #[test]
    fn a_download_in_pieces_out_of_order_finishes_only_when_whole() {
        let a = TestStore::new(None);
        let b = TestStore::new(None);
        let size = 10 * GROUP_BYTES + 500;
        let bytes = data(size as usize, 7);
        let hash = a.store.import_bytes(&bytes).unwrap();
        assert_eq!(group_count(size), 11);
        let pieces = [
            group_ranges(6..9, size),
            group_ranges(0..2, size),
            group_ranges(9..11, size),
            group_ranges(2..6, size),
        ];
        let write = |partial: &crate::Partial, ranges: &ChunkRanges| {
            let mut encoded = Vec::new();
            a.store.encode(&hash, ranges, &mut encoded).unwrap();
            let written = partial.write(ranges, &encoded[..]).unwrap();
            assert_eq!(written, ranges_bytes(ranges, size));
            assert!(partial.valid().is_superset(ranges));
        };

        let partial = b.store.partial(&hash, size).unwrap();
        assert_eq!(partial.missing(), all_chunks(size));
        write(&partial, &pieces[0]);
        // Finishing now fails and keeps the download.
        let err = partial.finish().unwrap_err();
        assert!(
            matches!(err, WriteError::Incomplete { missing_bytes, .. } if missing_bytes == size - 3 * GROUP_BYTES),
            "{err}"
        );
        assert!(b.store.has(&hash).is_some_and(|i| !i.complete));

        let partial = b.store.partial(&hash, size).unwrap();
        assert_eq!(partial.valid(), pieces[0]);
        for (n, ranges) in pieces[1..].iter().enumerate() {
            write(&partial, ranges);
            if n < 2 {
                assert!(!partial.missing().is_empty());
            }
        }
        assert!(partial.missing().is_empty());
        partial.finish().unwrap();
        assert_eq!(fs::read(b.store.blob_path(&hash)).unwrap(), bytes);
        assert!(!b.store.partial_path(&hash).exists());
        assert_eq!(
            b.store.has(&hash),
            Some(crate::BlobInfo {
                size,
                complete: true
            })
        );
    }

    #[test]
    fn a_flipped_byte_on_disk_fails_encode_and_is_not_served_again() {
        let a = TestStore::new(None);
        let size = 8 * GROUP_BYTES;
        let bytes = data(size as usize, 3);
        let hash = a.store.import_bytes(&bytes).unwrap();
        // Corrupt group 5.
        flip_byte(&a.store.blob_path(&hash), 5 * GROUP_BYTES + 100);

        let mut out = Vec::new();
        let err = a
            .store
            .encode(&hash, &ChunkRanges::all(), &mut out)
            .unwrap_err();
        assert!(
            matches!(err, ReadError::Corrupt { hash: h, .. } if h == hash),
            "{err}"
        );
        assert!(err.to_string().contains(&hash.to_string()), "{err}");
        // Nothing of group 5 went out: what was sent is less than 5 groups of data plus the
        // hash pairs on the way.
        assert!((out.len() as u64) < 5 * GROUP_BYTES + 8 * 64);

        // The blob is now a download holding everything but group 5.
        assert_eq!(a.store.has(&hash).map(|i| i.complete), Some(false));
        assert!(!a.store.blob_path(&hash).exists());
        let valid = a.store.valid_ranges(&hash).unwrap();
        assert_eq!(valid, all_chunks(size) - group_ranges(5..6, size));
        let err = a
            .store
            .encode(&hash, &group_ranges(5..6, size), Vec::new())
            .unwrap_err();
        assert!(matches!(err, ReadError::NotAvailable { .. }), "{err}");
        // The good part still serves, and fetching group 5 again repairs it.
        let b = TestStore::new(None);
        b.store.import_bytes(&bytes).unwrap();
        let partial = a.store.partial(&hash, size).unwrap();
        assert_eq!(partial.missing(), group_ranges(5..6, size));
        let mut encoded = Vec::new();
        b.store
            .encode(&hash, &partial.missing(), &mut encoded)
            .unwrap();
        partial.write(&partial.missing(), &encoded[..]).unwrap();
        partial.finish().unwrap();
        assert_eq!(fs::read(a.store.blob_path(&hash)).unwrap(), bytes);
        a.store
            .encode(&hash, &ChunkRanges::all(), Vec::new())
            .unwrap();
    }

    #[test]
    fn a_flipped_byte_in_the_outboard_fails_encode() {
        let a = TestStore::new(None);
        let size = 8 * GROUP_BYTES;
        let hash = a.store.import_bytes(&data(size as usize, 4)).unwrap();
        flip_byte(&a.store.blob_outboard_path(&hash), 64 + 3);
        let err = a
            .store
            .encode(&hash, &ChunkRanges::all(), Vec::new())
            .unwrap_err();
        assert!(matches!(err, ReadError::Corrupt { .. }), "{err}");
        assert_eq!(a.store.has(&hash).map(|i| i.complete), Some(false));
        let valid = a.store.valid_ranges(&hash).unwrap();
        assert!(!valid.is_empty() && valid != all_chunks(size), "{valid:?}");
    }

    #[test]
    fn a_flipped_byte_in_the_stream_fails_write_and_writes_nothing_of_that_group() {
        let a = TestStore::new(None);
        let b = TestStore::new(None);
        let size = 4 * GROUP_BYTES;
        let bytes = data(size as usize, 5);
        let hash = a.store.import_bytes(&bytes).unwrap();
        let mut encoded = Vec::new();
        a.store
            .encode(&hash, &ChunkRanges::all(), &mut encoded)
            .unwrap();
        // The stream ends with the data of the last group (group 3).
        let at = encoded.len() - 100;
        encoded[at] ^= 1;

        let partial = b.store.partial(&hash, size).unwrap();
        let err = partial
            .write(&ChunkRanges::all(), &encoded[..])
            .unwrap_err();
        assert!(matches!(err, WriteError::Corrupt { .. }), "{err}");
        assert_eq!(partial.valid(), group_ranges(0..3, size));
        drop(partial);
        let on_disk = fs::read(b.store.partial_path(&hash)).unwrap();
        assert_eq!(on_disk.len() as u64, size);
        assert!(on_disk[3 * GROUP_BYTES as usize..].iter().all(|&b| b == 0));
        assert_eq!(
            on_disk[..3 * GROUP_BYTES as usize],
            bytes[..3 * GROUP_BYTES as usize]
        );

        // A bad hash pair (the stream starts with the root's pair) writes nothing at all.
        let c = TestStore::new(None);
        let mut encoded = Vec::new();
        a.store
            .encode(&hash, &ChunkRanges::all(), &mut encoded)
            .unwrap();
        encoded[10] ^= 1;
        let partial = c.store.partial(&hash, size).unwrap();
        let err = partial
            .write(&ChunkRanges::all(), &encoded[..])
            .unwrap_err();
        assert!(matches!(err, WriteError::Corrupt { .. }), "{err}");
        assert!(partial.valid().is_empty());
        drop(partial);
        assert!(
            fs::read(c.store.partial_path(&hash))
                .unwrap()
                .iter()
                .all(|&b| b == 0)
        );

        // A stream cut short keeps what verified.
        let d = TestStore::new(None);
        let mut encoded = Vec::new();
        a.store
            .encode(&hash, &ChunkRanges::all(), &mut encoded)
            .unwrap();
        encoded.truncate(encoded.len() - GROUP_BYTES as usize - 10);
        let partial = d.store.partial(&hash, size).unwrap();
        let err = partial
            .write(&ChunkRanges::all(), &encoded[..])
            .unwrap_err();
        assert!(matches!(err, WriteError::Truncated { .. }), "{err}");
        assert_eq!(partial.valid(), group_ranges(0..2, size));
    }

    #[test]
    fn a_resumed_download_misses_exactly_what_was_not_written() {
        let a = TestStore::new(None);
        let b = TestStore::new(None);
        let size = 12 * GROUP_BYTES + 777;
        let bytes = data(size as usize, 6);
        let hash = a.store.import_bytes(&bytes).unwrap();
        let half =
            group_ranges(0..3, size) | group_ranges(7..10, size) | group_ranges(12..13, size);
        {
            let partial = b.store.partial(&hash, size).unwrap();
            let mut encoded = Vec::new();
            a.store.encode(&hash, &half, &mut encoded).unwrap();
            partial.write(&half, &encoded[..]).unwrap();
            // A group only partly received does not count.
            let part = ChunkRanges::from(ChunkNum(3 * 16)..ChunkNum(3 * 16 + 4));
            let mut encoded = Vec::new();
            a.store.encode(&hash, &part, &mut encoded).unwrap();
            partial.write(&part, &encoded[..]).unwrap();
            assert_eq!(partial.valid(), half);
        }
        let b = b.reopen(None);
        assert_eq!(
            b.store.has(&hash),
            Some(crate::BlobInfo {
                size,
                complete: false
            })
        );
        let partial = b.store.partial(&hash, size).unwrap();
        assert_eq!(partial.valid(), half);
        let rest = all_chunks(size) - &half;
        assert_eq!(partial.missing(), rest);
        assert_eq!(partial.missing_bytes(), size - ranges_bytes(&half, size));
        // The resumed half is served to others too.
        let mut encoded = Vec::new();
        b.store.encode(&hash, &half, &mut encoded).unwrap();
        let mut encoded = Vec::new();
        a.store.encode(&hash, &rest, &mut encoded).unwrap();
        partial.write(&rest, &encoded[..]).unwrap();
        partial.finish().unwrap();
        assert_eq!(fs::read(b.store.blob_path(&hash)).unwrap(), bytes);
        let b = b.reopen(None);
        assert_eq!(
            b.store.has(&hash),
            Some(crate::BlobInfo {
                size,
                complete: true
            })
        );
    }

    #[test]
    fn a_download_serves_only_what_it_verified() {
        let a = TestStore::new(None);
        let b = TestStore::new(None);
        let c = TestStore::new(None);
        let size = 6 * GROUP_BYTES;
        let bytes = data(size as usize, 8);
        let hash = a.store.import_bytes(&bytes).unwrap();
        let first = group_ranges(0..3, size);
        let partial_b = b.store.partial(&hash, size).unwrap();
        let mut encoded = Vec::new();
        a.store.encode(&hash, &first, &mut encoded).unwrap();
        partial_b.write(&first, &encoded[..]).unwrap();

        assert_eq!(b.store.valid_ranges(&hash).unwrap(), first);
        let err = b
            .store
            .encode(&hash, &ChunkRanges::all(), Vec::new())
            .unwrap_err();
        assert!(
            matches!(&err, ReadError::NotAvailable { missing, .. } if *missing == group_ranges(3..6, size)),
            "{err}"
        );
        // c takes the first half from b (a fetcher re-serving) and the rest from a.
        transfer_from_two(&b.store, &a.store, &c.store, &hash, size, &first);
        assert_eq!(fs::read(c.store.blob_path(&hash)).unwrap(), bytes);
        assert!(matches!(
            b.store.partial(&hash, size),
            Err(WriteError::Busy { .. })
        ));
        drop(partial_b);
        assert!(b.store.partial(&hash, size).is_ok());
    }

    fn transfer_from_two(
        first: &Store,
        second: &Store,
        to: &Store,
        hash: &BlobHash,
        size: u64,
        from_first: &ChunkRanges,
    ) {
        let partial = to.partial(hash, size).unwrap();
        let mut encoded = Vec::new();
        first.encode(hash, from_first, &mut encoded).unwrap();
        partial.write(from_first, &encoded[..]).unwrap();
        let rest = partial.missing();
        let mut encoded = Vec::new();
        second.encode(hash, &rest, &mut encoded).unwrap();
        partial.write(&rest, &encoded[..]).unwrap();
        partial.finish().unwrap();
    }

    #[test]
    fn encode_reports_a_failing_output_as_output() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let a = TestStore::new(None);
        let hash = a.store.import_bytes(&data(50_000, 9)).unwrap();
        let err = a
            .store
            .encode(&hash, &ChunkRanges::all(), Broken)
            .unwrap_err();
        assert!(matches!(err, ReadError::Output { .. }), "{err}");
        assert_eq!(a.store.has(&hash).map(|i| i.complete), Some(true));
        let missing = BlobHash::of(b"nope");
        assert!(matches!(
            a.store.encode(&missing, &ChunkRanges::all(), Vec::new()),
            Err(ReadError::NotFound { .. })
        ));
    }

    #[test]
    fn partial_refuses_impossible_sizes_and_complete_blobs() {
        let a = TestStore::new(None);
        let hash = a.store.import_bytes(b"hello").unwrap();
        assert!(matches!(
            a.store.partial(&hash, 5),
            Err(WriteError::AlreadyComplete { .. })
        ));
        let other = BlobHash::of(b"other");
        assert!(matches!(
            a.store.partial(&other, 0),
            Err(WriteError::WrongSize { .. })
        ));
        assert!(matches!(
            a.store.partial(&BlobHash::of(b""), 3),
            Err(WriteError::WrongSize { .. })
        ));
        assert!(matches!(
            a.store.partial(&other, crate::MAX_BLOB_SIZE + 1),
            Err(WriteError::TooLarge { .. })
        ));
        drop(a.store.partial(&other, 5).unwrap());
        assert!(matches!(
            a.store.partial(&other, 6),
            Err(WriteError::SizeMismatch {
                known: 5,
                claimed: 6,
                ..
            })
        ));
    }

    #[test]
    fn store_and_partial_are_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Store>();
        assert_send_sync::<crate::Partial>();

        let a = TestStore::new(None);
        let b = TestStore::new(None);
        let size = 20 * GROUP_BYTES + 3;
        let bytes = data(size as usize, 11);
        let hash = a.store.import_bytes(&bytes).unwrap();
        let partial = std::sync::Arc::new(b.store.partial(&hash, size).unwrap());
        // Four writers on disjoint pieces plus one on a piece another also writes (the end
        // game), while a reader serves what is already valid.
        let pieces = [0..6, 6..11, 11..16, 16..21, 4..8];
        std::thread::scope(|scope| {
            for groups in pieces {
                let (a, partial) = (&a.store, partial.clone());
                scope.spawn(move || {
                    let ranges = group_ranges(groups, size);
                    let mut encoded = Vec::new();
                    a.encode(&hash, &ranges, &mut encoded).unwrap();
                    partial.write(&ranges, &encoded[..]).unwrap();
                });
            }
            let b = &b.store;
            scope.spawn(move || {
                for _ in 0..20 {
                    let valid = b.valid_ranges(&hash).unwrap();
                    let mut out = Vec::new();
                    b.encode(&hash, &valid, &mut out).unwrap();
                }
            });
        });
        let partial = std::sync::Arc::try_unwrap(partial).unwrap();
        partial.finish().unwrap();
        assert_eq!(fs::read(b.store.blob_path(&hash)).unwrap(), bytes);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever the size and however the groups are split and ordered, the copy is exact
        /// and `missing` shrinks by exactly what each piece covered.
        #[test]
        fn any_split_of_any_blob_transfers_exactly(
            size in 0u64..(12 * GROUP_BYTES),
            cuts in proptest::collection::vec(0u64..12, 0..6),
            seed in 0u64..1000,
        ) {
            let a = TestStore::new(None);
            let b = TestStore::new(None);
            let bytes = data(size as usize, seed);
            let hash = a.store.import_bytes(&bytes).unwrap();
            let groups = group_count(size);
            let mut bounds: Vec<u64> = cuts.into_iter().filter(|c| *c < groups).collect();
            bounds.extend([0, groups]);
            bounds.sort_unstable();
            bounds.dedup();
            let mut pieces: Vec<ChunkRanges> = bounds.windows(2).map(|w| group_ranges(w[0]..w[1], size)).collect();
            // A deterministic shuffle from the seed.
            pieces.sort_by_key(|r| (r.boundaries().first().map(|c| c.0).unwrap_or(0) * 2_654_435_761 + seed) % 97);
            let partial = b.store.partial(&hash, size).unwrap();
            for ranges in &pieces {
                let before = partial.missing_bytes();
                let mut encoded = Vec::new();
                a.store.encode(&hash, ranges, &mut encoded).unwrap();
                let written = partial.write(ranges, &encoded[..]).unwrap();
                proptest::prop_assert_eq!(written, ranges_bytes(ranges, size));
                proptest::prop_assert_eq!(partial.missing_bytes(), before - written);
            }
            proptest::prop_assert!(partial.missing().is_empty());
            partial.finish().unwrap();
            proptest::prop_assert_eq!(fs::read(b.store.blob_path(&hash)).unwrap(), bytes);
        }
    }
}
