//! Benchmark (not a test): our merge against Blender's own `_cycles.merge`.
//!
//!     cargo bench -p blendnet-exr            (BLENDNET_BLENDER picks the Blender)
//!
//! Blender renders 4 sample slices of the factory cube at 1920×1080 with 39 channels (Combined,
//! Depth, Normal, denoising data, diffuse and glossy light passes, Emit, AO), as FACTS measured
//! (13.7 s and 1.1 GB peak for Blender). Then each merge runs as a whole process, twice, the
//! faster run counting: Blender with `_cycles.merge`, and this benchmark's own executable
//! re-run as a child that calls `blendnet_exr::merge`. Prints both wall times, their ratio and
//! both peak resident memories (VmHWM, read from /proc by each process at its end), and checks
//! that the two merged files agree.
//!
//! `cargo test --all-targets` builds this and runs it without `--bench`: then it does nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use exr::prelude::*;

/// The argument that makes this executable the merging child: `--merge-child OUT IN...`.
const CHILD: &str = "--merge-child";

/// Slices rendered and merged.
const SLICES: u32 = 4;

/// Runs of each merge; the fastest counts (the first may pay for cold caches).
const RUNS: usize = 2;

fn blender() -> PathBuf {
    std::env::var_os("BLENDNET_BLENDER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "blender".into())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == CHILD) {
        return child(&args[at + 1..]);
    }
    if !args.iter().any(|a| a == "--bench") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    println!("rendering {SLICES} slices of 1920×1080 with Blender…");
    let slices = render(dir.path())?;
    let channels = read_all_flat_layers_from_file(&slices[0])?.layer_data[0]
        .channel_data
        .list
        .len();
    let size: u64 = slices
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()?;
    println!(
        "{SLICES} slices, {channels} channels each, {:.1} MB of EXR in all",
        size as f64 / 1e6
    );

    let startup = (0..RUNS)
        .map(|_| {
            time(Command::new(blender()).args(["-b", "--factory-startup", "--python-expr", "pass"]))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .map(|(t, _)| t)
        .min()
        .context("no run")?;

    let inputs: Vec<&str> = slices.iter().filter_map(|p| p.to_str()).collect();
    let cycles_out = dir.path().join("cycles.exr");
    let expr = format!(
        "import _cycles\n_cycles.merge(input={inputs:?}, output={:?})\n\
         print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])",
        cycles_out.to_str().context("UTF-8")?
    );
    let cycles = best(RUNS, || {
        time(Command::new(blender()).args([
            "-b",
            "--factory-startup",
            "--python-exit-code",
            "1",
            "--python-expr",
            &expr,
        ]))
    })?;

    let ours_out = dir.path().join("ours.exr");
    let me = std::env::current_exe()?;
    let ours = best(RUNS, || {
        time(Command::new(&me).arg(CHILD).arg(&ours_out).args(&slices))
    })?;

    let diff = largest_difference(&ours_out, &cycles_out)?;
    println!();
    println!(
        "Blender _cycles.merge (whole process): {:>7.2} s   peak {:>6.0} MB   (Blender's start-up alone: {:.2} s)",
        cycles.0.as_secs_f64(),
        cycles.1 as f64 / 1024.0,
        startup.as_secs_f64()
    );
    println!(
        "blendnet_exr::merge  (whole process): {:>7.2} s   peak {:>6.0} MB   ({} threads)",
        ours.0.as_secs_f64(),
        ours.1 as f64 / 1024.0,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!(
        "ratio: {:.1}× faster, {:.1}× less memory; largest pixel difference {diff:e}",
        cycles.0.as_secs_f64() / ours.0.as_secs_f64(),
        cycles.1 as f64 / ours.1 as f64
    );
    Ok(())
}

/// The merging child: merges, then prints its peak resident memory.
fn child(args: &[String]) -> Result<()> {
    let (output, inputs) = args
        .split_first()
        .context("usage: --merge-child OUT IN...")?;
    let report = blendnet_exr::merge(inputs, output, &blendnet_exr::MergeOptions::default())?;
    eprintln!("merged in {:.2} s", report.elapsed.as_secs_f64());
    println!("{}", vm_hwm_line()?);
    Ok(())
}

fn vm_hwm_line() -> Result<String> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .map(str::to_string)
        .context("no VmHWM in /proc/self/status")
}

/// Runs `command`, returning its wall time and the VmHWM (kB) it printed, if any (0 if not).
fn time(command: &mut Command) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let out = command.output()?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let kb = stdout
        .lines()
        .filter_map(|l| l.split_once("VmHWM:"))
        .filter_map(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .next()
        .unwrap_or(0);
    Ok((elapsed, kb))
}

/// The fastest of `runs` runs, with its peak memory.
fn best(runs: usize, mut run: impl FnMut() -> Result<(Duration, u64)>) -> Result<(Duration, u64)> {
    let mut all = Vec::new();
    for _ in 0..runs {
        all.push(run()?);
    }
    all.into_iter().min_by_key(|r| r.0).context("no run")
}

/// Renders the slices: the factory cube, 1920×1080, one sample each at offsets 0, 1, 2, 3.
fn render(dir: &Path) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = (0..SLICES)
        .map(|i| dir.join(format!("slice{i}.exr")))
        .collect();
    let mut script = String::from(
        "import bpy\n\
         scene = bpy.context.scene\n\
         scene.render.engine = 'CYCLES'\n\
         scene.cycles.device = 'CPU'\n\
         scene.cycles.use_denoising = False\n\
         scene.cycles.use_adaptive_sampling = False\n\
         scene.render.resolution_x = 1920\n\
         scene.render.resolution_y = 1080\n\
         scene.render.resolution_percentage = 100\n\
         scene.render.image_settings.file_format = 'OPEN_EXR_MULTILAYER'\n\
         scene.render.image_settings.color_depth = '32'\n\
         layer = scene.view_layers[0]\n\
         for name in ['use_pass_z', 'use_pass_normal', 'use_pass_diffuse_direct',\n\
                      'use_pass_diffuse_indirect', 'use_pass_diffuse_color',\n\
                      'use_pass_glossy_direct', 'use_pass_glossy_indirect',\n\
                      'use_pass_glossy_color', 'use_pass_emit', 'use_pass_ambient_occlusion']:\n\
         \x20   setattr(layer, name, True)\n\
         layer.cycles.denoising_store_passes = True\n",
    );
    for (i, path) in paths.iter().enumerate() {
        script.push_str(&format!(
            "scene.cycles.sample_offset = {i}\nscene.cycles.samples = 1\n\
             scene.render.filepath = {:?}\nbpy.ops.render.render(write_still=True)\n",
            path.to_str().context("UTF-8")?
        ));
    }
    let out = Command::new(blender())
        .args([
            "-b",
            "--factory-startup",
            "--python-exit-code",
            "1",
            "--python-expr",
            &script,
        ])
        .output()?;
    ensure!(
        out.status.success() && paths.iter().all(|p| p.exists()),
        "rendering failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(paths)
}

/// The largest difference between two EXRs' pixels, channel by channel.
fn largest_difference(a: &Path, b: &Path) -> Result<f32> {
    let channels = |path: &Path| -> Result<BTreeMap<String, Vec<f32>>> {
        let image = read_all_flat_layers_from_file(path)?;
        Ok(image.layer_data[0]
            .channel_data
            .list
            .iter()
            .map(|c| (c.name.to_string(), c.sample_data.values_as_f32().collect()))
            .collect())
    };
    let (a, b) = (channels(a)?, channels(b)?);
    ensure!(a.keys().eq(b.keys()), "the merges have different channels");
    let mut worst = 0f32;
    for (name, values) in &a {
        for (x, y) in values.iter().zip(&b[name]) {
            if !(x.is_nan() && y.is_nan()) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    Ok(worst)
}
