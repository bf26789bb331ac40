//! VMs in the lab: created through the API, placed on a host namespace, reachable from
//! this machine over the business switch, kept running through an agent crash, and gone
//! with `lab down`. Needs root and the appliance (the README's test command builds it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{alive, running, LabGuard};
use ferry_api::types::CreateVmRequest;
use ferry_lab::appliance::Appliance;
use ferry_lab::lab::{Fault, Lab, LabSpec};

async fn workload(
    http: &reqwest::Client,
    ip: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String) {
    let url = format!("http://{ip}:8080{path}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = match body {
            Some(body) => http.put(&url).body(body.to_string()),
            None => http.get(&url),
        };
        match request.send().await {
            Ok(response) => return (response.status().as_u16(), response.text().await.unwrap()),
            // ferry-guest starts a moment after the guest agent answers.
            Err(error) if Instant::now() < deadline && error.is_connect() => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(error) => panic!("{url}: {error}"),
        }
    }
}

#[tokio::test]
async fn a_lab_vm_answers_on_the_business_network_survives_its_agent_and_goes_with_the_lab() {
    let spec = LabSpec {
        ferry_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_ferry"))),
        ..LabSpec::for_test(7)
    };
    let appliance = Appliance::load(&ferry_lab::defaults::appliance_dir()).expect("the appliance");
    let _guard = LabGuard(spec.state_dir.clone());
    let mut lab = Lab::up(&spec, &appliance).await.unwrap();
    let client = ferry_lab::harness::lab::host_client(&lab, 1).unwrap();

    let request = CreateVmRequest {
        name: "web".into(),
        image: Some("appliance".into()),
        cpus: 1,
        memory: "256M".into(),
        host: Some("host2".into()),
        ..Default::default()
    };
    client.create_vm(&request).await.unwrap();
    let vm = running(&client, "web").await;
    assert_eq!(
        vm.host.as_deref(),
        Some("host2"),
        "the preferred host had room"
    );
    let ip = vm.ip.clone().unwrap();
    assert!(
        ip.starts_with(&format!("10.{}.2.", spec.subnet_base)),
        "{ip} is on the lab's business network"
    );

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert_eq!(workload(&http, &ip, "/kv/k", Some("v")).await.0, 200);
    assert_eq!(
        workload(&http, &ip, "/kv/k", None).await,
        (200, "v".to_string())
    );
    let (_, health) = workload(&http, &ip, "/health", None).await;
    let boot_id = serde_json::from_str::<serde_json::Value>(&health).unwrap()["boot_id"]
        .as_str()
        .unwrap()
        .to_string();

    // The agent of host2 crashes and comes back: the VM never stops.
    let killed_ms = ferry_model::cluster::now_ms();
    lab.fault(2, Fault::AgentKill).unwrap();
    assert_eq!(
        workload(&http, &ip, "/kv/k", None).await.0,
        200,
        "served while its agent is down"
    );
    lab.heal(2).unwrap();
    // The old registration outlives the killed agent by up to a lease TTL; wait for the new one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.list_events(200).await.unwrap().iter().any(|event| {
        event.subject == "host/host2" && event.kind == "registered" && event.at_ms > killed_ms
    }) {
        assert!(Instant::now() < deadline, "host2's agent did not come back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = running(&client, "web").await;
    assert_eq!(after.pid, vm.pid, "same QEMU");
    let (_, health) = workload(&http, &ip, "/health", None).await;
    assert!(health.contains(&boot_id), "same boot: {health}");

    let pid = after.pid.unwrap();
    lab.down().unwrap();
    assert!(!alive(pid), "lab down kills the lab's QEMUs");
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap()
}

/// A guest that floods its serial console and answers its guest agent with far more
/// than a reply may hold: the agent's memory stays bounded, the console log is
/// rotated, and the host keeps serving the API.
#[tokio::test]
async fn a_guest_flooding_its_console_and_its_guest_agent_leaves_the_agent_bounded_and_serving() {
    let (lab, _guard, client) = common::lab(8, 1).await;
    let vm = common::vm_on(&client, "noisy", "host1").await;
    assert!(vm.guest_agent, "{vm:?}");
    let agent = lab.state().agents[&1].pid;
    let before = rss_kib(agent);

    // The console: as fast as the guest can write, beside the rest, until told to stop.
    let flood = ferry_api::types::ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            "while [ ! -e /tmp/enough ]; do cat /proc/cpuinfo /proc/meminfo; done \
             > /dev/console 2>&1"
                .into(),
        ],
        timeout_seconds: Some(300),
    };
    let flooding = {
        let client = client.clone();
        tokio::spawn(async move { client.exec_vm("noisy", &flood).await })
    };
    // The guest agent: 8 MiB of output per command, past what a reply may hold.
    let big = ferry_api::types::ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            "head -c 8388608 /dev/zero | tr '\\0' x".into(),
        ],
        timeout_seconds: Some(60),
    };
    let console_log = lab.spec().host_run_dir(1).join("vms/noisy/console.log");
    let rotated = console_log.with_extension("log.1");
    let mut largest_log = 0;
    // Six rounds at least, and on until the log has been rotated (a slow guest under a
    // loaded host writes less per round).
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut rounds = 0;
    while rounds < 6 || (!rotated.exists() && Instant::now() < deadline) {
        rounds += 1;
        match client.exec_vm("noisy", &big).await {
            // Cut at the cap, with the marker…
            Ok(output) => {
                assert!(
                    output.stdout.len() <= 1024 * 1024 + 64,
                    "{}",
                    output.stdout.len()
                );
                assert!(output.stdout.ends_with("[output truncated]\n"));
            }
            // …or refused whole as a reply over the limit: either way, not held.
            Err(error) => assert!(error.to_string().contains("limit"), "{error}"),
        }
        // The host keeps serving.
        assert_eq!(client.get_vm("noisy").await.unwrap().state, "running");
        client.list_hosts().await.unwrap();
        largest_log = largest_log.max(std::fs::metadata(&console_log).map_or(0, |meta| meta.len()));
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let stop = ferry_api::types::ExecRequest {
        command: vec!["touch".into(), "/tmp/enough".into()],
        timeout_seconds: Some(30),
    };
    client.exec_vm("noisy", &stop).await.unwrap();
    let flooded = flooding.await.unwrap().unwrap();
    assert_eq!(flooded.exit_code, Some(0), "{flooded:?}");
    let after = rss_kib(agent);
    assert!(
        after < before + 64 * 1024,
        "the agent grew from {before} KiB to {after} KiB"
    );
    assert!(
        rotated.exists(),
        "the flooded console log was never rotated (at most {largest_log} bytes)"
    );
    assert!(
        largest_log < 16 * 1024 * 1024,
        "the console log reached {largest_log} bytes"
    );
    eprintln!("agent RSS {before} KiB → {after} KiB; console log at most {largest_log} bytes");
}
