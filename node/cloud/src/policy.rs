//! The scaling policy of a provisioning peer: a pure function from what the mesh must render
//! and what it has, to how many instances to start and which to stop. Time is an argument, so
//! the policy is tested without clocks or clouds.
//!
//! - Start instances when the pending work would take the live capacity longer than the
//!   horizon: enough cores to finish it within the horizon, never more instances than
//!   `max_instances` (counting those already started), never more than the budget can pay for
//!   over the horizon (counting what the running ones will cost).
//! - Terminate an instance that joined and has had no task for `idle_grace`, or that never
//!   joined within `join_timeout` (a failed boot must not bill forever).

use serde::{Deserialize, Serialize};

/// The provisioner's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Most instances alive at once.
    pub max_instances: u32,
    /// An idle instance is terminated after this long (seconds).
    pub idle_grace_secs: u64,
    /// An instance that has not joined the mesh this long after launch is terminated.
    pub join_timeout_secs: u64,
    /// Aim to finish the pending work within this long (seconds).
    pub horizon_secs: u64,
    /// Money left to spend on the work (US dollars), if capped.
    pub budget_left: Option<f64>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_instances: 4,
            idle_grace_secs: 300,
            join_timeout_secs: 900,
            horizon_secs: 600,
            budget_left: None,
        }
    }
}

/// What the mesh has to render and can render now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// Render time the pending work needs, on one core (core-seconds): frame-samples not yet
    /// rendered times the measured seconds per frame-sample per core. `None` while nothing is
    /// measured: then one instance is started if there is work and no live capacity.
    pub core_secs: Option<f64>,
    /// Whether any work is pending at all.
    pub pending: bool,
    /// Cores of the live render peers (cloud instances that joined included).
    pub live_cores: u32,
}

/// An instance this provisioner started, as it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Managed {
    pub id: String,
    /// Unix seconds.
    pub launched_at: u64,
    /// When it joined the mesh, if it has.
    pub joined_at: Option<u64>,
    /// Since when it has had no task (None: busy now, or not joined).
    pub idle_since: Option<u64>,
    pub per_hour: f64,
}

/// The instance type new instances get (the provisioner falls through others on capacity
/// errors; the policy sizes by this one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub cores: u32,
    pub per_hour: f64,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Instances to start.
    pub launch: u32,
    /// Instances to terminate, with why.
    pub terminate: Vec<(String, Reason)>,
}

/// Why an instance is terminated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Idle,
    NeverJoined,
}

/// The plan at `now` (Unix seconds).
pub fn plan(
    now: u64,
    demand: &Demand,
    managed: &[Managed],
    offer: &Offer,
    limits: &Limits,
) -> Plan {
    let mut plan = Plan::default();
    for m in managed {
        match (m.joined_at, m.idle_since) {
            (None, _) if now >= m.launched_at.saturating_add(limits.join_timeout_secs) => {
                plan.terminate.push((m.id.clone(), Reason::NeverJoined));
            }
            (Some(_), Some(idle)) if now >= idle.saturating_add(limits.idle_grace_secs) => {
                plan.terminate.push((m.id.clone(), Reason::Idle));
            }
            _ => {}
        }
    }
    if !demand.pending || offer.cores == 0 {
        return plan;
    }
    let staying = managed.len() - plan.terminate.len();
    let room = (limits.max_instances as usize).saturating_sub(staying);
    // Instances started but not joined yet are capacity on its way.
    let coming: u32 = managed
        .iter()
        .filter(|m| m.joined_at.is_none())
        .filter(|m| !plan.terminate.iter().any(|(id, _)| *id == m.id))
        .map(|_| offer.cores)
        .sum();
    let capacity = demand.live_cores + coming;
    let wanted_cores = match demand.core_secs {
        Some(secs) => {
            let needed = (secs / limits.horizon_secs.max(1) as f64).ceil();
            (needed.max(0.0) as u64).saturating_sub(u64::from(capacity))
        }
        None if capacity == 0 => u64::from(offer.cores),
        None => 0,
    };
    let mut launch = wanted_cores
        .div_ceil(u64::from(offer.cores))
        .min(room as u64);
    if let Some(budget) = limits.budget_left {
        let hours = limits.horizon_secs as f64 / 3600.0;
        let committed: f64 = managed
            .iter()
            .filter(|m| !plan.terminate.iter().any(|(id, _)| *id == m.id))
            .map(|m| m.per_hour * hours)
            .sum();
        let each = offer.per_hour * hours;
        let affordable = if each <= 0.0 {
            launch
        } else {
            ((budget - committed) / each).floor().max(0.0) as u64
        };
        launch = launch.min(affordable);
    }
    plan.launch = u32::try_from(launch).unwrap_or(u32::MAX);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OFFER: Offer = Offer {
        cores: 8,
        per_hour: 0.5,
    };

    fn demand(core_secs: Option<f64>, live_cores: u32) -> Demand {
        Demand {
            core_secs,
            pending: true,
            live_cores,
        }
    }

    fn instance(id: &str, joined: Option<u64>, idle: Option<u64>) -> Managed {
        Managed {
            id: id.into(),
            launched_at: 0,
            joined_at: joined,
            idle_since: idle,
            per_hour: 0.5,
        }
    }

    #[test]
    fn enough_instances_start_to_finish_within_the_horizon() {
        let limits = Limits::default();
        // 2 hours of one core over a 10-minute horizon: 12 cores; 2 live: 10 more, 2 instances.
        let p = plan(0, &demand(Some(7200.0), 2), &[], &OFFER, &limits);
        assert_eq!(p.launch, 2);
        // Live capacity that finishes it in time: none.
        assert_eq!(
            plan(0, &demand(Some(600.0), 2), &[], &OFFER, &limits).launch,
            0
        );
        // Unmeasured work on a mesh that cannot render: one, to measure and start.
        assert_eq!(plan(0, &demand(None, 0), &[], &OFFER, &limits).launch, 1);
        assert_eq!(plan(0, &demand(None, 4), &[], &OFFER, &limits).launch, 0);
        // No work: nothing.
        let idle = Demand {
            pending: false,
            ..demand(Some(1e9), 0)
        };
        assert_eq!(plan(0, &idle, &[], &OFFER, &limits), Plan::default());
    }

    #[test]
    fn instances_on_their_way_count_and_the_caps_hold() {
        let limits = Limits::default();
        // Two booting instances bring 16 cores: 12 needed, none more.
        let booting = [instance("a", None, None), instance("b", None, None)];
        assert_eq!(
            plan(10, &demand(Some(7200.0), 0), &booting, &OFFER, &limits).launch,
            0
        );
        // A huge job: up to max_instances in all.
        assert_eq!(
            plan(10, &demand(Some(1e9), 0), &booting, &OFFER, &limits).launch,
            2
        );
        // A budget of $1 over 10 minutes: each instance costs $0.083; the two booting $0.167.
        let tight = Limits {
            budget_left: Some(0.25),
            max_instances: 100,
            ..limits
        };
        assert_eq!(
            plan(10, &demand(Some(1e9), 0), &booting, &OFFER, &tight).launch,
            1
        );
    }

    #[test]
    fn idle_and_never_joined_instances_are_terminated() {
        let limits = Limits::default();
        let managed = [
            instance("busy", Some(10), None),
            instance("idle-briefly", Some(10), Some(700)),
            instance("idle-long", Some(10), Some(500)),
            instance("booting", None, None),
        ];
        let p = plan(850, &demand(Some(0.0), 100), &managed, &OFFER, &limits);
        assert_eq!(p.terminate, vec![("idle-long".to_string(), Reason::Idle)]);
        let p = plan(950, &demand(Some(0.0), 100), &managed, &OFFER, &limits);
        assert_eq!(
            p.terminate,
            vec![
                ("idle-long".to_string(), Reason::Idle),
                ("booting".to_string(), Reason::NeverJoined)
            ]
        );
    }

    proptest! {
        #[test]
        fn never_above_max_instances_or_the_budget(
            core_secs in prop::option::of(0.0f64..1e7),
            live in 0u32..200,
            n in 0usize..12,
            max in 0u32..12,
            budget in prop::option::of(0.0f64..10.0),
            now in 0u64..10_000,
        ) {
            let managed: Vec<Managed> = (0..n)
                .map(|i| Managed {
                    id: format!("i{i}"),
                    launched_at: (i as u64) * 100,
                    joined_at: (i % 2 == 0).then_some((i as u64) * 100 + 50),
                    idle_since: (i % 3 == 0).then_some((i as u64) * 200),
                    per_hour: 0.5,
                })
                .collect();
            let limits = Limits { max_instances: max, budget_left: budget, ..Limits::default() };
            let p = plan(now, &demand(core_secs, live), &managed, &OFFER, &limits);
            let alive = managed.len() - p.terminate.len() + p.launch as usize;
            prop_assert!(p.launch == 0 || alive <= max as usize);
            if let Some(b) = budget {
                let hours = limits.horizon_secs as f64 / 3600.0;
                let spend = alive as f64 * OFFER.per_hour * hours;
                prop_assert!(p.launch == 0 || spend <= b + 1e-9);
            }
            for (id, _) in &p.terminate {
                prop_assert!(managed.iter().any(|m| &m.id == id));
            }
        }
    }
}
