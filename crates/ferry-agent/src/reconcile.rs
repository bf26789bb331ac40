//! What the agent should do about one VM, decided from what etcd says and what runs
//! here. Pure, so that every combination is a unit test; the runtime carries it out.
//!
//! The rule that keeps VMs from running twice: a QEMU runs here only while the VM's
//! placement names this host. Anything else running here is killed.

use ferry_model::cluster::{Placement, PowerState, VmRecord};
use ferry_model::HostName;

/// What runs here for the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    /// No QEMU for it on this host.
    Absent,
    /// Its QEMU is alive.
    Running,
    /// Its QEMU exited without being asked to.
    Exited,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Nothing,
    Start,
    Stop,
    Reset,
    /// Remove QEMU, disk and records: the user deleted it.
    Delete,
    /// A QEMU here for a VM not placed here (or not known at all): kill it, keep its disk.
    KillStray,
    /// Forget a QEMU that exited (its status says so) before acting again.
    ReapExited,
    /// Drive the migration away from here (this host is the source).
    MigrateOut,
    /// Receive the migration (this host is the destination).
    MigrateIn,
    /// Move a disk of the VM (an admitted op names this host).
    MoveDisk,
}

pub fn decide(
    me: &HostName,
    record: Option<&VmRecord>,
    placement: Option<&Placement>,
    local: Local,
    reset_seen: u64,
    disk_move_admitted: bool,
) -> Step {
    let placed_here = placement.is_some_and(|placement| &placement.host == me);
    let Some(record) = record else {
        return if local == Local::Absent {
            Step::Nothing
        } else {
            Step::KillStray
        };
    };
    // A migration in flight belongs to its drivers: the source's QEMU and the
    // destination's waiting QEMU are both legitimate until it ends.
    if let Some(to) = placement.and_then(Placement::migrating_to) {
        return if placed_here {
            Step::MigrateOut
        } else if to == me {
            Step::MigrateIn
        } else if local == Local::Absent {
            Step::Nothing
        } else {
            Step::KillStray
        };
    }
    if !placed_here {
        return if local == Local::Absent {
            Step::Nothing
        } else {
            Step::KillStray
        };
    }
    if record.deleting {
        return Step::Delete;
    }
    match (record.desired, local) {
        (PowerState::Running, Local::Absent) => Step::Start,
        (PowerState::Running, Local::Exited) => Step::ReapExited,
        (PowerState::Running, Local::Running) if record.reset_serial > reset_seen => Step::Reset,
        (PowerState::Running, Local::Running) if disk_move_admitted => Step::MoveDisk,
        (PowerState::Running, Local::Running) => Step::Nothing,
        (PowerState::Stopped, Local::Running) => Step::Stop,
        (PowerState::Stopped, Local::Exited) => Step::ReapExited,
        (PowerState::Stopped, Local::Absent) => Step::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_model::cluster::PlacementPhase;
    use ferry_model::{Boot, Bytes, VmSpec};

    fn me() -> HostName {
        "host1".parse().unwrap()
    }

    fn record(desired: PowerState) -> VmRecord {
        VmRecord {
            version: 1,
            spec: VmSpec {
                name: "vm".parse().unwrap(),
                cpus: 1,
                memory: Bytes::mib(256),
                cpu_model: "qemu64".into(),
                disks: vec![],
                nics: vec![],
                boot: Boot::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: String::new(),
                },
                firmware: Default::default(),
                cdroms: Vec::new(),
                boot_order: ferry_model::default_boot_order(),
                guest_agent: true,
                stop_command: None,
            },
            desired,
            image: "appliance".into(),
            preferred_host: None,
            ip: None,
            addresses: Vec::new(),
            deleting: false,
            reset_serial: 0,
            resume_checkpoint: None,
            migration: Default::default(),
            ha: Default::default(),
            project: ferry_model::access::default_project(),
        }
    }

    fn on(host: &str) -> Placement {
        Placement {
            version: 1,
            host: host.parse().unwrap(),
            generation: 1,
            phase: PlacementPhase::Assigned,
            migration: None,
        }
    }

    #[test]
    fn a_vm_placed_here_that_should_run_is_started() {
        assert_eq!(
            decide(
                &me(),
                Some(&record(PowerState::Running)),
                Some(&on("host1")),
                Local::Absent,
                0,
                false
            ),
            Step::Start
        );
    }

    #[test]
    fn a_vm_placed_elsewhere_is_never_run_here() {
        let running = record(PowerState::Running);
        assert_eq!(
            decide(
                &me(),
                Some(&running),
                Some(&on("host2")),
                Local::Absent,
                0,
                false
            ),
            Step::Nothing
        );
        assert_eq!(
            decide(
                &me(),
                Some(&running),
                Some(&on("host2")),
                Local::Running,
                0,
                false
            ),
            Step::KillStray
        );
        assert_eq!(
            decide(&me(), Some(&running), None, Local::Running, 0, false),
            Step::KillStray
        );
        assert_eq!(
            decide(&me(), None, None, Local::Running, 0, false),
            Step::KillStray
        );
    }

    #[test]
    fn desired_state_drives_start_and_stop() {
        let stopped = record(PowerState::Stopped);
        assert_eq!(
            decide(
                &me(),
                Some(&stopped),
                Some(&on("host1")),
                Local::Running,
                0,
                false
            ),
            Step::Stop
        );
        assert_eq!(
            decide(
                &me(),
                Some(&stopped),
                Some(&on("host1")),
                Local::Absent,
                0,
                false
            ),
            Step::Nothing
        );
    }

    #[test]
    fn a_reset_request_is_acted_on_once() {
        let mut running = record(PowerState::Running);
        running.reset_serial = 3;
        assert_eq!(
            decide(
                &me(),
                Some(&running),
                Some(&on("host1")),
                Local::Running,
                2,
                false
            ),
            Step::Reset
        );
        assert_eq!(
            decide(
                &me(),
                Some(&running),
                Some(&on("host1")),
                Local::Running,
                3,
                false
            ),
            Step::Nothing
        );
    }

    #[test]
    fn deletion_wins_over_everything_else_here() {
        let mut deleting = record(PowerState::Running);
        deleting.deleting = true;
        for local in [Local::Absent, Local::Running, Local::Exited] {
            assert_eq!(
                decide(&me(), Some(&deleting), Some(&on("host1")), local, 0, false),
                Step::Delete
            );
        }
    }

    #[test]
    fn an_exited_qemu_is_reaped_before_a_restart() {
        assert_eq!(
            decide(
                &me(),
                Some(&record(PowerState::Running)),
                Some(&on("host1")),
                Local::Exited,
                0,
                false
            ),
            Step::ReapExited
        );
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;
    use ferry_model::cluster::{PlacementMigration, PlacementPhase};

    fn migrating(from: &str, to: &str) -> Placement {
        Placement {
            version: 1,
            host: from.parse().unwrap(),
            generation: 2,
            phase: PlacementPhase::Migrating,
            migration: Some(PlacementMigration {
                to: to.parse().unwrap(),
                op: "op-1".into(),
            }),
        }
    }

    fn running() -> VmRecord {
        let mut record: VmRecord = serde_json::from_value(serde_json::json!({
            "spec": {"name": "vm", "cpus": 1, "memory": 268435456, "boot": {"from": "disk"}},
            "desired": "running", "image": "appliance", "preferred_host": null, "ip": null
        }))
        .unwrap();
        record.reset_serial = 0;
        record
    }

    #[test]
    fn a_migration_in_flight_is_left_to_its_two_drivers() {
        let me: HostName = "host1".parse().unwrap();
        let record = running();
        let out = migrating("host1", "host2");
        let into = migrating("host2", "host1");
        let elsewhere = migrating("host2", "host3");
        assert_eq!(
            decide(&me, Some(&record), Some(&out), Local::Running, 0, false),
            Step::MigrateOut
        );
        // Even with the source QEMU gone, the driver must end the op and restore the placement.
        assert_eq!(
            decide(&me, Some(&record), Some(&out), Local::Absent, 0, false),
            Step::MigrateOut
        );
        // The waiting destination QEMU is never a stray, and never reset or stopped.
        for local in [Local::Absent, Local::Running, Local::Exited] {
            assert_eq!(
                decide(&me, Some(&record), Some(&into), local, 0, false),
                Step::MigrateIn
            );
        }
        assert_eq!(
            decide(
                &me,
                Some(&record),
                Some(&elsewhere),
                Local::Running,
                0,
                false
            ),
            Step::KillStray
        );
        assert_eq!(
            decide(
                &me,
                Some(&record),
                Some(&elsewhere),
                Local::Absent,
                0,
                false
            ),
            Step::Nothing
        );
    }

    #[test]
    fn an_admitted_disk_move_runs_only_on_a_running_vm_here() {
        let me: HostName = "host1".parse().unwrap();
        let here = Placement {
            version: 1,
            host: me.clone(),
            generation: 1,
            phase: PlacementPhase::Assigned,
            migration: None,
        };
        let record = running();
        assert_eq!(
            decide(&me, Some(&record), Some(&here), Local::Running, 0, true),
            Step::MoveDisk
        );
        assert_eq!(
            decide(&me, Some(&record), Some(&here), Local::Absent, 0, true),
            Step::Start
        );
    }
}
