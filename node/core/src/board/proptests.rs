//! Property tests of whole networks of boards on the harness: random delivery order (random
//! latencies), duplicated and dropped gossip healed by periodic anti-entropy between random
//! pairs, crashes with restore from persisted events, partitions, and clock offsets.
//!
//! Whatever happens during the first [`FAULTS_END_MS`], once every node is back and the network
//! is whole: every job ends done, every task exactly once in its result; no task was declared
//! done without a second holder of its result (or on a mesh of one); at no moment did a
//! coordinator hold two live primary (or backup) leases of one task; the grants of each epoch's
//! owner have unique `(epoch, seq)` per task; and all peers hold the same events and agree on
//! every job, task and claim.

use super::harness::{Fault, Net, NetConfig, NodeSpec};
use super::{Board, JobView};
use crate::job::{JobStatus, Plan, rank};
use blendnet_proto::job::EventBody;
use blendnet_proto::{BlobHash, Engine, JobId, JobSpec, Lease, PeerId, TaskSpec};
use proptest::prelude::*;
use std::collections::{BTreeMap, HashMap};

/// Faults happen before this; then everything is restarted and healed.
const FAULTS_END_MS: u64 = 120_000;
/// Simulated time allowed for the jobs to finish and the peers to agree after that.
const SETTLE_LIMIT_MS: u64 = 3_000_000;

#[derive(Debug, Clone)]
enum JobKind {
    /// An EEVEE animation of `frames` frames, `per_task` per task.
    Frames { frames: u32, per_task: u32 },
    /// A Cycles still of `samples` samples.
    Still { samples: u32 },
}

#[derive(Debug, Clone)]
struct Scenario {
    /// Per node after the first: (renders, coordinates).
    nodes: Vec<(bool, bool)>,
    submitter_renders: bool,
    jobs: Vec<(JobKind, u64)>,
    latency_max: u64,
    loss: f64,
    duplicate: f64,
    anti_entropy: u64,
    /// (time, node, down for) crashes; (time, groups, length) partitions.
    crashes: Vec<(u64, usize, u64)>,
    partitions: Vec<(u64, Vec<u8>, u64)>,
    task_ms: u64,
    seed: u64,
}

fn arb_job() -> impl Strategy<Value = JobKind> {
    prop_oneof![
        (2u32..9, 1u32..3).prop_map(|(frames, per_task)| JobKind::Frames { frames, per_task }),
        (16u32..300).prop_map(|samples| JobKind::Still { samples }),
    ]
}

fn arb_scenario() -> impl Strategy<Value = Scenario> {
    (2usize..5)
        .prop_flat_map(|others| {
            (
                prop::collection::vec((any::<bool>(), any::<bool>()), others),
                any::<bool>(),
                prop::collection::vec((arb_job(), 0u64..20_000), 1..3),
                (1u64..400, 0.0f64..0.3, 0.0f64..0.3, 2_000u64..15_000),
                prop::collection::vec(
                    (0u64..FAULTS_END_MS / 2, 0usize..=others, 500u64..40_000),
                    0..5,
                ),
                prop::collection::vec(
                    (
                        0u64..FAULTS_END_MS / 2,
                        prop::collection::vec(0u8..3, others + 1),
                        1_000u64..60_000,
                    ),
                    0..3,
                ),
                2_000u64..12_000,
                any::<u64>(),
            )
        })
        .prop_map(
            |(mut nodes, submitter_renders, jobs, net, crashes, partitions, task_ms, seed)| {
                // Somebody renders and somebody besides the submitter coordinates.
                nodes[0] = (true, true);
                Scenario {
                    nodes,
                    submitter_renders,
                    jobs,
                    latency_max: net.0,
                    loss: net.1,
                    duplicate: net.2,
                    anti_entropy: net.3,
                    crashes,
                    partitions,
                    task_ms,
                    seed,
                }
            },
        )
}

fn spec_of(kind: &JobKind, i: usize) -> JobSpec {
    let mut spec = match kind {
        JobKind::Frames { frames, per_task } => {
            let mut s = JobSpec::new(
                format!("anim {i}"),
                BlobHash::of(b"scene"),
                "anim.blend",
                (10..10 + frames).collect(),
                32,
                Engine::Eevee,
                1_700_000_000 + i as u64,
            );
            s.frames_per_task = *per_task;
            s
        }
        JobKind::Still { samples } => JobSpec::new(
            format!("still {i}"),
            BlobHash::of(b"scene"),
            "still.blend",
            vec![1],
            *samples,
            Engine::Cycles,
            1_700_000_000 + i as u64,
        ),
    };
    // Short target tasks, so stills are cut into several measured slices.
    spec.target_task_secs = 3;
    spec
}

/// Every (job, epoch) → its owner: the best-ranked author of a coordinator event of it.
fn owners(net: &Net) -> HashMap<(JobId, u64), PeerId> {
    let mut submitters: HashMap<JobId, PeerId> = HashMap::new();
    for e in net.events() {
        if let EventBody::Submitted { .. } = e.body() {
            submitters.insert(JobId::from(e.id()), e.author());
        }
    }
    let mut owners: HashMap<(JobId, u64), PeerId> = HashMap::new();
    for e in net.events() {
        let (Some(job), Some(epoch)) = (e.body().job(), e.body().coordinator_epoch()) else {
            continue;
        };
        let sub = submitters[&job];
        let entry = owners.entry((job, epoch)).or_insert(e.author());
        if rank(&job, &sub, &e.author()) < rank(&job, &sub, entry) {
            *entry = e.author();
        }
    }
    owners
}

/// A job view with the one field that is local (whether this node coordinates) blanked.
fn shared_view(b: &Board, job: &JobId) -> Option<JobView> {
    b.job(job).map(|mut v| {
        v.coordinating = false;
        v
    })
}

fn run(s: &Scenario) -> Result<(), TestCaseError> {
    let mut specs = vec![NodeSpec {
        roles: Net::roles(true, s.submitter_renders, true),
        renders: s.submitter_renders,
        speed: 1.0,
        denoiser: true,
    }];
    for (i, (renders, coordinates)) in s.nodes.iter().enumerate() {
        specs.push(NodeSpec {
            roles: Net::roles(false, *renders, *coordinates),
            renders: *renders,
            speed: 0.5 + (i % 3) as f64 * 0.5,
            denoiser: true,
        });
    }
    let n = specs.len();
    let cfg = NetConfig {
        latency_ms: (1, s.latency_max),
        gossip_loss: s.loss,
        duplicate: s.duplicate,
        anti_entropy_ms: Some(s.anti_entropy),
        ..NetConfig::default()
    };
    let mut net = Net::new(specs, cfg, s.seed);
    let task_ms = s.task_ms;
    // `task_ms` per 64 frame-samples, plus a little per-task overhead.
    net.task_cost = Box::new(move |t: &TaskSpec| 200 + task_ms * t.units() / 64);
    // Submissions come from node 0, which is not crashed before they are all in.
    let last_submit = s.jobs.iter().map(|(_, at)| *at).max().unwrap_or(0);
    let mut jobs = Vec::new();
    let mut pending: Vec<(u64, JobSpec)> = s
        .jobs
        .iter()
        .enumerate()
        .map(|(i, (k, at))| (*at, spec_of(k, i)))
        .collect();
    pending.sort_by_key(|(at, _)| *at);
    for (at, spec) in pending {
        net.run_until(at, |_| false);
        jobs.push(net.submit(0, spec));
    }
    for (at, node, down) in &s.crashes {
        let at = if *node == 0 {
            (*at).max(last_submit + 1)
        } else {
            *at
        };
        net.at(at, Fault::Crash(*node));
        net.at(at + down, Fault::Restart(*node));
    }
    for (at, groups, length) in &s.partitions {
        net.at(*at, Fault::Partition(Some(groups.clone())));
        net.at(at + length, Fault::Partition(None));
    }
    for node in 0..n {
        net.at(FAULTS_END_MS + 1, Fault::Restart(node));
    }
    net.at(FAULTS_END_MS + 1, Fault::Partition(None));

    // Run, checking the coordinators' lease invariants after every step (a broken one
    // panics, which fails the case).
    let settled = net.run_until(SETTLE_LIMIT_MS, |net| {
        for node in &net.nodes {
            if let Some(b) = &node.board {
                b.check_invariants();
            }
        }
        net.now > FAULTS_END_MS + 1
            && jobs.iter().all(|job| {
                let boards: Vec<&Board> =
                    net.nodes.iter().filter_map(|n| n.board.as_ref()).collect();
                boards.len() == n
                    && boards.iter().all(|b| {
                        b.digest(job) == boards[0].digest(job)
                            && b.job_model(job).is_some_and(|j| !j.status().is_active())
                    })
            })
    });
    prop_assert!(
        settled,
        "jobs did not finish and converge by {} ms; boards:\n{}",
        net.now,
        net.nodes
            .iter()
            .filter_map(|n| n.board.as_ref().map(Board::debug_state))
            .collect::<Vec<_>>()
            .join("\n")
    );
    prop_assert!(net.violations.is_empty(), "{:?}", net.violations);

    let reference = net.board(0).expect("node 0 is up");
    for job in &jobs {
        let view = shared_view(reference, job).expect("every node knows the job");
        prop_assert_eq!(&view.summary.status, &JobStatus::Done);
        // All peers agree on everything.
        for i in 1..n {
            let other = shared_view(net.board(i).expect("up"), job);
            prop_assert_eq!(other.as_ref(), Some(&view), "node {} disagrees", i);
        }
        // Every task exactly once in the result.
        let model = reference.job_model(job).expect("known");
        let cover: Vec<TaskSpec> = view
            .tasks
            .iter()
            .filter(|t| t.in_cover)
            .map(|t| t.task)
            .collect();
        prop_assert!(
            view.tasks
                .iter()
                .filter(|t| t.in_cover)
                .all(|t| t.state.is_done())
        );
        match model.plan() {
            Plan::Frames { tasks } => {
                prop_assert_eq!(
                    cover
                        .iter()
                        .copied()
                        .collect::<std::collections::BTreeSet<_>>(),
                    tasks.clone()
                );
            }
            Plan::Samples { frames, samples } => {
                for f in frames {
                    prop_assert!(
                        cover.contains(&TaskSpec::merge(*f, *samples)),
                        "frame {} was merged",
                        f
                    );
                    let mut at = 0;
                    for t in cover
                        .iter()
                        .filter(|t| t.frame_start == *f && !t.is_merge())
                    {
                        prop_assert_eq!(
                            t.sample_offset,
                            at,
                            "slices of frame {} leave a gap or overlap",
                            f
                        );
                        at += t.samples;
                    }
                    prop_assert_eq!(at, *samples);
                }
            }
        }
    }
    // Every merge takes slices of its frame that render each sample exactly once.
    let rendered: BTreeMap<BlobHash, TaskSpec> = net
        .events()
        .filter_map(|e| match e.body() {
            EventBody::Rendered { task, result, .. } => Some((*result, *task)),
            _ => None,
        })
        .collect();
    for e in net.events() {
        if let EventBody::Granted { task, inputs, .. } = e.body()
            && task.is_merge()
        {
            let mut slices: Vec<TaskSpec> = inputs
                .iter()
                .map(|h| rendered.get(h).copied())
                .collect::<Option<_>>()
                .ok_or_else(|| TestCaseError::fail(format!("{task} takes an unknown result")))?;
            slices.sort();
            let mut at = 0;
            for t in slices {
                prop_assert_eq!(t.frame_start, task.frame_start);
                prop_assert_eq!(t.sample_offset, at, "{} takes overlapping slices", task);
                at += t.samples;
            }
            prop_assert_eq!(at, task.samples, "{} misses samples", task);
        }
    }
    // The grants of each epoch's owner never reuse (epoch, seq) for a task.
    let owners = owners(&net);
    let mut seen: BTreeMap<(JobId, TaskSpec, u64, u64), Lease> = BTreeMap::new();
    for e in net.events() {
        if let EventBody::Granted {
            job, task, lease, ..
        } = e.body()
            && owners.get(&(*job, lease.epoch)) == Some(&e.author())
            && let Some(previous) = seen.insert((*job, *task, lease.epoch, lease.seq), *lease)
        {
            prop_assert_eq!(
                previous,
                *lease,
                "two grants of {} share (epoch, seq)",
                task
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_job_ends_done_once_and_all_peers_agree(s in arb_scenario()) {
        run(&s)?;
    }
}

/// A still split across a partition: both sides elect a coordinator for the same epoch and carve
/// the frame differently; on healing, the worse-ranked one's epoch is fenced, the cover rule
/// picks one carving, holes are carved again, and the frame ends covered exactly once.
#[test]
fn a_split_brain_still_heals_into_one_exact_cover() {
    let scenario = Scenario {
        nodes: vec![(true, true), (true, true), (true, true)],
        submitter_renders: false,
        jobs: vec![(JobKind::Still { samples: 256 }, 0)],
        latency_max: 50,
        loss: 0.0,
        duplicate: 0.0,
        anti_entropy: 5_000,
        crashes: vec![(2_000, 0, FAULTS_END_MS)],
        partitions: vec![(1_000, vec![0, 0, 1, 1], 60_000)],
        task_ms: 1_000,
        seed: 99,
    };
    run(&scenario).unwrap();
}
