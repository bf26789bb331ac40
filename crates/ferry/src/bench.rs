//! `ferry bench …`: measurements that print numbers. Speed targets are checked here,
//! never by timed assertions in tests.

use std::time::{Duration, Instant};

use clap::Subcommand;
use ferry_lab::appliance::Appliance;
use ferry_lab::defaults;
use ferry_lab::sandbox::{Sandbox, SandboxOptions};
use ferry_model::Bytes;
use serde::Serialize;

use crate::output::print_json;

#[derive(Subcommand)]
pub enum BenchVerb {
    /// Boot the appliance repeatedly and report QEMU start → guest ready.
    Boot {
        /// Boots after the first (the first also formats the data disk).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Guest memory.
        #[arg(long, default_value = "256M")]
        memory: Bytes,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize)]
struct BootReport {
    accel: String,
    memory_mib: u64,
    first_boot_s: f64,
    boots_s: Vec<f64>,
    median_s: f64,
    worst_s: f64,
    graceful_stop_s: Vec<f64>,
}

pub async fn run(verb: BenchVerb) -> anyhow::Result<()> {
    match verb {
        BenchVerb::Boot { runs, memory, json } => boot(runs, memory, json).await,
    }
}

async fn boot(runs: u32, memory: Bytes, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let appliance = Appliance::load(&defaults::appliance_dir())?;
    let accel = defaults::detect_accel(&appliance).await?;
    let dir = defaults::run_dir().join("bench-boot");
    let _ = std::fs::remove_dir_all(&dir);
    let options = SandboxOptions {
        qemu: defaults::qemu_binary(),
        accel: accel.accel,
        memory,
        data_disk: Bytes(Bytes::GIB),
        dir,
    };
    let started = Instant::now();
    let mut sandbox = Sandbox::start("bench-boot", &appliance, options).await?;
    let result = async {
        sandbox.wait_ready(Duration::from_secs(120)).await?;
        let first_boot = started.elapsed().as_secs_f64();
        let mut boots = Vec::new();
        let mut stops = Vec::new();
        for run in 1..=runs {
            let stopping = Instant::now();
            sandbox.machine()?.stop(Duration::from_secs(60)).await?;
            stops.push(stopping.elapsed().as_secs_f64());
            sandbox.forget_machine();
            let starting = Instant::now();
            sandbox.launch().await?;
            sandbox.wait_ready(Duration::from_secs(120)).await?;
            boots.push(starting.elapsed().as_secs_f64());
            if !json {
                eprintln!("boot {run}/{runs}: {:.2} s", boots[boots.len() - 1]);
            }
        }
        Ok::<_, anyhow::Error>((first_boot, boots, stops))
    }
    .await;
    sandbox.destroy().await?;
    let (first_boot_s, boots_s, graceful_stop_s) = result?;
    let mut sorted = boots_s.clone();
    sorted.sort_by(f64::total_cmp);
    let report = BootReport {
        accel: accel.accel.qemu_name().into(),
        memory_mib: memory.as_mib(),
        first_boot_s,
        median_s: sorted[sorted.len() / 2],
        worst_s: sorted[sorted.len() - 1],
        boots_s,
        graceful_stop_s,
    };
    if json {
        return print_json(&report);
    }
    println!(
        "appliance boot, {} MiB, {}:",
        report.memory_mib, report.accel
    );
    println!(
        "  first boot (formats the data disk)  {:.2} s",
        report.first_boot_s
    );
    println!(
        "  later boots, median                 {:.2} s",
        report.median_s
    );
    println!(
        "  later boots, worst                  {:.2} s",
        report.worst_s
    );
    let stop_median = {
        let mut stops = report.graceful_stop_s.clone();
        stops.sort_by(f64::total_cmp);
        stops[stops.len() / 2]
    };
    println!("  graceful stop (ACPI), median        {stop_median:.2} s");
    Ok(())
}
