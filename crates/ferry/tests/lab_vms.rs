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
