//! Migration decisions: may this VM go to that host, which host is best, and which
//! queued migrations may start now. Each refusal is one line naming the reason.

use std::collections::BTreeMap;

use ferry_model::cluster::{HostRecord, HostState, VmRecord};
use ferry_model::ops::MigrationMode;
use ferry_model::{Bytes, HostName};

/// How many missing CPU features a refusal lists before it summarizes.
const FEATURES_SHOWN: usize = 8;

/// What a destination must offer a VM that now runs on `source`.
pub struct Candidate<'a> {
    pub vm: &'a VmRecord,
    pub source: &'a HostRecord,
    pub mode: MigrationMode,
}

/// Why `dest` cannot take the VM, or `Ok`. `used` is the memory already promised on
/// `dest` (VMs placed there and migrations heading there).
pub fn check_destination(
    candidate: &Candidate<'_>,
    dest: &HostRecord,
    used: Bytes,
) -> Result<(), String> {
    let vm = &candidate.vm.spec;
    let name = &dest.name;
    if dest.name == candidate.source.name {
        return Err(format!("VM {} already runs on {name}", vm.name));
    }
    if dest.state == HostState::Maintenance {
        return Err(format!("host {name} is in maintenance"));
    }
    let free = Bytes(dest.memory.0.saturating_sub(used.0));
    if free < vm.memory {
        return Err(format!(
            "host {name} has {free} of memory free, VM {} needs {}",
            vm.name, vm.memory
        ));
    }
    if dest.cpus < vm.cpus {
        return Err(format!(
            "host {name} has {} CPUs, VM {} has {} vCPUs",
            dest.cpus, vm.name, vm.cpus
        ));
    }
    for nic in &vm.nics {
        if !dest.networks.contains(&nic.network) {
            return Err(format!(
                "host {name} is not on the {} network VM {} is attached to",
                nic.network, vm.name
            ));
        }
    }
    for disk in &vm.disks {
        let Some(pool) = candidate.source.pool_of(&disk.path) else {
            return Err(format!(
                "disk {} of VM {} ({}) is in no pool of {}",
                disk.id,
                vm.name,
                disk.path.display(),
                candidate.source.name
            ));
        };
        if pool.shared {
            if dest.pool(&pool.name).is_none_or(|there| !there.shared) {
                return Err(format!(
                    "host {name} does not mount pool {} (disk {} of VM {})",
                    pool.name, disk.id, vm.name
                ));
            }
        } else {
            if candidate.mode == MigrationMode::Quick {
                return Err(format!(
                    "disk {} of VM {} is on {}'s local pool {}: quick migration needs shared disks; use live migration",
                    disk.id, vm.name, candidate.source.name, pool.name
                ));
            }
            if local_pool(dest).is_none() {
                return Err(format!(
                    "host {name} has no local pool to copy disk {} of VM {} to",
                    disk.id, vm.name
                ));
            }
        }
    }
    if candidate.mode == MigrationMode::Live && !dest.addresses.contains_key("migration") {
        return Err(format!(
            "host {name} has no address on the migration network; use --mode quick"
        ));
    }
    check_cpu(candidate, dest)
}

fn check_cpu(candidate: &Candidate<'_>, dest: &HostRecord) -> Result<(), String> {
    let model = &candidate.vm.spec.cpu_model;
    let missing: Vec<String> = if model == "host" {
        candidate
            .source
            .cpu_features
            .iter()
            .filter(|feature| !dest.cpu_features.contains(feature))
            .cloned()
            .collect()
    } else {
        match dest.cpu_models.get(model) {
            Some(missing) => missing.clone(),
            // An older agent that did not report models: nothing to check against.
            None if dest.cpu_models.is_empty() => Vec::new(),
            None => {
                return Err(format!(
                    "host {}'s QEMU does not know CPU model {model}",
                    dest.name
                ))
            }
        }
    };
    if missing.is_empty() {
        return Ok(());
    }
    let mut shown = missing
        .iter()
        .take(FEATURES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if missing.len() > FEATURES_SHOWN {
        shown.push_str(&format!(" and {} more", missing.len() - FEATURES_SHOWN));
    }
    Err(format!(
        "CPU model {model} of VM {} cannot run on host {}: missing features {shown}",
        candidate.vm.spec.name, dest.name
    ))
}

/// The pool a host-local disk goes to on `host`.
pub fn local_pool(host: &HostRecord) -> Option<&ferry_model::cluster::PoolInfo> {
    host.pools.iter().find(|pool| !pool.shared)
}

/// The best destination: every check passes, most free memory, ties by name.
pub fn choose_destination(
    candidate: &Candidate<'_>,
    hosts: &[HostRecord],
    used: &BTreeMap<HostName, Bytes>,
) -> Result<HostName, String> {
    let mut reasons = Vec::new();
    let mut best: Option<(&HostRecord, u64)> = None;
    for host in hosts {
        if host.name == candidate.source.name {
            continue;
        }
        let promised = used.get(&host.name).copied().unwrap_or_default();
        match check_destination(candidate, host, promised) {
            Ok(()) => {
                let free = host.memory.0.saturating_sub(promised.0);
                if best.is_none_or(|(_, most)| free > most) {
                    best = Some((host, free));
                }
            }
            Err(reason) => reasons.push(reason),
        }
    }
    match best {
        Some((host, _)) => Ok(host.name.clone()),
        None if reasons.is_empty() => Err(format!(
            "no other host in the cluster for VM {}",
            candidate.vm.spec.name
        )),
        None => Err(format!(
            "no host can take VM {}: {}",
            candidate.vm.spec.name,
            reasons.join("; ")
        )),
    }
}

/// Memory promised on each host: VMs placed there and migrations heading there.
pub fn promised_memory<'a>(
    entries: &ferry_store::VmEntries,
    ops: impl IntoIterator<Item = &'a ferry_model::ops::OpRecord>,
) -> BTreeMap<HostName, Bytes> {
    let mut used: BTreeMap<HostName, Bytes> = BTreeMap::new();
    let memory_of = |vm: &str| {
        entries
            .get(vm)
            .and_then(|entry| entry.record.as_ref())
            .map(|record| record.value.spec.memory)
            .unwrap_or_default()
    };
    for (name, entry) in entries {
        if let Some(placement) = &entry.placement {
            used.entry(placement.value.host.clone()).or_default().0 += memory_of(name).0;
        }
    }
    for op in ops.into_iter().filter(|op| !op.state.is_final()) {
        if let ferry_model::ops::OpKind::Migrate(migrate) = &op.kind {
            used.entry(migrate.to.clone()).or_default().0 += memory_of(migrate.vm.as_str()).0;
        }
    }
    used
}

/// A migration as the admission rule sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slotted {
    pub id: String,
    pub hosts: Vec<HostName>,
    pub created_ms: u64,
    pub running: bool,
}

/// The queued ops that may start now, oldest first: each takes a slot on every host it
/// involves, and a host runs at most its limit at once (hosts not in `limits`: 2).
pub fn admit(ops: &[Slotted], limits: &BTreeMap<HostName, u32>) -> Vec<String> {
    let mut busy: BTreeMap<&HostName, u32> = BTreeMap::new();
    for op in ops.iter().filter(|op| op.running) {
        for host in &op.hosts {
            *busy.entry(host).or_default() += 1;
        }
    }
    let mut queued: Vec<&Slotted> = ops.iter().filter(|op| !op.running).collect();
    queued.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
    let mut admitted = Vec::new();
    for op in queued {
        let free = op.hosts.iter().all(|host| {
            busy.get(host).copied().unwrap_or(0) < limits.get(host).copied().unwrap_or(2)
        });
        if free {
            for host in &op.hosts {
                *busy.entry(host).or_default() += 1;
            }
            admitted.push(op.id.clone());
        }
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::cluster::{MigrationPolicy, PoolInfo, PowerState};
    use ferry_model::{Boot, DiskSpec, NicSpec, VmSpec};
    use proptest::prelude::*;

    fn host(name: &str) -> HostRecord {
        HostRecord {
            version: 1,
            name: name.parse().unwrap(),
            api_url: String::new(),
            addresses: [("migration".to_string(), "10.0.1.1/24".to_string())].into(),
            cpus: 4,
            memory: Bytes::mib(4096),
            cpu_model: "max".into(),
            cpu_features: vec!["sse2".into(), "avx2".into()],
            cpu_models: [
                ("qemu64".to_string(), vec![]),
                ("Haswell".to_string(), vec!["avx2".to_string()]),
            ]
            .into(),
            accel: "tcg".into(),
            pools: vec![
                PoolInfo {
                    name: "shared".into(),
                    path: "/pools/shared".into(),
                    shared: true,
                },
                PoolInfo {
                    name: format!("local-{name}"),
                    path: format!("/pools/local-{name}").into(),
                    shared: false,
                },
            ],
            networks: vec!["business".into(), "migration".into()],
            state: HostState::Active,
            migration_limit: 2,
            started_ms: 0,
        }
    }

    fn vm(disk: &str) -> VmRecord {
        VmRecord {
            version: 1,
            spec: VmSpec {
                name: "web".parse().unwrap(),
                cpus: 1,
                memory: Bytes::mib(256),
                cpu_model: "qemu64".into(),
                disks: vec![DiskSpec {
                    id: "data".into(),
                    path: disk.into(),
                    format: Default::default(),
                    cache: Default::default(),
                    read_only: false,
                    size: None,
                    ..Default::default()
                }],
                nics: vec![NicSpec {
                    tap: "fv-web-0".into(),
                    mac: "52:54:00:00:00:01".parse().unwrap(),
                    network: ferry_model::default_network(),
                    model: Default::default(),
                }],
                boot: Boot::Disk,
                firmware: Default::default(),
                cdroms: Vec::new(),
                boot_order: ferry_model::default_boot_order(),
                guest_agent: true,
                stop_command: None,
            },
            desired: PowerState::Running,
            image: "appliance".into(),
            preferred_host: None,
            ip: None,
            addresses: Vec::new(),
            deleting: false,
            reset_serial: 0,
            resume_checkpoint: None,
            migration: MigrationPolicy::default(),
            ha: Default::default(),
            project: ferry_model::access::default_project(),
        }
    }

    fn check(
        vm: &VmRecord,
        dest: &HostRecord,
        used: u64,
        mode: MigrationMode,
    ) -> Result<(), String> {
        let source = host("host1");
        let candidate = Candidate {
            vm,
            source: &source,
            mode,
        };
        check_destination(&candidate, dest, Bytes::mib(used))
    }

    #[test]
    fn a_host_with_everything_takes_the_vm() {
        let shared = vm("/pools/shared/vms/web/data.qcow2");
        assert_eq!(
            check(&shared, &host("host2"), 0, MigrationMode::Live),
            Ok(())
        );
        assert_eq!(
            check(&shared, &host("host2"), 0, MigrationMode::Quick),
            Ok(())
        );
    }

    #[test]
    fn each_refusal_names_its_reason() {
        let shared = vm("/pools/shared/vms/web/data.qcow2");
        let live = MigrationMode::Live;
        let refusal = |dest: HostRecord, used| check(&shared, &dest, used, live).unwrap_err();

        assert_eq!(refusal(host("host1"), 0), "VM web already runs on host1");
        let mut maintenance = host("host2");
        maintenance.state = HostState::Maintenance;
        assert_eq!(refusal(maintenance, 0), "host host2 is in maintenance");
        assert_eq!(
            refusal(host("host2"), 3900),
            "host host2 has 196 MiB of memory free, VM web needs 256 MiB"
        );
        let mut no_business = host("host2");
        no_business.networks.retain(|network| network != "business");
        assert!(refusal(no_business, 0).contains("not on the business network"));
        let mut storage_nic = vm("/pools/shared/vms/web/data.qcow2");
        storage_nic.spec.nics[0].network = "storage".into();
        let error = check(&storage_nic, &host("host2"), 0, MigrationMode::Live).unwrap_err();
        assert_eq!(
            error,
            "host host2 is not on the storage network VM web is attached to"
        );
        let mut no_shared = host("host2");
        no_shared.pools.retain(|pool| !pool.shared);
        assert_eq!(
            refusal(no_shared, 0),
            "host host2 does not mount pool shared (disk data of VM web)"
        );
        let mut no_migration = host("host2");
        no_migration.addresses.clear();
        assert!(refusal(no_migration, 0).ends_with("use --mode quick"));
        let mut old_qemu = host("host2");
        old_qemu.cpu_models.remove("qemu64");
        assert_eq!(
            refusal(old_qemu, 0),
            "host host2's QEMU does not know CPU model qemu64"
        );
    }

    #[test]
    fn a_cpu_model_the_destination_lacks_names_the_features() {
        let mut haswell = vm("/pools/shared/vms/web/data.qcow2");
        haswell.spec.cpu_model = "Haswell".into();
        assert_eq!(
            check(&haswell, &host("host2"), 0, MigrationMode::Live).unwrap_err(),
            "CPU model Haswell of VM web cannot run on host host2: missing features avx2"
        );
        let mut passthrough = vm("/pools/shared/vms/web/data.qcow2");
        passthrough.spec.cpu_model = "host".into();
        let mut older = host("host2");
        older.cpu_features = vec!["sse2".into()];
        assert_eq!(
            check(&passthrough, &older, 0, MigrationMode::Live).unwrap_err(),
            "CPU model host of VM web cannot run on host host2: missing features avx2"
        );
    }

    #[test]
    fn a_local_disk_needs_live_migration_and_a_local_pool_there() {
        let local = vm("/pools/local-host1/vms/web/data.qcow2");
        assert_eq!(
            check(&local, &host("host2"), 0, MigrationMode::Live),
            Ok(())
        );
        assert!(check(&local, &host("host2"), 0, MigrationMode::Quick)
            .unwrap_err()
            .contains("quick migration needs shared disks"));
        let mut shared_only = host("host2");
        shared_only.pools.retain(|pool| pool.shared);
        assert_eq!(
            check(&local, &shared_only, 0, MigrationMode::Live).unwrap_err(),
            "host host2 has no local pool to copy disk data of VM web to"
        );
    }

    #[test]
    fn the_destination_with_most_room_is_chosen() {
        let shared = vm("/pools/shared/vms/web/data.qcow2");
        let source = host("host1");
        let candidate = Candidate {
            vm: &shared,
            source: &source,
            mode: MigrationMode::Live,
        };
        let hosts = vec![host("host1"), host("host2"), host("host3")];
        let used: BTreeMap<HostName, Bytes> = [
            ("host2".parse().unwrap(), Bytes::mib(1024)),
            ("host3".parse().unwrap(), Bytes::mib(512)),
        ]
        .into();
        assert_eq!(
            choose_destination(&candidate, &hosts, &used)
                .unwrap()
                .as_str(),
            "host3"
        );
        let full: BTreeMap<HostName, Bytes> = [
            ("host2".parse().unwrap(), Bytes::mib(4096)),
            ("host3".parse().unwrap(), Bytes::mib(4000)),
        ]
        .into();
        let refusal = choose_destination(&candidate, &hosts, &full).unwrap_err();
        assert!(
            refusal.starts_with("no host can take VM web: host host2 has 0 B"),
            "{refusal}"
        );
    }

    fn slotted(id: &str, hosts: &[&str], created_ms: u64, running: bool) -> Slotted {
        Slotted {
            id: id.into(),
            hosts: hosts.iter().map(|host| host.parse().unwrap()).collect(),
            created_ms,
            running,
        }
    }

    #[test]
    fn the_third_migration_from_a_host_waits() {
        let ops = vec![
            slotted("a", &["host1", "host2"], 1, true),
            slotted("b", &["host1", "host3"], 2, false),
            slotted("c", &["host1", "host2"], 3, false),
            slotted("d", &["host2", "host3"], 4, false),
        ];
        assert_eq!(admit(&ops, &BTreeMap::new()), vec!["b", "d"]);
    }

    proptest! {
        #[test]
        fn admission_never_exceeds_a_hosts_limit(
            ops in proptest::collection::vec((0u8..4, 0u8..4, any::<bool>()), 0..30),
            limit in 1u32..4,
        ) {
            let names = ["h0", "h1", "h2", "h3"];
            let ops: Vec<Slotted> = ops
                .iter()
                .enumerate()
                .filter(|(_, (from, to, _))| from != to)
                .map(|(index, (from, to, running))| {
                    slotted(&index.to_string(), &[names[*from as usize], names[*to as usize]], index as u64, *running)
                })
                .collect();
            let limits: BTreeMap<HostName, u32> =
                names.iter().map(|name| (name.parse().unwrap(), limit)).collect();
            let admitted = admit(&ops, &limits);
            for name in names {
                let host: HostName = name.parse().unwrap();
                let running = ops.iter().filter(|op| op.running && op.hosts.contains(&host)).count() as u32;
                let started = ops
                    .iter()
                    .filter(|op| admitted.contains(&op.id) && op.hosts.contains(&host))
                    .count() as u32;
                prop_assert!(started == 0 || running + started <= limit);
            }
        }
    }
}
