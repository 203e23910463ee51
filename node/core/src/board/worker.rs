//! The worker role: asking coordinators for work, rendering one task at a time, renewing its
//! lease, reporting, and stopping when told.
//!
//! An idle worker first resumes a lease it holds and has not reported (after a restart, or a
//! grant that reached it by gossip while its response got lost), then asks the coordinator of
//! the oldest active job that has not told it to wait. Its latest report for a job rides along
//! with the next request, so the coordinator learns of it even when gossip is late. While it
//! renders, it renews every [`RENEW_EVERY_MS`] with the `Granted` event as proof; it stops when
//! the coordinator revokes the lease, or when the events it receives say the task is done,
//! orphaned, or its job finished.

use super::{
    Action, Board, Entry, MAX_RETRY_AFTER_MS, NO_WORK_RETRY_MS, NOT_COORDINATOR_RETRY_MS,
    RENEW_EVERY_MS, StopReason, WORK_REPLY_TIMEOUT_MS,
};
use crate::job::JobStatus;
use blendnet_proto::job::{EventBody, MAX_EVENT_BYTES};
use blendnet_proto::{
    JobId, Lease, PeerId, SignedEvent, TaskSpec, VerifiedEvent, WorkRequest, WorkResponse,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

#[derive(Debug, Clone)]
struct Running {
    job: JobId,
    task: TaskSpec,
    lease: Lease,
    /// The `Granted` event: proof of the lease when renewing.
    grant: SignedEvent,
    renew_at: u64,
}

#[derive(Debug, Clone, Copy)]
struct Asking {
    job: JobId,
    since: u64,
    /// A task of the job was done since the request left: a "no work" answer may predate it.
    stale: bool,
}

/// The worker runtime of a board.
#[derive(Debug, Default)]
pub(super) struct Worker {
    running: Option<Running>,
    asking: Option<Asking>,
    /// When the renewal in flight was sent.
    renewing: Option<u64>,
    retry_at: HashMap<JobId, u64>,
    /// A coordinator named by a peer that was asked and was not it.
    hints: HashMap<JobId, PeerId>,
    /// The latest `Rendered` or `TaskFailed` of each job, until a coordinator answers a request
    /// that carried it.
    reports: HashMap<JobId, VerifiedEvent>,
    /// Leases granted to this node that it has not finished.
    leases: BTreeSet<(JobId, TaskSpec, Lease)>,
    /// Leases this node finished, failed, stopped or handed back: never started again.
    finished: HashSet<(JobId, TaskSpec, Lease)>,
    draining: bool,
}

impl Worker {
    pub(super) fn running(&self) -> Option<(JobId, TaskSpec, Lease)> {
        self.running.as_ref().map(|r| (r.job, r.task, r.lease))
    }

    pub(super) fn note_lease(&mut self, job: JobId, task: TaskSpec, lease: Lease) {
        if !self.finished.contains(&(job, task, lease)) {
            self.leases.insert((job, task, lease));
        }
    }

    pub(super) fn forget_hint(&mut self, job: &JobId) {
        self.hints.remove(job);
    }

    pub(super) fn finished(&mut self, job: JobId, task: TaskSpec, lease: Lease) {
        if self
            .running
            .as_ref()
            .is_some_and(|r| (r.job, r.task, r.lease) == (job, task, lease))
        {
            self.running = None;
            self.renewing = None;
        }
        self.leases.remove(&(job, task, lease));
        self.finished.insert((job, task, lease));
    }

    pub(super) fn report(&mut self, job: JobId, ev: VerifiedEvent) {
        self.reports.insert(job, ev);
    }

    fn forget_job(&mut self, job: &JobId) {
        self.retry_at.remove(job);
        self.hints.remove(job);
        self.reports.remove(job);
        self.leases.retain(|(j, _, _)| j != job);
        self.finished.retain(|(j, _, _)| j != job);
    }

    /// After a restart: the latest own report of each active job whose task is not done.
    pub(super) fn restore_reports(&mut self, me: &PeerId, jobs: &BTreeMap<JobId, Entry>) {
        for (id, entry) in jobs {
            if !entry.job.status().is_active() {
                continue;
            }
            for ev in entry.job.events().iter().rev() {
                if ev.author() != *me {
                    continue;
                }
                if let EventBody::Rendered { task, lease, .. }
                | EventBody::TaskFailed { task, lease, .. } = ev.body()
                {
                    self.finished.insert((*id, *task, *lease));
                    if !self.reports.contains_key(id)
                        && entry.job.task(task).is_some_and(|r| !r.state.is_done())
                    {
                        self.reports.insert(*id, ev.clone());
                    }
                }
            }
        }
    }

    /// The worker's next timer.
    pub(super) fn deadline(&self, active: &BTreeSet<(u64, JobId)>) -> Option<u64> {
        let mut times: Vec<u64> = Vec::new();
        if let Some(a) = self.asking {
            times.push(a.since + WORK_REPLY_TIMEOUT_MS);
        }
        if let Some(t) = self.renewing {
            times.push(t + WORK_REPLY_TIMEOUT_MS);
        }
        if let Some(r) = &self.running {
            times.push(r.renew_at);
        }
        if self.running.is_none() && self.asking.is_none() && !self.draining {
            times.extend(active.iter().filter_map(|(_, j)| self.retry_at.get(j)));
        }
        times.into_iter().min()
    }
}

impl Board {
    fn coordinator_of(&self, job: &JobId) -> Option<PeerId> {
        self.worker
            .hints
            .get(job)
            .copied()
            .or_else(|| self.jobs.get(job)?.job.claim().map(|(_, p)| p))
    }

    /// Sends a work request; to this node's own coordinator role directly.
    fn send_work(&mut self, now: u64, to: PeerId, request: WorkRequest, out: &mut Vec<Action>) {
        if to == self.me {
            let response = self.serve(now, to, request.clone(), out);
            self.on_reply(now, to, request, Some(response), out);
        } else {
            out.push(Action::SendWork { to, request });
        }
    }

    /// Renewals, reply timeouts, and asking for work when idle.
    pub(super) fn worker_drive(&mut self, now: u64, out: &mut Vec<Action>) {
        if !self.renders {
            return;
        }
        if let Some(a) = self.worker.asking
            && now >= a.since + WORK_REPLY_TIMEOUT_MS
        {
            self.worker.asking = None;
            self.worker.retry_at.insert(a.job, now + NO_WORK_RETRY_MS);
            self.worker.hints.remove(&a.job);
        }
        if self
            .worker
            .renewing
            .is_some_and(|t| now >= t + WORK_REPLY_TIMEOUT_MS)
        {
            self.worker.renewing = None;
        }
        if let Some(r) = self.worker.running.as_mut()
            && now >= r.renew_at
            && self.worker.renewing.is_none()
        {
            r.renew_at = now + RENEW_EVERY_MS;
            let (job, grant) = (r.job, r.grant.clone());
            if let Some(to) = self.coordinator_of(&job) {
                self.worker.renewing = Some(now);
                self.send_work(now, to, WorkRequest::Renew { grant }, out);
            }
        }
        if self.worker.draining {
            return;
        }
        if self.worker.running.is_none()
            && self.worker.asking.is_none()
            && let Some(grant) = self.resumable()
        {
            // Renew at once: the coordinator may have shortened the lease while we were away.
            self.start(&grant, now, out);
        }
        let jobs: Vec<JobId> = self.active.iter().map(|(_, j)| *j).collect();
        for job in jobs {
            if self.worker.running.is_some() || self.worker.asking.is_some() {
                return;
            }
            if self.worker.retry_at.get(&job).is_some_and(|t| *t > now) {
                continue;
            }
            // A .blend is not portable across Blender versions: leave the job to peers whose
            // Blender matches.
            let blender = self.offer.blender.as_deref();
            if self
                .jobs
                .get(&job)
                .is_some_and(|e| !e.job.spec().blender_matches(blender))
            {
                continue;
            }
            let Some(to) = self.coordinator_of(&job) else {
                // No timer: the claim that names a coordinator will wake us.
                self.worker.retry_at.remove(&job);
                continue;
            };
            let report = self.worker.reports.get(&job).map(|e| e.signed().clone());
            self.worker.asking = Some(Asking {
                job,
                since: now,
                stale: false,
            });
            let request = WorkRequest::RequestWork {
                job,
                offer: self.offer.clone(),
                report,
            };
            self.send_work(now, to, request, out);
        }
    }

    /// A lease granted to this node, still current, not reported: its `Granted` event.
    fn resumable(&mut self) -> Option<VerifiedEvent> {
        let mut stale = Vec::new();
        let mut found = None;
        for key @ (job, task, lease) in &self.worker.leases {
            let rec = self
                .jobs
                .get(job)
                .filter(|e| e.job.status().is_active() && e.job.in_cover(task))
                .and_then(|e| e.job.task(task));
            match rec {
                Some(r)
                    if !r.state.is_done()
                        && !r.reported(lease)
                        && (r.primary() == Some(*lease) || r.backup() == Some(*lease)) =>
                {
                    found = r.grant(lease).cloned();
                    if found.is_some() {
                        break;
                    }
                }
                _ => stale.push(*key),
            }
        }
        for key in stale {
            self.worker.leases.remove(&key);
        }
        found
    }

    fn start(&mut self, grant: &VerifiedEvent, renew_at: u64, out: &mut Vec<Action>) {
        let EventBody::Granted {
            job,
            task,
            lease,
            ref inputs,
        } = *grant.body()
        else {
            return;
        };
        let Some(spec) = self.jobs.get(&job).map(|e| e.job.spec().clone()) else {
            return;
        };
        self.worker.leases.remove(&(job, task, lease));
        self.worker.retry_at.remove(&job);
        self.worker.running = Some(Running {
            job,
            task,
            lease,
            grant: grant.signed().clone(),
            renew_at,
        });
        out.push(Action::StartTask {
            job,
            spec,
            task,
            lease,
            inputs: inputs.clone(),
        });
    }

    fn stop(&mut self, reason: StopReason, out: &mut Vec<Action>) -> Option<SignedEvent> {
        let r = self.worker.running.take()?;
        self.worker.renewing = None;
        self.worker.finished.insert((r.job, r.task, r.lease));
        self.worker.leases.remove(&(r.job, r.task, r.lease));
        out.push(Action::StopTask {
            job: r.job,
            task: r.task,
            reason,
        });
        Some(r.grant)
    }

    /// After events of `job` changed `tasks`: stop what is no longer wanted.
    pub(super) fn worker_check(
        &mut self,
        _now: u64,
        job: JobId,
        tasks: &BTreeSet<TaskSpec>,
        out: &mut Vec<Action>,
    ) {
        let Some(entry) = self.jobs.get(&job) else {
            return;
        };
        let status = entry.job.status();
        let some_done = tasks
            .iter()
            .any(|t| entry.job.task(t).is_some_and(|r| r.state.is_done()));
        let running = self.worker.running.as_ref().filter(|r| r.job == job);
        let reason = match (&status, running) {
            (JobStatus::Active, Some(r)) if tasks.contains(&r.task) => {
                let rec = entry.job.task(&r.task);
                if rec.is_some_and(|r| r.state.is_done()) {
                    Some(StopReason::TaskDone)
                } else if !entry.job.in_cover(&r.task) {
                    Some(StopReason::Orphaned)
                } else {
                    None
                }
            }
            (JobStatus::Active, _) => None,
            (JobStatus::Done, r) => r.map(|_| StopReason::JobDone),
            (JobStatus::Cancelled, r) => r.map(|_| StopReason::JobCancelled),
            (JobStatus::Failed { .. }, r) => r.map(|_| StopReason::JobFailed),
        };
        if let Some(reason) = reason {
            self.stop(reason, out);
        }
        if !status.is_active() {
            self.worker.forget_job(&job);
        } else if some_done {
            // A task done may open work (the last slice of a frame makes its merge): an idle
            // worker asks now rather than at its next retry, up to NO_WORK_RETRY_MS later, and
            // one whose request is on its way asks again if the answer is "no work".
            self.worker.retry_at.remove(&job);
            if let Some(a) = self.worker.asking.as_mut().filter(|a| a.job == job) {
                a.stale = true;
            }
        }
    }

    /// The body of an event carried in a reply, taken like gossip if new.
    fn reply_event(
        &mut self,
        now: u64,
        from: PeerId,
        signed: SignedEvent,
        out: &mut Vec<Action>,
    ) -> Option<VerifiedEvent> {
        if self.index.contains(&signed.id()) {
            // Held already: find the stored copy through its body.
            let body: EventBody = blendnet_proto::decode(&signed.body, MAX_EVENT_BYTES).ok()?;
            let EventBody::Granted {
                job, task, lease, ..
            } = body
            else {
                return None;
            };
            return self.jobs.get(&job)?.job.task(&task)?.grant(&lease).cloned();
        }
        self.take_signed(now, signed, super::Source::Work(from), out)
    }

    pub(super) fn on_reply(
        &mut self,
        now: u64,
        from: PeerId,
        request: WorkRequest,
        response: Option<WorkResponse>,
        out: &mut Vec<Action>,
    ) {
        match request {
            WorkRequest::RequestWork { job, .. } => {
                let stale = match self.worker.asking {
                    Some(a) if a.job == job => {
                        self.worker.asking = None;
                        a.stale
                    }
                    _ => false,
                };
                if response.is_some() {
                    self.worker.reports.remove(&job);
                }
                match response {
                    None => {
                        self.worker.retry_at.insert(job, now + NO_WORK_RETRY_MS);
                        self.worker.hints.remove(&job);
                    }
                    Some(WorkResponse::Grant { grant }) => {
                        let Some(ev) = self.reply_event(now, from, grant.clone(), out) else {
                            self.worker.retry_at.insert(job, now + NO_WORK_RETRY_MS);
                            return;
                        };
                        let EventBody::Granted {
                            job: j,
                            task,
                            lease,
                            ..
                        } = *ev.body()
                        else {
                            return;
                        };
                        if j != job || lease.worker != self.me {
                            return;
                        }
                        let busy = self.worker.running.is_some() || self.worker.draining;
                        if busy || self.worker.finished.contains(&(job, task, lease)) {
                            // A lease we cannot or will not render (we stopped it, or are busy):
                            // hand it back, or the coordinator keeps it alive for us.
                            self.worker.finished.insert((job, task, lease));
                            self.send_work(now, from, WorkRequest::Release { grant }, out);
                            self.worker
                                .retry_at
                                .insert(job, now + NOT_COORDINATOR_RETRY_MS);
                            return;
                        }
                        self.start(&ev, now + RENEW_EVERY_MS, out);
                    }
                    Some(WorkResponse::NoWork { .. }) if stale => {
                        // Asked before the news of a task done: ask again now.
                        self.worker.retry_at.remove(&job);
                    }
                    Some(WorkResponse::NoWork { retry_after_ms }) => {
                        let wait = retry_after_ms.clamp(1, MAX_RETRY_AFTER_MS);
                        self.worker.retry_at.insert(job, now + wait);
                    }
                    Some(WorkResponse::Revoked { .. }) => {
                        // The coordinator says the job is over; we have not seen why yet.
                        self.worker.retry_at.insert(job, now + MAX_RETRY_AFTER_MS);
                        out.push(Action::SyncJob { job, with: from });
                    }
                    Some(WorkResponse::NotCoordinator { hint }) => {
                        self.redirect(job, from, hint, out);
                        self.worker
                            .retry_at
                            .insert(job, now + NOT_COORDINATOR_RETRY_MS);
                    }
                    Some(WorkResponse::Renewed { .. } | WorkResponse::Released) => {
                        self.worker.retry_at.insert(job, now + NO_WORK_RETRY_MS);
                    }
                }
            }
            WorkRequest::Renew { grant } => {
                self.worker.renewing = None;
                let ours = self
                    .worker
                    .running
                    .as_ref()
                    .is_some_and(|r| r.grant.id() == grant.id());
                if !ours {
                    return;
                }
                match response {
                    Some(WorkResponse::Revoked { reason }) => {
                        self.stop(StopReason::Revoked(reason), out);
                    }
                    Some(WorkResponse::NotCoordinator { hint }) => {
                        let job = self.worker.running.as_ref().map(|r| r.job);
                        if let Some(job) = job {
                            self.redirect(job, from, hint, out);
                        }
                        if let Some(r) = self.worker.running.as_mut() {
                            r.renew_at = now + NOT_COORDINATOR_RETRY_MS;
                        }
                    }
                    _ => {}
                }
            }
            WorkRequest::Release { .. } => {}
        }
    }

    fn redirect(&mut self, job: JobId, from: PeerId, hint: Option<PeerId>, out: &mut Vec<Action>) {
        match hint {
            Some(h) if h != from => {
                self.worker.hints.insert(job, h);
                out.push(Action::SyncJob { job, with: h });
            }
            _ => {
                self.worker.hints.remove(&job);
            }
        }
    }

    pub(super) fn on_drain(&mut self, now: u64, out: &mut Vec<Action>) {
        self.worker.draining = true;
        let job = self.worker.running.as_ref().map(|r| r.job);
        if let (Some(job), Some(grant)) = (job, self.stop(StopReason::Drained, out))
            && let Some(to) = self.coordinator_of(&job)
        {
            self.send_work(now, to, WorkRequest::Release { grant }, out);
        }
    }
}
