//! Migrations and disk moves as API operations. The API only checks and records: it
//! writes a queued op; the manager admits it when the hosts have a free migration slot;
//! the agents carry it out (ferry-agent's `migration` module) and write its progress
//! into the op, which is all `op show` and the CLI's progress bar read.

use ferry_manager::migration::{check_destination, choose_destination, local_pool, Candidate};
use ferry_model::cluster::{now_ms, HostRecord, PlacementPhase, VmState, RECORD_VERSION};
use ferry_model::events::EventKind;
use ferry_model::ops::{
    CheckpointAction, DiskCopy, MigrateOp, MigrationMode, MoveDiskOp, OpKind, OpRecord, OpState,
};
use ferry_model::{Bytes, HostName};
use ferry_store::{encode, Change, Guard, Read};

use crate::ops::{parse_vm_name, vm_state, ClusterApi};
use crate::types::{MigrateRequest, MoveDiskRequest, OpView, ProgressView};
use crate::ApiError;

/// The default bandwidth when neither the request nor the host says (QEMU's own default
/// of 128 MiB/s would make every migration of a big guest slow).
const DEFAULT_BANDWIDTH: Bytes = Bytes(10 * Bytes::GIB);

impl ClusterApi {
    pub async fn migrate_vm(
        &self,
        name: &str,
        request: MigrateRequest,
    ) -> Result<OpView, ApiError> {
        let name = parse_vm_name(name)?;
        let mode: MigrationMode = request
            .mode
            .as_deref()
            .unwrap_or("live")
            .parse()
            .map_err(ApiError::BadRequest)?;
        let bandwidth = match &request.bandwidth {
            Some(text) => {
                let bandwidth: Bytes = text
                    .parse()
                    .map_err(|error| ApiError::BadRequest(format!("bandwidth: {error}")))?;
                if bandwidth.0 < Bytes::MIB {
                    return Err(ApiError::BadRequest(format!(
                        "bandwidth: {bandwidth} per second is too little; give at least 1M"
                    )));
                }
                Some(bandwidth)
            }
            None => None,
        };
        if request.downtime_limit_ms == Some(0) {
            return Err(ApiError::BadRequest(
                "downtime_limit_ms: must be at least 1".into(),
            ));
        }
        let (entry, record) = self.vm_entry_and_record(&name).await?;
        let state = vm_state(&entry).unwrap_or(VmState::Stopped);
        let placement = entry
            .placement
            .as_ref()
            .map(|placement| placement.value.clone())
            .ok_or_else(|| ApiError::Conflict(format!("VM {name} is not placed on any host")))?;
        if let Some(migration) = &placement.migration {
            return Err(ApiError::Conflict(format!(
                "a migration of VM {name} is already in flight (op {})",
                migration.op
            )));
        }
        let ops = self.op_records().await?;
        refuse_if_busy(&ops, &name)?;
        if record.deleting {
            return Err(ApiError::Conflict(format!("VM {name} is being deleted")));
        }
        if state != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM {name} is {}, not running; only a running VM migrates",
                state.as_str()
            )));
        }
        let hosts = self.hosts().await?;
        let source = host_of(&hosts, &name, &placement.host)?;
        let candidate = Candidate {
            vm: &record,
            source,
            mode,
        };
        let entries = self.vm_entries().await?;
        let used = promised_memory(&entries, &ops);
        let to = match &request.to {
            Some(to) => {
                let to: HostName = to
                    .parse()
                    .map_err(|error| ApiError::BadRequest(format!("to: {error}")))?;
                let dest = hosts.iter().find(|host| host.name == to).ok_or_else(|| {
                    ApiError::Conflict(format!(
                        "host {to} is not in the cluster (unknown, or its agent is down)"
                    ))
                })?;
                check_destination(&candidate, dest, used.get(&to).copied().unwrap_or_default())
                    .map_err(ApiError::Conflict)?;
                to
            }
            None => choose_destination(&candidate, &hosts, &used).map_err(ApiError::Conflict)?,
        };
        let dest = hosts
            .iter()
            .find(|host| host.name == to)
            .ok_or_else(|| ApiError::Internal(format!("host {to} vanished")))?;
        let disk_copies = disk_copies(&record.spec, source, dest)?;
        if !disk_copies.is_empty() {
            self.refuse_copy_with_checkpoints(
                &name,
                "its local disks must be copied to the destination",
            )
            .await?;
        }
        let migrate = MigrateOp {
            vm: name.clone(),
            from: placement.host.clone(),
            to: to.clone(),
            mode,
            downtime_limit_ms: request
                .downtime_limit_ms
                .unwrap_or(record.migration.downtime_limit_ms),
            bandwidth: bandwidth.unwrap_or(DEFAULT_BANDWIDTH),
            postcopy_after_ms: request
                .postcopy_after_ms
                .or(record.migration.postcopy_after_ms),
            disk_copies,
        };
        let op = self.create_op(OpKind::Migrate(migrate)).await?;
        self.events()
            .record(
                &name.subject(),
                EventKind::MigrationRequested,
                &format!(
                    "{} migration of VM {name} from {} to {to} requested (op {})",
                    mode.as_str(),
                    placement.host,
                    op.id
                ),
            )
            .await;
        Ok(op_view(&op))
    }

    pub async fn move_disk(
        &self,
        name: &str,
        disk: &str,
        request: MoveDiskRequest,
    ) -> Result<OpView, ApiError> {
        let name = parse_vm_name(name)?;
        let (entry, record) = self.vm_entry_and_record(&name).await?;
        let spec_disk = record
            .spec
            .disks
            .iter()
            .find(|candidate| candidate.id == disk)
            .ok_or_else(|| {
                let ids: Vec<&str> = record.spec.disks.iter().map(|d| d.id.as_str()).collect();
                ApiError::NotFound(format!(
                    "VM {name} has no disk {disk:?} (it has: {})",
                    ids.join(", ")
                ))
            })?;
        let state = vm_state(&entry).unwrap_or(VmState::Stopped);
        if state != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM {name} is {}, not running; disks move under a running VM",
                state.as_str()
            )));
        }
        let placement = entry
            .placement
            .as_ref()
            .map(|placement| placement.value.clone())
            .ok_or_else(|| ApiError::Conflict(format!("VM {name} is not placed on any host")))?;
        if placement.phase == PlacementPhase::Migrating {
            return Err(ApiError::Conflict(format!("VM {name} is migrating")));
        }
        let ops = self.op_records().await?;
        refuse_if_busy(&ops, &name)?;
        let hosts = self.hosts().await?;
        let host = host_of(&hosts, &name, &placement.host)?;
        let pool = host.pool(&request.pool).ok_or_else(|| {
            let names: Vec<&str> = host.pools.iter().map(|pool| pool.name.as_str()).collect();
            ApiError::BadRequest(format!(
                "pool {:?} is not on host {} (it has: {})",
                request.pool,
                host.name,
                names.join(", ")
            ))
        })?;
        if spec_disk.path.starts_with(&pool.path) {
            return Err(ApiError::BadRequest(format!(
                "disk {disk} of VM {name} is already on pool {}",
                pool.name
            )));
        }
        self.refuse_copy_with_checkpoints(&name, "a disk move copies the disk")
            .await?;
        let to = disk_path(&pool.path, &name, &spec_disk.path, disk);
        let op = self
            .create_op(OpKind::MoveDisk(MoveDiskOp {
                vm: name.clone(),
                host: placement.host.clone(),
                disk: disk.to_string(),
                from: spec_disk.path.clone(),
                to,
                to_pool: pool.name.clone(),
            }))
            .await?;
        self.events()
            .record(
                &name.subject(),
                EventKind::MoveDiskRequested,
                &format!(
                    "move of disk {disk} of VM {name} to pool {} requested (op {})",
                    pool.name, op.id
                ),
            )
            .await;
        Ok(op_view(&op))
    }

    pub async fn op_records(&self) -> Result<Vec<OpRecord>, ApiError> {
        let listing = self
            .store()
            .list_each::<OpRecord>(&self.store().keys().ops())
            .await?;
        let mut ops: Vec<OpRecord> = listing
            .all()
            .map_err(|unreadable| {
                ApiError::Conflict(format!(
                    "op {}: unreadable record: {unreadable}",
                    unreadable.key
                ))
            })?
            .into_iter()
            .map(|(_, op)| op.value)
            .collect();
        ops.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(ops)
    }

    pub async fn list_ops(&self) -> Result<Vec<OpView>, ApiError> {
        Ok(self.op_records().await?.iter().map(op_view).collect())
    }

    pub async fn get_op(&self, id: &str) -> Result<OpView, ApiError> {
        check_op_id(id)?;
        self.store()
            .get::<OpRecord>(&self.store().keys().op(id))
            .await?
            .map(|op| op_view(&op.value))
            .ok_or_else(|| ApiError::NotFound(format!("op {id} does not exist")))
    }

    /// Asks an op to stop. A queued op is cancelled at once; a running one stops at its
    /// next safe point (a migration past its switch-over can no longer be cancelled).
    pub async fn cancel_op(&self, id: &str) -> Result<OpView, ApiError> {
        check_op_id(id)?;
        let key = self.store().keys().op(id);
        loop {
            let current = self
                .store()
                .get::<OpRecord>(&key)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("op {id} does not exist")))?;
            let mut op = current.value;
            if op.state.is_final() {
                return Err(ApiError::Conflict(format!(
                    "op {id} already ended ({})",
                    op.state.as_str()
                )));
            }
            op.cancel_requested = true;
            if op.state == OpState::Queued {
                op.state = OpState::Cancelled;
                op.phase = "cancelled before it started".into();
                op.finished_ms = Some(now_ms());
            }
            match self
                .store()
                .compare_and_swap(&key, current.mod_revision, &op)
                .await
            {
                Ok(_) => {
                    self.events()
                        .record(
                            &op.kind.vm().subject(),
                            EventKind::CancelRequested,
                            &format!("cancel of op {id} ({}) requested", op.kind.name()),
                        )
                        .await;
                    return Ok(op_view(&op));
                }
                Err(ferry_store::StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Creates the op and takes the VM's op lock in one transaction: a second op of
    /// the same VM, however close behind, finds the lock taken and is refused.
    async fn create_op(&self, kind: OpKind) -> Result<OpRecord, ApiError> {
        self.create_op_as(kind, OpState::Queued, "waiting for a migration slot")
            .await
    }

    /// Creates an op in `state` (an op its host carries out at once starts
    /// `Running`), with the VM's op lock, in one transaction.
    pub(crate) async fn create_op_as(
        &self,
        kind: OpKind,
        state: OpState,
        phase: &str,
    ) -> Result<OpRecord, ApiError> {
        let keys = self.store().keys();
        let vm = kind.vm().clone();
        let lock_key = keys.vm_op(&vm);
        let mut at = now_ms();
        // The lock as last seen: absent, or held by an op that has ended (the leader
        // releases such locks on its next tick; a new op need not wait for it).
        let mut lock_guard = Guard::Absent {
            key: lock_key.clone(),
        };
        loop {
            let id = format!("op-{at:x}");
            let op = OpRecord {
                version: RECORD_VERSION,
                id: id.clone(),
                kind: kind.clone(),
                state,
                phase: phase.into(),
                created_ms: now_ms(),
                started_ms: (state == OpState::Running).then(now_ms),
                finished_ms: None,
                progress: None,
                outcome: None,
                error: None,
                cancel_requested: false,
                step: Default::default(),
            };
            let lock = ferry_model::ops::OpLock {
                version: RECORD_VERSION,
                op: id.clone(),
            };
            let op_key = keys.op(&id);
            let change = Change::default()
                .guard(lock_guard.clone())
                .guard(Guard::Absent {
                    key: op_key.clone(),
                })
                .put(op_key.clone(), encode(&op))
                .put(lock_key.clone(), encode(&lock));
            match self.store().apply(&change).await {
                Ok(_) => return Ok(op),
                Err(ferry_store::StoreError::Conflict { .. }) => {
                    let holder = self
                        .store()
                        .read::<ferry_model::ops::OpLock>(&lock_key)
                        .await?;
                    match holder {
                        Read::Present(holder) => {
                            let holder_op = self
                                .store()
                                .read::<OpRecord>(&keys.op(&holder.value.op))
                                .await?;
                            let ended = match &holder_op {
                                Read::Present(record) => record.value.state.is_final(),
                                Read::Absent => true,
                                // It may still be running.
                                Read::Unreadable(_) => false,
                            };
                            let seen = Guard::Unchanged {
                                key: lock_key.clone(),
                                revision: holder.mod_revision,
                            };
                            if !ended {
                                let what = match &holder_op {
                                    Read::Present(record) => {
                                        format!("a {} op", record.value.kind.name())
                                    }
                                    _ => "an op".to_string(),
                                };
                                return Err(ApiError::Conflict(format!(
                                    "VM {vm} already has {what} in flight (op {}); wait for it or cancel it",
                                    holder.value.op
                                )));
                            }
                            if lock_guard == seen {
                                // Same lock, same revision, and still a conflict: the
                                // op id is taken.
                                at += 1;
                            }
                            lock_guard = seen;
                        }
                        Read::Unreadable(unreadable) => {
                            return Err(ApiError::Conflict(format!(
                                "VM {vm}: its op lock is unreadable ({unreadable})"
                            )))
                        }
                        Read::Absent => {
                            if lock_guard
                                == (Guard::Absent {
                                    key: lock_key.clone(),
                                })
                            {
                                // Two ops in one millisecond: take the next id.
                                at += 1;
                            }
                            lock_guard = Guard::Absent {
                                key: lock_key.clone(),
                            };
                        }
                    }
                }
                Err(error) => return Err(error.into()),
            }
        }
    }
}

/// Refuses when another op of the VM is still open.
fn refuse_if_busy(ops: &[OpRecord], name: &ferry_model::VmName) -> Result<(), ApiError> {
    match ops
        .iter()
        .find(|op| op.kind.vm() == name && !op.state.is_final())
    {
        Some(pending) => Err(ApiError::Conflict(format!(
            "VM {name} already has a {} op in flight (op {})",
            pending.kind.name(),
            pending.id
        ))),
        None => Ok(()),
    }
}

/// The host a VM runs on, which must be in the cluster.
fn host_of<'a>(
    hosts: &'a [HostRecord],
    name: &ferry_model::VmName,
    host: &HostName,
) -> Result<&'a HostRecord, ApiError> {
    hosts
        .iter()
        .find(|candidate| &candidate.name == host)
        .ok_or_else(|| {
            ApiError::Unavailable(format!(
                "VM {name} runs on {host}, whose agent is not in the cluster"
            ))
        })
}

fn check_op_id(id: &str) -> Result<(), ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!("{id:?} is not an op id")))
    }
}

pub use ferry_manager::migration::promised_memory;

/// Where a disk file goes in another pool: `{pool}/vms/{vm}/{file name}`.
fn disk_path(
    pool: &std::path::Path,
    vm: &ferry_model::VmName,
    current: &std::path::Path,
    disk: &str,
) -> std::path::PathBuf {
    let file = current
        .file_name()
        .map(|name| name.to_os_string())
        .unwrap_or_else(|| format!("{disk}.qcow2").into());
    pool.join("vms").join(vm.as_str()).join(file)
}

/// The disks on the source's local pools, and where each goes on the destination.
fn disk_copies(
    spec: &ferry_model::VmSpec,
    source: &HostRecord,
    dest: &HostRecord,
) -> Result<Vec<DiskCopy>, ApiError> {
    let mut copies = Vec::new();
    for disk in &spec.disks {
        let local = source.pool_of(&disk.path).is_some_and(|pool| !pool.shared);
        if !local {
            continue;
        }
        let pool = local_pool(dest)
            .ok_or_else(|| ApiError::Conflict(format!("host {} has no local pool", dest.name)))?;
        let size = disk.size.ok_or_else(|| {
            ApiError::Conflict(format!(
                "disk {} of VM {} has no recorded size; it cannot be copied",
                disk.id, spec.name
            ))
        })?;
        copies.push(DiskCopy {
            disk: disk.id.clone(),
            from: disk.path.clone(),
            to: disk_path(&pool.path, &spec.name, &disk.path, &disk.id),
            to_pool: pool.name.clone(),
            size,
        });
    }
    Ok(copies)
}

pub fn op_view(op: &OpRecord) -> OpView {
    let mut view = OpView {
        id: op.id.clone(),
        kind: op.kind.name().into(),
        vm: op.kind.vm().to_string(),
        status: op.state.as_str().into(),
        phase: op.phase.clone(),
        created_ms: op.created_ms,
        started_ms: op.started_ms,
        finished_ms: op.finished_ms,
        progress: op.progress.as_ref().map(|progress| ProgressView {
            transferred_bytes: progress.transferred_bytes,
            total_bytes: progress.total_bytes,
            remaining_bytes: progress.remaining_bytes,
            dirty_pages_rate: progress.dirty_pages_rate,
            throughput: progress.throughput,
            expected_remaining_ms: progress.expected_remaining_ms,
        }),
        cancel_requested: op.cancel_requested,
        error: op.error.clone(),
        ..OpView::default()
    };
    match &op.kind {
        OpKind::Migrate(migrate) => {
            view.from = Some(migrate.from.to_string());
            view.to = Some(migrate.to.to_string());
            view.mode = Some(migrate.mode.as_str().into());
        }
        OpKind::MoveDisk(move_disk) => {
            view.from = Some(move_disk.from.display().to_string());
            view.to = Some(move_disk.to.display().to_string());
            view.disk = Some(move_disk.disk.clone());
            view.pool = Some(move_disk.to_pool.clone());
        }
        OpKind::Checkpoint(checkpoint) => {
            view.from = Some(checkpoint.host.to_string());
            view.tag = Some(match &checkpoint.action {
                CheckpointAction::Create { tag, .. }
                | CheckpointAction::Revert { tag, .. }
                | CheckpointAction::Delete { tag } => tag.clone(),
            });
        }
        OpKind::Flatten(flatten) => view.from = Some(flatten.host.to_string()),
    }
    if let Some(outcome) = &op.outcome {
        view.qemu_downtime_ms = outcome.qemu_downtime_ms;
        view.total_ms = Some(outcome.total_ms);
        view.transferred_bytes = Some(outcome.transferred_bytes);
        view.overhead_ms = Some(outcome.overhead_ms);
        view.switchover_ms = Some(outcome.switchover_ms);
        view.postcopy = Some(outcome.postcopy);
    }
    view
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly by design

    use std::sync::Arc;
    use std::time::Duration;

    use ferry_model::ops::{MigrateOp, MigrationMode, OpKind, OpRecord, OpState};
    use ferry_model::{Bytes, VmName};
    use ferry_store::etcd_server::{free_port, EtcdServer};
    use ferry_store::{Read, Store};
    use futures::future::BoxFuture;

    use crate::console::ConsoleKind;
    use crate::ops::{ClusterApi, LocalVms};
    use crate::types::ExecResponse;
    use crate::ApiError;

    /// Op creation runs no VM: anything asked of this host is an error.
    struct NoVmsHere;

    impl LocalVms for NoVmsHere {
        fn exec(
            &self,
            vm: VmName,
            _: Vec<String>,
            _: Duration,
        ) -> BoxFuture<'_, Result<ExecResponse, ApiError>> {
            Box::pin(async move { Err(ApiError::NotFound(format!("VM {vm} is not here"))) })
        }

        fn change_cdrom(
            &self,
            vm: VmName,
            _: String,
            _: Option<std::path::PathBuf>,
        ) -> BoxFuture<'_, Result<(), ApiError>> {
            Box::pin(async move { Err(ApiError::NotFound(format!("VM {vm} is not here"))) })
        }

        fn console_socket<'a>(
            &'a self,
            vm: &'a VmName,
            _: ConsoleKind,
        ) -> BoxFuture<'a, Result<std::path::PathBuf, ApiError>> {
            Box::pin(async move { Err(ApiError::NotFound(format!("VM {vm} is not here"))) })
        }

        fn checkpoint<'a>(
            &'a self,
            record: &'a ferry_model::cluster::VmRecord,
            _: &'a ferry_model::ops::CheckpointAction,
            _: Option<&'a std::path::Path>,
        ) -> BoxFuture<'a, Result<crate::types::CheckpointDone, ApiError>> {
            let vm = record.spec.name.clone();
            Box::pin(async move { Err(ApiError::NotFound(format!("VM {vm} is not here"))) })
        }

        fn flatten<'a>(
            &'a self,
            record: &'a ferry_model::cluster::VmRecord,
        ) -> BoxFuture<'a, Result<(), ApiError>> {
            let vm = record.spec.name.clone();
            Box::pin(async move { Err(ApiError::NotFound(format!("VM {vm} is not here"))) })
        }
    }

    fn test_peer_tls(dir: &std::path::Path) -> rustls::ClientConfig {
        let ca = ferry_tls::ClusterCa::create("test").unwrap();
        let files =
            ferry_tls::install_host(&ca, &dir.join("tls"), &ferry_tls::Subject::client("host1"))
                .unwrap();
        ferry_tls::Identity::load(&files)
            .unwrap()
            .client_config()
            .unwrap()
    }

    fn migration() -> OpKind {
        OpKind::Migrate(MigrateOp {
            vm: "web".parse().unwrap(),
            from: "host1".parse().unwrap(),
            to: "host2".parse().unwrap(),
            mode: MigrationMode::Live,
            downtime_limit_ms: 300,
            bandwidth: Bytes(1 << 20),
            postcopy_after_ms: None,
            disk_copies: Vec::new(),
        })
    }

    #[tokio::test]
    async fn a_new_op_takes_the_lock_of_an_ended_op_at_once_and_never_of_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdServer::start(dir.path(), "127.0.0.1", free_port(), free_port())
            .await
            .unwrap();
        let store = Store::connect(std::slice::from_ref(&etcd.client_url), "/ferry-test/", None)
            .await
            .unwrap();
        let api = ClusterApi::new(
            store.clone(),
            "host1".parse().unwrap(),
            dir.path().join("pool"),
            Arc::new(NoVmsHere),
            // No call leaves this host here: any cluster CA will do.
            test_peer_tls(dir.path()),
        );
        let keys = store.keys().clone();

        let first = api.create_op(migration()).await.unwrap();
        let busy = api.create_op(migration()).await.unwrap_err();
        assert_eq!(
            busy.to_string(),
            ApiError::Conflict(format!(
                "VM web already has a migrate op in flight (op {}); wait for it or cancel it",
                first.id
            ))
            .to_string()
        );

        // The op ends; no leader has released its lock yet.
        let cancelled = OpRecord {
            state: OpState::Cancelled,
            ..first.clone()
        };
        store
            .put(&keys.op(&first.id), &cancelled, None)
            .await
            .unwrap();
        let second = api.create_op(migration()).await.unwrap();
        let lock = store
            .read::<ferry_model::ops::OpLock>(&keys.vm_op(&"web".parse().unwrap()))
            .await
            .unwrap();
        assert!(
            matches!(&lock, Read::Present(held) if held.value.op == second.id),
            "{lock:?}"
        );

        // A lock whose op record cannot be read may belong to a running op.
        store
            .put(
                &keys.op(&second.id),
                &serde_json::json!({"version": 1, "state": "garbled"}),
                None,
            )
            .await
            .unwrap();
        let unknown = api.create_op(migration()).await.unwrap_err();
        assert!(
            unknown.to_string().contains("already has an op in flight"),
            "{unknown}"
        );

        // A lock whose op is gone altogether is free.
        store.delete(&keys.op(&second.id)).await.unwrap();
        api.create_op(migration()).await.unwrap();
    }
}
