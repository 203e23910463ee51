//! One Blender process with a scene loaded, rendering tasks one at a time.
//!
//! Two reader tasks drain Blender's stdout and stderr: reply lines go to the [`Worker`] on a
//! bounded channel; every other line goes into a ring of the last [`LOG_LINES`] lines (shown
//! when Blender crashes) and counts as a sign of life. A render that shows no sign of life for
//! the hang limit is killed. Dropping a [`Worker`] kills its Blender.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::protocol::{ErrorKind, MAX_REPLY_BYTES, Ready, RenderTask, Reply, Request};
use crate::scratch::{Scratch, TMPDIR};

/// Blender log lines kept for a crash report: enough for a traceback or an allocator's last
/// words, few enough to show in a task's error.
pub const LOG_LINES: usize = 40;

/// How long Blender may take to load a scene. A large scene on a slow disk takes a minute; a
/// Blender that takes longer is stuck.
pub const START_TIMEOUT: Duration = Duration::from_secs(180);

/// How long a render may run without Blender printing anything before it counts as hung.
/// Cycles prints a line per sample or tile, so even a heavy frame is far from this.
pub const HANG_AFTER: Duration = Duration::from_secs(600);

/// How long a worker asked to quit may take before it is killed.
const QUIT_GRACE: Duration = Duration::from_secs(5);

/// Replies waiting to be read: a task sends a handful; the reader waits when it is full.
const REPLY_QUEUE: usize = 64;

/// How often a waiting render checks for signs of life.
const LIVENESS_TICK: Duration = Duration::from_secs(1);

/// The file the worker script is written to, in the worker's directory.
const SCRIPT_NAME: &str = ".blendnet-worker.py";
/// The collection code, beside the worker script (the module name worker.py imports).
const COLLECT_MODULE: &str = "blendnet_collect.py";

/// What a render reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Cycles' count of samples done in the current frame, from Blender's own log line
    /// (`… | Sample 5/16`); best effort, as the format varies between versions.
    Samples { done: u32, total: u32 },
    /// A frame was written.
    Frame(i32),
}

/// What the stdout reader hands the worker.
#[derive(Debug)]
enum Output {
    Reply(Result<Reply, String>),
    Samples { done: u32, total: u32 },
}

/// The `done/total` of a Cycles progress line such as
/// `Fra:1 Mem:14.49M (Peak 14.84M) | Time:00:00.14 | … | ViewLayer | Sample 5/16`.
fn parse_samples(line: &str) -> Option<(u32, u32)> {
    let rest = &line[line.rfind("| Sample ")? + "| Sample ".len()..];
    let (done, total) = rest.split_once('/')?;
    let total: String = total.chars().take_while(char::is_ascii_digit).collect();
    Some((done.trim().parse().ok()?, total.parse().ok()?))
}

/// A finished task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Done {
    /// The files written, one per frame, in the task's order (see
    /// [`SliceMode`](crate::SliceMode) for their format and names).
    pub outputs: Vec<PathBuf>,
    /// Render time measured inside Blender.
    pub render_ms: u64,
    /// The slice's samples are not exactly a single render's: this Blender has no
    /// `sample_offset`, or its sampling pattern depends on the sample count.
    pub inexact: bool,
}

/// Why a worker could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot write the worker script to {path}")]
    Script {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start Blender {blender}")]
    Spawn {
        blender: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Blender could not read the file (corrupt, truncated, not a `.blend`, or from a newer
    /// Blender).
    #[error("Blender cannot read {scene}: {reason}")]
    Unreadable { scene: PathBuf, reason: String },
    #[error("Blender exited ({status}) before loading {scene}; its last lines:\n{log}")]
    Exited {
        scene: PathBuf,
        status: String,
        log: String,
    },
    #[error("Blender did not load {scene} within {} s", START_TIMEOUT.as_secs())]
    Timeout { scene: PathBuf },
    #[error("the worker script inside Blender misbehaved: {0}")]
    Protocol(String),
}

/// Why a task failed.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The script named the problem (no camera, missing files, no denoiser, …).
    #[error("{message}")]
    Scene {
        kind: ErrorKind,
        message: String,
        /// The missing files, for [`ErrorKind::MissingFiles`].
        files: Vec<String>,
    },
    #[error("Blender crashed ({status}); its last lines:\n{log}")]
    Crashed { status: String, log: String },
    #[error("Blender printed nothing for {} s and was killed", .0.as_secs())]
    Hung(Duration),
    #[error("the worker script inside Blender misbehaved: {0}")]
    Protocol(String),
    #[error("cannot send the task to Blender")]
    Send(#[source] std::io::Error),
}

impl RenderError {
    /// The kind of failure, as the job's status names it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RenderError::Scene { kind, .. } => *kind,
            RenderError::Crashed { .. } | RenderError::Hung(_) => ErrorKind::RenderFailed,
            RenderError::Protocol(_) | RenderError::Send(_) => ErrorKind::RenderFailed,
        }
    }
}

/// What the reader tasks share with the worker.
#[derive(Debug, Default)]
struct Shared {
    log: Mutex<VecDeque<String>>,
    /// Milliseconds after `started` of the last line Blender printed.
    last_output_ms: AtomicU64,
}

/// A Blender process with a scene loaded. Not `Clone`: one owner sends it tasks.
#[derive(Debug)]
pub struct Worker {
    child: Child,
    /// Blender's temporary folder; declared after `child`, so removed after it is killed.
    _scratch: Scratch,
    stdin: ChildStdin,
    replies: mpsc::Receiver<Output>,
    shared: Arc<Shared>,
    started: Instant,
    ready: Ready,
    hang_after: Duration,
}

impl Worker {
    /// Starts `blender` on `scene` in `dir` (an existing directory; the script is written
    /// there) and waits until the scene is loaded. Cancel-safe: a dropped start kills Blender.
    pub async fn start(blender: &Path, scene: &Path, dir: &Path) -> Result<Worker, StartError> {
        Worker::start_with_threads(blender, scene, dir, None).await
    }

    /// [`Worker::start`], rendering with `threads` threads (Blender's `-t`; `None`: every
    /// core).
    pub async fn start_with_threads(
        blender: &Path,
        scene: &Path,
        dir: &Path,
        threads: Option<u32>,
    ) -> Result<Worker, StartError> {
        let script = dir.join(SCRIPT_NAME);
        // The worker checks the scene's files with the submitting side's collection code,
        // which it imports from beside itself.
        for (path, text) in [
            (script.clone(), crate::WORKER_PY),
            (dir.join(COLLECT_MODULE), crate::collect::COLLECT_PY),
        ] {
            tokio::fs::write(&path, text)
                .await
                .map_err(|source| StartError::Script { path, source })?;
        }
        let spawn_error = |source| StartError::Spawn {
            blender: blender.to_owned(),
            source,
        };
        let scratch = Scratch::new_in(dir).map_err(spawn_error)?;
        let mut command = Command::new(blender);
        command
            .env(TMPDIR, scratch.path())
            .arg("--factory-startup")
            .arg("-b")
            .arg("-Y")
            .arg(scene);
        if let Some(threads) = threads {
            command.arg("-t").arg(threads.to_string());
        }
        let mut child = command
            .arg("-P")
            .arg(&script)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            unreachable!("all three pipes were asked for");
        };
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let (tx, mut replies) = mpsc::channel(REPLY_QUEUE);
        tokio::spawn(read_lines(stdout, Some(tx), shared.clone(), started));
        tokio::spawn(read_lines(stderr, None, shared.clone(), started));

        let first = async {
            loop {
                match replies.recv().await {
                    Some(Output::Samples { .. }) => continue,
                    Some(Output::Reply(reply)) => return Some(reply),
                    None => return None,
                }
            }
        };
        let first = tokio::time::timeout(START_TIMEOUT, first).await;
        let ready = match first {
            Err(_) => {
                return Err(StartError::Timeout {
                    scene: scene.to_owned(),
                });
            }
            Ok(Some(Ok(Reply::Ready(ready)))) => ready,
            Ok(Some(Ok(Reply::Error { message, .. }))) => {
                return Err(StartError::Unreadable {
                    scene: scene.to_owned(),
                    reason: message,
                });
            }
            Ok(Some(Ok(other))) => {
                return Err(StartError::Protocol(format!(
                    "expected ready, got {other:?}"
                )));
            }
            Ok(Some(Err(bad))) => return Err(StartError::Protocol(bad)),
            Ok(None) => {
                let status = exit_status(&mut child).await;
                // Blender names a file it cannot read on one line, then quits.
                let reason = {
                    let log = shared.log.lock().unwrap_or_else(PoisonError::into_inner);
                    log.iter()
                        .find(|l| l.starts_with("Error:") && l.contains(".blend"))
                        .cloned()
                };
                if let Some(reason) = reason {
                    return Err(StartError::Unreadable {
                        scene: scene.to_owned(),
                        reason,
                    });
                }
                return Err(StartError::Exited {
                    scene: scene.to_owned(),
                    status,
                    log: last_lines(&shared),
                });
            }
        };
        tracing::debug!(blender = %ready.blender, scene = %scene.display(), "worker ready");
        Ok(Worker {
            child,
            _scratch: scratch,
            stdin,
            replies,
            shared,
            started,
            ready,
            hang_after: HANG_AFTER,
        })
    }

    /// What the script found when it loaded the scene.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// Sets how long a render may go without output before it counts as hung.
    pub fn set_hang_after(&mut self, limit: Duration) {
        self.hang_after = limit;
    }

    /// Renders `task`, calling `on_progress` as samples and frames are done. Not cancel-safe: if this
    /// future is dropped, Blender may still be rendering; [`kill`](Worker::kill) it.
    /// After [`RenderError::Crashed`] or [`RenderError::Hung`] the worker is dead: start
    /// another.
    pub async fn render(
        &mut self,
        task: &RenderTask,
        mut on_progress: impl FnMut(Progress),
    ) -> Result<Done, RenderError> {
        let mut line = serde_json::to_string(&Request::Render(task.clone()))
            .map_err(|e| RenderError::Protocol(e.to_string()))?;
        line.push('\n');
        self.touch();
        if let Err(e) = self.send(&line).await {
            return Err(self.crashed_or(RenderError::Send(e)).await);
        }
        loop {
            let reply = match tokio::time::timeout(LIVENESS_TICK, self.replies.recv()).await {
                Err(_) => {
                    if self.silent_for() > self.hang_after {
                        self.kill().await;
                        return Err(RenderError::Hung(self.hang_after));
                    }
                    continue;
                }
                Ok(None) => {
                    let status = exit_status(&mut self.child).await;
                    return Err(RenderError::Crashed {
                        status,
                        log: last_lines(&self.shared),
                    });
                }
                Ok(Some(Output::Samples { done, total })) => {
                    on_progress(Progress::Samples { done, total });
                    continue;
                }
                Ok(Some(Output::Reply(Err(bad)))) => return Err(RenderError::Protocol(bad)),
                Ok(Some(Output::Reply(Ok(reply)))) => reply,
            };
            match reply {
                Reply::Started { .. } => {}
                Reply::Progress { id, frame } if id == task.id => {
                    on_progress(Progress::Frame(frame))
                }
                Reply::Done {
                    id,
                    outputs,
                    render_ms,
                    inexact,
                } if id == task.id => {
                    return Ok(Done {
                        outputs,
                        render_ms,
                        inexact,
                    });
                }
                Reply::Error {
                    kind,
                    message,
                    files,
                    ..
                } => {
                    return Err(RenderError::Scene {
                        kind,
                        message,
                        files,
                    });
                }
                other => {
                    return Err(RenderError::Protocol(format!(
                        "unexpected reply during task {}: {other:?}",
                        task.id
                    )));
                }
            }
        }
    }

    /// Kills Blender now and waits for it to exit (cancellation: within a second or so).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Asks Blender to quit, and kills it if it has not within a few seconds.
    pub async fn quit(mut self) {
        let asked = self.send("{\"quit\":{}}\n").await.is_ok();
        if !asked
            || tokio::time::timeout(QUIT_GRACE, self.child.wait())
                .await
                .is_err()
        {
            self.kill().await;
        }
    }

    /// Blender's last lines of output (its own log, not the replies), oldest first.
    pub fn log_tail(&self) -> String {
        last_lines(&self.shared)
    }

    /// Blender's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Blender's peak resident memory so far, where the system tells it (Linux: `VmHWM` in
    /// `/proc/PID/status`).
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        vm_hwm_bytes(&status)
    }

    async fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await
    }

    /// When writing to Blender failed, the likely cause is that it died: say that instead.
    async fn crashed_or(&mut self, error: RenderError) -> RenderError {
        match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
            Ok(Ok(status)) => RenderError::Crashed {
                status: describe(status),
                log: last_lines(&self.shared),
            },
            _ => error,
        }
    }

    fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.shared.last_output_ms.store(now, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = self.shared.last_output_ms.load(Ordering::Relaxed);
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// Reads lines until the pipe closes: replies to `replies` (stdout only), the rest to the log.
async fn read_lines(
    pipe: impl AsyncRead + Unpin,
    replies: Option<mpsc::Sender<Output>>,
    shared: Arc<Shared>,
    started: Instant,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a line longer than the limit is cut (and then cannot be a valid reply).
        let mut limited = (&mut reader).take(MAX_REPLY_BYTES as u64);
        match limited.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let now = started.elapsed().as_millis() as u64;
        shared.last_output_ms.store(now, Ordering::Relaxed);
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(tx) = &replies {
            let output = match Reply::parse(line) {
                Some(reply) => Some(Output::Reply(reply)),
                None => parse_samples(line).map(|(done, total)| Output::Samples { done, total }),
            };
            if let Some(output) = output {
                let is_reply = matches!(output, Output::Reply(_));
                // Sample counts are dropped rather than waited for when the queue is full.
                let sent = if is_reply {
                    tx.send(output).await.is_ok()
                } else {
                    !matches!(
                        tx.try_send(output),
                        Err(mpsc::error::TrySendError::Closed(_))
                    )
                };
                if !sent {
                    return;
                }
                if is_reply {
                    continue;
                }
            }
        }
        let mut log = shared.log.lock().unwrap_or_else(PoisonError::into_inner);
        if log.len() == LOG_LINES {
            log.pop_front();
        }
        log.push_back(line.to_owned());
    }
}

fn last_lines(shared: &Shared) -> String {
    let log = shared.log.lock().unwrap_or_else(PoisonError::into_inner);
    log.iter().cloned().collect::<Vec<_>>().join("\n")
}

/// The `VmHWM` line of a `/proc/PID/status`, in bytes.
fn vm_hwm_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib = line.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?;
    Some(kib * 1024)
}

async fn exit_status(child: &mut Child) -> String {
    match tokio::time::timeout(QUIT_GRACE, child.wait()).await {
        Ok(Ok(status)) => describe(status),
        Ok(Err(e)) => format!("exit status unknown: {e}"),
        Err(_) => "still running after closing its output".into(),
    }
}

fn describe(status: ExitStatus) -> String {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(signal) = status.signal() {
            let hint = if signal == 9 {
                " (killed: often the system running out of memory)"
            } else {
                ""
            };
            return format!("signal {signal}{hint}");
        }
    }
    status.to_string()
}

#[cfg(test)]
mod tests {
    use super::{parse_samples, vm_hwm_bytes};

    #[test]
    fn peak_memory_is_read_from_proc_status() {
        let status = "Name:\tblender\nVmPeak:\t 2000000 kB\nVmHWM:\t  312448 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(vm_hwm_bytes(status), Some(312_448 * 1024));
        assert_eq!(vm_hwm_bytes("Name:\tblender\n"), None);
        assert_eq!(vm_hwm_bytes("VmHWM:\t lots kB\n"), None);
    }

    #[test]
    fn sample_counts_are_read_from_cycles_progress_lines() {
        let line = "Fra:1 Mem:14.49M (Peak 14.84M) | Time:00:00.14 | Mem:0.00M, Peak:0.00M | \
                    Scene, ViewLayer | Sample 5/16";
        assert_eq!(parse_samples(line), Some((5, 16)));
        assert_eq!(
            parse_samples("Fra:1 | Sample 16/16 Denoising"),
            Some((16, 16))
        );
        assert_eq!(
            parse_samples("Fra:1 Mem:1M | Synchronizing object | Cube"),
            None
        );
        assert_eq!(parse_samples("| Sample x/16"), None);
    }
}
