//! `ferry host …`, `ferry vm …`, `ferry events`: thin adapters over the API client.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_api::client::ApiClient;
use ferry_api::client_config::{self, ClientConfig};
use ferry_api::types::{
    AddMonitorRequest, CreateVmRequest, ExecRequest, HostView, UpdateHaRequest, VmView,
};

use crate::output::print_json;

/// Where the API is and how to authenticate.
#[derive(Args, Clone, Debug)]
pub struct Endpoint {
    /// API base URL (default: FERRY_API, then the client config file).
    #[arg(long, global = true, env = "FERRY_API")]
    pub api: Option<String>,
    /// Bearer token (default: FERRY_TOKEN, then the client config file).
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The cluster CA's certificate, the only one trusted (default: FERRY_CA, then the
    /// client config file).
    #[arg(long, global = true, env = "FERRY_CA")]
    pub ca: Option<std::path::PathBuf>,
}

impl Endpoint {
    pub fn client(&self) -> anyhow::Result<ApiClient> {
        let path = client_config::default_path();
        let file = match (&self.api, &self.token, &self.ca) {
            (Some(_), Some(_), Some(_)) => None,
            _ => Some(ClientConfig::load(&path).map_err(|problem| {
                anyhow::anyhow!("no API endpoint: pass --api, --token and --ca, set FERRY_API, FERRY_TOKEN and FERRY_CA, or run `ferry lab up` ({problem})")
            })?),
        };
        // The file's other agents stand in only for its own `api`.
        let fallback = match (&file, &self.api) {
            (Some(file), None) => file.fallback.clone(),
            _ => Vec::new(),
        };
        let pick = |given: &Option<String>, from_file: fn(&ClientConfig) -> String| {
            given
                .clone()
                .or_else(|| file.as_ref().map(from_file))
                .unwrap_or_default()
        };
        let config = ClientConfig {
            api: pick(&self.api, |file| file.api.clone()),
            token: pick(&self.token, |file| file.token.clone()),
            ca: self
                .ca
                .clone()
                .or_else(|| file.as_ref().map(|file| file.ca.clone()))
                .unwrap_or_default(),
            fallback,
        };
        Ok(ApiClient::from_config(&config)?)
    }
}

#[derive(Subcommand)]
pub enum HostVerb {
    /// The hosts of the cluster.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One host.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Probe (or show the cached verdict on) KVM versus TCG on this machine.
    Accel {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum CdromVerb {
    /// Put an ISO image of the library into a drive.
    Insert {
        name: String,
        image: String,
        /// The drive (default cd0).
        #[arg(long, default_value = "cd0")]
        drive: String,
        #[arg(long)]
        json: bool,
    },
    /// Take the medium out of a drive.
    Eject {
        name: String,
        #[arg(long, default_value = "cd0")]
        drive: String,
        #[arg(long)]
        json: bool,
    },
}

/// What a new VM is made of: its source, disks, firmware, devices and cloud-init.
#[derive(Args, Default)]
pub struct MachineArgs {
    /// An image of the library (`ferry image list`); the first disk is a copy of it.
    /// Default: the appliance.
    #[arg(long, conflicts_with_all = ["iso", "blank"])]
    image: Option<String>,
    /// Install from an ISO image of the library: it goes in the CD-ROM, the first disk
    /// starts empty.
    #[arg(long, conflicts_with = "blank")]
    iso: Option<String>,
    /// Empty disks only.
    #[arg(long)]
    blank: bool,
    /// A disk as SIZE[@POOL] (repeatable; the first one is the image's copy or the
    /// boot disk): `--disk 20G --disk 100G@host1-local`.
    #[arg(long = "disk", value_name = "SIZE[@POOL]", value_parser = parse_disk)]
    disks: Vec<ferry_api::types::DiskRequest>,
    /// bios (SeaBIOS) or uefi (OVMF, with the VM's own NVRAM).
    #[arg(long, value_parser = parse_firmware)]
    firmware: Option<ferry_api::types::FirmwareKind>,
    /// A NIC as NETWORK[,mac=52:54:00:…][,model=virtio|e1000] (repeatable; default one
    /// on business).
    #[arg(long = "nic", value_name = "NETWORK[,mac=…][,model=…]", value_parser = parse_nic)]
    nics: Vec<ferry_api::types::NicRequest>,
    /// virtio (default), scsi, or sata for guests without virtio drivers.
    #[arg(long, value_parser = parse_disk_bus)]
    disk_bus: Option<ferry_model::DiskBus>,
    /// An ISO image of the library in the CD-ROM drive.
    #[arg(long)]
    cdrom: Option<String>,
    /// Boot devices in order: disk,cdrom,network.
    #[arg(long, value_delimiter = ',', value_parser = parse_boot_device)]
    boot_order: Vec<ferry_model::BootDevice>,
    /// A QEMU CPU model every host runs (default qemu64).
    #[arg(long)]
    cpu_model: Option<String>,
    /// cloud-init: the guest's hostname (default: the VM's name).
    #[arg(long)]
    hostname: Option<String>,
    /// cloud-init: a user to create, with sudo and the --ssh-key keys.
    #[arg(long)]
    user: Option<String>,
    /// cloud-init: a public key file for the user (repeatable).
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<std::path::PathBuf>,
    /// cloud-init: your own #cloud-config file, used as it is.
    #[arg(long, value_name = "FILE")]
    user_data: Option<std::path::PathBuf>,
    /// Run in the guest before every shutdown, e.g. 'systemctl stop myapp'.
    #[arg(long)]
    stop_command: Option<String>,
    /// How long --stop-command may take: 30s, 2m (default 60s).
    #[arg(long, value_parser = humantime::parse_duration)]
    stop_timeout: Option<Duration>,
}

fn parse_disk(text: &str) -> Result<ferry_api::types::DiskRequest, String> {
    text.parse()
}

fn parse_nic(text: &str) -> Result<ferry_api::types::NicRequest, String> {
    text.parse()
}

fn parse_firmware(text: &str) -> Result<ferry_api::types::FirmwareKind, String> {
    text.parse()
}

fn parse_disk_bus(text: &str) -> Result<ferry_model::DiskBus, String> {
    text.parse()
}

fn parse_boot_device(text: &str) -> Result<ferry_model::BootDevice, String> {
    text.parse()
}

impl MachineArgs {
    /// Fills the request's machine fields, reading the files named.
    fn fill(self, request: &mut CreateVmRequest) -> anyhow::Result<()> {
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        let ssh_keys = self
            .ssh_keys
            .iter()
            .map(|path| read(path, "SSH key"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let user_data = match &self.user_data {
            Some(path) => Some(read(path, "user-data")?),
            None => None,
        };
        if self.hostname.is_some()
            || self.user.is_some()
            || !ssh_keys.is_empty()
            || user_data.is_some()
        {
            request.cloud_init = Some(ferry_api::types::CloudInitRequest {
                hostname: self.hostname,
                user: self.user,
                ssh_keys,
                user_data,
            });
        }
        request.image = self.image;
        request.iso = self.iso;
        request.blank = self.blank;
        request.disks = self.disks;
        request.firmware = self.firmware;
        request.nics = self.nics;
        request.disk_bus = self.disk_bus;
        request.cdrom = self.cdrom;
        request.boot_order = self.boot_order;
        request.cpu_model = self.cpu_model;
        request.stop_command = self.stop_command;
        request.stop_timeout_seconds = self.stop_timeout.map(|timeout| timeout.as_secs().max(1));
        Ok(())
    }
}

/// A VM's HA policy, on `vm create --ha` and `vm update`.
#[derive(Args, Default)]
pub struct HaArgs {
    /// Higher restarts first when there is not room for all.
    #[arg(long)]
    priority: Option<i32>,
    /// power-off (default) or keep-running when its host alone is cut off.
    #[arg(long)]
    isolation: Option<String>,
    /// Hosts to restart it on, most wanted first: host2,host3 ("" clears).
    #[arg(long, value_delimiter = ',')]
    prefer: Option<Vec<String>>,
    /// Keep it on a different host from the other VMs of this group ("" leaves it).
    #[arg(long)]
    anti_affinity: Option<String>,
    /// At most this many restarts within --restart-window (0: no limit; default 5).
    #[arg(long)]
    max_restarts: Option<u32>,
    /// The window of --max-restarts: 30m, 1h, 1d (default 1h).
    #[arg(long)]
    restart_window: Option<String>,
}

impl HaArgs {
    fn update(self, ha: Option<bool>) -> UpdateHaRequest {
        UpdateHaRequest {
            ha,
            ha_priority: self.priority,
            isolation: self.isolation,
            preferred_hosts: self
                .prefer
                .map(|hosts| hosts.into_iter().filter(|host| !host.is_empty()).collect()),
            anti_affinity: self.anti_affinity,
            max_restarts: self.max_restarts,
            restart_window: self.restart_window,
        }
    }
}

#[derive(Subcommand)]
pub enum VmVerb {
    /// Create a VM from an image and start it.
    Create {
        name: String,
        #[command(flatten)]
        machine: Box<MachineArgs>,
        /// Default: the template's, else 1.
        #[arg(long)]
        cpus: Option<u32>,
        /// Default: the template's, else 256M.
        #[arg(long)]
        memory: Option<String>,
        /// Make it from a template (`ferry template list`): a linked clone unless --full.
        #[arg(long, conflicts_with_all = ["image", "iso", "blank"])]
        template: Option<String>,
        /// With --template: disks are overlays on the template's base (the default).
        #[arg(long, requires = "template", conflicts_with = "full")]
        linked: bool,
        /// With --template: disks are full copies of the base.
        #[arg(long, requires = "template")]
        full: bool,
        /// Make this many, named NAME-1 … NAME-N, at once.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        count: Option<u32>,
        /// Preferred host.
        #[arg(long)]
        host: Option<String>,
        /// Restart it on another host when its host dies.
        #[arg(long)]
        ha: bool,
        #[command(flatten)]
        policy: HaArgs,
        /// A monitor with the default interval, failures and ladder, as
        /// KIND[:TARGET], e.g. `http:8080/health`, `process:sshd`; repeatable
        /// (`ferry vm monitor add` takes every option).
        #[arg(long = "monitor", value_name = "KIND[:TARGET]")]
        monitors: Vec<String>,
        /// Return once placed, without waiting for the guest.
        #[arg(long)]
        no_wait: bool,
        /// How long to wait for the guest agent to answer (default 3 min, or 10 with --count).
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "no_wait")]
        wait_timeout: Option<Duration>,
        #[arg(long)]
        json: bool,
    },
    /// The serial console, interactive (detach with Ctrl-]), from any host.
    Console { name: String },
    /// The graphical console on a local port for any VNC viewer.
    Vnc {
        name: String,
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:5900")]
        listen: String,
    },
    /// Insert or eject a CD-ROM, running or not.
    Cdrom {
        #[command(subcommand)]
        verb: CdromVerb,
    },
    /// Change a VM's HA policy (options left out keep their value).
    Update {
        name: String,
        /// Restart it on another host when its host dies.
        #[arg(long, conflicts_with = "no_ha")]
        ha: bool,
        /// Stop restarting it elsewhere.
        #[arg(long)]
        no_ha: bool,
        #[command(flatten)]
        policy: HaArgs,
        #[arg(long)]
        json: bool,
    },
    /// All VMs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One VM.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    Start {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Graceful stop (ACPI power button, then power off after a grace period).
    Stop {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Hard reset.
    Reset {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete the VM, its disk and its address.
    Delete {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Move a running VM to another host, live (default) or quick.
    Migrate {
        name: String,
        /// Destination host (default: the one with the most room).
        #[arg(long)]
        to: Option<String>,
        /// `live`: memory copied while the guest runs; `quick`: paused, saved, restored.
        #[arg(long, default_value = "live")]
        mode: String,
        /// Longest pause live migration may end with, in ms (default: the VM's, 50).
        #[arg(long)]
        downtime_limit: Option<u64>,
        /// Bandwidth limit per second, e.g. 100M.
        #[arg(long)]
        bandwidth: Option<String>,
        /// Switch to post-copy when pre-copy has not converged after this many ms.
        #[arg(long)]
        postcopy_after: Option<u64>,
        /// Return once the migration is queued.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// Move a running VM's disk to another pool (block mirror, then pivot).
    MoveDisk {
        name: String,
        disk: String,
        #[arg(long)]
        pool: String,
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        json: bool,
    },
    /// A VM's checkpoints: `ferry vm checkpoint create|list|revert|delete`.
    Checkpoint {
        #[command(subcommand)]
        verb: crate::checkpoint_cli::CheckpointVerb,
    },
    /// A full copy of a stopped VM, or of a VM at one of its checkpoints, with its own
    /// MACs, address, cloud-init seed and name.
    Clone {
        vm: String,
        name: String,
        #[arg(long)]
        checkpoint: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Make a linked clone independent of its template, while it runs.
    Flatten {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// A VM's monitors: `ferry vm monitor add|list|remove`.
    Monitor {
        #[command(subcommand)]
        verb: crate::monitor_cli::MonitorVerb,
    },
    /// Run a command in the guest through its guest agent: `ferry vm exec NAME -- CMD…`.
    Exec {
        name: String,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        #[arg(long)]
        json: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

pub async fn run_host(endpoint: &Endpoint, verb: HostVerb) -> anyhow::Result<()> {
    match verb {
        HostVerb::List { json } => {
            let hosts = endpoint.client()?.list_hosts().await?;
            if json {
                return print_json(&hosts);
            }
            println!("{}", hosts_table(&hosts));
            Ok(())
        }
        HostVerb::Show { name, json } => {
            let host = endpoint.client()?.get_host(&name).await?;
            if json {
                return print_json(&host);
            }
            println!("{}", hosts_table(std::slice::from_ref(&host)));
            for (network, address) in &host.addresses {
                println!("  {network:<11} {address}");
            }
            Ok(())
        }
        HostVerb::Accel { json } => crate::image::accel(json).await,
    }
}

pub fn hosts_table(hosts: &[HostView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "HOST",
        "STATE",
        "VMS",
        "MEMORY USED",
        "CPUS",
        "ACCEL",
        "MANAGEMENT",
        "",
    ]);
    for host in hosts {
        table.add_row([
            host.name.clone(),
            host.state.clone(),
            host.vms.to_string(),
            format!("{} / {} MiB", host.used_memory_mib, host.memory_mib),
            host.cpus.to_string(),
            host.accel.clone(),
            host.addresses
                .get("management")
                .cloned()
                .unwrap_or_default(),
            if host.leader {
                "leader".into()
            } else {
                String::new()
            },
        ]);
    }
    table
}

pub fn vms_table(vms: &[VmView]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "VM",
        "STATE",
        "HOST",
        "IP",
        "CPUS",
        "MEMORY",
        "GUEST AGENT",
        "ERROR",
    ]);
    for vm in vms {
        table.add_row([
            vm.name.clone(),
            vm.state.clone(),
            vm.host.clone().unwrap_or_else(|| "-".into()),
            vm.ip.clone().unwrap_or_else(|| "-".into()),
            vm.cpus.to_string(),
            format!("{} MiB", vm.memory_mib),
            if vm.guest_agent {
                "ok".into()
            } else {
                "-".into()
            },
            vm.error.clone().unwrap_or_default(),
        ]);
    }
    table
}

fn print_vm(vm: &VmView, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(vm);
    }
    println!("{}", vms_table(std::slice::from_ref(vm)));
    println!("{}", ferry_api::ops::ha_summary(&vm.ha_policy));
    println!(
        "firmware {}, CPU model {}, guest agent {}",
        vm.firmware,
        vm.cpu_model,
        if vm.has_guest_agent {
            "expected"
        } else {
            "none"
        }
    );
    for disk in &vm.disks {
        println!(
            "disk {} on {} ({}, {}): {}",
            disk.id,
            disk.pool.as_deref().unwrap_or("-"),
            serde_json::to_value(disk.bus)
                .ok()
                .and_then(|bus| bus.as_str().map(str::to_string))
                .unwrap_or_default(),
            disk.size
                .map(|size| ferry_model::Bytes(size).to_string())
                .unwrap_or_default(),
            disk.path
        );
    }
    for cdrom in &vm.cdroms {
        println!(
            "cdrom {}: {}",
            cdrom.id,
            cdrom.path.as_deref().unwrap_or("(empty)")
        );
    }
    for nic in &vm.nics {
        println!(
            "nic on {} {} ({})",
            nic.network,
            nic.mac,
            serde_json::to_value(nic.model)
                .ok()
                .and_then(|model| model.as_str().map(str::to_string))
                .unwrap_or_default()
        );
    }
    if vm.recent_restarts > 0 {
        println!(
            "{} failure{} or restart{} within the restart window",
            vm.recent_restarts,
            if vm.recent_restarts == 1 { "" } else { "s" },
            if vm.recent_restarts == 1 { "" } else { "s" }
        );
    }
    if !vm.monitors.is_empty() {
        println!("{}", crate::monitor_cli::monitors_table(&vm.monitors));
    }
    Ok(())
}

/// Creates `count` VMs like `request`, named `{name}-1` … at once; with `wait`, waits
/// for all of them together and names every one that did not get ready in time.
async fn create_many(
    client: &ApiClient,
    request: &CreateVmRequest,
    count: u32,
    wait: Option<Duration>,
    json: bool,
) -> anyhow::Result<()> {
    let names: Vec<String> = (1..=count)
        .map(|n| format!("{}-{n}", request.name))
        .collect();
    let creates = names.iter().map(|name| {
        let request = CreateVmRequest {
            name: name.clone(),
            ..request.clone()
        };
        async move { client.create_vm(&request).await }
    });
    let created = crate::checkpoint_cli::with_spinner(
        &format!("creating {count} VMs"),
        json,
        futures::future::join_all(creates),
    )
    .await;
    let mut failures = Vec::new();
    let mut made = Vec::new();
    for (name, result) in names.iter().zip(created) {
        match result {
            Ok(vm) => made.push(vm),
            Err(error) => failures.push(format!("{name}: {error}")),
        }
    }
    if let Some(timeout) = wait {
        let names: Vec<String> = made.iter().map(|vm| vm.name.clone()).collect();
        let (ready, late) = wait_for_all(client, &names, timeout, json).await?;
        made = ready;
        failures.extend(late);
    }
    if json {
        print_json(&made)?;
    } else {
        println!("{}", vms_table(&made));
    }
    if !failures.is_empty() {
        anyhow::bail!(
            "{} of {count} not ready: {}",
            failures.len(),
            failures.join("; ")
        );
    }
    Ok(())
}

/// Whether a VM is in state `want`; a running guest with an agent once the agent answers
/// (a guest without one is ready when QEMU runs it).
fn is_ready(vm: &VmView, want: &str) -> bool {
    vm.state == want && (want != "running" || vm.guest_agent || !vm.has_guest_agent)
}

/// Why a VM that is not ready yet is not, for the message at the end of a wait.
fn not_ready_reason(vm: &VmView, timeout: Duration) -> String {
    if vm.state == "running" {
        format!("running for {timeout:?} without its guest agent answering (still booting?)",)
    } else {
        format!("still {} after {timeout:?}", vm.state)
    }
}

/// Waits until every VM in `names` runs with its guest agent answering, polling one
/// listing for all of them; returns the ready ones and, for the others, why not.
async fn wait_for_all(
    client: &ApiClient,
    names: &[String],
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<(Vec<VmView>, Vec<String>)> {
    let bar = (!quiet).then(|| {
        let bar = indicatif::ProgressBar::new(names.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} ready {msg}")
                .expect("a valid progress template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let started = Instant::now();
    let outcome = loop {
        let listing = client.list_vms().await?;
        let ours: Vec<&VmView> = names
            .iter()
            .filter_map(|name| listing.iter().find(|vm| &vm.name == name))
            .collect();
        let gone: Vec<String> = names
            .iter()
            .filter(|name| !listing.iter().any(|vm| &vm.name == *name))
            .map(|name| format!("{name}: deleted while waiting"))
            .collect();
        let failed: Vec<String> = ours
            .iter()
            .filter(|vm| vm.state == "failed")
            .map(|vm| {
                format!(
                    "{}: failed: {}",
                    vm.name,
                    vm.error.as_deref().unwrap_or("no reason given")
                )
            })
            .collect();
        let ready: Vec<VmView> = ours
            .iter()
            .filter(|vm| is_ready(vm, "running"))
            .map(|vm| (*vm).clone())
            .collect();
        if let Some(bar) = &bar {
            bar.set_position(ready.len() as u64);
            bar.set_message(format!("({:.0} s)", started.elapsed().as_secs_f64()));
        }
        let settled = ready.len() + failed.len() + gone.len() == names.len();
        if settled || started.elapsed() > timeout {
            let late = ours
                .iter()
                .filter(|vm| vm.state != "failed" && !is_ready(vm, "running"))
                .map(|vm| format!("{}: {}", vm.name, not_ready_reason(vm, timeout)));
            let problems = gone.into_iter().chain(failed).chain(late).collect();
            break (ready, problems);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    Ok(outcome)
}

/// Waits until the VM reports `want` (and, for running, its guest agent answers).
async fn wait_for(
    client: &ApiClient,
    name: &str,
    want: &str,
    timeout: Duration,
    quiet: bool,
) -> anyhow::Result<VmView> {
    let spinner = (!quiet).then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.enable_steady_tick(Duration::from_millis(100));
        spinner
    });
    let started = Instant::now();
    let result = loop {
        let vm = client.get_vm(name).await?;
        if let Some(spinner) = &spinner {
            spinner.set_message(format!(
                "VM {name}: {} on {} ({:.0} s)",
                vm.state,
                vm.host.as_deref().unwrap_or("-"),
                started.elapsed().as_secs_f64()
            ));
        }
        if is_ready(&vm, want) {
            break Ok(vm);
        }
        if vm.state == "failed" {
            break Err(anyhow::anyhow!(
                "VM {name} failed: {}",
                vm.error.unwrap_or_else(|| "no reason given".into())
            ));
        }
        if started.elapsed() > timeout {
            break Err(anyhow::anyhow!(
                "VM {name}: {}",
                not_ready_reason(&vm, timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    result
}

pub async fn run_vm(endpoint: &Endpoint, verb: VmVerb) -> anyhow::Result<()> {
    let client = endpoint.client()?;
    match verb {
        VmVerb::Create {
            name,
            machine,
            cpus,
            memory,
            template,
            linked: _,
            full,
            count,
            host,
            ha,
            policy,
            monitors,
            no_wait,
            wait_timeout,
            json,
        } => {
            let from_template = template.is_some();
            let policy = policy.update(Some(ha));
            let monitors = monitors
                .iter()
                .map(|text| {
                    let (kind, target) = match text.split_once(':') {
                        Some((kind, target)) => (kind, Some(target.to_string())),
                        None => (text.as_str(), None),
                    };
                    AddMonitorRequest {
                        kind: kind.into(),
                        target,
                        ..AddMonitorRequest::default()
                    }
                })
                .collect();
            let mut request = CreateVmRequest {
                name: name.clone(),
                cpus: cpus.unwrap_or(if from_template { 0 } else { 1 }),
                memory: memory.unwrap_or_else(|| {
                    if from_template {
                        String::new()
                    } else {
                        "256M".into()
                    }
                }),
                template,
                linked: from_template.then_some(!full),
                host,
                ha,
                ha_priority: policy.ha_priority.unwrap_or(0),
                isolation: policy.isolation,
                preferred_hosts: policy.preferred_hosts.unwrap_or_default(),
                anti_affinity: policy.anti_affinity,
                max_restarts: policy.max_restarts,
                restart_window: policy.restart_window,
                monitors,
                ..CreateVmRequest::default()
            };
            machine.fill(&mut request)?;
            if let Some(count) = count {
                let wait = (!no_wait).then(|| wait_timeout.unwrap_or(Duration::from_secs(600)));
                return create_many(&client, &request, count, wait, json).await;
            }
            let mut vm = crate::checkpoint_cli::with_spinner(
                &format!("creating VM {name}"),
                json,
                client.create_vm(&request),
            )
            .await?;
            if !no_wait {
                let timeout = wait_timeout.unwrap_or(Duration::from_secs(180));
                vm = wait_for(&client, &name, "running", timeout, json).await?;
            }
            print_vm(&vm, json)
        }
        VmVerb::Checkpoint { verb } => crate::checkpoint_cli::run_checkpoint(&client, verb).await,
        VmVerb::Clone {
            vm,
            name,
            checkpoint,
            host,
            json,
        } => {
            let request = ferry_api::types::CloneVmRequest {
                name: name.clone(),
                checkpoint,
                host,
            };
            crate::checkpoint_cli::clone_vm(&client, &vm, request, json).await?;
            let vm = wait_for(&client, &name, "running", Duration::from_secs(180), json).await?;
            print_vm(&vm, json)
        }
        VmVerb::Flatten { name, json } => {
            crate::checkpoint_cli::flatten(&client, &name, json).await
        }
        VmVerb::List { json } => {
            let vms = client.list_vms().await?;
            if json {
                return print_json(&vms);
            }
            println!("{}", vms_table(&vms));
            Ok(())
        }
        VmVerb::Show { name, json } => print_vm(&client.get_vm(&name).await?, json),
        VmVerb::Monitor { verb } => crate::monitor_cli::run(&client, verb).await,
        VmVerb::Console { name } => crate::console::serial(&client, &name).await,
        VmVerb::Vnc { name, listen } => crate::console::vnc(&client, &name, &listen).await,
        VmVerb::Cdrom { verb } => {
            let (name, drive, image, json) = match verb {
                CdromVerb::Insert {
                    name,
                    image,
                    drive,
                    json,
                } => (name, drive, Some(image), json),
                CdromVerb::Eject { name, drive, json } => (name, drive, None, json),
            };
            let vm = client.change_cdrom(&name, &drive, image.as_deref()).await?;
            if !json {
                match &image {
                    Some(image) => println!("{name}: {image} in drive {drive}"),
                    None => println!("{name}: drive {drive} ejected"),
                }
                return Ok(());
            }
            print_vm(&vm, json)
        }
        VmVerb::Update {
            name,
            ha,
            no_ha,
            policy,
            json,
        } => {
            let enabled = match (ha, no_ha) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            print_vm(
                &client.update_ha(&name, &policy.update(enabled)).await?,
                json,
            )
        }
        VmVerb::Start { name, json } => {
            client.start_vm(&name).await?;
            let vm = wait_for(&client, &name, "running", Duration::from_secs(180), json).await?;
            print_vm(&vm, json)
        }
        VmVerb::Stop { name, json } => {
            client.stop_vm(&name).await?;
            let vm = wait_for(&client, &name, "stopped", Duration::from_secs(120), json).await?;
            print_vm(&vm, json)
        }
        VmVerb::Reset { name, json } => print_vm(&client.reset_vm(&name).await?, json),
        VmVerb::Delete { name, json } => {
            client.delete_vm(&name).await?;
            if json {
                return print_json(&serde_json::json!({"deleted": name}));
            }
            println!("VM {name} deleted");
            Ok(())
        }
        VmVerb::Migrate {
            name,
            to,
            mode,
            downtime_limit,
            bandwidth,
            postcopy_after,
            no_wait,
            json,
        } => {
            crate::ops::migrate(
                &client,
                crate::ops::MigrateArgs {
                    name,
                    to,
                    mode,
                    downtime_limit_ms: downtime_limit,
                    bandwidth,
                    postcopy_after_ms: postcopy_after,
                    no_wait,
                    json,
                },
            )
            .await
        }
        VmVerb::MoveDisk {
            name,
            disk,
            pool,
            no_wait,
            json,
        } => crate::ops::move_disk(&client, &name, &disk, pool, no_wait, json).await,
        VmVerb::Exec {
            name,
            timeout,
            json,
            command,
        } => {
            let output = client
                .exec_vm(
                    &name,
                    &ExecRequest {
                        command,
                        timeout_seconds: Some(timeout),
                    },
                )
                .await?;
            if json {
                return print_json(&output);
            }
            print!("{}", output.stdout);
            eprint!("{}", output.stderr);
            match output.exit_code {
                Some(0) => Ok(()),
                Some(code) => std::process::exit(i32::try_from(code).unwrap_or(1)),
                None => anyhow::bail!("command killed by signal {}", output.signal.unwrap_or(0)),
            }
        }
    }
}

pub async fn run_events(
    endpoint: &Endpoint,
    follow: bool,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    let client = endpoint.client()?;
    let show = |event: ferry_api::types::EventView| {
        if json {
            println!("{}", serde_json::to_string(&event).unwrap_or_default());
        } else {
            let seconds = event.at_ms / 1000;
            let time = format!(
                "{:02}:{:02}:{:02}.{:03}",
                seconds / 3600 % 24,
                seconds / 60 % 60,
                seconds % 60,
                event.at_ms % 1000
            );
            println!(
                "{time}  {:<16} {:<14} {}",
                event.subject, event.kind, event.message
            );
        }
    };
    for event in client
        .list_events(limit)
        .await
        .context("cannot list events")?
    {
        show(event);
    }
    if follow {
        client.follow_events(show).await?;
    }
    Ok(())
}
