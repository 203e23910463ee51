//! Task sizing: how many samples a new slice of a frame gets, and whether a straggling task is
//! worth a backup copy. Pure arithmetic on measured speeds; the coordinator calls it at grant
//! time.
//!
//! Time is measured in milliseconds per frame-sample (`render_ms / (frames × samples)` from
//! the workers' `Rendered` stats), over the whole job and per worker.

/// Samples in a slice carved while nothing is measured yet: a few seconds on most scenes, so
/// the first measurement comes back quickly, and never more than the fair share.
pub const PROBE_SAMPLES: u32 = 16;

/// A slice is widened to the whole hole when what would be left is under `1 / SLIVER_DIVISOR`
/// of the slice: a task that small costs more in overhead than it saves.
pub const SLIVER_DIVISOR: u32 = 4;

/// A backup must be expected to finish earlier than the straggler by at least
/// `1 / BACKUP_MARGIN_DIVISOR` of its own duration: copying a task that is about to finish
/// anyway only burns a peer.
pub const BACKUP_MARGIN_DIVISOR: u64 = 10;

/// What the coordinator knows when it carves a slice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceInput {
    /// Samples in the hole being carved (the first uncovered range of the frame).
    pub hole: u32,
    /// Frame-samples of the job not yet in any task.
    pub unplanned: u64,
    /// Live peers able to render that hold no lease of the job, the asker included.
    pub idle_peers: u32,
    /// Live peers able to render, busy or not, the asker included.
    pub live_peers: u32,
    /// Frame-samples the job's running tasks are expected still to render (what is left of
    /// each at the measured speeds; all of it while unmeasured).
    pub in_flight: u64,
    /// Measured milliseconds per frame-sample, if any slice has come back.
    pub ms_per_sample: Option<f64>,
    /// The render time a slice should take (the job's `target_task_secs`).
    pub target_ms: u64,
}

/// The number of samples of the next slice: the target time's worth at the measured speed (a
/// probe while unmeasured), but never more than
/// - an even share of the unplanned work among the idle peers, so no idle peer is left
///   without a task, nor
/// - an even share of all the work left (unplanned and still rendering) among all the live
///   peers, so the peers busy now get their part when they ask, and all finish together
///   (without it, a peer asking while the other still rendered its probe took the target
///   time's worth, 2900 of 4096 samples, and the other sat idle for its last 30 s);
///
/// at least 1, at most the hole.
pub fn slice_samples(input: SliceInput) -> u32 {
    let hole = input.hole.max(1);
    let idle = u64::from(input.idle_peers.max(1));
    let live = u64::from(input.live_peers).max(idle);
    let fair = input
        .unplanned
        .div_ceil(idle)
        .min((input.unplanned + input.in_flight).div_ceil(live))
        .clamp(1, u64::from(u32::MAX)) as u32;
    let want = match input.ms_per_sample {
        None => PROBE_SAMPLES,
        Some(ms) if ms <= 0.0 => u32::MAX,
        Some(ms) => (input.target_ms as f64 / ms)
            .floor()
            .clamp(1.0, f64::from(u32::MAX)) as u32,
    };
    let size = want.min(fair).min(hole).max(1);
    if hole - size < size / SLIVER_DIVISOR {
        hole
    } else {
        size
    }
}

/// Expected milliseconds to render `units` frame-samples at `ms_per_unit`.
pub fn expected_ms(units: u64, ms_per_unit: f64) -> u64 {
    (units as f64 * ms_per_unit.max(0.0)).ceil() as u64
}

/// When a lease's task is expected to be done, seen at `now`: its expected finish, or, once
/// overdue, as far past `now` as it is overdue (a task late by a minute is assumed to need
/// another minute: the longer it is late, the less it is trusted).
pub fn expected_end(now: u64, expected_finish: u64) -> u64 {
    if now <= expected_finish {
        expected_finish
    } else {
        now + (now - expected_finish)
    }
}

/// Whether a peer that would render the task in `asker_ms` should get a backup of a task
/// whose holder is expected to finish at `holder_finish`.
pub fn worth_a_backup(now: u64, holder_finish: u64, asker_ms: u64) -> bool {
    let margin = asker_ms / BACKUP_MARGIN_DIVISOR;
    now.saturating_add(asker_ms).saturating_add(margin) < expected_end(now, holder_finish)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input(hole: u32, unplanned: u64, idle: u32, ms: Option<f64>) -> SliceInput {
        SliceInput {
            hole,
            unplanned,
            idle_peers: idle,
            live_peers: idle,
            in_flight: 0,
            ms_per_sample: ms,
            target_ms: 60_000,
        }
    }

    #[test]
    fn the_first_slices_are_probes_then_the_target_time_decides() {
        assert_eq!(slice_samples(input(4096, 4096, 4, None)), PROBE_SAMPLES);
        // 100 ms per sample: 600 samples make a minute.
        assert_eq!(slice_samples(input(4096, 4096, 2, Some(100.0))), 600);
        // A fast scene would make one slice of everything: capped to the fair share.
        assert_eq!(slice_samples(input(4096, 4096, 8, Some(0.5))), 512);
    }

    #[test]
    fn no_idle_peer_is_left_without_work_and_slivers_are_absorbed() {
        // 100 samples left for 10 idle peers: 10 each, however fast the scene.
        assert_eq!(slice_samples(input(100, 100, 10, Some(0.001))), 10);
        // 1000 ms per sample, target 60 s → 60; the hole is 70: 10 left is under a quarter.
        assert_eq!(slice_samples(input(70, 70, 1, Some(1000.0))), 70);
        assert_eq!(slice_samples(input(1, 1, 0, None)), 1);
    }

    #[test]
    fn the_work_left_is_shared_with_the_peers_busy_now() {
        // Two peers; the other still renders the last 10 samples of its probe. 10 ms per
        // sample and 30 s make 3000, but that would leave the other peer 1064: half each.
        let asking = SliceInput {
            live_peers: 2,
            in_flight: 10,
            target_ms: 30_000,
            ..input(4064, 4064, 1, Some(10.0))
        };
        assert_eq!(slice_samples(asking), 2037);
        // The other one asks next, while the first has 1940 left: it takes the rest (the
        // even share, 1984, would leave a sliver of 43).
        let other = SliceInput {
            in_flight: 1940,
            ..asking
        };
        assert_eq!(
            slice_samples(SliceInput {
                hole: 2027,
                unplanned: 2027,
                ..other
            }),
            2027
        );
        // Plenty of work left: the target time decides, as before.
        let plenty = SliceInput {
            live_peers: 2,
            in_flight: 3000,
            target_ms: 30_000,
            ..input(40_000, 40_000, 1, Some(10.0))
        };
        assert_eq!(slice_samples(plenty), 3000);
    }

    #[test]
    fn backups_go_only_to_stragglers() {
        // Holder expected at 100 s; an asker needing 60 s at t=20 s would finish at 86 s.
        assert!(worth_a_backup(20_000, 100_000, 60_000));
        // At t=40 s it would finish at 106 s: no.
        assert!(!worth_a_backup(40_000, 100_000, 60_000));
        // Overdue by 70 s at t=170 s: the holder is now expected at 240 s; a backup ends at 236 s.
        assert!(worth_a_backup(170_000, 100_000, 60_000));
        assert_eq!(expected_end(170_000, 100_000), 240_000);
    }

    proptest! {
        #[test]
        fn a_slice_fits_its_hole_and_the_fair_share(
            hole in 1u32..5000,
            extra in 0u64..100_000,
            idle in 0u32..300,
            busy in 0u32..300,
            in_flight in 0u64..100_000,
            ms in prop::option::of(0.0f64..10_000.0),
            target in 1_000u64..600_000,
        ) {
            let unplanned = u64::from(hole) + extra;
            let i = SliceInput {
                hole, unplanned, idle_peers: idle, live_peers: idle + busy, in_flight,
                ms_per_sample: ms, target_ms: target,
            };
            let n = slice_samples(i);
            prop_assert!(n >= 1 && n <= hole);
            let fair = unplanned.div_ceil(u64::from(idle.max(1)));
            // Over the fair share only by absorbing a sliver of the hole.
            prop_assert!(u64::from(n) <= fair || n == hole);
            if n < hole {
                prop_assert!(u64::from(n) <= fair);
            }
        }
    }
}
