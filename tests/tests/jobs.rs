//! No manager, nothing lost: real daemons on loopback run jobs while their processes are
//! killed, with a renderer of known duration (`tests/fake-blender/blender`, test code that
//! speaks the worker protocol in place of Blender).
//!
//! The stand-in logs every task it renders to a file the test reads, so the tests can say not
//! only that a job finished but which work was done twice.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use blendnet_tests::{MESH_ONLINE_WITHIN, Node, e2e, eventually, online_peers, serve_http};
use serde_json::Value;

/// The renderer of known duration.
const FAKE_BLENDER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fake-blender/blender");
/// A job of the sizes used here finishes well within this on a loaded 2-core machine, even
/// after a takeover (3 s) and the lapse of a dead worker's lease (30 s).
const JOB_WITHIN: Duration = Duration::from_secs(150);

/// Nodes a, b, … joined by invite, all rendering with the stand-in, all online.
fn mesh(members: usize) -> Result<Vec<Node>> {
    let names = ["a", "b", "c", "d", "e"];
    blendnet_tests::mesh(&names[..=members], &["--blender", FAKE_BLENDER])
}

/// A "scene" for the stand-in, added to `node`'s store; returns its manifest hash and the
/// path of the render log.
fn scene(node: &Node, ms_per_sample: u32) -> Result<(String, PathBuf)> {
    let dir = node.data_dir().with_file_name("scene");
    fs::create_dir_all(&dir)?;
    let log = node.data_dir().with_file_name("renders.log");
    let config = serde_json::json!({ "ms_per_sample": ms_per_sample, "log": log });
    fs::write(dir.join("scene.blend"), config.to_string())?;
    let hash = node.cli_ok(&["store", "add", dir.to_str().context("path")?])?;
    Ok((hash.trim().to_owned(), log))
}

/// Submits from `node`; returns the job id.
fn submit(node: &Node, hash: &str, frames: &str, samples: u32, split: &str) -> Result<String> {
    let samples = samples.to_string();
    let args = [
        "submit",
        hash,
        "--blend",
        "scene.blend",
        "--frames",
        frames,
        "--samples",
        &samples,
        "--split",
        split,
    ];
    let out = node.cli_ok(&args)?;
    Ok(out.trim().to_owned())
}

/// `status JOB --json` on `node`.
fn job(node: &Node, id: &str) -> Result<Value> {
    node.cli_json(&["status", id, "--json"])
}

/// The job's state as one word (`Active`, `Done`, `Cancelled`, `Failed`).
fn state(view: &Value) -> String {
    match &view["summary"]["status"] {
        Value::String(s) => s.clone(),
        Value::Object(map) => map.keys().next().cloned().unwrap_or_default(),
        _ => String::new(),
    }
}

/// Frame-samples done, out of all.
fn progress(view: &Value) -> (u64, u64) {
    let n = |k: &str| view["summary"][k].as_u64().unwrap_or(0);
    (n("done_units"), n("total_units"))
}

/// The coordinator's (epoch, peer id), if any.
fn coordinator(view: &Value) -> Option<(u64, String)> {
    let c = view["summary"]["coordinator"].as_array()?;
    Some((c.first()?.as_u64()?, c.get(1)?.as_str()?.to_owned()))
}

/// Waits until `node` reports the job done.
fn wait_done(node: &Node, id: &str, within: Duration) -> Result<Value> {
    eventually(within, Duration::from_millis(500), || {
        let view = job(node, id)?;
        ensure!(
            state(&view) == "Done",
            "job is {} at {:?}",
            state(&view),
            progress(&view)
        );
        Ok(view)
    })
}

/// Listens to `node`'s `GET /v1/events` on a thread; the returned channel yields each job id
/// the stream names.
fn job_events(node: &Node) -> Result<std::sync::mpsc::Receiver<String>> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(node.api_addr()?)?;
    write!(
        stream,
        "GET /v1/events HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        node.api_token()?
    )?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            if let Some(data) = line.strip_prefix("data: ")
                && let Ok(change) = serde_json::from_str::<Value>(data)
                && let Some(job) = change["job"].as_str()
                && tx.send(job.to_owned()).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// Every render the stand-in logged: (first frame, frames, sample offset, samples) → count.
fn renders(log: &Path) -> Result<BTreeMap<(u32, u32, u32, u32), u32>> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<u32> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad log line {line:?}"))?;
        ensure!(f.len() == 4, "bad log line {line:?}");
        *out.entry((f[0], f[1], f[2], f[3])).or_default() += 1;
    }
    Ok(out)
}

/// Every frame of `frames` rendered whole, as the job's done tasks say.
fn covered_frames(view: &Value) -> Vec<u64> {
    let mut frames = Vec::new();
    for task in view["tasks"].as_array().into_iter().flatten() {
        let done = task["state"].get("Done").is_some();
        if done && task["in_cover"].as_bool() == Some(true) {
            let start = task["task"]["frame_start"].as_u64().unwrap_or(0);
            let count = task["task"]["frame_count"].as_u64().unwrap_or(0);
            frames.extend(start..start + count);
        }
    }
    frames.sort_unstable();
    frames
}

#[test]
fn a_job_is_rendered_across_the_mesh_and_every_frame_once() {
    e2e(|| {
        let nodes = mesh(2)?;
        let (hash, log) = scene(&nodes[0], 2)?;
        // A peer that did not submit hears of the job's changes on its event stream.
        let events = job_events(&nodes[2])?;
        // 12 frames of 100 samples at 2 ms a sample: 0.2 s a task.
        let id = submit(&nodes[0], &hash, "1-12", 100, "frames")?;
        let view = wait_done(&nodes[0], &id, JOB_WITHIN)?;
        let heard = events
            .recv_timeout(Duration::from_secs(30))
            .context("no job change on the event stream")?;
        assert_eq!(heard, id);
        assert_eq!(covered_frames(&view), (1..=12).collect::<Vec<_>>());
        assert_eq!(progress(&view), (1200, 1200));
        // Every peer converged on the same outcome.
        for node in &nodes[1..] {
            wait_done(node, &id, Duration::from_secs(30))?;
        }
        let rendered = renders(&log)?;
        let frames: u32 = rendered.keys().map(|k| k.1).sum();
        assert!(
            frames >= 12,
            "the stand-in rendered only {frames} frames: {rendered:?}"
        );
        // Nobody died: the only extra work allowed is a straggler's backup copy.
        let twice: Vec<_> = rendered.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.len() <= 2, "tasks rendered more than once: {twice:?}");

        // A scene made with another Blender is left alone, and `status` says why.
        let renders_before = renders(&log)?.values().sum::<u32>();
        let out = nodes[0].cli_ok(&[
            "submit",
            &hash,
            "--blend",
            "scene.blend",
            "--frames",
            "1-2",
            "--samples",
            "10",
            "--blender-version",
            "9.9",
        ])?;
        let other = out.trim();
        std::thread::sleep(Duration::from_secs(3));
        let text = nodes[0].cli_ok(&["status", other])?;
        assert!(text.contains("no online peer has Blender 9.9"), "{text}");
        assert_eq!(state(&job(&nodes[0], other)?), "Active");
        assert_eq!(
            renders(&log)?.values().sum::<u32>(),
            renders_before,
            "nothing rendered it"
        );
        Ok(())
    });
}

#[test]
fn killing_the_coordinator_hands_the_job_over_and_it_completes() {
    e2e(|| {
        let mut nodes = mesh(2)?;
        let (hash, log) = scene(&nodes[0], 10)?;
        // 60 frames of 100 samples at 10 ms a sample: 1 s a task, about 20 s on three peers,
        // so the kill below lands mid-job.
        let id = submit(&nodes[0], &hash, "1-60", 100, "frames")?;
        let a = nodes[0].peer_id()?;
        // The submitter coordinates first; kill it once some work is done.
        eventually(Duration::from_secs(60), Duration::from_millis(200), || {
            let view = job(&nodes[1], &id)?;
            ensure!(
                coordinator(&view).is_some_and(|(_, p)| p == a),
                "{:?}",
                coordinator(&view)
            );
            let (done, total) = progress(&view);
            ensure!(done >= 200, "progress {done}/{total}");
            // Ten tasks or more must be left for the new coordinator to grant; a loaded
            // machine can be slow to show the first progress, so not much more is asked.
            assert!(
                done + 1000 <= total,
                "the job got to {done}/{total} before the kill"
            );
            Ok(())
        })?;
        let killed_at = Instant::now();
        nodes[0].kill()?;
        // While it renders, every peer's status shows what the others render, samples too
        // (checked after the kill, so that a slow check never lets the job finish first).
        eventually(Duration::from_secs(30), Duration::from_millis(200), || {
            let peers = nodes[1].peers()?;
            let busy = peers.as_array().into_iter().flatten().any(|p| {
                p["is_self"] == false
                    && p["rendering"]["job"] == id.as_str()
                    && p["rendering"]["samples_done"]
                        .as_u64()
                        .is_some_and(|n| n > 0)
            });
            ensure!(busy, "no peer shows progress on {id}: {peers}");
            Ok(())
        })?;
        let view = wait_done(&nodes[1], &id, JOB_WITHIN)?;
        let (epoch, peer) = coordinator(&view).context("no coordinator")?;
        assert!(
            epoch >= 2,
            "the job finished in epoch {epoch}: nobody took over"
        );
        assert_ne!(peer, a, "the dead submitter still coordinates");
        assert_eq!(covered_frames(&view), (1..=60).collect::<Vec<_>>());
        wait_done(&nodes[2], &id, Duration::from_secs(30))?;
        eprintln!(
            "job done {:.1} s after the coordinator was killed",
            killed_at.elapsed().as_secs_f64()
        );
        let rendered = renders(&log)?;
        let frames: u32 = rendered.keys().map(|k| k.1).sum();
        assert!(frames >= 60, "rendered {rendered:?}");
        Ok(())
    });
}

#[test]
fn killing_every_peer_and_restarting_them_resumes_the_job() {
    e2e(|| {
        let mut nodes = mesh(2)?;
        let (hash, log) = scene(&nodes[0], 10)?;
        let id = submit(&nodes[0], &hash, "1-18", 100, "frames")?;
        eventually(Duration::from_secs(60), Duration::from_millis(200), || {
            let (done, _) = progress(&job(&nodes[0], &id)?);
            ensure!(done >= 300, "done {done}");
            Ok(())
        })?;
        for node in nodes.iter_mut() {
            node.kill()?;
        }
        let before = renders(&log)?;
        // What was done when everything died (the log may hold a task or two rendered after
        // the last state the board committed; those may be rendered again).
        for node in nodes.iter_mut() {
            node.start_again()?;
        }
        let view = wait_done(&nodes[0], &id, JOB_WITHIN)?;
        assert_eq!(covered_frames(&view), (1..=18).collect::<Vec<_>>());
        let after = renders(&log)?;
        let redone: Vec<_> = before.keys().filter(|k| after[*k] > before[*k]).collect();
        // Only work that was in flight (at most one task per peer) or finished but not yet
        // replicated when the peers died is rendered again.
        assert!(
            redone.len() <= 2 * nodes.len(),
            "{} tasks finished before the kill were rendered again: {redone:?}",
            redone.len()
        );
        Ok(())
    });
}

/// A cloud metadata server on loopback for both clouds: AWS's IMDSv2 (a session token, then
/// `spot/instance-action`, 404 until the notice) and GCP's `instance/preempted` (`FALSE` until
/// the notice; only with `Metadata-Flavor: Google`).
struct FakeMetadata {
    addr: std::net::SocketAddr,
    notice: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FakeMetadata {
    fn start() -> Result<FakeMetadata> {
        use std::sync::atomic::Ordering;
        let notice = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = notice.clone();
        let addr = serve_http(move |r| {
            let noticed = flag.load(Ordering::SeqCst);
            let (status, body) = match (r.method.as_str(), r.path.as_str()) {
                ("PUT", "/latest/api/token")
                    if r.has_header("x-aws-ec2-metadata-token-ttl-seconds") =>
                {
                    ("200 OK", "imds-token")
                }
                ("GET", "/latest/meta-data/spot/instance-action")
                    if !r.has("x-aws-ec2-metadata-token: imds-token") =>
                {
                    ("401 Unauthorized", "")
                }
                ("GET", "/latest/meta-data/spot/instance-action") if noticed => (
                    "200 OK",
                    r#"{"action":"terminate","time":"2026-11-26T12:00:00Z"}"#,
                ),
                ("GET", "/computeMetadata/v1/instance/preempted")
                    if !r.has("metadata-flavor: google") =>
                {
                    ("403 Forbidden", "Metadata-Flavor: Google is required")
                }
                ("GET", "/computeMetadata/v1/instance/preempted") => {
                    ("200 OK", if noticed { "TRUE" } else { "FALSE" })
                }
                _ => ("404 Not Found", ""),
            };
            (status, body.to_owned())
        })?;
        Ok(FakeMetadata { addr, notice })
    }

    fn preempt(&self) {
        self.notice.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[test]
fn a_preemption_notice_hands_the_running_task_back_and_the_job_completes() {
    e2e(|| {
        let metadata = FakeMetadata::start()?;
        let (mut a, _) = Node::init("a")?;
        a.up(&["--blender", FAKE_BLENDER])?;
        // b watches AWS's notices, c GCP's, both at the fake.
        let mut spot = Vec::new();
        for (name, cloud, var, value) in [
            (
                "b",
                "aws",
                "AWS_EC2_METADATA_SERVICE_ENDPOINT",
                format!("http://{}", metadata.addr),
            ),
            ("c", "gcp", "GCE_METADATA_HOST", metadata.addr.to_string()),
        ] {
            let mut node = Node::new(name)?;
            node.cli_ok(&["join", &a.invite(&[])?])?;
            node.set_env(var, &value);
            node.up(&["--blender", FAKE_BLENDER, "--preemption", cloud])?;
            spot.push(node);
        }
        let ids: Vec<String> = spot.iter().map(Node::peer_id).collect::<Result<_>>()?;
        // Submit once all are online to each other, so that the job's gossip reaches them.
        eventually(MESH_ONLINE_WITHIN, Duration::from_millis(250), || {
            for node in std::iter::once(&a).chain(&spot) {
                let online = online_peers(&node.peers()?)?;
                ensure!(online.len() == 2, "{} sees {online:?}", node.name());
            }
            Ok(())
        })?;
        // 12 frames of 200 samples at 20 ms a sample: 4 s a task.
        let (hash, _log) = scene(&a, 20)?;
        let id = submit(&a, &hash, "1-12", 200, "frames")?;
        // Preempt both spot peers while each renders a task.
        let held = eventually(Duration::from_secs(60), Duration::from_millis(100), || {
            let peers = a.peers()?;
            let mut held = Vec::new();
            for peer in &ids {
                let view = peers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|p| p["peer_id"] == peer.as_str())
                    .context("peer missing")?;
                ensure!(
                    view["rendering"]["job"] == id.as_str(),
                    "{peer} renders nothing yet"
                );
                held.push(
                    view["rendering"]["task"]["frame_start"]
                        .as_u64()
                        .context("task")?,
                );
            }
            Ok(held)
        })?;
        let noticed = Instant::now();
        metadata.preempt();
        // Both hand their task back within 5 s of the notice (the coordinator answered).
        eventually(Duration::from_secs(5), Duration::from_millis(100), || {
            for node in &spot {
                ensure!(
                    node.stderr()?
                        .contains("handed the running task back to its coordinator"),
                    "{} has not handed its task back:\n{}",
                    node.name(),
                    node.log_tail(20)
                );
            }
            Ok(())
        })?;
        let handed_back = noticed.elapsed();
        // Then they leave.
        for node in &mut spot {
            ensure!(
                node.wait_exit(Duration::from_secs(10))?.success(),
                "{} did not leave cleanly",
                node.name()
            );
        }
        eprintln!(
            "both spot peers handed their tasks back {handed_back:?} after the notice, and left {:?} after it",
            noticed.elapsed()
        );

        // The job completes on a alone, the handed-back frames included, and no frame was
        // given up on: a hand-back is not a failure.
        let view = wait_done(&a, &id, JOB_WITHIN)?;
        let mut frames = covered_frames(&view);
        frames.sort_unstable();
        ensure!(
            frames == (1..=12).collect::<Vec<u64>>(),
            "covered {frames:?}"
        );
        let me = a.peer_id()?;
        for task in view["tasks"].as_array().into_iter().flatten() {
            ensure!(
                task["failures"].as_array().is_none_or(Vec::is_empty),
                "a failure was recorded: {task}"
            );
            let frame = task["task"]["frame_start"].as_u64().unwrap_or(0);
            if held.contains(&frame) && task["state"].get("Done").is_some() {
                ensure!(
                    task["results"][0][0] == me.as_str(),
                    "frame {frame}, handed back, was rendered by {}",
                    task["results"][0][0]
                );
            }
        }
        Ok(())
    });
}
