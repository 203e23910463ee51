//! Invites an inviter has handed out: single-use, expiring tokens.
//!
//! Redeeming is idempotent for the peer that first redeemed a token, so a joiner whose answer
//! was lost in transit can ask again; any other peer is refused with "already used".

use blendnet_proto::wire::{Refusal, RequiredProof};
use blendnet_proto::{PeerId, Roles, Token, UnixTime};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How long an expired or used invite is remembered, so that a late redemption gets the
/// precise refusal ("expired", "already used") rather than "unknown".
pub const FORGET_AFTER_SECS: u64 = 7 * 24 * 3600;

/// A public name for an invite's token: the first 16 hex digits of its BLAKE3 hash. A cloud
/// instance carries it as a tag, so its provisioner learns which peer the instance became
/// (the one that redeemed the token) without the token itself being readable from the tag.
pub fn token_tag(token: &Token) -> String {
    blake3::hash(&token.0).to_hex()[..16].to_owned()
}

/// One invite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub roles: Roles,
    pub expires_at: UnixTime,
    /// The peer that redeemed it, once it has been.
    pub used_by: Option<PeerId>,
    /// How long the certificate given on redemption lasts (seconds); none: a member's usual
    /// lifetime. Cloud instances get short ones, renewed by their provisioner while they live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_lifetime_secs: Option<u64>,
    /// The cloud identity its redeemer must prove (invites made for cloud instances).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proof: Option<RequiredProof>,
}

/// The invites of one inviter. Serialized as a list of `(token, invite)` pairs, so formats
/// whose map keys must be strings (JSON) can hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Vec<(Token, Invite)>", into = "Vec<(Token, Invite)>")]
pub struct Invites {
    invites: BTreeMap<Token, Invite>,
}

impl From<Vec<(Token, Invite)>> for Invites {
    fn from(list: Vec<(Token, Invite)>) -> Invites {
        Invites {
            invites: list.into_iter().collect(),
        }
    }
}

impl From<Invites> for Vec<(Token, Invite)> {
    fn from(invites: Invites) -> Vec<(Token, Invite)> {
        invites.invites.into_iter().collect()
    }
}

impl Invites {
    /// Records a new invite; its certificate lasts `cert_lifetime_secs` when given.
    pub fn issue(
        &mut self,
        token: Token,
        roles: Roles,
        expires_at: UnixTime,
        cert_lifetime_secs: Option<u64>,
    ) {
        self.invites.insert(
            token,
            Invite {
                roles,
                expires_at,
                used_by: None,
                cert_lifetime_secs,
                proof: None,
            },
        );
    }

    /// Makes `token`'s invite demand `proof` of its redeemer (see [`RequiredProof`]): set
    /// with no instance when the invite is made for an instance about to launch, then again
    /// with the instance's id once it is known. Returns false for an unknown or used token.
    pub fn require_proof(&mut self, token: &Token, proof: RequiredProof) -> bool {
        match self.invites.get_mut(token) {
            Some(invite) if invite.used_by.is_none() => {
                invite.proof = Some(proof);
                true
            }
            _ => false,
        }
    }

    /// How long the certificate of `token`'s redeemer lasts, if the invite says.
    pub fn cert_lifetime(&self, token: &Token) -> Option<u64> {
        self.invites.get(token).and_then(|i| i.cert_lifetime_secs)
    }

    /// Redeems `token` for `peer` at `now`, returning the roles to certify. An invite that
    /// demands a proof of identity is redeemed only once `check` accepts what it demands
    /// (`check` is not called for a peer retrying a redemption it already won); until the
    /// instance is known, the answer is [`Refusal::NotReady`]. A refused redemption leaves
    /// the invite unused.
    pub fn redeem(
        &mut self,
        token: &Token,
        peer: PeerId,
        now: UnixTime,
        check: impl FnOnce(&RequiredProof) -> Result<(), Refusal>,
    ) -> Result<Roles, Refusal> {
        let invite = self.invites.get_mut(token).ok_or(Refusal::UnknownToken)?;
        match invite.used_by {
            Some(p) if p == peer => return Ok(invite.roles),
            Some(_) => return Err(Refusal::AlreadyUsed),
            None => {}
        }
        if now > invite.expires_at {
            return Err(Refusal::Expired);
        }
        if let Some(required) = &invite.proof {
            if required.instance.is_none() {
                return Err(Refusal::NotReady);
            }
            check(required)?;
        }
        invite.used_by = Some(peer);
        Ok(invite.roles)
    }

    /// Whether any invite can still be redeemed at `now`: only then do we let unknown peers
    /// connect long enough to redeem one.
    pub fn any_open(&self, now: UnixTime) -> bool {
        self.invites
            .values()
            .any(|i| i.used_by.is_none() && now <= i.expires_at)
    }

    /// Forgets invites that expired more than [`FORGET_AFTER_SECS`] ago.
    pub fn prune(&mut self, now: UnixTime) {
        self.invites
            .retain(|_, i| now <= i.expires_at.saturating_add(FORGET_AFTER_SECS));
    }

    /// The peer that redeemed the invite whose token hashes to `tag` (see [`token_tag`]).
    pub fn redeemed_by_tag(&self, tag: &str) -> Option<PeerId> {
        self.invites
            .iter()
            .find(|(token, _)| token_tag(token) == tag)
            .and_then(|(_, invite)| invite.used_by)
    }

    /// How many invites are remembered.
    pub fn len(&self) -> usize {
        self.invites.len()
    }

    /// Whether no invite is remembered.
    pub fn is_empty(&self) -> bool {
        self.invites.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_survive_a_json_round_trip() {
        let mut inv = Invites::default();
        inv.issue(Token([7; 16]), Roles::default_member(), 100, Some(3600));
        let a = PeerId::random();
        inv.redeem(&Token([7; 16]), a, 1, |_| Ok(())).unwrap();
        inv.issue(Token([8; 16]), Roles::default_member(), 200, None);
        let text = serde_json::to_string(&inv).unwrap();
        let back: Invites = serde_json::from_str(&text).unwrap();
        assert_eq!(back, inv);
        assert_eq!(back.cert_lifetime(&Token([7; 16])), Some(3600));
        assert_eq!(back.cert_lifetime(&Token([8; 16])), None);
        // Invites saved before certificate lifetimes existed still read.
        let old: Invites =
            serde_json::from_str(&text.replace(",\"cert_lifetime_secs\":3600", "")).unwrap();
        assert_eq!(old.cert_lifetime(&Token([7; 16])), None);
        // A redeemed invite stays redeemed after the round trip.
        let mut back = back;
        assert_eq!(
            back.redeem(&Token([7; 16]), PeerId::random(), 2, |_| Ok(())),
            Err(Refusal::AlreadyUsed)
        );
    }

    #[test]
    fn an_invite_for_an_instance_waits_for_its_id_then_for_an_accepted_proof() {
        use blendnet_proto::wire::IdentityCloud;
        let mut inv = Invites::default();
        let t = Token([4; 16]);
        inv.issue(t, Roles::default_member(), 100, Some(60));
        let pending = RequiredProof {
            cloud: IdentityCloud::Aws,
            instance: None,
        };
        assert!(inv.require_proof(&t, pending.clone()));
        assert!(!inv.require_proof(&Token([5; 16]), pending));
        let a = PeerId::random();
        let never = |_: &RequiredProof| -> Result<(), Refusal> { panic!("checked too early") };
        assert_eq!(inv.redeem(&t, a, 1, never), Err(Refusal::NotReady));
        let bound = RequiredProof {
            cloud: IdentityCloud::Aws,
            instance: Some("i-0123".into()),
        };
        assert!(inv.require_proof(&t, bound.clone()));
        let refused = Refusal::IdentityRefused("another instance".into());
        assert_eq!(
            inv.redeem(&t, a, 2, |r| {
                assert_eq!(r, &bound);
                Err(refused.clone())
            }),
            Err(refused)
        );
        // Refused: still open for the right instance.
        assert!(inv.any_open(2));
        assert_eq!(
            inv.redeem(&t, a, 3, |_| Ok(())),
            Ok(Roles::default_member())
        );
        assert_eq!(inv.redeem(&t, a, 4, never), Ok(Roles::default_member()));
        assert!(!inv.require_proof(&t, bound));
        let text = serde_json::to_string(&inv).unwrap();
        assert_eq!(serde_json::from_str::<Invites>(&text).unwrap(), inv);
    }

    #[test]
    fn the_redeemer_of_a_tagged_invite_is_found_by_its_tag() {
        let mut inv = Invites::default();
        let (t1, t2) = (Token([1; 16]), Token([2; 16]));
        inv.issue(t1, Roles::default_member(), 100, None);
        inv.issue(t2, Roles::default_member(), 100, None);
        let a = PeerId::random();
        inv.redeem(&t2, a, 1, |_| Ok(())).unwrap();
        assert_ne!(token_tag(&t1), token_tag(&t2));
        assert_eq!(token_tag(&t1).len(), 16);
        assert_eq!(inv.redeemed_by_tag(&token_tag(&t2)), Some(a));
        assert_eq!(inv.redeemed_by_tag(&token_tag(&t1)), None);
        assert_eq!(inv.redeemed_by_tag("0000000000000000"), None);
    }

    #[test]
    fn an_invite_is_single_use_expires_and_retries_are_idempotent() {
        let mut inv = Invites::default();
        let t = Token([1; 16]);
        inv.issue(t, Roles::default_member(), 100, None);
        assert!(inv.any_open(50));
        let a = PeerId::random();
        assert_eq!(
            inv.redeem(&t, a, 50, |_| Ok(())),
            Ok(Roles::default_member())
        );
        assert_eq!(
            inv.redeem(&t, a, 60, |_| Ok(())),
            Ok(Roles::default_member())
        );
        assert_eq!(
            inv.redeem(&t, PeerId::random(), 60, |_| Ok(())),
            Err(Refusal::AlreadyUsed)
        );
        assert!(!inv.any_open(50));

        let t2 = Token([2; 16]);
        inv.issue(t2, Roles::default_member(), 100, None);
        assert_eq!(inv.redeem(&t2, a, 101, |_| Ok(())), Err(Refusal::Expired));
        assert_eq!(
            inv.redeem(&Token([3; 16]), a, 0, |_| Ok(())),
            Err(Refusal::UnknownToken)
        );
        inv.prune(100 + FORGET_AFTER_SECS + 1);
        assert!(inv.is_empty());
    }
}
