//! The roster: who belongs to the mesh, with which roles.
//!
//! It is a state-based CRDT: a grow-only set of certificates and a grow-only set of
//! revocations, merged by union. A peer is a member at time `now` if it holds a current
//! certificate and no revocation names it, so a revocation wins over any certificate, in any
//! order of arrival. Only entries signed by the mesh key get in; everything else is refused
//! with the reason, and changes nothing.

use blendnet_proto::cert::VerifyError;
use blendnet_proto::{
    Certificate, MeshId, PeerId, Revocation, Roles, RosterSnapshot, Topic, UnixTime, encode,
};
use std::collections::{BTreeMap, BTreeSet};

/// Why an entry was not added to the roster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosterError {
    #[error("certificate for {peer} is invalid: {source}")]
    BadCertificate {
        peer: PeerId,
        #[source]
        source: VerifyError,
    },
    #[error("revocation of {peer} is invalid: {source}")]
    BadRevocation {
        peer: PeerId,
        #[source]
        source: VerifyError,
    },
}

/// Why a peer may not publish on a topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unauthorized {
    #[error("{peer} is not a member of this mesh")]
    NotAMember { peer: PeerId },
    #[error("{peer} lacks a role needed on {topic} (needs one of: {needed})")]
    MissingRole {
        peer: PeerId,
        topic: Topic,
        needed: Roles,
    },
}

/// What an insert or merge changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Certificates that were new to this roster.
    pub certificates: Vec<Certificate>,
    /// Revocations that were new to this roster.
    pub revocations: Vec<Revocation>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty() && self.revocations.is_empty()
    }

    fn extend(&mut self, other: Changes) {
        self.certificates.extend(other.certificates);
        self.revocations.extend(other.revocations);
    }
}

/// The roster of one mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    mesh: MeshId,
    /// Verified certificates. A set, so the same certificate twice is one entry.
    certificates: BTreeSet<Certificate>,
    /// Verified revocations, one per revoked peer (the first seen is kept: any one suffices).
    revocations: BTreeMap<PeerId, Revocation>,
}

impl Roster {
    /// An empty roster of `mesh`.
    pub fn new(mesh: MeshId) -> Roster {
        Roster {
            mesh,
            certificates: BTreeSet::new(),
            revocations: BTreeMap::new(),
        }
    }

    /// The mesh this roster belongs to.
    pub fn mesh(&self) -> MeshId {
        self.mesh
    }

    /// Adds a certificate after checking its signature. `Ok(true)` if it was new.
    pub fn insert_certificate(&mut self, cert: Certificate) -> Result<bool, RosterError> {
        cert.verify(&self.mesh)
            .map_err(|source| RosterError::BadCertificate {
                peer: cert.body.peer,
                source,
            })?;
        Ok(self.certificates.insert(cert))
    }

    /// Adds a revocation after checking its signature. `Ok(true)` if the peer was not yet revoked.
    pub fn insert_revocation(&mut self, rev: Revocation) -> Result<bool, RosterError> {
        rev.verify(&self.mesh)
            .map_err(|source| RosterError::BadRevocation {
                peer: rev.body.peer,
                source,
            })?;
        if self.revocations.contains_key(&rev.body.peer) {
            return Ok(false);
        }
        self.revocations.insert(rev.body.peer, rev);
        Ok(true)
    }

    /// Adds every valid entry of `snapshot`; returns what was new, and the errors of the
    /// entries that were refused (those change nothing).
    pub fn apply(&mut self, snapshot: RosterSnapshot) -> (Changes, Vec<RosterError>) {
        let mut changes = Changes::default();
        let mut errors = Vec::new();
        for cert in snapshot.certificates {
            match self.insert_certificate(cert.clone()) {
                Ok(true) => changes.certificates.push(cert),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        for rev in snapshot.revocations {
            match self.insert_revocation(rev.clone()) {
                Ok(true) => changes.revocations.push(rev),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        (changes, errors)
    }

    /// Merges another roster of the same mesh into this one (set union). Entries of another
    /// mesh are ignored. Returns what was new here.
    pub fn merge(&mut self, other: &Roster) -> Changes {
        if other.mesh != self.mesh {
            return Changes::default();
        }
        let mut changes = Changes::default();
        for cert in &other.certificates {
            if self.certificates.insert(cert.clone()) {
                changes.certificates.push(cert.clone());
            }
        }
        for (peer, rev) in &other.revocations {
            // Keep the smaller of two revocations of the same peer, so that merge does not
            // depend on the order of arrival (any one revocation is enough).
            match self.revocations.get(peer) {
                Some(mine) if mine <= rev => {}
                Some(_) => {
                    self.revocations.insert(*peer, rev.clone());
                }
                None => {
                    self.revocations.insert(*peer, rev.clone());
                    changes.revocations.push(rev.clone());
                }
            }
        }
        changes
    }

    /// Merges and collects the changes of several rosters.
    pub fn merge_all<'a>(&mut self, others: impl IntoIterator<Item = &'a Roster>) -> Changes {
        let mut all = Changes::default();
        for o in others {
            all.extend(self.merge(o));
        }
        all
    }

    /// Whether `peer` has been revoked.
    pub fn is_revoked(&self, peer: &PeerId) -> bool {
        self.revocations.contains_key(peer)
    }

    /// The roles of `peer` at `now`: the union over its current certificates, or `None` if it
    /// is not a member (no current certificate, or revoked).
    pub fn roles(&self, peer: &PeerId, now: UnixTime) -> Option<Roles> {
        if self.is_revoked(peer) {
            return None;
        }
        self.certificates
            .iter()
            .filter(|c| c.body.peer == *peer && c.is_current(now))
            .map(|c| c.body.roles)
            .reduce(|a, b| a | b)
    }

    /// Whether `peer` is a member at `now`.
    pub fn is_member(&self, peer: &PeerId, now: UnixTime) -> bool {
        self.roles(peer, now).is_some()
    }

    /// Every member at `now` with its roles.
    pub fn members(&self, now: UnixTime) -> BTreeMap<PeerId, Roles> {
        let mut out: BTreeMap<PeerId, Roles> = BTreeMap::new();
        for c in &self.certificates {
            if c.is_current(now) && !self.is_revoked(&c.body.peer) {
                let roles = out.entry(c.body.peer).or_default();
                *roles = *roles | c.body.roles;
            }
        }
        out
    }

    /// Checks that `peer` may publish on `topic` at `now`.
    pub fn authorize(
        &self,
        peer: &PeerId,
        topic: Topic,
        now: UnixTime,
    ) -> Result<(), Unauthorized> {
        let roles = self
            .roles(peer, now)
            .ok_or(Unauthorized::NotAMember { peer: *peer })?;
        let needed = topic.required_roles();
        if needed.is_empty() || roles.intersects(needed) {
            Ok(())
        } else {
            Err(Unauthorized::MissingRole {
                peer: *peer,
                topic,
                needed,
            })
        }
    }

    /// A digest of the whole roster: equal digests mean equal rosters (anti-entropy).
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(&encode(&self.snapshot())).as_bytes()
    }

    /// Every entry, in a canonical order.
    pub fn snapshot(&self) -> RosterSnapshot {
        RosterSnapshot {
            certificates: self.certificates.iter().cloned().collect(),
            revocations: self.revocations.values().cloned().collect(),
        }
    }

    /// How many certificates and revocations the roster holds.
    pub fn len(&self) -> usize {
        self.certificates.len() + self.revocations.len()
    }

    /// Whether the roster holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blendnet_proto::{MeshKey, Role};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// A fixed mesh key and peers, so proptest only chooses which entries to combine.
    struct World {
        key: MeshKey,
        peers: Vec<PeerId>,
        certs: Vec<Certificate>,
        revs: Vec<Revocation>,
    }

    fn world() -> &'static World {
        static W: OnceLock<World> = OnceLock::new();
        W.get_or_init(|| {
            let key = MeshKey::generate();
            let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
            let mut certs = Vec::new();
            for (i, p) in peers.iter().enumerate() {
                for serial in 0..3u64 {
                    let roles = if serial == 0 {
                        Roles::from(Role::Render)
                    } else {
                        Roles::default_member()
                    };
                    certs.push(key.certify(
                        *p,
                        roles,
                        1_000 + 100 * serial,
                        serial + 10 * i as u64,
                    ));
                }
            }
            let revs = peers
                .iter()
                .flat_map(|p| [key.revoke(*p, 1), key.revoke(*p, 2)])
                .collect();
            World {
                key,
                peers,
                certs,
                revs,
            }
        })
    }

    /// A roster built from a choice of entries (indices into the world).
    fn roster_of(certs: &[usize], revs: &[usize]) -> Roster {
        let w = world();
        let mut r = Roster::new(w.key.id());
        for &i in certs {
            r.insert_certificate(w.certs[i % w.certs.len()].clone())
                .unwrap();
        }
        for &i in revs {
            r.insert_revocation(w.revs[i % w.revs.len()].clone())
                .unwrap();
        }
        r
    }

    fn arb_roster() -> impl Strategy<Value = Roster> {
        (
            prop::collection::vec(0usize..64, 0..10),
            prop::collection::vec(0usize..64, 0..3),
        )
            .prop_map(|(c, r)| roster_of(&c, &r))
    }

    enum Entry {
        Cert(Certificate),
        Rev(Revocation),
    }

    fn merged(a: &Roster, b: &Roster) -> Roster {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    proptest! {
        #[test]
        fn merge_is_commutative(a in arb_roster(), b in arb_roster()) {
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
        }

        #[test]
        fn merge_is_associative(a in arb_roster(), b in arb_roster(), c in arb_roster()) {
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
        }

        #[test]
        fn merge_is_idempotent(a in arb_roster(), b in arb_roster()) {
            prop_assert_eq!(merged(&a, &a), a.clone());
            let ab = merged(&a, &b);
            prop_assert_eq!(merged(&ab, &b), ab.clone());
            prop_assert!(merged(&ab, &b).digest() == ab.digest());
        }

        /// Whatever order certificates and a revocation of one peer arrive in, and however
        /// they are split between rosters that are then merged, the peer ends up no member.
        #[test]
        fn a_revocation_wins_over_any_order_of_adds(
            peer in 0usize..4,
            mut order in Just((0usize..7).collect::<Vec<_>>()).prop_shuffle(),
            split in 0usize..8,
            now in 0u64..2_000,
        ) {
            let w = world();
            let p = w.peers[peer];
            // Events 0..6: the peer's three certificates and other peers' certificates;
            // event 6: the revocation of the peer.
            let mut events: Vec<Entry> = (0..3)
                .map(|s| Entry::Cert(w.certs[peer * 3 + s].clone()))
                .collect();
            events.extend((0..3).map(|s| Entry::Cert(w.certs[((peer + 1) % 4) * 3 + s].clone())));
            events.push(Entry::Rev(w.revs[peer * 2].clone()));
            order.truncate(7);
            let (first, second) = order.split_at(split.min(order.len()));
            let mut a = Roster::new(w.key.id());
            let mut b = Roster::new(w.key.id());
            for (target, idxs) in [(&mut a, first), (&mut b, second)] {
                for &i in idxs {
                    match &events[i] {
                        Entry::Cert(c) => { target.insert_certificate(c.clone()).unwrap(); }
                        Entry::Rev(r) => { target.insert_revocation(r.clone()).unwrap(); }
                    }
                }
            }
            let m = merged(&a, &b);
            prop_assert!(!m.is_member(&p, now));
            prop_assert!(m.roles(&p, now).is_none());
            prop_assert!(!m.members(now).contains_key(&p));
            prop_assert!(m.authorize(&p, Topic::Status, now).is_err());
        }
    }

    #[test]
    fn entries_of_another_mesh_or_forged_are_refused_and_change_nothing() {
        let w = world();
        let other = MeshKey::generate();
        let mut r = roster_of(&[0, 1], &[]);
        let before = r.clone();
        let foreign = other.certify(w.peers[2], Roles::default_member(), 5_000, 99);
        assert!(matches!(
            r.insert_certificate(foreign.clone()),
            Err(RosterError::BadCertificate { .. })
        ));
        let mut forged = foreign;
        forged.body.mesh = w.key.id();
        assert!(r.insert_certificate(forged).is_err());
        assert!(r.insert_revocation(other.revoke(w.peers[0], 1)).is_err());
        assert_eq!(r, before);
    }

    #[test]
    fn roles_are_the_union_of_current_certificates_and_expire() {
        let w = world();
        let p = w.peers[0];
        let r = roster_of(&[0, 1], &[]); // render until 1000, default member until 1100
        assert_eq!(r.roles(&p, 900), Some(Roles::default_member()));
        assert_eq!(r.roles(&p, 1_050), Some(Roles::default_member()));
        assert_eq!(r.roles(&p, 1_101), None);
        let render_only = roster_of(&[0], &[]);
        assert!(render_only.authorize(&p, Topic::Status, 10).is_ok());
        assert!(matches!(
            render_only.authorize(&p, Topic::Jobs, 10),
            Err(Unauthorized::MissingRole { .. })
        ));
        assert!(matches!(
            render_only.authorize(&w.peers[1], Topic::Status, 10),
            Err(Unauthorized::NotAMember { .. })
        ));
    }

    #[test]
    fn apply_reports_new_entries_and_errors() {
        let w = world();
        let mut r = Roster::new(w.key.id());
        let other = MeshKey::generate();
        let snap = RosterSnapshot {
            certificates: vec![
                w.certs[0].clone(),
                w.certs[0].clone(),
                other.certify(w.peers[1], Roles::EMPTY, 1, 1),
            ],
            revocations: vec![w.revs[2].clone()],
        };
        let (changes, errors) = r.apply(snap);
        assert_eq!(changes.certificates.len(), 1);
        assert_eq!(changes.revocations.len(), 1);
        assert_eq!(errors.len(), 1);
        let (again, _) = r.apply(r.snapshot());
        assert!(again.is_empty());
    }
}
