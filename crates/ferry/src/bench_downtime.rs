//! `ferry bench downtime`: REFERENCE §1 reproduced in the lab. For every mode (live
//! migration, quick migration, HA after a host power-off) and each of the seven
//! workloads, one HA VM serves a flow driven from outside it while it is moved or its
//! host dies; each run records the client-observed downtime, the operations that
//! failed within the client timeout, the acknowledged writes lost, whether the guest
//! rebooted, and QEMU's downtime and Ferry's overhead where they apply. The baseline
//! mode `qemu` runs the same guest as a plain QEMU and migrates it by hand with QEMU's
//! defaults ([`BareVm`]), so Ferry is compared with QEMU itself as well. The tables put
//! our runs next to the reference runs.

mod report;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_lab::flows::{lost_writes, Flow, Scenario, SCENARIOS};
use ferry_lab::harness::downtime::{mode_title, subject, DowntimeRun, MODES};
use ferry_lab::harness::faults::{heal_and_wait, power_off_and_wait};
use ferry_lab::harness::lab::{cluster_accel, lab_client, load_lab, machine_description};
use ferry_lab::harness::reference::downtime_reference;
use ferry_lab::harness::stats::median;
use ferry_lab::harness::vm::{
    create_fresh_vm, ensure_migrated, ha_bench_vm, migrate_and_wait, remove_bench_vm,
    wait_answering,
};
use ferry_lab::lab::bare::BareVm;
use ferry_lab::lab::Lab;
use ferry_lab::workload::boot_id;
use serde::{Deserialize, Serialize};

use crate::output::write_json_file;

const VM: &str = "bench-dt";
const BARE_VM: &str = "bench-bare";
/// The flow runs this long before the move and after it is back.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
pub struct Report {
    machine: String,
    accel: String,
    memory: String,
    client_timeout_s: f64,
    runs: Vec<DowntimeRun>,
}

pub struct Options {
    pub runs: u32,
    pub modes: Vec<String>,
    pub memory: String,
    pub client_timeout: Duration,
    pub lab: String,
    pub json_file: Option<PathBuf>,
    pub html_file: Option<PathBuf>,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.runs >= 1, "--runs must be at least 1");
    for mode in &options.modes {
        anyhow::ensure!(
            MODES.contains(&mode.as_str()),
            "--modes: {mode:?} is not live, quick, ha or qemu"
        );
    }
    let mut lab = load_lab(&options.lab)?;
    let client = lab_client(&lab)?;
    create_fresh_vm(&client, &ha_bench_vm(VM, &options.memory)).await?;
    let result = measure_all(&mut lab, &client, &options).await;
    remove_bench_vm(&client, VM).await;
    let runs = result?;
    let report = Report {
        machine: machine_description(),
        accel: cluster_accel(&client).await?,
        memory: options.memory.clone(),
        client_timeout_s: options.client_timeout.as_secs_f64(),
        runs,
    };
    if let Some(path) = &options.json_file {
        write_json_file(path, &report)?;
    }
    print_report(&report, options.html_file.as_deref())
}

/// The tables on stdout and, if asked, the HTML report.
pub fn print_report(report: &Report, html: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut modes: Vec<String> = Vec::new();
    for run in &report.runs {
        if !modes.contains(&run.mode) {
            modes.push(run.mode.clone());
        }
    }
    if let Some(path) = html {
        let page = report::render(
            &modes,
            &report.runs,
            &report.machine,
            &report.accel,
            &report.memory,
        );
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
        println!("HTML report: {}", path.display());
    }
    let per_case = report.runs.iter().map(|run| run.run).max().unwrap_or(1);
    for mode in &modes {
        println!("\n{} ({})", mode_title(mode), report.machine);
        println!("{}", mode_table(mode, &report.runs, per_case));
    }
    Ok(())
}

/// Prints the tables (and writes the HTML report) of a run saved with `--json`.
pub fn reprint(json: &std::path::Path, html: Option<&std::path::Path>) -> anyhow::Result<()> {
    let text = std::fs::read(json).with_context(|| format!("cannot read {}", json.display()))?;
    let report: Report = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a downtime benchmark's JSON", json.display()))?;
    print_report(&report, html)
}

async fn measure_all(
    lab: &mut Lab,
    client: &ApiClient,
    options: &Options,
) -> anyhow::Result<Vec<DowntimeRun>> {
    let mut runs = Vec::new();
    for mode in &options.modes {
        let mut bare = None;
        if mode == "qemu" {
            let memory: ferry_model::Bytes = options
                .memory
                .parse()
                .map_err(|error| anyhow::anyhow!("--memory {}: {error}", options.memory))?;
            bare = Some(BareVm::boot(lab, BARE_VM, memory, 1).await?);
        }
        let measured = measure_mode(lab, client, bare.as_mut(), mode, options, &mut runs).await;
        if let Some(bare) = bare {
            bare.destroy().await;
        }
        measured?;
    }
    Ok(runs)
}

async fn measure_mode(
    lab: &mut Lab,
    client: &ApiClient,
    mut bare: Option<&mut BareVm>,
    mode: &str,
    options: &Options,
    runs: &mut Vec<DowntimeRun>,
) -> anyhow::Result<()> {
    for scenario in SCENARIOS {
        for run in 1..=options.runs {
            let sample = match bare.as_deref_mut() {
                Some(bare) => measure_bare(bare, scenario, run, options.client_timeout).await,
                None => measure_one(lab, client, mode, scenario, run, options.client_timeout).await,
            }
            .with_context(|| format!("{mode} {} run {run}", scenario.name))?;
            eprintln!(
                "{mode:<5} {:<16} run {run}: {} → {}: downtime {:.2} s, {} of {} operations failed, {} lost, {}",
                scenario.name,
                sample.from,
                sample.to,
                sample.downtime_s,
                sample.failed_ops,
                sample.operations,
                sample.lost_writes,
                if sample.rebooted { "rebooted" } else { "no reboot" }
            );
            runs.push(sample);
        }
    }
    Ok(())
}

/// One run of the baseline: the flow against the bare QEMU's guest while it is
/// migrated to the other of hosts 1 and 2.
async fn measure_bare(
    bare: &mut BareVm,
    scenario: Scenario,
    run: u32,
    client_timeout: Duration,
) -> anyhow::Result<DowntimeRun> {
    let ip = bare.address().to_string();
    let from = bare.host();
    let to = if from == 1 { 2 } else { 1 };
    let boot = boot_id(&ip).await.map_err(anyhow::Error::msg)?;
    let prefix = format!("qemu-{}-{run}-", scenario.name);
    let flow = Flow::start(&ip, scenario, &prefix, client_timeout);
    tokio::time::sleep(SETTLE).await;
    let migrated = bare.migrate_to(to).await;
    tokio::time::sleep(SETTLE).await;
    let log = flow.stop().await;
    let info = migrated?;
    let lost = lost_writes(&ip, &log).await.map_err(anyhow::Error::msg)?;
    let rebooted = boot_id(&ip).await.map_err(anyhow::Error::msg)? != boot;
    Ok(DowntimeRun {
        mode: "qemu".into(),
        scenario: scenario.name.into(),
        run,
        from: format!("host{from}"),
        to: format!("host{to}"),
        downtime_s: log.downtime().as_secs_f64(),
        failed_ops: log.failed.len(),
        operations: log.operations,
        lost_writes: lost.len(),
        rebooted,
        qemu_downtime_ms: info.downtime_ms,
        ferry_overhead_ms: None,
    })
}

async fn measure_one(
    lab: &mut Lab,
    client: &ApiClient,
    mode: &str,
    scenario: Scenario,
    run: u32,
    client_timeout: Duration,
) -> anyhow::Result<DowntimeRun> {
    let vm = wait_answering(client, VM).await?;
    let ip = vm
        .ip
        .ok_or_else(|| anyhow::anyhow!("VM {VM} has no address"))?;
    let from = vm.host.unwrap_or_default();
    let boot = boot_id(&ip).await.map_err(anyhow::Error::msg)?;
    let prefix = format!("{mode}-{}-{run}-", scenario.name);
    let flow = Flow::start(&ip, scenario, &prefix, client_timeout);
    tokio::time::sleep(SETTLE).await;
    let (qemu_downtime_ms, ferry_overhead_ms) = match mode {
        "ha" => {
            power_off_and_wait(lab, client, &from, VM).await?;
            (None, None)
        }
        _ => {
            let to = if from == "host1" { "host2" } else { "host1" };
            let op = migrate_and_wait(client, VM, to, mode).await?;
            ensure_migrated(&op)?;
            (op.qemu_downtime_ms, op.overhead_ms)
        }
    };
    tokio::time::sleep(SETTLE).await;
    let log = flow.stop().await;
    let lost = lost_writes(&ip, &log).await.map_err(anyhow::Error::msg)?;
    let rebooted = boot_id(&ip).await.map_err(anyhow::Error::msg)? != boot;
    let to = client.get_vm(VM).await?.host.unwrap_or_default();
    if mode == "ha" {
        heal_and_wait(lab, client, &from).await?;
    }
    Ok(DowntimeRun {
        mode: mode.into(),
        scenario: scenario.name.into(),
        run,
        from,
        to,
        downtime_s: log.downtime().as_secs_f64(),
        failed_ops: log.failed.len(),
        operations: log.operations,
        lost_writes: lost.len(),
        rebooted,
        qemu_downtime_ms,
        ferry_overhead_ms,
    })
}

/// One run as the reference prints it: seconds, and "error" when the flow failed.
fn cell(seconds: f64, failed: bool) -> String {
    if failed {
        format!("{seconds:.2} error")
    } else {
        format!("{seconds:.2}")
    }
}

/// Our runs, the reference runs and the ratio of the medians, one row per workload.
pub fn mode_table(mode: &str, runs: &[DowntimeRun], per_case: u32) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    let mut header = vec!["WORKLOAD".to_string()];
    let who = subject(mode).to_uppercase();
    header.extend((1..=per_case).map(|run| format!("{who} {run} s")));
    header.extend((1..=3).map(|run| format!("REF {run} s")));
    header.push(format!("REF ÷ {who}"));
    // Ferry's live migration next to QEMU's own, when the baseline ran too.
    let baseline = mode == "live" && runs.iter().any(|run| run.mode == "qemu");
    if baseline {
        header.push("BARE QEMU s".into());
    }
    header.extend(["FAILED".into(), "LOST".into(), "REBOOTS".into()]);
    table.set_header(header);
    for scenario in SCENARIOS {
        let ours: Vec<&DowntimeRun> = runs
            .iter()
            .filter(|run| run.mode == mode && run.scenario == scenario.name)
            .collect();
        if ours.is_empty() {
            continue;
        }
        let theirs = downtime_reference(mode, scenario.name);
        let mut row = vec![scenario.name.to_string()];
        row.extend(
            ours.iter()
                .map(|run| cell(run.downtime_s, run.failed_ops > 0)),
        );
        row.extend(
            theirs
                .iter()
                .map(|(seconds, failed)| cell(*seconds, *failed)),
        );
        let ours_median = median(ours.iter().map(|run| run.downtime_s));
        let theirs_median = median(theirs.iter().map(|(seconds, _)| *seconds));
        row.push(ratio(theirs_median, ours_median));
        if baseline {
            let bare: Vec<f64> = runs
                .iter()
                .filter(|run| run.mode == "qemu" && run.scenario == scenario.name)
                .map(|run| run.downtime_s)
                .collect();
            row.push(if bare.is_empty() {
                "-".into()
            } else {
                format!("{:.2}", median(bare))
            });
        }
        row.push(
            ours.iter()
                .map(|run| run.failed_ops)
                .sum::<usize>()
                .to_string(),
        );
        row.push(
            ours.iter()
                .map(|run| run.lost_writes)
                .sum::<usize>()
                .to_string(),
        );
        row.push(ours.iter().filter(|run| run.rebooted).count().to_string());
        table.add_row(row);
    }
    table
}

/// How many times shorter our median downtime is; a downtime under the measurement's
/// resolution (10 ms) counts as 10 ms.
fn ratio(reference: f64, ours: f64) -> String {
    let times = reference / ours.max(0.01);
    if times < 10.0 {
        format!("{times:.1}×")
    } else {
        format!("{times:.0}×")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(scenario: &str, downtime_s: f64, failed_ops: usize) -> DowntimeRun {
        DowntimeRun {
            mode: "live".into(),
            scenario: scenario.into(),
            run: 1,
            from: "host1".into(),
            to: "host2".into(),
            downtime_s,
            failed_ops,
            operations: 40,
            lost_writes: 0,
            rebooted: false,
            qemu_downtime_ms: Some(20),
            ferry_overhead_ms: Some(90),
        }
    }

    #[test]
    fn the_table_puts_our_runs_next_to_the_reference_and_their_ratio() {
        let runs = vec![sample("idle", 0.25, 0), sample("idle", 0.27, 1)];
        let text = mode_table("live", &runs, 2).to_string();
        assert!(text.contains("0.25"), "{text}");
        assert!(text.contains("0.27 error"), "{text}");
        assert!(text.contains("1.12"), "{text}");
        // Reference median 1.08 s over our median 0.27 s.
        assert!(text.contains("4.0×"), "{text}");
        assert!(
            !text.contains("db-bulk"),
            "workloads without runs are left out"
        );
    }

    #[test]
    fn the_live_table_shows_bare_qemu_next_to_ferry_when_the_baseline_ran() {
        let mut bare = sample("idle", 0.41, 0);
        bare.mode = "qemu".into();
        let runs = vec![sample("idle", 0.25, 0), bare];
        let live = mode_table("live", &runs, 1).to_string();
        assert!(
            live.contains("BARE QEMU s") && live.contains("0.41"),
            "{live}"
        );
        let baseline = mode_table("qemu", &runs, 1).to_string();
        assert!(baseline.contains("QEMU 1 s"), "{baseline}");
        assert!(!baseline.contains("BARE QEMU"), "{baseline}");
        assert!(!mode_table("live", &runs[..1], 1)
            .to_string()
            .contains("BARE QEMU"));
    }

    #[test]
    fn a_downtime_under_the_resolution_counts_as_10_ms() {
        assert_eq!(ratio(10.0, 0.0), "1000×");
    }
}
