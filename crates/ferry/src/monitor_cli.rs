//! `ferry vm monitor add|list|remove`: a VM's monitors and their current health.

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_api::types::{AddMonitorRequest, MonitorView};

use crate::output::print_json;

#[derive(clap::Subcommand)]
pub enum MonitorVerb {
    /// Watch something of the VM and recover it by a ladder of actions when it fails.
    Add {
        name: String,
        /// process, tcp, http, heartbeat, stall or qemu.
        #[arg(long)]
        kind: String,
        /// process: a name; tcp: a port; http: PORT/PATH (e.g. 8080/health).
        #[arg(long)]
        target: Option<String>,
        /// Where tcp and http checks run: host (over the business network) or guest.
        #[arg(long)]
        via: Option<String>,
        /// The monitor's id (default m1, m2 …).
        #[arg(long)]
        id: Option<String>,
        #[arg(long, default_value = "2s")]
        interval: String,
        #[arg(long, default_value = "1s")]
        timeout: String,
        /// Failed probes in a row before the next step of the ladder.
        #[arg(long, default_value_t = 3)]
        failures: u32,
        /// Actions in order, each tried only if the one before did not help:
        /// restart-app, reset-vm, restart-vm, failover-vm, migrate-away, none; `*N` repeats
        /// (default: restart-app*2,reset-vm,failover-vm for applications).
        #[arg(long)]
        ladder: Option<String>,
        /// What restart-app runs in the guest (default: the image's restart command).
        #[arg(long)]
        restart_command: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The VM's monitors, built-in and added, with their health.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove an added monitor.
    Remove {
        name: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(client: &ApiClient, verb: MonitorVerb) -> anyhow::Result<()> {
    match verb {
        MonitorVerb::Add {
            name,
            kind,
            target,
            via,
            id,
            interval,
            timeout,
            failures,
            ladder,
            restart_command,
            json,
        } => {
            let request = AddMonitorRequest {
                kind,
                target,
                via,
                id,
                interval: Some(interval),
                timeout: Some(timeout),
                failures: Some(failures),
                ladder,
                restart_command,
            };
            let monitor = client.add_monitor(&name, &request).await?;
            if json {
                return print_json(&monitor);
            }
            println!("{}", monitors_table(std::slice::from_ref(&monitor)));
            Ok(())
        }
        MonitorVerb::List { name, json } => {
            let monitors = client.list_monitors(&name).await?;
            if json {
                return print_json(&monitors);
            }
            println!("{}", monitors_table(&monitors));
            Ok(())
        }
        MonitorVerb::Remove { name, id, json } => {
            let removed = client.remove_monitor(&name, &id).await?;
            if json {
                return print_json(&removed);
            }
            println!("monitor {id} of VM {name} removed");
            Ok(())
        }
    }
}

pub fn monitors_table(monitors: &[MonitorView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "ID",
        "LAYER",
        "CHECK",
        "EVERY",
        "FAILURES",
        "LADDER",
        "STATE",
        "LAST ACTION",
        "LAST ERROR",
    ]);
    for monitor in monitors {
        table.add_row([
            if monitor.builtin {
                format!("{} (built in)", monitor.id)
            } else {
                monitor.id.clone()
            },
            monitor.layer.clone(),
            monitor.check.clone(),
            format!("{:.1} s", monitor.interval_ms as f64 / 1000.0),
            monitor.failures.to_string(),
            monitor.ladder.clone(),
            match monitor.failed_probes {
                0 => monitor.state.clone(),
                failed => format!("{} ({failed} failed)", monitor.state),
            },
            monitor.last_action.clone().unwrap_or_else(|| "-".into()),
            monitor.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table
}
