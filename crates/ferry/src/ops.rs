//! `ferry vm migrate`, `ferry vm move-disk` and `ferry op …`: start an op, follow its
//! progress from the op record, print its outcome.

use std::time::Duration;

use clap::Subcommand;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_api::types::{MigrateRequest, MoveDiskRequest, OpView};

use crate::cluster::Endpoint;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum OpVerb {
    /// Migrations and disk moves, queued, running and finished.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One op with its progress or outcome.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop an op: a queued one at once, a running one at its next safe point.
    Cancel {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub struct MigrateArgs {
    pub name: String,
    pub to: Option<String>,
    pub mode: String,
    pub downtime_limit_ms: Option<u64>,
    pub bandwidth: Option<String>,
    pub postcopy_after_ms: Option<u64>,
    pub no_wait: bool,
    pub json: bool,
}

pub async fn migrate(client: &ApiClient, args: MigrateArgs) -> anyhow::Result<()> {
    let request = MigrateRequest {
        to: args.to,
        mode: Some(args.mode),
        downtime_limit_ms: args.downtime_limit_ms,
        bandwidth: args.bandwidth,
        postcopy_after_ms: args.postcopy_after_ms,
    };
    let op = client.migrate_vm(&args.name, &request).await?;
    if !args.json && !args.no_wait {
        eprintln!(
            "{} migration of VM {} from {} to {} (op {})",
            op.mode.as_deref().unwrap_or("live"),
            op.vm,
            op.from.as_deref().unwrap_or("?"),
            op.to.as_deref().unwrap_or("?"),
            op.id
        );
    }
    finish(client, op, args.no_wait, args.json).await
}

pub async fn move_disk(
    client: &ApiClient,
    name: &str,
    disk: &str,
    pool: String,
    no_wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let op = client
        .move_disk(name, disk, &MoveDiskRequest { pool })
        .await?;
    finish(client, op, no_wait, json).await
}

/// Waits (with a progress bar unless `json`), prints the result, fails unless completed.
async fn finish(client: &ApiClient, op: OpView, no_wait: bool, json: bool) -> anyhow::Result<()> {
    let op = if no_wait {
        op
    } else {
        follow(client, &op.id, json).await?
    };
    if json {
        print_json(&op)?;
    } else {
        println!("{}", op_table(std::slice::from_ref(&op)));
        if op.status == "completed" && op.kind == "migrate" {
            println!(
                "QEMU downtime {} ms, total {} ms, Ferry overhead {} ms (switch-over {} ms), {} transferred",
                shown(op.qemu_downtime_ms),
                shown(op.total_ms),
                shown(op.overhead_ms),
                shown(op.switchover_ms),
                mib(op.transferred_bytes.unwrap_or(0))
            );
        }
    }
    match op.status.as_str() {
        "completed" | "queued" | "running" => Ok(()),
        "cancelled" => anyhow::bail!("op {} was cancelled", op.id),
        _ => anyhow::bail!(
            "op {} {}: {}",
            op.id,
            op.status,
            op.error.unwrap_or_else(|| "no reason given".into())
        ),
    }
}

pub(crate) async fn follow(client: &ApiClient, id: &str, quiet: bool) -> anyhow::Result<OpView> {
    let bar = (!quiet).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{bar:30}] {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(100));
        bar
    });
    let op = client
        .wait_op(id, Duration::from_millis(250), |op| {
            let Some(bar) = &bar else {
                return;
            };
            match &op.progress {
                Some(progress) => {
                    bar.set_length(progress.total_bytes.max(progress.transferred_bytes));
                    bar.set_position(progress.transferred_bytes);
                    let mut message = op.phase.clone();
                    if progress.dirty_pages_rate > 0 {
                        message
                            .push_str(&format!(", {} pages/s dirtied", progress.dirty_pages_rate));
                    }
                    if let Some(left) = progress.expected_remaining_ms {
                        message.push_str(&format!(", ~{:.1} s left", left as f64 / 1000.0));
                    }
                    bar.set_message(message);
                }
                None => bar.set_message(op.phase.clone()),
            }
        })
        .await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(op)
}

pub async fn run_op(endpoint: &Endpoint, verb: OpVerb) -> anyhow::Result<()> {
    let client = endpoint.client()?;
    match verb {
        OpVerb::List { json } => {
            let ops = client.list_ops().await?;
            if json {
                return print_json(&ops);
            }
            println!("{}", op_table(&ops));
            Ok(())
        }
        OpVerb::Show { id, json } => {
            let op = client.get_op(&id).await?;
            if json {
                return print_json(&op);
            }
            println!("{}", op_table(std::slice::from_ref(&op)));
            if let Some(error) = &op.error {
                println!("error: {error}");
            }
            Ok(())
        }
        OpVerb::Cancel { id, json } => {
            let op = client.cancel_op(&id).await?;
            if json {
                return print_json(&op);
            }
            println!("{}", op_table(std::slice::from_ref(&op)));
            Ok(())
        }
    }
}

pub fn op_table(ops: &[OpView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "OP",
        "KIND",
        "VM",
        "FROM → TO",
        "STATUS",
        "PHASE",
        "PROGRESS",
    ]);
    for op in ops {
        let route = match (&op.disk, &op.pool) {
            (Some(disk), Some(pool)) => format!("disk {disk} → pool {pool}"),
            _ => format!(
                "{} → {} ({})",
                op.from.as_deref().unwrap_or("?"),
                op.to.as_deref().unwrap_or("?"),
                op.mode.as_deref().unwrap_or("-")
            ),
        };
        let progress = match (&op.progress, op.status.as_str()) {
            (_, "completed") => format!(
                "{} ms",
                shown(
                    op.total_ms
                        .or_else(|| { Some(op.finished_ms?.saturating_sub(op.started_ms?)) })
                )
            ),
            (Some(progress), _) if progress.total_bytes > 0 => format!(
                "{} / {}",
                mib(progress.transferred_bytes),
                mib(progress.total_bytes)
            ),
            _ => "-".into(),
        };
        table.add_row([
            op.id.clone(),
            op.kind.clone(),
            op.vm.clone(),
            route,
            op.status.clone(),
            op.error.clone().unwrap_or_else(|| op.phase.clone()),
            progress,
        ]);
    }
    table
}

fn shown(value: Option<u64>) -> String {
    value
        .map(|value| value.to_string())
        .unwrap_or_else(|| "?".into())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
