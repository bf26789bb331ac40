//! The QMP client against a fake QEMU monitor on a Unix socket.
//!
//! Each test starts a [`FakeQemu`] with a script: the fake greets, answers
//! `qmp_capabilities`, then plays the script on the one connection it accepts. The
//! scripts reproduce what a real QEMU does at the worst moment — answers out of order,
//! events in between, garbage, silence, a half-written line before it dies — and the
//! tests check that the client keeps every caller's reply straight.

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_qemu::{Qmp, QmpError};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

const GREETING: &str = r#"{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0},"package":""},"capabilities":[]}}"#;
/// Generous: only the timeout test waits on purpose, and it sets its own.
const PATIENCE: Duration = Duration::from_secs(5);

/// A fake QEMU monitor: one socket in its own temporary directory, one scripted connection.
struct FakeQemu {
    socket: PathBuf,
    server: JoinHandle<()>,
    _dir: TempDir,
}

impl FakeQemu {
    /// Greets and negotiates capabilities like QEMU, then hands the connection to `script`.
    fn start<F, Fut>(script: F) -> FakeQemu
    where
        F: FnOnce(Monitor) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        FakeQemu::start_raw(|mut monitor| async move {
            monitor.send_line(GREETING).await;
            let negotiate = monitor.next_command().await;
            assert_eq!(negotiate.execute, "qmp_capabilities");
            monitor.reply(&negotiate.id, json!({})).await;
            script(monitor).await;
        })
    }

    /// Hands the accepted connection to `script` before anything is said.
    fn start_raw<F, Fut>(script: F) -> FakeQemu
    where
        F: FnOnce(Monitor) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let dir = TempDir::new().expect("temporary directory");
        let socket = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake monitor socket");
        let server = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept the client");
            let (read_half, writer) = stream.into_split();
            script(Monitor {
                reader: BufReader::new(read_half),
                writer,
            })
            .await;
        });
        FakeQemu {
            socket,
            server,
            _dir: dir,
        }
    }

    async fn connect(&self) -> Qmp {
        Qmp::connect(&self.socket, PATIENCE)
            .await
            .expect("connect to the fake monitor")
    }

    /// Waits for the script to end, so that an assertion that failed inside it fails the
    /// test with its own message.
    async fn finished(self) {
        match tokio::time::timeout(PATIENCE, self.server).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Ok(Err(error)) => panic!("the fake monitor's task failed: {error}"),
            Err(_) => panic!("the fake monitor's script did not finish within {PATIENCE:?}"),
        }
    }
}

/// A command as the fake monitor received it.
struct Command {
    id: Value,
    execute: String,
}

/// The fake QEMU's end of the connection.
struct Monitor {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Monitor {
    /// Writes `text` exactly as given: no newline is added.
    async fn send_raw(&mut self, text: &str) {
        self.writer
            .write_all(text.as_bytes())
            .await
            .expect("write to the client");
    }

    async fn send_line(&mut self, line: &str) {
        self.send_raw(&format!("{line}\n")).await;
    }

    async fn next_command(&mut self) -> Command {
        let mut line = String::new();
        let read = self
            .reader
            .read_line(&mut line)
            .await
            .expect("read from the client");
        assert!(read > 0, "the client hung up while a command was expected");
        let message: Value = serde_json::from_str(&line).expect("the client sends JSON lines");
        let execute = message["execute"]
            .as_str()
            .expect("every command names what to execute")
            .to_string();
        let id = message
            .get("id")
            .cloned()
            .expect("every command carries an id");
        Command { id, execute }
    }

    async fn reply(&mut self, id: &Value, value: Value) {
        self.send_line(&json!({"return": value, "id": id}).to_string())
            .await;
    }

    /// Keeps the connection open until the client closes its end.
    async fn stay_until_client_leaves(mut self) {
        let mut ignored = Vec::new();
        while self
            .reader
            .read_until(b'\n', &mut ignored)
            .await
            .unwrap_or(0)
            > 0
        {
            ignored.clear();
        }
    }
}

#[tokio::test]
async fn the_greeting_is_read_and_capabilities_are_negotiated_on_connect() {
    let fake = FakeQemu::start(Monitor::stay_until_client_leaves);
    let qmp = fake.connect().await;

    assert_eq!(qmp.qemu_version(), "7.2.0");
    assert!(!qmp.is_closed());

    drop(qmp);
    fake.finished().await;
}

#[tokio::test]
async fn replies_are_matched_to_callers_by_id_when_answered_out_of_order() {
    let fake = FakeQemu::start(|mut monitor| async move {
        // Wait until both commands are in, then answer the later one first.
        let first = monitor.next_command().await;
        let second = monitor.next_command().await;
        for command in [&second, &first] {
            monitor
                .reply(&command.id, json!({"answer-to": command.execute}))
                .await;
        }
        monitor.stay_until_client_leaves().await;
    });
    let qmp = fake.connect().await;

    let (status, name) = tokio::join!(
        qmp.execute("query-status", None),
        qmp.execute("query-name", None)
    );

    assert_eq!(status.unwrap(), json!({"answer-to": "query-status"}));
    assert_eq!(name.unwrap(), json!({"answer-to": "query-name"}));
    drop(qmp);
    fake.finished().await;
}

#[tokio::test]
async fn unknown_events_and_unknown_fields_reach_subscribers_without_disturbing_replies() {
    let fake = FakeQemu::start(|mut monitor| async move {
        let command = monitor.next_command().await;
        // Events arrive between a command and its reply; a newer QEMU adds events and
        // fields this client has never heard of.
        monitor
            .send_line(r#"{"event":"FERRY_FUTURE_EVENT","data":{"answer":42},"timestamp":{"seconds":1700000000,"microseconds":1}}"#)
            .await;
        monitor
            .send_line(r#"{"event":"STOP","timestamp":{"seconds":1700000000,"microseconds":2},"future-field":"ignored"}"#)
            .await;
        monitor
            .reply(&command.id, json!({"status": "paused"}))
            .await;
        monitor.stay_until_client_leaves().await;
    });
    let qmp = fake.connect().await;
    let mut events = qmp.subscribe();

    let reply = qmp.execute("query-status", None).await;

    assert_eq!(reply.unwrap(), json!({"status": "paused"}));
    let unknown = events.recv().await.expect("the unknown event");
    assert_eq!(unknown.event, "FERRY_FUTURE_EVENT");
    assert_eq!(unknown.data, json!({"answer": 42}));
    assert_eq!(
        unknown.timestamp,
        json!({"seconds": 1700000000, "microseconds": 1})
    );
    let stop = events
        .recv()
        .await
        .expect("the event with an unknown field");
    assert_eq!(stop.event, "STOP");
    assert_eq!(
        stop.data,
        Value::Null,
        "a missing data field defaults to null"
    );
    drop(qmp);
    fake.finished().await;
}

#[tokio::test]
async fn garbage_and_blank_lines_are_skipped_and_the_next_reply_still_arrives() {
    let fake = FakeQemu::start(|mut monitor| async move {
        let command = monitor.next_command().await;
        monitor.send_raw("this is not JSON\n").await;
        monitor.send_raw("\n   \n\r\n").await;
        monitor.send_raw("{\"return\": {\"unterminated\": \n").await;
        monitor.reply(&command.id, json!({"running": true})).await;

        let command = monitor.next_command().await;
        monitor.reply(&command.id, json!({"running": false})).await;
        monitor.stay_until_client_leaves().await;
    });
    let qmp = fake.connect().await;

    let first = qmp.execute("query-status", None).await;
    let second = qmp.execute("query-status", None).await;

    assert_eq!(first.unwrap(), json!({"running": true}));
    assert_eq!(second.unwrap(), json!({"running": false}));
    assert!(!qmp.is_closed(), "garbage must not close the session");
    drop(qmp);
    fake.finished().await;
}

#[tokio::test]
async fn a_late_reply_after_a_timeout_does_not_poison_the_next_command() {
    let fake = FakeQemu::start(|mut monitor| async move {
        let slow = monitor.next_command().await;
        assert_eq!(slow.execute, "query-migrate");
        // Stay silent; the client gives up. Its next command proves it did, and only
        // then does the late reply arrive, just ahead of the answer to that command.
        let next = monitor.next_command().await;
        assert_eq!(next.execute, "query-status");
        monitor.reply(&slow.id, json!({"late": true})).await;
        monitor.reply(&next.id, json!({"status": "running"})).await;
        monitor.stay_until_client_leaves().await;
    });
    let qmp = fake.connect().await;
    let short = Duration::from_millis(200);

    let slow = qmp.execute_with_timeout("query-migrate", None, short).await;
    let next = qmp.execute("query-status", None).await;

    match slow {
        Err(QmpError::Timeout { command, after }) => {
            assert_eq!(command, "query-migrate");
            assert_eq!(after, short);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(next.unwrap(), json!({"status": "running"}));
    drop(qmp);
    fake.finished().await;
}

#[tokio::test]
async fn an_error_reply_becomes_a_command_error_with_class_and_description() {
    let fake = FakeQemu::start(|mut monitor| async move {
        let command = monitor.next_command().await;
        monitor
            .send_line(
                &json!({
                    "error": {"class": "DeviceNotFound", "desc": "Device 'disk9' not found"},
                    "id": command.id,
                })
                .to_string(),
            )
            .await;
        monitor.stay_until_client_leaves().await;
    });
    let qmp = fake.connect().await;

    let reply = qmp
        .execute("device_del", Some(json!({"id": "disk9"})))
        .await;

    match reply {
        Err(QmpError::Command {
            command,
            class,
            description,
        }) => {
            assert_eq!(command, "device_del");
            assert_eq!(class, "DeviceNotFound");
            assert_eq!(description, "Device 'disk9' not found");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    drop(qmp);
    fake.finished().await;
}

#[tokio::test]
async fn eof_in_the_middle_of_a_reply_fails_every_waiting_command_at_once() {
    let fake = FakeQemu::start(|mut monitor| async move {
        monitor.next_command().await;
        monitor.next_command().await;
        // QEMU dies halfway through writing a reply; dropping the monitor closes the socket.
        monitor.send_raw(r#"{"return": {"status": "runn"#).await;
    });
    let qmp = fake.connect().await;
    let started = Instant::now();

    // Both use the default ten-second timeout; neither may wait for it.
    let (first, second) = tokio::join!(
        qmp.execute("query-status", None),
        qmp.execute("query-name", None)
    );

    assert!(
        matches!(first, Err(QmpError::Closed)),
        "expected Closed, got {first:?}"
    );
    assert!(
        matches!(second, Err(QmpError::Closed)),
        "expected Closed, got {second:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the waiters were released only after {:?}",
        started.elapsed()
    );
    tokio::time::timeout(Duration::from_secs(1), qmp.closed())
        .await
        .expect("closed() resolves once the connection is gone");
    assert!(qmp.is_closed());
    let after = qmp.execute("query-status", None).await;
    assert!(
        matches!(after, Err(QmpError::Closed)),
        "a command on a closed session fails at once, got {after:?}"
    );
    fake.finished().await;
}

#[tokio::test]
async fn a_peer_that_sends_a_json_greeting_other_than_qmp_is_a_protocol_error() {
    let fake = FakeQemu::start_raw(|mut monitor| async move {
        monitor.send_line(r#"{"hello": "I am not QEMU"}"#).await;
        monitor.stay_until_client_leaves().await;
    });

    let connected = Qmp::connect(&fake.socket, PATIENCE).await;

    match connected {
        Err(QmpError::Protocol(reason)) => assert!(
            reason.contains("I am not QEMU"),
            "the reason shows what the peer said: {reason}"
        ),
        Err(other) => panic!("expected a protocol error, got {other:?}"),
        Ok(_) => panic!("connected to a peer that does not speak QMP"),
    }
    fake.finished().await;
}

#[tokio::test]
async fn a_peer_that_greets_with_something_other_than_json_is_a_protocol_error() {
    let fake = FakeQemu::start_raw(|mut monitor| async move {
        monitor.send_line("SSH-2.0-OpenSSH_9.2").await;
        monitor.stay_until_client_leaves().await;
    });

    let connected = Qmp::connect(&fake.socket, PATIENCE).await;

    assert!(
        matches!(connected, Err(QmpError::Protocol(_))),
        "expected a protocol error, got {:?}",
        connected.err()
    );
    fake.finished().await;
}

#[tokio::test]
async fn connecting_to_a_missing_socket_is_a_connect_error_naming_the_path() {
    let dir = TempDir::new().expect("temporary directory");
    let missing = dir.path().join("no-such-qmp.sock");

    let connected = Qmp::connect(&missing, PATIENCE).await;

    let error = match connected {
        Err(error) => error,
        Ok(_) => panic!("connected to a socket that does not exist"),
    };
    assert!(
        matches!(&error, QmpError::Connect { path, .. } if path == &missing),
        "expected a connect error for {}, got {error:?}",
        missing.display()
    );
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "the message names the socket: {error}"
    );
}

#[tokio::test]
async fn a_qemu_that_stops_reading_its_monitor_makes_commands_time_out_instead_of_hanging() {
    let (resume, resumed) = tokio::sync::oneshot::channel::<()>();
    let fake = FakeQemu::start(|mut monitor| async move {
        // QEMU's main loop is stuck (say, on storage I/O): nothing is read until it resumes.
        // Resumed on request, or the test ended: either way it goes on.
        resumed.await.ok();
        for _ in 0..3 {
            let command = monitor.next_command().await;
            monitor
                .reply(&command.id, json!({"answer-to": command.execute}))
                .await;
        }
        monitor.stay_until_client_leaves().await;
    });
    let qmp = fake.connect().await;
    let short = Duration::from_millis(200);
    // Far more than the socket buffers hold, so the write itself cannot finish.
    let bulky = json!({"command-line": "x".repeat(16 << 20)});

    let stuck = tokio::time::timeout(
        PATIENCE,
        qmp.execute_with_timeout("human-monitor-command", Some(bulky), short),
    )
    .await
    .expect("a command whose write cannot finish still ends at its timeout");
    let queued = tokio::time::timeout(
        PATIENCE,
        qmp.execute_with_timeout("query-status", None, short),
    )
    .await
    .expect("a command queued behind a stuck write still ends at its timeout");
    resume.send(()).expect("the fake monitor is waiting");
    let after = qmp.execute("query-name", None).await;

    assert!(
        matches!(&stuck, Err(QmpError::Timeout { command, .. }) if command == "human-monitor-command"),
        "expected a timeout, got {stuck:?}"
    );
    assert!(
        matches!(&queued, Err(QmpError::Timeout { command, .. }) if command == "query-status"),
        "expected a timeout, got {queued:?}"
    );
    // The commands that timed out reached QEMU whole; their late replies are dropped.
    assert_eq!(after.unwrap(), json!({"answer-to": "query-name"}));
    drop(qmp);
    fake.finished().await;
}
