//! The job board: one peer's view of every job, and its two roles in them, coordinator and
//! worker. Sans I/O: the shell feeds [`Input`]s with `now` (milliseconds on the node's monotonic
//! clock) to [`Board::handle`] and executes the returned [`Action`]s in order, then calls again
//! at [`Board::next_deadline`] with [`Input::Tick`].
//!
//! ```text
//!   gossip / anti-entropy ─ Event ─┐                       ┌─ Persist, then Publish (own events)
//!   roster + connections ─ Members ┤                       ├─ SendWork / RespondWork
//!   /blendnet/work/1 ── WorkRequest┤                       ├─ StartTask / StopTask  (render side)
//!                       WorkReply ─┤──▶ Board::handle ──▶──┤─ FetchResult / ReplicateResult (store)
//!   render side ─ TaskFinished/Failed                      ├─ SyncJob (anti-entropy hint)
//!   store ─ ResultHeld / FetchFailed                       └─ JobFinished (API)
//!   timers ─ Tick ─┘
//! ```
//!
//! **What it owns.** The events of every job it knows ([`Job`], a pure function of them), the
//! coordinator runtime of the jobs it coordinates (leases on its own clock, the grantable pool,
//! result checks, heartbeats), and the worker runtime (the one task it renders, renewals,
//! whom to ask next). Nothing else: the roster, blobs and Blender belong to other actors.
//!
//! **Promises.**
//! - Every new event it accepts is returned as [`Action::Persist`] before anything announces it;
//!   an event it authors is persisted, then [`Action::Publish`]ed, before any response that
//!   depends on it (a grant is persisted before the worker hears of it).
//! - Input that fails a check (signature, membership, role, epoch, unknown job, validity) is
//!   dropped, counted by reason in [`Board::counters`], and changes nothing else.
//! - Coordination: a job's coordinator is the best-ranked live peer with the `coordinate` role
//!   ([`crate::job::rank`]: the submitter first). It heartbeats every [`HEARTBEAT_MS`]; when
//!   heartbeats stop, the `k`-th live candidate after it claims the next epoch after
//!   `k × TAKEOVER_AFTER_MS`, rebuilds the job from its events and honours every outstanding
//!   lease for a grace period ([`LEASE_MS`]) from its own clock. A coordinator that sees a
//!   newer epoch, or its epoch claimed by a better-ranked peer, steps down.
//! - Leases: `(epoch, seq)` is unique per task among the grants of the epoch's owner, and a
//!   coordinator holds at most one live primary lease and one live backup lease per task. A
//!   lease lapses after [`LEASE_MS`] without renewal; its task is granted again with a higher
//!   seq. A lapsed lease renewed late is taken back as the backup if there is room, so work in
//!   flight is not thrown away.
//! - Done: a task is done only when its result blob is held by a peer other than its
//!   renderer ([`Input::ResultHeld`]), or when this peer is the only live member.

mod coordinator;
mod worker;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use crate::job::{Job, JobStatus, Refused, TaskState};
use crate::stats::{JobClock, JobStats, ReportView};
use blendnet_proto::job::{EventBody, Offer, RevokeReason, SignError, bounded_reason};
use blendnet_proto::{
    BlobHash, EventId, JobId, JobSpec, Lease, PeerId, Role, Roles, SignedEvent, TaskSpec,
    TaskStats, VerifiedEvent, WorkRequest, WorkResponse,
};
use coordinator::Coordination;
use libp2p_identity::Keypair;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::BuildHasher as _;
use std::sync::Arc;
use worker::Worker;

/// How often a coordinator says it is alive: often enough that a takeover starts within a few
/// seconds of a crash, rarely enough to be noise on a mesh of hundreds.
pub const HEARTBEAT_MS: u64 = 1_000;
/// Silence after which the next candidate takes over: three missed heartbeats, so one lost
/// gossip message never causes a takeover.
pub const TAKEOVER_AFTER_MS: u64 = 3 * HEARTBEAT_MS;
/// How long a lease lasts without renewal, on the coordinator's clock: long enough to ride out
/// a reconnect, short enough that a vanished worker's task is rendered again within a minute.
pub const LEASE_MS: u64 = 30_000;
/// How often a worker renews its lease: three tries before it lapses.
pub const RENEW_EVERY_MS: u64 = LEASE_MS / 3;
/// How long an idle worker waits when a coordinator has nothing to grant: short, so that the
/// tasks of a lapsed lease or a lost peer are picked up quickly at the end of a job.
pub const NO_WORK_RETRY_MS: u64 = 2_000;
/// Longest wait a coordinator may impose (a bound on its `retry_after_ms`).
pub const MAX_RETRY_AFTER_MS: u64 = 60_000;
/// How long a worker waits after being told it asked the wrong peer, before asking again.
pub const NOT_COORDINATOR_RETRY_MS: u64 = 500;
/// How long a worker waits for an answer before it asks again (the shell's own request timeout
/// should fire first; this keeps a lost answer from stalling a worker for ever).
pub const WORK_REPLY_TIMEOUT_MS: u64 = 10_000;
/// How long a coordinator waits for a result to be stored by a second peer before it asks
/// again (or another holder).
pub const FETCH_RETRY_MS: u64 = 15_000;
/// Grace left to a lease whose worker disconnected: a reconnect within it keeps the lease;
/// after it, the task is granted again without waiting for the whole lease.
pub const DEPARTED_GRACE_MS: u64 = 5_000;
/// How long a frame's merge waits for its elected merger to ask for work before anyone may take
/// it: an idle peer asks every [`NO_WORK_RETRY_MS`], so one that does not is busy or gone.
pub const MERGE_PREFERENCE_MS: u64 = NO_WORK_RETRY_MS + 1_000;
/// Distinct peers a task may fail on before the job fails (DESIGN §7).
pub const MAX_TASK_FAILURES: usize = 3;
/// Least time between two [`Action::SyncJob`] hints for one job: one pull is enough to learn a
/// claim we missed; more would only repeat it.
pub const SYNC_HINT_EVERY_MS: u64 = 5_000;
/// Most jobs a board holds: far beyond any farm's history, small enough that a member
/// flooding submissions cannot exhaust memory.
pub const MAX_JOBS: usize = 10_000;
/// Most events one job holds: a 10 000-frame job needs a few per task; this leaves room for
/// retries and backups and stops a runaway coordinator.
pub const MAX_EVENTS_PER_JOB: usize = 1_000_000;

/// Rounds of timers per input: enough for a claim, its first heartbeat and a local grant.
const DRIVE_ROUNDS: usize = 4;

/// How a board is set up.
#[derive(Debug, Clone)]
pub struct BoardConfig {
    /// The node key: it signs every event this board authors. Must be ed25519.
    pub keypair: Keypair,
    /// This node's roles, as its certificates give them.
    pub roles: Roles,
    /// Whether this node takes render tasks.
    pub renders: bool,
    /// What it tells coordinators when it asks for work.
    pub offer: Offer,
}

/// A roster member as the shell sees it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Member {
    pub peer: PeerId,
    pub roles: Roles,
    /// Connected (or otherwise known alive) now.
    pub live: bool,
    /// Takes render tasks (its status says so).
    pub renders: bool,
    /// Its Blender can denoise (its status says so).
    pub denoiser: bool,
}

/// Something that happened, for [`Board::handle`].
#[derive(Debug, Clone)]
pub enum Input {
    /// An event received by gossip or anti-entropy; its signature is checked here.
    Event(SignedEvent),
    /// An event whose signature the shell already checked (on another thread, or once for many
    /// boards).
    Verified(VerifiedEvent),
    /// The members of the mesh now, with liveness; replaces the previous list. Events from
    /// peers not on it are dropped, so send it first, and again whenever the roster or a
    /// connection changes.
    Members(Vec<Member>),
    /// A work request from a worker; answer with [`Action::RespondWork`] carrying `id`.
    WorkRequest {
        id: u64,
        from: PeerId,
        request: WorkRequest,
    },
    /// The answer to a [`Action::SendWork`]: the request as sent, and the response, or `None`
    /// if it failed (timeout, disconnect, refused stream).
    WorkReply {
        from: PeerId,
        request: WorkRequest,
        response: Option<WorkResponse>,
    },
    /// The render side finished a started task; the result blob is stored here. The board
    /// adds its offer's price to `stats` when they state none.
    TaskFinished {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        result: BlobHash,
        stats: TaskStats,
    },
    /// The render side could not render a started task.
    TaskFailed {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        reason: String,
    },
    /// `holder` holds the whole blob `hash` (a fetch finished, or a `have` announcement).
    ResultHeld { hash: BlobHash, holder: PeerId },
    /// A [`Action::FetchResult`] from `from` failed.
    FetchFailed { hash: BlobHash, from: PeerId },
    /// Shutdown or preemption: hand back the running lease and take no more.
    Drain,
    /// A deadline passed (or nothing happened; harmless).
    Tick,
}

/// Why the render side must stop a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum StopReason {
    /// Another copy finished first.
    TaskDone,
    /// Another coordinator's carving covers these samples.
    Orphaned,
    /// The coordinator took the lease back.
    Revoked(RevokeReason),
    JobDone,
    JobCancelled,
    JobFailed,
    /// This node is shutting down or being preempted.
    Drained,
}

/// Something for the shell to do, in order.
#[derive(Debug, Clone)]
pub enum Action {
    /// Store the event durably before executing the next action.
    Persist(VerifiedEvent),
    /// Gossip the event on its topic ([`EventBody::topic`]).
    Publish(VerifiedEvent),
    /// Send a work request to `to` on `/blendnet/work/1`; report the outcome as
    /// [`Input::WorkReply`].
    SendWork { to: PeerId, request: WorkRequest },
    /// Answer the work request `id`.
    RespondWork { id: u64, response: WorkResponse },
    /// Render `task` of `job` under `lease` (for a merge: merge the slice results `inputs`
    /// and finish the frame); report [`Input::TaskFinished`] or [`Input::TaskFailed`].
    StartTask {
        job: JobId,
        spec: Arc<JobSpec>,
        task: TaskSpec,
        lease: Lease,
        inputs: Vec<BlobHash>,
    },
    /// Stop rendering `task` (kill or abandon the Blender run); report nothing.
    StopTask {
        job: JobId,
        task: TaskSpec,
        reason: StopReason,
    },
    /// Fetch the result blob `hash` from `from` and keep it; report [`Input::ResultHeld`]
    /// (holder: this node) or [`Input::FetchFailed`].
    FetchResult {
        job: JobId,
        task: TaskSpec,
        hash: BlobHash,
        from: PeerId,
    },
    /// This node rendered `hash`: ask `to` to fetch and keep it; report [`Input::ResultHeld`]
    /// once it does.
    ReplicateResult {
        job: JobId,
        task: TaskSpec,
        hash: BlobHash,
        to: PeerId,
    },
    /// Run anti-entropy for `job` with `with` soon: it knows something this board does not.
    SyncJob { job: JobId, with: PeerId },
    /// The job reached an outcome (for the API's event stream).
    JobFinished { job: JobId, status: JobStatus },
}

/// Why an input was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum DropReason {
    /// The signature does not verify (or the author's id holds no usable key).
    BadSignature,
    /// The author is not on the roster.
    NotMember,
    /// The author lacks the role the event needs.
    Unauthorized,
    /// A coordinator event of an epoch owned by a better-ranked peer, or an old heartbeat.
    StaleEpoch,
    /// An event of a job whose submission this board does not hold (anti-entropy brings it
    /// again later).
    UnknownJob,
    /// Breaks a rule of the job (a task the job does not have, a cancel by someone else), or a
    /// signed body that does not decode or breaks a rule on its own.
    Invalid,
    /// Over [`MAX_JOBS`] or [`MAX_EVENTS_PER_JOB`].
    Overflow,
}

/// Counts of what this board refused and ignored, for logs and the API.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub dropped: BTreeMap<DropReason, u64>,
    /// Events received again (normal with gossip and anti-entropy).
    pub duplicates: u64,
    /// Events accepted, then removed because a better-ranked claimer owns their epoch.
    pub fenced: u64,
}

impl Counters {
    /// How many inputs were dropped for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    /// How many inputs were dropped in all.
    pub fn total_dropped(&self) -> u64 {
        self.dropped.values().sum()
    }

    fn drop(&mut self, reason: DropReason) {
        *self.dropped.entry(reason).or_default() += 1;
    }
}

/// A job in a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSummary {
    pub id: JobId,
    pub name: String,
    pub submitter: PeerId,
    pub status: JobStatus,
    /// The current coordinator and its epoch, if anyone claimed the job.
    pub coordinator: Option<(u64, PeerId)>,
    /// Frame-samples done over frame-samples in all.
    pub done_units: u64,
    pub total_units: u64,
    /// Some slice's samples are not exactly a single render's (see `TaskStats::inexact`): the
    /// merged frame will be statistically, not exactly, equal to a local render.
    pub inexact: bool,
    /// Render milliseconds per frame-sample measured so far on one worker (averaged over the
    /// workers, whatever their cores), once anything is measured.
    pub ms_per_unit: Option<f64>,
}

/// One frame's progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FrameProgress {
    pub frame: u32,
    pub samples_done: u64,
    pub samples: u64,
}

/// One task as this board knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskView {
    pub task: TaskSpec,
    pub state: TaskState,
    /// Whether the task is part of the job (not orphaned by the cover rule).
    pub in_cover: bool,
    /// Results reported: (renderer, result).
    pub results: Vec<(PeerId, BlobHash)>,
    /// Failures reported: (worker, reason).
    pub failures: Vec<(PeerId, String)>,
    /// Results reported, each with its worker's measurements.
    pub reports: Vec<ReportView>,
    /// Grants beyond the first (a lapsed lease granted again, a backup).
    pub retries: u64,
}

/// Everything about one job, for the API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    pub summary: JobSummary,
    pub spec: JobSpec,
    pub frames: Vec<FrameProgress>,
    pub tasks: Vec<TaskView>,
    /// The finished outputs (manifests of the files the scene's output settings name): merged
    /// frames of a sample-split job, done tasks of a whole-frame job.
    pub outputs: Vec<BlobHash>,
    /// Whether this board coordinates the job now.
    pub coordinating: bool,
    /// Where the job's time and money went.
    pub stats: JobStats,
}

/// A job's anti-entropy digest: peers holding the same events have equal digests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct JobDigest {
    pub hash: [u8; 32],
    pub events: usize,
}

/// Why a board could not be made.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("the node key must be ed25519, so that peers can verify events from its peer id")]
    KeyNotEd25519,
}

/// Why a submission was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("this node lacks the submit role")]
    NotASubmitter,
    #[error("invalid job: {0}")]
    Invalid(#[from] blendnet_proto::job::InvalidSpec),
    #[error("this board holds {MAX_JOBS} jobs already")]
    TooManyJobs,
    #[error("could not sign the submission: {0}")]
    Sign(#[from] SignError),
}

/// Why a cancellation was refused.
#[derive(Debug, thiserror::Error)]
pub enum CancelError {
    #[error("no job {0} on this node")]
    UnknownJob(JobId),
    #[error("only the submitter of job {0} may cancel it")]
    NotSubmitter(JobId),
    #[error("job {0} is already finished")]
    Finished(JobId),
    #[error("could not sign the cancellation: {0}")]
    Sign(#[from] SignError),
}

/// Where an event came from: decides which checks apply and whether it is persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Gossip or anti-entropy.
    Gossip,
    /// Carried in a work request or response from this peer.
    Work(PeerId),
    /// Authored here: persisted, then published.
    Local,
    /// Read back from this node's own store at restart: already checked and persisted.
    Restore,
}

/// A job and this node's runtime state for it.
#[derive(Debug)]
struct Entry {
    job: Job,
    /// When this board learned of the job (its clock).
    known_since: u64,
    /// When the current claim was last heard from (claim seen, or heartbeat).
    last_heard: u64,
    /// Peers with the coordinate role, best rank first.
    candidates: Vec<PeerId>,
    /// How many takeover periods this node waits before claiming; `None` if it never does.
    takeover_k: Option<u64>,
    /// The coordinator runtime, while this node coordinates the job.
    coord: Option<Coordination>,
    last_sync_hint: Option<u64>,
}

/// What the coordinator runtime needs to know of the mesh.
#[derive(Debug, Clone, Copy)]
struct Mesh<'a> {
    me: PeerId,
    /// Whether this node renders, and whether its Blender can denoise.
    me_renders: bool,
    me_denoiser: bool,
    members: &'a HashMap<PeerId, Member>,
    /// Live members, this node included.
    live: usize,
    /// Live members that render, this node included if it does.
    live_renderers: usize,
    /// Members with the render role that render, live or not, this node included if it does.
    render_members: usize,
}

impl Mesh<'_> {
    fn is_live(&self, peer: &PeerId) -> bool {
        *peer == self.me || self.members.get(peer).is_some_and(|m| m.live)
    }

    /// Whether `peer`'s Blender can denoise, as far as this node knows.
    fn can_denoise(&self, peer: &PeerId) -> bool {
        if *peer == self.me {
            return self.me_denoiser;
        }
        self.members.get(peer).is_some_and(|m| m.denoiser)
    }

    /// Whether any render peer of the mesh, live or not, can denoise.
    fn has_denoiser(&self) -> bool {
        (self.me_renders && self.me_denoiser)
            || self
                .members
                .values()
                .any(|m| m.renders && m.denoiser && m.roles.contains(Role::Render))
    }

    /// Live peers that render, this node included if it does.
    fn live_render_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        let me = self.me_renders.then_some(self.me);
        me.into_iter().chain(
            self.members
                .values()
                .filter(|m| m.live && m.renders && m.roles.contains(Role::Render))
                .map(|m| m.peer),
        )
    }
}

/// Hashing for event ids in the board's index. Ids are BLAKE3 outputs already, so SipHash's
/// work is wasted on them (it dominated a farm simulation); their words are mixed with a
/// per-board random key instead, so that no member can grind ids that collide in this table.
#[derive(Debug, Clone, Copy)]
struct IdHashKey(u64);

impl IdHashKey {
    fn random() -> IdHashKey {
        IdHashKey(std::hash::RandomState::new().hash_one(0x0B1E_0D1Du64))
    }
}

impl std::hash::BuildHasher for IdHashKey {
    type Hasher = IdHasher;
    fn build_hasher(&self) -> IdHasher {
        IdHasher(self.0)
    }
}

#[derive(Debug)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Eight bytes of a BLAKE3 output are as good as any other eight.
        let mut w = [0u8; 8];
        let n = bytes.len().min(8);
        w[..n].copy_from_slice(&bytes[..n]);
        self.0 = (self.0 ^ u64::from_le_bytes(w))
            .rotate_left(29)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 31)
    }
}

/// One peer's job board. See the module documentation.
#[derive(Debug)]
pub struct Board {
    me: PeerId,
    keypair: Keypair,
    roles: Roles,
    renders: bool,
    offer: Offer,
    members: HashMap<PeerId, Member>,
    /// Coordinate-role members (this node included if it has the role), sorted by id.
    coordinators: Vec<PeerId>,
    live: usize,
    live_renderers: usize,
    render_members: usize,
    jobs: BTreeMap<JobId, Entry>,
    /// Active jobs by submission time, for workers choosing what to ask for.
    active: BTreeSet<(u64, JobId)>,
    /// Every event held.
    index: HashSet<EventId, IdHashKey>,
    worker: Worker,
    counters: Counters,
    wake: Option<u64>,
}

impl Board {
    /// An empty board.
    pub fn new(config: BoardConfig, now: u64) -> Result<Board, BoardError> {
        let me = config.keypair.public().to_peer_id();
        if blendnet_proto::job::inlined_key(&me).is_none() {
            return Err(BoardError::KeyNotEd25519);
        }
        let renders = config.renders && config.roles.contains(Role::Render);
        let mut board = Board {
            me,
            keypair: config.keypair,
            roles: config.roles,
            renders,
            offer: config.offer,
            members: HashMap::new(),
            coordinators: Vec::new(),
            live: 1,
            live_renderers: usize::from(renders),
            render_members: usize::from(renders),
            jobs: BTreeMap::new(),
            active: BTreeSet::new(),
            index: HashSet::with_hasher(IdHashKey::random()),
            worker: Worker::default(),
            counters: Counters::default(),
            wake: Some(now),
        };
        board.set_members(Vec::new());
        Ok(board)
    }

    /// A board rebuilt from the events this node persisted, after a restart. Events are checked
    /// again (a damaged store drops what it damaged); membership is not (they were members when
    /// their events were accepted). Leases get a grace period from `now`; a lease this node
    /// held and had not reported is rendered again.
    pub fn restore(
        config: BoardConfig,
        events: impl IntoIterator<Item = SignedEvent>,
        now: u64,
    ) -> Result<Board, BoardError> {
        let mut board = Board::new(config, now)?;
        let mut verified = Vec::new();
        for ev in events {
            match ev.verify() {
                Ok(v) => verified.push(v),
                Err(_) => board.counters.drop(DropReason::BadSignature),
            }
        }
        // Submissions first: every other event needs its job.
        verified.sort_by_key(|e| !matches!(e.body(), EventBody::Submitted { .. }));
        let mut sink = Vec::new();
        for ev in verified {
            let _ = board.take(now, ev, Source::Restore, &mut sink);
        }
        board.worker.restore_reports(&board.me, &board.jobs);
        Ok(board)
    }

    /// This node's peer id.
    pub fn me(&self) -> PeerId {
        self.me
    }

    /// Feeds one input at `now`; returns what to do, in order.
    pub fn handle(&mut self, now: u64, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Event(signed) => {
                let _ = self.take_signed(now, signed, Source::Gossip, &mut out);
            }
            Input::Verified(ev) => {
                let _ = self.take(now, ev, Source::Gossip, &mut out);
            }
            Input::Members(list) => self.on_members(now, list, &mut out),
            Input::WorkRequest { id, from, request } => {
                let response = self.serve(now, from, request, &mut out);
                out.push(Action::RespondWork { id, response });
            }
            Input::WorkReply {
                from,
                request,
                response,
            } => self.on_reply(now, from, request, response, &mut out),
            Input::TaskFinished {
                job,
                task,
                lease,
                result,
                stats,
            } => self.on_task_finished(now, (job, task, lease), result, stats, &mut out),
            Input::TaskFailed {
                job,
                task,
                lease,
                reason,
            } => self.on_task_failed(now, job, task, lease, &reason, &mut out),
            Input::ResultHeld { hash, holder } => self.on_result_held(now, hash, holder, &mut out),
            Input::FetchFailed { hash, from } => self.on_fetch_failed(now, hash, from, &mut out),
            Input::Drain => self.on_drain(now, &mut out),
            Input::Tick => {}
        }
        self.drive(now, &mut out);
        out
    }

    /// Submits a job authored here (this node needs the submit role).
    pub fn submit(&mut self, now: u64, spec: JobSpec) -> Result<(JobId, Vec<Action>), SubmitError> {
        if !self.roles.contains(Role::Submit) {
            return Err(SubmitError::NotASubmitter);
        }
        spec.validate()?;
        if self.jobs.len() >= MAX_JOBS {
            return Err(SubmitError::TooManyJobs);
        }
        let ev = SignedEvent::sign(&self.keypair, EventBody::Submitted { spec })?;
        let id = JobId::from(ev.id());
        let mut out = Vec::new();
        let _ = self.take(now, ev, Source::Local, &mut out);
        self.drive(now, &mut out);
        Ok((id, out))
    }

    /// Cancels a job this node submitted: no more grants, running tasks stop everywhere.
    pub fn cancel(&mut self, now: u64, job: JobId) -> Result<Vec<Action>, CancelError> {
        let entry = self.jobs.get(&job).ok_or(CancelError::UnknownJob(job))?;
        if entry.job.submitter() != self.me {
            return Err(CancelError::NotSubmitter(job));
        }
        if !entry.job.status().is_active() {
            return Err(CancelError::Finished(job));
        }
        let ev = SignedEvent::sign(&self.keypair, EventBody::Cancelled { job })?;
        let mut out = Vec::new();
        let _ = self.take(now, ev, Source::Local, &mut out);
        self.drive(now, &mut out);
        Ok(out)
    }

    /// When to call [`Board::handle`] with [`Input::Tick`] next, if anything waits for time.
    pub fn next_deadline(&self) -> Option<u64> {
        self.wake
    }

    /// What was dropped and ignored.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Every job, in submission order.
    pub fn jobs(&self) -> Vec<JobSummary> {
        let mut list: Vec<&Entry> = self.jobs.values().collect();
        list.sort_by_key(|e| (e.job.spec().submitted_at, e.job.id()));
        list.into_iter().map(summary).collect()
    }

    /// One job in full, without a wall time (see [`Board::job_with_clock`]).
    pub fn job(&self, id: &JobId) -> Option<JobView> {
        self.job_with_clock(id, JobClock::default())
    }

    /// One job in full, with this node's `clock` of it (kept by the shell) for its wall time.
    pub fn job_with_clock(&self, id: &JobId, clock: JobClock) -> Option<JobView> {
        let entry = self.jobs.get(id)?;
        let job = &entry.job;
        Some(JobView {
            summary: summary(entry),
            spec: (**job.spec()).clone(),
            frames: job
                .frame_progress()
                .into_iter()
                .map(|(frame, samples_done, samples)| FrameProgress {
                    frame,
                    samples_done,
                    samples,
                })
                .collect(),
            tasks: job
                .tasks()
                .iter()
                .map(|(t, r)| TaskView {
                    task: *t,
                    state: r.state,
                    in_cover: job.in_cover(t),
                    results: r.reports().map(|r| (r.lease.worker, r.result)).collect(),
                    failures: r
                        .failures()
                        .map(|(p, _, reason)| (p, reason.to_string()))
                        .collect(),
                    reports: r
                        .reports()
                        .map(|r| ReportView {
                            worker: r.lease.worker,
                            result: r.result,
                            backup: r.lease.backup,
                            stats: r.stats,
                        })
                        .collect(),
                    retries: (r.grants().count() as u64).saturating_sub(1),
                })
                .collect(),
            outputs: job.outputs().map(|(_, hash)| hash).collect(),
            coordinating: entry.coord.is_some(),
            stats: JobStats::of(job, clock),
        })
    }

    /// The anti-entropy digest of every job.
    pub fn digests(&self) -> Vec<(JobId, JobDigest)> {
        self.jobs
            .iter()
            .map(|(id, e)| {
                let (hash, events) = e.job.digest();
                (*id, JobDigest { hash, events })
            })
            .collect()
    }

    /// The digest of one job.
    pub fn digest(&self, job: &JobId) -> Option<JobDigest> {
        self.jobs.get(job).map(|e| {
            let (hash, events) = e.job.digest();
            JobDigest { hash, events }
        })
    }

    /// The events of a job, its submission first: what anti-entropy sends to a peer whose
    /// digest differs (filtered by [`Board::has_event`] on the other side).
    pub fn events(&self, job: &JobId) -> &[VerifiedEvent] {
        self.jobs.get(job).map_or(&[], |e| e.job.events())
    }

    /// Whether this board holds the event.
    pub fn has_event(&self, id: &EventId) -> bool {
        self.index.contains(id)
    }

    /// The job model, for readers that need more than the views.
    pub fn job_model(&self, id: &JobId) -> Option<&Job> {
        self.jobs.get(id).map(|e| &e.job)
    }

    /// Whether this board coordinates `job` now.
    pub fn is_coordinating(&self, job: &JobId) -> bool {
        self.jobs.get(job).is_some_and(|e| e.coord.is_some())
    }

    /// Live members as this board sees them, itself included (1: a mesh of one).
    pub fn live_members(&self) -> usize {
        self.live
    }

    /// The task this node renders now, if any.
    pub fn running(&self) -> Option<(JobId, TaskSpec, Lease)> {
        self.worker.running()
    }

    fn sign(&self, body: EventBody) -> Option<VerifiedEvent> {
        // Our own bodies are bounded (reasons are cut to size), and the key was checked at
        // construction; a failure here would be a bug, and is logged by dropping the event.
        SignedEvent::sign(&self.keypair, body).ok()
    }

    /// Signs and takes an event authored here (persisted, then published).
    fn emit(&mut self, now: u64, body: EventBody, out: &mut Vec<Action>) -> Option<VerifiedEvent> {
        let ev = self.sign(body)?;
        self.take(now, ev.clone(), Source::Local, out).ok()?;
        Some(ev)
    }

    /// Verifies and takes an event received from elsewhere. Returns the verified event when it
    /// is held here afterwards (new or already held).
    fn take_signed(
        &mut self,
        now: u64,
        signed: SignedEvent,
        source: Source,
        out: &mut Vec<Action>,
    ) -> Option<VerifiedEvent> {
        match signed.verify() {
            Ok(ev) => self.take(now, ev.clone(), source, out).ok().map(|_| ev),
            Err(
                blendnet_proto::job::EventError::Invalid { .. }
                | blendnet_proto::job::EventError::Malformed(_),
            ) => {
                self.counters.drop(DropReason::Invalid);
                None
            }
            Err(_) => {
                self.counters.drop(DropReason::BadSignature);
                None
            }
        }
    }

    fn drop_input(&mut self, reason: DropReason) -> Result<bool, DropReason> {
        self.counters.drop(reason);
        Err(reason)
    }

    /// Takes a verified event: checks, stores, persists, reacts. `Ok(true)` if it was new.
    fn take(
        &mut self,
        now: u64,
        ev: VerifiedEvent,
        source: Source,
        out: &mut Vec<Action>,
    ) -> Result<bool, DropReason> {
        if self.index.contains(&ev.id()) {
            self.counters.duplicates += 1;
            return Ok(false);
        }
        let author = ev.author();
        let checks_membership = matches!(source, Source::Gossip | Source::Work(_));
        if checks_membership && author != self.me {
            let Some(member) = self.members.get(&author) else {
                return self.drop_input(DropReason::NotMember);
            };
            let needed = match ev.body() {
                EventBody::Submitted { .. } | EventBody::Cancelled { .. } => Role::Submit,
                EventBody::Rendered { .. } | EventBody::TaskFailed { .. } => Role::Render,
                _ => Role::Coordinate,
            };
            if !member.roles.contains(needed) {
                return self.drop_input(DropReason::Unauthorized);
            }
        }
        match ev.body() {
            EventBody::Submitted { .. } => {
                if self.jobs.len() >= MAX_JOBS {
                    return self.drop_input(DropReason::Overflow);
                }
                let Some(job) = Job::new(ev.clone()) else {
                    return self.drop_input(DropReason::Invalid);
                };
                let id = job.id();
                self.index.insert(ev.id());
                let candidates = self.rank_candidates(&job);
                self.jobs.insert(
                    id,
                    Entry {
                        job,
                        known_since: now,
                        last_heard: now,
                        candidates,
                        takeover_k: None,
                        coord: None,
                        last_sync_hint: None,
                    },
                );
                self.persist(&ev, source, out);
                let applied = crate::job::Applied {
                    claim_changed: true,
                    status_changed: true,
                    ..Default::default()
                };
                self.react(now, id, &ev, applied, source, out);
                Ok(true)
            }
            EventBody::Heartbeat { job, epoch, .. } => {
                let (job, epoch) = (*job, *epoch);
                self.on_heartbeat(now, job, epoch, author, out)
            }
            body => {
                let Some(job) = body.job() else {
                    return self.drop_input(DropReason::Invalid);
                };
                let Some(entry) = self.jobs.get_mut(&job) else {
                    return self.drop_input(DropReason::UnknownJob);
                };
                if entry.job.events().len() >= MAX_EVENTS_PER_JOB {
                    return self.drop_input(DropReason::Overflow);
                }
                match entry.job.accept(ev.clone()) {
                    Err(Refused::StaleEpoch { .. }) => self.drop_input(DropReason::StaleEpoch),
                    Err(_) => self.drop_input(DropReason::Invalid),
                    Ok(applied) => {
                        self.index.insert(ev.id());
                        for id in &applied.fenced {
                            self.index.remove(id);
                            self.counters.fenced += 1;
                        }
                        self.persist(&ev, source, out);
                        self.react(now, job, &ev, applied, source, out);
                        Ok(true)
                    }
                }
            }
        }
    }

    fn persist(&self, ev: &VerifiedEvent, source: Source, out: &mut Vec<Action>) {
        match source {
            Source::Restore => {}
            Source::Local => {
                out.push(Action::Persist(ev.clone()));
                out.push(Action::Publish(ev.clone()));
            }
            Source::Gossip | Source::Work(_) => out.push(Action::Persist(ev.clone())),
        }
    }

    fn on_heartbeat(
        &mut self,
        now: u64,
        job: JobId,
        epoch: u64,
        author: PeerId,
        out: &mut Vec<Action>,
    ) -> Result<bool, DropReason> {
        let Some(entry) = self.jobs.get_mut(&job) else {
            return self.drop_input(DropReason::UnknownJob);
        };
        match entry.job.claim() {
            Some((e, c)) if e == epoch && c == author => {
                entry.last_heard = now;
                Ok(false)
            }
            Some((e, c))
                if epoch < e || (epoch == e && entry.job.rank(&c) < entry.job.rank(&author)) =>
            {
                self.drop_input(DropReason::StaleEpoch)
            }
            _ => {
                // A claim we do not hold yet: pull it from its author.
                if entry
                    .last_sync_hint
                    .is_none_or(|t| now >= t + SYNC_HINT_EVERY_MS)
                {
                    entry.last_sync_hint = Some(now);
                    out.push(Action::SyncJob { job, with: author });
                }
                Ok(false)
            }
        }
    }

    /// Reacts to an accepted event: claims, coordination, the worker, result indexes.
    fn react(
        &mut self,
        now: u64,
        job: JobId,
        ev: &VerifiedEvent,
        applied: crate::job::Applied,
        source: Source,
        out: &mut Vec<Action>,
    ) {
        match ev.body() {
            EventBody::Granted { task, lease, .. } if lease.worker == self.me => {
                self.worker.note_lease(job, *task, *lease);
            }
            _ => {}
        }
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        let status = entry.job.status();
        if status.is_active() {
            self.active.insert((entry.job.spec().submitted_at, job));
        } else {
            self.active.remove(&(entry.job.spec().submitted_at, job));
        }
        // Any event of the current coordinator shows it alive, like a heartbeat.
        if entry
            .job
            .claim()
            .is_some_and(|(e, c)| c == ev.author() && ev.body().coordinator_epoch() == Some(e))
        {
            entry.last_heard = now;
        }
        if applied.claim_changed {
            entry.last_heard = now;
            self.worker.forget_hint(&job);
            self.update_takeover(&job);
        }
        if applied.status_changed && !status.is_active() && source != Source::Restore {
            out.push(Action::JobFinished { job, status });
        }
        let rebuilt = !applied.fenced.is_empty();
        if applied.claim_changed || applied.status_changed || rebuilt {
            self.sync_coordination(now, job, out);
        } else if !applied.tasks.is_empty() {
            self.reconcile(now, job, applied.tasks.iter().copied(), out);
        }
        self.worker_check(now, job, &applied.tasks, out);
    }

    fn on_members(&mut self, now: u64, list: Vec<Member>, out: &mut Vec<Action>) {
        let before: HashMap<PeerId, Member> = std::mem::take(&mut self.members);
        self.set_members(list);
        let changed: Vec<PeerId> = self
            .members
            .iter()
            .filter(|(p, m)| before.get(p) != Some(m))
            .map(|(p, _)| *p)
            .chain(
                before
                    .keys()
                    .filter(|p| !self.members.contains_key(p))
                    .copied(),
            )
            .collect();
        if changed.is_empty() {
            return;
        }
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in &ids {
            self.update_takeover(id);
        }
        self.coordinators_on_members(now, &changed, out);
    }

    fn set_members(&mut self, list: Vec<Member>) {
        self.members = list
            .into_iter()
            .filter(|m| m.peer != self.me)
            .map(|m| (m.peer, m))
            .collect();
        let renders = |m: &Member| m.renders && m.roles.contains(Role::Render);
        self.live = 1 + self.members.values().filter(|m| m.live).count();
        self.live_renderers = usize::from(self.renders)
            + self
                .members
                .values()
                .filter(|m| m.live && renders(m))
                .count();
        self.render_members =
            usize::from(self.renders) + self.members.values().filter(|m| renders(m)).count();
        let mut coordinators: Vec<PeerId> = self
            .members
            .values()
            .filter(|m| m.roles.contains(Role::Coordinate))
            .map(|m| m.peer)
            .collect();
        if self.roles.contains(Role::Coordinate) {
            coordinators.push(self.me);
        }
        coordinators.sort();
        if coordinators != self.coordinators {
            self.coordinators = coordinators;
            let ids: Vec<JobId> = self.jobs.keys().copied().collect();
            for id in ids {
                let candidates = self.rank_candidates(&self.jobs[&id].job);
                if let Some(e) = self.jobs.get_mut(&id) {
                    e.candidates = candidates;
                }
            }
        }
    }

    fn rank_candidates(&self, job: &Job) -> Vec<PeerId> {
        let mut c = self.coordinators.clone();
        c.sort_by_key(|p| job.rank(p));
        c
    }

    fn is_live(&self, peer: &PeerId) -> bool {
        *peer == self.me || self.members.get(peer).is_some_and(|m| m.live)
    }

    /// Recomputes how many takeover periods this node waits for `job`.
    fn update_takeover(&mut self, id: &JobId) {
        let me = self.me;
        let can = self.roles.contains(Role::Coordinate);
        let live: Vec<PeerId> = match self.jobs.get(id) {
            Some(e) => e
                .candidates
                .iter()
                .filter(|p| self.is_live(p))
                .copied()
                .collect(),
            None => return,
        };
        let Some(entry) = self.jobs.get_mut(id) else {
            return;
        };
        entry.takeover_k = if !can {
            None
        } else {
            match entry.job.claim() {
                None => live.iter().position(|p| *p == me).map(|k| k as u64),
                Some((_, c)) if c == me => None,
                Some((_, c)) => live
                    .iter()
                    .filter(|p| **p != c)
                    .position(|p| *p == me)
                    .map(|k| k as u64 + 1),
            }
        };
    }

    fn takeover_at(entry: &Entry) -> Option<u64> {
        let k = entry.takeover_k?;
        if !entry.job.status().is_active() || entry.coord.is_some() {
            return None;
        }
        Some(match entry.job.claim() {
            None => entry.known_since + k * TAKEOVER_AFTER_MS,
            Some(_) => entry.last_heard + k * TAKEOVER_AFTER_MS,
        })
    }

    /// Runs timers and the worker; recomputes the next deadline.
    fn drive(&mut self, now: u64, out: &mut Vec<Action>) {
        // What one round does can make another timer due at once (a claim starts a
        // coordination whose first heartbeat is due now); a few rounds settle it.
        for _ in 0..DRIVE_ROUNDS {
            if self.wake.is_some_and(|w| w <= now) {
                let ids: Vec<JobId> = self.active.iter().map(|(_, id)| *id).collect();
                for id in &ids {
                    let due = self.jobs.get(id).and_then(Board::takeover_at);
                    if due.is_some_and(|t| t <= now) {
                        self.take_over(now, *id, out);
                    }
                    self.coordinator_timers(now, *id, out);
                }
            }
            self.worker_drive(now, out);
            self.wake = self.compute_wake();
            if self.wake.is_none_or(|w| w > now) {
                break;
            }
        }
    }

    fn compute_wake(&self) -> Option<u64> {
        let mut wake = self.worker.deadline(&self.active);
        for (_, id) in &self.active {
            let Some(entry) = self.jobs.get(id) else {
                continue;
            };
            let t = match &entry.coord {
                Some(c) => c.deadline(),
                None => Board::takeover_at(entry),
            };
            wake = match (wake, t) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        wake
    }

    fn take_over(&mut self, now: u64, job: JobId, out: &mut Vec<Action>) {
        let Some(entry) = self.jobs.get(&job) else {
            return;
        };
        let epoch = entry.job.claim().map_or(1, |(e, _)| e + 1);
        self.emit(now, EventBody::Coordinating { job, epoch }, out);
    }

    fn on_task_finished(
        &mut self,
        now: u64,
        (job, task, lease): (JobId, TaskSpec, Lease),
        result: BlobHash,
        mut stats: TaskStats,
        out: &mut Vec<Action>,
    ) {
        self.worker.finished(job, task, lease);
        // The report states what this worker's time costs, so a job's cost is a sum over its
        // events wherever they are read.
        if stats.price_per_hour_micros.is_none() {
            stats.price_per_hour_micros = self.offer.price_per_hour_micros;
        }
        let wanted = self.jobs.get(&job).is_some_and(|e| {
            e.job.status().is_active() && e.job.task(&task).is_some_and(|r| !r.state.is_done())
        });
        if !wanted {
            return;
        }
        if let Some(ev) = self.emit(
            now,
            EventBody::Rendered {
                job,
                task,
                lease,
                result,
                stats,
            },
            out,
        ) {
            self.worker.report(job, ev);
        }
    }

    fn on_task_failed(
        &mut self,
        now: u64,
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        reason: &str,
        out: &mut Vec<Action>,
    ) {
        self.worker.finished(job, task, lease);
        if !self
            .jobs
            .get(&job)
            .is_some_and(|e| e.job.status().is_active())
        {
            return;
        }
        let reason = bounded_reason(reason);
        if let Some(ev) = self.emit(
            now,
            EventBody::TaskFailed {
                job,
                task,
                lease,
                reason,
            },
            out,
        ) {
            self.worker.report(job, ev);
        }
    }
}

fn summary(entry: &Entry) -> JobSummary {
    let job = &entry.job;
    let progress = job.frame_progress();
    JobSummary {
        id: job.id(),
        name: job.spec().name.clone(),
        submitter: job.submitter(),
        status: job.status(),
        coordinator: job.claim(),
        done_units: progress.iter().map(|(_, d, _)| d).sum(),
        total_units: progress.iter().map(|(_, _, t)| t).sum(),
        inexact: job
            .tasks()
            .values()
            .any(|t| t.reports().any(|r| r.stats.inexact)),
        ms_per_unit: job.speed(None).ms_per_unit(),
    }
}

/// The revoke reason matching a finished job's status.
fn revoke_reason(status: &JobStatus) -> RevokeReason {
    match status {
        JobStatus::Done => RevokeReason::JobDone,
        JobStatus::Cancelled => RevokeReason::JobCancelled,
        JobStatus::Failed { .. } | JobStatus::Active => RevokeReason::JobFailed,
    }
}
