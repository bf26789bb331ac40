//! Templates and clones. A template is a read-only copy of a stopped VM's disks on the
//! shared pool (`{shared}/templates/{name}/`, every file mode 0444) and the VM's
//! hardware as defaults (`templates/{name}`). A VM made from it is a linked clone (its
//! disks are qcow2 overlays on the base: made in milliseconds, sharing every block it
//! has not written) or a full copy. `vm clone` copies a stopped VM, or a VM at one of
//! its checkpoints, the same way, described as a template that is never stored.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_model::checkpoint::{check_template_name, TemplateDisk, TemplateNic, TemplateRecord};
use ferry_model::cluster::{now_ms, VmRecord, VmState, RECORD_VERSION};
use ferry_model::events::EventKind;
use ferry_model::{Bytes, DiskBus, Firmware, VmName};
use ferry_store::Read;

use crate::ops::{parse_vm_name, vm_state, ClusterApi, Hop};
use crate::types::{
    CloneVmRequest, CreateTemplateRequest, CreateVmRequest, ExecRequest, TemplateDiskView,
    TemplateView, VmView,
};
use crate::ApiError;

/// How long a generalized VM may take to shut down before the template is made.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(180);

/// What `--generalize` runs in the guest: what must differ between clones goes, so
/// each clone makes its own on first boot. Each step runs only where the guest has
/// what it resets.
pub const GENERALIZE_SCRIPT: &str = "\
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub; \
if [ -s /etc/machine-id ]; then : > /etc/machine-id; fi; \
rm -f /var/lib/dbus/machine-id; \
if command -v cloud-init >/dev/null 2>&1; then cloud-init clean --logs; fi; \
rm -rf /var/lib/cloud/instances /var/lib/cloud/instance; \
sync";

/// A template a VM is made from: the record, linked or copied, and (for a clone at a
/// checkpoint) the snapshot to copy.
pub(crate) struct TemplateSource {
    pub record: TemplateRecord,
    pub linked: bool,
    pub snapshot: Option<String>,
}

fn template_dir(shared: &Path, name: &str) -> PathBuf {
    shared.join("templates").join(name)
}

/// Removes a template's directory, only if it has that shape.
fn remove_template_dir(dir: &Path) {
    let shaped = dir
        .parent()
        .and_then(|parent| parent.file_name())
        .is_some_and(|name| name == "templates");
    if !shaped {
        tracing::warn!("not removing {}: not a template directory", dir.display());
        return;
    }
    if let Err(error) = std::fs::remove_dir_all(dir) {
        if error.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!("cannot remove {}: {error}", dir.display());
        }
    }
}

fn read_only(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|error| format!("cannot make {} read-only: {error}", path.display()))
}

/// The template a VM would make, its disks at `disk_paths` (by disk id).
fn describe(
    name: &str,
    record: &VmRecord,
    generalized: bool,
    disk_paths: &dyn Fn(&str) -> PathBuf,
    nvram: Option<PathBuf>,
) -> TemplateRecord {
    let spec = &record.spec;
    TemplateRecord {
        version: RECORD_VERSION,
        name: name.to_string(),
        project: record.project.clone(),
        from_vm: spec.name.to_string(),
        image: record.image.clone(),
        created_ms: now_ms(),
        generalized,
        cpus: spec.cpus,
        memory: spec.memory,
        cpu_model: spec.cpu_model.clone(),
        uefi: matches!(spec.firmware, Firmware::Uefi { .. }),
        nvram,
        boot: spec.boot.clone(),
        bus: spec
            .disks
            .first()
            .map_or(DiskBus::default(), |disk| disk.bus),
        nics: spec
            .nics
            .iter()
            .map(|nic| TemplateNic {
                network: nic.network.clone(),
                model: nic.model,
            })
            .collect(),
        guest_agent: spec.guest_agent,
        cloud_init: spec.cdroms.iter().any(|cdrom| cdrom.id == "cidata"),
        disks: spec
            .disks
            .iter()
            .filter(|disk| !disk.read_only)
            .map(|disk| TemplateDisk {
                id: disk.id.clone(),
                path: disk_paths(&disk.id),
                size: disk.size.unwrap_or(Bytes(0)),
            })
            .collect(),
        stop_command: spec.stop_command.clone(),
    }
}

pub fn template_view(template: &TemplateRecord, linked_clones: Vec<String>) -> TemplateView {
    TemplateView {
        name: template.name.clone(),
        project: template.project.to_string(),
        from_vm: template.from_vm.clone(),
        image: template.image.clone(),
        created_ms: template.created_ms,
        generalized: template.generalized,
        cpus: template.cpus,
        memory_mib: template.memory.as_mib(),
        firmware: if template.uefi { "uefi" } else { "bios" }.into(),
        disks: template
            .disks
            .iter()
            .map(|disk| TemplateDiskView {
                id: disk.id.clone(),
                size: disk.size.0,
                path: disk.path.display().to_string(),
            })
            .collect(),
        linked_clones,
    }
}

impl ClusterApi {
    pub(crate) async fn template_record(&self, name: &str) -> Result<TemplateRecord, ApiError> {
        check_template_name(name).map_err(ApiError::BadRequest)?;
        match self
            .store
            .read::<TemplateRecord>(&self.store.keys().template(name))
            .await?
        {
            Read::Present(template) => Ok(template.value),
            Read::Absent => Err(ApiError::NotFound(format!(
                "template {name} does not exist"
            ))),
            Read::Unreadable(unreadable) => Err(ApiError::Conflict(format!(
                "template {name}: its record is unreadable ({unreadable})"
            ))),
        }
    }

    /// The VMs with a disk linked to template `name`.
    async fn linked_clones(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let entries = self.vm_entries().await?;
        let mut clones = Vec::new();
        for (vm, entry) in &entries {
            if let Some(reason) = entry.unknown() {
                // Unreadable is not "not a clone": it may be one.
                return Err(ApiError::Conflict(format!(
                    "VM {vm} may be a clone of template {name}, but {reason}"
                )));
            }
            let linked = entry.record.as_ref().is_some_and(|record| {
                record
                    .value
                    .spec
                    .disks
                    .iter()
                    .any(|disk| disk.base.as_deref() == Some(name))
            });
            if linked {
                clones.push(vm.clone());
            }
        }
        Ok(clones)
    }

    pub async fn list_templates(&self) -> Result<Vec<TemplateView>, ApiError> {
        let listing = self
            .store
            .list_each::<TemplateRecord>(&self.store.keys().templates())
            .await?;
        let templates = listing.all().map_err(|unreadable| {
            ApiError::Conflict(format!(
                "template {}: unreadable record: {unreadable}",
                unreadable.key
            ))
        })?;
        let entries = self.vm_entries().await?;
        Ok(templates
            .into_iter()
            .map(|(_, template)| {
                let clones = entries
                    .iter()
                    .filter(|(_, entry)| {
                        entry.record.as_ref().is_some_and(|record| {
                            record.value.spec.disks.iter().any(|disk| {
                                disk.base.as_deref() == Some(template.value.name.as_str())
                            })
                        })
                    })
                    .map(|(vm, _)| vm.clone())
                    .collect();
                template_view(&template.value, clones)
            })
            .collect())
    }

    pub async fn get_template(&self, name: &str) -> Result<TemplateView, ApiError> {
        let template = self.template_record(name).await?;
        Ok(template_view(&template, self.linked_clones(name).await?))
    }

    /// Makes template `name` from a stopped VM (or, with `generalize`, from a running
    /// one: generalized through its guest agent, then shut down).
    pub async fn create_template(
        &self,
        request: CreateTemplateRequest,
        token: &str,
        hop: Hop,
    ) -> Result<TemplateView, ApiError> {
        let name = request.name.clone();
        check_template_name(&name).map_err(ApiError::BadRequest)?;
        let key = self.store.keys().template(&name);
        if !matches!(self.store.read::<TemplateRecord>(&key).await?, Read::Absent) {
            return Err(ApiError::Conflict(format!(
                "template {name} already exists"
            )));
        }
        let vm = parse_vm_name(&request.from_vm)?;
        let (entry, record) = self.vm_entry_and_record(&vm).await?;
        if let Some(local) = record
            .spec
            .disks
            .iter()
            .find(|disk| !disk.path.starts_with(&self.shared_pool))
        {
            return Err(ApiError::BadRequest(format!(
                "disk {} of VM {vm} is on pool {}: a template lives on the shared pool; move \
                 the disk there first",
                local.id,
                local.pool.as_deref().unwrap_or("(local)")
            )));
        }
        let state = vm_state(&entry).unwrap_or(VmState::Stopped);
        match (state, request.generalize) {
            (VmState::Stopped, false) => {}
            (VmState::Running, true) => {
                if !record.spec.guest_agent {
                    return Err(ApiError::BadRequest(format!(
                        "VM {vm} has no guest agent to generalize it"
                    )));
                }
                self.generalize_and_stop(&vm, token, hop).await?;
            }
            (VmState::Running, false) => {
                return Err(ApiError::Conflict(format!(
                    "VM {vm} is running: stop it first (or generalize, which shuts it down)"
                )))
            }
            (VmState::Stopped, true) => {
                return Err(ApiError::Conflict(format!(
                    "VM {vm} is stopped: generalize runs in the guest, so start it first"
                )))
            }
            (other, _) => {
                return Err(ApiError::Conflict(format!(
                    "VM {vm} is {}; wait until it runs or has stopped",
                    other.as_str()
                )))
            }
        }
        // Stopped now; the disks as the record names them (re-read: a generalize may
        // have taken a while).
        let (_, record) = self.vm_entry_and_record(&vm).await?;
        let dir = template_dir(&self.shared_pool, &name);
        let nvram = match &record.spec.firmware {
            Firmware::Uefi { .. } => Some(dir.join("nvram.fd")),
            Firmware::Bios => None,
        };
        let template = describe(
            &name,
            &record,
            request.generalize,
            &|id| dir.join(format!("{id}.qcow2")),
            nvram,
        );
        let copies: Vec<(PathBuf, PathBuf)> = record
            .spec
            .disks
            .iter()
            .filter(|disk| !disk.read_only)
            .map(|disk| (disk.path.clone(), dir.join(format!("{}.qcow2", disk.id))))
            .collect();
        let vm_nvram = match &record.spec.firmware {
            Firmware::Uefi { nvram } => Some(nvram.clone()),
            Firmware::Bios => None,
        };
        let (made_dir, made_nvram) = (dir.clone(), template.nvram.clone());
        let started = Instant::now();
        let made = tokio::task::spawn_blocking(move || -> Result<(), String> {
            if made_dir.exists() {
                return Err(format!(
                    "{} already exists (left by an earlier template of this name?); remove it",
                    made_dir.display()
                ));
            }
            for (from, to) in &copies {
                ferry_qemu::snapshot::flat_copy(from, to, None, &mut |_| {})?;
                read_only(to)?;
            }
            if let (Some(from), Some(to)) = (vm_nvram, made_nvram) {
                std::fs::copy(&from, &to)
                    .map_err(|error| format!("cannot copy {}: {error}", from.display()))?;
                read_only(&to)?;
            }
            Ok(())
        })
        .await
        .map_err(|error| format!("template copy: {error}"))
        .and_then(|made| made);
        if let Err(error) = made {
            if !error.contains("already exists") {
                remove_template_dir(&dir);
            }
            return Err(ApiError::Conflict(format!("template {name}: {error}")));
        }
        if let Err(error) = self
            .store
            .create(&key, &template, &format!("template {name}"))
            .await
        {
            remove_template_dir(&dir);
            return Err(error.into());
        }
        self.events
            .record(
                &format!("template/{name}"),
                EventKind::TemplateCreated,
                &format!(
                    "template {name} made from VM {vm} ({} disk(s){}, {:.1} s)",
                    template.disks.len(),
                    if request.generalize {
                        ", generalized"
                    } else {
                        ""
                    },
                    started.elapsed().as_secs_f64()
                ),
            )
            .await;
        Ok(template_view(&template, Vec::new()))
    }

    /// Runs the generalization in the guest, then shuts the VM down and waits until
    /// it has stopped.
    async fn generalize_and_stop(
        &self,
        vm: &VmName,
        token: &str,
        hop: Hop,
    ) -> Result<(), ApiError> {
        let result = self
            .exec_vm(
                vm.as_str(),
                ExecRequest {
                    command: vec!["/bin/sh".into(), "-c".into(), GENERALIZE_SCRIPT.into()],
                    timeout_seconds: Some(120),
                },
                token,
                hop,
            )
            .await?;
        if result.exit_code != Some(0) {
            return Err(ApiError::Conflict(format!(
                "VM {vm}: generalizing failed (exit {:?}): {}",
                result.exit_code,
                result.stderr.trim()
            )));
        }
        self.stop_vm(vm.as_str()).await?;
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        loop {
            let entry = self.vm_entry(vm).await?;
            if vm_state(&entry) == Some(VmState::Stopped) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ApiError::Unavailable(format!(
                    "VM {vm} was generalized but has not stopped within {SHUTDOWN_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes template `name`, refused while a linked clone uses its base.
    pub async fn delete_template(&self, name: &str) -> Result<(), ApiError> {
        self.template_record(name).await?;
        let clones = self.linked_clones(name).await?;
        if !clones.is_empty() {
            return Err(ApiError::Conflict(format!(
                "template {name} is the base of linked clone(s) {}: flatten or delete them first",
                clones.join(", ")
            )));
        }
        self.store.delete(&self.store.keys().template(name)).await?;
        remove_template_dir(&template_dir(&self.shared_pool, name));
        self.events
            .record(
                &format!("template/{name}"),
                EventKind::TemplateDeleted,
                &format!("template {name} deleted"),
            )
            .await;
        Ok(())
    }

    /// A full copy of VM `source` as VM `request.name`: of a stopped VM as it is, or
    /// of any VM at one of its checkpoints. New MACs, a new cloud-init seed and name.
    pub async fn clone_vm(
        &self,
        source: &str,
        request: CloneVmRequest,
        token: &str,
        hop: Hop,
    ) -> Result<VmView, ApiError> {
        let vm = parse_vm_name(source)?;
        let (entry, record) = self.vm_entry_and_record(&vm).await?;
        let nvram = match (&record.spec.firmware, &request.checkpoint) {
            (Firmware::Bios, _) => None,
            (Firmware::Uefi { nvram }, None) => Some(nvram.clone()),
            (Firmware::Uefi { nvram }, Some(tag)) => crate::checkpoints::nvram_copy(&record, tag)
                .filter(|copy| copy.exists())
                .or_else(|| Some(nvram.clone())),
        };
        match &request.checkpoint {
            Some(tag) => {
                self.checkpoint_set(&vm)
                    .await?
                    .value
                    .existing(&vm, tag)
                    .map_err(ApiError::NotFound)?;
            }
            None => {
                let state = vm_state(&entry).unwrap_or(VmState::Stopped);
                if state != VmState::Stopped {
                    return Err(ApiError::Conflict(format!(
                        "VM {vm} is {}: clone a stopped VM, or one of its checkpoints",
                        state.as_str()
                    )));
                }
            }
        }
        let paths: std::collections::BTreeMap<String, PathBuf> = record
            .spec
            .disks
            .iter()
            .map(|disk| (disk.id.clone(), disk.path.clone()))
            .collect();
        let mut described = describe(
            &format!("{vm}"),
            &record,
            false,
            &|id| paths.get(id).cloned().unwrap_or_default(),
            nvram,
        );
        described.image = record.image.clone();
        let create = CreateVmRequest {
            name: request.name.clone(),
            project: Some(record.project.to_string()),
            host: request.host.clone(),
            ..CreateVmRequest::default()
        };
        let source = TemplateSource {
            record: described,
            linked: false,
            snapshot: request.checkpoint.clone(),
        };
        let view = self
            .create_vm_from(create, Some(source), token, hop)
            .await?;
        self.events
            .record(
                &format!("vm/{}", request.name),
                EventKind::Cloned,
                &format!(
                    "VM {} cloned from VM {vm}{}",
                    request.name,
                    request
                        .checkpoint
                        .as_deref()
                        .map(|tag| format!(" at checkpoint {tag}"))
                        .unwrap_or_default()
                ),
            )
            .await;
        Ok(view)
    }
}
