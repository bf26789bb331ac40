//! The records the cluster keeps in etcd and shows through the API: hosts, where each
//! VM may run (placement), what each VM is doing (status), images, events. Every
//! record carries a `version` so mixed versions during an upgrade are detected.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Bytes, HostName, VmName, VmSpec};

/// The record format written by this build.
pub const RECORD_VERSION: u32 = 1;

pub(crate) fn record_version() -> u32 {
    RECORD_VERSION
}

/// A host as its agent registers it (bound to the agent's lease: it disappears when the
/// agent stops renewing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub name: HostName,
    /// Where this host's agent serves the API.
    pub api_url: String,
    /// Addresses per network (`management`, `migration`, `business`).
    pub addresses: BTreeMap<String, String>,
    pub cpus: u32,
    pub memory: Bytes,
    /// QEMU's name for the host CPU model and the features QEMU reports for it.
    pub cpu_model: String,
    pub cpu_features: Vec<String>,
    /// Named CPU models QEMU knows here, each with the features this host lacks for it
    /// (empty: runnable).
    #[serde(default)]
    pub cpu_models: BTreeMap<String, Vec<String>>,
    pub accel: String,
    pub pools: Vec<PoolInfo>,
    pub networks: Vec<String>,
    pub state: HostState,
    /// Migrations this host takes part in at once; more wait in the queue.
    #[serde(default = "default_migration_limit")]
    pub migration_limit: u32,
    /// When the agent started (ms since the epoch).
    pub started_ms: u64,
}

fn default_migration_limit() -> u32 {
    2
}

/// A storage pool as a host offers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub name: String,
    pub path: std::path::PathBuf,
    /// Every host sees the same files under `path`.
    pub shared: bool,
}

impl HostRecord {
    pub fn pool(&self, name: &str) -> Option<&PoolInfo> {
        self.pools.iter().find(|pool| pool.name == name)
    }

    /// The pool a file lives in here, if any.
    pub fn pool_of(&self, path: &std::path::Path) -> Option<&PoolInfo> {
        self.pools.iter().find(|pool| path.starts_with(&pool.path))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    Active,
    Maintenance,
}

/// The power state a user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    Running,
    Stopped,
}

/// What the API stores under `vms/{vm}/spec`: the VM's shape plus what the user wants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub spec: VmSpec,
    pub desired: PowerState,
    /// The image the VM was created from.
    pub image: String,
    /// A host the user asked for, if any.
    pub preferred_host: Option<HostName>,
    /// The VM's first NIC's address, if its network has an address pool.
    pub ip: Option<String>,
    /// Every NIC's address from its network's pool, to release when the VM goes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NicAddress>,
    /// Set when deletion was requested; the owning agent removes the VM, then the record.
    #[serde(default)]
    pub deleting: bool,
    /// Bumped on each user request so agents act on every reset/restart.
    #[serde(default)]
    pub reset_serial: u64,
    #[serde(default)]
    pub migration: MigrationPolicy,
    #[serde(default)]
    pub ha: crate::ha::HaPolicy,
    /// The project the VM belongs to (and counts against).
    #[serde(default = "crate::access::default_project")]
    pub project: crate::ProjectName,
    /// A checkpoint with memory the next start continues from (a stopped VM reverted
    /// to it); the agent clears it before the guest runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_checkpoint: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicAddress {
    pub network: String,
    pub address: std::net::Ipv4Addr,
}

/// How this VM migrates unless a request says otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationPolicy {
    /// The longest pause live migration may end with (QEMU's `downtime-limit`).
    pub downtime_limit_ms: u64,
    /// Switch to post-copy when pre-copy has not converged after this long; `None`:
    /// never (a post-copy migration cannot fall back if a host dies during it).
    pub postcopy_after_ms: Option<u64>,
}

impl Default for MigrationPolicy {
    fn default() -> Self {
        MigrationPolicy {
            downtime_limit_ms: 50,
            postcopy_after_ms: None,
        }
    }
}

/// `vms/{vm}/placement`: the only record of where a VM may run. Changed only by
/// compare-and-swap on `generation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    #[serde(default = "record_version")]
    pub version: u32,
    pub host: HostName,
    pub generation: u64,
    pub phase: PlacementPhase,
    /// While `phase` is `Migrating`: where to and which op.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<PlacementMigration>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementMigration {
    pub to: HostName,
    pub op: String,
}

impl Placement {
    /// The host a migration in flight is moving it to.
    pub fn migrating_to(&self) -> Option<&HostName> {
        match (&self.phase, &self.migration) {
            (PlacementPhase::Migrating, Some(migration)) => Some(&migration.to),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPhase {
    /// Assigned and owned by `host`.
    Assigned,
    /// Moving to another host (migration in flight).
    Migrating,
}

/// What a VM is doing, as the CLI and API show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    /// QEMU runs with the guest's vCPUs stopped (a switch-over not finished, or
    /// someone paused it through QMP).
    Paused,
    Stopped,
    Starting,
    Stopping,
    Migrating,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Stopping => "stopping",
            VmState::Migrating => "migrating",
            VmState::Failed => "failed",
        }
    }
}

/// `vms/{vm}/status`, written by the owning agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    #[serde(default = "record_version")]
    pub version: u32,
    /// The host that wrote it; none when the manager reports a VM it cannot place.
    pub host: Option<HostName>,
    pub state: VmState,
    pub pid: Option<i32>,
    /// The guest agent answered its last ping.
    pub guest_agent: bool,
    pub last_error: Option<String>,
    pub updated_ms: u64,
}

/// An image of the library (`images/{name}`): a file every host can read on the shared
/// pool, from which VMs are made. The test appliance is one image among others.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub name: String,
    #[serde(flatten)]
    pub content: ImageContent,
    /// SHA-256 of the imported file (hex), recorded at import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Bytes on the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_size: Option<Bytes>,
    #[serde(default)]
    pub imported_ms: u64,
    /// The guest runs a QEMU guest agent (heartbeat, exec, clean stops).
    #[serde(default = "yes")]
    pub guest_agent: bool,
    /// For the KVM probe: a command line under which the image prints `probe_marker`
    /// on its console and powers off.
    #[serde(default)]
    pub probe_cmdline: Option<String>,
    #[serde(default)]
    pub probe_marker: Option<String>,
    /// The command that restarts the image's application in the guest: the default of
    /// its VMs' `restart-app` monitor action.
    #[serde(default)]
    pub restart_command: Option<String>,
}

fn yes() -> bool {
    true
}

impl ImageRecord {
    /// A kernel-booted appliance image with a guest agent.
    pub fn appliance(
        name: &str,
        kernel: std::path::PathBuf,
        initrd: std::path::PathBuf,
        data_disk: Bytes,
    ) -> ImageRecord {
        ImageRecord {
            version: RECORD_VERSION,
            name: name.to_string(),
            content: ImageContent::Appliance {
                kernel,
                initrd,
                data_disk,
            },
            sha256: None,
            file_size: None,
            imported_ms: now_ms(),
            guest_agent: true,
            probe_cmdline: None,
            probe_marker: None,
            restart_command: None,
        }
    }
}

/// What an image holds, and so how a VM boots from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ImageContent {
    /// A kernel and initramfs booted directly, with a blank data disk (the appliance).
    Appliance {
        kernel: std::path::PathBuf,
        initrd: std::path::PathBuf,
        /// Size of the data disk a VM from this image gets.
        data_disk: Bytes,
    },
    /// A bootable disk image (a distribution's cloud image); a VM's first disk is a
    /// copy of it.
    Disk {
        path: std::path::PathBuf,
        format: crate::DiskFormat,
        /// The size the guest sees.
        virtual_size: Bytes,
    },
    /// An installer or live ISO, put in a VM's CD-ROM drive.
    Iso { path: std::path::PathBuf },
}

impl ImageContent {
    pub fn kind(&self) -> ImageKind {
        match self {
            ImageContent::Appliance { .. } => ImageKind::Appliance,
            ImageContent::Disk { format, .. } => match format {
                crate::DiskFormat::Qcow2 => ImageKind::Qcow2,
                crate::DiskFormat::Raw => ImageKind::Raw,
            },
            ImageContent::Iso { .. } => ImageKind::Iso,
        }
    }

    /// The files of the image, to check and to remove with it.
    pub fn files(&self) -> Vec<&std::path::Path> {
        match self {
            ImageContent::Appliance { kernel, initrd, .. } => vec![kernel, initrd],
            ImageContent::Disk { path, .. } | ImageContent::Iso { path } => vec![path],
        }
    }
}

/// An image's format as users name it (`--format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Appliance,
    Qcow2,
    Raw,
    Iso,
}

impl ImageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Appliance => "appliance",
            ImageKind::Qcow2 => "qcow2",
            ImageKind::Raw => "raw",
            ImageKind::Iso => "iso",
        }
    }
}

impl std::str::FromStr for ImageKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "qcow2" => Ok(ImageKind::Qcow2),
            "raw" | "img" => Ok(ImageKind::Raw),
            "iso" => Ok(ImageKind::Iso),
            other => Err(format!(
                "{other:?} is not an image format (qcow2, raw, iso)"
            )),
        }
    }
}

/// An entry of the event log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    #[serde(default = "record_version")]
    pub version: u32,
    pub at_ms: u64,
    /// Who noticed or acted: `agent/host1`, `manager`, `api`.
    pub source: String,
    /// `vm/web-1`, `host/host2`…
    pub subject: String,
    pub kind: String,
    pub message: String,
}

/// Milliseconds on this process's monotonic clock (from its first call): what every
/// age and deadline is measured with, so a step of the wall clock changes none of them.
pub fn monotonic_ms() -> u64 {
    static ANCHOR: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ANCHOR
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Milliseconds since the Unix epoch, for records people read and for restart windows;
/// never for a safety deadline (see [`monotonic_ms`]). The wall clock can be stepped
/// for a test: with `FERRY_CLOCK_STEP_FILE` set, the signed milliseconds in that file
/// are added (the lab's clock-step fault), to show that no decision hangs on it.
pub fn now_ms() -> u64 {
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0);
    real.saturating_add(clock_step_ms()).max(0) as u64
}

/// The test clock step, re-read at most every 200 ms; 0 without the variable or file.
fn clock_step_ms() -> i64 {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
    static FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    static STEP: AtomicI64 = AtomicI64::new(0);
    static READ_AT: AtomicU64 = AtomicU64::new(0);
    let Some(file) = FILE.get_or_init(|| std::env::var_os("FERRY_CLOCK_STEP_FILE").map(Into::into))
    else {
        return 0;
    };
    let now = monotonic_ms() + 1;
    let read_at = READ_AT.load(Ordering::Acquire);
    if read_at == 0 || now.saturating_sub(read_at) >= 200 {
        let step = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| text.trim().parse::<i64>().ok())
            .unwrap_or(0);
        STEP.store(step, Ordering::Release);
        READ_AT.store(now, Ordering::Release);
    }
    STEP.load(Ordering::Acquire)
}

impl VmName {
    /// Convenience for records keyed by VM.
    pub fn subject(&self) -> String {
        format!("vm/{self}")
    }
}

/// A network VMs get addresses on (`networks/{name}`), with the pool the API allocates
/// from. Addresses taken are keys under `ipam/{name}/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub name: String,
    /// Prefix length of the subnet, e.g. 24.
    pub prefix: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    /// First and last address VMs may get.
    pub first: std::net::Ipv4Addr,
    pub last: std::net::Ipv4Addr,
}
