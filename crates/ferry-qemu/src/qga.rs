//! A thin client for the QEMU guest agent (qemu-ga) over the host end of its
//! virtio-serial port.
//!
//! The channel has no request ids and keeps whatever was written while nobody listened,
//! so replies can be stale. Every session therefore starts with the documented
//! resynchronisation: send `0xFF` (the agent drops any half-read input), then
//! `guest-sync-delimited` with a fresh id; the agent answers with `0xFF` followed by the
//! id, and everything read before that is discarded. After any timeout or garbage the
//! client resynchronises before the next command; after EOF it reconnects.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use crate::bounded::{read_line, LineRead};

const DELIMITER: u8 = 0xFF;
/// A reply line longer than this is a protocol error (the agent is resynchronised): the
/// guest decides what it sends, the host must not hold all of it. It fits
/// `guest-exec-status` with about 3 MiB of output.
pub const MAX_REPLY: usize = 4 << 20;
/// Each of an exec's stdout and stderr is kept up to this, then cut with
/// `TRUNCATED_MARKER`.
pub const MAX_EXEC_OUTPUT: usize = 1 << 20;
pub const TRUNCATED_MARKER: &str = "\n[output truncated]\n";
/// `guest-exec-status` polling interval: short, because most commands finish quickly.
const EXEC_POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, thiserror::Error)]
pub enum QgaError {
    /// The host end of the port could not be opened.
    #[error("cannot connect to guest agent socket {}: {reason}", path.display())]
    Connect { path: PathBuf, reason: String },
    /// The agent did not answer in time (not running in the guest, or the guest is stalled).
    #[error("guest agent did not answer {command} within {after:?}")]
    Timeout { command: String, after: Duration },
    /// The agent answered with an error.
    #[error("guest agent command {command} failed: {description}")]
    Command {
        command: String,
        description: String,
    },
    /// The agent's answer was not what the protocol says.
    #[error("guest agent protocol error: {0}")]
    Protocol(String),
    /// The connection dropped (QEMU exited); the next call reconnects.
    #[error("guest agent connection closed")]
    Closed,
}

/// What `guest-exec` produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecOutput {
    pub exit_code: Option<i64>,
    /// Set when the process was killed by a signal.
    pub signal: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestInterface {
    pub name: String,
    #[serde(rename = "hardware-address", default)]
    pub hardware_address: Option<String>,
    #[serde(rename = "ip-addresses", default)]
    pub ip_addresses: Vec<GuestIpAddress>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIpAddress {
    #[serde(rename = "ip-address")]
    pub address: String,
    #[serde(rename = "ip-address-type")]
    pub family: String,
    pub prefix: u8,
}

struct Connection {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
    synced: bool,
}

/// A guest agent session. Commands run one at a time (the protocol has no ids).
pub struct GuestAgent {
    path: PathBuf,
    connection: Mutex<Option<Connection>>,
    next_sync_id: AtomicU64,
}

impl GuestAgent {
    /// Does not connect yet: the first command does, so an agent that is not up yet is
    /// reported as a timeout of that command, not as a construction error.
    pub fn new(path: &Path) -> GuestAgent {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(1);
        GuestAgent {
            path: path.to_path_buf(),
            connection: Mutex::new(None),
            next_sync_id: AtomicU64::new(seed & 0xFFFF_FFFF),
        }
    }

    /// `guest-ping`: the heartbeat. Ok means the agent process is alive and scheduling.
    pub async fn ping(&self, timeout: Duration) -> Result<(), QgaError> {
        self.execute("guest-ping", None, timeout).await.map(|_| ())
    }

    /// Runs `path args…` in the guest, waits for it to exit, returns its output.
    pub async fn exec(
        &self,
        path: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<ExecOutput, QgaError> {
        let deadline = Instant::now() + timeout;
        let started = self
            .execute(
                "guest-exec",
                Some(json!({"path": path, "arg": args, "capture-output": true})),
                timeout,
            )
            .await?;
        let pid = started["pid"]
            .as_i64()
            .ok_or_else(|| QgaError::Protocol(format!("guest-exec returned no pid: {started}")))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QgaError::Timeout {
                    command: format!("guest-exec {path}"),
                    after: timeout,
                });
            }
            let status = self
                .execute("guest-exec-status", Some(json!({"pid": pid})), left)
                .await?;
            if status["exited"].as_bool() == Some(true) {
                return Ok(ExecOutput {
                    exit_code: status["exitcode"].as_i64(),
                    signal: status["signal"].as_i64(),
                    stdout: decode_output(&status["out-data"], &status["out-truncated"])?,
                    stderr: decode_output(&status["err-data"], &status["err-truncated"])?,
                });
            }
            tokio::time::sleep(EXEC_POLL.min(left)).await;
        }
    }

    /// Freezes the guest's filesystems (`guest-fsfreeze-freeze`): pending writes are
    /// flushed and new ones wait until [`GuestAgent::fsfreeze_thaw`]. Returns how many
    /// filesystems froze.
    pub async fn fsfreeze_freeze(&self, timeout: Duration) -> Result<u64, QgaError> {
        let reply = self.execute("guest-fsfreeze-freeze", None, timeout).await?;
        reply
            .as_u64()
            .ok_or_else(|| QgaError::Protocol(format!("bad fsfreeze reply: {reply}")))
    }

    pub async fn fsfreeze_thaw(&self, timeout: Duration) -> Result<u64, QgaError> {
        let reply = self.execute("guest-fsfreeze-thaw", None, timeout).await?;
        reply
            .as_u64()
            .ok_or_else(|| QgaError::Protocol(format!("bad fsfreeze reply: {reply}")))
    }

    pub async fn network_interfaces(
        &self,
        timeout: Duration,
    ) -> Result<Vec<GuestInterface>, QgaError> {
        let reply = self
            .execute("guest-network-get-interfaces", None, timeout)
            .await?;
        serde_json::from_value(reply)
            .map_err(|error| QgaError::Protocol(format!("bad interface list: {error}")))
    }

    /// Sends a command and waits for its reply, reconnecting and resynchronising first
    /// when needed. Never leaves the session in a state that breaks the next command.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let mut slot = self.connection.lock().await;
        let outcome =
            tokio::time::timeout(timeout, self.execute_locked(&mut slot, command, arguments)).await;
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                match error {
                    QgaError::Closed | QgaError::Connect { .. } => *slot = None,
                    _ => mark_unsynced(&mut slot),
                }
                Err(error)
            }
            Err(_) => {
                mark_unsynced(&mut slot);
                Err(QgaError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                })
            }
        }
    }

    async fn execute_locked(
        &self,
        slot: &mut Option<Connection>,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QgaError> {
        if slot.is_none() {
            // QEMU accepts one client at a time and re-arms its listener a moment after
            // the previous one (a restarted agent, a timed-out session) hung up.
            let refused_until = Instant::now() + Duration::from_secs(2);
            let stream = loop {
                match UnixStream::connect(&self.path).await {
                    Ok(stream) => break stream,
                    Err(error)
                        if error.kind() == std::io::ErrorKind::ConnectionRefused
                            && Instant::now() < refused_until =>
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(error) => {
                        return Err(QgaError::Connect {
                            path: self.path.clone(),
                            reason: error.to_string(),
                        })
                    }
                }
            };
            let (read_half, write_half) = stream.into_split();
            *slot = Some(Connection {
                reader: BufReader::new(read_half),
                writer: write_half,
                synced: false,
            });
        }
        let Some(connection) = slot.as_mut() else {
            return Err(QgaError::Closed);
        };
        if !connection.synced {
            let id = self.next_sync_id.fetch_add(1, Ordering::Relaxed);
            resync(connection, id).await?;
            connection.synced = true;
        }
        let mut message = json!({"execute": command});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        send(connection, &message).await?;
        let reply = read_reply(&mut connection.reader).await?;
        parse_reply(command, reply)
    }
}

fn mark_unsynced(slot: &mut Option<Connection>) {
    if let Some(connection) = slot.as_mut() {
        connection.synced = false;
    }
}

async fn send(connection: &mut Connection, message: &Value) -> Result<(), QgaError> {
    let mut line = message.to_string();
    line.push('\n');
    connection
        .writer
        .write_all(line.as_bytes())
        .await
        .map_err(|_| QgaError::Closed)
}

async fn resync(connection: &mut Connection, id: u64) -> Result<(), QgaError> {
    connection
        .writer
        .write_all(&[DELIMITER])
        .await
        .map_err(|_| QgaError::Closed)?;
    send(
        connection,
        &json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}),
    )
    .await?;
    loop {
        // Skip everything up to the agent's delimiter: stale replies, half lines.
        loop {
            let byte = connection
                .reader
                .read_u8()
                .await
                .map_err(|_| QgaError::Closed)?;
            if byte == DELIMITER {
                break;
            }
        }
        match read_reply(&mut connection.reader).await {
            Ok(reply) if reply["return"].as_u64() == Some(id) => return Ok(()),
            // An older sync's answer or garbage: keep looking for ours.
            Ok(_) | Err(QgaError::Protocol(_)) => continue,
            Err(error) => return Err(error),
        }
    }
}

async fn read_reply<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Value, QgaError> {
    read_reply_within(reader, MAX_REPLY).await
}

async fn read_reply_within<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Value, QgaError> {
    loop {
        let line = match read_line(reader, limit).await {
            Err(_) | Ok(LineRead::Eof) => return Err(QgaError::Closed),
            Ok(LineRead::TooLong) => {
                return Err(QgaError::Protocol(format!(
                    "a reply longer than the limit of {limit} bytes (skipped)"
                )))
            }
            Ok(LineRead::Line(line)) => line,
        };
        let text: Vec<u8> = line.into_iter().filter(|byte| *byte != DELIMITER).collect();
        if text.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&text).map_err(|error| {
            QgaError::Protocol(format!(
                "not JSON ({error}): {}",
                String::from_utf8_lossy(&text).trim()
            ))
        });
    }
}

fn parse_reply(command: &str, reply: Value) -> Result<Value, QgaError> {
    if let Some(value) = reply.get("return") {
        return Ok(value.clone());
    }
    if let Some(error) = reply.get("error") {
        return Err(QgaError::Command {
            command: command.to_string(),
            description: error["desc"]
                .as_str()
                .unwrap_or("no description")
                .to_string(),
        });
    }
    Err(QgaError::Protocol(format!(
        "reply to {command} has neither return nor error: {reply}"
    )))
}

/// An exec's output, cut at `MAX_EXEC_OUTPUT` (or where the agent cut it) with the
/// marker.
fn decode_output(data: &Value, truncated_by_agent: &Value) -> Result<String, QgaError> {
    let Some(encoded) = data.as_str() else {
        return Ok(String::new());
    };
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|error| QgaError::Protocol(format!("guest-exec output is not base64: {error}")))?;
    let truncated = bytes.len() > MAX_EXEC_OUTPUT || truncated_by_agent.as_bool() == Some(true);
    bytes.truncate(MAX_EXEC_OUTPUT);
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if truncated {
        text.push_str(TRUNCATED_MARKER);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_qga_reply_over_the_limit_is_an_error_naming_it() {
        let input = format!(
            "{{\"return\": \"{}\"}}\n{{\"return\": 7}}\n",
            "x".repeat(64)
        );
        let mut reader = BufReader::with_capacity(16, input.as_bytes());
        let problem = read_reply_within(&mut reader, 32).await.unwrap_err();
        assert_eq!(
            problem.to_string(),
            "guest agent protocol error: a reply longer than the limit of 32 bytes (skipped)"
        );
        assert_eq!(
            read_reply_within(&mut reader, 32).await.unwrap(),
            json!({"return": 7})
        );
    }

    #[test]
    fn exec_output_past_the_cap_is_cut_with_a_marker() {
        let encode = |bytes: &[u8]| json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        let big = vec![b'a'; MAX_EXEC_OUTPUT + 10];
        let text = decode_output(&encode(&big), &Value::Null).unwrap();
        assert_eq!(text.len(), MAX_EXEC_OUTPUT + TRUNCATED_MARKER.len());
        assert!(text.ends_with(TRUNCATED_MARKER));
        assert_eq!(
            decode_output(&encode(b"ok\n"), &Value::Null).unwrap(),
            "ok\n"
        );
        // The agent's own cut (its `out-truncated`) is marked too.
        assert_eq!(
            decode_output(&encode(b"ok"), &json!(true)).unwrap(),
            format!("ok{TRUNCATED_MARKER}")
        );
    }
}
