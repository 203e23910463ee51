//! Cloud peers (DESIGN §9): machines a provisioning peer starts when the mesh has more work than
//! it can render soon, and stops when they sit idle.
//!
//! - [`Provider`]: one interface over AWS ([`aws`]), GCP ([`gcp`]) and `local` (daemons started
//!   on this machine as if they were instances: for trying BlendNet without a cloud, and for
//!   tests).
//! - [`policy`]: the pure scaling decision: how many instances to start, which to terminate.
//! - [`userdata`]: what an instance is told at boot (bootstrap addresses, the provisioner's key,
//!   a one-time enrollment token).
//!
//! Instances carry the tags [`TAG_MESH`] and [`TAG_PROVISIONER`], so a provisioner that restarts
//! finds the instances it started in the cloud's own list and leaves nothing orphaned.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

pub mod aws;
pub mod cost;
pub mod gcp;
pub mod identity;
pub mod local;
pub mod policy;
pub mod preempt;
pub mod userdata;

/// Tag naming the mesh an instance was started for.
pub const TAG_MESH: &str = "blendnet-mesh";
/// Tag naming the peer that started an instance (its peer id).
pub const TAG_PROVISIONER: &str = "blendnet-provisioner";
/// Tag naming the invite an instance enrolls with (a hash of its token, not the token): the
/// provisioner learns which peer an instance became from who redeemed that invite.
pub const TAG_INVITE: &str = "blendnet-invite";

/// A kind of machine a provider can start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceType {
    /// The provider's name for it (`c7a.16xlarge`, `n2-highcpu-64`, `local-1`).
    pub name: String,
    pub cores: u32,
    pub ram_bytes: u64,
    pub gpus: u32,
}

/// What to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub instance_type: String,
    /// A zone, or the provider's choice.
    pub zone: Option<String>,
    /// The boot payload (see [`userdata`]); providers encode it as their API wants.
    pub user_data: String,
    pub tags: BTreeMap<String, String>,
    /// Spot (preemptible) capacity; on-demand otherwise.
    pub spot: bool,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    Pending,
    Running,
    Stopping,
    Terminated,
}

impl InstanceState {
    /// Whether the instance costs money or may still come up.
    pub fn is_alive(self) -> bool {
        matches!(self, InstanceState::Pending | InstanceState::Running)
    }
}

/// An instance as the provider lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// The provider's id (`i-0abc…`, a GCE name, a local directory name).
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub state: InstanceState,
    /// Unix seconds.
    pub launched_at: u64,
    pub tags: BTreeMap<String, String>,
}

/// A price of an instance type in a zone, per hour, in US dollars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Price {
    pub instance_type: String,
    pub zone: String,
    pub per_hour: f64,
    pub spot: bool,
}

/// Why a provider call failed. [`CloudError::Capacity`] is the one a provisioner falls through
/// on (another type or zone may have room); the others stop it and are shown to the user.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// No capacity for this type in this zone now (AWS `InsufficientInstanceCapacity`, GCP
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`, ...).
    #[error("no capacity for {instance_type} in {zone}: {message}")]
    Capacity {
        instance_type: String,
        zone: String,
        message: String,
    },
    /// The account's limits (vCPU quota, instance count) do not allow it.
    #[error("over the account's quota: {0}")]
    Quota(String),
    /// The credentials are missing, wrong or not allowed to do this.
    #[error("the cloud refused the credentials: {0}")]
    Auth(String),
    /// The request was wrong (an unknown instance type, a bad tag): a bug or a bad setting.
    #[error("the cloud refused the request: {0}")]
    BadRequest(String),
    /// Anything else the API answered, with its code.
    #[error("the cloud API failed ({code}): {message}")]
    Api { code: String, message: String },
    /// The API could not be reached, or a local instance could not be started.
    #[error("{0}")]
    Io(String),
}

impl CloudError {
    /// Whether trying another instance type or zone may succeed.
    pub fn is_capacity(&self) -> bool {
        matches!(self, CloudError::Capacity { .. })
    }
}

/// One cloud (or this machine). Calls are async and cancel-safe: a dropped call leaves at most
/// an instance that the next [`Provider::list`] shows, tagged, so it is not lost.
pub trait Provider: Send + Sync + std::fmt::Debug {
    /// `aws`, `gcp`, `local`.
    fn name(&self) -> &str;
    /// The types this provider offers, cheapest per core first where it knows prices.
    fn instance_types(&self) -> BoxFuture<'_, Result<Vec<InstanceType>, CloudError>>;
    /// Starts one instance.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec) -> BoxFuture<'a, Result<Instance, CloudError>>;
    /// The instances carrying the tag `key=value`, terminated ones included while the cloud
    /// still lists them.
    fn list<'a>(
        &'a self,
        key: &'a str,
        value: &'a str,
    ) -> BoxFuture<'a, Result<Vec<Instance>, CloudError>>;
    /// Terminates instances (already terminated ones are no error).
    fn terminate<'a>(&'a self, ids: &'a [String]) -> BoxFuture<'a, Result<(), CloudError>>;
    /// Current prices of `instance_type`, per zone.
    fn prices<'a>(
        &'a self,
        instance_type: &'a str,
        spot: bool,
    ) -> BoxFuture<'a, Result<Vec<Price>, CloudError>>;
}

/// The launches to try, in order, for one instance with `user_data`: each instance type
/// (`instance_type`, or every type the provider offers, cheapest per core first) in each zone
/// it is priced in, cheapest first (where the provider names no price, its own choice of
/// zone). Each is tagged with the mesh, the provisioner and `invite_tag`, so the instance is
/// found again and its peer known. [`launch_first`] falls through them on capacity errors.
pub async fn launch_specs(
    provider: &dyn Provider,
    instance_type: Option<&str>,
    spot: bool,
    user_data: &userdata::UserData,
    invite_tag: &str,
) -> Result<Vec<LaunchSpec>, CloudError> {
    let names: Vec<String> = match instance_type {
        Some(t) => vec![t.to_owned()],
        None => provider
            .instance_types()
            .await?
            .into_iter()
            .map(|t| t.name)
            .collect(),
    };
    // Each launch tells its instance the price of its own type and zone (see
    // `UserData::price_per_hour_micros`), so user data is encoded per launch.
    let encoded = |per_hour: Option<f64>| {
        let mut data = user_data.clone();
        if let Some(p) = per_hour.filter(|p| p.is_finite() && *p >= 0.0) {
            data.price_per_hour_micros = Some((p * 1e6).round() as u64);
        }
        data.encode()
    };
    let tags: BTreeMap<String, String> = [
        (TAG_MESH.to_owned(), user_data.mesh.clone()),
        (TAG_PROVISIONER.to_owned(), user_data.provisioner.clone()),
        (TAG_INVITE.to_owned(), invite_tag.to_owned()),
    ]
    .into();
    let mut specs = Vec::new();
    for instance_type in names {
        let zones: Vec<(Option<String>, Option<f64>)> =
            match provider.prices(&instance_type, spot).await {
                Ok(mut prices) if !prices.is_empty() => {
                    prices.sort_by(|a, b| a.per_hour.total_cmp(&b.per_hour));
                    prices
                        .into_iter()
                        .map(|p| (Some(p.zone), Some(p.per_hour)))
                        .collect()
                }
                _ => vec![(None, None)],
            };
        specs.extend(zones.into_iter().map(|(zone, per_hour)| LaunchSpec {
            instance_type: instance_type.clone(),
            zone,
            user_data: encoded(per_hour),
            tags: tags.clone(),
            spot,
        }));
    }
    Ok(specs)
}

/// Launches the first of `specs` that has capacity: a [`CloudError::Capacity`] answer moves on
/// to the next spec (another instance type or zone); any other error stops at once, since
/// another type would fail the same way (credentials, quota, a bad request). When every spec
/// lacks capacity, the last capacity error is returned.
pub async fn launch_first(
    provider: &dyn Provider,
    specs: &[LaunchSpec],
) -> Result<Instance, CloudError> {
    let mut last = CloudError::BadRequest("no instance type to launch".into());
    for spec in specs {
        match provider.launch(spec).await {
            Err(e) if e.is_capacity() => {
                tracing::info!(instance_type = %spec.instance_type, zone = ?spec.zone, error = %e, "no capacity; trying the next");
                last = e;
            }
            other => return other,
        }
    }
    Err(last)
}
