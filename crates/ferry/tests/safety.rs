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
    let survivor = ferry_lab::harness::lab::host_client(&lab, 1).unwrap();
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
    let client = ferry_lab::harness::lab::host_client(&lab, 1).unwrap();
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

#[tokio::test]
async fn a_wall_clock_step_of_a_minute_either_way_fences_and_moves_nothing() {
    let (mut lab, _guard, client) = common::lab(28, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let (one, two) = tokio::join!(
        ha_vm_on(&client, "one", "host1", 0),
        ha_vm_on(&client, "two", "host2", 0)
    );
    let before = common::lab_qemus(&lab.spec().run_dir);
    // host1's clock jumps a minute ahead (its lease would look a minute old), then a
    // minute behind (its lease would never look old): neither may change anything.
    for step_ms in [60_000, -60_000] {
        lab.fault(1, Fault::ClockStep(step_ms)).unwrap();
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(
            common::lab_qemus(&lab.spec().run_dir),
            before,
            "a clock step of {step_ms} ms stopped or started a QEMU"
        );
    }
    lab.heal(1).unwrap();
    let events = client.list_events(500).await.unwrap();
    assert!(
        !events
            .iter()
            .any(|event| ["fenced", "ha-restart", "host-fate"].contains(&event.kind.as_str())),
        "{events:#?}"
    );
    for (name, was) in [("one", one), ("two", two)] {
        let vm = client.get_vm(name).await.unwrap();
        assert_eq!((vm.host, vm.pid), (was.host, was.pid), "VM {name}");
    }
    watch.assert_never_twice().await;
}

/// Starts a slow live migration of `vm` to `to` and returns its op once memory flows.
async fn migration_under_way(client: &ApiClient, vm: &str, to: &str) -> ferry_api::types::OpView {
    let op = client
        .migrate_vm(
            vm,
            &ferry_api::types::MigrateRequest {
                to: Some(to.into()),
                mode: Some("live".into()),
                bandwidth: Some("8M".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = client.get_op(&op.id).await.unwrap();
        if now
            .progress
            .as_ref()
            .is_some_and(|progress| progress.transferred_bytes > 0)
        {
            return now;
        }
        assert!(Instant::now() < deadline, "no memory copied: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the op is final; returns it.
async fn final_op(client: &ApiClient, id: &str) -> ferry_api::types::OpView {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        if let Ok(op) = client.get_op(id).await {
            if ["completed", "failed", "cancelled"].contains(&op.status.as_str()) {
                return op;
            }
            assert!(Instant::now() < deadline, "op never ended: {op:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn an_agent_restarted_mid_migration_on_either_side_leaves_one_copy_and_a_final_op() {
    let (mut lab, _guard, client) = common::lab(27, 2).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let vm = common::vm_on(&client, "web", "host1").await;
    let ip = vm.ip.clone().unwrap();
    let boot = ferry_lab::workload::boot_id(&ip).await.unwrap();
    for side in ["source", "destination"] {
        let from = client.get_vm("web").await.unwrap().host.unwrap();
        let to = if from == "host1" { "host2" } else { "host1" };
        let restarted: u32 = if side == "source" { &from } else { to }
            .strip_prefix("host")
            .unwrap()
            .parse()
            .unwrap();
        let writer = ferry_lab::workload::Writer::start(
            &ip,
            &format!("restart-{side}-"),
            Duration::from_millis(100),
            Duration::from_secs(10),
        );
        let op = migration_under_way(&client, "web", to).await;
        lab.fault(restarted, Fault::AgentKill).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        lab.heal(restarted).unwrap();
        let other = if restarted == 1 { 2 } else { 1 };
        let survivor = ferry_lab::harness::lab::host_client(&lab, other).unwrap();
        let ended = final_op(&survivor, &op.id).await;
        eprintln!(
            "op {} with the {side}'s agent restarted: {}",
            ended.id, ended.status
        );
        let vm = common::running(&survivor, "web").await;
        let copies = common::lab_qemus(&lab.spec().run_dir)
            .get("web")
            .map_or(0, Vec::len);
        assert_eq!(copies, 1, "exactly one QEMU of web after {ended:?}");
        let log = writer.stop().await;
        assert_eq!(
            ferry_lab::workload::lost_writes(&ip, &log).await.unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            ferry_lab::workload::boot_id(&ip).await.unwrap(),
            boot,
            "no reboot"
        );
        if ended.status == "completed" {
            assert_eq!(vm.host.as_deref(), Some(to));
        }
    }
    watch.assert_never_twice().await;
}

#[tokio::test]
async fn a_leader_that_cannot_read_the_heartbeats_restarts_nothing_without_a_fence_confirmation() {
    let (mut lab, _guard, client) = lab_without_fence_devices(29, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    ha_vm_on(&client, "held", "host2", 0).await;
    // Nobody can read (or write) the storage heartbeats any more: a file where their
    // directory was.
    let slots = lab.spec().shared_pool().join(".ferry").join("heartbeat");
    std::fs::remove_dir_all(&slots).unwrap();
    std::fs::write(&slots, b"not a directory").unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    lab.fault(2, Fault::PowerOff).unwrap();
    // Well past the lease TTL and every deadline: silence that cannot be seen proves
    // nothing, and without a fence device nothing else can.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let survivor = ferry_lab::harness::lab::host_client(&lab, 1).unwrap();
    let vm = survivor.get_vm("held").await.unwrap();
    assert_eq!(
        vm.host.as_deref(),
        Some("host2"),
        "restarted on a guess: {vm:?}"
    );
    let events = survivor.list_events(500).await.unwrap();
    assert!(
        events.iter().any(|event| event.subject == "host/host2"
            && event.kind == "host-fate"
            && event.message.contains("cannot be read")),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|event| event.kind == "ha-restart"),
        "{events:#?}"
    );
    std::fs::remove_file(&slots).unwrap();
    watch.assert_never_twice().await;
}

#[tokio::test]
async fn a_vm_that_starts_as_its_host_is_cut_off_never_runs_twice() {
    let (mut lab, _guard, client) = common::lab(30, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    ha_vm_on(&client, "late", "host2", 0).await;
    client.stop_vm("late").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get_vm("late").await.unwrap().state != "stopped" {
        assert!(Instant::now() < deadline, "late never stopped");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Started, and host2 cut off from etcd while it launches QEMU.
    client.start_vm("late").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.fault(2, Fault::LinkDown(ferry_lab::lab::LabNet::Management))
        .unwrap();
    // Either host2 fenced it and it runs elsewhere, or it never started there.
    let survivor = ferry_lab::harness::lab::host_client(&lab, 1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = survivor.get_vm("late").await.unwrap();
        if vm.host.as_deref() != Some("host2") && vm.state == "running" && vm.guest_agent {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "late never ran elsewhere: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.heal(2).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let copies = common::lab_qemus(&lab.spec().run_dir)
        .get("late")
        .map_or(0, Vec::len);
    assert_eq!(copies, 1, "host2 rejoined with a second copy");
    watch.assert_never_twice().await;
}
