//! The test appliance: a Linux kernel and an initramfs built from Debian packages, with
//! the real qemu-guest-agent and ferry-guest inside. It is what every lab VM boots.
//!
//! Build steps, each cached under `cache_dir` so a warm build only repacks:
//! 1. `apt-get download` the packages (the cloud kernel through its metapackage);
//! 2. `dpkg-deb -x` them;
//! 3. gather busybox, qemu-ga, mke2fs, ferry-guest and the shared libraries `ldd` says
//!    they need, the virtio/ACPI/pvpanic kernel modules with their dependencies in load
//!    order, and the init scripts in `appliance/`;
//! 4. write the initramfs (`newc` cpio, gzip) and a manifest into `out_dir`, atomically.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use ferry_qemu::ProbeImage;
use serde::{Deserialize, Serialize};

use crate::cpio::{CpioWriter, Entry};

/// The Debian packages the appliance is made of.
const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";
const PACKAGES: [&str; 3] = ["busybox-static", "qemu-guest-agent", "e2fsprogs"];
/// Kernel modules the appliance loads (their dependencies come along).
const MODULES: [&str; 7] = [
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "button",
    "evdev",
    "pvpanic_mmio",
];
/// Printed on the serial console when the appliance is ready to serve.
pub const READY_MARKER: &str = "FERRY-APPLIANCE-READY";
/// The command that restarts ferry-guest inside the appliance.
pub const RESTART_COMMAND: &str = "/sbin/ferry-guest-ctl restart";
/// The command that stalls the guest OS for a while (the lab's guest-stall fault):
/// `/sbin/ferry-stall SECONDS`, started detached so the guest agent answers first.
pub const STALL_COMMAND: &str = "/sbin/ferry-stall";
/// Port ferry-guest serves on.
pub const GUEST_PORT: u16 = 8080;

const INIT: &str = include_str!("../appliance/init");
const INITTAB: &str = include_str!("../appliance/inittab");
const RC_BOOT: &str = include_str!("../appliance/rc.boot");
const RC_READY: &str = include_str!("../appliance/rc.ready");
const RC_SHUTDOWN: &str = include_str!("../appliance/rc.shutdown");
const QEMU_GA_RUN: &str = include_str!("../appliance/qemu-ga.run");
const FERRY_GUEST_CTL: &str = include_str!("../appliance/ferry-guest-ctl");
const FERRY_STALL: &str = include_str!("../appliance/ferry-stall");
const POWER_BUTTON: &str = include_str!("../appliance/power-button");

#[derive(Debug, thiserror::Error)]
pub enum ApplianceError {
    /// A command the build runs failed.
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    /// A file the build needs is missing.
    #[error("{what} {} is missing{hint}", path.display())]
    Missing {
        what: String,
        path: PathBuf,
        hint: String,
    },
    /// Reading or writing a file failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// The appliance directory holds no usable build.
    #[error("no appliance in {}: {reason} (run `ferry image build-appliance`)", dir.display())]
    NotBuilt { dir: PathBuf, reason: String },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ApplianceError {
    let context = context.into();
    move |source| ApplianceError::Io { context, source }
}

#[derive(Clone, Debug)]
pub struct BuildRequest {
    pub cache_dir: PathBuf,
    pub out_dir: PathBuf,
    pub guest_binary: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub kernel_release: String,
    pub packages: BTreeMap<String, String>,
    pub modules: Vec<String>,
    pub kernel_bytes: u64,
    pub initrd_bytes: u64,
    pub build_ms: u64,
}

/// A built appliance on disk.
#[derive(Clone, Debug)]
pub struct Appliance {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Network settings handed to the guest on the kernel command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestNetwork {
    /// `10.77.0.2/24`
    pub address: String,
    pub gateway: Option<String>,
}

impl Appliance {
    pub fn kernel(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }

    pub fn initrd(&self) -> PathBuf {
        self.dir.join("initramfs.img")
    }

    pub fn load(dir: &Path) -> Result<Appliance, ApplianceError> {
        let manifest_path = dir.join("manifest.json");
        let not_built = |reason: String| ApplianceError::NotBuilt {
            dir: dir.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(&manifest_path)
            .map_err(|error| not_built(format!("{}: {error}", manifest_path.display())))?;
        let manifest = serde_json::from_slice(&bytes)
            .map_err(|error| not_built(format!("bad manifest: {error}")))?;
        let appliance = Appliance {
            dir: dir.to_path_buf(),
            manifest,
        };
        for file in [appliance.kernel(), appliance.initrd()] {
            if !file.is_file() {
                return Err(not_built(format!("{} is missing", file.display())));
            }
        }
        Ok(appliance)
    }

    /// A one-vCPU VM booting this appliance with `disk` as its data disk and one NIC on
    /// `tap`, as the lab runs it outside Ferry (a sandbox, the bare-QEMU baseline).
    pub fn vm_spec(
        &self,
        name: &str,
        memory: ferry_model::Bytes,
        disk: PathBuf,
        tap: String,
        network: &GuestNetwork,
    ) -> Result<ferry_model::VmSpec, ferry_model::NameError> {
        use ferry_model::{Boot, CacheMode, DiskFormat, DiskSpec, MacAddr, NicSpec, VmSpec};
        Ok(VmSpec {
            name: name.parse()?,
            cpus: 1,
            memory,
            cpu_model: ferry_model::vm_default_cpu_model(),
            disks: vec![DiskSpec {
                id: "data".into(),
                path: disk,
                format: DiskFormat::Qcow2,
                cache: CacheMode::None,
                read_only: false,
                size: None,
                ..Default::default()
            }],
            nics: vec![NicSpec {
                tap,
                mac: MacAddr::derived_from(&format!("{name}/0")),
                network: ferry_model::default_network(),
                model: Default::default(),
            }],
            boot: Boot::Kernel {
                kernel: self.kernel(),
                initrd: Some(self.initrd()),
                cmdline: self.cmdline(name, Some(network)),
            },
            firmware: Default::default(),
            cdroms: Vec::new(),
            boot_order: ferry_model::default_boot_order(),
            guest_agent: true,
            stop_command: None,
        })
    }

    /// The kernel command line for a VM booting this appliance.
    pub fn cmdline(&self, hostname: &str, network: Option<&GuestNetwork>) -> String {
        let mut line = format!("console=ttyS0 quiet panic=1 ferry.hostname={hostname}");
        if let Some(network) = network {
            line.push_str(&format!(" ferry.ip={}", network.address));
            if let Some(gateway) = &network.gateway {
                line.push_str(&format!(" ferry.gw={gateway}"));
            }
        }
        line
    }

    /// A bootable ISO of this appliance (GRUB for BIOS and UEFI, from Debian's
    /// `grub-pc-bin` and `grub-efi-amd64-bin`, made by `grub-mkrescue`): the installer
    /// stand-in of the tests, and, since it is a hybrid image, also a bootable disk.
    /// The guest calls itself `hostname`.
    pub fn boot_iso(&self, out: &Path, hostname: &str) -> Result<(), ApplianceError> {
        let staging = tempfile::tempdir().map_err(|source| ApplianceError::Io {
            context: "cannot make a staging directory".into(),
            source,
        })?;
        let boot = staging.path().join("boot");
        let grub = boot.join("grub");
        std::fs::create_dir_all(&grub).map_err(|source| ApplianceError::Io {
            context: format!("cannot create {}", grub.display()),
            source,
        })?;
        for (from, to) in [
            (self.kernel(), boot.join("vmlinuz")),
            (self.initrd(), boot.join("initramfs.img")),
        ] {
            std::fs::copy(&from, &to).map_err(|source| ApplianceError::Io {
                context: format!("cannot copy {}", from.display()),
                source,
            })?;
        }
        let config = format!(
            "set timeout=0\nset default=0\nmenuentry \"Ferry appliance\" {{\n  linux /boot/vmlinuz {}\n  initrd /boot/initramfs.img\n}}\n",
            self.cmdline(hostname, None)
        );
        std::fs::write(grub.join("grub.cfg"), config).map_err(|source| ApplianceError::Io {
            context: "cannot write grub.cfg".into(),
            source,
        })?;
        let output = Command::new("grub-mkrescue")
            .arg("-o")
            .arg(out)
            .arg(staging.path())
            .output()
            .map_err(|error| ApplianceError::Command {
                command: "grub-mkrescue".into(),
                detail: format!("{error} (packages grub-common, grub-pc-bin, grub-efi-amd64-bin, xorriso, mtools)"),
            })?;
        if !output.status.success() {
            return Err(ApplianceError::Command {
                command: format!("grub-mkrescue -o {}", out.display()),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// The image the KVM probe boots: this kernel, told to print a marker and power off.
    pub fn probe_image(&self) -> ProbeImage {
        ProbeImage {
            kernel: self.kernel(),
            initrd: self.initrd(),
            cmdline: "console=ttyS0 quiet panic=-1 ferry.probe".into(),
            marker: "FERRY-PROBE-OK".into(),
        }
    }
}

/// Builds the appliance; see the module documentation for the steps.
pub fn build(request: &BuildRequest) -> Result<Appliance, ApplianceError> {
    let started = Instant::now();
    if !request.guest_binary.is_file() {
        return Err(ApplianceError::Missing {
            what: "ferry-guest binary".into(),
            path: request.guest_binary.clone(),
            hint: " (build it with `cargo build -p ferry-guest`, or pass --guest-binary)".into(),
        });
    }
    let debs = DebCache::new(&request.cache_dir)?;
    let kernel_deb = debs.kernel_package()?;
    let mut packages = BTreeMap::new();
    let kernel_root = debs.extract(&kernel_deb)?;
    packages.insert(kernel_deb.package.clone(), kernel_deb.file_name());
    let mut roots = BTreeMap::new();
    for package in PACKAGES {
        let deb = debs.fetch(package)?;
        roots.insert(package, debs.extract(&deb)?);
        packages.insert(deb.package.clone(), deb.file_name());
    }

    let (kernel_release, vmlinuz) = find_kernel(&kernel_root)?;
    let module_dir = kernel_root.join("lib/modules").join(&kernel_release);
    let modules = resolve_modules(&module_dir, &MODULES)?;

    let mut files = RootFs::default();
    files.file(
        "bin/busybox",
        roots["busybox-static"].join("bin/busybox"),
        true,
    )?;
    files.file(
        "usr/sbin/qemu-ga",
        roots["qemu-guest-agent"].join("usr/sbin/qemu-ga"),
        true,
    )?;
    // Not on PATH: busybox prefers its own (ext2-only) mke2fs applet for bare names.
    files.file(
        "usr/lib/ferry/mke2fs",
        roots["e2fsprogs"].join("sbin/mke2fs"),
        true,
    )?;
    files.file(
        "etc/mke2fs.conf",
        roots["e2fsprogs"].join("etc/mke2fs.conf"),
        false,
    )?;
    files.guest_binary(&request.guest_binary)?;
    for program in [
        roots["qemu-guest-agent"].join("usr/sbin/qemu-ga"),
        roots["e2fsprogs"].join("sbin/mke2fs"),
        request.guest_binary.clone(),
    ] {
        for library in shared_libraries(&program)? {
            let inside = library
                .strip_prefix("/")
                .unwrap_or(&library)
                .to_string_lossy()
                .into_owned();
            files.file(&inside, library.clone(), true)?;
        }
    }
    for (name, path) in &modules {
        files.file(&format!("lib/modules/{name}.ko"), path.clone(), false)?;
    }
    let module_order: String = modules
        .iter()
        .map(|(name, _)| format!("{name}\n"))
        .collect();
    files.text("etc/modules.order", &module_order, false);
    files.text("init", INIT, true);
    files.text("etc/inittab", INITTAB, false);
    files.text("etc/rc.boot", RC_BOOT, true);
    files.text("etc/rc.ready", RC_READY, true);
    files.text("etc/rc.shutdown", RC_SHUTDOWN, true);
    files.text("etc/qemu-ga.run", QEMU_GA_RUN, true);
    files.text("sbin/ferry-guest-ctl", FERRY_GUEST_CTL, true);
    files.text("sbin/ferry-stall", FERRY_STALL, true);
    files.text("etc/acpi/PWRF/00000080", POWER_BUTTON, true);
    files.text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", false);
    files.text("etc/group", "root:x:0:\n", false);

    let staging = request.out_dir.with_extension("partial");
    // A leftover is harmless: it is replaced or cleaned on the next run.
    if let Err(error) = std::fs::remove_dir_all(&staging) {
        tracing::debug!("a leftover is harmless: {error}");
    }
    std::fs::create_dir_all(&staging)
        .map_err(io_error(format!("cannot create {}", staging.display())))?;
    let initrd_bytes = files.write_initramfs(&staging.join("initramfs.img"))?;
    let kernel_bytes = std::fs::copy(&vmlinuz, staging.join("vmlinuz"))
        .map_err(io_error("cannot copy the kernel"))?;
    let manifest = Manifest {
        kernel_release,
        packages,
        modules: modules.into_iter().map(|(name, _)| name).collect(),
        kernel_bytes,
        initrd_bytes,
        build_ms: started.elapsed().as_millis() as u64,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|error| ApplianceError::Io {
        context: "cannot encode the manifest".into(),
        source: std::io::Error::other(error),
    })?;
    std::fs::write(staging.join("manifest.json"), json)
        .map_err(io_error("cannot write the manifest"))?;
    // A leftover is harmless: it is replaced or cleaned on the next run.
    if let Err(error) = std::fs::remove_dir_all(&request.out_dir) {
        tracing::debug!("a leftover is harmless: {error}");
    }
    std::fs::rename(&staging, &request.out_dir).map_err(io_error(format!(
        "cannot move the build to {}",
        request.out_dir.display()
    )))?;
    Appliance::load(&request.out_dir)
}

/// A downloaded package.
#[derive(Clone, Debug)]
struct Deb {
    package: String,
    path: PathBuf,
}

impl Deb {
    fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

struct DebCache {
    dir: PathBuf,
}

impl DebCache {
    fn new(cache_dir: &Path) -> Result<Self, ApplianceError> {
        let dir = cache_dir.join("debs");
        std::fs::create_dir_all(&dir)
            .map_err(io_error(format!("cannot create {}", dir.display())))?;
        Ok(DebCache { dir })
    }

    /// The cached `.deb` of a package, downloading it when absent.
    fn fetch(&self, package: &str) -> Result<Deb, ApplianceError> {
        if let Some(path) = self.cached(package) {
            return Ok(Deb {
                package: package.into(),
                path,
            });
        }
        let download = || {
            run(Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&self.dir))
        };
        if download().is_err() {
            // A fresh machine may have no package lists yet.
            run(Command::new("apt-get").args(["update", "-q"]))?;
            download()?;
        }
        self.cached(package)
            .map(|path| Deb {
                package: package.into(),
                path,
            })
            .ok_or_else(|| ApplianceError::Missing {
                what: format!("downloaded package {package}"),
                path: self.dir.clone(),
                hint: String::new(),
            })
    }

    fn cached(&self, package: &str) -> Option<PathBuf> {
        let prefix = format!("{package}_");
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .ok()?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                let name = path
                    .file_name()
                    .map(|name| name.to_string_lossy().into_owned())
                    .unwrap_or_default();
                name.starts_with(&prefix) && name.ends_with(".deb")
            })
            .collect();
        found.sort();
        found.pop()
    }

    /// The real kernel package behind the cloud-kernel metapackage.
    fn kernel_package(&self) -> Result<Deb, ApplianceError> {
        let meta = self.fetch(KERNEL_METAPACKAGE)?;
        let depends = run(Command::new("dpkg-deb")
            .arg("-f")
            .arg(&meta.path)
            .arg("Depends"))?;
        let package = depends
            .split([',', ' ', '('])
            .find(|word| word.starts_with("linux-image-"))
            .ok_or_else(|| ApplianceError::Command {
                command: format!("dpkg-deb -f {}", meta.path.display()),
                detail: format!("no linux-image dependency in {depends:?}"),
            })?
            .to_string();
        self.fetch(&package)
    }

    /// Unpacks a package once; later builds reuse the tree.
    fn extract(&self, deb: &Deb) -> Result<PathBuf, ApplianceError> {
        let root = self.dir.join("extracted").join(deb.file_name());
        if root.join(".complete").exists() {
            return Ok(root);
        }
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_dir_all(&root) {
            tracing::debug!("a leftover is harmless: {error}");
        }
        std::fs::create_dir_all(&root)
            .map_err(io_error(format!("cannot create {}", root.display())))?;
        run(Command::new("dpkg-deb").arg("-x").arg(&deb.path).arg(&root))?;
        std::fs::write(root.join(".complete"), b"")
            .map_err(io_error("cannot mark the extraction complete"))?;
        Ok(root)
    }
}

fn run(command: &mut Command) -> Result<String, ApplianceError> {
    let shown = format!("{command:?}").replace('"', "");
    let output = command.output().map_err(|error| ApplianceError::Command {
        command: shown.clone(),
        detail: error.to_string(),
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail = stderr
            .lines()
            .rev()
            .find(|line| !line.trim().is_empty())
            .unwrap_or("no message")
            .to_string();
        return Err(ApplianceError::Command {
            command: shown,
            detail,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn find_kernel(root: &Path) -> Result<(String, PathBuf), ApplianceError> {
    let boot = root.join("boot");
    let entries =
        std::fs::read_dir(&boot).map_err(io_error(format!("cannot read {}", boot.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok((release.to_string(), entry.path()));
        }
    }
    Err(ApplianceError::Missing {
        what: "kernel image".into(),
        path: boot,
        hint: String::new(),
    })
}

/// The modules to load, dependencies first. Reads each module's `depends=` from its
/// `.modinfo` section (what `modinfo -F depends` prints), since the package ships no
/// `modules.dep`. Modules built into the kernel are skipped.
fn resolve_modules(
    module_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, PathBuf)>, ApplianceError> {
    let builtin: BTreeSet<String> = std::fs::read_to_string(module_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .map(|file| module_name(file.trim_end_matches(".ko")))
        .collect();
    let mut index = BTreeMap::new();
    index_modules(&module_dir.join("kernel"), &mut index)?;

    let mut ordered: Vec<(String, PathBuf)> = Vec::new();
    let mut visiting = BTreeSet::new();
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
        ordered: &mut Vec<(String, PathBuf)>,
    ) -> Result<(), ApplianceError> {
        if builtin.contains(name)
            || ordered.iter().any(|(done, _)| done == name)
            || !visiting.insert(name.to_string())
        {
            return Ok(());
        }
        let path = index.get(name).ok_or_else(|| ApplianceError::Missing {
            what: format!("kernel module {name}"),
            path: PathBuf::from(name),
            hint: " (not in the kernel package)".into(),
        })?;
        let content =
            std::fs::read(path).map_err(io_error(format!("cannot read {}", path.display())))?;
        for dependency in modinfo_depends(&content) {
            visit(&dependency, index, builtin, visiting, ordered)?;
        }
        ordered.push((name.to_string(), path.clone()));
        Ok(())
    }
    for name in wanted {
        visit(
            &module_name(name),
            &index,
            &builtin,
            &mut visiting,
            &mut ordered,
        )?;
    }
    Ok(ordered)
}

fn module_name(file_stem: &str) -> String {
    file_stem.replace('-', "_")
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<(), ApplianceError> {
    let entries =
        std::fs::read_dir(dir).map_err(io_error(format!("cannot read {}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(stem) = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_suffix(".ko"))
        {
            index.insert(module_name(stem), path.clone());
        }
    }
    Ok(())
}

/// The `depends=a,b` entry of a module's `.modinfo` section.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(start) = module.windows(key.len()).position(|window| window == key) else {
        return Vec::new();
    };
    let value = &module[start + key.len()..];
    let end = value
        .iter()
        .position(|byte| *byte == 0)
        .unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|name| !name.is_empty())
        .map(module_name)
        .collect()
}

/// The shared libraries a program loads, as `ldd` resolves them on this machine
/// (including the dynamic loader itself).
fn shared_libraries(program: &Path) -> Result<Vec<PathBuf>, ApplianceError> {
    let output = run(Command::new("ldd").arg(program))?;
    let mut libraries = Vec::new();
    for line in output.lines() {
        if line.contains("not found") {
            return Err(ApplianceError::Missing {
                what: format!("shared library for {}", program.display()),
                path: PathBuf::from(line.trim()),
                hint: " (install the package that provides it)".into(),
            });
        }
        let path = match line.split_once("=>") {
            Some((_, resolved)) => resolved.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|word| word.starts_with('/')),
        };
        if let Some(path) = path.filter(|path| path.starts_with('/')) {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// The initramfs's content, gathered before it is written.
#[derive(Default)]
struct RootFs {
    entries: BTreeMap<String, (Vec<u8>, bool)>,
}

impl RootFs {
    fn file(
        &mut self,
        inside: &str,
        source: PathBuf,
        executable: bool,
    ) -> Result<(), ApplianceError> {
        let content = std::fs::read(&source).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => ApplianceError::Missing {
                what: format!("file for /{inside}"),
                path: source.clone(),
                hint: String::new(),
            },
            _ => ApplianceError::Io {
                context: format!("cannot read {}", source.display()),
                source: error,
            },
        })?;
        self.entries
            .insert(inside.to_string(), (content, executable));
        Ok(())
    }

    fn text(&mut self, inside: &str, content: &str, executable: bool) {
        self.entries.insert(
            inside.to_string(),
            (content.as_bytes().to_vec(), executable),
        );
    }

    /// ferry-guest without its debug sections: the appliance boots faster when smaller.
    fn guest_binary(&mut self, binary: &Path) -> Result<(), ApplianceError> {
        let stripped =
            std::env::temp_dir().join(format!("ferry-guest-stripped-{}", std::process::id()));
        let result = run(Command::new("objcopy")
            .arg("--strip-debug")
            .arg(binary)
            .arg(&stripped))
        .and_then(|_| self.file("usr/bin/ferry-guest", stripped.clone(), true));
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_file(&stripped) {
            tracing::debug!("a leftover is harmless: {error}");
        }
        result
    }

    fn write_initramfs(&self, path: &Path) -> Result<u64, ApplianceError> {
        let file = std::fs::File::create(path)
            .map_err(io_error(format!("cannot create {}", path.display())))?;
        let encoder = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(file),
            flate2::Compression::fast(),
        );
        let mut archive = CpioWriter::new(encoder);
        let write_error = io_error(format!("cannot write {}", path.display()));
        let result = (|| -> std::io::Result<()> {
            let mut directories = BTreeSet::new();
            for inside in self.entries.keys() {
                let mut parent = Path::new(inside).parent();
                while let Some(dir) = parent.filter(|dir| !dir.as_os_str().is_empty()) {
                    directories.insert(dir.to_string_lossy().into_owned());
                    parent = dir.parent();
                }
            }
            directories.insert("dev".into());
            for dir in &directories {
                archive.add(dir, Entry::Directory)?;
            }
            // The kernel opens /dev/console for init before anything is mounted.
            archive.add("dev/console", Entry::CharDevice { major: 5, minor: 1 })?;
            archive.add(
                "sbin/init",
                Entry::Symlink {
                    target: "/bin/busybox",
                },
            )?;
            archive.add(
                "bin/sh",
                Entry::Symlink {
                    target: "/bin/busybox",
                },
            )?;
            for (inside, (content, executable)) in &self.entries {
                archive.add(
                    inside,
                    Entry::File {
                        content,
                        executable: *executable,
                    },
                )?;
            }
            let mut encoder = archive.finish()?;
            encoder.flush()?;
            encoder.finish()?.flush()
        })();
        result.map_err(write_error)?;
        Ok(std::fs::metadata(path).map(|meta| meta.len()).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_dependencies_are_read_from_the_section() {
        let module = b"\x7fELF...\0license=GPL\0depends=virtio,virtio_ring\0intree=Y\0";
        assert_eq!(modinfo_depends(module), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"no modinfo here").is_empty());
    }

    #[test]
    fn module_file_names_map_to_module_names() {
        assert_eq!(module_name("pvpanic-mmio"), "pvpanic_mmio");
    }

    #[test]
    fn the_cmdline_carries_the_network() {
        let appliance = Appliance {
            dir: "/a".into(),
            manifest: Manifest {
                kernel_release: "6.1".into(),
                packages: BTreeMap::new(),
                modules: vec![],
                kernel_bytes: 0,
                initrd_bytes: 0,
                build_ms: 0,
            },
        };
        let network = GuestNetwork {
            address: "10.77.0.2/24".into(),
            gateway: Some("10.77.0.1".into()),
        };
        let line = appliance.cmdline("vm1", Some(&network));
        assert!(line.starts_with("console=ttyS0"));
        assert!(
            line.ends_with("ferry.hostname=vm1 ferry.ip=10.77.0.2/24 ferry.gw=10.77.0.1"),
            "{line}"
        );
    }
}
