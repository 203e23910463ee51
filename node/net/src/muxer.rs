//! Yamux (`/yamux/1.0.0`) with data frames sized to fill one Noise message, for bulk streams.
//!
//! `libp2p-yamux` 0.48 fixes yamux's send split at 16 KiB and the yamux connection flushes the
//! socket after every frame, so each 16 KiB of a blob became one Noise message, one TCP write on
//! the sender and several reads and wake-ups on the receiver. This is the same muxer (the
//! `yamux` crate behind `libp2p-yamux`, and `libp2p-yamux`'s `StreamMuxer` glue) with one
//! setting changed: frames of [`SPLIT_SEND_SIZE`], a full Noise message each. The wire protocol
//! is unchanged: the frame size is the sender's choice, and yamux receivers (ours and
//! `libp2p-yamux`'s) take data frames of up to 1 MiB.

use futures::{AsyncRead, AsyncWrite, ready};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Payload of one yamux data frame: Noise's largest plaintext chunk (65535 bytes less the 1024
/// that `libp2p-noise` keeps for the tag and slack) less yamux's 12-byte header, so that one
/// frame is one Noise message. Measured on loopback, 2 cores, 1 GiB: see the commit.
pub const SPLIT_SEND_SIZE: usize = 65535 - 1024 - 12;

/// Inbound streams buffered while the connection is polled for other reasons, as in
/// `libp2p-yamux`: yamux's own ACK backlog, so well-behaved peers never hit it.
const MAX_BUFFERED_INBOUND_STREAMS: usize = 256;

/// The muxer's configuration: yamux's defaults but for the frame size.
#[derive(Debug, Clone)]
pub struct Config(yamux::Config);

impl Default for Config {
    fn default() -> Self {
        let mut config = yamux::Config::default();
        config.set_split_send_size(SPLIT_SEND_SIZE);
        Config(config)
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = std::iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        std::iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        futures::future::ready(Ok(Muxer::new(yamux::Connection::new(
            io,
            self.0,
            yamux::Mode::Server,
        ))))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = futures::future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        futures::future::ready(Ok(Muxer::new(yamux::Connection::new(
            io,
            self.0,
            yamux::Mode::Client,
        ))))
    }
}

/// A yamux connection as a libp2p [`StreamMuxer`].
#[derive(Debug)]
pub struct Muxer<C> {
    connection: yamux::Connection<C>,
    /// Inbound streams that arrived while [`StreamMuxer::poll`] drove the connection.
    inbound: VecDeque<Stream>,
    inbound_waker: Option<Waker>,
}

impl<C: AsyncRead + AsyncWrite + Unpin + 'static> Muxer<C> {
    fn new(connection: yamux::Connection<C>) -> Self {
        Muxer {
            connection,
            inbound: VecDeque::new(),
            inbound_waker: None,
        }
    }

    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<Stream, Error>> {
        let stream = ready!(self.connection.poll_next_inbound(cx))
            .ok_or(Error(yamux::ConnectionError::Closed))?
            .map_err(Error)?;
        Poll::Ready(Ok(Stream(stream)))
    }
}

impl<C: AsyncRead + AsyncWrite + Unpin + 'static> StreamMuxer for Muxer<C> {
    type Substream = Stream;
    type Error = Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        if let Some(stream) = self.inbound.pop_front() {
            return Poll::Ready(Ok(stream));
        }
        if let Poll::Ready(result) = self.poll_inner(cx) {
            return Poll::Ready(result);
        }
        self.inbound_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let stream = ready!(self.connection.poll_new_outbound(cx)).map_err(Error)?;
        Poll::Ready(Ok(Stream(stream)))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connection.poll_close(cx).map_err(Error)
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = self.get_mut();
        let stream = ready!(this.poll_inner(cx))?;
        if this.inbound.len() >= MAX_BUFFERED_INBOUND_STREAMS {
            tracing::warn!(stream = %stream.0, "too many inbound yamux streams: one dropped");
            drop(stream);
        } else {
            this.inbound.push_back(stream);
            if let Some(waker) = this.inbound_waker.take() {
                waker.wake();
            }
        }
        // Let the caller's other work run before the connection is driven again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// One yamux stream.
#[derive(Debug)]
pub struct Stream(yamux::Stream);

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }

    fn poll_read_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_read_vectored(cx, bufs)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}

/// A yamux connection error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct Error(yamux::ConnectionError);

impl From<Error> for io::Error {
    fn from(err: Error) -> Self {
        match err.0 {
            yamux::ConnectionError::Io(e) => e,
            e => io::Error::other(e),
        }
    }
}
