//! High availability: a VM's HA policy and the storage heartbeat every agent writes to
//! the shared pool (`{pool}/.ferry/heartbeat/{host}.json`), which is how hosts and the
//! manager tell a dead host from an isolated one when etcd cannot.

use serde::{Deserialize, Serialize};

use crate::{HostName, VmName};

/// Whether and how the cluster restarts a VM when its host fails.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HaPolicy {
    /// Restart the VM on another host when its host dies.
    pub enabled: bool,
    /// Higher first when there is not room for every VM to restart.
    pub priority: i32,
    /// What the VM's host does with it when that host alone loses the cluster.
    pub isolation: IsolationResponse,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationResponse {
    /// Kill it, so that the cluster may restart it elsewhere.
    #[default]
    PowerOff,
    /// Leave it running where it is; the cluster does not restart it elsewhere.
    KeepRunning,
}

impl std::str::FromStr for IsolationResponse {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "power-off" => Ok(IsolationResponse::PowerOff),
            "keep-running" => Ok(IsolationResponse::KeepRunning),
            other => Err(format!(
                "isolation response {other:?}: expected power-off or keep-running"
            )),
        }
    }
}

/// One host's slot on the shared pool, rewritten every heartbeat interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageHeartbeat {
    pub version: u32,
    pub host: HostName,
    /// Wall-clock time of this write.
    pub at_ms: u64,
    /// Wall-clock time of the last lease renewal etcd acknowledged (0: never).
    pub lease_renewed_ms: u64,
    /// The host killed its HA VMs because it lost its lease while its peers kept theirs.
    pub fenced: bool,
    /// The VMs whose QEMU runs on the host now.
    pub running: Vec<VmName>,
}

impl StorageHeartbeat {
    /// How old the lease renewal this heartbeat reports is, seen at `now_ms`.
    pub fn lease_age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.lease_renewed_ms)
    }

    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.at_ms)
    }
}
