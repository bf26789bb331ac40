//! Checkpoints and flatten as API calls. Each is an op its host carries out at once
//! (`OpKind::Checkpoint`, `OpKind::Flatten`): the request goes to the host that runs
//! the VM (or, stopped, holds its disks), which creates the op `Running` together with
//! the VM's op lock, so no migration, disk move or second checkpoint can start
//! meanwhile; carries it out (ferry-agent's `checkpoint` module); records the result
//! in `vms/{vm}/checkpoints`; and ends the op. The op and its events are the record of
//! what was done.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_model::checkpoint::{checkpoint_disks, Checkpoint, CheckpointSet};
use ferry_model::cluster::{now_ms, PlacementPhase, PowerState, VmRecord, VmState};
use ferry_model::events::EventKind;
use ferry_model::ops::{
    CheckpointAction, CheckpointOp, FlattenOp, MigrationOutcome, OpKind, OpRecord, OpState, OpStep,
};
use ferry_model::{Firmware, VmName};
use ferry_store::{Read, Versioned};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::migrate::op_view;
use crate::ops::{parse_vm_name, vm_state, ClusterApi, Hop, Owner, VmEntry};
use crate::types::{CheckpointDone, CheckpointView, CreateCheckpointRequest, OpView};
use crate::ApiError;

/// A forwarded checkpoint call may wait this long for the VM's host (a memory save of
/// a large guest, a flatten of a large base).
const FORWARD_TIMEOUT: Duration = Duration::from_secs(3600);

/// Where a UEFI VM's variable store is copied for checkpoint `tag`.
pub fn nvram_copy(record: &VmRecord, tag: &str) -> Option<PathBuf> {
    match &record.spec.firmware {
        Firmware::Uefi { nvram } => Some(
            nvram
                .parent()
                .unwrap_or(Path::new("/"))
                .join("checkpoints")
                .join(format!("{tag}.nvram")),
        ),
        Firmware::Bios => None,
    }
}

pub fn checkpoint_views(set: &CheckpointSet) -> Vec<CheckpointView> {
    set.tree()
        .into_iter()
        .map(|(depth, checkpoint)| CheckpointView {
            tag: checkpoint.tag.clone(),
            parent: checkpoint.parent.clone(),
            depth,
            created_ms: checkpoint.created_ms,
            memory: checkpoint.memory,
            quiesced: checkpoint.quiesced,
            vm_state_bytes: checkpoint.vm_state_bytes,
            disks: checkpoint.disks.clone(),
            current: set.current.as_deref() == Some(checkpoint.tag.as_str()),
        })
        .collect()
}

/// A VM a checkpoint call may act on: running or stopped, not between two hosts.
struct Subject {
    name: VmName,
    entry: VmEntry,
    record: VmRecord,
    running: bool,
}

impl ClusterApi {
    pub async fn list_checkpoints(&self, name: &str) -> Result<Vec<CheckpointView>, ApiError> {
        let name = parse_vm_name(name)?;
        self.vm_entry_and_record(&name).await?;
        Ok(checkpoint_views(&self.checkpoint_set(&name).await?.value))
    }

    pub(crate) async fn checkpoint_set(
        &self,
        name: &VmName,
    ) -> Result<Versioned<CheckpointSet>, ApiError> {
        match self
            .store
            .read::<CheckpointSet>(&self.store.keys().vm_checkpoints(name))
            .await?
        {
            Read::Present(set) => Ok(set),
            Read::Absent => Ok(Versioned {
                value: CheckpointSet::default(),
                mod_revision: 0,
            }),
            Read::Unreadable(unreadable) => Err(ApiError::Conflict(format!(
                "VM {name}: its checkpoint record is unreadable ({unreadable})"
            ))),
        }
    }

    /// A block mirror copies what the guest sees, not the checkpoints inside the
    /// qcow2 file: a copy of a disk with checkpoints would lose them.
    pub(crate) async fn refuse_copy_with_checkpoints(
        &self,
        name: &VmName,
        why: &str,
    ) -> Result<(), ApiError> {
        let set = self.checkpoint_set(name).await?.value;
        if set.checkpoints.is_empty() {
            return Ok(());
        }
        let tags: Vec<&str> = set.checkpoints.iter().map(|c| c.tag.as_str()).collect();
        Err(ApiError::Conflict(format!(
            "VM {name} has checkpoints ({}) and {why}: a block mirror copies what the guest              sees, not the checkpoints in its qcow2 files; delete them first (live and quick              migration on the shared pool keep them)",
            tags.join(", ")
        )))
    }

    async fn checkpoint_subject(&self, name: &str) -> Result<Subject, ApiError> {
        let name = parse_vm_name(name)?;
        let (entry, record) = self.vm_entry_and_record(&name).await?;
        if entry
            .placement
            .as_ref()
            .is_some_and(|placement| placement.value.phase == PlacementPhase::Migrating)
        {
            return Err(ApiError::Conflict(format!(
                "VM {name} is migrating; wait until it has arrived"
            )));
        }
        let running = match vm_state(&entry) {
            Some(VmState::Running) => true,
            Some(VmState::Stopped) if record.desired == PowerState::Stopped => false,
            Some(state) => {
                return Err(ApiError::Conflict(format!(
                    "VM {name} is {}; wait until it runs or has stopped",
                    state.as_str()
                )))
            }
            None => return Err(ApiError::NotFound(format!("VM {name} does not exist"))),
        };
        Ok(Subject {
            name,
            entry,
            record,
            running,
        })
    }

    /// The host that carries out a checkpoint call: the one running the VM, or for a
    /// stopped VM the host it is placed on (which has its pools) if that host is up,
    /// else this one.
    async fn checkpoint_host(&self, subject: &Subject) -> Result<Owner, ApiError> {
        if subject.running {
            return self.owner_of(&subject.name, &subject.entry).await;
        }
        let placed = subject
            .entry
            .placement
            .as_ref()
            .map(|placement| placement.value.host.clone());
        match placed {
            Some(host) if host != self.host => {
                match self
                    .hosts()
                    .await?
                    .into_iter()
                    .find(|known| known.name == host)
                {
                    Some(known) => Ok(Owner::There {
                        host,
                        url: known.api_url,
                    }),
                    None => Ok(Owner::Here),
                }
            }
            _ => Ok(Owner::Here),
        }
    }

    /// Sends the call to `owner`, once.
    async fn forward_call<B: Serialize, T: DeserializeOwned>(
        &self,
        owner: Owner,
        hop: Hop,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<&B>,
    ) -> Result<Option<T>, ApiError> {
        let (host, url) = match owner {
            Owner::Here => return Ok(None),
            Owner::There { .. } if hop == Hop::Forwarded => {
                return Err(ApiError::Conflict(format!(
                    "this call belongs to another host than {} (a forwarded call is not \
                     forwarded again)",
                    self.host
                )))
            }
            Owner::There { host, url } => (host, url),
        };
        let mut request = self
            .http
            .request(method, format!("{url}{path}"))
            .bearer_auth(token)
            .header(crate::console::FORWARDED_HEADER, self.host.as_str())
            .timeout(FORWARD_TIMEOUT);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .map_err(|error| ApiError::Unavailable(format!("host {host}: {error}")))?;
        crate::client::decode_response(response).await.map(Some)
    }

    pub async fn create_checkpoint(
        &self,
        name: &str,
        request: CreateCheckpointRequest,
        token: &str,
        hop: Hop,
    ) -> Result<OpView, ApiError> {
        let subject = self.checkpoint_subject(name).await?;
        let name = subject.name.clone();
        let owner = self.checkpoint_host(&subject).await?;
        let path = format!("/api/v1/vms/{name}/checkpoints");
        if let Some(view) = self
            .forward_call(
                owner,
                hop,
                reqwest::Method::POST,
                &path,
                token,
                Some(&request),
            )
            .await?
        {
            return Ok(view);
        }
        let disks = checkpoint_disks(&subject.record.spec).map_err(ApiError::BadRequest)?;
        let memory = match (request.memory, request.quiesce, subject.running) {
            (Some(true), true, _) => {
                return Err(ApiError::BadRequest(
                    "quiesce makes a checkpoint of the disks alone: leave out memory".into(),
                ))
            }
            (Some(true), _, false) => {
                return Err(ApiError::BadRequest(format!(
                    "VM {name} is stopped: it has no memory to save"
                )))
            }
            (_, true, false) => {
                return Err(ApiError::BadRequest(format!(
                    "VM {name} is stopped: its disks are consistent without quiesce"
                )))
            }
            (memory, quiesce, running) => memory.unwrap_or(running && !quiesce),
        };
        if request.quiesce && !subject.record.spec.guest_agent {
            return Err(ApiError::BadRequest(format!(
                "VM {name} has no guest agent to freeze its filesystems"
            )));
        }
        let tag = request
            .tag
            .clone()
            .unwrap_or_else(|| format!("cp-{}", now_ms() / 1000));
        self.checkpoint_set(&name)
            .await?
            .value
            .check_new(&name, &tag)
            .map_err(ApiError::Conflict)?;
        let action = CheckpointAction::Create {
            tag: tag.clone(),
            memory,
            quiesce: request.quiesce,
        };
        let (op, done) = self
            .run_checkpoint_op(&subject.record, action, "taking the checkpoint")
            .await?;
        let done = match done {
            Ok(done) => done,
            Err(error) => {
                return self
                    .end_checkpoint_op(op, Err(error), EventKind::CheckpointCreated, "")
                    .await
            }
        };
        let checkpoint = Checkpoint {
            tag: tag.clone(),
            parent: None,
            created_ms: op.started_ms.unwrap_or_else(now_ms),
            memory,
            quiesced: request.quiesce,
            vm_state_bytes: done.vm_state_bytes,
            disks: disks.iter().map(|disk| disk.to_string()).collect(),
            nvram: nvram_copy(&subject.record, &tag),
        };
        let recorded = self
            .change_checkpoints(&name, |set| {
                set.add(checkpoint.clone());
                Ok(())
            })
            .await;
        let how = match (memory, done.paused_ms, done.frozen_filesystems) {
            (true, Some(paused), _) => format!("with memory, guest paused {paused} ms"),
            (true, None, _) => "with memory".to_string(),
            (false, _, Some(frozen)) => format!("disks only, {frozen} filesystem(s) frozen"),
            (false, _, None) => "disks only".to_string(),
        };
        let message = format!("checkpoint {tag} of VM {name} taken ({how})");
        self.end_checkpoint_op(
            op,
            recorded.map(|_| done),
            EventKind::CheckpointCreated,
            &message,
        )
        .await
    }

    pub async fn revert_checkpoint(
        &self,
        name: &str,
        tag: &str,
        token: &str,
        hop: Hop,
    ) -> Result<OpView, ApiError> {
        let subject = self.checkpoint_subject(name).await?;
        let name = subject.name.clone();
        let owner = self.checkpoint_host(&subject).await?;
        let path = format!("/api/v1/vms/{name}/checkpoints/{tag}/revert");
        if let Some(view) = self
            .forward_call::<(), _>(owner, hop, reqwest::Method::POST, &path, token, None)
            .await?
        {
            return Ok(view);
        }
        let set = self.checkpoint_set(&name).await?.value;
        let checkpoint = set
            .existing(&name, tag)
            .map_err(ApiError::NotFound)?
            .clone();
        let action = CheckpointAction::Revert {
            tag: tag.to_string(),
            memory: checkpoint.memory,
        };
        let (op, done) = self
            .run_checkpoint_op(&subject.record, action, "reverting to the checkpoint")
            .await?;
        let done = match done {
            Ok(done) => done,
            Err(error) => {
                return self
                    .end_checkpoint_op(op, Err(error), EventKind::CheckpointReverted, "")
                    .await
            }
        };
        let mut result = self
            .change_checkpoints(&name, |set| {
                set.revert_to(tag);
                Ok(())
            })
            .await
            .map(drop);
        let how = if subject.running && checkpoint.memory {
            format!(
                "the guest continues from it{}",
                done.paused_ms
                    .map(|ms| format!(" after a {ms} ms load"))
                    .unwrap_or_default()
            )
        } else if subject.running {
            "disks reverted; the guest boots again".to_string()
        } else if checkpoint.memory {
            // The start that follows loads the memory, so the guest continues from
            // the checkpoint rather than booting.
            if result.is_ok() {
                result = self
                    .update_record(&name, |record| {
                        record.resume_checkpoint = Some(tag.to_string());
                        record.desired = PowerState::Running;
                        Ok(())
                    })
                    .await
                    .map(drop);
            }
            "disks reverted; the VM starts and continues from it".to_string()
        } else {
            "disks reverted; the VM stays stopped".to_string()
        };
        let message = format!("VM {name} reverted to checkpoint {tag} ({how})");
        self.end_checkpoint_op(
            op,
            result.map(|_| done),
            EventKind::CheckpointReverted,
            &message,
        )
        .await
    }

    pub async fn delete_checkpoint(
        &self,
        name: &str,
        tag: &str,
        token: &str,
        hop: Hop,
    ) -> Result<OpView, ApiError> {
        let subject = self.checkpoint_subject(name).await?;
        let name = subject.name.clone();
        let owner = self.checkpoint_host(&subject).await?;
        let path = format!("/api/v1/vms/{name}/checkpoints/{tag}");
        if let Some(view) = self
            .forward_call::<(), _>(owner, hop, reqwest::Method::DELETE, &path, token, None)
            .await?
        {
            return Ok(view);
        }
        self.checkpoint_set(&name)
            .await?
            .value
            .existing(&name, tag)
            .map_err(ApiError::NotFound)?;
        let action = CheckpointAction::Delete {
            tag: tag.to_string(),
        };
        let (op, done) = self
            .run_checkpoint_op(&subject.record, action, "deleting the checkpoint")
            .await?;
        let done = match done {
            Ok(done) => done,
            Err(error) => {
                return self
                    .end_checkpoint_op(op, Err(error), EventKind::CheckpointDeleted, "")
                    .await
            }
        };
        let result = self
            .change_checkpoints(&name, |set| {
                set.remove(tag);
                Ok(())
            })
            .await;
        let message = format!("checkpoint {tag} of VM {name} deleted");
        self.end_checkpoint_op(
            op,
            result.map(|_| done),
            EventKind::CheckpointDeleted,
            &message,
        )
        .await
    }

    /// Copies the template base into a linked clone's disks (`block-stream` while it
    /// runs), so that it no longer depends on the template.
    pub async fn flatten_vm(&self, name: &str, token: &str, hop: Hop) -> Result<OpView, ApiError> {
        let subject = self.checkpoint_subject(name).await?;
        let name = subject.name.clone();
        let owner = self.checkpoint_host(&subject).await?;
        let path = format!("/api/v1/vms/{name}/flatten");
        if let Some(view) = self
            .forward_call::<(), _>(owner, hop, reqwest::Method::POST, &path, token, None)
            .await?
        {
            return Ok(view);
        }
        let linked: Vec<String> = subject
            .record
            .spec
            .disks
            .iter()
            .filter(|disk| disk.base.is_some())
            .map(|disk| disk.id.clone())
            .collect();
        if linked.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "VM {name} is not a linked clone: none of its disks has a template base"
            )));
        }
        let op = self
            .create_op_as(
                OpKind::Flatten(FlattenOp {
                    vm: name.clone(),
                    host: self.host.clone(),
                }),
                OpState::Running,
                "copying the template base into the disks",
            )
            .await?;
        let result = match self.local.flatten(&subject.record).await {
            Ok(()) => self
                .update_record(&name, |record| {
                    for disk in &mut record.spec.disks {
                        disk.base = None;
                    }
                    Ok(())
                })
                .await
                .map(|_| CheckpointDone::default()),
            Err(error) => Err(error),
        };
        let message = format!(
            "VM {name} flattened: disk(s) {} no longer depend on a template",
            linked.join(", ")
        );
        self.end_checkpoint_op(op, result, EventKind::Flattened, &message)
            .await
    }

    /// Creates the op (with the VM's lock) and has this host carry it out.
    async fn run_checkpoint_op(
        &self,
        record: &VmRecord,
        action: CheckpointAction,
        phase: &str,
    ) -> Result<(OpRecord, Result<CheckpointDone, ApiError>), ApiError> {
        let name = record.spec.name.clone();
        let tag = match &action {
            CheckpointAction::Create { tag, .. }
            | CheckpointAction::Revert { tag, .. }
            | CheckpointAction::Delete { tag } => tag.clone(),
        };
        let op = self
            .create_op_as(
                OpKind::Checkpoint(CheckpointOp {
                    vm: name.clone(),
                    host: self.host.clone(),
                    action: action.clone(),
                }),
                OpState::Running,
                phase,
            )
            .await?;
        // The record as it is now, under the lock: a change made since the caller read
        // it (a disk moved) is seen.
        let record = self
            .store
            .get::<VmRecord>(&self.store.keys().vm_spec(&name))
            .await?
            .map(|record| record.value)
            .unwrap_or_else(|| record.clone());
        let copy = nvram_copy(&record, &tag);
        let done = self
            .local
            .checkpoint(&record, &action, copy.as_deref())
            .await;
        Ok((op, done))
    }

    async fn change_checkpoints(
        &self,
        name: &VmName,
        mut change: impl FnMut(&mut CheckpointSet) -> Result<(), ApiError>,
    ) -> Result<CheckpointSet, ApiError> {
        let key = self.store.keys().vm_checkpoints(name);
        self.store
            .update(&key, |current: Option<&CheckpointSet>| {
                let mut set = current.cloned().unwrap_or_else(|| CheckpointSet {
                    version: ferry_model::cluster::RECORD_VERSION,
                    ..CheckpointSet::default()
                });
                change(&mut set)?;
                Ok::<_, ApiError>(set)
            })
            .await
    }

    /// Ends the op with the outcome, records the event, and answers with the op.
    async fn end_checkpoint_op(
        &self,
        op: OpRecord,
        result: Result<CheckpointDone, ApiError>,
        kind: EventKind,
        message: &str,
    ) -> Result<OpView, ApiError> {
        let key = self.store.keys().op(&op.id);
        let vm = op.kind.vm().clone();
        let finished = now_ms();
        let mut ended = op.clone();
        ended.step = OpStep::Finished;
        ended.finished_ms = Some(finished);
        match &result {
            Ok(done) => {
                ended.state = OpState::Completed;
                ended.phase = message.to_string();
                ended.outcome = Some(MigrationOutcome {
                    qemu_downtime_ms: done.paused_ms,
                    total_ms: finished.saturating_sub(op.started_ms.unwrap_or(finished)),
                    ..MigrationOutcome::default()
                });
            }
            Err(error) => {
                ended.state = OpState::Failed;
                ended.phase = "failed".into();
                ended.error = Some(error.to_string());
            }
        }
        let written = self
            .store
            .update(&key, |current: Option<&OpRecord>| {
                let mut next = ended.clone();
                if let Some(current) = current {
                    next.cancel_requested = current.cancel_requested;
                }
                Ok::<_, ApiError>(next)
            })
            .await;
        if let Err(error) = written {
            tracing::warn!("op {}: its end could not be recorded: {error}", op.id);
        }
        match result {
            Ok(_) => {
                self.events.record(&vm.subject(), kind, message).await;
                Ok(op_view(&ended))
            }
            Err(error) => {
                let failed = match op.kind {
                    OpKind::Flatten(_) => EventKind::FlattenFailed,
                    _ => EventKind::CheckpointFailed,
                };
                self.events
                    .record(
                        &vm.subject(),
                        failed,
                        &format!("{} of VM {vm} failed: {error}", op.kind.name()),
                    )
                    .await;
                Err(error)
            }
        }
    }
}
