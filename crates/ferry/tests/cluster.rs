//! The cluster on loopback: a real etcd, real agents (`ferry agent run`, as separate
//! processes), real QEMU booting the appliance. No namespaces: the agents listen on
//! 127.0.0.1 and the VMs have no NIC; the lab's tests cover networking.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_agent::config::{AccelChoice, AgentConfig, PoolConfig};
use ferry_api::auth::{Role, TokenConfig};
use ferry_api::client::ApiClient;
use ferry_api::types::{CreateVmRequest, ExecRequest};
use ferry_api::ApiError;
use ferry_model::cluster::ImageRecord;
use ferry_model::Bytes;
use ferry_store::etcd_server::{free_port, EtcdServer};
use ferry_store::Store;

const ADMIN: &str = "admin-token-for-tests";
const VIEWER: &str = "viewer-token-for-tests";

struct Agent {
    config_path: PathBuf,
    config: AgentConfig,
    child: Option<Child>,
}

struct Cluster {
    dir: tempfile::TempDir,
    trust: ferry_tls::Trust,
    _etcd: EtcdServer,
    store: Store,
    agents: Vec<Agent>,
}

fn ferry_binary() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

impl Cluster {
    async fn start(hosts: usize) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("ferry-cluster-")
            .tempdir()
            .unwrap();
        // TLS on every channel, as in a real cluster: a CA, etcd's certificate, `root`
        // for this harness, one certificate per host; etcd's authentication on.
        let ca = ferry_tls::ClusterCa::create("cluster-test").unwrap();
        let tls_dir = dir.path().join("tls");
        let loopback: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        let etcd_files = ferry_tls::install_host(
            &ca,
            &tls_dir.join("etcd"),
            &ferry_tls::Subject::host("etcd", &[loopback]),
        )
        .unwrap();
        let root = ca.issue(&ferry_tls::Subject::client("root")).unwrap();
        let root = ferry_store::StoreTls {
            ca_pem: ca.cert_pem().to_string(),
            cert_pem: root.cert_pem,
            key_pem: root.key_pem,
        };
        let etcd = EtcdServer::start_tls(
            &dir.path().join("etcd"),
            "127.0.0.1",
            free_port(),
            free_port(),
            &ferry_store::etcd_server::EtcdTls {
                ca_file: etcd_files.ca.clone(),
                cert_file: etcd_files.cert,
                key_file: etcd_files.key,
                root: root.clone(),
            },
        )
        .await
        .unwrap();
        let store = Store::connect(
            std::slice::from_ref(&etcd.client_url),
            "/ferry/",
            Some(&root),
        )
        .await
        .unwrap();
        let host_names: Vec<String> = (1..=hosts).map(|index| format!("host{index}")).collect();
        store.enable_auth(&host_names).await.unwrap();
        let trust = ferry_tls::Trust::load(&etcd_files.ca).unwrap();
        let appliance =
            ferry_lab::appliance::Appliance::load(&ferry_lab::defaults::appliance_dir())
                .expect("the appliance (the README's test command builds it)");
        let accel = ferry_lab::defaults::detect_accel(&appliance)
            .await
            .unwrap()
            .accel;
        // A copy in this cluster's image library: what the API may delete is its own.
        let library = dir.path().join("shared/images/appliance");
        std::fs::create_dir_all(&library).unwrap();
        let (kernel, initrd) = (library.join("vmlinuz"), library.join("initramfs.img"));
        std::fs::copy(appliance.kernel(), &kernel).unwrap();
        std::fs::copy(appliance.initrd(), &initrd).unwrap();
        let image = ImageRecord::appliance("appliance", kernel, initrd, Bytes(256 * Bytes::MIB));
        store
            .put(&store.keys().image("appliance"), &image, None)
            .await
            .unwrap();
        let shared = dir.path().join("shared");
        let mut agents = Vec::new();
        for index in 1..=hosts {
            let mut config = AgentConfig::parse(&format!("host = \"host{index}\"")).unwrap();
            config.cluster.etcd = vec![etcd.client_url.clone()];
            config.api.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            config.tls.dir = tls_dir.join(format!("host{index}"));
            ferry_tls::install_host(
                &ca,
                &config.tls.dir,
                &ferry_tls::Subject::host(&format!("host{index}"), &[loopback]),
            )
            .unwrap();
            config.api.tokens = vec![
                TokenConfig {
                    sha256: ferry_api::auth::sha256_hex(ADMIN),
                    role: Role::Admin,
                },
                TokenConfig {
                    sha256: ferry_api::auth::sha256_hex(VIEWER),
                    role: Role::Viewer,
                },
            ];
            config.lease.ttl_seconds = 3;
            // Fence before the short lease expires: a quick failover for these tests.
            config.ha.heartbeat_ms = 500;
            config.ha.fence_after_ms = 1800;
            config.capacity.cpus = Some(2);
            config.capacity.memory = Some(Bytes(Bytes::GIB));
            config.paths.run_dir = dir.path().join(format!("host{index}"));
            config.qemu.accel = match accel {
                ferry_qemu::Accel::Kvm => AccelChoice::Kvm,
                ferry_qemu::Accel::Tcg => AccelChoice::Tcg,
            };
            config.qemu.stop_grace_seconds = 20;
            config.pools = vec![PoolConfig {
                name: "shared".into(),
                path: shared.clone(),
                shared: true,
            }];
            let config_path = dir.path().join(format!("host{index}.toml"));
            std::fs::write(&config_path, toml::to_string(&config).unwrap()).unwrap();
            let mut agent = Agent {
                config_path,
                config,
                child: None,
            };
            agent.spawn(dir.path());
            agents.push(agent);
        }
        let cluster = Cluster {
            dir,
            trust,
            _etcd: etcd,
            store,
            agents,
        };
        cluster.wait_hosts(hosts).await;
        cluster
    }

    fn client(&self, agent: usize) -> ApiClient {
        ApiClient::new(
            &self.agents[agent].config.api.advertised_url(),
            ADMIN,
            &self.trust,
        )
        .unwrap()
    }

    /// A raw HTTP client that trusts the cluster CA.
    fn http(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.trust.pem().as_bytes()).unwrap(),
            )
            .build()
            .unwrap()
    }

    fn url(&self, agent: usize) -> String {
        self.agents[agent].config.api.advertised_url()
    }

    async fn wait_hosts(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (hosts, _) = self
                .store
                .list_raw(&self.store.keys().hosts())
                .await
                .unwrap();
            if hosts.len() == count
                && self
                    .client(0)
                    .list_hosts()
                    .await
                    .is_ok_and(|hosts| hosts.iter().any(|host| host.leader))
            {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = (1..=self.agents.len())
                    .map(|index| {
                        std::fs::read_to_string(self.dir.path().join(format!("host{index}.log")))
                            .unwrap_or_default()
                    })
                    .collect();
                panic!(
                    "{} of {count} hosts registered; agent logs:\n{}",
                    hosts.len(),
                    logs.join("\n---\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn agent_index(&self, host: &str) -> usize {
        self.agents
            .iter()
            .position(|agent| agent.config.host.as_str() == host)
            .unwrap()
    }
}

impl Agent {
    fn spawn(&mut self, dir: &Path) {
        use std::os::unix::process::CommandExt;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", self.config.host)))
            .unwrap();
        let child = Command::new(ferry_binary())
            .args(["agent", "run", "--config"])
            .arg(&self.config_path)
            .env("FERRY_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL, as a crash would.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // It may have exited already.
            if let Err(error) = child.kill() {
                eprintln!("it may have exited already: {error}");
            }
            // Not our child or already reaped.
            if let Err(error) = child.wait() {
                eprintln!("not our child or already reaped: {error}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.kill();
            // Kill the QEMUs this test's agents started, by their pidfiles.
            let vms = agent.config.paths.run_dir.join("vms");
            for entry in std::fs::read_dir(vms).into_iter().flatten().flatten() {
                let run = ferry_qemu::RunDir::new(entry.path());
                if let Ok(process) = ferry_qemu::process::QemuProcess::find(&run) {
                    // It may have exited already.
                    if let Err(error) = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(process.pid()),
                        nix::sys::signal::Signal::SIGKILL,
                    ) {
                        eprintln!("it may have exited already: {error}");
                    }
                }
            }
        }
    }
}

fn request(name: &str) -> CreateVmRequest {
    CreateVmRequest {
        name: name.into(),
        image: Some("appliance".into()),
        cpus: 1,
        memory: "256M".into(),
        host: None,
        ..Default::default()
    }
}

async fn wait_state(
    client: &ApiClient,
    name: &str,
    state: &str,
    guest_agent: bool,
) -> ferry_api::types::VmView {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let vm = client.get_vm(name).await.unwrap();
        if vm.state == state && (!guest_agent || vm.guest_agent) {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "VM {name} still {} (want {state}): {vm:?}",
            vm.state
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn boot_id(client: &ApiClient, name: &str) -> String {
    let exec = ExecRequest {
        command: vec!["/bin/cat".into(), "/proc/sys/kernel/random/boot_id".into()],
        timeout_seconds: Some(20),
    };
    let output = client.exec_vm(name, &exec).await.unwrap();
    assert_eq!(output.exit_code, Some(0), "{output:?}");
    output.stdout.trim().to_string()
}

#[tokio::test]
async fn every_route_but_the_openapi_document_needs_a_valid_token() {
    let cluster = Cluster::start(1).await;
    let http = cluster.http();
    let base = cluster.url(0);
    let routes = [
        ("GET", "/api/v1/hosts"),
        ("GET", "/api/v1/hosts/host1"),
        ("GET", "/api/v1/vms"),
        ("POST", "/api/v1/vms"),
        ("GET", "/api/v1/vms/x"),
        ("DELETE", "/api/v1/vms/x"),
        ("POST", "/api/v1/vms/x/start"),
        ("POST", "/api/v1/vms/x/stop"),
        ("POST", "/api/v1/vms/x/reset"),
        ("POST", "/api/v1/vms/x/exec"),
        ("GET", "/api/v1/events"),
        ("GET", "/api/v1/events/stream"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token")] {
            let mut request = http.request(method.parse().unwrap(), format!("{base}{path}"));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            let body: serde_json::Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }
    let document: serde_json::Value = http
        .get(format!("{base}/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        document["openapi"].as_str().unwrap().starts_with("3.1"),
        "{document}"
    );
    assert!(document["paths"]["/api/v1/vms/{name}/exec"]["post"].is_object());

    // A viewer reads but may not create.
    let viewer = ApiClient::new(&base, VIEWER, &cluster.trust).unwrap();
    viewer.list_vms().await.unwrap();
    let error = viewer.create_vm(&request("nope")).await.unwrap_err();
    assert!(matches!(error, ApiError::Forbidden(_)), "{error}");
}

#[tokio::test]
async fn bad_input_gets_a_4xx_naming_the_problem_and_creates_nothing() {
    let cluster = Cluster::start(1).await;
    let client = cluster.client(0);

    let error = client.get_vm("ghost").await.unwrap_err();
    assert_eq!(error, ApiError::NotFound("VM ghost does not exist".into()));
    let error = client.get_host("nohost").await.unwrap_err();
    assert!(
        matches!(error, ApiError::NotFound(ref message) if message.contains("nohost")),
        "{error}"
    );

    let mut huge = request("huge");
    huge.memory = "64G".into();
    let error = client.create_vm(&huge).await.unwrap_err();
    assert!(
        matches!(error, ApiError::BadRequest(ref message) if message.contains("more than any host can give")),
        "{error}"
    );

    let mut unknown_image = request("img");
    unknown_image.image = Some("windows".into());
    let error = client.create_vm(&unknown_image).await.unwrap_err();
    assert_eq!(
        error,
        ApiError::BadRequest("image: image \"windows\" does not exist (ferry image list)".into())
    );

    let error = client.create_vm(&request("Bad_Name")).await.unwrap_err();
    assert!(
        matches!(error, ApiError::BadRequest(ref message) if message.contains("not allowed")),
        "{error}"
    );

    let mut bad_memory = request("mem");
    bad_memory.memory = "lots".into();
    assert!(
        matches!(client.create_vm(&bad_memory).await.unwrap_err(), ApiError::BadRequest(ref message) if message.starts_with("memory:"))
    );

    let response = cluster
        .http()
        .post(format!("{}/api/v1/vms", cluster.url(0)))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body("{\"name\": \"x\", \"cpus\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("request body:"),
        "{body}"
    );

    // A JSON body over the documented 1 MiB limit is 413, not a parse error.
    let oversized = format!(
        "{{\"name\": \"big\", \"comment\": \"{}\"}}",
        "x".repeat(2 << 20)
    );
    let response = cluster
        .http()
        .post(format!("{}/api/v1/vms", cluster.url(0)))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(oversized)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    assert_eq!(
        body["error"]["message"],
        "request body: over the 1024 KiB limit for JSON requests"
    );

    assert!(
        client.list_vms().await.unwrap().is_empty(),
        "nothing was half-created"
    );
    assert!(
        !cluster.dir.path().join("shared/vms").exists(),
        "no disk was made"
    );
}

#[tokio::test]
async fn a_vm_is_created_placed_run_stopped_started_and_deleted_without_leftovers() {
    let cluster = Cluster::start(2).await;
    let client = cluster.client(0);
    client.create_vm(&request("life")).await.unwrap();
    let error = client.create_vm(&request("life")).await.unwrap_err();
    assert_eq!(error, ApiError::Conflict("VM life already exists".into()));

    let vm = wait_state(&client, "life", "running", true).await;
    let host = vm.host.clone().unwrap();
    let pid = vm.pid.unwrap();
    assert!(common::alive(pid));

    // Any host answers: exec through the API of a host that does not run the VM.
    let other = 1 - cluster.agent_index(&host);
    let exec = ExecRequest {
        command: vec!["/bin/echo".into(), "hello".into()],
        timeout_seconds: Some(20),
    };
    let output = cluster.client(other).exec_vm("life", &exec).await.unwrap();
    assert_eq!(
        (output.exit_code, output.stdout.as_str()),
        (Some(0), "hello\n")
    );

    client.stop_vm("life").await.unwrap();
    wait_state(&client, "life", "stopped", false).await;
    assert!(!common::alive(pid), "the QEMU is gone after a stop");
    client.start_vm("life").await.unwrap();
    let restarted = wait_state(&client, "life", "running", true).await;
    assert_eq!(
        restarted.host.as_deref(),
        Some(host.as_str()),
        "a stopped VM stays on its host"
    );

    let disk_dir = cluster.dir.path().join("shared/vms/life");
    assert!(disk_dir.join("data.qcow2").exists());
    client.delete_vm("life").await.unwrap();
    assert!(!common::alive(restarted.pid.unwrap()), "QEMU gone");
    assert!(!disk_dir.exists(), "disk gone");
    assert!(matches!(
        client.get_vm("life").await,
        Err(ApiError::NotFound(_))
    ));
    let kinds: Vec<String> = client
        .list_events(100)
        .await
        .unwrap()
        .into_iter()
        .map(|event| event.kind)
        .collect();
    for expected in ["created", "placed", "started", "stopped", "deleted"] {
        assert!(
            kinds.iter().any(|kind| kind == expected),
            "event {expected} missing from {kinds:?}"
        );
    }
}

#[tokio::test]
async fn an_agent_restart_never_stops_its_vms() {
    let mut cluster = Cluster::start(1).await;
    let client = cluster.client(0);
    client.create_vm(&request("steady")).await.unwrap();
    let before = wait_state(&client, "steady", "running", true).await;
    let boot_before = boot_id(&client, "steady").await;

    cluster.agents[0].kill();
    assert!(
        common::alive(before.pid.unwrap()),
        "QEMU outlives its agent"
    );
    let dir = cluster.dir.path().to_path_buf();
    cluster.agents[0].spawn(&dir);
    cluster.wait_hosts(1).await;

    let after = wait_state(&client, "steady", "running", true).await;
    assert_eq!(after.pid, before.pid, "same QEMU");
    assert_eq!(
        boot_id(&client, "steady").await,
        boot_before,
        "the guest did not reboot"
    );
    let reattached = client
        .list_events(100)
        .await
        .unwrap()
        .into_iter()
        .any(|event| event.kind == "reattached" && event.subject == "vm/steady");
    assert!(reattached, "the new agent reports that it reattached");
    client.delete_vm("steady").await.unwrap();
}

#[tokio::test]
async fn when_the_leader_dies_another_agent_leads_within_seconds() {
    let mut cluster = Cluster::start(3).await;
    let hosts = cluster.client(0).list_hosts().await.unwrap();
    let leader = hosts.iter().find(|host| host.leader).unwrap().name.clone();
    let index = cluster.agent_index(&leader);
    cluster.agents[index].kill();
    let survivor = cluster.client((index + 1) % 3);
    let killed_at = Instant::now();
    let new_leader = loop {
        if let Ok(hosts) = survivor.list_hosts().await {
            if let Some(host) = hosts.iter().find(|host| host.leader && host.name != leader) {
                break host.name.clone();
            }
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(20),
            "no new leader after 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(new_leader, leader);
    // The new leader manages: a new VM gets placed.
    survivor
        .create_vm(&CreateVmRequest {
            memory: "128M".into(),
            ..request("after")
        })
        .await
        .unwrap();
    let vm = survivor.get_vm("after").await.unwrap();
    assert!(vm.host.is_some_and(|host| host != leader));
    survivor.delete_vm("after").await.unwrap();
}

#[tokio::test]
async fn a_vm_that_fits_on_no_host_is_refused_and_leaves_nothing_behind() {
    let cluster = Cluster::start(1).await;
    let client = cluster.client(0);
    // The host offers 1 GiB: the first 768 MiB VM fits, the second does not.
    client
        .create_vm(&CreateVmRequest {
            memory: "768M".into(),
            ..request("first")
        })
        .await
        .unwrap();
    let error = client
        .create_vm(&CreateVmRequest {
            memory: "768M".into(),
            ..request("second")
        })
        .await
        .unwrap_err();
    let ApiError::Conflict(message) = &error else {
        panic!("{error}")
    };
    assert!(
        message.starts_with("VM second cannot be placed: no host has 768 MiB"),
        "{message}"
    );
    let names: Vec<String> = client
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|vm| vm.name)
        .collect();
    assert_eq!(names, ["first"], "the refused VM left no record");
    assert!(
        !cluster.dir.path().join("shared/vms/second").exists(),
        "and no disk"
    );
    let (addresses, _) = cluster
        .store
        .list_raw(&format!("{}ipam/", cluster.store.keys().prefix()))
        .await
        .unwrap();
    assert!(
        addresses.is_empty(),
        "no network here, so no address was taken: {addresses:?}"
    );
    client.delete_vm("first").await.unwrap();
}

// ----- tokens, users, projects -----

fn token_request(role: &str, project: Option<&str>) -> ferry_api::types::CreateTokenRequest {
    ferry_api::types::CreateTokenRequest {
        role: role.into(),
        project: project.map(str::to_string),
        ..Default::default()
    }
}

/// Every route of the OpenAPI document has a rule in the policy table, and every role,
/// of the whole cluster or of a project, gets what the rule says: refused (403), or for
/// a project's caller another project's VM hidden (404), or let through.
#[tokio::test]
async fn every_route_has_a_rule_and_each_role_and_project_gets_what_it_says() {
    use ferry_api::policy::{admit, rule, Access, POLICY};
    use ferry_model::access::{Role, Scope};
    let cluster = Cluster::start(1).await;
    let admin = cluster.client(0);
    admin
        .create_project(&ferry_api::types::CreateProjectRequest {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .create_vm(&CreateVmRequest {
            project: Some("team-a".into()),
            ..request("own-vm")
        })
        .await
        .unwrap();
    admin.create_vm(&request("other-vm")).await.unwrap();

    let http = cluster.http();
    let base = cluster.url(0);
    let document: serde_json::Value = http
        .get(format!("{base}/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut documented = 0;
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let method = method.to_uppercase();
            assert!(
                rule(&method, path).is_some(),
                "{method} {path} is documented but has no rule in ferry_api::policy::POLICY"
            );
            documented += 1;
        }
    }
    // The document does not describe itself.
    assert_eq!(
        documented,
        POLICY.len() - 1,
        "a rule of POLICY names a route the OpenAPI document does not have"
    );

    let mut callers = Vec::new();
    for project in [None, Some("team-a")] {
        for role in [Role::Viewer, Role::Operator, Role::Admin] {
            let created = admin
                .create_token(&token_request(role.as_str(), project))
                .await
                .unwrap();
            let scope = Scope::from_project(project.map(|name| name.parse().unwrap()));
            callers.push((role, scope, created.secret));
        }
    }
    let mut checked = 0;
    for (method, template, access) in POLICY {
        if *access == Access::Public {
            continue;
        }
        for (role, scope, secret) in &callers {
            for target in ["own-vm", "other-vm"] {
                let is_vm_route = template.starts_with("/api/v1/vms/{name}");
                if !is_vm_route && target == "other-vm" {
                    continue;
                }
                let path = template
                    .replacen("{name}", if is_vm_route { target } else { "nope" }, 1)
                    .replace("{id}", "nope")
                    .replace("{disk}", "nope")
                    .replace("{drive}", "nope");
                let allowed = admit(*access, *role, scope);
                let hidden =
                    is_vm_route && target == "other-vm" && matches!(scope, Scope::Project(_));
                let expected = match (&allowed, hidden) {
                    (Err(_), _) => Some(403),
                    (Ok(()), true) => Some(404),
                    (Ok(()), false) => None,
                };
                // A call the rule lets through is sent only when it changes nothing.
                if expected.is_none() && *method != "GET" {
                    continue;
                }
                let response = http
                    .request(method.parse().unwrap(), format!("{base}{path}"))
                    .bearer_auth(secret)
                    .header("content-type", "application/json")
                    .body("{}")
                    .send()
                    .await
                    .unwrap();
                let status = response.status().as_u16();
                let who = format!("{method} {path} as {} of {scope:?}", role.as_str());
                match expected {
                    Some(wanted) => assert_eq!(status, wanted, "{who}"),
                    None => {
                        assert!(![401, 403].contains(&status), "{who}: {status}");
                        if is_vm_route && *template == "/api/v1/vms/{name}" {
                            assert_eq!(status, 200, "{who}");
                        }
                    }
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 150, "only {checked} calls checked");

    // Lists show a project's caller its own objects only.
    let team_viewer = &callers[3].2;
    let team = ApiClient::new(&base, team_viewer, &cluster.trust).unwrap();
    let names: Vec<String> = team
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|vm| vm.name)
        .collect();
    assert_eq!(names, vec!["own-vm".to_string()]);
    assert!(team
        .list_events(500)
        .await
        .unwrap()
        .iter()
        .all(|event| event.subject == "vm/own-vm"));
    let projects: Vec<String> = team
        .list_projects()
        .await
        .unwrap()
        .into_iter()
        .map(|project| project.name)
        .collect();
    assert_eq!(projects, vec!["team-a".to_string()]);
}

#[tokio::test]
async fn a_quota_refuses_the_vm_that_would_pass_it_and_tokens_users_and_audit_behave() {
    let cluster = Cluster::start(1).await;
    let admin = cluster.client(0);
    admin
        .create_project(&ferry_api::types::CreateProjectRequest {
            name: "team-q".into(),
            max_vms: Some(1),
            max_vcpus: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    let team_admin = admin
        .create_token(&token_request("admin", Some("team-q")))
        .await
        .unwrap();
    let team = admin.with_token(&team_admin.secret);
    let first = team.create_vm(&request("q1")).await.unwrap();
    assert_eq!(first.project, "team-q");
    let refused = team.create_vm(&request("q2")).await.unwrap_err();
    assert!(
        matches!(refused, ApiError::Forbidden(ref message)
            if message == "project team-q: quota max-vms is 1, 1 in use, this needs 1 more"),
        "{refused:?}"
    );
    assert!(team.get_vm("q2").await.is_err(), "nothing was left behind");
    let elsewhere = team
        .create_vm(&CreateVmRequest {
            project: Some("default".into()),
            ..request("q3")
        })
        .await
        .unwrap_err();
    assert!(matches!(elsewhere, ApiError::Forbidden(_)), "{elsewhere:?}");
    let shown = admin.get_project("team-q").await.unwrap();
    assert_eq!((shown.vms, shown.vcpus), (1, 1));
    let busy = admin.delete_project("team-q").await.unwrap_err();
    assert!(busy.to_string().contains("still holds VMs: q1"), "{busy}");

    // etcd keeps a hash, never the secret; a revoked or expired token is refused.
    let viewer = admin
        .create_token(&ferry_api::types::CreateTokenRequest {
            expires: Some("2s".into()),
            comment: Some("short-lived".into()),
            ..token_request("viewer", None)
        })
        .await
        .unwrap();
    let (stored, _) = cluster
        .store
        .list_raw(&cluster.store.keys().tokens())
        .await
        .unwrap();
    let text: String = stored
        .iter()
        .map(|(_, value, _)| String::from_utf8_lossy(value).into_owned())
        .collect();
    assert!(!text.contains(&viewer.secret) && !text.contains(&team_admin.secret));
    let short = admin.with_token(&viewer.secret);
    short.list_vms().await.unwrap();
    let listed = admin.list_tokens().await.unwrap();
    assert!(listed.iter().any(|token| token.comment == "short-lived"));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(matches!(
        short.list_vms().await.unwrap_err(),
        ApiError::Unauthorized
    ));
    admin.revoke_token(&team_admin.token.id).await.unwrap();
    assert!(matches!(
        team.list_vms().await.unwrap_err(),
        ApiError::Unauthorized
    ));

    // A user logs in with a password; a wrong one and an unknown user look alike.
    admin
        .create_user(&ferry_api::types::CreateUserRequest {
            name: "ada".into(),
            password: "correct horse battery".into(),
            role: "operator".into(),
            project: Some("team-q".into()),
        })
        .await
        .unwrap();
    let session = admin.login("ada", "correct horse battery").await.unwrap();
    assert_eq!(session.token.project.as_deref(), Some("team-q"));
    let ada = admin.with_token(&session.secret);
    let seen: Vec<String> = ada
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|vm| vm.name)
        .collect();
    assert_eq!(seen, vec!["q1".to_string()]);
    let wrong = admin.login("ada", "wrong horse battery").await.unwrap_err();
    let unknown = admin
        .login("bob", "correct horse battery")
        .await
        .unwrap_err();
    assert_eq!(wrong.to_string(), unknown.to_string());
    admin.delete_user("ada").await.unwrap();
    assert!(matches!(
        ada.list_vms().await.unwrap_err(),
        ApiError::Unauthorized
    ));

    // Each change is in the audit trail with the token's id, never its secret.
    let events = admin.list_events(1000).await.unwrap();
    let audit: Vec<&str> = events
        .iter()
        .filter(|event| event.kind == "api-call")
        .map(|event| event.message.as_str())
        .collect();
    let created = format!(
        "token {} (admin, project team-q): POST /api/v1/vms → 201",
        team_admin.token.id
    );
    assert!(audit.iter().any(|line| *line == created), "{audit:#?}");
    assert!(audit
        .iter()
        .any(|line| line.contains("POST /api/v1/vms → 403")));
    assert!(audit.iter().all(|line| !line.contains(&team_admin.secret)));
}

/// Where `scripts/setup-host` installs schemathesis.
const SCHEMATHESIS: &str = "/opt/ferry-tools/schemathesis/bin/st";

/// schemathesis (PyPI) fuzzes every documented route with a token of each role: no
/// answer is a 5xx, and every documented answer matches its schema.
#[tokio::test]
async fn the_api_holds_under_schemathesis_with_a_token_of_each_role() {
    assert!(
        Path::new(SCHEMATHESIS).exists(),
        "{SCHEMATHESIS} is missing: run scripts/setup-host"
    );
    let cluster = Cluster::start(1).await;
    let admin = cluster.client(0);
    admin
        .create_project(&ferry_api::types::CreateProjectRequest {
            name: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ca = cluster.dir.path().join("tls/etcd/ca.pem");
    let mut requests = 0u64;
    // A project's viewer and operator, and an admin of the whole cluster (who reaches
    // the cluster's own routes too).
    for (role, project) in [
        ("viewer", Some("team-a")),
        ("operator", Some("team-a")),
        ("admin", None),
    ] {
        let token = admin
            .create_token(&token_request(role, project))
            .await
            .unwrap()
            .secret;
        let output = Command::new(SCHEMATHESIS)
            .arg("run")
            .arg(format!("{}/api/v1/openapi.json", cluster.url(0)))
            .args(["--checks", "not_a_server_error,response_schema_conformance"])
            .args(["--phases", "examples,coverage,fuzzing"])
            .args(["--max-examples", "12", "--seed", "16"])
            // A stream never ends.
            .args(["--exclude-path", "/api/v1/events/stream"])
            .args(["--request-timeout", "20"])
            .arg("--tls-verify")
            .arg(&ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "schemathesis as {role}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // "Test cases:" then "  N generated, N passed"
        let count = stdout
            .lines()
            .skip_while(|line| line.trim() != "Test cases:")
            .nth(1)
            .and_then(|line| line.split_whitespace().next())
            .and_then(|number| number.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no test case count in:\n{stdout}"));
        eprintln!("schemathesis as {role} ({project:?}): {count} requests");
        requests += count;
    }
    eprintln!("schemathesis: {requests} requests, no 5xx, every documented answer in its schema");
    assert!(requests > 300, "only {requests} requests");
}
