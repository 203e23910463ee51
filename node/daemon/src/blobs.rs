//! The node's blob store wired to the network: it serves blob streams to members and carries
//! out `blendnet store add | get | ls | gc`.
//!
//! ```text
//!  BlobStreams::incoming ──(peer, stream)──▶ serve task (bounded per peer and in all) ──▶ Store
//!  API store/get ──▶ Blobs::get ──▶ transfer::fetch (several providers) ──▶ Store ──▶ materialize
//! ```

use crate::api::{ApiError, StoreAddView, StoreGcView, StoreGetView};
use blendnet_net::{BlobStream, BlobStreams, PeerId};
use blendnet_proto::BlobHash;
use blendnet_store::Store;
use blendnet_store::manifest::{Manifest, ManifestEntry};
use blendnet_store::transfer::{self, Dialer, Progress};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Blob streams served at once, in all: each holds up to a few MiB while it is written.
pub const MAX_SERVING: usize = 32;
/// Blob streams served at once to one peer: a fetcher keeps two in flight; a few more cover
/// availability questions and a second fetch.
pub const MAX_SERVING_PER_PEER: usize = 8;
/// Blobs of one manifest fetched at once: enough to hide round trips for many small files,
/// few enough that one large file still gets most of the bandwidth.
pub const BLOBS_AT_ONCE: usize = 4;
/// The pin that keeps what `store add` imported from `store gc`.
pub const ADDED_PIN: &str = "store-add";

/// Opens blob streams through the network layer.
struct NetDialer(BlobStreams);

impl Dialer for NetDialer {
    type Stream = BlobStream;
    fn open(&self, peer: PeerId) -> BoxFuture<'static, std::io::Result<BlobStream>> {
        let streams = self.0.clone();
        Box::pin(async move { streams.open(peer).await })
    }
}

/// The store and the streams, shared by the API and the serve loop.
#[derive(Clone)]
pub struct Blobs {
    store: Store,
    streams: BlobStreams,
    seed: u64,
    /// Progress of running fetches by blob, for `store get` progress bars. Never held across
    /// an await.
    progress: Arc<Mutex<BTreeMap<BlobHash, Progress>>>,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs").finish_non_exhaustive()
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn bad(e: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

impl Blobs {
    /// `seed` spreads the first pieces of fetchers that start together: derive it from the
    /// node's id.
    pub fn new(store: Store, streams: BlobStreams, seed: u64) -> Blobs {
        Blobs {
            store,
            streams,
            seed,
            progress: Arc::default(),
        }
    }

    /// Serves inbound blob streams until the network stops.
    pub fn spawn_server(
        &self,
    ) -> Result<tokio::task::JoinHandle<()>, blendnet_net::blobs::AlreadyAccepting> {
        let mut incoming = self.streams.incoming()?;
        let store = self.store.clone();
        let seeding = Arc::new(transfer::Seeding::default());
        Ok(tokio::spawn(async move {
            let all = Arc::new(Semaphore::new(MAX_SERVING));
            let mut per_peer: HashMap<PeerId, Arc<Semaphore>> = HashMap::new();
            while let Some((peer, stream)) = incoming.next().await {
                let peer_limit = per_peer
                    .entry(peer)
                    .or_insert_with(|| Arc::new(Semaphore::new(MAX_SERVING_PER_PEER)))
                    .clone();
                let (Ok(one), Ok(mine)) = (
                    all.clone().try_acquire_owned(),
                    peer_limit.try_acquire_owned(),
                ) else {
                    tracing::debug!(%peer, "too many blob streams: one dropped");
                    continue;
                };
                let (store, seeding) = (store.clone(), seeding.clone());
                tokio::spawn(async move {
                    if let Err(e) = transfer::serve(store, &seeding, peer, stream).await {
                        tracing::debug!(%peer, error = %e, "blob stream ended with an error");
                    }
                    drop((one, mine));
                });
            }
        }))
    }

    /// Imports files and directories as one manifest: one directory alone keeps its own
    /// layout; otherwise each file by its name and each directory under its name.
    pub async fn add(&self, paths: Vec<PathBuf>) -> Result<StoreAddView, ApiError> {
        if paths.is_empty() {
            return Err(bad("name at least one file or directory"));
        }
        let store = self.store.clone();
        blocking(move || {
            let mut entries: Vec<ManifestEntry> = Vec::new();
            let single_dir = paths.len() == 1 && paths[0].is_dir();
            for path in &paths {
                let meta =
                    std::fs::metadata(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| bad(format!("{} has no file name", path.display())))?;
                if meta.is_dir() {
                    let (_, manifest) = store.import_dir(path).map_err(bad)?;
                    for mut e in manifest.entries {
                        if !single_dir {
                            e.path = format!("{name}/{}", e.path);
                        }
                        entries.push(e);
                    }
                } else {
                    let (hash, size) = store.import_file(path).map_err(bad)?;
                    entries.push(ManifestEntry {
                        path: name,
                        hash,
                        size,
                        executable: is_executable(&meta),
                    });
                }
            }
            let manifest = Manifest { entries };
            manifest.validate().map_err(bad)?;
            let hash = store.import_bytes(&manifest.to_bytes()).map_err(bad)?;
            for h in manifest.entries.iter().map(|e| e.hash).chain([hash]) {
                store.pin(&h, ADDED_PIN).map_err(internal)?;
            }
            Ok(StoreAddView {
                hash: hash.to_string(),
                files: manifest.entries.len(),
                bytes: manifest.total_size(),
            })
        })
        .await
    }

    /// Fetches a manifest and every blob it names, from `from` or from every member, then
    /// materializes it into `out`.
    pub async fn get(
        &self,
        hash: BlobHash,
        out: PathBuf,
        from: Option<PeerId>,
    ) -> Result<StoreGetView, ApiError> {
        let candidates: Vec<PeerId> = match from {
            Some(peer) => vec![peer],
            None => self.streams.members().iter().copied().collect(),
        };
        let dialer = Arc::new(NetDialer(self.streams.clone()));
        let mut view = StoreGetView::default();
        let report = self.fetch_one(&dialer, hash, &candidates).await?;
        view.absorb(&report);
        let store = self.store.clone();
        let manifest = blocking(move || store.read_manifest(&hash).map_err(bad)).await?;
        // Each distinct blob once (two paths may hold the same bytes), a few at a time: a
        // scene of many small files is limited by round trips, not bandwidth.
        let distinct: BTreeSet<BlobHash> = manifest.entries.iter().map(|e| e.hash).collect();
        let mut fetches = futures::stream::iter(distinct)
            .map(|h| self.fetch_one(&dialer, h, &candidates))
            .buffer_unordered(BLOBS_AT_ONCE);
        while let Some(report) = fetches.next().await {
            view.absorb(&report?);
        }
        drop(fetches);
        view.files = manifest.entries.len();
        view.bytes = manifest.total_size();
        let store = self.store.clone();
        blocking(move || {
            std::fs::create_dir_all(&out).map_err(|e| bad(format!("{}: {e}", out.display())))?;
            store.materialize(&manifest, &out).map_err(bad)
        })
        .await?;
        Ok(view)
    }

    async fn fetch_one(
        &self,
        dialer: &Arc<NetDialer>,
        hash: BlobHash,
        candidates: &[PeerId],
    ) -> Result<transfer::FetchReport, ApiError> {
        let progress = self.progress.clone();
        let result = transfer::fetch(
            &self.store,
            dialer.clone(),
            hash,
            candidates,
            self.seed,
            |p| {
                if let Ok(mut map) = progress.lock() {
                    map.insert(hash, p);
                }
            },
        )
        .await;
        if let Ok(mut map) = self.progress.lock() {
            map.remove(&hash);
        }
        result.map_err(|e| match e {
            transfer::FetchError::NotFound(_) => ApiError::NotFound(e.to_string()),
            transfer::FetchError::NoProviders { .. } | transfer::FetchError::SizeMismatch(_) => {
                ApiError::Unavailable(e.to_string())
            }
            transfer::FetchError::Write(w) => ApiError::Conflict(w.to_string()),
            other => internal(other),
        })
    }

    /// Running fetches: bytes done of each blob.
    pub fn progress(&self) -> Vec<(BlobHash, Progress)> {
        self.progress
            .lock()
            .map(|m| m.iter().map(|(h, p)| (*h, *p)).collect())
            .unwrap_or_default()
    }

    /// Every blob held, complete or not.
    pub async fn list(&self) -> Result<serde_json::Value, ApiError> {
        let store = self.store.clone();
        blocking(move || {
            let list: Vec<serde_json::Value> = store
                .list()
                .into_iter()
                .map(|b| {
                    serde_json::json!({
                        "hash": b.hash.to_string(),
                        "size": b.size,
                        "complete": b.complete,
                        "pinned": b.pinned,
                    })
                })
                .collect();
            Ok(serde_json::Value::Array(list))
        })
        .await
    }

    /// Deletes unpinned blobs and abandoned downloads.
    pub async fn gc(&self) -> Result<StoreGcView, ApiError> {
        let store = self.store.clone();
        blocking(move || {
            Ok(StoreGcView {
                freed: store.gc().map_err(internal)?,
            })
        })
        .await
    }
}

#[cfg(unix)]
fn is_executable(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

#[cfg(not(unix))]
fn is_executable(_: &std::fs::Metadata) -> bool {
    false
}

/// The store's directory inside the data directory.
pub fn store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("store")
}
