//! ferry-store against a real etcd, one private etcd per test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly by design

use std::time::Duration;

use ferry_store::etcd_server::{free_port, EtcdServer};
use ferry_store::{Lease, LeaseState, PrefixWatch, Store, StoreError, WatchEvent};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Record {
    version: u32,
    name: String,
}

fn record(name: &str) -> Record {
    Record {
        version: 1,
        name: name.into(),
    }
}

struct Fixture {
    etcd: EtcdServer,
    store: Store,
    _dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

async fn etcd() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (client_port, peer_port) = (free_port(), free_port());
    let etcd = EtcdServer::start(dir.path(), "127.0.0.1", client_port, peer_port)
        .await
        .unwrap();
    let store = Store::connect(std::slice::from_ref(&etcd.client_url), "/ferry-test/", None)
        .await
        .unwrap();
    Fixture {
        etcd,
        store,
        _dir: dir,
        client_port,
        peer_port,
    }
}

async fn next_event(watch: &mut PrefixWatch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("a watch event in time")
        .expect("watch open")
}

#[tokio::test]
async fn records_round_trip_and_a_newer_record_version_is_refused() {
    let fixture = etcd().await;
    let store = &fixture.store;
    store
        .put("/ferry-test/a", &record("a"), None)
        .await
        .unwrap();
    let read = store.get::<Record>("/ferry-test/a").await.unwrap().unwrap();
    assert_eq!(read.value, record("a"));
    assert!(store
        .get::<Record>("/ferry-test/missing")
        .await
        .unwrap()
        .is_none());

    store
        .put(
            "/ferry-test/future",
            &Record {
                version: 99,
                name: "x".into(),
            },
            None,
        )
        .await
        .unwrap();
    let error = store.get::<Record>("/ferry-test/future").await.unwrap_err();
    assert!(
        matches!(error, StoreError::NewerRecord { found: 99, .. }),
        "{error}"
    );

    store
        .put("/ferry-test/garbage", &"not a record", None)
        .await
        .unwrap();
    let error = store
        .get::<Record>("/ferry-test/garbage")
        .await
        .unwrap_err();
    assert!(error.to_string().contains("/ferry-test/garbage"), "{error}");
}

#[tokio::test]
async fn create_refuses_an_existing_key_and_cas_refuses_a_stale_revision() {
    let fixture = etcd().await;
    let store = &fixture.store;
    store
        .create("/ferry-test/vm", &record("one"), "VM vm")
        .await
        .unwrap();
    let error = store
        .create("/ferry-test/vm", &record("two"), "VM vm")
        .await
        .unwrap_err();
    assert_eq!(error.to_string(), "VM vm already exists");

    let current = store
        .get::<Record>("/ferry-test/vm")
        .await
        .unwrap()
        .unwrap();
    store
        .compare_and_swap("/ferry-test/vm", current.mod_revision, &record("moved"))
        .await
        .unwrap();
    // A second writer that read the same revision loses.
    let error = store
        .compare_and_swap("/ferry-test/vm", current.mod_revision, &record("stale"))
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Conflict { .. }));
    assert_eq!(
        store
            .get::<Record>("/ferry-test/vm")
            .await
            .unwrap()
            .unwrap()
            .value,
        record("moved")
    );
}

#[tokio::test]
async fn keys_bound_to_a_revoked_lease_disappear() {
    let fixture = etcd().await;
    let store = &fixture.store;
    let lease = Lease::grant(store, Duration::from_secs(3)).await.unwrap();
    store
        .put("/ferry-test/hosts/h1", &record("h1"), Some(lease.id()))
        .await
        .unwrap();
    // Kept alive past its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(lease.is_held());
    assert!(store
        .get::<Record>("/ferry-test/hosts/h1")
        .await
        .unwrap()
        .is_some());
    lease.revoke().await.unwrap();
    assert!(store
        .get::<Record>("/ferry-test/hosts/h1")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn losing_etcd_for_a_whole_ttl_reports_the_lease_lost() {
    let mut fixture = etcd().await;
    let lease = Lease::grant(&fixture.store, Duration::from_secs(2))
        .await
        .unwrap();
    let mut state = lease.state();
    fixture.etcd.kill();
    let lost = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|state| matches!(state, LeaseState::Lost { .. })),
    )
    .await
    .expect("loss reported within the TTL plus slack");
    assert!(lost.is_ok());
}

#[tokio::test]
async fn a_watch_delivers_changes_and_resumes_after_etcd_restarts() {
    let mut fixture = etcd().await;
    let store = fixture.store.clone();
    store
        .put("/ferry-test/w/before", &record("before"), None)
        .await
        .unwrap();
    let mut watch = PrefixWatch::start(&store, "/ferry-test/w/").await.unwrap();
    match next_event(&mut watch).await {
        WatchEvent::Resync { records } => assert_eq!(records.len(), 1),
        other => panic!("expected the snapshot first, got {other:?}"),
    }
    store
        .put("/ferry-test/w/one", &record("one"), None)
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Put { key, .. } if key == "/ferry-test/w/one")
    );

    // etcd goes away and comes back on the same data: the watch picks up where it was.
    fixture.etcd.kill();
    let data_dir = fixture.etcd.data_dir.clone();
    fixture.etcd = EtcdServer::start(
        &data_dir,
        "127.0.0.1",
        fixture.client_port,
        fixture.peer_port,
    )
    .await
    .unwrap();
    store
        .put("/ferry-test/w/two", &record("two"), None)
        .await
        .unwrap();
    store.delete("/ferry-test/w/one").await.unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Put { key, .. } if key == "/ferry-test/w/two")
    );
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Delete { key, .. } if key == "/ferry-test/w/one")
    );
}

#[tokio::test]
async fn a_watch_from_compacted_history_starts_over_from_a_snapshot() {
    let fixture = etcd().await;
    let store = &fixture.store;
    let first = store
        .put("/ferry-test/c/a", &record("a"), None)
        .await
        .unwrap();
    store
        .put("/ferry-test/c/b", &record("b"), None)
        .await
        .unwrap();
    let latest = store
        .put("/ferry-test/c/a", &record("a2"), None)
        .await
        .unwrap();
    store.client().compact(latest, None).await.unwrap();

    let mut watch = PrefixWatch::resume(store, "/ferry-test/c/", first);
    match next_event(&mut watch).await {
        WatchEvent::Resync { records } => {
            let keys: Vec<&str> = records.iter().map(|(key, _, _)| key.as_str()).collect();
            assert_eq!(keys, ["/ferry-test/c/a", "/ferry-test/c/b"]);
        }
        other => panic!("expected a resync after compaction, got {other:?}"),
    }
    store
        .put("/ferry-test/c/c", &record("c"), None)
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Put { key, .. } if key == "/ferry-test/c/c")
    );
}

#[tokio::test]
async fn only_one_candidate_leads_and_the_next_takes_over_when_its_lease_ends() {
    let fixture = etcd().await;
    let store = fixture.store.clone();
    let first_lease = Lease::grant(&store, Duration::from_secs(3)).await.unwrap();
    store.campaign("host1", first_lease.id()).await.unwrap();
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("host1"));

    let second_lease = Lease::grant(&store, Duration::from_secs(3)).await.unwrap();
    let contender = {
        let store = store.clone();
        let lease = second_lease.id();
        tokio::spawn(async move { store.campaign("host2", lease).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !contender.is_finished(),
        "a second leader while the first holds its lease"
    );

    first_lease.revoke().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), contender)
        .await
        .expect("takes over")
        .unwrap()
        .unwrap();
    assert_eq!(store.leader().await.unwrap().as_deref(), Some("host2"));
}

#[tokio::test]
async fn one_bad_value_hides_nothing_else_and_large_prefixes_are_read_in_pages() {
    let fixture = etcd().await;
    let store = &fixture.store;
    let mut client = store.client();
    for index in 0..600 {
        store
            .put(&format!("/ferry-test/many/{index:04}"), &record("x"), None)
            .await
            .unwrap();
    }
    client
        .put("/ferry-test/many/0300", "{damaged", None)
        .await
        .unwrap();
    client
        .put(
            "/ferry-test/many/0301",
            r#"{"version":99,"name":"future"}"#,
            None,
        )
        .await
        .unwrap();
    let listing = store
        .list_each::<Record>("/ferry-test/many/")
        .await
        .unwrap();
    assert_eq!(listing.entries.len(), 600, "every key, across pages of 256");
    assert_eq!(listing.present().count(), 598);
    let unreadable: Vec<&str> = listing.unreadable().map(|bad| bad.key.as_str()).collect();
    assert_eq!(
        unreadable,
        ["/ferry-test/many/0300", "/ferry-test/many/0301"]
    );
    assert!(matches!(
        store.read::<Record>("/ferry-test/many/0301").await.unwrap(),
        ferry_store::Read::Unreadable(bad) if bad.reason.contains("newer")
    ));
    assert!(matches!(
        store.read::<Record>("/ferry-test/many/none").await.unwrap(),
        ferry_store::Read::Absent
    ));
}

#[tokio::test]
async fn a_guarded_change_applies_whole_or_not_at_all() {
    use ferry_store::{Change, Guard};
    let fixture = etcd().await;
    let store = &fixture.store;
    let lock = "/ferry-test/vms/web/op".to_string();
    // Two ops of one VM, each creating its record and taking the VM's lock: one wins.
    let take = |op: &str| {
        Change::default()
            .guard(Guard::Absent { key: lock.clone() })
            .put(
                format!("/ferry-test/ops/{op}"),
                ferry_store::encode(&record(op)),
            )
            .put(lock.clone(), ferry_store::encode(&record(op)))
    };
    let (take_a, take_b) = (take("a"), take("b"));
    let (first, second) = tokio::join!(store.apply(&take_a), store.apply(&take_b));
    assert!(first.is_ok() != second.is_ok(), "{first:?} {second:?}");
    let ops = store.list_each::<Record>("/ferry-test/ops/").await.unwrap();
    assert_eq!(ops.entries.len(), 1, "the loser wrote nothing");
    // A restart that needs the failed host absent and the leader present.
    let host = "/ferry-test/hosts/host2".to_string();
    let leader = "/ferry-test/leader/7".to_string();
    let restart = Change::default()
        .guard(Guard::Absent { key: host.clone() })
        .guard(Guard::Exists {
            key: leader.clone(),
        })
        .put("/ferry-test/vms/web/placement", b"{}".to_vec());
    assert!(
        matches!(
            store.apply(&restart).await,
            Err(StoreError::Conflict { .. })
        ),
        "no leader key: not applied"
    );
    store.put(&leader, &record("leader"), None).await.unwrap();
    store.put(&host, &record("back"), None).await.unwrap();
    assert!(
        matches!(
            store.apply(&restart).await,
            Err(StoreError::Conflict { .. })
        ),
        "the failed host came back: not applied"
    );
    store.delete(&host).await.unwrap();
    store.apply(&restart).await.unwrap();
    // Unchanged: a stale revision loses.
    let written = store
        .put("/ferry-test/x", &record("1"), None)
        .await
        .unwrap();
    store
        .put("/ferry-test/x", &record("2"), None)
        .await
        .unwrap();
    let stale = Change::default()
        .guard(Guard::Unchanged {
            key: "/ferry-test/x".into(),
            revision: written,
        })
        .delete("/ferry-test/x");
    assert!(store.apply(&stale).await.is_err());
}

/// A TLS etcd of a fresh CA: its server certificate for 127.0.0.1, and `root`.
struct TlsFixture {
    etcd: EtcdServer,
    ca: ferry_tls::ClusterCa,
    dir: tempfile::TempDir,
}

fn client_tls(ca: &ferry_tls::ClusterCa, name: &str) -> ferry_store::StoreTls {
    let issued = ca.issue(&ferry_tls::Subject::client(name)).unwrap();
    ferry_store::StoreTls {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
    }
}

async fn tls_etcd() -> TlsFixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = ferry_tls::ClusterCa::create("store-test").unwrap();
    let files = ferry_tls::install_host(
        &ca,
        &dir.path().join("tls"),
        &ferry_tls::Subject::host("etcd", &["127.0.0.1".parse().unwrap()]),
    )
    .unwrap();
    let tls = ferry_store::etcd_server::EtcdTls {
        ca_file: files.ca,
        cert_file: files.cert,
        key_file: files.key,
        root: client_tls(&ca, "root"),
    };
    let etcd = EtcdServer::start_tls(
        &dir.path().join("etcd"),
        "127.0.0.1",
        free_port(),
        free_port(),
        &tls,
    )
    .await
    .unwrap();
    TlsFixture { etcd, ca, dir }
}

#[tokio::test]
async fn over_tls_a_host_user_reaches_its_prefix_only_and_strangers_are_refused() {
    let fixture = tls_etcd().await;
    let url = vec![fixture.etcd.client_url.clone()];
    assert!(url[0].starts_with("https://"), "{url:?}");
    let root = Store::connect(&url, "/ferry-test/", fixture.etcd.root.as_ref())
        .await
        .unwrap();
    root.enable_auth(&["host1".to_string()]).await.unwrap();

    let host1 = Store::connect(
        &url,
        "/ferry-test/",
        Some(&client_tls(&fixture.ca, "host1")),
    )
    .await
    .unwrap();
    host1
        .put("/ferry-test/hosts/host1", &record("one"), None)
        .await
        .unwrap();
    let outside = host1.put("/elsewhere/key", &record("x"), None).await;
    let error = outside.unwrap_err().to_string();
    assert!(error.contains("permission denied"), "{error}");

    // A certificate of the CA whose name is no etcd user.
    let stranger = Store::connect(
        &url,
        "/ferry-test/",
        Some(&client_tls(&fixture.ca, "host9")),
    )
    .await;
    let refused = match stranger {
        Err(error) => error.to_string(),
        Ok(store) => store
            .put("/ferry-test/hosts/host9", &record("nine"), None)
            .await
            .unwrap_err()
            .to_string(),
    };
    assert!(!refused.is_empty());

    // A certificate of another CA, and no TLS at all.
    let other = ferry_tls::ClusterCa::create("other").unwrap();
    let foreign = Store::connect(&url, "/ferry-test/", Some(&client_tls(&other, "host1"))).await;
    let foreign_failed = match foreign {
        Err(_) => true,
        Ok(store) => store
            .put("/ferry-test/x", &record("x"), None)
            .await
            .is_err(),
    };
    assert!(foreign_failed, "a certificate of another CA was accepted");
    let plain_url = vec![url[0].replacen("https://", "http://", 1)];
    let plain = Store::connect(&plain_url, "/ferry-test/", None).await;
    let plain_failed = match plain {
        Err(_) => true,
        Ok(store) => store
            .put("/ferry-test/x", &record("x"), None)
            .await
            .is_err(),
    };
    assert!(plain_failed, "plain HTTP was accepted");
    drop(fixture.dir);
}
