//! The command line: `blendnet <command>`. Every command but `up`, `init`, `join` and `merge`
//! is a client of the running daemon's local API.

use crate::api::{
    AdmitRequest, FetchRequest, InviteRequest, RevokeRequest, StoreAddRequest, StoreGetRequest,
    SubmitRequest,
};
use crate::client::Client;
use crate::config::{Config, Overrides};
use crate::data_dir::DataDir;
use crate::logging;
use anyhow::{Context, bail};
use blendnet_proto::{InviteCode, Roles};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;

/// BlendNet: render Blender scenes on every machine you own or rent, as one private mesh.
#[derive(Debug, Parser)]
#[command(name = "blendnet", version)]
pub struct Cli {
    /// The node's data directory (keys, state, logs, config).
    #[arg(long, global = true, env = "BLENDNET_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new mesh: its key and this node's key. Prints the mesh id.
    Init,
    /// Run the daemon in the foreground.
    Up(UpArgs),
    /// Join the mesh named in a cloud instance's user data with its one-time token (unless
    /// this node already is a member), then run the daemon like `up`: what a cloud instance
    /// runs at boot.
    Enroll(EnrollArgs),
    /// Print a single-use, expiring invite code for another machine.
    Invite {
        /// How long the code stays valid: 30s, 10m, 1h, 2d.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Roles the new member gets: submit, render, coordinate, provision.
        #[arg(long, default_value = "submit,render,coordinate")]
        roles: String,
        /// Only this cloud instance may redeem the code, proving it with its cloud's signed
        /// identity: `aws:INSTANCE_ID` or `gcp:INSTANCE_NAME` (needs the [cloud] trust roots,
        /// `aws_identity_certificate` or `gcp_identity_keys`).
        #[arg(long, value_name = "CLOUD:ID")]
        instance: Option<String>,
    },
    /// Prepare this data directory to join a mesh; the next `up` redeems the code.
    Join {
        /// The code printed by `blendnet invite` on a member.
        code: String,
    },
    /// Admit a machine announced on the LAN (see `peers --pending`).
    Admit {
        /// The fingerprint the new machine printed at start, like K3QF-7ZPA.
        fingerprint: String,
    },
    /// Remove a member from the mesh; it is disconnected everywhere.
    Revoke {
        /// The member's peer id.
        peer: String,
    },
    /// List the mesh's members (or, with --pending, machines waiting on the LAN).
    Peers {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// List machines waiting on the LAN to be admitted instead.
        #[arg(long)]
        pending: bool,
    },
    /// Show this node's status, or with JOB, a job's.
    Status {
        /// A job id (as `jobs` prints it); without it, this node.
        job: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Render a scene already in the store (`store add`) across the mesh; prints the job id.
    Submit(SubmitArgs),
    /// List the jobs this node knows, newest last.
    Jobs {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the logs of a job's tasks that this node rendered (Blender's last lines included).
    Logs {
        /// The job id.
        job: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job submitted from this node: running tasks stop, nothing more is rendered.
    Cancel {
        /// The job id.
        job: String,
    },
    /// See the mesh work: a throwaway two-node mesh renders a generated scene sliced across
    /// both nodes, compared with a local render of it.
    Demo(crate::demo::DemoArgs),
    /// Render a .blend across the mesh: collect its files, upload them, submit; with --wait,
    /// follow it until the frames are in the output folder.
    Render(crate::render_cmd::RenderArgs),
    /// Copy the finished frames of a job (submitted from any peer) into a folder.
    Fetch {
        /// The job id.
        job: String,
        /// Where the frames go (default: the current directory).
        #[arg(long, value_name = "DIR", default_value = ".")]
        out: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The blob store: add files, fetch them from the mesh, list, collect garbage.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Cloud instances started by hand with the provider of `[cloud]` in blendnet.toml.
    #[command(subcommand)]
    Cloud(crate::cloud_cmd::CloudCommand),
    /// Estimate a job's time and money on each instance type of a cloud provider, from a short
    /// probe render of the scene on this machine and the provider's prices; no daemon needed.
    Cost(crate::cost_cmd::CostArgs),
    /// Merge partial renders of one frame (sample slices, multilayer EXRs) exactly as Cycles
    /// does; runs locally, no daemon needed.
    Merge(MergeArgs),
    /// Open the status page: prints a one-time login link (valid five minutes) and opens it in
    /// the desktop's browser when there is one.
    Web {
        /// Only print the link.
        #[arg(long)]
        no_open: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The slices, multilayer EXRs rendered with the same seed and different sample offsets.
    /// The first one's copied passes (Depth, IndexOB, Crypto…) and metadata are kept.
    #[arg(required = true, value_name = "IN.exr")]
    pub inputs: Vec<PathBuf>,
    /// The merged EXR to write (atomically: nothing appears there unless it is complete).
    #[arg(short, long, value_name = "OUT.exr")]
    pub output: PathBuf,
    /// Also write an sRGB PNG preview of the Combined pass.
    #[arg(long, value_name = "OUT.png")]
    pub preview: Option<PathBuf>,
    /// The preview's long side in pixels (never enlarged).
    #[arg(long, value_name = "PX", default_value_t = blendnet_exr::DEFAULT_PREVIEW_SIZE)]
    pub preview_size: u32,
    /// The view layer the preview shows (default: the first with a Combined pass).
    #[arg(long, value_name = "NAME")]
    pub preview_layer: Option<String>,
    /// Worker threads (default: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// The scene's manifest hash, as `store add` printed it.
    pub scene: String,
    /// The `.blend` to render: its path inside the manifest.
    #[arg(long, value_name = "PATH")]
    pub blend: String,
    /// Frames: `1`, `1-10`, `1-10,12,20-25`.
    #[arg(long, default_value = "1")]
    pub frames: String,
    /// Samples per frame (Cycles).
    #[arg(long, default_value_t = 128)]
    pub samples: u32,
    /// How to cut the job: auto (sample slices for a Cycles still, else frames), samples, frames.
    #[arg(long, default_value = "auto")]
    pub split: String,
    /// The scene's render engine, as Blender names it.
    #[arg(long, default_value = "CYCLES")]
    pub engine: String,
    /// A name for people (default: the .blend's path).
    #[arg(long)]
    pub name: Option<String>,
    /// The render time a task aims at, in seconds.
    #[arg(long)]
    pub target_task_secs: Option<u32>,
    /// Frames per task when split by frames.
    #[arg(long)]
    pub frames_per_task: Option<u32>,
    /// The Blender the scene needs, major.minor (default: this node's); only peers with it
    /// render the job.
    #[arg(long, value_name = "MAJOR.MINOR")]
    pub blender_version: Option<String>,
    /// Where this node puts the finished frames, whoever renders them (kept if this command
    /// exits).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Parses a frame list: `1`, `1-10`, `1-10,12,20-25` (each frame once, in the order given).
pub fn parse_frames(text: &str) -> Result<Vec<u32>, String> {
    let mut frames = Vec::new();
    for part in text.split(',').map(str::trim) {
        let (start, end) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |s: &str| {
            s.parse::<u32>()
                .map_err(|_| format!("{part:?} is not a frame or a range like 1-10"))
        };
        let (start, end) = (parse(start)?, parse(end)?);
        if end < start {
            return Err(format!("the range {part:?} ends before it starts"));
        }
        if (end - start) as usize >= blendnet_proto::job::MAX_FRAMES {
            return Err(format!(
                "the range {part:?} has more than {} frames",
                blendnet_proto::job::MAX_FRAMES
            ));
        }
        for frame in start..=end {
            if frames.contains(&frame) {
                return Err(format!("frame {frame} is listed twice"));
            }
            frames.push(frame);
        }
    }
    Ok(frames)
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Import files and directories as one manifest; prints its hash.
    Add {
        /// Files and directories; one directory alone keeps its own layout.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Fetch a manifest and its files from the mesh, verified, into a directory.
    Get {
        /// The manifest hash printed by `store add`.
        hash: String,
        /// Where to write the files (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Fetch only from this peer.
        #[arg(long, value_name = "PEER")]
        from: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List the blobs held.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Delete unpinned blobs and abandoned downloads.
    Gc,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Start a new mesh first if this node is in none and is not joining one (as `init` does).
    #[arg(long)]
    pub init: bool,
    /// Address to listen on for peers (repeatable). Default: TCP and QUIC on port 7741.
    #[arg(long, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Address of a member to connect to first (repeatable).
    #[arg(long, value_name = "MULTIADDR")]
    pub bootstrap: Vec<String>,
    /// Where the local API listens. Default: 127.0.0.1 and a free port.
    #[arg(long, value_name = "HOST:PORT")]
    pub api: Option<SocketAddr>,
    /// Also serve the status page on this address, over TLS (for browsers on other machines).
    #[arg(long, value_name = "HOST:PORT")]
    pub web: Option<SocketAddr>,
    /// Take no render tasks.
    #[arg(long)]
    pub no_render: bool,
    /// Do not announce or discover machines on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// A libp2p pre-shared key file (swarm.key): hides the mesh from scanners; TCP only.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// The Blender executable (else BLENDNET_BLENDER, else `blender` on PATH).
    #[arg(long, value_name = "PATH")]
    pub blender: Option<PathBuf>,
    /// How many threads Blender renders with (default: every core).
    #[arg(long, value_name = "N")]
    pub render_threads: Option<u32>,
    /// Watch this cloud's preemption notices (`aws` or `gcp`): on notice, hand back the
    /// running task and leave the mesh.
    #[arg(long, value_name = "CLOUD")]
    pub preemption: Option<String>,
    /// What an hour of this machine costs, in US dollars: reported with every task it
    /// renders, so jobs can say what they cost.
    #[arg(long, value_name = "DOLLARS")]
    pub price_per_hour: Option<f64>,
}

/// `blendnet enroll`'s arguments.
#[derive(Debug, clap::Args)]
pub struct EnrollArgs {
    /// The user data the provisioner gave this instance (JSON: mesh, bootstrap, token...).
    #[arg(long, value_name = "FILE")]
    pub user_data: PathBuf,
    #[command(flatten)]
    pub up: UpArgs,
}

/// Parses a TTL such as `30s`, `10m`, `1h` or `2d` into seconds.
pub fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let bad = || anyhow::anyhow!("invalid TTL {text:?}: use a number with s, m, h or d, like 1h");
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| bad())?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    match n.checked_mul(scale) {
        Some(0) | None => Err(bad()),
        Some(secs) => Ok(secs),
    }
}

/// Runs the daemon in the foreground until it is stopped.
fn up(data_dir: DataDir, args: UpArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen,
        bootstrap: args.bootstrap,
        api: args.api,
        web: args.web,
        no_render: args.no_render,
        no_mdns: args.no_mdns,
        psk_file: args.psk_file,
        blender: args.blender,
        render_threads: args.render_threads,
        preemption: args.preemption,
        price_per_hour: args.price_per_hour,
    };
    let config = Config::load(&data_dir, &overrides)?;
    if args.init && crate::node::may_init(&data_dir)? {
        let mesh = crate::node::init(&data_dir)?;
        eprintln!("created mesh {mesh}");
    }
    let _guard = logging::init(&data_dir, &config.log_level, config.max_log_files)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(crate::node::up(data_dir, config))
}

/// Reads a cloud instance's user data and, unless this node is in a mesh or joining one
/// already (an instance that reboots), prepares it to join with the token. Returns the
/// user data, with the bootstrap addresses to dial: none while joining (the token leads to the provisioner; a
/// non-member dialling members as a bootstrap peer had its redemption of a spent token cut
/// off instead of refused), the user data's once a member.
fn enroll(
    data_dir: &DataDir,
    path: &std::path::Path,
) -> anyhow::Result<blendnet_cloud::userdata::UserData> {
    use blendnet_cloud::userdata::{MAX_USER_DATA_BYTES, UserData};
    use std::io::Read as _;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(MAX_USER_DATA_BYTES as u64 + 1)
                .read_to_string(&mut text)
        })
        .with_context(|| format!("reading the user data {}", path.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let data = UserData::parse(&text, now).with_context(|| path.display().to_string())?;
    if crate::node::may_init(data_dir)? {
        let code = InviteCode::decode(&data.token).context("the user data's token")?;
        if code.mesh.to_string() != data.mesh {
            bail!(
                "the user data's token is for mesh {}, not the mesh it names ({})",
                code.mesh,
                data.mesh
            );
        }
        code.check_expiry(now)?;
        crate::node::join(data_dir, &code)?;
        if let Some(cloud) = &data.identity {
            let cloud: blendnet_cloud::preempt::Cloud = cloud
                .parse()
                .map_err(|e: String| anyhow::anyhow!("the user data's identity: {e}"))?;
            let audience = code.mesh.to_string();
            let proof = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?
                .block_on(blendnet_cloud::preempt::Watcher::new(cloud).identity(&audience))
                .map_err(|e| anyhow::anyhow!("fetching this instance's identity proof: {e}"))?;
            crate::node::set_join_proof(data_dir, &proof)?;
        }
        eprintln!("enrolling in mesh {}", code.mesh);
        return Ok(UserData {
            bootstrap: Vec::new(),
            ..data
        });
    }
    Ok(data)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Runs the command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The demo makes its own throwaway nodes.
    let cli = match cli {
        Cli {
            command: Command::Demo(args),
            ..
        } => return crate::demo::demo(args),
        cli => cli,
    };
    // Every command but `join` opens (and creates) the data directory first; `join` checks its
    // code before, so a garbled code changes nothing on disk.
    let data_dir = || DataDir::resolve(cli.data_dir.clone());
    let data_dir = match &cli.command {
        Command::Join { code } => {
            let code = InviteCode::decode(code)?;
            code.check_expiry(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            )?;
            crate::node::join(&data_dir()?, &code)?;
            println!(
                "joining mesh {}: run `blendnet up` to redeem the invite",
                code.mesh
            );
            return Ok(());
        }
        // A merge is local file work: it neither needs nor creates a data directory.
        Command::Merge(args) => return merge(args),
        _ => data_dir()?,
    };
    match cli.command {
        Command::Join { .. } | Command::Merge(_) | Command::Demo(_) => {}
        Command::Init => {
            let mesh = crate::node::init(&data_dir)?;
            eprintln!("created mesh; start the node with `blendnet up`");
            println!("{mesh}");
        }
        Command::Up(args) => up(data_dir, args)?,
        Command::Enroll(args) => {
            let mut up_args = args.up;
            let data = enroll(&data_dir, &args.user_data)?;
            up_args.bootstrap.extend(data.bootstrap);
            up_args.preemption = up_args.preemption.or(data.preemption);
            // The instance's launch price, so the tasks it renders carry their cost.
            up_args.price_per_hour = up_args
                .price_per_hour
                .or(data.price_per_hour_micros.map(|m| m as f64 / 1e6));
            up_args.init = false;
            up(data_dir, up_args)?;
        }
        Command::Invite {
            ttl,
            roles,
            instance,
        } => {
            let ttl_secs = parse_ttl(&ttl)?;
            let parsed: Roles = roles.parse()?;
            if parsed.is_empty() {
                bail!("an invite needs at least one role");
            }
            if let Some(text) = &instance {
                blendnet_cloud::identity::parse_instance(text)?;
            }
            let view = Client::connect(&data_dir)?.invite(&InviteRequest {
                ttl_secs,
                roles: parsed.names(),
                cert_lifetime_secs: None,
                instance,
            })?;
            println!("{}", view.code);
        }
        Command::Admit { fingerprint } => {
            let peer = Client::connect(&data_dir)?.admit(&AdmitRequest { fingerprint })?;
            println!("admitted {}", peer.peer_id);
        }
        Command::Revoke { peer } => {
            let peer = Client::connect(&data_dir)?.revoke(&RevokeRequest { peer })?;
            println!("revoked {}", peer.peer_id);
        }
        Command::Peers { json, pending } => {
            let peers = Client::connect(&data_dir)?.peers(pending)?;
            if json {
                return print_json(&peers);
            }
            let list = peers.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!(
                    "{}",
                    if pending {
                        "no machine is waiting on the LAN"
                    } else {
                        "no members"
                    }
                );
            }
            for p in list {
                let s = |k: &str| p.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_string();
                if pending {
                    println!("{}  {}", s("fingerprint"), s("peer_id"));
                    continue;
                }
                let online = p.get("online").and_then(|v| v.as_bool()).unwrap_or(false);
                let roles: Vec<String> = p
                    .get("roles")
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|r| r.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                let me = if p.get("is_self").and_then(|v| v.as_bool()).unwrap_or(false) {
                    " (this node)"
                } else {
                    ""
                };
                // Device kinds as Cycles names them: CPU, CUDA, OPTIX, …
                let mut devices: Vec<&str> = p
                    .pointer("/capabilities/devices")
                    .and_then(|v| v.as_array())
                    .map(|a| a.iter().filter_map(|d| d.get("kind")?.as_str()).collect())
                    .unwrap_or_default();
                devices.dedup();
                let devices = if devices.is_empty() {
                    "-".to_string()
                } else {
                    devices.join(",")
                };
                let rendering = match p.get("rendering") {
                    Some(r) if !r.is_null() => format!(
                        "  rendering {} frame {} samples {}/{}",
                        r["job"].as_str().map_or("-", |j| &j[..j.len().min(12)]),
                        r["task"]["frame_start"].as_u64().unwrap_or(0)
                            + r["frames_done"].as_u64().unwrap_or(0),
                        r["samples_done"].as_u64().unwrap_or(0),
                        r["task"]["samples"].as_u64().unwrap_or(0),
                    ),
                    _ => String::new(),
                };
                println!(
                    "{}  {:7}  {}  blender {}  devices {devices}  roles {}{me}{rendering}",
                    s("fingerprint"),
                    if online { "online" } else { "offline" },
                    s("peer_id"),
                    s("blender"),
                    roles.join(",")
                );
            }
        }
        Command::Store(command) => store(&data_dir, command)?,
        Command::Cloud(command) => crate::cloud_cmd::run(&data_dir, command)?,
        Command::Status {
            job: Some(job),
            json,
        } => {
            let client = Client::connect(&data_dir)?;
            let view = client.job(&job)?;
            if json {
                return print_json(&view);
            }
            print_job(&view);
            // Say why an active job does not move when no peer can render it.
            let wanted = view.pointer("/spec/blender").and_then(|v| v.as_str());
            if status_word(view.pointer("/summary/status")) == "active"
                && let Some(wanted) = wanted
            {
                let peers = client.peers(false)?;
                let wanted_mm = blendnet_proto::job::major_minor(wanted);
                let matches = peers.as_array().into_iter().flatten().any(|p| {
                    p["online"] == true
                        && p["blender"]
                            .as_str()
                            .and_then(blendnet_proto::job::major_minor)
                            .is_some_and(|v| Some(v) == wanted_mm)
                });
                if !matches {
                    println!(
                        "  waiting: no online peer has Blender {wanted}, which this scene needs"
                    );
                }
            }
        }
        Command::Status { job: None, json } => {
            let status = Client::connect(&data_dir)?.status()?;
            if json {
                return print_json(&status);
            }
            println!("peer        {}", status.peer_id);
            println!("fingerprint {}", status.fingerprint);
            println!("state       {}", status.state);
            println!("mesh        {}", status.mesh_id.as_deref().unwrap_or("-"));
            println!("roles       {}", status.roles.join(","));
            println!("peers       {} online", status.peer_count);
            for a in &status.listen_addrs {
                println!("listening   {a}");
            }
        }
        Command::Submit(args) => {
            let frames =
                parse_frames(&args.frames).map_err(|e| anyhow::anyhow!("--frames: {e}"))?;
            let job = Client::connect(&data_dir)?.submit(&SubmitRequest {
                scene: args.scene,
                blend: args.blend,
                frames,
                samples: args.samples,
                split: Some(args.split),
                engine: Some(args.engine),
                name: args.name,
                target_task_secs: args.target_task_secs,
                frames_per_task: args.frames_per_task,
                blender: args.blender_version,
                out: args.out.as_deref().map(absolute).transpose()?,
            })?;
            if args.json {
                return print_json(&job);
            }
            println!("{}", job.job);
        }
        Command::Jobs { json } => {
            let jobs = Client::connect(&data_dir)?.jobs()?;
            if json {
                return print_json(&jobs);
            }
            let list = jobs.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no jobs");
            }
            for job in &list {
                println!("{}", job_line(job));
            }
        }
        Command::Logs { job, json } => {
            let logs = Client::connect(&data_dir)?.job_logs(&job)?;
            if json {
                return print_json(&logs);
            }
            let list = logs.as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("this node rendered no task of job {job}");
            }
            for entry in &list {
                println!("=== {}", entry["task"].as_str().unwrap_or("-"));
                println!("{}", entry["log"].as_str().unwrap_or(""));
            }
        }
        Command::Cancel { job } => {
            let job = Client::connect(&data_dir)?.cancel(&job)?;
            println!("cancelled {}", job.job);
        }
        Command::Render(args) => crate::render_cmd::render(&data_dir, args)?,
        Command::Cost(args) => crate::cost_cmd::run(&data_dir, args)?,
        Command::Web { no_open } => web(&data_dir, no_open)?,
        Command::Fetch { job, out, json } => {
            let request = FetchRequest {
                out: absolute(&out)?,
            };
            let view = Client::connect(&data_dir)?.job_fetch(&job, &request)?;
            if json {
                return print_json(&view);
            }
            for file in &view.files {
                println!("{file}");
            }
            if !view.complete {
                eprintln!("the job is not done: these are the frames finished so far");
            }
        }
    }
    Ok(())
}

/// `blendnet merge`: merges the slices, prints what went in and what came out.
fn merge(args: &MergeArgs) -> anyhow::Result<()> {
    let options = blendnet_exr::MergeOptions {
        threads: args.threads,
        preview: args
            .preview
            .clone()
            .map(|path| blendnet_exr::PreviewOptions {
                path,
                max_size: args.preview_size,
                layer: args.preview_layer.clone(),
            }),
        progress: None,
    };
    let report = blendnet_exr::merge(&args.inputs, &args.output, &options)?;
    let time = blendnet_exr::format_duration;
    for input in &report.inputs {
        let samples: Vec<String> = input
            .samples
            .iter()
            .map(|(layer, n)| format!("{layer} {n}"))
            .collect();
        println!(
            "  {}  samples: {}  render time {}",
            input.path.display(),
            samples.join(", "),
            time(input.render_time)
        );
    }
    for layer in &report.layers {
        println!(
            "{}: {} samples, render time {}, total time {}",
            layer.name,
            layer.samples,
            time(layer.render_time),
            time(layer.total_time)
        );
    }
    println!(
        "merged {} inputs ({}×{}, {} channels, render time {}) into {} in {:.2} s",
        report.inputs.len(),
        report.width,
        report.height,
        report.channels,
        time(report.render_time),
        report.output.display(),
        report.elapsed.as_secs_f64()
    );
    if let Some(preview) = &report.preview {
        println!(
            "preview of {} ({}×{}) in {}",
            preview.layer,
            preview.width,
            preview.height,
            preview.path.display()
        );
    }
    Ok(())
}

/// One line for a job: id, state, progress, name.
fn job_line(job: &serde_json::Value) -> String {
    let text = |k: &str| {
        job.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_string()
    };
    let number = |k: &str| job.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let (done, total) = (number("done_units"), number("total_units"));
    let percent = if total == 0 {
        0.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    format!(
        "{}  {:10}  {percent:5.1}%  {}",
        text("id"),
        status_word(job.get("status")),
        text("name")
    )
}

/// A job status as one word: `active`, `done`, `cancelled`, `failed`.
pub(crate) fn status_word(status: Option<&serde_json::Value>) -> String {
    match status {
        Some(serde_json::Value::String(s)) => s.to_lowercase(),
        Some(serde_json::Value::Object(map)) => map
            .keys()
            .next()
            .map(|k| k.to_lowercase())
            .unwrap_or_else(|| "-".into()),
        _ => "-".into(),
    }
}

/// A job's status for people: its line, then each frame's progress and each failure.
fn print_job(view: &serde_json::Value) {
    let summary = view.get("summary").cloned().unwrap_or_default();
    println!("{}", job_line(&summary));
    if let Some(serde_json::Value::Object(map)) = summary.get("status")
        && let Some(reason) = map
            .values()
            .next()
            .and_then(|v| v.get("reason"))
            .and_then(|v| v.as_str())
    {
        println!("  reason: {reason}");
    }
    if summary.get("inexact").and_then(|v| v.as_bool()) == Some(true) {
        println!(
            "  note: some slices' samples differ from a single render's (a Blender without \
             sample_offset, or a sampling pattern that depends on the sample count), so the \
             frame will match a local render statistically, not pixel for pixel"
        );
    }
    if let Some(coordinator) = summary.get("coordinator").and_then(|c| c.as_array()) {
        let epoch = coordinator.first().and_then(|v| v.as_u64()).unwrap_or(0);
        let peer = coordinator.get(1).and_then(|v| v.as_str()).unwrap_or("-");
        println!("  coordinator: {peer} (epoch {epoch})");
    }
    for frame in view
        .get("frames")
        .and_then(|f| f.as_array())
        .into_iter()
        .flatten()
    {
        let n = |k: &str| frame.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        println!(
            "  frame {:5}  {}/{} samples",
            n("frame"),
            n("samples_done"),
            n("samples")
        );
    }
    for task in view
        .get("tasks")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        for failure in task
            .get("failures")
            .and_then(|f| f.as_array())
            .into_iter()
            .flatten()
        {
            let peer = failure.get(0).and_then(|v| v.as_str()).unwrap_or("-");
            let reason = failure.get(1).and_then(|v| v.as_str()).unwrap_or("-");
            println!("  failed on {peer}: {reason}");
        }
    }
    if let Some(stats) = view.get("stats") {
        for line in time_lines(stats) {
            println!("  {line}");
        }
    }
}

/// Where a job's time (and money) went, for people: a line of the phases summed over the
/// tasks' reports, then one line per worker.
fn time_lines(stats: &serde_json::Value) -> Vec<String> {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    let secs = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    let mut lines = Vec::new();
    if n(stats, "reports") == 0 {
        return lines;
    }
    let phases = stats.get("phases").cloned().unwrap_or_default();
    let parts: Vec<String> = [
        ("wait", "wait_ms"),
        ("fetch", "fetch_ms"),
        ("Blender start", "blender_start_ms"),
        ("render", "render_ms"),
        ("merge", "merge_ms"),
        ("upload", "upload_ms"),
    ]
    .iter()
    .filter(|(_, key)| n(&phases, key) > 0)
    .map(|(name, key)| format!("{name} {}", secs(n(&phases, key))))
    .collect();
    let wall = match stats.get("wall_ms").and_then(|v| v.as_u64()) {
        Some(ms) => format!("{} wall", secs(ms)),
        None => "wall time not seen here".to_owned(),
    };
    let mut line = format!(
        "time: {wall}; tasks {} in all: {}",
        secs(n(stats, "task_wall_ms")),
        parts.join(", ")
    );
    let (retries, failures) = (n(stats, "retries"), n(stats, "failures"));
    if retries + failures > 0 {
        line.push_str(&format!("; {retries} retries, {failures} failures"));
    }
    match stats.get("cost").and_then(|v| v.as_f64()) {
        Some(cost) => line.push_str(&format!("; cost ${cost:.4}")),
        None => line.push_str("; cost unknown"),
    }
    let unpriced = stats
        .get("unpriced_peers")
        .and_then(|v| v.as_array())
        .map_or(0, Vec::len);
    if unpriced > 0 && stats.get("cost").is_some_and(|c| c.is_number()) {
        line.push_str(&format!(" (without {unpriced} unpriced peers)"));
    }
    lines.push(line);
    for peer in stats
        .get("peers")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let id = peer.get("peer").and_then(|v| v.as_str()).unwrap_or("-");
        let speed = peer
            .get("samples_per_second")
            .and_then(|v| v.as_f64())
            .map_or_else(|| "-".to_owned(), |s| format!("{s:.1}"));
        lines.push(format!(
            "peer {id}: {} tasks, {} frame-samples in {} of render ({speed} samples/s)",
            n(peer, "tasks"),
            n(peer, "units"),
            secs(n(peer, "render_ms")),
        ));
    }
    lines
}

/// `path` made absolute against the current directory (the daemon's differs).
fn absolute(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::path::absolute(path)
        .with_context(|| format!("{}", path.display()))?
        .display()
        .to_string())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn store(data_dir: &DataDir, command: StoreCommand) -> anyhow::Result<()> {
    let client = Client::connect(data_dir)?;
    match command {
        StoreCommand::Add { paths } => {
            let paths = paths
                .iter()
                .map(|p| absolute(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let view = client.store_add(&StoreAddRequest {
                paths,
                files: Vec::new(),
            })?;
            eprintln!("{} files, {}", view.files, human_bytes(view.bytes));
            println!("{}", view.hash);
        }
        StoreCommand::Get {
            hash,
            out,
            from,
            json,
        } => {
            let request = StoreGetRequest {
                hash,
                out: absolute(&out)?,
                from,
            };
            // The request blocks until the files are written; a second connection polls the
            // progress meanwhile and draws a progress line on stderr.
            let (done, finished) = std::sync::mpsc::channel::<()>();
            let bar = {
                let poll = Client::connect(data_dir)?;
                std::thread::spawn(move || progress_bar(&poll, &finished))
            };
            let result = client.store_get(&request);
            drop(done);
            let _ = bar.join();
            let view = result?;
            if json {
                return print_json(&view);
            }
            let received: u64 = view.received_from.values().sum();
            println!(
                "{} files, {} ({} received from {} peers, {} already here)",
                view.files,
                human_bytes(view.bytes),
                human_bytes(received),
                view.received_from.len(),
                human_bytes(view.resumed)
            );
            for peer in &view.dropped {
                println!("dropped {peer}: it sent data that failed verification");
            }
        }
        StoreCommand::Ls { json } => {
            let list = client.store_list()?;
            if json {
                return print_json(&list);
            }
            for b in list.as_array().cloned().unwrap_or_default() {
                let complete = b.get("complete").and_then(|v| v.as_bool()).unwrap_or(false);
                let pinned = b.get("pinned").and_then(|v| v.as_bool()).unwrap_or(false);
                println!(
                    "{}  {:>10}  {}{}",
                    b.get("hash").and_then(|v| v.as_str()).unwrap_or("-"),
                    human_bytes(b.get("size").and_then(|v| v.as_u64()).unwrap_or(0)),
                    if complete { "complete" } else { "partial" },
                    if pinned { ", pinned" } else { "" }
                );
            }
        }
        StoreCommand::Gc => {
            let view = client.store_gc()?;
            println!("freed {}", human_bytes(view.freed));
        }
    }
    Ok(())
}

/// Draws `fetching 45%  120.0 MiB / 256.0 MiB  85.2 MiB/s  3 peers` on stderr until the
/// sender of `finished` is dropped (which ends the wait at once).
fn progress_bar(client: &Client, finished: &std::sync::mpsc::Receiver<()>) {
    let start = std::time::Instant::now();
    let mut drew = false;
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
        finished.recv_timeout(std::time::Duration::from_millis(500))
    {
        let Ok(list) = client.store_fetches() else {
            continue;
        };
        let items = list.as_array().cloned().unwrap_or_default();
        let sum = |k: &str| {
            items
                .iter()
                .filter_map(|i| i.get(k).and_then(|v| v.as_u64()))
                .sum::<u64>()
        };
        let (done_bytes, size) = (sum("done_bytes"), sum("size"));
        let peers = items
            .iter()
            .filter_map(|i| i.get("providers").and_then(|v| v.as_u64()))
            .max()
            .unwrap_or(0);
        if size == 0 {
            continue;
        }
        let rate = done_bytes as f64 / start.elapsed().as_secs_f64().max(0.001);
        eprint!(
            "\rfetching {:>3}%  {} / {}  {}/s  {peers} peers   ",
            done_bytes * 100 / size,
            human_bytes(done_bytes),
            human_bytes(size),
            human_bytes(rate as u64)
        );
        drew = true;
    }
    if drew {
        eprintln!();
    }
}

/// `blendnet web`: a one-time login link to the status page; the link on this machine comes
/// last, alone on its line.
fn web(data_dir: &DataDir, no_open: bool) -> anyhow::Result<()> {
    let login = Client::connect(data_dir)?.web_login()?;
    let minutes = login.expires_in_secs / 60;
    println!("The status page: this link works once, within {minutes} minutes.");
    if let (Some(url), Some(fingerprint)) = (&login.remote_url, &login.fingerprint) {
        println!("From another machine (TLS, certificate SHA-256 {fingerprint}):");
        println!("  {url}");
        println!("On this machine:");
    }
    println!("{}", login.url);
    if !no_open && desktop_present() {
        let opener = if cfg!(target_os = "macos") {
            "open"
        } else {
            "xdg-open"
        };
        let opened = std::process::Command::new(opener)
            .arg(&login.url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if let Err(e) = opened {
            eprintln!("could not open a browser ({opener}: {e}); open the link yourself");
        }
    }
    Ok(())
}

/// Whether a graphical desktop is there to open a browser on.
fn desktop_present() -> bool {
    cfg!(target_os = "macos")
        || ["DISPLAY", "WAYLAND_DISPLAY"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_ttl("30s").unwrap(), 30);
        assert_eq!(parse_ttl("10m").unwrap(), 600);
        assert_eq!(parse_ttl("1h").unwrap(), 3600);
        assert_eq!(parse_ttl("2d").unwrap(), 172_800);
        for bad in ["soon", "1", "h", "0s", "1w", "-1h", ""] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_job_says_where_its_time_went() {
        let stats = serde_json::json!({
            "wall_ms": 12_300, "task_wall_ms": 10_000, "reports": 3, "retries": 1,
            "failures": 0, "cost": 0.0125, "unpriced_peers": ["12D3KooWdesk"],
            "phases": {"wait_ms": 100, "fetch_ms": 300, "blender_start_ms": 1_200,
                       "render_ms": 8_000, "upload_ms": 100, "merge_ms": 300},
            "peers": [{"peer": "12D3KooWdesk", "tasks": 2, "units": 64,
                       "render_ms": 8_000, "samples_per_second": 8.0}],
        });
        let lines = time_lines(&stats);
        assert_eq!(
            lines[0],
            "time: 12.3 s wall; tasks 10.0 s in all: wait 0.1 s, fetch 0.3 s, Blender start \
             1.2 s, render 8.0 s, merge 0.3 s, upload 0.1 s; 1 retries, 0 failures; cost \
             $0.0125 (without 1 unpriced peers)"
        );
        assert_eq!(
            lines[1],
            "peer 12D3KooWdesk: 2 tasks, 64 frame-samples in 8.0 s of render (8.0 samples/s)"
        );
        assert!(time_lines(&serde_json::json!({"reports": 0})).is_empty());
    }
}
