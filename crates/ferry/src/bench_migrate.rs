//! `ferry bench migrate`: one VM moved back and forth between two lab hosts, idle and
//! under writes, live and quick; for every run QEMU's downtime, the pause a client
//! outside the VM saw, the total time and Ferry's overhead, failed requests, lost
//! writes and reboots; then min/median/max per case.

use std::path::PathBuf;
use std::time::Duration;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_lab::harness::lab::{cluster_accel, load_lab};
use ferry_lab::harness::stats::spread;
use ferry_lab::harness::vm::{
    bench_vm, create_fresh_vm, ensure_migrated, migrate_and_wait, remove_bench_vm, wait_answering,
};
use ferry_lab::workload::{boot_id, lost_writes, Writer};
use serde::Serialize;

use crate::output::{print_json, write_json_file};

const VM: &str = "bench-mig";
/// The idle probe's period: the resolution of the measured pause.
const PROBE_EVERY: Duration = Duration::from_millis(20);
const WRITE_EVERY: Duration = Duration::from_millis(50);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub mode: String,
    pub workload: String,
    pub run: u32,
    pub from: String,
    pub to: String,
    pub status: String,
    pub qemu_downtime_ms: Option<u64>,
    /// Longest time without a successful probe, minus the probe's period.
    pub client_pause_ms: u64,
    pub total_ms: Option<u64>,
    pub overhead_ms: Option<u64>,
    pub switchover_ms: Option<u64>,
    pub failed_requests: usize,
    pub lost_writes: usize,
    pub rebooted: bool,
}

#[derive(Serialize)]
struct Report {
    accel: String,
    memory: String,
    runs: u32,
    samples: Vec<Sample>,
}

pub async fn run(
    runs: u32,
    modes: &[String],
    lab_name: &str,
    json_file: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    for mode in modes {
        anyhow::ensure!(
            mode == "live" || mode == "quick",
            "--modes: {mode:?} is not live or quick"
        );
    }
    let lab = load_lab(lab_name)?;
    let client = ferry_lab::harness::lab::host_client(&lab, 1)?;
    let vm = create_fresh_vm(&client, &bench_vm(VM, "256M")).await?;
    let result = measure(&client, runs, modes, json).await;
    remove_bench_vm(&client, VM).await;
    let samples = result?;
    let report = Report {
        accel: cluster_accel(&client).await?,
        memory: format!("{} MiB", vm.memory_mib),
        runs,
        samples,
    };
    if let Some(path) = json_file {
        write_json_file(&path, &report)?;
    }
    if json {
        return print_json(&report);
    }
    println!("{}", summary_table(&report.samples));
    Ok(())
}

async fn measure(
    client: &ApiClient,
    runs: u32,
    modes: &[String],
    quiet: bool,
) -> anyhow::Result<Vec<Sample>> {
    let vm = wait_answering(client, VM).await?;
    let ip = vm
        .ip
        .ok_or_else(|| anyhow::anyhow!("VM {VM} has no address"))?;
    let boot = boot_id(&ip).await.map_err(anyhow::Error::msg)?;
    let mut samples = Vec::new();
    for mode in modes {
        for workload in ["idle", "writes"] {
            for run in 1..=runs {
                let here = client.get_vm(VM).await?.host.unwrap_or_default();
                let there = if here == "host1" { "host2" } else { "host1" };
                let probe = Writer::probe(&ip, PROBE_EVERY, CLIENT_TIMEOUT);
                let writer = (workload == "writes").then(|| {
                    Writer::start(&ip, &format!("{mode}-{run}-"), WRITE_EVERY, CLIENT_TIMEOUT)
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
                let op = migrate_and_wait(client, VM, there, mode).await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let probed = probe.stop().await;
                let (written_failures, lost) = match writer {
                    Some(writer) => {
                        let log = writer.stop().await;
                        let lost = lost_writes(&ip, &log).await.map_err(anyhow::Error::msg)?;
                        (log.failures.len(), lost.len())
                    }
                    None => (0, 0),
                };
                let sample = Sample {
                    mode: mode.clone(),
                    workload: workload.into(),
                    run,
                    from: here.clone(),
                    to: there.into(),
                    status: op.status.clone(),
                    qemu_downtime_ms: op.qemu_downtime_ms,
                    client_pause_ms: probed.pause().as_millis() as u64,
                    total_ms: op.total_ms,
                    overhead_ms: op.overhead_ms,
                    switchover_ms: op.switchover_ms,
                    failed_requests: probed.failures.len() + written_failures,
                    lost_writes: lost,
                    rebooted: boot_id(&ip).await.map_err(anyhow::Error::msg)? != boot,
                };
                if !quiet {
                    eprintln!(
                        "{mode:<5} {workload:<6} run {run:>2}: {here} → {there} {}, QEMU downtime {} ms, client pause {} ms, total {} ms, overhead {} ms, {} failed, {} lost",
                        sample.status,
                        shown(sample.qemu_downtime_ms),
                        sample.client_pause_ms,
                        shown(sample.total_ms),
                        shown(sample.overhead_ms),
                        sample.failed_requests,
                        sample.lost_writes
                    );
                }
                ensure_migrated(&op)?;
                samples.push(sample);
            }
        }
    }
    Ok(samples)
}

fn shown(value: Option<u64>) -> String {
    value
        .map(|value| value.to_string())
        .unwrap_or_else(|| "?".into())
}

pub fn summary_table(samples: &[Sample]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "MODE",
        "WORKLOAD",
        "RUNS",
        "QEMU DOWNTIME ms",
        "CLIENT PAUSE ms",
        "TOTAL ms",
        "FERRY OVERHEAD ms",
        "FAILED",
        "LOST",
        "REBOOTS",
    ]);
    let mut cases: Vec<(&str, &str)> = samples
        .iter()
        .map(|sample| (sample.mode.as_str(), sample.workload.as_str()))
        .collect();
    cases.dedup();
    for (mode, workload) in cases {
        let case: Vec<&Sample> = samples
            .iter()
            .filter(|sample| sample.mode == mode && sample.workload == workload)
            .collect();
        table.add_row([
            mode.to_string(),
            workload.to_string(),
            case.len().to_string(),
            spread(case.iter().map(|sample| sample.qemu_downtime_ms)),
            spread(case.iter().map(|sample| Some(sample.client_pause_ms))),
            spread(case.iter().map(|sample| sample.total_ms)),
            spread(case.iter().map(|sample| sample.overhead_ms)),
            case.iter()
                .map(|sample| sample.failed_requests)
                .sum::<usize>()
                .to_string(),
            case.iter()
                .map(|sample| sample.lost_writes)
                .sum::<usize>()
                .to_string(),
            case.iter()
                .filter(|sample| sample.rebooted)
                .count()
                .to_string(),
        ]);
    }
    table
}
