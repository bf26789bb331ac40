//! The desired shape of a virtual machine (`VmSpec`) and the rules a spec must pass
//! before any driver acts on it. Validation reports the first problem with the field's
//! path, so that the CLI and the API can print one line that says what to fix.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{Bytes, MacAddr, VmName};

/// The least memory a guest can boot in.
pub const MIN_MEMORY: Bytes = Bytes::mib(32);
/// QEMU's q35 machine and our CPU models stop here.
const MAX_CPUS: u32 = 255;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME: usize = 15;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: VmName,
    pub cpus: u32,
    pub memory: Bytes,
    /// A QEMU CPU model the whole cluster can run (`qemu64`, `Haswell`…) or `host`.
    #[serde(default = "default_cpu_model")]
    pub cpu_model: String,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    pub boot: Boot,
    /// SeaBIOS, or OVMF with this VM's own NVRAM file (on the shared pool, so it moves
    /// with the VM on migration and HA).
    #[serde(default)]
    pub firmware: Firmware,
    /// CD-ROM drives (SATA), each with a medium or empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cdroms: Vec<CdromSpec>,
    /// The order firmware tries devices in, when `boot` is `disk`.
    #[serde(default = "default_boot_order")]
    pub boot_order: Vec<BootDevice>,
    /// The guest runs a QEMU guest agent: heartbeat and stall monitors use it, and
    /// `stop_command` runs through it. Without one those monitors stay out of the way.
    #[serde(default = "default_true")]
    pub guest_agent: bool,
    /// Stops the application cleanly before the guest is shut down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_command: Option<StopCommand>,
}

impl VmSpec {
    /// A VM with nothing attached yet: one vCPU, 256 MiB, booting from disk with
    /// SeaBIOS; the base that struct-update syntax fills in.
    pub fn minimal(name: VmName) -> VmSpec {
        VmSpec {
            name,
            cpus: 1,
            memory: Bytes::mib(256),
            cpu_model: default_cpu_model(),
            disks: Vec::new(),
            nics: Vec::new(),
            boot: Boot::Disk,
            firmware: Firmware::Bios,
            cdroms: Vec::new(),
            boot_order: default_boot_order(),
            guest_agent: true,
            stop_command: None,
        }
    }
}

pub fn default_boot_order() -> Vec<BootDevice> {
    vec![BootDevice::Disk, BootDevice::Cdrom]
}

fn default_true() -> bool {
    true
}

/// The firmware a VM boots with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS.
    #[default]
    Bios,
    /// OVMF; `nvram` is the VM's own copy of the UEFI variable store.
    Uefi { nvram: PathBuf },
}

impl Firmware {
    pub fn name(&self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi { .. } => "uefi",
        }
    }
}

/// A device class firmware can boot from, in `boot_order`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    Disk,
    Cdrom,
    Network,
}

impl std::str::FromStr for BootDevice {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "disk" => Ok(BootDevice::Disk),
            "cdrom" => Ok(BootDevice::Cdrom),
            "network" | "net" => Ok(BootDevice::Network),
            other => Err(format!(
                "{other:?} is not a boot device (disk, cdrom, network)"
            )),
        }
    }
}

/// The bus a disk is attached to. `virtio` is fastest; `scsi` (virtio-scsi) supports
/// discard and many disks; `sata` (AHCI) is for guests without virtio drivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Scsi,
    Sata,
}

impl std::str::FromStr for DiskBus {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "virtio" => Ok(DiskBus::Virtio),
            "scsi" => Ok(DiskBus::Scsi),
            "sata" => Ok(DiskBus::Sata),
            other => Err(format!("{other:?} is not a disk bus (virtio, scsi, sata)")),
        }
    }
}

/// A CD-ROM drive; `path` is the ISO in it, `None` when the tray is empty. On SATA by
/// default (what installers of every age find); on SCSI (virtio-scsi) for guests whose
/// kernel has no AHCI driver, such as Debian's cloud kernel reading its cloud-init seed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CdromSpec {
    pub id: String,
    pub path: Option<PathBuf>,
    #[serde(default = "sata")]
    pub bus: DiskBus,
}

fn sata() -> DiskBus {
    DiskBus::Sata
}

/// A command run in the guest (through its agent) before the ACPI shutdown, so the
/// application stops for sure before the OS does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopCommand {
    pub command: String,
    pub timeout_seconds: u64,
}

/// The longest a stop command may take.
pub const MAX_STOP_TIMEOUT_SECONDS: u64 = 3600;
/// The AHCI controller of QEMU's q35 machine has six ports.
const SATA_PORTS: usize = 6;

pub fn default_cpu_model() -> String {
    "qemu64".to_string()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "kebab-case")]
pub enum Boot {
    /// Firmware boots the first disk.
    Disk,
    /// Direct kernel boot, as appliances do.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Short identifier, also the guest-visible serial (`data`, `root`…).
    pub id: String,
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub cache: CacheMode,
    #[serde(default)]
    pub read_only: bool,
    /// The size the guest sees (known for disks Ferry created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Bytes>,
    #[serde(default)]
    pub bus: DiskBus,
    /// The pool the disk lives in; placement only picks hosts that have it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The template this disk is a linked clone of: a qcow2 overlay on the template's
    /// read-only base, until `vm flatten` copies the base in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
}

/// Host cache modes under which a guest's flush reaches stable storage on the host.
/// Modes that lose acknowledged writes on host failure (`writeback`, `unsafe`) are not
/// representable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT, guest flushes become host flushes. Needs a filesystem with O_DIRECT.
    None,
    /// Every write is synchronous on the host. Works on any filesystem, tmpfs included.
    #[default]
    Writethrough,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// The host tap device this NIC is attached to.
    pub tap: String,
    pub mac: MacAddr,
    /// The network whose bridge the tap joins; placement only picks hosts that have it.
    #[serde(default = "default_network")]
    pub network: String,
    #[serde(default)]
    pub model: NicModel,
}

pub fn default_network() -> String {
    "business".to_string()
}

/// The emulated network card: `virtio` is fastest, `e1000` is for guests without
/// virtio drivers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
}

impl std::str::FromStr for NicModel {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "virtio" => Ok(NicModel::Virtio),
            "e1000" => Ok(NicModel::E1000),
            other => Err(format!("{other:?} is not a NIC model (virtio, e1000)")),
        }
    }
}

/// What the host offers, for the checks that depend on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostLimits {
    pub cpus: u32,
    pub memory: Bytes,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VM {vm}: {field}: {problem}")]
pub struct SpecError {
    pub vm: String,
    pub field: String,
    pub problem: String,
}

impl VmSpec {
    /// Checks everything that can be checked without touching the host: sizes, names,
    /// uniqueness, and the fit against the host's limits.
    pub fn validate(&self, host: &HostLimits) -> Result<(), SpecError> {
        let fail = |field: &str, problem: String| {
            Err(SpecError {
                vm: self.name.to_string(),
                field: field.to_string(),
                problem,
            })
        };
        if self.cpus == 0 {
            return fail("cpus", "must be at least 1".into());
        }
        if self.cpus > host.cpus.min(MAX_CPUS) {
            return fail(
                "cpus",
                format!(
                    "{} vCPUs is more than the host's {} CPUs",
                    self.cpus, host.cpus
                ),
            );
        }
        if self.memory < MIN_MEMORY {
            return fail(
                "memory",
                format!("{} is below the minimum of {MIN_MEMORY}", self.memory),
            );
        }
        if !self.memory.0.is_multiple_of(Bytes::MIB) {
            return fail(
                "memory",
                format!("{} is not a whole number of MiB", self.memory.0),
            );
        }
        if self.memory > host.memory {
            return fail(
                "memory",
                format!("{} is more than the host's {}", self.memory, host.memory),
            );
        }
        let cpu_ok = !self.cpu_model.is_empty()
            && self
                .cpu_model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !cpu_ok {
            return fail(
                "cpu_model",
                format!("{:?} is not a CPU model name", self.cpu_model),
            );
        }
        let mut disk_ids = HashSet::new();
        let mut disk_paths = HashSet::new();
        for (index, disk) in self.disks.iter().enumerate() {
            let field = format!("disks[{index}]");
            if !valid_device_id(&disk.id) {
                return fail(
                    &format!("{field}.id"),
                    format!("{:?} must be 1-20 of a-z 0-9 -", disk.id),
                );
            }
            if !disk_ids.insert(&disk.id) {
                return fail(
                    &format!("{field}.id"),
                    format!("{:?} is used twice", disk.id),
                );
            }
            if !disk.path.is_absolute() {
                return fail(
                    &format!("{field}.path"),
                    format!("{} must be absolute", disk.path.display()),
                );
            }
            if has_qemu_separator(&disk.path) {
                return fail(&format!("{field}.path"), "must not contain ','".into());
            }
            if !disk_paths.insert(&disk.path) {
                return fail(
                    &format!("{field}.path"),
                    format!("{} is attached twice", disk.path.display()),
                );
            }
        }
        for (index, cdrom) in self.cdroms.iter().enumerate() {
            let field = format!("cdroms[{index}]");
            if !valid_device_id(&cdrom.id) {
                return fail(
                    &format!("{field}.id"),
                    format!("{:?} must be 1-20 of a-z 0-9 -", cdrom.id),
                );
            }
            if !disk_ids.insert(&cdrom.id) {
                return fail(
                    &format!("{field}.id"),
                    format!("{:?} is used twice", cdrom.id),
                );
            }
            if cdrom.bus == DiskBus::Virtio {
                return fail(
                    &format!("{field}.bus"),
                    "a CD-ROM is on sata or scsi, not virtio".into(),
                );
            }
            if let Some(path) = &cdrom.path {
                if !path.is_absolute() || has_qemu_separator(path) {
                    return fail(
                        &format!("{field}.path"),
                        format!("{} must be an absolute path without ','", path.display()),
                    );
                }
            }
        }
        let sata = self
            .disks
            .iter()
            .filter(|disk| disk.bus == DiskBus::Sata)
            .count()
            + self
                .cdroms
                .iter()
                .filter(|cdrom| cdrom.bus == DiskBus::Sata)
                .count();
        if sata > SATA_PORTS {
            return fail(
                "disks",
                format!("{sata} SATA disks and CD-ROMs, but the machine has {SATA_PORTS} ports"),
            );
        }
        let mut boot_devices = HashSet::new();
        for device in &self.boot_order {
            if !boot_devices.insert(device) {
                return fail("boot_order", format!("{device:?} is listed twice"));
            }
        }
        if let Firmware::Uefi { nvram } = &self.firmware {
            if !nvram.is_absolute() || has_qemu_separator(nvram) {
                return fail(
                    "firmware.nvram",
                    format!("{} must be an absolute path without ','", nvram.display()),
                );
            }
        }
        if let Some(stop) = &self.stop_command {
            if stop.command.trim().is_empty() {
                return fail("stop_command", "is empty".into());
            }
            if stop.timeout_seconds == 0 || stop.timeout_seconds > MAX_STOP_TIMEOUT_SECONDS {
                return fail(
                    "stop_command.timeout_seconds",
                    format!("must be 1-{MAX_STOP_TIMEOUT_SECONDS}"),
                );
            }
            if !self.guest_agent {
                return fail(
                    "stop_command",
                    "needs a guest agent, and this VM has none".into(),
                );
            }
        }
        let mut taps = HashSet::new();
        let mut macs = HashSet::new();
        for (index, nic) in self.nics.iter().enumerate() {
            let field = format!("nics[{index}]");
            let tap_ok = !nic.tap.is_empty()
                && nic.tap.len() <= MAX_IFNAME
                && nic
                    .tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !tap_ok {
                return fail(
                    &format!("{field}.tap"),
                    format!(
                        "{:?} is not an interface name (1-{MAX_IFNAME} of a-z 0-9 - _)",
                        nic.tap
                    ),
                );
            }
            if !taps.insert(&nic.tap) {
                return fail(
                    &format!("{field}.tap"),
                    format!("two NICs on tap {}", nic.tap),
                );
            }
            if !valid_device_id(&nic.network) {
                return fail(
                    &format!("{field}.network"),
                    format!("{:?} is not a network name", nic.network),
                );
            }
            if !macs.insert(nic.mac) {
                return fail(
                    &format!("{field}.mac"),
                    format!("{} is used twice", nic.mac),
                );
            }
        }
        match &self.boot {
            Boot::Disk if self.disks.is_empty() && self.cdroms.is_empty() => {
                fail("boot", "boot from disk needs a disk or a CD-ROM".into())
            }
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                if !kernel.is_absolute() || has_qemu_separator(kernel) {
                    return fail(
                        "boot.kernel",
                        format!("{} must be an absolute path without ','", kernel.display()),
                    );
                }
                if let Some(initrd) = initrd {
                    if !initrd.is_absolute() || has_qemu_separator(initrd) {
                        return fail(
                            "boot.initrd",
                            format!("{} must be an absolute path without ','", initrd.display()),
                        );
                    }
                }
                if cmdline.contains('\n') {
                    return fail("boot.cmdline", "must be one line".into());
                }
                Ok(())
            }
            Boot::Disk => Ok(()),
        }
    }
}

/// Disk and CD-ROM ids name QEMU nodes and guest-visible serials.
fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 20
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// QEMU's option syntax splits on ','; a path with one would be silently misparsed.
fn has_qemu_separator(path: &std::path::Path) -> bool {
    path.to_string_lossy().contains(',')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostLimits {
        HostLimits {
            cpus: 2,
            memory: Bytes(8 * Bytes::GIB),
        }
    }

    fn appliance() -> VmSpec {
        VmSpec {
            name: "web-1".parse().unwrap(),
            cpus: 1,
            memory: Bytes::mib(256),
            cpu_model: default_cpu_model(),
            disks: vec![DiskSpec {
                id: "data".into(),
                path: "/pool/web-1-data.qcow2".into(),
                format: DiskFormat::Qcow2,
                cache: CacheMode::Writethrough,
                read_only: false,
                size: None,
                ..Default::default()
            }],
            nics: vec![NicSpec {
                tap: "tap-web1".into(),
                mac: MacAddr::derived_from("web-1/0"),
                network: crate::default_network(),
                model: Default::default(),
            }],
            boot: Boot::Kernel {
                kernel: "/images/vmlinuz".into(),
                initrd: Some("/images/initrd".into()),
                cmdline: "console=ttyS0".into(),
            },
            firmware: Default::default(),
            cdroms: Vec::new(),
            boot_order: crate::default_boot_order(),
            guest_agent: true,
            stop_command: None,
        }
    }

    fn problem(spec: &VmSpec) -> String {
        spec.validate(&host()).unwrap_err().to_string()
    }

    #[test]
    fn a_plain_appliance_spec_is_valid() {
        appliance().validate(&host()).unwrap();
    }

    #[test]
    fn zero_memory_names_the_field() {
        let mut spec = appliance();
        spec.memory = Bytes(0);
        assert_eq!(
            problem(&spec),
            "VM web-1: memory: 0 B is below the minimum of 32 MiB"
        );
    }

    #[test]
    fn more_vcpus_than_the_host_is_refused() {
        let mut spec = appliance();
        spec.cpus = 4;
        assert_eq!(
            problem(&spec),
            "VM web-1: cpus: 4 vCPUs is more than the host's 2 CPUs"
        );
    }

    #[test]
    fn two_nics_on_one_tap_is_refused() {
        let mut spec = appliance();
        let mut second = spec.nics[0].clone();
        second.mac = MacAddr::derived_from("web-1/1");
        spec.nics.push(second);
        assert_eq!(
            problem(&spec),
            "VM web-1: nics[1].tap: two NICs on tap tap-web1"
        );
    }

    #[test]
    fn a_tap_name_longer_than_linux_allows_is_refused() {
        let mut spec = appliance();
        spec.nics[0].tap = "a-very-long-tap-name".into();
        assert!(problem(&spec).starts_with("VM web-1: nics[0].tap:"));
    }

    #[test]
    fn a_relative_or_comma_path_is_refused() {
        let mut spec = appliance();
        spec.disks[0].path = "data.qcow2".into();
        assert!(problem(&spec).contains("disks[0].path"));
        spec.disks[0].path = "/pool/a,b.qcow2".into();
        assert!(problem(&spec).contains("','"));
    }

    #[test]
    fn disk_boot_needs_a_disk() {
        let mut spec = appliance();
        spec.disks.clear();
        spec.boot = Boot::Disk;
        assert_eq!(
            problem(&spec),
            "VM web-1: boot: boot from disk needs a disk or a CD-ROM"
        );
    }

    #[test]
    fn spec_json_round_trips_and_rejects_bad_names() {
        let spec = appliance();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), spec);
        let bad = json.replace("web-1", "Web 1");
        assert!(serde_json::from_str::<VmSpec>(&bad).is_err());
    }
}
