//! The QEMU driver against real QEMU booting the real appliance under TCG (or KVM where
//! it works): lifecycle, monitor, guest agent, durability, reattachment, failures.
//! Every test boots its own VM in its own network namespace and removes both.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::time::{Duration, Instant};

use ferry_lab::appliance::Appliance;
use ferry_lab::defaults;
use ferry_lab::sandbox::{Method, Sandbox, SandboxOptions, GUEST_ADDRESS};
use ferry_model::{Bytes, HostLimits};
use ferry_qemu::{LaunchOptions, Machine, QemuError, RunState, StopOutcome};

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const AGENT_TIMEOUT: Duration = Duration::from_secs(20);

fn appliance() -> Appliance {
    Appliance::load(&defaults::appliance_dir()).unwrap_or_else(|error| {
        panic!("{error}. The README's test command builds it; or set FERRY_APPLIANCE_DIR")
    })
}

/// A name unique to this test run, valid as a VM name and a namespace name.
fn unique(base: &str) -> String {
    format!("{base}-{}", std::process::id())
}

async fn options(name: &str) -> SandboxOptions {
    let accel = defaults::detect_accel(&appliance())
        .await
        .expect("acceleration probe");
    SandboxOptions {
        qemu: defaults::qemu_binary(),
        accel: accel.accel,
        memory: Bytes::mib(256),
        data_disk: Bytes(512 * Bytes::MIB),
        dir: std::env::temp_dir().join(format!("ferry-test-{name}")),
    }
}

async fn boot(base: &str) -> Sandbox {
    let name = unique(base);
    let sandbox = Sandbox::start(&name, &appliance(), options(&name).await)
        .await
        .expect("start the VM");
    sandbox
        .wait_ready(READY_TIMEOUT)
        .await
        .expect("guest ready");
    sandbox
}

fn get(sandbox: &Sandbox, path: &str) -> (u16, String) {
    let (status, body) = sandbox.http(Method::GET, path, None).expect("HTTP GET");
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn put(sandbox: &Sandbox, path: &str, body: &[u8]) -> (u16, String) {
    let (status, reply) = sandbox
        .http(Method::PUT, path, Some(body.to_vec()))
        .expect("HTTP PUT");
    (status, String::from_utf8_lossy(&reply).into_owned())
}

fn boot_id(sandbox: &Sandbox) -> String {
    let (status, body) = get(sandbox, "/health");
    assert_eq!(status, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    health["boot_id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_booted_appliance_answers_qmp_the_guest_agent_and_ferry_guest() {
    let sandbox = boot("answers").await;
    let machine = sandbox.machine().unwrap();
    assert_eq!(machine.status().await.unwrap(), RunState::Running);
    assert!(machine.qmp().qemu_version().starts_with(char::is_numeric));

    let agent = machine.guest_agent();
    agent.ping(AGENT_TIMEOUT).await.unwrap();
    let echo = agent
        .exec(
            "/bin/sh",
            &["-c", "echo out; echo err >&2; exit 7"],
            AGENT_TIMEOUT,
        )
        .await
        .unwrap();
    assert_eq!(
        (echo.exit_code, echo.stdout.as_str(), echo.stderr.as_str()),
        (Some(7), "out\n", "err\n")
    );
    let interfaces = agent.network_interfaces(AGENT_TIMEOUT).await.unwrap();
    let eth0 = interfaces
        .iter()
        .find(|interface| interface.name == "eth0")
        .expect("eth0");
    assert!(
        eth0.ip_addresses
            .iter()
            .any(|ip| ip.address == GUEST_ADDRESS),
        "{eth0:?}"
    );
    assert_eq!(
        eth0.hardware_address.as_deref(),
        Some(sandbox.spec.nics[0].mac.to_string().as_str())
    );

    assert_eq!(put(&sandbox, "/kv/alpha", b"1").0, 200);
    assert_eq!(put(&sandbox, "/kv/beta", b"2").0, 200);
    assert_eq!(get(&sandbox, "/kv/alpha"), (200, "1".to_string()));
    let (status, writes) = get(&sandbox, "/kv?since=0");
    assert_eq!(status, 200);
    let writes: Vec<serde_json::Value> = serde_json::from_str(&writes).unwrap();
    assert_eq!(
        writes
            .iter()
            .map(|write| write["key"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["alpha", "beta"]
    );

    let payload: Vec<u8> = (0..3 << 20).map(|index| (index % 251) as u8).collect();
    assert_eq!(put(&sandbox, "/files/blob.bin", &payload).0, 201);
    let (status, body) = sandbox.http(Method::GET, "/files/blob.bin", None).unwrap();
    assert_eq!((status, body.len()), (200, payload.len()));
    assert!(body == payload, "file content differs");

    let (status, reason) = get(&sandbox, "/files/..%2Fetc%2Fpasswd");
    assert_eq!(status, 400, "{reason}");
    assert!(reason.contains("not allowed"), "{reason}");
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn data_written_before_a_graceful_stop_is_there_after_the_next_start() {
    let mut sandbox = boot("durable").await;
    let first_boot = boot_id(&sandbox);
    assert_eq!(put(&sandbox, "/kv/kept", b"across-boots").0, 200);
    assert_eq!(
        put(&sandbox, "/files/kept.txt", b"file-across-boots").0,
        201
    );

    let outcome = sandbox
        .machine()
        .unwrap()
        .stop(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        outcome,
        StopOutcome::Graceful,
        "the guest should power off on the ACPI button"
    );
    let console = std::fs::read_to_string(sandbox.run_dir().console_log()).unwrap();
    assert!(console.contains("appliance stopped cleanly"), "{console}");

    sandbox.forget_machine();
    sandbox.launch().await.unwrap();
    sandbox.wait_ready(READY_TIMEOUT).await.unwrap();
    assert_ne!(
        boot_id(&sandbox),
        first_boot,
        "a new boot has a new boot id"
    );
    assert_eq!(get(&sandbox, "/kv/kept"), (200, "across-boots".to_string()));
    assert_eq!(
        get(&sandbox, "/files/kept.txt"),
        (200, "file-across-boots".to_string())
    );
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn acknowledged_writes_survive_a_kill_and_the_disk_lock_is_released() {
    let mut sandbox = boot("killed").await;
    for index in 0..20 {
        assert_eq!(
            put(
                &sandbox,
                &format!("/kv/k{index}"),
                index.to_string().as_bytes()
            )
            .0,
            200
        );
    }
    let machine = sandbox.machine().unwrap();
    let pid = machine.pid();
    let killed_at = Instant::now();
    machine.kill().await.unwrap();
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "kill waits for the process, not for the guest"
    );
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || machine.has_exited());

    // The image lock died with the process: a new QEMU opens the same disk at once.
    sandbox.forget_machine();
    sandbox.launch().await.unwrap();
    sandbox.wait_ready(READY_TIMEOUT).await.unwrap();
    let (status, body) = get(&sandbox, "/kv?since=0");
    assert_eq!(status, 200);
    let writes: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(
        writes.len(),
        20,
        "every acknowledged write survives SIGKILL of QEMU"
    );
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn a_second_qemu_cannot_open_a_disk_that_a_running_vm_holds() {
    let sandbox = boot("locked").await;
    let mut twin = sandbox.spec.clone();
    twin.name = unique("locked-twin").parse().unwrap();
    twin.nics.clear();
    let twin_dir = tempfile::tempdir().unwrap();
    let options = LaunchOptions {
        qemu: defaults::qemu_binary(),
        accel: ferry_qemu::Accel::Tcg,
        run_dir: ferry_qemu::RunDir::new(twin_dir.path()),
        netns: None,
        host: HostLimits {
            cpus: 2,
            memory: Bytes(8 * Bytes::GIB),
        },
        incoming: None,
        paused: false,
    };
    let error = Machine::launch(&twin, &options)
        .await
        .err()
        .expect("the twin must not start");
    let message = error.to_string();
    assert!(matches!(error, QemuError::StartFailed { .. }), "{message}");
    assert!(
        message.contains("lock"),
        "QEMU's own reason is in the error: {message}"
    );
    assert!(
        get(&sandbox, "/health").0 == 200,
        "the original keeps running"
    );
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn a_restarted_supervisor_reattaches_to_the_same_qemu_and_guest() {
    let mut sandbox = boot("reattach").await;
    let pid = sandbox.machine().unwrap().pid();
    let before = boot_id(&sandbox);

    sandbox.reattach().await.unwrap();
    let machine = sandbox.machine().unwrap();
    assert_eq!(machine.pid(), pid);
    assert_eq!(machine.status().await.unwrap(), RunState::Running);
    machine.guest_agent().ping(AGENT_TIMEOUT).await.unwrap();
    assert_eq!(boot_id(&sandbox), before, "the guest never noticed");

    // And the reattached handle controls the process: kill is observed.
    machine.kill().await.unwrap();
    assert!(machine.has_exited());
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn the_guest_agent_times_out_while_paused_and_recovers_after_resume() {
    let sandbox = boot("qga-pause").await;
    let machine = sandbox.machine().unwrap();
    let agent = machine.guest_agent();
    agent.ping(AGENT_TIMEOUT).await.unwrap();

    machine.pause().await.unwrap();
    assert_eq!(machine.status().await.unwrap(), RunState::Paused);
    let error = agent.ping(Duration::from_secs(1)).await.unwrap_err();
    assert!(
        matches!(error, ferry_qemu::QgaError::Timeout { .. }),
        "{error}"
    );

    machine.resume().await.unwrap();
    // The stale ping reply arrives now; the next command resynchronises past it.
    agent.ping(AGENT_TIMEOUT).await.unwrap();
    let output = agent
        .exec("/bin/echo", &["recovered"], AGENT_TIMEOUT)
        .await
        .unwrap();
    assert_eq!(output.stdout, "recovered\n");
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn reset_reboots_the_guest_with_a_new_boot_id() {
    let sandbox = boot("reset").await;
    let before = boot_id(&sandbox);
    let console = sandbox.run_dir().console_log();
    let ready_lines = || {
        std::fs::read_to_string(&console)
            .unwrap()
            .matches("FERRY-APPLIANCE-READY")
            .count()
    };
    assert_eq!(ready_lines(), 1);

    sandbox.machine().unwrap().reset().await.unwrap();
    let deadline = Instant::now() + READY_TIMEOUT;
    while ready_lines() < 2 {
        assert!(
            Instant::now() < deadline,
            "the guest did not come back after reset"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(boot_id(&sandbox), before);
    sandbox.destroy().await.unwrap();
}

#[tokio::test]
async fn qemu_start_failures_carry_qemus_reason_and_leave_nothing_running() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.qcow2");
    std::fs::write(&garbage, vec![0x42u8; 1 << 20]).unwrap();
    let appliance = appliance();
    let mut spec = ferry_model::VmSpec {
        name: unique("broken").parse().unwrap(),
        cpus: 1,
        memory: Bytes::mib(128),
        cpu_model: "qemu64".into(),
        disks: vec![ferry_model::DiskSpec {
            id: "data".into(),
            path: garbage,
            format: ferry_model::DiskFormat::Qcow2,
            cache: ferry_model::CacheMode::Writethrough,
            read_only: false,
            size: None,
            ..Default::default()
        }],
        nics: vec![],
        boot: ferry_model::Boot::Kernel {
            kernel: appliance.kernel(),
            initrd: Some(appliance.initrd()),
            cmdline: String::new(),
        },
        firmware: Default::default(),
        cdroms: Vec::new(),
        boot_order: ferry_model::default_boot_order(),
        guest_agent: true,
        stop_command: None,
    };
    let run_dir = ferry_qemu::RunDir::new(dir.path().join("run"));
    let options = LaunchOptions {
        qemu: defaults::qemu_binary(),
        accel: ferry_qemu::Accel::Tcg,
        run_dir: run_dir.clone(),
        netns: None,
        host: HostLimits {
            cpus: 2,
            memory: Bytes(8 * Bytes::GIB),
        },
        incoming: None,
        paused: false,
    };
    let error = Machine::launch(&spec, &options)
        .await
        .err()
        .expect("a non-qcow2 file must not start");
    assert!(error.to_string().contains("qcow2"), "{error}");
    assert!(
        ferry_qemu::process::QemuProcess::find(&run_dir).is_err(),
        "nothing left running"
    );

    spec.boot = ferry_model::Boot::Kernel {
        kernel: "/nonexistent/vmlinuz".into(),
        initrd: None,
        cmdline: String::new(),
    };
    let error = Machine::launch(&spec, &options).await.err().unwrap();
    assert!(
        error
            .to_string()
            .ends_with("kernel /nonexistent/vmlinuz does not exist"),
        "{error}"
    );

    spec.memory = Bytes(0);
    let error = Machine::launch(&spec, &options).await.err().unwrap();
    assert!(error.to_string().contains("memory"), "{error}");
}

/// Under TCG, QEMU 7.2 loses guest stores during a long pre-copy unless the VM's RAM
/// size keeps it off a buggy dirty-bitmap fast path (see `ferry_qemu::cmdline`). The
/// paused source and the loaded destination must then hold the same memory, byte for
/// byte, even with the guest busy on its network for the whole copy.
#[tokio::test]
async fn a_throttled_live_migration_under_network_load_delivers_identical_memory() {
    let sandbox = boot("precopy").await;
    let source = sandbox.machine().unwrap();
    // Packets in both directions keep the guest kernel writing while memory is copied.
    source
        .guest_agent()
        .exec(
            "/bin/sh",
            &["-c", "ping -i 0.01 10.77.0.1 >/dev/null 2>&1 &"],
            AGENT_TIMEOUT,
        )
        .await
        .unwrap();

    let mut spec = sandbox.spec.clone();
    for nic in &mut spec.nics {
        nic.tap = format!("{}-in", nic.tap);
    }
    let dir = sandbox.options.dir.join("incoming");
    let options = LaunchOptions {
        qemu: sandbox.options.qemu.clone(),
        accel: sandbox.options.accel,
        run_dir: ferry_qemu::RunDir::new(&dir),
        netns: Some(sandbox.netns().unwrap().name().to_string()),
        host: HostLimits {
            cpus: 2,
            memory: Bytes(16 * Bytes::GIB),
        },
        incoming: Some(ferry_qemu::Incoming::Defer),
        paused: true,
    };
    let destination = Machine::launch(&spec, &options).await.unwrap();
    let compared = async {
        destination
            .migrate_incoming(&format!("tcp:{}:0", ferry_lab::sandbox::HOST_ADDRESS))
            .await?;
        let (address, port) = destination.incoming_address().await?.expect("port");
        source
            .set_migration_capabilities(&[("auto-converge", true), ("events", true)])
            .await?;
        // 16 MiB/s makes the copy take several seconds: many dirty-bitmap syncs.
        source
            .set_migration_parameters(
                serde_json::json!({ "downtime-limit": 50, "max-bandwidth": 16 << 20 }),
            )
            .await?;
        source.migrate(&format!("tcp:{address}:{port}")).await?;
        let info = source
            .wait_migration(Duration::from_millis(100), Duration::from_secs(120))
            .await?;
        assert_eq!(
            info.status,
            ferry_qemu::MigrationStatus::Completed,
            "{info:?}"
        );
        while destination.status().await? == RunState::Inmigrate {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let memory = Bytes::mib(256);
        let (before, after) = (dir.join("source.mem"), dir.join("destination.mem"));
        source.save_memory(&before, memory).await?;
        destination.save_memory(&after, memory).await?;
        let (before, after) = (
            std::fs::read(before).unwrap(),
            std::fs::read(after).unwrap(),
        );
        Ok::<_, QemuError>(
            before
                .chunks(4096)
                .zip(after.chunks(4096))
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(page, _)| format!("{:#x}", page * 4096))
                .collect::<Vec<_>>(),
        )
    }
    .await;
    destination.kill().await.unwrap();
    // A leftover is harmless: it is replaced or cleaned on the next run.
    if let Err(error) = std::fs::remove_dir_all(&dir) {
        eprintln!("a leftover is harmless: {error}");
    }
    sandbox.destroy().await.unwrap();
    let stale = compared.unwrap();
    assert!(
        stale.is_empty(),
        "{} pages differ after the migration, first {:?}",
        stale.len(),
        &stale[..stale.len().min(8)]
    );
}
