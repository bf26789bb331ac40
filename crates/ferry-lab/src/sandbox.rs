//! One appliance VM on this machine, alone in a network namespace of its own: the
//! smallest real thing Ferry can run. The demo shows it; the driver's integration tests
//! boot one each, side by side, without sharing a name, an address or a file.
//!
//! Inside the namespace the VM's tap is `tap0` with `10.77.0.1/24` on the host side and
//! the guest at `10.77.0.2`; every sandbox has its own namespace, so these never clash.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_model::{Bytes, HostLimits, VmSpec};
use ferry_qemu::{Accel, LaunchOptions, Machine, QemuError, RunDir};

use crate::appliance::{Appliance, GuestNetwork, GUEST_PORT, READY_MARKER};
use crate::netns::NetNs;

pub const HOST_ADDRESS: &str = "10.77.0.1";
pub const GUEST_ADDRESS: &str = "10.77.0.2";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Driving QEMU failed.
    #[error(transparent)]
    Qemu(#[from] QemuError),
    /// Setting up the namespace failed.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    /// The guest did not get ready.
    #[error("VM {vm}: {reason}")]
    Guest { vm: String, reason: String },
    /// A host-side step failed.
    #[error("{0}")]
    Setup(String),
}

#[derive(Clone, Debug)]
pub struct SandboxOptions {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub memory: Bytes,
    pub data_disk: Bytes,
    /// Where the sandbox keeps its disk and run directory; removed by `destroy`.
    pub dir: PathBuf,
}

/// A booted appliance VM in its own namespace. Call [`Sandbox::destroy`] when done;
/// dropping it without does the same with signals, so a failing test leaves nothing.
pub struct Sandbox {
    pub name: String,
    pub spec: VmSpec,
    pub options: SandboxOptions,
    netns: Option<NetNs>,
    machine: Option<Machine>,
}

impl Sandbox {
    /// Creates the namespace and the data disk, and starts the VM (without waiting for
    /// the guest: see [`Sandbox::wait_ready`]).
    pub async fn start(
        name: &str,
        appliance: &Appliance,
        options: SandboxOptions,
    ) -> Result<Sandbox, SandboxError> {
        std::fs::create_dir_all(&options.dir).map_err(|error| {
            SandboxError::Setup(format!("cannot create {}: {error}", options.dir.display()))
        })?;
        let netns = NetNs::create(&format!("fs-{name}"))?;
        let disk = options.dir.join("data.qcow2");
        create_disk(&disk, options.data_disk)?;
        let network = GuestNetwork {
            address: format!("{GUEST_ADDRESS}/24"),
            gateway: Some(HOST_ADDRESS.into()),
        };
        let spec = appliance
            .vm_spec(name, options.memory, disk, "tap0".into(), &network)
            .map_err(|error| SandboxError::Setup(format!("{error}")))?;
        let mut sandbox = Sandbox {
            name: name.to_string(),
            spec,
            options,
            netns: Some(netns),
            machine: None,
        };
        sandbox.launch().await?;
        Ok(sandbox)
    }

    pub fn run_dir(&self) -> RunDir {
        RunDir::new(self.options.dir.join("run"))
    }

    fn launch_options(&self) -> LaunchOptions {
        LaunchOptions {
            qemu: self.options.qemu.clone(),
            accel: self.options.accel,
            run_dir: self.run_dir(),
            netns: self.netns.as_ref().map(|netns| netns.name().to_string()),
            host: HostLimits {
                cpus: num_cpus(),
                memory: Bytes(16 * Bytes::GIB),
            },
            incoming: None,
            paused: false,
        }
    }

    /// Starts QEMU (again) from the spec and brings the host side of its tap up.
    pub async fn launch(&mut self) -> Result<(), SandboxError> {
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_file(self.run_dir().console_log()) {
            tracing::debug!("a leftover is harmless: {error}");
        }
        let machine = Machine::launch(&self.spec, &self.launch_options()).await?;
        self.machine = Some(machine);
        let netns = self.netns()?;
        netns.ip(&[
            "addr",
            "replace",
            &format!("{HOST_ADDRESS}/24"),
            "dev",
            "tap0",
        ])?;
        netns.ip(&["link", "set", "tap0", "up"])?;
        Ok(())
    }

    pub fn machine(&self) -> Result<&Machine, SandboxError> {
        self.machine.as_ref().ok_or_else(|| SandboxError::Guest {
            vm: self.name.clone(),
            reason: "not running".into(),
        })
    }

    /// Forgets the supervisor's handle, as a crashed agent would, and finds the VM
    /// again through its run directory.
    pub async fn reattach(&mut self) -> Result<(), SandboxError> {
        self.machine = None;
        self.machine = Some(Machine::attach(&self.run_dir()).await?);
        Ok(())
    }

    /// Drops the handle after the VM stopped, so the next `launch` starts a new QEMU.
    pub fn forget_machine(&mut self) {
        self.machine = None;
    }

    pub fn netns(&self) -> Result<&NetNs, SandboxError> {
        self.netns
            .as_ref()
            .ok_or_else(|| SandboxError::Setup("namespace already removed".into()))
    }

    /// Waits for the appliance's ready line on the console; returns how long it took
    /// from this call.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Duration, SandboxError> {
        let started = Instant::now();
        let console = self.run_dir().console_log();
        loop {
            let text = std::fs::read_to_string(&console).unwrap_or_default();
            if text.contains(READY_MARKER) {
                return Ok(started.elapsed());
            }
            if self.machine()?.has_exited() {
                return Err(self.guest_error(&text, "QEMU exited before the guest was ready"));
            }
            if started.elapsed() > timeout {
                return Err(self.guest_error(&text, &format!("not ready within {timeout:?}")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn guest_error(&self, console: &str, reason: &str) -> SandboxError {
        let tail: Vec<&str> = console.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        SandboxError::Guest {
            vm: self.name.clone(),
            reason: format!("{reason}; console ends: {}", tail.join(" | ")),
        }
    }

    /// The guest's ferry-guest base URL (reachable from inside the namespace).
    pub fn guest_url(&self) -> String {
        format!("http://{GUEST_ADDRESS}:{GUEST_PORT}")
    }

    /// Sends one HTTP request to ferry-guest from inside the namespace.
    pub fn http(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), SandboxError> {
        let url = format!("{}{path}", self.guest_url());
        let outcome = self.netns()?.block_on(move || async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .map_err(|error| error.to_string())?;
            let mut request = client.request(method, &url);
            if let Some(body) = body {
                request = request.body(body);
            }
            let response = request
                .send()
                .await
                .map_err(|error| format!("{url}: {error}"))?;
            let status = response.status().as_u16();
            let bytes = response.bytes().await.map_err(|error| error.to_string())?;
            Ok::<_, String>((status, bytes.to_vec()))
        })?;
        outcome.map_err(|reason| SandboxError::Guest {
            vm: self.name.clone(),
            reason,
        })
    }

    /// Stops the VM if it runs, removes the namespace and the files.
    pub async fn destroy(mut self) -> Result<(), SandboxError> {
        if let Some(machine) = self.machine.take() {
            machine.kill().await?;
        }
        self.netns.take();
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_dir_all(&self.options.dir) {
            tracing::debug!("a leftover is harmless: {error}");
        }
        Ok(())
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Best effort for a test that failed before `destroy`: the pid is QEMU's own.
        if let Some(machine) = self.machine.take() {
            // It may have exited already.
            if let Err(error) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(machine.pid()),
                nix::sys::signal::Signal::SIGKILL,
            ) {
                tracing::debug!("it may have exited already: {error}");
            }
            for _ in 0..100 {
                if !ferry_qemu::process::is_our_qemu(machine.pid(), &self.run_dir().qmp_socket()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.netns.take();
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_dir_all(&self.options.dir) {
            tracing::debug!("a leftover is harmless: {error}");
        }
    }
}

/// A blank qcow2 disk (the appliance formats it on first boot).
pub fn create_disk(path: &Path, size: Bytes) -> Result<(), SandboxError> {
    ferry_qemu::image::create_blank(path, ferry_model::DiskFormat::Qcow2, size)
        .map_err(SandboxError::Setup)
}

fn num_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|count| count.get() as u32)
        .unwrap_or(1)
}
pub use reqwest::Method;
