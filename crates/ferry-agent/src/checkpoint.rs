//! Checkpoints and flatten, carried out by the host the VM runs on (or, for a stopped
//! VM, by the host that holds its disks).
//!
//! **Why internal qcow2 snapshots** (QEMU 10's `snapshot-save`/`snapshot-load`/
//! `snapshot-delete` jobs, and `blockdev-snapshot-internal-sync` in one transaction
//! for checkpoints without memory) rather than external overlays with the memory
//! migrated to a `mapped-ram` file:
//! - a checkpoint lives inside the VM's own disk files, so it moves with the VM for
//!   free: a live or quick migration and an HA restart open the same files on the
//!   shared pool, and every checkpoint is there (libvirt refuses to migrate a domain
//!   with snapshots; Ferry has nothing to carry);
//! - the chain never grows: a disk stays one file whatever the number of checkpoints,
//!   reads never walk a chain of overlays, and deleting a checkpoint only frees its
//!   clusters (nothing to merge, no block-commit under the guest);
//! - a revert is one job, disks and memory together, with no file renamed under a
//!   running QEMU.
//!
//! The price: the guest is paused while its memory is written (snapshot-save is not
//! live), which `ferry bench checkpoint` measures; and a checkpoint cannot leave with
//! a disk copied by a block mirror (storage migration), which is refused with that
//! reason.
//!
//! The UEFI variable store is a raw pflash image and cannot hold a snapshot: a copy of
//! it is taken beside the checkpoint while the vCPUs are stopped, and put back on a
//! revert (a revert with memory restores the flash contents from the saved state too:
//! QEMU's pflash writes them back after loading).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::types::CheckpointDone;
use ferry_model::checkpoint::checkpoint_disks;
use ferry_model::cluster::VmRecord;
use ferry_model::ops::CheckpointAction;
use ferry_model::Firmware;
use ferry_qemu::snapshot::{file_snapshot, file_snapshots, flatten_file, FileSnapshot};
use ferry_qemu::{Machine, RunState};

use crate::runtime::{Claim, Runtime};

/// Saving or loading a guest's memory, and deleting a snapshot, may take this long.
const JOB_TIMEOUT: Duration = Duration::from_secs(600);
/// Streaming a template base into a clone's disk may take this long.
const STREAM_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long an action waits for the reconciler's own action on the VM to end.
const CLAIM_WAIT: Duration = Duration::from_secs(30);
/// How long the guest agent may take to freeze or thaw the filesystems.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(30);

/// Carries out a checkpoint action on VM `record`; `nvram_copy` is where the UEFI
/// variable store's copy of this checkpoint lives.
pub async fn run(
    runtime: &Arc<Runtime>,
    record: &VmRecord,
    action: &CheckpointAction,
    nvram_copy: Option<&Path>,
) -> Result<CheckpointDone, String> {
    let vm = &record.spec.name;
    let _claim = claim(runtime, vm).await?;
    let disks = checkpoint_disks(&record.spec)?;
    match runtime.machine(vm).await {
        Some(machine) if !machine.has_exited() => {
            running(runtime, record, &machine, &disks, action, nvram_copy).await
        }
        Some(_) => Err(format!(
            "VM {vm} has just stopped here and is being cleaned up; try again"
        )),
        None => {
            let paths: Vec<PathBuf> = record
                .spec
                .disks
                .iter()
                .filter(|disk| disks.contains(&disk.id.as_str()))
                .map(|disk| disk.path.clone())
                .collect();
            let nvram = nvram_of(record).map(Path::to_path_buf);
            let action = action.clone();
            let nvram_copy = nvram_copy.map(Path::to_path_buf);
            tokio::task::spawn_blocking(move || {
                stopped(&paths, nvram.as_deref(), &action, nvram_copy.as_deref())
            })
            .await
            .map_err(|error| format!("checkpoint task: {error}"))?
        }
    }
}

/// Holds the VM against this host's reconciler. Its own actions on the VM (a status
/// report, the end of a switch-over) are short: wait for them.
async fn claim(runtime: &Arc<Runtime>, vm: &ferry_model::VmName) -> Result<Claim, String> {
    let deadline = Instant::now() + CLAIM_WAIT;
    loop {
        if let Some(claim) = runtime.claim(vm) {
            return Ok(claim);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "VM {vm} is busy with another action on this host; try again"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn nvram_of(record: &VmRecord) -> Option<&Path> {
    match &record.spec.firmware {
        Firmware::Uefi { nvram } => Some(nvram),
        Firmware::Bios => None,
    }
}

fn copy_file(from: &Path, to: &Path) -> Result<(), String> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    }
    std::fs::copy(from, to).map(drop).map_err(|error| {
        format!(
            "cannot copy {} to {}: {error}",
            from.display(),
            to.display()
        )
    })
}

fn remove_copy(copy: Option<&Path>) -> Result<(), String> {
    let Some(copy) = copy else { return Ok(()) };
    match std::fs::remove_file(copy) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(format!("cannot remove {}: {error}", copy.display())),
    }
}

async fn nodes_of(machine: &Machine, disks: &[&str]) -> Result<Vec<String>, String> {
    let mut nodes = Vec::new();
    for disk in disks {
        let open = machine
            .open_disk(disk)
            .await
            .map_err(|error| error.to_string())?;
        nodes.push(open.node);
    }
    Ok(nodes)
}

async fn running(
    runtime: &Arc<Runtime>,
    record: &VmRecord,
    machine: &Machine,
    disks: &[&str],
    action: &CheckpointAction,
    nvram_copy: Option<&Path>,
) -> Result<CheckpointDone, String> {
    let vm = &record.spec.name;
    let nodes = nodes_of(machine, disks).await?;
    let nvram = nvram_of(record);
    let error = |error: ferry_qemu::QemuError| error.to_string();
    match action {
        CheckpointAction::Create {
            tag,
            memory,
            quiesce,
        } => {
            let frozen = if *quiesce {
                let count = machine
                    .guest_agent()
                    .fsfreeze_freeze(FREEZE_TIMEOUT)
                    .await
                    .map_err(|error| {
                        format!(
                            "VM {vm}: the guest agent could not freeze the filesystems: {error}"
                        )
                    })?;
                Some(count)
            } else {
                None
            };
            let was_running = machine.status().await.map_err(error)? == RunState::Running;
            let paused = Instant::now();
            // The vCPUs stop for the memory (the save would stop them anyway) and for
            // the NVRAM copy, so that the flash and the disks are of one instant.
            let stops = *memory || nvram.is_some();
            if stops && was_running {
                machine.pause().await.map_err(error)?;
            }
            let mut taken = match (nvram, nvram_copy) {
                (Some(nvram), Some(copy)) => copy_file(nvram, copy),
                _ => Ok(()),
            };
            if taken.is_ok() {
                taken = if *memory {
                    machine
                        .snapshot_save(tag, &nodes[0], &nodes, JOB_TIMEOUT)
                        .await
                        .map_err(error)
                } else {
                    machine.snapshot_disks(tag, &nodes).await.map_err(error)
                };
            }
            let resumed = if stops && was_running {
                machine.resume().await.map_err(error)
            } else {
                Ok(())
            };
            let paused_ms = paused.elapsed().as_millis() as u64;
            let thawed = if frozen.is_some() {
                machine
                    .guest_agent()
                    .fsfreeze_thaw(FREEZE_TIMEOUT)
                    .await
                    .map(drop)
                    .map_err(|error| format!("VM {vm}: thawing the filesystems failed: {error}"))
            } else {
                Ok(())
            };
            if let Err(error) = taken {
                if let Err(cleanup) = remove_copy(nvram_copy) {
                    tracing::warn!("{cleanup}");
                }
                return Err(error);
            }
            resumed?;
            thawed?;
            let vm_state_bytes = machine
                .disk_snapshots(disks[0])
                .await
                .map_err(error)?
                .into_iter()
                .find(|snapshot| snapshot.name == *tag)
                .map(|snapshot| snapshot.vm_state_size)
                .ok_or_else(|| format!("VM {vm}: snapshot {tag} is not on disk {}", disks[0]))?;
            Ok(CheckpointDone {
                paused_ms: Some(paused_ms).filter(|_| stops && was_running),
                vm_state_bytes,
                frozen_filesystems: frozen,
                restarted: false,
            })
        }
        CheckpointAction::Revert { tag, memory } if *memory => {
            let started = Instant::now();
            machine
                .snapshot_load(tag, &nodes[0], &nodes, JOB_TIMEOUT)
                .await
                .map_err(error)?;
            Ok(CheckpointDone {
                paused_ms: Some(started.elapsed().as_millis() as u64),
                ..CheckpointDone::default()
            })
        }
        CheckpointAction::Revert { tag, .. } => {
            // Disks alone: the running guest's memory belongs to other disk contents,
            // so it is powered off, the disks go back, and it boots again here.
            machine.kill().await.map_err(error)?;
            runtime.forget(vm).await?;
            let paths: Vec<PathBuf> = record
                .spec
                .disks
                .iter()
                .filter(|disk| disks.contains(&disk.id.as_str()))
                .map(|disk| disk.path.clone())
                .collect();
            let (tag, nvram, nvram_copy) = (
                tag.clone(),
                nvram.map(Path::to_path_buf),
                nvram_copy.map(Path::to_path_buf),
            );
            tokio::task::spawn_blocking(move || {
                revert_files(&paths, &tag, nvram.as_deref(), nvram_copy.as_deref())
            })
            .await
            .map_err(|error| format!("revert task: {error}"))??;
            Ok(CheckpointDone {
                restarted: true,
                ..CheckpointDone::default()
            })
        }
        CheckpointAction::Delete { tag } => {
            machine
                .snapshot_delete(tag, &nodes, JOB_TIMEOUT)
                .await
                .map_err(error)?;
            remove_copy(nvram_copy)?;
            Ok(CheckpointDone::default())
        }
    }
}

/// The disks of a stopped VM (all or none), through `qemu-img`.
fn stopped(
    paths: &[PathBuf],
    nvram: Option<&Path>,
    action: &CheckpointAction,
    nvram_copy: Option<&Path>,
) -> Result<CheckpointDone, String> {
    match action {
        CheckpointAction::Create { memory: true, .. } => {
            Err("a stopped VM has no memory to save: checkpoint it without memory".into())
        }
        CheckpointAction::Create { quiesce: true, .. } => Err(
            "a stopped VM has no guest agent to quiesce it; its disks are consistent already"
                .into(),
        ),
        CheckpointAction::Create { tag, .. } => {
            for (index, path) in paths.iter().enumerate() {
                if let Err(error) = file_snapshot(path, tag, FileSnapshot::Create) {
                    for made in &paths[..index] {
                        if let Err(cleanup) = file_snapshot(made, tag, FileSnapshot::Delete) {
                            tracing::warn!("{cleanup}");
                        }
                    }
                    return Err(error);
                }
            }
            if let (Some(nvram), Some(copy)) = (nvram, nvram_copy) {
                copy_file(nvram, copy)?;
            }
            Ok(CheckpointDone::default())
        }
        CheckpointAction::Revert { tag, .. } => {
            revert_files(paths, tag, nvram, nvram_copy)?;
            Ok(CheckpointDone::default())
        }
        CheckpointAction::Delete { tag } => {
            for path in paths {
                let has_it = file_snapshots(path)?
                    .iter()
                    .any(|snapshot| snapshot.name == *tag);
                if has_it {
                    file_snapshot(path, tag, FileSnapshot::Delete)?;
                }
            }
            remove_copy(nvram_copy)?;
            Ok(CheckpointDone::default())
        }
    }
}

/// Every disk back to `tag` (each is checked to hold it first, so none is reverted
/// alone), then the NVRAM copy.
fn revert_files(
    paths: &[PathBuf],
    tag: &str,
    nvram: Option<&Path>,
    nvram_copy: Option<&Path>,
) -> Result<(), String> {
    for path in paths {
        if !file_snapshots(path)?
            .iter()
            .any(|snapshot| snapshot.name == tag)
        {
            return Err(format!("{} holds no checkpoint {tag}", path.display()));
        }
    }
    for path in paths {
        file_snapshot(path, tag, FileSnapshot::Apply)?;
    }
    if let (Some(nvram), Some(copy)) = (nvram, nvram_copy) {
        copy_file(copy, nvram)?;
    }
    Ok(())
}

/// Loads checkpoint `tag` (with memory) into a QEMU launched with its vCPUs stopped:
/// the start of a stopped VM reverted to it.
pub async fn load_at_start(
    machine: &Machine,
    spec: &ferry_model::VmSpec,
    tag: &str,
) -> Result<(), String> {
    let disks = checkpoint_disks(spec)?;
    let nodes = nodes_of(machine, &disks).await?;
    machine
        .snapshot_load(tag, &nodes[0], &nodes, JOB_TIMEOUT)
        .await
        .map_err(|error| error.to_string())
}

/// Copies the template base into each linked disk of the VM (the guest keeps running
/// and writing: `block-stream` copies only what the overlay does not have yet).
pub async fn flatten(runtime: &Arc<Runtime>, record: &VmRecord) -> Result<(), String> {
    let vm = &record.spec.name;
    let _claim = claim(runtime, vm).await?;
    let linked: Vec<_> = record
        .spec
        .disks
        .iter()
        .filter(|disk| disk.base.is_some())
        .collect();
    match runtime.machine(vm).await {
        Some(machine) if !machine.has_exited() => {
            for disk in linked {
                let node = machine
                    .open_disk(&disk.id)
                    .await
                    .map_err(|error| error.to_string())?
                    .node;
                machine
                    .stream_into(&format!("flatten-{}", disk.id), &node, STREAM_TIMEOUT)
                    .await
                    .map_err(|error| format!("disk {}: {error}", disk.id))?;
            }
            Ok(())
        }
        Some(_) => Err(format!(
            "VM {vm} has just stopped here and is being cleaned up; try again"
        )),
        None => {
            let paths: Vec<PathBuf> = linked.iter().map(|disk| disk.path.clone()).collect();
            tokio::task::spawn_blocking(move || {
                paths.iter().try_for_each(|path| flatten_file(path))
            })
            .await
            .map_err(|error| format!("flatten task: {error}"))?
        }
    }
}
