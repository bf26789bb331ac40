//! Self-fencing and the storage heartbeat.
//!
//! Every `heartbeat_ms` the agent writes its slot on the shared pool
//! (`.ferry/heartbeat/{host}.json`: time, last lease renewal, fenced, running VMs).
//! When its last lease renewal is `fence_after` old it reads its peers' slots and, unless
//! most hosts lost etcd too (a control-plane outage, where nobody restarts anything),
//! SIGKILLs its HA VMs whose isolation response is `power-off`, says so in its slot, and
//! starts nothing until it holds a lease again and has re-read the cluster. The decision
//! itself is `ferry_manager::ha::on_lease_loss`.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_manager::ha::{on_lease_loss, HaTiming, LeaseLoss};
use ferry_model::cluster::{now_ms, RECORD_VERSION};
use ferry_model::ha::StorageHeartbeat;
use ferry_model::{HostName, VmName};
use ferry_store::RenewalClock;

use crate::runtime::Runtime;

/// The agent's HA state, shared by the fencing loop and the reconciler.
#[derive(Debug)]
pub struct HaGuard {
    pub clock: RenewalClock,
    pub timing: HaTiming,
    fenced: AtomicBool,
    /// The lease was lost: the reconciler re-reads the cluster before starting anything.
    stale_view: AtomicBool,
    /// VMs to kill when this host alone is cut off (HA, isolation response power-off).
    fence_list: std::sync::Mutex<BTreeSet<VmName>>,
    /// When the reconciler last went round (wall-clock ms): the watchdog's sign of sanity.
    progress_ms: AtomicU64,
}

impl HaGuard {
    pub fn new(timing: HaTiming) -> HaGuard {
        HaGuard {
            clock: RenewalClock::default(),
            timing,
            fenced: AtomicBool::new(false),
            stale_view: AtomicBool::new(false),
            fence_list: Default::default(),
            progress_ms: AtomicU64::new(now_ms()),
        }
    }

    pub fn mark_progress(&self) {
        self.progress_ms.store(now_ms(), Ordering::Release);
    }

    /// The reconciler went round recently: the agent is not hung.
    pub fn sane(&self) -> bool {
        now_ms().saturating_sub(self.progress_ms.load(Ordering::Acquire)) < SANE_WITHIN_MS
    }

    /// The lease was renewed within `fence_after`.
    pub fn lease_fresh(&self) -> bool {
        now_ms().saturating_sub(self.clock.last_ms()) < self.timing.fence_after_ms
    }

    /// Starting a QEMU is allowed: lease fresh, not fenced, the view re-read since a loss.
    pub fn may_start(&self) -> bool {
        self.lease_fresh()
            && !self.fenced.load(Ordering::Acquire)
            && !self.stale_view.load(Ordering::Acquire)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// True once after a lease loss, when the lease is back: re-read the cluster now.
    pub fn take_stale_view(&self) -> bool {
        self.lease_fresh() && self.stale_view.swap(false, Ordering::AcqRel)
    }

    /// The re-read failed: try again before starting anything.
    pub fn mark_stale_view(&self) {
        self.stale_view.store(true, Ordering::Release);
    }

    pub fn set_fence_list(&self, vms: BTreeSet<VmName>) {
        if let Ok(mut list) = self.fence_list.lock() {
            *list = vms;
        }
    }

    fn fence_list(&self) -> BTreeSet<VmName> {
        self.fence_list
            .lock()
            .map(|list| list.clone())
            .unwrap_or_default()
    }
}

/// The reconciler ticks every second and every etcd call it makes is bounded; silence
/// this long means the agent is hung, and the watchdog is left to reboot the host.
const SANE_WITHIN_MS: u64 = 30_000;

/// A hardware or kernel watchdog (`/dev/watchdog`): every write postpones the reboot.
/// It is never closed with the magic 'V', so an agent that dies also reboots the host.
pub struct Watchdog {
    device: std::fs::File,
    path: PathBuf,
}

impl Watchdog {
    pub fn open(path: &Path) -> std::io::Result<Watchdog> {
        let device = std::fs::OpenOptions::new().write(true).open(path)?;
        Ok(Watchdog {
            device,
            path: path.to_path_buf(),
        })
    }

    /// Feeds it every second until `started` is set: the agent's start-up waits for etcd,
    /// and a host booting during an etcd outage must not be rebooted for it.
    pub fn feed_while_starting(self, started: Arc<AtomicBool>) -> Arc<std::sync::Mutex<Watchdog>> {
        let shared = Arc::new(std::sync::Mutex::new(self));
        let feeder = shared.clone();
        tokio::spawn(async move {
            while !started.load(Ordering::Acquire) {
                if let Ok(mut watchdog) = feeder.lock() {
                    watchdog.feed();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        shared
    }

    fn feed(&mut self) {
        if let Err(error) = self
            .device
            .write_all(b"1")
            .and_then(|()| self.device.flush())
        {
            tracing::error!("cannot feed the watchdog {}: {error}", self.path.display());
        }
    }
}

/// Where the heartbeat slots live on a shared pool.
pub fn heartbeat_dir(pool: &Path) -> PathBuf {
    pool.join(".ferry").join("heartbeat")
}

/// Every slot in `dir`; `None` if the directory cannot be read in time (a stuck pool).
pub async fn read_heartbeats(dir: &Path, timeout: Duration) -> Option<Vec<StorageHeartbeat>> {
    let dir = dir.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        let mut beats = Vec::new();
        for entry in std::fs::read_dir(&dir).ok()? {
            let path = entry.ok()?.path();
            if path.extension().and_then(|ext| ext.to_str()) != Some("json") {
                continue;
            }
            // A slot being replaced or damaged is skipped, not fatal.
            if let Some(beat) = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<StorageHeartbeat>(&bytes).ok())
            {
                beats.push(beat);
            }
        }
        Some(beats)
    });
    tokio::time::timeout(timeout, read).await.ok()?.ok()?
}

/// Writes this host's slot (write then rename, so readers never see half of it).
async fn write_heartbeat(dir: &Path, beat: &StorageHeartbeat, timeout: Duration) -> bool {
    let dir = dir.to_path_buf();
    let Ok(bytes) = serde_json::to_vec(beat) else {
        return false;
    };
    let name = format!("{}.json", beat.host);
    let write = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir)?;
        let temporary = dir.join(format!(".{name}.new"));
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, dir.join(name))
    });
    matches!(tokio::time::timeout(timeout, write).await, Ok(Ok(Ok(()))))
}

/// Runs for the agent's life.
pub async fn guard_forever(
    runtime: Arc<Runtime>,
    me: HostName,
    pool: Option<PathBuf>,
    watchdog: Option<Arc<std::sync::Mutex<Watchdog>>>,
    started: Arc<AtomicBool>,
) {
    started.store(true, Ordering::Release);
    let guard = &runtime.ha;
    let timing = guard.timing;
    let interval = Duration::from_millis(timing.heartbeat_ms);
    let dir = pool.as_deref().map(heartbeat_dir);
    let mut waiting = None::<String>;
    let mut lost = false;
    let mut starving = false;
    loop {
        tokio::time::sleep(interval).await;
        if let Some(watchdog) = &watchdog {
            if guard.sane() {
                if let Ok(mut watchdog) = watchdog.lock() {
                    watchdog.feed();
                }
                starving = false;
            } else if !starving {
                starving = true;
                tracing::error!(
                    "host {me}: the reconciler has not run for {} s; no longer feeding the watchdog",
                    SANE_WITHIN_MS / 1000
                );
            }
        }
        let now = now_ms();
        if guard.lease_fresh() {
            if lost {
                lost = false;
                waiting = None;
                guard.fenced.store(false, Ordering::Release);
                tracing::warn!("host {me} holds a lease again; re-reading the cluster");
            }
        } else if !guard.is_fenced() {
            if !lost {
                lost = true;
                guard.stale_view.store(true, Ordering::Release);
            }
            let beats = match &dir {
                Some(dir) => read_heartbeats(dir, interval).await,
                None => None,
            };
            match on_lease_loss(&me, beats.as_deref(), now, &timing) {
                LeaseLoss::Fence { reason } => {
                    fence(&runtime, &me, &reason).await;
                    waiting = None;
                }
                LeaseLoss::Wait { reason } => {
                    if waiting.as_ref() != Some(&reason) {
                        tracing::warn!("host {me}: {reason}; keeping every VM running");
                        waiting = Some(reason);
                    }
                }
            }
        }
        let Some(dir) = &dir else { continue };
        let mut running = Vec::new();
        for vm in runtime.local_names().await {
            if runtime.machine(&vm).await.is_some_and(|m| !m.has_exited()) {
                running.push(vm);
            }
        }
        let beat = StorageHeartbeat {
            version: RECORD_VERSION,
            host: me.clone(),
            at_ms: now_ms(),
            lease_renewed_ms: guard.clock.last_ms(),
            fenced: guard.is_fenced(),
            running,
        };
        if !write_heartbeat(dir, &beat, interval).await {
            tracing::warn!(
                "host {me}: cannot write the storage heartbeat in {}",
                dir.display()
            );
        }
    }
}

/// Kills the HA VMs that must not outlive this host's membership.
async fn fence(runtime: &Runtime, me: &HostName, reason: &str) {
    let victims = runtime.ha.fence_list();
    let mut killed = Vec::new();
    for vm in runtime.local_names().await {
        if !victims.contains(&vm) {
            continue;
        }
        if let Some(machine) = runtime.machine(&vm).await {
            match machine.kill().await {
                Ok(()) => killed.push(vm.to_string()),
                Err(error) => tracing::error!("host {me}: cannot fence VM {vm}: {error}"),
            }
        }
    }
    runtime.ha.fenced.store(true, Ordering::Release);
    tracing::warn!(
        "host {me} fenced itself ({reason}): killed {}",
        if killed.is_empty() {
            "no VM".to_string()
        } else {
            killed.join(", ")
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_is_written_on_every_feed_and_a_missing_device_is_an_error() {
        // A plain file stands in for the device: a real /dev/watchdog reboots the machine.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watchdog");
        std::fs::write(&path, "").unwrap();
        let mut watchdog = Watchdog::open(&path).unwrap();
        watchdog.feed();
        watchdog.feed();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "11");
        assert!(Watchdog::open(&dir.path().join("absent")).is_err());
    }

    #[test]
    fn an_agent_is_sane_while_its_reconciler_goes_round() {
        let guard = HaGuard::new(HaTiming::default());
        assert!(guard.sane());
        guard
            .progress_ms
            .store(now_ms() - SANE_WITHIN_MS - 1, Ordering::Release);
        assert!(!guard.sane());
        guard.mark_progress();
        assert!(guard.sane());
    }
}
