//! The manager's one decision: `plan(&snapshot, timing, now) -> Vec<Action>`, pure.
//!
//! From one [`ClusterSnapshot`] it decides, in this order:
//! - **what cannot be read**: each unreadable record is reported once; a VM whose spec,
//!   placement or restart log is unreadable is unknown and left entirely alone (not
//!   placed, restarted, stopped or counted free), and so is an op about it;
//! - **fencing**: a host that asked to be fenced, or whose lease expired while its
//!   heartbeat is silent (or cannot be read), is powered off through its fence device;
//! - **HA verdicts and restarts**: an HA VM placed on a host without a lease restarts
//!   elsewhere only when `ha::judge_host` proves its copy gone (fence confirmation,
//!   the host's own fencing, or silence past the watchdog's deadline) — unknown never
//!   restarts without a fence confirmation — and within its restart limit;
//! - **placement** of new and restarting VMs (`crate::place`);
//! - **ops**: admission of queued migrations and disk moves, what a dead driver left
//!   (a placement still `Migrating` under a final op, a switch-over whose source died),
//!   and the clean-up of finished ops, their answers and the VMs' op locks.
//!
//! Every action carries what it was decided on (revisions); the executor applies each
//! in one etcd transaction guarded by those revisions and the leader key, and a
//! restart also by the failed host's record staying absent. A stale leader or a changed
//! record makes the transaction fail, and the next pass decides again.

use std::collections::{BTreeMap, BTreeSet};

use ferry_model::cluster::{
    HostRecord, Placement, PlacementMigration, PlacementPhase, PowerState, VmRecord, VmState,
    RECORD_VERSION,
};
use ferry_model::events::EventKind;
use ferry_model::ha::{FenceDevice, FenceProgress, RestartCause, RestartEntry, RestartLog};
use ferry_model::ops::{OpKind, OpRecord, OpState, OpStep};
use ferry_model::{HostName, VmName};
use ferry_store::{ClusterSnapshot, Versioned, VmEntry};

use crate::ha::{
    hosts_to_avoid, judge_host, may_restart, restart_allowed, wants_fence_device, FenceEvidence,
    HaTiming, HeartbeatEvidence, HostFate,
};
use crate::migration::{admit, check_destination, promised_memory, Candidate, Slotted};
use crate::{place, ClusterView, HostSnapshot, Placed, VmSnapshot};

/// Finished ops are kept this long for `ferry op list`, then removed.
pub const OP_KEPT_MS: u64 = 60 * 60 * 1000;
/// At most this many finished ops are kept, however young.
pub const OPS_KEPT: usize = 200;

/// A VM to start elsewhere: the placement it replaces and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Restart {
    pub vm: VmName,
    /// The host it restarts on (chosen by placement).
    pub to: HostName,
    pub from: HostName,
    pub reason: String,
    pub cause: RestartCause,
    /// The placement judged, and its generation.
    pub placement_revision: i64,
    pub generation: u64,
    /// The restart log read with the placement (revision 0: none) and the log as the
    /// restart leaves it: rewritten in the same transaction, so a `ferry vm start` or a
    /// changed request in between cancels the restart instead of racing it.
    pub log_revision: i64,
    pub next_log: RestartLog,
    /// The migration the VM was in when its host died: it ends with the restart.
    pub migration_op: Option<(String, i64, OpRecord)>,
}

impl Restart {
    pub fn placement(&self) -> Placement {
        Placement {
            version: RECORD_VERSION,
            host: self.to.clone(),
            generation: self.generation + 1,
            phase: PlacementPhase::Assigned,
            migration: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// An event, recorded when `dedupe` differs from what was last reported for the
    /// same subject and kind (a verdict is one event, not one per pass).
    Report {
        subject: String,
        kind: EventKind,
        message: String,
        dedupe: String,
    },
    /// Power `host` off through its fence device, retrying until it confirms.
    StartFence {
        host: HostName,
        device: FenceDevice,
    },
    /// The host is back: stop fencing it.
    DropFence {
        host: HostName,
    },
    /// A VM without a placement: create it (only if still absent).
    Place {
        vm: VmName,
        host: HostName,
    },
    Restart(Box<Restart>),
    /// A VM fits nowhere; its status says why.
    CannotPlace {
        vm: VmName,
        reason: String,
    },
    /// It asked to leave a live host that kept failing it, but no other host can take
    /// it: running there again beats not running.
    WithdrawLeave {
        vm: VmName,
        log_revision: i64,
        log: RestartLog,
        message: String,
    },
    /// Its restart limit is reached: desired stopped, for a person to look at.
    HoldStopped {
        vm: VmName,
        spec_revision: i64,
        record: Box<VmRecord>,
        reason: String,
    },
    /// Start a queued op: the op running and (a migration) the placement `Migrating`,
    /// or (a disk move) the placement unchanged, in one transaction.
    AdmitOp {
        op: Box<OpRecord>,
        op_revision: i64,
        vm: VmName,
        placement_revision: i64,
        migrating: Option<Placement>,
    },
    /// Still waiting for a slot; the phase says which.
    QueueOp {
        op: Box<OpRecord>,
        op_revision: i64,
    },
    /// Refused when its turn came; the op's error says why.
    RefuseOp {
        op: Box<OpRecord>,
        op_revision: i64,
        reason: String,
    },
    /// A running op that can no longer finish (its host left); the op's error says why.
    FailOp {
        op: Box<OpRecord>,
        op_revision: i64,
        reason: String,
    },
    /// The source died after the switch-over, before recording it.
    CompleteOp {
        op: Box<OpRecord>,
        op_revision: i64,
    },
    /// A final op left the placement `Migrating`: back to `Assigned` on its source.
    RestorePlacement {
        vm: VmName,
        op_id: String,
        placement_revision: i64,
        restored: Placement,
    },
    /// The op holding the VM is final or gone.
    ReleaseOpLock {
        vm: VmName,
        op_id: String,
        lock_revision: i64,
    },
    /// A finished op past its retention, with its destination's answer.
    DeleteOp {
        op_id: String,
        op_revision: i64,
        incoming_revision: Option<i64>,
    },
    /// A destination's answer to an op that no longer exists.
    DeleteIncoming {
        op_id: String,
        revision: i64,
    },
}

pub fn plan(snapshot: &ClusterSnapshot, timing: &HaTiming, now_ms: u64) -> Vec<Action> {
    let mut actions = Vec::new();
    report_unreadable(snapshot, &mut actions);
    let fate_of = fencing(snapshot, timing, &mut actions);
    let mut restarts = leaving(snapshot);
    restarts.extend(host_failures(snapshot, &fate_of, now_ms, &mut actions));
    placement(snapshot, restarts, now_ms, &mut actions);
    ops(snapshot, now_ms, &mut actions);
    actions
}

fn report(actions: &mut Vec<Action>, subject: String, kind: EventKind, message: String) {
    actions.push(Action::Report {
        subject,
        kind,
        dedupe: message.clone(),
        message,
    });
}

fn report_unreadable(snapshot: &ClusterSnapshot, actions: &mut Vec<Action>) {
    for (host, record) in &snapshot.hosts {
        if let Err(unreadable) = record {
            report(
                actions,
                format!("host/{host}"),
                EventKind::RecordUnreadable,
                format!("host {host}: its record is unreadable ({unreadable}); no VM is placed there until it is"),
            );
        }
    }
    for (name, entry) in &snapshot.vms {
        if let Some(reason) = entry.unknown() {
            report(
                actions,
                format!("vm/{name}"),
                EventKind::RecordUnreadable,
                format!("VM {name}: {reason}; nothing is done with it until it can be read"),
            );
        }
    }
    for (id, op) in &snapshot.ops {
        if let Err(unreadable) = op {
            report(
                actions,
                format!("op/{id}"),
                EventKind::RecordUnreadable,
                format!("op {id}: its record is unreadable ({unreadable}); left as it is"),
            );
        }
    }
}

/// A readable, known VM: its record and its entry.
fn known_vms(snapshot: &ClusterSnapshot) -> impl Iterator<Item = (&VmEntry, &VmRecord)> {
    snapshot.vms.values().filter_map(|entry| {
        if entry.unknown().is_some() {
            return None;
        }
        Some((entry, &entry.record.as_ref()?.value))
    })
}

fn heartbeat_of<'a>(snapshot: &'a ClusterSnapshot, host: &HostName) -> HeartbeatEvidence<'a> {
    match &snapshot.heartbeats {
        None => HeartbeatEvidence::Unreadable,
        Some(beats) => beats
            .iter()
            .find(|seen| &seen.beat.host == host)
            .map_or(HeartbeatEvidence::Missing, HeartbeatEvidence::Seen),
    }
}

/// Fence requests, fences of silent hosts, the reports of fence jobs; and the fate of
/// every host some HA VM waits on.
fn fencing(
    snapshot: &ClusterSnapshot,
    timing: &HaTiming,
    actions: &mut Vec<Action>,
) -> BTreeMap<HostName, HostFate> {
    let mut fencing: BTreeSet<HostName> = snapshot.fences.keys().cloned().collect();
    let requested: BTreeSet<&HostName> = snapshot
        .fence_requests
        .iter()
        .filter(|(_, request)| request.is_ok())
        .map(|(host, _)| host)
        .collect();
    // A host that is back needs no fencing; one that asked keeps its job until it
    // starts again (its agent removes the request).
    for host in snapshot.fences.keys() {
        if snapshot.is_alive(host) && !requested.contains(host) {
            actions.push(Action::DropFence { host: host.clone() });
        }
    }
    let mut start_fence = |actions: &mut Vec<Action>, host: &HostName, why: String| {
        if fencing.contains(host) {
            return;
        }
        match snapshot.fence_devices.get(host) {
            Some(Ok(device)) => {
                fencing.insert(host.clone());
                report(
                    actions,
                    format!("host/{host}"),
                    EventKind::Fencing,
                    format!(
                        "powering host {host} off through its fence device ({}): {why}",
                        device.agent.display()
                    ),
                );
                actions.push(Action::StartFence {
                    host: host.clone(),
                    device: device.clone(),
                });
            }
            Some(Err(unreadable)) => report(
                actions,
                format!("host/{host}"),
                EventKind::FenceFailed,
                format!("host {host} cannot be fenced: its fence device record is unreadable ({unreadable})"),
            ),
            None => {}
        }
    };
    for (host, request) in &snapshot.fence_requests {
        let Ok(request) = request else { continue };
        if !snapshot.fences.contains_key(host) {
            report(
                actions,
                format!("host/{host}"),
                EventKind::FenceRequested,
                format!("host {host} asked to be fenced: {}", request.reason),
            );
        }
        start_fence(actions, host, request.reason.clone());
    }
    for (host, progress) in &snapshot.fences {
        match progress {
            FenceProgress::ConfirmedOff { after_ms } => actions.push(Action::Report {
                subject: format!("host/{host}"),
                kind: EventKind::FencedOff,
                message: format!(
                    "host {host} is off: its fence device confirmed it ({after_ms} ms)"
                ),
                dedupe: "confirmed".into(),
            }),
            FenceProgress::Running {
                attempt,
                last_error: Some(error),
            } => actions.push(Action::Report {
                subject: format!("host/{host}"),
                kind: EventKind::FenceFailed,
                message: format!(
                    "fencing host {host} failed (attempt {}): {error}; retrying until it works",
                    attempt.saturating_sub(1)
                ),
                // The attempt number changes every time; the error is worth a new event.
                dedupe: error.clone(),
            }),
            FenceProgress::Running { .. } => {}
        }
    }
    // The hosts HA VMs are stranded on.
    let stranded: BTreeSet<&HostName> = known_vms(snapshot)
        .filter(|(_, record)| wanted(record))
        .filter_map(|(entry, _)| entry.placement.as_ref())
        .map(|placement| &placement.value.host)
        .filter(|host| !snapshot.is_alive(host))
        .collect();
    let mut fates = BTreeMap::new();
    for host in stranded {
        let heartbeat = heartbeat_of(snapshot, host);
        if wants_fence_device(false, heartbeat, timing) {
            start_fence(
                actions,
                host,
                "its lease expired and its heartbeat is silent".into(),
            );
        }
        let evidence = match (snapshot.fence_devices.get(host), snapshot.fences.get(host)) {
            (_, Some(FenceProgress::ConfirmedOff { .. })) => FenceEvidence::ConfirmedOff,
            // An unreadable device is not "no device": only its confirmation would do.
            (Some(_), _) => FenceEvidence::Pending,
            (None, _) => FenceEvidence::NoDevice,
        };
        let fate = judge_host(false, evidence, heartbeat, timing);
        let verdict = match &fate {
            HostFate::Dead { reason } => format!("host {host} is down: {reason}"),
            HostFate::Fenced { .. } => format!("host {host} fenced itself"),
            HostFate::Isolated { reason } => {
                format!("host {host} is cut off but alive ({reason}); its VMs stay there")
            }
            HostFate::AwaitingFence { reason } => format!(
                "host {host} is silent ({reason}); its VMs restart once its fence device confirms it off"
            ),
            HostFate::Alive => String::new(),
        };
        if !verdict.is_empty() {
            // One event per kind of fate: the reasons carry seconds that grow each pass.
            let kind = match &fate {
                HostFate::Dead { .. } => "dead",
                HostFate::Fenced { .. } => "fenced",
                HostFate::Isolated { .. } => "isolated",
                HostFate::AwaitingFence { .. } => "awaiting a fence",
                HostFate::Alive => "alive",
            };
            actions.push(Action::Report {
                subject: format!("host/{host}"),
                kind: EventKind::HostFate,
                message: verdict,
                dedupe: kind.into(),
            });
        }
        fates.insert(host.clone(), fate);
    }
    fates
}

/// An HA VM that should be running somewhere.
fn wanted(record: &VmRecord) -> bool {
    record.ha.enabled && record.desired == PowerState::Running && !record.deleting
}

/// VMs of dead or fenced hosts that may start elsewhere now, within their limits.
fn host_failures(
    snapshot: &ClusterSnapshot,
    fates: &BTreeMap<HostName, HostFate>,
    now_ms: u64,
    actions: &mut Vec<Action>,
) -> Vec<Restart> {
    let mut restarts = Vec::new();
    for (entry, record) in known_vms(snapshot).filter(|(_, record)| wanted(record)) {
        let Some(placement) = &entry.placement else {
            continue;
        };
        let from = &placement.value.host;
        let Some(fate) = fates.get(from) else {
            continue;
        };
        let vm = &record.spec.name;
        if !may_restart(fate, vm) {
            continue;
        }
        let reason = match fate {
            HostFate::Dead { reason } => format!("host {from} is down: {reason}"),
            _ => format!("host {from} fenced itself"),
        };
        let (log_revision, log) = log_of(entry);
        let mut next_log = log.clone();
        next_log.version = RECORD_VERSION;
        next_log.push(RestartEntry {
            at_ms: now_ms,
            host: from.clone(),
            cause: RestartCause::HostFailed,
        });
        next_log.leave = None;
        if let Err(limit) = restart_allowed(&next_log, &record.ha, now_ms) {
            let Some(spec) = &entry.record else { continue };
            let mut stopped = spec.value.clone();
            stopped.desired = PowerState::Stopped;
            actions.push(Action::HoldStopped {
                vm: vm.clone(),
                spec_revision: spec.mod_revision,
                record: Box::new(stopped),
                reason: format!("VM {vm} is not restarted: {limit}"),
            });
            continue;
        }
        restarts.push(Restart {
            vm: vm.clone(),
            to: from.clone(),
            from: from.clone(),
            reason,
            cause: RestartCause::HostFailed,
            placement_revision: placement.mod_revision,
            generation: placement.value.generation,
            log_revision,
            next_log,
            migration_op: migration_op_of(snapshot, &placement.value),
        });
    }
    restarts
}

/// The op of the migration a placement is in, if it is readable and still open.
fn migration_op_of(
    snapshot: &ClusterSnapshot,
    placement: &Placement,
) -> Option<(String, i64, OpRecord)> {
    let id = &placement.migration.as_ref()?.op;
    let op = snapshot.ops.get(id)?.as_ref().ok()?;
    (!op.value.state.is_final()).then(|| (id.clone(), op.mod_revision, op.value.clone()))
}

fn log_of(entry: &VmEntry) -> (i64, RestartLog) {
    entry
        .restarts
        .as_ref()
        .map_or((0, RestartLog::default()), |log| {
            (log.mod_revision, log.value.clone())
        })
}

/// VMs whose live host gave them up after repeated failures (`RestartLog::leave`
/// names the placement they failed under).
fn leaving(snapshot: &ClusterSnapshot) -> Vec<Restart> {
    known_vms(snapshot)
        .filter_map(|(entry, record)| {
            let placement = entry.placement.as_ref()?;
            let leave = entry.restarts.as_ref()?.value.leave.as_ref()?;
            let current = leave.host == placement.value.host
                && leave.generation == placement.value.generation
                && placement.value.migration.is_none();
            let running = record.desired == PowerState::Running && !record.deleting;
            (current && running).then(|| {
                let (log_revision, log) = log_of(entry);
                let mut next_log = log;
                next_log.version = RECORD_VERSION;
                next_log.leave = None;
                Restart {
                    vm: record.spec.name.clone(),
                    to: leave.host.clone(),
                    from: leave.host.clone(),
                    reason: leave.reason.clone(),
                    cause: RestartCause::QemuExited,
                    placement_revision: placement.mod_revision,
                    generation: placement.value.generation,
                    log_revision,
                    next_log,
                    migration_op: None,
                }
            })
        })
        .collect()
}

fn placement(
    snapshot: &ClusterSnapshot,
    restarts: Vec<Restart>,
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let mut restarts: BTreeMap<VmName, Restart> = restarts
        .into_iter()
        .map(|restart| (restart.vm.clone(), restart))
        .collect();
    let view = ClusterView {
        hosts: snapshot.host_records().map(host_snapshot).collect(),
        vms: known_vms(snapshot)
            .map(|(entry, record)| vm_snapshot(entry, record, &restarts, now_ms))
            .collect(),
    };
    for placed in place(&view) {
        match placed {
            Placed::On { vm, host } => match restarts.remove(&vm) {
                Some(mut restart) => {
                    restart.to = host;
                    actions.push(Action::Restart(Box::new(restart)));
                }
                None => actions.push(Action::Place { vm, host }),
            },
            Placed::Nowhere { vm, reason } => {
                if let Some(restart) = restarts
                    .remove(&vm)
                    .filter(|restart| restart.cause != RestartCause::HostFailed)
                {
                    let mut log = restart.next_log;
                    log.leave = None;
                    actions.push(Action::WithdrawLeave {
                        message: format!(
                            "VM {vm}: no other host can take it ({reason}); it restarts on {}",
                            restart.from
                        ),
                        vm,
                        log_revision: restart.log_revision,
                        log,
                    });
                    continue;
                }
                let already = snapshot
                    .vms
                    .get(vm.as_str())
                    .and_then(|entry| entry.status.as_ref())
                    .is_some_and(|status| {
                        status.value.last_error.as_deref() == Some(reason.as_str())
                    });
                if !already {
                    actions.push(Action::CannotPlace { vm, reason });
                }
            }
        }
    }
}

fn host_snapshot(host: &HostRecord) -> HostSnapshot {
    HostSnapshot {
        name: host.name.clone(),
        cpus: host.cpus,
        memory: host.memory,
        state: host.state,
        pools: host.pools.iter().map(|pool| pool.name.clone()).collect(),
        networks: host.networks.iter().cloned().collect(),
    }
}

fn vm_snapshot(
    entry: &VmEntry,
    record: &VmRecord,
    restarts: &BTreeMap<VmName, Restart>,
    now_ms: u64,
) -> VmSnapshot {
    let generation = entry
        .placement
        .as_ref()
        .map_or(0, |placement| placement.value.generation);
    VmSnapshot {
        name: record.spec.name.clone(),
        cpus: record.spec.cpus,
        memory: record.spec.memory,
        preferred_hosts: record
            .preferred_host
            .iter()
            .chain(&record.ha.preferred_hosts)
            .cloned()
            .collect(),
        anti_affinity: record.ha.anti_affinity.clone(),
        avoid_hosts: entry
            .restarts
            .as_ref()
            .map(|log| hosts_to_avoid(&log.value, generation, now_ms))
            .unwrap_or_default(),
        placed_on: entry
            .placement
            .as_ref()
            .filter(|_| !restarts.contains_key(&record.spec.name))
            .map(|placement| placement.value.host.clone()),
        deleting: record.deleting,
        priority: record.ha.priority,
        needs_pools: record
            .spec
            .disks
            .iter()
            .filter_map(|disk| disk.pool.clone())
            .collect(),
        needs_networks: record
            .spec
            .nics
            .iter()
            .map(|nic| nic.network.clone())
            .collect(),
    }
}

fn ops(snapshot: &ClusterSnapshot, now_ms: u64, actions: &mut Vec<Action>) {
    let records: Vec<&Versioned<OpRecord>> = snapshot.op_records().collect();
    // What dead drivers left.
    for versioned in &records {
        let op = &versioned.value;
        let OpKind::Migrate(migrate) = &op.kind else {
            continue;
        };
        let Some(entry) = snapshot.vms.get(migrate.vm.as_str()) else {
            continue;
        };
        if entry.unknown().is_some() {
            continue;
        }
        let Some(placement) = &entry.placement else {
            continue;
        };
        let still_migrating = placement
            .value
            .migration
            .as_ref()
            .is_some_and(|migration| migration.op == op.id);
        if op.state.is_final() && op.state != OpState::Completed && still_migrating {
            actions.push(Action::RestorePlacement {
                vm: migrate.vm.clone(),
                op_id: op.id.clone(),
                placement_revision: placement.mod_revision,
                restored: Placement {
                    phase: PlacementPhase::Assigned,
                    migration: None,
                    generation: placement.value.generation + 1,
                    ..placement.value.clone()
                },
            });
        }
        let switched =
            placement.value.host == migrate.to && placement.value.phase == PlacementPhase::Assigned;
        if op.state == OpState::Running && switched && !snapshot.is_alive(&migrate.from) {
            let phase = format!(
                "running on {} (the source host left before recording the result)",
                migrate.to
            );
            let done = ended(op, OpState::Completed, &phase, now_ms);
            actions.push(Action::CompleteOp {
                op: Box::new(done),
                op_revision: versioned.mod_revision,
            });
        }
    }
    // A disk move whose host left, or whose VM no longer runs there, has no driver.
    for versioned in &records {
        let op = &versioned.value;
        let OpKind::MoveDisk(move_disk) = &op.kind else {
            continue;
        };
        if op.state != OpState::Running {
            continue;
        }
        let entry = snapshot.vms.get(move_disk.vm.as_str());
        if entry.is_some_and(|entry| entry.unknown().is_some()) {
            continue;
        }
        let placed_there = entry
            .and_then(|entry| entry.placement.as_ref())
            .is_some_and(|placement| placement.value.host == move_disk.host);
        let reason = if !snapshot.is_alive(&move_disk.host) {
            format!("host {} left the cluster", move_disk.host)
        } else if !placed_there {
            format!("VM {} no longer runs on {}", move_disk.vm, move_disk.host)
        } else {
            continue;
        };
        let record = failed(
            op,
            "ended: its host can no longer carry it out",
            &reason,
            now_ms,
        );
        actions.push(Action::FailOp {
            op: Box::new(record),
            op_revision: versioned.mod_revision,
            reason,
        });
    }
    // An op its host carries out at once ends with that host's agent: if the host
    // left, nobody will finish it.
    for versioned in &records {
        let op = &versioned.value;
        let Some(host) = op.kind.inline_host() else {
            continue;
        };
        if op.state != OpState::Running || snapshot.is_alive(host) {
            continue;
        }
        let reason = format!("host {host} left the cluster during the {}", op.kind.name());
        let record = failed(
            op,
            "ended: its host can no longer carry it out",
            &reason,
            now_ms,
        );
        actions.push(Action::FailOp {
            op: Box::new(record),
            op_revision: versioned.mod_revision,
            reason,
        });
    }
    admission(snapshot, &records, now_ms, actions);
    clean_up(snapshot, &records, now_ms, actions);
}

/// The op as it ends, in `state`, with `phase` and (failed) an error.
fn ended(op: &OpRecord, state: OpState, phase: &str, now_ms: u64) -> OpRecord {
    let mut ended = op.clone();
    ended.state = state;
    ended.step = OpStep::Finished;
    ended.phase = phase.into();
    ended.finished_ms = Some(now_ms);
    ended
}

/// The op as it fails, for `reason`.
fn failed(op: &OpRecord, phase: &str, reason: &str, now_ms: u64) -> OpRecord {
    let mut failed = ended(op, OpState::Failed, phase, now_ms);
    failed.error = Some(reason.into());
    failed
}

fn admission(
    snapshot: &ClusterSnapshot,
    records: &[&Versioned<OpRecord>],
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    let open: Vec<&Versioned<OpRecord>> = records
        .iter()
        .copied()
        .filter(|op| !op.value.state.is_final())
        .collect();
    let slotted: Vec<Slotted> = open
        .iter()
        .map(|op| Slotted {
            id: op.value.id.clone(),
            hosts: op.value.kind.hosts().into_iter().cloned().collect(),
            created_ms: op.value.created_ms,
            running: op.value.state == OpState::Running,
        })
        .collect();
    let limits: BTreeMap<HostName, u32> = snapshot
        .host_records()
        .map(|host| (host.name.clone(), host.migration_limit))
        .collect();
    let admitted = admit(&slotted, &limits);
    for versioned in open {
        let op = &versioned.value;
        if op.state != OpState::Queued {
            continue;
        }
        let entry = snapshot.vms.get(op.kind.vm().as_str());
        if entry.is_some_and(|entry| entry.unknown().is_some()) {
            continue;
        }
        if !admitted.contains(&op.id) {
            let busy: Vec<String> = op
                .kind
                .hosts()
                .iter()
                .map(|host| host.to_string())
                .collect();
            let phase = format!(
                "queued: waiting for a migration slot on {}",
                busy.join(" and ")
            );
            if op.phase != phase {
                let mut waiting = op.clone();
                waiting.phase = phase;
                actions.push(Action::QueueOp {
                    op: Box::new(waiting),
                    op_revision: versioned.mod_revision,
                });
            }
            continue;
        }
        match check_op(snapshot, op, entry, records) {
            Ok((placement_revision, migrating)) => {
                let mut running = op.clone();
                running.state = OpState::Running;
                running.started_ms = Some(now_ms);
                running.phase = "starting".into();
                running.step = OpStep::Waiting;
                actions.push(Action::AdmitOp {
                    vm: op.kind.vm().clone(),
                    op: Box::new(running),
                    op_revision: versioned.mod_revision,
                    placement_revision,
                    migrating,
                });
            }
            Err(reason) => {
                let record = failed(op, "refused when its turn came", &reason, now_ms);
                actions.push(Action::RefuseOp {
                    op: Box::new(record),
                    op_revision: versioned.mod_revision,
                    reason,
                });
            }
        }
    }
}

/// Checks a queued op again when its turn comes: the placement revision to guard and,
/// for a migration, the placement that marks it `Migrating`.
fn check_op(
    snapshot: &ClusterSnapshot,
    op: &OpRecord,
    entry: Option<&VmEntry>,
    records: &[&Versioned<OpRecord>],
) -> Result<(i64, Option<Placement>), String> {
    let vm = op.kind.vm();
    let entry = entry.ok_or_else(|| format!("VM {vm} no longer exists"))?;
    let (Some(record), Some(placement)) = (&entry.record, &entry.placement) else {
        return Err(format!("VM {vm} is not placed"));
    };
    let running = entry
        .status
        .as_ref()
        .is_some_and(|status| status.value.state == VmState::Running);
    if !running || record.value.desired != PowerState::Running {
        return Err(format!("VM {vm} is no longer running"));
    }
    if placement.value.phase != PlacementPhase::Assigned {
        return Err(format!("VM {vm} is already migrating"));
    }
    match &op.kind {
        OpKind::Migrate(migrate) => {
            if placement.value.host != migrate.from {
                return Err(format!(
                    "VM {vm} now runs on {}, not {}",
                    placement.value.host, migrate.from
                ));
            }
            let source = snapshot
                .host_record(&migrate.from)
                .ok_or_else(|| format!("host {} left the cluster", migrate.from))?;
            let dest = snapshot.host_record(&migrate.to).ok_or_else(|| {
                format!(
                    "host {} is not in the cluster (unknown, or its agent is down)",
                    migrate.to
                )
            })?;
            let others = records
                .iter()
                .filter(|other| other.value.id != op.id)
                .map(|other| &other.value);
            let used = promised_memory(&snapshot.vms, others)
                .get(&migrate.to)
                .copied()
                .unwrap_or_default();
            let candidate = Candidate {
                vm: &record.value,
                source,
                mode: migrate.mode,
            };
            check_destination(&candidate, dest, used)?;
            Ok((
                placement.mod_revision,
                Some(Placement {
                    phase: PlacementPhase::Migrating,
                    migration: Some(PlacementMigration {
                        to: migrate.to.clone(),
                        op: op.id.clone(),
                    }),
                    ..placement.value.clone()
                }),
            ))
        }
        OpKind::Checkpoint(_) | OpKind::Flatten(_) => {
            Err("an op its host carries out at once is never queued".into())
        }
        OpKind::MoveDisk(move_disk) => {
            if placement.value.host != move_disk.host {
                return Err(format!(
                    "VM {vm} now runs on {}, not {}",
                    placement.value.host, move_disk.host
                ));
            }
            Ok((placement.mod_revision, None))
        }
    }
}

/// Op locks of final or vanished ops; finished ops past their retention (or beyond
/// the most kept), with their answers; answers of ops that are gone.
fn clean_up(
    snapshot: &ClusterSnapshot,
    records: &[&Versioned<OpRecord>],
    now_ms: u64,
    actions: &mut Vec<Action>,
) {
    for (name, entry) in &snapshot.vms {
        let Some(lock) = &entry.op else { continue };
        let Ok(vm) = name.parse::<VmName>() else {
            continue;
        };
        let released = match snapshot.ops.get(&lock.value.op) {
            None => true,
            Some(Ok(op)) => op.value.state.is_final(),
            // Unreadable: it may still be running.
            Some(Err(_)) => false,
        };
        if released {
            actions.push(Action::ReleaseOpLock {
                vm,
                op_id: lock.value.op.clone(),
                lock_revision: lock.mod_revision,
            });
        }
    }
    let mut finished: Vec<&Versioned<OpRecord>> = records
        .iter()
        .copied()
        .filter(|op| op.value.state.is_final())
        .collect();
    // Newest first: the ones beyond the most kept are the oldest.
    finished.sort_by_key(|op| std::cmp::Reverse(op.value.finished_ms.unwrap_or(0)));
    for (index, op) in finished.iter().enumerate() {
        let old = now_ms.saturating_sub(op.value.finished_ms.unwrap_or(0)) > OP_KEPT_MS;
        let still_locking = snapshot
            .vms
            .get(op.value.kind.vm().as_str())
            .and_then(|entry| entry.op.as_ref())
            .is_some_and(|lock| lock.value.op == op.value.id);
        let still_migrating = snapshot
            .vms
            .get(op.value.kind.vm().as_str())
            .and_then(|entry| entry.placement.as_ref())
            .and_then(|placement| placement.value.migration.as_ref())
            .is_some_and(|migration| migration.op == op.value.id);
        if (old || index >= OPS_KEPT) && !still_locking && !still_migrating {
            actions.push(Action::DeleteOp {
                op_id: op.value.id.clone(),
                op_revision: op.mod_revision,
                incoming_revision: snapshot.incoming.get(&op.value.id).copied(),
            });
        }
    }
    for (op_id, revision) in &snapshot.incoming {
        if !snapshot.ops.contains_key(op_id) {
            actions.push(Action::DeleteIncoming {
                op_id: op_id.clone(),
                revision: *revision,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::cluster::{HostState, PoolInfo, VmStatus};
    use ferry_model::ha::{HaPolicy, ObservedBeat, StorageHeartbeat};
    use ferry_model::ops::{MoveDiskOp, OpLock};
    use ferry_model::{Bytes, DiskSpec, VmSpec};
    use ferry_store::{Unreadable, VmPart};
    use proptest::prelude::*;

    const NOW: u64 = 10_000_000_000;

    fn host(name: &str) -> Versioned<HostRecord> {
        Versioned {
            value: HostRecord {
                version: 1,
                name: name.parse().unwrap(),
                api_url: String::new(),
                addresses: Default::default(),
                cpus: 4,
                memory: Bytes::mib(8192),
                cpu_model: "qemu64".into(),
                cpu_features: Vec::new(),
                cpu_models: Default::default(),
                accel: "tcg".into(),
                pools: vec![PoolInfo {
                    name: "shared".into(),
                    path: "/pool".into(),
                    shared: true,
                }],
                networks: Vec::new(),
                state: HostState::Active,
                migration_limit: 2,
                started_ms: 0,
            },
            mod_revision: 1,
        }
    }

    fn ha_vm(name: &str, on: &str) -> VmEntry {
        let mut spec = VmSpec::minimal(name.parse().unwrap());
        spec.disks.push(DiskSpec {
            id: "root".into(),
            path: format!("/pool/vms/{name}/root.qcow2").into(),
            format: Default::default(),
            cache: Default::default(),
            read_only: false,
            size: None,
            bus: Default::default(),
            pool: Some("shared".into()),
            base: None,
        });
        VmEntry {
            record: Some(Versioned {
                value: VmRecord {
                    version: 1,
                    spec,
                    desired: PowerState::Running,
                    image: "appliance".into(),
                    preferred_host: None,
                    ip: None,
                    addresses: Vec::new(),
                    deleting: false,
                    reset_serial: 0,
                    resume_checkpoint: None,
                    migration: Default::default(),
                    ha: HaPolicy {
                        enabled: true,
                        ..HaPolicy::default()
                    },
                    project: ferry_model::access::default_project(),
                },
                mod_revision: 10,
            }),
            placement: Some(Versioned {
                value: Placement {
                    version: 1,
                    host: on.parse().unwrap(),
                    generation: 3,
                    phase: PlacementPhase::Assigned,
                    migration: None,
                },
                mod_revision: 11,
            }),
            status: Some(Versioned {
                value: VmStatus {
                    version: 1,
                    host: Some(on.parse().unwrap()),
                    state: VmState::Running,
                    pid: Some(1),
                    guest_agent: true,
                    last_error: None,
                    updated_ms: 0,
                },
                mod_revision: 12,
            }),
            ..VmEntry::default()
        }
    }

    fn silent(host: &str, silent_ms: u64) -> ObservedBeat {
        ObservedBeat {
            beat: StorageHeartbeat {
                version: 1,
                host: host.parse().unwrap(),
                sequence: 1,
                at_ms: 0,
                lease_age_ms: Some(0),
                watchdog_ms: Some(4000),
                fenced: false,
                running: Vec::new(),
            },
            silent_ms,
        }
    }

    /// host1 and host2 alive, host3 dead (no lease) with VM `web` placed on it.
    fn cluster() -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot::default();
        for name in ["host1", "host2"] {
            snapshot.hosts.insert(name.parse().unwrap(), Ok(host(name)));
        }
        snapshot.vms.insert("web".into(), ha_vm("web", "host3"));
        snapshot.heartbeats = Some(vec![silent("host3", 60_000)]);
        snapshot
    }

    fn restarts(actions: &[Action]) -> Vec<&Restart> {
        actions
            .iter()
            .filter_map(|action| match action {
                Action::Restart(restart) => Some(&**restart),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dead_hosts_vm_restarts_guarded_by_what_was_judged() {
        let actions = plan(&cluster(), &HaTiming::default(), NOW);
        let [restart] = restarts(&actions)[..] else {
            panic!("{actions:#?}")
        };
        assert_eq!(restart.vm.as_str(), "web");
        assert_eq!(restart.from.as_str(), "host3");
        assert_ne!(restart.to.as_str(), "host3");
        // The executor guards on these: the placement and log judged, and host3 absent.
        assert_eq!((restart.placement_revision, restart.generation), (11, 3));
        assert_eq!(restart.cause, RestartCause::HostFailed);
        assert_eq!(restart.placement().generation, 4);
    }

    #[test]
    fn heartbeats_that_cannot_be_read_restart_nothing_without_a_fence_confirmation() {
        let mut snapshot = cluster();
        snapshot.heartbeats = None;
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert!(restarts(&actions).is_empty(), "{actions:#?}");
        assert!(actions.iter().any(|action| matches!(
            action,
            Action::Report { kind: EventKind::HostFate, message, .. } if message.contains("cannot be read")
        )));
        // With a device, the leader fences; its confirmation is the proof.
        snapshot.fence_devices.insert(
            "host3".parse().unwrap(),
            Ok(FenceDevice {
                version: 1,
                host: "host3".parse().unwrap(),
                agent: "/usr/sbin/fence_x".into(),
                options: Default::default(),
                timeout_ms: 1000,
            }),
        );
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert!(actions.iter().any(
            |action| matches!(action, Action::StartFence { host, .. } if host.as_str() == "host3")
        ));
        assert!(restarts(&actions).is_empty());
        snapshot.fences.insert(
            "host3".parse().unwrap(),
            FenceProgress::ConfirmedOff { after_ms: 300 },
        );
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert_eq!(restarts(&actions).len(), 1, "{actions:#?}");
    }

    #[test]
    fn an_unreadable_record_is_left_alone_and_the_others_carry_on() {
        let mut snapshot = cluster();
        // A newer Ferry's placement for `db`, on the dead host too; and a new VM.
        let mut db = ha_vm("db", "host3");
        db.placement = None;
        db.unreadable
            .insert(VmPart::Placement, "record version 2 is newer".into());
        snapshot.vms.insert("db".into(), db);
        let mut fresh = ha_vm("new", "host1");
        fresh.placement = None;
        snapshot.vms.insert("new".into(), fresh);
        snapshot.hosts.insert(
            "host4".parse().unwrap(),
            Err(Unreadable {
                key: "/ferry/hosts/host4".into(),
                reason: "garbage".into(),
            }),
        );
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        let touched = |name: &str| {
            actions.iter().any(|action| match action {
                Action::Place { vm, .. } | Action::CannotPlace { vm, .. } => vm.as_str() == name,
                Action::Restart(restart) => restart.vm.as_str() == name,
                _ => false,
            })
        };
        assert!(!touched("db"), "{actions:#?}");
        assert!(touched("web") && touched("new"), "{actions:#?}");
        // host4 is alive (its key exists) but nothing is placed on it.
        assert!(!actions.iter().any(|action| matches!(
            action,
            Action::Place { host, .. } if host.as_str() == "host4"
        )));
        let reported: Vec<&str> = actions
            .iter()
            .filter_map(|action| match action {
                Action::Report {
                    kind: EventKind::RecordUnreadable,
                    subject,
                    ..
                } => Some(subject.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(reported, ["host/host4", "vm/db"]);
    }

    #[test]
    fn a_restart_goes_only_where_the_vms_disks_are() {
        let mut snapshot = cluster();
        if let Some(Ok(host)) = snapshot.hosts.get_mut(&"host1".parse().unwrap()) {
            host.value.pools.clear();
        }
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        let [restart] = restarts(&actions)[..] else {
            panic!("{actions:#?}")
        };
        assert_eq!(restart.to.as_str(), "host2");
        if let Some(Ok(host)) = snapshot.hosts.get_mut(&"host2".parse().unwrap()) {
            host.value.pools.clear();
        }
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert!(restarts(&actions).is_empty());
        assert!(actions.iter().any(|action| matches!(
            action,
            Action::CannotPlace { reason, .. } if reason.contains("pool shared")
        )));
    }

    fn move_disk_op(id: &str, state: OpState, finished_ms: Option<u64>) -> Versioned<OpRecord> {
        Versioned {
            value: OpRecord {
                version: 1,
                id: id.into(),
                kind: OpKind::MoveDisk(MoveDiskOp {
                    vm: "web".parse().unwrap(),
                    host: "host1".parse().unwrap(),
                    disk: "root".into(),
                    from: "/a".into(),
                    to: "/b".into(),
                    to_pool: "other".into(),
                }),
                state,
                phase: String::new(),
                step: OpStep::Waiting,
                created_ms: 0,
                started_ms: None,
                finished_ms,
                progress: None,
                outcome: None,
                error: None,
                cancel_requested: false,
            },
            mod_revision: 40,
        }
    }

    #[test]
    fn a_disk_move_is_admitted_against_the_placement_it_read() {
        let mut snapshot = cluster();
        snapshot.vms.insert("web".into(), ha_vm("web", "host1"));
        snapshot.ops.insert(
            "op-1".into(),
            Ok(move_disk_op("op-1", OpState::Queued, None)),
        );
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert!(
            actions.iter().any(|action| matches!(
                action,
                Action::AdmitOp {
                    placement_revision: 11,
                    migrating: None,
                    ..
                }
            )),
            "{actions:#?}"
        );
    }

    #[test]
    fn finished_ops_their_answers_and_locks_are_cleaned_up() {
        let mut snapshot = cluster();
        let hour = OP_KEPT_MS;
        snapshot.ops.insert(
            "op-old".into(),
            Ok(move_disk_op(
                "op-old",
                OpState::Completed,
                Some(NOW - hour - 1),
            )),
        );
        snapshot.ops.insert(
            "op-young".into(),
            Ok(move_disk_op("op-young", OpState::Failed, Some(NOW - 1000))),
        );
        snapshot.incoming.insert("op-old".into(), 50);
        snapshot.incoming.insert("op-gone".into(), 51);
        if let Some(web) = snapshot.vms.get_mut("web") {
            web.op = Some(Versioned {
                value: OpLock {
                    version: 1,
                    op: "op-young".into(),
                },
                mod_revision: 60,
            });
        }
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert!(actions.contains(&Action::DeleteOp {
            op_id: "op-old".into(),
            op_revision: 40,
            incoming_revision: Some(50),
        }));
        assert!(actions.contains(&Action::DeleteIncoming {
            op_id: "op-gone".into(),
            revision: 51,
        }));
        assert!(actions.contains(&Action::ReleaseOpLock {
            vm: "web".parse().unwrap(),
            op_id: "op-young".into(),
            lock_revision: 60,
        }));
        assert!(!actions
            .iter()
            .any(|action| matches!(action, Action::DeleteOp { op_id, .. } if op_id == "op-young")));
    }

    #[test]
    fn a_hosts_fate_is_one_event_however_long_it_stays_silent() {
        let mut snapshot = cluster();
        snapshot.fence_devices.insert(
            "host3".parse().unwrap(),
            Ok(FenceDevice {
                version: 1,
                host: "host3".parse().unwrap(),
                agent: "/x".into(),
                options: Default::default(),
                timeout_ms: 1,
            }),
        );
        let dedupes = |snapshot: &ClusterSnapshot| -> Vec<String> {
            plan(snapshot, &HaTiming::default(), NOW)
                .into_iter()
                .filter_map(|action| match action {
                    Action::Report {
                        kind: EventKind::HostFate,
                        dedupe,
                        ..
                    } => Some(dedupe),
                    _ => None,
                })
                .collect()
        };
        let first = dedupes(&snapshot);
        snapshot.heartbeats = Some(vec![silent("host3", 61_234)]);
        assert_eq!(
            dedupes(&snapshot),
            first,
            "a second more of silence is no news"
        );
        assert_eq!(first.len(), 1);
    }

    #[test]
    fn a_disk_move_whose_host_left_fails_instead_of_holding_its_vm() {
        let mut snapshot = cluster();
        let mut op = move_disk_op("op-9", OpState::Running, None);
        if let OpKind::MoveDisk(move_disk) = &mut op.value.kind {
            move_disk.host = "host3".parse().unwrap();
        }
        snapshot.ops.insert("op-9".into(), Ok(op));
        let actions = plan(&snapshot, &HaTiming::default(), NOW);
        assert!(
            actions.iter().any(|action| matches!(
                action,
                Action::FailOp { reason, .. } if reason == "host host3 left the cluster"
            )),
            "{actions:#?}"
        );
    }

    proptest! {
        /// Whatever the heartbeats and fence devices say, a VM is restarted only from a
        /// host without a lease, and only with proof its copy is gone: its fence device
        /// confirmed, or its heartbeat silent past the deadline, or fenced without it.
        #[test]
        fn nothing_restarts_without_proof(
            readable in any::<bool>(),
            present in any::<bool>(),
            silent_ms in 0u64..20_000,
            fenced in any::<bool>(),
            lists_web in any::<bool>(),
            device in any::<bool>(),
            confirmed in any::<bool>(),
            alive in any::<bool>(),
        ) {
            let timing = HaTiming::default();
            let mut snapshot = cluster();
            if alive {
                snapshot.hosts.insert("host3".parse().unwrap(), Ok(host("host3")));
            }
            let mut beat = silent("host3", silent_ms);
            beat.beat.fenced = fenced;
            if lists_web {
                beat.beat.running = vec!["web".parse().unwrap()];
            }
            snapshot.heartbeats = readable.then(|| if present { vec![beat] } else { Vec::new() });
            if device {
                snapshot.fence_devices.insert(
                    "host3".parse().unwrap(),
                    Ok(FenceDevice {
                        version: 1,
                        host: "host3".parse().unwrap(),
                        agent: "/x".into(),
                        options: Default::default(),
                        timeout_ms: 1,
                    }),
                );
                if confirmed {
                    snapshot.fences.insert(
                        "host3".parse().unwrap(),
                        FenceProgress::ConfirmedOff { after_ms: 1 },
                    );
                }
            }
            let restarted = !restarts(&plan(&snapshot, &timing, NOW)).is_empty();
            if restarted {
                prop_assert!(!alive);
                let confirmed_off = device && confirmed;
                let silent_past = readable && present && !fenced && !device
                    && silent_ms >= timing.silent_after_ms();
                let fenced_without = readable && present && fenced && !lists_web;
                prop_assert!(confirmed_off || silent_past || fenced_without);
            }
        }
    }
}
