//! The admission gate: a behaviour that refuses, right after the Noise handshake, every
//! connection from or to a peer that is not allowed.
//!
//! The actor keeps its policy up to date from the roster: members are allowed; while this node
//! is not yet in a mesh, or holds an open invite, unknown peers are let in on probation (the
//! actor closes them if they do not become members in time); revoked peers never are.

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashSet;
use std::convert::Infallible;
use std::task::{Context, Poll};

/// Why the gate refused a connection.
#[derive(Debug, thiserror::Error)]
#[error("{peer} is not a member of this mesh")]
pub struct NotAllowed {
    peer: PeerId,
}

/// The gate and its policy.
#[derive(Debug, Default)]
pub struct Gate {
    allowed: HashSet<PeerId>,
    denied: HashSet<PeerId>,
    open: bool,
}

impl Gate {
    /// Replaces the policy: `allowed` always get in, `denied` never, and anyone else only
    /// while `open`.
    pub fn set_policy(&mut self, allowed: HashSet<PeerId>, denied: HashSet<PeerId>, open: bool) {
        self.allowed = allowed;
        self.denied = denied;
        self.open = open;
    }

    /// Whether a connection with `peer` may be established now.
    pub fn admits(&self, peer: &PeerId) -> bool {
        !self.denied.contains(peer) && (self.open || self.allowed.contains(peer))
    }

    fn enforce(&self, peer: PeerId) -> Result<(), ConnectionDenied> {
        if self.admits(&peer) {
            Ok(())
        } else {
            Err(ConnectionDenied::new(NotAllowed { peer }))
        }
    }
}

impl NetworkBehaviour for Gate {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.enforce(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        peer: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.enforce(peer)?;
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, _: FromSwarm) {}

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
