//! The lab against the real kernel (needs root): switches, host namespaces and their
//! links, etcd on the management switch, and `down` removing all of it and nothing
//! else. Every test builds its own lab (own name, address block, ports, directories),
//! sends traffic only to that lab's addresses, and removes it even when it fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ferry_lab::appliance::Appliance;
use ferry_lab::defaults;
use ferry_lab::lab::{Fault, Lab, LabError, LabNet, LabSpec, CLUSTER_PREFIX};
use ferry_lab::netns::{block_on_in, run_in};
use ferry_store::Store;

/// Removes the lab when the test ends, however it ends.
struct LabGuard {
    state_dir: PathBuf,
}

impl LabGuard {
    fn new(spec: &LabSpec) -> LabGuard {
        LabGuard {
            state_dir: spec.state_dir.clone(),
        }
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Ok(lab) = Lab::load(&self.state_dir) {
            if let Err(error) = lab.down() {
                eprintln!("cleanup: {error}");
            }
        }
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Every namespace, link, route and process of this machine that mentions the lab's
/// name or its address block: empty before `up` and after `down`.
fn traces(spec: &LabSpec) -> Vec<String> {
    let block = format!("10.{}.", spec.subnet_base);
    let state_dir = spec.state_dir.display().to_string();
    let mut lines = Vec::new();
    for output in [
        run("ip", &["-o", "link", "show"]),
        run("ip", &["-o", "addr", "show"]),
        run("ip", &["netns", "list"]),
        run("ip", &["route", "show", "table", "all"]),
        run("ps", &["-eo", "pid,stat,args"]),
    ] {
        lines.extend(
            output
                .lines()
                .filter(|line| {
                    line.contains(&spec.name) || line.contains(&block) || line.contains(&state_dir)
                })
                .map(str::to_string),
        );
    }
    lines
}

fn connect(address: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&SocketAddr::from((address, port)), Duration::from_secs(3))
}

/// A listener bound inside a host's namespace (the socket stays there after the thread).
fn listen_in(namespace: &str, address: Ipv4Addr) -> TcpListener {
    run_in(namespace, || TcpListener::bind((address, 0)))
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn hosts_and_the_workstation_reach_each_other_over_the_lab_switches_and_down_leaves_nothing()
{
    let spec = LabSpec::for_test(0);
    assert_eq!(
        traces(&spec),
        Vec::<String>::new(),
        "leftovers before the test"
    );
    let _guard = LabGuard::new(&spec);
    let mut lab = Lab::create_network(&spec).unwrap();
    lab.start_etcd().await.unwrap();
    let etcd_pid = lab.state().etcd.as_ref().unwrap().pid;

    let seen = traces(&spec).join("\n");
    for object in spec
        .switches()
        .into_iter()
        .chain([spec.namespace(1), spec.namespace(2), spec.subnet()])
        .chain(LabNet::ALL.map(|net| spec.veth_name(2, net)))
    {
        assert!(seen.contains(&object), "{object} missing from:\n{seen}");
    }

    // host1 talks to etcd over the management switch, as its agent will.
    let url = spec.etcd_url();
    let tls = ferry_lab::lab::host_store_tls(&spec, 1).unwrap();
    let answer = block_on_in(&spec.namespace(1), move || async move {
        let store = Store::connect(&[url], CLUSTER_PREFIX, Some(&tls)).await?;
        store.put("/ferry/probe", &"from host1", None).await?;
        store.get::<String>("/ferry/probe").await
    })
    .unwrap()
    .unwrap();
    assert_eq!(answer.unwrap().value, "from host1");

    // The workstation (root namespace) reaches host2 on the business switch, where VMs live.
    let business = spec.host_address(2, LabNet::Business);
    let listener = listen_in(&spec.namespace(2), business);
    let port = listener.local_addr().unwrap().port();
    connect(business, port).expect("root → host2 over business");
    listener.accept().unwrap();

    // host1 reaches host2 over the migration switch.
    let migration = spec.host_address(2, LabNet::Migration);
    let listener = listen_in(&spec.namespace(2), migration);
    let port = listener.local_addr().unwrap().port();
    run_in(&spec.namespace(1), || connect(migration, port))
        .unwrap()
        .expect("host1 → host2 over migration");
    listener.accept().unwrap();

    // Anything else in the lab's block goes nowhere: the kernel refuses to route it.
    let host1 = spec.host_address(1, LabNet::Management).to_string();
    let route = run("ip", &["route", "get", &host1]);
    assert!(
        route.contains(&spec.switch_name(LabNet::Management)),
        "{route}"
    );
    let stray = Ipv4Addr::new(10, spec.subnet_base, 9, 9).to_string();
    let refused = Command::new("ip")
        .args(["route", "get", &stray])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{stray} is routed somewhere");

    lab.down().unwrap();
    assert_eq!(traces(&spec), Vec::<String>::new(), "left behind by down");
    assert!(!PathBuf::from(format!("/proc/{etcd_pid}")).exists());
    assert!(!spec.state_dir.exists());
    assert!(!spec.run_dir.exists());
}

#[tokio::test]
async fn a_lab_is_never_built_twice_nor_on_a_taken_address_block() {
    let spec = LabSpec::for_test(1);
    let _guard = LabGuard::new(&spec);
    let lab = Lab::create_network(&spec).unwrap();

    let again = Lab::create_network(&spec).unwrap_err();
    assert!(matches!(again, LabError::AlreadyUp { .. }), "{again}");

    let squatter = LabSpec {
        subnet_base: spec.subnet_base,
        ..LabSpec::for_test(2)
    };
    let _squatter_guard = LabGuard::new(&squatter);
    let refused = Lab::create_network(&squatter).unwrap_err().to_string();
    assert!(refused.contains("address block"), "{refused}");
    assert!(
        !squatter.state_dir.exists(),
        "the refused lab left its state"
    );
    // The first lab is untouched by the second one's failure.
    let seen = traces(&spec).join("\n");
    for object in spec.switches().into_iter().chain([spec.namespace(2)]) {
        assert!(seen.contains(&object), "{object} missing from:\n{seen}");
    }
    assert_eq!(
        traces(&squatter)
            .iter()
            .filter(|line| line.contains(&squatter.name))
            .count(),
        0
    );

    lab.down().unwrap();
    assert_eq!(traces(&spec), Vec::<String>::new());
}

#[tokio::test]
async fn down_removes_a_lab_whose_parts_are_already_gone() {
    let spec = LabSpec::for_test(3);
    let _guard = LabGuard::new(&spec);
    let mut lab = Lab::create_network(&spec).unwrap();
    lab.start_etcd().await.unwrap();
    let etcd = lab.state().etcd.clone().unwrap();

    // Someone (or a crash) removed pieces behind the lab's back.
    run("ip", &["netns", "delete", &spec.namespace(1)]);
    run("ip", &["link", "del", &spec.switch_name(LabNet::Business)]);
    run("kill", &["-9", &etcd.pid.to_string()]);

    let lab = Lab::load(&spec.state_dir).unwrap();
    lab.down().unwrap();
    assert_eq!(traces(&spec), Vec::<String>::new());
    assert!(!spec.state_dir.exists());
}

fn appliance() -> Appliance {
    Appliance::load(&defaults::appliance_dir()).unwrap_or_else(|error| {
        panic!("{error}. The README's test command builds it; or set FERRY_APPLIANCE_DIR")
    })
}

#[tokio::test]
async fn an_up_whose_agents_fail_is_removed_and_quotes_their_log() {
    let scratch = tempfile::tempdir().unwrap();
    let fake_ferry = scratch.path().join("ferry");
    // Only the agent refuses; the lab's watchdogs are the real ones.
    std::fs::write(
        &fake_ferry,
        format!(
            "#!/bin/sh\ncase \"$1\" in\nagent) echo \"agent refuses on purpose: $*\" >&2; exit 3;;\n*) exec {} \"$@\";;\nesac\n",
            ferry_binary().display()
        ),
    )
    .unwrap();
    Command::new("chmod")
        .args(["+x"])
        .arg(&fake_ferry)
        .status()
        .unwrap();
    let spec = LabSpec {
        ferry_binary: Some(fake_ferry),
        ..LabSpec::for_test(4)
    };
    let _guard = LabGuard::new(&spec);

    let error = Lab::up(&spec, &appliance()).await.unwrap_err().to_string();
    assert!(
        error.contains("agent refuses on purpose: agent run --config"),
        "{error}"
    );
    assert!(
        error.contains(&format!("lab {}: agent host", spec.name)),
        "{error}"
    );
    assert_eq!(
        traces(&spec),
        Vec::<String>::new(),
        "left behind by a failed up"
    );
    assert!(!spec.state_dir.exists());
    assert!(!spec.client_config.exists());
}

/// The `ferry` binary next to this test's directory (`cargo build --bins` makes it).
fn ferry_binary() -> PathBuf {
    let binary = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("ferry");
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build --bins` first (scripts/test does)",
        binary.display()
    );
    binary
}

#[tokio::test]
async fn a_lab_comes_up_with_every_agent_registered_and_recovers_from_faults() {
    let spec = LabSpec {
        ferry_binary: Some(ferry_binary()),
        ..LabSpec::for_test(5)
    };
    let _guard = LabGuard::new(&spec);
    let mut lab = Lab::up(&spec, &appliance()).await.unwrap();

    let status = lab.status().await;
    assert!(status.etcd.running);
    for host in &status.hosts {
        assert!(host.agent_running, "{host:?}");
        assert_eq!(host.registered, Some(true), "{host:?}");
        assert!(host.links_down.is_empty(), "{host:?}");
    }
    let client = ferry_api::client_config::ClientConfig::load(&spec.client_config).unwrap();
    assert_eq!(client.api, spec.api_url(1));
    assert_eq!(Some(client.token.as_str()), lab.token());
    let store = lab.store().await.unwrap();
    let image: ferry_model::cluster::ImageRecord = store
        .get(&store.keys().image("appliance"))
        .await
        .unwrap()
        .unwrap()
        .value;
    let ferry_model::cluster::ImageContent::Appliance { kernel, .. } = &image.content else {
        panic!("the appliance image is {:?}", image.content);
    };
    assert!(kernel.starts_with(spec.shared_pool()) && kernel.is_file());

    lab.fault(2, Fault::AgentKill).unwrap();
    lab.fault(2, Fault::LinkDown(LabNet::Migration)).unwrap();
    let host2 = &lab.status().await.hosts[1];
    assert!(!host2.agent_running);
    assert_eq!(host2.links_down, vec![LabNet::Migration]);

    lab.heal(2).unwrap();
    let host2 = &lab.status().await.hosts[1];
    assert!(
        host2.agent_running && host2.links_down.is_empty(),
        "{host2:?}"
    );
    lab.wait_registered(Duration::from_secs(30)).await.unwrap();

    lab.down().unwrap();
    assert_eq!(traces(&spec), Vec::<String>::new(), "left behind by down");
    assert!(!spec.client_config.exists());
}
