//! Cost estimates (DESIGN §9): how long a job takes, and what it costs, on a provider's
//! instances, from a short probe render measured on this machine and the provider's prices.
//! Pure arithmetic: the probe is run by the daemon (`blendnet cost`), the prices come from
//! [`Provider::prices`](crate::Provider::prices).
//!
//! # The model
//!
//! A probe renders the job's first frame a few times on this machine's `cores`: the seconds of
//! one render of `n` samples are `frame_secs + n × sample_secs` (two sample counts give the
//! slope and the intercept), and a worker's first render costs `first_render_secs` more (scene
//! sync and BVH build that later renders keep, `use_persistent_data`). Starting Blender on the
//! scene costs `load_secs`.
//!
//! On an instance type of `C` cores, each instance of `n` pays once: its boot (start, join the
//! mesh, fetch the scene: [`Boot`] per provider), `load_secs`, `first_render_secs`; then it
//! renders its share of the work:
//! - an animation: whole-frame tasks, `⌈frames / n⌉` frames each costing `frame_secs +
//!   samples × sample_secs × cores / C`;
//! - a still split by samples: `samples / n` samples of the frame in slices of about the
//!   job's target task time (each slice pays `frame_secs`), then one merge that starts Blender
//!   again to finish the frame (`load_secs`).
//!
//! **Assumptions, and the main sources of error:**
//! - *Render time is linear in cores*: a sample on `C` cores takes `cores / C` of the time it
//!   took here. Cycles scales well on a CPU, but not perfectly: cloud vCPUs are SMT siblings,
//!   all-core clocks are lower than a lightly loaded machine's, and memory bandwidth is shared.
//!   The high end of the range allows [`SCALING_LOSS`] for a type whose cores differ from the
//!   probe's. This is the largest error for big instance types.
//! - The fixed costs (`frame_secs`, `load_secs`, `first_render_secs`) are mostly single-threaded
//!   (file reading, scene sync, image writing) and do not scale with cores.
//! - A probe on a busy machine measures the machine as busy: the range allows [`PROBE_SPREAD`]
//!   either way.
//! - All `n` instances start together and share the frames evenly. The provisioner starts one
//!   instance while nothing is measured and the rest once the first slices come back, so with
//!   several instances the real run starts slower than this.
//! - The `local` provider's instances share this machine: together they have its cores, not
//!   `n × C` ([`Offer::host_cores`]).
//! - The scene's upload to a cloud instance (the artist's uplink) is not counted.
//!
//! Money: each instance is billed from its launch until it is terminated, which is after the
//! job plus the provisioner's `idle_grace`; `per_hour` is the cheapest zone's price.

use serde::{Deserialize, Serialize};

use crate::policy::{self, Demand, Limits};

/// How much a probe of a few seconds on a shared machine may be off either way, as a fraction
/// of the render time: the spread of repeated `blendnet cost` probes of one scene on a 2-core
/// machine with other builds running was about ±10%.
pub const PROBE_SPREAD: f64 = 0.15;

/// How much slower than linear in cores the rendering may be on an instance type whose cores
/// differ from the probe's (the high end of the range): SMT vCPUs, lower all-core clocks, shared
/// memory bandwidth.
pub const SCALING_LOSS: f64 = 0.3;

/// What a probe measured on this machine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// The cores Blender rendered the probe with (every core of this machine).
    pub cores: u32,
    /// Starting Blender on the scene until it is loaded.
    pub load_secs: f64,
    /// The extra cost of a worker's first render over later ones.
    pub first_render_secs: f64,
    /// The fixed cost of one render of a frame (or slice) besides its samples.
    pub frame_secs: f64,
    /// Seconds per sample of one frame, on `cores` cores. 0 for engines without samples.
    pub sample_secs: f64,
}

impl Probe {
    /// The probe from two warm renders of `low` and `high` samples taking `low_secs` and
    /// `high_secs`, a cold first render of `low` samples taking `cold_secs`, and the scene's
    /// load time. Noise that makes a slope or an intercept negative gives 0.
    pub fn fit(
        cores: u32,
        load_secs: f64,
        low: u32,
        cold_secs: f64,
        low_secs: f64,
        high: u32,
        high_secs: f64,
    ) -> Probe {
        let sample_secs = if high > low {
            ((high_secs - low_secs) / f64::from(high - low)).max(0.0)
        } else {
            0.0
        };
        Probe {
            cores: cores.max(1),
            load_secs: load_secs.max(0.0),
            first_render_secs: (cold_secs - low_secs).max(0.0),
            frame_secs: (low_secs - f64::from(low) * sample_secs).max(0.0),
            sample_secs,
        }
    }
}

/// The job to estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Work {
    pub frames: u32,
    pub samples: u32,
    /// A still split by sample slices (Cycles, one frame); else whole-frame tasks.
    pub split_samples: bool,
    /// The render time a slice aims at (the job's `target_task_secs`).
    pub target_task_secs: u32,
}

/// Time an instance takes from the provisioner's decision to its first render (seconds): the
/// launch, the boot, joining the mesh, finding Blender, fetching the scene.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Boot {
    pub low: f64,
    pub high: f64,
}

impl Boot {
    /// The typical boot of a provider's instances.
    /// - `local`: a daemon on this machine: the provisioner's next tick (0 to 2 s, the daemon's
    ///   `provision::TICK`), `enroll` and joining (under a second), Blender's version and
    ///   devices (about a second), then learning of the job: a board that starts, or that sees
    ///   its first member online, asks a member for the jobs at once. Seen in the end-to-end
    ///   test on a 2-core machine: about 3 s from submission to the first task.
    /// - `aws`, `gcp`: a spot request or insert, a Debian boot, the bootstrap downloading and
    ///   checking a pinned Blender (~300 MB) and `blendnet`, joining: typically 1.5 to 4 minutes
    ///   (not measured here: no cloud is reachable from CI).
    pub fn of(provider: &str) -> Boot {
        match provider {
            "local" => Boot {
                low: 1.5,
                high: 5.0,
            },
            "gcp" => Boot {
                low: 80.0,
                high: 240.0,
            },
            _ => Boot {
                low: 90.0,
                high: 240.0,
            },
        }
    }
}

/// An instance type offered, with its price and how many instances the run gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub instance_type: String,
    pub cores: u32,
    /// US dollars per hour, the cheapest zone.
    pub per_hour: f64,
    pub instances: u32,
    /// The instances all run on one machine of this many cores (the `local` provider).
    pub host_cores: Option<u32>,
}

/// A range, low to high.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub low: f64,
    pub high: f64,
}

impl Range {
    /// The middle of the range.
    pub fn mid(&self) -> f64 {
        (self.low + self.high) / 2.0
    }
}

/// The estimate for one instance type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub instance_type: String,
    pub cores: u32,
    pub instances: u32,
    pub per_hour: f64,
    /// Wall time from submission until the last frame is done, seconds.
    pub secs: Range,
    /// US dollars for all the instances, until the provisioner terminates them.
    pub dollars: Range,
}

/// How many instances the provisioner keeps for the whole job, as it sizes them
/// ([`policy::plan`] with the job's core-seconds as the pending work and nothing live): enough
/// to finish within its horizon, at most `max_instances`, within the budget. With
/// `max_instances` 0 (instances started by hand with `blendnet cloud up`), one. 0 when the
/// budget allows none.
pub fn instances(probe: &Probe, work: &Work, cores: u32, per_hour: f64, limits: &Limits) -> u32 {
    if limits.max_instances == 0 {
        return 1;
    }
    let core_secs = f64::from(work.frames)
        * (probe.frame_secs + f64::from(work.samples) * probe.sample_secs)
        * f64::from(probe.cores);
    let demand = Demand {
        core_secs: Some(core_secs),
        pending: true,
        live_cores: 0,
    };
    let offer = policy::Offer {
        cores: cores.max(1),
        per_hour,
    };
    policy::plan(0, &demand, &[], &offer, limits).launch
}

/// The render seconds of one instance's share (its fixed per-worker costs excluded), at the
/// measured speed scaled linearly in cores.
fn render_secs(probe: &Probe, work: &Work, offer: &Offer) -> f64 {
    let n = offer.instances.max(1);
    let mut cores = f64::from(offer.cores.max(1));
    if let Some(host) = offer.host_cores {
        cores = cores.min(f64::from(host.max(1)) / f64::from(n));
    }
    let sample = probe.sample_secs * f64::from(probe.cores) / cores;
    if work.split_samples {
        let samples = f64::from(work.samples) / f64::from(n);
        let render = samples * sample;
        // The first slice is a probe; the rest aim at the target task time.
        let slices = 1.0 + (render / f64::from(work.target_task_secs.max(1))).floor();
        // Each frame's slices are merged once, by Blender starting again on the scene.
        slices * probe.frame_secs + render + probe.load_secs / f64::from(n)
    } else {
        let frames = f64::from(work.frames.div_ceil(n));
        frames * (probe.frame_secs + f64::from(work.samples) * sample)
    }
}

/// The estimate for `offer` with `boot`, whose instances are billed `idle_grace_secs` after the
/// work is done.
pub fn estimate(
    probe: &Probe,
    work: &Work,
    offer: &Offer,
    boot: Boot,
    idle_grace_secs: u64,
) -> Estimate {
    let render = render_secs(probe, work, offer);
    // Instances on this machine have the probe's cores, shared: no scaling to allow for.
    let loss = if offer.host_cores.is_some() || offer.cores == probe.cores {
        0.0
    } else {
        SCALING_LOSS
    };
    let fixed = probe.load_secs + probe.first_render_secs;
    let secs = Range {
        low: boot.low + fixed + render * (1.0 - PROBE_SPREAD),
        high: boot.high + fixed + render * (1.0 + PROBE_SPREAD) * (1.0 + loss),
    };
    let n = f64::from(offer.instances.max(1));
    let bill = |secs: f64| n * offer.per_hour * (secs + idle_grace_secs as f64) / 3600.0;
    Estimate {
        instance_type: offer.instance_type.clone(),
        cores: offer.cores,
        instances: offer.instances.max(1),
        per_hour: offer.per_hour,
        dollars: Range {
            low: bill(secs.low),
            high: bill(secs.high),
        },
        secs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe() -> Probe {
        // 4 samples: 1.0 s warm, 1.5 s cold; 16 samples: 2.2 s: 0.1 s/sample, 0.6 s fixed.
        Probe::fit(2, 2.0, 4, 1.5, 1.0, 16, 2.2)
    }

    fn offer(cores: u32, instances: u32, host: Option<u32>) -> Offer {
        Offer {
            instance_type: "t".into(),
            cores,
            per_hour: 3.6,
            instances,
            host_cores: host,
        }
    }

    const NO_BOOT: Boot = Boot {
        low: 0.0,
        high: 0.0,
    };

    fn frames(frames: u32, samples: u32) -> Work {
        Work {
            frames,
            samples,
            split_samples: false,
            target_task_secs: 60,
        }
    }

    #[test]
    fn two_probes_give_the_slope_and_the_intercept() {
        let p = probe();
        assert!((p.sample_secs - 0.1).abs() < 1e-9, "{p:?}");
        assert!((p.frame_secs - 0.6).abs() < 1e-9, "{p:?}");
        assert!((p.first_render_secs - 0.5).abs() < 1e-9, "{p:?}");
        // Noise never makes a cost negative.
        let noisy = Probe::fit(2, 1.0, 4, 0.5, 1.0, 16, 0.9);
        assert_eq!((noisy.sample_secs, noisy.first_render_secs), (0.0, 0.0));
        assert!((noisy.frame_secs - 1.0).abs() < 1e-9);
    }

    #[test]
    fn frames_scale_linearly_in_cores_and_split_over_instances() {
        let p = probe();
        // Same machine, one instance: 10 frames × (0.6 + 100 × 0.1) = 106 s, + 2.5 s once.
        let e = estimate(&p, &frames(10, 100), &offer(2, 1, None), NO_BOOT, 0);
        assert!((e.secs.mid() - 108.5).abs() < 1e-6, "{e:?}");
        assert!((e.secs.low - (2.5 + 106.0 * 0.85)).abs() < 1e-6, "{e:?}");
        // Eight times the cores, two instances: 5 frames × (0.6 + 100 × 0.1 / 8).
        let e = estimate(&p, &frames(10, 100), &offer(16, 2, None), NO_BOOT, 0);
        let render = 5.0 * (0.6 + 1.25);
        assert!((e.secs.low - (2.5 + render * 0.85)).abs() < 1e-6, "{e:?}");
        // Other cores: the high end allows the scaling loss.
        assert!(
            (e.secs.high - (2.5 + render * 1.15 * 1.3)).abs() < 1e-6,
            "{e:?}"
        );
    }

    #[test]
    fn instances_on_one_host_share_its_cores() {
        let p = probe();
        let one = estimate(&p, &frames(10, 100), &offer(2, 1, Some(2)), NO_BOOT, 0);
        let two = estimate(&p, &frames(10, 100), &offer(2, 2, Some(2)), NO_BOOT, 0);
        // Two instances on two cores render the samples no faster; only the fixed per-frame
        // costs overlap.
        assert!(two.secs.mid() < one.secs.mid(), "{one:?} {two:?}");
        assert!(two.secs.mid() > one.secs.mid() * 0.9, "{one:?} {two:?}");
    }

    #[test]
    fn a_still_is_sliced_and_merged() {
        let p = probe();
        let still = Work {
            frames: 1,
            samples: 1000,
            split_samples: true,
            target_task_secs: 30,
        };
        // 100 s of samples: a probe slice and 3 more, merged with one more Blender load.
        let e = estimate(&p, &still, &offer(2, 1, None), NO_BOOT, 0);
        let render = 4.0 * 0.6 + 100.0 + 2.0;
        assert!((e.secs.low - (2.5 + render * 0.85)).abs() < 1e-6, "{e:?}");
    }

    #[test]
    fn instances_are_sized_as_the_provisioner_sizes_them() {
        let p = probe();
        let limits = Limits {
            max_instances: 4,
            ..Limits::default()
        };
        // 106 s × 2 cores of work fits one 2-core instance's 10-minute horizon.
        assert_eq!(instances(&p, &frames(10, 100), 2, 1.0, &limits), 1);
        // 100 times more needs 36 cores: capped at 4.
        assert_eq!(instances(&p, &frames(1000, 100), 2, 1.0, &limits), 4);
        // By hand: one. Over budget: none.
        let by_hand = Limits {
            max_instances: 0,
            ..limits.clone()
        };
        assert_eq!(instances(&p, &frames(1000, 100), 2, 1.0, &by_hand), 1);
        let poor = Limits {
            budget_left: Some(0.01),
            ..limits
        };
        assert_eq!(instances(&p, &frames(1000, 100), 2, 1.0, &poor), 0);
    }

    #[test]
    fn money_bills_every_instance_until_the_idle_grace_ends() {
        let p = probe();
        let boot = Boot {
            low: 10.0,
            high: 20.0,
        };
        let e = estimate(&p, &frames(10, 100), &offer(2, 3, None), boot, 300);
        // 3 instances at $3.60/h = $0.003 per second in all.
        assert!(
            (e.dollars.low - 0.003 * (e.secs.low + 300.0)).abs() < 1e-9,
            "{e:?}"
        );
        assert!(
            (e.dollars.high - 0.003 * (e.secs.high + 300.0)).abs() < 1e-9,
            "{e:?}"
        );
        let free = Offer {
            per_hour: 0.0,
            ..offer(2, 1, None)
        };
        assert_eq!(
            estimate(&p, &frames(1, 1), &free, boot, 300).dollars.high,
            0.0
        );
    }
}
