//! A VM's monitors through the API: add (checked in full before anything is written),
//! list with each monitor's current health, remove. The VM's host starts and stops the
//! monitor tasks when it sees the set change.

use std::time::Duration;

use ferry_model::events::EventKind;
use ferry_model::monitor::{
    builtin_monitors, Check, Ladder, Monitor, MonitorHealth, MonitorSet, MonitorState, Via,
};

use crate::ops::{parse_vm_name, ClusterApi, VmEntry};
use crate::types::{AddMonitorRequest, MonitorView};
use crate::ApiError;

const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_FAILURES: u32 = 3;

impl ClusterApi {
    pub async fn add_monitor(
        &self,
        name: &str,
        request: &AddMonitorRequest,
    ) -> Result<MonitorView, ApiError> {
        let name = parse_vm_name(name)?;
        let (_, record) = self.vm_entry_and_record(&name).await?;
        let image_command = self
            .store()
            .get::<ferry_model::cluster::ImageRecord>(&self.store().keys().image(&record.image))
            .await?
            .and_then(|image| image.value.restart_command);
        let key = self.store().keys().vm_monitors(&name);
        let mut added = None;
        self.store()
            .update(&key, |current: Option<&MonitorSet>| {
                let set = current.cloned().unwrap_or(MonitorSet {
                    version: 1,
                    monitors: Vec::new(),
                });
                let monitor = monitor_from(request, &set, image_command.clone())?;
                if set.monitors.iter().any(|known| known.id == monitor.id)
                    || builtin_monitors()
                        .iter()
                        .any(|known| known.id == monitor.id)
                {
                    return Err(ApiError::Conflict(format!(
                        "VM {name} already has a monitor {}",
                        monitor.id
                    )));
                }
                let mut set = set;
                set.monitors.push(monitor.clone());
                added = Some(monitor);
                Ok(set)
            })
            .await?;
        let monitor = added.ok_or_else(|| ApiError::Internal("no monitor was added".into()))?;
        self.events()
            .record(
                &name.subject(),
                EventKind::MonitorAdded,
                &format!(
                    "VM {name}: monitor {} ({}) every {} ms, {} failure(s), ladder {}",
                    monitor.id,
                    monitor.check,
                    monitor.interval_ms,
                    monitor.failures,
                    monitor.ladder
                ),
            )
            .await;
        Ok(monitor_view(&monitor, None))
    }

    pub async fn list_monitors(&self, name: &str) -> Result<Vec<MonitorView>, ApiError> {
        let name = parse_vm_name(name)?;
        let (entry, _) = self.vm_entry_and_record(&name).await?;
        Ok(monitor_views(&entry))
    }

    pub async fn remove_monitor(&self, name: &str, id: &str) -> Result<(), ApiError> {
        let name = parse_vm_name(name)?;
        if builtin_monitors().iter().any(|known| known.id == id) {
            return Err(ApiError::BadRequest(format!(
                "monitor {id} is built in and cannot be removed"
            )));
        }
        let key = self.store().keys().vm_monitors(&name);
        self.store()
            .update(&key, |current: Option<&MonitorSet>| {
                let mut set = current.cloned().unwrap_or_default();
                let before = set.monitors.len();
                set.monitors.retain(|monitor| monitor.id != id);
                if set.monitors.len() == before {
                    return Err(ApiError::NotFound(format!("VM {name} has no monitor {id}")));
                }
                Ok(set)
            })
            .await?;
        self.events()
            .record(
                &name.subject(),
                EventKind::MonitorRemoved,
                &format!("VM {name}: monitor {id} removed"),
            )
            .await;
        Ok(())
    }
}

/// The monitor a request describes, with the defaults filled in, fully checked.
pub fn monitor_from(
    request: &AddMonitorRequest,
    set: &MonitorSet,
    image_command: Option<String>,
) -> Result<Monitor, ApiError> {
    let bad = ApiError::BadRequest;
    let via = match request.via.as_deref() {
        None | Some("host") => Via::Host,
        Some("guest") => Via::Guest,
        Some(other) => return Err(bad(format!("via {other:?}: expected host or guest"))),
    };
    let check = Check::parse(&request.kind, request.target.as_deref(), via).map_err(bad)?;
    let duration = |field: &str, text: &Option<String>, default: Duration| match text {
        None => Ok(default),
        Some(text) => humantime::parse_duration(text)
            .map_err(|error| bad(format!("{field} {text:?}: {error}"))),
    };
    let interval = duration("interval", &request.interval, DEFAULT_INTERVAL)?;
    let timeout = duration("timeout", &request.timeout, DEFAULT_TIMEOUT.min(interval))?;
    let restart_command = request.restart_command.clone().or(image_command);
    let ladder: Ladder = match &request.ladder {
        Some(text) => text.parse().map_err(bad)?,
        None => default_ladder(&check, restart_command.is_some()),
    };
    let monitor = Monitor {
        id: request.id.clone().unwrap_or_else(|| set.next_id()),
        check,
        interval_ms: interval.as_millis() as u64,
        timeout_ms: timeout.as_millis() as u64,
        failures: request.failures.unwrap_or(DEFAULT_FAILURES),
        ladder,
        restart_command,
        builtin: false,
    };
    monitor.validate().map_err(bad)?;
    set.check_addition(&monitor).map_err(bad)?;
    Ok(monitor)
}

/// Application down: restart it twice, then reset, then fail over; the guest silent:
/// reset, then restart.
fn default_ladder(check: &Check, can_restart_app: bool) -> Ladder {
    let text = match check {
        Check::Qemu => "restart-vm",
        Check::Heartbeat | Check::Stall => "reset-vm,restart-vm",
        Check::Process { .. } | Check::Tcp { .. } | Check::Http { .. } if can_restart_app => {
            "restart-app*2,reset-vm,failover-vm"
        }
        Check::Process { .. } | Check::Tcp { .. } | Check::Http { .. } => "reset-vm,failover-vm",
        Check::Carrier { .. }
        | Check::Ping { .. }
        | Check::Storage { .. }
        | Check::LocalDisk { .. } => "migrate-away",
    };
    text.parse().unwrap_or(Ladder(Vec::new()))
}

/// Built-in and configured monitors of a VM, each with its host's last word on it.
pub fn monitor_views(entry: &VmEntry) -> Vec<MonitorView> {
    let health = entry.health.as_ref().map(|health| &health.value);
    let mut monitors = builtin_monitors();
    if let Some(set) = &entry.monitors {
        monitors.extend(set.value.monitors.iter().cloned());
    }
    monitors
        .iter()
        .map(|monitor| {
            let state = health
                .and_then(|health| health.monitors.iter().find(|known| known.id == monitor.id));
            monitor_view(monitor, state)
        })
        .collect()
}

fn monitor_view(monitor: &Monitor, health: Option<&MonitorHealth>) -> MonitorView {
    MonitorView {
        id: monitor.id.clone(),
        layer: monitor.check.layer().into(),
        check: monitor.check.to_string(),
        interval_ms: monitor.interval_ms,
        timeout_ms: monitor.timeout_ms,
        failures: monitor.failures,
        ladder: monitor.ladder.to_string(),
        restart_command: monitor.restart_command.clone(),
        builtin: monitor.builtin,
        state: health
            .map_or(MonitorState::Unknown, |health| health.state)
            .as_str()
            .into(),
        failed_probes: health.map_or(0, |health| health.failures),
        last_error: health.and_then(|health| health.last_error.clone()),
        last_action: health.and_then(|health| health.last_action.clone()),
        since_ms: health.map_or(0, |health| health.since_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: &str, target: Option<&str>) -> AddMonitorRequest {
        AddMonitorRequest {
            kind: kind.into(),
            target: target.map(str::to_string),
            ..AddMonitorRequest::default()
        }
    }

    #[test]
    fn an_application_monitor_gets_the_images_restart_command_and_ladder() {
        let monitor = monitor_from(
            &request("http", Some("8080/health")),
            &MonitorSet::default(),
            Some("/sbin/ferry-guest-ctl restart".into()),
        )
        .unwrap();
        assert_eq!(monitor.id, "m1");
        assert_eq!(
            monitor.ladder.to_string(),
            "restart-app*2,reset-vm,failover-vm"
        );
        assert_eq!(
            (monitor.interval_ms, monitor.timeout_ms, monitor.failures),
            (2000, 1000, 3)
        );
        let without =
            monitor_from(&request("tcp", Some("22")), &MonitorSet::default(), None).unwrap();
        assert_eq!(without.ladder.to_string(), "reset-vm,failover-vm");
    }

    #[test]
    fn bad_requests_name_the_problem() {
        let error = |request: AddMonitorRequest| {
            monitor_from(&request, &MonitorSet::default(), None)
                .unwrap_err()
                .to_string()
        };
        let mut zero = request("heartbeat", None);
        zero.interval = Some("0s".into());
        assert!(error(zero).contains("interval"));
        let mut unknown = request("heartbeat", None);
        unknown.ladder = Some("reset-vm,explode".into());
        assert!(error(unknown).contains("unknown action \"explode\""));
        let mut endless = request("heartbeat", None);
        endless.ladder = Some("reset-vm*inf".into());
        assert!(error(endless).contains("never ends"));
        let mut no_command = request("process", Some("nginx"));
        no_command.ladder = Some("restart-app".into());
        assert!(error(no_command).contains("restart command"));
        let mut via = request("tcp", Some("80"));
        via.via = Some("moon".into());
        assert!(error(via).contains("host or guest"));
    }

    #[test]
    fn a_vm_gets_at_most_32_monitors_probing_at_most_once_a_second() {
        let mut fast = request("tcp", Some("22"));
        fast.interval = Some("500ms".into());
        let refused = monitor_from(&fast, &MonitorSet::default(), None).unwrap_err();
        assert_eq!(refused.status(), axum::http::StatusCode::BAD_REQUEST);
        assert_eq!(
            refused.to_string(),
            "interval 500 ms: a VM monitor probes at most once every 1000 ms"
        );
        fast.interval = Some("1s".into());
        monitor_from(&fast, &MonitorSet::default(), None).unwrap();

        let mut set = MonitorSet::default();
        for _ in 0..ferry_model::monitor::MAX_VM_MONITORS {
            let monitor = monitor_from(&request("tcp", Some("22")), &set, None).unwrap();
            set.monitors.push(monitor);
        }
        let refused = monitor_from(&request("tcp", Some("22")), &set, None).unwrap_err();
        assert_eq!(refused.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(refused.to_string().contains("the limit of 32"), "{refused}");
    }
}
