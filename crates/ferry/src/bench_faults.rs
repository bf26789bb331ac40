//! `ferry bench faults`: REFERENCE §2's fault matrix, produced in the lab. One HA VM
//! (isolation response keep-running, an HTTP monitor on ferry-guest) serves a client
//! probing `/health` every 100 ms from the business switch; each fault is made on the
//! VM's host or in its guest, and the run records whether Ferry detected it and after
//! how long (its first event about it), what it did, the client's longest outage,
//! failed requests and whether the guest rebooted. The symbol follows the reference's:
//! ◎ detected and served with no more than seconds of outage and no guest boot;
//! ○ detected and served again after a guest boot; △ not detected but served;
//! × the service was lost.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_api::types::{AddMonitorRequest, CreateVmRequest, EventView, ExecRequest};
use ferry_lab::flows::{Flow, SCENARIOS};
use ferry_lab::harness::lab::{lab_client, load_lab};
use ferry_lab::harness::vm::{create_fresh_vm, ha_bench_vm, remove_bench_vm};
use ferry_lab::lab::{Fault, Lab, LabNet};
use ferry_lab::workload::boot_id;
use ferry_model::cluster::now_ms;
use serde::{Deserialize, Serialize};

use crate::output::write_json_file;

const VM: &str = "bench-faults";
/// The client gives an operation this long before it counts as failed.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a fault is left in place when nothing has to move.
const HOLD: Duration = Duration::from_secs(20);

/// The faults of REFERENCE §2, in its order, with the layer and the reference's best
/// column (E: CLUSTERPRO on the management OS and in the guest).
const FAULTS: [(&str, &str, &str); 9] = [
    ("management link", "host", "◎"),
    ("migration link", "host", "◎"),
    ("business link", "host", "○"),
    ("stuck shared pool", "host", "○"),
    ("guest stall", "vm", "○"),
    ("guest panic", "vm", "○"),
    ("ferry-guest killed", "application", "○"),
    ("ferry-guest hung", "application", "○"),
    // Listed so the table says it was not run.
    ("local (boot) disk", "host", "○"),
];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRun {
    pub fault: String,
    pub layer: String,
    /// `false`: the lab cannot make this fault; the other fields are empty.
    pub produced: bool,
    pub detected: bool,
    pub detected_after_s: Option<f64>,
    pub detected_by: Option<String>,
    pub action: Option<String>,
    pub outage_s: f64,
    pub failed_ops: usize,
    pub rebooted: bool,
    pub symbol: String,
    pub reference: String,
    pub note: Option<String>,
}

#[derive(Serialize)]
struct Report {
    faults: Vec<FaultRun>,
}

/// The reference's symbol for a fault outcome.
pub fn symbol(detected: bool, served: bool, rebooted: bool) -> &'static str {
    match (detected, served, rebooted) {
        (_, false, _) => "×",
        (true, true, false) => "◎",
        (true, true, true) => "○",
        (false, true, _) => "△",
    }
}

pub async fn run(lab_name: &str, json_file: Option<PathBuf>) -> anyhow::Result<()> {
    let mut lab = load_lab(lab_name)?;
    let client = lab_client(&lab)?;
    create_vm(&client).await?;
    let result = run_all(&mut lab, &client).await;
    remove_bench_vm(&client, VM).await;
    let faults = result?;
    if let Some(path) = &json_file {
        let report = Report {
            faults: faults.clone(),
        };
        write_json_file(path, &report)?;
    }
    println!("{}", table(&faults));
    Ok(())
}

async fn create_vm(client: &ApiClient) -> anyhow::Result<()> {
    let request = CreateVmRequest {
        isolation: Some("keep-running".into()),
        ..ha_bench_vm(VM, "256M")
    };
    create_fresh_vm(client, &request).await?;
    settled(client).await?;
    client
        .add_monitor(
            VM,
            &AddMonitorRequest {
                kind: "http".into(),
                target: Some("8080/health".into()),
                ..AddMonitorRequest::default()
            },
        )
        .await?;
    Ok(())
}

async fn run_all(lab: &mut Lab, client: &ApiClient) -> anyhow::Result<Vec<FaultRun>> {
    let mut runs = Vec::new();
    for (fault, layer, reference) in FAULTS {
        let outcome = match fault {
            "stuck shared pool" => Ok(not_produced(
                "the lab's hosts share one directory; it cannot yet make one host's path to it stick",
            )),
            "local (boot) disk" => Ok(not_produced(
                "the lab's hosts share this machine's disk; it cannot fail for one host",
            )),
            _ => measure(lab, client, fault)
                .await
                .with_context(|| format!("fault {fault}")),
        };
        let mut run = outcome?;
        run.fault = fault.into();
        run.layer = layer.into();
        run.reference = reference.into();
        eprintln!(
            "{fault:<20} {} {}",
            run.symbol,
            run.note.clone().unwrap_or_else(|| format!(
                "detected {} after {}, {}, outage {:.1} s",
                if run.detected { "yes" } else { "no" },
                run.detected_after_s
                    .map_or("-".into(), |seconds| format!("{seconds:.1} s")),
                run.action.clone().unwrap_or_else(|| "no action".into()),
                run.outage_s
            ))
        );
        runs.push(run);
    }
    Ok(runs)
}

fn not_produced(note: &str) -> FaultRun {
    FaultRun {
        fault: String::new(),
        layer: String::new(),
        produced: false,
        detected: false,
        detected_after_s: None,
        detected_by: None,
        action: None,
        outage_s: 0.0,
        failed_ops: 0,
        rebooted: false,
        symbol: "not run".into(),
        reference: String::new(),
        note: Some(note.into()),
    }
}

async fn measure(lab: &mut Lab, client: &ApiClient, fault: &str) -> anyhow::Result<FaultRun> {
    let vm = settled(client).await?;
    let ip = vm.ip.clone().context("the VM has no address")?;
    let host = vm.host.clone().context("the VM has no host")?;
    let number = lab.spec().parse_host(&host).map_err(anyhow::Error::msg)?;
    let boot = boot_id(&ip).await.map_err(anyhow::Error::msg)?;
    let idle = SCENARIOS
        .into_iter()
        .find(|scenario| scenario.name == "idle")
        .context("no idle workload")?;
    let flow = Flow::start(&ip, idle, "faults-", CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault_ms = now_ms();
    match fault {
        "management link" | "migration link" => {
            let net = if fault == "management link" {
                LabNet::Management
            } else {
                LabNet::Migration
            };
            lab.fault(number, Fault::LinkDown(net))?;
            tokio::time::sleep(HOLD).await;
            lab.fault(number, Fault::LinkUp(net))?;
        }
        "business link" => {
            lab.fault(number, Fault::LinkDown(LabNet::Business))?;
            wait_until(client, Duration::from_secs(90), |vm| {
                vm.host.as_deref() != Some(host.as_str()) && vm.state == "running"
            })
            .await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            lab.fault(number, Fault::LinkUp(LabNet::Business))?;
        }
        "guest stall" => {
            guest(
                client,
                &format!(
                    "setsid {} 300 </dev/null >/dev/null 2>&1 &",
                    ferry_lab::appliance::STALL_COMMAND
                ),
            )
            .await;
            wait_new_boot(&ip, &boot, Duration::from_secs(120)).await;
        }
        "guest panic" => {
            guest(client, "echo c > /proc/sysrq-trigger").await;
            wait_new_boot(&ip, &boot, Duration::from_secs(120)).await;
        }
        "ferry-guest killed" => {
            guest(client, "kill -KILL $(cat /run/ferry-guest.pid)").await;
            tokio::time::sleep(HOLD).await;
        }
        "ferry-guest hung" => {
            guest(client, "kill -STOP $(cat /run/ferry-guest.pid)").await;
            tokio::time::sleep(HOLD).await;
        }
        other => anyhow::bail!("no way to make fault {other:?}"),
    }
    settled(client).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = flow.stop().await;
    let rebooted = boot_id(&ip).await.map_err(anyhow::Error::msg)? != boot;
    let events = client.list_events(1000).await?;
    let detection = first_detection(&events, &host, fault_ms);
    let served = log.failed.is_empty() && boot_id(&ip).await.is_ok();
    let detected = detection.is_some();
    Ok(FaultRun {
        fault: String::new(),
        layer: String::new(),
        produced: true,
        detected,
        detected_after_s: detection
            .as_ref()
            .map(|event| event.at_ms.saturating_sub(fault_ms) as f64 / 1000.0),
        detected_by: detection
            .as_ref()
            .map(|event| format!("{} {}", event.subject, event.kind)),
        action: detection.as_ref().map(action_of),
        outage_s: log.downtime().as_secs_f64(),
        failed_ops: log.failed.len(),
        rebooted,
        symbol: symbol(detected, served, rebooted).into(),
        reference: String::new(),
        note: None,
    })
}

/// Ferry's first event about the fault: a monitor acting, the leader's verdict on the
/// host, a VM failure.
fn first_detection(events: &[EventView], host: &str, since_ms: u64) -> Option<EventView> {
    let subjects = [format!("vm/{VM}"), format!("host/{host}")];
    let mut found: Vec<&EventView> = events
        .iter()
        .filter(|event| event.at_ms >= since_ms && subjects.contains(&event.subject))
        .filter(|event| {
            [
                "monitor-down",
                "host-fate",
                "vm-failed",
                "fencing",
                "ha-restart",
            ]
            .contains(&event.kind.as_str())
        })
        .collect();
    found.sort_by_key(|event| event.at_ms);
    found.first().map(|event| (*event).clone())
}

/// What Ferry did, in a few words, from its detection event.
fn action_of(event: &EventView) -> String {
    let message = &event.message;
    if event.kind == "monitor-down" {
        for action in [
            "restart-app",
            "reset-vm",
            "restart-vm",
            "failover-vm",
            "migrate-away",
            "none",
        ] {
            if message.contains(&format!("; {action} (attempt")) {
                return action.into();
            }
        }
    }
    match event.kind.as_str() {
        "vm-failed" => "restart in place".into(),
        "host-fate" => format!("leader's verdict: {message}"),
        "fencing" => "fence, restart elsewhere".into(),
        "ha-restart" => "restart elsewhere".into(),
        other => other.into(),
    }
}

async fn guest(client: &ApiClient, script: &str) {
    let request = ExecRequest {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        timeout_seconds: Some(5),
    };
    // A panic or a stall can cut the guest agent's answer short; the fault happened.
    if let Err(error) = client.exec_vm(VM, &request).await {
        tracing::debug!("the fault's command got no answer: {error}");
    }
}

async fn wait_new_boot(ip: &str, boot: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if boot_id(ip).await.is_ok_and(|now| now != boot) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_until(
    client: &ApiClient,
    timeout: Duration,
    done: impl Fn(&ferry_api::types::VmView) -> bool,
) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if client.get_vm(VM).await.is_ok_and(|vm| done(&vm)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the VM runs, its guest agent and ferry-guest answer, every host is in
/// the cluster, and its monitors are ok.
async fn settled(client: &ApiClient) -> anyhow::Result<ferry_api::types::VmView> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        anyhow::ensure!(
            Instant::now() < deadline,
            "VM {VM} did not settle within 180 s"
        );
        let hosts = client
            .list_hosts()
            .await
            .map(|hosts| hosts.len())
            .unwrap_or(0);
        if let Ok(vm) = client.get_vm(VM).await {
            let monitors_ok = vm
                .monitors
                .iter()
                .all(|monitor| monitor.state == "ok" || monitor.state == "unknown");
            if vm.state == "running"
                && vm.guest_agent
                && monitors_ok
                && hosts >= 2
                && boot_id(vm.ip.as_deref().unwrap_or_default()).await.is_ok()
            {
                return Ok(vm);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

pub fn table(runs: &[FaultRun]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "LAYER", "FAULT", "DETECTED", "AFTER s", "ACTION", "OUTAGE s", "FAILED", "REBOOT", "FERRY",
        "REF (E)",
    ]);
    for run in runs {
        if !run.produced {
            table.add_row([
                run.layer.clone(),
                run.fault.clone(),
                "-".into(),
                "-".into(),
                run.note.clone().unwrap_or_default(),
                "-".into(),
                "-".into(),
                "-".into(),
                "not run".into(),
                run.reference.clone(),
            ]);
            continue;
        }
        table.add_row([
            run.layer.clone(),
            run.fault.clone(),
            if run.detected { "yes" } else { "no" }.into(),
            run.detected_after_s
                .map_or("-".into(), |seconds| format!("{seconds:.1}")),
            run.action.clone().unwrap_or_else(|| "-".into()),
            format!("{:.1}", run.outage_s),
            run.failed_ops.to_string(),
            if run.rebooted { "yes" } else { "no" }.into(),
            run.symbol.clone(),
            run.reference.clone(),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_symbols_follow_the_reference() {
        assert_eq!(symbol(true, true, false), "◎");
        assert_eq!(symbol(true, true, true), "○");
        assert_eq!(symbol(false, true, false), "△");
        assert_eq!(symbol(true, false, false), "×");
        assert_eq!(symbol(false, false, true), "×");
    }

    #[test]
    fn the_action_is_read_from_the_detection_event() {
        let event = |kind: &str, message: &str| EventView {
            at_ms: 1,
            source: "agent/host1".into(),
            subject: "vm/bench-faults".into(),
            kind: kind.into(),
            message: message.into(),
        };
        assert_eq!(
            action_of(&event(
                "monitor-down",
                "VM x: monitor m1 (http :8080/health) down …; restart-app (attempt 1 of ladder restart-app*2,reset-vm,failover-vm): …"
            )),
            "restart-app"
        );
        assert_eq!(
            action_of(&event("host-fate", "host host1 is cut off but alive (…)")),
            "leader's verdict: host host1 is cut off but alive (…)"
        );
        assert_eq!(
            action_of(&event("vm-failed", "the guest panicked")),
            "restart in place"
        );
        let events = vec![
            EventView {
                at_ms: 5,
                ..event("monitor-down", "late")
            },
            EventView {
                at_ms: 3,
                ..event("vm-failed", "first")
            },
            EventView {
                at_ms: 1,
                ..event("vm-failed", "before the fault")
            },
        ];
        assert_eq!(
            first_detection(&events, "host1", 2).unwrap().message,
            "first"
        );
    }
}
