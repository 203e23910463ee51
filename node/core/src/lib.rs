//! BlendNet's pure decision logic. No tokio, no libp2p swarm, no clock, no disk: time is an
//! argument (`now`: Unix seconds for the roster, milliseconds of the node's monotonic clock for
//! the job board) and every function is deterministic, so property tests can drive it with any
//! order of events.
//!
//! - [`roster`]: the member roster, a CRDT of certificates and revocations, and the checks
//!   that gossip must pass (membership and role).
//! - [`invites`]: single-use, expiring invite tokens held by an inviter.
//! - [`picker`]: which piece of a blob to fetch from which provider next.
//! - [`job`]: a job's tasks, the per-task lattice and cover rule, a job as a function of its
//!   events.
//! - [`sizing`]: how large a sample slice is, and when a straggler deserves a backup.
//! - [`board`]: one peer's job board, coordinator and worker, fed inputs, returning actions.
//! - [`stats`]: where a job's time and money went, summed from its workers' reports.

pub mod board;
pub mod invites;
pub mod job;
pub mod picker;
pub mod roster;
pub mod sizing;
pub mod stats;

pub use board::{
    Action, Board, BoardConfig, BoardError, CancelError, Counters, DropReason, Input, JobDigest,
    JobSummary, JobView, Member, StopReason, SubmitError,
};
pub use invites::{Invite, Invites, token_tag};
pub use job::{Job, JobStatus, TaskState};
pub use roster::{Roster, RosterError, Unauthorized};
pub use stats::{JobClock, JobStats};
