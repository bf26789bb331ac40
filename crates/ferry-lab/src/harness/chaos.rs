//! `ferry bench chaos`: random faults against a lab that runs HA VMs, each with a
//! writer client, and Ferry's three promises checked around every fault:
//! - never two running copies of a VM (sampled every 50 ms across all hosts, through
//!   the fault, the healing and the settling);
//! - every HA VM running again (its guest answering) once the lab is healed;
//! - no acknowledged write lost (every key the guest acknowledged is there after).
//!
//! A trial: every VM answers, the writers start, one fault is chosen at random (seeded,
//! so a run can be repeated) and injected on the host of a random VM — a power-off; a cut
//! management, migration or business link; the agent killed or hung; etcd killed and
//! restarted; or a live migration interrupted by a power-off or an agent kill of its
//! source or its destination — held for a while, then every host is healed, and the
//! trial waits for the cluster to settle. The time to recover runs from the fault to
//! every VM answering again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_api::client::ApiClient;
use serde::Serialize;

use super::double_run::DoubleRunWatch;
use super::vm::{create_fresh_vm, ha_bench_vm, start_migration};
use super::HarnessError;
use crate::lab::{Fault, Lab, LabNet};
use crate::workload::{boot_id, lost_writes, Writer};

/// The VMs every trial runs, one on each of the first hosts.
pub const CHAOS_VMS: [&str; 2] = ["chaos-1", "chaos-2"];
/// How long a VM may take to answer again after a trial's fault is healed.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the writers write, and how long one write may take.
const WRITE_EVERY: Duration = Duration::from_millis(100);
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChaosFault {
    PowerOff,
    ManagementCut,
    MigrationCut,
    BusinessCut,
    AgentKill,
    AgentHang,
    EtcdRestart,
    MigrationSourcePowerOff,
    MigrationDestinationPowerOff,
    MigrationSourceAgentKill,
    MigrationDestinationAgentKill,
}

impl ChaosFault {
    pub const ALL: [ChaosFault; 11] = [
        ChaosFault::PowerOff,
        ChaosFault::ManagementCut,
        ChaosFault::MigrationCut,
        ChaosFault::BusinessCut,
        ChaosFault::AgentKill,
        ChaosFault::AgentHang,
        ChaosFault::EtcdRestart,
        ChaosFault::MigrationSourcePowerOff,
        ChaosFault::MigrationDestinationPowerOff,
        ChaosFault::MigrationSourceAgentKill,
        ChaosFault::MigrationDestinationAgentKill,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ChaosFault::PowerOff => "power-off",
            ChaosFault::ManagementCut => "management link cut",
            ChaosFault::MigrationCut => "migration link cut",
            ChaosFault::BusinessCut => "business link cut",
            ChaosFault::AgentKill => "agent killed",
            ChaosFault::AgentHang => "agent hung",
            ChaosFault::EtcdRestart => "etcd killed and restarted",
            ChaosFault::MigrationSourcePowerOff => "migration: source powered off",
            ChaosFault::MigrationDestinationPowerOff => "migration: destination powered off",
            ChaosFault::MigrationSourceAgentKill => "migration: source agent killed",
            ChaosFault::MigrationDestinationAgentKill => "migration: destination agent killed",
        }
    }
}

/// One trial and what its checks found.
#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub number: u32,
    pub fault: ChaosFault,
    /// The host it hit (none for etcd).
    pub host: Option<String>,
    /// From the fault to every VM answering again; none if one never did.
    pub recovery_ms: Option<u64>,
    pub double_runs: Vec<String>,
    pub lost_writes: Vec<String>,
    pub left_down: Vec<String>,
    /// Writes the guests acknowledged during the trial (all checked).
    pub acknowledged: usize,
}

impl Trial {
    pub fn clean(&self) -> bool {
        self.double_runs.is_empty() && self.lost_writes.is_empty() && self.left_down.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ChaosReport {
    pub seed: u64,
    pub trials: Vec<Trial>,
}

impl ChaosReport {
    pub fn faults_by_kind(&self) -> BTreeMap<ChaosFault, usize> {
        let mut counts = BTreeMap::new();
        for trial in &self.trials {
            *counts.entry(trial.fault).or_default() += 1;
        }
        counts
    }

    pub fn double_runs(&self) -> usize {
        self.trials
            .iter()
            .map(|trial| trial.double_runs.len())
            .sum()
    }

    pub fn lost_writes(&self) -> usize {
        self.trials
            .iter()
            .map(|trial| trial.lost_writes.len())
            .sum()
    }

    pub fn left_down(&self) -> usize {
        self.trials.iter().map(|trial| trial.left_down.len()).sum()
    }

    /// Recovery times in seconds, of the trials that recovered.
    pub fn recoveries(&self) -> Vec<f64> {
        self.trials
            .iter()
            .filter_map(|trial| trial.recovery_ms)
            .map(|ms| ms as f64 / 1000.0)
            .collect()
    }
}

/// Clients of every host's API: whichever answers serves the request, since any one
/// host may be the one a trial broke.
struct Clients(Vec<ApiClient>);

impl Clients {
    fn of(lab: &Lab) -> Result<Clients, HarnessError> {
        Ok(Clients(
            (1..=lab.spec().hosts)
                .map(|host| super::lab::host_client(lab, host))
                .collect::<Result<_, _>>()?,
        ))
    }

    async fn get_vm(&self, name: &str) -> Result<ferry_api::types::VmView, HarnessError> {
        let mut last = None;
        for client in &self.0 {
            match client.get_vm(name).await {
                Ok(vm) => return Ok(vm),
                Err(error) => last = Some(error),
            }
        }
        Err(last.map_or_else(
            || HarnessError::Unfit("the lab has no hosts".into()),
            Into::into,
        ))
    }

    fn first(&self) -> &ApiClient {
        &self.0[0]
    }
}

/// Runs `trials` trials against `lab` (three hosts or more), seeded by `seed`; calls
/// `on_trial` after each. The VMs are made fresh first and removed after.
pub async fn run(
    lab: &mut Lab,
    trials: u32,
    seed: u64,
    mut on_trial: impl FnMut(&Trial),
) -> Result<ChaosReport, HarnessError> {
    let hosts = lab.spec().hosts;
    let clients = Clients::of(lab)?;
    let client = clients.first();
    if hosts < 3 {
        return Err(HarnessError::Unfit(format!(
            "lab {} has {hosts} hosts; chaos needs three, so that a majority survives any one fault",
            lab.spec().name
        )));
    }
    for (index, name) in CHAOS_VMS.iter().enumerate() {
        let mut request = ha_bench_vm(name, "256M");
        request.host = Some(format!("host{}", index + 1));
        create_fresh_vm(client, &request).await?;
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut report = ChaosReport {
        seed,
        trials: Vec::new(),
    };
    for number in 1..=trials {
        let fault = ChaosFault::ALL[rng.usize(..ChaosFault::ALL.len())];
        let trial = run_trial(lab, &clients, &mut rng, number, fault).await?;
        on_trial(&trial);
        report.trials.push(trial);
    }
    for name in CHAOS_VMS {
        super::vm::remove_bench_vm(clients.first(), name).await;
    }
    Ok(report)
}

/// Every chaos VM running with its guest answering, on hosts the lab can reach, by
/// name with its address; `Err` names the ones that are not (yet).
async fn all_answering(client: &Clients) -> Result<BTreeMap<String, String>, Vec<String>> {
    let mut answering = BTreeMap::new();
    let mut down = Vec::new();
    for name in CHAOS_VMS {
        let vm = match client.get_vm(name).await {
            Ok(vm) => vm,
            Err(error) => {
                down.push(format!("VM {name}: {error}"));
                continue;
            }
        };
        let ip = vm.ip.clone().unwrap_or_default();
        let answers = vm.state == "running" && vm.guest_agent && boot_id(&ip).await.is_ok();
        if answers {
            answering.insert(name.to_string(), ip);
        } else {
            down.push(format!(
                "VM {name} is {} on {}{}",
                vm.state,
                vm.host.as_deref().unwrap_or("no host"),
                vm.error
                    .map(|error| format!(" ({error})"))
                    .unwrap_or_default()
            ));
        }
    }
    if down.is_empty() {
        Ok(answering)
    } else {
        Err(down)
    }
}

/// Waits until every chaos VM answers, or `timeout`.
async fn settle(
    client: &Clients,
    timeout: Duration,
) -> Result<BTreeMap<String, String>, Vec<String>> {
    let deadline = Instant::now() + timeout;
    loop {
        match all_answering(client).await {
            Ok(answering) => return Ok(answering),
            Err(down) if Instant::now() >= deadline => return Err(down),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn run_trial(
    lab: &mut Lab,
    client: &Clients,
    rng: &mut fastrand::Rng,
    number: u32,
    fault: ChaosFault,
) -> Result<Trial, HarnessError> {
    let hosts = lab.spec().hosts;
    // Every VM answers before the fault: a trial judges its own fault only.
    let addresses = settle(client, SETTLE_TIMEOUT).await.map_err(|down| {
        HarnessError::TimedOut(format!("before trial {number}: {}", down.join("; ")))
    })?;
    let watch = DoubleRunWatch::start(lab.spec().run_dir.clone());
    let writers: Vec<(String, Writer)> = addresses
        .values()
        .map(|ip| {
            (
                ip.clone(),
                Writer::start(ip, &format!("trial{number}-"), WRITE_EVERY, WRITE_TIMEOUT),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Host faults hit the host of one of the VMs: a fault nobody runs on proves little.
    let target = client
        .get_vm(CHAOS_VMS[rng.usize(..CHAOS_VMS.len())])
        .await?;
    let mut host = target
        .host
        .as_deref()
        .and_then(|host| host.strip_prefix("host")?.parse().ok())
        .unwrap_or_else(|| 1 + rng.u32(..hosts));
    let mut etcd_killed = false;
    let faulted = Instant::now();
    match fault {
        ChaosFault::PowerOff => {
            lab.fault(host, Fault::PowerOff)?;
        }
        ChaosFault::ManagementCut => {
            lab.fault(host, Fault::LinkDown(LabNet::Management))?;
        }
        ChaosFault::MigrationCut => {
            lab.fault(host, Fault::LinkDown(LabNet::Migration))?;
        }
        ChaosFault::BusinessCut => {
            lab.fault(host, Fault::LinkDown(LabNet::Business))?;
        }
        ChaosFault::AgentKill => {
            lab.fault(host, Fault::AgentKill)?;
        }
        ChaosFault::AgentHang => {
            lab.fault(host, Fault::AgentHang)?;
        }
        ChaosFault::EtcdRestart => {
            lab.kill_etcd()?;
            etcd_killed = true;
        }
        ChaosFault::MigrationSourcePowerOff
        | ChaosFault::MigrationDestinationPowerOff
        | ChaosFault::MigrationSourceAgentKill
        | ChaosFault::MigrationDestinationAgentKill => {
            let name = CHAOS_VMS[rng.usize(..CHAOS_VMS.len())];
            let vm = client.get_vm(name).await?;
            let source: u32 = vm
                .host
                .as_deref()
                .and_then(|host| host.strip_prefix("host")?.parse().ok())
                .unwrap_or(1);
            let destination = (source % hosts) + 1;
            let asked =
                start_migration(client.first(), name, &format!("host{destination}"), "live").await;
            // A refusal (say, a queue still busy from the last trial) leaves a plain
            // host fault, which is still a trial.
            if let Err(error) = asked {
                tracing::warn!("trial {number}: migration of {name} not started: {error}");
            }
            // Somewhere between preparing the destination and the switch-over.
            tokio::time::sleep(Duration::from_millis(200 + rng.u64(..3000))).await;
            let at_source = matches!(
                fault,
                ChaosFault::MigrationSourcePowerOff | ChaosFault::MigrationSourceAgentKill
            );
            host = if at_source { source } else { destination };
            let kind = match fault {
                ChaosFault::MigrationSourcePowerOff | ChaosFault::MigrationDestinationPowerOff => {
                    Fault::PowerOff
                }
                _ => Fault::AgentKill,
            };
            lab.fault(host, kind)?;
        }
    }
    // Long enough for leases to expire and HA to act, or not.
    tokio::time::sleep(Duration::from_secs(5 + rng.u64(..8))).await;
    if etcd_killed {
        lab.start_etcd().await?;
    }
    for healed in 1..=hosts {
        lab.heal(healed)?;
    }
    let settled = settle(client, SETTLE_TIMEOUT).await;
    let recovery_ms = settled
        .as_ref()
        .ok()
        .map(|_| faulted.elapsed().as_millis() as u64);
    // A little longer under watch: a second copy would show up now if ever.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut lost = Vec::new();
    let mut acknowledged = 0;
    for (ip, writer) in writers {
        let log = writer.stop().await;
        acknowledged += log.acked.len();
        match lost_writes(&ip, &log).await {
            Ok(missing) => lost.extend(missing.into_iter().map(|key| format!("{ip}: {key}"))),
            // The guest cannot be asked: its writes cannot be counted as kept.
            Err(error) => lost.push(format!("{ip}: cannot read the guest's writes: {error}")),
        }
    }
    Ok(Trial {
        number,
        fault,
        host: (fault != ChaosFault::EtcdRestart).then(|| format!("host{host}")),
        recovery_ms,
        double_runs: watch.stop().await,
        lost_writes: lost,
        left_down: settled.err().unwrap_or_default(),
        acknowledged,
    })
}
