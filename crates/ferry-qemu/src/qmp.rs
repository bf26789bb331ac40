//! A thin QMP client on tokio.
//!
//! One reader task owns the socket's read half. Every command carries a numeric `id`;
//! the reader hands each reply to the caller waiting on that id and fans events out to
//! subscribers. The rules that keep one bad moment from breaking the connection:
//!
//! - a command that times out forgets its id; its late reply is dropped, and the next
//!   command works as usual;
//! - unknown events, unknown fields and lines that are not JSON are logged and skipped;
//! - when QEMU goes away (EOF, reset), every waiting caller gets [`QmpError::Closed`] at
//!   once instead of waiting for its timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot, watch};

use crate::bounded::{read_line, LineRead};

/// The default time a command may take. Migration-related commands return at once (the
/// work happens in the background), so this bounds only a QEMU that stopped answering.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// A line longer than this is not a QMP message (the largest replies are a few KiB): it
/// is skipped without being held, and reported as a protocol error naming the limit.
pub const MAX_LINE: usize = 16 << 20;

#[derive(Debug, Clone, thiserror::Error)]
pub enum QmpError {
    /// Connecting to the socket failed.
    #[error("cannot connect to QMP socket {}: {reason}", path.display())]
    Connect { path: PathBuf, reason: String },
    /// The peer did not speak QMP.
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU answered with an error.
    #[error("QMP command {command} failed: {description} ({class})")]
    Command {
        command: String,
        class: String,
        description: String,
    },
    /// No reply within the timeout.
    #[error("QMP command {command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    /// The connection is gone: QEMU exited or closed the monitor.
    #[error("QMP connection closed (QEMU exited or closed its monitor)")]
    Closed,
}

/// An asynchronous event from QEMU, kept whole so that unknown ones pass through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Value,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, QmpError>>>>>;

/// A connected, capabilities-negotiated QMP session. Cheap to clone.
#[derive(Clone)]
pub struct Qmp {
    writer: Arc<tokio::sync::Mutex<OwnedWriteHalf>>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
    greeting: Arc<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Connect {
                path: path.into(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|error| QmpError::Connect {
                path: path.into(),
                reason: error.to_string(),
            })?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);

        let greeting = tokio::time::timeout(timeout, read_message(&mut reader))
            .await
            .map_err(|_| QmpError::Protocol(format!("no greeting within {timeout:?}")))??
            .ok_or(QmpError::Closed)?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }

        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let qmp = Qmp {
            writer: Arc::new(tokio::sync::Mutex::new(write_half)),
            pending: Arc::default(),
            next_id: Arc::new(AtomicU64::new(1)),
            events: events.clone(),
            closed,
            greeting: Arc::new(greeting),
        };
        tokio::spawn(read_loop(reader, qmp.pending.clone(), events, closed_tx));
        qmp.execute_with_timeout("qmp_capabilities", None, timeout)
            .await?;
        Ok(qmp)
    }

    /// QEMU's version as the greeting reported it, e.g. `7.2.x`.
    pub fn qemu_version(&self) -> String {
        let version = &self.greeting["QMP"]["version"]["qemu"];
        format!(
            "{}.{}.{}",
            version["major"], version["minor"], version["micro"]
        )
    }

    /// Receives every event from now on. A subscriber that falls more than 256 events
    /// behind skips the oldest (and is told so by the channel).
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves when the connection is gone.
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        if closed.wait_for(|is_closed| *is_closed).await.is_err() {
            tracing::trace!("the sender is gone: nothing more will change");
        }
    }

    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        self.execute_with_timeout(command, arguments, DEFAULT_TIMEOUT)
            .await
    }

    pub async fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        if self.is_closed() {
            return Err(QmpError::Closed);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply_tx, reply_rx) = oneshot::channel();
        lock(&self.pending).insert(id, reply_tx);
        if self.is_closed() {
            // The reader ended between the check above and the insert: nobody would answer.
            lock(&self.pending).remove(&id);
            return Err(QmpError::Closed);
        }

        let mut message = json!({"execute": command, "id": id});
        if let Some(arguments) = arguments {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        // The timeout covers the write too: a QEMU whose main loop is stuck stops reading,
        // the socket buffer fills, and the write (or the wait for the writer) would never
        // end. The write runs in its own task so that giving up never cuts a line in half;
        // it finishes whole once QEMU reads again.
        let deadline = tokio::time::Instant::now() + timeout;
        let writer = self.writer.clone();
        let write = tokio::spawn(async move {
            let mut writer = writer.lock().await;
            writer.write_all(line.as_bytes()).await
        });
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(Ok(()))) => {}
            Ok(_) => {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Closed);
            }
            Err(_) => {
                lock(&self.pending).remove(&id);
                return Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                });
            }
        }

        match tokio::time::timeout_at(deadline, reply_rx).await {
            Ok(Ok(Ok(reply))) => Ok(reply),
            Ok(Ok(Err(QmpError::Command {
                class, description, ..
            }))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                description,
            }),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                    after: timeout,
                })
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map inconsistent; keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads one JSON message; `Ok(None)` on EOF. Blank lines are skipped; a line that is not
/// JSON, or is longer than `MAX_LINE`, is reported as a protocol error to the caller,
/// which decides whether to go on.
async fn read_message<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Value>, QmpError> {
    read_message_within(reader, MAX_LINE).await
}

async fn read_message_within<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    limit: usize,
) -> Result<Option<Value>, QmpError> {
    loop {
        let line = match read_line(reader, limit).await {
            Err(_) => return Err(QmpError::Closed),
            Ok(LineRead::Eof) => return Ok(None),
            Ok(LineRead::TooLong) => {
                return Err(QmpError::Protocol(format!(
                    "a line longer than the limit of {limit} bytes (skipped)"
                )))
            }
            Ok(LineRead::Line(line)) => line,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&line).map(Some).map_err(|error| {
            QmpError::Protocol(format!(
                "not JSON ({error}): {}",
                String::from_utf8_lossy(&line).trim()
            ))
        });
    }
}

async fn read_loop<R: AsyncBufRead + Unpin>(
    mut reader: R,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Sender<bool>,
) {
    loop {
        let message = match read_message(&mut reader).await {
            Ok(Some(message)) => message,
            Ok(None) | Err(QmpError::Closed) => break,
            Err(error) => {
                tracing::warn!("skipping QMP line: {error}");
                continue;
            }
        };
        if message.get("event").is_some() {
            match serde_json::from_value::<QmpEvent>(message) {
                Ok(event) => {
                    if events.send(event).is_err() {
                        tracing::trace!("nobody listens any more");
                    }
                }
                Err(error) => tracing::warn!("skipping malformed QMP event: {error}"),
            }
            continue;
        }
        let Some(id) = message.get("id").and_then(Value::as_u64) else {
            tracing::debug!("skipping QMP reply without a known id: {message}");
            continue;
        };
        let Some(waiter) = lock(&pending).remove(&id) else {
            tracing::debug!("dropping late QMP reply {id}");
            continue;
        };
        let reply = if let Some(value) = message.get("return") {
            Ok(value.clone())
        } else if let Some(error) = message.get("error") {
            Err(QmpError::Command {
                command: String::new(),
                class: error["class"]
                    .as_str()
                    .unwrap_or("GenericError")
                    .to_string(),
                description: error["desc"]
                    .as_str()
                    .unwrap_or("no description")
                    .to_string(),
            })
        } else {
            Err(QmpError::Protocol(format!(
                "reply has neither return nor error: {message}"
            )))
        };
        if waiter.send(reply).is_err() {
            tracing::trace!("nobody listens any more");
        }
    }
    if closed.send(true).is_err() {
        tracing::trace!("nobody listens any more");
    }
    // Dropping the senders wakes every waiter with `Closed`.
    lock(&pending).clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_qmp_line_over_the_limit_is_an_error_naming_it_and_the_next_message_is_read() {
        let input = format!(
            "{{\"event\": \"{}\"}}\n{{\"return\": {{}}}}\n",
            "x".repeat(64)
        );
        let mut reader = BufReader::with_capacity(16, input.as_bytes());
        let problem = read_message_within(&mut reader, 32).await.unwrap_err();
        assert_eq!(
            problem.to_string(),
            "QMP protocol error: a line longer than the limit of 32 bytes (skipped)"
        );
        let next = read_message_within(&mut reader, 32).await.unwrap();
        assert_eq!(next, Some(json!({"return": {}})));
    }
}
