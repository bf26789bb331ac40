//! What the downtime benchmark, its report and the tour share: the modes, one run's
//! record, and what each mode is called.

use serde::{Deserialize, Serialize};

/// Live and quick migration, HA after a host power-off, and `qemu`: the same guest as
/// a plain QEMU migrated by hand (the baseline).
pub const MODES: [&str; 4] = ["live", "quick", "ha", "qemu"];

/// One run of one workload in one mode.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DowntimeRun {
    pub mode: String,
    pub scenario: String,
    pub run: u32,
    pub from: String,
    pub to: String,
    pub downtime_s: f64,
    pub failed_ops: usize,
    pub operations: u64,
    pub lost_writes: usize,
    pub rebooted: bool,
    pub qemu_downtime_ms: Option<u64>,
    pub ferry_overhead_ms: Option<u64>,
}

/// Who a mode's runs measure: Ferry, or QEMU alone in the baseline.
pub fn subject(mode: &str) -> &'static str {
    if mode == "qemu" {
        "QEMU"
    } else {
        "Ferry"
    }
}

pub fn mode_title(mode: &str) -> &'static str {
    match mode {
        "live" => "Live migration",
        "quick" => "Quick migration",
        "qemu" => {
            "Baseline: the same guest as a plain QEMU, live-migrated by hand with QEMU's defaults"
        }
        _ => "HA: host powered off, VM restarted elsewhere",
    }
}
