//! The safety core in the lab, with real etcd, agents and QEMU under TCG:
//! - a VM whose records cannot be read (a damaged value, a newer Ferry's record during
//!   a rolling upgrade) is left running where it runs, and HA carries on for the
//!   others: a host that powers off still gets its VMs restarted elsewhere.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::{alive, ha_vm_on, DoubleRunWatch};
use ferry_api::client::ApiClient;
use ferry_lab::lab::Fault;

#[tokio::test]
async fn unreadable_records_kill_no_vm_and_ha_carries_on_for_the_others() {
    let (mut lab, _guard, client) = common::lab(34, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let (kept, moved) = tokio::join!(
        ha_vm_on(&client, "kept", "host1", 0),
        ha_vm_on(&client, "moved", "host2", 0)
    );
    let kept_pid = kept.pid.unwrap();
    let store = lab.store().await.unwrap();
    let keys = store.keys().clone();
    let spec_key = keys.vm_spec(&"kept".parse().unwrap());
    let original = store
        .client()
        .get(spec_key.as_str(), None)
        .await
        .unwrap()
        .kvs()
        .first()
        .unwrap()
        .value()
        .to_vec();
    // Damage kept's spec; give a third VM a record from a newer Ferry.
    store
        .client()
        .put(spec_key.as_str(), b"{not a record".to_vec(), None)
        .await
        .unwrap();
    store
        .client()
        .put(
            keys.vm_placement(&"ghost".parse().unwrap()),
            br#"{"version":99,"host":"host1","generation":1,"phase":"assigned"}"#.to_vec(),
            None,
        )
        .await
        .unwrap();

    // HA goes on for the readable VM: its host powers off, it restarts elsewhere.
    lab.fault(2, Fault::PowerOff).unwrap();
    let survivor = ApiClient::new(&lab.spec().api_url(1), lab.token().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = survivor.get_vm("moved").await.unwrap();
        if vm.host.as_deref() != Some("host2") && vm.state == "running" && vm.guest_agent {
            break;
        }
        assert!(Instant::now() < deadline, "moved never left host2: {vm:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_ne!(moved.host, None);
    // Through all of it, the unreadable VM's QEMU ran on.
    assert!(alive(kept_pid), "the QEMU of the unreadable VM was killed");
    let events = survivor.list_events(500).await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| event.subject == "vm/kept" && event.kind == "record-unreadable"),
        "{events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|event| event.subject == "vm/kept" && event.kind == "stray-killed"),
        "{events:#?}"
    );

    // Mended, it is an ordinary VM again.
    store
        .client()
        .put(spec_key.as_str(), original, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let vm = survivor.get_vm("kept").await.unwrap();
    assert_eq!(
        (vm.pid, vm.host.as_deref()),
        (Some(kept_pid), Some("host1"))
    );
    watch.assert_never_twice().await;
}

/// A lab whose hosts have no fence device: only their watchdogs stop a hung host.
async fn lab_without_fence_devices(
    index: u32,
    hosts: u32,
) -> (ferry_lab::lab::Lab, common::LabGuard, ApiClient) {
    let spec = ferry_lab::lab::LabSpec {
        hosts,
        ferry_binary: Some(std::path::PathBuf::from(env!("CARGO_BIN_EXE_ferry"))),
        fence_devices: false,
        ..ferry_lab::lab::LabSpec::for_test(index)
    };
    let appliance = ferry_lab::appliance::Appliance::load(&ferry_lab::defaults::appliance_dir())
        .expect("the appliance");
    let guard = common::LabGuard(spec.state_dir.clone());
    let lab = ferry_lab::lab::Lab::up(&spec, &appliance).await.unwrap();
    let client = ApiClient::new(&spec.api_url(1), lab.token().unwrap());
    (lab, guard, client)
}

#[tokio::test]
async fn a_hung_agent_has_its_host_powered_off_by_the_watchdog_and_its_vm_restarts_elsewhere() {
    let (mut lab, _guard, client) = lab_without_fence_devices(35, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let vm = ha_vm_on(&client, "stuck", "host2", 0).await;
    let old_pid = vm.pid.unwrap();
    let agent = lab.state().agents[&2].pid;
    let hung = Instant::now();
    lab.fault(2, Fault::AgentHang).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = client.get_vm("stuck").await.unwrap();
        if vm.host.as_deref() != Some("host2") && vm.state == "running" && vm.guest_agent {
            break;
        }
        assert!(Instant::now() < deadline, "stuck never left host2: {vm:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "the hung host's VM runs elsewhere {:.1} s after the hang",
        hung.elapsed().as_secs_f64()
    );
    // The watchdog, not anyone's guess, stopped the host: agent and QEMU are gone.
    assert!(!alive(agent), "the hung agent was not powered off");
    assert!(!alive(old_pid), "the hung host's QEMU still runs");
    let log = std::fs::read_to_string(lab.spec().host_run_dir(2).join("watchdog.log")).unwrap();
    assert!(log.contains("not fed"), "{log}");
    watch.assert_never_twice().await;
}
