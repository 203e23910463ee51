//! `blendnet cloud up | ls | down`: start, list and stop cloud instances by hand, with the
//! provider of the `[cloud]` table in `blendnet.toml` (DESIGN §9).
//!
//! An instance started here gets user data naming this node: the mesh, this node's addresses,
//! its peer id, and a one-time invite with the `render` role that expires after the
//! `join_timeout`. It runs `blendnet enroll` at boot and joins by itself. Instances carry the
//! tags `blendnet-mesh` and `blendnet-provisioner` (this node's peer id): `ls` and `down` act
//! on those, so nothing this node started is lost track of.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use blendnet_cloud::aws::{AwsConfig, AwsProvider};
use blendnet_cloud::gcp::{GcpConfig, GcpProvider};
use blendnet_cloud::local::LocalProvider;
use blendnet_cloud::{Instance, Provider, TAG_PROVISIONER, launch_first};
use blendnet_proto::InviteCode;

use crate::api::{InviteRequest, StatusView};
use crate::client::Client;
use crate::config::{CloudConfig, Config, Overrides};
use crate::data_dir::DataDir;
use crate::provision;

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
            "no [cloud] table in {}: say which provider starts instances (provider = \"local\", \
             \"aws\" or \"gcp\")",
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
                let instance = runtime.block_on(launch(&*provider, &cloud, &client, &status))?;
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
            Box::new(
                LocalProvider::new(root, command)
                    .with_price(cloud.local_price_per_hour.unwrap_or(0.0)),
            )
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
        "gcp" => {
            let credentials = match &cloud.gcp_credentials {
                Some(path) => path.clone(),
                None => std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS")
                    .map(PathBuf::from)
                    .context(
                        "the gcp provider needs a service-account key file: set [cloud] \
                         gcp_credentials or GOOGLE_APPLICATION_CREDENTIALS",
                    )?,
            };
            let mut config = GcpConfig::new(
                cloud
                    .gcp_project
                    .clone()
                    .context("[cloud] gcp_project is not set")?,
                cloud.gcp_zones.clone(),
                credentials,
                cloud
                    .gcp_image
                    .clone()
                    .context("[cloud] gcp_image is not set")?,
            );
            config.instance_types = cloud.instance_type.iter().cloned().collect();
            config.compute_endpoint = cloud.gcp_endpoint_url.clone();
            config.billing_endpoint = cloud.gcp_billing_url.clone();
            config.token_uri = cloud.gcp_token_uri.clone();
            config.max_run_duration_secs = cloud
                .gcp_max_run_duration
                .as_deref()
                .map(crate::cli::parse_ttl)
                .transpose()?;
            Box::new(GcpProvider::new(config)?)
        }
        other => bail!("unknown cloud provider {other:?}"),
    })
}

/// Starts one instance with a fresh one-time `render` invite that lasts the `join_timeout`.
async fn launch(
    provider: &dyn Provider,
    cloud: &CloudConfig,
    client: &Client,
    status: &StatusView,
) -> anyhow::Result<Instance> {
    let identity = provision::identity_cloud(cloud, provider.name());
    let invite = client.invite(&InviteRequest {
        ttl_secs: cloud.limits().join_timeout_secs,
        roles: vec!["render".into()],
        cert_lifetime_secs: Some(cloud.cert_lifetime_secs()),
        // As the provisioner does: the invite waits for the instance's id (see `launch` there).
        instance: identity.map(|c| c.to_string()),
    })?;
    let code = InviteCode::decode(&invite.code).context("the daemon's invite is unreadable")?;
    let user_data = provision::user_data(status, &code, cloud, provider.name())?;
    let specs = provision::launch_specs(provider, cloud, &user_data, &code).await?;
    let instance = launch_first(provider, &specs).await?;
    if let Some(cloud) = identity {
        client
            .bind_invite(&crate::api::BindRequest {
                code: invite.code.clone(),
                instance: format!("{cloud}:{}", instance.id),
            })
            .with_context(|| format!("naming instance {} in its invite", instance.id))?;
    }
    Ok(instance)
}
