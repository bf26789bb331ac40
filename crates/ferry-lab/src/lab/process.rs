//! The lab's processes: agents started inside host namespaces, and finding, checking and
//! killing what the lab started. A pid is only ever signalled after `/proc/PID/cmdline`
//! shows it is still the process we started (pids are recycled).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::spec::LabSpec;
use super::state::Spawned;

/// How long a SIGKILLed process may take to disappear before we report it.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long a process may take to show its arguments after `spawn`.
const EXEC_WAIT: Duration = Duration::from_secs(2);

/// Whether the process still runs (a zombie does not) and is the one we started.
pub fn is_running(process: &Spawned) -> bool {
    if !is_alive(process.pid) {
        return false;
    }
    let Ok(raw) = std::fs::read(format!("/proc/{}/cmdline", process.pid)) else {
        return false;
    };
    let arguments: Vec<&[u8]> = raw.split(|&byte| byte == 0).collect();
    let marker: Vec<&[u8]> = process.marker.iter().map(|arg| arg.as_bytes()).collect();
    !marker.is_empty()
        && arguments
            .windows(marker.len())
            .any(|window| window == marker.as_slice())
}

/// The pid exists and is not a zombie.
pub(crate) fn is_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}

/// SIGKILLs every pid at once (a power cut, not a sequence), then waits until all are
/// gone, reaping those that are our children. Returns the pids still there.
pub fn kill_all(pids: &[i32]) -> Vec<i32> {
    for &pid in pids {
        // It may have exited already.
        if let Err(error) = signal::kill(Pid::from_raw(pid), Signal::SIGKILL) {
            tracing::debug!("it may have exited already: {error}");
        }
    }
    let started = Instant::now();
    loop {
        let remaining: Vec<i32> = pids.iter().copied().filter(|&pid| !is_gone(pid)).collect();
        if remaining.is_empty() || started.elapsed() > KILL_WAIT {
            return remaining;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Collects the exit status if `pid` is our exited child (a test process, or `up`
/// failing), so it does not linger as a zombie. For anyone else's pid this does nothing.
pub fn reap(pid: i32) {
    // Not our child or already reaped.
    if let Err(error) = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        tracing::debug!("not our child or already reaped: {error}");
    }
}

/// Whether a killed process is gone. Our own child is gone once reaped (a killed
/// multi-threaded process is a zombie before it can be reaped); anyone else's once it
/// is a zombie or absent.
fn is_gone(pid: i32) -> bool {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        Err(_) => !is_alive(pid),
    }
}

/// The marker that identifies a host's agent: its config path is the lab's own.
pub fn agent_marker(config: &Path) -> Vec<String> {
    vec!["--config".into(), config.display().to_string()]
}

/// The marker that identifies the lab's etcd (EtcdServer puts its data in `member-data`).
pub fn etcd_marker(etcd_dir: &Path) -> Vec<String> {
    vec![
        "--data-dir".into(),
        etcd_dir.join("member-data").display().to_string(),
    ]
}

/// Starts `ferry agent run` inside the host's namespace, in a process group of its own
/// (so a Ctrl-C at the terminal that ran `ferry lab up` never reaches it), its output
/// appended to the host's log. `ip netns exec` execs in place, so the pid is the agent's.
pub fn spawn_agent(spec: &LabSpec, host: u32, binary: &Path) -> Result<Spawned, String> {
    let config = spec.agent_config_path(host);
    let log_path = spec.agent_log(host);
    let (log, log_err) = append_log(&log_path)?;
    let level = std::env::var("FERRY_LOG").unwrap_or_else(|_| "info".into());
    let child = Command::new("ip")
        .args(["netns", "exec", &spec.namespace(host)])
        .arg(binary)
        .args(["agent", "run", "--config"])
        .arg(&config)
        .env("FERRY_LOG", level)
        // The lab's clock-step fault writes here; absent, the host's clock is true.
        .env("FERRY_CLOCK_STEP_FILE", clock_step_file(spec, host))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|error| format!("cannot run ip netns exec: {error}"))?;
    let pid = i32::try_from(child.id()).map_err(|error| error.to_string())?;
    // Dropping the handle leaves the agent running; `down` finds it by pid.
    drop(child);
    let spawned = Spawned {
        pid,
        marker: agent_marker(&config),
    };
    wait_recognisable(&spawned);
    Ok(spawned)
}

/// A log opened for appending, twice: for stdout and for stderr.
fn append_log(path: &Path) -> Result<(std::fs::File, std::fs::File), String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    let log_err = log.try_clone().map_err(|error| error.to_string())?;
    Ok((log, log_err))
}

/// The file whose signed milliseconds step a host's wall clock (see
/// `ferry_model::cluster::now_ms`).
pub fn clock_step_file(spec: &LabSpec, host: u32) -> PathBuf {
    spec.host_run_dir(host).join("clock-step")
}

/// Starts the watchdog of `host` (`ferry lab watchdog`) in the root namespace, in a
/// process group of its own, its output appended to `{host run dir}/watchdog.log`.
pub fn spawn_watchdog(spec: &LabSpec, host: u32, binary: &Path) -> Result<Spawned, String> {
    let log_path = spec.host_run_dir(host).join("watchdog.log");
    let (log, log_err) = append_log(&log_path)?;
    let arguments = super::watchdog::arguments(&spec.state_dir, host);
    let child = Command::new(binary)
        .args(&arguments)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .process_group(0)
        .spawn()
        .map_err(|error| format!("cannot run {}: {error}", binary.display()))?;
    let pid = i32::try_from(child.id()).map_err(|error| error.to_string())?;
    // Dropping the handle leaves it running; `down` finds it by pid.
    drop(child);
    let spawned = Spawned {
        pid,
        marker: arguments,
    };
    wait_recognisable(&spawned);
    Ok(spawned)
}

/// Waits (briefly) until a just-spawned process shows its arguments: right after
/// `spawn` returns, the kernel may still be loading the program, and `/proc/PID/cmdline`
/// reads empty, which would make the process look like someone else's.
pub fn wait_recognisable(process: &Spawned) {
    let started = Instant::now();
    while !is_running(process) && is_alive(process.pid) && started.elapsed() < EXEC_WAIT {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// QEMUs under a host's run directory that are still ours: its agent's VMs
/// (`vms/*/qemu.pid`) and the benchmark's bare QEMUs (`bare/*/qemu.pid`).
pub fn host_qemus(run_dir: &Path) -> Vec<i32> {
    ["vms", "bare"]
        .iter()
        .filter_map(|kind| std::fs::read_dir(run_dir.join(kind)).ok())
        .flat_map(|entries| entries.filter_map(Result::ok))
        .filter_map(|entry| {
            let dir: PathBuf = entry.path();
            let text = std::fs::read_to_string(dir.join("qemu.pid")).ok()?;
            let pid: i32 = text.trim().parse().ok()?;
            ferry_qemu::process::is_our_qemu(pid, &dir.join("qmp.sock")).then_some(pid)
        })
        .collect()
}

/// The last `count` non-empty lines of a log, joined for a one-line error.
pub fn log_tail(path: &Path, count: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(count)..];
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_recognised_by_its_marker_only() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let ours = Spawned {
            pid,
            marker: vec!["sleep".into(), "30".into()],
        };
        let other = Spawned {
            pid,
            marker: vec!["sleep".into(), "31".into()],
        };
        wait_recognisable(&ours);
        assert!(is_running(&ours));
        assert!(!is_running(&other));
        assert!(kill_all(&[pid]).is_empty());
        assert!(!is_running(&ours));
        // Not our child or already reaped.
        if let Err(error) = child.wait() {
            tracing::debug!("not our child or already reaped: {error}");
        }
    }

    #[test]
    fn a_log_tail_is_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\n\nb\nc\n").unwrap();
        assert_eq!(log_tail(&path, 2), "b | c");
        assert_eq!(log_tail(&dir.path().join("none"), 2), "(no output)");
    }
}
