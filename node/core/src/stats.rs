//! A job's statistics: where the time and the money went, summed from the stats every worker
//! signs into its `Rendered` events ([`TaskStats`]), so every peer holding a job's events
//! computes the same figures; plus the job's wall time, which only a peer that watched the job
//! can measure ([`JobClock`]).
//!
//! - **Phases.** Each report's phases (wait, fetch, Blender start, render, merge, upload)
//!   summed over every report of every task. Work done twice (a backup lease, a lease that
//!   lapsed and was rendered again) counts twice: it took the time and cost the money.
//! - **Per peer.** For each worker that reported: its tasks, the frame-samples it rendered,
//!   its render time, and so its throughput on this scene (frame-samples per second of render
//!   time), with the price it reported.
//! - **Cost.** Σ over reports of `wall_ms × price per hour / 3.6e6`, with each report's own
//!   price (a worker states its price in the report). Workers whose reports carry no price are
//!   listed in `unpriced_peers`, and their time is not in `cost`; `cost` is `None` when no
//!   report carries a price.
//! - **Wall time.** Events carry no timestamps, so the whole job's time comes from this peer's
//!   own clock: when it saw the job begin and end, kept with the job by the shell. It is given
//!   only when this peer saw both as they happened (see [`JobClock`]).
//!
//! Failed attempts (`TaskFailed`) carry no stats: their time is not in the sums; they are
//! counted in `failures`.

use crate::job::Job;
use blendnet_proto::{BlobHash, PeerId, TaskStats};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Milliseconds in an hour: a price per hour times milliseconds, divided by this, is a cost.
const MS_PER_HOUR: u128 = 3_600_000;
/// Millionths of a dollar in a dollar.
const MICROS_PER_DOLLAR: f64 = 1e6;

/// When this peer saw a job begin and end, on its own clock (Unix milliseconds). The shell
/// records it and keeps it with the job across restarts.
///
/// Each end is recorded only when this peer saw it as it happened: the job submitted here or
/// its submission gossiped to this peer live; its outcome reached by an event that arrived
/// live. A peer that learned of a job (or of its end) later, by anti-entropy or after a
/// restart, leaves that end `None` rather than give a time that is not the job's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobClock {
    /// When the job began (its submission here, or its arrival by gossip).
    pub started_at_ms: Option<u64>,
    /// When the job reached its outcome (done, failed or cancelled).
    pub finished_at_ms: Option<u64>,
}

impl JobClock {
    /// The job's wall time, when both ends were seen as they happened.
    pub fn wall_ms(&self) -> Option<u64> {
        let (start, end) = (self.started_at_ms?, self.finished_at_ms?);
        end.checked_sub(start)
    }
}

/// A task's phases summed over reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Phases {
    pub wait_ms: u64,
    pub fetch_ms: u64,
    pub blender_start_ms: u64,
    pub render_ms: u64,
    pub upload_ms: u64,
    pub merge_ms: u64,
}

impl Phases {
    fn add(&mut self, s: &TaskStats) {
        self.wait_ms = self.wait_ms.saturating_add(s.wait_ms);
        self.fetch_ms = self.fetch_ms.saturating_add(s.fetch_ms);
        self.blender_start_ms = self.blender_start_ms.saturating_add(s.blender_start_ms);
        self.render_ms = self.render_ms.saturating_add(s.render_ms);
        self.upload_ms = self.upload_ms.saturating_add(s.upload_ms);
        self.merge_ms = self.merge_ms.saturating_add(s.merge_ms);
    }
}

/// One worker's part in a job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerStats {
    pub peer: PeerId,
    /// Reports it made (render tasks and merges).
    pub tasks: u64,
    /// Merges among them.
    pub merges: u64,
    /// Frame-samples it rendered.
    pub units: u64,
    /// Its render time.
    pub render_ms: u64,
    /// Its time on the job's tasks, every phase included.
    pub wall_ms: u64,
    /// Frame-samples per second of render time on this scene; `None` before it rendered any.
    pub samples_per_second: Option<f64>,
    /// The price per hour (US dollars) of its latest report that states one.
    pub price_per_hour: Option<f64>,
    /// What its reports with a price cost (US dollars); `None` when none states one.
    pub cost: Option<f64>,
}

/// Where a job's time and money went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobStats {
    /// The whole job's time, from its start to its outcome, as this peer saw them
    /// ([`JobClock`]); `None` while it runs or when this peer did not see both ends.
    pub wall_ms: Option<u64>,
    /// When this peer saw the job begin and end (Unix milliseconds, its clock).
    pub started_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
    /// Render time over every report: the sum over tasks of their render time.
    pub render_ms: u64,
    /// Each phase over every report.
    pub phases: Phases,
    /// The workers' time over every report (the sum of each report's `wall_ms`).
    pub task_wall_ms: u64,
    /// Reports counted.
    pub reports: u64,
    /// Grants beyond each task's first (lapsed leases granted again, backups).
    pub retries: u64,
    /// Failed attempts (one per task and failing worker).
    pub failures: u64,
    /// Each worker that reported, by peer id.
    pub peers: Vec<PeerStats>,
    /// What the reports with a price cost (US dollars); `None` when none states a price.
    pub cost: Option<f64>,
    /// Workers with a report that states no price: their time is not in `cost`.
    pub unpriced_peers: Vec<PeerId>,
}

/// One report of a task, for the job view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportView {
    pub worker: PeerId,
    pub result: BlobHash,
    /// Whether it was rendered under a backup lease.
    pub backup: bool,
    pub stats: TaskStats,
}

#[derive(Default)]
struct PeerSum {
    tasks: u64,
    merges: u64,
    units: u64,
    render_ms: u64,
    wall_ms: u64,
    /// Σ wall_ms × price (micro-dollars per hour) over priced reports.
    priced: Option<u128>,
    /// The price of the latest priced report: (lease, price).
    price: Option<((u64, u64), u64)>,
    unpriced: bool,
}

impl JobStats {
    /// The statistics of `job` as its events tell them, with this peer's `clock` of it.
    pub fn of(job: &Job, clock: JobClock) -> JobStats {
        let mut phases = Phases::default();
        let (mut render_ms, mut task_wall_ms, mut reports) = (0u64, 0u64, 0u64);
        let (mut retries, mut failures) = (0u64, 0u64);
        let mut peers: BTreeMap<PeerId, PeerSum> = BTreeMap::new();
        for (task, record) in job.tasks() {
            retries += (record.grants().count() as u64).saturating_sub(1);
            failures += record.failed_peers() as u64;
            for report in record.reports() {
                let s = report.stats;
                reports += 1;
                phases.add(&s);
                render_ms = render_ms.saturating_add(s.render_ms);
                task_wall_ms = task_wall_ms.saturating_add(s.wall_ms);
                let peer = peers.entry(report.lease.worker).or_default();
                peer.tasks += 1;
                if task.is_merge() {
                    peer.merges += 1;
                } else {
                    peer.units = peer
                        .units
                        .saturating_add(u64::from(task.frame_count) * u64::from(s.samples));
                }
                peer.render_ms = peer.render_ms.saturating_add(s.render_ms);
                peer.wall_ms = peer.wall_ms.saturating_add(s.wall_ms);
                match s.price_per_hour_micros {
                    Some(price) => {
                        let cost = u128::from(s.wall_ms) * u128::from(price);
                        peer.priced = Some(peer.priced.unwrap_or(0).saturating_add(cost));
                        let at = (report.lease.epoch, report.lease.seq);
                        if peer.price.is_none_or(|(latest, _)| at >= latest) {
                            peer.price = Some((at, price));
                        }
                    }
                    None => peer.unpriced = true,
                }
            }
        }
        let dollars = |micro_dollar_ms: u128| {
            (micro_dollar_ms / MS_PER_HOUR) as f64 / MICROS_PER_DOLLAR
                + (micro_dollar_ms % MS_PER_HOUR) as f64 / MS_PER_HOUR as f64 / MICROS_PER_DOLLAR
        };
        let total: Option<u128> = peers
            .values()
            .filter_map(|p| p.priced)
            .reduce(u128::saturating_add);
        JobStats {
            wall_ms: clock.wall_ms(),
            started_at_ms: clock.started_at_ms,
            finished_at_ms: clock.finished_at_ms,
            render_ms,
            phases,
            task_wall_ms,
            reports,
            retries,
            failures,
            unpriced_peers: peers
                .iter()
                .filter(|(_, p)| p.unpriced)
                .map(|(peer, _)| *peer)
                .collect(),
            peers: peers
                .into_iter()
                .map(|(peer, p)| PeerStats {
                    peer,
                    tasks: p.tasks,
                    merges: p.merges,
                    units: p.units,
                    render_ms: p.render_ms,
                    wall_ms: p.wall_ms,
                    samples_per_second: (p.units > 0 && p.render_ms > 0)
                        .then(|| p.units as f64 * 1000.0 / p.render_ms as f64),
                    price_per_hour: p.price.map(|(_, micros)| micros as f64 / MICROS_PER_DOLLAR),
                    cost: p.priced.map(dollars),
                })
                .collect(),
            cost: total.map(dollars),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blendnet_proto::job::EventBody;
    use blendnet_proto::{JobId, JobSpec, Lease, SignedEvent, TaskSpec, VerifiedEvent};
    use libp2p_identity::Keypair;

    struct Mesh {
        submitter: Keypair,
        job: Job,
    }

    impl Mesh {
        fn new(spec: JobSpec) -> Mesh {
            let submitter = Keypair::generate_ed25519();
            let ev = SignedEvent::sign(&submitter, EventBody::Submitted { spec }).unwrap();
            let job = Job::new(ev).unwrap();
            Mesh { submitter, job }
        }

        fn id(&self) -> JobId {
            self.job.id()
        }

        fn take(&mut self, key: &Keypair, body: EventBody) {
            let ev: VerifiedEvent = SignedEvent::sign(key, body).unwrap();
            self.job.accept(ev).unwrap();
        }

        fn claim(&mut self) {
            let key = self.submitter.clone();
            let job = self.id();
            self.take(&key, EventBody::Coordinating { job, epoch: 1 });
        }

        fn grant(&mut self, task: TaskSpec, seq: u64, worker: &Keypair) -> Lease {
            let lease = Lease {
                epoch: 1,
                seq,
                worker: worker.public().to_peer_id(),
                backup: false,
            };
            let key = self.submitter.clone();
            let job = self.id();
            self.take(
                &key,
                EventBody::Granted {
                    job,
                    task,
                    lease,
                    inputs: vec![],
                },
            );
            lease
        }

        fn rendered(&mut self, task: TaskSpec, lease: Lease, worker: &Keypair, stats: TaskStats) {
            let job = self.id();
            self.take(
                worker,
                EventBody::Rendered {
                    job,
                    task,
                    lease,
                    result: BlobHash::of(&lease.seq.to_le_bytes()),
                    stats,
                },
            );
        }

        fn failed(&mut self, task: TaskSpec, lease: Lease, worker: &Keypair) {
            let job = self.id();
            self.take(
                worker,
                EventBody::TaskFailed {
                    job,
                    task,
                    lease,
                    reason: "Blender crashed".into(),
                },
            );
        }
    }

    fn spec(frames: Vec<u32>, samples: u32) -> JobSpec {
        let mut spec = JobSpec::new(
            "stats",
            BlobHash::of(b"scene"),
            "scene.blend",
            frames,
            samples,
            blendnet_proto::Engine::Cycles,
            1_700_000_000,
        );
        spec.split = blendnet_proto::Split::Frames;
        spec
    }

    fn stats(render_ms: u64, samples: u32, price: Option<u64>) -> TaskStats {
        TaskStats {
            wait_ms: 5,
            fetch_ms: 100,
            blender_start_ms: 1_000,
            render_ms,
            upload_ms: 20,
            samples,
            wall_ms: 5 + 100 + 1_000 + render_ms + 20,
            price_per_hour_micros: price,
            ..TaskStats::default()
        }
    }

    #[test]
    fn sums_phases_over_every_report_and_counts_a_retried_task() {
        let mut m = Mesh::new(spec(vec![1, 2], 16));
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (f1, f2) = (TaskSpec::render(1, 1, 0, 16), TaskSpec::render(2, 1, 0, 16));
        m.claim();
        // Frame 1 fails on a, is granted again to b, which renders it.
        let first = m.grant(f1, 1, &a);
        m.failed(f1, first, &a);
        let second = m.grant(f1, 2, &b);
        m.rendered(f1, second, &b, stats(4_000, 16, None));
        // Frame 2 on a, first time.
        let lease = m.grant(f2, 3, &a);
        m.rendered(f2, lease, &a, stats(2_000, 16, None));

        let s = JobStats::of(&m.job, JobClock::default());
        assert_eq!(s.reports, 2);
        assert_eq!(s.retries, 1, "frame 1 was granted twice");
        assert_eq!(s.failures, 1);
        assert_eq!(s.render_ms, 6_000, "the sum over tasks");
        assert_eq!(s.phases.render_ms, 6_000);
        assert_eq!(s.phases.fetch_ms, 200);
        assert_eq!(s.phases.blender_start_ms, 2_000);
        assert_eq!(s.phases.wait_ms, 10);
        assert_eq!(s.phases.upload_ms, 40);
        assert_eq!(s.phases.merge_ms, 0);
        assert_eq!(s.task_wall_ms, 6_000 + 2 * 1_125);
        assert_eq!(s.wall_ms, None, "this peer saw no ends");
        // Throughput per worker: 16 frame-samples in 4 s on b, in 2 s on a.
        let by = |k: &Keypair| {
            s.peers
                .iter()
                .find(|p| p.peer == k.public().to_peer_id())
                .unwrap()
                .clone()
        };
        assert_eq!(
            (by(&a).tasks, by(&a).units, by(&a).render_ms),
            (1, 16, 2_000)
        );
        assert_eq!(by(&a).samples_per_second, Some(8.0));
        assert_eq!(by(&b).samples_per_second, Some(4.0));
        // Nobody priced: no cost, and both named.
        assert_eq!(s.cost, None);
        assert_eq!(s.unpriced_peers.len(), 2);
    }

    #[test]
    fn cost_sums_the_priced_reports_and_names_the_unpriced_peer() {
        let mut m = Mesh::new(spec(vec![1, 2, 3], 8));
        let (cloud, desk) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        m.claim();
        // $3.60 an hour: 0.1 cent a second. Two tasks of 10 s and 20 s of wall time.
        let price = Some(3_600_000);
        let priced = |m: &mut Mesh, frame: u32, seq: u64, wall_ms: u64| {
            let task = TaskSpec::render(frame, 1, 0, 8);
            let lease = m.grant(task, seq, &cloud);
            let s = TaskStats {
                render_ms: wall_ms,
                wall_ms,
                samples: 8,
                price_per_hour_micros: price,
                ..TaskStats::default()
            };
            m.rendered(task, lease, &cloud, s);
        };
        priced(&mut m, 1, 1, 10_000);
        priced(&mut m, 2, 2, 20_000);
        let task = TaskSpec::render(3, 1, 0, 8);
        let lease = m.grant(task, 3, &desk);
        m.rendered(task, lease, &desk, stats(50_000, 8, None));

        let s = JobStats::of(&m.job, JobClock::default());
        let cost = s.cost.expect("one peer is priced");
        assert!((cost - 0.03).abs() < 1e-9, "{cost}");
        assert_eq!(s.unpriced_peers, vec![desk.public().to_peer_id()]);
        let c = s
            .peers
            .iter()
            .find(|p| p.peer == cloud.public().to_peer_id())
            .unwrap();
        assert_eq!(c.price_per_hour, Some(3.6));
        assert!((c.cost.unwrap() - 0.03).abs() < 1e-9);
        let d = s
            .peers
            .iter()
            .find(|p| p.peer == desk.public().to_peer_id())
            .unwrap();
        assert_eq!((d.price_per_hour, d.cost), (None, None));
    }

    #[test]
    fn a_merge_counts_its_merge_time_and_no_frame_samples() {
        let mut spec = spec(vec![1], 8);
        spec.split = blendnet_proto::Split::Samples;
        let mut m = Mesh::new(spec);
        let w = Keypair::generate_ed25519();
        m.claim();
        let slice = TaskSpec::render(1, 1, 0, 8);
        let lease = m.grant(slice, 1, &w);
        m.rendered(slice, lease, &w, stats(1_000, 8, Some(1_000_000)));
        // The slice is done once a second peer holds it; then the merge is granted.
        let job = m.id();
        let key = m.submitter.clone();
        m.take(
            &key,
            EventBody::Done {
                job,
                task: slice,
                result: BlobHash::of(&1u64.to_le_bytes()),
                epoch: 1,
            },
        );
        let merge = TaskSpec::merge(1, 8);
        let lease = Lease {
            epoch: 1,
            seq: 2,
            worker: w.public().to_peer_id(),
            backup: false,
        };
        m.take(
            &key,
            EventBody::Granted {
                job,
                task: merge,
                lease,
                inputs: vec![BlobHash::of(&1u64.to_le_bytes())],
            },
        );
        let merged = TaskStats {
            merge_ms: 700,
            fetch_ms: 50,
            upload_ms: 10,
            wall_ms: 760,
            price_per_hour_micros: Some(1_000_000),
            ..TaskStats::default()
        };
        m.rendered(merge, lease, &w, merged);
        let s = JobStats::of(&m.job, JobClock::default());
        assert_eq!(s.phases.merge_ms, 700);
        assert_eq!(s.render_ms, 1_000, "a merge renders nothing");
        let p = &s.peers[0];
        assert_eq!((p.tasks, p.merges, p.units), (2, 1, 8));
        assert_eq!(p.samples_per_second, Some(8.0));
    }

    #[test]
    fn wall_time_needs_both_ends_in_order() {
        let seen = |s, f| JobClock {
            started_at_ms: s,
            finished_at_ms: f,
        };
        assert_eq!(seen(Some(1_000), Some(4_500)).wall_ms(), Some(3_500));
        assert_eq!(seen(Some(1_000), None).wall_ms(), None, "still running");
        assert_eq!(seen(None, Some(4_500)).wall_ms(), None, "learned late");
        assert_eq!(
            seen(Some(5_000), Some(4_500)).wall_ms(),
            None,
            "clock moved back"
        );
    }
}
