//! The one-machine lab: a real Ferry cluster in network namespaces. This module owns a
//! lab's whole life: building it (`up`, or its steps one by one for tests), showing it
//! (`status`), breaking it on purpose (`fault`, `heal`) and removing it (`down`).
//!
//! `up` goes in this order, recording each thing it makes in `lab.json` right after
//! making it: state and run directories → address block (blackhole route) → switches
//! → host namespaces and links → pools → etcd → the appliance image and the business
//! network in etcd → the admin token, agent configs and client config → one agent per
//! host → wait until every host registered. If a step fails, `up` calls `down`, which
//! works from `lab.json` alone and tolerates whatever is already missing, so a lab is
//! removable at any point of its life and nothing it did not make is ever touched.

pub mod bare;
mod config;
pub mod fence;
mod network;
mod process;
mod spec;
mod state;
mod tls;
pub mod watchdog;

use std::collections::BTreeSet;
use std::fmt::Display;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_agent::secrets::ClusterKey;
use ferry_api::client_config::ClientConfig;
use ferry_model::cluster::ImageRecord;
use ferry_model::Bytes;
use ferry_qemu::Accel;
use ferry_store::etcd_server::{free_port, EtcdServer};
use ferry_store::Store;
use serde::Serialize;

use crate::appliance::Appliance;
use crate::defaults;

pub use config::{agent_config, client_config, CLUSTER_PREFIX};
pub use spec::{LabNet, LabSpec, API_PORT, DEFAULT_HOSTS, DEFAULT_NAME, HOST_BUSINESS_BRIDGE};
pub use state::{LabState, Spawned};
pub use tls::host_store_tls;

/// How long `up` waits for every agent to register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// The name the appliance is registered under.
pub const APPLIANCE_IMAGE: &str = "appliance";
/// The data disk a VM from the appliance image gets.
/// How long a just-spawned agent may take to exec before its command line counts.
const AGENT_EXEC_GRACE: Duration = Duration::from_secs(5);
const APPLIANCE_DATA_DISK: Bytes = Bytes(Bytes::GIB);
/// How many log lines an error about an agent quotes.
const LOG_LINES: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab's description is unusable.
    #[error("lab {lab}: {problem}")]
    Spec { lab: String, problem: String },
    /// A lab of this name exists already.
    #[error("lab {lab} is already up (see {}); `ferry lab down --lab {lab}` removes it", state_file.display())]
    AlreadyUp { lab: String, state_file: PathBuf },
    /// No lab of this name is recorded.
    #[error("lab {lab} is not up (no {})", state_file.display())]
    NotUp { lab: String, state_file: PathBuf },
    /// Making, changing or removing one object failed.
    #[error("lab {lab}: {object}: {detail}")]
    Object {
        lab: String,
        object: String,
        detail: String,
    },
    /// A step of `up` failed, and removing the half-built lab failed too.
    #[error("{error}; removing the half-built lab failed too: {cleanup}")]
    Cleanup {
        error: Box<LabError>,
        cleanup: Box<LabError>,
    },
    /// `down` could not remove everything; lab.json is kept so that it can be retried.
    #[error("lab {lab}: down left {}: {} (`ferry lab down` again retries)", plural(problems.len()), problems.join("; "))]
    Down { lab: String, problems: Vec<String> },
}

fn plural(count: usize) -> String {
    if count == 1 {
        "1 problem".into()
    } else {
        format!("{count} problems")
    }
}

/// A fault to inject into one host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the agent and all the host's QEMUs at once: the host lost power.
    PowerOff,
    /// SIGKILL only the agent; its VMs keep running.
    AgentKill,
    /// SIGSTOP the agent: it hangs with its VMs running, until its watchdog (or a
    /// fence) powers the host off, or `heal` lets it go on.
    AgentHang,
    /// Steps the host's wall clock by this many milliseconds (its agent's `now_ms`);
    /// `heal` sets it right.
    ClockStep(i64),
    /// Take one of the host's links down (a pulled cable).
    LinkDown(LabNet),
    LinkUp(LabNet),
}

/// What `status` shows about a lab.
#[derive(Clone, Debug, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub subnet: String,
    pub state_dir: PathBuf,
    pub accel: Option<Accel>,
    pub etcd: EtcdStatus,
    pub api: String,
    pub client_config: Option<PathBuf>,
    pub hosts: Vec<HostStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EtcdStatus {
    pub url: String,
    pub pid: Option<i32>,
    pub running: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub namespace: String,
    pub namespace_exists: bool,
    pub agent_pid: Option<i32>,
    pub agent_running: bool,
    /// Whether etcd holds the host's registration (None: etcd unreachable).
    pub registered: Option<bool>,
    pub management: String,
    pub migration: String,
    pub business: String,
    pub links_down: Vec<LabNet>,
    /// Pids of QEMUs running under the host's run directory.
    pub qemus: Vec<i32>,
}

/// A lab that exists (at least in part), with its record.
#[derive(Debug)]
pub struct Lab {
    state: LabState,
}

impl Lab {
    /// The lab recorded in `state_dir/lab.json`.
    pub fn load(state_dir: &Path) -> Result<Lab, LabError> {
        let path = state_dir.join("lab.json");
        let lab = state_dir
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !path.exists() {
            return Err(LabError::NotUp {
                lab,
                state_file: path,
            });
        }
        let state = LabState::load(&path).map_err(|detail| LabError::Object {
            lab,
            object: path.display().to_string(),
            detail,
        })?;
        Ok(Lab { state })
    }

    /// Whether a lab is recorded in `state_dir`.
    pub fn exists(state_dir: &Path) -> bool {
        state_dir.join("lab.json").exists()
    }

    pub fn spec(&self) -> &LabSpec {
        &self.state.spec
    }

    pub fn state(&self) -> &LabState {
        &self.state
    }

    /// The admin token the agents accept (once configs are written).
    pub fn token(&self) -> Option<&str> {
        self.state.token.as_deref()
    }

    /// Builds the whole lab: network, etcd, image, configs, agents; waits until every
    /// host registered. Probes KVM once, for all hosts. On failure, removes what it made.
    pub async fn up(spec: &LabSpec, appliance: &Appliance) -> Result<Lab, LabError> {
        require_root(spec)?;
        let accel = defaults::detect_accel(appliance)
            .await
            .map_err(|error| LabError::Object {
                lab: spec.name.clone(),
                object: "acceleration probe".into(),
                detail: error.to_string(),
            })?;
        let mut lab = Lab::create_network(spec)?;
        let outcome = async {
            lab.start_etcd().await?;
            lab.install_appliance(appliance).await?;
            lab.write_configs(accel.accel)?;
            lab.start_agents()?;
            lab.wait_registered(REGISTER_TIMEOUT).await
        }
        .await;
        match outcome {
            Ok(()) => Ok(lab),
            Err(error) => Err(lab.down_after(error)),
        }
    }

    /// Step 1: the state directory and lab.json, the address block, the switches, the
    /// host namespaces with their links, and the lab's directories. Refuses a lab that
    /// exists; on failure removes what it made.
    pub fn create_network(spec: &LabSpec) -> Result<Lab, LabError> {
        spec.validate().map_err(|problem| LabError::Spec {
            lab: spec.name.clone(),
            problem,
        })?;
        require_root(spec)?;
        if Lab::exists(&spec.state_dir) {
            return Err(LabError::AlreadyUp {
                lab: spec.name.clone(),
                state_file: spec.state_file(),
            });
        }
        let mut lab = Lab {
            state: LabState::new(spec.clone()),
        };
        let outcome = (|| {
            lab.make_dir(&spec.state_dir)?;
            lab.save()?;
            lab.make_dir(&spec.run_dir)?;
            lab.wire()?;
            for host in spec.host_numbers() {
                std::fs::create_dir_all(spec.host_run_dir(host))
                    .and_then(|()| std::fs::create_dir_all(spec.local_pool(host)))
                    .map_err(|error| lab.fail(spec.host_name(host), error))?;
            }
            std::fs::create_dir_all(spec.shared_pool())
                .map_err(|error| lab.fail("shared pool", error))
        })();
        match outcome {
            Ok(()) => Ok(lab),
            Err(error) => Err(lab.down_after(error)),
        }
    }

    /// Step 2: etcd on the management switch (10.B.0.1), left running past this
    /// process and recorded by pid.
    pub async fn start_etcd(&mut self) -> Result<(), LabError> {
        let spec = self.state.spec.clone();
        if spec.etcd_peer_port == 0 {
            self.state.spec.etcd_peer_port = free_port();
        }
        // The first start makes the lab's certificates and turns etcd's
        // authentication on; a restart finds both.
        let first = !spec.ca_file().exists();
        if first {
            tls::create(&spec).map_err(|error| self.fail("certificates", error))?;
        }
        let etcd_tls = tls::etcd(&spec).map_err(|error| self.fail("etcd", error))?;
        let server = EtcdServer::start_tls(
            &spec.etcd_dir(),
            &spec.switch_address(LabNet::Management).to_string(),
            spec.etcd_client_port,
            self.state.spec.etcd_peer_port,
            &etcd_tls,
        )
        .await
        .map_err(|error| self.fail("etcd", error))?;
        let pid = server.detach();
        self.state.etcd = Some(Spawned {
            pid: i32::try_from(pid).map_err(|error| self.fail("etcd", error))?,
            marker: process::etcd_marker(&spec.etcd_dir()),
        });
        self.save()?;
        if first {
            let hosts: Vec<String> = spec
                .host_numbers()
                .map(|host| spec.host_name(host))
                .collect();
            let store = self.store().await?;
            store
                .enable_auth(&hosts)
                .await
                .map_err(|error| self.fail("etcd authentication", error))?;
        }
        Ok(())
    }

    /// Kills the lab's etcd (SIGKILL, as a crash would); `start_etcd` starts it again
    /// on the same data.
    pub fn kill_etcd(&mut self) -> Result<(), LabError> {
        if let Some(etcd) = self.state.etcd.clone().filter(process::is_running) {
            let survivors = process::kill_all(&[etcd.pid]);
            if !survivors.is_empty() {
                return Err(self.fail("etcd", format!("pid {} survived SIGKILL", etcd.pid)));
            }
            process::reap(etcd.pid);
        }
        self.state.etcd = None;
        self.save()
    }

    /// A client of the lab's etcd, from the root namespace.
    pub async fn store(&self) -> Result<Store, LabError> {
        let root = tls::root(&self.state.spec).map_err(|error| self.fail("etcd", error))?;
        Store::connect(&[self.state.spec.etcd_url()], CLUSTER_PREFIX, Some(&root))
            .await
            .map_err(|error| self.fail("etcd", error))
    }

    /// Step 3: the appliance copied into the shared pool and registered as an image,
    /// and the business network registered for VM addresses.
    pub async fn install_appliance(&mut self, appliance: &Appliance) -> Result<(), LabError> {
        let spec = self.state.spec.clone();
        let target = spec.appliance_image_dir();
        let object = format!("image {APPLIANCE_IMAGE}");
        std::fs::create_dir_all(&target).map_err(|error| self.fail(&object, error))?;
        let kernel = target.join("vmlinuz");
        let initrd = target.join("initramfs.img");
        for (from, to) in [
            (appliance.kernel(), &kernel),
            (appliance.initrd(), &initrd),
            (
                appliance.dir.join("manifest.json"),
                &target.join("manifest.json"),
            ),
        ] {
            std::fs::copy(&from, to).map_err(|error| {
                self.fail(&object, format!("cannot copy {}: {error}", from.display()))
            })?;
        }
        let store = self.store().await?;
        let probe = appliance.probe_image();
        let image = ImageRecord {
            probe_cmdline: Some(probe.cmdline),
            probe_marker: Some(probe.marker),
            restart_command: Some(crate::appliance::RESTART_COMMAND.into()),
            ..ImageRecord::appliance(APPLIANCE_IMAGE, kernel, initrd, APPLIANCE_DATA_DISK)
        };
        store
            .put(&store.keys().image(APPLIANCE_IMAGE), &image, None)
            .await
            .map_err(|error| self.fail(&object, error))?;
        let business = spec.business_network();
        store
            .put(&store.keys().network(&business.name), &business, None)
            .await
            .map_err(|error| self.fail(format!("network {}", business.name), error))?;
        Ok(())
    }

    /// Step 4: a fresh admin token, every host's agent config and the client config.
    pub fn write_configs(&mut self, accel: Accel) -> Result<(), LabError> {
        let spec = self.state.spec.clone();
        let token = random_token().map_err(|error| self.fail("admin token", error))?;
        self.state.token = Some(token.clone());
        self.state.accel = Some(accel);
        self.save()?;
        let fence_agent = self.install_fence_agent()?;
        let cluster_key = self.cluster_key()?;
        for host in spec.host_numbers() {
            let key_file = config::cluster_key_file(&spec, host);
            cluster_key
                .write(&key_file)
                .map_err(|error| self.fail(format!("cluster key {}", key_file.display()), error))?;
            let path = spec.agent_config_path(host);
            let object = format!("agent config {}", path.display());
            let mut config = agent_config(&spec, host, &token, accel, &defaults::qemu_binary())
                .map_err(|error| self.fail(&object, error))?;
            config.migration.tls = spec.migration_tls;
            if spec.fence_devices {
                config.fence = Some(config::fence_config(&spec, host, &fence_agent));
            }
            config.ha.watchdog = Some(watchdog::fifo_path(&spec, host));
            config.ha.watchdog_timeout_ms = watchdog::TIMEOUT_MS;
            let text = toml::to_string(&config).map_err(|error| self.fail(&object, error))?;
            state::write_private(&path, text.as_bytes())
                .map_err(|error| self.fail(&object, error))?;
        }
        let path = spec.client_config.clone();
        let object = format!("client config {}", path.display());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|error| self.fail(&object, error))?;
        }
        let text = toml::to_string(&client_config(&spec, &token))
            .map_err(|error| self.fail(&object, error))?;
        state::write_private(&path, text.as_bytes()).map_err(|error| self.fail(&object, error))?;
        self.state.client_config = Some(path);
        self.save()
    }

    /// Step 5: one agent per host inside its namespace (those not running already).
    pub fn start_agents(&mut self) -> Result<(), LabError> {
        for host in self.state.spec.host_numbers() {
            self.start_agent(host)?;
        }
        Ok(())
    }

    /// The `ferry` binary the lab runs its agents with.
    fn ferry_binary(&self, object: &str) -> Result<PathBuf, LabError> {
        match &self.state.spec.ferry_binary {
            Some(path) => Ok(path.clone()),
            None => std::env::current_exe()
                .map_err(|error| self.fail(object, format!("cannot find ferry: {error}"))),
        }
    }

    /// The lab's cluster key: host1's copy if there is one (agents still running keep
    /// theirs), else a fresh one.
    fn cluster_key(&mut self) -> Result<ClusterKey, LabError> {
        let first = config::cluster_key_file(&self.state.spec, 1);
        if first.exists() {
            return ClusterKey::load(&first).map_err(|error| self.fail("cluster key", error));
        }
        ClusterKey::generate().map_err(|error| self.fail("cluster key", error))
    }

    /// `fence_ferry_lab` in the state directory: a link to `ferry`, which acts as the
    /// fence agent when called by that name.
    fn install_fence_agent(&mut self) -> Result<PathBuf, LabError> {
        let link = self.state.spec.state_dir.join(fence::FENCE_AGENT_NAME);
        let object = format!("fence agent {}", link.display());
        let binary = self.ferry_binary(&object)?;
        // A leftover is harmless: it is replaced or cleaned on the next run.
        if let Err(error) = std::fs::remove_file(&link) {
            tracing::debug!("a leftover is harmless: {error}");
        }
        std::os::unix::fs::symlink(&binary, &link).map_err(|error| self.fail(&object, error))?;
        Ok(link)
    }

    /// The host's watchdog, started if it is not running, and its FIFO there: an agent
    /// whose configured watchdog cannot be opened refuses to start.
    fn start_watchdog(&mut self, host: u32) -> Result<(), LabError> {
        let spec = self.state.spec.clone();
        let object = format!("watchdog of {}", spec.host_name(host));
        let running = self
            .state
            .watchdogs
            .get(&host)
            .is_some_and(process::is_running);
        if !running {
            let binary = self.ferry_binary(&object)?;
            let spawned = process::spawn_watchdog(&spec, host, &binary)
                .map_err(|error| self.fail(&object, error))?;
            self.state.watchdogs.insert(host, spawned);
            self.save()?;
        }
        let fifo = watchdog::fifo_path(&spec, host);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !fifo.exists() {
            let alive = self
                .state
                .watchdogs
                .get(&host)
                .is_some_and(process::is_running);
            if !alive || Instant::now() > deadline {
                let log = spec.host_run_dir(host).join("watchdog.log");
                return Err(self.fail(
                    &object,
                    format!("no FIFO: {}", process::log_tail(&log, LOG_LINES)),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn start_agent(&mut self, host: u32) -> Result<bool, LabError> {
        self.start_watchdog(host)?;
        if let Some(agent) = self.state.agents.get(&host) {
            if process::is_running(agent) {
                return Ok(false);
            }
        }
        let spec = self.state.spec.clone();
        let object = format!("agent {}", spec.host_name(host));
        let binary = self.ferry_binary(&object)?;
        let spawned = process::spawn_agent(&spec, host, &binary)
            .map_err(|error| self.fail(&object, error))?;
        self.state.agents.insert(host, spawned);
        self.save()?;
        Ok(true)
    }

    /// Step 6: waits until every host is registered in etcd; fails early, quoting its
    /// log, if an agent exits.
    pub async fn wait_registered(&self, timeout: Duration) -> Result<(), LabError> {
        let spec = &self.state.spec;
        let store = self.store().await?;
        let started = Instant::now();
        loop {
            let registered = registered_hosts(&store).await.unwrap_or_default();
            let missing: Vec<u32> = spec
                .host_numbers()
                .filter(|&host| !registered.contains(&spec.host_name(host)))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            for &host in &missing {
                // Between fork and exec a child still shows its parent's command line:
                // on a loaded machine that is not an exit. Gone, or still not the agent
                // after a few seconds, is.
                let agent = self.state.agents.get(&host);
                let gone = agent.is_none_or(|agent| !process::is_alive(agent.pid));
                let not_agent = agent.is_some_and(|agent| !process::is_running(agent))
                    && started.elapsed() > AGENT_EXEC_GRACE;
                if gone || not_agent {
                    return Err(self.fail(
                        format!("agent {}", spec.host_name(host)),
                        format!(
                            "exited; {} ends: {}",
                            spec.agent_log(host).display(),
                            process::log_tail(&spec.agent_log(host), LOG_LINES)
                        ),
                    ));
                }
            }
            if started.elapsed() > timeout {
                let logs: Vec<String> = missing
                    .iter()
                    .map(|&host| {
                        format!(
                            "{}: {}",
                            spec.host_name(host),
                            process::log_tail(&spec.agent_log(host), LOG_LINES)
                        )
                    })
                    .collect();
                return Err(self.fail(
                    "agents",
                    format!(
                        "{} of {} hosts registered within {timeout:?}; logs end: {}",
                        spec.hosts as usize - missing.len(),
                        spec.hosts,
                        logs.join("; ")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Removes everything lab.json records, and only that: agents and QEMUs (by pid,
    /// after checking they are still ours), etcd, links, namespaces, bridges, the route,
    /// the directories and the client config if it still holds our token. Whatever is
    /// already gone is skipped; lab.json goes last, and stays if anything failed.
    pub fn down(self) -> Result<(), LabError> {
        let state = &self.state;
        let spec = &state.spec;
        let mut problems = Vec::new();

        // Watchdogs before the agents they watch: none may power a host off midway.
        let watchdogs: Vec<i32> = state
            .watchdogs
            .values()
            .filter(|watchdog| process::is_running(watchdog))
            .map(|watchdog| watchdog.pid)
            .collect();
        for pid in process::kill_all(&watchdogs) {
            problems.push(format!("watchdog {pid} survived SIGKILL"));
        }
        // Agents next and alone, so that none is still starting a QEMU when the run
        // directories are read for the QEMUs to kill.
        let agents: Vec<i32> = state
            .agents
            .values()
            .filter(|agent| process::is_running(agent))
            .map(|agent| agent.pid)
            .collect();
        for pid in process::kill_all(&agents) {
            problems.push(format!("agent {pid} survived SIGKILL"));
        }
        // A QEMU spawned just before its agent died writes its pidfile a moment later.
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut pids: Vec<i32> = spec
            .host_numbers()
            .flat_map(|host| process::host_qemus(&spec.host_run_dir(host)))
            .collect();
        if let Some(etcd) = state.etcd.as_ref().filter(|etcd| process::is_running(etcd)) {
            pids.push(etcd.pid);
        }
        for pid in process::kill_all(&pids) {
            problems.push(format!("process {pid} survived SIGKILL"));
        }
        // One that died by itself may be our unreaped child (a test's etcd).
        for spawned in state
            .agents
            .values()
            .chain(state.watchdogs.values())
            .chain(&state.etcd)
        {
            process::reap(spawned.pid);
        }

        // A veth goes with its peer; deleting it here, rather than leaving it to the
        // namespace's (asynchronous) teardown, means it is gone when `down` returns.
        for veth in &state.veths {
            if let Err(error) = network::remove_link(veth) {
                problems.push(format!("link {veth}: {error}"));
            }
        }
        for namespace in &state.namespaces {
            if let Err(error) = network::remove_namespace(namespace) {
                problems.push(format!("namespace {namespace}: {error}"));
            }
        }
        for bridge in &state.bridges {
            if let Err(error) = network::remove_link(bridge) {
                problems.push(format!("bridge {bridge}: {error}"));
            }
        }
        if let Some(route) = &state.route {
            if let Err(error) = network::remove_blackhole(route) {
                problems.push(format!("route blackhole {route}: {error}"));
            }
        }
        if let (Some(path), Some(token)) = (&state.client_config, &state.token) {
            let ours = ClientConfig::load(path).is_ok_and(|config| &config.token == token);
            if ours {
                if let Err(error) = std::fs::remove_file(path) {
                    problems.push(format!("{}: {error}", path.display()));
                }
            }
        }
        // The state directory (with lab.json) is the last one recorded, removed last.
        for dir in state.directories.iter().rev() {
            if *dir == spec.state_dir && !problems.is_empty() {
                continue;
            }
            match std::fs::remove_dir_all(dir) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    problems.push(format!("{}: {error}", dir.display()));
                }
                _ => {}
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(LabError::Down {
                lab: spec.name.clone(),
                problems,
            })
        }
    }

    /// What the lab looks like now: processes, namespaces, links, registrations.
    pub async fn status(&self) -> LabStatus {
        let spec = &self.state.spec;
        let etcd_running = self.state.etcd.as_ref().is_some_and(process::is_running);
        let registered = if etcd_running {
            let query = async { registered_hosts(&self.store().await.ok()?).await.ok() };
            tokio::time::timeout(Duration::from_secs(3), query)
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let hosts = spec
            .host_numbers()
            .map(|host| {
                let namespace = spec.namespace(host);
                let agent = self.state.agents.get(&host);
                let namespace_exists = network::namespace_exists(&namespace);
                HostStatus {
                    host: spec.host_name(host),
                    agent_pid: agent.map(|agent| agent.pid),
                    agent_running: agent.is_some_and(process::is_running),
                    registered: registered
                        .as_ref()
                        .map(|names| names.contains(&spec.host_name(host))),
                    management: spec.host_cidr(host, LabNet::Management),
                    migration: spec.host_cidr(host, LabNet::Migration),
                    business: spec.host_cidr(host, LabNet::Business),
                    links_down: if namespace_exists {
                        network::links_down(&namespace)
                    } else {
                        Vec::new()
                    },
                    qemus: process::host_qemus(&spec.host_run_dir(host)),
                    namespace_exists,
                    namespace,
                }
            })
            .collect();
        LabStatus {
            name: spec.name.clone(),
            subnet: spec.subnet(),
            state_dir: spec.state_dir.clone(),
            accel: self.state.accel,
            etcd: EtcdStatus {
                url: spec.etcd_url(),
                pid: self.state.etcd.as_ref().map(|etcd| etcd.pid),
                running: etcd_running,
            },
            api: spec.api_url(1),
            client_config: self.state.client_config.clone(),
            hosts,
        }
    }

    /// Why the lab cannot be used as it is, or `None` when it is whole: etcd and every
    /// agent running and registered, every host's namespace and links up, and the
    /// appliance record readable by this build.
    pub async fn unhealthy(&self) -> Option<String> {
        let status = self.status().await;
        if !status.etcd.running {
            return Some("its etcd is not running".into());
        }
        for host in &status.hosts {
            if !host.namespace_exists {
                return Some(format!("{}'s namespace is gone", host.host));
            }
            if !host.agent_running {
                return Some(format!("{}'s agent is not running", host.host));
            }
            if host.registered != Some(true) {
                return Some(format!("{} is not registered", host.host));
            }
            if !host.links_down.is_empty() {
                return Some(format!(
                    "{} has links down ({})",
                    host.host,
                    host.links_down
                        .iter()
                        .map(|net| format!("{net:?}").to_lowercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        let store = match self.store().await {
            Ok(store) => store,
            Err(error) => return Some(format!("its etcd does not answer ({error})")),
        };
        match store
            .get::<ImageRecord>(&store.keys().image(APPLIANCE_IMAGE))
            .await
        {
            Ok(Some(_)) => None,
            Ok(None) => Some("it has no appliance image".into()),
            Err(error) => Some(format!("its records are not this build's ({error})")),
        }
    }

    /// Injects a fault into host `host`; returns what was done, in words.
    pub fn fault(&mut self, host: u32, fault: Fault) -> Result<String, LabError> {
        let spec = self.state.spec.clone();
        let name = spec.host_name(host);
        spec.parse_host(&name).map_err(|problem| LabError::Spec {
            lab: spec.name.clone(),
            problem,
        })?;
        match fault {
            Fault::PowerOff | Fault::AgentKill => {
                let agent = self
                    .state
                    .agents
                    .get(&host)
                    .filter(|agent| process::is_running(agent))
                    .map(|agent| agent.pid);
                let qemus = if fault == Fault::PowerOff {
                    process::host_qemus(&spec.host_run_dir(host))
                } else {
                    Vec::new()
                };
                let pids: Vec<i32> = agent.iter().copied().chain(qemus.iter().copied()).collect();
                let survivors = process::kill_all(&pids);
                if !survivors.is_empty() {
                    return Err(self.fail(&name, format!("{survivors:?} survived SIGKILL")));
                }
                let agent_words = match agent {
                    Some(pid) => format!("killed agent {pid}"),
                    None => "agent was not running".into(),
                };
                Ok(match fault {
                    Fault::PowerOff => format!(
                        "{name}: powered off ({agent_words}, killed {} QEMU{})",
                        qemus.len(),
                        if qemus.len() == 1 { "" } else { "s" }
                    ),
                    _ => format!("{name}: {agent_words}; its VMs keep running"),
                })
            }
            Fault::AgentHang => {
                let agent = self
                    .state
                    .agents
                    .get(&host)
                    .filter(|agent| process::is_running(agent))
                    .map(|agent| agent.pid)
                    .ok_or_else(|| self.fail(&name, "its agent is not running"))?;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(agent),
                    nix::sys::signal::Signal::SIGSTOP,
                )
                .map_err(|error| self.fail(&name, format!("SIGSTOP to agent {agent}: {error}")))?;
                Ok(format!(
                    "{name}: agent {agent} hung (SIGSTOP); its VMs keep running"
                ))
            }
            Fault::ClockStep(step_ms) => {
                let file = process::clock_step_file(&spec, host);
                std::fs::write(&file, step_ms.to_string())
                    .map_err(|error| self.fail(file.display(), error))?;
                Ok(format!("{name}: wall clock stepped by {step_ms} ms"))
            }
            Fault::LinkDown(net) | Fault::LinkUp(net) => {
                let up = matches!(fault, Fault::LinkUp(_));
                self.set_link(host, net, up)?;
                Ok(format!(
                    "{name}: {net} link ({}) {}",
                    net.interface(),
                    if up { "up" } else { "down" }
                ))
            }
        }
    }

    /// Undoes faults on host `host`: every link up, the agent started if it is not running.
    pub fn heal(&mut self, host: u32) -> Result<String, LabError> {
        let name = self.state.spec.host_name(host);
        self.state
            .spec
            .parse_host(&name)
            .map_err(|problem| LabError::Spec {
                lab: self.state.spec.name.clone(),
                problem,
            })?;
        for net in LabNet::ALL {
            self.set_link(host, net, true)?;
        }
        let clock = process::clock_step_file(&self.state.spec, host);
        match std::fs::remove_file(&clock) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(self.fail(clock.display(), error)),
        }
        // A hung agent goes on where it stopped (a stopped process gets SIGCONT).
        if let Some(agent) = self
            .state
            .agents
            .get(&host)
            .filter(|a| process::is_running(a))
        {
            if let Err(error) = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.pid),
                nix::sys::signal::Signal::SIGCONT,
            ) {
                tracing::debug!("SIGCONT to agent {}: {error}", agent.pid);
            }
        }
        let restarted = self.start_agent(host)?;
        let pid = self.state.agents.get(&host).map(|agent| agent.pid);
        Ok(match (restarted, pid) {
            (true, Some(pid)) => format!("{name}: links up, agent restarted (pid {pid})"),
            _ => format!("{name}: links up, agent running"),
        })
    }

    fn save(&self) -> Result<(), LabError> {
        self.state
            .save()
            .map_err(|error| self.fail(self.state.spec.state_file().display(), error))
    }

    /// Creates a directory the lab owns and records it (before anything inside it).
    fn make_dir(&mut self, dir: &Path) -> Result<(), LabError> {
        std::fs::create_dir_all(dir)
            .map_err(|error| self.fail(format!("directory {}", dir.display()), error))?;
        if !self.state.directories.iter().any(|known| known == dir) {
            self.state.directories.push(dir.to_path_buf());
        }
        Ok(())
    }

    fn fail(&self, object: impl Display, detail: impl Display) -> LabError {
        LabError::Object {
            lab: self.state.spec.name.clone(),
            object: object.to_string(),
            detail: detail.to_string(),
        }
    }

    /// Removes a half-built lab after `error`; the error says if that failed too.
    fn down_after(self, error: LabError) -> LabError {
        match self.down() {
            Ok(()) => error,
            Err(cleanup) => LabError::Cleanup {
                error: Box::new(error),
                cleanup: Box::new(cleanup),
            },
        }
    }
}

/// Namespaces, bridges and routes are root's business; say so before failing halfway.
pub fn require_root(spec: &LabSpec) -> Result<(), LabError> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    Err(LabError::Spec {
        lab: spec.name.clone(),
        problem: "building a lab needs root (it creates namespaces, bridges and a route)".into(),
    })
}

/// Hosts with a registration under `hosts/` (a host may own several keys there).
async fn registered_hosts(store: &Store) -> Result<BTreeSet<String>, ferry_store::StoreError> {
    let prefix = store.keys().hosts();
    let (records, _) = store.list_raw(&prefix).await?;
    Ok(records
        .iter()
        .filter_map(|(key, _, _)| key.strip_prefix(&prefix))
        .filter_map(|rest| rest.split('/').next())
        .filter(|host| !host.is_empty())
        .map(str::to_string)
        .collect())
}

/// 16 random bytes from the kernel, in hex.
fn random_token() -> Result<String, std::io::Error> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}
