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
//! - the serial console to a log file.

use ferry_model::{Boot, CacheMode, DiskFormat, VmSpec};

use crate::{Accel, RunDir};

/// Name of the guest agent's virtio-serial port, as qemu-ga expects it.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// Options that are not part of the VM's desired shape but of one start of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StartMode {
    /// Wait for an incoming migration (`-incoming defer`) instead of running the guest.
    pub incoming: bool,
    /// Start with the vCPUs stopped (`-S`).
    pub paused: bool,
}

/// QEMU's `-m` for a VM of `mib` MiB.
///
/// Under TCG the guest gets 8 KiB more than asked. QEMU before 9.0 (Debian 12 ships
/// 7.2) has a fast path for syncing the dirty bitmap of RAM blocks whose size is a
/// multiple of 256 KiB that clears the dirty bits without resetting TCG's TLB: guest
/// stores through TLB entries cached before the sync are then never logged, and a live
/// migration loses them (we measured 20-100 stale pages, a kernel oops on the
/// destination). Upstream fixed it in "physmem: Fix migration dirty bitmap coherency
/// with TCG memory access". A block of another size takes the slow path, which resets
/// the TLB for every page it clears. KVM logs dirty pages itself and is not affected.
fn ram_size(mib: u64, accel: Accel) -> String {
    match accel {
        Accel::Tcg => format!("{}K", mib * 1024 + 8),
        Accel::Kvm => format!("{mib}M"),
    }
}

pub fn build(spec: &VmSpec, run: &RunDir, accel: Accel, mode: StartMode) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(|part| part.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-machine", "q35"]);
    push(&["-accel", accel.qemu_name()]);
    push(&["-cpu", &spec.cpu_model]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-m", &ram_size(spec.memory.as_mib(), accel)]);
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
        &format!("file,id=console,path={}", run.console_log().display()),
    ]);
    push(&["-serial", "chardev:console"]);

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
        let mut device = format!(
            "virtio-blk-pci,id=vdisk-{id},drive={format_node},serial={id},write-cache={}",
            on_off(direct),
            id = disk.id,
        );
        if matches!(spec.boot, Boot::Disk) && index == 0 {
            device.push_str(",bootindex=1");
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
        push(&[
            "-device",
            &format!(
                "virtio-net-pci,id=nic{index},netdev=net{index},mac={}",
                nic.mac
            ),
        ]);
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
            }],
            nics: vec![NicSpec {
                tap: "tap-db1".into(),
                mac: "52:54:00:aa:bb:cc".parse::<MacAddr>().unwrap(),
            }],
            boot: Boot::Kernel {
                kernel: "/img/vmlinuz".into(),
                initrd: Some("/img/initrd".into()),
                cmdline: "console=ttyS0".into(),
            },
        }
    }

    fn argv(spec: &VmSpec, mode: StartMode) -> String {
        build(spec, &RunDir::new("/run/ferry/vms/db-1"), Accel::Tcg, mode).join(" ")
    }

    #[test]
    fn sizes_cpu_and_acceleration_come_from_the_spec() {
        let line = argv(&spec(), StartMode::default());
        assert!(
            line.contains("-accel tcg -cpu qemu64 -smp 2 -m 262152K"),
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
        assert!(line.contains("file,id=console,path=/run/ferry/vms/db-1/console.log"));
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
    fn disk_boot_marks_the_first_disk_bootable() {
        let mut spec = spec();
        spec.boot = Boot::Disk;
        let line = argv(&spec, StartMode::default());
        assert!(line.contains("bootindex=1"));
        assert!(!line.contains("-kernel"));
    }
}
