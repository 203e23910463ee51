//! BlendNet's pure decision logic. No tokio, no libp2p swarm, no clock, no disk: time is an
//! argument (`now`, Unix seconds) and every function is deterministic, so property tests can
//! drive it with any order of events.
//!
//! - [`roster`]: the member roster, a CRDT of certificates and revocations, and the checks
//!   that gossip must pass (membership and role).
//! - [`invites`]: single-use, expiring invite tokens held by an inviter.
//! - [`picker`]: which piece of a blob to fetch from which provider next.

pub mod invites;
pub mod picker;
pub mod roster;

pub use invites::{Invite, Invites};
pub use roster::{Roster, RosterError, Unauthorized};
