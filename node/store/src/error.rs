//! One error enum per store operation, with variants a user or a caller can act on.
//!
//! A full disk is always its own variant naming the store directory, so the daemon can tell
//! the person to free space or move the data directory; `QuotaExceeded` says how much was
//! needed and how much of the quota is held by pins and downloads that cannot be evicted.

use std::io;
use std::path::PathBuf;

use blendnet_proto::BlobHash;

use crate::ChunkRanges;
use crate::manifest::InvalidManifest;

/// Why [`Store::open`](crate::Store::open) failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A directory of the store could not be created or listed.
    #[error("cannot use blob store directory {dir}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The store's tables could not be read or written.
    #[error("blob store database failed")]
    Database(#[source] redb::Error),
}

/// Why an import ([`Store::import_file`](crate::Store::import_file), `import_bytes`,
/// `import_dir`) failed. A failed import leaves no trace in the store.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The source is not a regular file (a directory, a device, a pipe).
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// `import_dir` was given something other than a directory.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The path.
        path: PathBuf,
    },
    /// The file changed size while it was being imported; import it again once it is written.
    #[error("{path} changed while it was being imported")]
    Changed {
        /// The file.
        path: PathBuf,
    },
    /// The file is over [`MAX_BLOB_SIZE`](crate::MAX_BLOB_SIZE).
    #[error("{what} is {size} bytes, over the store's limit of {limit} bytes per file")]
    TooLarge {
        /// The file, or "the data" for bytes.
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A file name under the imported directory is not valid UTF-8, so it cannot be named in
    /// a manifest that every peer can materialize.
    #[error("file name of {path} is not valid UTF-8; rename it")]
    NotUtf8 {
        /// The path.
        path: PathBuf,
    },
    /// The imported directory nests deeper than [`MAX_DIR_DEPTH`](crate::MAX_DIR_DEPTH).
    #[error("{path} is nested more than {limit} directories deep")]
    TooDeep {
        /// The directory where the limit was reached.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// The imported directory holds more than
    /// [`MAX_MANIFEST_ENTRIES`](crate::MAX_MANIFEST_ENTRIES) files, or their list is over
    /// [`MAX_MANIFEST_BYTES`](crate::MAX_MANIFEST_BYTES).
    #[error(
        "{dir} holds too many files for one manifest (limit {limit_entries} files, {limit_bytes} bytes)"
    )]
    TooManyFiles {
        /// The directory.
        dir: PathBuf,
        /// The entry limit.
        limit_entries: usize,
        /// The byte limit.
        limit_bytes: usize,
    },
    /// The directory's files would make a manifest other peers cannot materialize (two names
    /// that differ only in case, a name with a backslash, …).
    #[error(transparent)]
    Invalid(#[from] InvalidManifest),
    /// The quota cannot make room even after evicting every unpinned blob.
    #[error(
        "blob store quota exceeded: {needed} bytes are needed, the quota is {quota} bytes and \
         {pinned} bytes are pinned by jobs or held by downloads; raise the quota or unpin jobs"
    )]
    QuotaExceeded {
        /// Bytes the import needs.
        needed: u64,
        /// The quota.
        quota: u64,
        /// Bytes that cannot be evicted.
        pinned: u64,
    },
    /// The disk holding the store is full.
    #[error("the disk holding the blob store {dir} is full")]
    DiskFull {
        /// The store directory.
        dir: PathBuf,
    },
    /// Writing into the store failed for another reason.
    #[error("cannot write into the blob store at {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The store's tables could not be updated.
    #[error("blob store database failed")]
    Database(#[source] redb::Error),
}

/// Why [`Store::valid_ranges`](crate::Store::valid_ranges) or
/// [`Store::encode`](crate::Store::encode) failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The store holds no part of this blob.
    #[error("blob {hash} is not in the store")]
    NotFound {
        /// The blob.
        hash: BlobHash,
    },
    /// The store holds only part of this blob, and not all of the requested ranges.
    #[error("only part of blob {hash} is here; missing of the requested ranges: {missing:?}")]
    NotAvailable {
        /// The blob.
        hash: BlobHash,
        /// Requested chunk ranges the store does not have.
        missing: ChunkRanges,
    },
    /// The blob's bytes on disk do not match its hash. The store has already forgotten the
    /// bad ranges (a complete blob became a partial), so they are not served again.
    #[error("blob {hash} is corrupt on disk: {detail}")]
    Corrupt {
        /// The blob.
        hash: BlobHash,
        /// What did not match.
        detail: String,
    },
    /// Writing the encoding to the output failed (the peer went away).
    #[error("cannot send blob {hash}")]
    Output {
        /// The blob.
        hash: BlobHash,
        /// The output's reason.
        source: io::Error,
    },
    /// Reading the blob from disk failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
}

/// Why starting, writing or finishing a download ([`Partial`](crate::Partial)) failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The blob is already complete in the store.
    #[error("blob {hash} is already complete in the store")]
    AlreadyComplete {
        /// The blob.
        hash: BlobHash,
    },
    /// Another [`Partial`](crate::Partial) of this blob is alive; share that one instead.
    #[error("blob {hash} is already being downloaded")]
    Busy {
        /// The blob.
        hash: BlobHash,
    },
    /// A download of this blob exists with another size: one of the two sizes is wrong.
    #[error("blob {hash} is being downloaded as {known} bytes, not {claimed}")]
    SizeMismatch {
        /// The blob.
        hash: BlobHash,
        /// The size of the download on disk.
        known: u64,
        /// The size asked for now.
        claimed: u64,
    },
    /// The size cannot be that of this hash (only the empty blob has 0 bytes).
    #[error("blob {hash} cannot be {size} bytes long")]
    WrongSize {
        /// The blob.
        hash: BlobHash,
        /// The claimed size.
        size: u64,
    },
    /// The claimed size is over [`MAX_BLOB_SIZE`](crate::MAX_BLOB_SIZE).
    #[error("blob {hash} of {size} bytes is over the store's limit of {limit} bytes")]
    TooLarge {
        /// The blob.
        hash: BlobHash,
        /// The claimed size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The encoded stream did not verify against the blob's hash: the provider sent bad data.
    /// Only the chunk groups before the bad one were written.
    #[error("blob {hash}: the provider sent data that does not match the hash ({detail})")]
    Corrupt {
        /// The blob.
        hash: BlobHash,
        /// What did not match.
        detail: String,
    },
    /// The encoded stream ended before the requested ranges did.
    #[error("blob {hash}: the provider's stream ended early")]
    Truncated {
        /// The blob.
        hash: BlobHash,
    },
    /// Reading the encoded stream failed.
    #[error("blob {hash}: cannot read from the provider")]
    Input {
        /// The blob.
        hash: BlobHash,
        /// The reader's reason.
        source: io::Error,
    },
    /// `finish` was called while parts of the blob are still missing.
    #[error("blob {hash} is incomplete: {missing_bytes} bytes are missing")]
    Incomplete {
        /// The blob.
        hash: BlobHash,
        /// Bytes still missing.
        missing_bytes: u64,
    },
    /// The download was removed from the store while this writer was alive (the blob was
    /// imported complete meanwhile, or its files vanished).
    #[error("the download of blob {hash} was removed from the store")]
    Gone {
        /// The blob.
        hash: BlobHash,
    },
    /// The quota cannot make room even after evicting every unpinned blob.
    #[error(
        "blob store quota exceeded: {needed} bytes are needed, the quota is {quota} bytes and \
         {pinned} bytes are pinned by jobs or held by downloads; raise the quota or unpin jobs"
    )]
    QuotaExceeded {
        /// Bytes the download needs.
        needed: u64,
        /// The quota.
        quota: u64,
        /// Bytes that cannot be evicted.
        pinned: u64,
    },
    /// The disk holding the store is full.
    #[error("the disk holding the blob store {dir} is full")]
    DiskFull {
        /// The store directory.
        dir: PathBuf,
    },
    /// Another file-system failure.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
    /// The store's tables could not be updated.
    #[error("blob store database failed")]
    Database(#[source] redb::Error),
}

/// Why [`Store::read_manifest`](crate::Store::read_manifest) or
/// [`Manifest::from_bytes`](crate::Manifest::from_bytes) failed.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest blob is not (completely) in the store.
    #[error("manifest {hash} is not in the store")]
    NotFound {
        /// The manifest's hash.
        hash: BlobHash,
    },
    /// The manifest is over [`MAX_MANIFEST_BYTES`](crate::MAX_MANIFEST_BYTES).
    #[error("manifest of {size} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: usize,
    },
    /// The manifest blob does not decode.
    #[error("manifest is malformed")]
    Malformed(#[source] blendnet_proto::DecodeError),
    /// The manifest decodes but names a path no peer may write.
    #[error(transparent)]
    Invalid(#[from] InvalidManifest),
    /// The manifest blob's bytes on disk do not match its hash; the store has forgotten it.
    #[error("manifest {hash} is corrupt on disk")]
    Corrupt {
        /// The manifest's hash.
        hash: BlobHash,
    },
    /// Reading the manifest blob failed.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
}

/// Why [`Store::materialize`](crate::Store::materialize) failed. Files placed before the
/// failure stay in the destination.
#[derive(Debug, thiserror::Error)]
pub enum MaterializeError {
    /// The manifest names a path no peer may write.
    #[error(transparent)]
    Invalid(#[from] InvalidManifest),
    /// A blob the manifest needs is not complete in the store; nothing was written.
    #[error("blob {hash} for {path:?} is not in the store ({others} other files are missing too)")]
    Missing {
        /// The manifest path.
        path: String,
        /// The blob.
        hash: BlobHash,
        /// How many other entries miss their blob.
        others: usize,
    },
    /// The manifest's size for a file differs from the blob's: the manifest is wrong.
    #[error("{path:?} is {manifest} bytes in the manifest, but blob {hash} has {stored}")]
    SizeMismatch {
        /// The manifest path.
        path: String,
        /// The blob.
        hash: BlobHash,
        /// The size the manifest says.
        manifest: u64,
        /// The blob's size.
        stored: u64,
    },
    /// Something in the destination is in the way: a file or a symlink where a directory
    /// must be, or a directory where a file must be. Nothing is written through a symlink.
    #[error(
        "{path} is in the way of materializing (a symlink, or a file where a directory must be, or the reverse)"
    )]
    Obstructed {
        /// The path in the destination.
        path: PathBuf,
    },
    /// The disk holding the destination is full.
    #[error("the disk holding {dir} is full")]
    DiskFull {
        /// The destination.
        dir: PathBuf,
    },
    /// Another file-system failure in the destination.
    #[error("cannot write {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The file system's reason.
        source: io::Error,
    },
}

/// Why [`Store::pin`](crate::Store::pin) or [`Store::unpin`](crate::Store::unpin) failed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The pin name is empty or over [`MAX_PIN_NAME_BYTES`](crate::MAX_PIN_NAME_BYTES).
    #[error("pin name {name:?} is empty or longer than {limit} bytes")]
    BadName {
        /// The name.
        name: String,
        /// The limit.
        limit: usize,
    },
    /// The pin could not be stored.
    #[error("blob store database failed")]
    Database(#[source] redb::Error),
}

/// Why [`Store::gc`](crate::Store::gc) failed. Files already deleted stay deleted and the
/// store stays consistent.
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// The store's tables could not be updated.
    #[error("blob store database failed")]
    Database(#[source] redb::Error),
}
