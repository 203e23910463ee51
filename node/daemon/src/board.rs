//! The board actor: this peer's job board (the pure [`blendnet_core::board::Board`]) wired to
//! the mesh, the disk, the render actor and the blob store.
//!
//! ```text
//!  gossip jobs/tasks ─┐                                   ┌─▶ redb `board_events` (Persist, batched, before anything else)
//!  members (1 s poll) ┤                                   ├─▶ publisher task ─▶ gossip (Publish, in order)
//!  /blendnet/work/1 ──┤                                   ├─▶ /blendnet/work/1 requests (SendWork) ─┐
//!  /blendnet/board/1 ─┼──▶ BoardActor ──▶ core Board ──▶──┼─▶ render actor (StartTask, StopTask)    │
//!  render reports ────┤        ▲                          ├─▶ blob fetches (FetchResult, Replicate) │
//!  API (submit, …) ───┘        └──── replies, results ◀───┴──────────────────────────────────────────┘
//! ```
//!
//! The actor owns the core board; everything slow (streams, fetches, gossip) runs in spawned
//! tasks that report back through the inbox, so the loop never waits on a peer. Every event the
//! board accepts is committed to the database before the actions after it run, so a killed
//! daemon restarts ([`Board::restore`](blendnet_core::board::Board::restore)) where it was.
//! Anti-entropy: every [`SYNC_EVERY`] the actor compares job digests with one random live
//! member and pulls the events of jobs that differ.
//!
//! The actor also keeps each job's clock ([`JobClock`]: when this node saw the job begin and
//! end, on its own clock) in redb `job_clocks`, for the job's wall time in its statistics.
//! An end is recorded only when it was seen as it happened: a job submitted here or gossiped
//! live, an outcome reached by a local or gossiped event; what anti-entropy brings in late
//! (after a partition, a restart, or to a node that joined after the job began) leaves that end
//! unknown rather than wrong.
//!
//! The actor also delivers: after every change to a job submitted here with an output folder,
//! its finished outputs go to [`Deliveries`] (see `deliver.rs`), which copies them there.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blendnet_core::JobClock;
use blendnet_core::board::{
    self as core_board, Action, BoardConfig, Input, JobSummary, JobView, Member,
};
use blendnet_net::identity::Keypair;
use blendnet_net::{Delivery, Net, PeerId, Streams};
use blendnet_proto::board::{
    BOARD_PROTOCOL, BoardRequest, BoardResponse, MAX_BOARD_REQUEST_BYTES, MAX_BOARD_RESPONSE_BYTES,
    MAX_EVENTS_PER_PAGE,
};
use blendnet_proto::frame::{read_frame, write_frame};
use blendnet_proto::job::{EventBody, MAX_WORK_BYTES, Offer};
use blendnet_proto::{
    BlobHash, JobId, JobSpec, Roles, SignedEvent, Topic, WORK_PROTOCOL, WorkRequest, WorkResponse,
};
use futures::AsyncWriteExt;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::api::JobChange;
use crate::blobs::Blobs;
use crate::deliver::{Deliveries, OutputsView};
use crate::render::{Render, RenderMessage, RenderReport};

/// Every event the board accepted, by event id: the board is rebuilt from them at start-up.
const EVENTS_TABLE: TableDefinition<'static, &'static [u8], &'static [u8]> =
    TableDefinition::new("board_events");

/// Each job's clock as this node saw it, by job id: a [`JobClock`] in JSON.
const CLOCKS_TABLE: TableDefinition<'static, &'static [u8], &'static [u8]> =
    TableDefinition::new("job_clocks");

/// Messages waiting for the actor: gossip bursts (a coordinator granting to many workers at
/// once) and work requests; senders wait when it is full.
const INBOX: usize = 1024;

/// Gossip waiting to be published, in order. The board publishes one event per state change.
const PUBLISH_QUEUE: usize = 4096;

/// Starts and stops waiting for the render actor: the board starts one task at a time and
/// stops it at most once, so a handful at most.
const RENDER_QUEUE: usize = 64;

/// Changes waiting for API event-stream subscribers; a slow subscriber misses the oldest.
const CHANGES: usize = 256;

/// How long an API request waits for the board to start (it needs this node's roles and
/// capabilities; a node not yet in a mesh never starts one).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Messages kept while the board starts: API requests (a few callers at once at most) and the
/// job events gossiped meanwhile (a job submitted as this node comes up).
const MAX_WAITING_REQUESTS: usize = 1024;

/// How often the members (roster, liveness, who renders) are read from the network actor.
pub const MEMBERS_EVERY: Duration = Duration::from_secs(1);

/// How often this peer runs anti-entropy with one random live member.
pub const SYNC_EVERY: Duration = Duration::from_secs(10);

/// How long a work or board request may take before it counts as failed: the core's own
/// timeouts are longer, so an answer lost on the way is noticed here first.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Tries to open a stream before giving up: libp2p-stream drops inbound streams it cannot hand
/// over at once, so a refused stream under load is normal.
const STREAM_TRIES: u32 = 3;

/// How long a replication (fetching a result from its renderer) may take.
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(600);

/// A message for the board actor.
#[derive(Debug)]
pub enum BoardMessage {
    Delivery(Delivery),
    Members(Vec<Member>),
    WorkRequest {
        from: PeerId,
        request: WorkRequest,
        reply: oneshot::Sender<WorkResponse>,
    },
    WorkReply {
        from: PeerId,
        request: WorkRequest,
        response: Option<WorkResponse>,
    },
    Render(RenderReport),
    ResultHeld {
        hash: BlobHash,
        holder: PeerId,
    },
    FetchFailed {
        hash: BlobHash,
        from: PeerId,
    },
    SyncEvents(Vec<SignedEvent>),
    Submit {
        spec: JobSpec,
        /// Where this node puts the finished frames.
        out_dir: Option<PathBuf>,
        reply: oneshot::Sender<Result<JobId, String>>,
    },
    /// A delivery into a job's output directory ended.
    Delivered {
        job: JobId,
        hash: BlobHash,
        result: Result<Vec<PathBuf>, String>,
    },
    /// Have one live member fetch `hash` (a scene) from this node; reply with who holds it
    /// now, or `None` when no member could.
    Replicate {
        hash: BlobHash,
        reply: oneshot::Sender<Option<PeerId>>,
    },
    /// What was delivered of a job.
    Outputs {
        job: JobId,
        reply: oneshot::Sender<Option<OutputsView>>,
    },
    Cancel {
        job: JobId,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Jobs(oneshot::Sender<Vec<JobSummary>>),
    Job {
        job: JobId,
        reply: oneshot::Sender<Option<JobView>>,
    },
    Digests(oneshot::Sender<Vec<(JobId, [u8; 32])>>),
    Events {
        job: JobId,
        skip: u32,
        reply: oneshot::Sender<(Vec<SignedEvent>, bool)>,
    },
    /// Anti-entropy is due.
    SyncTick,
    /// Preemption: hand back the running lease and take no more; the reply says, once the
    /// coordinator answered, whether a lease was handed back.
    Drain(oneshot::Sender<bool>),
}

/// Why the board cannot answer.
#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("the job board is not running")]
    Stopped,
    #[error("this node is not a member of a mesh yet, or is still starting")]
    NotReady,
}

/// The handle to the board actor.
#[derive(Debug, Clone)]
pub struct Board {
    tx: mpsc::Sender<BoardMessage>,
    changes: broadcast::Sender<JobChange>,
}

/// What the board needs to start.
#[derive(Debug)]
pub struct BoardSetup {
    pub keypair: Keypair,
    pub net: Net,
    pub streams: Streams,
    pub blobs: Blobs,
    pub render: Render,
    pub database: Arc<redb::Database>,
    /// `<data>/work`, where deliveries are staged.
    pub work_dir: PathBuf,
    /// Whether this node takes render tasks (config), and what it offers once Blender is found.
    pub renders: bool,
    pub offer: watch::Receiver<Option<Offer>>,
}

impl Board {
    /// Starts the actor and its servers. The core board is made once this node knows its roles
    /// and its capabilities (a second or two after start-up).
    pub fn spawn(
        setup: BoardSetup,
        render_reports: mpsc::Receiver<RenderReport>,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Board> {
        let (tx, inbox) = mpsc::channel(INBOX);
        let (changes, _) = broadcast::channel(CHANGES);
        let board = Board {
            tx: tx.clone(),
            changes: changes.clone(),
        };
        let (publish_tx, publish_rx) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(publisher(setup.net.clone(), publish_rx));
        let (render_tx, render_rx) = mpsc::channel(RENDER_QUEUE);
        tokio::spawn(forward_to_render(setup.render.clone(), render_rx));
        let work = setup.streams.incoming(WORK_PROTOCOL)?;
        tokio::spawn(serve_work(work, board.clone()));
        let sync = setup.streams.incoming(BOARD_PROTOCOL)?;
        tokio::spawn(serve_board(sync, board.clone(), setup.blobs.clone()));
        tokio::spawn(forward_reports(render_reports, tx.clone()));
        tokio::spawn(poll_members(
            setup.net.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(sync_ticks(tx.clone(), shutdown.clone()));
        let actor = BoardActor {
            board: None,
            keypair: setup.keypair,
            renders: setup.renders,
            offer: setup.offer,
            self_roles: None,
            pending_members: None,
            waiting: Vec::new(),
            net_streams: setup.streams,
            deliveries: Deliveries::new(
                setup.database.clone(),
                setup.blobs.clone(),
                setup.work_dir,
                tx.clone(),
            ),
            blobs: setup.blobs,
            render: render_tx,
            database: setup.database,
            inbox,
            tx,
            publish: publish_tx,
            changes,
            started: Instant::now(),
            clocks: HashMap::new(),
            syncing: false,
            replies: HashMap::new(),
            next_reply: 1,
            live: Vec::new(),
            releases_in_flight: 0,
            drained: Vec::new(),
        };
        tokio::spawn(actor.run(shutdown));
        Ok(board)
    }

    /// Hands a gossip delivery on the jobs or tasks topic to the board.
    pub async fn deliver(&self, delivery: Delivery) {
        let _ = self.tx.send(BoardMessage::Delivery(delivery)).await;
    }

    /// Subscribes to job changes, for the API's event stream.
    pub fn changes(&self) -> broadcast::Receiver<JobChange> {
        self.changes.subscribe()
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> BoardMessage,
    ) -> Result<T, BoardError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| BoardError::Stopped)?;
        match tokio::time::timeout(READY_TIMEOUT, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => Err(BoardError::NotReady),
        }
    }

    /// Submits a job from this node; its finished frames go to `out_dir`.
    pub async fn submit(
        &self,
        spec: JobSpec,
        out_dir: Option<PathBuf>,
    ) -> Result<Result<JobId, String>, BoardError> {
        self.ask(|reply| BoardMessage::Submit {
            spec,
            out_dir,
            reply,
        })
        .await
    }

    /// Has one live member fetch `hash` from this node, and waits until it holds it (as long as
    /// the transfer takes): a scene on two peers survives its submitter. `None` when no member
    /// is online or none could.
    pub async fn replicate(&self, hash: BlobHash) -> Result<Option<PeerId>, BoardError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(BoardMessage::Replicate { hash, reply })
            .await
            .map_err(|_| BoardError::Stopped)?;
        rx.await.map_err(|_| BoardError::Stopped)
    }

    /// What this node delivered of `job` (for jobs submitted here with an output directory).
    pub async fn outputs(&self, job: JobId) -> Result<Option<OutputsView>, BoardError> {
        self.ask(|reply| BoardMessage::Outputs { job, reply }).await
    }

    /// Cancels a job this node submitted.
    pub async fn cancel(&self, job: JobId) -> Result<Result<(), String>, BoardError> {
        self.ask(|reply| BoardMessage::Cancel { job, reply }).await
    }

    /// Every job this node knows.
    pub async fn jobs(&self) -> Result<Vec<JobSummary>, BoardError> {
        self.ask(BoardMessage::Jobs).await
    }

    /// One job in full.
    pub async fn job(&self, job: JobId) -> Result<Option<JobView>, BoardError> {
        self.ask(|reply| BoardMessage::Job { job, reply }).await
    }

    /// Stops taking tasks and hands the running lease back to its coordinator; answers once
    /// the coordinator took it back (`true`), or at once when nothing ran (`false`). The
    /// caller bounds the wait: a coordinator that is gone never answers.
    pub async fn drain(&self) -> Result<bool, BoardError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(BoardMessage::Drain(reply))
            .await
            .map_err(|_| BoardError::Stopped)?;
        rx.await.map_err(|_| BoardError::Stopped)
    }
}

struct BoardActor {
    /// `None` until this node's roles and capabilities are known.
    board: Option<core_board::Board>,
    keypair: Keypair,
    renders: bool,
    offer: watch::Receiver<Option<Offer>>,
    self_roles: Option<Roles>,
    /// Members seen before the core board existed.
    pending_members: Option<Vec<Member>>,
    /// API requests that came before the core board existed.
    waiting: Vec<BoardMessage>,
    net_streams: Streams,
    blobs: Blobs,
    deliveries: Deliveries,
    /// Starts and stops for the render actor, forwarded in order.
    render: mpsc::Sender<RenderMessage>,
    database: Arc<redb::Database>,
    inbox: mpsc::Receiver<BoardMessage>,
    tx: mpsc::Sender<BoardMessage>,
    publish: mpsc::Sender<(Topic, Vec<u8>)>,
    changes: broadcast::Sender<JobChange>,
    started: Instant,
    /// Each job's clock (see the module documentation), as saved in [`CLOCKS_TABLE`].
    clocks: HashMap<JobId, JobClock>,
    /// Whether the events being taken came by anti-entropy (late), not live.
    syncing: bool,
    /// Work requests waiting for the core's answer, by the id given to the core.
    replies: HashMap<u64, oneshot::Sender<WorkResponse>>,
    next_reply: u64,
    /// Live members other than this node, for anti-entropy.
    live: Vec<PeerId>,
    /// Lease hand-backs sent and not answered yet, and who waits for them.
    releases_in_flight: usize,
    drained: Vec<oneshot::Sender<bool>>,
}

impl BoardActor {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        // The offer comes once, when detection ends; then its sender is gone and `changed`
        // would answer at once forever, so it is watched only until then.
        let mut offer_pending = true;
        loop {
            let deadline = self
                .board
                .as_ref()
                .and_then(|b| b.next_deadline())
                .map(|ms| self.started + Duration::from_millis(ms));
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                message = self.inbox.recv() => match message {
                    Some(message) => self.on_message(message),
                    None => break,
                },
                _ = sleep => self.input(Input::Tick),
                changed = self.offer.changed(), if offer_pending => {
                    offer_pending = changed.is_ok();
                    self.try_start();
                }
            }
        }
        // Hand back the running lease and stop taking tasks.
        self.input(Input::Drain);
    }

    /// Makes the core board once roles and capabilities are known, from the saved events.
    fn try_start(&mut self) {
        if self.board.is_some() {
            return;
        }
        let (Some(roles), Some(offer)) = (self.self_roles, self.offer.borrow().clone()) else {
            return;
        };
        let config = BoardConfig {
            keypair: self.keypair.clone(),
            roles,
            renders: self.renders && offer.blender.is_some(),
            offer,
        };
        let events = match load_events(&self.database) {
            Ok(events) => events,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the saved job events; starting empty");
                Vec::new()
            }
        };
        let count = events.len();
        match load_clocks(&self.database) {
            Ok(clocks) => self.clocks = clocks,
            Err(e) => tracing::warn!(error = %e, "cannot read the saved job clocks"),
        }
        match core_board::Board::restore(config, events, self.now()) {
            Ok(board) => {
                tracing::info!(events = count, jobs = board.jobs().len(), "job board ready");
                self.board = Some(board);
                if let Some(members) = self.pending_members.take() {
                    self.input(Input::Members(members));
                } else {
                    self.input(Input::Tick);
                }
                for message in std::mem::take(&mut self.waiting) {
                    self.on_message(message);
                }
                self.deliver(self.deliveries.jobs());
                // A node that starts (a cloud instance that just joined) learns of the jobs
                // now rather than at its first anti-entropy tick, up to SYNC_EVERY later.
                self.sync();
            }
            Err(e) => tracing::error!(error = %e, "cannot start the job board"),
        }
    }

    fn on_message(&mut self, message: BoardMessage) {
        // Requests from the API wait for the board (a second or two after start-up) rather
        // than fail: a script that starts a daemon and submits at once must just work. Job
        // events wait too: dropped, a job submitted meanwhile stayed unknown here until
        // anti-entropy (measured: a new member idle for 19 s).
        if self.board.is_none()
            && matches!(
                message,
                BoardMessage::Delivery(_)
                    | BoardMessage::SyncEvents(_)
                    | BoardMessage::Submit { .. }
                    | BoardMessage::Outputs { .. }
                    | BoardMessage::Cancel { .. }
                    | BoardMessage::Jobs(_)
                    | BoardMessage::Job { .. }
            )
        {
            if self.waiting.len() < MAX_WAITING_REQUESTS {
                self.waiting.push(message);
            }
            // Past the bound the request is dropped, and its caller hears "not ready" (an event
            // comes back with anti-entropy).
            return;
        }
        match message {
            BoardMessage::Delivery(d) => match SignedEvent::from_bytes(&d.data) {
                Ok(event) => self.input(Input::Event(event)),
                Err(e) => tracing::debug!(source = %d.source, error = %e, "undecodable job event"),
            },
            BoardMessage::Members(members) => self.on_members(members),
            BoardMessage::WorkRequest {
                from,
                request,
                reply,
            } => {
                if self.board.is_none() {
                    let _ = reply.send(WorkResponse::NotCoordinator { hint: None });
                    return;
                }
                let id = self.next_reply;
                self.next_reply += 1;
                self.replies.insert(id, reply);
                self.input(Input::WorkRequest { id, from, request });
                // The core answers every request at once; never keep a sender it did not.
                if let Some(reply) = self.replies.remove(&id) {
                    let _ = reply.send(WorkResponse::NotCoordinator { hint: None });
                }
            }
            BoardMessage::WorkReply {
                from,
                request,
                response,
            } => {
                if matches!(request, WorkRequest::Release { .. }) {
                    self.releases_in_flight = self.releases_in_flight.saturating_sub(1);
                    if self.releases_in_flight == 0 {
                        for waiting in self.drained.drain(..) {
                            let _ = waiting.send(response.is_some());
                        }
                    }
                }
                self.input(Input::WorkReply {
                    from,
                    request,
                    response,
                })
            }
            BoardMessage::Drain(reply) => {
                let before = self.releases_in_flight;
                self.input(Input::Drain);
                if self.releases_in_flight > before {
                    self.drained.push(reply);
                } else {
                    let _ = reply.send(false);
                }
            }
            BoardMessage::Render(RenderReport::Finished {
                job,
                task,
                lease,
                result,
                stats,
            }) => self.input(Input::TaskFinished {
                job,
                task,
                lease,
                result,
                stats,
            }),
            BoardMessage::Render(RenderReport::Failed {
                job,
                task,
                lease,
                reason,
            }) => self.input(Input::TaskFailed {
                job,
                task,
                lease,
                reason,
            }),
            BoardMessage::ResultHeld { hash, holder } => {
                self.input(Input::ResultHeld { hash, holder })
            }
            BoardMessage::FetchFailed { hash, from } => {
                self.input(Input::FetchFailed { hash, from })
            }
            BoardMessage::SyncEvents(events) => {
                self.syncing = true;
                for event in events {
                    self.input(Input::Event(event));
                }
                self.syncing = false;
            }
            BoardMessage::Submit {
                mut spec,
                out_dir,
                reply,
            } => {
                // A scene is made with the submitter's Blender unless the caller said which.
                if spec.blender.is_none()
                    && let Some(version) =
                        self.offer.borrow().as_ref().and_then(|o| o.blender.clone())
                    && let Some((major, minor)) = blendnet_proto::job::major_minor(&version)
                {
                    spec.blender = Some(format!("{major}.{minor}"));
                }
                let now = self.now();
                let result = match self.board.as_mut() {
                    None => Err(BoardError::NotReady.to_string()),
                    Some(board) => match board.submit(now, spec) {
                        Ok((job, actions)) => {
                            // Where the frames go is saved before anything can finish.
                            let saved = out_dir
                                .map(|dir| self.deliveries.set_out_dir(&job, &dir))
                                .unwrap_or(Ok(()));
                            self.execute(actions);
                            tracing::info!(%job, "job submitted");
                            saved.map(|()| job)
                        }
                        Err(e) => Err(e.to_string()),
                    },
                };
                let _ = reply.send(result);
            }
            BoardMessage::Cancel { job, reply } => {
                let now = self.now();
                let result = match self.board.as_mut() {
                    None => Err(BoardError::NotReady.to_string()),
                    Some(board) => match board.cancel(now, job) {
                        Ok(actions) => {
                            self.execute(actions);
                            tracing::info!(%job, "job cancelled");
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    },
                };
                let _ = reply.send(result);
            }
            BoardMessage::Jobs(reply) => {
                if let Some(board) = &self.board {
                    let _ = reply.send(board.jobs());
                }
            }
            BoardMessage::Job { job, reply } => {
                if let Some(board) = &self.board {
                    let clock = self.clocks.get(&job).copied().unwrap_or_default();
                    let _ = reply.send(board.job_with_clock(&job, clock));
                }
            }
            BoardMessage::Digests(reply) => {
                if let Some(board) = &self.board {
                    let digests = board
                        .digests()
                        .into_iter()
                        .map(|(job, d)| (job, d.hash))
                        .collect();
                    let _ = reply.send(digests);
                }
            }
            BoardMessage::Events { job, skip, reply } => {
                if let Some(board) = &self.board {
                    let _ = reply.send(page(board.events(&job), skip as usize));
                }
            }
            BoardMessage::SyncTick => {
                self.sync();
                // Deliveries that failed are tried again.
                self.deliver(self.deliveries.failed_jobs());
            }
            BoardMessage::Delivered { job, hash, result } => {
                self.deliveries.finished(job, hash, result);
                let _ = self.changes.send(JobChange {
                    job: job.to_string(),
                });
            }
            BoardMessage::Outputs { job, reply } => {
                let _ = reply.send(self.deliveries.view(&job));
            }
            BoardMessage::Replicate { hash, reply } => {
                // Any live member will do; asking them in turn until one holds it.
                let candidates = self.live.clone();
                let streams = self.net_streams.clone();
                tokio::spawn(async move {
                    for to in candidates {
                        if replicate(&streams, to, hash).await {
                            let _ = reply.send(Some(to));
                            return;
                        }
                    }
                    let _ = reply.send(None);
                });
            }
        }
    }

    fn on_members(&mut self, members: Vec<Member>) {
        let me = self.keypair.public().to_peer_id();
        let was_alone = self.live.is_empty();
        self.live = members
            .iter()
            .filter(|m| m.live && m.peer != me)
            .map(|m| m.peer)
            .collect();
        // The first member to come online (at start, or after being cut off) is asked for the
        // jobs at once: gossip sent while we were alone never reached us.
        if was_alone && !self.live.is_empty() {
            self.sync();
        }
        if self.self_roles.is_none() {
            self.self_roles = members.iter().find(|m| m.peer == me).map(|m| m.roles);
        }
        if self.board.is_some() {
            self.input(Input::Members(members));
        } else {
            self.pending_members = Some(members);
            self.try_start();
        }
    }

    /// Feeds the core and carries out what it asks for.
    fn input(&mut self, input: Input) {
        let now = self.now();
        let Some(board) = self.board.as_mut() else {
            return;
        };
        let actions = board.handle(now, input);
        self.execute(actions);
    }

    fn execute(&mut self, actions: Vec<Action>) {
        let mut to_persist = Vec::new();
        for action in actions {
            if let Action::Persist(event) = action {
                to_persist.push(event);
                continue;
            }
            self.persist(&mut to_persist);
            match action {
                Action::Persist(_) => {}
                Action::Publish(event) => {
                    let topic = event.body().topic();
                    let bytes = event.signed().to_bytes();
                    if self.publish.try_send((topic, bytes)).is_err() {
                        tracing::warn!("gossip queue full: an event waits for anti-entropy");
                    }
                }
                Action::SendWork { to, request } => {
                    if matches!(request, WorkRequest::Release { .. }) {
                        self.releases_in_flight += 1;
                    }
                    let streams = self.net_streams.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let response = request_once::<_, WorkResponse>(
                            &streams,
                            to,
                            WORK_PROTOCOL,
                            &request,
                            MAX_WORK_BYTES,
                            MAX_WORK_BYTES,
                        )
                        .await
                        .inspect_err(
                            |e| tracing::debug!(peer = %to, error = %e, "work request failed"),
                        )
                        .ok();
                        let _ = tx
                            .send(BoardMessage::WorkReply {
                                from: to,
                                request,
                                response,
                            })
                            .await;
                    });
                }
                Action::RespondWork { id, response } => {
                    if let Some(reply) = self.replies.remove(&id) {
                        let _ = reply.send(response);
                    }
                }
                Action::StartTask {
                    job,
                    spec,
                    task,
                    lease,
                    inputs,
                } => {
                    tracing::info!(%job, %task, epoch = lease.epoch, "task started");
                    self.to_render(RenderMessage::Start {
                        job,
                        spec,
                        task,
                        lease,
                        inputs,
                        // The core took the grant up just now, in this same input.
                        granted_at: Instant::now(),
                    });
                }
                Action::StopTask { job, task, reason } => {
                    tracing::info!(%job, %task, ?reason, "task stopped");
                    self.to_render(RenderMessage::Stop { job, task });
                }
                Action::FetchResult { hash, from, .. } => {
                    let blobs = self.blobs.clone();
                    let tx = self.tx.clone();
                    let me = self.keypair.public().to_peer_id();
                    tokio::spawn(async move {
                        let message = match blobs.fetch(hash, Some(from)).await {
                            Ok(_) => BoardMessage::ResultHeld { hash, holder: me },
                            Err(e) => {
                                tracing::info!(%hash, peer = %from, error = %e, "result fetch failed");
                                BoardMessage::FetchFailed { hash, from }
                            }
                        };
                        let _ = tx.send(message).await;
                    });
                }
                Action::ReplicateResult { hash, to, .. } => {
                    let streams = self.net_streams.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        if replicate(&streams, to, hash).await {
                            let _ = tx.send(BoardMessage::ResultHeld { hash, holder: to }).await;
                        }
                    });
                }
                Action::SyncJob { job, with } => {
                    let streams = self.net_streams.clone();
                    let tx = self.tx.clone();
                    tokio::spawn(pull_events(streams, with, job, tx));
                }
                Action::JobFinished { job, status } => {
                    tracing::info!(%job, ?status, "job finished");
                    let live = !self.syncing;
                    self.update_clock(job, |clock| {
                        if live && clock.finished_at_ms.is_none() {
                            clock.finished_at_ms = Some(unix_ms());
                        }
                    });
                    let _ = self.changes.send(JobChange {
                        job: job.to_string(),
                    });
                }
            }
        }
        self.persist(&mut to_persist);
    }

    /// Commits `events` in one transaction, then announces their jobs' change.
    fn persist(&mut self, events: &mut Vec<blendnet_proto::VerifiedEvent>) {
        if events.is_empty() {
            return;
        }
        let result = (|| -> Result<(), redb::Error> {
            let txn = self.database.begin_write()?;
            {
                let mut table = txn.open_table(EVENTS_TABLE)?;
                for event in events.iter() {
                    let id = event.id();
                    table.insert(id.0.as_slice(), event.signed().to_bytes().as_slice())?;
                }
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, events = events.len(), "could not save job events");
        }
        // A job seen for the first time starts its clock, if it was seen as it began.
        let live = !self.syncing;
        for event in events.iter() {
            if let EventBody::Submitted { .. } = event.body() {
                self.update_clock(JobId::from(event.id()), |clock| {
                    if live && clock.started_at_ms.is_none() {
                        clock.started_at_ms = Some(unix_ms());
                    }
                });
            }
        }
        // Every accepted event (ours, or a peer's) changed its job, a submission made one:
        // tell the event stream once per job.
        let jobs: BTreeSet<JobId> = events
            .iter()
            .filter_map(|e| match e.body() {
                EventBody::Submitted { .. } => Some(JobId::from(e.id())),
                body => body.job(),
            })
            .collect();
        for job in &jobs {
            let _ = self.changes.send(JobChange {
                job: job.to_string(),
            });
        }
        events.clear();
        self.deliver(jobs);
    }

    /// Changes the clock of `job` (a new one if it has none), and saves it when it changed.
    fn update_clock(&mut self, job: JobId, change: impl FnOnce(&mut JobClock)) {
        let old = self.clocks.get(&job).copied();
        let mut clock = old.unwrap_or_default();
        change(&mut clock);
        if old == Some(clock) {
            return;
        }
        self.clocks.insert(job, clock);
        let saved = (|| -> Result<(), redb::Error> {
            let bytes = serde_json::to_vec(&clock).unwrap_or_default();
            let txn = self.database.begin_write()?;
            txn.open_table(CLOCKS_TABLE)?
                .insert(job.0.as_slice(), bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = saved {
            tracing::warn!(%job, error = %e, "could not save the job's clock");
        }
    }

    /// Hands the finished outputs of `jobs` to delivery (which skips jobs not submitted here
    /// with an output directory).
    fn deliver(&mut self, jobs: impl IntoIterator<Item = JobId>) {
        let Some(board) = &self.board else {
            return;
        };
        for job in jobs {
            if let Some(model) = board.job_model(&job) {
                let outputs: Vec<BlobHash> = model.outputs().map(|(_, hash)| hash).collect();
                if !outputs.is_empty() {
                    self.deliveries.update(job, outputs);
                }
            }
        }
    }

    /// Hands a start or stop to the render actor through the forwarder, in order (a stop must
    /// never overtake its start), without this loop waiting on the render actor.
    fn to_render(&self, message: RenderMessage) {
        if self.render.try_send(message).is_err() {
            tracing::error!("the render queue is full or the render actor has stopped");
        }
    }

    /// Anti-entropy with one random live member.
    fn sync(&self) {
        if self.board.is_none() || self.live.is_empty() {
            return;
        }
        let with = self.live[rand::random_range(0..self.live.len())];
        let streams = self.net_streams.clone();
        let tx = self.tx.clone();
        let ours: HashMap<JobId, [u8; 32]> = self
            .board
            .as_ref()
            .map(|b| b.digests().into_iter().map(|(j, d)| (j, d.hash)).collect())
            .unwrap_or_default();
        tokio::spawn(async move {
            let theirs = request_once::<_, BoardResponse>(
                &streams,
                with,
                BOARD_PROTOCOL,
                &BoardRequest::Digests,
                MAX_BOARD_REQUEST_BYTES,
                MAX_BOARD_RESPONSE_BYTES,
            )
            .await;
            let Ok(BoardResponse::Digests(theirs)) = theirs else {
                return;
            };
            for (job, digest) in theirs {
                if ours.get(&job) != Some(&digest) {
                    pull_events(streams.clone(), with, job, tx.clone()).await;
                }
            }
        });
    }
}

/// A page of `events` from `skip`, cut at [`MAX_EVENTS_PER_PAGE`] events or about
/// [`MAX_BOARD_RESPONSE_BYTES`] / 2 bytes; and whether more follow.
fn page(events: &[blendnet_proto::VerifiedEvent], skip: usize) -> (Vec<SignedEvent>, bool) {
    let mut out = Vec::new();
    let mut bytes = 0;
    for event in events.iter().skip(skip) {
        let signed = event.signed();
        bytes += signed.body.len() + signed.signature.len() + 64;
        if out.len() == MAX_EVENTS_PER_PAGE || bytes > MAX_BOARD_RESPONSE_BYTES / 2 {
            return (out, true);
        }
        out.push(signed.clone());
    }
    (out, false)
}

/// Pulls every event of `job` from `with`, a page at a time, into the board.
async fn pull_events(streams: Streams, with: PeerId, job: JobId, tx: mpsc::Sender<BoardMessage>) {
    let mut skip = 0u32;
    loop {
        let response = request_once::<_, BoardResponse>(
            &streams,
            with,
            BOARD_PROTOCOL,
            &BoardRequest::Events { job, skip },
            MAX_BOARD_REQUEST_BYTES,
            MAX_BOARD_RESPONSE_BYTES,
        )
        .await;
        let Ok(BoardResponse::Events { events, more }) = response else {
            return;
        };
        let count = events.len() as u32;
        if tx.send(BoardMessage::SyncEvents(events)).await.is_err() || !more || count == 0 {
            return;
        }
        skip = skip.saturating_add(count);
    }
}

/// Sends one request on a new stream of `protocol` and reads one response, retrying a stream
/// that could not be opened or was dropped before answering.
async fn request_once<Req: Serialize, Resp: DeserializeOwned>(
    streams: &Streams,
    peer: PeerId,
    protocol: &'static str,
    request: &Req,
    request_limit: usize,
    response_limit: usize,
) -> std::io::Result<Resp> {
    let mut last = None;
    for attempt in 0..STREAM_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let exchange = async {
            let mut stream = streams.open(peer, protocol).await?;
            write_frame(&mut stream, request, request_limit).await?;
            stream.flush().await?;
            read_frame::<_, Resp>(&mut stream, response_limit).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(response)) => return Ok(response),
            // A response that does not decode will not decode the next time either.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => return Err(e),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Err(last.unwrap_or_else(|| std::io::ErrorKind::Other.into()))
}

/// Answers `/blendnet/work/1` streams: one request, one response each.
async fn serve_work(mut incoming: blendnet_net::Incoming, board: Board) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let board = board.clone();
        tokio::spawn(async move {
            let served = async {
                let request: WorkRequest = read_frame(&mut stream, MAX_WORK_BYTES).await?;
                let response = board
                    .ask(|reply| BoardMessage::WorkRequest {
                        from: peer,
                        request,
                        reply,
                    })
                    .await
                    .unwrap_or(WorkResponse::NotCoordinator { hint: None });
                write_frame(&mut stream, &response, MAX_WORK_BYTES).await?;
                stream.close().await
            };
            if let Ok(Err(e)) = tokio::time::timeout(REQUEST_TIMEOUT, served).await {
                tracing::debug!(%peer, error = %e, "work stream failed");
            }
        });
    }
}

/// Answers `/blendnet/board/1` streams: digests, pages of events, replication.
async fn serve_board(mut incoming: blendnet_net::Incoming, board: Board, blobs: Blobs) {
    while let Some((peer, mut stream)) = incoming.next().await {
        let board = board.clone();
        let blobs = blobs.clone();
        tokio::spawn(async move {
            let served = async {
                let request: BoardRequest =
                    read_frame(&mut stream, MAX_BOARD_REQUEST_BYTES).await?;
                let response = match request {
                    BoardRequest::Digests => match board.ask(BoardMessage::Digests).await {
                        Ok(digests) => BoardResponse::Digests(digests),
                        Err(e) => BoardResponse::Refused(e.to_string()),
                    },
                    BoardRequest::Events { job, skip } => {
                        match board
                            .ask(|reply| BoardMessage::Events { job, skip, reply })
                            .await
                        {
                            Ok((events, more)) => BoardResponse::Events { events, more },
                            Err(e) => BoardResponse::Refused(e.to_string()),
                        }
                    }
                    BoardRequest::Replicate { hash } => match blobs.fetch(hash, Some(peer)).await {
                        Ok(_) => BoardResponse::Replicated,
                        Err(e) => BoardResponse::Refused(e.to_string()),
                    },
                };
                write_frame(&mut stream, &response, MAX_BOARD_RESPONSE_BYTES).await?;
                stream.close().await
            };
            if let Ok(Err(e)) = tokio::time::timeout(REPLICATE_TIMEOUT, served).await {
                tracing::debug!(%peer, error = %e, "board stream failed");
            }
        });
    }
}

/// Publishes gossip in order, off the actor's loop.
async fn publisher(net: Net, mut queue: mpsc::Receiver<(Topic, Vec<u8>)>) {
    while let Some((topic, bytes)) = queue.recv().await {
        match net.publish(topic, bytes).await {
            Ok(Ok(())) => {}
            // Nobody subscribed yet, or a full queue: anti-entropy carries it later.
            Ok(Err(e)) => tracing::debug!(error = %e, "job event not gossiped"),
            Err(_) => return,
        }
    }
}

/// Hands starts and stops to the render actor in the order the board gave them.
async fn forward_to_render(render: Render, mut queue: mpsc::Receiver<RenderMessage>) {
    while let Some(message) = queue.recv().await {
        if !render.send(message).await {
            tracing::error!("the render actor has stopped");
            return;
        }
    }
}

async fn forward_reports(
    mut reports: mpsc::Receiver<RenderReport>,
    tx: mpsc::Sender<BoardMessage>,
) {
    while let Some(report) = reports.recv().await {
        if tx.send(BoardMessage::Render(report)).await.is_err() {
            return;
        }
    }
}

/// Reads the members from the network actor every [`MEMBERS_EVERY`] and hands them over when
/// they change.
async fn poll_members(
    net: Net,
    tx: mpsc::Sender<BoardMessage>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut last: Option<Vec<Member>> = None;
    let mut tick = tokio::time::interval(MEMBERS_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let Ok(peers) = net.peers().await else {
            return;
        };
        let members: Vec<Member> = peers
            .iter()
            .filter_map(|p| {
                Some(Member {
                    peer: p.peer_id.parse().ok()?,
                    roles: p.roles.join(",").parse().ok()?,
                    live: p.online,
                    renders: p
                        .capabilities
                        .as_ref()
                        .is_some_and(|c| c.render && c.blender.is_some()),
                    denoiser: p.capabilities.as_ref().is_some_and(|c| c.denoiser),
                })
            })
            .collect();
        if last.as_ref() != Some(&members) {
            last = Some(members.clone());
            if tx.send(BoardMessage::Members(members)).await.is_err() {
                return;
            }
        }
    }
}

async fn sync_ticks(tx: mpsc::Sender<BoardMessage>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SYNC_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        if tx.send(BoardMessage::SyncTick).await.is_err() {
            return;
        }
    }
}

/// Every saved event.
fn load_events(database: &redb::Database) -> Result<Vec<SignedEvent>, redb::Error> {
    let txn = database.begin_read()?;
    let table = match txn.open_table(EVENTS_TABLE) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut events = Vec::new();
    for entry in table.iter()? {
        let (_, value) = entry?;
        match SignedEvent::from_bytes(value.value()) {
            Ok(event) => events.push(event),
            Err(e) => tracing::warn!(error = %e, "a saved job event does not decode; skipped"),
        }
    }
    Ok(events)
}

/// Every saved job clock; one that does not decode is skipped (its job shows no wall time).
fn load_clocks(database: &redb::Database) -> Result<HashMap<JobId, JobClock>, redb::Error> {
    let txn = database.begin_read()?;
    let table = match txn.open_table(CLOCKS_TABLE) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(HashMap::new()),
        Err(e) => return Err(e.into()),
    };
    let mut clocks = HashMap::new();
    for entry in table.iter()? {
        let (key, value) = entry?;
        let Ok(id) = <[u8; 32]>::try_from(key.value()) else {
            continue;
        };
        if let Ok(clock) = serde_json::from_slice::<JobClock>(value.value()) {
            clocks.insert(JobId(id), clock);
        }
    }
    Ok(clocks)
}

/// This machine's clock, in Unix milliseconds (0 before 1970).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Asks `to` to fetch `hash` from this node; whether it holds it now.
async fn replicate(streams: &Streams, to: PeerId, hash: BlobHash) -> bool {
    let request = BoardRequest::Replicate { hash };
    let asked = tokio::time::timeout(
        REPLICATE_TIMEOUT,
        request_once::<_, BoardResponse>(
            streams,
            to,
            BOARD_PROTOCOL,
            &request,
            MAX_BOARD_REQUEST_BYTES,
            MAX_BOARD_RESPONSE_BYTES,
        ),
    )
    .await;
    match asked {
        Ok(Ok(BoardResponse::Replicated)) => true,
        other => {
            tracing::info!(%hash, peer = %to, ?other, "replication failed");
            false
        }
    }
}
