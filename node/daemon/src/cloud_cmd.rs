//! `blendnet cloud up | ls | down`: start, list and stop cloud instances by hand, with the
//! provider of the `[cloud]` table in `blendnet.toml` (DESIGN §9).
//!
//! An instance started here gets user data naming this node: the mesh, this node's addresses,
//! its peer id, and a one-time invite with the `render` role that expires after the
//! `join_timeout`. It runs `blendnet enroll` at boot and joins by itself. Instances carry the
//! tags `blendnet-mesh` and `blendnet-provisioner` (this node's peer id): `ls` and `down` act
//! on those, so nothing this node started is lost track of.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use blendnet_cloud::aws::{AwsConfig, AwsProvider};
use blendnet_cloud::local::LocalProvider;
use blendnet_cloud::userdata::{USER_DATA_VERSION, UserData};
use blendnet_cloud::{Instance, LaunchSpec, Provider, TAG_MESH, TAG_PROVISIONER};

use crate::api::InviteRequest;
use crate::client::Client;
use crate::config::{CloudConfig, Config, Overrides};
use crate::data_dir::DataDir;

/// How long an instance's token stays valid when `join_timeout` is not set.
const DEFAULT_JOIN_TIMEOUT_SECS: u64 = 15 * 60;

/// `blendnet cloud`'s subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CloudCommand {
    /// Start instances that join this mesh by themselves, with the render role.
    Up {
        /// How many.
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// List the instances this node started.
    Ls {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Terminate instances this node started.
    Down {
        /// Instance ids (as `ls` prints them).
        ids: Vec<String>,
        /// Every instance this node started.
        #[arg(long)]
        all: bool,
    },
}

/// Runs `blendnet cloud ...`.
pub fn run(data_dir: &DataDir, command: CloudCommand) -> anyhow::Result<()> {
    let config = Config::load(data_dir, &Overrides::default())?;
    let Some(cloud) = config.cloud else {
        bail!(
            "no [cloud] table in {}: say which provider starts instances (provider = \"local\" \
             or \"aws\")",
            data_dir.config().display()
        );
    };
    let provider = provider(&cloud)?;
    let client = Client::connect(data_dir)?;
    let status = client.status()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        CloudCommand::Up { count } => {
            for _ in 0..count {
                let user_data = user_data(&client, &cloud)?;
                let instance = runtime.block_on(launch(&*provider, &cloud, &status, user_data))?;
                println!("{}", instance.id);
            }
        }
        CloudCommand::Ls { json } => {
            let instances = runtime.block_on(provider.list(TAG_PROVISIONER, &status.peer_id))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&instances)?);
            } else {
                for i in &instances {
                    println!(
                        "{:<40} {:<16} {:<12} {:<10} launched {}",
                        i.id,
                        i.instance_type,
                        i.zone,
                        format!("{:?}", i.state).to_lowercase(),
                        i.launched_at
                    );
                }
            }
        }
        CloudCommand::Down { ids, all } => {
            let ours: Vec<Instance> =
                runtime.block_on(provider.list(TAG_PROVISIONER, &status.peer_id))?;
            let targets: Vec<String> = if all {
                ours.iter()
                    .filter(|i| i.state.is_alive())
                    .map(|i| i.id.clone())
                    .collect()
            } else {
                if ids.is_empty() {
                    bail!("name the instances to terminate (`blendnet cloud ls`), or --all");
                }
                for id in &ids {
                    if !ours.iter().any(|i| &i.id == id) {
                        bail!("{id} is not an instance this node started");
                    }
                }
                ids
            };
            if !targets.is_empty() {
                runtime.block_on(provider.terminate(&targets))?;
            }
            for id in targets {
                println!("{id}");
            }
        }
    }
    Ok(())
}

/// The provider `[cloud]` names.
pub fn provider(cloud: &CloudConfig) -> anyhow::Result<Box<dyn Provider>> {
    Ok(match cloud.provider.as_str() {
        "local" => {
            let exe = std::env::current_exe().context("finding the blendnet binary")?;
            let mut command = vec![exe.display().to_string(), "enroll".to_owned()];
            command.extend(cloud.local_args.iter().cloned());
            let root = cloud
                .local_root
                .clone()
                .context("[cloud] local_root is not set")?;
            Box::new(LocalProvider::new(root, command))
        }
        "aws" => {
            let env = |name: &str| {
                std::env::var(name)
                    .with_context(|| format!("the aws provider needs {name} in the environment"))
            };
            Box::new(AwsProvider::new(AwsConfig {
                region: cloud
                    .aws_region
                    .clone()
                    .context("[cloud] aws_region is not set")?,
                access_key_id: env("AWS_ACCESS_KEY_ID")?,
                secret_access_key: env("AWS_SECRET_ACCESS_KEY")?,
                session_token: std::env::var("AWS_SESSION_TOKEN").ok(),
                endpoint_url: cloud.aws_endpoint_url.clone(),
                image_id: cloud
                    .aws_image_id
                    .clone()
                    .context("[cloud] aws_image_id is not set")?,
                instance_types: cloud.instance_type.iter().cloned().collect(),
                on_demand_prices: BTreeMap::new(),
                peer_port: crate::config::DEFAULT_PORT,
            }))
        }
        other => bail!("unknown cloud provider {other:?}"),
    })
}

/// User data for one new instance: this node's mesh and addresses and a fresh one-time token.
fn user_data(client: &Client, cloud: &CloudConfig) -> anyhow::Result<UserData> {
    let ttl_secs = match &cloud.join_timeout {
        Some(ttl) => crate::cli::parse_ttl(ttl)?,
        None => DEFAULT_JOIN_TIMEOUT_SECS,
    };
    let status = client.status()?;
    let mesh = status
        .mesh_id
        .clone()
        .context("this node is in no mesh yet")?;
    let invite = client.invite(&InviteRequest {
        ttl_secs,
        roles: vec!["render".into()],
    })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(UserData {
        version: USER_DATA_VERSION,
        mesh,
        bootstrap: status
            .listen_addrs
            .iter()
            .filter(|a| a.contains("/p2p/"))
            .cloned()
            .collect(),
        provisioner: status.peer_id.clone(),
        token: invite.code,
        expires_at: now + ttl_secs,
    })
}

/// Starts one instance with `user_data`, tagged as this node's.
async fn launch(
    provider: &dyn Provider,
    cloud: &CloudConfig,
    status: &crate::api::StatusView,
    user_data: UserData,
) -> anyhow::Result<Instance> {
    let instance_type = match &cloud.instance_type {
        Some(t) => t.clone(),
        None => provider
            .instance_types()
            .await?
            .first()
            .map(|t| t.name.clone())
            .context("the provider offers no instance type")?,
    };
    let spec = LaunchSpec {
        instance_type,
        zone: None,
        user_data: user_data.encode(),
        tags: [
            (TAG_MESH.to_owned(), user_data.mesh.clone()),
            (TAG_PROVISIONER.to_owned(), status.peer_id.clone()),
        ]
        .into(),
        spot: cloud.spot,
    };
    Ok(provider.launch(&spec).await?)
}
