//! Where things live on a Ferry machine, each overridable through the environment so
//! that tests and users can point elsewhere.

use std::path::PathBuf;

use ferry_qemu::{AccelReport, QemuError};

use crate::appliance::Appliance;

fn from_env(variable: &str, default: &str) -> PathBuf {
    std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(default))
}

/// The built test appliance (`FERRY_APPLIANCE_DIR`).
pub fn appliance_dir() -> PathBuf {
    from_env("FERRY_APPLIANCE_DIR", "/var/lib/ferry/images/appliance")
}

/// The Debian 12 test guest (`FERRY_DEBIAN_DIR`).
pub fn debian_image_dir() -> PathBuf {
    from_env("FERRY_DEBIAN_DIR", "/var/cache/ferry/images/debian-12")
}

/// Downloaded packages and other rebuildable things (`FERRY_CACHE_DIR`).
pub fn cache_dir() -> PathBuf {
    from_env("FERRY_CACHE_DIR", "/var/cache/ferry")
}

/// Where `ferry lab up` keeps each lab's state, one directory per lab (`FERRY_LAB_DIR`).
pub fn lab_dir() -> PathBuf {
    from_env("FERRY_LAB_DIR", "/var/lib/ferry/lab")
}

/// Benchmark reports `ferry lab demo` writes (`FERRY_REPORTS_DIR`).
pub fn reports_dir() -> PathBuf {
    from_env("FERRY_REPORTS_DIR", "/var/lib/ferry/reports")
}

/// Runtime state that must not survive a reboot (`FERRY_RUN_DIR`).
pub fn run_dir() -> PathBuf {
    from_env("FERRY_RUN_DIR", "/run/ferry")
}

/// The QEMU binary (`FERRY_QEMU`).
pub fn qemu_binary() -> PathBuf {
    from_env("FERRY_QEMU", "/usr/bin/qemu-system-x86_64")
}

/// KVM or TCG for this machine, probed with the appliance's kernel and cached.
pub async fn detect_accel(appliance: &Appliance) -> Result<AccelReport, QemuError> {
    ferry_qemu::accel::detect(
        &qemu_binary(),
        &appliance.probe_image(),
        &run_dir().join("accel.json"),
    )
    .await
}
