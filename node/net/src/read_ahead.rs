//! A read buffer under Noise on TCP connections.
//!
//! `libp2p-noise` reads its transport through `asynchronous-codec`, 8 KiB per read, so each
//! Noise message of a bulk stream (up to 64 KiB) took eight `recv` calls. [`ReadAhead`] reads
//! whatever the socket holds, up to [`READ_AHEAD_BYTES`], in one call and hands it out from
//! memory: a copy of a few KiB is far cheaper than a system call.

use futures::{AsyncRead, AsyncWrite, ready};
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Bytes read from the socket at most at once: one full Noise message, so a bulk stream costs
/// about one `recv` per message. Held per connection (512 at most: 32 MiB).
pub const READ_AHEAD_BYTES: usize = 64 * 1024;

/// A byte stream whose reads are served from a buffer filled [`READ_AHEAD_BYTES`] at a time.
/// Writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: vec![0; READ_AHEAD_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.start == this.end {
            // A read as large as the buffer gains nothing from it.
            if out.len() >= this.buf.len() {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut this.buf))?;
            this.start = 0;
            this.end = n;
        }
        let n = out.len().min(this.end - this.start);
        out[..n].copy_from_slice(&this.buf[this.start..this.start + n]);
        this.start += n;
        Poll::Ready(Ok(n))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_come_out_whole_and_in_order_whatever_their_sizes() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut rx = ReadAhead::new(futures::io::Cursor::new(data.clone()));
        let mut got = Vec::new();
        // Small, odd and larger-than-the-buffer reads.
        for size in [1usize, 7, 8192, 100_000, 3].iter().cycle() {
            let mut chunk = vec![0u8; *size];
            let n = rx.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
        // Writes pass through.
        let mut tx = ReadAhead::new(futures::io::Cursor::new(Vec::new()));
        tx.write_all(b"abc").await.unwrap();
        tx.flush().await.unwrap();
        assert_eq!(tx.inner.into_inner(), b"abc");
    }
}
