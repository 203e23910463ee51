//! The composed libp2p behaviour and the swarm built around it.
//!
//! Gates come first, so a refused connection never reaches the protocols behind them:
//! the admission [`Gate`], connection limits and memory limits; then identify, ping, mDNS,
//! Kademlia (private protocol, server mode, manual routing inserts: only members go in),
//! gossipsub (control plane, signed, every message validated by the actor) and two
//! request-response protocols with bounded bincode codecs (join, sync).

use crate::codec::Codec;
use crate::gate::Gate;
use crate::read_ahead::ReadAhead;
use crate::{BuildError, Transport};
use blendnet_proto::wire::{
    JoinRequest, JoinResponse, MAX_GOSSIP_BYTES, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES,
    SyncRequest, SyncResponse,
};
use blendnet_proto::{IDENTIFY_PROTOCOL, JOIN_PROTOCOL, KAD_PROTOCOL, SYNC_PROTOCOL};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    StreamProtocol, Swarm, SwarmBuilder, connection_limits, gossipsub, identify, identity, kad,
    mdns, memory_connection_limits, noise, ping, request_response, tcp,
};
use std::time::Duration;

/// Most connections we hold: a render farm of a few hundred machines, each connected to each.
const MAX_ESTABLISHED: u32 = 512;
/// Most connections per peer: one per transport is normal, two cover a simultaneous dial.
const MAX_PER_PEER: u32 = 2;
/// Most half-open inbound connections, so a scanner cannot exhaust us with handshakes.
const MAX_PENDING_INBOUND: u32 = 64;
/// Above this share of the machine's memory we accept no new connection: Blender needs it more.
const MAX_MEMORY_FRACTION: f64 = 0.9;
/// Idle connections are kept: the mesh is small and reconnecting costs handshakes.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);
/// Request-response answers are small and local work is quick; a peer slower than this is gone.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent request-response streams per connection: requests are rare control messages.
const MAX_CONCURRENT_STREAMS: usize = 16;
/// Gossipsub heartbeat: one second, as libp2p's default; our first heartbeat comes early so a
/// fresh mesh forms quickly.
const GOSSIP_HEARTBEAT: Duration = Duration::from_secs(1);
const GOSSIP_FIRST_HEARTBEAT: Duration = Duration::from_millis(500);

/// Join: redeem an invite, or offer admission to a pending peer.
pub type JoinBehaviour = request_response::Behaviour<Codec<JoinRequest, JoinResponse>>;
/// Sync: roster anti-entropy, status, addresses.
pub type SyncBehaviour = request_response::Behaviour<Codec<SyncRequest, SyncResponse>>;

/// The node's behaviour.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    pub gate: Gate,
    pub limits: connection_limits::Behaviour,
    pub memory: memory_connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub join: JoinBehaviour,
    pub sync: SyncBehaviour,
    /// Bulk data (blobs): raw streams, driven outside the swarm loop.
    pub streams: libp2p_stream::Behaviour,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour").finish_non_exhaustive()
    }
}

impl Behaviour {
    fn new(key: &identity::Keypair, mdns_on: bool) -> Result<Behaviour, BuildError> {
        let peer = key.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(MAX_ESTABLISHED))
            .with_max_established_per_peer(Some(MAX_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INBOUND));
        let mdns = if mdns_on {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer)
                    .map_err(BuildError::Mdns)?,
            )
        } else {
            None
        };
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_kbucket_inserts(kad::BucketInserts::Manual);
        let mut kad =
            kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config);
        kad.set_mode(Some(kad::Mode::Server));
        let gossip_config = gossipsub::ConfigBuilder::default()
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            .max_transmit_size(MAX_GOSSIP_BYTES)
            .heartbeat_interval(GOSSIP_HEARTBEAT)
            .heartbeat_initial_delay(GOSSIP_FIRST_HEARTBEAT)
            .build()
            .map_err(|e| BuildError::Gossipsub(e.to_string()))?;
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| BuildError::Gossipsub(e.to_string()))?;
        let rr_config = request_response::Config::default()
            .with_request_timeout(REQUEST_TIMEOUT)
            .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS);
        Ok(Behaviour {
            gate: Gate::default(),
            limits: connection_limits::Behaviour::new(limits),
            memory: memory_connection_limits::Behaviour::with_max_percentage(MAX_MEMORY_FRACTION),
            identify: identify::Behaviour::new(identify::Config::new(
                IDENTIFY_PROTOCOL.to_string(),
                key.public(),
            )),
            ping: ping::Behaviour::new(ping::Config::new()),
            mdns: mdns.into(),
            kad,
            gossipsub,
            join: request_response::Behaviour::with_codec(
                Codec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES),
                [(
                    StreamProtocol::new(JOIN_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                rr_config.clone(),
            ),
            sync: request_response::Behaviour::with_codec(
                Codec::new(MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES),
                [(
                    StreamProtocol::new(SYNC_PROTOCOL),
                    request_response::ProtocolSupport::Full,
                )],
                rr_config,
            ),
            streams: libp2p_stream::Behaviour::new(),
        })
    }
}

/// Builds the swarm for `transport`: TCP + Noise + Yamux with QUIC and DNS; TCP alone behind a
/// pre-shared key (pnet does not work over QUIC); or the in-memory transport for tests. TCP is
/// read through a [`ReadAhead`] buffer and Yamux sends full-Noise-message frames
/// ([`crate::muxer`]): bulk blob streams then cost a few system calls per 64 KiB, not per 8.
pub fn build_swarm(
    key: identity::Keypair,
    transport: &Transport,
    mdns_on: bool,
) -> Result<Swarm<Behaviour>, BuildError> {
    let swarm_config =
        |c: libp2p::swarm::Config| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT);
    let behaviour = |key: &identity::Keypair| {
        Behaviour::new(key, mdns_on)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    };
    let swarm = match transport {
        Transport::Network { psk: None } => SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_quic()
            .with_other_transport(|key| {
                use libp2p::Transport as _;
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    tcp::tokio::Transport::new(tcp::Config::default())
                        .map(|socket, _| ReadAhead::new(socket))
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(crate::muxer::Config::default()),
                )
            })
            .map_err(|e| BuildError::Transport(e.to_string()))?
            .with_dns()
            .map_err(|e| BuildError::Transport(e.to_string()))?
            .with_behaviour(behaviour)
            .map_err(|e| BuildError::Transport(e.to_string()))?
            .with_swarm_config(swarm_config)
            .build(),
        Transport::Network { psk: Some(psk) } => {
            let psk = *psk;
            SwarmBuilder::with_existing_identity(key)
                .with_tokio()
                .with_other_transport(move |key| {
                    use libp2p::Transport as _;
                    let noise = noise::Config::new(key)?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                        tcp::tokio::Transport::new(tcp::Config::default())
                            .map(|socket, _| ReadAhead::new(socket))
                            .and_then(move |socket, _| {
                                libp2p::pnet::PnetConfig::new(psk).handshake(socket)
                            })
                            .upgrade(libp2p::core::upgrade::Version::V1)
                            .authenticate(noise)
                            .multiplex(crate::muxer::Config::default()),
                    )
                })
                .map_err(|e| BuildError::Transport(e.to_string()))?
                .with_dns()
                .map_err(|e| BuildError::Transport(e.to_string()))?
                .with_behaviour(behaviour)
                .map_err(|e| BuildError::Transport(e.to_string()))?
                .with_swarm_config(swarm_config)
                .build()
        }
        Transport::Memory => SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|key| {
                use libp2p::Transport as _;
                let noise = noise::Config::new(key)?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                    libp2p::core::transport::MemoryTransport::default()
                        .upgrade(libp2p::core::upgrade::Version::V1)
                        .authenticate(noise)
                        .multiplex(crate::muxer::Config::default()),
                )
            })
            .map_err(|e| BuildError::Transport(e.to_string()))?
            .with_behaviour(behaviour)
            .map_err(|e| BuildError::Transport(e.to_string()))?
            .with_swarm_config(swarm_config)
            .build(),
    };
    Ok(swarm)
}
