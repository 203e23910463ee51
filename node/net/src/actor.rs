//! The network actor: one `select!` loop over shutdown, commands, a tick and swarm events.
//! Each arm calls a short synchronous method; nothing in here awaits long work.

use crate::behaviour::{Behaviour, BehaviourEvent, build_swarm};
use crate::codec::Checked;
use crate::{
    AdmitError, BindError, BuildError, Config, Delivery, Event, InviteError, JoinFailure,
    Membership, NetMessage, NodeStatus, PeerView, PendingView, PublishError, RenewError,
    RevokeError, Transport, unix_now,
};
use blendnet_core::{Invites, Roster};
use blendnet_proto::wire::{
    Activity, Capabilities, IdentityProof, JoinRequest, JoinResponse, MAX_ADDRESS_ENTRIES,
    MAX_ADDRS_PER_PEER, MAX_GOSSIP_BYTES, MAX_PROOF_PART_BYTES, PeerStatus, Refusal, RequiredProof,
    RosterDelta, SyncRequest, SyncResponse,
};
use blendnet_proto::{
    Certificate, Fingerprint, IDENTIFY_PROTOCOL, InviteCode, MeshKey, Roles, RosterSnapshot, Token,
    Topic, decode, encode,
};
use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::SwarmEvent;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, Swarm, identify, mdns};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How often the actor looks after connections, status and timeouts.
const TICK: Duration = Duration::from_secs(1);
/// How long an unknown peer may stay connected without becoming a member (to redeem an invite).
const PROBATION: Duration = Duration::from_secs(10);
/// How often a member gossips its status (addresses, capabilities).
const STATUS_INTERVAL: Duration = Duration::from_secs(10);
/// How often a member compares rosters with one connected member (anti-entropy).
const SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// Redial backoff after a failed dial: doubles from the first to the last.
const DIAL_BACKOFF_FIRST: Duration = Duration::from_secs(1);
const DIAL_BACKOFF_LAST: Duration = Duration::from_secs(30);
/// How often bootstrap addresses are dialled while no member is connected.
const BOOTSTRAP_RETRY: Duration = Duration::from_secs(5);
/// How long `admit` waits for the LAN machine to accept.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an ordinary member certificate lasts (cloud machines get short ones later).
const MEMBER_CERT_LIFETIME_SECS: u64 = 10 * 365 * 24 * 3600;
/// How long a peer that sent invalid data is refused: long enough to stop a loop of bad
/// messages, short enough that a peer fixed by an upgrade comes back by itself.
const BAN_DURATION: Duration = Duration::from_secs(60);
/// Redemptions cut off unanswered in a row before a joining node gives up: a shut gate
/// (the inviter has no open invite) closes every connection of a stranger at once.
const JOIN_CUT_OFF_LIMIT: u32 = 5;
/// How long a joining instance waits before asking again when its inviter does not know the
/// instance's id yet (its launch call has not returned).
const JOIN_NOT_READY_RETRY: Duration = Duration::from_secs(2);
/// "Not ready" answers before a joining node gives up: a minute, far longer than a launch
/// call takes to return.
const JOIN_NOT_READY_LIMIT: u32 = 30;
/// Most unknown LAN daemons remembered, so a noisy network cannot grow this without bound.
const MAX_LAN_PENDING: usize = 256;

/// What we know of one peer.
#[derive(Debug)]
struct PeerState {
    addrs: Vec<Multiaddr>,
    connections: usize,
    last_seen: Option<u64>,
    status: Option<PeerStatus>,
    next_dial: Instant,
    failed_dials: u32,
}

impl PeerState {
    fn new() -> PeerState {
        PeerState {
            addrs: Vec::new(),
            connections: 0,
            last_seen: None,
            status: None,
            next_dial: Instant::now(),
            failed_dials: 0,
        }
    }

    /// Adds addresses, newest first, keeping at most [`MAX_ADDRS_PER_PEER`]. True if changed.
    fn add_addrs(&mut self, addrs: impl IntoIterator<Item = Multiaddr>) -> bool {
        let mut changed = false;
        for addr in addrs {
            let addr = without_p2p(addr);
            if !self.addrs.contains(&addr) {
                self.addrs.insert(0, addr);
                changed = true;
            }
        }
        self.addrs.truncate(MAX_ADDRS_PER_PEER);
        changed
    }
}

/// An admission in flight: the certificate offered, and who waits for the answer.
#[derive(Debug)]
struct Admission {
    certificate: Certificate,
    reply: oneshot::Sender<Result<PeerId, AdmitError>>,
    deadline: Instant,
    request: Option<OutboundRequestId>,
}

/// Why a gossip message was refused.
enum Rejection {
    /// From a peer without the right (not a member, missing role): dropped.
    Unauthorized(String),
    /// Malformed or forged content: dropped, and the peer that sent it is disconnected.
    Invalid(String),
}

/// The actor owning the swarm and the node's view of the mesh.
pub struct NetActor {
    swarm: Swarm<Behaviour>,
    local: PeerId,
    membership: Membership,
    invites: Invites,
    peers: HashMap<PeerId, PeerState>,
    lan: HashMap<PeerId, Vec<Multiaddr>>,
    probation: HashMap<PeerId, Instant>,
    admissions: HashMap<PeerId, Admission>,
    banned: HashMap<PeerId, Instant>,
    capabilities: Capabilities,
    /// What this node renders now, for its status.
    rendering: Option<Activity>,
    bootstrap: Vec<Multiaddr>,
    commands: mpsc::Receiver<NetMessage>,
    events: mpsc::UnboundedSender<Event>,
    deliveries: mpsc::Sender<Delivery>,
    /// Members in good standing, for the blob streams that run outside this loop.
    members: tokio::sync::watch::Sender<std::sync::Arc<HashSet<PeerId>>>,
    next_status: Instant,
    next_sync: Instant,
    next_bootstrap: Instant,
    join_in_flight: Option<OutboundRequestId>,
    /// Redemptions in a row whose connection the inviter closed unanswered.
    join_cut_off: u32,
    /// The cloud's proof of which instance this is, sent with each redemption.
    join_proof: Option<IdentityProof>,
    /// When to ask again after a "not ready" answer, and how many came so far.
    join_retry_at: Option<Instant>,
    join_not_ready: u32,
    verifier: Option<crate::IdentityVerifier>,
}

impl std::fmt::Debug for NetActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetActor")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

fn without_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

fn random_u64() -> u64 {
    rand::random()
}

impl NetActor {
    pub(crate) fn new(
        config: Config,
        commands: mpsc::Receiver<NetMessage>,
        events: mpsc::UnboundedSender<Event>,
        deliveries: mpsc::Sender<Delivery>,
        members: tokio::sync::watch::Sender<std::sync::Arc<HashSet<PeerId>>>,
    ) -> Result<NetActor, BuildError> {
        let local = config.keypair.public().to_peer_id();
        let psk = matches!(config.transport, Transport::Network { psk: Some(_) });
        let mut swarm = build_swarm(config.keypair, &config.transport, config.mdns)?;
        let mut listening = 0;
        for addr in config.listen {
            if psk && is_quic(&addr) {
                tracing::warn!(%addr, "not listening on QUIC: a pre-shared key works on TCP only");
                continue;
            }
            swarm
                .listen_on(addr.clone())
                .map_err(|e| BuildError::Listen {
                    addr,
                    reason: e.to_string(),
                })?;
            listening += 1;
        }
        if listening == 0 {
            return Err(BuildError::NoListenAddress);
        }
        let now = Instant::now();
        let mut actor = NetActor {
            swarm,
            local,
            membership: config.membership,
            invites: config.invites,
            peers: HashMap::new(),
            lan: HashMap::new(),
            probation: HashMap::new(),
            admissions: HashMap::new(),
            banned: HashMap::new(),
            capabilities: config.capabilities,
            rendering: None,
            bootstrap: config.bootstrap,
            commands,
            events,
            deliveries,
            members,
            next_status: now,
            next_sync: now + SYNC_INTERVAL,
            next_bootstrap: now,
            join_in_flight: None,
            join_cut_off: 0,
            join_proof: config.join_proof,
            join_retry_at: None,
            join_not_ready: 0,
            verifier: config.verifier,
        };
        for (peer, addrs) in config.known_addrs {
            actor.peer_mut(peer).add_addrs(addrs);
        }
        if let Membership::Joining(code) = &actor.membership {
            let inviter = code.inviter;
            let addrs: Vec<Multiaddr> = code.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            actor.peer_mut(inviter).add_addrs(addrs);
        }
        if actor.roster().is_some() {
            actor.subscribe_all();
        }
        actor.refresh_gate();
        Ok(actor)
    }

    /// A control for the blob stream protocol.
    pub(crate) fn stream_control(&self) -> libp2p_stream::Control {
        self.swarm.behaviour().streams.new_control()
    }

    /// Runs until `shutdown` completes or every handle is dropped.
    pub(crate) async fn run(mut self, shutdown: impl std::future::Future<Output = ()> + Send) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
            }
        }
        tracing::info!("network stopped");
    }

    // ----- state helpers ------------------------------------------------------------------

    fn roster(&self) -> Option<&Roster> {
        match &self.membership {
            Membership::Member { roster, .. } => Some(roster),
            _ => None,
        }
    }

    fn mesh_key(&self) -> Option<&MeshKey> {
        match &self.membership {
            Membership::Member { mesh_key, .. } => mesh_key.as_ref(),
            _ => None,
        }
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        self.roster().is_some_and(|r| r.is_member(peer, unix_now()))
    }

    /// Whether this node is a member in good standing (not pending, not revoked).
    fn active(&self) -> bool {
        self.is_member(&self.local)
    }

    fn peer_mut(&mut self, peer: PeerId) -> &mut PeerState {
        self.peers.entry(peer).or_insert_with(PeerState::new)
    }

    fn connected(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(|p| p.connections > 0)
    }

    fn emit(&self, event: Event) {
        // The daemon holds the receiver for as long as it runs; after that nothing is owed.
        let _ = self.events.send(event);
    }

    fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.swarm.listeners().cloned().collect()
    }

    fn subscribe_all(&mut self) {
        for topic in Topic::ALL {
            if let Err(e) = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .subscribe(&IdentTopic::new(topic.as_str()))
            {
                tracing::error!(%topic, error = %e, "cannot subscribe");
            }
        }
    }

    /// Brings the gate's policy in line with the roster, invites and admissions.
    fn refresh_gate(&mut self) {
        let now = unix_now();
        let (allowed, mut denied, open) = match &self.membership {
            Membership::Pending => (HashSet::new(), HashSet::new(), true),
            Membership::Joining(code) => (HashSet::from([code.inviter]), HashSet::new(), true),
            Membership::Member { roster, .. } => {
                let denied: HashSet<PeerId> = roster
                    .snapshot()
                    .revocations
                    .iter()
                    .map(|r| r.body.peer)
                    .collect();
                if roster.is_member(&self.local, now) {
                    let mut allowed: HashSet<PeerId> = roster.members(now).into_keys().collect();
                    allowed.extend(self.admissions.keys().copied());
                    (allowed, denied, self.invites.any_open(now))
                } else {
                    (HashSet::new(), denied, false)
                }
            }
        };
        denied.extend(self.banned.keys().copied());
        let members: HashSet<PeerId> = if self.active() {
            let now = unix_now();
            self.roster()
                .map(|r| {
                    r.members(now)
                        .into_keys()
                        .filter(|p| *p != self.local)
                        .collect()
                })
                .unwrap_or_default()
        } else {
            HashSet::new()
        };
        self.members.send_if_modified(|current| {
            if **current == members {
                false
            } else {
                *current = std::sync::Arc::new(members);
                true
            }
        });
        self.swarm
            .behaviour_mut()
            .gate
            .set_policy(allowed, denied, open);
    }

    fn publish(&mut self, topic: Topic, data: Vec<u8>) -> Result<(), PublishError> {
        if !self.active() {
            return Err(PublishError::NotAMember);
        }
        if data.len() > MAX_GOSSIP_BYTES {
            return Err(PublishError::TooLarge(data.len()));
        }
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(IdentTopic::new(topic.as_str()), data)
            .map(|_| ())
            .map_err(|e| PublishError::Gossip(e.to_string()))
    }

    /// Gossips new roster entries; anti-entropy covers peers that miss it.
    fn publish_roster_delta(&mut self, delta: RosterDelta) {
        if let Err(e) = self.publish(Topic::Roster, encode(&delta)) {
            tracing::debug!(error = %e, "roster delta not gossiped; anti-entropy will carry it");
        }
    }

    fn status_payload(&self) -> PeerStatus {
        PeerStatus {
            addrs: self
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            capabilities: self.capabilities.clone(),
            rendering: self.rendering,
            sent_at: unix_now(),
        }
    }

    /// Reacts to a roster that changed: the gate, connections of ex-members, persistence.
    fn on_roster_changed(&mut self, was_active: bool) {
        self.refresh_gate();
        let Some(roster) = self.roster() else { return };
        let mesh = roster.mesh();
        let snapshot = roster.snapshot();
        let now = unix_now();
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(p, s)| {
                s.connections > 0
                    && !roster.is_member(p, now)
                    && !self.probation.contains_key(p)
                    && !self.admissions.contains_key(p)
            })
            .map(|(p, _)| *p)
            .collect();
        // LAN machines that just became members: what mDNS said of them is now worth dialling.
        let admitted: Vec<PeerId> = self
            .lan
            .keys()
            .filter(|p| roster.is_member(p, now))
            .copied()
            .collect();
        for peer in gone {
            tracing::info!(%peer, "disconnecting: no longer a member");
            let _ = self.swarm.disconnect_peer_id(peer);
            self.swarm.behaviour_mut().kad.remove_peer(&peer);
        }
        for peer in admitted {
            if let Some(addrs) = self.lan.remove(&peer) {
                self.learn_addrs(peer, addrs);
            }
        }
        self.emit(Event::RosterChanged {
            mesh,
            roster: snapshot,
        });
        if was_active && !self.active() {
            tracing::error!(
                "this node's membership was revoked; it no longer takes part in the mesh"
            );
            let connected: Vec<PeerId> = self
                .peers
                .iter()
                .filter(|(_, s)| s.connections > 0)
                .map(|(p, _)| *p)
                .collect();
            for peer in connected {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            self.emit(Event::Revoked);
        }
    }

    /// Applies roster entries from a peer. Errors mean forged or foreign entries.
    fn apply_roster(&mut self, snapshot: RosterSnapshot) -> Result<(), String> {
        let was_active = self.active();
        let Membership::Member { roster, .. } = &mut self.membership else {
            return Ok(());
        };
        let (changes, errors) = roster.apply(snapshot);
        if !changes.is_empty() {
            tracing::info!(
                certificates = changes.certificates.len(),
                revocations = changes.revocations.len(),
                "roster updated"
            );
            self.on_roster_changed(was_active);
        }
        match errors.first() {
            Some(e) => Err(e.to_string()),
            None => Ok(()),
        }
    }

    /// Becomes a member of the roster's mesh (after an invite or an admission).
    fn adopt(&mut self, roster: Roster) {
        let mesh = roster.mesh();
        let snapshot = roster.snapshot();
        self.membership = Membership::Member {
            roster,
            mesh_key: None,
        };
        tracing::info!(mesh = %mesh, "joined the mesh");
        self.subscribe_all();
        self.refresh_gate();
        self.next_status = Instant::now();
        self.emit(Event::Joined {
            mesh,
            roster: snapshot,
        });
    }

    // ----- commands -----------------------------------------------------------------------

    fn on_command(&mut self, command: NetMessage) {
        match command {
            NetMessage::Status(reply) => {
                let _ = reply.send(self.node_status());
            }
            NetMessage::Peers(reply) => {
                let _ = reply.send(self.peer_views());
            }
            NetMessage::Pending(reply) => {
                let _ = reply.send(self.pending_views());
            }
            NetMessage::Invite {
                ttl,
                roles,
                cert_lifetime,
                proof,
                reply,
            } => {
                let _ = reply.send(self.make_invite(ttl, roles, cert_lifetime, proof));
            }
            NetMessage::BindInvite {
                token,
                proof,
                reply,
            } => {
                let bound = self.invites.require_proof(&token, proof.clone());
                if bound {
                    tracing::info!(?token, cloud = %proof.cloud, instance = ?proof.instance, "invite bound to an instance");
                    self.emit(Event::InvitesChanged(self.invites.clone()));
                }
                let _ = reply.send(if bound {
                    Ok(())
                } else {
                    Err(BindError::UnknownToken)
                });
            }
            NetMessage::Renew {
                peer,
                lifetime,
                reply,
            } => {
                let _ = reply.send(self.renew(peer, lifetime));
            }
            NetMessage::Admit { fingerprint, reply } => self.start_admission(fingerprint, reply),
            NetMessage::Revoke { peer, reply } => {
                let _ = reply.send(self.revoke(peer));
            }
            NetMessage::Publish { topic, data, reply } => {
                let _ = reply.send(self.publish(topic, data));
            }
            NetMessage::SetCapabilities(capabilities) => {
                self.capabilities = capabilities;
                self.next_status = Instant::now();
            }
            NetMessage::SetRendering(rendering) => {
                self.rendering = rendering;
                self.next_status = Instant::now();
            }
            #[cfg(test)]
            NetMessage::Discovered(found) => self.on_mdns(found),
        }
    }

    fn node_status(&self) -> NodeStatus {
        let now = unix_now();
        let (state, mesh_id, roles) = match &self.membership {
            Membership::Pending => ("pending", None, Roles::EMPTY),
            Membership::Joining(code) => ("joining", Some(code.mesh.to_string()), Roles::EMPTY),
            Membership::Member { roster, .. } => match roster.roles(&self.local, now) {
                Some(roles) => ("member", Some(roster.mesh().to_string()), roles),
                None => ("revoked", Some(roster.mesh().to_string()), Roles::EMPTY),
            },
        };
        let peer_count = self
            .peers
            .iter()
            .filter(|(p, s)| s.connections > 0 && **p != self.local && self.is_member(p))
            .count();
        NodeStatus {
            peer_id: self.local.to_string(),
            fingerprint: Fingerprint::of(&self.local).to_string(),
            mesh_id,
            member: state == "member",
            state: state.to_string(),
            roles: roles.names(),
            listen_addrs: self
                .listen_addrs()
                .into_iter()
                .map(|a| a.with(Protocol::P2p(self.local)).to_string())
                .collect(),
            peer_count,
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn peer_views(&self) -> Vec<PeerView> {
        let now = unix_now();
        let Some(roster) = self.roster() else {
            return Vec::new();
        };
        let active = self.active();
        roster
            .members(now)
            .into_iter()
            .map(|(peer, roles)| {
                if peer == self.local {
                    return PeerView {
                        peer_id: peer.to_string(),
                        fingerprint: Fingerprint::of(&peer).to_string(),
                        is_self: true,
                        online: true,
                        roles: roles.names(),
                        addrs: self
                            .listen_addrs()
                            .iter()
                            .map(ToString::to_string)
                            .collect(),
                        last_seen: Some(now),
                        blender: self.capabilities.blender.clone(),
                        capabilities: Some(self.capabilities.clone()),
                        rendering: self.rendering,
                    };
                }
                let state = self.peers.get(&peer);
                let online = active && state.is_some_and(|s| s.connections > 0);
                let capabilities = state
                    .and_then(|s| s.status.as_ref())
                    .map(|s| s.capabilities.clone());
                PeerView {
                    peer_id: peer.to_string(),
                    fingerprint: Fingerprint::of(&peer).to_string(),
                    is_self: false,
                    online,
                    roles: roles.names(),
                    addrs: state
                        .map(|s| s.addrs.iter().map(ToString::to_string).collect())
                        .unwrap_or_default(),
                    last_seen: if online {
                        Some(now)
                    } else {
                        state.and_then(|s| s.last_seen)
                    },
                    blender: capabilities.as_ref().and_then(|c| c.blender.clone()),
                    capabilities,
                    rendering: state
                        .and_then(|s| s.status.as_ref())
                        .and_then(|s| s.rendering),
                }
            })
            .collect()
    }

    fn pending_views(&self) -> Vec<PendingView> {
        let mut out: Vec<PendingView> = self
            .lan
            .iter()
            .filter(|(p, _)| !self.is_member(p))
            .map(|(p, addrs)| PendingView {
                peer_id: p.to_string(),
                fingerprint: Fingerprint::of(p).to_string(),
                addrs: addrs.iter().map(ToString::to_string).collect(),
            })
            .collect();
        out.sort_by(|a, b| a.fingerprint.cmp(&b.fingerprint));
        out
    }

    fn make_invite(
        &mut self,
        ttl: Duration,
        roles: Roles,
        cert_lifetime: Option<Duration>,
        proof: Option<RequiredProof>,
    ) -> Result<InviteCode, InviteError> {
        let mesh = self.roster().ok_or(InviteError::NotAMember)?.mesh();
        if !self.active() {
            return Err(InviteError::NotAMember);
        }
        if self.mesh_key().is_none() {
            return Err(InviteError::NotAnIssuer);
        }
        if roles.is_empty() {
            return Err(InviteError::NoRoles);
        }
        let addrs: Vec<String> = self
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect();
        if addrs.is_empty() {
            return Err(InviteError::NotListening);
        }
        let token = Token(rand::random());
        let expires_at = unix_now().saturating_add(ttl.as_secs());
        self.invites
            .issue(token, roles, expires_at, cert_lifetime.map(|d| d.as_secs()));
        if let Some(proof) = proof {
            self.invites.require_proof(&token, proof);
        }
        self.refresh_gate();
        self.emit(Event::InvitesChanged(self.invites.clone()));
        tracing::info!(?token, %roles, expires_at, "invite issued");
        Ok(InviteCode {
            mesh,
            inviter: self.local,
            addrs,
            token,
            expires_at,
        })
    }

    fn revoke(&mut self, peer: PeerId) -> Result<(), RevokeError> {
        if peer == self.local {
            return Err(RevokeError::IsSelf(peer));
        }
        let now = unix_now();
        let was_active = self.active();
        let Membership::Member { roster, mesh_key } = &mut self.membership else {
            return Err(RevokeError::NotAMember);
        };
        let key = mesh_key.as_ref().ok_or(RevokeError::NotAnIssuer)?;
        if roster.is_revoked(&peer) {
            return Ok(());
        }
        if !roster.is_member(&peer, now) {
            return Err(RevokeError::NotFound(peer));
        }
        let revocation = key.revoke(peer, now);
        // Signed by our own key just now: it cannot fail to verify.
        if let Err(e) = roster.insert_revocation(revocation.clone()) {
            tracing::error!(error = %e, "own revocation refused");
        }
        tracing::info!(%peer, "member revoked");
        self.publish_roster_delta(RosterDelta {
            certificates: Vec::new(),
            revocations: vec![revocation],
        });
        self.on_roster_changed(was_active);
        Ok(())
    }

    fn renew(&mut self, peer: PeerId, lifetime: Duration) -> Result<(), RenewError> {
        let now = unix_now();
        let was_active = self.active();
        let Membership::Member { roster, mesh_key } = &mut self.membership else {
            return Err(RenewError::NotAMember);
        };
        let key = mesh_key.as_ref().ok_or(RenewError::NotAnIssuer)?;
        let roles = roster
            .roles(&peer, now)
            .filter(|_| !roster.is_revoked(&peer))
            .ok_or(RenewError::NotFound(peer))?;
        let certificate = key.certify(
            peer,
            roles,
            now.saturating_add(lifetime.as_secs()),
            random_u64(),
        );
        // Signed by our own key just now: it cannot fail to verify.
        if let Err(e) = roster.insert_certificate(certificate.clone()) {
            tracing::error!(error = %e, "own certificate refused");
        }
        tracing::debug!(%peer, lifetime_secs = lifetime.as_secs(), "certificate renewed");
        self.publish_roster_delta(RosterDelta {
            certificates: vec![certificate],
            revocations: Vec::new(),
        });
        self.on_roster_changed(was_active);
        Ok(())
    }

    fn start_admission(
        &mut self,
        fingerprint: Fingerprint,
        reply: oneshot::Sender<Result<PeerId, AdmitError>>,
    ) {
        let result = (|| {
            if !self.active() {
                return Err(AdmitError::NotAMember);
            }
            let key = self.mesh_key().ok_or(AdmitError::NotAnIssuer)?;
            let (peer, addrs) = self
                .lan
                .iter()
                .find(|(p, _)| Fingerprint::of(p) == fingerprint && !self.is_member(p))
                .map(|(p, a)| (*p, a.clone()))
                .ok_or(AdmitError::NoSuchPeer(fingerprint))?;
            let certificate = key.certify(
                peer,
                Roles::default_member(),
                unix_now().saturating_add(MEMBER_CERT_LIFETIME_SECS),
                random_u64(),
            );
            Ok((peer, addrs, certificate))
        })();
        let (peer, addrs, certificate) = match result {
            Ok(x) => x,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        tracing::info!(%peer, %fingerprint, "admitting LAN machine");
        self.admissions.insert(
            peer,
            Admission {
                certificate,
                reply,
                deadline: Instant::now() + ADMIT_TIMEOUT,
                request: None,
            },
        );
        self.refresh_gate();
        if self.connected(&peer) {
            self.send_admission_offer(peer);
        } else if let Err(e) = self
            .swarm
            .dial(DialOpts::peer_id(peer).addresses(addrs).build())
        {
            self.finish_admission(
                peer,
                Err(AdmitError::Unreachable {
                    peer,
                    reason: e.to_string(),
                }),
            );
        }
    }

    fn send_admission_offer(&mut self, peer: PeerId) {
        let Some(roster) = self.roster() else { return };
        let mesh = roster.mesh();
        let mut offer = roster.snapshot();
        let Some(admission) = self.admissions.get(&peer) else {
            return;
        };
        if admission.request.is_some() {
            return;
        }
        offer.certificates.push(admission.certificate.clone());
        let id = self.swarm.behaviour_mut().join.send_request(
            &peer,
            Checked::Valid(JoinRequest::Admit {
                mesh,
                roster: offer,
            }),
        );
        if let Some(a) = self.admissions.get_mut(&peer) {
            a.request = Some(id);
        }
    }

    fn finish_admission(&mut self, peer: PeerId, result: Result<PeerId, AdmitError>) {
        if let Some(admission) = self.admissions.remove(&peer) {
            if result.is_ok() {
                let was_active = self.active();
                if let Membership::Member { roster, .. } = &mut self.membership
                    && let Err(e) = roster.insert_certificate(admission.certificate.clone())
                {
                    tracing::error!(error = %e, "own certificate refused");
                }
                self.publish_roster_delta(RosterDelta {
                    certificates: vec![admission.certificate],
                    revocations: Vec::new(),
                });
                self.on_roster_changed(was_active);
                // Reconnect as members, so every protocol starts from a clean slate
                // (on_roster_changed moved its LAN addresses to the member's).
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            let _ = admission.reply.send(result);
            self.refresh_gate();
        }
    }

    // ----- the tick -----------------------------------------------------------------------

    /// Disconnects a peer that sent invalid data and refuses it for [`BAN_DURATION`].
    fn punish(&mut self, peer: PeerId, reason: &str) {
        tracing::warn!(%peer, %reason, "peer sent invalid data: disconnecting it");
        self.banned.insert(peer, Instant::now() + BAN_DURATION);
        self.refresh_gate();
        let _ = self.swarm.disconnect_peer_id(peer);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let before = self.banned.len();
        self.banned.retain(|_, until| now < *until);
        if self.banned.len() != before {
            self.refresh_gate();
        }
        // Unknown peers that did not become members in time are shown the door.
        let expired: Vec<PeerId> = self
            .probation
            .iter()
            .filter(|(p, since)| now.duration_since(**since) > PROBATION && !self.is_member(p))
            .map(|(p, _)| *p)
            .collect();
        for peer in expired {
            tracing::debug!(%peer, "probation over: disconnecting unknown peer");
            self.probation.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        let timed_out: Vec<PeerId> = self
            .admissions
            .iter()
            .filter(|(_, a)| now > a.deadline)
            .map(|(p, _)| *p)
            .collect();
        for peer in timed_out {
            self.finish_admission(
                peer,
                Err(AdmitError::Unreachable {
                    peer,
                    reason: "no answer in time".into(),
                }),
            );
        }
        self.invites.prune(unix_now());
        match &self.membership {
            Membership::Joining(code) => {
                let inviter = code.inviter;
                if self.join_retry_at.is_some_and(|at| now >= at)
                    && self.join_in_flight.is_none()
                    && self.connected(&inviter)
                {
                    self.send_redeem();
                }
                self.dial_if_due(inviter);
            }
            Membership::Member { .. } if self.active() => self.member_tick(now),
            _ => {}
        }
    }

    fn member_tick(&mut self, now: Instant) {
        let members: Vec<PeerId> = self
            .roster()
            .map(|r| r.members(unix_now()).into_keys().collect())
            .unwrap_or_default();
        for peer in &members {
            if *peer != self.local {
                self.dial_if_due(*peer);
            }
        }
        let any_connected = members
            .iter()
            .any(|p| *p != self.local && self.connected(p));
        if !any_connected && now >= self.next_bootstrap && !self.bootstrap.is_empty() {
            self.next_bootstrap = now + BOOTSTRAP_RETRY;
            for addr in self.bootstrap.clone() {
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    tracing::debug!(%addr, error = %e, "bootstrap dial failed");
                }
            }
        }
        if now >= self.next_status {
            self.next_status = now + STATUS_INTERVAL;
            let status = self.status_payload();
            if let Err(e) = self.publish(Topic::Status, encode(&status)) {
                tracing::trace!(error = %e, "status not gossiped");
            }
        }
        if now >= self.next_sync {
            self.next_sync = now + SYNC_INTERVAL;
            let connected: Vec<PeerId> = members
                .iter()
                .filter(|p| **p != self.local && self.connected(p))
                .copied()
                .collect();
            if !connected.is_empty() {
                let peer = connected[(random_u64() as usize) % connected.len()];
                self.request_roster_sync(peer);
            }
        }
    }

    fn dial_if_due(&mut self, peer: PeerId) {
        let now = Instant::now();
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        if state.connections > 0 || state.addrs.is_empty() || now < state.next_dial {
            return;
        }
        let backoff = DIAL_BACKOFF_FIRST
            .saturating_mul(1 << state.failed_dials.min(5))
            .min(DIAL_BACKOFF_LAST);
        state.next_dial = now + backoff;
        state.failed_dials = state.failed_dials.saturating_add(1);
        let opts = DialOpts::peer_id(peer)
            .addresses(state.addrs.clone())
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        if let Err(e) = self.swarm.dial(opts) {
            tracing::trace!(%peer, error = %e, "dial not started");
        }
    }

    fn request_roster_sync(&mut self, peer: PeerId) {
        if let Some(digest) = self.roster().map(Roster::digest) {
            self.swarm
                .behaviour_mut()
                .sync
                .send_request(&peer, Checked::Valid(SyncRequest::Roster { digest }));
        }
    }

    // ----- swarm events -------------------------------------------------------------------

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => self.on_connected(peer_id, endpoint, num_established.get() as usize),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                ..
            } => {
                let state = self.peer_mut(peer_id);
                state.connections = num_established as usize;
                if num_established == 0 {
                    state.last_seen = Some(unix_now());
                    self.probation.remove(&peer_id);
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .remove_blacklisted_peer(&peer_id);
                    tracing::debug!(peer = %peer_id, "disconnected");
                }
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
                if let Some(peer) = peer_id
                    && self
                        .admissions
                        .get(&peer)
                        .is_some_and(|a| a.request.is_none())
                    && !self.connected(&peer)
                {
                    let reason = error.to_string();
                    self.finish_admission(peer, Err(AdmitError::Unreachable { peer, reason }));
                }
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection refused");
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour(event),
            _ => {}
        }
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: libp2p::core::ConnectedPoint, count: usize) {
        let dialled = match &endpoint {
            libp2p::core::ConnectedPoint::Dialer { address, .. } => Some(address.clone()),
            libp2p::core::ConnectedPoint::Listener { .. } => None,
        };
        let member = self.is_member(&peer);
        {
            let state = self.peer_mut(peer);
            state.connections = count;
            state.last_seen = Some(unix_now());
            state.failed_dials = 0;
            if member && let Some(addr) = dialled {
                state.add_addrs([addr]);
            }
        }
        if count > 1 {
            return;
        }
        tracing::debug!(%peer, member, "connected");
        if let Membership::Joining(code) = &self.membership {
            if code.inviter == peer && self.join_in_flight.is_none() {
                self.send_redeem();
            }
            return;
        }
        if member && self.active() {
            self.on_member_connected(peer);
        } else {
            // Unknown peer let in by an open gate: it gets no gossip, and a few seconds.
            self.probation.insert(peer, Instant::now());
            self.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
            if self.admissions.contains_key(&peer) {
                self.send_admission_offer(peer);
            }
        }
    }

    fn on_member_connected(&mut self, peer: PeerId) {
        tracing::info!(%peer, "member connected");
        // Remember where it is now, so a restart (even after a crash) finds it again.
        let addrs = self
            .peers
            .get(&peer)
            .map(|s| s.addrs.clone())
            .unwrap_or_default();
        if !addrs.is_empty() {
            self.emit(Event::PeerAddrs { peer, addrs });
        }
        self.request_roster_sync(peer);
        let sync = &mut self.swarm.behaviour_mut().sync;
        sync.send_request(&peer, Checked::Valid(SyncRequest::Status));
        sync.send_request(&peer, Checked::Valid(SyncRequest::Addresses));
        let addrs = self
            .peers
            .get(&peer)
            .map(|s| s.addrs.clone())
            .unwrap_or_default();
        for addr in addrs {
            self.swarm.behaviour_mut().kad.add_address(&peer, addr);
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != IDENTIFY_PROTOCOL {
                    tracing::debug!(peer = %peer_id, version = %info.protocol_version, "not a BlendNet peer");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                if self.is_member(&peer_id) {
                    self.learn_addrs(peer_id, info.listen_addrs);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Join(event) => self.on_join_event(event),
            BehaviourEvent::Sync(event) => self.on_sync_event(event),
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => self.on_mdns(found),
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => {
                for (peer, addr) in gone {
                    if let Some(addrs) = self.lan.get_mut(&peer) {
                        addrs.retain(|a| *a != addr);
                        if addrs.is_empty() {
                            self.lan.remove(&peer);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    /// Remembers a member's addresses, telling the daemon when they changed.
    fn learn_addrs(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        if peer == self.local {
            return;
        }
        let state = self.peer_mut(peer);
        if state.add_addrs(addrs) {
            let addrs = state.addrs.clone();
            for addr in &addrs {
                self.swarm
                    .behaviour_mut()
                    .kad
                    .add_address(&peer, addr.clone());
            }
            self.emit(Event::PeerAddrs { peer, addrs });
        }
    }

    fn on_mdns(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        if !self.active() {
            return;
        }
        let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
        for (peer, addr) in found {
            by_peer.entry(peer).or_default().push(addr);
        }
        for (peer, addrs) in by_peer {
            if peer == self.local {
                continue;
            }
            if self.is_member(&peer) {
                self.learn_addrs(peer, addrs);
                self.dial_if_due(peer);
            } else if self.lan.len() < MAX_LAN_PENDING || self.lan.contains_key(&peer) {
                let entry = self.lan.entry(peer).or_default();
                if entry.is_empty() {
                    tracing::info!(%peer, fingerprint = %Fingerprint::of(&peer), "unknown machine on the LAN: `blendnet admit` it to add it to the mesh");
                }
                for addr in addrs {
                    if !entry.contains(&addr) && entry.len() < MAX_ADDRS_PER_PEER {
                        entry.push(addr);
                    }
                }
            }
        }
    }

    // ----- gossip -------------------------------------------------------------------------

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let acceptance = match self.validate_gossip(&message) {
            Ok(()) => MessageAcceptance::Accept,
            Err(Rejection::Unauthorized(reason)) => {
                tracing::warn!(%source, origin = ?message.source, topic = %message.topic, %reason, "gossip dropped");
                MessageAcceptance::Reject
            }
            Err(Rejection::Invalid(reason)) => {
                self.punish(source, &format!("gossip on {}: {reason}", message.topic));
                MessageAcceptance::Reject
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
    }

    fn validate_gossip(&mut self, message: &gossipsub::Message) -> Result<(), Rejection> {
        let topic = Topic::from_topic_str(message.topic.as_str())
            .ok_or_else(|| Rejection::Invalid(format!("unknown topic {}", message.topic)))?;
        let origin = message
            .source
            .ok_or_else(|| Rejection::Invalid("unsigned message".into()))?;
        let roster = self
            .roster()
            .ok_or_else(|| Rejection::Unauthorized("this node is not a member".into()))?;
        roster
            .authorize(&origin, topic, unix_now())
            .map_err(|e| Rejection::Unauthorized(e.to_string()))?;
        match topic {
            Topic::Roster => {
                let delta: RosterDelta = decode(&message.data, MAX_GOSSIP_BYTES)
                    .map_err(|e| Rejection::Invalid(format!("roster delta: {e}")))?;
                self.apply_roster(RosterSnapshot {
                    certificates: delta.certificates,
                    revocations: delta.revocations,
                })
                .map_err(Rejection::Invalid)
            }
            Topic::Status => {
                let status: PeerStatus = decode(&message.data, MAX_GOSSIP_BYTES)
                    .map_err(|e| Rejection::Invalid(format!("status: {e}")))?;
                self.on_status(origin, status);
                Ok(())
            }
            // Opaque to this layer: validated here for membership and role, and by the
            // board, store and render layers for content.
            Topic::Jobs | Topic::Tasks | Topic::Have => {
                let delivery = Delivery {
                    topic,
                    source: origin,
                    data: message.data.clone(),
                };
                if let Err(e) = self.deliveries.try_send(delivery) {
                    // Still forwarded to others; the layer above recovers by anti-entropy.
                    tracing::warn!(%topic, error = %e, "gossip delivery queue full: message dropped here");
                }
                Ok(())
            }
        }
    }

    fn on_status(&mut self, peer: PeerId, status: PeerStatus) {
        if peer == self.local {
            return;
        }
        let addrs: Vec<Multiaddr> = status
            .addrs
            .iter()
            .take(MAX_ADDRS_PER_PEER)
            .filter_map(|a| a.parse().ok())
            .collect();
        self.peer_mut(peer).status = Some(status);
        self.learn_addrs(peer, addrs);
    }

    // ----- request-response ---------------------------------------------------------------

    fn misbehaved(&mut self, peer: PeerId, what: &str, error: &std::io::Error) {
        if error.kind() == std::io::ErrorKind::InvalidData {
            self.punish(peer, &format!("{what} message: {error}"));
        } else {
            tracing::debug!(%peer, %error, "{what} stream failed");
        }
    }

    fn on_join_event(
        &mut self,
        event: request_response::Event<Checked<JoinRequest>, JoinResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Checked::Invalid(reason),
                    ..
                } => self.punish(peer, &format!("join request: {reason}")),
                request_response::Message::Request {
                    request: Checked::Valid(request),
                    channel,
                    ..
                } => {
                    let response = self.on_join_request(peer, request);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .join
                        .send_response(channel, response);
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_join_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if self.join_in_flight == Some(request_id) {
                    self.join_in_flight = None;
                    if matches!(error, request_response::OutboundFailure::ConnectionClosed) {
                        self.join_cut_off += 1;
                    }
                    if self.join_cut_off >= JOIN_CUT_OFF_LIMIT {
                        tracing::error!(inviter = %peer, "the inviter keeps closing the connection unanswered");
                        self.emit(Event::JoinFailed(JoinFailure::CutOff { inviter: peer }));
                    } else {
                        tracing::warn!(inviter = %peer, %error, "redeeming the invite failed; retrying");
                    }
                }
                if self
                    .admissions
                    .get(&peer)
                    .is_some_and(|a| a.request == Some(request_id))
                {
                    self.finish_admission(
                        peer,
                        Err(AdmitError::Unreachable {
                            peer,
                            reason: error.to_string(),
                        }),
                    );
                }
                if let request_response::OutboundFailure::Io(e) = &error {
                    self.misbehaved(peer, "join", e);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "join request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Sends the redemption of the invite being joined with to its inviter.
    fn send_redeem(&mut self) {
        let Membership::Joining(code) = &self.membership else {
            return;
        };
        let inviter = code.inviter;
        let request = JoinRequest::Redeem {
            mesh: code.mesh,
            token: code.token,
            proof: self.join_proof.clone(),
        };
        self.join_retry_at = None;
        self.join_in_flight = Some(
            self.swarm
                .behaviour_mut()
                .join
                .send_request(&inviter, Checked::Valid(request)),
        );
    }

    fn on_join_request(&mut self, peer: PeerId, request: JoinRequest) -> JoinResponse {
        let now = unix_now();
        match request {
            JoinRequest::Redeem { mesh, token, proof } => {
                let was_active = self.active();
                let Membership::Member { roster, mesh_key } = &mut self.membership else {
                    return JoinResponse::Refused(Refusal::NotAnIssuer);
                };
                if roster.mesh() != mesh {
                    return JoinResponse::Refused(Refusal::WrongMesh);
                }
                let Some(key) = mesh_key else {
                    return JoinResponse::Refused(Refusal::NotAnIssuer);
                };
                let verifier = self.verifier.clone();
                let check = |required: &RequiredProof| -> Result<(), Refusal> {
                    let proof = proof.as_ref().ok_or_else(|| {
                        Refusal::IdentityRefused(format!(
                            "this invite is for {} instance {}, and the redemption carries no identity proof",
                            required.cloud,
                            required.instance.as_deref().unwrap_or("?")
                        ))
                    })?;
                    if !proof.within_bounds() {
                        return Err(Refusal::IdentityRefused(format!(
                            "the proof is larger than {MAX_PROOF_PART_BYTES} bytes"
                        )));
                    }
                    let verifier = verifier.ok_or_else(|| {
                        Refusal::IdentityRefused(format!(
                            "the inviter has no trust roots for {} identity proofs",
                            required.cloud
                        ))
                    })?;
                    (verifier.0)(proof, required, &mesh, now).map_err(Refusal::IdentityRefused)
                };
                let roles = match self.invites.redeem(&token, peer, now, check) {
                    Ok(roles) => roles,
                    Err(refusal) => {
                        tracing::warn!(%peer, ?token, %refusal, "invite refused");
                        return JoinResponse::Refused(refusal);
                    }
                };
                let lifetime = self
                    .invites
                    .cert_lifetime(&token)
                    .unwrap_or(MEMBER_CERT_LIFETIME_SECS);
                let certificate =
                    key.certify(peer, roles, now.saturating_add(lifetime), random_u64());
                if let Err(e) = roster.insert_certificate(certificate.clone()) {
                    tracing::error!(error = %e, "own certificate refused");
                }
                let snapshot = roster.snapshot();
                tracing::info!(%peer, %roles, "invite redeemed: new member");
                self.emit(Event::InvitesChanged(self.invites.clone()));
                self.probation.remove(&peer);
                self.publish_roster_delta(RosterDelta {
                    certificates: vec![certificate],
                    revocations: Vec::new(),
                });
                self.on_roster_changed(was_active);
                JoinResponse::Welcome { roster: snapshot }
            }
            JoinRequest::Admit {
                mesh,
                roster: offer,
            } => {
                if !matches!(self.membership, Membership::Pending) {
                    return JoinResponse::Refused(Refusal::AlreadyMember);
                }
                let mut roster = Roster::new(mesh);
                let (_, errors) = roster.apply(offer);
                if !errors.is_empty() || !roster.is_member(&self.local, now) {
                    tracing::warn!(%peer, "admission offer refused: no valid certificate for this peer");
                    return JoinResponse::Refused(Refusal::BadOffer);
                }
                tracing::info!(%peer, mesh = %mesh, "admitted by a LAN member");
                self.adopt(roster);
                JoinResponse::Accepted
            }
        }
    }

    fn on_join_response(
        &mut self,
        peer: PeerId,
        request_id: OutboundRequestId,
        response: JoinResponse,
    ) {
        if self.join_in_flight == Some(request_id) {
            self.join_in_flight = None;
            let Membership::Joining(code) = &self.membership else {
                return;
            };
            let mesh = code.mesh;
            match response {
                JoinResponse::Welcome { roster: snapshot } => {
                    let mut roster = Roster::new(mesh);
                    let (_, errors) = roster.apply(snapshot);
                    if let Some(e) = errors.first() {
                        self.emit(Event::JoinFailed(JoinFailure::BadWelcome(e.to_string())));
                    } else if !roster.is_member(&self.local, unix_now()) {
                        self.emit(Event::JoinFailed(JoinFailure::BadWelcome(
                            "it holds no certificate for this peer".into(),
                        )));
                    } else {
                        self.adopt(roster);
                        // Reconnect as a member, so every protocol starts from a clean slate.
                        let _ = self.swarm.disconnect_peer_id(peer);
                        self.peer_mut(peer).next_dial = Instant::now();
                    }
                }
                JoinResponse::Refused(Refusal::NotReady)
                    if self.join_not_ready < JOIN_NOT_READY_LIMIT =>
                {
                    self.join_not_ready += 1;
                    tracing::info!(inviter = %peer, "the inviter does not know this instance yet; asking again");
                    self.join_retry_at = Some(Instant::now() + JOIN_NOT_READY_RETRY);
                }
                JoinResponse::Refused(reason) => {
                    tracing::error!(inviter = %peer, %reason, "invite refused");
                    self.emit(Event::JoinFailed(JoinFailure::Refused {
                        inviter: peer,
                        reason,
                    }));
                }
                JoinResponse::Accepted => {
                    self.emit(Event::JoinFailed(JoinFailure::BadWelcome(
                        "the inviter answered an admission, not a redemption".into(),
                    )));
                }
            }
            return;
        }
        if self
            .admissions
            .get(&peer)
            .is_some_and(|a| a.request == Some(request_id))
        {
            let result = match response {
                JoinResponse::Accepted => Ok(peer),
                JoinResponse::Refused(reason) => Err(AdmitError::Refused { peer, reason }),
                JoinResponse::Welcome { .. } => Err(AdmitError::Refused {
                    peer,
                    reason: Refusal::BadOffer,
                }),
            };
            self.finish_admission(peer, result);
        }
    }

    fn on_sync_event(
        &mut self,
        event: request_response::Event<Checked<SyncRequest>, SyncResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Checked::Invalid(reason),
                    ..
                } => self.punish(peer, &format!("sync request: {reason}")),
                request_response::Message::Request {
                    request: Checked::Valid(request),
                    channel,
                    ..
                } => self.on_sync_request(peer, request, channel),
                request_response::Message::Response { response, .. } => {
                    self.on_sync_response(peer, response)
                }
            },
            request_response::Event::OutboundFailure { peer, error, .. } => {
                if let request_response::OutboundFailure::Io(e) = &error {
                    self.misbehaved(peer, "sync", e);
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "sync request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_sync_request(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        let response = if !self.active() || !self.is_member(&peer) {
            SyncResponse::NotAMember
        } else {
            match request {
                SyncRequest::Roster { digest } => {
                    let roster = self.roster().map(|r| (r.digest(), r.snapshot()));
                    match roster {
                        Some((mine, _)) if mine == digest => SyncResponse::Roster(None),
                        Some((_, snapshot)) => {
                            // They differ: pull theirs too, so the exchange goes both ways.
                            self.request_roster_sync(peer);
                            SyncResponse::Roster(Some(snapshot))
                        }
                        None => SyncResponse::NotAMember,
                    }
                }
                SyncRequest::Status => SyncResponse::Status(self.status_payload()),
                SyncRequest::Addresses => {
                    let list: Vec<(PeerId, Vec<String>)> = self
                        .peers
                        .iter()
                        .filter(|(p, s)| **p != peer && s.connections > 0 && self.is_member(p))
                        .take(MAX_ADDRESS_ENTRIES)
                        .map(|(p, s)| (*p, s.addrs.iter().map(ToString::to_string).collect()))
                        .collect();
                    SyncResponse::Addresses(list)
                }
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .sync
            .send_response(channel, response);
    }

    fn on_sync_response(&mut self, peer: PeerId, response: SyncResponse) {
        match response {
            SyncResponse::Roster(Some(snapshot)) => {
                if let Err(reason) = self.apply_roster(snapshot) {
                    self.punish(peer, &format!("roster: {reason}"));
                }
            }
            SyncResponse::Roster(None) | SyncResponse::NotAMember => {}
            SyncResponse::Status(status) => self.on_status(peer, status),
            SyncResponse::Addresses(list) => {
                for (member, addrs) in list.into_iter().take(MAX_ADDRESS_ENTRIES) {
                    if member == self.local || !self.is_member(&member) {
                        continue;
                    }
                    let addrs: Vec<Multiaddr> = addrs
                        .iter()
                        .take(MAX_ADDRS_PER_PEER)
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    self.learn_addrs(member, addrs);
                    self.dial_if_due(member);
                }
            }
        }
    }
}
