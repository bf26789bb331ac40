//! The host faults a run makes and mends through the API's eyes: a host powered off
//! until its VM answers elsewhere, a host healed until it is registered again.

use std::time::{Duration, Instant};

use ferry_api::client::ApiClient;

use super::HarnessError;
use crate::lab::{Fault, Lab};
use crate::workload::boot_id;

/// How long an HA VM may take to answer on another host after its host powered off.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a healed host may take to register again.
const REJOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Powers `host` off and waits until `vm` runs on another host with its guest agent and
/// ferry-guest answering.
pub async fn power_off_and_wait(
    lab: &mut Lab,
    client: &ApiClient,
    host: &str,
    vm: &str,
) -> Result<(), HarnessError> {
    let number = lab
        .spec()
        .parse_host(host)
        .map_err(HarnessError::NoSuchHost)?;
    lab.fault(number, Fault::PowerOff)?;
    let deadline = Instant::now() + FAILOVER_TIMEOUT;
    loop {
        if Instant::now() >= deadline {
            return Err(HarnessError::TimedOut(format!(
                "VM {vm} never came back after {host} powered off"
            )));
        }
        if let Ok(view) = client.get_vm(vm).await {
            let moved = view.host.as_deref().is_some_and(|now| now != host)
                && view.state == "running"
                && view.guest_agent;
            if moved
                && boot_id(view.ip.as_deref().unwrap_or_default())
                    .await
                    .is_ok()
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Brings a powered-off host back and waits until it is registered again.
pub async fn heal_and_wait(
    lab: &mut Lab,
    client: &ApiClient,
    host: &str,
) -> Result<(), HarnessError> {
    let number = lab
        .spec()
        .parse_host(host)
        .map_err(HarnessError::NoSuchHost)?;
    lab.heal(number)?;
    let deadline = Instant::now() + REJOIN_TIMEOUT;
    while !client
        .list_hosts()
        .await
        .is_ok_and(|hosts| hosts.iter().any(|known| known.name == host))
    {
        if Instant::now() >= deadline {
            return Err(HarnessError::TimedOut(format!(
                "{host} did not rejoin after the heal"
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
