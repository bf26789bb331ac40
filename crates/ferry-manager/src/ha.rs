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

use std::collections::BTreeMap;

use ferry_model::ha::{HaPolicy, ObservedBeat, RestartCause, RestartLog, StorageHeartbeat};
use ferry_model::{HostName, VmName};

/// How often an agent's fencing loop looks at its lease.
pub const FENCE_TICK_MS: u64 = 100;
/// How long self-fencing waits for its SIGKILLed QEMUs to be gone.
pub const KILL_BUDGET_MS: u64 = 1000;

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
        if self.fence_after_ms + FENCE_TICK_MS + KILL_BUDGET_MS >= self.lease_ttl_ms {
            return Err(format!(
                "ha.fence_after_ms: {} plus the fencing loop's tick ({FENCE_TICK_MS} ms) and \
                 its kill budget ({KILL_BUDGET_MS} ms) must end below the lease TTL ({} ms): \
                 a host must have fenced itself before its lease expires",
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

/// Follows every host's heartbeat sequence and when (on this reader's monotonic clock)
/// it last moved: the age of a heartbeat is what this reader saw, never a comparison of
/// two hosts' clocks. A host seen for the first time counts as just written.
#[derive(Clone, Debug, Default)]
pub struct HeartbeatTracker {
    moved: BTreeMap<HostName, (u64, u64)>,
}

impl HeartbeatTracker {
    /// Takes in one read of the slots at `now` (monotonic ms).
    pub fn observe(&mut self, beats: Vec<StorageHeartbeat>, now: u64) -> Vec<ObservedBeat> {
        beats
            .into_iter()
            .map(|beat| {
                let moved = self
                    .moved
                    .entry(beat.host.clone())
                    .or_insert((beat.sequence, now));
                if moved.0 != beat.sequence {
                    *moved = (beat.sequence, now);
                }
                ObservedBeat {
                    silent_ms: now.saturating_sub(moved.1),
                    beat,
                }
            })
            .collect()
    }
}

/// What the reader knows of one host's storage heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeartbeatEvidence<'a> {
    /// The slots could not be read (a stuck or cut pool): nothing is known.
    Unreadable,
    /// The slots were read and this host has none.
    Missing,
    Seen(&'a ObservedBeat),
}

/// `heartbeats` are the slots on the shared pool (this host's own included or not);
/// `None` if they cannot be read, which leaves no way to tell an outage from isolation.
pub fn on_lease_loss(
    me: &HostName,
    heartbeats: Option<&[ObservedBeat]>,
    timing: &HaTiming,
) -> LeaseLoss {
    let Some(heartbeats) = heartbeats else {
        return LeaseLoss::Fence {
            reason: "lost the lease and cannot read the shared storage heartbeats".into(),
        };
    };
    let peers: Vec<&ObservedBeat> = heartbeats
        .iter()
        .filter(|seen| &seen.beat.host != me && seen.silent_ms < timing.forgotten_after_ms())
        .collect();
    let cut_off = peers
        .iter()
        .filter(|seen| {
            seen.silent_ms < timing.silent_after_ms()
                && seen.lease_age_ms() > timing.renewal_late_ms()
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
    /// Off, or silent past the deadline by which its watchdog or its own fencing has
    /// stopped every VM it ran: every VM may restart elsewhere.
    Dead { reason: String },
    /// It fenced itself: the VMs it no longer runs may restart elsewhere.
    Fenced { running: Vec<VmName> },
    /// Up but cut off from etcd (fresh heartbeat, not fenced): its VMs stay.
    Isolated { reason: String },
    /// Nothing proves its VMs stopped (a fence device that has not confirmed, no
    /// watchdog, or heartbeats that cannot be read): nothing restarts until a fence
    /// device confirms it off.
    AwaitingFence { reason: String },
}

/// How long a host's heartbeat must be silent before its VMs are certainly gone: its
/// agent fences itself by `fence_after`, and its watchdog (the proof when the agent
/// hangs) reboots it `watchdog_ms` after the last feed, which came with the last write.
/// `None`: the host has no watchdog, and silence proves nothing (a hung agent leaves
/// its VMs running); only a fence device's confirmation does.
pub fn dead_after_ms(beat: &StorageHeartbeat, timing: &HaTiming) -> Option<u64> {
    let watchdog = beat.watchdog_ms?;
    Some(
        timing
            .silent_after_ms()
            .max(watchdog + 2 * timing.heartbeat_ms),
    )
}

pub fn judge_host(
    lease_alive: bool,
    fence: FenceEvidence,
    heartbeat: HeartbeatEvidence<'_>,
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
    let seen = match heartbeat {
        HeartbeatEvidence::Unreadable => {
            return HostFate::AwaitingFence {
                reason: "its lease expired and the storage heartbeats cannot be read".into(),
            }
        }
        HeartbeatEvidence::Missing => {
            return HostFate::AwaitingFence {
                reason: "its lease expired and it never wrote a storage heartbeat".into(),
            }
        }
        HeartbeatEvidence::Seen(seen) => seen,
    };
    if seen.beat.fenced {
        return HostFate::Fenced {
            running: seen.beat.running.clone(),
        };
    }
    if seen.silent_ms < timing.silent_after_ms() {
        return HostFate::Isolated {
            reason: format!(
                "its lease expired but its storage heartbeat moved {:.1} s ago without fencing",
                seen.silent_ms as f64 / 1000.0
            ),
        };
    }
    let silent = format!(
        "its lease expired and its storage heartbeat has been silent for {:.1} s",
        seen.silent_ms as f64 / 1000.0
    );
    match (fence, dead_after_ms(&seen.beat, timing)) {
        (FenceEvidence::Pending, _) => HostFate::AwaitingFence { reason: silent },
        (_, None) => HostFate::AwaitingFence {
            reason: format!(
                "{silent}, and without a watchdog a hung agent leaves its VMs running; give \
                 the host a fence device or a watchdog"
            ),
        },
        (_, Some(deadline)) if seen.silent_ms < deadline => HostFate::AwaitingFence {
            reason: format!(
                "{silent}; its watchdog stops it by {:.1} s",
                deadline as f64 / 1000.0
            ),
        },
        (_, Some(_)) => HostFate::Dead { reason: silent },
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
/// not writing its storage heartbeat (or never did, or nobody can tell) and has not
/// said it fenced itself. A fresh, unfenced heartbeat means isolated, not dead: its
/// VMs' isolation response decides, and nobody powers it off.
pub fn wants_fence_device(
    lease_alive: bool,
    heartbeat: HeartbeatEvidence<'_>,
    timing: &HaTiming,
) -> bool {
    if lease_alive {
        return false;
    }
    match heartbeat {
        HeartbeatEvidence::Unreadable | HeartbeatEvidence::Missing => true,
        HeartbeatEvidence::Seen(seen) => {
            !seen.beat.fenced && seen.silent_ms > timing.renewal_late_ms()
        }
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

    /// A slot whose sequence this reader has seen stand still for `silent_ms`, written
    /// when its host's lease renewal was `lease_age_ms` old; the host has a watchdog.
    fn beat(host: &str, silent_ms: u64, lease_age_ms: u64) -> ObservedBeat {
        ObservedBeat {
            beat: StorageHeartbeat {
                version: 1,
                host: host.parse().unwrap(),
                sequence: 1,
                at_ms: 0,
                lease_age_ms: Some(lease_age_ms.saturating_sub(silent_ms)),
                watchdog_ms: Some(4000),
                fenced: false,
                running: Vec::new(),
            },
            silent_ms,
        }
    }

    fn seen(beat: &ObservedBeat) -> HeartbeatEvidence<'_> {
        HeartbeatEvidence::Seen(beat)
    }

    fn me() -> HostName {
        "host1".parse().unwrap()
    }

    #[test]
    fn a_host_cut_off_alone_fences_and_an_outage_of_most_hosts_waits() {
        let timing = HaTiming::default();
        let healthy = [beat("host2", 300, 800), beat("host3", 500, 200)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&healthy), &timing),
            LeaseLoss::Fence { .. }
        ));
        let everyone = [beat("host2", 300, 4200), beat("host3", 500, 3900)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&everyone), &timing),
            LeaseLoss::Wait { .. }
        ));
        // Two of three cut off: a majority, so both keep their VMs.
        let majority = [beat("host2", 300, 4200), beat("host3", 500, 200)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&majority), &timing),
            LeaseLoss::Wait { .. }
        ));
        // Half is not a majority: 2 of 4 cut off means the other half may restart.
        let half = [
            beat("host2", 300, 4200),
            beat("host3", 500, 200),
            beat("host4", 500, 200),
        ];
        assert!(matches!(
            on_lease_loss(&me(), Some(&half), &timing),
            LeaseLoss::Fence { .. }
        ));
        assert!(matches!(
            on_lease_loss(&me(), None, &timing),
            LeaseLoss::Fence { .. }
        ));
    }

    #[test]
    fn a_dead_peer_does_not_count_as_an_outage() {
        let timing = HaTiming::default();
        // host2 is dead (silent), host3 healthy: host1 alone lost etcd among the living.
        let beats = [beat("host2", 9000, 9000), beat("host3", 500, 200)];
        assert!(matches!(
            on_lease_loss(&me(), Some(&beats), &timing),
            LeaseLoss::Fence { .. }
        ));
    }

    #[test]
    fn a_host_is_restarted_from_only_when_off_fenced_or_silent() {
        let timing = HaTiming::default();
        let vm: VmName = "web".parse().unwrap();
        let fresh = beat("host2", 500, 5000);
        let none = FenceEvidence::NoDevice;
        assert_eq!(
            judge_host(true, none, HeartbeatEvidence::Missing, &timing),
            HostFate::Alive
        );
        let isolated = judge_host(false, none, seen(&fresh), &timing);
        assert!(matches!(isolated, HostFate::Isolated { .. }));
        assert!(!may_restart(&isolated, &vm));
        let silent = beat("host2", timing.silent_after_ms(), 9000);
        assert!(may_restart(
            &judge_host(false, none, seen(&silent), &timing),
            &vm
        ));
        // With a fence device, silence is not enough: the agent may be dead and its
        // QEMUs alive. The device's confirmation is.
        let awaiting = judge_host(false, FenceEvidence::Pending, seen(&silent), &timing);
        assert!(matches!(awaiting, HostFate::AwaitingFence { .. }));
        assert!(!may_restart(&awaiting, &vm));
        assert!(may_restart(
            &judge_host(false, FenceEvidence::ConfirmedOff, seen(&fresh), &timing),
            &vm
        ));
        let mut fenced = fresh.clone();
        fenced.beat.fenced = true;
        fenced.beat.running = vec!["db".parse().unwrap()];
        let fate = judge_host(false, FenceEvidence::Pending, seen(&fenced), &timing);
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
        assert!(!wants_fence_device(
            true,
            HeartbeatEvidence::Missing,
            &timing
        ));
        assert!(wants_fence_device(
            false,
            HeartbeatEvidence::Missing,
            &timing
        ));
        assert!(wants_fence_device(
            false,
            HeartbeatEvidence::Unreadable,
            &timing
        ));
        assert!(!wants_fence_device(
            false,
            seen(&beat("host2", 500, 9000)),
            &timing
        ));
        assert!(wants_fence_device(
            false,
            seen(&beat("host2", 3000, 9000)),
            &timing
        ));
        let mut fenced = beat("host2", 3000, 9000);
        fenced.beat.fenced = true;
        assert!(!wants_fence_device(false, seen(&fenced), &timing));
    }

    #[test]
    fn unknown_is_never_taken_for_dead() {
        // The heartbeats cannot be read (a hung pool on the leader's side), or the host
        // never wrote one: only its fence device's word restarts its VMs.
        let timing = HaTiming::default();
        let vm: VmName = "web".parse().unwrap();
        for evidence in [HeartbeatEvidence::Unreadable, HeartbeatEvidence::Missing] {
            for fence in [FenceEvidence::NoDevice, FenceEvidence::Pending] {
                let fate = judge_host(false, fence, evidence, &timing);
                assert!(matches!(fate, HostFate::AwaitingFence { .. }), "{fate:?}");
                assert!(!may_restart(&fate, &vm));
            }
            let fate = judge_host(false, FenceEvidence::ConfirmedOff, evidence, &timing);
            assert!(may_restart(&fate, &vm));
        }
    }

    #[test]
    fn a_silent_host_without_a_watchdog_or_a_fence_device_keeps_its_vms() {
        // Its agent may be hung (SIGSTOP) with its QEMUs running: silence proves nothing.
        let timing = HaTiming::default();
        let mut silent = beat("host2", 60_000, 60_000);
        silent.beat.watchdog_ms = None;
        let fate = judge_host(false, FenceEvidence::NoDevice, seen(&silent), &timing);
        assert!(
            matches!(&fate, HostFate::AwaitingFence { reason } if reason.contains("watchdog")),
            "{fate:?}"
        );
        // With a watchdog, the deadline counts its timeout.
        silent.beat.watchdog_ms = Some(10_000);
        silent.silent_ms = 11_000;
        let fate = judge_host(false, FenceEvidence::NoDevice, seen(&silent), &timing);
        assert!(matches!(fate, HostFate::AwaitingFence { .. }), "{fate:?}");
        silent.silent_ms = 12_000;
        let fate = judge_host(false, FenceEvidence::NoDevice, seen(&silent), &timing);
        assert!(matches!(fate, HostFate::Dead { .. }), "{fate:?}");
    }

    #[test]
    fn heartbeat_ages_are_what_the_reader_saw_not_the_writers_clock() {
        let mut tracker = HeartbeatTracker::default();
        let slot = |sequence: u64, at_ms: u64| StorageHeartbeat {
            version: 1,
            host: "host2".parse().unwrap(),
            sequence,
            at_ms,
            lease_age_ms: Some(100),
            watchdog_ms: None,
            fenced: false,
            running: Vec::new(),
        };
        // First sight counts as fresh, whatever time the writer put in.
        let first = tracker.observe(vec![slot(7, 0)], 50_000);
        assert_eq!(first[0].silent_ms, 0);
        // Its wall clock jumps a minute ahead, then back: only the sequence counts.
        assert_eq!(
            tracker.observe(vec![slot(7, 60_000)], 53_000)[0].silent_ms,
            3000
        );
        assert_eq!(tracker.observe(vec![slot(8, 1)], 54_000)[0].silent_ms, 0);
        let later = tracker.observe(vec![slot(8, 1)], 60_000);
        assert_eq!(later[0].silent_ms, 6000);
        assert_eq!(later[0].lease_age_ms(), 6100);
    }

    #[test]
    fn timings_that_could_run_a_vm_twice_are_refused() {
        let mut timing = HaTiming::default();
        assert!(timing.check().is_ok());
        timing.fence_after_ms = 6000;
        assert!(timing.check().unwrap_err().contains("below the lease TTL"));
        // Its kill must land before the TTL too: 4.95 s + a tick + the kill budget does not.
        timing.fence_after_ms = 4950;
        assert!(timing.check().unwrap_err().contains("kill budget"));
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
            let mut heartbeat = beat("host2", age, lease_age);
            heartbeat.beat.fenced = fenced;
            if runs {
                heartbeat.beat.running = vec![vm.clone()];
            }
            let fate = judge_host(lease_alive, FenceEvidence::NoDevice, seen(&heartbeat), &timing);
            if may_restart(&fate, &vm) {
                prop_assert!(!lease_alive);
                prop_assert!(age >= timing.silent_after_ms() || (fenced && !runs));
            }
            // With a device that has not confirmed, only the host's own word counts.
            let fate = judge_host(lease_alive, FenceEvidence::Pending, seen(&heartbeat), &timing);
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
            let beats: Vec<ObservedBeat> = (0..hosts)
                .map(|index| beat(&format!("host{}", index + 1), ages[index], lease_ages[index]))
                .collect();
            for index in 0..hosts {
                let me: HostName = format!("host{}", index + 1).parse().unwrap();
                let decision = on_lease_loss(&me, Some(&beats), &timing);
                prop_assert!(matches!(decision, LeaseLoss::Wait { .. }), "{decision:?}");
            }
        }
    }
}
