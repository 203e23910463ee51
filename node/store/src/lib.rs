//! BlendNet's content-addressed blob store: the bytes of scenes and results, named by their
//! BLAKE3 hash, kept on local disk and served as verified bao ranges (DESIGN §5).
//!
//! The store owns one directory and three tables in the caller's redb database. It knows
//! nothing of peers or streams: the transfer protocol reads [`Store::encode`] output on one
//! side and feeds it to [`Partial::write`] on the other, and decides itself whom to ask for
//! which ranges. Everything here is synchronous and blocks on disk I/O; async callers run it
//! on blocking threads.
//!
//! ```text
//!  DIR/blobs/<hex>          complete blob, read-only; hard-linked into workspaces
//!  DIR/blobs/<hex>.obao     its pre-order bao outboard (hash pairs of 16 KiB chunk groups)
//!  DIR/partial/<hex>        a download in progress: pre-sized, sparse, written in place
//!  DIR/partial/<hex>.obao   its outboard, filled in as verified hash pairs arrive
//!  DIR/tmp/                 imports being copied in; emptied on open
//!
//!  redb (the caller's database):
//!  store_blobs     hash → (size, last used, Unix ms)     complete blobs
//!  store_partials  hash → (size, last touched, Unix ms)  downloads in progress
//!  store_pins      hash ⇉ pin name (a job id, …)          multimap: pinned while any name is
//! ```
//!
//! How data moves:
//!
//! ```text
//!  import_file / import_bytes / import_dir ──▶ tmp/ (hash + outboard in one pass) ──rename──▶ blobs/
//!  provider: encode(hash, ranges) ──bao stream──▶ fetcher: partial(hash, size).write(ranges, stream)
//!            (validated while read)                (verified before written) ──finish──▶ blobs/
//!  materialize(manifest, workspace) ──hard link (or copy)──▶ workspace/<relative path>
//! ```
//!
//! Promises:
//! - Nothing unverified is ever written to a partial's data file, and nothing is served that
//!   does not verify against its hash as it is read. A blob found corrupt on disk while being
//!   served is demoted to a partial holding the ranges that still verify, so it is never
//!   served again until its bad ranges are fetched anew.
//! - Complete blobs appear atomically (temporary file, fsync, rename, fsync of the directory,
//!   then the database row). [`Store::open`] reconciles the directory with the tables, so a
//!   process killed at any point leaves a consistent store.
//! - With a quota, unpinned complete blobs are evicted least recently used first to make room;
//!   when that cannot make enough room the operation fails with a `QuotaExceeded` error and
//!   nothing changes.
//!
//! Concurrency: a [`Store`] is shared by every thread of the daemon. Encoding a blob while it
//! is being downloaded is fine: [`Store::encode`] serves only ranges the download has already
//! verified ([`ReadError::NotAvailable`] for the rest), reading them through its own file
//! handles while [`Partial::write`] fills in other ranges; when [`Partial::finish`] moves the
//! files into `blobs/`, open handles keep reading the same bytes. Eviction and `gc` unlink
//! files that a running `encode` may still read to the end (Unix semantics). One [`Partial`]
//! per blob lives at a time; writers of several providers share it.
//!
//! The modules: [`manifest`] (the list of files of a scene, and its path rules), `store`
//! (open, index, pins, quota, gc), `import`, `serve` (valid ranges and encoding), `partial`
//! (downloads), `materialize` (workspaces), `files` (atomic file helpers), `db` (tables).

mod db;
mod error;
mod files;
mod import;
pub mod manifest;
mod materialize;
mod partial;
mod serve;
mod store;
pub mod transfer;

#[cfg(test)]
mod test_util;

pub use bao_tree;
pub use bao_tree::ChunkRanges;
pub use blendnet_proto::BlobHash;
pub use error::{
    GcError, ImportError, ManifestError, MaterializeError, OpenError, PinError, ReadError,
    WriteError,
};
pub use manifest::{InvalidManifest, Manifest, ManifestEntry, PathProblem};
pub use partial::Partial;
pub use store::{BlobEntry, BlobInfo, Store};

use std::time::Duration;

/// Chunk groups of 16 KiB (16 BLAKE3 chunks): the unit that is verified, stored in the
/// outboard and requested. iroh-blobs uses the same size; it keeps outboards at 1/256 of the
/// data while a group is still small enough to re-request cheaply when one is bad.
pub const BLOCK_SIZE: bao_tree::BlockSize = bao_tree::BlockSize::from_chunk_log(4);

/// Bytes in one chunk group ([`BLOCK_SIZE`]).
pub const GROUP_BYTES: u64 = BLOCK_SIZE.bytes() as u64;

/// Largest blob the store accepts, imported or downloaded. Far above any scene file or
/// render, it stops a peer's claimed size from making us pre-size an absurd sparse file.
pub const MAX_BLOB_SIZE: u64 = 1 << 40;

/// Largest encoded manifest. A scene of 100 000 files with long paths fits; decoding a
/// manifest never allocates more than this.
pub const MAX_MANIFEST_BYTES: usize = 32 * 1024 * 1024;

/// Most entries in one manifest: more files than any scene has, few enough that validating
/// and materializing one stays quick.
pub const MAX_MANIFEST_ENTRIES: usize = 200_000;

/// Longest manifest path in bytes: Linux's `PATH_MAX`, so a valid path can be created there.
pub const MAX_PATH_BYTES: usize = 4096;

/// Longest path component in bytes: `NAME_MAX` on Linux, macOS and Windows file systems.
pub const MAX_COMPONENT_BYTES: usize = 255;

/// Deepest directory nesting `import_dir` descends: far deeper than a project's layout, and
/// a bound on recursion through unusual trees.
pub const MAX_DIR_DEPTH: usize = 64;

/// Longest pin name (a job id or similar) in bytes: pins are database keys.
pub const MAX_PIN_NAME_BYTES: usize = 256;

/// A partial download not written to for this long, and not pinned, is abandoned: `gc`
/// deletes it. Long enough to survive a night with the laptop closed.
pub const ABANDONED_PARTIAL_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Last-use times are kept exactly in memory but written to the database at most this often
/// per blob, so serving many ranges of one blob does not commit a transaction per request.
/// After a restart the least-recently-used order is right to within this interval.
pub const TOUCH_PERSIST_INTERVAL: Duration = Duration::from_secs(60);

/// The chunk ranges covering a whole blob of `size` bytes (empty for an empty blob).
pub fn all_chunks(size: u64) -> ChunkRanges {
    ChunkRanges::from(bao_tree::ChunkNum(0)..bao_tree::ChunkNum::chunks(size))
}

/// The number of 16 KiB chunk groups of a blob of `size` bytes (0 for an empty blob).
pub fn group_count(size: u64) -> u64 {
    size.div_ceil(GROUP_BYTES)
}

/// The chunk ranges of chunk groups `groups` of a blob of `size` bytes, clamped to its end.
/// Fetchers should request whole groups: only whole groups are kept across restarts.
pub fn group_ranges(groups: std::ops::Range<u64>, size: u64) -> ChunkRanges {
    let per_group = 1u64 << BLOCK_SIZE.chunk_log();
    let end = bao_tree::ChunkNum::chunks(size).0;
    let start = groups.start.saturating_mul(per_group).min(end);
    let stop = groups.end.saturating_mul(per_group).min(end);
    ChunkRanges::from(bao_tree::ChunkNum(start)..bao_tree::ChunkNum(stop))
}

/// Bytes covered by `ranges` within a blob of `size` bytes.
pub fn ranges_bytes(ranges: &ChunkRanges, size: u64) -> u64 {
    let bounded = ranges & &all_chunks(size);
    // Bounded by `all_chunks`, the boundaries come in (start, end) pairs.
    bounded
        .boundaries()
        .chunks(2)
        .map(|pair| match pair {
            [start, end] => end.to_bytes().min(size) - start.to_bytes().min(size),
            _ => 0,
        })
        .sum()
}
