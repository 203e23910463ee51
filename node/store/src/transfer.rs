//! Verified transfer of blobs between peers on the blob protocol (`/blendnet/blob/1`).
//!
//! One stream per request, half-duplex: the asker writes a length-prefixed bincode
//! [`BlobRequest`] and closes its side; the provider answers with a length-prefixed
//! [`BlobResponse`] header and, for `Data`, the bao encoding of the ranges until the stream
//! ends. Neither side ever writes while the other does (yamux can deadlock otherwise).
//!
//! [`serve`] answers one stream from the store. [`fetch`] takes a blob from several providers
//! at once: it asks each what it holds, then keeps a few piece requests in flight per provider,
//! choosing pieces with `core::picker` (rarest first, end-game duplicates). Every piece is
//! verified against the blob's hash before a byte of it is written; a provider that sends bad
//! data is dropped for the rest of the fetch. A fetch resumes from what is already verified on
//! disk, and what it has verified is served to others while it runs (by [`serve`]).
//!
//! The network side is abstracted as [`Dialer`], so this module needs no libp2p.

use crate::{Partial, ReadError, Store, WriteError};
use bao_tree::{ChunkNum, ChunkRanges};
use blendnet_core::picker::{Availability, Picker};
use blendnet_proto::frame::{read_frame, write_frame};
use blendnet_proto::wire::{
    BlobRequest, BlobResponse, MAX_BLOB_HEADER_BYTES, MAX_BLOB_RANGES, MAX_BLOB_REQUEST_BYTES,
};
use blendnet_proto::{BlobHash, PeerId};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// A piece: 256 chunk groups of 16 KiB = 4 MiB. Large enough that per-request overhead (a
/// stream, a buffer, a hop to a blocking thread) stays small: 1 MiB pieces fetched a 1 GiB
/// blob on loopback at 290 MiB/s, 4 MiB pieces at 367 MiB/s. Small enough that four fetchers
/// of a 256 MiB blob have 64 pieces to trade. Whole groups, since only whole groups are kept
/// across restarts.
pub const PIECE_GROUPS: u64 = 256;
/// Bytes of payload in a piece.
pub const PIECE_BYTES: u64 = PIECE_GROUPS * crate::GROUP_BYTES;
/// Most payload bytes one `Get` may ask for (fetchers ask for one piece): a provider refuses
/// more, so one request cannot make it buffer much.
pub const MAX_GET_BYTES: u64 = PIECE_BYTES;
/// Requests in flight per provider: enough to keep a link busy while answers are encoded on
/// one side and verified on the other.
pub const MAX_IN_FLIGHT_PER_PROVIDER: usize = 4;
/// How long one request may take before the provider counts as failing.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a fetch asks partial providers again what they hold (they are fetching too).
pub const AVAILABILITY_REFRESH: Duration = Duration::from_millis(100);
/// Peers that held nothing of the blob when last asked are asked again only every this many
/// [`AVAILABILITY_REFRESH`] ticks: most members are not fetching it at all.
pub const IDLE_PEER_REFRESH_TICKS: u64 = 10;
/// A fetch that verifies nothing new for this long gives up (it resumes when started again).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a seeder remembers that it sent a piece to one fetcher, and answers other fetchers
/// asking for it with "fetch it elsewhere": long enough for the first to pass it on, short
/// enough that a fetcher that vanished with it delays the others only briefly.
pub const SEED_WINDOW: Duration = Duration::from_secs(10);
/// Most pieces a seeder remembers sending (memory bound; past it, the oldest are forgotten).
pub const MAX_SEEDED: usize = 65_536;
/// Bytes an answer's buffer grows by when the answer is longer than expected.
const READ_CHUNK: usize = 64 * 1024;
/// Attempts at one request whose stream fails before an answer (see `exchange`).
pub const STREAM_ATTEMPTS: u32 = 4;
/// Pause before the first retry of a failed stream; the n-th waits n times as long.
pub const STREAM_RETRY_DELAY: Duration = Duration::from_millis(25);
/// Failed requests (not bad data) after which a provider is dropped from one fetch.
pub const MAX_FAILURES_PER_PROVIDER: u32 = 5;

/// The network side of a fetch: opens blob streams to peers, and says who announced holding
/// (or fetching) a blob. The network layer implements it.
pub trait Dialer: Send + Sync + 'static {
    /// The stream type.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Opens a stream to `peer`.
    fn open(&self, peer: PeerId) -> BoxFuture<'static, io::Result<Self::Stream>>;
    /// Peers that announced holding or fetching `hash` (the `have` gossip): asked first and
    /// often. None by default.
    fn hinted(&self, hash: &BlobHash) -> Vec<PeerId> {
        let _ = hash;
        Vec::new()
    }
}

/// Converts chunk ranges to the wire form, bounded to a blob of `size` bytes.
pub fn ranges_to_wire(ranges: &ChunkRanges, size: u64) -> Vec<(u64, u64)> {
    let bounded = ranges & &crate::all_chunks(size);
    // Bounded, the boundaries come in (start, end) pairs.
    bounded
        .boundaries()
        .chunks(2)
        .filter_map(|pair| match pair {
            [start, end] => Some((start.0, end.0)),
            _ => None,
        })
        .collect()
}

/// Why ranges from the wire are not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum BadRanges {
    #[error("more than {MAX_BLOB_RANGES} ranges")]
    TooMany,
    #[error("range {0}..{1} is empty, reversed or out of order")]
    Malformed(u64, u64),
}

/// Converts ranges from the wire, refusing malformed ones.
pub fn ranges_from_wire(ranges: &[(u64, u64)]) -> Result<ChunkRanges, BadRanges> {
    if ranges.len() > MAX_BLOB_RANGES {
        return Err(BadRanges::TooMany);
    }
    let mut out = ChunkRanges::empty();
    let mut last_end = 0;
    for &(start, end) in ranges {
        if start >= end || start < last_end {
            return Err(BadRanges::Malformed(start, end));
        }
        last_end = end;
        out |= ChunkRanges::from(ChunkNum(start)..ChunkNum(end));
    }
    Ok(out)
}

/// A blob and the ranges of one request.
type SentKey = (BlobHash, Vec<(u64, u64)>);

/// What a seeder sent recently, to whom: shared by the streams it serves. Sending each piece
/// of a complete blob once and letting the fetchers trade it keeps the seeder's upload (often
/// the artist's uplink) near one copy of the blob, however many peers fetch it.
#[derive(Debug, Default)]
pub struct Seeding {
    sent: std::sync::Mutex<std::collections::HashMap<SentKey, (PeerId, tokio::time::Instant)>>,
}

impl Seeding {
    /// The fetcher `peer` should get `ranges` of `hash` from, when it is not this seeder: the
    /// one they were sent to moments ago, unless `peer` insists or found that one empty.
    /// Records the send otherwise, so that the next asker is sent to `peer`.
    fn elsewhere(
        &self,
        hash: BlobHash,
        ranges: &[(u64, u64)],
        peer: PeerId,
        insist: bool,
        found_empty: Option<PeerId>,
    ) -> Option<PeerId> {
        let Ok(mut sent) = self.sent.lock() else {
            return None;
        };
        let now = tokio::time::Instant::now();
        if sent.len() >= MAX_SEEDED {
            sent.retain(|_, (_, at)| now.duration_since(*at) < SEED_WINDOW);
            if sent.len() >= MAX_SEEDED {
                sent.clear();
            }
        }
        let key = (hash, ranges.to_vec());
        match sent.get(&key) {
            Some((to, at))
                if !insist
                    && *to != peer
                    && found_empty != Some(*to)
                    && now.duration_since(*at) < SEED_WINDOW =>
            {
                Some(*to)
            }
            _ => {
                sent.insert(key, (peer, now));
                None
            }
        }
    }
}

/// What one served stream sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Served {
    /// Bytes of bao encoding written (payload and parent hashes).
    pub bytes: u64,
}

/// Why a stream could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the stream failed: {0}")]
    Io(#[from] io::Error),
    #[error("reading the blob failed: {0}")]
    Read(#[from] ReadError),
    #[error("the store's worker thread failed: {0}")]
    Join(String),
}

/// Answers one inbound stream from `peer` out of `store`. Cancel-safe (drops the stream).
///
/// Sending data takes one of `senders`' permits, waited for in turn (the semaphore is fair), so
/// a busy provider answers late rather than not at all: a dropped stream looks to the fetcher
/// like a provider gone, and a new fetcher whose question about the blob met only full slots
/// failed with "no peer holds blob". Questions (`Has`) take no permit.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    store: Store,
    seeding: &Seeding,
    senders: &Semaphore,
    peer: PeerId,
    mut stream: S,
) -> Result<Served, ServeError> {
    let request: BlobRequest = read_frame(&mut stream, MAX_BLOB_REQUEST_BYTES).await?;
    let mut _sending = None;
    let (header, body) = match request {
        BlobRequest::Has { hash } => (has_answer(&store, &hash).await?, Vec::new()),
        BlobRequest::Get {
            hash,
            ranges,
            insist,
            found_empty,
        } => {
            let complete = store.has(&hash).is_some_and(|i| i.complete);
            let elsewhere = complete
                .then(|| seeding.elsewhere(hash, &ranges, peer, insist, found_empty))
                .flatten();
            if let Some(to) = elsewhere {
                (BlobResponse::Elsewhere { to }, Vec::new())
            } else {
                // Held until the answer is written: the body is in memory until then.
                _sending = Some(senders.acquire().await.map_err(|_| {
                    io::Error::new(io::ErrorKind::Interrupted, "the provider is stopping")
                })?);
                get_answer(&store, &hash, &ranges).await?
            }
        }
    };
    write_frame(&mut stream, &header, MAX_BLOB_HEADER_BYTES).await?;
    stream.write_all(&body).await?;
    stream.close().await?;
    if !body.is_empty() {
        tracing::debug!(%peer, bytes = body.len(), "served blob ranges");
    }
    Ok(Served {
        bytes: body.len() as u64,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServeError::Join(e.to_string()))
}

async fn has_answer(store: &Store, hash: &BlobHash) -> Result<BlobResponse, ServeError> {
    let (store, hash) = (store.clone(), *hash);
    let answer = blocking(move || {
        let Some(info) = store.has(&hash) else {
            return Ok::<_, ReadError>(BlobResponse::NotFound);
        };
        let ranges = if info.complete {
            ranges_to_wire(&crate::all_chunks(info.size), info.size)
        } else {
            let mut wire = ranges_to_wire(&store.valid_ranges(&hash)?, info.size);
            wire.truncate(MAX_BLOB_RANGES);
            wire
        };
        Ok(BlobResponse::Has {
            size: info.size,
            complete: info.complete,
            ranges,
        })
    })
    .await??;
    Ok(answer)
}

async fn get_answer(
    store: &Store,
    hash: &BlobHash,
    wire: &[(u64, u64)],
) -> Result<(BlobResponse, Vec<u8>), ServeError> {
    let (store, hash, wire) = (store.clone(), *hash, wire.to_vec());
    let answer = blocking(move || {
        let Some(info) = store.has(&hash) else {
            return Ok::<_, ReadError>((BlobResponse::NotFound, Vec::new()));
        };
        let ranges = match ranges_from_wire(&wire) {
            Ok(r) => r,
            Err(e) => return Ok((BlobResponse::Refused(e.to_string()), Vec::new())),
        };
        if crate::ranges_bytes(&ranges, info.size) > MAX_GET_BYTES {
            return Ok((
                BlobResponse::Refused(format!("more than {MAX_GET_BYTES} bytes in one request")),
                Vec::new(),
            ));
        }
        if !info.complete && !ranges.is_subset(&store.valid_ranges(&hash)?) {
            return Ok((BlobResponse::Refused("ranges not held".into()), Vec::new()));
        }
        // Sized up front: growing a megabyte buffer by doubling copies it twice over.
        let mut body =
            Vec::with_capacity(encoded_len_hint(crate::ranges_bytes(&ranges, info.size)));
        match store.encode(&hash, &ranges, &mut body) {
            Ok(_) => Ok((BlobResponse::Data { size: info.size }, body)),
            // Our own copy is corrupt (the store has now forgotten it): say so, send nothing.
            Err(ReadError::Corrupt { .. }) => Ok((
                BlobResponse::Refused("the provider's copy failed verification".into()),
                Vec::new(),
            )),
            Err(ReadError::NotAvailable { .. }) => {
                Ok((BlobResponse::Refused("ranges not held".into()), Vec::new()))
            }
            Err(e) => Err(e),
        }
    })
    .await??;
    Ok(answer)
}

/// What a fetch did, per provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchReport {
    pub hash: Option<BlobHash>,
    pub size: u64,
    /// Payload bytes verified and written, per provider.
    pub bytes_from: BTreeMap<PeerId, u64>,
    /// Payload bytes that were already on disk when the fetch started.
    pub resumed_bytes: u64,
    /// Providers dropped for serving data that failed verification.
    pub dropped: BTreeSet<PeerId>,
}

impl FetchReport {
    /// Payload bytes received in this fetch.
    pub fn received(&self) -> u64 {
        self.bytes_from.values().sum()
    }
}

/// Progress of a running fetch, sent after every verified piece.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub done_bytes: u64,
    pub size: u64,
    pub providers: usize,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no peer holds blob {0}")]
    NotFound(BlobHash),
    #[error("peers disagree on the size of blob {0}")]
    SizeMismatch(BlobHash),
    #[error(
        "blob {hash} is incomplete: {missing} pieces missing and no provider left (dropped for bad data: {dropped})"
    )]
    NoProviders {
        hash: BlobHash,
        missing: u64,
        dropped: usize,
    },
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error("the store's worker thread failed: {0}")]
    Join(String),
}

/// How one request ended.
enum Outcome {
    Verified(u64),
    /// The provider sent data that failed verification.
    Bad(String),
    /// The provider sent it to this fetcher moments ago: get it from that one.
    Deferred(PeerId),
    /// Anything else: refused, not held, timed out, stream failed.
    Failed(String),
}

/// Asks `peer` what it holds of `hash`.
async fn ask_has<D: Dialer>(dialer: &D, peer: PeerId, hash: BlobHash) -> io::Result<BlobResponse> {
    exchange(
        dialer,
        peer,
        &BlobRequest::Has { hash },
        0,
        &mut Body::default(),
    )
    .await
}

/// Room for the bao encoding of `payload` bytes: the payload plus one 64-byte hash pair per
/// 16 KiB group, and a little slack.
fn encoded_len_hint(payload: u64) -> usize {
    let groups = payload.div_ceil(crate::GROUP_BYTES);
    usize::try_from(payload + groups * 64 + 1024).unwrap_or(usize::MAX)
}

/// Answer buffers kept between the pieces of one fetch: each is zero-filled once, then read
/// into directly (a fresh buffer per piece cost a zero-fill or a copy of every byte).
#[derive(Clone, Default)]
struct Buffers(Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

/// Buffers a fetch keeps for reuse: one per request in flight from a couple of providers.
const MAX_POOLED_BUFFERS: usize = 2 * MAX_IN_FLIGHT_PER_PROVIDER;

impl Buffers {
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop())
            .unwrap_or_default()
    }

    fn put(&self, buf: Vec<u8>) {
        if let Ok(mut pool) = self.0.lock()
            && pool.len() < MAX_POOLED_BUFFERS
        {
            pool.push(buf);
        }
    }
}

/// An answer's body: the first `len` bytes of `buf` (the rest is spare room, kept for reuse).
#[derive(Default)]
struct Body {
    buf: Vec<u8>,
    len: usize,
}

/// Reads an answer's body to the end into `body`, growing it to the expected size at once,
/// refusing more than twice the largest request's worth.
async fn read_body<R: AsyncRead + Unpin>(
    stream: &mut R,
    expected_payload: u64,
    body: &mut Body,
) -> io::Result<()> {
    let limit = usize::try_from(2 * MAX_GET_BYTES + 64 * 1024).unwrap_or(usize::MAX);
    let hint = encoded_len_hint(expected_payload).min(limit);
    if body.buf.len() < hint {
        body.buf.resize(hint, 0);
    }
    body.len = 0;
    loop {
        if body.len == body.buf.len() {
            if body.len >= limit {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "answer larger than any request",
                ));
            }
            let grown = (body.len + READ_CHUNK).min(limit);
            body.buf.resize(grown, 0);
        }
        let n = stream.read(&mut body.buf[body.len..]).await?;
        if n == 0 {
            return Ok(());
        }
        body.len += n;
    }
}

/// One request on a new stream: the answer's header and, for `Data`, its body.
///
/// A stream that fails before an answer arrives is tried again a few times: under load the
/// provider's inbound queue for new streams is short (libp2p-stream drops what does not fit),
/// so one failure says little about the provider.
async fn exchange<D: Dialer>(
    dialer: &D,
    peer: PeerId,
    request: &BlobRequest,
    expected_payload: u64,
    body: &mut Body,
) -> io::Result<BlobResponse> {
    let mut attempt = 0;
    loop {
        let once = async {
            let mut stream = dialer.open(peer).await?;
            write_frame(&mut stream, request, MAX_BLOB_REQUEST_BYTES).await?;
            stream.close().await?;
            let header: BlobResponse = read_frame(&mut stream, MAX_BLOB_HEADER_BYTES).await?;
            body.len = 0;
            if let BlobResponse::Data { .. } = header {
                read_body(&mut stream, expected_payload, body).await?;
            }
            Ok::<_, io::Error>(header)
        };
        match once.await {
            Ok(answer) => return Ok(answer),
            Err(e) if attempt + 1 < STREAM_ATTEMPTS => {
                attempt += 1;
                tracing::trace!(%peer, attempt, error = %e, "blob stream failed; trying again");
                tokio::time::sleep(STREAM_RETRY_DELAY * attempt).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn pieces_of(ranges: &ChunkRanges, size: u64) -> BTreeSet<u64> {
    let pieces = size.div_ceil(PIECE_BYTES);
    (0..pieces)
        .filter(|p| ranges.is_superset(&piece_ranges(*p, size)))
        .collect()
}

fn piece_ranges(piece: u64, size: u64) -> ChunkRanges {
    crate::group_ranges(piece * PIECE_GROUPS..(piece + 1) * PIECE_GROUPS, size)
}

/// Fetches one piece from `peer` and writes it, verified, into the partial blob.
#[allow(clippy::too_many_arguments)]
async fn fetch_piece<D: Dialer>(
    dialer: Arc<D>,
    partial: Arc<Partial>,
    buffers: Buffers,
    peer: PeerId,
    hash: BlobHash,
    size: u64,
    piece: u64,
    insist: bool,
    found_empty: Option<PeerId>,
) -> Outcome {
    let ranges = piece_ranges(piece, size);
    let get = BlobRequest::Get {
        hash,
        ranges: ranges_to_wire(&ranges, size),
        insist,
        found_empty,
    };
    let mut body = Body {
        buf: buffers.take(),
        len: 0,
    };
    let request = exchange(
        &*dialer,
        peer,
        &get,
        crate::ranges_bytes(&ranges, size),
        &mut body,
    );
    let header = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Err(_) => return Outcome::Failed("timed out".into()),
        Ok(Err(e)) => return Outcome::Failed(e.to_string()),
        Ok(Ok(x)) => x,
    };
    match header {
        BlobResponse::Data { size: theirs } if theirs != size => {
            Outcome::Bad(format!("claims size {theirs}, not {size}"))
        }
        BlobResponse::Data { .. } => {
            let written = tokio::task::spawn_blocking(move || {
                let written = partial.write_encoded(&ranges, &mut body.buf[..body.len]);
                buffers.put(body.buf);
                written
            })
            .await;
            match written {
                Ok(Ok(n)) => Outcome::Verified(n),
                Ok(Err(WriteError::Corrupt { .. })) => {
                    Outcome::Bad("data failed verification".into())
                }
                Ok(Err(e)) => Outcome::Failed(e.to_string()),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        }
        BlobResponse::NotFound => Outcome::Failed("not held".into()),
        BlobResponse::Elsewhere { to } => Outcome::Deferred(to),
        BlobResponse::Refused(reason) => Outcome::Failed(reason),
        BlobResponse::Has { .. } => Outcome::Bad("answered a Get with Has".into()),
    }
}

/// What a fetch waits for.
enum Waited {
    Piece(PeerId, u64, Outcome),
    Has(PeerId, Option<BlobResponse>),
}

fn bytes_of_pieces(pieces: &BTreeSet<u64>, size: u64) -> u64 {
    pieces.iter().map(|p| piece_len(*p, size)).sum()
}

fn piece_len(piece: u64, size: u64) -> u64 {
    ((piece + 1) * PIECE_BYTES)
        .min(size)
        .saturating_sub(piece * PIECE_BYTES)
}

/// Fetches `hash` from the `candidates` that hold it into `store`, verified, several at once.
/// Resumes from what is on disk. Candidates that hold only part of it (or nothing yet: they may
/// be fetching it too) are asked again every [`AVAILABILITY_REFRESH`]. `progress` is called after
/// every verified piece. `seed` spreads the first pieces of fetchers that start together
/// (derive it from the node's id). Fails when no progress is made for [`STALL_TIMEOUT`].
pub async fn fetch<D: Dialer>(
    store: &Store,
    dialer: Arc<D>,
    hash: BlobHash,
    candidates: &[PeerId],
    seed: u64,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<FetchReport, FetchError> {
    let mut report = FetchReport {
        hash: Some(hash),
        ..FetchReport::default()
    };
    if let Some(info) = store.has(&hash)
        && info.complete
    {
        report.size = info.size;
        report.resumed_bytes = info.size;
        return Ok(report);
    }
    let ask = |peer: PeerId| {
        let dialer = dialer.clone();
        async move {
            let answer = tokio::time::timeout(REQUEST_TIMEOUT, ask_has(&*dialer, peer, hash)).await;
            Waited::Has(peer, answer.ok().and_then(Result::ok))
        }
    };
    // Who holds what, to learn the size and the first providers.
    let mut candidates: Vec<PeerId> = candidates.to_vec();
    for peer in dialer.hinted(&hash) {
        if !candidates.contains(&peer) {
            candidates.push(peer);
        }
    }
    let answers = futures::future::join_all(candidates.iter().map(|p| ask(*p))).await;
    let mut first: BTreeMap<PeerId, (u64, bool, ChunkRanges)> = BTreeMap::new();
    for answer in answers {
        if let Waited::Has(
            peer,
            Some(BlobResponse::Has {
                size,
                complete,
                ranges,
            }),
        ) = answer
        {
            match ranges_from_wire(&ranges) {
                Ok(r) => {
                    first.insert(peer, (size, complete, r));
                }
                Err(e) => tracing::warn!(%peer, error = %e, "bad availability answer"),
            }
        }
    }
    let sizes: BTreeSet<u64> = first
        .values()
        .filter(|(_, c, _)| *c)
        .map(|(s, _, _)| *s)
        .collect();
    let size = match (sizes.len(), sizes.first()) {
        (1, Some(size)) => *size,
        (0, _) => return Err(FetchError::NotFound(hash)),
        _ => return Err(FetchError::SizeMismatch(hash)),
    };
    report.size = size;
    let partial = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.partial(&hash, size))
            .await
            .map_err(|e| FetchError::Join(e.to_string()))??
    };
    let pieces = size.div_ceil(PIECE_BYTES).max(1);
    let already = pieces_of(&partial.valid(), size);
    report.resumed_bytes = bytes_of_pieces(&already, size);
    let partial = Arc::new(partial);
    let mut picker: Picker<PeerId> = Picker::new(pieces, already, seed);
    // Peers that may come to hold pieces: asked again while the fetch runs.
    let mut watching: BTreeSet<PeerId> = BTreeSet::new();
    let mut live: BTreeSet<PeerId> = BTreeSet::new();
    for peer in &candidates {
        match first.get(peer) {
            Some((s, true, _)) if *s == size => {
                picker.set_provider(*peer, Availability::All);
                live.insert(*peer);
            }
            Some((s, false, ranges)) if *s == size => {
                picker.set_provider(*peer, Availability::Pieces(pieces_of(ranges, size)));
                live.insert(*peer);
                watching.insert(*peer);
            }
            _ => {
                watching.insert(*peer);
            }
        }
    }
    let mut failures: BTreeMap<PeerId, u32> = BTreeMap::new();
    // Peers that will not pass pieces on: they announced the blob, or a seeder sent pieces to
    // them, but they answer that they do not hold it (deleted or evicted since) or cannot be
    // reached; or they sent bad data. Their announcements are ignored for the rest of this
    // fetch, and a seeder is no longer asked to leave pieces to them.
    let mut gone: BTreeSet<PeerId> = BTreeSet::new();
    // Pieces a seeder deferred, and the fetcher it sent each to; those fetchers are asked
    // every tick what they hold. One found holding nothing (it deleted the blob, or is gone)
    // will not pass them on: they are asked for again, telling the seeder so.
    let mut deferred_to: BTreeMap<u64, PeerId> = BTreeMap::new();
    let mut recipients: BTreeSet<PeerId> = BTreeSet::new();
    let mut waiting = FuturesUnordered::new();
    let buffers = Buffers::default();
    let mut asking: BTreeSet<PeerId> = BTreeSet::new();
    let mut refresh = tokio::time::interval(AVAILABILITY_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_progress = tokio::time::Instant::now();
    let mut ticks: u64 = 0;
    let mut done_bytes = report.resumed_bytes;
    while !picker.is_complete() {
        // With one provider left and no peer that may come to hold pieces, requests insist
        // (below), so a deferral from before (to a peer since found empty, hinted or not) must
        // not keep its pieces from being asked for again. With another provider that holds
        // them, a seeder may still send us there.
        let insist = watching.is_empty() && live.len() <= 1;
        if insist {
            picker.forget_deferrals();
        }
        for peer in live.clone() {
            while picker.in_flight_from(&peer) < MAX_IN_FLIGHT_PER_PROVIDER {
                let Some(piece) = picker.next(&peer) else {
                    break;
                };
                // Nor may a seeder send us to the fetcher it sent us to for this piece before,
                // found empty.
                let found_empty = deferred_to
                    .get(&piece)
                    .copied()
                    .filter(|to| gone.contains(to));
                let fut = fetch_piece(
                    dialer.clone(),
                    partial.clone(),
                    buffers.clone(),
                    peer,
                    hash,
                    size,
                    piece,
                    insist,
                    found_empty,
                );
                waiting.push(
                    Box::pin(async move { Waited::Piece(peer, piece, fut.await) })
                        as futures::future::BoxFuture<'static, Waited>,
                );
            }
        }
        if last_progress.elapsed() > STALL_TIMEOUT || (waiting.is_empty() && watching.is_empty()) {
            return Err(FetchError::NoProviders {
                hash,
                missing: picker.missing(),
                dropped: report.dropped.len(),
            });
        }
        tokio::select! {
            Some(waited) = waiting.next() => match waited {
                Waited::Piece(peer, piece, Outcome::Verified(n)) => {
                    *report.bytes_from.entry(peer).or_default() += n;
                    if !picker.is_done(piece) {
                        picker.done(&peer, piece);
                        done_bytes += piece_len(piece, size);
                        last_progress = tokio::time::Instant::now();
                        progress(Progress { done_bytes, size, providers: live.len() });
                    }
                }
                Waited::Piece(peer, piece, Outcome::Bad(reason)) => {
                    tracing::warn!(%peer, %hash, piece, %reason, "provider sent bad data: dropped");
                    report.dropped.insert(peer);
                    gone.insert(peer);
                    live.remove(&peer);
                    watching.remove(&peer);
                    picker.remove_provider(&peer);
                }
                Waited::Piece(peer, piece, Outcome::Deferred(to)) => {
                    deferred_to.insert(piece, to);
                    if gone.contains(&to) {
                        // Asked for again at once, naming `to` as found empty.
                        picker.failed(&peer, piece);
                    } else {
                        picker.defer(&peer, piece);
                        recipients.insert(to);
                        if !live.contains(&to) {
                            watching.insert(to);
                        }
                    }
                }
                Waited::Piece(peer, piece, Outcome::Failed(reason)) => {
                    tracing::debug!(%peer, %hash, piece, %reason, "piece request failed");
                    picker.failed(&peer, piece);
                    let n = failures.entry(peer).or_default();
                    *n += 1;
                    if *n >= MAX_FAILURES_PER_PROVIDER {
                        // Out of this fetch's rotation, but still asked what it holds: it may
                        // only have been busy.
                        *n = 0;
                        live.remove(&peer);
                        watching.insert(peer);
                        picker.remove_provider(&peer);
                    }
                }
                Waited::Has(peer, answer) => {
                    asking.remove(&peer);
                    let not_found = matches!(answer, Some(BlobResponse::NotFound));
                    let unanswered = answer.is_none();
                    if let Some(BlobResponse::Has { size: s, complete, ranges }) = answer
                        && s == size
                        && !report.dropped.contains(&peer)
                        && let Ok(r) = ranges_from_wire(&ranges)
                    {
                        let availability = if complete {
                            watching.remove(&peer);
                            Availability::All
                        } else {
                            Availability::Pieces(pieces_of(&r, size))
                        };
                        picker.set_provider(peer, availability);
                        live.insert(peer);
                        failures.remove(&peer);
                    } else {
                        // Not held, no answer, or not one we can use: after a few, stop asking;
                        // a fetcher a seeder sent us to, at the first "not held".
                        let recipient = recipients.contains(&peer);
                        let n = failures.entry(peer).or_default();
                        *n += 1;
                        if *n >= MAX_FAILURES_PER_PROVIDER || (recipient && not_found) {
                            watching.remove(&peer);
                            // Its announcement, or the seeder's word, no longer holds.
                            if (not_found && dialer.hinted(&hash).contains(&peer))
                                || (recipient && (not_found || unanswered))
                            {
                                gone.insert(peer);
                                picker.forget_deferrals();
                            }
                        }
                    }
                }
            },
            _ = refresh.tick() => {
                // Peers known to be fetching (they answered, or announced it) are asked every
                // tick; the others only every IDLE_PEER_REFRESH_TICKS ticks.
                ticks += 1;
                let hinted: BTreeSet<PeerId> = dialer
                    .hinted(&hash)
                    .into_iter()
                    .filter(|p| !gone.contains(p))
                    .collect();
                watching.extend(hinted.iter().filter(|p| !live.contains(p)));
                let due: Vec<PeerId> = watching
                    .iter()
                    .filter(|p| !asking.contains(p))
                    .filter(|p| {
                        live.contains(p)
                            || hinted.contains(p)
                            || recipients.contains(p)
                            || ticks.is_multiple_of(IDLE_PEER_REFRESH_TICKS)
                    })
                    .copied()
                    .collect();
                for peer in due {
                    asking.insert(peer);
                    waiting.push(Box::pin(ask(peer)));
                }
            }
        }
    }
    // Requests still in flight (end-game duplicates) are dropped with `waiting`; a verified
    // write already handed to a blocking thread finishes first.
    drop(waiting);
    let mut partial = partial;
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    let partial = loop {
        match Arc::try_unwrap(partial) {
            Ok(p) => break p,
            Err(shared) if tokio::time::Instant::now() < deadline => {
                partial = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => return Err(FetchError::Join("a piece write did not finish".into())),
        }
    };
    tokio::task::spawn_blocking(move || partial.finish())
        .await
        .map_err(|e| FetchError::Join(e.to_string()))??;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{TestStore, data};
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use tokio_util::compat::{Compat, TokioAsyncReadCompatExt};

    /// How a test provider behaves.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Behaviour {
        Honest,
        /// Flips a byte in the payload of every `Data` answer.
        Corrupting,
        /// Serves this many `Get`s, then refuses every request.
        StopsAfter(usize),
    }

    /// A test provider's sending slots.
    const SENDERS: usize = 8;

    struct Provider {
        store: Store,
        seeding: Seeding,
        senders: Semaphore,
        behaviour: Behaviour,
        gets: AtomicUsize,
        uploaded: AtomicU64,
    }

    /// In-memory streams to in-process providers: each `open` is a duplex pipe whose far end is
    /// served by the provider's store.
    #[derive(Clone)]
    struct MemDialer {
        /// Who is dialling: the provider sees this peer id.
        me: PeerId,
        providers: Arc<Mutex<HashMap<PeerId, Arc<Provider>>>>,
    }

    impl Default for MemDialer {
        fn default() -> Self {
            MemDialer {
                me: PeerId::random(),
                providers: Arc::default(),
            }
        }
    }

    impl MemDialer {
        /// The same providers, dialled as `me`.
        fn as_peer(&self, me: PeerId) -> MemDialer {
            MemDialer {
                me,
                providers: self.providers.clone(),
            }
        }

        fn add(&self, peer: PeerId, store: Store, behaviour: Behaviour) -> Arc<Provider> {
            let p = Arc::new(Provider {
                store,
                seeding: Seeding::default(),
                senders: Semaphore::new(SENDERS),
                behaviour,
                gets: AtomicUsize::new(0),
                uploaded: AtomicU64::new(0),
            });
            self.providers.lock().unwrap().insert(peer, p.clone());
            p
        }
    }

    impl Dialer for MemDialer {
        type Stream = Compat<tokio::io::DuplexStream>;
        fn open(&self, peer: PeerId) -> BoxFuture<'static, io::Result<Self::Stream>> {
            let provider = self.providers.lock().unwrap().get(&peer).cloned();
            let asker = self.me;
            Box::pin(async move {
                let provider =
                    provider.ok_or_else(|| io::Error::from(io::ErrorKind::ConnectionRefused))?;
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                tokio::spawn(async move {
                    let stream = theirs.compat();
                    let served = match provider.behaviour {
                        Behaviour::Honest => {
                            serve(
                                provider.store.clone(),
                                &provider.seeding,
                                &provider.senders,
                                asker,
                                stream,
                            )
                            .await
                        }
                        Behaviour::Corrupting => corrupt_serve(&provider.store, stream).await,
                        Behaviour::StopsAfter(n) => serve_at_most(&provider, n, stream).await,
                    };
                    if let Ok(s) = served {
                        provider.uploaded.fetch_add(s.bytes, Ordering::SeqCst);
                    }
                });
                Ok(ours.compat())
            })
        }
    }

    /// Serves the first `n` `Get`s (counted on arrival, so exactly `n` whatever the
    /// concurrency), then refuses every request.
    async fn serve_at_most<S: AsyncRead + AsyncWrite + Unpin>(
        p: &Provider,
        n: usize,
        mut stream: S,
    ) -> Result<Served, ServeError> {
        let request: BlobRequest = read_frame(&mut stream, MAX_BLOB_REQUEST_BYTES).await?;
        let (header, body) = match request {
            BlobRequest::Get { hash, ranges, .. } if p.gets.fetch_add(1, Ordering::SeqCst) < n => {
                get_answer(&p.store, &hash, &ranges).await?
            }
            BlobRequest::Has { hash } if p.gets.load(Ordering::SeqCst) < n => {
                (has_answer(&p.store, &hash).await?, Vec::new())
            }
            _ => (BlobResponse::Refused("gone".into()), Vec::new()),
        };
        write_frame(&mut stream, &header, MAX_BLOB_HEADER_BYTES).await?;
        stream.write_all(&body).await?;
        stream.close().await?;
        Ok(Served {
            bytes: body.len() as u64,
        })
    }

    /// Answers like an honest provider, but flips one payload byte of every `Data` answer.
    async fn corrupt_serve<S: AsyncRead + AsyncWrite + Unpin>(
        store: &Store,
        mut stream: S,
    ) -> Result<Served, ServeError> {
        let request: BlobRequest = read_frame(&mut stream, MAX_BLOB_REQUEST_BYTES).await?;
        let (header, mut body) = match request {
            BlobRequest::Has { hash } => (has_answer(store, &hash).await?, Vec::new()),
            BlobRequest::Get { hash, ranges, .. } => get_answer(store, &hash, &ranges).await?,
        };
        if body.len() > 100 {
            let at = body.len() - 100;
            body[at] ^= 0x01;
        }
        write_frame(&mut stream, &header, MAX_BLOB_HEADER_BYTES).await?;
        stream.write_all(&body).await?;
        stream.close().await?;
        Ok(Served {
            bytes: body.len() as u64,
        })
    }

    fn seeded(bytes: &[u8]) -> (TestStore, BlobHash) {
        let t = TestStore::new(None);
        let hash = t.store.import_bytes(bytes).unwrap();
        (t, hash)
    }

    fn read_blob(store: &Store, hash: &BlobHash) -> Vec<u8> {
        std::fs::read(store.blob_path(hash)).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blob_comes_whole_and_exact_from_two_providers() {
        let bytes = data(5 * PIECE_BYTES as usize + 12_345, 1);
        let (a, hash) = seeded(&bytes);
        let (b, _) = seeded(&bytes);
        let dialer = MemDialer::default();
        let (pa, pb) = (PeerId::random(), PeerId::random());
        dialer.add(pa, a.store.clone(), Behaviour::Honest);
        dialer.add(pb, b.store.clone(), Behaviour::Honest);
        let me = TestStore::new(None);
        let mut seen = Vec::new();
        let report = fetch(&me.store, Arc::new(dialer), hash, &[pa, pb], 1, |p| {
            seen.push(p)
        })
        .await
        .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        assert_eq!(report.size, bytes.len() as u64);
        assert!(report.received() >= bytes.len() as u64);
        assert_eq!(
            report.bytes_from.len(),
            2,
            "both providers served: {report:?}"
        );
        assert_eq!(seen.last().map(|p| p.done_bytes), Some(bytes.len() as u64));
        // A second fetch finds it complete and transfers nothing.
        let again = fetch(
            &me.store,
            Arc::new(MemDialer::default()),
            hash,
            &[],
            1,
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(again.received(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provider_sending_bad_data_is_dropped_and_nothing_corrupt_is_written() {
        let bytes = data(4 * PIECE_BYTES as usize, 2);
        let (good, hash) = seeded(&bytes);
        let (bad, _) = seeded(&bytes);
        let dialer = MemDialer::default();
        let (pg, pb) = (PeerId::random(), PeerId::random());
        dialer.add(pg, good.store.clone(), Behaviour::Honest);
        dialer.add(pb, bad.store.clone(), Behaviour::Corrupting);
        let me = TestStore::new(None);
        let report = fetch(&me.store, Arc::new(dialer), hash, &[pb, pg], 9, |_| {})
            .await
            .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes, "the blob must be exact");
        assert!(report.dropped.contains(&pb), "{report:?}");
        assert!(!report.dropped.contains(&pg));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_byte_flipped_on_a_providers_disk_is_caught_and_the_blob_completes_elsewhere() {
        let bytes = data(3 * PIECE_BYTES as usize, 3);
        let (flipped, hash) = seeded(&bytes);
        let (good, _) = seeded(&bytes);
        // Flip one byte of the stored blob (files are read-only: make it writable first).
        let path = flipped.store.blob_path(&hash);
        let mut perms = std::fs::metadata(&path).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)]
        perms.set_readonly(false);
        std::fs::set_permissions(&path, perms).unwrap();
        let mut on_disk = std::fs::read(&path).unwrap();
        on_disk[PIECE_BYTES as usize + 5] ^= 0x80;
        std::fs::write(&path, &on_disk).unwrap();
        let dialer = MemDialer::default();
        let (pf, pg) = (PeerId::random(), PeerId::random());
        dialer.add(pf, flipped.store.clone(), Behaviour::Honest);
        dialer.add(pg, good.store.clone(), Behaviour::Honest);
        let me = TestStore::new(None);
        let report = fetch(&me.store, Arc::new(dialer), hash, &[pf, pg], 4, |_| {})
            .await
            .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        // The flipped provider no longer calls its copy complete.
        assert!(
            !flipped.store.has(&hash).unwrap().complete,
            "the corrupt copy must be demoted"
        );
        let from_flipped = report.bytes_from.get(&pf).copied().unwrap_or(0);
        assert!(from_flipped < bytes.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_cut_off_halfway_resumes_with_only_the_missing_bytes() {
        let pieces = 8u64;
        let bytes = data((pieces * PIECE_BYTES) as usize, 4);
        let (seed, hash) = seeded(&bytes);
        let me = TestStore::new(None);
        // The first provider goes away after serving half the pieces.
        let first = MemDialer::default();
        let p1 = PeerId::random();
        first.add(p1, seed.store.clone(), Behaviour::StopsAfter(4));
        let err = fetch(&me.store, Arc::new(first), hash, &[p1], 5, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NoProviders { .. }), "{err}");
        // The process dies: the store is closed and opened again.
        let me = me.reopen(None);
        let second = MemDialer::default();
        let p2 = PeerId::random();
        second.add(p2, seed.store.clone(), Behaviour::Honest);
        let report = fetch(&me.store, Arc::new(second), hash, &[p2], 5, |_| {})
            .await
            .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        assert_eq!(report.resumed_bytes, 4 * PIECE_BYTES, "{report:?}");
        assert_eq!(
            report.received(),
            bytes.len() as u64 - 4 * PIECE_BYTES,
            "only the missing half is transferred"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_fetchers_trade_pieces_so_the_seeder_uploads_little_more_than_once() {
        let bytes = data(48 * PIECE_BYTES as usize, 6);
        let (seed, hash) = seeded(&bytes);
        let dialer = MemDialer::default();
        let seeder = PeerId::random();
        let seeder_stats = dialer.add(seeder, seed.store.clone(), Behaviour::Honest);
        let fetchers: Vec<(PeerId, TestStore)> = (0..4)
            .map(|_| (PeerId::random(), TestStore::new(None)))
            .collect();
        let mut stats = Vec::new();
        for (peer, t) in &fetchers {
            stats.push(dialer.add(*peer, t.store.clone(), Behaviour::Honest));
        }
        let all: Vec<PeerId> = std::iter::once(seeder)
            .chain(fetchers.iter().map(|(p, _)| *p))
            .collect();
        let runs = fetchers.iter().enumerate().map(|(i, (me, t))| {
            let candidates: Vec<PeerId> = all.iter().copied().filter(|p| p != me).collect();
            let dialer = Arc::new(dialer.as_peer(*me));
            let store = t.store.clone();
            async move { fetch(&store, dialer, hash, &candidates, i as u64 + 100, |_| {}).await }
        });
        for result in futures::future::join_all(runs).await {
            result.unwrap();
        }
        for (_, t) in &fetchers {
            assert_eq!(read_blob(&t.store, &hash), bytes);
        }
        let uploaded = seeder_stats.uploaded.load(Ordering::SeqCst) as f64;
        let factor = uploaded / bytes.len() as f64;
        let from_fetchers: u64 = stats
            .iter()
            .map(|s| s.uploaded.load(Ordering::SeqCst))
            .sum();
        println!("seeder upload factor {factor:.2}, fetchers served {from_fetchers} bytes");
        assert!(from_fetchers > 0, "the fetchers must serve each other");
        assert!(factor <= 1.5, "the seeder uploaded {factor:.2}× the blob");
    }

    /// A seeder of a blob of `pieces` pieces, and `other`, which has just fetched all of it
    /// from the seeder: within its window, the seeder sends further fetchers to `other`.
    struct FetchedFromSeeder {
        bytes: Vec<u8>,
        hash: BlobHash,
        dialer: MemDialer,
        seeder: PeerId,
        seeder_stats: Arc<Provider>,
        other: PeerId,
        /// `other`'s copy (not yet a provider: add it as one, or an emptied store, or none).
        theirs: TestStore,
        _seed: TestStore,
    }

    async fn fetched_from_seeder(pieces: usize, data_seed: u64) -> FetchedFromSeeder {
        let bytes = data(pieces * PIECE_BYTES as usize, data_seed);
        let (seed, hash) = seeded(&bytes);
        let dialer = MemDialer::default();
        let (seeder, other) = (PeerId::random(), PeerId::random());
        let seeder_stats = dialer.add(seeder, seed.store.clone(), Behaviour::Honest);
        let theirs = TestStore::new(None);
        fetch(
            &theirs.store,
            Arc::new(dialer.as_peer(other)),
            hash,
            &[seeder],
            2,
            |_| {},
        )
        .await
        .unwrap();
        FetchedFromSeeder {
            bytes,
            hash,
            dialer,
            seeder,
            seeder_stats,
            other,
            theirs,
            _seed: seed,
        }
    }

    /// Two fetchers start together just after a third fetched the whole blob from the seeder
    /// and then deleted it, vanished, or turned to serving bad data: the seeder sends them to
    /// the third for every piece. Each sees the other fetching, so neither is out of peers to
    /// ask; they must find the third useless and ask the seeder again at once, not wait out
    /// the seeder's window (they did: 10 s for a blob of 16 MiB in the transfer benchmark),
    /// and still trade, not both take the blob from the seeder.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetchers_sent_to_a_peer_that_cannot_pass_pieces_on_do_not_wait_out_the_window() {
        for third_is in ["emptied", "vanished", "corrupting"] {
            let FetchedFromSeeder {
                bytes,
                hash,
                dialer,
                seeder,
                seeder_stats,
                other: third,
                theirs,
                _seed,
            } = fetched_from_seeder(8, 11).await;
            let emptied = TestStore::new(None);
            match third_is {
                "emptied" => {
                    dialer.add(third, emptied.store.clone(), Behaviour::Honest);
                }
                "corrupting" => {
                    dialer.add(third, theirs.store.clone(), Behaviour::Corrupting);
                }
                _ => {} // vanished: not reachable at all
            }
            let before = seeder_stats.uploaded.load(Ordering::SeqCst);
            let fetchers = [
                (PeerId::random(), TestStore::new(None)),
                (PeerId::random(), TestStore::new(None)),
            ];
            for (peer, t) in &fetchers {
                dialer.add(*peer, t.store.clone(), Behaviour::Honest);
            }
            let started = std::time::Instant::now();
            let runs = fetchers.iter().enumerate().map(|(i, (me, t))| {
                let candidates = [seeder, fetchers[1 - i].0];
                let dialer = Arc::new(dialer.as_peer(*me));
                let store = t.store.clone();
                async move { fetch(&store, dialer, hash, &candidates, i as u64 + 7, |_| {}).await }
            });
            for result in futures::future::join_all(runs).await {
                result.unwrap();
            }
            let took = started.elapsed();
            for (_, t) in &fetchers {
                assert_eq!(read_blob(&t.store, &hash), bytes);
            }
            assert!(
                took < SEED_WINDOW / 2,
                "took {took:?} (third {third_is}): the fetchers waited out the window"
            );
            let factor =
                (seeder_stats.uploaded.load(Ordering::SeqCst) - before) as f64 / bytes.len() as f64;
            // 1.00 in every run here; two pieces of eight spare for end-game duplicates.
            assert!(
                factor <= 1.25,
                "the seeder uploaded {factor:.2}× the blob to the two (third {third_is})"
            );
        }
    }

    /// Answers `hinted` with a fixed list, like a node that saw `have` announcements.
    struct Hinting(MemDialer, Vec<PeerId>);

    impl Dialer for Hinting {
        type Stream = Compat<tokio::io::DuplexStream>;
        fn open(&self, peer: PeerId) -> BoxFuture<'static, io::Result<Self::Stream>> {
            self.0.open(peer)
        }
        fn hinted(&self, _: &BlobHash) -> Vec<PeerId> {
            self.1.clone()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provider_with_every_sending_slot_taken_answers_in_turn() {
        let bytes = data(2 * PIECE_BYTES as usize, 10);
        let (seed, hash) = seeded(&bytes);
        let dialer = MemDialer::default();
        let p = PeerId::random();
        let provider = dialer.add(p, seed.store.clone(), Behaviour::Honest);
        // Other fetchers hold all its slots.
        let busy = provider.senders.acquire_many(SENDERS as u32).await.unwrap();
        // Questions are still answered.
        let answer = tokio::time::timeout(Duration::from_secs(5), ask_has(&dialer, p, hash))
            .await
            .expect("a question waits for no slot")
            .unwrap();
        assert!(
            matches!(answer, BlobResponse::Has { complete: true, size, .. } if size == bytes.len() as u64),
            "{answer:?}"
        );
        // Data waits its turn: the fetch neither fails nor gets a byte meanwhile.
        let me = TestStore::new(None);
        let fetching = tokio::spawn({
            let (store, dialer) = (me.store.clone(), Arc::new(dialer));
            async move { fetch(&store, dialer, hash, &[p], 1, |_| {}).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!fetching.is_finished(), "{:?}", fetching.await);
        assert_eq!(provider.uploaded.load(Ordering::SeqCst), 0);
        drop(busy);
        let report = fetching.await.unwrap().unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        assert_eq!(report.bytes_from.get(&p), Some(&(bytes.len() as u64)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_provider_known_only_from_announcements_is_used() {
        let bytes = data(2 * PIECE_BYTES as usize, 8);
        let (seed, hash) = seeded(&bytes);
        let dialer = MemDialer::default();
        let p = PeerId::random();
        dialer.add(p, seed.store.clone(), Behaviour::Honest);
        let me = TestStore::new(None);
        // No candidates at all: without the hint there is nobody to ask.
        let err = fetch(&me.store, Arc::new(dialer.clone()), hash, &[], 1, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(err, FetchError::NotFound(_)), "{err}");
        let report = fetch(
            &me.store,
            Arc::new(Hinting(dialer, vec![p])),
            hash,
            &[],
            1,
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        assert_eq!(
            report.bytes_from.keys().copied().collect::<Vec<_>>(),
            vec![p]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_announced_a_blob_and_deleted_it_does_not_stall_the_fetch() {
        // `other` fetches the whole blob from the seeder, announces it, then deletes it.
        let FetchedFromSeeder {
            bytes,
            hash,
            dialer,
            seeder,
            other,
            _seed,
            ..
        } = fetched_from_seeder(3, 9).await;
        let emptied = TestStore::new(None);
        dialer.add(other, emptied.store.clone(), Behaviour::Honest);
        // Within its seeding window the seeder would send us to `other`, which answers that
        // it holds nothing; the fetch must notice and have the seeder serve it after all.
        let me = TestStore::new(None);
        let hinting = Hinting(dialer.as_peer(PeerId::random()), vec![other]);
        let started = std::time::Instant::now();
        let report = fetch(&me.store, Arc::new(hinting), hash, &[seeder], 3, |_| {})
            .await
            .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        assert_eq!(report.bytes_from.keys().collect::<Vec<_>>(), vec![&seeder]);
        assert!(
            started.elapsed() < SEED_WINDOW,
            "took {:?}: the fetch waited for the stale announcement",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_seeder_deferring_to_a_peer_that_deleted_the_blob_still_serves_the_fetch() {
        // `third` fetched the blob from the seeder and deleted it: within its seeding window
        // the seeder sends further fetchers of those pieces elsewhere.
        let FetchedFromSeeder {
            bytes,
            hash,
            dialer,
            seeder,
            _seed,
            ..
        } = fetched_from_seeder(3, 10).await;
        let other = PeerId::random();
        // `other`, a peer this fetch was told may hold it (not announced: no hint), holds
        // nothing. Once it has answered so a few times, the seeder must be asked to insist.
        let empty = TestStore::new(None);
        dialer.add(other, empty.store.clone(), Behaviour::Honest);
        let me = TestStore::new(None);
        let started = std::time::Instant::now();
        let report = fetch(
            &me.store,
            Arc::new(dialer.as_peer(PeerId::random())),
            hash,
            &[seeder, other],
            4,
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(read_blob(&me.store, &hash), bytes);
        assert_eq!(report.bytes_from.keys().collect::<Vec<_>>(), vec![&seeder]);
        assert!(
            started.elapsed() < SEED_WINDOW,
            "took {:?}: the fetch waited out the seeder's window",
            started.elapsed()
        );
    }

    #[test]
    fn wire_ranges_are_checked() {
        assert!(ranges_from_wire(&[(0, 4), (8, 9)]).is_ok());
        assert!(matches!(
            ranges_from_wire(&[(4, 4)]),
            Err(BadRanges::Malformed(4, 4))
        ));
        assert!(matches!(
            ranges_from_wire(&[(8, 9), (0, 4)]),
            Err(BadRanges::Malformed(0, 4))
        ));
        let many: Vec<(u64, u64)> = (0..MAX_BLOB_RANGES as u64 + 1)
            .map(|i| (2 * i, 2 * i + 1))
            .collect();
        assert!(matches!(ranges_from_wire(&many), Err(BadRanges::TooMany)));
        let r = ranges_from_wire(&[(0, 4), (8, 9)]).unwrap();
        assert_eq!(ranges_to_wire(&r, 9 * 1024), vec![(0, 4), (8, 9)]);
        assert_eq!(ranges_to_wire(&ChunkRanges::all(), 3000), vec![(0, 3)]);
    }
}
