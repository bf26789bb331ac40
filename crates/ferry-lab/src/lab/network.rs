//! The lab's wiring in the kernel: three switches (bridges) in the root namespace, one
//! namespace per host with a veth to each switch, and a blackhole route for the lab's
//! /16 so that no packet for a lab address leaves the machine (the bridges' connected
//! /24s are more specific and still work). Adding that route is also how a lab claims
//! its address block: a second lab on the same block fails there, before anything else.

use crate::netns::ip;

use super::spec::{LabNet, HOST_BUSINESS_BRIDGE};
use super::{Lab, LabError};

impl Lab {
    /// Creates the switches, then each host's namespace and links, recording each object
    /// in lab.json as soon as it exists.
    pub(super) fn wire(&mut self) -> Result<(), LabError> {
        let spec = self.state.spec.clone();
        let subnet = spec.subnet();
        let block = format!("address block {subnet}");
        if let Some(user) = subnet_user(spec.subnet_base) {
            return Err(self.fail(
                &block,
                format!("already used on this machine ({user}); choose another subnet base"),
            ));
        }
        ip(&["route", "add", "blackhole", &subnet]).map_err(|error| self.fail(&block, error))?;
        self.state.route = Some(subnet);
        self.save()?;

        for net in LabNet::ALL {
            let bridge = spec.switch_name(net);
            let object = format!("bridge {bridge}");
            ip(&["link", "add", &bridge, "type", "bridge"])
                .map_err(|error| self.fail(&object, error))?;
            self.state.bridges.push(bridge.clone());
            self.save()?;
            ip(&["addr", "add", &spec.switch_cidr(net), "dev", &bridge])
                .and_then(|_| ip(&["link", "set", &bridge, "up"]))
                .map_err(|error| self.fail(&object, error))?;
        }

        for host in spec.host_numbers() {
            let namespace = spec.namespace(host);
            let object = format!("namespace {namespace}");
            ip(&["netns", "add", &namespace]).map_err(|error| self.fail(&object, error))?;
            self.state.namespaces.push(namespace.clone());
            self.save()?;
            let inside = |args: &[&str]| {
                let mut full = vec!["-n", namespace.as_str()];
                full.extend_from_slice(args);
                ip(&full)
            };
            inside(&["link", "set", "lo", "up"]).map_err(|error| self.fail(&object, error))?;

            for net in LabNet::ALL {
                let veth = spec.veth_name(host, net);
                let object = format!("link {veth} ({namespace} {})", net.interface());
                ip(&[
                    "link",
                    "add",
                    &veth,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    net.interface(),
                    "netns",
                    &namespace,
                ])
                .map_err(|error| self.fail(&object, error))?;
                self.state.veths.push(veth.clone());
                self.save()?;
                ip(&["link", "set", &veth, "master", &spec.switch_name(net)])
                    .and_then(|_| ip(&["link", "set", &veth, "up"]))
                    .and_then(|_| inside(&["link", "set", net.interface(), "up"]))
                    .map_err(|error| self.fail(&object, error))?;
            }

            // Management and migration addresses sit on the links themselves; business
            // goes through a bridge, because VM taps join it next to the uplink.
            let addressed = (|| {
                for net in [LabNet::Management, LabNet::Migration] {
                    inside(&[
                        "addr",
                        "add",
                        &spec.host_cidr(host, net),
                        "dev",
                        net.interface(),
                    ])?;
                }
                inside(&["link", "add", HOST_BUSINESS_BRIDGE, "type", "bridge"])?;
                inside(&[
                    "link",
                    "set",
                    LabNet::Business.interface(),
                    "master",
                    HOST_BUSINESS_BRIDGE,
                ])?;
                inside(&[
                    "addr",
                    "add",
                    &spec.host_cidr(host, LabNet::Business),
                    "dev",
                    HOST_BUSINESS_BRIDGE,
                ])?;
                inside(&["link", "set", HOST_BUSINESS_BRIDGE, "up"])
            })();
            addressed.map_err(|error| self.fail(&object, error))?;
        }
        Ok(())
    }

    /// Brings one of a host's links down or up, as a pulled or replugged cable.
    pub(super) fn set_link(&self, host: u32, net: LabNet, up: bool) -> Result<(), LabError> {
        let namespace = self.state.spec.namespace(host);
        let state = if up { "up" } else { "down" };
        ip(&["-n", &namespace, "link", "set", net.interface(), state])
            .map(|_| ())
            .map_err(|error| self.fail(format!("link {namespace} {}", net.interface()), error))
    }
}

/// Whether anything on this machine already uses `10.base.0.0/16`.
pub(super) fn subnet_in_use(base: u8) -> bool {
    subnet_user(base).is_some()
}

/// What uses `10.base.0.0/16` already (an address or a route), if anything.
fn subnet_user(base: u8) -> Option<String> {
    let block = format!("10.{base}.0.0/16");
    let queries: [&[&str]; 2] = [
        &["-4", "-o", "addr", "show", "to", &block],
        &["-4", "route", "show", "table", "all", "root", &block],
    ];
    queries.iter().find_map(|args| {
        let output = ip(args).ok()?;
        output
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
    })
}

pub(super) fn link_exists(name: &str) -> bool {
    ip(&["-o", "link", "show", "dev", name]).is_ok()
}

pub(super) fn namespace_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

/// Removes a link (a veth takes its peer with it); one already gone is fine.
pub(super) fn remove_link(name: &str) -> Result<(), String> {
    if !link_exists(name) {
        return Ok(());
    }
    match ip(&["link", "del", "dev", name]) {
        Err(error) if link_exists(name) => Err(error.to_string()),
        _ => Ok(()),
    }
}

pub(super) fn remove_namespace(name: &str) -> Result<(), String> {
    if !namespace_exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name])
        .map(|_| ())
        .map_err(|error| error.to_string())
}

pub(super) fn remove_blackhole(subnet: &str) -> Result<(), String> {
    let present = |subnet: &str| {
        ip(&["route", "show", "type", "blackhole", "exact", subnet])
            .map(|output| !output.trim().is_empty())
            .unwrap_or(true)
    };
    if !present(subnet) {
        return Ok(());
    }
    match ip(&["route", "del", "blackhole", subnet]) {
        Err(error) if present(subnet) => Err(error.to_string()),
        _ => Ok(()),
    }
}

/// Which of a host's lab links are administratively down.
pub(super) fn links_down(namespace: &str) -> Vec<LabNet> {
    LabNet::ALL
        .into_iter()
        .filter(|net| {
            let Ok(output) = ip(&[
                "-n",
                namespace,
                "-o",
                "link",
                "show",
                "dev",
                net.interface(),
            ]) else {
                return true;
            };
            // `3: mgmt0@if12: <BROADCAST,MULTICAST,UP,LOWER_UP> …`: UP is the admin state.
            let flags = output
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(flags, _)| flags)
                .unwrap_or("");
            !flags.split(',').any(|flag| flag == "UP")
        })
        .collect()
}
