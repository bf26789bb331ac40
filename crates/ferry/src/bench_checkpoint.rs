//! `ferry bench checkpoint`: what checkpoints, templates and clones cost in the lab.
//! - the guest's pause for a checkpoint with memory of a 256 MiB and a 1 GiB guest
//!   while a client writes to it (min/median/max of `--runs`), and a revert's time;
//! - a linked clone: its disk (a qcow2 overlay) alone, and the whole API create until
//!   the VM is placed (before its boot);
//! - a full copy of a 4 GiB disk full of data (the copy a full clone makes);
//! - ten linked clones created at once against one (REFERENCE §4: three template jobs
//!   at once took six times as long as one).

use std::time::{Duration, Instant};

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_api::types::{CreateCheckpointRequest, CreateTemplateRequest, CreateVmRequest};
use ferry_lab::harness::lab::{cluster_accel, load_lab};
use ferry_lab::harness::stats::spread;
use ferry_lab::harness::vm::{bench_vm, create_fresh_vm, remove_bench_vm, wait_answering};
use ferry_lab::workload::{boot_id, lost_writes, Writer};
use serde::Serialize;

use crate::output::print_json;

const TEMPLATE: &str = "bench-tpl";
const WRITE_EVERY: Duration = Duration::from_millis(50);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default, Serialize)]
pub struct Report {
    accel: String,
    runs: u32,
    /// By guest memory: the guest's pause per checkpoint with memory (ms).
    pauses: Vec<(String, Vec<u64>)>,
    /// By guest memory: the time of each revert to a checkpoint with memory (ms).
    reverts: Vec<(String, Vec<u64>)>,
    /// Acknowledged writes lost across all checkpoints (must be 0).
    lost_writes: usize,
    /// Making a linked clone's disk (ms, each run).
    overlay_ms: Vec<u64>,
    /// `vm create --template` until the VM is placed, one at a time (ms, each run).
    linked_create_ms: Vec<u64>,
    /// Ten linked clones created at once: until the last is placed (ms).
    ten_at_once_ms: u64,
    /// A full copy of a 4 GiB disk of data (ms) and its rate (MiB/s).
    full_copy_ms: u64,
    full_copy_mib_s: f64,
}

pub async fn run(runs: u32, lab_name: &str, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let lab = load_lab(lab_name)?;
    let client = ferry_lab::harness::lab::host_client(&lab, 1)?;
    let mut report = Report {
        accel: cluster_accel(&client).await?,
        runs,
        ..Report::default()
    };
    for memory in ["256M", "1G"] {
        let vm = format!("bench-cp-{}", memory.to_lowercase());
        create_fresh_vm(&client, &bench_vm(&vm, memory)).await?;
        let measured = checkpoints(&client, &vm, runs, json).await;
        remove_bench_vm(&client, &vm).await;
        let (pauses, reverts, lost) = measured?;
        report.pauses.push((memory.into(), pauses));
        report.reverts.push((memory.into(), reverts));
        report.lost_writes += lost;
    }
    clones(&client, &lab.spec().shared_pool(), runs, &mut report, json).await?;
    report.full_copy_ms = full_copy(&lab.spec().state_dir)?;
    report.full_copy_mib_s = 4096.0 / (report.full_copy_ms.max(1) as f64 / 1000.0);
    if json {
        return print_json(&report);
    }
    println!("{}", table(&report));
    Ok(())
}

/// `runs` checkpoints with memory under writes, then `runs` reverts to the last one.
async fn checkpoints(
    client: &ApiClient,
    vm: &str,
    runs: u32,
    quiet: bool,
) -> anyhow::Result<(Vec<u64>, Vec<u64>, usize)> {
    let view = wait_answering(client, vm).await?;
    let ip = view
        .ip
        .ok_or_else(|| anyhow::anyhow!("VM {vm} has no address"))?;
    // ferry-guest starts a moment after the guest agent answers.
    boot_id(&ip).await.map_err(anyhow::Error::msg)?;
    let mut pauses = Vec::new();
    let mut lost = 0;
    for run in 1..=runs {
        let writer = Writer::start(&ip, &format!("cp{run}-"), WRITE_EVERY, CLIENT_TIMEOUT);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let op = client
            .create_checkpoint(
                vm,
                &CreateCheckpointRequest {
                    tag: Some(format!("run-{run}")),
                    ..Default::default()
                },
            )
            .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let log = writer.stop().await;
        lost += lost_writes(&ip, &log)
            .await
            .map_err(anyhow::Error::msg)?
            .len();
        let paused = op
            .qemu_downtime_ms
            .ok_or_else(|| anyhow::anyhow!("checkpoint {run} of {vm} reported no pause"))?;
        if !quiet {
            eprintln!("{vm}: checkpoint {run}: guest paused {paused} ms");
        }
        pauses.push(paused);
    }
    let mut reverts = Vec::new();
    for run in 1..=runs {
        let started = Instant::now();
        client.revert_checkpoint(vm, &format!("run-{runs}")).await?;
        let took = started.elapsed().as_millis() as u64;
        if !quiet {
            eprintln!("{vm}: revert {run}: {took} ms");
        }
        reverts.push(took);
    }
    Ok((pauses, reverts, lost))
}

/// A template from a stopped appliance VM; linked clones one at a time, then ten at
/// once. Every VM made is removed again.
async fn clones(
    client: &ApiClient,
    shared_pool: &std::path::Path,
    runs: u32,
    report: &mut Report,
    quiet: bool,
) -> anyhow::Result<()> {
    let source = "bench-gold";
    create_fresh_vm(client, &bench_vm(source, "256M")).await?;
    wait_answering(client, source).await?;
    client.stop_vm(source).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while client.get_vm(source).await?.state != "stopped" {
        anyhow::ensure!(Instant::now() < deadline, "VM {source} did not stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if client.get_template(TEMPLATE).await.is_ok() {
        client.delete_template(TEMPLATE).await?;
    }
    let template = client
        .create_template(&CreateTemplateRequest {
            name: TEMPLATE.into(),
            from_vm: source.into(),
            generalize: false,
        })
        .await?;
    let result = async {
        let base = std::path::PathBuf::from(&template.disks[0].path);
        let scratch = shared_pool.join("bench-overlays");
        for run in 1..=runs {
            let overlay = scratch.join(format!("clone-{run}.qcow2"));
            let started = Instant::now();
            ferry_qemu::snapshot::create_overlay(&base, &overlay, None)
                .map_err(anyhow::Error::msg)?;
            report.overlay_ms.push(started.elapsed().as_millis() as u64);
        }
        if let Err(error) = std::fs::remove_dir_all(&scratch) {
            tracing::warn!("{}: {error}", scratch.display());
        }
        for run in 1..=runs {
            let name = format!("bench-clone-{run}");
            let started = Instant::now();
            client.create_vm(&clone_request(&name)).await?;
            let took = started.elapsed().as_millis() as u64;
            if !quiet {
                eprintln!("linked clone {run}: created and placed in {took} ms");
            }
            report.linked_create_ms.push(took);
            client.delete_vm(&name).await?;
        }
        let names: Vec<String> = (1..=10).map(|n| format!("bench-ten-{n}")).collect();
        let started = Instant::now();
        let requests: Vec<CreateVmRequest> = names.iter().map(|name| clone_request(name)).collect();
        let made =
            futures::future::join_all(requests.iter().map(|request| client.create_vm(request)))
                .await;
        report.ten_at_once_ms = started.elapsed().as_millis() as u64;
        for name in &names {
            remove_bench_vm(client, name).await;
        }
        for result in made {
            result?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(error) = client.delete_template(TEMPLATE).await {
        tracing::warn!("cannot remove template {TEMPLATE}: {error}");
    }
    remove_bench_vm(client, source).await;
    result
}

fn clone_request(name: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        template: Some(TEMPLATE.into()),
        ..CreateVmRequest::default()
    }
}

/// A 4 GiB qcow2 disk full of data (a pattern, so nothing is skipped as zero), copied
/// the way a full clone copies it.
fn full_copy(scratch: &std::path::Path) -> anyhow::Result<u64> {
    let dir = scratch.join("bench-full-copy");
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let source = dir.join("source.qcow2");
        ferry_qemu::image::create_blank(
            &source,
            ferry_model::DiskFormat::Qcow2,
            ferry_model::Bytes(4 * ferry_model::Bytes::GIB),
        )
        .map_err(anyhow::Error::msg)?;
        // qemu-io takes at most 2 GiB per request: four writes of 1 GiB.
        let mut fill = std::process::Command::new("qemu-io");
        fill.args(["-f", "qcow2"]);
        for gib in 0..4 {
            fill.args(["-c", &format!("write -P 0x5a {gib}G 1G")]);
        }
        let filled = fill.arg(&source).output()?;
        // qemu-io reports a refused command on stdout and still exits 0.
        let said = String::from_utf8_lossy(&filled.stdout);
        anyhow::ensure!(
            filled.status.success() && said.matches("wrote ").count() == 4,
            "qemu-io could not fill {}: {}",
            source.display(),
            format!(
                "{} {}",
                said.trim(),
                String::from_utf8_lossy(&filled.stderr).trim()
            )
            .trim()
        );
        let started = Instant::now();
        ferry_qemu::snapshot::flat_copy(&source, &dir.join("copy.qcow2"), None, &mut |_| {})
            .map_err(anyhow::Error::msg)?;
        Ok(started.elapsed().as_millis() as u64)
    })();
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        tracing::warn!("{}: {error}", dir.display());
    }
    result
}

fn table(report: &Report) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(["MEASURE", "MIN / MEDIAN / MAX", "NOTE"]);
    for (memory, pauses) in &report.pauses {
        table.add_row([
            format!("checkpoint with memory, {memory} guest under writes: guest pause ms"),
            spread(pauses.iter().map(|ms| Some(*ms))),
            format!("{} runs, {} writes lost", pauses.len(), report.lost_writes),
        ]);
    }
    for (memory, reverts) in &report.reverts {
        table.add_row([
            format!("revert to a checkpoint with memory, {memory} guest: ms"),
            spread(reverts.iter().map(|ms| Some(*ms))),
            "API call to the guest running from the checkpoint".into(),
        ]);
    }
    table.add_row([
        "linked clone: its disk (qcow2 overlay) ms".into(),
        spread(report.overlay_ms.iter().map(|ms| Some(*ms))),
        "goal: < 100 ms before boot".into(),
    ]);
    table.add_row([
        "linked clone: vm create --template until placed ms".into(),
        spread(report.linked_create_ms.iter().map(|ms| Some(*ms))),
        "one at a time".into(),
    ]);
    let one = {
        let mut sorted = report.linked_create_ms.clone();
        sorted.sort_unstable();
        sorted.get(sorted.len() / 2).copied().unwrap_or(1).max(1)
    };
    table.add_row([
        "10 linked clones at once, until the last is placed ms".into(),
        report.ten_at_once_ms.to_string(),
        format!(
            "{:.2}× one clone (goal: < 1.5×; REFERENCE §4: 6× for 3)",
            report.ten_at_once_ms as f64 / one as f64
        ),
    ]);
    table.add_row([
        "full copy of a 4 GiB disk of data ms".into(),
        report.full_copy_ms.to_string(),
        format!("{:.0} MiB/s", report.full_copy_mib_s),
    ]);
    table.add_row(["acceleration".into(), report.accel.clone(), String::new()]);
    table
}
