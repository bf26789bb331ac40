//! Running a host's fence device: a ClusterLabs fence agent (`fence_ipmilan`,
//! `fence_ferry_lab`, …) fed `key=value` lines on stdin. The leader powers a dead host
//! off through it and counts the host as off only when `off` succeeded and `status`
//! then says off; a failure or a timeout is retried, never taken as success. The
//! protocol itself is `ferry_manager::fence`.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_manager::fence::{outcome, request, retry_delay, FenceAction, Power};
use ferry_model::ha::FenceDevice;
use tokio::io::AsyncWriteExt;

/// Runs one action; `Ok` only for an exit code the protocol defines as success.
pub async fn run_action(
    device: &FenceDevice,
    action: FenceAction,
) -> Result<Option<Power>, String> {
    let agent = device.agent.display().to_string();
    let mut child = tokio::process::Command::new(&device.agent)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot run fence agent {agent}: {error}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let text = request(action, &device.options);
    let timeout = Duration::from_millis(device.timeout_ms);
    let finished = tokio::time::timeout(timeout, async move {
        stdin.write_all(text.as_bytes()).await?;
        drop(stdin);
        child.wait_with_output().await
    })
    .await;
    let output = match finished {
        Err(_) => {
            return Err(format!(
                "fence agent {agent} did not finish {} within {} ms",
                action.name(),
                device.timeout_ms
            ))
        }
        Ok(Err(error)) => return Err(format!("fence agent {agent}: {error}")),
        Ok(Ok(output)) => output,
    };
    outcome(action, output.status.code()).map_err(|problem| {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stderr = stderr.lines().last().unwrap_or("").trim();
        if stderr.is_empty() {
            format!("fence agent {agent}: {problem}")
        } else {
            format!("fence agent {agent}: {problem}: {stderr}")
        }
    })
}

/// Powers the host off and checks that it is off.
pub async fn power_off(device: &FenceDevice) -> Result<(), String> {
    run_action(device, FenceAction::Off).await?;
    match run_action(device, FenceAction::Status).await? {
        Some(Power::Off) => Ok(()),
        _ => Err(format!(
            "fence agent {}: off succeeded but status still says on",
            device.agent.display()
        )),
    }
}

pub use ferry_model::ha::FenceProgress;

/// A fence in the background, retried until it is confirmed or dropped (the host came
/// back, or this agent no longer leads).
pub struct FenceJob {
    progress: Arc<Mutex<FenceProgress>>,
    task: tokio::task::JoinHandle<()>,
}

impl FenceJob {
    pub fn start(device: FenceDevice) -> FenceJob {
        let progress = Arc::new(Mutex::new(FenceProgress::Running {
            attempt: 1,
            last_error: None,
        }));
        let shared = progress.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut attempt = 1;
            loop {
                let result = power_off(&device).await;
                let next = match result {
                    Ok(()) => FenceProgress::ConfirmedOff {
                        after_ms: started.elapsed().as_millis() as u64,
                    },
                    Err(error) => {
                        tracing::warn!("fencing {} (attempt {attempt}): {error}", device.host);
                        FenceProgress::Running {
                            attempt: attempt + 1,
                            last_error: Some(error),
                        }
                    }
                };
                let done = matches!(next, FenceProgress::ConfirmedOff { .. });
                if let Ok(mut progress) = shared.lock() {
                    *progress = next;
                }
                if done {
                    return;
                }
                tokio::time::sleep(retry_delay(attempt)).await;
                attempt += 1;
            }
        });
        FenceJob { progress, task }
    }

    pub fn progress(&self) -> FenceProgress {
        self.progress
            .lock()
            .map(|progress| progress.clone())
            .unwrap_or(FenceProgress::Running {
                attempt: 0,
                last_error: None,
            })
    }

    pub fn confirmed_off(&self) -> bool {
        matches!(self.progress(), FenceProgress::ConfirmedOff { .. })
    }
}

impl Drop for FenceJob {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    /// A fence agent written in sh: records what it read, answers with the given codes.
    fn script(dir: &std::path::Path, body: &str) -> FenceDevice {
        let path = dir.join("fence_test");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        FenceDevice {
            version: 1,
            host: "host2".parse().unwrap(),
            agent: path,
            options: BTreeMap::from([("plug".to_string(), "host2".to_string())]),
            timeout_ms: 2000,
        }
    }

    #[tokio::test]
    async fn off_counts_only_when_status_then_says_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdin.log");
        let device = script(
            dir.path(),
            &format!(
                "input=$(cat); echo \"$input\" >> {log}; case \"$input\" in *action=status*) exit 2;; esac; exit 0",
                log = log.display()
            ),
        );
        power_off(&device).await.unwrap();
        let seen = std::fs::read_to_string(&log).unwrap();
        assert_eq!(seen, "action=off\nplug=host2\naction=status\nplug=host2\n");

        let still_on = script(dir.path(), "cat >/dev/null; exit 0");
        assert!(power_off(&still_on)
            .await
            .unwrap_err()
            .contains("status still says on"));
    }

    #[tokio::test]
    async fn a_failing_or_hanging_agent_is_an_error_never_success() {
        let dir = tempfile::tempdir().unwrap();
        let failing = script(
            dir.path(),
            "cat >/dev/null; echo 'BMC unreachable' >&2; exit 1",
        );
        assert_eq!(
            power_off(&failing).await.unwrap_err(),
            format!(
                "fence agent {}: action off failed (exit code 1): BMC unreachable",
                failing.agent.display()
            )
        );
        let mut hanging = script(dir.path(), "sleep 30");
        hanging.timeout_ms = 200;
        let started = Instant::now();
        assert!(power_off(&hanging)
            .await
            .unwrap_err()
            .contains("did not finish off within 200 ms"));
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut missing = failing.clone();
        missing.agent = dir.path().join("absent");
        assert!(power_off(&missing)
            .await
            .unwrap_err()
            .starts_with("cannot run fence agent"));
    }
}
