//! What a new VM is made of, decided before anything is made: [`plan`] turns a create
//! request, the images it names and the pools the hosts offer into the VM's spec and
//! the files to make (disks, the UEFI NVRAM, the cloud-init seed). It is pure, so every
//! rule — which disk is a copy of the image, which pool a disk lands on, the boot
//! order of an installer — is unit-tested. [`make`] then makes the files, once, when
//! the VM is created (a start never makes a disk), and removes what it made if a step
//! fails, so nothing is half-created.

use std::path::{Path, PathBuf};

use ferry_model::checkpoint::TemplateRecord;
use ferry_model::cluster::{ImageContent, ImageRecord};
use ferry_model::{
    Boot, BootDevice, Bytes, CacheMode, CdromSpec, DiskBus, DiskFormat, DiskSpec, Firmware,
    MacAddr, NicModel, NicSpec, StopCommand, VmName, VmSpec,
};

use crate::cloud_init::{self, GuestNic, SeedFiles};
use crate::types::{CloudInitRequest, FirmwareKind};

/// The first disk of a VM made from an installer ISO or blank, without `--disk`.
pub const DEFAULT_DISK: Bytes = Bytes(8 * Bytes::GIB);
/// How long a stop command may take unless the request says.
pub const DEFAULT_STOP_TIMEOUT_SECONDS: u64 = 60;

/// A pool as the API's host can reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSite {
    pub name: String,
    pub path: PathBuf,
    pub shared: bool,
    /// Free bytes, when it could be read.
    pub free: Option<Bytes>,
}

/// Where a VM's files come from.
#[derive(Clone, Copy, Debug)]
pub enum Source<'a> {
    /// An image of the library (a disk image, or the appliance).
    Image(&'a ImageRecord),
    /// An installer ISO: in the CD-ROM, with a blank first disk.
    Iso(&'a ImageRecord),
    Blank,
    /// A template (or a VM being cloned, described as one): its disks as overlays on
    /// its base (`linked`) or copies of them (of checkpoint `snapshot` when given).
    Template {
        template: &'a TemplateRecord,
        linked: bool,
        snapshot: Option<&'a str>,
    },
}

/// A NIC to give the VM, with its address from the network's pool if it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedNic {
    pub network: String,
    pub mac: MacAddr,
    pub model: NicModel,
    pub address: Option<(std::net::Ipv4Addr, u8, Option<std::net::Ipv4Addr>)>,
}

/// A disk as asked: size and pool, both optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WantedDisk {
    pub size: Option<Bytes>,
    pub pool: Option<String>,
}

pub struct Request<'a> {
    pub name: &'a VmName,
    pub cpus: u32,
    pub memory: Bytes,
    pub cpu_model: Option<&'a str>,
    pub source: Source<'a>,
    pub disks: &'a [WantedDisk],
    pub bus: DiskBus,
    pub firmware: FirmwareKind,
    pub nics: &'a [PlannedNic],
    pub cdrom: Option<&'a ImageRecord>,
    pub boot_order: &'a [BootDevice],
    pub cloud_init: Option<&'a CloudInitRequest>,
    pub instance_id: &'a str,
    pub stop_command: Option<StopCommand>,
    /// The kernel command line's personalisation for the appliance.
    pub appliance_cmdline: String,
    pub shared_pool: &'a Path,
    pub pools: &'a [PoolSite],
}

/// A file to make for the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Blank {
        path: PathBuf,
        size: Bytes,
    },
    Copy {
        from: PathBuf,
        format: DiskFormat,
        to: PathBuf,
        size: Option<Bytes>,
    },
    Nvram {
        path: PathBuf,
    },
    /// A qcow2 overlay on a template's read-only base (a linked clone's disk).
    Overlay {
        base: PathBuf,
        to: PathBuf,
        size: Option<Bytes>,
    },
    /// A standalone copy of a template's base or a VM's disk (of checkpoint
    /// `snapshot` when given).
    FlatCopy {
        from: PathBuf,
        snapshot: Option<String>,
        to: PathBuf,
        size: Option<Bytes>,
    },
    /// The UEFI variable store copied from a template's (or a checkpoint's).
    NvramFrom {
        from: PathBuf,
        path: PathBuf,
    },
    Seed {
        path: PathBuf,
        files: SeedFiles,
    },
}

impl Step {
    fn target(&self) -> &Path {
        match self {
            Step::Blank { path, .. }
            | Step::Nvram { path }
            | Step::Seed { path, .. }
            | Step::NvramFrom { path, .. } => path,
            Step::Copy { to, .. } | Step::Overlay { to, .. } | Step::FlatCopy { to, .. } => to,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub spec: VmSpec,
    pub steps: Vec<Step>,
    /// The VM's own directories (`{pool}/vms/{name}`), removed on failure and delete.
    pub dirs: Vec<PathBuf>,
}

fn vm_dir(pool: &Path, name: &VmName) -> PathBuf {
    pool.join("vms").join(name.as_str())
}

pub fn plan(request: &Request<'_>) -> Result<Plan, String> {
    let name = request.name;
    let pool_for = |wanted: Option<&str>| -> Result<&PoolSite, String> {
        match wanted {
            Some(pool) => request
                .pools
                .iter()
                .find(|site| site.name == pool)
                .ok_or_else(|| {
                    let known: Vec<&str> = request
                        .pools
                        .iter()
                        .map(|site| site.name.as_str())
                        .collect();
                    format!(
                        "pool {pool:?} is not offered by any host (known: {})",
                        known.join(", ")
                    )
                }),
            None => request
                .pools
                .iter()
                .find(|site| site.shared && site.path == request.shared_pool)
                .ok_or_else(|| "the cluster has no shared pool".to_string()),
        }
    };
    let shared = pool_for(None)?;

    let mut steps = Vec::new();
    let mut disks = Vec::new();
    let mut cdroms = Vec::new();
    let mut dirs = vec![vm_dir(&shared.path, name)];
    let mut used: std::collections::BTreeMap<String, u64> = Default::default();

    let mut add_disk = |index: usize,
                        wanted: &WantedDisk,
                        id: String,
                        content: Option<(&Path, DiskFormat, Bytes)>,
                        from_template: Option<(&str, bool, Option<&str>)>,
                        steps: &mut Vec<Step>,
                        dirs: &mut Vec<PathBuf>|
     -> Result<DiskSpec, String> {
        let site = pool_for(wanted.pool.as_deref())?;
        let dir = vm_dir(&site.path, name);
        if !dirs.contains(&dir) {
            dirs.push(dir.clone());
        }
        let path = dir.join(format!("{id}.qcow2"));
        let size = match (wanted.size, content) {
            (Some(size), Some((_, _, image_size))) => size.max(image_size),
            (Some(size), None) => size,
            (None, Some((_, _, image_size))) => image_size,
            (None, None) if index == 0 => DEFAULT_DISK,
            (None, None) => {
                return Err(format!("disks[{index}]: give its size (SIZE[@POOL])"));
            }
        };
        if size < Bytes::mib(1) {
            return Err(format!("disks[{index}]: {size} is smaller than 1 MiB"));
        }
        let total = used.entry(site.name.clone()).or_default();
        *total += size.0;
        if let Some(free) = site.free {
            if *total > free.0 {
                return Err(format!(
                    "disks[{index}]: {} on pool {} is more than its {free} free",
                    Bytes(*total),
                    site.name
                ));
            }
        }
        let mut base = None;
        match (content, from_template) {
            (Some((from, _, _)), Some((template, true, _))) => {
                base = Some(template.to_string());
                steps.push(Step::Overlay {
                    base: from.to_path_buf(),
                    to: path.clone(),
                    size: wanted.size,
                })
            }
            (Some((from, _, _)), Some((_, false, snapshot))) => steps.push(Step::FlatCopy {
                from: from.to_path_buf(),
                snapshot: snapshot.map(str::to_string),
                to: path.clone(),
                size: wanted.size,
            }),
            (Some((from, format, _)), None) => steps.push(Step::Copy {
                from: from.to_path_buf(),
                format,
                to: path.clone(),
                size: wanted.size,
            }),
            (None, _) => steps.push(Step::Blank {
                path: path.clone(),
                size,
            }),
        }
        Ok(DiskSpec {
            id,
            path,
            format: DiskFormat::Qcow2,
            cache: CacheMode::None,
            read_only: false,
            size: Some(size),
            bus: request.bus,
            pool: Some(site.name.clone()),
            base,
        })
    };

    let first = request.disks.first().cloned().unwrap_or_default();
    let made_by_source = match request.source {
        Source::Template { template, .. } => template.disks.len().max(1),
        _ => 1,
    };
    let rest = request.disks.get(made_by_source..).unwrap_or_default();
    let mut boot = Boot::Disk;
    let guest_agent;
    let mut boot_order = request.boot_order.to_vec();
    match request.source {
        Source::Image(image) => {
            guest_agent = image.guest_agent;
            match &image.content {
                ImageContent::Appliance {
                    kernel,
                    initrd,
                    data_disk,
                } => {
                    let wanted = WantedDisk {
                        size: first.size.or(Some(*data_disk)),
                        pool: first.pool.clone(),
                    };
                    disks.push(add_disk(0, &wanted, "data".into(), None, None, &mut steps, &mut dirs)?);
                    boot = Boot::Kernel {
                        kernel: kernel.clone(),
                        initrd: Some(initrd.clone()),
                        cmdline: request.appliance_cmdline.clone(),
                    };
                }
                ImageContent::Disk {
                    path,
                    format,
                    virtual_size,
                } => disks.push(add_disk(
                    0,
                    &first,
                    "disk0".into(),
                    Some((path, *format, *virtual_size)),
                    None,
                    &mut steps,
                    &mut dirs,
                )?),
                ImageContent::Iso { .. } => {
                    return Err(format!(
                        "image {} is an ISO: create the VM with --iso {} (it installs onto a blank disk)",
                        image.name, image.name
                    ))
                }
            }
        }
        Source::Iso(iso) => {
            let ImageContent::Iso { path } = &iso.content else {
                return Err(format!(
                    "image {} is not an ISO ({})",
                    iso.name,
                    iso.content.kind().as_str()
                ));
            };
            guest_agent = false;
            disks.push(add_disk(
                0,
                &first,
                "disk0".into(),
                None,
                None,
                &mut steps,
                &mut dirs,
            )?);
            cdroms.push(CdromSpec {
                id: "cd0".into(),
                path: Some(path.clone()),
                bus: DiskBus::Sata,
            });
            if request.boot_order.is_empty() {
                // A blank disk does not boot, so firmware falls through to the installer;
                // once installed, the disk boots first.
                boot_order = vec![BootDevice::Disk, BootDevice::Cdrom];
            }
        }
        Source::Template {
            template,
            linked,
            snapshot,
        } => {
            guest_agent = template.guest_agent;
            for (index, disk) in template.disks.iter().enumerate() {
                let wanted = request.disks.get(index).cloned().unwrap_or_default();
                disks.push(add_disk(
                    index,
                    &wanted,
                    disk.id.clone(),
                    Some((&disk.path, DiskFormat::Qcow2, disk.size)),
                    Some((&template.name, linked, snapshot)),
                    &mut steps,
                    &mut dirs,
                )?);
            }
            boot = match &template.boot {
                Boot::Kernel { kernel, initrd, .. } => Boot::Kernel {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    cmdline: request.appliance_cmdline.clone(),
                },
                Boot::Disk => Boot::Disk,
            };
        }
        Source::Blank => {
            guest_agent = false;
            disks.push(add_disk(
                0,
                &first,
                "disk0".into(),
                None,
                None,
                &mut steps,
                &mut dirs,
            )?);
        }
    }
    for (offset, wanted) in rest.iter().enumerate() {
        let index = offset + made_by_source;
        disks.push(add_disk(
            index,
            wanted,
            format!("disk{index}"),
            None,
            None,
            &mut steps,
            &mut dirs,
        )?);
    }
    if let Some(cdrom) = request.cdrom {
        let ImageContent::Iso { path } = &cdrom.content else {
            return Err(format!(
                "cdrom: image {} is {}, not an ISO",
                cdrom.name,
                cdrom.content.kind().as_str()
            ));
        };
        if !cdroms.is_empty() {
            return Err("cdrom: the installer ISO already fills the CD-ROM drive".into());
        }
        cdroms.push(CdromSpec {
            id: "cd0".into(),
            path: Some(path.clone()),
            bus: DiskBus::Sata,
        });
    }
    if boot_order.is_empty() {
        boot_order = ferry_model::default_boot_order();
    }

    let is_appliance = matches!(boot, Boot::Kernel { .. });
    let wants_seed = match request.source {
        Source::Image(image) => matches!(image.content, ImageContent::Disk { .. }),
        Source::Template { template, .. } => template.cloud_init || request.cloud_init.is_some(),
        _ => request.cloud_init.is_some(),
    };
    if is_appliance && request.cloud_init.is_some() {
        return Err(
            "cloud-init options apply to disk images; the appliance is personalised by its \
             kernel command line"
                .into(),
        );
    }
    if wants_seed {
        let guest_nics: Vec<GuestNic> = request
            .nics
            .iter()
            .map(|nic| GuestNic {
                mac: nic.mac,
                address: nic.address,
            })
            .collect();
        let files = cloud_init::seed_files(
            name.as_str(),
            request.instance_id,
            request.cloud_init.unwrap_or(&CloudInitRequest::default()),
            &guest_nics,
        )?;
        let path = vm_dir(&shared.path, name).join("seed.iso");
        steps.push(Step::Seed {
            path: path.clone(),
            files,
        });
        // On SCSI: cloud kernels (Debian's among them) have no AHCI driver.
        cdroms.push(CdromSpec {
            id: "cidata".into(),
            path: Some(path),
            bus: DiskBus::Scsi,
        });
    }

    let template_nvram = match request.source {
        Source::Template { template, .. } => template.nvram.as_ref(),
        _ => None,
    };
    let firmware = match (request.firmware, template_nvram) {
        (FirmwareKind::Bios, _) => Firmware::Bios,
        (FirmwareKind::Uefi, Some(from)) => {
            let path = vm_dir(&shared.path, name).join("nvram.fd");
            steps.push(Step::NvramFrom {
                from: from.clone(),
                path: path.clone(),
            });
            Firmware::Uefi { nvram: path }
        }
        (FirmwareKind::Uefi, None) => {
            let path = vm_dir(&shared.path, name).join("nvram.fd");
            steps.push(Step::Nvram { path: path.clone() });
            Firmware::Uefi { nvram: path }
        }
    };
    let nics = request
        .nics
        .iter()
        .enumerate()
        .map(|(index, nic)| NicSpec {
            tap: MacAddr::tap_name(name.as_str(), index),
            mac: nic.mac,
            network: nic.network.clone(),
            model: nic.model,
        })
        .collect();
    if request.stop_command.is_some() && !guest_agent {
        return Err("stop_command runs through the guest agent, and this image has none".into());
    }
    let spec = VmSpec {
        name: name.clone(),
        cpus: request.cpus,
        memory: request.memory,
        cpu_model: request
            .cpu_model
            .map(str::to_string)
            .unwrap_or_else(ferry_model::vm_default_cpu_model),
        disks,
        nics,
        boot,
        firmware,
        cdroms,
        boot_order,
        guest_agent,
        stop_command: request.stop_command.clone(),
    };
    Ok(Plan { spec, steps, dirs })
}

/// Makes the plan's files. Refuses to overwrite anything; on failure removes what it
/// made and returns why.
pub fn make(plan: &Plan) -> Result<(), String> {
    for step in &plan.steps {
        if step.target().exists() {
            return Err(format!(
                "{} already exists (left by an earlier VM of this name?); remove it or pick another name",
                step.target().display()
            ));
        }
    }
    let mut made: Vec<&Path> = Vec::new();
    let result = plan.steps.iter().try_for_each(|step| {
        made.push(step.target());
        match step {
            Step::Blank { path, size } => {
                ferry_qemu::image::create_blank(path, DiskFormat::Qcow2, *size)
            }
            Step::Copy {
                from,
                format,
                to,
                size,
            } => ferry_qemu::image::copy_to_qcow2(from, *format, to, *size),
            Step::Nvram { path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
                }
                std::fs::copy(ferry_qemu::cmdline::OVMF_VARS_TEMPLATE, path)
                    .map(drop)
                    .map_err(|error| {
                        format!(
                            "cannot copy the UEFI variable store {} (package ovmf): {error}",
                            ferry_qemu::cmdline::OVMF_VARS_TEMPLATE
                        )
                    })
            }
            Step::Seed { path, files } => cloud_init::write_seed(path, files),
            Step::Overlay { base, to, size } => {
                ferry_qemu::snapshot::create_overlay(base, to, *size)
            }
            Step::FlatCopy {
                from,
                snapshot,
                to,
                size,
            } => {
                ferry_qemu::snapshot::flat_copy(from, to, snapshot.as_deref(), &mut |_| {})?;
                grow(to, *size)
            }
            Step::NvramFrom { from, path } => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
                }
                std::fs::copy(from, path).map(drop).map_err(|error| {
                    format!(
                        "cannot copy the UEFI variable store {}: {error}",
                        from.display()
                    )
                })?;
                // The template's copy is read-only; the VM's own is not.
                std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                    .map_err(|error| format!("{}: {error}", path.display()))
            }
        }
    });
    if let Err(error) = result {
        for path in made {
            if let Err(cleanup) = std::fs::remove_file(path) {
                if cleanup.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {cleanup}", path.display());
                }
            }
        }
        // Only directories left empty go: anything else in them is not ours.
        for dir in &plan.dirs {
            if let Err(cleanup) = std::fs::remove_dir(dir) {
                tracing::debug!("{} stays: {cleanup}", dir.display());
            }
        }
        return Err(error);
    }
    Ok(())
}

/// Grows a copied disk to `size` when that is larger.
fn grow(path: &Path, size: Option<Bytes>) -> Result<(), String> {
    let Some(size) = size else { return Ok(()) };
    if size > ferry_qemu::image::inspect(path)?.virtual_size {
        ferry_qemu::image::resize(path, size)?;
    }
    Ok(())
}

/// Removes a VM's own directories (`{pool}/vms/{name}`) with everything in them; only
/// directories of that shape are touched.
pub fn remove_dirs(dirs: &[PathBuf]) {
    for dir in dirs {
        let is_vm_dir = dir
            .parent()
            .and_then(|parent| parent.file_name())
            .is_some_and(|name| name == "vms");
        if !is_vm_dir {
            tracing::warn!("not removing {}: not a VM directory", dir.display());
            continue;
        }
        if let Err(error) = std::fs::remove_dir_all(dir) {
            if error.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {error}", dir.display());
            }
        }
    }
}

/// The VM directories a spec's files live in.
pub fn dirs_of(spec: &VmSpec) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut files: Vec<&Path> = spec.disks.iter().map(|disk| disk.path.as_path()).collect();
    if let Firmware::Uefi { nvram } = &spec.firmware {
        files.push(nvram);
    }
    files.extend(
        spec.cdroms
            .iter()
            .filter(|cd| cd.id == "cidata")
            .filter_map(|cd| cd.path.as_deref()),
    );
    for file in files {
        if let Some(dir) = file.parent() {
            if dir.file_name().and_then(|name| name.to_str()) == Some(spec.name.as_str())
                && !dirs.iter().any(|known| known == dir)
            {
                dirs.push(dir.to_path_buf());
            }
        }
    }
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pools() -> Vec<PoolSite> {
        vec![
            PoolSite {
                name: "shared".into(),
                path: "/pool".into(),
                shared: true,
                free: Some(Bytes(100 * Bytes::GIB)),
            },
            PoolSite {
                name: "host1-local".into(),
                path: "/local".into(),
                shared: false,
                free: Some(Bytes(10 * Bytes::GIB)),
            },
        ]
    }

    fn image(content: ImageContent) -> ImageRecord {
        ImageRecord {
            version: 1,
            name: "img".into(),
            content,
            sha256: None,
            file_size: None,
            imported_ms: 0,
            guest_agent: true,
            probe_cmdline: None,
            probe_marker: None,
            restart_command: None,
        }
    }

    fn cloud_image() -> ImageRecord {
        image(ImageContent::Disk {
            path: "/pool/images/debian.qcow2".into(),
            format: DiskFormat::Qcow2,
            virtual_size: Bytes(2 * Bytes::GIB),
        })
    }

    fn iso() -> ImageRecord {
        let mut iso = image(ImageContent::Iso {
            path: "/pool/images/install.iso".into(),
        });
        iso.name = "install".into();
        iso
    }

    fn nic() -> PlannedNic {
        PlannedNic {
            network: "business".into(),
            mac: "52:54:00:00:00:01".parse().unwrap(),
            model: NicModel::Virtio,
            address: None,
        }
    }

    fn plan_with(
        source: Source<'_>,
        disks: &[WantedDisk],
        firmware: FirmwareKind,
    ) -> Result<Plan, String> {
        let name: VmName = "web".parse().unwrap();
        let pools = pools();
        let nics = [nic()];
        plan(&Request {
            name: &name,
            cpus: 1,
            memory: Bytes::mib(512),
            cpu_model: None,
            source,
            disks,
            bus: DiskBus::Virtio,
            firmware,
            nics: &nics,
            cdrom: None,
            boot_order: &[],
            cloud_init: None,
            instance_id: "i-1",
            stop_command: None,
            appliance_cmdline: "console=ttyS0".into(),
            shared_pool: Path::new("/pool"),
            pools: &pools,
        })
    }

    #[test]
    fn a_cloud_image_vm_gets_a_grown_copy_and_a_cloud_init_seed() {
        let image = cloud_image();
        let wanted = [WantedDisk {
            size: Some(Bytes(20 * Bytes::GIB)),
            pool: None,
        }];
        let plan = plan_with(Source::Image(&image), &wanted, FirmwareKind::Bios).unwrap();
        assert_eq!(
            plan.spec.disks[0].path,
            PathBuf::from("/pool/vms/web/disk0.qcow2")
        );
        assert_eq!(plan.spec.disks[0].size, Some(Bytes(20 * Bytes::GIB)));
        assert!(
            matches!(&plan.steps[0], Step::Copy { from, size: Some(_), .. } if from == Path::new("/pool/images/debian.qcow2"))
        );
        assert!(
            matches!(&plan.steps[1], Step::Seed { path, .. } if path == Path::new("/pool/vms/web/seed.iso"))
        );
        assert_eq!(plan.spec.cdroms[0].id, "cidata");
        assert_eq!(plan.spec.boot, Boot::Disk);
        plan.spec
            .validate(&ferry_model::HostLimits {
                cpus: 2,
                memory: Bytes(8 * Bytes::GIB),
            })
            .unwrap();
    }

    #[test]
    fn an_installer_iso_goes_in_the_cdrom_over_a_blank_disk_that_boots_first() {
        let iso = iso();
        let plan = plan_with(Source::Iso(&iso), &[], FirmwareKind::Bios).unwrap();
        assert_eq!(
            plan.steps[0],
            Step::Blank {
                path: "/pool/vms/web/disk0.qcow2".into(),
                size: DEFAULT_DISK
            }
        );
        assert_eq!(
            plan.spec.cdroms[0].path.as_deref(),
            Some(Path::new("/pool/images/install.iso"))
        );
        assert_eq!(
            plan.spec.boot_order,
            vec![BootDevice::Disk, BootDevice::Cdrom]
        );
        assert!(
            !plan.spec.guest_agent,
            "an installer's guest has no agent yet"
        );
    }

    #[test]
    fn uefi_vms_get_their_own_nvram_on_the_shared_pool() {
        let plan = plan_with(Source::Blank, &[], FirmwareKind::Uefi).unwrap();
        assert_eq!(
            plan.spec.firmware,
            Firmware::Uefi {
                nvram: "/pool/vms/web/nvram.fd".into()
            }
        );
        assert!(plan.steps.contains(&Step::Nvram {
            path: "/pool/vms/web/nvram.fd".into()
        }));
    }

    #[test]
    fn extra_disks_land_on_their_pool_and_count_against_its_free_space() {
        let wanted = [
            WantedDisk {
                size: Some(Bytes::mib(512)),
                pool: None,
            },
            WantedDisk {
                size: Some(Bytes(4 * Bytes::GIB)),
                pool: Some("host1-local".into()),
            },
        ];
        let plan = plan_with(Source::Blank, &wanted, FirmwareKind::Bios).unwrap();
        assert_eq!(
            plan.spec.disks[1].path,
            PathBuf::from("/local/vms/web/disk1.qcow2")
        );
        assert_eq!(plan.spec.disks[1].pool.as_deref(), Some("host1-local"));
        assert_eq!(
            plan.dirs,
            vec![
                PathBuf::from("/pool/vms/web"),
                PathBuf::from("/local/vms/web")
            ]
        );
        let too_big = [
            WantedDisk {
                size: Some(Bytes::mib(512)),
                pool: None,
            },
            WantedDisk {
                size: Some(Bytes(11 * Bytes::GIB)),
                pool: Some("host1-local".into()),
            },
        ];
        let error = plan_with(Source::Blank, &too_big, FirmwareKind::Bios).unwrap_err();
        assert_eq!(
            error,
            "disks[1]: 11 GiB on pool host1-local is more than its 10 GiB free"
        );
    }

    #[test]
    fn unknown_pools_and_sizeless_extra_disks_are_refused() {
        let unknown = [WantedDisk {
            size: None,
            pool: Some("fast".into()),
        }];
        let error = plan_with(Source::Blank, &unknown, FirmwareKind::Bios).unwrap_err();
        assert!(
            error.starts_with("pool \"fast\" is not offered by any host"),
            "{error}"
        );
        let sizeless = [WantedDisk::default(), WantedDisk::default()];
        let error = plan_with(Source::Blank, &sizeless, FirmwareKind::Bios).unwrap_err();
        assert_eq!(error, "disks[1]: give its size (SIZE[@POOL])");
    }

    #[test]
    fn an_iso_is_not_a_disk_image() {
        let iso = iso();
        let error = plan_with(Source::Image(&iso), &[], FirmwareKind::Bios).unwrap_err();
        assert!(error.contains("--iso install"), "{error}");
    }

    #[test]
    fn the_appliance_boots_its_kernel_with_a_blank_data_disk() {
        let appliance = image(ImageContent::Appliance {
            kernel: "/pool/images/appliance/vmlinuz".into(),
            initrd: "/pool/images/appliance/initramfs.img".into(),
            data_disk: Bytes::mib(256),
        });
        let plan = plan_with(Source::Image(&appliance), &[], FirmwareKind::Bios).unwrap();
        assert_eq!(plan.spec.disks[0].id, "data");
        assert_eq!(
            plan.steps,
            vec![Step::Blank {
                path: "/pool/vms/web/data.qcow2".into(),
                size: Bytes::mib(256)
            }]
        );
        assert!(matches!(plan.spec.boot, Boot::Kernel { .. }));
        assert!(
            plan.spec.cdroms.is_empty(),
            "no cloud-init seed for the appliance"
        );
    }

    #[test]
    fn make_never_overwrites_and_removes_what_it_made_on_failure() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vms").join("web");
        let plan = Plan {
            spec: VmSpec::minimal("web".parse().unwrap()),
            steps: vec![
                Step::Blank {
                    path: vm_dir.join("disk0.qcow2"),
                    size: Bytes::mib(8),
                },
                Step::Copy {
                    from: dir.path().join("missing.img"),
                    format: DiskFormat::Raw,
                    to: vm_dir.join("disk1.qcow2"),
                    size: None,
                },
            ],
            dirs: vec![vm_dir.clone()],
        };
        assert!(make(&plan).unwrap_err().contains("missing.img"));
        assert!(!vm_dir.exists(), "nothing is left half-made");
        std::fs::create_dir_all(&vm_dir).unwrap();
        std::fs::write(vm_dir.join("disk0.qcow2"), b"precious").unwrap();
        assert!(make(&plan).unwrap_err().contains("already exists"));
        assert_eq!(
            std::fs::read(vm_dir.join("disk0.qcow2")).unwrap(),
            b"precious"
        );
    }
}
