//! The coordinator role: what a board does for the jobs it coordinates.
//!
//! A [`Coordination`] exists while this node owns a job's current epoch. Everything it holds is
//! runtime, on this node's clock, and rebuilt from the job's events at takeover or restart:
//!
//! - **slots**: per task, at most one live primary lease and one live backup lease, each with
//!   an expiry; a lapsed or reported lease is *retired* and never adopted again by itself.
//! - **pool**: tasks in the cover, not done, without a live primary lease, no result
//!   reachable: what the next [`Coordination::decide`] grants (sample-split frames also carve
//!   their holes).
//! - **checks**: tasks with a result whose second holder is awaited (a fetch or replication
//!   asked for, retried every [`FETCH_RETRY_MS`]).
//!
//! [`Coordination::reconcile`] is the heart: given the job's merged record of a task, it puts
//! the task where it belongs (adopting newer leases, with a fresh grace period, so a new
//! coordinator honours what its predecessor granted) and says what to do next (declare it done,
//! fail the job, fetch a result).

use super::{
    Action, Board, DEPARTED_GRACE_MS, FETCH_RETRY_MS, HEARTBEAT_MS, LEASE_MS, MAX_RETRY_AFTER_MS,
    MAX_TASK_FAILURES, MERGE_PREFERENCE_MS, Mesh, NO_WORK_RETRY_MS, Source, revoke_reason,
};
use crate::job::{Job, Plan, Report};
use crate::sizing::{self, SliceInput};
use blendnet_proto::job::{
    EventBody, MAX_EVENT_BYTES, MAX_MERGE_INPUTS, RevokeReason, bounded_reason,
};
use blendnet_proto::{
    BlobHash, JobId, Lease, PeerId, SignedEvent, TaskSpec, VerifiedEvent, WorkRequest, WorkResponse,
};
use std::collections::{BTreeSet, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    lease: Lease,
    expires: u64,
    started: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Slots {
    primary: Option<Slot>,
    backup: Option<Slot>,
}

#[derive(Debug, Clone, Copy)]
struct Check {
    result: BlobHash,
    renderer: PeerId,
    due: u64,
}

/// What reconciling asks the board to do.
#[derive(Debug)]
pub(super) enum Intent {
    /// Declare the task done with this result.
    Done { task: TaskSpec, result: BlobHash },
    /// Fail the job.
    Fail { reason: String },
    /// Hand this action to the shell.
    Do(Box<Action>),
}

/// What to answer a request for work.
#[derive(Debug)]
pub(super) enum Decision {
    /// The asker holds this lease already and has not reported it: send its grant again.
    Resend(VerifiedEvent),
    /// Grant `task` under a new lease.
    New {
        task: TaskSpec,
        backup: bool,
    },
    NoWork,
}

/// The coordinator runtime of one job. See the module documentation.
#[derive(Debug)]
pub(super) struct Coordination {
    pub(super) epoch: u64,
    beat_at: u64,
    beat: u64,
    slots: HashMap<TaskSpec, Slots>,
    by_worker: HashMap<PeerId, BTreeSet<TaskSpec>>,
    /// (expires, task, is backup slot).
    expiry: BTreeSet<(u64, TaskSpec, bool)>,
    retired: HashMap<TaskSpec, BTreeSet<Lease>>,
    pool: BTreeSet<TaskSpec>,
    checks: HashMap<TaskSpec, Check>,
    check_due: BTreeSet<(u64, TaskSpec)>,
    /// Tasks with results none of which can be reached now (renderers gone, no second holder).
    unreachable: BTreeSet<TaskSpec>,
    /// Result under check → its tasks.
    checking: HashMap<BlobHash, BTreeSet<TaskSpec>>,
    /// Result under check → peers known to hold it.
    holders: HashMap<BlobHash, BTreeSet<PeerId>>,
    /// Merges in the pool → when they entered it.
    merge_since: HashMap<TaskSpec, u64>,
}

/// Why a job whose scene denoises cannot finish on this mesh.
const NO_DENOISER: &str = "the scene asks for denoising, and no peer's Blender can denoise \
     (none has OpenImageDenoise; Debian's blender package lacks it): turn denoising off, or add \
     a peer with Blender from blender.org";

/// The rendezvous weight of `peer` as the merger of `frame`: spreads the merges of a job's
/// frames over its peers when they hold equally many slices.
fn merger_rank(job: &JobId, frame: u32, peer: &PeerId) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("blendnet merger rank v1");
    hasher.update(&job.0);
    hasher.update(&frame.to_le_bytes());
    hasher.update(&peer.to_bytes());
    *hasher.finalize().as_bytes()
}

impl Coordination {
    pub(super) fn new(epoch: u64, now: u64) -> Coordination {
        Coordination {
            epoch,
            beat_at: now,
            beat: 0,
            slots: HashMap::new(),
            by_worker: HashMap::new(),
            expiry: BTreeSet::new(),
            retired: HashMap::new(),
            pool: BTreeSet::new(),
            checks: HashMap::new(),
            check_due: BTreeSet::new(),
            unreachable: BTreeSet::new(),
            checking: HashMap::new(),
            holders: HashMap::new(),
            merge_since: HashMap::new(),
        }
    }

    /// Whether a peer other than `renderer` holds `hash`.
    fn second_holder(&self, hash: &BlobHash, renderer: &PeerId) -> bool {
        self.holders
            .get(hash)
            .is_some_and(|h| h.iter().any(|p| p != renderer))
    }

    /// `holder` holds `hash`: the tasks whose check waits for it, if any.
    pub(super) fn held(&mut self, hash: BlobHash, holder: PeerId) -> Vec<TaskSpec> {
        let Some(tasks) = self.checking.get(&hash) else {
            return Vec::new();
        };
        self.holders.entry(hash).or_default().insert(holder);
        tasks.iter().copied().collect()
    }

    /// The tasks whose check is on `hash`.
    pub(super) fn checking(&self, hash: &BlobHash) -> Vec<TaskSpec> {
        self.checking
            .get(hash)
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The earliest timer.
    pub(super) fn deadline(&self) -> Option<u64> {
        [
            Some(self.beat_at),
            self.expiry.first().map(|(t, _, _)| *t),
            self.check_due.first().map(|(t, _)| *t),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn slot(&self, task: &TaskSpec, backup: bool) -> Option<Slot> {
        self.slots
            .get(task)
            .and_then(|s| if backup { s.backup } else { s.primary })
    }

    fn holds(&self, task: &TaskSpec, lease: &Lease) -> bool {
        [false, true]
            .into_iter()
            .any(|b| self.slot(task, b).is_some_and(|s| s.lease == *lease))
    }

    fn set_slot(&mut self, task: TaskSpec, backup: bool, new: Option<Slot>) {
        let slots = self.slots.entry(task).or_default();
        let place = if backup {
            &mut slots.backup
        } else {
            &mut slots.primary
        };
        let old = std::mem::replace(place, new);
        let other = if backup { slots.primary } else { slots.backup };
        let empty = slots.primary.is_none() && slots.backup.is_none();
        if let Some(o) = old {
            self.expiry.remove(&(o.expires, task, backup));
            if other.is_none_or(|s| s.lease.worker != o.lease.worker)
                && let Some(set) = self.by_worker.get_mut(&o.lease.worker)
            {
                set.remove(&task);
                if set.is_empty() {
                    self.by_worker.remove(&o.lease.worker);
                }
            }
        }
        if let Some(n) = new {
            self.expiry.insert((n.expires, task, backup));
            self.by_worker
                .entry(n.lease.worker)
                .or_default()
                .insert(task);
        }
        if empty {
            self.slots.remove(&task);
        }
    }

    fn retire(&mut self, task: TaskSpec, lease: Lease) {
        for backup in [false, true] {
            if self.slot(&task, backup).is_some_and(|s| s.lease == lease) {
                self.set_slot(task, backup, None);
            }
        }
        self.retired.entry(task).or_default().insert(lease);
    }

    fn refresh(&mut self, task: TaskSpec, backup: bool, now: u64) {
        if let Some(s) = self.slot(&task, backup) {
            self.set_slot(
                task,
                backup,
                Some(Slot {
                    expires: now + LEASE_MS,
                    ..s
                }),
            );
        }
    }

    fn drop_check(&mut self, task: &TaskSpec) {
        if let Some(c) = self.checks.remove(task) {
            self.check_due.remove(&(c.due, *task));
            if let Some(tasks) = self.checking.get_mut(&c.result) {
                tasks.remove(task);
                if tasks.is_empty() {
                    self.checking.remove(&c.result);
                    self.holders.remove(&c.result);
                }
            }
        }
    }

    fn set_check(&mut self, task: TaskSpec, check: Check) {
        let keep = self
            .checks
            .get(&task)
            .is_some_and(|c| c.result == check.result);
        if !keep {
            self.drop_check(&task);
        } else if let Some(c) = self.checks.get(&task) {
            self.check_due.remove(&(c.due, task));
        }
        self.checking.entry(check.result).or_default().insert(task);
        self.check_due.insert((check.due, task));
        self.checks.insert(task, check);
    }

    fn clear(&mut self, task: TaskSpec) {
        self.set_slot(task, false, None);
        self.set_slot(task, true, None);
        self.pool.remove(&task);
        self.merge_since.remove(&task);
        self.drop_check(&task);
        self.unreachable.remove(&task);
    }

    /// Puts `task` where its record says it belongs; returns what to do about it.
    pub(super) fn reconcile(
        &mut self,
        job: &Job,
        task: TaskSpec,
        mesh: &Mesh<'_>,
        now: u64,
    ) -> Vec<Intent> {
        let Some(rec) = job.task(&task) else {
            self.clear(task);
            return Vec::new();
        };
        if rec.state.is_done() || !job.in_cover(&task) {
            self.clear(task);
            return Vec::new();
        }
        if job.denoises() && !mesh.has_denoiser() {
            // Said as soon as a first slice shows it, not after every frame is rendered.
            return vec![Intent::Fail {
                reason: NO_DENOISER.into(),
            }];
        }
        // Adopt the newest leases (a predecessor's, or our own fresh grant) with a grace
        // period; retire leases whose worker reported; drop leases whose grant was fenced.
        for backup in [false, true] {
            if let Some(s) = self.slot(&task, backup)
                && rec.grant(&s.lease).is_none()
            {
                self.retire(task, s.lease);
            }
            let newest = if backup { rec.backup() } else { rec.primary() };
            if let Some(lease) = newest {
                let held = self.slot(&task, backup).map(|s| s.lease);
                let retired = self.retired.get(&task).is_some_and(|r| r.contains(&lease));
                if !retired
                    && !rec.reported(&lease)
                    && !self.holds(&task, &lease)
                    && held.is_none_or(|h| h < lease)
                {
                    if let Some(h) = held {
                        self.retire(task, h);
                    }
                    // A worker that is gone gets no more than a departed worker's grace.
                    let grace = if mesh.is_live(&lease.worker) {
                        LEASE_MS
                    } else {
                        DEPARTED_GRACE_MS
                    };
                    self.set_slot(
                        task,
                        backup,
                        Some(Slot {
                            lease,
                            expires: now + grace,
                            started: now,
                        }),
                    );
                }
            }
            if let Some(s) = self.slot(&task, backup)
                && rec.reported(&s.lease)
            {
                self.retire(task, s.lease);
            }
        }
        let reachable: Vec<Report> = rec
            .reports()
            .filter(|r| {
                mesh.is_live(&r.lease.worker) || self.second_holder(&r.result, &r.lease.worker)
            })
            .collect();
        if !reachable.is_empty() {
            self.pool.remove(&task);
            self.unreachable.remove(&task);
            return self.check(job.id(), task, &reachable, mesh, now);
        }
        if !rec.has_results() {
            self.unreachable.remove(&task);
        } else {
            self.unreachable.insert(task);
        }
        self.drop_check(&task);
        let failed = rec.failed_peers();
        if failed > 0 && failed >= MAX_TASK_FAILURES.min(mesh.render_members.max(1)) {
            let last = rec
                .failures()
                .max_by_key(|(_, l, _)| *l)
                .map(|(_, _, r)| r)
                .unwrap_or_default();
            self.pool.remove(&task);
            return vec![Intent::Fail {
                reason: bounded_reason(&format!(
                    "{task} failed on {failed} peers; last error: {last}"
                )),
            }];
        }
        if task.is_merge()
            && let Some(inputs) = job.merge_inputs(task.frame_start)
            && inputs.len() > MAX_MERGE_INPUTS
        {
            self.pool.remove(&task);
            return vec![Intent::Fail {
                reason: format!(
                    "frame {} was cut into {} slices, more than one merge takes ({MAX_MERGE_INPUTS})",
                    task.frame_start,
                    inputs.len()
                ),
            }];
        }
        if self.slot(&task, false).is_none() {
            self.pool.insert(task);
            if task.is_merge() {
                self.merge_since.entry(task).or_insert(now);
            }
        } else {
            self.pool.remove(&task);
        }
        Vec::new()
    }

    /// Makes sure a second peer comes to hold one of `reachable`'s results.
    fn check(
        &mut self,
        job: JobId,
        task: TaskSpec,
        reachable: &[Report],
        mesh: &Mesh<'_>,
        now: u64,
    ) -> Vec<Intent> {
        if let Some(r) = reachable
            .iter()
            .find(|r| self.second_holder(&r.result, &r.lease.worker))
        {
            return vec![Intent::Done {
                task,
                result: r.result,
            }];
        }
        if mesh.live == 1 {
            // A mesh of one: the result is on this node's disk, and there is no one to copy to.
            return vec![Intent::Done {
                task,
                result: reachable[0].result,
            }];
        }
        let current = self.checks.get(&task).copied();
        if let Some(c) = current
            && now < c.due
            && reachable
                .iter()
                .any(|r| r.result == c.result && r.lease.worker == c.renderer)
        {
            return Vec::new();
        }
        // Rotate through the results on each retry.
        let pick = current
            .and_then(|c| reachable.iter().position(|r| r.result == c.result))
            .map_or(0, |i| (i + 1) % reachable.len());
        let r = &reachable[pick];
        self.set_check(
            task,
            Check {
                result: r.result,
                renderer: r.lease.worker,
                due: now + FETCH_RETRY_MS,
            },
        );
        if r.lease.worker != mesh.me {
            return vec![Intent::Do(Box::new(Action::FetchResult {
                job,
                task,
                hash: r.result,
                from: r.lease.worker,
            }))];
        }
        let mut others: Vec<PeerId> = mesh
            .members
            .values()
            .filter(|m| m.live)
            .map(|m| m.peer)
            .collect();
        if others.is_empty() {
            return Vec::new();
        }
        others.sort();
        let spread = usize::from(r.result.0[0]) % others.len();
        vec![Intent::Do(Box::new(Action::ReplicateResult {
            job,
            task,
            hash: r.result,
            to: others[spread],
        }))]
    }

    /// What to grant `from`.
    pub(super) fn decide(
        &mut self,
        job: &Job,
        from: PeerId,
        mesh: &Mesh<'_>,
        now: u64,
    ) -> Decision {
        // A lease the asker holds and has not reported: its grant got lost on the way.
        let held: Vec<TaskSpec> = self
            .by_worker
            .get(&from)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for task in held {
            for backup in [false, true] {
                let Some(s) = self.slot(&task, backup) else {
                    continue;
                };
                if s.lease.worker != from {
                    continue;
                }
                if let Some(rec) = job.task(&task)
                    && !rec.reported(&s.lease)
                    && let Some(ev) = rec.grant(&s.lease)
                {
                    let ev = ev.clone();
                    self.refresh(task, backup, now);
                    return Decision::Resend(ev);
                }
            }
        }
        if let Some(task) = self.pool.iter().find(|t| {
            job.task(t).is_some_and(|r| !r.failed_on(&from))
                && (!t.is_merge() || self.may_merge(job, t, from, mesh, now))
        }) {
            return Decision::New {
                task: *task,
                backup: false,
            };
        }
        if let Some(task) = self.carve(job, mesh, now) {
            return Decision::New {
                task,
                backup: false,
            };
        }
        if let Some(task) = self.pick_backup(job, from, now) {
            return Decision::New { task, backup: true };
        }
        Decision::NoWork
    }

    /// Whether `from` may take the merge `task` now: the merger is elected by rendezvous over the
    /// live render peers, preferring those that hold most of the frame's slices (least to
    /// fetch); anyone who asks gets it once it has waited [`MERGE_PREFERENCE_MS`] (the elected
    /// peer may be busy rendering, or gone).
    fn may_merge(
        &self,
        job: &Job,
        task: &TaskSpec,
        from: PeerId,
        mesh: &Mesh<'_>,
        now: u64,
    ) -> bool {
        let denoises = job.denoises();
        if denoises && !mesh.can_denoise(&from) {
            return false;
        }
        if self
            .merge_since
            .get(task)
            .is_none_or(|since| now >= since + MERGE_PREFERENCE_MS)
        {
            return true;
        }
        let Some(inputs) = job.merge_inputs(task.frame_start) else {
            return false;
        };
        let inputs: BTreeSet<BlobHash> = inputs.into_iter().collect();
        // Slices each peer holds: those it rendered, and those it is known to have fetched.
        let mut held: HashMap<PeerId, BTreeSet<BlobHash>> = HashMap::new();
        let slices = job
            .tasks()
            .iter()
            .filter(|(t, _)| !t.is_merge() && t.frame_start == task.frame_start);
        for report in slices.flat_map(|(_, r)| r.reports()) {
            if inputs.contains(&report.result) {
                held.entry(report.lease.worker)
                    .or_default()
                    .insert(report.result);
            }
        }
        for hash in &inputs {
            for peer in self.holders.get(hash).into_iter().flatten() {
                held.entry(*peer).or_default().insert(*hash);
            }
        }
        let record = job.task(task);
        mesh.live_render_peers()
            .filter(|p| record.is_none_or(|r| !r.failed_on(p)))
            .filter(|p| !denoises || mesh.can_denoise(p))
            .max_by_key(|p| {
                let holds = held.get(p).map_or(0, BTreeSet::len);
                (holds, merger_rank(&job.id(), task.frame_start, p))
            })
            .is_none_or(|elected| elected == from)
    }

    /// A new slice from the first hole of the first frame with one (sample-split jobs).
    fn carve(&self, job: &Job, mesh: &Mesh<'_>, now: u64) -> Option<TaskSpec> {
        if !matches!(job.plan(), Plan::Samples { .. }) {
            return None;
        }
        let (frame, holes) = job.holes().next()?;
        let (start, end) = *holes.first()?;
        let idle = mesh
            .live_renderers
            .saturating_sub(self.by_worker.len())
            .max(1);
        let samples = sizing::slice_samples(SliceInput {
            hole: end - start,
            unplanned: job.unplanned_units(),
            idle_peers: u32::try_from(idle).unwrap_or(u32::MAX),
            live_peers: u32::try_from(mesh.live_renderers).unwrap_or(u32::MAX),
            in_flight: self.in_flight_units(job, now),
            ms_per_sample: job.speed(None).ms_per_unit(),
            target_ms: u64::from(job.spec().target_task_secs) * 1000,
        });
        Some(TaskSpec::render(frame, 1, start, samples))
    }

    /// Frame-samples the running render tasks are expected still to render: what is left of
    /// each at its worker's measured speed (the job's while the worker is unmeasured), or all
    /// of it while nothing is measured.
    fn in_flight_units(&self, job: &Job, now: u64) -> u64 {
        let global = job.speed(None).ms_per_unit();
        self.slots
            .iter()
            .filter(|(task, _)| !task.is_merge())
            .filter(|(task, _)| job.task(task).is_some_and(|r| !r.has_results()))
            .filter_map(|(task, slots)| Some((task.units(), slots.primary?)))
            .map(|(units, p)| {
                let Some(global) = global else {
                    return units;
                };
                let rate = job
                    .speed(Some(&p.lease.worker))
                    .ms_per_unit()
                    .unwrap_or(global);
                let total = sizing::expected_ms(units, rate).max(1);
                let left = total.saturating_sub(now.saturating_sub(p.started));
                (units as f64 * left as f64 / total as f64).ceil() as u64
            })
            .sum()
    }

    /// The task expected to finish last, if a backup on `from` would beat it.
    fn pick_backup(&self, job: &Job, from: PeerId, now: u64) -> Option<TaskSpec> {
        let global = job.speed(None).ms_per_unit()?;
        let rate = |w: &PeerId| job.speed(Some(w)).ms_per_unit().unwrap_or(global);
        let asker = rate(&from);
        let mut best: Option<(u64, TaskSpec)> = None;
        for (task, slots) in &self.slots {
            let (Some(p), None) = (slots.primary, slots.backup) else {
                continue;
            };
            if p.lease.worker == from || task.is_merge() {
                continue;
            }
            let Some(rec) = job.task(task) else {
                continue;
            };
            if rec.has_results() || rec.failed_on(&from) {
                continue;
            }
            let units = task.units();
            let finish = p.started + sizing::expected_ms(units, rate(&p.lease.worker));
            if sizing::worth_a_backup(now, finish, sizing::expected_ms(units, asker)) {
                let end = sizing::expected_end(now, finish);
                if best.is_none_or(|b| (end, *task) > b) {
                    best = Some((end, *task));
                }
            }
        }
        best.map(|(_, t)| t)
    }

    /// A worker renews `lease`.
    pub(super) fn renew(
        &mut self,
        job: &Job,
        task: TaskSpec,
        lease: Lease,
        now: u64,
    ) -> WorkResponse {
        let revoked = |reason| WorkResponse::Revoked { reason };
        let Some(rec) = job.task(&task) else {
            return revoked(RevokeReason::UnknownLease);
        };
        if rec.state.is_done() {
            return revoked(RevokeReason::TaskDone);
        }
        if !job.in_cover(&task) {
            return revoked(RevokeReason::Orphaned);
        }
        if rec.grant(&lease).is_none() {
            return revoked(RevokeReason::UnknownLease);
        }
        let renewed = WorkResponse::Renewed {
            valid_for_ms: LEASE_MS,
        };
        for backup in [false, true] {
            if self.slot(&task, backup).is_some_and(|s| s.lease == lease) {
                self.refresh(task, backup, now);
                return renewed;
            }
        }
        if rec.reported(&lease) {
            return revoked(RevokeReason::Superseded);
        }
        // A lapsed lease whose worker is still at it: take it back if there is room.
        for backup in [false, true] {
            if self.slot(&task, backup).is_none() {
                if let Some(r) = self.retired.get_mut(&task) {
                    r.remove(&lease);
                }
                self.set_slot(
                    task,
                    backup,
                    Some(Slot {
                        lease,
                        expires: now + LEASE_MS,
                        started: now,
                    }),
                );
                if !backup {
                    self.pool.remove(&task);
                }
                return renewed;
            }
        }
        revoked(RevokeReason::Superseded)
    }

    /// Retires the slots whose leases expired by `now`; returns their tasks.
    fn expire(&mut self, now: u64) -> Vec<TaskSpec> {
        let mut tasks = Vec::new();
        while let Some(&(t, task, backup)) = self.expiry.first() {
            if t > now {
                break;
            }
            match self.slot(&task, backup) {
                Some(s) if s.expires == t => self.retire(task, s.lease),
                _ => {
                    self.expiry.remove(&(t, task, backup));
                }
            }
            tasks.push(task);
        }
        tasks
    }

    /// Checks that came due; they are reissued by reconciling their tasks.
    fn due_checks(&mut self, now: u64) -> Vec<TaskSpec> {
        let mut tasks = Vec::new();
        while let Some(&(t, task)) = self.check_due.first() {
            if t > now {
                break;
            }
            self.check_due.remove(&(t, task));
            tasks.push(task);
        }
        tasks
    }

    /// `peer` disconnected: its leases get [`DEPARTED_GRACE_MS`] at most.
    fn departed(&mut self, peer: &PeerId, now: u64) {
        let tasks: Vec<TaskSpec> = self
            .by_worker
            .get(peer)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        for task in tasks {
            for backup in [false, true] {
                if let Some(s) = self.slot(&task, backup)
                    && s.lease.worker == *peer
                    && s.expires > now + DEPARTED_GRACE_MS
                {
                    self.set_slot(
                        task,
                        backup,
                        Some(Slot {
                            expires: now + DEPARTED_GRACE_MS,
                            ..s
                        }),
                    );
                }
            }
        }
    }

    /// Every task this coordination tracks in any way.
    fn tracked(&self) -> BTreeSet<TaskSpec> {
        let mut tasks: BTreeSet<TaskSpec> = self.slots.keys().copied().collect();
        tasks.extend(self.pool.iter().copied());
        tasks.extend(self.checks.keys().copied());
        tasks.extend(self.unreachable.iter().copied());
        tasks
    }

    /// Tasks to look at again after `changed` peers came or went.
    fn touched_by(&self, changed: &[PeerId]) -> BTreeSet<TaskSpec> {
        let mut tasks: BTreeSet<TaskSpec> = self.unreachable.iter().copied().collect();
        for peer in changed {
            if let Some(s) = self.by_worker.get(peer) {
                tasks.extend(s.iter().copied());
            }
        }
        tasks.extend(
            self.checks
                .iter()
                .filter(|(_, c)| changed.contains(&c.renderer))
                .map(|(t, _)| *t),
        );
        tasks
    }

    #[cfg(test)]
    pub(super) fn check_invariants(&self, job: &Job) {
        let mut expiry = BTreeSet::new();
        for (task, slots) in &self.slots {
            assert!(slots.primary.is_some() || slots.backup.is_some());
            let rec = job.task(task).expect("a slot's task is known");
            for (backup, s) in [(false, slots.primary), (true, slots.backup)] {
                let Some(s) = s else { continue };
                assert!(rec.grant(&s.lease).is_some(), "slot holds a granted lease");
                assert!(!rec.reported(&s.lease), "a reported lease is not live");
                assert!(!rec.state.is_done(), "a done task has no live lease");
                assert!(self.by_worker[&s.lease.worker].contains(task));
                expiry.insert((s.expires, *task, backup));
            }
            if let (Some(p), Some(b)) = (slots.primary, slots.backup) {
                assert_ne!(p.lease, b.lease);
            }
        }
        assert_eq!(expiry, self.expiry, "expiry index matches the slots");
        for t in &self.pool {
            assert!(
                self.slot(t, false).is_none(),
                "pooled tasks have no primary"
            );
            assert!(job.in_cover(t));
        }
    }

    /// Live primary and backup leases, for tests.
    #[cfg(test)]
    pub(super) fn live_leases(&self) -> Vec<(TaskSpec, Lease, bool)> {
        let mut out = Vec::new();
        for (t, s) in &self.slots {
            if let Some(p) = s.primary {
                out.push((*t, p.lease, false));
            }
            if let Some(b) = s.backup {
                out.push((*t, b.lease, true));
            }
        }
        out
    }
}

impl Board {
    /// Runs `f` on `job`'s coordination, if this node coordinates it.
    fn with_coord<R>(
        &mut self,
        job: &JobId,
        f: impl FnOnce(&mut Coordination, &Job, &Mesh<'_>) -> R,
    ) -> Option<R> {
        let mesh = Mesh {
            me: self.me,
            me_renders: self.renders,
            me_denoiser: self.offer.denoiser,
            members: &self.members,
            live: self.live,
            live_renderers: self.live_renderers,
            render_members: self.render_members,
        };
        let entry = self.jobs.get_mut(job)?;
        let coord = entry.coord.as_mut()?;
        Some(f(coord, &entry.job, &mesh))
    }

    /// Starts or stops coordinating `job` as its claims and status say.
    pub(super) fn sync_coordination(&mut self, now: u64, job: JobId, out: &mut Vec<Action>) {
        let me = self.me;
        let Some(entry) = self.jobs.get_mut(&job) else {
            return;
        };
        let owned = match entry.job.claim() {
            Some((epoch, owner)) if owner == me && entry.job.status().is_active() => Some(epoch),
            _ => None,
        };
        match (owned, entry.coord.as_ref().map(|c| c.epoch)) {
            (None, None) => return,
            (None, Some(_)) => {
                entry.coord = None;
                return;
            }
            (Some(epoch), Some(current)) if epoch == current => {}
            (Some(epoch), _) => entry.coord = Some(Coordination::new(epoch, now)),
        }
        let mut tasks: BTreeSet<TaskSpec> = entry.job.tasks().keys().copied().collect();
        if let Some(c) = &entry.coord {
            tasks.extend(c.tracked());
        }
        self.reconcile(now, job, tasks, out);
    }

    /// Reconciles `tasks` of `job` and carries out what that asks for.
    pub(super) fn reconcile(
        &mut self,
        now: u64,
        job: JobId,
        tasks: impl IntoIterator<Item = TaskSpec>,
        out: &mut Vec<Action>,
    ) {
        let intents = self
            .with_coord(&job, |c, j, mesh| {
                let mut intents = Vec::new();
                for t in tasks {
                    intents.extend(c.reconcile(j, t, mesh, now));
                }
                intents
            })
            .unwrap_or_default();
        for intent in intents {
            let Some(epoch) = self
                .jobs
                .get(&job)
                .and_then(|e| e.coord.as_ref().map(|c| c.epoch))
            else {
                return;
            };
            match intent {
                Intent::Done { task, result } => {
                    let done = self
                        .jobs
                        .get(&job)
                        .and_then(|e| e.job.task(&task))
                        .is_some_and(|r| r.state.is_done());
                    if !done {
                        self.emit(
                            now,
                            EventBody::Done {
                                job,
                                task,
                                result,
                                epoch,
                            },
                            out,
                        );
                    }
                }
                Intent::Fail { reason } => {
                    self.emit(now, EventBody::JobFailed { job, epoch, reason }, out);
                }
                Intent::Do(action) => out.push(*action),
            }
        }
    }

    /// Heartbeats, lapsed leases and due checks of `job`, if this node coordinates it.
    pub(super) fn coordinator_timers(&mut self, now: u64, job: JobId, out: &mut Vec<Action>) {
        let Some(coord) = self.jobs.get_mut(&job).and_then(|e| e.coord.as_mut()) else {
            return;
        };
        let beat = (coord.beat_at <= now).then(|| {
            coord.beat_at = now + HEARTBEAT_MS;
            coord.beat += 1;
            (coord.epoch, coord.beat)
        });
        let mut tasks = coord.expire(now);
        tasks.extend(coord.due_checks(now));
        if let Some((epoch, beat)) = beat
            && let Some(ev) = self.sign(EventBody::Heartbeat { job, epoch, beat })
        {
            out.push(Action::Publish(ev));
        }
        if !tasks.is_empty() {
            self.reconcile(now, job, tasks, out);
        }
    }

    /// Members came or went: shorten the leases of departed workers, look again at results.
    pub(super) fn coordinators_on_members(
        &mut self,
        now: u64,
        changed: &[PeerId],
        out: &mut Vec<Action>,
    ) {
        let ids: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, e)| e.coord.is_some())
            .map(|(id, _)| *id)
            .collect();
        for job in ids {
            let tasks = self
                .with_coord(&job, |c, _, mesh| {
                    for peer in changed {
                        if !mesh.is_live(peer) {
                            c.departed(peer, now);
                        }
                    }
                    c.touched_by(changed)
                })
                .unwrap_or_default();
            self.reconcile(now, job, tasks, out);
        }
    }

    /// Why this node cannot serve work for `job`, if it cannot.
    fn refusal(&self, job: &JobId) -> Option<WorkResponse> {
        let Some(entry) = self.jobs.get(job) else {
            return Some(WorkResponse::NotCoordinator { hint: None });
        };
        let status = entry.job.status();
        if !status.is_active() {
            return Some(WorkResponse::Revoked {
                reason: revoke_reason(&status),
            });
        }
        if entry.coord.is_none() {
            return Some(WorkResponse::NotCoordinator {
                hint: entry.job.claim().map(|(_, p)| p),
            });
        }
        None
    }

    /// Answers a work request (from a remote worker, or from this node's own worker).
    pub(super) fn serve(
        &mut self,
        now: u64,
        from: PeerId,
        request: WorkRequest,
        out: &mut Vec<Action>,
    ) -> WorkResponse {
        match request {
            WorkRequest::RequestWork { job, offer, report } => {
                if let Some(r) = report
                    && r.author == from
                {
                    let _ = self.held_or_take(now, r, from, out);
                }
                let mismatch = self
                    .jobs
                    .get(&job)
                    .is_some_and(|e| !e.job.spec().blender_matches(offer.blender.as_deref()));
                if mismatch {
                    // The worker should not have asked; it is told to wait as long as allowed.
                    return WorkResponse::NoWork {
                        retry_after_ms: MAX_RETRY_AFTER_MS,
                    };
                }
                self.grant(now, job, from, out)
            }
            WorkRequest::Renew { grant } => {
                let Some((job, task, lease)) = self.grant_proof(now, from, grant, out) else {
                    return WorkResponse::Revoked {
                        reason: RevokeReason::UnknownLease,
                    };
                };
                if let Some(refusal) = self.refusal(&job) {
                    return refusal;
                }
                self.with_coord(&job, |c, j, _| c.renew(j, task, lease, now))
                    .unwrap_or(WorkResponse::NotCoordinator { hint: None })
            }
            WorkRequest::Release { grant } => {
                let Some((job, task, lease)) = self.grant_proof(now, from, grant, out) else {
                    return WorkResponse::Released;
                };
                if let Some(refusal) = self.refusal(&job) {
                    return refusal;
                }
                self.with_coord(&job, |c, _, _| {
                    if c.holds(&task, &lease) {
                        c.retire(task, lease);
                    }
                });
                self.reconcile(now, job, [task], out);
                WorkResponse::Released
            }
        }
    }

    /// The body of an event carried in a work message: decoded directly if this board holds
    /// the event (same id, same bytes), else verified and taken like gossip.
    fn held_or_take(
        &mut self,
        now: u64,
        signed: SignedEvent,
        from: PeerId,
        out: &mut Vec<Action>,
    ) -> Option<EventBody> {
        if self.index.contains(&signed.id()) {
            return blendnet_proto::decode(&signed.body, MAX_EVENT_BYTES).ok();
        }
        self.take_signed(now, signed, Source::Work(from), out)
            .map(|ev| ev.body().clone())
    }

    /// The lease a `Granted` event proves for `from`.
    fn grant_proof(
        &mut self,
        now: u64,
        from: PeerId,
        grant: SignedEvent,
        out: &mut Vec<Action>,
    ) -> Option<(JobId, TaskSpec, Lease)> {
        match self.held_or_take(now, grant, from, out)? {
            EventBody::Granted {
                job, task, lease, ..
            } if lease.worker == from => Some((job, task, lease)),
            _ => None,
        }
    }

    fn grant(&mut self, now: u64, job: JobId, from: PeerId, out: &mut Vec<Action>) -> WorkResponse {
        if let Some(refusal) = self.refusal(&job) {
            return refusal;
        }
        let Some(decision) = self.with_coord(&job, |c, j, mesh| c.decide(j, from, mesh, now))
        else {
            return WorkResponse::NotCoordinator { hint: None };
        };
        let no_work = WorkResponse::NoWork {
            retry_after_ms: NO_WORK_RETRY_MS,
        };
        match decision {
            Decision::Resend(ev) => WorkResponse::Grant {
                grant: ev.signed().clone(),
            },
            Decision::NoWork => no_work,
            Decision::New { task, backup } => {
                let Some(entry) = self.jobs.get(&job) else {
                    return no_work;
                };
                let Some(epoch) = entry.coord.as_ref().map(|c| c.epoch) else {
                    return no_work;
                };
                let seq = entry
                    .job
                    .task(&task)
                    .and_then(|r| r.last_grant())
                    .filter(|(e, _)| *e == epoch)
                    .map_or(1, |(_, s)| s + 1);
                let lease = Lease {
                    epoch,
                    seq,
                    worker: from,
                    backup,
                };
                let inputs = if task.is_merge() {
                    match entry.job.merge_inputs(task.frame_start) {
                        Some(inputs) => inputs,
                        None => return no_work,
                    }
                } else {
                    Vec::new()
                };
                let granted = EventBody::Granted {
                    job,
                    task,
                    lease,
                    inputs,
                };
                match self.emit(now, granted, out) {
                    Some(ev) => WorkResponse::Grant {
                        grant: ev.signed().clone(),
                    },
                    None => no_work,
                }
            }
        }
    }

    pub(super) fn on_result_held(
        &mut self,
        now: u64,
        hash: BlobHash,
        holder: PeerId,
        out: &mut Vec<Action>,
    ) {
        let jobs: Vec<JobId> = self.coordinated();
        for job in jobs {
            let tasks = self
                .with_coord(&job, |c, _, _| c.held(hash, holder))
                .unwrap_or_default();
            if !tasks.is_empty() {
                self.reconcile(now, job, tasks, out);
            }
        }
    }

    pub(super) fn on_fetch_failed(
        &mut self,
        now: u64,
        hash: BlobHash,
        from: PeerId,
        out: &mut Vec<Action>,
    ) {
        // A live renderer is asked again when the check comes due; a gone one makes its task
        // unreachable at once.
        if self.is_live(&from) {
            return;
        }
        let jobs: Vec<JobId> = self.coordinated();
        for job in jobs {
            let tasks = self
                .with_coord(&job, |c, _, _| c.checking(&hash))
                .unwrap_or_default();
            self.reconcile(now, job, tasks, out);
        }
    }

    /// The jobs this node coordinates.
    fn coordinated(&self) -> Vec<JobId> {
        self.jobs
            .iter()
            .filter(|(_, e)| e.coord.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Internal state, for the messages of failing tests.
    #[cfg(test)]
    pub(super) fn debug_state(&self) -> String {
        let mut out = format!("{} worker: {:?}\n", self.me, self.worker);
        for (id, e) in &self.jobs {
            out += &format!(
                "  job {} known_since={} last_heard={} k={:?} coord={:?}\n",
                id.short(),
                e.known_since,
                e.last_heard,
                e.takeover_k,
                e.coord
            );
        }
        out
    }

    /// Checks every coordination's internal invariants (tests only).
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        for e in self.jobs.values() {
            if let Some(c) = &e.coord {
                c.check_invariants(&e.job);
                assert_eq!(e.job.claim().map(|(ep, _)| ep), Some(c.epoch));
            }
        }
    }

    /// The live leases of the jobs this node coordinates, with their epoch (tests only).
    #[cfg(test)]
    pub(super) fn live_leases(&self) -> Vec<(JobId, u64, TaskSpec, Lease, bool)> {
        let mut out = Vec::new();
        for (id, e) in &self.jobs {
            if let Some(c) = &e.coord {
                for (t, l, b) in c.live_leases() {
                    out.push((*id, c.epoch, t, l, b));
                }
            }
        }
        out
    }
}
