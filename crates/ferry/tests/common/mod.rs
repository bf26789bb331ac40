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
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Live QEMUs of this lab by VM name, from the process list.
pub fn lab_qemus(run_root: &std::path::Path) -> std::collections::BTreeMap<String, Vec<i32>> {
    let root = run_root.to_string_lossy().to_string();
    let mut found: std::collections::BTreeMap<String, Vec<i32>> = Default::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let ours = args.first().is_some_and(|bin| bin.contains("qemu-system"))
            && args.iter().any(|arg| arg.contains(&root));
        let name = args
            .iter()
            .find_map(|arg| arg.strip_prefix("guest="))
            .and_then(|rest| rest.split(',').next());
        if let (true, Some(name)) = (ours, name) {
            if alive(pid) {
                found.entry(name.to_string()).or_default().push(pid);
            }
        }
    }
    found
}

/// Watches, every 50 ms, that no VM of the lab ever has two live QEMUs at once.
pub struct DoubleRunWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl DoubleRunWatch {
    pub fn start(run_root: PathBuf) -> DoubleRunWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (vm, pids) in lab_qemus(&run_root) {
                    if pids.len() > 1 {
                        seen.push(format!("VM {vm} ran in QEMUs {pids:?} at once"));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            seen
        });
        DoubleRunWatch { stop, task }
    }

    /// Stops watching and fails the test if a VM ever ran twice.
    pub async fn assert_never_twice(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let seen = self.task.await.unwrap();
        assert!(seen.is_empty(), "{}", seen.join("\n"));
    }
}
