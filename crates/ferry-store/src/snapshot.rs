//! One consistent-enough picture of the cluster for the manager: every host holding a
//! lease, every VM's records, the ops, fence requests and devices, and — filled in by
//! the reader, not etcd — the storage heartbeats it observed (ages on its own
//! monotonic clock) and its fence jobs. Each key is decoded on its own; what cannot be
//! read is kept with its reason. The manager decides from this alone
//! (`ferry_manager::planner::plan`).

use std::collections::BTreeMap;

use ferry_model::cluster::HostRecord;
use ferry_model::ha::{FenceDevice, FenceProgress, FenceRequest, ObservedBeat};
use ferry_model::ops::OpRecord;
use ferry_model::HostName;

use crate::read::Unreadable;
use crate::vms::{fold_vm_change, VmEntries};
use crate::{Store, StoreError, Versioned, WatchEvent};

#[derive(Clone, Debug, Default)]
pub struct ClusterSnapshot {
    /// Hosts whose lease-bound record exists: alive, even when the record cannot be read.
    pub hosts: BTreeMap<HostName, Result<Versioned<HostRecord>, Unreadable>>,
    pub vms: VmEntries,
    /// Ops by id.
    pub ops: BTreeMap<String, Result<Versioned<OpRecord>, Unreadable>>,
    /// Destinations' answers (`incoming/{op}`) by op id, with their revision.
    pub incoming: BTreeMap<String, i64>,
    /// Hosts' requests to be fenced, by host.
    pub fence_requests: BTreeMap<HostName, Result<FenceRequest, Unreadable>>,
    /// How to power each host off, by host (none: it has no device).
    pub fence_devices: BTreeMap<HostName, Result<FenceDevice, Unreadable>>,
    /// The storage heartbeats as the reader observed them; `None`: they could not be
    /// read (or there is no shared pool to read them from).
    pub heartbeats: Option<Vec<ObservedBeat>>,
    /// The reader's fence jobs (the leader powering hosts off).
    pub fences: BTreeMap<HostName, FenceProgress>,
}

impl ClusterSnapshot {
    /// Reads everything etcd holds for the manager; heartbeats and fences are the
    /// caller's to add.
    pub async fn read(store: &Store) -> Result<ClusterSnapshot, StoreError> {
        let keys = store.keys();
        let by_host = |key: &str, prefix: &str| -> Option<HostName> {
            key.strip_prefix(prefix)?.parse().ok()
        };
        let hosts_prefix = keys.hosts();
        let hosts = store
            .list_each::<HostRecord>(&hosts_prefix)
            .await?
            .entries
            .into_iter()
            .filter_map(|(key, entry)| Some((by_host(&key, &hosts_prefix)?, entry)))
            .collect();
        let (records, _) = store.list_raw(&keys.vms()).await?;
        let mut vms = VmEntries::new();
        fold_vm_change(&mut vms, keys, &WatchEvent::Resync { records });
        let ops_prefix = keys.ops();
        let ops = store
            .list_each::<OpRecord>(&ops_prefix)
            .await?
            .entries
            .into_iter()
            .filter_map(|(key, entry)| Some((key.strip_prefix(&ops_prefix)?.to_string(), entry)))
            .collect();
        let incoming_prefix = keys.incomings();
        let (answers, _) = store.list_raw(&incoming_prefix).await?;
        let incoming = answers
            .into_iter()
            .filter_map(|(key, _, revision)| {
                Some((key.strip_prefix(&incoming_prefix)?.to_string(), revision))
            })
            .collect();
        let requests_prefix = keys.fence_requests();
        let fence_requests = store
            .list_each::<FenceRequest>(&requests_prefix)
            .await?
            .entries
            .into_iter()
            .filter_map(|(key, entry)| {
                Some((by_host(&key, &requests_prefix)?, entry.map(|r| r.value)))
            })
            .collect();
        let devices_prefix = keys.fence_device_prefix();
        let fence_devices = store
            .list_each::<FenceDevice>(&devices_prefix)
            .await?
            .entries
            .into_iter()
            .filter_map(|(key, entry)| {
                Some((by_host(&key, &devices_prefix)?, entry.map(|d| d.value)))
            })
            .collect();
        Ok(ClusterSnapshot {
            hosts,
            vms,
            ops,
            incoming,
            fence_requests,
            fence_devices,
            heartbeats: None,
            fences: BTreeMap::new(),
        })
    }

    /// The readable records of the hosts holding a lease.
    pub fn host_records(&self) -> impl Iterator<Item = &HostRecord> {
        self.hosts
            .values()
            .filter_map(|host| host.as_ref().ok().map(|host| &host.value))
    }

    pub fn host_record(&self, name: &HostName) -> Option<&HostRecord> {
        self.hosts.get(name)?.as_ref().ok().map(|host| &host.value)
    }

    pub fn is_alive(&self, name: &HostName) -> bool {
        self.hosts.contains_key(name)
    }

    /// The readable ops.
    pub fn op_records(&self) -> impl Iterator<Item = &Versioned<OpRecord>> {
        self.ops.values().filter_map(|op| op.as_ref().ok())
    }
}
