//! The leader's HA pass: which VMs placed on hosts without a lease may start elsewhere
//! now. The judgement is `ferry_manager::ha::judge_host` over the storage heartbeats;
//! the restart itself is an ordinary placement, made by the planner in priority order
//! and written by compare-and-swap against the placement read here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use ferry_api::ops::{EventLog, VmEntry};
use ferry_manager::ha::{judge_host, may_restart, HostFate};
use ferry_model::cluster::{now_ms, HostRecord, Placement, PowerState};
use ferry_model::{HostName, VmName};
use ferry_store::Versioned;

use crate::fencing::{heartbeat_dir, read_heartbeats};
use crate::runtime::Runtime;

/// What the leader remembers between passes, so that each verdict is one event.
#[derive(Debug, Default)]
pub struct ManagerMemory {
    verdicts: BTreeMap<HostName, String>,
}

/// A VM to start elsewhere: the placement it replaces and why.
#[derive(Clone, Debug)]
pub struct Restart {
    pub mod_revision: i64,
    pub generation: u64,
    pub from: HostName,
    pub reason: String,
    /// The migration the VM was in when its host died, if any: it ends with the restart.
    pub migration_op: Option<String>,
}

pub async fn restartable(
    runtime: &Arc<Runtime>,
    hosts: &[(String, Versioned<HostRecord>)],
    entries: &BTreeMap<String, VmEntry>,
    events: &EventLog,
    memory: &mut ManagerMemory,
) -> BTreeMap<VmName, Restart> {
    let live: BTreeSet<&HostName> = hosts.iter().map(|(_, host)| &host.value.name).collect();
    // HA VMs that should run, placed on a host without a lease.
    let orphaned: Vec<(&VmName, &Versioned<Placement>)> = entries
        .values()
        .filter_map(|entry| {
            let record = &entry.record.as_ref()?.value;
            let placement = entry.placement.as_ref()?;
            let wanted =
                record.ha.enabled && record.desired == PowerState::Running && !record.deleting;
            (wanted && !live.contains(&placement.value.host))
                .then_some((&record.spec.name, placement))
        })
        .collect();
    memory.verdicts.retain(|host, _| !live.contains(host));
    if orphaned.is_empty() {
        return BTreeMap::new();
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
    let now = now_ms();
    let mut fates: BTreeMap<HostName, HostFate> = BTreeMap::new();
    let mut restarts = BTreeMap::new();
    for (vm, placement) in orphaned {
        let host = &placement.value.host;
        let fate = fates.entry(host.clone()).or_insert_with(|| {
            let beat = beats.iter().find(|beat| &beat.host == host);
            judge_host(false, false, beat, now, &timing)
        });
        let verdict = match &*fate {
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
        if may_restart(fate, vm) {
            restarts.insert(
                vm.clone(),
                Restart {
                    mod_revision: placement.mod_revision,
                    generation: placement.value.generation,
                    from: host.clone(),
                    reason: verdict,
                    migration_op: placement
                        .value
                        .migration
                        .as_ref()
                        .map(|migration| migration.op.clone()),
                },
            );
        }
    }
    restarts
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
