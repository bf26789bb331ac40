//! `ferry bench chaos`: random faults against the lab's HA VMs, and the checks that
//! matter: double runs, lost writes, VMs left down, and the time to recover. The trials
//! themselves are `ferry_lab::harness::chaos`.

use std::path::PathBuf;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_lab::harness::chaos::{self, ChaosReport};
use ferry_lab::harness::lab::load_lab;
use ferry_lab::harness::stats::{maximum, median, percentile};

use crate::output::write_json_file;

pub async fn run(
    trials: u32,
    seed: Option<u64>,
    lab_name: &str,
    json_file: Option<PathBuf>,
) -> anyhow::Result<()> {
    anyhow::ensure!(trials >= 1, "--trials must be at least 1");
    let mut lab = load_lab(lab_name)?;
    let seed = seed.unwrap_or_else(|| fastrand::u64(..));
    eprintln!("chaos: {trials} trials, seed {seed} (`--seed {seed}` repeats them)");
    let report = chaos::run(&mut lab, trials, seed, |trial| {
        eprintln!(
            "trial {}: {} on {}: {}{}",
            trial.number,
            trial.fault.name(),
            trial.host.as_deref().unwrap_or("etcd"),
            trial
                .recovery_ms
                .map_or("never recovered".to_string(), |ms| format!(
                    "recovered in {:.1} s",
                    ms as f64 / 1000.0
                )),
            if trial.clean() {
                String::new()
            } else {
                format!(
                    "; VIOLATIONS: {}",
                    trial
                        .double_runs
                        .iter()
                        .chain(&trial.lost_writes)
                        .chain(&trial.left_down)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        )
    })
    .await?;
    if let Some(path) = json_file {
        write_json_file(&path, &report)?;
    }
    println!("{}", summary(&report));
    let violations = report.double_runs() + report.lost_writes() + report.left_down();
    anyhow::ensure!(
        violations == 0,
        "{violations} violations in {} trials (seed {seed})",
        report.trials.len()
    );
    Ok(())
}

pub fn summary(report: &ChaosReport) -> String {
    let mut faults = Table::new();
    faults.load_preset(UTF8_BORDERS_ONLY);
    faults.set_header(["fault", "trials"]);
    for (fault, count) in report.faults_by_kind() {
        faults.add_row([fault.name().to_string(), count.to_string()]);
    }
    let recoveries = report.recoveries();
    let mut totals = Table::new();
    totals.load_preset(UTF8_BORDERS_ONLY);
    totals.set_header([
        "trials",
        "double runs",
        "lost writes",
        "VMs left down",
        "writes checked",
        "recovery p50",
        "p95",
        "max",
    ]);
    let seconds = |value: f64| {
        if recoveries.is_empty() {
            "-".to_string()
        } else {
            format!("{value:.1} s")
        }
    };
    totals.add_row([
        report.trials.len().to_string(),
        report.double_runs().to_string(),
        report.lost_writes().to_string(),
        report.left_down().to_string(),
        report
            .trials
            .iter()
            .map(|trial| trial.acknowledged)
            .sum::<usize>()
            .to_string(),
        seconds(median(recoveries.iter().copied())),
        seconds(percentile(recoveries.iter().copied(), 95)),
        seconds(maximum(recoveries.iter().copied())),
    ]);
    format!("{faults}\n{totals}")
}
