//! The API's request and response types, shared by the server, the CLI and the portal.
//! They are views for people and scripts; the records in etcd stay internal.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub name: String,
    /// `active`, `maintenance`.
    pub state: String,
    pub api_url: String,
    pub addresses: BTreeMap<String, String>,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Memory of the VMs placed here.
    pub used_memory_mib: u64,
    pub vms: u32,
    pub accel: String,
    pub cpu_model: String,
    /// This host's agent runs the manager.
    pub leader: bool,
    /// The host's monitors (links, storage) as its agent last wrote them.
    #[serde(default)]
    pub monitors: Vec<HostMonitorView>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HostMonitorView {
    pub id: String,
    pub check: String,
    /// `ok`, `failing`, `down` or `unknown`.
    pub state: String,
    pub failed_probes: u32,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub name: String,
    /// `running`, `stopped`, `starting`, `stopping`, `migrating`, `failed`.
    pub state: String,
    /// What the user asked for: `running` or `stopped`.
    pub desired: String,
    pub host: Option<String>,
    pub ip: Option<String>,
    pub cpus: u32,
    pub memory_mib: u64,
    pub image: String,
    pub pid: Option<i32>,
    /// The guest agent answered its last heartbeat.
    pub guest_agent: bool,
    pub error: Option<String>,
    /// Restarted on another host when its host dies.
    #[serde(default)]
    pub ha: bool,
    /// The whole HA policy: priority, isolation response, preferred hosts, anti-affinity
    /// group, restart limit.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub ha_policy: ferry_model::ha::HaPolicy,
    /// Failures and restarts within the policy's restart window.
    #[serde(default)]
    pub recent_restarts: u32,
    /// Built-in and added monitors with their current health.
    #[serde(default)]
    pub monitors: Vec<MonitorView>,
}

/// `ferry vm monitor add`: what to check, how often, and the recovery ladder.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AddMonitorRequest {
    /// `process`, `tcp`, `http`, `heartbeat`, `stall` or `qemu`.
    pub kind: String,
    /// process: a name; tcp: a port; http: `PORT/PATH`, e.g. `8080/health`.
    #[serde(default)]
    pub target: Option<String>,
    /// Where tcp and http checks run from: `host` (default, over the business network)
    /// or `guest` (inside it, through the guest agent).
    #[serde(default)]
    pub via: Option<String>,
    /// Default `m1`, `m2` …
    #[serde(default)]
    pub id: Option<String>,
    /// e.g. `2s` (default).
    #[serde(default)]
    pub interval: Option<String>,
    /// e.g. `1s` (default); at most the interval.
    #[serde(default)]
    pub timeout: Option<String>,
    /// Failed probes in a row before the next ladder step (default 3).
    #[serde(default)]
    pub failures: Option<u32>,
    /// e.g. `restart-app*2,reset-vm,failover-vm`.
    #[serde(default)]
    pub ladder: Option<String>,
    /// The command `restart-app` runs in the guest (default: the image's).
    #[serde(default)]
    pub restart_command: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MonitorView {
    pub id: String,
    /// `vm` or `application`.
    pub layer: String,
    pub check: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub failures: u32,
    pub ladder: String,
    pub restart_command: Option<String>,
    pub builtin: bool,
    /// `ok`, `failing`, `down`, `waiting` (for the guest after an action), `unknown`.
    pub state: String,
    pub failed_probes: u32,
    pub last_error: Option<String>,
    pub last_action: Option<String>,
    pub since_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreateVmRequest {
    pub name: String,
    /// An image registered in the cluster, e.g. `appliance`.
    pub image: String,
    pub cpus: u32,
    /// Memory as bytes or with a unit: `256M`, `1G`.
    #[schema(value_type = String, example = "256M")]
    pub memory: String,
    /// Run on this host if it has room.
    pub host: Option<String>,
    /// Restart the VM on another host when its host dies.
    #[serde(default)]
    pub ha: bool,
    /// With `ha`: higher restarts first when there is not room for all.
    #[serde(default)]
    pub ha_priority: i32,
    /// With `ha`: `power-off` (default) or `keep-running` when its host alone is cut off.
    #[serde(default)]
    pub isolation: Option<String>,
    /// With `ha`: hosts to restart it on, most wanted first.
    #[serde(default)]
    pub preferred_hosts: Vec<String>,
    /// With `ha`: VMs of one group are kept on different hosts while there is room.
    #[serde(default)]
    pub anti_affinity: Option<String>,
    /// With `ha`: at most this many restarts within `restart_window` (0: no limit; default 5).
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// With `ha`: the window of `max_restarts`, e.g. `1h`, `30m` (default 1h).
    #[serde(default)]
    pub restart_window: Option<String>,
    /// Monitors to add with the VM, each as `ferry vm monitor add` takes it; all are
    /// checked before anything is created.
    #[serde(default)]
    pub monitors: Vec<AddMonitorRequest>,
}

/// Changes a VM's HA policy; fields left out keep their value.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UpdateHaRequest {
    /// Restart the VM on another host when its host dies.
    pub ha: Option<bool>,
    pub ha_priority: Option<i32>,
    /// `power-off` or `keep-running`.
    pub isolation: Option<String>,
    /// Replaces the list; `[]` clears it.
    pub preferred_hosts: Option<Vec<String>>,
    /// `""` leaves the group.
    pub anti_affinity: Option<String>,
    pub max_restarts: Option<u32>,
    /// e.g. `1h`, `30m`.
    pub restart_window: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecRequest {
    /// Program and arguments, run in the guest without a shell.
    pub command: Vec<String>,
    /// Seconds to wait for the command (default 30).
    pub timeout_seconds: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: Option<i64>,
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventView {
    pub at_ms: u64,
    pub source: String,
    pub subject: String,
    pub kind: String,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `not_found`, `conflict`, `bad_request`, `unauthorized`,
    /// `forbidden`, `unavailable`, `internal`.
    pub code: String,
    pub message: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MigrateRequest {
    /// Destination host; without it the manager picks the host with the most room.
    #[serde(default)]
    pub to: Option<String>,
    /// `live` (default) or `quick`.
    #[serde(default)]
    pub mode: Option<String>,
    /// Longest pause live migration may end with, ms (default: the VM's policy, 50).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Bandwidth limit per second, e.g. `100M` (default: the source host's setting).
    #[serde(default)]
    pub bandwidth: Option<String>,
    /// Switch to post-copy when pre-copy has not converged after this many ms.
    #[serde(default)]
    pub postcopy_after_ms: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MoveDiskRequest {
    /// The pool the disk goes to, on the host that runs the VM.
    pub pool: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProgressView {
    pub transferred_bytes: u64,
    pub total_bytes: u64,
    pub remaining_bytes: u64,
    pub dirty_pages_rate: u64,
    /// Bytes per second over the last interval.
    pub throughput: u64,
    pub expected_remaining_ms: Option<u64>,
}

/// A long operation: a migration or a disk move, with its progress and result.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OpView {
    pub id: String,
    /// `migrate` or `move-disk`.
    pub kind: String,
    pub vm: String,
    /// `queued`, `running`, `completed`, `failed`, `cancelled`.
    pub status: String,
    /// What it is doing now.
    pub phase: String,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `live` or `quick` (migrations).
    pub mode: Option<String>,
    /// Disk and target pool (disk moves).
    pub disk: Option<String>,
    pub pool: Option<String>,
    pub created_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub progress: Option<ProgressView>,
    /// The guest's pause as QEMU reports it.
    pub qemu_downtime_ms: Option<u64>,
    /// From the op starting to the guest running at the destination.
    pub total_ms: Option<u64>,
    pub transferred_bytes: Option<u64>,
    /// Time Ferry spent outside QEMU's own migration.
    pub overhead_ms: Option<u64>,
    /// The part of the overhead inside the guest's pause (completion → running there).
    pub switchover_ms: Option<u64>,
    pub postcopy: Option<bool>,
    pub cancel_requested: bool,
    pub error: Option<String>,
}
