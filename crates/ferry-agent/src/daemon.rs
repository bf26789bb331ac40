//! `ferry agent run`: the per-host daemon. It
//! - holds the host's lease and registers the host under it (re-registering after a loss);
//! - reattaches to the QEMUs a previous agent left running;
//! - reconciles the VMs placed here with what users asked for, and reports their status;
//! - serves the REST API (any host answers any request);
//! - campaigns for leadership; the leader runs the manager.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::ops::ClusterApi;
use ferry_api::rest::{self, RestState};
use ferry_manager::ha::{after_vm_failure, AfterFailure};
use ferry_model::cluster::{
    now_ms, HostRecord, HostState, ImageContent, ImageRecord, PoolInfo, VmRecord, VmState,
    VmStatus, RECORD_VERSION,
};
use ferry_model::events::EventKind;
use ferry_model::ha::{LeaveHost, RestartCause, RestartEntry};
use ferry_model::ops::{OpKind, OpRecord, OpState};
use ferry_model::{Bytes, HostLimits, HostName, VmName};
use ferry_qemu::{Accel, ProbeImage, RunState};
use ferry_store::{
    fold_vm_change, read_vm_entries, Election, Lease, PrefixWatch, Store, VmEntries, VmEntry,
    WatchEvent,
};
use tokio::sync::watch;

use crate::config::{AccelChoice, AgentConfig};
use crate::executor::{self, Executor, ManagerMemory};
use crate::fence_device::FencePolicy;
use crate::migration::{self, Context};
use crate::reconcile::{decide, Local, Step};
use crate::runtime::{LocalExec, Runtime};
use crate::secrets::ClusterKey;
use crate::storage;

/// How often everything is re-checked even without a change in etcd.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How often each local VM's status is refreshed (written only when it changed, or
/// every `STATUS_HEARTBEAT`).
const STATUS_EVERY: Duration = Duration::from_secs(2);
const STATUS_HEARTBEAT: Duration = Duration::from_secs(10);
/// A VM whose start failed is not retried sooner than this.
const START_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The API address is taken or not ours.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
    /// The host's certificate, key or CA cannot be used.
    #[error("TLS: {0}")]
    Tls(ferry_tls::TlsError),
    /// The VM watch ended.
    #[error("the watch on the cluster's VMs ended")]
    WatchEnded,
    #[error("cannot open the watchdog {path}: {source}")]
    Watchdog {
        path: String,
        source: std::io::Error,
    },
    /// QEMU is missing or older than Ferry supports.
    #[error("{0}")]
    Qemu(ferry_qemu::QemuError),
    /// The fence-agent allowlist or the cluster key cannot be used.
    #[error("{0}")]
    Fencing(String),
}

pub async fn run(config: AgentConfig) -> Result<(), AgentError> {
    let host = config.host.clone();
    // Before anything else: an agent on an old QEMU would fail later, mid-migration.
    let qemu = ferry_qemu::version::check(&config.qemu.binary).map_err(AgentError::Qemu)?;
    tracing::info!("QEMU {qemu} at {}", config.qemu.binary.display());
    // Opened first: a configured watchdog that cannot be fed must stop the start-up.
    // It is fed while the start-up waits for etcd, then by the fencing loop.
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = match &config.ha.watchdog {
        Some(path) => Some(
            crate::fencing::Watchdog::open(path, config.ha.watchdog_timeout_ms)
                .map_err(|source| AgentError::Watchdog {
                    path: path.display().to_string(),
                    source,
                })?
                .feed_while_starting(started.clone()),
        ),
        None => None,
    };
    let fencing = config.fence_policy().map_err(AgentError::Fencing)?;
    let identity = ferry_tls::Identity::load(&config.tls.files()).map_err(AgentError::Tls)?;
    if identity.name != host.as_str() {
        return Err(AgentError::Tls(ferry_tls::TlsError::Config(format!(
            "{} is the certificate of {}, not of host {host}",
            config.tls.files().cert.display(),
            identity.name
        ))));
    }
    let store_tls = ferry_store::StoreTls {
        ca_pem: identity.trust.pem().to_string(),
        cert_pem: identity.cert_pem().map_err(AgentError::Tls)?,
        key_pem: identity.key_pem().map_err(AgentError::Tls)?,
    };
    if config.migration.tls {
        config
            .tls
            .write_qemu_creds(&config.paths.qemu_tls_dir())
            .map_err(|problem| AgentError::Tls(ferry_tls::TlsError::Config(problem)))?;
    }
    let store = connect(&config, &store_tls).await;
    let accel = choose_accel(&config, &store).await;
    let limits = host_limits(&config);
    let cpu = ferry_qemu::accel::host_cpu(&config.qemu.binary, accel)
        .await
        .unwrap_or_else(|error| {
            tracing::warn!("cannot query the host CPU: {error}");
            ferry_qemu::accel::HostCpu {
                model: "qemu64".into(),
                ..Default::default()
            }
        });
    tracing::info!(
        "host {host}: {} vCPUs, {} for VMs, {}",
        limits.cpus,
        limits.memory,
        accel.qemu_name()
    );

    let runtime = Arc::new(Runtime::new(config.clone(), accel, limits));
    let reattached = runtime.reattach_all().await;
    let shared_pool = config
        .shared_pool()
        .map(|pool| pool.path.clone())
        .unwrap_or_else(|| config.paths.run_dir.join("pool"));
    let api = Arc::new(ClusterApi::new(
        store.clone(),
        host.clone(),
        shared_pool,
        Arc::new(LocalExec(runtime.clone())),
        identity.client_config().map_err(AgentError::Tls)?,
    ));
    for vm in &reattached {
        api.events()
            .record(
                &vm.subject(),
                EventKind::Reattached,
                &format!("agent on {host} reattached to VM {vm}"),
            )
            .await;
    }

    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|source| AgentError::Listen {
            address: config.api.listen.to_string(),
            source,
        })?;
    let router = rest::router(RestState {
        api: api.clone(),
        tokens: Arc::new(config.api.tokens.clone()),
        streams: Default::default(),
    });
    let server_tls = identity.server_config().map_err(AgentError::Tls)?;
    tokio::spawn(async move {
        if let Err(error) = ferry_api::serve::serve_tls(listener, router, server_tls).await {
            tracing::error!("API server stopped: {error}");
        }
    });

    let record = HostRecord {
        version: RECORD_VERSION,
        name: host.clone(),
        api_url: config.api.advertised_url(),
        addresses: config
            .networks
            .iter()
            .filter_map(|(name, network)| {
                network
                    .address
                    .clone()
                    .map(|address| (name.clone(), address))
            })
            .collect(),
        cpus: limits.cpus,
        memory: limits.memory,
        cpu_model: cpu.model,
        cpu_features: cpu.features,
        cpu_models: cpu.models,
        accel: accel.qemu_name().into(),
        pools: config
            .pools
            .iter()
            .map(|pool| PoolInfo {
                name: pool.name.clone(),
                path: pool.path.clone(),
                shared: pool.shared,
            })
            .collect(),
        networks: config.networks.keys().cloned().collect(),
        state: HostState::Active,
        migration_limit: config.migration.max_concurrent,
        started_ms: now_ms(),
    };
    tokio::spawn(publish_fence_device(
        store.clone(),
        config.clone(),
        fencing.key.clone(),
    ));
    // A request to be fenced is answered by this very start (the host was powered off).
    if let Err(error) = store.delete(&store.keys().fence_request(&host)).await {
        tracing::warn!("cannot remove this host's old fence request: {error}");
    }
    let (lease_tx, lease_rx) = watch::channel(None);
    tokio::spawn(hold_lease(
        store.clone(),
        record,
        Duration::from_secs(config.lease.ttl_seconds),
        runtime.clone(),
        lease_tx,
        api.clone(),
    ));
    tokio::spawn(crate::fencing::guard_forever(
        runtime.clone(),
        host.clone(),
        watchdog,
        started,
    ));
    if let Some(pool) = config.shared_pool() {
        tokio::spawn(crate::fencing::write_heartbeat_forever(
            runtime.clone(),
            host.clone(),
            pool.path.clone(),
        ));
        tokio::spawn(crate::fencing::read_heartbeats_forever(
            runtime.clone(),
            pool.path.clone(),
        ));
    }
    tokio::spawn(lead_when_elected(
        store.clone(),
        host.clone(),
        lease_rx,
        api.clone(),
        runtime.clone(),
        fencing,
    ));
    // Checked when the config was loaded.
    let host_monitors = config.host_monitors().unwrap_or_default();
    tokio::spawn(crate::host_monitors::run_forever(
        host_monitors,
        store.clone(),
        runtime.clone(),
        api.clone(),
    ));
    reconcile_forever(store, runtime, api).await
}

async fn connect(config: &AgentConfig, tls: &ferry_store::StoreTls) -> Store {
    loop {
        match Store::connect(&config.cluster.etcd, &config.cluster.prefix, Some(tls)).await {
            Ok(store) => return store,
            Err(error) => {
                tracing::warn!("{error}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn choose_accel(config: &AgentConfig, store: &Store) -> Accel {
    match config.qemu.accel {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => {
            let image = store
                .get::<ImageRecord>(&store.keys().image("appliance"))
                .await
                .ok()
                .flatten()
                .map(|image| image.value);
            let probe = image.and_then(|image| match image.content {
                ImageContent::Appliance { kernel, initrd, .. } => Some(ProbeImage {
                    kernel,
                    initrd,
                    cmdline: image.probe_cmdline?,
                    marker: image.probe_marker?,
                }),
                _ => None,
            });
            let Some(probe) = probe else {
                tracing::warn!("no probe image registered; using TCG");
                return Accel::Tcg;
            };
            let cache = config.paths.run_dir.join("accel.json");
            match ferry_qemu::accel::detect(&config.qemu.binary, &probe, &cache).await {
                Ok(report) => {
                    tracing::info!(
                        "acceleration {}: {}",
                        report.accel.qemu_name(),
                        report.reason
                    );
                    report.accel
                }
                Err(error) => {
                    tracing::warn!("KVM probe failed ({error}); using TCG");
                    Accel::Tcg
                }
            }
        }
    }
}

fn host_limits(config: &AgentConfig) -> HostLimits {
    let cpus = config.capacity.cpus.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|count| count.get() as u32)
            .unwrap_or(1)
    });
    let memory = config.capacity.memory.unwrap_or_else(|| {
        let total_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|line| line.starts_with("MemTotal:"))
                    .and_then(|line| line.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(1 << 20);
        Bytes(total_kib * 1024 / 5 * 4 / Bytes::MIB * Bytes::MIB)
    });
    HostLimits { cpus, memory }
}

/// Keeps a lease and the host record bound to it; after a loss, takes a new one.
async fn hold_lease(
    store: Store,
    record: HostRecord,
    ttl: Duration,
    runtime: Arc<Runtime>,
    current: watch::Sender<Option<i64>>,
    api: Arc<ClusterApi>,
) {
    let key = store.keys().host(&record.name);
    let renew_every = Duration::from_millis(runtime.ha.timing.heartbeat_ms);
    loop {
        let granted = Lease::grant_with(&store, ttl, renew_every, runtime.ha.clock.clone()).await;
        let lease = match granted {
            Ok(lease) => lease,
            Err(error) => {
                tracing::warn!("cannot take a lease: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(error) = store.put(&key, &record, Some(lease.id())).await {
            tracing::warn!("cannot register host {}: {error}", record.name);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        api.events()
            .record(
                &format!("host/{}", record.name),
                EventKind::Registered,
                &format!("host {} joined the cluster", record.name),
            )
            .await;
        runtime.ha.set_registered(true);
        // The receiver lives as long as the agent; a send fails only on its way out.
        if current.send(Some(lease.id())).is_err() {
            return;
        }
        lease.lost().await;
        runtime.ha.set_registered(false);
        if current.send(None).is_err() {
            return;
        }
        tracing::warn!("host {} lost its lease", record.name);
    }
}

/// Tells the other hosts how to power this one off (or that they cannot). Not under the
/// lease: a dead host's device is what the leader needs.
async fn publish_fence_device(store: Store, config: AgentConfig, cluster_key: Option<ClusterKey>) {
    let key = store.keys().fence_device(&config.host);
    // The config check made sure every secret has a key: this fails only if the random
    // source does, and then no device is better than one with a secret in clear.
    let device = config
        .sealed_fence_device(cluster_key.as_ref())
        .unwrap_or_else(|problem| {
            tracing::error!("cannot seal this host's fence device, publishing none: {problem}");
            None
        });
    loop {
        let written = match &device {
            Some(device) => store.put(&key, &device, None).await.map(|_| ()),
            None => store.delete(&key).await,
        };
        match written {
            Ok(()) => return,
            Err(error) => {
                tracing::warn!("cannot publish this host's fence device: {error}; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Campaigns with the current lease; while leading, runs the manager.
async fn lead_when_elected(
    store: Store,
    host: HostName,
    mut lease: watch::Receiver<Option<i64>>,
    api: Arc<ClusterApi>,
    runtime: Arc<Runtime>,
    fencing: FencePolicy,
) {
    loop {
        let Some(lease_id) = *lease.borrow_and_update() else {
            if lease.changed().await.is_err() {
                // The lease keeper ended: the agent is stopping.
                return;
            }
            continue;
        };
        let elected = tokio::select! {
            outcome = store.campaign(host.as_str(), lease_id) => outcome,
            _ = lease.changed() => continue,
        };
        let election: Election = match elected {
            Ok(election) => election,
            Err(error) => {
                tracing::warn!("campaign failed: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        api.events()
            .record(
                &format!("host/{host}"),
                EventKind::Leader,
                &format!("host {host} leads the cluster and runs the manager"),
            )
            .await;
        // Fresh for each term: fences and verdicts of an earlier term are out of date
        // (a host fenced then may have been repaired since), and end with the term.
        let mut memory = ManagerMemory::default();
        let executor = Executor {
            store: &store,
            events: api.events(),
            leader_key: String::from_utf8_lossy(&election.leader_key).into_owned(),
            timing: runtime.ha.timing,
            fencing: fencing.clone(),
        };
        loop {
            let heartbeats = runtime.ha.observed_heartbeats();
            if let Err(error) = executor.pass(&mut memory, heartbeats).await {
                tracing::warn!("manager: {error}");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = lease.changed() => break,
            }
            if *lease.borrow() != Some(lease_id) {
                break;
            }
        }
        tracing::warn!("host {host} no longer leads");
    }
}

/// Folds one change under `ops/` into the view of ops.
fn apply_op_change(ops: &mut BTreeMap<String, OpRecord>, change: &WatchEvent) {
    match change {
        WatchEvent::Resync { records } => {
            ops.clear();
            for (key, value, _) in records {
                if let Ok(op) = serde_json::from_slice::<OpRecord>(value) {
                    ops.insert(key.clone(), op);
                }
            }
        }
        WatchEvent::Put { key, value, .. } => {
            if let Ok(op) = serde_json::from_slice::<OpRecord>(value) {
                ops.insert(key.clone(), op);
            }
        }
        WatchEvent::Delete { key, .. } => {
            ops.remove(key);
        }
    }
}

struct Reporter {
    last: HashMap<VmName, (VmState, bool, Instant)>,
}

async fn reconcile_forever(
    store: Store,
    runtime: Arc<Runtime>,
    api: Arc<ClusterApi>,
) -> Result<(), AgentError> {
    let mut watch = loop {
        match PrefixWatch::start(&store, &store.keys().vms()).await {
            Ok(watch) => break watch,
            Err(error) => {
                tracing::warn!("cannot watch VMs: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut op_watch = loop {
        match PrefixWatch::start(&store, &store.keys().ops()).await {
            Ok(watch) => break watch,
            Err(error) => {
                tracing::warn!("cannot watch ops: {error}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut view = VmEntries::new();
    let mut ops: BTreeMap<String, OpRecord> = BTreeMap::new();
    // Nothing is decided before both snapshots are in: with an empty view every
    // reattached QEMU would look like a stray.
    let snapshot = watch.next().await.ok_or(AgentError::WatchEnded)?;
    fold_vm_change(&mut view, store.keys(), &snapshot);
    let snapshot = op_watch.next().await.ok_or(AgentError::WatchEnded)?;
    apply_op_change(&mut ops, &snapshot);
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    let mut last_status = Instant::now() - STATUS_EVERY;
    let mut reporter = Reporter {
        last: HashMap::new(),
    };
    let failures: Arc<std::sync::Mutex<HashMap<VmName, Instant>>> = Arc::default();
    let mut monitors = crate::monitors::Supervisor::default();
    loop {
        tokio::select! {
            change = watch.next() => {
                let change = change.ok_or(AgentError::WatchEnded)?;
                fold_vm_change(&mut view, store.keys(), &change);
            }
            change = op_watch.next() => {
                let change = change.ok_or(AgentError::WatchEnded)?;
                apply_op_change(&mut ops, &change);
            }
            _ = tick.tick() => {}
        }
        runtime.ha.mark_progress();
        if runtime.ha.take_stale_view() {
            // Back from a lease loss: what the watch held may be long out of date.
            match read_vm_entries(&store).await {
                Ok(fresh) => view = fresh,
                Err(error) => {
                    tracing::warn!("cannot re-read the cluster after a lease loss: {error}");
                    runtime.ha.mark_stale_view();
                    continue;
                }
            }
        }
        runtime.ha.set_fence_list(
            view.values()
                .filter_map(|entry| entry.record.as_ref().map(|record| &record.value))
                .filter(|record| {
                    record.ha.enabled
                        && record.ha.isolation == ferry_model::ha::IsolationResponse::PowerOff
                })
                .map(|record| record.spec.name.clone())
                .collect(),
        );
        reconcile_all(&store, &runtime, &api, &view, &ops, &failures).await;
        monitors.sync(&view, &store, &runtime, &api).await;
        if last_status.elapsed() >= STATUS_EVERY {
            last_status = Instant::now();
            report_status(&store, &runtime, &view, &mut reporter).await;
        }
    }
}

async fn reconcile_all(
    store: &Store,
    runtime: &Arc<Runtime>,
    api: &Arc<ClusterApi>,
    view: &VmEntries,
    ops: &BTreeMap<String, OpRecord>,
    failures: &Arc<std::sync::Mutex<HashMap<VmName, Instant>>>,
) {
    let me = runtime.config.host.clone();
    let mut names: Vec<VmName> = view.keys().filter_map(|name| name.parse().ok()).collect();
    for local in runtime.local_names().await {
        if !names.contains(&local) {
            names.push(local);
        }
    }
    for vm in names {
        let entry = view.get(vm.as_str()).cloned().unwrap_or_default();
        if entry.unknown().is_some() {
            // Unreadable is not absent: a QEMU here may be the VM's only copy.
            continue;
        }
        let record = entry.record.as_ref().map(|record| record.value.clone());
        if let Some(record) = &record {
            runtime.adopt_reset_serial(&vm, record.reset_serial).await;
        }
        let local = match runtime.machine(&vm).await {
            None => Local::Absent,
            Some(machine) if machine.has_exited() => Local::Exited,
            Some(_) => Local::Running,
        };
        let placement = entry
            .placement
            .as_ref()
            .map(|placement| placement.value.clone());
        let disk_move = ops.values().find(|op| {
            op.state == OpState::Running
                && matches!(&op.kind, OpKind::MoveDisk(move_disk) if move_disk.vm == vm && move_disk.host == me)
        });
        let step = decide(
            &me,
            record.as_ref(),
            placement.as_ref(),
            local,
            runtime.reset_seen(&vm).await,
            disk_move.is_some(),
        );
        if step == Step::Nothing {
            let placed_here_assigned = placement
                .as_ref()
                .is_some_and(|placement| placement.host == me && placement.migration.is_none());
            if placed_here_assigned && local == Local::Running && runtime.awaits_resume(&vm).await {
                finish_switch_over(store, runtime, api, &vm, ops).await;
            }
            continue;
        }
        if matches!(step, Step::Start | Step::MigrateIn) && !runtime.ha.may_start() {
            // Without a fresh lease (or before re-reading the cluster after losing one)
            // another host may already run this VM.
            continue;
        }
        if step == Step::Start && (leaving_here(&entry, &me) || runtime.is_leaving(&vm, &entry)) {
            // It failed here too often; the leader is placing it on another host.
            continue;
        }
        if step == Step::Start {
            let recently_failed = failures
                .lock()
                .ok()
                .and_then(|failures| failures.get(&vm).copied())
                .is_some_and(|at| at.elapsed() < START_BACKOFF);
            if recently_failed {
                continue;
            }
        }
        let Some(claim) = runtime.claim(&vm) else {
            continue;
        };
        let (store, runtime, api, failures) = (
            store.clone(),
            runtime.clone(),
            api.clone(),
            failures.clone(),
        );
        let versioned_placement = entry.placement.clone();
        let disk_move = disk_move.cloned();
        // The source of a migration whose agent restarted after the switch-over: its
        // copy is a stray now, and nobody else records the op's end.
        let switched_away = (step == Step::KillStray)
            .then(|| {
                ops.values().find(|op| {
                    op.state == OpState::Running
                        && matches!(&op.kind, OpKind::Migrate(migrate)
                            if migrate.vm == vm
                                && migrate.from == me
                                && placement.as_ref().is_some_and(|p| p.host == migrate.to))
                })
            })
            .flatten()
            .cloned();
        tokio::spawn(async move {
            let _claim = claim;
            let context = Context {
                store: &store,
                runtime: &runtime,
                events: api.events(),
            };
            match (step.clone(), versioned_placement, disk_move) {
                (Step::MigrateOut, Some(placement), _) => {
                    migration::migrate_out(&context, &vm, placement).await
                }
                (Step::MigrateIn, Some(placement), _) => {
                    migration::migrate_in(&context, &vm, placement).await
                }
                (Step::MoveDisk, _, Some(op)) => storage::move_disk(&context, &op).await,
                (Step::MigrateOut | Step::MigrateIn | Step::MoveDisk, _, _) => {}
                (step, placement, _) => {
                    let generation = placement.map(|placement| placement.value.generation);
                    carry_out(
                        step, &vm, record, generation, &store, &runtime, &api, &failures,
                    )
                    .await;
                    if let Some(op) = switched_away {
                        if runtime.machine(&vm).await.is_none() {
                            migration::complete_after_restart(&context, &op).await;
                        }
                    }
                }
            }
        });
    }
}

/// A QEMU launched for an incoming migration (or reattached) under a placement that now
/// names this host: if it runs, nothing is left to do; if a switch-over left it paused
/// (this agent restarted between the CAS and `cont`), the resume is finished.
async fn finish_switch_over(
    store: &Store,
    runtime: &Arc<Runtime>,
    api: &Arc<ClusterApi>,
    vm: &VmName,
    ops: &BTreeMap<String, OpRecord>,
) {
    let Some(machine) = runtime.machine(vm).await else {
        return;
    };
    let paused = match machine.status().await {
        Ok(RunState::Running) => {
            runtime.mark_resumed(vm).await;
            return;
        }
        Ok(RunState::Paused | RunState::Prelaunch | RunState::Inmigrate) => true,
        Ok(_) => false,
        // Asked again next round.
        Err(_) => return,
    };
    let me = &runtime.config.host;
    if !paused {
        runtime.mark_resumed(vm).await;
        return;
    }
    let op = ops
        .values()
        .filter(|op| {
            matches!(&op.kind, OpKind::Migrate(migrate) if &migrate.vm == vm && &migrate.to == me)
                && op.state != OpState::Queued
        })
        .max_by_key(|op| op.created_ms)
        .cloned();
    // The last migration here, if any: asked again next round when there is none.
    let Some(op) = op else {
        return;
    };
    if op.state.is_final() && op.state != OpState::Completed {
        // It ended without a switch-over (its source died) and HA placed the VM here:
        // this waiting QEMU never got the guest. Without it, the VM starts afresh.
        match runtime.kill(vm).await {
            Ok(()) => tracing::warn!("VM {vm}: removed the waiting QEMU of failed op {}", op.id),
            Err(error) => tracing::warn!("VM {vm}: the waiting QEMU survives: {error}"),
        }
        return;
    }
    let Some(claim) = runtime.claim(vm) else {
        return;
    };
    let (store, runtime, api, vm) = (store.clone(), runtime.clone(), api.clone(), vm.clone());
    tokio::spawn(async move {
        let _claim = claim;
        let context = Context {
            store: &store,
            runtime: &runtime,
            events: api.events(),
        };
        migration::finish_switch_over(&context, &vm, &op).await;
    });
}

/// The VM's restart log asks to leave this host, under its current placement.
fn leaving_here(entry: &VmEntry, me: &HostName) -> bool {
    let (Some(log), Some(placement)) = (&entry.restarts, &entry.placement) else {
        return false;
    };
    log.value
        .leave
        .as_ref()
        .is_some_and(|leave| &leave.host == me && leave.generation == placement.value.generation)
}

#[allow(clippy::too_many_arguments)]
async fn carry_out(
    step: Step,
    vm: &VmName,
    record: Option<VmRecord>,
    placement_generation: Option<u64>,
    store: &Store,
    runtime: &Arc<Runtime>,
    api: &Arc<ClusterApi>,
    failures: &std::sync::Mutex<HashMap<VmName, Instant>>,
) {
    let me = runtime.config.host.clone();
    let keys = store.keys().clone();
    let events = api.events();
    let subject = vm.subject();
    let write_status = |state: VmState, pid: Option<i32>, error: Option<String>| {
        migration::record_status(store, &me, vm, state, pid, false, error)
    };
    match (step, record) {
        (Step::Start, Some(record)) => {
            write_status(VmState::Starting, None, None).await;
            let started = Instant::now();
            let tag = record.resume_checkpoint.clone();
            let clear = async {
                let Some(tag) = tag else { return Ok(()) };
                store
                    .update(&keys.vm_spec(vm), |current: Option<&VmRecord>| {
                        let mut next = current.cloned().ok_or_else(|| {
                            ferry_store::StoreError::Conflict {
                                key: keys.vm_spec(vm),
                            }
                        })?;
                        if next.resume_checkpoint.as_deref() == Some(tag.as_str()) {
                            next.resume_checkpoint = None;
                        }
                        Ok::<_, ferry_store::StoreError>(next)
                    })
                    .await
                    .map(drop)
                    .map_err(|error| format!("cannot clear it from the record: {error}"))
            };
            match runtime.start_then(&record, clear).await {
                Ok(machine) => {
                    write_status(VmState::Running, Some(machine.pid()), None).await;
                    events
                        .record(
                            &subject,
                            EventKind::Started,
                            &format!(
                                "VM {vm} started on {me} (QEMU pid {}, {} ms)",
                                machine.pid(),
                                started.elapsed().as_millis()
                            ),
                        )
                        .await;
                }
                Err(error) => {
                    if let Ok(mut failures) = failures.lock() {
                        failures.insert(vm.clone(), Instant::now());
                    }
                    write_status(VmState::Failed, None, Some(error.clone())).await;
                    events
                        .record(
                            &subject,
                            EventKind::StartFailed,
                            &format!("VM {vm} failed to start on {me}: {error}"),
                        )
                        .await;
                }
            }
        }
        (Step::Stop, _) => {
            write_status(VmState::Stopping, None, None).await;
            match runtime.stop(vm).await {
                Ok(report) => {
                    write_status(VmState::Stopped, None, None).await;
                    events
                        .record(
                            &subject,
                            EventKind::Stopped,
                            &format!("VM {vm} stopped on {me}: {report}"),
                        )
                        .await;
                }
                Err(error) => {
                    events
                        .record(&subject, EventKind::StopFailed, &format!("VM {vm}: {error}"))
                        .await
                }
            }
        }
        (Step::Reset, Some(record)) => match runtime.reset(vm, record.reset_serial).await {
            Ok(()) => {
                events
                    .record(&subject, EventKind::Reset, &format!("VM {vm} reset on {me}"))
                    .await
            }
            Err(error) => {
                events
                    .record(&subject, EventKind::ResetFailed, &format!("VM {vm}: {error}"))
                    .await
            }
        },
        (Step::Delete, Some(record)) => {
            if let Err(error) = runtime.kill(vm).await {
                events
                    .record(&subject, EventKind::DeleteFailed, &format!("VM {vm}: {error}"))
                    .await;
                return;
            }
            // Only the VM's own directories ({pool}/vms/{vm}) are ever removed.
            ferry_api::provision::remove_dirs(&ferry_api::provision::dirs_of(&record.spec));
            for (network, ip) in ferry_api::ops::record_addresses(&record) {
                if let Err(error) = store.delete(&keys.address(&network, &ip.to_string())).await {
                    tracing::warn!("VM {vm}: address {ip} not released: {error}");
                }
            }
            if let Err(error) = store.delete_prefix(&format!("{}{vm}/", keys.vms())).await {
                // Its QEMU and files are gone; the records stay until the next pass.
                events
                    .record(
                        &subject,
                        EventKind::DeleteFailed,
                        &format!("VM {vm}: its records could not be removed yet: {error}"),
                    )
                    .await;
                return;
            }
            events
                .record(
                    &subject,
                    EventKind::Deleted,
                    &format!("VM {vm} deleted: QEMU, disk and records removed by {me}"),
                )
                .await;
        }
        (Step::KillStray, _) => match runtime.kill(vm).await {
            Ok(()) => {
                events
                    .record(
                        &subject,
                        EventKind::StrayKilled,
                        &format!("QEMU of VM {vm} killed on {me}: the VM is not placed here"),
                    )
                    .await
            }
            Err(error) => {
                events
                    .record(
                        &subject,
                        EventKind::KillFailed,
                        &format!(
                            "QEMU of VM {vm} on {me} is not placed here but could not be killed: {error}"
                        ),
                    )
                    .await
            }
        },
        (Step::ReapExited, record) => {
            let last_words = runtime.run_dir(vm).last_words();
            // The pvpanic event is read by another task: the console's panic line is the
            // fallback when QEMU exited before that task saw it.
            let panicked = runtime
                .machine(vm)
                .await
                .is_some_and(|machine| machine.guest_panicked())
                || last_words.contains("Kernel panic");
            let on_purpose = runtime.take_expected_exit(vm);
            if let Err(error) = runtime.forget(vm).await {
                tracing::warn!("VM {vm}: {error}");
                return;
            }
            let unexpected = record
                .as_ref()
                .is_some_and(|record| record.desired == ferry_model::cluster::PowerState::Running);
            if runtime.ha.is_fenced() {
                events
                    .record(
                        &subject,
                        EventKind::Fenced,
                        &format!("VM {vm} was killed on {me}: the host fenced itself"),
                    )
                    .await;
            } else if let Some(reason) = on_purpose.filter(|_| unexpected) {
                // A monitor killed it; its event says why, and it is not a failure.
                write_status(VmState::Failed, None, Some(reason)).await;
            } else if let Some(record) = record.filter(|_| unexpected) {
                if let Ok(mut failures) = failures.lock() {
                    failures.insert(vm.clone(), Instant::now() - START_BACKOFF / 2);
                }
                let cause = if panicked {
                    RestartCause::GuestPanicked
                } else {
                    RestartCause::QemuExited
                };
                let what = match cause {
                    RestartCause::GuestPanicked => format!("the guest of VM {vm} panicked on {me}"),
                    _ => format!("QEMU of VM {vm} exited unexpectedly on {me}"),
                };
                let detail = if last_words.is_empty() {
                    String::new()
                } else {
                    format!(" ({last_words})")
                };
                let failure = RestartEntry {
                    at_ms: now_ms(),
                    host: me.clone(),
                    cause,
                };
                let decision =
                    match executor::update_restart_log(store, vm, |log| log.push(failure.clone()))
                        .await
                    {
                        Ok(log) => after_vm_failure(&log, &me, &record.ha, now_ms()),
                        Err(error) => {
                            tracing::warn!("cannot log the failure of VM {vm}: {error}");
                            AfterFailure::RestartHere
                        }
                    };
                match decision {
                    AfterFailure::RestartHere => {
                        write_status(VmState::Failed, None, Some(format!("{cause}; restarting")))
                            .await;
                        events
                            .record(
                                &subject,
                                EventKind::VmFailed,
                                &format!("{what}; restarting it here{detail}"),
                            )
                            .await;
                    }
                    AfterFailure::MoveAway { reason } => {
                        let leave = LeaveHost {
                            host: me.clone(),
                            generation: placement_generation.unwrap_or(0),
                            reason: format!("it kept failing on {me}: {reason}"),
                        };
                        if let Err(error) = executor::update_restart_log(store, vm, |log| {
                            log.leave = Some(leave.clone())
                        })
                        .await
                        {
                            // Nobody will move it: restarting it here beats leaving it down.
                            tracing::warn!("cannot ask to move VM {vm} away: {error}");
                            write_status(
                                VmState::Failed,
                                None,
                                Some(format!("{cause}; restarting")),
                            )
                            .await;
                            return;
                        }
                        runtime.mark_leaving(vm, leave.generation);
                        write_status(
                            VmState::Failed,
                            None,
                            Some(format!("{cause}; {reason}: moving to another host")),
                        )
                        .await;
                        events
                            .record(
                                &subject,
                                EventKind::VmFailed,
                                &format!("{what}; {reason}: restarting it on another host{detail}"),
                            )
                            .await;
                    }
                    AfterFailure::GiveUp { reason } => {
                        if let Err(error) = executor::leave_stopped(store, vm).await {
                            tracing::warn!("cannot stop VM {vm} after its restart limit: {error}");
                        }
                        write_status(VmState::Failed, None, Some(format!("{cause}; {reason}")))
                            .await;
                        events
                            .record(
                                &subject,
                                EventKind::RestartLimit,
                                &format!("{what}; not restarted: {reason}{detail}"),
                            )
                            .await;
                    }
                }
            } else {
                write_status(VmState::Stopped, None, None).await;
            }
        }
        (step, None) => tracing::debug!("no record for {vm}; skipping {step:?}"),
        (Step::Nothing | Step::MigrateOut | Step::MigrateIn | Step::MoveDisk, _) => {}
    }
}

/// Refreshes the status of the VMs running here: QEMU's run state and a guest-agent ping.
async fn report_status(
    store: &Store,
    runtime: &Arc<Runtime>,
    view: &VmEntries,
    reporter: &mut Reporter,
) {
    let me = runtime.config.host.clone();
    for vm in runtime.local_names().await {
        if let Err(error) = runtime
            .run_dir(&vm)
            .rotate_console_log(ferry_qemu::CONSOLE_LOG_LIMIT)
        {
            tracing::warn!("VM {vm}: cannot rotate its console log: {error}");
        }
        let placed_here = view
            .get(vm.as_str())
            .and_then(|entry| entry.placement.as_ref())
            .is_some_and(|placement| placement.value.host == me);
        if !placed_here {
            continue;
        }
        let Some(claim) = runtime.claim(&vm) else {
            continue;
        };
        let Some(machine) = runtime.machine(&vm).await else {
            continue;
        };
        if machine.has_exited() {
            continue;
        }
        let state = match machine.status().await {
            Ok(RunState::Running) => VmState::Running,
            Ok(RunState::Paused) | Ok(RunState::Prelaunch) => VmState::Paused,
            Ok(RunState::Inmigrate) | Ok(RunState::Postmigrate) | Ok(RunState::FinishMigrate) => {
                VmState::Migrating
            }
            Ok(RunState::Shutdown) => VmState::Stopping,
            Ok(_) | Err(_) => VmState::Failed,
        };
        let guest_agent = machine
            .guest_agent()
            .ping(Duration::from_millis(800))
            .await
            .is_ok();
        drop(claim);
        let unchanged = reporter
            .last
            .get(&vm)
            .is_some_and(|(last_state, last_agent, at)| {
                *last_state == state
                    && *last_agent == guest_agent
                    && at.elapsed() < STATUS_HEARTBEAT
            });
        if unchanged {
            continue;
        }
        let status = VmStatus {
            version: RECORD_VERSION,
            host: Some(me.clone()),
            state,
            pid: Some(machine.pid()),
            guest_agent,
            last_error: None,
            updated_ms: now_ms(),
        };
        if store
            .put(&store.keys().vm_status(&vm), &status, None)
            .await
            .is_ok()
        {
            reporter
                .last
                .insert(vm, (state, guest_agent, Instant::now()));
        }
    }
}
