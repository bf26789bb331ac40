//! Watches on a key prefix that never miss a change. The watch starts right after a
//! snapshot's revision and remembers the last revision it delivered; after a dropped
//! connection it resumes from there. If etcd compacted that history away, it takes a new
//! snapshot and delivers it as [`WatchEvent::Resync`], so the consumer rebuilds its view
//! instead of silently drifting.

use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use crate::{Store, StoreError};

#[derive(Clone, Debug, PartialEq)]
pub enum WatchEvent {
    Put {
        key: String,
        value: Vec<u8>,
        mod_revision: i64,
    },
    Delete {
        key: String,
        mod_revision: i64,
    },
    /// Everything under the prefix now; replaces whatever the consumer knew.
    Resync {
        records: Vec<(String, Vec<u8>, i64)>,
    },
}

pub struct PrefixWatch {
    events: mpsc::Receiver<WatchEvent>,
    task: tokio::task::JoinHandle<()>,
    pushed_front: Option<WatchEvent>,
}

impl PrefixWatch {
    /// Reads everything under `prefix` and starts watching right after that read. The
    /// snapshot comes back as the first event (`Resync`).
    pub async fn start(store: &Store, prefix: &str) -> Result<PrefixWatch, StoreError> {
        let (records, revision) = store.list_raw(prefix).await?;
        let mut watch = PrefixWatch::resume(store, prefix, revision + 1);
        watch.pushed_front = Some(WatchEvent::Resync { records });
        Ok(watch)
    }

    /// Resumes watching from `revision` (inclusive), as after a restart that remembered
    /// where it was. If that history was compacted, the first event is a `Resync`.
    pub fn resume(store: &Store, prefix: &str, revision: i64) -> PrefixWatch {
        let (sender, events) = mpsc::channel(1024);
        let task = tokio::spawn(watch_loop(
            store.clone(),
            prefix.to_string(),
            revision,
            sender,
        ));
        PrefixWatch {
            events,
            task,
            pushed_front: None,
        }
    }

    /// The next change; `None` only if the watch task ended (never, while the store lives).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if let Some(first) = self.pushed_front.take() {
            return Some(first);
        }
        self.events.recv().await
    }
}

impl Drop for PrefixWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch_loop(
    store: Store,
    prefix: String,
    mut next_revision: i64,
    sender: mpsc::Sender<WatchEvent>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if sender.is_closed() {
            return;
        }
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next_revision)
            .with_progress_notify();
        let mut stream = match store.client().watch(prefix.as_str(), Some(options)).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!("watch on {prefix} failed to open: {error}; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        while let Ok(Some(response)) = stream.message().await {
            backoff = Duration::from_millis(100);
            if response.compact_revision() > 0 || (response.canceled() && !response.created()) {
                // History we needed is gone: start over from a fresh snapshot.
                match store.list_raw(&prefix).await {
                    Ok((records, revision)) => {
                        next_revision = revision + 1;
                        if sender.send(WatchEvent::Resync { records }).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => tracing::debug!("resync of {prefix} failed: {error}"),
                }
                break;
            }
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let mod_revision = kv.mod_revision();
                next_revision = next_revision.max(mod_revision + 1);
                let change = match event.event_type() {
                    EventType::Put => WatchEvent::Put {
                        key,
                        value: kv.value().to_vec(),
                        mod_revision,
                    },
                    EventType::Delete => WatchEvent::Delete { key, mod_revision },
                };
                if sender.send(change).await.is_err() {
                    return;
                }
            }
            // A progress notification (not the creation reply) means "synced up to here".
            if response.events().is_empty() && !response.created() {
                if let Some(header) = response.header() {
                    next_revision = next_revision.max(header.revision() + 1);
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}
