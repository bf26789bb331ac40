//! The workload server over real HTTP on loopback, with its data in a temporary directory.
//!
//! These are the promises a client outside the VM relies on to detect loss: an
//! acknowledged write is listed by `/kv?since=N` with its sequence number and survives a
//! restart, a file comes back byte for byte, and no key or file name reaches outside the
//! data directory.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Weak};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{router, AppState};

/// One server on 127.0.0.1 with an ephemeral port, serving the store in `data`.
struct TestServer {
    addr: SocketAddr,
    client: reqwest::Client,
    state: Weak<AppState>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(data: &Path) -> TestServer {
        let state = Arc::new(AppState::open(data).expect("open the store"));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("the bound address");
        let (stop, stopped) = oneshot::channel::<()>();
        let weak = Arc::downgrade(&state);
        let task = tokio::spawn(async move {
            axum::serve(listener, router(state))
                .with_graceful_shutdown(async {
                    // Dropped sender or a stop request: either way, stop.
                    stopped.await.ok();
                })
                .await
                .expect("serve");
        });
        TestServer {
            addr,
            // Never a proxy from the environment: the server is on loopback.
            client: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("HTTP client"),
            state: weak,
            stop,
            task,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .body(body)
            .send()
            .await
            .expect("PUT")
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET")
    }

    /// Writes `key = value` and returns the write's sequence number.
    async fn write(&self, key: &str, value: &str) -> i64 {
        let response = self.put(&format!("/kv/{key}"), value.to_string()).await;
        assert_eq!(response.status(), StatusCode::OK, "PUT /kv/{key}");
        let body: Value = response.json().await.expect("a JSON answer");
        body["seq"].as_i64().expect("the write's seq")
    }

    async fn writes_since(&self, since: i64) -> Value {
        let response = self.get(&format!("/kv?since={since}")).await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("a JSON list")
    }

    async fn health(&self) -> Value {
        let response = self.get("/health").await;
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.expect("a JSON health report")
    }

    /// Shuts down gracefully and checks that nothing holds the store open any more.
    async fn stop(self) {
        drop(self.client);
        if self.stop.send(()).is_err() {
            eprintln!("nobody listens any more");
        }
        self.task.await.expect("the server task");
        assert!(
            self.state.upgrade().is_none(),
            "the store is still open after the server stopped"
        );
    }
}

/// Sends `method path` exactly as written. reqwest, like any URL library, would resolve a
/// `..` segment before sending it, so the server would never see it.
async fn raw_request(addr: SocketAddr, method: &str, path: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nvalue"
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .expect("read the response");
    let response = String::from_utf8(response).expect("a text response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status code");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The reason a client error gives, from `{"error": ...}`.
async fn reason(response: reqwest::Response) -> String {
    let body: Value = response.json().await.expect("a JSON error body");
    body["error"]
        .as_str()
        .expect("the error body names a reason")
        .to_string()
}

#[tokio::test]
async fn a_put_value_is_read_back_by_get() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let seq = server.write("colour", "blue").await;
    let response = server.get("/kv/colour").await;

    assert_eq!(seq, 1);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "blue");
    server.stop().await;
}

#[tokio::test]
async fn writes_since_zero_lists_every_write_in_order_and_since_n_only_later_ones() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;
    for (key, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
        server.write(key, value).await;
    }

    let all = server.writes_since(0).await;
    let later = server.writes_since(1).await;
    let none = server.writes_since(3).await;

    assert_eq!(
        all,
        json!([
            {"seq": 1, "key": "a", "value": "1"},
            {"seq": 2, "key": "b", "value": "2"},
            {"seq": 3, "key": "c", "value": "3"},
        ])
    );
    assert_eq!(
        later,
        json!([
            {"seq": 2, "key": "b", "value": "2"},
            {"seq": 3, "key": "c", "value": "3"},
        ])
    );
    assert_eq!(none, json!([]));
    server.stop().await;
}

#[tokio::test]
async fn overwriting_a_key_appends_a_new_write_and_get_returns_the_latest_value() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let first = server.write("counter", "1").await;
    let second = server.write("counter", "2").await;

    assert_eq!((first, second), (1, 2));
    assert_eq!(
        server.writes_since(0).await,
        json!([
            {"seq": 1, "key": "counter", "value": "1"},
            {"seq": 2, "key": "counter", "value": "2"},
        ]),
        "the log keeps both writes, not just the current value"
    );
    assert_eq!(server.get("/kv/counter").await.text().await.unwrap(), "2");
    server.stop().await;
}

#[tokio::test]
async fn a_missing_key_is_404_with_a_reason() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let response = server.get("/kv/never-written").await;

    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let reason = reason(response).await;
    assert!(
        reason.contains("never-written") && reason.contains("does not exist"),
        "{reason}"
    );
    server.stop().await;
}

#[tokio::test]
async fn keys_that_could_escape_or_hide_are_rejected_with_a_reason() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;
    let too_long = "k".repeat(129);

    // `..` must reach the server as written; the others survive URL parsing as they are.
    for method in ["PUT", "GET"] {
        let (status, body) = raw_request(server.addr, method, "/kv/..").await;
        assert_eq!(status, 400, "{method} /kv/..");
        assert!(
            body["error"].as_str().unwrap_or("").contains("not allowed"),
            "{method} /kv/.. gives a reason: {body}"
        );
    }
    for key in [".hidden", too_long.as_str(), "..%2Fetc%2Fpasswd"] {
        let path = format!("/kv/{key}");
        let put = server.put(&path, "value").await;
        assert_eq!(put.status(), StatusCode::BAD_REQUEST, "PUT {path}");
        assert!(reason(put).await.contains("not allowed"), "PUT {path}");
        let get = server.get(&path).await;
        assert_eq!(get.status(), StatusCode::BAD_REQUEST, "GET {path}");
        assert!(reason(get).await.contains("not allowed"), "GET {path}");
    }

    assert_eq!(
        server.writes_since(0).await,
        json!([]),
        "nothing was written"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_key_of_exactly_128_characters_is_allowed() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;
    let longest = "k".repeat(128);

    server.write(&longest, "fits").await;

    assert_eq!(
        server
            .get(&format!("/kv/{longest}"))
            .await
            .text()
            .await
            .unwrap(),
        "fits"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_value_that_is_not_utf8_is_rejected_with_a_reason() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let response = server.put("/kv/binary", vec![0x66, 0xff, 0xfe, 0x00]).await;

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(reason(response).await.contains("UTF-8"));
    assert_eq!(
        server.get("/kv/binary").await.status(),
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}

#[tokio::test]
async fn a_negative_since_is_rejected_with_a_reason() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let response = server.get("/kv?since=-1").await;

    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(reason(response).await.contains("since"));
    server.stop().await;
}

#[tokio::test]
async fn a_file_put_answers_201_and_get_returns_the_same_bytes() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;
    // Every byte value, several times over: no text conversion may touch a file.
    let content: Vec<u8> = (0..=255u8).cycle().take(64 * 1024 + 7).collect();

    let put = server.put("/files/blob.bin", content.clone()).await;
    let get = server.get("/files/blob.bin").await;

    assert_eq!(put.status(), StatusCode::CREATED);
    let answer: Value = put.json().await.unwrap();
    assert_eq!(answer["size"], json!(content.len()));
    assert_eq!(get.status(), StatusCode::OK);
    assert_eq!(get.bytes().await.unwrap().as_ref(), content.as_slice());
    server.stop().await;
}

#[tokio::test]
async fn a_missing_file_is_404_with_a_reason() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let response = server.get("/files/nothing-here").await;

    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(reason(response).await.contains("does not exist"));
    server.stop().await;
}

#[tokio::test]
async fn a_file_name_that_escapes_the_directory_is_rejected_with_a_reason() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    // The database sits one level above the files: the obvious target.
    let traversal = server.put("/files/..%2Fkv.sqlite", "overwritten").await;
    let (status, body) = raw_request(server.addr, "PUT", "/files/..").await;
    // A staging file is hidden until it is complete; it cannot be read half-written.
    let staging = server.get("/files/.blob.0.partial").await;

    assert_eq!(traversal.status(), StatusCode::BAD_REQUEST);
    assert!(reason(traversal).await.contains("not allowed"));
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap_or("").contains("not allowed"));
    assert_eq!(staging.status(), StatusCode::BAD_REQUEST);
    assert_eq!(server.health().await["writes"], json!(0));
    assert_ne!(
        std::fs::read(data.path().join("kv.sqlite")).unwrap(),
        b"overwritten"
    );
    server.stop().await;
}

#[tokio::test]
async fn health_reports_boot_id_uptime_and_the_number_of_committed_writes() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;

    let before = server.health().await;
    server.write("a", "1").await;
    server.write("a", "2").await;
    server.write("b", "3").await;
    // A rejected write is not a committed one.
    server.put("/kv/.hidden", "4").await;
    let after = server.health().await;

    assert_eq!(before["writes"], json!(0));
    assert_eq!(after["writes"], json!(3));
    assert_eq!(after["status"], json!("ok"));
    let boot_id = after["boot_id"].as_str().expect("a boot id");
    assert!(!boot_id.is_empty());
    assert_eq!(before["boot_id"], after["boot_id"]);
    let uptime = after["uptime_s"].as_f64().expect("uptime in seconds");
    assert!(uptime >= before["uptime_s"].as_f64().unwrap() && uptime >= 0.0);
    server.stop().await;
}

#[tokio::test]
async fn acknowledged_writes_and_files_survive_reopening_the_store() {
    let data = TempDir::new().unwrap();
    let first = TestServer::start(data.path()).await;
    first.write("kept", "yes").await;
    first.write("kept", "still").await;
    assert_eq!(
        first.put("/files/report.txt", "all good").await.status(),
        StatusCode::CREATED
    );
    first.stop().await;

    let second = TestServer::start(data.path()).await;

    assert_eq!(second.get("/kv/kept").await.text().await.unwrap(), "still");
    assert_eq!(
        second.writes_since(0).await,
        json!([
            {"seq": 1, "key": "kept", "value": "yes"},
            {"seq": 2, "key": "kept", "value": "still"},
        ])
    );
    assert_eq!(second.health().await["writes"], json!(2));
    assert_eq!(
        second.get("/files/report.txt").await.text().await.unwrap(),
        "all good"
    );
    assert_eq!(
        second.write("kept", "again").await,
        3,
        "sequence numbers continue"
    );
    second.stop().await;
}

#[tokio::test]
async fn concurrent_uploads_of_one_name_each_succeed_and_one_of_them_wins_whole() {
    let data = TempDir::new().unwrap();
    let server = TestServer::start(data.path()).await;
    // Large enough that the uploads overlap on disk.
    let uploads: Vec<Vec<u8>> = (0..8u8).map(|n| vec![b'a' + n; 4 << 20]).collect();

    let answers = upload_all_at_once(&server, &uploads).await;
    let stored = server.get("/files/shared.bin").await.bytes().await.unwrap();

    assert!(
        answers.iter().all(|status| *status == StatusCode::CREATED),
        "every upload is acknowledged: {answers:?}"
    );
    assert!(
        uploads
            .iter()
            .any(|upload| upload.as_slice() == stored.as_ref()),
        "the stored file is one whole upload"
    );
    server.stop().await;
}

/// PUTs every upload to `/files/shared.bin` at the same time; returns their statuses.
async fn upload_all_at_once(server: &TestServer, uploads: &[Vec<u8>]) -> Vec<StatusCode> {
    let mut tasks = tokio::task::JoinSet::new();
    for upload in uploads {
        let request = server
            .client
            .put(server.url("/files/shared.bin"))
            .body(upload.clone());
        tasks.spawn(async move { request.send().await.expect("PUT").status() });
    }
    tasks.join_all().await
}
