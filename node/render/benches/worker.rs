//! Benchmark (not a test): what a persistent worker saves over starting Blender per task.
//!
//!     cargo bench -p blendnet-render            (BLENDNET_BLENDER picks the Blender)
//!
//! 1. 20 consecutive 1-sample slices through one worker, against 20 separate `blender -b` runs
//!    of the same slices; prints each one's per-task overhead (wall time minus the render time
//!    Blender reports) and their ratio (aim: 5x less overhead).
//! 2. 8 animation frames through the worker, against `blender -b scene -a` on the same
//!    threads; prints the ratio of wall times (aim: within 5 %).
//!
//! `cargo test --all-targets` builds this and runs it without `--bench`: then it does nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use blendnet_render::{RenderTask, SliceMode, Worker};
use blendnet_tests::{blender, blender_scene};

const SLICES: u32 = 20;
const FRAMES: i32 = 8;

fn run_blender(args: &[&str]) {
    let out = Command::new(blender())
        .args(args)
        .output()
        .expect("run blender");
    assert!(
        out.status.success(),
        "blender {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The factory cube at 320×240, 64 samples, Cycles on the CPU, frames 1–8, denoising and
/// adaptive sampling off: small enough that start-up is a visible part of a 1-sample task.
fn make_scene(dir: &Path) -> PathBuf {
    let extra = format!(
        "scene.cycles.samples = 64\n\
         scene.cycles.use_adaptive_sampling = False\n\
         scene.render.resolution_x = 320\n\
         scene.render.resolution_y = 240\n\
         scene.frame_start = 1\n\
         scene.frame_end = {FRAMES}\n\
         scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'\n\
         scene.render.image_settings.color_depth = '32'"
    );
    blender_scene(dir, "bench", &extra).expect("making the scene")
}

fn task(id: u64, dir: &Path, mode: SliceMode, frames: Vec<i32>, offset: u32) -> RenderTask {
    let output_dir = dir.join(format!("out-{id}"));
    std::fs::create_dir_all(&output_dir).unwrap();
    RenderTask {
        id,
        mode,
        frames,
        samples: 1,
        frame_samples: 0,
        sample_offset: offset,
        output_dir,
        allow_missing: false,
    }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let scene = make_scene(dir.path());
    let scene_str = scene.to_str().unwrap();

    // 1. Slices through one worker (start-up included, as a job's first task pays it).
    let started = Instant::now();
    let mut worker = Worker::start(&blender(), &scene, dir.path()).await.unwrap();
    let mut rendering = Duration::ZERO;
    for i in 0..SLICES {
        let t = task(u64::from(i), dir.path(), SliceMode::Slice, vec![1], i);
        let done = worker.render(&t, |_| {}).await.unwrap();
        rendering += Duration::from_millis(done.render_ms);
    }
    worker.quit().await;
    let worker_wall = started.elapsed();

    // The same slices, one `blender -b` each.
    let started = Instant::now();
    for i in 0..SLICES {
        let out = dir.path().join(format!("direct-{i}.exr"));
        let expr = format!(
            "import bpy; c = bpy.context.scene.cycles; c.samples = 1; c.sample_offset = {i}"
        );
        run_blender(&[
            "-b",
            "-Y",
            scene_str,
            "--python-expr",
            &expr,
            "-o",
            out.to_str().unwrap(),
            "-F",
            "OPEN_EXR_MULTILAYER",
            "-x",
            "0",
            "-f",
            "1",
        ]);
    }
    let direct_wall = started.elapsed();
    let n = f64::from(SLICES);
    let worker_overhead = (worker_wall.saturating_sub(rendering)).as_secs_f64() / n;
    let direct_overhead = (direct_wall.saturating_sub(rendering)).as_secs_f64() / n;
    println!(
        "{SLICES} one-sample slices (Blender's own render time: {:.0} ms each)",
        rendering.as_secs_f64() * 1000.0 / n
    );
    println!(
        "  persistent worker: {:6.3} s in all, overhead {:6.1} ms per task",
        worker_wall.as_secs_f64(),
        worker_overhead * 1000.0
    );
    println!(
        "  blender -b each:   {:6.3} s in all, overhead {:6.1} ms per task",
        direct_wall.as_secs_f64(),
        direct_overhead * 1000.0
    );
    println!(
        "  overhead ratio (blender -b / worker): {:.1}x  (aim: 5x or more)",
        direct_overhead / worker_overhead
    );

    // 2. An animation: the worker against `blender -b -a`, same threads (all of them).
    let started = Instant::now();
    let mut worker = Worker::start(&blender(), &scene, dir.path()).await.unwrap();
    let t = task(
        1000,
        dir.path(),
        SliceMode::Frames,
        (1..=FRAMES).collect(),
        0,
    );
    worker.render(&t, |_| {}).await.unwrap();
    worker.quit().await;
    let worker_anim = started.elapsed();
    let started = Instant::now();
    let out = dir.path().join("anim-####");
    run_blender(&["-b", "-Y", scene_str, "-o", out.to_str().unwrap(), "-a"]);
    let direct_anim = started.elapsed();
    println!("{FRAMES} animation frames at 64 samples");
    println!("  persistent worker: {:6.3} s", worker_anim.as_secs_f64());
    println!("  blender -b -a:     {:6.3} s", direct_anim.as_secs_f64());
    println!(
        "  ratio (worker / blender -a): {:.3}  (aim: within 5 %, so at most 1.05)",
        worker_anim.as_secs_f64() / direct_anim.as_secs_f64()
    );
}
