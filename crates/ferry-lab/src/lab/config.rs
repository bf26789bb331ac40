//! The files a lab hands to its agents and to the CLI: one agent config per host and the
//! client config, computed from the spec (no I/O).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ferry_agent::config::{
    AccelChoice, AgentConfig, ApiConfig, CapacityConfig, ClusterConfig, FenceConfig, FencingConfig,
    LeaseConfig, NetworkConfig, PathsConfig, PoolConfig, QemuConfig, TlsConfig,
};
use ferry_agent::fence_device::AllowedAgents;
use ferry_api::auth::{Role, TokenConfig};
use ferry_api::client_config::ClientConfig;
use ferry_model::{Bytes, HostName};
use ferry_qemu::Accel;

use super::fence::FENCE_AGENT_NAME;
use super::spec::{LabNet, LabSpec, API_PORT, HOST_BUSINESS_BRIDGE};

/// What each lab host may give its VMs: small, so that a laptop holds three hosts.
const HOST_CPUS: u32 = 2;
const HOST_MEMORY: Bytes = Bytes(4 * Bytes::GIB);
pub const CLUSTER_PREFIX: &str = "/ferry/";

/// The agent config of lab host `host`.
pub fn agent_config(
    spec: &LabSpec,
    host: u32,
    token: &str,
    accel: Accel,
    qemu_binary: &Path,
) -> Result<AgentConfig, String> {
    let host_name: HostName = spec
        .host_name(host)
        .parse()
        .map_err(|error| format!("host name {}: {error}", spec.host_name(host)))?;
    let networks: BTreeMap<String, NetworkConfig> = LabNet::ALL
        .into_iter()
        .map(|net| {
            let bridge = (net == LabNet::Business).then(|| HOST_BUSINESS_BRIDGE.to_string());
            let config = NetworkConfig {
                address: Some(spec.host_cidr(host, net)),
                bridge,
                interface: Some(net.interface().to_string()),
            };
            (net.name().to_string(), config)
        })
        .collect();
    Ok(AgentConfig {
        host: host_name,
        cluster: ClusterConfig {
            etcd: vec![spec.etcd_url()],
            prefix: CLUSTER_PREFIX.into(),
            secret_key_file: Some(cluster_key_file(spec, host)),
        },
        api: ApiConfig {
            listen: SocketAddr::from((spec.host_address(host, LabNet::Management), API_PORT)),
            advertise: Some(spec.api_url(host)),
            tokens: vec![TokenConfig {
                sha256: ferry_api::auth::sha256_hex(token),
                role: Role::Admin,
            }],
        },
        tls: TlsConfig {
            dir: spec.host_tls_dir(host),
        },
        lease: LeaseConfig::default(),
        capacity: CapacityConfig {
            cpus: Some(HOST_CPUS),
            memory: Some(HOST_MEMORY),
        },
        paths: PathsConfig {
            run_dir: spec.host_run_dir(host),
        },
        qemu: QemuConfig {
            binary: qemu_binary.to_path_buf(),
            accel: match accel {
                Accel::Kvm => AccelChoice::Kvm,
                Accel::Tcg => AccelChoice::Tcg,
            },
            ..QemuConfig::default()
        },
        migration: Default::default(),
        ha: Default::default(),
        fence: None,
        fencing: FencingConfig {
            allowed_agents: AllowedAgents::DEFAULT
                .iter()
                .map(|pattern| pattern.to_string())
                .chain([AllowedAgents::exact(&spec.state_dir.join(FENCE_AGENT_NAME))])
                .collect(),
        },
        pools: vec![
            PoolConfig {
                name: "shared".into(),
                path: spec.shared_pool(),
                shared: true,
            },
            PoolConfig {
                name: spec.local_pool_name(host),
                path: spec.local_pool(host),
                shared: false,
            },
        ],
        networks,
        // The default host monitors: each link's carrier, each pool's and the run
        // directory's I/O.
        monitors: Vec::new(),
    })
}

/// Host `host`'s copy of the lab's cluster key (each host's config names its own file,
/// as on real hosts; the bytes are the same).
pub fn cluster_key_file(spec: &LabSpec, host: u32) -> PathBuf {
    spec.state_dir.join(format!("host{host}-cluster.key"))
}

/// The "BMC password" of a lab host: `fence_ferry_lab` refuses to act on a sealed one,
/// so every lab fence shows that the leader opened the secret the host sealed.
pub const LAB_FENCE_PASSWORD: &str = "lab-bmc";

/// The lab host's fence device: `fence_ferry_lab` powers it off.
pub fn fence_config(spec: &LabSpec, host: u32, agent: &Path) -> FenceConfig {
    FenceConfig {
        agent: agent.to_path_buf(),
        timeout_ms: 15_000,
        options: BTreeMap::from([
            ("lab_dir".to_string(), spec.state_dir.display().to_string()),
            ("plug".to_string(), spec.host_name(host)),
            ("password".to_string(), LAB_FENCE_PASSWORD.to_string()),
        ]),
    }
}

/// The CLI's way in: host1's API with the admin token.
pub fn client_config(spec: &LabSpec, token: &str) -> ClientConfig {
    ClientConfig {
        api: spec.api_url(1),
        token: token.to_string(),
        ca: spec.ca_file(),
        fallback: spec
            .host_numbers()
            .skip(1)
            .map(|host| spec.api_url(host))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_config_survives_the_agents_own_parser() {
        let spec = LabSpec::default();
        let config =
            agent_config(&spec, 2, "abc123", Accel::Tcg, Path::new("/usr/bin/qemu")).unwrap();
        let text = toml::to_string(&config).unwrap();
        let parsed = AgentConfig::parse(&text).unwrap();
        assert_eq!(parsed, config);
        assert_eq!(parsed.api.listen.to_string(), "10.213.0.12:8700");
        assert_eq!(
            parsed.cluster.etcd,
            vec!["https://10.213.0.1:2379".to_string()]
        );
        assert_eq!(parsed.shared_pool().unwrap().path, spec.shared_pool());
        let business = &parsed.networks["business"];
        assert_eq!(business.address.as_deref(), Some("10.213.2.12/24"));
        assert_eq!(business.bridge.as_deref(), Some("br-biz"));
        assert_eq!(business.interface.as_deref(), Some("biz0"));
        assert_eq!(
            parsed.networks["migration"].interface.as_deref(),
            Some("migr0")
        );
        assert_eq!(parsed.qemu.accel, AccelChoice::Tcg);
    }

    #[test]
    fn a_lab_host_may_run_the_lab_fence_agent_and_seals_its_password() {
        let spec = LabSpec::default();
        let agent = spec.state_dir.join(FENCE_AGENT_NAME);
        let mut config =
            agent_config(&spec, 2, "abc123", Accel::Tcg, Path::new("/usr/bin/qemu")).unwrap();
        config.fence = Some(fence_config(&spec, 2, &agent));
        // The agent's own check: the lab agent is on the allowlist, and the password
        // has a cluster key to be sealed with.
        let parsed = AgentConfig::parse(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(
            parsed.cluster.secret_key_file,
            Some(cluster_key_file(&spec, 2))
        );
        let allowed = AllowedAgents::new(&parsed.fencing.allowed_agents).unwrap();
        allowed.check(&agent).unwrap();
        allowed.check(Path::new("/usr/sbin/fence_ipmilan")).unwrap();
    }

    #[test]
    fn the_client_talks_to_host1_with_the_admin_token() {
        let client = client_config(&LabSpec::default(), "t0k");
        assert_eq!(client.api, "https://10.213.0.11:8700");
        assert_eq!(client.token, "t0k");
        assert_eq!(
            client.fallback,
            ["https://10.213.0.12:8700", "https://10.213.0.13:8700"]
        );
    }
}
