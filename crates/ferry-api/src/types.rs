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
    /// The project the VM belongs to.
    pub project: String,
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
    /// `bios` or `uefi`.
    #[serde(default)]
    pub firmware: String,
    #[serde(default)]
    pub cpu_model: String,
    #[serde(default)]
    pub disks: Vec<DiskView>,
    #[serde(default)]
    pub cdroms: Vec<CdromView>,
    #[serde(default)]
    pub nics: Vec<NicView>,
    /// The guest is expected to run a QEMU guest agent.
    #[serde(default)]
    pub has_guest_agent: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    pub id: String,
    pub size: Option<u64>,
    pub pool: Option<String>,
    #[schema(value_type = String)]
    pub bus: ferry_model::DiskBus,
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CdromView {
    pub id: String,
    /// The ISO in the drive; none when empty.
    pub path: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct NicView {
    pub network: String,
    pub mac: String,
    #[schema(value_type = String)]
    pub model: ferry_model::NicModel,
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
    /// The project the VM belongs to and counts against (default: the caller's, or
    /// `default`).
    #[serde(default)]
    pub project: Option<String>,
    /// An image of the library: a disk image (the first disk is a copy of it) or the
    /// appliance. With none of `image`, `iso` and `blank`: the appliance.
    #[serde(default)]
    pub image: Option<String>,
    /// Make it from this template: its hardware is the default, its disks are
    /// overlays on the template's base (`linked`, the default) or copies of it.
    #[serde(default)]
    pub template: Option<String>,
    /// With `template`: `true` (default) for a linked clone, `false` for a full copy.
    #[serde(default)]
    pub linked: Option<bool>,
    /// Install from this ISO image of the library: it goes in the CD-ROM and the first
    /// disk starts empty.
    #[serde(default)]
    pub iso: Option<String>,
    /// Empty disks only (boot from the network or a CD-ROM inserted later).
    #[serde(default)]
    pub blank: bool,
    /// Disks, the first one first: its size (for an image, grown to this size when
    /// larger) and pool (default: the shared pool).
    #[serde(default)]
    pub disks: Vec<DiskRequest>,
    /// `bios` (SeaBIOS, default) or `uefi` (OVMF with the VM's own NVRAM).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub firmware: Option<FirmwareKind>,
    /// NICs; default: one on `business` when the cluster has that network.
    #[serde(default)]
    pub nics: Vec<NicRequest>,
    /// `virtio` (default), `scsi` or `sata` (guests without virtio drivers).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub disk_bus: Option<ferry_model::DiskBus>,
    /// An ISO image of the library for the CD-ROM drive (with `image` or `blank`).
    #[serde(default)]
    pub cdrom: Option<String>,
    /// Devices firmware boots from, in order: `disk`, `cdrom`, `network`.
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub boot_order: Vec<ferry_model::BootDevice>,
    /// A QEMU CPU model every host can run (default `qemu64`).
    #[serde(default)]
    pub cpu_model: Option<String>,
    /// cloud-init (NoCloud) personalisation of a disk image.
    #[serde(default)]
    pub cloud_init: Option<CloudInitRequest>,
    /// Run in the guest (through its agent) before every shutdown, e.g.
    /// `systemctl stop myapp`.
    #[serde(default)]
    pub stop_command: Option<String>,
    /// How long `stop_command` may take (default 60 s).
    #[serde(default)]
    pub stop_timeout_seconds: Option<u64>,
    /// vCPUs; 0: the template's (with `template`).
    #[serde(default)]
    pub cpus: u32,
    /// Memory as bytes or with a unit: `256M`, `1G`; empty: the template's (with
    /// `template`).
    #[schema(value_type = String, example = "256M")]
    #[serde(default)]
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

/// A disk of a new VM: `SIZE[@POOL]` on the command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskRequest {
    /// Bytes or with a unit: `20G`. Empty: the image's own size.
    #[serde(default)]
    pub size: Option<String>,
    /// A pool the hosts offer; default the shared pool.
    #[serde(default)]
    pub pool: Option<String>,
}

impl std::str::FromStr for DiskRequest {
    type Err = String;
    /// `20G`, `20G@fast`, `@fast` (the image's size on pool `fast`).
    fn from_str(text: &str) -> Result<Self, String> {
        let (size, pool) = match text.split_once('@') {
            Some((size, pool)) => (size, Some(pool)),
            None => (text, None),
        };
        if let Some(pool) = pool {
            if pool.is_empty() {
                return Err(format!("disk {text:?}: name a pool after '@'"));
            }
        }
        if size.is_empty() && pool.is_none() {
            return Err("disk: give SIZE[@POOL], e.g. 20G or 20G@local".into());
        }
        if !size.is_empty() {
            size.parse::<ferry_model::Bytes>()
                .map_err(|error| format!("disk {text:?}: {error}"))?;
        }
        Ok(DiskRequest {
            size: (!size.is_empty()).then(|| size.to_string()),
            pool: pool.map(str::to_string),
        })
    }
}

/// A NIC of a new VM: `NETWORK[,mac=52:54:00:…][,model=virtio|e1000]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicRequest {
    pub network: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub model: Option<ferry_model::NicModel>,
}

impl std::str::FromStr for NicRequest {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut parts = text.split(',');
        let network = parts.next().unwrap_or_default().trim();
        if network.is_empty() {
            return Err(format!(
                "nic {text:?}: name the network first, e.g. business"
            ));
        }
        let mut request = NicRequest {
            network: network.to_string(),
            mac: None,
            model: None,
        };
        for part in parts {
            match part.split_once('=') {
                Some(("mac", mac)) => {
                    mac.parse::<ferry_model::MacAddr>()
                        .map_err(|error| format!("nic {text:?}: {error}"))?;
                    request.mac = Some(mac.to_string());
                }
                Some(("model", model)) => {
                    request.model = Some(
                        model
                            .parse()
                            .map_err(|error| format!("nic {text:?}: {error}"))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "nic {text:?}: {part:?} is not mac=… or model=virtio|e1000"
                    ))
                }
            }
        }
        Ok(request)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareKind {
    Bios,
    Uefi,
}

impl std::str::FromStr for FirmwareKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "bios" => Ok(FirmwareKind::Bios),
            "uefi" => Ok(FirmwareKind::Uefi),
            other => Err(format!("{other:?} is not a firmware (bios, uefi)")),
        }
    }
}

/// cloud-init (NoCloud) settings; Ferry writes the seed ISO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudInitRequest {
    /// Default: the VM's name.
    #[serde(default)]
    pub hostname: Option<String>,
    /// A user to create, with sudo and the SSH keys below.
    #[serde(default)]
    pub user: Option<String>,
    /// Public keys (the contents of `id_ed25519.pub` …).
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// A whole `#cloud-config` document of your own, used as it is (instead of the
    /// one Ferry writes from `user` and `ssh_keys`).
    #[serde(default)]
    pub user_data: Option<String>,
}

/// `ferry vm cdrom insert|eject`: the ISO image to put in the drive; none ejects.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CdromRequest {
    #[serde(default)]
    pub image: Option<String>,
}

/// An image of the library.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ImageView {
    pub name: String,
    /// `appliance`, `qcow2`, `raw` or `iso`.
    pub format: String,
    /// The files on the shared pool.
    pub files: Vec<String>,
    /// The size a VM's disk made from it starts with (disk images).
    pub virtual_size: Option<u64>,
    pub file_size: Option<u64>,
    pub sha256: Option<String>,
    pub imported_ms: u64,
    /// Whether its guests run a QEMU guest agent.
    pub guest_agent: bool,
    /// VMs made from it or with it in their CD-ROM.
    pub used_by: Vec<String>,
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
    /// `migrate`, `move-disk`, `checkpoint`, `revert`, `delete-checkpoint` or
    /// `flatten`.
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
    /// The checkpoint (checkpoint ops).
    #[serde(default)]
    pub tag: Option<String>,
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

/// `POST /api/v1/tokens`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    /// Scope the token to one project (default: the whole cluster).
    #[serde(default)]
    pub project: Option<String>,
    /// How long it is valid, e.g. `30d`, `12h` (default: until revoked).
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
}

/// A token as listed: never its secret.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub id: String,
    pub role: String,
    pub project: Option<String>,
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub comment: String,
    /// The user a login session belongs to.
    pub user: Option<String>,
}

/// A token just made: its secret is shown this once.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub token: TokenView,
    pub secret: String,
}

/// `POST /api/v1/projects`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProjectRequest {
    pub name: String,
    #[serde(default)]
    pub max_vms: Option<u32>,
    #[serde(default)]
    pub max_vcpus: Option<u32>,
    /// e.g. `64G`.
    #[serde(default)]
    pub max_memory: Option<String>,
    /// e.g. `2T`.
    #[serde(default)]
    pub max_disk: Option<String>,
    #[serde(default)]
    pub max_backups: Option<u32>,
}

/// A project with its quota and what it uses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProjectView {
    pub name: String,
    pub max_vms: Option<u32>,
    pub max_vcpus: Option<u32>,
    pub max_memory_mib: Option<u64>,
    pub max_disk_gib: Option<u64>,
    pub max_backups: Option<u32>,
    pub vms: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

/// `POST /api/v1/users`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUserRequest {
    pub name: String,
    pub password: String,
    /// `viewer`, `operator` or `admin`.
    pub role: String,
    #[serde(default)]
    pub project: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub name: String,
    pub role: String,
    pub project: Option<String>,
    pub created_ms: u64,
}

/// `POST /api/v1/users/{name}/password`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordRequest {
    pub password: String,
}

/// `POST /api/v1/login`: a session token for a user.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub user: String,
    pub password: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateCheckpointRequest {
    /// Default: `cp-` and the time (`cp-20261202-174500`).
    #[serde(default)]
    pub tag: Option<String>,
    /// Save the guest's memory too, so a revert continues from this instant (default:
    /// yes for a running VM; a stopped VM has none).
    #[serde(default)]
    pub memory: Option<bool>,
    /// Freeze the guest's filesystems through its agent while the disks are captured
    /// (an application-consistent checkpoint, without memory).
    #[serde(default)]
    pub quiesce: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CheckpointView {
    pub tag: String,
    pub parent: Option<String>,
    /// Depth in the tree (0: a root), in the order `list` returns them.
    pub depth: usize,
    pub created_ms: u64,
    pub memory: bool,
    pub quiesced: bool,
    /// Bytes of saved memory and device state.
    pub vm_state_bytes: u64,
    pub disks: Vec<String>,
    /// The VM stands on it: the next checkpoint's parent.
    pub current: bool,
}

/// What the VM's host reports of a checkpoint action.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDone {
    /// How long the guest's vCPUs were stopped.
    pub paused_ms: Option<u64>,
    pub vm_state_bytes: u64,
    /// Filesystems frozen (a quiesced checkpoint).
    pub frozen_filesystems: Option<u64>,
    /// The VM was powered off to revert its disks and boots again.
    pub restarted: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CreateTemplateRequest {
    pub name: String,
    /// The VM to make it from: stopped, or running with `generalize` (it is
    /// generalized through its guest agent, then shut down).
    pub from_vm: String,
    /// Reset what must differ between clones (machine id, SSH host keys, cloud-init
    /// state) through the guest agent before the final shutdown.
    #[serde(default)]
    pub generalize: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateView {
    pub name: String,
    pub project: String,
    pub from_vm: String,
    pub image: String,
    pub created_ms: u64,
    pub generalized: bool,
    pub cpus: u32,
    pub memory_mib: u64,
    pub firmware: String,
    pub disks: Vec<TemplateDiskView>,
    /// VMs whose disks are overlays on this template's base.
    pub linked_clones: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateDiskView {
    pub id: String,
    pub size: u64,
    pub path: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloneVmRequest {
    /// The new VM's name.
    pub name: String,
    /// Copy the disks as they were at this checkpoint (default: as they are; the VM
    /// must then be stopped).
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Run on this host if it has room.
    #[serde(default)]
    pub host: Option<String>,
}
