//! The VMs running on this host: their QEMU handles, and the local half of every
//! operation (start, stop, reset, delete, exec). QEMUs found in the run directory when
//! the agent starts are reattached, never restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ferry_api::types::ExecResponse;
use ferry_api::ApiError;
use ferry_model::cluster::VmRecord;
use ferry_model::{Bytes, HostLimits, VmName, VmSpec};
use ferry_qemu::{Accel, Incoming, LaunchOptions, Machine, RunDir};
use futures::future::BoxFuture;
use tokio::sync::Mutex;

use crate::config::AgentConfig;

pub struct LocalVm {
    pub machine: Arc<Machine>,
    /// The last reset request acted on.
    pub reset_seen: u64,
    /// Launched for an incoming migration (or reattached): until it is seen running,
    /// the reconciler checks whether a switch-over left it paused.
    pub awaiting_resume: bool,
}

pub struct Runtime {
    pub config: AgentConfig,
    pub accel: Accel,
    pub limits: HostLimits,
    vms: Mutex<BTreeMap<VmName, LocalVm>>,
    /// VMs with an operation in flight; the reconciler skips them.
    busy: std::sync::Mutex<BTreeSet<VmName>>,
    pub ha: crate::fencing::HaGuard,
    /// VMs this agent asked to move away (placement generation, when): its own watch may
    /// not show the request yet, and it must not restart them here meanwhile.
    leaving: std::sync::Mutex<BTreeMap<VmName, (u64, std::time::Instant)>>,
    /// QEMUs this agent killed on purpose (a monitor's restart or failover), with why:
    /// their exit is not a failure.
    expected_exits: std::sync::Mutex<BTreeMap<VmName, String>>,
}

/// How long a request to leave blocks restarts here without the watch confirming it.
const LEAVING_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

impl Runtime {
    pub fn new(config: AgentConfig, accel: Accel, limits: HostLimits) -> Runtime {
        Runtime {
            ha: crate::fencing::HaGuard::new(config.ha_timing(), config.watchdog_ms()),
            config,
            accel,
            limits,
            vms: Mutex::new(BTreeMap::new()),
            busy: std::sync::Mutex::new(BTreeSet::new()),
            leaving: Default::default(),
            expected_exits: Default::default(),
        }
    }

    /// The VM's QEMU is about to be killed on purpose, for `reason`.
    pub fn expect_exit(&self, vm: &VmName, reason: String) {
        if let Ok(mut expected) = self.expected_exits.lock() {
            expected.insert(vm.clone(), reason);
        }
    }

    /// Why the VM's QEMU was killed on purpose, if it was (once).
    pub fn take_expected_exit(&self, vm: &VmName) -> Option<String> {
        self.expected_exits.lock().ok()?.remove(vm)
    }

    pub fn mark_leaving(&self, vm: &VmName, generation: u64) {
        if let Ok(mut leaving) = self.leaving.lock() {
            leaving.insert(vm.clone(), (generation, std::time::Instant::now()));
        }
    }

    /// This agent asked, under the VM's current placement, to move it away; the mark
    /// lapses once the placement changes, or after a grace period (the cluster's view
    /// of the request governs then).
    pub fn is_leaving(&self, vm: &VmName, entry: &ferry_api::ops::VmEntry) -> bool {
        let generation = entry
            .placement
            .as_ref()
            .map(|placement| placement.value.generation);
        let Ok(mut leaving) = self.leaving.lock() else {
            return false;
        };
        match leaving.get(vm) {
            Some((marked, at)) if Some(*marked) == generation && at.elapsed() < LEAVING_GRACE => {
                true
            }
            Some(_) => {
                leaving.remove(vm);
                false
            }
            None => false,
        }
    }

    fn vms_dir(&self) -> PathBuf {
        self.config.paths.run_dir.join("vms")
    }

    pub fn run_dir(&self, vm: &VmName) -> RunDir {
        RunDir::new(self.vms_dir().join(vm.as_str()))
    }

    /// Finds the QEMUs a previous agent left running and takes them over.
    pub async fn reattach_all(&self) -> Vec<VmName> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.vms_dir()) else {
            return found;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().to_string_lossy().parse::<VmName>() else {
                continue;
            };
            match Machine::attach(&RunDir::new(entry.path())).await {
                Ok(machine) => {
                    tracing::info!("reattached to VM {name} (QEMU pid {})", machine.pid());
                    self.vms.lock().await.insert(
                        name.clone(),
                        LocalVm {
                            machine: Arc::new(machine),
                            reset_seen: u64::MAX,
                            awaiting_resume: true,
                        },
                    );
                    found.push(name);
                }
                Err(error) => {
                    tracing::debug!("not reattaching {}: {error}", entry.path().display())
                }
            }
        }
        found
    }

    /// Claims a VM for one operation; `None` if another is in flight.
    pub fn claim(self: &Arc<Self>, vm: &VmName) -> Option<Claim> {
        let mut busy = self
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        busy.insert(vm.clone()).then(|| Claim {
            runtime: self.clone(),
            vm: vm.clone(),
        })
    }

    pub async fn machine(&self, vm: &VmName) -> Option<Arc<Machine>> {
        self.vms
            .lock()
            .await
            .get(vm)
            .map(|local| local.machine.clone())
    }

    pub async fn local_names(&self) -> Vec<VmName> {
        self.vms.lock().await.keys().cloned().collect()
    }

    pub async fn reset_seen(&self, vm: &VmName) -> u64 {
        self.vms
            .lock()
            .await
            .get(vm)
            .map(|local| local.reset_seen)
            .unwrap_or(0)
    }

    /// Whether the VM's QEMU may still be paused by a switch-over (see `LocalVm`).
    pub async fn awaits_resume(&self, vm: &VmName) -> bool {
        self.vms
            .lock()
            .await
            .get(vm)
            .is_some_and(|local| local.awaiting_resume)
    }

    /// The VM's QEMU was resumed (or seen running): no switch-over left to finish.
    pub async fn mark_resumed(&self, vm: &VmName) {
        if let Some(local) = self.vms.lock().await.get_mut(vm) {
            local.awaiting_resume = false;
        }
    }

    /// A reattached VM adopts the reset serial it finds, so an agent restart never
    /// replays an old reset.
    pub async fn adopt_reset_serial(&self, vm: &VmName, serial: u64) {
        if let Some(local) = self.vms.lock().await.get_mut(vm) {
            if local.reset_seen == u64::MAX {
                local.reset_seen = serial;
            }
        }
    }

    /// Starts the VM. Its disks were made when it was created; a start never makes
    /// one (a disk that vanished must not come back blank), it fails and says so.
    /// QEMU starts with its vCPUs stopped and runs the guest only if the lease this
    /// start began under is still held (a launch that outlived a lease loss, even one
    /// followed by a new lease, may be racing an HA restart elsewhere).
    pub async fn start(&self, record: &VmRecord) -> Result<Arc<Machine>, String> {
        self.start_then(record, async { Ok(()) }).await
    }

    /// [`Runtime::start`], loading the checkpoint the record says to resume from (if
    /// any) while the vCPUs are still stopped, then running `before_run` (which
    /// clears that checkpoint from the record, so that no later start loads it
    /// again), and only then running the guest.
    pub async fn start_then(
        &self,
        record: &VmRecord,
        before_run: impl std::future::Future<Output = Result<(), String>>,
    ) -> Result<Arc<Machine>, String> {
        let epoch = self.ha.epoch();
        if !self.ha.may_start() {
            return Err("this host has no fresh lease".into());
        }
        let machine = self
            .launch(&record.spec, record.reset_serial, LaunchKind::Paused)
            .await?;
        let vm = &record.spec.name;
        if !self.ha.may_start() || self.ha.epoch() != epoch {
            return Err(match self.kill(vm).await {
                Ok(()) => "the lease was lost while QEMU started; it was not run".into(),
                Err(error) => {
                    format!("the lease was lost while QEMU started, and killing it failed: {error}")
                }
            });
        }
        if let Some(tag) = &record.resume_checkpoint {
            let loaded = crate::checkpoint::load_at_start(&machine, &record.spec, tag).await;
            let ready = match loaded {
                Ok(()) => before_run.await,
                Err(error) => Err(error),
            };
            if let Err(error) = ready {
                let killed = self
                    .kill(vm)
                    .await
                    .err()
                    .map(|kill| format!(" (and killing it failed: {kill})"));
                return Err(format!(
                    "checkpoint {tag} could not be resumed: {error}{}",
                    killed.unwrap_or_default()
                ));
            }
        }
        if let Err(error) = machine.resume().await {
            let killed = self
                .kill(vm)
                .await
                .err()
                .map(|kill| format!(" (and killing it failed: {kill})"));
            return Err(format!(
                "QEMU started but the guest could not be run: {error}{}",
                killed.unwrap_or_default()
            ));
        }
        Ok(machine)
    }

    /// Starts a QEMU that waits for an incoming migration (`-incoming defer`) with its
    /// vCPUs stopped: it runs only when the placement names this host.
    pub async fn launch_incoming(
        &self,
        spec: &VmSpec,
        reset_serial: u64,
    ) -> Result<Arc<Machine>, String> {
        self.launch(spec, reset_serial, LaunchKind::Incoming).await
    }

    async fn launch(
        &self,
        spec: &VmSpec,
        reset_serial: u64,
        kind: LaunchKind,
    ) -> Result<Arc<Machine>, String> {
        let incoming = kind == LaunchKind::Incoming;
        let options = LaunchOptions {
            qemu: self.config.qemu.binary.clone(),
            accel: self.accel,
            run_dir: self.run_dir(&spec.name),
            netns: None,
            host: self.limits,
            incoming: incoming.then_some(Incoming::Defer),
            paused: true,
        };
        let machine = Machine::launch(spec, &options)
            .await
            .map_err(|error| error.to_string())?;
        for nic in &spec.nics {
            let Some(network) = self.config.networks.get(&nic.network) else {
                let killed = machine.kill().await;
                return Err(format!(
                    "network {} is not configured on this host{}",
                    nic.network,
                    killed
                        .err()
                        .map(|error| format!(" (and killing QEMU failed: {error})"))
                        .unwrap_or_default()
                ));
            };
            let Some(bridge) = network.bridge.as_deref() else {
                continue;
            };
            if let Err(error) = ip(&["link", "set", &nic.tap, "master", bridge, "up"]) {
                let killed = machine.kill().await;
                return Err(format!(
                    "cannot attach tap {} to bridge {bridge}: {error}{}",
                    nic.tap,
                    killed
                        .err()
                        .map(|error| format!(" (and killing QEMU failed: {error})"))
                        .unwrap_or_default()
                ));
            }
        }
        let machine = Arc::new(machine);
        self.vms.lock().await.insert(
            spec.name.clone(),
            LocalVm {
                machine: machine.clone(),
                reset_seen: reset_serial,
                awaiting_resume: incoming,
            },
        );
        Ok(machine)
    }

    /// This host's address on a network, without the prefix length.
    pub fn address_on(&self, network: &str) -> Option<String> {
        let address = self.config.networks.get(network)?.address.as_ref()?;
        Some(address.split('/').next().unwrap_or(address).to_string())
    }

    /// Stops the VM cleanly: its stop command first (the application stops for sure
    /// before the OS does), then the ACPI power button, then power-off when the guest
    /// has not shut down within the grace period.
    pub async fn stop(&self, vm: &VmName) -> Result<StopReport, String> {
        let Some(machine) = self.machine(vm).await else {
            return Ok(StopReport::default());
        };
        let application = match &machine.spec().stop_command {
            Some(stop) => Some(stop_application(&machine, stop).await),
            None => None,
        };
        let grace = Duration::from_secs(self.config.qemu.stop_grace_seconds);
        let started = std::time::Instant::now();
        let outcome = machine
            .stop(grace)
            .await
            .map_err(|error| error.to_string())?;
        self.forget(vm).await?;
        Ok(StopReport {
            application,
            shutdown: Some((outcome, started.elapsed())),
        })
    }

    pub async fn kill(&self, vm: &VmName) -> Result<(), String> {
        if let Some(machine) = self.machine(vm).await {
            machine.kill().await.map_err(|error| error.to_string())?;
        }
        self.forget(vm).await
    }

    pub async fn reset(&self, vm: &VmName, serial: u64) -> Result<(), String> {
        let Some(machine) = self.machine(vm).await else {
            return Err("not running here".into());
        };
        machine.reset().await.map_err(|error| error.to_string())?;
        if let Some(local) = self.vms.lock().await.get_mut(vm) {
            local.reset_seen = serial;
        }
        Ok(())
    }

    /// Drops the handle and the run directory of a VM whose QEMU is gone. A QEMU that
    /// still runs (SIGKILL not effective yet: D state on a stuck pool) is kept, with its
    /// run directory, so that the reconciler finds it again.
    pub async fn forget(&self, vm: &VmName) -> Result<(), String> {
        {
            let mut vms = self.vms.lock().await;
            if let Some(local) = vms.get(vm) {
                if !local.machine.has_exited() {
                    return Err(format!(
                        "QEMU pid {} of VM {vm} still runs; it is kept",
                        local.machine.pid()
                    ));
                }
            }
            vms.remove(vm);
        }
        match std::fs::remove_dir_all(self.run_dir(vm).path()) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(format!(
                "cannot remove the run directory of VM {vm}: {error}"
            )),
        }
    }
}

/// How a QEMU is launched; always with its vCPUs stopped (`-S`), the caller runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LaunchKind {
    /// To run the guest from its disks once the start is allowed.
    Paused,
    /// To receive a migration (`-incoming defer`).
    Incoming,
}

/// What a stop did, for its event.
#[derive(Debug, Default)]
pub struct StopReport {
    /// The stop command: how long it ran and how it ended.
    pub application: Option<(Duration, Result<i64, String>)>,
    pub shutdown: Option<(ferry_qemu::StopOutcome, Duration)>,
}

impl std::fmt::Display for StopReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        match &self.application {
            Some((took, Ok(0))) => parts.push(format!(
                "the application stopped in {:.1} s",
                took.as_secs_f64()
            )),
            Some((took, Ok(code))) => parts.push(format!(
                "the stop command exited {code} after {:.1} s",
                took.as_secs_f64()
            )),
            Some((took, Err(error))) => parts.push(format!(
                "the stop command failed after {:.1} s ({error})",
                took.as_secs_f64()
            )),
            None => {}
        }
        match &self.shutdown {
            Some((ferry_qemu::StopOutcome::Graceful, took)) => parts.push(format!(
                "the guest shut down in {:.1} s",
                took.as_secs_f64()
            )),
            Some((ferry_qemu::StopOutcome::Killed, took)) => parts.push(format!(
                "the guest did not shut down within {:.0} s and was powered off",
                took.as_secs_f64()
            )),
            Some((ferry_qemu::StopOutcome::AlreadyStopped, _)) | None => {
                parts.push("it was not running".into())
            }
        }
        write!(f, "{}", parts.join("; "))
    }
}

/// Runs the VM's stop command in the guest through its agent, bounded by its timeout.
/// A failure is reported, never a reason not to shut down.
async fn stop_application(
    machine: &Machine,
    stop: &ferry_model::StopCommand,
) -> (Duration, Result<i64, String>) {
    let started = std::time::Instant::now();
    let result = machine
        .guest_agent()
        .exec(
            "/bin/sh",
            &["-c", &stop.command],
            Duration::from_secs(stop.timeout_seconds),
        )
        .await
        .map(|output| output.exit_code.unwrap_or(-1))
        .map_err(|error| error.to_string());
    (started.elapsed(), result)
}

/// Releases a VM claimed for an operation.
pub struct Claim {
    runtime: Arc<Runtime>,
    vm: VmName,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut busy = self
            .runtime
            .busy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        busy.remove(&self.vm);
    }
}

/// The agent's answer to `exec` for VMs it runs.
pub struct LocalExec(pub Arc<Runtime>);

impl ferry_api::ops::LocalVms for LocalExec {
    fn exec(
        &self,
        vm: VmName,
        command: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecResponse, ApiError>> {
        Box::pin(async move {
            let machine = self.0.machine(&vm).await.ok_or_else(|| {
                ApiError::Conflict(format!("VM {vm} is not running on this host"))
            })?;
            let (program, args) = command
                .split_first()
                .ok_or_else(|| ApiError::BadRequest("command is empty".into()))?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let output = machine
                .guest_agent()
                .exec(program, &args, timeout)
                .await
                .map_err(|error| ApiError::Conflict(format!("VM {vm}: {error}")))?;
            Ok(ExecResponse {
                exit_code: output.exit_code,
                signal: output.signal,
                stdout: output.stdout,
                stderr: output.stderr,
            })
        })
    }

    fn change_cdrom(
        &self,
        vm: VmName,
        drive: String,
        iso: Option<PathBuf>,
    ) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            let machine = self.0.machine(&vm).await.ok_or_else(|| {
                ApiError::Conflict(format!("VM {vm} is not running on this host"))
            })?;
            let changed = match &iso {
                Some(iso) => machine.cdrom_insert(&drive, iso).await,
                None => machine.cdrom_eject(&drive).await,
            };
            changed.map_err(|error| ApiError::Conflict(error.to_string()))
        })
    }

    fn checkpoint<'a>(
        &'a self,
        record: &'a VmRecord,
        action: &'a ferry_model::ops::CheckpointAction,
        nvram_copy: Option<&'a std::path::Path>,
    ) -> BoxFuture<'a, Result<ferry_api::types::CheckpointDone, ApiError>> {
        Box::pin(async move {
            crate::checkpoint::run(&self.0, record, action, nvram_copy)
                .await
                .map_err(ApiError::Conflict)
        })
    }

    fn flatten<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), ApiError>> {
        Box::pin(async move {
            crate::checkpoint::flatten(&self.0, record)
                .await
                .map_err(ApiError::Conflict)
        })
    }

    fn console_socket<'a>(
        &'a self,
        vm: &'a VmName,
        kind: ferry_api::console::ConsoleKind,
    ) -> BoxFuture<'a, Result<PathBuf, ApiError>> {
        Box::pin(async move {
            let machine = self.0.machine(vm).await.ok_or_else(|| {
                ApiError::Conflict(format!("VM {vm} is not running on this host"))
            })?;
            Ok(match kind {
                ferry_api::console::ConsoleKind::Serial => machine.run_dir().console_socket(),
                ferry_api::console::ConsoleKind::Vnc => machine.run_dir().vnc_socket(),
            })
        })
    }
}

/// A blank qcow2 disk: the target of a disk copy (migration of a local disk, a move
/// between pools).
pub fn create_disk(path: &std::path::Path, size: Bytes) -> Result<(), String> {
    ferry_qemu::image::create_blank(path, ferry_model::DiskFormat::Qcow2, size)
}

pub fn ip(args: &[&str]) -> Result<(), String> {
    let output = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|error| error.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}
