//! The piece picker: which piece of a blob to ask which provider for next.
//!
//! A blob is fetched in pieces (runs of chunk groups). The picker knows which pieces this node
//! has verified, which each provider can serve, and which are in flight from whom. It picks
//! the rarest piece a provider can serve (fewest providers hold it), and asks a provider that
//! holds everything (the seeder) only for pieces no fellow fetcher holds, so each piece leaves
//! the seeder about once and the fetchers trade the rest. Ties are broken by a per-node seed,
//! so fetchers starting together ask the seeder for different pieces. A provider may defer a
//! piece ("fetch it elsewhere"); it is not asked again until availability changes. When every
//! missing piece is in flight (the end game), a free provider duplicates a piece that only one
//! other provider is fetching, so one slow provider cannot hold up the end; the first verified
//! copy wins.
//!
//! Pure: no I/O, no clock, generic over the provider id.

use std::collections::{BTreeMap, BTreeSet};

/// What a provider can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Every piece (it holds the whole blob).
    All,
    /// These pieces.
    Pieces(BTreeSet<u64>),
}

impl Availability {
    fn has(&self, piece: u64) -> bool {
        match self {
            Availability::All => true,
            Availability::Pieces(set) => set.contains(&piece),
        }
    }
}

#[derive(Debug, Clone)]
struct Provider {
    availability: Availability,
    in_flight: BTreeSet<u64>,
}

/// The picker for one blob.
#[derive(Debug, Clone)]
pub struct Picker<P: Ord + Clone> {
    pieces: u64,
    seed: u64,
    done: BTreeSet<u64>,
    /// Piece → providers currently fetching it.
    in_flight: BTreeMap<u64, BTreeSet<P>>,
    providers: BTreeMap<P, Provider>,
    /// Most providers fetching one piece at once in the end game.
    max_copies: usize,
    /// (provider, piece) pairs not to ask for until availability changes: the provider said
    /// the piece is better fetched elsewhere.
    deferred: BTreeSet<(P, u64)>,
}

/// A deterministic mix of the seed and a piece index (splitmix64), for tie-breaking.
fn mix(seed: u64, piece: u64) -> u64 {
    let mut z = seed ^ piece.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<P: Ord + Clone> Picker<P> {
    /// A picker for a blob of `pieces` pieces, of which `done` are already verified here.
    /// `seed` should differ between nodes (e.g. derived from the node's id).
    pub fn new(pieces: u64, done: impl IntoIterator<Item = u64>, seed: u64) -> Picker<P> {
        Picker {
            pieces,
            seed,
            done: done.into_iter().filter(|p| *p < pieces).collect(),
            in_flight: BTreeMap::new(),
            providers: BTreeMap::new(),
            max_copies: 2,
            deferred: BTreeSet::new(),
        }
    }

    /// Adds a provider or replaces what it can serve. Deferred pieces may be asked for again:
    /// what the others hold has changed.
    pub fn set_provider(&mut self, provider: P, availability: Availability) {
        self.forget_deferrals();
        let in_flight = self
            .providers
            .remove(&provider)
            .map(|p| p.in_flight)
            .unwrap_or_default();
        self.providers.insert(
            provider,
            Provider {
                availability,
                in_flight,
            },
        );
    }

    /// Removes a provider (gone, or caught serving bad data); its pieces in flight return to
    /// the pool.
    pub fn remove_provider(&mut self, provider: &P) {
        self.forget_deferrals();
        if let Some(p) = self.providers.remove(provider) {
            for piece in p.in_flight {
                self.release(piece, provider);
            }
        }
    }

    /// Deferred pieces may be asked for again: who holds what has changed (a provider came,
    /// went, or turned out not to hold what it announced).
    pub fn forget_deferrals(&mut self) {
        self.deferred.clear();
    }

    fn release(&mut self, piece: u64, provider: &P) {
        if let Some(set) = self.in_flight.get_mut(&piece) {
            set.remove(provider);
            if set.is_empty() {
                self.in_flight.remove(&piece);
            }
        }
    }

    /// How many providers can serve `piece`.
    fn rarity(&self, piece: u64) -> usize {
        self.providers
            .values()
            .filter(|p| p.availability.has(piece))
            .count()
    }

    /// The next piece to ask `provider` for, recording it as in flight; `None` if it has
    /// nothing useful now.
    pub fn next(&mut self, provider: &P) -> Option<u64> {
        let prov = self.providers.get(provider)?;
        // A provider holding everything (the seeder) is asked only for pieces that no partial
        // provider (a fellow fetcher) holds: those can come from the fetchers instead, which
        // keeps the seeder's upload near one copy of the blob.
        let spare_seeder = matches!(prov.availability, Availability::All)
            && self
                .providers
                .iter()
                .any(|(q, p)| q != provider && matches!(p.availability, Availability::Pieces(_)));
        let held_by_a_fetcher = |piece: u64| {
            self.providers.iter().any(|(q, p)| {
                q != provider
                    && matches!(&p.availability, Availability::Pieces(set) if set.contains(&piece))
            })
        };
        let candidates = (0..self.pieces).filter(|piece| {
            !self.done.contains(piece)
                && prov.availability.has(*piece)
                && !prov.in_flight.contains(piece)
                && (!spare_seeder || !held_by_a_fetcher(*piece))
                && !self.deferred.contains(&(provider.clone(), *piece))
        });
        // Fresh pieces first, rarest first, then by the seeded order.
        let fresh = candidates
            .clone()
            .filter(|piece| !self.in_flight.contains_key(piece))
            .min_by_key(|piece| (self.rarity(*piece), mix(self.seed, *piece)));
        let chosen = match fresh {
            Some(piece) => Some(piece),
            // End game: every piece this provider could serve is in flight elsewhere.
            None => candidates
                .filter(|piece| {
                    self.in_flight
                        .get(piece)
                        .is_some_and(|s| s.len() < self.max_copies)
                })
                .min_by_key(|piece| {
                    (
                        self.in_flight.get(piece).map_or(0, BTreeSet::len),
                        mix(self.seed, *piece),
                    )
                }),
        }?;
        self.in_flight
            .entry(chosen)
            .or_default()
            .insert(provider.clone());
        if let Some(p) = self.providers.get_mut(provider) {
            p.in_flight.insert(chosen);
        }
        Some(chosen)
    }

    /// `provider` delivered `piece`, verified. Returns the other providers still fetching it,
    /// whose requests can be cancelled.
    pub fn done(&mut self, provider: &P, piece: u64) -> Vec<P> {
        self.done.insert(piece);
        let others = self.in_flight.remove(&piece).unwrap_or_default();
        for p in &others {
            if let Some(prov) = self.providers.get_mut(p) {
                prov.in_flight.remove(&piece);
            }
        }
        others.into_iter().filter(|p| p != provider).collect()
    }

    /// `provider` failed to deliver `piece`; it goes back to the pool.
    pub fn failed(&mut self, provider: &P, piece: u64) {
        if let Some(prov) = self.providers.get_mut(provider) {
            prov.in_flight.remove(&piece);
        }
        self.release(piece, provider);
    }

    /// `provider` asked that `piece` be fetched elsewhere: it goes back to the pool, and
    /// `provider` is not asked for it again until some provider's availability changes.
    pub fn defer(&mut self, provider: &P, piece: u64) {
        self.failed(provider, piece);
        self.deferred.insert((provider.clone(), piece));
    }

    /// Whether `piece` is verified.
    pub fn is_done(&self, piece: u64) -> bool {
        self.done.contains(&piece)
    }

    /// Whether every piece is verified.
    pub fn is_complete(&self) -> bool {
        self.done.len() as u64 == self.pieces
    }

    /// Pieces still missing.
    pub fn missing(&self) -> u64 {
        self.pieces - self.done.len() as u64
    }

    /// Pieces in flight from `provider`.
    pub fn in_flight_from(&self, provider: &P) -> usize {
        self.providers
            .get(provider)
            .map_or(0, |p| p.in_flight.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_rarest_piece_comes_first_and_seeds_spread_fetchers() {
        let mut p: Picker<&str> = Picker::new(4, [], 1);
        p.set_provider("seeder", Availability::All);
        p.set_provider("peer", Availability::Pieces([0, 1, 2].into()));
        // Piece 3 is held by the seeder alone: rarest.
        assert_eq!(p.next(&"seeder"), Some(3));
        // The peer holds 0..3, all equally rare.
        let a = p.next(&"peer").unwrap();
        assert!(a < 3);

        // Two fetchers with different seeds start on different pieces of a 64-piece blob.
        let first = |seed| {
            let mut p: Picker<&str> = Picker::new(64, [], seed);
            p.set_provider("seeder", Availability::All);
            p.next(&"seeder").unwrap()
        };
        let firsts: BTreeSet<u64> = (0..8).map(first).collect();
        assert!(
            firsts.len() > 4,
            "seeds should spread first picks: {firsts:?}"
        );
    }

    #[test]
    fn the_end_game_duplicates_a_piece_at_most_once_and_the_first_copy_wins() {
        let mut p: Picker<&str> = Picker::new(2, [], 7);
        p.set_provider("a", Availability::All);
        p.set_provider("b", Availability::All);
        let x = p.next(&"a").unwrap();
        let y = p.next(&"b").unwrap();
        assert_ne!(x, y);
        // Everything is in flight: a duplicates b's piece, not its own.
        assert_eq!(p.next(&"a"), Some(y));
        // Two copies in flight each: no third.
        p.set_provider("c", Availability::All);
        assert_eq!(p.next(&"c"), Some(x));
        assert_eq!(p.next(&"c"), None);
        assert_eq!(p.done(&"a", y), vec!["b"]);
        p.failed(&"c", x);
        assert!(!p.is_complete());
        assert_eq!(p.done(&"a", x), Vec::<&str>::new());
        assert!(p.is_complete());
    }

    #[test]
    fn a_deferred_piece_waits_for_news_of_its_holders() {
        let mut p: Picker<&str> = Picker::new(1, [], 3);
        p.set_provider("seeder", Availability::All);
        assert_eq!(p.next(&"seeder"), Some(0));
        p.defer(&"seeder", 0);
        assert_eq!(
            p.next(&"seeder"),
            None,
            "deferred until availability changes"
        );
        p.set_provider("peer", Availability::Pieces([0].into()));
        assert_eq!(
            p.next(&"seeder"),
            None,
            "a fetcher holds it: the seeder is spared"
        );
        assert_eq!(p.next(&"peer"), Some(0));
    }

    #[test]
    fn a_removed_provider_returns_its_pieces() {
        let mut p: Picker<&str> = Picker::new(3, [0], 3);
        p.set_provider("bad", Availability::All);
        let got: BTreeSet<u64> = std::iter::from_fn(|| p.next(&"bad")).take(4).collect();
        assert_eq!(
            got,
            [1, 2].into(),
            "piece 0 is done; 1 and 2 once each, no end game with one provider"
        );
        p.remove_provider(&"bad");
        p.set_provider("good", Availability::All);
        assert!(p.next(&"good").is_some());
        assert!(p.next(&"good").is_some());
        assert_eq!(p.next(&"good"), None);
    }

    proptest! {
        /// Whatever the providers hold and however requests fail, as long as one provider
        /// holding everything stays, every piece ends done, and nothing is fetched from a
        /// provider that cannot serve it.
        #[test]
        fn every_piece_ends_done_while_a_full_provider_lives(
            pieces in 1u64..40,
            holdings in prop::collection::vec(prop::collection::btree_set(0u64..40, 0..40), 0..4),
            failures in prop::collection::vec(any::<bool>(), 0..200),
            seed in any::<u64>(),
        ) {
            let mut p: Picker<usize> = Picker::new(pieces, [], seed);
            p.set_provider(0, Availability::All);
            for (i, h) in holdings.iter().enumerate() {
                p.set_provider(i + 1, Availability::Pieces(h.clone()));
            }
            let mut fail = failures.into_iter();
            let mut rounds = 0;
            while !p.is_complete() {
                rounds += 1;
                prop_assert!(rounds < 10_000, "no progress");
                let mut asked = Vec::new();
                for prov in 0..=holdings.len() {
                    if let Some(piece) = p.next(&prov) {
                        if prov > 0 {
                            prop_assert!(holdings[prov - 1].contains(&piece));
                        }
                        asked.push((prov, piece));
                    }
                }
                prop_assert!(!asked.is_empty(), "stalled with {} missing", p.missing());
                for (prov, piece) in asked {
                    if fail.next().unwrap_or(false) {
                        p.failed(&prov, piece);
                    } else {
                        p.done(&prov, piece);
                    }
                }
            }
        }
    }
}
