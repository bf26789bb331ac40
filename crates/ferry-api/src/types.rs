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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
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
