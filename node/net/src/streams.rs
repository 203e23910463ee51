//! Streams of our stream protocols: blobs (`/blendnet/blob/1`, for the store's transfer code)
//! and the job board's work requests and anti-entropy.
//!
//! Those bytes never pass through the swarm loop: a [`Streams`] handle opens outbound
//! streams and accepts inbound ones in the caller's own tasks. Only members in good standing
//! get a stream: inbound streams from anyone else (a peer on probation while an invite is open)
//! are dropped here, and we never open one to a non-member.
//!
//! libp2p-stream keeps one pending inbound stream per protocol and drops the rest, so an
//! acceptor must hand streams off at once, and an opener must retry a stream that fails.

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use tokio::sync::watch;

/// One stream: `futures::AsyncRead + AsyncWrite`.
pub type Stream = libp2p::Stream;

/// Opens and accepts streams of our protocols.
#[derive(Clone)]
pub struct Streams {
    control: libp2p_stream::Control,
    members: watch::Receiver<Arc<HashSet<PeerId>>>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams").finish_non_exhaustive()
    }
}

/// Inbound streams of one protocol from members.
pub struct Incoming {
    protocol: &'static str,
    streams: libp2p_stream::IncomingStreams,
    members: watch::Receiver<Arc<HashSet<PeerId>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

/// Inbound streams of this protocol are already being accepted by another handle.
#[derive(Debug, thiserror::Error)]
#[error("{0} streams are already being accepted")]
pub struct AlreadyAccepting(pub &'static str);

impl Streams {
    pub(crate) fn new(
        control: libp2p_stream::Control,
        members: watch::Receiver<Arc<HashSet<PeerId>>>,
    ) -> Self {
        Streams { control, members }
    }

    /// The members (other than this node) in good standing now.
    pub fn members(&self) -> Arc<HashSet<PeerId>> {
        self.members.borrow().clone()
    }

    /// Opens a stream of `protocol` to a member. Cancel-safe.
    pub async fn open(&self, peer: PeerId, protocol: &'static str) -> io::Result<Stream> {
        if !self.members.borrow().contains(&peer) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{peer} is not a member of this mesh"),
            ));
        }
        let mut control = self.control.clone();
        control
            .open_stream(peer, StreamProtocol::new(protocol))
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))
    }

    /// Starts accepting inbound streams of `protocol`; only one [`Incoming`] per protocol may
    /// exist at a time.
    pub fn incoming(&self, protocol: &'static str) -> Result<Incoming, AlreadyAccepting> {
        let mut control = self.control.clone();
        let streams = control
            .accept(StreamProtocol::new(protocol))
            .map_err(|_| AlreadyAccepting(protocol))?;
        Ok(Incoming {
            protocol,
            streams,
            members: self.members.clone(),
        })
    }
}

impl Incoming {
    /// The next stream from a member; `None` when the network has stopped. Cancel-safe.
    pub async fn next(&mut self) -> Option<(PeerId, Stream)> {
        loop {
            let (peer, stream) = self.streams.next().await?;
            if self.members.borrow().contains(&peer) {
                return Some((peer, stream));
            }
            tracing::debug!(%peer, protocol = self.protocol, "stream from a non-member dropped");
        }
    }
}
