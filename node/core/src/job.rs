//! The job model: a job's tasks, the per-task lattice, the cover rule, and a job's state as a
//! pure function of the events a peer holds.
//!
//! A [`Job`] is built from its `Submitted` event and grows by [`Job::accept`]ing the job's
//! other events. Whatever order the events arrive in, a job holding the same set of events is
//! in the same state, so every peer that holds them agrees on every task and on the outcome:
//!
//! - **Per task, a lattice** `Pending < Leased(epoch, seq) < Done(epoch, result)` merged by
//!   max ([`TaskState`]); beside it, grow-only sets of results (`Rendered`) and failures.
//! - **Claims.** Each epoch belongs to the best-ranked peer that authored a coordinator event
//!   for it ([`rank`]: the submitter first, then rendezvous hashing). Coordinator events of an
//!   epoch by anyone else are fenced: refused if the owner is known, removed (and the job
//!   rebuilt from the rest) if the owner's claim comes later. A claim can only get better,
//!   so "fenced" never turns back into "valid", and dropping or fencing commutes.
//! - **Tasks.** Whole-frame jobs have a fixed set of tasks ([`Plan::Frames`]). Sample-split
//!   frames are carved by coordinators as they grant, so two coordinators (one after the other,
//!   or both at once in a split brain) may carve one frame differently. The **cover rule** picks,
//!   per frame, non-overlapping tasks by priority (done, then rendered, then leased, then known;
//!   within a class the higher lattice value; then the task's order): the cover. Tasks outside
//!   it are orphaned; the uncovered samples are holes, carved again.
//! - **Outcome.** Done when every frame is covered by done tasks, whatever else happened; else
//!   cancelled if the submitter cancelled; else failed if its coordinator gave up; else active.

use blendnet_proto::job::EventBody;
use blendnet_proto::{
    BlobHash, EventId, JobId, JobSpec, Lease, PeerId, TaskSpec, TaskStats, VerifiedEvent,
};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// One task's place in the lattice. Ordered, and merged by max: a lease of a later epoch, or
/// a later lease of the same epoch, wins over an earlier one; any done wins over any lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize)]
pub enum TaskState {
    /// Known, never leased.
    #[default]
    Pending,
    /// Leased; the highest lease known.
    Leased(Lease),
    /// Done: `result` was held by a second peer when the coordinator of `epoch` said so.
    Done { epoch: u64, result: BlobHash },
}

impl TaskState {
    /// The lattice join.
    pub fn merge(self, other: TaskState) -> TaskState {
        self.max(other)
    }

    /// Whether the task is done.
    pub fn is_done(&self) -> bool {
        matches!(self, TaskState::Done { .. })
    }
}

/// The rank of a peer as coordinator of a job: lower is better. The submitter comes first
/// (it holds the scene and usually wants the results), then every other peer by rendezvous
/// hashing `blake3(job ‖ peer)`, so each job spreads to a different coordinator and every peer
/// computes the same order without talking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank(bool, Reverse<[u8; 32]>);

/// BLAKE3 key-derivation context for coordinator ranks.
const RANK_CONTEXT: &str = "blendnet v1 coordinator rank";

/// The rank of `peer` for `job` submitted by `submitter`.
pub fn rank(job: &JobId, submitter: &PeerId, peer: &PeerId) -> Rank {
    let mut hasher = blake3::Hasher::new_derive_key(RANK_CONTEXT);
    hasher.update(&job.0);
    hasher.update(&peer.to_bytes());
    Rank(peer != submitter, Reverse(*hasher.finalize().as_bytes()))
}

/// How a job is cut into tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Whole-frame tasks, fixed from the spec.
    Frames { tasks: BTreeSet<TaskSpec> },
    /// Sample slices of each frame, carved by coordinators at grant time.
    Samples { frames: BTreeSet<u32>, samples: u32 },
}

impl Plan {
    /// The plan for a (valid) spec.
    pub fn of(spec: &JobSpec) -> Plan {
        if spec.splits_samples() {
            Plan::Samples {
                frames: spec.frames.iter().copied().collect(),
                samples: spec.samples,
            }
        } else {
            Plan::Frames {
                tasks: frame_tasks(spec).into_iter().collect(),
            }
        }
    }

    /// Whether `task` can be a task of this plan: a planned whole-frame task, or a slice or
    /// the merge of a sample-split frame.
    pub fn admits(&self, task: &TaskSpec) -> bool {
        match self {
            Plan::Frames { tasks } => tasks.contains(task),
            Plan::Samples { frames, samples } if task.is_merge() => {
                *task == TaskSpec::merge(task.frame_start, *samples)
                    && frames.contains(&task.frame_start)
            }
            Plan::Samples { frames, samples } => {
                task.frame_count == 1
                    && frames.contains(&task.frame_start)
                    && task.samples >= 1
                    && u64::from(task.sample_offset) + u64::from(task.samples)
                        <= u64::from(*samples)
            }
        }
    }

    /// The job's total work in frame-samples.
    pub fn units(&self) -> u64 {
        match self {
            Plan::Frames { tasks } => tasks.iter().map(TaskSpec::units).sum(),
            Plan::Samples { frames, samples } => frames.len() as u64 * u64::from(*samples),
        }
    }
}

/// Whole-frame tasks: the sorted frames cut into runs of at most `frames_per_task` consecutive
/// frames (a gap in the frame list ends a run).
pub fn frame_tasks(spec: &JobSpec) -> Vec<TaskSpec> {
    let mut frames = spec.frames.clone();
    frames.sort_unstable();
    frames.dedup();
    let per = spec.frames_per_task.max(1);
    let mut out: Vec<TaskSpec> = Vec::new();
    for f in frames {
        match out.last_mut() {
            Some(t)
                if t.frame_count < per && t.frame_start.checked_add(t.frame_count) == Some(f) =>
            {
                t.frame_count += 1;
            }
            _ => out.push(TaskSpec::render(f, 1, 0, spec.samples)),
        }
    }
    out
}

/// Where a task stands in the cover rule's priority: lower comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CoverKey {
    class: u8,
    state: Reverse<TaskState>,
}

impl CoverKey {
    /// The key of a task in `state`, with or without a rendered result.
    pub fn new(state: TaskState, rendered: bool) -> CoverKey {
        let class = match state {
            TaskState::Done { .. } => 0,
            _ if rendered => 1,
            TaskState::Leased(_) => 2,
            TaskState::Pending => 3,
        };
        CoverKey {
            class,
            state: Reverse(state),
        }
    }
}

/// The cover rule for one frame: picks tasks by `(key, task)` order, skipping any that overlaps
/// one already picked. The result is a set of disjoint tasks; it depends only on the set given,
/// never on its order.
pub fn cover(tasks: impl IntoIterator<Item = (TaskSpec, CoverKey)>) -> BTreeSet<TaskSpec> {
    let mut ranked: Vec<(CoverKey, TaskSpec)> = tasks.into_iter().map(|(t, k)| (k, t)).collect();
    ranked.sort();
    // start → end of the picked sample ranges; disjoint, so only the predecessor can overlap.
    let mut picked: BTreeMap<u32, (u32, TaskSpec)> = BTreeMap::new();
    for (_, task) in ranked {
        let r = task.sample_range();
        let clashes = picked
            .range(..r.end)
            .next_back()
            .is_some_and(|(_, (end, _))| *end > r.start);
        if !clashes {
            picked.insert(r.start, (r.end, task));
        }
    }
    picked.into_values().map(|(_, t)| t).collect()
}

/// The sample ranges of `[0, samples)` that no task of `cover` (disjoint, one frame) renders.
pub fn holes(cover: impl IntoIterator<Item = TaskSpec>, samples: u32) -> Vec<(u32, u32)> {
    let mut ranges: Vec<(u32, u32)> = cover
        .into_iter()
        .map(|t| (t.sample_range().start, t.sample_range().end))
        .collect();
    ranges.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0u32;
    for (start, end) in ranges {
        if start > at {
            out.push((at, start));
        }
        at = at.max(end);
    }
    if at < samples {
        out.push((at, samples));
    }
    out
}

/// A worker's report that it rendered a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub lease: Lease,
    pub result: BlobHash,
    pub stats: TaskStats,
}

/// Everything a peer knows of one task, merged from events.
///
/// The events themselves are kept (shared, not copied) in small sorted vectors and read back
/// on demand: a farm-size job has thousands of tasks on every peer, and a map per task would
/// cost kilobytes each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskRecord {
    /// The lattice value.
    pub state: TaskState,
    /// Every valid `Granted`, by lease.
    grants: Vec<(Lease, VerifiedEvent)>,
    /// Every `Rendered`, by (worker, result): a worker may render a task twice (two leases).
    reports: Vec<VerifiedEvent>,
    /// The highest `TaskFailed` of each worker, by worker.
    failures: Vec<VerifiedEvent>,
}

fn report_of(ev: &VerifiedEvent) -> Option<Report> {
    match ev.body() {
        EventBody::Rendered {
            lease,
            result,
            stats,
            ..
        } => Some(Report {
            lease: *lease,
            result: *result,
            stats: *stats,
        }),
        _ => None,
    }
}

fn failure_of(ev: &VerifiedEvent) -> Option<(Lease, &str)> {
    match ev.body() {
        EventBody::TaskFailed { lease, reason, .. } => Some((*lease, reason.as_str())),
        _ => None,
    }
}

impl TaskRecord {
    /// The highest lease that is not a backup.
    pub fn primary(&self) -> Option<Lease> {
        self.grants
            .iter()
            .rev()
            .map(|(l, _)| *l)
            .find(|l| !l.backup)
    }

    /// The highest backup lease.
    pub fn backup(&self) -> Option<Lease> {
        self.grants.iter().rev().map(|(l, _)| *l).find(|l| l.backup)
    }

    /// The `Granted` event of `lease`, if it is a valid grant of this task.
    pub fn grant(&self, lease: &Lease) -> Option<&VerifiedEvent> {
        self.grants
            .binary_search_by(|(l, _)| l.cmp(lease))
            .ok()
            .map(|i| &self.grants[i].1)
    }

    /// Every valid grant, lowest lease first.
    pub fn grants(&self) -> impl Iterator<Item = (Lease, &VerifiedEvent)> {
        self.grants.iter().map(|(l, e)| (*l, e))
    }

    /// The highest `(epoch, seq)` granted for this task, primary or backup.
    pub fn last_grant(&self) -> Option<(u64, u64)> {
        self.grants.iter().map(|(l, _)| (l.epoch, l.seq)).max()
    }

    /// Results reported, by (worker, result).
    pub fn reports(&self) -> impl Iterator<Item = Report> + '_ {
        self.reports.iter().filter_map(report_of)
    }

    /// Whether any result was reported.
    pub fn has_results(&self) -> bool {
        !self.reports.is_empty()
    }

    /// Failures: each failing worker once, with its highest failed lease and its reason.
    pub fn failures(&self) -> impl Iterator<Item = (PeerId, Lease, &str)> {
        self.failures
            .iter()
            .filter_map(|e| failure_of(e).map(|(l, r)| (e.author(), l, r)))
    }

    /// How many distinct workers failed the task.
    pub fn failed_peers(&self) -> usize {
        self.failures.len()
    }

    /// Whether `peer` failed the task.
    pub fn failed_on(&self, peer: &PeerId) -> bool {
        self.failures.iter().any(|e| e.author() == *peer)
    }

    /// Whether `lease`'s worker reported it rendered or failed.
    pub fn reported(&self, lease: &Lease) -> bool {
        self.reports().any(|r| r.lease == *lease) || self.failures().any(|(_, l, _)| l == *lease)
    }

    fn add_grant(&mut self, lease: Lease, ev: &VerifiedEvent) {
        if let Err(i) = self.grants.binary_search_by(|(l, _)| l.cmp(&lease)) {
            self.grants.insert(i, (lease, ev.clone()));
        }
    }

    fn add_report(&mut self, ev: &VerifiedEvent) {
        let key = |e: &VerifiedEvent| report_of(e).map(|r| (r.lease.worker, r.result));
        let k = key(ev);
        if let Err(i) = self.reports.binary_search_by(|e| key(e).cmp(&k)) {
            self.reports.insert(i, ev.clone());
        }
    }

    fn add_failure(&mut self, ev: &VerifiedEvent) {
        let Some(new) = failure_of(ev) else {
            return;
        };
        match self
            .failures
            .binary_search_by(|e| e.author().cmp(&ev.author()))
        {
            Ok(i) => {
                if failure_of(&self.failures[i]).is_some_and(|old| new > old) {
                    self.failures[i] = ev.clone();
                }
            }
            Err(i) => self.failures.insert(i, ev.clone()),
        }
    }

    fn cover_key(&self) -> CoverKey {
        CoverKey::new(self.state, self.has_results())
    }
}

/// A job's outcome so far.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub enum JobStatus {
    Active,
    Done,
    Cancelled,
    Failed { reason: String },
}

impl JobStatus {
    /// Whether tasks are still granted and rendered.
    pub fn is_active(&self) -> bool {
        matches!(self, JobStatus::Active)
    }
}

/// Measured render time, for sizing slices and spotting stragglers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Speed {
    /// Render milliseconds measured.
    pub ms: u64,
    /// Frame-samples rendered in that time.
    pub units: u64,
}

impl Speed {
    /// Milliseconds per frame-sample, once anything is measured.
    pub fn ms_per_unit(&self) -> Option<f64> {
        (self.units > 0).then(|| self.ms as f64 / self.units as f64)
    }

    fn add(&mut self, task: &TaskSpec, stats: &TaskStats) {
        if stats.samples > 0 {
            self.ms = self.ms.saturating_add(stats.render_ms);
            self.units = self
                .units
                .saturating_add(u64::from(task.frame_count) * u64::from(stats.samples));
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FrameCover {
    /// Every known task of the frame.
    known: BTreeSet<TaskSpec>,
    cover: BTreeSet<TaskSpec>,
    /// Whether two known tasks ever overlapped; until then the cover is every known task.
    conflicted: bool,
    /// Samples of done tasks in the cover.
    done_samples: u64,
}

/// Why a job refused an event. Refused events change nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("epoch {epoch} belongs to a better-ranked coordinator ({owner})")]
    StaleEpoch { epoch: u64, owner: PeerId },
    #[error("task {task} is not a task of this job")]
    NotATask { task: TaskSpec },
    #[error("only the submitter may cancel a job")]
    NotSubmitter,
    #[error("a job's events go to the job, and its submission is its first")]
    Misdirected,
}

/// What accepting an event changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// Tasks whose record or cover membership changed.
    pub tasks: BTreeSet<TaskSpec>,
    /// The current claim (epoch, coordinator) changed.
    pub claim_changed: bool,
    /// The status changed.
    pub status_changed: bool,
    /// Events fenced by this one (removed from the job, which was rebuilt from the rest).
    pub fenced: Vec<EventId>,
}

/// A job as one peer knows it: a pure function of the set of its events.
#[derive(Debug, Clone)]
pub struct Job {
    id: JobId,
    spec: Arc<JobSpec>,
    submitter: PeerId,
    plan: Plan,
    /// Every event held, the submission first, then in arrival order.
    events: Vec<VerifiedEvent>,
    /// Epoch → owner.
    claims: BTreeMap<u64, PeerId>,
    cancelled: bool,
    failed: Option<(u64, String)>,
    tasks: BTreeMap<TaskSpec, TaskRecord>,
    /// Sample-split jobs only.
    frames: BTreeMap<u32, FrameCover>,
    /// Frames whose cover is done (sample-split jobs).
    done_frames: usize,
    /// Frames whose merge is done (sample-split jobs).
    merged_frames: usize,
    /// Whole-frame jobs only.
    done_tasks: usize,
    speed: Speed,
    speed_by_worker: BTreeMap<PeerId, Speed>,
    /// A worker reported that the scene asks for denoising.
    denoises: bool,
    /// XOR of the ids of the events held: equal sets, equal digests (anti-entropy).
    digest: [u8; 32],
}

impl Job {
    /// A job from its (verified) submission. `None` if the event is not a valid submission.
    pub fn new(submitted: VerifiedEvent) -> Option<Job> {
        let EventBody::Submitted { spec } = submitted.body() else {
            return None;
        };
        spec.validate().ok()?;
        let plan = Plan::of(spec);
        let mut job = Job {
            id: JobId::from(submitted.id()),
            spec: Arc::new(spec.clone()),
            submitter: submitted.author(),
            plan,
            events: Vec::new(),
            claims: BTreeMap::new(),
            cancelled: false,
            failed: None,
            tasks: BTreeMap::new(),
            frames: BTreeMap::new(),
            done_frames: 0,
            merged_frames: 0,
            done_tasks: 0,
            speed: Speed::default(),
            speed_by_worker: BTreeMap::new(),
            denoises: false,
            digest: [0; 32],
        };
        job.reset();
        job.push(submitted);
        Some(job)
    }

    fn reset(&mut self) {
        self.claims.clear();
        self.cancelled = false;
        self.failed = None;
        self.tasks.clear();
        self.frames.clear();
        self.done_frames = 0;
        self.merged_frames = 0;
        self.done_tasks = 0;
        self.speed = Speed::default();
        self.speed_by_worker.clear();
        self.denoises = false;
        match &self.plan {
            Plan::Frames { tasks } => {
                for t in tasks {
                    self.tasks.insert(*t, TaskRecord::default());
                }
            }
            Plan::Samples { frames, .. } => {
                for f in frames {
                    self.frames.insert(*f, FrameCover::default());
                }
            }
        }
    }

    fn push(&mut self, ev: VerifiedEvent) {
        let id = ev.id().0;
        for (d, b) in self.digest.chunks_exact_mut(8).zip(id.chunks_exact(8)) {
            let x = u64::from_le_bytes(d.try_into().expect("8 bytes"))
                ^ u64::from_le_bytes(b.try_into().expect("8 bytes"));
            d.copy_from_slice(&x.to_le_bytes());
        }
        self.events.push(ev);
    }

    /// The job's id (the id of its submission).
    pub fn id(&self) -> JobId {
        self.id
    }

    /// What was submitted.
    pub fn spec(&self) -> &Arc<JobSpec> {
        &self.spec
    }

    /// Who submitted it.
    pub fn submitter(&self) -> PeerId {
        self.submitter
    }

    /// How it is cut into tasks.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Every event held, the submission first.
    pub fn events(&self) -> &[VerifiedEvent] {
        &self.events
    }

    /// A digest of the set of events held and their number.
    pub fn digest(&self) -> ([u8; 32], usize) {
        (self.digest, self.events.len())
    }

    /// The current claim: the highest epoch and its owner.
    pub fn claim(&self) -> Option<(u64, PeerId)> {
        self.claims.iter().next_back().map(|(e, p)| (*e, *p))
    }

    /// The owner of `epoch`, if anyone claimed it.
    pub fn owner(&self, epoch: u64) -> Option<PeerId> {
        self.claims.get(&epoch).copied()
    }

    /// The rank of `peer` as this job's coordinator.
    pub fn rank(&self, peer: &PeerId) -> Rank {
        rank(&self.id, &self.submitter, peer)
    }

    /// Every task known, with its record.
    pub fn tasks(&self) -> &BTreeMap<TaskSpec, TaskRecord> {
        &self.tasks
    }

    /// One task's record.
    pub fn task(&self, task: &TaskSpec) -> Option<&TaskRecord> {
        self.tasks.get(task)
    }

    /// Whether the scene asks for denoising, as a worker that loaded it reported: its merges
    /// need a Blender that can denoise.
    pub fn denoises(&self) -> bool {
        self.denoises
    }

    /// Measured speed over the whole job, and per worker.
    pub fn speed(&self, worker: Option<&PeerId>) -> Speed {
        match worker {
            None => self.speed,
            Some(w) => self.speed_by_worker.get(w).copied().unwrap_or_default(),
        }
    }

    /// Whether `task` is in the cover (a task the job needs). A frame's merge is needed once
    /// its slices are all done.
    pub fn in_cover(&self, task: &TaskSpec) -> bool {
        match &self.plan {
            Plan::Frames { tasks } => tasks.contains(task),
            Plan::Samples { .. } if task.is_merge() => {
                self.merge_inputs(task.frame_start).is_some()
            }
            Plan::Samples { .. } => self
                .frames
                .get(&task.frame_start)
                .is_some_and(|f| f.cover.contains(task)),
        }
    }

    /// The results of a sample-split frame's slices, once they are all done: what its merge
    /// takes, in sample order.
    pub fn merge_inputs(&self, frame: u32) -> Option<Vec<BlobHash>> {
        let Plan::Samples { samples, .. } = &self.plan else {
            return None;
        };
        let cover = self.frames.get(&frame)?;
        if cover.done_samples != u64::from(*samples) {
            return None;
        }
        cover
            .cover
            .iter()
            .map(|t| match self.tasks.get(t)?.state {
                TaskState::Done { result, .. } => Some(result),
                _ => None,
            })
            .collect()
    }

    /// The finished outputs known so far: the done merges of a sample-split job, or the done
    /// tasks of a whole-frame job, with the result blob (a manifest) of each.
    pub fn outputs(&self) -> impl Iterator<Item = (TaskSpec, BlobHash)> + '_ {
        let merges = matches!(self.plan, Plan::Samples { .. });
        self.tasks.iter().filter_map(move |(t, r)| match r.state {
            TaskState::Done { result, .. } if t.is_merge() == merges => Some((*t, result)),
            _ => None,
        })
    }

    /// The uncovered sample ranges of each frame with any, in frame order (sample-split jobs).
    pub fn holes(&self) -> impl Iterator<Item = (u32, Vec<(u32, u32)>)> + '_ {
        let samples = match &self.plan {
            Plan::Samples { samples, .. } => *samples,
            Plan::Frames { .. } => 0,
        };
        self.frames.iter().filter_map(move |(f, c)| {
            let covered: u64 = c.cover.iter().map(|t| u64::from(t.samples)).sum();
            (covered < u64::from(samples)).then(|| (*f, holes(c.cover.iter().copied(), samples)))
        })
    }

    /// Frame-samples not yet in any cover task (sample-split jobs; 0 for whole frames).
    pub fn unplanned_units(&self) -> u64 {
        match &self.plan {
            Plan::Frames { .. } => 0,
            Plan::Samples { samples, .. } => self
                .frames
                .values()
                .map(|c| {
                    let covered: u64 = c.cover.iter().map(|t| u64::from(t.samples)).sum();
                    u64::from(*samples).saturating_sub(covered)
                })
                .sum(),
        }
    }

    /// Samples done per frame, in frame order, with the frame's total.
    pub fn frame_progress(&self) -> Vec<(u32, u64, u64)> {
        match &self.plan {
            Plan::Frames { tasks } => {
                let mut out = Vec::new();
                for t in tasks {
                    let done = self.tasks.get(t).is_some_and(|r| r.state.is_done());
                    for f in t.frames() {
                        let s = u64::from(t.samples);
                        out.push((f, if done { s } else { 0 }, s));
                    }
                }
                out
            }
            Plan::Samples { samples, .. } => self
                .frames
                .iter()
                .map(|(f, c)| (*f, c.done_samples, u64::from(*samples)))
                .collect(),
        }
    }

    /// Whether every frame is done: rendered, and merged if it was split.
    pub fn is_complete(&self) -> bool {
        match &self.plan {
            Plan::Frames { tasks } => self.done_tasks == tasks.len(),
            Plan::Samples { frames, .. } => {
                self.done_frames == frames.len() && self.merged_frames == frames.len()
            }
        }
    }

    /// The outcome so far.
    pub fn status(&self) -> JobStatus {
        if self.is_complete() {
            JobStatus::Done
        } else if self.cancelled {
            JobStatus::Cancelled
        } else if let Some((_, reason)) = &self.failed {
            JobStatus::Failed {
                reason: reason.clone(),
            }
        } else {
            JobStatus::Active
        }
    }

    /// Checks an event against the job without changing anything: `Ok(Some(owner))` if it
    /// fences the events of `owner` at its epoch.
    fn check(&self, ev: &VerifiedEvent) -> Result<Option<(u64, PeerId)>, Refused> {
        let body = ev.body();
        if body.job() != Some(self.id) {
            return Err(Refused::Misdirected);
        }
        if let Some(task) = body.task()
            && !self.plan.admits(&task)
        {
            return Err(Refused::NotATask { task });
        }
        if let EventBody::Cancelled { .. } = body
            && ev.author() != self.submitter
        {
            return Err(Refused::NotSubmitter);
        }
        match body.coordinator_epoch() {
            Some(epoch) => match self.claims.get(&epoch) {
                Some(owner) if *owner == ev.author() => Ok(None),
                Some(owner) if self.rank(owner) < self.rank(&ev.author()) => {
                    Err(Refused::StaleEpoch {
                        epoch,
                        owner: *owner,
                    })
                }
                Some(owner) => Ok(Some((epoch, *owner))),
                None => Ok(None),
            },
            None => Ok(None),
        }
    }

    /// Takes a new (verified, not yet held) event of this job. Heartbeats are not events of the
    /// state and are refused as misdirected; the caller handles them.
    pub fn accept(&mut self, ev: VerifiedEvent) -> Result<Applied, Refused> {
        if matches!(
            ev.body(),
            EventBody::Heartbeat { .. } | EventBody::Submitted { .. }
        ) {
            return Err(Refused::Misdirected);
        }
        let fences = self.check(&ev)?;
        let before = (self.claim(), self.status());
        let mut applied = Applied::default();
        match fences {
            None => {
                self.push(ev.clone());
                self.apply(&ev, &mut applied);
            }
            Some((epoch, owner)) => {
                let (kept, fenced): (Vec<_>, Vec<_>) =
                    std::mem::take(&mut self.events).into_iter().partition(|e| {
                        !(e.author() == owner && e.body().coordinator_epoch() == Some(epoch))
                    });
                applied.fenced = fenced.iter().map(VerifiedEvent::id).collect();
                // Tasks only the fenced events knew vanish: report them too.
                applied.tasks.extend(self.tasks.keys().copied());
                self.digest = [0; 32];
                self.reset();
                for e in kept {
                    self.push(e.clone());
                    if !matches!(e.body(), EventBody::Submitted { .. }) {
                        self.apply(&e, &mut applied);
                    }
                }
                self.push(ev.clone());
                self.apply(&ev, &mut applied);
                // Everything may have moved: report every task.
                applied.tasks.extend(self.tasks.keys().copied());
            }
        }
        applied.claim_changed = self.claim() != before.0;
        applied.status_changed = self.status() != before.1;
        Ok(applied)
    }

    fn claim_epoch(&mut self, epoch: u64, author: PeerId) {
        self.claims.entry(epoch).or_insert(author);
    }

    fn apply(&mut self, ev: &VerifiedEvent, applied: &mut Applied) {
        let author = ev.author();
        match ev.body() {
            EventBody::Submitted { .. } | EventBody::Heartbeat { .. } => {}
            EventBody::Coordinating { epoch, .. } => self.claim_epoch(*epoch, author),
            EventBody::Granted { task, lease, .. } => {
                self.claim_epoch(lease.epoch, author);
                let rec = self.record(*task, applied);
                rec.add_grant(*lease, ev);
                rec.state = rec.state.merge(TaskState::Leased(*lease));
                self.task_changed(*task, applied);
            }
            EventBody::Rendered {
                task, lease, stats, ..
            } => {
                let rec = self.record(*task, applied);
                rec.add_report(ev);
                self.denoises |= stats.denoise;
                self.speed.add(task, stats);
                self.speed_by_worker
                    .entry(lease.worker)
                    .or_default()
                    .add(task, stats);
                self.task_changed(*task, applied);
            }
            EventBody::TaskFailed { task, .. } => {
                let rec = self.record(*task, applied);
                rec.add_failure(ev);
                self.task_changed(*task, applied);
            }
            EventBody::Done {
                task,
                result,
                epoch,
                ..
            } => {
                self.claim_epoch(*epoch, author);
                let rec = self.record(*task, applied);
                let was_done = rec.state.is_done();
                rec.state = rec.state.merge(TaskState::Done {
                    epoch: *epoch,
                    result: *result,
                });
                if !was_done {
                    match self.plan {
                        Plan::Frames { .. } => self.done_tasks += 1,
                        Plan::Samples { .. } if task.is_merge() => self.merged_frames += 1,
                        Plan::Samples { .. } => {}
                    }
                }
                self.task_changed(*task, applied);
            }
            EventBody::JobFailed { epoch, reason, .. } => {
                self.claim_epoch(*epoch, author);
                let new = (*epoch, reason.clone());
                if self.failed.as_ref().is_none_or(|f| new > *f) {
                    self.failed = Some(new);
                }
            }
            EventBody::Cancelled { .. } => self.cancelled = true,
        }
    }

    /// The record of `task`, created (and placed in its frame) if new.
    fn record(&mut self, task: TaskSpec, applied: &mut Applied) -> &mut TaskRecord {
        if let std::collections::btree_map::Entry::Vacant(v) = self.tasks.entry(task) {
            v.insert(TaskRecord::default());
            if let Some(frame) = self
                .frames
                .get_mut(&task.frame_start)
                .filter(|_| !task.is_merge())
            {
                if !frame.conflicted {
                    let r = task.sample_range();
                    let clash = frame
                        .known
                        .iter()
                        .any(|k| k.sample_range().start < r.end && r.start < k.sample_range().end);
                    if clash {
                        frame.conflicted = true;
                    } else {
                        frame.cover.insert(task);
                    }
                }
                frame.known.insert(task);
            }
        }
        applied.tasks.insert(task);
        self.tasks.get_mut(&task).expect("inserted above")
    }

    /// Recomputes the cover and done samples of `task`'s frame (sample-split jobs); a frame
    /// that becomes done gets its merge task, and either way its merge is reported changed.
    fn task_changed(&mut self, task: TaskSpec, applied: &mut Applied) {
        let Plan::Samples { samples, .. } = self.plan else {
            return;
        };
        if task.is_merge() {
            return;
        }
        let Some(frame) = self.frames.get_mut(&task.frame_start) else {
            return;
        };
        let was_done = frame.done_samples == u64::from(samples);
        if frame.conflicted {
            let tasks = &self.tasks;
            let new = cover(frame.known.iter().map(|t| {
                (
                    *t,
                    tasks
                        .get(t)
                        .map(TaskRecord::cover_key)
                        .unwrap_or(CoverKey::new(TaskState::Pending, false)),
                )
            }));
            applied
                .tasks
                .extend(new.symmetric_difference(&frame.cover).copied());
            frame.cover = new;
        }
        frame.done_samples = frame
            .cover
            .iter()
            .filter(|t| self.tasks.get(t).is_some_and(|r| r.state.is_done()))
            .map(|t| u64::from(t.samples))
            .sum();
        let is_done = frame.done_samples == u64::from(samples);
        match (was_done, is_done) {
            (false, true) => self.done_frames += 1,
            (true, false) => self.done_frames -= 1,
            _ => {}
        }
        if was_done != is_done || is_done {
            let merge = TaskSpec::merge(task.frame_start, samples);
            self.tasks.entry(merge).or_default();
            applied.tasks.insert(merge);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blendnet_proto::job::SignedEvent;
    use blendnet_proto::{Engine, Split};
    use libp2p_identity::Keypair;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn lease(epoch: u64, seq: u64, w: u8, backup: bool) -> Lease {
        Lease {
            epoch,
            seq,
            worker: peers()[w as usize % 4],
            backup,
        }
    }

    fn peers() -> &'static [PeerId; 4] {
        static P: OnceLock<[PeerId; 4]> = OnceLock::new();
        P.get_or_init(|| std::array::from_fn(|_| PeerId::random()))
    }

    fn arb_state() -> impl Strategy<Value = TaskState> {
        prop_oneof![
            Just(TaskState::Pending),
            (1u64..4, 1u64..4, 0u8..4, any::<bool>())
                .prop_map(|(e, s, w, b)| TaskState::Leased(lease(e, s, w, b))),
            (1u64..4, 0u8..3).prop_map(|(e, r)| TaskState::Done {
                epoch: e,
                result: BlobHash([r; 32])
            }),
        ]
    }

    proptest! {
        #[test]
        fn the_task_lattice_is_a_semilattice(a in arb_state(), b in arb_state(), c in arb_state()) {
            prop_assert_eq!(a.merge(b), b.merge(a));
            prop_assert_eq!(a.merge(b).merge(c), a.merge(b.merge(c)));
            prop_assert_eq!(a.merge(a), a);
            prop_assert!(a.merge(b) >= a && a.merge(b) >= b);
            if a.is_done() { prop_assert!(a.merge(b).is_done()); }
        }
    }

    #[test]
    fn lattice_order_is_pending_then_leases_by_epoch_and_seq_then_done() {
        let l11 = TaskState::Leased(lease(1, 1, 0, false));
        let l12 = TaskState::Leased(lease(1, 2, 0, true));
        let l21 = TaskState::Leased(lease(2, 1, 1, false));
        let done = TaskState::Done {
            epoch: 1,
            result: BlobHash([0; 32]),
        };
        assert!(TaskState::Pending < l11 && l11 < l12 && l12 < l21 && l21 < done);
    }

    fn spec(frames: Vec<u32>, samples: u32, split: Split) -> JobSpec {
        let mut s = JobSpec::new(
            "t",
            BlobHash::of(b"m"),
            "a.blend",
            frames,
            samples,
            Engine::Cycles,
            0,
        );
        s.split = split;
        s
    }

    #[test]
    fn whole_frame_tasks_are_runs_of_consecutive_frames() {
        let mut s = spec(vec![1, 2, 3, 4, 5, 7, 8, 10], 64, Split::Frames);
        s.frames_per_task = 2;
        let runs: Vec<(u32, u32)> = frame_tasks(&s)
            .iter()
            .map(|t| (t.frame_start, t.frame_count))
            .collect();
        assert_eq!(runs, vec![(1, 2), (3, 2), (5, 1), (7, 2), (10, 1)]);
        assert!(frame_tasks(&s).iter().all(|t| t.samples == 64));
        let plan = Plan::of(&s);
        assert_eq!(plan.units(), 8 * 64);
        assert!(plan.admits(&frame_tasks(&s)[0]));
        assert!(!plan.admits(&TaskSpec::render(1, 1, 0, 64)));
    }

    #[test]
    fn a_still_is_sliced_and_slices_must_fit_the_frame() {
        let plan = Plan::of(&spec(vec![5], 100, Split::Auto));
        let t = |o, s| TaskSpec::render(5, 1, o, s);
        assert!(plan.admits(&t(0, 100)) && plan.admits(&t(99, 1)));
        assert!(!plan.admits(&t(99, 2)));
        assert!(!plan.admits(&TaskSpec {
            frame_start: 6,
            ..t(0, 1)
        }));
    }

    fn slice(o: u32, s: u32) -> TaskSpec {
        TaskSpec::render(0, 1, o, s)
    }

    #[test]
    fn the_cover_prefers_done_then_rendered_then_the_higher_lease_and_leaves_holes() {
        let done = CoverKey::new(
            TaskState::Done {
                epoch: 1,
                result: BlobHash([1; 32]),
            },
            true,
        );
        let rendered = CoverKey::new(TaskState::Leased(lease(1, 1, 0, false)), true);
        let high = CoverKey::new(TaskState::Leased(lease(3, 1, 0, false)), false);
        let low = CoverKey::new(TaskState::Leased(lease(2, 9, 0, false)), false);
        let chosen = cover([
            (slice(0, 50), low),
            (slice(10, 20), done),
            (slice(30, 40), high),
            (slice(70, 10), rendered),
            (slice(75, 20), high),
        ]);
        assert_eq!(chosen, [slice(10, 20), slice(30, 40), slice(70, 10)].into());
        assert_eq!(holes(chosen, 100), vec![(0, 10), (80, 100)]);
    }

    proptest! {
        /// The cover depends only on the set of tasks, is disjoint, and orphans only tasks that
        /// overlap a chosen one.
        #[test]
        fn the_cover_is_a_deterministic_partition(
            raw in prop::collection::vec((0u32..60, 1u32..30, arb_state(), any::<bool>()), 1..12),
            seed in any::<u64>(),
        ) {
            let items: Vec<(TaskSpec, CoverKey)> = raw
                .iter()
                .map(|(o, s, st, r)| (slice(*o, (*s).min(64 - *o)), CoverKey::new(*st, *r)))
                .collect();
            let mut shuffled = items.clone();
            let n = shuffled.len();
            for i in 0..n {
                let j = (seed.wrapping_mul(i as u64 + 7) >> 7) as usize % n;
                shuffled.swap(i, j);
            }
            let a = cover(items.clone());
            prop_assert_eq!(&a, &cover(shuffled));
            for x in &a {
                for y in &a {
                    prop_assert!(x == y || !x.overlaps(y));
                }
            }
            for (t, _) in &items {
                prop_assert!(a.contains(t) || a.iter().any(|c| c.overlaps(t)));
            }
            let covered: u32 = a.iter().map(|t| t.samples).sum();
            let gaps: u32 = holes(a.iter().copied(), 64).iter().map(|(s, e)| e - s).sum();
            prop_assert_eq!(covered + gaps, 64);
        }
    }

    /// A fixed cast: a submitter and two coordinators with their keys, and a still.
    struct Cast {
        keys: Vec<Keypair>,
        submitted: VerifiedEvent,
    }

    fn cast() -> &'static Cast {
        static C: OnceLock<Cast> = OnceLock::new();
        C.get_or_init(|| {
            let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
            let submitted = SignedEvent::sign(
                &keys[0],
                EventBody::Submitted {
                    spec: spec(vec![1], 64, Split::Auto),
                },
            )
            .unwrap();
            Cast { keys, submitted }
        })
    }

    fn job_id() -> JobId {
        JobId::from(cast().submitted.id())
    }

    fn id_of(k: usize) -> PeerId {
        cast().keys[k].public().to_peer_id()
    }

    fn grant(by: usize, epoch: u64, seq: u64, o: u32, s: u32, worker: usize) -> VerifiedEvent {
        SignedEvent::sign(
            &cast().keys[by],
            EventBody::Granted {
                job: job_id(),
                task: TaskSpec {
                    frame_start: 1,
                    ..slice(o, s)
                },
                lease: Lease {
                    epoch,
                    seq,
                    worker: id_of(worker),
                    backup: false,
                },
                inputs: vec![],
            },
        )
        .unwrap()
    }

    fn done(by: usize, epoch: u64, o: u32, s: u32) -> VerifiedEvent {
        SignedEvent::sign(
            &cast().keys[by],
            EventBody::Done {
                job: job_id(),
                task: TaskSpec {
                    frame_start: 1,
                    ..slice(o, s)
                },
                result: BlobHash([o as u8; 32]),
                epoch,
            },
        )
        .unwrap()
    }

    /// The better- and worse-ranked of the two coordinators (keys 1 and 2).
    fn ranked() -> (usize, usize) {
        let j = Job::new(cast().submitted.clone()).unwrap();
        if j.rank(&id_of(1)) < j.rank(&id_of(2)) {
            (1, 2)
        } else {
            (2, 1)
        }
    }

    /// A view of a job that must be equal on peers holding the same events.
    fn fingerprint(j: &Job) -> impl PartialEq + std::fmt::Debug + use<> {
        let tasks: Vec<(TaskSpec, TaskState, bool, usize)> = j
            .tasks()
            .iter()
            .map(|(t, r)| (*t, r.state, j.in_cover(t), r.reports().count()))
            .collect();
        (
            tasks,
            j.claim(),
            j.status(),
            j.digest(),
            j.frame_progress(),
            j.holes().collect::<Vec<_>>(),
        )
    }

    proptest! {
        /// Two coordinators claim the same epoch and carve one frame differently; another
        /// epoch follows. In whatever order a peer receives the events, and with whichever
        /// of them it refused as stale, it ends in the same state, with the worse-ranked
        /// coordinator's epoch-1 events fenced.
        #[test]
        fn a_job_is_a_function_of_its_event_set(order in Just((0usize..7).collect::<Vec<_>>()).prop_shuffle()) {
            let (good, bad) = ranked();
            let events = [
                grant(bad, 1, 1, 0, 32, 0),
                grant(bad, 1, 2, 32, 32, 0),
                done(bad, 1, 0, 32),
                grant(good, 1, 1, 0, 16, 1),
                grant(good, 1, 2, 16, 48, 2),
                done(good, 1, 16, 48),
                grant(bad, 2, 1, 0, 16, 0),
            ];
            let build = |order: &[usize]| {
                let mut j = Job::new(cast().submitted.clone()).unwrap();
                for &i in order {
                    let _ = j.accept(events[i].clone());
                }
                j
            };
            let reference = build(&[0, 1, 2, 3, 4, 5, 6]);
            let shuffled = build(&order);
            prop_assert_eq!(fingerprint(&shuffled), fingerprint(&reference));
            prop_assert_eq!(reference.owner(1), Some(id_of(good)));
            prop_assert_eq!(reference.claim(), Some((2, id_of(bad))));
            // bad's epoch-1 carving is gone; good's done slice and bad's epoch-2 grant remain.
            prop_assert!(!reference.events().iter().any(|e| e.id() == events[0].id()));
            let t = |o, s| TaskSpec { frame_start: 1, ..slice(o, s) };
            prop_assert!(reference.in_cover(&t(16, 48)) && reference.in_cover(&t(0, 16)));
            prop_assert!(reference.task(&t(16, 48)).unwrap().state.is_done());
            prop_assert_eq!(reference.frame_progress(), vec![(1, 48, 64)]);
        }
    }

    #[test]
    fn a_stale_claimer_is_refused_and_the_job_is_unchanged() {
        let (good, bad) = ranked();
        let mut j = Job::new(cast().submitted.clone()).unwrap();
        j.accept(grant(good, 1, 1, 0, 16, 1)).unwrap();
        let before = fingerprint(&j);
        assert!(matches!(
            j.accept(grant(bad, 1, 1, 16, 16, 0)),
            Err(Refused::StaleEpoch { epoch: 1, .. })
        ));
        assert_eq!(fingerprint(&j), before);
    }

    #[test]
    fn a_job_is_done_when_every_frame_is_covered_by_done_tasks_and_merged() {
        let (good, _) = ranked();
        let mut j = Job::new(cast().submitted.clone()).unwrap();
        let merge = TaskSpec::merge(1, 64);
        j.accept(done(good, 1, 0, 16)).unwrap();
        assert_eq!(j.merge_inputs(1), None);
        assert!(!j.in_cover(&merge));
        let applied = j.accept(done(good, 1, 16, 48)).unwrap();
        // The frame is rendered: its merge becomes a task, fed the slices in sample order.
        assert!(applied.tasks.contains(&merge));
        assert!(j.in_cover(&merge));
        assert_eq!(
            j.merge_inputs(1),
            Some(vec![BlobHash([0; 32]), BlobHash([16; 32])])
        );
        assert!(j.holes().next().is_none());
        assert_eq!(j.status(), JobStatus::Active);
        assert_eq!(j.outputs().count(), 0);
        let merged = SignedEvent::sign(
            &cast().keys[good],
            EventBody::Done {
                job: j.id(),
                task: merge,
                result: BlobHash([9; 32]),
                epoch: 1,
            },
        )
        .unwrap();
        let applied = j.accept(merged).unwrap();
        assert!(applied.status_changed);
        assert_eq!(j.status(), JobStatus::Done);
        assert_eq!(
            j.outputs().collect::<Vec<_>>(),
            vec![(merge, BlobHash([9; 32]))]
        );
        // A merge of another size, or of a frame the job lacks, is no task of it.
        assert!(!j.plan().admits(&TaskSpec::merge(1, 63)));
        assert!(!j.plan().admits(&TaskSpec::merge(2, 64)));
        let cancel =
            SignedEvent::sign(&cast().keys[good], EventBody::Cancelled { job: j.id() }).unwrap();
        assert_eq!(j.accept(cancel), Err(Refused::NotSubmitter));
    }
}
