//! Monitors and their recovery ladders in the lab, with real etcd, agents and QEMU
//! under TCG, faults made inside the real appliance:
//! - ferry-guest killed → the HTTP monitor restarts it through the guest agent, without
//!   a reboot; a probe lost for a moment does nothing;
//! - ferry-guest hung (SIGSTOP), with a restart command that cannot help → the ladder
//!   goes on to reset the VM, and the guest answers again after its reboot;
//! - the guest OS stalled (userspace frozen, the kernel alive) → the built-in stall
//!   monitor resets it, and the application monitor does not restart or fail it over;
//! - a host's business link dies → its VMs live-migrate away, no request fails;
//! - bad monitors are refused at create time with the reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::vm_on;
use ferry_api::client::ApiClient;
use ferry_api::types::{AddMonitorRequest, CreateVmRequest, EventView, ExecRequest};
use ferry_api::ApiError;
use ferry_lab::workload::boot_id;

fn in_guest(script: &str) -> ExecRequest {
    ExecRequest {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_seconds: Some(20),
    }
}

fn http_monitor(ladder: &str, restart_command: Option<&str>) -> AddMonitorRequest {
    AddMonitorRequest {
        kind: "http".into(),
        target: Some("8080/health".into()),
        interval: Some("2s".into()),
        timeout: Some("2s".into()),
        failures: Some(3),
        ladder: Some(ladder.into()),
        restart_command: restart_command.map(str::to_string),
        ..AddMonitorRequest::default()
    }
}

/// The VM's events of `kind`, oldest first.
async fn events(client: &ApiClient, vm: &str, kind: &str) -> Vec<EventView> {
    let mut found: Vec<EventView> = client
        .list_events(1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|event| event.subject == format!("vm/{vm}") && event.kind == kind)
        .collect();
    found.sort_by_key(|event| event.at_ms);
    found
}

/// Waits until the VM has `count` events of `kind`.
async fn wait_events(
    client: &ApiClient,
    vm: &str,
    kind: &str,
    count: usize,
    timeout: Duration,
) -> Vec<EventView> {
    let deadline = Instant::now() + timeout;
    loop {
        let found = events(client, vm, kind).await;
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "VM {vm}: {} {kind} event(s) after {timeout:?}, wanted {count}: {:?}",
            found.len(),
            client.list_events(50).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the VM's monitor `id` reports `state`.
async fn wait_state(client: &ApiClient, vm: &str, id: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let monitors = client.list_monitors(vm).await.unwrap();
        if monitors
            .iter()
            .any(|monitor| monitor.id == id && monitor.state == state)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "monitor {id} of {vm} never {state}: {monitors:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_killed_application_is_restarted_and_a_hung_one_escalates_to_a_reset() {
    let (_lab, _guard, client) = common::lab(21, 1).await;
    // A VM whose monitors are bad is not created at all.
    let bad = CreateVmRequest {
        name: "bad".into(),
        image: Some("appliance".into()),
        cpus: 1,
        memory: "256M".into(),
        monitors: vec![
            http_monitor("reset-vm", None),
            http_monitor("reset-vm*inf", None),
        ],
        ..CreateVmRequest::default()
    };
    match client.create_vm(&bad).await {
        Err(ApiError::BadRequest(message)) => {
            assert!(message.starts_with("monitors[1]"), "{message}");
            assert!(message.contains("never ends"), "{message}");
        }
        other => panic!("a VM with a bad monitor was not refused: {other:?}"),
    }
    assert!(matches!(
        client.get_vm("bad").await,
        Err(ApiError::NotFound(_))
    ));

    // The monitor given at create time is there from the start, with the image's
    // restart command as its default.
    client
        .create_vm(&CreateVmRequest {
            name: "app".into(),
            image: Some("appliance".into()),
            cpus: 1,
            memory: "256M".into(),
            host: Some("host1".into()),
            monitors: vec![http_monitor("restart-app*2,reset-vm", None)],
            ..CreateVmRequest::default()
        })
        .await
        .unwrap();
    let vm = common::running(&client, "app").await;
    let ip = vm.ip.clone().unwrap();
    let first_boot = boot_id(&ip).await.unwrap();
    let monitor = vm
        .monitors
        .iter()
        .find(|monitor| monitor.id == "m1")
        .unwrap();
    assert_eq!(
        monitor.restart_command.as_deref(),
        Some(ferry_lab::appliance::RESTART_COMMAND)
    );

    // Bad monitors are refused before anything is written.
    for (request, reason) in [
        (http_monitor("restart-app*inf", None), "never ends"),
        (http_monitor("restart-app,explode", None), "unknown action"),
        (
            AddMonitorRequest {
                interval: Some("0s".into()),
                ..http_monitor("reset-vm", None)
            },
            "interval",
        ),
    ] {
        match client.add_monitor("app", &request).await {
            Err(ApiError::BadRequest(message)) => {
                assert!(message.contains(reason), "{message}")
            }
            other => panic!("{request:?} was not refused: {other:?}"),
        }
    }

    wait_state(&client, "app", "m1", "ok").await;

    // One lost probe, not three in a row: nothing happens.
    client
        .exec_vm(
            "app",
            &in_guest("P=$(cat /run/ferry-guest.pid); kill -STOP $P; sleep 1.5; kill -CONT $P"),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        events(&client, "app", "monitor-action").await.is_empty(),
        "a probe lost for a moment must not act"
    );

    // Killed: restarted in the guest, no reboot.
    client
        .exec_vm("app", &in_guest("kill -KILL $(cat /run/ferry-guest.pid)"))
        .await
        .unwrap();
    let actions = wait_events(&client, "app", "monitor-action", 1, Duration::from_secs(60)).await;
    assert!(
        actions[0].message.contains("restart-app") && actions[0].message.contains("exited 0"),
        "{actions:?}"
    );
    wait_events(
        &client,
        "app",
        "monitor-recovered",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(boot_id(&ip).await.unwrap(), first_boot, "no reboot");

    // Hung, with a restart command that sees it "running": the ladder goes on to reset.
    client.remove_monitor("app", "m1").await.unwrap();
    let hung = client
        .add_monitor(
            "app",
            &http_monitor("restart-app,reset-vm", Some("/sbin/ferry-guest-ctl start")),
        )
        .await
        .unwrap();
    wait_state(&client, "app", &hung.id, "ok").await;
    client
        .exec_vm("app", &in_guest("kill -STOP $(cat /run/ferry-guest.pid)"))
        .await
        .unwrap();
    let actions = wait_events(
        &client,
        "app",
        "monitor-action",
        3,
        Duration::from_secs(120),
    )
    .await;
    let ladder: Vec<&str> = actions[1..]
        .iter()
        .map(|event| {
            if event.message.contains("; reset-vm (attempt") {
                "reset-vm"
            } else {
                "restart-app"
            }
        })
        .collect();
    assert_eq!(ladder, ["restart-app", "reset-vm"], "{actions:?}");
    wait_events(
        &client,
        "app",
        "monitor-recovered",
        2,
        Duration::from_secs(120),
    )
    .await;
    assert_ne!(
        boot_id(&ip).await.unwrap(),
        first_boot,
        "the reset rebooted it"
    );
    let view = client.get_vm("app").await.unwrap();
    let hung = view
        .monitors
        .iter()
        .find(|monitor| monitor.id == hung.id)
        .unwrap();
    assert_eq!(hung.last_action.as_deref(), Some("reset-vm"), "{hung:?}");
    assert_eq!(view.host.as_deref(), Some("host1"));
}

#[tokio::test]
async fn a_stalled_guest_is_reset_by_the_built_in_stall_monitor() {
    let (_lab, _guard, client) = common::lab(22, 1).await;
    let vm = vm_on(&client, "stuck", "host1").await;
    let ip = vm.ip.clone().unwrap();
    let first_boot = boot_id(&ip).await.unwrap();
    wait_state(&client, "stuck", "stall", "ok").await;
    // An application monitor that would restart or fail over ferry-guest: a stalled
    // guest must be reset before it does anything.
    client
        .add_monitor("stuck", &http_monitor("restart-app,failover-vm", None))
        .await
        .unwrap();
    wait_state(&client, "stuck", "m1", "ok").await;

    let stall = format!(
        "setsid {} 300 </dev/null >/dev/null 2>&1 &",
        ferry_lab::appliance::STALL_COMMAND
    );
    client.exec_vm("stuck", &in_guest(&stall)).await.unwrap();
    let actions = wait_events(
        &client,
        "stuck",
        "monitor-action",
        1,
        Duration::from_secs(90),
    )
    .await;
    assert!(
        actions[0].message.contains("monitor stall") && actions[0].message.contains("reset-vm"),
        "{actions:?}"
    );
    assert!(
        !actions
            .iter()
            .any(|event| event.message.contains("monitor m1")),
        "the application monitor acted on a stalled guest: {actions:?}"
    );
    wait_events(
        &client,
        "stuck",
        "monitor-recovered",
        1,
        Duration::from_secs(120),
    )
    .await;
    assert_ne!(
        boot_id(&ip).await.unwrap(),
        first_boot,
        "reset, so rebooted"
    );
    let vm = client.get_vm("stuck").await.unwrap();
    assert_eq!(
        vm.host.as_deref(),
        Some("host1"),
        "reset in place, not failed over"
    );
}

#[tokio::test]
async fn a_host_whose_business_link_dies_live_migrates_its_vms_away_without_a_failed_request() {
    let (mut lab, _guard, client) = common::lab(23, 2).await;
    let vm = vm_on(&client, "web", "host1").await;
    let ip = vm.ip.clone().unwrap();
    let first_boot = boot_id(&ip).await.unwrap();
    let scenario = ferry_lab::flows::SCENARIOS
        .into_iter()
        .find(|scenario| scenario.name == "db-every-0.5s")
        .unwrap();
    let flow = ferry_lab::flows::Flow::start(&ip, scenario, "link-", Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(2)).await;

    lab.fault(
        1,
        ferry_lab::lab::Fault::LinkDown(ferry_lab::lab::LabNet::Business),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let vm = client.get_vm("web").await.unwrap();
        if vm.host.as_deref() == Some("host2") && vm.state == "running" {
            break;
        }
        assert!(Instant::now() < deadline, "web never left host1: {vm:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = flow.stop().await;
    assert!(log.failed.is_empty(), "failed requests: {:?}", log.failed);
    let lost = ferry_lab::flows::lost_writes(&ip, &log).await.unwrap();
    assert!(lost.is_empty(), "lost writes: {lost:?}");
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        first_boot,
        "moved live, no reboot"
    );

    let actions: Vec<EventView> = client
        .list_events(500)
        .await
        .unwrap()
        .into_iter()
        .filter(|event| event.subject == "host/host1" && event.kind == "monitor-action")
        .collect();
    assert!(
        actions
            .iter()
            .any(|event| event.message.contains("carrier-business")
                && event.message.contains("migrate-away")
                && event.message.contains("web")),
        "{actions:?}"
    );
    let hosts = client.list_hosts().await.unwrap();
    let host1 = hosts.iter().find(|host| host.name == "host1").unwrap();
    assert!(
        host1
            .monitors
            .iter()
            .any(|monitor| monitor.id == "carrier-business" && monitor.state == "down"),
        "{host1:?}"
    );
}

#[tokio::test]
async fn a_host_monitor_whose_ladder_ends_in_fence_host_has_its_host_powered_off() {
    let (mut lab, _guard, client) = common::lab(24, 2).await;
    // host1 watches its business link with a ladder that fences the host.
    let config = lab.spec().agent_config_path(1);
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        "\n[[monitor]]\nkind = \"carrier\"\nnetwork = \"business\"\nfailures = 2\nladder = \"fence-host\"\n",
    );
    std::fs::write(&config, text).unwrap();
    lab.fault(1, ferry_lab::lab::Fault::AgentKill).unwrap();
    lab.heal(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.list_hosts().await.is_ok_and(|hosts| {
        hosts.iter().any(|host| {
            host.name == "host1" && host.monitors.iter().any(|m| m.id == "carrier-business")
        })
    }) {
        assert!(
            Instant::now() < deadline,
            "host1 never came back with its monitor"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let vm = common::ha_vm_on(&client, "db", "host1", 1).await;
    let first_boot = boot_id(vm.ip.as_deref().unwrap()).await.unwrap();

    lab.fault(
        1,
        ferry_lab::lab::Fault::LinkDown(ferry_lab::lab::LabNet::Business),
    )
    .unwrap();
    let survivor = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let moved = loop {
        if let Ok(vm) = survivor.get_vm("db").await {
            if vm.host.as_deref() == Some("host2") && vm.state == "running" {
                if let Ok(boot) = boot_id(vm.ip.as_deref().unwrap()).await {
                    break boot;
                }
            }
        }
        assert!(Instant::now() < deadline, "db never restarted on host2");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_ne!(
        moved, first_boot,
        "restarted after its host was powered off"
    );
    let events = survivor.list_events(500).await.unwrap();
    for kind in ["fence-requested", "fenced-off"] {
        assert!(
            events
                .iter()
                .any(|event| event.subject == "host/host1" && event.kind == kind),
            "no {kind} event: {events:?}"
        );
    }
}
