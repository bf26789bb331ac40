//! The manager's side of ops: it admits queued migrations and disk moves when their
//! hosts have a free slot (re-checking the destination, which may have filled up while
//! the op waited), and it finishes what a dead driver left: a failed op whose placement
//! still says `Migrating`, a completed switch-over whose source died before recording it.

use std::collections::BTreeMap;

use ferry_api::migrate::promised_memory;
use ferry_api::ops::{vm_view, EventLog, VmEntry};
use ferry_manager::migration::{admit, check_destination, Candidate, Slotted};
use ferry_model::cluster::{
    now_ms, HostRecord, Placement, PlacementMigration, PlacementPhase, VmState,
};
use ferry_model::ops::{OpKind, OpRecord, OpState};
use ferry_model::HostName;
use ferry_store::{encode, Store, StoreError, Versioned};

use crate::migration::restore_placement;

pub async fn run_ops(
    store: &Store,
    events: &EventLog,
    hosts: &[(String, Versioned<HostRecord>)],
    entries: &BTreeMap<String, VmEntry>,
) -> Result<(), StoreError> {
    let keys = store.keys();
    let (listed, _) = store.list::<OpRecord>(&keys.ops()).await?;
    if listed.is_empty() {
        return Ok(());
    }
    let ops: Vec<Versioned<OpRecord>> = listed.into_iter().map(|(_, op)| op).collect();
    let alive = |host: &HostName| hosts.iter().any(|(_, record)| &record.value.name == host);

    for versioned in &ops {
        let op = &versioned.value;
        let OpKind::Migrate(migrate) = &op.kind else {
            continue;
        };
        let placement = entries
            .get(migrate.vm.as_str())
            .and_then(|entry| entry.placement.as_ref())
            .map(|placement| &placement.value);
        let still_migrating = placement
            .and_then(|placement| placement.migration.as_ref())
            .is_some_and(|migration| migration.op == op.id);
        if op.state.is_final() && op.state != OpState::Completed && still_migrating {
            restore_placement(store, &migrate.vm, &op.id).await;
        }
        let switched = placement.is_some_and(|placement| {
            placement.host == migrate.to && placement.phase == PlacementPhase::Assigned
        });
        if op.state == OpState::Running && switched && !alive(&migrate.from) {
            let mut done = op.clone();
            done.state = OpState::Completed;
            done.phase = format!(
                "running on {} (the source host left before recording the result)",
                migrate.to
            );
            done.finished_ms = Some(now_ms());
            let _ = store
                .compare_and_swap(&keys.op(&op.id), versioned.mod_revision, &done)
                .await;
        }
    }

    let open: Vec<&Versioned<OpRecord>> =
        ops.iter().filter(|op| !op.value.state.is_final()).collect();
    let slotted: Vec<Slotted> = open
        .iter()
        .map(|op| Slotted {
            id: op.value.id.clone(),
            hosts: op.value.kind.hosts().into_iter().cloned().collect(),
            created_ms: op.value.created_ms,
            running: op.value.state == OpState::Running,
        })
        .collect();
    let limits: BTreeMap<HostName, u32> = hosts
        .iter()
        .map(|(_, host)| (host.value.name.clone(), host.value.migration_limit))
        .collect();
    let admitted = admit(&slotted, &limits);
    for versioned in open {
        let op = &versioned.value;
        if op.state != OpState::Queued {
            continue;
        }
        if !admitted.contains(&op.id) {
            let busy: Vec<String> = op
                .kind
                .hosts()
                .into_iter()
                .map(|host| host.to_string())
                .collect();
            let phase = format!(
                "queued: waiting for a migration slot on {}",
                busy.join(" and ")
            );
            if op.phase != phase {
                let mut waiting = op.clone();
                waiting.phase = phase;
                let _ = store
                    .compare_and_swap(&keys.op(&op.id), versioned.mod_revision, &waiting)
                    .await;
            }
            continue;
        }
        let entry = entries.get(op.kind.vm().as_str());
        match start(
            store,
            op,
            versioned.mod_revision,
            entry,
            hosts,
            entries,
            &ops,
        )
        .await
        {
            Ok(()) => {
                events
                    .record(
                        &op.kind.vm().subject(),
                        "op-started",
                        &format!("op {} ({}) started", op.id, op.kind.name()),
                    )
                    .await
            }
            Err(Refused::Store(StoreError::Conflict { .. })) => {}
            Err(Refused::Store(error)) => return Err(error),
            Err(Refused::Reason(reason)) => {
                let mut failed = op.clone();
                failed.state = OpState::Failed;
                failed.phase = "refused when its turn came".into();
                failed.error = Some(reason.clone());
                failed.finished_ms = Some(now_ms());
                let _ = store
                    .compare_and_swap(&keys.op(&op.id), versioned.mod_revision, &failed)
                    .await;
                events
                    .record(
                        &op.kind.vm().subject(),
                        "op-refused",
                        &format!("op {} ({}) refused: {reason}", op.id, op.kind.name()),
                    )
                    .await;
            }
        }
    }
    Ok(())
}

enum Refused {
    Store(StoreError),
    Reason(String),
}

/// Checks again, then marks the op running and (for a migration) the placement
/// `Migrating`, in one transaction.
async fn start(
    store: &Store,
    op: &OpRecord,
    op_revision: i64,
    entry: Option<&VmEntry>,
    hosts: &[(String, Versioned<HostRecord>)],
    entries: &BTreeMap<String, VmEntry>,
    ops: &[Versioned<OpRecord>],
) -> Result<(), Refused> {
    let vm = op.kind.vm();
    let keys = store.keys();
    let refuse = |reason: String| Err(Refused::Reason(reason));
    let Some(entry) = entry else {
        return refuse(format!("VM {vm} no longer exists"));
    };
    let (Some(record), Some(placement)) = (&entry.record, &entry.placement) else {
        return refuse(format!("VM {vm} is not placed"));
    };
    if vm_view(entry).map(|view| view.state) != Some(VmState::Running.as_str().into()) {
        return refuse(format!("VM {vm} is no longer running"));
    }
    if placement.value.phase != PlacementPhase::Assigned {
        return refuse(format!("VM {vm} is already migrating"));
    }
    let mut running = op.clone();
    running.state = OpState::Running;
    running.started_ms = Some(now_ms());
    running.phase = "starting".into();
    let op_key = keys.op(&op.id);
    let placement_key = keys.vm_placement(vm);
    let host = |name: &HostName| {
        hosts
            .iter()
            .map(|(_, host)| &host.value)
            .find(|host| &host.name == name)
    };
    let writes = match &op.kind {
        OpKind::Migrate(migrate) => {
            if placement.value.host != migrate.from {
                return refuse(format!(
                    "VM {vm} now runs on {}, not {}",
                    placement.value.host, migrate.from
                ));
            }
            let Some(source) = host(&migrate.from) else {
                return refuse(format!("host {} left the cluster", migrate.from));
            };
            let Some(dest) = host(&migrate.to) else {
                return refuse(format!(
                    "host {} is not in the cluster (unknown, or its agent is down)",
                    migrate.to
                ));
            };
            let others: Vec<OpRecord> = ops
                .iter()
                .filter(|other| other.value.id != op.id)
                .map(|other| other.value.clone())
                .collect();
            let used = promised_memory(entries, &others)
                .get(&migrate.to)
                .copied()
                .unwrap_or_default();
            let candidate = Candidate {
                vm: &record.value,
                source,
                mode: migrate.mode,
            };
            check_destination(&candidate, dest, used).map_err(Refused::Reason)?;
            let migrating = Placement {
                phase: PlacementPhase::Migrating,
                migration: Some(PlacementMigration {
                    to: migrate.to.clone(),
                    op: op.id.clone(),
                }),
                ..placement.value.clone()
            };
            vec![
                (op_key.as_str(), op_revision, encode(&running)),
                (
                    placement_key.as_str(),
                    placement.mod_revision,
                    encode(&migrating),
                ),
            ]
        }
        OpKind::MoveDisk(move_disk) => {
            if placement.value.host != move_disk.host {
                return refuse(format!(
                    "VM {vm} now runs on {}, not {}",
                    placement.value.host, move_disk.host
                ));
            }
            vec![(op_key.as_str(), op_revision, encode(&running))]
        }
    };
    store
        .compare_and_swap_all(&writes)
        .await
        .map(drop)
        .map_err(Refused::Store)
}
