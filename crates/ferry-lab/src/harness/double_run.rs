//! The one check every HA test and the chaos benchmark runs throughout: no VM ever runs
//! in two QEMUs at once, across all the lab's hosts. The process list is sampled every
//! 50 ms; when a VM has two QEMUs (as it does, by design, while it migrates: the
//! destination waits with its vCPUs stopped), their vCPU threads are watched over
//! [`CPU_WINDOW`], and the VM counts as running twice if both ran guest code in it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the process list is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// How long the vCPU threads of a VM with two QEMUs are watched for guest time.
pub const CPU_WINDOW: Duration = Duration::from_millis(500);

/// CPU time (clock ticks) of the process's vCPU threads (`CPU n/TCG`, `ALL CPUs/TCG`,
/// `CPU n/KVM`: QEMU names them with `debug-threads=on`, as Ferry starts it).
fn vcpu_ticks(pid: i32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !(comm.contains("/TCG") || comm.contains("/KVM")) {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).ok()?;
        // utime and stime are fields 14 and 15; 3 onwards follow the ')' of the name.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let user: u64 = fields.get(11)?.parse().ok()?;
        let system: u64 = fields.get(12)?.parse().ok()?;
        total += user + system;
    }
    Some(total)
}

/// Which of `pids` ran guest code during [`CPU_WINDOW`].
async fn running_guests(pids: &[i32]) -> Vec<i32> {
    let before: Vec<Option<u64>> = pids.iter().map(|pid| vcpu_ticks(*pid)).collect();
    tokio::time::sleep(CPU_WINDOW).await;
    pids.iter()
        .zip(before)
        .filter(|(pid, before)| match (before, vcpu_ticks(**pid)) {
            (Some(before), Some(after)) => after > *before,
            // Gone meanwhile: it did not run alongside the other.
            _ => false,
        })
        .map(|(pid, _)| *pid)
        .collect()
}

/// Live QEMUs under the lab's run directory, by VM name (QEMU's `-name guest=`).
pub fn qemus_by_vm(run_root: &Path) -> BTreeMap<String, Vec<i32>> {
    let root = run_root.to_string_lossy().to_string();
    let mut found: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let ours = args.first().is_some_and(|bin| bin.contains("qemu-system"))
            && args.iter().any(|arg| arg.contains(&root));
        let name = args
            .iter()
            .find_map(|arg| arg.strip_prefix("guest="))
            .and_then(|rest| rest.split(',').next());
        if let (true, Some(name)) = (ours, name) {
            if alive(pid) {
                found.entry(name.to_string()).or_default().push(pid);
            }
        }
    }
    found
}

/// The pid exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Samples [`qemus_by_vm`] (and the vCPUs of VMs with two QEMUs) in the background
/// until stopped.
pub struct DoubleRunWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl DoubleRunWatch {
    pub fn start(run_root: PathBuf) -> DoubleRunWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                for (vm, pids) in qemus_by_vm(&run_root) {
                    if pids.len() < 2 {
                        continue;
                    }
                    let running = running_guests(&pids).await;
                    if running.len() > 1 {
                        let line = format!("VM {vm} ran in QEMUs {running:?} at once");
                        if !seen.contains(&line) {
                            seen.push(line);
                        }
                    }
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
            seen
        });
        DoubleRunWatch { stop, task }
    }

    /// Stops watching; every time a VM ran twice, in words (empty: never).
    pub async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.await {
            Ok(seen) => seen,
            Err(error) => vec![format!("the double-run watch failed: {error}")],
        }
    }
}
