//! The job board's anti-entropy and result replication, on [`BOARD_PROTOCOL`]: one stream per
//! request, one [`BoardRequest`] frame answered by one [`BoardResponse`] frame
//! ([`crate::frame`]), half-duplex.
//!
//! Anti-entropy: a peer asks a random live member for its per-job digests now and then, and
//! for the events of every job whose digest differs, a page at a time. Gossip carries events
//! when they happen; this brings what gossip lost (a partition, a restart, a late joiner).

use serde::{Deserialize, Serialize};

use crate::{BlobHash, JobId, SignedEvent};

/// Stream protocol of the job board: digests, events, replication of results.
pub const BOARD_PROTOCOL: &str = "/blendnet/board/1";

/// Largest request: a job id or a hash and a number.
pub const MAX_BOARD_REQUEST_BYTES: usize = 1024;

/// Most events in one page: a 1000-task job fits in a page or two.
pub const MAX_EVENTS_PER_PAGE: usize = 4096;

/// Largest response: a page of events at their size limit would be far more, so a page is cut
/// at this many bytes too; the digests of every job a board may hold fit.
pub const MAX_BOARD_RESPONSE_BYTES: usize = 16 << 20;

/// A request on [`BOARD_PROTOCOL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BoardRequest {
    /// "Which jobs do you hold, and what is the digest of each one's events?"
    Digests,
    /// "Send me the events of `job`, from the `skip`-th in your order."
    Events { job: JobId, skip: u32 },
    /// "Fetch the result `hash` from me and keep it": a second holder, so the task can count
    /// as done.
    Replicate { hash: BlobHash },
}

/// The answer to a [`BoardRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BoardResponse {
    Digests(Vec<(JobId, [u8; 32])>),
    /// A page of events; `more` when the job has events past it.
    Events {
        events: Vec<SignedEvent>,
        more: bool,
    },
    /// The result is held here now.
    Replicated,
    /// The request cannot be served, and why.
    Refused(String),
}
