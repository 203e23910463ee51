//! BlendNet's network layer: the only crate that imports libp2p.
//!
//! One actor, [`NetActor`], owns the libp2p `Swarm` and the node's view of the mesh: the
//! roster (who may connect, with which roles), the invites this node handed out, and what it
//! knows of each peer (addresses, status, whether connected). Everything else talks to it
//! through the cloneable handle [`Net`]; it reports what must be persisted as [`Event`]s.
//!
//! ```text
//!   Net (handle) ──NetMessage──▶ NetActor ──Event──▶ daemon (persists roster, invites, addresses)
//!                                  │ select! { shutdown, command, tick, swarm event }
//!                                  ▼
//!                      Swarm<Behaviour>: gate · limits · identify · ping · mDNS · Kademlia
//!                                        · gossipsub · join (req/resp) · sync (req/resp)
//! ```
//!
//! Wire: gossip payloads and request-response messages are the bincode types of
//! `blendnet-proto`; requests and responses are length-prefixed and bounded (see [`codec`]).

mod actor;
pub mod behaviour;
pub mod codec;
pub mod gate;
pub mod muxer;
pub mod read_ahead;
pub mod streams;
#[cfg(test)]
mod swarm_tests;

pub use actor::NetActor;
pub use libp2p::pnet::PreSharedKey;
pub use libp2p::{Multiaddr, PeerId, identity};
pub use streams::{AlreadyAccepting, Incoming, Stream, Streams};

use blendnet_core::{Invites, Roster};
use blendnet_proto::wire::{Activity, Capabilities, IdentityProof, Refusal, RequiredProof};
use blendnet_proto::{Fingerprint, InviteCode, MeshId, MeshKey, Roles, RosterSnapshot, Topic};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Gossip deliveries waiting for the layers above: a burst of task events fits; past this the
/// local copy is dropped (it is still forwarded) and anti-entropy recovers it.
const DELIVERY_QUEUE: usize = 1024;
/// Commands waiting for the actor: enough for bursts of API calls; callers wait when full.
const COMMAND_QUEUE: usize = 64;

/// Which transport the swarm uses.
#[derive(Clone)]
pub enum Transport {
    /// TCP and QUIC, with DNS. With a pre-shared key, TCP only (pnet does not work on QUIC).
    Network {
        psk: Option<libp2p::pnet::PreSharedKey>,
    },
    /// The in-memory transport (`/memory/N` addresses), for in-process tests.
    Memory,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never print the key itself.
            Transport::Network { psk } => write!(f, "Network {{ psk: {} }}", psk.is_some()),
            Transport::Memory => f.write_str("Memory"),
        }
    }
}

/// Where this node stands with respect to a mesh.
#[derive(Debug, Clone)]
pub enum Membership {
    /// In no mesh: announced on the LAN, waiting for `blendnet admit` on a member.
    Pending,
    /// Redeeming an invite code with its inviter.
    Joining(InviteCode),
    /// A member (or a revoked ex-member) of the roster's mesh; `mesh_key` on the machine that
    /// ran `init`, which alone can sign certificates and revocations.
    Member {
        roster: Roster,
        mesh_key: Option<MeshKey>,
    },
}

/// Everything the actor needs to start.
#[derive(Debug)]
pub struct Config {
    pub keypair: identity::Keypair,
    pub transport: Transport,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub membership: Membership,
    pub invites: Invites,
    /// Addresses remembered from earlier runs, so a restarted node finds its peers again.
    pub known_addrs: Vec<(PeerId, Vec<Multiaddr>)>,
    pub capabilities: Capabilities,
    /// While joining: the cloud's proof of which instance this is, sent with the redemption.
    pub join_proof: Option<IdentityProof>,
    /// How this node, as an inviter, checks the proof an invite made for a cloud instance
    /// demands. Without one, such invites are refused (no trust roots to check against).
    pub verifier: Option<IdentityVerifier>,
}

/// Checks an instance's identity proof against what its invite demands, for the mesh whose
/// id is the expected audience, at Unix time `now`; the error says what is wrong. Pure (no
/// I/O): the actor calls it on its loop.
#[derive(Clone)]
pub struct IdentityVerifier(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<
        dyn Fn(&IdentityProof, &RequiredProof, &MeshId, u64) -> Result<(), String> + Send + Sync,
    >,
);

impl std::fmt::Debug for IdentityVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdentityVerifier")
    }
}

/// Why the swarm could not be built or started.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    #[error("cannot start mDNS: {0}")]
    Mdns(#[source] std::io::Error),
    #[error("cannot set up gossipsub: {0}")]
    Gossipsub(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error(
        "no address to listen on is usable with this transport (QUIC is off with a pre-shared key)"
    )]
    NoListenAddress,
}

/// What the daemon must know of: mostly state to persist. These are rare (membership and
/// roster changes, invites, addresses of members), so the channel is unbounded.
#[derive(Debug, Clone)]
pub enum Event {
    /// This node became a member of `mesh` (by invite or admission).
    Joined {
        mesh: MeshId,
        roster: RosterSnapshot,
    },
    /// The roster changed (new certificates or revocations).
    RosterChanged {
        mesh: MeshId,
        roster: RosterSnapshot,
    },
    /// The invites changed (one issued or redeemed).
    InvitesChanged(Invites),
    /// Addresses of a member, to remember across restarts.
    PeerAddrs { peer: PeerId, addrs: Vec<Multiaddr> },
    /// Redeeming the invite failed for good.
    JoinFailed(JoinFailure),
    /// This node's own membership was revoked.
    Revoked,
}

/// Why redeeming an invite failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinFailure {
    #[error("the inviter {inviter} refused: {reason}")]
    Refused { inviter: PeerId, reason: Refusal },
    #[error("the inviter's answer is not valid: {0}")]
    BadWelcome(String),
    /// The inviter lets the connection in and closes it without answering, again and again:
    /// its gate is shut because it has no open invite (this one was used, withdrawn, or
    /// expired).
    #[error(
        "the inviter {inviter} closes the connection without answering: it takes no new          members now (this invite has already been used, or every invite it made has expired)"
    )]
    CutOff { inviter: PeerId },
}

/// A validated gossip message on a topic whose content belongs to the layers above
/// (`jobs`, `tasks`, `have`): its origin is a member with the role the topic needs.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub topic: Topic,
    /// The member that signed and published it.
    pub source: PeerId,
    pub data: Vec<u8>,
}

/// What [`spawn`] hands back: the handle, the event streams and the actor's task.
#[derive(Debug)]
pub struct Spawned {
    pub net: Net,
    /// Streams of the blob and board protocols, opened and accepted outside the swarm loop.
    pub streams: Streams,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub deliveries: mpsc::Receiver<Delivery>,
    pub task: tokio::task::JoinHandle<()>,
}

/// This node as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub peer_id: String,
    pub fingerprint: String,
    pub mesh_id: Option<String>,
    pub member: bool,
    /// `pending`, `joining`, `member` or `revoked`.
    pub state: String,
    pub roles: Vec<String>,
    /// Listen addresses with `/p2p/<peer id>`, usable as `--bootstrap`.
    pub listen_addrs: Vec<String>,
    /// Members other than this node with a live connection.
    pub peer_count: usize,
    pub version: String,
}

/// A member as `peers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerView {
    pub peer_id: String,
    pub fingerprint: String,
    pub is_self: bool,
    pub online: bool,
    pub roles: Vec<String>,
    pub addrs: Vec<String>,
    /// Unix seconds when a connection was last seen (now, if online).
    pub last_seen: Option<u64>,
    pub blender: Option<String>,
    pub capabilities: Option<Capabilities>,
    /// What the peer renders now, as its last status said.
    pub rendering: Option<Activity>,
}

/// An unknown daemon announced on the LAN, waiting to be admitted.
#[derive(Debug, Clone, Serialize)]
pub struct PendingView {
    pub peer_id: String,
    pub fingerprint: String,
    pub addrs: Vec<String>,
}

/// Why an invite could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    #[error("this node is not a member of a mesh yet")]
    NotAMember,
    #[error(
        "this node does not hold the mesh key: run `blendnet invite` on the machine that ran `blendnet init`"
    )]
    NotAnIssuer,
    #[error("this node is not listening on any address yet")]
    NotListening,
    #[error("an invite needs at least one role")]
    NoRoles,
}

/// Why an invite could not be bound to an instance.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("no unused invite has this token (expired and forgotten, or already redeemed)")]
    UnknownToken,
}

/// Why admitting a LAN peer failed.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    #[error("this node is not a member of a mesh yet")]
    NotAMember,
    #[error(
        "this node does not hold the mesh key: run `blendnet admit` on the machine that ran `blendnet init`"
    )]
    NotAnIssuer,
    #[error(
        "no pending machine with fingerprint {0} is announced on the LAN (see `blendnet peers --pending`)"
    )]
    NoSuchPeer(Fingerprint),
    #[error("{peer} refused the admission: {reason}")]
    Refused { peer: PeerId, reason: Refusal },
    #[error("could not reach {peer}: {reason}")]
    Unreachable { peer: PeerId, reason: String },
}

/// Why revoking failed.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("this node is not a member of a mesh yet")]
    NotAMember,
    #[error(
        "this node does not hold the mesh key: run `blendnet revoke` on the machine that ran `blendnet init`"
    )]
    NotAnIssuer,
    #[error("{0} is this node itself")]
    IsSelf(PeerId),
    #[error("{0} is not a member of this mesh")]
    NotFound(PeerId),
}

/// Why a certificate could not be renewed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("this node is not a member of a mesh yet")]
    NotAMember,
    #[error("this node does not hold the mesh key, so it cannot certify members")]
    NotAnIssuer,
    #[error("{0} is not a member of this mesh (never was, expired, or revoked)")]
    NotFound(PeerId),
}

/// Why a gossip message could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("this node is not a member of a mesh")]
    NotAMember,
    #[error("message of {0} bytes is over the gossip limit")]
    TooLarge(usize),
    #[error("gossip refused the message: {0}")]
    Gossip(String),
}

/// The actor is gone (the daemon is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the network actor has stopped")]
pub struct Stopped;

/// Commands to the actor. Each carries a `oneshot` for its answer.
#[derive(Debug)]
pub enum NetMessage {
    Status(oneshot::Sender<NodeStatus>),
    Peers(oneshot::Sender<Vec<PeerView>>),
    Pending(oneshot::Sender<Vec<PendingView>>),
    Invite {
        ttl: Duration,
        roles: Roles,
        cert_lifetime: Option<Duration>,
        proof: Option<RequiredProof>,
        reply: oneshot::Sender<Result<InviteCode, InviteError>>,
    },
    BindInvite {
        token: blendnet_proto::Token,
        proof: RequiredProof,
        reply: oneshot::Sender<Result<(), BindError>>,
    },
    Renew {
        peer: PeerId,
        lifetime: Duration,
        reply: oneshot::Sender<Result<(), RenewError>>,
    },
    Admit {
        fingerprint: Fingerprint,
        reply: oneshot::Sender<Result<PeerId, AdmitError>>,
    },
    Revoke {
        peer: PeerId,
        reply: oneshot::Sender<Result<(), RevokeError>>,
    },
    Publish {
        topic: Topic,
        data: Vec<u8>,
        reply: oneshot::Sender<Result<(), PublishError>>,
    },
    SetCapabilities(Capabilities),
    /// What this node renders now; gossiped with its status within a second or so.
    SetRendering(Option<Activity>),
    /// Tests stand in for mDNS, which the memory transport cannot carry.
    #[cfg(test)]
    Discovered(Vec<(PeerId, Multiaddr)>),
}

/// The cloneable handle to the network actor. Every method is cancel-safe: dropping the future
/// drops the reply, and the actor carries on.
#[derive(Debug, Clone)]
pub struct Net {
    tx: mpsc::Sender<NetMessage>,
}

impl Net {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> NetMessage,
    ) -> Result<T, Stopped> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| Stopped)?;
        rx.await.map_err(|_| Stopped)
    }

    /// This node's status.
    pub async fn status(&self) -> Result<NodeStatus, Stopped> {
        self.ask(NetMessage::Status).await
    }

    /// The members, this node included.
    pub async fn peers(&self) -> Result<Vec<PeerView>, Stopped> {
        self.ask(NetMessage::Peers).await
    }

    /// Unknown daemons announced on the LAN.
    pub async fn pending(&self) -> Result<Vec<PendingView>, Stopped> {
        self.ask(NetMessage::Pending).await
    }

    /// Makes a single-use invite valid for `ttl`. Its redeemer's certificate lasts
    /// `cert_lifetime` (a member's usual ten years when `None`); with `proof`, the redeemer
    /// must prove it is that cloud instance (see [`RequiredProof`]; an instance not yet
    /// known is named later with [`Net::bind_invite`]).
    pub async fn invite(
        &self,
        ttl: Duration,
        roles: Roles,
        cert_lifetime: Option<Duration>,
        proof: Option<RequiredProof>,
    ) -> Result<Result<InviteCode, InviteError>, Stopped> {
        self.ask(|reply| NetMessage::Invite {
            ttl,
            roles,
            cert_lifetime,
            proof,
            reply,
        })
        .await
    }

    /// Makes the unused invite with `token` demand `proof`: how a provisioner names the
    /// instance an invite was made for, once its launch call has returned the id.
    pub async fn bind_invite(
        &self,
        token: blendnet_proto::Token,
        proof: RequiredProof,
    ) -> Result<Result<(), BindError>, Stopped> {
        self.ask(|reply| NetMessage::BindInvite {
            token,
            proof,
            reply,
        })
        .await
    }

    /// Certifies a member again with its current roles, for `lifetime` from now: how a
    /// provisioner keeps the short-lived certificates of its live instances current.
    pub async fn renew(
        &self,
        peer: PeerId,
        lifetime: Duration,
    ) -> Result<Result<(), RenewError>, Stopped> {
        self.ask(|reply| NetMessage::Renew {
            peer,
            lifetime,
            reply,
        })
        .await
    }

    /// Admits the pending LAN machine with this fingerprint; answers once it has accepted.
    pub async fn admit(
        &self,
        fingerprint: Fingerprint,
    ) -> Result<Result<PeerId, AdmitError>, Stopped> {
        self.ask(|reply| NetMessage::Admit { fingerprint, reply })
            .await
    }

    /// Revokes a member everywhere.
    pub async fn revoke(&self, peer: PeerId) -> Result<Result<(), RevokeError>, Stopped> {
        self.ask(|reply| NetMessage::Revoke { peer, reply }).await
    }

    /// Publishes bytes on a gossip topic.
    pub async fn publish(
        &self,
        topic: Topic,
        data: Vec<u8>,
    ) -> Result<Result<(), PublishError>, Stopped> {
        self.ask(|reply| NetMessage::Publish { topic, data, reply })
            .await
    }

    /// Says what this node renders now (or that it renders nothing).
    pub async fn set_rendering(&self, rendering: Option<Activity>) -> Result<(), Stopped> {
        self.tx
            .send(NetMessage::SetRendering(rendering))
            .await
            .map_err(|_| Stopped)
    }

    /// Replaces the capabilities this node advertises.
    pub async fn set_capabilities(&self, capabilities: Capabilities) -> Result<(), Stopped> {
        self.tx
            .send(NetMessage::SetCapabilities(capabilities))
            .await
            .map_err(|_| Stopped)
    }
}

/// Builds the swarm, starts listening, and spawns the actor on the current tokio runtime.
/// The actor stops when `shutdown` completes or every [`Net`] handle is dropped.
pub fn spawn(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Spawned, BuildError> {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (events_tx, events) = mpsc::unbounded_channel();
    let (deliveries_tx, deliveries) = mpsc::channel(DELIVERY_QUEUE);
    let (members_tx, members) = tokio::sync::watch::channel(Default::default());
    let actor = NetActor::new(config, rx, events_tx, deliveries_tx, members_tx)?;
    let streams = Streams::new(actor.stream_control(), members);
    let task = tokio::spawn(actor.run(shutdown));
    Ok(Spawned {
        net: Net { tx },
        streams,
        events,
        deliveries,
        task,
    })
}

/// The current Unix time in seconds: the shell reads the clock; the core is given it.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
