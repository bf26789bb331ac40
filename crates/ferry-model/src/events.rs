//! What happened in the cluster, by kind. The kind is what scripts, tests and the
//! portal match on, so it is an enum: a reworded message never changes it. Written to
//! etcd as its kebab-case word; a kind this build does not know is shown as written.

macro_rules! event_kinds {
    ($($variant:ident => $word:literal),* $(,)?) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventKind {
            $($variant),*
        }

        impl EventKind {
            pub const ALL: &'static [EventKind] = &[$(EventKind::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventKind::$variant => $word),*
                }
            }
        }

        impl std::str::FromStr for EventKind {
            type Err = String;

            fn from_str(word: &str) -> Result<Self, String> {
                match word {
                    $($word => Ok(EventKind::$variant),)*
                    other => Err(format!("unknown event kind {other:?}")),
                }
            }
        }
    };
}

event_kinds! {
    // Hosts and the manager.
    Registered => "registered",
    Leader => "leader",
    HostFate => "host-fate",
    FenceRequested => "fence-requested",
    Fencing => "fencing",
    FencedOff => "fenced-off",
    FenceFailed => "fence-failed",
    Fenced => "fenced",
    RecordUnreadable => "record-unreadable",
    // VM life.
    Created => "created",
    CreateFailed => "create-failed",
    Placed => "placed",
    CannotPlace => "cannot-place",
    StartRequested => "start-requested",
    Started => "started",
    StartFailed => "start-failed",
    StopRequested => "stop-requested",
    Stopped => "stopped",
    StopFailed => "stop-failed",
    ResetRequested => "reset-requested",
    Reset => "reset",
    ResetFailed => "reset-failed",
    DeleteRequested => "delete-requested",
    Deleted => "deleted",
    DeleteFailed => "delete-failed",
    Reattached => "reattached",
    StrayKilled => "stray-killed",
    KillFailed => "kill-failed",
    Cdrom => "cdrom",
    Imported => "imported",
    // HA.
    HaPolicy => "ha-policy",
    HaRestart => "ha-restart",
    VmFailed => "vm-failed",
    RestartLimit => "restart-limit",
    // Monitors.
    MonitorAdded => "monitor-added",
    MonitorRemoved => "monitor-removed",
    MonitorDown => "monitor-down",
    MonitorAction => "monitor-action",
    MonitorExhausted => "monitor-exhausted",
    MonitorRecovered => "monitor-recovered",
    ApiCall => "api-call",
    // Ops.
    MigrationRequested => "migration-requested",
    MoveDiskRequested => "move-disk-requested",
    CancelRequested => "cancel-requested",
    OpStarted => "op-started",
    OpRefused => "op-refused",
    OpFailed => "op-failed",
    MigrationPrepareFailed => "migration-prepare-failed",
    Migrated => "migrated",
    MigrationFailed => "migration-failed",
    MigrationCancelled => "migration-cancelled",
    Resumed => "resumed",
    ResumeFailed => "resume-failed",
    RestoreFailed => "restore-failed",
    DiskMoved => "disk-moved",
    DiskMoveFailed => "disk-move-failed",
    // Checkpoints, templates, clones.
    CheckpointCreated => "checkpoint-created",
    CheckpointReverted => "checkpoint-reverted",
    CheckpointDeleted => "checkpoint-deleted",
    CheckpointFailed => "checkpoint-failed",
    TemplateCreated => "template-created",
    TemplateDeleted => "template-deleted",
    Cloned => "cloned",
    Flattened => "flattened",
    FlattenFailed => "flatten-failed",
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_word_and_no_two_share_one() {
        let mut words = std::collections::BTreeSet::new();
        for kind in EventKind::ALL {
            assert_eq!(kind.as_str().parse::<EventKind>(), Ok(*kind));
            assert!(words.insert(kind.as_str()), "{kind} twice");
        }
        assert!("no-such-kind".parse::<EventKind>().is_err());
    }
}
