//! The agent's configuration file (TOML). Every option has a default, so a minimal file
//! names only the host; `ferry agent config-example` prints a file with every option and
//! its comment. A bad file is refused with one line naming the key and the problem.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_api::auth::TokenConfig;
use ferry_model::monitor::{default_host_monitors, Check, Ladder, Monitor};
use ferry_model::{Bytes, HostName};
use serde::{Deserialize, Serialize};

use crate::fence_device::{AllowedAgents, FencePolicy};
use crate::secrets::{is_secret, seal_options, ClusterKey};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This host's name in the cluster (a DNS label).
    pub host: HostName,
    #[serde(default)]
    pub cluster: ClusterConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub lease: LeaseConfig,
    #[serde(default)]
    pub ha: HaConfig,
    /// How other hosts power this one off when it dies (a ClusterLabs fence agent).
    #[serde(default)]
    pub fence: Option<FenceConfig>,
    /// Which fence agents this host runs when it leads and fences another.
    #[serde(default)]
    pub fencing: FencingConfig,
    #[serde(default)]
    pub capacity: CapacityConfig,
    #[serde(default)]
    pub paths: PathsConfig,
    #[serde(default)]
    pub qemu: QemuConfig,
    #[serde(default)]
    pub migration: MigrationConfig,
    /// Storage pools: directories VM disks live in. A shared pool is mounted by every host.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Networks this host is attached to, by name (`management`, `migration`, `business`).
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkConfig>,
    /// Host monitors (`[[monitor]]`); none: the defaults (each network's carrier, each
    /// pool's and the run directory's I/O).
    #[serde(default, rename = "monitor", skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<HostMonitorConfig>,
}

/// One `[[monitor]]` of the agent config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostMonitorConfig {
    /// Default: the kind and what it watches (`carrier-business`).
    pub id: Option<String>,
    /// `carrier`, `ping`, `storage` or `local-disk`.
    pub kind: String,
    /// carrier and ping: the network (its `interface` for carrier).
    pub network: Option<String>,
    /// ping: the address to ping.
    pub address: Option<String>,
    /// storage: the pool.
    pub pool: Option<String>,
    /// e.g. `1s`.
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub failures: Option<u32>,
    /// `migrate-away` or `none`.
    pub ladder: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// etcd client URLs.
    pub etcd: Vec<String>,
    /// Key prefix of this cluster in etcd.
    pub prefix: String,
    /// The cluster key: a file of 32 random bytes, mode 0600, the same on every host
    /// (`head -c 32 /dev/urandom > /etc/ferry/cluster.key`). Fence options that are
    /// secrets (`password`, `passwd`, any key containing `password` or `secret`) are
    /// sealed with it before they go to etcd, and opened with it by the leader that runs
    /// the fence agent. Needed when `[fence]` has such an option.
    pub secret_key_file: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            etcd: vec!["https://127.0.0.1:2379".into()],
            prefix: "/ferry/".into(),
            secret_key_file: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the REST API listens on.
    pub listen: SocketAddr,
    /// URL other hosts and clients use to reach this API (default: from `listen`).
    pub advertise: Option<String>,
    /// Bootstrap bearer tokens (their SHA-256) and their roles (`admin`, `operator`,
    /// `viewer`); the others live in etcd.
    pub tokens: Vec<TokenConfig>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8700)),
            advertise: None,
            tokens: Vec::new(),
        }
    }
}

impl ApiConfig {
    pub fn advertised_url(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.listen))
    }
}

/// Every channel is TLS: this host's certificate (its common name is the host's name)
/// and the cluster CA, which is the only CA this host trusts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Holds `ca.pem`, `host.pem` and `host-key.pem` (readable by root only).
    pub dir: PathBuf,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            dir: PathBuf::from("/etc/ferry/tls"),
        }
    }
}

impl TlsConfig {
    /// Writes this host's certificate as QEMU's `tls-creds-x509` reads a directory
    /// (the same certificate for the server and the client side) into `dir`.
    pub fn write_qemu_creds(&self, dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let files = self.files();
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|error| format!("{}: {error}", dir.display()))?;
        for (from, to) in [
            (&files.ca, "ca-cert.pem"),
            (&files.cert, "server-cert.pem"),
            (&files.key, "server-key.pem"),
            (&files.cert, "client-cert.pem"),
            (&files.key, "client-key.pem"),
        ] {
            let target = dir.join(to);
            std::fs::copy(from, &target)
                .and_then(|_| {
                    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                })
                .map_err(|error| format!("{} to {}: {error}", from.display(), target.display()))?;
        }
        Ok(())
    }

    pub fn files(&self) -> ferry_tls::TlsFiles {
        ferry_tls::TlsFiles {
            ca: self.dir.join(ferry_tls::CA_FILE),
            cert: self.dir.join("host.pem"),
            key: self.dir.join("host-key.pem"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// Lease time-to-live, seconds: a host whose agent stops renewing for this long is gone.
    pub ttl_seconds: u64,
}

/// Self-fencing and the storage heartbeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaConfig {
    /// Lease renewal and storage heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// Kill this host's HA VMs when the lease has not been renewed for this long
    /// (milliseconds, below the lease TTL), unless most hosts lost etcd too.
    pub fence_after_ms: u64,
    /// A hardware or kernel watchdog device (`/dev/watchdog`, softdog) fed every
    /// heartbeat while the agent is sane; a hung agent gets its host rebooted.
    pub watchdog: Option<PathBuf>,
    /// The watchdog reboots the host this long after the last feed (milliseconds; set
    /// on the device, and counted in the leader's deadline before it restarts this
    /// host's VMs elsewhere).
    pub watchdog_timeout_ms: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        let timing = ferry_manager::ha::HaTiming::default();
        HaConfig {
            heartbeat_ms: timing.heartbeat_ms,
            fence_after_ms: timing.fence_after_ms,
            watchdog: None,
            watchdog_timeout_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceConfig {
    /// The fence agent's executable, e.g. `/usr/sbin/fence_ipmilan`.
    pub agent: PathBuf,
    /// One attempt longer than this is killed and counts as failed (milliseconds).
    #[serde(default = "default_fence_timeout_ms")]
    pub timeout_ms: u64,
    /// Passed as `key=value` lines on the agent's stdin (`ip`, `username`, `plug`, …).
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

fn default_fence_timeout_ms() -> u64 {
    20_000
}

/// What the leader may run as another host's fence agent: the record naming it comes
/// from etcd, so its path must match one of these (checked before every run).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// Glob patterns (`*` does not cross `/`) or exact absolute paths.
    pub allowed_agents: Vec<String>,
}

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            allowed_agents: AllowedAgents::DEFAULT
                .iter()
                .map(|pattern| pattern.to_string())
                .collect(),
        }
    }
}

impl AgentConfig {
    /// The fence device this host publishes for the others, if it has one.
    pub fn fence_device(&self) -> Option<ferry_model::ha::FenceDevice> {
        self.fence
            .as_ref()
            .map(|fence| ferry_model::ha::FenceDevice {
                version: ferry_model::cluster::RECORD_VERSION,
                host: self.host.clone(),
                agent: fence.agent.clone(),
                options: fence.options.clone(),
                timeout_ms: fence.timeout_ms,
            })
    }

    /// The allowlist and the cluster key (read from its file) the leader fences with.
    pub fn fence_policy(&self) -> Result<FencePolicy, String> {
        let key = match &self.cluster.secret_key_file {
            Some(path) => Some(
                ClusterKey::load(path)
                    .map_err(|problem| format!("cluster.secret_key_file: {problem}"))?,
            ),
            None => None,
        };
        Ok(FencePolicy {
            allowed: AllowedAgents::new(&self.fencing.allowed_agents)?,
            key,
        })
    }

    /// This host's fence device as it is written to etcd: its secrets sealed.
    pub fn sealed_fence_device(
        &self,
        key: Option<&ClusterKey>,
    ) -> Result<Option<ferry_model::ha::FenceDevice>, String> {
        let Some(mut device) = self.fence_device() else {
            return Ok(None);
        };
        device.options = seal_options(key, self.host.as_str(), &device.options)?;
        Ok(Some(device))
    }

    /// The watchdog's timeout, if the host has one.
    pub fn watchdog_ms(&self) -> Option<u64> {
        self.ha
            .watchdog
            .as_ref()
            .map(|_| self.ha.watchdog_timeout_ms)
    }

    pub fn ha_timing(&self) -> ferry_manager::ha::HaTiming {
        ferry_manager::ha::HaTiming {
            heartbeat_ms: self.ha.heartbeat_ms,
            fence_after_ms: self.ha.fence_after_ms,
            lease_ttl_ms: self.lease.ttl_seconds * 1000,
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        LeaseConfig { ttl_seconds: 6 }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CapacityConfig {
    /// vCPUs VMs may use on this host (default: the host's CPUs).
    pub cpus: Option<u32>,
    /// Memory VMs may use on this host (default: 80% of the host's memory).
    pub memory: Option<Bytes>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Per-VM run directories (sockets, pidfiles, console logs). Must not be shared.
    pub run_dir: PathBuf,
}

impl PathsConfig {
    /// QEMU's copy of this host's certificate (see `TlsConfig::write_qemu_creds`).
    pub fn qemu_tls_dir(&self) -> PathBuf {
        self.run_dir.join("qemu-tls")
    }
}

impl Default for PathsConfig {
    fn default() -> Self {
        PathsConfig {
            run_dir: PathBuf::from("/run/ferry/agent"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelChoice {
    /// Probe: KVM if a guest really runs under it, else TCG.
    Auto,
    Kvm,
    Tcg,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    /// The QEMU binary.
    pub binary: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: AccelChoice,
    /// Grace period of a graceful stop before QEMU is killed, seconds.
    pub stop_grace_seconds: u64,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("/usr/bin/qemu-system-x86_64"),
            accel: AccelChoice::Auto,
            stop_grace_seconds: 30,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationConfig {
    /// Migrations this host takes part in at once (as source or destination); more queue.
    pub max_concurrent: u32,
    /// Bandwidth a live migration may use, per second (QEMU's `max-bandwidth`).
    pub bandwidth: Bytes,
    /// Live-migration and disk-copy streams over TLS with this host's certificate,
    /// accepted only from the other host of the op. Every host must agree.
    pub tls: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            max_concurrent: 2,
            bandwidth: Bytes(10 * Bytes::GIB),
            tls: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    pub path: PathBuf,
    /// Mounted by every host (VMs on it can move without copying disks).
    #[serde(default)]
    pub shared: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// This host's address on the network, with prefix (`10.0.0.11/24`).
    pub address: Option<String>,
    /// Bridge that VM taps on this network join.
    pub bridge: Option<String>,
    /// The host's interface on this network (for link monitoring).
    pub interface: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("config {path}: {problem}")]
pub struct ConfigError {
    pub path: String,
    pub problem: String,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            path: shown.clone(),
            problem: error.to_string(),
        })?;
        AgentConfig::parse(&text).map_err(|problem| ConfigError {
            path: shown,
            problem,
        })
    }

    /// Parses and checks a config; the error names the key (`capacity.cpus: …`).
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let deserializer = toml::Deserializer::new(text);
        let config: AgentConfig =
            serde_path_to_error::deserialize(deserializer).map_err(|error| {
                let path = error.path().to_string();
                let inner = error.into_inner();
                let message = inner.message().replace('\n', " ");
                let line = inner
                    .span()
                    .map(|span| text[..span.start].lines().count().max(1));
                let location = line
                    .map(|line| format!(" (line {line})"))
                    .unwrap_or_default();
                if path.is_empty() || path == "." {
                    format!("{message}{location}")
                } else {
                    format!("{path}: {message}{location}")
                }
            })?;
        config.check()?;
        Ok(config)
    }

    /// The host monitors to run: the configured ones, checked, or the defaults.
    pub fn host_monitors(&self) -> Result<Vec<Monitor>, String> {
        if self.monitors.is_empty() {
            let networks: Vec<(String, String)> = self
                .networks
                .iter()
                .filter_map(|(name, network)| Some((name.clone(), network.interface.clone()?)))
                .collect();
            let pools: Vec<(String, PathBuf, bool)> = self
                .pools
                .iter()
                .map(|pool| (pool.name.clone(), pool.path.clone(), pool.shared))
                .collect();
            return Ok(default_host_monitors(
                &networks,
                &pools,
                self.paths.run_dir.clone(),
                self.fence.is_some(),
            ));
        }
        let mut monitors: Vec<Monitor> = Vec::new();
        for (index, config) in self.monitors.iter().enumerate() {
            let monitor = self
                .host_monitor(config)
                .map_err(|problem| format!("monitor[{index}] ({}): {problem}", config.kind))?;
            if monitors.iter().any(|known| known.id == monitor.id) {
                return Err(format!(
                    "monitor[{index}]: a second monitor with id {}",
                    monitor.id
                ));
            }
            monitors.push(monitor);
        }
        Ok(monitors)
    }

    fn host_monitor(&self, config: &HostMonitorConfig) -> Result<Monitor, String> {
        let network = |config: &HostMonitorConfig| -> Result<(String, &NetworkConfig), String> {
            let name = config.network.clone().ok_or("needs network")?;
            let network = self
                .networks
                .get(&name)
                .ok_or_else(|| format!("network {name} is not in [networks]"))?;
            Ok((name, network))
        };
        let (check, what) = match config.kind.as_str() {
            "carrier" => {
                let (name, settings) = network(config)?;
                let interface = settings
                    .interface
                    .clone()
                    .ok_or_else(|| format!("networks.{name} has no interface to watch"))?;
                (
                    Check::Carrier {
                        network: name.clone(),
                        interface,
                    },
                    name,
                )
            }
            "ping" => {
                let (name, _) = network(config)?;
                let address = config.address.clone().ok_or("needs address")?;
                address
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| format!("address {address:?} is not an IP address"))?;
                (
                    Check::Ping {
                        network: name.clone(),
                        address,
                    },
                    name,
                )
            }
            "storage" => {
                let name = config.pool.clone().ok_or("needs pool")?;
                let pool = self
                    .pools
                    .iter()
                    .find(|pool| pool.name == name)
                    .ok_or_else(|| format!("pool {name} is not in [[pools]]"))?;
                (
                    Check::Storage {
                        pool: name.clone(),
                        path: pool.path.clone(),
                    },
                    name,
                )
            }
            "local-disk" => (
                Check::LocalDisk {
                    path: self.paths.run_dir.clone(),
                },
                "run-dir".into(),
            ),
            other => {
                return Err(format!(
                    "unknown host monitor kind {other:?}: expected carrier, ping, storage or local-disk"
                ))
            }
        };
        let duration = |field: &str, text: &Option<String>, default_ms: u64| match text {
            None => Ok(default_ms),
            Some(text) => humantime::parse_duration(text)
                .map(|duration| duration.as_millis() as u64)
                .map_err(|error| format!("{field} {text:?}: {error}")),
        };
        let interval_ms = duration("interval", &config.interval, 1_000)?;
        let monitor = Monitor {
            id: config
                .id
                .clone()
                .unwrap_or_else(|| format!("{}-{what}", config.kind)),
            check,
            interval_ms,
            timeout_ms: duration("timeout", &config.timeout, interval_ms.min(1_000))?,
            failures: config.failures.unwrap_or(2),
            ladder: config
                .ladder
                .as_deref()
                .unwrap_or("migrate-away")
                .parse::<Ladder>()?,
            restart_command: None,
            builtin: false,
        };
        monitor.validate()?;
        if monitor
            .ladder
            .contains(ferry_model::monitor::Action::FenceHost)
            && self.fence.is_none()
        {
            return Err("fence-host needs this host's fence device ([fence])".into());
        }
        Ok(monitor)
    }

    fn check(&self) -> Result<(), String> {
        if self.cluster.etcd.is_empty() {
            return Err("cluster.etcd: at least one etcd URL is needed".into());
        }
        if let Some(plain) = self
            .cluster
            .etcd
            .iter()
            .find(|url| !url.starts_with("https://"))
        {
            return Err(format!(
                "cluster.etcd: {plain} is not an https:// URL (etcd is reached over TLS only)"
            ));
        }
        if let Some(advertise) = &self.api.advertise {
            if !advertise.starts_with("https://") {
                return Err(format!(
                    "api.advertise: {advertise} is not an https:// URL (the API is served over TLS only)"
                ));
            }
            if let Some(problem) = unreachable_from_elsewhere(advertise) {
                return Err(format!(
                    "api.advertise: {advertise} {problem}; give an address the other hosts reach"
                ));
            }
        } else if self.api.listen.ip().is_unspecified() {
            return Err(format!(
                "api.advertise: must be set when api.listen ({}) is a wildcard address; give the URL the other hosts reach",
                self.api.listen
            ));
        }
        if self.lease.ttl_seconds < 2 {
            return Err(format!(
                "lease.ttl_seconds: {} is below the minimum of 2",
                self.lease.ttl_seconds
            ));
        }
        self.ha_timing().check()?;
        let allowed = AllowedAgents::new(&self.fencing.allowed_agents)?;
        if let Some(path) = &self.cluster.secret_key_file {
            if !path.is_absolute() {
                return Err(format!(
                    "cluster.secret_key_file: {} must be an absolute path",
                    path.display()
                ));
            }
        }
        if let Some(device) = self.fence_device() {
            device.check()?;
            allowed
                .check(&device.agent)
                .map_err(|problem| format!("fence.agent: {problem}"))?;
            let secret = device.options.keys().find(|option| is_secret(option));
            if let (Some(option), None) = (secret, &self.cluster.secret_key_file) {
                return Err(format!(
                    "fence.options.{option}: a secret is sealed in etcd with the cluster key; set cluster.secret_key_file"
                ));
            }
        }
        if self.ha.watchdog.is_some() && !(1000..=600_000).contains(&self.ha.watchdog_timeout_ms) {
            return Err(format!(
                "ha.watchdog_timeout_ms: {} must be between 1000 and 600000",
                self.ha.watchdog_timeout_ms
            ));
        }
        if let Some(watchdog) = &self.ha.watchdog {
            if !watchdog.is_absolute() {
                return Err(format!(
                    "ha.watchdog: {} must be an absolute path",
                    watchdog.display()
                ));
            }
        }
        self.host_monitors()?;
        if self.migration.max_concurrent == 0 {
            return Err("migration.max_concurrent: must be at least 1".into());
        }
        if self.migration.bandwidth.0 < Bytes::MIB {
            return Err(format!(
                "migration.bandwidth: {} per second is too little to migrate anything",
                self.migration.bandwidth
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for pool in &self.pools {
            if !names.insert(&pool.name) {
                return Err(format!("pools: {:?} is defined twice", pool.name));
            }
            if !pool.path.is_absolute() {
                return Err(format!(
                    "pools.{}.path: {} must be absolute",
                    pool.name,
                    pool.path.display()
                ));
            }
        }
        Ok(())
    }

    pub fn shared_pool(&self) -> Option<&PoolConfig> {
        self.pools.iter().find(|pool| pool.shared)
    }
}

/// Why other hosts could not reach this advertised URL (their own loopback, or no
/// address at all), if they could not.
fn unreachable_from_elsewhere(url: &str) -> Option<&'static str> {
    let parsed = match reqwest::Url::parse(url) {
        Ok(parsed) => parsed,
        Err(_) => return Some("is not a URL"),
    };
    let Some(host) = parsed.host_str() else {
        return Some("names no host");
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let Ok(ip) = bare.parse::<std::net::IpAddr>() else {
        let name = host.to_ascii_lowercase();
        let local = name == "localhost" || name.ends_with(".localhost");
        return local.then_some("is a loopback name");
    };
    if ip.is_loopback() {
        Some("is a loopback address")
    } else if ip.is_unspecified() {
        Some("is an unspecified address")
    } else {
        None
    }
}

/// A commented configuration with every option at its default.
pub const EXAMPLE: &str = r#"# Ferry agent configuration. Every option but `host` has a default.

# This host's name in the cluster (lowercase letters, digits, '-').
host = "host1"

[cluster]
# etcd client URLs.
etcd = ["https://127.0.0.1:2379"]
# Key prefix of this cluster in etcd.
prefix = "/ferry/"
# The cluster key: 32 random bytes in a file only root reads (mode 0600), the same on
# every host (head -c 32 /dev/urandom > /etc/ferry/cluster.key). Fence options that are
# secrets (password, passwd, anything with "password" or "secret" in its name) are
# sealed with it before they go to etcd; the leader opens them to fence. Needed when
# [fence] has a secret.
# secret_key_file = "/etc/ferry/cluster.key"

[api]
# Address the REST API listens on.
listen = "127.0.0.1:8700"
# URL other hosts and clients use to reach this API (default: from listen).
# advertise = "https://10.0.0.11:8700"
# Bootstrap bearer tokens of the whole cluster and their roles (admin, operator,
# viewer), as the SHA-256 of the secret (`echo -n SECRET | ferry token hash`). Make the
# rest with `ferry token create`: etcd keeps their hashes.
# tokens = [{ sha256 = "…64 hex digits…", role = "admin" }]

[tls]
# ca.pem (the cluster CA, the only one trusted), host.pem and host-key.pem (this
# host's certificate, whose common name is `host`). `ferry lab up` makes them for the
# lab; rotate by issuing new host certificates from the same CA and restarting the agent.
dir = "/etc/ferry/tls"

[lease]
# Seconds without a renewal after which this host counts as gone.
ttl_seconds = 6

[ha]
# Lease renewal and storage heartbeat interval.
heartbeat_ms = 1000
# Kill this host's HA VMs when the lease is this old (below the TTL), unless most
# hosts lost etcd too (then nobody restarts anything and everything keeps running).
fence_after_ms = 4000
# A watchdog device fed every heartbeat while the agent is sane (its reconciler runs):
# a hung agent gets its host rebooted. Off unless set. Stopping the agent stops the
# feeding too, so with a watchdog on, stop it only on a host you mean to reboot.
# watchdog = "/dev/watchdog"
# It reboots the host this long after the last feed; set on the device at start-up.
# An HA host needs a watchdog or a fence device: without either, a hung agent could
# leave its VMs running, so the cluster does not restart them elsewhere on silence.
# watchdog_timeout_ms = 10000

# How the other hosts power this one off when it dies: any ClusterLabs fence agent.
# Options go to the agent's stdin as key=value lines; "action" is Ferry's to choose.
# [fence]
# agent = "/usr/sbin/fence_ipmilan"
# timeout_ms = 20000
# options = { ip = "10.0.9.11", username = "admin", password = "secret", lanplus = "1" }

[fencing]
# The fence agents this host runs when it leads and fences another host: glob patterns
# (* does not cross /) or exact paths. A device naming any other path is refused, here
# at start-up and by the leader before every run.
allowed_agents = ["/usr/sbin/fence_*"]

[capacity]
# vCPUs and memory VMs may use here (default: all CPUs, 80% of memory).
# cpus = 8
# memory = "32G"

[paths]
# Per-VM run directories: sockets, pidfiles, console logs. Local to this host.
run_dir = "/run/ferry/agent"

[qemu]
binary = "/usr/bin/qemu-system-x86_64"
# auto (probe KVM, fall back to TCG), kvm or tcg.
accel = "auto"
# Seconds a graceful stop waits for the guest before killing QEMU.
stop_grace_seconds = 30

[migration]
# Migrations this host takes part in at once (source or destination); more wait in a queue.
max_concurrent = 2
# Bandwidth one live migration may use, per second.
bandwidth = "10G"
# Live-migration and disk-copy streams over TLS (this host's certificate; only the
# other host of the op is let in). Every host must agree.
tls = true

# Storage pools. A shared pool is mounted at the same path on every host.
# [[pools]]
# name = "shared"
# path = "/srv/ferry/shared"
# shared = true

# Networks by name; VMs' NICs on `business` join its bridge.
# [networks.business]
# address = "10.0.2.11/24"
# bridge = "br-business"
# interface = "eth2"

# Host monitors. Without any: each network's carrier (business: migrate its VMs away),
# each pool's and the run directory's I/O (migrate the VMs using them away).
# [[monitor]]
# kind = "ping"              # carrier, ping, storage or local-disk
# network = "business"
# address = "10.0.2.1"
# interval = "1s"
# timeout = "1s"
# failures = 3
# ladder = "migrate-away"    # or none
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_naming_only_the_host_gets_defaults() {
        let config = AgentConfig::parse("host = \"host1\"").unwrap();
        assert_eq!(config.lease.ttl_seconds, 6);
        assert_eq!(config.cluster.prefix, "/ferry/");
        assert_eq!(config.api.advertised_url(), "https://127.0.0.1:8700");
    }

    #[test]
    fn the_example_is_a_valid_config() {
        AgentConfig::parse(EXAMPLE).unwrap();
    }

    #[test]
    fn a_wrong_type_names_the_key() {
        let problem =
            AgentConfig::parse("host = \"h\"\n[capacity]\ncpus = \"many\"\n").unwrap_err();
        assert!(
            problem.starts_with("capacity.cpus: invalid type"),
            "{problem}"
        );
        assert!(problem.contains("line 3"), "{problem}");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let problem = AgentConfig::parse("host = \"h\"\n[lease]\nttl = 5\n").unwrap_err();
        assert!(problem.contains("unknown field `ttl`"), "{problem}");
    }

    #[test]
    fn an_illegal_host_name_is_refused() {
        let problem = AgentConfig::parse("host = \"Host_1\"").unwrap_err();
        assert!(problem.starts_with("host: "), "{problem}");
    }

    #[test]
    fn a_fence_deadline_past_the_lease_ttl_is_refused() {
        let problem =
            AgentConfig::parse("host = \"h\"\n[ha]\nfence_after_ms = 7000\n").unwrap_err();
        assert!(
            problem.contains("must end below the lease TTL"),
            "{problem}"
        );
    }

    #[test]
    fn a_fence_device_is_checked_at_start_up() {
        let config = AgentConfig::parse(
            "host = \"h\"\n[fence]\nagent = \"/usr/sbin/fence_ipmilan\"\noptions = { ip = \"10.0.0.9\" }\n",
        )
        .unwrap();
        let device = config.fence_device().unwrap();
        assert_eq!(device.timeout_ms, 20_000);
        assert_eq!(device.options["ip"], "10.0.0.9");
        let problem = AgentConfig::parse(
            "host = \"h\"\n[fence]\nagent = \"/x\"\noptions = { action = \"on\" }\n",
        )
        .unwrap_err();
        assert!(problem.contains("chosen by Ferry"), "{problem}");
    }

    #[test]
    fn a_fence_agent_off_the_allowlist_is_refused_at_start_up() {
        let device = "[fence]\nagent = \"/usr/local/bin/fence_custom\"\n";
        let problem = AgentConfig::parse(&format!("host = \"h\"\n{device}")).unwrap_err();
        assert_eq!(
            problem,
            "fence.agent: fence agent /usr/local/bin/fence_custom refused: not in fencing.allowed_agents [/usr/sbin/fence_*]"
        );
        let allowed = format!(
            "host = \"h\"\n{device}[fencing]\nallowed_agents = [\"/usr/local/bin/fence_custom\"]\n"
        );
        AgentConfig::parse(&allowed).unwrap();
        let problem = AgentConfig::parse(
            "host = \"h\"\n[fence]\nagent = \"/usr/sbin/../bin/fence_x\"\n[fencing]\nallowed_agents = [\"/usr/*/fence_x\"]\n",
        )
        .unwrap_err();
        assert!(problem.contains("without . or .."), "{problem}");
    }

    #[test]
    fn a_fence_secret_needs_the_cluster_key_and_is_sealed_for_etcd() {
        let device = "[fence]\nagent = \"/usr/sbin/fence_ipmilan\"\noptions = { ip = \"10.0.9.11\", password = \"hunter2\" }\n";
        let problem = AgentConfig::parse(&format!("host = \"h\"\n{device}")).unwrap_err();
        assert!(
            problem.starts_with("fence.options.password: ")
                && problem.contains("cluster.secret_key_file"),
            "{problem}"
        );
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("cluster.key");
        ClusterKey::generate().unwrap().write(&key_file).unwrap();
        let config = AgentConfig::parse(&format!(
            "host = \"h\"\n[cluster]\nsecret_key_file = \"{}\"\n{device}",
            key_file.display()
        ))
        .unwrap();
        let policy = config.fence_policy().unwrap();
        let sealed = config
            .sealed_fence_device(policy.key.as_ref())
            .unwrap()
            .unwrap();
        assert_eq!(sealed.options["ip"], "10.0.9.11");
        let written = serde_json::to_string(&sealed).unwrap();
        assert!(!written.contains("hunter2"), "{written}");
        assert!(sealed.options["password"].starts_with("enc:v1:"));
    }

    #[test]
    fn host_monitors_default_to_links_and_storage_and_bad_ones_are_named() {
        let base = "host = \"h\"\n[[pools]]\nname = \"shared\"\npath = \"/srv/shared\"\n[networks.business]\ninterface = \"eth2\"\n";
        let defaults = AgentConfig::parse(base).unwrap().host_monitors().unwrap();
        let ids: Vec<&str> = defaults.iter().map(|monitor| monitor.id.as_str()).collect();
        assert_eq!(ids, ["carrier-business", "storage-shared", "local-disk"]);
        assert_eq!(
            defaults[1].ladder.to_string(),
            "migrate-away",
            "no fence device"
        );

        let ping = format!(
            "{base}[[monitor]]\nkind = \"ping\"\nnetwork = \"business\"\naddress = \"10.0.2.1\"\nfailures = 3\n"
        );
        let configured = AgentConfig::parse(&ping).unwrap().host_monitors().unwrap();
        assert_eq!(configured.len(), 1);
        assert_eq!(configured[0].check.to_string(), "ping 10.0.2.1 (business)");

        for (extra, reason) in [
            (
                "kind = \"ping\"\nnetwork = \"business\"\naddress = \"gateway\"",
                "not an IP address",
            ),
            (
                "kind = \"carrier\"\nnetwork = \"storage\"",
                "not in [networks]",
            ),
            (
                "kind = \"storage\"\npool = \"shared\"\nladder = \"reset-vm\"",
                "host monitor",
            ),
            (
                "kind = \"storage\"\npool = \"shared\"\ninterval = \"0s\"",
                "interval",
            ),
            ("kind = \"smoke\"", "unknown host monitor kind"),
            (
                "kind = \"storage\"\npool = \"shared\"\nladder = \"migrate-away,fence-host\"",
                "fence device",
            ),
        ] {
            let problem = AgentConfig::parse(&format!("{base}[[monitor]]\n{extra}\n")).unwrap_err();
            assert!(problem.contains(reason), "{extra}: {problem}");
            assert!(problem.starts_with("monitor[0]"), "{problem}");
        }
    }

    #[test]
    fn an_advertised_api_address_other_hosts_cannot_reach_is_refused() {
        for (advertise, problem) in [
            ("https://127.0.0.1:8700", "is a loopback address"),
            ("https://127.1.2.3:8700", "is a loopback address"),
            ("https://[::1]:8700", "is a loopback address"),
            ("https://0.0.0.0:8700", "is an unspecified address"),
            ("https://localhost:8700", "is a loopback name"),
        ] {
            let refused = AgentConfig::parse(&format!(
                "host = \"h\"\n[api]\nadvertise = \"{advertise}\"\n"
            ))
            .unwrap_err();
            assert_eq!(
                refused,
                format!(
                    "api.advertise: {advertise} {problem}; give an address the other hosts reach"
                )
            );
        }
        AgentConfig::parse("host = \"h\"\n[api]\nadvertise = \"https://10.0.0.11:8700\"\n")
            .unwrap();
        AgentConfig::parse("host = \"h\"\n[api]\nadvertise = \"https://host1.example:8700\"\n")
            .unwrap();
        let wildcard =
            AgentConfig::parse("host = \"h\"\n[api]\nlisten = \"0.0.0.0:8700\"\n").unwrap_err();
        assert!(
            wildcard.starts_with("api.advertise: must be set"),
            "{wildcard}"
        );
    }

    #[test]
    fn a_too_short_lease_is_refused() {
        let problem = AgentConfig::parse("host = \"h\"\n[lease]\nttl_seconds = 1\n").unwrap_err();
        assert_eq!(problem, "lease.ttl_seconds: 1 is below the minimum of 2");
    }
}
