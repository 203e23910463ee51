//! The node's blob store wired to the network: it serves blob streams to members and carries
//! out `blendnet store add | get | ls | gc`.
//!
//! ```text
//!  Streams::incoming ──(peer, stream)──▶ serve task (bounded per peer and in all) ──▶ Store
//!  API store/get ──▶ Blobs::get ──▶ transfer::fetch (several providers) ──▶ Store ──▶ materialize
//!  imports, fetches ──HaveEntry──▶ announcer (batched every HAVE_INTERVAL) ──gossip `have`──▶
//!  peers' holders maps ──▶ NetDialer::hinted: who to ask first, and often
//! ```

use crate::api::{ApiError, StoreAddView, StoreGcView, StoreGetView};
use blendnet_net::{Net, PeerId, Stream, Streams};
use blendnet_proto::wire::{Have, HaveEntry, MAX_GOSSIP_BYTES, MAX_HAVE_ENTRIES};
use blendnet_proto::{BLOB_PROTOCOL, BlobHash, Topic};
use blendnet_store::Store;
use blendnet_store::manifest::{Manifest, ManifestEntry};
use blendnet_store::transfer::{self, Dialer, Progress};
use futures::StreamExt;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// Blob answers sent at once, in all: each holds up to a few MiB while it is written. More
/// requests wait their turn (see [`transfer::serve`]).
pub const MAX_SENDING: usize = 32;
/// Blob streams open at once from one peer, waiting or being answered; more are dropped. A
/// fetch keeps [`transfer::MAX_IN_FLIGHT_PER_PROVIDER`] requests in flight, and a manifest
/// fetches [`BLOBS_AT_ONCE`] blobs at once, with room for questions besides.
pub const MAX_STREAMS_PER_PEER: usize =
    transfer::MAX_IN_FLIGHT_PER_PROVIDER * BLOBS_AT_ONCE + 2 * BLOBS_AT_ONCE;
/// Blob streams open at once, in all; more are dropped. A waiting stream holds no data.
pub const MAX_STREAMS: usize = 512;
/// Blobs of one manifest fetched at once: enough to hide round trips for many small files,
/// few enough that one large file still gets most of the bandwidth.
pub const BLOBS_AT_ONCE: usize = 4;
/// How often what this node newly holds is announced on the `have` topic: often enough that
/// fellow fetchers find each other within a second, rarely enough to batch a burst of imports.
pub const HAVE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Announcements waiting for the announcer; past this a burst's extra entries are dropped
/// (announcements are hints: fetchers still ask members directly).
pub const HAVE_QUEUE: usize = 4096;
/// Blobs whose announced holders are remembered; past this the map starts over (memory bound).
pub const MAX_KNOWN_BLOBS: usize = 100_000;
/// The pin that keeps what `store add` imported from `store gc`.
pub const ADDED_PIN: &str = "store-add";

/// Who announced holding (or fetching) which blob. Never held across an await.
type Holders = Arc<Mutex<HashMap<BlobHash, BTreeSet<PeerId>>>>;

/// Opens blob streams through the network layer; hints from `have` announcements.
struct NetDialer {
    streams: Streams,
    holders: Holders,
    /// Only this peer (`store get --from`): the `have` hints are not followed.
    only: Option<PeerId>,
}

impl Dialer for NetDialer {
    type Stream = Stream;
    fn open(&self, peer: PeerId) -> BoxFuture<'static, std::io::Result<Stream>> {
        let streams = self.streams.clone();
        Box::pin(async move { streams.open(peer, BLOB_PROTOCOL).await })
    }

    fn hinted(&self, hash: &BlobHash) -> Vec<PeerId> {
        match self.only {
            Some(_) => Vec::new(),
            None => member_holders(&self.holders, &self.streams, hash),
        }
    }
}

/// Members (in good standing now) announced to hold or fetch `hash`.
fn member_holders(holders: &Holders, streams: &Streams, hash: &BlobHash) -> Vec<PeerId> {
    let members = streams.members();
    holders
        .lock()
        .map(|h| {
            h.get(hash)
                .map(|peers| {
                    peers
                        .iter()
                        .filter(|p| members.contains(p))
                        .copied()
                        .collect()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

/// How many blob streams are served at once, in all and per peer.
struct StreamLimits {
    all: Arc<Semaphore>,
    per_peer: HashMap<PeerId, Arc<Semaphore>>,
    max_per_peer: usize,
}

impl StreamLimits {
    fn new(max: usize, max_per_peer: usize) -> StreamLimits {
        StreamLimits {
            all: Arc::new(Semaphore::new(max)),
            per_peer: HashMap::new(),
            max_per_peer,
        }
    }

    /// Room for one more stream from `peer`, held until dropped; `None` past either limit.
    fn admit(&mut self, peer: PeerId) -> Option<impl Send + 'static> {
        if !self.per_peer.contains_key(&peer) {
            // Forget peers with no stream open, so that the map does not keep every peer
            // ever seen (cloud instances come and go) for the daemon's lifetime.
            let max = self.max_per_peer;
            self.per_peer.retain(|_, s| s.available_permits() < max);
        }
        let mine = self
            .per_peer
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.max_per_peer)))
            .clone();
        Some((
            self.all.clone().try_acquire_owned().ok()?,
            mine.try_acquire_owned().ok()?,
        ))
    }
}

/// The store and the streams, shared by the API and the serve loop.
#[derive(Clone)]
pub struct Blobs {
    store: Store,
    streams: Streams,
    seed: u64,
    /// Progress of running fetches by blob, for `store get` progress bars. Never held across
    /// an await.
    progress: Arc<Mutex<BTreeMap<BlobHash, Progress>>>,
    holders: Holders,
    announce: tokio::sync::mpsc::Sender<HaveEntry>,
    /// Blob payload bytes exchanged with each peer since the daemon started.
    traffic: Arc<Mutex<HashMap<PeerId, Traffic>>>,
}

/// Blob payload bytes exchanged with one peer: verified bytes fetched from it, and bytes
/// served to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
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
    /// Also starts the announcer, which first announces every complete blob held.
    pub fn new(store: Store, streams: Streams, net: Net, seed: u64) -> Blobs {
        let (announce, queue) = tokio::sync::mpsc::channel(HAVE_QUEUE);
        let held: Vec<HaveEntry> = store
            .list()
            .into_iter()
            .filter(|b| b.complete)
            .map(|b| HaveEntry {
                hash: b.hash,
                size: b.size,
                complete: true,
            })
            .collect();
        tokio::spawn(announcer(net, queue, held));
        Blobs {
            store,
            streams,
            seed,
            progress: Arc::default(),
            holders: Arc::default(),
            announce,
            traffic: Arc::default(),
        }
    }

    fn dialer(&self, only: Option<PeerId>) -> Arc<NetDialer> {
        Arc::new(NetDialer {
            streams: self.streams.clone(),
            holders: self.holders.clone(),
            only,
        })
    }

    /// Queues an announcement; a full queue drops it (announcements are hints).
    fn announce(&self, hash: BlobHash, size: u64, complete: bool) {
        let _ = self.announce.try_send(HaveEntry {
            hash,
            size,
            complete,
        });
    }

    /// Records a `have` announcement from `source` (already checked by the network layer to be
    /// a member). A malformed one is logged and ignored.
    pub fn on_have(&self, source: PeerId, data: &[u8]) {
        let have: Have = match blendnet_proto::decode(data, MAX_GOSSIP_BYTES) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%source, error = %e, "malformed have announcement");
                return;
            }
        };
        let Ok(mut holders) = self.holders.lock() else {
            return;
        };
        if holders.len() >= MAX_KNOWN_BLOBS {
            holders.clear();
        }
        for entry in have.blobs.iter().take(MAX_HAVE_ENTRIES) {
            holders.entry(entry.hash).or_default().insert(source);
        }
    }

    /// Members announced to hold or fetch `hash`.
    pub fn holders(&self, hash: &BlobHash) -> Vec<PeerId> {
        member_holders(&self.holders, &self.streams, hash)
    }

    /// Serves inbound blob streams until the network stops.
    pub fn spawn_server(
        &self,
    ) -> Result<tokio::task::JoinHandle<()>, blendnet_net::AlreadyAccepting> {
        let mut incoming = self.streams.incoming(BLOB_PROTOCOL)?;
        let store = self.store.clone();
        let seeding = Arc::new(transfer::Seeding::default());
        let traffic = self.traffic.clone();
        Ok(tokio::spawn(async move {
            let senders = Arc::new(Semaphore::new(MAX_SENDING));
            let mut limits = StreamLimits::new(MAX_STREAMS, MAX_STREAMS_PER_PEER);
            while let Some((peer, stream)) = incoming.next().await {
                let Some(held) = limits.admit(peer) else {
                    tracing::debug!(%peer, "too many blob streams: one dropped");
                    continue;
                };
                let (store, seeding, traffic) = (store.clone(), seeding.clone(), traffic.clone());
                let senders = senders.clone();
                tokio::spawn(async move {
                    match transfer::serve(store, &seeding, &senders, peer, stream).await {
                        Ok(served) => {
                            if let Ok(mut map) = traffic.lock() {
                                map.entry(peer).or_default().bytes_out += served.bytes;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "blob stream ended with an error")
                        }
                    }
                    drop(held);
                });
            }
        }))
    }

    /// Imports files and directories as one manifest: one directory alone keeps its own
    /// layout; otherwise each file by its name and each directory under its name.
    pub async fn add(&self, paths: Vec<PathBuf>) -> Result<StoreAddView, ApiError> {
        self.add_named(paths, Vec::new()).await
    }

    /// [`Blobs::add`], with files under names of the caller's choosing besides (relative
    /// paths in the manifest, checked like every manifest path).
    pub async fn add_named(
        &self,
        paths: Vec<PathBuf>,
        named: Vec<(PathBuf, String)>,
    ) -> Result<StoreAddView, ApiError> {
        if paths.is_empty() && named.is_empty() {
            return Err(bad("name at least one file or directory"));
        }
        let store = self.store.clone();
        let added = blocking(move || {
            let mut entries: Vec<ManifestEntry> = Vec::new();
            for (path, name) in &named {
                let meta =
                    std::fs::metadata(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                if !meta.is_file() {
                    return Err(bad(format!("{} is not a file", path.display())));
                }
                let (hash, size) = store.import_file(path).map_err(bad)?;
                entries.push(ManifestEntry {
                    path: name.clone(),
                    hash,
                    size,
                    executable: is_executable(&meta),
                });
            }
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
            Ok((manifest, hash))
        })
        .await?;
        let (manifest, hash) = added;
        for e in &manifest.entries {
            self.announce(e.hash, e.size, true);
        }
        if let Some(info) = self.store.has(&hash) {
            self.announce(hash, info.size, true);
        }
        Ok(StoreAddView {
            hash: hash.to_string(),
            files: manifest.entries.len(),
            bytes: manifest.total_size(),
        })
    }

    /// Fetches a manifest and every blob it names, from `from` or from every member, then
    /// materializes it into `out`.
    pub async fn get(
        &self,
        hash: BlobHash,
        out: PathBuf,
        from: Option<PeerId>,
    ) -> Result<StoreGetView, ApiError> {
        let (manifest, view) = self.fetch(hash, from).await?;
        let store = self.store.clone();
        blocking(move || {
            std::fs::create_dir_all(&out).map_err(|e| bad(format!("{}: {e}", out.display())))?;
            store.materialize(&manifest, &out).map_err(bad)
        })
        .await?;
        Ok(view)
    }

    /// Fetches a manifest and every blob it names into the store, from `from` or from every
    /// member.
    pub async fn fetch(
        &self,
        hash: BlobHash,
        from: Option<PeerId>,
    ) -> Result<(Manifest, StoreGetView), ApiError> {
        let candidates: Vec<PeerId> = match from {
            Some(peer) => vec![peer],
            None => self.streams.members().iter().copied().collect(),
        };
        let dialer = self.dialer(from);
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
        Ok((manifest, view))
    }

    async fn fetch_one(
        &self,
        dialer: &Arc<NetDialer>,
        hash: BlobHash,
        candidates: &[PeerId],
    ) -> Result<transfer::FetchReport, ApiError> {
        let progress = self.progress.clone();
        let mut announced = false;
        let result = transfer::fetch(
            &self.store,
            dialer.clone(),
            hash,
            candidates,
            self.seed,
            |p| {
                if !announced {
                    // Fellow fetchers can take pieces from us from now on.
                    announced = true;
                    self.announce(hash, p.size, false);
                }
                if let Ok(mut map) = progress.lock() {
                    map.insert(hash, p);
                }
            },
        )
        .await;
        if let Ok(report) = &result {
            self.announce(hash, report.size, true);
            if let Ok(mut map) = self.traffic.lock() {
                for (peer, bytes) in &report.bytes_from {
                    map.entry(*peer).or_default().bytes_in += bytes;
                }
            }
        }
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

    /// Blob payload bytes exchanged with each peer since the daemon started.
    pub fn traffic(&self) -> HashMap<PeerId, Traffic> {
        self.traffic.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Running fetches: bytes done of each blob.
    pub fn progress(&self) -> Vec<(BlobHash, Progress)> {
        self.progress
            .lock()
            .map(|m| m.iter().map(|(h, p)| (*h, *p)).collect())
            .unwrap_or_default()
    }

    /// Every blob held, complete or not, with the members announced to hold it too.
    pub async fn list(&self) -> Result<serde_json::Value, ApiError> {
        let store = self.store.clone();
        let blobs = blocking(move || Ok(store.list())).await?;
        let list: Vec<serde_json::Value> = blobs
            .into_iter()
            .map(|b| {
                let holders: Vec<String> = self
                    .holders(&b.hash)
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                serde_json::json!({
                    "hash": b.hash.to_string(),
                    "size": b.size,
                    "complete": b.complete,
                    "pinned": b.pinned,
                    "holders": holders,
                })
            })
            .collect();
        Ok(serde_json::Value::Array(list))
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

/// Publishes what this node holds on the `have` topic, batched every [`HAVE_INTERVAL`], until
/// the queue's senders are gone. Announcements that find no subscribed peer are dropped.
async fn announcer(
    net: Net,
    mut queue: tokio::sync::mpsc::Receiver<HaveEntry>,
    held: Vec<HaveEntry>,
) {
    let mut pending: BTreeMap<BlobHash, HaveEntry> =
        held.into_iter().map(|e| (e.hash, e)).collect();
    let mut tick = tokio::time::interval(HAVE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            entry = queue.recv() => match entry {
                Some(e) => { pending.insert(e.hash, e); }
                None => return,
            },
            _ = tick.tick(), if !pending.is_empty() => {
                let batch: Vec<HaveEntry> = pending.values().take(MAX_HAVE_ENTRIES).copied().collect();
                for e in &batch {
                    pending.remove(&e.hash);
                }
                let data = blendnet_proto::encode(&Have { blobs: batch });
                match net.publish(Topic::Have, data).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "have announcement not sent"),
                    Err(_) => return,
                }
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_limits_hold_per_peer_and_in_all_and_forget_idle_peers() {
        let mut limits = StreamLimits::new(3, 2);
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let a1 = limits.admit(a).expect("first of a");
        let a2 = limits.admit(a).expect("second of a");
        assert!(
            limits.admit(a).is_none(),
            "a third stream of a is past its limit"
        );
        let b1 = limits.admit(b).expect("first of b");
        assert!(
            limits.admit(c).is_none(),
            "a fourth stream is past the limit in all"
        );
        drop(a1);
        let c1 = limits.admit(c).expect("room again once one ends");
        assert!(
            limits.admit(a).is_none(),
            "no room in all for a, which holds one"
        );
        drop((a2, b1, c1));
        // A new peer's first stream forgets those with none open.
        let d = limits.admit(PeerId::random()).expect("room for a new peer");
        assert_eq!(limits.per_peer.len(), 1, "idle peers are forgotten");
        drop(d);
    }
}
