//! The leader's HA pass: which VMs placed on hosts without a lease may start elsewhere
//! now. The judgement is `ferry_manager::ha::judge_host` over the storage heartbeats;
//! the restart itself is an ordinary placement, made by the planner in priority order
//! and written by compare-and-swap against the placement read here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::ops::{EventLog, VmEntry};
use ferry_manager::ha::{judge_host, may_restart, restart_allowed, wants_fence_device, HostFate};
use ferry_model::cluster::{now_ms, HostRecord, Placement, PowerState, RECORD_VERSION};
use ferry_model::ha::{FenceDevice, RestartCause, RestartEntry, RestartLog};
use ferry_model::{HostName, VmName};
use ferry_store::{Store, StoreError, Versioned};

use crate::fence_device::{FenceJob, FenceProgress};
use crate::fencing::{heartbeat_dir, read_heartbeats};
use crate::runtime::Runtime;

/// What the leader remembers between passes, so that each verdict is one event and each
/// dead host is fenced once.
#[derive(Default)]
pub struct ManagerMemory {
    verdicts: BTreeMap<HostName, String>,
    fences: BTreeMap<HostName, FenceJob>,
    /// The fence progress last reported, per host.
    fence_reported: BTreeMap<HostName, FenceProgress>,
    /// VMs held back by their restart limit, with the reason last reported.
    held: BTreeMap<VmName, String>,
}

/// A VM to start elsewhere: the placement it replaces and why.
#[derive(Clone, Debug)]
pub struct Restart {
    pub mod_revision: i64,
    pub generation: u64,
    pub from: HostName,
    pub reason: String,
    pub cause: RestartCause,
    /// The migration the VM was in when its host died, if any: it ends with the restart.
    pub migration_op: Option<String>,
}

pub async fn restartable(
    store: &Store,
    runtime: &Arc<Runtime>,
    hosts: &[(String, Versioned<HostRecord>)],
    entries: &BTreeMap<String, VmEntry>,
    events: &EventLog,
    memory: &mut ManagerMemory,
) -> BTreeMap<VmName, Restart> {
    let live: BTreeSet<&HostName> = hosts.iter().map(|(_, host)| &host.value.name).collect();
    memory.verdicts.retain(|host, _| !live.contains(host));
    // A host that is back needs no fencing: dropping the job stops its retries.
    memory.fences.retain(|host, _| !live.contains(host));
    memory.fence_reported.retain(|host, _| !live.contains(host));
    report_fences(events, memory).await;
    let now = now_ms();
    let mut restarts = leaving(entries);

    // HA VMs that should run, placed on a host without a lease.
    let orphaned: Vec<(&VmEntry, &VmName, &Versioned<Placement>)> = entries
        .values()
        .filter_map(|entry| {
            let record = &entry.record.as_ref()?.value;
            let placement = entry.placement.as_ref()?;
            let wanted =
                record.ha.enabled && record.desired == PowerState::Running && !record.deleting;
            (wanted && !live.contains(&placement.value.host)).then_some((
                entry,
                &record.spec.name,
                placement,
            ))
        })
        .collect();
    if orphaned.is_empty() {
        return restarts;
    }
    let timing = runtime.ha.timing;
    let beats = match runtime.config.shared_pool() {
        Some(pool) => read_heartbeats(
            &heartbeat_dir(&pool.path),
            Duration::from_millis(timing.heartbeat_ms),
        )
        .await
        .unwrap_or_default(),
        None => Vec::new(),
    };
    let mut fates: BTreeMap<HostName, HostFate> = BTreeMap::new();
    for (entry, vm, placement) in orphaned {
        let host = &placement.value.host;
        if !fates.contains_key(host) {
            let beat = beats.iter().find(|beat| &beat.host == host);
            if wants_fence_device(false, beat, now, &timing) && !memory.fences.contains_key(host) {
                if let Some(job) = start_fence(store, host, events).await {
                    memory.fences.insert(host.clone(), job);
                }
            }
            let confirmed_off = memory.fences.get(host).is_some_and(FenceJob::confirmed_off);
            fates.insert(
                host.clone(),
                judge_host(false, confirmed_off, beat, now, &timing),
            );
        }
        let fate = &fates[host];
        let verdict = match fate {
            HostFate::Dead { reason } => format!("host {host} is down: {reason}"),
            HostFate::Fenced { .. } => format!("host {host} fenced itself"),
            HostFate::Isolated { reason } => {
                format!("host {host} is cut off but alive ({reason}); its VMs stay there")
            }
            HostFate::Alive => continue,
        };
        if memory.verdicts.get(host) != Some(&verdict) {
            events
                .record(&format!("host/{host}"), "host-fate", &verdict)
                .await;
            memory.verdicts.insert(host.clone(), verdict.clone());
        }
        if !may_restart(fate, vm) {
            continue;
        }
        let record = &entry.record.as_ref().expect("filtered above").value;
        if let Err(reason) = within_limit(entry, &record.ha, host, now) {
            if memory.held.get(vm) != Some(&reason) {
                events
                    .record(
                        &vm.subject(),
                        "restart-limit",
                        &format!("VM {vm} is not restarted: {reason}"),
                    )
                    .await;
                memory.held.insert(vm.clone(), reason);
            }
            continue;
        }
        memory.held.remove(vm);
        restarts.insert(
            vm.clone(),
            Restart {
                mod_revision: placement.mod_revision,
                generation: placement.value.generation,
                from: host.clone(),
                reason: verdict,
                cause: RestartCause::HostFailed,
                migration_op: placement
                    .value
                    .migration
                    .as_ref()
                    .map(|migration| migration.op.clone()),
            },
        );
    }
    restarts
}

/// VMs whose host gave them up after repeated failures (`RestartLog::leave` names the
/// placement they failed under): the planner puts them on another host.
fn leaving(entries: &BTreeMap<String, VmEntry>) -> BTreeMap<VmName, Restart> {
    entries
        .values()
        .filter_map(|entry| {
            let record = &entry.record.as_ref()?.value;
            let placement = entry.placement.as_ref()?;
            let leave = entry.restarts.as_ref()?.value.leave.as_ref()?;
            let current = leave.host == placement.value.host
                && leave.generation == placement.value.generation
                && placement.value.migration.is_none();
            (current && record.desired == PowerState::Running && !record.deleting).then(|| {
                (
                    record.spec.name.clone(),
                    Restart {
                        mod_revision: placement.mod_revision,
                        generation: placement.value.generation,
                        from: leave.host.clone(),
                        reason: leave.reason.clone(),
                        cause: RestartCause::QemuExited,
                        migration_op: None,
                    },
                )
            })
        })
        .collect()
}

/// Whether restarting the VM after its host failed stays within its restart limit.
fn within_limit(
    entry: &VmEntry,
    policy: &ferry_model::ha::HaPolicy,
    host: &HostName,
    now: u64,
) -> Result<(), String> {
    let mut log = entry
        .restarts
        .as_ref()
        .map(|log| log.value.clone())
        .unwrap_or_default();
    log.push(RestartEntry {
        at_ms: now,
        host: host.clone(),
        cause: RestartCause::HostFailed,
    });
    restart_allowed(&log, policy, now)
}

/// Starts powering off `host` through its fence device, if it has one.
async fn start_fence(store: &Store, host: &HostName, events: &EventLog) -> Option<FenceJob> {
    let device = match store
        .get::<FenceDevice>(&store.keys().fence_device(host))
        .await
    {
        Ok(device) => device?.value,
        Err(error) => {
            tracing::warn!("cannot read the fence device of {host}: {error}");
            return None;
        }
    };
    events
        .record(
            &format!("host/{host}"),
            "fencing",
            &format!(
                "powering host {host} off through its fence device ({})",
                device.agent.display()
            ),
        )
        .await;
    Some(FenceJob::start(device))
}

/// Reports each change of a fence's progress as one event.
async fn report_fences(events: &EventLog, memory: &mut ManagerMemory) {
    for (host, job) in &memory.fences {
        let progress = job.progress();
        if memory.fence_reported.get(host) == Some(&progress) {
            continue;
        }
        match &progress {
            FenceProgress::ConfirmedOff { after_ms } => {
                events
                    .record(
                        &format!("host/{host}"),
                        "fenced-off",
                        &format!(
                            "host {host} is off: its fence device confirmed it ({after_ms} ms)"
                        ),
                    )
                    .await;
            }
            FenceProgress::Running {
                attempt,
                last_error: Some(error),
            } => {
                events
                    .record(
                        &format!("host/{host}"),
                        "fence-failed",
                        &format!(
                            "fencing host {host} failed (attempt {}): {error}; retrying",
                            attempt - 1
                        ),
                    )
                    .await;
            }
            FenceProgress::Running { .. } => {}
        }
        memory.fence_reported.insert(host.clone(), progress);
    }
}

/// Changes the VM's restart log by compare-and-swap; returns the log as written.
pub async fn update_restart_log(
    store: &Store,
    vm: &VmName,
    change: impl Fn(&mut RestartLog),
) -> Result<RestartLog, StoreError> {
    let key = store.keys().vm_restarts(vm);
    loop {
        let current = store.get::<RestartLog>(&key).await?;
        let revision = current.as_ref().map_or(0, |log| log.mod_revision);
        let mut log = current.map(|log| log.value).unwrap_or_default();
        log.version = RECORD_VERSION;
        change(&mut log);
        match store.compare_and_swap(&key, revision, &log).await {
            Ok(_) => return Ok(log),
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => return Err(error),
        }
    }
}

/// Sets the VM's desired state to stopped: it reached its restart limit. `ferry vm
/// start` asks for it again (and clears the count).
pub async fn leave_stopped(store: &Store, vm: &VmName) -> Result<(), StoreError> {
    let key = store.keys().vm_spec(vm);
    loop {
        let Some(current) = store.get::<ferry_model::cluster::VmRecord>(&key).await? else {
            return Ok(());
        };
        let mut record = current.value;
        record.desired = PowerState::Stopped;
        match store
            .compare_and_swap(&key, current.mod_revision, &record)
            .await
        {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => return Err(error),
        }
    }
}

/// After a restart elsewhere: the failure goes into the log and any request to leave
/// the old host is answered.
pub async fn log_restart(store: &Store, vm: &VmName, restart: &Restart) {
    let logged = update_restart_log(store, vm, |log| {
        if restart.cause == RestartCause::HostFailed {
            log.push(RestartEntry {
                at_ms: now_ms(),
                host: restart.from.clone(),
                cause: RestartCause::HostFailed,
            });
        }
        log.leave = None;
    })
    .await;
    if let Err(error) = logged {
        tracing::warn!("cannot log the restart of VM {vm}: {error}");
    }
}

/// Ends the migration a restarted VM was in: its source host died before the switch-over.
pub async fn fail_orphaned_migration(store: &ferry_store::Store, restart: &Restart) {
    let Some(op) = &restart.migration_op else {
        return;
    };
    let reason = format!("the source host {} died: {}", restart.from, restart.reason);
    let ended = crate::migration::OpHandle::new(store, op)
        .update(|record| {
            if !record.state.is_final() {
                record.state = ferry_model::ops::OpState::Failed;
                record.phase = "source host died; VM restarted by HA".into();
                record.error = Some(reason.clone());
                record.finished_ms = Some(now_ms());
            }
        })
        .await;
    if let Err(error) = ended {
        tracing::warn!("cannot end op {op} of a restarted VM: {error}");
    }
}
