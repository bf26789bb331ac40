//! The monitors of the VMs running here: every VM's built-in ones (QEMU answering, the
//! guest not stalled) and those its user added (`vms/NAME/monitors`). Each monitor is
//! a task that probes, hands the outcome to the pure [`Tracker`], and carries out the
//! ladder step it decides; every detection, action and recovery is an event, and the
//! monitors' current state is written to `vms/NAME/health` when it changes.
//!
//! A monitor's ladder position outlives the QEMU it watched, so a `restart-vm` that did
//! not help is followed by the next step rather than by the first one again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::ops::{ClusterApi, VmEntry};
use ferry_api::types::MigrateRequest;
use ferry_manager::monitor::{Tracker, Verdict};
use ferry_model::cluster::now_ms;
use ferry_model::events::EventKind;
use ferry_model::ha::LeaveHost;
use ferry_model::monitor::{
    builtin_monitors, update_health, Action, Check, Monitor, MonitorHealth, MonitorState, Via,
    VmHealth,
};
use ferry_model::{HostName, VmName};
use ferry_qemu::{Machine, RunState};
use ferry_store::Store;
use tokio::task::JoinSet;

use crate::runtime::Runtime;

/// How long a monitor of the guest waits for the guest agent before it starts counting.
const GUEST_BOOT_GRACE: Duration = Duration::from_secs(120);
/// How long `restart-app`'s command may run.
const RESTART_APP_TIMEOUT: Duration = Duration::from_secs(30);

type Trackers = Arc<Mutex<HashMap<(VmName, String), Tracker>>>;

/// The running monitor tasks, one group per local VM.
#[derive(Default)]
pub struct Supervisor {
    groups: HashMap<VmName, Group>,
    trackers: Trackers,
}

struct Group {
    /// QEMU pid and the monitors' etcd revision the tasks were started for.
    pid: i32,
    revision: i64,
    tasks: JoinSet<()>,
}

/// A VM placed and running here, with the monitors it should have.
struct Wanted {
    machine: Arc<Machine>,
    revision: i64,
    monitors: Vec<Monitor>,
    ip: Option<String>,
    generation: u64,
}

/// What one monitor task needs.
#[derive(Clone)]
struct Watch {
    vm: VmName,
    me: HostName,
    ip: Option<String>,
    generation: u64,
    machine: Arc<Machine>,
    store: Store,
    runtime: Arc<Runtime>,
    api: Arc<ClusterApi>,
    trackers: Trackers,
    health: Arc<tokio::sync::Mutex<VmHealth>>,
    /// A monitor reset or restarted the guest and its agent has not answered since:
    /// the other monitors of the guest wait instead of counting the boot as a fault.
    rebooting: Arc<std::sync::atomic::AtomicBool>,
    /// The guest agent has answered since this QEMU started: the guest has one.
    agent_seen: Arc<std::sync::atomic::AtomicBool>,
}

impl Supervisor {
    /// Starts the monitors of the VMs placed and running here, restarts those whose
    /// QEMU or monitor list changed, and stops those of VMs that left.
    pub async fn sync(
        &mut self,
        view: &BTreeMap<String, VmEntry>,
        store: &Store,
        runtime: &Arc<Runtime>,
        api: &Arc<ClusterApi>,
    ) {
        let me = runtime.config.host.clone();
        let mut wanted: HashMap<VmName, Wanted> = HashMap::new();
        for entry in view.values() {
            let (Some(record), Some(placement)) = (&entry.record, &entry.placement) else {
                continue;
            };
            let placed_here = placement.value.host == me && placement.value.migration.is_none();
            let running = record.value.desired == ferry_model::cluster::PowerState::Running
                && !record.value.deleting;
            if !placed_here || !running {
                continue;
            }
            let vm = record.value.spec.name.clone();
            let Some(machine) = runtime.machine(&vm).await else {
                continue;
            };
            if machine.has_exited() {
                continue;
            }
            let (revision, configured) = entry
                .monitors
                .as_ref()
                .map(|set| (set.mod_revision, set.value.monitors.clone()))
                .unwrap_or((0, Vec::new()));
            let mut monitors = builtin_monitors();
            monitors.extend(configured);
            wanted.insert(
                vm,
                Wanted {
                    machine,
                    revision,
                    monitors,
                    ip: record.value.ip.clone(),
                    generation: placement.value.generation,
                },
            );
        }

        self.groups.retain(|vm, group| {
            let keep = wanted.get(vm).is_some_and(|wanted| {
                wanted.machine.pid() == group.pid && wanted.revision == group.revision
            });
            if !keep {
                group.tasks.abort_all();
            }
            keep
        });
        if let Ok(mut trackers) = self.trackers.lock() {
            trackers.retain(|(vm, _), _| wanted.contains_key(vm));
        }
        for (
            vm,
            Wanted {
                machine,
                revision,
                monitors,
                ip,
                generation,
            },
        ) in wanted
        {
            if self.groups.contains_key(&vm) {
                continue;
            }
            let health = VmHealth {
                version: 1,
                host: me.to_string(),
                monitors: monitors
                    .iter()
                    .map(|monitor| MonitorHealth::unknown(monitor, now_ms()))
                    .collect(),
            };
            let watch = Watch {
                vm: vm.clone(),
                me: me.clone(),
                ip,
                generation,
                machine: machine.clone(),
                store: store.clone(),
                runtime: runtime.clone(),
                api: api.clone(),
                trackers: self.trackers.clone(),
                health: Arc::new(tokio::sync::Mutex::new(health)),
                rebooting: Arc::default(),
                agent_seen: Arc::default(),
            };
            let mut tasks = JoinSet::new();
            for monitor in monitors {
                tasks.spawn(watch.clone().run(monitor));
            }
            self.groups.insert(
                vm,
                Group {
                    pid: machine.pid(),
                    revision,
                    tasks,
                },
            );
        }
    }
}

/// A probe's outcome: passed, failed with the evidence, or not applicable now (a
/// paused or migrating guest is not stalled).
enum Probe {
    Passed,
    Failed(String),
    NotApplicable,
}

impl Watch {
    async fn run(self, monitor: Monitor) {
        let needs_agent = matches!(monitor.check, Check::Heartbeat | Check::Stall);
        if needs_agent && !self.machine.spec().guest_agent {
            // Silence is all a guest without an agent can give: never a stall.
            self.set_health(
                &monitor,
                MonitorState::Off,
                0,
                Some("no guest agent".into()),
                None,
            )
            .await;
            return;
        }
        if monitor.check != Check::Qemu && !self.wait_for_guest().await {
            return;
        }
        if needs_agent && !self.wait_for_first_answer(&monitor).await {
            return;
        }
        let interval = Duration::from_millis(monitor.interval_ms);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // An application starts a moment after the guest agent: its failures count once
        // it has passed, or after the grace.
        let mut armed_at = Instant::now() + GUEST_BOOT_GRACE;
        let mut armed = monitor.check.layer() != "application";
        loop {
            ticker.tick().await;
            if self.machine.has_exited() {
                return;
            }
            let rebooting = self.rebooting.load(std::sync::atomic::Ordering::SeqCst);
            let probe = if rebooting && monitor.check != Check::Qemu {
                Probe::NotApplicable
            } else {
                match self.probe(&monitor).await {
                    // The application is down because the whole guest is: that is the
                    // stall monitor's fault to act on (a reset), not a reason to restart
                    // the application or fail it over.
                    Probe::Failed(_)
                        if monitor.check.layer() == "application" && self.guest_silent().await =>
                    {
                        Probe::NotApplicable
                    }
                    probe => probe,
                }
            };
            let (passed, evidence) = match probe {
                Probe::NotApplicable => continue,
                Probe::Passed => {
                    armed = true;
                    (true, None)
                }
                Probe::Failed(_) if !armed && Instant::now() < armed_at => continue,
                Probe::Failed(evidence) => (false, Some(evidence)),
            };
            let key = (self.vm.clone(), monitor.id.clone());
            let (verdict, state, failures) = {
                let Ok(mut trackers) = self.trackers.lock() else {
                    return;
                };
                let tracker = trackers.entry(key).or_default();
                let verdict = tracker.observe(&monitor, passed, now_ms());
                (verdict, tracker.state(), tracker.failures)
            };
            self.set_health(&monitor, state, failures, evidence.clone(), None)
                .await;
            match verdict {
                Verdict::Healthy | Verdict::Failing { .. } | Verdict::StillDown => {}
                Verdict::LostProbe { failures } => tracing::info!(
                    "VM {}: monitor {} lost {failures} probe(s), then passed; no action",
                    self.vm,
                    monitor.id
                ),
                Verdict::Act {
                    action,
                    attempt,
                    detected_after_ms,
                } => {
                    let last = self
                        .act(
                            &monitor,
                            action,
                            attempt,
                            detected_after_ms,
                            evidence.unwrap_or_default(),
                        )
                        .await;
                    if last {
                        return;
                    }
                    if action.reboots_guest() {
                        // The application starts again after the boot.
                        armed = monitor.check.layer() != "application";
                        armed_at = Instant::now() + GUEST_BOOT_GRACE;
                    }
                    // The next probes judge the action, not the fault before it.
                    ticker.reset();
                }
                Verdict::Exhausted { attempts } => {
                    self.event(
                        EventKind::MonitorExhausted,
                        &format!(
                            "VM {}: monitor {} ({}) is still down after its whole ladder ({}, {attempts} attempts); watching only",
                            self.vm, monitor.id, monitor.check, monitor.ladder
                        ),
                    )
                    .await;
                }
                Verdict::Recovered {
                    down_ms,
                    attempts,
                    last_action,
                } => {
                    let after = match last_action {
                        Some(action) => format!(" after {action} ({attempts} action(s))"),
                        None => String::new(),
                    };
                    self.event(
                        EventKind::MonitorRecovered,
                        &format!(
                            "VM {}: monitor {} ({}) passes again {:.1} s after its first failed probe{after}",
                            self.vm,
                            monitor.id,
                            monitor.check,
                            down_ms as f64 / 1000.0
                        ),
                    )
                    .await;
                }
            }
        }
    }

    /// The guest has an agent, and it does not answer now.
    async fn guest_silent(&self) -> bool {
        self.agent_seen.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .machine
                .guest_agent()
                .ping(Duration::from_secs(1))
                .await
                .is_err()
    }

    /// Waits until the guest agent answers; `false` if QEMU exited first.
    async fn wait_for_guest(&self) -> bool {
        let deadline = Instant::now() + GUEST_BOOT_GRACE;
        while Instant::now() < deadline {
            if self.machine.has_exited() {
                return false;
            }
            if self.agent_answers().await {
                self.rebooting
                    .store(false, std::sync::atomic::Ordering::SeqCst);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // A guest without an agent still gets its QEMU and application monitors.
        !self.machine.has_exited()
    }

    /// Holds a heartbeat or stall monitor off until the guest agent has answered once
    /// since QEMU started (a guest that never ran one is not stalled); `false` if QEMU
    /// exited first.
    async fn wait_for_first_answer(&self, monitor: &Monitor) -> bool {
        let mut said = false;
        while !self.agent_seen.load(std::sync::atomic::Ordering::SeqCst) {
            if self.machine.has_exited() {
                return false;
            }
            if !said {
                self.set_health(
                    monitor,
                    MonitorState::Off,
                    0,
                    Some("no guest agent has answered since the start; watching for one".into()),
                    None,
                )
                .await;
                said = true;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            self.agent_answers().await;
        }
        true
    }

    /// Pings the guest agent once; an answer is remembered: this guest has an agent.
    async fn agent_answers(&self) -> bool {
        let answered = self
            .machine
            .guest_agent()
            .ping(Duration::from_secs(1))
            .await
            .is_ok();
        if answered {
            self.agent_seen
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        answered
    }

    async fn probe(&self, monitor: &Monitor) -> Probe {
        let timeout = Duration::from_millis(monitor.timeout_ms);
        let bounded = |result: Result<Result<(), String>, tokio::time::error::Elapsed>| match result
        {
            Ok(Ok(())) => Probe::Passed,
            Ok(Err(error)) => Probe::Failed(error),
            Err(_) => Probe::Failed(format!("no answer within {} ms", monitor.timeout_ms)),
        };
        match &monitor.check {
            Check::Qemu => bounded(
                tokio::time::timeout(timeout, async {
                    self.machine
                        .status()
                        .await
                        .map(drop)
                        .map_err(|error| error.to_string())
                })
                .await,
            ),
            Check::Heartbeat => match self.machine.guest_agent().ping(timeout).await {
                Ok(()) => Probe::Passed,
                Err(error) => Probe::Failed(format!("guest agent: {error}")),
            },
            Check::Stall => match self.machine.guest_agent().ping(timeout).await {
                Ok(()) => Probe::Passed,
                Err(error) => match tokio::time::timeout(timeout, self.machine.status()).await {
                    Ok(Ok(RunState::Running)) => Probe::Failed(format!(
                        "guest agent silent while QEMU runs the guest ({error})"
                    )),
                    _ => Probe::NotApplicable,
                },
            },
            Check::Process { name } => {
                self.in_guest(timeout, "/bin/pidof", &[name.as_str()], || {
                    format!("no process {name} in the guest")
                })
                .await
            }
            Check::Tcp {
                port,
                via: Via::Guest,
            } => {
                let command = format!("nc -w 1 127.0.0.1 {port} </dev/null");
                self.in_guest(timeout, "/bin/sh", &["-c", &command], || {
                    format!("nothing listens on port {port} in the guest")
                })
                .await
            }
            Check::Http {
                port,
                path,
                via: Via::Guest,
            } => {
                let url = format!("http://127.0.0.1:{port}{path}");
                let seconds = monitor.timeout_ms.div_ceil(1000).max(1).to_string();
                self.in_guest(
                    timeout,
                    "/bin/wget",
                    &["-q", "-O", "/dev/null", "-T", &seconds, &url],
                    || format!("GET {url} in the guest failed"),
                )
                .await
            }
            Check::Tcp {
                port,
                via: Via::Host,
            } => {
                let Some(ip) = &self.ip else {
                    return Probe::Failed("the VM has no address to connect to".into());
                };
                let address = format!("{ip}:{port}");
                bounded(
                    tokio::time::timeout(timeout, async {
                        tokio::net::TcpStream::connect(&address)
                            .await
                            .map(drop)
                            .map_err(|error| format!("connect {address}: {error}"))
                    })
                    .await,
                )
            }
            Check::Http {
                port,
                path,
                via: Via::Host,
            } => {
                let Some(ip) = &self.ip else {
                    return Probe::Failed("the VM has no address to connect to".into());
                };
                let url = format!("http://{ip}:{port}{path}");
                bounded(tokio::time::timeout(timeout, http_probe(&url, timeout)).await)
            }
            Check::Carrier { .. }
            | Check::Ping { .. }
            | Check::Storage { .. }
            | Check::LocalDisk { .. } => {
                Probe::Failed(format!("{} is a host check, not a VM's", monitor.check))
            }
        }
    }

    /// Runs a command in the guest; it passes when it exits 0.
    async fn in_guest(
        &self,
        timeout: Duration,
        path: &str,
        args: &[&str],
        failure: impl FnOnce() -> String,
    ) -> Probe {
        match self.machine.guest_agent().exec(path, args, timeout).await {
            Ok(output) if output.exit_code == Some(0) => Probe::Passed,
            Ok(_) => Probe::Failed(failure()),
            Err(error) => Probe::Failed(format!("guest agent: {error}")),
        }
    }

    /// Carries out one ladder step and records it; `true` when this monitor's task
    /// ends with it (the QEMU it watches is gone or going).
    async fn act(
        &self,
        monitor: &Monitor,
        action: Action,
        attempt: u32,
        detected_after_ms: u64,
        evidence: String,
    ) -> bool {
        self.event(
            EventKind::MonitorDown,
            &format!(
                "VM {}: monitor {} ({}) down after {} failed probe(s) in {:.1} s ({evidence}); {action} (attempt {attempt} of ladder {})",
                self.vm,
                monitor.id,
                monitor.check,
                monitor.failures,
                detected_after_ms as f64 / 1000.0,
                monitor.ladder,
            ),
        )
        .await;
        let started = Instant::now();
        self.set_health(
            monitor,
            MonitorState::Down,
            0,
            Some(evidence.clone()),
            Some(action),
        )
        .await;
        if action.reboots_guest() {
            self.rebooting
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let outcome = self.carry_out(monitor, action).await;
        let (result, ends_task) = match outcome {
            Ok((done, ends_task)) => (done, ends_task),
            Err(error) => (format!("failed: {error}"), false),
        };
        self.event(
            EventKind::MonitorAction,
            &format!(
                "VM {vm}: monitor {id} ({check}) down after {failures} failed probe(s) in {detect:.1} s ({evidence}); {action} (attempt {attempt} of ladder {ladder}): {result} in {took:.1} s",
                vm = self.vm,
                id = monitor.id,
                check = monitor.check,
                failures = monitor.failures,
                detect = detected_after_ms as f64 / 1000.0,
                ladder = monitor.ladder,
                took = started.elapsed().as_secs_f64(),
            ),
        )
        .await;
        if action.reboots_guest() && !ends_task {
            // The guest boots again: nothing is judged before its agent answers.
            self.set_health(monitor, MonitorState::Waiting, 0, None, Some(action))
                .await;
            self.wait_for_guest().await;
        }
        ends_task
    }

    /// Returns what was done, and whether the watched QEMU is gone with it.
    async fn carry_out(&self, monitor: &Monitor, action: Action) -> Result<(String, bool), String> {
        let reason = format!("monitor {} ({})", monitor.id, monitor.check);
        match action {
            Action::None => Ok(("no action (events only)".into(), false)),
            Action::RestartApp => {
                let command = monitor
                    .restart_command
                    .as_deref()
                    .ok_or("no restart command")?;
                let output = self
                    .machine
                    .guest_agent()
                    .exec("/bin/sh", &["-c", command], RESTART_APP_TIMEOUT)
                    .await
                    .map_err(|error| format!("guest agent: {error}"))?;
                match output.exit_code {
                    Some(0) => Ok((format!("`{command}` exited 0"), false)),
                    code => Err(format!(
                        "`{command}` exited {}{}",
                        code.map_or("by a signal".into(), |code| code.to_string()),
                        match output.stderr.trim() {
                            "" => String::new(),
                            stderr => format!(": {stderr}"),
                        }
                    )),
                }
            }
            Action::ResetVm => {
                self.machine
                    .reset()
                    .await
                    .map_err(|error| error.to_string())?;
                Ok(("the guest was reset".into(), false))
            }
            Action::RestartVm => {
                self.runtime
                    .expect_exit(&self.vm, format!("restarted by {reason}"));
                self.machine
                    .kill()
                    .await
                    .map_err(|error| error.to_string())?;
                Ok(("QEMU killed; the VM starts again here".into(), true))
            }
            Action::FailoverVm => {
                // The copy here goes first: the leader places the VM elsewhere as soon
                // as the request to leave is written, and it must not find it running.
                self.runtime.mark_leaving(&self.vm, self.generation);
                self.runtime
                    .expect_exit(&self.vm, format!("failed over by {reason}"));
                self.machine
                    .kill()
                    .await
                    .map_err(|error| error.to_string())?;
                let leave = LeaveHost {
                    host: self.me.clone(),
                    generation: self.generation,
                    reason: format!("{reason} failed it over"),
                };
                // Not written: the VM starts here again after the leave grace.
                crate::executor::update_restart_log(&self.store, &self.vm, |log| {
                    log.leave = Some(leave.clone())
                })
                .await
                .map_err(|error| {
                    format!("QEMU killed, but cannot ask to leave {}: {error}", self.me)
                })?;
                Ok((
                    format!(
                        "QEMU killed; the VM restarts on another host than {}",
                        self.me
                    ),
                    true,
                ))
            }
            Action::MigrateAway => {
                let op = self
                    .api
                    .migrate_vm(
                        self.vm.as_str(),
                        MigrateRequest {
                            mode: Some("live".into()),
                            ..MigrateRequest::default()
                        },
                    )
                    .await
                    .map_err(|error| error.to_string())?;
                Ok((
                    format!("live migration {} to another host started", op.id),
                    false,
                ))
            }
            Action::FenceHost => Err("fence-host is not a VM monitor's action".into()),
        }
    }

    async fn set_health(
        &self,
        monitor: &Monitor,
        state: MonitorState,
        failures: u32,
        last_error: Option<String>,
        action: Option<Action>,
    ) {
        let snapshot = {
            let mut health = self.health.lock().await;
            let (id, now) = (&monitor.id, now_ms());
            if !update_health(
                &mut health.monitors,
                id,
                state,
                failures,
                last_error,
                action,
                now,
            ) {
                return;
            }
            health.clone()
        };
        let key = self.store.keys().vm_health(&self.vm);
        if let Err(error) = self.store.put(&key, &snapshot, None).await {
            tracing::debug!("cannot write the health of VM {}: {error}", self.vm);
        }
    }

    async fn event(&self, kind: EventKind, message: &str) {
        tracing::info!("{message}");
        self.api
            .events()
            .record(&self.vm.subject(), kind, message)
            .await;
    }
}

/// One GET from the host: passes on a 2xx. A redirect is the guest's answer, not an
/// address to follow (it could point the root-run probe anywhere): a 3xx fails.
async fn http_probe(url: &str, timeout: Duration) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        // Straight to the VM: a proxy in the agent's environment must not see the probe.
        .no_proxy()
        .build()
        .map_err(|error| error.to_string())?;
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|error| format!("GET {url}: {}", without_url(&error)))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("GET {url}: {}", response.status()))
    }
}

/// reqwest's error without the URL it repeats.
fn without_url(error: &reqwest::Error) -> String {
    let text = error.to_string();
    let mut cause = std::error::Error::source(error);
    let mut deepest = None;
    while let Some(inner) = cause {
        deepest = Some(inner.to_string());
        cause = inner.source();
    }
    deepest.unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every connection with `response`; returns its address.
    async fn serve(response: String) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0; 1024];
                let _read = stream.read(&mut request).await;
                let _written = stream.write_all(response.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn the_http_probe_takes_a_redirect_as_the_answer_and_never_follows_it() {
        let healthy =
            serve("HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()).await;
        let redirecting = serve(format!(
            "HTTP/1.1 302 Found\r\nlocation: http://{healthy}/\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        ))
        .await;
        let timeout = Duration::from_secs(5);
        http_probe(&format!("http://{healthy}/"), timeout)
            .await
            .unwrap();
        let url = format!("http://{redirecting}/health");
        assert_eq!(
            http_probe(&url, timeout).await.unwrap_err(),
            format!("GET {url}: 302 Found")
        );
    }
}
