//! The provisioner (DESIGN §9): on a node whose `[cloud]` table sets `max_instances`, a loop
//! that starts cloud instances when the mesh has more work than its render peers finish within
//! the horizon, and terminates those that sit idle or never joined.
//!
//! Every [`TICK`] it reads what it needs from where it already is, so a restarted provisioner
//! carries on with no state of its own:
//! - its instances: the provider's list by the tag `blendnet-provisioner` = this peer id;
//! - which peer each instance became: the instance's `blendnet-invite` tag names its invite,
//!   and this node's invites record who redeemed each;
//! - whether that peer works: the peers' gossiped status (what each renders now);
//! - the pending work and its measured speed: the job board.
//!
//! The decision itself is [`blendnet_cloud::policy::plan`], a pure function. A launch falls
//! through the instance types on capacity errors ([`blendnet_cloud::launch_first`]). A
//! terminated instance's peer is revoked, so the roster does not fill with dead machines and a
//! leaked key of a terminated machine is worth nothing.
//!
//! An instance's certificate is short-lived (`cert_lifetime`, 6 h by default) and renewed at
//! half its life while the instance runs: a machine the provisioner lost track of (its record
//! gone with a cloud account, a provisioner that never came back) drops out of the mesh by
//! itself. A provisioner that restarts renews each joined instance at once, not knowing when
//! it last did.
//!
//! The loop runs on every node with a `[cloud]` table: with `max_instances` 0 it starts nothing,
//! but still renews and reaps the instances started by hand (`blendnet cloud up`).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, anyhow};
use blendnet_cloud::policy::{self, Demand, Limits, Managed, Offer, Reason};
use blendnet_cloud::userdata::{USER_DATA_VERSION, UserData};
use blendnet_cloud::{
    Instance, InstanceType, LaunchSpec, Provider, TAG_INVITE, TAG_PROVISIONER, launch_first,
};
use blendnet_core::board::JobSummary;
use blendnet_core::{Invites, token_tag};
use blendnet_net::{Net, NodeStatus, PeerView};
use blendnet_proto::wire::{IdentityCloud, RequiredProof};
use blendnet_proto::{InviteCode, Role, Roles};
use tokio::sync::watch;

use crate::board::Board;
use crate::config::CloudConfig;

/// How often the provisioner looks at the mesh and the cloud.
pub const TICK: Duration = Duration::from_secs(2);

/// What an instance of `provider` is told about the mesh and this node, with its one-time
/// invite; a spot instance of a cloud with preemption notices is told to watch them, and one
/// that must prove itself ([`identity_cloud`]) which identity to show.
pub fn user_data(
    status: &NodeStatus,
    code: &InviteCode,
    cloud: &CloudConfig,
    provider: &str,
) -> anyhow::Result<UserData> {
    let mesh = status
        .mesh_id
        .clone()
        .context("this node is in no mesh yet")?;
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
        token: code.encode(),
        expires_at: code.expires_at,
        preemption: provider
            .parse::<blendnet_cloud::preempt::Cloud>()
            .is_ok()
            .then(|| provider.to_owned()),
        identity: identity_cloud(cloud, provider).map(|c| c.to_string()),
        // Each launch sets the price of the type and zone it tries
        // (`blendnet_cloud::launch_specs`): the instance's `price_per_hour` once enrolled.
        price_per_hour_micros: None,
    })
}

/// The cloud whose signed identity an instance of `provider` must show when it enrolls: the
/// instance's cloud, when the `[cloud]` table names the keys to check it with.
pub fn identity_cloud(cloud: &CloudConfig, provider: &str) -> Option<IdentityCloud> {
    match provider {
        "aws" if cloud.aws_identity_certificate.is_some() => Some(IdentityCloud::Aws),
        "gcp" if cloud.gcp_identity_keys.is_some() => Some(IdentityCloud::Gcp),
        _ => None,
    }
}

/// The launches to try for one instance with `user_data`: [`blendnet_cloud::launch_specs`]
/// for the configured type (or all), tagged with the invite's [`token_tag`].
pub async fn launch_specs(
    provider: &dyn Provider,
    cloud: &CloudConfig,
    user_data: &UserData,
    code: &InviteCode,
) -> anyhow::Result<Vec<LaunchSpec>> {
    Ok(blendnet_cloud::launch_specs(
        provider,
        cloud.instance_type.as_deref(),
        cloud.spot,
        user_data,
        &token_tag(&code.token),
    )
    .await?)
}

/// What the board's jobs ask of the mesh. `mean_cores`: the cores of a render peer on
/// average, to turn a measured per-worker speed into core-seconds.
pub fn demand(jobs: &[JobSummary], live_cores: u32, mean_cores: f64) -> Demand {
    // A job is pending until it is done: after its last sample, its frames still need merging.
    let active: Vec<&JobSummary> = jobs.iter().filter(|j| j.status.is_active()).collect();
    let measured: Vec<f64> = active
        .iter()
        .filter_map(|j| {
            let left = j.total_units.saturating_sub(j.done_units);
            if left == 0 {
                return Some(0.0);
            }
            Some(left as f64 * j.ms_per_unit? / 1000.0 * mean_cores)
        })
        .collect();
    Demand {
        core_secs: (!measured.is_empty()).then(|| measured.iter().sum()),
        pending: !active.is_empty(),
        live_cores,
    }
}

/// The cores of the online peers that render, and their mean (1 when there are none).
fn render_cores(peers: &[PeerView]) -> (u32, f64) {
    let cores: Vec<u32> = peers
        .iter()
        .filter(|p| p.online)
        .filter_map(|p| p.capabilities.as_ref())
        .filter(|c| c.render && c.blender.is_some())
        .map(|c| c.cores.max(1))
        .collect();
    let total: u32 = cores.iter().sum();
    let mean = if cores.is_empty() {
        1.0
    } else {
        f64::from(total) / cores.len() as f64
    };
    (total, mean)
}

/// Unix seconds now.
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the provisioner runs now, for `GET /v1/cloud` and the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CloudView {
    pub provider: String,
    pub instances: Vec<InstanceView>,
    /// US dollars the listed instances cost since they were launched.
    pub cost_so_far: f64,
    /// Unix seconds of the listing.
    pub listed_at: u64,
}

/// One live instance of the provisioner.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct InstanceView {
    pub id: String,
    pub instance_type: String,
    pub zone: String,
    pub state: blendnet_cloud::InstanceState,
    pub launched_at: u64,
    /// US dollars an hour (the type's cheapest price the provider lists).
    pub per_hour: f64,
    pub cost_so_far: f64,
    /// The peer that enrolled with the instance's invite, once one did.
    pub peer: Option<String>,
    pub joined_at: Option<u64>,
    pub idle_since: Option<u64>,
}

impl InstanceView {
    /// `instance` at `per_hour`, as of `now`, not yet joined.
    fn new(instance: &Instance, per_hour: f64, now: u64) -> InstanceView {
        InstanceView {
            id: instance.id.clone(),
            instance_type: instance.instance_type.clone(),
            zone: instance.zone.clone(),
            state: instance.state,
            launched_at: instance.launched_at,
            per_hour,
            cost_so_far: per_hour * now.saturating_sub(instance.launched_at) as f64 / 3600.0,
            peer: None,
            joined_at: None,
            idle_since: None,
        }
    }
}

/// The provisioning loop's state: what it saw of each instance's peer, kept between ticks.
#[derive(Debug)]
pub struct Provisioner {
    provider: Box<dyn Provider>,
    cloud: CloudConfig,
    limits: Limits,
    net: Net,
    board: Board,
    invites: watch::Receiver<Invites>,
    /// Instance id → when its peer was first seen online.
    joined_at: HashMap<String, u64>,
    /// Instance id → since when its peer has rendered nothing.
    idle_since: HashMap<String, u64>,
    /// Instance id → when this provisioner last certified its peer.
    certified_at: HashMap<String, u64>,
    /// Instance type → its price per hour (the cheapest zone), asked once.
    prices: HashMap<String, f64>,
    types: Option<Vec<InstanceType>>,
    /// What it runs, as of the last tick.
    view: watch::Sender<Option<CloudView>>,
}

impl Provisioner {
    pub fn new(
        provider: Box<dyn Provider>,
        cloud: CloudConfig,
        net: Net,
        board: Board,
        invites: watch::Receiver<Invites>,
        view: watch::Sender<Option<CloudView>>,
    ) -> Provisioner {
        Provisioner {
            limits: cloud.limits(),
            provider,
            cloud,
            net,
            board,
            invites,
            joined_at: HashMap::new(),
            idle_since: HashMap::new(),
            certified_at: HashMap::new(),
            prices: HashMap::new(),
            types: None,
            view,
        }
    }

    /// Runs until `stop` turns true. A failed tick is logged and the next one tries again.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        tracing::info!(
            provider = self.provider.name(),
            max_instances = self.limits.max_instances,
            idle_grace_secs = self.limits.idle_grace_secs,
            "provisioning cloud instances for pending work"
        );
        if matches!(self.provider.name(), "aws" | "gcp")
            && identity_cloud(&self.cloud, self.provider.name()).is_none()
        {
            tracing::warn!(
                provider = self.provider.name(),
                "no trust roots for instance identity proofs ([cloud] aws_identity_certificate / gcp_identity_keys): instances enroll on their token alone"
            );
        }
        loop {
            if let Err(e) = self.tick(unix_now()).await {
                tracing::warn!(error = %format!("{e:#}"), "provisioning");
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    async fn tick(&mut self, now: u64) -> anyhow::Result<()> {
        let status = self.net.status().await?;
        if status.mesh_id.is_none() {
            return Ok(());
        }
        let instances: Vec<Instance> = self
            .provider
            .list(TAG_PROVISIONER, &status.peer_id)
            .await?
            .into_iter()
            .filter(|i| i.state.is_alive())
            .collect();
        let peers = self.net.peers().await?;
        let jobs = self.board.jobs().await?;
        let invites = self.invites.borrow().clone();

        let (live_cores, mean_cores) = render_cores(&peers);
        let demand = demand(&jobs, live_cores, mean_cores);

        let alive: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
        self.joined_at.retain(|id, _| alive.contains(&id.as_str()));
        self.idle_since.retain(|id, _| alive.contains(&id.as_str()));
        self.certified_at
            .retain(|id, _| alive.contains(&id.as_str()));
        let mut managed = Vec::with_capacity(instances.len());
        let mut shown = Vec::with_capacity(instances.len());
        let mut peer_of = HashMap::new();
        for instance in &instances {
            let peer = instance
                .tags
                .get(TAG_INVITE)
                .and_then(|tag| invites.redeemed_by_tag(tag))
                .map(|p| p.to_string());
            let view = peer
                .as_ref()
                .and_then(|p| peers.iter().find(|v| &v.peer_id == p));
            if let Some(view) = view
                && view.online
            {
                self.joined_at.entry(instance.id.clone()).or_insert(now);
            }
            // A joined peer is idle when it went offline, or renders nothing while no work is
            // pending. While work is pending, one that renders nothing is between tasks (or
            // starting Blender for its first): it is about to be busy.
            let joined = self.joined_at.get(&instance.id).copied();
            let offline = view.is_none_or(|v| !v.online);
            let resting = view.is_some_and(|v| v.rendering.is_none()) && !demand.pending;
            if joined.is_some() && (offline || resting) {
                self.idle_since.entry(instance.id.clone()).or_insert(now);
            } else {
                self.idle_since.remove(&instance.id);
            }
            let per_hour = self.price(&instance.instance_type).await;
            shown.push(InstanceView {
                peer: peer.clone(),
                joined_at: joined,
                idle_since: self.idle_since.get(&instance.id).copied(),
                ..InstanceView::new(instance, per_hour, now)
            });
            if let Some(p) = peer {
                peer_of.insert(instance.id.clone(), p);
            }
            managed.push(Managed {
                id: instance.id.clone(),
                launched_at: instance.launched_at,
                joined_at: joined,
                idle_since: self.idle_since.get(&instance.id).copied(),
                per_hour,
            });
        }
        self.view.send_replace(Some(CloudView {
            provider: self.provider.name().to_owned(),
            cost_so_far: shown.iter().map(|i| i.cost_so_far).sum(),
            instances: shown,
            listed_at: now,
        }));

        let types = self.types().await?;
        let offered = match &self.cloud.instance_type {
            Some(name) => types.iter().find(|t| &t.name == name),
            None => types.first(),
        };
        let offer = match offered {
            Some(t) => Offer {
                cores: t.cores,
                per_hour: self.price(&t.name.clone()).await,
            },
            // A configured type the provider does not list: size as one core, let the launch
            // tell what is wrong with it.
            None => Offer {
                cores: 1,
                per_hour: 0.0,
            },
        };
        let plan = policy::plan(now, &demand, &managed, &offer, &self.limits);

        if !plan.terminate.is_empty() {
            let ids: Vec<String> = plan.terminate.iter().map(|(id, _)| id.clone()).collect();
            for (id, reason) in &plan.terminate {
                let why = match reason {
                    Reason::Idle => "idle for the grace period",
                    Reason::NeverJoined => "never joined the mesh",
                };
                tracing::info!(instance = %id, peer = ?peer_of.get(id), "terminating: {why}");
            }
            self.provider.terminate(&ids).await?;
            self.show(|view| view.instances.retain(|i| !ids.contains(&i.id)));
            for id in &ids {
                if let Some(peer) = peer_of.get(id).and_then(|p| p.parse().ok())
                    && let Ok(Err(e)) = self.net.revoke(peer).await
                {
                    tracing::warn!(instance = %id, %peer, error = %e, "could not revoke the terminated instance's peer");
                }
            }
        }
        self.renew(now, &peer_of, &plan.terminate).await;
        for _ in 0..plan.launch {
            let instance = self.launch(&status).await?;
            let per_hour = self.price(&instance.instance_type).await;
            self.show(|view| {
                view.instances
                    .push(InstanceView::new(&instance, per_hour, now))
            });
            tracing::info!(
                instance = %instance.id,
                instance_type = %instance.instance_type,
                zone = %instance.zone,
                pending_core_secs = ?demand.core_secs,
                live_cores,
                "started an instance for the pending work"
            );
        }
        Ok(())
    }

    /// Changes the shown instances after a launch or a termination.
    fn show(&self, change: impl FnOnce(&mut CloudView)) {
        self.view.send_modify(|view| {
            if let Some(view) = view {
                change(view);
                view.cost_so_far = view.instances.iter().map(|i| i.cost_so_far).sum();
            }
        });
    }

    /// Renews the certificates of the joined instances (but those being terminated) that
    /// were certified half a lifetime ago, or not since this provisioner started.
    async fn renew(
        &mut self,
        now: u64,
        peer_of: &HashMap<String, String>,
        terminating: &[(String, Reason)],
    ) {
        let lifetime = self.cloud.cert_lifetime_secs();
        for (id, peer) in peer_of {
            if !self.joined_at.contains_key(id) || terminating.iter().any(|(t, _)| t == id) {
                continue;
            }
            let last = self.certified_at.get(id).copied();
            if last.is_some_and(|at| now < at.saturating_add(lifetime / 2)) {
                continue;
            }
            let Ok(peer_id) = peer.parse() else { continue };
            match self.net.renew(peer_id, Duration::from_secs(lifetime)).await {
                Ok(Ok(())) => {
                    tracing::debug!(instance = %id, %peer, lifetime, "renewed the instance's certificate");
                    self.certified_at.insert(id.clone(), now);
                }
                Ok(Err(e)) => {
                    tracing::warn!(instance = %id, %peer, error = %e, "could not renew the instance's certificate")
                }
                Err(_) => return,
            }
        }
    }

    /// Starts one instance with a fresh one-time `render` invite whose certificate is
    /// short-lived (renewed while the instance lives).
    async fn launch(&self, status: &NodeStatus) -> anyhow::Result<Instance> {
        let ttl = Duration::from_secs(self.limits.join_timeout_secs);
        // The invite waits for the instance's id (known once the launch call returns): until
        // it is bound, a redemption is answered "not ready" and the instance asks again.
        let identity = identity_cloud(&self.cloud, self.provider.name());
        let code = self
            .net
            .invite(
                ttl,
                Roles::from(Role::Render),
                Some(Duration::from_secs(self.cloud.cert_lifetime_secs())),
                identity.map(|cloud| RequiredProof {
                    cloud,
                    instance: None,
                }),
            )
            .await?
            .map_err(|e| anyhow!("making an invite for a new instance: {e}"))?;
        let user_data = user_data(status, &code, &self.cloud, self.provider.name())?;
        let specs = launch_specs(&*self.provider, &self.cloud, &user_data, &code).await?;
        let instance = launch_first(&*self.provider, &specs).await?;
        if let Some(cloud) = identity {
            let proof = RequiredProof {
                cloud,
                instance: Some(instance.id.clone()),
            };
            if let Err(e) = self.net.bind_invite(code.token, proof).await? {
                // The instance cannot join; it is reaped after the join timeout.
                tracing::error!(instance = %instance.id, error = %e, "could not bind the invite to the new instance");
            }
        }
        Ok(instance)
    }

    async fn types(&mut self) -> anyhow::Result<Vec<InstanceType>> {
        if self.types.is_none() {
            self.types = Some(self.provider.instance_types().await?);
        }
        Ok(self.types.clone().unwrap_or_default())
    }

    /// The cheapest zone's price of `instance_type`; 0 when the provider cannot say (logged).
    async fn price(&mut self, instance_type: &str) -> f64 {
        if let Some(p) = self.prices.get(instance_type) {
            return *p;
        }
        let price = match self.provider.prices(instance_type, self.cloud.spot).await {
            Ok(prices) => prices
                .iter()
                .map(|p| p.per_hour)
                .fold(f64::INFINITY, f64::min),
            Err(e) => {
                tracing::warn!(instance_type, error = %e, "no price; counting it as free");
                0.0
            }
        };
        let price = if price.is_finite() { price } else { 0.0 };
        self.prices.insert(instance_type.to_owned(), price);
        price
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blendnet_core::JobStatus;
    use blendnet_proto::{JobId, PeerId};

    fn job(done: u64, total: u64, ms: Option<f64>, status: JobStatus) -> JobSummary {
        JobSummary {
            id: JobId([done as u8; 32]),
            name: "j".into(),
            submitter: PeerId::random(),
            status,
            coordinator: None,
            done_units: done,
            total_units: total,
            inexact: false,
            ms_per_unit: ms,
        }
    }

    #[test]
    fn demand_counts_the_remaining_work_of_active_jobs_in_core_seconds() {
        // 1000 units left at 20 ms each on 4-core workers: 80 core-seconds.
        let d = demand(
            &[
                job(1000, 2000, Some(20.0), JobStatus::Active),
                job(5, 10, Some(1e6), JobStatus::Cancelled),
                job(10, 10, Some(1e6), JobStatus::Done),
            ],
            8,
            4.0,
        );
        assert!(d.pending);
        assert_eq!(d.live_cores, 8);
        let secs = d.core_secs.unwrap();
        assert!((secs - 80.0).abs() < 1e-9, "{secs}");
        // Nothing measured yet: pending, of unknown size.
        let d = demand(&[job(0, 10, None, JobStatus::Active)], 0, 1.0);
        assert!(d.pending && d.core_secs.is_none());
        // All samples rendered: pending (frames to merge), with no render time left.
        let d = demand(&[job(10, 10, Some(5.0), JobStatus::Active)], 0, 1.0);
        assert!(d.pending && d.core_secs == Some(0.0));
        // Finished and cancelled jobs ask for nothing.
        let d = demand(&[job(10, 10, None, JobStatus::Done)], 0, 1.0);
        assert!(!d.pending);
    }
}
