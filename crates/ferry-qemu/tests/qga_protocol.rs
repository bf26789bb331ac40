//! The guest agent client against a fake qemu-ga on a Unix socket.
//!
//! [`FakeAgent`] speaks the real wire protocol: a `0xFF` byte from the client throws away
//! any half-read request, requests are newline-terminated JSON objects, and
//! `guest-sync-delimited {"id": N}` is answered with `0xFF` followed by `{"return": N}`.
//! Like the virtio-serial port it stands in for, it has no request ids, so each test's
//! handler decides what the agent says (or leaves unsaid) and the tests check that the
//! client never takes a stale answer for the one it asked for.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_qemu::{ExecOutput, GuestAgent, GuestInterface, QgaError};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

const DELIMITER: u8 = 0xFF;
/// Generous: only the timeout test waits on purpose, and it sets its own.
const PATIENCE: Duration = Duration::from_secs(5);

/// A request as the fake agent parsed it.
#[derive(Debug, Clone)]
struct Request {
    /// Which accepted connection it came on, counting from 0.
    connection: usize,
    command: String,
    arguments: Value,
    /// Whether the client sent a `0xFF` since the previous request.
    after_delimiter: bool,
}

/// What the fake agent does about one request.
enum Answer {
    /// Write these bytes (a reply, possibly preceded by stale ones).
    Send(Vec<u8>),
    /// Say nothing, like an agent that is stalled.
    Silence,
    /// Write these bytes, then read nothing for a while, like a guest that stalls.
    SendThenStall(Vec<u8>, Duration),
    /// Close the connection, like QEMU going away.
    HangUp,
}

impl Answer {
    fn ok(value: Value) -> Answer {
        Answer::Send(reply_line(&json!({"return": value})))
    }

    fn error(class: &str, description: &str) -> Answer {
        Answer::Send(reply_line(
            &json!({"error": {"class": class, "desc": description}}),
        ))
    }
}

fn reply_line(message: &Value) -> Vec<u8> {
    format!("{message}\n").into_bytes()
}

/// The answer qemu-ga gives to `guest-sync-delimited`: the delimiter, then the id.
fn sync_answer(arguments: &Value) -> Vec<u8> {
    let mut bytes = vec![DELIMITER];
    bytes.extend(reply_line(&json!({"return": arguments["id"]})));
    bytes
}

/// How the fake logs a line that is not JSON (a request the client cut in half and
/// never flushed would end up glued to the next one).
const NOT_JSON: &str = "<not JSON>";

/// Returns `Some` to override the agent's ordinary behaviour for a request.
type Handler = dyn FnMut(&Request) -> Option<Answer> + Send;

/// What any agent does unless the test's handler says otherwise.
fn ordinary_answer(request: &Request) -> Answer {
    match request.command.as_str() {
        "guest-sync-delimited" => Answer::Send(sync_answer(&request.arguments)),
        "guest-ping" => Answer::ok(json!({})),
        NOT_JSON => Answer::error("GenericError", "JSON parse error"),
        other => Answer::error(
            "CommandNotFound",
            &format!("The command {other} has not been found"),
        ),
    }
}

/// A fake qemu-ga: accepts any number of connections, one after another or at once.
struct FakeAgent {
    socket: PathBuf,
    requests: Arc<Mutex<Vec<Request>>>,
    acceptor: JoinHandle<()>,
    _dir: TempDir,
}

impl FakeAgent {
    fn start(handler: impl FnMut(&Request) -> Option<Answer> + Send + 'static) -> FakeAgent {
        FakeAgent::start_with_backlog(Vec::new(), handler)
    }

    /// `backlog` is written on every new connection before anything is read: what a
    /// previous session left in the channel.
    fn start_with_backlog(
        backlog: Vec<u8>,
        handler: impl FnMut(&Request) -> Option<Answer> + Send + 'static,
    ) -> FakeAgent {
        let dir = TempDir::new().expect("temporary directory");
        let socket = dir.path().join("qga.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake agent socket");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Box<Handler>>> = Arc::new(Mutex::new(Box::new(handler)));
        let log = requests.clone();
        let acceptor = tokio::spawn(async move {
            let mut connection = 0;
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(
                    stream,
                    connection,
                    backlog.clone(),
                    handler.clone(),
                    log.clone(),
                ));
                connection += 1;
            }
        });
        FakeAgent {
            socket,
            requests,
            acceptor,
            _dir: dir,
        }
    }

    fn agent(&self) -> GuestAgent {
        GuestAgent::new(&self.socket)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().expect("request log").clone()
    }

    /// The commands received, sync included, as (connection, command).
    fn commands(&self) -> Vec<(usize, String)> {
        self.requests()
            .into_iter()
            .map(|request| (request.connection, request.command))
            .collect()
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// One connection of the fake agent, byte by byte as qemu-ga's parser sees it.
async fn serve(
    stream: UnixStream,
    connection: usize,
    backlog: Vec<u8>,
    handler: Arc<Mutex<Box<Handler>>>,
    log: Arc<Mutex<Vec<Request>>>,
) {
    let (read_half, mut writer) = stream.into_split();
    if writer.write_all(&backlog).await.is_err() {
        return;
    }
    let mut reader = BufReader::new(read_half);
    let mut partial = Vec::new();
    let mut after_delimiter = false;
    while let Ok(byte) = reader.read_u8().await {
        match byte {
            DELIMITER => {
                partial.clear();
                after_delimiter = true;
                continue;
            }
            b'\n' => {}
            _ => {
                partial.push(byte);
                continue;
            }
        }
        let line = std::mem::take(&mut partial);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let message: Value =
            serde_json::from_slice(&line).unwrap_or_else(|_| json!({"execute": NOT_JSON}));
        let request = Request {
            connection,
            command: message["execute"].as_str().unwrap_or_default().to_string(),
            arguments: message.get("arguments").cloned().unwrap_or(Value::Null),
            after_delimiter: std::mem::take(&mut after_delimiter),
        };
        log.lock().expect("request log").push(request.clone());
        let answer = {
            let mut handler = handler.lock().expect("handler");
            handler(&request).unwrap_or_else(|| ordinary_answer(&request))
        };
        match answer {
            Answer::Send(bytes) => {
                if writer.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            Answer::SendThenStall(bytes, stall) => {
                if writer.write_all(&bytes).await.is_err() {
                    return;
                }
                tokio::time::sleep(stall).await;
            }
            Answer::Silence => {}
            Answer::HangUp => return,
        }
    }
}

#[tokio::test]
async fn every_session_starts_with_a_delimiter_and_a_sync() {
    let fake = FakeAgent::start(|_| None);
    let agent = fake.agent();

    agent.ping(PATIENCE).await.unwrap();
    agent.ping(PATIENCE).await.unwrap();

    let requests = fake.requests();
    let commands: Vec<&str> = requests.iter().map(|r| r.command.as_str()).collect();
    assert_eq!(
        commands,
        ["guest-sync-delimited", "guest-ping", "guest-ping"],
        "one sync per session, not per command"
    );
    assert!(
        requests[0].after_delimiter,
        "the sync follows a 0xFF that flushes half-read input"
    );
    assert!(requests[0].arguments["id"].is_u64());
}

#[tokio::test]
async fn stale_replies_in_the_channel_are_skipped_by_the_first_sync() {
    // What a previous session can leave behind: replies nobody read, the delimited
    // answer to an old sync, and a half-written line.
    let mut backlog = b"{\"return\":{}}\n{\"return\": 12345}\n".to_vec();
    backlog.push(DELIMITER);
    backlog.extend(b"{\"return\": 12345}\n");
    backlog.extend(b"garbage {\"retu");
    let fake = FakeAgent::start_with_backlog(backlog, |request| {
        (request.command == "guest-get-host-name")
            .then(|| Answer::ok(json!({"host-name": "appliance"})))
    });
    let agent = fake.agent();

    let reply = agent
        .execute("guest-get-host-name", None, PATIENCE)
        .await
        .unwrap();

    assert_eq!(reply, json!({"host-name": "appliance"}));
}

#[tokio::test]
async fn a_command_the_agent_never_answers_times_out_and_the_next_one_resynchronises() {
    const LATE_REPLY: &[u8] = b"{\"return\": {\"late\": true}}\n";
    let mut owes_late_reply = false;
    let fake = FakeAgent::start(move |request| match request.command.as_str() {
        "guest-fsfreeze-status" => {
            owes_late_reply = true;
            Some(Answer::Silence)
        }
        // The stalled command's answer finally arrives, just ahead of the new sync's.
        "guest-sync-delimited" if std::mem::take(&mut owes_late_reply) => {
            let mut bytes = LATE_REPLY.to_vec();
            bytes.extend(sync_answer(&request.arguments));
            Some(Answer::Send(bytes))
        }
        "guest-get-time" => Some(Answer::ok(json!(1_700_000_000_000_000_000u64))),
        _ => None,
    });
    let agent = fake.agent();
    let short = Duration::from_millis(200);

    let stalled = agent.execute("guest-fsfreeze-status", None, short).await;
    let next = agent.execute("guest-get-time", None, PATIENCE).await;

    match stalled {
        Err(QgaError::Timeout { command, after }) => {
            assert_eq!(command, "guest-fsfreeze-status");
            assert_eq!(after, short);
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(next.unwrap(), json!(1_700_000_000_000_000_000u64));
    assert_eq!(
        fake.commands(),
        [
            (0, "guest-sync-delimited".to_string()),
            (0, "guest-fsfreeze-status".to_string()),
            (0, "guest-sync-delimited".to_string()),
            (0, "guest-get-time".to_string()),
        ],
        "the client resynchronises on the same connection"
    );
}

#[tokio::test]
async fn guest_exec_polls_until_the_process_exits_and_decodes_its_output() {
    let mut polls = 0;
    let fake = FakeAgent::start(move |request| match request.command.as_str() {
        "guest-exec" => Some(Answer::ok(json!({"pid": 42}))),
        "guest-exec-status" => {
            polls += 1;
            Some(if polls == 1 {
                Answer::ok(json!({"exited": false}))
            } else {
                // base64 of "out" and "err".
                Answer::ok(json!({
                    "exited": true, "exitcode": 3, "out-data": "b3V0", "err-data": "ZXJy"
                }))
            })
        }
        _ => None,
    });
    let agent = fake.agent();

    let output = agent
        .exec(
            "/bin/sh",
            &["-c", "echo out; echo err >&2; exit 3"],
            PATIENCE,
        )
        .await
        .unwrap();

    assert_eq!(
        output,
        ExecOutput {
            exit_code: Some(3),
            signal: None,
            stdout: "out".to_string(),
            stderr: "err".to_string(),
        }
    );
    assert!(!output.success());
    let requests = fake.requests();
    let exec = requests
        .iter()
        .find(|request| request.command == "guest-exec")
        .expect("a guest-exec request");
    assert_eq!(
        exec.arguments,
        json!({
            "path": "/bin/sh",
            "arg": ["-c", "echo out; echo err >&2; exit 3"],
            "capture-output": true,
        })
    );
    let statuses: Vec<&Value> = requests
        .iter()
        .filter(|request| request.command == "guest-exec-status")
        .map(|request| &request.arguments)
        .collect();
    assert_eq!(statuses, [&json!({"pid": 42}), &json!({"pid": 42})]);
}

#[tokio::test]
async fn guest_exec_output_that_is_not_base64_is_a_protocol_error() {
    let fake = FakeAgent::start(|request| match request.command.as_str() {
        "guest-exec" => Some(Answer::ok(json!({"pid": 7}))),
        "guest-exec-status" => Some(Answer::ok(
            json!({"exited": true, "exitcode": 0, "out-data": "this is *not* base64!"}),
        )),
        _ => None,
    });
    let agent = fake.agent();

    let output = agent.exec("/bin/true", &[], PATIENCE).await;

    assert!(
        matches!(output, Err(QgaError::Protocol(ref reason)) if reason.contains("base64")),
        "expected a protocol error about base64, got {output:?}"
    );
}

#[tokio::test]
async fn an_error_reply_becomes_a_command_error_and_the_session_goes_on() {
    let fake = FakeAgent::start(|request| {
        (request.command == "guest-file-open").then(|| {
            Answer::error(
                "GenericError",
                "failed to open file '/nope': No such file or directory",
            )
        })
    });
    let agent = fake.agent();

    let opened = agent
        .execute("guest-file-open", Some(json!({"path": "/nope"})), PATIENCE)
        .await;
    let ping = agent.ping(PATIENCE).await;

    match opened {
        Err(QgaError::Command {
            command,
            description,
        }) => {
            assert_eq!(command, "guest-file-open");
            assert_eq!(
                description,
                "failed to open file '/nope': No such file or directory"
            );
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    ping.unwrap();
}

#[tokio::test]
async fn a_dropped_connection_fails_the_call_and_the_next_call_reconnects() {
    let fake = FakeAgent::start(|request| {
        (request.connection == 0 && request.command == "guest-ping").then_some(Answer::HangUp)
    });
    let agent = fake.agent();

    let dropped = agent.ping(PATIENCE).await;
    let reconnected = agent.ping(PATIENCE).await;

    assert!(
        matches!(dropped, Err(QgaError::Closed | QgaError::Connect { .. })),
        "expected Closed, got {dropped:?}"
    );
    reconnected.unwrap();
    assert_eq!(
        fake.commands(),
        [
            (0, "guest-sync-delimited".to_string()),
            (0, "guest-ping".to_string()),
            (1, "guest-sync-delimited".to_string()),
            (1, "guest-ping".to_string()),
        ],
        "the new connection is synchronised before it is used"
    );
}

#[tokio::test]
async fn network_interfaces_are_parsed_from_the_agents_list() {
    let fake = FakeAgent::start(|request| {
        (request.command == "guest-network-get-interfaces").then(|| {
            Answer::ok(json!([{
                "name": "eth0",
                "hardware-address": "52:54:00:12:34:56",
                "ip-addresses": [
                    {"ip-address": "10.0.0.2", "ip-address-type": "ipv4", "prefix": 24}
                ],
            }]))
        })
    });
    let agent = fake.agent();

    let interfaces = agent.network_interfaces(PATIENCE).await.unwrap();

    assert_eq!(interfaces.len(), 1);
    let GuestInterface {
        name,
        hardware_address,
        ip_addresses,
    } = &interfaces[0];
    assert_eq!(name, "eth0");
    assert_eq!(hardware_address.as_deref(), Some("52:54:00:12:34:56"));
    assert_eq!(ip_addresses.len(), 1);
    assert_eq!(ip_addresses[0].address, "10.0.0.2");
    assert_eq!(ip_addresses[0].family, "ipv4");
    assert_eq!(ip_addresses[0].prefix, 24);
}

#[tokio::test]
async fn a_missing_agent_socket_is_a_connect_error_naming_the_path() {
    let dir = TempDir::new().expect("temporary directory");
    let missing = dir.path().join("no-such-qga.sock");
    let agent = GuestAgent::new(&missing);

    let ping = agent.ping(PATIENCE).await;

    assert!(
        matches!(&ping, Err(QgaError::Connect { path, .. }) if path == &missing),
        "expected a connect error for {}, got {ping:?}",
        missing.display()
    );
}

#[tokio::test]
async fn a_request_cut_off_by_a_timeout_is_flushed_by_the_next_sync() {
    let mut stalled = false;
    let fake = FakeAgent::start(move |request| {
        // Right after the first sync the guest stalls, so the next request cannot be
        // written whole before its timeout.
        (request.command == "guest-sync-delimited" && !std::mem::replace(&mut stalled, true))
            .then(|| Answer::SendThenStall(sync_answer(&request.arguments), Duration::from_secs(1)))
    });
    let agent = fake.agent();
    let short = Duration::from_millis(300);
    // Far more than the socket buffers hold.
    let bulky = json!({"handle": 1, "buf-b64": "A".repeat(16 << 20)});

    let cut_off = agent.execute("guest-file-write", Some(bulky), short).await;
    let ping = agent.ping(PATIENCE).await;

    assert!(
        matches!(&cut_off, Err(QgaError::Timeout { command, .. }) if command == "guest-file-write"),
        "expected a timeout, got {cut_off:?}"
    );
    ping.unwrap();
    assert_eq!(
        fake.commands(),
        [
            (0, "guest-sync-delimited".to_string()),
            (0, "guest-sync-delimited".to_string()),
            (0, "guest-ping".to_string()),
        ],
        "the half-written request was discarded at the delimiter, never parsed"
    );
}
