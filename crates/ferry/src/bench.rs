//! `ferry bench …`: measurements that print numbers. Speed targets are checked here,
//! never by timed assertions in tests.

use std::time::{Duration, Instant};

use clap::Subcommand;
use ferry_lab::appliance::Appliance;
use ferry_lab::defaults;
use ferry_lab::harness::stats::{maximum, median, percentile};
use ferry_lab::harness::vm::remove_bench_vm;
use ferry_lab::sandbox::{Sandbox, SandboxOptions};
use ferry_model::Bytes;
use serde::Serialize;

use crate::output::print_json;

#[derive(Subcommand)]
pub enum BenchVerb {
    /// Random faults (power-offs, cut links, killed or hung agents, an etcd restart,
    /// interrupted migrations) against HA VMs with writers: double runs, lost writes,
    /// VMs left down, and the time to recover (p50/p95/max). Needs a lab of 3 hosts.
    Chaos {
        #[arg(long, default_value_t = 20)]
        trials: u32,
        /// Repeat an earlier run's faults.
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        /// Write every trial to this file as JSON.
        #[arg(long = "json", value_name = "FILE")]
        json_file: Option<std::path::PathBuf>,
    },
    /// Latency of `GET /api/v1/vms` with N VMs registered (stopped, so nothing boots), in the lab.
    Api {
        #[arg(long, default_value_t = 50)]
        vms: u32,
        #[arg(long, default_value_t = 200)]
        requests: u32,
        /// Which lab.
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Checkpoints, templates and clones: the guest's pause for a checkpoint with
    /// memory (256 MiB and 1 GiB guests under writes), reverts, linked clones one and
    /// ten at a time, a full copy of a 4 GiB disk. Needs a lab.
    Checkpoint {
        #[arg(long, default_value_t = 10)]
        runs: u32,
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        #[arg(long)]
        json: bool,
    },
    /// Migrate one VM back and forth between two lab hosts, idle and under writes:
    /// QEMU downtime, client-observed pause, total time, Ferry's overhead (min/median/max).
    Migrate {
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Comma-separated: live, quick.
        #[arg(long, value_delimiter = ',', default_value = "live,quick")]
        modes: Vec<String>,
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        /// Also write every sample to this file.
        #[arg(long = "json-file")]
        json_file: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// REFERENCE §1 reproduced: seven workloads driven from outside one VM while it is
    /// live-migrated, quick-migrated, or its host is powered off, and the same guest
    /// as a plain QEMU migrated by hand with QEMU's defaults; downtime, failed
    /// operations, lost writes and reboots per run, next to the reference runs.
    Downtime {
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Comma-separated: live, quick, ha, qemu (the bare-QEMU baseline).
        #[arg(long, value_delimiter = ',', default_value = "live,quick,ha,qemu")]
        modes: Vec<String>,
        #[arg(long, default_value = "256M")]
        memory: String,
        /// An operation without a success for this long counts as failed.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        client_timeout: Duration,
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        /// Write every run to this file as JSON (`{"runs":[…]}`).
        #[arg(long = "json", value_name = "FILE")]
        json_file: Option<std::path::PathBuf>,
        /// Write an HTML report with a chart to this file.
        #[arg(long = "html", value_name = "FILE")]
        html_file: Option<std::path::PathBuf>,
    },
    /// Print the tables of a saved `bench downtime --json FILE`, and its HTML report.
    Report {
        #[arg(long = "json", value_name = "FILE")]
        json_file: std::path::PathBuf,
        #[arg(long = "html", value_name = "FILE")]
        html_file: Option<std::path::PathBuf>,
    },
    /// Power off the host of an HA VM again and again: fault → lease expired → host
    /// declared down → QEMU started elsewhere → ferry-guest answering (min/median/max).
    Ha {
        #[arg(long, default_value_t = 10)]
        runs: u32,
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        /// Also write every sample to this file.
        #[arg(long = "json-file")]
        json_file: Option<std::path::PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// REFERENCE §2's fault matrix in the lab: each fault the lab can make, whether Ferry
    /// detected it and how fast, what it did, the client's outage, ◎/○/△/× next to the
    /// reference's column E.
    Faults {
        #[arg(long, default_value = ferry_lab::lab::DEFAULT_NAME)]
        lab: String,
        /// Also write every fault's result to this file.
        #[arg(long = "json", value_name = "FILE")]
        json_file: Option<std::path::PathBuf>,
    },
    /// Boot a guest repeatedly and report QEMU start → guest ready: the appliance
    /// (ferry-guest answering), or the Debian image (its guest agent answering) under
    /// SeaBIOS or OVMF.
    Boot {
        /// Boots after the first (the first also formats the data disk, or runs
        /// cloud-init for the first time).
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Guest memory (default 256M for the appliance, 512M for Debian).
        #[arg(long)]
        memory: Option<Bytes>,
        /// appliance or debian (`ferry image build-debian` builds it).
        #[arg(long, default_value = "appliance")]
        image: String,
        /// bios or uefi (Debian).
        #[arg(long, default_value = "bios")]
        firmware: String,
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
        BenchVerb::Boot {
            runs,
            memory,
            image,
            firmware,
            json,
        } => match image.as_str() {
            "appliance" => boot(runs, memory.unwrap_or(Bytes::mib(256)), json).await,
            "debian" => boot_debian(runs, memory.unwrap_or(Bytes::mib(512)), &firmware, json).await,
            other => anyhow::bail!("--image {other:?}: appliance or debian"),
        },
        BenchVerb::Checkpoint { runs, lab, json } => {
            crate::bench_checkpoint::run(runs, &lab, json).await
        }
        BenchVerb::Migrate {
            runs,
            modes,
            lab,
            json_file,
            json,
        } => crate::bench_migrate::run(runs, &modes, &lab, json_file, json).await,
        BenchVerb::Ha {
            runs,
            lab,
            json_file,
            json,
        } => crate::bench_ha::run(runs, &lab, json_file, json).await,
        BenchVerb::Downtime {
            runs,
            modes,
            memory,
            client_timeout,
            lab,
            json_file,
            html_file,
        } => {
            crate::bench_downtime::run(crate::bench_downtime::Options {
                runs,
                modes,
                memory,
                client_timeout,
                lab,
                json_file,
                html_file,
            })
            .await
        }
        BenchVerb::Faults { lab, json_file } => crate::bench_faults::run(&lab, json_file).await,
        BenchVerb::Chaos {
            trials,
            seed,
            lab,
            json_file,
        } => crate::bench_chaos::run(trials, seed, &lab, json_file).await,
        BenchVerb::Report {
            json_file,
            html_file,
        } => crate::bench_downtime::reprint(&json_file, html_file.as_deref()),
        BenchVerb::Api {
            vms,
            requests,
            lab,
            json,
        } => api_latency(vms, requests, &lab, json).await,
    }
}

async fn boot(runs: u32, memory: Bytes, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let appliance = Appliance::load(&defaults::appliance_dir())?;
    let accel = defaults::detect_accel(&appliance).await?;
    let dir = defaults::run_dir().join("bench-boot");
    // A leftover is harmless: it is replaced or cleaned on the next run.
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        tracing::debug!("a leftover is harmless: {error}");
    }
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
    let report = BootReport {
        accel: accel.accel.qemu_name().into(),
        memory_mib: memory.as_mib(),
        first_boot_s,
        median_s: median(boots_s.iter().copied()),
        worst_s: maximum(boots_s.iter().copied()),
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
    let stop_median = median(report.graceful_stop_s.iter().copied());
    println!("  graceful stop (ACPI), median        {stop_median:.2} s");
    Ok(())
}

/// `ferry bench boot --image debian`: the Debian guest from power-on to its agent.
async fn boot_debian(runs: u32, memory: Bytes, firmware: &str, json: bool) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let uefi = match firmware {
        "bios" => false,
        "uefi" => true,
        other => anyhow::bail!("--firmware {other:?}: bios or uefi"),
    };
    let image = ferry_lab::debian::cached(&defaults::debian_image_dir()).ok_or_else(|| {
        anyhow::anyhow!("the Debian image is not built; run `ferry image build-debian` first")
    })?;
    let appliance = Appliance::load(&defaults::appliance_dir())?;
    let accel = defaults::detect_accel(&appliance).await?.accel;
    let rig = ferry_lab::disk_boot::DiskBoot {
        image: image.path.clone(),
        uefi,
        memory,
        accel,
        qemu: defaults::qemu_binary(),
        dir: defaults::run_dir().join(format!("bench-boot-debian-{firmware}")),
    };
    let times = rig
        .run(runs, |run, took| {
            if !json {
                eprintln!("boot {run}/{runs}: {took:.2} s");
            }
        })
        .await
        .map_err(|error| anyhow::anyhow!("Debian boot: {error}"))?;
    let median_s = median(times.boots_s.iter().copied());
    let worst_s = maximum(times.boots_s.iter().copied());
    if json {
        return print_json(&serde_json::json!({
            "image": "debian-12",
            "firmware": firmware,
            "accel": accel.qemu_name(),
            "memory_mib": memory.as_mib(),
            "first_boot_s": times.first_boot_s,
            "boots_s": times.boots_s,
            "median_s": median_s,
            "worst_s": worst_s,
            "graceful_stop_s": times.graceful_stop_s,
        }));
    }
    println!(
        "Debian 12 boot to guest agent, {firmware}, {} MiB, {}:",
        memory.as_mib(),
        accel.qemu_name()
    );
    println!(
        "  first boot (cloud-init's first run)  {:.2} s",
        times.first_boot_s
    );
    println!("  later boots, median                  {median_s:.2} s");
    println!("  later boots, worst                   {worst_s:.2} s");
    Ok(())
}

#[derive(Serialize)]
struct ApiLatencyReport {
    vms: u32,
    requests: u32,
    /// Requests on one kept-alive TLS connection.
    median_ms: f64,
    p95_ms: f64,
    worst_ms: f64,
    /// Each request on a new connection: the TLS handshake (with the CA check) included.
    new_connection_median_ms: f64,
    new_connection_p95_ms: f64,
}

/// Registers `count` stopped VMs straight in etcd (as the API would, minus the boot),
/// times `vm list` through the API, and removes them again.
async fn api_latency(count: u32, requests: u32, lab_name: &str, json: bool) -> anyhow::Result<()> {
    use ferry_model::cluster::{PowerState, VmRecord, RECORD_VERSION};
    anyhow::ensure!(requests >= 1, "--requests must be at least 1");
    let lab = ferry_lab::lab::Lab::load(&defaults::lab_dir().join(lab_name))?;
    let store = lab.store().await?;
    let client = ferry_lab::harness::lab::host_client(&lab, 1)?;
    let image = store
        .get::<ferry_model::cluster::ImageRecord>(&store.keys().image("appliance"))
        .await?
        .ok_or_else(|| anyhow::anyhow!("lab {lab_name} has no appliance image"))?
        .value;
    let ferry_model::cluster::ImageContent::Appliance { kernel, initrd, .. } = &image.content
    else {
        anyhow::bail!("image appliance of lab {lab_name} is not the appliance");
    };
    let names: Vec<ferry_model::VmName> = (0..count)
        .map(|index| format!("bench-api-{index}").parse())
        .collect::<Result<_, _>>()?;
    for name in &names {
        let record = VmRecord {
            version: RECORD_VERSION,
            spec: ferry_model::VmSpec {
                name: name.clone(),
                cpus: 1,
                memory: Bytes::mib(32),
                cpu_model: ferry_model::vm_default_cpu_model(),
                disks: vec![],
                nics: vec![],
                boot: ferry_model::Boot::Kernel {
                    kernel: kernel.clone(),
                    initrd: Some(initrd.clone()),
                    cmdline: String::new(),
                },
                firmware: Default::default(),
                cdroms: Vec::new(),
                boot_order: ferry_model::default_boot_order(),
                guest_agent: true,
                stop_command: None,
            },
            desired: PowerState::Stopped,
            image: image.name.clone(),
            preferred_host: None,
            ip: None,
            addresses: Vec::new(),
            deleting: false,
            reset_serial: 0,
            resume_checkpoint: None,
            migration: Default::default(),
            ha: Default::default(),
            project: ferry_model::access::default_project(),
        };
        store
            .create(&store.keys().vm_spec(name), &record, &format!("VM {name}"))
            .await?;
    }
    let result = async {
        // Let the manager place them, so the list shows what a real cluster would.
        let deadline = Instant::now() + Duration::from_secs(30);
        while client
            .list_vms()
            .await?
            .iter()
            .filter(|vm| vm.name.starts_with("bench-api-") && vm.host.is_some())
            .count()
            < count as usize
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the manager did not place the VMs within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut samples = Vec::new();
        for _ in 0..requests {
            let started = Instant::now();
            client.list_vms().await?;
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        let mut fresh = Vec::new();
        for _ in 0..requests {
            let started = Instant::now();
            ferry_lab::harness::lab::host_client(&lab, 1)?
                .list_vms()
                .await?;
            fresh.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        Ok((samples, fresh))
    }
    .await;
    for name in &names {
        remove_bench_vm(&client, name.as_str()).await;
    }
    let (samples, fresh) = result?;
    let report = ApiLatencyReport {
        vms: count,
        requests,
        median_ms: median(samples.iter().copied()),
        p95_ms: percentile(samples.iter().copied(), 95),
        worst_ms: maximum(samples),
        new_connection_median_ms: median(fresh.iter().copied()),
        new_connection_p95_ms: percentile(fresh.iter().copied(), 95),
    };
    if json {
        return print_json(&report);
    }
    println!(
        "GET /api/v1/vms with {} VMs registered, {} requests:",
        report.vms, report.requests
    );
    println!(
        "  one kept-alive TLS connection: median {:.1} ms, p95 {:.1} ms, worst {:.1} ms",
        report.median_ms, report.p95_ms, report.worst_ms
    );
    println!(
        "  a new TLS connection each:     median {:.1} ms, p95 {:.1} ms",
        report.new_connection_median_ms, report.new_connection_p95_ms
    );
    Ok(())
}
