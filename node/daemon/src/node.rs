//! The running node: loads identity and state from the data directory, starts the network
//! actor and the local API, persists what the network reports, and shuts down on signals.
//!
//! ```text
//!  signals ──▶ run() ──shutdown──▶ NetActor, API server
//!                 ▲ Event (joined, roster, invites, addresses) ── NetActor
//!                 └─▶ State (redb): everything the node must not lose
//!  API server ──Backend──▶ NodeBackend ──Net handle──▶ NetActor
//! ```
//!
//! Persisted keys in the `meta` table: `roster` ([`PersistedRoster`]), `invites`
//! (`core::Invites`), `join_code` (the invite code text until it is redeemed); the `peers`
//! table maps a peer id to its last known multiaddrs.

use crate::api::{
    self, AdmitRequest, ApiError, Backend, FetchRequest, FetchView, InviteRequest, InviteView,
    JobChange, JobRef, PeerRef, PreviewQuery, RevokeRequest, StatusView, StoreAddRequest,
    StoreAddView, StoreGcView, StoreGetRequest, StoreGetView, SubmitRequest,
};
use crate::blobs::{Blobs, store_dir};
use crate::board::{Board, BoardSetup};
use crate::capabilities::Capabilities;
use crate::config::Config;
use crate::data_dir::{DataDir, ReadSecretError, SECRET_MODE, read_secret, write_atomic};
use crate::deliver;
use crate::preview;
use crate::provision::Provisioner;
use crate::render::{Render, RenderMessage};
use crate::state::State;
use anyhow::{Context, anyhow, bail};
use blendnet_cloud::preempt;
use blendnet_core::job::TaskState;
use blendnet_core::{Invites, Roster};
use blendnet_net::{
    AdmitError, Event, InviteError, Membership, Multiaddr, Net, PeerId, RevokeError, Spawned,
    Transport, identity,
};
use blendnet_proto::job::Offer;
use blendnet_proto::{Fingerprint, InviteCode, MeshId, MeshKey, Role, Roles, RosterSnapshot};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a graceful shutdown may take before the daemon exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a preempted node waits for its coordinator to take the running task back before
/// it leaves anyway (AWS gives two minutes' notice, GCP thirty seconds).
const HAND_BACK_WITHIN: Duration = Duration::from_secs(5);

/// Least time between two statuses sent for render progress: peers' views are read by people
/// and by the add-on every few seconds.
const ACTIVITY_EVERY: Duration = Duration::from_secs(1);

/// Where jobs' scenes, outputs in progress and task logs live, in the data dir.
const WORK_DIR: &str = "work";

/// Render reports waiting for the board: one per task, and one task runs at a time.
const RENDER_REPORTS: usize = 16;
/// How long the certificate `init` gives its own node lasts.
const OWN_CERT_LIFETIME_SECS: u64 = 100 * 365 * 24 * 3600;

/// The roster as stored: its mesh and entries (re-verified when loaded).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistedRoster {
    pub mesh: MeshId,
    pub roster: RosterSnapshot,
}

const KEY_ROSTER: &str = "roster";
const KEY_INVITES: &str = "invites";
const KEY_JOIN_CODE: &str = "join_code";
/// A cloud instance's identity proof, sent with the redemption of its enrollment token.
const KEY_JOIN_PROOF: &str = "join_proof";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Loads this node's key, creating it on first use.
pub fn node_key(data_dir: &DataDir) -> anyhow::Result<identity::Keypair> {
    let path = data_dir.node_key();
    match read_secret(&path) {
        Ok(bytes) => identity::Keypair::from_protobuf_encoding(&bytes)
            .with_context(|| format!("{} is not a node key", path.display())),
        Err(ReadSecretError::NotFound { .. }) => {
            let key = identity::Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .context("encoding the node key")?;
            write_atomic(&path, &bytes, SECRET_MODE)
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Loads the mesh key if this node holds it.
fn mesh_key(data_dir: &DataDir) -> anyhow::Result<Option<MeshKey>> {
    let path = data_dir.mesh_key();
    match read_secret(&path) {
        Ok(bytes) => MeshKey::from_bytes(&bytes)
            .map(Some)
            .with_context(|| format!("{} is not a mesh key", path.display())),
        Err(ReadSecretError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn load_roster(state: &State) -> anyhow::Result<Option<Roster>> {
    let Some(stored) = state.get::<PersistedRoster>(KEY_ROSTER)? else {
        return Ok(None);
    };
    let mut roster = Roster::new(stored.mesh);
    let (_, errors) = roster.apply(stored.roster);
    for e in errors {
        tracing::warn!(error = %e, "stored roster entry dropped");
    }
    Ok(Some(roster))
}

/// `blendnet init`: makes the mesh key and this node's key, and certifies this node with
/// every role. Refuses a data directory that is already in a mesh or joining one.
pub fn init(data_dir: &DataDir) -> anyhow::Result<MeshId> {
    let state = State::open(data_dir)?;
    if let Some(roster) = load_roster(&state)? {
        bail!(
            "this data directory is already a member of mesh {}; use another --data-dir for a new mesh",
            roster.mesh()
        );
    }
    if mesh_key(data_dir)?.is_some() {
        bail!("{} already exists", data_dir.mesh_key().display());
    }
    if state.get::<String>(KEY_JOIN_CODE)?.is_some() {
        bail!("this data directory is waiting to join a mesh with an invite code");
    }
    let node = node_key(data_dir)?;
    let key = MeshKey::generate();
    write_atomic(&data_dir.mesh_key(), &key.to_bytes(), SECRET_MODE)
        .with_context(|| format!("writing {}", data_dir.mesh_key().display()))?;
    let all = Role::ALL
        .into_iter()
        .fold(Roles::EMPTY, |acc, r| acc | Roles::from(r));
    let cert = key.certify(
        node.public().to_peer_id(),
        all,
        unix_now().saturating_add(OWN_CERT_LIFETIME_SECS),
        rand::random(),
    );
    let mut roster = Roster::new(key.id());
    roster.insert_certificate(cert)?;
    state.put(
        KEY_ROSTER,
        &PersistedRoster {
            mesh: key.id(),
            roster: roster.snapshot(),
        },
    )?;
    Ok(key.id())
}

/// Whether `init` would start a new mesh here: the node is in none and joins none.
pub fn may_init(data_dir: &DataDir) -> anyhow::Result<bool> {
    let state = State::open(data_dir)?;
    Ok(load_roster(&state)?.is_none() && state.get::<String>(KEY_JOIN_CODE)?.is_none())
}

/// `blendnet join CODE`: checks the code and stores it for the next `up`.
pub fn join(data_dir: &DataDir, code: &InviteCode) -> anyhow::Result<()> {
    let state = State::open(data_dir)?;
    if let Some(roster) = load_roster(&state)? {
        bail!(
            "this data directory is already a member of mesh {}",
            roster.mesh()
        );
    }
    node_key(data_dir)?;
    state.put(KEY_JOIN_CODE, &code.encode())?;
    Ok(())
}

/// Records the cloud's identity proof that the next `up` sends with its redemption (see
/// `blendnet enroll`).
pub fn set_join_proof(
    data_dir: &DataDir,
    proof: &blendnet_proto::wire::IdentityProof,
) -> anyhow::Result<()> {
    State::open(data_dir)?.put(KEY_JOIN_PROOF, proof)?;
    Ok(())
}

fn parse_addrs(key: &str, values: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<Multiaddr>().map_err(|e| {
                anyhow!("invalid value for `{key}[{i}]`: {v:?} is not a multiaddr: {e}")
            })
        })
        .collect()
}

fn wire_capabilities(
    caps: &Capabilities,
    render: bool,
    price_per_hour_micros: Option<u64>,
) -> blendnet_proto::wire::Capabilities {
    blendnet_proto::wire::Capabilities {
        daemon_version: caps.daemon_version.clone(),
        cores: u32::try_from(caps.cores).unwrap_or(u32::MAX),
        ram_bytes: caps.ram_bytes,
        free_disk_bytes: caps.free_disk_bytes,
        gpus: caps.gpus.clone(),
        blender: caps.blender.as_ref().map(|b| b.version.clone()),
        devices: caps
            .blender
            .as_ref()
            .map(|b| b.devices.devices.clone())
            .unwrap_or_default(),
        denoiser: caps.blender.as_ref().is_some_and(|b| b.devices.denoiser),
        render,
        price_per_hour_micros,
    }
}

/// Waits for SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `blendnet up`: runs the node until a signal; an error if joining was refused.
pub async fn up(data_dir: DataDir, config: Config) -> anyhow::Result<()> {
    let state = State::open(&data_dir)?;
    let keypair = node_key(&data_dir)?;
    let local = keypair.public().to_peer_id();
    let listen = parse_addrs("listen", &config.listen)?;
    let bootstrap = parse_addrs("bootstrap", &config.bootstrap)?;
    let psk =
        match &config.psk_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the pre-shared key {}", path.display()))?;
                Some(text.parse::<blendnet_net::PreSharedKey>().map_err(|e| {
                    anyhow!("invalid value for `psk_file`: {}: {e}", path.display())
                })?)
            }
            None => None,
        };
    let membership = match load_roster(&state)? {
        Some(roster) => Membership::Member {
            roster,
            mesh_key: mesh_key(&data_dir)?,
        },
        None => match state.get::<String>(KEY_JOIN_CODE)? {
            Some(text) => Membership::Joining(
                InviteCode::decode(&text).context("the stored invite code is unreadable")?,
            ),
            None => Membership::Pending,
        },
    };
    let invites: Invites = state.get(KEY_INVITES)?.unwrap_or_default();
    let join_proof = match &membership {
        Membership::Joining(_) => state.get(KEY_JOIN_PROOF)?,
        _ => None,
    };
    // As an inviter: the keys the identity proofs of cloud instances are checked against.
    let verifier = match &config.cloud {
        Some(cloud) => {
            let roots = std::sync::Arc::new(cloud.trust_roots()?);
            Some(blendnet_net::IdentityVerifier(std::sync::Arc::new(
                move |proof: &blendnet_proto::wire::IdentityProof,
                      required: &blendnet_proto::wire::RequiredProof,
                      mesh: &MeshId,
                      now: u64| {
                    roots
                        .verify(proof, required, &mesh.to_string(), now)
                        .map_err(|e| e.to_string())
                },
            )))
        }
        None => None,
    };
    // The provisioner learns from the invites which peer each of its instances became.
    let (invites_tx, invites_rx) = watch::channel(invites.clone());
    let known_addrs = state
        .all_peers::<Vec<String>>()?
        .into_iter()
        .filter_map(|(peer, addrs)| {
            let peer: PeerId = peer.parse().ok()?;
            Some((peer, addrs.iter().filter_map(|a| a.parse().ok()).collect()))
        })
        .collect();
    let fingerprint = Fingerprint::of(&local);
    match &membership {
        Membership::Pending => tracing::info!(
            peer = %local, %fingerprint,
            "not in a mesh yet: admit this machine from a member with `blendnet admit {fingerprint}`, or run `blendnet join CODE` / `blendnet init`"
        ),
        Membership::Joining(code) => {
            tracing::info!(peer = %local, %fingerprint, inviter = %code.inviter, "joining with an invite code")
        }
        Membership::Member { roster, .. } => {
            tracing::info!(peer = %local, %fingerprint, mesh = %roster.mesh(), "starting")
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let Spawned {
        net,
        mut events,
        deliveries,
        streams,
        task: net_task,
    } = blendnet_net::spawn(
        blendnet_net::Config {
            keypair: keypair.clone(),
            transport: Transport::Network { psk },
            listen,
            bootstrap,
            mdns: config.mdns,
            membership,
            invites,
            known_addrs,
            join_proof,
            verifier,
            // What is known at once; the rest follows when detection (below) is done.
            capabilities: blendnet_proto::wire::Capabilities {
                daemon_version: env!("CARGO_PKG_VERSION").to_string(),
                render: config.render,
                ..Default::default()
            },
        },
        stopped(stop_rx.clone()),
    )?;

    let store = blendnet_store::Store::open(
        &store_dir(data_dir.path()),
        state.database(),
        config.store_quota,
    )
    .context("opening the blob store")?;
    let seed = u64::from_le_bytes(
        blake3::hash(&local.to_bytes()).as_bytes()[..8]
            .try_into()
            .unwrap_or_default(),
    );
    let blobs = Blobs::new(store, streams.clone(), net.clone(), seed);
    let (reports_tx, reports) = mpsc::channel(RENDER_REPORTS);
    let (rendering_tx, mut rendering) = watch::channel(None);
    let render = Render::spawn(
        data_dir.path().join(WORK_DIR),
        blobs.clone(),
        reports_tx,
        rendering_tx,
        config.render_threads,
    );
    // What this node renders goes out with its status, at most once per ACTIVITY_EVERY.
    {
        let net = net.clone();
        tokio::spawn(async move {
            while rendering.changed().await.is_ok() {
                let now = *rendering.borrow_and_update();
                if net.set_rendering(now).await.is_err() {
                    return;
                }
                tokio::time::sleep(ACTIVITY_EVERY).await;
            }
        });
    }
    let (offer_tx, offer) = watch::channel(None);
    let board = Board::spawn(
        BoardSetup {
            keypair,
            net: net.clone(),
            streams,
            blobs: blobs.clone(),
            render: render.clone(),
            database: state.database(),
            work_dir: data_dir.path().join(WORK_DIR),
            renders: config.render,
            offer,
        },
        reports,
        stop_rx.clone(),
    )
    .context("starting the job board")?;

    // Full capabilities take a second or two (Blender's version and devices): detect them off
    // the loop, then advertise them and hand Blender to the render side.
    {
        let net = net.clone();
        let dir = data_dir.path().to_path_buf();
        let blender = config.blender.clone();
        let render_enabled = config.render;
        let price = config.price_per_hour_micros();
        tokio::spawn(async move {
            let detected =
                tokio::task::spawn_blocking(move || Capabilities::detect(&dir, blender.as_deref()))
                    .await;
            if let Ok((caps, problem)) = detected {
                if let Some(problem) = problem {
                    tracing::warn!(%problem, "no usable Blender: this node will not render");
                }
                if let Some(b) = &caps.blender {
                    tracing::info!(version = %b.version, path = %b.path, "found Blender");
                }
                let blender = caps.blender.as_ref().map(|b| PathBuf::from(&b.path));
                render.send(RenderMessage::SetBlender(blender)).await;
                let _ = offer_tx.send(Some(Offer {
                    cores: u32::try_from(caps.cores).unwrap_or(u32::MAX),
                    gpus: caps.blender.as_ref().map_or(0, |b| {
                        b.devices.devices.iter().filter(|d| d.kind != "CPU").count()
                    }) as u32,
                    blender: caps.blender.as_ref().map(|b| b.version.clone()),
                    denoiser: caps.blender.as_ref().is_some_and(|b| b.devices.denoiser),
                    price_per_hour_micros: price,
                }));
                let _ = net
                    .set_capabilities(wire_capabilities(&caps, render_enabled, price))
                    .await;
            }
        });
    }

    // Gossip for the layers above the mesh: `have` feeds the blob store's hints; jobs and
    // tasks go to the job board.
    {
        let blobs = blobs.clone();
        let board = board.clone();
        let mut deliveries = deliveries;
        tokio::spawn(async move {
            while let Some(d) = deliveries.recv().await {
                match d.topic {
                    blendnet_proto::Topic::Have => blobs.on_have(d.source, &d.data),
                    blendnet_proto::Topic::Jobs | blendnet_proto::Topic::Tasks => {
                        board.deliver(d).await
                    }
                    _ => {}
                }
            }
        });
    }
    let _blob_server = blobs.spawn_server().context("serving blobs")?;

    // With a [cloud] table, the provisioner: it starts instances only with max_instances above
    // 0, but also renews and reaps those started by hand. Without credentials in this
    // daemon's environment, that is an error only when it is to start instances itself.
    let provider = match config.cloud.as_ref().map(crate::cloud_cmd::provider) {
        Some(Err(e)) if config.cloud.as_ref().is_some_and(|c| c.max_instances == 0) => {
            tracing::warn!(error = %format!("{e:#}"), "the [cloud] provider is unusable here: instances started by hand are not renewed or reaped");
            None
        }
        other => other.transpose()?,
    };
    let (cloud_tx, cloud_view) = watch::channel(None);
    let provisioning = provider.is_some();
    if let (Some(cloud), Some(provider)) = (&config.cloud, provider) {
        let provisioner = Provisioner::new(
            provider,
            cloud.clone(),
            net.clone(),
            board.clone(),
            invites_rx,
            cloud_tx,
        );
        tokio::spawn(provisioner.run(stop_rx.clone()));
    }

    let listener = tokio::net::TcpListener::bind(config.api)
        .await
        .with_context(|| format!("binding the API to {}", config.api))?;
    let api_addr = listener.local_addr()?;
    let token = api::new_token();
    // The status page for other machines: the same routes over TLS, on the `web` address.
    let web = match config.web {
        Some(addr) => {
            let cert = crate::web::WebCert::load_or_create(&data_dir.path().join("web"), addr)?;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the status page to {addr}"))?;
            Some((tcp.local_addr()?, tcp, cert))
        }
        None => None,
    };
    let auth = std::sync::Arc::new(crate::web::Auth::new(
        token.clone(),
        crate::web::Places {
            local: api_addr,
            remote: web
                .as_ref()
                .map(|(bound, _, cert)| (*bound, cert.fingerprint.clone())),
        },
    ));
    let backend = NodeBackend {
        net: net.clone(),
        blobs,
        board: board.clone(),
        work_dir: data_dir.path().join(WORK_DIR),
        cost: crate::cost_cmd::Daemon {
            data_dir: data_dir.clone(),
            blender: config.blender.clone(),
            threads: config.render_threads,
            cloud: config.cloud.clone(),
        },
        cloud: provisioning.then_some(cloud_view),
    };
    let router = api::router(auth, backend);
    if let Some((bound, tcp, cert)) = web {
        let fingerprint = cert.fingerprint.clone();
        let listener = crate::web::TlsListener::new(tcp, cert)?;
        let router = router.clone().layer(axum::Extension(crate::web::OverTls));
        tokio::spawn(api::serve(listener, router, stopped(stop_rx.clone())));
        tracing::info!(web = %bound, %fingerprint, "status page served over TLS");
    }
    let api_task = tokio::spawn(api::serve(listener, router, stopped(stop_rx.clone())));
    api::publish(&data_dir, api_addr, &token).context("publishing the API address")?;
    tracing::info!(api = %api_addr, "local API ready");

    // A spot instance leaves when its cloud says it is about to be taken: the running task
    // goes back to its coordinator now rather than when its lease runs out.
    let preemption = async {
        match config
            .preemption
            .as_deref()
            .map(str::parse::<preempt::Cloud>)
        {
            Some(Ok(cloud)) => preempt::Watcher::new(cloud).notice(preempt::POLL).await,
            _ => std::future::pending().await,
        }
    };
    tokio::pin!(preemption);

    let result = loop {
        tokio::select! {
            _ = signal() => {
                tracing::info!("shutting down (a second signal exits at once)");
                break Ok(());
            }
            notice = &mut preemption => {
                tracing::warn!(kind = notice.kind, detail = %notice.detail, "preemption notice: handing back the running task and leaving");
                match tokio::time::timeout(HAND_BACK_WITHIN, board.drain()).await {
                    Ok(Ok(true)) => tracing::info!("handed the running task back to its coordinator"),
                    Ok(Ok(false)) => tracing::info!("no task was running"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not hand back the running task"),
                    Err(_) => tracing::warn!("the coordinator did not take the task back in time; its lease will run out"),
                }
                break Ok(());
            }
            event = events.recv() => match event {
                Some(Event::JoinFailed(failure)) => {
                    break Err(anyhow!("could not join the mesh: {failure}"));
                }
                Some(event) => {
                    if let Event::InvitesChanged(invites) = &event {
                        invites_tx.send_replace(invites.clone());
                    }
                    persist(&state, event)
                }
                None => break Err(anyhow!("the network actor stopped unexpectedly")),
            },
        }
    };

    let _ = stop_tx.send(true);
    let _ = api::unpublish(&data_dir, api_addr);
    let drain = async {
        let _ = net_task.await;
        // Persist what the actor reported before it stopped.
        while let Ok(event) = events.try_recv() {
            if !matches!(event, Event::JoinFailed(_)) {
                persist(&state, event);
            }
        }
        let _ = api_task.await;
    };
    tokio::select! {
        _ = drain => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => tracing::warn!("shutdown took too long; exiting"),
        _ = signal() => tracing::warn!("second signal: exiting at once"),
    }
    tracing::info!("stopped");
    result
}

/// Writes what the network reported. A failed write is logged: the network keeps the state in
/// memory and reports it again with the next change.
fn persist(state: &State, event: Event) {
    let result = match &event {
        Event::Joined { mesh, roster } | Event::RosterChanged { mesh, roster } => state
            .put(
                KEY_ROSTER,
                &PersistedRoster {
                    mesh: *mesh,
                    roster: roster.clone(),
                },
            )
            .and_then(|()| {
                if matches!(event, Event::Joined { .. }) {
                    state
                        .delete(KEY_JOIN_CODE)
                        .and_then(|_| state.delete(KEY_JOIN_PROOF))
                        .map(|_| ())
                } else {
                    Ok(())
                }
            }),
        Event::InvitesChanged(invites) => state.put(KEY_INVITES, invites),
        Event::PeerAddrs { peer, addrs } => {
            let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            state.put_peer(&peer.to_string(), &addrs)
        }
        Event::Revoked => {
            tracing::error!(
                "this node was revoked from its mesh; ask the mesh owner for a new invite"
            );
            Ok(())
        }
        Event::JoinFailed(_) => Ok(()),
    };
    if let Err(e) = result {
        tracing::error!(error = %e, "could not save state");
    }
}

/// The API's backend: each call is a message to the network actor.
#[derive(Debug, Clone)]
struct NodeBackend {
    net: Net,
    blobs: Blobs,
    board: Board,
    /// `<data dir>/work`: jobs' scenes and task logs.
    work_dir: PathBuf,
    /// What `POST /v1/cost` needs.
    cost: crate::cost_cmd::Daemon,
    /// What the provisioner runs, when this node has one.
    cloud: Option<watch::Receiver<Option<crate::provision::CloudView>>>,
}

/// Most task logs returned at once, and most bytes of each: a log is a few lines and Blender's
/// last forty.
const MAX_TASK_LOGS: usize = 1000;
const MAX_TASK_LOG_BYTES: u64 = 64 * 1024;

/// The task logs in `dir`, by task, as `[{"task": ..., "log": ...}]`; none if there is no dir.
async fn blocking_read_logs(dir: PathBuf) -> Result<serde_json::Value, ApiError> {
    tokio::task::spawn_blocking(move || {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(serde_json::json!([]));
        };
        let mut logs = Vec::new();
        for entry in entries.flatten().take(MAX_TASK_LOGS) {
            let path = entry.path();
            let Some(task) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let mut text = String::new();
            let read = std::fs::File::open(&path).and_then(|f| {
                use std::io::Read;
                f.take(MAX_TASK_LOG_BYTES).read_to_string(&mut text)
            });
            if read.is_ok() {
                logs.push(serde_json::json!({ "task": task, "log": text }));
            }
        }
        logs.sort_by(|a, b| a["task"].as_str().cmp(&b["task"].as_str()));
        Ok(serde_json::Value::Array(logs))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
}

fn board_error(e: crate::board::BoardError) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

fn parse_job(id: &str) -> Result<blendnet_proto::JobId, ApiError> {
    id.parse()
        .map_err(|e: blendnet_proto::job::BadJobId| ApiError::BadRequest(e.to_string()))
}

/// The job spec of a submission, with the API's defaults.
fn job_spec(req: SubmitRequest) -> Result<blendnet_proto::JobSpec, ApiError> {
    use blendnet_proto::{Engine, Split};
    let scene = req
        .scene
        .parse()
        .map_err(|e: blendnet_proto::id::BadBlobHash| ApiError::BadRequest(e.to_string()))?;
    let split = match req.split.as_deref().unwrap_or("auto") {
        "auto" => Split::Auto,
        "samples" => Split::Samples,
        "frames" => Split::Frames,
        other => {
            return Err(ApiError::BadRequest(format!(
                "split must be auto, samples or frames, not {other:?}"
            )));
        }
    };
    let engine = match req.engine.as_deref().unwrap_or("CYCLES") {
        "CYCLES" => Engine::Cycles,
        "BLENDER_EEVEE" | "BLENDER_EEVEE_NEXT" => Engine::Eevee,
        "BLENDER_WORKBENCH" => Engine::Workbench,
        other => Engine::Other(other.to_owned()),
    };
    let name = req.name.unwrap_or_else(|| req.blend.clone());
    let mut spec = blendnet_proto::JobSpec::new(
        name,
        scene,
        req.blend,
        req.frames,
        req.samples,
        engine,
        unix_now(),
    );
    spec.split = split;
    if let Some(secs) = req.target_task_secs {
        spec.target_task_secs = secs;
    }
    if let Some(n) = req.frames_per_task {
        spec.frames_per_task = n;
    }
    spec.blender = req.blender;
    spec.validate()
        .map_err(|e| ApiError::BadRequest(format!("invalid job: {e}")))?;
    Ok(spec)
}

fn stopped_error(_: blendnet_net::Stopped) -> ApiError {
    ApiError::Unavailable("the node is shutting down".into())
}

impl Backend for NodeBackend {
    async fn status(&self) -> Result<StatusView, ApiError> {
        self.net.status().await.map_err(stopped_error)
    }

    async fn cost(
        &self,
        req: crate::api::CostRequest,
    ) -> Result<crate::cost_cmd::CostView, ApiError> {
        crate::cost_cmd::serve(&self.cost, req).await
    }

    async fn peers(&self, pending: bool) -> Result<serde_json::Value, ApiError> {
        if pending {
            return serde_json::to_value(self.net.pending().await.map_err(stopped_error)?)
                .map_err(|e| ApiError::Internal(e.to_string()));
        }
        let peers = self.net.peers().await.map_err(stopped_error)?;
        let traffic = self.blobs.traffic();
        let mut value =
            serde_json::to_value(&peers).map_err(|e| ApiError::Internal(e.to_string()))?;
        // Each peer's blob traffic with this node, next to what the network knows of it.
        if let Some(list) = value.as_array_mut() {
            for (entry, peer) in list.iter_mut().zip(&peers) {
                let t = peer
                    .peer_id
                    .parse::<blendnet_net::PeerId>()
                    .ok()
                    .and_then(|id| traffic.get(&id).copied())
                    .unwrap_or_default();
                if let Some(map) = entry.as_object_mut() {
                    map.insert("bytes_in".into(), t.bytes_in.into());
                    map.insert("bytes_out".into(), t.bytes_out.into());
                }
            }
        }
        Ok(value)
    }

    async fn cloud(&self) -> Result<serde_json::Value, ApiError> {
        let Some(view) = &self.cloud else {
            return Err(ApiError::NotFound(
                "this node runs no provisioner: cloud instances show on the node whose config \
                 has a [cloud] table"
                    .into(),
            ));
        };
        let listed = view.borrow().clone();
        match listed {
            Some(view) => serde_json::to_value(view).map_err(|e| ApiError::Internal(e.to_string())),
            None => Err(ApiError::Unavailable(
                "the provisioner has not listed its instances yet".into(),
            )),
        }
    }

    async fn invite(&self, req: InviteRequest) -> Result<InviteView, ApiError> {
        let roles: Roles = req
            .roles
            .join(",")
            .parse()
            .map_err(|e: blendnet_proto::cert::UnknownRole| ApiError::BadRequest(e.to_string()))?;
        if req.ttl_secs == 0 {
            return Err(ApiError::BadRequest(
                "an invite needs a TTL of at least one second".into(),
            ));
        }
        let proof = match req.instance.as_deref() {
            None => None,
            Some(text) => Some(match text.parse::<blendnet_proto::wire::IdentityCloud>() {
                Ok(cloud) => blendnet_proto::wire::RequiredProof {
                    cloud,
                    instance: None,
                },
                Err(_) => blendnet_cloud::identity::parse_instance(text)
                    .map_err(|e| ApiError::BadRequest(e.to_string()))?,
            }),
        };
        let code = self
            .net
            .invite(
                Duration::from_secs(req.ttl_secs),
                roles,
                req.cert_lifetime_secs.map(Duration::from_secs),
                proof,
            )
            .await
            .map_err(stopped_error)?
            .map_err(|e| match e {
                InviteError::NoRoles => ApiError::BadRequest(e.to_string()),
                InviteError::NotListening => ApiError::Unavailable(e.to_string()),
                InviteError::NotAMember | InviteError::NotAnIssuer => {
                    ApiError::Conflict(e.to_string())
                }
            })?;
        Ok(InviteView {
            code: code.encode(),
            expires_at: code.expires_at,
        })
    }

    async fn bind_invite(&self, req: api::BindRequest) -> Result<InviteView, ApiError> {
        let code =
            InviteCode::decode(&req.code).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let proof = blendnet_cloud::identity::parse_instance(&req.instance)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        self.net
            .bind_invite(code.token, proof)
            .await
            .map_err(stopped_error)?
            .map_err(|e| ApiError::Conflict(e.to_string()))?;
        Ok(InviteView {
            code: req.code,
            expires_at: code.expires_at,
        })
    }

    async fn admit(&self, req: AdmitRequest) -> Result<PeerRef, ApiError> {
        let fingerprint: Fingerprint = req
            .fingerprint
            .parse()
            .map_err(|e: blendnet_proto::id::BadFingerprint| ApiError::BadRequest(e.to_string()))?;
        let peer = self
            .net
            .admit(fingerprint)
            .await
            .map_err(stopped_error)?
            .map_err(|e| match e {
                AdmitError::NoSuchPeer(_) => ApiError::NotFound(e.to_string()),
                AdmitError::Unreachable { .. } => ApiError::Unavailable(e.to_string()),
                AdmitError::NotAMember | AdmitError::NotAnIssuer | AdmitError::Refused { .. } => {
                    ApiError::Conflict(e.to_string())
                }
            })?;
        Ok(PeerRef {
            peer_id: peer.to_string(),
        })
    }

    async fn store_add(&self, req: StoreAddRequest) -> Result<StoreAddView, ApiError> {
        let paths = req
            .paths
            .iter()
            .map(|p| {
                let path = std::path::PathBuf::from(p);
                if path.is_absolute() {
                    Ok(path)
                } else {
                    Err(ApiError::BadRequest(format!(
                        "{p:?} is not an absolute path"
                    )))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let named = req
            .files
            .into_iter()
            .map(|f| {
                let path = PathBuf::from(&f.path);
                if path.is_absolute() {
                    Ok((path, f.name))
                } else {
                    Err(ApiError::BadRequest(format!(
                        "{:?} is not an absolute path",
                        f.path
                    )))
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.blobs.add_named(paths, named).await
    }

    async fn store_get(&self, req: StoreGetRequest) -> Result<StoreGetView, ApiError> {
        let hash: blendnet_proto::BlobHash = req
            .hash
            .parse()
            .map_err(|e: blendnet_proto::id::BadBlobHash| ApiError::BadRequest(e.to_string()))?;
        let out = std::path::PathBuf::from(&req.out);
        if !out.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "{:?} is not an absolute path",
                req.out
            )));
        }
        let from = match &req.from {
            Some(p) => Some(
                p.trim()
                    .parse::<PeerId>()
                    .map_err(|_| ApiError::BadRequest(format!("not a peer id: {p:?}")))?,
            ),
            None => None,
        };
        self.blobs.get(hash, out, from).await
    }

    async fn store_list(&self) -> Result<serde_json::Value, ApiError> {
        self.blobs.list().await
    }

    async fn store_fetches(&self) -> Result<serde_json::Value, ApiError> {
        let list: Vec<serde_json::Value> = self
            .blobs
            .progress()
            .into_iter()
            .map(|(hash, p)| {
                serde_json::json!({
                    "hash": hash.to_string(),
                    "done_bytes": p.done_bytes,
                    "size": p.size,
                    "providers": p.providers,
                })
            })
            .collect();
        Ok(serde_json::Value::Array(list))
    }

    async fn store_gc(&self) -> Result<StoreGcView, ApiError> {
        self.blobs.gc().await
    }

    async fn revoke(&self, req: RevokeRequest) -> Result<PeerRef, ApiError> {
        let peer: PeerId = req
            .peer
            .trim()
            .parse()
            .map_err(|_| ApiError::BadRequest(format!("not a peer id: {:?}", req.peer)))?;
        self.net
            .revoke(peer)
            .await
            .map_err(stopped_error)?
            .map_err(|e| match e {
                RevokeError::NotFound(_) => ApiError::NotFound(e.to_string()),
                RevokeError::IsSelf(_) => ApiError::BadRequest(e.to_string()),
                RevokeError::NotAMember | RevokeError::NotAnIssuer => {
                    ApiError::Conflict(e.to_string())
                }
            })?;
        Ok(PeerRef {
            peer_id: peer.to_string(),
        })
    }

    async fn jobs(&self) -> Result<serde_json::Value, ApiError> {
        let jobs = self.board.jobs().await.map_err(board_error)?;
        serde_json::to_value(jobs).map_err(|e| ApiError::Internal(e.to_string()))
    }

    async fn job(&self, id: String) -> Result<serde_json::Value, ApiError> {
        let job = parse_job(&id)?;
        match self.board.job(job).await.map_err(board_error)? {
            Some(view) => {
                let mut value =
                    serde_json::to_value(view).map_err(|e| ApiError::Internal(e.to_string()))?;
                let delivery = self.board.outputs(job).await.map_err(board_error)?;
                value["delivery"] = serde_json::to_value(delivery)
                    .map_err(|e| ApiError::Internal(e.to_string()))?;
                Ok(value)
            }
            None => Err(ApiError::NotFound(format!("no job {id} on this node"))),
        }
    }

    async fn submit(&self, mut req: SubmitRequest) -> Result<JobRef, ApiError> {
        let out = req.out.take().map(PathBuf::from);
        if let Some(dir) = &out
            && !dir.is_absolute()
        {
            return Err(ApiError::BadRequest(format!(
                "the output directory {} is not an absolute path",
                dir.display()
            )));
        }
        let spec = job_spec(req)?;
        // The job belongs to the mesh: before it exists, a second peer holds its scene, so a
        // submitter that dies at once does not take the scene with it.
        match self
            .board
            .replicate(spec.scene)
            .await
            .map_err(board_error)?
        {
            Some(peer) => tracing::info!(scene = %spec.scene, %peer, "scene replicated"),
            None => tracing::warn!(
                scene = %spec.scene,
                "no other peer holds the scene: the job waits for this node if it stops"
            ),
        }
        match self.board.submit(spec, out).await.map_err(board_error)? {
            Ok(job) => Ok(JobRef {
                job: job.to_string(),
            }),
            Err(reason) => Err(ApiError::BadRequest(reason)),
        }
    }

    async fn job_logs(&self, id: String) -> Result<serde_json::Value, ApiError> {
        let job = parse_job(&id)?;
        let dir = self.work_dir.join(job.to_string()).join("logs");
        blocking_read_logs(dir).await
    }

    async fn job_preview(&self, id: String, query: PreviewQuery) -> Result<Vec<u8>, ApiError> {
        let job = parse_job(&id)?;
        let Some(view) = self.board.job(job).await.map_err(board_error)? else {
            return Err(ApiError::NotFound(format!("no job {id} on this node")));
        };
        if !view.spec.splits_samples() {
            return Err(ApiError::NotFound(format!(
                "job {id} renders whole frames: its frames are shown when they are done"
            )));
        }
        let frame = match query.frame {
            Some(f) if view.spec.frames.contains(&f) => f,
            Some(f) => return Err(ApiError::NotFound(format!("job {id} has no frame {f}"))),
            None => view
                .frames
                .iter()
                .find(|f| f.samples_done > 0)
                .or(view.frames.first())
                .map(|f| f.frame)
                .ok_or_else(|| ApiError::NotFound(format!("job {id} has no frames")))?,
        };
        // The frame's slices that are done or rendered, one result each, in sample order.
        let mut slices: Vec<(u32, blendnet_proto::BlobHash)> = view
            .tasks
            .iter()
            .filter(|t| t.in_cover && !t.task.is_merge() && t.task.frame_start == frame)
            .filter_map(|t| {
                let result = match t.state {
                    TaskState::Done { result, .. } => Some(result),
                    _ => t.results.first().map(|(_, hash)| *hash),
                };
                result.map(|hash| (t.task.sample_offset, hash))
            })
            .collect();
        slices.sort();
        if slices.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no slice of frame {frame} of job {id} is rendered yet"
            )));
        }
        let size = query.size.unwrap_or(blendnet_exr::DEFAULT_PREVIEW_SIZE);
        let dir = self.work_dir.join(job.to_string()).join("preview");
        let hashes: Vec<blendnet_proto::BlobHash> = slices.iter().map(|(_, h)| *h).collect();
        preview::png(&self.blobs, &dir, frame, &hashes, size).await
    }

    async fn job_fetch(&self, id: String, req: FetchRequest) -> Result<FetchView, ApiError> {
        let job = parse_job(&id)?;
        let out = PathBuf::from(&req.out);
        if !out.is_absolute() {
            return Err(ApiError::BadRequest(format!(
                "{:?} is not an absolute path",
                req.out
            )));
        }
        let Some(view) = self.board.job(job).await.map_err(board_error)? else {
            return Err(ApiError::NotFound(format!("no job {id} on this node")));
        };
        let mut files = Vec::new();
        for hash in &view.outputs {
            let staging = self
                .work_dir
                .join(job.to_string())
                .join("fetch")
                .join(hash.to_string());
            let written = deliver::deliver(&self.blobs, *hash, &staging, &out).await;
            let _ = tokio::fs::remove_dir_all(&staging).await;
            files.extend(written.map_err(ApiError::Internal)?);
        }
        let mut files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        files.sort();
        Ok(FetchView {
            files,
            complete: view.summary.status == blendnet_core::job::JobStatus::Done,
        })
    }

    async fn cancel(&self, id: String) -> Result<JobRef, ApiError> {
        let job = parse_job(&id)?;
        match self.board.cancel(job).await.map_err(board_error)? {
            Ok(()) => Ok(JobRef { job: id }),
            Err(reason) if reason.starts_with("no job") => Err(ApiError::NotFound(reason)),
            Err(reason) => Err(ApiError::Conflict(reason)),
        }
    }

    fn job_changes(&self) -> Result<tokio::sync::broadcast::Receiver<JobChange>, ApiError> {
        Ok(self.board.changes())
    }
}
