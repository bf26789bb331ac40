//! The host's own monitors: each network's link (carrier), addresses that must answer
//! ping, and I/O on each pool and on the host's own disk. A fault moves away only the
//! VMs it affects — a dead business link the VMs with NICs, a stuck pool the VMs with a
//! disk on it — by live migration over the migration network ("failover without
//! stopping"). The same pure [`Tracker`] as the VM monitors decides when to act.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::ops::{ClusterApi, VmEntry};
use ferry_api::types::MigrateRequest;
use ferry_manager::monitor::{Tracker, Verdict};
use ferry_model::cluster::{now_ms, PowerState};
use ferry_model::events::EventKind;
use ferry_model::ha::FenceRequest;
use ferry_model::monitor::{
    update_health, Action, Check, HostHealth, Monitor, MonitorHealth, MonitorState,
};
use ferry_store::Store;
use tokio::sync::Mutex;

use crate::runtime::Runtime;

/// Runs every host monitor until the agent stops.
pub async fn run_forever(
    monitors: Vec<Monitor>,
    store: Store,
    runtime: Arc<Runtime>,
    api: Arc<ClusterApi>,
) {
    let health = Arc::new(Mutex::new(HostHealth {
        version: 1,
        monitors: monitors
            .iter()
            .map(|monitor| MonitorHealth::unknown(monitor, now_ms()))
            .collect(),
    }));
    let mut tasks = tokio::task::JoinSet::new();
    for monitor in monitors {
        let host = HostWatch {
            store: store.clone(),
            runtime: runtime.clone(),
            api: api.clone(),
            health: health.clone(),
            io: Arc::default(),
        };
        tasks.spawn(host.run(monitor));
    }
    while tasks.join_next().await.is_some() {}
}

struct HostWatch {
    store: Store,
    runtime: Arc<Runtime>,
    api: Arc<ClusterApi>,
    health: Arc<Mutex<HostHealth>>,
    /// When the I/O probe still in flight started: a stuck write is not piled on.
    io: Arc<std::sync::Mutex<Option<Instant>>>,
}

impl HostWatch {
    async fn run(self, monitor: Monitor) {
        let mut ticker = tokio::time::interval(Duration::from_millis(monitor.interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut tracker = Tracker::default();
        loop {
            ticker.tick().await;
            let outcome = self.probe(&monitor).await;
            let passed = outcome.is_ok();
            let verdict = tracker.observe(&monitor, passed, now_ms());
            self.set_health(
                &monitor,
                tracker.state(),
                tracker.failures,
                outcome.clone().err(),
            )
            .await;
            let me = &self.runtime.config.host;
            match verdict {
                Verdict::Healthy
                | Verdict::Failing { .. }
                | Verdict::StillDown
                | Verdict::LostProbe { .. } => {}
                Verdict::Act {
                    action,
                    attempt,
                    detected_after_ms,
                } => {
                    self.event(
                        EventKind::MonitorDown,
                        &format!(
                            "host {me}: monitor {} ({}) down after {} failed probe(s) in {:.1} s ({}); {action} (attempt {attempt} of ladder {})",
                            monitor.id,
                            monitor.check,
                            monitor.failures,
                            detected_after_ms as f64 / 1000.0,
                            outcome.clone().err().unwrap_or_default(),
                            monitor.ladder,
                        ),
                    )
                    .await;
                    let started = Instant::now();
                    let result = self.act(&monitor, action).await;
                    self.event(
                        EventKind::MonitorAction,
                        &format!(
                            "host {me}: monitor {} ({}) down after {} failed probe(s) in {:.1} s ({}); {action} (attempt {attempt} of ladder {}): {result} in {:.1} s",
                            monitor.id,
                            monitor.check,
                            monitor.failures,
                            detected_after_ms as f64 / 1000.0,
                            outcome.err().unwrap_or_default(),
                            monitor.ladder,
                            started.elapsed().as_secs_f64()
                        ),
                    )
                    .await;
                    ticker.reset();
                }
                Verdict::Exhausted { attempts } => {
                    self.event(
                        EventKind::MonitorExhausted,
                        &format!(
                            "host {me}: monitor {} ({}) is still down after its whole ladder ({attempts} attempts); watching only",
                            monitor.id, monitor.check
                        ),
                    )
                    .await
                }
                Verdict::Recovered { down_ms, .. } => {
                    self.event(
                        EventKind::MonitorRecovered,
                        &format!(
                            "host {me}: monitor {} ({}) passes again {:.1} s after its first failed probe",
                            monitor.id,
                            monitor.check,
                            down_ms as f64 / 1000.0
                        ),
                    )
                    .await
                }
            }
        }
    }

    async fn probe(&self, monitor: &Monitor) -> Result<(), String> {
        let timeout = Duration::from_millis(monitor.timeout_ms);
        match &monitor.check {
            Check::Carrier { interface, .. } => {
                let output =
                    command(timeout, "ip", &["-o", "link", "show", "dev", interface]).await?;
                has_carrier(&output)
                    .then_some(())
                    .ok_or_else(|| format!("{interface} has no carrier"))
            }
            Check::Ping { address, .. } => {
                let seconds = monitor.timeout_ms.div_ceil(1000).max(1).to_string();
                command(timeout, "ping", &["-c", "1", "-W", &seconds, address])
                    .await
                    .map(drop)
                    .map_err(|_| format!("{address} does not answer ping"))
            }
            Check::Storage { path, .. } | Check::LocalDisk { path } => {
                self.timed_io(path, timeout).await
            }
            other => Err(format!("{other} is not a host check")),
        }
    }

    /// Writes, syncs and reads back a small file on `dir` in a thread of its own: a
    /// stuck write blocks that thread, not the agent, and counts as failed after
    /// `timeout`; while it stays stuck, no second write is started.
    async fn timed_io(&self, dir: &Path, timeout: Duration) -> Result<(), String> {
        {
            let Ok(mut in_flight) = self.io.lock() else {
                return Err("I/O probe state poisoned".into());
            };
            if let Some(started) = *in_flight {
                return Err(format!(
                    "a write to {} has been stuck for {:.1} s",
                    dir.display(),
                    started.elapsed().as_secs_f64()
                ));
            }
            *in_flight = Some(Instant::now());
        }
        let file = dir
            .join(".ferry")
            .join(format!("probe-{}", self.runtime.config.host));
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let in_flight = self.io.clone();
        std::thread::spawn(move || {
            let result = write_and_read(&file);
            if let Ok(mut in_flight) = in_flight.lock() {
                *in_flight = None;
            }
            // The probe's caller gave up waiting (timeout): nobody wants the answer.
            if sender.send(result).is_err() {
                tracing::debug!("storage probe answered after its timeout");
            }
        });
        match tokio::time::timeout(timeout, receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the I/O probe thread ended without an answer".into()),
            Err(_) => Err(format!(
                "a write to {} did not complete within {} ms",
                dir.display(),
                timeout.as_millis()
            )),
        }
    }

    async fn act(&self, monitor: &Monitor, action: Action) -> String {
        match action {
            Action::MigrateAway => self.migrate_away(&monitor.check).await,
            Action::FenceHost => self.ask_to_be_fenced(monitor).await,
            Action::None => "no action (events only)".into(),
            other => format!("{other} is not a host monitor's action"),
        }
    }

    /// Asks the leader to power this host off through its fence device; the VMs then
    /// restart elsewhere as after any host failure.
    async fn ask_to_be_fenced(&self, monitor: &Monitor) -> String {
        let me = &self.runtime.config.host;
        let request = FenceRequest {
            version: 1,
            host: me.clone(),
            reason: format!("monitor {} ({}) stayed down", monitor.id, monitor.check),
            at_ms: now_ms(),
        };
        match self
            .store
            .put(&self.store.keys().fence_request(me), &request, None)
            .await
        {
            Ok(_) => format!("asked the leader to power {me} off through its fence device"),
            Err(error) => format!("cannot ask to be fenced: {error}"),
        }
    }

    /// Starts a live migration of every VM here that the fault affects.
    async fn migrate_away(&self, check: &Check) -> String {
        let me = &self.runtime.config.host;
        let entries = match self.api.vm_entries().await {
            Ok(entries) => entries,
            Err(error) => return format!("cannot read the VMs: {error}"),
        };
        let mut started = Vec::new();
        let mut failed = Vec::new();
        for entry in entries.values() {
            let Some(vm) = affected_here(entry, me, check) else {
                continue;
            };
            let request = MigrateRequest {
                mode: Some("live".into()),
                ..MigrateRequest::default()
            };
            match self.api.migrate_vm(&vm, request).await {
                Ok(op) => started.push(format!("{vm} (op {})", op.id)),
                Err(error) => failed.push(format!("{vm}: {error}")),
            }
        }
        match (started.is_empty(), failed.is_empty()) {
            (true, true) => "no VM here is affected".into(),
            (false, true) => format!("live migration of {} started", started.join(", ")),
            _ => format!(
                "live migration of [{}] started; [{}] could not start",
                started.join(", "),
                failed.join("; ")
            ),
        }
    }

    async fn set_health(
        &self,
        monitor: &Monitor,
        state: MonitorState,
        failures: u32,
        error: Option<String>,
    ) {
        let snapshot = {
            let mut health = self.health.lock().await;
            let id = &monitor.id;
            if !update_health(
                &mut health.monitors,
                id,
                state,
                failures,
                error,
                None,
                now_ms(),
            ) {
                return;
            }
            health.clone()
        };
        let key = self.store.keys().host_health(&self.runtime.config.host);
        if let Err(error) = self.store.put(&key, &snapshot, None).await {
            tracing::debug!("cannot write the host's health: {error}");
        }
    }

    async fn event(&self, kind: EventKind, message: &str) {
        tracing::info!("{message}");
        let subject = format!("host/{}", self.runtime.config.host);
        self.api.events().record(&subject, kind, message).await;
    }
}

/// `ip -o link show` says the link is up at both ends.
fn has_carrier(output: &str) -> bool {
    let flags = output
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags)
        .unwrap_or("");
    let flags: Vec<&str> = flags.split(',').collect();
    flags.contains(&"UP") && flags.contains(&"LOWER_UP")
}

/// The VM's name if it runs here, is not migrating, and the fault `check` found
/// affects it.
fn affected_here(entry: &VmEntry, me: &ferry_model::HostName, check: &Check) -> Option<String> {
    let record = &entry.record.as_ref()?.value;
    let placement = &entry.placement.as_ref()?.value;
    if &placement.host != me
        || placement.migration.is_some()
        || record.desired != PowerState::Running
        || record.deleting
    {
        return None;
    }
    let affected = match check {
        Check::Carrier { network, .. } | Check::Ping { network, .. } if network == "business" => {
            !record.spec.nics.is_empty()
        }
        Check::Storage { path, .. } => record
            .spec
            .disks
            .iter()
            .any(|disk| disk.path.starts_with(path)),
        _ => true,
    };
    affected.then(|| record.spec.name.to_string())
}

fn write_and_read(file: &PathBuf) -> Result<(), String> {
    use std::io::Write;
    let payload = format!("ferry I/O probe {}\n", now_ms()).repeat(64);
    let fail = |what: &str, error: std::io::Error| format!("{what} {}: {error}", file.display());
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|error| fail("cannot create the directory of", error))?;
    }
    let mut handle = std::fs::File::create(file).map_err(|error| fail("cannot create", error))?;
    handle
        .write_all(payload.as_bytes())
        .and_then(|_| handle.sync_all())
        .map_err(|error| fail("cannot write", error))?;
    let read = std::fs::read(file).map_err(|error| fail("cannot read", error))?;
    if read != payload.as_bytes() {
        return Err(format!("{} reads back different bytes", file.display()));
    }
    Ok(())
}

/// Runs a command with a time limit; its stdout when it exits 0.
async fn command(timeout: Duration, program: &str, args: &[&str]) -> Result<String, String> {
    let run = tokio::process::Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(output)) if output.status.success() => {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        }
        Ok(Ok(output)) => Err(format!(
            "{program}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Ok(Err(error)) => Err(format!("cannot run {program}: {error}")),
        Err(_) => Err(format!(
            "{program} took more than {} ms",
            timeout.as_millis()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carrier_needs_the_link_up_at_both_ends() {
        let up = "4: biz0@if4981: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 state UP";
        let down = "4: biz0@if4981: <BROADCAST,MULTICAST> mtu 1500 state DOWN";
        let peer_down = "4: biz0@if4981: <NO-CARRIER,BROADCAST,MULTICAST,UP> mtu 1500";
        assert!(has_carrier(up));
        assert!(!has_carrier(down));
        assert!(!has_carrier(peer_down));
        assert!(!has_carrier(""));
    }

    #[test]
    fn the_io_probe_writes_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".ferry").join("probe-host1");
        write_and_read(&file).unwrap();
        let missing = PathBuf::from("/proc/ferry-no-such-dir/probe");
        assert!(write_and_read(&missing)
            .unwrap_err()
            .contains("cannot create"));
    }
}
