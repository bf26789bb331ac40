//! `ferry lab …`: the cluster on this machine. `up` builds it, `status` shows it, `fault`
//! and `heal` break and mend one host, `down` removes it; `demo` is the one-VM tour.
//! The work is all in `ferry_lab::lab`; this file parses arguments and prints.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_lab::defaults;
use ferry_lab::harness::lab::load_or_build_appliance;
use ferry_lab::lab::{Fault, Lab, LabNet, LabSpec, LabStatus, DEFAULT_HOSTS, DEFAULT_NAME};

use crate::demo;
use crate::output::{print_json, step};

#[derive(Args)]
pub struct LabName {
    /// Which lab (several can run side by side, each with its own subnet).
    #[arg(long = "lab", value_name = "NAME", default_value = DEFAULT_NAME)]
    name: String,
}

impl LabName {
    fn state_dir(&self) -> PathBuf {
        defaults::lab_dir().join(&self.name)
    }

    fn load(&self) -> anyhow::Result<Lab> {
        Ok(Lab::load(&self.state_dir())?)
    }
}

#[derive(Subcommand)]
pub enum LabVerb {
    /// Boot the appliance and show it working.
    Demo,
    /// Build the lab: hosts in network namespaces on three switches, etcd, one agent
    /// per host, the appliance image. Needs root.
    Up {
        /// How many hosts.
        #[arg(long, default_value_t = DEFAULT_HOSTS)]
        hosts: u32,
        /// Second octet B of the lab's addresses, 10.B.0.0/16.
        #[arg(long, value_name = "B", default_value_t = 213)]
        subnet: u8,
        /// Migration streams in the clear (to measure what their TLS costs).
        #[arg(long)]
        no_migration_tls: bool,
        #[command(flatten)]
        lab: LabName,
        #[arg(long)]
        json: bool,
    },
    /// Show the lab's hosts, agents, links and etcd.
    Status {
        #[command(flatten)]
        lab: LabName,
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the lab made, and nothing else.
    Down {
        #[command(flatten)]
        lab: LabName,
    },
    /// Break one host on purpose.
    Fault {
        /// The host: host1, host2, …
        host: String,
        fault: FaultKind,
        /// The link that link-down and link-up act on.
        #[arg(long, value_enum, default_value_t = NetArg::Management)]
        net: NetArg,
        /// How far clock-step moves the host's wall clock, in milliseconds (signed).
        #[arg(long, allow_hyphen_values = true, default_value_t = 60_000)]
        step_ms: i64,
        #[command(flatten)]
        lab: LabName,
    },
    /// Mend one host: every link up, its agent started again if it is not running.
    Heal {
        /// The host: host1, host2, …
        host: String,
        #[command(flatten)]
        lab: LabName,
    },
    /// The lab's watchdog of one host (started by the lab; not for people).
    #[command(hide = true)]
    Watchdog {
        #[arg(long)]
        state_dir: std::path::PathBuf,
        #[arg(long)]
        host: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FaultKind {
    /// Kill the host's agent and all its QEMUs at once.
    PowerOff,
    /// Kill only the agent; its VMs keep running.
    AgentKill,
    /// Stop the agent (SIGSTOP): it hangs with its VMs running until its watchdog fires.
    AgentHang,
    /// Step the host's wall clock (see --step-ms); heal sets it right.
    ClockStep,
    /// Take a link down (see --net).
    LinkDown,
    /// Bring a link back up (see --net).
    LinkUp,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum NetArg {
    Management,
    Migration,
    Business,
}

impl From<NetArg> for LabNet {
    fn from(net: NetArg) -> LabNet {
        match net {
            NetArg::Management => LabNet::Management,
            NetArg::Migration => LabNet::Migration,
            NetArg::Business => LabNet::Business,
        }
    }
}

pub async fn run(verb: LabVerb) -> anyhow::Result<()> {
    match verb {
        LabVerb::Demo => demo::demo().await,
        LabVerb::Up {
            hosts,
            subnet,
            no_migration_tls,
            lab,
            json,
        } => up(hosts, subnet, !no_migration_tls, &lab, json).await,
        LabVerb::Status { lab, json } => {
            let status = lab.load()?.status().await;
            if json {
                return print_json(&status);
            }
            print_status(&status);
            Ok(())
        }
        LabVerb::Down { lab } => {
            if !Lab::exists(&lab.state_dir()) {
                println!("lab {} is not up; nothing to remove", lab.name);
                return Ok(());
            }
            lab.load()?.down()?;
            println!("lab {} removed", lab.name);
            Ok(())
        }
        LabVerb::Fault {
            host,
            fault,
            net,
            step_ms,
            lab,
        } => {
            let mut lab = lab.load()?;
            let number = lab.spec().parse_host(&host).map_err(anyhow::Error::msg)?;
            let fault = match fault {
                FaultKind::PowerOff => Fault::PowerOff,
                FaultKind::AgentKill => Fault::AgentKill,
                FaultKind::AgentHang => Fault::AgentHang,
                FaultKind::ClockStep => Fault::ClockStep(step_ms),
                FaultKind::LinkDown => Fault::LinkDown(net.into()),
                FaultKind::LinkUp => Fault::LinkUp(net.into()),
            };
            println!("{}", lab.fault(number, fault)?);
            Ok(())
        }
        LabVerb::Heal { host, lab } => {
            let mut lab = lab.load()?;
            let number = lab.spec().parse_host(&host).map_err(anyhow::Error::msg)?;
            println!("{}", lab.heal(number)?);
            Ok(())
        }
        LabVerb::Watchdog { state_dir, host } => {
            ferry_lab::lab::watchdog::run(&state_dir, host).map_err(anyhow::Error::msg)
        }
    }
}

async fn up(
    hosts: u32,
    subnet: u8,
    migration_tls: bool,
    name: &LabName,
    json: bool,
) -> anyhow::Result<()> {
    if Lab::exists(&name.state_dir()) {
        let lab = name.load()?;
        let spec = lab.spec();
        if spec.hosts != hosts || spec.subnet_base != subnet {
            anyhow::bail!(
                "lab {} is already up with {} hosts on {}; `ferry lab down --lab {}` first to change it",
                spec.name,
                spec.hosts,
                spec.subnet(),
                spec.name
            );
        }
        let status = lab.status().await;
        if json {
            return print_json(&status);
        }
        println!("lab {} is already up", spec.name);
        print_status(&status);
        return Ok(());
    }
    let spec = LabSpec {
        hosts,
        subnet_base: subnet,
        migration_tls,
        ..LabSpec::named(&name.name)
    };
    ferry_lab::lab::require_root(&spec)?;
    let appliance = load_or_build_appliance(step).await?;
    if !json {
        println!(
            "building lab {}: {hosts} hosts on {}, etcd, agents (up to {} s for them to register)",
            spec.name,
            spec.subnet(),
            ferry_lab::lab::REGISTER_TIMEOUT.as_secs()
        );
    }
    let lab = Lab::up(&spec, &appliance)
        .await
        .with_context(|| format!("ferry lab up --lab {}", spec.name))?;
    let status = lab.status().await;
    if json {
        return print_json(&status);
    }
    print_status(&status);
    println!(
        "\nThe CLI is set up ({}): try `ferry host list`.",
        spec.client_config.display()
    );
    Ok(())
}

fn print_status(status: &LabStatus) {
    let running = |yes: bool| if yes { "running" } else { "NOT RUNNING" };
    println!(
        "lab {}  {}  accel {}  state {}",
        status.name,
        status.subnet,
        status.accel.map(|accel| accel.qemu_name()).unwrap_or("-"),
        status.state_dir.display()
    );
    println!(
        "etcd {}  pid {}  {}",
        status.etcd.url,
        status
            .etcd
            .pid
            .map(|pid| pid.to_string())
            .unwrap_or_else(|| "-".into()),
        running(status.etcd.running)
    );
    println!(
        "api  {}  client config {}",
        status.api,
        status
            .client_config
            .as_ref()
            .map(|path| path.display().to_string())
            .unwrap_or_else(|| "-".into())
    );
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "HOST",
        "NAMESPACE",
        "AGENT",
        "REGISTERED",
        "MANAGEMENT",
        "MIGRATION",
        "BUSINESS",
        "LINKS DOWN",
        "QEMUS",
    ]);
    for host in &status.hosts {
        let agent = match (host.agent_pid, host.agent_running) {
            (Some(pid), true) => format!("{pid} running"),
            (Some(pid), false) => format!("{pid} DEAD"),
            (None, _) => "-".into(),
        };
        let namespace = if host.namespace_exists {
            host.namespace.clone()
        } else {
            format!("{} MISSING", host.namespace)
        };
        let registered = match host.registered {
            Some(true) => "yes",
            Some(false) => "no",
            None => "?",
        };
        let links_down: Vec<&str> = host.links_down.iter().map(|net| net.name()).collect();
        table.add_row([
            host.host.clone(),
            namespace,
            agent,
            registered.into(),
            host.management.clone(),
            host.migration.clone(),
            host.business.clone(),
            links_down.join(","),
            host.qemus.len().to_string(),
        ]);
    }
    println!("{table}");
}
