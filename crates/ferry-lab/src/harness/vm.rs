//! A benchmark's VM: made fresh from the appliance, waited on until it answers, moved
//! between hosts, removed after the runs.

use std::time::{Duration, Instant};

use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, MigrateRequest, OpView, VmView};

use super::HarnessError;
use crate::lab::APPLIANCE_IMAGE;

/// How long a VM may take to run with its guest agent answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(180);

/// A VM from the appliance with one CPU, on host1, where every benchmark starts.
pub fn bench_vm(name: &str, memory: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        image: Some(APPLIANCE_IMAGE.into()),
        cpus: 1,
        memory: memory.into(),
        host: Some("host1".into()),
        ..Default::default()
    }
}

/// [`bench_vm`] with HA. It fails over once per run, so it has no restart limit: one
/// would end the benchmark.
pub fn ha_bench_vm(name: &str, memory: &str) -> CreateVmRequest {
    CreateVmRequest {
        ha: true,
        max_restarts: Some(0),
        ..bench_vm(name, memory)
    }
}

/// Creates the VM of `request`, first deleting the one an earlier run left by that name.
pub async fn create_fresh_vm(
    client: &ApiClient,
    request: &CreateVmRequest,
) -> Result<VmView, HarnessError> {
    if client.get_vm(&request.name).await.is_ok() {
        client.delete_vm(&request.name).await?;
        // The old VM's host finishes the delete after the answer.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    Ok(client.create_vm(request).await?)
}

/// Removes a benchmark's VM after its runs. A failure is logged, not returned, so that
/// it does not hide the runs' own result.
pub async fn remove_bench_vm(client: &ApiClient, name: &str) {
    if let Err(error) = client.delete_vm(name).await {
        tracing::warn!("cannot remove VM {name} after the benchmark: {error}");
    }
}

/// Waits until the VM runs and its guest agent answers.
pub async fn wait_answering(client: &ApiClient, name: &str) -> Result<VmView, HarnessError> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        let vm = client.get_vm(name).await?;
        if vm.state == "running" && vm.guest_agent {
            return Ok(vm);
        }
        if vm.state == "failed" {
            return Err(HarnessError::VmFailed {
                vm: name.into(),
                error: vm.error.unwrap_or_default(),
            });
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::TimedOut(format!(
                "VM {name} still {} after {} s",
                vm.state,
                ANSWER_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asks for the migration of `vm` to host `to` in `mode` (live or quick); returns the
/// op as it started.
pub async fn start_migration(
    client: &ApiClient,
    vm: &str,
    to: &str,
    mode: &str,
) -> Result<OpView, HarnessError> {
    Ok(client
        .migrate_vm(
            vm,
            &MigrateRequest {
                to: Some(to.into()),
                mode: Some(mode.into()),
                ..MigrateRequest::default()
            },
        )
        .await?)
}

/// [`start_migration`], then waits for its op to end, however it ends.
pub async fn migrate_and_wait(
    client: &ApiClient,
    vm: &str,
    to: &str,
    mode: &str,
) -> Result<OpView, HarnessError> {
    let started = start_migration(client, vm, to, mode).await?;
    Ok(client
        .wait_op(&started.id, Duration::from_millis(100), |_| {})
        .await?)
}

/// An error unless the migration's op completed.
pub fn ensure_migrated(op: &OpView) -> Result<(), HarnessError> {
    if op.status == "completed" {
        return Ok(());
    }
    Err(HarnessError::Migration {
        id: op.id.clone(),
        status: op.status.clone(),
        error: op.error.clone().unwrap_or_default(),
    })
}
