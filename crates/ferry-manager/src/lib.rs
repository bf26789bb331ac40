//! The manager's decisions, as a pure function of a snapshot of the cluster:
//! `plan(view) -> actions`. No I/O here, so every rule is tested by simulation (at
//! thousands of hosts, without QEMU or etcd); the agent that leads applies the actions.
//!
//! Placement rule: VMs without a placement, highest priority first, then in name
//! order, go to the preferred host if it is alive, active and has room, else to the
//! alive, active host with the most free memory (ties by name). Memory is never overcommitted; a VM's vCPUs must not
//! exceed the host's CPUs. A VM that fits nowhere gets a `CannotPlace` with the reason.

pub mod ha;
pub mod migration;

use ferry_model::cluster::HostState;
use ferry_model::{Bytes, HostName, VmName};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSnapshot {
    pub name: HostName,
    pub cpus: u32,
    pub memory: Bytes,
    pub state: HostState,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSnapshot {
    pub name: VmName,
    pub cpus: u32,
    pub memory: Bytes,
    pub preferred_host: Option<HostName>,
    /// The host it is placed on, if any.
    pub placed_on: Option<HostName>,
    pub deleting: bool,
    /// Higher is placed first when there is not room for all.
    pub priority: i32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Hosts whose agents hold their lease.
    pub hosts: Vec<HostSnapshot>,
    pub vms: Vec<VmSnapshot>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Place { vm: VmName, host: HostName },
    CannotPlace { vm: VmName, reason: String },
}

/// Memory already promised on a host.
fn used_memory(view: &ClusterView, host: &HostName) -> u64 {
    view.vms
        .iter()
        .filter(|vm| vm.placed_on.as_ref() == Some(host))
        .map(|vm| vm.memory.0)
        .sum()
}

pub fn plan(view: &ClusterView) -> Vec<Action> {
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
            host.state == HostState::Active && *free >= vm.memory.0 && host.cpus >= vm.cpus
        };
        let preferred = vm.preferred_host.as_ref().and_then(|wanted| {
            free.iter()
                .position(|candidate| &candidate.0.name == wanted && fits(candidate))
        });
        let best = preferred.or_else(|| {
            free.iter()
                .enumerate()
                .filter(|(_, candidate)| fits(candidate))
                .max_by(|(_, a), (_, b)| a.1.cmp(&b.1).then_with(|| b.0.name.cmp(&a.0.name)))
                .map(|(index, _)| index)
        });
        match best {
            Some(index) => {
                free[index].1 -= vm.memory.0;
                actions.push(Action::Place {
                    vm: vm.name.clone(),
                    host: free[index].0.name.clone(),
                });
            }
            None => actions.push(Action::CannotPlace {
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
        .filter(|(host, _)| host.state == HostState::Active)
        .collect();
    match active.iter().max_by_key(|(_, free)| *free) {
        None => "no active host".to_string(),
        Some((host, most)) => format!(
            "no host has {} and {} vCPUs free (most free memory: {} on {})",
            vm.memory,
            vm.cpus,
            Bytes(*most),
            host.name
        ),
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
        }
    }

    fn vm(name: &str, memory_mib: u64) -> VmSnapshot {
        VmSnapshot {
            name: name.parse().unwrap(),
            cpus: 1,
            memory: Bytes::mib(memory_mib),
            preferred_host: None,
            placed_on: None,
            deleting: false,
            priority: 0,
        }
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
        let actions = plan(&view);
        assert!(matches!(&actions[0], Action::Place { vm, .. } if vm.as_str() == "z-high"));
        assert!(matches!(&actions[1], Action::CannotPlace { vm, .. } if vm.as_str() == "a-low"));
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
            plan(&view),
            vec![Action::Place {
                vm: "new".parse().unwrap(),
                host: "h2".parse().unwrap()
            }]
        );
    }

    #[test]
    fn the_preferred_host_wins_when_it_has_room() {
        let mut wanted = vm("web", 256);
        wanted.preferred_host = Some("h1".parse().unwrap());
        let view = ClusterView {
            hosts: vec![host("h1", 1024), host("h2", 8192)],
            vms: vec![wanted],
        };
        assert_eq!(
            plan(&view),
            vec![Action::Place {
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
        let actions = plan(&view);
        let [Action::CannotPlace { reason, .. }] = actions.as_slice() else {
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
        assert!(matches!(
            plan(&view).as_slice(),
            [Action::CannotPlace { .. }]
        ));
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
            let actions = plan(&view);
            prop_assert_eq!(actions.len(), vms.len());
            let mut used = vec![0u64; hosts.len()];
            for action in &actions {
                if let Action::Place { vm, host } = action {
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
                if let Action::CannotPlace { vm, .. } = action {
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
            prop_assert_eq!(plan(&view), plan(&view));
        }
    }
}
