//! High availability: a VM's HA policy and the storage heartbeat every agent writes to
//! the shared pool (`{pool}/.ferry/heartbeat/{host}.json`), which is how hosts and the
//! manager tell a dead host from an isolated one when etcd cannot.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{HostName, VmName};

/// Whether and how the cluster restarts a VM when its host fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HaPolicy {
    /// Restart the VM on another host when its host dies.
    pub enabled: bool,
    /// Higher first when there is not room for every VM to restart.
    pub priority: i32,
    /// What the VM's host does with it when that host alone loses the cluster.
    pub isolation: IsolationResponse,
    /// Hosts to restart it on, most wanted first, when they have room.
    pub preferred_hosts: Vec<HostName>,
    /// VMs of one group are kept on different hosts while the cluster has room.
    pub anti_affinity: Option<String>,
    /// At most this many restarts (host or VM failures) within `restart_window_s`;
    /// 0: no limit.
    pub max_restarts: u32,
    pub restart_window_s: u64,
}

impl Default for HaPolicy {
    fn default() -> Self {
        HaPolicy {
            enabled: false,
            priority: 0,
            isolation: IsolationResponse::default(),
            preferred_hosts: Vec::new(),
            anti_affinity: None,
            max_restarts: 5,
            restart_window_s: 3600,
        }
    }
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

/// One host's slot on the shared pool, rewritten every heartbeat interval. Nothing in
/// it is a time another host could compare with its own clock: readers measure how
/// long `sequence` stands still on their own monotonic clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageHeartbeat {
    pub version: u32,
    pub host: HostName,
    /// Counts every write: a slot whose sequence stops moving belongs to a silent host.
    #[serde(default)]
    pub sequence: u64,
    /// Wall-clock time of this write, for people reading the file; never for decisions.
    pub at_ms: u64,
    /// How old the host's last acknowledged lease renewal was when it wrote this, on
    /// its own monotonic clock; `None` if it never had one.
    #[serde(default)]
    pub lease_age_ms: Option<u64>,
    /// The host's watchdog reboots it this long after its agent stops feeding it.
    #[serde(default)]
    pub watchdog_ms: Option<u64>,
    /// The host killed its HA VMs because it lost its lease while its peers kept theirs.
    pub fenced: bool,
    /// The VMs whose QEMU runs on the host now.
    pub running: Vec<VmName>,
}

/// A peer's slot as one reader sees it: its contents, and how long the reader has seen
/// its sequence stand still (on the reader's monotonic clock, from its first sight).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedBeat {
    pub beat: StorageHeartbeat,
    pub silent_ms: u64,
}

impl ObservedBeat {
    /// How old the peer's last lease renewal is now: its age when written plus the
    /// silence since; unknown counts as very old.
    pub fn lease_age_ms(&self) -> u64 {
        self.beat
            .lease_age_ms
            .map_or(u64::MAX, |age| age.saturating_add(self.silent_ms))
    }
}

/// Why a VM was restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCause {
    /// Its host died or fenced itself; restarted elsewhere.
    HostFailed,
    /// Its QEMU exited without being asked to.
    QemuExited,
    /// The guest kernel panicked (pvpanic).
    GuestPanicked,
}

impl std::fmt::Display for RestartCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestartCause::HostFailed => "host failed",
            RestartCause::QemuExited => "QEMU exited",
            RestartCause::GuestPanicked => "guest panicked",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartEntry {
    pub at_ms: u64,
    /// The host it failed on.
    pub host: HostName,
    pub cause: RestartCause,
}

/// `vms/{vm}/restarts`: the VM's recent failures and restarts, newest last.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartLog {
    pub version: u32,
    pub entries: Vec<RestartEntry>,
    /// The host the VM failed on too often: the manager restarts it elsewhere.
    pub leave: Option<LeaveHost>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaveHost {
    pub host: HostName,
    /// The placement generation it failed under; a newer placement ends the request.
    pub generation: u64,
    pub reason: String,
}

impl RestartLog {
    /// Entries beyond this are dropped, oldest first: every window we judge is shorter.
    pub const KEEP: usize = 64;

    pub fn push(&mut self, entry: RestartEntry) {
        self.entries.push(entry);
        let excess = self.entries.len().saturating_sub(Self::KEEP);
        self.entries.drain(..excess);
    }
}

/// `fence/{host}`: how to power a host off from elsewhere, through a ClusterLabs fence
/// agent (`fence_ipmilan`, `fence_ferry_lab`, …). Written by the host's agent from its
/// config; kept when the host dies, because that is when it is needed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceDevice {
    pub version: u32,
    pub host: HostName,
    /// The fence agent's executable.
    pub agent: PathBuf,
    /// Passed on the agent's stdin as `key=value` lines (`ip`, `username`, `plug`, …).
    /// In etcd, a secret's value (`password`, …) is sealed with the cluster key
    /// (`enc:v1:…`, see `ferry_agent::secrets`); the leader opens it just before it runs.
    pub options: BTreeMap<String, String>,
    /// One attempt longer than this is killed and counts as failed.
    pub timeout_ms: u64,
}

impl FenceDevice {
    /// A bad option is refused at start-up, not when a host has died.
    pub fn check(&self) -> Result<(), String> {
        if self.agent.as_os_str().is_empty() {
            return Err("fence.agent: must name the fence agent's executable".into());
        }
        if self.timeout_ms == 0 {
            return Err("fence.timeout_ms: must be above 0".into());
        }
        for (key, value) in &self.options {
            let plain = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !plain {
                return Err(format!(
                    "fence.options: key {key:?} must be letters, digits, _ or -"
                ));
            }
            if key == "action" {
                return Err(
                    "fence.options: \"action\" is chosen by Ferry (off, on, status), not configured"
                        .into(),
                );
            }
            if value.contains(['\n', '\r']) {
                return Err(format!("fence.options.{key}: must be one line"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(options: &[(&str, &str)]) -> FenceDevice {
        FenceDevice {
            version: 1,
            host: "host1".parse().unwrap(),
            agent: "/usr/sbin/fence_ipmilan".into(),
            options: options
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            timeout_ms: 20_000,
        }
    }

    #[test]
    fn fence_options_that_would_break_the_stdin_protocol_are_refused() {
        assert!(device(&[("ip", "10.0.0.1"), ("username", "admin")])
            .check()
            .is_ok());
        assert_eq!(
            device(&[("password", "a\naction=on")]).check().unwrap_err(),
            "fence.options.password: must be one line"
        );
        assert!(device(&[("action", "on")]).check().is_err());
        assert!(device(&[("a=b", "c")]).check().is_err());
    }

    #[test]
    fn the_restart_log_keeps_only_the_newest_entries() {
        let mut log = RestartLog::default();
        for at_ms in 0..100 {
            log.push(RestartEntry {
                at_ms,
                host: "host1".parse().unwrap(),
                cause: RestartCause::QemuExited,
            });
        }
        assert_eq!(log.entries.len(), RestartLog::KEEP);
        assert_eq!(log.entries[0].at_ms, 100 - RestartLog::KEEP as u64);
    }

    #[test]
    fn an_old_record_without_the_new_policy_fields_gets_the_defaults() {
        let policy: HaPolicy =
            serde_json::from_str(r#"{"enabled":true,"priority":3,"isolation":"power-off"}"#)
                .unwrap();
        assert_eq!(policy.max_restarts, 5);
        assert!(policy.preferred_hosts.is_empty());
    }
}

/// A host asks the leader to power it off through its fence device (a host monitor's
/// `fence-host`): its VMs then restart elsewhere as after any host failure. The agent
/// removes its request when it starts again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRequest {
    pub version: u32,
    pub host: HostName,
    pub reason: String,
    pub at_ms: u64,
}

/// Where the leader's fencing of one host stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceProgress {
    Running {
        attempt: u32,
        last_error: Option<String>,
    },
    ConfirmedOff {
        after_ms: u64,
    },
}
