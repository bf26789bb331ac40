//! HA decisions, pure: what an agent does when it loses its lease, and whether the
//! manager may restart a host's VMs elsewhere. The inputs are the lease state and the
//! storage heartbeats (`ferry_model::ha::StorageHeartbeat`); time is passed in.
//!
//! The safety argument: an agent whose lease renewal is `fence_after` old kills its HA
//! VMs unless most hosts lost etcd too, and says so in its heartbeat. The manager
//! restarts a VM elsewhere only once the host's lease has expired (`ttl` > `fence_after`)
//! and either a fence agent confirmed the host is off, or its heartbeat says it fenced
//! itself and no longer runs the VM, or — for a host without a fence device — its
//! heartbeat has been silent past the point where it would have fenced itself. With a
//! device, silence is not enough: a crashed agent leaves its QEMUs running.

use ferry_model::ha::{HaPolicy, RestartCause, RestartLog, StorageHeartbeat};
use ferry_model::{HostName, VmName};

/// The HA clocks, in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaTiming {
    /// Lease renewal and storage heartbeat interval.
    pub heartbeat_ms: u64,
    /// An agent whose last renewal is this old fences itself (unless the outage is everyone's).
    pub fence_after_ms: u64,
    pub lease_ttl_ms: u64,
}

impl HaTiming {
    /// A renewal older than this means the host has lost touch with etcd.
    pub fn renewal_late_ms(&self) -> u64 {
        self.heartbeat_ms * 5 / 2
    }

    /// A heartbeat silent this long belongs to a host that has fenced itself or is gone:
    /// its agent would have fenced at `fence_after`, and it writes every `heartbeat_ms`.
    pub fn silent_after_ms(&self) -> u64 {
        self.fence_after_ms + 2 * self.heartbeat_ms
    }

    /// Heartbeats older than this are of hosts no longer in the cluster.
    pub fn forgotten_after_ms(&self) -> u64 {
        10 * 60 * 1000
    }

    pub fn check(&self) -> Result<(), String> {
        if self.heartbeat_ms == 0 {
            return Err("ha.heartbeat_ms: must be above 0".into());
        }
        if self.fence_after_ms >= self.lease_ttl_ms {
            return Err(format!(
                "ha.fence_after_ms: {} must be below the lease TTL ({} ms): a host must fence \
                 itself before its lease expires",
                self.fence_after_ms, self.lease_ttl_ms
            ));
        }
        if self.fence_after_ms < 2 * self.heartbeat_ms {
            return Err(format!(
                "ha.fence_after_ms: {} must be at least two heartbeats ({} ms), or one late \
                 renewal fences a healthy host",
                self.fence_after_ms,
                2 * self.heartbeat_ms
            ));
        }
        Ok(())
    }
}

impl Default for HaTiming {
    fn default() -> Self {
        HaTiming {
            heartbeat_ms: 1000,
            fence_after_ms: 4000,
            lease_ttl_ms: 6000,
        }
    }
}

/// What an agent does once its last lease renewal is `fence_after` old.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseLoss {
    /// Kill the HA VMs: the cluster will restart them.
    Fence { reason: String },
    /// Keep everything running: etcd or the management network is down for most hosts,
    /// so nobody will restart anything.
    Wait { reason: String },
}

/// `heartbeats` are the slots on the shared pool (this host's own included or not);
/// `None` if they cannot be read, which leaves no way to tell an outage from isolation.
pub fn on_lease_loss(
    me: &HostName,
    heartbeats: Option<&[StorageHeartbeat]>,
    now_ms: u64,
    timing: &HaTiming,
) -> LeaseLoss {
    let Some(heartbeats) = heartbeats else {
        return LeaseLoss::Fence {
            reason: "lost the lease and cannot read the shared storage heartbeats".into(),
        };
    };
    let peers: Vec<&StorageHeartbeat> = heartbeats
        .iter()
        .filter(|beat| &beat.host != me && beat.age_ms(now_ms) < timing.forgotten_after_ms())
        .collect();
    let cut_off = peers
        .iter()
        .filter(|beat| {
            beat.age_ms(now_ms) < timing.silent_after_ms()
                && beat.lease_age_ms(now_ms) > timing.renewal_late_ms()
        })
        .count()
        + 1;
    let cluster = peers.len() + 1;
    if cut_off * 2 > cluster {
        LeaseLoss::Wait {
            reason: format!(
                "{cut_off} of {cluster} hosts lost etcd: a control-plane outage, nothing will \
                 be restarted elsewhere"
            ),
        }
    } else {
        LeaseLoss::Fence {
            reason: format!(
                "lost the lease while {} of {cluster} hosts keep theirs: this host alone is cut off",
                cluster - cut_off
            ),
        }
    }
}

/// What the host's fence device has said, if it has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FenceEvidence {
    /// No device is configured: the storage heartbeat's deadline is the proof.
    NoDevice,
    /// A device exists and has not confirmed the host off (yet).
    Pending,
    ConfirmedOff,
}

/// What the manager concludes about a host whose lease expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostFate {
    /// Its lease is alive.
    Alive,
    /// Off, or silent past its self-fence deadline: every VM may restart elsewhere.
    Dead { reason: String },
    /// It fenced itself: the VMs it no longer runs may restart elsewhere.
    Fenced { running: Vec<VmName> },
    /// Up but cut off from etcd (fresh heartbeat, not fenced): its VMs stay.
    Isolated { reason: String },
    /// Silent, but it has a fence device that has not confirmed it off: its agent may
    /// have crashed with its QEMUs still running, so nothing restarts until it does.
    AwaitingFence { reason: String },
}

pub fn judge_host(
    lease_alive: bool,
    fence: FenceEvidence,
    heartbeat: Option<&StorageHeartbeat>,
    now_ms: u64,
    timing: &HaTiming,
) -> HostFate {
    if lease_alive {
        return HostFate::Alive;
    }
    if fence == FenceEvidence::ConfirmedOff {
        return HostFate::Dead {
            reason: "its fence device confirmed it is off".into(),
        };
    }
    let silent = match heartbeat {
        None => Some("its lease expired and it never wrote a storage heartbeat".to_string()),
        Some(beat) if beat.age_ms(now_ms) >= timing.silent_after_ms() => Some(format!(
            "its lease expired and its storage heartbeat has been silent for {:.1} s",
            beat.age_ms(now_ms) as f64 / 1000.0
        )),
        Some(_) => None,
    };
    let heartbeat = match (heartbeat, silent) {
        (_, Some(reason)) if fence == FenceEvidence::Pending => {
            return HostFate::AwaitingFence { reason }
        }
        (_, Some(reason)) => return HostFate::Dead { reason },
        (Some(beat), None) => beat,
        (None, None) => unreachable!("no heartbeat is silent"),
    };
    let age = heartbeat.age_ms(now_ms);
    if heartbeat.fenced {
        return HostFate::Fenced {
            running: heartbeat.running.clone(),
        };
    }
    HostFate::Isolated {
        reason: format!(
            "its lease expired but it wrote its storage heartbeat {:.1} s ago without fencing",
            age as f64 / 1000.0
        ),
    }
}

/// Whether `vm`, placed on a host of this fate, may be started elsewhere.
pub fn may_restart(fate: &HostFate, vm: &VmName) -> bool {
    match fate {
        HostFate::Dead { .. } => true,
        HostFate::Fenced { running } => !running.contains(vm),
        HostFate::Alive | HostFate::Isolated { .. } | HostFate::AwaitingFence { .. } => false,
    }
}

/// Whether to power a host off through its fence device: its lease expired and it is
/// not writing its storage heartbeat (or never did) and has not said it fenced itself.
/// A fresh, unfenced heartbeat means isolated, not dead: its VMs' isolation response
/// decides, and nobody powers it off.
pub fn wants_fence_device(
    lease_alive: bool,
    heartbeat: Option<&StorageHeartbeat>,
    now_ms: u64,
    timing: &HaTiming,
) -> bool {
    if lease_alive {
        return false;
    }
    match heartbeat {
        None => true,
        Some(beat) => !beat.fenced && beat.age_ms(now_ms) > timing.renewal_late_ms(),
    }
}

/// A VM that fails this many times on one host within [`FAILURE_WINDOW_MS`] moves away.
pub const MOVE_AFTER_FAILURES: usize = 3;
pub const FAILURE_WINDOW_MS: u64 = 10 * 60 * 1000;

/// What follows a VM failure (QEMU exit, guest panic) once it is in the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AfterFailure {
    RestartHere,
    /// An HA VM that keeps failing on this host: restart it on another.
    MoveAway {
        reason: String,
    },
    /// The restart limit is reached: leave it stopped, for a person to look at.
    GiveUp {
        reason: String,
    },
}

/// `log` already holds the failure just seen on `host`.
pub fn after_vm_failure(
    log: &RestartLog,
    host: &HostName,
    policy: &HaPolicy,
    now_ms: u64,
) -> AfterFailure {
    if !policy.enabled {
        // Without HA, the cluster only restarts it in place (with a back-off).
        return AfterFailure::RestartHere;
    }
    if let Err(reason) = restart_allowed(log, policy, now_ms) {
        return AfterFailure::GiveUp { reason };
    }
    let here: Vec<RestartCause> = recent_failures_on(log, host, now_ms)
        .map(|entry| entry.cause)
        .collect();
    if here.len() >= MOVE_AFTER_FAILURES {
        return AfterFailure::MoveAway {
            reason: format!(
                "it failed {} times on {host} within {} minutes (last: {})",
                here.len(),
                FAILURE_WINDOW_MS / 60_000,
                here.last().copied().unwrap_or(RestartCause::QemuExited)
            ),
        };
    }
    AfterFailure::RestartHere
}

/// Whether one more restart stays within the VM's limit: at most `max_restarts`
/// failures and restarts within `restart_window_s` (0: no limit).
pub fn restart_allowed(log: &RestartLog, policy: &HaPolicy, now_ms: u64) -> Result<(), String> {
    if policy.max_restarts == 0 {
        return Ok(());
    }
    let window_ms = policy.restart_window_s.saturating_mul(1000);
    let recent = log
        .entries
        .iter()
        .filter(|entry| now_ms.saturating_sub(entry.at_ms) < window_ms)
        .count();
    if recent > policy.max_restarts as usize {
        return Err(format!(
            "{recent} failures within {} s, more than its limit of {} restarts; left stopped \
             (`ferry vm start` starts it again)",
            policy.restart_window_s, policy.max_restarts
        ));
    }
    Ok(())
}

/// The VM's own failures (not its hosts') on `host` within the failure window.
fn recent_failures_on<'a>(
    log: &'a RestartLog,
    host: &'a HostName,
    now_ms: u64,
) -> impl Iterator<Item = &'a ferry_model::ha::RestartEntry> {
    log.entries.iter().filter(move |entry| {
        &entry.host == host
            && entry.cause != RestartCause::HostFailed
            && now_ms.saturating_sub(entry.at_ms) < FAILURE_WINDOW_MS
    })
}

/// Hosts a VM must not be placed on: the one it is leaving (under its current placement
/// `generation`), and any it failed on repeatedly of late.
pub fn hosts_to_avoid(log: &RestartLog, generation: u64, now_ms: u64) -> Vec<HostName> {
    let mut avoid: Vec<HostName> = log
        .leave
        .iter()
        .filter(|leave| leave.generation == generation)
        .map(|leave| leave.host.clone())
        .collect();
    for entry in &log.entries {
        let failures = recent_failures_on(log, &entry.host, now_ms).count();
        if failures >= MOVE_AFTER_FAILURES && !avoid.contains(&entry.host) {
            avoid.push(entry.host.clone());
        }
    }
    avoid
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: u64 = 10_000_000_000;

    fn beat(host: &str, age_ms: u64, lease_age_ms: u64) -> StorageHeartbeat {
        StorageHeartbeat {
            version: 1,
            host: host.parse().unwrap(),
            at_ms: NOW - age_ms,
            lease_renewed_ms: NOW - lease_age_ms,
            fenced: false,
            running: Vec::new(),
        }
    }

    fn me() -> HostName {
        "host1".parse().unwrap()
    }

    #[test]
    fn a_host_cut_off_alone_fences_and_an_outage_of_most_hosts_waits() {
        let timing = HaTiming::default();
        let healthy = [beat("host2", 300, 800), beat("host3", 500, 200)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&healthy), NOW, &timing),
            LeaseLoss::Fence { .. }
        ));
        let everyone = [beat("host2", 300, 4200), beat("host3", 500, 3900)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&everyone), NOW, &timing),
            LeaseLoss::Wait { .. }
        ));
        // Two of three cut off: a majority, so both keep their VMs.
        let majority = [beat("host2", 300, 4200), beat("host3", 500, 200)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&majority), NOW, &timing),
            LeaseLoss::Wait { .. }
        ));
        // Half is not a majority: 2 of 4 cut off means the other half may restart.
        let half = [
            beat("host2", 300, 4200),
            beat("host3", 500, 200),
            beat("host4", 500, 200),
        ];
        assert!(matches!(
            on_lease_loss(&me(), Some(&half), NOW, &timing),
            LeaseLoss::Fence { .. }
        ));
        assert!(matches!(
            on_lease_loss(&me(), None, NOW, &timing),
            LeaseLoss::Fence { .. }
        ));
    }

    #[test]
    fn a_dead_peer_does_not_count_as_an_outage() {
        let timing = HaTiming::default();
        // host2 is dead (silent), host3 healthy: host1 alone lost etcd among the living.
        let beats = [beat("host2", 9000, 9000), beat("host3", 500, 200)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&beats), NOW, &timing),
            LeaseLoss::Fence { .. }
        ));
    }

    #[test]
    fn a_host_is_restarted_from_only_when_off_fenced_or_silent() {
        let timing = HaTiming::default();
        let vm: VmName = "web".parse().unwrap();
        let fresh = beat("host2", 500, 5000);
        let none = FenceEvidence::NoDevice;
        assert_eq!(judge_host(true, none, None, NOW, &timing), HostFate::Alive);
        let isolated = judge_host(false, none, Some(&fresh), NOW, &timing);
        assert!(matches!(isolated, HostFate::Isolated { .. }));
        assert!(!may_restart(&isolated, &vm));
        let silent = beat("host2", timing.silent_after_ms(), 9000);
        assert!(may_restart(
            &judge_host(false, none, Some(&silent), NOW, &timing),
            &vm
        ));
        // With a fence device, silence is not enough: the agent may be dead and its
        // QEMUs alive. The device's confirmation is.
        let awaiting = judge_host(false, FenceEvidence::Pending, Some(&silent), NOW, &timing);
        assert!(matches!(awaiting, HostFate::AwaitingFence { .. }));
        assert!(!may_restart(&awaiting, &vm));
        assert!(may_restart(
            &judge_host(
                false,
                FenceEvidence::ConfirmedOff,
                Some(&fresh),
                NOW,
                &timing
            ),
            &vm
        ));
        let mut fenced = fresh.clone();
        fenced.fenced = true;
        fenced.running = vec!["db".parse().unwrap()];
        let fate = judge_host(false, FenceEvidence::Pending, Some(&fenced), NOW, &timing);
        assert!(may_restart(&fate, &vm));
        assert!(!may_restart(&fate, &"db".parse().unwrap()));
    }

    fn failures(host: &str, ages_ms: &[u64]) -> RestartLog {
        let mut log = RestartLog::default();
        for age in ages_ms {
            log.push(ferry_model::ha::RestartEntry {
                at_ms: NOW - age,
                host: host.parse().unwrap(),
                cause: RestartCause::QemuExited,
            });
        }
        log
    }

    fn ha_policy() -> HaPolicy {
        HaPolicy {
            enabled: true,
            ..HaPolicy::default()
        }
    }

    #[test]
    fn a_vm_restarts_in_place_twice_then_moves_then_gives_up() {
        let host: HostName = "host1".parse().unwrap();
        let policy = ha_policy();
        assert_eq!(
            after_vm_failure(&failures("host1", &[0]), &host, &policy, NOW),
            AfterFailure::RestartHere
        );
        assert_eq!(
            after_vm_failure(&failures("host1", &[60_000, 0]), &host, &policy, NOW),
            AfterFailure::RestartHere
        );
        let third = failures("host1", &[120_000, 60_000, 0]);
        assert!(matches!(
            after_vm_failure(&third, &host, &policy, NOW),
            AfterFailure::MoveAway { reason } if reason == "it failed 3 times on host1 within 10 minutes (last: QEMU exited)"
        ));
        assert_eq!(hosts_to_avoid(&third, 1, NOW), vec![host.clone()]);
        // Old failures are forgotten: the window is ten minutes.
        let old = failures("host1", &[FAILURE_WINDOW_MS + 1, FAILURE_WINDOW_MS, 0]);
        assert_eq!(
            after_vm_failure(&old, &host, &policy, NOW),
            AfterFailure::RestartHere
        );
        // A VM without HA never leaves its host on its own.
        let plain = HaPolicy::default();
        assert_eq!(
            after_vm_failure(&third, &host, &plain, NOW),
            AfterFailure::RestartHere
        );
        // Six failures in an hour exceed the default limit of five restarts (HA VMs only).
        assert_eq!(
            after_vm_failure(
                &failures(
                    "host1",
                    &[3_000_000, 2_500_000, 2_000_000, 1_500_000, 1_000_000, 0]
                ),
                &host,
                &plain,
                NOW
            ),
            AfterFailure::RestartHere
        );
        let many = failures(
            "host1",
            &[3_000_000, 2_500_000, 2_000_000, 1_500_000, 1_000_000, 0],
        );
        assert!(matches!(
            after_vm_failure(&many, &host, &policy, NOW),
            AfterFailure::GiveUp { .. }
        ));
        let unlimited = HaPolicy {
            max_restarts: 0,
            ..ha_policy()
        };
        assert!(restart_allowed(&many, &unlimited, NOW).is_ok());
    }

    #[test]
    fn only_a_host_that_stopped_writing_is_powered_off_by_its_fence_device() {
        let timing = HaTiming::default();
        assert!(!wants_fence_device(true, None, NOW, &timing));
        assert!(wants_fence_device(false, None, NOW, &timing));
        assert!(!wants_fence_device(
            false,
            Some(&beat("host2", 500, 9000)),
            NOW,
            &timing
        ));
        assert!(wants_fence_device(
            false,
            Some(&beat("host2", 3000, 9000)),
            NOW,
            &timing
        ));
        let mut fenced = beat("host2", 3000, 9000);
        fenced.fenced = true;
        assert!(!wants_fence_device(false, Some(&fenced), NOW, &timing));
    }

    #[test]
    fn timings_that_could_run_a_vm_twice_are_refused() {
        let mut timing = HaTiming::default();
        assert!(timing.check().is_ok());
        timing.fence_after_ms = 6000;
        assert!(timing.check().unwrap_err().contains("below the lease TTL"));
        timing.fence_after_ms = 1500;
        assert!(timing.check().unwrap_err().contains("two heartbeats"));
    }

    proptest! {
        /// Whatever the heartbeats say, a host that sees itself as isolated and one the
        /// manager restarts from never disagree: if the manager may restart a VM from a
        /// host whose heartbeat is fresh, that heartbeat says the host fenced itself and
        /// no longer runs it.
        #[test]
        fn fresh_unfenced_hosts_keep_their_vms(
            age in 0u64..20_000,
            lease_age in 0u64..20_000,
            fenced in any::<bool>(),
            runs in any::<bool>(),
            lease_alive in any::<bool>(),
        ) {
            let timing = HaTiming::default();
            let vm: VmName = "web".parse().unwrap();
            let mut heartbeat = beat("host2", age.min(NOW), lease_age.min(NOW));
            heartbeat.fenced = fenced;
            if runs {
                heartbeat.running = vec![vm.clone()];
            }
            let fate = judge_host(lease_alive, FenceEvidence::NoDevice, Some(&heartbeat), NOW, &timing);
            if may_restart(&fate, &vm) {
                prop_assert!(!lease_alive);
                prop_assert!(age >= timing.silent_after_ms() || (fenced && !runs));
            }
            // With a device that has not confirmed, only the host's own word counts.
            let fate = judge_host(lease_alive, FenceEvidence::Pending, Some(&heartbeat), NOW, &timing);
            if may_restart(&fate, &vm) {
                prop_assert!(!lease_alive && fenced && !runs);
            }
        }

        /// A control-plane outage never fences anyone: when every host lost etcd at
        /// once, each of them decides to wait.
        #[test]
        fn an_outage_for_everyone_fences_no_one(
            hosts in 1usize..8,
            lease_ages in proptest::collection::vec(3_000u64..20_000, 8),
            ages in proptest::collection::vec(0u64..2_000, 8),
        ) {
            let timing = HaTiming::default();
            let beats: Vec<StorageHeartbeat> = (0..hosts)
                .map(|index| beat(&format!("host{}", index + 1), ages[index], lease_ages[index]))
                .collect();
            for index in 0..hosts {
                let me: HostName = format!("host{}", index + 1).parse().unwrap();
                let decision = on_lease_loss(&me, Some(&beats), NOW, &timing);
                prop_assert!(matches!(decision, LeaseLoss::Wait { .. }), "{decision:?}");
            }
        }
    }
}
