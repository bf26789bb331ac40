//! Monitors: what is checked (a VM's QEMU and guest, an application in it), how often,
//! when it counts as down, and the recovery ladder that runs when it is. A monitor is
//! checked at create time, so a bad one is refused with the reason instead of failing
//! at the first fault.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How many times one ladder step may repeat, and how many steps a ladder may have.
pub const MAX_REPEATS: u32 = 10;
pub const MAX_STEPS: usize = 10;
pub const MAX_FAILURES: u32 = 100;
/// The shortest interval: probes faster than this would load a TCG guest for nothing.
pub const MIN_INTERVAL_MS: u64 = 100;
pub const MAX_INTERVAL_MS: u64 = 3_600_000;
/// A VM has at most this many monitors of its own (besides the built-in ones): each is a
/// task probing the guest on its host.
pub const MAX_VM_MONITORS: usize = 32;
/// A monitor added to a VM probes no more often than this (host monitors and the
/// built-in ones may go down to `MIN_INTERVAL_MS`).
pub const MIN_VM_MONITOR_INTERVAL_MS: u64 = 1_000;

/// What a monitor checks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Check {
    /// QEMU's monitor answers `query-status`.
    Qemu,
    /// The guest agent answers a ping.
    Heartbeat,
    /// The guest agent answers while QEMU says the guest runs: silence while running is
    /// a stalled guest OS (a paused or booting guest is not counted).
    Stall,
    /// A process of this name runs in the guest (`pidof` through the guest agent).
    Process { name: String },
    /// A TCP connection to this port of the VM succeeds.
    Tcp { port: u16, via: Via },
    /// `GET http://VM:port/path` answers 2xx.
    Http { port: u16, path: String, via: Via },
    /// The host's interface on a network has carrier (link up at both ends).
    Carrier { network: String, interface: String },
    /// An address on a network answers ping from this host.
    Ping { network: String, address: String },
    /// A timed write and read-back of a file on a pool completes (a stuck write counts as
    /// failed after the timeout).
    Storage { pool: String, path: PathBuf },
    /// The same on the host's own (boot) disk.
    LocalDisk { path: PathBuf },
}

/// Where an application check runs from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// From the VM's host, over the business network (what a client sees).
    #[default]
    Host,
    /// Inside the guest, through the guest agent (the application alone).
    Guest,
}

impl Check {
    /// The layer the monitor watches, for tables and events.
    pub fn layer(&self) -> &'static str {
        match self {
            Check::Qemu | Check::Heartbeat | Check::Stall => "vm",
            Check::Process { .. } | Check::Tcp { .. } | Check::Http { .. } => "application",
            Check::Carrier { .. }
            | Check::Ping { .. }
            | Check::Storage { .. }
            | Check::LocalDisk { .. } => "host",
        }
    }

    /// Parses the CLI's `--kind K --target T`.
    pub fn parse(kind: &str, target: Option<&str>, via: Via) -> Result<Check, String> {
        let needs_target = |what: &str| {
            target
                .filter(|target| !target.trim().is_empty())
                .ok_or_else(|| format!("a {kind} monitor needs --target ({what})"))
        };
        let no_target = |check: Check| match target {
            Some(target) => Err(format!("a {kind} monitor takes no target (got {target:?})")),
            None => Ok(check),
        };
        match kind {
            "qemu" => no_target(Check::Qemu),
            "heartbeat" => no_target(Check::Heartbeat),
            "stall" => no_target(Check::Stall),
            "process" => {
                let name = needs_target("a process name")?;
                if name.contains('/') || name.chars().any(char::is_whitespace) {
                    return Err(format!(
                        "process name {name:?}: a name as `pidof` takes it, without / or spaces"
                    ));
                }
                Ok(Check::Process { name: name.into() })
            }
            "tcp" => {
                let text = needs_target("a port")?;
                Ok(Check::Tcp {
                    port: parse_port(text.trim_start_matches(':'))?,
                    via,
                })
            }
            "http" => {
                let text = needs_target("PORT/PATH, e.g. 8080/health")?;
                let text = text.trim_start_matches(':');
                let (port, path) = match text.find('/') {
                    Some(0) => (80, text),
                    Some(slash) => (parse_port(&text[..slash])?, &text[slash..]),
                    None => (parse_port(text)?, "/"),
                };
                if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(format!("http path {path:?} contains spaces"));
                }
                Ok(Check::Http {
                    port,
                    path: path.into(),
                    via,
                })
            }
            other => Err(format!(
                "unknown monitor kind {other:?}: expected process, tcp, http, heartbeat, stall or qemu"
            )),
        }
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("port {text:?}: expected a number from 1 to 65535")),
    }
}

impl fmt::Display for Check {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = |via: &Via| match via {
            Via::Host => "",
            Via::Guest => " (in guest)",
        };
        match self {
            Check::Qemu => write!(formatter, "qemu"),
            Check::Heartbeat => write!(formatter, "heartbeat"),
            Check::Stall => write!(formatter, "stall"),
            Check::Process { name } => write!(formatter, "process {name}"),
            Check::Tcp { port, via: v } => write!(formatter, "tcp :{port}{}", via(v)),
            Check::Http { port, path, via: v } => {
                write!(formatter, "http :{port}{path}{}", via(v))
            }
            Check::Carrier { network, interface } => {
                write!(formatter, "carrier {network} ({interface})")
            }
            Check::Ping { network, address } => write!(formatter, "ping {address} ({network})"),
            Check::Storage { pool, .. } => write!(formatter, "storage {pool}"),
            Check::LocalDisk { path } => write!(formatter, "local disk {}", path.display()),
        }
    }
}

/// What a monitor does when its check is down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Run the restart command in the guest.
    RestartApp,
    /// Hard-reset the guest (QEMU `system_reset`): a reboot without a new process.
    ResetVm,
    /// Kill the QEMU and start the VM again on the same host.
    RestartVm,
    /// Cold restart on another host.
    FailoverVm,
    /// Live-migrate the VM to another host.
    MigrateAway,
    /// Power the VM's host off through its fence device.
    FenceHost,
    /// An event only.
    None,
}

impl Action {
    pub const ALL: [Action; 7] = [
        Action::RestartApp,
        Action::ResetVm,
        Action::RestartVm,
        Action::FailoverVm,
        Action::MigrateAway,
        Action::FenceHost,
        Action::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::RestartApp => "restart-app",
            Action::ResetVm => "reset-vm",
            Action::RestartVm => "restart-vm",
            Action::FailoverVm => "failover-vm",
            Action::MigrateAway => "migrate-away",
            Action::FenceHost => "fence-host",
            Action::None => "none",
        }
    }

    /// The guest boots again after this action, so the monitor waits for it.
    pub fn reboots_guest(self) -> bool {
        matches!(
            self,
            Action::ResetVm | Action::RestartVm | Action::FailoverVm | Action::FenceHost
        )
    }
}

impl fmt::Display for Action {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

impl FromStr for Action {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Action::ALL
            .into_iter()
            .find(|action| action.name() == text)
            .ok_or_else(|| {
                let known: Vec<&str> = Action::ALL.iter().map(|action| action.name()).collect();
                format!("unknown action {text:?}: expected {}", known.join(", "))
            })
    }
}

/// One rung of a ladder: an action, tried `times` times before the next rung.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub action: Action,
    pub times: u32,
}

/// A recovery ladder, written `restart-app*2,reset-vm,failover-vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ladder(pub Vec<Step>);

impl Ladder {
    /// The action of the `index`-th attempt (0-based), or `None` past the last rung.
    pub fn attempt(&self, index: u32) -> Option<Action> {
        let mut left = index;
        for step in &self.0 {
            if left < step.times {
                return Some(step.action);
            }
            left -= step.times;
        }
        None
    }

    pub fn contains(&self, action: Action) -> bool {
        self.0.iter().any(|step| step.action == action)
    }
}

impl FromStr for Ladder {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut steps = Vec::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(format!("ladder {text:?}: an empty step"));
            }
            let (name, times) = match part.split_once(['*', '×']) {
                Some((name, count)) => {
                    let count = count.trim();
                    let times = match count.parse::<u32>() {
                        Ok(0) => None,
                        Ok(times) => Some(times),
                        Err(_) if ["inf", "forever", "always", "∞"].contains(&count) => None,
                        Err(_) => {
                            return Err(format!("ladder step {part:?}: {count:?} is not a count"))
                        }
                    };
                    let times = times.ok_or_else(|| {
                        format!(
                            "ladder step {part:?} never ends: give a count from 1 to {MAX_REPEATS}"
                        )
                    })?;
                    (name.trim(), times)
                }
                None => (part, 1),
            };
            if times > MAX_REPEATS {
                return Err(format!(
                    "ladder step {part:?}: at most {MAX_REPEATS} repeats, so that the ladder ends"
                ));
            }
            let action: Action = name.parse()?;
            steps.push(Step { action, times });
        }
        let ladder = Ladder(steps);
        ladder.validate()?;
        Ok(ladder)
    }
}

impl Ladder {
    pub fn validate(&self) -> Result<(), String> {
        if self.0.is_empty() {
            return Err(
                "the ladder is empty: give at least one action (none for events only)".into(),
            );
        }
        if self.0.len() > MAX_STEPS {
            return Err(format!(
                "the ladder has {} steps; at most {MAX_STEPS}",
                self.0.len()
            ));
        }
        for step in &self.0 {
            if step.times == 0 || step.times > MAX_REPEATS {
                return Err(format!(
                    "ladder step {}*{}: give a count from 1 to {MAX_REPEATS}",
                    step.action, step.times
                ));
            }
        }
        // Nothing runs after the VM has left the host or the host is off.
        if let Some(index) = self
            .0
            .iter()
            .position(|step| matches!(step.action, Action::FailoverVm | Action::FenceHost))
        {
            if index + 1 < self.0.len() {
                return Err(format!(
                    "ladder: {} must be the last step (the VM is not here any more after it)",
                    self.0[index].action
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for Ladder {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|step| match step.times {
                1 => step.action.to_string(),
                times => format!("{}*{times}", step.action),
            })
            .collect();
        formatter.write_str(&parts.join(","))
    }
}

/// One monitor of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Monitor {
    /// Unique within the VM (`m1`, `m2` …, or built-in names such as `stall`).
    pub id: String,
    pub check: Check,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive failed probes before the ladder's next step.
    pub failures: u32,
    pub ladder: Ladder,
    /// The command `restart-app` runs in the guest (through `/bin/sh -c`).
    pub restart_command: Option<String>,
    /// Added by Ferry to every VM rather than by the user.
    #[serde(default)]
    pub builtin: bool,
}

impl Monitor {
    pub fn validate(&self) -> Result<(), String> {
        let id = &self.id;
        if id.is_empty()
            || id.len() > 32
            || !id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "monitor id {id:?}: 1 to 32 lowercase letters, digits or dashes"
            ));
        }
        if self.interval_ms == 0 {
            return Err("interval: must be more than zero".into());
        }
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return Err(format!(
                "interval {} ms: must be between {MIN_INTERVAL_MS} ms and 1 h",
                self.interval_ms
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "timeout {} ms: must be more than zero and at most the interval ({} ms)",
                self.timeout_ms, self.interval_ms
            ));
        }
        if self.failures == 0 || self.failures > MAX_FAILURES {
            return Err(format!(
                "failures {}: must be between 1 and {MAX_FAILURES}",
                self.failures
            ));
        }
        self.ladder.validate()?;
        if self.check.layer() == "host" {
            return match self.ladder.0.iter().find(|step| {
                !matches!(
                    step.action,
                    Action::MigrateAway | Action::FenceHost | Action::None
                )
            }) {
                Some(step) => Err(format!(
                    "{}: a host monitor moves the VMs the fault affects (migrate-away), has the host fenced (fence-host) or only reports (none)",
                    step.action
                )),
                None => Ok(()),
            };
        }
        if self.ladder.contains(Action::FenceHost) {
            return Err(
                "fence-host is not an action of a VM's monitor; fail the VM over instead (failover-vm)"
                    .into(),
            );
        }
        if self.ladder.contains(Action::RestartApp) {
            match &self.restart_command {
                Some(command) if !command.trim().is_empty() => {}
                _ => {
                    return Err(
                        "restart-app needs a restart command (--restart-command), and the VM's image has none"
                            .into(),
                    )
                }
            }
        }
        Ok(())
    }

    /// How long a fault takes to act on at the least: `failures` probes, one interval
    /// apart.
    pub fn detection_ms(&self) -> u64 {
        self.interval_ms * u64::from(self.failures)
    }
}

/// A VM's monitors as the user configured them (`vms/NAME/monitors`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorSet {
    pub version: u32,
    pub monitors: Vec<Monitor>,
}

impl MonitorSet {
    /// The next free `mN` id.
    pub fn next_id(&self) -> String {
        (1..)
            .map(|number| format!("m{number}"))
            .find(|id| self.monitors.iter().all(|monitor| &monitor.id != id))
            .unwrap_or_else(|| "m0".into())
    }

    /// Whether `monitor` may join this set: the per-VM limits (`validate` checks the
    /// monitor itself).
    pub fn check_addition(&self, monitor: &Monitor) -> Result<(), String> {
        if self.monitors.len() >= MAX_VM_MONITORS {
            return Err(format!(
                "the VM already has {} monitors, the limit of {MAX_VM_MONITORS}; remove one first",
                self.monitors.len()
            ));
        }
        if monitor.interval_ms < MIN_VM_MONITOR_INTERVAL_MS {
            return Err(format!(
                "interval {} ms: a VM monitor probes at most once every {MIN_VM_MONITOR_INTERVAL_MS} ms",
                monitor.interval_ms
            ));
        }
        Ok(())
    }
}

/// The monitors every VM has without asking: a stalled guest is reset before anything
/// else can fail its service over (REFERENCE §2), and a QEMU whose monitor stopped
/// answering is restarted.
pub fn builtin_monitors() -> Vec<Monitor> {
    vec![
        Monitor {
            id: "qemu".into(),
            check: Check::Qemu,
            interval_ms: 2_000,
            timeout_ms: 2_000,
            failures: 5,
            ladder: Ladder(vec![Step {
                action: Action::RestartVm,
                times: 1,
            }]),
            restart_command: None,
            builtin: true,
        },
        Monitor {
            id: "stall".into(),
            check: Check::Stall,
            interval_ms: 2_000,
            timeout_ms: 2_000,
            failures: 5,
            ladder: Ladder(vec![
                Step {
                    action: Action::ResetVm,
                    times: 1,
                },
                Step {
                    action: Action::RestartVm,
                    times: 1,
                },
            ]),
            restart_command: None,
            builtin: true,
        },
    ]
}

/// The host monitors an agent runs when its config names none: the carrier of each
/// network's interface (a dead business link moves the VMs away; the others only
/// report, since the lease and the migration's own errors cover them), a timed write on
/// each pool (the VMs with disks there move away) and on the host's run directory.
pub fn default_host_monitors(
    networks: &[(String, String)],
    pools: &[(String, PathBuf, bool)],
    run_dir: PathBuf,
    can_fence: bool,
) -> Vec<Monitor> {
    let step = |action| Ladder(vec![Step { action, times: 1 }]);
    let once = |action| Step { action, times: 1 };
    let mut monitors = Vec::new();
    for (network, interface) in networks {
        monitors.push(Monitor {
            id: format!("carrier-{network}"),
            check: Check::Carrier {
                network: network.clone(),
                interface: interface.clone(),
            },
            interval_ms: 1_000,
            timeout_ms: 1_000,
            failures: 2,
            ladder: step(if network == "business" {
                Action::MigrateAway
            } else {
                Action::None
            }),
            restart_command: None,
            builtin: true,
        });
    }
    // Storage is judged slowly: a busy disk must not look like a stuck one.
    for (pool, path, shared) in pools {
        // VMs whose shared pool is stuck on this host cannot finish a migration (their
        // last writes never drain): the host is fenced so they restart elsewhere.
        let mut ladder = vec![once(Action::MigrateAway)];
        if *shared && can_fence {
            ladder.push(once(Action::FenceHost));
        }
        monitors.push(Monitor {
            id: format!("storage-{pool}"),
            check: Check::Storage {
                pool: pool.clone(),
                path: path.clone(),
            },
            interval_ms: 5_000,
            timeout_ms: 5_000,
            failures: 3,
            ladder: Ladder(ladder),
            restart_command: None,
            builtin: true,
        });
    }
    monitors.push(Monitor {
        id: "local-disk".into(),
        check: Check::LocalDisk { path: run_dir },
        interval_ms: 5_000,
        timeout_ms: 5_000,
        failures: 3,
        ladder: step(Action::MigrateAway),
        restart_command: None,
        builtin: true,
    });
    monitors
}

/// Where a monitor stands. Written as the lowercase word; what an agent acts on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MonitorState {
    /// Its last probe passed.
    Ok,
    /// Probes fail, but fewer than its failure count.
    Failing,
    /// Down: its ladder acts.
    Down,
    /// Waiting for the guest to come back after an action.
    Waiting,
    /// Not probed yet.
    #[default]
    Unknown,
    /// Held off: what it probes cannot answer (a guest without a guest agent).
    Off,
}

impl MonitorState {
    pub fn as_str(self) -> &'static str {
        match self {
            MonitorState::Ok => "ok",
            MonitorState::Failing => "failing",
            MonitorState::Down => "down",
            MonitorState::Waiting => "waiting",
            MonitorState::Unknown => "unknown",
            MonitorState::Off => "off",
        }
    }
}

impl std::fmt::Display for MonitorState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The state of one monitor as its host last saw it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorHealth {
    pub id: String,
    pub check: String,
    pub state: MonitorState,
    pub failures: u32,
    pub last_error: Option<String>,
    /// The last action taken for the current fault, if any.
    pub last_action: Option<String>,
    pub since_ms: u64,
}

impl MonitorHealth {
    /// A monitor not probed yet.
    pub fn unknown(monitor: &Monitor, now_ms: u64) -> MonitorHealth {
        MonitorHealth {
            id: monitor.id.clone(),
            check: monitor.check.to_string(),
            state: MonitorState::Unknown,
            since_ms: now_ms,
            ..MonitorHealth::default()
        }
    }

    /// Takes in a probe's outcome; `true` if anything worth writing changed (an action
    /// always is).
    pub fn update(
        &mut self,
        state: MonitorState,
        failures: u32,
        error: Option<String>,
        action: Option<Action>,
        now_ms: u64,
    ) -> bool {
        if self.state == state && self.failures == failures && action.is_none() {
            return false;
        }
        if self.state != state {
            self.since_ms = now_ms;
        }
        self.state = state;
        self.failures = failures;
        if error.is_some() || state == MonitorState::Ok {
            self.last_error = error;
        }
        if let Some(action) = action {
            self.last_action = Some(action.to_string());
        }
        true
    }
}

/// Takes a probe's outcome into the entry of monitor `id`; `true` if it changed.
pub fn update_health(
    monitors: &mut [MonitorHealth],
    id: &str,
    state: MonitorState,
    failures: u32,
    error: Option<String>,
    action: Option<Action>,
    now_ms: u64,
) -> bool {
    monitors
        .iter_mut()
        .find(|entry| entry.id == id)
        .is_some_and(|entry| entry.update(state, failures, error, action, now_ms))
}

/// Every monitor of a host, written by its agent on each change (`hosts/NAME/health`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostHealth {
    pub version: u32,
    pub monitors: Vec<MonitorHealth>,
}

/// Every monitor of a VM, written by its host on each change (`vms/NAME/health`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHealth {
    pub version: u32,
    pub host: String,
    pub monitors: Vec<MonitorHealth>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn monitor(ladder: &str) -> Monitor {
        Monitor {
            id: "m1".into(),
            check: Check::Http {
                port: 8080,
                path: "/health".into(),
                via: Via::Host,
            },
            interval_ms: 2000,
            timeout_ms: 1000,
            failures: 3,
            ladder: ladder.parse().unwrap(),
            restart_command: Some("/sbin/ferry-guest-ctl restart".into()),
            builtin: false,
        }
    }

    #[test]
    fn a_ladder_reads_and_prints_with_repeats() {
        let ladder: Ladder = "restart-app*2, reset-vm,failover-vm".parse().unwrap();
        assert_eq!(ladder.to_string(), "restart-app*2,reset-vm,failover-vm");
        let attempts: Vec<Option<Action>> = (0..5).map(|index| ladder.attempt(index)).collect();
        assert_eq!(
            attempts,
            [
                Some(Action::RestartApp),
                Some(Action::RestartApp),
                Some(Action::ResetVm),
                Some(Action::FailoverVm),
                None
            ]
        );
        assert_eq!("restart-app×3".parse::<Ladder>().unwrap().0[0].times, 3);
    }

    #[test]
    fn bad_ladders_are_refused_with_the_reason() {
        let error = |text: &str| text.parse::<Ladder>().unwrap_err();
        assert!(error("restart-app,reboot").contains("unknown action \"reboot\""));
        assert!(error("restart-app*inf").contains("never ends"));
        assert!(error("restart-app*0,reset-vm").contains("never ends"));
        assert!(error("restart-app*50").contains("at most 10"));
        assert!(error("restart-app,,reset-vm").contains("empty step"));
        assert!(error("").contains("empty step"));
        assert!(error("failover-vm,reset-vm").contains("must be the last step"));
        assert!(error("restart-app*two").contains("not a count"));
    }

    #[test]
    fn bad_monitors_are_refused_at_create_time() {
        assert!(monitor("restart-app*2,reset-vm").validate().is_ok());
        let zero = Monitor {
            interval_ms: 0,
            ..monitor("reset-vm")
        };
        assert!(zero.validate().unwrap_err().contains("more than zero"));
        let slow = Monitor {
            timeout_ms: 3000,
            ..monitor("reset-vm")
        };
        assert!(slow
            .validate()
            .unwrap_err()
            .contains("at most the interval"));
        let no_command = Monitor {
            restart_command: None,
            ..monitor("restart-app")
        };
        assert!(no_command
            .validate()
            .unwrap_err()
            .contains("restart command"));
        assert!(monitor("fence-host")
            .validate()
            .unwrap_err()
            .contains("not an action"));
        let never = Monitor {
            failures: 0,
            ..monitor("reset-vm")
        };
        assert!(never.validate().is_err());
        for builtin in builtin_monitors() {
            builtin.validate().unwrap();
        }
        let host_defaults = default_host_monitors(
            &[
                ("business".into(), "biz0".into()),
                ("management".into(), "mgmt0".into()),
            ],
            &[("shared".into(), "/srv/shared".into(), true)],
            "/run/ferry".into(),
            true,
        );
        assert_eq!(host_defaults.len(), 4);
        assert_eq!(
            host_defaults[2].ladder.to_string(),
            "migrate-away,fence-host"
        );
        for monitor in &host_defaults {
            monitor.validate().unwrap();
        }
        let reset_a_host = Monitor {
            check: Check::Carrier {
                network: "business".into(),
                interface: "biz0".into(),
            },
            ..monitor("reset-vm")
        };
        assert!(reset_a_host
            .validate()
            .unwrap_err()
            .contains("host monitor"));
    }

    #[test]
    fn checks_parse_from_kind_and_target() {
        assert_eq!(
            Check::parse("http", Some("8080/health"), Via::Host),
            Ok(Check::Http {
                port: 8080,
                path: "/health".into(),
                via: Via::Host
            })
        );
        assert_eq!(
            Check::parse("http", Some("/"), Via::Guest),
            Ok(Check::Http {
                port: 80,
                path: "/".into(),
                via: Via::Guest
            })
        );
        assert_eq!(
            Check::parse("tcp", Some(":22"), Via::Host),
            Ok(Check::Tcp {
                port: 22,
                via: Via::Host
            })
        );
        assert!(Check::parse("tcp", Some("70000"), Via::Host)
            .unwrap_err()
            .contains("1 to 65535"));
        assert!(Check::parse("process", None, Via::Host)
            .unwrap_err()
            .contains("needs --target"));
        assert!(Check::parse("heartbeat", Some("x"), Via::Host)
            .unwrap_err()
            .contains("takes no target"));
        assert!(Check::parse("ping", None, Via::Host)
            .unwrap_err()
            .contains("unknown monitor kind"));
        assert_eq!(
            Check::parse("process", Some("ferry-guest"), Via::Host)
                .unwrap()
                .to_string(),
            "process ferry-guest"
        );
    }

    #[test]
    fn health_changes_only_when_the_state_the_count_or_an_action_does() {
        let mut health = MonitorHealth::unknown(&monitor("reset-vm"), 1);
        assert_eq!((health.state, health.since_ms), (MonitorState::Unknown, 1));
        assert!(health.update(MonitorState::Ok, 0, None, None, 2));
        assert!(
            !health.update(MonitorState::Ok, 0, None, None, 3),
            "nothing new"
        );
        assert!(health.update(MonitorState::Failing, 1, Some("refused".into()), None, 4));
        assert_eq!(health.since_ms, 4);
        assert!(health.update(
            MonitorState::Down,
            0,
            Some("refused".into()),
            Some(Action::ResetVm),
            5
        ));
        assert!(
            health.update(MonitorState::Down, 0, None, Some(Action::ResetVm), 6),
            "an action is news"
        );
        assert_eq!(
            health.last_error.as_deref(),
            Some("refused"),
            "kept until ok"
        );
        assert!(health.update(MonitorState::Ok, 0, None, None, 7));
        assert_eq!(
            (health.last_error, health.last_action.as_deref()),
            (None, Some("reset-vm"))
        );
    }

    #[test]
    fn new_monitors_take_the_first_free_id() {
        let mut set = MonitorSet::default();
        assert_eq!(set.next_id(), "m1");
        set.monitors.push(monitor("reset-vm"));
        assert_eq!(set.next_id(), "m2");
    }
}
