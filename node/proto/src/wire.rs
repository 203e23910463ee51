//! Messages peers exchange: gossip payloads and request-response pairs, with their limits.

use crate::{Certificate, MeshId, Revocation, RosterSnapshot, Token, UnixTime};
use serde::{Deserialize, Serialize};

/// Largest gossip message: gossipsub's own default transmit size, so nothing we publish is
/// refused by a peer running defaults.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;
/// Largest request: requests are small (a token, a digest, an admission offer with a roster).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Largest response: a whole roster of a few thousand members fits with room to spare.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// Most members listed in one [`SyncResponse::Addresses`], and most addresses per member:
/// enough for any farm we aim at, small enough to keep the answer far under its limit.
pub const MAX_ADDRESS_ENTRIES: usize = 1024;
/// Most addresses kept or sent per peer: a machine has a handful of interfaces and transports.
pub const MAX_ADDRS_PER_PEER: usize = 16;

/// A device Cycles can render with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeDevice {
    /// `CPU`, `CUDA`, `OPTIX`, `HIP`, `METAL` or `ONEAPI`, as Cycles names them.
    pub kind: String,
    /// As the driver names it (`NVIDIA H100 80GB HBM3`).
    pub name: String,
}

/// What a peer can do, as it advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    pub daemon_version: String,
    pub cores: u32,
    pub ram_bytes: u64,
    pub free_disk_bytes: u64,
    /// GPU names, best effort.
    pub gpus: Vec<String>,
    /// Blender's version (`3.4.1`) if the peer found one.
    pub blender: Option<String>,
    /// The devices that Blender's Cycles can render with (the CPU first).
    pub devices: Vec<ComputeDevice>,
    /// Blender has OpenImageDenoise, so this peer can denoise a merged frame.
    pub denoiser: bool,
    /// Whether the peer takes render tasks (`--no-render` turns it off).
    pub render: bool,
    /// What an hour of this peer costs, in millionths of a US dollar (an integer, so the
    /// struct stays `Eq`): its `price_per_hour` setting, which a cloud instance gets from its
    /// launch price. `None`: unknown (a desktop nobody priced).
    pub price_per_hour_micros: Option<u64>,
}

/// A peer's periodic status on the `status` topic and in answer to [`SyncRequest::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Multiaddrs the peer listens on, without `/p2p/`.
    pub addrs: Vec<String>,
    pub capabilities: Capabilities,
    /// What the peer renders now, if anything.
    pub rendering: Option<Activity>,
    /// The sender's clock when it was sent.
    pub sent_at: UnixTime,
}

/// The task a peer renders now and how far it got, for the peers and jobs views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    pub job: crate::JobId,
    pub task: crate::TaskSpec,
    /// Frames of the task written so far.
    pub frames_done: u32,
    /// Samples done in the frame being rendered (Cycles' count; 0 when unknown).
    pub samples_done: u32,
}

/// New roster entries, gossiped on the `roster` topic; each one is verified on receipt.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RosterDelta {
    pub certificates: Vec<Certificate>,
    pub revocations: Vec<Revocation>,
}

/// Redeeming an invite (joiner → inviter) or offering admission (member → pending peer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinRequest {
    /// "I hold this token": answered with [`JoinResponse::Welcome`] or a refusal. A cloud
    /// instance adds its cloud's signed statement of which instance it is, which an invite
    /// made for an instance requires (DESIGN §9).
    Redeem {
        mesh: MeshId,
        token: Token,
        proof: Option<IdentityProof>,
    },
    /// "You are admitted": the pending peer adopts the mesh if the certificate is its own.
    Admit {
        mesh: MeshId,
        roster: RosterSnapshot,
    },
}

/// Most bytes of each part of an [`IdentityProof`]: an AWS identity document is under 1 KiB,
/// its signature 172 characters, a GCP identity token (`format=full`) under 2 KiB; the bound
/// keeps a stranger's redemption small, as it is checked before the stranger is a member.
pub const MAX_PROOF_PART_BYTES: usize = 8 * 1024;

/// A cloud's signed statement of which instance the sender runs on, fetched from the
/// instance's metadata server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentityProof {
    /// IMDS `/latest/dynamic/instance-identity/document` and `.../signature` (base64
    /// RSA-SHA256 over the document's bytes).
    Aws { document: String, signature: String },
    /// The JWT from `/computeMetadata/v1/instance/service-accounts/default/identity`
    /// (`format=full`, RS256), with the mesh id as its audience.
    Gcp { token: String },
}

impl std::fmt::Debug for IdentityProof {
    // The proof is a bearer credential for its audience: logs show only its kind and size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityProof::Aws { document, .. } => {
                write!(f, "Aws {{ document: {} bytes }}", document.len())
            }
            IdentityProof::Gcp { token } => write!(f, "Gcp {{ token: {} bytes }}", token.len()),
        }
    }
}

impl IdentityProof {
    /// The cloud that signed it.
    pub fn cloud(&self) -> IdentityCloud {
        match self {
            IdentityProof::Aws { .. } => IdentityCloud::Aws,
            IdentityProof::Gcp { .. } => IdentityCloud::Gcp,
        }
    }

    /// Whether every part is within [`MAX_PROOF_PART_BYTES`].
    pub fn within_bounds(&self) -> bool {
        match self {
            IdentityProof::Aws {
                document,
                signature,
            } => document.len() <= MAX_PROOF_PART_BYTES && signature.len() <= MAX_PROOF_PART_BYTES,
            IdentityProof::Gcp { token } => token.len() <= MAX_PROOF_PART_BYTES,
        }
    }
}

/// A cloud whose instances can prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityCloud {
    Aws,
    Gcp,
}

impl std::fmt::Display for IdentityCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IdentityCloud::Aws => "aws",
            IdentityCloud::Gcp => "gcp",
        })
    }
}

impl std::str::FromStr for IdentityCloud {
    type Err = String;
    fn from_str(s: &str) -> Result<IdentityCloud, String> {
        match s {
            "aws" => Ok(IdentityCloud::Aws),
            "gcp" => Ok(IdentityCloud::Gcp),
            other => Err(format!(
                "unknown cloud {other:?}: instances prove who they are on aws or gcp"
            )),
        }
    }
}

/// What an invite made for a cloud instance demands of its redeemer: a proof from `cloud`
/// naming `instance` (an AWS instance id, a GCE instance name). `instance` is `None` until
/// the provisioner learns the id (after the launch call returns); a redemption before then is
/// refused with [`Refusal::NotReady`], which the joiner retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequiredProof {
    pub cloud: IdentityCloud,
    pub instance: Option<String>,
}

/// Why a join was refused; shown to the person who typed the code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("this invite has already been used")]
    AlreadyUsed,
    #[error("this invite has expired")]
    Expired,
    #[error("this invite is unknown to the inviter (was it made by another machine or mesh?)")]
    UnknownToken,
    #[error("the inviter belongs to another mesh")]
    WrongMesh,
    #[error("the inviter cannot sign certificates (it does not hold the mesh key)")]
    NotAnIssuer,
    #[error("this peer is already a member of a mesh")]
    AlreadyMember,
    #[error("the admission offer carries no valid certificate for this peer")]
    BadOffer,
    /// The invite awaits the id of the instance it was made for; the joiner asks again.
    #[error("the inviter does not know this instance's id yet (it is still launching); retry")]
    NotReady,
    #[error("the instance's identity proof was refused: {0}")]
    IdentityRefused(String),
}

/// Answer to a [`JoinRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinResponse {
    /// The roster, including the joiner's new certificate.
    Welcome {
        roster: RosterSnapshot,
    },
    /// The pending peer accepted an admission.
    Accepted,
    Refused(Refusal),
}

/// Anti-entropy and status between members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncRequest {
    /// "My roster digest is this"; answered with the whole roster if it differs.
    Roster { digest: [u8; 32] },
    /// "Tell me your status."
    Status,
    /// "Which members do you know, and where?" Lets a new member find the others at once.
    Addresses,
}

/// Answer to a [`SyncRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncResponse {
    /// `None` when the digests match.
    Roster(Option<RosterSnapshot>),
    Status(PeerStatus),
    /// Members this peer knows with their multiaddrs (without `/p2p/`), bounded by
    /// [`MAX_ADDRESS_ENTRIES`].
    Addresses(Vec<(crate::PeerId, Vec<String>)>),
    /// The asker is not a member of this peer's mesh.
    NotAMember,
}

/// Largest blob request: a hash and a bounded list of ranges.
pub const MAX_BLOB_REQUEST_BYTES: usize = 64 * 1024;
/// Largest blob response header (the `Has` answer lists ranges).
pub const MAX_BLOB_HEADER_BYTES: usize = 1024 * 1024;
/// Most ranges in one request or answer: a fragmented partial blob is summarised, not listed
/// chunk by chunk.
pub const MAX_BLOB_RANGES: usize = 4096;

/// A request on the blob protocol. Ranges are half-open runs of 1 KiB BLAKE3 chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobRequest {
    /// "What do you hold of this blob?"
    Has { hash: crate::BlobHash },
    /// "Send me the verified encoding of these ranges." With `insist`, the asker has no one
    /// else to ask, so a seeder must not answer [`BlobResponse::Elsewhere`]. `found_empty` is
    /// the fetcher a seeder last sent the asker to for these ranges, found holding nothing:
    /// the seeder must not send the asker there again (but may send it to another).
    Get {
        hash: crate::BlobHash,
        ranges: Vec<(u64, u64)>,
        insist: bool,
        found_empty: Option<crate::PeerId>,
    },
}

/// The header of an answer on the blob protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// What the provider holds, verified: the whole blob, or these chunk ranges of it.
    Has {
        size: u64,
        complete: bool,
        ranges: Vec<(u64, u64)>,
    },
    /// The provider holds nothing of it.
    NotFound,
    /// The bao encoding of the requested ranges follows, until the stream ends.
    Data { size: u64 },
    /// The provider will not serve this request; the reason is for logs.
    Refused(String),
    /// The provider (a seeder) sent these ranges to fetcher `to` moments ago: fetch them from
    /// `to` once it holds them, and ask again, naming `to` in `found_empty`, if `to` turns out
    /// to hold nothing of the blob (it deleted it, or is gone).
    Elsewhere { to: crate::PeerId },
}

/// Most entries in one [`Have`] announcement: about 50 bytes each, far under the gossip limit.
pub const MAX_HAVE_ENTRIES: usize = 512;

/// What a peer holds or is fetching, gossiped on the `have` topic (batched, throttled). A hint:
/// fetchers use it to find providers and fellow fetchers sooner than by asking every member.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Have {
    pub blobs: Vec<HaveEntry>,
}

/// One blob in a [`Have`] announcement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HaveEntry {
    pub hash: crate::BlobHash,
    pub size: u64,
    /// Whole (`true`) or being fetched (`false`).
    pub complete: bool,
}
