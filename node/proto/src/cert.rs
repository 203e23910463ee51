//! Member certificates, revocations and the mesh key that signs them.
//!
//! A certificate `{mesh, peer, roles, not_after, serial}` says that `peer` is a member with
//! `roles` until `not_after`; a revocation says that `peer` is no member any more, whatever
//! certificates it holds. Both are signed by the mesh key over a domain-separated encoding, so a
//! signature for one can never be replayed as the other.

use crate::{MeshId, UnixTime, encode};
use libp2p_identity::{PeerId, ed25519};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

const CERT_DOMAIN: &[u8] = b"blendnet/v1/certificate\0";
const REVOCATION_DOMAIN: &[u8] = b"blendnet/v1/revocation\0";

/// What a member may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    /// Submit jobs (a `.blend` can carry Python, so this is a trust decision).
    Submit,
    /// Render tasks.
    Render,
    /// Coordinate jobs and merge results.
    Coordinate,
    /// Start cloud machines and issue them short-lived certificates.
    Provision,
}

impl Role {
    /// Every role, in display order.
    pub const ALL: [Role; 4] = [
        Role::Submit,
        Role::Render,
        Role::Coordinate,
        Role::Provision,
    ];

    /// The role's name as typed on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Render => "render",
            Role::Coordinate => "coordinate",
            Role::Provision => "provision",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of roles.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Roles(u8);

impl Roles {
    /// No role at all.
    pub const EMPTY: Roles = Roles(0);

    /// What an invite grants when no roles are named: everything but `provision`.
    pub fn default_member() -> Roles {
        Roles::from(Role::Submit) | Roles::from(Role::Render) | Roles::from(Role::Coordinate)
    }

    /// Whether `role` is in the set.
    pub fn contains(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }

    /// Whether every role of `other` is in this set.
    pub fn covers(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the two sets share a role.
    pub fn intersects(self, other: Roles) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 & Roles::all_bits() == 0
    }

    /// The roles, in display order.
    pub fn iter(self) -> impl Iterator<Item = Role> {
        Role::ALL.into_iter().filter(move |r| self.contains(*r))
    }

    /// The role names, for JSON.
    pub fn names(self) -> Vec<String> {
        self.iter().map(|r| r.name().to_string()).collect()
    }

    fn all_bits() -> u8 {
        Role::ALL.iter().fold(0, |acc, r| acc | r.bit())
    }
}

impl From<Role> for Roles {
    fn from(r: Role) -> Roles {
        Roles(r.bit())
    }
}

impl std::ops::BitOr for Roles {
    type Output = Roles;
    fn bitor(self, rhs: Roles) -> Roles {
        Roles(self.0 | rhs.0)
    }
}

impl fmt::Display for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

impl fmt::Debug for Roles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Roles({self})")
    }
}

/// A role name that is not one of `submit`, `render`, `coordinate`, `provision`.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?}: roles are submit, render, coordinate and provision")]
pub struct UnknownRole(String);

impl FromStr for Roles {
    type Err = UnknownRole;
    /// Parses a comma-separated list such as `submit,render`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut roles = Roles::EMPTY;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let role = Role::ALL
                .into_iter()
                .find(|r| r.name().eq_ignore_ascii_case(part))
                .ok_or_else(|| UnknownRole(part.to_string()))?;
            roles = roles | Roles::from(role);
        }
        Ok(roles)
    }
}

/// The signed part of a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CertBody {
    pub mesh: MeshId,
    pub peer: PeerId,
    pub roles: Roles,
    /// Unix seconds after which the certificate no longer counts.
    pub not_after: UnixTime,
    /// Unique per certificate issued by this mesh key (random).
    pub serial: u64,
}

/// A member certificate signed by the mesh key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Certificate {
    pub body: CertBody,
    pub signature: Vec<u8>,
}

/// The signed part of a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RevocationBody {
    pub mesh: MeshId,
    pub peer: PeerId,
    /// When it was issued, for display.
    pub issued_at: UnixTime,
}

/// A revocation of every certificate of one peer, signed by the mesh key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Revocation {
    pub body: RevocationBody,
    pub signature: Vec<u8>,
}

/// Why a certificate or revocation does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signed for another mesh ({})", found.short())]
    WrongMesh { found: MeshId },
    #[error("mesh id is not a valid ed25519 public key")]
    BadMeshKey,
    #[error("signature does not verify")]
    BadSignature,
}

fn verify(mesh: &MeshId, domain: &[u8], body: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
    let key = ed25519::PublicKey::try_from_bytes(&mesh.0).map_err(|_| VerifyError::BadMeshKey)?;
    let mut msg = domain.to_vec();
    msg.extend_from_slice(body);
    if key.verify(&msg, signature) {
        Ok(())
    } else {
        Err(VerifyError::BadSignature)
    }
}

impl Certificate {
    /// Checks that the certificate belongs to `mesh` and is signed by its key.
    pub fn verify(&self, mesh: &MeshId) -> Result<(), VerifyError> {
        if self.body.mesh != *mesh {
            return Err(VerifyError::WrongMesh {
                found: self.body.mesh,
            });
        }
        verify(mesh, CERT_DOMAIN, &encode(&self.body), &self.signature)
    }

    /// Whether the certificate is still in force at `now`.
    pub fn is_current(&self, now: UnixTime) -> bool {
        now <= self.body.not_after
    }
}

impl Revocation {
    /// Checks that the revocation belongs to `mesh` and is signed by its key.
    pub fn verify(&self, mesh: &MeshId) -> Result<(), VerifyError> {
        if self.body.mesh != *mesh {
            return Err(VerifyError::WrongMesh {
                found: self.body.mesh,
            });
        }
        verify(
            mesh,
            REVOCATION_DOMAIN,
            &encode(&self.body),
            &self.signature,
        )
    }
}

/// The mesh's signing key. Only the machine that ran `blendnet init` holds it.
#[derive(Clone)]
pub struct MeshKey(ed25519::Keypair);

impl fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshKey({})", self.id().short())
    }
}

/// Bytes that are not a 64-byte ed25519 keypair.
#[derive(Debug, thiserror::Error)]
#[error("not an ed25519 mesh key (expected 64 bytes)")]
pub struct BadMeshKey;

impl MeshKey {
    /// A new random mesh key.
    pub fn generate() -> MeshKey {
        MeshKey(ed25519::Keypair::generate())
    }

    /// The 64-byte secret encoding, for the key file.
    pub fn to_bytes(&self) -> [u8; 64] {
        self.0.to_bytes()
    }

    /// Reads the 64-byte secret encoding.
    pub fn from_bytes(bytes: &[u8]) -> Result<MeshKey, BadMeshKey> {
        let mut copy = bytes.to_vec();
        ed25519::Keypair::try_from_bytes(&mut copy)
            .map(MeshKey)
            .map_err(|_| BadMeshKey)
    }

    /// The id of the mesh this key signs for.
    pub fn id(&self) -> MeshId {
        MeshId(self.0.public().to_bytes())
    }

    /// Signs a certificate.
    pub fn certify(
        &self,
        peer: PeerId,
        roles: Roles,
        not_after: UnixTime,
        serial: u64,
    ) -> Certificate {
        let body = CertBody {
            mesh: self.id(),
            peer,
            roles,
            not_after,
            serial,
        };
        let mut msg = CERT_DOMAIN.to_vec();
        msg.extend_from_slice(&encode(&body));
        Certificate {
            signature: self.0.sign(&msg),
            body,
        }
    }

    /// Signs a revocation of `peer`.
    pub fn revoke(&self, peer: PeerId, issued_at: UnixTime) -> Revocation {
        let body = RevocationBody {
            mesh: self.id(),
            peer,
            issued_at,
        };
        let mut msg = REVOCATION_DOMAIN.to_vec();
        msg.extend_from_slice(&encode(&body));
        Revocation {
            signature: self.0.sign(&msg),
            body,
        }
    }
}

/// A roster as it travels: the mesh and every certificate and revocation it knows.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RosterSnapshot {
    pub certificates: Vec<Certificate>,
    pub revocations: Vec<Revocation>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_verify_only_for_their_mesh_and_unchanged() {
        let key = MeshKey::generate();
        let other = MeshKey::generate();
        let peer = PeerId::random();
        let cert = key.certify(peer, Roles::default_member(), 100, 1);
        cert.verify(&key.id()).unwrap();
        assert!(matches!(
            cert.verify(&other.id()),
            Err(VerifyError::WrongMesh { .. })
        ));
        let mut tampered = cert.clone();
        tampered.body.roles = tampered.body.roles | Roles::from(Role::Provision);
        assert_eq!(tampered.verify(&key.id()), Err(VerifyError::BadSignature));
        let mut forged = other.certify(peer, Roles::default_member(), 100, 1);
        forged.body.mesh = key.id();
        assert_eq!(forged.verify(&key.id()), Err(VerifyError::BadSignature));
    }

    #[test]
    fn a_certificate_signature_is_not_a_revocation_signature() {
        let key = MeshKey::generate();
        let peer = PeerId::random();
        let rev = key.revoke(peer, 5);
        rev.verify(&key.id()).unwrap();
        let cert = key.certify(peer, Roles::EMPTY, 5, 0);
        let replay = Revocation {
            body: rev.body.clone(),
            signature: cert.signature,
        };
        assert_eq!(replay.verify(&key.id()), Err(VerifyError::BadSignature));
    }

    #[test]
    fn mesh_key_round_trips() {
        let key = MeshKey::generate();
        let back = MeshKey::from_bytes(&key.to_bytes()).unwrap();
        assert_eq!(back.id(), key.id());
        assert!(MeshKey::from_bytes(&[1, 2, 3]).is_err());
    }

    #[test]
    fn roles_parse_and_print() {
        let r: Roles = "submit, Render".parse().unwrap();
        assert!(r.contains(Role::Submit) && r.contains(Role::Render));
        assert!(!r.contains(Role::Coordinate));
        assert_eq!(r.to_string(), "submit,render");
        let err = "submit,admin".parse::<Roles>().unwrap_err();
        assert!(err.to_string().contains("admin"));
    }
}
