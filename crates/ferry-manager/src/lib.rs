//! The manager's decisions, as pure functions of a snapshot of the cluster:
//! `planner::plan(snapshot, timing, now) -> actions`. No I/O here, so every rule is
//! tested by simulation (at thousands of hosts, without QEMU or etcd); the agent that
//! leads applies the actions (`ferry_agent::executor`).
//!
//! Placement rule (`place`): VMs without a placement, highest priority first, then in name
//! order, go to an alive, active host with room that they do not avoid (hosts they just
//! failed on). Among those: first a host with no VM of the same anti-affinity group
//! (a soft rule: sharing beats not running), then the earliest of the VM's preferred
//! hosts, then the most free memory, then the name. Memory is never overcommitted; a
//! VM's vCPUs must not exceed the host's CPUs; a host must offer every pool the VM's
//! disks live on and every network its NICs join. A VM that fits nowhere gets a
//! `CannotPlace` with the reason.

pub mod fence;
pub mod ha;
pub mod migration;
pub mod monitor;
pub mod planner;

use std::collections::BTreeSet;

use ferry_model::cluster::HostState;
use ferry_model::{Bytes, HostName, VmName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSnapshot {
    pub name: HostName,
    pub cpus: u32,
    pub memory: Bytes,
    pub state: HostState,
    /// The pools and networks the host offers.
    pub pools: BTreeSet<String>,
    pub networks: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSnapshot {
    pub name: VmName,
    pub cpus: u32,
    pub memory: Bytes,
    /// Hosts it should run on, most wanted first.
    pub preferred_hosts: Vec<HostName>,
    /// VMs sharing a group are spread over different hosts while there is room.
    pub anti_affinity: Option<String>,
    /// Hosts it must not be placed on (it failed there repeatedly).
    pub avoid_hosts: Vec<HostName>,
    /// The host it is placed on, if any.
    pub placed_on: Option<HostName>,
    pub deleting: bool,
    /// Higher is placed first when there is not room for all.
    pub priority: i32,
    /// Pools its disks live on and networks its NICs join: a host must have them all.
    pub needs_pools: BTreeSet<String>,
    pub needs_networks: BTreeSet<String>,
}

impl HostSnapshot {
    /// What the host lacks of what the VM needs, named for a refusal; empty: nothing.
    pub fn lacks(&self, vm: &VmSnapshot) -> Vec<String> {
        vm.needs_pools
            .difference(&self.pools)
            .map(|pool| format!("pool {pool}"))
            .chain(
                vm.needs_networks
                    .difference(&self.networks)
                    .map(|network| format!("network {network}")),
            )
            .collect()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Hosts whose agents hold their lease.
    pub hosts: Vec<HostSnapshot>,
    pub vms: Vec<VmSnapshot>,
}

/// Where placement puts one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    On { vm: VmName, host: HostName },
    Nowhere { vm: VmName, reason: String },
}

/// Memory already promised on a host.
fn used_memory(view: &ClusterView, host: &HostName) -> u64 {
    view.vms
        .iter()
        .filter(|vm| vm.placed_on.as_ref() == Some(host))
        .map(|vm| vm.memory.0)
        .sum()
}

pub fn place(view: &ClusterView) -> Vec<Placed> {
    let mut free: Vec<(HostSnapshot, u64)> = view
        .hosts
        .iter()
        .map(|host| {
            (
                host.clone(),
                host.memory.0.saturating_sub(used_memory(view, &host.name)),
            )
        })
        .collect();
    // Anti-affinity groups present on each host, growing as VMs are placed.
    let mut groups: BTreeSet<(HostName, String)> = view
        .vms
        .iter()
        .filter_map(|vm| Some((vm.placed_on.clone()?, vm.anti_affinity.clone()?)))
        .collect();
    let mut pending: Vec<&VmSnapshot> = view
        .vms
        .iter()
        .filter(|vm| vm.placed_on.is_none() && !vm.deleting)
        .collect();
    pending.sort_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    });

    let mut actions = Vec::new();
    for vm in pending {
        let fits = |(host, free): &(HostSnapshot, u64)| {
            host.state == HostState::Active
                && *free >= vm.memory.0
                && host.cpus >= vm.cpus
                && !vm.avoid_hosts.contains(&host.name)
                && host.lacks(vm).is_empty()
        };
        let shares_group = |host: &HostName| {
            vm.anti_affinity
                .as_ref()
                .is_some_and(|group| groups.contains(&(host.clone(), group.clone())))
        };
        let preference = |host: &HostName| {
            vm.preferred_hosts
                .iter()
                .position(|wanted| wanted == host)
                .unwrap_or(usize::MAX)
        };
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, candidate)| fits(candidate))
            .min_by(|(_, (a, a_free)), (_, (b, b_free))| {
                shares_group(&a.name)
                    .cmp(&shares_group(&b.name))
                    .then_with(|| preference(&a.name).cmp(&preference(&b.name)))
                    .then_with(|| b_free.cmp(a_free))
                    .then_with(|| a.name.cmp(&b.name))
            })
            .map(|(index, _)| index);
        match best {
            Some(index) => {
                free[index].1 -= vm.memory.0;
                let host = free[index].0.name.clone();
                if let Some(group) = &vm.anti_affinity {
                    groups.insert((host.clone(), group.clone()));
                }
                actions.push(Placed::On {
                    vm: vm.name.clone(),
                    host,
                });
            }
            None => actions.push(Placed::Nowhere {
                vm: vm.name.clone(),
                reason: no_room_reason(vm, &free),
            }),
        }
    }
    actions
}

fn no_room_reason(vm: &VmSnapshot, free: &[(HostSnapshot, u64)]) -> String {
    let active: Vec<&(HostSnapshot, u64)> = free
        .iter()
        .filter(|(host, _)| host.state == HostState::Active && !vm.avoid_hosts.contains(&host.name))
        .collect();
    let equipped: Vec<&(HostSnapshot, u64)> = active
        .iter()
        .copied()
        .filter(|(host, _)| host.lacks(vm).is_empty())
        .collect();
    let reason = match equipped.iter().max_by_key(|(_, free)| *free) {
        None if !active.is_empty() => {
            let mut needs: Vec<String> = vm
                .needs_pools
                .iter()
                .map(|pool| format!("pool {pool}"))
                .collect();
            needs.extend(
                vm.needs_networks
                    .iter()
                    .map(|network| format!("network {network}")),
            );
            format!("no active host has {}", needs.join(" and "))
        }
        None => "no active host".to_string(),
        Some((host, most)) => format!(
            "no host has {} and {} vCPUs free (most free memory: {} on {})",
            vm.memory,
            vm.cpus,
            Bytes(*most),
            host.name
        ),
    };
    if vm.avoid_hosts.is_empty() {
        reason
    } else {
        let avoided: Vec<&str> = vm.avoid_hosts.iter().map(HostName::as_str).collect();
        format!(
            "{reason}; avoiding {}, where it kept failing",
            avoided.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn host(name: &str, memory_mib: u64) -> HostSnapshot {
        HostSnapshot {
            name: name.parse().unwrap(),
            cpus: 4,
            memory: Bytes::mib(memory_mib),
            state: HostState::Active,
            pools: ["shared".to_string()].into(),
            networks: ["business".to_string()].into(),
        }
    }

    fn vm(name: &str, memory_mib: u64) -> VmSnapshot {
        VmSnapshot {
            name: name.parse().unwrap(),
            cpus: 1,
            memory: Bytes::mib(memory_mib),
            preferred_hosts: Vec::new(),
            anti_affinity: None,
            avoid_hosts: Vec::new(),
            placed_on: None,
            deleting: false,
            priority: 0,
            needs_pools: ["shared".to_string()].into(),
            needs_networks: BTreeSet::new(),
        }
    }

    #[test]
    fn a_vm_goes_only_to_a_host_with_its_pools_and_networks() {
        let mut with_local = host("host1", 1024);
        with_local.pools.insert("host1-local".into());
        let mut with_storage_net = host("host2", 4096);
        with_storage_net.networks.insert("storage".into());
        let view = |vm: VmSnapshot| ClusterView {
            hosts: vec![with_local.clone(), with_storage_net.clone()],
            vms: vec![vm],
        };
        let mut local = vm("db", 256);
        local.needs_pools.insert("host1-local".into());
        assert_eq!(placed(&place(&view(local)), "db").as_deref(), Some("host1"));
        let mut storage = vm("nas", 256);
        storage.needs_networks.insert("storage".into());
        assert_eq!(
            placed(&place(&view(storage)), "nas").as_deref(),
            Some("host2")
        );
        let mut both = vm("odd", 256);
        both.needs_pools.insert("host1-local".into());
        both.needs_networks.insert("storage".into());
        assert_eq!(
            place(&view(both)),
            vec![Placed::Nowhere {
                vm: "odd".parse().unwrap(),
                reason: "no active host has pool host1-local and pool shared and network storage"
                    .into()
            }]
        );
    }

    fn names(names: &[&str]) -> Vec<HostName> {
        names.iter().map(|name| name.parse().unwrap()).collect()
    }

    fn placed(actions: &[Placed], wanted: &str) -> Option<String> {
        actions.iter().find_map(|action| match action {
            Placed::On { vm, host } if vm.as_str() == wanted => Some(host.to_string()),
            _ => None,
        })
    }

    #[test]
    fn preferred_hosts_are_tried_in_order_and_skipped_when_full() {
        let mut wanted = vm("db", 512);
        wanted.preferred_hosts = names(&["h1", "h2"]);
        let view = ClusterView {
            hosts: vec![host("h1", 256), host("h2", 1024), host("h3", 8192)],
            vms: vec![wanted],
        };
        assert_eq!(placed(&place(&view), "db").as_deref(), Some("h2"));
    }

    #[test]
    fn an_anti_affinity_group_is_spread_and_shares_a_host_only_when_it_must() {
        let mut members: Vec<VmSnapshot> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let mut member = vm(name, 256);
                member.anti_affinity = Some("web".into());
                member
            })
            .collect();
        members[0].placed_on = Some("h1".parse().unwrap());
        let view = ClusterView {
            hosts: vec![host("h1", 8192), host("h2", 1024)],
            vms: members,
        };
        let actions = place(&view);
        // b avoids h1 (a is there) despite h1's larger free memory; c then has to share.
        assert_eq!(placed(&actions, "b").as_deref(), Some("h2"));
        assert!(placed(&actions, "c").is_some());
    }

    #[test]
    fn a_vm_is_never_placed_on_a_host_it_avoids() {
        let mut failing = vm("flaky", 256);
        failing.avoid_hosts = names(&["h1"]);
        let view = ClusterView {
            hosts: vec![host("h1", 8192)],
            vms: vec![failing],
        };
        let actions = place(&view);
        let [Placed::Nowhere { reason, .. }] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(reason, "no active host; avoiding h1, where it kept failing");
    }

    #[test]
    fn when_room_is_short_higher_priority_is_placed_first() {
        let mut low = vm("a-low", 768);
        low.priority = 0;
        let mut high = vm("z-high", 768);
        high.priority = 10;
        let view = ClusterView {
            hosts: vec![host("host1", 1024)],
            vms: vec![low, high],
        };
        let actions = place(&view);
        assert!(matches!(&actions[0], Placed::On { vm, .. } if vm.as_str() == "z-high"));
        assert!(matches!(&actions[1], Placed::Nowhere { vm, .. } if vm.as_str() == "a-low"));
    }

    #[test]
    fn a_new_vm_goes_to_the_host_with_the_most_free_memory() {
        let mut busy = vm("old", 3000);
        busy.placed_on = Some("h1".parse().unwrap());
        let view = ClusterView {
            hosts: vec![host("h1", 4096), host("h2", 4096)],
            vms: vec![busy, vm("new", 256)],
        };
        assert_eq!(
            place(&view),
            vec![Placed::On {
                vm: "new".parse().unwrap(),
                host: "h2".parse().unwrap()
            }]
        );
    }

    #[test]
    fn the_preferred_host_wins_when_it_has_room() {
        let mut wanted = vm("web", 256);
        wanted.preferred_hosts = names(&["h1"]);
        let view = ClusterView {
            hosts: vec![host("h1", 1024), host("h2", 8192)],
            vms: vec![wanted],
        };
        assert_eq!(
            place(&view),
            vec![Placed::On {
                vm: "web".parse().unwrap(),
                host: "h1".parse().unwrap()
            }]
        );
    }

    #[test]
    fn a_vm_that_fits_nowhere_is_refused_with_the_reason() {
        let view = ClusterView {
            hosts: vec![host("h1", 1024)],
            vms: vec![vm("huge", 2048)],
        };
        let actions = place(&view);
        let [Placed::Nowhere { reason, .. }] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(
            reason,
            "no host has 2 GiB and 1 vCPUs free (most free memory: 1 GiB on h1)"
        );
    }

    #[test]
    fn hosts_in_maintenance_and_vms_being_deleted_are_left_alone() {
        let mut maintenance = host("h1", 8192);
        maintenance.state = HostState::Maintenance;
        let mut leaving = vm("gone", 256);
        leaving.deleting = true;
        let view = ClusterView {
            hosts: vec![maintenance],
            vms: vec![vm("a", 256), leaving],
        };
        assert!(matches!(place(&view).as_slice(), [Placed::Nowhere { .. }]));
    }

    proptest! {
        #[test]
        fn placement_never_overcommits_memory_and_places_whatever_fits(
            hosts in prop::collection::vec(256u64..8192, 1..20),
            vms in prop::collection::vec(64u64..4096, 0..60),
        ) {
            let view = ClusterView {
                hosts: hosts.iter().enumerate().map(|(i, memory)| host(&format!("h{i}"), *memory)).collect(),
                vms: vms.iter().enumerate().map(|(i, memory)| vm(&format!("v{i}"), *memory)).collect(),
            };
            let actions = place(&view);
            prop_assert_eq!(actions.len(), vms.len());
            let mut used = vec![0u64; hosts.len()];
            for action in &actions {
                if let Placed::On { vm, host } = action {
                    let index: usize = host.as_str()[1..].parse().unwrap();
                    let memory = view.vms.iter().find(|candidate| &candidate.name == vm).unwrap().memory.0;
                    used[index] += memory;
                }
            }
            for (index, memory) in hosts.iter().enumerate() {
                prop_assert!(used[index] <= Bytes::mib(*memory).0, "host h{} overcommitted", index);
            }
            // A refused VM fit nowhere at its turn; free memory only shrinks, so it
            // fits nowhere at the end either.
            for action in &actions {
                if let Placed::Nowhere { vm, .. } = action {
                    let memory = view.vms.iter().find(|candidate| &candidate.name == vm).unwrap().memory.0;
                    for (index, host_memory) in hosts.iter().enumerate() {
                        prop_assert!(Bytes::mib(*host_memory).0 - used[index] < memory, "{} was refused but fits on h{}", vm, index);
                    }
                }
            }
        }

        #[test]
        fn planning_is_deterministic(vms in prop::collection::vec(64u64..2048, 0..30)) {
            let view = ClusterView {
                hosts: (0..5).map(|i| host(&format!("h{i}"), 4096)).collect(),
                vms: vms.iter().enumerate().map(|(i, memory)| vm(&format!("v{i}"), *memory)).collect(),
            };
            prop_assert_eq!(place(&view), place(&view));
        }
    }
}
