//! Streams of the blob protocol (`/blendnet/blob/1`), for the store's transfer code.
//!
//! Bulk bytes never pass through the swarm loop: a [`BlobStreams`] handle opens outbound
//! streams and accepts inbound ones in the caller's own tasks. Only members in good standing
//! get a stream: inbound streams from anyone else (a peer on probation while an invite is open)
//! are dropped here, and we never open one to a non-member.

use blendnet_proto::BLOB_PROTOCOL;
use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use tokio::sync::watch;

/// One blob stream: `futures::AsyncRead + AsyncWrite`.
pub type BlobStream = libp2p::Stream;

/// Opens and accepts blob streams.
#[derive(Clone)]
pub struct BlobStreams {
    control: libp2p_stream::Control,
    members: watch::Receiver<Arc<HashSet<PeerId>>>,
}

impl std::fmt::Debug for BlobStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStreams").finish_non_exhaustive()
    }
}

/// Inbound blob streams from members.
pub struct Incoming {
    streams: libp2p_stream::IncomingStreams,
    members: watch::Receiver<Arc<HashSet<PeerId>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming").finish_non_exhaustive()
    }
}

/// Inbound streams are already being accepted by another handle.
#[derive(Debug, thiserror::Error)]
#[error("blob streams are already being accepted")]
pub struct AlreadyAccepting;

impl BlobStreams {
    pub(crate) fn new(
        control: libp2p_stream::Control,
        members: watch::Receiver<Arc<HashSet<PeerId>>>,
    ) -> Self {
        BlobStreams { control, members }
    }

    /// The members (other than this node) in good standing now.
    pub fn members(&self) -> Arc<HashSet<PeerId>> {
        self.members.borrow().clone()
    }

    /// Opens a blob stream to a member. Cancel-safe.
    pub async fn open(&self, peer: PeerId) -> io::Result<BlobStream> {
        if !self.members.borrow().contains(&peer) {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{peer} is not a member of this mesh"),
            ));
        }
        let mut control = self.control.clone();
        control
            .open_stream(peer, StreamProtocol::new(BLOB_PROTOCOL))
            .await
            .map_err(|e| io::Error::new(io::ErrorKind::ConnectionRefused, e.to_string()))
    }

    /// Starts accepting inbound blob streams; only one [`Incoming`] may exist at a time.
    pub fn incoming(&self) -> Result<Incoming, AlreadyAccepting> {
        let mut control = self.control.clone();
        let streams = control
            .accept(StreamProtocol::new(BLOB_PROTOCOL))
            .map_err(|_| AlreadyAccepting)?;
        Ok(Incoming {
            streams,
            members: self.members.clone(),
        })
    }
}

impl Incoming {
    /// The next stream from a member; `None` when the network has stopped. Cancel-safe.
    pub async fn next(&mut self) -> Option<(PeerId, BlobStream)> {
        loop {
            let (peer, stream) = self.streams.next().await?;
            if self.members.borrow().contains(&peer) {
                return Some((peer, stream));
            }
            tracing::debug!(%peer, "blob stream from a non-member dropped");
        }
    }
}
