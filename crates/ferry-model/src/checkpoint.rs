//! Checkpoints (`vms/{vm}/checkpoints`) and templates (`templates/{name}`): what is
//! recorded of them, and the rules every change of them follows. The data itself is
//! in the VM's qcow2 files (internal snapshots, see ferry-agent's `checkpoint`
//! module); the record says what each checkpoint is, and their tree.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cluster::record_version;
use crate::vm::{Boot, DiskBus, DiskFormat, NicModel, VmSpec};
use crate::{Bytes, VmName};

/// The longest tag; QEMU's snapshot names are limited to 256 bytes, ours stay short.
pub const MAX_TAG_LEN: usize = 63;
/// The most checkpoints one VM keeps: each is a walk of the qcow2 refcounts on revert
/// and delete, and a chain that long is a sign nobody deletes them.
pub const MAX_CHECKPOINTS: usize = 64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub tag: String,
    /// The checkpoint the VM stood on when this one was taken.
    pub parent: Option<String>,
    pub created_ms: u64,
    /// The guest's memory and devices were saved: a revert continues from that instant.
    pub memory: bool,
    /// The guest's filesystems were frozen through its agent while the disks were
    /// captured.
    pub quiesced: bool,
    /// Bytes of saved memory and device state (0 without memory).
    pub vm_state_bytes: u64,
    /// The disks captured, by id.
    pub disks: Vec<String>,
    /// The copy of the UEFI variable store taken with it, for UEFI VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
}

/// A VM's checkpoints and which one it stands on (the parent of the next).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSet {
    #[serde(default = "record_version")]
    pub version: u32,
    pub checkpoints: Vec<Checkpoint>,
    pub current: Option<String>,
}

/// A tag: 1–63 of `A-Z a-z 0-9 . _ -`, not starting with `-` or `.`; never all digits
/// (QEMU would take it for a snapshot id).
pub fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() || tag.len() > MAX_TAG_LEN {
        return Err(format!("tag {tag:?}: give 1 to {MAX_TAG_LEN} characters"));
    }
    if !tag
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "tag {tag:?}: use letters, digits, '.', '_' and '-' only"
        ));
    }
    if tag.starts_with(['-', '.']) {
        return Err(format!("tag {tag:?}: must not start with '-' or '.'"));
    }
    if tag.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "tag {tag:?}: must not be all digits (QEMU reads that as a snapshot id)"
        ));
    }
    Ok(())
}

/// The disks that hold a VM's checkpoints: every writable disk, each qcow2. A raw disk
/// has nowhere to keep one, and is refused by name.
pub fn checkpoint_disks(spec: &VmSpec) -> Result<Vec<&str>, String> {
    let writable: Vec<_> = spec.disks.iter().filter(|disk| !disk.read_only).collect();
    if writable.is_empty() {
        return Err(format!(
            "VM {} has no writable disk to checkpoint",
            spec.name
        ));
    }
    if let Some(raw) = writable.iter().find(|disk| disk.format == DiskFormat::Raw) {
        return Err(format!(
            "disk {} of VM {} is raw: a raw image cannot hold a checkpoint (convert it to qcow2)",
            raw.id, spec.name
        ));
    }
    Ok(writable.iter().map(|disk| disk.id.as_str()).collect())
}

impl CheckpointSet {
    pub fn get(&self, tag: &str) -> Option<&Checkpoint> {
        self.checkpoints
            .iter()
            .find(|checkpoint| checkpoint.tag == tag)
    }

    /// Refuses a tag that is taken or malformed, or one checkpoint too many.
    pub fn check_new(&self, vm: &VmName, tag: &str) -> Result<(), String> {
        check_tag(tag)?;
        if self.get(tag).is_some() {
            return Err(format!("VM {vm} already has a checkpoint {tag:?}"));
        }
        if self.checkpoints.len() >= MAX_CHECKPOINTS {
            return Err(format!(
                "VM {vm} has {MAX_CHECKPOINTS} checkpoints, the most it keeps; delete some first"
            ));
        }
        Ok(())
    }

    pub fn existing(&self, vm: &VmName, tag: &str) -> Result<&Checkpoint, String> {
        self.get(tag).ok_or_else(|| {
            let known: Vec<&str> = self.checkpoints.iter().map(|c| c.tag.as_str()).collect();
            if known.is_empty() {
                format!("VM {vm} has no checkpoint {tag:?} (it has none)")
            } else {
                format!(
                    "VM {vm} has no checkpoint {tag:?} (it has: {})",
                    known.join(", ")
                )
            }
        })
    }

    /// Adds a checkpoint taken now: its parent is the current one, and it becomes the
    /// current one.
    pub fn add(&mut self, mut checkpoint: Checkpoint) {
        checkpoint.parent = self.current.clone();
        self.current = Some(checkpoint.tag.clone());
        self.checkpoints.push(checkpoint);
    }

    /// The VM now stands on `tag` (after a revert).
    pub fn revert_to(&mut self, tag: &str) {
        self.current = Some(tag.to_string());
    }

    /// Removes `tag`; its children hang from its parent, and if the VM stood on it, it
    /// stands on the parent.
    pub fn remove(&mut self, tag: &str) -> Option<Checkpoint> {
        let index = self.checkpoints.iter().position(|c| c.tag == tag)?;
        let removed = self.checkpoints.remove(index);
        for child in &mut self.checkpoints {
            if child.parent.as_deref() == Some(tag) {
                child.parent = removed.parent.clone();
            }
        }
        if self.current.as_deref() == Some(tag) {
            self.current = removed.parent.clone();
        }
        Some(removed)
    }

    /// The checkpoints depth first from the roots, each with its depth, oldest child
    /// first: the order `checkpoint list` draws its tree in.
    pub fn tree(&self) -> Vec<(usize, &Checkpoint)> {
        fn walk<'a>(
            set: &'a CheckpointSet,
            parent: Option<&str>,
            depth: usize,
            out: &mut Vec<(usize, &'a Checkpoint)>,
        ) {
            let mut children: Vec<&Checkpoint> = set
                .checkpoints
                .iter()
                .filter(|c| c.parent.as_deref() == parent)
                .collect();
            children.sort_by_key(|c| (c.created_ms, c.tag.clone()));
            for child in children {
                out.push((depth, child));
                walk(set, Some(&child.tag), depth + 1, out);
            }
        }
        let mut out = Vec::new();
        walk(self, None, 0, &mut out);
        // A parent that is not in the set (a record edited by hand) still shows its
        // children, as roots.
        for checkpoint in &self.checkpoints {
            if !out.iter().any(|(_, seen)| seen.tag == checkpoint.tag) {
                out.push((0, checkpoint));
            }
        }
        out
    }
}

/// `templates/{name}`: a read-only base on the shared pool and the hardware new VMs
/// made from it get unless they ask otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    #[serde(default = "record_version")]
    pub version: u32,
    pub name: String,
    /// The project that may use it (and whose members may delete it).
    #[serde(default = "crate::access::default_project")]
    pub project: crate::ProjectName,
    pub from_vm: String,
    /// The image the VM had been made from.
    pub image: String,
    pub created_ms: u64,
    /// Machine id, SSH host keys and cloud-init state were reset before the copy.
    pub generalized: bool,
    pub cpus: u32,
    pub memory: Bytes,
    pub cpu_model: String,
    pub uefi: bool,
    /// The base of the UEFI variable store, for UEFI templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nvram: Option<PathBuf>,
    pub boot: Boot,
    pub bus: DiskBus,
    pub nics: Vec<TemplateNic>,
    pub guest_agent: bool,
    /// Clones get a cloud-init seed of their own (the VM had one).
    pub cloud_init: bool,
    pub disks: Vec<TemplateDisk>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_command: Option<crate::StopCommand>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateDisk {
    pub id: String,
    /// The read-only base (`{shared}/templates/{name}/{id}.qcow2`).
    pub path: PathBuf,
    pub size: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateNic {
    pub network: String,
    pub model: NicModel,
}

/// A template name: the rules of a VM name.
pub fn check_template_name(name: &str) -> Result<(), String> {
    name.parse::<VmName>()
        .map(drop)
        .map_err(|error| format!("template name {name:?}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(tag: &str, at: u64) -> Checkpoint {
        Checkpoint {
            tag: tag.into(),
            parent: None,
            created_ms: at,
            memory: true,
            quiesced: false,
            vm_state_bytes: 1,
            disks: vec!["data".into()],
            nvram: None,
        }
    }

    #[test]
    fn tags_are_checked() {
        for good in ["a", "before-upgrade", "v1.2_3", "x".repeat(63).as_str()] {
            assert_eq!(check_tag(good), Ok(()), "{good}");
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "123", &"x".repeat(64)] {
            assert!(check_tag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn children_hang_from_the_current_checkpoint_and_a_delete_reparents_them() {
        let vm: VmName = "web".parse().unwrap();
        let mut set = CheckpointSet::default();
        set.add(checkpoint("a", 1));
        set.add(checkpoint("b", 2));
        set.revert_to("a");
        set.add(checkpoint("c", 3));
        assert_eq!(set.get("b").unwrap().parent.as_deref(), Some("a"));
        assert_eq!(set.get("c").unwrap().parent.as_deref(), Some("a"));
        let drawn: Vec<(usize, &str)> = set
            .tree()
            .iter()
            .map(|(d, c)| (*d, c.tag.as_str()))
            .collect();
        assert_eq!(drawn, vec![(0, "a"), (1, "b"), (1, "c")]);
        assert!(set.check_new(&vm, "a").is_err());
        assert!(set
            .existing(&vm, "zz")
            .unwrap_err()
            .contains("it has: a, b, c"));

        set.remove("a");
        assert_eq!(set.get("b").unwrap().parent, None);
        assert_eq!(set.current.as_deref(), Some("c"));
        set.remove("c");
        assert_eq!(set.current, None);
        assert_eq!(set.tree().len(), 1);
    }

    #[test]
    fn a_raw_disk_is_refused_by_name() {
        let mut spec = VmSpec::minimal("web".parse().unwrap());
        spec.disks.push(crate::DiskSpec {
            id: "data".into(),
            path: "/p/data.qcow2".into(),
            ..Default::default()
        });
        assert_eq!(checkpoint_disks(&spec), Ok(vec!["data"]));
        spec.disks.push(crate::DiskSpec {
            id: "scratch".into(),
            path: "/p/scratch.img".into(),
            format: DiskFormat::Raw,
            ..Default::default()
        });
        let refused = checkpoint_disks(&spec).unwrap_err();
        assert!(
            refused.contains("disk scratch") && refused.contains("raw"),
            "{refused}"
        );
    }
}
