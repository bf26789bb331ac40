//! Everything etcd holds about each VM (`vms/{vm}/…`), folded into one entry per VM
//! from a listing or a watch. A part that cannot be decoded is kept as unreadable with
//! its reason, never dropped as if absent: a VM whose spec or placement is unreadable
//! is unknown, and nothing may start, stop, kill or move it on a guess.

use std::collections::BTreeMap;

use ferry_model::cluster::{Placement, VmRecord, VmStatus};
use ferry_model::ha::RestartLog;
use ferry_model::monitor::{MonitorSet, VmHealth};
use ferry_model::ops::OpLock;
use serde::de::DeserializeOwned;

use crate::store::decode;
use crate::{Keys, Store, StoreError, Versioned, WatchEvent};

/// The records kept under `vms/{vm}/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum VmPart {
    Spec,
    Placement,
    Status,
    Restarts,
    Monitors,
    Health,
    Op,
}

impl VmPart {
    pub fn from_key_suffix(suffix: &str) -> Option<VmPart> {
        Some(match suffix {
            "spec" => VmPart::Spec,
            "placement" => VmPart::Placement,
            "status" => VmPart::Status,
            "restarts" => VmPart::Restarts,
            "monitors" => VmPart::Monitors,
            "health" => VmPart::Health,
            "op" => VmPart::Op,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmPart::Spec => "spec",
            VmPart::Placement => "placement",
            VmPart::Status => "status",
            VmPart::Restarts => "restarts",
            VmPart::Monitors => "monitors",
            VmPart::Health => "health",
            VmPart::Op => "op",
        }
    }
}

/// Everything known about one VM, read in one go.
#[derive(Clone, Debug, Default)]
pub struct VmEntry {
    pub record: Option<Versioned<VmRecord>>,
    pub placement: Option<Versioned<Placement>>,
    pub status: Option<Versioned<VmStatus>>,
    /// Recent failures and restarts (HA).
    pub restarts: Option<Versioned<RestartLog>>,
    /// The monitors the user added.
    pub monitors: Option<Versioned<MonitorSet>>,
    /// The monitors' state as the VM's host last wrote it.
    pub health: Option<Versioned<VmHealth>>,
    /// The op that holds the VM.
    pub op: Option<Versioned<OpLock>>,
    /// Parts present in etcd that this build cannot decode, with why.
    pub unreadable: BTreeMap<VmPart, String>,
}

impl VmEntry {
    /// Folds in the value of `vms/{vm}/{part}`: decoded, or kept as unreadable.
    pub fn set(&mut self, key: &str, part: VmPart, value: &[u8], mod_revision: i64) {
        fn versioned<T: DeserializeOwned>(
            key: &str,
            value: &[u8],
            mod_revision: i64,
        ) -> Result<Option<Versioned<T>>, StoreError> {
            Ok(Some(Versioned {
                value: decode(key, value)?,
                mod_revision,
            }))
        }
        self.clear(part);
        let decoded = match part {
            VmPart::Spec => versioned(key, value, mod_revision).map(|v| self.record = v),
            VmPart::Placement => versioned(key, value, mod_revision).map(|v| self.placement = v),
            VmPart::Status => versioned(key, value, mod_revision).map(|v| self.status = v),
            VmPart::Restarts => versioned(key, value, mod_revision).map(|v| self.restarts = v),
            VmPart::Monitors => versioned(key, value, mod_revision).map(|v| self.monitors = v),
            VmPart::Health => versioned(key, value, mod_revision).map(|v| self.health = v),
            VmPart::Op => versioned(key, value, mod_revision).map(|v| self.op = v),
        };
        if let Err(error) = decoded {
            self.unreadable.insert(part, error.to_string());
        }
    }

    /// Forgets `vms/{vm}/{part}` (deleted).
    pub fn clear(&mut self, part: VmPart) {
        self.unreadable.remove(&part);
        match part {
            VmPart::Spec => self.record = None,
            VmPart::Placement => self.placement = None,
            VmPart::Status => self.status = None,
            VmPart::Restarts => self.restarts = None,
            VmPart::Monitors => self.monitors = None,
            VmPart::Health => self.health = None,
            VmPart::Op => self.op = None,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.record.is_none()
            && self.placement.is_none()
            && self.status.is_none()
            && self.restarts.is_none()
            && self.monitors.is_none()
            && self.health.is_none()
            && self.op.is_none()
            && self.unreadable.is_empty()
    }

    /// Why this VM is unknown, if it is: its spec, placement or restart log (what
    /// decides whether and where it runs) cannot be read.
    pub fn unknown(&self) -> Option<String> {
        self.unreadable
            .iter()
            .find(|(part, _)| matches!(part, VmPart::Spec | VmPart::Placement | VmPart::Restarts))
            .map(|(part, reason)| format!("its {} record is unreadable: {reason}", part.as_str()))
    }
}

/// The VMs by name.
pub type VmEntries = BTreeMap<String, VmEntry>;

/// Folds one change under `vms/` into the entries.
pub fn fold_vm_change(entries: &mut VmEntries, keys: &Keys, change: &WatchEvent) {
    match change {
        WatchEvent::Resync { records } => {
            entries.clear();
            for (key, value, revision) in records {
                fold_vm_value(entries, keys, key, value, *revision);
            }
        }
        WatchEvent::Put {
            key,
            value,
            mod_revision,
        } => fold_vm_value(entries, keys, key, value, *mod_revision),
        WatchEvent::Delete { key, .. } => {
            let Some((vm, part)) = keys.parse_vm_key(key) else {
                return;
            };
            let Some(part) = VmPart::from_key_suffix(part) else {
                return;
            };
            if let Some(entry) = entries.get_mut(vm) {
                entry.clear(part);
                if entry.is_empty() {
                    entries.remove(vm);
                }
            }
        }
    }
}

fn fold_vm_value(entries: &mut VmEntries, keys: &Keys, key: &str, value: &[u8], revision: i64) {
    let Some((vm, part)) = keys.parse_vm_key(key) else {
        return;
    };
    // Parts this build does not know (a newer Ferry's) do not make a VM unknown.
    let Some(part) = VmPart::from_key_suffix(part) else {
        return;
    };
    entries
        .entry(vm.to_string())
        .or_default()
        .set(key, part, value, revision);
}

/// Every VM's entry, read now.
pub async fn read_vm_entries(store: &Store) -> Result<VmEntries, StoreError> {
    let (records, _) = store.list_raw(&store.keys().vms()).await?;
    let mut entries = VmEntries::new();
    fold_vm_change(&mut entries, store.keys(), &WatchEvent::Resync { records });
    Ok(entries)
}

/// One VM's entry, read now (empty if it does not exist).
pub async fn read_vm_entry(store: &Store, vm: &ferry_model::VmName) -> Result<VmEntry, StoreError> {
    let prefix = format!("{}{vm}/", store.keys().vms());
    let (records, _) = store.list_raw(&prefix).await?;
    let mut entries = VmEntries::new();
    fold_vm_change(&mut entries, store.keys(), &WatchEvent::Resync { records });
    Ok(entries.remove(vm.as_str()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_that_does_not_parse_is_unreadable_not_absent() {
        let keys = Keys::new("/ferry/");
        let mut entries = VmEntries::new();
        let put = |key: &str, value: &str| WatchEvent::Put {
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: 5,
        };
        fold_vm_change(
            &mut entries,
            &keys,
            &put("/ferry/vms/web/spec", "{not json"),
        );
        fold_vm_change(
            &mut entries,
            &keys,
            &put(
                "/ferry/vms/web/placement",
                r#"{"version":99,"host":"host1","generation":1,"phase":"assigned"}"#,
            ),
        );
        let entry = &entries["web"];
        assert!(entry.record.is_none() && entry.placement.is_none());
        assert_eq!(entry.unreadable.len(), 2);
        assert!(entry.unknown().is_some());
        assert!(!entry.is_empty(), "an unreadable VM is still a VM");
        let newer = &entry.unreadable[&VmPart::Placement];
        assert!(newer.contains("newer"), "{newer}");
        // A part this build does not know is ignored; one it can read mends the entry.
        fold_vm_change(&mut entries, &keys, &put("/ferry/vms/web/future", "{}"));
        fold_vm_change(
            &mut entries,
            &keys,
            &put(
                "/ferry/vms/web/placement",
                r#"{"version":1,"host":"host1","generation":1,"phase":"assigned"}"#,
            ),
        );
        assert!(entries["web"].placement.is_some());
        assert_eq!(entries["web"].unreadable.len(), 1);
        fold_vm_change(
            &mut entries,
            &keys,
            &WatchEvent::Delete {
                key: "/ferry/vms/web/spec".into(),
                mod_revision: 6,
            },
        );
        assert!(entries["web"].unknown().is_none());
    }
}
