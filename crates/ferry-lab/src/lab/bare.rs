//! The baseline Ferry is measured against besides the reference systems: the same
//! appliance guest as a plain QEMU process on a lab host, no agent and no etcd, moved
//! to another lab host by hand the way QEMU's documentation does it — a second QEMU
//! with `-incoming`, `migrate` on the source, QEMU's default migration settings. The
//! guest uses the lab's switches like a Ferry VM, so a client sees the same network.
//!
//! Its QEMUs live under the hosts' run directories (`bare/`), where `ferry lab down`
//! and a host power-off find them, so a crashed benchmark leaves nothing behind.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_model::{Bytes, HostLimits, MacAddr, VmSpec};
use ferry_qemu::{Accel, Incoming, LaunchOptions, Machine, MigrationInfo, RunDir};

use super::spec::{LabNet, LabSpec, HOST_BUSINESS_BRIDGE};
use super::{Lab, LabError};
use crate::appliance::{Appliance, GuestNetwork, READY_MARKER};
use crate::netns::ip;

/// The business address the bare VM takes: above the cluster's VM range (…250), so a
/// Ferry VM never gets it.
const ADDRESS_LAST_OCTET: u8 = 251;
const READY_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Where a bare QEMU of `host` keeps its run directory; `slot` tells the source and
/// the destination of a migration apart.
pub fn bare_run_dir(spec: &LabSpec, host: u32, slot: &str) -> PathBuf {
    spec.host_run_dir(host).join("bare").join(slot)
}

/// A plain QEMU running the appliance on one lab host.
pub struct BareVm {
    spec: VmSpec,
    lab: LabSpec,
    accel: Accel,
    host: u32,
    slot: &'static str,
    machine: Option<Machine>,
    address: String,
    disk_dir: PathBuf,
}

impl BareVm {
    /// Creates the disk on the shared pool, boots the guest on `host` and waits until
    /// the appliance is ready.
    pub async fn boot(lab: &Lab, name: &str, memory: Bytes, host: u32) -> Result<BareVm, LabError> {
        let spec = lab.spec().clone();
        let fail = |problem: String| LabError::Spec {
            lab: spec.name.clone(),
            problem: format!("bare QEMU VM {name}: {problem}"),
        };
        let accel = lab.state().accel.unwrap_or(Accel::Tcg);
        let appliance = Appliance::load(&spec.appliance_image_dir())
            .map_err(|error| fail(error.to_string()))?;
        let disk_dir = spec.shared_pool().join("bare").join(name);
        std::fs::create_dir_all(&disk_dir)
            .map_err(|error| fail(format!("cannot create {}: {error}", disk_dir.display())))?;
        let disk = disk_dir.join("data.qcow2");
        crate::sandbox::create_disk(&disk, Bytes(Bytes::GIB))
            .map_err(|error| fail(error.to_string()))?;
        let business = spec.business_network();
        let address = std::net::Ipv4Addr::new(10, spec.subnet_base, 2, ADDRESS_LAST_OCTET);
        let network = GuestNetwork {
            address: format!("{address}/{}", business.prefix),
            gateway: business.gateway.map(|gateway| gateway.to_string()),
        };
        let vm_spec = appliance
            .vm_spec(name, memory, disk, MacAddr::tap_name(name, 0), &network)
            .map_err(|error| fail(format!("{error}")))?;
        let mut vm = BareVm {
            spec: vm_spec,
            lab: spec,
            accel,
            host,
            slot: "a",
            machine: None,
            address: address.to_string(),
            disk_dir,
        };
        let machine = vm.launch(host, vm.slot, false).await?;
        vm.machine = Some(machine);
        vm.wait_ready().await?;
        Ok(vm)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn host(&self) -> u32 {
        self.host
    }

    /// Moves the guest to `host` as QEMU's documentation does: a destination QEMU
    /// listening with `-incoming`, `migrate` on the source with QEMU's default
    /// capabilities and parameters, the destination running on its own when the last
    /// round arrives, the source quit. Returns the source's `query-migrate` at the end.
    pub async fn migrate_to(&mut self, host: u32) -> Result<MigrationInfo, LabError> {
        self.migrate_with(host, None).await
    }

    /// Like `migrate_to`, over TLS as Ferry's agents set it up: each QEMU with its own
    /// host's certificate of the lab's CA, the destination letting in only the peer
    /// named `allowed` (Ferry names the op's source host).
    pub async fn migrate_to_over_tls(
        &mut self,
        host: u32,
        allowed: &str,
    ) -> Result<MigrationInfo, LabError> {
        self.migrate_with(host, Some(allowed)).await
    }

    async fn migrate_with(
        &mut self,
        host: u32,
        tls_peer: Option<&str>,
    ) -> Result<MigrationInfo, LabError> {
        let slot = if self.slot == "a" { "b" } else { "a" };
        let destination = self.launch(host, slot, true).await?;
        let fail = |problem: String| LabError::Spec {
            lab: self.lab.name.clone(),
            problem: format!("bare QEMU migration to host{host}: {problem}"),
        };
        let listen = format!("tcp:{}:0", self.lab.host_address(host, LabNet::Migration));
        let outcome = async {
            if let Some(allowed) = tls_peer {
                let creds_of = |of: u32| {
                    let dir = bare_run_dir(&self.lab, of, "tls");
                    ferry_agent::config::TlsConfig {
                        dir: self.lab.host_tls_dir(of),
                    }
                    .write_qemu_creds(&dir)
                    .map(|()| dir)
                    .map_err(fail)
                };
                destination
                    .accept_migration_over_tls(&creds_of(host)?, allowed)
                    .await
                    .map_err(|error| fail(error.to_string()))?;
                self.machine()?
                    .send_migration_over_tls(&creds_of(self.host)?, &self.lab.host_name(host))
                    .await
                    .map_err(|error| fail(error.to_string()))?;
            }
            destination
                .migrate_incoming(&listen)
                .await
                .map_err(|error| fail(error.to_string()))?;
            let (address, port) = destination
                .incoming_address()
                .await
                .map_err(|error| fail(error.to_string()))?
                .ok_or_else(|| fail("the destination reports no listening address".into()))?;
            let source = self.machine()?;
            source
                .migrate(&format!("tcp:{address}:{port}"))
                .await
                .map_err(|error| fail(error.to_string()))?;
            let info = source
                .wait_migration(Duration::from_millis(20), MIGRATION_TIMEOUT)
                .await
                .map_err(|error| fail(error.to_string()))?;
            if info.status != ferry_qemu::MigrationStatus::Completed {
                // The destination often knows why (a refused peer, a bad stream).
                let why = match destination.query_migrate().await {
                    Ok(there) => there.error.unwrap_or_else(|| {
                        RunDir::new(bare_run_dir(&self.lab, host, slot)).last_words()
                    }),
                    Err(error) => error.to_string(),
                };
                return Err(fail(format!(
                    "{:?}: {} (destination: {why})",
                    info.status,
                    info.error.clone().unwrap_or_default()
                )));
            }
            Ok(info)
        }
        .await;
        match outcome {
            Ok(info) => {
                if let Some(source) = self.machine.take() {
                    // It may have exited already.
                    if let Err(error) = source.kill().await {
                        tracing::debug!("it may have exited already: {error}");
                    }
                }
                self.machine = Some(destination);
                self.host = host;
                self.slot = slot;
                Ok(info)
            }
            Err(error) => {
                // It may have exited already.
                if let Err(error) = destination.kill().await {
                    tracing::debug!("it may have exited already: {error}");
                }
                Err(error)
            }
        }
    }

    /// Kills the QEMU and removes its disk and run directories.
    pub async fn destroy(mut self) {
        if let Some(machine) = self.machine.take() {
            // It may have exited already.
            if let Err(error) = machine.kill().await {
                tracing::debug!("it may have exited already: {error}");
            }
        }
        self.remove_files();
    }

    fn machine(&self) -> Result<&Machine, LabError> {
        self.machine.as_ref().ok_or_else(|| LabError::Spec {
            lab: self.lab.name.clone(),
            problem: format!("bare QEMU VM {} is not running", self.spec.name),
        })
    }

    fn remove_files(&self) {
        for host in self.lab.host_numbers() {
            // A leftover is harmless: it is replaced or cleaned on the next run.
            if let Err(error) = std::fs::remove_dir_all(self.lab.host_run_dir(host).join("bare")) {
                tracing::debug!("a leftover is harmless: {error}");
            }
        }
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_dir_all(&self.disk_dir) {
            tracing::debug!("a leftover is harmless: {error}");
        }
    }

    /// Starts QEMU for this guest in `host`'s namespace and joins its tap to the host's
    /// business bridge, as an agent would.
    async fn launch(&self, host: u32, slot: &str, incoming: bool) -> Result<Machine, LabError> {
        let run_dir = RunDir::new(bare_run_dir(&self.lab, host, slot));
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_file(run_dir.console_log()) {
            tracing::debug!("a leftover is harmless: {error}");
        }
        let namespace = self.lab.namespace(host);
        let options = LaunchOptions {
            qemu: crate::defaults::qemu_binary(),
            accel: self.accel,
            run_dir,
            netns: Some(namespace.clone()),
            host: HostLimits {
                cpus: std::thread::available_parallelism().map_or(1, |count| count.get() as u32),
                memory: Bytes(16 * Bytes::GIB),
            },
            incoming: incoming.then_some(Incoming::Defer),
            // QEMU's default: the destination runs the guest as soon as it has arrived.
            paused: false,
        };
        let fail = |problem: String| LabError::Spec {
            lab: self.lab.name.clone(),
            problem: format!("bare QEMU VM {} on host{host}: {problem}", self.spec.name),
        };
        let machine = Machine::launch(&self.spec, &options)
            .await
            .map_err(|error| fail(error.to_string()))?;
        for nic in &self.spec.nics {
            if let Err(error) = ip(&[
                "-n",
                &namespace,
                "link",
                "set",
                &nic.tap,
                "master",
                HOST_BUSINESS_BRIDGE,
                "up",
            ]) {
                // It may have exited already.
                if let Err(error) = machine.kill().await {
                    tracing::debug!("it may have exited already: {error}");
                }
                return Err(fail(format!("cannot attach tap {}: {error}", nic.tap)));
            }
        }
        Ok(machine)
    }

    async fn wait_ready(&self) -> Result<(), LabError> {
        let machine = self.machine()?;
        let console = machine.run_dir().console_log();
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains(READY_MARKER) {
                return Ok(());
            }
            let problem = if machine.has_exited() {
                "QEMU exited before the guest was ready"
            } else if started.elapsed() > READY_TIMEOUT {
                "the guest was not ready within 120 s"
            } else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            return Err(LabError::Spec {
                lab: self.lab.name.clone(),
                problem: format!("bare QEMU VM {}: {problem}", self.spec.name),
            });
        }
    }
}

impl Drop for BareVm {
    fn drop(&mut self) {
        // A benchmark that failed before `destroy`: the pid is this QEMU's own.
        if let Some(machine) = self.machine.take() {
            let pid = machine.pid();
            // It may have exited already.
            if let Err(error) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                tracing::debug!("it may have exited already: {error}");
            }
            for _ in 0..100 {
                if !ferry_qemu::process::is_our_qemu(pid, &machine.run_dir().qmp_socket()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            self.remove_files();
        }
    }
}
