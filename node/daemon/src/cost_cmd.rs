//! `blendnet cost SCENE.blend`: what a job would take, in time and money, on each instance type
//! of a cloud provider, before anything is started (DESIGN §9).
//!
//! 1. Blender reads the scene ([`blendnet_render::collect`], as `blendnet render` does), for
//!    its frames, samples and engine, so the job estimated is the job `render` would submit.
//! 2. A probe: a render worker ([`blendnet_render::Worker`], the same Blender process and
//!    script a render peer runs) loads the scene and renders the first frame's slices of
//!    [`PROBE_LOW`] samples (cold, then warm) and [`PROBE_HIGH`] samples, on every core of this
//!    machine (or `render_threads`). The warm pair gives the seconds per sample and the fixed
//!    seconds per frame; the cold one the first render's extra.
//! 3. For each instance type the provider lists: its cheapest price, the instances the
//!    provisioner would keep for the job, and the estimate ([`blendnet_cloud::cost`], where
//!    the model and its assumptions are written down).
//!
//! The daemon answers the same estimate on `POST /v1/cost` ([`serve`]), for the add-on; the CLI
//! asks the daemon of its data dir when one runs (and no `--blender` is given), else it probes
//! by itself: no daemon is needed. Either reads the `[cloud]` table of `blendnet.toml` for the
//! provider and the provisioner's limits.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use blendnet_cloud::Provider;
use blendnet_cloud::cost::{self, Boot, Estimate, Offer, Probe, Work};
use blendnet_render::{RenderTask, SliceMode, Worker};
use serde::{Deserialize, Serialize};

use crate::api::{ApiError, CostRequest};
use crate::client::{Client, ClientError};
use crate::config::{CloudConfig, Config, Overrides};
use crate::data_dir::DataDir;

/// Samples of the probe's short render (rendered twice: cold, then warm).
pub const PROBE_LOW: u32 = 4;
/// Samples of the probe's long render, at first.
pub const PROBE_HIGH: u32 = 16;
/// The long render is rendered again with 4 times the samples while it takes less than this
/// much longer than the short one: a shorter difference is mostly timer and scheduling noise,
/// and on a shared machine a longer probe averages the others' load over more time.
pub const PROBE_MIN_SPAN: Duration = Duration::from_secs(3);
/// Most samples of the long render: bounds the probe's time on a scene whose samples are cheap.
pub const PROBE_MAX_SAMPLES: u32 = 1024;

/// `blendnet cost`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CostArgs {
    /// The scene.
    pub scene: PathBuf,
    /// Frames: `1`, `1-10` (or `1..10`), `1-10,12` (default: the scene's frame range).
    #[arg(long)]
    pub frames: Option<String>,
    /// Samples per frame (default: the scene's; Cycles only).
    #[arg(long)]
    pub samples: Option<u32>,
    /// The provider: local, aws or gcp (default: the `[cloud]` table's).
    #[arg(long)]
    pub provider: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The Blender that probes the scene (default: `BLENDNET_BLENDER`, then `blender` on PATH).
    #[arg(long, value_name = "PATH")]
    pub blender: Option<PathBuf>,
}

/// What `blendnet cost --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostView {
    /// The scene, absolute.
    pub scene: String,
    pub engine: String,
    pub frames: Vec<u32>,
    pub samples: u32,
    /// `samples`: a still cut into sample slices; `frames`: whole-frame tasks.
    pub split: String,
    pub probe: ProbeView,
    pub provider: String,
    /// The provider's typical boot (launch to first render), seconds.
    pub boot_secs: cost::Range,
    /// How long an instance stays (and is billed) after its last task.
    pub idle_grace_secs: u64,
    pub estimates: Vec<EstimateView>,
    /// What the estimate assumes, for people.
    pub assumptions: Vec<String>,
}

/// The probe and what it rendered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeView {
    #[serde(flatten)]
    pub probe: Probe,
    /// The frame rendered.
    pub frame: u32,
    /// The sample counts rendered, in order (the first one cold).
    pub samples: Vec<u32>,
    /// The seconds each render took, in the same order.
    pub render_secs: Vec<f64>,
    /// Files the scene refers to that are missing (the probe rendered without them).
    pub missing: Vec<String>,
}

/// One instance type's estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimateView {
    #[serde(flatten)]
    pub estimate: Estimate,
    /// The cheapest zone, whose price is used.
    pub zone: Option<String>,
    /// Why the figures need care (no price, a budget that allows no instance).
    pub note: Option<String>,
}

/// Runs `blendnet cost`.
pub fn run(data_dir: &DataDir, args: CostArgs) -> anyhow::Result<()> {
    let config = Config::load(data_dir, &Overrides::default())?;
    let cloud = cloud_config(data_dir, config.cloud.clone(), args.provider.as_deref())?;
    let scene =
        std::path::absolute(&args.scene).with_context(|| format!("{}", args.scene.display()))?;
    if !scene.is_file() {
        bail!("{} is not a file", scene.display());
    }
    let frames = args
        .frames
        .as_deref()
        .map(|text| {
            crate::cli::parse_frames(&text.replace("..", "-"))
                .map_err(|e| anyhow::anyhow!("--frames: {e}"))
        })
        .transpose()?;
    if args.samples == Some(0) {
        bail!("--samples: a frame needs at least 1 sample");
    }
    // The daemon, when one runs, answers as it answers the add-on.
    if args.blender.is_none() {
        let request = CostRequest {
            scene: scene
                .to_str()
                .context("the scene's path is not UTF-8")?
                .to_owned(),
            frames: frames.clone(),
            samples: args.samples,
            provider: args.provider.clone(),
        };
        match Client::connect(data_dir).and_then(|client| client.cost(&request)) {
            Ok(view) => return show(&view, args.json),
            Err(ClientError::NotRunning { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let blender = blendnet_render::discovery::locate_blender(
        args.blender.as_deref(),
        std::env::var_os("BLENDNET_BLENDER").as_deref(),
        std::env::var_os("PATH").as_deref(),
    )?;
    // Build the provider first: a wrong provider or setting is said before Blender runs.
    let provider = crate::cloud_cmd::provider(&cloud)?;
    let request = Request {
        scene,
        frames,
        samples: args.samples,
        threads: config.render_threads,
    };
    let staging = data_dir.path().join("tmp");
    std::fs::create_dir_all(&staging).with_context(|| format!("{}", staging.display()))?;
    let view = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(estimate(&blender, &staging, &request, &*provider, &cloud))?;
    show(&view, args.json)
}

fn show(view: &CostView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(view)?);
    } else {
        print_table(view);
    }
    Ok(())
}

/// What the daemon's `POST /v1/cost` needs of its configuration.
#[derive(Debug, Clone)]
pub struct Daemon {
    pub data_dir: DataDir,
    /// The configured Blender (`blender` in the file, `--blender`), if any.
    pub blender: Option<PathBuf>,
    /// `render_threads`.
    pub threads: Option<u32>,
    /// The `[cloud]` table.
    pub cloud: Option<CloudConfig>,
}

/// Answers `POST /v1/cost`. Cancel-safe: a dropped request kills the probe's Blender.
pub async fn serve(daemon: &Daemon, req: CostRequest) -> Result<CostView, ApiError> {
    let bad = |e: anyhow::Error| ApiError::BadRequest(format!("{e:#}"));
    let scene = PathBuf::from(&req.scene);
    if !scene.is_absolute() {
        return Err(ApiError::BadRequest(format!(
            "{:?} is not an absolute path",
            req.scene
        )));
    }
    if !scene.is_file() {
        return Err(ApiError::BadRequest(format!("{} is not a file", req.scene)));
    }
    if req.frames.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::BadRequest("frames: the list is empty".into()));
    }
    if req.samples == Some(0) {
        return Err(ApiError::BadRequest(
            "samples: a frame needs at least 1 sample".into(),
        ));
    }
    let cloud = cloud_config(
        &daemon.data_dir,
        daemon.cloud.clone(),
        req.provider.as_deref(),
    )
    .map_err(bad)?;
    let blender = blendnet_render::discovery::locate_blender(
        daemon.blender.as_deref(),
        std::env::var_os("BLENDNET_BLENDER").as_deref(),
        std::env::var_os("PATH").as_deref(),
    )
    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    let provider = crate::cloud_cmd::provider(&cloud).map_err(bad)?;
    let staging = daemon.data_dir.path().join("tmp");
    std::fs::create_dir_all(&staging)
        .map_err(|e| ApiError::Internal(format!("{}: {e}", staging.display())))?;
    let request = Request {
        scene,
        frames: req.frames,
        samples: req.samples,
        threads: daemon.threads,
    };
    estimate(&blender, &staging, &request, &*provider, &cloud)
        .await
        .map_err(bad)
}

/// The `[cloud]` table to estimate with: the file's, with `provider` in its place when one is
/// named; without a table, the named provider's defaults.
pub fn cloud_config(
    data_dir: &DataDir,
    table: Option<CloudConfig>,
    provider: Option<&str>,
) -> anyhow::Result<CloudConfig> {
    if let Some(name) = provider
        && !matches!(name, "local" | "aws" | "gcp")
    {
        bail!("unknown cloud provider {name:?}: use local, aws or gcp");
    }
    let mut cloud = match (table, provider) {
        (Some(table), _) => table,
        (None, Some(name)) => {
            let mut cloud: CloudConfig = toml::from_str(&format!("provider = {name:?}"))
                .context("the default [cloud] table")?;
            cloud.local_root = Some(data_dir.path().join("instances"));
            cloud
        }
        (None, None) => bail!(
            "no [cloud] table in {}: name a provider with --provider (local, aws or gcp), or \
             set one in the file",
            data_dir.config().display()
        ),
    };
    if let Some(name) = provider {
        cloud.provider = name.to_owned();
    }
    Ok(cloud)
}

/// What to estimate.
#[derive(Debug, Clone)]
pub struct Request {
    /// The scene, absolute.
    pub scene: PathBuf,
    /// The frames (default: the scene's range).
    pub frames: Option<Vec<u32>>,
    /// Samples per frame (default: the scene's).
    pub samples: Option<u32>,
    /// Blender's render threads (default: every core).
    pub threads: Option<u32>,
}

/// Reads the scene, probes it with `blender` in a folder under `staging`, and estimates the job
/// on each of `provider`'s instance types.
pub async fn estimate(
    blender: &Path,
    staging: &Path,
    request: &Request,
    provider: &dyn Provider,
    cloud: &CloudConfig,
) -> anyhow::Result<CostView> {
    let dir = tempfile::Builder::new()
        .prefix("cost-")
        .tempdir_in(staging)
        .with_context(|| format!("making a folder in {}", staging.display()))?;
    let name = request
        .scene
        .file_name()
        .context("the scene has no file name")?;
    let collected =
        blendnet_render::collect::collect(blender, &request.scene, &dir.path().join(name)).await?;
    let info = &collected.scene;
    if !info.camera {
        bail!("scene {:?} has no camera", info.name);
    }
    let frames = match &request.frames {
        Some(frames) => frames.clone(),
        None => crate::render_cmd::scene_frames(
            info.frame_start.into(),
            info.frame_end.into(),
            info.frame_step.into(),
        )?,
    };
    let first = *frames.first().context("no frame to estimate")?;
    let cycles = info.engine == "CYCLES";
    let samples = if cycles {
        request.samples.or(info.samples).unwrap_or(1)
    } else {
        1
    };
    let probe = probe(blender, &request.scene, dir.path(), first, cycles, request).await?;

    let work = Work {
        frames: u32::try_from(frames.len()).unwrap_or(u32::MAX),
        samples,
        split_samples: cycles && frames.len() == 1,
        target_task_secs: blendnet_proto::job::DEFAULT_TARGET_TASK_SECS,
    };
    let limits = cloud.limits();
    let boot = Boot::of(provider.name());
    let host_cores = (provider.name() == "local").then(machine_cores);
    let mut estimates = Vec::new();
    for t in provider.instance_types().await? {
        let (per_hour, zone, mut note) = match provider.prices(&t.name, cloud.spot).await {
            Ok(prices) => match prices
                .into_iter()
                .min_by(|a, b| a.per_hour.total_cmp(&b.per_hour))
            {
                Some(p) => (p.per_hour, Some(p.zone), None),
                None => (
                    0.0,
                    None,
                    Some("no price listed: counted as free".to_owned()),
                ),
            },
            Err(e) => (0.0, None, Some(format!("no price ({e}): counted as free"))),
        };
        let mut instances = cost::instances(&probe.probe, &work, t.cores, per_hour, &limits);
        if instances == 0 {
            note = Some("budget_per_hour allows no instance: shown for one".to_owned());
            instances = 1;
        }
        let offer = Offer {
            instance_type: t.name.clone(),
            cores: t.cores,
            per_hour,
            instances,
            host_cores,
        };
        estimates.push(EstimateView {
            estimate: cost::estimate(&probe.probe, &work, &offer, boot, limits.idle_grace_secs),
            zone,
            note,
        });
    }
    let mut assumptions = vec![
        "render time is linear in cores: a sample on C cores takes probe cores / C of the \
         probe's time (the main source of error for large types)"
            .to_owned(),
        format!(
            "the range allows {:.0}% for the probe's noise, and {:.0}% slower rendering on a type \
             whose cores differ from the probe's",
            cost::PROBE_SPREAD * 100.0,
            cost::SCALING_LOSS * 100.0
        ),
        format!(
            "instances as the provisioner keeps them (max_instances {}, horizon {} s), all \
             starting together; the mesh's own render peers are not counted",
            limits.max_instances, limits.horizon_secs
        ),
        "money: every instance billed from launch until idle_grace after the job, at the \
         cheapest zone's price"
            .to_owned(),
    ];
    if host_cores.is_some() {
        assumptions.push("local instances share this machine's cores".to_owned());
    } else {
        assumptions.push("the scene's upload to the instances is not counted".to_owned());
    }
    Ok(CostView {
        scene: request.scene.display().to_string(),
        engine: info.engine.clone(),
        frames,
        samples,
        split: if work.split_samples {
            "samples"
        } else {
            "frames"
        }
        .to_owned(),
        probe,
        provider: provider.name().to_owned(),
        boot_secs: cost::Range {
            low: boot.low,
            high: boot.high,
        },
        idle_grace_secs: limits.idle_grace_secs,
        estimates,
        assumptions,
    })
}

/// This machine's cores.
fn machine_cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
}

/// Renders `frame` of `scene` a few times on this machine (Cycles: sample slices of
/// [`PROBE_LOW`] and more samples; other engines: the whole frame twice) and fits the probe.
async fn probe(
    blender: &Path,
    scene: &Path,
    dir: &Path,
    frame: u32,
    cycles: bool,
    request: &Request,
) -> anyhow::Result<ProbeView> {
    let cores = request.threads.unwrap_or_else(machine_cores);
    let out = dir.join("out");
    std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
    let started = Instant::now();
    let mut worker = Worker::start_with_threads(blender, scene, dir, request.threads)
        .await
        .with_context(|| format!("probing {}", scene.display()))?;
    let load_secs = started.elapsed().as_secs_f64();
    let missing = worker.ready().missing.clone();
    let frame_i32 = i32::try_from(frame).context("the frame number is too large")?;
    let mut id = 0;
    let mut render = |samples: u32| {
        id += 1;
        RenderTask {
            id,
            mode: if cycles {
                SliceMode::Slice
            } else {
                SliceMode::Frames
            },
            frames: vec![frame_i32],
            samples,
            frame_samples: samples,
            sample_offset: 0,
            output_dir: out.clone(),
            allow_missing: !missing.is_empty(),
        }
    };
    let low = if cycles { PROBE_LOW } else { 1 };
    let cold = timed(&mut worker, &render(low), frame).await?;
    let mut rendered = vec![(low, cold)];
    let warm = timed(&mut worker, &render(low), frame).await?;
    rendered.push((low, warm));
    let mut high = low;
    let mut high_secs = warm;
    if cycles {
        high = PROBE_HIGH;
        loop {
            high_secs = timed(&mut worker, &render(high), frame).await?;
            rendered.push((high, high_secs));
            if high_secs - warm >= PROBE_MIN_SPAN.as_secs_f64() || high >= PROBE_MAX_SAMPLES {
                break;
            }
            high = (high * 4).min(PROBE_MAX_SAMPLES);
        }
    }
    worker.quit().await;
    let probe = Probe::fit(cores, load_secs, low, cold, warm, high, high_secs);
    tracing::debug!(?probe, ?rendered, "probe");
    Ok(ProbeView {
        probe,
        frame,
        samples: rendered.iter().map(|(n, _)| *n).collect(),
        render_secs: rendered.iter().map(|(_, s)| *s).collect(),
        missing,
    })
}

/// Renders `task` on `worker`; the seconds it took.
async fn timed(worker: &mut Worker, task: &RenderTask, frame: u32) -> anyhow::Result<f64> {
    let started = Instant::now();
    worker
        .render(task, |_| {})
        .await
        .with_context(|| format!("the probe render of frame {frame}"))?;
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds for people: `42 s`, `3.5 min`, `2.1 h`.
fn duration(secs: f64) -> String {
    if secs < 120.0 {
        format!("{secs:.0} s")
    } else if secs < 7200.0 {
        format!("{:.1} min", secs / 60.0)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

fn print_table(view: &CostView) {
    let p = &view.probe;
    println!(
        "probe: frame {} on {} cores of this machine: {:.4} s per sample, {:.2} s per frame, \
         Blender start and scene load {:.1} s (+{:.1} s on the first render)",
        p.frame,
        p.probe.cores,
        p.probe.sample_secs,
        p.probe.frame_secs,
        p.probe.load_secs,
        p.probe.first_render_secs
    );
    if !p.missing.is_empty() {
        println!(
            "  ({} file(s) the scene uses are missing; probed without them)",
            p.missing.len()
        );
    }
    println!(
        "job: {} frame(s) × {} samples, split by {}",
        view.frames.len(),
        view.samples,
        view.split
    );
    println!(
        "provider {}: instances boot in {}–{}, and stay {} after the job",
        view.provider,
        duration(view.boot_secs.low),
        duration(view.boot_secs.high),
        duration(view.idle_grace_secs as f64)
    );
    println!(
        "{:<10} {:<20} {:>5} {:>9}  {:<20} {:<18}",
        "PROVIDER", "TYPE", "CORES", "INSTANCES", "TIME", "MONEY (USD)"
    );
    for e in &view.estimates {
        let x = &e.estimate;
        println!(
            "{:<10} {:<20} {:>5} {:>9}  {:<20} {:<18}{}",
            view.provider,
            x.instance_type,
            x.cores,
            x.instances,
            format!("{} – {}", duration(x.secs.low), duration(x.secs.high)),
            format!("{:.2} – {:.2}", x.dollars.low, x.dollars.high),
            e.note
                .as_deref()
                .map(|n| format!("  ({n})"))
                .unwrap_or_default()
        );
    }
    println!("assuming:");
    for a in &view.assumptions {
        println!("  - {a}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_is_the_tables_or_the_named_one_and_an_unknown_one_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::resolve(Some(tmp.path().to_path_buf())).unwrap();
        let err = cloud_config(&dir, None, Some("azure")).unwrap_err();
        assert!(err.to_string().contains("\"azure\""), "{err}");
        let err = cloud_config(&dir, None, None).unwrap_err();
        assert!(err.to_string().contains("--provider"), "{err}");
        let local = cloud_config(&dir, None, Some("local")).unwrap();
        assert_eq!(local.provider, "local");
        assert_eq!(local.limits().max_instances, 0);
        let mut table = local.clone();
        table.max_instances = 3;
        let aws = cloud_config(&dir, Some(table), Some("aws")).unwrap();
        assert_eq!((aws.provider.as_str(), aws.max_instances), ("aws", 3));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(42.4), "42 s");
        assert_eq!(duration(210.0), "3.5 min");
        assert_eq!(duration(3.0 * 3600.0), "3.0 h");
    }
}
