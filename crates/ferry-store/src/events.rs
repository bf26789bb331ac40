//! The event log (`events/{ms}-{seq}-{source}`): written under a long lease, so it is
//! bounded in time, with keys that sort by time. Recording never fails an operation.

use std::time::{Duration, Instant};

use ferry_model::cluster::{now_ms, Event, RECORD_VERSION};
use ferry_model::events::EventKind;
use tokio::sync::Mutex;

use crate::{Store, StoreError};

/// Events live this long (they are written under a lease of this TTL).
const EVENT_TTL_SECONDS: i64 = 3600;

pub struct EventLog {
    store: Store,
    source: String,
    state: Mutex<EventLease>,
}

#[derive(Default)]
struct EventLease {
    lease: Option<(i64, Instant)>,
    sequence: u64,
}

impl EventLog {
    pub fn new(store: Store, source: String) -> EventLog {
        EventLog {
            store,
            source,
            state: Mutex::new(EventLease::default()),
        }
    }

    /// Records an event; a failure is logged, never raised (an event must not fail an
    /// operation).
    pub async fn record(&self, subject: &str, kind: EventKind, message: &str) {
        if let Err(error) = self.try_record(subject, kind, message).await {
            tracing::warn!("cannot record event {kind} for {subject}: {error}");
        }
        tracing::info!(subject, kind = kind.as_str(), "{message}");
    }

    async fn try_record(
        &self,
        subject: &str,
        kind: EventKind,
        message: &str,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        let fresh = state.lease.filter(|(_, granted)| {
            granted.elapsed() < Duration::from_secs(EVENT_TTL_SECONDS as u64 / 2)
        });
        let lease = match fresh {
            Some((lease, _)) => lease,
            None => {
                let granted = self
                    .store
                    .client()
                    .lease_grant(EVENT_TTL_SECONDS, None)
                    .await
                    .map_err(|error| self.store.etcd_error(error))?;
                state.lease = Some((granted.id(), Instant::now()));
                granted.id()
            }
        };
        state.sequence += 1;
        let at_ms = now_ms();
        let event = Event {
            version: RECORD_VERSION,
            at_ms,
            source: self.source.clone(),
            subject: subject.into(),
            kind: kind.as_str().into(),
            message: message.into(),
        };
        // The source in the key keeps two hosts' events at the same millisecond apart.
        let key = format!(
            "{}-{}",
            self.store.keys().event(at_ms, state.sequence),
            self.source.replace('/', ".")
        );
        self.store.put(&key, &event, Some(lease)).await?;
        Ok(())
    }
}
