//! Invite codes: what `blendnet invite` prints and `blendnet join` takes.
//!
//! A code carries the mesh id, the inviting peer and its reachable addresses, a single-use
//! token and the expiry, encoded as `BN1` + base32 of `bincode(payload) ‖ blake3(payload)[..4]`.
//! The checksum catches a mistyped or truncated code before anything is stored or dialled.

use crate::{MeshId, PeerId, UnixTime, decode, encode};
use serde::{Deserialize, Serialize};
use std::fmt;

const PREFIX: &str = "BN1";
const CHECKSUM_LEN: usize = 4;
/// Longest code we accept: a code with a few dozen addresses is far shorter; anything longer
/// is not one of ours.
const MAX_CODE_BYTES: usize = 8 * 1024;

/// A single-use secret that an inviter hands out and redeems once.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Token(pub [u8; 16]);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log a whole secret: the first bytes are enough to match log lines.
        write!(f, "Token({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// What an invite code says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InviteCode {
    pub mesh: MeshId,
    pub inviter: PeerId,
    /// Multiaddrs of the inviter, without the `/p2p/` suffix.
    pub addrs: Vec<String>,
    pub token: Token,
    pub expires_at: UnixTime,
}

/// Why a string is not a usable invite code.
#[derive(Debug, thiserror::Error)]
pub enum InviteError {
    #[error("this is not a BlendNet invite code (it should start with {PREFIX})")]
    NotAnInvite,
    #[error("the invite code is garbled: {0}; copy it again, whole")]
    Garbled(&'static str),
    #[error("the invite code expired at {expires_at} (Unix time); ask for a new one")]
    Expired { expires_at: UnixTime },
}

impl InviteCode {
    /// The code as text.
    pub fn encode(&self) -> String {
        let payload = encode(self);
        let mut bytes = payload.clone();
        bytes.extend_from_slice(&blake3::hash(&payload).as_bytes()[..CHECKSUM_LEN]);
        format!("{PREFIX}{}", data_encoding::BASE32_NOPAD.encode(&bytes))
    }

    /// Parses a code, checking its checksum (not its expiry: see [`InviteCode::check_expiry`]).
    pub fn decode(text: &str) -> Result<InviteCode, InviteError> {
        let text = text.trim();
        if text.len() > MAX_CODE_BYTES {
            return Err(InviteError::Garbled("it is far too long"));
        }
        let upper = text.to_uppercase();
        let body = upper.strip_prefix(PREFIX).ok_or(InviteError::NotAnInvite)?;
        let bytes = data_encoding::BASE32_NOPAD
            .decode(body.as_bytes())
            .map_err(|_| InviteError::Garbled("it has characters that do not belong"))?;
        if bytes.len() <= CHECKSUM_LEN {
            return Err(InviteError::Garbled("it is too short"));
        }
        let (payload, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if &blake3::hash(payload).as_bytes()[..CHECKSUM_LEN] != sum {
            return Err(InviteError::Garbled("its checksum does not match"));
        }
        decode(payload, MAX_CODE_BYTES)
            .map_err(|_| InviteError::Garbled("its contents are malformed"))
    }

    /// Fails if the code has expired by `now` on this machine's clock.
    pub fn check_expiry(&self, now: UnixTime) -> Result<(), InviteError> {
        if now > self.expires_at {
            Err(InviteError::Expired {
                expires_at: self.expires_at,
            })
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> InviteCode {
        InviteCode {
            mesh: MeshId([3; 32]),
            inviter: PeerId::random(),
            addrs: vec!["/ip4/127.0.0.1/tcp/7741".into()],
            token: Token([9; 16]),
            expires_at: 1_000,
        }
    }

    #[test]
    fn round_trips_and_ignores_case_and_spaces() {
        let code = sample();
        let text = code.encode();
        assert_eq!(InviteCode::decode(&text).unwrap(), code);
        assert_eq!(
            InviteCode::decode(&format!("  {}\n", text.to_lowercase())).unwrap(),
            code
        );
    }

    #[test]
    fn every_single_character_change_is_caught() {
        let text = sample().encode();
        let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
        for (i, c) in text.char_indices().skip(PREFIX.len()) {
            let other = alphabet.chars().find(|a| *a != c).unwrap();
            let mut garbled = text.clone();
            garbled.replace_range(i..i + 1, &other.to_string());
            let err = InviteCode::decode(&garbled).unwrap_err();
            assert!(
                matches!(err, InviteError::Garbled(_)),
                "position {i}: {err}"
            );
        }
        assert!(matches!(
            InviteCode::decode("hello"),
            Err(InviteError::NotAnInvite)
        ));
        assert!(matches!(
            InviteCode::decode(&text[..text.len() - 3]),
            Err(InviteError::Garbled(_))
        ));
    }

    #[test]
    fn expiry_is_checked() {
        let code = sample();
        code.check_expiry(1_000).unwrap();
        assert!(matches!(
            code.check_expiry(1_001),
            Err(InviteError::Expired { .. })
        ));
    }
}
