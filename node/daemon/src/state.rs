//! The node's durable state: one redb database, `<data dir>/state.redb`.
//!
//! Everything the node must not lose across a crash or restart (roster, jobs, events, pinned
//! blobs, known peers) goes through [`State`]; blobs themselves are files (DESIGN §3). The
//! database is generic over serde values so this module does not depend on the types of the
//! crates that own them:
//!
//! | table | key | value |
//! |---|---|---|
//! | `meta` | a name chosen by the owner of the value (`"roster"`, `"jobs/<id>"`, …) | JSON |
//! | `peers` | a peer id (base58 text) | JSON |
//!
//! Values are encoded with `serde_json`: they are small (a roster, a job record), JSON keeps the
//! file inspectable with any redb tool while the project is young, and it tolerates fields being
//! added to a struct (with `#[serde(default)]`) without a migration. If a value ever becomes
//! large or hot, that key can move to a binary encoding on its own.
//!
//! Every write ([`State::put`], [`State::delete`], …) is one committed write transaction with
//! redb's default immediate durability: when it returns `Ok`, the change survives a crash, so
//! a caller can announce a change right after storing it (DESIGN §11).
//!
//! redb takes an exclusive file lock, so a second daemon on the same data directory fails to
//! open it with [`StateError::Locked`]. Every method blocks on disk I/O (a write waits for an
//! fsync): async code calls them from a blocking thread or from an actor that owns the
//! `State`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::data_dir::DataDir;

/// Table of named values owned by other modules (roster, jobs, …).
const META: &str = "meta";

/// Table of known peers, by peer id.
const PEERS: &str = "peers";

/// Both tables map text keys to JSON bytes.
type Table = TableDefinition<'static, &'static str, &'static [u8]>;

fn definition(name: &'static str) -> Table {
    TableDefinition::new(name)
}

/// The node's durable key-value state. `Send + Sync`; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct State {
    db: Arc<redb::Database>,
    path: PathBuf,
}

/// Why a state operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Another process (a running daemon) holds the database.
    #[error(
        "the data directory is in use by a running blendnet daemon ({path} is locked); stop it \
         or use another --data-dir"
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// The database could not be opened or created.
    #[error("cannot open state database {path}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// redb's reason.
        source: redb::DatabaseError,
    },
    /// A read or write failed in redb (I/O, corruption of the file itself).
    #[error("state database {path}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// redb's reason.
        source: redb::Error,
    },
    /// A value could not be encoded.
    #[error("cannot encode state value `{table}/{key}`")]
    Encode {
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// serde's reason.
        source: serde_json::Error,
    },
    /// A stored value does not decode as the requested type: written by another version, or
    /// corrupt.
    #[error("stored value `{table}/{key}` in {path} is corrupt or of another version")]
    Decode {
        /// The database file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// serde's reason.
        source: serde_json::Error,
    },
}

impl State {
    /// Opens (or creates) `<data dir>/state.redb`. Blocking.
    pub fn open(data_dir: &DataDir) -> Result<Self, StateError> {
        Self::open_path(&data_dir.state_db())
    }

    /// Opens (or creates) the database at `path`. Blocking.
    pub fn open_path(path: &Path) -> Result<Self, StateError> {
        let db = redb::Database::create(path).map_err(|source| match source {
            redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked {
                path: path.to_owned(),
            },
            source => StateError::Open {
                path: path.to_owned(),
                source,
            },
        })?;
        let state = Self {
            db: Arc::new(db),
            path: path.to_owned(),
        };
        // Create both tables now so that reads never meet a missing table.
        state.write(|txn| {
            txn.open_table(definition(META))?;
            txn.open_table(definition(PEERS))?;
            Ok(())
        })?;
        Ok(state)
    }

    /// The database itself, for other owners of tables in it (the blob store): one database
    /// per node, so one commit order and one lock.
    pub fn database(&self) -> Arc<redb::Database> {
        self.db.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the value stored under `key`, or `None`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StateError> {
        self.get_in(META, key)
    }

    /// Stores `value` under `key`, durably.
    pub fn put<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<(), StateError> {
        self.put_in(META, key, value)
    }

    /// Removes `key`; returns whether it was there. Durable.
    pub fn delete(&self, key: &str) -> Result<bool, StateError> {
        self.delete_in(META, key)
    }

    /// Reads what is stored about `peer`.
    pub fn get_peer<T: DeserializeOwned>(&self, peer: &str) -> Result<Option<T>, StateError> {
        self.get_in(PEERS, peer)
    }

    /// Stores what is known about `peer`, durably.
    pub fn put_peer<T: Serialize + ?Sized>(&self, peer: &str, value: &T) -> Result<(), StateError> {
        self.put_in(PEERS, peer, value)
    }

    /// Forgets `peer`; returns whether it was known. Durable.
    pub fn remove_peer(&self, peer: &str) -> Result<bool, StateError> {
        self.delete_in(PEERS, peer)
    }

    /// Every known peer with its value, in peer id order. Fails on the first value that does
    /// not decode, naming it.
    pub fn all_peers<T: DeserializeOwned>(&self) -> Result<Vec<(String, T)>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let opened = txn
            .open_table(definition(PEERS))
            .map_err(|e| self.db_err(e))?;
        let mut peers = Vec::new();
        for entry in opened.iter().map_err(|e| self.db_err(e))? {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            let key = key.value().to_owned();
            let value = self.decode(PEERS, &key, value.value())?;
            peers.push((key, value));
        }
        Ok(peers)
    }

    fn get_in<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &str,
    ) -> Result<Option<T>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let opened = txn
            .open_table(definition(table))
            .map_err(|e| self.db_err(e))?;
        let Some(bytes) = opened.get(key).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        self.decode(table, key, bytes.value()).map(Some)
    }

    fn put_in<T: Serialize + ?Sized>(
        &self,
        table: &'static str,
        key: &str,
        value: &T,
    ) -> Result<(), StateError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StateError::Encode {
            table,
            key: key.to_owned(),
            source,
        })?;
        self.write(|txn| {
            txn.open_table(definition(table))?
                .insert(key, bytes.as_slice())?;
            Ok(())
        })
    }

    fn delete_in(&self, table: &'static str, key: &str) -> Result<bool, StateError> {
        self.write(|txn| Ok(txn.open_table(definition(table))?.remove(key)?.is_some()))
    }

    /// Runs `f` in one write transaction and commits it (durably).
    fn write<R>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<R, redb::Error>,
    ) -> Result<R, StateError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        // On error the transaction is dropped, which aborts it.
        let result = f(&txn).map_err(|e| self.db_err(e))?;
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(result)
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StateError> {
        serde_json::from_slice(bytes).map_err(|source| StateError::Decode {
            path: self.path.clone(),
            table,
            key: key.to_owned(),
            source,
        })
    }

    fn db_err(&self, source: impl Into<redb::Error>) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            source: source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Peer {
        addrs: Vec<String>,
        admitted: bool,
    }

    fn open() -> (tempfile::TempDir, DataDir, State) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path().join("node")).unwrap();
        let state = State::open(&dir).unwrap();
        (tmp, dir, state)
    }

    #[test]
    fn put_get_delete() {
        let (_tmp, _dir, state) = open();
        assert_eq!(state.get::<u64>("epoch").unwrap(), None);
        state.put("epoch", &7u64).unwrap();
        assert_eq!(state.get::<u64>("epoch").unwrap(), Some(7));
        state.put("epoch", &8u64).unwrap();
        assert_eq!(state.get::<u64>("epoch").unwrap(), Some(8));
        assert!(state.delete("epoch").unwrap());
        assert!(!state.delete("epoch").unwrap());
        assert_eq!(state.get::<u64>("epoch").unwrap(), None);
    }

    #[test]
    fn values_survive_reopen() {
        let (_tmp, dir, state) = open();
        let peer = Peer {
            addrs: vec!["/ip4/10.0.0.1/tcp/7741".into()],
            admitted: true,
        };
        state.put("roster", &vec!["a", "b"]).unwrap();
        state.put_peer("12D3KooWA", &peer).unwrap();
        drop(state);
        let state = State::open(&dir).unwrap();
        assert_eq!(
            state.get::<Vec<String>>("roster").unwrap(),
            Some(vec!["a".to_owned(), "b".to_owned()])
        );
        assert_eq!(state.get_peer::<Peer>("12D3KooWA").unwrap(), Some(peer));
    }

    #[test]
    fn peers_are_separate_from_meta() {
        let (_tmp, _dir, state) = open();
        let p = |n| Peer {
            addrs: vec![],
            admitted: n,
        };
        state.put_peer("b", &p(false)).unwrap();
        state.put_peer("a", &p(true)).unwrap();
        state.put("a", &"meta value").unwrap();
        assert_eq!(
            state.all_peers::<Peer>().unwrap(),
            vec![("a".to_owned(), p(true)), ("b".to_owned(), p(false))]
        );
        assert!(state.remove_peer("a").unwrap());
        assert_eq!(state.get_peer::<Peer>("a").unwrap(), None);
        assert_eq!(
            state.get::<String>("a").unwrap().as_deref(),
            Some("meta value")
        );
        assert_eq!(state.all_peers::<Peer>().unwrap().len(), 1);
    }

    #[test]
    fn corrupt_value_names_key() {
        let (_tmp, _dir, state) = open();
        state.put("jobs/42", &"not a number").unwrap();
        let err = state.get::<u64>("jobs/42").unwrap_err();
        assert!(matches!(err, StateError::Decode { ref key, .. } if key == "jobs/42"));
        assert!(err.to_string().contains("meta/jobs/42"), "{err}");

        state.put_peer("bad", &1u8).unwrap();
        let err = state.all_peers::<Peer>().unwrap_err();
        assert!(err.to_string().contains("peers/bad"), "{err}");
    }

    #[test]
    fn second_open_is_locked() {
        let (_tmp, dir, _state) = open();
        let err = State::open(&dir).unwrap_err();
        assert!(matches!(err, StateError::Locked { .. }), "{err:?}");
        assert!(
            err.to_string()
                .contains("in use by a running blendnet daemon"),
            "{err}"
        );
    }

    #[test]
    fn garbage_file_is_an_open_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::open(tmp.path()).unwrap();
        std::fs::write(dir.state_db(), vec![0xAB; 4096]).unwrap();
        let err = State::open(&dir).unwrap_err();
        assert!(
            matches!(err, StateError::Open { .. } | StateError::Db { .. }),
            "{err:?}"
        );
    }
}
