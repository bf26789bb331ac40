//! The leader's HA pass: which VMs placed on hosts without a lease may start elsewhere
//! now. The judgement is `ferry_manager::ha::judge_host` over the storage heartbeats;
//! the restart itself is an ordinary placement, made by the planner in priority order
//! and written by compare-and-swap against the placement read here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::ops::{EventLog, VmEntry};
use ferry_manager::ha::{
    judge_host, may_restart, restart_allowed, wants_fence_device, FenceEvidence, HostFate,
};
use ferry_model::cluster::{now_ms, HostRecord, Placement, PowerState, RECORD_VERSION};
use ferry_model::ha::{FenceDevice, FenceRequest, RestartCause, RestartEntry, RestartLog};
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
    /// What was last reported about each host's fence.
    fence_reported: BTreeMap<HostName, String>,
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
    /// The restart log read with the placement (revision 0: none). The restart rewrites
    /// it in the same transaction, so a `ferry vm start` or a changed request in between
    /// cancels the restart instead of racing it.
    pub log_revision: i64,
    pub log: RestartLog,
}

impl Restart {
    /// The log as the restart leaves it: the host failure counted, any leave answered.
    pub fn next_log(&self) -> RestartLog {
        let mut log = self.log.clone();
        log.version = RECORD_VERSION;
        if self.cause == RestartCause::HostFailed {
            log.push(RestartEntry {
                at_ms: now_ms(),
                host: self.from.clone(),
                cause: RestartCause::HostFailed,
            });
        }
        log.leave = None;
        log
    }
}

/// The VM's restart log and its revision (0 when it has none).
fn log_of(entry: &VmEntry) -> (i64, RestartLog) {
    entry
        .restarts
        .as_ref()
        .map_or((0, RestartLog::default()), |log| {
            (log.mod_revision, log.value.clone())
        })
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
    let requested = fence_requests(store).await;
    memory.verdicts.retain(|host, _| !live.contains(host));
    // A host that is back needs no fencing: dropping the job stops its retries. One that
    // asked to be fenced keeps its job until it starts again.
    let keep = |host: &HostName| !live.contains(host) || requested.iter().any(|r| &r.host == host);
    memory.fences.retain(|host, _| keep(host));
    memory.fence_reported.retain(|host, _| keep(host));
    for request in &requested {
        if memory.fences.contains_key(&request.host) {
            continue;
        }
        let host = &request.host;
        match fence_device(store, host).await {
            Some(device) => {
                events
                    .record(
                        &format!("host/{host}"),
                        "fence-requested",
                        &format!("host {host} asked to be fenced: {}", request.reason),
                    )
                    .await;
                memory
                    .fences
                    .insert(host.clone(), start_fence(&device, events).await);
            }
            None => tracing::warn!("host {host} asked to be fenced but has no fence device"),
        }
    }
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
            let device = fence_device(store, host).await;
            if wants_fence_device(false, beat, now, &timing) && !memory.fences.contains_key(host) {
                if let Some(device) = &device {
                    memory
                        .fences
                        .insert(host.clone(), start_fence(device, events).await);
                }
            }
            let evidence = match (&device, memory.fences.get(host)) {
                (_, Some(job)) if job.confirmed_off() => FenceEvidence::ConfirmedOff,
                (Some(_), _) => FenceEvidence::Pending,
                (None, _) => FenceEvidence::NoDevice,
            };
            fates.insert(
                host.clone(),
                judge_host(false, evidence, beat, now, &timing),
            );
        }
        let fate = &fates[host];
        let verdict = match fate {
            HostFate::Dead { reason } => format!("host {host} is down: {reason}"),
            HostFate::Fenced { .. } => format!("host {host} fenced itself"),
            HostFate::Isolated { reason } => {
                format!("host {host} is cut off but alive ({reason}); its VMs stay there")
            }
            HostFate::AwaitingFence { reason } => format!(
                "host {host} is silent ({reason}); its VMs restart once its fence device confirms it off"
            ),
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
                if let Err(error) = leave_stopped(store, vm).await {
                    tracing::warn!("cannot stop VM {vm} after its restart limit: {error}");
                }
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
        let (log_revision, log) = log_of(entry);
        restarts.insert(
            vm.clone(),
            Restart {
                log_revision,
                log,
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
                let (log_revision, log) = log_of(entry);
                (
                    record.spec.name.clone(),
                    Restart {
                        mod_revision: placement.mod_revision,
                        generation: placement.value.generation,
                        from: leave.host.clone(),
                        reason: leave.reason.clone(),
                        cause: RestartCause::QemuExited,
                        migration_op: None,
                        log_revision,
                        log,
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

/// The host's fence device, if it has one (read errors count as none, with a warning).
/// The hosts' requests to be fenced (a host monitor's `fence-host`).
async fn fence_requests(store: &Store) -> Vec<FenceRequest> {
    match store
        .list::<FenceRequest>(&store.keys().fence_requests())
        .await
    {
        Ok((requests, _)) => requests
            .into_iter()
            .map(|(_, request)| request.value)
            .collect(),
        Err(error) => {
            tracing::warn!("cannot read the fence requests: {error}");
            Vec::new()
        }
    }
}

async fn fence_device(store: &Store, host: &HostName) -> Option<FenceDevice> {
    match store
        .get::<FenceDevice>(&store.keys().fence_device(host))
        .await
    {
        Ok(device) => Some(device?.value),
        Err(error) => {
            tracing::warn!("cannot read the fence device of {host}: {error}");
            None
        }
    }
}

/// Starts powering the device's host off.
async fn start_fence(device: &FenceDevice, events: &EventLog) -> FenceJob {
    let host = &device.host;
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
    FenceJob::start(device.clone())
}

/// Reports a fence's confirmation, its first failure and each new kind of failure as
/// one event each (a BMC that died with its host fails the same way every 5 s).
async fn report_fences(events: &EventLog, memory: &mut ManagerMemory) {
    for (host, job) in &memory.fences {
        let (kind, message) = match job.progress() {
            FenceProgress::ConfirmedOff { after_ms } => (
                "fenced-off",
                format!("host {host} is off: its fence device confirmed it ({after_ms} ms)"),
            ),
            FenceProgress::Running {
                attempt,
                last_error: Some(error),
            } => (
                "fence-failed",
                format!(
                    "fencing host {host} failed (attempt {}): {error}; retrying until it works",
                    attempt - 1
                ),
            ),
            FenceProgress::Running { .. } => continue,
        };
        // The attempt number changes every time; the error is what is worth a new event.
        let key = message
            .split_once("): ")
            .map_or(message.clone(), |(_, rest)| rest.to_string());
        if memory.fence_reported.get(host) == Some(&key) {
            continue;
        }
        events.record(&format!("host/{host}"), kind, &message).await;
        memory.fence_reported.insert(host.clone(), key);
    }
}

/// Changes the VM's restart log by compare-and-swap; returns the log as written.
pub async fn update_restart_log(
    store: &Store,
    vm: &VmName,
    change: impl Fn(&mut RestartLog),
) -> Result<RestartLog, StoreError> {
    let key = store.keys().vm_restarts(vm);
    store
        .update(&key, |current: Option<&RestartLog>| {
            let mut log = current.cloned().unwrap_or_default();
            log.version = RECORD_VERSION;
            change(&mut log);
            Ok::<_, StoreError>(log)
        })
        .await
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
