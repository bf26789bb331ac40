//! `ferry bench ha`: one HA VM, its host powered off again and again. For every run the
//! time from the fault to the host's lease expiring, to the manager's verdict that the
//! host is down (its storage heartbeat silent past the self-fence deadline: our fence
//! confirmation), to QEMU started elsewhere, to ferry-guest answering; with failed and
//! lost writes. The host is mended after each run and the next run powers off the
//! VM's new host.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use ferry_lab::harness::faults::heal_and_wait;
use ferry_lab::harness::lab::{host_client, load_lab};
use ferry_lab::harness::stats::spread;
use ferry_lab::harness::vm::{create_fresh_vm, ha_bench_vm, remove_bench_vm, wait_answering};
use ferry_lab::lab::{Fault, Lab};
use ferry_lab::workload::{boot_id, lost_writes, Writer};
use ferry_model::cluster::now_ms;
use serde::Serialize;

use crate::output::{print_json, write_json_file};

const VM: &str = "bench-ha";
const WRITE_EVERY: Duration = Duration::from_millis(50);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    pub run: u32,
    pub from: String,
    pub to: String,
    /// Milliseconds after the power-off.
    pub lease_expired_ms: u64,
    pub declared_down_ms: u64,
    /// The host's fence device confirmed it off (none if it has no device).
    pub fence_confirmed_ms: Option<u64>,
    pub qemu_started_ms: u64,
    pub answering_ms: u64,
    pub failed_writes: usize,
    pub lost_writes: usize,
}

pub async fn run(
    runs: u32,
    lab_name: &str,
    json_file: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    let mut lab = load_lab(lab_name)?;
    let client = host_client(&lab, 1)?;
    create_fresh_vm(&client, &ha_bench_vm(VM, "256M")).await?;
    let mut samples = Vec::new();
    for run in 1..=runs {
        let sample = measure_one(&mut lab, run).await;
        match sample {
            Ok(sample) => {
                if !json {
                    eprintln!(
                        "run {run}: {} → {}: lease {} ms, declared down {} ms, fence confirmed {} ms, QEMU {} ms, answering {} ms",
                        sample.from,
                        sample.to,
                        sample.lease_expired_ms,
                        sample.declared_down_ms,
                        sample
                            .fence_confirmed_ms
                            .map_or("-".to_string(), |ms| ms.to_string()),
                        sample.qemu_started_ms,
                        sample.answering_ms
                    );
                }
                samples.push(sample);
            }
            Err(error) => {
                remove_bench_vm(&host_client(&lab, 2)?, VM).await;
                return Err(error.context(format!("run {run}")));
            }
        }
    }
    remove_bench_vm(&host_client(&lab, 2)?, VM).await;
    if let Some(path) = json_file {
        write_json_file(&path, &samples)?;
    }
    if json {
        return print_json(&samples);
    }
    println!("{}", summary_table(&samples));
    Ok(())
}

async fn measure_one(lab: &mut Lab, run: u32) -> anyhow::Result<Sample> {
    let any = host_client(lab, 1)?;
    let any = if any.list_hosts().await.is_ok() {
        any
    } else {
        host_client(lab, 2)?
    };
    let vm = wait_answering(&any, VM).await?;
    let from = vm.host.clone().unwrap_or_default();
    let from_number = lab.spec().parse_host(&from).map_err(anyhow::Error::msg)?;
    let watcher_host = lab
        .spec()
        .host_numbers()
        .find(|host| *host != from_number)
        .unwrap_or(1);
    let client = host_client(lab, watcher_host)?;
    let ip = vm
        .ip
        .ok_or_else(|| anyhow::anyhow!("VM {VM} has no address"))?;
    let writer = Writer::start(&ip, &format!("ha{run}-"), WRITE_EVERY, CLIENT_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let fault_ms = now_ms();
    lab.fault(from_number, Fault::PowerOff)?;
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut lease_expired_ms = None;
    let answering_ms = loop {
        anyhow::ensure!(Instant::now() < deadline, "VM {VM} never came back");
        if lease_expired_ms.is_none()
            && client
                .list_hosts()
                .await
                .is_ok_and(|hosts| !hosts.iter().any(|host| host.name == from))
        {
            lease_expired_ms = Some(now_ms() - fault_ms);
        }
        let moved = client
            .get_vm(VM)
            .await
            .is_ok_and(|vm| vm.host.as_deref().is_some_and(|host| host != from));
        if moved && boot_id(&ip).await.is_ok() {
            break now_ms() - fault_ms;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = writer.stop().await;
    let lost = lost_writes(&ip, &log).await.map_err(anyhow::Error::msg)?;
    let events = client.list_events(500).await?;
    let after = |kind: &str, subject: &str| {
        events
            .iter()
            .find(|event| event.kind == kind && event.subject == subject && event.at_ms >= fault_ms)
            .map(|event| event.at_ms - fault_ms)
    };
    let declared = after("host-fate", &format!("host/{from}"))
        .ok_or_else(|| anyhow::anyhow!("no verdict on {from} in the event log"))?;
    let started = after("started", &format!("vm/{VM}"))
        .ok_or_else(|| anyhow::anyhow!("no start of {VM} in the event log"))?;
    let fence_confirmed_ms = after("fenced-off", &format!("host/{from}"));
    let to = client.get_vm(VM).await?.host.unwrap_or_default();
    heal_and_wait(lab, &client, &from).await?;
    Ok(Sample {
        run,
        from,
        to,
        lease_expired_ms: lease_expired_ms.unwrap_or(declared),
        declared_down_ms: declared,
        fence_confirmed_ms,
        qemu_started_ms: started,
        answering_ms,
        failed_writes: log.failures.len(),
        lost_writes: lost.len(),
    })
}

pub fn summary_table(samples: &[Sample]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY);
    table.set_header([
        "RUNS",
        "LEASE EXPIRED ms",
        "DECLARED DOWN ms",
        "FENCE CONFIRMED ms",
        "QEMU STARTED ms",
        "ANSWERING ms",
        "LOST WRITES",
    ]);
    table.add_row([
        samples.len().to_string(),
        spread(samples.iter().map(|sample| Some(sample.lease_expired_ms))),
        spread(samples.iter().map(|sample| Some(sample.declared_down_ms))),
        spread(samples.iter().map(|sample| sample.fence_confirmed_ms)),
        spread(samples.iter().map(|sample| Some(sample.qemu_started_ms))),
        spread(samples.iter().map(|sample| Some(sample.answering_ms))),
        samples
            .iter()
            .map(|sample| sample.lost_writes)
            .sum::<usize>()
            .to_string(),
    ]);
    table
}
