//! Mesh ids and peer fingerprints: the names people read and compare.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A mesh is named by its mesh public key (ed25519, 32 bytes). Shown as unpadded base32.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MeshId(pub [u8; 32]);

impl MeshId {
    /// The first 8 characters of the id: enough for a person to tell meshes apart.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE32_NOPAD.encode(&self.0).to_lowercase())
    }
}

impl fmt::Debug for MeshId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MeshId({})", self.short())
    }
}

/// A mesh id that is not 52 base32 characters.
#[derive(Debug, thiserror::Error)]
#[error("not a mesh id: {0:?}")]
pub struct BadMeshId(String);

impl FromStr for MeshId {
    type Err = BadMeshId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = data_encoding::BASE32_NOPAD
            .decode(s.trim().to_uppercase().as_bytes())
            .map_err(|_| BadMeshId(s.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadMeshId(s.to_string()))?;
        Ok(MeshId(arr))
    }
}

/// A short, human-comparable digest of a peer id, like `K3QF-7ZPA`: printed by a new daemon at
/// start and typed by the owner into `blendnet admit`. 40 bits: enough to tell machines on one
/// LAN apart and to notice a stranger, not a cryptographic identity on its own.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 5]);

impl Fingerprint {
    /// The fingerprint of a peer id.
    pub fn of(peer: &PeerId) -> Fingerprint {
        let hash = blake3::hash(&peer.to_bytes());
        let mut out = [0u8; 5];
        out.copy_from_slice(&hash.as_bytes()[..5]);
        Fingerprint(out)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = data_encoding::BASE32_NOPAD.encode(&self.0);
        write!(f, "{}-{}", &s[..4], &s[4..])
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// A fingerprint that is not 8 base32 characters (a dash and case are ignored).
#[derive(Debug, thiserror::Error)]
#[error("not a fingerprint: {0:?} (expected 8 letters and digits like K3QF-7ZPA)")]
pub struct BadFingerprint(String);

impl FromStr for Fingerprint {
    type Err = BadFingerprint;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let clean: String = s
            .chars()
            .filter(|c| *c != '-' && !c.is_whitespace())
            .collect::<String>()
            .to_uppercase();
        let bytes = data_encoding::BASE32_NOPAD
            .decode(clean.as_bytes())
            .map_err(|_| BadFingerprint(s.to_string()))?;
        let arr: [u8; 5] = bytes
            .try_into()
            .map_err(|_| BadFingerprint(s.to_string()))?;
        Ok(Fingerprint(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_ignores_case_and_dash() {
        let peer = PeerId::random();
        let fp = Fingerprint::of(&peer);
        let text = fp.to_string();
        assert_eq!(text.len(), 9);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            text.replace('-', "")
                .to_lowercase()
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert_ne!(Fingerprint::of(&PeerId::random()), fp);
        assert!("hello".parse::<Fingerprint>().is_err());
    }

    #[test]
    fn mesh_id_round_trips() {
        let id = MeshId([7; 32]);
        assert_eq!(id.to_string().parse::<MeshId>().unwrap(), id);
        assert!("abc".parse::<MeshId>().is_err());
    }
}

/// Serde for 32-byte ids: 64 hex digits where people read them (JSON: the API), the raw bytes
/// where only programs do (bincode: the wire and the disk).
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&data_encoding::HEXLOWER.encode(bytes))
        } else {
            bytes.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if !d.is_human_readable() {
            return <[u8; 32]>::deserialize(d);
        }
        let text = String::deserialize(d)?;
        data_encoding::HEXLOWER_PERMISSIVE
            .decode(text.as_bytes())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(|| serde::de::Error::custom(format!("not 64 hex digits: {text:?}")))
    }
}

/// A blob's name: the BLAKE3 hash of its bytes (the bao root). Shown as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobHash(#[serde(with = "hex32")] pub [u8; 32]);

impl BlobHash {
    /// The hash of `bytes`.
    pub fn of(bytes: &[u8]) -> BlobHash {
        BlobHash(*blake3::hash(bytes).as_bytes())
    }

    /// The first 12 hex digits: enough to tell blobs apart in logs.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_string()
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::HEXLOWER.encode(&self.0))
    }
}

impl fmt::Debug for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobHash({})", self.short())
    }
}

/// Text that is not 64 hex digits.
#[derive(Debug, thiserror::Error)]
#[error("not a blob hash: {0:?} (expected 64 hex digits)")]
pub struct BadBlobHash(String);

impl FromStr for BlobHash {
    type Err = BadBlobHash;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = data_encoding::HEXLOWER_PERMISSIVE
            .decode(s.trim().as_bytes())
            .map_err(|_| BadBlobHash(s.to_string()))?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| BadBlobHash(s.to_string()))?;
        Ok(BlobHash(arr))
    }
}

#[cfg(test)]
mod blob_hash_tests {
    use super::*;

    #[test]
    fn blob_hash_round_trips_and_matches_blake3() {
        let h = BlobHash::of(b"hello");
        assert_eq!(h.to_string(), blake3::hash(b"hello").to_hex().to_string());
        assert_eq!(h.to_string().parse::<BlobHash>().unwrap(), h);
        assert_eq!(h.to_string().to_uppercase().parse::<BlobHash>().unwrap(), h);
        assert!("abc".parse::<BlobHash>().is_err());
    }
}

#[cfg(test)]
mod hex32_tests {
    use super::BlobHash;

    #[test]
    fn hashes_are_hex_in_json_and_bytes_on_the_wire() {
        let hash = BlobHash::of(b"x");
        let json = serde_json::to_string(&hash).unwrap();
        assert_eq!(json, format!("\"{hash}\""));
        assert_eq!(serde_json::from_str::<BlobHash>(&json).unwrap(), hash);
        assert!(serde_json::from_str::<BlobHash>("\"abc\"").is_err());
        let wire = crate::encode(&hash);
        assert_eq!(wire.len(), 32);
        assert_eq!(crate::decode::<BlobHash>(&wire, 32).unwrap(), hash);
    }
}
