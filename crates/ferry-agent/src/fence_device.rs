//! Running a host's fence device: a ClusterLabs fence agent (`fence_ipmilan`,
//! `fence_ferry_lab`, …) fed `key=value` lines on stdin. The leader powers a dead host
//! off through it and counts the host as off only when `off` succeeded and `status`
//! then says off; a failure or a timeout is retried, never taken as success. The
//! protocol itself is `ferry_manager::fence`.
//!
//! The leader runs the agent as root, and the record naming it comes from etcd: so the
//! path is checked against this agent's allowlist (`[fencing] allowed_agents`) each time
//! a record is about to run, and the device's sealed secrets are opened with this
//! host's cluster key (`crate::secrets`). Either failing is a failed fence, never a run.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_manager::fence::{outcome, request, retry_delay, FenceAction, Power};
use ferry_model::ha::FenceDevice;
use tokio::io::AsyncWriteExt;

use crate::secrets::{open_options, ClusterKey};

/// The fence agents the leader may run: glob patterns (`/usr/sbin/fence_*`) or exact
/// paths. `*` never crosses a `/`.
#[derive(Clone, Debug)]
pub struct AllowedAgents {
    patterns: Vec<glob::Pattern>,
}

impl AllowedAgents {
    /// What a config without `[fencing] allowed_agents` allows.
    pub const DEFAULT: &'static [&'static str] = &["/usr/sbin/fence_*"];

    pub fn new(patterns: &[String]) -> Result<AllowedAgents, String> {
        let patterns = patterns
            .iter()
            .map(|text| {
                if !text.starts_with('/') {
                    return Err(format!(
                        "fencing.allowed_agents: {text:?} must be an absolute path or pattern"
                    ));
                }
                glob::Pattern::new(text)
                    .map_err(|error| format!("fencing.allowed_agents: {text:?}: {error}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(AllowedAgents { patterns })
    }

    /// The pattern that allows exactly `path`.
    pub fn exact(path: &Path) -> String {
        glob::Pattern::escape(&path.display().to_string())
    }

    /// `Ok` for an absolute, canonical path (no `.`, `..` or `//`) that a pattern
    /// matches. Read as text: `Path::components` would hide a `.` in the middle.
    pub fn check(&self, agent: &Path) -> Result<(), String> {
        let shown = agent.display();
        let canonical = agent.to_str().is_some_and(|text| {
            text.strip_prefix('/').is_some_and(|relative| {
                relative
                    .split('/')
                    .all(|part| !matches!(part, "" | "." | ".."))
            })
        });
        if !canonical {
            return Err(format!(
                "fence agent {shown} refused: not an absolute path without . or .."
            ));
        }
        let options = glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: true,
        };
        if self
            .patterns
            .iter()
            .any(|pattern| pattern.matches_path_with(agent, options))
        {
            return Ok(());
        }
        let allowed: Vec<&str> = self.patterns.iter().map(glob::Pattern::as_str).collect();
        Err(format!(
            "fence agent {shown} refused: not in fencing.allowed_agents [{}]",
            allowed.join(", ")
        ))
    }
}

/// What the leader needs to run another host's device: the allowlist and the key that
/// opens its secrets.
#[derive(Clone, Debug)]
pub struct FencePolicy {
    pub allowed: AllowedAgents,
    pub key: Option<ClusterKey>,
}

/// Runs one action; `Ok` only for an exit code the protocol defines as success.
pub async fn run_action(
    policy: &FencePolicy,
    device: &FenceDevice,
    action: FenceAction,
) -> Result<Option<Power>, String> {
    policy.allowed.check(&device.agent)?;
    let options = open_options(policy.key.as_ref(), device.host.as_str(), &device.options)?;
    let agent = device.agent.display().to_string();
    let mut child = tokio::process::Command::new(&device.agent)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot run fence agent {agent}: {error}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let text = request(action, &options);
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
pub async fn power_off(policy: &FencePolicy, device: &FenceDevice) -> Result<(), String> {
    run_action(policy, device, FenceAction::Off).await?;
    match run_action(policy, device, FenceAction::Status).await? {
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
    pub fn start(policy: FencePolicy, device: FenceDevice) -> FenceJob {
        let progress = Arc::new(Mutex::new(FenceProgress::Running {
            attempt: 1,
            last_error: None,
        }));
        let shared = progress.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut attempt = 1;
            loop {
                let result = power_off(&policy, &device).await;
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

    /// Allows the agents `script` writes in `dir`, without a cluster key.
    fn allowing(dir: &std::path::Path) -> FencePolicy {
        FencePolicy {
            allowed: AllowedAgents::new(&[format!("{}/fence_*", dir.display())]).unwrap(),
            key: None,
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
        power_off(&allowing(dir.path()), &device).await.unwrap();
        let seen = std::fs::read_to_string(&log).unwrap();
        assert_eq!(seen, "action=off\nplug=host2\naction=status\nplug=host2\n");

        let still_on = script(dir.path(), "cat >/dev/null; exit 0");
        assert!(power_off(&allowing(dir.path()), &still_on)
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
            power_off(&allowing(dir.path()), &failing)
                .await
                .unwrap_err(),
            format!(
                "fence agent {}: action off failed (exit code 1): BMC unreachable",
                failing.agent.display()
            )
        );
        let mut hanging = script(dir.path(), "sleep 30");
        hanging.timeout_ms = 200;
        let started = Instant::now();
        assert!(power_off(&allowing(dir.path()), &hanging)
            .await
            .unwrap_err()
            .contains("did not finish off within 200 ms"));
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut missing = failing.clone();
        missing.agent = dir.path().join("fence_absent");
        assert!(power_off(&allowing(dir.path()), &missing)
            .await
            .unwrap_err()
            .starts_with("cannot run fence agent"));
    }

    #[tokio::test]
    async fn an_agent_off_the_allowlist_is_refused_and_never_run() {
        let dir = tempfile::tempdir().unwrap();
        let ran = dir.path().join("ran");
        let device = script(dir.path(), &format!("touch {}; exit 0", ran.display()));
        let default = FencePolicy {
            allowed: AllowedAgents::new(&["/usr/sbin/fence_*".to_string()]).unwrap(),
            key: None,
        };
        let problem = run_action(&default, &device, FenceAction::Off)
            .await
            .unwrap_err();
        assert_eq!(
            problem,
            format!(
                "fence agent {} refused: not in fencing.allowed_agents [/usr/sbin/fence_*]",
                device.agent.display()
            )
        );
        assert!(power_off(&default, &device).await.is_err());
        assert!(!ran.exists(), "the refused agent ran");
        run_action(&allowing(dir.path()), &device, FenceAction::Off)
            .await
            .unwrap();
        assert!(ran.exists());
    }

    #[test]
    fn only_absolute_canonical_paths_a_pattern_matches_are_allowed() {
        let allowed = AllowedAgents::new(&[
            "/usr/sbin/fence_*".to_string(),
            "/opt/lab/fence_ferry_lab".to_string(),
        ])
        .unwrap();
        for good in [
            "/usr/sbin/fence_ipmilan",
            "/usr/sbin/fence_redfish",
            "/opt/lab/fence_ferry_lab",
        ] {
            allowed.check(Path::new(good)).unwrap();
        }
        for (bad, why) in [
            ("/usr/sbin/fence_x/../../../bin/sh", "without . or .."),
            ("/usr/sbin/./fence_ipmilan", "without . or .."),
            ("usr/sbin/fence_ipmilan", "without . or .."),
            ("/usr/sbin/fence_dir/sh", "not in fencing.allowed_agents"),
            ("/tmp/fence_ipmilan", "not in fencing.allowed_agents"),
            ("/usr/sbin/shutdown", "not in fencing.allowed_agents"),
        ] {
            let problem = allowed.check(Path::new(bad)).unwrap_err();
            assert!(problem.contains(why), "{bad}: {problem}");
            assert!(problem.contains(bad), "{problem}");
        }
        assert!(AllowedAgents::new(&["fence_*".to_string()]).is_err());
    }

    #[tokio::test]
    async fn sealed_secrets_reach_the_agent_in_clear_and_one_that_does_not_open_fails_the_fence() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdin.log");
        let mut device = script(dir.path(), &format!("cat >> {}; exit 0", log.display()));
        let key = ClusterKey::generate().unwrap();
        let plain = BTreeMap::from([("password".to_string(), "hunter2".to_string())]);
        device.options =
            crate::secrets::seal_options(Some(&key), device.host.as_str(), &plain).unwrap();
        let mut policy = allowing(dir.path());
        policy.key = Some(key);
        run_action(&policy, &device, FenceAction::Off)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            "action=off\npassword=hunter2\n"
        );

        std::fs::remove_file(&log).unwrap();
        policy.key = Some(ClusterKey::generate().unwrap());
        let problem = power_off(&policy, &device).await.unwrap_err();
        assert!(
            problem.starts_with("fence device of host2: option password cannot be decrypted"),
            "{problem}"
        );
        assert!(
            !log.exists(),
            "the agent ran with a secret that did not open"
        );
    }
}
