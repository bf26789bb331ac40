//! `ferry lab demo`: the tour. For now: build nothing that is already built, boot one
//! appliance VM, show it answering through the guest agent and through ferry-guest,
//! and shut it down gracefully.

use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_lab::appliance::{self, Appliance, BuildRequest};
use ferry_lab::defaults;
use ferry_lab::sandbox::{Method, Sandbox, SandboxOptions};
use ferry_model::Bytes;

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
        "appliance: kernel {}, initramfs {:.1} MiB, in {}",
        appliance.manifest.kernel_release,
        appliance.manifest.initrd_bytes as f64 / 1048576.0,
        appliance.dir.display()
    );

    step("choosing KVM or TCG (functional probe)");
    let accel = defaults::detect_accel(&appliance).await?;
    println!("{}: {}", accel.accel.qemu_name(), accel.reason);

    step("booting one appliance VM (256 MiB, 1 vCPU) in its own network namespace");
    let dir = defaults::run_dir().join("demo");
    let _ = std::fs::remove_dir_all(&dir);
    let options = SandboxOptions {
        qemu: defaults::qemu_binary(),
        accel: accel.accel,
        memory: Bytes::mib(256),
        data_disk: Bytes(Bytes::GIB),
        dir,
    };
    let started = Instant::now();
    let sandbox = Sandbox::start("demo", &appliance, options)
        .await
        .context("cannot start the demo VM")?;
    let result = tour(&sandbox, started).await;
    if result.is_err() {
        let _ = sandbox.destroy().await;
        return result;
    }

    step("graceful stop (ACPI power button)");
    let machine = sandbox.machine()?;
    let stopping = Instant::now();
    let outcome = machine.stop(Duration::from_secs(30)).await?;
    println!(
        "stopped: {outcome:?} after {:.1} s",
        stopping.elapsed().as_secs_f64()
    );
    let console = std::fs::read_to_string(sandbox.run_dir().console_log()).unwrap_or_default();
    if let Some(line) = console
        .lines()
        .find(|line| line.contains("stopped cleanly"))
    {
        println!("guest console: {}", line.trim());
    }
    sandbox.destroy().await?;
    println!("\nDone: the VM, its namespace and its files are gone.");
    Ok(())
}

async fn tour(sandbox: &Sandbox, started: Instant) -> anyhow::Result<()> {
    let machine = sandbox.machine()?;
    println!(
        "QEMU pid {}, run directory {}",
        machine.pid(),
        sandbox.run_dir().path().display()
    );
    sandbox.wait_ready(Duration::from_secs(60)).await?;
    println!(
        "guest ready {:.1} s after QEMU started",
        started.elapsed().as_secs_f64()
    );
    println!(
        "QMP: status {:?}, QEMU {}",
        machine.status().await?,
        machine.qmp().qemu_version()
    );

    step("the guest agent (qemu-ga over virtio-serial)");
    let agent = machine.guest_agent();
    let ping = Instant::now();
    agent.ping(Duration::from_secs(10)).await?;
    println!(
        "guest-ping answered in {:.1} ms",
        ping.elapsed().as_secs_f64() * 1000.0
    );
    let uname = agent
        .exec("/bin/uname", &["-a"], Duration::from_secs(10))
        .await?;
    println!("guest-exec uname -a: {}", uname.stdout.trim());
    for interface in agent.network_interfaces(Duration::from_secs(10)).await? {
        let addresses: Vec<String> = interface
            .ip_addresses
            .iter()
            .map(|ip| format!("{}/{}", ip.address, ip.prefix))
            .collect();
        println!("interface {}: {}", interface.name, addresses.join(", "));
    }

    step(&format!(
        "ferry-guest at {} (from the host side of the VM's tap)",
        sandbox.guest_url()
    ));
    let (status, body) = sandbox.http(
        Method::PUT,
        "/kv/greeting",
        Some(b"hello from the host".to_vec()),
    )?;
    println!(
        "PUT /kv/greeting -> {status} {}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = sandbox.http(Method::GET, "/kv/greeting", None)?;
    println!(
        "GET /kv/greeting -> {status} {}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = sandbox.http(Method::GET, "/health", None)?;
    println!("GET /health -> {status} {}", String::from_utf8_lossy(&body));
    Ok(())
}
