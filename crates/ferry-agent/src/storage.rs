//! Storage migration: a running VM's disk moves to another pool. A block mirror copies
//! the disk while the guest keeps writing (its writes go to both); when both are in
//! sync the device pivots to the copy; only then does the record name the new file and
//! the old file go. Until the pivot the old file is the disk, so any failure (or cancel)
//! removes the copy and leaves the VM as it was. An agent restarting mid-move finds the
//! job in QEMU (it runs on without us) or the device already on the new file.

use std::sync::Arc;
use std::time::Duration;

use ferry_model::cluster::{now_ms, VmRecord};
use ferry_model::events::EventKind;
use ferry_model::ops::{MoveDiskOp, OpKind, OpRecord, OpState, Progress};
use ferry_model::CacheMode;
use ferry_qemu::Machine;
use ferry_store::StoreError;

use crate::migration::{Context, OpHandle};
use crate::runtime::create_disk;

const MIRROR_TIMEOUT: Duration = Duration::from_secs(3600);

pub async fn move_disk(context: &Context<'_>, op: &OpRecord) {
    let OpKind::MoveDisk(move_disk) = &op.kind else {
        return;
    };
    let handle = OpHandle::new(context.store, &op.id);
    let vm = &move_disk.vm;
    let outcome = match context.runtime.machine(vm).await {
        Some(machine) if !machine.has_exited() => {
            mirror_and_pivot(context, &handle, op, move_disk, &machine).await
        }
        _ => Err((
            false,
            format!("VM {vm} is not running on {}", move_disk.host),
        )),
    };
    let (state, error, phase) = match &outcome {
        Ok(()) => (
            OpState::Completed,
            None,
            format!("disk {} on pool {}", move_disk.disk, move_disk.to_pool),
        ),
        Err((true, _)) => (OpState::Cancelled, None, "cancelled; disk not moved".into()),
        Err((false, reason)) => (
            OpState::Failed,
            Some(reason.clone()),
            "failed; disk not moved".into(),
        ),
    };
    if let Err(update) = handle
        .update(|op| {
            op.state = state;
            op.step = ferry_model::ops::OpStep::Finished;
            op.error = error.clone();
            op.phase = phase.clone();
            op.finished_ms = Some(now_ms());
        })
        .await
    {
        tracing::warn!("op {}: cannot record its end: {update}", handle.id());
    }
    let message = match &outcome {
        Ok(()) => format!(
            "disk {} of VM {vm} moved to pool {} ({})",
            move_disk.disk,
            move_disk.to_pool,
            move_disk.to.display()
        ),
        Err((_, reason)) => format!("disk {} of VM {vm} not moved: {reason}", move_disk.disk),
    };
    let kind = if outcome.is_ok() {
        EventKind::DiskMoved
    } else {
        EventKind::DiskMoveFailed
    };
    context.events.record(&vm.subject(), kind, &message).await;
}

/// `Err((cancelled, reason))`.
async fn mirror_and_pivot(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    op: &OpRecord,
    move_disk: &MoveDiskOp,
    machine: &Arc<Machine>,
) -> Result<(), (bool, String)> {
    let failed = |error: ferry_qemu::QemuError| (false, error.to_string());
    let disk = &move_disk.disk;
    let job = format!("move-{disk}");
    let target = format!("{disk}-{}", op.id.trim_start_matches("op-"));
    let open = machine.open_disk(disk).await.map_err(failed)?;
    if open.file != move_disk.to {
        let running = machine
            .block_jobs()
            .await
            .map_err(failed)?
            .into_iter()
            .any(|existing| existing.id == job);
        if !running {
            // What an interrupted earlier run left; absent is the usual case.
            forget_node(machine, &target).await;
            remove_file(&move_disk.to);
            create_disk(&move_disk.to, ferry_model::Bytes(open.virtual_size))
                .map_err(|error| (false, error))?;
            let direct = machine
                .spec()
                .disks
                .iter()
                .find(|spec| &spec.id == disk)
                .is_some_and(|spec| spec.cache == CacheMode::None);
            machine
                .add_qcow2_node(&target, &move_disk.to, direct)
                .await
                .map_err(failed)?;
            machine
                .start_mirror(&job, &open.node, &target)
                .await
                .map_err(failed)?;
        }
        set_phase(handle, format!("copying disk {disk}")).await;
        let ready = wait_ready(handle, machine, &job).await;
        let cancelled = handle
            .read()
            .await
            .ok()
            .flatten()
            .is_some_and(|op| op.cancel_requested);
        if ready.is_err() || cancelled {
            let cancel = async {
                machine.cancel_job(&job).await?;
                machine.wait_job_gone(&job, Duration::from_secs(60)).await
            };
            if let Err(error) = cancel.await {
                tracing::warn!("VM {}: mirror {job} did not end: {error}", move_disk.vm);
            }
            forget_node(machine, &target).await;
            remove_file(&move_disk.to);
            return match ready {
                Err(error) => Err(failed(error)),
                Ok(()) => Err((true, "cancelled on request".into())),
            };
        }
        set_phase(handle, format!("switching disk {disk} to the copy")).await;
        machine.complete_job(&job).await.map_err(failed)?;
        machine
            .wait_job_gone(&job, Duration::from_secs(60))
            .await
            .map_err(failed)?;
        let now = machine.open_disk(disk).await.map_err(failed)?;
        if now.file != move_disk.to {
            forget_node(machine, &target).await;
            remove_file(&move_disk.to);
            return Err((
                false,
                format!(
                    "the mirror ended but disk {disk} still reads {}",
                    now.file.display()
                ),
            ));
        }
        // The old nodes hold the old file (and its lock) until removed.
        forget_node(machine, &open.node).await;
        forget_node(machine, &format!("{}-file", open.node)).await;
        forget_node(machine, &format!("file-{disk}")).await;
    }
    point_record_at(context, move_disk).await?;
    rewrite_run_spec(machine, move_disk);
    remove_file(&move_disk.from);
    if let Some(dir) = move_disk
        .from
        .parent()
        .filter(|dir| dir.file_name().and_then(|name| name.to_str()) == Some(move_disk.vm.as_str()))
    {
        // Not empty (another disk of the VM) is the usual reason; it stays.
        if let Err(error) = std::fs::remove_dir(dir) {
            tracing::debug!("{} kept: {error}", dir.display());
        }
    }
    Ok(())
}

async fn set_phase(handle: &OpHandle<'_>, phase: String) {
    if let Err(error) = handle.update(|op| op.phase = phase.clone()).await {
        tracing::warn!("op {}: cannot record its phase: {error}", handle.id());
    }
}

/// Removes a block node; one that does not exist is what is wanted.
async fn forget_node(machine: &Machine, node: &str) {
    if let Err(error) = machine.delete_node(node).await {
        tracing::debug!("block node {node}: {error}");
    }
}

fn remove_file(path: &std::path::Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!("cannot remove {}: {error}", path.display()),
    }
}

/// Waits for the mirror to be in sync, writing its progress into the op; stops early on
/// a cancel request.
async fn wait_ready(
    handle: &OpHandle<'_>,
    machine: &Machine,
    job: &str,
) -> Result<(), ferry_qemu::QemuError> {
    let deadline = std::time::Instant::now() + MIRROR_TIMEOUT;
    loop {
        let state = machine.block_job(job).await?;
        if state.is_ready() {
            return Ok(());
        }
        let progress = Progress {
            transferred_bytes: state.offset,
            total_bytes: state.length,
            remaining_bytes: state.length.saturating_sub(state.offset),
            ..Progress::default()
        };
        let cancel = handle
            .update(|op| op.progress = Some(progress.clone()))
            .await
            .is_ok_and(|op| op.cancel_requested);
        if cancel {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(ferry_qemu::QemuError::Other(format!(
                "block job {job} not in sync after {MIRROR_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The record names the new file (retrying through etcd outages: the old file goes
/// only after this).
async fn point_record_at(
    context: &Context<'_>,
    move_disk: &MoveDiskOp,
) -> Result<(), (bool, String)> {
    let key = context.store.keys().vm_spec(&move_disk.vm);
    loop {
        let current = match context.store.get::<VmRecord>(&key).await {
            Ok(Some(current)) => current,
            Ok(None) => return Err((false, format!("VM {} was deleted", move_disk.vm))),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut record = current.value.clone();
        for disk in &mut record.spec.disks {
            if disk.id == move_disk.disk {
                disk.path = move_disk.to.clone();
                disk.pool = Some(move_disk.to_pool.clone());
                // A full mirror leaves a disk of its own: no longer on a template base.
                disk.base = None;
            }
        }
        match context
            .store
            .compare_and_swap(&key, current.mod_revision, &record)
            .await
        {
            Ok(_) => return Ok(()),
            Err(StoreError::Conflict { .. }) => continue,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A restarted agent reattaches from the run directory's spec: keep it true.
fn rewrite_run_spec(machine: &Machine, move_disk: &MoveDiskOp) {
    let mut spec = machine.spec().clone();
    for disk in &mut spec.disks {
        if disk.id == move_disk.disk {
            disk.path = move_disk.to.clone();
            disk.pool = Some(move_disk.to_pool.clone());
        }
    }
    if let Ok(json) = serde_json::to_vec_pretty(&spec) {
        // The spec file is what a restarted agent reattaches with.
        if let Err(error) = std::fs::write(machine.run_dir().spec_file(), json) {
            tracing::warn!(
                "cannot rewrite {}: {error}",
                machine.run_dir().spec_file().display()
            );
        }
    }
}
