//! `ferry lab demo`: the tour. Builds what is missing (the appliance, the lab), creates
//! two VMs on a 3-host lab, shows where they run and their addresses, and talks to each
//! one's ferry-guest from this machine (the admin workstation on the business switch)
//! and through its guest agent. It leaves the lab running for the user to explore.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, ExecRequest, VmView};
use ferry_api::ApiError;
use ferry_lab::appliance::{self, Appliance, BuildRequest};
use ferry_lab::defaults;
use ferry_lab::lab::{Lab, LabSpec};

pub fn step(text: &str) {
    println!("\n==> {text}");
}

/// The built appliance, built first (from Debian packages) if it is missing.
pub async fn load_or_build_appliance() -> anyhow::Result<Appliance> {
    if let Ok(appliance) = Appliance::load(&defaults::appliance_dir()) {
        return Ok(appliance);
    }
    step("building the test appliance from Debian packages");
    let guest_binary = std::env::current_exe()?.with_file_name("ferry-guest");
    let request = BuildRequest {
        out_dir: defaults::appliance_dir(),
        cache_dir: defaults::cache_dir(),
        guest_binary,
    };
    Ok(tokio::task::spawn_blocking(move || appliance::build(&request)).await??)
}

pub async fn demo() -> anyhow::Result<()> {
    let appliance = load_or_build_appliance().await?;
    println!(
        "appliance: kernel {}, initramfs {:.1} MiB",
        appliance.manifest.kernel_release,
        appliance.manifest.initrd_bytes as f64 / 1048576.0,
    );

    let spec = LabSpec::default();
    let lab = if Lab::exists(&spec.state_dir) {
        step(&format!("lab {} is already up; using it", spec.name));
        Lab::load(&spec.state_dir)?
    } else {
        step(&format!("building lab {}: {} hosts in network namespaces, three switches, etcd, one agent per host", spec.name, spec.hosts));
        ferry_lab::lab::require_root(&spec)?;
        let started = Instant::now();
        let lab = Lab::up(&spec, &appliance).await.context("ferry lab up")?;
        println!("lab up in {:.1} s", started.elapsed().as_secs_f64());
        lab
    };
    let spec = lab.spec().clone();
    let token = lab.token().context("the lab has no API token")?.to_string();
    let client = ApiClient::new(&spec.api_url(1), &token);

    step("the hosts (`ferry host list`)");
    println!(
        "{}",
        crate::cluster::hosts_table(&client.list_hosts().await?)
    );

    step("creating two VMs from the appliance (`ferry vm create demo-1 …`)");
    let mut vms = Vec::new();
    for name in ["demo-1", "demo-2"] {
        let started = Instant::now();
        let request = CreateVmRequest {
            name: name.into(),
            image: "appliance".into(),
            cpus: 1,
            memory: "256M".into(),
            host: None,
            ..Default::default()
        };
        match client.create_vm(&request).await {
            Ok(_) => {}
            Err(ApiError::Conflict(message)) if message.contains("already exists") => {
                println!("{name} exists already")
            }
            Err(error) => return Err(error.into()),
        }
        let vm = wait_answering(&client, name).await?;
        println!(
            "{name}: running on {} at {}, answering {:.1} s after create",
            vm.host.as_deref().unwrap_or("-"),
            vm.ip.as_deref().unwrap_or("-"),
            started.elapsed().as_secs_f64()
        );
        vms.push(vm);
    }

    step("where they run (`ferry vm list`)");
    println!("{}", crate::cluster::vms_table(&client.list_vms().await?));

    step("a KV write and read through each VM's ferry-guest, from this machine over the business switch");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    for vm in &vms {
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
        let got = http
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await?;
        println!("GET {url} -> {got}");
        anyhow::ensure!(
            got == value,
            "VM {} returned {got:?} instead of {value:?}",
            vm.name
        );
    }

    step("a command in a guest through its guest agent (`ferry vm exec demo-1 -- uname -r`)");
    let exec = ExecRequest {
        command: vec!["/bin/uname".into(), "-r".into()],
        timeout_seconds: Some(20),
    };
    let output = client.exec_vm("demo-1", &exec).await?;
    println!("{}", output.stdout.trim());

    println!(
        "\nThe lab is still running. Explore it with `ferry host list`, `ferry vm list`, `ferry events`,\n`ferry vm exec demo-2 -- cat /proc/uptime`, `ferry lab fault host2 power-off` …\nRemove everything it made with `ferry lab down`."
    );
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

/// Waits until the VM runs and its guest agent answers.
pub async fn wait_answering(client: &ApiClient, name: &str) -> anyhow::Result<VmView> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let vm = client.get_vm(name).await?;
        if vm.state == "running" && vm.guest_agent {
            return Ok(vm);
        }
        anyhow::ensure!(
            vm.state != "failed",
            "VM {name} failed: {}",
            vm.error.unwrap_or_default()
        );
        anyhow::ensure!(
            Instant::now() < deadline,
            "VM {name} still {} after 180 s",
            vm.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
