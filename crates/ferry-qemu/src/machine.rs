//! A running VM as the agent sees it: one QEMU process plus its monitor, with the
//! lifecycle (launch, attach, pause, resume, reset, stop, kill) and the migration
//! primitives that later layers compose into live and quick migration.
//!
//! Stop is graceful first: ACPI power button, wait for the guest to power off, then
//! SIGKILL when the grace period runs out. Kill is immediate. Both wait until the
//! process is gone, so the disks' locks are free when they return.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_model::{Boot, Bytes, HostLimits, VmSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::cmdline::{self, StartMode};
use crate::process::{QemuProcess, SpawnRequest};
use crate::qga::GuestAgent;
use crate::qmp::{Qmp, QmpError};
use crate::{Accel, QemuError, RunDir};

/// How long QEMU may take from exec to an answering monitor.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub run_dir: RunDir,
    /// Network namespace to start QEMU in (lab hosts); `None` for the current one.
    pub netns: Option<String>,
    pub host: HostLimits,
    pub incoming: Option<Incoming>,
    pub paused: bool,
}

/// How an incoming migration will arrive: always `defer`red, the URI comes later
/// through `migrate-incoming`, so that capabilities can be set first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    Defer,
}

/// QEMU's run state (`query-status`), the ones Ferry acts on named, the rest kept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Paused,
    Inmigrate,
    Postmigrate,
    FinishMigrate,
    Prelaunch,
    Shutdown,
    GuestPanicked,
    InternalError,
    IoError,
    Other(String),
}

impl RunState {
    fn parse(status: &str) -> RunState {
        match status {
            "running" => RunState::Running,
            "paused" => RunState::Paused,
            "inmigrate" => RunState::Inmigrate,
            "postmigrate" => RunState::Postmigrate,
            "finish-migrate" => RunState::FinishMigrate,
            "prelaunch" => RunState::Prelaunch,
            "shutdown" => RunState::Shutdown,
            "guest-panicked" => RunState::GuestPanicked,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            other => RunState::Other(other.to_string()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StopOutcome {
    /// The guest powered off by itself after the ACPI request.
    Graceful,
    /// The grace period ran out and QEMU was killed.
    Killed,
    /// It was not running.
    AlreadyStopped,
}

/// `query-migrate`, the fields Ferry reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    pub status: MigrationStatus,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub transferred_bytes: Option<u64>,
    pub remaining_bytes: Option<u64>,
    pub total_bytes: Option<u64>,
    pub dirty_pages_rate: Option<u64>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    #[default]
    None,
    Setup,
    Active,
    PostcopyActive,
    PreSwitchover,
    Device,
    Completed,
    Failed,
    Cancelling,
    Cancelled,
    Other(String),
}

impl MigrationStatus {
    fn parse(status: &str) -> MigrationStatus {
        match status {
            "none" => MigrationStatus::None,
            "setup" => MigrationStatus::Setup,
            "active" => MigrationStatus::Active,
            "postcopy-active" => MigrationStatus::PostcopyActive,
            "pre-switchover" => MigrationStatus::PreSwitchover,
            "device" => MigrationStatus::Device,
            "completed" => MigrationStatus::Completed,
            "failed" => MigrationStatus::Failed,
            "cancelling" => MigrationStatus::Cancelling,
            "cancelled" => MigrationStatus::Cancelled,
            other => MigrationStatus::Other(other.to_string()),
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

impl MigrationInfo {
    /// Reads a `query-migrate` reply; absent fields stay `None`, unknown ones are ignored.
    pub fn from_qmp(reply: &Value) -> MigrationInfo {
        let ram = &reply["ram"];
        MigrationInfo {
            status: MigrationStatus::parse(reply["status"].as_str().unwrap_or("none")),
            total_time_ms: reply["total-time"].as_u64(),
            downtime_ms: reply["downtime"].as_u64(),
            expected_downtime_ms: reply["expected-downtime"].as_u64(),
            transferred_bytes: ram["transferred"].as_u64(),
            remaining_bytes: ram["remaining"].as_u64(),
            total_bytes: ram["total"].as_u64(),
            dirty_pages_rate: ram["dirty-pages-rate"].as_u64(),
            error: reply["error-desc"].as_str().map(str::to_string),
        }
    }
}

/// A VM's QEMU, running, with its monitor connected.
pub struct Machine {
    spec: VmSpec,
    run_dir: RunDir,
    process: QemuProcess,
    qmp: Qmp,
    agent: GuestAgent,
    panicked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Sets a flag when QEMU reports a guest panic; ends with the monitor connection.
fn watch_for_panic(qmp: &Qmp) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut events = qmp.subscribe();
    let set = flag.clone();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if event.event == "GUEST_PANICKED" => {
                    set.store(true, std::sync::atomic::Ordering::Release);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    flag
}

impl Machine {
    /// Validates the spec against the host, checks its files, starts QEMU and connects
    /// to its monitor. On any failure nothing is left running.
    pub async fn launch(spec: &VmSpec, options: &LaunchOptions) -> Result<Machine, QemuError> {
        spec.validate(&options.host)?;
        check_files(spec)?;
        let run = &options.run_dir;
        run.check_socket_paths().map_err(QemuError::Other)?;
        std::fs::create_dir_all(run.path()).map_err(QemuError::io(format!(
            "cannot create {}",
            run.path().display()
        )))?;
        if let Ok(existing) = QemuProcess::find(run) {
            return Err(QemuError::AlreadyRunning {
                vm: spec.name.to_string(),
                pid: existing.pid(),
            });
        }
        for stale in [
            run.qmp_socket(),
            run.qga_socket(),
            run.console_socket(),
            run.vnc_socket(),
            run.pidfile(),
        ] {
            // A leftover is harmless: it is replaced or cleaned on the next run.
            if let Err(error) = std::fs::remove_file(stale) {
                tracing::debug!("a leftover is harmless: {error}");
            }
        }
        let spec_json =
            serde_json::to_vec_pretty(spec).map_err(|error| QemuError::Other(error.to_string()))?;
        std::fs::write(run.spec_file(), spec_json).map_err(QemuError::io(format!(
            "cannot write {}",
            run.spec_file().display()
        )))?;

        let mode = StartMode {
            incoming: options.incoming.is_some(),
            paused: options.paused,
        };
        let args = cmdline::build(spec, run, options.accel, mode);
        let process = QemuProcess::spawn(&SpawnRequest {
            qemu: &options.qemu,
            args: &args,
            run,
            netns: options.netns.as_deref(),
        })?;

        let vm = spec.name.to_string();
        let qmp = match connect_while_alive(&process, &run.qmp_socket()).await {
            Ok(qmp) => qmp,
            Err(reason) => {
                // It may have exited already.
                if let Err(error) = process.kill().await {
                    tracing::debug!("it may have exited already: {error}");
                }
                let stderr = read_log_tail(&run.qemu_log());
                let stderr = if stderr.is_empty() { reason } else { stderr };
                return Err(QemuError::StartFailed { vm, stderr });
            }
        };
        Ok(Machine {
            spec: spec.clone(),
            agent: GuestAgent::new(&run.qga_socket()),
            run_dir: run.clone(),
            process,
            panicked: watch_for_panic(&qmp),
            qmp,
        })
    }

    /// Finds a VM that a previous supervisor started, through its run directory.
    pub async fn attach(run_dir: &RunDir) -> Result<Machine, QemuError> {
        let spec_path = run_dir.spec_file();
        let spec: VmSpec = std::fs::read(&spec_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .ok_or_else(|| QemuError::NotRunning {
                vm: run_dir.path().display().to_string(),
                reason: format!("no readable {}", spec_path.display()),
            })?;
        let vm = spec.name.to_string();
        let process = QemuProcess::find(run_dir).map_err(|reason| QemuError::NotRunning {
            vm: vm.clone(),
            reason,
        })?;
        let qmp = Qmp::connect(&run_dir.qmp_socket(), MONITOR_TIMEOUT)
            .await
            .map_err(|source| QemuError::Qmp { vm, source })?;
        Ok(Machine {
            agent: GuestAgent::new(&run_dir.qga_socket()),
            spec,
            run_dir: run_dir.clone(),
            process,
            panicked: watch_for_panic(&qmp),
            qmp,
        })
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    pub fn pid(&self) -> i32 {
        self.process.pid()
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    pub fn guest_agent(&self) -> &GuestAgent {
        &self.agent
    }

    pub fn has_exited(&self) -> bool {
        self.process.has_exited()
    }

    /// The guest reported a kernel panic (pvpanic's `GUEST_PANICKED`); QEMU then powers
    /// the machine off (`-action panic=shutdown`), so this tells a panic from a crash.
    pub fn guest_panicked(&self) -> bool {
        self.panicked.load(std::sync::atomic::Ordering::Acquire)
    }

    pub async fn wait_exit(&self) {
        self.process.wait_exit().await
    }

    pub(crate) async fn command(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QemuError> {
        self.qmp
            .execute(command, arguments)
            .await
            .map_err(|source| self.qmp_error(source))
    }

    fn qmp_error(&self, source: QmpError) -> QemuError {
        QemuError::Qmp {
            vm: self.spec.name.to_string(),
            source,
        }
    }

    pub async fn status(&self) -> Result<RunState, QemuError> {
        let reply = self.command("query-status", None).await?;
        Ok(RunState::parse(
            reply["status"].as_str().unwrap_or("unknown"),
        ))
    }

    /// Stops the vCPUs (QMP `stop`).
    pub async fn pause(&self) -> Result<(), QemuError> {
        self.command("stop", None).await.map(drop)
    }

    /// Runs the vCPUs again (QMP `cont`).
    pub async fn resume(&self) -> Result<(), QemuError> {
        self.command("cont", None).await.map(drop)
    }

    /// Hard reset, as the reset button would.
    pub async fn reset(&self) -> Result<(), QemuError> {
        self.command("system_reset", None).await.map(drop)
    }

    /// Presses the ACPI power button; returns at once.
    pub async fn power_down(&self) -> Result<(), QemuError> {
        self.command("system_powerdown", None).await.map(drop)
    }

    /// Graceful stop: ACPI power-down, wait up to `grace`, then SIGKILL.
    pub async fn stop(&self, grace: Duration) -> Result<StopOutcome, QemuError> {
        if self.process.has_exited() {
            return Ok(StopOutcome::AlreadyStopped);
        }
        // A paused guest cannot react to the power button.
        if matches!(self.status().await, Ok(RunState::Paused)) {
            // If it stays paused, the grace period ends in SIGKILL below.
            if let Err(error) = self.resume().await {
                tracing::debug!("VM {}: cannot resume to stop it: {error}", self.spec.name);
            }
        }
        match self.power_down().await {
            Ok(())
            | Err(QemuError::Qmp {
                source: QmpError::Closed,
                ..
            }) => {}
            Err(error) => tracing::warn!("{error}; killing instead"),
        }
        if self.process.wait_exit_timeout(grace).await {
            return Ok(StopOutcome::Graceful);
        }
        self.process.kill().await?;
        Ok(StopOutcome::Killed)
    }

    /// Puts an ISO into the CD-ROM drive `id` (the tray closes over it).
    pub async fn cdrom_insert(&self, id: &str, iso: &Path) -> Result<(), QemuError> {
        self.command(
            "blockdev-change-medium",
            Some(json!({
                "id": format!("cd-{id}"),
                "filename": iso,
                "format": "raw",
                "read-only-mode": "read-only",
            })),
        )
        .await
        .map(drop)
    }

    /// Takes the medium out of the CD-ROM drive `id`, even if the guest locked the tray.
    pub async fn cdrom_eject(&self, id: &str) -> Result<(), QemuError> {
        self.command(
            "eject",
            Some(json!({"id": format!("cd-{id}"), "force": true})),
        )
        .await
        .map(drop)
    }

    /// SIGKILL now, as a power cut would.
    pub async fn kill(&self) -> Result<(), QemuError> {
        self.process.kill().await
    }

    /// Lets a migration that stopped at `pre-switchover` (capability
    /// `pause-before-switchover`) go on to its switch-over.
    pub async fn migrate_continue(&self) -> Result<(), QemuError> {
        self.command("migrate-continue", Some(json!({"state": "pre-switchover"})))
            .await
            .map(drop)
    }

    /// Sends SIGKILL without waiting: to kill many at once, then wait for each.
    pub fn sigkill(&self) -> Result<(), QemuError> {
        self.process.signal(nix::sys::signal::Signal::SIGKILL)
    }

    /// Waits up to `timeout` for QEMU to be gone; true if it is.
    pub async fn wait_exit_timeout(&self, timeout: std::time::Duration) -> bool {
        self.process.wait_exit_timeout(timeout).await
    }

    /// Sets migration capabilities, e.g. `[("auto-converge", true)]`.
    pub async fn set_migration_capabilities(
        &self,
        capabilities: &[(&str, bool)],
    ) -> Result<(), QemuError> {
        let list: Vec<Value> = capabilities
            .iter()
            .map(|(name, state)| json!({"capability": name, "state": state}))
            .collect();
        self.command(
            "migrate-set-capabilities",
            Some(json!({"capabilities": list})),
        )
        .await
        .map(drop)
    }

    /// Sets migration parameters as QEMU names them (`downtime-limit`, `max-bandwidth`…).
    pub async fn set_migration_parameters(&self, parameters: Value) -> Result<(), QemuError> {
        self.command("migrate-set-parameters", Some(parameters))
            .await
            .map(drop)
    }

    /// Source side: starts sending to `uri` (`tcp:HOST:PORT`, `exec:…`, `file:` …).
    pub async fn migrate(&self, uri: &str) -> Result<(), QemuError> {
        self.command("migrate", Some(json!({"uri": uri})))
            .await
            .map(drop)
    }

    /// Destination side of `-incoming defer`: starts listening on `uri`.
    pub async fn migrate_incoming(&self, uri: &str) -> Result<(), QemuError> {
        self.command("migrate-incoming", Some(json!({"uri": uri})))
            .await
            .map(drop)
    }

    pub async fn query_migrate(&self) -> Result<MigrationInfo, QemuError> {
        let reply = self.command("query-migrate", None).await?;
        Ok(MigrationInfo::from_qmp(&reply))
    }

    /// Destination side: the address `migrate-incoming` with port 0 ended up listening on.
    pub async fn incoming_address(&self) -> Result<Option<(String, u16)>, QemuError> {
        let reply = self.command("query-migrate", None).await?;
        Ok(reply["socket-address"]
            .as_array()
            .and_then(|addresses| addresses.first())
            .and_then(|address| {
                let host = address["host"].as_str()?.to_string();
                let port = address["port"].as_str()?.parse().ok()?;
                Some((host, port))
            }))
    }

    /// Switches a running pre-copy migration to post-copy (both sides need the
    /// `postcopy-ram` capability, set before the migration started).
    pub async fn migrate_start_postcopy(&self) -> Result<(), QemuError> {
        self.command("migrate-start-postcopy", None).await.map(drop)
    }

    /// Makes the guest's NICs announce themselves (RARP, and a guest-sent gratuitous ARP
    /// where virtio-net supports it), so switches learn where the VM now is.
    pub async fn announce_self(&self) -> Result<(), QemuError> {
        self.command(
            "announce-self",
            Some(json!({"initial": 50, "max": 550, "rounds": 5, "step": 100})),
        )
        .await
        .map(drop)
    }

    /// Writes the guest's physical memory from address 0 to a file (`pmemsave`): the
    /// evidence when a migrated guest and its source must hold the same bytes.
    pub async fn save_memory(&self, path: &Path, bytes: Bytes) -> Result<(), QemuError> {
        self.command(
            "pmemsave",
            Some(json!({ "val": 0, "size": bytes.0, "filename": path.to_string_lossy() })),
        )
        .await
        .map(drop)
    }

    pub async fn migrate_cancel(&self) -> Result<(), QemuError> {
        self.command("migrate_cancel", None).await.map(drop)
    }

    /// Polls `query-migrate` until the migration finishes or `timeout` passes.
    pub async fn wait_migration(
        &self,
        poll: Duration,
        timeout: Duration,
    ) -> Result<MigrationInfo, QemuError> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.query_migrate().await?;
            if info.status.is_finished() {
                return Ok(info);
            }
            if Instant::now() >= deadline {
                return Err(QemuError::Other(format!(
                    "VM {}: migration still {:?} after {timeout:?}",
                    self.spec.name, info.status
                )));
            }
            tokio::time::sleep(poll).await;
        }
    }
}

/// Files a spec names must exist before QEMU is asked to open them, so the error names
/// the file rather than quoting QEMU's parser.
fn check_files(spec: &VmSpec) -> Result<(), QemuError> {
    let vm = spec.name.to_string();
    let missing = |what, path: &Path| QemuError::MissingFile {
        vm: vm.clone(),
        what,
        path: path.to_path_buf(),
    };
    if let Boot::Kernel { kernel, initrd, .. } = &spec.boot {
        if !kernel.is_file() {
            return Err(missing("kernel", kernel));
        }
        if let Some(initrd) = initrd {
            if !initrd.is_file() {
                return Err(missing("initrd", initrd));
            }
        }
    }
    for disk in &spec.disks {
        if !disk.path.exists() {
            return Err(missing("disk", &disk.path));
        }
    }
    for cdrom in &spec.cdroms {
        if let Some(iso) = cdrom.path.as_ref().filter(|iso| !iso.is_file()) {
            return Err(missing("CD-ROM image", iso));
        }
    }
    if let ferry_model::Firmware::Uefi { nvram } = &spec.firmware {
        if !nvram.is_file() {
            return Err(missing("UEFI NVRAM file", nvram));
        }
        let code = Path::new(cmdline::OVMF_CODE);
        if !code.is_file() {
            return Err(missing("OVMF firmware (package ovmf)", code));
        }
    }
    Ok(())
}

/// Connects to the monitor as soon as QEMU opens it; gives up when QEMU exits.
async fn connect_while_alive(process: &QemuProcess, socket: &Path) -> Result<Qmp, String> {
    let deadline = Instant::now() + MONITOR_TIMEOUT;
    loop {
        if process.has_exited() {
            return Err("QEMU exited during start-up".into());
        }
        if socket.exists() {
            match Qmp::connect(socket, Duration::from_secs(5)).await {
                Ok(qmp) => return Ok(qmp),
                Err(error) if Instant::now() >= deadline => return Err(error.to_string()),
                Err(_) => {}
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "QMP socket {} did not appear within {MONITOR_TIMEOUT:?}",
                socket.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// QEMU's last words, for an error message: the last few non-empty lines of its log.
fn read_log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
