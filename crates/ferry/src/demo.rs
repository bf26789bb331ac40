//! `ferry lab demo`: the tour. Builds what is missing (the appliance, the lab), then on
//! a 3-host lab: creates two HA VMs and talks to them from this machine (the admin
//! workstation on the business switch) and through their guest agents; live-migrates
//! one and quick-migrates the other while a client writes to them; powers off a host
//! and shows its VMs back elsewhere; and runs a one-run downtime benchmark next to
//! the reference numbers, with an HTML report. It leaves the lab running for the user
//! to explore.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, ExecRequest, VmView};
use ferry_api::ApiError;
use ferry_lab::appliance::Appliance;
use ferry_lab::defaults;
use ferry_lab::flows::{lost_writes, Flow, SCENARIOS};
use ferry_lab::harness::faults::heal_and_wait;
use ferry_lab::harness::lab::{lab_client, load_or_build_appliance};
use ferry_lab::harness::vm::{start_migration, wait_answering};
use ferry_lab::lab::{Lab, LabSpec};

use crate::output::step;

/// The tour's VMs: name and HA priority (the higher restarts first).
const DEMO_VMS: [(&str, i32); 2] = [("demo-1", 10), ("demo-2", 5)];
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn demo() -> anyhow::Result<()> {
    let tour_started = Instant::now();
    let appliance = load_or_build_appliance(step).await?;
    println!(
        "appliance: kernel {}, initramfs {:.1} MiB",
        appliance.manifest.kernel_release,
        appliance.manifest.initrd_bytes as f64 / 1048576.0,
    );

    let mut lab = lab_for_tour(&appliance).await?;
    let spec = lab.spec().clone();
    anyhow::ensure!(spec.hosts >= 3, "the tour needs a lab of 3 hosts");
    let client = lab_client(&lab)?;

    step("the hosts (`ferry host list`)");
    println!(
        "{}",
        crate::cluster::hosts_table(&client.list_hosts().await?)
    );

    let vms = create_vms(&client).await?;
    step("where they run (`ferry vm list`)");
    println!("{}", crate::cluster::vms_table(&client.list_vms().await?));
    greet(&vms).await?;

    step("a command in a guest through its guest agent (`ferry vm exec demo-1 -- uname -r`)");
    let exec = ExecRequest {
        command: vec!["/bin/uname".into(), "-r".into()],
        timeout_seconds: Some(20),
    };
    let output = client.exec_vm("demo-1", &exec).await?;
    println!("{}", output.stdout.trim());

    step("live migration of demo-1 while a client writes to it every 0.5 s (`ferry vm migrate demo-1 --to …`)");
    migrate_under_load(&client, "demo-1", "live", "db-every-0.5s").await?;
    step("quick migration of demo-2 (saved to shared storage, resumed elsewhere) while a client sends it HTTP requests");
    migrate_under_load(&client, "demo-2", "quick", "http-every-0.5s").await?;

    power_off_host(&mut lab, &client).await?;

    step("a short downtime benchmark: seven workloads, one run each, live and quick migration and the bare-QEMU baseline (`ferry bench downtime --runs 1`)");
    let reports = defaults::reports_dir();
    std::fs::create_dir_all(&reports)
        .with_context(|| format!("cannot create {}", reports.display()))?;
    let html = reports.join("downtime-demo.html");
    crate::bench_downtime::run(crate::bench_downtime::Options {
        runs: 1,
        modes: vec!["live".into(), "quick".into(), "qemu".into()],
        memory: "256M".into(),
        client_timeout: CLIENT_TIMEOUT,
        lab: spec.name.clone(),
        json_file: Some(reports.join("downtime-demo.json")),
        html_file: Some(html.clone()),
    })
    .await?;

    println!(
        "\nThe tour took {:.0} s. The HTML report with the charts is {}.\n\
         The lab is still running. Explore it with `ferry host list`, `ferry vm list`, `ferry events`,\n\
         `ferry vm exec demo-2 -- cat /proc/uptime`, `ferry vm migrate demo-1 --to host3`, `ferry lab fault host2 power-off` …\n\
         The full benchmark (3 runs, with HA) is `ferry bench downtime --html report.html`.\n\
         Remove everything the lab made with `ferry lab down`.",
        tour_started.elapsed().as_secs_f64(),
        html.display(),
    );
    Ok(())
}

/// The default lab: reused when an earlier tour left it whole, rebuilt when a run that
/// was interrupted or failed left it broken (an agent or etcd down, a host cut off or
/// powered off, records this build cannot read).
async fn lab_for_tour(appliance: &Appliance) -> anyhow::Result<Lab> {
    let spec = LabSpec::default();
    if Lab::exists(&spec.state_dir) {
        let lab = Lab::load(&spec.state_dir)?;
        match lab.unhealthy().await {
            None => {
                step(&format!(
                    "lab {} is already up and whole; using it",
                    spec.name
                ));
                return Ok(lab);
            }
            Some(reason) => {
                step(&format!(
                    "lab {} is left from an earlier run but {reason}; rebuilding it",
                    spec.name
                ));
                lab.down().context("ferry lab down")?;
            }
        }
    }
    step(&format!(
        "building lab {}: {} hosts in network namespaces, three switches, etcd, one agent per host",
        spec.name, spec.hosts
    ));
    ferry_lab::lab::require_root(&spec)?;
    let started = Instant::now();
    let lab = Lab::up(&spec, appliance).await.context("ferry lab up")?;
    println!("lab up in {:.1} s", started.elapsed().as_secs_f64());
    Ok(lab)
}

/// Creates the tour's HA VMs, first removing any an earlier tour left (whatever state
/// it left them in), and waits until each answers.
async fn create_vms(client: &ApiClient) -> anyhow::Result<Vec<VmView>> {
    step("creating two HA VMs from the appliance (`ferry vm create demo-1 --ha --priority 10 …`)");
    let mut vms = Vec::new();
    for (name, priority) in DEMO_VMS {
        let started = Instant::now();
        let request = CreateVmRequest {
            name: name.into(),
            image: Some("appliance".into()),
            cpus: 1,
            memory: "256M".into(),
            ha: true,
            ha_priority: priority,
            ..Default::default()
        };
        match client.delete_vm(name).await {
            Ok(_) => println!("{name}: removed the one an earlier tour left"),
            Err(ApiError::NotFound(_)) => {}
            Err(error) => {
                return Err(
                    anyhow::Error::from(error).context(format!("removing the earlier {name}"))
                )
            }
        }
        client.create_vm(&request).await?;
        let vm = wait_answering(client, name).await?;
        println!(
            "{name}: running on {} at {}, answering {:.1} s after create",
            vm.host.as_deref().unwrap_or("-"),
            vm.ip.as_deref().unwrap_or("-"),
            started.elapsed().as_secs_f64()
        );
        vms.push(vm);
    }
    Ok(vms)
}

/// A KV write and read through each VM's ferry-guest, from this machine.
async fn greet(vms: &[VmView]) -> anyhow::Result<()> {
    step("a KV write and read through each VM's ferry-guest, from this machine over the business switch");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    for vm in vms {
        let ip = vm.ip.as_deref().context("the VM has no address")?;
        wait_for_workload(&http, ip).await?;
        let url = format!("http://{ip}:8080/kv/greeting");
        let value = format!("hello {} on {}", vm.name, vm.host.as_deref().unwrap_or("?"));
        let put = http
            .put(&url)
            .body(value.clone())
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        println!(
            "PUT {url} -> {} {}",
            put.status().as_u16(),
            put.text().await.unwrap_or_default()
        );
        let got = read_greeting(&http, ip).await?;
        println!("GET {url} -> {got}");
        anyhow::ensure!(
            got == value,
            "VM {} returned {got:?} instead of {value:?}",
            vm.name
        );
    }
    Ok(())
}

async fn read_greeting(http: &reqwest::Client, ip: &str) -> anyhow::Result<String> {
    let url = format!("http://{ip}:8080/kv/greeting");
    Ok(http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .text()
        .await?)
}

/// Moves `vm` to another host in `mode` while the `scenario` flow runs against it, and
/// prints what the client saw.
async fn migrate_under_load(
    client: &ApiClient,
    vm: &str,
    mode: &str,
    scenario: &str,
) -> anyhow::Result<()> {
    let view = wait_answering(client, vm).await?;
    let ip = view.ip.clone().context("the VM has no address")?;
    let from = view.host.clone().unwrap_or_default();
    let to = client
        .list_hosts()
        .await?
        .into_iter()
        .map(|host| host.name)
        .find(|host| *host != from)
        .context("no other host to move to")?;
    let scenario = SCENARIOS
        .into_iter()
        .find(|known| known.name == scenario)
        .context("unknown workload")?;
    let flow = Flow::start(&ip, scenario, &format!("demo-{mode}-"), CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = start_migration(client, vm, &to, mode).await?;
    let op = crate::ops::follow(client, &started.id, false).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = flow.stop().await;
    anyhow::ensure!(
        op.status == "completed",
        "migration of {vm} {}: {}",
        op.status,
        op.error.unwrap_or_default()
    );
    let lost = lost_writes(&ip, &log).await.map_err(anyhow::Error::msg)?;
    println!(
        "{vm}: {from} → {to} in {:.1} s; QEMU downtime {} ms. The client: {} operations, longest pause {:.2} s, {} failed, {} acknowledged writes lost",
        op.total_ms.unwrap_or(0) as f64 / 1000.0,
        op.qemu_downtime_ms.map_or("-".into(), |ms| ms.to_string()),
        log.operations,
        log.downtime().as_secs_f64(),
        log.failed.len(),
        lost.len(),
    );
    Ok(())
}

/// Powers off demo-1's host, waits until its HA VMs answer elsewhere with their data,
/// and powers the host back on.
async fn power_off_host(lab: &mut Lab, client: &ApiClient) -> anyhow::Result<()> {
    let victim = wait_answering(client, "demo-1")
        .await?
        .host
        .context("demo-1 has no host")?;
    let mut on_victim = Vec::new();
    for (name, _) in DEMO_VMS {
        if client.get_vm(name).await?.host.as_deref() == Some(victim.as_str()) {
            on_victim.push(name);
        }
    }
    step(&format!(
        "powering off {victim} (`ferry lab fault {victim} power-off`), where {} {}",
        on_victim.join(" and "),
        if on_victim.len() == 1 { "runs" } else { "run" }
    ));
    let number = lab.spec().parse_host(&victim).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    lab.fault(number, ferry_lab::lab::Fault::PowerOff)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(100));
    for name in &on_victim {
        spinner.set_message(format!("waiting for {name} to run elsewhere"));
        let deadline = Instant::now() + Duration::from_secs(120);
        let vm = loop {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{name} was not back 120 s after {victim} powered off"
            );
            if let Ok(vm) = client.get_vm(name).await {
                let ip = vm.ip.clone().unwrap_or_default();
                if vm.host.as_deref().is_some_and(|host| host != victim)
                    && vm.state == "running"
                    && read_greeting(&http, &ip).await.is_ok()
                {
                    break vm;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        spinner.suspend(|| {
            println!(
                "{name}: back on {} {:.1} s after the power-off (lease expiry, fence, restart, guest boot)",
                vm.host.as_deref().unwrap_or("?"),
                started.elapsed().as_secs_f64()
            )
        });
        let greeting = read_greeting(&http, vm.ip.as_deref().unwrap_or_default()).await?;
        spinner.suspend(|| println!("{name}: its data survived: greeting = {greeting:?}"));
    }
    spinner.finish_and_clear();
    println!("the leader's events (`ferry events`):");
    let events = client.list_events(50).await.unwrap_or_default();
    let recent: Vec<_> = events
        .into_iter()
        .filter(|event| {
            ["host-fate", "fencing", "fenced-off", "ha-restart"].contains(&event.kind.as_str())
        })
        .collect();
    for event in recent.iter().rev().take(6).rev() {
        println!("  {} {} {}", event.kind, event.subject, event.message);
    }
    step(&format!(
        "powering {victim} back on (`ferry lab heal {victim}`)"
    ));
    heal_and_wait(lab, client, &victim).await?;
    println!("{victim} is back in the cluster");
    Ok(())
}

/// Waits until ferry-guest in the VM answers (it starts a moment after the guest agent).
async fn wait_for_workload(http: &reqwest::Client, ip: &str) -> anyhow::Result<()> {
    let url = format!("http://{ip}:8080/health");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match http.get(&url).send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(_) | Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Ok(response) => anyhow::bail!("{url} answers {}", response.status()),
            Err(error) => {
                return Err(anyhow::Error::new(error).context(format!("{url} does not answer")))
            }
        }
    }
}
