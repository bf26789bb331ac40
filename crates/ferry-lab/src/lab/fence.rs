//! `fence_ferry_lab`: the lab's fence agent, with the ClusterLabs interface
//! (`key=value` lines on stdin; `action=off|on|reboot|status|monitor`), so the cluster
//! fences a lab host exactly as it would call `fence_ipmilan` on real hardware.
//! Options: `lab_dir` (the lab's state directory), `plug` (the host, `host2`) and
//! `password` (sealed in etcd like a BMC's, so it must arrive opened).
//! "Off" is the lab's power-off: the host's agent and QEMUs are SIGKILLed together.
//! "On" starts the host again (links up, agent started).

use std::path::PathBuf;

use ferry_manager::fence::{exit_code, parse_request, FenceAction, Power};

use super::{process, Fault, Lab};

/// The file name the lab gives the agent (a link to the `ferry` binary).
pub const FENCE_AGENT_NAME: &str = "fence_ferry_lab";

/// Runs one request read from stdin; returns the exit code and a line for stderr.
pub fn run(stdin: &str) -> (i32, Option<String>) {
    match act(stdin) {
        Ok((action, power)) => (exit_code(action, power), None),
        Err(problem) => (1, Some(format!("{FENCE_AGENT_NAME}: {problem}"))),
    }
}

fn act(stdin: &str) -> Result<(FenceAction, Option<Power>), String> {
    let (action, options) = parse_request(stdin)?;
    let lab_dir = options
        .get("lab_dir")
        .map(PathBuf::from)
        .ok_or("no lab_dir= option: which lab?")?;
    match options.get("password").map(String::as_str) {
        Some(super::config::LAB_FENCE_PASSWORD) => {}
        Some(other) if other.starts_with(ferry_agent::secrets::SEALED_PREFIX) => {
            return Err("password= is still sealed: the leader did not open it".into())
        }
        _ => return Err("password= is not the lab's fence password".into()),
    }
    let mut lab = Lab::load(&lab_dir).map_err(|error| error.to_string())?;
    if action == FenceAction::Monitor {
        return Ok((action, None));
    }
    let plug = options.get("plug").ok_or("no plug= option: which host?")?;
    let host = lab.spec().parse_host(plug)?;
    let power = match action {
        FenceAction::Off => {
            lab.fault(host, Fault::PowerOff)
                .map_err(|error| error.to_string())?;
            Power::Off
        }
        FenceAction::On => {
            lab.heal(host).map_err(|error| error.to_string())?;
            Power::On
        }
        FenceAction::Reboot => {
            lab.fault(host, Fault::PowerOff)
                .map_err(|error| error.to_string())?;
            lab.heal(host).map_err(|error| error.to_string())?;
            Power::On
        }
        FenceAction::Status => power_of(&lab, host),
        FenceAction::Monitor => unreachable!("answered above"),
    };
    Ok((action, Some(power)))
}

/// On while its agent or any of its QEMUs runs.
fn power_of(lab: &Lab, host: u32) -> Power {
    let agent = lab
        .state()
        .agents
        .get(&host)
        .is_some_and(process::is_running);
    let qemus = !process::host_qemus(&lab.spec().host_run_dir(host)).is_empty();
    if agent || qemus {
        Power::On
    } else {
        Power::Off
    }
}
