//! KVM or TCG. An existing `/dev/kvm` proves little: in nested setups a guest can hang
//! under KVM while a real-mode boot sector still runs. So the probe boots a real Linux
//! kernel with a tiny initramfs under KVM and waits for a marker line from its userspace
//! on the serial console. Only if it arrives in time is KVM used. The verdict is cached
//! (in a file under `/run`, so it is redone after a host reboot) and the probe runs under
//! a file lock, so parallel starts probe once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::QemuError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the probe boots: a kernel and initramfs whose userspace prints `marker` on the
/// serial console when started with `cmdline`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub marker: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelReport {
    pub accel: Accel,
    /// Why: "KVM booted the probe kernel in 0.9 s", "/dev/kvm: permission denied", …
    pub reason: String,
    /// Whether this came from the cache.
    #[serde(default)]
    pub cached: bool,
    /// What the verdict is valid for; a change re-probes.
    pub qemu: PathBuf,
    pub probe_kernel: PathBuf,
}

/// How long KVM may take to reach userspace. A working KVM needs about a second; TCG
/// takes three, so a KVM slower than this is no gain anyway.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// Environment override: `FERRY_ACCEL=tcg` or `kvm` skips the probe.
pub const ACCEL_OVERRIDE_ENV: &str = "FERRY_ACCEL";

/// Returns the cached verdict, or probes (once, under a lock) and caches it.
pub async fn detect(
    qemu: &Path,
    image: &ProbeImage,
    cache_file: &Path,
) -> Result<AccelReport, QemuError> {
    if let Ok(forced) = std::env::var(ACCEL_OVERRIDE_ENV) {
        let accel = match forced.as_str() {
            "kvm" => Accel::Kvm,
            "tcg" => Accel::Tcg,
            other => {
                return Err(QemuError::Other(format!(
                    "{ACCEL_OVERRIDE_ENV}={other:?}: expected kvm or tcg"
                )))
            }
        };
        return Ok(AccelReport {
            accel,
            reason: format!("forced by {ACCEL_OVERRIDE_ENV}"),
            cached: false,
            qemu: qemu.into(),
            probe_kernel: image.kernel.clone(),
        });
    }
    if let Some(dir) = cache_file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(QemuError::io(format!("cannot create {}", dir.display())))?;
    }
    let lock_path = cache_file.with_extension("lock");
    let lock_file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(QemuError::io(format!(
            "cannot open {}",
            lock_path.display()
        )))?;
    let _lock = tokio::task::spawn_blocking(move || {
        nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive).map_err(
            |(_, errno)| QemuError::Other(format!("cannot lock {}: {errno}", lock_path.display())),
        )
    })
    .await
    .map_err(|error| QemuError::Other(error.to_string()))??;

    if let Some(report) = read_cache(cache_file, qemu, image) {
        return Ok(report);
    }
    let report = probe(qemu, image).await?;
    let json =
        serde_json::to_vec_pretty(&report).map_err(|error| QemuError::Other(error.to_string()))?;
    let staging = cache_file.with_extension("tmp");
    std::fs::File::create(&staging)
        .and_then(|mut file| file.write_all(&json))
        .and_then(|_| std::fs::rename(&staging, cache_file))
        .map_err(QemuError::io(format!(
            "cannot write {}",
            cache_file.display()
        )))?;
    Ok(report)
}

fn read_cache(cache_file: &Path, qemu: &Path, image: &ProbeImage) -> Option<AccelReport> {
    let cached: AccelReport = serde_json::from_slice(&std::fs::read(cache_file).ok()?).ok()?;
    let qemu_changed = modified(qemu)? > modified(cache_file)?;
    if cached.qemu != qemu || cached.probe_kernel != image.kernel || qemu_changed {
        return None;
    }
    Some(AccelReport {
        cached: true,
        ..cached
    })
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path)
        .and_then(|meta| meta.modified())
        .ok()
}

/// Boots the probe image under KVM and watches the console for the marker.
pub async fn probe(qemu: &Path, image: &ProbeImage) -> Result<AccelReport, QemuError> {
    let verdict = |accel, reason: String| AccelReport {
        accel,
        reason,
        cached: false,
        qemu: qemu.into(),
        probe_kernel: image.kernel.clone(),
    };
    for (what, path) in [
        ("probe kernel", &image.kernel),
        ("probe initrd", &image.initrd),
    ] {
        if !path.exists() {
            return Err(QemuError::MissingFile {
                vm: "accel-probe".into(),
                what,
                path: path.clone(),
            });
        }
    }
    if let Err(error) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Ok(verdict(
            Accel::Tcg,
            format!("/dev/kvm cannot be opened: {error}"),
        ));
    }

    let scratch = tempfile_dir()?;
    let console = scratch.join("console.log");
    let started = Instant::now();
    let mut command = tokio::process::Command::new(qemu);
    die_with_parent(&mut command);
    let mut child = command
        .args([
            "-accel", "kvm", "-machine", "q35", "-cpu", "host", "-m", "128M",
        ])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(&image.cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(QemuError::io(format!("cannot run {}", qemu.display())))?;

    let outcome = loop {
        if let Ok(text) = std::fs::read_to_string(&console) {
            if text.contains(&image.marker) {
                break verdict(
                    Accel::Kvm,
                    format!(
                        "KVM booted the probe kernel to userspace in {:.1} s",
                        started.elapsed().as_secs_f64()
                    ),
                );
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                // Its words only explain the verdict; without them it stands.
                if let Err(error) = pipe.read_to_string(&mut stderr).await {
                    stderr = format!("(stderr unreadable: {error})");
                }
            }
            break verdict(
                Accel::Tcg,
                format!(
                    "QEMU under KVM exited ({status}) before the probe finished: {}",
                    last_line(&stderr)
                ),
            );
        }
        if started.elapsed() > PROBE_TIMEOUT {
            break verdict(Accel::Tcg, format!("a guest under KVM did not reach userspace within {PROBE_TIMEOUT:?} (KVM hangs here)"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // It may have exited already.
    if let Err(error) = child.kill().await {
        tracing::debug!("it may have exited already: {error}");
    }
    // A leftover is harmless: it is replaced or cleaned on the next run.
    if let Err(error) = std::fs::remove_dir_all(&scratch) {
        tracing::debug!("a leftover is harmless: {error}");
    }
    Ok(outcome)
}

/// A throwaway QEMU (probe, CPU query) must not outlive a supervisor killed mid-way:
/// the kernel kills it when its parent dies.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no message")
        .trim()
}

fn tempfile_dir() -> Result<PathBuf, QemuError> {
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("ferry-accel-probe-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)
        .map_err(QemuError::io(format!("cannot create {}", dir.display())))?;
    Ok(dir)
}

/// The CPU this host can give guests, as QEMU reports it: the model name and its
/// enabled features (`query-cpu-model-expansion` of `host` under KVM, `max` under TCG).
/// Runs a throwaway QEMU with no machine for a fraction of a second.
/// What this host's CPU offers guests under `accel`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// `host` (KVM) or `max` (TCG).
    pub model: String,
    pub features: Vec<String>,
    /// Every named model QEMU knows, with the features missing here (empty: runnable).
    pub models: std::collections::BTreeMap<String, Vec<String>>,
}

pub async fn host_cpu(qemu: &Path, accel: Accel) -> Result<HostCpu, QemuError> {
    let scratch = tempfile_dir()?;
    let socket = scratch.join("qmp.sock");
    let model = match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let mut command = tokio::process::Command::new(qemu);
    die_with_parent(&mut command);
    let mut child = command
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            accel.qemu_name(),
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(QemuError::io(format!("cannot run {}", qemu.display())))?;
    let result = async {
        let started = Instant::now();
        while !socket.exists() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(QemuError::Other(
                    "QEMU did not open its monitor for the CPU query".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let qmp = crate::Qmp::connect(&socket, Duration::from_secs(5))
            .await
            .map_err(|source| QemuError::Qmp {
                vm: "cpu-query".into(),
                source,
            })?;
        let reply = qmp
            .execute(
                "query-cpu-model-expansion",
                Some(serde_json::json!({"type": "full", "model": {"name": model}})),
            )
            .await
            .map_err(|source| QemuError::Qmp {
                vm: "cpu-query".into(),
                source,
            })?;
        let mut features: Vec<String> = reply["model"]["props"]
            .as_object()
            .map(|props| {
                props
                    .iter()
                    .filter(|(_, enabled)| enabled.as_bool() == Some(true))
                    .map(|(name, _)| name.clone())
                    .collect()
            })
            .unwrap_or_default();
        features.sort();
        let definitions = qmp
            .execute("query-cpu-definitions", None)
            .await
            .map_err(|source| QemuError::Qmp {
                vm: "cpu-query".into(),
                source,
            })?;
        let models = definitions
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|definition| {
                let name = definition["name"].as_str()?.to_string();
                let missing = definition["unavailable-features"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|feature| feature.as_str().map(str::to_string))
                    .collect();
                Some((name, missing))
            })
            .collect();
        Ok(HostCpu {
            model: model.to_string(),
            features,
            models,
        })
    }
    .await;
    // It may have exited already.
    if let Err(error) = child.kill().await {
        tracing::debug!("it may have exited already: {error}");
    }
    // A leftover is harmless: it is replaced or cleaned on the next run.
    if let Err(error) = std::fs::remove_dir_all(&scratch) {
        tracing::debug!("a leftover is harmless: {error}");
    }
    result
}
