//! Boots of a guest from a disk image, timed from QEMU's start to the guest agent's
//! first answer: what `ferry bench boot --image debian` measures under SeaBIOS and
//! OVMF. Each run boots the same VM again (its own overlay on the image, a cloud-init
//! seed, its own NVRAM), so the first boot includes cloud-init's first run and the
//! later ones are ordinary reboots from power-off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_model::{Boot, Bytes, CdromSpec, DiskSpec, Firmware, HostLimits, VmSpec};
use ferry_qemu::{Accel, LaunchOptions, Machine, RunDir};

/// How long one boot may take under TCG before the run is given up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Clone, Debug, serde::Serialize)]
pub struct BootTimes {
    pub first_boot_s: f64,
    pub boots_s: Vec<f64>,
    pub graceful_stop_s: Vec<f64>,
}

pub struct DiskBoot {
    pub image: PathBuf,
    pub uefi: bool,
    pub memory: Bytes,
    pub accel: Accel,
    pub qemu: PathBuf,
    /// Scratch: the overlay, seed, NVRAM and run directory; removed first and after.
    pub dir: PathBuf,
}

impl DiskBoot {
    fn spec(&self) -> Result<VmSpec, String> {
        let firmware = if self.uefi {
            let nvram = self.dir.join("nvram.fd");
            std::fs::copy(ferry_qemu::cmdline::OVMF_VARS_TEMPLATE, &nvram)
                .map_err(|error| format!("cannot copy the OVMF variable store: {error}"))?;
            Firmware::Uefi { nvram }
        } else {
            Firmware::Bios
        };
        let disk = self.dir.join("disk0.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&self.image)
            .arg(&disk)
            .status()
            .map_err(|error| format!("cannot run qemu-img: {error}"))?;
        if !made.success() {
            return Err(format!(
                "qemu-img could not make an overlay on {}",
                self.image.display()
            ));
        }
        let seed = self.dir.join("seed.iso");
        let files = ferry_api::cloud_init::seed_files(
            "bench-boot",
            &format!("bench-boot-{}", ferry_model::cluster::now_ms()),
            &ferry_api::types::CloudInitRequest::default(),
            &[],
        )?;
        ferry_api::cloud_init::write_seed(&seed, &files)?;
        Ok(VmSpec {
            memory: self.memory,
            disks: vec![DiskSpec {
                id: "disk0".into(),
                path: disk,
                ..DiskSpec::default()
            }],
            cdroms: vec![CdromSpec {
                id: "cidata".into(),
                path: Some(seed),
                bus: ferry_model::DiskBus::Scsi,
            }],
            boot: Boot::Disk,
            firmware,
            ..VmSpec::minimal("bench-boot".parse().map_err(|error| format!("{error}"))?)
        })
    }

    async fn boot_once(
        &self,
        spec: &VmSpec,
        options: &LaunchOptions,
    ) -> Result<(Machine, f64), String> {
        let started = Instant::now();
        let machine = Machine::launch(spec, options)
            .await
            .map_err(|error| error.to_string())?;
        while machine
            .guest_agent()
            .ping(Duration::from_secs(1))
            .await
            .is_err()
        {
            if machine.has_exited() {
                return Err(format!(
                    "QEMU exited during the boot: {}",
                    options.run_dir.last_words()
                ));
            }
            if started.elapsed() > BOOT_TIMEOUT {
                let killed = machine.kill().await;
                return Err(format!(
                    "no guest agent within {BOOT_TIMEOUT:?}{}",
                    killed
                        .err()
                        .map(|error| format!(" (and the kill failed: {error})"))
                        .unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok((machine, started.elapsed().as_secs_f64()))
    }

    /// Boots `runs + 1` times and stops the guest cleanly after each boot.
    pub async fn run(
        &self,
        runs: u32,
        mut progress: impl FnMut(u32, f64),
    ) -> Result<BootTimes, String> {
        remove(&self.dir);
        std::fs::create_dir_all(&self.dir)
            .map_err(|error| format!("cannot create {}: {error}", self.dir.display()))?;
        let result = async {
            let spec = self.spec()?;
            let options = LaunchOptions {
                qemu: self.qemu.clone(),
                accel: self.accel,
                run_dir: RunDir::new(self.dir.join("run")),
                netns: None,
                host: HostLimits {
                    cpus: 2,
                    memory: Bytes(64 * Bytes::GIB),
                },
                incoming: None,
                paused: false,
            };
            let mut times = BootTimes {
                first_boot_s: 0.0,
                boots_s: Vec::new(),
                graceful_stop_s: Vec::new(),
            };
            for run in 0..=runs {
                let (machine, took) = self.boot_once(&spec, &options).await?;
                progress(run, took);
                if run == 0 {
                    times.first_boot_s = took;
                } else {
                    times.boots_s.push(took);
                }
                let stopping = Instant::now();
                machine
                    .stop(Duration::from_secs(120))
                    .await
                    .map_err(|error| error.to_string())?;
                times.graceful_stop_s.push(stopping.elapsed().as_secs_f64());
            }
            Ok(times)
        }
        .await;
        remove(&self.dir);
        result
    }
}

fn remove(dir: &Path) {
    if let Err(error) = std::fs::remove_dir_all(dir) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {error}", dir.display());
        }
    }
}
