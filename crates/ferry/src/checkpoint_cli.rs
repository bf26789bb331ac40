//! `ferry vm checkpoint …`, `ferry template …`, `ferry vm clone` and `ferry vm
//! flatten`: each a call of the API, with a spinner while it runs and a table (or
//! JSON) of what it did.

use std::future::Future;
use std::time::{Duration, Instant};

use clap::Subcommand;
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_api::types::{
    CheckpointView, CloneVmRequest, CreateCheckpointRequest, CreateTemplateRequest, OpView,
    TemplateView,
};

use crate::cluster::Endpoint;
use crate::output::print_json;

#[derive(Subcommand)]
pub enum CheckpointVerb {
    /// Take a checkpoint: with the guest's memory (a revert continues from this
    /// instant) unless --no-memory or --quiesce.
    Create {
        name: String,
        /// Default: `cp-` and the time.
        #[arg(long)]
        tag: Option<String>,
        /// The disks alone (a revert boots the guest from them).
        #[arg(long)]
        no_memory: bool,
        /// Freeze the guest's filesystems through its agent while the disks are
        /// captured: application-consistent, without memory.
        #[arg(long)]
        quiesce: bool,
        #[arg(long)]
        json: bool,
    },
    /// The VM's checkpoints as a tree.
    List {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Go back to a checkpoint (running or stopped).
    Revert {
        name: String,
        tag: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a checkpoint; its children hang from its parent.
    Delete {
        name: String,
        tag: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TemplateVerb {
    /// Make a template from a stopped VM (or a running one with --generalize).
    Create {
        name: String,
        #[arg(long)]
        from_vm: String,
        /// Reset machine id, SSH host keys and cloud-init state through the guest
        /// agent, then shut the VM down.
        #[arg(long)]
        generalize: bool,
        #[arg(long)]
        json: bool,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a template (refused while linked clones use it).
    Delete { name: String },
}

/// Runs `call` with a spinner saying `what` (unless JSON was asked for).
pub async fn with_spinner<T>(what: &str, quiet: bool, call: impl Future<Output = T>) -> T {
    let spinner = (!quiet).then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner.set_message(what.to_string());
        spinner
    });
    let started = Instant::now();
    let ticker = spinner.clone().map(|spinner| {
        let what = what.to_string();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                spinner.set_message(format!("{what} ({:.0} s)", started.elapsed().as_secs_f64()));
            }
        })
    });
    let result = call.await;
    if let Some(ticker) = ticker {
        ticker.abort();
    }
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    result
}

fn print_op(op: &OpView, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(op);
    }
    let paused = op
        .qemu_downtime_ms
        .map(|ms| format!("; guest paused {ms} ms"))
        .unwrap_or_default();
    println!("{} (op {}{paused})", op.phase, op.id);
    Ok(())
}

/// `2026-12-02 17:45:00` (UTC).
fn taken_at(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

pub fn checkpoints_table(checkpoints: &[CheckpointView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header(["CHECKPOINT", "TAKEN", "MEMORY", "STATE SIZE", "DISKS"]);
    for checkpoint in checkpoints {
        let marker = if checkpoint.current { " ← now" } else { "" };
        let tree = format!(
            "{}{}{}{marker}",
            "  ".repeat(checkpoint.depth),
            if checkpoint.depth > 0 { "└ " } else { "" },
            checkpoint.tag
        );
        let memory = match (checkpoint.memory, checkpoint.quiesced) {
            (true, _) => "yes",
            (false, true) => "no (quiesced)",
            (false, false) => "no",
        };
        table.add_row([
            tree,
            taken_at(checkpoint.created_ms),
            memory.to_string(),
            format!("{:.1} MiB", checkpoint.vm_state_bytes as f64 / 1048576.0),
            checkpoint.disks.join(", "),
        ]);
    }
    table
}

pub fn templates_table(templates: &[TemplateView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "TEMPLATE", "PROJECT", "FROM", "CPUS", "MEMORY", "FIRMWARE", "DISKS", "CLONES",
    ]);
    for template in templates {
        table.add_row([
            format!(
                "{}{}",
                template.name,
                if template.generalized {
                    " (generalized)"
                } else {
                    ""
                }
            ),
            template.project.clone(),
            format!("VM {} ({})", template.from_vm, template.image),
            template.cpus.to_string(),
            format!("{} MiB", template.memory_mib),
            template.firmware.clone(),
            template
                .disks
                .iter()
                .map(|disk| format!("{} {} MiB", disk.id, disk.size >> 20))
                .collect::<Vec<_>>()
                .join(", "),
            template.linked_clones.len().to_string(),
        ]);
    }
    table
}

pub async fn run_checkpoint(client: &ApiClient, verb: CheckpointVerb) -> anyhow::Result<()> {
    match verb {
        CheckpointVerb::Create {
            name,
            tag,
            no_memory,
            quiesce,
            json,
        } => {
            let request = CreateCheckpointRequest {
                tag,
                memory: no_memory.then_some(false),
                quiesce,
            };
            let op = with_spinner(
                &format!("checkpoint of VM {name}"),
                json,
                client.create_checkpoint(&name, &request),
            )
            .await?;
            print_op(&op, json)
        }
        CheckpointVerb::List { name, json } => {
            let checkpoints = client.list_checkpoints(&name).await?;
            if json {
                return print_json(&checkpoints);
            }
            if checkpoints.is_empty() {
                println!("VM {name} has no checkpoints");
            } else {
                println!("{}", checkpoints_table(&checkpoints));
            }
            Ok(())
        }
        CheckpointVerb::Revert { name, tag, json } => {
            let op = with_spinner(
                &format!("revert of VM {name} to {tag}"),
                json,
                client.revert_checkpoint(&name, &tag),
            )
            .await?;
            print_op(&op, json)
        }
        CheckpointVerb::Delete { name, tag, json } => {
            let op = with_spinner(
                &format!("deleting checkpoint {tag} of VM {name}"),
                json,
                client.delete_checkpoint(&name, &tag),
            )
            .await?;
            print_op(&op, json)
        }
    }
}

pub async fn run_template(endpoint: &Endpoint, verb: TemplateVerb) -> anyhow::Result<()> {
    let client = endpoint.client()?;
    match verb {
        TemplateVerb::Create {
            name,
            from_vm,
            generalize,
            json,
        } => {
            let request = CreateTemplateRequest {
                name: name.clone(),
                from_vm,
                generalize,
            };
            let template = with_spinner(
                &format!("making template {name}"),
                json,
                client.create_template(&request),
            )
            .await?;
            if json {
                return print_json(&template);
            }
            println!("{}", templates_table(std::slice::from_ref(&template)));
            Ok(())
        }
        TemplateVerb::List { json } => {
            let templates = client.list_templates().await?;
            if json {
                return print_json(&templates);
            }
            println!("{}", templates_table(&templates));
            Ok(())
        }
        TemplateVerb::Show { name, json } => {
            let template = client.get_template(&name).await?;
            if json {
                return print_json(&template);
            }
            println!("{}", templates_table(std::slice::from_ref(&template)));
            if !template.linked_clones.is_empty() {
                println!("linked clones: {}", template.linked_clones.join(", "));
            }
            Ok(())
        }
        TemplateVerb::Delete { name } => {
            client.delete_template(&name).await?;
            println!("template {name} deleted");
            Ok(())
        }
    }
}

pub async fn clone_vm(
    client: &ApiClient,
    source: &str,
    request: CloneVmRequest,
    json: bool,
) -> anyhow::Result<ferry_api::types::VmView> {
    let name = request.name.clone();
    Ok(with_spinner(
        &format!("copying VM {source} into {name}"),
        json,
        client.clone_vm(source, &request),
    )
    .await?)
}

pub async fn flatten(client: &ApiClient, name: &str, json: bool) -> anyhow::Result<()> {
    let op = with_spinner(
        &format!("copying the template base into VM {name}"),
        json,
        client.flatten_vm(name),
    )
    .await?;
    print_op(&op, json)
}
