//! The one check every HA test and the chaos benchmark runs throughout: no VM ever has
//! two live QEMUs at once, across all the lab's hosts, sampled every 50 ms from the
//! process list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the process list is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

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

/// Samples [`qemus_by_vm`] in the background until stopped.
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
                    if pids.len() > 1 {
                        let line = format!("VM {vm} ran in QEMUs {pids:?} at once");
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
