//! The roster: who belongs to the mesh, with which roles.
//!
//! It is a state-based CRDT: a set of certificates and a grow-only set of revocations, merged
//! by union. A peer is a member at time `now` if it holds a current certificate and no
//! revocation names it, so a revocation wins over any certificate, in any order of arrival.
//! Only entries signed by the mesh key get in; everything else is refused with the reason,
//! and changes nothing.
//!
//! Certificates that can no longer change an answer are not kept: those of a revoked peer,
//! and one that another certificate of its peer supersedes (every role of it, for
//! at least as long: a renewal). A cloud instance is re-certified every few hours while it
//! lives, and the mesh never forgets a certificate it keeps, so a grow-only set held every
//! renewal of every instance ever started: some 6,000 certificates make a megabyte, the
//! largest admission offer. What is kept is a function of the union of what was seen, so
//! merging stays commutative, associative and idempotent.

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

/// Whether certificate `a` makes `b` redundant: the same peer, every role of `b`, valid at
/// least as long, and not the same certificate. Of two that grant the same for as long, the
/// greater (in `Ord`) is kept, whichever arrived first. A strict partial order, so that what a
/// roster keeps does not depend on the order entries arrived in.
fn supersedes(a: &Certificate, b: &Certificate) -> bool {
    let (a_body, b_body) = (&a.body, &b.body);
    a_body.peer == b_body.peer
        && a_body.roles.covers(b_body.roles)
        && a_body.not_after >= b_body.not_after
        && (a_body.roles != b_body.roles || a_body.not_after != b_body.not_after || a > b)
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

    /// Adds a certificate after checking its signature. `Ok(true)` if it was new and is
    /// kept (not for a revoked peer, not superseded by one already here); the certificates it
    /// supersedes go.
    pub fn insert_certificate(&mut self, cert: Certificate) -> Result<bool, RosterError> {
        cert.verify(&self.mesh)
            .map_err(|source| RosterError::BadCertificate {
                peer: cert.body.peer,
                source,
            })?;
        Ok(self.keep(cert))
    }

    /// Adds a verified certificate unless it changes nothing; see [`insert_certificate`].
    ///
    /// [`insert_certificate`]: Roster::insert_certificate
    fn keep(&mut self, cert: Certificate) -> bool {
        let peer = cert.body.peer;
        if self.is_revoked(&peer) || self.certificates_of(&peer).any(|c| supersedes(c, &cert)) {
            return false;
        }
        let superseded: Vec<Certificate> = self
            .certificates_of(&peer)
            .filter(|c| supersedes(&cert, c))
            .cloned()
            .collect();
        for old in &superseded {
            self.certificates.remove(old);
        }
        self.certificates.insert(cert)
    }

    /// The certificates of `peer`.
    fn certificates_of<'a>(&'a self, peer: &'a PeerId) -> impl Iterator<Item = &'a Certificate> {
        self.certificates
            .iter()
            .filter(move |c| c.body.peer == *peer)
    }

    /// Records that `rev`'s peer is revoked (if it was not) and drops its certificates.
    fn revoke(&mut self, rev: Revocation) -> bool {
        let peer = rev.body.peer;
        if self.revocations.contains_key(&peer) {
            return false;
        }
        self.certificates.retain(|c| c.body.peer != peer);
        self.revocations.insert(peer, rev);
        true
    }

    /// Adds a revocation after checking its signature. `Ok(true)` if the peer was not yet revoked.
    pub fn insert_revocation(&mut self, rev: Revocation) -> Result<bool, RosterError> {
        rev.verify(&self.mesh)
            .map_err(|source| RosterError::BadRevocation {
                peer: rev.body.peer,
                source,
            })?;
        Ok(self.revoke(rev))
    }

    /// Adds every valid entry of `snapshot`; returns what was new, and the errors of the
    /// entries that were refused (those change nothing).
    pub fn apply(&mut self, snapshot: RosterSnapshot) -> (Changes, Vec<RosterError>) {
        let mut changes = Changes::default();
        let mut errors = Vec::new();
        // Revocations first: a revoked peer's certificates are not kept.
        for rev in snapshot.revocations {
            match self.insert_revocation(rev.clone()) {
                Ok(true) => changes.revocations.push(rev),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        for cert in snapshot.certificates {
            match self.insert_certificate(cert.clone()) {
                Ok(true) => changes.certificates.push(cert),
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
        for (peer, rev) in &other.revocations {
            // Keep the smaller of two revocations of the same peer, so that merge does not
            // depend on the order of arrival (any one revocation is enough).
            match self.revocations.get(peer) {
                Some(mine) if mine <= rev => {}
                Some(_) => {
                    self.revocations.insert(*peer, rev.clone());
                }
                None => {
                    self.revoke(rev.clone());
                    changes.revocations.push(rev.clone());
                }
            }
        }
        for cert in &other.certificates {
            if self.keep(cert.clone()) {
                changes.certificates.push(cert.clone());
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

    /// Certificates the world holds for each of its peers.
    const CERTS_PER_PEER: usize = 5;

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
            let render = Roles::from(Role::Render);
            let member = Roles::default_member();
            let mut certs = Vec::new();
            for (i, p) in peers.iter().enumerate() {
                // Renewals (each supersedes the one before), one that outlasts them with
                // fewer roles (supersedes none of them, nor they it) and a twin (the same grant
                // under another serial).
                let grants = [
                    (render, 1_000),
                    (member, 1_100),
                    (member, 1_200),
                    (render, 1_300),
                    (member, 1_200),
                ];
                assert_eq!(grants.len(), CERTS_PER_PEER);
                for (serial, (roles, not_after)) in grants.into_iter().enumerate() {
                    certs.push(key.certify(*p, roles, not_after, serial as u64 + 10 * i as u64));
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
                .map(|s| Entry::Cert(w.certs[peer * CERTS_PER_PEER + s].clone()))
                .collect();
            events.extend(
                (0..3).map(|s| Entry::Cert(w.certs[((peer + 1) % 4) * CERTS_PER_PEER + s].clone())),
            );
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

        /// The certificates a roster lets go change no answer: at any time, every peer has
        /// the roles that all the certificates it was given would give it.
        #[test]
        fn what_is_not_kept_changes_no_answer(
            certs in prop::collection::vec(0usize..64, 0..12),
            revs in prop::collection::vec(0usize..64, 0..2),
            now in 900u64..1_400,
        ) {
            let w = world();
            let r = roster_of(&certs, &revs);
            let revoked: BTreeSet<PeerId> =
                revs.iter().map(|&i| w.revs[i % w.revs.len()].body.peer).collect();
            for p in &w.peers {
                let all = certs
                    .iter()
                    .map(|&i| &w.certs[i % w.certs.len()])
                    .filter(|c| c.body.peer == *p && c.is_current(now) && !revoked.contains(p))
                    .map(|c| c.body.roles)
                    .reduce(|a, b| a | b);
                prop_assert_eq!(r.roles(p, now), all);
            }
            // And nothing kept is superseded by another kept one.
            let kept = r.snapshot().certificates;
            for a in &kept {
                prop_assert!(!kept.iter().any(|b| supersedes(b, a)));
            }
        }
    }

    #[test]
    fn renewals_replace_what_they_supersede_and_a_revocation_drops_the_rest() {
        let w = world();
        let key = &w.key;
        let instance = PeerId::random();
        let mut r = roster_of(&[0, 5], &[]);
        let others = r.snapshot().certificates.len();
        // An instance re-certified every three hours for a year, each certificate for six.
        for renewal in 0..2_920u64 {
            let cert = key.certify(
                instance,
                Roles::from(Role::Render),
                21_600 + 10_800 * renewal,
                renewal,
            );
            assert!(
                r.insert_certificate(cert).unwrap(),
                "renewal {renewal} is news"
            );
        }
        assert_eq!(
            r.snapshot().certificates.len(),
            others + 1,
            "one certificate per peer"
        );
        // An older one arriving late changes nothing and is not news.
        let late = key.certify(instance, Roles::from(Role::Render), 21_600, 77_777);
        assert!(!r.insert_certificate(late).unwrap());
        assert!(r.is_member(&instance, 21_600 + 10_800 * 2_919));

        // Terminated: revoked; its certificate goes, and none is taken for it again.
        assert!(r.insert_revocation(key.revoke(instance, 5)).unwrap());
        assert_eq!(r.snapshot().certificates.len(), others);
        let again = key.certify(instance, Roles::default_member(), u64::MAX, 1);
        assert!(!r.insert_certificate(again).unwrap());
        assert!(!r.is_member(&instance, 0));
        assert_eq!(r.len(), others + 1);
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
