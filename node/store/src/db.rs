//! The store's tables in the caller's redb database, and the one way they are written.
//!
//! | table | key | value |
//! |---|---|---|
//! | `store_blobs` | blob hash (32 bytes) | `(size, last used in Unix ms)` |
//! | `store_partials` | blob hash | `(size, last touched in Unix ms)` |
//! | `store_pins` (multimap) | blob hash | pin name (`&str`, e.g. a job id) |
//!
//! The tables are the truth about which blobs are complete; the files under `blobs/` and
//! `partial/` follow them, and `Store::open` reconciles the two after a crash. Names start
//! with `store_` because the daemon keeps one database for everything.

use redb::{MultimapTableDefinition, TableDefinition, WriteTransaction};

/// Complete blobs: hash → (size, last used in Unix ms).
pub(crate) const BLOBS: TableDefinition<'static, [u8; 32], (u64, u64)> =
    TableDefinition::new("store_blobs");

/// Downloads in progress: hash → (size, last touched in Unix ms).
pub(crate) const PARTIALS: TableDefinition<'static, [u8; 32], (u64, u64)> =
    TableDefinition::new("store_partials");

/// Pins: hash ⇉ names of who needs the blob.
pub(crate) const PINS: MultimapTableDefinition<'static, [u8; 32], &'static str> =
    MultimapTableDefinition::new("store_pins");

/// Runs `f` in one write transaction and commits it with redb's default (immediate)
/// durability. On error nothing is committed.
pub(crate) fn write<R>(
    db: &redb::Database,
    f: impl FnOnce(&WriteTransaction) -> Result<R, redb::Error>,
) -> Result<R, redb::Error> {
    let txn = db.begin_write()?;
    let result = f(&txn)?;
    txn.commit()?;
    Ok(result)
}
