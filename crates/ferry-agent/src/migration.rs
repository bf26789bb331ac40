//! Live and quick migration, carried out by the two agents involved.
//!
//! # The state machine
//!
//! The placement record (`vms/{vm}/placement`) is the only truth about where the VM may
//! run; the op record (`ops/{id}`) holds the steps and the measurements. The guest runs
//! in exactly one QEMU at every moment because the destination QEMU is started with its
//! vCPUs stopped (`-incoming defer -S`) and is resumed only by the agent the placement
//! names, and the source resumes only while the placement still names it.
//!
//! ```text
//!  op queued ──manager: slot free, CAS placement Assigned(src) → Migrating(src→dst)──▶ running
//!
//!  running, on the source agent                    on the destination agent
//!  ─────────────────────────────                   ────────────────────────
//!  1 preparing ◀─────────────────────────────────  QEMU -incoming defer -S, NBD export of
//!    wait for incoming/{op}                        local-disk copies; write incoming/{op}
//!  2 copying disks (local pools only): mirror to NBD, wait until in sync
//!  3 copying memory (live): migrate, progress into the op, cancel honoured; with local
//!    disks QEMU stops at pre-switchover (vCPUs paused, I/O drained): the mirrors end
//!    there, in sync, before the memory's last pass (no write is left behind)
//!    saving state (quick): stop vCPUs, save to the shared pool (fsync), step saved
//!  4 switch-over: QEMU completed (source paused) ─CAS placement → Assigned(dst), gen+1─▶
//!                                                  placement names me, lease fresh: load
//!                                                  state (quick), cont (retried; a failure
//!                                                  is reported, never taken for success),
//!                                                  announce, write resumed_ms
//!  5 source QEMU killed (quick: only now, after the CAS), op completed; source copies of
//!    local disks are removed only once the destination confirmed it resumed
//!
//!  failure or cancel before the switch-over CAS (any of 1-3):
//!    source: migrate_cancel, vCPUs resumed, op failed|cancelled, then placement back to
//!    Assigned(src); destination: op final or placement not naming it → kill its QEMU,
//!    remove its run dir and disk copies.
//!  after the CAS: there is no way back; the destination runs the guest (a quick restore
//!    that fails cold-boots from the shared disk rather than lose the VM).
//! ```
//!
//! Each agent can restart at any point: the reconciler sees the placement still
//! `Migrating` and calls the driver again, which reads where it is from QEMU's own state
//! (`query-migrate`) and from the op's step (`OpStep`), never from memory or the words
//! of its phase. A destination that restarts after the CAS finds its QEMU paused (or
//! still waiting for the state) under a placement naming it, and finishes the resume. A source host that dies
//! leaves the placement naming it: its VM is the HA rules' to restart, and the
//! destination removes its never-resumed QEMU once the op is final.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::ops::EventLog;
use ferry_model::cluster::{
    now_ms, Placement, PlacementPhase, VmRecord, VmState, VmStatus, RECORD_VERSION,
};
use ferry_model::events::EventKind;
use ferry_model::ops::{
    IncomingRecord, MigrateOp, MigrationMode, MigrationOutcome, OpKind, OpRecord, OpState, OpStep,
    Progress,
};
use ferry_model::VmName;
use ferry_qemu::{Machine, MigrationInfo, MigrationStatus, RunState};
use ferry_store::{Store, StoreError, Versioned};

use crate::runtime::{create_disk, Runtime};

/// How long the destination may take to get its QEMU ready.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the destination may take to resume after the switch-over.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);
/// How often progress reaches the op record.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);
/// A local-disk copy must converge within this.
const DISK_COPY_TIMEOUT: Duration = Duration::from_secs(1800);

/// What the drivers need from the agent.
pub struct Context<'a> {
    pub store: &'a Store,
    pub runtime: &'a Arc<Runtime>,
    pub events: &'a EventLog,
}

/// Why a migration stopped before its switch-over.
#[derive(Debug)]
struct Stopped {
    cancelled: bool,
    reason: String,
}

impl From<ferry_qemu::QemuError> for Stopped {
    fn from(error: ferry_qemu::QemuError) -> Stopped {
        Stopped::failed(error.to_string())
    }
}

impl Stopped {
    fn failed(reason: impl Into<String>) -> Stopped {
        Stopped {
            cancelled: false,
            reason: reason.into(),
        }
    }
}

/// Reads and updates one op record by compare-and-swap (the API may set
/// `cancel_requested` at any time).
pub struct OpHandle<'a> {
    store: &'a Store,
    id: String,
    key: String,
}

impl<'a> OpHandle<'a> {
    pub fn new(store: &'a Store, id: &str) -> OpHandle<'a> {
        OpHandle {
            store,
            id: id.to_string(),
            key: store.keys().op(id),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub async fn read(&self) -> Result<Option<OpRecord>, StoreError> {
        Ok(self
            .store
            .get::<OpRecord>(&self.key)
            .await?
            .map(|op| op.value))
    }

    /// Applies `change` to the current record; retries while others write.
    pub async fn update(&self, change: impl Fn(&mut OpRecord)) -> Result<OpRecord, StoreError> {
        loop {
            let Some(current) = self.store.get::<OpRecord>(&self.key).await? else {
                return Err(StoreError::Conflict {
                    key: self.key.clone(),
                });
            };
            let mut op = current.value;
            change(&mut op);
            match self
                .store
                .compare_and_swap(&self.key, current.mod_revision, &op)
                .await
            {
                Ok(_) => return Ok(op),
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Updates with retries through an etcd outage: used for steps that must land.
    async fn update_until_done(&self, change: impl Fn(&mut OpRecord)) -> Option<OpRecord> {
        for attempt in 0.. {
            match self.update(&change).await {
                Ok(op) => return Some(op),
                Err(StoreError::Conflict { .. }) => return None,
                Err(error) => {
                    if attempt % 25 == 0 {
                        tracing::warn!("cannot update {}: {error}; retrying", self.key);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        None
    }

    /// Records the step and its wording; the driver goes on if etcd is away (the
    /// step is rewritten at the next one, and QEMU's own state is read on a restart).
    async fn set_step(&self, step: OpStep, phase: &str) {
        let phase = phase.to_string();
        if let Err(error) = self
            .update(|op| {
                op.step = step;
                op.phase = phase.clone();
            })
            .await
        {
            tracing::warn!("op {}: cannot record step {step:?}: {error}", self.id);
        }
    }
}

// ----- the source ---------------------------------------------------------------------

/// The source agent's side. Called (again) whenever the placement says `Migrating` away
/// from this host and no driver holds the VM.
pub async fn migrate_out(context: &Context<'_>, vm: &VmName, placement: Versioned<Placement>) {
    let Some(migration) = placement.value.migration.clone() else {
        return;
    };
    let handle = OpHandle::new(context.store, &migration.op);
    let op = match handle.read().await {
        Ok(Some(op)) => op,
        Ok(None) => {
            // The op record is gone: nothing can finish this migration; stay here.
            restore_placement(context.store, vm, &migration.op).await;
            return;
        }
        Err(error) => {
            tracing::warn!(
                "migration of VM {vm}: cannot read op {}: {error}",
                migration.op
            );
            return;
        }
    };
    let OpKind::Migrate(migrate) = op.kind.clone() else {
        return;
    };
    if op.state.is_final() {
        // A previous run ended the op but not the placement.
        if op.state != OpState::Completed {
            restore_placement(context.store, vm, &op.id).await;
        }
        return;
    }
    let started = op.started_ms.unwrap_or_else(now_ms);
    let result = match context.runtime.machine(vm).await {
        Some(machine) if !machine.has_exited() => {
            write_status(context, vm, VmState::Migrating, Some(machine.pid())).await;
            match migrate.mode {
                MigrationMode::Live => {
                    live_source(context, &handle, &migrate, &machine, op.step).await
                }
                MigrationMode::Quick => {
                    quick_source(context, &handle, &migrate, &machine, op.step).await
                }
            }
        }
        _ if migrate.mode == MigrationMode::Quick && op.step >= OpStep::StateSaved => {
            // The agent restarted after the state was saved and the source QEMU ended.
            match switch_over(context, &handle, &migrate).await {
                Ok(completed_ms) => Ok((
                    await_resume(context, &handle, &migrate, completed_ms).await,
                    None,
                )),
                Err(stopped) => Err(stopped),
            }
        }
        _ => Err(Stopped::failed(format!(
            "the QEMU of VM {vm} on {} is gone",
            migrate.from
        ))),
    };
    match result {
        Ok((switched, info)) => {
            finish(context, &handle, &migrate, started, switched, info).await;
        }
        Err(stopped) => {
            roll_back(context, &handle, &migrate, stopped).await;
        }
    }
}

/// Live, steps 1-4 on the source. Returns the switch-over's time and QEMU's numbers.
async fn live_source(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    machine: &Arc<Machine>,
    step: OpStep,
) -> Result<(Switched, Option<MigrationInfo>), Stopped> {
    let vm = &migrate.vm;
    let qemu_state = machine.query_migrate().await?;
    // Only the op says whether this QEMU's migration state is ours: a VM that arrived
    // by migration reports that incoming migration as `completed` too.
    let in_flight = matches!(
        qemu_state.status,
        MigrationStatus::Setup
            | MigrationStatus::Active
            | MigrationStatus::PostcopyActive
            | MigrationStatus::PreSwitchover
            | MigrationStatus::Device
    );
    let sent = qemu_state.status == MigrationStatus::Completed
        && matches!(
            machine.status().await,
            Ok(RunState::Postmigrate) | Ok(RunState::FinishMigrate)
        );
    let resuming = step == OpStep::CopyingMemory && (in_flight || sent);
    if !resuming {
        handle
            .set_step(
                OpStep::Preparing,
                &format!("preparing the destination on {}", migrate.to),
            )
            .await;
        let incoming = wait_incoming(context.store, handle, PREPARE_TIMEOUT).await?;
        let uri = incoming
            .uri
            .ok_or_else(|| Stopped::failed("the destination gave no migration address"))?;
        // One set of credentials for both streams: the disks' and the memory's.
        let tls = match context.runtime.config.migration.tls {
            true => Some(
                machine
                    .send_migration_over_tls(
                        &context.runtime.config.paths.qemu_tls_dir(),
                        migrate.to.as_str(),
                    )
                    .await?,
            ),
            false => None,
        };
        if !migrate.disk_copies.is_empty() {
            let nbd = incoming
                .nbd
                .ok_or_else(|| Stopped::failed("the destination exports no disk copies"))?;
            copy_disks(handle, migrate, machine, &nbd, tls).await?;
        }
        let mut capabilities = vec![("auto-converge", true), ("events", true)];
        if migrate.postcopy_after_ms.is_some() {
            capabilities.push(("postcopy-ram", true));
        }
        // With local disks the last memory pass waits for the mirrors to end in sync.
        capabilities.push(("pause-before-switchover", !migrate.disk_copies.is_empty()));
        machine.set_migration_capabilities(&capabilities).await?;
        let mut parameters = serde_json::json!({
            "downtime-limit": migrate.downtime_limit_ms,
            "max-bandwidth": migrate.bandwidth.0,
        });
        if tls.is_none() {
            // A VM that came in over TLS still has the server side's credentials set.
            parameters["tls-creds"] = serde_json::json!("");
        }
        machine.set_migration_parameters(parameters).await?;
        handle
            .set_step(OpStep::CopyingMemory, "copying memory")
            .await;
        machine.migrate(&uri).await?;
    }
    let info = follow_migration(handle, migrate, machine).await?;
    tracing::info!("VM {vm}: QEMU reports the migration {:?}", info.status);
    let completed_ms = switch_over(context, handle, migrate).await?;
    let mut switched = await_resume(context, handle, migrate, completed_ms).await;
    switched.postcopy = info.status == MigrationStatus::PostcopyActive;
    if switched.postcopy {
        // The guest runs on the destination; the rest of its memory still flows from here.
        match machine
            .wait_migration(Duration::from_millis(100), Duration::from_secs(600))
            .await
        {
            Ok(info) if info.status == MigrationStatus::Completed => {}
            Ok(info) => tracing::warn!("VM {vm}: post-copy ended {:?}", info.status),
            Err(error) => tracing::warn!("VM {vm}: post-copy did not finish: {error}"),
        }
    }
    let info = machine.query_migrate().await.ok().or(Some(info));
    Ok((switched, info))
}

/// Polls QEMU (woken early by its MIGRATION events) until the switch-over point:
/// completed, or post-copy started. Writes progress; honours cancel.
async fn follow_migration(
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    machine: &Arc<Machine>,
) -> Result<MigrationInfo, Stopped> {
    let mut events = machine.qmp().subscribe();
    let began = Instant::now();
    let mut last_write = Instant::now() - PROGRESS_EVERY;
    let mut last_bytes = (Instant::now(), 0u64);
    let mut postcopy_started = false;
    let mut continued = false;
    loop {
        let info = machine
            .query_migrate()
            .await
            .map_err(|error| Stopped::failed(format!("source QEMU: {error}")))?;
        match &info.status {
            MigrationStatus::Completed => {
                if matches!(machine.status().await, Ok(RunState::Running)) {
                    return Err(Stopped::failed(
                        "QEMU reports the migration completed but the guest still runs here",
                    ));
                }
                return Ok(info);
            }
            MigrationStatus::PostcopyActive => return Ok(info),
            MigrationStatus::PreSwitchover if !continued => {
                // vCPUs stopped and I/O drained: each mirror ends now, in sync (a cancel
                // of a ready mirror copies what is left and keeps the source's disk), and
                // only then does the memory's last pass go. A driver that restarted here
                // finds some mirrors ended already.
                let running = machine.block_jobs().await?;
                for copy in &migrate.disk_copies {
                    let job = mirror_job(&copy.disk);
                    if running.iter().any(|listed| listed.id == job) {
                        machine.cancel_job(&job).await?;
                        machine.wait_job_gone(&job, DISK_FINAL_SYNC).await?;
                    }
                }
                machine.migrate_continue().await?;
                continued = true;
            }
            MigrationStatus::Failed => {
                return Err(Stopped::failed(format!(
                    "QEMU's migration failed: {}",
                    info.error
                        .clone()
                        .unwrap_or_else(|| "no reason given".into())
                )))
            }
            MigrationStatus::Cancelled | MigrationStatus::Cancelling => {
                return Err(Stopped {
                    cancelled: true,
                    reason: "cancelled".into(),
                })
            }
            _ => {}
        }
        if last_write.elapsed() >= PROGRESS_EVERY {
            last_write = Instant::now();
            let transferred = info.transferred_bytes.unwrap_or(0);
            let seconds = last_bytes.0.elapsed().as_secs_f64().max(0.001);
            let throughput = (transferred.saturating_sub(last_bytes.1) as f64 / seconds) as u64;
            last_bytes = (Instant::now(), transferred);
            let remaining = info.remaining_bytes.unwrap_or(0);
            let progress = Progress {
                transferred_bytes: transferred,
                total_bytes: info.total_bytes.unwrap_or(0),
                remaining_bytes: remaining,
                dirty_pages_rate: info.dirty_pages_rate.unwrap_or(0),
                throughput,
                expected_remaining_ms: (throughput > 0).then(|| remaining * 1000 / throughput),
            };
            let cancel = handle
                .update(|op| op.progress = Some(progress.clone()))
                .await
                .map(|op| op.cancel_requested)
                .unwrap_or(false);
            if cancel {
                // The roll-back cancels again and resumes the source whatever this says.
                if let Err(error) = machine.migrate_cancel().await {
                    tracing::warn!("VM {}: migrate_cancel: {error}", migrate.vm);
                }
                if let Err(error) = machine
                    .wait_migration(Duration::from_millis(50), Duration::from_secs(30))
                    .await
                {
                    tracing::warn!(
                        "VM {}: the cancelled migration did not end: {error}",
                        migrate.vm
                    );
                }
                return Err(Stopped {
                    cancelled: true,
                    reason: "cancelled on request".into(),
                });
            }
        }
        if let Some(after) = migrate.postcopy_after_ms {
            if !postcopy_started
                && info.status == MigrationStatus::Active
                && began.elapsed() >= Duration::from_millis(after)
            {
                postcopy_started = true;
                handle
                    .set_step(OpStep::CopyingMemory, "switching to post-copy")
                    .await;
                if let Err(error) = machine.migrate_start_postcopy().await {
                    tracing::warn!("VM {}: cannot start post-copy: {error}", migrate.vm);
                }
            }
        }
        tokio::select! {
            _ = events.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Mirrors every local disk to the destination's NBD export until both are in sync.
/// The mirrors keep running (and mirroring the guest's writes) through the memory copy;
/// they end at the switch-over, with the source paused.
async fn copy_disks(
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    machine: &Arc<Machine>,
    nbd: &str,
    tls: Option<&str>,
) -> Result<(), Stopped> {
    let (host, port) = nbd
        .rsplit_once(':')
        .and_then(|(host, port)| Some((host.to_string(), port.parse::<u16>().ok()?)))
        .ok_or_else(|| Stopped::failed(format!("bad NBD address {nbd:?}")))?;
    handle.set_step(OpStep::CopyingDisks, "copying disks").await;
    for copy in &migrate.disk_copies {
        let job = mirror_job(&copy.disk);
        let target = format!("copy-{}", copy.disk);
        let open = machine.open_disk(&copy.disk).await?;
        let existing = machine.block_jobs().await.unwrap_or_default();
        if !existing.iter().any(|running| running.id == job) {
            // A node left by an earlier, interrupted run; absent is the usual case.
            if let Err(error) = machine.delete_node(&target).await {
                tracing::debug!("VM {}: no old node {target}: {error}", migrate.vm);
            }
            machine
                .add_nbd_node(
                    &target,
                    &host,
                    port,
                    &copy.disk,
                    tls.map(|creds| (creds, migrate.to.as_str())),
                )
                .await
                .map_err(|error| Stopped::failed(format!("NBD to the destination: {error}")))?;
            machine.start_mirror(&job, &open.node, &target).await?;
        }
        machine.wait_job_ready(&job, DISK_COPY_TIMEOUT).await?;
    }
    Ok(())
}

fn mirror_job(disk: &str) -> String {
    format!("copy-{disk}")
}

/// How long the mirrors may take to end once the guest is paused at pre-switchover.
const DISK_FINAL_SYNC: Duration = Duration::from_secs(120);

/// Quick, steps 1-4 on the source.
async fn quick_source(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    machine: &Arc<Machine>,
    step: OpStep,
) -> Result<(Switched, Option<MigrationInfo>), Stopped> {
    let vm = &migrate.vm;
    let file = state_file(context.runtime, handle.id());
    let qemu_state = machine.query_migrate().await?;
    let paused_at;
    if qemu_state.status == MigrationStatus::Completed && step >= OpStep::StateSaved {
        paused_at = None;
    } else {
        handle
            .set_step(
                OpStep::Preparing,
                &format!("preparing the destination on {}", migrate.to),
            )
            .await;
        wait_incoming(context.store, handle, PREPARE_TIMEOUT).await?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir).map_err(|error| {
                Stopped::failed(format!("cannot create {}: {error}", dir.display()))
            })?;
        }
        handle.set_step(OpStep::SavingState, "saving state").await;
        paused_at = Some(now_ms());
        machine.pause().await?;
        machine
            .set_migration_parameters(serde_json::json!({
                "max-bandwidth": migrate.bandwidth.0,
                // A file on the shared pool, not a peer: no TLS (a VM that came in
                // live still has the server side's credentials set).
                "tls-creds": "",
            }))
            .await?;
        // dd with fsync: the state must be on the shared pool before it counts as saved.
        let uri = format!(
            "exec:dd of={} bs=1M conv=fsync status=none",
            shell_quote(&file)
        );
        machine.migrate(&uri).await?;
        let info = machine
            .wait_migration(Duration::from_millis(20), Duration::from_secs(600))
            .await?;
        if info.status != MigrationStatus::Completed {
            // Half a state is no state; the source still holds the guest.
            remove_file_logged(&file);
            return Err(Stopped::failed(format!(
                "saving the state failed: {}",
                info.error.unwrap_or_else(|| format!("{:?}", info.status))
            )));
        }
        handle.set_step(OpStep::StateSaved, "state saved").await;
    }
    let info = machine.query_migrate().await.ok();
    // The placement moves first: until it does, the paused source (its disks released
    // at the save's end) is the way back.
    let completed_ms = switch_over(context, handle, migrate).await?;
    // The saved state is now the VM; the paused source must never run again.
    if let Err(error) = context.runtime.kill(vm).await {
        tracing::warn!("VM {vm}: the source QEMU after the switch-over: {error}");
    }
    let switched = await_resume(context, handle, migrate, completed_ms).await;
    let info = info.map(|mut info| {
        // For a quick migration the guest's pause is the whole save and restore.
        if let (Some(paused_at), Some(resumed)) = (paused_at, switched.resumed_ms) {
            info.downtime_ms = Some(resumed.saturating_sub(paused_at));
        }
        info
    });
    Ok((switched, info))
}

/// Where a quick migration's state goes: on the shared pool, which both hosts see.
fn state_file(runtime: &Runtime, op: &str) -> PathBuf {
    let pool = runtime
        .config
        .shared_pool()
        .map(|pool| pool.path.clone())
        .unwrap_or_else(|| runtime.config.paths.run_dir.join("pool"));
    pool.join(".ferry")
        .join("migration")
        .join(format!("{op}.state"))
}

fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The moment the guest moved.
struct Switched {
    /// QEMU finished on the source (ms since the epoch).
    completed_ms: u64,
    /// The destination resumed the guest; `None`: it did not confirm within the wait.
    resumed_ms: Option<u64>,
    /// The switch-over happened in post-copy.
    postcopy: bool,
}

/// Step 4: moves the placement to the destination (with the disks' new paths) in one
/// transaction. Returns when QEMU completed on the source (ms since the epoch).
async fn switch_over(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
) -> Result<u64, Stopped> {
    let completed_ms = now_ms();
    let vm = &migrate.vm;
    // Past QEMU's completion there is no way back: retry through etcd outages.
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        match move_placement(context.store, vm, migrate).await {
            Ok(()) => break,
            Err(MoveError::Changed(reason)) => return Err(Stopped::failed(reason)),
            Err(MoveError::Store(error)) => {
                if attempt % 25 == 1 {
                    tracing::warn!("VM {vm}: cannot move the placement yet: {error}");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    handle
        .set_step(OpStep::Resuming, &format!("resuming on {}", migrate.to))
        .await;
    Ok(completed_ms)
}

/// Waits for the destination to say it resumed the guest; a silence is reported as
/// such, never made up into a resume time.
async fn await_resume(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    completed_ms: u64,
) -> Switched {
    let resumed = wait_resumed(context.store, handle, RESUME_TIMEOUT, migrate).await;
    if resumed.is_none() {
        tracing::warn!(
            "VM {}: {} did not confirm the resume within {RESUME_TIMEOUT:?}",
            migrate.vm,
            migrate.to
        );
    }
    Switched {
        completed_ms,
        resumed_ms: resumed.and_then(|incoming| incoming.resumed_ms),
        postcopy: false,
    }
}

enum MoveError {
    Store(StoreError),
    Changed(String),
}

/// One transaction: the placement (still ours, still this migration) moves to the
/// destination, one generation on, and the VM's disks point at their copies. Already
/// moved (a retry after a lost answer) counts as done.
async fn move_placement(store: &Store, vm: &VmName, migrate: &MigrateOp) -> Result<(), MoveError> {
    let keys = store.keys();
    let placement_key = keys.vm_placement(vm);
    let record_key = keys.vm_spec(vm);
    let current = store
        .get::<Placement>(&placement_key)
        .await
        .map_err(MoveError::Store)?
        .ok_or_else(|| MoveError::Changed(format!("VM {vm}'s placement vanished")))?;
    if current.value.host == migrate.to && current.value.migration.is_none() {
        return Ok(());
    }
    if current.value.host != migrate.from || current.value.migrating_to() != Some(&migrate.to) {
        return Err(MoveError::Changed(format!(
            "VM {vm}'s placement changed during the migration (now {:?} on {})",
            current.value.phase, current.value.host
        )));
    }
    let record = store
        .get::<VmRecord>(&record_key)
        .await
        .map_err(MoveError::Store)?
        .ok_or_else(|| MoveError::Changed(format!("VM {vm} was deleted")))?;
    let moved = Placement {
        version: RECORD_VERSION,
        host: migrate.to.clone(),
        generation: current.value.generation + 1,
        phase: PlacementPhase::Assigned,
        migration: None,
    };
    let mut writes = vec![(
        placement_key.as_str(),
        current.mod_revision,
        ferry_store::encode(&moved),
    )];
    if !migrate.disk_copies.is_empty() {
        let mut updated = record.value.clone();
        for disk in &mut updated.spec.disks {
            if let Some(copy) = migrate.disk_copies.iter().find(|copy| copy.disk == disk.id) {
                disk.path = copy.to.clone();
                disk.pool = Some(copy.to_pool.clone());
                // A full mirror leaves a disk of its own: no longer on a template base.
                disk.base = None;
            }
        }
        writes.push((
            record_key.as_str(),
            record.mod_revision,
            ferry_store::encode(&updated),
        ));
    }
    match store.compare_and_swap_all(&writes).await {
        Ok(_) => Ok(()),
        // Someone wrote in between: look again.
        Err(StoreError::Conflict { .. }) => Err(MoveError::Store(StoreError::Conflict {
            key: placement_key.clone(),
        })),
        Err(error) => Err(MoveError::Store(error)),
    }
}

/// Step 5, after a switch-over.
async fn finish(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    started_ms: u64,
    switched: Switched,
    info: Option<MigrationInfo>,
) {
    let vm = &migrate.vm;
    // Paused since the switch-over; the placement names the destination now. A QEMU
    // that survives is kept in view, and the reconciler kills it as a stray.
    if let Err(error) = context.runtime.kill(vm).await {
        tracing::warn!("VM {vm}: the source QEMU after the switch-over: {error}");
    }
    let resumed = switched.resumed_ms.is_some();
    if resumed {
        for copy in &migrate.disk_copies {
            remove_vm_file(&copy.from, vm);
        }
    }
    let resumed_ms = switched.resumed_ms.unwrap_or_else(now_ms);
    let total_ms = resumed_ms.saturating_sub(started_ms);
    let qemu_total = info.as_ref().and_then(|info| info.total_time_ms);
    let outcome = MigrationOutcome {
        qemu_downtime_ms: info.as_ref().and_then(|info| info.downtime_ms),
        qemu_total_ms: qemu_total,
        total_ms,
        overhead_ms: total_ms.saturating_sub(qemu_total.unwrap_or(0)),
        switchover_ms: resumed_ms.saturating_sub(switched.completed_ms),
        transferred_bytes: info
            .as_ref()
            .and_then(|info| info.transferred_bytes)
            .unwrap_or(0),
        postcopy: switched.postcopy,
    };
    let done = outcome.clone();
    let phase = if resumed {
        format!("running on {}", migrate.to)
    } else {
        format!(
            "placed on {}, which did not confirm the resume within {RESUME_TIMEOUT:?}; \
             the source's disk copies are kept",
            migrate.to
        )
    };
    handle
        .update_until_done(|op| {
            op.state = OpState::Completed;
            op.step = OpStep::Finished;
            op.phase = phase.clone();
            op.finished_ms = Some(now_ms());
            op.outcome = Some(done.clone());
        })
        .await;
    if let Err(error) = context
        .store
        .delete(&context.store.keys().incoming(handle.id()))
        .await
    {
        // The manager removes answers of finished ops later.
        tracing::debug!("op {}: answer not removed yet: {error}", handle.id());
    }
    context
        .events
        .record(
            &vm.subject(),
            EventKind::Migrated,
            &format!(
                "VM {vm} {} migrated from {} to {} in {} ms (QEMU downtime {} ms, Ferry overhead {} ms){}",
                migrate.mode.as_str(),
                migrate.from,
                migrate.to,
                outcome.total_ms,
                outcome
                    .qemu_downtime_ms
                    .map(|ms| ms.to_string())
                    .unwrap_or_else(|| "?".into()),
                outcome.overhead_ms,
                if resumed { "" } else { "; its resume was not confirmed" }
            ),
        )
        .await;
}

/// The way back, before any switch-over: the source keeps (or resumes) the guest.
async fn roll_back(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    stopped: Stopped,
) {
    let vm = &migrate.vm;
    let mut pid = None;
    let mut problems = Vec::new();
    if let Some(machine) = context.runtime.machine(vm).await {
        // Each step is tried whatever the one before said: the guest must run again.
        if let Err(error) = machine.migrate_cancel().await {
            problems.push(format!("migrate_cancel: {error}"));
        }
        for copy in &migrate.disk_copies {
            let job = mirror_job(&copy.disk);
            let cancelled = async {
                machine.cancel_job(&job).await?;
                machine.wait_job_gone(&job, Duration::from_secs(30)).await
            };
            // A mirror that never started (or already ended) is not a problem.
            if let Err(error) = cancelled.await {
                tracing::debug!("VM {vm}: mirror {job}: {error}");
            }
            if let Err(error) = machine.delete_node(&format!("copy-{}", copy.disk)).await {
                tracing::debug!("VM {vm}: NBD node of {}: {error}", copy.disk);
            }
        }
        let paused = matches!(
            machine.status().await,
            Ok(RunState::Paused) | Ok(RunState::Postmigrate)
        );
        // Only while the placement still names this host may its copy run again.
        let still_ours = match context
            .store
            .get::<Placement>(&context.store.keys().vm_placement(vm))
            .await
        {
            Ok(Some(placement)) => placement.value.host == migrate.from,
            Ok(None) => false,
            Err(error) => {
                problems.push(format!(
                    "the placement cannot be read ({error}); not resumed"
                ));
                false
            }
        };
        if paused && still_ours && context.runtime.ha.may_start() {
            if let Err(error) = machine.resume().await {
                problems.push(format!("cannot resume the guest here: {error}"));
            }
        } else if paused {
            problems.push("the guest stays paused here: the placement or the lease says so".into());
        }
        pid = Some(machine.pid());
    }
    let state = if stopped.cancelled {
        OpState::Cancelled
    } else {
        OpState::Failed
    };
    let mut reason = stopped.reason.clone();
    if !problems.is_empty() {
        reason = format!("{reason} ({})", problems.join("; "));
    }
    let file = state_file(context.runtime, handle.id());
    let keep_state = pid.is_none() && file.exists();
    handle
        .update_until_done(|op| {
            op.state = state;
            op.step = OpStep::Finished;
            op.phase = if keep_state {
                format!(
                    "{vm} stays on {}; its saved state is kept in {}",
                    migrate.from,
                    file.display()
                )
            } else {
                format!("{} stays on {}", vm, migrate.from)
            };
            op.finished_ms = Some(now_ms());
            if !stopped.cancelled || !problems.is_empty() {
                op.error = Some(reason.clone());
            }
        })
        .await;
    restore_placement(context.store, vm, handle.id()).await;
    // The source's QEMU holds the guest again; without it, the saved state is all
    // that is left of the guest's memory, and it stays for a person to use.
    if !keep_state {
        remove_file_logged(&file);
    }
    if pid.is_some() {
        write_status(context, vm, VmState::Running, pid).await;
    }
    context
        .events
        .record(
            &vm.subject(),
            if stopped.cancelled {
                EventKind::MigrationCancelled
            } else {
                EventKind::MigrationFailed
            },
            &format!(
                "migration of VM {vm} to {} {}; it keeps running on {}",
                migrate.to,
                if stopped.cancelled {
                    "cancelled".to_string()
                } else {
                    format!("failed: {reason}")
                },
                migrate.from
            ),
        )
        .await;
}

/// Removes a file Ferry made; already gone is fine, anything else is logged.
fn remove_file_logged(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!("cannot remove {}: {error}", path.display()),
    }
}

/// Puts a placement still `Migrating` under `op` back to `Assigned` on its source.
pub async fn restore_placement(store: &Store, vm: &VmName, op: &str) {
    let key = store.keys().vm_placement(vm);
    for _ in 0..50 {
        let current = match store.get::<Placement>(&key).await {
            Ok(Some(current)) => current,
            Ok(None) => return,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if current.value.migration.as_ref().map(|m| m.op.as_str()) != Some(op) {
            return;
        }
        let restored = Placement {
            phase: PlacementPhase::Assigned,
            migration: None,
            generation: current.value.generation + 1,
            ..current.value.clone()
        };
        match store
            .compare_and_swap(&key, current.mod_revision, &restored)
            .await
        {
            Ok(_) => return,
            Err(StoreError::Conflict { .. }) => continue,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits for the destination's answer; fails on its error, a cancel, or the timeout.
async fn wait_incoming(
    store: &Store,
    handle: &OpHandle<'_>,
    timeout: Duration,
) -> Result<IncomingRecord, Stopped> {
    let key = store.keys().incoming(handle.id());
    let deadline = Instant::now() + timeout;
    let mut checked_cancel = Instant::now();
    loop {
        if let Ok(Some(incoming)) = store.get::<IncomingRecord>(&key).await {
            if let Some(error) = incoming.value.error {
                return Err(Stopped::failed(format!("the destination: {error}")));
            }
            return Ok(incoming.value);
        }
        if checked_cancel.elapsed() > Duration::from_millis(500) {
            checked_cancel = Instant::now();
            if let Ok(Some(op)) = handle.read().await {
                if op.cancel_requested {
                    return Err(Stopped {
                        cancelled: true,
                        reason: "cancelled on request".into(),
                    });
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(Stopped::failed(format!(
                "the destination did not get ready within {timeout:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_resumed(
    store: &Store,
    handle: &OpHandle<'_>,
    timeout: Duration,
    migrate: &MigrateOp,
) -> Option<IncomingRecord> {
    let key = store.keys().incoming(handle.id());
    let placement_key = store.keys().vm_placement(&migrate.vm);
    let deadline = Instant::now() + timeout;
    let mut placement_checked = Instant::now();
    while Instant::now() < deadline {
        if let Ok(Some(incoming)) = store.get::<IncomingRecord>(&key).await {
            if incoming.value.resumed_ms.is_some() {
                return Some(incoming.value);
            }
        }
        // The destination died after the switch-over and HA placed the VM elsewhere:
        // nobody will confirm this resume.
        if placement_checked.elapsed() > Duration::from_millis(500) {
            placement_checked = Instant::now();
            if let Ok(Some(placement)) = store.get::<Placement>(&placement_key).await {
                if placement.value.host != migrate.to {
                    return None;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

async fn write_status(context: &Context<'_>, vm: &VmName, state: VmState, pid: Option<i32>) {
    let host = &context.runtime.config.host;
    let guest_agent = state == VmState::Running;
    record_status(context.store, host, vm, state, pid, guest_agent, None).await;
}

/// Writes `vms/{vm}/status` as this host sees the VM; a failure is logged, not raised.
pub(crate) async fn record_status(
    store: &Store,
    host: &ferry_model::HostName,
    vm: &VmName,
    state: VmState,
    pid: Option<i32>,
    guest_agent: bool,
    last_error: Option<String>,
) {
    let status = VmStatus {
        version: RECORD_VERSION,
        host: Some(host.clone()),
        state,
        pid,
        guest_agent,
        last_error,
        updated_ms: now_ms(),
    };
    if let Err(error) = store.put(&store.keys().vm_status(vm), &status, None).await {
        tracing::warn!("cannot write status of VM {vm}: {error}");
    }
}

/// Removes a disk file Ferry made, and its directory when that is the VM's own and
/// empty.
fn remove_vm_file(path: &Path, vm: &VmName) {
    remove_file_logged(path);
    if let Some(dir) = path
        .parent()
        .filter(|dir| dir.file_name().and_then(|name| name.to_str()) == Some(vm.as_str()))
    {
        // Not empty (another disk of the VM) is the usual reason; it stays.
        if let Err(error) = std::fs::remove_dir(dir) {
            tracing::debug!("{} kept: {error}", dir.display());
        }
    }
}

// ----- the destination ----------------------------------------------------------------

/// The destination agent's side. Called (again) whenever the placement says
/// `Migrating` to this host and no driver holds the VM.
pub async fn migrate_in(context: &Context<'_>, vm: &VmName, placement: Versioned<Placement>) {
    let Some(migration) = placement.value.migration.clone() else {
        return;
    };
    let handle = OpHandle::new(context.store, &migration.op);
    let op = match handle.read().await {
        Ok(Some(op)) => op,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!("VM {vm}: cannot read op {}: {error}", migration.op);
            return;
        }
    };
    let OpKind::Migrate(migrate) = op.kind.clone() else {
        return;
    };
    let incoming_key = context.store.keys().incoming(&op.id);
    // Could not read is not "no answer yet": a waiting QEMU must not be replaced on it.
    let answered = match context.store.get::<IncomingRecord>(&incoming_key).await {
        Ok(answer) => answer.map(|incoming| incoming.value),
        Err(error) => {
            tracing::warn!("VM {vm}: cannot read the answer to op {}: {error}", op.id);
            return;
        }
    };
    let machine = match (context.runtime.machine(vm).await, &answered) {
        (Some(machine), Some(answer)) if answer.error.is_none() && !machine.has_exited() => machine,
        (existing, _) => {
            if existing.is_some() {
                if let Err(error) = context.runtime.kill(vm).await {
                    tracing::warn!("VM {vm}: an earlier waiting QEMU survives: {error}");
                    return;
                }
            }
            if answered
                .as_ref()
                .is_some_and(|answer| answer.error.is_some())
            {
                return;
            }
            match prepare(context, &migrate).await {
                Ok((machine, answer)) => {
                    if let Err(error) = context.store.put(&incoming_key, &answer, None).await {
                        tracing::warn!("VM {vm}: cannot answer the migration: {error}");
                    }
                    machine
                }
                Err(error) => {
                    if let Err(kill) = context.runtime.kill(vm).await {
                        tracing::warn!("VM {vm}: the waiting QEMU survives: {kill}");
                    }
                    remove_copies(&migrate);
                    let answer = IncomingRecord {
                        version: RECORD_VERSION,
                        host: context.runtime.config.host.clone(),
                        uri: None,
                        nbd: None,
                        error: Some(error.clone()),
                        resumed_ms: None,
                    };
                    if let Err(put) = context.store.put(&incoming_key, &answer, None).await {
                        // The source times out waiting and rolls back.
                        tracing::warn!("VM {vm}: cannot report the failed preparation: {put}");
                    }
                    context
                        .events
                        .record(
                            &vm.subject(),
                            EventKind::MigrationPrepareFailed,
                            &format!("{} cannot receive VM {vm}: {error}", migrate.to),
                        )
                        .await;
                    return;
                }
            }
        }
    };
    wait_for_switch(context, &handle, &migrate, &machine).await;
}

/// Starts the waiting QEMU and, for live migration, its listener and disk exports.
async fn prepare(
    context: &Context<'_>,
    migrate: &MigrateOp,
) -> Result<(Arc<Machine>, IncomingRecord), String> {
    let vm = &migrate.vm;
    let record = context
        .store
        .get::<VmRecord>(&context.store.keys().vm_spec(vm))
        .await
        .map_err(|error| error.to_string())?
        .ok_or_else(|| format!("VM {vm} has no record"))?
        .value;
    let mut spec = record.spec.clone();
    for disk in &mut spec.disks {
        if let Some(copy) = migrate.disk_copies.iter().find(|copy| copy.disk == disk.id) {
            create_disk(&copy.to, copy.size)?;
            disk.path = copy.to.clone();
            disk.pool = Some(copy.to_pool.clone());
        }
    }
    let machine = context
        .runtime
        .launch_incoming(&spec, record.reset_serial)
        .await?;
    let fail = |error: ferry_qemu::QemuError| error.to_string();
    let mut answer = IncomingRecord {
        version: RECORD_VERSION,
        host: context.runtime.config.host.clone(),
        uri: None,
        nbd: None,
        error: None,
        resumed_ms: None,
    };
    if migrate.mode == MigrationMode::Live {
        let address = context
            .runtime
            .address_on("migration")
            .ok_or_else(|| "this host has no migration network address".to_string())?;
        // The destination QEMU announces the guest (RARP) as soon as the state is in,
        // even before it runs: switches then queue the guest's traffic here instead of
        // sending it to the stopped source, where it would be lost.
        machine
            .set_migration_parameters(serde_json::json!({
                "announce-initial": 1,
                "announce-step": 50,
                "announce-rounds": 5,
                "announce-max": 200,
            }))
            .await
            .map_err(fail)?;
        if migrate.postcopy_after_ms.is_some() {
            machine
                .set_migration_capabilities(&[("postcopy-ram", true)])
                .await
                .map_err(fail)?;
        }
        // Only the source host's QEMU, over TLS, may send the state.
        let tls = match context.runtime.config.migration.tls {
            true => Some(
                machine
                    .accept_migration_over_tls(
                        &context.runtime.config.paths.qemu_tls_dir(),
                        migrate.from.as_str(),
                    )
                    .await
                    .map_err(fail)?,
            ),
            false => None,
        };
        machine
            .migrate_incoming(&format!("tcp:{address}:0"))
            .await
            .map_err(fail)?;
        let (_, port) = machine
            .incoming_address()
            .await
            .map_err(fail)?
            .ok_or_else(|| "QEMU did not say where it listens".to_string())?;
        answer.uri = Some(format!("tcp:{address}:{port}"));
        if !migrate.disk_copies.is_empty() {
            let port = free_port(&address)?;
            machine
                .nbd_server_start(
                    &address,
                    port,
                    tls.as_ref().map(|(creds, authz)| (*creds, authz.as_str())),
                )
                .await
                .map_err(fail)?;
            for copy in &migrate.disk_copies {
                let open = machine.open_disk(&copy.disk).await.map_err(fail)?;
                machine
                    .nbd_export(&open.node, &copy.disk)
                    .await
                    .map_err(fail)?;
            }
            answer.nbd = Some(format!("{address}:{port}"));
        }
    }
    Ok((machine, answer))
}

fn free_port(address: &str) -> Result<u16, String> {
    std::net::TcpListener::bind((address, 0))
        .and_then(|listener| listener.local_addr())
        .map(|local| local.port())
        .map_err(|error| format!("no free port on {address}: {error}"))
}

/// Waits until the placement names this host (then resumes the guest) or the migration
/// ends without it (then removes the waiting QEMU).
async fn wait_for_switch(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    machine: &Arc<Machine>,
) {
    let vm = &migrate.vm;
    let me = &context.runtime.config.host;
    let key = context.store.keys().vm_placement(vm);
    let mut watch = loop {
        match ferry_store::PrefixWatch::start(context.store, &key).await {
            Ok(watch) => break watch,
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let mut last_op_check = Instant::now();
    loop {
        let placement = context
            .store
            .get::<Placement>(&key)
            .await
            .map(|placement| placement.map(|placement| placement.value));
        match placement {
            Ok(Some(placement)) if &placement.host == me => {
                // Named by the switch-over, or by an HA restart that ended the op (its
                // source died): then this QEMU never got the guest, and the reconciler
                // starts the VM afresh from its disks.
                match handle.read().await {
                    Ok(Some(op)) if op.state.is_final() && op.state != OpState::Completed => {
                        abandon(context, migrate).await;
                    }
                    Ok(Some(_)) => resume_here(context, handle, migrate, machine).await,
                    Ok(None) => abandon(context, migrate).await,
                    Err(error) => {
                        tracing::warn!("VM {vm}: cannot read op {}: {error}", handle.id());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
                return;
            }
            Ok(Some(placement)) if placement.migrating_to() == Some(me) => {}
            Ok(_) => {
                abandon(context, migrate).await;
                return;
            }
            Err(_) => {}
        }
        if machine.has_exited() {
            // Our QEMU died (or was killed): the source sees its migration fail.
            if let Err(error) = context.runtime.forget(vm).await {
                tracing::warn!("VM {vm}: {error}");
            }
            remove_copies(migrate);
            return;
        }
        if last_op_check.elapsed() > Duration::from_secs(1) {
            last_op_check = Instant::now();
            if let Ok(Some(op)) = handle.read().await {
                if op.state.is_final() && op.state != OpState::Completed {
                    abandon(context, migrate).await;
                    return;
                }
            }
        }
        tokio::select! {
            _ = watch.next() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

/// How often, and how far apart, the destination tries `cont` before it reports the
/// guest paused.
const RESUME_ATTEMPTS: u32 = 5;
const RESUME_RETRY: Duration = Duration::from_millis(200);

/// The placement names this host: load the state if it is a file (and not loaded
/// yet), run, announce. Also what a restarted destination agent calls for a QEMU it
/// finds paused under a placement naming it (`finish_switch_over`).
async fn resume_here(
    context: &Context<'_>,
    handle: &OpHandle<'_>,
    migrate: &MigrateOp,
    machine: &Arc<Machine>,
) {
    let vm = &migrate.vm;
    let me = &context.runtime.config.host;
    let op = handle.id().to_string();
    let incoming_key = context.store.keys().incoming(&op);
    let mut machine = machine.clone();
    // A host that lost its lease may already be judged dead, its VMs restarted
    // elsewhere: it must not run the guest. It waits (paused) for the lease instead.
    while !context.runtime.ha.may_start() {
        if machine.has_exited() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting_for_state = matches!(machine.status().await, Ok(RunState::Inmigrate));
    if migrate.mode == MigrationMode::Quick && waiting_for_state {
        let file = state_file(context.runtime, &op);
        let restored = async {
            machine
                .migrate_incoming(&format!("exec:cat {}", shell_quote(&file)))
                .await
                .map_err(|error| error.to_string())?;
            let info = machine
                .wait_migration(Duration::from_millis(20), Duration::from_secs(600))
                .await
                .map_err(|error| error.to_string())?;
            match info.status {
                MigrationStatus::Completed => Ok(()),
                other => Err(info.error.unwrap_or_else(|| format!("{other:?}"))),
            }
        }
        .await;
        if let Err(error) = restored {
            // The disk is on the shared pool: boot from it rather than lose the VM.
            context
                .events
                .record(
                    &vm.subject(),
                    EventKind::RestoreFailed,
                    &format!(
                        "VM {vm}: restoring the saved state failed ({error}); cold boot on {me}"
                    ),
                )
                .await;
            if let Err(error) = context.runtime.kill(vm).await {
                tracing::warn!("VM {vm}: the failed restore's QEMU survives: {error}");
                return;
            }
            let record = match context
                .store
                .get::<VmRecord>(&context.store.keys().vm_spec(vm))
                .await
            {
                Ok(Some(record)) => record.value,
                Ok(None) => return,
                Err(error) => {
                    // The reconciler starts it once the record can be read.
                    tracing::warn!("VM {vm}: cannot read its record for the cold boot: {error}");
                    return;
                }
            };
            match context.runtime.start(&record).await {
                Ok(started) => machine = started,
                Err(error) => {
                    tracing::warn!("VM {vm}: cold boot failed: {error}");
                    return;
                }
            }
        }
        remove_file_logged(&file);
    } else if !migrate.disk_copies.is_empty() {
        // The mirrors ended before the switch-over; the export has nothing left to do.
        if let Err(error) = machine.nbd_server_stop().await {
            tracing::debug!("VM {vm}: NBD server: {error}");
        }
    }
    let mut resumed = Err(String::from("not tried"));
    for attempt in 1..=RESUME_ATTEMPTS {
        resumed = machine.resume().await.map_err(|error| error.to_string());
        if resumed.is_ok() || machine.has_exited() {
            break;
        }
        tracing::warn!("VM {vm}: cont failed (attempt {attempt}): {resumed:?}");
        tokio::time::sleep(RESUME_RETRY).await;
    }
    let running = matches!(machine.status().await, Ok(RunState::Running));
    if let (Err(error), false) = (&resumed, running) {
        // Not a success: the guest is paused here, and the status says so.
        record_status(
            context.store,
            me,
            vm,
            VmState::Paused,
            Some(machine.pid()),
            false,
            Some(format!("resuming after the migration failed: {error}")),
        )
        .await;
        context
            .events
            .record(
                &vm.subject(),
                EventKind::ResumeFailed,
                &format!("VM {vm} could not be resumed on {me} after its migration: {error}"),
            )
            .await;
        return;
    }
    context.runtime.mark_resumed(vm).await;
    let resumed_ms = now_ms();
    if let Err(error) = machine.announce_self().await {
        // The guest's own traffic teaches the switches soon after.
        tracing::debug!("VM {vm}: announce-self: {error}");
    }
    let answer = IncomingRecord {
        version: RECORD_VERSION,
        host: me.clone(),
        uri: None,
        nbd: None,
        error: None,
        resumed_ms: Some(resumed_ms),
    };
    if let Err(error) = context.store.put(&incoming_key, &answer, None).await {
        // The source then reports the resume as unconfirmed and keeps its disk copies.
        tracing::warn!("VM {vm}: cannot confirm the resume: {error}");
    }
    write_status(context, vm, VmState::Running, Some(machine.pid())).await;
    context
        .events
        .record(
            &vm.subject(),
            EventKind::Resumed,
            &format!("VM {vm} runs on {me} after its migration"),
        )
        .await;
}

/// The source agent restarted after the switch-over (its copy just removed as a
/// stray): the op is complete, without the measurements the lost driver held.
pub async fn complete_after_restart(context: &Context<'_>, op: &OpRecord) {
    let OpKind::Migrate(migrate) = &op.kind else {
        return;
    };
    let handle = OpHandle::new(context.store, &op.id);
    let phase = format!(
        "running on {} (the source agent restarted after the switch-over)",
        migrate.to
    );
    let ended = handle
        .update(|record| {
            if !record.state.is_final() {
                record.state = OpState::Completed;
                record.step = OpStep::Finished;
                record.phase = phase.clone();
                record.finished_ms = Some(now_ms());
            }
        })
        .await;
    if let Err(error) = ended {
        tracing::warn!("op {}: cannot record its end: {error}", op.id);
    }
}

/// A QEMU found paused (or still waiting for its state) under a placement that names
/// this host, after the switch-over of `op`: the destination agent restarted between
/// the CAS and `cont`. Finishes the resume.
pub async fn finish_switch_over(context: &Context<'_>, vm: &VmName, op: &OpRecord) {
    let OpKind::Migrate(migrate) = &op.kind else {
        return;
    };
    let Some(machine) = context.runtime.machine(vm).await else {
        return;
    };
    tracing::warn!(
        "VM {vm}: paused since the switch-over of op {}; resuming it",
        op.id
    );
    resume_here(
        context,
        &OpHandle::new(context.store, &op.id),
        migrate,
        &machine,
    )
    .await;
}

/// The migration ended without coming here: remove what was prepared.
async fn abandon(context: &Context<'_>, migrate: &MigrateOp) {
    if let Err(error) = context.runtime.kill(&migrate.vm).await {
        // Its disk copies stay with it; the reconciler kills it as a stray.
        tracing::warn!("VM {}: the waiting QEMU survives: {error}", migrate.vm);
        return;
    }
    remove_copies(migrate);
}

fn remove_copies(migrate: &MigrateOp) {
    for copy in &migrate.disk_copies {
        remove_vm_file(&copy.to, &migrate.vm);
    }
}
