//! Migration in the lab, with real QEMU under TCG and a client in this (the root)
//! namespace writing to ferry-guest over the business switch every 50 ms: live and
//! quick migration lose no acknowledged write and fail no request; refusals move
//! nothing; a cancel or a destination that dies leaves the guest running where it was;
//! a disk moves between pools under writes, and a VM with a host-local disk migrates
//! live (its disk copied over NBD first) while its guest fsyncs as fast as it can, with
//! every acknowledged write on the destination.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::{alive, vm_on};
use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, MigrateRequest, MoveDiskRequest, OpView, VmView};
use ferry_api::ApiError;
use ferry_lab::workload::{boot_id, lost_writes, Writer, WriterLog};

const EVERY: Duration = Duration::from_millis(50);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

fn request(to: &str, mode: &str) -> MigrateRequest {
    MigrateRequest {
        to: Some(to.into()),
        mode: Some(mode.into()),
        ..MigrateRequest::default()
    }
}

async fn wait(client: &ApiClient, op: &OpView) -> OpView {
    tokio::time::timeout(
        Duration::from_secs(180),
        client.wait_op(&op.id, Duration::from_millis(100), |_| {}),
    )
    .await
    .expect("the op ends within 3 minutes")
    .unwrap()
}

/// Runs `during` while a writer writes every 50 ms; returns the writer's log.
async fn under_writes<F: std::future::Future<Output = OpView>>(
    ip: &str,
    prefix: &str,
    during: F,
) -> (OpView, WriterLog) {
    let writer = Writer::start(ip, prefix, EVERY, CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let op = during.await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    (op, writer.stop().await)
}

fn assert_clean(op: &OpView, log: &WriterLog) {
    assert_eq!(op.status, "completed", "{op:?}");
    assert!(
        log.failures.is_empty(),
        "failed requests: {:?}",
        log.failures
    );
    assert!(
        log.acked.len() > 10,
        "the writer wrote: {}",
        log.acked.len()
    );
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn live_and_quick_migration_lose_no_write_and_refusals_move_nothing() {
    let (lab, _guard, client) = common::lab(11, 2).await;
    let spec = lab.spec().clone();
    let vm = vm_on(&client, "web", "host1").await;
    let ip = vm.ip.clone().unwrap();
    let boot = boot_id(&ip).await.unwrap();

    let (live, log) = under_writes(&ip, "live-", async {
        let op = client
            .migrate_vm("web", &request("host2", "live"))
            .await
            .unwrap();
        wait(&client, &op).await
    })
    .await;
    assert_clean(&live, &log);
    assert_eq!(live.mode.as_deref(), Some("live"));
    assert!(
        live.qemu_downtime_ms.is_some() && live.total_ms.is_some(),
        "{live:?}"
    );
    assert!(live.transferred_bytes.unwrap() > 0);
    assert_eq!(
        client.get_vm("web").await.unwrap().host.as_deref(),
        Some("host2")
    );
    assert_eq!(lost_writes(&ip, &log).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        boot,
        "the guest did not reboot"
    );
    wait_until("host1 keeps nothing of the VM", || {
        !spec.host_run_dir(1).join("vms").join("web").exists()
    })
    .await;

    let (quick, log) = under_writes(&ip, "quick-", async {
        let op = client
            .migrate_vm("web", &request("host1", "quick"))
            .await
            .unwrap();
        wait(&client, &op).await
    })
    .await;
    assert_clean(&quick, &log);
    assert_eq!(
        client.get_vm("web").await.unwrap().host.as_deref(),
        Some("host1")
    );
    assert_eq!(lost_writes(&ip, &log).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        boot,
        "the guest did not reboot"
    );
    let state_files = spec.shared_pool().join(".ferry").join("migration");
    assert_eq!(
        std::fs::read_dir(&state_files)
            .map(|dir| dir.count())
            .unwrap_or(0),
        0,
        "the saved state is removed after the restore"
    );

    // Refusals: one line naming the reason, no op, nothing moved.
    let ops_before = client.list_ops().await.unwrap().len();
    let pid_before = client.get_vm("web").await.unwrap().pid;
    let refusal = |result: Result<OpView, ApiError>| match result {
        Err(ApiError::Conflict(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let unknown = refusal(client.migrate_vm("web", &request("host9", "live")).await);
    assert!(unknown.contains("host9 is not in the cluster"), "{unknown}");
    let same = refusal(client.migrate_vm("web", &request("host1", "live")).await);
    assert_eq!(same, "VM web already runs on host1");
    client
        .create_vm(&CreateVmRequest {
            name: "hog".into(),
            image: Some("appliance".into()),
            cpus: 1,
            memory: "3900M".into(),
            host: Some("host2".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let full = refusal(client.migrate_vm("web", &request("host2", "live")).await);
    assert_eq!(
        full,
        "host host2 has 196 MiB of memory free, VM web needs 256 MiB"
    );
    let bad_mode = client
        .migrate_vm("web", &request("host2", "teleport"))
        .await
        .unwrap_err();
    assert!(
        matches!(bad_mode, ApiError::BadRequest(ref message) if message.contains("use live or quick")),
        "{bad_mode:?}"
    );
    assert_eq!(client.list_ops().await.unwrap().len(), ops_before);
    let after = client.get_vm("web").await.unwrap();
    assert_eq!(
        (after.host.as_deref(), after.pid),
        (Some("host1"), pid_before)
    );
}

/// Starts a slow migration (the bandwidth capped) and waits until memory is flowing.
async fn slow_migration(client: &ApiClient, to: &str, bandwidth: &str) -> OpView {
    let op = client
        .migrate_vm(
            "web",
            &MigrateRequest {
                bandwidth: Some(bandwidth.into()),
                ..request(to, "live")
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = client.get_op(&op.id).await.unwrap();
        let copying = now
            .progress
            .as_ref()
            .is_some_and(|progress| progress.transferred_bytes > 0);
        if copying {
            return now;
        }
        assert!(now.status == "queued" || now.status == "running", "{now:?}");
        assert!(Instant::now() < deadline, "no memory copied: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_cancelled_migration_or_a_dead_destination_leaves_the_guest_where_it_was() {
    let (lab, _guard, client) = common::lab(12, 2).await;
    let spec = lab.spec().clone();
    let vm = vm_on(&client, "web", "host1").await;
    let ip = vm.ip.clone().unwrap();
    let boot = boot_id(&ip).await.unwrap();
    let dest_run_dir = spec.host_run_dir(2).join("vms").join("web");

    let writer = Writer::start(&ip, "cancel-", EVERY, CLIENT_TIMEOUT);
    let op = slow_migration(&client, "host2", "4M").await;
    let second = client
        .migrate_vm("web", &request("host2", "live"))
        .await
        .unwrap_err();
    assert_eq!(
        second.to_string(),
        ApiError::Conflict(format!(
            "a migration of VM web is already in flight (op {})",
            op.id
        ))
        .to_string(),
        "a second migration of the same VM is refused"
    );
    client.cancel_op(&op.id).await.unwrap();
    let cancelled = wait(&client, &op).await;
    assert_eq!(cancelled.status, "cancelled", "{cancelled:?}");
    let log = writer.stop().await;
    assert!(log.failures.is_empty(), "{:?}", log.failures);
    let after = client.get_vm("web").await.unwrap();
    assert_eq!(
        (after.host.as_deref(), after.state.as_str()),
        (Some("host1"), "running")
    );
    assert_eq!(lost_writes(&ip, &log).await.unwrap(), Vec::<String>::new());
    wait_until("host2 removes its waiting QEMU", || !dest_run_dir.exists()).await;

    // The destination QEMU dies mid-copy: the op fails, the source carries on.
    let writer = Writer::start(&ip, "dead-", EVERY, CLIENT_TIMEOUT);
    let op = slow_migration(&client, "host2", "4M").await;
    let pid: i32 = std::fs::read_to_string(dest_run_dir.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(alive(pid));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let failed = wait(&client, &op).await;
    assert_eq!(failed.status, "failed", "{failed:?}");
    assert!(failed.error.is_some(), "{failed:?}");
    let log = writer.stop().await;
    assert!(log.failures.is_empty(), "{:?}", log.failures);
    let after = client.get_vm("web").await.unwrap();
    assert_eq!(
        (after.host.as_deref(), after.state.as_str()),
        (Some("host1"), "running")
    );
    assert_eq!(lost_writes(&ip, &log).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        boot,
        "the guest did not reboot"
    );

    // And the VM still migrates afterwards.
    let op = client
        .migrate_vm("web", &request("host2", "live"))
        .await
        .unwrap();
    assert_eq!(wait(&client, &op).await.status, "completed");
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        boot,
        "the guest did not reboot"
    );
}

#[tokio::test]
async fn a_disk_moves_under_writes_and_a_local_disk_migrates_live() {
    let (lab, _guard, client) = common::lab(13, 2).await;
    let spec = lab.spec().clone();
    let vm = vm_on(&client, "web", "host1").await;
    let ip = vm.ip.clone().unwrap();
    let boot = boot_id(&ip).await.unwrap();
    let shared_file = spec.shared_pool().join("vms/web/data.qcow2");
    let local1 = spec.local_pool(1).join("vms/web/data.qcow2");
    let local2 = spec.local_pool(2).join("vms/web/data.qcow2");
    assert!(shared_file.exists());

    let (moved, log) = under_writes(&ip, "move-", async {
        let op = client
            .move_disk(
                "web",
                "data",
                &MoveDiskRequest {
                    pool: spec.local_pool_name(1),
                },
            )
            .await
            .unwrap();
        wait(&client, &op).await
    })
    .await;
    assert_clean(&moved, &log);
    assert!(local1.exists(), "the disk is on host1's local pool");
    assert!(!shared_file.exists(), "the old file goes after the pivot");
    let pool = |vm: VmView| vm.disks[0].pool.clone();
    assert_eq!(
        pool(client.get_vm("web").await.unwrap()),
        Some(spec.local_pool_name(1)),
        "placement now needs host1's pool"
    );
    assert_eq!(lost_writes(&ip, &log).await.unwrap(), Vec::<String>::new());

    let bad_pool = client
        .move_disk(
            "web",
            "data",
            &MoveDiskRequest {
                pool: "nowhere".into(),
            },
        )
        .await
        .unwrap_err();
    assert!(
        bad_pool
            .to_string()
            .contains("pool \"nowhere\" is not on host host1"),
        "{bad_pool}"
    );

    // The guest writes (SQLite, synchronous=FULL: an fsync per write) to the local disk
    // as fast as it can while it moves: the last writes before the switch-over must
    // reach the destination's copy, which the mirror ends in sync at pre-switchover.
    let writer = Writer::start(&ip, "nbd-", Duration::from_millis(1), CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let op = client
        .migrate_vm("web", &request("host2", "live"))
        .await
        .unwrap();
    let migrated = wait(&client, &op).await;
    let log = writer.stop().await;
    assert_clean(&migrated, &log);
    assert_eq!(
        client.get_vm("web").await.unwrap().host.as_deref(),
        Some("host2")
    );
    assert!(local2.exists(), "the disk was copied to host2's local pool");
    assert_eq!(
        pool(client.get_vm("web").await.unwrap()),
        Some(spec.local_pool_name(2)),
        "an HA restart would look for host2's pool now"
    );
    assert!(
        !local1.exists(),
        "host1's copy is removed after the switch-over"
    );
    assert_eq!(lost_writes(&ip, &log).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        boot,
        "the guest did not reboot"
    );
}

/// The downtime benchmark's baseline: the same guest as a plain QEMU, moved by hand
/// with QEMU's defaults, keeps its boot and its data and leaves nothing behind. Then
/// the streams as Ferry sets them up: a TLS stream from a host the destination does
/// not expect (a valid certificate of the cluster, but not the op's source) is refused
/// and the guest stays; from the expected host it goes.
#[tokio::test]
async fn the_bare_qemu_baseline_migrates_by_hand_and_a_tls_stream_from_a_host_not_in_the_op_is_refused(
) {
    let (lab, _guard, _client) = common::lab(25, 2).await;
    let mut bare =
        ferry_lab::lab::bare::BareVm::boot(&lab, "bare-test", ferry_model::Bytes::mib(256), 1)
            .await
            .unwrap();
    let ip = bare.address().to_string();
    let boot = boot_id(&ip).await.unwrap();
    let info = bare.migrate_to(2).await.unwrap();
    assert_eq!(bare.host(), 2);
    assert!(info.downtime_ms.is_some(), "{info:?}");
    assert_eq!(
        boot_id(&ip).await.unwrap(),
        boot,
        "the same guest, not a reboot"
    );

    // host1 expects host3; host2's stream is refused, the guest runs on.
    let refused = bare.migrate_to_over_tls(1, "host3").await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("TLS x509 authz check for CN=host2 is denied"),
        "{refused}"
    );
    assert_eq!(bare.host(), 2);
    assert_eq!(boot_id(&ip).await.unwrap(), boot, "the guest ran on");
    let info = bare.migrate_to_over_tls(1, "host2").await.unwrap();
    assert!(info.downtime_ms.is_some(), "{info:?}");
    assert_eq!(bare.host(), 1);
    assert_eq!(boot_id(&ip).await.unwrap(), boot);

    let run_dir = lab.spec().host_run_dir(1).join("bare");
    bare.destroy().await;
    assert!(!run_dir.exists(), "{} left behind", run_dir.display());
    let qemus = common::lab_qemus(&lab.spec().run_dir);
    assert!(qemus.is_empty(), "QEMUs left running: {qemus:?}");
}
