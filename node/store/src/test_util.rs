//! Helpers for the store's tests: a store on a temporary directory and database, and
//! deterministic test data.

use std::sync::Arc;

use crate::Store;

/// A store in a temporary directory with its own database file.
pub(crate) struct TestStore {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) store: Store,
}

impl TestStore {
    pub(crate) fn new(quota: Option<u64>) -> TestStore {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, quota);
        TestStore { dir, store }
    }

    /// Drops the store (and with it the database: hold no other clone) and opens both again.
    pub(crate) fn reopen(self, quota: Option<u64>) -> TestStore {
        let TestStore { dir, store } = self;
        drop(store);
        let store = open(&dir, quota);
        TestStore { dir, store }
    }
}

fn open(dir: &tempfile::TempDir, quota: Option<u64>) -> Store {
    let db = redb::Database::create(dir.path().join("state.redb")).unwrap();
    Store::open(&dir.path().join("store"), Arc::new(db), quota).unwrap()
}

/// `len` bytes of deterministic, incompressible-looking data; `seed` tells sets apart.
pub(crate) fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(len);
    out
}
