//! HA in the lab, with real etcd, agents and QEMU under TCG. Throughout every test a
//! watcher fails it if any VM ever has two live QEMUs at once.
//! - a host powers off → its HA VMs run elsewhere, highest priority placed first, with
//!   every write acknowledged before the fault;
//! - one host's management link is cut → it kills its HA VM itself before the VM starts
//!   elsewhere, and keeps the one whose isolation response is keep-running; with the
//!   link back it rejoins and nothing runs twice;
//! - the leader's own host powers off → the new leader restarts its VM;
//! - etcd stops for 30 s (a control-plane outage for every host) → no VM stops,
//!   restarts or moves, then or after;
//! - the management links of two hosts of three are cut → nothing is fenced or
//!   restarted, and with the links back nothing has moved;
//! - two hosts of three power off with room for only two of three VMs → priorities
//!   decide, the third waits with a reason and starts when its host returns;
//! - a VM whose guest panics or whose QEMU dies is restarted in place, and after its
//!   third failure on one host it is restarted on another.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::{ha_vm_on, lab_qemus, running, DoubleRunWatch};
use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, ExecRequest, VmView};
use ferry_lab::lab::{Fault, LabNet};
use ferry_lab::workload::{boot_id, lost_writes, Writer};

/// Waits until `name` runs on a host other than `not_on` and ferry-guest answers.
async fn running_elsewhere(client: &ApiClient, name: &str, not_on: &str) -> VmView {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(vm) = client.get_vm(name).await {
            let moved = vm.host.as_deref().is_some_and(|host| host != not_on)
                && vm.state == "running"
                && vm.guest_agent;
            // The guest agent answers a little before ferry-guest does.
            if moved && boot_id(vm.ip.as_deref().unwrap_or_default()).await.is_ok() {
                return vm;
            }
            assert!(
                Instant::now() < deadline,
                "VM {name} never left {not_on}: {vm:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_powered_off_hosts_ha_vms_restart_elsewhere_with_every_acknowledged_write() {
    let (mut lab, _guard, client) = common::lab(14, 3).await;
    let survivor = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let (db, web) = tokio::join!(
        ha_vm_on(&client, "db", "host1", 10),
        ha_vm_on(&client, "web", "host1", 0)
    );
    let ip = db.ip.clone().unwrap();
    let writer = Writer::start(&ip, "k", Duration::from_millis(50), Duration::from_secs(2));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writer.stop().await;
    assert!(before.acked.len() > 10, "{:?}", before.failures);

    let faulted = Instant::now();
    lab.fault(1, Fault::PowerOff).unwrap();
    let db_after = running_elsewhere(&survivor, "db", "host1").await;
    let web_after = running_elsewhere(&survivor, "web", "host1").await;
    eprintln!(
        "both HA VMs answer elsewhere {:.1} s after the power-off",
        faulted.elapsed().as_secs_f64()
    );
    assert_eq!(db_after.ip, db.ip);
    assert_eq!(web_after.ip, web.ip);
    assert_eq!(
        lost_writes(&ip, &before).await.unwrap(),
        Vec::<String>::new()
    );
    let events = survivor.list_events(500).await.unwrap();
    let restarts: Vec<&str> = events
        .iter()
        .filter(|event| event.kind == "ha-restart")
        .map(|event| event.subject.as_str())
        .collect();
    assert_eq!(restarts, ["vm/db", "vm/web"], "priority decides the order");
    // The leader also powered host1 off through its fence device, fence_ferry_lab.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !survivor
        .list_events(500)
        .await
        .unwrap()
        .iter()
        .any(|event| {
            event.subject == "host/host1"
                && event.kind == "fenced-off"
                && event.message.contains("its fence device confirmed it")
        })
    {
        assert!(
            Instant::now() < deadline,
            "host1's fence device never confirmed it off"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watch.assert_never_twice().await;
}

#[tokio::test]
async fn an_isolated_host_fences_its_vm_before_it_starts_elsewhere_and_rejoins_cleanly() {
    let (mut lab, _guard, client) = common::lab(15, 3).await;
    let survivor = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let keeper_request = CreateVmRequest {
        name: "keeper".into(),
        image: Some("appliance".into()),
        cpus: 1,
        memory: "256M".into(),
        host: Some("host1".into()),
        ha: true,
        isolation: Some("keep-running".into()),
        ..CreateVmRequest::default()
    };
    client.create_vm(&keeper_request).await.unwrap();
    ha_vm_on(&client, "app", "host1", 0).await;
    let keeper = running(&client, "keeper").await;
    let host1_run = lab.spec().host_run_dir(1);
    assert_eq!(lab_qemus(&host1_run).get("app").map(Vec::len), Some(1));

    lab.fault(1, Fault::LinkDown(LabNet::Management)).unwrap();
    let moved = running_elsewhere(&survivor, "app", "host1").await;
    assert!(
        !lab_qemus(&host1_run).contains_key("app"),
        "host1 fenced its copy"
    );
    let events = survivor.list_events(500).await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| event.kind == "host-fate" && event.message.contains("fenced itself")),
        "the manager restarted it because host1 fenced itself: {events:?}"
    );

    // The keep-running VM stayed where it was, in the same QEMU.
    assert_eq!(
        lab_qemus(&host1_run).get("keeper"),
        Some(&vec![keeper.pid.unwrap()])
    );

    lab.fault(1, Fault::LinkUp(LabNet::Management)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !survivor
        .list_hosts()
        .await
        .unwrap()
        .iter()
        .any(|host| host.name == "host1")
    {
        assert!(Instant::now() < deadline, "host1 never rejoined");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = running(&survivor, "app").await;
    if (&after.host, after.pid) != (&moved.host, moved.pid) {
        for event in survivor.list_events(500).await.unwrap() {
            eprintln!(
                "{} {} {} {}",
                event.at_ms, event.subject, event.kind, event.message
            );
        }
        for host in 1..=3 {
            let log = lab.spec().state_dir.join(format!("host{host}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for line in text.lines().filter(|line| {
                !line.contains("DEBUG") && (line.contains("app") || line.contains("lease"))
            }) {
                eprintln!("host{host}: {line}");
            }
        }
    }
    assert_eq!(after.host, moved.host, "nothing moved again");
    assert_eq!(after.pid, moved.pid, "nothing restarted twice");
    let all = lab_qemus(&lab.spec().run_dir);
    assert_eq!(all.get("app").map(Vec::len), Some(1), "{all:?}");
    let kept = running(&survivor, "keeper").await;
    assert_eq!(
        (kept.host, kept.pid),
        (keeper.host, keeper.pid),
        "never moved"
    );
    watch.assert_never_twice().await;
}

#[tokio::test]
async fn a_control_plane_outage_stops_restarts_and_moves_nothing() {
    let (lab, _guard, client) = common::lab(16, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let (one, two) = tokio::join!(
        ha_vm_on(&client, "one", "host1", 0),
        ha_vm_on(&client, "two", "host2", 0)
    );
    let before = lab_qemus(&lab.spec().run_dir);
    let etcd = lab.state().etcd.as_ref().unwrap().pid;
    let probe = Writer::probe(
        one.ip.as_deref().unwrap(),
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(etcd),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during = lab_qemus(&lab.spec().run_dir);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(etcd),
        nix::sys::signal::Signal::SIGCONT,
    )
    .unwrap();
    assert_eq!(
        during, before,
        "no QEMU stopped or started during the outage"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(lab_qemus(&lab.spec().run_dir), before, "nor after it");
    let log = probe.stop().await;
    assert!(
        log.failures.is_empty(),
        "the guest served throughout: {:?}",
        log.failures
    );
    assert_eq!(running(&client, "one").await.host, one.host);
    assert_eq!(running(&client, "two").await.host, two.host);
    watch.assert_never_twice().await;
}

#[tokio::test]
async fn when_the_leaders_host_powers_off_the_new_leader_restarts_its_vm() {
    let (mut lab, _guard, client) = common::lab(17, 3).await;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let leader = client
        .list_hosts()
        .await
        .unwrap()
        .into_iter()
        .find(|host| host.leader)
        .expect("a leader")
        .name;
    let number = lab.spec().parse_host(&leader).unwrap();
    let other = lab
        .spec()
        .host_numbers()
        .find(|host| *host != number)
        .unwrap();
    let survivor = ferry_lab::harness::lab::host_client(&lab, other).unwrap();
    let before = ha_vm_on(&client, "svc", &leader, 0).await;

    lab.fault(number, Fault::PowerOff).unwrap();
    let after = running_elsewhere(&survivor, "svc", &leader).await;
    assert_eq!(after.ip, before.ip);
    let hosts = survivor.list_hosts().await.unwrap();
    let new_leader = hosts.iter().find(|host| host.leader).expect("a new leader");
    assert_ne!(new_leader.name, leader);
    watch.assert_never_twice().await;
}

/// Kinds of the events about `subject`, oldest first.
async fn event_kinds(client: &ApiClient, subject: &str) -> Vec<String> {
    let mut events = client.list_events(1000).await.unwrap();
    events.retain(|event| event.subject == subject);
    events.sort_by_key(|event| event.at_ms);
    events.into_iter().map(|event| event.kind).collect()
}

#[tokio::test]
async fn cutting_most_hosts_off_fences_and_restarts_nothing() {
    let (mut lab, _guard, client) = common::lab(18, 3).await;
    let outsider = ferry_lab::harness::lab::host_client(&lab, 3).unwrap();
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let (one, _two) = tokio::join!(
        ha_vm_on(&client, "one", "host1", 0),
        ha_vm_on(&client, "two", "host2", 0)
    );
    let before = lab_qemus(&lab.spec().run_dir);
    let probe = Writer::probe(
        one.ip.as_deref().unwrap(),
        Duration::from_millis(200),
        Duration::from_secs(2),
    );
    lab.fault(1, Fault::LinkDown(LabNet::Management)).unwrap();
    lab.fault(2, Fault::LinkDown(LabNet::Management)).unwrap();
    // Well past the lease TTL (6 s) and the self-fence deadline (4 s).
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        lab_qemus(&lab.spec().run_dir),
        before,
        "two hosts of three cut off: nobody fenced, nothing restarted"
    );
    let events = outsider.list_events(500).await.unwrap();
    assert!(
        !events
            .iter()
            .any(|event| ["ha-restart", "fencing", "fenced"].contains(&event.kind.as_str())),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|event| event.kind == "host-fate" && event.message.contains("cut off but alive")),
        "the leader saw them isolated, not dead: {events:?}"
    );
    lab.fault(1, Fault::LinkUp(LabNet::Management)).unwrap();
    lab.fault(2, Fault::LinkUp(LabNet::Management)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while outsider.list_hosts().await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "the cut hosts never rejoined");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = lab_qemus(&lab.spec().run_dir);
    if after != before {
        let events = outsider.list_events(500).await.unwrap();
        panic!("nor after: {before:?} became {after:?}; events: {events:#?}");
    }
    let log = probe.stop().await;
    assert!(
        log.failures.is_empty(),
        "served throughout: {:?}",
        log.failures
    );
    watch.assert_never_twice().await;
}

/// Creates an HA VM of `memory` on `host` and waits until it runs.
async fn big_ha_vm_on(client: &ApiClient, name: &str, host: &str, priority: i32) -> VmView {
    client
        .create_vm(&CreateVmRequest {
            name: name.into(),
            image: Some("appliance".into()),
            cpus: 1,
            memory: "1536M".into(),
            host: Some(host.into()),
            ha: true,
            ha_priority: priority,
            ..CreateVmRequest::default()
        })
        .await
        .unwrap();
    let vm = running(client, name).await;
    assert_eq!(vm.host.as_deref(), Some(host));
    vm
}

#[tokio::test]
async fn when_two_hosts_die_priorities_decide_and_the_rest_start_when_a_host_returns() {
    let (mut lab, _guard, client) = common::lab(19, 3).await;
    let survivor = ferry_lab::harness::lab::host_client(&lab, 3).unwrap();
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    // Lab hosts give VMs 4 GiB: host3 alone holds two of these three. host2 dies first
    // (its lease expires first, so silver takes one place); then host1, whose gold and
    // bronze compete for the last place in one pass of the manager: priority decides.
    let (_gold, _silver, bronze) = tokio::join!(
        big_ha_vm_on(&client, "gold", "host1", 10),
        big_ha_vm_on(&client, "silver", "host2", 5),
        big_ha_vm_on(&client, "bronze", "host1", 1)
    );
    lab.fault(2, Fault::PowerOff).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    lab.fault(1, Fault::PowerOff).unwrap();
    let silver = running_elsewhere(&survivor, "silver", "host2").await;
    let gold = running_elsewhere(&survivor, "gold", "host1").await;
    assert_eq!(silver.host.as_deref(), Some("host3"));
    assert_eq!(gold.host.as_deref(), Some("host3"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !event_kinds(&survivor, "vm/bronze")
        .await
        .contains(&"cannot-place".to_string())
    {
        assert!(Instant::now() < deadline, "bronze never said why it waits");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let waiting = survivor.get_vm("bronze").await.unwrap();
    assert_ne!(waiting.state, "running");
    assert!(
        waiting
            .error
            .as_deref()
            .is_some_and(|error| error.contains("no host has")),
        "{waiting:?}"
    );

    lab.heal(1).unwrap();
    let back = running(&survivor, "bronze").await;
    assert_eq!(
        back.host.as_deref(),
        Some("host1"),
        "started when its host returned"
    );
    assert_ne!(back.pid, bronze.pid);
    assert_eq!(lab_qemus(&lab.spec().run_dir).len(), 3);
    watch.assert_never_twice().await;
}

/// Waits until `name` runs in a QEMU other than `old_pid` and ferry-guest answers.
async fn restarted(client: &ApiClient, name: &str, old_pid: Option<i32>) -> VmView {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = client.get_vm(name).await.unwrap();
        if vm.pid != old_pid
            && vm.state == "running"
            && vm.guest_agent
            && boot_id(vm.ip.as_deref().unwrap_or_default()).await.is_ok()
        {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} was not restarted: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn kill_qemu(lab_run_dir: &std::path::Path, vm: &str, pid: i32) {
    assert_eq!(
        lab_qemus(lab_run_dir).get(vm),
        Some(&vec![pid]),
        "the lab's QEMU of {vm}"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

#[tokio::test]
async fn a_vm_that_keeps_failing_is_restarted_in_place_then_on_another_host() {
    let (lab, _guard, client) = common::lab(20, 2).await;
    let run_dir = lab.spec().run_dir.clone();
    let watch = DoubleRunWatch::start(run_dir.clone());
    let first = ha_vm_on(&client, "flaky", "host1", 0).await;

    // Failure 1: the guest kernel panics (pvpanic reports it).
    let crash = ExecRequest {
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo c > /proc/sysrq-trigger".into(),
        ],
        timeout_seconds: Some(3),
    };
    // The crash cuts the guest agent's answer short; the crash is what counts.
    if let Err(error) = client.exec_vm("flaky", &crash).await {
        eprintln!("the crash got no answer (expected): {error}");
    }
    let second = restarted(&client, "flaky", first.pid).await;
    assert_eq!(second.host.as_deref(), Some("host1"), "restarted in place");

    // Failures 2 and 3: its QEMU dies.
    kill_qemu(&run_dir, "flaky", second.pid.unwrap());
    let third = restarted(&client, "flaky", second.pid).await;
    assert_eq!(third.host.as_deref(), Some("host1"), "restarted in place");
    kill_qemu(&run_dir, "flaky", third.pid.unwrap());
    let moved = running_elsewhere(&client, "flaky", "host1").await;
    assert_eq!(moved.ip, first.ip);
    assert_eq!(moved.recent_restarts, 3);

    let events = client.list_events(500).await.unwrap();
    let failures: Vec<&str> = events
        .iter()
        .filter(|event| event.subject == "vm/flaky" && event.kind == "vm-failed")
        .map(|event| event.message.as_str())
        .collect();
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(failures[0].contains("panicked"), "{failures:?}");
    assert!(failures[1].contains("restarting it here"), "{failures:?}");
    assert!(
        failures[2].contains("restarting it on another host"),
        "{failures:?}"
    );
    assert!(
        events.iter().any(|event| event.subject == "vm/flaky"
            && event.kind == "ha-restart"
            && event.message.contains("kept failing on host1")),
        "{events:?}"
    );
    watch.assert_never_twice().await;
}
