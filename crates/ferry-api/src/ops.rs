//! Every operation of the cluster, as typed methods over the state in etcd. The REST
//! handlers, the CLI (through the REST client) and the portal call these and nothing
//! else. Operations that must not leave anything half-done (create, delete) undo their
//! own steps when a later step fails.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_model::cluster::{
    now_ms, Event, HostRecord, ImageRecord, NetworkRecord, Placement, PowerState, VmRecord,
    VmState, VmStatus,
};
use ferry_model::events::EventKind;
use ferry_model::{Bytes, HostName, MacAddr, VmName, MIN_MEMORY};
use ferry_store::Store;
use futures::future::BoxFuture;

use crate::types::{
    CreateVmRequest, EventView, ExecRequest, ExecResponse, HostView, UpdateHaRequest, VmView,
};
use crate::ApiError;

/// The image a VM is made from when the request names none.
pub const DEFAULT_IMAGE: &str = "appliance";
/// How long `create` waits for the manager to place the VM.
const PLACEMENT_WAIT: Duration = Duration::from_secs(15);
/// How long `delete` waits for the owning agent to remove the VM.
const DELETE_WAIT: Duration = Duration::from_secs(60);

/// What only the host running a VM can do; the agent implements it.
pub trait LocalVms: Send + Sync {
    fn exec(
        &self,
        vm: VmName,
        command: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'_, Result<ExecResponse, ApiError>>;

    /// Puts `iso` into (or, with `None`, ejects) CD-ROM drive `drive` of a VM running
    /// here.
    fn change_cdrom(
        &self,
        vm: VmName,
        drive: String,
        iso: Option<PathBuf>,
    ) -> BoxFuture<'_, Result<(), ApiError>>;

    /// Carries out a checkpoint action on a VM running here, or on the disks of a
    /// stopped VM this host holds. `nvram_copy`: the checkpoint's copy of the UEFI
    /// variable store.
    fn checkpoint<'a>(
        &'a self,
        record: &'a VmRecord,
        action: &'a ferry_model::ops::CheckpointAction,
        nvram_copy: Option<&'a std::path::Path>,
    ) -> BoxFuture<'a, Result<crate::types::CheckpointDone, ApiError>>;

    /// Copies the template base into the VM's linked disks (running or stopped here).
    fn flatten<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), ApiError>>;

    /// The unix socket of a console of a VM running here.
    fn console_socket<'a>(
        &'a self,
        vm: &'a VmName,
        kind: crate::console::ConsoleKind,
    ) -> BoxFuture<'a, Result<PathBuf, ApiError>>;
}

pub use ferry_store::{EventLog, VmEntry};

/// Where a VM's host-side work happens (exec, CD-ROMs, consoles).
pub(crate) enum Owner {
    Here,
    There { host: HostName, url: String },
}

pub struct ClusterApi {
    pub(crate) store: Store,
    pub(crate) host: HostName,
    /// The shared pool's path (the same on every host): new VMs' disks go here.
    pub(crate) shared_pool: PathBuf,
    pub(crate) local: Arc<dyn LocalVms>,
    /// Calls to other agents: mutual TLS with this host's certificate.
    pub(crate) http: reqwest::Client,
    pub(crate) peer_tls: Arc<rustls::ClientConfig>,
    pub(crate) events: EventLog,
}

/// How a request reached this agent: from its caller, or forwarded once by another
/// agent (over mutual TLS, checked against the forwarding host's certificate). A
/// forwarded request is never forwarded again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    Direct,
    Forwarded,
}

impl ClusterApi {
    /// `peer_tls`: the client side of this host's certificate, for calls to other
    /// agents.
    pub fn new(
        store: Store,
        host: HostName,
        shared_pool: PathBuf,
        local: Arc<dyn LocalVms>,
        peer_tls: rustls::ClientConfig,
    ) -> ClusterApi {
        let events = EventLog::new(store.clone(), format!("agent/{host}"));
        ClusterApi {
            store,
            host,
            shared_pool,
            local,
            http: reqwest::Client::builder()
                .use_preconfigured_tls(peer_tls.clone())
                .connect_timeout(Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_default(),
            peer_tls: Arc::new(peer_tls),
            events,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn events(&self) -> &EventLog {
        &self.events
    }

    // ----- reading the cluster -----

    pub(crate) async fn hosts(&self) -> Result<Vec<HostRecord>, ApiError> {
        let hosts = self
            .store
            .list_each::<HostRecord>(&self.store.keys().hosts())
            .await?
            .readable();
        Ok(hosts.into_iter().map(|(_, host)| host.value).collect())
    }

    /// All VMs' records, placements and statuses, by name.
    pub async fn vm_entries(&self) -> Result<BTreeMap<String, VmEntry>, ApiError> {
        Ok(ferry_store::read_vm_entries(&self.store).await?)
    }

    pub(crate) async fn vm_entry(&self, name: &VmName) -> Result<VmEntry, ApiError> {
        Ok(self.vm_entry_and_record(name).await?.0)
    }

    /// The VM's records, with its spec also apart; `NotFound` if it has none, and a
    /// conflict naming the record if it cannot be read (nothing is done on a guess).
    pub(crate) async fn vm_entry_and_record(
        &self,
        name: &VmName,
    ) -> Result<(VmEntry, VmRecord), ApiError> {
        let entry = ferry_store::read_vm_entry(&self.store, name).await?;
        if let Some(reason) = entry.unknown() {
            return Err(ApiError::Conflict(format!("VM {name}: {reason}")));
        }
        let record = entry
            .record
            .as_ref()
            .map(|record| record.value.clone())
            .ok_or_else(|| ApiError::NotFound(format!("VM {name} does not exist")))?;
        Ok((entry, record))
    }

    pub async fn list_hosts(&self) -> Result<Vec<HostView>, ApiError> {
        let hosts = self.hosts().await?;
        let entries = self.vm_entries().await?;
        let leader = self.store.leader().await.ok().flatten();
        let healths = self
            .store
            .list_each::<ferry_model::monitor::HostHealth>(&self.store.keys().host_healths())
            .await?
            .readable();
        Ok(hosts
            .iter()
            .map(|host| {
                let mut view = host_view(host, &entries, leader.as_deref());
                let key = self.store.keys().host_health(&host.name);
                if let Some((_, health)) = healths.iter().find(|(known, _)| *known == key) {
                    view.monitors = health
                        .value
                        .monitors
                        .iter()
                        .map(|monitor| crate::types::HostMonitorView {
                            id: monitor.id.clone(),
                            check: monitor.check.clone(),
                            state: monitor.state.as_str().into(),
                            failed_probes: monitor.failures,
                            last_error: monitor.last_error.clone(),
                        })
                        .collect();
                }
                view
            })
            .collect())
    }

    pub async fn get_host(&self, name: &str) -> Result<HostView, ApiError> {
        self.list_hosts()
            .await?
            .into_iter()
            .find(|host| host.name == name)
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "host {name} is not in the cluster (or its agent is down)"
                ))
            })
    }

    pub async fn list_vms(&self) -> Result<Vec<VmView>, ApiError> {
        Ok(self
            .vm_entries()
            .await?
            .values()
            .filter_map(vm_view)
            .collect())
    }

    pub async fn get_vm(&self, name: &str) -> Result<VmView, ApiError> {
        let name = parse_vm_name(name)?;
        let entry = self.vm_entry(&name).await?;
        vm_view(&entry).ok_or_else(|| ApiError::NotFound(format!("VM {name} does not exist")))
    }

    // ----- changing it -----

    pub async fn create_vm(
        &self,
        request: CreateVmRequest,
        token: &str,
        hop: Hop,
    ) -> Result<VmView, ApiError> {
        let template = match &request.template {
            Some(name) => Some(crate::templates::TemplateSource {
                record: self.template_record(name).await?,
                linked: request.linked.unwrap_or(true),
                snapshot: None,
            }),
            None => {
                if request.linked.is_some() {
                    return Err(ApiError::BadRequest(
                        "linked: applies to a VM made from a template".into(),
                    ));
                }
                None
            }
        };
        self.create_vm_from(request, template, token, hop).await
    }

    /// Creates a VM, from `template` when given (a template of the cluster, or a VM
    /// being cloned described as one).
    pub(crate) async fn create_vm_from(
        &self,
        mut request: CreateVmRequest,
        template: Option<crate::templates::TemplateSource>,
        token: &str,
        hop: Hop,
    ) -> Result<VmView, ApiError> {
        let name = parse_vm_name(&request.name)?;
        if let Some(template) = &template {
            let record = &template.record;
            if request.cpus == 0 {
                request.cpus = record.cpus;
            }
            if request.memory.is_empty() {
                request.memory = record.memory.to_string();
            }
            if request.nics.is_empty() {
                request.nics = record
                    .nics
                    .iter()
                    .map(|nic| crate::types::NicRequest {
                        network: nic.network.clone(),
                        mac: None,
                        model: Some(nic.model),
                    })
                    .collect();
            }
            request.firmware = request.firmware.or(Some(if record.uefi {
                crate::types::FirmwareKind::Uefi
            } else {
                crate::types::FirmwareKind::Bios
            }));
            request.disk_bus = request.disk_bus.or(Some(record.bus));
            request.cpu_model = request
                .cpu_model
                .clone()
                .or_else(|| Some(record.cpu_model.clone()));
            if request.stop_command.is_none() {
                if let Some(stop) = &record.stop_command {
                    request.stop_command = Some(stop.command.clone());
                    request.stop_timeout_seconds = Some(stop.timeout_seconds);
                }
            }
            if request.firmware == Some(crate::types::FirmwareKind::Uefi) && !record.uefi {
                return Err(ApiError::BadRequest(format!(
                    "firmware: template {} boots with BIOS",
                    record.name
                )));
            }
        }
        let memory: Bytes = request
            .memory
            .parse()
            .map_err(|error| ApiError::BadRequest(format!("memory: {error}")))?;
        if memory < MIN_MEMORY || !memory.0.is_multiple_of(Bytes::MIB) {
            return Err(ApiError::BadRequest(format!(
                "memory: {memory} must be a whole number of MiB, at least {MIN_MEMORY}"
            )));
        }
        if request.cpus == 0 {
            return Err(ApiError::BadRequest("cpus: must be at least 1".into()));
        }
        let project = match request.project.as_deref() {
            Some(text) => text
                .parse::<ferry_model::ProjectName>()
                .map_err(|error| ApiError::BadRequest(format!("project: {error}")))?,
            None => ferry_model::access::default_project(),
        };
        let keys = self.store.keys().clone();
        let sources = [
            request.image.is_some(),
            request.iso.is_some(),
            request.blank,
            template.is_some(),
        ]
        .iter()
        .filter(|given| **given)
        .count();
        if sources > 1 {
            return Err(ApiError::BadRequest(
                "give one of image, iso, blank and template".into(),
            ));
        }
        if let Some(template) = &template {
            let shared = ferry_model::access::default_project();
            if template.record.project != project && template.record.project != shared {
                return Err(ApiError::NotFound(format!(
                    "template {} does not exist",
                    template.record.name
                )));
            }
        }
        let image = match (&request.image, &request.iso, request.blank) {
            _ if template.is_some() => None,
            (Some(image), _, _) => Some(self.image_named(image, "image").await?),
            (None, Some(iso), _) => Some(self.image_named(iso, "iso").await?),
            (None, None, true) => None,
            (None, None, false) => Some(self.image_named(DEFAULT_IMAGE, "image").await?),
        };
        let cdrom = match &request.cdrom {
            Some(cdrom) => Some(self.image_named(cdrom, "cdrom").await?),
            None => None,
        };
        let restart_command = image
            .as_ref()
            .and_then(|image| image.restart_command.clone());
        let mut monitors = ferry_model::monitor::MonitorSet {
            version: 1,
            monitors: Vec::new(),
        };
        for (index, monitor) in request.monitors.iter().enumerate() {
            let monitor =
                crate::monitors::monitor_from(monitor, &monitors, restart_command.clone())
                    .map_err(|error| ApiError::BadRequest(format!("monitors[{index}]: {error}")))?;
            if monitors.monitors.iter().any(|known| known.id == monitor.id) {
                return Err(ApiError::BadRequest(format!(
                    "monitors[{index}]: a second monitor with id {}",
                    monitor.id
                )));
            }
            monitors.monitors.push(monitor);
        }
        let ha_settings = UpdateHaRequest {
            ha: Some(request.ha),
            ha_priority: Some(request.ha_priority),
            isolation: request.isolation.clone(),
            preferred_hosts: Some(request.preferred_hosts.clone()),
            anti_affinity: request.anti_affinity.clone(),
            max_restarts: request.max_restarts,
            restart_window: request.restart_window.clone(),
        };
        let mut ha = ferry_model::ha::HaPolicy::default();
        apply_ha_update(&mut ha, &ha_settings)?;
        if !request.ha && ha != ferry_model::ha::HaPolicy::default() {
            return Err(ApiError::BadRequest(
                "ha_priority, isolation, preferred_hosts, anti_affinity, max_restarts and \
                 restart_window apply only to an HA VM (set ha)"
                    .into(),
            ));
        }
        let hosts = self.hosts().await?;
        let mut preferred_host = match &request.host {
            Some(host) => {
                let host: HostName = host
                    .parse()
                    .map_err(|error| ApiError::BadRequest(format!("host: {error}")))?;
                if !hosts.iter().any(|candidate| candidate.name == host) {
                    return Err(ApiError::BadRequest(format!(
                        "host {host} is not in the cluster"
                    )));
                }
                Some(host)
            }
            None => None,
        };
        let largest = hosts
            .iter()
            .map(|host| host.memory)
            .max()
            .unwrap_or_default();
        if memory > largest {
            return Err(ApiError::BadRequest(format!(
                "memory: {memory} is more than any host can give (largest: {largest})"
            )));
        }
        let most_cpus = hosts.iter().map(|host| host.cpus).max().unwrap_or(0);
        if request.cpus > most_cpus {
            return Err(ApiError::BadRequest(format!(
                "cpus: {} is more than any host has ({most_cpus})",
                request.cpus
            )));
        }
        if let Some(model) = &request.cpu_model {
            let known = hosts.iter().any(|host| {
                model == "host" || model == "qemu64" || host.cpu_models.contains_key(model)
            });
            if !known {
                return Err(ApiError::BadRequest(format!(
                    "cpu_model: no host knows the CPU model {model:?}"
                )));
            }
        }

        // Disks on a pool only one other host has are made by that host: the request
        // goes there whole.
        let wanted_disks = request
            .disks
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                let size = match &disk.size {
                    Some(size) => Some(size.parse::<Bytes>().map_err(|error| {
                        ApiError::BadRequest(format!("disks[{index}].size: {error}"))
                    })?),
                    None => None,
                };
                Ok(crate::provision::WantedDisk {
                    size,
                    pool: disk.pool.clone(),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let me = hosts
            .iter()
            .find(|host| host.name == self.host)
            .ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "this host ({}) is not registered yet; try again",
                    self.host
                ))
            })?;
        for (index, disk) in wanted_disks.iter().enumerate() {
            let Some(pool) = &disk.pool else { continue };
            if me.pool(pool).is_some() {
                continue;
            }
            let owners: Vec<&HostRecord> = hosts
                .iter()
                .filter(|host| host.pool(pool).is_some())
                .collect();
            let owner = match owners.as_slice() {
                [] => {
                    return Err(ApiError::BadRequest(format!(
                        "disks[{index}]: pool {pool:?} is not offered by any host"
                    )))
                }
                [owner] => *owner,
                several => {
                    let names: Vec<&str> = several.iter().map(|host| host.name.as_str()).collect();
                    return Err(ApiError::BadRequest(format!(
                        "disks[{index}]: pool {pool} is local to several hosts ({}); give \
                         local pools names of their own",
                        names.join(", ")
                    )));
                }
            };
            if request
                .host
                .as_deref()
                .is_some_and(|host| host != owner.name.as_str())
            {
                return Err(ApiError::BadRequest(format!(
                    "disks[{index}]: pool {pool} is local to {}, not to host {}",
                    owner.name,
                    request.host.as_deref().unwrap_or_default()
                )));
            }
            if hop == Hop::Forwarded {
                return Err(ApiError::Conflict(format!(
                    "disks[{index}]: pool {pool} is not on {} (a forwarded create is not \
                     forwarded again)",
                    self.host
                )));
            }
            if template.is_some() && request.template.is_none() {
                return Err(ApiError::BadRequest(format!(
                    "disks[{index}]: a clone's disks go on the shared pool or a pool of {}",
                    self.host
                )));
            }
            let mut forwarded = request.clone();
            forwarded.host = Some(owner.name.to_string());
            return self.forward_create(&owner.api_url, &forwarded, token).await;
        }
        if let Some(local) = wanted_disks
            .iter()
            .filter_map(|disk| disk.pool.as_deref())
            .find(|pool| me.pool(pool).is_some_and(|pool| !pool.shared))
        {
            // A disk on this host's local pool: the VM runs here.
            if preferred_host
                .as_ref()
                .is_some_and(|host| *host != self.host)
            {
                return Err(ApiError::BadRequest(format!(
                    "pool {local} is local to {}, not to the host asked for",
                    self.host
                )));
            }
            preferred_host = Some(self.host.clone());
        }
        let pools: Vec<crate::provision::PoolSite> = me
            .pools
            .iter()
            .map(|pool| crate::provision::PoolSite {
                name: pool.name.clone(),
                path: pool.path.clone(),
                shared: pool.shared,
                free: free_space(&pool.path),
            })
            .collect();

        if self
            .store
            .get::<VmRecord>(&keys.vm_spec(&name))
            .await?
            .is_some()
        {
            return Err(ApiError::Conflict(format!("VM {name} already exists")));
        }

        // NICs: the networks some host has, an address from the network's pool.
        let nic_requests = if request.nics.is_empty() {
            let has_business = self
                .store
                .get::<NetworkRecord>(&keys.network("business"))
                .await?
                .is_some();
            if has_business {
                vec![crate::types::NicRequest {
                    network: "business".into(),
                    mac: None,
                    model: None,
                }]
            } else {
                Vec::new()
            }
        } else {
            request.nics.clone()
        };
        let mut planned_nics = Vec::new();
        let mut addresses: Vec<(String, Ipv4Addr)> = Vec::new();
        let nics_result: Result<(), ApiError> = async {
            for (index, nic) in nic_requests.iter().enumerate() {
                if !hosts
                    .iter()
                    .any(|host| host.networks.contains(&nic.network))
                {
                    return Err(ApiError::BadRequest(format!(
                        "nics[{index}]: no host is on network {:?}",
                        nic.network
                    )));
                }
                let mac = match &nic.mac {
                    Some(mac) => mac.parse::<MacAddr>().map_err(|error| {
                        ApiError::BadRequest(format!("nics[{index}].mac: {error}"))
                    })?,
                    None => MacAddr::derived_from(&format!("{name}/{index}")),
                };
                let network = self
                    .store
                    .get::<NetworkRecord>(&keys.network(&nic.network))
                    .await?
                    .map(|record| record.value);
                let address = match &network {
                    Some(network) => {
                        let address = self.allocate_address(network, &name).await?;
                        addresses.push((network.name.clone(), address));
                        Some((address, network.prefix, network.gateway))
                    }
                    None => None,
                };
                planned_nics.push(crate::provision::PlannedNic {
                    network: nic.network.clone(),
                    mac,
                    model: nic.model.unwrap_or_default(),
                    address,
                });
            }
            Ok(())
        }
        .await;
        if let Err(error) = nics_result {
            self.release_addresses(&addresses).await;
            return Err(error);
        }
        let mut cmdline = format!("console=ttyS0 quiet panic=1 ferry.hostname={name}");
        if let Some((address, prefix, gateway)) = planned_nics.first().and_then(|nic| nic.address) {
            cmdline.push_str(&format!(" ferry.ip={address}/{prefix}"));
            if let Some(gateway) = gateway {
                cmdline.push_str(&format!(" ferry.gw={gateway}"));
            }
        }
        let source = match (&image, request.iso.is_some(), &template) {
            (_, _, Some(template)) => crate::provision::Source::Template {
                template: &template.record,
                linked: template.linked,
                snapshot: template.snapshot.as_deref(),
            },
            (Some(image), true, None) => crate::provision::Source::Iso(image),
            (Some(image), false, None) => crate::provision::Source::Image(image),
            (None, _, None) => crate::provision::Source::Blank,
        };
        let stop_command = request
            .stop_command
            .clone()
            .map(|command| ferry_model::StopCommand {
                command,
                timeout_seconds: request
                    .stop_timeout_seconds
                    .unwrap_or(crate::provision::DEFAULT_STOP_TIMEOUT_SECONDS),
            });
        let instance_id = format!("{name}-{}", now_ms());
        let planned = crate::provision::plan(&crate::provision::Request {
            name: &name,
            cpus: request.cpus,
            memory,
            cpu_model: request.cpu_model.as_deref(),
            source,
            disks: &wanted_disks,
            bus: request.disk_bus.unwrap_or_default(),
            firmware: request.firmware.unwrap_or(crate::types::FirmwareKind::Bios),
            nics: &planned_nics,
            cdrom: cdrom.as_ref(),
            boot_order: &request.boot_order,
            cloud_init: request.cloud_init.as_ref(),
            instance_id: &instance_id,
            stop_command,
            appliance_cmdline: cmdline,
            shared_pool: &self.shared_pool,
            pools: &pools,
        })
        .and_then(|plan| {
            plan.spec
                .validate(&ferry_model::HostLimits {
                    cpus: most_cpus,
                    memory: largest,
                })
                .map_err(|error| error.to_string())?;
            Ok(plan)
        });
        let planned = match planned {
            Ok(plan) => plan,
            Err(error) => {
                self.release_addresses(&addresses).await;
                return Err(ApiError::BadRequest(error));
            }
        };
        let mut wanted = ferry_model::access::Usage::default();
        wanted.add(
            planned.spec.cpus,
            planned.spec.memory,
            Bytes(
                planned
                    .spec
                    .disks
                    .iter()
                    .filter_map(|disk| disk.size)
                    .map(|size| size.0)
                    .sum(),
            ),
        );
        if let Err(refused) = self.check_quota(&project, &wanted).await {
            self.release_addresses(&addresses).await;
            return Err(refused);
        }
        // The record first, create-only and stopped: it reserves the name, so only this
        // create makes (and may remove) the VM's files, and the VM runs only once they
        // are all there.
        let record = VmRecord {
            project: project.clone(),
            version: ferry_model::cluster::RECORD_VERSION,
            spec: planned.spec.clone(),
            desired: PowerState::Stopped,
            image: match (&image, &template) {
                (_, Some(template)) => template.record.image.clone(),
                (Some(image), None) => image.name.clone(),
                (None, None) => String::new(),
            },
            preferred_host,
            ip: addresses.first().map(|(_, address)| address.to_string()),
            addresses: addresses
                .iter()
                .map(|(network, address)| ferry_model::cluster::NicAddress {
                    network: network.clone(),
                    address: *address,
                })
                .collect(),
            deleting: false,
            reset_serial: 0,
            resume_checkpoint: None,
            migration: Default::default(),
            ha,
        };
        if let Err(error) = self
            .store
            .create(&keys.vm_spec(&name), &record, &format!("VM {name}"))
            .await
        {
            self.release_addresses(&addresses).await;
            return Err(error.into());
        }
        let made = {
            let planned = planned.clone();
            tokio::task::spawn_blocking(move || crate::provision::make(&planned))
                .await
                .map_err(|error| format!("disk creation: {error}"))
                .and_then(|made| made)
        };
        if let Err(error) = made {
            // `make` removed what it made; anything else in those directories is not
            // this create's to remove.
            let error = self.undo_create(&name, &[], &addresses, error).await;
            return Err(ApiError::Conflict(error));
        }
        // From here on, a failure removes the records, files and addresses again.
        let undo = |reason: String| self.undo_create(&name, &planned.dirs, &addresses, reason);
        if !monitors.monitors.is_empty() {
            if let Err(error) = self
                .store
                .put(&keys.vm_monitors(&name), &monitors, None)
                .await
            {
                // Not half a VM: without its monitors it is removed again.
                let error = undo(error.to_string()).await;
                return Err(ApiError::Unavailable(format!("VM {name}: {error}")));
            }
        }
        let started = self
            .store
            .update(&keys.vm_spec(&name), |current: Option<&VmRecord>| {
                let mut record = current
                    .cloned()
                    .ok_or_else(|| ApiError::NotFound("its record vanished".into()))?;
                record.desired = PowerState::Running;
                Ok::<_, ApiError>(record)
            })
            .await;
        if let Err(error) = started {
            let error = undo(format!("cannot start it: {error}")).await;
            return Err(ApiError::Unavailable(format!("VM {name}: {error}")));
        }
        let origin = match &template {
            Some(template) if template.linked => {
                format!(", a linked clone of template {}", template.record.name)
            }
            Some(template) => format!(", a full copy of {}", template.record.name),
            None => String::new(),
        };
        self.events
            .record(
                &name.subject(),
                EventKind::Created,
                &format!(
                    "VM {name} created ({} vCPU, {memory}, {} disk(s), {}{origin})",
                    request.cpus,
                    planned.spec.disks.len(),
                    planned.spec.firmware.name()
                ),
            )
            .await;

        // The manager places it; a VM that fits nowhere is removed again, whole.
        let deadline = Instant::now() + PLACEMENT_WAIT;
        loop {
            let entry = self.vm_entry(&name).await?;
            if entry.placement.is_some() {
                return vm_view(&entry)
                    .ok_or_else(|| ApiError::Internal(format!("VM {name} vanished")));
            }
            let refused = entry
                .status
                .as_ref()
                .and_then(|status| status.value.last_error.clone())
                .filter(|_| {
                    entry.status.as_ref().map(|status| status.value.state) == Some(VmState::Failed)
                });
            if refused.is_some() || Instant::now() >= deadline {
                let reason = refused.unwrap_or_else(|| {
                    "no manager placed it in time (is a leader elected?)".into()
                });
                let reason = undo(reason).await;
                self.events
                    .record(
                        &name.subject(),
                        EventKind::CreateFailed,
                        &format!("VM {name} not created: {reason}"),
                    )
                    .await;
                return Err(ApiError::Conflict(format!(
                    "VM {name} cannot be placed: {reason}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn image_named(&self, name: &str, field: &str) -> Result<ImageRecord, ApiError> {
        self.store
            .get::<ImageRecord>(&self.store.keys().image(name))
            .await?
            .map(|record| record.value)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "{field}: image {name:?} does not exist (ferry image list)"
                ))
            })
    }

    async fn undo_create(
        &self,
        name: &VmName,
        dirs: &[PathBuf],
        addresses: &[(String, Ipv4Addr)],
        reason: String,
    ) -> String {
        let removed = self
            .store
            .delete_prefix(&format!("{}{name}/", self.store.keys().vms()))
            .await;
        if let Err(error) = removed {
            tracing::warn!("VM {name}: records not removed after a failed create: {error}");
        }
        crate::provision::remove_dirs(dirs);
        self.release_addresses(addresses).await;
        reason
    }

    /// Sends a create to the host that owns the pool its disks go on.
    async fn forward_create(
        &self,
        owner_url: &str,
        request: &CreateVmRequest,
        token: &str,
    ) -> Result<VmView, ApiError> {
        let response = self
            .http
            .post(format!("{owner_url}/api/v1/vms"))
            .bearer_auth(token)
            .header(crate::console::FORWARDED_HEADER, self.host.as_str())
            .json(request)
            .timeout(PLACEMENT_WAIT + Duration::from_secs(600))
            .send()
            .await
            .map_err(|error| ApiError::Unavailable(format!("{owner_url}: {error}")))?;
        crate::client::decode_response(response).await
    }

    async fn allocate_address(
        &self,
        network: &NetworkRecord,
        vm: &VmName,
    ) -> Result<Ipv4Addr, ApiError> {
        let keys = self.store.keys();
        let first = u32::from(network.first);
        let last = u32::from(network.last);
        let (taken, _) = self.store.list_raw(&keys.addresses(&network.name)).await?;
        let taken: std::collections::BTreeSet<String> = taken
            .into_iter()
            .filter_map(|(key, _, _)| key.rsplit('/').next().map(str::to_string))
            .collect();
        // Each VM starts looking at a place of its own (from its name), so creates made
        // at once do not all race for the first free address, one etcd round trip per
        // loss; a collision only moves the search on.
        let size = last.saturating_sub(first) + 1;
        let digest = <sha2::Sha256 as sha2::Digest>::digest(vm.as_str().as_bytes());
        let start = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % size;
        for offset in 0..size {
            let address = Ipv4Addr::from(first + (start + offset) % size);
            if taken.contains(&address.to_string()) {
                continue;
            }
            // Create-only: two creates racing for one address cannot both win.
            match self
                .store
                .create(
                    &keys.address(&network.name, &address.to_string()),
                    &vm.to_string(),
                    "address",
                )
                .await
            {
                Ok(_) => return Ok(address),
                Err(ferry_store::StoreError::Exists { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(ApiError::Conflict(format!(
            "network {}: no free address left in {}-{}",
            network.name, network.first, network.last
        )))
    }

    async fn release_addresses(&self, addresses: &[(String, Ipv4Addr)]) {
        for (network, address) in addresses {
            if let Err(error) = self
                .store
                .delete(&self.store.keys().address(network, &address.to_string()))
                .await
            {
                tracing::warn!("address {address} on {network} not released: {error}");
            }
        }
    }

    /// Changes a VM's record with compare-and-swap, retrying on concurrent changes.
    pub(crate) async fn update_record(
        &self,
        name: &VmName,
        change: impl Fn(&mut VmRecord) -> Result<(), ApiError>,
    ) -> Result<VmRecord, ApiError> {
        self.refuse_while_migrating(name).await?;
        let key = self.store.keys().vm_spec(name);
        self.store
            .update(&key, |current: Option<&VmRecord>| {
                let mut record = current
                    .cloned()
                    .ok_or_else(|| ApiError::NotFound(format!("VM {name} does not exist")))?;
                if record.deleting {
                    return Err(ApiError::Conflict(format!("VM {name} is being deleted")));
                }
                change(&mut record)?;
                Ok(record)
            })
            .await
    }

    /// Power changes wait until a migration ends: the VM is between two hosts.
    async fn refuse_while_migrating(&self, name: &VmName) -> Result<(), ApiError> {
        let placement = self
            .store
            .get::<Placement>(&self.store.keys().vm_placement(name))
            .await?;
        match placement.and_then(|placement| placement.value.migration) {
            Some(migration) => Err(ApiError::Conflict(format!(
                "VM {name} is migrating to {} (op {}); wait for it or cancel it",
                migration.to, migration.op
            ))),
            None => Ok(()),
        }
    }

    pub async fn start_vm(&self, name: &str) -> Result<VmView, ApiError> {
        let name = parse_vm_name(name)?;
        // A person starting it answers the restart limit: the count starts over. First,
        // so that the start never sees the old count; a restart the leader judged on the
        // old log fails its compare-and-swap.
        self.store
            .delete(&self.store.keys().vm_restarts(&name))
            .await?;
        self.update_record(&name, |record| {
            record.desired = PowerState::Running;
            Ok(())
        })
        .await?;
        self.events
            .record(
                &name.subject(),
                EventKind::StartRequested,
                &format!("start of VM {name} requested"),
            )
            .await;
        self.get_vm(name.as_str()).await
    }

    /// Changes the VM's HA policy; takes effect at its next failure or its host's.
    pub async fn update_ha(
        &self,
        name: &str,
        update: &UpdateHaRequest,
    ) -> Result<VmView, ApiError> {
        let name = parse_vm_name(name)?;
        let record = self
            .update_record(&name, |record| apply_ha_update(&mut record.ha, update))
            .await?;
        self.events
            .record(
                &name.subject(),
                EventKind::HaPolicy,
                &format!("VM {name}: {}", ha_summary(&record.ha)),
            )
            .await;
        self.get_vm(name.as_str()).await
    }

    pub async fn stop_vm(&self, name: &str) -> Result<VmView, ApiError> {
        let name = parse_vm_name(name)?;
        self.update_record(&name, |record| {
            record.desired = PowerState::Stopped;
            Ok(())
        })
        .await?;
        self.events
            .record(
                &name.subject(),
                EventKind::StopRequested,
                &format!("stop of VM {name} requested"),
            )
            .await;
        self.get_vm(name.as_str()).await
    }

    pub async fn reset_vm(&self, name: &str) -> Result<VmView, ApiError> {
        let name = parse_vm_name(name)?;
        let view = self.get_vm(name.as_str()).await?;
        let entry = self.vm_entry(&name).await?;
        if vm_state(&entry) != Some(VmState::Running) {
            return Err(ApiError::Conflict(format!(
                "VM {name} is {}, not running; start it instead",
                view.state
            )));
        }
        self.update_record(&name, |record| {
            record.reset_serial += 1;
            Ok(())
        })
        .await?;
        self.events
            .record(
                &name.subject(),
                EventKind::ResetRequested,
                &format!("reset of VM {name} requested"),
            )
            .await;
        self.get_vm(name.as_str()).await
    }

    /// Marks the VM for deletion; its agent removes the QEMU, the disk and the records.
    /// Waits until that is done.
    pub async fn delete_vm(&self, name: &str) -> Result<(), ApiError> {
        let name = parse_vm_name(name)?;
        let keys = self.store.keys().clone();
        self.refuse_while_migrating(&name).await?;
        let entry = self.vm_entry(&name).await?;
        let record = entry.record.map(|record| record.value);
        if entry.placement.is_none() {
            // Never placed: nothing runs anywhere, remove the records and files directly.
            self.store
                .delete_prefix(&format!("{}{name}/", keys.vms()))
                .await?;
            if let Some(record) = record {
                crate::provision::remove_dirs(&crate::provision::dirs_of(&record.spec));
                self.release_addresses(&record_addresses(&record)).await;
            }
            self.events
                .record(
                    &name.subject(),
                    EventKind::Deleted,
                    &format!("VM {name} deleted"),
                )
                .await;
            return Ok(());
        }
        let key = keys.vm_spec(&name);
        loop {
            let Some(current) = self.store.get::<VmRecord>(&key).await? else {
                break;
            };
            let mut record = current.value.clone();
            record.deleting = true;
            match self
                .store
                .compare_and_swap(&key, current.mod_revision, &record)
                .await
            {
                Ok(_) => break,
                Err(ferry_store::StoreError::Conflict { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        self.events
            .record(
                &name.subject(),
                EventKind::DeleteRequested,
                &format!("deletion of VM {name} requested"),
            )
            .await;
        let deadline = Instant::now() + DELETE_WAIT;
        while self.store.get::<VmRecord>(&key).await?.is_some() {
            if Instant::now() >= deadline {
                return Err(ApiError::Unavailable(format!(
                    "VM {name} is marked for deletion but its host has not removed it within {DELETE_WAIT:?}; it will be removed when the host is back"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Runs a command in the guest through its guest agent, on the host that runs it.
    pub async fn exec_vm(
        &self,
        name: &str,
        request: ExecRequest,
        token: &str,
        hop: Hop,
    ) -> Result<ExecResponse, ApiError> {
        let name = parse_vm_name(name)?;
        if request.command.is_empty() {
            return Err(ApiError::BadRequest(
                "command: give the program to run".into(),
            ));
        }
        let timeout = Duration::from_secs(request.timeout_seconds.unwrap_or(30).clamp(1, 3600));
        let entry = self.vm_entry(&name).await?;
        let view = vm_view(&entry)
            .ok_or_else(|| ApiError::NotFound(format!("VM {name} does not exist")))?;
        if vm_state(&entry) != Some(VmState::Running) {
            return Err(ApiError::Conflict(format!(
                "VM {name} is {}, not running",
                view.state
            )));
        }
        // Any host answers any request: forward to the owner.
        let (owner, owner_url) = match self.owner_of(&name, &entry).await? {
            Owner::Here => return self.local.exec(name, request.command, timeout).await,
            Owner::There { .. } if hop == Hop::Forwarded => {
                return Err(ApiError::Conflict(format!(
                    "VM {name} is not on {} (a forwarded exec is not forwarded again)",
                    self.host
                )))
            }
            Owner::There { host, url } => (host, url),
        };
        let response = self
            .http
            .post(format!("{owner_url}/api/v1/vms/{name}/exec"))
            .bearer_auth(token)
            .header(crate::console::FORWARDED_HEADER, self.host.as_str())
            .json(&request)
            .timeout(timeout + Duration::from_secs(5))
            .send()
            .await
            .map_err(|error| ApiError::Unavailable(format!("host {owner}: {error}")))?;
        crate::client::decode_response(response).await
    }
    /// The host a placed VM runs on: this one, or another and the URL of its API.
    pub(crate) async fn owner_of(&self, name: &VmName, entry: &VmEntry) -> Result<Owner, ApiError> {
        let owner = entry
            .placement
            .as_ref()
            .map(|placement| placement.value.host.clone())
            .ok_or_else(|| ApiError::Conflict(format!("VM {name} is not placed")))?;
        if owner == self.host {
            return Ok(Owner::Here);
        }
        let url = self.api_url_of(&owner, name).await?;
        Ok(Owner::There { host: owner, url })
    }

    pub(crate) async fn api_url_of(
        &self,
        owner: &HostName,
        vm: &VmName,
    ) -> Result<String, ApiError> {
        self.hosts()
            .await?
            .iter()
            .find(|host| host.name == *owner)
            .map(|host| host.api_url.clone())
            .ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "VM {vm} runs on {owner}, whose agent is not reachable"
                ))
            })
    }

    /// Puts an ISO image of the library into CD-ROM drive `drive`, or ejects it
    /// (`image` none). A running VM sees it at once; the record keeps it for the next
    /// start, a migration and an HA restart.
    pub async fn change_cdrom(
        &self,
        name: &str,
        drive: &str,
        image: Option<&str>,
        token: &str,
    ) -> Result<VmView, ApiError> {
        let name = parse_vm_name(name)?;
        let iso = match image {
            Some(image) => {
                let record = self
                    .store
                    .get::<ImageRecord>(&self.store.keys().image(image))
                    .await?
                    .ok_or_else(|| ApiError::BadRequest(format!("image {image:?} does not exist")))?
                    .value;
                match record.content {
                    ferry_model::cluster::ImageContent::Iso { path } => Some(path),
                    other => {
                        return Err(ApiError::BadRequest(format!(
                            "image {image} is {}, not an ISO",
                            other.kind().as_str()
                        )))
                    }
                }
            }
            None => None,
        };
        if drive == "cidata" {
            return Err(ApiError::BadRequest(format!(
                "VM {name}: drive cidata holds its cloud-init seed, which Ferry keeps"
            )));
        }
        self.refuse_while_migrating(&name).await?;
        let (entry, record) = self.vm_entry_and_record(&name).await?;
        if !record.spec.cdroms.iter().any(|cdrom| cdrom.id == drive) {
            let drives: Vec<&str> = record.spec.cdroms.iter().map(|cd| cd.id.as_str()).collect();
            return Err(ApiError::NotFound(format!(
                "VM {name} has no CD-ROM drive {drive:?} (it has: {})",
                if drives.is_empty() {
                    "none".to_string()
                } else {
                    drives.join(", ")
                }
            )));
        }
        let state = vm_state(&entry).unwrap_or(VmState::Stopped);
        if matches!(state, VmState::Starting | VmState::Stopping) {
            return Err(ApiError::Conflict(format!(
                "VM {name} is {}; change its CD-ROM when it is running or stopped",
                state.as_str()
            )));
        }
        if state == VmState::Running {
            if let Owner::There {
                host: owner,
                url: owner_url,
            } = self.owner_of(&name, &entry).await?
            {
                let response = self
                    .http
                    .post(format!("{owner_url}/api/v1/vms/{name}/cdrom/{drive}"))
                    .bearer_auth(token)
                    .json(&crate::types::CdromRequest {
                        image: image.map(str::to_string),
                    })
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await
                    .map_err(|error| ApiError::Unavailable(format!("host {owner}: {error}")))?;
                // The owner changed the medium and the record.
                return crate::client::decode_response(response).await;
            }
            self.local
                .change_cdrom(name.clone(), drive.to_string(), iso.clone())
                .await?;
        }
        self.update_record(&name, |record| {
            for cdrom in record
                .spec
                .cdroms
                .iter_mut()
                .filter(|cdrom| cdrom.id == drive)
            {
                cdrom.path = iso.clone();
            }
            Ok(())
        })
        .await?;
        self.events
            .record(
                &name.subject(),
                EventKind::Cdrom,
                &match image {
                    Some(image) => format!("VM {name}: image {image} in CD-ROM drive {drive}"),
                    None => format!("VM {name}: CD-ROM drive {drive} ejected"),
                },
            )
            .await;
        self.get_vm(name.as_str()).await
    }

    pub async fn list_events(&self, limit: usize) -> Result<Vec<EventView>, ApiError> {
        let events = self
            .store
            .list_each::<Event>(&self.store.keys().events())
            .await?
            .readable();
        let skip = events.len().saturating_sub(limit);
        Ok(events
            .into_iter()
            .skip(skip)
            .map(|(_, event)| event_view(event.value))
            .collect())
    }
}

pub(crate) fn parse_vm_name(name: &str) -> Result<VmName, ApiError> {
    name.parse()
        .map_err(|error: ferry_model::NameError| ApiError::BadRequest(error.to_string()))
}

fn host_view(
    host: &HostRecord,
    entries: &BTreeMap<String, VmEntry>,
    leader: Option<&str>,
) -> HostView {
    let placed: Vec<&VmEntry> = entries
        .values()
        .filter(|entry| {
            entry
                .placement
                .as_ref()
                .map(|placement| &placement.value.host)
                == Some(&host.name)
        })
        .collect();
    let used: u64 = placed
        .iter()
        .filter_map(|entry| entry.record.as_ref())
        .map(|record| record.value.spec.memory.as_mib())
        .sum();
    HostView {
        name: host.name.to_string(),
        state: match host.state {
            ferry_model::cluster::HostState::Active => "active".into(),
            ferry_model::cluster::HostState::Maintenance => "maintenance".into(),
        },
        api_url: host.api_url.clone(),
        addresses: host.addresses.clone(),
        cpus: host.cpus,
        memory_mib: host.memory.as_mib(),
        used_memory_mib: used,
        vms: placed.len() as u32,
        accel: host.accel.clone(),
        cpu_model: host.cpu_model.clone(),
        leader: leader == Some(host.name.as_str()),
        monitors: Vec::new(),
    }
}

/// The status as the VM's host wrote it. A status written by a host the VM is no
/// longer placed on (or moving to) is that host's last word before an HA restart moved
/// the VM: its pid and state describe a QEMU that no longer holds the VM.
fn current_status(entry: &VmEntry) -> Option<&VmStatus> {
    let status = &entry.status.as_ref()?.value;
    let Some(writer) = &status.host else {
        return Some(status);
    };
    match &entry.placement {
        Some(placement) => (placement.value.host == *writer
            || placement.value.migrating_to() == Some(writer))
        .then_some(status),
        None => Some(status),
    }
}

/// The VM's state: what its agent reports, or `starting`/`stopped` before it has
/// reported; `None` without a record.
pub fn vm_state(entry: &VmEntry) -> Option<VmState> {
    let record = &entry.record.as_ref()?.value;
    Some(match (current_status(entry), record.desired) {
        (Some(status), _) => status.state,
        (None, PowerState::Running) => VmState::Starting,
        (None, PowerState::Stopped) => VmState::Stopped,
    })
}

/// The state shown for a VM: what its agent reports, or `starting`/`stopped` before it
/// has reported, or `failed` with the reason.
pub fn vm_view(entry: &VmEntry) -> Option<VmView> {
    let record = &entry.record.as_ref()?.value;
    let status = current_status(entry);
    let state = vm_state(entry)?;
    Some(VmView {
        name: record.spec.name.to_string(),
        project: record.project.to_string(),
        state: state.as_str().into(),
        desired: match record.desired {
            PowerState::Running => "running".into(),
            PowerState::Stopped => "stopped".into(),
        },
        host: entry
            .placement
            .as_ref()
            .map(|placement| placement.value.host.to_string()),
        ip: record.ip.clone(),
        cpus: record.spec.cpus,
        memory_mib: record.spec.memory.as_mib(),
        image: record.image.clone(),
        pid: status.and_then(|status| status.pid),
        guest_agent: status.is_some_and(|status| status.guest_agent),
        error: status.and_then(|status| status.last_error.clone()),
        ha: record.ha.enabled,
        ha_policy: record.ha.clone(),
        recent_restarts: entry.restarts.as_ref().map_or(0, |log| {
            let window_ms = record.ha.restart_window_s.saturating_mul(1000);
            log.value
                .entries
                .iter()
                .filter(|entry| now_ms().saturating_sub(entry.at_ms) < window_ms)
                .count() as u32
        }),
        monitors: crate::monitors::monitor_views(entry),
        firmware: record.spec.firmware.name().into(),
        cpu_model: record.spec.cpu_model.clone(),
        disks: record
            .spec
            .disks
            .iter()
            .map(|disk| crate::types::DiskView {
                id: disk.id.clone(),
                size: disk.size.map(|size| size.0),
                pool: disk.pool.clone(),
                bus: disk.bus,
                path: disk.path.display().to_string(),
            })
            .collect(),
        cdroms: record
            .spec
            .cdroms
            .iter()
            .map(|cdrom| crate::types::CdromView {
                id: cdrom.id.clone(),
                path: cdrom.path.as_ref().map(|path| path.display().to_string()),
            })
            .collect(),
        nics: record
            .spec
            .nics
            .iter()
            .map(|nic| crate::types::NicView {
                network: nic.network.clone(),
                mac: nic.mac.to_string(),
                model: nic.model,
            })
            .collect(),
        has_guest_agent: record.spec.guest_agent,
    })
}

/// Applies the fields `update` sets; every value is checked before any is applied.
pub fn apply_ha_update(
    policy: &mut ferry_model::ha::HaPolicy,
    update: &UpdateHaRequest,
) -> Result<(), ApiError> {
    let bad = |message: String| ApiError::BadRequest(message);
    let mut next = policy.clone();
    if let Some(enabled) = update.ha {
        next.enabled = enabled;
    }
    if let Some(priority) = update.ha_priority {
        next.priority = priority;
    }
    if let Some(isolation) = &update.isolation {
        next.isolation = isolation.parse().map_err(bad)?;
    }
    if let Some(hosts) = &update.preferred_hosts {
        let mut parsed: Vec<HostName> = Vec::new();
        for host in hosts {
            let host: HostName = host
                .parse()
                .map_err(|error| bad(format!("preferred_hosts: {error}")))?;
            if parsed.contains(&host) {
                return Err(bad(format!("preferred_hosts: {host} is listed twice")));
            }
            parsed.push(host);
        }
        next.preferred_hosts = parsed;
    }
    if let Some(group) = &update.anti_affinity {
        next.anti_affinity = if group.is_empty() {
            None
        } else {
            // Group names follow the host-name rules: short, lowercase, no surprises.
            let plain = group.len() <= 63
                && group
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
            if !plain {
                return Err(bad(format!(
                    "anti_affinity: group {group:?} must be up to 63 lowercase letters, digits or '-'"
                )));
            }
            Some(group.clone())
        };
    }
    if let Some(max) = update.max_restarts {
        if max > 1000 {
            return Err(bad(format!(
                "max_restarts: {max} is more than 1000; use 0 for no limit"
            )));
        }
        next.max_restarts = max;
    }
    if let Some(window) = &update.restart_window {
        let seconds = humantime::parse_duration(window)
            .map_err(|error| bad(format!("restart_window {window:?}: {error}")))?
            .as_secs();
        if !(60..=7 * 24 * 3600).contains(&seconds) {
            return Err(bad(format!(
                "restart_window {window:?}: must be between 1m and 7d"
            )));
        }
        next.restart_window_s = seconds;
    }
    *policy = next;
    Ok(())
}

/// One line about an HA policy, for events and the CLI.
pub fn ha_summary(policy: &ferry_model::ha::HaPolicy) -> String {
    if !policy.enabled {
        return "HA off".into();
    }
    let mut parts = vec![
        format!("HA on, priority {}", policy.priority),
        match policy.isolation {
            ferry_model::ha::IsolationResponse::PowerOff => "power-off when isolated".into(),
            ferry_model::ha::IsolationResponse::KeepRunning => "keeps running when isolated".into(),
        },
    ];
    if !policy.preferred_hosts.is_empty() {
        let hosts: Vec<&str> = policy
            .preferred_hosts
            .iter()
            .map(HostName::as_str)
            .collect();
        parts.push(format!("prefers {}", hosts.join(", ")));
    }
    if let Some(group) = &policy.anti_affinity {
        parts.push(format!("anti-affinity group {group}"));
    }
    parts.push(if policy.max_restarts == 0 {
        "no restart limit".into()
    } else {
        format!(
            "at most {} restarts in {}",
            policy.max_restarts,
            humantime::format_duration(Duration::from_secs(policy.restart_window_s))
        )
    });
    parts.join("; ")
}

fn event_view(event: Event) -> EventView {
    EventView {
        at_ms: event.at_ms,
        source: event.source,
        subject: event.subject,
        kind: event.kind,
        message: event.message,
    }
}

/// The addresses a VM holds, by network (records before per-NIC addresses kept only
/// the first NIC's, as `ip`).
pub fn record_addresses(record: &VmRecord) -> Vec<(String, Ipv4Addr)> {
    if !record.addresses.is_empty() {
        return record
            .addresses
            .iter()
            .map(|nic| (nic.network.clone(), nic.address))
            .collect();
    }
    let network = record
        .spec
        .nics
        .first()
        .map(|nic| nic.network.clone())
        .unwrap_or_else(ferry_model::default_network);
    record
        .ip
        .as_deref()
        .and_then(|ip| ip.parse().ok())
        .map(|ip| vec![(network, ip)])
        .unwrap_or_default()
}

/// Free bytes on the filesystem holding `path`, or `None` if it cannot be read.
pub(crate) fn free_space(path: &std::path::Path) -> Option<Bytes> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(Bytes(
        (stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test fails loudly by design

    use ferry_model::cluster::{PlacementMigration, PlacementPhase};
    use ferry_model::{Boot, Bytes, VmSpec};
    use ferry_store::Versioned;

    use super::*;

    fn versioned<T>(value: T) -> Option<Versioned<T>> {
        Some(Versioned {
            value,
            mod_revision: 1,
        })
    }

    fn entry(placed_on: &str, migrating_to: Option<&str>, status_from: &str) -> VmEntry {
        let record = VmRecord {
            version: 1,
            spec: VmSpec {
                name: "app".parse().unwrap(),
                cpus: 1,
                memory: Bytes::mib(256),
                cpu_model: "qemu64".into(),
                disks: vec![],
                nics: vec![],
                boot: Boot::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: String::new(),
                },
                firmware: Default::default(),
                cdroms: Vec::new(),
                boot_order: ferry_model::default_boot_order(),
                guest_agent: true,
                stop_command: None,
            },
            desired: PowerState::Running,
            image: "appliance".into(),
            preferred_host: None,
            ip: None,
            addresses: Vec::new(),
            deleting: false,
            reset_serial: 0,
            resume_checkpoint: None,
            migration: Default::default(),
            ha: Default::default(),
            project: ferry_model::access::default_project(),
        };
        VmEntry {
            record: versioned(record),
            placement: versioned(Placement {
                version: 1,
                host: placed_on.parse().unwrap(),
                generation: 2,
                phase: if migrating_to.is_some() {
                    PlacementPhase::Migrating
                } else {
                    PlacementPhase::Assigned
                },
                migration: migrating_to.map(|to| PlacementMigration {
                    to: to.parse().unwrap(),
                    op: "op-1".into(),
                }),
            }),
            status: versioned(VmStatus {
                version: 1,
                host: Some(status_from.parse().unwrap()),
                state: VmState::Running,
                pid: Some(30953),
                guest_agent: true,
                last_error: None,
                updated_ms: 1,
            }),
            ..VmEntry::default()
        }
    }

    #[test]
    fn a_status_left_by_the_host_an_ha_restart_moved_the_vm_from_is_not_shown() {
        // host1 fenced itself and wrote no more; the manager placed the VM on host2,
        // which has not reported yet.
        let view = vm_view(&entry("host2", None, "host1")).unwrap();
        assert_eq!(view.host.as_deref(), Some("host2"));
        assert_eq!(view.state, "starting");
        assert_eq!(view.pid, None);
        assert!(!view.guest_agent);
    }

    #[test]
    fn the_placed_hosts_status_and_the_migration_targets_status_are_shown() {
        let view = vm_view(&entry("host1", None, "host1")).unwrap();
        assert_eq!((view.state.as_str(), view.pid), ("running", Some(30953)));
        let view = vm_view(&entry("host1", Some("host2"), "host2")).unwrap();
        assert_eq!((view.state.as_str(), view.pid), ("running", Some(30953)));
    }
}
