//! Scenario tests of one board fed by hand, and of small networks on the harness.

use super::harness::{Fault, Net, NetConfig, NodeSpec};
use super::*;
use blendnet_proto::Engine;
use blendnet_proto::job::{EventBody, RevokeReason};

struct Peer {
    key: Keypair,
    id: PeerId,
}

fn peer() -> Peer {
    let key = Keypair::generate_ed25519();
    let id = key.public().to_peer_id();
    Peer { key, id }
}

fn roles(s: &str) -> Roles {
    s.parse().unwrap()
}

fn board(p: &Peer, r: &str, renders: bool) -> Board {
    Board::new(
        BoardConfig {
            keypair: p.key.clone(),
            roles: roles(r),
            renders,
            offer: Offer::default(),
        },
        0,
    )
    .unwrap()
}

fn member(p: &Peer, r: &str, renders: bool) -> Member {
    Member {
        peer: p.id,
        roles: roles(r),
        live: true,
        renders,
        denoiser: true,
    }
}

fn sign(p: &Peer, body: EventBody) -> VerifiedEvent {
    SignedEvent::sign(&p.key, body).unwrap()
}

fn frames_spec(n: u32) -> JobSpec {
    JobSpec::new(
        "anim",
        BlobHash::of(b"scene"),
        "shot.blend",
        (1..=n).collect(),
        64,
        Engine::Eevee,
        1_700_000_000,
    )
}

fn still_spec(samples: u32) -> JobSpec {
    JobSpec::new(
        "still",
        BlobHash::of(b"scene"),
        "still.blend",
        vec![1],
        samples,
        Engine::Cycles,
        1_700_000_000,
    )
}

fn frame(f: u32, samples: u32) -> TaskSpec {
    TaskSpec::render(f, 1, 0, samples)
}

fn new_events(actions: &[Action]) -> Vec<&VerifiedEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Persist(e) => Some(e),
            _ => None,
        })
        .collect()
}

/// Every Publish follows the Persist of the same event.
fn assert_persisted_first(actions: &[Action]) {
    let mut persisted = BTreeSet::new();
    for a in actions {
        match a {
            Action::Persist(e) => {
                persisted.insert(e.id());
            }
            Action::Publish(e) if !matches!(e.body(), EventBody::Heartbeat { .. }) => {
                assert!(persisted.contains(&e.id()), "published before persisted");
            }
            _ => {}
        }
    }
}

#[test]
fn a_lone_node_renders_its_own_job_and_a_mesh_of_one_needs_no_second_holder() {
    let me = peer();
    let mut b = board(&me, "submit,render,coordinate", true);
    let (job, mut actions) = b.submit(10, frames_spec(3)).unwrap();
    let mut now = 10;
    let mut started = Vec::new();
    let mut finished = None;
    for _ in 0..50 {
        assert_persisted_first(&actions);
        let mut next = Vec::new();
        for a in &actions {
            match a {
                Action::StartTask {
                    job, task, lease, ..
                } => {
                    started.push(*task);
                    now += 1_000;
                    next.extend(b.handle(
                        now,
                        Input::TaskFinished {
                            job: *job,
                            task: *task,
                            lease: *lease,
                            result: BlobHash::of(&task.frame_start.to_le_bytes()),
                            stats: TaskStats {
                                render_ms: 1_000,
                                samples: 64,
                                // A Blender without sample_offset rendered frame 2.
                                inexact: task.frame_start == 2,
                                ..Default::default()
                            },
                        },
                    ));
                }
                Action::JobFinished { status, .. } => finished = Some(status.clone()),
                Action::FetchResult { .. } | Action::ReplicateResult { .. } => {
                    panic!("a mesh of one has no one to copy to: {a:?}")
                }
                _ => {}
            }
        }
        if next.is_empty() {
            break;
        }
        actions = next;
    }
    assert_eq!(started, vec![frame(1, 64), frame(2, 64), frame(3, 64)]);
    assert_eq!(finished, Some(JobStatus::Done));
    let view = b.job(&job).unwrap();
    assert!(view.tasks.iter().all(|t| t.state.is_done()));
    assert_eq!(view.summary.done_units, view.summary.total_units);
    assert_eq!(view.summary.coordinator, Some((1, me.id)));
    assert!(view.summary.inexact, "the job says a slice was inexact");
    assert_eq!(b.next_deadline(), None, "nothing left to wait for");
}

/// A coordinator (the submitter, not rendering) and a worker, wired by hand.
struct Duo {
    coord: Peer,
    worker: Peer,
    c: Board,
    w: Board,
    job: JobId,
    /// What the worker did on hearing of the job, not yet delivered.
    start: Vec<Action>,
}

fn duo(spec: JobSpec) -> Duo {
    let coord = peer();
    let worker = peer();
    let mut c = board(&coord, "submit,coordinate", false);
    let mut w = board(&worker, "render", true);
    let list = vec![
        member(&coord, "submit,coordinate", false),
        member(&worker, "render", true),
    ];
    c.handle(0, Input::Members(list.clone()));
    w.handle(0, Input::Members(list));
    let (job, actions) = c.submit(0, spec).unwrap();
    let mut start = Vec::new();
    for e in new_events(&actions) {
        start.extend(w.handle(0, Input::Verified(e.clone())));
    }
    Duo {
        coord,
        worker,
        c,
        w,
        job,
        start,
    }
}

impl Duo {
    /// Lets both sides act at `now`, the worker first delivering what it did at the start.
    fn begin(&mut self, now: u64) -> Vec<Action> {
        let a = self.c.handle(now, Input::Tick);
        let mut b = std::mem::take(&mut self.start);
        b.extend(self.w.handle(now, Input::Tick));
        self.pump(now, a, b)
    }

    /// Delivers every event of `actions` from one side to the other, and work messages both
    /// ways, until quiet. Returns the render-side actions seen on the worker.
    fn pump(&mut self, now: u64, from_coord: Vec<Action>, from_worker: Vec<Action>) -> Vec<Action> {
        let mut render = Vec::new();
        let mut queue: Vec<(bool, Action)> = from_coord
            .into_iter()
            .map(|a| (true, a))
            .chain(from_worker.into_iter().map(|a| (false, a)))
            .collect();
        while !queue.is_empty() {
            let mut next = Vec::new();
            for (on_coord, a) in queue {
                let (other, other_is_coord) = if on_coord {
                    (&mut self.w, false)
                } else {
                    (&mut self.c, true)
                };
                match a {
                    Action::Publish(e) => {
                        let out = other.handle(now, Input::Verified(e));
                        next.extend(out.into_iter().map(|a| (other_is_coord, a)));
                    }
                    Action::SendWork { request, .. } => {
                        let out = other.handle(
                            now,
                            Input::WorkRequest {
                                id: 7,
                                from: if on_coord {
                                    self.coord.id
                                } else {
                                    self.worker.id
                                },
                                request: request.clone(),
                            },
                        );
                        for o in out {
                            if let Action::RespondWork { response, .. } = o {
                                let from = if on_coord {
                                    self.worker.id
                                } else {
                                    self.coord.id
                                };
                                let back = if on_coord { &mut self.c } else { &mut self.w };
                                let out = back.handle(
                                    now,
                                    Input::WorkReply {
                                        from,
                                        request: request.clone(),
                                        response: Some(response),
                                    },
                                );
                                next.extend(out.into_iter().map(|a| (on_coord, a)));
                            } else {
                                next.push((other_is_coord, o));
                            }
                        }
                    }
                    other_action => {
                        if !on_coord {
                            render.push(other_action);
                        } else if let Action::FetchResult { .. } = other_action {
                            render.push(other_action);
                        }
                    }
                }
            }
            queue = next;
        }
        render
    }
}

#[test]
fn a_worker_pulls_renders_and_the_task_is_done_only_once_a_second_peer_holds_the_result() {
    let mut d = duo(frames_spec(1));
    let seen = d.begin(1);
    let start = seen
        .iter()
        .find_map(|a| match a {
            Action::StartTask { task, lease, .. } => Some((*task, *lease)),
            _ => None,
        })
        .expect("the worker got a task");
    assert_eq!(start.0, frame(1, 64));
    assert_eq!(
        (start.1.epoch, start.1.seq, start.1.worker),
        (1, 1, d.worker.id)
    );
    let result = BlobHash::of(b"exr");
    let out = d.w.handle(
        5_000,
        Input::TaskFinished {
            job: d.job,
            task: start.0,
            lease: start.1,
            result,
            stats: TaskStats::default(),
        },
    );
    assert_persisted_first(&out);
    let seen = d.pump(5_000, Vec::new(), out);
    let fetch = seen
        .iter()
        .find(|a| matches!(a, Action::FetchResult { .. }))
        .expect("the coordinator fetches the result");
    assert!(
        matches!(fetch, Action::FetchResult { from, hash, .. } if *from == d.worker.id && *hash == result)
    );
    let task = d.c.job(&d.job).unwrap().tasks[0].state;
    assert!(
        !task.is_done(),
        "rendered is not done: only the renderer holds it"
    );
    // The renderer itself holding it proves nothing.
    let out = d.c.handle(
        5_100,
        Input::ResultHeld {
            hash: result,
            holder: d.worker.id,
        },
    );
    assert!(new_events(&out).is_empty());
    let out = d.c.handle(
        5_200,
        Input::ResultHeld {
            hash: result,
            holder: d.coord.id,
        },
    );
    assert_persisted_first(&out);
    let done = new_events(&out);
    assert!(matches!(done[0].body(), EventBody::Done { result: r, epoch: 1, .. } if *r == result));
    assert!(out.iter().any(|a| matches!(
        a,
        Action::JobFinished {
            status: JobStatus::Done,
            ..
        }
    )));
    d.pump(5_200, out, Vec::new());
    assert_eq!(d.w.job(&d.job).unwrap().summary.status, JobStatus::Done);
    assert!(
        !d.w.job(&d.job).unwrap().summary.inexact,
        "no slice was inexact"
    );
}

#[test]
fn bad_input_is_dropped_counted_and_changes_nothing() {
    let sub = peer();
    let other = peer();
    let renderer = peer();
    let stranger = peer();
    let mut b = board(&sub, "submit,coordinate", false);
    b.handle(
        0,
        Input::Members(vec![
            member(&sub, "submit,coordinate", false),
            member(&other, "submit,coordinate", false),
            member(&renderer, "render", true),
        ]),
    );
    let (job, _) = b.submit(0, frames_spec(2)).unwrap();
    b.handle(1, Input::Tick);
    assert_eq!(b.job(&job).unwrap().summary.coordinator, Some((1, sub.id)));
    let snapshot = |b: &Board| (b.job(&job), b.digests(), b.jobs());
    let before = snapshot(&b);

    let lease = |w: &Peer, epoch| Lease {
        epoch,
        seq: 1,
        worker: w.id,
        backup: false,
    };
    // The submitter ranks first, so epoch 1 is its own: another claimer of it is stale.
    let stale = sign(
        &other,
        EventBody::Granted {
            job,
            task: frame(1, 64),
            lease: lease(&renderer, 1),
            inputs: vec![],
        },
    );
    let stale_beat = sign(
        &other,
        EventBody::Heartbeat {
            job,
            epoch: 1,
            beat: 9,
        },
    );
    let mut forged = sign(
        &sub,
        EventBody::Done {
            job,
            task: frame(1, 64),
            result: BlobHash::of(b"x"),
            epoch: 1,
        },
    )
    .signed()
    .clone();
    forged.body = blendnet_proto::encode(&EventBody::Done {
        job,
        task: frame(2, 64),
        result: BlobHash::of(b"x"),
        epoch: 1,
    });
    let cases: Vec<(Input, DropReason)> = vec![
        (Input::Event(forged), DropReason::BadSignature),
        (
            Input::Verified(sign(&stranger, EventBody::Coordinating { job, epoch: 7 })),
            DropReason::NotMember,
        ),
        (
            Input::Verified(sign(
                &renderer,
                EventBody::Granted {
                    job,
                    task: frame(1, 64),
                    lease: lease(&renderer, 2),
                    inputs: vec![],
                },
            )),
            DropReason::Unauthorized,
        ),
        (Input::Verified(stale), DropReason::StaleEpoch),
        (Input::Verified(stale_beat), DropReason::StaleEpoch),
        (
            Input::Verified(sign(
                &other,
                EventBody::Coordinating {
                    job: JobId([9; 32]),
                    epoch: 1,
                },
            )),
            DropReason::UnknownJob,
        ),
        (
            Input::Verified(sign(
                &other,
                EventBody::Granted {
                    job,
                    task: frame(7, 64),
                    lease: lease(&renderer, 2),
                    inputs: vec![],
                },
            )),
            DropReason::Invalid,
        ),
        (
            Input::Verified(sign(&other, EventBody::Cancelled { job })),
            DropReason::Invalid,
        ),
    ];
    for (input, reason) in cases {
        let count = b.counters().get(reason);
        let out = b.handle(2, input);
        assert!(
            !out.iter().any(|a| matches!(
                a,
                Action::Persist(_) | Action::Publish(_) | Action::StopTask { .. }
            )),
            "{reason:?}: a dropped event yields nothing: {out:?}"
        );
        assert_eq!(b.counters().get(reason), count + 1, "{reason:?} counted");
        assert_eq!(snapshot(&b), before, "{reason:?} changed the state");
    }
    assert_eq!(b.counters().total_dropped(), 8);
}

#[test]
fn a_heartbeat_of_an_unknown_claim_asks_for_anti_entropy_once() {
    let sub = peer();
    let other = peer();
    let mut b = board(&sub, "submit", false);
    b.handle(
        0,
        Input::Members(vec![
            member(&sub, "submit", false),
            member(&other, "coordinate", false),
        ]),
    );
    let (job, _) = b.submit(0, frames_spec(1)).unwrap();
    let beat = |n| {
        Input::Verified(sign(
            &other,
            EventBody::Heartbeat {
                job,
                epoch: 3,
                beat: n,
            },
        ))
    };
    let out = b.handle(10, beat(1));
    assert!(matches!(out.as_slice(), [Action::SyncJob { with, .. }] if *with == other.id));
    assert!(
        b.handle(20, beat(2)).is_empty(),
        "one hint per {SYNC_HINT_EVERY_MS} ms"
    );
    assert_eq!(b.counters().total_dropped(), 0);
}

fn request(job: JobId) -> WorkRequest {
    WorkRequest::RequestWork {
        job,
        offer: Offer::default(),
        report: None,
    }
}

fn ask(b: &mut Board, now: u64, from: &Peer, req: WorkRequest) -> (WorkResponse, Vec<Action>) {
    let out = b.handle(
        now,
        Input::WorkRequest {
            id: 1,
            from: from.id,
            request: req,
        },
    );
    let resp = out
        .iter()
        .find_map(|a| match a {
            Action::RespondWork { response, .. } => Some(response.clone()),
            _ => None,
        })
        .expect("a response");
    (resp, out)
}

fn granted(resp: &WorkResponse) -> (SignedEvent, TaskSpec, Lease) {
    let WorkResponse::Grant { grant } = resp else {
        panic!("expected a grant, got {resp:?}");
    };
    let v = grant.clone().verify().unwrap();
    let EventBody::Granted { task, lease, .. } = *v.body() else {
        panic!("not a grant");
    };
    (grant.clone(), task, lease)
}

#[test]
fn a_lapsed_lease_is_granted_again_with_a_higher_seq_and_a_late_renewal_becomes_the_backup() {
    let sub = peer();
    let (w1, w2, w3) = (peer(), peer(), peer());
    let mut b = board(&sub, "submit,coordinate", false);
    b.handle(
        0,
        Input::Members(vec![
            member(&w1, "render", true),
            member(&w2, "render", true),
            member(&w3, "render", true),
        ]),
    );
    let (job, _) = b.submit(0, frames_spec(1)).unwrap();
    let (r1, out) = ask(&mut b, 10, &w1, request(job));
    assert_persisted_first(&out);
    let (g1, task, l1) = granted(&r1);
    assert_eq!((l1.epoch, l1.seq, l1.backup), (1, 1, false));
    // Asking again without reporting: the grant was lost on the way; the same one comes back.
    let (again, out) = ask(&mut b, 20, &w1, request(job));
    assert_eq!(granted(&again).2, l1);
    assert!(new_events(&out).is_empty(), "no new lease");
    // Nothing else to grant: one task, leased, nothing measured for a backup.
    let (none, _) = ask(&mut b, 30, &w2, request(job));
    assert!(matches!(none, WorkResponse::NoWork { .. }));
    // Renewal keeps it alive past its first expiry.
    let (renewed, _) = ask(
        &mut b,
        25_000,
        &w1,
        WorkRequest::Renew { grant: g1.clone() },
    );
    assert!(matches!(renewed, WorkResponse::Renewed { .. }));
    b.handle(40_000, Input::Tick);
    let (none, _) = ask(&mut b, 40_000, &w2, request(job));
    assert!(
        matches!(none, WorkResponse::NoWork { .. }),
        "renewed lease still live"
    );
    // Silence for a whole lease: it lapses and the task goes to w2 with a higher seq.
    b.handle(25_000 + LEASE_MS + 1, Input::Tick);
    let (r2, _) = ask(&mut b, 25_000 + LEASE_MS + 2, &w2, request(job));
    let (_, task2, l2) = granted(&r2);
    assert_eq!(task2, task);
    assert_eq!((l2.epoch, l2.seq), (1, 2));
    b.check_invariants();
    // w1 was still rendering: its late renewal is taken back as the backup, not thrown away.
    let now = 25_000 + LEASE_MS + 3;
    let (late, _) = ask(&mut b, now, &w1, WorkRequest::Renew { grant: g1.clone() });
    assert!(matches!(late, WorkResponse::Renewed { .. }));
    let live = b.live_leases();
    assert_eq!(live.len(), 2);
    assert!(live.iter().any(|(_, _, _, l, backup)| *l == l1 && *backup));
    assert!(live.iter().any(|(_, _, _, l, backup)| *l == l2 && !*backup));
    b.check_invariants();
    // No room for a third copy.
    let (r3, _) = ask(&mut b, now, &w3, request(job));
    assert!(matches!(r3, WorkResponse::NoWork { .. }));
}

#[test]
fn a_renewal_for_a_done_task_is_revoked_and_the_worker_stops() {
    let mut d = duo(frames_spec(2));
    let seen = d.begin(1);
    let (task, lease) = seen
        .iter()
        .find_map(|a| match a {
            Action::StartTask { task, lease, .. } => Some((*task, *lease)),
            _ => None,
        })
        .unwrap();
    // The coordinator declares the task done from another copy (say a backup elsewhere):
    // simulate with an event by the coordinator, as it would emit it.
    let done = sign(
        &d.coord,
        EventBody::Done {
            job: d.job,
            task,
            result: BlobHash::of(b"other copy"),
            epoch: lease.epoch,
        },
    );
    let out = d.w.handle(2, Input::Verified(done.clone()));
    assert!(out.iter().any(|a| matches!(a, Action::StopTask { reason: StopReason::TaskDone, task: t, .. } if *t == task)));
    d.c.handle(2, Input::Verified(done));
    let grant = d.c.job(&d.job).unwrap();
    assert!(
        grant
            .tasks
            .iter()
            .any(|t| t.task == task && t.state.is_done())
    );
    // A renewal now is revoked.
    let g =
        d.c.job_model(&d.job)
            .unwrap()
            .task(&task)
            .unwrap()
            .grant(&lease)
            .unwrap()
            .signed()
            .clone();
    let (resp, _) = ask(&mut d.c, 3, &d.worker, WorkRequest::Renew { grant: g });
    assert_eq!(
        resp,
        WorkResponse::Revoked {
            reason: RevokeReason::TaskDone
        }
    );
}

#[test]
fn a_cancelled_job_stops_its_renders_and_grants_nothing_more() {
    let mut d = duo(frames_spec(4));
    let seen = d.begin(1);
    assert!(seen.iter().any(|a| matches!(a, Action::StartTask { .. })));
    assert!(matches!(
        d.w.cancel(2, d.job),
        Err(CancelError::NotSubmitter(_))
    ));
    let out = d.c.cancel(2, d.job).unwrap();
    assert!(out.iter().any(|a| matches!(
        a,
        Action::JobFinished {
            status: JobStatus::Cancelled,
            ..
        }
    )));
    let seen = d.pump(2, out, Vec::new());
    assert!(seen.iter().any(|a| matches!(
        a,
        Action::StopTask {
            reason: StopReason::JobCancelled,
            ..
        }
    )));
    assert_eq!(d.w.running(), None);
    let (resp, _) = ask(&mut d.c, 3, &d.worker, request(d.job));
    assert_eq!(
        resp,
        WorkResponse::Revoked {
            reason: RevokeReason::JobCancelled
        }
    );
    assert!(matches!(
        d.c.cancel(4, d.job),
        Err(CancelError::Finished(_))
    ));
}

#[test]
fn a_worker_resumes_its_lease_after_a_restart() {
    let mut d = duo(frames_spec(2));
    let mut disk: Vec<SignedEvent> = Vec::new();
    let seen = d.begin(1);
    let (task, lease) = seen
        .iter()
        .find_map(|a| match a {
            Action::StartTask { task, lease, .. } => Some((*task, *lease)),
            _ => None,
        })
        .unwrap();
    disk.extend(d.w.events(&d.job).iter().map(|e| e.signed().clone()));
    let mut w = Board::restore(
        BoardConfig {
            keypair: d.worker.key.clone(),
            roles: roles("render"),
            renders: true,
            offer: Offer::default(),
        },
        disk,
        50,
    )
    .unwrap();
    let out = w.handle(
        50,
        Input::Members(vec![
            member(&d.coord, "submit,coordinate", false),
            member(&d.worker, "render", true),
        ]),
    );
    let resumed: Vec<_> = out
        .iter()
        .filter_map(|a| match a {
            Action::StartTask { task, lease, .. } => Some((*task, *lease)),
            _ => None,
        })
        .collect();
    assert_eq!(
        resumed,
        vec![(task, lease)],
        "the same lease, not a new request"
    );
    assert!(
        !out.iter().any(|a| matches!(a, Action::Persist(_))),
        "restore persists nothing again"
    );
}

#[test]
fn invalid_submissions_and_non_submitters_are_refused() {
    let p = peer();
    let mut b = board(&p, "render", true);
    assert!(matches!(
        b.submit(0, frames_spec(1)),
        Err(SubmitError::NotASubmitter)
    ));
    let mut b = board(&p, "submit", false);
    let mut bad = frames_spec(1);
    bad.frames.clear();
    assert!(matches!(b.submit(0, bad), Err(SubmitError::Invalid(_))));
    assert!(b.jobs().is_empty());
}

fn spec_nodes(n: usize, coordinators: usize) -> Vec<NodeSpec> {
    let mut specs = vec![NodeSpec {
        roles: Net::roles(true, false, true),
        renders: false,
        speed: 1.0,
        denoiser: true,
    }];
    for i in 1..n {
        specs.push(NodeSpec {
            roles: Net::roles(false, true, i <= coordinators),
            renders: true,
            speed: 1.0,
            denoiser: true,
        });
    }
    specs
}

fn quiet() -> NetConfig {
    NetConfig {
        anti_entropy_ms: Some(5_000),
        ..NetConfig::default()
    }
}

#[test]
fn a_coordinator_crash_hands_over_within_seconds_and_no_lease_in_flight_is_lost() {
    let mut net = Net::new(spec_nodes(6, 2), quiet(), 7);
    net.task_cost = Box::new(|_| 20_000);
    let job = net.submit(0, frames_spec(10));
    net.at(30_000, Fault::Kill(0));
    assert!(
        net.settle(job, 600_000),
        "the job finishes without its submitter"
    );
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let b = net.board(1).unwrap();
    let view = b.job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    let (epoch, coordinator) = view.summary.coordinator.unwrap();
    assert_eq!(epoch, 2, "one takeover");
    assert_ne!(coordinator, net.peer(0));
    // Every task was rendered once: leases in flight at the crash were honoured.
    let mut per_task: BTreeMap<TaskSpec, usize> = BTreeMap::new();
    for r in &net.renders {
        *per_task.entry(r.task).or_default() += 1;
    }
    assert_eq!(per_task.len(), 10);
    assert!(per_task.values().all(|n| *n == 1), "{per_task:?}");
    assert!(
        net.renders.iter().all(|r| r.result.is_some()),
        "no render abandoned"
    );
    // The takeover came a few seconds after the last heartbeat, not a lease later.
    let (at, _) = net
        .produced
        .iter()
        .find(|(_, e)| matches!(e.body(), EventBody::Coordinating { epoch: 2, .. }))
        .expect("a takeover claim");
    // The last heartbeat left just before 30 s; the best-ranked candidate waits one period.
    assert!(
        *at >= 30_000 - HEARTBEAT_MS + TAKEOVER_AFTER_MS && *at <= 30_000 + TAKEOVER_AFTER_MS + 100,
        "claimed at {at} ms"
    );
}

#[test]
fn a_task_that_fails_on_three_peers_fails_the_job_with_the_reason() {
    let mut net = Net::new(spec_nodes(6, 1), quiet(), 11);
    net.failing.insert(frame(2, 64), BTreeSet::new());
    let job = net.submit(0, frames_spec(3));
    assert!(net.settle(job, 600_000));
    let view = net.board(0).unwrap().job(&job).unwrap();
    let JobStatus::Failed { reason } = &view.summary.status else {
        panic!("expected failure, got {:?}", view.summary.status);
    };
    assert!(
        reason.contains("failed on 3 peers") && reason.contains("out of memory"),
        "{reason}"
    );
    let failed = view.tasks.iter().find(|t| t.task == frame(2, 64)).unwrap();
    assert_eq!(failed.failures.len(), 3, "three distinct peers");
    assert!(net.violations.is_empty(), "{:?}", net.violations);
}

#[test]
fn a_task_failing_on_one_peer_is_retried_on_another() {
    let mut net = Net::new(spec_nodes(4, 1), quiet(), 12);
    net.failing.insert(frame(1, 64), [1, 2].into());
    let job = net.submit(0, frames_spec(3));
    assert!(net.settle(job, 600_000));
    let view = net.board(0).unwrap().job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    let t = view.tasks.iter().find(|t| t.task == frame(1, 64)).unwrap();
    assert!(t.failures.len() <= 2);
    assert_eq!(t.results.len(), 1);
    assert_eq!(
        t.results[0].0,
        net.peer(3),
        "only the peer it does not fail on rendered it"
    );
}

#[test]
fn a_still_is_sliced_by_samples_probe_first_then_by_measured_speed() {
    let mut net = Net::new(spec_nodes(5, 1), quiet(), 13);
    // 50 ms per sample: a 60 s target is 1200 samples, capped by the fair share.
    net.task_cost = Box::new(|t| 50 * t.units());
    let job = net.submit(0, still_spec(4096));
    assert!(net.settle(job, 3_600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let view = net.board(0).unwrap().job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    let cover: Vec<TaskSpec> = view
        .tasks
        .iter()
        .filter(|t| t.in_cover && !t.task.is_merge())
        .map(|t| t.task)
        .collect();
    assert!(
        view.tasks
            .iter()
            .filter(|t| t.in_cover)
            .all(|t| t.state.is_done())
    );
    // The frame was merged once, from exactly the cover's results.
    let merges: Vec<&Vec<blendnet_proto::BlobHash>> = net
        .events()
        .filter_map(|e| match e.body() {
            EventBody::Granted { task, inputs, .. } if task.is_merge() => Some(inputs),
            _ => None,
        })
        .collect();
    assert_eq!(merges.len(), 1, "one merge grant");
    assert_eq!(merges[0].len(), cover.len());
    // The cover partitions the frame's samples exactly.
    let mut at = 0;
    for t in &cover {
        assert_eq!(t.sample_offset, at);
        at += t.samples;
    }
    assert_eq!(at, 4096);
    let grants: Vec<u32> = net
        .events()
        .filter_map(|e| match e.body() {
            EventBody::Granted { task, .. } if !task.is_merge() => Some(task.samples),
            _ => None,
        })
        .collect();
    assert!(
        grants[0] <= crate::sizing::PROBE_SAMPLES,
        "the first slice is a probe"
    );
    assert!(
        grants.iter().any(|s| *s > 100),
        "later slices are sized from measurements: {grants:?}"
    );
    assert!(grants.iter().all(|s| *s <= 1_200 + 1_200 / 4), "{grants:?}");
}

#[test]
fn a_straggler_gets_a_backup_and_the_first_result_wins() {
    let mut specs = spec_nodes(4, 1);
    specs[3].speed = 0.1;
    let mut net = Net::new(specs, NetConfig::default(), 14);
    net.task_cost = Box::new(|_| 10_000);
    let job = net.submit(0, frames_spec(6));
    assert!(net.settle(job, 600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let backups = net
        .events()
        .filter(|e| matches!(e.body(), EventBody::Granted { lease, .. } if lease.backup))
        .count();
    assert!(backups >= 1, "the slow peer's task was copied");
    let done_at = net.finished_at[&job];
    assert!(
        done_at < 60_000,
        "done at {done_at} ms, not when the slow copy ends (100 s+)"
    );
    let view = net.board(1).unwrap().job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
}

#[test]
fn a_crashed_worker_restored_within_its_lease_resumes_and_nothing_is_rendered_twice() {
    let mut net = Net::new(spec_nodes(3, 1), quiet(), 15);
    net.task_cost = Box::new(|_| 20_000);
    let job = net.submit(0, frames_spec(4));
    net.at(5_000, Fault::Crash(1));
    net.at(9_000, Fault::Restart(1));
    assert!(net.settle(job, 600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let finished: BTreeMap<TaskSpec, usize> = net
        .renders
        .iter()
        .filter(|r| r.result.is_some())
        .fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r.task).or_default() += 1;
            m
        });
    assert_eq!(finished.len(), 4);
    assert!(finished.values().all(|n| *n == 1), "{finished:?}");
    // The crashed render restarted under the same lease: one abandoned run, same task.
    let abandoned: Vec<_> = net.renders.iter().filter(|r| r.result.is_none()).collect();
    assert_eq!(abandoned.len(), 1);
    let grants_of = |t: TaskSpec| {
        net.events()
            .filter(|e| matches!(e.body(), EventBody::Granted { task, .. } if *task == t))
            .count()
    };
    assert_eq!(
        grants_of(abandoned[0].task),
        1,
        "resumed, not granted again"
    );
}

#[test]
fn preempted_workers_hand_their_leases_back_at_once() {
    let mut net = Net::new(spec_nodes(5, 1), quiet(), 16);
    net.task_cost = Box::new(|_| 30_000);
    let job = net.submit(0, frames_spec(3));
    net.run_until(10_000, |_| false);
    let busy = (1..5)
        .find(|i| net.board(*i).is_some_and(|b| b.running().is_some()))
        .expect("someone renders");
    net.at(10_000, Fault::Preempt(busy));
    assert!(net.settle(job, 600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    // An idle peer got the handed-back task within a retry, not after the lease lapsed.
    let regrants: Vec<u64> = net
        .produced
        .iter()
        .filter_map(|(at, e)| match e.body() {
            EventBody::Granted { lease, .. } if lease.seq == 2 => Some(*at),
            _ => None,
        })
        .collect();
    assert_eq!(regrants.len(), 1);
    assert!(
        regrants[0] < 10_000 + NO_WORK_RETRY_MS + 1_000,
        "{regrants:?}"
    );
}

#[test]
fn a_cancel_reaches_every_peer_stops_every_render_and_no_grant_follows() {
    let mut net = Net::new(spec_nodes(5, 2), quiet(), 17);
    net.task_cost = Box::new(|_| 30_000);
    let job = net.submit(0, frames_spec(12));
    net.run_until(40_000, |_| false);
    let rendering = (1..5)
        .filter(|i| net.board(*i).is_some_and(|b| b.running().is_some()))
        .count();
    assert!(rendering > 0);
    let before = net.renders.len();
    net.cancel(0, job);
    let cancelled_at = net.now;
    net.run_until(cancelled_at + 5_000, |_| false);
    for i in 0..5 {
        let b = net.board(i).unwrap();
        assert_eq!(
            b.job(&job).unwrap().summary.status,
            JobStatus::Cancelled,
            "node {i}"
        );
        assert_eq!(b.running(), None, "node {i} still renders");
    }
    // The renders in flight were stopped (abandoned, no result), within a gossip delay.
    let stopped: Vec<_> = net.renders[before..]
        .iter()
        .filter(|r| r.result.is_none())
        .collect();
    assert_eq!(stopped.len(), rendering);
    assert!(stopped.iter().all(|r| (1..5).contains(&r.node)));
    let late_grants = net
        .produced
        .iter()
        .filter(|(at, e)| *at > cancelled_at && matches!(e.body(), EventBody::Granted { .. }))
        .count();
    assert_eq!(late_grants, 0);
    net.run_until(cancelled_at + 120_000, |_| false);
    assert_eq!(
        net.renders.len(),
        before + rendering,
        "nothing rendered after the cancel"
    );
}

#[test]
fn views_serialize_for_the_api() {
    let me = peer();
    let mut b = board(&me, "submit,render,coordinate", true);
    let (job, _) = b.submit(0, frames_spec(2)).unwrap();
    let view = serde_json::to_value(b.job(&job).unwrap()).unwrap();
    assert_eq!(view["summary"]["status"], "Active");
    assert_eq!(view["summary"]["id"], job.to_string());
    assert_eq!(view["frames"].as_array().unwrap().len(), 2);
    assert_eq!(view["coordinating"], true);
    let counters = serde_json::to_value(b.counters()).unwrap();
    assert_eq!(counters["duplicates"], 0);
}

#[test]
fn only_peers_whose_blender_matches_the_job_render_it() {
    let sub = peer();
    let (old, new) = (peer(), peer());
    let mut c = board(&sub, "submit,coordinate", false);
    c.handle(
        0,
        Input::Members(vec![
            member(&old, "render", true),
            member(&new, "render", true),
        ]),
    );
    let mut spec = frames_spec(2);
    spec.blender = Some("4.2".into());
    let (job, submitted) = c.submit(0, spec).unwrap();
    let offer = |v: &str| WorkRequest::RequestWork {
        job,
        offer: Offer {
            blender: Some(v.into()),
            ..Offer::default()
        },
        report: None,
    };
    // The coordinator refuses a worker with another Blender, and grants one that matches.
    let (resp, _) = ask(&mut c, 10, &old, offer("3.4.1"));
    assert!(matches!(resp, WorkResponse::NoWork { .. }), "{resp:?}");
    let (resp, _) = ask(&mut c, 10, &new, offer("4.2.5"));
    granted(&resp);

    // A worker with another Blender does not even ask.
    let mut w = Board::new(
        BoardConfig {
            keypair: old.key.clone(),
            roles: roles("render"),
            renders: true,
            offer: Offer {
                blender: Some("3.4.1".into()),
                ..Offer::default()
            },
        },
        0,
    )
    .unwrap();
    w.handle(
        0,
        Input::Members(vec![
            member(&sub, "submit,coordinate", false),
            member(&new, "render", true),
        ]),
    );
    let mut asked = Vec::new();
    for event in new_events(&submitted) {
        asked.extend(w.handle(20, Input::Verified(event.clone())));
    }
    asked.extend(w.handle(5_000, Input::Tick));
    assert!(
        !asked.iter().any(|a| matches!(a, Action::SendWork { .. })),
        "a worker with Blender 3.4 asked for a 4.2 job: {asked:?}"
    );
}

/// The merge grants of a run: (worker, inputs, when).
fn merge_grants(net: &Net) -> Vec<(PeerId, Vec<blendnet_proto::BlobHash>, u64)> {
    net.produced
        .iter()
        .filter_map(|(at, e)| match e.body() {
            EventBody::Granted {
                task,
                lease,
                inputs,
                ..
            } if task.is_merge() => Some((lease.worker, inputs.clone(), *at)),
            _ => None,
        })
        .collect()
}

/// How many of `inputs` each peer rendered.
fn slices_rendered(net: &Net, inputs: &[blendnet_proto::BlobHash]) -> BTreeMap<PeerId, usize> {
    let mut held = BTreeMap::new();
    for e in net.events() {
        if let EventBody::Rendered { lease, result, .. } = e.body()
            && inputs.contains(result)
        {
            *held.entry(lease.worker).or_insert(0) += 1;
        }
    }
    held
}

fn sliced_still(seed: u64, prepare: impl FnOnce(&mut Net)) -> (Net, JobId) {
    let mut net = Net::new(spec_nodes(4, 1), quiet(), seed);
    // Slices cost 20 ms a sample; a merge, two seconds.
    net.task_cost = Box::new(|t| if t.is_merge() { 2_000 } else { 20 * t.units() });
    prepare(&mut net);
    net.membership_changed();
    let job = net.submit(0, still_spec(2048));
    (net, job)
}

#[test]
fn a_frame_is_merged_by_a_peer_holding_most_of_its_slices() {
    // Over several runs (the first peer to ask after the last slice differs between them), on
    // peers of different speeds, so that one holds more slices than the others.
    for seed in 0..12 {
        let (mut net, job) = sliced_still(seed, |net| {
            for (i, speed) in [(1, 3.0), (2, 1.0), (3, 1.5)] {
                net.nodes[i].spec.speed = speed;
            }
        });
        assert!(net.settle(job, 600_000));
        assert!(net.violations.is_empty(), "{:?}", net.violations);
        let view = net.board(0).unwrap().job(&job).unwrap();
        assert_eq!(view.summary.status, JobStatus::Done);
        let grants = merge_grants(&net);
        assert_eq!(grants.len(), 1, "{grants:?}");
        let (merger, inputs, _) = &grants[0];
        let held = slices_rendered(&net, inputs);
        assert!(held.len() > 1, "the slices were spread: {held:?}");
        let most = held.values().max().copied().unwrap();
        assert_eq!(held.get(merger), Some(&most), "seed {seed}: {held:?}");
        // The merge's result is the job's output, and it is held by a second peer.
        let merge = TaskSpec::merge(1, 2048);
        let done = view.tasks.iter().find(|t| t.task == merge).unwrap();
        assert!(done.state.is_done());
        assert_eq!(done.results.len(), 1);
        assert_eq!(done.results[0].0, *merger);
    }
}

#[test]
fn a_frame_is_merged_as_soon_as_its_last_slice_is_done() {
    // Idle peers ask for work every NO_WORK_RETRY_MS; the end of the last slice must not wait
    // for that: the news of a task done makes them ask at once.
    for seed in 0..12 {
        let (mut net, job) = sliced_still(seed, |_| {});
        assert!(net.settle(job, 600_000));
        let last_slice_done = net
            .produced
            .iter()
            .filter_map(|(at, e)| match e.body() {
                EventBody::Done { task, .. } if !task.is_merge() => Some(*at),
                _ => None,
            })
            .max()
            .unwrap();
        let (_, _, granted) = merge_grants(&net)[0];
        assert!(
            granted - last_slice_done < NO_WORK_RETRY_MS / 4,
            "seed {seed}: merge granted {} ms after the last slice was done",
            granted - last_slice_done
        );
    }
}

#[test]
fn a_merge_that_fails_or_whose_merger_dies_moves_to_another_peer() {
    let merge = TaskSpec::merge(1, 2048);
    let (mut first, job) = sliced_still(22, |_| {});
    assert!(first.settle(job, 600_000));
    let elected = merge_grants(&first)[0].0;
    let index = (0..4).find(|i| first.peer(*i) == elected).unwrap();

    // The elected merger cannot merge (its Blender has no denoiser, say): another does.
    let (mut net, job) = sliced_still(22, |net| {
        net.failing.insert(merge, [index].into());
    });
    assert!(net.settle(job, 600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let view = net.board(0).unwrap().job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    let grants = merge_grants(&net);
    assert_eq!(grants[0].0, elected, "the same run elects the same merger");
    let rec = view.tasks.iter().find(|t| t.task == merge).unwrap();
    assert_eq!(rec.failures.len(), 1);
    assert_ne!(rec.results[0].0, elected);

    // The elected merger dies while merging: its lease lapses and another peer merges.
    let (mut net, job) = sliced_still(22, |_| {});
    assert!(net.run_until(600_000, |n| !merge_grants(n).is_empty()));
    let at = net.now + 500;
    net.at(at, Fault::Kill(index));
    assert!(net.settle(job, 600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let view = net.board(0).unwrap().job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    let grants = merge_grants(&net);
    assert!(grants.len() >= 2, "{grants:?}");
    let rec = view.tasks.iter().find(|t| t.task == merge).unwrap();
    assert_ne!(rec.results[0].0, elected);
    // Within a lease and a departed peer's grace, not much more.
    let regranted = grants.iter().find(|g| g.0 != elected).unwrap().2;
    assert!(regranted - at <= LEASE_MS + 5_000, "{}", regranted - at);
}

#[test]
fn a_scene_that_denoises_merges_on_a_peer_that_can_and_fails_early_where_none_can() {
    // Only node 3's Blender can denoise: it merges, whoever holds the slices.
    let (mut net, job) = sliced_still(24, |net| {
        net.scene_denoises = true;
        for i in 1..3 {
            net.nodes[i].spec.denoiser = false;
        }
    });
    assert!(net.settle(job, 600_000));
    assert!(net.violations.is_empty(), "{:?}", net.violations);
    let view = net.board(0).unwrap().job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    let grants = merge_grants(&net);
    assert!(!grants.is_empty());
    assert!(grants.iter().all(|g| g.0 == net.peer(3)), "{grants:?}");

    // No peer can denoise: the job fails with the reason as soon as a slice shows the scene
    // denoises, long before the frame is rendered.
    let (mut net, job) = sliced_still(24, |net| {
        net.scene_denoises = true;
        for node in &mut net.nodes {
            node.spec.denoiser = false;
        }
    });
    assert!(net.settle(job, 600_000));
    let view = net.board(0).unwrap().job(&job).unwrap();
    let JobStatus::Failed { reason } = &view.summary.status else {
        panic!("expected failure, got {:?}", view.summary.status);
    };
    assert!(reason.contains("OpenImageDenoise"), "{reason}");
    assert!(merge_grants(&net).is_empty());
    assert!(
        view.summary.done_units < view.summary.total_units / 2,
        "{} of {} samples rendered first",
        view.summary.done_units,
        view.summary.total_units
    );
}

#[test]
fn a_workers_reports_carry_its_price_and_the_view_sums_them() {
    let me = peer();
    let mut b = Board::new(
        BoardConfig {
            keypair: me.key.clone(),
            roles: roles("submit,render,coordinate"),
            renders: true,
            offer: Offer {
                price_per_hour_micros: Some(7_200_000),
                ..Offer::default()
            },
        },
        0,
    )
    .unwrap();
    let (job, mut actions) = b.submit(10, frames_spec(2)).unwrap();
    let mut now = 10;
    for _ in 0..50 {
        let mut next = Vec::new();
        for a in &actions {
            if let Action::StartTask {
                job, task, lease, ..
            } = a
            {
                now += 1_000;
                next.extend(b.handle(
                    now,
                    Input::TaskFinished {
                        job: *job,
                        task: *task,
                        lease: *lease,
                        result: BlobHash::of(&task.frame_start.to_le_bytes()),
                        stats: TaskStats {
                            render_ms: 900,
                            upload_ms: 100,
                            wall_ms: 1_000,
                            samples: 64,
                            ..Default::default()
                        },
                    },
                ));
            }
        }
        if next.is_empty() {
            break;
        }
        actions = next;
    }
    let view = b.job(&job).unwrap();
    assert_eq!(view.summary.status, JobStatus::Done);
    for task in &view.tasks {
        assert_eq!(task.retries, 0);
        assert_eq!(task.reports.len(), 1);
        assert_eq!(task.reports[0].worker, me.id);
        assert_eq!(task.reports[0].stats.price_per_hour_micros, Some(7_200_000));
    }
    let stats = &view.stats;
    assert_eq!(stats.render_ms, 1_800);
    assert_eq!(stats.phases.upload_ms, 200);
    assert_eq!(stats.peers.len(), 1);
    assert_eq!(stats.peers[0].units, 128);
    // Two seconds of a $7.20/h machine.
    assert!(stats.unpriced_peers.is_empty());
    assert!(
        (stats.cost.unwrap() - 0.004).abs() < 1e-9,
        "{:?}",
        stats.cost
    );
    let json = serde_json::to_value(&view).unwrap();
    assert!(json["stats"]["phases"]["render_ms"].is_u64(), "{json}");
    assert!(json["tasks"][0]["reports"][0]["stats"]["wall_ms"].is_u64());
    assert!(json["tasks"][0]["results"].is_array(), "kept as it was");
}
