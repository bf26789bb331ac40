//! QEMU as an operating-system process: spawned in its own process group (so that a
//! signal to the supervisor's group never reaches it and it outlives the supervisor),
//! never daemonized (so the supervisor that started it reaps it), and identified later
//! by the pidfile QEMU wrote itself plus a check of `/proc/PID/cmdline` (so a recycled
//! pid is never mistaken for our VM and never signalled).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;

use crate::{QemuError, RunDir};

/// A QEMU process we started or found again.
#[derive(Clone, Debug)]
pub struct QemuProcess {
    pid: i32,
    exited: watch::Receiver<bool>,
}

/// What `spawn` runs: the binary, its arguments and, for hosts that are network
/// namespaces (the lab), the namespace to run it in.
#[derive(Clone, Debug)]
pub struct SpawnRequest<'a> {
    pub qemu: &'a Path,
    pub args: &'a [String],
    pub run: &'a RunDir,
    pub netns: Option<&'a str>,
}

impl QemuProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Starts QEMU with stdout and stderr into the run directory's `qemu.log`.
    pub fn spawn(request: &SpawnRequest<'_>) -> Result<QemuProcess, QemuError> {
        let log_path = request.run.qemu_log();
        let log = std::fs::File::create(&log_path).map_err(QemuError::io(format!(
            "cannot create {}",
            log_path.display()
        )))?;
        let log_err = log
            .try_clone()
            .map_err(QemuError::io("cannot duplicate the log file"))?;
        let mut command = match request.netns {
            // `ip netns exec` enters the namespace and execs QEMU in place: the pid stays QEMU's.
            Some(netns) => {
                let mut command = tokio::process::Command::new("ip");
                command.args(["netns", "exec", netns]).arg(request.qemu);
                command
            }
            None => tokio::process::Command::new(request.qemu),
        };
        command
            .args(request.args)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(QemuError::io(format!(
            "cannot run {}",
            request.qemu.display()
        )))?;
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| QemuError::Other("QEMU exited before its pid could be read".into()))?;
        let (exited_tx, exited) = watch::channel(false);
        // We are QEMU's parent: reap it, and tell everyone it is gone.
        tokio::spawn(async move {
            match child.wait().await {
                Ok(status) => tracing::info!("QEMU pid {pid} ended: {status}"),
                Err(error) => tracing::warn!("QEMU pid {pid}: cannot wait for it: {error}"),
            }
            if exited_tx.send(true).is_err() {
                tracing::trace!("nobody listens any more");
            }
        });
        Ok(QemuProcess { pid, exited })
    }

    /// Finds the QEMU of a run directory again: the pid from QEMU's pidfile, alive, and
    /// running with this run directory's QMP socket on its command line.
    pub fn find(run: &RunDir) -> Result<QemuProcess, String> {
        let pidfile = run.pidfile();
        let text = std::fs::read_to_string(&pidfile)
            .map_err(|_| format!("no pidfile {}", pidfile.display()))?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("pidfile {} holds {:?}", pidfile.display(), text.trim()))?;
        if !is_our_qemu(pid, &run.qmp_socket()) {
            return Err(format!(
                "pid {pid} from {} is not this VM's QEMU any more",
                pidfile.display()
            ));
        }
        let (exited_tx, exited) = watch::channel(false);
        // Not our child: poll for its disappearance (a zombie of another parent counts as gone).
        let qmp_socket = run.qmp_socket();
        tokio::spawn(async move {
            while is_our_qemu(pid, &qmp_socket) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if exited_tx.send(true).is_err() {
                tracing::trace!("nobody listens any more");
            }
        });
        Ok(QemuProcess { pid, exited })
    }

    pub fn has_exited(&self) -> bool {
        *self.exited.borrow()
    }

    /// Resolves when the process is gone.
    pub async fn wait_exit(&self) {
        let mut exited = self.exited.clone();
        if exited.wait_for(|gone| *gone).await.is_err() {
            tracing::trace!("the sender is gone: nothing more will change");
        }
    }

    /// Waits up to `timeout`; true if it exited.
    pub async fn wait_exit_timeout(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait_exit())
            .await
            .is_ok()
    }

    pub fn signal(&self, signal: Signal) -> Result<(), QemuError> {
        if self.has_exited() {
            return Ok(());
        }
        match signal::kill(Pid::from_raw(self.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(errno) => Err(QemuError::Other(format!(
                "cannot send {signal} to QEMU pid {}: {errno}",
                self.pid
            ))),
        }
    }

    /// SIGKILL and wait until the process is really gone (its disk locks released).
    pub async fn kill(&self) -> Result<(), QemuError> {
        self.signal(Signal::SIGKILL)?;
        if !self.wait_exit_timeout(Duration::from_secs(10)).await {
            return Err(QemuError::Other(format!(
                "QEMU pid {} survived SIGKILL for 10 s",
                self.pid
            )));
        }
        Ok(())
    }
}

/// Alive, not a zombie, and its argv names our QMP socket.
pub fn is_our_qemu(pid: i32, qmp_socket: &Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let needle = qmp_socket.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|window| window == needle)
}
