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
}

pub fn decide(
    me: &HostName,
    record: Option<&VmRecord>,
    placement: Option<&Placement>,
    local: Local,
    reset_seen: u64,
) -> Step {
    let placed_here = placement.is_some_and(|placement| &placement.host == me);
    let Some(record) = record else {
        return if local == Local::Absent {
            Step::Nothing
        } else {
            Step::KillStray
        };
    };
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
            },
            desired,
            image: "appliance".into(),
            preferred_host: None,
            ip: None,
            deleting: false,
            reset_serial: 0,
        }
    }

    fn on(host: &str) -> Placement {
        Placement {
            version: 1,
            host: host.parse().unwrap(),
            generation: 1,
            phase: PlacementPhase::Assigned,
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
                0
            ),
            Step::Start
        );
    }

    #[test]
    fn a_vm_placed_elsewhere_is_never_run_here() {
        let running = record(PowerState::Running);
        assert_eq!(
            decide(&me(), Some(&running), Some(&on("host2")), Local::Absent, 0),
            Step::Nothing
        );
        assert_eq!(
            decide(&me(), Some(&running), Some(&on("host2")), Local::Running, 0),
            Step::KillStray
        );
        assert_eq!(
            decide(&me(), Some(&running), None, Local::Running, 0),
            Step::KillStray
        );
        assert_eq!(
            decide(&me(), None, None, Local::Running, 0),
            Step::KillStray
        );
    }

    #[test]
    fn desired_state_drives_start_and_stop() {
        let stopped = record(PowerState::Stopped);
        assert_eq!(
            decide(&me(), Some(&stopped), Some(&on("host1")), Local::Running, 0),
            Step::Stop
        );
        assert_eq!(
            decide(&me(), Some(&stopped), Some(&on("host1")), Local::Absent, 0),
            Step::Nothing
        );
    }

    #[test]
    fn a_reset_request_is_acted_on_once() {
        let mut running = record(PowerState::Running);
        running.reset_serial = 3;
        assert_eq!(
            decide(&me(), Some(&running), Some(&on("host1")), Local::Running, 2),
            Step::Reset
        );
        assert_eq!(
            decide(&me(), Some(&running), Some(&on("host1")), Local::Running, 3),
            Step::Nothing
        );
    }

    #[test]
    fn deletion_wins_over_everything_else_here() {
        let mut deleting = record(PowerState::Running);
        deleting.deleting = true;
        for local in [Local::Absent, Local::Running, Local::Exited] {
            assert_eq!(
                decide(&me(), Some(&deleting), Some(&on("host1")), local, 0),
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
                0
            ),
            Step::ReapExited
        );
    }
}
