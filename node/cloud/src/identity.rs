//! Instance identity proofs (DESIGN §9): a cloud instance enrolling with a one-time token also
//! shows its cloud's signed statement of which instance it is, and the inviter checks that the
//! statement names the instance the invite was made for. A stolen token is then worthless off
//! that instance.
//!
//! - AWS: the instance identity document (JSON: `instanceId`, `region`, `accountId`, ...) with
//!   its base64 RSA-SHA256 signature (IMDS `/latest/dynamic/instance-identity/signature`),
//!   checked against AWS's public certificate for that signature (the "RSA" certificate of
//!   the instance's region in AWS's "public certificates for instance identity document
//!   signatures"), which the operator configures (`[cloud] aws_identity_certificate`).
//! - GCP: the instance identity token (a JWT, RS256, `format=full`) whose audience is the mesh
//!   id, checked against Google's signing keys (`[cloud] gcp_identity_keys`: the PEM
//!   certificates Google publishes at `https://www.googleapis.com/oauth2/v1/certs`, that JSON
//!   object as is, or PEM keys), its expiry, and its `google.compute_engine` claims.
//!
//! Pure: no I/O, no clock (the caller passes `now`). Fetching a proof from the metadata server
//! is [`crate::preempt::Watcher::identity`].

use aws_lc_rs::signature::{self, UnparsedPublicKey};
use blendnet_proto::wire::{IdentityCloud, IdentityProof, RequiredProof};
use data_encoding::{BASE64, BASE64URL_NOPAD};
use serde::Deserialize;

/// Tolerated clock difference between the inviter and Google when checking a token's times.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Most keys read from one trust-root file (Google publishes two or three at a time).
pub const MAX_TRUST_KEYS: usize = 64;

/// Why a proof, a trust root or an instance name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the invite wants a {wanted} proof, the instance sent a {sent} one")]
    WrongCloud {
        wanted: IdentityCloud,
        sent: IdentityCloud,
    },
    #[error("no trust roots are configured for {0} identity proofs (set [cloud] {key})", key = trust_key(*.0))]
    NoTrustRoots(IdentityCloud),
    #[error("the {0} signature is not valid base64")]
    BadEncoding(&'static str),
    #[error("the signature does not verify with any trusted {0} key")]
    BadSignature(IdentityCloud),
    #[error("the {what} is malformed: {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("the proof names instance {named:?}, the invite is for {wanted:?}")]
    WrongInstance { named: String, wanted: String },
    #[error("the identity token's audience is {found:?}, not this mesh ({wanted})")]
    WrongAudience { found: String, wanted: String },
    #[error("the identity token expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("the identity token is signed with {0}, not RS256")]
    WrongAlgorithm(String),
    #[error("the trust roots are unreadable: {0}")]
    BadTrustRoots(String),
    #[error("{0:?} is not CLOUD:INSTANCE (like aws:i-0123456789abcdef0 or gcp:my-instance)")]
    BadInstance(String),
}

fn trust_key(cloud: IdentityCloud) -> &'static str {
    match cloud {
        IdentityCloud::Aws => "aws_identity_certificate",
        IdentityCloud::Gcp => "gcp_identity_keys",
    }
}

/// Parses `CLOUD:INSTANCE` (`aws:i-0123…`, `gcp:NAME`) into what an invite demands.
pub fn parse_instance(text: &str) -> Result<RequiredProof, IdentityError> {
    let bad = || IdentityError::BadInstance(text.to_owned());
    let (cloud, instance) = text.split_once(':').ok_or_else(bad)?;
    let cloud: IdentityCloud = cloud.parse().map_err(|_| bad())?;
    let instance = instance.trim();
    if instance.is_empty() || instance.len() > 128 {
        return Err(bad());
    }
    Ok(RequiredProof {
        cloud,
        instance: Some(instance.to_owned()),
    })
}

/// An RSA public key, as PKCS#1 `RSAPublicKey` DER, with the key id Google gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RsaKey {
    kid: Option<String>,
    pkcs1: Vec<u8>,
}

/// The keys proofs are checked against.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustRoots {
    aws: Vec<RsaKey>,
    gcp: Vec<RsaKey>,
}

impl TrustRoots {
    /// Whether keys for `cloud` are configured.
    pub fn has(&self, cloud: IdentityCloud) -> bool {
        match cloud {
            IdentityCloud::Aws => !self.aws.is_empty(),
            IdentityCloud::Gcp => !self.gcp.is_empty(),
        }
    }

    /// Trusts the RSA keys in `pem` (certificates, `PUBLIC KEY` or `RSA PUBLIC KEY` blocks)
    /// for AWS identity documents.
    pub fn add_aws_pem(&mut self, pem: &str) -> Result<usize, IdentityError> {
        let keys = keys_from_pem(pem, None)?;
        let n = keys.len();
        self.aws.extend(keys);
        Ok(n)
    }

    /// Trusts Google's keys for GCP identity tokens: either Google's JSON object of key id to
    /// PEM certificate (`oauth2/v1/certs`) or PEM blocks.
    pub fn add_gcp(&mut self, text: &str) -> Result<usize, IdentityError> {
        let keys = if text.trim_start().starts_with('{') {
            let map: std::collections::BTreeMap<String, String> = serde_json::from_str(text)
                .map_err(|e| IdentityError::BadTrustRoots(format!("Google's key list: {e}")))?;
            let mut keys = Vec::new();
            for (kid, pem) in map {
                keys.extend(keys_from_pem(&pem, Some(kid))?);
            }
            keys
        } else {
            keys_from_pem(text, None)?
        };
        let n = keys.len();
        self.gcp.extend(keys);
        Ok(n)
    }

    /// Checks `proof` against what an invite demands, for the mesh named `audience`, at
    /// Unix time `now`.
    pub fn verify(
        &self,
        proof: &IdentityProof,
        required: &RequiredProof,
        audience: &str,
        now: u64,
    ) -> Result<(), IdentityError> {
        if proof.cloud() != required.cloud {
            return Err(IdentityError::WrongCloud {
                wanted: required.cloud,
                sent: proof.cloud(),
            });
        }
        let wanted = required.instance.as_deref().unwrap_or_default();
        match proof {
            IdentityProof::Aws {
                document,
                signature,
            } => {
                let doc = verify_aws(document, signature, &self.aws)?;
                if doc.instance_id != wanted {
                    return Err(IdentityError::WrongInstance {
                        named: doc.instance_id,
                        wanted: wanted.to_owned(),
                    });
                }
            }
            IdentityProof::Gcp { token } => {
                let claims = verify_gcp(token, &self.gcp, audience, now)?;
                let ce = claims.google.compute_engine;
                if ce.instance_id != wanted && ce.instance_name != wanted {
                    return Err(IdentityError::WrongInstance {
                        named: format!("{} ({})", ce.instance_name, ce.instance_id),
                        wanted: wanted.to_owned(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The fields of an AWS instance identity document that are checked or logged.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AwsDocument {
    pub instance_id: String,
    pub region: String,
    pub account_id: String,
    #[serde(default)]
    pub pending_time: Option<String>,
}

/// Verifies an AWS identity document's signature with `keys` and reads it.
fn verify_aws(
    document: &str,
    signature: &str,
    keys: &[RsaKey],
) -> Result<AwsDocument, IdentityError> {
    if keys.is_empty() {
        return Err(IdentityError::NoTrustRoots(IdentityCloud::Aws));
    }
    let compact: String = signature.split_whitespace().collect();
    let signature = BASE64
        .decode(compact.as_bytes())
        .map_err(|_| IdentityError::BadEncoding("AWS"))?;
    // AWS's certificates for this signature are 1024-bit RSA keys in most regions.
    let verified = keys.iter().any(|key| {
        UnparsedPublicKey::new(
            &signature::RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY,
            &key.pkcs1,
        )
        .verify(document.as_bytes(), &signature)
        .is_ok()
    });
    if !verified {
        return Err(IdentityError::BadSignature(IdentityCloud::Aws));
    }
    serde_json::from_str(document).map_err(|e| IdentityError::Malformed {
        what: "AWS identity document",
        detail: e.to_string(),
    })
}

#[derive(Debug, Deserialize)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The claims of a GCP identity token that are checked.
#[derive(Debug, Clone, Deserialize)]
struct GcpClaims {
    aud: String,
    exp: u64,
    google: GoogleClaims,
}

#[derive(Debug, Clone, Deserialize)]
struct GoogleClaims {
    compute_engine: ComputeEngine,
}

#[derive(Debug, Clone, Deserialize)]
struct ComputeEngine {
    instance_id: String,
    instance_name: String,
}

/// Verifies a GCP identity token's signature with `keys`, its audience and expiry.
fn verify_gcp(
    token: &str,
    keys: &[RsaKey],
    audience: &str,
    now: u64,
) -> Result<GcpClaims, IdentityError> {
    if keys.is_empty() {
        return Err(IdentityError::NoTrustRoots(IdentityCloud::Gcp));
    }
    let malformed = |detail: &str| IdentityError::Malformed {
        what: "GCP identity token",
        detail: detail.to_owned(),
    };
    let token = token.trim();
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three dot-separated parts"));
    };
    let decode = |part: &str| {
        BASE64URL_NOPAD
            .decode(part.trim_end_matches('=').as_bytes())
            .map_err(|_| malformed("a part is not base64url"))
    };
    let header: JwtHeader =
        serde_json::from_slice(&decode(header)?).map_err(|e| malformed(&format!("header: {e}")))?;
    if header.alg != "RS256" {
        return Err(IdentityError::WrongAlgorithm(header.alg));
    }
    let signature = decode(sig)?;
    let signed = &token[..token.len() - sig.len() - 1];
    let verified = keys
        .iter()
        .filter(|k| header.kid.is_none() || k.kid.is_none() || k.kid == header.kid)
        .any(|key| {
            UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &key.pkcs1)
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        });
    if !verified {
        return Err(IdentityError::BadSignature(IdentityCloud::Gcp));
    }
    let claims: GcpClaims = serde_json::from_slice(&decode(payload)?)
        .map_err(|e| malformed(&format!("claims (is it a format=full token?): {e}")))?;
    if claims.aud != audience {
        return Err(IdentityError::WrongAudience {
            found: claims.aud,
            wanted: audience.to_owned(),
        });
    }
    if now > claims.exp.saturating_add(CLOCK_SKEW_SECS) {
        return Err(IdentityError::Expired {
            exp: claims.exp,
            now,
        });
    }
    Ok(claims)
}

/// Reads the RSA keys of the PEM blocks in `text`.
fn keys_from_pem(text: &str, kid: Option<String>) -> Result<Vec<RsaKey>, IdentityError> {
    let bad = |detail: String| IdentityError::BadTrustRoots(detail);
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + 11..];
        let label_end = after
            .find("-----")
            .ok_or_else(|| bad("a PEM header is not closed".into()))?;
        let label = &after[..label_end];
        let body_start = &after[label_end + 5..];
        let end_marker = format!("-----END {label}-----");
        let body_end = body_start
            .find(&end_marker)
            .ok_or_else(|| bad(format!("no {end_marker}")))?;
        let b64: String = body_start[..body_end].split_whitespace().collect();
        let der = BASE64
            .decode(b64.as_bytes())
            .map_err(|_| bad(format!("a {label} block is not base64")))?;
        let pkcs1 = match label {
            "CERTIFICATE" => spki_to_pkcs1(&certificate_spki(&der).map_err(bad)?).map_err(bad)?,
            "PUBLIC KEY" => spki_to_pkcs1(&der).map_err(bad)?,
            "RSA PUBLIC KEY" => der,
            other => return Err(bad(format!("a {other} block is not an RSA public key"))),
        };
        keys.push(RsaKey {
            kid: kid.clone(),
            pkcs1,
        });
        if keys.len() > MAX_TRUST_KEYS {
            return Err(bad(format!("more than {MAX_TRUST_KEYS} keys")));
        }
        rest = &body_start[body_end + end_marker.len()..];
    }
    if keys.is_empty() {
        return Err(bad("no PEM block".into()));
    }
    Ok(keys)
}

/// One DER element: (tag, contents, rest).
fn der_next(input: &[u8]) -> Result<(u8, &[u8], &[u8]), String> {
    let short = || "truncated DER".to_owned();
    let (&tag, input) = input.split_first().ok_or_else(short)?;
    let (&first, mut input) = input.split_first().ok_or_else(short)?;
    let len = if first < 0x80 {
        first as usize
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || input.len() < n {
            return Err("unsupported DER length".into());
        }
        let len = input[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        input = &input[n..];
        len
    };
    if input.len() < len {
        return Err(short());
    }
    Ok((tag, &input[..len], &input[len..]))
}

/// The `SubjectPublicKeyInfo` (whole element) of an X.509 certificate.
fn certificate_spki(der: &[u8]) -> Result<Vec<u8>, String> {
    let (_, cert, _) = der_next(der)?;
    let (_, mut tbs, _) = der_next(cert)?;
    // Optional [0] version, then serial, signature algorithm, issuer, validity, subject.
    let (tag, _, rest) = der_next(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
    }
    for _ in 0..5 {
        tbs = der_next(tbs)?.2;
    }
    let (tag, _, rest) = der_next(tbs)?;
    if tag != 0x30 {
        return Err("the certificate has no public key where expected".into());
    }
    Ok(tbs[..tbs.len() - rest.len()].to_vec())
}

/// The PKCS#1 `RSAPublicKey` inside a `SubjectPublicKeyInfo`.
fn spki_to_pkcs1(spki: &[u8]) -> Result<Vec<u8>, String> {
    // rsaEncryption, 1.2.840.113549.1.1.1
    const RSA_OID: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let (_, info, _) = der_next(spki)?;
    let (_, algorithm, rest) = der_next(info)?;
    let (_, oid, _) = der_next(algorithm)?;
    if oid != RSA_OID {
        return Err("the public key is not an RSA key".into());
    }
    let (tag, bits, _) = der_next(rest)?;
    match bits.split_first() {
        Some((0, key)) if tag == 0x03 => Ok(key.to_vec()),
        _ => Err("the public key's bit string is malformed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair};

    fn key() -> RsaKeyPair {
        RsaKeyPair::generate(KeySize::Rsa2048).unwrap()
    }

    fn pem(key: &RsaKeyPair) -> String {
        format!(
            "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
            BASE64.encode(key.public_key().as_ref())
        )
    }

    fn sign(key: &RsaKeyPair, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; key.public_modulus_len()];
        key.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), message, &mut sig)
            .unwrap();
        sig
    }

    fn document(instance: &str) -> String {
        format!(
            r#"{{"accountId":"123456789012","architecture":"x86_64","instanceId":"{instance}","instanceType":"c7i.large","pendingTime":"2026-11-26T03:00:00Z","region":"us-east-1"}}"#
        )
    }

    fn aws_proof(key: &RsaKeyPair, instance: &str) -> IdentityProof {
        let document = document(instance);
        let signature = BASE64.encode(&sign(key, document.as_bytes()));
        IdentityProof::Aws {
            document,
            signature,
        }
    }

    fn want(cloud: IdentityCloud, instance: &str) -> RequiredProof {
        RequiredProof {
            cloud,
            instance: Some(instance.into()),
        }
    }

    #[test]
    fn an_aws_document_signed_by_a_trusted_key_for_the_instance_is_accepted() {
        let key = key();
        let mut roots = TrustRoots::default();
        assert_eq!(roots.add_aws_pem(&pem(&key)), Ok(1));
        let proof = aws_proof(&key, "i-0123");
        let wanted = want(IdentityCloud::Aws, "i-0123");
        assert_eq!(roots.verify(&proof, &wanted, "mesh", 0), Ok(()));

        // Another instance's genuine document.
        assert!(matches!(
            roots.verify(&aws_proof(&key, "i-9999"), &wanted, "mesh", 0),
            Err(IdentityError::WrongInstance { named, .. }) if named == "i-9999"
        ));
        // A flipped byte in the document.
        let IdentityProof::Aws {
            document,
            signature,
        } = proof.clone()
        else {
            unreachable!()
        };
        let forged = IdentityProof::Aws {
            document: document.replace("i-0123", "i-0124"),
            signature: signature.clone(),
        };
        let forged_wanted = want(IdentityCloud::Aws, "i-0124");
        assert_eq!(
            roots.verify(&forged, &forged_wanted, "mesh", 0),
            Err(IdentityError::BadSignature(IdentityCloud::Aws))
        );
        // A wrong key.
        let mut other = TrustRoots::default();
        other.add_aws_pem(&pem(&self::key())).unwrap();
        assert_eq!(
            other.verify(&proof, &wanted, "mesh", 0),
            Err(IdentityError::BadSignature(IdentityCloud::Aws))
        );
        // No key, garbage signature, another cloud.
        assert_eq!(
            TrustRoots::default().verify(&proof, &wanted, "mesh", 0),
            Err(IdentityError::NoTrustRoots(IdentityCloud::Aws))
        );
        let garbage = IdentityProof::Aws {
            document,
            signature: "not base64!".into(),
        };
        assert_eq!(
            roots.verify(&garbage, &wanted, "mesh", 0),
            Err(IdentityError::BadEncoding("AWS"))
        );
        assert!(matches!(
            roots.verify(&proof, &want(IdentityCloud::Gcp, "i-0123"), "mesh", 0),
            Err(IdentityError::WrongCloud { .. })
        ));
    }

    #[test]
    fn trust_roots_read_spki_and_certificate_pem() {
        let key = key();
        // SubjectPublicKeyInfo built around the PKCS#1 key, the way `openssl rsa -pubout` writes it.
        let pkcs1 = key.public_key().as_ref();
        let mut bits = vec![0u8];
        bits.extend_from_slice(pkcs1);
        let der = |tag: u8, body: &[u8]| {
            let mut out = vec![tag];
            let len = body.len();
            if len < 0x80 {
                out.push(len as u8);
            } else {
                out.extend([0x82, (len >> 8) as u8, len as u8]);
            }
            out.extend_from_slice(body);
            out
        };
        let algorithm = [
            der(
                0x06,
                &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01],
            ),
            vec![0x05, 0x00],
        ]
        .concat();
        let spki = der(0x30, &[der(0x30, &algorithm), der(0x03, &bits)].concat());
        assert_eq!(spki_to_pkcs1(&spki).unwrap(), pkcs1);
        let text = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            BASE64.encode(&spki)
        );
        let mut roots = TrustRoots::default();
        roots.add_aws_pem(&text).unwrap();
        let proof = aws_proof(&key, "i-1");
        assert_eq!(
            roots.verify(&proof, &want(IdentityCloud::Aws, "i-1"), "m", 0),
            Ok(())
        );
        // A certificate: version, serial, algorithm, issuer, validity, subject, then the key.
        let name = der(0x30, &[]);
        let tbs = der(
            0x30,
            &[
                der(0xa0, &der(0x02, &[2])),
                der(0x02, &[1]),
                der(0x30, &algorithm),
                name.clone(),
                der(0x30, &[]),
                name,
                spki.clone(),
            ]
            .concat(),
        );
        let cert = der(
            0x30,
            &[tbs, der(0x30, &algorithm), der(0x03, &[0])].concat(),
        );
        assert_eq!(certificate_spki(&cert).unwrap(), spki);
        assert!(matches!(
            TrustRoots::default().add_aws_pem("no pem here"),
            Err(IdentityError::BadTrustRoots(_))
        ));
    }

    fn jwt(key: &RsaKeyPair, kid: &str, claims: &serde_json::Value) -> String {
        let header = serde_json::json!({"alg": "RS256", "kid": kid, "typ": "JWT"});
        let signed = format!(
            "{}.{}",
            BASE64URL_NOPAD.encode(header.to_string().as_bytes()),
            BASE64URL_NOPAD.encode(claims.to_string().as_bytes())
        );
        let sig = sign(key, signed.as_bytes());
        format!("{signed}.{}", BASE64URL_NOPAD.encode(&sig))
    }

    fn claims(aud: &str, exp: u64, name: &str) -> serde_json::Value {
        serde_json::json!({
            "aud": aud, "exp": exp, "iat": exp - 3600, "iss": "https://accounts.google.com",
            "google": {"compute_engine": {
                "instance_id": "4242424242", "instance_name": name,
                "project_id": "p", "zone": "europe-west1-b"
            }}
        })
    }

    #[test]
    fn a_gcp_token_is_checked_for_signature_audience_expiry_and_instance() {
        let key = key();
        let mut roots = TrustRoots::default();
        let google = serde_json::json!({ "k1": pem(&key) }).to_string();
        assert_eq!(roots.add_gcp(&google), Ok(1));
        let wanted = want(IdentityCloud::Gcp, "blendnet-1");
        let token = |c: &serde_json::Value| IdentityProof::Gcp {
            token: jwt(&key, "k1", c),
        };
        let now = 10_000;
        let good = token(&claims("mesh-a", now + 600, "blendnet-1"));
        assert_eq!(roots.verify(&good, &wanted, "mesh-a", now), Ok(()));
        // By instance id too.
        assert_eq!(
            roots.verify(
                &good,
                &want(IdentityCloud::Gcp, "4242424242"),
                "mesh-a",
                now
            ),
            Ok(())
        );
        assert!(matches!(
            roots.verify(&good, &wanted, "mesh-b", now),
            Err(IdentityError::WrongAudience { .. })
        ));
        assert!(matches!(
            roots.verify(
                &token(&claims("mesh-a", now - 600, "blendnet-1")),
                &wanted,
                "mesh-a",
                now
            ),
            Err(IdentityError::Expired { .. })
        ));
        assert!(matches!(
            roots.verify(
                &token(&claims("mesh-a", now + 600, "blendnet-2")),
                &wanted,
                "mesh-a",
                now
            ),
            Err(IdentityError::WrongInstance { .. })
        ));
        // Signed by another key; then a tampered payload.
        let stranger = IdentityProof::Gcp {
            token: jwt(
                &self::key(),
                "k1",
                &claims("mesh-a", now + 600, "blendnet-1"),
            ),
        };
        assert_eq!(
            roots.verify(&stranger, &wanted, "mesh-a", now),
            Err(IdentityError::BadSignature(IdentityCloud::Gcp))
        );
        let IdentityProof::Gcp { token: text } = &good else {
            unreachable!()
        };
        let parts: Vec<&str> = text.split('.').collect();
        let other = claims("mesh-a", now + 600, "blendnet-1")
            .to_string()
            .replace("4242424242", "4242424243");
        let tampered = IdentityProof::Gcp {
            token: format!(
                "{}.{}.{}",
                parts[0],
                BASE64URL_NOPAD.encode(other.as_bytes()),
                parts[2]
            ),
        };
        assert_eq!(
            roots.verify(&tampered, &wanted, "mesh-a", now),
            Err(IdentityError::BadSignature(IdentityCloud::Gcp))
        );
        assert!(matches!(
            roots.verify(
                &IdentityProof::Gcp {
                    token: "a.b".into()
                },
                &wanted,
                "mesh-a",
                now
            ),
            Err(IdentityError::Malformed { .. })
        ));
    }

    #[test]
    fn instances_are_named_cloud_colon_id() {
        assert_eq!(
            parse_instance("aws:i-0123"),
            Ok(want(IdentityCloud::Aws, "i-0123"))
        );
        assert_eq!(
            parse_instance("gcp:render-7"),
            Ok(want(IdentityCloud::Gcp, "render-7"))
        );
        for bad in ["i-0123", "azure:x", "aws:", ""] {
            assert!(parse_instance(bad).is_err(), "{bad}");
        }
    }
}
