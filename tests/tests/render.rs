//! Rendering with real Blender through the daemon: scene problems reach the job with their
//! names and the daemon keeps serving; a Blender killed mid-task fails that task and the next
//! one runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use blendnet_tests::{
    Node, blender, blender_scene, e2e, eventually, local_render, mesh, pixel_difference,
};
use serde_json::Value;

/// A job on one small scene finishes (or fails) well within this on a loaded 2-core machine.
const JOB_WITHIN: Duration = Duration::from_secs(120);

/// A scene folder beside the node's data dir, holding `name.blend` made by `make`.
fn scene_dir(node: &Node, name: &str) -> PathBuf {
    let dir = node.data_dir().with_file_name(format!("scene-{name}"));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn add(node: &Node, dir: &Path) -> Result<String> {
    Ok(node
        .cli_ok(&["store", "add", dir.to_str().context("path")?])?
        .trim()
        .to_owned())
}

fn submit(node: &Node, hash: &str, blend: &str, samples: &str) -> Result<String> {
    let out = node.cli_ok(&[
        "submit",
        hash,
        "--blend",
        blend,
        "--frames",
        "1",
        "--samples",
        samples,
        "--split",
        "samples",
    ])?;
    Ok(out.trim().to_owned())
}

/// Waits for the job to end; returns (state, failure reason).
fn outcome(node: &Node, id: &str) -> Result<(String, String)> {
    eventually(JOB_WITHIN, Duration::from_millis(300), || {
        let view = node.cli_json(&["status", id, "--json"])?;
        let status = &view["summary"]["status"];
        let (state, reason) = match status {
            Value::String(s) => (s.clone(), String::new()),
            Value::Object(map) => {
                let (k, v) = map.iter().next().context("empty status")?;
                (k.clone(), v["reason"].as_str().unwrap_or("").to_owned())
            }
            other => anyhow::bail!("odd status {other}"),
        };
        ensure!(state != "Active", "still active");
        Ok((state, reason))
    })
}

#[test]
fn scene_problems_are_named_and_the_daemon_keeps_serving() {
    e2e(|| {
        let (mut a, _) = Node::init("a")?;
        let blender = blender();
        a.up(&["--blender", blender.to_str().context("path")?])?;

        let dir = scene_dir(&a, "no-camera");
        blender_scene(
            &dir,
            "shot",
            "bpy.data.objects.remove(bpy.data.objects['Camera'])",
        )?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "4")?;
        let (state, reason) = outcome(&a, &job)?;
        assert_eq!(state, "Failed");
        assert!(reason.contains("no camera"), "{reason}");
        // The task's log is kept where it ran, with Blender's own lines.
        let logs = a.cli_json(&["logs", &job, "--json"])?;
        let log = logs[0]["log"].as_str().context("no task log")?;
        assert!(
            log.contains("no camera") && log.contains("Blender"),
            "{log}"
        );

        let dir = scene_dir(&a, "missing");
        blender_scene(
            &dir,
            "shot",
            "img = bpy.data.images.new('tex', 4, 4)\n\
             img.source = 'FILE'\n\
             img.filepath = '//textures/wood.png'\n\
             img.use_fake_user = True",
        )?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "4")?;
        let (state, reason) = outcome(&a, &job)?;
        assert_eq!(state, "Failed");
        assert!(reason.contains("missing"), "{reason}");

        let dir = scene_dir(&a, "corrupt");
        let good = blender_scene(&dir, "shot", "")?;
        let bytes = fs::read(&good)?;
        fs::write(&good, &bytes[..bytes.len() / 3])?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "4")?;
        let (state, reason) = outcome(&a, &job)?;
        assert_eq!(state, "Failed");
        assert!(reason.contains("cannot read"), "{reason}");

        // A scene that denoises, on a mesh whose Blenders cannot (Debian's has no
        // OpenImageDenoise): said as soon as the first slice shows it, not after the frame.
        let dir = scene_dir(&a, "denoise");
        blender_scene(&dir, "shot", "scene.cycles.use_denoising = True")?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "512")?;
        let (state, reason) = outcome(&a, &job)?;
        assert_eq!(state, "Failed");
        assert!(reason.contains("OpenImageDenoise"), "{reason}");
        let view = a.cli_json(&["status", &job, "--json"])?;
        let (done, total) = (
            view["summary"]["done_units"].as_u64().context("done")?,
            view["summary"]["total_units"].as_u64().context("total")?,
        );
        assert!(done < total, "{done} of {total} samples rendered first");

        // Still serving: a good scene renders.
        let dir = scene_dir(&a, "good");
        blender_scene(&dir, "shot", "")?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "8")?;
        let (state, reason) = outcome(&a, &job)?;
        assert_eq!((state.as_str(), reason.as_str()), ("Done", ""));
        ensure!(a.is_running()?, "the daemon exited");
        Ok(())
    });
}

#[test]
fn a_blender_killed_mid_task_fails_that_task_and_the_next_one_runs() {
    e2e(|| {
        let (mut a, _) = Node::init("a")?;
        let (mut b, _) = (Node::new("b")?, ());
        let blender = blender();
        let blender = blender.to_str().context("path")?;
        a.up(&["--blender", blender])?;
        b.cli_ok(&["join", &a.invite(&[])?])?;
        b.up(&["--blender", blender])?;
        // Both must know the other renders before the job starts, so the task can move.
        let ids = [a.peer_id()?, b.peer_id()?];
        eventually(Duration::from_secs(30), Duration::from_millis(250), || {
            for node in [&a, &b] {
                let peers = node.peers()?;
                for id in &ids {
                    let peer = peers
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["peer_id"] == id.as_str())
                        .context("peer missing")?;
                    ensure!(peer["online"] == true, "{id} offline");
                    ensure!(peer["blender"].is_string(), "{id} has no Blender yet");
                }
            }
            Ok(())
        })?;
        // Blender takes about a second to start and load the scene, and the first worker is
        // killed within 50 ms of appearing: the task it was started for fails.
        let dir = scene_dir(&a, "long");
        blender_scene(&dir, "shot", "scene.render.resolution_x = 64")?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "64")?;
        // Kill the first Blender worker that appears on this machine (either peer's).
        let killed = eventually(Duration::from_secs(60), Duration::from_millis(50), || {
            let out = std::process::Command::new("pkill")
                .args(["-9", "-f", "-n", r"\.blendnet-worker\.py"])
                .status()?;
            ensure!(out.success(), "no worker yet");
            Ok(())
        });
        killed?;
        let (state, reason) = outcome(&a, &job)?;
        assert_eq!((state.as_str(), reason.as_str()), ("Done", ""));
        let view = a.cli_json(&["status", &job, "--json"])?;
        let failures: Vec<&Value> = view["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|t| t["failures"].as_array().into_iter().flatten())
            .collect();
        assert!(
            failures
                .iter()
                .any(|f| f[1].as_str().is_some_and(|r| r.contains("signal 9"))),
            "the killed task is reported failed, naming the kill: {failures:?}"
        );
        Ok(())
    });
}

#[test]
fn cancelling_a_job_stops_its_blender_within_seconds() {
    e2e(|| {
        let (mut a, _) = Node::init("a")?;
        let blender = blender();
        a.up(&["--blender", blender.to_str().context("path")?])?;
        // Far too many samples to finish: it must be stopped.
        let dir = scene_dir(&a, "endless");
        blender_scene(&dir, "shot", "scene.render.resolution_x = 64")?;
        let job = submit(&a, &add(&a, &dir)?, "shot.blend", "1000000")?;
        let worker_pid = eventually(Duration::from_secs(60), Duration::from_millis(100), || {
            let out = std::process::Command::new("pgrep")
                .args(["-f", "-n", r"\.blendnet-worker\.py"])
                .output()?;
            ensure!(out.status.success(), "no Blender worker yet");
            let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
            // Rendering, not loading: its task log does not exist yet, but the job shows a
            // lease on the task.
            let view = a.cli_json(&["status", &job, "--json"])?;
            ensure!(
                view["tasks"].as_array().is_some_and(|t| !t.is_empty()),
                "no task granted yet"
            );
            Ok(pid)
        })?;
        std::thread::sleep(Duration::from_secs(1));
        ensure!(
            Path::new(&format!("/proc/{worker_pid}")).exists(),
            "Blender ended by itself"
        );
        let cancelled = std::time::Instant::now();
        a.cli_ok(&["cancel", &job])?;
        eventually(Duration::from_secs(5), Duration::from_millis(50), || {
            let status = fs::read_to_string(format!("/proc/{worker_pid}/stat"));
            // Gone, or a zombie about to be reaped.
            ensure!(
                status.is_err() || status.is_ok_and(|s| s.contains(") Z")),
                "Blender {worker_pid} still runs"
            );
            Ok(())
        })?;
        eprintln!("Blender stopped {:?} after the cancel", cancelled.elapsed());
        let (state, _) = outcome(&a, &job)?;
        assert_eq!(state, "Cancelled");
        Ok(())
    });
}

#[test]
fn a_still_sliced_across_three_peers_is_merged_and_lands_in_the_output_folder() {
    e2e(|| {
        let blender = blender();
        let nodes = mesh(
            &["a", "b", "c"],
            &["--blender", blender.to_str().context("path")?],
        )?;
        let a = &nodes[0];
        let dir = scene_dir(a, "still");
        let scene = blender_scene(
            &dir,
            "shot",
            "scene.cycles.samples = 256\n\
             scene.cycles.use_adaptive_sampling = False\n\
             scene.render.resolution_x = 160\n\
             scene.render.resolution_y = 120\n\
             scene.render.image_settings.file_format = 'PNG'\n\
             scene.render.filepath = '//render/shot_'",
        )?;
        let out = a.data_dir().with_file_name("frames");
        let job = a
            .cli_ok(&[
                "submit",
                &add(a, &dir)?,
                "--blend",
                "shot.blend",
                "--frames",
                "1",
                "--samples",
                "256",
                "--split",
                "samples",
                "--target-task-secs",
                "1",
                "--out",
                out.to_str().context("path")?,
            ])?
            .trim()
            .to_owned();
        let (state, reason) = outcome(a, &job)?;
        assert_eq!((state.as_str(), reason.as_str()), ("Done", ""));

        // Sliced, across more than one peer, and merged once from all the slices.
        let view = a.cli_json(&["status", &job, "--json"])?;
        let tasks = view["tasks"].as_array().context("tasks")?;
        let slices: Vec<&Value> = tasks
            .iter()
            .filter(|t| t["task"]["kind"] == "render" && t["in_cover"] == true)
            .collect();
        let renderers: std::collections::BTreeSet<&str> = slices
            .iter()
            .filter_map(|t| t["results"][0][0].as_str())
            .collect();
        assert!(slices.len() >= 2, "{slices:?}");
        assert!(renderers.len() >= 2, "{renderers:?}");
        let merge = tasks
            .iter()
            .find(|t| t["task"]["kind"] == "merge")
            .context("no merge task")?;
        assert!(merge["state"].get("Done").is_some(), "{merge}");

        // The submitter put the finished frame where it was asked, named as Blender names it.
        let delivered = eventually(JOB_WITHIN, Duration::from_millis(300), || {
            let view = a.cli_json(&["status", &job, "--json"])?;
            let files = view["delivery"]["files"]
                .as_array()
                .context("no outputs")?
                .clone();
            ensure!(
                !files.is_empty(),
                "nothing delivered yet: {}",
                view["delivery"]
            );
            Ok(files)
        })?;
        let frame = out.join("shot_0001.png");
        assert_eq!(
            delivered,
            vec![Value::from(frame.to_str().context("path")?)]
        );
        // Equal to the local render, up to float summation order: slices of unequal length
        // sum their samples in another order than one render does (so does `_cycles.merge`),
        // which can move a value across an 8-bit rounding boundary, rarely.
        let local = local_render(&scene, &dir, "1")?.remove(0);
        let (worst, differing) = pixel_difference(&frame, &local);
        assert!(worst <= 1.0 + 1e-6, "{worst}/255");
        assert!(
            differing <= 160 * 120 * 4 / 1000,
            "{differing} values differ"
        );
        // Writable, like a file Blender writes: the artist can render over it.
        assert!(!fs::metadata(&frame)?.permissions().readonly());

        // The preview of the frame, from the submitter's API.
        let token = a.api_token()?;
        let preview = a.api_get(&format!("/v1/jobs/{job}/preview?frame=1"), Some(&token))?;
        assert_eq!(preview.status, 200, "{}", preview.body);
        assert!(
            preview.body.contains("PNG") && preview.body.contains("IHDR"),
            "not a PNG"
        );
        let missing = a.api_get(&format!("/v1/jobs/{job}/preview?frame=7"), Some(&token))?;
        assert_eq!(missing.status, 404, "{}", missing.body);
        Ok(())
    });
}
