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
            let _ = lab.down();
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
    let client = ApiClient::new(&spec.api_url(1), lab.token().unwrap());
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
    client
        .create_vm(&CreateVmRequest {
            name: name.into(),
            image: "appliance".into(),
            cpus: 1,
            memory: "256M".into(),
            host: Some(host.into()),
            ..Default::default()
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
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}
