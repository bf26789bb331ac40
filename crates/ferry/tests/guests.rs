//! Real guests in the lab: the image library, VMs made from disk images and installer
//! ISOs under SeaBIOS and OVMF, CD-ROMs swapped while running, cloud-init seeds, clean
//! application stops, guests without an agent, and everything refused before anything
//! is made. The installer is the appliance on a GRUB ISO (`Appliance::boot_iso`), which
//! is also a hybrid disk image.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, DiskRequest, ExecRequest, NicRequest, VmView};
use ferry_api::ApiError;
use sha2::Digest;

/// Waits until QEMU runs the VM (on `host`, when named) and its guest agent answers;
/// the Debian guest boots systemd and cloud-init under TCG, so this waits long.
async fn answering_on(client: &ApiClient, name: &str, host: Option<&str>) -> VmView {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let vm = client.get_vm(name).await.unwrap();
        let where_wanted = host.is_none_or(|host| vm.host.as_deref() == Some(host));
        if vm.state == "running" && vm.guest_agent && where_wanted {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} never answered: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn answering(client: &ApiClient, name: &str) -> VmView {
    answering_on(client, name, None).await
}

/// Live-migrates the VM to `host` and checks that the migration completed.
async fn migrate(client: &ApiClient, name: &str, host: &str) {
    let op = client
        .migrate_vm(
            name,
            &ferry_api::types::MigrateRequest {
                to: Some(host.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(300),
        client.wait_op(&op.id, Duration::from_millis(200), |_| {}),
    )
    .await
    .expect("the migration ends within 5 minutes")
    .unwrap();
    assert_eq!(done.status, "completed", "{done:?}");
    assert_eq!(
        client.get_vm(name).await.unwrap().host.as_deref(),
        Some(host)
    );
}

async fn exec(client: &ApiClient, name: &str, script: &str) -> (Option<i64>, String) {
    let output = client
        .exec_vm(
            name,
            &ExecRequest {
                command: vec!["/bin/sh".into(), "-c".into(), script.into()],
                timeout_seconds: Some(30),
            },
        )
        .await
        .unwrap();
    (output.exit_code, output.stdout)
}

fn installer_iso(dir: &Path, hostname: &str) -> PathBuf {
    let appliance =
        ferry_lab::appliance::Appliance::load(&ferry_lab::defaults::appliance_dir()).unwrap();
    let iso = dir.join(format!("{hostname}.iso"));
    appliance.boot_iso(&iso, hostname).unwrap();
    iso
}

async fn import(
    client: &ApiClient,
    name: &str,
    file: &Path,
    format: Option<&str>,
) -> ferry_api::types::ImageView {
    client
        .import_image(name, file, format, true, |_| {})
        .await
        .unwrap_or_else(|error| panic!("import {name}: {error}"))
}

/// Types `input` on a serial console and waits for `wanted` in what comes back.
async fn serial_answer(
    mut console: ferry_api::client::ConsoleStream,
    input: &str,
    wanted: &str,
) -> bool {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The shell may still be starting: type again until it answers.
    while Instant::now() < deadline {
        console
            .send(Message::Binary(input.as_bytes().to_vec().into()))
            .await
            .unwrap();
        let until = Instant::now() + Duration::from_secs(3);
        while let Ok(Some(Ok(message))) = tokio::time::timeout(
            until.saturating_duration_since(Instant::now()),
            console.next(),
        )
        .await
        {
            if let Message::Binary(bytes) = message {
                seen.push_str(&String::from_utf8_lossy(&bytes));
                // The echo of the command itself holds "$((40+2))", not the answer.
                if seen.lines().any(|line| line.trim() == wanted) {
                    return true;
                }
            }
        }
    }
    eprintln!("the console showed: {seen}");
    false
}

fn vm_dir(shared: &Path, name: &str) -> PathBuf {
    shared.join("vms").join(name)
}

fn create(name: &str, host: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        cpus: 1,
        memory: "256M".into(),
        host: Some(host.into()),
        ..CreateVmRequest::default()
    }
}

#[tokio::test]
async fn images_and_vm_definitions_are_checked_before_anything_is_made() {
    let (mut lab, _guard, client) = common::lab(30, 2).await;
    assert_eq!(lab.unhealthy().await, None, "a fresh lab is whole");
    let shared = lab.spec().shared_pool();
    let dir = tempfile::tempdir().unwrap();

    // Images: the format named must be the file's; a backing file and an empty file
    // are refused; nothing is left on the pool.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let error = client
        .import_image("notqcow", &raw, Some("qcow2"), true, |_| {})
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ApiError::BadRequest("image notqcow: the file is raw, not qcow2".into())
    );
    let base = dir.path().join("base.qcow2");
    ferry_qemu::image::create_blank(
        &base,
        ferry_model::DiskFormat::Qcow2,
        ferry_model::Bytes::mib(16),
    )
    .unwrap();
    let overlay = dir.path().join("overlay.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay)
        .status()
        .unwrap();
    assert!(made.success());
    let error = client
        .import_image("overlay", &overlay, None, true, |_| {})
        .await
        .unwrap_err();
    assert!(error.to_string().contains("has a backing file"), "{error}");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    let error = client
        .import_image("empty", &empty, None, true, |_| {})
        .await
        .unwrap_err();
    assert_eq!(error, ApiError::BadRequest("the upload is empty".into()));
    let error = client
        .import_image("Bad Name", &raw, None, true, |_| {})
        .await
        .unwrap_err();
    assert!(
        matches!(error, ApiError::BadRequest(ref m) if m.starts_with("image name")),
        "{error}"
    );
    let error = client
        .import_image("ghost", &dir.path().join("missing.img"), None, true, |_| {})
        .await
        .unwrap_err();
    assert!(error.to_string().contains("missing.img"), "{error}");
    let left: Vec<_> = std::fs::read_dir(shared.join("images"))
        .unwrap()
        .flatten()
        .map(|entry| entry.file_name().to_string_lossy().to_string())
        .filter(|name| name != "appliance")
        .collect();
    assert!(left.is_empty(), "refused imports left {left:?}");

    // A good import: detected, checksummed, listed; a second one of that name refused.
    let image = import(&client, "blank", &base, None).await;
    assert_eq!(image.format, "qcow2");
    assert_eq!(image.virtual_size, Some(16 << 20));
    let digest = sha2::Sha256::digest(std::fs::read(&base).unwrap());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(image.sha256.as_deref(), Some(hex.as_str()));
    assert!(client
        .list_images()
        .await
        .unwrap()
        .iter()
        .any(|known| known.name == "blank"));
    let again = client
        .import_image("blank", &base, None, true, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(again, ApiError::Conflict(_)), "{again}");
    let iso = installer_iso(dir.path(), "checks");
    import(&client, "installer", &iso, None).await;

    // VM definitions: each refusal names the problem, and nothing is made.
    let refusals: Vec<(CreateVmRequest, &str)> = vec![
        (
            CreateVmRequest {
                nics: vec!["storage".parse::<NicRequest>().unwrap()],
                ..create("bad-net", "host1")
            },
            "nics[0]: no host is on network \"storage\"",
        ),
        (
            CreateVmRequest {
                disks: vec!["1G@fast".parse::<DiskRequest>().unwrap()],
                ..create("bad-pool", "host1")
            },
            "disks[0]: pool \"fast\" is not offered by any host",
        ),
        (
            CreateVmRequest {
                blank: true,
                disks: vec!["4000T".parse::<DiskRequest>().unwrap()],
                ..create("too-big", "host1")
            },
            "free",
        ),
        (
            CreateVmRequest {
                image: Some("installer".into()),
                ..create("iso-disk", "host1")
            },
            "is an ISO: create the VM with --iso installer",
        ),
        (
            CreateVmRequest {
                image: Some("blank".into()),
                cdrom: Some("blank".into()),
                ..create("bad-cd", "host1")
            },
            "cdrom: image blank is qcow2, not an ISO",
        ),
        (
            CreateVmRequest {
                image: Some("blank".into()),
                cloud_init: Some(ferry_api::types::CloudInitRequest {
                    user_data: Some("#!/bin/sh\nreboot\n".into()),
                    ..Default::default()
                }),
                ..create("bad-seed", "host1")
            },
            "user-data must start with a #cloud-config line",
        ),
        (
            CreateVmRequest {
                image: Some("windows".into()),
                ..create("no-image", "host1")
            },
            "image: image \"windows\" does not exist",
        ),
    ];
    for (request, expected) in refusals {
        let name = request.name.clone();
        let error = client.create_vm(&request).await.unwrap_err();
        assert!(
            matches!(error, ApiError::BadRequest(ref message) if message.contains(expected)),
            "{name}: {error}"
        );
        assert!(
            matches!(client.get_vm(&name).await, Err(ApiError::NotFound(_))),
            "{name} exists"
        );
        assert!(!vm_dir(&shared, &name).exists(), "{name} left files");
    }
    for (body, expected) in [
        (
            r#"{"name":"fw","cpus":1,"memory":"256M","firmware":"coreboot"}"#,
            "firmware",
        ),
        (
            r#"{"name":"bus","cpus":1,"memory":"256M","disk_bus":"ide"}"#,
            "disk_bus",
        ),
    ] {
        let ca = std::fs::read(lab.spec().ca_file()).unwrap();
        let response = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap()
            .post(format!("{}/api/v1/vms", lab.spec().api_url(1)))
            .bearer_auth(lab.token().unwrap())
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let text = response.text().await.unwrap();
        assert!(text.contains(expected), "{text}");
    }

    // A blank VM: no guest agent, so its heartbeat and stall monitors stay out of the
    // way; the image it was made from cannot go while it exists.
    let vm = client
        .create_vm(&CreateVmRequest {
            image: Some("blank".into()),
            ..create("user", "host1")
        })
        .await
        .unwrap();
    assert_eq!(
        vm.disks[0].path,
        vm_dir(&shared, "user")
            .join("disk0.qcow2")
            .display()
            .to_string()
    );
    let error = client.delete_image("blank").await.unwrap_err();
    assert_eq!(
        error,
        ApiError::Conflict("image blank is used by user: delete them or eject it first".into())
    );
    let blank = client
        .create_vm(&CreateVmRequest {
            blank: true,
            ..create("empty", "host1")
        })
        .await
        .unwrap();
    assert!(!blank.has_guest_agent);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = client.get_vm("empty").await.unwrap();
        let stall = vm.monitors.iter().find(|monitor| monitor.check == "stall");
        if stall.is_some_and(|stall| stall.state == "off") {
            assert!(
                stall.unwrap().last_error.as_deref() == Some("no guest agent"),
                "{vm:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stall monitor of a blank VM: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Two creates of one name at once, through two hosts: one wins, the other is
    // refused and removes nothing of the winner's.
    let other = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    let twin = CreateVmRequest {
        image: Some("blank".into()),
        ..create("twin", "host1")
    };
    let (first, second) = tokio::join!(client.create_vm(&twin), other.create_vm(&twin));
    let won = [&first, &second]
        .iter()
        .filter(|result| result.is_ok())
        .count();
    assert_eq!(won, 1, "{first:?} {second:?}");
    let lost = if first.is_ok() { second } else { first };
    assert!(
        matches!(lost, Err(ApiError::Conflict(ref m)) if m.contains("already exists")),
        "{lost:?}"
    );
    assert!(
        vm_dir(&shared, "twin").join("disk0.qcow2").is_file(),
        "the winner keeps its disk"
    );
    for name in ["user", "empty", "twin"] {
        client.delete_vm(name).await.unwrap();
        assert!(
            !vm_dir(&shared, name).exists(),
            "{name}'s disks are removed with it"
        );
    }
    client.delete_image("blank").await.unwrap();
    assert!(!shared.join("images/blank.qcow2").exists());
    client.delete_image("installer").await.unwrap();

    // What the tour checks before it reuses a lab an earlier run left.
    lab.fault(2, ferry_lab::lab::Fault::AgentKill).unwrap();
    assert_eq!(
        lab.unhealthy().await.as_deref(),
        Some("host2's agent is not running")
    );
    lab.down().unwrap();
}

#[tokio::test]
async fn an_installer_iso_boots_under_bios_and_uefi_and_its_cdrom_is_swapped_while_running() {
    let (lab, _guard, client) = common::lab(31, 2).await;
    let shared = lab.spec().shared_pool();
    let dir = tempfile::tempdir().unwrap();
    let iso = installer_iso(dir.path(), "installer");
    let image = import(&client, "installer", &iso, None).await;
    assert_eq!(image.format, "iso");

    for (name, firmware) in [("inst-bios", "bios"), ("inst-uefi", "uefi")] {
        let vm = client
            .create_vm(&CreateVmRequest {
                iso: Some("installer".into()),
                firmware: Some(firmware.parse().unwrap()),
                disks: vec!["1G".parse().unwrap()],
                ..create(name, "host1")
            })
            .await
            .unwrap();
        assert_eq!(vm.firmware, firmware);
        assert_eq!(vm.cdroms[0].path.as_deref(), Some(image.files[0].as_str()));
        assert!(
            vm_dir(&shared, name).join("disk0.qcow2").is_file(),
            "the blank disk is made at create"
        );
    }
    assert!(vm_dir(&shared, "inst-uefi").join("nvram.fd").is_file());
    assert!(!vm_dir(&shared, "inst-bios").join("nvram.fd").exists());
    for name in ["inst-bios", "inst-uefi"] {
        answering(&client, name).await;
        let (_, cmdline) = exec(&client, name, "cat /proc/cmdline").await;
        assert!(
            cmdline.contains("ferry.hostname=installer"),
            "{name} booted {cmdline}"
        );
    }
    let (bios_efi, _) = exec(&client, "inst-bios", "test -d /sys/firmware/efi").await;
    let (uefi_efi, _) = exec(&client, "inst-uefi", "test -d /sys/firmware/efi").await;
    assert_eq!(
        (bios_efi, uefi_efi),
        (Some(1), Some(0)),
        "SeaBIOS boots one, OVMF the other"
    );

    // The serial console, through the other host's API (one forwarding hop).
    let other = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    let console = other
        .console("inst-bios", ferry_api::console::ConsoleKind::Serial)
        .await
        .unwrap();
    let seen = serial_answer(console, "echo ferry-$((40+2))\n", "ferry-42").await;
    assert!(seen, "the serial console's shell answered");

    // The graphical console: `ferry vm vnc` serves it on a local port, and a real RFB
    // client (Debian's vncsnapshot) completes the handshake and gets a framebuffer.
    let port = ferry_store::etcd_server::free_port();
    let mut proxy = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "vm",
            "vnc",
            "inst-uefi",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("FERRY_API", lab.spec().api_url(2))
        .env("FERRY_TOKEN", lab.token().unwrap())
        .env("FERRY_CA", lab.spec().ca_file())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let snapshot = dir.path().join("screen.jpg");
    let deadline = Instant::now() + Duration::from_secs(30);
    let taken = loop {
        let status = std::process::Command::new("vncsnapshot")
            .args(["-quiet", "-allowblank"])
            .arg(format!("127.0.0.1::{port}"))
            .arg(&snapshot)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        if status.success() || Instant::now() > deadline {
            break status.success();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    proxy.kill().unwrap();
    proxy.wait().unwrap();
    assert!(taken, "vncsnapshot got a framebuffer through the API");
    assert!(std::fs::metadata(&snapshot).unwrap().len() > 0);

    // The CD-ROM changes while the guest runs, and the record keeps what is in it.
    let ejected = client.change_cdrom("inst-bios", "cd0", None).await.unwrap();
    assert_eq!(ejected.cdroms[0].path, None);
    let inserted = client
        .change_cdrom("inst-bios", "cd0", Some("installer"))
        .await
        .unwrap();
    assert_eq!(
        inserted.cdroms[0].path.as_deref(),
        Some(image.files[0].as_str())
    );
    let error = client
        .change_cdrom("inst-bios", "cd9", None)
        .await
        .unwrap_err();
    assert!(
        matches!(error, ApiError::NotFound(ref m) if m.contains("has no CD-ROM drive \"cd9\"")),
        "{error}"
    );
    let error = client.delete_image("installer").await.unwrap_err();
    assert!(
        error.to_string().contains("inst-bios, inst-uefi"),
        "{error}"
    );

    // The UEFI VM moves live with its NVRAM and keeps running under OVMF.
    migrate(&client, "inst-uefi", "host2").await;
    let (efi, _) = exec(&client, "inst-uefi", "test -d /sys/firmware/efi").await;
    assert_eq!(efi, Some(0));

    for name in ["inst-bios", "inst-uefi"] {
        client.delete_vm(name).await.unwrap();
        assert!(!vm_dir(&shared, name).exists());
    }
    client.delete_image("installer").await.unwrap();
    lab.down().unwrap();
}

#[tokio::test]
async fn a_disk_image_vm_boots_from_sata_with_an_e1000_nic_a_seed_and_a_clean_stop() {
    let (lab, _guard, client) = common::lab(32, 2).await;
    let shared = lab.spec().shared_pool();
    let dir = tempfile::tempdir().unwrap();
    // The hybrid ISO as a disk image: the first disk of the VM is a copy of it.
    let iso = installer_iso(dir.path(), "fromdisk");
    let image = import(&client, "hybrid", &iso, Some("raw")).await;
    assert_eq!(image.format, "raw");

    // Asked of host2's agent: the local pool's disk is host1's to make, so the create
    // goes there.
    let other = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    let vm = other
        .create_vm(&CreateVmRequest {
            image: Some("hybrid".into()),
            disk_bus: Some(ferry_model::DiskBus::Sata),
            nics: vec!["business,model=e1000".parse().unwrap()],
            disks: vec!["256M".parse().unwrap(), "64M@host1-local".parse().unwrap()],
            stop_command: Some("sleep 1; echo app stopped > /dev/console".into()),
            stop_timeout_seconds: Some(20),
            ..CreateVmRequest {
                host: None,
                ..create("disky", "host1")
            }
        })
        .await
        .unwrap();
    assert_eq!(
        vm.host.as_deref(),
        Some("host1"),
        "a VM with a disk on host1-local runs there"
    );
    assert_eq!(vm.disks.len(), 2);
    assert_eq!(vm.disks[1].pool.as_deref(), Some("host1-local"));
    assert!(
        vm.cdroms.iter().any(|cd| cd.id == "cidata"),
        "a disk image gets a cloud-init seed"
    );
    let seed = std::fs::read(vm_dir(&shared, "disky").join("seed.iso")).unwrap();
    assert_eq!(&seed[32769..32774], b"CD001");
    let seed_text = String::from_utf8_lossy(&seed);
    assert!(seed_text.contains("\"local-hostname\": \"disky\""));
    assert!(
        seed_text.contains(vm.ip.as_deref().unwrap()),
        "the seed carries the pool address"
    );
    let vm = answering(&client, "disky").await;
    let (_, cmdline) = exec(&client, "disky", "cat /proc/cmdline").await;
    assert!(cmdline.contains("ferry.hostname=fromdisk"), "{cmdline}");
    let argv = std::fs::read(format!("/proc/{}/cmdline", vm.pid.unwrap())).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains("ide-hd,bus=ide.0,id=vdisk-disk0"), "{argv}");
    assert!(argv.contains("-device e1000,id=nic0"), "{argv}");

    // A clean stop runs the application's stop command first and says how long it took.
    client.stop_vm("disky").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let stopped = loop {
        let events = client.list_events(200).await.unwrap();
        if let Some(event) = events
            .iter()
            .find(|event| event.subject == "vm/disky" && event.kind == "stopped")
        {
            break event.message.clone();
        }
        assert!(Instant::now() < deadline, "no stopped event");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(stopped.contains("the application stopped in"), "{stopped}");

    // A start never makes a disk: a vanished one fails the start and says so.
    let disk = vm_dir(&shared, "disky").join("disk0.qcow2");
    let aside = dir.path().join("aside.qcow2");
    std::fs::rename(&disk, &aside).unwrap();
    client.start_vm("disky").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let vm = client.get_vm("disky").await.unwrap();
        if vm.state == "failed" {
            assert!(
                vm.error.as_deref().unwrap_or("").contains("does not exist"),
                "{vm:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{vm:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(!disk.exists(), "no blank disk was made in its place");
    std::fs::rename(&aside, &disk).unwrap();

    client.delete_vm("disky").await.unwrap();
    assert!(!vm_dir(&shared, "disky").exists());
    assert!(!lab.spec().local_pool(1).join("vms/disky").exists());
    client.delete_image("hybrid").await.unwrap();
    lab.down().unwrap();
}

#[tokio::test]
async fn the_debian_guest_boots_under_bios_and_uefi_with_cloud_init_and_moves_live_and_by_ha() {
    let image = ferry_lab::debian::cached(&ferry_lab::defaults::debian_image_dir())
        .expect("the Debian image (the README's test command builds it: ferry image build-debian)");
    let (mut lab, _guard, client) = common::lab(33, 2).await;
    let dir = tempfile::tempdir().unwrap();
    import(&client, "debian-12", &image.path, None).await;
    let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFerryTestKeyForCloudInit ops@ferry";
    for (name, firmware) in [("deb-bios", "bios"), ("deb-uefi", "uefi")] {
        client
            .create_vm(&CreateVmRequest {
                image: Some("debian-12".into()),
                firmware: Some(firmware.parse().unwrap()),
                memory: "512M".into(),
                ha: true,
                cloud_init: Some(ferry_api::types::CloudInitRequest {
                    user: Some("ops".into()),
                    ssh_keys: vec![key.into()],
                    ..Default::default()
                }),
                ..create(name, "host1")
            })
            .await
            .unwrap();
    }
    for (name, efi) in [("deb-bios", Some(1)), ("deb-uefi", Some(0))] {
        let vm = answering_on(&client, name, Some("host1")).await;
        let (_, hostname) = exec(&client, name, "hostname").await;
        assert_eq!(hostname.trim(), name, "cloud-init set the hostname");
        let (_, keys) = exec(&client, name, "cat /home/ops/.ssh/authorized_keys").await;
        assert!(
            keys.contains(key),
            "cloud-init made the user with its key: {keys:?}"
        );
        let (sudo, _) = exec(
            &client,
            name,
            "grep -q ops /etc/sudoers.d/90-cloud-init-users",
        )
        .await;
        assert_eq!(sudo, Some(0));
        let (_, addresses) = exec(&client, name, "ip -4 -o addr show").await;
        if !addresses.contains(vm.ip.as_deref().unwrap()) {
            let (_, config) = exec(&client, name, "ls -la /etc/network/interfaces.d/; grep -E \"init-local|Applying net|render|NoCloud|network-config|Traceback|WARN\" /var/log/cloud-init.log | head -40").await;
            panic!(
                "the pool address {:?} is not in {addresses}\n{config}",
                vm.ip
            );
        }
        let (firmware, _) = exec(&client, name, "test -d /sys/firmware/efi").await;
        assert_eq!(firmware, efi, "{name} booted its own firmware");
    }
    let (_, before) = exec(&client, "deb-bios", "cat /proc/sys/kernel/random/boot_id").await;

    // Live migration of the BIOS guest: the same boot, now on host2.
    migrate(&client, "deb-bios", "host2").await;
    answering_on(&client, "deb-bios", Some("host2")).await;
    let (_, after) = exec(&client, "deb-bios", "cat /proc/sys/kernel/random/boot_id").await;
    assert_eq!(before, after, "a live migration does not reboot the guest");

    // HA: host1 loses power; the UEFI guest boots again on host2 from its own disk and
    // NVRAM, and is still itself.
    lab.fault(1, ferry_lab::lab::Fault::PowerOff).unwrap();
    let client = ferry_lab::harness::lab::host_client(&lab, 2).unwrap();
    answering_on(&client, "deb-uefi", Some("host2")).await;
    let (_, hostname) = exec(&client, "deb-uefi", "hostname").await;
    assert_eq!(hostname.trim(), "deb-uefi");
    let (firmware, _) = exec(&client, "deb-uefi", "test -d /sys/firmware/efi").await;
    assert_eq!(firmware, Some(0));

    lab.heal(1).unwrap();
    for name in ["deb-bios", "deb-uefi"] {
        client.delete_vm(name).await.unwrap();
    }
    client.delete_image("debian-12").await.unwrap();
    drop(dir);
    lab.down().unwrap();
}
