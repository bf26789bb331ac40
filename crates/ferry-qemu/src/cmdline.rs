//! `VmSpec` → QEMU argv. A pure function, so every device choice is visible in one place
//! and checked by unit tests:
//!
//! - q35, no default devices, no user config: the guest sees exactly what the spec says,
//!   on every host, which is what makes live migration between hosts possible;
//! - disks through `-blockdev` with named nodes (block jobs need the names), image
//!   locking on (a second QEMU cannot open a disk another still holds), and a cache mode
//!   under which the guest's flush reaches the host's disk;
//! - QMP and the guest agent on unix sockets in the run directory, QEMU as the server
//!   (`wait=off`), so a restarted supervisor can connect again;
//! - firmware: SeaBIOS, or OVMF from pflash with the VM's own NVRAM file;
//! - disks on virtio-blk, virtio-scsi or SATA (for guests without virtio drivers),
//!   CD-ROMs on SATA, NICs on virtio-net or e1000, boot order as `bootindex`;
//! - the serial console on a unix socket (interactive) that QEMU also logs to a file,
//!   and a VGA display served by QEMU's VNC server on a unix socket.

use ferry_model::{Boot, BootDevice, CacheMode, DiskBus, DiskFormat, Firmware, NicModel, VmSpec};

use crate::{Accel, RunDir};

/// Name of the guest agent's virtio-serial port, as qemu-ga expects it.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// OVMF's code (read-only, shared by every VM) and the template of its variable store,
/// as Debian's `ovmf` package installs them (4 MiB flash).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// Options that are not part of the VM's desired shape but of one start of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartMode {
    /// Wait for an incoming migration (`-incoming defer`) instead of running the guest.
    pub incoming: bool,
    /// Start with the vCPUs stopped (`-S`).
    pub paused: bool,
}

pub fn build(spec: &VmSpec, run: &RunDir, accel: Accel, mode: StartMode) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(|part| part.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    match &spec.firmware {
        Firmware::Bios => push(&["-machine", "q35"]),
        Firmware::Uefi { nvram } => {
            push(&[
                "-blockdev",
                &format!("driver=file,node-name=ovmf-code-file,filename={OVMF_CODE},read-only=on"),
            ]);
            push(&[
                "-blockdev",
                "driver=raw,node-name=ovmf-code,file=ovmf-code-file,read-only=on",
            ]);
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name=ovmf-vars-file,filename={},locking=on",
                    nvram.display()
                ),
            ]);
            push(&[
                "-blockdev",
                "driver=raw,node-name=ovmf-vars,file=ovmf-vars-file",
            ]);
            push(&["-machine", "q35,pflash0=ovmf-code,pflash1=ovmf-vars"]);
        }
    }
    push(&["-accel", accel.qemu_name()]);
    push(&["-cpu", &spec.cpu_model]);
    push(&["-smp", &spec.cpus.to_string()]);
    // QEMU 7.2 under TCG lost guest stores in long live migrations unless the RAM
    // block's size was not a multiple of 256 KiB (we added 8 KiB); QEMU 10 has the
    // upstream fix, and the memory-comparing migration test passes without it.
    push(&["-m", &format!("{}M", spec.memory.as_mib())]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-msg",
        "timestamp=on",
    ]);
    // A guest reboot stays a reboot; a guest power-off or kernel panic ends the process
    // (after the `GUEST_PANICKED` event), so the agent restarts it and knows why.
    push(&["-action", "reboot=reset,shutdown=poweroff,panic=shutdown"]);

    let qmp = run.qmp_socket();
    push(&[
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", qmp.display()),
    ]);
    push(&["-mon", "chardev=qmp,mode=control"]);
    push(&["-pidfile", &run.pidfile().display().to_string()]);

    push(&[
        "-chardev",
        &format!(
            "socket,id=console,path={},server=on,wait=off,logfile={},logappend=on",
            run.console_socket().display(),
            run.console_log().display()
        ),
    ]);
    push(&["-serial", "chardev:console"]);
    // A plain VGA card for installers and desktops, seen through VNC on a unix socket
    // that only the agent reads (it serves RFB to browsers behind the API's token).
    push(&["-device", "VGA"]);
    push(&["-vnc", &format!("unix:{}", run.vnc_socket().display())]);

    push(&["-device", "virtio-serial-pci,id=vserial0"]);
    let qga = run.qga_socket();
    push(&[
        "-chardev",
        &format!("socket,id=qga,path={},server=on,wait=off", qga.display()),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,bus=vserial0.0,chardev=qga,name={QGA_PORT_NAME}"),
    ]);

    // A guest kernel panic is reported to QEMU (a `GUEST_PANICKED` event) instead of
    // looking like a silent hang.
    push(&["-device", "pvpanic"]);

    let boots_from_firmware = matches!(spec.boot, Boot::Disk);
    // bootindex by the position of a device's class in the boot order; classes left
    // out of the order are not booted from.
    let boot_index = |class: BootDevice, nth: usize| -> Option<usize> {
        let position = spec.boot_order.iter().position(|wanted| *wanted == class)?;
        (boots_from_firmware).then_some(position * 100 + nth + 1)
    };
    let mut sata_port = 0usize;
    let scsi = spec.disks.iter().any(|disk| disk.bus == DiskBus::Scsi)
        || spec.cdroms.iter().any(|cdrom| cdrom.bus == DiskBus::Scsi);
    if scsi {
        push(&["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    for (index, disk) in spec.disks.iter().enumerate() {
        let direct = matches!(disk.cache, CacheMode::None);
        let file_node = format!("file-{}", disk.id);
        let format_node = format!("disk-{}", disk.id);
        let read_only = if disk.read_only { "on" } else { "off" };
        push(&[
            "-blockdev",
            &format!(
                "driver=file,node-name={file_node},filename={},cache.direct={},locking=on,read-only={read_only}",
                disk.path.display(),
                on_off(direct),
            ),
        ]);
        let driver = match disk.format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        };
        push(&[
            "-blockdev",
            &format!(
                "driver={driver},node-name={format_node},file={file_node},read-only={read_only}"
            ),
        ]);
        // With `cache=none` the guest sees a volatile write cache and sends flushes, which
        // become host fdatasync; with writethrough, QEMU makes every write durable.
        let device = match disk.bus {
            DiskBus::Virtio => "virtio-blk-pci".to_string(),
            DiskBus::Scsi => "scsi-hd,bus=scsi0.0".to_string(),
            DiskBus::Sata => {
                sata_port += 1;
                format!("ide-hd,bus=ide.{}", sata_port - 1)
            }
        };
        let mut device = format!(
            "{device},id=vdisk-{id},drive={format_node},serial={id},write-cache={}",
            on_off(direct),
            id = disk.id,
        );
        if let Some(boot) = boot_index(BootDevice::Disk, index) {
            device.push_str(&format!(",bootindex={boot}"));
        }
        push(&["-device", &device]);
    }

    for (index, cdrom) in spec.cdroms.iter().enumerate() {
        let mut device = match cdrom.bus {
            DiskBus::Scsi => format!("scsi-cd,bus=scsi0.0,id=cd-{}", cdrom.id),
            DiskBus::Sata | DiskBus::Virtio => {
                sata_port += 1;
                format!("ide-cd,bus=ide.{},id=cd-{}", sata_port - 1, cdrom.id)
            }
        };
        if let Some(path) = &cdrom.path {
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name=cdfile-{id},filename={},read-only=on,locking=off",
                    path.display(),
                    id = cdrom.id
                ),
            ]);
            push(&[
                "-blockdev",
                &format!(
                    "driver=raw,node-name=cdrom-{id},file=cdfile-{id},read-only=on",
                    id = cdrom.id
                ),
            ]);
            device.push_str(&format!(",drive=cdrom-{}", cdrom.id));
        }
        if let Some(boot) = boot_index(BootDevice::Cdrom, index) {
            device.push_str(&format!(",bootindex={boot}"));
        }
        push(&["-device", &device]);
    }

    for (index, nic) in spec.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!(
                "tap,id=net{index},ifname={},script=no,downscript=no",
                nic.tap
            ),
        ]);
        let model = match nic.model {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
        };
        let mut device = format!("{model},id=nic{index},netdev=net{index},mac={}", nic.mac);
        if let Some(boot) = boot_index(BootDevice::Network, index) {
            device.push_str(&format!(",bootindex={boot}"));
        }
        push(&["-device", &device]);
    }

    if let Boot::Kernel {
        kernel,
        initrd,
        cmdline,
    } = &spec.boot
    {
        push(&["-kernel", &kernel.display().to_string()]);
        if let Some(initrd) = initrd {
            push(&["-initrd", &initrd.display().to_string()]);
        }
        push(&["-append", cmdline]);
    }

    if mode.incoming {
        push(&["-incoming", "defer"]);
    }
    if mode.paused {
        push(&["-S"]);
    }
    args
}

fn on_off(flag: bool) -> &'static str {
    if flag {
        "on"
    } else {
        "off"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::{Bytes, DiskSpec, MacAddr, NicSpec};

    fn spec() -> VmSpec {
        VmSpec {
            name: "db-1".parse().unwrap(),
            cpus: 2,
            memory: Bytes::mib(256),
            cpu_model: "qemu64".into(),
            disks: vec![DiskSpec {
                id: "data".into(),
                path: "/pool/db-1.qcow2".into(),
                format: DiskFormat::Qcow2,
                cache: CacheMode::None,
                read_only: false,
                size: None,
                ..Default::default()
            }],
            nics: vec![NicSpec {
                tap: "tap-db1".into(),
                mac: "52:54:00:aa:bb:cc".parse::<MacAddr>().unwrap(),
                network: ferry_model::default_network(),
                model: Default::default(),
            }],
            boot: Boot::Kernel {
                kernel: "/img/vmlinuz".into(),
                initrd: Some("/img/initrd".into()),
                cmdline: "console=ttyS0".into(),
            },
            firmware: Default::default(),
            cdroms: Vec::new(),
            boot_order: ferry_model::default_boot_order(),
            guest_agent: true,
            stop_command: None,
        }
    }

    fn argv(spec: &VmSpec, mode: StartMode) -> String {
        build(spec, &RunDir::new("/run/ferry/vms/db-1"), Accel::Tcg, mode).join(" ")
    }

    #[test]
    fn sizes_cpu_and_acceleration_come_from_the_spec() {
        let line = argv(&spec(), StartMode::default());
        assert!(
            line.contains("-accel tcg -cpu qemu64 -smp 2 -m 256M"),
            "{line}"
        );
        assert!(line.contains("-machine q35"));
        assert!(line.contains("-nodefaults"));
    }

    #[test]
    fn disks_are_locked_named_and_flush_to_the_host() {
        let line = argv(&spec(), StartMode::default());
        assert!(line.contains("driver=file,node-name=file-data,filename=/pool/db-1.qcow2,cache.direct=on,locking=on"), "{line}");
        assert!(line.contains("driver=qcow2,node-name=disk-data,file=file-data"));
        assert!(line
            .contains("virtio-blk-pci,id=vdisk-data,drive=disk-data,serial=data,write-cache=on"));
    }

    #[test]
    fn writethrough_disks_hide_the_write_cache() {
        let mut spec = spec();
        spec.disks[0].cache = CacheMode::Writethrough;
        let line = argv(&spec, StartMode::default());
        assert!(line.contains("cache.direct=off"));
        assert!(line.contains("write-cache=off"));
    }

    #[test]
    fn sockets_and_console_live_in_the_run_directory() {
        let line = argv(&spec(), StartMode::default());
        assert!(line.contains("socket,id=qmp,path=/run/ferry/vms/db-1/qmp.sock,server=on,wait=off"));
        assert!(line.contains("-mon chardev=qmp,mode=control"));
        assert!(line.contains("-pidfile /run/ferry/vms/db-1/qemu.pid"));
        assert!(line.contains("name=org.qemu.guest_agent.0"));
        assert!(line.contains("logfile=/run/ferry/vms/db-1/console.log"));
    }

    #[test]
    fn nics_attach_to_their_tap_with_their_mac() {
        let line = argv(&spec(), StartMode::default());
        assert!(line.contains("tap,id=net0,ifname=tap-db1,script=no,downscript=no"));
        assert!(line.contains("virtio-net-pci,id=nic0,netdev=net0,mac=52:54:00:aa:bb:cc"));
    }

    #[test]
    fn a_vm_without_nics_has_no_network_device() {
        let mut spec = spec();
        spec.nics.clear();
        assert!(!argv(&spec, StartMode::default()).contains("-netdev"));
    }

    #[test]
    fn incoming_migration_waits_for_the_monitor() {
        let line = argv(
            &spec(),
            StartMode {
                incoming: true,
                paused: false,
            },
        );
        assert!(line.ends_with("-incoming defer"), "{line}");
        assert!(!argv(&spec(), StartMode::default()).contains("-incoming"));
    }

    #[test]
    fn kernel_boot_passes_kernel_initrd_and_cmdline() {
        let args = build(
            &spec(),
            &RunDir::new("/r"),
            Accel::Tcg,
            StartMode::default(),
        );
        let at = args.iter().position(|arg| arg == "-append").unwrap();
        assert_eq!(
            args[at + 1],
            "console=ttyS0",
            "the cmdline stays one argument"
        );
        assert!(args
            .join(" ")
            .contains("-kernel /img/vmlinuz -initrd /img/initrd"));
    }

    #[test]
    fn uefi_boots_ovmf_from_pflash_with_the_vms_own_nvram() {
        let mut spec = spec();
        spec.firmware = Firmware::Uefi {
            nvram: "/pool/vms/db-1/nvram.fd".into(),
        };
        let line = argv(&spec, StartMode::default());
        assert!(
            line.contains("-machine q35,pflash0=ovmf-code,pflash1=ovmf-vars"),
            "{line}"
        );
        assert!(line.contains(&format!("filename={OVMF_CODE},read-only=on")));
        assert!(line.contains("filename=/pool/vms/db-1/nvram.fd,locking=on"));
        assert!(!argv(&self::spec(), StartMode::default()).contains("pflash"));
    }

    #[test]
    fn disks_go_on_the_bus_the_spec_names() {
        let mut spec = spec();
        let mut second = spec.disks[0].clone();
        second.id = "logs".into();
        second.path = "/pool/db-1-logs.qcow2".into();
        second.bus = DiskBus::Scsi;
        let mut third = second.clone();
        third.id = "old".into();
        third.path = "/pool/db-1-old.qcow2".into();
        third.bus = DiskBus::Sata;
        spec.disks.push(second);
        spec.disks.push(third);
        let line = argv(&spec, StartMode::default());
        assert!(line.contains("-device virtio-blk-pci,id=vdisk-data,drive=disk-data"));
        assert!(line.contains("-device virtio-scsi-pci,id=scsi0"));
        assert!(line.contains("-device scsi-hd,bus=scsi0.0,id=vdisk-logs,drive=disk-logs"));
        assert!(line.contains("-device ide-hd,bus=ide.0,id=vdisk-old,drive=disk-old"));
    }

    #[test]
    fn cdroms_follow_sata_disks_and_can_be_empty() {
        let mut spec = spec();
        spec.boot = Boot::Disk;
        spec.disks[0].bus = DiskBus::Sata;
        spec.cdroms = vec![
            ferry_model::CdromSpec {
                id: "install".into(),
                path: Some("/pool/images/debian.iso".into()),
                bus: DiskBus::Sata,
            },
            ferry_model::CdromSpec {
                id: "spare".into(),
                path: None,
                bus: DiskBus::Sata,
            },
            ferry_model::CdromSpec {
                id: "cidata".into(),
                path: Some("/pool/vms/db-1/seed.iso".into()),
                bus: DiskBus::Scsi,
            },
        ];
        spec.boot_order = vec![BootDevice::Cdrom, BootDevice::Disk];
        let line = argv(&spec, StartMode::default());
        assert!(line.contains("ide-hd,bus=ide.0,id=vdisk-data,drive=disk-data,serial=data,write-cache=on,bootindex=101"), "{line}");
        assert!(line.contains("filename=/pool/images/debian.iso,read-only=on"));
        assert!(line.contains("ide-cd,bus=ide.1,id=cd-install,drive=cdrom-install,bootindex=1"));
        assert!(
            line.contains("ide-cd,bus=ide.2,id=cd-spare,bootindex=2"),
            "{line}"
        );
    }

    #[test]
    fn an_e1000_nic_for_guests_without_virtio() {
        let mut spec = spec();
        spec.nics[0].model = NicModel::E1000;
        let line = argv(&spec, StartMode::default());
        assert!(line.contains("-device e1000,id=nic0,netdev=net0,mac=52:54:00:aa:bb:cc"));
    }

    #[test]
    fn the_consoles_are_unix_sockets_and_the_serial_one_is_logged() {
        let line = argv(&spec(), StartMode::default());
        assert!(line.contains("socket,id=console,path=/run/ferry/vms/db-1/console.sock,server=on,wait=off,logfile=/run/ferry/vms/db-1/console.log"), "{line}");
        assert!(line.contains("-vnc unix:/run/ferry/vms/db-1/vnc.sock"));
    }

    #[test]
    fn disk_boot_marks_the_first_disk_bootable() {
        let mut spec = spec();
        spec.boot = Boot::Disk;
        let line = argv(&spec, StartMode::default());
        assert!(line.contains("bootindex=1"));
        assert!(!line.contains("-kernel"));
    }
}
