//! `blendnet render SCENE.blend`: one command from a `.blend` to finished frames.
//!
//! 1. Blender collects the files the scene needs ([`blendnet_render::collect`], the add-on's
//!    own collection code) and saves a copy of the scene whose paths are all relative.
//! 2. Missing files stop it here, named, unless `--allow-missing`.
//! 3. The files go into the store keeping their layout relative to the scene's project folder,
//!    the copy in the scene's place, so relative paths resolve on every peer.
//! 4. The job is submitted with this node's daemon as the one that delivers the frames to
//!    `--out` (default: where the scene's output path points), so they arrive even if this
//!    command is gone.
//! 5. With `--wait`, a progress line (or JSON lines with `--json`) until the frames are there.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::api::{NamedFile, StoreAddRequest, SubmitRequest};
use crate::client::Client;
use crate::data_dir::DataDir;

/// How often `--wait` looks at the job.
const POLL: Duration = Duration::from_millis(500);

/// `blendnet render`'s arguments.
#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The scene to render.
    pub scene: PathBuf,
    /// Frames: `1`, `1-10`, `1-10,12` (default: the scene's frame range).
    #[arg(long)]
    pub frames: Option<String>,
    /// Samples per frame (default: the scene's; Cycles only).
    #[arg(long)]
    pub samples: Option<u32>,
    /// auto (sample slices for a Cycles still, else frames), samples, or frames.
    #[arg(long, default_value = "auto")]
    pub split: String,
    /// Where the finished frames go (default: the folder of the scene's output path).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Submit even though the scene refers to files that are not there.
    #[arg(long)]
    pub allow_missing: bool,
    /// Wait until the frames are in the output folder, showing progress.
    #[arg(long)]
    pub wait: bool,
    /// Progress as JSON lines; the last line says how the job ended.
    #[arg(long)]
    pub json: bool,
    /// The Blender that reads the scene (default: `BLENDNET_BLENDER`, then `blender` on PATH).
    #[arg(long, value_name = "PATH")]
    pub blender: Option<PathBuf>,
    /// The job's name (default: the file's name and the scene's, `shot/Scene`).
    #[arg(long)]
    pub name: Option<String>,
}

/// Runs `blendnet render`.
pub fn render(data_dir: &DataDir, args: RenderArgs) -> anyhow::Result<()> {
    let scene =
        std::path::absolute(&args.scene).with_context(|| format!("{}", args.scene.display()))?;
    if !scene.is_file() {
        bail!("{} is not a file", scene.display());
    }
    let blender = blendnet_render::discovery::locate_blender(
        args.blender.as_deref(),
        std::env::var_os("BLENDNET_BLENDER").as_deref(),
        std::env::var_os("PATH").as_deref(),
    )?;
    let client = Client::connect(data_dir)?;

    // Collect into a folder of the data dir: the daemon reads the copy from there.
    let staging = data_dir
        .path()
        .join("tmp")
        .join(format!("render-{}", std::process::id()));
    std::fs::create_dir_all(&staging).with_context(|| format!("{}", staging.display()))?;
    let copy = staging.join(scene.file_name().context("the scene has no file name")?);
    let collected = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(blendnet_render::collect::collect(&blender, &scene, &copy));
    let submitted = collected
        .map_err(anyhow::Error::from)
        .and_then(|collected| submit(&client, &args, &scene, &collected, &copy));
    let _ = std::fs::remove_dir_all(&staging);
    let job = submitted?;
    if !args.wait {
        if args.json {
            println!("{}", json!({"job": job, "state": "submitted"}));
        } else {
            println!("{job}");
        }
        return Ok(());
    }
    wait(&client, &job, args.json)
}

/// Checks what was collected, uploads it and submits; returns the job id.
fn submit(
    client: &Client,
    args: &RenderArgs,
    scene: &Path,
    collected: &blendnet_render::collect::Collected,
    copy: &Path,
) -> anyhow::Result<String> {
    if !collected.missing.is_empty() && !args.allow_missing {
        let list: Vec<String> = collected
            .missing
            .iter()
            .map(|p| format!("  {}", p.display()))
            .collect();
        bail!(
            "{} file(s) the scene uses are missing (render with --allow-missing to go on \
             without them):\n{}",
            collected.missing.len(),
            list.join("\n")
        );
    }
    let info = &collected.scene;
    if info.is_movie {
        bail!(
            "the scene writes a movie ({}); render to an image format and make the movie from \
             the frames",
            info.file_format
        );
    }
    if info.denoise {
        refuse_without_denoiser(client)?;
    }
    let files: Vec<NamedFile> = blendnet_render::collect::upload_list(collected, copy)
        .into_iter()
        .map(|(path, name)| {
            Ok(NamedFile {
                path: path
                    .to_str()
                    .with_context(|| format!("{} is not UTF-8", path.display()))?
                    .to_owned(),
                name,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let root = blendnet_render::collect::project_root(collected);
    let blend = scene
        .strip_prefix(&root)
        .context("the scene is outside its own project folder")?
        .to_str()
        .context("the scene's path is not UTF-8")?
        .replace('\\', "/");
    let added = client.store_add(&StoreAddRequest {
        paths: Vec::new(),
        files,
    })?;
    let frames = match &args.frames {
        Some(text) => {
            crate::cli::parse_frames(text).map_err(|e| anyhow::anyhow!("--frames: {e}"))?
        }
        None => scene_frames(
            info.frame_start.into(),
            info.frame_end.into(),
            info.frame_step.into(),
        )?,
    };
    let out = match &args.out {
        Some(dir) => std::path::absolute(dir)?,
        None => output_dir(&info.output),
    };
    let blender = blendnet_proto::job::major_minor(&info.blender).map(|(a, b)| format!("{a}.{b}"));
    let job = client.submit(&SubmitRequest {
        scene: added.hash,
        blend,
        frames,
        samples: args.samples.or(info.samples).unwrap_or(1),
        split: Some(args.split.clone()),
        engine: Some(info.engine.clone()),
        name: Some(args.name.clone().unwrap_or_else(|| {
            let stem = scene.file_stem().unwrap_or_default().to_string_lossy();
            format!("{stem}/{}", info.name)
        })),
        target_task_secs: None,
        frames_per_task: None,
        blender,
        out: Some(
            out.to_str()
                .context("the output folder is not UTF-8")?
                .to_owned(),
        ),
    })?;
    Ok(job.job)
}

/// The scene's frames, `start..=end` by `step`.
pub(crate) fn scene_frames(start: i64, end: i64, step: i64) -> anyhow::Result<Vec<u32>> {
    if start < 0 || end < start {
        bail!("the scene's frame range {start}-{end} has no frame BlendNet can render");
    }
    let step = usize::try_from(step.max(1)).unwrap_or(1);
    (start..=end)
        .step_by(step)
        .map(|f| u32::try_from(f).context("frame number"))
        .collect()
}

/// The folder an output path template writes into: the template itself when it ends with a
/// separator (`/tmp/`), else its parent (`/renders/shot_` → `/renders`).
fn output_dir(template: &Path) -> PathBuf {
    let text = template.to_string_lossy();
    if text.ends_with('/') || text.ends_with('\\') {
        return template.to_path_buf();
    }
    template
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| template.to_path_buf())
}

/// Refuses a scene that denoises when no online render peer's Blender can.
fn refuse_without_denoiser(client: &Client) -> anyhow::Result<()> {
    let peers = client.peers(false)?;
    let can = peers.as_array().into_iter().flatten().any(|p| {
        p["online"] == true
            && p["capabilities"]["render"] == true
            && p["capabilities"]["denoiser"] == true
    });
    if !can {
        bail!(
            "the scene asks for denoising, and no online peer's Blender can denoise (none has \
             OpenImageDenoise; Debian's blender package lacks it): turn denoising off, or add \
             a peer with Blender from blender.org"
        );
    }
    Ok(())
}

/// Follows the job until it ends and its frames are delivered.
fn wait(client: &Client, job: &str, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_line = String::new();
    loop {
        let view = client.job(job)?;
        let state = crate::cli::status_word(view.pointer("/summary/status"));
        let delivery = &view["delivery"];
        let outputs = view["outputs"].as_array().map_or(0, Vec::len);
        let delivered = delivery["pending"].as_u64() == Some(0)
            && delivery["files"]
                .as_array()
                .is_some_and(|f| !f.is_empty() || outputs == 0);
        if state == "done"
            && let Some(error) = delivery["error"].as_str()
        {
            // The daemon keeps trying; this command says why the frames are not there.
            let error = format!(
                "job {job} is done, but its frames could not be written to {}: {error} \
                 (the daemon tries again; `blendnet fetch {job}` copies them elsewhere)",
                delivery["dir"].as_str().unwrap_or("the output folder")
            );
            if json {
                println!(
                    "{}",
                    json!({"job": job, "state": "done", "outputs": delivery["files"], "error": error})
                );
            }
            bail!(error);
        }
        let ended = match state.as_str() {
            "done" => delivered,
            "failed" | "cancelled" => true,
            _ => false,
        };
        if ended {
            if !json && !last_line.is_empty() {
                eprintln!();
            }
            let files: Vec<Value> = delivery["files"].as_array().cloned().unwrap_or_default();
            let error = match state.as_str() {
                "failed" => view
                    .pointer("/summary/status/Failed/reason")
                    .cloned()
                    .unwrap_or(Value::Null),
                "cancelled" => Value::from("the job was cancelled"),
                _ => Value::Null,
            };
            if json {
                println!(
                    "{}",
                    json!({"job": job, "state": state, "outputs": files, "error": error})
                );
            } else {
                for f in &files {
                    println!("{}", f.as_str().unwrap_or_default());
                }
            }
            return match state.as_str() {
                "done" => Ok(()),
                _ => bail!(
                    "job {job} {state}{}",
                    error.as_str().map(|e| format!(": {e}")).unwrap_or_default()
                ),
            };
        }
        let progress = Progress::of(&view, client, job, started.elapsed());
        if json {
            let line = progress.json(job).to_string();
            if line != last_line {
                println!("{line}");
                last_line = line;
            }
        } else {
            let line = progress.line();
            eprint!("\r{line:<78}");
            let _ = std::io::stderr().flush();
            last_line = line;
        }
        std::thread::sleep(POLL);
    }
}

/// How far a job is, for the progress line.
struct Progress {
    frames_done: u64,
    frames: u64,
    samples_done: u64,
    samples: u64,
    peers: usize,
    eta: Option<Duration>,
}

impl Progress {
    fn of(view: &Value, client: &Client, job: &str, elapsed: Duration) -> Progress {
        let frames = view["frames"].as_array().cloned().unwrap_or_default();
        let done = |f: &Value| f["samples_done"].as_u64() >= f["samples"].as_u64();
        let samples_done: u64 = frames
            .iter()
            .filter_map(|f| f["samples_done"].as_u64())
            .sum();
        let samples: u64 = frames.iter().filter_map(|f| f["samples"].as_u64()).sum();
        // Peers whose status says they render a task of this job.
        let peers = client
            .peers(false)
            .ok()
            .and_then(|p| p.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|p| p["rendering"]["job"].as_str() == Some(job))
            .count();
        let eta = (samples_done > 0 && samples > samples_done)
            .then(|| elapsed.mul_f64((samples - samples_done) as f64 / samples_done as f64));
        Progress {
            frames_done: frames.iter().filter(|f| done(f)).count() as u64,
            frames: frames.len() as u64,
            samples_done,
            samples,
            peers,
            eta,
        }
    }

    fn line(&self) -> String {
        let eta = self
            .eta
            .map(|d| format!("ETA {}:{:02}", d.as_secs() / 60, d.as_secs() % 60))
            .unwrap_or_else(|| "ETA -".into());
        format!(
            "frames {}/{} · samples {}/{} · {} peer(s) rendering · {eta}",
            self.frames_done, self.frames, self.samples_done, self.samples, self.peers
        )
    }

    fn json(&self, job: &str) -> Value {
        json!({
            "job": job,
            "state": "active",
            "frames_done": self.frames_done,
            "frames": self.frames,
            "samples_done": self.samples_done,
            "samples": self.samples,
            "peers": self.peers,
            "eta_secs": self.eta.map(|d| d.as_secs()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scene_range_becomes_its_frames() {
        assert_eq!(scene_frames(1, 5, 2).unwrap(), vec![1, 3, 5]);
        assert_eq!(scene_frames(7, 7, 1).unwrap(), vec![7]);
        assert!(scene_frames(-1, 5, 1).is_err());
        assert!(scene_frames(5, 4, 1).is_err());
    }

    #[test]
    fn the_output_folder_is_the_templates_folder() {
        assert_eq!(output_dir(Path::new("/tmp/")), PathBuf::from("/tmp/"));
        assert_eq!(
            output_dir(Path::new("/work/renders/shot_")),
            PathBuf::from("/work/renders")
        );
    }
}
