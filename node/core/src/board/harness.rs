//! A deterministic, seeded network of boards for tests: gossip with delay, loss and
//! duplication; request-response that fails when the peer is unreachable; blob fetches;
//! renders that take time; crashes (a node loses its memory and restores from what it
//! persisted), kills, preemption and partitions; periodic anti-entropy between random pairs.
//!
//! Every node has its own clock offset, so nothing may compare clocks across nodes. The
//! harness records what every node did, and checks as it goes that a Done is never declared
//! without a second holder of the result (or on a mesh of one).

use super::{Action, Board, BoardConfig, Input, Member, StopReason};
use blendnet_proto::job::{EventBody, Offer};
use blendnet_proto::{
    BlobHash, JobId, Lease, PeerId, Role, Roles, TaskSpec, TaskStats, VerifiedEvent, WorkRequest,
    WorkResponse,
};
use libp2p_identity::Keypair;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

/// splitmix64: small, seeded, good enough for schedules.
#[derive(Debug, Clone)]
pub(super) struct Rng(u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub(super) fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo + 1)
        }
    }

    pub(super) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One node's setup.
#[derive(Debug, Clone)]
pub(super) struct NodeSpec {
    pub(super) roles: Roles,
    pub(super) renders: bool,
    /// Render speed: a task of cost `c` ms takes `c / speed` ms.
    pub(super) speed: f64,
    /// Its Blender can denoise.
    pub(super) denoiser: bool,
}

/// The network's behaviour.
#[derive(Debug, Clone)]
pub(super) struct NetConfig {
    pub(super) latency_ms: (u64, u64),
    pub(super) gossip_loss: f64,
    pub(super) duplicate: f64,
    /// How long a request to an unreachable peer takes to fail.
    pub(super) rr_fail_ms: u64,
    pub(super) fetch_ms: (u64, u64),
    /// How long peers take to notice a peer came or went.
    pub(super) detect_ms: u64,
    /// Period of each node's anti-entropy with a random peer.
    pub(super) anti_entropy_ms: Option<u64>,
    /// Random clock offsets per node.
    pub(super) clock_offsets: bool,
}

impl Default for NetConfig {
    fn default() -> NetConfig {
        NetConfig {
            latency_ms: (5, 50),
            gossip_loss: 0.0,
            duplicate: 0.0,
            rr_fail_ms: 1_000,
            fetch_ms: (100, 500),
            detect_ms: 1_500,
            anti_entropy_ms: Some(10_000),
            clock_offsets: true,
        }
    }
}

#[derive(Debug)]
enum Msg {
    Gossip {
        to: usize,
        ev: VerifiedEvent,
    },
    Batch {
        to: usize,
        events: Vec<VerifiedEvent>,
    },
    Request {
        to: usize,
        from: usize,
        request: WorkRequest,
    },
    Reply {
        to: usize,
        from: usize,
        request: WorkRequest,
        response: Option<WorkResponse>,
    },
    Tick {
        to: usize,
        generation: u64,
    },
    RenderDone {
        to: usize,
        generation: u64,
    },
    Held {
        to: usize,
        hash: BlobHash,
        holder: usize,
    },
    FetchFailed {
        to: usize,
        hash: BlobHash,
        from: usize,
    },
    Members {
        to: usize,
    },
    AntiEntropy {
        node: usize,
    },
    Sync {
        a: usize,
        b: usize,
        job: JobId,
    },
    Fault(Fault),
}

/// Something that happens to the network at a chosen time.
#[derive(Debug, Clone)]
pub(super) enum Fault {
    /// The node loses its memory and stays down.
    Crash(usize),
    /// The node restores from its store.
    Restart(usize),
    /// Crash for good.
    Kill(usize),
    /// Drain, then go for good a moment later.
    Preempt(usize),
    /// Partition groups per node (equal groups see each other); `None` heals.
    Partition(Option<Vec<u8>>),
}

#[derive(Debug)]
struct Queued {
    at: u64,
    seq: u64,
    /// Boxed: messages carry peer ids and events, and the heap moves entries a lot.
    msg: Box<Msg>,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Debug, Clone)]
struct Render {
    job: JobId,
    task: TaskSpec,
    lease: Lease,
    started: u64,
    cost: u64,
    generation: u64,
}

/// A finished or abandoned render, for accounting.
#[derive(Debug, Clone)]
pub(super) struct RenderRecord {
    pub(super) node: usize,
    pub(super) task: TaskSpec,
    /// When it started (simulated time).
    pub(super) started: u64,
    pub(super) ms: u64,
    pub(super) result: Option<BlobHash>,
}

pub(super) struct Node {
    pub(super) id: PeerId,
    config: BoardConfig,
    pub(super) spec: NodeSpec,
    pub(super) board: Option<Board>,
    pub(super) disk: Vec<VerifiedEvent>,
    pub(super) killed: bool,
    offset: u64,
    tick_at: Option<u64>,
    tick_generation: u64,
    render: Option<Render>,
    render_generation: u64,
    pending: HashMap<u64, (usize, WorkRequest)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("up", &self.board.is_some())
            .finish()
    }
}

/// The simulated network. See the module documentation.
pub(super) struct Net {
    pub(super) now: u64,
    queue: BinaryHeap<Reverse<Queued>>,
    seq: u64,
    next_id: u64,
    pub(super) nodes: Vec<Node>,
    pub(super) rng: Rng,
    pub(super) cfg: NetConfig,
    group: Vec<u8>,
    index: HashMap<PeerId, usize>,
    /// Who holds each result blob (on disk: survives crashes).
    pub(super) blobs: HashMap<BlobHash, BTreeSet<usize>>,
    /// Every event a node authored, in order, with the time it was published.
    pub(super) produced: Vec<(u64, VerifiedEvent)>,
    pub(super) renders: Vec<RenderRecord>,
    /// When each job was first seen done by some node.
    pub(super) finished_at: BTreeMap<JobId, u64>,
    pub(super) violations: Vec<String>,
    /// Cost in ms at speed 1 of each task.
    pub(super) task_cost: Box<dyn Fn(&TaskSpec) -> u64>,
    /// Tasks a render fails on, with the nodes it fails on (empty: all).
    pub(super) failing: BTreeMap<TaskSpec, BTreeSet<usize>>,
    /// Workers report that the scene asks for denoising.
    pub(super) scene_denoises: bool,
    /// Publishes per node, for tests that look at traffic.
    pub(super) publishes: u64,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("now", &self.now)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Net {
    /// A network of nodes with fresh ed25519 keys.
    pub(super) fn new(specs: Vec<NodeSpec>, cfg: NetConfig, seed: u64) -> Net {
        let mut rng = Rng::new(seed);
        let mut nodes = Vec::new();
        let mut index = HashMap::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let mut secret = [0u8; 32];
            for chunk in secret.chunks_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
            let keypair = Keypair::ed25519_from_bytes(secret).expect("32 bytes");
            let id = keypair.public().to_peer_id();
            index.insert(id, i);
            let config = BoardConfig {
                keypair,
                roles: spec.roles,
                renders: spec.renders,
                offer: Offer {
                    denoiser: spec.denoiser,
                    ..Offer::default()
                },
            };
            let offset = if cfg.clock_offsets {
                rng.range(0, 1 << 40)
            } else {
                0
            };
            let board = Board::new(config.clone(), offset).expect("ed25519 key");
            nodes.push(Node {
                id,
                config,
                spec,
                board: Some(board),
                disk: Vec::new(),
                killed: false,
                offset,
                tick_at: None,
                tick_generation: 0,
                render: None,
                render_generation: 0,
                pending: HashMap::new(),
            });
        }
        let n = nodes.len();
        let mut net = Net {
            now: 0,
            queue: BinaryHeap::new(),
            seq: 0,
            next_id: 0,
            nodes,
            rng,
            cfg,
            group: vec![0; n],
            index,
            blobs: HashMap::new(),
            produced: Vec::new(),
            renders: Vec::new(),
            finished_at: BTreeMap::new(),
            violations: Vec::new(),
            task_cost: Box::new(|t| 1_000 * t.units().clamp(1, 10)),
            failing: BTreeMap::new(),
            scene_denoises: false,
            publishes: 0,
        };
        for i in 0..n {
            let members = net.members_seen_by(i);
            net.input(i, Input::Members(members));
            if let Some(ae) = net.cfg.anti_entropy_ms {
                let at = net.rng.range(1, ae);
                net.push(at, Msg::AntiEntropy { node: i });
            }
        }
        net
    }

    fn push(&mut self, delay: u64, msg: Msg) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: self.now + delay,
            seq: self.seq,
            msg: Box::new(msg),
        }));
    }

    /// Schedules a fault at absolute time `at`.
    pub(super) fn at(&mut self, at: u64, fault: Fault) {
        let delay = at.saturating_sub(self.now);
        self.push(delay, Msg::Fault(fault));
    }

    fn latency(&mut self) -> u64 {
        let (lo, hi) = self.cfg.latency_ms;
        self.rng.range(lo, hi)
    }

    fn up(&self, i: usize) -> bool {
        self.nodes[i].board.is_some()
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.up(a) && self.up(b) && self.group[a] == self.group[b]
    }

    pub(super) fn peer(&self, i: usize) -> PeerId {
        self.nodes[i].id
    }

    pub(super) fn board(&self, i: usize) -> Option<&Board> {
        self.nodes[i].board.as_ref()
    }

    fn members_seen_by(&self, i: usize) -> Vec<Member> {
        self.nodes
            .iter()
            .enumerate()
            .map(|(j, n)| Member {
                peer: n.id,
                roles: n.spec.roles,
                live: j == i || self.reachable(i, j),
                renders: n.spec.renders,
                denoiser: n.spec.denoiser,
            })
            .collect()
    }

    /// Tells every node of the members again, after a test changed their specs.
    pub(super) fn membership_changed(&mut self) {
        let detect = self.cfg.detect_ms;
        for i in 0..self.nodes.len() {
            if self.up(i) {
                self.push(detect, Msg::Members { to: i });
            }
        }
    }

    /// Submits a job on node `i`.
    pub(super) fn submit(&mut self, i: usize, spec: blendnet_proto::JobSpec) -> JobId {
        let now = self.now + self.nodes[i].offset;
        let board = self.nodes[i].board.as_mut().expect("submitter is up");
        let (job, actions) = board.submit(now, spec).expect("valid submission");
        self.execute(i, actions);
        job
    }

    /// Cancels a job on node `i`.
    pub(super) fn cancel(&mut self, i: usize, job: JobId) {
        let now = self.now + self.nodes[i].offset;
        let board = self.nodes[i].board.as_mut().expect("canceller is up");
        let actions = board.cancel(now, job).expect("cancellable");
        self.execute(i, actions);
    }

    /// Feeds an input to node `i` (if it is up) and carries out its actions.
    pub(super) fn input(&mut self, i: usize, input: Input) {
        let now = self.now + self.nodes[i].offset;
        let Some(board) = self.nodes[i].board.as_mut() else {
            return;
        };
        let actions = board.handle(now, input);
        self.execute(i, actions);
    }

    fn execute(&mut self, i: usize, actions: Vec<Action>) {
        let mut persisted = BTreeSet::new();
        for action in actions {
            self.act(i, action, &mut persisted);
        }
        self.schedule_tick(i);
    }

    fn schedule_tick(&mut self, i: usize) {
        let Some(board) = self.nodes[i].board.as_ref() else {
            return;
        };
        let Some(deadline) = board.next_deadline() else {
            return;
        };
        let at = deadline
            .saturating_sub(self.nodes[i].offset)
            .max(self.now + 1);
        let node = &mut self.nodes[i];
        if node.tick_at.is_some_and(|t| t <= at && t > self.now) {
            return;
        }
        node.tick_at = Some(at);
        node.tick_generation += 1;
        let generation = node.tick_generation;
        let delay = at - self.now;
        self.push(delay, Msg::Tick { to: i, generation });
    }

    fn act(&mut self, i: usize, action: Action, persisted: &mut BTreeSet<blendnet_proto::EventId>) {
        match action {
            Action::Persist(ev) => {
                persisted.insert(ev.id());
                self.nodes[i].disk.push(ev);
            }
            Action::Publish(ev) => {
                let heartbeat = matches!(ev.body(), EventBody::Heartbeat { .. });
                if !heartbeat {
                    if !persisted.contains(&ev.id()) {
                        self.violations.push(format!(
                            "node {i} published {:?} before persisting it",
                            ev.body()
                        ));
                    }
                    self.produced.push((self.now, ev.clone()));
                    self.check_done(i, &ev);
                }
                self.publishes += 1;
                for j in 0..self.nodes.len() {
                    if j == i || !self.reachable(i, j) {
                        continue;
                    }
                    if self.rng.chance(self.cfg.gossip_loss) {
                        continue;
                    }
                    let d = self.latency();
                    self.push(
                        d,
                        Msg::Gossip {
                            to: j,
                            ev: ev.clone(),
                        },
                    );
                    if self.rng.chance(self.cfg.duplicate) {
                        let d = self.latency() * 3;
                        self.push(
                            d,
                            Msg::Gossip {
                                to: j,
                                ev: ev.clone(),
                            },
                        );
                    }
                }
            }
            Action::SendWork { to, request } => {
                let j = self.index[&to];
                if self.reachable(i, j) {
                    self.next_id += 1;
                    let d = self.latency();
                    self.push(
                        d,
                        Msg::Request {
                            to: j,
                            from: i,
                            request,
                        },
                    );
                } else {
                    let d = self.cfg.rr_fail_ms;
                    self.push(
                        d,
                        Msg::Reply {
                            to: i,
                            from: j,
                            request,
                            response: None,
                        },
                    );
                }
            }
            Action::RespondWork { id, response } => {
                let Some((from, request)) = self.nodes[i].pending.remove(&id) else {
                    self.violations
                        .push(format!("node {i} answered unknown request {id}"));
                    return;
                };
                let (delay, response) = if self.reachable(i, from) {
                    (self.latency(), Some(response))
                } else {
                    (self.cfg.rr_fail_ms, None)
                };
                self.push(
                    delay,
                    Msg::Reply {
                        to: from,
                        from: i,
                        request,
                        response,
                    },
                );
            }
            Action::StartTask {
                job, task, lease, ..
            } => {
                if self.nodes[i].render.is_some() {
                    self.violations
                        .push(format!("node {i} started a second task at once"));
                }
                let speed = self.nodes[i].spec.speed;
                let cost = ((self.task_cost)(&task) as f64 / speed).ceil() as u64;
                self.nodes[i].render_generation += 1;
                let generation = self.nodes[i].render_generation;
                self.nodes[i].render = Some(Render {
                    job,
                    task,
                    lease,
                    started: self.now,
                    cost,
                    generation,
                });
                self.push(cost.max(1), Msg::RenderDone { to: i, generation });
            }
            Action::StopTask { job, task, reason } => {
                let matches = self.nodes[i]
                    .render
                    .as_ref()
                    .is_some_and(|r| r.job == job && r.task == task);
                if matches {
                    self.abandon(i);
                } else if reason != StopReason::Drained {
                    self.violations
                        .push(format!("node {i} stopped a task it was not rendering"));
                }
            }
            Action::FetchResult { hash, from, .. } => {
                let j = self.index[&from];
                let has = self.blobs.get(&hash).is_some_and(|h| h.contains(&j));
                if self.reachable(i, j) && has {
                    let (lo, hi) = self.cfg.fetch_ms;
                    let d = self.rng.range(lo, hi);
                    self.push(
                        d,
                        Msg::Held {
                            to: i,
                            hash,
                            holder: i,
                        },
                    );
                } else {
                    let d = self.cfg.rr_fail_ms;
                    self.push(
                        d,
                        Msg::FetchFailed {
                            to: i,
                            hash,
                            from: j,
                        },
                    );
                }
            }
            Action::ReplicateResult { hash, to, .. } => {
                let j = self.index[&to];
                let has = self.blobs.get(&hash).is_some_and(|h| h.contains(&i));
                if self.reachable(i, j) && has {
                    let (lo, hi) = self.cfg.fetch_ms;
                    let d = self.rng.range(lo, hi);
                    self.push(
                        d,
                        Msg::Held {
                            to: i,
                            hash,
                            holder: j,
                        },
                    );
                }
            }
            Action::SyncJob { job, with } => {
                let j = self.index[&with];
                let d = self.latency();
                self.push(d, Msg::Sync { a: i, b: j, job });
            }
            Action::JobFinished { job, status } => {
                if status == crate::job::JobStatus::Done {
                    self.finished_at.entry(job).or_insert(self.now);
                }
            }
        }
    }

    /// A Done event must name a result held by a second peer, or be declared on a mesh of one.
    fn check_done(&mut self, i: usize, ev: &VerifiedEvent) {
        let EventBody::Done { result, .. } = ev.body() else {
            return;
        };
        let holders = self.blobs.get(result).map_or(0, BTreeSet::len);
        let alone = self.nodes[i]
            .board
            .as_ref()
            .is_some_and(|b| b.live_members() == 1);
        if holders >= 2 || (holders == 1 && alone) {
            return;
        }
        self.violations.push(format!(
            "node {i} declared a task done with {holders} holder(s) of its result"
        ));
    }

    fn abandon(&mut self, i: usize) {
        if let Some(r) = self.nodes[i].render.take() {
            self.renders.push(RenderRecord {
                node: i,
                task: r.task,
                started: r.started,
                ms: self.now - r.started,
                result: None,
            });
        }
    }

    fn crash(&mut self, i: usize) {
        self.abandon(i);
        let node = &mut self.nodes[i];
        node.board = None;
        node.pending.clear();
        node.tick_at = None;
        self.membership_changed();
    }

    fn fault(&mut self, fault: Fault) {
        match fault {
            Fault::Crash(i) => self.crash(i),
            Fault::Kill(i) => {
                self.nodes[i].killed = true;
                self.crash(i);
            }
            Fault::Restart(i) => {
                if self.nodes[i].killed || self.up(i) {
                    return;
                }
                let node = &mut self.nodes[i];
                let now = self.now + node.offset;
                let events: Vec<_> = node.disk.iter().map(|e| e.signed().clone()).collect();
                node.board =
                    Some(Board::restore(node.config.clone(), events, now).expect("ed25519 key"));
                let members = self.members_seen_by(i);
                self.input(i, Input::Members(members));
                self.membership_changed();
            }
            Fault::Preempt(i) => {
                self.input(i, Input::Drain);
                self.push(2_000, Msg::Fault(Fault::Kill(i)));
            }
            Fault::Partition(groups) => {
                let n = self.nodes.len();
                self.group = groups.unwrap_or_else(|| vec![0; n]);
                self.group.resize(n, 0);
                self.membership_changed();
            }
        }
    }

    fn sync(&mut self, a: usize, b: usize, only: Option<JobId>) {
        if !self.reachable(a, b) {
            return;
        }
        for (from, to) in [(a, b), (b, a)] {
            let (Some(src), Some(dst)) = (self.board(from), self.board(to)) else {
                return;
            };
            let mut batch = Vec::new();
            for (job, digest) in src.digests() {
                if only.is_some_and(|o| o != job) || dst.digest(&job) == Some(digest) {
                    continue;
                }
                batch.extend(
                    src.events(&job)
                        .iter()
                        .filter(|e| !dst.has_event(&e.id()))
                        .cloned(),
                );
            }
            if !batch.is_empty() {
                let d = self.latency();
                self.push(d, Msg::Batch { to, events: batch });
            }
        }
    }

    fn deliver(&mut self, msg: Msg) {
        match msg {
            Msg::Gossip { to, ev } => self.input(to, Input::Verified(ev)),
            Msg::Batch { to, events } => {
                for ev in events {
                    self.input(to, Input::Verified(ev));
                }
            }
            Msg::Request { to, from, request } => {
                if !self.reachable(to, from) {
                    let d = self.cfg.rr_fail_ms;
                    self.push(
                        d,
                        Msg::Reply {
                            to: from,
                            from: to,
                            request,
                            response: None,
                        },
                    );
                    return;
                }
                self.next_id += 1;
                let id = self.next_id;
                self.nodes[to].pending.insert(id, (from, request.clone()));
                let from_peer = self.nodes[from].id;
                self.input(
                    to,
                    Input::WorkRequest {
                        id,
                        from: from_peer,
                        request,
                    },
                );
            }
            Msg::Reply {
                to,
                from,
                request,
                response,
            } => {
                let from = self.nodes[from].id;
                self.input(
                    to,
                    Input::WorkReply {
                        from,
                        request,
                        response,
                    },
                );
            }
            Msg::Tick { to, generation } => {
                if self.nodes[to].tick_generation == generation {
                    self.nodes[to].tick_at = None;
                    self.input(to, Input::Tick);
                }
            }
            Msg::RenderDone { to, generation } => {
                let current = self.nodes[to]
                    .render
                    .as_ref()
                    .is_some_and(|r| r.generation == generation);
                if !current || !self.up(to) {
                    return;
                }
                let r = self.nodes[to].render.take().expect("checked above");
                let fails = self
                    .failing
                    .get(&r.task)
                    .is_some_and(|on| on.is_empty() || on.contains(&to));
                if fails {
                    self.renders.push(RenderRecord {
                        node: to,
                        task: r.task,
                        started: r.started,
                        ms: r.cost,
                        result: None,
                    });
                    self.input(
                        to,
                        Input::TaskFailed {
                            job: r.job,
                            task: r.task,
                            lease: r.lease,
                            reason: "out of memory".into(),
                        },
                    );
                    return;
                }
                let mut h = blake3::Hasher::new();
                h.update(&r.job.0);
                h.update(&blendnet_proto::encode(&(r.task, r.lease)));
                h.update(&(to as u64).to_le_bytes());
                let result = BlobHash(*h.finalize().as_bytes());
                self.blobs.entry(result).or_default().insert(to);
                self.renders.push(RenderRecord {
                    node: to,
                    task: r.task,
                    started: r.started,
                    ms: r.cost,
                    result: Some(result),
                });
                self.input(
                    to,
                    Input::TaskFinished {
                        job: r.job,
                        task: r.task,
                        lease: r.lease,
                        result,
                        stats: TaskStats {
                            render_ms: r.cost,
                            samples: r.task.samples,
                            wall_ms: r.cost,
                            denoise: self.scene_denoises,
                            ..TaskStats::default()
                        },
                    },
                );
            }
            Msg::Held { to, hash, holder } => {
                if !self.up(holder) {
                    return;
                }
                self.blobs.entry(hash).or_default().insert(holder);
                let holder = self.nodes[holder].id;
                self.input(to, Input::ResultHeld { hash, holder });
            }
            Msg::FetchFailed { to, hash, from } => {
                let from = self.nodes[from].id;
                self.input(to, Input::FetchFailed { hash, from });
            }
            Msg::Members { to } => {
                let members = self.members_seen_by(to);
                self.input(to, Input::Members(members));
            }
            Msg::AntiEntropy { node } => {
                if self.up(node) {
                    let n = self.nodes.len() as u64;
                    let other = self.rng.range(0, n.saturating_sub(1)) as usize;
                    if other != node {
                        self.sync(node, other, None);
                    }
                }
                if let Some(ae) = self.cfg.anti_entropy_ms {
                    let d = self.rng.range(ae / 2, ae + ae / 2);
                    self.push(d, Msg::AntiEntropy { node });
                }
            }
            Msg::Sync { a, b, job } => self.sync(a, b, Some(job)),
            Msg::Fault(f) => self.fault(f),
        }
    }

    /// Runs until `done` holds or simulated time passes `limit`; returns whether `done` held.
    pub(super) fn run_until(&mut self, limit: u64, mut done: impl FnMut(&Net) -> bool) -> bool {
        while let Some(Reverse(q)) = self.queue.pop() {
            if q.at > limit {
                self.queue.push(Reverse(q));
                self.now = limit;
                return done(self);
            }
            self.now = q.at;
            self.deliver(*q.msg);
            if done(self) {
                return true;
            }
        }
        done(self)
    }

    /// Runs until every live node sees `job` finished (any outcome) and, if `converge`, all
    /// live nodes hold the same events of it.
    pub(super) fn settle(&mut self, job: JobId, limit: u64) -> bool {
        self.run_until(limit, |net| {
            let boards: Vec<&Board> = net.nodes.iter().filter_map(|n| n.board.as_ref()).collect();
            let first = boards.first().and_then(|b| b.digest(&job));
            first.is_some()
                && boards.iter().all(|b| {
                    b.digest(&job) == first
                        && b.job_model(&job).is_some_and(|j| !j.status().is_active())
                })
        })
    }

    /// The events authored so far.
    pub(super) fn events(&self) -> impl Iterator<Item = &VerifiedEvent> {
        self.produced.iter().map(|(_, e)| e)
    }

    /// Nodes with the given roles.
    pub(super) fn roles(submit: bool, render: bool, coordinate: bool) -> Roles {
        let mut r = Roles::EMPTY;
        if submit {
            r = r | Roles::from(Role::Submit);
        }
        if render {
            r = r | Roles::from(Role::Render);
        }
        if coordinate {
            r = r | Roles::from(Role::Coordinate);
        }
        r
    }
}
