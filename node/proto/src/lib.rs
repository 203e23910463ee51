//! BlendNet's wire vocabulary: identities, member certificates, invite codes, gossip topics,
//! request-response messages and their encoding. No I/O happens here.
//!
//! Everything that crosses the network is encoded with bincode 2 (serde mode) and decoded
//! with [`decode`], which refuses inputs over a per-message byte limit and trailing bytes,
//! so a peer can never make us allocate more than the limit for one message.
//!
//! ```text
//!  mesh key (ed25519) ──signs──▶ Certificate{mesh, peer, roles, not_after, serial}
//!                    └─signs──▶ Revocation{mesh, peer, serial}
//!  roster = certificates ∪ revocations (a CRDT, see blendnet-core)
//!
//!  node key ──signs──▶ SignedEvent{author, EventBody} on blendnet/v1/jobs and /tasks (see job)
//! ```

pub mod board;
pub mod cert;
pub mod frame;
pub mod id;
pub mod invite;
pub mod job;
pub mod wire;

pub use cert::{Certificate, MeshKey, Revocation, Role, Roles, RosterSnapshot};
pub use id::{BlobHash, Fingerprint, MeshId};
pub use invite::{InviteCode, InviteError, Token};
pub use job::{
    Engine, EventBody, EventId, JobId, JobSpec, Lease, SignedEvent, Split, TaskKind, TaskSpec,
    TaskStats, VerifiedEvent, WorkRequest, WorkResponse,
};
pub use libp2p_identity::PeerId;

use serde::{Serialize, de::DeserializeOwned};

/// Request-response protocol for redeeming an invite and for admitting a pending peer.
pub const JOIN_PROTOCOL: &str = "/blendnet/join/1";
/// Request-response protocol for anti-entropy (roster digest, then the roster) and status.
pub const SYNC_PROTOCOL: &str = "/blendnet/sync/1";
/// Stream protocol for blobs: "what do you hold of this blob?" and "send me these ranges".
pub const BLOB_PROTOCOL: &str = "/blendnet/blob/1";
/// Request-response protocol between a worker and a job's coordinator: asking for work,
/// renewing and handing back leases (see [`job::WorkRequest`]).
pub const WORK_PROTOCOL: &str = "/blendnet/work/1";
/// Kademlia protocol name: private, so our DHT never mixes with the public IPFS one.
pub const KAD_PROTOCOL: &str = "/blendnet/kad/1";
/// Identify protocol version string: peers that announce another one are not BlendNet peers.
pub const IDENTIFY_PROTOCOL: &str = "/blendnet/id/1";

/// The fixed, versioned set of gossip topics (DESIGN §4). Never one topic per job.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize,
)]
pub enum Topic {
    /// Certificates and revocations.
    Roster,
    /// Job submissions and job-level changes.
    Jobs,
    /// Task state events.
    Tasks,
    /// Which blobs a peer holds.
    Have,
    /// Periodic peer status: addresses and capabilities.
    Status,
}

impl Topic {
    /// Every topic, in a fixed order.
    pub const ALL: [Topic; 5] = [
        Topic::Roster,
        Topic::Jobs,
        Topic::Tasks,
        Topic::Have,
        Topic::Status,
    ];

    /// The gossipsub topic string.
    pub fn as_str(self) -> &'static str {
        match self {
            Topic::Roster => "blendnet/v1/roster",
            Topic::Jobs => "blendnet/v1/jobs",
            Topic::Tasks => "blendnet/v1/tasks",
            Topic::Have => "blendnet/v1/have",
            Topic::Status => "blendnet/v1/status",
        }
    }

    /// The topic with this gossipsub string, if it is one of ours.
    pub fn from_topic_str(s: &str) -> Option<Topic> {
        Topic::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// The roles of which a publisher needs at least one, beyond being a member.
    /// Only `submit` peers submit jobs: a `.blend` can carry Python.
    pub fn required_roles(self) -> Roles {
        match self {
            Topic::Jobs => Roles::from(Role::Submit),
            Topic::Tasks => Roles::from(Role::Coordinate) | Roles::from(Role::Render),
            Topic::Roster | Topic::Have | Topic::Status => Roles::EMPTY,
        }
    }
}

impl std::fmt::Display for Topic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why bytes could not be decoded into a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message of {len} bytes is over the {limit}-byte limit")]
    TooLarge { len: usize, limit: usize },
    #[error("message is malformed: {0}")]
    Malformed(#[from] bincode::error::DecodeError),
    #[error("message has {0} trailing bytes")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a message for the wire.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec only fails for types serde cannot represent, which ours never are.
    bincode::serde::encode_to_vec(value, config()).expect("wire types are always encodable")
}

/// Decodes a message from untrusted bytes, refusing more than `limit` bytes.
///
/// The length check comes first, so no allocation can exceed the input, which is bounded.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    // bincode's own limit is a const generic; the input length bound above already caps
    // what a decode can claim, since every length prefix must be backed by input bytes.
    let cfg = config().with_limit::<{ 64 * 1024 * 1024 }>();
    let (value, used) = bincode::serde::decode_from_slice(bytes, cfg)?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Seconds since the Unix epoch as used on the wire (certificate expiry, last seen).
pub type UnixTime = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_refuses_oversize_and_trailing_bytes() {
        let bytes = encode(&(1u32, String::from("hello")));
        assert!(matches!(
            decode::<(u32, String)>(&bytes, 3),
            Err(DecodeError::TooLarge { .. })
        ));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            decode::<(u32, String)>(&longer, 1024),
            Err(DecodeError::Trailing(1))
        ));
        let back: (u32, String) = decode(&bytes, 1024).unwrap();
        assert_eq!(back, (1, "hello".to_string()));
    }

    #[test]
    fn decode_refuses_a_length_prefix_larger_than_the_input() {
        // A Vec<u8> claiming 2^40 elements in a 10-byte message must fail, not allocate.
        let mut bytes = vec![253u8];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode::<Vec<u8>>(&bytes, 1024).is_err());
    }

    #[test]
    fn topics_round_trip_and_jobs_need_submit() {
        for t in Topic::ALL {
            assert_eq!(Topic::from_topic_str(t.as_str()), Some(t));
        }
        assert!(Topic::Jobs.required_roles().contains(Role::Submit));
        assert!(!Topic::Jobs.required_roles().contains(Role::Render));
        assert!(Topic::Status.required_roles().is_empty());
    }
}
