//! What a lab is made of, computed from its name and a few numbers alone: namespace and
//! interface names, addresses, directories, ports. No I/O here (but in
//! [`LabSpec::for_test`]), so every name and address is checked without root.
//!
//! Addresses, with B the spec's `subnet_base`: the three switches are 10.B.0.1,
//! 10.B.1.1 and 10.B.2.1 (management, migration, business, each a /24); host *i* is
//! 10.B.n.(10+i) on each; VMs get business addresses from 10.B.2.100 on.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ferry_model::cluster::NetworkRecord;
use serde::{Deserialize, Serialize};

use crate::defaults;

pub const DEFAULT_NAME: &str = "fl";
pub const DEFAULT_HOSTS: u32 = 3;
pub const DEFAULT_SUBNET_BASE: u8 = 213;
/// Hosts are 10.B.n.11…; VMs start at .100, so hosts stop well before.
pub const MAX_HOSTS: u32 = 64;
/// Every agent's REST API listens on this port, on its management address.
pub const API_PORT: u16 = 8700;
pub const ETCD_CLIENT_PORT: u16 = 2379;
/// Linux refuses interface names longer than this (IFNAMSIZ minus the NUL).
const IFNAME_MAX: usize = 15;
const NAME_MAX: usize = 10;
/// The business network's range for VM addresses.
const VM_FIRST: u8 = 100;
const VM_LAST: u8 = 250;

/// The three networks every lab host is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabNet {
    /// Agent ↔ etcd, the API, the admin workstation.
    Management,
    /// Live-migration streams between hosts.
    Migration,
    /// VM traffic: each host bridges its VMs' taps onto it.
    Business,
}

impl LabNet {
    pub const ALL: [LabNet; 3] = [LabNet::Management, LabNet::Migration, LabNet::Business];

    /// The network's name in agent configs and cluster records.
    pub fn name(self) -> &'static str {
        match self {
            LabNet::Management => "management",
            LabNet::Migration => "migration",
            LabNet::Business => "business",
        }
    }

    /// The host's interface on this network, inside its namespace.
    pub fn interface(self) -> &'static str {
        match self {
            LabNet::Management => "mgmt0",
            LabNet::Migration => "migr0",
            LabNet::Business => "biz0",
        }
    }

    fn third_octet(self) -> u8 {
        match self {
            LabNet::Management => 0,
            LabNet::Migration => 1,
            LabNet::Business => 2,
        }
    }

    fn switch_suffix(self) -> &'static str {
        match self {
            LabNet::Management => "mgmt",
            LabNet::Migration => "migr",
            LabNet::Business => "biz",
        }
    }

    /// One letter, so the root-side veth name stays short (`flh1m`).
    fn veth_letter(self) -> char {
        match self {
            LabNet::Management => 'm',
            LabNet::Migration => 'g',
            LabNet::Business => 'b',
        }
    }
}

impl std::fmt::Display for LabNet {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.name())
    }
}

/// The bridge VM taps join inside each host's namespace.
pub const HOST_BUSINESS_BRIDGE: &str = "br-biz";

/// One lab: its name, size, address block, directories and ports. Written into
/// `lab.json`, so `down` and `status` need nothing but the lab's name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    /// Prefix of every namespace, bridge and veth (`fl` → `fl-host1`, `fl-mgmt`, `flh1m`).
    pub name: String,
    pub hosts: u32,
    /// Second octet of the lab's 10.B.0.0/16.
    pub subnet_base: u8,
    /// lab.json, agent configs and logs, etcd's data, the pools.
    pub state_dir: PathBuf,
    /// Parent of the hosts' run directories (`{run_dir}/host1`).
    pub run_dir: PathBuf,
    /// etcd serves clients on 10.B.0.1:`etcd_client_port`.
    pub etcd_client_port: u16,
    /// etcd's peer port on 127.0.0.1; 0 picks a free one when etcd starts.
    pub etcd_peer_port: u16,
    /// Where the CLI's client config (API URL and admin token) is written.
    pub client_config: PathBuf,
    /// The `ferry` binary agents run (default: the running executable).
    pub ferry_binary: Option<PathBuf>,
    /// Every host gets the lab's fence device (`fence_ferry_lab`); without, a host's
    /// watchdog is what stops it when its agent hangs.
    #[serde(default = "yes")]
    pub fence_devices: bool,
    /// Live-migration and disk-copy streams over TLS (the agents' `migration.tls`);
    /// off only to measure what TLS costs.
    #[serde(default = "yes")]
    pub migration_tls: bool,
}

fn yes() -> bool {
    true
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec::named(DEFAULT_NAME)
    }
}

impl LabSpec {
    /// A lab with the default size and addresses, kept under the default directories.
    pub fn named(name: &str) -> LabSpec {
        LabSpec {
            name: name.to_string(),
            hosts: DEFAULT_HOSTS,
            subnet_base: DEFAULT_SUBNET_BASE,
            state_dir: defaults::lab_dir().join(name),
            run_dir: defaults::run_dir().join(format!("lab-{name}")),
            etcd_client_port: ETCD_CLIENT_PORT,
            etcd_peer_port: 0,
            client_config: ferry_api::client_config::default_path(),
            ferry_binary: None,
            fence_devices: true,
            migration_tls: true,
        }
    }

    /// A lab for one test: a name, an address block and directories no other test
    /// uses at the same time (derived from the pid and `index`; a block already routed
    /// on this machine is skipped). The client config goes to a temporary file.
    pub fn for_test(index: u32) -> LabSpec {
        let seed = std::process::id().wrapping_mul(16).wrapping_add(index);
        // The pid and the index each get their own digits: two test processes running
        // at once never share a name.
        let name = format!(
            "t{}{}",
            base36(std::process::id() % 36u32.pow(3), 3),
            base36(index % 36, 1)
        );
        // 100–199: clear of the default lab's 213.
        let start = seed % 100;
        let subnet_base = (0..100)
            .map(|step| 100 + ((start + step) % 100) as u8)
            .find(|&base| !super::network::subnet_in_use(base))
            .unwrap_or(100 + start as u8);
        let temp = std::env::temp_dir();
        LabSpec {
            hosts: 2,
            subnet_base,
            state_dir: temp.join(format!("ferry-lab-{name}")),
            run_dir: defaults::run_dir().join(format!("lab-{name}")),
            client_config: temp.join(format!("ferry-lab-{name}-client.toml")),
            ..LabSpec::named(&name)
        }
    }

    /// Checks what the kernel and the address plan would refuse later, naming the problem.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= NAME_MAX
            && self.name.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if !name_ok {
            return Err(format!(
                "name {:?}: use 1 to {NAME_MAX} lowercase letters and digits, starting with a letter",
                self.name
            ));
        }
        if self.hosts == 0 || self.hosts > MAX_HOSTS {
            return Err(format!("{} hosts: a lab has 1 to {MAX_HOSTS}", self.hosts));
        }
        for path in [&self.state_dir, &self.run_dir, &self.client_config] {
            if !path.is_absolute() {
                return Err(format!("{} must be an absolute path", path.display()));
            }
        }
        let longest = self
            .switches()
            .into_iter()
            .chain(LabNet::ALL.map(|net| self.veth_name(self.hosts, net)))
            .max_by_key(String::len)
            .unwrap_or_default();
        if longest.len() > IFNAME_MAX {
            return Err(format!(
                "interface name {longest} is longer than {IFNAME_MAX} bytes; use a shorter lab name"
            ));
        }
        Ok(())
    }

    /// Host numbers, from 1.
    pub fn host_numbers(&self) -> impl Iterator<Item = u32> {
        1..=self.hosts
    }

    /// `host2` (or `2`) → 2.
    pub fn parse_host(&self, text: &str) -> Result<u32, String> {
        let number = text.strip_prefix("host").unwrap_or(text);
        match number.parse::<u32>() {
            Ok(host) if (1..=self.hosts).contains(&host) => Ok(host),
            _ => Err(format!(
                "no host {text:?} in lab {} (it has host1 to host{})",
                self.name, self.hosts
            )),
        }
    }

    /// The host's name in the cluster.
    pub fn host_name(&self, host: u32) -> String {
        format!("host{host}")
    }

    /// The host's network namespace.
    pub fn namespace(&self, host: u32) -> String {
        format!("{}-host{host}", self.name)
    }

    /// The root-namespace bridge of a network.
    pub fn switch_name(&self, net: LabNet) -> String {
        format!("{}-{}", self.name, net.switch_suffix())
    }

    pub fn switches(&self) -> Vec<String> {
        LabNet::ALL.map(|net| self.switch_name(net)).to_vec()
    }

    /// The root-namespace end of a host's link to a switch.
    pub fn veth_name(&self, host: u32, net: LabNet) -> String {
        format!("{}h{host}{}", self.name, net.veth_letter())
    }

    /// The lab's whole address block, blackholed in the root namespace.
    pub fn subnet(&self) -> String {
        format!("10.{}.0.0/16", self.subnet_base)
    }

    /// The switch's own address: the admin workstation on that network.
    pub fn switch_address(&self, net: LabNet) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet_base, net.third_octet(), 1)
    }

    pub fn host_address(&self, host: u32, net: LabNet) -> Ipv4Addr {
        // validate() keeps hosts ≤ MAX_HOSTS, so 10 + host fits an octet.
        let last = u8::try_from(10 + host).unwrap_or(u8::MAX);
        Ipv4Addr::new(10, self.subnet_base, net.third_octet(), last)
    }

    /// `10.B.n.1/24`
    pub fn switch_cidr(&self, net: LabNet) -> String {
        format!("{}/24", self.switch_address(net))
    }

    /// `10.B.n.(10+i)/24`
    pub fn host_cidr(&self, host: u32, net: LabNet) -> String {
        format!("{}/24", self.host_address(host, net))
    }

    pub fn etcd_url(&self) -> String {
        format!(
            "https://{}:{}",
            self.switch_address(LabNet::Management),
            self.etcd_client_port
        )
    }

    pub fn api_url(&self, host: u32) -> String {
        format!(
            "https://{}:{API_PORT}",
            self.host_address(host, LabNet::Management)
        )
    }

    /// The lab's record of everything it made.
    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("lab.json")
    }

    pub fn etcd_dir(&self) -> PathBuf {
        self.state_dir.join("etcd")
    }

    pub fn agent_config_path(&self, host: u32) -> PathBuf {
        self.state_dir.join(format!("host{host}.toml"))
    }

    pub fn agent_log(&self, host: u32) -> PathBuf {
        self.state_dir.join(format!("host{host}.log"))
    }

    /// The pool every host sees (the lab's stand-in for shared storage).
    pub fn shared_pool(&self) -> PathBuf {
        self.state_dir.join("pools").join("shared")
    }

    pub fn local_pool_name(&self, host: u32) -> String {
        format!("host{host}-local")
    }

    pub fn local_pool(&self, host: u32) -> PathBuf {
        self.state_dir
            .join("pools")
            .join(self.local_pool_name(host))
    }

    /// Where the appliance is copied so every host can boot it.
    pub fn appliance_image_dir(&self) -> PathBuf {
        self.shared_pool().join("images").join("appliance")
    }

    pub fn host_run_dir(&self, host: u32) -> PathBuf {
        self.run_dir.join(format!("host{host}"))
    }

    /// The business network as the cluster records it: VMs take addresses from it.
    pub fn business_network(&self) -> NetworkRecord {
        let address = |last| Ipv4Addr::new(10, self.subnet_base, 2, last);
        NetworkRecord {
            version: 1,
            name: LabNet::Business.name().into(),
            prefix: 24,
            gateway: Some(self.switch_address(LabNet::Business)),
            first: address(VM_FIRST),
            last: address(VM_LAST),
        }
    }
}

fn base36(mut value: u32, width: usize) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut text = vec![b'0'; width];
    for slot in text.iter_mut().rev() {
        *slot = DIGITS[(value % 36) as usize];
        value /= 36;
    }
    String::from_utf8_lossy(&text).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_lab_is_named_as_the_design_says() {
        let spec = LabSpec::default();
        spec.validate().unwrap();
        assert_eq!(spec.namespace(1), "fl-host1");
        assert_eq!(spec.switch_name(LabNet::Management), "fl-mgmt");
        assert_eq!(spec.switch_name(LabNet::Migration), "fl-migr");
        assert_eq!(spec.switch_name(LabNet::Business), "fl-biz");
        assert_eq!(spec.veth_name(2, LabNet::Migration), "flh2g");
        assert_eq!(spec.host_cidr(1, LabNet::Management), "10.213.0.11/24");
        assert_eq!(spec.host_cidr(3, LabNet::Business), "10.213.2.13/24");
        assert_eq!(spec.switch_cidr(LabNet::Migration), "10.213.1.1/24");
        assert_eq!(spec.subnet(), "10.213.0.0/16");
        assert_eq!(spec.etcd_url(), "https://10.213.0.1:2379");
        assert_eq!(spec.api_url(1), "https://10.213.0.11:8700");
    }

    #[test]
    fn the_longest_allowed_name_and_host_count_fit_interface_names() {
        let spec = LabSpec {
            name: "abcdefghij".into(),
            hosts: MAX_HOSTS,
            ..LabSpec::default()
        };
        spec.validate().unwrap();
        assert!(spec.veth_name(MAX_HOSTS, LabNet::Business).len() <= IFNAME_MAX);
    }

    #[test]
    fn bad_specs_are_refused_with_the_reason() {
        let long = LabSpec {
            name: "abcdefghijk".into(),
            ..LabSpec::default()
        };
        assert!(long.validate().unwrap_err().contains("1 to 10"));
        let upper = LabSpec {
            name: "Fl".into(),
            ..LabSpec::default()
        };
        assert!(upper.validate().is_err());
        let many = LabSpec {
            hosts: MAX_HOSTS + 1,
            ..LabSpec::default()
        };
        assert!(many.validate().unwrap_err().contains("hosts"));
        let none = LabSpec {
            hosts: 0,
            ..LabSpec::default()
        };
        assert!(none.validate().is_err());
    }

    #[test]
    fn hosts_never_take_vm_addresses() {
        let spec = LabSpec {
            hosts: MAX_HOSTS,
            ..LabSpec::default()
        };
        let business = spec.business_network();
        let last_host = spec.host_address(MAX_HOSTS, LabNet::Business);
        assert!(last_host < business.first);
        assert_eq!(business.gateway, Some(Ipv4Addr::new(10, 213, 2, 1)));
        assert_eq!(business.last, Ipv4Addr::new(10, 213, 2, 250));
    }

    #[test]
    fn hosts_are_named_by_number_or_name() {
        let spec = LabSpec::default();
        assert_eq!(spec.parse_host("host2"), Ok(2));
        assert_eq!(spec.parse_host("3"), Ok(3));
        assert!(spec.parse_host("host4").is_err());
        assert!(spec.parse_host("host0").is_err());
        assert!(spec.parse_host("web").is_err());
    }

    #[test]
    fn test_labs_differ_from_each_other_and_from_the_default() {
        let first = LabSpec::for_test(0);
        let second = LabSpec::for_test(1);
        first.validate().unwrap();
        second.validate().unwrap();
        assert_ne!(first.name, second.name);
        assert!(first.name.len() <= 5);
        assert_ne!(first.state_dir, second.state_dir);
        assert_ne!(first.subnet_base, DEFAULT_SUBNET_BASE);
        assert_ne!(first.client_config, LabSpec::default().client_config);
    }
}
