//! A monitor's decisions, without I/O: given each probe's outcome, when the check
//! counts as down, which rung of the ladder runs next, and when the fault is over.
//! The agent probes and acts; this decides.
//!
//! Rules:
//! - a check is down after `failures` failed probes in a row; a success before that
//!   is a lost probe, not a fault, and nothing runs;
//! - each time the check is down, the next attempt of the ladder runs, and the count
//!   starts again, so a step runs only when the one before did not bring the check back;
//! - a success after an action (or after the check was down) ends the fault: the
//!   ladder starts from its first rung at the next fault;
//! - past the last rung, the monitor says so once and then only watches.

use ferry_model::monitor::{Action, Monitor, MonitorState};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tracker {
    /// Failed probes in a row since the last success or action.
    pub failures: u32,
    /// When the current fault's first failed probe happened.
    pub fault_since_ms: Option<u64>,
    /// Attempts of the ladder taken in the current fault.
    pub attempts: u32,
    pub last_action: Option<Action>,
    exhausted_reported: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The check passed and no fault was open.
    Healthy,
    /// A probe failed, not yet `failures` in a row.
    Failing { failures: u32 },
    /// A probe failed once or more, then passed before the count: no action.
    LostProbe { failures: u32 },
    /// Down: run this action (the `attempt`-th of the ladder, 1-based).
    Act {
        action: Action,
        attempt: u32,
        /// From the first failed probe of the fault.
        detected_after_ms: u64,
    },
    /// Down, and the ladder has no rung left (reported once).
    Exhausted { attempts: u32 },
    /// Still down after the ladder ran out; nothing to do.
    StillDown,
    /// The check passed again after a fault: how long the fault lasted and what ran.
    Recovered {
        down_ms: u64,
        attempts: u32,
        last_action: Option<Action>,
    },
}

impl Tracker {
    pub fn observe(&mut self, monitor: &Monitor, passed: bool, now_ms: u64) -> Verdict {
        if passed {
            let verdict = if self.attempts > 0 || self.exhausted_reported {
                Verdict::Recovered {
                    down_ms: now_ms.saturating_sub(self.fault_since_ms.unwrap_or(now_ms)),
                    attempts: self.attempts,
                    last_action: self.last_action,
                }
            } else if self.failures > 0 {
                Verdict::LostProbe {
                    failures: self.failures,
                }
            } else {
                Verdict::Healthy
            };
            *self = Tracker::default();
            return verdict;
        }
        let since = *self.fault_since_ms.get_or_insert(now_ms);
        self.failures += 1;
        if self.failures < monitor.failures {
            return Verdict::Failing {
                failures: self.failures,
            };
        }
        self.failures = 0;
        match monitor.ladder.attempt(self.attempts) {
            Some(action) => {
                self.attempts += 1;
                self.last_action = Some(action);
                Verdict::Act {
                    action,
                    attempt: self.attempts,
                    detected_after_ms: now_ms.saturating_sub(since),
                }
            }
            None if !self.exhausted_reported => {
                self.exhausted_reported = true;
                Verdict::Exhausted {
                    attempts: self.attempts,
                }
            }
            None => Verdict::StillDown,
        }
    }

    /// The state shown in `vm show`.
    pub fn state(&self) -> MonitorState {
        if self.attempts > 0 || self.exhausted_reported {
            MonitorState::Down
        } else if self.failures > 0 {
            MonitorState::Failing
        } else {
            MonitorState::Ok
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::monitor::{Check, Ladder};
    use proptest::prelude::*;

    fn monitor(failures: u32, ladder: &str) -> Monitor {
        Monitor {
            id: "m1".into(),
            check: Check::Heartbeat,
            interval_ms: 1000,
            timeout_ms: 500,
            failures,
            ladder: ladder.parse::<Ladder>().unwrap(),
            restart_command: Some("true".into()),
            builtin: false,
        }
    }

    fn run(tracker: &mut Tracker, monitor: &Monitor, probes: &str) -> Vec<Verdict> {
        probes
            .chars()
            .enumerate()
            .map(|(index, probe)| tracker.observe(monitor, probe == '+', index as u64 * 1000))
            .collect()
    }

    #[test]
    fn a_single_lost_probe_does_not_act() {
        let monitor = monitor(3, "restart-app");
        let mut tracker = Tracker::default();
        let verdicts = run(&mut tracker, &monitor, "+--+");
        assert_eq!(verdicts[3], Verdict::LostProbe { failures: 2 });
        assert!(!verdicts
            .iter()
            .any(|verdict| matches!(verdict, Verdict::Act { .. })));
    }

    #[test]
    fn the_ladder_climbs_only_while_the_check_stays_down() {
        let monitor = monitor(2, "restart-app*2,reset-vm,failover-vm");
        let mut tracker = Tracker::default();
        let actions: Vec<(Action, u32, u64)> = run(&mut tracker, &monitor, "+---------")
            .into_iter()
            .filter_map(|verdict| match verdict {
                Verdict::Act {
                    action,
                    attempt,
                    detected_after_ms,
                } => Some((action, attempt, detected_after_ms)),
                _ => None,
            })
            .collect();
        assert_eq!(
            actions,
            [
                (Action::RestartApp, 1, 1000),
                (Action::RestartApp, 2, 3000),
                (Action::ResetVm, 3, 5000),
                (Action::FailoverVm, 4, 7000)
            ]
        );
        assert_eq!(
            tracker.observe(&monitor, false, 10_000),
            Verdict::Exhausted { attempts: 4 }
        );
        assert_eq!(
            tracker.observe(&monitor, false, 11_000),
            Verdict::Failing { failures: 1 }
        );
        assert_eq!(tracker.observe(&monitor, false, 12_000), Verdict::StillDown);
        assert_eq!(
            tracker.observe(&monitor, true, 13_000),
            Verdict::Recovered {
                down_ms: 12_000,
                attempts: 4,
                last_action: Some(Action::FailoverVm)
            }
        );
    }

    #[test]
    fn a_recovered_fault_starts_the_ladder_again() {
        let monitor = monitor(1, "restart-app,reset-vm");
        let mut tracker = Tracker::default();
        assert!(matches!(
            tracker.observe(&monitor, false, 0),
            Verdict::Act {
                action: Action::RestartApp,
                ..
            }
        ));
        assert!(matches!(
            tracker.observe(&monitor, true, 1000),
            Verdict::Recovered { attempts: 1, .. }
        ));
        assert!(matches!(
            tracker.observe(&monitor, false, 2000),
            Verdict::Act {
                action: Action::RestartApp,
                attempt: 1,
                ..
            }
        ));
    }

    proptest! {
        /// Whatever the probes, an action follows exactly `failures` failed probes in a
        /// row, and no more actions run than the ladder has attempts.
        #[test]
        fn actions_need_a_full_run_of_failures(
            probes in proptest::collection::vec(any::<bool>(), 0..200),
            failures in 1u32..5,
        ) {
            let monitor = monitor(failures, "restart-app*2,reset-vm");
            let mut tracker = Tracker::default();
            let mut in_a_row = 0;
            let mut acted_in_fault = 0;
            for (index, passed) in probes.into_iter().enumerate() {
                let verdict = tracker.observe(&monitor, passed, index as u64);
                if passed {
                    in_a_row = 0;
                    acted_in_fault = 0;
                    continue;
                }
                in_a_row += 1;
                if let Verdict::Act { .. } = verdict {
                    prop_assert_eq!(in_a_row, failures);
                    in_a_row = 0;
                    acted_in_fault += 1;
                    prop_assert!(acted_in_fault <= 3);
                } else if matches!(verdict, Verdict::Exhausted { .. } | Verdict::StillDown) {
                    prop_assert_eq!(in_a_row, failures);
                    in_a_row = 0;
                }
            }
        }
    }
}
