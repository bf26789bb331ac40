//! Long operations (`ops/{id}`): a migration or a disk move, with its progress and its
//! result. The record is the operation's memory: whoever carries it out (an agent that
//! restarts, a new leader) continues from what it says, never from what it remembers.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cluster::record_version;
use crate::{Bytes, HostName, VmName};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub id: String,
    pub kind: OpKind,
    pub state: OpState,
    /// What it is doing now, for people: `waiting for a slot on host2`, `copying memory`…
    pub phase: String,
    /// Where it stands, for the agents: what a driver that restarts resumes from.
    #[serde(default)]
    pub step: OpStep,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    #[serde(default)]
    pub progress: Option<Progress>,
    #[serde(default)]
    pub outcome: Option<MigrationOutcome>,
    pub error: Option<String>,
    /// Set by `op cancel`; the executor stops at the next safe point.
    #[serde(default)]
    pub cancel_requested: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum OpKind {
    Migrate(MigrateOp),
    MoveDisk(MoveDiskOp),
    /// Carried out at once by the VM's host, holding the VM meanwhile.
    Checkpoint(CheckpointOp),
    Flatten(FlattenOp),
}

impl OpKind {
    pub fn vm(&self) -> &VmName {
        match self {
            OpKind::Migrate(migrate) => &migrate.vm,
            OpKind::MoveDisk(move_disk) => &move_disk.vm,
            OpKind::Checkpoint(checkpoint) => &checkpoint.vm,
            OpKind::Flatten(flatten) => &flatten.vm,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            OpKind::Migrate(_) => "migrate",
            OpKind::MoveDisk(_) => "move-disk",
            OpKind::Checkpoint(checkpoint) => match checkpoint.action {
                CheckpointAction::Create { .. } => "checkpoint",
                CheckpointAction::Revert { .. } => "revert",
                CheckpointAction::Delete { .. } => "delete-checkpoint",
            },
            OpKind::Flatten(_) => "flatten",
        }
    }

    /// The hosts whose migration slots it takes while running.
    pub fn hosts(&self) -> Vec<&HostName> {
        match self {
            OpKind::Migrate(migrate) => vec![&migrate.from, &migrate.to],
            OpKind::MoveDisk(move_disk) => vec![&move_disk.host],
            OpKind::Checkpoint(_) | OpKind::Flatten(_) => Vec::new(),
        }
    }

    /// The host that carries out an op run at once (checkpoints, flatten): it
    /// holds the VM from the op's creation to its end, and nobody else drives it.
    pub fn inline_host(&self) -> Option<&HostName> {
        match self {
            OpKind::Checkpoint(checkpoint) => Some(&checkpoint.host),
            OpKind::Flatten(flatten) => Some(&flatten.host),
            OpKind::Migrate(_) | OpKind::MoveDisk(_) => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointOp {
    pub vm: VmName,
    pub host: HostName,
    pub action: CheckpointAction,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "kebab-case")]
pub enum CheckpointAction {
    Create {
        tag: String,
        memory: bool,
        quiesce: bool,
    },
    Revert {
        tag: String,
        /// The checkpoint holds the guest's memory: the guest continues from it.
        memory: bool,
    },
    Delete {
        tag: String,
    },
}

/// Copies the template base into a linked clone's disks, so it no longer needs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenOp {
    pub vm: VmName,
    pub host: HostName,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationMode {
    /// Memory copied while the guest runs, then a short switch-over.
    Live,
    /// Paused, state saved to the shared pool, restored on the destination.
    Quick,
}

impl MigrationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMode::Live => "live",
            MigrationMode::Quick => "quick",
        }
    }
}

impl std::str::FromStr for MigrationMode {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "live" => Ok(MigrationMode::Live),
            "quick" => Ok(MigrationMode::Quick),
            other => Err(format!("mode {other:?}: use live or quick")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateOp {
    pub vm: VmName,
    pub from: HostName,
    pub to: HostName,
    pub mode: MigrationMode,
    /// QEMU's `downtime-limit`: the longest pause pre-copy may end with.
    pub downtime_limit_ms: u64,
    /// QEMU's `max-bandwidth`, bytes per second.
    pub bandwidth: Bytes,
    /// Switch to post-copy when pre-copy has not converged after this long.
    pub postcopy_after_ms: Option<u64>,
    /// Disks on host-local pools, copied to the destination before the memory.
    #[serde(default)]
    pub disk_copies: Vec<DiskCopy>,
}

/// A disk that moves with the VM: where it is now and where it goes on the destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    pub disk: String,
    pub from: PathBuf,
    pub to: PathBuf,
    pub to_pool: String,
    pub size: Bytes,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoveDiskOp {
    pub vm: VmName,
    pub host: HostName,
    pub disk: String,
    pub from: PathBuf,
    pub to: PathBuf,
    pub to_pool: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    /// Admitted but waiting for a migration slot on one of its hosts.
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Queued => "queued",
            OpState::Running => "running",
            OpState::Completed => "completed",
            OpState::Failed => "failed",
            OpState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpState::Completed | OpState::Failed | OpState::Cancelled
        )
    }
}

/// The steps of a migration, in order. Written with each step (the phase beside it is
/// its wording for people); an agent that restarts resumes from the step, never from
/// the words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpStep {
    /// Queued, or admitted and not begun.
    #[default]
    Waiting,
    /// The destination prepares its QEMU.
    Preparing,
    /// Local disks are mirrored to the destination.
    CopyingDisks,
    /// `migrate` was sent to the source QEMU (live).
    CopyingMemory,
    /// The guest is paused and its state is being written to the shared pool (quick).
    SavingState,
    /// The whole state is on the shared pool (quick): the source QEMU may go.
    StateSaved,
    /// The placement names the destination: only it may run the guest now.
    Resuming,
    /// The op is final.
    Finished,
}

/// How far a copy has got (memory for migrations, blocks for disk moves).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub transferred_bytes: u64,
    pub total_bytes: u64,
    pub remaining_bytes: u64,
    /// Pages the guest dirties per second (migrations).
    pub dirty_pages_rate: u64,
    /// Bytes per second over the last interval.
    pub throughput: u64,
    /// Rough time to go at the current throughput.
    pub expected_remaining_ms: Option<u64>,
}

/// What a finished migration measured.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOutcome {
    /// The pause QEMU reports (source stopped → state sent).
    pub qemu_downtime_ms: Option<u64>,
    /// QEMU's own migration time (`migrate` → completed).
    pub qemu_total_ms: Option<u64>,
    /// From the op starting to the guest running on the destination.
    pub total_ms: u64,
    /// `total_ms` minus QEMU's own time: preparing the destination, the switch-over
    /// bookkeeping, cleaning up.
    pub overhead_ms: u64,
    /// From QEMU's completion to the guest running on the destination: the part of
    /// Ferry's overhead that adds to the guest's pause.
    pub switchover_ms: u64,
    pub transferred_bytes: u64,
    /// Post-copy was needed to finish.
    #[serde(default)]
    pub postcopy: bool,
}

/// `incoming/{op}`: the destination's answer to a migration's preparation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub host: HostName,
    /// Where the destination QEMU listens (live), or empty for a quick migration.
    pub uri: Option<String>,
    /// NBD export of the destination's copies of local disks, by disk id.
    #[serde(default)]
    pub nbd: Option<String>,
    /// The destination could not prepare; the reason.
    pub error: Option<String>,
    /// When the guest ran again on the destination (ms since the epoch).
    #[serde(default)]
    pub resumed_ms: Option<u64>,
}

/// `vms/{vm}/op`: the one op that holds the VM. Written in the transaction that creates
/// the op (which fails if another op holds it) and removed when the op is cleaned up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpLock {
    #[serde(default = "record_version")]
    pub version: u32,
    pub op: String,
}
