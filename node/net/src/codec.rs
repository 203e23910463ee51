//! The request-response codec: a 4-byte big-endian length, then the bincode message.
//!
//! The length is checked against the protocol's limit before a byte of the body is read, so a
//! peer that announces a huge message costs us nothing. An inbound request that is too large or
//! does not decode is handed up as [`Checked::Invalid`] rather than as an I/O error, because
//! libp2p-request-response does not report failed request reads to the behaviour: this way the
//! actor learns which peer misbehaved and can disconnect it. A bad response is an `InvalidData`
//! error, which request-response does report, with the peer.

use blendnet_proto::frame::{read_frame, write_frame};
use futures::{AsyncRead, AsyncWrite};
use libp2p::StreamProtocol;
use serde::{Serialize, de::DeserializeOwned};
use std::io;
use std::marker::PhantomData;

/// An inbound request as read from a peer: decoded, or the reason it is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked<T> {
    Valid(T),
    Invalid(String),
}

/// A length-prefixed bincode codec for requests `Req` and responses `Resp`.
#[derive(Debug)]
pub struct Codec<Req, Resp> {
    max_request: usize,
    max_response: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> Codec<Req, Resp> {
    /// A codec refusing requests over `max_request` and responses over `max_response` bytes.
    pub fn new(max_request: usize, max_response: usize) -> Self {
        Codec {
            max_request,
            max_response,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for Codec<Req, Resp> {
    fn clone(&self) -> Self {
        Codec::new(self.max_request, self.max_response)
    }
}

impl<Req, Resp> libp2p::request_response::Codec for Codec<Req, Resp>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Resp: Serialize + DeserializeOwned + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Checked<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Checked<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        match read_frame(io, self.max_request).await {
            Ok(req) => Ok(Checked::Valid(req)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => Ok(Checked::Invalid(e.to_string())),
            Err(e) => Err(e),
        }
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.max_response).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Checked<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let Checked::Valid(req) = req else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not sending an invalid request",
            ));
        };
        // Our own requests get the same limit as theirs, so we never send what we would refuse.
        write_frame(io, &req, self.max_request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.max_response).await
    }
}
