//! Length-prefixed frames on a byte stream: a 4-byte big-endian length, then the bincode
//! message. The length is checked against the caller's limit before a byte of the body is read,
//! so a peer announcing a huge message costs nothing; a body that does not decode, or a length
//! over the limit, is an `InvalidData` error (misbehaviour, not a broken link).
//!
//! Generic over `futures` byte streams: this module reads and writes whatever it is given and
//! opens nothing itself.

use crate::{decode, encode};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Serialize, de::DeserializeOwned};
use std::io;

/// Reads one frame of at most `limit` bytes and decodes it.
pub async fn read_frame<R, T>(io: &mut R, limit: usize) -> io::Result<T>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is over the {limit}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    decode(&buf, limit).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Encodes and writes one frame; refuses (`InvalidInput`) to send more than `limit` bytes, so
/// we never send what a peer with the same limit would refuse. The value is encoded before
/// the returned future first runs, so the future holds only the bytes (and is `Send` whatever
/// `T` is).
pub fn write_frame<'a, W, T>(
    io: &'a mut W,
    value: &T,
    limit: usize,
) -> impl std::future::Future<Output = io::Result<()>> + 'a
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(value);
    async move {
        if bytes.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "message of {} bytes is over the {limit}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let len =
            u32::try_from(bytes.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(&bytes).await?;
        io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[test]
    fn frames_round_trip_and_limits_hold_both_ways() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, &(7u32, "hello".to_string()), 64)
                .await
                .unwrap();
            let bytes = buf.into_inner();
            let back: (u32, String) = read_frame(&mut Cursor::new(bytes.clone()), 64)
                .await
                .unwrap();
            assert_eq!(back, (7, "hello".to_string()));
            let err = read_frame::<_, (u32, String)>(&mut Cursor::new(bytes), 4)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            let err = write_frame(&mut Cursor::new(Vec::new()), &vec![0u8; 100], 10)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            // A length prefix claiming more than the limit fails before any body is read.
            let mut huge = (u32::MAX).to_be_bytes().to_vec();
            huge.extend_from_slice(&[0; 8]);
            let err = read_frame::<_, Vec<u8>>(&mut Cursor::new(huge), 1024)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        });
    }
}
