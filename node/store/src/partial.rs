//! Downloads in progress: [`Store::partial`] and the [`Partial`] writer.
//!
//! A download is `partial/<hex>` (the data, pre-sized to the blob's size, sparse) and
//! `partial/<hex>.obao` (the pre-order outboard, pre-sized, zero where no hash pair arrived
//! yet). [`Partial::write`] decodes a bao stream with `bao-tree`'s response decoder, which
//! checks every hash pair against its parent (up to the root, the blob's hash) and every
//! chunk group against its hash before handing it over; only then is it written in place.
//! So the data file never holds an unverified byte, whatever the provider sends.
//!
//! The verified ranges live in memory (shared with [`Store::encode`], which serves them to
//! other fetchers while the download goes on). After a restart they are recomputed from the
//! files by re-hashing what is there (`bao_tree::io::sync::valid_ranges`): only whole chunk
//! groups whose hash pairs made it to the outboard count, so a group cut in half by a crash is
//! simply fetched again.
//!
//! One [`Partial`] per blob is alive at a time ([`WriteError::Busy`] otherwise); it is
//! `Sync` and `write` takes `&self`, so a fetcher shares it (`Arc<Partial>`) between the
//! streams of several providers, which may write the same range concurrently (the end game):
//! both write the same verified bytes.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use bao_tree::io::DecodeError;
use bao_tree::io::outboard::PreOrderOutboard;
use bao_tree::iter::{BaoChunk, ResponseIterRef};
use bao_tree::{BaoTree, ChunkNum, ChunkRanges};
use blendnet_proto::BlobHash;

use crate::error::WriteError;
use crate::files::{self, is_disk_full, remove_quietly, sync_dir, write_all_at};
use crate::store::{BlobMeta, NoRoom, PartialMeta, outboard_size};
use crate::{BLOCK_SIZE, MAX_BLOB_SIZE, Store, all_chunks, db, ranges_bytes};

/// The open files of a download and the chunks verified so far.
pub(crate) struct PartialFiles {
    pub(crate) hash: BlobHash,
    pub(crate) tree: BaoTree,
    pub(crate) data: File,
    pub(crate) outboard: File,
    /// Chunks written after verification (may include parts of chunk groups).
    verified: Mutex<ChunkRanges>,
    /// Held while writing either file. Concurrent writes to one file make the kernel spin on
    /// the inode's lock: four threads writing 1 GiB took 3.2 s of CPU here, one took 0.7 s.
    writing: Mutex<()>,
}

impl PartialFiles {
    /// Creates the pre-sized, empty files of a new download.
    fn create(
        data_path: &Path,
        outboard_path: &Path,
        hash: BlobHash,
        size: u64,
    ) -> io::Result<PartialFiles> {
        let open = |path: &Path, len: u64| -> io::Result<File> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)?;
            file.set_len(len)?;
            Ok(file)
        };
        let data = open(data_path, size)?;
        let outboard = open(outboard_path, outboard_size(size))?;
        Ok(PartialFiles {
            hash,
            tree: BaoTree::new(size, BLOCK_SIZE),
            data,
            outboard,
            writing: Mutex::new(()),
            verified: Mutex::new(ChunkRanges::empty()),
        })
    }

    /// Opens the files of an existing download and finds what in them verifies. Files of the
    /// wrong length (cut short) are brought to length; what was cut off is simply missing.
    pub(crate) fn open(
        data_path: &Path,
        outboard_path: &Path,
        hash: BlobHash,
        size: u64,
    ) -> io::Result<PartialFiles> {
        let open = |path: &Path, len: u64| -> io::Result<File> {
            let file = OpenOptions::new().read(true).write(true).open(path)?;
            if file.metadata()?.len() != len {
                file.set_len(len)?;
            }
            Ok(file)
        };
        let data = open(data_path, size)?;
        let outboard = open(outboard_path, outboard_size(size))?;
        let files = PartialFiles {
            hash,
            tree: BaoTree::new(size, BLOCK_SIZE),
            data,
            outboard,
            writing: Mutex::new(()),
            verified: Mutex::new(ChunkRanges::empty()),
        };
        let valid = files.scan()?;
        tracing::debug!(%hash, valid_bytes = ranges_bytes(&valid, size), size, "resumed download");
        *files
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = valid;
        Ok(files)
    }

    /// Re-hashes the files to find the chunk groups that verify.
    fn scan(&self) -> io::Result<ChunkRanges> {
        let outboard = PreOrderOutboard {
            root: blake3::Hash::from_bytes(self.hash.0),
            tree: self.tree,
            data: &self.outboard,
        };
        let mut valid = ChunkRanges::empty();
        for range in bao_tree::io::sync::valid_ranges(outboard, &self.data, &ChunkRanges::all()) {
            valid |= ChunkRanges::from(range?);
        }
        Ok(valid)
    }

    pub(crate) fn size(&self) -> u64 {
        self.tree.size()
    }

    /// Whole chunk groups verified: what can be served and what survives a restart.
    pub(crate) fn valid(&self) -> ChunkRanges {
        let verified = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        // The last group may be short: count the chunks past the end as present, so that
        // rounding down to whole groups keeps it when all its real chunks are verified.
        let end = self.tree.chunks();
        let padded = verified | ChunkRanges::from(end..);
        let groups = bao_tree::io::full_chunk_groups(&padded, BLOCK_SIZE);
        groups & all_chunks(self.size())
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn add_verified(&self, offset: u64, len: usize) {
        let range = ChunkNum::full_chunks(offset)..ChunkNum::chunks(offset + len as u64);
        *self.verified.lock().unwrap_or_else(PoisonError::into_inner) |= ChunkRanges::from(range);
    }

    /// Forgets ranges found corrupt on disk, so they are neither served nor counted.
    pub(crate) fn forget(&self, ranges: &ChunkRanges) {
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        *verified = &*verified - ranges;
    }
}

/// Hash pairs for one contiguous stretch of the outboard, not written yet.
#[derive(Default)]
struct Run {
    offset: u64,
    buf: Vec<u8>,
}

impl Run {
    /// Whether `len` bytes at `offset` continue this run.
    fn extends(&self, offset: u64) -> bool {
        !self.buf.is_empty() && offset == self.offset + self.buf.len() as u64
    }

    fn start(&mut self, offset: u64) {
        debug_assert!(self.buf.is_empty());
        self.offset = offset;
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }
}

/// Verified data for one contiguous stretch of the data file, gathered at the front of the
/// encoding being decoded (whose bytes there were already consumed), not written yet.
#[derive(Default)]
struct DataRun {
    /// Where in the file the run starts.
    offset: u64,
    /// Its length; it lies at `encoded[..len]`.
    len: usize,
}

/// The exclusive writer of one download. `Send + Sync`: share it between the streams of
/// several providers with an `Arc`. Dropping it keeps what was written for a later
/// [`Store::partial`] to resume.
pub struct Partial {
    store: Store,
    files: Arc<PartialFiles>,
    token: u64,
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partial")
            .field("hash", &self.files.hash)
            .field("size", &self.files.size())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Starts or resumes the download of `hash`, `size` bytes long.
    ///
    /// A new download reserves `size` bytes of the quota at once (evicting least recently
    /// used blobs if it must; [`WriteError::QuotaExceeded`] and no change if it cannot). A
    /// resumed one finds what is already on disk and verifies (re-hashing it, on the first use
    /// after the store was opened). A second `partial` for the same hash while a [`Partial`]
    /// lives fails with [`WriteError::Busy`].
    pub fn partial(&self, hash: &BlobHash, size: u64) -> Result<Partial, WriteError> {
        let hash = *hash;
        if size > MAX_BLOB_SIZE {
            return Err(WriteError::TooLarge {
                hash,
                size,
                limit: MAX_BLOB_SIZE,
            });
        }
        // The empty blob is the only one with 0 bytes; nothing in a stream would verify it.
        if (size == 0) != (hash == BlobHash::of(&[])) {
            return Err(WriteError::WrongSize { hash, size });
        }
        let mut index = self.index();
        if index.blobs.contains_key(&hash) {
            return Err(WriteError::AlreadyComplete { hash });
        }
        let token = index.new_writer();
        if let Some(p) = index.partials.get_mut(&hash) {
            if p.size != size {
                return Err(WriteError::SizeMismatch {
                    hash,
                    known: p.size,
                    claimed: size,
                });
            }
            if p.writer.is_some() {
                return Err(WriteError::Busy { hash });
            }
            p.writer = Some(token);
            let slot = p.slot.clone();
            self.touch_partial(&mut index, &hash);
            drop(index);
            return match self.load_partial(&hash, size, &slot) {
                Ok(files) => Ok(Partial {
                    store: self.clone(),
                    files,
                    token,
                }),
                Err(source) => {
                    release_writer(self, &hash, token);
                    Err(self.write_err(self.partial_path(&hash), source))
                }
            };
        }

        let victims = self.plan_room(&index, size, 0).map_err(
            |NoRoom {
                 needed,
                 quota,
                 pinned,
             }| WriteError::QuotaExceeded {
                needed,
                quota,
                pinned,
            },
        )?;
        let data_path = self.partial_path(&hash);
        let outboard_path = self.partial_outboard_path(&hash);
        let created = PartialFiles::create(&data_path, &outboard_path, hash, size)
            .and_then(|files| sync_dir(&self.partial_dir()).map(|()| files));
        let files = match created {
            Ok(files) => Arc::new(files),
            Err(source) => {
                remove_quietly(&[&data_path, &outboard_path]);
                return Err(self.write_err(data_path, source));
            }
        };
        let now = index.tick();
        let committed = db::write(&self.inner.db, |txn| {
            txn.open_table(db::PARTIALS)?.insert(hash.0, (size, now))?;
            let mut blobs = txn.open_table(db::BLOBS)?;
            for v in &victims {
                blobs.remove(v.0)?;
            }
            Ok(())
        });
        if let Err(e) = committed {
            drop(files);
            remove_quietly(&[&data_path, &outboard_path]);
            return Err(WriteError::Database(e));
        }
        self.evict(&mut index, &victims);
        let mut meta = PartialMeta::new(size, now, Some(files.clone()));
        meta.writer = Some(token);
        index.partials.insert(hash, meta);
        index.used += size;
        tracing::debug!(%hash, size, "download started");
        Ok(Partial {
            store: self.clone(),
            files,
            token,
        })
    }

    /// The files of a download, opened and scanned on first use. Threads asking at once wait
    /// for one scan.
    pub(crate) fn load_partial(
        &self,
        hash: &BlobHash,
        size: u64,
        slot: &Mutex<Option<Arc<PartialFiles>>>,
    ) -> io::Result<Arc<PartialFiles>> {
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(files) = &*slot {
            return Ok(files.clone());
        }
        let files = Arc::new(PartialFiles::open(
            &self.partial_path(hash),
            &self.partial_outboard_path(hash),
            *hash,
            size,
        )?);
        *slot = Some(files.clone());
        Ok(files)
    }

    fn write_err(&self, path: std::path::PathBuf, source: io::Error) -> WriteError {
        if is_disk_full(&source) {
            WriteError::DiskFull {
                dir: self.inner.dir.clone(),
            }
        } else {
            WriteError::Io { path, source }
        }
    }
}

fn release_writer(store: &Store, hash: &BlobHash, token: u64) {
    let mut index = store.index();
    if let Some(p) = index.partials.get_mut(hash)
        && p.writer == Some(token)
    {
        p.writer = None;
    }
}

impl Partial {
    /// The blob being downloaded.
    pub fn hash(&self) -> BlobHash {
        self.files.hash
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.files.size()
    }

    /// The chunk ranges verified and written so far, in whole chunk groups (a group only
    /// partly received counts as missing).
    pub fn valid(&self) -> ChunkRanges {
        self.files.valid()
    }

    /// All chunks of the blob that are not [`valid`](Partial::valid) yet.
    pub fn missing(&self) -> ChunkRanges {
        all_chunks(self.size()) - self.valid()
    }

    /// Bytes not valid yet.
    pub fn missing_bytes(&self) -> u64 {
        ranges_bytes(&self.missing(), self.size())
    }

    /// Reads the bao encoding of `ranges` of this blob from `encoded` (as
    /// [`Store::encode`] writes it) and writes it like [`Partial::write_encoded`].
    pub fn write(&self, ranges: &ChunkRanges, mut encoded: impl Read) -> Result<u64, WriteError> {
        let mut buf = Vec::new();
        encoded
            .read_to_end(&mut buf)
            .map_err(|source| WriteError::Input {
                hash: self.files.hash,
                source,
            })?;
        self.write_encoded(ranges, &mut buf)
    }

    /// Verifies the bao encoding of `ranges` of this blob held in `encoded` (as
    /// [`Store::encode`] writes it), each hash pair and chunk group against the blob's hash
    /// before writing it, and writes data and outboard in place. Returns the payload bytes
    /// written. `encoded` is scratch space: its content is undefined afterwards.
    ///
    /// On [`WriteError::Corrupt`] (the provider sent bad data) or [`WriteError::Truncated`],
    /// what verified before the failure is kept and valid; nothing unverified was written.
    /// `ranges` must be the ranges the provider encoded; ask for whole chunk groups
    /// ([`group_ranges`](crate::group_ranges)): parts of a group are verified and written, but
    /// only whole groups count as valid.
    pub fn write_encoded(
        &self,
        ranges: &ChunkRanges,
        encoded: &mut [u8],
    ) -> Result<u64, WriteError> {
        let hash = self.files.hash;
        let tree = self.files.tree;
        let ranges = bao_tree::io::sync::truncate_ranges(ranges, tree.size());
        // The same walk as bao-tree's `DecodeResponseIter`, over memory instead of a reader:
        // no copy of each group into a fresh buffer. Verified data is moved to the front of
        // `encoded` (whose bytes there were consumed already) so that a contiguous stretch
        // goes to the file in one write: a write per 16 KiB group and per 64-byte hash pair
        // cost more than the copy itself, and concurrent small writes to one file contend on
        // its lock.
        let mut stack: Vec<blake3::Hash> = vec![blake3::Hash::from_bytes(hash.0)];
        let mut outboard = Run::default();
        let mut data = DataRun::default();
        let mut at = 0usize;
        let mut written = 0u64;
        let mut result = Ok(());
        for chunk in ResponseIterRef::new(tree, ranges) {
            let Some(expected) = stack.pop() else {
                break;
            };
            let step = match chunk {
                BaoChunk::Parent {
                    node,
                    is_root,
                    left,
                    right,
                    ..
                } => match encoded.get(at..at + 64) {
                    None => Err(decode_error(hash, DecodeError::ParentNotFound(node))),
                    Some(pair) => {
                        let mut bytes = [0u8; 64];
                        bytes.copy_from_slice(pair);
                        at += 64;
                        let l = blake3::Hash::from_slice(&bytes[..32]).expect("32 bytes");
                        let r = blake3::Hash::from_slice(&bytes[32..]).expect("32 bytes");
                        if parent_cv(&l, &r, is_root) != expected {
                            Err(decode_error(hash, DecodeError::ParentHashMismatch(node)))
                        } else {
                            if right {
                                stack.push(r);
                            }
                            if left {
                                stack.push(l);
                            }
                            match tree.pre_order_offset(node) {
                                Some(offset) if outboard.extends(offset * 64) => {
                                    outboard.push(&bytes);
                                    Ok(())
                                }
                                Some(offset) => self.flush_outboard(&mut outboard).map(|()| {
                                    outboard.start(offset * 64);
                                    outboard.push(&bytes);
                                }),
                                None => Ok(()),
                            }
                        }
                    }
                },
                BaoChunk::Leaf {
                    start_chunk,
                    size,
                    is_root,
                    ..
                } => match encoded.get(at..at + size) {
                    None => Err(decode_error(hash, DecodeError::LeafNotFound(start_chunk))),
                    Some(bytes) if hash_subtree(start_chunk.0, bytes, is_root) != expected => Err(
                        decode_error(hash, DecodeError::LeafHashMismatch(start_chunk)),
                    ),
                    Some(_) => {
                        let offset = start_chunk.to_bytes();
                        let flushed = if data.len > 0 && offset != data.offset + data.len as u64 {
                            self.flush_data(&mut outboard, &mut data, encoded)
                        } else {
                            Ok(0)
                        };
                        flushed.map(|n| {
                            written += n;
                            if data.len == 0 {
                                data.offset = offset;
                            }
                            encoded.copy_within(at..at + size, data.len);
                            data.len += size;
                            at += size;
                        })
                    }
                },
            };
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        // Whatever verified before a failure is still written and counted.
        match self.flush_data(&mut outboard, &mut data, encoded) {
            Ok(n) => written += n,
            Err(e) => result = result.and(Err(e)),
        }
        let mut index = self.store.index();
        self.store.touch_partial(&mut index, &hash);
        drop(index);
        match result {
            Ok(()) => Ok(written),
            Err(e) => {
                if matches!(e, WriteError::Corrupt { .. }) {
                    tracing::debug!(%hash, error = %e, written, "provider sent corrupt data");
                }
                Err(e)
            }
        }
    }

    fn flush_outboard(&self, run: &mut Run) -> Result<(), WriteError> {
        if run.buf.is_empty() {
            return Ok(());
        }
        let hash = self.files.hash;
        let _writing = self.files.lock_writes();
        write_all_at(&self.files.outboard, run.offset, &run.buf).map_err(|e| {
            self.store
                .write_err(self.store.partial_outboard_path(&hash), e)
        })?;
        run.buf.clear();
        Ok(())
    }

    /// Writes the pending hash pairs, then the pending data (`encoded[..data.len]`), and only
    /// then counts the data as verified (others may be served it at once). Returns the data
    /// bytes written.
    fn flush_data(
        &self,
        outboard: &mut Run,
        data: &mut DataRun,
        encoded: &[u8],
    ) -> Result<u64, WriteError> {
        self.flush_outboard(outboard)?;
        if data.len == 0 {
            return Ok(0);
        }
        let hash = self.files.hash;
        let writing = self.files.lock_writes();
        write_all_at(&self.files.data, data.offset, &encoded[..data.len])
            .map_err(|e| self.store.write_err(self.store.partial_path(&hash), e))?;
        drop(writing);
        files::start_writeback(&self.files.data, data.offset, data.len);
        self.files.add_verified(data.offset, data.len);
        let n = data.len as u64;
        data.len = 0;
        Ok(n)
    }

    /// Moves the finished download into the store as a complete blob (fsync, atomic rename,
    /// database row). Fails with [`WriteError::Incomplete`] while anything is missing; the
    /// download stays as it was and can be resumed with [`Store::partial`].
    pub fn finish(self) -> Result<(), WriteError> {
        let hash = self.files.hash;
        let size = self.size();
        let missing_bytes = self.missing_bytes();
        if !self.missing().is_empty() {
            return Err(WriteError::Incomplete {
                hash,
                missing_bytes,
            });
        }
        let store = &self.store;
        let (data_path, outboard_path) = (
            store.partial_path(&hash),
            store.partial_outboard_path(&hash),
        );
        let (blob_path, blob_outboard_path) =
            (store.blob_path(&hash), store.blob_outboard_path(&hash));
        // Flush outside the lock: this can take a while for a large blob.
        self.files
            .data
            .sync_all()
            .and_then(|()| self.files.outboard.sync_all())
            .map_err(|e| store.write_err(data_path.clone(), e))?;

        let mut index = store.index();
        match index.partials.get(&hash) {
            Some(p) if p.writer == Some(self.token) => {}
            _ if index.blobs.contains_key(&hash) => return Ok(()),
            _ => return Err(WriteError::Gone { hash }),
        }
        let moved = files::set_read_only(&data_path, false)
            .and_then(|()| std::fs::rename(&outboard_path, &blob_outboard_path))
            .and_then(|()| std::fs::rename(&data_path, &blob_path))
            .and_then(|()| sync_dir(&store.blobs_dir()))
            .and_then(|()| sync_dir(&store.partial_dir()));
        if let Err(e) = moved {
            // Put back what moved, so the download stays resumable.
            let _ = std::fs::rename(&blob_outboard_path, &outboard_path);
            let _ = std::fs::rename(&blob_path, &data_path);
            let _ = files::set_writable(&data_path);
            return Err(store.write_err(blob_path, e));
        }
        let now = index.tick();
        let committed = db::write(&store.inner.db, |txn| {
            txn.open_table(db::PARTIALS)?.remove(hash.0)?;
            txn.open_table(db::BLOBS)?.insert(hash.0, (size, now))?;
            Ok(())
        });
        if let Err(e) = committed {
            let _ = std::fs::rename(&blob_outboard_path, &outboard_path);
            let _ = std::fs::rename(&blob_path, &data_path);
            let _ = files::set_writable(&data_path);
            return Err(WriteError::Database(e));
        }
        index.partials.remove(&hash);
        index.blobs.insert(hash, BlobMeta::new(size, now));
        tracing::debug!(%hash, size, "download complete");
        Ok(())
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        release_writer(&self.store, &self.files.hash, self.token);
    }
}

/// The chaining value of a subtree of the blob starting at `start_chunk`, as bao-tree
/// computes it (its own function is private).
fn hash_subtree(start_chunk: u64, data: &[u8], is_root: bool) -> blake3::Hash {
    use blake3::hazmat::HasherExt;
    if is_root {
        blake3::hash(data)
    } else {
        let mut hasher = blake3::Hasher::new();
        hasher.set_input_offset(start_chunk * 1024);
        hasher.update(data);
        blake3::Hash::from(hasher.finalize_non_root())
    }
}

/// The chaining value of a parent from its children's, as bao-tree computes it.
fn parent_cv(left: &blake3::Hash, right: &blake3::Hash, is_root: bool) -> blake3::Hash {
    use blake3::hazmat::{Mode, merge_subtrees_non_root, merge_subtrees_root};
    if is_root {
        merge_subtrees_root(left.as_bytes(), right.as_bytes(), Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(
            left.as_bytes(),
            right.as_bytes(),
            Mode::Hash,
        ))
    }
}

fn decode_error(hash: BlobHash, e: DecodeError) -> WriteError {
    match e {
        DecodeError::ParentHashMismatch(node) => {
            let chunks = node.chunk_range();
            WriteError::Corrupt {
                hash,
                detail: format!(
                    "hash pair for bytes {}..{} does not match",
                    chunks.start.to_bytes(),
                    chunks.end.to_bytes()
                ),
            }
        }
        DecodeError::LeafHashMismatch(chunk) => WriteError::Corrupt {
            hash,
            detail: format!("data at byte {} does not match its hash", chunk.to_bytes()),
        },
        DecodeError::ParentNotFound(_) | DecodeError::LeafNotFound(_) => {
            WriteError::Truncated { hash }
        }
        DecodeError::Io(source) => WriteError::Input { hash, source },
    }
}
