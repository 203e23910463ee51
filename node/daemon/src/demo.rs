//! `blendnet demo`: the mesh at work in one command. It starts a throwaway two-node mesh on
//! loopback in a temporary folder, has Blender make a small scene, renders its frame sliced
//! across both nodes with `blendnet render`'s own code, renders the same frame locally with
//! `blender -b`, and says where both are and how far apart they are.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

use crate::client::Client;
use crate::data_dir::DataDir;
use crate::render_cmd::RenderArgs;

/// How long a node may take to start and the two to see each other.
const START_WITHIN: Duration = Duration::from_secs(60);

/// `blendnet demo`'s arguments.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The Blender to render with (default: `BLENDNET_BLENDER`, then `blender` on PATH).
    #[arg(long, value_name = "PATH")]
    pub blender: Option<PathBuf>,
    /// Samples of the demo frame.
    #[arg(long, default_value_t = 128)]
    pub samples: u32,
}

/// A daemon the demo started; stopped when dropped (SIGTERM, so it shuts down cleanly; killed
/// if it has not within a few seconds).
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `blendnet demo`.
pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let blender = blendnet_render::discovery::locate_blender(
        args.blender.as_deref(),
        std::env::var_os("BLENDNET_BLENDER").as_deref(),
        std::env::var_os("PATH").as_deref(),
    )
    .context("the demo renders with Blender: install it (Debian: apt install blender)")?;
    let root = tempfile::Builder::new()
        .prefix("blendnet-demo-")
        .tempdir()?
        .keep();
    eprintln!("demo folder: {}", root.display());
    let exe = std::env::current_exe()?;
    let (a, b) = (root.join("node-a"), root.join("node-b"));

    eprintln!("starting a two-node mesh on loopback…");
    run(&exe, &["init", "--data-dir", path_str(&a)?])?;
    let _node_a = start(&exe, &a, &blender, &root)?;
    let client = wait_api(&a)?;
    let code = run(&exe, &["invite", "--data-dir", path_str(&a)?])?;
    run(&exe, &["join", code.trim(), "--data-dir", path_str(&b)?])?;
    let _node_b = start(&exe, &b, &blender, &root)?;
    wait_api(&b)?;
    wait_for_renderers(&client, 2)?;

    eprintln!("making a scene with Blender…");
    let scene = root.join("scene").join("demo.blend");
    make_scene(&blender, &scene, args.samples)?;

    let out = root.join("frames");
    crate::render_cmd::render(
        &DataDir::resolve(Some(a.clone()))?,
        RenderArgs {
            scene: scene.clone(),
            frames: None,
            samples: None,
            split: "samples".into(),
            out: Some(out.clone()),
            allow_missing: false,
            wait: true,
            json: false,
            blender: Some(blender.clone()),
            name: Some("demo".into()),
        },
    )?;
    let frame = out.join("demo_0001.png");
    ensure!(frame.exists(), "the mesh wrote no {}", frame.display());

    eprintln!("rendering the same frame locally with blender -b, for comparison…");
    let local_dir = root.join("local");
    let status = Command::new(&blender)
        .arg("-b")
        .arg(&scene)
        .arg("-o")
        .arg(local_dir.join("demo_####"))
        .args(["-f", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.success(), "the local render failed ({status})");
    let local = local_dir.join("demo_0001.png");
    let (worst, differing, total) = compare(&frame, &local)?;
    println!("rendered across 2 nodes: {}", frame.display());
    println!("rendered locally:        {}", local.display());
    println!(
        "difference: at most {worst}/255 in {differing} of {total} values{}",
        if differing == 0 {
            " (identical)"
        } else {
            " (float summation order across slices)"
        }
    );
    println!(
        "the demo folder stays for you to look at; delete it when done: {}",
        root.display()
    );
    Ok(())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Runs a `blendnet` command to its end; returns its stdout.
fn run(exe: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(exe).args(args).output()?;
    if !out.status.success() {
        bail!(
            "blendnet {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `blendnet up` for `data_dir` on loopback, logging beside it.
fn start(exe: &Path, data_dir: &Path, blender: &Path, root: &Path) -> anyhow::Result<Daemon> {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let log = std::fs::File::create(root.join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api",
            "127.0.0.1:0",
            "--no-mdns",
        ])
        .arg("--blender")
        .arg(blender)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(Daemon(child))
}

/// Waits for a node's API.
fn wait_api(data_dir: &Path) -> anyhow::Result<Client> {
    let dir = DataDir::resolve(Some(data_dir.to_path_buf()))?;
    let started = Instant::now();
    loop {
        if let Ok(client) = Client::connect(&dir)
            && client.status().is_ok()
        {
            return Ok(client);
        }
        if started.elapsed() > START_WITHIN {
            bail!("the node in {} did not start", data_dir.display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until `count` peers (this one included) are online and render.
fn wait_for_renderers(client: &Client, count: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let peers = client.peers(false)?;
        let ready = peers
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["online"] == true && p["capabilities"]["render"] == true)
            .filter(|p| p["capabilities"]["blender"].is_string())
            .count();
        if ready >= count {
            return Ok(());
        }
        if started.elapsed() > START_WITHIN {
            bail!("only {ready} of {count} nodes came up ready to render");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A small Cycles scene: a shaded cube on a floor, `samples` samples, writing PNG.
fn make_scene(blender: &Path, path: &Path, samples: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(path.parent().context("scene folder")?)?;
    let script = format!(
        "import bpy\n\
         scene = bpy.context.scene\n\
         scene.render.engine = 'CYCLES'\n\
         scene.cycles.device = 'CPU'\n\
         scene.cycles.samples = {samples}\n\
         scene.cycles.use_adaptive_sampling = False\n\
         scene.cycles.use_denoising = False\n\
         scene.render.resolution_x = 320\n\
         scene.render.resolution_y = 240\n\
         scene.render.resolution_percentage = 100\n\
         scene.render.image_settings.file_format = 'PNG'\n\
         scene.render.filepath = '//render/demo_'\n\
         scene.frame_start = 1\n\
         scene.frame_end = 1\n\
         bpy.ops.mesh.primitive_plane_add(size=20, location=(0, 0, -1))\n\
         mat = bpy.data.materials.new('Demo')\n\
         mat.use_nodes = True\n\
         mat.node_tree.nodes['Principled BSDF'].inputs['Base Color'].default_value = (0.8, 0.3, 0.1, 1)\n\
         bpy.data.objects['Cube'].data.materials.append(mat)\n\
         bpy.ops.wm.save_as_mainfile(filepath={:?})\n",
        path_str(path)?
    );
    let out = Command::new(blender)
        .args([
            "-b",
            "--factory-startup",
            "--python-exit-code",
            "1",
            "--python-expr",
        ])
        .arg(&script)
        .output()?;
    ensure!(
        out.status.success() && path.exists(),
        "Blender could not make the demo scene: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The largest difference between two 8-bit PNGs of one size, in 1/255 steps, how many values
/// differ, and how many there are.
fn compare(a: &Path, b: &Path) -> anyhow::Result<(u8, usize, usize)> {
    let (x, y) = (decode(a)?, decode(b)?);
    ensure!(
        x.len() == y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    let mut worst = 0u8;
    let mut differing = 0;
    for (p, q) in x.iter().zip(&y) {
        let d = p.abs_diff(*q);
        worst = worst.max(d);
        differing += usize::from(d > 0);
    }
    Ok((worst, differing, x.len()))
}

fn decode(path: &Path) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("{} is not a PNG", path.display()))?;
    let mut buf = vec![0; reader.output_buffer_size().context("PNG too large")?];
    let info = reader.next_frame(&mut buf)?;
    ensure!(
        info.bit_depth == png::BitDepth::Eight,
        "{} is not an 8-bit PNG",
        path.display()
    );
    buf.truncate(info.buffer_size());
    Ok(buf)
}
