//! The manager's hands: one pass reads the cluster (`ClusterSnapshot`), adds the
//! storage heartbeats this agent observed and its fence jobs, asks the pure planner
//! (`ferry_manager::planner::plan`) what to do, and applies each action in one etcd
//! transaction guarded by the revisions the decision read and by this agent's
//! leadership (its election key must still exist). A guard that fails means the world
//! moved: the action is dropped and the next pass decides again.

use std::collections::BTreeMap;

use ferry_manager::ha::HaTiming;
use ferry_manager::planner::{plan, Action, Restart};
use ferry_model::cluster::{now_ms, PowerState, VmRecord, VmState, VmStatus, RECORD_VERSION};
use ferry_model::events::EventKind;
use ferry_model::ha::{ObservedBeat, RestartCause, RestartLog};
use ferry_model::ops::{OpState, OpStep};
use ferry_model::{HostName, VmName};
use ferry_store::{encode, Change, ClusterSnapshot, EventLog, Guard, Store, StoreError};

use crate::fence_device::{FenceJob, FencePolicy};

/// What the leader keeps between passes: its fence jobs and what it last reported,
/// so that each verdict is one event. Fresh for each term.
#[derive(Default)]
pub struct ManagerMemory {
    fences: BTreeMap<HostName, FenceJob>,
    reported: BTreeMap<(String, EventKind), String>,
}

pub struct Executor<'a> {
    pub store: &'a Store,
    pub events: &'a EventLog,
    /// This agent's election key: it exists exactly while this agent leads.
    pub leader_key: String,
    pub timing: HaTiming,
    /// Which fence agents may run and the key that opens their secrets.
    pub fencing: FencePolicy,
}

impl Executor<'_> {
    /// One pass of the manager. `heartbeats` is `None` when they cannot be read.
    pub async fn pass(
        &self,
        memory: &mut ManagerMemory,
        heartbeats: Option<Vec<ObservedBeat>>,
    ) -> Result<(), StoreError> {
        let mut snapshot = ClusterSnapshot::read(self.store).await?;
        snapshot.heartbeats = heartbeats;
        snapshot.fences = memory
            .fences
            .iter()
            .map(|(host, job)| (host.clone(), job.progress()))
            .collect();
        for action in plan(&snapshot, &self.timing, now_ms()) {
            self.apply(memory, action).await;
        }
        Ok(())
    }

    /// Rewrites one record, only if it is unchanged since `revision`.
    fn rewrite(key: String, revision: i64, value: Vec<u8>) -> Change {
        Change::default()
            .guard(Guard::Unchanged {
                key: key.clone(),
                revision,
            })
            .put(key, value)
    }

    fn leading(&self) -> Guard {
        Guard::Exists {
            key: self.leader_key.clone(),
        }
    }

    /// Applies `change` guarded by the leadership; a lost guard is the world moving on
    /// (logged at debug), an etcd failure is logged as a warning: either way the next
    /// pass decides again from what it then reads.
    async fn commit(&self, what: &str, change: Change) -> bool {
        match self.store.apply(&change.guard(self.leading())).await {
            Ok(_) => true,
            Err(StoreError::Conflict { key }) => {
                tracing::debug!("manager: {what} not applied: {key} changed or leadership lost");
                false
            }
            Err(error) => {
                tracing::warn!("manager: {what} not applied: {error}");
                false
            }
        }
    }

    async fn apply(&self, memory: &mut ManagerMemory, action: Action) {
        let keys = self.store.keys();
        match action {
            Action::Report {
                subject,
                kind,
                message,
                dedupe,
            } => {
                let last = memory.reported.get(&(subject.clone(), kind));
                if last != Some(&dedupe) {
                    self.events.record(&subject, kind, &message).await;
                    memory.reported.insert((subject, kind), dedupe);
                }
            }
            Action::StartFence { host, device } => {
                memory
                    .fences
                    .insert(host, FenceJob::start(self.fencing.clone(), device));
            }
            Action::DropFence { host } => {
                memory.fences.remove(&host);
                memory
                    .reported
                    .retain(|(subject, _), _| subject != &format!("host/{host}"));
            }
            Action::Place { vm, host } => {
                let placement = ferry_model::cluster::Placement {
                    version: RECORD_VERSION,
                    host: host.clone(),
                    generation: 1,
                    phase: ferry_model::cluster::PlacementPhase::Assigned,
                    migration: None,
                };
                let key = keys.vm_placement(&vm);
                // Create-only, and only while the VM's record exists.
                let change = Change::default()
                    .guard(Guard::Absent { key: key.clone() })
                    .guard(Guard::Exists {
                        key: keys.vm_spec(&vm),
                    })
                    .put(key, encode(&placement));
                if self.commit(&format!("placing VM {vm}"), change).await {
                    self.events
                        .record(
                            &vm.subject(),
                            EventKind::Placed,
                            &format!("VM {vm} placed on {host}"),
                        )
                        .await;
                }
            }
            Action::Restart(restart) => self.restart(&restart).await,
            Action::CannotPlace { vm, reason } => {
                let status = VmStatus {
                    version: RECORD_VERSION,
                    host: None,
                    state: VmState::Failed,
                    pid: None,
                    guest_agent: false,
                    last_error: Some(reason.clone()),
                    updated_ms: now_ms(),
                };
                let change = Change::default()
                    .guard(Guard::Exists {
                        key: keys.vm_spec(&vm),
                    })
                    .put(keys.vm_status(&vm), encode(&status));
                if self.commit(&format!("reporting VM {vm}"), change).await {
                    self.events
                        .record(
                            &vm.subject(),
                            EventKind::CannotPlace,
                            &format!("VM {vm}: {reason}"),
                        )
                        .await;
                }
            }
            Action::WithdrawLeave {
                vm,
                log_revision,
                log,
                message,
            } => {
                let key = keys.vm_restarts(&vm);
                let change = Self::rewrite(key, log_revision, encode(&log));
                if self.commit(&format!("keeping VM {vm}"), change).await {
                    self.events
                        .record(&vm.subject(), EventKind::VmFailed, &message)
                        .await;
                }
            }
            Action::HoldStopped {
                vm,
                spec_revision,
                record,
                reason,
            } => {
                let key = keys.vm_spec(&vm);
                let change = Self::rewrite(key, spec_revision, encode(&record));
                if self.commit(&format!("stopping VM {vm}"), change).await {
                    self.events
                        .record(&vm.subject(), EventKind::RestartLimit, &reason)
                        .await;
                }
            }
            Action::AdmitOp {
                op,
                op_revision,
                vm,
                placement_revision,
                migrating,
            } => {
                let op_key = keys.op(&op.id);
                let placement_key = keys.vm_placement(&vm);
                let mut change = Change::default()
                    .guard(Guard::Unchanged {
                        key: op_key.clone(),
                        revision: op_revision,
                    })
                    .guard(Guard::Unchanged {
                        key: placement_key.clone(),
                        revision: placement_revision,
                    })
                    .put(op_key, encode(&*op));
                if let Some(migrating) = &migrating {
                    change = change.put(placement_key, encode(migrating));
                }
                if self.commit(&format!("starting op {}", op.id), change).await {
                    self.events
                        .record(
                            &vm.subject(),
                            EventKind::OpStarted,
                            &format!("op {} ({}) started", op.id, op.kind.name()),
                        )
                        .await;
                }
            }
            Action::QueueOp { op, op_revision } => {
                let key = keys.op(&op.id);
                let change = Self::rewrite(key, op_revision, encode(&*op));
                self.commit(&format!("queueing op {}", op.id), change).await;
            }
            Action::RefuseOp {
                op,
                op_revision,
                reason,
            } => {
                let key = keys.op(&op.id);
                let change = Self::rewrite(key, op_revision, encode(&*op));
                if self.commit(&format!("refusing op {}", op.id), change).await {
                    self.events
                        .record(
                            &op.kind.vm().subject(),
                            EventKind::OpRefused,
                            &format!("op {} ({}) refused: {reason}", op.id, op.kind.name()),
                        )
                        .await;
                }
            }
            Action::FailOp {
                op,
                op_revision,
                reason,
            } => {
                let change = Self::rewrite(keys.op(&op.id), op_revision, encode(&*op));
                if self.commit(&format!("ending op {}", op.id), change).await {
                    self.events
                        .record(
                            &op.kind.vm().subject(),
                            EventKind::OpFailed,
                            &format!("op {} ({}) failed: {reason}", op.id, op.kind.name()),
                        )
                        .await;
                }
            }
            Action::CompleteOp { op, op_revision } => {
                let key = keys.op(&op.id);
                let change = Self::rewrite(key, op_revision, encode(&*op));
                self.commit(&format!("completing op {}", op.id), change)
                    .await;
            }
            Action::RestorePlacement {
                vm,
                op_id,
                placement_revision,
                restored,
            } => {
                let key = keys.vm_placement(&vm);
                let change = Self::rewrite(key, placement_revision, encode(&restored));
                self.commit(&format!("restoring VM {vm} after op {op_id}"), change)
                    .await;
            }
            Action::ReleaseOpLock {
                vm,
                op_id,
                lock_revision,
            } => {
                let key = keys.vm_op(&vm);
                let change = Change::default()
                    .guard(Guard::Unchanged {
                        key: key.clone(),
                        revision: lock_revision,
                    })
                    .delete(key);
                self.commit(&format!("releasing VM {vm} from op {op_id}"), change)
                    .await;
            }
            Action::DeleteOp {
                op_id,
                op_revision,
                incoming_revision,
            } => {
                let key = keys.op(&op_id);
                let mut change = Change::default()
                    .guard(Guard::Unchanged {
                        key: key.clone(),
                        revision: op_revision,
                    })
                    .delete(key);
                if let Some(revision) = incoming_revision {
                    let incoming = keys.incoming(&op_id);
                    change = change
                        .guard(Guard::Unchanged {
                            key: incoming.clone(),
                            revision,
                        })
                        .delete(incoming);
                }
                self.commit(&format!("removing finished op {op_id}"), change)
                    .await;
            }
            Action::DeleteIncoming { op_id, revision } => {
                let key = keys.incoming(&op_id);
                let change = Change::default()
                    .guard(Guard::Unchanged {
                        key: key.clone(),
                        revision,
                    })
                    .guard(Guard::Absent {
                        key: keys.op(&op_id),
                    })
                    .delete(key);
                self.commit(&format!("removing the answer of op {op_id}"), change)
                    .await;
            }
        }
    }

    /// A restart: the new placement and the restart log, against the placement and
    /// log judged, and — for a host failure — only while the failed host's record is
    /// still absent (a host that came back keeps its VMs). The migration the VM was in
    /// ends in the same transaction.
    async fn restart(&self, restart: &Restart) {
        let keys = self.store.keys();
        let vm = &restart.vm;
        let placement_key = keys.vm_placement(vm);
        let log_key = keys.vm_restarts(vm);
        let mut change = Change::default()
            .guard(Guard::Unchanged {
                key: placement_key.clone(),
                revision: restart.placement_revision,
            })
            .guard(Guard::Unchanged {
                key: log_key.clone(),
                revision: restart.log_revision,
            })
            .put(placement_key, encode(&restart.placement()))
            .put(log_key, encode(&restart.next_log));
        if restart.cause == RestartCause::HostFailed {
            change = change.guard(Guard::Absent {
                key: keys.host(&restart.from),
            });
        }
        if let Some((op_id, revision, op)) = &restart.migration_op {
            let mut ended = op.clone();
            ended.state = OpState::Failed;
            ended.step = OpStep::Finished;
            ended.phase = "source host died; VM restarted by HA".into();
            ended.error = Some(format!(
                "the source host {} died: {}",
                restart.from, restart.reason
            ));
            ended.finished_ms = Some(now_ms());
            let op_key = keys.op(op_id);
            change = change
                .guard(Guard::Unchanged {
                    key: op_key.clone(),
                    revision: *revision,
                })
                .put(op_key, encode(&ended));
        }
        if self.commit(&format!("restarting VM {vm}"), change).await {
            self.events
                .record(
                    &vm.subject(),
                    EventKind::HaRestart,
                    &format!(
                        "VM {vm} restarts on {}: {} (it ran on {})",
                        restart.to, restart.reason, restart.from
                    ),
                )
                .await;
        }
    }
}

/// Changes the VM's restart log by compare-and-swap; returns the log as written.
pub async fn update_restart_log(
    store: &Store,
    vm: &VmName,
    change: impl Fn(&mut RestartLog),
) -> Result<RestartLog, StoreError> {
    let key = store.keys().vm_restarts(vm);
    store
        .update(&key, |current: Option<&RestartLog>| {
            let mut log = current.cloned().unwrap_or_default();
            log.version = RECORD_VERSION;
            change(&mut log);
            Ok::<_, StoreError>(log)
        })
        .await
}

/// Sets the VM's desired state to stopped: it reached its restart limit. `ferry vm
/// start` asks for it again (and clears the count).
pub async fn leave_stopped(store: &Store, vm: &VmName) -> Result<(), StoreError> {
    let key = store.keys().vm_spec(vm);
    store
        .update(&key, |current: Option<&VmRecord>| match current {
            Some(record) => {
                let mut record = record.clone();
                record.desired = PowerState::Stopped;
                Ok(record)
            }
            None => Err(StoreError::Conflict { key: key.clone() }),
        })
        .await
        .map(drop)
        .or_else(|error| match error {
            // Deleted meanwhile: nothing to stop.
            StoreError::Conflict { .. } => Ok(()),
            other => Err(other),
        })
}
