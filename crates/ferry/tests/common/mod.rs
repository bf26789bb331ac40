//! Helpers the lab tests share: a lab that is torn down however the test ends, and
//! waiting for a VM to run.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, VmView};
use ferry_lab::appliance::Appliance;
use ferry_lab::lab::{Lab, LabSpec};

/// Removes the lab when the test ends, however it ends.
pub struct LabGuard(pub PathBuf);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Ok(lab) = Lab::load(&self.0) {
            if let Err(error) = lab.down() {
                eprintln!("lab teardown: {error}");
            }
        }
    }
}

/// A lab of `hosts` hosts for test `index`, with its guard and a client of host1.
pub async fn lab(index: u32, hosts: u32) -> (Lab, LabGuard, ApiClient) {
    let spec = LabSpec {
        hosts,
        ferry_binary: Some(PathBuf::from(env!("CARGO_BIN_EXE_ferry"))),
        ..LabSpec::for_test(index)
    };
    let appliance = Appliance::load(&ferry_lab::defaults::appliance_dir()).expect("the appliance");
    let guard = LabGuard(spec.state_dir.clone());
    let lab = Lab::up(&spec, &appliance).await.unwrap();
    let client = ferry_lab::harness::lab::host_client(&lab, 1).unwrap();
    (lab, guard, client)
}

pub async fn running(client: &ApiClient, name: &str) -> VmView {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = client.get_vm(name).await.unwrap();
        if vm.state == "running" && vm.guest_agent {
            return vm;
        }
        assert!(Instant::now() < deadline, "VM {name}: {vm:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a 256 MiB appliance VM on `host` and waits until ferry-guest answers.
pub async fn vm_on(client: &ApiClient, name: &str, host: &str) -> VmView {
    create_on(client, name, host, CreateVmRequest::default()).await
}

/// Creates an HA VM (256 MiB appliance) on `host` and waits until ferry-guest answers.
pub async fn ha_vm_on(client: &ApiClient, name: &str, host: &str, priority: i32) -> VmView {
    let vm = create_on(
        client,
        name,
        host,
        CreateVmRequest {
            ha: true,
            ha_priority: priority,
            ..CreateVmRequest::default()
        },
    )
    .await;
    assert!(vm.ha);
    vm
}

/// Creates the appliance VM `extra` describes, named `name`, on `host`; waits for it.
async fn create_on(client: &ApiClient, name: &str, host: &str, extra: CreateVmRequest) -> VmView {
    client
        .create_vm(&CreateVmRequest {
            name: name.into(),
            image: Some("appliance".into()),
            cpus: 1,
            memory: "256M".into(),
            host: Some(host.into()),
            ..extra
        })
        .await
        .unwrap();
    let vm = running(client, name).await;
    assert_eq!(vm.host.as_deref(), Some(host));
    ferry_lab::workload::boot_id(vm.ip.as_deref().unwrap())
        .await
        .unwrap();
    vm
}

/// Alive and not a zombie (a killed QEMU whose first agent died is reaped by init, later).
pub fn alive(pid: i32) -> bool {
    ferry_lab::harness::double_run::alive(pid)
}

/// Live QEMUs of this lab by VM name, from the process list.
pub fn lab_qemus(run_root: &std::path::Path) -> std::collections::BTreeMap<String, Vec<i32>> {
    ferry_lab::harness::double_run::qemus_by_vm(run_root)
}

/// Watches, every 50 ms, that no VM of the lab ever has two live QEMUs at once.
pub struct DoubleRunWatch(ferry_lab::harness::double_run::DoubleRunWatch);

impl DoubleRunWatch {
    pub fn start(run_root: PathBuf) -> DoubleRunWatch {
        DoubleRunWatch(ferry_lab::harness::double_run::DoubleRunWatch::start(
            run_root,
        ))
    }

    /// Stops watching and fails the test if a VM ever ran twice.
    pub async fn assert_never_twice(self) {
        let seen = self.0.stop().await;
        assert!(seen.is_empty(), "{}", seen.join("\n"));
    }
}
