//! The render actor: renders the tasks the job board starts, one at a time, each job on its
//! own persistent Blender ([`blendnet_render::Worker`]).
//!
//! ```text
//!  board ── RenderMessage::Start{job, spec, task, lease} ──▶ RenderActor
//!                                                              │ 1. fetch the scene's manifest and files,
//!                                                              │    materialize them in <data>/work/<job>/scene
//!                                                              │ 2. a Blender with the scene loaded (kept
//!                                                              │    for the job's next task)
//!                                                              │ 3. render, import the outputs as a manifest
//!  board ◀── RenderReport::{Finished{result}, Failed{reason}} ─┘
//! ```
//!
//! A merge task (the last step of a sample-split frame, on the elected merger) fetches the
//! frame's slices, merges them ([`blendnet_exr`]), and has Blender
//! finish the frame into the scene's output file ([`blendnet_render::finish`]); its result is a
//! manifest of that file.
//!
//! Each finished task reports its phases ([`TaskStats`]): the wait from the board's grant to
//! this actor taking the task up, fetching inputs, starting Blender, rendering (or merging),
//! and the import of the outputs into the blob store (the worker's "upload": copying the
//! result to a second peer comes after, asked by the coordinator). They are laps of one
//! stopwatch, so they follow each other without gaps; the task's wall time is measured apart,
//! from the grant to the report.
//!
//! `Stop` kills Blender at once (cancellation within a second); a crashed or hung Blender is
//! reported as a failed task and a fresh one is started for the next task. A task's log (what
//! happened, and Blender's last lines on a failure) is kept in `<data>/work/<job>/logs/`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use blendnet_proto::wire::Activity;
use blendnet_proto::{BlobHash, JobId, JobSpec, Lease, TaskSpec, TaskStats};
use blendnet_render::{Progress, RenderError, RenderTask, SliceMode, Worker};
use tokio::sync::{mpsc, watch};

use crate::blobs::Blobs;

/// Messages waiting for the render actor: the board sends a start or a stop now and then.
const INBOX: usize = 16;

/// A message for the render actor.
#[derive(Debug)]
pub enum RenderMessage {
    /// Render `task` (the board renders one task at a time).
    Start {
        job: JobId,
        spec: Arc<JobSpec>,
        task: TaskSpec,
        lease: Lease,
        /// A merge's slices.
        inputs: Vec<BlobHash>,
        /// When the board accepted the grant: the task's wait starts here.
        granted_at: Instant,
    },
    /// Stop rendering `task` of `job`, if it is the one running; report nothing.
    Stop { job: JobId, task: TaskSpec },
    /// The Blender to render with (found after start-up), or none.
    SetBlender(Option<PathBuf>),
}

/// What became of a started task.
#[derive(Debug, Clone)]
pub enum RenderReport {
    Finished {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        /// A manifest of the task's outputs: a slice's `frame_NNNNNN.exr`, or the files the
        /// scene's output settings name.
        result: BlobHash,
        stats: TaskStats,
    },
    Failed {
        job: JobId,
        task: TaskSpec,
        lease: Lease,
        reason: String,
    },
}

/// The handle: cloneable, sends to the actor.
#[derive(Debug, Clone)]
pub struct Render {
    tx: mpsc::Sender<RenderMessage>,
}

impl Render {
    /// Starts the actor; reports go to `reports`, and what it renders now (with the samples
    /// and frames done) to `activity`.
    pub fn spawn(
        work_dir: PathBuf,
        blobs: Blobs,
        reports: mpsc::Sender<RenderReport>,
        activity: watch::Sender<Option<Activity>>,
        threads: Option<u32>,
    ) -> Render {
        let (tx, inbox) = mpsc::channel(INBOX);
        let actor = RenderActor {
            work_dir,
            blobs,
            reports,
            activity,
            inbox,
            blender: None,
            threads,
            worker: None,
            next_id: 1,
        };
        tokio::spawn(actor.run());
        Render { tx }
    }

    /// Sends a message; false when the actor has stopped.
    pub async fn send(&self, message: RenderMessage) -> bool {
        self.tx.send(message).await.is_ok()
    }
}

/// The Blender kept for a job.
#[derive(Debug)]
struct JobWorker {
    job: JobId,
    worker: Worker,
}

struct RenderActor {
    work_dir: PathBuf,
    blobs: Blobs,
    reports: mpsc::Sender<RenderReport>,
    activity: watch::Sender<Option<Activity>>,
    inbox: mpsc::Receiver<RenderMessage>,
    blender: Option<PathBuf>,
    /// Blender's render threads (`None`: every core).
    threads: Option<u32>,
    worker: Option<JobWorker>,
    next_id: u64,
}

/// What one task needs from the actor, owned, so the render can run while the actor watches
/// its inbox for a stop.
struct TaskContext {
    blobs: Blobs,
    activity: watch::Sender<Option<Activity>>,
    work_dir: PathBuf,
    blender: Option<PathBuf>,
    threads: Option<u32>,
    id: u64,
}

type Outcome = Result<(BlobHash, TaskStats), String>;

/// Times a task's phases as laps from its grant, and its wall time apart from them.
///
/// Each lap ends at a whole number of milliseconds since the grant, read from one clock, so
/// the laps add up to the time of the last one exactly: rounding each lap on its own would
/// lose up to a millisecond a phase, a fifth of a 25 ms task.
#[derive(Debug)]
struct Stopwatch {
    granted_at: Instant,
    /// Where the last lap ended, in milliseconds since the grant.
    lap_end_ms: u64,
}

impl Stopwatch {
    fn new(granted_at: Instant) -> Stopwatch {
        Stopwatch {
            granted_at,
            lap_end_ms: 0,
        }
    }

    /// Milliseconds since the last lap (or the grant), starting the next lap now.
    fn lap(&mut self) -> u64 {
        let now = self.wall_ms();
        let ms = now.saturating_sub(self.lap_end_ms);
        self.lap_end_ms = self.lap_end_ms.max(now);
        ms
    }

    /// Milliseconds since the grant.
    fn wall_ms(&self) -> u64 {
        u64::try_from(self.granted_at.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

impl RenderActor {
    async fn run(mut self) {
        while let Some(message) = self.inbox.recv().await {
            let (job, spec, task, lease, inputs, granted_at) = match message {
                RenderMessage::SetBlender(path) => {
                    self.blender = path;
                    continue;
                }
                RenderMessage::Stop { .. } => continue, // Nothing runs between tasks.
                RenderMessage::Start {
                    job,
                    spec,
                    task,
                    lease,
                    inputs,
                    granted_at,
                } => (job, spec, task, lease, inputs, granted_at),
            };
            let mut watch = Stopwatch::new(granted_at);
            let wait_ms = watch.lap();
            let context = TaskContext {
                blobs: self.blobs.clone(),
                activity: self.activity.clone(),
                work_dir: self.work_dir.clone(),
                blender: self.blender.clone(),
                threads: self.threads,
                id: self.next_id,
            };
            self.next_id += 1;
            let worker = self.worker.take();
            let render = async {
                let (worker, outcome) = if task.is_merge() {
                    let outcome = run_merge(context, job, &spec, task, inputs, &mut watch).await;
                    (worker, outcome)
                } else {
                    run_task(context, worker, job, spec, task, &mut watch).await
                };
                let outcome = outcome.map(|(result, mut stats)| {
                    stats.wait_ms = wait_ms;
                    stats.wall_ms = watch.wall_ms();
                    (result, stats)
                });
                (worker, outcome)
            };
            tokio::pin!(render);
            // Render, while watching the inbox for a stop of this task. Dropping the render
            // drops its Blender, which kills it.
            let finished = loop {
                tokio::select! {
                    finished = &mut render => break Some(finished),
                    message = self.inbox.recv() => match message {
                        Some(RenderMessage::Stop { job: j, task: t }) if j == job && t == task => {
                            break None;
                        }
                        Some(RenderMessage::SetBlender(path)) => self.blender = path,
                        Some(other) => tracing::warn!(?other, "render message while busy: dropped"),
                        None => break None,
                    },
                }
            };
            self.activity.send_replace(None);
            let Some((worker, outcome)) = finished else {
                tracing::info!(%job, %task, "task stopped; its Blender was killed");
                continue;
            };
            self.worker = worker;
            let report = match outcome {
                Ok((result, stats)) => RenderReport::Finished {
                    job,
                    task,
                    lease,
                    result,
                    stats,
                },
                Err(reason) => {
                    tracing::warn!(%job, %task, %reason, "task failed");
                    RenderReport::Failed {
                        job,
                        task,
                        lease,
                        reason,
                    }
                }
            };
            if self.reports.send(report).await.is_err() {
                break;
            }
        }
        if let Some(old) = self.worker.take() {
            old.worker.quit().await;
        }
    }
}

/// Renders one task, reusing `worker` when it holds this job's scene. Returns the Blender to
/// keep (none after a crash or a failed start) and the outcome.
async fn run_task(
    context: TaskContext,
    worker: Option<JobWorker>,
    job: JobId,
    spec: Arc<JobSpec>,
    task: TaskSpec,
    watch: &mut Stopwatch,
) -> (Option<JobWorker>, Outcome) {
    let Some(blender) = context.blender else {
        return (worker, Err("this peer has no usable Blender".into()));
    };
    let job_dir = context.work_dir.join(job.to_string());
    let (mut kept, fetch_ms, blender_start_ms) = match worker {
        // The job's Blender holds the scene: nothing to fetch or start.
        Some(w) if w.job == job => (w, 0, 0),
        other => {
            if let Some(old) = other {
                old.worker.quit().await;
            }
            let scene = match fetch_scene(&context.blobs, &job_dir, &spec).await {
                Ok(scene) => scene,
                Err(reason) => return (None, Err(reason)),
            };
            let fetch_ms = watch.lap();
            match start_worker(&blender, &scene, &job_dir, &spec, context.threads).await {
                Ok(worker) => (JobWorker { job, worker }, fetch_ms, watch.lap()),
                Err(reason) => return (None, Err(reason)),
            }
        }
    };

    let out_dir = job_dir.join("out").join(format!(
        "f{}+{}-s{}+{}",
        task.frame_start, task.frame_count, task.sample_offset, task.samples
    ));
    let _ = std::fs::remove_dir_all(&out_dir);
    if let Err(e) = std::fs::create_dir_all(&out_dir) {
        return (Some(kept), Err(format!("{}: {e}", out_dir.display())));
    }
    let render_task = RenderTask {
        id: context.id,
        mode: if spec.splits_samples() {
            SliceMode::Slice
        } else {
            SliceMode::Frames
        },
        frames: task.frames().map(|f| f as i32).collect(),
        samples: task.samples,
        frame_samples: spec.samples,
        sample_offset: task.sample_offset,
        output_dir: out_dir.clone(),
        allow_missing: false,
    };
    let started = Instant::now();
    let activity = &context.activity;
    activity.send_replace(Some(Activity {
        job,
        task,
        frames_done: 0,
        samples_done: 0,
    }));
    let rendered = kept
        .worker
        .render(&render_task, |progress| {
            activity.send_modify(|a| {
                if let Some(a) = a {
                    match progress {
                        Progress::Samples { done, .. } => a.samples_done = done,
                        Progress::Frame(_) => {
                            a.frames_done += 1;
                            a.samples_done = 0;
                        }
                    }
                }
            })
        })
        .await;
    write_task_log(&job_dir, &task, started, &rendered, &kept.worker.log_tail());
    let done = match rendered {
        Ok(done) => done,
        Err(e) => {
            // After a crash or a hang the process is gone: the next task starts a new one.
            let dead = matches!(e, RenderError::Crashed { .. } | RenderError::Hung(_));
            return ((!dead).then_some(kept), Err(e.to_string()));
        }
    };
    // Measured here rather than taken from Blender (`done.render_ms`, inside its Python), so
    // that the phases add up to the task's wall time.
    let render_ms = watch.lap();
    let imported = context.blobs.add(vec![out_dir.clone()]).await;
    let _ = std::fs::remove_dir_all(&out_dir);
    let result = imported
        .map_err(|e| format!("storing the result: {e}"))
        .and_then(|view| {
            view.hash
                .parse::<BlobHash>()
                .map_err(|e| format!("storing the result: {e}"))
        });
    let stats = TaskStats {
        render_ms,
        samples: task.samples,
        blender_start_ms,
        fetch_ms,
        upload_ms: watch.lap(),
        inexact: done.inexact,
        denoise: kept.worker.ready().denoise,
        peak_memory_bytes: kept.worker.peak_memory_bytes().unwrap_or(0),
        ..TaskStats::default()
    };
    (Some(kept), result.map(|hash| (hash, stats)))
}

/// The file a task's log is kept in.
pub fn task_log_path(job_dir: &Path, task: &TaskSpec) -> PathBuf {
    let name = if task.is_merge() {
        format!("merge-f{}.log", task.frame_start)
    } else {
        format!(
            "f{}+{}-s{}+{}.log",
            task.frame_start, task.frame_count, task.sample_offset, task.samples
        )
    };
    job_dir.join("logs").join(name)
}

/// Keeps what happened to a task, with Blender's last lines, in `<job_dir>/logs/`.
fn write_task_log(
    job_dir: &Path,
    task: &TaskSpec,
    started: Instant,
    outcome: &Result<blendnet_render::Done, RenderError>,
    blender_log: &str,
) {
    let result = match outcome {
        Ok(done) => format!(
            "done in {} ms: {} output(s)",
            done.render_ms,
            done.outputs.len()
        ),
        Err(e) => format!("failed: {e}"),
    };
    write_log(job_dir, task, started, &result, blender_log);
}

fn write_log(job_dir: &Path, task: &TaskSpec, started: Instant, result: &str, blender_log: &str) {
    let path = task_log_path(job_dir, task);
    let text = format!(
        "{task}\n{result} ({:.1} s in all)\n--- Blender's last lines ---\n{blender_log}\n",
        started.elapsed().as_secs_f64()
    );
    let written =
        std::fs::create_dir_all(job_dir.join("logs")).and_then(|()| std::fs::write(&path, text));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot keep the task's log");
    }
}

/// Fetches the job's scene into `<job_dir>/scene`; returns the path of its `.blend`.
async fn fetch_scene(blobs: &Blobs, job_dir: &Path, spec: &JobSpec) -> Result<PathBuf, String> {
    let scene_dir = job_dir.join("scene");
    blobs
        .get(spec.scene, scene_dir.clone(), None)
        .await
        .map_err(|e| format!("fetching the scene: {e}"))?;
    // The spec's path was checked to be relative and inside the manifest when it was accepted;
    // check again here, where it meets the disk.
    let relative = Path::new(&spec.blend_path);
    if relative.is_absolute()
        || relative
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "the scene path {:?} is not a plain relative path",
            spec.blend_path
        ));
    }
    Ok(scene_dir.join(relative))
}

/// Where a frame's merge works: its slices and the merged EXR.
fn merge_dir(job_dir: &Path, frame: u32) -> PathBuf {
    job_dir.join("merge").join(format!("frame_{frame:06}"))
}

/// Merges a frame's slices and finishes it into the scene's output file; returns a manifest of
/// that file.
async fn run_merge(
    context: TaskContext,
    job: JobId,
    spec: &JobSpec,
    task: TaskSpec,
    inputs: Vec<BlobHash>,
    watch: &mut Stopwatch,
) -> Outcome {
    let Some(blender) = context.blender else {
        return Err("this peer has no usable Blender".into());
    };
    let started = Instant::now();
    let mut stats = TaskStats::default();
    context.activity.send_replace(Some(Activity {
        job,
        task,
        frames_done: 0,
        samples_done: 0,
    }));
    let job_dir = context.work_dir.join(job.to_string());
    let frame = task.frame_start;
    let dir = merge_dir(&job_dir, frame);
    let outcome = async {
        let scene = fetch_scene(&context.blobs, &job_dir, spec).await?;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let name = format!("frame_{frame:06}.exr");
        let mut slices = Vec::with_capacity(inputs.len());
        for (i, hash) in inputs.iter().enumerate() {
            let slice_dir = dir.join(format!("slice_{i:04}"));
            context
                .blobs
                .get(*hash, slice_dir.clone(), None)
                .await
                .map_err(|e| format!("fetching slice {hash}: {e}"))?;
            slices.push(slice_dir.join(&name));
        }
        stats.fetch_ms = watch.lap();
        let merged = dir.join("merged.exr");
        let target = merged.clone();
        let report = tokio::task::spawn_blocking(move || {
            blendnet_exr::merge(&slices, &target, &Default::default())
        })
        .await
        .map_err(|e| format!("merging: {e}"))?
        .map_err(|e| format!("merging: {e}"))?;
        if let Some(layer) = report
            .layers
            .iter()
            .find(|l| l.samples != u64::from(task.samples))
        {
            return Err(format!(
                "the slices of frame {frame} add up to {} samples in {}, not {}",
                layer.samples, layer.name, task.samples
            ));
        }
        let out_dir = dir.join("out");
        tokio::fs::create_dir_all(&out_dir)
            .await
            .map_err(|e| format!("{}: {e}", out_dir.display()))?;
        let frame_number =
            i32::try_from(frame).map_err(|_| format!("frame {frame} is too large"))?;
        blendnet_render::finish(&blender, &scene, &merged, frame_number, &out_dir)
            .await
            .map_err(|e| e.to_string())?;
        stats.merge_ms = watch.lap();
        let view = context
            .blobs
            .add(vec![out_dir])
            .await
            .map_err(|e| format!("storing the finished frame: {e}"))?;
        // The slices and the finished file are in the store; the merged EXR (as large as a
        // slice) is not needed any more.
        let _ = tokio::fs::remove_dir_all(&dir).await;
        let hash = view
            .hash
            .parse::<BlobHash>()
            .map_err(|e| format!("storing the finished frame: {e}"))?;
        stats.upload_ms = watch.lap();
        Ok(hash)
    }
    .await;
    let log = match &outcome {
        Ok(_) => format!("merged {} slices and finished the frame", inputs.len()),
        Err(e) => format!("failed: {e}"),
    };
    write_log(&job_dir, &task, started, &log, "");
    // The log was written after the upload lap: it joins it, so the phases stay gapless.
    stats.upload_ms += watch.lap();
    outcome.map(|hash| (hash, stats))
}

/// Starts Blender on the job's scene (fetched into `<job_dir>/scene` already).
async fn start_worker(
    blender: &Path,
    scene: &Path,
    job_dir: &Path,
    spec: &JobSpec,
    threads: Option<u32>,
) -> Result<Worker, String> {
    let worker = Worker::start_with_threads(blender, scene, job_dir, threads)
        .await
        .map_err(|e| e.to_string())?;
    let found = worker.ready().blender.clone();
    if !spec.blender_matches(Some(&found)) {
        worker.quit().await;
        return Err(format!(
            "Blender version mismatch: the scene needs Blender {}, this peer has {found}",
            spec.blender.as_deref().unwrap_or("-")
        ));
    }
    Ok(worker)
}
