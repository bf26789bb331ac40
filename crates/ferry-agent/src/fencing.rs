//! Self-fencing and the storage heartbeat.
//!
//! Three tasks, none waiting on another:
//! - the **heartbeat writer** rewrites this host's slot on the shared pool
//!   (`.ferry/heartbeat/{host}.json`) every `heartbeat_ms`: a sequence that moves, the
//!   age of its last lease renewal, its watchdog's timeout, fenced, running VMs;
//! - the **heartbeat reader** reads every slot every `heartbeat_ms` into the
//!   [`HeartbeatBoard`], which measures how long each sequence stood still on this
//!   host's monotonic clock (the manager judges dead hosts from it, too);
//! - the **fencing loop** ticks every [`FENCE_TICK_MS`] and never touches storage: when
//!   its last lease renewal is `fence_after` old it decides from the board's latest read
//!   (`ferry_manager::ha::on_lease_loss`; a read older than three heartbeats counts as
//!   unreadable) and, unless most hosts lost etcd too, SIGKILLs every HA VM whose
//!   isolation response is `power-off` at once, then waits for all of them within
//!   [`KILL_BUDGET_MS`]. It starts nothing until it holds a lease again and has re-read
//!   the cluster. It also feeds the watchdog while the agent is sane.
//!
//! Start-up refuses timings where `fence_after` + one tick + the kill budget does not
//! end before the lease TTL, after which the leader may restart the VMs elsewhere.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_manager::ha::{
    on_lease_loss, HaTiming, HeartbeatTracker, LeaseLoss, FENCE_TICK_MS, KILL_BUDGET_MS,
};
use ferry_model::cluster::{monotonic_ms, now_ms, RECORD_VERSION};
use ferry_model::ha::{ObservedBeat, StorageHeartbeat};
use ferry_model::{HostName, VmName};
use ferry_store::RenewalClock;

use crate::runtime::Runtime;

/// The agent's HA state, shared by the fencing loop, the heartbeat tasks and the
/// reconciler.
#[derive(Debug)]
pub struct HaGuard {
    pub clock: RenewalClock,
    pub timing: HaTiming,
    /// The watchdog reboots this host this long after its last feed, if it has one.
    pub watchdog_ms: Option<u64>,
    pub heartbeats: HeartbeatBoard,
    fenced: AtomicBool,
    /// The lease was lost: the reconciler re-reads the cluster before starting anything.
    stale_view: AtomicBool,
    /// VMs to kill when this host alone is cut off (HA, isolation response power-off).
    fence_list: std::sync::Mutex<BTreeSet<VmName>>,
    /// When the reconciler last went round (monotonic ms): the watchdog's sign of sanity.
    progress_ms: AtomicU64,
    /// Counts lease losses: a start that began under one lease never runs under another.
    epoch: AtomicU64,
    /// The host record is written under the current lease (the leader's restart guard
    /// is that record's absence, so nothing starts before it is there).
    registered: AtomicBool,
    /// A fence victim survived SIGKILL: the watchdog must reset the host.
    fence_failed: AtomicBool,
    /// When this host's storage heartbeat was last written (monotonic ms).
    beat_written_ms: AtomicU64,
}

impl HaGuard {
    pub fn new(timing: HaTiming, watchdog_ms: Option<u64>) -> HaGuard {
        HaGuard {
            clock: RenewalClock::default(),
            timing,
            watchdog_ms,
            heartbeats: HeartbeatBoard::default(),
            fenced: AtomicBool::new(false),
            stale_view: AtomicBool::new(false),
            fence_list: Default::default(),
            progress_ms: AtomicU64::new(monotonic_ms()),
            epoch: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            fence_failed: AtomicBool::new(false),
            beat_written_ms: AtomicU64::new(monotonic_ms()),
        }
    }

    /// The lease epoch: it changes whenever the lease is lost.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The host record was written under the current lease (`true`), or the lease that
    /// held it was lost (`false`).
    pub fn set_registered(&self, registered: bool) {
        self.registered.store(registered, Ordering::Release);
    }

    pub fn mark_progress(&self) {
        self.progress_ms.store(monotonic_ms(), Ordering::Release);
    }

    /// The reconciler went round recently: the agent is not hung.
    pub fn sane(&self) -> bool {
        self.sane_at(monotonic_ms())
    }

    fn sane_at(&self, now: u64) -> bool {
        now.saturating_sub(self.progress_ms.load(Ordering::Acquire)) < SANE_WITHIN_MS
    }

    /// The last acknowledged renewal was sent within `fence_after`.
    pub fn lease_fresh(&self) -> bool {
        self.clock
            .age_ms()
            .is_some_and(|age| age < self.timing.fence_after_ms)
    }

    /// Starting a QEMU is allowed: lease fresh, not fenced, the view re-read since a loss.
    pub fn may_start(&self) -> bool {
        self.lease_fresh()
            && self.registered.load(Ordering::Acquire)
            && !self.fenced.load(Ordering::Acquire)
            && !self.stale_view.load(Ordering::Acquire)
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// True once after a lease loss, when the lease is back: re-read the cluster now.
    pub fn take_stale_view(&self) -> bool {
        self.lease_fresh()
            && self.registered.load(Ordering::Acquire)
            && self.stale_view.swap(false, Ordering::AcqRel)
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

    /// The peers' heartbeats as last read, if that read is recent enough to decide on.
    pub fn observed_heartbeats(&self) -> Option<Vec<ObservedBeat>> {
        self.heartbeats
            .latest(monotonic_ms(), 3 * self.timing.heartbeat_ms)
    }
}

/// The reconciler ticks every second and every etcd call it makes is bounded; silence
/// this long means the agent is hung, and the watchdog is left to reboot the host.
const SANE_WITHIN_MS: u64 = 30_000;

/// The latest read of the heartbeat slots, observed at the moment of the read.
#[derive(Debug, Default)]
pub struct HeartbeatBoard {
    state: std::sync::Mutex<BoardState>,
}

#[derive(Debug, Default)]
struct BoardState {
    tracker: HeartbeatTracker,
    latest: Option<(u64, Vec<ObservedBeat>)>,
}

impl HeartbeatBoard {
    /// Takes in one read of every slot, made at `now` (monotonic ms).
    pub fn record(&self, beats: Vec<StorageHeartbeat>, now: u64) {
        if let Ok(mut state) = self.state.lock() {
            let observed = state.tracker.observe(beats, now);
            state.latest = Some((now, observed));
        }
    }

    /// The latest read if it is at most `max_age_ms` old; `None`: nothing recent is
    /// known (the pool hangs or cannot be read). Silences are as of that read, which
    /// errs on the side of a host being alive.
    pub fn latest(&self, now: u64, max_age_ms: u64) -> Option<Vec<ObservedBeat>> {
        let state = self.state.lock().ok()?;
        let (read_at, observed) = state.latest.as_ref()?;
        (now.saturating_sub(*read_at) <= max_age_ms).then(|| observed.clone())
    }
}

/// A hardware or kernel watchdog (`/dev/watchdog`), or the lab's stand-in for one (a
/// FIFO read by a process outside the lab host): every write postpones the reboot. It
/// is never closed with the magic 'V', so an agent that dies also reboots the host.
pub struct Watchdog {
    device: std::fs::File,
    path: PathBuf,
}

/// `WDIOC_SETTIMEOUT` of the kernel's watchdog API (`linux/watchdog.h`).
#[allow(unsafe_code)]
mod wdioc {
    nix::ioctl_readwrite!(set_timeout, b'W', 6, libc::c_int);
}

impl Watchdog {
    /// Opens the device and, for a real one (a character device), sets its timeout; a
    /// FIFO (the lab's watchdog) has its timeout from whoever reads it.
    pub fn open(path: &Path, timeout_ms: u64) -> std::io::Result<Watchdog> {
        use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
        // Non-blocking: a FIFO nobody reads fails to open (ENXIO) instead of hanging
        // the start-up, and a feed never waits.
        let device = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        if device.metadata()?.file_type().is_char_device() {
            use std::os::fd::AsRawFd;
            let mut seconds = timeout_ms.div_ceil(1000) as libc::c_int;
            // SAFETY: the fd is open for the call's duration and `seconds` outlives it.
            #[allow(unsafe_code)]
            let set = unsafe { wdioc::set_timeout(device.as_raw_fd(), &mut seconds) };
            set.map_err(std::io::Error::from)?;
        }
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

/// Every slot in `dir`, read in a blocking thread; `Err` if the directory cannot be
/// read. A slot being replaced or damaged is skipped, not fatal.
fn read_slots(dir: &Path) -> std::io::Result<Vec<StorageHeartbeat>> {
    let mut beats = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|ext| ext.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .map_err(|error| error.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<StorageHeartbeat>(&bytes).map_err(|e| e.to_string())
            }) {
            Ok(beat) => beats.push(beat),
            Err(error) => tracing::debug!("heartbeat slot {} skipped: {error}", path.display()),
        }
    }
    Ok(beats)
}

/// Writes this host's slot (write then rename, so readers never see half of it).
fn write_slot(dir: &Path, beat: &StorageHeartbeat) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(beat).map_err(std::io::Error::other)?;
    let name = format!("{}.json", beat.host);
    std::fs::create_dir_all(dir)?;
    let temporary = dir.join(format!(".{name}.new"));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, dir.join(name))
}

/// Runs `work` in a blocking thread unless the previous one still hangs (a stuck pool
/// leaves its caller in D state: one such thread is enough).
struct OneAtATime<T> {
    running: Option<tokio::task::JoinHandle<T>>,
}

impl<T: Send + 'static> OneAtATime<T> {
    fn new() -> Self {
        OneAtATime { running: None }
    }

    /// The result if the work finished within `timeout`; `None` if it did not (it
    /// goes on in the background and the next call waits for it instead).
    async fn run(
        &mut self,
        timeout: Duration,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let handle = match self.running.take() {
            Some(handle) => handle,
            None => tokio::task::spawn_blocking(work),
        };
        let mut handle = handle;
        match tokio::time::timeout(timeout, &mut handle).await {
            Ok(Ok(result)) => Some(result),
            Ok(Err(error)) => {
                tracing::warn!("storage heartbeat task failed: {error}");
                None
            }
            Err(_) => {
                self.running = Some(handle);
                None
            }
        }
    }
}

/// Reads every slot each heartbeat into the board, for the life of the agent.
pub async fn read_heartbeats_forever(runtime: Arc<Runtime>, pool: PathBuf) {
    let interval = Duration::from_millis(runtime.ha.timing.heartbeat_ms);
    let dir = heartbeat_dir(&pool);
    let mut reader = OneAtATime::new();
    let mut failing = false;
    loop {
        let read_dir = dir.clone();
        match reader.run(interval, move || read_slots(&read_dir)).await {
            Some(Ok(beats)) => {
                runtime.ha.heartbeats.record(beats, monotonic_ms());
                failing = false;
            }
            Some(Err(error)) if !failing => {
                failing = true;
                tracing::warn!(
                    "cannot read the storage heartbeats in {}: {error}",
                    dir.display()
                );
            }
            Some(Err(_)) => {}
            None if !failing => {
                failing = true;
                tracing::warn!("reading the storage heartbeats in {} hangs", dir.display());
            }
            None => {}
        }
        tokio::time::sleep(interval).await;
    }
}

/// Writes this host's slot each heartbeat, for the life of the agent.
pub async fn write_heartbeat_forever(runtime: Arc<Runtime>, me: HostName, pool: PathBuf) {
    let guard = &runtime.ha;
    let interval = Duration::from_millis(guard.timing.heartbeat_ms);
    let dir = heartbeat_dir(&pool);
    let mut writer = OneAtATime::new();
    // Starts far from any earlier run's numbers, so a restarted agent's slot moves.
    let mut sequence = now_ms();
    loop {
        sequence += 1;
        let mut running = Vec::new();
        for vm in runtime.local_names().await {
            if runtime.machine(&vm).await.is_some_and(|m| !m.has_exited()) {
                running.push(vm);
            }
        }
        let beat = StorageHeartbeat {
            version: RECORD_VERSION,
            host: me.clone(),
            sequence,
            at_ms: now_ms(),
            lease_age_ms: guard.clock.age_ms(),
            watchdog_ms: guard.watchdog_ms,
            fenced: guard.is_fenced(),
            running,
        };
        let write_dir = dir.clone();
        match writer
            .run(interval, move || write_slot(&write_dir, &beat))
            .await
        {
            Some(Ok(())) => guard
                .beat_written_ms
                .store(monotonic_ms(), Ordering::Release),
            Some(Err(error)) => tracing::warn!(
                "host {me}: cannot write the storage heartbeat in {}: {error}",
                dir.display()
            ),
            None => tracing::warn!(
                "host {me}: writing the storage heartbeat in {} hangs",
                dir.display()
            ),
        }
        tokio::time::sleep(interval).await;
    }
}

/// The fencing loop, for the life of the agent. It never waits on storage.
pub async fn guard_forever(
    runtime: Arc<Runtime>,
    me: HostName,
    watchdog: Option<Arc<std::sync::Mutex<Watchdog>>>,
    started: Arc<AtomicBool>,
) {
    started.store(true, Ordering::Release);
    let guard = &runtime.ha;
    let timing = guard.timing;
    let tick = Duration::from_millis(FENCE_TICK_MS);
    let mut waiting = None::<String>;
    let mut lost = false;
    let mut starving = false;
    let mut last_feed = 0u64;
    loop {
        tokio::time::sleep(tick).await;
        if let Some(watchdog) = &watchdog {
            let now = monotonic_ms();
            // Without its lease, a host whose fencing failed, or whose heartbeat no
            // longer gets written (the leader's silence clock runs), must be reset by
            // its watchdog before the leader's deadline: no more feeding.
            let beat_stale = now.saturating_sub(guard.beat_written_ms.load(Ordering::Acquire))
                > 2 * timing.heartbeat_ms;
            let must_reset = lost && (guard.fence_failed.load(Ordering::Acquire) || beat_stale);
            if guard.sane() && !must_reset {
                if now.saturating_sub(last_feed) >= timing.heartbeat_ms {
                    if let Ok(mut watchdog) = watchdog.lock() {
                        watchdog.feed();
                    }
                    last_feed = now;
                }
                starving = false;
            } else if !starving {
                starving = true;
                if must_reset {
                    tracing::error!(
                        "host {me}: lease lost and its fencing failed or its heartbeat stalled; no longer feeding the watchdog"
                    );
                } else {
                    tracing::error!(
                        "host {me}: the reconciler has not run for {} s; no longer feeding the watchdog",
                        SANE_WITHIN_MS / 1000
                    );
                }
            }
        }
        if guard.lease_fresh() {
            if lost {
                lost = false;
                waiting = None;
                guard.fenced.store(false, Ordering::Release);
                guard.fence_failed.store(false, Ordering::Release);
                tracing::warn!("host {me} holds a lease again; re-reading the cluster");
            }
            continue;
        }
        if guard.is_fenced() {
            continue;
        }
        if !lost {
            lost = true;
            guard.epoch.fetch_add(1, Ordering::AcqRel);
            guard.stale_view.store(true, Ordering::Release);
        }
        let beats = guard.observed_heartbeats();
        match on_lease_loss(&me, beats.as_deref(), &timing) {
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
}

/// Kills the HA VMs that must not outlive this host's membership: first it stops every
/// start (fenced), then SIGKILL to all of them at once, then it waits for all.
async fn fence(runtime: &Runtime, me: &HostName, reason: &str) {
    runtime.ha.fenced.store(true, Ordering::Release);
    let victims = runtime.ha.fence_list();
    let mut machines = Vec::new();
    for vm in runtime.local_names().await {
        if !victims.contains(&vm) {
            continue;
        }
        if let Some(machine) = runtime.machine(&vm).await {
            match machine.sigkill() {
                Ok(()) => machines.push((vm, machine)),
                Err(error) => tracing::error!("host {me}: cannot fence VM {vm}: {error}"),
            }
        }
    }
    let budget = Duration::from_millis(KILL_BUDGET_MS);
    let waits = machines
        .iter()
        .map(|(vm, machine)| async move { (vm, machine.wait_exit_timeout(budget).await) });
    let mut killed = Vec::new();
    for (vm, gone) in futures::future::join_all(waits).await {
        if gone {
            killed.push(vm.to_string());
        } else {
            runtime.ha.fence_failed.store(true, Ordering::Release);
            tracing::error!(
                "host {me}: VM {vm} survived SIGKILL for {KILL_BUDGET_MS} ms (stuck in storage?)"
            );
        }
    }
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
        let mut watchdog = Watchdog::open(&path, 10_000).unwrap();
        watchdog.feed();
        watchdog.feed();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "11");
        assert!(Watchdog::open(&dir.path().join("absent"), 10_000).is_err());
    }

    #[test]
    fn an_agent_is_sane_while_its_reconciler_goes_round() {
        let guard = HaGuard::new(HaTiming::default(), None);
        assert!(guard.sane());
        let later = monotonic_ms() + SANE_WITHIN_MS + 1;
        assert!(!guard.sane_at(later), "silent for longer than it may be");
        guard.progress_ms.store(later, Ordering::Release);
        assert!(guard.sane_at(later));
    }
}
